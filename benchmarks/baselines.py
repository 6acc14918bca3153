"""DM, DCC, DC, Ours-MDA, IDM, one-step matching, MTT, FTD and the random subset side by side:
accuracy and wall time per method.

Run by hand, alone on the machine (one job at a time):

    python benchmarks/baselines.py --cell 1:20:200:5 --cell 10:3:60:2 \
        --out benchmarks/results/baselines.md
    python benchmarks/baselines.py --cell 1:20:200:5:100 --methods mtt ftd random \
        --override mtt:experts.num=2 --override mtt:experts.epochs=4 ... --append

A cell is IPC:ITERATIONS:DM_ITERATIONS:MODELS[:TRAJECTORY_ITERATIONS]. The gradient methods (DC,
DCC, Ours-MDA, one-step) take ITERATIONS iterations; DM and IDM, whose iterations need no inner
loop and no second-order gradients, take DM_ITERATIONS (their published runs take 20x the gradient
methods' 1000); MTT and FTD take TRAJECTORY_ITERATIONS (default 5 x ITERATIONS: their published
runs take 5000). `--methods` picks a subset (MTT and FTD run only when named: their published
experts, 100 of 50 epochs, take days on a CPU); `--override METHOD[@IPC]:KEY=VALUE` changes one
method's setting, in every cell or in one IPC's (the table lists it), e.g. a real batch that fits
the CPU, or experts and a segment that fit it. Every run is composed and validated before the
first starts. Each method runs under its own preset's protocol (DM and DCC as their authors ran
them: conf/method/dm.yaml, dcc.yaml; MTT and FTD with DSA and their learned lr) in fp32 on
Fashion-MNIST, one condensation (seed 0) evaluated on MODELS ConvNets over the full test set;
every set of a cell meets the same evaluated model initialisations (condense's paired
evaluation). Wall time is the condense stage plus the evaluation of the method's own set, plus,
for MTT and FTD, the training of the experts they draw from. Those are kept under
`--experts-root` (default: a temporary folder, lost after the run; name one so that reruns
share them), and each expert file records what its training took, on the machine that trained
it: the `experts s` column reads it from there. `--append` adds the table as a new section of
`--out` (its own machine, commit and command) instead of replacing the file.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from results_file import cpu_machine, head_commit, write_results

from condense.app.cli import compose_config, run
from condense.app.validation import validate
from condense.schema import ConfigError, RunConfig, to_run_config

METHODS = {
    "dm": "DM",
    "dcc": "DCC",
    "dc": "DC",
    "ours_mda": "Ours-MDA",
    "idm": "IDM",
    "one_step": "one-step",
    "mtt": "MTT",
    "ftd": "FTD",
    "random": "random",
}
DISTRIBUTION = ("dm", "idm")  # cheap iterations: they take the cell's DM_ITERATIONS
CELL_FORMAT = "IPC:ITERATIONS:DM_ITERATIONS:MODELS[:TRAJECTORY_ITERATIONS]"
TRAJECTORY = ("mtt", "ftd")  # 5000 published iterations: the cell's TRAJECTORY_ITERATIONS


def method_overrides(method: str, cell: Cell, out: Path, extra: Sequence[str]) -> list[str]:
    """One method's run in one cell: its preset at the cell's budget, seed 0, fp32, on the CPU."""
    return [
        "dataset=fashion_mnist",
        f"ipc={cell.ipc}",
        f"method={method}",
        f"iterations={max(cell.iterations_of(method), 1)}",
        "seed=0",
        f"evaluation.num_models={cell.models}",
        "evaluation.compare_random=false",
        "logger=none",
        "progress=false",
        "device=cpu",
        "precision=fp32",
        f"output_dir={out}",
        *extra,
    ]


@dataclass(frozen=True)
class Cell:
    """One IPC's budgets: iterations per family and evaluated models."""

    ipc: int
    iterations: int
    dm_iterations: int
    models: int
    trajectory_iterations: int

    @classmethod
    def parse(cls, text: str) -> Cell:
        values = [int(v) for v in text.split(":")]
        if len(values) not in (4, 5):
            raise SystemExit(f"--cell {text}: give {CELL_FORMAT}")
        ipc, iterations, dm_iterations, models = values[:4]
        return cls(ipc, iterations, dm_iterations, models, values[4] if len(values) == 5 else 5 * iterations)

    def iterations_of(self, method: str) -> int:
        if method == "random":
            return 0
        if method in DISTRIBUTION:
            return self.dm_iterations
        return self.trajectory_iterations if method in TRAJECTORY else self.iterations


def experts_seconds(metrics: dict) -> float | None:
    """What training the experts of a trajectory-matching run took (0 for every other method):
    as their files record it, whichever run trained them; None when they do not record it (MTT's
    buffer files, expert files older than that record)."""
    experts = metrics.get("experts")
    if not experts:
        return 0.0
    seconds = experts.get("training_seconds")
    return None if seconds is None else float(seconds)


