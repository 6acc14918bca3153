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
    DatasetConfig,
    EvaluationConfig,
    NetworkConfig,
    RankingConfig,
    require_choice,
)
from condense.stages.evaluation import SCHEDULES, evaluate_set

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


@dataclass(frozen=True)
class RankingSetup:
    """What the ranking reads of a run, slice by slice: its metrics' settings, the evaluation
    protocol its extra evaluations follow, the network a soft-labelled set's teacher is, the run's
    DSA settings, the dataset (root for caches, flips) and the seed."""

    ranking: RankingConfig
    evaluation: EvaluationConfig
    network: NetworkConfig
    augment: AugmentConfig
    dataset: DatasetConfig
    seed: int


@dataclass(frozen=True)
class Judge:
    """The evaluation stage's paired models of one architecture: every accuracy the ranking adds
    is measured by the very models that judged the set."""

    data: Dataset
    device: torch.device
    arch: str
    network: NetworkConfig
    evaluation: EvaluationConfig
    seed: int
    augment: Augment | None  # the run's evaluation augmentation
    compute: Compute

    def accuracy(
        self,
        images: torch.Tensor,
        targets: torch.Tensor,
        aug: Augment | None | str = "run",
        epochs: int | None = None,
    ) -> float:
        """Mean accuracy over the paired models trained on (images, targets); `aug` "run" keeps
        the run's augmentation, `epochs` replaces the protocol's."""
        ev = self.evaluation if epochs is None else replace(self.evaluation, epochs=epochs)
        chosen = self.augment if aug == "run" else aug
        pool = {self.arch: self.network}
        results = evaluate_set(
            images, targets, self.data, pool, ev, self.seed, "ranking", self.device, chosen, False,
            self.compute,  # type: ignore[arg-type]
        )  # fmt: skip
        return results[self.arch].mean

    def protocol(self) -> dict[str, Any]:
        """What its accuracies depend on besides the set (the whole-dataset reference's cache key)."""
        return {
            "network": asdict(self.network),
            "evaluation": asdict(self.evaluation),
            "compute": self.compute.precisions(),
        }


def teacher_network(setup: RankingSetup, data: Dataset, device: torch.device) -> torch.nn.Module:
    """The run's network trained `ranking.teacher_epochs` epochs on the whole training set (SGD as
    the evaluation's), from its own seed; cached under dataset.root/teachers."""
    from safetensors.torch import load_file, save_file

    ev, epochs, seed = setup.evaluation, setup.ranking.teacher_epochs, setup.seed
    key = digest(
        data.name, data.transform, len(data.train.labels), asdict(setup.network), epochs, seed, asdict(ev)
    )
    path = Path(setup.dataset.root).expanduser() / "teachers" / f"{data.name}-{key}.safetensors"
    init = derive_seed(seed, "teacher")
    net = build_network(setup.network, data.image_shape, data.num_classes, init, device)
    if path.exists():
        net.load_state_dict(load_file(str(path), device=str(device)))
        return net.eval()
    opt = torch.optim.SGD(net.parameters(), lr=ev.lr, momentum=ev.momentum, weight_decay=ev.weight_decay)
    order = generator(seed, "teacher_order")
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


def dsa_for_ranking(augment: AugmentConfig, allow_flip: bool) -> Augment:
    """DSA for the augmented half of ARS: the run's DSA settings, or DSA's defaults."""
    dsa_cfg = augment if augment.name != "none" else AugmentConfig(name="dsa")
    dsa = augment_mod.training_augment(augment_mod.for_dataset(dsa_cfg, allow_flip))
    assert dsa is not None
    return dsa


def full_reference(setup: RankingSetup, judge: Judge) -> dict[str, Any]:
    """The whole-dataset hard-label accuracy: configured with its source, or condense's own run
    (the paired models trained on the whole training set), cached by everything it depends on."""
    rk, data = setup.ranking, judge.data
    if rk.full_accuracy is not None:
        return {"accuracy": rk.full_accuracy, "source": f"configured: {rk.full_source}"}
    epochs = rk.full_epochs or setup.evaluation.epochs
    key = digest(
        data.name, data.transform, judge.protocol(), epochs, setup.seed, asdict(setup.augment),
        asdict(setup.dataset),
    )  # fmt: skip
    path = Path(setup.dataset.root).expanduser() / "reference" / f"{data.name}-{key}.json"
    if path.exists():
        cached = json.loads(path.read_text())
        return {**cached, "source": f"{cached['source']}, cached at {path}"}
    accuracy = judge.accuracy(data.train.images, data.train.labels, "run", epochs)
    models, trained = setup.evaluation.num_models, SCHEDULES[setup.evaluation.schedule](epochs)[0]
    what = f"{models} models x {trained} epochs on the whole training set"
    record = {"accuracy": accuracy, "source": f"condense's own run ({what})"}
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(record)))
    return {**record, "source": f"{record['source']}, saved at {path}"}


def random_targets(
    setup: RankingSetup, judge: Judge, syn: SyntheticSet, random_set: SyntheticSet
) -> tuple[torch.Tensor, str]:
    """The random subset's labels, of the set's kind: hard, or soft from a teacher (DD-Ranking
    relabels it), with a line saying which."""
    if syn.soft_labels is None:
        return random_set.labels, "hard"
    teacher = teacher_network(setup, judge.data, judge.device)
    text = f"soft, from a teacher ({setup.network.name}, {setup.ranking.teacher_epochs} epochs)"
    return teacher_logits(teacher, random_set.images, judge.device), text


def rank_set(
    setup: RankingSetup,
    judge: Judge,
    syn: SyntheticSet,
    random_set: SyntheticSet,
    set_own: float,
    random_hard: float,
) -> dict[str, Any]:
    """DD-Ranking's metrics for `syn` on the judge's architecture; `set_own` and `random_hard` are
    the set's accuracy with its own labels and the random subset's with hard labels under the
    run's augmentation (already measured by the evaluation stage, with the same paired models)."""
    soft = syn.soft_labels
    set_targets = soft if soft is not None else syn.labels
    rand_targets, random_labels = random_targets(setup, judge, syn, random_set)
    set_hard = judge.accuracy(syn.images, syn.labels) if soft is not None else set_own
    # a hard-labelled set's random subset keeps its hard labels: the stage's own evaluation of it
    random_own = judge.accuracy(random_set.images, rand_targets) if soft is not None else random_hard
    dsa = dsa_for_ranking(setup.augment, setup.dataset.allow_flip)
    run_is_dsa, run_is_plain = setup.augment.name != "none", judge.augment is None
    set_aug = set_own if run_is_dsa else judge.accuracy(syn.images, set_targets, dsa)
    random_aug = random_own if run_is_dsa else judge.accuracy(random_set.images, rand_targets, dsa)
    set_plain = set_own if run_is_plain else judge.accuracy(syn.images, set_targets, None)
    random_plain = random_own if run_is_plain else judge.accuracy(random_set.images, rand_targets, None)
    reference = full_reference(setup, judge)
    acc = RankingAccuracies(
        set_own, set_hard, random_own, reference["accuracy"], set_aug, random_aug, set_plain, random_plain
    )
    return {
        "architecture": judge.arch,
        **ranking_metrics(acc, setup.ranking),
        "accuracies": asdict(acc),
        "full_reference": reference,
        "labels": syn.label_kind,
        "random_labels": random_labels,
        "weights": {"lrs": setup.ranking.lrs_weight, "ars": setup.ranking.ars_weight},
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
