"""One run: plan it, then the condense stage, the evaluation stage, or both, as `stage` says; every
number lands in metrics.json (a RunRecord) and, as a side channel, in W&B."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from condense.app.card import models_text
from condense.app.logger import NullLogger, make_logger
from condense.app.plan import RunPlan, evaluation_protocol, plan_for_set, plan_run, plan_with_learned_lr
from condense.app.resume import finished_run, refuse_to_overwrite
from condense.method.coreset import FeatureTraining, coreset_set
from condense.method.experts import ExpertSource
from condense.method.matching import TRAJECTORY, class_major_labels
from condense.primitives.dataset import Dataset, load_dataset
from condense.primitives.files import atomic_write
from condense.primitives.foreign import read_set
from condense.primitives.synthetic import (
    SyntheticSet,
    check_compatible,
    expand_mosaic,
    save_grid,
    save_synthetic,
)
from condense.schema import ConfigError, RunConfig, RunRecord, card_line, group_choices, to_container
from condense.stages.condensation import CondenseRecipe, ProgressHook, condense
from condense.stages.evaluation import (
    ArchResult,
    Candidate,
    EvaluationLedger,
    evaluate_sets,
    ledger_key,
)
from condense.stages.experts import ExpertsRecipe, ExpertsReport, experts_for_run
from condense.stages.ranking import Judge, RankingSetup, rank_set, ranking_line

Results = dict[str, dict[str, ArchResult]]


def write_record(out: Path, record: RunRecord) -> None:
    text = json.dumps(record.to_dict(), indent=2, default=str)
    atomic_write(out / "metrics.json", lambda tmp: tmp.write_text(text))


def coreset_of_run(plan: RunPlan, data: Dataset, name: str, ipc: int) -> SyntheticSet:
    """The coreset NAME of `ipc` images per class, its file saying what made it: this coreset, at
    this size, not the run's method."""
    cfg = plan.cfg
    features = FeatureTraining(cfg.network, cfg.coreset.feature_epochs, cfg.batch_train, cfg.seed)
    syn = coreset_set(name, ipc, features, data, plan.device)
    config = to_container(replace(cfg, ipc=ipc))
    syn.config = {**config, "coreset": {**config["coreset"], "name": name}}
    return syn


def intermediate_evaluator(
    plan: RunPlan, data: Dataset, record: RunRecord, logger: NullLogger
) -> ProgressHook:
    """Evaluates the set as it is learned, at evaluation.at_iterations (the final set is left to
    the evaluation stage), with the run's pool and paired models."""
    cfg = plan.cfg
    k = cfg.matching.expansion
    labels = class_major_labels(data.num_classes, cfg.ipc, torch.device("cpu")).repeat(k * k)

    def evaluate_now(done: int, images: torch.Tensor, lr: float | None) -> None:
        if done not in cfg.evaluation.at_iterations or done == cfg.iterations:
            return
        # the set's learned lr as it stands then (trajectory matching), as the final set is judged
        learned = lr is not None and cfg.evaluation.learned_lr
        ev = replace(cfg.evaluation, lr=lr) if learned else cfg.evaluation
        judged, _ = evaluate_sets(
            {"at": Candidate(expand_mosaic(images.cpu(), k), labels)}, data, plan.pool, ev, cfg.seed,
            plan.device, plan.eval_augment, False, plan.compute, convnet_bn_rule=plan.convnet_bn_rule,
        )  # fmt: skip
        results = judged["at"]
        record.evaluation_at[str(done)] = {a: r.as_dict() for a, r in results.items()}
        logger.log({f"evaluation_at/{a}": r.mean for a, r in results.items()}, step=done)
        print(f"iteration {done}: " + ", ".join(f"{a} {100 * r.mean:.2f}%" for a, r in results.items()))

    return evaluate_now


