"""Coreset selection on constructed point sets."""

from __future__ import annotations

from pathlib import Path

import torch

from condense.app.cli import run
from condense.method.coreset import ForgettingEvents, herding_order, kcenter_order, most_forgotten
from condense.primitives.dataset import Split
from tests.conftest import run_config


def test_herding_picks_the_greedy_mean_matching_sequence() -> None:
    # Mean of the set is (0, 0). The first pick is the point nearest the mean; the second pick
    # brings the running mean of two picks closest to (0, 0).
    points = torch.tensor([[0.1, 0.0], [4.0, 4.0], [-1.0, 0.0], [1.0, 0.0], [-4.1, -4.0]])
    points -= points.mean(dim=0)
    order = herding_order(points, 3)
    assert order[0] == int((points).norm(dim=1).argmin())
    brute = []
    total = torch.zeros(2)
    for step in range(1, 4):
        best = min(
            (i for i in range(5) if i not in brute),
            key=lambda i: float(((total + points[i]) / step - points.mean(0)).norm()),
        )
        brute.append(best)
        total += points[best]
    assert order == brute


def test_kcenter_covers_the_clusters() -> None:
    centers = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    gen = torch.Generator().manual_seed(0)
    points = torch.cat([c + 0.1 * torch.randn(20, 2, generator=gen) for c in centers])
    chosen = kcenter_order(points, 4)
    assert len(set(chosen)) == 4
    # one pick per cluster: every point lies within 1 of a chosen one
    cover = torch.cdist(points, points[chosen]).min(dim=1).values
    assert float(cover.max()) < 1.0


def test_forgetting_events_count_correct_then_wrong_and_rank_never_learned_first() -> None:
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    events = ForgettingEvents(labels)
    right, wrong = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    # example 0: right, wrong, right, wrong -> 2 events; example 1: right throughout -> 0;
    # example 2: never right -> ranked first; example 3 (class 1): wrong, right, wrong, right -> 1.
    for logits0 in (right, wrong, right, wrong):
        events(torch.tensor([0]), logits0)
        events(torch.tensor([1]), right)
        events(torch.tensor([2]), wrong)
    for logits3 in (right, wrong, right, wrong):  # as seen by class 1: wrong, right, wrong, right
        events(torch.tensor([3]), logits3)
    # class 1 reads [0, 1] as right: example 4 stays right (0 events), example 5 turns wrong (1)
    events(torch.tensor([4, 5]), torch.cat([wrong, wrong]))
    events(torch.tensor([4, 5]), torch.cat([wrong, right]))
    scores = events.scores()
    assert scores.tolist() == [2.0, 0.0, float("inf"), 1.0, 0.0, 1.0]
    split = Split(torch.zeros(6, 1, 2, 2), labels)
    picked = most_forgotten(scores, split, 2, 2, torch.Generator().manual_seed(0))
    assert picked[:2].tolist() == [2, 0]  # class 0: never learned, then the twice forgotten
    assert set(picked[2:].tolist()) == {3, 5}  # class 1: the two forgotten once


def test_herding_and_kcenter_runs_select_real_images(tmp_path: Path) -> None:
    from condense.primitives.dataset import load_dataset
    from condense.primitives.synthetic import load_synthetic

    data = load_dataset(run_config([]).dataset)
    for method in ("herding", "kcenter", "forgetting"):
        overrides = [
            "logger=none",
            "progress=false",
            "device=cpu",
            "precision=fp32",
            f"method={method}",
            "ipc=3",
            "network.width=16",
            "evaluation.num_models=1",
            "evaluation.epochs=3",
        ]
        metrics = run(run_config(overrides, tmp_path / method))
        syn = load_synthetic(tmp_path / method / "synthetic.safetensors")
        assert torch.equal(torch.bincount(syn.labels), torch.full((10,), 3))
        # every selected image is a real training image of its class
        for img, label in zip(syn.images, syn.labels, strict=True):
            match = (data.train.images == img).flatten(1).all(dim=1)
            assert bool(match.any()) and int(data.train.labels[match][0]) == int(label)
        assert set(metrics["evaluation"]) == {method, "random"}
