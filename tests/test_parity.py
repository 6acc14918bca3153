"""benchmarks/parity.py's own arithmetic and its handling of a reference checkout, on a fake
reference (a tiny git repository whose main.py records its command line and writes a valid
res_*.pt), so that CI needs neither checkout."""

from __future__ import annotations

import gzip
import importlib
import json
import shutil
import signal
import statistics
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

# A reference main.py in miniature: DC's arguments, its command line kept, its sets saved as DC
# does, each filled with the seed torch's generator started from (the harness's seed).
FAKE_MAIN = """import argparse, json, os, sys
import torch
p = argparse.ArgumentParser()
for name in ("--dataset", "--model", "--init", "--data_path", "--save_path", "--eval_mode", "--lr_img"):
    p.add_argument(name)
for name in ("--ipc", "--Iteration", "--num_exp", "--num_eval"):
    p.add_argument(name, type=int)
a = p.parse_args()
os.mkdir(a.save_path)  # as DC's main.py: its parent must exist
with open(os.path.join(a.save_path, "argv.json"), "w") as f:
    json.dump(sys.argv[1:], f)
labels = torch.arange(10).repeat_interleave(a.ipc)
data = [[torch.full((10 * a.ipc, 1, 28, 28), float(torch.initial_seed())), labels] for e in range(a.num_exp)]
torch.save({"data": data, "accs_all_exps": {"ConvNet": [0.5] * a.num_exp}},
           os.path.join(a.save_path, f"res_DC_{a.dataset}_{a.model}_{a.ipc}ipc.pt"))
"""
# Lines the compatibility patches are for (DSA's aliasing copy, scipy's old rotate, a .view)
FAKE_UTILS = "from scipy.ndimage.interpolation import rotate\n    x[:] = y[0]\n"
FAKE_NETWORKS = "        out = out.view(out.size(0), -1)\n"


@pytest.fixture(scope="module")
def parity() -> ModuleType:
    sys.path.insert(0, str(BENCHMARKS))  # parity.py imports its sibling results_file
    try:
        return importlib.import_module("parity")
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_welch_interval_matches_a_hand_computation(parity: ModuleType) -> None:
    ours, theirs = [70.0, 71.0, 72.0], [68.0, 69.0, 70.0, 71.0]
    # by hand: variances of the means 1/3 and (5/3)/4 = 5/12; sum 0.75, its root 0.8660;
    # Satterthwaite's df = 0.75^2 / ((1/3)^2 / 2 + (5/12)^2 / 3) = 4.9592; t(0.975, 4.9592) = 2.5770
    diff, low, high = parity.welch_interval(ours, theirs)
    assert diff == pytest.approx(1.5)
    assert (high - diff) == pytest.approx(2.5770 * 0.75**0.5, abs=1e-3)
    assert diff - low == pytest.approx(high - diff)
    assert parity.verdict(diff, low, high) == "parity"  # the interval holds 0
    assert parity.verdict(0.4, 0.1, 0.7) == "parity"  # within the 0.5-point margin
    assert parity.verdict(1.2, 0.6, 1.8) == "condense higher"


def test_spread_ratio_and_its_f_interval(parity: ModuleType) -> None:
    ours, theirs = [72.97, 69.27, 70.45], [70.08, 70.29, 70.30]  # the three models a side
    ratio, low, high = parity.spread_interval(ours, theirs)
    assert ratio == pytest.approx(statistics.stdev(ours) / statistics.stdev(theirs))
    # F(0.975; 2, 2) = 39.0 exactly: the variance ratio's interval is [F / 39, F * 39]
    assert low == pytest.approx(ratio / 39**0.5) and high == pytest.approx(ratio * 39**0.5)


