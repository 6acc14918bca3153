"""The condense stage: DC's loop (docs/method.md), with the matching level, the distance and the
step policy as choices.

    for it in iterations:                        fresh network, fresh SGD
        for ol in outer_loop:
            (BatchNorm: set statistics on real images, then freeze them)
            loss = matching level over the classes  -> one SGD step on the synthetic images
                   (DM's distribution level: mean embeddings instead of gradients)
            last ol: stop
            train the network on the detached synthetic set for the step policy's epochs
"""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from condense.method.distance import matched_parameters
from condense.method.experts import ExpertSource
from condense.method.init import initial_images
from condense.method.matching import (
    MatchSetup,
    MatchStep,
    PassCounter,
    class_batches,
    class_major_labels,
    distribution_terms,
    matching_loss,
    uses_frozen_batchnorm,
)
from condense.method.model_queue import ModelQueue
from condense.method.real_batch import RealBatchSize
from condense.method.step_policy import LossRiseMonitor, max_inner_epochs, outer_loop, stops_on_rise
from condense.method.trajectory import (
    ParameterLayout,
    draw_segment,
    ema_update,
    run_ema_decay,
    step_size_problem,
    student_batches,
    trajectory_loss,
)
from condense.primitives import augment as augment_mod
from condense.primitives.compute import Autocast, Compute
from condense.primitives.dataset import Dataset, Split
from condense.primitives.network import build_network, freeze_batchnorm, has_batchnorm
from condense.primitives.seeding import EpochWalk, derive_seed, generator
from condense.primitives.synthetic import SyntheticSet, save_synthetic
from condense.primitives.training import mean_loss, train_epoch
from condense.schema import (
    AugmentConfig,
    ConfigError,
    DistanceConfig,
    InitConfig,
    MatchingConfig,
    NetworkConfig,
    RealBatchConfig,
    RunConfig,
    StepPolicyConfig,
    StopConfig,
)
from condense.stages.checkpoint import CHECKPOINT, CondenseState, load_checkpoint, save_checkpoint


@dataclass(frozen=True)
class CondenseRecipe:
    """What the condense stage reads of a run: how the set is made (the `set` settings it uses),
    the seed, and its loop's stop, checkpoint and progress settings. `of_run` takes it from a
    RunConfig; a test may write one literally."""

    network: NetworkConfig
    distance: DistanceConfig
    matching: MatchingConfig
    step_policy: StepPolicyConfig
    real_batch: RealBatchConfig
    init: InitConfig
    augment: AugmentConfig
    allow_flip: bool  # the dataset's: DSA's flip only where the classes allow it
    ipc: int
    iterations: int
    lr_img: float
    lr_img_schedule: str
    momentum_img: float
    lr_net: float
    momentum_net: float
    batch_real: int
    batch_train: int
    bn_real_per_class: int
    seed: int
    stop: StopConfig = field(default_factory=StopConfig)
    checkpoint_every: int = 0
    resume: bool = False
    progress: bool = False

    @classmethod
    def of_run(cls, cfg: RunConfig) -> CondenseRecipe:
        taken = {f.name: getattr(cfg, f.name) for f in fields(cls) if f.name != "allow_flip"}
        return cls(**taken, allow_flip=cfg.dataset.allow_flip)


@dataclass
class CondenseStats:
    """What the stage spent: counts of passes and epochs, and the per-iteration history."""

    inner_epochs: int = 0
    inner_steps: int = 0
    image_updates: int = 0
    passes: PassCounter = field(default_factory=PassCounter)
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    real_batch: int = 0  # the next step's per-class real batch (real_batch=adaptive); 0: not started
    walks: dict[str, list[int]] = field(default_factory=dict)  # matching.batching=loader: positions
    queue: dict[str, Any] = field(default_factory=dict)  # matching.queue: its counts (ModelQueue.state)
    # stop.patience > 0: the iteration count at which the matching loss stopped improving
    stopped_at: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CondenseStats:
        return cls(**{**d, "passes": PassCounter(**d["passes"])})

    def summary(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k not in ("history", "passes", "walks", "queue")}
        out.update({f"grad_{k}": v for k, v in asdict(self.passes).items()})
        return out


