"""Reading synthetic sets made by other tools, so any set is judged by condense's protocol.

Layouts (`reader.layout`, one reader each in READERS):
- condense: condense's own safetensors file (condense/primitives/synthetic.py).
- dc: the result file of VICO-UoE/DatasetCondensation's main.py / main_DM.py (DC, DSA, DM):
  torch.save of {'data': [[images (N, C, H, W) normalised, labels (N,)], ... one per experiment],
  'accs_all_exps': {model: [numpy floats]}}; `reader.experiment` picks the pair.
- mtt: MTT's and DATM's distill.py outputs, images_best.pt and labels_best.pt in one folder (or any
  images_X.pt with its labels_X.pt), and DATM's lr_best.pt (a 0-dim learned learning rate). Labels
  are hard (N,) or soft (N, classes): DATM saves logits.
- png: a folder with one sub-folder per class of PNG images in pixel space; folders named 0..C-1
  give the class, other names are sorted (torchvision's ImageFolder order).

Nothing a file holds is executed: torch files load with `weights_only=True` (tensors and plain
data; the numpy scalars DC's accuracies are stored as are the only extra types allowed), PNGs are
decoded as pixels. Images of the dc and mtt layouts are taken to be in the run's dataset space
(normalised, or ZCA-whitened under dataset.zca=true, as MTT makes them with --zca).
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from condense.primitives.dataset import Dataset
from condense.primitives.synthetic import SyntheticSet, load_synthetic
from condense.schema import ConfigError, ReaderConfig, require_choice

EXPECTED = (
    "condense's synthetic.safetensors, DC/DSA/DM's res_*.pt (a dict with 'data'), MTT/DATM's folder "
    "with images_best.pt and labels_best.pt, or a folder of class folders of PNGs"
)
# DC's files store accuracies as numpy float64 scalars: their reconstructors build data only.
_NUMPY_CORE = getattr(np, "_core", None) or np.core  # numpy 2 renamed it
NUMPY_SCALARS: list[Any] = [
    _NUMPY_CORE.multiarray.scalar,
    np.dtype,
    np.dtypes.Float64DType,
    np.dtypes.Float32DType,
]
# Files written under numpy 1.x (every published DC result file) name it by its old module.
NUMPY_SCALARS.append((_NUMPY_CORE.multiarray.scalar, "numpy.core.multiarray.scalar"))
SOFT_LABEL_KINDS = ("auto", "logits", "probabilities")
MTT_IMAGES = re.compile(r"images_(?!zca_)(.+)\.pt$")


def load_tensors(path: Path) -> Any:
    """torch.load with weights_only=True: a file that needs code to load is refused, not run."""
    try:
        with torch.serialization.safe_globals(NUMPY_SCALARS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        named = re.search(r"GLOBAL (\S+)", str(err))
        first = f"it names {named.group(1)}" if named else type(err).__name__
        raise ConfigError(
            f"synthetic={path} holds objects other than tensors and plain data ({first}); condense "
            "never runs code from a file: save the set as tensors (torch.save of tensors, lists, dicts)"
        ) from err
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise ConfigError(
            f"synthetic={path} cannot be read as a torch.save file "
            f"({(str(err).splitlines() or [type(err).__name__])[0][:120]}): "
            "it is truncated or of another format; expected " + EXPECTED
        ) from err


def as_images(value: Any, where: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or value.ndim != 4 or not value.is_floating_point():
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise ConfigError(f"{where}: images must be a float tensor (N, C, H, W), found {shape}")
    return value.detach().float()


def soft_to_logits(labels: torch.Tensor, kind: str) -> torch.Tensor:
    """Soft labels as logits: DATM stores logits; probabilities become log-probabilities (their
    softmax is the same distribution), clamped so a zero stays finite."""
    is_distribution = bool((labels >= 0).all()) and torch.allclose(
        labels.sum(dim=1), torch.ones(len(labels)), atol=1e-3
    )
    if kind == "probabilities" or (kind == "auto" and is_distribution):
        if not is_distribution:
            raise ConfigError(
                "reader.soft_labels=probabilities but the labels' rows are not distributions "
                "(each >= 0, summing to 1): use reader.soft_labels=logits"
            )
        return labels.clamp_min(1e-12).log()
    return labels


def split_labels(value: Any, count: int, where: str, kind: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(hard labels, soft-label logits or None) from hard (N,) or soft (N, classes) labels."""
    if not isinstance(value, torch.Tensor) or value.ndim not in (1, 2) or len(value) != count:
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise ConfigError(
            f"{where}: labels must be a tensor (N,) or (N, classes) with N={count}, found {shape}"
        )
    value = value.detach()
    if value.ndim == 2:
        soft = soft_to_logits(value.float(), kind)
        return soft.argmax(dim=1), soft
    if value.is_floating_point() and not torch.equal(value, value.round()):
        raise ConfigError(f"{where}: 1-D labels must be class indices; soft labels are (N, classes)")
    return value.long(), None


