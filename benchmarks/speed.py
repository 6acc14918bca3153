"""The fast path against the straightforward one, end to end, on Fashion-MNIST with ConvNet-3.

Run by hand, alone on the machine (another CPU-heavy process skews every number):

    python benchmarks/speed.py --out benchmarks/results/speed.md

Each variant runs in its own process (the allocator settings are process-wide), and the two
are driven in lockstep, one iteration of each in turn, so machine noise hits them alike. It measures:
- seconds per condensation iteration at IPC 1 (DC) and IPC 10 (DC and Ours-MDA), fast=true vs
  fast=false from the same seed, and how far apart the synthetic images end up;
- evaluation: `--eval-models` ConvNets trained 300 epochs on an IPC-10 set and tested on the
  10,000 test images, fast vs straightforward, with their accuracies;
- peak memory (max RSS) of an IPC-50 condense run through its first matching step and inner
  epoch, in a child process.
It writes a markdown table with the machine and the command to --out.
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from results_file import machine_description, max_rss_gib, write_results

from condense.app.cli import compose_config
from condense.app.plan import resolve_device
from condense.method.coreset import select_coreset
from condense.primitives.compute import Compute, cpu_has_native_bf16
from condense.primitives.dataset import Dataset, fashion_mnist_available, load_dataset
from condense.schema import RunConfig, to_run_config
from condense.stages.condensation import Condenser, CondenseRecipe
from condense.stages.evaluation import evaluate_set

FMNIST = ["dataset=fashion_mnist", "logger=none", "progress=false", "device=cpu"]


def run_config(*overrides: str) -> RunConfig:
    return to_run_config(compose_config([*FMNIST, *overrides]))


def path_overrides(fast: bool) -> list[str]:
    """The fast path as configured (precision from the config: fp32 by default), against the
    straightforward fp32 reference: precision is protocol and both paths honour it, so the
    reference names fp32 itself."""
    return [f"fast={fast}"] if fast else ["fast=false", "precision=fp32"]


@dataclass
class Timed:
    """Per-iteration seconds and what each finished variant (fast=True/False) reports."""

    seconds: dict[bool, list[float]]
    finished: dict[bool, VariantResult]

    def image_gap(self) -> float:
        return float((self.finished[True].images - self.finished[False].images).abs().max())

    def per_iteration(self, fast: bool, count: str) -> float:
        totals = self.finished[fast]
        total = totals.inner_epochs if count == "inner_epochs" else totals.real_passes
        return total / len(self.seconds[fast])


@dataclass
class VariantResult:
    images: torch.Tensor
    inner_epochs: int
    real_passes: int


# One variant's run, held by its own child process between the parent's calls.
VARIANT: dict[str, Condenser] = {}


def start_variant(overrides: list[str], fast: bool) -> None:
    """Child process set-up: the allocator plan of this variant alone, then the run from its seed."""
    torch.set_num_threads(2)
    cfg = run_config(*overrides, *path_overrides(fast))
    compute = Compute.for_run(cfg, torch.device("cpu"))
    run = Condenser.start(CondenseRecipe.of_run(cfg), compute, load_dataset(cfg.dataset))
    run.compute.process_settings().__enter__()  # held for the child process's life
    VARIANT["run"] = run


def timed_iteration(it: int) -> float:
    start = time.perf_counter()
    VARIANT["run"].iteration(it)
    return time.perf_counter() - start


def finished_variant() -> VariantResult:
    run = VARIANT["run"]
    return VariantResult(run.images.detach().clone(), run.stats.inner_epochs, run.stats.passes.real_passes)


def variant_process(initializer: Callable[..., None] | None = None, args: tuple = ()) -> ProcessPoolExecutor:
    """A fresh process per variant: the allocator settings are process-wide and cannot all be
    undone (a thread keeps its arena), so the straightforward path must never share one with the
    fast path, or it inherits heap reuse and looks faster than plain PyTorch is."""
    context = multiprocessing.get_context("spawn")
    return ProcessPoolExecutor(1, mp_context=context, initializer=initializer, initargs=args)


def time_iterations(
    overrides: list[str], iterations: int, variants: tuple[bool, ...] = (True, False)
) -> Timed:
    """Seconds per iteration of each variant from the same seed, each in its own process, driven
    in lockstep (one iteration of each in turn) so machine noise hits them alike."""
    children = {fast: variant_process(start_variant, (overrides, fast)) for fast in variants}
    try:
        seconds: dict[bool, list[float]] = {fast: [] for fast in variants}
        for it in range(iterations):
            for fast, child in children.items():
                seconds[fast].append(child.submit(timed_iteration, it).result())
                print(f"  {overrides} fast={fast} iteration {it}: {seconds[fast][-1]:.1f} s", flush=True)
        finished = {fast: child.submit(finished_variant).result() for fast, child in children.items()}
    finally:
        for child in children.values():
            child.shutdown()
    return Timed(seconds, finished)


def seconds_to_evaluate(
    run: RunConfig, data: Dataset, images: torch.Tensor, labels: torch.Tensor
) -> tuple[float, list[float]]:
    """Seconds and accuracies of evaluating (images, labels) on ConvNets under the run's
    evaluation protocol and compute plan, in this process (after applying the plan's allocator)."""
    device = resolve_device("cpu")
    compute = Compute.for_run(run, device)
    compute.process_settings().__enter__()  # the rest of this process runs under the plan
    start = time.perf_counter()
    result = evaluate_set(
        images,
        labels,
        data,
        {"ConvNet": run.network},
        run.evaluation,
        run.seed,
        "bench",
        device,
        None,
        progress=False,
        compute=compute,
    )
    return time.perf_counter() - start, result["ConvNet"].accuracies


def timed_evaluation(models: int, fast: bool) -> tuple[float, list[float]]:
    """Seconds and accuracies of `models` ConvNets (300 epochs, full test set) on a random IPC-10
    set, in a child process with this variant's allocator plan."""
    torch.set_num_threads(2)
    run = run_config("ipc=10", "method=random", f"evaluation.num_models={models}", *path_overrides(fast))
    data = load_dataset(run.dataset)
    picked = select_coreset(
        "random", data.train, data.num_classes, 10, torch.Generator().manual_seed(0), None
    )
    return seconds_to_evaluate(run, data, data.train.images[picked], data.train.labels[picked])


def time_evaluation(models: int) -> tuple[dict[bool, float], dict[bool, list[float]]]:
    seconds, accuracies = {}, {}
    for fast in (False, True):
        with variant_process() as child:
            seconds[fast], accuracies[fast] = child.submit(timed_evaluation, models, fast).result()
        print(f"  evaluation fast={fast}: {seconds[fast]:.1f} s, {accuracies[fast]}", flush=True)
    return seconds, accuracies


def peak_memory_ipc50(fast: bool, out: Path) -> float:
    """Max RSS (GiB) of an IPC-50 condense run cut to one matching step and one inner epoch: the
    peak of a full run, whose every outer step holds the same tensors."""
    command = [
        sys.executable,
        "-m",
        "condense",
        *FMNIST,
        "ipc=50",
        "iterations=1",
        "stage=condense",
        "step_policy=fixed",
        "step_policy.outer_loop=2",
        "step_policy.inner_epochs=1",
        *path_overrides(fast),
        f"hydra.run.dir={out}",
    ]
    return max_rss_gib(command)


def ratio_row(name: str, fast: list[float], slow: list[float]) -> str:
    a, b = statistics.median(slow), statistics.median(fast)
    return f"| {name} | {a:.1f} | {b:.1f} | {a / b:.2f}x |"


def rounded(values: list[float]) -> list[float]:
    return [round(v, 4) for v in values]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ipc1-iterations", type=int, default=5)
    parser.add_argument("--ipc10-iterations", type=int, default=1)
    parser.add_argument("--eval-models", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/speed.md"))
    parser.add_argument("--scratch", type=Path, default=Path("/tmp/condense-bench"))
    args = parser.parse_args()
    if not fashion_mnist_available():
        raise SystemExit("error: Fashion-MNIST not found: apt-get install dataset-fashion-mnist")
    torch.set_num_threads(2)
    command = "python benchmarks/speed.py " + " ".join(sys.argv[1:])

    n1, n10 = args.ipc1_iterations, args.ipc10_iterations
    ipc1 = time_iterations(["ipc=1", "method=dc"], n1)
    ipc10 = time_iterations(["ipc=10", "method=dc"], n10)
    mda = time_iterations(["ipc=10", "method=ours_mda"], n10, variants=(True,))
    eval_seconds, eval_acc = time_evaluation(args.eval_models)
    memory = {
        fast: peak_memory_ipc50(fast, args.scratch / f"mem_{fast}_{time.time_ns()}") for fast in (True, False)
    }
    lines = [
        "# Fast path vs straightforward path (Fashion-MNIST, ConvNet-3 instance norm, CPU)",
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine_description(f'{torch.get_num_threads()} intra-op threads')}, "
        f"native bf16: {cpu_has_native_bf16()}  ",
        f"Fast path here: {Compute.for_run(run_config(), torch.device('cpu')).describe()}  ",
        f"Date: {time.strftime('%Y-%m-%d %H:%M')}",
        "",
        "| measurement | straightforward (s) | fast (s) | speed-up |",
        "|---|---|---|---|",
        ratio_row(f"DC iteration, IPC 1 (median of {n1})", ipc1.seconds[True], ipc1.seconds[False]),
        ratio_row(f"DC iteration, IPC 10 (median of {n10})", ipc10.seconds[True], ipc10.seconds[False]),
        ratio_row(
            "Ours-MDA fast vs DC straightforward, IPC 10 iteration", mda.seconds[True], ipc10.seconds[False]
        ),
        ratio_row(
            f"evaluation of {args.eval_models} ConvNets (300 epochs + test)",
            [eval_seconds[True]],
            [eval_seconds[False]],
        ),
        "",
        f"Largest absolute difference between fast and straightforward images after {n1} iterations "
        f"at IPC 1: {ipc1.image_gap():.2e}; after {n10} at IPC 10: {ipc10.image_gap():.2e} "
        "(the images are normalised, so their values are O(1)).  ",
        f"Per IPC-10 iteration: inner epochs DC {ipc10.per_iteration(False, 'inner_epochs'):.0f}, "
        f"Ours-MDA {mda.per_iteration(True, 'inner_epochs'):.0f}; real gradient passes "
        f"DC {ipc10.per_iteration(False, 'real'):.0f}, Ours-MDA {mda.per_iteration(True, 'real'):.0f}.  ",
        f"Evaluation accuracies (same model seeds): straightforward {rounded(eval_acc[False])}, "
        f"fast {rounded(eval_acc[True])}.  ",
        f"Peak memory, IPC 50 (max RSS of the whole process): fast {memory[True]:.2f} GiB, "
        f"straightforward {memory[False]:.2f} GiB.",
        "",
    ]
    write_results(args.out, lines)


if __name__ == "__main__":
    main()
