"""Real data: digits from scikit-learn, Fashion-MNIST from Debian's IDX files."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from condense.primitives.dataset import load_dataset, read_idx, read_idx_splits
from condense.schema import ConfigError
from tests.conftest import TINY_RUN, needs_fashion_mnist, run_config


def test_digits_loads_split_and_normalised() -> None:
    data = load_dataset(run_config([]).dataset)
    assert data.image_shape == (1, 8, 8) and data.num_classes == 10
    assert len(data.train.labels) + len(data.test.labels) == 1797
    assert len(data.test.labels) == 360
    assert torch.bincount(data.train.labels).min() >= 139  # stratified
    assert abs(float(data.train.images.mean())) < 0.05 and abs(float(data.train.images.std()) - 1) < 0.05
    again = load_dataset(run_config(["seed=5"]).dataset)  # the split does not follow the run seed
    assert torch.equal(data.test.images, again.test.images)


@needs_fashion_mnist
def test_fashion_mnist_found_without_settings() -> None:
    data = load_dataset(run_config(["dataset=fashion_mnist", "dataset.root=/nonexistent"]).dataset)
    assert data.image_shape == (1, 28, 28)
    assert len(data.train.labels) == 60000 and len(data.test.labels) == 10000
    assert torch.equal(torch.bincount(data.test.labels), torch.full((10,), 1000))
    assert abs(float(data.train.images.mean())) < 0.01 and abs(float(data.train.images.std()) - 1) < 0.01


def write_idx(path: Path, array: np.ndarray, compress: bool) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if compress:
        with gzip.open(path, "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


def test_idx_reader_plain_and_gzipped(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (5, 28, 28)), rng.integers(0, 10, 5)
    for i, split in enumerate(("train", "t10k")):
        write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", images, compress=i == 0)
        write_idx(tmp_path / f"{split}-labels-idx1-ubyte", labels, compress=False)
    # The t10k images were written plain: rename to the plain name.
    (tmp_path / "t10k-images-idx3-ubyte.gz").rename(tmp_path / "t10k-images-idx3-ubyte")
    (x_train, y_train), (x_test, _) = read_idx_splits(tmp_path)
    assert x_train.shape == (5, 1, 28, 28) and torch.equal(x_train, x_test)
    assert torch.equal(y_train, torch.from_numpy(labels))
    assert float(x_train.max()) <= 1.0


def test_truncated_idx_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "bad-idx3-ubyte"
    write_idx(path, np.zeros((4, 3, 3)), compress=False)
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(ConfigError, match="truncated"):
        read_idx(path)


def test_missing_files_name_the_fix() -> None:
    cfg = run_config(["dataset=mnist", "dataset.root=/nonexistent"]).dataset
    with pytest.raises(ConfigError, match="dataset.download=true"):
        load_dataset(cfg)


def test_zca_is_korniass_whitening_cached_and_invertible(tmp_path: Path) -> None:
    """dataset.zca=true: MTT's transform (kornia's ZCAWhitening, eps 0.1, fitted on the training
    pixels in [0, 1]) on train and test, fitted once and read back from its cache."""
    from kornia.enhance import ZCAWhitening

    overrides = ["dataset.zca=true", f"dataset.root={tmp_path}"]
    plain = load_dataset(run_config([]).dataset)
    zca = load_dataset(run_config(overrides).dataset)
    pixels = {split: plain.to_pixels(getattr(plain, split).images) for split in ("train", "test")}
    reference = ZCAWhitening(eps=0.1, compute_inv=True).fit(pixels["train"].double())
    for split in ("train", "test"):
        expected = reference(pixels[split].double()).float()
        assert torch.allclose(getattr(zca, split).images, expected, atol=1e-4)
        assert torch.allclose(zca.to_pixels(getattr(zca, split).images), pixels[split], atol=1e-4)
    assert zca.transform == "zca(eps=0.1)" and plain.transform == "normalise"
    cached = list((tmp_path / "zca").glob("digits-eps0.1-*.safetensors"))
    assert len(cached) == 1
    stamp = cached[0].stat().st_mtime_ns
    again = load_dataset(run_config(overrides).dataset)  # read from the cache, not refitted
    assert cached[0].stat().st_mtime_ns == stamp and torch.equal(again.test.images, zca.test.images)


def test_a_zca_set_is_evaluated_in_zca_space_only(tmp_path: Path) -> None:
    from condense.app.cli import run
    from condense.primitives.synthetic import load_synthetic

    zca = [*TINY_RUN, "dataset.zca=true", f"dataset.root={tmp_path}"]
    metrics = run(run_config(zca, tmp_path / "made"))
    path = tmp_path / "made" / "synthetic.safetensors"
    assert load_synthetic(path).transform == "zca(eps=0.1)"
    assert metrics["protocol_card"]["normalisation"] == "zca(eps=0.1)"
    with pytest.raises(ConfigError, match="add dataset.zca=true"):
        run(run_config([*TINY_RUN, "stage=evaluate", f"synthetic={path}"], tmp_path / "plain"))
