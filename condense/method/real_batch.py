"""How many real images each class's gradient takes (the `real_batch` group).

- fixed (DC): `batch_real` images per class at every matching step.
- adaptive: the smallest batch whose gradient direction stays within a set angle of the
  direction of the class's whole data, estimated as the run goes.

The estimate comes from the two halves of each class's batch. Model a half's gradient as the
true direction mu plus noise of variance sigma^2 / h (h images, independent draws). Then two
halves agree with cosine rho = 1 / (1 + r / h), where r = sigma^2 / |mu|^2 is the noise ratio,
so r = h (1 / rho - 1); a batch of s images points within cos = 1 / sqrt(1 + r / s) of mu. The
smallest s with cos >= min_cosine is s = r / (1 / min_cosine^2 - 1). Computing a batch's gradient
as the mean of its halves' costs the same images, and the matching step reads the same numbers;
only the next step's batch size changes. The median over the classes sets one size for all.
The size carries over from iteration to iteration (it is saved in checkpoints), so that IPC 1,
with one matching step per iteration, adapts too.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from condense.schema import ConfigError, RealBatchConfig, require_choice

POLICIES = ("fixed", "adaptive")


def halves_cosine(first: list[torch.Tensor], second: list[torch.Tensor]) -> float:
    """Cosine between two gradients taken as one vector over all matched parameters."""
    a = torch.cat([g.flatten() for g in first]).float()
    b = torch.cat([g.flatten() for g in second]).float()
    return float(F.cosine_similarity(a, b, dim=0))


def noise_ratio(cosine: float, half: int) -> float:
    """r = sigma^2 / |mu|^2 from the cosine between two independent halves of `half` images."""
    if cosine <= 0:
        return math.inf  # no shared direction at this size: the noise dominates
    return half * (1.0 / min(cosine, 1.0) - 1.0)


def batch_for_direction(ratio: float, min_cosine: float) -> float:
    """Images a batch needs for its gradient to lie within arccos(min_cosine) of mu."""
    return ratio / (1.0 / min_cosine**2 - 1.0)


@dataclass
class RealBatchSize:
    """The per-class real batch of the next matching step, and how it is chosen."""

    cfg: RealBatchConfig
    full: int  # batch_real: the fixed policy's size and the adaptive one's ceiling
    size: int

    @classmethod
    def start(cls, cfg: RealBatchConfig, batch_real: int, size: int | None = None) -> RealBatchSize:
        return cls(cfg, batch_real, batch_real if size is None else size)

    @property
    def splits(self) -> bool:
        """Whether matching steps take each class's real gradient as two halves."""
        return self.cfg.name == "adaptive" and self.size >= 2

    def update(self, cosines: Iterable[float]) -> None:
        """Set the next size from this step's half-batch cosines (one per class)."""
        values = list(cosines)
        if self.cfg.name != "adaptive" or not values:
            return
        half = self.size // 2
        ratio = noise_ratio(statistics.median(values), half)
        wanted = batch_for_direction(ratio, self.cfg.min_cosine)
        self.size = (
            self.full if math.isinf(wanted) else max(self.cfg.min_batch, min(self.full, math.ceil(wanted)))
        )


def validate_real_batch(cfg: RealBatchConfig, batch_real: int) -> None:
    require_choice(cfg.name, POLICIES, "real_batch")
    if cfg.name != "adaptive":
        return
    if not 0 < cfg.min_cosine < 1:
        raise ConfigError(f"real_batch.min_cosine={cfg.min_cosine} is out of range: use 0 < min_cosine < 1")
    if not 2 <= cfg.min_batch <= batch_real:
        raise ConfigError(
            f"real_batch.min_batch={cfg.min_batch} is out of range: "
            f"use 2 <= min_batch <= batch_real ({batch_real})"
        )