def run_condense_stage(plan: RunPlan, data: Dataset, record: RunRecord) -> SyntheticSet:
    cfg, out = plan.cfg, plan.out
    logger = make_logger(plan, "condense")
    start = time.perf_counter()
    if cfg.coreset.name != "none":
        syn = coreset_of_run(plan, data, cfg.coreset.name, cfg.ipc)
        record.condense = {"seconds": time.perf_counter() - start, "coreset": cfg.coreset.name}
    else:
        labels = class_major_labels(data.num_classes, cfg.ipc, torch.device("cpu"))

        def on_iteration(it: int, step: dict[str, float], images: torch.Tensor) -> None:
            logger.log({f"condense/{k}": v for k, v in step.items()}, step=it)
            if it % cfg.logger.image_every == 0 or it == cfg.iterations - 1:
                logger.log_images("condense/synthetic", images, labels, data.mean, data.std, step=it)

        evaluate_now = intermediate_evaluator(plan, data, record, logger)
        recipe = CondenseRecipe.of_run(cfg)
        experts, num = None, 0
        if cfg.matching.name == TRAJECTORY:
            experts, report = run_experts_stage(plan, data, record)
            num = report.num
            # the dashboard shows which experts made which set
            logger.use_input(experts_artifact_name(report), Path(report.folder))
        syn, stats = condense(
            recipe, plan.compute, data, to_container(cfg), on_iteration, out, evaluate_now,
            experts=experts, num_experts=num,
        )  # fmt: skip
        record.condense, record.history = stats.summary(), stats.history
    path = out / "synthetic.safetensors"
    save_synthetic(syn, path)
    save_grid(syn, out / "synthetic.png", data.to_pixels)
    if syn.expansion > 1:  # the stored mosaics above, the images models train on here
        save_grid(syn.expanded(), out / "synthetic_expanded.png", data.to_pixels)
    logger.summary({f"condense/{k}": v for k, v in record.condense.items() if isinstance(v, int | float)})
    logger.artifact(f"synthetic-{data.name}-ipc{cfg.ipc}", "synthetic_set", path)
    logger.finish()
    return syn


def experts_recipe(cfg: RunConfig) -> ExpertsRecipe:
    return ExpertsRecipe(cfg.experts, cfg.network, cfg.augment, cfg.dataset.allow_flip, cfg.progress)


def experts_artifact_name(report: ExpertsReport) -> str:
    """The experts' W&B artifact: named by their cache folder (the digest of what shapes them)."""
    return f"experts-{Path(report.folder).name}"


def run_experts_stage(plan: RunPlan, data: Dataset, record: RunRecord) -> tuple[ExpertSource, ExpertsReport]:
    """The experts trajectory matching draws from: MTT's buffers (experts.path), or the cache,
    trained where it lacks any; a segment longer than the experts' trajectories is refused."""
    source, report = experts_for_run(experts_recipe(plan.cfg), data, plan.compute)
    record.experts = report.as_dict()
    write_record(plan.out, record)
    logger = make_logger(plan, "experts")
    logger.summary({f"experts/{k}": v for k, v in record.experts.items()})
    logger.folder_artifact(experts_artifact_name(report), "experts", Path(report.folder))
    logger.finish()
    m = plan.cfg.matching
    if m.max_start_epoch + m.expert_epochs > source.epochs + 1:
        raise ConfigError(
            f"matching.max_start_epoch={m.max_start_epoch} + matching.expert_epochs={m.expert_epochs} reach "
            f"past the experts' {source.epochs} epochs: lower them"
        )
    return source, report


def sets_to_judge(plan: RunPlan, data: Dataset, syn: SyntheticSet) -> dict[str, SyntheticSet]:
    """The set, and the random subset of its size beside it when the run compares or ranks."""
    cfg, label = plan.cfg, plan.label
    sets = {label: syn}
    if (cfg.evaluation.compare_random or cfg.ranking.name != "none") and label != "random":
        # the random subset has the set's size, whatever ipc the command line says
        sets["random"] = coreset_of_run(plan, data, "random", syn.ipc)
    return sets


def candidate(stored: SyntheticSet, ledger: EvaluationLedger, protocol: dict[str, Any]) -> Candidate:
    """A set as its models train on it (IDM's partitioned set: its sub-images), with the models
    the ledger already holds for it and the ledger hearing of each new one."""
    current = stored.expanded()
    targets = current.labels if current.soft_labels is None else current.soft_labels
    key = ledger_key(current.images, targets, protocol)
    return Candidate(
        current.images, targets, ledger.done(key), lambda arch, acc, key=key: ledger.record(key, arch, acc)
    )


def judge_sets(plan: RunPlan, data: Dataset, sets: dict[str, SyntheticSet], record: RunRecord) -> Results:
    """Every set through the pool's paired models, as many as evaluation.num_models says (auto:
    decided jointly); each model's accuracy goes into the ledger as soon as it is known, so a
    killed evaluation resumes at the next model."""
    cfg = plan.cfg
    ledger = EvaluationLedger.open(plan.out, cfg.resume)
    protocol = evaluation_protocol(plan)
    candidates = {name: candidate(stored, ledger, protocol) for name, stored in sets.items()}
    results, count = evaluate_sets(
        candidates, data, plan.pool, cfg.evaluation, cfg.seed, plan.device, plan.eval_augment,
        cfg.progress, plan.compute, convnet_bn_rule=plan.convnet_bn_rule,
    )  # fmt: skip
    for name, per_arch in results.items():
        record.evaluation[name] = {arch: r.as_dict() for arch, r in per_arch.items()}
        seconds = {arch: r.seconds for arch, r in per_arch.items()}
        record.evaluation_seconds[name] = {**seconds, "total": sum(seconds.values())}
    record.evaluation_models = count.as_dict()
    if count.rule == "auto":  # the card says how many models the rule took
        taken = f"{count.describe()} x {'/'.join(plan.pool)}"
        record.protocol_card = {**record.protocol_card, "models": taken}
    print(f"evaluation: {count.describe()}")
    return results


