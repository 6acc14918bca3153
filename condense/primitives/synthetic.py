"""The file between the two stages: a synthetic set (images, labels, normalisation, the config
that made it, and what other tools' sets carry: soft labels, a learned learning rate) in
safetensors, which loads without executing code. Other tools' layouts: condense/primitives/foreign.py."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from condense.primitives.dataset import denormalise
from condense.primitives.files import atomic_write
from condense.schema import ConfigError

FORMAT = "condense.synthetic/1"


def expand_mosaic(images: torch.Tensor, k: int) -> torch.Tensor:
    """IDM's expansion: each image's k x k tiles, each upsampled (bilinear, as IDM) to the image's
    size. (N, C, H, W) -> (k*k*N, C, H, W), tile-major in column-major tile order (top-left,
    bottom-left, top-right, ... as IDM orders its quarters): rows t*N..(t+1)*N are tile t of
    every image, so labels repeat as labels.repeat(k*k)."""
    if k == 1:
        return images
    _, _, h, w = images.shape
    if h % k or w % k:
        raise ConfigError(f"matching.expansion={k} does not divide the {h}x{w} images: use a divisor of both")
    th, tw = h // k, w // k
    tiles = [images[:, :, i * th : (i + 1) * th, j * tw : (j + 1) * tw] for j in range(k) for i in range(k)]
    return F.interpolate(torch.cat(tiles), size=(h, w), mode="bilinear", align_corners=False)


def tile_mosaic(groups: torch.Tensor, k: int) -> torch.Tensor:
    """expand_mosaic's inverse layout: (k*k, N, C, H, W) full-size images, group t downscaled by k
    (bilinear) into tile t of each of the N mosaics (IDM's initialisation from real images)."""
    _, n, c, h, w = groups.shape
    th, tw = h // k, w // k
    mosaics = groups.new_zeros((n, c, h, w))
    for t, group in enumerate(groups):
        j, i = divmod(t, k)
        small = F.interpolate(group, size=(th, tw), mode="bilinear", align_corners=False)
        mosaics[:, :, i * th : (i + 1) * th, j * tw : (j + 1) * tw] = small
    return mosaics


@dataclass
class SyntheticSet:
    images: torch.Tensor  # (N, C, H, W), in the dataset's normalised space
    labels: torch.Tensor  # (N,)
    dataset: str
    mean: list[float]
    std: list[float]
    config: dict[str, Any] = field(default_factory=dict)
    # (N, classes) logits of the soft labels the set trains with, or None (hard labels only);
    # `labels` then holds their argmax.
    soft_labels: torch.Tensor | None = None
    lr: float | None = None  # a learned evaluation learning rate (DATM's lr_best.pt)
    transform: str = "normalise"  # the dataset space of the images: normalise or zca(eps=...)
    source: str = "condense"  # the layout it was read from (condense, dc, mtt, png)
    # IDM's partitioning: each stored image holds expansion x expansion sub-images, and the set
    # trains on all of them upsampled (expanded()); 1: the images are trained on as stored.
    expansion: int = 1

    @property
    def ipc(self) -> int:
        """Stored images per class (an expanded set trains on expansion^2 times as many)."""
        return int(torch.bincount(self.labels).max())

    def expanded(self) -> SyntheticSet:
        """The set as models train on it: every sub-image upsampled, labels repeated."""
        if self.expansion == 1:
            return self
        k = self.expansion
        soft = None if self.soft_labels is None else self.soft_labels.repeat(k * k, 1)
        return replace(
            self,
            images=expand_mosaic(self.images, k),
            labels=self.labels.repeat(k * k),
            soft_labels=soft,
            expansion=1,
        )

    @property
    def label_kind(self) -> str:
        return "hard" if self.soft_labels is None else "soft"


def save_synthetic(syn: SyntheticSet, path: Path) -> None:
    metadata = {
        "format": FORMAT,
        "dataset": syn.dataset,
        "mean": json.dumps(syn.mean),
        "std": json.dumps(syn.std),
        "config": json.dumps(syn.config),
        "transform": syn.transform,
        "lr": json.dumps(syn.lr),
        "expansion": str(syn.expansion),
    }
    tensors = {
        "images": syn.images.detach().cpu().contiguous(),
        "labels": syn.labels.cpu().contiguous(),
    }
    if syn.soft_labels is not None:
        tensors["soft_labels"] = syn.soft_labels.detach().cpu().float().contiguous()
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def stored_config(path: Path) -> dict[str, Any] | None:
    """The config a condense set's file records, read from its header alone; None for a file that
    is missing or not a condense set."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError):
        return None
    if meta.get("format") != FORMAT:
        return None
    return json.loads(meta.get("config", "{}"))


def load_synthetic(path: Path) -> SyntheticSet:
    if not path.exists():
        raise ConfigError(f"synthetic={path}: no such file: give the path of a synthetic.safetensors")
    try:
        tensors = load_file(str(path))
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise ConfigError(f"synthetic={path} is corrupted or not a safetensors file ({err})") from err
    if meta.get("format") != FORMAT or "images" not in tensors or "labels" not in tensors:
        raise ConfigError(f"synthetic={path} is not a condense synthetic set (format {meta.get('format')})")
    images, labels = tensors["images"], tensors["labels"]
    if images.ndim != 4 or labels.shape != images.shape[:1]:
        raise ConfigError(
            f"synthetic={path}: images {tuple(images.shape)} and labels {tuple(labels.shape)} do not fit"
        )
    soft = tensors.get("soft_labels")
    if soft is not None and (soft.ndim != 2 or len(soft) != len(labels)):
        raise ConfigError(
            f"synthetic={path}: soft labels {tuple(soft.shape)} do not fit {len(labels)} images"
        )
    return SyntheticSet(
        images.float(),
        labels.long(),
        meta["dataset"],
        json.loads(meta["mean"]),
        json.loads(meta["std"]),
        json.loads(meta.get("config", "{}")),
        soft_labels=soft,
        lr=json.loads(meta.get("lr", "null")),
        transform=meta.get("transform", "normalise"),
        expansion=int(meta.get("expansion", "1")),
    )


def check_compatible(
    syn: SyntheticSet, dataset: str, shape: tuple[int, ...], num_classes: int, transform: str = "normalise"
) -> None:
    """Refuse a set made for another dataset, image shape, class count or transform, saying which."""
    if syn.dataset != dataset:
        raise ConfigError(
            f"synthetic set is for dataset={syn.dataset}, this run uses dataset={dataset}: "
            f"add dataset={syn.dataset}"
        )
    if tuple(syn.images.shape[1:]) != tuple(shape):
        raise ConfigError(
            f"synthetic images have shape {tuple(syn.images.shape[1:])}, dataset {dataset} has {tuple(shape)}"
        )
    if int(syn.labels.max()) >= num_classes or int(syn.labels.min()) < 0:
        raise ConfigError(f"synthetic labels fall outside the {num_classes} classes of {dataset}")
    if syn.soft_labels is not None and syn.soft_labels.shape[1] != num_classes:
        raise ConfigError(
            f"synthetic soft labels have {syn.soft_labels.shape[1]} columns, dataset {dataset} has "
            f"{num_classes} classes: give labels with one column per class"
        )
    if syn.transform != transform:
        setting = "dataset.zca=true" if syn.transform.startswith("zca") else "dataset.zca=false"
        raise ConfigError(
            f"synthetic images are in {syn.transform} space, this run's dataset is in {transform}: "
            f"add {setting}"
        )


def save_grid(
    syn: SyntheticSet, path: Path, to_pixels: Callable[[torch.Tensor], torch.Tensor] | None = None
) -> None:
    """A PNG with one row per class, taken back to pixel space (`to_pixels`: the dataset's inverse
    transform; by default the set's mean/std)."""
    # Imported here: torchvision's package import pulls in torch._dynamo (~2 s), which every
    # command that never saves a grid (a refusal, stage=evaluate, the report) would pay.
    from torchvision.utils import save_image

    images = syn.images.detach().cpu()
    pixels = (to_pixels(images) if to_pixels else denormalise(images, syn.mean, syn.std)).clamp(0, 1)
    order = torch.argsort(syn.labels, stable=True)
    atomic_write(
        path,
        lambda tmp: save_image(pixels[order], str(tmp), nrow=max(syn.ipc, 1), padding=1, format="png"),
    )
