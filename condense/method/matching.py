"""What to match: the matching level turns per-class or mixed gradients into one loss.

- intra (DC): sum_c D(g_c^S, g_c^T)
- inter: w * D(g^S, g^T) on one mixed real batch (inter_batch_factor x batch_real images)
  against the shuffled synthetic set
- interleaved: intra on even iterations, inter on odd ones
- multilevel (the paper's): sum_c D(g_c^S, g_c^T) + w * D(mean_c g_c^S, mean_c g_c^T), reusing
  the per-class gradients, so the inter-class level costs no extra pass; w defaults to the
  class count C
- contrastive (DCC, Lee et al. ICML 2022): D(g^S, mean_c g_c^T), g^S the loss gradient of the
  whole (per-class augmented) synthetic set, which with equal images per class is mean_c g_c^S:
  the inter-class term alone, weight 1, after a bi-level warm-up of intra-class matching
- distribution (DM, Zhao & Bilen WACV 2023): no gradients at all,
  sum_c || mean embed(real_c) - mean embed(syn_c) ||^2 under the step's network, whose parameters
  take no gradient
- idm (IDM, Zhao et al. CVPR 2023): the distribution level with its three parts on: expanded
  sub-images, a queue of partly trained models (condense/method/model_queue.py) and the
  class-aware term w x accuracy x CE(net(S_c), c) per class
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from condense.method.distance import gradient_distance
from condense.method.model_queue import validate_queue
from condense.method.real_batch import halves_cosine
from condense.primitives.augment import Augment
from condense.primitives.compute import Autocast, Compute
from condense.primitives.network import has_batchnorm
from condense.primitives.synthetic import expand_mosaic
from condense.schema import ConfigError, DistanceConfig, MatchingConfig, require_choice


@dataclass
class PassCounter:
    """Gradient evaluations spent, so the cost of a configuration is a number, not a claim."""

    real_passes: int = 0
    real_images: int = 0
    syn_passes: int = 0
    syn_images: int = 0

    def add_real(self, n: int) -> None:
        self.real_passes += 1
        self.real_images += n

    def add_syn(self, n: int) -> None:
        self.syn_passes += 1
        self.syn_images += n


def class_major_labels(num_classes: int, ipc: int, device: torch.device) -> torch.Tensor:
    """The synthetic set's labels: ipc images of class 0, then of class 1, ..."""
    return torch.arange(num_classes, device=device).repeat_interleave(ipc)


