"""Tracking as a side channel: W&B (offline by default) or nothing.

The run never depends on the logger: every call is guarded, the first failure warns once and
turns the logger off, and every number also lands in the run's local metrics.json.
W&B's files (offline runs included) are kept inside the run's output folder.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from condense.primitives.dataset import denormalise
from condense.schema import ConfigError, LoggerConfig, require_choice

if TYPE_CHECKING:  # the plan imports validation, which imports this module's validate_logger
    from condense.app.plan import RunPlan


class NullLogger:
    """Logs nothing; the default when W&B is off."""

    def log(self, data: dict[str, Any], step: int | None = None) -> None: ...

    def log_images(
        self,
        key: str,
        images: torch.Tensor,
        labels: torch.Tensor,
        mean: list[float],
        std: list[float],
        step: int | None = None,
    ) -> None: ...

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]]) -> None: ...

    def summary(self, data: dict[str, Any]) -> None: ...

    def artifact(self, name: str, kind: str, path: Path) -> None: ...

    def folder_artifact(self, name: str, kind: str, folder: Path) -> None: ...

    def use_input(self, name: str, folder: Path) -> None: ...

    def finish(self, exit_code: int = 0) -> None: ...


class WandbLogger(NullLogger):
    def __init__(self, run: Any) -> None:
        self.run = run
        self.broken = False

    def _guard(self, what: str, action: Callable[[], None]) -> None:
        if self.broken:
            return
        try:
            action()
        except Exception as err:  # a logging failure must never cost a result
            self.broken = True
            warnings.warn(
                f"W&B {what} failed ({err}); logging is off for the rest of this run, "
                "metrics.json keeps every number",
                stacklevel=2,
            )

    def log(self, data: dict[str, Any], step: int | None = None) -> None:
        self._guard("log", lambda: self.run.log(data, step=step))

    def log_images(
        self,
        key: str,
        images: torch.Tensor,
        labels: torch.Tensor,
        mean: list[float],
        std: list[float],
        step: int | None = None,
    ) -> None:
        import wandb
        from torchvision.utils import make_grid

        def action() -> None:
            order = torch.argsort(labels.cpu(), stable=True)
            pixels = denormalise(images.detach().cpu()[order], mean, std).clamp(0, 1)
            ipc = int(torch.bincount(labels.cpu()).max())
            grid = make_grid(pixels, nrow=ipc, padding=1)
            array = (grid.permute(1, 2, 0).numpy() * 255).astype("uint8")
            self.run.log({key: wandb.Image(array, caption="one row per class")}, step=step)

        self._guard("image", action)

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]]) -> None:
        import wandb

        self._guard("table", lambda: self.run.log({key: wandb.Table(columns=columns, data=rows)}))

    def summary(self, data: dict[str, Any]) -> None:
        self._guard("summary", lambda: self.run.summary.update(data))

    def artifact(self, name: str, kind: str, path: Path) -> None:
        import wandb

        def action() -> None:
            art = wandb.Artifact(name, type=kind)
            art.add_file(str(path))
            self.run.log_artifact(art)

        self._guard("artifact", action)

    def folder_artifact(self, name: str, kind: str, folder: Path) -> None:
        """A folder kept outside the run (the experts' cache) as a reference artifact: W&B
        records its files' checksums, not copies."""
        import wandb

        def action() -> None:
            art = wandb.Artifact(name, type=kind)
            art.add_reference(f"file://{folder.resolve()}")
            self.run.log_artifact(art)

        self._guard("artifact", action)

    def use_input(self, name: str, folder: Path) -> None:
        """Declare artifact `name` this run's input (online; W&B refuses it offline, where the
        config's `input/<name>` names it and the folder instead)."""
        self._guard("input", lambda: self.run.config.update({f"input/{name}": str(folder)}))
        if self.run.settings.mode != "offline":
            self._guard("input", lambda: self.run.use_artifact(f"{name}:latest"))

    def finish(self, exit_code: int = 0) -> None:
        self._guard("finish", lambda: self.run.finish(exit_code=exit_code))


def wandb_environment(out: Path) -> None:
    """Keep every W&B file (run, cache, data, settings) inside the run's folder."""
    root = out / "wandb_home"
    for var, sub in (
        ("WANDB_DIR", ""),
        ("WANDB_CACHE_DIR", "cache"),
        ("WANDB_DATA_DIR", "data"),
        ("WANDB_CONFIG_DIR", "config"),
    ):
        path = root / sub
        path.mkdir(parents=True, exist_ok=True)
        os.environ[var] = str(path)


def make_logger(plan: RunPlan, job_type: str) -> NullLogger:
    """A W&B run for one stage, named and grouped by the plan's identity: the precision as run is
    in the group, so bf16 and fp32 runs are never pooled."""
    lc: LoggerConfig = plan.cfg.logger
    if lc.name == "none":
        return NullLogger()
    wandb_environment(plan.out)
    try:
        import wandb

        run = wandb.init(
            project=lc.project,
            entity=lc.entity,
            mode=lc.mode,
            dir=str(plan.out / "wandb_home"),
            group=plan.identity.group,
            job_type=job_type,
            tags=list(plan.identity.tags),
            config=plan.wandb_config(),
            name=f"{plan.identity.cell}-seed{plan.cfg.seed}-{job_type}",
            reinit="create_new",
            settings=wandb.Settings(silent=True, console="off"),
        )
    except Exception as err:  # no account, no network, a broken install: the run goes on
        warnings.warn(
            f"W&B did not start ({err}); the run goes on, metrics.json keeps every number",
            stacklevel=2,
        )
        return NullLogger()
    return WandbLogger(run)


def validate_logger(cfg: LoggerConfig) -> None:
    require_choice(cfg.name, ("wandb", "none"), "logger.name")
    require_choice(cfg.mode, ("offline", "online", "disabled"), "logger.mode")
    if cfg.image_every < 1:
        raise ConfigError(f"logger.image_every={cfg.image_every}: use >= 1")
