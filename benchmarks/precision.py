"""Does bf16 autocast give fp32's accuracy? Part by part, on real data, from the same seeds.

Run by hand, alone on the machine:

    python benchmarks/precision.py --out benchmarks/results/precision.md
    python benchmarks/precision.py --dataset digits --ipc 10 --iterations 6 \
        --variants fp32 matching inner bf16 --out benchmarks/results/precision_inner.md

For every method, condensation variant (which parts run in bf16: `fp32` none, `bf16` matching
and inner, or one part by name) and seed, it condenses on the fast path and times each
iteration, then evaluates the set twice on the same model initialisations: every model trained
and tested in fp32, and in bf16. So one table answers both questions:
- condensation parts: the `eval fp32` column down the variants of a method;
- evaluation part: the `eval fp32` and `eval bf16` columns of one row, paired model by model.
The spread to compare against is the std over seeds x models in the same column.
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

from condense.cli import compose_config
from condense.compute import PARTS, Compute, cpu_has_native_bf16
from condense.condensation import Condenser
from condense.config import RunConfig, to_run_config
from condense.dataset import Dataset, load_dataset
from condense.evaluation import evaluate_set

CPU = torch.device("cpu")
CONDENSE_PARTS = {"fp32": frozenset(), "bf16": frozenset({"matching", "inner"})}
METHODS = {"dc": "DC", "ours_md": "Ours-MD", "ours_mda": "Ours-MDA", "ours_m": "Ours-M"}


def run_config(dataset: str, ipc: int, method: str, seed: int, models: int) -> RunConfig:
    overrides = [
        f"dataset={dataset}",
        f"ipc={ipc}",
        f"method={method}",
        f"seed={seed}",
        f"evaluation.num_models={models}",
        "logger=none",
        "progress=false",
        "device=cpu",
        "precision=fp32",
    ]
    return to_run_config(compose_config(overrides))


def condensed(
    cfg: RunConfig, data: Dataset, parts: frozenset[str], iterations: int
) -> tuple[Condenser, float]:
    """The condense stage with `parts` in bf16, on the fast path; returns it and its s/iteration."""
    run = Condenser.start(cfg, data, CPU)
    run.compute = replace(Compute.for_run(cfg, CPU), bf16=parts)
    seconds = []
    for it in range(iterations):
        start = time.perf_counter()
        run.iteration(it)
        seconds.append(time.perf_counter() - start)
    return run, statistics.median(seconds)


def evaluated(run: Condenser, cfg: RunConfig, data: Dataset, parts: frozenset[str]) -> list[float]:
    """Test accuracies of the set's evaluated models; the stream name fixes the model seeds, so
    the fp32 and bf16 evaluations train the same initialisations on the same batch orders."""
    compute = replace(Compute.for_run(cfg, CPU), bf16=parts)
    images, labels = run.images.detach(), run.labels
    pool = {"ConvNet": cfg.network}
    result = evaluate_set(
        images, labels, data, pool, cfg.evaluation, cfg.seed, "precision", CPU, None, False, compute
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


def variant_parts(name: str) -> frozenset[str]:
    return CONDENSE_PARTS[name] if name in CONDENSE_PARTS else frozenset({name})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="fashion_mnist")
    parser.add_argument("--ipc", type=int, default=1)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--models", type=int, default=5)
    parser.add_argument("--methods", nargs="+", default=["dc", "ours_md"], choices=sorted(METHODS))
    parser.add_argument(
        "--variants", nargs="+", default=["fp32", "bf16"], choices=[*CONDENSE_PARTS, "matching", "inner"]
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/precision.md"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    command = "python benchmarks/precision.py " + " ".join(sys.argv[1:])
    rows = []
    for method in args.methods:
        for variant in args.variants:
            parts = variant_parts(variant)
            eval_fp32: list[float] = []
            eval_bf16: list[float] = []
            per_iteration = []
            for seed in range(args.seeds):
                cfg = run_config(args.dataset, args.ipc, method, seed, args.models)
                data = load_dataset(cfg.dataset)
                run, seconds = condensed(cfg, data, parts, args.iterations)
                per_iteration.append(seconds)
                eval_fp32 += evaluated(run, cfg, data, frozenset())
                eval_bf16 += evaluated(run, cfg, data, frozenset(PARTS))
                last = slice(-args.models, None)
                print(f"  {method} {variant} seed {seed}: {seconds:.2f} s/it", flush=True)
                print(f"    eval fp32 {eval_fp32[last]}, eval bf16 {eval_bf16[last]}", flush=True)
            timing = statistics.median(per_iteration)
            rows.append(
                f"| {METHODS[method]} | {variant} | {timing:.2f} | {cell(eval_fp32)} | {cell(eval_bf16)} "
                f"| {paired_gap(eval_fp32, eval_bf16)} |"
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
        "Condensed with: `fp32` = every part fp32, `bf16` = matching and inner loop in bf16, a part's "
        "name = that part alone in bf16. Accuracies (%) are mean +- std over seeds x models; the "
        "last column is eval bf16 minus eval fp32, model by model on the same initialisations.",
        "",
        "| method | condensed with | s / iteration | eval fp32 | eval bf16 | bf16 - fp32 (paired) |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
    ]
    write_results(args.out, lines)


if __name__ == "__main__":
    main()
