"""The protocol card: the short, stable list of values that define a number.

Two accuracies are comparable only when their cards are equal (the seed aside). The card goes
into metrics.json (`protocol_card`), W&B (`card/<key>`), the printed plan and condense-report,
which numbers the distinct cards of a table and footnotes each one.
"""

from __future__ import annotations

from condense.primitives.compute import precision_tag
from condense.schema import RunConfig
from condense.stages.evaluation import SCHEDULES, evaluation_pool


def lr_schedule_text(cfg: RunConfig) -> str:
    """`x0.1 after epoch 150 of 300, momentum kept` (epochs counted from 1)."""
    epochs, drop_after, restart = SCHEDULES[cfg.evaluation.schedule](cfg.evaluation.epochs)
    then = "optimizer restarted" if restart else "momentum kept"
    return f"{cfg.evaluation.lr} x0.1 after epoch {drop_after + 1} of {epochs}, {then}"


def augmentation_text(cfg: RunConfig) -> str:
    """What augments: DSA in matching (and evaluation), or the dataset's evaluation augmentation."""
    if cfg.augment.name != "none":
        return f"{cfg.augment.name} (matching and evaluation)"
    return "evaluation: crop/scale/rotate" if cfg.dataset.eval_augment.enabled else "none"


def protocol_card(cfg: RunConfig, precision: dict[str, str]) -> dict[str, str]:
    ev = cfg.evaluation
    return {
        "protocol": cfg.protocol.name,
        "iterations": str(cfg.iterations),
        "models": f"{ev.num_models} x {'/'.join(evaluation_pool(cfg))}",
        "evaluation": f"{SCHEDULES[ev.schedule](ev.epochs)[0]} epochs, batch {ev.batch_size}",
        "lr_schedule": lr_schedule_text(cfg),
        "momentum": f"net {cfg.momentum_net}, images {cfg.momentum_img}, evaluation {ev.momentum}",
        "lr_img": str(cfg.lr_img),  # DC's 0.1, DM's 1.0, 0.01 on an MLP
        "normalisation": f"mean {list(cfg.dataset.mean)} std {list(cfg.dataset.std)}",
        "augmentation": augmentation_text(cfg),
        "init": cfg.init.name,
        "cosine": cfg.distance.cosine,
        "precision": precision_tag(precision),
    }


def card_line(card: dict[str, str]) -> str:
    return "; ".join(f"{key}: {value}" for key, value in card.items())
