"""The typed run object: structured-config dataclasses that Hydra's YAML files fill in.

Every config group in ``conf/`` has one dataclass here; ``RunConfig`` is the whole run and is
the only configuration object the code passes around. ``validate`` checks ranges before any
work starts and raises ``ConfigError`` with a one-line message naming the setting and the fix.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from typing import Any, get_args, get_origin, get_type_hints

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf


class ConfigError(ValueError):
    """A user mistake in the configuration; its message is one line: setting, problem, fix."""


@dataclass
class EvalAugmentConfig:
    """DC's evaluation-time augmentation for a dataset (used by MNIST: crop 4, scale .2, rotate 45)."""

    enabled: bool = False
    # dc: DC's utils.py augment() exactly (one op per image, mean fills, nearest scale, scipy
    # cubic rotation); affine: condense's batched affine version.
    style: str = "dc"
    # Evaluated models train this long when the augmentation is on (DC: 1000).
    epochs: int = 1000
    crop: int = 4
    scale: float = 0.2
    rotate: float = 45.0


@dataclass
class DatasetConfig:
    name: str = MISSING
    channels: int = MISSING
    image_size: int = MISSING
    num_classes: int = MISSING
    mean: list[float] = MISSING
    std: list[float] = MISSING
    root: str = "${oc.env:CONDENSE_DATA,'~/.cache/condense/data'}"
    download: bool = False
    # Digits only: the fixed train/test split (independent of the run's seed).
    test_fraction: float = 0.2
    split_seed: int = 0
    # DSA's flip is off for digit datasets, where a mirrored digit is another symbol.
    allow_flip: bool = True
    eval_augment: EvalAugmentConfig = field(default_factory=EvalAugmentConfig)
    # MTT's dataset-level transform: ZCA whitening fitted on the training pixels in [0, 1] (kornia,
    # cached under root/zca) in place of the mean/std normalisation; eps is MTT's 0.1.
    zca: bool = False
    zca_eps: float = 0.1


@dataclass
class NetworkConfig:
    """One network of the zoo. width/depth/activation/pooling shape the ConvNet family only."""

    name: str = "convnet"
    norm: str = "instance"
    width: int = 128
    depth: int = 3
    activation: str = "relu"
    pooling: str = "avg"


@dataclass
class DistanceConfig:
    name: str = "dc"
    # Which parameters' gradients take part: "matrices" (2-D and higher; the paper's and DC's
    # choice) or "all" (biases and norm parameters too).
    parameters: str = "matrices"
    # Indices into the selected parameters (in network order); empty means every one.
    layers: list[int] = field(default_factory=list)
    # angle_magnitude only: weight and kind of the per-row magnitude term.
    magnitude_weight: float = 1.0
    magnitude: str = "l2"
    # The angle terms' cosine: "dc" (dot / (|a||b| + eps), DC's code) or "torch"
    # (F.cosine_similarity, each norm clamped at 1e-8, the paper's code). Set by the protocol.
    cosine: str = "dc"
    eps: float = 1e-6


