"""DD-Ranking's fairness metrics: the formulas against hand-computed values, and the evaluation
stage computing them from paired evaluations of the set, the random subset and the whole dataset."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from condense.app.cli import run
from condense.report import main as report_main
from condense.schema import ConfigError, RankingConfig
from condense.stages.ranking import RankingAccuracies, normalised_score, ranking_metrics
from tests.conftest import FAST, TINY_RUN, run_config

# Digits, 1 model of width 16, 10 epochs; the whole-dataset reference trains 2 epochs.
RANKED = [
    *FAST,
    "network.width=16",
    "evaluation.num_models=1",
    "evaluation.epochs=10",
    "ranking=dd_ranking",
    "ranking.full_run=true",
    "ranking.full_epochs=2",
    "ranking.teacher_epochs=1",
]


def test_normalised_score_maps_the_gap_range_onto_0_1() -> None:
    assert normalised_score(-1.0) == pytest.approx(0.0)
    assert normalised_score(1.0) == pytest.approx(1.0)
    # (e^0 - e^-1) / (e - e^-1) = (1 - 0.36788) / (2.71828 - 0.36788) = 0.63212 / 2.35040
    assert normalised_score(0.0) == pytest.approx(0.268941, abs=1e-6)


def test_metrics_on_a_constructed_case() -> None:
    acc = RankingAccuracies(
        set_own=0.80,
        set_hard=0.70,
        random_own=0.60,
        full_hard=0.90,
        set_aug=0.85,
        random_aug=0.65,
        set_plain=0.80,
        random_plain=0.70,
    )
    out = ranking_metrics(acc, RankingConfig(name="dd_ranking"))
    assert out["hlr"] == pytest.approx(0.20)  # 0.90 - 0.70
    assert out["ior"] == pytest.approx(0.20)  # 0.80 - 0.60
    assert out["lrs"] == pytest.approx(0.268941, abs=1e-6)  # s(0.5 * 0.2 - 0.5 * 0.2) = s(0)
    # s(0.5 * 0.20 + 0.5 * 0.10) = s(0.15) = (1.161834 - 0.367879) / 2.350402
    assert out["ars"] == pytest.approx(0.337795, abs=1e-6)
    weighted = ranking_metrics(acc, RankingConfig(name="dd_ranking", lrs_weight=1.0, ars_weight=0.0))
    assert weighted["lrs"] == pytest.approx((math.exp(0.2) - math.exp(-1)) / (math.e - math.exp(-1)))
    assert weighted["ars"] == pytest.approx((math.exp(0.1) - math.exp(-1)) / (math.e - math.exp(-1)))


def test_a_reference_is_required_and_checked() -> None:
    with pytest.raises(ConfigError, match="needs the whole-dataset accuracy"):
        run(run_config([*FAST, "ranking=dd_ranking"]))
    with pytest.raises(ConfigError, match="its ranking.full_source"):
        run(run_config([*FAST, "ranking=dd_ranking", "ranking.full_accuracy=93.5"]))
    with pytest.raises(ConfigError, match=r"ranking.lrs_weight=2.0 is out of range"):
        run(run_config([*FAST, "ranking=dd_ranking", "ranking.full_run=true", "ranking.lrs_weight=2"]))


def test_hard_label_set_is_ranked_from_paired_evaluations(tmp_path: Path) -> None:
    made = run(run_config(TINY_RUN, tmp_path / "made"))
    path = tmp_path / "made" / "synthetic.safetensors"
    overrides = [*RANKED, "stage=evaluate", f"synthetic={path}", f"dataset.root={tmp_path / 'data'}"]
    metrics = run(run_config(overrides, tmp_path / "ranked"))
    rk, label = metrics["ranking"], metrics["label"]
    assert label == made["label"] and rk["architecture"] == "ConvNet" and rk["labels"] == "hard"
    acc = rk["accuracies"]
    # the set's and the random subset's own evaluations are the ones the metrics read
    assert acc["set_own"] == metrics["evaluation"][label]["ConvNet"]["mean"] == acc["set_hard"]
    assert acc["random_own"] == metrics["evaluation"]["random"]["ConvNet"]["mean"]
    # no augmentation in this run: its numbers are the "no aug" half of ARS; DSA gives the other
    assert acc["set_plain"] == acc["set_own"] and acc["random_plain"] == acc["random_own"]
    assert rk["hlr"] == pytest.approx(acc["full_hard"] - acc["set_hard"])
    assert rk["ior"] == pytest.approx(acc["set_own"] - acc["random_own"])
    assert rk["lrs"] == pytest.approx(normalised_score(0.5 * rk["ior"] - 0.5 * rk["hlr"]))
    gap = 0.5 * (acc["set_aug"] - acc["random_aug"]) + 0.5 * (acc["set_plain"] - acc["random_plain"])
    assert rk["ars"] == pytest.approx(normalised_score(gap))
    assert acc["full_hard"] > acc["set_hard"]  # 1437 real images beat 20 barely condensed ones
    # ranking.full_epochs=2 under DC's dc_restart schedule: 2 + 1 epochs trained
    assert "own run (1 models x 3 epochs on the whole training set)" in rk["full_reference"]["source"]
    # the whole-dataset run is cached: a second evaluation reads it back
    again = run(run_config(overrides, tmp_path / "again"))["ranking"]
    assert again["accuracies"] == acc and "cached at" in again["full_reference"]["source"]
    # condense-report shows the metrics beside accuracy
    report_main([str(tmp_path / "ranked"), "--out", str(tmp_path / "report")])
    table = (tmp_path / "report" / "table.md").read_text()
    assert (
        "Fairness metrics (DD-Ranking" in table
        and "digits ipc2 ConvNet" in table
        and f"{100 * rk['lrs']:.2f}" in table
    )


def test_soft_labelled_set_is_ranked_against_a_teacher_relabelled_random_subset(
    tmp_path: Path,
) -> None:
    data_root = tmp_path / "data"
    base = run_config([*FAST])
    from condense.primitives.dataset import load_dataset

    data = load_dataset(base.dataset)
    idx = torch.cat([torch.nonzero(data.train.labels == c).flatten()[:2] for c in range(10)])
    folder = tmp_path / "datm"
    folder.mkdir()
    torch.save(data.train.images[idx], folder / "images_best.pt")
    torch.save(4 * F.one_hot(data.train.labels[idx], 10).float(), folder / "labels_best.pt")
    overrides = [
        *RANKED,
        "stage=evaluate",
        f"synthetic={folder}",
        f"dataset.root={data_root}",
        "ranking.full_accuracy=0.97",
        "ranking.full_source='a test value'",
    ]
    metrics = run(run_config(overrides, tmp_path / "out"))
    rk = metrics["ranking"]
    assert rk["labels"] == "soft" and rk["random_labels"].startswith("soft, from a teacher")
    assert rk["full_reference"] == {"accuracy": 0.97, "source": "configured: a test value"}
    assert rk["accuracies"]["set_own"] == metrics["evaluation"]["mtt:datm/images_best"]["ConvNet"]["mean"]
    assert len(list((data_root / "teachers").glob("digits-*.safetensors"))) == 1
    assert rk["hlr"] == pytest.approx(0.97 - rk["accuracies"]["set_hard"])
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert saved["ranking"]["lrs"] == rk["lrs"]


def test_the_random_subset_ranked_as_a_set_improves_on_itself_by_zero(tmp_path: Path) -> None:
    made = tmp_path / "made"
    run(run_config([*FAST, "method=random", "ipc=2", "stage=condense"], made))
    overrides = [*RANKED, "stage=evaluate", f"synthetic={made / 'synthetic.safetensors'}"]
    overrides += ["ranking.full_accuracy=0.97", "ranking.full_source='a test value'"]
    metrics = run(run_config(overrides, tmp_path / "ranked"))
    assert metrics["label"] == "random" and set(metrics["evaluation"]) == {"random"}
    assert metrics["ranking"]["ior"] == 0.0