@dataclass(frozen=True)
class IterationStreams:
    """One independent random stream per purpose and iteration, each derived from (seed, its
    name, iteration): turning DSA, BatchNorm or the overfitting monitor on or off never shifts
    another purpose's draws, and nothing touches the global RNG."""

    real: torch.Generator  # the real batches the matching step compares against
    batchnorm: torch.Generator  # the real images that set BatchNorm statistics
    monitor: torch.Generator  # the overfitting monitor's mixed real batch
    augment: torch.Generator  # DSA seeds of the matching step
    syn_order: torch.Generator  # inter-class level: the synthetic set's shuffle
    inner: torch.Generator  # inner-loop batch order
    inner_augment: torch.Generator  # inner-loop augmentation seeds

    @classmethod
    def of_iteration(cls, seed: int, it: int, *more: int) -> IterationStreams:
        """Iteration it's streams; `more` tells apart several matchings of one iteration."""
        return cls(**{f.name: generator(seed, f.name, it, *more) for f in fields(cls)})


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
    net: nn.Module,
    real: RealSampler,
    per_class: int,
    num_classes: int,
    gen: torch.Generator,
    autocast: Autocast = nullcontext,
) -> None:
    """DC's BatchNorm rule: a train-mode pass over a few real images per class, then freeze.
    It runs in the matching part's precision: the statistics are those matching will see."""
    net.train()
    batch = torch.cat([real.of_class(c, per_class, gen) for c in range(num_classes)])
    with autocast():
        net(batch)
    freeze_batchnorm(net)


def train_inner(
    net: nn.Module,
    opt: torch.optim.Optimizer,
    images: torch.Tensor,
    labels: torch.Tensor,
    epochs: int,
    batch_size: int,
    gen: torch.Generator,
    monitor: tuple[torch.Tensor, torch.Tensor] | None,
    monitor_mode: str,
    augment: augment_mod.Augment | None,
    autocast: Autocast = nullcontext,
    augment_gen: torch.Generator | None = None,
) -> tuple[int, int]:
    """Train on the synthetic set for up to `epochs`; with a monitor batch, stop the first time
    its loss rises (measured in train or eval mode: step_policy.monitor_mode). Returns (epochs run,
    SGD steps)."""
    train_mode = monitor_mode == "train"

    def monitored_loss() -> float:
        return mean_loss(net, *monitor, autocast, train_mode)  # type: ignore[misc]

    watcher = LossRiseMonitor(monitored_loss()) if monitor is not None else None
    steps = 0
    for epoch in range(epochs):
        steps += train_epoch(net, opt, images, labels, batch_size, gen, augment, autocast, augment_gen)
        if watcher is not None and watcher.rose(monitored_loss()):
            return epoch + 1, steps
    return epochs, steps


IterationHook = Callable[[int, dict[str, float], torch.Tensor], None]
# (iterations done, the set's images then, its learned evaluation lr or None): called before the
# first iteration and after each one; the time it takes is not condensation time (intermediate
# evaluation runs here). The images are the set that would be saved (FTD's average when kept).
ProgressHook = Callable[[int, torch.Tensor, float | None], None]


class NumericsError(ArithmeticError):
    """A NaN or inf in the loss or the images, not a config mistake: its message names the iteration
    and the likely cause, and the app exits with its own code."""


class RunInterrupted(Exception):
    """SIGINT, SIGTERM or SIGUSR2 arrived; the last completed iteration has been checkpointed.
    `previous` is the handler the signal had before the loop took it over (submitit's requeue
    handler for SIGUSR2 in a Slurm job), for the app to hand the signal on to."""

    def __init__(self, signum: int, previous: object = None) -> None:
        super().__init__(f"stopped by signal {signal.Signals(signum).name}")
        self.signum = signum
        self.previous = previous


# SIGUSR2 is what Slurm sends before a time limit or a preemption when asked (submitit asks).
CHECKPOINT_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2)


@contextmanager
def signals_raise() -> Iterator[None]:
    """Turn CHECKPOINT_SIGNALS into RunInterrupted so the loop can checkpoint before exiting."""
    previous: dict[int, object] = {}

    def handler(signum: int, frame: object) -> None:
        raise RunInterrupted(signum, previous.get(signum))

    try:
        previous.update({s: signal.signal(s, handler) for s in CHECKPOINT_SIGNALS})
    except ValueError:  # not the main thread (a launcher's worker): leave signals alone
        yield
        return
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@dataclass
class IterationNet:
    """One iteration's freshly initialised network, with what matches and trains on it."""

    net: nn.Module
    opt: torch.optim.Optimizer
    compiled: nn.Module  # net itself unless compile=true
    params: list[nn.Parameter]  # the matched ones (distance.parameters)
    streams: IterationStreams
    batchnorm: bool  # DC's BatchNorm rule: statistics set and frozen before each matching step