@dataclass
class MatchingConfig:
    name: str = "intra"
    # inter and multilevel: weight of the single inter-class term; null means the class count C.
    inter_weight: float | None = None
    # inter only: the mixed real batch holds this many times batch_real images.
    inter_batch_factor: int = 4
    # inter only, how batches are drawn: "iid" (the whole synthetic set in a fresh order and an
    # i.i.d. real draw each step) or "loader" (the paper's inter-class.py: batch_train synthetic
    # and inter_batch_factor x batch_real real images from loaders walked epoch by epoch, the
    # walk carried across steps and iterations). They differ when classes x ipc > batch_train.
    batching: str = "iid"
    # contrastive (DCC) only, its bi-level warm-up: intra-class matching until this fraction of
    # the iterations has run (DCC's 250 of 1000) and, within an iteration, for the first
    # warmup_steps outer steps (DCC's 10); after either, the contrastive (class-mean) loss.
    warmup_fraction: float = 0.0
    warmup_steps: int = 0
    # The distribution levels (distribution, idm) only; IDM's three parts, each usable alone.
    # Partitioning and expansion: each stored image holds expansion x expansion sub-images (real
    # init: that many downscaled real images of its class); matching and evaluation see every
    # sub-image upsampled to full size. 1: off.
    expansion: int = 1
    queue: ModelQueueConfig = field(default_factory=lambda: ModelQueueConfig())
    # Class-aware regularisation: + class_weight x accuracy x CE(net(S), y) per class, accuracy
    # the matched model's running training accuracy as a fraction. 0: off.
    class_weight: float = 0.0
    # One image-optimiser step per class (IDM) instead of one per iteration over all classes.
    per_class_steps: bool = False
    # trajectory (MTT, FTD) only. Each iteration: an expert and a start epoch t < max_start_epoch
    # drawn; syn_steps differentiable SGD steps from the expert's epoch-t weights on the synthetic
    # set, step size the learnable syn_lr (starting at syn_lr_init, MTT's lr_teacher); the loss
    # is the distance to its epoch t + expert_epochs weights over the distance the expert moved.
    syn_steps: int = 20
    expert_epochs: int = 2
    max_start_epoch: int = 20
    # Images per differentiable step (MTT's batch_syn); null: the whole set. Its own setting, not
    # batch_train: MTT's default is the whole set, gradient matching's inner batch is 256.
    batch_syn: int | None = None
    syn_lr_init: float = 0.01
    lr_lr: float = 1e-5  # SGD on syn_lr, momentum 0.5 (MTT)
    # FTD: an exponential moving average of the images (0: off); the EMA set is saved and evaluated.
    ema_decay: float = 0.0
    # The run length ema_decay was chosen for. Set (budget=cpu and smoke set FTD's 5000), the decay
    # becomes ema_decay ** (ema_decay_iterations / iterations), so the average spans the same share
    # of a shortened run: 0.9999 over 100 iterations would leave 99 % of the initial images in it.
    ema_decay_iterations: int | None = None


@dataclass
class ModelQueueConfig:
    """IDM's queue of partly trained models (size 0: off, a fresh random network per iteration as
    in DM). It starts with `initial` random models; every `interval` iterations one more joins and
    the oldest leaves beyond `size`. Each iteration matches under `sample` models drawn from it,
    then `train` drawn models take `steps` SGD steps each on random real batches of `batch`.
    A model's accuracy (for class_weight) counts its training batches since the last multiple of
    `accuracy_reset` iterations (IDM resets it whenever it evaluates: every 100, 500 at CIFAR IPC 50)."""

    size: int = 0
    initial: int = 3
    interval: int = 30
    sample: int = 1
    train: int = 2
    steps: int = 10
    batch: int = 256
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    accuracy_reset: int = 100


@dataclass
class ExpertsConfig:
    """Expert trajectories for matching=trajectory (MTT's buffer.py): `num` networks of the run's
    architecture, each from its own random init, trained `epochs` epochs on the real training set
    (batch `batch`, SGD at `lr`, `momentum`, `weight_decay`; DSA on every batch when `augment`),
    a snapshot of the weights after every epoch. `name` is the optimizer: sgd (MTT) or gsam
    (FTD: sharpness-aware, radius `rho`, surrogate-gap weight `alpha`, `adaptive` scaling)."""

    name: str = "sgd"
    num: int = 100
    epochs: int = 50
    lr: float = 0.01
    momentum: float = 0.0
    weight_decay: float = 0.0
    batch: int = 256
    augment: bool = True
    rho: float = 0.0
    alpha: float = 0.0
    adaptive: bool = False
    # The experts' own seed, not the run's: every condensation run (seed) of a setting distils
    # from the same experts, as MTT's runs share one buffer.
    seed: int = 0
    # The cache of trained trajectories, outside the run folders (like the ZCA cache).
    root: str = "${dataset.root}/experts"
    # A folder of MTT's replay_buffer_<n>.pt files to distill from instead (nothing is trained;
    # the first `num` trajectories in file order are used).
    path: str | None = None
    # stage=experts only: train expert `index` alone, so a sweep over it (a Slurm job array)
    # trains the experts in parallel into the one cache.
    index: int | None = None


@dataclass
class RealBatchConfig:
    """fixed: batch_real images per class; adaptive: the smallest batch whose gradient direction is
    within arccos(min_cosine) of the class's whole-data direction (condense/method/real_batch.py)."""

    name: str = "fixed"
    min_cosine: float = 0.95
    min_batch: int = 32


