"""The synthetic-set file: round trip, no code execution, clear refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from condense.primitives.synthetic import (
    SyntheticSet,
    check_compatible,
    load_synthetic,
    save_grid,
    save_synthetic,
)
from condense.schema import ConfigError


def make_set() -> SyntheticSet:
    images = torch.randn(20, 1, 8, 8)
    labels = torch.arange(10).repeat_interleave(2)
    return SyntheticSet(images, labels, "digits", [0.3], [0.4], {"ipc": 2})


def test_round_trip(tmp_path: Path) -> None:
    syn = make_set()
    save_synthetic(syn, tmp_path / "s.safetensors")
    back = load_synthetic(tmp_path / "s.safetensors")
    assert torch.equal(back.images, syn.images) and torch.equal(back.labels, syn.labels)
    assert (back.dataset, back.mean, back.std, back.config, back.ipc) == (
        "digits",
        [0.3],
        [0.4],
        {"ipc": 2},
        2,
    )


def test_grid_png(tmp_path: Path) -> None:
    save_grid(make_set(), tmp_path / "grid.png")
    assert (tmp_path / "grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_truncated_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "s.safetensors"
    save_synthetic(make_set(), path)
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(ConfigError, match="corrupted"):
        load_synthetic(path)


def test_pickle_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "s.safetensors"
    torch.save({"images": torch.zeros(1)}, path)
    with pytest.raises(ConfigError, match="corrupted"):
        load_synthetic(path)


def test_mismatched_dataset_and_shape_are_refused() -> None:
    syn = make_set()
    with pytest.raises(ConfigError, match="dataset=digits"):
        check_compatible(syn, "fashion_mnist", (1, 28, 28), 10)
    with pytest.raises(ConfigError, match="shape"):
        check_compatible(syn, "digits", (1, 28, 28), 10)
    check_compatible(syn, "digits", (1, 8, 8), 10)
