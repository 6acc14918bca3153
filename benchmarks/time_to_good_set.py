"""Time to a good set (issue: speed measured as time to a good set), in one command.

Every run is a real `condense` process, one at a time, on Fashion-MNIST with ConvNet-3:

1. Condensation at IPC 1 and IPC 10, the same iteration budget for every row: DC on the
   straightforward path (fast=false, fp32: the baseline of the speed target), Ours-MDA as it runs
   by default (the accuracy reference), and `method=ours_mda speed=fast` (the recipe). The
   recipe's accuracy must equal Ours-MDA's within one std of the paired models; its condensation
   wall time is compared with DC's.
2. Evaluation of one IPC-10 set (the recipe's) one model after another on the straightforward
   path against the recipe's evaluation (torch.compile), model by model on the same paired models,
   and a torch.func ensemble (stack_module_state + vmap) of 20 ConvNets against one model.
3. Stopping on the matching loss (stop.patience): iterations saved and the accuracy kept.
4. Peak memory of the recipe at IPC 50.

    python benchmarks/time_to_good_set.py --out benchmarks/results/time_to_good_set.md

With --curve, only time to quality instead: one `speed=fast` run per lever, its set evaluated at
intermediate iterations (evaluation.at_iterations, the same paired models at every point),
accuracy against the condensation seconds spent to reach each point, a table and a PNG:

    python benchmarks/time_to_good_set.py --curve 1:72.0:300:25,50,100,200 \
        --lever recipe= --lever real_init=init=real --out benchmarks/results/time_to_quality_ipc1.md
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.func import functional_call, stack_module_state, vmap

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_file import head_commit, machine_description, max_rss_gib, write_results  # noqa: E402

from condense.primitives.compute import cpu_has_native_bf16, set_heap_reuse  # noqa: E402
from condense.primitives.network import build_network  # noqa: E402
from condense.report import learned_curves, load_run, plot_curves, seconds_to  # noqa: E402
from condense.schema import NetworkConfig, RunRecord  # noqa: E402

BASE = ["dataset=fashion_mnist", "logger=none", "progress=false", "device=auto"]
DC_STRAIGHTFORWARD = ["method=dc", "fast=false", "precision=fp32"]
OURS_MDA = ["method=ours_mda"]
RECIPE = ["method=ours_mda", "speed=fast"]


PAPER_ITERATIONS = 1000  # DC's and the paper's budget, to which per-iteration costs are projected


@dataclass
class Run:
    """What one `condense` process wrote into its metrics.json."""

    metrics: dict

    @property
    def condense_seconds(self) -> float:
        return float(self.metrics["condense"]["seconds"])

    @property
    def iterations(self) -> int:
        return len(self.metrics["history"])

    def steady_iteration(self) -> float:
        """The median iteration's seconds: the cost once compiling (first iterations) is done."""
        return statistics.median(float(h["seconds"]) for h in self.metrics["history"])

    def projected(self, iterations: int = PAPER_ITERATIONS) -> float:
        """Seconds for `iterations`: the iterations measured, then the median one for the rest."""
        spent = sum(float(h["seconds"]) for h in self.metrics["history"])
        return spent + self.steady_iteration() * max(iterations - self.iterations, 0)

    def accuracies(self) -> list[float]:
        label = self.metrics["label"]
        return [100 * a for a in self.metrics["evaluation"][label]["ConvNet"]["accuracies"]]

    def evaluate_seconds(self) -> float:
        seconds = RunRecord.from_dict(self.metrics).own_seconds()  # older files too
        assert seconds is not None, "the run's own set was not evaluated"
        return seconds


def check_same_run(metrics: dict, args: list[str], out: Path) -> None:
    """A run read back must be the one asked for: --work with other budgets would otherwise read
    another run's numbers. Compares every top-level key=value the command sets."""
    config = metrics["config"]
    for arg in args:
        key, _, value = arg.partition("=")
        plain = "." not in key and key in config and not isinstance(config[key], dict)
        if plain and str(config[key]).lower() != value.lower():
            raise SystemExit(
                f"--work: {out} holds a run with {key}={config[key]}, not {value}: use another --work"
            )


