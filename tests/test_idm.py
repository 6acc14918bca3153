"""IDM (partitioning and expansion, the model queue, class-aware regularisation, per-class image
steps) and one-step gradient matching, on digits with real runs."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from condense.app.cli import run
from condense.app.validation import validate
from condense.method.distance import gradient_distance
from condense.method.matching import class_batches, distribution_terms
from condense.primitives.dataset import load_dataset
from condense.primitives.synthetic import expand_mosaic, load_synthetic, tile_mosaic
from condense.schema import ConfigError, DistanceConfig, MatchingConfig
from condense.stages.checkpoint import load_checkpoint, save_checkpoint
from condense.stages.condensation import Condenser
from tests.conftest import FAST, run_config, small_match_step, start_condenser

# A few-second IDM: 2 stored images per class (8 trained on), a narrow network, a small queue
# that grows every other iteration and trains its models briefly on real batches.
TINY_IDM = [
    *FAST,
    "method=idm",
    "ipc=2",
    "network.width=16",
    "batch_real=32",
    "matching.queue.size=4",
    "matching.queue.interval=2",
    "matching.queue.steps=2",
    "matching.queue.batch=64",
    "matching.queue.accuracy_reset=3",
    "evaluation.num_models=1",
    "augment.eval_epochs=4",
]


def test_expansion_of_a_2x2_mosaic_returns_its_four_quarters_upsampled() -> None:
    gen = torch.Generator().manual_seed(0)
    mosaics = torch.randn(3, 1, 8, 8, generator=gen)
    expanded = expand_mosaic(mosaics, 2)
    assert expanded.shape == (12, 1, 8, 8)
    # IDM's order: top-left, bottom-left, top-right, bottom-right, each for every image in turn
    quarters = [mosaics[:, :, :4, :4], mosaics[:, :, 4:, :4], mosaics[:, :, :4, 4:], mosaics[:, :, 4:, 4:]]
    for t, quarter in enumerate(quarters):
        upsampled = F.interpolate(quarter, size=(8, 8), mode="bilinear", align_corners=False)
        assert torch.equal(expanded[3 * t : 3 * (t + 1)], upsampled)
    # a constant quarter stays that constant; tile_mosaic puts group t into quarter t
    flat = torch.stack([torch.full((2, 1, 8, 8), float(t)) for t in range(4)])
    assert torch.equal(expand_mosaic(tile_mosaic(flat, 2), 2), flat.flatten(0, 1))
    assert torch.equal(expand_mosaic(mosaics, 1), mosaics)


def test_a_saved_idm_set_evaluates_identically_in_its_run_and_loaded(tmp_path: Path) -> None:
    made = run(run_config([*TINY_IDM, "iterations=2"], tmp_path / "made"))
    path = tmp_path / "made" / "synthetic.safetensors"
    syn = load_synthetic(path)
    assert syn.expansion == 2 and syn.ipc == 2 and len(syn.labels) == 20  # stored: N per class
    assert len(syn.expanded().labels) == 80  # trained on: 4N per class
    assert (tmp_path / "made" / "synthetic_expanded.png").exists()
    loaded = run(run_config([*TINY_IDM, "stage=evaluate", f"synthetic={path}"], tmp_path / "ev"))
    assert made["label"] == loaded["label"] == "idm"
    for name in ("idm", "random"):
        assert loaded["evaluation"][name] == made["evaluation"][name]
    assert "trained on: 4 x ipc" in loaded["protocol_card"]["images"]


def queue_run(iterations: int, resume_at: int | None, tmp_path: Path) -> Condenser:
    """The condense stage of TINY_IDM for `iterations`, through a checkpoint file at resume_at
    (a fresh process would start there from it); returns the Condenser."""
    cfg = run_config([*TINY_IDM, f"iterations={iterations}"])
    data = load_dataset(cfg.dataset)
    condenser = start_condenser(cfg, data)
    for it in range(iterations):
        if it == resume_at:
            save_checkpoint(tmp_path / "ckpt.safetensors", condenser.state(it), {"run": 1})
            condenser = start_condenser(cfg, data)  # new images, a new queue: all restored below
            condenser.restore(load_checkpoint(tmp_path / "ckpt.safetensors", {"run": 1}))
        condenser.iteration(it)
    return condenser


def test_the_queues_order_and_contents_survive_a_checkpoint_and_resume(tmp_path: Path) -> None:
    straight = queue_run(6, None, tmp_path)
    resumed = queue_run(6, 3, tmp_path)
    assert torch.equal(straight.images, resumed.images)  # bitwise
    a, b = straight.queue, resumed.queue
    assert a is not None and b is not None
    # 3 at the start, one more at iterations 0, 2 and 4, the oldest leaving beyond size 4
    assert [m.serial for m in a.models] == [m.serial for m in b.models] == [2, 3, 4, 5]
    assert a.made == b.made == 6
    for x, y in zip(a.models, b.models, strict=True):
        assert (x.seen, x.correct) == (y.seen, y.correct)
        for p, q in zip(x.net.state_dict().values(), y.net.state_dict().values(), strict=True):
            assert torch.equal(p, q)
        for p, q in zip(x.net.parameters(), y.net.parameters(), strict=True):
            assert torch.equal(x.opt.state[p]["momentum_buffer"], y.opt.state[q]["momentum_buffer"])
    assert any(m.seen for m in a.models)  # the models did train, so momentum and counts mattered


def test_the_class_aware_term_is_zero_at_weight_zero_and_acts_above_it() -> None:
    def terms(weight: float, accuracy: float) -> list[float]:
        step = replace(small_match_step(), model_accuracy=accuracy)
        cfg = MatchingConfig(name="distribution", class_weight=weight)
        return [float(t.detach()) for t in distribution_terms(step, cfg, class_batches(step))]

    plain = terms(0.0, 0.0)
    assert terms(0.0, 0.8) == plain  # weight 0: DM's terms exactly
    assert terms(5.0, 0.0) == plain  # a model that has not trained yet adds nothing (IDM)
    assert all(w > p for w, p in zip(terms(5.0, 0.8), plain, strict=True))


def test_a_short_idm_run_beats_the_random_subset(tmp_path: Path) -> None:
    """IPC 1 (4 sub-images per class) against one random real image per class: equal storage. On
    8x8 digits a 2x2 partition leaves 4x4 sub-images, so at IPC 2 and above the random subset's
    full-resolution images win at this budget (docs/method.md, "IDM")."""
    overrides = [*TINY_IDM, "ipc=1", "iterations=20", "evaluation.num_models=3", "augment.eval_epochs=100"]
    metrics = run(run_config(overrides, tmp_path))
    ours = metrics["evaluation"]["idm"]["ConvNet"]["mean"]
    rand = metrics["evaluation"]["random"]["ConvNet"]["mean"]
    assert ours > rand, (ours, rand)
    assert metrics["condense"]["image_updates"] == 20 * 10  # one image step per class per iteration


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["matching.expansion=0"], "matching.expansion=0: use 1"),
        (["matching.expansion=3"], "matching.expansion=3 does not divide the dataset's 8-pixel images"),
        (["matching.queue.sample=5"], "matching.queue.sample=5 exceeds matching.queue.size=4"),
        (["matching.queue.interval=0"], "matching.queue.interval=0: use >= 1"),
        (["matching.class_weight=-1"], "matching.class_weight=-1.0: use a weight >= 0"),
        (["step_policy=dc"], "use step_policy=single_step, not dc"),
        (
            ["matching=intra", "matching.expansion=2"],
            "matching.expansion is an option of the distribution levels, not matching=intra",
        ),
    ],
)
def test_bad_idm_settings_get_one_clear_line(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)) as err:
        validate(run_config([*TINY_IDM, *overrides]))
    assert "\n" not in str(err.value)


def test_idm_presets_carry_the_authors_values_per_dataset_and_ipc() -> None:
    def cell(dataset: str, ipc: int, *more: str) -> tuple:
        cfg = run_config(["method=idm", f"dataset={dataset}", f"ipc={ipc}", "budget=paper", *more])
        q = cfg.matching.queue
        return (
            cfg.lr_img, cfg.batch_real, cfg.matching.class_weight, q.interval, q.steps, q.accuracy_reset,
            cfg.iterations,
        )  # fmt: skip

    assert cell("cifar10", 1) == (0.2, 5000, 50.0, 5, 10, 100, 20000)
    assert cell("cifar10", 10) == (0.2, 256, 50.0, 30, 10, 100, 20000)
    assert cell("cifar10", 50) == (0.2, 256, 10.0, 30, 10, 500, 20000)  # --eval_interval 500
    assert cell("cifar100", 1) == (0.2, 5000, 50.0, 5, 10, 100, 20000)
    assert cell("cifar100", 10) == (0.2, 256, 10.0, 30, 50, 100, 20000)
    assert cell("cifar100", 50) == (0.2, 256, 10.0, 30, 10, 500, 20000)
    assert cell("cifar10", 1, "batch_real=64", "matching.class_weight=0") == (0.2, 64, 0.0, 5, 10, 100, 20000)
    cfg = run_config(["method=idm", "dataset=cifar10"])
    assert (cfg.matching.expansion, cfg.matching.queue.size, cfg.matching.per_class_steps) == (2, 100, True)
    assert (cfg.augment.name, cfg.init.name, cfg.step_policy.name) == ("dsa", "real", "single_step")
    dm = run_config(["method=dm", "dataset=cifar10"]).matching  # DM keeps none of IDM's parts
    assert (dm.expansion, dm.queue.size, dm.class_weight, dm.per_class_steps) == (1, 0, 0.0, False)


def test_mse_normalised_is_the_squared_error_relative_to_the_real_gradient() -> None:
    gen = torch.Generator().manual_seed(0)
    real = [torch.randn(4, 3, generator=gen), torch.randn(4, generator=gen)]
    syn = [torch.randn(4, 3, generator=gen), torch.randn(4, generator=gen)]
    cfg = DistanceConfig(name="mse_normalised", eps=0.0)
    flat_s, flat_r = torch.cat([g.flatten() for g in syn]), torch.cat([g.flatten() for g in real])
    expected = ((flat_s - flat_r) ** 2).sum() / (flat_r**2).sum()
    assert torch.allclose(gradient_distance(syn, real, cfg), expected)
    scaled = gradient_distance([3 * g for g in syn], [3 * g for g in real], cfg)
    assert torch.allclose(scaled, expected)  # the scale of the gradients drops out
    assert float(gradient_distance(real, real, cfg)) == 0.0


def test_one_step_matching_takes_one_step_per_fresh_network_and_no_training(tmp_path: Path) -> None:
    tiny = ["ipc=2", "network.width=16", "iterations=3", "evaluation.num_models=1", "evaluation.epochs=3"]
    cfg = run_config([*FAST, "method=one_step", *tiny], tmp_path)
    chosen = (cfg.matching.name, cfg.distance.name, cfg.step_policy.name, cfg.init.name)
    assert chosen == ("intra", "mse_normalised", "single_step", "real")
    metrics = run(cfg)
    assert metrics["label"] == "one_step"
    assert metrics["condense"]["image_updates"] == 3 and metrics["condense"]["inner_epochs"] == 0
