"""DM, DCC, DC, Ours-MDA, IDM, one-step matching and the random subset side by side: accuracy
and wall time per method.

Run by hand, alone on the machine (one job at a time):

    python benchmarks/baselines.py --cell 1:20:200:5 --cell 10:3:60:2 \
        --out benchmarks/results/baselines.md

A cell is IPC:ITERATIONS:DM_ITERATIONS:MODELS. The gradient methods (DC, DCC, Ours-MDA, one-step)
take ITERATIONS iterations; DM and IDM, whose iterations need no inner loop and no second-order
gradients, take DM_ITERATIONS (their published runs take 20x the gradient methods' 1000).
`--methods` picks a subset; `--override METHOD:KEY=VALUE` changes one method's setting (the table
lists it), e.g. a real batch that fits the CPU. Each method runs under its
own preset's protocol (DM and DCC as their authors ran them: conf/method/dm.yaml, dcc.yaml) in
fp32 on Fashion-MNIST, one condensation (seed 0) evaluated on MODELS ConvNets over the full test
set; every set of a cell meets the same evaluated model initialisations (condense's paired
evaluation). Wall time is the condense stage plus the evaluation of the method's own set.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from results_file import machine_description, write_results

from condense.app.cli import compose_config, run
from condense.primitives.compute import cpu_has_native_bf16
from condense.schema import to_run_config

METHODS = {
    "dm": "DM",
    "dcc": "DCC",
    "dc": "DC",
    "ours_mda": "Ours-MDA",
    "idm": "IDM",
    "one_step": "one-step",
    "random": "random",
}
DISTRIBUTION = ("dm", "idm")  # cheap iterations: they take the cell's DM_ITERATIONS


def run_method(
    method: str, ipc: int, iterations: int, models: int, out: Path, extra: list[str] = ()
) -> dict:
    overrides = [
        "dataset=fashion_mnist",
        f"ipc={ipc}",
        f"method={method}",
        f"iterations={iterations}",
        "seed=0",
        f"evaluation.num_models={models}",
        "evaluation.compare_random=false",
        "logger=none",
        "progress=false",
        "device=cpu",
        "precision=fp32",
        f"output_dir={out}",
        *extra,
    ]
    return run(to_run_config(compose_config(overrides)))


def cell_rows(
    ipc: int,
    iterations: int,
    dm_iterations: int,
    models: int,
    root: Path,
    methods: list[str],
    overrides: dict[str, list[str]],
) -> list[str]:
    rows = []
    for method in methods:
        its = dm_iterations if method in DISTRIBUTION else 0 if method == "random" else iterations
        extra = overrides.get(method, [])
        metrics = run_method(method, ipc, max(its, 1), models, root / f"ipc{ipc}-{method}", extra)
        name = METHODS[method] + (f" ({', '.join(extra)})" if extra else "")
        result = metrics["evaluation"][metrics["label"]]["ConvNet"]
        eval_s = metrics["evaluation_seconds"][metrics["label"]]["ConvNet"]
        accs = [100 * a for a in result["accuracies"]]
        std = statistics.pstdev(accs) if len(accs) > 1 else 0.0
        condense_s = metrics["condense"]["seconds"]  # random: picking the subset
        card = metrics["protocol_card"]
        rows.append(
            f"| {ipc} | {name} | {its} | {statistics.mean(accs):.2f} +- {std:.2f} | {len(accs)} "
            f"| {condense_s:.0f} | {eval_s:.0f} | {condense_s + eval_s:.0f} "
            f"| {card['evaluation']}, {card['augmentation']}, lr_img {card['lr_img']} |"
        )
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cell", action="append", required=True, help="IPC:ITERATIONS:DM_ITERATIONS:MODELS")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/baselines.md"))
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--override", action="append", default=[], help="METHOD:KEY=VALUE")
    parser.add_argument("--title", default="Baselines: DM, DCC, DC, Ours-MDA and random on Fashion-MNIST")
    args = parser.parse_args()
    overrides: dict[str, list[str]] = {}
    for item in args.override:
        method, setting = item.split(":", 1)
        overrides.setdefault(method, []).append(setting)
    native = "bf16 native" if cpu_has_native_bf16() else "bf16 not native"
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    commit = git.stdout.strip()
    lines = [
        f"# {args.title}",
        "",
        f"Machine: {machine_description('2 threads')}; {native} (every number below is fp32).",
        f"Commit: {commit}.",
        "",
        "Command: `python " + shlex.join(["benchmarks/baselines.py", *sys.argv[1:]]) + "`",
        "",
        "| IPC | method | iterations | accuracy (%) | models | condense s | evaluation s | wall s "
        "| protocol |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for cell in args.cell:
            ipc, iterations, dm_iterations, models = (int(v) for v in cell.split(":"))
            lines += cell_rows(ipc, iterations, dm_iterations, models, Path(tmp), args.methods, overrides)
    write_results(args.out, lines)


if __name__ == "__main__":
    main()
