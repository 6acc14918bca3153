"""Each preset family runs the protocol of the code its published numbers came from.

The table pins, per family, the values the two published codes differ on, with where each value
stands in that code (VICO-UoE/DatasetCondensation for DC and DSA, ZixuanJiang/
improved-dataset-condensation for the paper); docs/protocols.md gives the same table in prose.
"""

from __future__ import annotations

from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F

from condense.app.card import protocol_card
from condense.app.labels import set_label
from condense.method.distance import COSINES, gradient_distance
from condense.schema import DistanceConfig, EvaluationConfig, to_container
from condense.stages.evaluation import SCHEDULES, evaluation_optimizer
from tests.conftest import run_config

DC_CIFAR10_STD = [0.2023, 0.1994, 0.2010]  # DC utils.py:50-51
PAPER_CIFAR10_STD = [0.2470, 0.2435, 0.2616]  # the paper's utils.py:50-51


class Published(NamedTuple):
    """One preset family's values where the two published codes differ."""

    overrides: list[str]
    label: str
    # DC main.py:139 at 5e8906a, DC's paper (0.5) / main.py:150 since DSA's e9d935b (none) / the
    # paper's baseline.py:137, multi-level.py:137 (0.5)
    momentum_net: float
    init: str  # DSA readme: --init real
    cosine: str  # DC utils.py:233 / the paper's utils.py:196-197
    schedule: str  # DC utils.py:343-355 / the paper's utils.py:324-334
    epochs: int  # evaluation epochs as run
    cifar10_std: list[float]
    lr_img: float  # DC readme:28 / the paper's README: 0.01 on an MLP


DC = {"cosine": "dc", "schedule": "dc_restart", "cifar10_std": DC_CIFAR10_STD, "lr_img": 0.1}


def paper(overrides: list[str], label: str, lr_img: float = 0.1) -> Published:
    """A family of the paper's code: momentum 0.5, noise init, its cosine, MultiStepLR, 300 epochs."""
    return Published(overrides, label, 0.5, "noise", "torch", "multistep", 300, PAPER_CIFAR10_STD, lr_img)


PUBLISHED = {
    "DC published": Published(["experiment=dc_published", "method=dc"], "dc", 0.5, "noise", epochs=301, **DC),
    "DC since DSA": Published(["method=dc", "protocol=dc"], "dc+protocol=dc", 0.0, "noise", epochs=301, **DC),
    "DSA published": Published(
        ["experiment=dsa_published", "method=dsa"], "dsa", 0.0, "real", epochs=1001, **DC
    ),
    "DM published": Published(
        ["experiment=dm_published", "method=dm"], "dm", 0.0, "real", epochs=1001, **{**DC, "lr_img": 1.0}
    ),
    "paper, DC row": paper(["experiment=table3_ablation", "method=dc_paper"], "dc_paper"),
    "paper, Ours-MDA": paper(["experiment=table3_ablation", "method=ours_mda"], "ours_mda"),
    "paper, Table 1": paper(["experiment=table1_matching", "matching=inter"], "dc_paper+matching=inter"),
    "paper, Table 2": paper(
        ["experiment=table2_distance", "matching=multilevel", "distance=angle_magnitude"], "ours_md"
    ),
    "paper, Table 4 on an MLP": paper(
        ["experiment=table4_cross_arch", "network=mlp", "method=ours_mda"], "ours_mda", lr_img=0.01
    ),
}


@pytest.mark.parametrize("family", PUBLISHED)
def test_each_preset_family_runs_its_published_protocol(family: str) -> None:
    row = PUBLISHED[family]
    cfg = run_config([*row.overrides, "dataset=cifar10"])
    assert set_label(to_container(cfg)) == row.label
    assert (cfg.momentum_net, cfg.momentum_img, cfg.init.name) == (row.momentum_net, 0.5, row.init)
    assert (cfg.distance.cosine, cfg.evaluation.schedule) == (row.cosine, row.schedule)
    # the paper's inter-class level walks loaders (inter-class.py:94-96, 167-181); DC has none
    assert cfg.matching.batching == ("loader" if row.cosine == "torch" else "iid")
    assert SCHEDULES[cfg.evaluation.schedule](cfg.evaluation.epochs)[0] == row.epochs
    assert cfg.dataset.std == pytest.approx(row.cifar10_std) and cfg.lr_img == row.lr_img
    card = protocol_card(cfg, {"matching": "fp32", "inner": "fp32", "evaluation": "fp32"})
    assert card["momentum"].startswith(f"net {row.momentum_net}") and card["cosine"] == row.cosine


