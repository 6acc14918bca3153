"""Distances against plain brute-force references written out here."""

from __future__ import annotations

import math

import pytest
import torch

from condense.method.distance import gradient_distance, matched_parameters
from condense.primitives.network import build_network
from condense.schema import DistanceConfig

SHAPES = [(8, 3, 3, 3), (8,), (16, 8, 3, 3), (16,), (10, 64), (10,)]


def random_grads(seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]


def reference_row_distance(syn, real, weight: float, magnitude: str) -> float:
    total = 0.0
    for a, b in zip(syn, real, strict=True):
        if a.ndim < 2:
            continue
        rows_a, rows_b = a.reshape(a.shape[0], -1).tolist(), b.reshape(b.shape[0], -1).tolist()
        for ra, rb in zip(rows_a, rows_b, strict=True):
            dot = sum(x * y for x, y in zip(ra, rb, strict=True))
            na, nb = math.sqrt(sum(x * x for x in ra)), math.sqrt(sum(y * y for y in rb))
            total += 1 - dot / (na * nb + 1e-6)
            diff = [x - y for x, y in zip(ra, rb, strict=True)]
            terms = {
                "l2": math.sqrt(sum(d * d for d in diff)),
                "l2_squared": sum(d * d for d in diff),
                "mean_squared": sum(d * d for d in diff) / len(diff),
                "l2_per_length": math.sqrt(sum(d * d for d in diff)) / len(diff),
                "norm_gap_squared": (na - nb) ** 2,
            }
            total += weight * terms[magnitude]
    return total


def test_dc_matches_reference_and_skips_1d() -> None:
    syn, real = random_grads(0), random_grads(1)
    got = float(gradient_distance(syn, real, DistanceConfig(name="dc")))
    assert got == pytest.approx(reference_row_distance(syn, real, 0.0, "l2"), rel=1e-9)
    # Changing only the 1-D tensors changes nothing.
    syn2 = [g if g.ndim >= 2 else g * 5 + 1 for g in syn]
    assert float(gradient_distance(syn2, real, DistanceConfig(name="dc"))) == pytest.approx(got, rel=1e-12)


@pytest.mark.parametrize(
    "magnitude", ["l2", "l2_squared", "mean_squared", "l2_per_length", "norm_gap_squared"]
)
@pytest.mark.parametrize("weight", [1.0, 0.3])
def test_angle_magnitude_matches_reference(magnitude: str, weight: float) -> None:
    syn, real = random_grads(2), random_grads(3)
    cfg = DistanceConfig(name="angle_magnitude", magnitude=magnitude, magnitude_weight=weight)
    got = float(gradient_distance(syn, real, cfg))
    assert got == pytest.approx(reference_row_distance(syn, real, weight, magnitude), rel=1e-9)


def test_whole_vector_distances_match_reference() -> None:
    syn, real = random_grads(4), random_grads(5)
    a = [x for g in syn for x in g.flatten().tolist()]
    b = [x for g in real for x in g.flatten().tolist()]
    mse = sum((x - y) ** 2 for x, y in zip(a, b, strict=True))
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    cos = 1 - dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)) + 1e-6)
    assert float(gradient_distance(syn, real, DistanceConfig(name="mse"))) == pytest.approx(mse, rel=1e-9)
    assert float(gradient_distance(syn, real, DistanceConfig(name="cos"))) == pytest.approx(cos, rel=1e-9)


@pytest.mark.parametrize("name", ["dc", "angle_magnitude", "mse", "cos"])
def test_identical_gradients_are_at_distance_zero(name: str) -> None:
    g = random_grads(6)
    assert float(gradient_distance(g, g, DistanceConfig(name=name))) == pytest.approx(0.0, abs=1e-6)


def test_dc_is_blind_to_row_scale_angle_magnitude_is_not() -> None:
    syn, real = random_grads(7), random_grads(8)
    scaled = [g.clone() for g in syn]
    scaled[0][2] *= 7.0  # one output row of the first conv, positively scaled
    dc, am = DistanceConfig(name="dc"), DistanceConfig(name="angle_magnitude")
    assert float(gradient_distance(scaled, real, dc)) == pytest.approx(
        float(gradient_distance(syn, real, dc)), rel=1e-9
    )
    assert float(gradient_distance(scaled, real, am)) != pytest.approx(
        float(gradient_distance(syn, real, am)), rel=1e-3
    )


def test_matched_parameters_follow_the_config() -> None:
    from condense.schema import NetworkConfig

    net = build_network(NetworkConfig(depth=3), (1, 28, 28), 10, 0, torch.device("cpu"))
    matrices = matched_parameters(net, DistanceConfig(parameters="matrices"))
    assert [p.ndim for p in matrices] == [4, 4, 4, 2]  # three conv kernels and the classifier
    assert len(matched_parameters(net, DistanceConfig(parameters="all"))) == len(list(net.parameters()))
    assert matched_parameters(net, DistanceConfig(layers=[0, 3])) == [matrices[0], matrices[3]]
    from condense.schema import ConfigError

    with pytest.raises(ConfigError, match="distance.layers"):
        matched_parameters(net, DistanceConfig(layers=[9]))