def fake_checkout(root: Path) -> Path:
    repo = root / "reference"
    repo.mkdir()
    scripts = {"main.py": FAKE_MAIN, "main_DM.py": FAKE_MAIN}  # DC's and DM's scripts
    scripts |= {"utils.py": FAKE_UTILS, "networks.py": FAKE_NETWORKS}
    for name, text in scripts.items():
        (repo / name).write_text(text)
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "fake reference"], check=True)
    return repo


def test_harness_copies_patches_and_runs_a_reference(parity: ModuleType, tmp_path: Path) -> None:
    idx = tmp_path / "idx"
    idx.mkdir()
    with gzip.open(idx / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(b"idx bytes")
    checkout = fake_checkout(tmp_path)
    commit = parity.resolved(checkout, "HEAD")
    copy = tmp_path / "work" / f"vico-{commit}"
    applied = parity.prepare_reference(checkout, commit, copy, idx)
    # every patch that found its line is listed; the copy is patched, the checkout is not
    assert len(applied) == 3 and all("(1 place)" in line for line in applied)
    assert "x[:] = y[0].clone()" in (copy / "utils.py").read_text()
    assert "from scipy.ndimage import rotate" in (copy / "utils.py").read_text()
    assert "out.reshape(out.size(0), -1)" in (copy / "networks.py").read_text()
    assert (checkout / "utils.py").read_text() == FAKE_UTILS
    # Fashion-MNIST's IDX files are unpacked where torchvision looks, so its download never runs
    assert (copy / "data" / "FashionMNIST" / "raw" / "train-images-idx3-ubyte").read_bytes() == b"idx bytes"
    assert (copy / "parity_evaluate.py").exists() and (copy / "parity_seeded.py").exists()
    # a second call keeps the copy as it is (a --work folder resumes)
    assert parity.prepare_reference(checkout, commit, copy, idx) == applied

    sets, wall = parity.run_reference(copy, parity.PAIRINGS["dc"], 2, 20, 3)
    cell = copy / "result-ipc2-it20"
    argv = json.loads((cell / "seed1" / "argv.json").read_text())
    given = dict(zip(argv[::2], argv[1::2], strict=False))
    # the script updates its images once more after the iteration it evaluates: ITERATIONS - 1;
    # one condensation a process, so a long cell resumes after each one
    assert given["--Iteration"] == "19" and given["--num_exp"] == "1" and given["--ipc"] == "2"
    assert given["--init"] == "noise" and given["--dataset"] == "FashionMNIST" and given["--eval_mode"] == "C"
    assert given["--save_path"] == "result-ipc2-it20/seed1"
    assert wall > 0
    # seeds 0..K-1 reached the script's torch generator, and the sets come back alone, in order
    stored = torch.load(sets, weights_only=True)["data"]
    assert [float(images[0, 0, 0, 0]) for images, _ in stored] == [0.0, 1.0, 2.0]
    assert torch.equal(stored[0][1], torch.arange(10).repeat_interleave(2))
    # a finished condensation is not run again; a missing one is, under its own seed
    for seed in (0, 1):
        (cell / f"seed{seed}" / "argv.json").unlink()
    shutil.rmtree(cell / "seed2")
    _, again = parity.run_reference(copy, parity.PAIRINGS["dc"], 2, 20, 3)
    assert not (cell / "seed0" / "argv.json").exists() and not (cell / "seed1" / "argv.json").exists()
    assert (cell / "seed2" / "argv.json").exists() and again != wall
    stored = torch.load(sets, weights_only=True)["data"]
    assert [float(images[0, 0, 0, 0]) for images, _ in stored] == [0.0, 1.0, 2.0]


RESULTS = BENCHMARKS / "results"


def test_committed_table_is_rebuilt_from_its_json(parity: ModuleType) -> None:
    """The rows --carry writes for an earlier entry are the rows the run that made it wrote: the
    committed parity.md, rebuilt from parity.json's accuracies, row for row."""
    entries = json.loads((RESULTS / "parity.json").read_text())
    written = (RESULTS / "parity.md").read_text().splitlines()
    (command,) = [line.split("`")[1] for line in written if line.startswith("Command: `")]
    rows = []
    for key, entry in entries.items():
        mark = "" if entry["run"]["command"] == command else parity.CARRIED  # made by another run
        table, section = parity.entry_rows(key, entry, mark)
        rows += table + [line for line in section if line.startswith("| ") and "---" not in line]
    body = [
        line for line in written if line.startswith("| ") and not line.startswith(("| cell |", "| set |"))
    ]
    assert rows and [r for r in rows if not r.startswith(("| cell |", "| set |"))] == body
    assert all(
        set(entry["run"]) == {"commit", "machine", "command", "references"} for entry in entries.values()
    )


def test_carry_keeps_what_this_run_did_not_remake(parity: ModuleType, tmp_path: Path) -> None:
    run = {
        "commit": "abc1234",
        "machine": "a CPU",
        "command": "python benchmarks/parity.py --cell dc:1:20",
        "references": ["Reference vico at 5e8906a; patches: none."],
    }
    side = {"own": [[66.0, 67.0], [65.0, 66.5], [67.5, 68.0]], "crossed": [[66.2, 66.8]] * 3, "wall_s": 10.0}
    spread = {
        "condense's evaluator": [70.1, 71.2, 69.8],
        "reference's evaluator": [70.0, 70.4, 70.2],
        "wall_s": 5.0,
    }
    out_json = tmp_path / "parity.json"
    earlier = {
        "dc IPC 1, 20 it.": {"ours": side, "ref": side, "run": run},
        "spread ours_mda:10:5:3": spread | {"run": run},
    }
    out_json.write_text(json.dumps(earlier))
    carried = parity.carried_entries(out_json, {"dc IPC 1, 20 it."})
    assert list(carried) == ["spread ours_mda:10:5:3"]  # the remade cell is this run's, not carried
    table, section = parity.entry_rows(
        "spread ours_mda:10:5:3", carried["spread ours_mda:10:5:3"], parity.CARRIED
    )
    marked = [
        line for line in section if f"5 it., the reference's set, 3 models each{parity.CARRIED} |" in line
    ]
    assert table == [] and len(marked) == 2  # one row per evaluator
    (provenance,) = [line for line in parity.provenance_lines(carried) if line.startswith("- ")]
    assert "commit abc1234" in provenance and run["command"] in provenance and "5e8906a" in provenance
    # entries one run made share one provenance line; another run's get their own
    later = earlier | {"dm IPC 1, 20 it.": {"ours": side, "ref": side, "run": run | {"commit": "def5678"}}}
    out_json.write_text(json.dumps(later))
    provenance_of_both = parity.provenance_lines(parity.carried_entries(out_json, set()))
    lines = [line for line in provenance_of_both if line.startswith("- ")]
    assert len(lines) == 2
    assert lines[0].startswith("- dc IPC 1, 20 it.; spread ours_mda:10:5:3: commit abc1234")
    assert lines[1].startswith("- dm IPC 1, 20 it.: commit def5678")
    rows = parity.entry_rows("dc IPC 1, 20 it.", earlier["dc IPC 1, 20 it."], parity.CARRIED)[0]
    assert len(rows) == 4 and all(row.startswith(f"| dc IPC 1, 20 it.{parity.CARRIED} |") for row in rows)
    # an entry that cannot say which run made it is refused, not carried unmarked
    out_json.write_text(json.dumps({"dc IPC 1, 20 it.": {"ours": side, "ref": side}}))
    with pytest.raises(SystemExit, match="records no run"):
        parity.carried_entries(out_json, set())
    assert parity.carried_entries(out_json, {"dc IPC 1, 20 it."}) == {}  # remade: nothing to say


def test_ledger_carries_finished_steps_to_a_fresh_work_folder(parity: ModuleType, tmp_path: Path) -> None:
    """A cell longer than one sitting: what the ledger keeps of a --work folder, and a fresh
    folder restored from it resumes without rerunning a finished condensation."""
    idx = tmp_path / "idx"
    idx.mkdir()
    checkout = fake_checkout(tmp_path)
    commit = parity.resolved(checkout, "HEAD")
    root, ledger = tmp_path / "work", tmp_path / "ledger"
    copy = root / f"vico-{commit}"
    parity.prepare_reference(checkout, commit, copy, idx)
    parity.run_reference(copy, parity.PAIRINGS["dc"], 2, 20, 2)
    made = json.loads((copy / "result-ipc2-it20" / "seed0" / "parity_wall.json").read_text())
    assert made["machine"] == parity.cpu_machine() and made["seconds"] > 0  # each names its CPU
    cut_short = copy / "result-ipc2-it20" / "seed2"  # a reference condensation killed mid-way
    cut_short.mkdir()
    (cut_short / "argv.json").write_text("[]")
    (copy / "result-ipc2-it20" / "seed2.log").write_text("killed")
    (copy / "result-ipc2-it20" / "sets.accs.json").write_text("[[50.0]]")
    done, running = root / "dc-ipc2-it20-seed0", root / "dc-ipc2-it20-seed1"
    for run_folder, finished in ((done, True), (running, False)):
        parity.note_sitting(run_folder)
        (run_folder / "checkpoint.safetensors").write_bytes(b"state")
        (run_folder / "metrics.json").write_text(json.dumps({"finished": finished}))
    (done / "synthetic.safetensors").write_bytes(b"set")
    (done / "synthetic.png").write_bytes(b"a picture of the set")
    (root / "dc-ipc2-it20-condense-sets.pt").write_bytes(b"exported")  # rebuilt from the seeds

    assert parity.keep_in_ledger(root, ledger) == len(parity.ledger_files(root))
    kept = {str(p.relative_to(ledger)) for p in ledger.rglob("*") if p.is_file()}
    result = f"vico-{commit}/result-ipc2-it20"
    assert kept == {
        f"{result}/seed0/argv.json", f"{result}/seed0/parity_wall.json",
        f"{result}/seed0/res_DC_FashionMNIST_ConvNet_2ipc.pt", f"{result}/seed0.log",
        f"{result}/seed1/argv.json", f"{result}/seed1/parity_wall.json",
        f"{result}/seed1/res_DC_FashionMNIST_ConvNet_2ipc.pt", f"{result}/seed1.log",
        f"{result}/sets.accs.json",
        "dc-ipc2-it20-seed0/metrics.json", "dc-ipc2-it20-seed0/synthetic.safetensors",
        "dc-ipc2-it20-seed0/parity_sittings.json",
        "dc-ipc2-it20-seed1/metrics.json", "dc-ipc2-it20-seed1/checkpoint.safetensors",
        "dc-ipc2-it20-seed1/parity_sittings.json",
    }  # fmt: skip
    # nothing of the reference's code, its data, a cut-short run, a rebuilt file, a picture or
    # a finished run's checkpoint; a second call copies only what changed
    assert parity.keep_in_ledger(root, ledger) == 0
    (running / "checkpoint.safetensors").write_bytes(b"later state")
    assert parity.keep_in_ledger(root, ledger) == 1

    fresh = tmp_path / "fresh"  # another machine: a new copy, then the ledger
    fresh_copy = fresh / f"vico-{commit}"
    parity.prepare_reference(checkout, commit, fresh_copy, idx)
    (fresh / "dc-ipc2-it20-seed1").mkdir()
    (fresh / "dc-ipc2-it20-seed1" / "checkpoint.safetensors").write_bytes(b"newest")
    assert parity.restore_from_ledger(ledger, fresh) == len(kept) - 1
    assert (fresh / "dc-ipc2-it20-seed1" / "checkpoint.safetensors").read_bytes() == b"newest"  # kept
    for seed in (0, 1):  # the restored seeds are not run again; the third runs, under seed 2
        (fresh_copy / "result-ipc2-it20" / f"seed{seed}" / "argv.json").unlink()
    sets, _ = parity.run_reference(fresh_copy, parity.PAIRINGS["dc"], 2, 20, 3)
    assert not (fresh_copy / "result-ipc2-it20" / "seed0" / "argv.json").exists()
    stored = torch.load(sets, weights_only=True)["data"]
    assert [float(images[0, 0, 0, 0]) for images, _ in stored] == [0.0, 1.0, 2.0]


def test_a_cell_made_on_several_machines_says_so(parity: ModuleType, tmp_path: Path) -> None:
    run_folder = tmp_path / "dc-ipc2-it20-seed0"
    parity.note_sitting(run_folder)
    parity.note_sitting(run_folder)  # the same machine again: one sitting
    assert json.loads((run_folder / parity.SITTINGS).read_text()) == [parity.cpu_machine()]
    (run_folder / parity.SITTINGS).write_text(json.dumps(["an older CPU"]))
    parity.note_sitting(run_folder)  # resumed here
    copy = tmp_path / "vico-abc"
    wall = copy / "result-ipc2-it20" / "seed0" / "parity_wall.json"
    wall.parent.mkdir(parents=True)
    wall.write_text(json.dumps({"seconds": 1.0, "machine": "an older CPU"}))
    machines = parity.condensation_machines(copy, "dc", 2, 20, 1, tmp_path)
    assert machines == ["an older CPU", parity.cpu_machine()]
    (line,) = [
        x for x in parity.machines_lines({"dc IPC 2, 20 it.": {"machines": machines}}) if x.startswith("- ")
    ]
    assert line == f"- dc IPC 2, 20 it.: an older CPU; {parity.cpu_machine()}"
    assert parity.machines_lines({"dc IPC 2, 20 it.": {}}) == []
    (run_folder / "metrics.json").write_text(json.dumps({"finished": True}))
    parity.note_sitting(run_folder)  # a finished run is not resumed: no sitting is added
    assert len(json.loads((run_folder / parity.SITTINGS).read_text())) == 2


def test_only_one_side_runs_and_the_ledger_keeps_it(
    parity: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--only reference through main(): the reference's K condensations run, the ledger gets them,
    and no table is written (it needs both sides); a second sitting on a fresh --work restores
    them and runs none again."""
    idx = tmp_path / "idx"
    idx.mkdir()
    checkout, ledger, out = fake_checkout(tmp_path), tmp_path / "ledger", tmp_path / "parity.md"
    commit = parity.resolved(checkout, "HEAD")
    before = signal.getsignal(signal.SIGTERM)

    def sitting(work: Path) -> None:
        argv = ["parity.py", "--vico", str(checkout), "--cell", "dm:2:20:3:3", "--only", "reference"]
        argv += ["--work", str(work), "--ledger", str(ledger), "--fashion-mnist", str(idx), "--out", str(out)]
        monkeypatch.setattr(sys, "argv", argv)
        parity.main()

    sitting(tmp_path / "first")
    seeds = ledger / f"vico-{commit}" / "result-ipc2-it20"
    assert sorted(p.name for p in seeds.glob("seed?")) == ["seed0", "seed1", "seed2"]
    assert all((seeds / f"seed{j}" / "parity_wall.json").exists() for j in range(3))
    assert not out.exists() and not out.with_suffix(".json").exists()
    for j in range(3):  # a rerun would write argv.json again
        (seeds / f"seed{j}" / "argv.json").unlink()
    sitting(tmp_path / "second")
    restored = tmp_path / "second" / f"vico-{commit}" / "result-ipc2-it20"
    assert all((restored / f"seed{j}" / "parity_wall.json").exists() for j in range(3))
    assert not any((restored / f"seed{j}" / "argv.json").exists() for j in range(3))
    assert signal.getsignal(signal.SIGTERM) == before  # the harness hands SIGTERM back
