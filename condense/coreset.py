"""Coreset baselines: real images chosen per class, evaluated exactly like a synthetic set.

- random: `ipc` random real images per class.
- herding: greedy mean matching in a network's feature space (each pick brings the running mean
  of the chosen features closest to the class mean).
- kcenter: greedy k-center cover in feature space, starting from the image nearest the class mean.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from condense.config import ConfigError, MethodConfig, require_choice
from condense.dataset import Split
from condense.init import sample_per_class

KINDS = ("gradient_matching", "coreset")


def herding_order(features: torch.Tensor, k: int) -> list[int]:
    """Indices picked greedily so the mean of the picks tracks the mean of all features."""
    target = features.mean(dim=0)
    chosen: list[int] = []
    total = torch.zeros_like(target)
    available = torch.ones(len(features), dtype=torch.bool)
    for step in range(1, k + 1):
        gaps = ((total.unsqueeze(0) + features) / step - target).norm(dim=1)
        gaps[~available] = float("inf")
        pick = int(gaps.argmin())
        chosen.append(pick)
        available[pick] = False
        total += features[pick]
    return chosen


def kcenter_order(features: torch.Tensor, k: int) -> list[int]:
    """Greedy k-center: repeatedly add the point farthest from everything chosen so far."""
    first = int((features - features.mean(dim=0)).norm(dim=1).argmin())
    chosen = [first]
    nearest = (features - features[first]).norm(dim=1)
    for _ in range(k - 1):
        pick = int(nearest.argmax())
        chosen.append(pick)
        nearest = torch.minimum(nearest, (features - features[pick]).norm(dim=1))
    return chosen


SELECTORS: dict[str, Callable[[torch.Tensor, int], list[int]]] = {
    "herding": herding_order,
    "kcenter": kcenter_order,
}


@torch.no_grad()
def embed(net: nn.Module, images: torch.Tensor, batch: int = 1024) -> torch.Tensor:
    net.eval()
    device = next(net.parameters()).device
    return torch.cat(
        [net.embed(images[i : i + batch].to(device)).cpu() for i in range(0, len(images), batch)]
    )


def select_coreset(
    method: MethodConfig,
    train: Split,
    num_classes: int,
    ipc: int,
    gen: torch.Generator,
    feature_net: nn.Module | None,
) -> torch.Tensor:
    """Indices (class-major) of the real images that form the coreset."""
    if method.name == "random":
        return sample_per_class(train, num_classes, ipc, gen)
    assert feature_net is not None
    chosen = []
    for idx in train.indices_by_class(num_classes):
        if len(idx) < ipc:
            raise ConfigError(f"ipc={ipc} exceeds the {len(idx)} training images of a class: lower ipc")
        features = embed(feature_net, train.images[idx])
        chosen.append(idx[SELECTORS[method.name](features, ipc)])
    return torch.cat(chosen)


def validate_method(cfg: MethodConfig) -> None:
    require_choice(cfg.kind, KINDS, "method.kind")
    if cfg.kind == "coreset" and cfg.name not in ("random", *SELECTORS):
        raise ConfigError(f"method={cfg.name} is not a coreset: use method=random, herding or kcenter")
