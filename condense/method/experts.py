"""Expert trajectories for trajectory matching (MTT's buffer.py, FTD's GSAM experts).

An expert is a network of the run's architecture trained on the real training set; its
trajectory is its flattened weights before training and after every epoch, (epochs + 1, P).
Expert i draws its initial weights, batch order and augmentation from streams named by (seed,
"expert...", i), so any expert can be trained alone, in any order, and comes out the same.

Trained trajectories live in a cache keyed by everything that shapes them (`expert_key`), one
safetensors file per expert, written atomically: a killed experts stage resumes at the expert it
was on, and a second run with the same key trains nothing.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.nn.utils import parameters_to_vector

from condense.primitives.augment import Augment
from condense.primitives.compute import Autocast
from condense.primitives.files import atomic_write
from condense.primitives.seeding import derive_seed, generator
from condense.schema import ConfigError, ExpertsConfig, require_choice

EXPERT_FORMAT = "condense.expert/1"
OPTIMIZERS = ("sgd", "gsam")
# The settings of ExpertsConfig that say how many experts there are or where they are kept,
# not how any one of them is trained: left out of the cache key.
NOT_SHAPING = ("num", "root", "path", "index")


def gsam_direction(
    grads: list[torch.Tensor], perturbed: list[torch.Tensor], alpha: float
) -> list[torch.Tensor]:
    """GSAM's update direction: the gradient at the perturbed weights, less alpha times the part
    of the plain gradient orthogonal to it (the surrogate gap's descent direction)."""
    g = torch.cat([t.reshape(-1) for t in grads])
    gp = torch.cat([t.reshape(-1) for t in perturbed])
    parallel = (g @ gp) / (gp @ gp).clamp_min(1e-24) * gp
    direction = gp - alpha * (g - parallel)
    parts = torch.split(direction, [t.numel() for t in grads])
    return [part.view_as(t) for part, t in zip(parts, grads, strict=True)]


def gsam_step(
    net: nn.Module,
    opt: torch.optim.Optimizer,
    loss_at: Callable[[], torch.Tensor],
    cfg: ExpertsConfig,
) -> torch.Tensor:
    """One GSAM step (two gradient passes): the gradient g; the weights moved by rho g / ||g||
    (adaptive: by rho w^2 g / ||w g||); the gradient there; back to the weights; the SGD step
    along gsam_direction. rho = 0 is a plain SGD step."""
    params = [p for p in net.parameters() if p.requires_grad]
    loss = loss_at()
    grads = torch.autograd.grad(loss, params)
    with torch.no_grad():
        scale = [p.abs() if cfg.adaptive else torch.ones_like(p) for p in params]
        norm = torch.cat([(s * g).reshape(-1) for s, g in zip(scale, grads, strict=True)]).norm()
        moves = [cfg.rho * s * s * g / norm.clamp_min(1e-12) for s, g in zip(scale, grads, strict=True)]
        for p, e in zip(params, moves, strict=True):
            p.add_(e)
    perturbed = torch.autograd.grad(loss_at(), params)
    with torch.no_grad():
        for p, e in zip(params, moves, strict=True):
            p.sub_(e)
        for p, d in zip(params, gsam_direction(list(grads), list(perturbed), cfg.alpha), strict=True):
            p.grad = d
    opt.step()
    return loss.detach()


def train_trajectory(
    build: Callable[[int], nn.Module],
    images: torch.Tensor,
    labels: torch.Tensor,
    cfg: ExpertsConfig,
    index: int,
    augment: Augment | None,
    autocast: Autocast = nullcontext,
) -> torch.Tensor:
    """Expert `index`'s trajectory: (epochs + 1, P) flattened weights, before training and after
    every epoch of SGD (or GSAM) on the real set, DSA per image when `augment`."""
    seed = cfg.seed
    net = build(derive_seed(seed, "expert", index))
    opt = torch.optim.SGD(net.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    order, augment_gen = generator(seed, "expert_order", index), generator(seed, "expert_augment", index)
    snapshots = [parameters_to_vector(net.parameters()).detach().cpu()]
    net.train()
    for _ in range(cfg.epochs):
        perm = torch.randperm(len(images), generator=order).to(images.device)
        for start in range(0, len(images), cfg.batch):
            idx = perm[start : start + cfg.batch]
            x, y = images[idx], labels[idx]
            if augment is not None:
                x = augment(x, int(torch.randint(0, 2**31 - 1, (1,), generator=augment_gen)))

            def loss_at(x: torch.Tensor = x, y: torch.Tensor = y) -> torch.Tensor:
                with autocast():
                    return F.cross_entropy(net(x), y)

            if cfg.name == "gsam":
                gsam_step(net, opt, loss_at, cfg)
            else:
                opt.zero_grad(set_to_none=True)
                loss_at().backward()
                opt.step()
        snapshots.append(parameters_to_vector(net.parameters()).detach().cpu())
    return torch.stack(snapshots)


def expert_key(
    cfg: ExpertsConfig,
    dataset: dict[str, Any],
    network: dict[str, Any],
    augment: dict[str, Any],
    precision: str,
) -> dict[str, Any]:
    """Everything that shapes a trajectory: the data and its transform, the network, the
    optimizer and its values, the augmentation (when on), the arithmetic and experts.seed."""
    training = {k: v for k, v in asdict(cfg).items() if k not in NOT_SHAPING}
    data = {k: v for k, v in dataset.items() if k not in ("root", "download")}
    return {
        "format": EXPERT_FORMAT,
        "dataset": data,
        "network": network,
        "experts": training,
        "augment": augment if cfg.augment else None,
        "precision": precision,
    }


def key_digest(key: dict[str, Any]) -> str:
    return hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class ExpertCache:
    """One folder per key under the cache root: expert_<i>.safetensors, and key.json saying what
    made them (readable by a person; the folder name is its digest)."""

    folder: Path
    key: dict[str, Any]

    @classmethod
    def at(cls, root: str | Path, key: dict[str, Any]) -> ExpertCache:
        return cls(Path(root).expanduser() / key_digest(key), key)

    def path(self, index: int) -> Path:
        return self.folder / f"expert_{index}.safetensors"

    def missing(self, num: int) -> list[int]:
        return [i for i in range(num) if not self.path(i).exists()]

    def store(self, index: int, trajectory: torch.Tensor, seconds: float) -> None:
        """Keep one expert, with the seconds its training took (a later run that finds it still
        knows what the experts cost)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        key_file = self.folder / "key.json"
        if not key_file.exists():
            text = json.dumps(self.key, indent=1, sort_keys=True, default=str)
            atomic_write(key_file, lambda tmp: tmp.write_text(text))
        digest, took = key_digest(self.key), f"{seconds:.3f}"
        meta = {"format": EXPERT_FORMAT, "index": str(index), "key": digest, "seconds": took}
        atomic_write(
            self.path(index), lambda tmp: save_file({"trajectory": trajectory.contiguous()}, str(tmp), meta)
        )

    @property
    def epochs(self) -> int:
        return int(self.key["experts"]["epochs"])

    def training_seconds(self, num: int) -> float | None:
        """What training the first `num` experts took, as each file records it; None when any
        file predates that record."""
        total = 0.0
        for index in range(num):
            with safe_open(str(self.path(index)), framework="pt") as f:
                seconds = (f.metadata() or {}).get("seconds")
            if seconds is None:
                return None
            total += float(seconds)
        return total

    def load(self, index: int) -> torch.Tensor:
        with safe_open(str(self.path(index)), framework="pt") as f:
            return f.get_tensor("trajectory")

    def snapshot(self, index: int, epoch: int) -> torch.Tensor:
        """One epoch's weights of one expert, read alone (a trajectory is (epochs + 1) x P)."""
        with safe_open(str(self.path(index)), framework="pt") as f:
            return f.get_slice("trajectory")[epoch : epoch + 1][0]


class ExpertSource(Protocol):
    """Where distillation reads expert weights: the cache, or MTT's own buffer files."""

    @property
    def epochs(self) -> int: ...

    def snapshot(self, index: int, epoch: int) -> torch.Tensor: ...


@dataclass(frozen=True)
class MttBuffers:
    """Experts from MTT's buffer.py files (replay_buffer_<n>.pt: a list of trajectories, each a
    list of per-epoch lists of parameter tensors in parameters() order), loaded weights_only and
    flattened to (epochs + 1, P) per expert."""

    trajectories: tuple[torch.Tensor, ...]

    @classmethod
    def load(cls, folder: str | Path, shapes: list[torch.Size], limit: int) -> MttBuffers:
        files = sorted(Path(folder).expanduser().glob("replay_buffer_*.pt"), key=buffer_number)
        if not files:
            raise ConfigError(f"experts.path={folder}: no replay_buffer_<n>.pt files there (MTT's buffer.py)")
        trajectories: list[torch.Tensor] = []
        for file in files:
            for trajectory in torch.load(file, map_location="cpu", weights_only=True):
                trajectories.append(flatten_mtt_trajectory(trajectory, shapes, file))
                if len(trajectories) == limit:
                    return cls(tuple(trajectories))
        return cls(tuple(trajectories))

    @property
    def num(self) -> int:
        return len(self.trajectories)

    @property
    def epochs(self) -> int:
        return min(len(t) for t in self.trajectories) - 1

    def snapshot(self, index: int, epoch: int) -> torch.Tensor:
        return self.trajectories[index][epoch]


def buffer_number(path: Path) -> int:
    digits = path.stem.removeprefix("replay_buffer_")
    return int(digits) if digits.isdigit() else -1


def flatten_mtt_trajectory(
    trajectory: list[list[torch.Tensor]], shapes: list[torch.Size], file: Path
) -> torch.Tensor:
    """One MTT trajectory as (epochs + 1, P), refused in one line when its parameter shapes do
    not fit the run's network (the files do not name their dataset or network)."""
    found = [tuple(p.shape) for p in trajectory[0]]
    if found != [tuple(s) for s in shapes]:
        raise ConfigError(
            f"experts.path: {file.name}'s parameters {found[:3]}... ({len(found)} tensors) do not fit the "
            f"run's network {[tuple(s) for s in shapes][:3]}... ({len(shapes)}): pick the buffers of this "
            "dataset and network"
        )
    return torch.stack([torch.cat([p.reshape(-1).float() for p in epoch]) for epoch in trajectory])


def validate_experts(cfg: ExpertsConfig, stage: str) -> None:
    require_choice(cfg.name, OPTIMIZERS, "experts")
    if cfg.index is not None and (stage != "experts" or not 0 <= cfg.index < cfg.num):
        raise ConfigError(
            f"experts.index={cfg.index}: trains one expert with stage=experts, index in 0..experts.num-1 "
            f"(experts.num={cfg.num}); sweep it (-m experts.index=range(0,{cfg.num})) for a job array"
        )
    checks = (
        (cfg.num >= 1, f"experts.num={cfg.num}: use >= 1 expert trajectories"),
        (cfg.epochs >= 1, f"experts.epochs={cfg.epochs}: use >= 1 epochs per expert"),
        (cfg.batch >= 1, f"experts.batch={cfg.batch}: use >= 1"),
        (cfg.lr > 0, f"experts.lr={cfg.lr}: a learning rate must be > 0 (MTT: 0.01)"),
        (cfg.rho >= 0 and cfg.alpha >= 0, f"experts.rho={cfg.rho}, alpha={cfg.alpha}: use values >= 0"),
    )
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