def condense(args: list[str], out: Path) -> Run:
    """One `condense` process into `out`; a folder that already holds its finished metrics.json
    (--work of an earlier invocation) is read instead of run again."""
    if (out / "metrics.json").exists() and json.loads((out / "metrics.json").read_text()).get("finished"):
        metrics = json.loads((out / "metrics.json").read_text())
        check_same_run(metrics, args, out)
        print(f"  {' '.join(args)}: read from {out}", flush=True)
        return Run(metrics)
    start = time.perf_counter()
    command = [sys.executable, "-m", "condense", *BASE, *args, f"hydra.run.dir={out}"]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"condense {' '.join(args)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    print(f"  {' '.join(args)}: {time.perf_counter() - start:.0f} s", flush=True)
    return Run(json.loads((out / "metrics.json").read_text()))


def mean_std(values: list[float]) -> str:
    return f"{statistics.fmean(values):.2f} +- {statistics.pstdev(values):.2f}"


def within_one_std(recipe: list[float], reference: list[float]) -> bool:
    """The recipe's mean is within one std (the larger of the two rows') of the reference's."""
    spread = max(statistics.pstdev(recipe), statistics.pstdev(reference))
    return abs(statistics.fmean(recipe) - statistics.fmean(reference)) <= spread


def condensation_rows(
    ipc: int, iterations: int, dc_iterations: int, models: int, work: Path
) -> tuple[list[str], Run]:
    """DC straightforward (timed over dc_iterations, scaled to the budget), Ours-MDA and the recipe."""
    common = [f"ipc={ipc}", f"evaluation.num_models={models}", "evaluation.compare_random=false"]
    dc = condense(
        [*DC_STRAIGHTFORWARD, *common, f"iterations={dc_iterations}", "stage=condense"], work / f"dc{ipc}"
    )
    ours = condense([*OURS_MDA, *common, f"iterations={iterations}"], work / f"ours{ipc}")
    recipe = condense([*RECIPE, *common, f"iterations={iterations}"], work / f"recipe{ipc}")
    # the recipe less torch.compile: what the adaptive real batch alone buys, condensation only
    adaptive = condense(
        [*OURS_MDA, "real_batch=adaptive", *common, f"iterations={iterations}", "stage=condense"],
        work / f"adaptive{ipc}",
    )
    dc_budget = dc.condense_seconds / dc.iterations * iterations
    timed = "" if dc_iterations == iterations else f" ({dc_iterations} its timed)"

    def row(name: str, run: Run, seconds: float, accuracy: str, real: str) -> str:
        return (
            f"| {name} | {seconds:.0f} | {dc_budget / seconds:.2f}x | {run.steady_iteration():.2f} | "
            f"{dc.projected() / run.projected():.2f}x | {accuracy} | {real} |"
        )

    real = {
        name: str(r.metrics["condense"]["grad_real_images"])
        for name, r in (("ours", ours), ("recipe", recipe))
    }
    rows = [
        row(f"DC, straightforward (fp32){timed}", dc, dc_budget, "not evaluated", "-"),
        row(
            "Ours-MDA (default path)", ours, ours.condense_seconds, mean_std(ours.accuracies()), real["ours"]
        ),
        row(
            "Ours-MDA real_batch=adaptive (the recipe less compile)",
            adaptive,
            adaptive.condense_seconds,
            "not evaluated",
            str(adaptive.metrics["condense"]["grad_real_images"]),
        ),
        row(
            "Ours-MDA speed=fast (recipe)",
            recipe,
            recipe.condense_seconds,
            mean_std(recipe.accuracies()),
            real["recipe"],
        ),
        "",
        f"Per model, Ours-MDA: {[round(a, 2) for a in ours.accuracies()]}; recipe: "
        f"{[round(a, 2) for a in recipe.accuracies()]}. Recipe within one std of Ours-MDA: "
        f"{within_one_std(recipe.accuracies(), ours.accuracies())}. Recipe against DC straightforward: "
        f"{dc_budget / recipe.condense_seconds:.2f}x over these {iterations} iterations (compiling "
        "included), "
        f"{dc.projected() / recipe.projected():.2f}x projected to {PAPER_ITERATIONS}; against Ours-MDA: "
        f"{ours.condense_seconds / recipe.condense_seconds:.2f}x and "
        f"{ours.projected() / recipe.projected():.2f}x. "
        f"Evaluation seconds ({len(ours.accuracies())} models): Ours-MDA {ours.evaluate_seconds():.0f}, "
        f"recipe {recipe.evaluate_seconds():.0f}.",
    ]
    return rows, recipe


