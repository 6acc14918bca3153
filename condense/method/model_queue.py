"""IDM's queue of partly trained models (Zhao et al., CVPR 2023): distribution matching under
models at many stages of training instead of only freshly initialised ones.

The queue starts with `initial` random models. Every `interval` iterations (iteration 0 included)
one more joins and the oldest leaves beyond `size`. Each iteration matches under `sample` models
drawn from the queue without replacement; afterwards `train` models, drawn again, take `steps`
SGD steps each on random real batches (no augmentation, plain cross-entropy). A model's running
training accuracy feeds the class-aware regulariser.

Every draw comes from its own stream (seed, purpose, iteration) and a model's initialisation
from (seed, "queue", its serial number), so the queue's whole state is the models' weights,
their optimisers' momentum, their accuracy counts and the serial counter: a checkpoint keeps
them and a resumed run continues bitwise.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from condense.primitives.compute import Autocast
from condense.primitives.seeding import derive_seed, generator
from condense.schema import ConfigError, ModelQueueConfig

# (seed) -> a freshly initialised network on the run's device
NetworkBuilder = Callable[[int], nn.Module]
# (n, generator) -> a random mixed real batch (images, labels)
RealBatches = Callable[[int, torch.Generator], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class QueuedModel:
    serial: int  # the queue's serial number of this model: its initialisation stream
    net: nn.Module
    opt: torch.optim.SGD
    seen: int = 0  # real images trained on since the last accuracy reset
    correct: int = 0  # of them, predicted right before the step

    @property
    def accuracy(self) -> float:
        """The running training accuracy as a fraction (0 before any training: a fresh model
        adds no class-aware term, as in IDM)."""
        return self.correct / self.seen if self.seen else 0.0


class ModelQueue:
    def __init__(self, cfg: ModelQueueConfig, build: NetworkBuilder, seed: int) -> None:
        self.cfg, self.build, self.seed = cfg, build, seed
        self.models: list[QueuedModel] = []
        self.made = 0
        for _ in range(cfg.initial):
            self.push()

    def new_model(self, serial: int) -> QueuedModel:
        net = self.build(derive_seed(self.seed, "queue", serial))
        cfg = self.cfg
        opt = torch.optim.SGD(
            net.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
        return QueuedModel(serial, net, opt)

    def push(self) -> None:
        """A fresh model joins; the oldest leaves when the queue is full."""
        if len(self.models) >= self.cfg.size:
            self.models.pop(0)
        self.models.append(self.new_model(self.made))
        self.made += 1

    def advance(self, it: int) -> None:
        """Iteration it's housekeeping, before its matching: accuracy counts restart at every
        multiple of accuracy_reset, and a model joins at every multiple of interval."""
        if it > 0 and it % self.cfg.accuracy_reset == 0:
            for model in self.models:
                model.seen = model.correct = 0
        if it % self.cfg.interval == 0:
            self.push()

    def drawn(self, purpose: str, it: int, n: int) -> list[QueuedModel]:
        order = torch.randperm(len(self.models), generator=generator(self.seed, purpose, it))
        return [self.models[int(i)] for i in order[:n]]

    def to_match(self, it: int) -> list[QueuedModel]:
        return self.drawn("queue_match", it, self.cfg.sample)

    def train(self, it: int, real: RealBatches, autocast: Autocast) -> int:
        """The iteration's training of drawn models on real batches; returns the SGD steps taken."""
        gen = generator(self.seed, "queue_batches", it)
        steps = 0
        for model in self.drawn("queue_train", it, self.cfg.train):
            model.net.train()
            for _ in range(self.cfg.steps):
                x, y = real(self.cfg.batch, gen)
                with autocast():
                    logits = model.net(x)
                    loss = F.cross_entropy(logits, y)
                model.correct += int((logits.argmax(dim=1) == y).sum())
                model.seen += int(y.shape[0])
                model.opt.zero_grad(set_to_none=True)
                loss.backward()
                model.opt.step()
                steps += 1
        return steps

    def state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """(JSON-able counts, tensors): every model's weights and momentum, by serial number,
        copied where they are (a state is taken every iteration; only a checkpoint moves it)."""
        meta = {"made": self.made, "models": [[m.serial, m.seen, m.correct] for m in self.models]}
        tensors = {}
        for m in self.models:
            for name, value in m.net.state_dict().items():
                tensors[f"queue.{m.serial}.weights.{name}"] = value.detach().clone()
            for i, p in enumerate(m.net.parameters()):
                buf = m.opt.state.get(p, {}).get("momentum_buffer")
                if buf is not None:
                    tensors[f"queue.{m.serial}.momentum.{i}"] = buf.detach().clone()
        return meta, tensors

    def restore(self, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        self.made = int(meta["made"])
        self.models = []
        for serial, seen, correct in meta["models"]:
            model = self.new_model(int(serial))
            prefix = f"queue.{serial}.weights."
            weights = {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}
            model.net.load_state_dict(weights)
            device = next(model.net.parameters()).device
            for i, p in enumerate(model.net.parameters()):
                buf = tensors.get(f"queue.{serial}.momentum.{i}")
                if buf is not None:
                    model.opt.state[p]["momentum_buffer"] = buf.to(device)
            model.seen, model.correct = int(seen), int(correct)
            self.models.append(model)


def validate_queue(cfg: ModelQueueConfig) -> None:
    if cfg.size < 0:
        raise ConfigError(f"matching.queue.size={cfg.size}: use 0 (no queue) or a positive size")
    if cfg.size == 0:
        return
    counts = {"initial": cfg.initial, "interval": cfg.interval, "sample": cfg.sample, "steps": cfg.steps}
    counts |= {"batch": cfg.batch, "accuracy_reset": cfg.accuracy_reset}
    for name, value in counts.items():
        if value < 1:
            raise ConfigError(f"matching.queue.{name}={value}: use >= 1")
    for name, value in {"initial": cfg.initial, "sample": cfg.sample, "train": cfg.train}.items():
        if value > cfg.size:
            raise ConfigError(
                f"matching.queue.{name}={value} exceeds matching.queue.size={cfg.size}: use <= size"
            )
    if cfg.train < 0:
        raise ConfigError(f"matching.queue.train={cfg.train}: use >= 0")
    if cfg.lr <= 0 or cfg.momentum < 0 or cfg.weight_decay < 0:
        raise ConfigError(
            f"matching.queue: lr={cfg.lr}, momentum={cfg.momentum}, weight_decay={cfg.weight_decay}: "
            "use lr > 0 and momentum, weight_decay >= 0"
        )