@dataclass
class TrajectoryMatcher:
    """matching=trajectory's state beside the images: the experts (read one snapshot at a time
    from their cache), the student network whose weights each step replaces, the learnable step
    size and its optimizer (SGD, momentum 0.5, as MTT's), and FTD's moving average of the images."""

    experts: ExpertSource
    num: int
    net: nn.Module
    layout: ParameterLayout
    syn_lr: torch.Tensor
    opt_lr: torch.optim.Optimizer
    ema: torch.Tensor | None

    @classmethod
    def start(
        cls, cfg: CondenseRecipe, experts: ExpertSource, num: int, data: Dataset, images: torch.Tensor
    ) -> TrajectoryMatcher:
        net = build_network(cfg.network, data.image_shape, data.num_classes, 0, images.device)
        syn_lr = torch.tensor(cfg.matching.syn_lr_init, device=images.device, requires_grad=True)
        ema = images.detach().clone() if cfg.matching.ema_decay > 0 else None
        opt_lr = torch.optim.SGD([syn_lr], lr=cfg.matching.lr_lr, momentum=0.5)
        return cls(experts, num, net, ParameterLayout.of(net), syn_lr, opt_lr, ema)

    def state(self) -> dict[str, torch.Tensor]:
        out = {"trajectory.syn_lr": self.syn_lr.detach().clone()}
        buf = self.opt_lr.state.get(self.syn_lr, {}).get("momentum_buffer")
        if buf is not None:
            out["trajectory.syn_lr_momentum"] = buf.clone()
        if self.ema is not None:
            out["trajectory.ema"] = self.ema.clone()
        return out

    def restore(self, extra: dict[str, torch.Tensor]) -> None:
        device = self.syn_lr.device
        with torch.no_grad():
            self.syn_lr.copy_(extra["trajectory.syn_lr"].to(device))
            if self.ema is not None:
                self.ema.copy_(extra["trajectory.ema"].to(device))
        if "trajectory.syn_lr_momentum" in extra:
            self.opt_lr.state[self.syn_lr]["momentum_buffer"] = extra["trajectory.syn_lr_momentum"].to(device)