def log_results(logger: NullLogger, results: Results) -> None:
    rows = [
        [label, arch, r.mean, r.std, len(r.accuracies), r.seconds]
        for label, per_arch in results.items()
        for arch, r in per_arch.items()
    ]
    logger.log_table("evaluation/accuracy", ["set", "architecture", "mean", "std", "models", "seconds"], rows)
    every = [(label, arch, r) for label, per_arch in results.items() for arch, r in per_arch.items()]
    logger.summary({f"accuracy/{label}/{arch}": r.mean for label, arch, r in every})
    logger.summary({f"accuracy_std/{label}/{arch}": r.std for label, arch, r in every})


def run_evaluate_stage(plan: RunPlan, data: Dataset, syn: SyntheticSet, record: RunRecord) -> Results:
    cfg, label = plan.cfg, plan.label
    check_compatible(syn, data.name, data.image_shape, data.num_classes, data.transform)
    logger = make_logger(plan, "evaluate")
    record.evaluation_protocol = asdict(cfg.evaluation)
    sets = sets_to_judge(plan, data, syn)
    results = judge_sets(plan, data, sets, record)
    models = record.evaluation_models or {}
    logger.summary({f"evaluation/{k}": models[k] for k in ("models", "widest") if models.get(k) is not None})
    if cfg.ranking.name != "none":
        record.ranking = rank_with_judge(plan, data, syn, sets.get("random", syn), results)
        logger.summary({f"ranking/{k}": record.ranking[k] for k in ("hlr", "ior", "lrs", "ars")})
        print(ranking_line(record.ranking))
    if cfg.iterations in cfg.evaluation.at_iterations and cfg.synthetic is None:  # the final set's point
        record.evaluation_at[str(cfg.iterations)] = record.evaluation[label]
    log_results(logger, results)
    logger.finish()
    return results


def rank_with_judge(
    plan: RunPlan, data: Dataset, syn: SyntheticSet, random: SyntheticSet, results: Results
) -> dict[str, Any]:
    """DD-Ranking's metrics on the pool's first architecture, judged by the stage's paired models."""
    cfg = plan.cfg
    arch = next(iter(plan.pool))
    # the very models that judged the set: as many as evaluation.num_models gave it (auto included)
    ev = replace(cfg.evaluation, num_models=len(results[plan.label][arch].accuracies))
    setup = RankingSetup(cfg.ranking, ev, cfg.network, cfg.augment, cfg.dataset, cfg.seed)
    judge = Judge(data, plan.device, arch, plan.pool[arch], ev, cfg.seed, plan.eval_augment, plan.compute)
    own = results[plan.label][arch].mean
    random_hard = results.get("random", results[plan.label])[arch].mean
    return rank_set(setup, judge, syn.expanded(), random.expanded(), own, random_hard)


def describe_set(syn: SyntheticSet, cfg: RunConfig) -> str:
    ev = cfg.evaluation
    labels = "hard" if syn.soft_labels is None else f"soft (loss {ev.soft_loss}, T={ev.temperature})"
    lr = (
        f"{syn.lr} ({'used' if ev.learned_lr else 'ignored: evaluation.learned_lr=false'})"
        if syn.lr
        else "none"
    )
    k = syn.expansion
    expanded = f" (trained on {k * k} sub-images each: expansion {k}x{k})" if k > 1 else ""
    return (
        f"set: {syn.source}, {len(syn.labels)} images{expanded}, ipc {syn.ipc}, labels {labels}, "
        f"learned lr {lr}, space {syn.transform}"
    )


def format_table(results: Results, record: RunRecord) -> str:
    lines = [f"{'set':<12} {'architecture':<14} {'accuracy (%)':>16} {'models':>7} {'eval s':>8}"]
    for label, per_arch in results.items():
        for arch, r in per_arch.items():
            acc = f"{100 * r.mean:.2f} +- {100 * r.std:.2f}"
            lines.append(f"{label:<12} {arch:<14} {acc:>16} {len(r.accuracies):>7} {r.seconds:>8.1f}")
    if record.condense is not None:
        lines.append(f"condense stage: {record.condense['seconds']:.1f} s")
    return "\n".join(lines)


