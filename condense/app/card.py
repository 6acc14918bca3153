"""The protocol card: the short, stable list of values that define a number.

Two accuracies are comparable only when their cards are equal (the seed aside). The card goes
into metrics.json (`protocol_card`), W&B (`card/<key>`), the printed plan and condense-report,
which numbers the distinct cards of a table and footnotes each one.
"""

from __future__ import annotations

from dataclasses import fields

from condense.method.trajectory import run_ema_decay
from condense.primitives.compute import Bf16Speedup
from condense.primitives.synthetic import SyntheticSet
from condense.schema import EvaluationConfig, NetworkConfig, PresetConfig, RunConfig, precision_tag
from condense.stages.evaluation import (
    AUTO_MODELS,
    SCHEDULES,
    convnet_bn_rule_applies,
    evaluation_pool,
    follows_convnet_bn_rule,
)


def lr_schedule_text(cfg: RunConfig, learned: bool = False) -> str:
    """`0.01 x0.1 after epoch 150 of 300, momentum kept` (epochs counted from 1)."""
    epochs, drop_after, restart = SCHEDULES[cfg.evaluation.schedule](cfg.evaluation.epochs)
    then = "optimizer restarted" if restart else "momentum kept"
    lr = f"{cfg.evaluation.lr:.6g} (the set's learned lr)" if learned else str(cfg.evaluation.lr)
    return f"{lr} x0.1 after epoch {drop_after + 1} of {epochs}, {then}"


def lr_img_text(cfg: RunConfig) -> str:
    """`0.1`, or `0.1 (cosine)` when lr_img follows a schedule: a constant run's card is unchanged."""
    if cfg.lr_img_schedule == "constant":
        return str(cfg.lr_img)
    return f"{cfg.lr_img} ({cfg.lr_img_schedule})"


def iterations_text(cfg: RunConfig, syn: SyntheticSet | None) -> str:
    """The iterations that made the set: the run's, a loaded set's own, or unrecorded (a foreign file)."""
    if syn is None:
        stop = cfg.stop
        if stop.patience == 0:
            return str(cfg.iterations)
        rule = f"patience {stop.patience} x {stop.window}, min gain {stop.min_improvement:g}"
        return f"up to {cfg.iterations}, stopping on the matching loss ({rule})"
    made = syn.config.get("iterations_run", syn.config.get("iterations"))
    return str(made) if made is not None else f"not recorded ({syn.source})"


def labels_text(cfg: RunConfig, syn: SyntheticSet | None) -> str:
    """Hard labels, or the soft labels' loss and temperature (they change what a number means)."""
    if syn is None or syn.soft_labels is None:
        return "hard"
    return f"soft ({cfg.evaluation.soft_loss}, T={cfg.evaluation.temperature})"


def augmentation_text(cfg: RunConfig, bn_rule: list[str]) -> str:
    """What augments: DSA in matching (and evaluation), or the dataset's evaluation augmentation,
    and DC's crop+noise for the `bn_rule` architectures (only then named: other cards stay)."""
    if cfg.augment.name != "none":
        return f"{cfg.augment.name} (matching and evaluation)"
    text = "evaluation: crop/scale/rotate" if cfg.dataset.eval_augment.enabled else "none"
    return text + (f"; {'/'.join(bn_rule)}: crop+noise (DC's rule)" if bn_rule else "")


def evaluation_text(ev: EvaluationConfig, bn_rule: list[str]) -> str:
    """`300 epochs, batch 256`, with the epochs DC's ConvNetBN rule gives when it applies."""
    epochs = f"{SCHEDULES[ev.schedule](ev.epochs)[0]} epochs"
    if bn_rule:
        epochs += f" ({'/'.join(bn_rule)}: {SCHEDULES[ev.schedule](ev.convnet_bn.epochs)[0]})"
    return f"{epochs}, batch {ev.batch_size}"


def models_text(ev: EvaluationConfig) -> str:
    """The count of paired models, or auto's rule (the run's record adds the count it took)."""
    if ev.num_models != AUTO_MODELS:
        return str(ev.num_models)
    return (
        f"auto ({ev.min_models} to {ev.max_models}, until every 95 % interval < {ev.target_width:g} points)"
    )