@dataclass
class Condenser:
    """The condense stage's state and the pieces one iteration uses."""

    cfg: CondenseRecipe
    data: Dataset
    device: torch.device
    setup: MatchSetup  # the synthetic set, its labels, and what every matching step shares
    opt_img: torch.optim.Optimizer
    real: RealSampler
    stats: CondenseStats
    inner_aug: Callable[[torch.Tensor, int], torch.Tensor] | None
    compute: Compute
    real_batch: RealBatchSize
    # matching.batching=loader: the inter-class level's synthetic and real walks, by name
    walks: dict[str, EpochWalk] = field(default_factory=dict)
    queue: ModelQueue | None = None  # matching.queue.size > 0: IDM's models to match under
    trajectory: TrajectoryMatcher | None = None  # matching=trajectory: the experts and syn_lr

    @classmethod
    def start(
        cls, cfg: CondenseRecipe, compute: Compute, data: Dataset, experts: ExpertSource | None = None,
        num_experts: int = 0,
    ) -> Condenser:  # fmt: skip
        """The stage at iteration 0 on compute's device: initial images, their optimiser, DSA;
        matching=trajectory also needs the experts' cache and how many of them to draw from."""
        C, device = data.num_classes, compute.device
        init_gen = generator(cfg.seed, "init")
        images = initial_images(cfg.init.name, data.train, C, cfg.ipc, init_gen, cfg.matching.expansion)
        images = images.to(device).requires_grad_(True)
        aug_cfg = augment_mod.for_dataset(cfg.augment, cfg.allow_flip)
        stats = CondenseStats()
        real_batch = RealBatchSize.start(cfg.real_batch, cfg.batch_real)
        setup = MatchSetup(
            syn_images=images,
            labels=class_major_labels(C, cfg.ipc, device),
            ipc=cfg.ipc,
            num_classes=C,
            distance=cfg.distance,
            augment=augment_mod.siamese_augment(aug_cfg),
            counter=stats.passes,
            compute=compute,
            # fixed for the run: an adaptive size stays in [min_batch, batch_real], min_batch >= 2
            split_real=real_batch.splits,
            iterations=cfg.iterations,
        )
        walks = inter_class_walks(
            cfg.matching, cfg.batch_train, cfg.batch_real, cfg.seed, len(images), len(data.train.labels)
        )
        return cls(
            cfg=cfg,
            data=data,
            device=device,
            setup=setup,
            opt_img=torch.optim.SGD([images], lr=cfg.lr_img, momentum=cfg.momentum_img),
            real=RealSampler(data.train, C, device),
            stats=stats,
            inner_aug=augment_mod.training_augment(aug_cfg),
            compute=compute,
            real_batch=real_batch,
            walks=walks,
            queue=model_queue(cfg, data, device),
            trajectory=trajectory_matcher(cfg, experts, num_experts, data, images),
        )

    # The setup owns the set, its labels and DSA; the stage's callers read them here.
    @property
    def images(self) -> torch.Tensor:
        return self.setup.syn_images

    @property
    def labels(self) -> torch.Tensor:
        return self.setup.labels

    def state(self, next_iteration: int) -> CondenseState:
        buf = self.opt_img.state.get(self.images, {}).get("momentum_buffer")
        extra: dict[str, torch.Tensor] = {}
        if self.queue is not None:
            self.stats.queue, extra = self.queue.state()
        if self.trajectory is not None:
            extra = self.trajectory.state()
        return CondenseState(
            images=self.images.detach().clone(),
            momentum=None if buf is None else buf.clone(),
            next_iteration=next_iteration,
            stats=self.stats.to_dict(),
            extra=extra,
        )

    def restore(self, state: CondenseState) -> None:
        with torch.no_grad():
            self.images.copy_(state.images.to(self.device))
        if state.momentum is not None:
            self.opt_img.state[self.images]["momentum_buffer"] = state.momentum.to(self.device)
        self.stats = CondenseStats.from_dict(state.stats)
        self.setup = replace(self.setup, counter=self.stats.passes)  # count on from the restored passes
        if self.stats.real_batch:
            self.real_batch.size = self.stats.real_batch
        for name, (epoch, offset) in self.stats.walks.items():
            self.walks[name].epoch, self.walks[name].offset = epoch, offset
        if self.queue is not None:
            self.queue.restore(self.stats.queue, state.extra)
        if self.trajectory is not None:
            self.trajectory.restore(state.extra)

    def mixed_real_batch(self, gen: torch.Generator) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
        """The inter-class level's mixed real batch: an i.i.d. draw, or the next batch of the walk."""
        if not self.walks:
            n = self.cfg.matching.inter_batch_factor * self.cfg.batch_real
            return lambda: self.real.mixed(n, gen)

        def walked() -> tuple[torch.Tensor, torch.Tensor]:
            idx = self.walks["inter_real"].next_batch().to(self.real.images.device)
            return self.real.images[idx], self.real.labels[idx]

        return walked

    def iteration(self, it: int) -> dict[str, float]:
        """One iteration of DC's loop on a freshly initialised network."""
        if self.cfg.lr_img_schedule != "constant":  # constant: the optimizer as built, untouched
            self.opt_img.param_groups[0]["lr"] = image_lr(self.cfg, it)
        if self.queue is not None:
            return self.queue_iteration(it, self.queue)
        if self.trajectory is not None:
            return self.trajectory_iteration(it, self.trajectory)
        t0 = time.perf_counter()
        net = self.fresh_network(it)
        policy = self.cfg.step_policy
        monitored = stops_on_rise(policy)
        monitor = self.monitor_batch(net) if monitored and policy.monitor_refresh == "iteration" else None
        outer = outer_loop(policy, self.cfg.ipc)
        losses, epochs_this_iter = [], 0
        for ol in range(outer):
            losses.append(self.match_and_update(net, it, ol))
            if ol == outer - 1:
                break
            if monitored and policy.monitor_refresh == "outer_step":
                monitor = self.monitor_batch(net)  # fresh per inner loop
            epochs_this_iter += self.train_network(net, ol, monitor)
        self.stats.inner_epochs += epochs_this_iter
        return self.iteration_record(it, losses, epochs_this_iter, t0)

    def queue_iteration(self, it: int, queue: ModelQueue) -> dict[str, float]:
        """IDM's iteration: match under models drawn from the queue, then train drawn models on
        real batches (there is no inner loop on the synthetic set)."""
        t0 = time.perf_counter()
        queue.advance(it)
        losses = []
        for j, model in enumerate(queue.to_match(it)):
            streams = IterationStreams.of_iteration(self.cfg.seed, it, *([j] if j else []))
            net = IterationNet(model.net, model.opt, model.net, [], streams, batchnorm=False)
            for ol in range(outer_loop(self.cfg.step_policy, self.cfg.ipc)):  # single_step: 1
                losses.append(self.match_and_update(net, it, ol, model.accuracy))
        self.stats.inner_steps += queue.train(it, self.real.mixed, self.compute.autocaster("inner"))
        return self.iteration_record(it, losses, 0, t0)

    def trajectory_iteration(self, it: int, tm: TrajectoryMatcher) -> dict[str, float]:
        """MTT's iteration: an expert segment drawn, the student's unrolled steps from its start,
        one SGD step on the images and one on syn_lr; FTD's moving average after it."""
        t0 = time.perf_counter()
        m, device = self.cfg.matching, self.device
        gen = generator(self.cfg.seed, "trajectory", it)
        expert, start = draw_segment(tm.num, m.max_start_epoch, gen)
        batches = student_batches(len(self.images), m.batch_syn, m.syn_steps, gen)
        augment_gen = generator(self.cfg.seed, "trajectory_augment", it)
        seeds = [int(torch.randint(0, 2**31 - 1, (1,), generator=augment_gen)) for _ in batches]
        loss = trajectory_loss(
            tm.net, tm.layout, tm.experts.snapshot(expert, start).to(device),
            tm.experts.snapshot(expert, start + m.expert_epochs).to(device), self.images, self.labels,
            tm.syn_lr, [b.to(device) for b in batches], self.inner_aug, seeds,
            self.compute.autocaster("matching"),
        )  # fmt: skip
        tm.opt_lr.zero_grad(set_to_none=True)
        self.update_images(loss, it, "trajectory loss", f"matching.lr_lr={m.lr_lr}")  # checks it first
        tm.opt_lr.step()
        if (problem := step_size_problem(tm.syn_lr, it, m.lr_lr)) is not None:
            raise NumericsError(problem)
        if tm.ema is not None:
            ema_update(tm.ema, self.images, run_ema_decay(m, self.cfg.iterations))
        record = self.iteration_record(it, [float(loss.detach())], 0, t0)
        record["syn_lr"] = float(tm.syn_lr.detach())
        return record

    def fresh_network(self, it: int) -> IterationNet:
        """Iteration it's network, its SGD and its random streams, each from (seed, purpose, it)."""
        cfg = self.cfg
        seed = derive_seed(cfg.seed, "net", it)
        net = build_network(cfg.network, self.data.image_shape, self.data.num_classes, seed, self.device)
        return IterationNet(
            net=net,
            opt=torch.optim.SGD(net.parameters(), lr=cfg.lr_net, momentum=cfg.momentum_net),
            compiled=self.compute.compiled(net),
            params=matched_parameters(net, cfg.distance),
            streams=IterationStreams.of_iteration(cfg.seed, it),
            batchnorm=has_batchnorm(net) and uses_frozen_batchnorm(cfg.matching),
        )

    def monitor_batch(self, net: IterationNet) -> tuple[torch.Tensor, torch.Tensor]:
        """The overfitting monitor's mixed real batch."""
        return self.real.mixed(self.cfg.step_policy.monitor_batch, net.streams.monitor)

    def match_step(self, net: IterationNet, it: int, ol: int, accuracy: float = 0.0) -> MatchStep:
        """Outer step ol's matching, its real batches of this step's per-class size."""
        real, gen, n = self.real, net.streams.real, self.real_batch.size
        return MatchStep(
            setup=self.setup,
            net=net.net,
            params=net.params,
            real_by_class=lambda c: real.of_class(c, n, gen),
            real_mixed=self.mixed_real_batch(gen),
            iteration=it,
            augment_generator=net.streams.augment,
            order_generator=net.streams.syn_order,
            syn_batch=self.walks["inter_syn"].next_batch if self.walks else None,
            outer_step=ol,
            compiled_net=net.compiled,
            model_accuracy=accuracy,
        )

    def match_and_update(self, net: IterationNet, it: int, ol: int, accuracy: float = 0.0) -> float:
        """One outer step: the matching loss and one SGD step on the images (one per class with
        matching.per_class_steps); returns the loss. `accuracy`: the model's, for IDM's term."""
        if net.batchnorm:
            matching_precision = self.compute.autocaster("matching")
            set_batchnorm_statistics(
                net.net,
                self.real,
                self.cfg.bn_real_per_class,
                self.data.num_classes,
                net.streams.batchnorm,
                matching_precision,
            )
        step = self.match_step(net, it, ol, accuracy)
        if self.cfg.matching.per_class_steps:
            return self.update_per_class(step, it)
        loss = matching_loss(step, self.cfg.matching)
        self.stats.walks = {name: walk.position() for name, walk in self.walks.items()}
        self.real_batch.update(step.half_cosines.values())
        self.stats.real_batch = self.real_batch.size
        self.update_images(loss, it, "matching loss")
        return float(loss.detach())

    def update_images(self, loss: torch.Tensor, it: int, what: str, also: str = "") -> None:
        """One SGD step of the images down `loss`, refusing NaN or inf before and after."""
        lr_img = self.cfg.lr_img
        check_finite(loss, self.images, it, lr_img, what, also)
        self.opt_img.zero_grad(set_to_none=True)
        loss.backward()
        self.opt_img.step()
        check_finite(None, self.images, it, lr_img, "synthetic images", also)
        self.stats.image_updates += 1

    def update_per_class(self, step: MatchStep, it: int) -> float:
        """IDM's image steps: every class's draws first (in class order, as one step draws them),
        then one step per class on its own term, each class's images as the last step left them."""
        total = 0.0
        for batch in class_batches(step):
            current = replace(batch, syn=self.setup.class_syn(batch.label)[0])
            (loss,) = distribution_terms(step, self.cfg.matching, [current])
            self.update_images(loss, it, f"class {batch.label}'s matching loss")
            total += float(loss.detach())
        return total

    def train_network(
        self, net: IterationNet, ol: int, monitor: tuple[torch.Tensor, torch.Tensor] | None
    ) -> int:
        """The inner loop after outer step ol, on the detached synthetic set; returns its epochs."""
        policy, streams = self.cfg.step_policy, net.streams
        epochs, steps = train_inner(
            net.compiled,
            net.opt,
            self.images.detach(),
            self.labels,
            max_inner_epochs(policy, self.cfg.ipc, ol),
            self.cfg.batch_train,
            streams.inner,
            monitor,
            policy.monitor_mode,
            self.inner_aug,
            self.compute.autocaster("inner"),
            streams.inner_augment,
        )
        self.stats.inner_steps += steps
        return epochs

    def iteration_record(self, it: int, losses: list[float], epochs: int, t0: float) -> dict[str, float]:
        """The iteration's line of the history."""
        record = {
            "iteration": it,
            "match_loss": sum(losses) / len(losses),
            "inner_epochs": epochs,
            "seconds": time.perf_counter() - t0,
            "lr_img": self.opt_img.param_groups[0]["lr"],
            "lr_net": self.cfg.lr_net,
            "real_batch": self.real_batch.size,
        }
        self.stats.history.append(record)
        return record

    def set_as_saved(self) -> tuple[torch.Tensor, float | None]:
        """The images the saved set would hold now (FTD's average when kept) and its learned lr."""
        tm = self.trajectory
        if tm is None:
            return self.images.detach(), None
        return (tm.ema if tm.ema is not None else self.images.detach()), float(tm.syn_lr.detach())

    def synthetic_set(self, config: dict[str, Any], raw: bool = False) -> SyntheticSet:
        """The images as they stand, with the run's config (and, if it stopped early, when):
        FTD's moving average when it keeps one (raw=True: the images themselves), and the
        learned step size of trajectory matching as the set's evaluation lr."""
        if self.stats.stopped_at is not None:  # the set records the iterations that made it
            config = {**config, "iterations_run": self.stats.stopped_at}
        images, lr = self.set_as_saved()
        if raw:
            images = self.images.detach()
        data = self.data
        return SyntheticSet(
            images.cpu(),
            self.labels.cpu(),
            data.name,
            data.mean,
            data.std,
            config,
            transform=data.transform,
            lr=lr,
            expansion=self.cfg.matching.expansion,
        )