def print_plan(plan: RunPlan) -> None:
    """Every protocol choice, printed before work starts (never a silent override)."""
    cfg, ev, compute = plan.cfg, plan.cfg.evaluation, plan.compute
    chosen = " ".join(f"{group}={option}" for group, option in group_choices(cfg).items())
    print(
        f"condense: {chosen} ipc={cfg.ipc} iterations={cfg.iterations} seed={cfg.seed} device={plan.device} "
        f"compute={'fast' if cfg.fast else 'straightforward'} ({compute.describe()})"
    )
    parts = " ".join(f"{part}={kind}" for part, kind in compute.precisions().items())
    auto = f" ({compute.auto.describe()}, {compute.auto.source})" if compute.auto is not None else ""
    print(f"precision: {cfg.precision} -> {parts}{auto}")
    print(
        f"evaluate: models={list(plan.pool)} x {models_text(ev)} epochs={ev.epochs} "
        f"lr={ev.lr} augmentation={plan.card['augmentation']}"
    )
    print(f"protocol card: {card_line(plan.card)}")


def start_record(plan: RunPlan) -> RunRecord:
    identity = plan.identity
    return RunRecord(
        config=to_container(plan.cfg),
        output_dir=str(plan.out),
        label=identity.label,
        named_by=identity.named_by,
        group=identity.group,
        tags=list(identity.tags),
        precision=plan.precision,  # part of the protocol: a bf16 number is never read as an fp32 one
        precision_auto=plan.compute.auto.as_dict() if plan.compute.auto is not None else None,
        protocol_card=plan.card,
    )


def adopt_loaded_set(plan: RunPlan, syn: SyntheticSet, record: RunRecord) -> RunPlan:
    """stage=evaluate: the plan and the record name the loaded set as its own config says."""
    plan = plan_for_set(plan, syn)
    identity = plan.identity
    record.label, record.named_by, record.group = identity.label, identity.named_by, identity.group
    record.tags, record.protocol_card = list(identity.tags), plan.card
    record.set = {"source": syn.source, "labels": syn.label_kind, "lr": syn.lr, "ipc": syn.ipc}
    print(describe_set(syn, plan.cfg))
    print(f"protocol card: {card_line(plan.card)}")
    return plan


def execute(plan: RunPlan) -> RunRecord:
    """The stages `stage` names, in the plan's process settings."""
    cfg = plan.cfg
    data = load_dataset(cfg.dataset)
    record = start_record(plan)
    syn = None
    if cfg.stage == "experts":
        run_experts_stage(plan, data, record)
        record.finished = True
        write_record(plan.out, record)
        return record
    if cfg.stage in ("all", "condense"):
        syn = run_condense_stage(plan, data, record)
        record.finished = cfg.stage == "condense"
        plan = plan_with_learned_lr(plan, syn)  # MTT's protocol: the set's learned step size
        record.protocol_card = plan.card
        write_record(plan.out, record)  # the condensed set's numbers are safe now
    if cfg.stage in ("all", "evaluate"):
        if cfg.synthetic is not None:
            syn = read_set(Path(cfg.synthetic).expanduser(), cfg.reader, data)
            plan = adopt_loaded_set(plan, syn, record)
        assert syn is not None
        results = run_evaluate_stage(plan, data, syn, record)
        record.finished = True
        write_record(plan.out, record)
        print(format_table(results, record))
    return record


def run(cfg: RunConfig) -> dict[str, Any]:
    """Both stages as `cfg.stage` says; returns the record also written to metrics.json (as data).
    With resume=true a finished run is left as it is, a checkpointed condense stage continues, and
    an evaluation resumes at its next model."""
    plan = plan_run(cfg)
    out = plan.out
    refuse_to_overwrite(out, cfg.resume)
    if cfg.resume and (previous := finished_run(out, cfg)) is not None:
        print(f"resume: {out} already finished; nothing to run")
        return previous.to_dict()
    out.mkdir(parents=True, exist_ok=True)
    yaml = OmegaConf.to_yaml(OmegaConf.structured(cfg))
    atomic_write(out / "resolved_config.yaml", lambda tmp: tmp.write_text(yaml))
    print_plan(plan)
    with plan.compute.process_settings():
        record = execute(plan)
    print(f"outputs: {out}")
    return record.to_dict()
