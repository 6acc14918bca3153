"""Where a benchmark's table goes: a markdown file in the repo (with its command and machine)
and stdout; and the machine facts and process measurements every results file states."""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

import torch

# The CPU's marketing name (hosts differ between runs, and timings with them): condense's own.
from condense.primitives.compute import cpu_has_native_bf16, cpu_model


def machine_description(threads: str | None = None) -> str:
    """One line: CPU, the vector ISA PyTorch's kernels use on it, threads, torch version."""
    capability = torch.backends.cpu.get_cpu_capability()
    threads = threads or f"{torch.get_num_threads()} threads"
    return f"{cpu_model()} ({platform.machine()}, {capability} kernels), {threads}, torch {torch.__version__}"


def cpu_machine() -> str:
    """The CPU a table ran on and whether bf16 is native there: every CPU results file says both."""
    native = "bf16 native" if cpu_has_native_bf16() else "bf16 not native (emulated)"
    return f"{machine_description()}; {native}"


def run_machine() -> str:
    """The machine a table's runs used: the CPU line, and the GPU where torch sees one (condense's
    device=auto then runs there, so a CPU-only line would misname the numbers' machine)."""
    if not torch.cuda.is_available():
        return cpu_machine()
    return f"{cpu_machine()}; GPU: {torch.cuda.get_device_name()} (device=auto runs there)"


def head_commit() -> str:
    """The short commit of the checkout holding these benchmarks, wherever the script runs from
    (a sweep runs in its own folder, beside its data)."""
    here = Path(__file__).resolve().parent
    git = subprocess.run(
        ["git", "-C", str(here), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    return git.stdout.strip()


def write_results(out: Path, lines: list[str]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    print("\n".join(lines))


def max_rss_gib(command: list[str]) -> float:
    """Peak resident memory (GiB) of `command`, run to completion. A fresh wrapper process each
    time: RUSAGE_CHILDREN is the maximum over every child a process ever waited for, so measuring
    two commands from one process would mix them."""
    wrapper = (
        "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, capture_output=True); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    done = subprocess.run(
        [sys.executable, "-c", wrapper, *command], check=True, capture_output=True, text=True
    )
    return int(done.stdout.split()[-1]) / 2**20  # ru_maxrss is in KiB on Linux
