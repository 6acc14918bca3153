"""The `condense` command: a Hydra app that runs the condense stage, the evaluation stage, or both.

condense                                   digits, IPC 10, DC, evaluated beside a random subset
condense dataset=fashion_mnist ipc=1 method=ours_mda
condense stage=evaluate synthetic=PATH/synthetic.safetensors evaluation=cross_arch
condense stage=evaluate synthetic=MTT_RUN_FOLDER dataset=cifar10 dataset.zca=true ranking=dd_ranking ...
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from condense.app.card import card_line, protocol_card
from condense.app.labels import conf_dir, register_label_resolver, set_label
from condense.app.logger import NullLogger, make_logger
from condense.app.sweep import record_failure
from condense.app.validation import validate
from condense.method.coreset import coreset_set
from condense.primitives import augment as augment_mod
from condense.primitives.compute import Compute, compile_toolchain_missing
from condense.primitives.dataset import Dataset, load_dataset
from condense.primitives.files import atomic_write
from condense.primitives.foreign import read_set
from condense.primitives.synthetic import SyntheticSet, check_compatible, save_grid, save_synthetic
from condense.schema import (
    ConfigError,
    NetworkConfig,
    RunConfig,
    group_choices,
    register_configs,
    to_container,
    to_run_config,
)
from condense.stages.condensation import NumericsError, ProgressHook, RunInterrupted, condense
from condense.stages.evaluation import (
    ArchResult,
    EvaluationLedger,
    evaluate_set,
    evaluation_pool,
    ledger_key,
)
from condense.stages.ranking import rank_set, ranking_line

CONFIG_PATH = str(conf_dir())


def compose_config(overrides: Sequence[str], with_hydra: bool = False) -> DictConfig:
    """The config `condense OVERRIDES...` would run, composed without starting a job (benchmarks,
    notebooks, tests); with_hydra keeps the `hydra` node (launcher, sweeper params). Add
    output_dir=PATH to the overrides if anything will be written."""
    from hydra import compose, initialize_config_dir

    register_resolvers()
    with initialize_config_dir(config_dir=CONFIG_PATH, version_base="1.3"):
        if not any(o.startswith("output_dir=") for o in overrides):
            overrides = [*overrides, "output_dir=unused"]
        return compose("config", overrides=list(overrides), return_hydra_config=with_hydra)


def register_resolvers() -> None:
    """The schema and the resolvers its YAML names (protocol rules, the run folder's label)."""
    register_configs()
    register_label_resolver()


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name} but no CUDA device is visible: use device=cpu or device=auto")
    return torch.device(name)


def write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2, default=str)))


def evaluation_plan(
    cfg: RunConfig, device: torch.device
) -> tuple[dict[str, NetworkConfig], augment_mod.Augment | None, Compute]:
    """The pool, the evaluation augmentation and the compute plan every evaluation of a run uses."""
    aug_cfg = augment_mod.for_dataset(cfg.augment, cfg.dataset.allow_flip)
    augment = augment_mod.evaluation_augment(cfg.dataset.eval_augment, aug_cfg)
    return evaluation_pool(cfg), augment, Compute.for_run(cfg, device)


def intermediate_evaluator(
    cfg: RunConfig, data: Dataset, device: torch.device, metrics: dict[str, Any], logger: NullLogger
) -> ProgressHook:
    """Evaluates the set as it is learned, at evaluation.at_iterations (the final set is left to
    the evaluation stage), with the run's pool and paired models."""
    pool, augment, compute = evaluation_plan(cfg, device)
    labels = torch.arange(data.num_classes).repeat_interleave(cfg.ipc)

    def evaluate_now(done: int, images: torch.Tensor) -> None:
        if done not in cfg.evaluation.at_iterations or done == cfg.iterations:
            return
        results = evaluate_set(
            images.cpu(), labels, data, pool, cfg.evaluation, cfg.seed, "at", device, augment, False, compute
        )
        metrics.setdefault("evaluation_at", {})[str(done)] = {a: r.as_dict() for a, r in results.items()}
        logger.log({f"evaluation_at/{a}": r.mean for a, r in results.items()}, step=done)
        print(f"iteration {done}: " + ", ".join(f"{a} {100 * r.mean:.2f}%" for a, r in results.items()))

    return evaluate_now


