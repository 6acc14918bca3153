"""DC's evaluation modes as evaluation presets, and evaluation of the set as it is learned."""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from condense.app.cli import run
from condense.app.plan import plan_run
from condense.primitives.augment import convnet_bn_augment, dc_crop_noise
from condense.primitives.dataset import load_dataset
from condense.report import learned_curves, load_run, seconds_to
from condense.report import main as report_main
from condense.stages.evaluation import arch_training, evaluate_set, evaluation_pool
from tests.conftest import FAST, run_config, start_condenser

# DC's utils.py get_eval_pool (lines 448-471), by the mode letter, for a ConvNetBN condensing run.
DC_POOLS = {
    "default": ["ConvNet"],  # S: the condensing network with BatchNorm taken out
    "same_model": ["ConvNetBN"],  # SS
    "cross_arch": ["MLP", "ConvNet", "LeNet", "AlexNet", "VGG11", "ResNet18"],  # M
    "widths": ["ConvNetW32", "ConvNetW64", "ConvNetW128", "ConvNetW256"],  # W
    "depths": ["ConvNetD1", "ConvNetD2", "ConvNetD3", "ConvNetD4"],  # D
    "activations": ["ConvNetAS", "ConvNetAR", "ConvNetAL", "ConvNetASwish"],  # A
    "poolings": ["ConvNetNP", "ConvNetMP", "ConvNetAP"],  # P
    "norms": ["ConvNetNN", "ConvNetBN", "ConvNetLN", "ConvNetIN", "ConvNetGN"],  # N
    "batchnorm": ["ConvNetBN", "ConvNetASwishBN", "AlexNetBN", "VGG11BN", "ResNet18BN"],  # B
}
CPU = torch.device("cpu")
SMOKE = [*FAST, "budget=smoke", "network=convnet_bn", "ipc=1"]


@pytest.mark.parametrize("mode", DC_POOLS)
def test_each_evaluation_mode_is_dcs_pool_and_runs_at_smoke_budget(mode: str, tmp_path: Path) -> None:
    cfg = run_config([*SMOKE, f"evaluation={mode}"], tmp_path)
    assert list(evaluation_pool(cfg.network, cfg.evaluation)) == DC_POOLS[mode]
    metrics = run(cfg)
    evaluated = metrics["evaluation"][metrics["label"]]
    assert list(evaluated) == DC_POOLS[mode]  # accuracies only: timings sit in evaluation_seconds
    assert all(0.0 <= a <= 1.0 for arch in DC_POOLS[mode] for a in evaluated[arch]["accuracies"])
    assert metrics["protocol_card"]["models"] == f"1 x {'/'.join(DC_POOLS[mode])}"


def test_mode_b_holds_the_batchnorm_networks_and_dm_evaluates_as_main_dm_does() -> None:
    pool = evaluation_pool(*(lambda c: (c.network, c.evaluation))(run_config(["evaluation=batchnorm"])))
    assert all(net.norm == "batch" for net in pool.values())
    assert pool["ConvNetASwishBN"].activation == "swish"
    # main_DM.py's default eval_mode SS: the condensing network itself, BatchNorm kept
    dm = run_config(["method=dm", "network=convnet_bn"])
    assert list(evaluation_pool(dm.network, dm.evaluation)) == ["ConvNetBN"]
    dc = run_config(["method=dc", "network=convnet_bn"])  # DC's main.py: S, BatchNorm taken out
    assert list(evaluation_pool(dc.network, dc.evaluation)) == ["ConvNet"]


