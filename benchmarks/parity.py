"""Parity with the reference codes: each preset beside the code behind its protocol, K
condensations a side, both sides' sets judged by both evaluators.

Run by hand, alone on the machine (one job at a time); benchmarks/README.md says how to get the
two checkouts with git. Nothing is fetched or placed here: the script copies the commit it needs
out of each checkout (git archive) into a temporary folder, patches that copy for today's torch
and scipy (PATCHES, each listed in the results file), and gives it Fashion-MNIST's IDX files.

    python benchmarks/parity.py --paper ~/src/improved-dataset-condensation \
        --vico ~/src/DatasetCondensation --cell dc:1:20 --cell ours_md:1:20 -k 4 --models 4 \
        --out benchmarks/results/parity.md

A cell is PRESET:IPC:ITERATIONS, ITERATIONS image updates a side; PRESET:IPC:ITERATIONS:K:MODELS
gives it its own K and MODELS (where its evaluations are long: DM's 1000 DSA epochs). A --work
folder keys its files by preset, IPC and iterations: give a changed K or MODELS a fresh one.
A long table is built over several sittings: --carry keeps the entries of the results' .json
that this run does not remake (the table rebuilt from their recorded accuracies, marked, each
with the commit, machine, command and reference copies of the run that made it). A cell that
outlasts a machine's disk: --ledger DIR keeps every finished step's small results in a folder
to commit and restores them into a fresh --work; --only reference|condense runs one side alone.

The reference script runs each of the K condensations in a process of its own (--num_exp 1,
--eval_mode C), so a long cell resumes after each finished condensation; the harness seeds
torch's, numpy's and random's global generators with 0..K-1 before the script starts (the
scripts seed nothing before their first draws, and torch's default seed is the same in every
process). It updates its images once more after the iteration it evaluates and then saves, so
it gets --Iteration ITERATIONS-1 and its saved sets have had ITERATIONS updates, as condense's
sets at iterations=ITERATIONS (seeds 0..K-1), both in fp32 on the CPU (both on CUDA where torch
sees a GPU: the reference scripts take it then). The script's own in-run evaluation (one model, one
update earlier) is not used. Every set of both sides is then judged by both evaluators, MODELS
fresh ConvNets each: condense's (the preset's protocol; the reference's res_*.pt read with
reader.layout=dc) and the reference's own evaluate_synset (condense's sets exported to that
layout with condense-export). The unit of every comparison is one condensation (its mean over
the models); the difference of the two sides gets a Welch 95 % interval.
"""

from __future__ import annotations

import argparse
import filecmp
import gzip
import json
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from results_file import cpu_machine, head_commit, write_results
from scipy import stats

from condense.app.cli import compose_config
from condense.app.export import export_dc
from condense.app.run import run
from condense.primitives.foreign import load_tensors
from condense.schema import to_run_config

FASHION_MNIST_IDX = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist
# Both sides run where the reference scripts run: they take CUDA whenever torch sees it.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
PARITY_MARGIN = 0.5  # points: a difference this small is parity even when its interval misses 0
VICO_DC_COMMIT = "5e8906a"  # DC's code as released with its paper


Step = Callable[[], object] | None  # run after each finished condensation (the ledger's copy)


@dataclass(frozen=True)
class Pairing:
    """The reference code behind one preset's protocol and how to run it."""

    reference: str  # "paper" (the paper's code) or "vico" (VICO-UoE/DatasetCondensation)
    commit: str | None  # None: the checkout's HEAD (or --paper-commit / --vico-commit)
    script: str
    args: tuple[str, ...]
    eval_epochs: int  # the reference evaluator's epochs for this preset
    eval_dsa: bool  # the reference evaluator trains with DSA


PAIRINGS = {
    "dc": Pairing("vico", VICO_DC_COMMIT, "main.py", ("--init", "noise"), 300, False),
    "ours_md": Pairing("paper", None, "multi-level.py", ("--dis_metric", "improved"), 300, False),
    "ours_mda": Pairing(
        "paper", None, "multi-level.py", ("--dis_metric", "improved", "--adaptive_step"), 300, False
    ),
    "dm": Pairing("vico", None, "main_DM.py", ("--init", "real", "--lr_img", "1"), 1000, True),
}


@dataclass(frozen=True)
class Patch:
    """A compatibility edit of the reference copy: none of them changes a value."""

    file: str
    pattern: str  # a regular expression, replaced everywhere in the file
    replacement: str
    why: str