@dataclass(frozen=True)
class MatchSetup:
    """What every matching step of a run shares, built once (Condenser.start): the synthetic set,
    its labels, the distance, DSA and where passes are counted."""

    syn_images: torch.Tensor  # (C * ipc, ...), class-major, requires grad; updated in place
    labels: torch.Tensor  # class_major_labels of syn_images, on their device
    ipc: int
    num_classes: int
    distance: DistanceConfig
    augment: Augment | None = None
    counter: PassCounter = field(default_factory=PassCounter)
    compute: Compute = field(default_factory=lambda: Compute(torch.device("cpu")))
    # real_batch=adaptive: each class's real gradient is the mean of its two halves' gradients,
    # and the cosine between the halves goes into MatchStep.half_cosines[class].
    split_real: bool = False
    iterations: int = 1  # the contrastive level's warm-up is a fraction of them

    def class_syn(self, label: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One class's synthetic images and their labels (views into the set's)."""
        rows = slice(label * self.ipc, (label + 1) * self.ipc)
        return self.syn_images[rows], self.labels[rows]

    def augmented(
        self, real: torch.Tensor, syn: torch.Tensor, seed: int | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.augment is None or seed is None:
            return real, syn
        return self.augment(real, seed), self.augment(syn, seed)


@dataclass
class MatchStep:
    """One outer step's matching: the run's setup, this iteration's network and random streams,
    this step's real data sources, and what the step reports back (half_cosines)."""

    setup: MatchSetup
    net: nn.Module
    params: list[nn.Parameter]
    real_by_class: Callable[[int], torch.Tensor]  # class -> a fresh real batch of that class
    real_mixed: Callable[[], tuple[torch.Tensor, torch.Tensor]]  # a mixed real batch
    iteration: int
    augment_generator: torch.Generator  # DSA seeds of this step
    order_generator: torch.Generator  # inter-class level: the synthetic set's shuffle
    # inter-class level with matching.batching=loader: the next synthetic batch's indices
    syn_batch: Callable[[], torch.Tensor] | None = None
    # contrastive level's warm-up: which outer step of the iteration this is
    outer_step: int = 0
    # `net` under torch.compile (compile=true; else `net` itself), for first-order gradients only
    compiled_net: nn.Module | None = None
    half_cosines: dict[int, float] = field(default_factory=dict)  # setup.split_real: class -> cosine
    # IDM's class-aware term: the matched model's training accuracy (0 for a fresh network)
    model_accuracy: float = 0.0

    def gradient(self, x: torch.Tensor, y: torch.Tensor, create_graph: bool) -> list[torch.Tensor]:
        """The matched parameters' loss gradient on (x, y), in the matching part's precision; a
        gradient that is differentiated again (create_graph) always runs eagerly."""
        autocast = self.setup.compute.autocaster("matching")
        net = self.net if create_graph or self.compiled_net is None else self.compiled_net
        return loss_gradient(net, self.params, x, y, create_graph, autocast)

    def augment_seed(self) -> int | None:
        """Drawn in the calling thread, in the reference order, so threads cannot reorder draws."""
        if self.setup.augment is None:
            return None
        return int(torch.randint(0, 2**31 - 1, (1,), generator=self.augment_generator))


def loss_gradient(
    net: nn.Module,
    params: list[nn.Parameter],
    x: torch.Tensor,
    y: torch.Tensor,
    create_graph: bool,
    autocast: Autocast = nullcontext,
) -> list[torch.Tensor]:
    """The loss's gradient on params; only the forward and the loss run in the autocast region
    (the backward follows the forward's dtypes by itself)."""
    with autocast():
        loss = F.cross_entropy(net(x), y)
    grads = torch.autograd.grad(loss, params, create_graph=create_graph)
    return list(grads) if create_graph else [g.detach() for g in grads]


@dataclass
class ClassBatch:
    """One class's share of a matching step, with its random draws already made."""

    label: int
    real: torch.Tensor
    syn: torch.Tensor
    syn_labels: torch.Tensor
    seed: int | None


def class_batches(step: MatchStep) -> list[ClassBatch]:
    """Real batches and augmentation seeds for every class, drawn in class order."""
    batches = []
    for c in range(step.setup.num_classes):
        real = step.real_by_class(c)
        syn, syn_labels = step.setup.class_syn(c)
        batches.append(ClassBatch(c, real, syn, syn_labels, step.augment_seed()))
    return batches


def class_labels(label: int, x: torch.Tensor) -> torch.Tensor:
    """Labels for a real batch of one class (its size varies from step to step)."""
    return torch.full((x.shape[0],), label, dtype=torch.long, device=x.device)


def real_gradient(step: MatchStep, real: torch.Tensor, label: int) -> list[torch.Tensor]:
    """The real batch's mean-loss gradient; when splitting, as the image-weighted mean of its two
    halves' gradients (the same number), recording the cosine between the halves."""
    if not step.setup.split_real or real.shape[0] < 2:
        return step.gradient(real, class_labels(label, real), create_graph=False)
    first, second = real.chunk(2)
    g1 = step.gradient(first, class_labels(label, first), create_graph=False)
    g2 = step.gradient(second, class_labels(label, second), create_graph=False)
    step.half_cosines[label] = halves_cosine(g1, g2)
    w1 = first.shape[0] / real.shape[0]
    return [w1 * a + (1 - w1) * b for a, b in zip(g1, g2, strict=True)]