def test_dc_crop_noise_gives_each_image_a_mean_filled_crop_or_noise() -> None:
    """DC's crop_noise: per image, one of its crop (a window of the image padded with the batch's
    channel means, offsets 0..2*pad-1) or `noise` x N(0, 1) added."""
    x = torch.randn(16, 2, 8, 8, generator=torch.Generator().manual_seed(1))
    out = dc_crop_noise(x, seed=3, pad=2, noise=0.1)
    fill = x.mean(dim=(0, 2, 3))
    kinds = []
    for img, got in zip(x, out, strict=True):
        canvas = fill.view(2, 1, 1).expand(2, 12, 12).clone()
        canvas[:, 2:10, 2:10] = img
        windows = [canvas[:, r : r + 8, s : s + 8] for r in range(4) for s in range(4)]
        if any(torch.equal(got, w) for w in windows):
            kinds.append("crop")
        else:
            assert 0.07 < float((got - img).std()) < 0.13  # noise of std 0.1, and nothing else
            kinds.append("noise")
    assert set(kinds) == {"crop", "noise"}
    assert torch.equal(out, dc_crop_noise(x, seed=3, pad=2, noise=0.1))  # drawn from the seed alone


def test_an_evaluated_convnet_bn_follows_dcs_rule_unless_dsa_is_on() -> None:
    """DC's get_daparam: with DSA off, ConvNetBN (and only it) trains with crop+noise for 1000
    epochs; the card says so; DSA, or evaluation.convnet_bn.enabled=false, turns the rule off."""
    cfg = run_config(["evaluation=norms"])
    plan = plan_run(cfg)
    assert plan.convnet_bn_rule
    for arch, net in plan.pool.items():
        augment, ev = arch_training(net, cfg.evaluation, plan.eval_augment, plan.convnet_bn_rule)
        assert (ev.epochs, augment is not None) == ((1000, True) if arch == "ConvNetBN" else (300, False))
    assert plan.card["augmentation"] == "none; ConvNetBN: crop+noise (DC's rule)"
    assert plan.card["evaluation"].startswith("301 epochs (ConvNetBN: 1001)")  # DC's restart: +1
    assert not plan_run(run_config(["evaluation=norms", "method=dsa"])).convnet_bn_rule
    off = plan_run(run_config(["evaluation=norms", "evaluation.convnet_bn.enabled=false"]))
    assert not off.convnet_bn_rule and off.card["augmentation"] == "none"
    assert "ConvNetBN" not in plan_run(run_config([])).card["augmentation"]  # mode S: no ConvNetBN


def test_the_rule_trains_convnet_bn_as_crop_noise_for_its_epochs() -> None:
    """evaluate_set under the rule equals training that network with DC's crop+noise for the
    rule's epochs by hand (the same paired models)."""
    cfg = run_config([*SMOKE, "evaluation=same_model", "evaluation.convnet_bn.epochs=3"])
    data = load_dataset(cfg.dataset)
    images, labels = data.train.images[:20], data.train.labels[:20]
    pool = evaluation_pool(cfg.network, cfg.evaluation)
    args = (images, labels, data, pool)
    ruled = evaluate_set(*args, cfg.evaluation, 0, "x", CPU, None, False, convnet_bn_rule=True)
    by_hand = replace(cfg.evaluation, epochs=3)
    crop_noise = convnet_bn_augment(cfg.evaluation.convnet_bn)
    expected = evaluate_set(*args, by_hand, 0, "x", CPU, crop_noise, False)
    assert ruled["ConvNetBN"].accuracies == expected["ConvNetBN"].accuracies
    plain = evaluate_set(*args, cfg.evaluation, 0, "x", CPU, None, False)
    assert plain["ConvNetBN"].accuracies != expected["ConvNetBN"].accuracies


