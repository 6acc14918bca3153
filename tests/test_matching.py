"""Matching levels: the multi-level inter-class term reuses per-class gradients correctly."""

from __future__ import annotations

import torch

from condense.method.distance import gradient_distance, matched_parameters
from condense.method.matching import MatchStep, class_mean, loss_gradient, matching_loss
from condense.primitives.network import build_network
from condense.schema import DistanceConfig, MatchingConfig, NetworkConfig
from tests.conftest import small_match_step

CPU = torch.device("cpu")


def test_class_mean_gradient_equals_class_balanced_batch_gradient() -> None:
    net = build_network(NetworkConfig(width=16, norm="instance"), (1, 28, 28), 4, 0, CPU).double()
    params = matched_parameters(net, DistanceConfig(parameters="all"))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 1, 28, 28, generator=gen, dtype=torch.float64)  # 4 classes x 3 images
    per_class = [loss_gradient(net, params, x[c], torch.full((3,), c), create_graph=False) for c in range(4)]
    batch = loss_gradient(
        net,
        params,
        x.reshape(12, 1, 28, 28),
        torch.arange(4).repeat_interleave(3),
        create_graph=False,
    )
    for mean_g, batch_g in zip(class_mean(per_class), batch, strict=True):
        torch.testing.assert_close(mean_g, batch_g, rtol=1e-10, atol=1e-12)


def make_step(ipc: int = 2, classes: int = 3, seed: int = 0) -> MatchStep:
    return small_match_step(ipc, classes, net_seed=seed, data_seed=seed)


def test_multilevel_is_intra_plus_c_times_class_mean_distance() -> None:
    step = make_step()
    intra = matching_loss(step, MatchingConfig(name="intra"))
    multi = matching_loss(step, MatchingConfig(name="multilevel"))
    g_syn, g_real = [], []
    for c in range(3):
        y = torch.full((2,), c)
        syn = step.setup.syn_images[2 * c : 2 * c + 2]
        g_syn.append(loss_gradient(step.net, step.params, syn, y, True))
        g_real.append(loss_gradient(step.net, step.params, step.real_by_class(c), torch.full((6,), c), False))
    inter = gradient_distance(class_mean(g_syn), class_mean(g_real), step.setup.distance)
    torch.testing.assert_close(multi, intra + 3 * inter)
    assert float(inter.detach()) > 0


def test_multilevel_spends_no_extra_passes() -> None:
    a, b = make_step(), make_step()
    matching_loss(a, MatchingConfig(name="intra"))
    matching_loss(b, MatchingConfig(name="multilevel"))
    assert a.setup.counter == b.setup.counter and a.setup.counter.real_passes == 3


def test_interleaved_alternates_levels() -> None:
    even, odd = make_step(), make_step()
    odd.iteration = 1
    torch.testing.assert_close(
        matching_loss(even, MatchingConfig(name="interleaved")),
        matching_loss(make_step(), MatchingConfig(name="intra")),
    )
    matching_loss(odd, MatchingConfig(name="interleaved"))
    assert odd.setup.counter.real_passes == 1 and odd.setup.counter.real_images == 18


def test_every_level_sends_gradient_to_the_images() -> None:
    for name in ("intra", "inter", "interleaved", "multilevel"):
        step = make_step()
        loss = matching_loss(step, MatchingConfig(name=name))
        (grad,) = torch.autograd.grad(loss, step.setup.syn_images)
        assert grad.abs().sum() > 0, name
