"""A small sweep that chooses a preset's values where no published ones exist: one Hydra multirun
of the real CLI, tabled by condense-report, written with its command, commit and machine.

Run by hand (not in CI), alone on the machine:

    python benchmarks/preset_sweep.py --title "MTT on Fashion-MNIST, IPC 1" \
        --work /tmp/mtt_sweep --out benchmarks/results/mtt_fashion_mnist_sweep.md -- \
        method=mtt dataset=fashion_mnist ipc=1 lr_img=100,1000 matching.syn_steps=20,50

Everything after `--` is the multirun's overrides (comma lists sweep, as on the command line).
The table is condense-report's (mean +- std over every model of every seed of a variant), with
each run's condensation and evaluation seconds beside it; --note adds a line of reading.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import subprocess
from pathlib import Path

import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from results_file import head_commit, run_machine, write_results

from condense.report import report


def run_multirun(overrides: list[str], work: Path) -> None:
    """The sweep through the real CLI (its validation, its folders), one run after another. A
    sweep cut short goes on with resume=true: its finished jobs are read back, a cut one resumes
    from its checkpoint (the job folders do not name resume)."""
    again = ["resume=true"] if work.exists() else []
    command = [
        "condense",
        "-m",
        *overrides,
        *again,
        f"hydra.sweep.dir={work}",
        "logger=none",
        "progress=false",
    ]
    subprocess.run(command, check=True)


def job_count(overrides: list[str]) -> int:
    """How many jobs the multirun makes: the product of its sweeps' lengths (Hydra's parser)."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    return math.prod(len(list(o.sweep_string_iterator())) if o.is_sweep_override() else 1 for o in parsed)


def finished(work: Path, overrides: list[str]) -> bool:
    return len(list(work.glob("*/metrics.json"))) == job_count(overrides)


def job_overrides(job: Path) -> dict[str, str]:
    """A job's command-line overrides, as Hydra kept them (.hydra/overrides.yaml)."""
    kept = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())
    return dict(item.split("=", 1) for item in kept if not item.startswith("resume="))


def run_seconds(work: Path) -> list[str]:
    """One line per run: the values the sweep varied and the seconds of its condensation and
    evaluation."""
    runs = sorted(work.glob("*/metrics.json"), key=lambda p: int(p.parent.name.split("-")[0]))
    chosen = [job_overrides(m.parent) for m in runs]
    varied = [key for key in chosen[0] if len({c.get(key) for c in chosen}) > 1]
    header = ["job", *varied, "condense s", "evaluation s (every set)"]
    lines = [table_row(header), table_row(["---"] * len(header))]
    for metrics, values in zip(runs, chosen, strict=True):
        record = json.loads(metrics.read_text())
        condense_s = record.get("condense", {}).get("seconds", 0.0)
        evaluation_s = sum(one["total"] for one in record.get("evaluation_seconds", {}).values())
        job = metrics.parent.name.split("-")[0]
        lines.append(
            table_row([job, *(values[key] for key in varied), f"{condense_s:.0f}", f"{evaluation_s:.0f}"])
        )
    return lines


def table_row(cells: list[str]) -> str:
    """A markdown row with one cell per entry: a sweep of one value varies no key, and its table
    must still have as many cells in every row as in its header."""
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--title", required=True, help="what the sweep chooses")
    parser.add_argument("--work", type=Path, required=True, help="the multirun folder (kept)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--note", action="append", default=[], help="a line of reading under the table")
    parser.add_argument("overrides", nargs="+", help="the multirun's overrides, after --")
    args = parser.parse_args()
    if not finished(args.work, args.overrides):  # a finished sweep is tabled again, not rerun
        run_multirun(args.overrides, args.work)
    table = report([args.work], args.work / "report")["markdown"].rstrip("\n").splitlines()
    # the notes are prose under the table, not part of what ran
    ran = ["--title", args.title, "--work", str(args.work), "--out", str(args.out), "--", *args.overrides]
    command = shlex.join(["python", "benchmarks/preset_sweep.py", *ran])
    lines = [
        f"# Preset sweep: {args.title}",
        "",
        f"Machine: {run_machine()}. Commit: {head_commit()}.",
        "",
        f"Command: `{command}`",
        "",
        *table,
        "",
        *run_seconds(args.work),
    ]
    for note in args.note:
        lines += ["", note]
    write_results(args.out, lines)


if __name__ == "__main__":
    main()
