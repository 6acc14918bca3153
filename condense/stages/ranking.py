"""DD-Ranking's fairness metrics (NUS-HPC-AI-Lab/DD-Ranking), computed by the evaluation stage.

Plain accuracy rewards whatever the evaluation adds (soft labels, augmentation) as much as the set.
DD-Ranking separates them; with accuracies as fractions and weights w (both 0.5 by default):

    hard-label recovery      HLR = acc(whole training set, hard labels) - acc(set, hard labels)
    improvement over random  IOR = acc(set, its labels) - acc(random subset, the same kind of labels)
    label-robust score       LRS = s(w * IOR - (1 - w) * HLR)
    augmentation-robust      ARS = s(w * (acc(set, aug) - acc(random, aug))
                                     + (1 - w) * (acc(set, no aug) - acc(random, no aug)))
    where s(x) = (e^x - e^-1) / (e - e^-1) maps [-1, 1] onto [0, 1] (reported in percent).

DD-Ranking's code feeds percent accuracies into the exponential; condense uses fractions, where
s is the bounded map its paper describes. Every accuracy here is the mean over the evaluation's
paired models of the pool's first architecture (the same models judge the set, the random subset
and the whole dataset) under the run's protocol and epochs; "aug" is DSA, "no aug" none. A soft-
labelled set's random subset is relabelled by a teacher (the run's network trained on the whole
training set, cached), as DD-Ranking relabels it; a hard-labelled set's keeps its hard labels.
The whole-dataset accuracy is a configured value with its source, or a run of condense's own,
cached under dataset.root/reference: never a constant nobody chose.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from condense.primitives import augment as augment_mod
from condense.primitives.augment import Augment
from condense.primitives.compute import Compute
from condense.primitives.dataset import Dataset
from condense.primitives.files import atomic_write
from condense.primitives.network import build_network
from condense.primitives.seeding import derive_seed, generator
from condense.primitives.synthetic import SyntheticSet
from condense.primitives.training import train_epoch
from condense.schema import (
    AugmentConfig,
    ConfigError,
    NetworkConfig,
    RankingConfig,
    RunConfig,
    require_choice,
)
from condense.stages.evaluation import SCHEDULES, ArchResult, evaluate_set

RANKINGS = ("none", "dd_ranking")


# ---------------------------------------------------------------- the metrics (accuracies as fractions)
def normalised_score(x: float) -> float:
    """DD-Ranking's map of a gap in [-1, 1] onto [0, 1]: (e^x - e^-1) / (e - e^-1)."""
    return (math.exp(x) - math.exp(-1)) / (math.e - math.exp(-1))


def hard_label_recovery(full_hard: float, set_hard: float) -> float:
    return full_hard - set_hard


def improvement_over_random(set_own: float, random_own: float) -> float:
    return set_own - random_own


def label_robust_score(hlr: float, ior: float, weight: float) -> float:
    return normalised_score(weight * ior - (1 - weight) * hlr)


def augmentation_robust_score(
    set_aug: float, random_aug: float, set_plain: float, random_plain: float, weight: float
) -> float:
    return normalised_score(weight * (set_aug - random_aug) + (1 - weight) * (set_plain - random_plain))


@dataclass
class RankingAccuracies:
    """The accuracies the metrics read (fractions, one architecture, mean over paired models)."""

    set_own: float  # the set with its own labels (soft when it has them), the run's augmentation
    set_hard: float  # the set with hard labels
    random_own: float  # the random subset with the same kind of labels as the set
    full_hard: float  # the whole training set, hard labels
    set_aug: float
    random_aug: float
    set_plain: float
    random_plain: float


def ranking_metrics(acc: RankingAccuracies, cfg: RankingConfig) -> dict[str, float]:
    hlr = hard_label_recovery(acc.full_hard, acc.set_hard)
    ior = improvement_over_random(acc.set_own, acc.random_own)
    return {
        "hlr": hlr,
        "ior": ior,
        "lrs": label_robust_score(hlr, ior, cfg.lrs_weight),
        "ars": augmentation_robust_score(
            acc.set_aug, acc.random_aug, acc.set_plain, acc.random_plain, cfg.ars_weight
        ),
    }


