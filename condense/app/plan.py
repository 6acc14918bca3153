"""The resolved plan of a run: the Hydra config validated and resolved once, into everything the
stages, the logger, metrics.json and the report read: the device and precision per part, the
evaluation pool, the protocol card, and the run's identity (its set's label, its W&B group and
tags). Nothing downstream recomputes any of these.

A stage=evaluate run of a loaded set is re-planned from the set's own stored config (what made
it) merged with the evaluation options the command gives (how it is judged); a set from another
tool carries no config and is named by its source.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, is_dataclass, replace
from pathlib import Path
from typing import Any

import torch

from condense.app.card import protocol_card
from condense.app.labels import set_label
from condense.app.validation import validate
from condense.primitives import augment as augment_mod
from condense.primitives.compute import (
    Bf16Speedup,
    Compute,
    cached_speedup,
    compile_toolchain_missing,
    device_name,
    speedup_key,
    store_speedup,
    time_bf16_speedup,
)
from condense.primitives.network import build_network
from condense.primitives.synthetic import SyntheticSet
from condense.schema import (
    JUDGED_WITH,
    ROLES,
    ConfigError,
    NetworkConfig,
    PresetConfig,
    RunConfig,
    group_choices,
    precision_tag,
    protocol_digest,
    to_container,
)
from condense.stages.checkpoint import CHECKPOINT, stored_bf16_speedup
from condense.stages.evaluation import convnet_bn_rule_applies, evaluation_pool


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name} but no CUDA device is visible: use device=auto, cpu")
    return torch.device(name)


@dataclass(frozen=True)
class RunIdentity:
    """What a run is called and where it is pooled: the set's label, how it was found, and the
    ablation cell (dataset, IPC, every group's choice, the precision, a digest of the rest)."""

    label: str
    named_by: str  # run | stored config | source
    cell: str  # the ablation cell (ablation_group)
    group: str  # the W&B group: logger.group, else the cell
    tags: tuple[str, ...]


def ablation_group(cfg: RunConfig, precision: dict[str, str]) -> str:
    """The ablation cell a run belongs to: runs share a group only when they differ at most in
    the seed."""
    choices = "-".join(v.replace("/", "_") for k, v in group_choices(cfg).items() if k != "dataset")
    tag = precision_tag(precision)
    return f"{cfg.dataset.name}-ipc{cfg.ipc}-{choices}-{tag}-{protocol_digest(cfg, precision)}"


def identify(cfg: RunConfig, precision: dict[str, str], label: str, named_by: str) -> RunIdentity:
    cell = ablation_group(cfg, precision)
    return RunIdentity(label, named_by, cell, cfg.logger.group or cell, (*cfg.logger.tags, label))


@dataclass(frozen=True)
class RunPlan:
    """Everything a run resolves before work starts; see the module docstring."""

    cfg: RunConfig
    device: torch.device
    compute: Compute
    pool: dict[str, NetworkConfig]
    eval_augment: augment_mod.Augment | None  # the evaluated models' training augmentation
    convnet_bn_rule: bool  # DC's rule trains an evaluated ConvNetBN with crop+noise (DSA off)
    identity: RunIdentity
    card: dict[str, str]

    @property
    def out(self) -> Path:
        return Path(self.cfg.output_dir)

    @property
    def precision(self) -> dict[str, str]:
        """The setting and each part's precision as resolved (part of every number's protocol)."""
        return {"setting": self.cfg.precision, **self.compute.precisions()}

    @property
    def label(self) -> str:
        return self.identity.label

    def wandb_config(self) -> dict[str, Any]:
        """The run's config as W&B shows it: every setting, each group's choice, the card and the
        precision, so runs can be filtered by any of them."""
        config = to_container(self.cfg)
        config.update({f"choice/{group}": option for group, option in group_choices(self.cfg).items()})
        config["choice/ipc"] = str(self.cfg.ipc)
        config["label"] = self.label
        config.update({f"card/{key}": value for key, value in self.card.items()})
        config["choice/precision"] = precision_tag(self.precision)
        config.update({f"precision/{part}": kind for part, kind in self.precision.items()})
        if self.compute.auto is not None:
            config.update({f"precision/auto_{k}": v for k, v in self.compute.auto.as_dict().items()})
        return config


def auto_speedup(cfg: RunConfig, device: torch.device) -> Bf16Speedup | None:
    """precision=auto's evidence: a resumed run's from its checkpoint (never measured again), else
    the cached ratio for this device, torch and network shape, else measured now (about a second)
    on the run's own network at its real batch (capped at 512 images) and cached."""
    if cfg.precision != "auto":
        return None
    checkpoint = Path(cfg.output_dir) / CHECKPOINT
    if cfg.resume and (stored := stored_bf16_speedup(checkpoint)) is not None:
        return Bf16Speedup(stored, "checkpoint")
    d = cfg.dataset
    batch = (min(cfg.batch_real, 512), d.channels, d.image_size, d.image_size)
    key = speedup_key(device, asdict(cfg.network), batch)
    if (ratio := cached_speedup(key)) is not None:
        return Bf16Speedup(ratio, "cached")
    net = build_network(cfg.network, batch[1:], d.num_classes, 0, device)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, generator=gen).to(device)
    y = torch.randint(0, d.num_classes, (batch[0],), generator=gen).to(device)
    with Compute(device).process_settings():  # fp32 timed as an fp32 run computes: TF32 off
        ratio = time_bf16_speedup(net, x, y)
    what = f"{device_name(device)}, torch {torch.__version__}, {cfg.network.name}, {batch}"
    store_speedup(key, ratio, what)
    return Bf16Speedup(ratio, "measured")