@dataclass
class StepPolicyConfig:
    name: str = "dc"
    # fixed: explicit counts. Other policies derive outer_loop from ipc unless it is set here.
    outer_loop: int | None = None
    inner_epochs: int | None = None
    # schedule: inner epochs after outer step ol (ol beyond the list takes `tail`).
    epochs: list[int] = field(default_factory=lambda: [50, 40, 30, 20, 10, 10, 10, 10, 10, 10])
    tail: int = 5
    # overfit: stop when the loss on a fixed mixed real batch rises, or at `cap` epochs.
    cap: int = 50
    monitor_batch: int = 256
    # When the monitored real batch is drawn: "outer_step" (a fresh one before each inner loop,
    # the paper's multi-level-overfitting.py) or "iteration" (one per iteration).
    monitor_refresh: str = "outer_step"
    # The mode the monitor's loss is measured in: "train" (the paper's code: BatchNorm uses batch
    # statistics and updates its running ones) or "eval".
    monitor_mode: str = "train"


@dataclass
class InitConfig:
    name: str = "noise"


@dataclass
class AugmentConfig:
    """Differentiable siamese augmentation (DSA) for the matching step; `none` turns it off."""

    name: str = "none"
    strategy: list[str] = field(
        default_factory=lambda: ["color", "crop", "cutout", "flip", "scale", "rotate"]
    )
    # single: one op of the strategy per call (DSA's 'S', its default); all: every op in sequence
    # (DSA's 'M').
    mode: str = "single"
    brightness: float = 1.0
    saturation: float = 2.0
    contrast: float = 0.5
    crop_pad: float = 0.125
    cutout: float = 0.5
    flip_p: float = 0.5
    scale: float = 1.2
    rotate: float = 15.0
    # DSA's protocol trains evaluated models longer, with the same augmentation.
    eval_epochs: int = 1000


@dataclass
class ConvNetBNRuleConfig:
    """DC's get_daparam rule: an evaluated ConvNetBN, when DSA is off, trains with crop+noise (one
    of the two per image: a crop shifted by up to `crop` pixels, mean-filled, or Gaussian noise of
    std `noise`) for `epochs` epochs, "since augmentation makes training with BatchNorm easier".
    It replaces the dataset's own augmentation (MNIST) for that network, as DC's code does."""

    enabled: bool = True
    crop: int = 4
    noise: float = 0.001
    # DC trains every augmented evaluation for 1000 epochs; evaluation.epochs covers the others.
    epochs: int = 1000


@dataclass
class EvaluationConfig:
    """DC's protocol: fresh models trained on the synthetic set only, tested once at the end."""

    # The pool: display name -> network. `condense_network` adds the network used to condense.
    models: dict[str, NetworkConfig] = field(default_factory=dict)
    include_condense_network: bool = True
    # DC's eval_mode S: the condensing network is evaluated with its BatchNorm taken out
    # (ConvNetBN -> ConvNet); false evaluates it as it is (DC's SS).
    without_batchnorm: bool = True
    # Paired models per set and architecture: a count, or "auto": one more model at a time for
    # every set the run compares (the set, the random subset, each architecture), from min_models
    # to max_models, until every 95 % interval of a mean accuracy is narrower than target_width
    # points (condense.stages.evaluation.judge_jointly).
    num_models: Any = 20  # a count (int) or "auto"; OmegaConf 2.3 cannot merge a Union field
    min_models: int = 3
    max_models: int = 20
    target_width: float = 0.5
    epochs: int = 300
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 256
    # The learning-rate schedule: "multistep" (the paper's code: `epochs` epochs, x0.1 after
    # epochs // 2, momentum kept) or "dc_restart" (DC's code: epochs + 1 epochs, x0.1 after
    # epoch index epochs // 2 + 1 with a fresh optimizer, momentum reset). Set by the protocol.
    schedule: str = "multistep"
    test_batch_size: int = 1024
    # Test on the first N test images only (null: all of them, DC's protocol); for smoke runs.
    test_images: int | None = None
    # Evaluate a random real subset of the same size beside the synthetic set.
    compare_random: bool = True
    # Also evaluate the set as it is learned, after these many iterations (0: the initial images),
    # with the same pool and paired models; the final set is the evaluation stage's.
    at_iterations: list[int] = field(default_factory=list)
    # Sets that carry soft labels train against them: "ce" is cross-entropy with softmax(labels / T)
    # (DATM's, T = 1), "kl" is T^2 KL(softmax(labels / T) || softmax(logits / T)) (distillation's).
    soft_loss: str = "ce"
    temperature: float = 1.0
    # Train with the set's learned learning rate (DATM's lr_best.pt) when it carries one.
    learned_lr: bool = True
    # DC's rule for an evaluated ConvNetBN (DSA off): crop+noise, 1000 epochs.
    convnet_bn: ConvNetBNRuleConfig = field(default_factory=ConvNetBNRuleConfig)


