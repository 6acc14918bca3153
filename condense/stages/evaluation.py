"""The evaluation stage: DC's protocol. Fresh randomly initialised models of every architecture in
the pool train on the set alone (SGD, momentum, weight decay, learning rate x0.1 at half way) and
are tested once, at the end, on the full test set.

Evaluation is paired (common random numbers): model m of architecture a draws its initial
weights, its batch order and its augmentation from streams named by (seed, a, m) alone, never by
the set, so every set of a run, and of any run with the same seed, is judged by the same models.
A difference between two rows is then a difference between the sets.

A set with soft labels trains against them (evaluation.soft_loss, evaluation.temperature); the
targets passed in are then (N, classes) logits instead of class indices."""

from __future__ import annotations

import hashlib
import json
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from scipy import stats
from torch import nn
from tqdm import tqdm

from condense.primitives.augment import Augment, convnet_bn_augment
from condense.primitives.compute import Compute
from condense.primitives.dataset import Dataset
from condense.primitives.files import atomic_write
from condense.primitives.network import build_network, display_name, validate_network, without_batchnorm
from condense.primitives.seeding import derive_seed, generator
from condense.primitives.training import LossFn, accuracy, train_epoch
from condense.schema import ConfigError, EvaluationConfig, NetworkConfig


@dataclass
class ArchResult:
    accuracies: list[float] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def mean(self) -> float:
        return statistics.fmean(self.accuracies) if self.accuracies else float("nan")

    @property
    def std(self) -> float:
        return statistics.pstdev(self.accuracies) if len(self.accuracies) > 1 else 0.0

    def as_dict(self) -> dict[str, object]:
        """The accuracies (metrics.json keeps the timings beside them, in evaluation_seconds)."""
        return {"accuracies": self.accuracies, "mean": self.mean, "std": self.std}


@dataclass(frozen=True)
class ModelStreams:
    """The random streams of evaluated model m of architecture `arch`: its init seed, batch order
    and augmentation seeds, from (seed, arch, m) only, so every set meets the same models."""

    seed: int
    arch: str
    index: int

    @property
    def init(self) -> int:
        return derive_seed(self.seed, "eval_init", self.arch, self.index)

    def order(self) -> torch.Generator:
        return generator(self.seed, "eval_order", self.arch, self.index)

    def augment(self) -> torch.Generator:
        return generator(self.seed, "eval_augment", self.arch, self.index)


# evaluation.schedule -> (epochs to train, epoch index after which the lr drops x0.1, whether the
# optimizer restarts then): the paper's MultiStepLR, or DC's evaluate_synset.
SCHEDULES: dict[str, Callable[[int], tuple[int, int, bool]]] = {
    "multistep": lambda epochs: (epochs, epochs // 2 - 1, False),
    "dc_restart": lambda epochs: (epochs + 1, epochs // 2 + 1, True),
}


def soft_cross_entropy(temperature: float) -> LossFn:
    """Cross-entropy against softmax(target / T): DATM's SoftCrossEntropy at T = 1."""

    def loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), F.softmax(target.float() / temperature, dim=1))

    return loss


def soft_kl(temperature: float) -> LossFn:
    """T^2 KL(softmax(target / T) || softmax(logits / T)): distillation's loss, whose gradient
    keeps its scale as T changes."""

    def loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        student = F.log_softmax(logits.float() / temperature, dim=1)
        teacher = F.log_softmax(target.float() / temperature, dim=1)
        return F.kl_div(student, teacher, reduction="batchmean", log_target=True) * temperature**2

    return loss


SOFT_LOSSES: dict[str, Callable[[float], LossFn]] = {"ce": soft_cross_entropy, "kl": soft_kl}


def loss_for(targets: torch.Tensor, ev: EvaluationConfig) -> LossFn:
    """Cross-entropy for class indices, evaluation.soft_loss for soft-label logits."""
    return SOFT_LOSSES[ev.soft_loss](ev.temperature) if targets.is_floating_point() else F.cross_entropy