def read_condense(path: Path, cfg: ReaderConfig, data: Dataset) -> SyntheticSet:
    return load_synthetic(path)


def read_dc(path: Path, cfg: ReaderConfig, data: Dataset) -> SyntheticSet:
    content = load_tensors(path)
    pairs = content.get("data") if isinstance(content, dict) else None
    if not isinstance(pairs, list | tuple) or not pairs:
        raise ConfigError(f"synthetic={path} is not a DC result file (a dict with a non-empty 'data' list)")
    if not 0 <= cfg.experiment < len(pairs):
        raise ConfigError(
            f"reader.experiment={cfg.experiment}: {path.name} holds {len(pairs)} experiments: "
            f"use 0..{len(pairs) - 1}"
        )
    pair = pairs[cfg.experiment]
    if not isinstance(pair, list | tuple) or len(pair) != 2:
        raise ConfigError(f"synthetic={path}: data[{cfg.experiment}] is not an [images, labels] pair")
    where = f"synthetic={path} data[{cfg.experiment}]"
    images = as_images(pair[0], where)
    labels, soft = split_labels(pair[1], len(images), where, cfg.soft_labels)
    return foreign_set(images, labels, soft, None, data, f"dc:{path.stem}#{cfg.experiment}")


def mtt_files(path: Path) -> tuple[Path, Path, Path]:
    """(images, labels, learned lr) of an MTT/DATM output: a folder (its *_best.pt) or an images file."""
    if path.is_dir():
        path = path / "images_best.pt"
    match = MTT_IMAGES.match(path.name)
    if match is None or not path.exists():
        raise ConfigError(
            f"synthetic={path}: not an MTT/DATM output: give the folder holding images_best.pt and "
            "labels_best.pt, or an images_X.pt beside its labels_X.pt"
        )
    tag = match.group(1)
    return path, path.with_name(f"labels_{tag}.pt"), path.with_name(f"lr_{tag}.pt")


def learned_lr(path: Path) -> float | None:
    if not path.exists():
        return None
    value = load_tensors(path)
    if not isinstance(value, torch.Tensor) or value.numel() != 1 or float(value) <= 0:
        raise ConfigError(f"synthetic: {path} must hold one positive learning rate (a 0-dim tensor)")
    return float(value)


def read_mtt(path: Path, cfg: ReaderConfig, data: Dataset) -> SyntheticSet:
    images_path, labels_path, lr_path = mtt_files(path)
    if not labels_path.exists():
        raise ConfigError(f"synthetic={images_path}: {labels_path.name} is missing beside it")
    images = as_images(load_tensors(images_path), f"synthetic={images_path}")
    labels, soft = split_labels(
        load_tensors(labels_path), len(images), f"synthetic={labels_path}", cfg.soft_labels
    )
    folder = images_path.parent.name or "."
    return foreign_set(images, labels, soft, learned_lr(lr_path), data, f"mtt:{folder}/{images_path.stem}")


def class_folders(path: Path) -> list[Path]:
    folders = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    if folders and all(f.name.isdigit() for f in folders):
        return sorted(folders, key=lambda f: int(f.name))
    return folders


