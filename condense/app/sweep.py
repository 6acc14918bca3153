"""Sweeps: a failed job is recorded in its own folder and the sweep goes on; at the end a summary
names every failed job and the command exits non-zero. Works with any launcher, since the
summary reads the jobs' folders rather than in-process state."""

from __future__ import annotations

import traceback
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

FAILURE_FILE = "failure.txt"


def record_failure(out: Path, err: BaseException) -> None:
    out.mkdir(parents=True, exist_ok=True)
    lines = traceback.format_exception(type(err), err, err.__traceback__)
    (out / FAILURE_FILE).write_text(f"{type(err).__name__}: {err}\n\n{''.join(lines)}")


def failed_jobs(sweep_dir: Path) -> list[tuple[Path, str]]:
    return [(f.parent, f.read_text().splitlines()[0]) for f in sorted(sweep_dir.rglob(FAILURE_FILE))]


class SweepSummary(Callback):
    """Registered in conf/config.yaml under hydra.callbacks."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        failures = failed_jobs(sweep_dir)
        done = len(list(sweep_dir.rglob("metrics.json")))
        print(f"sweep: {done} jobs wrote results under {sweep_dir}; {len(failures)} failed")
        for folder, first_line in failures:
            print(f"  failed: {folder.name}: {first_line}")
        if failures:
            raise SystemExit(1)
