"""The inter-class level's batching as the paper's inter-class.py draws it (matching.batching=
loader): loaders walked epoch by epoch, their position carried across iterations and resumes."""

from __future__ import annotations

import torch

from condense.primitives.dataset import load_dataset
from condense.primitives.seeding import EpochWalk
from tests.conftest import FAST, run_config, start_condenser

CPU = torch.device("cpu")
LOADER = [
    *FAST,
    "matching=inter",
    "matching.batching=loader",
    "ipc=10",
    "batch_train=64",  # 100 synthetic images > 64: the loader's batches are proper subsets
    "batch_real=32",
    "network.width=16",
    "step_policy=fixed",
    "step_policy.outer_loop=2",
    "step_policy.inner_epochs=1",
]


def test_an_epoch_walk_visits_every_index_once_per_epoch_and_reshuffles() -> None:
    walk = EpochWalk(0, "test", size=10, batch=4)
    first = [walk.next_batch() for _ in range(3)]
    assert [len(b) for b in first] == [4, 4, 2]  # the last batch of an epoch is short
    assert sorted(torch.cat(first).tolist()) == list(range(10))
    assert walk.position() == [1, 0]
    second = torch.cat([walk.next_batch() for _ in range(3)])
    assert sorted(second.tolist()) == list(range(10)) and not torch.equal(second, torch.cat(first))
    resumed = EpochWalk(0, "test", size=10, batch=4, epoch=1, offset=4)
    assert torch.equal(resumed.next_batch(), second[4:8])


def images_after(cfg_overrides: list[str], iterations: int, resume_at: int | None = None) -> torch.Tensor:
    cfg = run_config(cfg_overrides)
    data = load_dataset(cfg.dataset)
    run = start_condenser(cfg, data)
    for it in range(iterations):
        if it == resume_at:  # a fresh process would start here from the checkpointed state
            state = run.state(it)
            run = start_condenser(cfg, data)
            run.restore(state)
        run.iteration(it)
    return run.images.detach().clone()


def test_loader_batching_resumes_exactly_where_it_stopped() -> None:
    straight = images_after(LOADER, 3)
    resumed = images_after(LOADER, 3, resume_at=2)
    assert torch.equal(straight, resumed)


def test_loader_batching_walks_the_synthetic_set_in_batches_of_batch_train() -> None:
    cfg = run_config(LOADER)
    run = start_condenser(cfg, load_dataset(cfg.dataset))
    run.iteration(0)
    # two outer steps, each one synthetic batch of 64 from a walk over 100 images
    assert run.stats.walks["inter_syn"] == [1, 0]  # 64 + 36: one epoch done
    assert run.stats.passes.syn_images == 64 + 36
    assert run.stats.walks["inter_real"] == [0, 2 * 4 * 32]
    iid = run_config([o for o in LOADER if o != "matching.batching=loader"])
    plain = start_condenser(iid, load_dataset(iid.dataset))
    plain.iteration(0)
    assert plain.stats.walks == {} and plain.stats.passes.syn_images == 2 * 100
