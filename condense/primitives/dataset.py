"""Datasets as normalised in-memory tensors, found offline where possible.

- digits: scikit-learn's embedded 8x8 set (no download), split once with a fixed seed.
- mnist, fashion_mnist, svhn, cifar10, cifar100: torchvision's loaders under `dataset.root`,
  downloading only when `dataset.download=true`.
- fashion_mnist also reads Debian's `dataset-fashion-mnist` IDX files where they are installed,
  without any setting. torchvision refuses Debian's .gz files (their gzip headers differ, so the
  MD5 sums do not match), so the IDX format is parsed here directly and nothing is written into
  the system's folder.

With `dataset.zca=true` the images are ZCA-whitened instead of normalised (MTT's transform, for the
sets it makes): kornia's ZCA is fitted once on the training pixels and cached under
`root/zca/`, keyed by a digest of those pixels, so a cache never serves another split.
"""

from __future__ import annotations

import gzip
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from condense.primitives.augment import validate_eval_augment
from condense.schema import ConfigError, DatasetConfig, require_choice

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


@dataclass
class Split:
    """Normalised images (N, C, H, W) float32 and integer labels (N,)."""

    images: torch.Tensor
    labels: torch.Tensor

    def indices_by_class(self, num_classes: int) -> list[torch.Tensor]:
        return [torch.nonzero(self.labels == c).flatten() for c in range(num_classes)]


@dataclass
class Dataset:
    name: str
    train: Split
    test: Split
    num_classes: int
    mean: list[float]
    std: list[float]
    zca: Zca | None = field(default=None)
    # the settings that chose the training images where the files do not fix them (digits' split)
    split: dict[str, float | int] | None = field(default=None)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.images.shape[1:])  # type: ignore[return-value]

    @property
    def transform(self) -> str:
        """The space the images live in: `normalise` (mean/std) or `zca(eps=...)`."""
        return "normalise" if self.zca is None else f"zca(eps={self.zca.eps})"

    def to_model_space(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels in [0, 1] into the space the networks see (normalised or whitened)."""
        return normalise(pixels, self.mean, self.std) if self.zca is None else self.zca.whiten(pixels)

    def to_pixels(self, images: torch.Tensor) -> torch.Tensor:
        """The inverse of to_model_space (for pictures of a set)."""
        return denormalise(images, self.mean, self.std) if self.zca is None else self.zca.unwhiten(images)


def normalise(images: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    m = torch.tensor(mean, dtype=images.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=images.dtype).view(1, -1, 1, 1)
    return (images - m) / s


def denormalise(images: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    m = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return images * s + m


@dataclass
class Zca:
    """ZCA whitening of flattened pixels: x -> (x - mean) @ transform (kornia's convention)."""

    mean: torch.Tensor  # (1, D)
    transform: torch.Tensor  # (D, D)
    inverse: torch.Tensor  # (D, D)
    eps: float

    def whiten(self, pixels: torch.Tensor) -> torch.Tensor:
        from kornia.enhance import linear_transform

        flat = pixels.flatten(1).to(self.transform)
        return linear_transform(flat, self.transform, self.mean).view_as(pixels)

    def unwhiten(self, images: torch.Tensor) -> torch.Tensor:
        flat = images.detach().flatten(1).to(self.inverse)
        return (flat @ self.inverse + self.mean).view_as(images)


def fit_zca(pixels: torch.Tensor, eps: float) -> Zca:
    """kornia's ZCA (unbiased covariance, eps added to the eigenvalues) fitted on (N, C, H, W)."""
    from kornia.enhance import zca_mean

    flat = pixels.flatten(1).double()  # the eigen-decomposition in float64, stored in float32
    transform, mean, inverse = zca_mean(flat, dim=0, unbiased=True, eps=eps, return_inverse=True)
    assert inverse is not None
    return Zca(mean.float().view(1, -1), transform.float(), inverse.float(), eps)


def cached_zca(pixels: torch.Tensor, cfg: DatasetConfig) -> Zca:
    """fit_zca once per training split and eps; the file is keyed by the pixels' digest."""
    from safetensors.torch import load_file, save_file

    from condense.primitives.files import atomic_write

    digest = hashlib.sha1(pixels.contiguous().numpy().tobytes()).hexdigest()[:12]
    path = Path(cfg.root).expanduser() / "zca" / f"{cfg.name}-eps{cfg.zca_eps}-{digest}.safetensors"
    if path.exists():
        t = load_file(str(path))
        return Zca(t["mean"], t["transform"], t["inverse"], cfg.zca_eps)
    zca = fit_zca(pixels, cfg.zca_eps)
    tensors = {"mean": zca.mean, "transform": zca.transform, "inverse": zca.inverse}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp)))
    return zca


