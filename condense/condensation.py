"""The condense stage: DC's loop (shared/method.md), with the matching level, the distance and the
step policy as choices.

    for it in iterations:                        fresh network, fresh SGD
        for ol in outer_loop:
            (BatchNorm: set statistics on real images, then freeze them)
            loss = matching level over the classes  -> one SGD step on the synthetic images
            last ol: stop
            train the network on the detached synthetic set for the step policy's epochs
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from condense import augment as augment_mod
from condense.config import RunConfig, to_container
from condense.dataset import Dataset, Split
from condense.distance import matched_parameters
from condense.init import initial_images
from condense.matching import MatchStep, PassCounter, matching_loss
from condense.network import build_network, freeze_batchnorm, has_batchnorm
from condense.seeding import derive_seed, generator
from condense.step_policy import LossRiseMonitor, max_inner_epochs, outer_loop, stops_on_rise
from condense.synthetic import SyntheticSet
from condense.training import mean_loss, train_epoch


@dataclass
class CondenseStats:
    """What the stage spent: counts of passes and epochs, and the per-iteration history."""

    inner_epochs: int = 0
    inner_steps: int = 0
    image_updates: int = 0
    passes: PassCounter = field(default_factory=PassCounter)
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k not in ("history", "passes")}
        out.update({f"grad_{k}": v for k, v in asdict(self.passes).items()})
        return out


class RealSampler:
    """Fresh random real batches per class (without replacement inside a batch)."""

    def __init__(self, train: Split, num_classes: int, device: torch.device) -> None:
        self.images = train.images.to(device)
        self.labels = train.labels.to(device)
        self.by_class = [idx.to(device) for idx in train.indices_by_class(num_classes)]

    def of_class(self, c: int, n: int, gen: torch.Generator) -> torch.Tensor:
        idx = self.by_class[c]
        pick = torch.randperm(len(idx), generator=gen)[:n].to(idx.device)
        return self.images[idx[pick]]

    def mixed(self, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        pick = torch.randperm(len(self.images), generator=gen)[:n].to(self.images.device)
        return self.images[pick], self.labels[pick]


@torch.no_grad()
def set_batchnorm_statistics(
    net: nn.Module, real: RealSampler, per_class: int, num_classes: int, gen: torch.Generator
) -> None:
    """DC's BatchNorm rule: a train-mode pass over a few real images per class, then freeze."""
    net.train()
    net(torch.cat([real.of_class(c, per_class, gen) for c in range(num_classes)]))
    freeze_batchnorm(net)


def train_inner(
    net: nn.Module,
    opt: torch.optim.Optimizer,
    images: torch.Tensor,
    labels: torch.Tensor,
    epochs: int,
    cfg: RunConfig,
    gen: torch.Generator,
    monitor: tuple[torch.Tensor, torch.Tensor] | None,
    augment: Callable[[torch.Tensor, int], torch.Tensor] | None,
) -> tuple[int, int]:
    """Train on the synthetic set for up to `epochs`; with a monitor batch, stop the first time
    its loss rises. Returns (epochs run, SGD steps)."""
    watcher = LossRiseMonitor(mean_loss(net, *monitor)) if monitor is not None else None
    steps = 0
    for epoch in range(epochs):
        steps += train_epoch(net, opt, images, labels, cfg.batch_train, gen, augment)
        if watcher is not None and watcher.rose(mean_loss(net, *monitor)):  # type: ignore[misc]
            return epoch + 1, steps
    return epochs, steps


IterationHook = Callable[[int, dict[str, float], torch.Tensor], None]


def condense(
    cfg: RunConfig, data: Dataset, device: torch.device, on_iteration: IterationHook | None = None
) -> tuple[SyntheticSet, CondenseStats]:
    """Learn `ipc` synthetic images per class by gradient matching."""
    C, shape = data.num_classes, data.image_shape
    images = initial_images(cfg.init.name, data.train, C, cfg.ipc, generator(cfg.seed, "init"))
    images = images.to(device).requires_grad_(True)
    labels = torch.arange(C, device=device).repeat_interleave(cfg.ipc)
    opt_img = torch.optim.SGD([images], lr=cfg.lr_img, momentum=cfg.momentum_img)
    real = RealSampler(data.train, C, device)
    aug_cfg = augment_mod.for_dataset(cfg.augment, cfg.dataset.allow_flip)
    siamese = augment_mod.siamese_augment(aug_cfg)
    inner_aug = augment_mod.training_augment(aug_cfg)
    outer = outer_loop(cfg.step_policy, cfg.ipc)
    stats = CondenseStats()
    start = time.perf_counter()
    bar = tqdm(range(cfg.iterations), desc="condense", disable=not cfg.progress, leave=False)
    for it in bar:
        t0 = time.perf_counter()
        net = build_network(cfg.network, shape, C, derive_seed(cfg.seed, "net", it), device)
        opt_net = torch.optim.SGD(net.parameters(), lr=cfg.lr_net, momentum=cfg.momentum_net)
        params = matched_parameters(net, cfg.distance)
        gen = generator(cfg.seed, "real", it)
        batchnorm = has_batchnorm(net)
        monitor = real.mixed(cfg.step_policy.monitor_batch, gen) if stops_on_rise(cfg.step_policy) else None
        losses, epochs_this_iter = [], 0
        for ol in range(outer):
            if batchnorm:
                set_batchnorm_statistics(net, real, cfg.bn_real_per_class, C, gen)
            step = MatchStep(
                net=net,
                params=params,
                syn_images=images,
                ipc=cfg.ipc,
                num_classes=C,
                real_by_class=lambda c, g=gen: real.of_class(c, cfg.batch_real, g),
                real_mixed=lambda g=gen: real.mixed(cfg.matching.inter_batch_factor * cfg.batch_real, g),
                distance=cfg.distance,
                iteration=it,
                generator=gen,
                augment=siamese,
                counter=stats.passes,
            )
            loss = matching_loss(step, cfg.matching)
            opt_img.zero_grad(set_to_none=True)
            loss.backward()
            opt_img.step()
            stats.image_updates += 1
            losses.append(float(loss.detach()))
            if ol == outer - 1:
                break
            epochs, steps = train_inner(
                net,
                opt_net,
                images.detach(),
                labels,
                max_inner_epochs(cfg.step_policy, cfg.ipc, ol),
                cfg,
                gen,
                monitor,
                inner_aug,
            )
            epochs_this_iter += epochs
            stats.inner_steps += steps
        stats.inner_epochs += epochs_this_iter
        record = {
            "iteration": it,
            "match_loss": sum(losses) / len(losses),
            "inner_epochs": epochs_this_iter,
            "seconds": time.perf_counter() - t0,
            "lr_img": opt_img.param_groups[0]["lr"],
            "lr_net": cfg.lr_net,
        }
        stats.history.append(record)
        bar.set_postfix(loss=f"{record['match_loss']:.3f}")
        if on_iteration is not None:
            on_iteration(it, record, images.detach())
    stats.seconds = time.perf_counter() - start
    syn = SyntheticSet(images.detach().cpu(), labels.cpu(), data.name, data.mean, data.std, to_container(cfg))
    return syn, stats