def method_row(ipc: int, name: str, iterations: int, metrics: dict) -> str:
    """One table row from a run's metrics.json: accuracy over the paired models, and the seconds
    of each part (experts only for MTT and FTD) and their total."""
    result = metrics["evaluation"][metrics["label"]]["ConvNet"]
    eval_s = metrics["evaluation_seconds"][metrics["label"]]["ConvNet"]
    accs = [100 * a for a in result["accuracies"]]
    std = statistics.pstdev(accs) if len(accs) > 1 else 0.0
    condense_s = metrics["condense"]["seconds"]  # random: picking the subset
    experts_s = experts_seconds(metrics)
    if experts_s is None:  # the total leaves them out, and says so
        experts, total = "not recorded", f"{condense_s + eval_s:.0f} + experts"
    else:
        experts, total = f"{experts_s:.0f}" if experts_s else "-", f"{experts_s + condense_s + eval_s:.0f}"
    card = metrics["protocol_card"]
    return (
        f"| {ipc} | {name} | {iterations} | {statistics.mean(accs):.2f} +- {std:.2f} | {len(accs)} "
        f"| {experts} | {condense_s:.0f} | {eval_s:.0f} | {total} "
        f"| {card['evaluation']}, {card['augmentation']}, lr_img {card['lr_img']} |"
    )


def settings_of(method: str, cell: Cell, overrides: dict[str, list[str]]) -> list[str]:
    """The --override settings of a method in a cell: METHOD's, then METHOD@IPC's."""
    return [*overrides.get(method, []), *overrides.get(f"{method}@{cell.ipc}", [])]


def planned_runs(
    cells: list[Cell], methods: list[str], overrides: dict[str, list[str]], root: Path, experts_root: Path
) -> list[tuple[Cell, str, list[str], RunConfig]]:
    """Every run of the table, composed and validated before the first one starts: a setting that
    cannot work (a trajectory segment past the experts' epochs) stops the script at once, not
    hours in."""
    runs = []
    for cell in cells:
        for method in methods:
            extra = settings_of(method, cell, overrides)
            kept = [f"experts.root={experts_root}"] if method in TRAJECTORY else []
            out = root / f"ipc{cell.ipc}-{method}"
            try:
                cfg = to_run_config(compose_config(method_overrides(method, cell, out, [*kept, *extra])))
                validate(cfg)
            except ConfigError as error:
                raise SystemExit(f"ipc {cell.ipc}, {method}: {error}") from None
            runs.append((cell, method, extra, cfg))
    return runs


def table_rows(runs: list[tuple[Cell, str, list[str], RunConfig]]) -> list[str]:
    rows = []
    for cell, method, extra, cfg in runs:
        metrics = run(cfg)
        name = METHODS[method] + (f" ({', '.join(extra)})" if extra else "")
        rows.append(method_row(cell.ipc, name, cell.iterations_of(method), metrics))
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cell", action="append", required=True, help=CELL_FORMAT)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/baselines.md"))
    # MTT and FTD only when named: their experts at the published budget take days on a CPU
    default = [m for m in METHODS if m not in TRAJECTORY]
    parser.add_argument("--methods", nargs="*", default=default, choices=list(METHODS))
    parser.add_argument("--override", action="append", default=[], help="METHOD[@IPC]:KEY=VALUE")
    parser.add_argument("--title", default="Baselines on Fashion-MNIST")
    parser.add_argument(
        "--experts-root", type=Path, help="MTT's and FTD's experts' cache (default: temporary)"
    )
    parser.add_argument("--append", action="store_true", help="add the table to --out as a new section")
    args = parser.parse_args()
    cells = [Cell.parse(text) for text in args.cell]
    overrides: dict[str, list[str]] = {}
    for item in args.override:
        method, setting = item.split(":", 1)
        overrides.setdefault(method, []).append(setting)
    lines = [
        f"{'##' if args.append else '#'} {args.title}",
        "",
        f"Machine: {cpu_machine()} (every number below is fp32).",
        f"Commit: {head_commit()}.",
        "",
        "Command: `python " + shlex.join(["benchmarks/baselines.py", *sys.argv[1:]]) + "`",
        "",
        "| IPC | method | iterations | accuracy (%) | models | experts s | condense s | evaluation s "
        "| wall s | protocol |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        experts_root = args.experts_root or Path(tmp) / "experts"
        lines += table_rows(planned_runs(cells, args.methods, overrides, Path(tmp), experts_root))
    if args.append and args.out.exists():
        lines = [args.out.read_text().rstrip("\n"), "", *lines]
    write_results(args.out, lines)


if __name__ == "__main__":
    main()
