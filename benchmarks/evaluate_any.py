"""One set through three readers, and DD-Ranking's metrics for DC, Ours-MD and random.

Run by hand, alone on the machine (one job at a time):

    python benchmarks/evaluate_any.py --iterations 20 --models 3 --full-epochs 1 \
        --out benchmarks/results/evaluate_any.md

1. Condenses Fashion-MNIST at IPC 1 with DC and with Ours-MD (ITERATIONS iterations each, seed 0,
   fp32) and picks the random subset, each saved by condense (stage=condense).
2. Writes the DC set again in two foreign layouts, DC's result file (res_*.pt) and MTT's
   images_best.pt / labels_best.pt, and evaluates it through each reader and condense's own file
   with the same MODELS paired ConvNets: the accuracies must be equal model by model.
3. Evaluates each of the three sets with ranking=dd_ranking under one evaluation protocol (DC's,
   300 + 1 epochs), the whole-dataset reference being condense's own run (the same paired models
   trained on all 60,000 training images for FULL_EPOCHS under that schedule), computed once and
   cached for the other two.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from results_file import cpu_machine, head_commit, write_results

from condense.app.cli import compose_config, run
from condense.primitives.synthetic import load_synthetic
from condense.schema import to_run_config

COMMON = [
    "dataset=fashion_mnist",
    "ipc=1",
    "seed=0",
    "logger=none",
    "progress=false",
    "device=cpu",
    "precision=fp32",
]
SETS = {"dc": "DC", "ours_md": "Ours-MD", "random": "random"}


def condense_set(method: str, iterations: int, out: Path) -> Path:
    overrides = [
        *COMMON,
        f"method={method}",
        f"iterations={iterations}",
        "stage=condense",
        f"output_dir={out}",
    ]
    metrics = run(to_run_config(compose_config(overrides)))
    print(f"{method}: condensed in {metrics['condense']['seconds']:.0f} s", flush=True)
    return out / "synthetic.safetensors"


def evaluate(synthetic: Path, models: int, out: Path, extra: list[str]) -> dict:
    overrides = [
        *COMMON,
        "stage=evaluate",
        f"synthetic={synthetic}",
        f"evaluation.num_models={models}",
        f"output_dir={out}",
        *extra,
    ]
    return run(to_run_config(compose_config(overrides)))


def foreign_copies(own: Path, root: Path) -> dict[str, Path]:
    """The set of `own` in DC's result-file layout and in MTT's output layout."""
    syn = load_synthetic(own)
    dc = root / "res_DC_FashionMNIST_ConvNet_1ipc.pt"
    torch.save({"data": [[syn.images, syn.labels]], "accs_all_exps": {"ConvNet": [np.float64(0.0)]}}, dc)
    mtt = root / "mtt_run"
    mtt.mkdir()
    torch.save(syn.images, mtt / "images_best.pt")
    torch.save(syn.labels, mtt / "labels_best.pt")
    return {"condense (safetensors)": own, "dc (res_*.pt)": dc, "mtt (images_best.pt)": mtt}


def reader_rows(own: Path, models: int, root: Path) -> list[str]:
    rows = []
    for name, path in foreign_copies(own, root).items():
        metrics = evaluate(
            path, models, root / f"read-{name.split()[0]}", ["evaluation.compare_random=false"]
        )
        result = metrics["evaluation"][metrics["label"]]["ConvNet"]
        accs = ", ".join(f"{100 * a:.2f}" for a in result["accuracies"])
        rows.append(f"| {name} | {metrics['label']} | {accs} | {100 * result['mean']:.2f} |")
        print(rows[-1], flush=True)
    return rows


def ranking_rows(sets: dict[str, Path], models: int, full_epochs: int, root: Path) -> list[str]:
    rows = []
    ranking = ["ranking=dd_ranking", "ranking.full_run=true", f"ranking.full_epochs={full_epochs}"]
    for method, path in sets.items():
        metrics = evaluate(path, models, root / f"rank-{method}", [*ranking, f"dataset.root={root / 'data'}"])
        rk = metrics["ranking"]
        acc = rk["accuracies"]
        rows.append(
            f"| {SETS[method]} | {100 * acc['set_own']:.2f} | {100 * acc['random_own']:.2f} "
            f"| {100 * acc['set_aug']:.2f} | {100 * acc['random_aug']:.2f} | {100 * acc['full_hard']:.2f} "
            f"| {100 * rk['hlr']:.2f} | {100 * rk['ior']:.2f} "
            f"| {100 * rk['lrs']:.2f} | {100 * rk['ars']:.2f} |"
        )
        print(rows[-1], flush=True)
        source = rk["full_reference"]["source"].split(", saved at")[0].split(", cached at")[0]
    return [*rows, "", f"Whole-dataset reference: {source}.", ""]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--models", type=int, default=3)
    parser.add_argument("--full-epochs", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/evaluate_any.md"))
    args = parser.parse_args()
    lines = [
        "# Evaluating any set: three readers, one accuracy; DD-Ranking's metrics",
        "",
        f"Machine: {cpu_machine()} (every number below is fp32).",
        f"Commit: {head_commit()}.",
        "",
        "Command: `python " + " ".join(["benchmarks/evaluate_any.py", *sys.argv[1:]]) + "`",
        "",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        sets = {m: condense_set(m, args.iterations, root / f"made-{m}") for m in SETS}
        lines += [
            f"## The DC set (Fashion-MNIST, IPC 1, {args.iterations} iterations) through three readers",
            "",
            "| read as | label | accuracy of each paired model (%) | mean (%) |",
            "|---|---|---|---|",
            *reader_rows(sets["dc"], args.models, root),
            "",
            f"## DD-Ranking's metrics, Fashion-MNIST IPC 1, {args.models} paired ConvNets, "
            "DC's evaluation protocol",
            "",
            'Accuracies in %, HLR and IOR in points, LRS and ARS in % (docs/evaluating.md). "set" and '
            '"random" are without augmentation (the protocol), "+DSA" with it, for ARS.',
            "",
            "| set | set | random | set +DSA | random +DSA | whole dataset | HLR | IOR | LRS | ARS |",
            "|---|---|---|---|---|---|---|---|---|---|",
            *ranking_rows(sets, args.models, args.full_epochs, root),
        ]
    write_results(args.out, lines)


if __name__ == "__main__":
    main()
