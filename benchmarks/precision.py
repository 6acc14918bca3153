"""Does bf16 autocast give fp32's accuracy? Part by part, on real data, from the same seeds.

Run by hand, alone on the machine:

    python benchmarks/precision.py --out benchmarks/results/precision.md
    python benchmarks/precision.py --dataset digits --ipc 10 --iterations 6 --seeds 3 \
        --variants fp32 matching-bf16 inner-bf16 eval-bf16 bf16 --out benchmarks/results/precision_parts.md

A variant says which parts run in bf16 (condense.primitives.compute.PARTS): `fp32` none, `bf16` every part
(the whole run under precision=bf16), `matching-bf16` / `inner-bf16` / `eval-bf16` that part
alone. For every method and seed, each distinct condensation is run once on the fast path (its
iterations timed) and its set evaluated as each variant asks. Variants that share a condensation
share its set and the evaluated models' initialisations and batch orders, so `eval-bf16` against
`fp32` is a paired comparison, model by model. The noise to compare a gap against is the std
over seeds x models in the same table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from results_file import machine_description, write_results

from condense.app.cli import compose_config
from condense.primitives.compute import Compute, cpu_has_native_bf16
from condense.primitives.dataset import Dataset, load_dataset
from condense.schema import RunConfig, to_run_config
from condense.stages.condensation import Condenser, CondenseRecipe
from condense.stages.evaluation import evaluate_set

CPU = torch.device("cpu")
# Variant -> (parts in bf16 while condensing, parts in bf16 while evaluating).
VARIANTS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "fp32": (frozenset(), frozenset()),
    "bf16": (frozenset({"matching", "inner"}), frozenset({"evaluation"})),
    "matching-bf16": (frozenset({"matching"}), frozenset()),
    "inner-bf16": (frozenset({"inner"}), frozenset()),
    "eval-bf16": (frozenset(), frozenset({"evaluation"})),
}
METHODS = {"dc": "DC", "ours_md": "Ours-MD", "ours_mda": "Ours-MDA", "ours_m": "Ours-M"}


def run_config(dataset: str, ipc: int, method: str, seed: int, models: int, device: str = "cpu") -> RunConfig:
    overrides = [
        f"dataset={dataset}",
        f"ipc={ipc}",
        f"method={method}",
        f"seed={seed}",
        f"evaluation.num_models={models}",
        "logger=none",
        "progress=false",
        f"device={device}",
        "precision=fp32",
    ]
    return to_run_config(compose_config(overrides))


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued kernels, so a timer reads their time (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def condensed(
    cfg: RunConfig, data: Dataset, parts: frozenset[str], iterations: int, device: torch.device = CPU
) -> tuple[Condenser, float]:
    """The condense stage with `parts` in bf16, on the fast path; returns it and its s/iteration."""
    # the plan goes in at the start: the matching setup keeps the compute it was started with
    compute = replace(Compute.for_run(cfg, device), bf16=parts)
    run = Condenser.start(CondenseRecipe.of_run(cfg), compute, data)
    seconds = []
    for it in range(iterations):
        synchronize(device)
        start = time.perf_counter()
        run.iteration(it)
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    return run, statistics.median(seconds)


def evaluated(
    run: Condenser, cfg: RunConfig, data: Dataset, parts: frozenset[str], device: torch.device = CPU
) -> list[float]:
    """Test accuracies of the set's evaluated models; the stream name fixes the model seeds, so
    the fp32 and bf16 evaluations train the same initialisations on the same batch orders."""
    compute = replace(Compute.for_run(cfg, device), bf16=parts)
    images, labels = run.images.detach(), run.labels
    pool = {"ConvNet": cfg.network}
    result = evaluate_set(
        images, labels, data, pool, cfg.evaluation, cfg.seed, "precision", device, None, False, compute
    )
    return result["ConvNet"].accuracies


def cell(values: list[float]) -> str:
    std = statistics.pstdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.fmean(values):.2f} +- {100 * std:.2f}"


def paired_gap(a: list[float], b: list[float]) -> str:
    """Mean and std of the model-by-model difference b - a (same initialisations), in points."""
    diffs = [100 * (y - x) for x, y in zip(a, b, strict=True)]
    std = statistics.pstdev(diffs) if len(diffs) > 1 else 0.0
    return f"{statistics.fmean(diffs):+.2f} +- {std:.2f}"


def gap_to_fp32(accuracies: dict[str, list[float]], variant: str, paired: bool) -> str:
    """Points above the fp32 variant: model by model where the two share sets and models."""
    if variant == "fp32" or "fp32" not in accuracies:
        return ""
    if paired:
        return paired_gap(accuracies["fp32"], accuracies[variant]) + " (paired)"
    diff = 100 * (statistics.fmean(accuracies[variant]) - statistics.fmean(accuracies["fp32"]))
    return f"{diff:+.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="fashion_mnist")
    parser.add_argument("--ipc", type=int, default=1)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--models", type=int, default=3)
    parser.add_argument("--methods", nargs="+", default=["dc", "ours_md"], choices=sorted(METHODS))
    parser.add_argument(
        "--variants", nargs="+", default=["fp32", "bf16", "eval-bf16"], choices=list(VARIANTS)
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/precision.md"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    command = "python benchmarks/precision.py " + " ".join(sys.argv[1:])
    rows = []
    for method in args.methods:
        accuracies: dict[str, list[float]] = {v: [] for v in args.variants}
        seconds: dict[str, list[float]] = {v: [] for v in args.variants}
        for seed in range(args.seeds):
            cfg = run_config(args.dataset, args.ipc, method, seed, args.models)
            data = load_dataset(cfg.dataset)
            sets: dict[frozenset[str], tuple[Condenser, float]] = {}
            for variant in args.variants:
                condense_parts, eval_parts = VARIANTS[variant]
                if condense_parts not in sets:
                    sets[condense_parts] = condensed(cfg, data, condense_parts, args.iterations)
                run, per_iteration = sets[condense_parts]
                accuracies[variant] += evaluated(run, cfg, data, eval_parts)
                seconds[variant].append(per_iteration)
                print(
                    f"  {method} {variant} seed {seed}: {per_iteration:.2f} s/it, "
                    f"accuracies {accuracies[variant][-args.models :]}",
                    flush=True,
                )
        for variant in args.variants:
            paired = VARIANTS[variant][0] == VARIANTS["fp32"][0]
            rows.append(
                f"| {METHODS[method]} | {variant} | {statistics.median(seconds[variant]):.2f} "
                f"| {cell(accuracies[variant])} | {gap_to_fp32(accuracies, variant, paired)} |"
            )
    lines = [
        f"# bf16 vs fp32 accuracy, part by part ({args.dataset}, IPC {args.ipc}, ConvNet-3, CPU)",
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine_description(f'{torch.get_num_threads()} intra-op threads')}, "
        f"native bf16: {cpu_has_native_bf16()}  ",
        f"Budget: {args.iterations} iterations x {args.seeds} seeds (0..{args.seeds - 1}), "
        f"{args.models} evaluated models per set (300 epochs, full test set)  ",
        f"Date: {time.strftime('%Y-%m-%d %H:%M')}",
        "",
        "Variants: `fp32` every part fp32; `bf16` every part bf16 (precision=bf16); `matching-bf16`, "
        "`inner-bf16`, `eval-bf16` that part alone. Accuracy (%) is mean +- std over seeds x models; "
        "s / iteration is the condensation's median (the fast path, 2 worker threads).",
        "",
        "| method | variant | s / iteration | accuracy | vs fp32 (points) |",
        "|---|---|---|---|---|",
        *rows,
        "",
    ]
    write_results(args.out, lines)


if __name__ == "__main__":
    main()
