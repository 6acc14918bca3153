"""The fast path computes what the straightforward one computes, up to float summation order."""

from __future__ import annotations

import resource
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from condense.app.cli import run
from condense.app.plan import plan_run
from condense.app.validation import validate
from condense.method.distance import matched_parameters
from condense.method.matching import MatchSetup, MatchStep, matching_loss
from condense.primitives.compute import (
    AUTO_BF16_PARTS,
    AUTO_MIN_SPEEDUP,
    PARTS,
    Compute,
    bf16_parts,
    glibc,
    set_heap_reuse,
    speedup_key,
    store_speedup,
)
from condense.primitives.dataset import load_dataset
from condense.primitives.network import build_network
from condense.primitives.training import mean_loss, train_epoch
from condense.schema import ConfigError, NetworkConfig
from condense.stages import condensation
from condense.stages.condensation import train_inner
from condense.stages.evaluation import evaluate_set
from tests.conftest import BOTH_PRECISIONS, TINY, TINY_RUN, run_config, start_condenser

CPU = torch.device("cpu")
BF16 = frozenset(PARTS)


def image_trajectory(
    fast: bool, extra: list[str], iterations: int = 5, nudge: float = 0.0
) -> list[torch.Tensor]:
    """The synthetic images at the start and after each iteration; `nudge` adds noise of that
    scale to the initial images, a perturbation the size of float32 rounding."""
    cfg = run_config([*TINY, *extra, f"fast={fast}"])
    run = start_condenser(cfg, load_dataset(cfg.dataset))
    with torch.no_grad():
        run.images.add_(nudge * torch.randn(run.images.shape, generator=torch.Generator().manual_seed(5)))
    snapshots = [run.images.detach().clone()]
    for it in range(iterations):
        run.iteration(it)
        snapshots.append(run.images.detach().clone())
    return snapshots


VARIANTS = pytest.mark.parametrize(
    "extra",
    [["method=dc"], ["method=ours_mda"], ["method=dsa"], ["matching=inter"], ["method=dm"], ["method=dcc"]],
    ids=["dc", "ours_mda", "dsa", "inter", "dm", "dcc"],
)


def first_step(extra: list[str], compute: Compute) -> tuple[float, torch.Tensor]:
    """The matching loss and its gradient on the images, for the first step of iteration 0."""
    cfg = run_config([*TINY, *extra])
    run = start_condenser(cfg, load_dataset(cfg.dataset))
    net = build_network(cfg.network, run.data.image_shape, run.data.num_classes, 0, CPU)
    gen = torch.Generator().manual_seed(0)
    setup = MatchSetup(
        run.images,
        run.labels,
        cfg.ipc,
        run.data.num_classes,
        cfg.distance,
        run.setup.augment,
        compute=compute,
    )
    step = MatchStep(
        setup=setup,
        net=net,
        params=matched_parameters(net, cfg.distance),
        real_by_class=lambda c: run.real.of_class(c, cfg.batch_real, gen),
        real_mixed=lambda: run.real.mixed(4 * cfg.batch_real, gen),
        iteration=0,
        augment_generator=gen,
        order_generator=gen,
        compiled_net=compute.compiled(net) if compute.compile else None,
    )
    loss = matching_loss(step, cfg.matching)
    (grad,) = torch.autograd.grad(loss, run.images)
    return float(loss.detach()), grad


@VARIANTS
def test_fast_matching_step_computes_the_straightforward_numbers(extra: list[str]) -> None:
    loss_fast, grad_fast = first_step(extra, Compute(CPU))
    loss_slow, grad_slow = first_step(extra, Compute(CPU))
    assert loss_fast == pytest.approx(loss_slow, rel=1e-5)
    assert grad_slow.abs().max() > 0
    torch.testing.assert_close(grad_fast, grad_slow, rtol=1e-4, atol=1e-5 * float(grad_slow.abs().max()))


