"""Validation of the whole run before any work starts: the run-level ranges here, each config
group's own checks in its module (one registry of them below). Every message is one line that
names the setting and the fix."""

from __future__ import annotations

from collections.abc import Callable

from condense.app.logger import validate_logger
from condense.method.coreset import validate_coreset
from condense.method.distance import validate_distance
from condense.method.experts import validate_experts
from condense.method.init import validate_init
from condense.method.matching import TRAJECTORY, validate_matching
from condense.method.real_batch import validate_real_batch
from condense.method.step_policy import validate_step_policy
from condense.method.trajectory import validate_trajectory
from condense.primitives.augment import validate_augment
from condense.primitives.compute import validate_compute
from condense.primitives.dataset import validate_dataset
from condense.primitives.foreign import validate_reader
from condense.primitives.network import validate_network
from condense.schema import ConfigError, RunConfig, require_choice
from condense.stages.condensation import IMAGE_LR_SCHEDULES
from condense.stages.evaluation import validate_evaluation
from condense.stages.ranking import validate_ranking

STAGES = ("all", "experts", "condense", "evaluate")
DEVICES = ("auto", "cpu", "cuda")

# Each config group's validation, owned by the group's module.
GROUP_CHECKS: dict[str, Callable[[RunConfig], None]] = {
    "dataset": lambda cfg: validate_dataset(cfg.dataset),
    "network": lambda cfg: validate_network(cfg.network, "network"),
    "distance": lambda cfg: validate_distance(cfg.distance),
    "matching": lambda cfg: validate_matching(
        cfg.matching, cfg.real_batch.name, cfg.step_policy.name, cfg.dataset.image_size
    ),
    "experts": lambda cfg: validate_experts(cfg.experts, cfg.stage),
    "trajectory": lambda cfg: (
        validate_trajectory(cfg.matching, cfg.step_policy.name, cfg.experts.epochs)
        if cfg.matching.name == TRAJECTORY
        else None
    ),
    "step_policy": lambda cfg: validate_step_policy(cfg.step_policy),
    "real_batch": lambda cfg: validate_real_batch(cfg.real_batch, cfg.batch_real),
    "init": lambda cfg: validate_init(cfg.init),
    "augment": lambda cfg: validate_augment(cfg.augment),
    "evaluation": lambda cfg: validate_evaluation(cfg.evaluation, cfg.iterations),
    "coreset": lambda cfg: validate_coreset(cfg.coreset),
    "reader": lambda cfg: validate_reader(cfg.reader),
    "ranking": lambda cfg: validate_ranking(cfg.ranking),
    "logger": lambda cfg: validate_logger(cfg.logger),
    "compute": validate_compute,
}


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate_run_values(cfg: RunConfig) -> None:
    """The run-level settings that belong to no group."""
    require_choice(cfg.stage, STAGES, "stage")
    _require(cfg.ipc >= 1, f"ipc={cfg.ipc} is out of range: images per class must be >= 1 (e.g. ipc=10)")
    _require(cfg.iterations >= 0, f"iterations={cfg.iterations} is out of range: use iterations>=0")
    for key in ("lr_img", "lr_net"):
        value = getattr(cfg, key)
        _require(value > 0, f"{key}={value} is out of range: a learning rate must be > 0 (e.g. {key}=0.1)")
    require_choice(cfg.lr_img_schedule, IMAGE_LR_SCHEDULES, "lr_img_schedule")
    for key in ("batch_real", "batch_train", "bn_real_per_class"):
        value = getattr(cfg, key)
        _require(value >= 1, f"{key}={value} is out of range: use {key}>=1")
    _require(
        cfg.checkpoint_every >= 0, f"checkpoint_every={cfg.checkpoint_every}: use >= 0 (0 = only at the end)"
    )
    stop = cfg.stop
    _require(stop.patience >= 0, f"stop.patience={stop.patience}: use >= 0 (0 = run every iteration)")
    _require(stop.window >= 1, f"stop.window={stop.window}: use >= 1 iterations per window")
    _require(
        0 <= stop.min_improvement < 1,
        f"stop.min_improvement={stop.min_improvement}: use a relative gain in [0, 1), e.g. 0.01",
    )
    device = str(cfg.device)
    _require(
        device in DEVICES or device.startswith("cuda:"),
        f"device={device} is unknown: use device=auto, cpu, cuda or cuda:N",
    )
    _require(
        cfg.stage != "evaluate" or cfg.synthetic is not None,
        "stage=evaluate needs a synthetic set: add synthetic=PATH (a synthetic.safetensors, DC's res_*.pt, "
        "MTT's run folder or a folder of PNGs per class)",
    )


def validate(cfg: RunConfig) -> None:
    """Check every range before any work starts; the message names the setting and the fix."""
    validate_run_values(cfg)
    for check in GROUP_CHECKS.values():
        check(cfg)