def model_queue(cfg: CondenseRecipe, data: Dataset, device: torch.device) -> ModelQueue | None:
    """IDM's queue when matching.queue.size > 0; its models are the run's network."""
    if cfg.matching.queue.size == 0:
        return None

    def build(seed: int) -> nn.Module:
        return build_network(cfg.network, data.image_shape, data.num_classes, seed, device)

    return ModelQueue(cfg.matching.queue, build, cfg.seed)


def trajectory_matcher(
    cfg: CondenseRecipe, experts: ExpertSource | None, num: int, data: Dataset, images: torch.Tensor
) -> TrajectoryMatcher | None:
    """matching=trajectory's state, on the experts given (the app trains or finds them first)."""
    if cfg.matching.name != "trajectory":
        return None
    if experts is None or num < 1:
        raise ConfigError(
            "matching=trajectory needs expert trajectories: run it with stage=all or stage=condense"
        )
    return TrajectoryMatcher.start(cfg, experts, num, data, images)


def inter_class_walks(
    cfg: MatchingConfig, batch_train: int, batch_real: int, seed: int, syn_size: int, real_size: int
) -> dict[str, EpochWalk]:
    """matching.batching=loader: the paper's inter-class.py loaders, a synthetic batch of
    batch_train and a real one of inter_batch_factor x batch_real, walked epoch by epoch."""
    if cfg.batching != "loader" or cfg.name not in ("inter", "interleaved"):
        return {}
    return {
        "inter_syn": EpochWalk(seed, "inter_syn", syn_size, batch_train),
        "inter_real": EpochWalk(seed, "inter_real", real_size, cfg.inter_batch_factor * batch_real),
    }


