"""Peak memory of trajectory matching (MTT's step) against syn_steps and IPC on Fashion-MNIST.

Each cell is one distillation iteration of `condense method=mtt stage=condense` in a fresh
process (peak resident memory, the whole process: data, experts' snapshots, the unrolled graph).
The student's graph holds every unrolled step's activations until the backward pass, so memory
should grow linearly with syn_steps x the synthetic batch; the table says by how much. The
experts are one trajectory of 2 epochs (memory does not depend on how well they are trained),
trained once into a temporary cache before the cells run.

Run by hand, alone on the machine:

    python benchmarks/trajectory_memory.py --out benchmarks/results/trajectory_memory.md

A cell whose predicted peak exceeds --max-gib (from the measured slope) is not run, and the
table says so.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from results_file import cpu_machine, head_commit, max_rss_gib, write_results

COMMON = [
    "method=mtt", "dataset=fashion_mnist", "logger=none", "progress=false", "device=cpu",
    "precision=fp32", "experts.num=1", "experts.epochs=2", "matching.expert_epochs=1",
    "matching.max_start_epoch=2", "lr_img=100",
]  # fmt: skip


def command(root: Path, out: Path, *more: str) -> list[str]:
    return [sys.executable, "-m", "condense", *COMMON, f"experts.root={root}", *more, f"hydra.run.dir={out}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--ipcs", type=int, nargs="+", default=[1, 10, 50])
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 5, 10, 20])
    parser.add_argument("--max-gib", type=float, default=16.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root, runs = Path(tmp) / "experts", Path(tmp)
        started = time.perf_counter()
        subprocess.run(command(root, runs / "experts_run", "stage=experts"), check=True, capture_output=True)
        expert_seconds = time.perf_counter() - started
        rows, peaks = [], {}
        for ipc in args.ipcs:
            for steps in args.steps:
                predicted = predicted_peak(peaks, ipc, steps)
                if predicted is not None and predicted > args.max_gib:
                    rows.append(f"| {ipc} | {steps} | not run (predicted {predicted:.1f} GiB) | |")
                    continue
                out = runs / f"ipc{ipc}_steps{steps}"
                began = time.perf_counter()
                cell = [f"ipc={ipc}", f"matching.syn_steps={steps}", "iterations=1", "stage=condense"]
                peaks[(ipc, steps)] = max_rss_gib(command(root, out, *cell))
                seconds = time.perf_counter() - began
                rows.append(f"| {ipc} | {steps} | {peaks[(ipc, steps)]:.2f} | {seconds:.0f} |")
                print(rows[-1], flush=True)
    lines = [
        "# Trajectory matching: peak memory against syn_steps and IPC (Fashion-MNIST, ConvNet-3)",
        "",
        f"Machine: {cpu_machine()}. "
        f"Commit {head_commit()}, fp32, one process per cell, nothing else running.",
        "",
        "    python benchmarks/trajectory_memory.py --out benchmarks/results/trajectory_memory.md",
        "",
        f"Experts: one trajectory of 2 epochs on the 60,000 training images ({expert_seconds:.0f} s "
        "including the process start). Each cell: one distillation iteration, the whole set per student "
        "step (batch_syn null), DSA on, peak resident memory of the whole process, and its wall seconds "
        "(process start, data, the iteration and the evaluation of nothing: stage=condense).",
        "",
        "| IPC | syn_steps | peak GiB | wall s |",
        "|---|---|---|---|",
        *rows,
        "",
        *slopes_text(peaks, args.ipcs, args.steps),
    ]
    write_results(args.out, lines)


def slope_of(peaks: dict[tuple[int, int], float], ipc: int) -> float | None:
    """GiB per unrolled step at this IPC, from the two smallest measured step counts."""
    measured = sorted(s for i, s in peaks if i == ipc)
    if len(measured) < 2:
        return None
    a, b = measured[0], measured[1]
    return (peaks[(ipc, b)] - peaks[(ipc, a)]) / (b - a)


def predicted_peak(peaks: dict[tuple[int, int], float], ipc: int, steps: int) -> float | None:
    """The peak a cell would reach on the line through this IPC's first two measured cells."""
    slope = slope_of(peaks, ipc)
    if slope is None:
        return None
    first = min(s for i, s in peaks if i == ipc)
    return peaks[(ipc, first)] + slope * (steps - first)


def slopes_text(peaks: dict[tuple[int, int], float], ipcs: list[int], steps: list[int]) -> list[str]:
    lines = ["Growth per unrolled step (from the first two step counts measured):", ""]
    for ipc in ipcs:
        slope = slope_of(peaks, ipc)
        if slope is not None:
            lines.append(f"- IPC {ipc}: {1024 * slope:.1f} MiB per step")
    return lines


if __name__ == "__main__":
    main()
