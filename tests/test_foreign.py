"""Other tools' synthetic sets: every layout read back as the same set, soft labels and a learned
learning rate used by the evaluation, and every bad file refused without running anything."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from condense.app.cli import run
from condense.primitives.dataset import Dataset, load_dataset
from condense.primitives.foreign import read_set
from condense.primitives.synthetic import SyntheticSet, check_compatible, load_synthetic, save_synthetic
from condense.schema import ConfigError, ReaderConfig
from condense.stages.evaluation import soft_cross_entropy, soft_kl
from tests.conftest import FAST, condense_command, run_config

# A tiny evaluation on digits: 1 model, 5 epochs, no random subset.
EVALUATE = [*FAST, "stage=evaluate", "network.width=16", "evaluation.num_models=1", "evaluation.epochs=5"]


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_dataset(run_config(FAST).dataset)


def real_subset(data: Dataset, ipc: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """ipc real training images per class, class-major (as DC and MTT store a set)."""
    idx = torch.cat([torch.nonzero(data.train.labels == c).flatten()[:ipc] for c in range(data.num_classes)])
    return data.train.images[idx].clone(), data.train.labels[idx].clone()


def save_dc(path: Path, pairs: list[list[torch.Tensor]]) -> Path:
    """DC's main.py result file: its sets, and its accuracies as numpy float64 scalars."""
    torch.save({"data": pairs, "accs_all_exps": {"ConvNet": [np.float64(0.91), np.float64(0.9)]}}, path)
    return path


def save_mtt(folder: Path, images: torch.Tensor, labels: torch.Tensor, lr: float | None = None) -> Path:
    """MTT's (and DATM's) distill.py outputs: images_best.pt, labels_best.pt, DATM's lr_best.pt."""
    folder.mkdir(parents=True)
    torch.save(images, folder / "images_best.pt")
    torch.save(labels, folder / "labels_best.pt")
    if lr is not None:
        torch.save(torch.tensor(lr), folder / "lr_best.pt")
    return folder


def save_pngs(folder: Path, pixels: torch.Tensor, labels: torch.Tensor, names: list[str]) -> Path:
    for i, (image, label) in enumerate(zip(pixels, labels, strict=True)):
        (folder / names[int(label)]).mkdir(parents=True, exist_ok=True)
        array = (image[0] * 255).round().to(torch.uint8).numpy()
        Image.fromarray(array, mode="L").save(folder / names[int(label)] / f"{i:03d}.png")
    return folder


def test_dc_result_file_reads_each_experiment(tmp_path: Path, digits: Dataset) -> None:
    images, labels = real_subset(digits)
    path = save_dc(tmp_path / "res_DC_digits_ConvNet_2ipc.pt", [[images, labels], [images + 1, labels]])
    for experiment, expected in ((0, images), (1, images + 1)):
        syn = read_set(path, ReaderConfig(experiment=experiment), digits)
        assert torch.equal(syn.images, expected) and torch.equal(syn.labels, labels)
        assert syn.soft_labels is None and syn.lr is None and syn.ipc == 2
        assert syn.source == f"dc:res_DC_digits_ConvNet_2ipc#{experiment}"
    with pytest.raises(ConfigError, match=r"reader.experiment=2: .* holds 2 experiments: use 0..1"):
        read_set(path, ReaderConfig(experiment=2), digits)


def test_mtt_and_datm_outputs(tmp_path: Path, digits: Dataset) -> None:
    images, labels = real_subset(digits)
    hard = read_set(save_mtt(tmp_path / "mtt", images, labels), ReaderConfig(), digits)
    assert torch.equal(hard.images, images) and torch.equal(hard.labels, labels) and hard.soft_labels is None
    # DATM: soft labels saved as logits, and the learned learning rate
    logits = torch.randn(len(labels), 10, generator=torch.Generator().manual_seed(0))
    datm = read_set(save_mtt(tmp_path / "datm", images, logits, lr=0.0123), ReaderConfig(), digits)
    assert torch.equal(datm.soft_labels, logits) and torch.equal(datm.labels, logits.argmax(1))
    assert datm.lr == pytest.approx(0.0123) and datm.source == "mtt:datm/images_best"
    # probabilities (rows summing to 1) become log-probabilities: the same distribution
    probs = F.softmax(logits, dim=1)
    folder = save_mtt(tmp_path / "probs", images, probs)
    read = read_set(folder, ReaderConfig(), digits)
    assert torch.allclose(F.softmax(read.soft_labels, dim=1), probs, atol=1e-6)
    # an intermediate file of the same run, by its name
    torch.save(images, folder / "images_500.pt")
    torch.save(labels, folder / "labels_500.pt")
    assert torch.equal(read_set(folder / "images_500.pt", ReaderConfig(), digits).labels, labels)