def gradient_pair(step: MatchStep, batch: ClassBatch) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(synthetic gradient with graph, real gradient) of one class."""
    real, syn = step.setup.augmented(batch.real, batch.syn, batch.seed)
    g_real = real_gradient(step, real, batch.label)
    g_syn = step.gradient(syn, batch.syn_labels, create_graph=True)
    return g_syn, g_real


def class_gradient_pairs(step: MatchStep) -> list[tuple[list[torch.Tensor], list[torch.Tensor]]]:
    """(synthetic gradient with graph, real gradient) for every class, in class order."""
    batches = class_batches(step)
    pairs = [gradient_pair(step, b) for b in batches]
    for b in batches:
        step.setup.counter.add_real(b.real.shape[0])
        step.setup.counter.add_syn(b.syn.shape[0])
    return pairs


def class_mean(grads: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    return [torch.stack(per_param).mean(dim=0) for per_param in zip(*grads, strict=True)]


def inter_weight(cfg: MatchingConfig, num_classes: int) -> float:
    return float(num_classes) if cfg.inter_weight is None else float(cfg.inter_weight)


def intra_loss(step: MatchStep, cfg: MatchingConfig) -> torch.Tensor:
    pairs = class_gradient_pairs(step)
    return torch.stack([gradient_distance(gs, gr, step.setup.distance) for gs, gr in pairs]).sum()


def multilevel_loss(step: MatchStep, cfg: MatchingConfig) -> torch.Tensor:
    pairs, setup = class_gradient_pairs(step), step.setup
    intra = torch.stack([gradient_distance(gs, gr, setup.distance) for gs, gr in pairs]).sum()
    syn_mean = class_mean([gs for gs, _ in pairs])
    real_mean = class_mean([gr for _, gr in pairs])
    inter = gradient_distance(syn_mean, real_mean, setup.distance)
    return intra + inter_weight(cfg, setup.num_classes) * inter


def inter_loss(step: MatchStep, cfg: MatchingConfig) -> torch.Tensor:
    setup = step.setup
    real, y_real = step.real_mixed()
    if step.syn_batch is not None:
        order = step.syn_batch().to(real.device)
    else:
        order = torch.randperm(setup.syn_images.shape[0], generator=step.order_generator).to(real.device)
    syn, y_syn = setup.syn_images[order], setup.labels[order]
    real, syn = setup.augmented(real, syn, step.augment_seed())
    g_real = step.gradient(real, y_real, create_graph=False)
    g_syn = step.gradient(syn, y_syn, create_graph=True)
    setup.counter.add_real(real.shape[0])
    setup.counter.add_syn(syn.shape[0])
    return inter_weight(cfg, setup.num_classes) * gradient_distance(g_syn, g_real, setup.distance)


def interleaved_loss(step: MatchStep, cfg: MatchingConfig) -> torch.Tensor:
    return intra_loss(step, cfg) if step.iteration % 2 == 0 else inter_loss(step, cfg)


def warmup_iterations(cfg: MatchingConfig, iterations: int) -> int:
    """DCC's outer warm-up in iterations: 250 of its 1000 at warmup_fraction 0.25."""
    return round(cfg.warmup_fraction * iterations)


def in_warmup(step: MatchStep, cfg: MatchingConfig) -> bool:
    """DCC's bi-level warm-up: intra-class matching while both the iteration and the outer step
    are still inside their warm-ups (main.py: contrast once outer_warmup <= ol or inner_warmup <= il)."""
    warm_iteration = step.iteration < warmup_iterations(cfg, step.setup.iterations)
    return warm_iteration and step.outer_step < cfg.warmup_steps


def contrastive_loss(step: MatchStep, cfg: MatchingConfig) -> torch.Tensor:
    """DCC: one distance between the class-mean real gradient and the whole synthetic set's
    gradient (one pass with graph instead of C), after the warm-up."""
    if in_warmup(step, cfg):
        return intra_loss(step, cfg)
    setup = step.setup
    g_real, views = [], []
    for batch in class_batches(step):
        real, syn = setup.augmented(batch.real, batch.syn, batch.seed)
        g_real.append(real_gradient(step, real, batch.label))
        views.append(syn)
        setup.counter.add_real(real.shape[0])
    syn_all = torch.cat(views)  # class-major like the set, so the set's labels are its labels
    g_syn = step.gradient(syn_all, setup.labels, create_graph=True)
    setup.counter.add_syn(syn_all.shape[0])
    return gradient_distance(g_syn, class_mean(g_real), setup.distance)


