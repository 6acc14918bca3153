"""Shared helpers: compose real Hydra configs with the compose API, into a test's own folder."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig

from condense.app import cli
from condense.app.cli import CONFIG_PATH
from condense.method.distance import matched_parameters
from condense.method.matching import MatchSetup, MatchStep, class_major_labels
from condense.primitives.compute import Compute
from condense.primitives.dataset import Dataset, fashion_mnist_available
from condense.primitives.network import build_network
from condense.schema import DistanceConfig, NetworkConfig, RunConfig, to_run_config
from condense.stages.condensation import Condenser, CondenseRecipe

CONF_DIR = Path(CONFIG_PATH)
# precision=fp32 unless a test forces bf16: no test may depend on what `auto` picks on its host.
FAST = ["logger=none", "progress=false", "device=cpu", "precision=fp32"]
# Tests of accuracy, determinism, resume and fast-vs-straightforward run under both precisions.
# bf16 is emulated (several times slower) on CPUs without AMX / AVX512-BF16: keep its cases tiny.
BOTH_PRECISIONS = pytest.mark.parametrize("precision", ["fp32", "bf16"])
# The smallest real budget on digits at which a condensed set reliably beats a random subset.
BEATS_RANDOM_BUDGET = [
    "ipc=2",
    "iterations=40",
    "network.width=32",
    "evaluation.num_models=3",
    "evaluation.epochs=150",
]

needs_fashion_mnist = pytest.mark.skipif(
    not fashion_mnist_available(),
    reason="Fashion-MNIST files not found: run `apt-get install dataset-fashion-mnist` "
    "(or set dataset.root to torchvision's FashionMNIST folder)",
)


def condense_command(
    *args: str, cwd: Path, timeout: int = 300, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """The real `condense` command (python -m condense) in a subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "condense", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def condense_in_process(*args: str, monkeypatch: pytest.MonkeyPatch) -> int:
    """The `condense` command's Hydra app run in this process (seconds cheaper than a subprocess,
    for refusals that end before any work): its exit status; read its output with capsys."""
    from condense.app import cli

    monkeypatch.setattr(sys, "argv", ["condense", *args])
    try:
        cli.main()
    except SystemExit as done:
        return done.code if isinstance(done.code, int) else 1
    return 0


@cache
def _composed(overrides: tuple[str, ...]) -> DictConfig:
    return cli.compose_config(list(overrides))


def compose_config(overrides: list[str], output_dir: Path | None = None) -> DictConfig:
    """The composed DictConfig, as the `condense` command would see it. Hydra composes each list
    of overrides once per test session (as lightning-hydra-template's package-scoped configs);
    every test gets its own copy, pointed at its own folder."""
    cfg = copy.deepcopy(_composed(tuple(overrides)))
    if output_dir is not None:
        cfg.output_dir = str(output_dir)
    return cfg


@pytest.fixture(autouse=True, scope="session")
def own_share_of_the_cores() -> None:
    """Under pytest-xdist (pyproject's `-n 2`) the workers split the cores: two workers of two
    threads each would oversubscribe a 2-core host, which slows torch many times over.
    Subprocesses inherit the share through OMP_NUM_THREADS."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        share = max(1, (cores or 1) // workers)
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[name] = str(share)
        torch.set_num_threads(share)


@pytest.fixture(autouse=True, scope="session")
def own_precision_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """precision=auto's measured ratios go to a cache of the test session's own (subprocesses
    inherit it), never the user's ~/.cache/condense."""
    os.environ["CONDENSE_CACHE"] = str(tmp_path_factory.mktemp("condense_cache"))


def run_config(overrides: list[str], output_dir: Path | None = None) -> RunConfig:
    return to_run_config(compose_config(overrides, output_dir))


def start_condenser(cfg: RunConfig, data: Dataset, device: str = "cpu") -> Condenser:
    """The condense stage at iteration 0, as a run of `cfg` starts it (its recipe, its compute)."""
    return Condenser.start(CondenseRecipe.of_run(cfg), Compute.for_run(cfg, torch.device(device)), data)


# The tiny problem: digits, 2 images per class, a width-16 ConvNet; a test adds its own on top.
TINY = [*FAST, "ipc=2", "network.width=16"]
# A few-second end-to-end budget on it. It fixes the loop counts (step_policy=fixed), so its set is
# DC's matching with another step policy, and named so: a label names every choice that differs
# from a preset.
TINY_RUN = [
    *TINY,
    "budget=none",  # the values below are its scale (no seed list under -m)
    "iterations=2",
    "evaluation.num_models=1",
    "evaluation.epochs=5",
    "step_policy=fixed",
    "step_policy.outer_loop=2",
    "step_policy.inner_epochs=1",
]
TINY_LABEL = "dc+step_policy=fixed"


def tiny_mtt(root: Path, *more: str) -> list[str]:
    """A few-second MTT on digits: 2 experts of 3 epochs on a narrow ConvNet, 2 student steps."""
    return [
        *FAST,
        "method=mtt",
        "ipc=1",
        "network.width=16",
        f"experts.root={root}",
        "experts.num=2",
        "experts.epochs=3",
        "matching.syn_steps=2",
        "matching.expert_epochs=1",
        "matching.max_start_epoch=2",
        "lr_img=10",
        "iterations=3",
        "evaluation.num_models=1",
        "augment.eval_epochs=3",
        *more,
    ]


def small_match_step(
    ipc: int = 2,
    classes: int = 3,
    real_per_class: int = 6,
    net_seed: int = 0,
    data_seed: int = 0,
    dtype: torch.dtype = torch.float32,
    norm: str = "instance",
    iterations: int = 1,
    **step: int,
) -> MatchStep:
    """A matching step on 8x8 random images and a depth-2 ConvNet of width 8: real batches are
    fixed per class, synthetic images require grad; `step` sets MatchStep's counters (iteration,
    outer_step), `iterations` the setup's."""
    shape = NetworkConfig(width=8, depth=2, norm=norm)
    net = build_network(shape, (1, 8, 8), classes, net_seed, torch.device("cpu")).to(dtype)
    gen = torch.Generator().manual_seed(data_seed)
    real = torch.randn(classes, real_per_class, 1, 8, 8, generator=gen, dtype=dtype)
    syn = torch.randn(classes * ipc, 1, 8, 8, generator=gen, dtype=dtype, requires_grad=True)
    labels = class_major_labels(classes, ipc, torch.device("cpu"))
    setup = MatchSetup(syn, labels, ipc, classes, DistanceConfig(), iterations=iterations)
    return MatchStep(
        setup=setup,
        net=net,
        params=matched_parameters(net, DistanceConfig()),
        real_by_class=lambda c: real[c],
        real_mixed=lambda: (real.flatten(0, 1), torch.arange(classes).repeat_interleave(real_per_class)),
        augment_generator=gen,
        order_generator=gen,
        **{"iteration": 0, **step},  # type: ignore[arg-type]
    )
