"""The benchmark scripts' own bookkeeping. baselines.py: its cells and rows, MTT's and FTD's
budgets, and their experts' training time read from the expert files into its own column and the
total, on a tiny real MTT run. preset_sweep.py: when a sweep is finished."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

from condense.app.cli import run
from tests.conftest import run_config, tiny_mtt

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def script(name: str) -> ModuleType:
    sys.path.insert(0, str(BENCHMARKS))  # the scripts import their sibling results_file
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCHMARKS))


@pytest.fixture(scope="module")
def baselines() -> ModuleType:
    return script("baselines")


def test_a_cell_gives_each_family_its_budget(baselines: ModuleType) -> None:
    cell = baselines.Cell.parse("10:3:60:2")
    its = {m: cell.iterations_of(m) for m in ("dc", "dm", "idm", "mtt", "ftd", "random")}
    assert its == {"dc": 3, "dm": 60, "idm": 60, "mtt": 15, "ftd": 15, "random": 0}
    assert baselines.Cell.parse("1:20:200:5:100").iterations_of("mtt") == 100
    with pytest.raises(SystemExit, match="IPC:ITERATIONS:DM_ITERATIONS:MODELS"):
        baselines.Cell.parse("1:20:200")


def cells(row: str) -> list[str]:
    return [c.strip() for c in row.strip("|").split("|")]


def test_an_mtt_row_counts_its_experts_apart_and_in_the_total(baselines: ModuleType, tmp_path: Path) -> None:
    trained = run(run_config(tiny_mtt(tmp_path / "experts"), tmp_path / "one"))
    cached = run(run_config(tiny_mtt(tmp_path / "experts"), tmp_path / "two"))
    assert cached["experts"]["trained"] == 0
    rows = [cells(baselines.method_row(1, "MTT", 3, m)) for m in (trained, cached)]
    # the run that found its experts cached still counts what they cost, as their files record it
    assert rows[0][5] == rows[1][5] == f"{trained['experts']['training_seconds']:.0f}"
    condense_s, eval_s = cached["condense"]["seconds"], cached["evaluation_seconds"]["mtt"]["ConvNet"]
    total = cached["experts"]["training_seconds"] + condense_s + eval_s
    assert rows[1][6:9] == [f"{condense_s:.0f}", f"{eval_s:.0f}", f"{total:.0f}"]
    assert rows[1][:3] == ["1", "MTT", "3"] and rows[1][4] == "1"
    # experts that do not record their training time (MTT's buffers, older files): said, and the
    # total says it leaves them out
    unrecorded = cached | {"experts": cached["experts"] | {"training_seconds": None}}
    row = cells(baselines.method_row(1, "MTT", 3, unrecorded))
    assert row[5] == "not recorded" and row[8] == f"{condense_s + eval_s:.0f} + experts"


def test_a_setting_that_cannot_work_stops_the_table_before_it_runs(
    baselines: ModuleType, tmp_path: Path
) -> None:
    """MTT's IPC-10 segment (start epochs up to 20) on 4-epoch experts is refused up front; the
    same segment cut per IPC (METHOD@IPC) plans, every run validated."""
    cells_ = [baselines.Cell.parse("1:1:1:1:2"), baselines.Cell.parse("10:1:1:1:2")]
    small = {"mtt": ["experts.num=2", "experts.epochs=4"]}
    with pytest.raises(SystemExit, match=r"ipc 10, mtt: matching.max_start_epoch=20 .* reach past"):
        baselines.planned_runs(cells_, ["random", "mtt"], small, tmp_path, tmp_path / "experts")
    assert not any(tmp_path.iterdir())  # nothing ran
    cut = small | {"mtt@10": ["matching.max_start_epoch=2"]}
    runs = baselines.planned_runs(cells_, ["random", "mtt"], cut, tmp_path, tmp_path / "experts")
    assert [(c.ipc, m, extra) for c, m, extra, _ in runs] == [
        (1, "random", []), (1, "mtt", small["mtt"]), (10, "random", []),
        (10, "mtt", [*small["mtt"], "matching.max_start_epoch=2"]),
    ]  # fmt: skip
    cfg = runs[-1][3]
    assert (cfg.matching.max_start_epoch, cfg.experts.epochs, cfg.iterations, cfg.ipc) == (2, 4, 2, 10)
    assert cfg.experts.root == str(tmp_path / "experts") and cfg.dataset.name == "fashion_mnist"


def test_a_sweep_is_finished_when_every_job_it_makes_has_its_metrics(tmp_path: Path) -> None:
    sweep = script("preset_sweep")
    overrides = ["method=mtt", "lr_img=100,1000,10000", "matching.syn_steps=20,50", "seed=range(0,2)"]
    assert sweep.job_count(overrides) == 12 and sweep.job_count(["method=mtt"]) == 1
    for job in range(11):
        (tmp_path / f"{job}-x").mkdir()
        (tmp_path / f"{job}-x" / "metrics.json").write_text("{}")
    (tmp_path / "11-x").mkdir()  # the job the sweep was cut in: no metrics yet
    assert not sweep.finished(tmp_path, overrides)
    (tmp_path / "11-x" / "metrics.json").write_text("{}")
    assert sweep.finished(tmp_path, overrides)


def job_folder(root: Path, job: int, overrides: list[str], condense_s: float) -> None:
    """A multirun job as Hydra and condense leave it: its overrides and its metrics."""
    kept = root / f"{job}-x" / ".hydra"
    kept.mkdir(parents=True)
    (kept / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    metrics = {"condense": {"seconds": condense_s}, "evaluation_seconds": {"syn": {"total": 7.0}}}
    (root / f"{job}-x" / "metrics.json").write_text(json.dumps(metrics))


def test_the_seconds_table_has_as_many_cells_per_row_as_its_header_with_or_without_a_varied_key(
    tmp_path: Path,
) -> None:
    sweep = script("preset_sweep")
    job_folder(tmp_path / "one", 0, ["method=mtt", "lr_img=30"], 41.2)
    assert sweep.run_seconds(tmp_path / "one") == [
        "| job | condense s | evaluation s (every set) |",
        "| --- | --- | --- |",
        "| 0 | 41 | 7 |",
    ]
    for job, lr in enumerate(("100", "1000")):
        job_folder(tmp_path / "two", job, ["method=mtt", f"lr_img={lr}", "resume=true"], 40.0)
    assert sweep.run_seconds(tmp_path / "two") == [
        "| job | lr_img | condense s | evaluation s (every set) |",
        "| --- | --- | --- | --- |",
        "| 0 | 100 | 40 | 7 |",
        "| 1 | 1000 | 40 | 7 |",
    ]