def run_condense_stage(
    cfg: RunConfig, data: Dataset, device: torch.device, out: Path, metrics: dict[str, Any]
) -> SyntheticSet:
    logger = make_logger(cfg, out, "condense", metrics["precision"])
    start = time.perf_counter()
    if cfg.coreset.name != "none":
        syn = coreset_set(cfg, data, device, cfg.coreset.name)
        metrics["condense"] = {"seconds": time.perf_counter() - start, "coreset": cfg.coreset.name}
    else:

        def on_iteration(it: int, record: dict[str, float], images: torch.Tensor) -> None:
            logger.log({f"condense/{k}": v for k, v in record.items()}, step=it)
            if it % cfg.logger.image_every == 0 or it == cfg.iterations - 1:
                labels = torch.arange(data.num_classes).repeat_interleave(cfg.ipc)
                logger.log_images("condense/synthetic", images, labels, data.mean, data.std, step=it)

        evaluate_now = intermediate_evaluator(cfg, data, device, metrics, logger)
        syn, stats = condense(cfg, data, device, on_iteration, out, evaluate_now)
        metrics["condense"] = stats.summary()
        metrics["history"] = stats.history
    path = out / "synthetic.safetensors"
    save_synthetic(syn, path)
    save_grid(syn, out / "synthetic.png", data.to_pixels)
    logger.summary({f"condense/{k}": v for k, v in metrics["condense"].items() if isinstance(v, int | float)})
    logger.artifact(f"synthetic-{data.name}-ipc{cfg.ipc}", "synthetic_set", path)
    logger.finish()
    return syn


def run_evaluate_stage(
    cfg: RunConfig,
    data: Dataset,
    device: torch.device,
    out: Path,
    syn: SyntheticSet,
    metrics: dict[str, Any],
) -> dict[str, dict[str, ArchResult]]:
    check_compatible(syn, data.name, data.image_shape, data.num_classes, data.transform)
    logger = make_logger(cfg, out, "evaluate", metrics["precision"])
    pool, augment, compute = evaluation_plan(cfg, device)
    protocol = cfg.evaluation
    metrics["evaluation_protocol"] = asdict(protocol)
    metrics["label"] = label = loaded_label(syn, metrics["label"])
    sets = {label: syn}
    ranking = cfg.ranking.name != "none"
    if (cfg.evaluation.compare_random or ranking) and label != "random":
        # the random subset has the set's size, whatever ipc the command line says
        sets["random"] = coreset_set(replace(cfg, ipc=syn.ipc), data, device, "random")
    results: dict[str, dict[str, ArchResult]] = {}
    ledger = EvaluationLedger.open(out, cfg.resume)  # a resumed evaluation starts at the next model
    judged_by = {"evaluation": asdict(protocol), "pool": {a: asdict(n) for a, n in pool.items()}}
    judged_by |= {"seed": cfg.seed, "precision": compute.precisions(), "augment": asdict(cfg.augment)}
    judged_by |= {"dataset": asdict(cfg.dataset)}  # its own augmentation, flips, transform
    for name, current in sets.items():
        start = time.perf_counter()
        targets = current.labels if current.soft_labels is None else current.soft_labels
        key = ledger_key(current.images, targets, judged_by)
        results[name] = evaluate_set(
            current.images,
            targets,
            data,
            pool,
            protocol,
            cfg.seed,
            name,
            device,
            augment,
            cfg.progress,
            compute,
            done=ledger.done(key),
            on_model=lambda arch, acc, key=key: ledger.record(key, arch, acc),
        )
        metrics.setdefault("evaluation", {})[name] = {arch: r.as_dict() for arch, r in results[name].items()}
        metrics["evaluation"][name]["seconds"] = time.perf_counter() - start
    if ranking:
        metrics["ranking"] = rank_set(
            cfg,
            data,
            device,
            syn,
            sets.get("random", syn),
            results[label],
            results.get("random", results[label]),
            pool,
            augment,
            compute,
        )
        logger.summary({f"ranking/{k}": metrics["ranking"][k] for k in ("hlr", "ior", "lrs", "ars")})
        print(ranking_line(metrics["ranking"]))
    if cfg.iterations in protocol.at_iterations and cfg.synthetic is None:  # the final set's point
        metrics.setdefault("evaluation_at", {})[str(cfg.iterations)] = {
            arch: r.as_dict() for arch, r in results[label].items()
        }
    rows = [
        [label, arch, r.mean, r.std, len(r.accuracies), r.seconds]
        for label, per_arch in results.items()
        for arch, r in per_arch.items()
    ]
    logger.log_table("evaluation/accuracy", ["set", "architecture", "mean", "std", "models", "seconds"], rows)
    logger.summary(
        {
            f"accuracy/{label}/{arch}": r.mean
            for label, per_arch in results.items()
            for arch, r in per_arch.items()
        }
    )
    logger.summary(
        {
            f"accuracy_std/{label}/{arch}": r.std
            for label, per_arch in results.items()
            for arch, r in per_arch.items()
        }
    )
    logger.finish()
    return results


