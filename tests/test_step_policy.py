"""Step policies give the documented counts; `overfit` stops when the monitored loss rises."""

from __future__ import annotations

import pytest
import torch

from condense.method.step_policy import (
    dc_inner_epochs,
    max_inner_epochs,
    outer_loop,
)
from condense.primitives.network import build_network
from condense.schema import NetworkConfig, StepPolicyConfig
from condense.stages.condensation import train_inner
from tests.conftest import run_config


@pytest.mark.parametrize(
    "ipc,outer,inner",
    [(1, 1, 1), (10, 10, 50), (20, 20, 25), (30, 30, 20), (40, 40, 15), (50, 50, 10)],
)
def test_dc_table(ipc: int, outer: int, inner: int) -> None:
    cfg = StepPolicyConfig(name="dc")
    assert outer_loop(cfg, ipc) == outer
    if ipc > 1:
        assert max_inner_epochs(cfg, ipc, 0) == inner


def test_dc_table_extends_to_every_ipc() -> None:
    assert [dc_inner_epochs(i) for i in (2, 5, 15, 25, 45, 60, 100)] == [50, 50, 38, 22, 12, 10, 10]
    assert outer_loop(StepPolicyConfig(name="dc"), 7) == 7
    assert outer_loop(StepPolicyConfig(name="dc"), 80) == 50


def planned_epochs_per_iteration(cfg: StepPolicyConfig, ipc: int) -> int:
    """Inner epochs one iteration spends as the stage runs it: every outer step but the last
    trains max_inner_epochs (an upper bound for `overfit`)."""
    return sum(max_inner_epochs(cfg, ipc, ol) for ol in range(outer_loop(cfg, ipc) - 1))


def test_epochs_per_iteration_match_the_paper() -> None:
    dc, sched = StepPolicyConfig(name="dc"), run_config(["step_policy=schedule"]).step_policy
    assert planned_epochs_per_iteration(dc, 10) == 450
    assert planned_epochs_per_iteration(sched, 10) == 190
    assert planned_epochs_per_iteration(dc, 50) == 490
    assert planned_epochs_per_iteration(sched, 50) == 395
    assert planned_epochs_per_iteration(dc, 1) == planned_epochs_per_iteration(sched, 1) == 0


def test_fixed_policy_uses_its_counts() -> None:
    cfg = StepPolicyConfig(name="fixed", outer_loop=3, inner_epochs=7)
    assert outer_loop(cfg, 10) == 3 and planned_epochs_per_iteration(cfg, 10) == 14


def _net_and_data():
    net = build_network(NetworkConfig(width=8, depth=1), (1, 8, 8), 2, 0, torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(8, 1, 8, 8, generator=gen)
    labels = torch.tensor([0, 1] * 4)
    return net, images, labels


def test_overfit_stops_when_monitored_loss_rises() -> None:
    cfg = run_config(["step_policy=overfit", "batch_train=8", "lr_net=0.5"])
    net, images, labels = _net_and_data()
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    # The monitor batch holds the same images with the opposite labels: every epoch that fits
    # the synthetic set raises the monitored loss, so the rule stops after the first epoch.
    epochs, steps = train_inner(
        net,
        opt,
        images,
        labels,
        50,
        cfg.batch_train,
        torch.Generator().manual_seed(1),
        (images, 1 - labels),
        cfg.step_policy.monitor_mode,
        None,
    )
    assert epochs == 1 and steps == 1


def test_overfit_runs_to_cap_while_monitored_loss_falls() -> None:
    cfg = run_config(["step_policy=overfit", "batch_train=8"])
    net, images, labels = _net_and_data()
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    gen, mode = torch.Generator().manual_seed(1), cfg.step_policy.monitor_mode
    epochs, _ = train_inner(net, opt, images, labels, 5, cfg.batch_train, gen, (images, labels), mode, None)
    assert epochs == 5


def test_no_step_policy_acts_at_ipc_1(tmp_path) -> None:
    """At IPC 1 outer_loop is 1: DC's table and the schedule give the very same synthetic set."""
    from condense.app.cli import run
    from condense.primitives.synthetic import load_synthetic

    base = [
        "logger=none",
        "progress=false",
        "device=cpu",
        "precision=fp32",
        "ipc=1",
        "iterations=3",
        "network.width=16",
        "stage=condense",
        "method=ours_md",
    ]
    run(run_config(base, tmp_path / "md"))
    run(run_config([*base, "step_policy=schedule"], tmp_path / "mda"))
    a = load_synthetic(tmp_path / "md" / "synthetic.safetensors").images
    b = load_synthetic(tmp_path / "mda" / "synthetic.safetensors").images
    assert torch.equal(a, b)
