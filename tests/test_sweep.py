"""Real Hydra multiruns: one job per W&B run, a failed job is reported and spares the others,
and condense-report turns the sweep into a table with the right numbers."""

from __future__ import annotations

import csv
import json
import statistics
import subprocess
from pathlib import Path

import pytest

from condense.app.cli import compose_config
from condense.app.labels import FOLDER_NAME_MAX, fitting_folder_name
from condense.report import main as report_main
from tests.conftest import TINY_RUN, condense_command
from tests.wandb_records import offline_runs, read_offline_run

# Two evaluated models per set, so the report's mean +- std pools more than one accuracy.
SWEEP = [*TINY_RUN, "evaluation.num_models=2"]


def multirun(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return condense_command(
        "-m", *SWEEP, *args, f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path, timeout=600
    )


def test_two_job_sweep_gives_two_runs_and_a_report(tmp_path: Path, capsys) -> None:
    proc = multirun(tmp_path, "method=dc,ours_m", "logger=wandb")
    assert proc.returncode == 0, proc.stderr
    metrics = {
        json.loads(p.read_text())["label"]: json.loads(p.read_text())
        for p in (tmp_path / "sweep").rglob("metrics.json")
    }
    labels = ("dc+step_policy=fixed", "ours_m+step_policy=fixed")  # TINY_RUN fixes the loop counts
    assert set(metrics) == set(labels)
    runs = [read_offline_run(p) for p in offline_runs(tmp_path / "sweep")]
    assert len(runs) == 4  # two jobs x (condense, evaluate)
    sweep_tags = {r.run["tags"][0] for r in runs}
    assert len(sweep_tags) == 1 and next(iter(sweep_tags)).startswith("sweep-")  # one tag for the sweep
    assert sorted(r.run["tags"][1] for r in runs) == sorted(labels * 2)  # and the set's label
    assert len({r.run["group"] for r in runs}) == 2  # one group per ablation cell

    report_main([str(tmp_path / "sweep"), "--out", str(tmp_path / "report")])
    table = (tmp_path / "report" / "table.md").read_text()
    for method in labels:
        accs = [100 * a for a in metrics[method]["evaluation"][method]["ConvNet"]["accuracies"]]
        expected = f"{statistics.fmean(accs):.2f} +- {statistics.pstdev(accs):.2f}"
        row = next(line for line in table.splitlines() if line.startswith(f"| {method} |"))
        assert expected in row, (row, expected)
    assert any(line.startswith("| random |") for line in table.splitlines())
    for plot in ("accuracy.png", "loss.png", "accuracy_vs_time.png"):
        assert (tmp_path / "report" / plot).read_bytes()[:4] == b"\x89PNG"
    assert "table.md" in capsys.readouterr().out


def test_report_keeps_fp32_and_bf16_runs_apart(tmp_path: Path) -> None:
    """Precision is part of the protocol: a bf16 run's numbers never pool with an fp32 run's,
    for the condensed set and for the random subset evaluated beside it."""
    proc = multirun(tmp_path, "precision=fp32,bf16", "logger=none", "evaluation.num_models=1")
    assert proc.returncode == 0, proc.stderr
    recorded = {
        json.loads(p.read_text())["precision"]["matching"] for p in (tmp_path / "sweep").rglob("metrics.json")
    }
    assert recorded == {"fp32", "bf16"}
    report_main([str(tmp_path / "sweep"), "--out", str(tmp_path / "report")])
    table = (tmp_path / "report" / "table.md").read_text()
    rows = [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("|")]
    tiny = "dc+step_policy=fixed"  # TINY_RUN fixes the loop counts
    expected = {f"{name} precision={p}" for name in (tiny, "random") for p in ("fp32", "bf16")}
    assert set(rows[2:]) == expected
    # each precision's rows carry their own protocol card, footnoted in full
    footnotes = [line for line in table.splitlines() if line.startswith("[")]
    assert len(footnotes) == 2 and {"precision: fp32" in f for f in footnotes} == {True, False}


@pytest.fixture(scope="module")
def mixed_sweep(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """One real sweep for the two tests below: a group choice and a plain value each take two
    values, and a third value of lr_img is refused (6 jobs, 2 of them failing before any work)."""
    tmp_path = tmp_path_factory.mktemp("mixed")
    grid = ("real_batch=fixed,adaptive", "lr_img=0.1,0.2,-1")
    proc = multirun(tmp_path, *grid, "logger=none", "evaluation.num_models=1")
    return tmp_path, proc


def test_report_never_pools_runs_of_other_settings(mixed_sweep) -> None:
    """Runs that differ in a group choice or in a plain value are rows of their own; the random
    subset every run evaluated (same seed, same models) counts once."""
    tmp_path, _ = mixed_sweep
    report_main([str(tmp_path / "sweep"), "--out", str(tmp_path / "report")])
    with (tmp_path / "report" / "table.csv").open() as f:
        rows = {row["variant"]: int(row["n"]) for row in csv.DictReader(f)}
    tiny = "dc+step_policy=fixed"  # TINY_RUN fixes the loop counts
    names = (tiny, f"{tiny}+real_batch=adaptive")
    expected = {f"{name} lr_img={lr}": 1 for name in names for lr in (0.1, 0.2)}
    assert rows == {**expected, "random": 1}


def test_failed_job_is_reported_and_spares_the_others(mixed_sweep) -> None:
    tmp_path, proc = mixed_sweep
    assert proc.returncode == 1
    assert "2 failed" in proc.stdout and "lr_img=-1" in proc.stdout
    done = [json.loads(p.read_text())["config"] for p in (tmp_path / "sweep").rglob("metrics.json")]
    assert sorted((c["real_batch"]["name"], c["lr_img"]) for c in done) == [
        ("adaptive", 0.1), ("adaptive", 0.2), ("fixed", 0.1), ("fixed", 0.2)
    ]  # fmt: skip


def test_a_job_with_long_overrides_gets_a_folder_that_fits(tmp_path: Path) -> None:
    """A job's folder is named by its overrides; past a file system's 255 bytes it is cut and
    ends in a digest of the whole (Hydra alone fails there with a traceback)."""
    long_value = "0." + "1" * 300  # lr_img 0.111...: a long override that is still one real run
    proc = multirun(tmp_path, f"lr_img={long_value}", "logger=none", "evaluation.num_models=1")
    assert proc.returncode == 0, proc.stderr
    (metrics,) = (tmp_path / "sweep").rglob("metrics.json")
    folder = metrics.parent.name
    assert len(folder.encode()) <= 255 and folder.startswith("0-")
    whole = folder.split("-", 1)[1]
    assert len(whole.encode()) == FOLDER_NAME_MAX and "lr_img-0.1111" in whole
    assert whole.rsplit("-", 1)[1] not in long_value  # the digest, not a piece of the value
    assert json.loads(metrics.read_text())["config"]["lr_img"] == pytest.approx(1 / 9)


def test_a_path_in_an_override_names_one_folder_not_a_tree(tmp_path: Path) -> None:
    """dataset.root=/a/b made nested folders that the sweep's readers never found."""
    proc = multirun(tmp_path, f"dataset.root={tmp_path / 'data'}", "logger=none", "evaluation.num_models=1")
    assert proc.returncode == 0, proc.stderr
    (metrics,) = (tmp_path / "sweep").rglob("metrics.json")
    assert metrics.parent.parent == tmp_path / "sweep" and "dataset.root-%2F" in metrics.parent.name


def test_folder_names_are_cut_with_a_digest_only_when_too_long() -> None:
    short = "dataset-digits_ipc-1"
    assert fitting_folder_name(short) == short
    assert fitting_folder_name("dataset.root-/data/x_ipc-1") == "dataset.root-%2Fdata%2Fx_ipc-1"
    a, b = "x" * 300 + "a", "x" * 300 + "b"  # same first 187 bytes: the digests tell them apart
    assert fitting_folder_name(a) != fitting_folder_name(b)
    assert fitting_folder_name(a) == fitting_folder_name(a)  # resume=true finds it again
    multibyte = "é" * 150  # 300 bytes: the cut never splits a character
    assert len(fitting_folder_name(multibyte).encode()) <= FOLDER_NAME_MAX


def compose_with_hydra(overrides: list[str]):
    return compose_config(overrides, with_hydra=True)


def test_launchers_and_optuna_sweeper_compose() -> None:
    joblib = compose_with_hydra(["hydra/launcher=joblib"])
    assert "JoblibLauncher" in joblib.hydra.launcher._target_
    slurm = compose_with_hydra(["hydra/launcher=submitit_slurm"])
    assert "SlurmLauncher" in slurm.hydra.launcher._target_
    optuna = compose_with_hydra(["hparams_search=optuna"])
    assert "OptunaSweeper" in optuna.hydra.sweeper._target_
    assert set(optuna.hydra.sweeper.params) == {"lr_img", "distance.magnitude_weight", "seed"}
    assert str(optuna.hydra.sweeper.params.seed) == "0"  # a fixed value, never tuned


@pytest.mark.slow  # 13 s; by default the launcher composes (above) and the basic launcher runs sweeps
def test_joblib_launcher_runs_jobs_in_parallel_processes(tmp_path: Path) -> None:
    proc = multirun(tmp_path, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "seed=0,1", "logger=none")
    assert proc.returncode == 0, proc.stderr
    seeds = sorted(
        json.loads(p.read_text())["config"]["seed"] for p in (tmp_path / "sweep").rglob("metrics.json")
    )
    assert seeds == [0, 1]


def test_a_job_leaves_threads_and_environment_as_it_found_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """Jobs of one sweep process (basic, joblib launchers) start clean: a Slurm job's thread count
    and W&B's folders do not leak into the next job."""
    import os

    import torch

    from condense.app.jobs import job_settings

    monkeypatch.delenv("WANDB_DIR", raising=False)
    threads = torch.get_num_threads()
    with job_settings():
        torch.set_num_threads(1 if threads > 1 else 2)
        os.environ["WANDB_DIR"] = "/somewhere/else"
    assert torch.get_num_threads() == threads and "WANDB_DIR" not in os.environ
