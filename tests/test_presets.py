"""The paper's tables as presets (conf/experiment/): every job of every preset composes and passes
validation with the paper's protocol, and every preset runs end to end at budget=smoke."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from condense.app import cli
from condense.app.labels import set_label
from condense.app.validation import validate
from condense.method.matching import DISTRIBUTION_LEVELS, TRAJECTORY
from condense.report import main as report_main
from condense.schema import to_container, to_run_config
from tests.conftest import CONF_DIR, condense_command, needs_fashion_mnist

PRESETS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
# Swept keys that pick the variants of a table (the rest, dataset and ipc, pick its cells).
CELL_KEYS = ("dataset", "ipc", "seed")


def sweep_grid(preset: str, budget: str) -> dict[str, list[str]]:
    params = cli.compose_config(
        [f"experiment={preset}", f"budget={budget}"], with_hydra=True
    ).hydra.sweeper.params
    return {key: str(values).split(",") for key, values in params.items()}


def test_every_table_and_baseline_has_a_preset() -> None:
    assert set(PRESETS) >= {
        "table1_matching",
        "table2_distance",
        "table3_ablation",
        "table4_cross_arch",
        "dc_published",
        "dsa_published",
        "coreset_baselines",
        "dm_published",
        "dcc_published",
        "baselines",
    }


def covering_jobs(grid: dict[str, list[str]], keys: list[str]) -> list[tuple[str, ...]]:
    """Jobs of the sweep in which every value of every swept key appears at least once: job i
    takes each key's value i modulo its count (a subset of the full product)."""
    most = max(len(grid[k]) for k in keys)
    return [tuple(grid[k][i % len(grid[k])] for k in keys) for i in range(most)]


# Each job composes in ~0.4 s (Hydra), and the tables sweep up to ~50 jobs: the default suite
# composes the covering jobs (every value of every key), -m slow the full product.
@pytest.mark.parametrize("jobs", ["covering", pytest.param("every", marks=pytest.mark.slow)])
@pytest.mark.parametrize("preset", PRESETS)
def test_every_job_of_a_preset_carries_the_paper_protocol(preset: str, jobs: str) -> None:
    grid = sweep_grid(preset, "paper")
    assert grid["seed"] == ["0", "1", "2", "3", "4"]  # 5 condensation runs
    keys = [k for k in grid if k != "seed"]
    product = list(itertools.product(*(grid[k] for k in keys)))
    assert len(product) >= 2
    chosen = product if jobs == "every" else covering_jobs(grid, keys)
    assert set(chosen) <= set(product)
    for values in chosen:
        job = [f"{k}={v}" for k, v in zip(keys, values, strict=True)]
        cfg = to_run_config(cli.compose_config([f"experiment={preset}", *job]))
        validate(cfg)
        # DC's and DSA's protocol: 300 evaluation epochs, 1000 whenever the evaluation augments.
        augments = cfg.augment.name != "none" or cfg.dataset.eval_augment.enabled
        # DM's published runs take 20000 cheap iterations (budget_tuning/paper_distribution.yaml)
        published = 20000 if cfg.matching.name == "distribution" else 1000
        assert (cfg.iterations, cfg.evaluation.num_models) == (published, 20)
        assert cfg.evaluation.epochs == (1000 if augments else 300)
        for key, value in zip(keys, values, strict=True):  # the job really is the cell it claims
            if key == "method":  # a preset leaves no node: the set is named by its choices
                assert set_label(to_container(cfg)) == value
                continue
            if key == "network":  # an option sets several fields (vgg11_bn: vgg11 with BatchNorm)
                alone = cli.compose_config([f"network={value}", f"dataset={cfg.dataset.name}"])
                assert cfg.network == to_run_config(alone).network
                continue
            node = getattr(cfg, key)
            assert str(node.name if hasattr(node, "name") else node) == value


