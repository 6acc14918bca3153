"""Faults injected into real runs: SIGKILL then resume, SIGTERM, NaN, corrupted checkpoints."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from condense.app.cli import run
from condense.primitives.synthetic import load_synthetic
from tests.conftest import FAST, condense_command, run_config, tiny_mtt

SLOWISH = [
    *FAST,
    "ipc=2",
    "network.width=16",
    "iterations=8",
    "checkpoint_every=1",
    "evaluation.num_models=1",
    "evaluation.epochs=2",
    "stage=condense",
]


def launch(out: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "condense", *SLOWISH, *extra, f"hydra.run.dir={out}"],
        cwd=out.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def checkpoint_iteration(out: Path) -> int:
    path = out / "checkpoint.safetensors"
    if not path.exists():
        return 0
    try:
        with safe_open(str(path), framework="pt") as f:
            return int(f.metadata()["next_iteration"])
    except Exception:
        return 0


def wait_for_checkpoint(out: Path, proc: subprocess.Popen[str], at_least: int) -> int:
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if (n := checkpoint_iteration(out)) >= at_least:
            return n
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint at iteration {at_least}: {proc.communicate()}")


def killed_and_resumed(tmp_path: Path, *chosen: str) -> tuple[Path, int]:
    """A SLOWISH run (with `chosen` on top) SIGKILLed once its third checkpoint is written, then
    finished by `condense resume=true`: its folder, and the checkpoint it was killed at."""
    killed = tmp_path / "killed"
    killed.mkdir()
    proc = launch(killed, *chosen)
    reached = wait_for_checkpoint(killed, proc, 3)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "synthetic.safetensors").exists()  # it really died mid-run
    resumed = condense_command(*SLOWISH, *chosen, "resume=true", f"hydra.run.dir={killed}", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "resume: continuing from iteration" in resumed.stdout
    return killed, reached


@pytest.mark.parametrize(
    "chosen",
    [
        ("precision=fp32",),
        pytest.param(("precision=bf16",), marks=pytest.mark.slow),  # bf16: 17 s where emulated
        # a scheduled image lr holds no state: the rate is recomputed from the iteration on resume
        ("precision=fp32", "lr_img_schedule=cosine"),
    ],
    ids=["fp32", "bf16", "fp32-cosine-lr"],
)
def test_sigkill_then_resume_equals_uninterrupted_run(tmp_path: Path, chosen: tuple[str, ...]) -> None:
    reference = tmp_path / "reference"
    run(run_config([*SLOWISH, *chosen], reference))
    killed, reached = killed_and_resumed(tmp_path, *chosen)
    assert reached < 8
    a = load_synthetic(reference / "synthetic.safetensors").images
    b = load_synthetic(killed / "synthetic.safetensors").images
    assert torch.equal(a, b)  # bitwise
    history = json.loads((killed / "metrics.json").read_text())["history"]
    assert [h["iteration"] for h in history] == list(range(8))


def test_sigkill_then_resume_of_ftd_equals_uninterrupted_run(tmp_path: Path) -> None:
    """Trajectory matching's state through the real path: images, learned step size and the EMA
    set, after a SIGKILL and `resume=true`, as an uninterrupted run leaves them (its experts are
    the reference run's, read from the shared cache)."""
    chosen = tiny_mtt(tmp_path / "experts", "method=ftd", "matching.ema_decay=0.9", "matching.syn_steps=10")
    chosen += ["ipc=2", "iterations=60", "checkpoint_every=1", "stage=condense"]
    reference = tmp_path / "reference"
    run(run_config(chosen, reference))
    killed, reached = killed_and_resumed(tmp_path, *chosen)
    assert reached < 60
    for name in ("synthetic.safetensors", "synthetic_raw.safetensors"):
        a, b = (load_synthetic(folder / name) for folder in (reference, killed))
        assert torch.equal(a.images, b.images), name
    assert a.lr is not None and a.lr == b.lr  # the learned step size, stored in the set


def wait_for_progress(proc: subprocess.Popen[str], iterations: int) -> None:
    """Read the condense progress bar (stderr) until it counts `iterations` done: the loop, and so
    its signal handler, is running. An observable event, whatever the host's speed."""
    assert proc.stderr is not None
    seen = ""
    while not any(int(n) >= iterations for n in re.findall(r"condense:[^\r\n|]*\|[^|]*\|\s*(\d+)/", seen)):
        chunk = proc.stderr.read(1)
        if not chunk:  # the process ended first
            raise AssertionError(f"no progress to iteration {iterations}: {seen[-2000:]}")
        seen += chunk


def test_sigterm_saves_a_checkpoint_and_exits_non_zero(tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    # checkpoint_every=0 writes nothing until the end; so many iterations that it cannot end first.
    proc = launch(out, "checkpoint_every=0", "iterations=100000", "progress=true")
    wait_for_progress(proc, 1)
    assert not (out / "checkpoint.safetensors").exists()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "resume=true" in err
    assert checkpoint_iteration(out) >= 1


def test_nan_stops_with_the_iteration_and_the_cause(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = condense_command(*SLOWISH, "lr_img=1e30", f"hydra.run.dir={out}", cwd=tmp_path)
    assert proc.returncode != 0
    line = next(x for x in proc.stderr.splitlines() if x.startswith("error:"))
    assert "iteration" in line and "lr_img=1e+30" in line and "Traceback" not in proc.stderr
    assert (out / "checkpoint.safetensors").exists()  # the last good state is kept


def test_corrupted_checkpoint_is_refused(tmp_path: Path) -> None:
    run(run_config([*SLOWISH, "iterations=2"], tmp_path))
    path = tmp_path / "checkpoint.safetensors"
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(Exception, match="corrupted"):
        run(run_config([*SLOWISH, "iterations=3", "resume=true"], tmp_path))


def test_checkpoint_from_other_settings_is_refused(tmp_path: Path) -> None:
    run(run_config([*SLOWISH, "iterations=2"], tmp_path))
    with pytest.raises(Exception, match="other settings.*ipc"):
        run(run_config([*SLOWISH, "iterations=3", "ipc=3", "resume=true"], tmp_path))


def test_checkpoint_from_another_precision_is_refused(tmp_path: Path) -> None:
    run(run_config([*SLOWISH, "iterations=1"], tmp_path))
    with pytest.raises(Exception, match="other settings.*precision"):
        run(run_config([*SLOWISH, "iterations=2", "precision=bf16", "resume=true"], tmp_path))


def test_a_run_never_overwrites_another_runs_folder(tmp_path: Path) -> None:
    run(run_config([*SLOWISH, "iterations=1"], tmp_path))
    before = (tmp_path / "synthetic.safetensors").read_bytes()
    with pytest.raises(Exception, match="already holds a run"):
        run(run_config([*SLOWISH, "iterations=1", "seed=7"], tmp_path))
    assert (tmp_path / "synthetic.safetensors").read_bytes() == before