def windows_without_gain(losses: list[float], window: int, min_improvement: float) -> int:
    """How many complete windows in a row, up to the last, failed to lower the best earlier
    window's mean matching loss by `min_improvement` of it (relative)."""
    means = [sum(losses[i : i + window]) / window for i in range(0, len(losses) - window + 1, window)]
    if not means:
        return 0
    best, stale = means[0], 0
    for mean in means[1:]:
        if mean < best - min_improvement * abs(best):
            best, stale = mean, 0
        else:
            stale += 1
    return stale


def should_stop(stats: CondenseStats, stop: StopConfig) -> bool:
    """stop.patience windows without progress, judged at the end of each window."""
    done = len(stats.history)
    if stop.patience == 0 or done % stop.window != 0:
        return False
    losses = [float(record["match_loss"]) for record in stats.history]
    return windows_without_gain(losses, stop.window, stop.min_improvement) >= stop.patience


def stop_message(stopped_at: int, stop: StopConfig, iterations: int) -> str:
    return (
        f"stop: the matching loss gained less than {stop.min_improvement:g} over "
        f"{stop.patience} window(s) of {stop.window}; stopped at iteration "
        f"{stopped_at} of {iterations} ({iterations - stopped_at} saved)"
    )


IMAGE_LR_SCHEDULES = ("constant", "cosine", "step")