@pytest.mark.parametrize("names", [[str(c) for c in range(10)], [f"class_{c:02d}" for c in range(10)]])
def test_png_folders_are_decoded_and_normalised(tmp_path: Path, digits: Dataset, names: list[str]) -> None:
    images, labels = real_subset(digits)
    pixels = ((images * digits.std[0] + digits.mean[0]) * 255).round() / 255  # what 8-bit PNGs hold
    syn = read_set(save_pngs(tmp_path / "pngs", pixels, labels, names), ReaderConfig(), digits)
    assert torch.equal(syn.labels, labels)
    assert torch.allclose(syn.images, (pixels - digits.mean[0]) / digits.std[0], atol=1e-6)


def test_soft_labels_and_lr_survive_condenses_own_file(tmp_path: Path) -> None:
    soft = torch.randn(4, 10)
    syn = SyntheticSet(
        torch.randn(4, 1, 8, 8), soft.argmax(1), "digits", [0.3], [0.4], soft_labels=soft, lr=0.02
    )
    save_synthetic(syn, tmp_path / "s.safetensors")
    back = load_synthetic(tmp_path / "s.safetensors")
    assert torch.equal(back.soft_labels, soft) and back.lr == 0.02 and back.transform == "normalise"


def test_soft_losses_are_the_published_formulas() -> None:
    gen = torch.Generator().manual_seed(1)
    logits, target = torch.randn(5, 10, generator=gen), torch.randn(5, 10, generator=gen)
    # DATM's SoftCrossEntropy: sum(-log_softmax(out) * softmax(target)) / batch
    datm = (-(F.log_softmax(logits, 1) * F.softmax(target, 1))).sum() / 5
    assert soft_cross_entropy(1.0)(logits, target) == pytest.approx(float(datm), rel=1e-6)
    # one-hot probabilities: plain cross-entropy with the hard labels
    hard = torch.tensor([0, 3, 9, 2, 2])
    one_hot = F.one_hot(hard, 10).float().clamp_min(1e-12).log()
    assert soft_cross_entropy(1.0)(logits, one_hot) == pytest.approx(
        float(F.cross_entropy(logits, hard)), rel=1e-5
    )
    # T^2 KL(p_T || q_T), element by element
    t = 4.0
    p, q = F.softmax(target / t, 1), F.softmax(logits / t, 1)
    kl = t * t * float((p * (p.log() - q.log())).sum()) / 5
    assert soft_kl(t)(logits, target) == pytest.approx(kl, rel=1e-5)


def test_one_set_in_two_foreign_layouts_gets_the_same_accuracy(tmp_path: Path, digits: Dataset) -> None:
    """Paired models: the same set read through DC's and MTT's layouts and condense's own file
    is judged by the same models, so the accuracies are equal, not merely close."""
    images, labels = real_subset(digits)
    dc = save_dc(tmp_path / "res.pt", [[images, labels]])
    mtt = save_mtt(tmp_path / "mtt", images, labels)
    own = tmp_path / "own.safetensors"
    save_synthetic(SyntheticSet(images, labels, "digits", digits.mean, digits.std), own)
    accuracies = {}
    for name, path in (("dc", dc), ("mtt", mtt), ("own", own)):
        metrics = run(
            run_config([*EVALUATE, f"synthetic={path}", "evaluation.compare_random=false"], tmp_path / name)
        )
        accuracies[name] = metrics["evaluation"][metrics["label"]]["ConvNet"]["accuracies"]
    assert accuracies["dc"] == accuracies["mtt"] == accuracies["own"]
    assert metrics["protocol_card"]["labels"] == "hard"