def preset_text(preset: PresetConfig) -> str:
    """`method=dc budget=paper speed=none`: the presets that composed the run (the published
    budget, or a shortened one), or unrecorded for a config built without Hydra's composition."""
    chosen = {f.name: getattr(preset, f.name) for f in fields(preset)}
    if not any(chosen.values()):
        return "not recorded"
    return " ".join(f"{group}={option or '-'}" for group, option in chosen.items())


def experts_text(cfg: RunConfig) -> str:
    """Trajectory matching's experts: MTT's buffer files, or how many were trained, for how long
    and how (a set distilled from other experts is another number)."""
    ex = cfg.experts
    if ex.path is not None:
        return f"MTT buffers from {ex.path} (first {ex.num})"
    gsam = ""
    if ex.name == "gsam":
        gsam = f", rho {ex.rho} alpha {ex.alpha}" + (" adaptive" if ex.adaptive else "")
    return f"{ex.num} x {ex.epochs} epochs, {ex.name} lr {ex.lr}{gsam}, seed {ex.seed}"


def ema_text(cfg: RunConfig) -> str:
    """FTD's moving average: its decay, and the one used when rescaled to a shortened run."""
    m = cfg.matching
    used = run_ema_decay(m, cfg.iterations)
    if used == m.ema_decay:
        return f"decay {m.ema_decay}"
    return f"decay {m.ema_decay} for {m.ema_decay_iterations} iterations: {used:.6g} over {cfg.iterations}"


def expansion_of(cfg: RunConfig, syn: SyntheticSet | None) -> int:
    """IDM's expansion factor of the judged set: a loaded set's own (what its evaluation expands
    by; another tool's set has none), else the run's."""
    return syn.expansion if syn is not None else cfg.matching.expansion


def protocol_card(
    cfg: RunConfig,
    precision: dict[str, str],
    syn: SyntheticSet | None = None,
    pool: dict[str, NetworkConfig] | None = None,
    auto: Bf16Speedup | None = None,
) -> dict[str, str]:
    """The card of a run; `syn`, a loaded set, adds what it brings (soft labels, a learned lr, ZCA);
    `pool` is the evaluation pool when it is not the one `cfg` implies (a loaded set's run)."""
    ev = cfg.evaluation
    pool = pool if pool is not None else evaluation_pool(cfg.network, cfg.evaluation)
    learned = syn is not None and syn.lr is not None and ev.learned_lr
    rule = convnet_bn_rule_applies(ev, cfg.augment.name)
    bn_rule = [arch for arch, net in pool.items() if follows_convnet_bn_rule(net, rule)]
    normalisation = f"mean {list(cfg.dataset.mean)} std {list(cfg.dataset.std)}"
    card = {
        "preset": preset_text(cfg.preset),
        "protocol": cfg.protocol.name,
        "iterations": iterations_text(cfg, syn),
        "models": f"{models_text(ev)} x {'/'.join(pool)}",
        "evaluation": evaluation_text(ev, bn_rule),
        "lr_schedule": lr_schedule_text(cfg, learned),
        "labels": labels_text(cfg, syn),
        "momentum": f"net {cfg.momentum_net}, images {cfg.momentum_img}, evaluation {ev.momentum}",
        "lr_img": lr_img_text(cfg),  # DC's 0.1, DM's 1.0, 0.01 on an MLP
        "normalisation": f"zca(eps={cfg.dataset.zca_eps})" if cfg.dataset.zca else normalisation,
        "augmentation": augmentation_text(cfg, bn_rule),
        "init": cfg.init.name,
        "cosine": cfg.distance.cosine,
        "precision": precision_tag(precision) + (f" (auto: {auto.describe()})" if auto is not None else ""),
    }
    if cfg.matching.name == "trajectory" and (syn is None or syn.config):  # another tool's set: unknown
        card["experts"] = experts_text(cfg)
        # MTT's and FTD's tables take the best test accuracy over their evaluation points
        card["reported"] = "final accuracy of each model (MTT and FTD published their best evaluation)"
        if cfg.matching.ema_decay > 0:
            card["ema"] = ema_text(cfg)
    if (k := expansion_of(cfg, syn)) > 1:  # only then: the cards of every other set stay as they were
        card["images"] = f"stored per class: ipc; trained on: {k * k} x ipc (expansion {k}x{k})"
    return card