def evaluation_rows(synthetic: Path, models: int, work: Path) -> list[str]:
    """One set, the same paired models, one after another: straightforward fp32 against the recipe."""
    common = ["stage=evaluate", f"synthetic={synthetic}", f"evaluation.num_models={models}"]
    common += ["evaluation.compare_random=false", "method=ours_mda"]
    slow = condense([*common, "fast=false", "precision=fp32"], work / "eval_slow")
    fast = condense([*common, "speed=fast"], work / "eval_fast")
    per_slow, per_fast = slow.evaluate_seconds() / models, fast.evaluate_seconds() / models
    gaps = [abs(a - b) for a, b in zip(slow.accuracies(), fast.accuracies(), strict=True)]
    return [
        "| evaluation path | s per model | 20 models (s) | speed-up | accuracies (%) |",
        "|---|---|---|---|---|",
        f"| straightforward, fp32, one after another | {per_slow:.1f} | {20 * per_slow:.0f} | 1.00x | "
        f"{[round(a, 2) for a in slow.accuracies()]} |",
        f"| recipe (torch.compile, heap reuse), one after another | {per_fast:.1f} | {20 * per_fast:.0f} | "
        f"{per_slow / per_fast:.2f}x | {[round(a, 2) for a in fast.accuracies()]} |",
        "",
        f"Largest model-by-model accuracy gap: {max(gaps):.2f} points ({models} paired models). The recipe's "
        "seconds include loading its compiled graphs from the Inductor cache its condense run filled (as on "
        "a machine after one run); 20 models are the measured per-model time x 20.",
    ]


