"""Coreset baselines: real images chosen per class, evaluated exactly like a synthetic set.

- random: `ipc` random real images per class.
- herding: greedy mean matching in a network's feature space (each pick brings the running mean
  of the chosen features closest to the class mean).
- kcenter: greedy k-center cover in feature space, starting from the image nearest the class mean.
- forgetting: the images most often forgotten while a network trains on the whole training set
  (Toneva et al., 2019), never-learned images first.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from condense.method.init import sample_per_class
from condense.primitives.dataset import Dataset, Split
from condense.primitives.network import build_network
from condense.primitives.seeding import derive_seed, generator
from condense.primitives.synthetic import SyntheticSet
from condense.primitives.training import train_epoch
from condense.schema import ConfigError, CoresetConfig, NetworkConfig, require_choice

# One stream for the random subset, whether it is the run's own set (coreset=random) or the
# baseline evaluated beside another set: every run with a seed compares to the very same subset.
RANDOM_SUBSET = "random_subset"


@dataclass(frozen=True)
class FeatureTraining:
    """The network herding, k-center and forgetting look through: the run's network, trained
    `epochs` epochs on the whole real training set in batches of `batch`, its draws from `seed`."""

    network: NetworkConfig
    epochs: int
    batch: int
    seed: int


def herding_order(features: torch.Tensor, k: int) -> list[int]:
    """Indices picked greedily so the mean of the picks tracks the mean of all features."""
    target = features.mean(dim=0)
    chosen: list[int] = []
    total = torch.zeros_like(target)
    available = torch.ones(len(features), dtype=torch.bool)
    for step in range(1, k + 1):
        gaps = ((total.unsqueeze(0) + features) / step - target).norm(dim=1)
        gaps[~available] = float("inf")
        pick = int(gaps.argmin())
        chosen.append(pick)
        available[pick] = False
        total += features[pick]
    return chosen


def kcenter_order(features: torch.Tensor, k: int) -> list[int]:
    """Greedy k-center: repeatedly add the point farthest from everything chosen so far."""
    first = int((features - features.mean(dim=0)).norm(dim=1).argmin())
    chosen = [first]
    nearest = (features - features[first]).norm(dim=1)
    for _ in range(k - 1):
        pick = int(nearest.argmax())
        chosen.append(pick)
        nearest = torch.minimum(nearest, (features - features[pick]).norm(dim=1))
    return chosen


SELECTORS: dict[str, Callable[[torch.Tensor, int], list[int]]] = {
    "herding": herding_order,
    "kcenter": kcenter_order,
}
# Coresets that rank examples by how training on the whole set treats them, not by features.
RANKERS = ("forgetting",)


class ForgettingEvents:
    """Toneva et al. (2019): an example is forgotten when a minibatch finds it misclassified
    after the previous one had it right. Counts events per example while a network trains on
    the whole training set; an example never classified correctly counts as forgotten most."""

    def __init__(self, labels: torch.Tensor) -> None:
        self.labels = labels
        self.correct = torch.zeros(len(labels), dtype=torch.bool, device=labels.device)
        self.learned = torch.zeros_like(self.correct)
        self.events = torch.zeros(len(labels), dtype=torch.long, device=labels.device)

    def __call__(self, idx: torch.Tensor, logits: torch.Tensor) -> None:
        now = logits.argmax(dim=1) == self.labels[idx]
        self.events[idx] += (self.correct[idx] & ~now).long()
        self.correct[idx] = now
        self.learned[idx] |= now

    def scores(self) -> torch.Tensor:
        return torch.where(self.learned, self.events.double(), torch.inf).cpu()


def forgetting_scores(features: FeatureTraining, data: Dataset, device: torch.device) -> torch.Tensor:
    """Forgetting events per training image while the run's network trains on the whole set."""
    events = ForgettingEvents(data.train.labels.to(device))
    feature_network(features, data, device, observe=events)
    return events.scores()


def most_forgotten(
    scores: torch.Tensor, train: Split, num_classes: int, ipc: int, gen: torch.Generator
) -> torch.Tensor:
    """Per class, the `ipc` images forgotten most often (ties in a random order from `gen`)."""
    chosen = []
    for idx in train.indices_by_class(num_classes):
        if len(idx) < ipc:
            raise ConfigError(f"ipc={ipc} exceeds the {len(idx)} training images of a class: lower ipc")
        shuffled = idx[torch.randperm(len(idx), generator=gen)]
        order = torch.sort(scores[shuffled], descending=True, stable=True).indices
        chosen.append(shuffled[order[:ipc]])
    return torch.cat(chosen)


@torch.no_grad()
def embed(net: nn.Module, images: torch.Tensor, batch: int = 1024) -> torch.Tensor:
    net.eval()
    device = next(net.parameters()).device
    return torch.cat(
        [net.embed(images[i : i + batch].to(device)).cpu() for i in range(0, len(images), batch)]
    )


def select_coreset(
    name: str,
    train: Split,
    num_classes: int,
    ipc: int,
    gen: torch.Generator,
    feature_net: nn.Module | None,
) -> torch.Tensor:
    """Indices (class-major) of the real images that form the coreset."""
    if name == "random":
        return sample_per_class(train, num_classes, ipc, gen)
    assert feature_net is not None
    chosen = []
    for idx in train.indices_by_class(num_classes):
        if len(idx) < ipc:
            raise ConfigError(f"ipc={ipc} exceeds the {len(idx)} training images of a class: lower ipc")
        features = embed(feature_net, train.images[idx])
        chosen.append(idx[SELECTORS[name](features, ipc)])
    return torch.cat(chosen)


def feature_network(
    features: FeatureTraining,
    data: Dataset,
    device: torch.device,
    observe: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
) -> nn.Module:
    """The feature network trained on the whole real training set (SGD 0.01, momentum 0.9): the
    feature space herding and k-center pick in, and the training whose predictions `observe`
    sees (the forgetting coreset)."""
    seed = features.seed
    net = build_network(
        features.network, data.image_shape, data.num_classes, derive_seed(seed, "feature_net"), device
    )
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    gen = generator(seed, "feature_train")
    images, labels = data.train.images.to(device), data.train.labels.to(device)
    for _ in range(features.epochs):
        train_epoch(net, opt, images, labels, features.batch, gen, observe=observe)
    return net


def coreset_set(
    name: str, ipc: int, features: FeatureTraining, data: Dataset, device: torch.device
) -> SyntheticSet:
    """The coreset NAME (random, herding, kcenter, forgetting) of `ipc` images per class, packed as
    a set (its config is the caller's to record); random draws from RANDOM_SUBSET of the seed,
    whatever the run's own choices are."""
    stream = generator(features.seed, RANDOM_SUBSET)
    if name in RANKERS:
        scores = forgetting_scores(features, data, device)
        idx = most_forgotten(scores, data.train, data.num_classes, ipc, stream)
    else:
        feature_net = None if name == "random" else feature_network(features, data, device)
        idx = select_coreset(name, data.train, data.num_classes, ipc, stream, feature_net)
    images, labels = data.train.images[idx].clone(), data.train.labels[idx].clone()
    return SyntheticSet(images, labels, data.name, data.mean, data.std, transform=data.transform)


def validate_coreset(cfg: CoresetConfig) -> None:
    require_choice(cfg.name, ("none", "random", *SELECTORS, *RANKERS), "coreset")
    if cfg.feature_epochs < 0:
        raise ConfigError(f"coreset.feature_epochs={cfg.feature_epochs}: use >= 0 (0 = an untrained network)")