@pytest.mark.parametrize(
    "extra",
    [["method=dc"], ["method=ours_mda"], ["method=dm"], ["method=dcc"]],
    ids=["dc", "ours_mda", "dm", "dcc"],
)
def test_fast_bf16_matching_step_computes_the_straightforward_bf16_numbers(extra: list[str]) -> None:
    """Under bf16 both paths round the same products to bf16; only the summation order of the
    threads' work differs, so they agree to bf16 resolution (8 bits of mantissa)."""
    loss_fast, grad_fast = first_step(extra, Compute(CPU, BF16))
    loss_slow, grad_slow = first_step(extra, Compute(CPU, BF16))
    loss_fp32, grad_fp32 = first_step(extra, Compute(CPU))
    assert loss_fast == pytest.approx(loss_slow, rel=1e-3)
    torch.testing.assert_close(grad_fast, grad_slow, rtol=1e-2, atol=1e-3 * float(grad_slow.abs().max()))
    # bf16 really ran (it is not fp32 under another name) and stayed close to fp32's answer.
    assert not torch.equal(grad_slow, grad_fp32)
    cosine = F.cosine_similarity(grad_slow.flatten(), grad_fp32.flatten(), dim=0)
    assert float(cosine) > 0.95


def relative_gap(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """How far two runs end apart, relative to how far the images travelled."""
    return float((a[-1] - b[-1]).norm() / (b[-1] - b[0]).norm())


FIVE_ITERATION_CASES = pytest.mark.parametrize(
    ("extra", "precision"),
    [
        (["matching=inter"], "fp32"),
        # 10 s: slow. One fast Ours-MDA matching step against the straightforward one stays.
        pytest.param(["method=ours_mda"], "fp32", marks=pytest.mark.slow),
        # 11-13 s each: slow. One fast matching step of DC and of DSA against the straightforward
        # path stays in the default suite (test_fast_matching_step_computes_...).
        pytest.param(["method=dc"], "fp32", marks=pytest.mark.slow),
        pytest.param(["method=dsa"], "fp32", marks=pytest.mark.slow),
        # 11 s each where bf16 is emulated: slow. By default one bf16 matching step of each
        # level is checked against the straightforward bf16 path (test_fast_bf16_matching_step...).
        pytest.param(["method=dc"], "bf16", marks=pytest.mark.slow),
        pytest.param(["method=ours_mda"], "bf16", marks=pytest.mark.slow),
    ],
    ids=["inter", "ours_mda", "dc", "dsa", "dc-bf16", "ours_mda-bf16"],
)


@FIVE_ITERATION_CASES
def test_fast_path_images_after_five_iterations_within_tolerance(extra: list[str], precision: str) -> None:
    """The stated tolerance after five iterations: the L2 gap to the straightforward images is at
    most 5% of the distance the images travelled, or twice the straightforward path's own spread,
    whichever is larger. The spread is how far the straightforward images move when it runs on 1
    thread instead of 2, or when its initial images are nudged by 1e-6 noise. Float rounding
    (1e-7 after one step, checked above) is amplified by the inner SGD loop and lr_img; on this
    tiny case the angle-magnitude distance (Ours-MD, Ours-MDA) ends 17% apart from a 1e-6 nudge."""
    extra = [*extra, f"precision={precision}"]
    fast = image_trajectory(True, extra)
    slow = image_trajectory(False, extra)
    nudged = image_trajectory(False, extra, nudge=1e-6)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        slow_one_thread = image_trajectory(False, extra)
    finally:
        torch.set_num_threads(threads)
    spread = max(relative_gap(slow_one_thread, slow), relative_gap(nudged, slow))
    assert relative_gap(fast, slow) <= max(0.05, 2 * spread)


def test_fp32_parts_open_no_autocast_region_and_bf16_parts_open_one_per_step() -> None:
    """Each step enters its part's region itself; nothing outside a step is under autocast."""
    compute = Compute(CPU, BF16)
    assert not torch.is_autocast_enabled("cpu")
    with compute.autocaster("evaluation")():
        assert (torch.ones(4, 4) @ torch.ones(4, 4)).dtype == torch.bfloat16
    assert not torch.is_autocast_enabled("cpu")
    with Compute(CPU, frozenset({"matching"})).autocaster("evaluation")():
        assert not torch.is_autocast_enabled("cpu")  # fp32 parts open nothing


def output_change_after_one_epoch(compute: Compute) -> float:
    """How far one epoch of the project's training loop moves the network's output on a fixed
    batch (as computed under the same plan)."""
    data = load_dataset(run_config(TINY).dataset)
    net = build_network(NetworkConfig(width=16), data.image_shape, data.num_classes, 0, CPU)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    images, labels = data.train.images[:64], data.train.labels[:64]
    autocast = compute.autocaster("evaluation")

    def change(_: int) -> float:
        with torch.no_grad(), autocast():
            before = net(images[:8]).float()
        train_epoch(net, opt, images, labels, 32, torch.Generator().manual_seed(0), None, autocast)
        with torch.no_grad(), autocast():
            after = net(images[:8]).float()
        return float((after - before).abs().max())

    return change(0)


def test_bf16_optimizer_step_changes_what_the_network_computes() -> None:
    """The defect this guards against: one autocast region around several steps made every
    forward reuse the bf16 weights cached when it opened, so training under bf16 moved the fp32
    weights but not the network the forwards computed with (evaluated models at chance). Held
    open, only the norm layers' fp32 parameters moved the output: 0.005 here, against 0.08."""
    fp32 = output_change_after_one_epoch(Compute(CPU))
    bf16 = output_change_after_one_epoch(Compute(CPU, BF16))
    assert fp32 > 0.02
    assert bf16 > 0.5 * fp32


@BOTH_PRECISIONS
def test_inner_loop_monitor_sees_the_network_move(precision: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The overfitting monitor's loss, taken between inner epochs, changes as the network trains
    (under a region held open around the loop, bf16 saw one frozen loss and never stopped)."""
    cfg = run_config([*TINY, "step_policy=overfit", f"precision={precision}"])
    data = load_dataset(cfg.dataset)
    net = build_network(cfg.network, data.image_shape, data.num_classes, 0, CPU)
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    images, labels = data.train.images[:40], data.train.labels[:40]
    monitor = (data.train.images[40:296], data.train.labels[40:296])
    losses: list[float] = []

    def recorded_loss(*args: Any) -> float:  # the real monitor loss, written down as it is taken
        losses.append(mean_loss(*args))
        return losses[-1]

    monkeypatch.setattr(condensation, "mean_loss", recorded_loss)
    autocast = Compute.for_run(cfg, CPU).autocaster("inner")
    gen = torch.Generator().manual_seed(0)
    mode = cfg.step_policy.monitor_mode
    train_inner(net, opt, images, labels, 3, cfg.batch_train, gen, monitor, mode, None, autocast)
    assert len(losses) >= 2 and len(set(losses)) == len(losses)


@BOTH_PRECISIONS
def test_evaluated_models_learn_in_either_precision(precision: str) -> None:
    """Models trained on 10 real digits per class: far above chance (10%), and bf16 within a few
    points of fp32 on the same models."""
    cfg = run_config([*TINY, "evaluation.num_models=2", "evaluation.epochs=30"])
    data = load_dataset(cfg.dataset)
    idx = torch.cat([torch.nonzero(data.train.labels == c).flatten()[:10] for c in range(10)])
    args = (data.train.images[idx], data.train.labels[idx], data, {"ConvNet": cfg.network}, cfg.evaluation)
    accuracies = {
        p: evaluate_set(*args, 0, "test", CPU, None, False, Compute(CPU, bf16_parts(p)))["ConvNet"].accuracies
        for p in ("fp32", precision)
    }
    assert min(accuracies[precision]) > 0.6
    assert abs(sum(accuracies[precision]) - sum(accuracies["fp32"])) / 2 < 0.05


def test_precision_auto_takes_bf16_only_from_the_measured_threshold() -> None:
    assert bf16_parts("fp32") == bf16_parts("tf32") == frozenset()
    assert bf16_parts("bf16") == BF16
    assert bf16_parts("auto") == frozenset()  # not measured: the reference arithmetic
    assert bf16_parts("auto", AUTO_MIN_SPEEDUP - 0.01) == frozenset()
    assert bf16_parts("auto", AUTO_MIN_SPEEDUP) == frozenset(AUTO_BF16_PARTS)
    assert set(AUTO_BF16_PARTS) <= set(PARTS)
    with pytest.raises(ValueError, match="unknown part"):
        Compute(CPU).autocaster("everything")


def test_tf32_is_a_cuda_choice_and_plain_fp32_on_a_cpu() -> None:
    cuda = torch.device("cuda")  # a device name: nothing runs on it here
    assert Compute.resolve(cuda, "tf32", True, False, False).precisions() == dict.fromkeys(PARTS, "tf32")
    assert Compute.resolve(cuda, "fp32", True, False, False).tf32 is False
    assert Compute.resolve(CPU, "tf32", True, False, False).precisions() == dict.fromkeys(PARTS, "fp32")
    before = torch.get_float32_matmul_precision()
    with Compute(CPU).process_settings():  # a CPU plan leaves CUDA's switches alone
        assert torch.get_float32_matmul_precision() == before


# The width of the network whose cached ratio these tests set: no other test uses it, so no other
# test's precision=auto run meets a ratio written here.
OWN_WIDTH = "network.width=20"


def plan_with_cached_ratio(ratio: float | None, overrides: list[str]) -> Compute:
    """The compute plan of a precision=auto run when the cache holds `ratio` for its network
    (None: nothing cached, so it measures)."""
    cfg = run_config([*TINY, "precision=auto", OWN_WIDTH, *overrides])
    if ratio is not None:
        key = speedup_key(CPU, asdict(cfg.network), (min(cfg.batch_real, 512), 1, 8, 8))
        store_speedup(key, ratio, "test")
    return plan_run(cfg).compute


def test_auto_measures_once_then_reads_the_cache_and_follows_the_ratio() -> None:
    """The decision follows the ratio, whatever this host measures: a test never depends on
    which precision is faster here (the cache, $CONDENSE_CACHE, is the test's own)."""
    first = plan_with_cached_ratio(None, ["network.width=24"])
    assert first.auto is not None and first.auto.source == "measured" and first.auto.ratio > 0
    again = plan_with_cached_ratio(None, ["network.width=24"])
    assert again.auto is not None and (again.auto.source, again.auto.ratio) == ("cached", first.auto.ratio)
    assert plan_with_cached_ratio(3.0, []).bf16 == frozenset(AUTO_BF16_PARTS)
    assert plan_with_cached_ratio(0.5, []).bf16 == frozenset()
    assert run_config(["speed=fast"]).precision == "auto" and run_config([]).precision == "fp32"


def test_an_auto_run_records_its_ratio_and_a_resumed_one_reuses_its_checkpoints(tmp_path: Path) -> None:
    plan_with_cached_ratio(0.5, [])  # this network's ratio: fp32
    overrides = [*TINY_RUN, "precision=auto", OWN_WIDTH, "checkpoint_every=1"]
    metrics = run(run_config([*overrides, "stage=condense"], tmp_path))
    expected = {"bf16_speedup": 0.5, "source": "cached", "threshold": AUTO_MIN_SPEEDUP}
    assert metrics["precision_auto"] == expected
    assert "auto: bf16 measured 0.50x" in metrics["protocol_card"]["precision"]
    assert metrics["precision"]["matching"] == "fp32"
    plan_with_cached_ratio(3.0, [])  # the cache now says bf16; the checkpoint still says 0.5
    (tmp_path / "metrics.json").unlink()  # as a killed run leaves its folder: a checkpoint, no record
    resumed = run(run_config([*overrides, "stage=condense", "iterations=3", "resume=true"], tmp_path))
    assert resumed["precision_auto"]["source"] == "checkpoint" and resumed["precision"]["matching"] == "fp32"


def test_straightforward_path_keeps_the_precision_and_ignores_the_schedule() -> None:
    """Precision is protocol: fast=false changes the allocator plan (plain glibc), never
    the arithmetic."""
    cfg = run_config([*TINY, "fast=false", "precision=bf16", "heap_reuse=true"])
    assert Compute.for_run(cfg, CPU) == Compute(CPU, BF16)
    assert Compute.for_run(cfg, CPU).precisions() == {part: "bf16" for part in PARTS}


def test_bf16_real_gradient_keeps_its_direction() -> None:
    """The precision question: under bf16 autocast each matched layer's real gradient stays within
    a small angle of the fp32 one, so a matching distance built on angles sees the same target."""
    cfg = run_config(TINY)
    data = load_dataset(cfg.dataset)
    net = build_network(cfg.network, data.image_shape, data.num_classes, 0, CPU)
    params = matched_parameters(net, cfg.distance)
    x, y = data.train.images[:256], data.train.labels[:256]
    fp32 = torch.autograd.grad(F.cross_entropy(net(x), y), params)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = F.cross_entropy(net(x), y)
    bf16 = torch.autograd.grad(loss, params)
    for a, b in zip(fp32, bf16, strict=True):
        assert float(F.cosine_similarity(a.flatten(), b.flatten(), dim=0)) > 0.99


@BOTH_PRECISIONS
def test_fast_evaluation_gives_the_straightforward_accuracies(precision: str) -> None:
    cfg = run_config([*TINY, "evaluation.num_models=3", "evaluation.epochs=20"])
    data = load_dataset(cfg.dataset)
    images, labels = data.train.images[:40], data.train.labels[:40]
    pool = {"ConvNet": cfg.network}
    args = (images, labels, data, pool, cfg.evaluation, 0, "test", CPU, None, False)
    parts = bf16_parts(precision)
    slow = evaluate_set(*args, compute=Compute(CPU, parts))["ConvNet"].accuracies
    fast = evaluate_set(*args, compute=Compute(CPU, parts))["ConvNet"].accuracies
    one_image = 1 / len(data.test.images)
    assert fast == pytest.approx(slow, abs=2 * one_image)
    assert len(set(fast)) > 1, "different model seeds should give different models"


def page_faults_of_repeated_outputs(x: torch.Tensor, repeats: int = 5) -> int:
    """Minor page faults while an op makes and frees a fresh output the size of x, repeatedly."""
    for _ in range(5):  # warm-up: glibc grows the heap over the first few outputs (3 here)
        torch.relu(x)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(repeats):
        torch.relu(x)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


@pytest.mark.skipif(glibc() is None, reason="heap reuse is a glibc allocator setting")
def test_heap_reuse_stops_page_faults_on_every_fresh_activation() -> None:
    x = torch.randn(64, 128, 32, 32)  # 32 MiB: an activation of DC's first layer
    pages_per_output = x.numel() * x.element_size() // 4096
    try:
        assert set_heap_reuse(False)
        assert page_faults_of_repeated_outputs(x) >= 3 * pages_per_output
        assert set_heap_reuse(True)
        assert page_faults_of_repeated_outputs(x) < pages_per_output // 10
    finally:
        set_heap_reuse(False)


def test_heap_reuse_is_part_of_the_fast_plan_only() -> None:
    fast = Compute.for_run(run_config(TINY), CPU)
    assert fast.heap_reuse is (glibc() is not None)
    assert not Compute.for_run(run_config([*TINY, "heap_reuse=false"]), CPU).heap_reuse
    assert not Compute.for_run(run_config([*TINY, "fast=false"]), CPU).heap_reuse
    assert ("heap reuse" in fast.describe()) is fast.heap_reuse


@pytest.mark.parametrize("bad", ["precision=fp16"])
def test_bad_compute_settings_are_refused(bad: str) -> None:
    with pytest.raises(ConfigError, match=bad.split("=")[0]):
        validate(run_config([*TINY, bad]))
