"""The evaluation stage: DC's protocol. Fresh randomly initialised models of every architecture in
the pool train on the set alone (SGD, momentum, weight decay, learning rate x0.1 at half way) and
are tested once, at the end, on the full test set."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from condense.compute import Compute
from condense.config import EvaluationConfig, NetworkConfig
from condense.dataset import Dataset
from condense.network import build_network
from condense.seeding import derive_seed
from condense.training import Augment, accuracy, train_epoch


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
        return {
            "accuracies": self.accuracies,
            "mean": self.mean,
            "std": self.std,
            "seconds": self.seconds,
        }


def train_and_test(
    net_cfg: NetworkConfig,
    images: torch.Tensor,
    labels: torch.Tensor,
    data: Dataset,
    ev: EvaluationConfig,
    seed: int,
    device: torch.device,
    augment: Augment | None,
    compute: Compute,
) -> float:
    """Test accuracy of one fresh model trained on (images, labels) only."""
    net = compute.prepare(build_network(net_cfg, data.image_shape, data.num_classes, seed, device))
    opt = torch.optim.SGD(net.parameters(), lr=ev.lr, momentum=ev.momentum, weight_decay=ev.weight_decay)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[ev.epochs // 2], gamma=0.1)
    gen = torch.Generator().manual_seed(seed)
    images, labels = images.to(device), labels.to(device)
    autocast = compute.autocaster("evaluation")
    for _ in range(ev.epochs):
        train_epoch(net, opt, images, labels, ev.batch_size, gen, augment, autocast)
        sched.step()
    limit = ev.test_images if ev.test_images is not None else len(data.test.images)
    return accuracy(net, data.test.images[:limit], data.test.labels[:limit], ev.test_batch_size, autocast)


def evaluate_set(
    images: torch.Tensor,
    labels: torch.Tensor,
    data: Dataset,
    pool: dict[str, NetworkConfig],
    ev: EvaluationConfig,
    seed: int,
    stream: str,
    device: torch.device,
    augment: Augment | None,
    progress: bool = True,
    compute: Compute | None = None,
) -> dict[str, ArchResult]:
    """`ev.num_models` fresh models per architecture; each model's seed is its own stream, so the
    fast path trains the models of one architecture side by side."""
    compute = compute or Compute(device)
    results: dict[str, ArchResult] = {}
    total = len(pool) * ev.num_models
    bar = tqdm(total=total, desc=f"evaluate {stream}", disable=not progress, leave=False)
    for name, net_cfg in pool.items():
        start = time.perf_counter()

        def one_model(m: int, name: str = name, net_cfg: NetworkConfig = net_cfg) -> float:
            model_seed = derive_seed(seed, stream, name, m)
            acc = train_and_test(net_cfg, images, labels, data, ev, model_seed, device, augment, compute)
            bar.update(1)
            return acc

        accuracies = compute.map(one_model, range(ev.num_models))
        results[name] = ArchResult(accuracies, time.perf_counter() - start)
    bar.close()
    return results
