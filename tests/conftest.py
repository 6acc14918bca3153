"""Shared helpers: compose real Hydra configs with the compose API, into a test's own folder."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from condense import cli
from condense.cli import CONFIG_PATH
from condense.config import RunConfig, to_run_config
from condense.dataset import fashion_mnist_available

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


def condense_command(*args: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    """The real `condense` command (python -m condense) in a subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "condense", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


def compose_config(overrides: list[str], output_dir: Path | None = None):
    """The composed DictConfig, as the `condense` command would see it."""
    extra = [f"output_dir={output_dir}"] if output_dir is not None else []
    return cli.compose_config([*overrides, *extra])


def run_config(overrides: list[str], output_dir: Path | None = None) -> RunConfig:
    return to_run_config(compose_config(overrides, output_dir))


@pytest.fixture
def tiny_overrides() -> list[str]:
    """A few-second end-to-end budget on digits."""
    return [
        *FAST,
        "iterations=2",
        "ipc=2",
        "network.width=16",
        "evaluation.num_models=1",
        "evaluation.epochs=5",
        "step_policy=fixed",
        "step_policy.outer_loop=2",
        "step_policy.inner_epochs=1",
    ]