# ---------------------------------------------------------------- raw loaders (pixels in [0, 1])
RawSplits = tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def load_digits_raw(cfg: DatasetConfig) -> RawSplits:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)
    labels = torch.tensor(digits.target, dtype=torch.long)
    idx_train, idx_test = train_test_split(
        np.arange(len(labels)),
        test_size=cfg.test_fraction,
        random_state=cfg.split_seed,
        stratify=digits.target,
    )
    idx_train, idx_test = torch.from_numpy(idx_train), torch.from_numpy(idx_test)
    return (images[idx_train], labels[idx_train]), (images[idx_test], labels[idx_test])


def read_idx(path: Path) -> np.ndarray:
    """Parse one IDX file (optionally gzipped): magic, dims, big-endian sizes, then uint8 data."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as err:
        raise ConfigError(f"dataset file {path} cannot be read ({err}): reinstall it") from err
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ConfigError(f"dataset file {path} is not an unsigned-byte IDX file: reinstall it")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise ConfigError(f"dataset file {path} is truncated: reinstall it")
    return body.reshape(dims)


def find_idx_folder(candidates: list[Path]) -> Path | None:
    """The first folder holding the four IDX files, plain or gzipped."""
    for folder in candidates:
        names = [n for pair in IDX_FILES.values() for n in pair]
        if all((folder / n).exists() or (folder / f"{n}.gz").exists() for n in names):
            return folder
    return None


def read_idx_splits(folder: Path) -> RawSplits:
    def pick(name: str) -> Path:
        plain = folder / name
        return plain if plain.exists() else folder / f"{name}.gz"

    out = []
    for split in ("train", "test"):
        image_file, label_file = IDX_FILES[split]
        images = torch.from_numpy(read_idx(pick(image_file)).copy()).float().div_(255).unsqueeze(1)
        labels = torch.from_numpy(read_idx(pick(label_file)).astype(np.int64))
        out.append((images, labels))
    return out[0], out[1]


def _torchvision_split(dataset: object) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixels and labels of a torchvision dataset, without going through PIL per image."""
    data = dataset.data  # type: ignore[attr-defined]
    data = torch.as_tensor(np.asarray(data))
    if data.ndim == 3:  # (N, H, W): MNIST-like
        data = data.unsqueeze(1)
    elif data.shape[-1] == 3:  # (N, H, W, 3): CIFAR
        data = data.permute(0, 3, 1, 2)
    targets = getattr(dataset, "targets", None)
    if targets is None:
        targets = dataset.labels  # type: ignore[attr-defined]  # SVHN
    return data.float().div_(255).contiguous(), torch.as_tensor(np.asarray(targets), dtype=torch.long)


def _missing_files(cfg: DatasetConfig, where: str) -> ConfigError:
    hint = " or install Debian's dataset-fashion-mnist" if cfg.name == "fashion_mnist" else ""
    return ConfigError(
        f"dataset={cfg.name}: files not found under {where} and downloads are off: "
        f"set dataset.download=true (needs internet), point dataset.root at them{hint}"
    )