PATCHES = (
    Patch(
        "utils.py",
        r"from scipy\.ndimage\.interpolation import rotate",
        "from scipy.ndimage import rotate",
        "scipy moved `rotate` out of scipy.ndimage.interpolation",
    ),
    Patch(
        "utils.py",
        r"(?m)^([ \t]*)(\w+)\[:\] = (\w+)\[0\](\r?)$",
        r"\1\2[:] = \3[0].clone()\4",
        "DSA's `x[:] = x[0]` reads what it writes; torch refuses that in-place aliasing now",
    ),
    Patch(
        "networks.py",
        r"out\.view\(out\.size\(0\), -1\)",
        "out.reshape(out.size(0), -1)",
        "`.view` on the augmented batch, which is no longer contiguous",
    ),
)

# The reference's own evaluator on a res_*.pt file; written into the reference copy at run time.
REFERENCE_EVALUATOR = '''"""Written by condense's benchmarks/parity.py: the reference's evaluate_synset on
each experiment of a res_*.pt file, NUM_EVAL fresh models each; accuracies to --out as JSON."""
import argparse, inspect, json, types
import torch
import utils

p = argparse.ArgumentParser()
for name, kind in (("res", str), ("out", str), ("dataset", str), ("model", str), ("ipc", int),
                   ("num_eval", int), ("epochs", int), ("dsa", int)):
    p.add_argument("--" + name, type=kind, required=True)
a = p.parse_args()
device = "cuda" if torch.cuda.is_available() else "cpu"
loaded = utils.get_dataset(a.dataset, "data")
channel, im_size, num_classes, testloader = loaded[0], loaded[1], loaded[2], loaded[-1]
daparam = utils.get_daparam(a.dataset, a.model, a.model, a.ipc)
takes_args = "args" in inspect.signature(utils.evaluate_synset).parameters
accs = []
for images, labels in torch.load(a.res, map_location="cpu", weights_only=True)["data"]:
    one_set = []
    for it_eval in range(a.num_eval):
        net = utils.get_network(a.model, channel, num_classes, im_size).to(device)
        if takes_args:  # today's VICO code: one namespace, as main.py / main_DM.py build it
            ns = types.SimpleNamespace(
                device=device, lr_net=0.01, batch_train=256, epoch_eval_train=a.epochs,
                dsa=bool(a.dsa), dsa_strategy="color_crop_cutout_flip_scale_rotate",
                dsa_param=utils.ParamDiffAug(), dc_aug_param=daparam)
            _, _, acc = utils.evaluate_synset(it_eval, net, images.clone(), labels.clone(), testloader, ns)
        else:  # DC's 2021 code and the paper's: DC's crop/noise augmentation takes 1000 epochs
            epochs = 1000 if daparam["strategy"] != "none" else a.epochs
            _, _, acc = utils.evaluate_synset(it_eval, net, images.clone(), labels.clone(), testloader,
                                              0.01, 256, daparam, device, epochs)
        one_set.append(float(acc))
    accs.append(one_set)
with open(a.out, "w") as f:
    json.dump(accs, f)
'''


# Starts a reference script with the global generators seeded: the scripts draw their first
# noise images and real batches before anything seeds them (their get_network seeds torch from
# the clock later), and torch's default seed is one constant, so K processes left unseeded would
# start K condensations from the same noise.
SEEDED_LAUNCHER = '''"""Written by condense's benchmarks/parity.py; run as
python parity_seeded.py SEED SCRIPT ARGS... (the script's own arguments)."""
import random, runpy, sys
import numpy, torch

seed = int(sys.argv[1])
random.seed(seed)
numpy.random.seed(seed)
torch.manual_seed(seed)
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
'''


@dataclass
class Side:
    """One side of a cell: per condensation, the accuracies (%) of its evaluated models."""

    own: list[list[float]]  # judged by the side's own evaluator
    crossed: list[list[float]]  # the same sets judged by the other side's evaluator
    wall_s: float  # condensing the K sets (the reference's includes its one-model evaluations)


def prepare_reference(checkout: Path, commit: str, into: Path, idx: Path) -> list[str]:
    """A patched copy of `checkout` at `commit` in `into`, with Fashion-MNIST where torchvision
    looks for it (so its download never runs). Returns the patches that applied; a copy made by
    an earlier run in --work is kept as it is, its two helper scripts rewritten."""
    record = into / "parity_patches.json"
    if record.exists():
        write_helpers(into)  # a copy from an older harness lacks the seeded launcher
        return json.loads(record.read_text())
    into.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "-C", str(checkout), "archive", commit], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    applied = []
    for patch in PATCHES:
        with open(into / patch.file, newline="") as f:  # keep the file's CRLF line ends
            text = f.read()
        patched, count = re.subn(patch.pattern, patch.replacement, text)
        if count:
            with open(into / patch.file, "w", newline="") as f:
                f.write(patched)
            applied.append(f"{patch.file}: {patch.why} ({count} place{'s' * (count > 1)})")
    raw = into / "data" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for gz in idx.glob("*-ubyte.gz"):
        with gzip.open(gz) as src, open(raw / gz.stem, "wb") as dst:
            shutil.copyfileobj(src, dst)
    write_helpers(into)
    record.write_text(json.dumps(applied))
    return applied