@dataclass
class CoresetConfig:
    """Real images chosen per class instead of a condensed set (DC's coreset baselines); `none`
    condenses by gradient matching."""

    name: str = "none"
    # herding/kcenter: epochs the feature network (the run's network) trains on the whole real
    # training set before images are picked in its feature space (0 = an untrained network).
    feature_epochs: int = 1


@dataclass
class ReaderConfig:
    """How stage=evaluate reads synthetic=PATH (condense/primitives/foreign.py)."""

    # auto (by what the path holds) | condense (safetensors) | dc (DC/DSA/DM res_*.pt) |
    # mtt (MTT/DATM images_best.pt, labels_best.pt, lr_best.pt) | png (a folder per class)
    layout: str = "auto"
    # dc: which experiment's [images, labels] pair of the file's `data` list
    experiment: int = 0
    # What float labels hold: logits (DATM) | probabilities | auto (probabilities when every row is
    # >= 0 and sums to 1, else logits)
    soft_labels: str = "auto"


@dataclass
class StopConfig:
    """Stopping condensation once it stops improving (condense/stages/condensation.py). The proxy
    is the matching loss itself, averaged over `window` iterations: each iteration meets a fresh
    network, so a window's mean estimates the expected objective the images descend; once
    `patience` windows in a row fail to lower the best window's mean by `min_improvement`
    (relative), the run stops and reports the iterations it saved. patience=0: run every iteration."""

    patience: int = 0
    window: int = 10
    min_improvement: float = 0.01


@dataclass
class RankingConfig:
    """DD-Ranking's fairness metrics, computed by the evaluation stage on the pool's first
    architecture (condense/stages/ranking.py): `none` or `dd_ranking`."""

    name: str = "none"
    # The label-robust score's weight of improvement over random against hard-label recovery, and
    # the augmentation-robust score's weight of the augmented gap (DD-Ranking's 0.5 and 0.5).
    lrs_weight: float = 0.5
    ars_weight: float = 0.5
    # The whole-dataset accuracy (a fraction) hard-label recovery needs: a value with its source,
    # or full_run=true (models trained on the whole training set, cached under dataset.root).
    full_accuracy: float | None = None
    full_source: str | None = None
    full_run: bool = False
    # full_run: epochs of the whole-dataset models (null: the evaluation's).
    full_epochs: int | None = None
    # Soft-labelled sets: the random subset is relabelled by a teacher (the run's network trained
    # on the whole training set this many epochs, cached), as DD-Ranking relabels it.
    teacher_epochs: int = 2


@dataclass
class ProtocolConfig:
    """Whose code a run follows where the published codes differ (conf/protocol/): `dc` or
    `paper`. The files set the values themselves (momentum_net, distance.cosine,
    evaluation.schedule, CIFAR normalisation); this node records the choice."""

    name: str = "dc"


@dataclass
class LoggerConfig:
    name: str = "none"
    project: str = "condense"
    entity: str | None = None
    mode: str = "offline"
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    image_every: int = 50


@dataclass
class PresetConfig:
    """The presets a run was composed with (Hydra's choices of method, budget and speed, which
    leave no node of their own): bookkeeping for the run record and the card, never identity.
    Empty when the config was built without Hydra's composition."""

    method: str = ""
    budget: str = ""
    speed: str = ""


