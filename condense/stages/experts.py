"""The experts stage: train the expert trajectories trajectory matching draws from, into their
cache, only those the cache lacks (condense.method.experts)."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace

from torch import nn
from tqdm import tqdm

from condense.method.experts import ExpertCache, ExpertSource, MttBuffers, expert_key, train_trajectory
from condense.primitives import augment as augment_mod
from condense.primitives.compute import Compute
from condense.primitives.dataset import Dataset
from condense.primitives.network import build_network
from condense.schema import AugmentConfig, ExpertsConfig, NetworkConfig


@dataclass(frozen=True)
class ExpertsRecipe:
    """What the experts stage reads of a run; a test may write one literally."""

    experts: ExpertsConfig
    network: NetworkConfig
    augment: AugmentConfig
    allow_flip: bool
    progress: bool = False


@dataclass
class ExpertsReport:
    """Where the experts are, and what this run did about them."""

    folder: str
    num: int
    trained: int
    seconds: float
    source: str = "cache"  # cache | mtt buffers (experts.path)
    # what training these experts took, whichever run trained them (None: MTT's buffers, or
    # files that predate the record)
    training_seconds: float | None = None

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def expert_augment(recipe: ExpertsRecipe) -> augment_mod.Augment | None:
    """DSA per image on every batch (MTT's buffer.py), with the run's strategy and the dataset's
    flip rule; none when experts.augment is false."""
    if not recipe.experts.augment:
        return None
    dsa = augment_mod.for_dataset(replace(recipe.augment, name="dsa"), recipe.allow_flip)
    return augment_mod.training_augment(dsa)


def experts_cache(recipe: ExpertsRecipe, data: Dataset, compute: Compute) -> ExpertCache:
    """The cache folder of this recipe's experts (keyed by what shapes them)."""
    dataset = {"name": data.name, "mean": data.mean, "std": data.std, "transform": data.transform}
    if data.split is not None:  # digits: another split trains on other images (others' keys unchanged)
        dataset["split"] = data.split
    # DSA's ops and strengths shape the experts; its name (they take DSA whatever the run's) and
    # the evaluation's epochs do not
    dsa = {k: v for k, v in asdict(recipe.augment).items() if k not in ("name", "eval_epochs")}
    augment = dsa | {"allow_flip": recipe.allow_flip}
    precision = compute.precisions().get("inner", "fp32")
    key = expert_key(recipe.experts, dataset, asdict(recipe.network), augment, precision)
    return ExpertCache.at(recipe.experts.root, key)


def train_experts(
    recipe: ExpertsRecipe, data: Dataset, compute: Compute
) -> tuple[ExpertCache, ExpertsReport]:
    """Train the experts the cache lacks, each stored as soon as it is done (a killed run resumes
    at the expert it was on); says what it found and did."""
    started = time.perf_counter()
    cache = experts_cache(recipe, data, compute)
    cfg, device = recipe.experts, compute.device
    wanted = range(cfg.num) if cfg.index is None else [cfg.index]  # one job of a job array
    missing = [i for i in wanted if i in cache.missing(cfg.num)]
    found = len(wanted) - len(missing)
    if not missing:
        print(f"experts: all {len(wanted)} found in {cache.folder}: training none")
    else:
        print(f"experts: {found} of {len(wanted)} found in {cache.folder}: training {len(missing)}")

    def build(seed: int) -> nn.Module:
        return build_network(recipe.network, data.image_shape, data.num_classes, seed, device)

    images, labels = data.train.images.to(device), data.train.labels.to(device)
    augment, autocast = expert_augment(recipe), compute.autocaster("inner")
    for index in tqdm(missing, desc="experts", disable=not recipe.progress, leave=False):
        began = time.perf_counter()
        trajectory = train_trajectory(build, images, labels, cfg, index, augment, autocast)
        cache.store(index, trajectory, time.perf_counter() - began)
    seconds = time.perf_counter() - started
    # one job of an array: the others may still be training
    training = cache.training_seconds(cfg.num) if cfg.index is None else None
    return cache, ExpertsReport(str(cache.folder), cfg.num, len(missing), seconds, training_seconds=training)


def experts_for_run(
    recipe: ExpertsRecipe, data: Dataset, compute: Compute
) -> tuple[ExpertSource, ExpertsReport]:
    """The experts a distillation draws from: MTT's buffer files when experts.path names them
    (nothing trained), else the cache, trained where it lacks any."""
    path = recipe.experts.path
    if path is None:
        return train_experts(recipe, data, compute)
    started = time.perf_counter()
    net = build_network(recipe.network, data.image_shape, data.num_classes, 0, compute.device)
    buffers = MttBuffers.load(path, [p.shape for p in net.parameters()], recipe.experts.num)
    print(f"experts: {buffers.num} trajectories of {buffers.epochs} epochs from MTT's buffers in {path}")
    return buffers, ExpertsReport(str(path), buffers.num, 0, time.perf_counter() - started, "mtt buffers")
