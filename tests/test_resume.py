"""Resumable sweeps on any launcher: a rerun with resume=true skips finished jobs, continues
checkpointed ones and runs the rest; an evaluation resumes at its next model."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from condense.app.cli import run
from condense.primitives.synthetic import load_synthetic
from condense.schema import ConfigError
from tests.conftest import FAST, condense_command, run_config

JOB = [
    *FAST,
    "ipc=2",
    "network.width=16",
    "iterations=4",
    "checkpoint_every=1",
    "step_policy=fixed",
    "step_policy.outer_loop=2",
    "step_policy.inner_epochs=1",
    "evaluation.num_models=3",
    "evaluation.epochs=10",
]


def sweep_command(sweep: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "condense", "-m", *JOB, "seed=0,1,2", *extra, f"hydra.sweep.dir={sweep}"]


def job_results(sweep: Path) -> dict[str, tuple[torch.Tensor, dict]]:
    """Each job's synthetic images and evaluated accuracies, by job folder name."""
    out = {}
    for metrics_path in sorted(sweep.glob("*/metrics.json")):
        metrics = json.loads(metrics_path.read_text())
        images = load_synthetic(metrics_path.parent / "synthetic.safetensors").images
        out[metrics_path.parent.name] = (images, metrics["evaluation"])
    return out


@pytest.mark.slow  # 31 s; a killed single run resumes bitwise in the default suite (test_reliability.py)
def test_sigkilled_sweep_resumes_to_the_uninterrupted_results(tmp_path: Path) -> None:
    start = time.perf_counter()
    reference = subprocess.run(
        sweep_command(tmp_path / "reference"), cwd=tmp_path, capture_output=True, text=True
    )
    assert reference.returncode == 0, reference.stderr
    duration = time.perf_counter() - start
    # a random moment of the sweep (printed, so a failure can be replayed)
    moment = random.uniform(0.15, 0.9) * duration
    print(f"SIGKILL after {moment:.2f} s of a {duration:.2f} s sweep")
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        sweep_command(killed), cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    time.sleep(moment)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    resumed = subprocess.run(
        sweep_command(killed, "resume=true"), cwd=tmp_path, capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr
    expected, got = job_results(tmp_path / "reference"), job_results(killed)
    assert list(got) == list(expected) and len(got) == 3
    for job, (images, evaluation) in expected.items():
        assert torch.equal(got[job][0], images), job  # bitwise the same set
        for label, per_arch in evaluation.items():
            assert got[job][1][label]["ConvNet"]["accuracies"] == per_arch["ConvNet"]["accuracies"], job
    # jobs that had finished before the kill were skipped, not run again
    finished_before = resumed.stdout.count("already finished; nothing to run")
    print(f"{finished_before} of 3 jobs had finished before the kill")


def test_evaluation_resumes_at_the_next_model(tmp_path: Path) -> None:
    out = tmp_path / "run"
    first = run(run_config(JOB, out))
    label = first["label"]
    # as if killed after the first model of each set: the ledger keeps one accuracy, made
    # recognisable, and the run is not finished
    ledger_path = out / "evaluation_progress.json"
    ledger = json.loads(ledger_path.read_text())
    assert len(ledger) == 2  # the set and the random subset
    for per_arch in ledger.values():
        per_arch["ConvNet"] = [0.123456]
    ledger_path.write_text(json.dumps(ledger))
    metrics = json.loads((out / "metrics.json").read_text())
    metrics["finished"] = False
    (out / "metrics.json").write_text(json.dumps(metrics))
    resumed = run(run_config([*JOB, "resume=true"], out))
    for name in (label, "random"):
        before = first["evaluation"][name]["ConvNet"]["accuracies"]
        after = resumed["evaluation"][name]["ConvNet"]["accuracies"]
        assert after[0] == 0.123456 and after[1:] == before[1:]  # models 2 and 3 only were trained


def test_a_finished_run_with_other_settings_is_not_resumed(tmp_path: Path) -> None:
    out = tmp_path / "run"
    run(run_config([*JOB, "evaluation.num_models=1", "iterations=1"], out))
    with pytest.raises(ConfigError, match=r"finished run made with other settings \(iterations\)"):
        run(run_config([*JOB, "evaluation.num_models=1", "iterations=2", "resume=true"], out))
    proc = condense_command(
        *JOB, "evaluation.num_models=1", "iterations=1", "resume=true", f"hydra.run.dir={out}", cwd=tmp_path
    )
    assert proc.returncode == 0 and "already finished; nothing to run" in proc.stdout, proc.stderr


def test_a_finished_run_made_before_a_setting_existed_is_still_finished(tmp_path: Path) -> None:
    """A record written before a setting was added lacks its key: the run ran as the schema's
    default, so resume=true finds it finished (a key filled in last must not read as a change)."""
    out = tmp_path / "run"
    first = run(run_config([*JOB, "evaluation.num_models=1", "iterations=1"], out))
    stored = json.loads((out / "metrics.json").read_text())
    for key in ("min_models", "max_models", "target_width"):  # added with evaluation.num_models=auto
        del stored["config"]["evaluation"][key]
    (out / "metrics.json").write_text(json.dumps(stored))
    again = run(run_config([*JOB, "evaluation.num_models=1", "iterations=1", "resume=true"], out))
    assert again["evaluation"] == first["evaluation"]
    stored["config"]["evaluation"]["target_width"] = 2.0  # a value the run did not have is a change
    (out / "metrics.json").write_text(json.dumps(stored))
    with pytest.raises(ConfigError, match=r"other settings \(evaluation\)"):
        run(run_config([*JOB, "evaluation.num_models=1", "iterations=1", "resume=true"], out))