@contextmanager
def frozen_parameters(net: nn.Module) -> Iterator[None]:
    """Parameters out of the graph (DM's `requires_grad = False`), restored afterwards: the
    backward then reaches only the images, and the network stays trainable for a later step."""
    params = [p for p in net.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def embedding_means(net: nn.Module, batches: list[torch.Tensor], autocast: Autocast) -> list[torch.Tensor]:
    """Each batch's mean embedding (fp32). With BatchNorm, DM's rule: all batches in one forward,
    so train-mode statistics mix the classes; otherwise one forward per batch (its ConvNet branch)."""

    def embed(x: torch.Tensor) -> torch.Tensor:  # bf16 under autocast: average in fp32 at least
        e = net.embed(x)  # type: ignore[operator]
        return e.to(torch.promote_types(e.dtype, torch.float32))

    with autocast():
        if has_batchnorm(net):
            joint = embed(torch.cat(batches))
            return [e.mean(dim=0) for e in joint.split([b.shape[0] for b in batches])]
        return [embed(b).mean(dim=0) for b in batches]


def class_aware_term(step: MatchStep, syn: torch.Tensor, label: int, autocast: Autocast) -> torch.Tensor:
    """IDM's class-aware regulariser for one class: the matched model's training accuracy (a
    fraction) x the cross-entropy of its predictions on the class's (expanded, augmented)
    synthetic images."""
    with autocast():
        logits = step.net(syn)
    ce = F.cross_entropy(logits.float(), class_labels(label, syn))
    return step.model_accuracy * ce


def distribution_terms(step: MatchStep, cfg: MatchingConfig, batches: list[ClassBatch]) -> list[torch.Tensor]:
    """DM's per-class term: the squared distance between mean real and mean synthetic embeddings,
    the network in train mode (main_DM.py), real embeddings without graph. IDM's parts join when
    set: each synthetic image expanded into its sub-images first, and the class-aware term."""
    setup = step.setup
    views = [setup.augmented(b.real, expand_mosaic(b.syn, cfg.expansion), b.seed) for b in batches]
    autocast = setup.compute.autocaster("matching")
    step.net.train()
    with frozen_parameters(step.net):
        with torch.no_grad():
            real_means = embedding_means(step.net, [real for real, _ in views], autocast)
        syn_means = embedding_means(step.net, [syn for _, syn in views], autocast)
        terms = [((r - s) ** 2).sum() for r, s in zip(real_means, syn_means, strict=True)]
        if cfg.class_weight and step.model_accuracy:
            terms = [
                t + cfg.class_weight * class_aware_term(step, syn, b.label, autocast)
                for t, (_, syn), b in zip(terms, views, batches, strict=True)
            ]
    for real, syn in views:
        setup.counter.add_real(real.shape[0])
        setup.counter.add_syn(syn.shape[0])
    return terms


def distribution_loss(step: MatchStep, cfg: MatchingConfig) -> torch.Tensor:
    """DM (and IDM): the per-class terms summed over the classes."""
    return torch.stack(distribution_terms(step, cfg, class_batches(step))).sum()


LEVELS: dict[str, Callable[[MatchStep, MatchingConfig], torch.Tensor]] = {
    "intra": intra_loss,
    "inter": inter_loss,
    "interleaved": interleaved_loss,
    "multilevel": multilevel_loss,
    "contrastive": contrastive_loss,
    "distribution": distribution_loss,
    # IDM (Zhao et al., CVPR 2023): DM's level with its parts on (conf/matching/idm.yaml)
    "idm": distribution_loss,
}
# The levels that match embeddings, not gradients: they take IDM's options and no inner loop.
DISTRIBUTION_LEVELS = ("distribution", "idm")
# MTT's and FTD's family matches training trajectories, not one step's statistics: it has its
# own loop in the condense stage (condense.method.trajectory) and no entry among the levels.
TRAJECTORY = "trajectory"


def uses_frozen_batchnorm(cfg: MatchingConfig) -> bool:
    """DC's BatchNorm rule (statistics from a few real images, then frozen) serves the gradient
    levels; DM's level runs BatchNorm in train mode on its own batches."""
    return cfg.name not in DISTRIBUTION_LEVELS


def matching_loss(step: MatchStep, cfg: MatchingConfig) -> torch.Tensor:
    return LEVELS[cfg.name](step, cfg)


def validate_matching(
    cfg: MatchingConfig, real_batch: str = "fixed", step_policy: str = "single_step", image_size: int = 0
) -> None:
    require_choice(cfg.name, (*LEVELS, TRAJECTORY), "matching")
    if cfg.name in (*DISTRIBUTION_LEVELS, TRAJECTORY) and real_batch != "fixed":
        raise ConfigError(
            f"real_batch={real_batch} sizes batches by their gradients' direction, and "
            f"matching={cfg.name} takes no real batches' gradients: use real_batch=fixed"
        )
    if cfg.name != TRAJECTORY and cfg.ema_decay != 0:
        raise ConfigError(
            f"matching.ema_decay={cfg.ema_decay} is FTD's option of matching=trajectory, not "
            f"matching={cfg.name}: use matching=trajectory or ema_decay=0"
        )
    validate_distribution_options(cfg, step_policy, image_size)
    if cfg.inter_weight is not None and cfg.inter_weight < 0:
        raise ConfigError(f"matching.inter_weight={cfg.inter_weight}: use a weight >= 0 or null (= C)")
    require_choice(cfg.batching, ("iid", "loader"), "matching.batching")
    if cfg.inter_batch_factor < 1:
        raise ConfigError(f"matching.inter_batch_factor={cfg.inter_batch_factor}: use >= 1")
    if not 0.0 <= cfg.warmup_fraction <= 1.0:
        raise ConfigError(
            f"matching.warmup_fraction={cfg.warmup_fraction}: use a fraction of the iterations in [0, 1]"
        )
    if cfg.warmup_steps < 0:
        raise ConfigError(f"matching.warmup_steps={cfg.warmup_steps}: use >= 0")


def validate_distribution_options(cfg: MatchingConfig, step_policy: str, image_size: int) -> None:
    """IDM's options: valid values, and only on a distribution level."""
    if cfg.expansion < 1:
        raise ConfigError(f"matching.expansion={cfg.expansion}: use 1 (off) or a factor >= 2")
    if image_size and image_size % cfg.expansion:
        raise ConfigError(
            f"matching.expansion={cfg.expansion} does not divide the dataset's {image_size}-pixel images: "
            "use a divisor of the image size"
        )
    if cfg.queue.size and step_policy != "single_step":
        raise ConfigError(
            f"matching.queue.size={cfg.queue.size} matches under queued models that are trained on real "
            f"images, not in an inner loop: use step_policy=single_step, not {step_policy}"
        )
    if cfg.class_weight < 0:
        raise ConfigError(f"matching.class_weight={cfg.class_weight}: use a weight >= 0 (0: off)")
    validate_queue(cfg.queue)
    used = {
        "matching.expansion": cfg.expansion != 1,
        "matching.queue.size": cfg.queue.size != 0,
        "matching.class_weight": cfg.class_weight != 0,
        "matching.per_class_steps": cfg.per_class_steps,
    }
    if cfg.name not in DISTRIBUTION_LEVELS and (named := [k for k, on in used.items() if on]):
        raise ConfigError(
            f"{named[0]} is an option of the distribution levels, not matching={cfg.name}: "
            "use matching=distribution or matching=idm"
        )
