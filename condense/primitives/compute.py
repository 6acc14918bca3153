"""How the arithmetic runs: the precision of each part of a run, and the fast path (`fast=true`)
or the straightforward one (`fast=false`).

Precision is part of a run's protocol, not of its schedule: both paths honour it, and the
resolved precision of every part is recorded with the results. A part is the forward passes and
the loss of one step of one kind of work (PARTS); autocast wraps exactly that, never a backward
pass, an optimizer step or a loop of steps. The reason: autocast caches the bf16 copy of every
fp32 weight until the outermost autocast region closes, so a region around several optimizer
steps keeps computing with the weights as they were when it opened.

- `precision`: `fp32` everywhere, `bf16` autocast in every part, or `auto`: bf16 in the parts
  where it was measured to give fp32's accuracy (AUTO_BF16_PARTS), and only on hardware where
  bf16 is measured faster: CUDA devices with bf16, and CPUs with AMX. On a CPU with AVX512-BF16
  but no AMX, bf16 autocast was slower than fp32 (benchmarks/results/precision*.md), and emulated
  bf16 (AVX2, plain AVX-512) is slower still, so `auto` stays fp32 there.

The straightforward path is plain PyTorch. The fast path changes only where memory comes from:

- `heap_reuse`: glibc hands every allocation above 128 KiB to the kernel as a fresh mmap and
  unmaps it on free, so each step's activations (tens of MB apiece) are page-faulted and zeroed
  anew; an elementwise op then costs about six times its memory traffic. Keeping freed blocks
  in the heap lets the next step reuse pages already mapped. It changes no number.
- `compile`: torch.compile (Inductor) on the first-order passes: the evaluated models' training
  and test, the real images' gradients and the inner training of the condense stage. Inductor
  fuses each norm, activation and pooling into one loop, which on a CPU halves the memory traffic
  those layers are bound by (benchmarks/results/time_to_good_set.md). The matching step's
  synthetic pass stays eager: it is differentiated twice, which compiled graphs do not support.
  Fused kernels round differently, so numbers move at float rounding, not more (tested).

(Worker threads for independent classes and evaluated models were measured slower than one
thread on whole iterations and on evaluation, 0.82-0.90x, and removed: benchmarks/results/
lever_workers.md.)
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import importlib.util
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from functools import cache, partial
from pathlib import Path
from typing import Any, Protocol, TypeVar

import torch

from condense.schema import precision_tag, require_choice

T = TypeVar("T")
# Opens the precision region of one step's forward passes and loss: a fresh one per step, because
# autocast's cached bf16 weights go stale at the next optimizer step.
Autocast = Callable[[], contextlib.AbstractContextManager[Any]]
PRECISIONS = ("auto", "fp32", "bf16")
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
# CPU flags under which bf16 autocast pays: AMX's tile units. AVX512-BF16 alone computes bf16 dot
# products natively but measured slower than fp32 on whole iterations and on evaluation.
FAST_BF16_FLAGS = ("amx_bf16",)
# The parts of a run autocast can cover, each the forward passes and loss of one step:
# matching = the real and synthetic gradients a matching step compares (and BatchNorm's
# statistics pass before it), inner = the condense stage's training steps on the synthetic set
# (and the overfitting monitor's loss), evaluation = the evaluated models' training and test.
PARTS = ("matching", "inner", "evaluation")
# Where precision=auto takes bf16 on native hardware: the parts whose bf16 accuracy matched fp32's
# within noise in benchmarks/precision.py (results in benchmarks/results/precision.md).
AUTO_BF16_PARTS: tuple[str, ...] = ("matching", "inner", "evaluation")


@cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (Linux; elsewhere none are assumed)."""
    try:
        return frozenset(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return frozenset()


def cpu_has_native_bf16() -> bool:
    """True when the CPU computes bf16 natively (AMX-BF16 or AVX512-BF16): results files say so."""
    return any(flag in cpu_flags() for flag in NATIVE_BF16_FLAGS)


def native_bf16(device: torch.device) -> bool:
    """Whether this device computes bf16 natively (else autocast would emulate it, slowly)."""
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    return device.type == "cpu" and cpu_has_native_bf16()


def bf16_pays(device: torch.device) -> bool:
    """Whether bf16 autocast was measured faster than fp32 on this kind of device."""
    if device.type == "cuda":
        return native_bf16(device)
    return device.type == "cpu" and any(flag in cpu_flags() for flag in FAST_BF16_FLAGS)


def bf16_parts(precision: str, device: torch.device) -> frozenset[str]:
    """The parts a precision setting runs under bf16 autocast on this device."""
    if precision == "bf16":
        return frozenset(PARTS)
    if precision == "auto" and bf16_pays(device):
        return frozenset(AUTO_BF16_PARTS)
    return frozenset()


# mallopt parameters and glibc's documented defaults (malloc.h; mallopt(3)).
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
GLIBC_TRIM_THRESHOLD, GLIBC_MMAP_MAX = 128 * 1024, 65536
# mallopt takes an int: 2 GiB of free heap top is more than any step frees, so 'never trim'.
NEVER_TRIM = 2**31 - 1


@cache
def glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc (it has mallopt); None on musl, macOS and Windows."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "gnu_get_libc_version") else None


def mallopt(param: int, value: int) -> bool:
    """glibc's mallopt; False where the C library is not glibc or refused the value."""
    libc = glibc()
    if libc is None:
        return False
    libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(libc.mallopt(param, value))


def set_heap_reuse(enabled: bool) -> bool:
    """Keep freed memory in the heap (enabled) or restore glibc's static defaults; process-wide.
    Returns False where the C library is not glibc and nothing changed."""
    trim = NEVER_TRIM if enabled else GLIBC_TRIM_THRESHOLD
    mmap_max = 0 if enabled else GLIBC_MMAP_MAX
    return mallopt(M_MMAP_MAX, mmap_max) and mallopt(M_TRIM_THRESHOLD, trim)


class ComputeSettings(Protocol):
    """The four settings of a run the compute plan reads (the `compute` role in schema.ROLES, less
    the device, which is resolved first)."""

    precision: str
    fast: bool
    heap_reuse: bool
    compile: bool


@dataclass(frozen=True)
class Compute:
    """The resolved plan: the parts that run under bf16 autocast (the rest is fp32), and whether
    freed memory stays in the heap."""

    device: torch.device
    bf16: frozenset[str] = frozenset()
    heap_reuse: bool = False
    compile: bool = False

    @classmethod
    def resolve(
        cls, device: torch.device, precision: str, fast: bool, heap_reuse: bool, compile: bool
    ) -> Compute:
        """The plan for these settings on `device`: the straightforward path (fast=false) keeps
        the precision (it is protocol) and drops the speed levers."""
        bf16 = bf16_parts(precision, device)
        if not fast:
            return cls(device, bf16)
        return cls(device, bf16, heap_reuse and glibc() is not None, compile)

    @classmethod
    def for_run(cls, settings: ComputeSettings, device: torch.device) -> Compute:
        """The plan for a run's compute settings (a RunConfig has them; so may any object)."""
        return cls.resolve(device, settings.precision, settings.fast, settings.heap_reuse, settings.compile)

    def compiled(self, net: T) -> T:
        """`net` under torch.compile when the plan compiles, else itself. The compiled module shares
        the parameters and train/eval mode; networks of one architecture reuse one compiled graph
        (their parameters are the graph's inputs), so each new model costs no recompile."""
        return torch.compile(net) if self.compile else net  # type: ignore[return-value]

    @contextlib.contextmanager
    def process_settings(self) -> Iterator[None]:
        """The process-wide part of the plan (the allocator) while the run works, glibc's defaults
        again after it, so the next job of a sweep in this process starts as a fresh one would.

        Without heap reuse the allocator is left as glibc starts it (its mmap threshold adapts
        until a mallopt call freezes it), so fast=false is plain PyTorch: the honest baseline."""
        if self.heap_reuse:
            set_heap_reuse(True)
        try:
            yield
        finally:
            if self.heap_reuse:
                set_heap_reuse(False)

    def autocaster(self, part: str) -> Autocast:
        """A fresh autocast region for one step's forward passes and loss of `part`: entered
        anew for every step (so no stale bf16 weight copy outlives an optimizer step) and by
        whichever thread runs the step (autocast is thread-local)."""
        if part not in PARTS:
            raise ValueError(f"unknown part {part!r}: one of {', '.join(PARTS)}")
        if part not in self.bf16:
            return nullcontext
        return partial(torch.autocast, self.device.type, dtype=torch.bfloat16)

    def precisions(self) -> dict[str, str]:
        """Each part's precision, for the printed plan, metrics.json, W&B and the report."""
        return {part: "bf16" if part in self.bf16 else "fp32" for part in PARTS}

    def describe(self) -> str:
        levers = (["heap reuse"] if self.heap_reuse else []) + (["torch.compile"] if self.compile else [])
        return ", ".join([precision_tag(self.precisions()), *levers])


def compile_toolchain_missing(device: torch.device) -> str | None:
    """What torch.compile would lack on this device, or None: Inductor builds C++ on a CPU and
    Triton kernels on CUDA, and without them it fails at the first compiled call, mid-run."""
    if device.type == "cuda":
        return None if importlib.util.find_spec("triton") else "the triton package"
    cxx = os.environ.get("CXX") or "g++"  # the compiler Inductor calls on Linux
    return None if shutil.which(cxx) else f"a C++ compiler ({cxx}; set CXX to use another)"


def validate_compute(settings: ComputeSettings) -> None:
    require_choice(settings.precision, PRECISIONS, "precision")