def write_helpers(copy: Path) -> None:
    """The harness's two scripts in the reference copy: its evaluator and its seeded launcher."""
    (copy / "parity_evaluate.py").write_text(REFERENCE_EVALUATOR)
    (copy / "parity_seeded.py").write_text(SEEDED_LAUNCHER)


def run_reference(
    copy: Path, pairing: Pairing, ipc: int, iterations: int, k: int, tag: str = "", after_each: Step = None
) -> tuple[Path, float]:
    """K condensations by the reference script, seeds 0..K-1, one process each, each saved after
    ITERATIONS image updates; the K sets in one file, and the summed wall time. The script's own
    evaluation (one model, one update earlier than the saved set) is not used: its evaluator
    judges the saved sets afterwards. TAG keeps another K's files apart (a cell's folder is
    keyed by IPC and iterations only)."""
    save = copy / f"result-ipc{ipc}-it{iterations}{tag}"
    save.mkdir(exist_ok=True)
    sets, seconds = [], 0.0
    for seed in range(k):
        res, wall = reference_condensation(copy, pairing, ipc, iterations, save, seed)
        if after_each:
            after_each()
        sets += load_tensors(res)["data"]
        seconds += wall
    # the harness's own copy, the sets alone: a res file's accuracies are numpy scalars, which
    # the evaluator's weights_only load would refuse (nothing in the file is executed either way)
    out = save / "sets.pt"
    torch.save({"data": sets}, out)
    return out, seconds


def reference_condensation(
    copy: Path, pairing: Pairing, ipc: int, iterations: int, save: Path, seed: int
) -> tuple[Path, float]:
    """One condensation by the reference script under SEED; its res file and wall time. A
    finished one (its wall time recorded) is not run again: a --work folder resumes here."""
    folder = save / f"seed{seed}"
    wall_file = folder / "parity_wall.json"
    if not wall_file.exists():
        command = [
            sys.executable, "parity_seeded.py", str(seed), pairing.script, "--dataset", "FashionMNIST",
            "--model", "ConvNet", "--ipc", str(ipc), "--Iteration", str(iterations - 1), "--num_exp", "1",
            "--num_eval", "1", "--eval_mode", "C", "--data_path", "data",
            "--save_path", str(folder.relative_to(copy)), *pairing.args,
        ]  # fmt: skip
        start = time.perf_counter()
        with open(save / f"seed{seed}.log", "w") as log:
            subprocess.run(command, cwd=copy, check=True, stdout=log, stderr=subprocess.STDOUT)
        seconds = time.perf_counter() - start
        made = {"seconds": seconds, "machine": cpu_machine(), "commit": head_commit()}
        wall_file.write_text(json.dumps(made))
    (res,) = folder.glob("*.pt")  # DC/DM save res_*.pt, the paper's scripts PREFIX_*.pt
    return res, json.loads(wall_file.read_text())["seconds"]


def reference_evaluates(copy: Path, pairing: Pairing, res: Path, ipc: int, models: int) -> list[list[float]]:
    """The reference's evaluate_synset on every set of `res` (MODELS fresh models each), in %."""
    out = res.with_suffix(".accs.json")
    command = [
        sys.executable, "parity_evaluate.py", "--res", str(res), "--out", str(out),
        "--dataset", "FashionMNIST", "--model", "ConvNet", "--ipc", str(ipc),
        "--num_eval", str(models), "--epochs", str(pairing.eval_epochs),
        "--dsa", str(int(pairing.eval_dsa)),
    ]  # fmt: skip
    if not out.exists():
        with open(out.with_suffix(".log"), "w") as log:
            subprocess.run(command, cwd=copy, check=True, stdout=log, stderr=subprocess.STDOUT)
    return [[100 * a for a in one] for one in json.loads(out.read_text())]


def condense_run(overrides: list[str]) -> dict:
    """One in-process condense job in fp32 on DEVICE, with nothing logged."""
    common = ["dataset=fashion_mnist", "logger=none", "progress=false", f"device={DEVICE}", "precision=fp32"]
    # a checkpoint every iteration: a long condensation resumes where a sitting ended (bookkeeping)
    common += ["budget=none", "evaluation.compare_random=false", "resume=true", "checkpoint_every=1"]
    return run(to_run_config(compose_config([*common, *overrides])))


def convnet_accuracies(record: dict) -> list[float]:
    (per_arch,) = record["evaluation"].values()  # one set per job
    return [100 * a for a in per_arch["ConvNet"]["accuracies"]]