def test_each_protocol_pins_its_values() -> None:
    """(momentum_net, cosine, inter-class batching, evaluation schedule) per protocol, and the
    protocol each condensing preset runs (docs/protocols.md, "The presets")."""
    pinned = {
        "dc_2021": (0.5, "dc", "iid", "dc_restart"),
        "dc": (0.0, "dc", "iid", "dc_restart"),
        "paper": (0.5, "torch", "loader", "multistep"),
    }
    for name, values in pinned.items():
        cfg = run_config([f"protocol={name}"])
        got = (cfg.momentum_net, cfg.distance.cosine, cfg.matching.batching, cfg.evaluation.schedule)
        assert (cfg.protocol.name, got) == (name, values)
    by_method = {"dc": "dc_2021", "dsa": "dc", "dm": "dc", "dcc": "dc", "dsac": "dc", "idm": "dc"}
    by_method |= dict.fromkeys(("dc_paper", "ours_m", "ours_md", "ours_mda"), "paper")
    for method, protocol in by_method.items():
        assert run_config([f"method={method}"]).protocol.name == protocol, method


def test_a_command_line_value_beats_the_protocol() -> None:
    cfg = run_config(["method=ours_mda", "momentum_net=0.2", "distance.cosine=dc"])
    assert (cfg.momentum_net, cfg.distance.cosine, cfg.protocol.name) == (0.2, "dc", "paper")


def lr_and_momentum_by_epoch(schedule: str, epochs: int) -> list[tuple[float, bool]]:
    """(lr, whether momentum state survives) per epoch, replaying train_and_test's schedule."""
    net = torch.nn.Linear(2, 2)
    ev = EvaluationConfig(schedule=schedule, epochs=epochs)
    total, drop_after, restart = SCHEDULES[schedule](epochs)
    opt = evaluation_optimizer(net, ev, ev.lr)
    seen = []
    for epoch in range(total):
        net(torch.ones(1, 2)).sum().backward()
        opt.step()
        seen.append((opt.param_groups[0]["lr"], bool(opt.state)))
        if epoch == drop_after:
            opt = evaluation_optimizer(net, ev, ev.lr * 0.1, keep=None if restart else opt)
    return seen


def test_multistep_schedule_is_torchs_multisteplr_at_half_way() -> None:
    epochs = 10
    net = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[epochs // 2], gamma=0.1)
    expected = []
    for _ in range(epochs):
        expected.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert [lr for lr, _ in lr_and_momentum_by_epoch("multistep", epochs)] == expected


def test_dc_restart_schedule_trains_one_more_epoch_and_restarts_the_optimizer() -> None:
    """DC's evaluate_synset at Epoch=10: epochs 0..6 at lr, then a fresh optimizer at lr/10 for
    epochs 7..10 (its momentum buffer starts empty: state is filled again by the first step)."""
    seen = lr_and_momentum_by_epoch("dc_restart", 10)
    assert len(seen) == 11
    assert [lr for lr, _ in seen] == [0.01] * 7 + [0.01 * 0.1] * 4
    net = torch.nn.Linear(2, 2)
    ev = EvaluationConfig(schedule="dc_restart")
    old = evaluation_optimizer(net, ev, 0.01)
    net(torch.ones(1, 2)).sum().backward()
    old.step()
    assert old.state and not evaluation_optimizer(net, ev, 0.001).state


def test_the_two_cosines_are_the_two_codes_formulas() -> None:
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 7, generator=gen), torch.randn(5, 7, generator=gen)
    dot = (a * b).sum(-1)
    assert torch.allclose(COSINES["dc"](a, b, 1e-6), dot / (a.norm(dim=-1) * b.norm(dim=-1) + 1e-6))
    assert torch.equal(COSINES["torch"](a, b, 1e-6), F.cosine_similarity(a, b, dim=-1, eps=1e-8))
    # They part where the norms are tiny: DC's eps shrinks the cosine, torch's clamp does not.
    tiny = 1e-4 * a
    assert COSINES["torch"](tiny, tiny, 1e-6)[0] == pytest.approx(1.0)
    assert COSINES["dc"](tiny, tiny, 1e-6)[0] < 0.999
    syn, real = [a.reshape(5, 7, 1, 1)], [b.reshape(5, 7, 1, 1)]
    for name in ("dc", "angle_magnitude"):
        dc_form = gradient_distance(syn, real, DistanceConfig(name=name, cosine="dc"))
        torch_form = gradient_distance(syn, real, DistanceConfig(name=name, cosine="torch"))
        assert float(dc_form) == pytest.approx(float(torch_form), rel=1e-5)
