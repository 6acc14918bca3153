"""lr_img_schedule: the image learning rate as a function of the iteration, in real digits runs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from condense.app.cli import run
from condense.primitives.synthetic import load_synthetic
from condense.schema import ConfigError
from condense.stages.condensation import CondenseRecipe, image_lr
from tests.conftest import FAST, run_config

SHORT = [*FAST, "ipc=1", "network.width=16", "iterations=4", "stage=condense", "lr_img=0.2"]


def lr_at(schedule: str, it: int, iterations: int = 4) -> float:
    recipe = CondenseRecipe.of_run(
        run_config([*SHORT, f"lr_img_schedule={schedule}", f"iterations={iterations}"])
    )
    return image_lr(recipe, it)


def test_each_schedule_gives_its_hand_computed_rate() -> None:
    assert [lr_at("constant", it) for it in range(4)] == [0.2] * 4
    # cosine over 4 iterations: 0.2 * (1 + cos(pi k / 4)) / 2
    assert [lr_at("cosine", it) for it in range(4)] == pytest.approx([0.2, 0.17071068, 0.1, 0.02928932])
    # step: x0.1 from iteration 4 // 2 = 2 on; with 5 iterations, from 2 on as well
    assert [lr_at("step", it) for it in range(4)] == pytest.approx([0.2, 0.2, 0.02, 0.02])
    assert [lr_at("step", it, iterations=5) for it in range(5)] == pytest.approx([0.2, 0.2, 0.02, 0.02, 0.02])


def test_a_run_steps_its_images_at_the_scheduled_rate(tmp_path: Path) -> None:
    """The history records the rate each iteration used; a constant run's optimizer is untouched
    (its rate is lr_img itself), and the schedule changes the set."""
    cosine = run(run_config([*SHORT, "lr_img_schedule=cosine"], tmp_path / "cosine"))
    constant = run(run_config(SHORT, tmp_path / "constant"))
    expected = [0.2 * 0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(4)]
    assert [h["lr_img"] for h in cosine["history"]] == pytest.approx(expected, rel=1e-12)
    assert [h["lr_img"] for h in constant["history"]] == [0.2] * 4
    a = load_synthetic(tmp_path / "cosine" / "synthetic.safetensors").images
    b = load_synthetic(tmp_path / "constant" / "synthetic.safetensors").images
    assert not torch.equal(a, b)
    card = json.loads((tmp_path / "cosine" / "metrics.json").read_text())["protocol_card"]
    assert card["lr_img"] == "0.2 (cosine)"


def test_an_unknown_schedule_is_refused_in_one_line() -> None:
    from condense.app.validation import validate

    with pytest.raises(
        ConfigError, match="lr_img_schedule=linear is unknown: use one of constant, cosine, step"
    ):
        validate(run_config([*SHORT, "lr_img_schedule=linear"]))