def image_lr(cfg: CondenseRecipe, it: int) -> float:
    """lr_img at iteration it under lr_img_schedule. A function of the iteration alone, so a
    resumed run takes the same steps with no scheduler state in its checkpoint."""
    if cfg.lr_img_schedule == "cosine":
        return cfg.lr_img * 0.5 * (1 + math.cos(math.pi * it / cfg.iterations))
    if cfg.lr_img_schedule == "step":
        return cfg.lr_img * (0.1 if it >= cfg.iterations // 2 else 1.0)
    return cfg.lr_img


def check_finite(
    loss: torch.Tensor | None, images: torch.Tensor, it: int, lr_img: float, what: str, also: str = ""
) -> None:
    """Stop at the first NaN or inf, naming the rates that cause it: lr_img, and `also` (another
    rate of the step, e.g. trajectory matching's matching.lr_lr)."""
    bad = (loss is not None and not bool(torch.isfinite(loss.detach()))) or (
        loss is None and not bool(torch.isfinite(images.detach()).all())
    )
    if bad:
        suspects = f"lr_img={lr_img}" + (f" or {also}" if also else "")
        raise NumericsError(
            f"iteration {it}: the {what} became NaN or inf; {suspects} is probably too large "
            f"(lower it, e.g. lr_img={lr_img / 10:g})"
        )


@dataclass
class Checkpoints:
    """Where the stage checkpoints (path None: nowhere) and the config a resume must match."""

    path: Path | None
    config: dict[str, Any]

    def save(self, state: CondenseState) -> bool:
        """Whether there was anywhere to save it."""
        if self.path is None:
            return False
        save_checkpoint(self.path, state, self.config)
        return True

    def resume(self, run: Condenser, iterations: int) -> int:
        """Restore `run` from the checkpoint if there is one; the iteration to continue from."""
        if self.path is None or not self.path.exists():
            return 0
        state = load_checkpoint(self.path, self.config)
        run.restore(state)
        print(f"resume: continuing from iteration {state.next_iteration} of {iterations} ({self.path})")
        return state.next_iteration


class StageClock:
    """Condensation seconds: wall time since the stage began, plus what a resumed run had already
    spent, less the time the progress hook takes (intermediate evaluation is not condensation)."""

    def __init__(self, spent: float) -> None:
        self.start = time.perf_counter() - spent

    def seconds(self) -> float:
        return time.perf_counter() - self.start

    @contextmanager
    def paused(self) -> Iterator[None]:
        begun = time.perf_counter()
        yield
        self.start += time.perf_counter() - begun


@dataclass
class StageLoop:
    """condense's loop over the iterations: the clock, the checkpoints and the hooks around them."""

    run: Condenser
    cfg: CondenseRecipe
    checkpoints: Checkpoints
    clock: StageClock
    on_iteration: IterationHook | None
    on_progress: ProgressHook | None

    def progress(self, done: int) -> None:
        if self.on_progress is not None:
            with self.clock.paused():
                self.on_progress(done, *self.run.set_as_saved())

    def advance(self, it: int) -> tuple[dict[str, float], CondenseState]:
        """Iteration it, then the stop decision and the state it leaves (checkpointed when due)."""
        run, cfg = self.run, self.cfg
        record = run.iteration(it)
        run.stats.seconds = self.clock.seconds()
        if should_stop(run.stats, cfg.stop):
            run.stats.stopped_at = it + 1  # before the state is taken: a resume stays stopped
        state = run.state(it + 1)
        if cfg.checkpoint_every and (it + 1) % cfg.checkpoint_every == 0:
            self.checkpoints.save(state)
        return record, state

    def iterate(self, first: int) -> CondenseState:
        """Iterations from `first` to the end or an early stop; the last completed one's state,
        checkpointed before a signal or a numerics error leaves."""
        run, cfg = self.run, self.cfg
        last = run.stats.stopped_at or cfg.iterations  # a run that stopped early stays stopped
        if run.stats.stopped_at is not None:
            print(f"resume: the run stopped early at iteration {run.stats.stopped_at}: nothing left to do")
        bar = tqdm(range(first, last), desc="condense", disable=not cfg.progress, leave=False)
        last_good = run.state(first)
        if first == 0:
            self.progress(0)
        with signals_raise():
            try:
                for it in bar:
                    record, last_good = self.advance(it)
                    bar.set_postfix(loss=f"{record['match_loss']:.3f}")
                    if self.on_iteration is not None:
                        self.on_iteration(it, record, run.images.detach())
                    self.progress(it + 1)
                    if run.stats.stopped_at is not None:
                        print(stop_message(run.stats.stopped_at, cfg.stop, cfg.iterations))
                        break
            except (RunInterrupted, NumericsError):
                # keep what was paid for: the last completed iteration
                if self.checkpoints.save(last_good):
                    where = self.checkpoints.path
                    print(f"checkpoint: iteration {last_good.next_iteration} saved in {where}")
                raise
        return last_good


def condense(
    cfg: CondenseRecipe,
    compute: Compute,
    data: Dataset,
    config: dict[str, Any],
    on_iteration: IterationHook | None = None,
    out: Path | None = None,
    on_progress: ProgressHook | None = None,
    experts: ExpertSource | None = None,
    num_experts: int = 0,
) -> tuple[SyntheticSet, CondenseStats]:
    """Learn `ipc` synthetic images per class by gradient matching, checkpointing into `out`.
    `config` is the run's whole config as data: the set records it, and a checkpoint resumes only
    under the same one."""
    run = Condenser.start(cfg, compute, data, experts, num_experts)
    # precision=auto resolves per device: a run resumes only in the precision it started in.
    as_run: dict[str, Any] = {**compute.precisions()}
    if compute.auto is not None:  # auto's evidence: a resumed run reuses it (app/plan.py)
        as_run["auto_bf16_speedup"] = compute.auto.ratio
    ckpt_config = {**config, "precision_as_run": as_run}
    checkpoints = Checkpoints(out / CHECKPOINT if out is not None else None, ckpt_config)
    first = checkpoints.resume(run, cfg.iterations) if cfg.resume else 0
    clock = StageClock(run.stats.seconds)
    last_good = StageLoop(run, cfg, checkpoints, clock, on_iteration, on_progress).iterate(first)
    checkpoints.save(last_good)
    run.stats.seconds = clock.seconds()
    if out is not None and run.trajectory is not None and run.trajectory.ema is not None:
        save_synthetic(run.synthetic_set(config, raw=True), out / "synthetic_raw.safetensors")
    return run.synthetic_set(config), run.stats
