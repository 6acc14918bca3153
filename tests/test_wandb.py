"""A real offline W&B run, read back from its .wandb file; W&B failures never cost a result."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from condense.app.cli import run
from tests.conftest import TINY_LABEL, TINY_RUN, run_config
from tests.wandb_records import offline_runs, read_offline_run


def test_offline_run_logs_config_metrics_images_table_artifact(tmp_path: Path) -> None:
    overrides = [*TINY_RUN, "logger=wandb", "logger.image_every=1"]
    metrics = run(run_config(overrides, tmp_path))
    files = offline_runs(tmp_path / "wandb_home")
    assert len(files) == 2, files  # one W&B run per stage
    runs = {r.run["job_type"]: r for r in map(read_offline_run, files)}
    condense, evaluate = runs["condense"], runs["evaluate"]

    assert condense.run["group"] == evaluate.run["group"]
    assert condense.run["group"].startswith(
        "digits-ipc2-convnet_instance-dc-intra-fixed-fixed-noise-none-none-dc_2021-none-fp32-"
    )
    assert condense.config["precision/matching"] == evaluate.config["precision/evaluation"] == "fp32"
    assert condense.config["choice/precision"] == "fp32" and condense.config["precision/setting"] == "fp32"
    assert condense.config["choice/distance"] == "dc" and condense.config["choice/matching"] == "intra"
    assert (
        condense.config["choice/real_batch"] == "fixed"
        and condense.config["choice/network"] == "convnet/instance"
    )
    assert condense.config["ipc"] == 2 and condense.config["distance"]["name"] == "dc"
    assert condense.config["label"] == TINY_LABEL and TINY_LABEL in condense.run["tags"]
    losses = [h["condense/match_loss"] for h in condense.history if "condense/match_loss" in h]
    assert losses == pytest.approx([h["match_loss"] for h in metrics["history"]])
    images = [h for h in condense.history if h.get("condense/synthetic/_type") == "image-file"]
    assert len(images) == 2  # image_every=1: one grid per iteration
    for image in images:
        png = next(tmp_path.rglob(Path(image["condense/synthetic/path"]).name))
        assert png.read_bytes()[:4] == b"\x89PNG"
    assert condense.artifacts == ["synthetic-digits-ipc2"]

    expected = metrics["evaluation"][TINY_LABEL]["ConvNet"]["mean"]
    assert evaluate.summary[f"accuracy/{TINY_LABEL}/ConvNet"] == pytest.approx(expected)
    assert evaluate.summary["accuracy/random/ConvNet"] == pytest.approx(
        metrics["evaluation"]["random"]["ConvNet"]["mean"]
    )
    (table,) = [h for h in evaluate.history if h.get("evaluation/accuracy/_type") == "table-file"]
    table_file = next(tmp_path.rglob(Path(table["evaluation/accuracy/path"]).name))
    rows = json.loads(table_file.read_text())["data"]
    assert [r[:2] for r in rows] == [[TINY_LABEL, "ConvNet"], ["random", "ConvNet"]]
    assert rows[0][2] == pytest.approx(expected)
    # the models' count (one model: no interval, so no width is logged)
    assert evaluate.summary["evaluation/models"] == 1 and "evaluation/widest" not in evaluate.summary


def test_wandb_start_failure_keeps_local_metrics(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import wandb

    def refuse(*args: object, **kwargs: object) -> None:
        raise RuntimeError("W&B service unreachable (injected)")

    monkeypatch.setattr(wandb, "init", refuse)
    overrides = [*TINY_RUN, "logger=wandb"]
    with pytest.warns(UserWarning, match="W&B did not start"):
        run(run_config(overrides, tmp_path))
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert on_disk["evaluation"][TINY_LABEL]["ConvNet"]["accuracies"]


def test_wandb_group_splits_on_every_setting_but_the_seed() -> None:
    from condense.app.plan import ablation_group

    fp32 = {"setting": "fp32", "matching": "fp32", "inner": "fp32", "evaluation": "fp32"}

    def group(*overrides: str) -> str:
        return ablation_group(run_config(list(overrides)), fp32)

    base = group()
    assert group("seed=1") == base and group("progress=false", "logger=none") == base
    assert group("stage=condense") == base  # a set evaluated later pools with its maker's runs
    for other in ("real_batch=adaptive", "lr_img=0.2", "evaluation.epochs=5", "distance.magnitude_weight=2"):
        assert group(other) != base, other
    assert "adaptive" in group("real_batch=adaptive")
