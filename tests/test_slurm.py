"""Sweeps on a real Slurm cluster through Hydra's submitit launcher (marked `slurm`; .ci/run
starts a one-node cluster with scripts/local_slurm.sh first): a 2-job sweep, a failing job, and
a preempted job that checkpoints on Slurm's signal, is requeued, resumes and ends with the same
set as an uninterrupted job."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from condense.primitives.synthetic import load_synthetic
from condense.report import main as report_main
from tests.conftest import TINY_RUN


def cluster_is_up() -> bool:
    if shutil.which("sinfo") is None:
        return False
    try:
        proc = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return proc.returncode == 0 and any(s in proc.stdout for s in ("idle", "mixed", "allocated"))


pytestmark = [
    pytest.mark.slurm,
    pytest.mark.skipif(
        not cluster_is_up(),
        reason="no Slurm cluster: start one with `bash scripts/local_slurm.sh start` (root)",
    ),
]

# One CPU and 2 GiB per job on the local cluster's `debug` partition; logs kept across requeues.
SLURM = [
    "hydra/launcher=submitit_slurm",
    "hydra.launcher.partition=debug",
    "hydra.launcher.timeout_min=20",
    "hydra.launcher.cpus_per_task=1",
    "hydra.launcher.mem_gb=2",
    "+hydra.launcher.additional_parameters={open-mode:append}",
]


def slurm_sweep(sweep: Path, *args: str) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "condense", "-m", *SLURM, *TINY_RUN, *args, f"hydra.sweep.dir={sweep}"]
    return subprocess.Popen(
        command, cwd=sweep.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def finish(proc: subprocess.Popen[str], timeout: int = 600) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def job_logs(sweep: Path) -> str:
    return "\n".join(p.read_text() for p in sorted(sweep.glob(".submitit/**/*_log.*")))


def test_two_job_sweep_on_slurm(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    code, out, err = finish(slurm_sweep(sweep, "seed=0,1"))
    assert code == 0, err + job_logs(sweep)
    jobs = sorted(sweep.glob("*/metrics.json"))
    assert len(jobs) == 2
    for path in jobs:
        metrics = json.loads(path.read_text())
        assert metrics["finished"] and set(metrics["evaluation"]) == {metrics["label"], "random"}
        assert len(metrics["evaluation"][metrics["label"]]["ConvNet"]["accuracies"]) == 1
        assert (path.parent / "synthetic.safetensors").exists()
    assert len(list(sweep.glob(".submitit/*/*_result.pkl"))) == 2  # submitit collected two Slurm jobs
    report_main([str(sweep), "--out", str(tmp_path / "report")])
    assert "dc+step_policy=fixed" in (tmp_path / "report" / "table.md").read_text()


def test_a_failing_job_is_reported_and_spares_the_other(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    code, out, err = finish(slurm_sweep(sweep, "evaluation.epochs=5,0"))
    assert code != 0
    failed = next((line for line in out.splitlines() if "failed: 1-" in line), "")
    assert "evaluation.epochs-0" in failed and "evaluation.epochs=0 is out of range" in out, out + err
    good = json.loads(next(sweep.glob("0-*/metrics.json")).read_text())
    assert good["finished"]


def test_experts_train_as_a_job_array_into_one_cache(tmp_path: Path) -> None:
    """stage=experts swept over experts.index: one Slurm job per expert, all writing into the
    same cache folder; the distillation run after them trains none."""
    sweep, root = tmp_path / "sweep", tmp_path / "experts"
    mtt = [
        "method=mtt", "ipc=1", "network.width=16", f"experts.root={root}", "experts.num=2",
        "experts.epochs=2", "matching.syn_steps=2", "matching.expert_epochs=1", "matching.max_start_epoch=2",
        "logger=none", "progress=false", "device=cpu", "precision=fp32",
    ]  # fmt: skip
    array = ["stage=experts", "experts.index=0,1", "seed=0"]
    command = [sys.executable, "-m", "condense", "-m", *SLURM, *mtt, *array]
    proc = subprocess.run([*command, f"hydra.sweep.dir={sweep}"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr + job_logs(sweep)
    assert len(list(sweep.glob(".submitit/*/*_result.pkl"))) == 2  # two Slurm jobs
    (folder,) = root.iterdir()
    experts = sorted(p.name for p in folder.glob("expert_*.safetensors"))
    assert experts == ["expert_0.safetensors", "expert_1.safetensors"]
    done = subprocess.run(
        [sys.executable, "-m", "condense", *mtt, "iterations=1", "evaluation.num_models=1",
         "augment.eval_epochs=1", f"hydra.run.dir={tmp_path / 'run'}"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "experts: all 2 found" in done.stdout
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["experts"]["trained"] == 0


def checkpoint_iteration(out: Path) -> int:
    try:
        with safe_open(str(out / "checkpoint.safetensors"), framework="pt") as f:
            return int(f.metadata()["next_iteration"])
    except Exception:  # not there yet, or being replaced
        return 0


def array_task(index: int) -> str:
    """The Slurm id (ARRAY_TASK) of the running sweep job with this index."""
    listing = subprocess.run(["squeue", "-h", "-o", "%i %T"], capture_output=True, text=True).stdout
    running = [line.split()[0] for line in listing.splitlines() if line.endswith("RUNNING")]
    return next(job for job in running if job.endswith(f"_{index}"))


def test_preempted_job_checkpoints_requeues_resumes_and_matches(tmp_path: Path) -> None:
    """Job 0 gets SIGUSR2, what Slurm sends before a time limit or a preemption (submitit asks for
    it): it checkpoints, submitit's hook requeues it, and the restarted job resumes. Job 1, the
    same settings, runs uninterrupted beside it."""
    sweep = tmp_path / "sweep"
    proc = slurm_sweep(sweep, "iterations=40", "checkpoint_every=1,1000")
    deadline = time.time() + 300
    while not (folders := list(sweep.glob("0-*"))) or checkpoint_iteration(folders[0]) < 3:
        assert time.time() < deadline and proc.poll() is None, finish(proc)
        time.sleep(0.05)
    job0 = folders[0]
    # Slurm holds the requeued job back about two minutes (its begin time); forcing an earlier
    # start raced the old job's cleanup ("job credential revoked"), so the test waits it out.
    subprocess.run(["scancel", "--signal=USR2", array_task(0)], check=True)
    code, out, err = finish(proc)
    logs = job_logs(sweep)
    assert code == 0, err + logs
    assert "checkpoint: iteration" in logs and "handing the signal to the job's handler" in logs, logs
    assert "requeued by Slurm (restart 1)" in logs and "resume: continuing from iteration" in logs, logs
    interrupted = load_synthetic(job0 / "synthetic.safetensors").images
    uninterrupted = load_synthetic(next(sweep.glob("1-*")) / "synthetic.safetensors").images
    assert torch.equal(interrupted, uninterrupted)  # bitwise
