"""One lever of the fast path (or the precision), off and on, over whole condensation iterations.

Run by hand (not in CI), alone on the machine:

    python benchmarks/lever.py heap_reuse --ipc 1:5 10:1 --out benchmarks/results/lever_heap_reuse.md
    python benchmarks/lever.py precision --ipc 1:5 --out benchmarks/results/lever_precision.md

Both variants run the fast path from the same seed, `--methods` (DC by default) with ConvNet-3
on `--dataset` (Fashion-MNIST by default), in fp32 unless the setting is the precision; they differ only in
SETTING (precision: fp32 against bf16 in every part). Each runs in its own process and the two
are driven in lockstep, one iteration of each in turn (speed.py's harness), so machine noise
hits them alike. `--ipc 1:5`
means IPC 1 for 5 iterations. It prints and writes the median seconds per iteration, the ratio,
and how far apart the synthetic images end up.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from results_file import cpu_machine, write_results
from speed import finished_variant, seconds_to_evaluate, start_variant, timed_iteration, variant_process
from speed import run_config as speed_run_config

from condense.primitives.dataset import fashion_mnist_available

# The fast path's levers (condense/compute.py) and their off and on values.
LEVERS = {"heap_reuse": ("false", "true"), "precision": ("fp32", "bf16")}


def ipc_and_iterations(text: str) -> tuple[int, int]:
    ipc, _, iterations = text.partition(":")
    return int(ipc), int(iterations or 1)


def time_setting(
    setting: str, ipc: int, iterations: int, dataset: str, method: str
) -> tuple[dict[bool, list[float]], float]:
    """Seconds per iteration with SETTING off and on, and the largest image difference after."""
    overrides = [f"dataset={dataset}", f"ipc={ipc}", f"method={method}", "precision=fp32"]
    values = dict(zip((False, True), LEVERS[setting], strict=True))
    children = {
        on: variant_process(start_variant, ([*overrides, f"{setting}={values[on]}"], True))
        for on in (False, True)
    }
    try:
        seconds: dict[bool, list[float]] = {False: [], True: []}
        for it in range(iterations):
            for on, child in children.items():
                seconds[on].append(child.submit(timed_iteration, it).result())
                print(f"  IPC {ipc} {setting}={on} iteration {it}: {seconds[on][-1]:.2f} s", flush=True)
        images = {on: child.submit(finished_variant).result().images for on, child in children.items()}
    finally:
        for child in children.values():
            child.shutdown()
    return seconds, float((images[True] - images[False]).abs().max())


def timed_lever_evaluation(setting: str, value: str, dataset: str, models: int, epochs: int) -> float:
    """Seconds to train and test `models` ConvNets for `epochs` epochs on a random IPC-10 subset of
    DATASET with SETTING=VALUE (fp32 unless the setting is the precision), in this process."""
    import torch

    from condense.app.plan import resolve_device
    from condense.method.coreset import FeatureTraining, coreset_set
    from condense.primitives.dataset import load_dataset

    torch.set_num_threads(2)
    overrides = [f"dataset={dataset}", "ipc=10", "precision=fp32", f"{setting}={value}"]
    run = speed_run_config(*overrides, f"evaluation.num_models={models}", f"evaluation.epochs={epochs}")
    data = load_dataset(run.dataset)
    features = FeatureTraining(run.network, run.coreset.feature_epochs, run.batch_train, run.seed)
    subset = coreset_set("random", run.ipc, features, data, resolve_device("cpu"))
    return seconds_to_evaluate(run, data, subset.images, subset.labels)[0]


def time_lever_evaluation(setting: str, dataset: str, models: int, epochs: int) -> dict[bool, float]:
    seconds = {}
    for on, value in zip((False, True), LEVERS[setting], strict=True):
        with variant_process() as child:
            seconds[on] = child.submit(
                timed_lever_evaluation, setting, value, dataset, models, epochs
            ).result()
        print(f"  evaluation {setting}={value}: {seconds[on]:.1f} s", flush=True)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("setting", choices=list(LEVERS), help="a lever of the fast path")
    parser.add_argument(
        "--ipc", nargs="+", type=ipc_and_iterations, default=[(1, 5)], metavar="IPC:ITERATIONS"
    )
    parser.add_argument("--dataset", default="fashion_mnist")
    parser.add_argument("--methods", nargs="+", default=["dc"])
    parser.add_argument("--eval-models", type=int, default=0, help="also time evaluating N models")
    parser.add_argument("--eval-epochs", type=int, default=300)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.dataset == "fashion_mnist" and not fashion_mnist_available():
        raise SystemExit("error: Fashion-MNIST not found: apt-get install dataset-fashion-mnist")
    rows = []
    for method in args.methods:
        for ipc, iterations in args.ipc:
            seconds, gap = time_setting(args.setting, ipc, iterations, args.dataset, method)
            off, on = statistics.median(seconds[False]), statistics.median(seconds[True])
            name = f"{method} iteration, IPC {ipc} (median of {iterations})"
            rows.append(f"| {name} | {off:.2f} | {on:.2f} | {off / on:.3f}x | {gap:.2e} |")
    if args.eval_models:
        secs = time_lever_evaluation(args.setting, args.dataset, args.eval_models, args.eval_epochs)
        name = f"evaluation of {args.eval_models} ConvNets, {args.eval_epochs} epochs + test, IPC 10"
        rows.append(
            f"| {name} | {secs[False]:.2f} | {secs[True]:.2f} | {secs[False] / secs[True]:.3f}x | - |"
        )
    off_value, on_value = (f"{args.setting}={v}" for v in LEVERS[args.setting])
    lines = [
        f"# `{args.setting}` off vs on, fast path, {', '.join(args.methods)}, {args.dataset}, ConvNet-3, CPU",
        "",
        f"Command: `python benchmarks/lever.py {' '.join(sys.argv[1:])}`  ",
        f"Machine: {cpu_machine()}  ",
        f"Date: {time.strftime('%Y-%m-%d %H:%M')}",
        "",
        f"| measurement | {off_value} (s) | {on_value} (s) | speed-up | image gap |",
        "|---|---|---|---|---|",
        *rows,
        "",
    ]
    write_results(args.out, lines)


if __name__ == "__main__":
    main()
