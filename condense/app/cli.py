"""The `condense` command: a Hydra app that runs one run (condense.app.run) per job.

condense                                   digits, IPC 10, DC, evaluated beside a random subset
condense dataset=fashion_mnist ipc=1 method=ours_mda
condense stage=evaluate synthetic=PATH/synthetic.safetensors evaluation=cross_arch
condense stage=evaluate synthetic=MTT_RUN_FOLDER dataset=cifar10 dataset.zca=true ranking=dd_ranking ...
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from condense.app import jobs
from condense.app.labels import conf_dir, register_label_resolvers
from condense.app.run import run
from condense.app.sweep import record_failure
from condense.schema import ConfigError, preset_of, register_configs, to_run_config
from condense.stages.condensation import NumericsError, RunInterrupted

CONFIG_PATH = str(conf_dir())


def register_resolvers() -> None:
    """The schema and the resolvers its YAML names (protocol rules, the run folder's label)."""
    register_configs()
    register_label_resolvers()


def compose_config(overrides: Sequence[str], with_hydra: bool = False) -> DictConfig:
    """The config `condense OVERRIDES...` would run, composed without starting a job (benchmarks,
    notebooks, tests); with_hydra keeps the `hydra` node (launcher, sweeper params). Add
    output_dir=PATH to the overrides if anything will be written."""
    from hydra import compose, initialize_config_dir

    register_resolvers()
    with initialize_config_dir(config_dir=CONFIG_PATH, version_base="1.3"):
        if not any(o.startswith("output_dir=") for o in overrides):
            overrides = [*overrides, "output_dir=unused"]
        cfg = compose("config", overrides=list(overrides), return_hydra_config=True)
    cfg.preset = preset_of(cfg.hydra.runtime.choices)
    if not with_hydra:
        with open_dict(cfg):
            del cfg["hydra"]
    return cfg


def objective(metrics: dict[str, Any]) -> float | None:
    """The mean accuracy of the run's set over its pool: a scalar for Hydra's Optuna sweeper."""
    own = metrics.get("evaluation", {}).get(metrics["label"], {})
    means = [result["mean"] for result in own.values()]
    return sum(means) / len(means) if means else None


def interrupted(err: RunInterrupted, output_dir: str) -> None:
    """Exit after a signal, the checkpoint saved; under Slurm, hand SIGUSR2 to submitit's handler,
    which requeues the job."""
    if err.signum == signal.SIGUSR2 and callable(err.previous):
        print(f"{err}: checkpoint saved; handing the signal to the job's handler", file=sys.stderr)
        err.previous(err.signum, None)
    print(
        f"error: {err}; rerun the same command with resume=true hydra.run.dir={output_dir}",
        file=sys.stderr,
    )
    sys.exit(128 + err.signum)


def run_job(cfg: DictConfig) -> dict[str, Any]:
    """One job: the typed config, the sweep's tag, the Slurm allocation and requeue."""
    run_cfg = to_run_config(cfg)
    run_cfg.preset = preset_of(HydraConfig.get().runtime.choices)
    if jobs.is_multirun():  # every job of a sweep shares one W&B tag
        run_cfg.logger.tags = [*run_cfg.logger.tags, jobs.sweep_tag()]
    jobs.use_slurm_allocation()
    if (restarts := jobs.slurm_restarts()) and not run_cfg.resume:  # continue, never redo
        print(f"requeued by Slurm (restart {restarts}): resume=true in {run_cfg.output_dir}")
        run_cfg.resume = True
    return run(run_cfg)


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="config")
def app(cfg: DictConfig) -> float | None:
    try:
        with jobs.job_settings():
            metrics = run_job(cfg)
    except RunInterrupted as err:
        interrupted(err, cfg.output_dir)
    except Exception as err:
        if jobs.is_multirun():  # record it in the job's folder; the sweep goes on (condense.app.sweep)
            record_failure(Path(cfg.output_dir), err)
            print(f"error: job failed: {err}", file=sys.stderr)
            return None
        if isinstance(err, ConfigError | NumericsError):  # one line: a mistake, or numbers gone bad
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2 if isinstance(err, ConfigError) else 3)
        raise
    return objective(metrics)


def main() -> None:
    register_resolvers()
    app()


if __name__ == "__main__":
    main()