def test_the_set_is_evaluated_as_it_is_learned(tmp_path: Path) -> None:
    """evaluation.at_iterations: the same paired models judge the set at each point, the last
    point is the evaluation stage's own result, and the report plots the curve."""
    overrides = [*SMOKE, "iterations=2", "evaluation.num_models=2", "evaluation.at_iterations=[0,1,2]"]
    metrics = run(run_config(overrides, tmp_path / "run"))
    at = metrics["evaluation_at"]
    assert sorted(at, key=int) == ["0", "1", "2"]
    final = metrics["evaluation"][metrics["label"]]["ConvNet"]["accuracies"]
    assert at["2"]["ConvNet"]["accuracies"] == final
    # the first point is the initial images, judged by the very models that judge the final set
    cfg = run_config(overrides, tmp_path / "again")
    data = load_dataset(cfg.dataset)
    start = start_condenser(cfg, data)
    plan = plan_run(cfg)
    pool, augment, compute = plan.pool, plan.eval_augment, plan.compute
    initial = evaluate_set(
        start.images.detach(),
        start.labels,
        data,
        pool,
        cfg.evaluation,
        cfg.seed,
        "x",
        CPU,
        augment,
        False,
        compute,
    )
    assert at["0"]["ConvNet"]["accuracies"] == initial["ConvNet"].accuracies
    report_main([str(tmp_path / "run"), "--out", str(tmp_path / "report")])
    assert (tmp_path / "report" / "accuracy_vs_iteration.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "report" / "accuracy_vs_condense_seconds.png").read_bytes()[:4] == b"\x89PNG"
    # time to quality: each point at the condensation seconds of the iterations before it
    spent = [h["seconds"] for h in metrics["history"]]
    means = [100 * statistics.fmean(at[k]["ConvNet"]["accuracies"]) for k in ("0", "1", "2")]
    stored = load_run(tmp_path / "run" / "metrics.json")
    assert stored is not None
    [curve] = learned_curves([stored], [], seconds_to).values()
    assert curve == pytest.approx([(0.0, means[0]), (spent[0], means[1]), (spent[0] + spent[1], means[2])])
    # a history that does not time every iteration (an older file) places no point at all past
    # iteration 0, rather than at a partial sum
    older = tmp_path / "run" / "metrics.json"
    record = json.loads(older.read_text())
    del record["history"][0]["seconds"]
    older.write_text(json.dumps(record))
    untimed = load_run(older)
    assert untimed is not None and untimed.iteration_seconds == []
    [curve] = learned_curves([untimed], [], seconds_to).values()
    assert curve[0] == (0.0, pytest.approx(means[0])) and all(math.isnan(x) for x, _ in curve[1:])


def test_intermediate_points_outside_the_run_are_refused() -> None:
    from condense.app.validation import validate
    from condense.schema import ConfigError

    with pytest.raises(ConfigError, match="evaluation.at_iterations"):
        validate(run_config([*SMOKE, "evaluation.at_iterations=[5]"]))


def test_a_model_that_never_fits_its_set_is_named_and_kept(capsys: pytest.CaptureFixture[str]) -> None:
    """A diverged model (lr 1e8: its weights turn non-finite, it predicts one class) is at chance
    on the very images it trained on: the log names it, its test accuracy still counts (the
    models stay paired). Models that train are not named."""
    cfg = run_config([*SMOKE, "evaluation.epochs=20", "evaluation.num_models=2"])
    data = load_dataset(cfg.dataset)
    per_class = [torch.nonzero(data.train.labels == c)[:2, 0] for c in range(data.num_classes)]
    picked = torch.cat(per_class)  # balanced: a one-class predictor gets exactly 1 / classes right
    images, labels = data.train.images[picked], data.train.labels[picked]
    pool = {"ConvNet": evaluation_pool(cfg.network, cfg.evaluation)["ConvNet"]}
    diverged = evaluate_set(
        images, labels, data, pool, replace(cfg.evaluation, lr=1e8), 0, "x", CPU, None, False
    )
    named = [line for line in capsys.readouterr().out.splitlines() if "did not fit" in line]
    assert len(named) == 2 and named[0].startswith("evaluate: ConvNet model 0 on x did not fit")
    assert "10 % of its images right, chance 10 %" in named[0]
    assert len(diverged["ConvNet"].accuracies) == 2
    evaluate_set(images, labels, data, pool, cfg.evaluation, 0, "x", CPU, None, False)
    assert "did not fit" not in capsys.readouterr().out