def load_torchvision_raw(cfg: DatasetConfig) -> RawSplits:
    import torchvision.datasets as tvd

    root = Path(cfg.root).expanduser()
    builders: dict[str, Callable[[bool], object]] = {
        "mnist": lambda train: tvd.MNIST(root, train=train, download=cfg.download),
        "fashion_mnist": lambda train: tvd.FashionMNIST(root, train=train, download=cfg.download),
        "cifar10": lambda train: tvd.CIFAR10(root, train=train, download=cfg.download),
        "cifar100": lambda train: tvd.CIFAR100(root, train=train, download=cfg.download),
        "svhn": lambda train: tvd.SVHN(
            root / "svhn", split="train" if train else "test", download=cfg.download
        ),
    }
    try:
        train, test = builders[cfg.name](True), builders[cfg.name](False)
    except RuntimeError as err:  # torchvision: "Dataset not found ..."
        raise _missing_files(cfg, str(root)) from err
    except OSError as err:  # a download that cannot reach the internet
        raise ConfigError(f"dataset={cfg.name}: download into {root} failed ({err})") from err
    return _torchvision_split(train), _torchvision_split(test)


def load_fashion_mnist_raw(cfg: DatasetConfig) -> RawSplits:
    """torchvision's layout under root first, then Debian's IDX files, then a download."""
    root = Path(cfg.root).expanduser()
    folder = find_idx_folder([root / "FashionMNIST" / "raw", DEBIAN_FASHION_MNIST])
    if folder is not None:
        return read_idx_splits(folder)
    if not cfg.download:
        raise _missing_files(cfg, f"{root} and {DEBIAN_FASHION_MNIST}")
    return load_torchvision_raw(cfg)


RAW_LOADERS: dict[str, Callable[[DatasetConfig], RawSplits]] = {
    "digits": load_digits_raw,
    "mnist": load_torchvision_raw,
    "fashion_mnist": load_fashion_mnist_raw,
    "svhn": load_torchvision_raw,
    "cifar10": load_torchvision_raw,
    "cifar100": load_torchvision_raw,
}


def fashion_mnist_available() -> bool:
    return find_idx_folder([DEBIAN_FASHION_MNIST]) is not None


def validate_dataset(cfg: DatasetConfig) -> None:
    require_choice(cfg.name, RAW_LOADERS, "dataset.name")
    validate_eval_augment(cfg.eval_augment)
    if cfg.zca_eps <= 0:
        raise ConfigError(f"dataset.zca_eps={cfg.zca_eps}: use > 0 (MTT's 0.1)")
    if len(cfg.mean) != cfg.channels or len(cfg.std) != cfg.channels or min(cfg.std) <= 0:
        raise ConfigError(
            f"dataset.mean/std={list(cfg.mean)}/{list(cfg.std)}: give one value per channel "
            f"({cfg.channels}), each std > 0"
        )


def load_dataset(cfg: DatasetConfig) -> Dataset:
    validate_dataset(cfg)
    (x_train, y_train), (x_test, y_test) = RAW_LOADERS[cfg.name](cfg)
    shape = (cfg.channels, cfg.image_size, cfg.image_size)
    if tuple(x_train.shape[1:]) != shape:
        raise ConfigError(
            f"dataset={cfg.name}: files hold images of shape {tuple(x_train.shape[1:])}, "
            f"the config says {shape}: fix dataset.channels/image_size"
        )
    data = Dataset(
        cfg.name,
        Split(x_train, y_train),
        Split(x_test, y_test),
        cfg.num_classes,
        list(cfg.mean),
        list(cfg.std),
    )
    if cfg.name == "digits":
        data.split = {"test_fraction": cfg.test_fraction, "split_seed": cfg.split_seed}
    if cfg.zca:
        data.zca = cached_zca(x_train, cfg)
    data.train.images = data.to_model_space(x_train)
    data.test.images = data.to_model_space(x_test)
    return data