def loaded_label(syn: SyntheticSet, run_label: str) -> str:
    """A loaded set is named by the config stored in its file; another tool's set by its layout and
    file (`dc:res_DC_...#0`, `mtt:run/images_best`); the run's own set by the run's label."""
    if syn.config:
        return set_label(syn.config)
    return syn.source if syn.source != "condense" else run_label


def adapt_to_set(cfg: RunConfig, syn: SyntheticSet) -> RunConfig:
    """The evaluation a loaded set asks for: its learned learning rate (evaluation.learned_lr)."""
    if syn.lr is not None and cfg.evaluation.learned_lr:
        return replace(cfg, evaluation=replace(cfg.evaluation, lr=syn.lr))
    return cfg


def describe_set(syn: SyntheticSet, cfg: RunConfig) -> str:
    ev = cfg.evaluation
    labels = "hard" if syn.soft_labels is None else f"soft (loss {ev.soft_loss}, T={ev.temperature})"
    lr = (
        f"{syn.lr} ({'used' if ev.learned_lr else 'ignored: evaluation.learned_lr=false'})"
        if syn.lr
        else "none"
    )
    return (
        f"set: {syn.source}, {len(syn.labels)} images, ipc {syn.ipc}, labels {labels}, learned lr {lr}, "
        f"space {syn.transform}"
    )


def format_table(results: dict[str, dict[str, ArchResult]], metrics: dict[str, Any]) -> str:
    lines = [f"{'set':<12} {'architecture':<14} {'accuracy (%)':>16} {'models':>7} {'eval s':>8}"]
    for label, per_arch in results.items():
        for arch, r in per_arch.items():
            acc = f"{100 * r.mean:.2f} +- {100 * r.std:.2f}"
            lines.append(f"{label:<12} {arch:<14} {acc:>16} {len(r.accuracies):>7} {r.seconds:>8.1f}")
    if "condense" in metrics:
        lines.append(f"condense stage: {metrics['condense']['seconds']:.1f} s")
    return "\n".join(lines)


def print_choices(cfg: RunConfig, device: torch.device, compute: Compute) -> None:
    """Every protocol choice, printed before work starts (never a silent override)."""
    ev = cfg.evaluation
    chosen = " ".join(f"{group}={option}" for group, option in group_choices(cfg).items())
    print(
        f"condense: {chosen} ipc={cfg.ipc} iterations={cfg.iterations} seed={cfg.seed} device={device} "
        f"compute={'fast' if cfg.fast else 'straightforward'} ({compute.describe()})"
    )
    parts = " ".join(f"{part}={kind}" for part, kind in compute.precisions().items())
    print(f"precision: {cfg.precision} -> {parts}")
    print(
        f"evaluate: models={list(evaluation_pool(cfg))} x{ev.num_models} epochs={ev.epochs} "
        f"lr={ev.lr} eval_augment={'dsa' if cfg.augment.name != 'none' else cfg.dataset.eval_augment.enabled}"
    )
    print(f"protocol card: {card_line(protocol_card(cfg, compute.precisions()))}")


RESULT_FILES = ("metrics.json", "synthetic.safetensors", "checkpoint.safetensors", "evaluation_progress.json")


def refuse_to_overwrite(out: Path, resume: bool) -> None:
    """A run never writes over another run's results (resume=true continues one on purpose)."""
    taken = [name for name in RESULT_FILES if (out / name).exists()]
    if taken and not resume:
        raise ConfigError(
            f"output folder {out} already holds a run ({', '.join(taken)}): "
            "choose another hydra.run.dir, or add resume=true to continue that run"
        )


# Settings that say where and how a run is kept: a finished run is the same run whatever they are.
KEEPING = ("output_dir", "logger", "progress", "resume", "checkpoint_every")


def finished_run(out: Path, cfg: RunConfig) -> dict[str, Any] | None:
    """The metrics of a run in `out` that finished every stage with these settings, or None; a
    finished run made with other settings is refused (resume never mixes two runs' numbers)."""
    path = out / "metrics.json"
    if not path.exists():
        return None
    metrics = json.loads(path.read_text())
    if not metrics.get("finished"):
        return None
    now = {k: v for k, v in to_container(cfg).items() if k not in KEEPING}
    then = {k: v for k, v in metrics["config"].items() if k not in KEEPING}
    differ = sorted(
        k
        for k in now.keys() | then.keys()
        if json.dumps(now.get(k), default=str) != json.dumps(then.get(k), default=str)
    )
    if differ:
        raise ConfigError(
            f"resume: {out} holds a finished run made with other settings ({', '.join(differ)}): "
            "choose another output folder"
        )
    return metrics