def plan_run(cfg: RunConfig) -> RunPlan:
    """Validate `cfg` and resolve everything the run reads; one clear line for a mistake."""
    validate(cfg)
    device = resolve_device(cfg.device)
    compute = Compute.for_run(cfg, device, auto_speedup(cfg, device))
    if compute.compile and (missing := compile_toolchain_missing(device)) is not None:
        raise ConfigError(
            f"compile=true needs {missing} for torch.compile on {device}: install it or set compile=false"
        )
    precision = {"setting": cfg.precision, **compute.precisions()}
    identity = identify(cfg, precision, set_label(to_container(cfg)), "run")
    augment = augment_mod.evaluation_augment(
        cfg.dataset.eval_augment, augment_mod.for_dataset(cfg.augment, cfg.dataset.allow_flip)
    )
    pool = evaluation_pool(cfg.network, cfg.evaluation)
    rule = convnet_bn_rule_applies(cfg.evaluation, cfg.augment.name)
    card = protocol_card(cfg, precision, auto=compute.auto)
    return RunPlan(cfg, device, compute, pool, augment, rule, identity, card)


def made_by(cfg: RunConfig, stored: dict[str, Any]) -> RunConfig:
    """The command's config with every set-making setting the stored config records put back
    (settings a set's file predates keep the command's value): the config that made the set,
    judged as the command says. The settings the evaluation reads too (the dataset, the pool's
    network, DSA in evaluation) stay the command's: they say how the set is judged."""
    restored = {}
    for key in ROLES["set"]:
        if key not in stored or key in JUDGED_WITH:
            continue
        current = getattr(cfg, key)
        try:
            value = type(current)(**stored[key]) if is_dataclass(current) else stored[key]
        except TypeError:  # a file from before this group's current fields: keep the command's
            continue
        restored[key] = value
    return replace(cfg, **restored)


def with_learned_lr(cfg: RunConfig, syn: SyntheticSet) -> RunConfig:
    """The evaluation a loaded set asks for: its learned learning rate (evaluation.learned_lr)."""
    if syn.lr is not None and cfg.evaluation.learned_lr:
        return replace(cfg, evaluation=replace(cfg.evaluation, lr=syn.lr))
    return cfg


def plan_with_learned_lr(plan: RunPlan, syn: SyntheticSet) -> RunPlan:
    """The plan for judging a set the run just made: with its learned learning rate when it has
    one (trajectory matching's syn_lr, MTT's evaluation protocol), and a card that says so."""
    cfg = with_learned_lr(plan.cfg, syn)
    if cfg is plan.cfg:
        return plan
    card = protocol_card(cfg, plan.precision, syn, pool=plan.pool, auto=plan.compute.auto)
    return replace(plan, cfg=cfg, card=card)


def plan_for_set(plan: RunPlan, syn: SyntheticSet) -> RunPlan:
    """stage=evaluate of a loaded set: judged by the command's evaluation options, named by the
    set's own stored config, or by its source when it has none (another tool's file)."""
    cfg = with_learned_lr(plan.cfg, syn)
    if syn.config:
        named_cfg, label, named_by = made_by(cfg, syn.config), set_label(syn.config), "stored config"
    elif syn.source != "condense":
        named_cfg, label, named_by = cfg, syn.source, "source"
    else:  # a condense file without a stored config (none is written so): the run's own name
        named_cfg, label, named_by = cfg, plan.label, "run"
    # the presets that made the set, as its file records them (not recorded: older or foreign files)
    named_cfg = replace(named_cfg, preset=PresetConfig(**(syn.config or {}).get("preset", {})))
    identity = identify(named_cfg, plan.precision, label, named_by)
    card = protocol_card(named_cfg, plan.precision, syn, pool=plan.pool, auto=plan.compute.auto)
    return replace(plan, cfg=cfg, identity=identity, card=card)


def evaluation_protocol(plan: RunPlan) -> dict[str, Any]:
    """What a set's evaluated models depend on besides the set (the evaluation ledger's key)."""
    cfg = plan.cfg
    return {
        "evaluation": asdict(cfg.evaluation),
        "pool": {a: asdict(n) for a, n in plan.pool.items()},
        "seed": cfg.seed,
        "precision": plan.compute.precisions(),
        "augment": asdict(cfg.augment),
        "dataset": asdict(cfg.dataset),  # its own augmentation, flips, transform
    }