# ---------------------------------------------------------------- the evaluations behind them
def digest(*parts: Any) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def teacher_network(cfg: RunConfig, data: Dataset, device: torch.device) -> torch.nn.Module:
    """The run's network trained `ranking.teacher_epochs` epochs on the whole training set (SGD as
    the evaluation's), from its own seed; cached under dataset.root/teachers."""
    from safetensors.torch import load_file, save_file

    ev, epochs = cfg.evaluation, cfg.ranking.teacher_epochs
    key = digest(
        data.name, data.transform, len(data.train.labels), asdict(cfg.network), epochs, cfg.seed, asdict(ev)
    )
    path = Path(cfg.dataset.root).expanduser() / "teachers" / f"{data.name}-{key}.safetensors"
    net = build_network(
        cfg.network, data.image_shape, data.num_classes, derive_seed(cfg.seed, "teacher"), device
    )
    if path.exists():
        net.load_state_dict(load_file(str(path), device=str(device)))
        return net.eval()
    opt = torch.optim.SGD(net.parameters(), lr=ev.lr, momentum=ev.momentum, weight_decay=ev.weight_decay)
    order = generator(cfg.seed, "teacher_order")
    images, labels = data.train.images.to(device), data.train.labels.to(device)
    for _ in range(epochs):
        train_epoch(net, opt, images, labels, ev.batch_size, order)
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(state, str(tmp)))
    return net.eval()


@torch.no_grad()
def teacher_logits(net: torch.nn.Module, images: torch.Tensor, device: torch.device) -> torch.Tensor:
    return torch.cat(
        [net(images[i : i + 1024].to(device)).float().cpu() for i in range(0, len(images), 1024)]
    )


def dsa_for_ranking(cfg: RunConfig) -> Augment:
    """DSA for the augmented half of ARS: the run's DSA settings, or DSA's defaults."""
    dsa_cfg = cfg.augment if cfg.augment.name != "none" else AugmentConfig(name="dsa")
    augment = augment_mod.training_augment(augment_mod.for_dataset(dsa_cfg, cfg.dataset.allow_flip))
    assert augment is not None
    return augment


def full_reference(
    cfg: RunConfig, data: Dataset, protocol: dict[str, Any], train_on_all: Callable[[int], float]
) -> dict[str, Any]:
    """The whole-dataset hard-label accuracy: configured with its source, or condense's own run
    (`train_on_all(epochs)`: the paired models trained on the whole training set), cached by
    everything it depends on."""
    rk = cfg.ranking
    if rk.full_accuracy is not None:
        return {"accuracy": rk.full_accuracy, "source": f"configured: {rk.full_source}"}
    epochs = rk.full_epochs or cfg.evaluation.epochs
    key = digest(
        data.name, data.transform, protocol, epochs, cfg.seed, asdict(cfg.augment), asdict(cfg.dataset)
    )
    path = Path(cfg.dataset.root).expanduser() / "reference" / f"{data.name}-{key}.json"
    if path.exists():
        cached = json.loads(path.read_text())
        return {**cached, "source": f"{cached['source']}, cached at {path}"}
    accuracy = train_on_all(epochs)
    models, trained = cfg.evaluation.num_models, SCHEDULES[cfg.evaluation.schedule](epochs)[0]
    what = f"{models} models x {trained} epochs on the whole training set"
    record = {"accuracy": accuracy, "source": f"condense's own run ({what})"}
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(record)))
    return {**record, "source": f"{record['source']}, saved at {path}"}


