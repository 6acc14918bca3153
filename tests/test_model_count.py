"""evaluation.num_models=auto: paired models are added one at a time until every set's 95 %
interval is narrow (condense.stages.evaluation.judge_jointly), on scripted accuracies and on a
real run on digits."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest

from condense.app.run import run
from condense.report import report
from condense.schema import EvaluationConfig
from condense.stages.evaluation import AUTO_MODELS, ArchResult, interval_width, judge_jointly
from tests.conftest import TINY_RUN, run_config

T_975_DF2 = 4.302652729911275  # Student's t, 97.5 % quantile, 2 degrees of freedom (a t table)


def test_interval_width_is_the_full_t_interval_of_the_mean() -> None:
    # three models 0.70, 0.71, 0.72: sample std 0.01, so the width is 2 * t * 0.01 / sqrt(3)
    assert interval_width([0.70, 0.71, 0.72]) == pytest.approx(2 * T_975_DF2 * 0.01 / math.sqrt(3))
    assert interval_width([0.7]) is None  # one model has no spread


class Scripted:
    """Paired models whose accuracies are written in advance: set -> architecture -> sequence;
    each call returns the first `count` of them and is logged."""

    def __init__(self, sequences: dict[str, dict[str, list[float]]]) -> None:
        self.sequences = sequences
        self.calls: list[tuple[str, int]] = []

    def __call__(self, label: str, count: int) -> dict[str, ArchResult]:
        self.calls.append((label, count))
        return {arch: ArchResult(seq[:count], 1.0) for arch, seq in self.sequences[label].items()}


AUTO = EvaluationConfig(num_models=AUTO_MODELS, min_models=3, max_models=20, target_width=0.5)
STEADY = [0.7000, 0.7005, 0.6995] + [0.7000] * 17  # width 0.25 points at 3 models already
# widths at 3, 4, ... models: 2.98, 1.56, 1.08, 0.84, 0.68, 0.57, 0.49 (the first under 0.5, at 9)
NOISY = [0.700, 0.706, 0.694, 0.700, 0.702, 0.698, 0.700, 0.700, 0.700] + [0.700] * 11


def test_auto_stops_at_the_first_count_where_every_set_is_narrow() -> None:
    measure = Scripted({"set": {"ConvNet": STEADY}, "random": {"ConvNet": NOISY, "MLP": STEADY}})
    results, count = judge_jointly(["set", "random"], measure, AUTO)
    assert count.models == 9 and count.rule == "auto" and count.narrow_enough
    assert count.widest == pytest.approx(100 * interval_width(NOISY[:9])) and count.widest < 0.5
    assert 100 * interval_width(NOISY[:8]) > 0.5
    # every set and architecture got the same models: paired, and the narrow ones kept going
    assert {len(r.accuracies) for per in results.values() for r in per.values()} == {9}
    # model k for every set before model k + 1 for any
    assert measure.calls == [(label, n) for n in range(3, 10) for label in ("set", "random")]
    # the seconds of every round add up (1 s a call here)
    assert results["set"]["ConvNet"].seconds == 7


def test_auto_stops_at_max_models_when_an_interval_stays_wide() -> None:
    wide = [0.60, 0.80] * 10
    measure = Scripted({"set": {"ConvNet": wide}})
    results, count = judge_jointly(["set"], measure, replace(AUTO, max_models=7))
    assert count.models == 7 and not count.narrow_enough
    assert results["set"]["ConvNet"].accuracies == wide[:7]
    assert count.as_dict()["reached_target"] is False


def test_auto_starts_at_min_models_even_when_narrow_before() -> None:
    measure = Scripted({"set": {"ConvNet": [0.7] * 20}})
    _, count = judge_jointly(["set"], measure, replace(AUTO, min_models=5))
    assert count.models == 5 and measure.calls == [("set", 5)]


def test_a_count_judges_each_set_once_with_that_many_models() -> None:
    measure = Scripted({"set": {"ConvNet": NOISY}, "random": {"ConvNet": STEADY}})
    results, count = judge_jointly(["set", "random"], measure, EvaluationConfig(num_models=4))
    assert measure.calls == [("set", 4), ("random", 4)]
    assert count.rule == "fixed" and count.models == 4 and count.target_width is None
    assert count.widths["set"]["ConvNet"] == pytest.approx(100 * interval_width(NOISY[:4]))


# A real run on digits: the rule is met quickly only with a loose target, so it is set loose here.
AUTO_RUN = [*TINY_RUN, "evaluation.num_models=auto", "evaluation.max_models=5"]


def test_auto_run_pairs_its_models_with_a_fixed_run_and_records_the_count(tmp_path: Path) -> None:
    auto = run(run_config([*AUTO_RUN, "evaluation.target_width=100"], tmp_path / "auto"))
    fixed_overrides = [*TINY_RUN, "evaluation.num_models=5"]
    fixed = run(run_config(fixed_overrides, tmp_path / "fixed"))
    models = auto["evaluation_models"]
    # a 100-point target is met at the minimum, 3 models, for the set and the random subset alike
    assert models["rule"] == "auto" and models["models"] == 3 and models["reached_target"] is True
    for label in ("dc+step_policy=fixed", "random"):
        auto_accs = auto["evaluation"][label]["ConvNet"]["accuracies"]
        # the k-th model is the same model whatever the count: the fixed run's first three
        assert auto_accs == fixed["evaluation"][label]["ConvNet"]["accuracies"][:3]
        width = 100 * interval_width(auto_accs)
        assert models["widths"][label]["ConvNet"] == pytest.approx(width)
    assert auto["protocol_card"]["models"].startswith("auto: 3 models, widest 95 % interval")
    assert fixed["evaluation_models"]["rule"] == "fixed" and fixed["protocol_card"]["models"] == "5 x ConvNet"
    on_disk = json.loads((tmp_path / "auto" / "metrics.json").read_text())
    assert on_disk["evaluation_models"] == json.loads(json.dumps(models))
    table = report([tmp_path / "auto"], tmp_path / "report")["markdown"]
    assert "| auto | dc+step_policy=fixed | 0 | 3 |" in table


def test_auto_run_resumes_its_decision_from_the_ledger(tmp_path: Path) -> None:
    """A resumed evaluation replays the rounds from the models its ledger holds: an unreachable
    target runs to max_models, and a second run with resume=true trains no model again."""
    overrides = [*AUTO_RUN, "evaluation.target_width=0.001", "evaluation.max_models=4"]
    first = run(run_config(overrides, tmp_path / "job"))
    assert first["evaluation_models"]["models"] == 4 and first["evaluation_models"]["reached_target"] is False
    ledger = json.loads((tmp_path / "job" / "evaluation_progress.json").read_text())
    assert sorted(len(per["ConvNet"]) for per in ledger.values()) == [4, 4]
    (tmp_path / "job" / "metrics.json").unlink()  # as if killed after its last model
    again = run(run_config([*overrides, "resume=true"], tmp_path / "job"))
    assert again["evaluation"] == first["evaluation"]
    # every model came from the ledger: a model trained again would have been appended to it
    assert json.loads((tmp_path / "job" / "evaluation_progress.json").read_text()) == ledger
