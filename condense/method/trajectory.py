"""Trajectory matching (MTT, Cazenavette et al. 2022): the synthetic set should move a network
from an expert's epoch-t weights to where the expert stood `expert_epochs` epochs later.

From the expert's weights at epoch t the student takes `syn_steps` differentiable SGD steps on
the synthetic set (torch.func.functional_call on one parameter vector, no copied modules), step
size the learnable `syn_lr`; the loss is ||w_N - w*_{t+M}||^2 / ||w*_t - w*_{t+M}||^2, which
back-propagates into the images and into syn_lr.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from condense.primitives.augment import Augment
from condense.primitives.compute import Autocast
from condense.schema import ConfigError, MatchingConfig


@dataclass(frozen=True)
class ParameterLayout:
    """How a flat weight vector maps onto a network's named parameters (in parameters() order,
    the order expert trajectories are flattened in)."""

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]

    @classmethod
    def of(cls, net: nn.Module) -> ParameterLayout:
        named = list(net.named_parameters())
        return cls(tuple(n for n, _ in named), tuple(p.shape for _, p in named))

    @property
    def size(self) -> int:
        return sum(s.numel() for s in self.shapes)

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        parts = torch.split(flat, [s.numel() for s in self.shapes])
        return {n: p.view(s) for n, p, s in zip(self.names, parts, self.shapes, strict=True)}


def student_batches(n: int, batch: int | None, steps: int, gen: torch.Generator) -> list[torch.Tensor]:
    """Each step's synthetic indices: shuffled passes over the set cut into `batch`-sized pieces
    (MTT's indices_chunks), a new pass whenever one runs out; None: the whole set every step."""
    size = n if batch is None else min(batch, n)
    chunks: list[torch.Tensor] = []
    while len(chunks) < steps:
        chunks.extend(torch.split(torch.randperm(n, generator=gen), size))
    return chunks[:steps]


def trajectory_loss(
    net: nn.Module,
    layout: ParameterLayout,
    start: torch.Tensor,
    target: torch.Tensor,
    images: torch.Tensor,
    labels: torch.Tensor,
    syn_lr: torch.Tensor,
    batches: list[torch.Tensor],
    augment: Augment | None = None,
    augment_seeds: list[int] | None = None,
    autocast: Autocast = nullcontext,
) -> torch.Tensor:
    """MTT's normalised parameter distance after len(batches) differentiable SGD steps from
    `start` (flat weights) on the synthetic `images`, each step on its batch of indices."""
    weights = start.detach().clone().requires_grad_(True)
    w = weights
    for step, idx in enumerate(batches):
        x, y = images[idx], labels[idx]
        if augment is not None and augment_seeds is not None:
            x = augment(x, augment_seeds[step])
        with autocast():
            logits = functional_call(net, layout.unflatten(w), (x,))
            ce = F.cross_entropy(logits.float(), y)
        (grad,) = torch.autograd.grad(ce, w, create_graph=True)
        w = w - syn_lr * grad
    target, start = target.detach(), start.detach()
    return ((w - target) ** 2).sum() / ((start - target) ** 2).sum()


def run_ema_decay(cfg: MatchingConfig, iterations: int) -> float:
    """The decay this run's moving average uses: ema_decay, or, when ema_decay_iterations names the
    run length it was chosen for, rescaled to this run's so that the weight left on the initial
    images after the run is the same: decay ** (chosen / iterations)."""
    if cfg.ema_decay_iterations is None or cfg.ema_decay == 0:
        return cfg.ema_decay
    return cfg.ema_decay ** (cfg.ema_decay_iterations / iterations)


def ema_update(ema: torch.Tensor, images: torch.Tensor, decay: float) -> None:
    """FTD's moving average of the images, in place: ema <- decay ema + (1 - decay) images."""
    with torch.no_grad():
        ema.mul_(decay).add_(images.detach(), alpha=1 - decay)


def draw_segment(num: int, max_start: int, gen: torch.Generator) -> tuple[int, int]:
    """An expert and a start epoch, uniform (MTT: t ~ U[0, max_start_epoch))."""
    expert = int(torch.randint(num, (1,), generator=gen))
    return expert, int(torch.randint(max_start, (1,), generator=gen))


def step_size_problem(syn_lr: torch.Tensor, it: int, lr_lr: float) -> str | None:
    """MTT's users meet a step size driven to zero, below or to NaN (its issues 6, 16, 20, 42):
    the message that stops the run then, else None."""
    value = float(syn_lr.detach())
    if value > 0 and value < float("inf"):
        return None
    return (
        f"iteration {it}: the learnable step size syn_lr became {value}; matching.lr_lr={lr_lr} is "
        "probably too large (lower it, e.g. matching.lr_lr=1e-6)"
    )


def validate_trajectory(cfg: MatchingConfig, step_policy: str, experts_epochs: int) -> None:
    checks: tuple[tuple[bool, str], ...] = (
        (cfg.syn_steps >= 1, f"matching.syn_steps={cfg.syn_steps}: use >= 1 student steps"),
        (cfg.expert_epochs >= 1, f"matching.expert_epochs={cfg.expert_epochs}: use >= 1"),
        (cfg.max_start_epoch >= 1, f"matching.max_start_epoch={cfg.max_start_epoch}: use >= 1"),
        (
            cfg.max_start_epoch + cfg.expert_epochs <= experts_epochs + 1,
            f"matching.max_start_epoch={cfg.max_start_epoch} + matching.expert_epochs={cfg.expert_epochs} "
            f"reach past the experts' {experts_epochs} epochs: lower them or raise experts.epochs",
        ),
        (
            cfg.batch_syn is None or cfg.batch_syn >= 1,
            f"matching.batch_syn={cfg.batch_syn}: use >= 1, or null for the whole set",
        ),
        (cfg.syn_lr_init > 0, f"matching.syn_lr_init={cfg.syn_lr_init}: the step size must start > 0"),
        (cfg.lr_lr >= 0, f"matching.lr_lr={cfg.lr_lr}: use >= 0 (0 keeps the step size fixed)"),
        (0 <= cfg.ema_decay < 1, f"matching.ema_decay={cfg.ema_decay}: use a decay in [0, 1) (0: off)"),
        (
            cfg.ema_decay_iterations is None or cfg.ema_decay_iterations >= 1,
            f"matching.ema_decay_iterations={cfg.ema_decay_iterations}: use >= 1, or null to keep ema_decay",
        ),
        (
            step_policy == "single_step",
            f"step_policy={step_policy}: matching=trajectory has no inner loop; use step_policy=single_step",
        ),
    )
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
