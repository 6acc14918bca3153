"""precision=auto on this machine: the ratio it measures and the precision it picks, and the
README's first command (`condense`: DC on digits, the demo budget) under precision=fp32 and
precision=auto, with accuracies and times.

Run by hand, alone on the machine (one job at a time):

    python benchmarks/auto_precision.py --out benchmarks/results/precision.md

It replaces the section "## precision=auto on this machine" of the results file (the rest of the
file is benchmarks/precision.py's) or appends it. The measurement runs with an empty cache of its
own, so it measures rather than reads an earlier ratio; each network is measured twice, in two
fresh caches, to show the measurement's spread.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
from results_file import cpu_machine, head_commit

from condense.app.cli import compose_config, run
from condense.app.plan import auto_speedup
from condense.primitives.compute import AUTO_MIN_SPEEDUP
from condense.schema import to_run_config

SECTION = "## precision=auto on this machine"
NETWORKS = {
    "digits, ConvNet depth 2 (the README's first command)": ["dataset=digits"],
    "Fashion-MNIST, ConvNet-3": ["dataset=fashion_mnist"],
    "Fashion-MNIST, ConvNet-3 with BatchNorm": ["dataset=fashion_mnist", "network=convnet_bn"],
}


def measured(overrides: list[str]) -> float:
    with tempfile.TemporaryDirectory() as cache:
        os.environ["CONDENSE_CACHE"] = cache
        cfg = to_run_config(compose_config([*overrides, "precision=auto", "device=cpu"]))
        speedup = auto_speedup(cfg, torch.device("cpu"))
    assert speedup is not None and speedup.source == "measured"
    return speedup.ratio


def first_command(precision: str, out: Path) -> tuple[dict, float]:
    """`condense` as the README's first command runs it, with this precision; its wall seconds."""
    start = time.perf_counter()
    cfg = to_run_config(compose_config([f"precision={precision}", "logger=none", f"output_dir={out}"]))
    metrics = run(cfg)
    return metrics, time.perf_counter() - start


def section() -> list[str]:
    lines = [
        SECTION,
        "",
        f"Machine: {cpu_machine()}.",
        f"Commit: {head_commit()}; date {time.strftime('%Y-%m-%d %H:%M')}.",
        "Command: `python benchmarks/auto_precision.py --out benchmarks/results/precision.md`",
        "",
        f"The ratio is fp32's median time over bf16's for one forward, loss and backward of the run's "
        f"network at its real batch (about a second of alternating steps); auto takes bf16 from "
        f"{AUTO_MIN_SPEEDUP}x.",
        "",
        "| network | bf16 speed-up, two measurements | auto picks |",
        "|---|---|---|",
    ]
    for name, overrides in NETWORKS.items():
        ratios = [measured(overrides) for _ in range(2)]
        picks = {"bf16" if r >= AUTO_MIN_SPEEDUP else "fp32" for r in ratios}
        lines.append(f"| {name} | {ratios[0]:.2f}x, {ratios[1]:.2f}x | {' / '.join(sorted(picks))} |")
    lines += [
        "",
        "The README's first command (`condense`: DC on digits, IPC 10, 6 iterations, 3 models):",
        "",
        "| precision | parts as run | DC (%) | random (%) | condense s | wall s |",
        "|---|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory() as work:
        os.environ["CONDENSE_CACHE"] = str(Path(work) / "cache")
        for precision in ("fp32", "auto"):
            metrics, wall = first_command(precision, Path(work) / precision)
            parts = " ".join(f"{p}={k}" for p, k in metrics["precision"].items() if p != "setting")
            evaluation = metrics["evaluation"]
            own, rand = (100 * evaluation[k]["ConvNet"]["mean"] for k in (metrics["label"], "random"))
            seconds = metrics["condense"]["seconds"]
            lines.append(f"| {precision} | {parts} | {own:.2f} | {rand:.2f} | {seconds:.1f} | {wall:.1f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/precision.md"))
    args = parser.parse_args()
    text = args.out.read_text() if args.out.exists() else ""
    kept = text.split(SECTION)[0].rstrip()
    lines = section()
    args.out.write_text((kept + "\n\n" if kept else "") + "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