def run(cfg: RunConfig) -> dict[str, Any]:
    """Both stages as `cfg.stage` says; returns the metrics also written to metrics.json. With
    resume=true a finished run is left as it is, a checkpointed condense stage continues, and an
    evaluation resumes at its next model."""
    validate(cfg)
    device = resolve_device(cfg.device)
    out = Path(cfg.output_dir)
    refuse_to_overwrite(out, cfg.resume)
    if cfg.resume and (previous := finished_run(out, cfg)) is not None:
        print(f"resume: {out} already finished; nothing to run")
        return previous
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(
        out / "resolved_config.yaml",
        lambda tmp: tmp.write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg))),
    )
    compute = Compute.for_run(cfg, device)
    if compute.compile and (missing := compile_toolchain_missing(device)) is not None:
        raise ConfigError(
            f"compile=true needs {missing} for torch.compile on {device}: install it or set compile=false"
        )
    print_choices(cfg, device, compute)
    compute.configure_process()
    data = load_dataset(cfg.dataset)
    metrics: dict[str, Any] = {
        "config": to_container(cfg),
        "output_dir": str(out),
        "label": set_label(to_container(cfg)),  # what the run's set is called (condense.app.labels)
        # Part of the protocol: a bf16 number is never read as an fp32 one.
        "precision": {"setting": cfg.precision, **compute.precisions()},
        "protocol_card": protocol_card(cfg, compute.precisions()),
    }
    syn = None
    if cfg.stage in ("all", "condense"):
        syn = run_condense_stage(cfg, data, device, out, metrics)
        metrics["finished"] = cfg.stage == "condense"
        write_json(out / "metrics.json", metrics)  # the condensed set's numbers are safe now
    if cfg.stage in ("all", "evaluate"):
        if cfg.synthetic is not None:
            syn = read_set(Path(cfg.synthetic).expanduser(), cfg.reader, data)
            cfg = adapt_to_set(cfg, syn)
            metrics["protocol_card"] = protocol_card(cfg, compute.precisions(), syn)
            metrics["set"] = {"source": syn.source, "labels": syn.label_kind, "lr": syn.lr, "ipc": syn.ipc}
            print(describe_set(syn, cfg))
            print(f"protocol card: {card_line(metrics['protocol_card'])}")
        assert syn is not None
        results = run_evaluate_stage(cfg, data, device, out, syn, metrics)
        metrics["finished"] = True
        write_json(out / "metrics.json", metrics)
        print(format_table(results, metrics))
    print(f"outputs: {out}")
    return metrics


def sweep_tag() -> str:
    from hydra.core.hydra_config import HydraConfig

    return f"sweep-{Path(HydraConfig.get().sweep.dir).name}"


def _is_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def use_slurm_allocation() -> None:
    """In a Slurm job, use the CPUs it was given (SLURM_CPUS_PER_TASK) as PyTorch threads, unless
    OMP_NUM_THREADS says otherwise: jobs sharing a node must not each claim every core."""
    cpus = os.environ.get("SLURM_CPUS_PER_TASK")
    if cpus and cpus.isdigit() and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(int(cpus))
        print(f"Slurm job: {cpus} CPUs -> {cpus} PyTorch threads")


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="config")
def app(cfg: DictConfig) -> float | None:
    try:
        run_cfg = to_run_config(cfg)
        if _is_multirun():  # every job of a sweep shares one W&B tag
            run_cfg.logger.tags = [*run_cfg.logger.tags, sweep_tag()]
        use_slurm_allocation()
        restarts = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
        if restarts and not run_cfg.resume:  # requeued (preempted, timed out): continue, never redo
            print(f"requeued by Slurm (restart {restarts}): resume=true in {run_cfg.output_dir}")
            run_cfg.resume = True
        metrics = run(run_cfg)
    except RunInterrupted as err:
        if err.signum == signal.SIGUSR2 and callable(err.previous):  # submitit's: requeues, exits
            print(f"{err}: checkpoint saved; handing the signal to the job's handler", file=sys.stderr)
            err.previous(err.signum, None)
        print(
            f"error: {err}; rerun the same command with resume=true hydra.run.dir={cfg.output_dir}",
            file=sys.stderr,
        )
        sys.exit(128 + err.signum)
    except Exception as err:
        if _is_multirun():  # record it in the job's folder; the sweep goes on (condense.app.sweep)
            record_failure(Path(cfg.output_dir), err)
            print(f"error: job failed: {err}", file=sys.stderr)
            return None
        if isinstance(err, ConfigError | NumericsError):  # one line: a mistake, or numbers gone bad
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2 if isinstance(err, ConfigError) else 3)
        raise
    # A scalar return value lets Hydra's Optuna sweeper optimise accuracy.
    ev = metrics.get("evaluation", {}).get(metrics["label"], {})
    means = [v["mean"] for v in ev.values() if isinstance(v, dict)]
    return sum(means) / len(means) if means else None


def main() -> None:
    register_resolvers()
    app()


if __name__ == "__main__":
    main()