def run_condense(
    preset: str, ipc: int, iterations: int, k: int, models: int, root: Path, after_each: Step = None
) -> tuple[list[list[float]], list[Path], float]:
    """Seeds 0..K-1 of the preset; their accuracies, their set files, the condense stages' time."""
    accs, sets, seconds = [], [], 0.0
    for seed in range(k):
        out = root / f"{preset}-ipc{ipc}-it{iterations}-seed{seed}"
        note_sitting(out)
        record = condense_run([
            f"method={preset}", f"ipc={ipc}", f"iterations={iterations}", f"seed={seed}",
            f"evaluation.num_models={models}", f"output_dir={out}",
        ])  # fmt: skip
        if after_each:
            after_each()
        accs.append(convnet_accuracies(record))
        sets.append(out / "synthetic.safetensors")
        seconds += record["condense"]["seconds"]
    return accs, sets, seconds


SITTINGS = "parity_sittings.json"  # in a condense run's folder: the machines it ran on, in order


def note_sitting(out: Path) -> None:
    """Add this machine to the run's sittings unless the run is finished or this machine was its
    last: a condensation resumed on another host has its seconds from more than one CPU."""
    if finished(out):
        return
    record = out / SITTINGS
    machines = json.loads(record.read_text()) if record.exists() else []
    if machines[-1:] != [cpu_machine()]:
        out.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps([*machines, cpu_machine()]))


def condensation_machines(
    copy: Path, preset: str, ipc: int, iterations: int, k: int, root: Path
) -> list[str]:
    """The machines a cell's 2K condensations ran on, each once (runs older than the ledger
    recorded none)."""
    seen: list[str] = []
    for seed in range(k):
        wall = copy / f"result-ipc{ipc}-it{iterations}" / f"seed{seed}" / "parity_wall.json"
        sittings = root / f"{preset}-ipc{ipc}-it{iterations}-seed{seed}" / SITTINGS
        ran_on = [json.loads(wall.read_text()).get("machine")] if wall.exists() else []
        ran_on += json.loads(sittings.read_text()) if sittings.exists() else []
        seen += [m for m in ran_on if m]
    return list(dict.fromkeys(seen))  # each once, in the order first seen


# The ledger: a cell longer than one sitting, on machines whose disks do not outlive it. Every
# finished step's small results (never the reference's code, never a file the harness rebuilds)
# go into a folder that can be committed, and a later run anywhere restores them before it starts.
REBUILT = ("sets.pt", "-condense-sets.pt")  # merged and exported sets: rebuilt from the seeds
PICTURES = (".png",)  # a set's picture (condense's synthetic.png, the scripts' vis_*.png): not needed


def ledger_files(root: Path) -> list[Path]:
    """The files of `root` (a --work folder) that a later sitting needs, relative to it: finished
    reference condensations and every evaluation's accuracies; condense's run folders whole (a
    checkpoint resumes an unfinished condensation; a finished one's checkpoint is dropped)."""
    kept: list[Path] = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if not path.is_file() or path.name.endswith(REBUILT + PICTURES):
            continue
        top = root / rel.parts[0]
        if (top / "parity_patches.json").exists():  # a reference copy: only what its runs made
            if len(rel.parts) < 3 or not rel.parts[1].startswith("result-"):
                continue
            seed = re.fullmatch(r"(seed\d+)(\.log)?", rel.parts[2])
            if seed and not (top / rel.parts[1] / seed.group(1) / "parity_wall.json").exists():
                continue  # a condensation cut short starts again: nothing of it is kept
        elif path.name == "checkpoint.safetensors" and finished(path.parent):
            continue
        kept.append(rel)
    return kept


def finished(run_folder: Path) -> bool:
    metrics = run_folder / "metrics.json"
    return metrics.exists() and bool(json.loads(metrics.read_text()).get("finished"))


def keep_in_ledger(root: Path, ledger: Path) -> int:
    """Copy what changed of `root`'s results into the ledger; returns how many files."""
    copied = 0
    for rel in ledger_files(root):
        target = ledger / rel
        if not target.exists() or not filecmp.cmp(root / rel, target, shallow=False):
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(root / rel, target)
            copied += 1
    return copied


def ledger_step(args: argparse.Namespace, root: Path) -> Step:
    """What runs after each finished condensation: the ledger's copy, when there is a ledger."""
    return (lambda: keep_in_ledger(root, args.ledger)) if args.ledger else None


def restore_from_ledger(ledger: Path, root: Path) -> int:
    """Copy the ledger's files into `root` where `root` lacks them (a newer file there wins);
    returns how many."""
    restored = 0
    for path in sorted(ledger.rglob("*")):
        target = root / path.relative_to(ledger)
        if path.is_file() and not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
            restored += 1
    return restored