def test_datm_set_trains_on_soft_labels_with_its_learned_lr(tmp_path: Path, digits: Dataset) -> None:
    images, labels = real_subset(digits)
    logits = 5 * F.one_hot(labels, 10).float()
    folder = save_mtt(tmp_path / "datm", images, logits, lr=0.03)
    metrics = run(run_config([*EVALUATE, f"synthetic={folder}"], tmp_path / "out"))
    assert metrics["evaluation_protocol"]["lr"] == pytest.approx(0.03)
    assert metrics["set"] == {
        "source": "mtt:datm/images_best",
        "labels": "soft",
        "lr": pytest.approx(0.03),
        "ipc": 2,
    }
    card = metrics["protocol_card"]
    assert card["labels"] == "soft (ce, T=1.0)" and card["lr_schedule"].startswith(
        "0.03 (the set's learned lr)"
    )
    assert set(metrics["evaluation"]) == {"mtt:datm/images_best", "random"}
    # evaluation.learned_lr=false keeps the protocol's lr; the soft labels change the numbers
    plain = run(run_config([*EVALUATE, f"synthetic={folder}", "evaluation.learned_lr=false"], tmp_path / "b"))
    assert plain["evaluation_protocol"]["lr"] == 0.01


def bad_file(kind: str, folder: Path, digits: Dataset) -> tuple[Path, str]:
    """A file of one bad kind and the words its refusal must contain."""
    images, labels = real_subset(digits)
    if kind == "unknown_layout":
        path = folder / "set.npz"
        path.write_bytes(b"not a set")
        return path, "unknown layout"
    if kind == "wrong_shape":
        return save_dc(folder / "res.pt", [[torch.randn(20, 1, 16, 16), labels]]), "shape"
    if kind == "wrong_class_count":
        return save_mtt(folder / "m", images, torch.randn(20, 7)), "7 columns"
    if kind == "labels_out_of_range":
        return save_dc(folder / "res.pt", [[images, labels + 5]]), "outside the 10 classes"
    if kind == "labels_mismatch":
        return save_dc(folder / "res.pt", [[images, labels[:5]]]), "N=20"
    if kind == "not_dc":
        torch.save({"images": images}, folder / "x.pt")
        return folder / "x.pt", "not a DC result file"
    if kind == "truncated":
        path = save_dc(folder / "res.pt", [[images, labels]])
        path.write_bytes(path.read_bytes()[:-300])
        return path, "truncated"
    if kind == "missing_labels":
        folder.joinpath("m").mkdir()
        torch.save(images, folder / "m" / "images_best.pt")
        return folder / "m", "labels_best.pt is missing"
    if kind == "bad_lr":
        return save_mtt(folder / "m", images, labels, lr=-1.0), "one positive learning rate"
    if kind == "not_a_png":
        save_pngs(folder / "p", torch.rand(20, 1, 8, 8), labels, [str(c) for c in range(10)])
        (folder / "p" / "3" / "999.png").write_bytes(b"GIF89a, not a PNG")
        return folder / "p", "not a readable PNG"
    if kind == "empty_png_class":
        save_pngs(folder / "p", torch.rand(20, 1, 8, 8), labels, [str(c) for c in range(10)])
        (folder / "p" / "10").mkdir()
        return folder / "p", "holds no .png"
    raise AssertionError(kind)


BAD = [
    "unknown_layout",
    "wrong_shape",
    "wrong_class_count",
    "labels_out_of_range",
    "labels_mismatch",
    "not_dc",
    "truncated",
    "missing_labels",
    "bad_lr",
    "empty_png_class",
    "not_a_png",
]


@pytest.mark.parametrize("kind", BAD)
def test_bad_files_are_refused_in_one_line(tmp_path: Path, digits: Dataset, kind: str) -> None:
    path, words = bad_file(kind, tmp_path, digits)
    with pytest.raises(ConfigError, match=words) as err:
        syn = read_set(path, ReaderConfig(), digits)
        check_compatible(syn, digits.name, digits.image_shape, digits.num_classes, digits.transform)
    assert "\n" not in str(err.value)