@dataclass
class RunConfig:
    dataset: DatasetConfig = MISSING
    network: NetworkConfig = MISSING
    distance: DistanceConfig = MISSING
    matching: MatchingConfig = MISSING
    step_policy: StepPolicyConfig = MISSING
    real_batch: RealBatchConfig = MISSING
    init: InitConfig = MISSING
    augment: AugmentConfig = MISSING
    evaluation: EvaluationConfig = MISSING
    coreset: CoresetConfig = MISSING
    protocol: ProtocolConfig = MISSING
    experts: ExpertsConfig = MISSING
    logger: LoggerConfig = MISSING
    ranking: RankingConfig = MISSING

    stage: str = "all"
    # evaluate stage: the synthetic-set file to read (default: this run's own).
    synthetic: str | None = None
    reader: ReaderConfig = field(default_factory=ReaderConfig)
    stop: StopConfig = field(default_factory=StopConfig)
    ipc: int = 10
    iterations: int = 1000
    lr_img: float = 0.1
    # lr_img over the iterations: constant (every paper's), cosine (to near 0 at the last
    # iteration) or step (x0.1 from the middle iteration on); a function of the iteration alone.
    lr_img_schedule: str = "constant"
    momentum_img: float = 0.5
    lr_net: float = 0.01
    momentum_net: float = 0.0
    batch_real: int = 256
    batch_train: int = 256
    # BatchNorm networks: real images per class that set the statistics before matching.
    bn_real_per_class: int = 16
    seed: int = 0
    device: str = "auto"
    # The fast path (condense/primitives/compute.py); fast=false is the straightforward fp32 reference.
    fast: bool = True
    precision: str = "fp32"  # fp32 | tf32 | bf16 (autocast) | auto (bf16 where measured faster)
    heap_reuse: bool = True  # keep freed memory in the heap: no page faults per step (glibc)
    # fast=true: torch.compile the first-order passes (evaluated models, real gradients, inner
    # training); the matching step's second-order synthetic pass stays eager
    compile: bool = False
    # Save the condense stage's state every N iterations (0: only on a signal or at the end);
    # resume=true continues from the checkpoint in output_dir.
    checkpoint_every: int = 10
    resume: bool = False
    # Where the run writes; Hydra's output folder unless set.
    output_dir: str = "${hydra:runtime.output_dir}"
    progress: bool = True
    preset: PresetConfig = field(default_factory=PresetConfig)


def train_longer_when_augmenting(
    base: int, augment: str, augment_epochs: int, dataset_augments: bool, dataset_epochs: int
) -> int:
    """DC's protocol rule for evaluation epochs, as a resolver the YAML names (conf/evaluation/):
    augment.eval_epochs with DSA on, dataset.eval_augment.epochs with the dataset's own
    augmentation (MNIST), else the base. `evaluation.epochs=N` replaces the rule outright."""
    if augment != "none":
        return int(augment_epochs)
    return int(dataset_epochs) if dataset_augments else int(base)


def by_ipc(ipc: int, table: dict[Any, Any]) -> Any:
    """A value per IPC, as conf/setting/ files give them: the entry of this ipc, else `default`."""
    entries = {str(key): value for key, value in table.items()}
    if str(ipc) in entries:
        return entries[str(ipc)]
    if "default" in entries:
        return entries["default"]
    raise ConfigError(
        f"ipc={ipc} has no value in a conf/setting/ table ({sorted(entries)}): add it or a default"
    )


def register_configs() -> None:
    """Put the schema into Hydra's ConfigStore so YAML values merge into typed nodes, and the
    protocol rules the YAML interpolates into OmegaConf."""
    ConfigStore.instance().store(name="run_schema", node=RunConfig)
    OmegaConf.register_new_resolver(
        "train_longer_when_augmenting", train_longer_when_augmenting, replace=True
    )
    OmegaConf.register_new_resolver("by_ipc", by_ipc, replace=True)


def require_choice(value: str, choices: Iterable[str], setting: str) -> None:
    """Refuse a value outside a registry, listing the valid ones."""
    options = list(choices)
    if value not in options:
        raise ConfigError(f"{setting}={value} is unknown: use one of {', '.join(options)}")


def unknown_keys(node: dict[str, Any], schema: type, prefix: str = "") -> list[tuple[str, str | None]]:
    """(dotted path, closest valid path or None) for every key the schema does not define; a
    key added with `+` passes Hydra's struct check, so the schema has to say no itself."""
    hints = get_type_hints(schema)
    names = [f.name for f in fields(schema)]
    found: list[tuple[str, str | None]] = []
    for key, value in node.items():
        if key not in hints:
            close = difflib.get_close_matches(str(key), names, n=1)
            found.append((prefix + str(key), prefix + close[0] if close else None))
            continue
        kind = hints[key]
        if is_dataclass(kind) and isinstance(value, dict):
            found += unknown_keys(value, kind, f"{prefix}{key}.")  # type: ignore[arg-type]
        elif get_origin(kind) is dict and isinstance(value, dict):
            inner = get_args(kind)[1]
            for name, sub in value.items():
                if is_dataclass(inner) and isinstance(sub, dict):
                    found += unknown_keys(sub, inner, f"{prefix}{key}.{name}.")  # type: ignore[arg-type]
    return found