def condense_evaluates(
    preset: str, res: Path, ipc: int, iterations: int, k: int, models: int, root: Path, tag: str = ""
) -> list[list[float]]:
    """condense's evaluator (the preset's protocol) on each experiment of a reference res file."""
    return [
        convnet_accuracies(
            condense_run(
                [
                    "stage=evaluate",
                    f"synthetic={res}",
                    "reader.layout=dc",
                    f"reader.experiment={j}",
                    f"method={preset}",
                    f"ipc={ipc}",
                    f"evaluation.num_models={models}",
                    f"output_dir={root / f'{preset}-ipc{ipc}-it{iterations}{tag}-reference-set{j}'}",
                ]
            )
        )  # fmt: skip
        for j in range(k)
    ]


def set_means(accs: list[list[float]]) -> list[float]:
    return [statistics.mean(one) for one in accs]


def model_spread(accs: list[list[float]]) -> float:
    """The mean over sets of the std across one set's models (population std, as DC prints)."""
    return statistics.mean(statistics.pstdev(one) for one in accs)


def welch_interval(ours: list[float], theirs: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """mean(ours) - mean(theirs) and its Welch interval (unequal variances, Satterthwaite's df)."""
    va, vb = statistics.variance(ours) / len(ours), statistics.variance(theirs) / len(theirs)
    diff = statistics.mean(ours) - statistics.mean(theirs)
    if va + vb == 0:
        return diff, diff, diff
    df = (va + vb) ** 2 / (va**2 / (len(ours) - 1) + vb**2 / (len(theirs) - 1))
    half = stats.t.ppf(0.5 + level / 2, df) * (va + vb) ** 0.5
    return diff, diff - half, diff + half


def verdict(diff: float, low: float, high: float) -> str:
    if low <= 0 <= high or abs(diff) <= PARITY_MARGIN:
        return "parity"
    return "condense higher" if diff > 0 else "condense lower"


def mean_std(values: list[float]) -> str:
    return f"{statistics.mean(values):.2f} +- {statistics.stdev(values):.2f}"


def comparison_row(cell: str, judged_by: str, ours: list[list[float]], theirs: list[list[float]]) -> str:
    """One table row: both sides' sets under one evaluator, compared per condensation."""
    a, b = set_means(ours), set_means(theirs)
    diff, low, high = welch_interval(a, b)
    return (
        f"| {cell} | {judged_by} | {mean_std(a)} | {mean_std(b)} | {diff:+.2f} [{low:+.2f}, {high:+.2f}] "
        f"| {model_spread(ours):.2f} / {model_spread(theirs):.2f} | {verdict(diff, low, high)} |"
    )


def cell_name(cell: str) -> str:
    preset, ipc, iterations, *sizes = cell.split(":")
    return f"{preset} IPC {ipc}, {iterations} it." + (f", K {sizes[0]} x {sizes[1]} models" if sizes else "")


def cell_sizes(args: argparse.Namespace, cell: str) -> tuple[str, int, int, int, int]:
    """A cell's preset, IPC, iterations, K and models (its own K and models, or the run's)."""
    preset, ipc_text, its_text, *sizes = cell.split(":")
    k, models = (int(v) for v in sizes) if sizes else (args.k, args.models)
    return preset, int(ipc_text), int(its_text), k, models


def one_side(args: argparse.Namespace, cell: str, copies: dict[tuple[str, str], Path], root: Path) -> None:
    """--only: one side's K condensations of a cell (condense's with its own evaluation), each
    kept in the ledger as it finishes; the table waits for a run that has both sides."""
    preset, ipc, iterations, k, models = cell_sizes(args, cell)
    pairing = PAIRINGS[preset]
    keep = ledger_step(args, root)
    if args.only == "reference":
        copy = copies[(pairing.reference, commit_of(args, pairing))]
        run_reference(copy, pairing, ipc, iterations, k, after_each=keep)
    else:
        run_condense(preset, ipc, iterations, k, models, root, after_each=keep)
    print(f"{cell_name(cell)}: the {args.only} side's {k} condensations are done", flush=True)


def cell_entry(args: argparse.Namespace, cell: str, copies: dict[tuple[str, str], Path], root: Path) -> dict:
    """Run one cell: both sides' K sets, each judged by both evaluators."""
    preset, ipc, iterations, k, models = cell_sizes(args, cell)
    pairing = PAIRINGS[preset]
    copy = copies[(pairing.reference, commit_of(args, pairing))]
    keep = ledger_step(args, root)
    res, ref_wall = run_reference(copy, pairing, ipc, iterations, k, after_each=keep)
    ours_own, sets, ours_wall = run_condense(preset, ipc, iterations, k, models, root, after_each=keep)
    exported = root / f"{preset}-ipc{ipc}-it{iterations}-condense-sets.pt"
    if not exported.exists():
        export_dc(sets, exported)
    ref_own = reference_evaluates(copy, pairing, res, ipc, models)
    ref_on_ours = reference_evaluates(copy, pairing, exported, ipc, models)
    ours_on_ref = condense_evaluates(preset, res, ipc, iterations, k, models, root)
    side = {"ours": Side(ours_own, ref_on_ours, ours_wall), "ref": Side(ref_own, ours_on_ref, ref_wall)}
    entry = {name: s.__dict__ for name, s in side.items()}
    machines = condensation_machines(copy, preset, ipc, iterations, k, root)
    return entry | {"machines": machines} if len(machines) > 1 else entry


def cell_rows(label: str, entry: dict) -> list[str]:
    """A cell's table rows from its recorded accuracies (this run's or a carried one's)."""
    ours, ref = entry["ours"], entry["ref"]
    return [
        comparison_row(label, "own evaluators", ours["own"], ref["own"]),
        comparison_row(label, "condense's evaluator", ours["own"], ref["crossed"]),
        comparison_row(label, "reference's evaluator", ours["crossed"], ref["own"]),
        f"| {label} | wall: K condensations | {ours['wall_s']:.0f} s | {ref['wall_s']:.0f} s | | | |",
    ]


def spread_interval(
    ours: list[float], theirs: list[float], level: float = 0.95
) -> tuple[float, float, float]:
    """The ratio of the two evaluators' model-to-model stds (condense's / the reference's) and its
    interval from the F distribution of the variance ratio (normal accuracies assumed)."""
    ratio = statistics.variance(ours) / statistics.variance(theirs)
    df = (len(ours) - 1, len(theirs) - 1)
    low = ratio / stats.f.ppf(0.5 + level / 2, *df)
    high = ratio / stats.f.ppf(0.5 - level / 2, *df)
    return ratio**0.5, low**0.5, high**0.5


SPREAD_PREFIX = "spread "  # a spread's key in the .json beside the table: "spread SPEC"


def spread_entry(
    args: argparse.Namespace, spec: str, copies: dict[tuple[str, str], Path], root: Path
) -> dict:
    """One condensation by the reference script, judged by both evaluators with MODELS models
    each: is one evaluator's model-to-model spread wider than the other's on the same set?"""
    preset, ipc_text, its_text, models_text = spec.split(":")
    ipc, iterations, models = int(ipc_text), int(its_text), int(models_text)
    pairing = PAIRINGS[preset]
    copy = copies[(pairing.reference, commit_of(args, pairing))]
    res, wall = run_reference(copy, pairing, ipc, iterations, 1, "-spread")
    (theirs,) = reference_evaluates(copy, pairing, res, ipc, models)
    (ours,) = condense_evaluates(preset, res, ipc, iterations, 1, models, root, "-spread")
    return {"condense's evaluator": ours, "reference's evaluator": theirs, "wall_s": wall}


def spread_rows(spec: str, entry: dict, mark: str = "") -> list[str]:
    """The spread check's section from its recorded accuracies."""
    preset, ipc, iterations, models = spec.split(":")
    ours, theirs = entry["condense's evaluator"], entry["reference's evaluator"]
    ratio, low, high = spread_interval(ours, theirs)
    levene = stats.levene(ours, theirs, center="median")  # Brown-Forsythe: robust to outliers
    name = f"{preset} IPC {ipc}, {iterations} it., the reference's set, {models} models each{mark}"
    rows = [
        "",
        "Model spread: one set made by the reference script, judged by both evaluators (the same",
        "file, MODELS fresh models each). Std: the sample std across models; ratio: condense's std",
        "over the reference's, with its 95 % interval (F distribution); Brown-Forsythe's p tests",
        "equal spreads.",
        "",
        "| set | judged by | mean | std | min - max | std ratio [95 %] | Brown-Forsythe p |",
        "|---|---|---|---|---|---|---|",
    ]
    for judged_by, accs in (("condense's evaluator", ours), ("reference's evaluate_synset", theirs)):
        rows.append(
            f"| {name} | {judged_by} | {statistics.mean(accs):.2f} | {statistics.stdev(accs):.2f} "
            f"| {min(accs):.2f} - {max(accs):.2f} | {ratio:.2f} [{low:.2f}, {high:.2f}] "
            f"| {levene.pvalue:.3f} |"
        )
    shown = [[round(a, 2) for a in accs] for accs in (ours, theirs)]
    rows.append(f"\nPer model, condense's evaluator: {shown[0]}; the reference's: {shown[1]}.")
    return rows


CARRIED = " (earlier run)"  # marks a carried entry's rows


def carried_entries(out_json: Path, remade: set[str]) -> dict[str, dict]:
    """--carry: the entries of the results' .json that this run will not remake, in their order,
    each with the run record that made it (an entry without one cannot say where it came from,
    and is refused). Read before the first cell runs, so a refusal costs no hours."""
    if not out_json.exists():
        return {}
    kept = {key: entry for key, entry in json.loads(out_json.read_text()).items() if key not in remade}
    for key, entry in kept.items():
        if "run" not in entry:
            sys.exit(f"--carry: {out_json} entry {key!r} records no run (commit, machine, command): rerun it")
    return kept


def entry_rows(key: str, entry: dict, mark: str = "") -> tuple[list[str], list[str]]:
    """(table rows, spread section) of one entry of the results' .json."""
    if key.startswith(SPREAD_PREFIX):
        return [], spread_rows(key.removeprefix(SPREAD_PREFIX), entry, mark)
    return cell_rows(key + mark, entry), []


def provenance_lines(carried: dict[str, dict]) -> list[str]:
    """Where the carried entries came from: their commit, machine, command and reference copies,
    once for all the entries one run made."""
    if not carried:
        return []
    by_run: dict[str, list[str]] = {}
    for key, entry in carried.items():
        by_run.setdefault(json.dumps(entry["run"], sort_keys=True), []).append(key)
    lines = ["", f"Entries marked{CARRIED} were carried (--carry) from the run that made them:", ""]
    for record, keys in by_run.items():
        run = json.loads(record)
        lines.append(
            f"- {'; '.join(keys)}: commit {run['commit']}, {run['machine']}; `{run['command']}`; "
            + " ".join(run["references"])
        )
    return lines


def machines_lines(entries: dict[str, dict]) -> list[str]:
    """The cells whose condensations ran on more than one machine (a ledger carried them between
    sittings): their wall times sum seconds of different CPUs."""
    mixed = {key: entry["machines"] for key, entry in entries.items() if "machines" in entry}
    if not mixed:
        return []
    lines = ["", "Cells built over sittings on several machines (their wall rows add up their seconds):", ""]
    return lines + [f"- {key}: {'; '.join(machines)}" for key, machines in mixed.items()]


def commit_of(args: argparse.Namespace, pairing: Pairing) -> str:
    if pairing.commit is not None:
        return pairing.commit
    return args.paper_commit if pairing.reference == "paper" else args.vico_commit


def resolved(checkout: Path, commit: str) -> str:
    done = subprocess.run(
        ["git", "-C", str(checkout), "rev-parse", "--short", f"{commit}^{{commit}}"],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    return done.stdout.strip()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--paper", type=Path, help="a git checkout of ZixuanJiang/improved-dataset-condensation"
    )
    parser.add_argument("--vico", type=Path, help="a git checkout of VICO-UoE/DatasetCondensation")
    parser.add_argument("--paper-commit", default="HEAD")
    parser.add_argument("--vico-commit", default="HEAD", help=f"for DM (DC always runs {VICO_DC_COMMIT})")
    parser.add_argument("--cell", action="append", default=[], help="PRESET:IPC:ITERATIONS[:K:MODELS]")
    parser.add_argument(
        "--spread",
        action="append",
        default=[],
        help="PRESET:IPC:ITERATIONS:MODELS: one reference set judged by both evaluators, MODELS each",
    )
    parser.add_argument("-k", type=int, default=3, help="condensations a side (at least 3)")
    parser.add_argument("--models", type=int, default=5, help="evaluated models per set")
    parser.add_argument("--fashion-mnist", type=Path, default=FASHION_MNIST_IDX)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/parity.md"))
    parser.add_argument(
        "--work",
        type=Path,
        help="keep the copies, logs and sets here, and resume a run cut short (default: temporary)",
    )
    parser.add_argument(
        "--ledger",
        type=Path,
        help="copy every finished condensation's and evaluation's results here (a folder to commit) "
        "and restore them first: a cell longer than one sitting resumes on another machine",
    )
    parser.add_argument(
        "--only",
        choices=("reference", "condense"),
        help="run only this side's condensations and write no table (a sitting too short, or a "
        "host too slow, for the other side's); a later run without --only finishes the cells",
    )
    parser.add_argument(
        "--carry",
        action="store_true",
        help="keep the entries of --out's .json that this run does not remake, each with its own run",
    )
    args = parser.parse_args()
    if not args.cell and not args.spread:
        parser.error("give at least one --cell or --spread")
    if args.only and args.spread:
        parser.error("--only runs the condensations of --cell entries: drop the --spread entries")
    for spec in args.spread:
        if not re.fullmatch(r"\w+:\d+:[1-9]\d*:([3-9]|[1-9]\d+)", spec) or spec.split(":")[0] not in PAIRINGS:
            parser.error(
                f"--spread {spec}: expected PRESET:IPC:ITERATIONS:MODELS (MODELS >= 3), PRESET "
                f"in {sorted(PAIRINGS)}"
            )
        if getattr(args, PAIRINGS[spec.split(":")[0]].reference) is None:
            parser.error(f"--spread {spec}: needs --{PAIRINGS[spec.split(':')[0]].reference} CHECKOUT")
    if args.k < 3:
        parser.error("-k: at least 3 condensations a side (an interval needs a spread on each)")
    for cell in args.cell:
        shape = re.fullmatch(r"\w+:\d+:[1-9]\d*(:(\d+):[1-9]\d*)?", cell)
        if not shape or cell.split(":")[0] not in PAIRINGS:
            parser.error(
                f"--cell {cell}: expected PRESET:IPC:ITERATIONS[:K:MODELS] with PRESET in {sorted(PAIRINGS)}"
            )
        if shape.group(2) is not None and int(shape.group(2)) < 3:
            parser.error(f"--cell {cell}: K at least 3 (an interval needs a spread on each side)")
        checkout = getattr(args, PAIRINGS[cell.split(":")[0]].reference)
        if checkout is None:
            parser.error(f"--cell {cell}: needs --{PAIRINGS[cell.split(':')[0]].reference} CHECKOUT")
    return args


def main() -> None:
    args = parse_args()
    commit_here = head_commit()
    command = "python " + shlex.join(["benchmarks/parity.py", *sys.argv[1:]])
    machine = cpu_machine()
    if DEVICE == "cuda":  # condense's fp32 keeps TF32 off; the reference's cuDNN default allows it
        gpu = torch.cuda.get_device_name()
        machine += f"; both sides on {gpu} (the reference with torch's TF32 defaults)"
    lines = [
        f"# Parity with the reference codes (Fashion-MNIST, fp32, {DEVICE.upper()})",
        "",
        f"Machine: {machine}. Commit: {commit_here}.",
        "",
        f"Command: `{command}`",
        "",
    ]
    out_json = args.out.with_suffix(".json")
    remade = {cell_name(cell) for cell in args.cell} | {SPREAD_PREFIX + spec for spec in args.spread}
    carried = carried_entries(out_json, remade) if args.carry else {}
    made: dict[str, dict] = {}  # per entry and side, every model's accuracy: the .json beside the table
    references: list[str] = []
    with tempfile.TemporaryDirectory(prefix="parity-") as tmp:
        root = args.work or Path(tmp)
        copies: dict[tuple[str, str], Path] = {}
        for cell in [*args.cell, *args.spread]:
            pairing = PAIRINGS[cell.split(":")[0]]
            key = (pairing.reference, commit_of(args, pairing))
            if key in copies:
                continue
            checkout = getattr(args, pairing.reference)
            commit = resolved(checkout, key[1])
            copies[key] = root / f"{pairing.reference}-{commit}"
            applied = prepare_reference(checkout, commit, copies[key], args.fashion_mnist)
            references.append(
                f"Reference {pairing.reference} at {commit}; patches: " + ("; ".join(applied) or "none") + "."
            )
        if args.ledger:
            print(f"ledger: {restore_from_ledger(args.ledger, root)} files restored from {args.ledger}")
        run_record = {"commit": commit_here, "machine": machine, "command": command, "references": references}
        # SIGTERM (a sitting's end, Slurm's time limit) unwinds like Ctrl-C: the ledger gets the
        # last checkpoint of an unfinished condensation, and a running reference script is killed
        previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit("parity: stopped by SIGTERM"))
        try:
            if args.only:
                for cell in args.cell:
                    one_side(args, cell, copies, root)
                return  # no table: it needs both sides
            for cell in args.cell:
                name = cell_name(cell)
                made[name] = cell_entry(args, cell, copies, root) | {"run": run_record}
                print("\n".join(cell_rows(name, made[name])), flush=True)
            for spec in args.spread:
                made[SPREAD_PREFIX + spec] = spread_entry(args, spec, copies, root) | {"run": run_record}
        finally:
            signal.signal(signal.SIGTERM, previous)
            if args.ledger:
                print(f"ledger: {keep_in_ledger(root, args.ledger)} files kept in {args.ledger}")
    lines += references
    lines += [
        "",
        f"K = {args.k} condensations a side, {args.models} evaluated ConvNets per set (a cell that",
        "names its own K and models says so; a carried entry's command gives its own). Accuracies",
        "are mean +- std over the K condensations of each set's mean; the difference is condense",
        "minus reference with its Welch 95 % interval; parity: the interval holds 0 or",
        f"|difference| <= {PARITY_MARGIN}.",
        "Model spread: the mean std across one set's models (condense's sets / the reference's sets).",
        "",
        "| cell | judged by | condense | reference | difference [95 %] | model spread | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    spreads: list[str] = []
    for entries, mark in ((made, ""), (carried, CARRIED)):
        for key, entry in entries.items():
            table, section = entry_rows(key, entry, mark)
            lines += table
            spreads += section
    lines += spreads + machines_lines(made | carried) + provenance_lines(carried)
    out_json.write_text(json.dumps(made | carried, indent=1))
    lines.append(f"\nEvery model's accuracy, per cell and side: {out_json.name}.")
    write_results(args.out, lines)


if __name__ == "__main__":
    main()