class Payload:
    """Pickles as a call to os.mkdir: loading it with plain pickle would create `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.mkdir, (str(self.marker),)


def test_pickled_code_is_refused_by_the_command_and_never_runs(tmp_path: Path, digits: Dataset) -> None:
    marker = tmp_path / "was_executed"
    images, labels = real_subset(digits)
    path = tmp_path / "res.pt"
    torch.save({"data": [[images, labels]], "hook": Payload(marker)}, path)
    proc = condense_command(*EVALUATE, f"synthetic={path}", f"hydra.run.dir={tmp_path / 'out'}", cwd=tmp_path)
    assert proc.returncode == 2
    error_lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and "never runs code from a file" in error_lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and not marker.exists()


@pytest.mark.parametrize("soft_loss", ["ce", "kl"])
def test_soft_labels_train_under_forced_bf16(tmp_path: Path, digits: Dataset, soft_loss: str) -> None:
    """bf16 autocast (emulated where not native: a tiny case) with soft targets: the losses
    take fp32 targets and bf16 logits and the accuracy is a real number."""
    images, labels = real_subset(digits)
    folder = save_mtt(tmp_path / "datm", images, 5 * F.one_hot(labels, 10).float())
    overrides = [*EVALUATE, "precision=bf16", f"synthetic={folder}", f"evaluation.soft_loss={soft_loss}"]
    metrics = run(
        run_config(
            [*overrides, "evaluation.temperature=2", "evaluation.compare_random=false"], tmp_path / "o"
        )
    )
    accuracy = metrics["evaluation"][metrics["label"]]["ConvNet"]["mean"]
    assert metrics["precision"]["evaluation"] == "bf16" and 0.0 <= accuracy <= 1.0
    assert metrics["protocol_card"]["labels"] == f"soft ({soft_loss}, T=2.0)"


def test_a_dc_file_written_under_numpy_1_is_read(tmp_path: Path, digits: Dataset) -> None:
    """Published DC files pickle numpy scalars as numpy.core.multiarray.scalar (numpy 1.x): the
    same file with that name, rewritten inside torch's zip, loads without running anything."""
    import zipfile

    images, labels = real_subset(digits)
    written = save_dc(tmp_path / "res_new.pt", [[images, labels]])
    old = tmp_path / "res_numpy1.pt"
    with zipfile.ZipFile(written) as zin, zipfile.ZipFile(old, "w", zipfile.ZIP_STORED) as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            if item.filename.endswith("data.pkl"):
                assert b"numpy._core.multiarray" in data
                data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
            zout.writestr(item, data)
    syn = read_set(old, ReaderConfig(), digits)
    assert torch.equal(syn.images, images) and torch.equal(syn.labels, labels)


def test_condense_sets_export_to_dcs_layout_and_read_back_as_they_train(
    digits: Dataset, tmp_path: Path, capsys
) -> None:
    """condense-export writes DC's res_*.pt (one experiment per set): condense's reader gets each
    set back exactly, an IDM set as it trains (expanded); soft labels, ZCA images and mixed
    datasets are refused in one line."""
    from dataclasses import replace

    from condense.app.export import main as export_main

    data = digits
    images, labels = real_subset(data)
    plain = SyntheticSet(images, labels, data.name, data.mean, data.std)
    mosaic = replace(plain, expansion=2)  # the same images read as 2x2 mosaics (IDM)
    paths = [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]
    save_synthetic(plain, paths[0])
    save_synthetic(mosaic, paths[1])
    out = tmp_path / "res_DC_digits.pt"
    export_main([*map(str, paths), "--out", str(out)])
    assert "2 set(s) written" in capsys.readouterr().out
    for experiment, expected in enumerate((plain, mosaic.expanded())):
        back = read_set(out, ReaderConfig(layout="dc", experiment=experiment), data)
        assert torch.equal(back.images, expected.images) and torch.equal(back.labels, expected.labels)
    for bad, message in (
        (replace(plain, soft_labels=torch.zeros(len(labels), 10)), "soft labels"),
        (replace(plain, transform="zca(eps=0.1)"), "zca"),
        (replace(plain, dataset="mnist"), "datasets"),
    ):
        save_synthetic(bad, tmp_path / "bad.safetensors")
        with pytest.raises(SystemExit) as done:
            export_main([str(paths[0]), str(tmp_path / "bad.safetensors"), "--out", str(tmp_path / "x.pt")])
        err = capsys.readouterr().err
        assert done.value.code == 2 and err.startswith("error:") and message in err and err.count("\n") == 1