def test_a_method_carries_its_published_budget_unless_the_command_shortens_it() -> None:
    """budget=paper is the default: DM's 20000 iterations and 20 models over 5 seeds come with
    method=dm; budget=cpu and smoke shorten it; digits (no published row) keeps the demo's."""

    def scale(*overrides: str) -> tuple[int, int, str, str]:
        cfg = cli.compose_config(list(overrides), with_hydra=True)
        seeds = str((cfg.hydra.sweeper.params or {}).get("seed"))
        return cfg.iterations, cfg.evaluation.num_models, seeds, cfg.preset.budget

    assert scale("method=dm", "dataset=fashion_mnist") == (20000, 20, "0,1,2,3,4", "paper")
    assert scale("method=dc", "dataset=fashion_mnist") == (1000, 20, "0,1,2,3,4", "paper")
    assert scale("method=idm", "dataset=cifar10") == (20000, 20, "0,1,2,3,4", "paper")
    assert scale("method=dm", "dataset=fashion_mnist", "budget=cpu") == (400, 3, "0", "cpu")
    assert scale("method=dm", "dataset=fashion_mnist", "budget=smoke") == (1, 1, "0", "smoke")
    assert scale() == (6, 3, "0,1,2,3,4", "paper")  # the demo: `condense` alone
    assert scale("method=dm") == (6, 3, "0,1,2,3,4", "paper")
    assert scale("budget=none", "dataset=fashion_mnist")[:3] == (1000, 20, "None")
    assert cli.compose_config(["method=dm", "speed=fast"]).preset.speed == "fast"


@pytest.mark.parametrize("method", sorted(path.stem for path in (CONF_DIR / "method").glob("*.yaml")))
def test_speed_fast_composes_with_every_method(method: str) -> None:
    """The recipe's adaptive real batch applies where real gradients are matched; DM, IDM and
    trajectory matching take none, so they keep the fixed batch and the recipe's other levers."""
    cfg = to_run_config(cli.compose_config([f"method={method}", "speed=fast"]))
    validate(cfg)
    takes_real_gradients = cfg.matching.name not in (*DISTRIBUTION_LEVELS, TRAJECTORY)
    assert cfg.real_batch.name == ("adaptive" if takes_real_gradients else "fixed")
    assert (cfg.fast, cfg.compile, cfg.precision) == (True, True, "auto")


def test_cpu_budget_scales_the_protocol_down() -> None:
    cfg = to_run_config(cli.compose_config(["experiment=table3_ablation", "budget=cpu"]))
    assert (cfg.iterations, cfg.evaluation.num_models, cfg.evaluation.epochs) == (20, 3, 300)
    assert sweep_grid("table3_ablation", "cpu")["seed"] == ["0"]


def smoke_overrides(preset: str) -> tuple[list[str], int]:
    """One job of the preset: IPC 1 on Fashion-MNIST (the dataset every CI machine has) and the
    first value of every other swept key (the other jobs compose and validate in the test above)."""
    grid = sweep_grid(preset, "smoke")
    narrowed = ["dataset=fashion_mnist", "ipc=1"]
    narrowed += [f"{k}={v[0]}" for k, v in grid.items() if k not in CELL_KEYS]
    return narrowed, 1


# Each run is ~9 s (table4_cross_arch, six architectures, 26 s). By default one preset runs end to
# end through the real command (gradient matching and the random subset); the others are slow.
# At smaller scale every job of every preset composes and validates in the test above, and the
# coresets and DM run end to end in-process by default (tests/test_coreset.py, test_baselines.py).
END_TO_END_BY_DEFAULT = ("baselines",)


@needs_fashion_mnist
@pytest.mark.parametrize(
    "preset",
    [p if p in END_TO_END_BY_DEFAULT else pytest.param(p, marks=pytest.mark.slow) for p in PRESETS],
)
def test_preset_runs_end_to_end_at_smoke_budget(preset: str, tmp_path: Path) -> None:
    narrowed, expected_jobs = smoke_overrides(preset)
    sweep = tmp_path / "sweep"
    proc = condense_command(
        "-m",
        f"experiment={preset}",
        "budget=smoke",
        *narrowed,
        "logger=none",
        "progress=false",
        "device=cpu",
        "precision=fp32",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    runs = [json.loads(p.read_text()) for p in sweep.rglob("metrics.json")]
    assert len(runs) == expected_jobs
    for metrics in runs:
        assert metrics["config"]["iterations"] == 1 and metrics["config"]["ipc"] == 1
        # the narrowed dataset replaced the preset's swept ones: the job ran on Fashion-MNIST
        assert metrics["config"]["dataset"]["name"] == "fashion_mnist"
        accuracies = [
            a
            for per_arch in metrics["evaluation"].values()
            for r in per_arch.values()
            if isinstance(r, dict)
            for a in r["accuracies"]
        ]
        assert accuracies and all(0.0 <= a <= 1.0 for a in accuracies)
    report_main([str(sweep), "--out", str(tmp_path / "report")])
    assert "fashion_mnist ipc1" in (tmp_path / "report" / "table.md").read_text()