def evaluation_optimizer(
    net: nn.Module, ev: EvaluationConfig, lr: float, keep: torch.optim.Optimizer | None = None
) -> torch.optim.Optimizer:
    """SGD at `lr`; with `keep`, that optimizer at the new lr (its momentum kept)."""
    if keep is not None:
        for group in keep.param_groups:
            group["lr"] = lr
        return keep
    return torch.optim.SGD(net.parameters(), lr=lr, momentum=ev.momentum, weight_decay=ev.weight_decay)


@dataclass(frozen=True)
class ModelOutcome:
    """One evaluated model: its test accuracy, and its accuracy on the set it trained on (how
    far it fitted that set: a model that never left its start is at chance there too)."""

    test_accuracy: float
    set_accuracy: float


def train_and_test(
    net_cfg: NetworkConfig,
    images: torch.Tensor,
    labels: torch.Tensor,
    data: Dataset,
    ev: EvaluationConfig,
    model: ModelStreams,
    device: torch.device,
    augment: Augment | None,
    compute: Compute,
) -> ModelOutcome:
    """One fresh model trained on (images, labels) only, tested; `labels` are class indices (N,)
    or soft-label logits (N, classes)."""
    net = compute.compiled(build_network(net_cfg, data.image_shape, data.num_classes, model.init, device))
    order, augment_gen = model.order(), model.augment()
    images, labels = images.to(device), labels.to(device)
    autocast = compute.autocaster("evaluation")
    epochs, drop_after, restart = SCHEDULES[ev.schedule](ev.epochs)
    opt = evaluation_optimizer(net, ev, ev.lr)
    loss_fn = loss_for(labels, ev)
    for epoch in range(epochs):
        train_epoch(
            net, opt, images, labels, ev.batch_size, order, augment, autocast, augment_gen, loss_fn=loss_fn
        )
        if epoch == drop_after:
            opt = evaluation_optimizer(net, ev, ev.lr * 0.1, keep=None if restart else opt)
    limit = ev.test_images if ev.test_images is not None else len(data.test.images)
    test = accuracy(net, data.test.images[:limit], data.test.labels[:limit], ev.test_batch_size, autocast)
    # after the test, in eval mode and without augmentation: it draws no random number and changes
    # no state, so every accuracy stays what it was without it
    classes = labels.argmax(dim=1) if labels.is_floating_point() else labels
    return ModelOutcome(test, accuracy(net, images, classes, ev.test_batch_size, autocast))


def did_not_fit(outcome: ModelOutcome, num_classes: int) -> bool:
    """At or below chance on the images it trained on: the model never learned them (dead units,
    a diverged loss), so its test accuracy says nothing about the set."""
    return outcome.set_accuracy <= 1 / num_classes


def did_not_fit_message(arch: str, model: int, label: str, outcome: ModelOutcome, num_classes: int) -> str:
    """One line for the log: which model, how it fared on its set, and that its number is kept
    (paired models stay paired; the reader decides)."""
    return (
        f"evaluate: {arch} model {model} on {label} did not fit the set it trained on "
        f"({100 * outcome.set_accuracy:.0f} % of its images right, chance {100 / num_classes:.0f} %); "
        f"its test accuracy {100 * outcome.test_accuracy:.2f} counts in the mean"
    )


def convnet_bn_rule_applies(ev: EvaluationConfig, augment_name: str) -> bool:
    """DC's get_daparam rule is on, and DSA is off (DSA otherwise augments every model)."""
    return ev.convnet_bn.enabled and augment_name == "none"


def follows_convnet_bn_rule(net_cfg: NetworkConfig, rule: bool) -> bool:
    """DC picks crop+noise by the evaluated model's name: ConvNetBN (here of any width or depth)."""
    return rule and display_name(net_cfg) == "ConvNetBN"


def arch_training(
    net_cfg: NetworkConfig, ev: EvaluationConfig, augment: Augment | None, rule: bool
) -> tuple[Augment | None, EvaluationConfig]:
    """How models of one architecture train: under DC's ConvNetBN rule, crop+noise for its
    epochs; otherwise the run's augmentation for evaluation.epochs."""
    if follows_convnet_bn_rule(net_cfg, rule):
        return convnet_bn_augment(ev.convnet_bn), replace(ev, epochs=ev.convnet_bn.epochs)
    return augment, ev