def decode_png(file: Path, channels: int) -> torch.Tensor:
    """One PNG as (C, H, W) pixels in [0, 1], decoded by Pillow (pixels only, no code)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(file, formats=["PNG"]) as image:
            pixels = np.asarray(image.convert("L" if channels == 1 else "RGB"), dtype=np.float32) / 255
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise ConfigError(f"synthetic={file} is not a readable PNG ({err}): re-save it as PNG") from err
    tensor = torch.from_numpy(pixels)
    return tensor.unsqueeze(0) if tensor.ndim == 2 else tensor.permute(2, 0, 1)


def read_png(path: Path, cfg: ReaderConfig, data: Dataset) -> SyntheticSet:
    folders = class_folders(path) if path.is_dir() else []
    numbered = bool(folders) and all(f.name.isdigit() for f in folders)
    if not folders or (not numbered and len(folders) != data.num_classes):
        raise ConfigError(
            f"synthetic={path}: a PNG set needs one folder per class ({data.num_classes}), named 0..."
            f"{data.num_classes - 1} or sorted in class order"
        )
    pixels, labels = [], []
    for index, folder in enumerate(folders):
        label = int(folder.name) if numbered else index
        files = sorted(folder.glob("*.png"))
        if not files:
            raise ConfigError(f"synthetic={path}: class folder {folder.name} holds no .png file")
        pixels += [decode_png(file, data.image_shape[0]) for file in files]
        labels += [label] * len(files)
    shapes = {tuple(p.shape) for p in pixels}
    if len(shapes) != 1:
        raise ConfigError(f"synthetic={path}: the PNGs have different shapes {sorted(shapes)}: use one size")
    images = data.to_model_space(torch.stack(pixels))
    return foreign_set(images, torch.tensor(labels), None, None, data, f"png:{path.name}")


def foreign_set(
    images: torch.Tensor,
    labels: torch.Tensor,
    soft: torch.Tensor | None,
    lr: float | None,
    data: Dataset,
    source: str,
) -> SyntheticSet:
    """A set read from another tool's layout, in the run's dataset space."""
    return SyntheticSet(
        images, labels, data.name, data.mean, data.std, soft_labels=soft, lr=lr,
        transform=data.transform, source=source,
    )  # fmt: skip


READERS: dict[str, Callable[[Path, ReaderConfig, Dataset], SyntheticSet]] = {
    "condense": read_condense,
    "dc": read_dc,
    "mtt": read_mtt,
    "png": read_png,
}


def detect_layout(path: Path) -> str:
    """The layout a path holds, by its name and shape (contents are checked by the reader)."""
    if path.is_dir():
        if (path / "images_best.pt").exists():
            return "mtt"
        if any(p.is_dir() and any(p.glob("*.png")) for p in path.iterdir()):
            return "png"
    elif path.suffix == ".safetensors":
        return "condense"
    elif MTT_IMAGES.match(path.name):
        return "mtt"
    elif path.suffix in (".pt", ".pth"):
        return "dc"
    raise ConfigError(f"synthetic={path}: unknown layout: expected {EXPECTED}; or set reader.layout")


def read_set(path: Path, cfg: ReaderConfig, data: Dataset) -> SyntheticSet:
    """The set at `path` in the layout `reader.layout` names (auto: detected)."""
    if not path.exists():
        raise ConfigError(f"synthetic={path}: no such file or folder: expected {EXPECTED}")
    layout = detect_layout(path) if cfg.layout == "auto" else cfg.layout
    return READERS[layout](path, cfg, data)


def validate_reader(cfg: ReaderConfig) -> None:
    require_choice(cfg.layout, ("auto", *READERS), "reader.layout")
    require_choice(cfg.soft_labels, SOFT_LABEL_KINDS, "reader.soft_labels")
    if cfg.experiment < 0:
        raise ConfigError(f"reader.experiment={cfg.experiment}: use >= 0 (0 = the file's first experiment)")
