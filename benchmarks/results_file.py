"""Where a benchmark's table goes: a markdown file in the repo (with its command and machine)
and stdout."""

from __future__ import annotations

import platform
from pathlib import Path

import torch


def cpu_model() -> str:
    """The CPU's marketing name: hosts differ between runs, and timings with them."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_description(threads: str) -> str:
    """One line: CPU, the vector ISA PyTorch's kernels use on it, threads, torch version."""
    capability = torch.backends.cpu.get_cpu_capability()
    return f"{cpu_model()} ({platform.machine()}, {capability} kernels), {threads}, torch {torch.__version__}"


def write_results(out: Path, lines: list[str]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    print("\n".join(lines))