def evaluate_set(
    images: torch.Tensor,
    labels: torch.Tensor,
    data: Dataset,
    pool: dict[str, NetworkConfig],
    ev: EvaluationConfig,
    seed: int,
    label: str,
    device: torch.device,
    augment: Augment | None,
    progress: bool = True,
    compute: Compute | None = None,
    done: dict[str, list[float]] | None = None,
    on_model: Callable[[str, float], None] | None = None,
    convnet_bn_rule: bool = False,
) -> dict[str, ArchResult]:
    """`ev.num_models` fresh models per architecture, the same ones for every set evaluated with
    this seed (ModelStreams); `label` names the set on the progress bar only. `done` holds the
    accuracies of models already evaluated (a resumed evaluation starts at the next model: each
    model has its own streams, so skipping some changes none of the others); `on_model(arch,
    accuracy)` hears of each new one. `convnet_bn_rule` (convnet_bn_rule_applies) trains a
    ConvNetBN as DC's code does (arch_training)."""
    compute = compute or Compute(device)
    done = done or {}
    results: dict[str, ArchResult] = {}
    total = len(pool) * ev.num_models
    bar = tqdm(total=total, desc=f"evaluate {label}", disable=not progress, leave=False)
    for name, net_cfg in pool.items():
        start = time.perf_counter()
        accuracies = list(done.get(name, []))[: ev.num_models]
        bar.update(len(accuracies))
        arch_augment, arch_ev = arch_training(net_cfg, ev, augment, convnet_bn_rule)
        for m in range(len(accuracies), ev.num_models):
            model = ModelStreams(seed, name, m)
            outcome = train_and_test(
                net_cfg, images, labels, data, arch_ev, model, device, arch_augment, compute
            )
            if did_not_fit(outcome, data.num_classes):
                print(did_not_fit_message(name, m, label, outcome, data.num_classes))
            acc = outcome.test_accuracy
            accuracies.append(acc)
            if on_model is not None:
                on_model(name, acc)
            bar.update(1)
        results[name] = ArchResult(accuracies, time.perf_counter() - start)
    bar.close()
    return results


AUTO_MODELS = "auto"  # evaluation.num_models: add paired models until every interval is narrow


def interval_width(accuracies: list[float], level: float = 0.95) -> float | None:
    """The full width of the Student-t interval of the mean accuracy (in the accuracies' units);
    None below two models, where no spread is known."""
    n = len(accuracies)
    if n < 2:
        return None
    return float(2 * stats.t.ppf(0.5 + level / 2, n - 1) * statistics.stdev(accuracies) / math.sqrt(n))


@dataclass(frozen=True)
class Candidate:
    """One set to judge: its images and targets (class indices or soft-label logits), the models
    already evaluated on it (a resumed evaluation) and who hears of each new one."""

    images: torch.Tensor
    targets: torch.Tensor
    done: dict[str, list[float]] = field(default_factory=dict)
    on_model: Callable[[str, float], None] | None = None


Judged = dict[str, dict[str, ArchResult]]  # set label -> architecture -> result


