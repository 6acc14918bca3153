"""Training a network on a tensor dataset and testing it: shared by the condense stage's inner
loop and the evaluation stage."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from condense.primitives.augment import Augment
from condense.primitives.compute import Autocast

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def train_epoch(
    net: nn.Module,
    opt: torch.optim.Optimizer,
    images: torch.Tensor,
    labels: torch.Tensor,
    batch: int,
    gen: torch.Generator,
    augment: Augment | None = None,
    autocast: Autocast = nullcontext,
    augment_gen: torch.Generator | None = None,
    observe: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
    loss_fn: LossFn = F.cross_entropy,
) -> int:
    """One shuffled pass with `loss_fn(logits, labels[batch])` (cross-entropy; soft-labelled sets
    pass their own); returns the number of SGD steps taken. The batch order comes from `gen`,
    augmentation seeds from their own `augment_gen`, so turning augmentation on does not change
    which images share a batch. `observe(indices, logits)` sees each batch's predictions (the
    forgetting coreset counts forgetting events with it)."""
    if augment is not None and augment_gen is None:
        raise ValueError("train_epoch: an augmentation needs its own generator (augment_gen)")
    net.train()
    order = torch.randperm(len(images), generator=gen).to(images.device)
    steps = 0
    for start in range(0, len(images), batch):
        idx = order[start : start + batch]
        x = images[idx]
        if augment is not None:
            x = augment(x, int(torch.randint(0, 2**31 - 1, (1,), generator=augment_gen)))
        with autocast():  # forward and loss only: backward and the step run outside
            logits = net(x)
            loss = loss_fn(logits, labels[idx])
        if observe is not None:
            observe(idx, logits.detach())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        steps += 1
    return steps


@torch.no_grad()
def mean_loss(
    net: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    autocast: Autocast = nullcontext,
    train_mode: bool = False,
) -> float:
    """Cross-entropy of one batch (the overfitting monitor), in eval mode or in train mode."""
    was_training = net.training
    net.train(train_mode)
    with autocast():
        loss = float(F.cross_entropy(net(images), labels))
    net.train(was_training)
    return loss


@torch.no_grad()
def accuracy(
    net: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch: int, autocast: Autocast = nullcontext
) -> float:
    net.eval()
    device = next(net.parameters()).device
    correct = 0
    for start in range(0, len(images), batch):
        x = images[start : start + batch].to(device)
        with autocast():
            predicted = net(x).argmax(dim=1)
        correct += int((predicted == labels[start : start + batch].to(device)).sum())
    return correct / max(len(images), 1)
