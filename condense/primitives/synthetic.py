"""The file between the two stages: a synthetic set (images, labels, normalisation, the config
that made it) in safetensors, which loads without executing code."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torchvision.utils import save_image

from condense.primitives.dataset import denormalise
from condense.primitives.files import atomic_write
from condense.schema import ConfigError

FORMAT = "condense.synthetic/1"


@dataclass
class SyntheticSet:
    images: torch.Tensor  # (N, C, H, W), in the dataset's normalised space
    labels: torch.Tensor  # (N,)
    dataset: str
    mean: list[float]
    std: list[float]
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def ipc(self) -> int:
        return int(torch.bincount(self.labels).max())


def save_synthetic(syn: SyntheticSet, path: Path) -> None:
    metadata = {
        "format": FORMAT,
        "dataset": syn.dataset,
        "mean": json.dumps(syn.mean),
        "std": json.dumps(syn.std),
        "config": json.dumps(syn.config),
    }
    tensors = {
        "images": syn.images.detach().cpu().contiguous(),
        "labels": syn.labels.cpu().contiguous(),
    }
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


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
    return SyntheticSet(
        images.float(),
        labels.long(),
        meta["dataset"],
        json.loads(meta["mean"]),
        json.loads(meta["std"]),
        json.loads(meta.get("config", "{}")),
    )


def check_compatible(syn: SyntheticSet, dataset: str, shape: tuple[int, ...], num_classes: int) -> None:
    """Refuse a set made for another dataset or image shape, saying which."""
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


def save_grid(syn: SyntheticSet, path: Path) -> None:
    """A PNG with one row per class, de-normalised to pixel space."""
    pixels = denormalise(syn.images.detach().cpu(), syn.mean, syn.std).clamp(0, 1)
    order = torch.argsort(syn.labels, stable=True)
    atomic_write(
        path,
        lambda tmp: save_image(pixels[order], str(tmp), nrow=max(syn.ipc, 1), padding=1, format="png"),
    )
