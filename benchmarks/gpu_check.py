"""The GPU check: precision parity, seconds per iteration and peak memory on a CUDA device.

One command on a machine with an NVIDIA GPU (and the project installed):

    python benchmarks/gpu_check.py --out benchmarks/results/gpu_check.md

It prints and writes:
- the parity table: DC at IPC 1 condensed on a tiny budget in fp32 and in bf16 (matching and
  inner loop), each set evaluated by the same model initialisations in fp32 and in bf16;
- seconds per DC iteration at IPC 1, 10 and 50, on the fast path with precision=auto (bf16 where
  this GPU measures it at least 1.2x faster: the plan's own measurement) and on the
  straightforward fp32 reference (fast=false precision=fp32, TF32 off), with the peak GPU memory
  each allocated;
- MTT's step (trajectory matching) at IPC 1, 10 and 50 with the preset's syn_steps: seconds per
  iteration and peak GPU memory, the cost of the unrolled student graph.
Fashion-MNIST is used where it is installed, digits otherwise (the file says which). Run it
alone on the GPU: another job's kernels skew every number.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from precision import cell, condensed, evaluated, paired_gap, run_config
from results_file import machine_description, write_results

from condense.app.cli import compose_config
from condense.app.plan import auto_speedup
from condense.app.run import experts_recipe
from condense.primitives.compute import PARTS, Compute, native_bf16
from condense.primitives.dataset import fashion_mnist_available, load_dataset
from condense.schema import to_run_config
from condense.stages.condensation import Condenser, CondenseRecipe
from condense.stages.experts import train_experts


def parity_rows(dataset: str, iterations: int, models: int, device: torch.device) -> list[str]:
    rows = []
    for variant, parts in (("fp32", frozenset()), ("bf16", frozenset({"matching", "inner"}))):
        cfg = run_config(dataset, 1, "dc", 0, models, device.type)
        data = load_dataset(cfg.dataset)
        run, seconds = condensed(cfg, data, parts, iterations, device)
        fp32 = evaluated(run, cfg, data, frozenset(), device)
        bf16 = evaluated(run, cfg, data, frozenset(PARTS), device)
        print(f"  parity {variant}: {seconds:.3f} s/it, eval fp32 {fp32}, eval bf16 {bf16}", flush=True)
        rows.append(
            f"| DC | {variant} | {seconds:.3f} | {cell(fp32)} | {cell(bf16)} | {paired_gap(fp32, bf16)} |"
        )
    return rows


def timed_iterations(
    run: Condenser, compute: Compute, iterations: int, device: torch.device
) -> tuple[float, float]:
    """Median seconds per iteration (after one warm-up) and peak GPU memory in GiB."""
    torch.cuda.reset_peak_memory_stats(device)
    seconds = []
    with compute.process_settings():  # as a run works: TF32 off unless precision=tf32
        for it in range(iterations + 1):
            torch.cuda.synchronize(device)
            start = time.perf_counter()
            run.iteration(it)
            torch.cuda.synchronize(device)
            seconds.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) / 2**30
    return statistics.median(seconds[1:]), peak


def timed_path(
    dataset: str, ipc: int, fast: bool, iterations: int, device: torch.device
) -> tuple[float, float, str]:
    """DC at this IPC on the fast path (precision=auto) or the straightforward fp32 one; seconds
    per iteration, peak GiB and the plan the path ran (what precision=auto chose)."""
    path = ["fast=true", "precision=auto"] if fast else ["fast=false", "precision=fp32"]
    overrides = [f"dataset={dataset}", f"ipc={ipc}", "logger=none", "progress=false", f"device={device.type}"]
    cfg = to_run_config(compose_config([*overrides, *path]))
    speedup = auto_speedup(cfg, device)
    compute = Compute.for_run(cfg, device, speedup)
    run = Condenser.start(CondenseRecipe.of_run(cfg), compute, load_dataset(cfg.dataset))
    seconds, peak = timed_iterations(run, compute, iterations, device)
    del run
    torch.cuda.empty_cache()
    # auto's evidence is one forward and backward at the real batch, not a whole iteration
    evidence = f" (auto: bf16 {speedup.ratio:.2f}x on one step)" if speedup is not None else ""
    return seconds, peak, compute.describe() + evidence


def speed_rows(dataset: str, iterations: dict[int, int], device: torch.device) -> list[str]:
    rows = []
    for ipc, count in iterations.items():
        slow, slow_peak, _ = timed_path(dataset, ipc, False, count, device)
        fast, fast_peak, plan = timed_path(dataset, ipc, True, count, device)
        print(f"  IPC {ipc}: straightforward {slow:.3f} s/it, fast ({plan}) {fast:.3f} s/it", flush=True)
        timings = f"{slow:.3f} | {fast:.3f} | {slow / fast:.2f}x"
        rows.append(f"| {ipc} | {count} | {plan} | {timings} | {slow_peak:.2f} | {fast_peak:.2f} |")
    return rows


def trajectory_rows(dataset: str, iterations: int, root: Path, device: torch.device) -> list[str]:
    """MTT's step at IPC 1, 10 and 50 with the preset's syn_steps and batch_syn, in fp32: seconds
    per iteration and peak GPU memory, the unrolled graph's cost. One expert of 2 epochs serves
    every cell (the cost does not depend on how well it is trained)."""
    rows = []
    for ipc in (1, 10, 50):
        overrides = [
            "method=mtt", f"dataset={dataset}", f"ipc={ipc}", "logger=none", "progress=false",
            f"device={device.type}", "precision=fp32", f"experts.root={root}", "experts.num=1",
            "experts.epochs=2", "matching.expert_epochs=1", "matching.max_start_epoch=1",
            "matching.lr_lr=1e-7",  # an expert this short can turn the step size negative at 1e-5
        ]  # fmt: skip
        cfg = to_run_config(compose_config(overrides))
        compute = Compute.for_run(cfg, device)
        data = load_dataset(cfg.dataset)
        cache, _ = train_experts(experts_recipe(cfg), data, compute)
        run = Condenser.start(CondenseRecipe.of_run(cfg), compute, data, cache, 1)
        seconds, peak = timed_iterations(run, compute, iterations, device)
        del run
        torch.cuda.empty_cache()
        m = cfg.matching
        print(f"  MTT IPC {ipc}: {m.syn_steps} steps, {seconds:.3f} s/it, {peak:.2f} GiB", flush=True)
        rows.append(f"| {ipc} | {m.syn_steps} | {m.batch_syn or 'all'} | {seconds:.3f} | {peak:.2f} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parity-iterations", type=int, default=20)
    parser.add_argument("--parity-models", type=int, default=5)
    parser.add_argument(
        "--timed-iterations", type=int, nargs=3, default=[5, 3, 2], metavar=("IPC1", "IPC10", "IPC50")
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/gpu_check.md"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("error: no CUDA device visible: run benchmarks/gpu_check.py on a machine with an NVIDIA GPU")
    device = torch.device("cuda")
    dataset = "fashion_mnist" if fashion_mnist_available() else "digits"
    command = "python benchmarks/gpu_check.py " + " ".join(sys.argv[1:])
    plan = Compute.for_run(to_run_config(compose_config(["device=cuda"])), device)
    parity = parity_rows(dataset, args.parity_iterations, args.parity_models, device)
    speed = speed_rows(dataset, dict(zip((1, 10, 50), args.timed_iterations, strict=True)), device)
    with tempfile.TemporaryDirectory() as root:
        trajectory = trajectory_rows(dataset, args.timed_iterations[0], Path(root), device)
    lines = [
        f"# GPU check ({dataset}, ConvNet-3 instance norm, DC)",
        "",
        f"Command: `{command}`  ",
        f"GPU: {torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}, "
        f"native bf16: {native_bf16(device)}  ",
        f"Host: {machine_description(f'{torch.get_num_threads()} intra-op threads')}  ",
        f"A default run here (conf/config.yaml): {plan.describe()}  ",
        f"Date: {time.strftime('%Y-%m-%d %H:%M')}",
        "",
        f"## Parity: IPC 1, {args.parity_iterations} iterations, {args.parity_models} models per set",
        "",
        "| method | condensed with | s / iteration | eval fp32 (%) | eval bf16 (%) | bf16 - fp32 (paired) |",
        "|---|---|---|---|---|---|",
        *parity,
        "",
        "## Seconds per iteration and peak GPU memory (fast: as configured; straightforward: fp32)",
        "",
        "| IPC | iterations timed | fast path ran | straightforward (s) | fast (s) | speed-up "
        "| peak GiB, straightforward | peak GiB, fast |",
        "|---|---|---|---|---|---|---|---|",
        *speed,
        "",
        f"## Trajectory matching (MTT's step, fp32): the {dataset} preset's syn_steps and batch_syn",
        "",
        "| IPC | syn_steps | batch_syn | s / iteration | peak GiB |",
        "|---|---|---|---|---|",
        *trajectory,
        "",
    ]
    write_results(args.out, lines)


if __name__ == "__main__":
    main()
