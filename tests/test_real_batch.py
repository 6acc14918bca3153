"""real_batch=adaptive: the noise model behind it, the split gradient, and a run that adapts."""

from __future__ import annotations

import math

import pytest
import torch

from condense.app.validation import validate
from condense.method.distance import matched_parameters
from condense.method.matching import MatchSetup, MatchStep, class_major_labels, real_gradient
from condense.method.real_batch import RealBatchSize, batch_for_direction, halves_cosine, noise_ratio
from condense.primitives.dataset import load_dataset
from condense.primitives.network import build_network
from condense.schema import ConfigError, RealBatchConfig
from condense.stages.condensation import Condenser
from tests.conftest import TINY, run_config, start_condenser

CPU = torch.device("cpu")


def mean_of_draws(mu: torch.Tensor, sigma: float, n: int, gen: torch.Generator) -> torch.Tensor:
    """The mean of n per-image gradients mu + noise, where each image's noise has norm^2 ~ sigma^2."""
    noise = torch.randn(n, mu.numel(), generator=gen, dtype=torch.float64) * sigma / math.sqrt(mu.numel())
    return mu + noise.mean(dim=0)


def test_halves_predict_the_batch_a_direction_needs() -> None:
    """Per-image gradients with a known noise ratio r: the halves' cosine recovers r, and a batch of
    the size the policy asks for points at the cosine it was asked for."""
    gen = torch.Generator().manual_seed(0)
    mu = torch.randn(20_000, generator=gen, dtype=torch.float64)
    mu /= mu.norm()
    r, half = 40.0, 64  # sigma^2 / |mu|^2, and the images in each half
    sigma = math.sqrt(r)
    cosine = halves_cosine([mean_of_draws(mu, sigma, half, gen)], [mean_of_draws(mu, sigma, half, gen)])
    assert cosine == pytest.approx(1 / (1 + r / half), abs=0.03)
    estimated = noise_ratio(cosine, half)
    assert estimated == pytest.approx(r, rel=0.15)
    size = math.ceil(batch_for_direction(estimated, 0.95))
    batch = mean_of_draws(mu, sigma, size, gen)
    assert float(torch.dot(batch, mu) / batch.norm()) == pytest.approx(0.95, abs=0.01)


def test_adaptive_size_follows_the_halves_within_its_bounds() -> None:
    cfg = RealBatchConfig(name="adaptive", min_cosine=0.95, min_batch=32)
    size = RealBatchSize.start(cfg, 256)
    assert size.splits and size.size == 256
    size.update([0.99] * 10)  # nearly noise-free: as small as allowed
    assert size.size == 32
    size.update([0.9] * 10)  # halves of 16: r = 1.8, so 1.8 / 0.108 -> 17 images, floor 32
    assert size.size == 32
    size.update([0.3] * 10)  # halves of 16: r = 37.3 -> 345 images, capped at batch_real
    assert size.size == 256
    size.update([-0.2, 0.1, -0.5])  # no shared direction
    assert size.size == 256
    fixed = RealBatchSize.start(RealBatchConfig(name="fixed"), 256)
    fixed.update([0.99])
    assert not fixed.splits and fixed.size == 256


def test_split_real_gradient_is_the_full_batch_gradient() -> None:
    cfg = run_config(TINY)
    data = load_dataset(cfg.dataset)
    net = build_network(cfg.network, data.image_shape, data.num_classes, 0, CPU)
    params = matched_parameters(net, cfg.distance)
    real = data.train.images[data.train.labels == 3][:41]  # odd: unequal halves are weighted

    def step(split: bool) -> MatchStep:
        labels = class_major_labels(10, 1, CPU)
        setup = MatchSetup(torch.zeros(1), labels, 1, 10, cfg.distance, split_real=split)
        return MatchStep(
            setup, net, params, lambda c: real, lambda: (real, real), 0, torch.Generator(), torch.Generator()
        )

    whole, split = step(False), step(True)
    for a, b in zip(real_gradient(whole, real, 3), real_gradient(split, real, 3), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not whole.half_cosines
    assert -1 <= split.half_cosines[3] <= 1


def condenser(extra: list[str]) -> Condenser:
    cfg = run_config([*TINY, "dataset=digits", *extra])
    return start_condenser(cfg, load_dataset(cfg.dataset))


def test_adaptive_run_takes_fewer_real_images_and_resumes_exactly() -> None:
    adaptive = ["real_batch=adaptive", "real_batch.min_cosine=0.9", "batch_real=128"]
    fixed, straight = condenser(["batch_real=128"]), condenser(adaptive)
    for it in range(4):
        fixed.iteration(it)
        straight.iteration(it)
    sizes = [h["real_batch"] for h in straight.stats.history]
    assert min(sizes) < 128, f"the halves of digit batches agree well; sizes were {sizes}"
    assert straight.stats.passes.real_images < fixed.stats.passes.real_images

    first = condenser(adaptive)
    for it in range(2):
        first.iteration(it)
    state = first.state(2)
    resumed = condenser(adaptive)
    resumed.restore(state)
    for it in range(2, 4):
        resumed.iteration(it)
    assert torch.equal(resumed.images, straight.images)


@pytest.mark.parametrize(
    "bad",
    ["real_batch=adaptive real_batch.min_cosine=1.0", "real_batch=adaptive real_batch.min_batch=1"],
    ids=["min_cosine", "min_batch"],
)
def test_bad_adaptive_settings_are_refused(bad: str) -> None:
    overrides = bad.split()
    with pytest.raises(ConfigError, match=overrides[-1].split("=")[0]):
        validate(run_config([*TINY, *overrides]))
