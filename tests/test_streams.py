"""Independent random streams and paired evaluation: switching one purpose on never shifts
another's draws, nothing touches the global RNG, and every set meets the same evaluated models."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from condense.app.cli import run
from condense.primitives.dataset import load_dataset
from condense.primitives.network import build_network
from condense.schema import NetworkConfig
from condense.stages import evaluation
from condense.stages.evaluation import ModelStreams
from tests.conftest import TINY_RUN, run_config, start_condenser

CPU = torch.device("cpu")


def real_batches_drawn(extra: list[str]) -> list[torch.Tensor]:
    """Every real batch one condensation iteration draws for matching, in order (BatchNorm's
    statistics pass draws bn_real_per_class images a class through the same sampler: not these)."""
    cfg = run_config([*TINY_RUN, *extra])
    run_ = start_condenser(cfg, load_dataset(cfg.dataset))
    drawn: list[torch.Tensor] = []
    of_class = run_.real.of_class

    def recording(c: int, n: int, gen: torch.Generator) -> torch.Tensor:
        batch = of_class(c, n, gen)
        if n == cfg.batch_real:
            drawn.append(batch)
        return batch

    run_.real.of_class = recording  # type: ignore[method-assign]
    run_.iteration(0)
    return drawn


@pytest.mark.parametrize(
    "switched_on",
    [["augment=dsa"], ["step_policy.inner_epochs=3"], ["network=convnet_bn"], ["step_policy=overfit"]],
    ids=["dsa", "inner_epochs", "batchnorm", "overfit_monitor"],
)
def test_switching_a_purpose_on_leaves_the_real_batches_alone(switched_on: list[str]) -> None:
    """DSA seeds, inner-loop shuffles, BatchNorm statistics and the overfitting monitor each draw
    from their own stream, so the real batches matched in the first outer step stay the same."""
    plain, other = real_batches_drawn([]), real_batches_drawn(switched_on)
    first_step = 10  # one batch per class
    assert len(plain) >= first_step and len(other) >= first_step
    for a, b in zip(plain[:first_step], other[:first_step], strict=True):
        assert torch.equal(a, b)


def test_building_a_network_never_touches_the_global_rng() -> None:
    before = torch.random.get_rng_state()
    a = build_network(NetworkConfig(width=8), (1, 8, 8), 10, 3, CPU)
    assert torch.equal(torch.random.get_rng_state(), before)
    built: list[torch.nn.Module] = []
    threads = [
        threading.Thread(
            target=lambda: built.append(build_network(NetworkConfig(width=8), (1, 8, 8), 10, 3, CPU))
        )
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for net in built:  # side by side in threads, with no lock: the same weights from the same seed
        assert all(
            torch.equal(x, y) for x, y in zip(a.state_dict().values(), net.state_dict().values(), strict=True)
        )
    other = build_network(NetworkConfig(width=8), (1, 8, 8), 10, 4, CPU)
    assert not torch.equal(a.state_dict()["classifier.weight"], other.state_dict()["classifier.weight"])


def initial_weights_by_set(monkeypatch: pytest.MonkeyPatch) -> list[torch.Tensor]:
    """Records the initial weights of every evaluated model, in the order they are built."""
    built: list[torch.Tensor] = []
    lock = threading.Lock()
    real_build = evaluation.build_network

    def recording(*args: object, **kwargs: object) -> torch.nn.Module:
        net = real_build(*args, **kwargs)  # type: ignore[arg-type]
        with lock:
            built.append(torch.cat([p.detach().flatten() for p in net.parameters()]))
        return net

    monkeypatch.setattr(evaluation, "build_network", recording)
    return built


def test_every_set_of_a_run_meets_the_same_evaluated_models(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    built = initial_weights_by_set(monkeypatch)
    overrides = [*TINY_RUN, "iterations=1", "evaluation.num_models=2", "evaluation.epochs=2"]
    run(run_config(overrides, tmp_path / "dc"))
    run(run_config([*overrides, "method=ours_m"], tmp_path / "ours_m"))
    assert len(built) == 8  # two runs x (condensed set, random subset) x two models
    dc_set, dc_random, ours_set, ours_random = built[0:2], built[2:4], built[4:6], built[6:8]
    for m in range(2):  # model m: the same initial weights for every set, in both runs
        assert torch.equal(dc_set[m], dc_random[m])
        assert torch.equal(dc_set[m], ours_set[m]) and torch.equal(dc_set[m], ours_random[m])
    assert not torch.equal(dc_set[0], dc_set[1])  # different models differ


def test_model_streams_depend_on_seed_architecture_and_index_only() -> None:
    a, b = ModelStreams(0, "ConvNet", 1), ModelStreams(0, "ConvNet", 1)
    assert a.init == b.init and torch.equal(
        torch.randperm(50, generator=a.order()), torch.randperm(50, generator=b.order())
    )
    others = [ModelStreams(1, "ConvNet", 1), ModelStreams(0, "MLP", 1), ModelStreams(0, "ConvNet", 2)]
    assert len({a.init, *(o.init for o in others)}) == 4
    # order and augmentation are separate streams of the same model
    assert not torch.equal(torch.randperm(50, generator=a.order()), torch.randperm(50, generator=a.augment()))


def test_random_method_evaluates_the_subset_other_runs_compare_to(tmp_path: Path) -> None:
    overrides = [*TINY_RUN, "iterations=1", "evaluation.num_models=1", "evaluation.epochs=2"]
    dc = run(run_config(overrides, tmp_path / "dc"))
    rand = run(run_config([*overrides, "method=random"], tmp_path / "random"))
    assert (
        rand["evaluation"]["random"]["ConvNet"]["accuracies"]
        == dc["evaluation"]["random"]["ConvNet"]["accuracies"]
    )