def refuse_unknown_keys(cfg: DictConfig) -> None:
    unknown = unknown_keys(OmegaConf.to_container(cfg, resolve=False), RunConfig)  # type: ignore[arg-type]
    if unknown:
        path, close = unknown[0]
        hint = f"did you mean {close}?" if close else "condense --cfg job lists every setting"
        raise ConfigError(f"{path} is not a setting of condense: {hint}")


# One definition of a run's identity: every top-level setting of RunConfig, by the role it plays.
# A new setting must be listed here (tests/test_config.py fails otherwise); everything that names,
# groups, compares or resumes runs derives its keys from this table.
ROLES: dict[str, tuple[str, ...]] = {
    # what the condense stage computes from: with the seed, these decide the set bit for bit
    "set": (
        "dataset", "network", "distance", "matching", "step_policy", "real_batch", "init", "augment",
        "coreset", "protocol", "experts", "stop", "ipc", "iterations", "lr_img", "lr_img_schedule",
        "momentum_img", "lr_net", "momentum_net", "batch_real", "batch_train", "bn_real_per_class",
    ),
    # how a set is judged: the evaluation protocol and the metrics beside it
    "evaluation": ("evaluation", "ranking"),
    # which stages run and what stage=evaluate reads
    "input": ("stage", "synthetic", "reader"),
    # how the arithmetic runs: part of every number's protocol
    "compute": ("precision", "device", "fast", "heap_reuse", "compile"),
    # the replicate: runs that differ only here pool into one cell
    "seed": ("seed",),
    # where and how a run is kept: never part of its identity
    "bookkeeping": ("output_dir", "logger", "progress", "resume", "checkpoint_every", "preset"),
}  # fmt: skip
# The set-making settings that the evaluation reads too: the data, the pool's condensing network,
# DSA's augmentation in evaluation. With the evaluation and compute roles they are what a baseline
# set's (the random subset's) numbers depend on.
JUDGED_WITH = ("dataset", "network", "augment")


def role_of(key: str) -> str | None:
    """The role of a top-level setting, or None for a key that is not a setting (e.g. a key a
    checkpoint adds, or one of an older version's files)."""
    return next((role for role, keys in ROLES.items() if key in keys), None)


def keys_with_role(*roles: str) -> tuple[str, ...]:
    return tuple(key for role in roles for key in ROLES[role])


def without_roles(config: dict[str, Any], *roles: str) -> dict[str, Any]:
    """A resolved config (as data) less the settings of the given roles."""
    return {k: v for k, v in config.items() if role_of(k) not in roles}


def baseline_protocol_keys() -> tuple[str, ...]:
    """What a baseline set's numbers depend on besides the seed: how its models are built,
    trained and tested."""
    return (*JUDGED_WITH, *keys_with_role("evaluation", "compute"))


def preset_of(choices: Any) -> PresetConfig:
    """The `preset` node from Hydra's runtime choices (group -> option)."""
    return PresetConfig(**{f.name: str(choices.get(f.name) or "") for f in fields(PresetConfig)})


# Groups only one matching family reads: named in a run's choices only when that family runs.
FAMILY_GROUPS = {"experts": "trajectory"}


def group_choices(cfg: RunConfig) -> dict[str, str]:
    """The chosen option of every config group, read off the resolved config (each group's node
    has a `name`), so a new group appears in the plan, in W&B and in the report by itself."""
    choices = {}
    for f in fields(cfg):
        node = getattr(cfg, f.name)
        if FAMILY_GROUPS.get(f.name, cfg.matching.name) != cfg.matching.name:
            continue
        if role_of(f.name) not in ("seed", "bookkeeping") and is_dataclass(node) and hasattr(node, "name"):
            choices[f.name] = (
                f"{node.name}/{node.norm}" if isinstance(node, NetworkConfig) else str(node.name)
            )
    return choices


