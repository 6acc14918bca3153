"""How to match: distances between a synthetic and a real gradient (lists of tensors, one per
parameter, in the network's order).

Row-wise distances (`dc`, `angle_magnitude`) view each tensor as one row per output unit: a conv
kernel (out, in, h, w) becomes (out, in*h*w). 1-D tensors contribute nothing to them.
Whole-vector distances (`mse`, `mse_normalised`, `cos`) flatten and concatenate every tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from condense.schema import ConfigError, DistanceConfig, require_choice

Grads = Sequence[torch.Tensor]


def as_rows(g: torch.Tensor) -> torch.Tensor:
    return g.reshape(g.shape[0], -1)


def dc_cosine(a: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
    """DC's cosine along the last dimension: dot / (|a| |b| + eps), eps = distance.eps (1e-6)."""
    return (a * b).sum(dim=-1) / (a.norm(dim=-1) * b.norm(dim=-1) + eps)


def torch_cosine(a: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
    """The paper's code's cosine: F.cosine_similarity, each norm clamped at 1e-8 (its default;
    distance.eps does not apply)."""
    return F.cosine_similarity(a, b, dim=-1, eps=1e-8)


# distance.cosine: which cosine the angle terms use (the two published codes differ).
COSINES: dict[str, Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]] = {
    "dc": dc_cosine,
    "torch": torch_cosine,
}


def row_cosine_gap(a: torch.Tensor, b: torch.Tensor, cfg: DistanceConfig) -> torch.Tensor:
    """sum over rows of 1 - cos."""
    return (1 - COSINES[cfg.cosine](a, b, cfg.eps)).sum()


# Magnitude terms per row (a = synthetic, b = real), summed over rows.
MAGNITUDES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    # The paper's: plain Euclidean norm of the row difference.
    "l2": lambda a, b: (a - b).norm(dim=1).sum(),
    "l2_squared": lambda a, b: (a - b).pow(2).sum(dim=1).sum(),
    "mean_squared": lambda a, b: (a - b).pow(2).mean(dim=1).sum(),
    "l2_per_length": lambda a, b: ((a - b).norm(dim=1) / a.shape[1]).sum(),
    "norm_gap_squared": lambda a, b: (a.norm(dim=1) - b.norm(dim=1)).pow(2).sum(),
}


def row_distance(syn: Grads, real: Grads, cfg: DistanceConfig, magnitude_weight: float) -> torch.Tensor:
    total = syn[0].new_zeros(())
    for gs, gr in zip(syn, real, strict=True):
        if gs.ndim < 2:  # biases and norm parameters: nothing to compare row-wise
            continue
        a, b = as_rows(gs), as_rows(gr)
        total = total + row_cosine_gap(a, b, cfg)
        if magnitude_weight:
            total = total + magnitude_weight * MAGNITUDES[cfg.magnitude](a, b)
    return total


def dc_distance(syn: Grads, real: Grads, cfg: DistanceConfig) -> torch.Tensor:
    """DC's layer-wise, row-wise angle distance."""
    return row_distance(syn, real, cfg, magnitude_weight=0.0)


def angle_magnitude_distance(syn: Grads, real: Grads, cfg: DistanceConfig) -> torch.Tensor:
    """The paper's: per row (1 - cos) + weight x magnitude term."""
    return row_distance(syn, real, cfg, magnitude_weight=cfg.magnitude_weight)


def flat(grads: Grads) -> torch.Tensor:
    return torch.cat([g.reshape(-1) for g in grads])


def mse_distance(syn: Grads, real: Grads, cfg: DistanceConfig) -> torch.Tensor:
    return (flat(syn) - flat(real)).pow(2).sum()


def mse_normalised_distance(syn: Grads, real: Grads, cfg: DistanceConfig) -> torch.Tensor:
    """DosCond's: ||g_S - g_T||^2 / ||g_T||^2 over the flattened gradients (eps guards a zero
    real gradient): the squared error relative to the real gradient's size, so its scale does
    not change from network to network."""
    target = flat(real)
    return (flat(syn) - target).pow(2).sum() / (target.pow(2).sum() + cfg.eps)


def cos_distance(syn: Grads, real: Grads, cfg: DistanceConfig) -> torch.Tensor:
    return 1 - COSINES[cfg.cosine](flat(syn), flat(real), cfg.eps)


DISTANCES: dict[str, Callable[[Grads, Grads, DistanceConfig], torch.Tensor]] = {
    "dc": dc_distance,
    "angle_magnitude": angle_magnitude_distance,
    "mse": mse_distance,
    "mse_normalised": mse_normalised_distance,
    "cos": cos_distance,
}
PARAMETER_SETS = ("matrices", "all")


def gradient_distance(syn: Grads, real: Grads, cfg: DistanceConfig) -> torch.Tensor:
    return DISTANCES[cfg.name](syn, real, cfg)


def matched_parameters(net: nn.Module, cfg: DistanceConfig) -> list[nn.Parameter]:
    """The parameters whose gradients are matched: only these get gradients computed."""
    params = [p for p in net.parameters() if cfg.parameters == "all" or p.ndim >= 2]
    if cfg.layers:
        bad = [i for i in cfg.layers if not -len(params) <= i < len(params)]
        if bad:
            raise ConfigError(
                f"distance.layers={list(cfg.layers)}: indices {bad} are out of range for the "
                f"{len(params)} selected parameters: use indices 0..{len(params) - 1}"
            )
        params = [params[i] for i in cfg.layers]
    return params


def validate_distance(cfg: DistanceConfig) -> None:
    require_choice(cfg.name, DISTANCES, "distance")
    require_choice(cfg.magnitude, MAGNITUDES, "distance.magnitude")
    require_choice(cfg.parameters, PARAMETER_SETS, "distance.parameters")
    require_choice(cfg.cosine, COSINES, "distance.cosine")
    if cfg.magnitude_weight < 0:
        raise ConfigError(f"distance.magnitude_weight={cfg.magnitude_weight}: use a weight >= 0")