def rank_set(
    cfg: RunConfig,
    data: Dataset,
    device: torch.device,
    syn: SyntheticSet,
    random_set: SyntheticSet,
    own: dict[str, ArchResult],
    random_results: dict[str, ArchResult],
    pool: dict[str, NetworkConfig],
    augment: Augment | None,
    compute: Compute,
) -> dict[str, Any]:
    """DD-Ranking's metrics for `syn` on the pool's first architecture; `own` and `random_results`
    hold the set's and the random subset's results with hard or their own labels under the run's
    augmentation (already computed by the evaluation stage, with the same paired models)."""
    arch = next(iter(pool))
    arch_pool = {arch: pool[arch]}
    protocol = {
        "network": asdict(pool[arch]),
        "evaluation": asdict(cfg.evaluation),
        "compute": compute.precisions(),
    }

    def evaluate(
        images: torch.Tensor,
        targets: torch.Tensor,
        aug: Augment | None | str = "run",
        epochs: int | None = None,
    ) -> float:
        ev = cfg.evaluation if epochs is None else replace(cfg.evaluation, epochs=epochs)
        chosen = augment if aug == "run" else aug
        results = evaluate_set(
            images,
            targets,
            data,
            arch_pool,
            ev,
            cfg.seed,
            "ranking",
            device,
            chosen,
            False,
            compute,  # type: ignore[arg-type]
        )
        return results[arch].mean

    soft = syn.soft_labels
    set_own_targets = soft if soft is not None else syn.labels
    random_labels = "hard"
    if soft is not None:
        teacher = teacher_network(cfg, data, device)
        random_targets = teacher_logits(teacher, random_set.images, device)
        random_labels = f"soft, from a teacher ({cfg.network.name}, {cfg.ranking.teacher_epochs} epochs)"
    else:
        random_targets = random_set.labels
    set_own = own[arch].mean
    set_hard = evaluate(syn.images, syn.labels) if soft is not None else set_own
    # a hard-labelled set's random subset keeps its hard labels: the stage's own evaluation of it
    random_own = (
        evaluate(random_set.images, random_targets) if soft is not None else random_results[arch].mean
    )
    dsa = dsa_for_ranking(cfg)
    run_is_dsa, run_is_plain = cfg.augment.name != "none", augment is None
    set_aug = set_own if run_is_dsa else evaluate(syn.images, set_own_targets, dsa)
    random_aug = random_own if run_is_dsa else evaluate(random_set.images, random_targets, dsa)
    set_plain = set_own if run_is_plain else evaluate(syn.images, set_own_targets, None)
    random_plain = random_own if run_is_plain else evaluate(random_set.images, random_targets, None)
    reference = full_reference(
        cfg, data, protocol, lambda epochs: evaluate(data.train.images, data.train.labels, "run", epochs)
    )
    acc = RankingAccuracies(
        set_own, set_hard, random_own, reference["accuracy"], set_aug, random_aug, set_plain, random_plain
    )
    return {
        "architecture": arch,
        **ranking_metrics(acc, cfg.ranking),
        "accuracies": asdict(acc),
        "full_reference": reference,
        "labels": syn.label_kind,
        "random_labels": random_labels,
        "weights": {"lrs": cfg.ranking.lrs_weight, "ars": cfg.ranking.ars_weight},
    }


def ranking_line(ranking: dict[str, Any]) -> str:
    """One printed line: the metrics (HLR and IOR in points, LRS and ARS in percent)."""
    return (
        f"DD-Ranking on {ranking['architecture']}: HLR {100 * ranking['hlr']:.2f} "
        f"IOR {100 * ranking['ior']:.2f} "
        f"LRS {100 * ranking['lrs']:.2f} ARS {100 * ranking['ars']:.2f} (whole dataset "
        f"{100 * ranking['full_reference']['accuracy']:.2f}%, {ranking['full_reference']['source']}; "
        f"random subset labels: {ranking['random_labels']})"
    )


def validate_ranking(cfg: RankingConfig) -> None:
    require_choice(cfg.name, RANKINGS, "ranking")
    for key in ("lrs_weight", "ars_weight"):
        value = getattr(cfg, key)
        if not 0 <= value <= 1:
            raise ConfigError(
                f"ranking.{key}={value} is out of range: use a weight in [0, 1] (DD-Ranking: 0.5)"
            )
    if cfg.name == "none":
        return
    if cfg.full_accuracy is None and not cfg.full_run:
        raise ConfigError(
            "ranking=dd_ranking needs the whole-dataset accuracy: add ranking.full_accuracy=F "
            "ranking.full_source='where F comes from', or ranking.full_run=true "
            "(trains on the whole set; cached)"
        )
    if cfg.full_accuracy is not None and not (0 <= cfg.full_accuracy <= 1 and cfg.full_source):
        raise ConfigError(
            f"ranking.full_accuracy={cfg.full_accuracy}: give a fraction in [0, 1] "
            "and its ranking.full_source"
        )
    if cfg.teacher_epochs < 1 or (cfg.full_epochs is not None and cfg.full_epochs < 1):
        raise ConfigError("ranking.teacher_epochs and ranking.full_epochs: use >= 1")