def protocol_digest(cfg: RunConfig, precision: dict[str, str]) -> str:
    """Eight hex digits that differ whenever anything a set or its numbers depend on differs (every
    resolved setting but the seed, the inputs and the bookkeeping, and the precision as resolved):
    runs that share it differ at most in the seed, and a set evaluated later with stage=evaluate
    shares its maker's."""
    protocol = without_roles(to_container(cfg), "seed", "input", "bookkeeping")
    text = json.dumps({"config": protocol, "precision": precision}, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:8]


def precision_tag(precision: dict[str, str]) -> str:
    """A run's resolved precision in one token: fp32 or bf16 when every part agrees, else each
    part's (matching_bf16+inner_bf16+evaluation_fp32); a `setting` entry is ignored, and a record
    without parts (made before precision was recorded) says so rather than pass for fp32."""
    parts = {part: kind for part, kind in precision.items() if part != "setting"}
    kinds = set(parts.values())
    if not kinds:
        return "unrecorded"
    return kinds.pop() if len(kinds) == 1 else "+".join(f"{p}_{k}" for p, k in parts.items())


def card_line(card: dict[str, str]) -> str:
    """A protocol card in one line (printed, and the report's footnotes)."""
    return "; ".join(f"{key}: {value}" for key, value in card.items())


@dataclass
class RunRecord:
    """metrics.json: what a run wrote, as the app writes it and condense-report and resume read
    it. Accuracies and timings sit apart: `evaluation` holds set -> architecture -> accuracies
    (and their mean and std), `evaluation_seconds` holds set -> architecture -> seconds."""

    config: dict[str, Any]
    output_dir: str
    label: str  # what the run's set is called (condense.app.labels)
    # how the label was found: "run" (its choices), "stored config" (a loaded condense set) or
    # "source" (another tool's file, named by its layout and path)
    named_by: str = "run"
    group: str = ""  # the ablation cell: the W&B group
    tags: list[str] = field(default_factory=list)
    precision: dict[str, str] = field(default_factory=dict)  # {"setting": ..., part: kind}
    # precision=auto: the measured bf16 speed-up it decided on, its source and the threshold
    precision_auto: dict[str, Any] | None = None
    protocol_card: dict[str, str] = field(default_factory=dict)
    finished: bool = False
    condense: dict[str, Any] | None = None
    history: list[dict[str, float]] = field(default_factory=list)
    evaluation: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    evaluation_seconds: dict[str, dict[str, float]] = field(default_factory=dict)
    evaluation_protocol: dict[str, Any] | None = None
    evaluation_at: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    ranking: dict[str, Any] | None = None
    set: dict[str, Any] | None = None  # a loaded set: source, labels, learned lr, ipc
    experts: dict[str, Any] | None = None  # trajectory matching: their cache, how many, trained now
    # how many paired models judged the sets and the 95 % interval widths reached (points)
    evaluation_models: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """As metrics.json holds it: parts a run did not reach are left out (a condense-only run
        has no `evaluation`)."""
        return {k: v for k, v in asdict(self).items() if v is not None and v != {} and v != []}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunRecord:
        """A record from metrics.json, older files included: unknown keys are dropped, and a
        `seconds` entry kept inside a set's results (files before the split) moves beside them."""
        known = {f.name for f in fields(cls)}
        data = copy.deepcopy({k: v for k, v in data.items() if k in known})  # the caller's dict stays
        legacy = data.get("config", {}).get("method")  # files before labels: the preset's name
        data.setdefault("label", str(legacy.get("name", "")) if isinstance(legacy, dict) else "")
        record = cls(**data)
        for name, per_arch in record.evaluation.items():
            seconds = per_arch.pop("seconds", None)
            if isinstance(seconds, int | float):
                record.evaluation_seconds.setdefault(name, {})["total"] = float(seconds)
        return record

    def own_seconds(self) -> float | None:
        """Seconds the evaluation stage spent on the run's own set; None where not recorded."""
        seconds = self.evaluation_seconds.get(self.label, {}).get("total")
        return float(seconds) if seconds is not None else None


def to_run_config(cfg: DictConfig) -> RunConfig:
    """Hydra's composed config as the typed run object (interpolations resolved); a key the schema
    does not define is refused, naming the closest valid one."""
    refuse_unknown_keys(cfg)
    return OmegaConf.to_object(cfg)  # type: ignore[return-value]


def to_container(cfg: RunConfig) -> dict[str, Any]:
    """The fully resolved configuration as plain Python data (for files and W&B)."""
    return asdict(cfg)
