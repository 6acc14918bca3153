"""How a run lives inside a sweep or a Slurm job: the sweep's shared W&B tag, the CPUs a Slurm job
was given, resuming after a requeue, and leaving the process as it found it for the next job."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch


def is_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def sweep_tag() -> str:
    """The W&B tag every job of one sweep shares."""
    from hydra.core.hydra_config import HydraConfig

    return f"sweep-{Path(HydraConfig.get().sweep.dir).name}"


def use_slurm_allocation() -> None:
    """In a Slurm job, use the CPUs it was given (SLURM_CPUS_PER_TASK) as PyTorch threads, unless
    OMP_NUM_THREADS says otherwise: jobs sharing a node must not each claim every core."""
    cpus = os.environ.get("SLURM_CPUS_PER_TASK")
    if cpus and cpus.isdigit() and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(int(cpus))
        print(f"Slurm job: {cpus} CPUs -> {cpus} PyTorch threads")


def slurm_restarts() -> int:
    """How often Slurm requeued this job (preempted, timed out): such a job resumes, never redoes."""
    return int(os.environ.get("SLURM_RESTART_COUNT") or 0)


@contextmanager
def job_settings() -> Iterator[None]:
    """The PyTorch thread count and the environment (W&B's folders) as they were before the job:
    jobs of one sweep that share a process (the basic and joblib launchers) each start clean."""
    threads, environment = torch.get_num_threads(), dict(os.environ)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        os.environ.clear()
        os.environ.update(environment)