@dataclass(frozen=True)
class ModelCount:
    """How many paired models judged every set, and each 95 % interval's width then, in points."""

    rule: str  # "fixed" (evaluation.num_models a count) or "auto"
    models: int
    widths: dict[str, dict[str, float | None]]  # None: fewer than two models
    target_width: float | None = None  # auto's aim, in points

    @classmethod
    def of(cls, results: Judged, ev: EvaluationConfig) -> ModelCount:
        widths = {
            label: {arch: in_points(interval_width(r.accuracies)) for arch, r in per_arch.items()}
            for label, per_arch in results.items()
        }
        models = max((len(r.accuracies) for per in results.values() for r in per.values()), default=0)
        if ev.num_models == AUTO_MODELS:
            return cls(AUTO_MODELS, models, widths, ev.target_width)
        return cls("fixed", models, widths)

    @property
    def widest(self) -> float | None:
        """The widest interval; None when some set has no interval (or there is no set)."""
        every = [w for per in self.widths.values() for w in per.values()]
        return None if not every or None in every else max(every)  # type: ignore[type-var]

    @property
    def narrow_enough(self) -> bool:
        widest = self.widest
        return self.target_width is not None and widest is not None and widest < self.target_width

    def describe(self) -> str:
        """The count used and the widest interval reached, for the card and the log."""
        widest = self.widest
        reached = "none (fewer than two models)" if widest is None else f"{widest:.2f} points"
        text = f"{self.models} models, widest 95 % interval {reached}"
        if self.rule != AUTO_MODELS:
            return text
        verdict = "reached" if self.narrow_enough else "not reached"
        return f"auto: {text} (target < {self.target_width:g}: {verdict})"

    def as_dict(self) -> dict[str, object]:
        return {
            "rule": self.rule,
            "models": self.models,
            "widest": self.widest,
            "target_width": self.target_width,
            "reached_target": self.narrow_enough if self.rule == AUTO_MODELS else None,
            "widths": self.widths,
        }


def in_points(width: float | None) -> float | None:
    return None if width is None else 100 * width


def known_so_far(
    done: dict[str, list[float]], earlier: dict[str, ArchResult] | None
) -> dict[str, list[float]]:
    """Per architecture, the longer of what the caller knew (a ledger) and what this evaluation
    measured so far: both list the same paired models in order."""
    measured = {arch: r.accuracies for arch, r in (earlier or {}).items()}
    return {arch: max(done.get(arch, []), measured.get(arch, []), key=len) for arch in {*done, *measured}}


def with_seconds_of(
    earlier: dict[str, ArchResult] | None, fresh: dict[str, ArchResult]
) -> dict[str, ArchResult]:
    """`fresh` (one more round of auto) with the seconds of the rounds before it added."""
    if earlier is None:
        return fresh
    return {arch: ArchResult(r.accuracies, r.seconds + earlier[arch].seconds) for arch, r in fresh.items()}


# measure(label, count): the results of set `label` on its first `count` paired models
Measure = Callable[[str, int], dict[str, ArchResult]]


def judge_jointly(labels: list[str], measure: Measure, ev: EvaluationConfig) -> tuple[Judged, ModelCount]:
    """evaluation.num_models as a count: each set on that many models, one set after another.
    "auto": every set and architecture gets model k before any gets model k + 1, from min_models
    on, until every interval is narrower than target_width points, or max_models. The decision is
    joint, so the sets stay paired model by model, and it reads the accuracies alone, so a resumed
    run replays it from its ledger."""
    if ev.num_models != AUTO_MODELS:
        results = {label: measure(label, int(ev.num_models)) for label in labels}
        return results, ModelCount.of(results, ev)
    results: Judged = {}
    count = ev.min_models
    while True:
        for label in labels:
            results[label] = with_seconds_of(results.get(label), measure(label, count))
        tally = ModelCount.of(results, ev)
        if tally.narrow_enough or count >= ev.max_models:
            return results, tally
        count += 1


def evaluate_sets(
    sets: dict[str, Candidate],
    data: Dataset,
    pool: dict[str, NetworkConfig],
    ev: EvaluationConfig,
    seed: int,
    device: torch.device,
    augment: Augment | None,
    progress: bool = True,
    compute: Compute | None = None,
    convnet_bn_rule: bool = False,
) -> tuple[Judged, ModelCount]:
    """Every set through the same paired models (evaluate_set), as many as judge_jointly says."""
    measured: Judged = {}

    def measure(label: str, count: int) -> dict[str, ArchResult]:
        one = sets[label]
        done = known_so_far(one.done, measured.get(label))
        measured[label] = evaluate_set(
            one.images, one.targets, data, pool, replace(ev, num_models=count), seed, label, device,
            augment, progress, compute, done=done, on_model=one.on_model, convnet_bn_rule=convnet_bn_rule,
        )  # fmt: skip
        return measured[label]

    return judge_jointly(list(sets), measure, ev)


