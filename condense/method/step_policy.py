"""When to stop: how many outer steps an iteration takes and how long the network trains between
them.

- dc: DC's loop table (ipc -> outer_loop, inner epochs), extended to every IPC: outer_loop = ipc
  up to 50; inner epochs interpolate linearly between the table's points, 50 below IPC 10 and
  10 above IPC 50.
- schedule: the paper's decaying inner epochs 50, 40, 30, 20, then 10 up to ol 9, then 5
  (its multi-level.py with --adaptive_step).
- schedule_single_level: the same rule with the paper's single-level scripts' list (baseline.py,
  inter-class.py, interleaved.py with --adaptive_step): 100, 50, 50, 50, then 10, then 5.
- overfit: train until the loss on a mixed real batch first rises, or `cap` epochs (the paper's
  multi-level-overfitting.py: a fresh batch of 256 before each inner loop, measured in train mode).
- fixed: explicit outer_loop and inner_epochs.
- dcc: DCC's table (Saehyung-Lee/DCC utils.py get_loops): DC's except at IPC 1, where it takes
  10 outer steps with 5 inner epochs between them instead of DC's single step.
- single_step: one matching step per network and no training (DM: every iteration embeds with a
  fresh random network).
"""

from __future__ import annotations

from collections.abc import Callable

from condense.schema import ConfigError, StepPolicyConfig, require_choice

# DC's table: ipc -> (outer_loop, inner epochs)
DC_LOOPS = {1: (1, 1), 10: (10, 50), 20: (20, 25), 30: (30, 20), 40: (40, 15), 50: (50, 10)}
# DCC's table where it differs from DC's: ipc -> (outer_loop, inner epochs)
DCC_LOOPS = {1: (10, 5)}
POLICIES = ("dc", "schedule", "schedule_single_level", "overfit", "fixed", "dcc", "single_step")


def dc_outer_loop(ipc: int) -> int:
    return min(ipc, 50)


def dc_inner_epochs(ipc: int) -> int:
    if ipc in DC_LOOPS:
        return DC_LOOPS[ipc][1]
    if ipc < 10:
        return 50
    if ipc > 50:
        return 10
    lo = max(k for k in DC_LOOPS if k < ipc)
    hi = min(k for k in DC_LOOPS if k > ipc)
    a, b = DC_LOOPS[lo][1], DC_LOOPS[hi][1]
    return round(a + (b - a) * (ipc - lo) / (hi - lo))


def policy_outer_loop(name: str, ipc: int) -> int:
    """The policy's own outer-loop count at this IPC."""
    if name == "single_step":
        return 1
    if name == "dcc" and ipc in DCC_LOOPS:
        return DCC_LOOPS[ipc][0]
    return dc_outer_loop(ipc)


def outer_loop(cfg: StepPolicyConfig, ipc: int) -> int:
    return cfg.outer_loop if cfg.outer_loop is not None else policy_outer_loop(cfg.name, ipc)


def dcc_inner_epochs(ipc: int) -> int:
    return DCC_LOOPS[ipc][1] if ipc in DCC_LOOPS else dc_inner_epochs(ipc)


def scheduled_epochs(cfg: StepPolicyConfig, ol: int) -> int:
    return cfg.epochs[ol] if ol < len(cfg.epochs) else cfg.tail


EPOCH_RULES: dict[str, Callable[[StepPolicyConfig, int, int], int]] = {
    "dc": lambda cfg, ipc, ol: cfg.inner_epochs if cfg.inner_epochs is not None else dc_inner_epochs(ipc),
    "schedule": lambda cfg, ipc, ol: scheduled_epochs(cfg, ol),
    "schedule_single_level": lambda cfg, ipc, ol: scheduled_epochs(cfg, ol),
    "overfit": lambda cfg, ipc, ol: cfg.cap,
    "fixed": lambda cfg, ipc, ol: cfg.inner_epochs,  # type: ignore[misc,return-value]
    "dcc": lambda cfg, ipc, ol: cfg.inner_epochs if cfg.inner_epochs is not None else dcc_inner_epochs(ipc),
    "single_step": lambda cfg, ipc, ol: 0,
}


def max_inner_epochs(cfg: StepPolicyConfig, ipc: int, ol: int) -> int:
    """Inner epochs after outer step ol (for `overfit`, the cap; it may stop earlier)."""
    return EPOCH_RULES[cfg.name](cfg, ipc, ol)


def stops_on_rise(cfg: StepPolicyConfig) -> bool:
    return cfg.name == "overfit"


class LossRiseMonitor:
    """The overfitting signal: has the monitored loss risen since the previous epoch?"""

    def __init__(self, initial: float) -> None:
        self.previous = initial

    def rose(self, loss: float) -> bool:
        rose = loss > self.previous
        self.previous = loss
        return rose


def validate_step_policy(cfg: StepPolicyConfig) -> None:
    require_choice(cfg.name, POLICIES, "step_policy")
    if cfg.name == "fixed" and (cfg.outer_loop is None or cfg.inner_epochs is None):
        raise ConfigError(
            "step_policy=fixed needs both counts: set step_policy.outer_loop=N step_policy.inner_epochs=M"
        )
    if cfg.outer_loop is not None and cfg.outer_loop < 1:
        raise ConfigError(f"step_policy.outer_loop={cfg.outer_loop}: use >= 1")
    if cfg.inner_epochs is not None and cfg.inner_epochs < 0:
        raise ConfigError(f"step_policy.inner_epochs={cfg.inner_epochs}: use >= 0")
    if cfg.cap < 1 or cfg.tail < 0 or any(e < 0 for e in cfg.epochs):
        raise ConfigError("step_policy.cap must be >= 1 and step_policy.epochs/tail >= 0")
    require_choice(cfg.monitor_refresh, ("outer_step", "iteration"), "step_policy.monitor_refresh")
    require_choice(cfg.monitor_mode, ("train", "eval"), "step_policy.monitor_mode")
    if cfg.monitor_batch < 1:
        raise ConfigError(f"step_policy.monitor_batch={cfg.monitor_batch}: use >= 1")
