"""How the synthetic images start: N(0, 1) noise in normalised space (DC's default) or random real
images of their class."""

from __future__ import annotations

from collections.abc import Callable

import torch

from condense.primitives.dataset import Split
from condense.primitives.synthetic import tile_mosaic
from condense.schema import ConfigError, InitConfig, require_choice

Initialiser = Callable[[Split, int, int, torch.Generator], torch.Tensor]


def noise_init(train: Split, num_classes: int, ipc: int, gen: torch.Generator) -> torch.Tensor:
    shape = (num_classes * ipc, *train.images.shape[1:])
    return torch.randn(shape, generator=gen)


def real_init(train: Split, num_classes: int, ipc: int, gen: torch.Generator) -> torch.Tensor:
    return train.images[sample_per_class(train, num_classes, ipc, gen)].clone()


def sample_per_class(train: Split, num_classes: int, ipc: int, gen: torch.Generator) -> torch.Tensor:
    """Indices of `ipc` distinct random images of every class, class-major."""
    chosen = []
    for idx in train.indices_by_class(num_classes):
        if len(idx) < ipc:
            raise ConfigError(f"ipc={ipc} exceeds the {len(idx)} training images of a class: lower ipc")
        chosen.append(idx[torch.randperm(len(idx), generator=gen)[:ipc]])
    return torch.cat(chosen)


INITIALISERS: dict[str, Initialiser] = {"noise": noise_init, "real": real_init}


def initial_images(
    name: str, train: Split, num_classes: int, ipc: int, gen: torch.Generator, expansion: int = 1
) -> torch.Tensor:
    """The set's starting images. With IDM's partitioning (expansion k > 1) and real init, each
    image is a k x k mosaic of real images of its class, each tile an independent draw
    downscaled by k; noise stays noise."""
    if expansion == 1 or name != "real":
        return INITIALISERS[name](train, num_classes, ipc, gen)
    groups = [INITIALISERS[name](train, num_classes, ipc, gen) for _ in range(expansion * expansion)]
    return tile_mosaic(torch.stack(groups), expansion)


def validate_init(cfg: InitConfig) -> None:
    require_choice(cfg.name, INITIALISERS, "init")