@dataclass
class EvaluationLedger:
    """Every evaluated model's accuracy as soon as it is known, in `evaluation_progress.json`
    (written atomically), so a killed evaluation resumes at the next model. Entries are keyed by
    the set's content, the protocol and the seed (ledger_key): a changed set or protocol is never
    served old numbers."""

    path: Path
    entries: dict[str, dict[str, list[float]]] = field(default_factory=dict)

    @classmethod
    def open(cls, out: Path, resume: bool) -> EvaluationLedger:
        path = out / "evaluation_progress.json"
        if resume and path.exists():
            return cls(path, json.loads(path.read_text()))
        return cls(path)

    def done(self, key: str) -> dict[str, list[float]]:
        return self.entries.get(key, {})

    def record(self, key: str, arch: str, accuracy: float) -> None:
        self.entries.setdefault(key, {}).setdefault(arch, []).append(accuracy)
        text = json.dumps(self.entries)
        atomic_write(self.path, lambda tmp: tmp.write_text(text))


def ledger_key(images: torch.Tensor, labels: torch.Tensor, protocol: dict[str, object]) -> str:
    """A digest of the set (images and labels or soft labels) and of what its models depend on."""
    digest = hashlib.sha1()
    for tensor in (images, labels):
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    digest.update(json.dumps(protocol, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


def evaluation_pool(network: NetworkConfig, ev: EvaluationConfig) -> dict[str, NetworkConfig]:
    """The architectures to evaluate, by display name: the condensing `network` first if asked."""
    pool: dict[str, NetworkConfig] = {}
    if ev.include_condense_network:
        net = without_batchnorm(network) if ev.without_batchnorm else network
        pool[display_name(net)] = net
    pool.update(ev.models)
    return pool


def validate_evaluation(ev: EvaluationConfig, iterations: int) -> None:
    checks = (
        (ev.epochs >= 1, f"evaluation.epochs={ev.epochs} is out of range: use >= 1"),
        (
            ev.num_models == AUTO_MODELS or (type(ev.num_models) is int and ev.num_models >= 0),
            f"evaluation.num_models={ev.num_models}: use a count >= 0, or auto",
        ),
        (
            2 <= ev.min_models <= ev.max_models,
            f"evaluation.min_models={ev.min_models}, max_models={ev.max_models}: use 2 <= min_models "
            "<= max_models (an interval needs two models)",
        ),
        (ev.target_width > 0, f"evaluation.target_width={ev.target_width}: use > 0 points"),
        (ev.lr > 0, f"evaluation.lr={ev.lr} is out of range: a learning rate must be > 0"),
        (
            all(0 <= k <= iterations for k in ev.at_iterations),
            f"evaluation.at_iterations={list(ev.at_iterations)}: each must be in 0..iterations={iterations}",
        ),
        (
            ev.schedule in SCHEDULES,
            f"evaluation.schedule={ev.schedule} is unknown: use one of {', '.join(SCHEDULES)}",
        ),
        (
            ev.test_images is None or ev.test_images >= 1,
            f"evaluation.test_images={ev.test_images}: use >= 1, or null for the whole test set",
        ),
        (
            ev.soft_loss in SOFT_LOSSES,
            f"evaluation.soft_loss={ev.soft_loss} is unknown: use one of {', '.join(SOFT_LOSSES)}",
        ),
        (ev.temperature > 0, f"evaluation.temperature={ev.temperature}: use > 0 (1 is DATM's)"),
        (
            ev.convnet_bn.epochs >= 1 and ev.convnet_bn.crop >= 0 and ev.convnet_bn.noise >= 0,
            f"evaluation.convnet_bn (epochs {ev.convnet_bn.epochs}, crop {ev.convnet_bn.crop}, noise "
            f"{ev.convnet_bn.noise}): use epochs >= 1, crop >= 0, noise >= 0 (DC's: 1000, 4, 0.001)",
        ),
    )
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    for name, net in ev.models.items():
        validate_network(net, f"evaluation.models.{name}")