def ensemble_step_seconds(models: int, steps: int = 4) -> tuple[float, float]:
    """Seconds per model and SGD step on an IPC-10 batch (100 Fashion-MNIST-sized images), on the
    GPU where there is one: one ConvNet alone, and `models` ConvNets trained as one torch.func
    ensemble (vmap, which turns each convolution into a grouped one)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        set_heap_reuse(True)
    cfg, shape = NetworkConfig(), (1, 28, 28)
    nets = [build_network(cfg, shape, 10, seed, device) for seed in range(models)]
    x, y = torch.randn(100, *shape, device=device), torch.arange(10, device=device).repeat(10)

    def timed(step: Callable[[], None]) -> float:
        step()  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return (time.perf_counter() - start) / steps

    net = nets[0]
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)

    def one_step() -> None:
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    params, buffers = stack_module_state(nets)
    base = build_network(cfg, shape, 10, 0, torch.device("meta"))
    ensemble_opt = torch.optim.SGD(params.values(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    xs, ys = x.expand(models, *x.shape), y.expand(models, *y.shape)

    def loss_of(p: dict, b: dict, xx: torch.Tensor, yy: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(functional_call(base, (p, b), (xx,)), yy)

    def ensemble_step() -> None:
        loss = vmap(loss_of)(params, buffers, xs, ys).sum()  # each model's gradient is its own
        ensemble_opt.zero_grad()
        loss.backward()
        ensemble_opt.step()

    return timed(one_step), timed(ensemble_step) / models


def long_rows(iterations: int, models: int, work: Path) -> list[str]:
    """Ours-MDA against the recipe at a longer IPC-1 budget, both measured whole (compiling
    included); DC straightforward is its 20-iteration median projected, as it is linear."""
    common = ["ipc=1", f"iterations={iterations}", f"evaluation.num_models={models}"]
    common += ["evaluation.compare_random=false"]
    ours = condense([*OURS_MDA, *common], work / f"long_ours{iterations}")
    recipe = condense([*RECIPE, *common], work / f"long_recipe{iterations}")
    return [
        "| row | condense (s) | median s/iteration | accuracy (%) |",
        "|---|---|---|---|",
        f"| Ours-MDA (default path) | {ours.condense_seconds:.0f} | {ours.steady_iteration():.2f} | "
        f"{mean_std(ours.accuracies())} |",
        f"| Ours-MDA speed=fast (recipe) | {recipe.condense_seconds:.0f} | {recipe.steady_iteration():.2f} | "
        f"{mean_std(recipe.accuracies())} |",
        "",
        f"Per model, Ours-MDA: {[round(a, 2) for a in ours.accuracies()]}; recipe: "
        f"{[round(a, 2) for a in recipe.accuracies()]}. Recipe within one std of Ours-MDA: "
        f"{within_one_std(recipe.accuracies(), ours.accuracies())}; condensation "
        f"{ours.condense_seconds / recipe.condense_seconds:.2f}x "
        "faster than Ours-MDA, measured whole.",
    ]


def stopping_rows(iterations: int, models: int, work: Path) -> list[str]:
    common = [*RECIPE, "ipc=1", f"iterations={iterations}", f"evaluation.num_models={models}"]
    common += ["evaluation.compare_random=false"]
    full = condense(common, work / "stop_full")
    stopped = condense(
        [*common, "stop.patience=2", "stop.window=5", "stop.min_improvement=0.01"], work / "stop"
    )
    at = stopped.metrics["condense"].get("stopped_at") or iterations
    return [
        "| run | iterations | condense (s) | accuracy (%) |",
        "|---|---|---|---|",
        f"| recipe, every iteration | {iterations} | {full.condense_seconds:.0f} | "
        f"{mean_std(full.accuracies())} |",
        f"| recipe, stop.patience=2 (window 5, 1%) | {at} | {stopped.condense_seconds:.0f} | "
        f"{mean_std(stopped.accuracies())} |",
        "",
        f"Iterations saved: {iterations - at} of {iterations}.",
    ]


def peak_memory_ipc50(work: Path) -> float:
    """Max RSS (GiB) of the recipe at IPC 50 cut to two matching steps and one inner epoch: the
    peak of a whole run, whose every outer step holds the same tensors."""
    command = [sys.executable, "-m", "condense", *BASE, *RECIPE, "ipc=50", "iterations=1", "stage=condense"]
    command += ["step_policy=fixed", "step_policy.outer_loop=2", "step_policy.inner_epochs=1"]
    command += [f"hydra.run.dir={tempfile.mkdtemp(prefix='ipc50-', dir=work)}"]  # measured anew each time
    return max_rss_gib(command)


@dataclass(frozen=True)
class CurveSpec:
    """--curve IPC:TARGET:ITERATIONS:AT,AT,...: where the curve is drawn and the accuracy to reach."""

    ipc: int
    target: float
    iterations: int
    points: tuple[int, ...]

    @classmethod
    def parse(cls, text: str) -> CurveSpec:
        try:
            ipc, target, iterations, points = text.split(":")
            spec = cls(int(ipc), float(target), int(iterations), tuple(int(p) for p in points.split(",")))
        except ValueError:
            usage = "use IPC:TARGET:ITERATIONS:AT,AT,... e.g. 1:72.0:300:25,50,100"
            raise SystemExit(f"--curve {text}: {usage}") from None
        if not all(0 <= p < spec.iterations for p in spec.points):
            raise SystemExit(
                f"--curve {text}: every AT must be in 0..ITERATIONS-1 (the final set is always judged)"
            )
        return spec

    def overrides(self, models: int) -> list[str]:
        at = ",".join(str(p) for p in (*self.points, self.iterations))
        return [
            f"ipc={self.ipc}", f"iterations={self.iterations}", f"evaluation.num_models={models}",
            "evaluation.compare_random=false", f"evaluation.at_iterations=[{at}]",
        ]  # fmt: skip


def parse_lever(text: str) -> tuple[str, list[str]]:
    """--lever NAME=OVERRIDE OVERRIDE ...: a lever's name and the overrides it adds to the recipe
    (they come after the recipe's, so `dm=method=dm` runs DM with `speed=fast`)."""
    name, sep, overrides = text.partition("=")
    if not sep or not name:
        raise SystemExit(f"--lever {text}: use NAME=OVERRIDES, e.g. real_init=init=real (recipe= for none)")
    return name, overrides.split()


def first_reach(curve: list[tuple[float, float]], target: float) -> tuple[float, float] | None:
    """The first (seconds, accuracy) point at or above target, if any."""
    return next(((x, y) for x, y in curve if y >= target), None)


def curve_rows(
    spec: CurveSpec, levers: list[tuple[str, list[str]]], models: int, work: Path, png: Path
) -> list[str]:
    """One recipe run per lever, evaluated along the way; the table and the plot of the curves."""
    curves: dict[str, list[tuple[float, float]]] = {}
    lines, details = [], []
    points = (*spec.points, spec.iterations)
    for name, overrides in levers:
        # each lever compiles from a cold cache, as on a fresh machine: none rides on another's graphs
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(work / f"inductor-{name}")
        run = condense([*RECIPE, *overrides, *spec.overrides(models)], work / f"curve{spec.ipc}-{name}")
        stored = load_run(Path(run.metrics["output_dir"]) / "metrics.json")
        assert stored is not None and sorted(stored.at_iterations) == sorted(points), "points missing"
        [curve] = learned_curves([stored], [], seconds_to).values()
        curves[name] = curve
        cells = []
        for done in points:
            accs = [100 * a for a in stored.at_iterations[done]]
            cells.append(f"{mean_std(accs)} @ {seconds_to(stored, done):.0f} s")
            details.append(f"{name}, iteration {done}: {[round(a, 2) for a in accs]}")
        reach = first_reach(curve, spec.target)
        best = max(curve, key=lambda xy: xy[1])
        verdict = (
            f"reached at {reach[0]:.0f} s ({reach[1]:.2f})"
            if reach
            else f"not reached: best {best[1]:.2f} at {best[0]:.0f} s, {spec.target - best[1]:.2f} short"
        )
        shown = " ".join(overrides) or "-"
        lines.append(f"| {name} | `{shown}` | {' | '.join(cells)} | {run.condense_seconds:.0f} | {verdict} |")
    plot_curves(curves, "condensation seconds (the iterations' own, evaluations excluded)", png, spec.target)
    header = " | ".join(f"iteration {p}" for p in points)
    return [
        f"| lever | overrides | {header} | condense stage (s) | target {spec.target} |",
        "|---|---|" + "---|" * len(points) + "---|---|",
        *lines,
        "",
        f"Plot: {png.name} (mean accuracy of the {models} paired models against the seconds spent).",
        "",
        "Per model:",
        "",
        *[f"- {d}" for d in details],
    ]


def curve_main(args: argparse.Namespace, commit: str, work: Path) -> None:
    spec = CurveSpec.parse(args.curve)
    levers = [parse_lever(text) for text in args.lever or ["recipe="]]
    started = time.strftime("%Y-%m-%d %H:%M")
    png = args.out.with_suffix(".png")
    png.parent.mkdir(parents=True, exist_ok=True)
    rows = curve_rows(spec, levers, args.curve_models, work, png)
    command = " ".join(["python benchmarks/time_to_good_set.py", f"--curve {args.curve}"])
    command += "".join(f" --lever '{text}'" for text in args.lever or [])
    command += f" --curve-models {args.curve_models} --out {args.out}"
    lines = [
        f"# Time to quality (Fashion-MNIST, ConvNet-3, IPC {spec.ipc}, target {spec.target})",
        "",
        f"Command: `{command}`  ",
        f"Commit: {commit}  ",
        f"Machine: {machine_description(f'{torch.get_num_threads()} intra-op threads')}, "
        f"native bf16: {cpu_has_native_bf16()}  ",
        f"Date: {started}; every lever a separate `condense {' '.join(RECIPE)}` process with the lever's "
        "overrides after the recipe's (a lever's `method=` replaces Ours-MDA), one at a time, seed 0, "
        "each compiling from a cold Inductor cache (its seconds include compiling); the set "
        "judged at each point by the same paired models (the k-th model is the same "
        "network and data order at every point); seconds are the condense stage's iteration times "
        "summed up to the point (the evaluations between them pause the clock).",
        "",
        *rows,
        "",
    ]
    write_results(args.out, lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/time_to_good_set.md"))
    parser.add_argument("--iterations-ipc1", type=int, default=20)
    parser.add_argument("--iterations-ipc10", type=int, default=4)
    parser.add_argument(
        "--dc-iterations-ipc10", type=int, default=2, help="DC straightforward is timed over these"
    )
    parser.add_argument("--models-ipc1", type=int, default=5)
    parser.add_argument("--models-ipc10", type=int, default=3)
    parser.add_argument("--stop-iterations", type=int, default=60)
    parser.add_argument("--long-iterations-ipc1", type=int, default=100)
    parser.add_argument(
        "--work", type=Path, default=None, help="run folders; finished ones are read, not rerun"
    )
    parser.add_argument("--curve", help="IPC:TARGET:ITERATIONS:AT,AT,...: time to quality only")
    parser.add_argument("--lever", action="append", help="NAME=OVERRIDES added to the recipe (--curve)")
    parser.add_argument("--curve-models", type=int, default=5)
    args = parser.parse_args()
    commit = head_commit()
    work = args.work or Path(tempfile.mkdtemp(prefix="time_to_good_set-"))
    print(f"run folders: {work}", flush=True)
    # A cold compile cache: the recipe's first run pays for compiling, as on a fresh machine.
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(work / "inductor")
    if args.curve:
        curve_main(args, commit, work)
        return
    started = time.strftime("%Y-%m-%d %H:%M")
    print("IPC 1", flush=True)
    ipc1, _ = condensation_rows(1, args.iterations_ipc1, args.iterations_ipc1, args.models_ipc1, work)
    print("IPC 10", flush=True)
    ipc10, recipe10 = condensation_rows(
        10, args.iterations_ipc10, args.dc_iterations_ipc10, args.models_ipc10, work
    )
    print("evaluation", flush=True)
    evaluation = evaluation_rows(Path(recipe10.metrics["output_dir"]) / "synthetic.safetensors", 3, work)
    one, ensemble = ensemble_step_seconds(20)
    ensemble_device = torch.cuda.get_device_name() if torch.cuda.is_available() else "the CPU"
    print("long IPC 1", flush=True)
    long_ipc1 = long_rows(args.long_iterations_ipc1, args.models_ipc1, work)
    print("stopping", flush=True)
    stopping = stopping_rows(args.stop_iterations, args.models_ipc1, work)
    print("memory", flush=True)
    memory = peak_memory_ipc50(work)
    header = (
        "| row | condense (s) | vs DC straightforward | median s/iteration | "
        f"vs DC at {PAPER_ITERATIONS} its (projected) | accuracy (%) | real images |"
    )
    lines = [
        "# Time to a good set (Fashion-MNIST, ConvNet-3 instance norm)",
        "",
        f"Command: `python benchmarks/time_to_good_set.py --out {args.out}`  ",
        f"Commit: {commit}  ",
        f"Machine: {machine_description(f'{torch.get_num_threads()} intra-op threads')}, "
        f"native bf16: {cpu_has_native_bf16()}  ",
        f"Date: {started}; every run a separate `condense` process, one at a time, seed 0, "
        "paired evaluation models (the same models for every set).",
        "",
        f"## Condensation, IPC 1, {args.iterations_ipc1} iterations, {args.models_ipc1} models",
        "",
        header,
        "|---|---|---|---|---|---|---|",
        *ipc1,
        "",
        f"## Condensation, IPC 10, {args.iterations_ipc10} iterations, {args.models_ipc10} models",
        "",
        header,
        "|---|---|---|---|---|---|---|",
        *ipc10,
        "",
        "## Evaluation of an IPC-10 set (the recipe's), 301 epochs + the 10,000 test images per model",
        "",
        *evaluation,
        "",
        f"torch.func ensemble of 20 ConvNets (stack_module_state + vmap) on {ensemble_device}, s per model "
        f"and SGD step on a batch of 100: {ensemble:.3f}, against one model alone: {one:.3f} "
        f"({one / ensemble:.2f}x).",
        "",
        f"## A longer budget: IPC 1, {args.long_iterations_ipc1} iterations, {args.models_ipc1} models",
        "",
        *long_ipc1,
        "",
        f"## Stopping on the matching loss, IPC 1, up to {args.stop_iterations} iterations",
        "",
        *stopping,
        "",
        "## Memory",
        "",
        f"Peak memory of the recipe at IPC 50 (max RSS of the condense process, two matching steps and an "
        f"inner epoch): {memory:.2f} GiB.",
        "",
    ]
    write_results(args.out, lines)


if __name__ == "__main__":
    main()
