"""Time to a good set: each speed lever computes the straightforward path's numbers on a tiny case
(torch.compile, stopping on the matching loss), and condense-report times a set end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from condense.app import cli
from condense.app.validation import validate
from condense.primitives.compute import PARTS, Compute
from condense.primitives.dataset import load_dataset
from condense.primitives.synthetic import load_synthetic
from condense.report import accuracy_time_points, load_run, time_to_set
from condense.schema import ConfigError, to_container
from condense.stages.checkpoint import CHECKPOINT, load_checkpoint
from condense.stages.condensation import CondenseRecipe, condense, windows_without_gain
from condense.stages.evaluation import evaluate_set
from tests.conftest import FAST, TINY, condense_in_process, run_config
from tests.test_compute import first_step, image_trajectory, relative_gap

CPU = torch.device("cpu")
# The smallest network the compiled graphs are worth testing on: compiling costs seconds per graph.
SMALL = [*TINY, "network.width=8"]


@pytest.fixture(autouse=True)
def fresh_dynamo() -> None:
    """Each test compiles its own graphs (Inductor's disk cache keeps that cheap) and counts them."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()


def compiled_frames() -> int:
    """Frames Dynamo has compiled since the counters were cleared (each test starts at 0)."""
    return int(torch._dynamo.utils.counters["frames"]["ok"])


def test_compiled_real_gradients_give_the_eager_matching_step() -> None:
    """Ours-MDA's first matching step with the real images' gradients from the compiled network:
    the same loss and image gradient as eager, up to float rounding of fused kernels."""
    extra = ["method=ours_mda", "network.width=8"]
    loss_eager, grad_eager = first_step(extra, Compute(CPU))
    assert compiled_frames() == 0
    loss_compiled, grad_compiled = first_step(extra, Compute(CPU, compile=True))
    assert compiled_frames() > 0, "the real gradients did not go through torch.compile"
    assert loss_compiled == pytest.approx(loss_eager, rel=1e-5)
    scale = float(grad_eager.abs().max())
    assert scale > 0
    torch.testing.assert_close(grad_compiled, grad_eager, rtol=1e-4, atol=1e-5 * scale)


def test_compiled_condense_iterations_stay_on_the_eager_trajectory() -> None:
    """Three Ours-MDA iterations (real gradients and the inner training compiled) end where eager
    ends, within the 5% of the travelled distance the fast path is held to."""
    extra = ["method=ours_mda", "network.width=8"]
    eager = image_trajectory(True, extra, iterations=3)
    compiled = image_trajectory(True, [*extra, "compile=true"], iterations=3)
    assert compiled_frames() > 0
    assert relative_gap(compiled, eager) <= 0.05
    assert not torch.equal(compiled[-1], compiled[0])


def test_compiled_batchnorm_network_stays_on_the_eager_trajectory() -> None:
    """ConvNetBN: BatchNorm statistics are set eagerly, then frozen (eval-mode BatchNorm inside a
    training network), which the compiled graph must follow."""
    extra = ["method=dc", "network=convnet_bn", "network.width=8"]
    eager = image_trajectory(True, extra, iterations=2)
    compiled = image_trajectory(True, [*extra, "compile=true"], iterations=2)
    assert compiled_frames() > 0
    assert relative_gap(compiled, eager) <= 0.05


def compiled_and_eager_accuracies(parts: frozenset[str]) -> tuple[list[float], list[float], float]:
    """Two paired models trained 60 epochs on 40 digits, eagerly and compiled; and one test image."""
    cfg = run_config([*SMALL, "evaluation.num_models=2", "evaluation.epochs=60"])
    data = load_dataset(cfg.dataset)
    images, labels = data.train.images[:40], data.train.labels[:40]
    args = (images, labels, data, {"ConvNet": cfg.network}, cfg.evaluation, 0, "test", CPU, None, False)
    eager = evaluate_set(*args, compute=Compute(CPU, parts))["ConvNet"].accuracies
    compiled = evaluate_set(*args, compute=Compute(CPU, parts, compile=True))["ConvNet"].accuracies
    return eager, compiled, 1 / len(data.test.images)


def test_compiled_evaluation_gives_the_eager_accuracies() -> None:
    eager, compiled, one_image = compiled_and_eager_accuracies(frozenset())
    assert compiled_frames() > 0
    assert compiled == pytest.approx(eager, abs=2 * one_image)
    assert len(set(eager)) > 1, "different model seeds should give different models"


def test_compiled_bf16_evaluation_gives_the_eager_bf16_accuracies() -> None:
    """Under forced bf16 (emulated where the CPU lacks it) the fused kernels round each product to
    8 bits of mantissa in another order than eager ones, so the models may part by a few test
    images: within one point of 360."""
    eager, compiled, _ = compiled_and_eager_accuracies(frozenset(PARTS))
    assert compiled_frames() > 0
    assert compiled == pytest.approx(eager, abs=0.01)
    assert len(set(eager)) > 1


def test_compile_is_part_of_the_fast_plan_only() -> None:
    assert Compute.for_run(run_config([*FAST, "compile=true"]), CPU).compile
    assert not Compute.for_run(run_config([*FAST, "compile=true", "fast=false"]), CPU).compile
    assert not Compute.for_run(run_config(FAST), CPU).compile


def test_windows_without_gain_counts_stale_windows_after_the_best() -> None:
    falling = [10, 10, 8, 8, 6, 6]
    assert windows_without_gain(falling, 2, 0.01) == 0
    # the window means 10, 8, 7.96, 8.5: 7.96 is under 1% below 8, so it and 8.5 are stale
    flat = [10, 10, 8, 8, 7.96, 7.96, 8.5, 8.5]
    assert windows_without_gain(flat, 2, 0.01) == 2
    assert windows_without_gain(flat, 2, 0.0) == 1  # any gain counts: only 8.5 is stale
    assert windows_without_gain(flat[:3], 2, 0.01) == 0  # one complete window
    assert windows_without_gain([], 2, 0.01) == 0


def test_a_run_stops_when_its_matching_loss_stops_falling(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A real run whose stopping rule demands a 90% drop per window stops after its first two
    windows, says so, and records where; the set and the card carry it; report times the set."""
    overrides = [
        *SMALL,
        "ipc=1",
        "iterations=12",
        "evaluation.num_models=1",
        "evaluation.epochs=5",
        "stop.patience=1",
        "stop.window=2",
        "stop.min_improvement=0.9",
    ]
    metrics = cli.run(run_config(overrides, tmp_path))
    assert "stopped at iteration 4 of 12 (8 saved)" in capsys.readouterr().out
    assert metrics["condense"]["stopped_at"] == 4
    assert len(metrics["history"]) == 4
    assert "stopping on the matching loss (patience 1 x 2" in metrics["protocol_card"]["iterations"]
    assert load_synthetic(tmp_path / "synthetic.safetensors").config["iterations_run"] == 4
    saved = json.loads((tmp_path / "metrics.json").read_text())
    run = load_run(tmp_path / "metrics.json")
    assert run is not None
    own = saved["evaluation_seconds"][saved["label"]]["total"]
    assert time_to_set(run) == pytest.approx(saved["condense"]["seconds"] + own)
    ((seconds, accuracy),) = next(iter(accuracy_time_points([run], []).values()))
    assert seconds == pytest.approx(time_to_set(run))
    assert accuracy == pytest.approx(100 * saved["evaluation"][saved["label"]]["ConvNet"]["mean"])
    # resumed from its checkpoint, the stopped run stays stopped
    data = load_dataset(run_config(overrides).dataset)
    cfg = run_config([*overrides, "resume=true"], tmp_path)
    recipe, compute = CondenseRecipe.of_run(cfg), Compute.for_run(cfg, CPU)
    syn, stats = condense(recipe, compute, data, to_container(cfg), out=tmp_path)
    assert "stopped early at iteration 4: nothing left to do" in capsys.readouterr().out
    assert stats.stopped_at == 4 and len(stats.history) == 4
    assert syn.config["iterations_run"] == 4


def test_a_checkpoint_from_before_a_setting_existed_resumes_with_its_default(tmp_path: Path) -> None:
    """A checkpoint written before `stop` and `compile` existed ran with their defaults: it resumes
    under them, and is refused under other values."""
    overrides = [*SMALL, "ipc=1", "iterations=2", "stage=condense"]
    cli.run(run_config(overrides, tmp_path))
    path = tmp_path / CHECKPOINT
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    now = json.loads(meta["fingerprint"])  # what this version's run records (and compares)
    before = {k: v for k, v in now.items() if k not in ("stop", "compile")}
    save_file(tensors, str(path), metadata={**meta, "fingerprint": json.dumps(before)})
    assert load_checkpoint(path, now).next_iteration == 2
    with pytest.raises(ConfigError, match="stop"):
        load_checkpoint(path, {**now, "stop": {**now["stop"], "patience": 3}})


@pytest.mark.parametrize(
    "bad",
    ["stop.patience=-1", "stop.window=0", "stop.min_improvement=1.5"],
)
def test_bad_stop_settings_are_refused(bad: str, tmp_path: Path) -> None:
    setting = bad.split("=")[0]
    with pytest.raises(ConfigError, match=setting.replace(".", r"\.")):
        validate(run_config([*FAST, bad], tmp_path))


def test_compile_without_a_compiler_is_refused_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """The command's Hydra app with no C++ compiler on PATH: one line naming the setting, exit 2,
    nothing run (in this process: a subprocess would add ~4 s of imports)."""
    out = tmp_path / "run"
    monkeypatch.delenv("CXX", raising=False)  # CXX would name a compiler outside PATH
    monkeypatch.setenv("PATH", str(tmp_path))
    code = condense_in_process(*FAST, "compile=true", f"hydra.run.dir={out}", monkeypatch=monkeypatch)
    captured = capsys.readouterr()
    assert code == 2
    assert "compile=true needs a C++ compiler (g++; set CXX to use another) for torch.compile on cpu" in (
        captured.err + captured.out
    )
    assert "Traceback" not in captured.err and not (out / "metrics.json").exists()
    assert not (out / "metrics.json").exists()
