"""How the arithmetic runs: the precision of each part of a run, and the fast path (`fast=true`)
or the straightforward one (`fast=false`).

Precision is part of a run's protocol, not of its schedule: both paths honour it, and the
resolved precision of every part is recorded with the results. A part is the forward passes and
the loss of one step of one kind of work (PARTS); autocast wraps exactly that, never a backward
pass, an optimizer step or a loop of steps. The reason: autocast caches the bf16 copy of every
fp32 weight until the outermost autocast region closes, so a region around several optimizer
steps keeps computing with the weights as they were when it opened.

- `precision`: `fp32` everywhere (the default: every published number was made in fp32; on CUDA
  TF32 is switched off for matmuls and cuDNN while a run works), `tf32` (fp32 storage, TF32
  matmuls and convolutions on CUDA; plain fp32 on a CPU), `bf16` autocast in every part, or
  `auto`: bf16 in the parts where it was measured to give fp32's accuracy (AUTO_BF16_PARTS), and
  only where it is measured faster on this device. No rule on CPU flags can say that (AVX512-BF16
  without AMX measured 1.46x faster on one CPU and slower on another), so `auto` times the run's
  own network, forward and backward at the run's batch shape, in fp32 and in bf16 (about a
  second), and takes bf16 from AUTO_MIN_SPEEDUP up. The ratio is cached per device, torch version
  and network shape, recorded with the results, and a resumed run reuses its checkpoint's.

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
import hashlib
import importlib.util
import json
import os
import shutil
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from functools import cache, partial
from pathlib import Path
from typing import Any, Protocol, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from condense.primitives.files import atomic_write
from condense.schema import precision_tag, require_choice

T = TypeVar("T")
# Opens the precision region of one step's forward passes and loss: a fresh one per step, because
# autocast's cached bf16 weights go stale at the next optimizer step.
Autocast = Callable[[], contextlib.AbstractContextManager[Any]]
PRECISIONS = ("fp32", "tf32", "bf16", "auto")
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
# precision=auto takes bf16 from this measured speed-up (fp32 time / bf16 time) up: below it the
# gain does not pay for leaving the reference arithmetic.
AUTO_MIN_SPEEDUP = 1.2
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


def bf16_parts(precision: str, speedup: float | None = None) -> frozenset[str]:
    """The parts a precision setting runs under bf16 autocast; for `auto`, given bf16's measured
    speed-up on this device (None: not measured, so fp32)."""
    if precision == "bf16":
        return frozenset(PARTS)
    if precision == "auto" and speedup is not None and speedup >= AUTO_MIN_SPEEDUP:
        return frozenset(AUTO_BF16_PARTS)
    return frozenset()


@dataclass(frozen=True)
class Bf16Speedup:
    """precision=auto's evidence: fp32's time over bf16's for the run's network and batch on this
    device, and where the number came from (measured now, cached, or the checkpoint's)."""

    ratio: float
    source: str  # measured | cached | checkpoint

    def as_dict(self) -> dict[str, Any]:
        return {"bf16_speedup": round(self.ratio, 3), "source": self.source, "threshold": AUTO_MIN_SPEEDUP}

    def describe(self) -> str:
        """For the card: the ratio, not its source (a cached ratio is the measured one)."""
        return f"bf16 measured {self.ratio:.2f}x fp32's speed, taken from {AUTO_MIN_SPEEDUP}x"


def synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_bf16_speedup(net: nn.Module, x: torch.Tensor, y: torch.Tensor, budget_s: float = 1.0) -> float:
    """fp32's median time over bf16 autocast's for one forward, loss and backward of `net` on
    (x, y), the two alternating (so drift hits both), for about `budget_s` (at least 2 each)."""

    def seconds(bf16: bool) -> float:
        region = torch.autocast(x.device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
        start = time.perf_counter()
        with region:
            loss = F.cross_entropy(net(x), y)
        loss.backward()
        synchronise(x.device)
        return time.perf_counter() - start

    seconds(False), seconds(True)  # warm-up: allocations, kernel choice
    fp32, bf16 = [seconds(False)], [seconds(True)]
    begun = time.perf_counter()
    while len(fp32) < 2 or (time.perf_counter() - begun < budget_s and len(fp32) < 50):
        fp32.append(seconds(False))
        bf16.append(seconds(True))
    return statistics.median(fp32) / statistics.median(bf16)


@cache
def cpu_model() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return "unknown CPU"
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else "unknown CPU"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} ({'bf16 native' if cpu_has_native_bf16() else 'bf16 emulated'})"


def speedup_key(device: torch.device, network: dict[str, Any], batch_shape: tuple[int, ...]) -> str:
    """The cache key of a measurement: device, torch version, the network's shape, the batch."""
    text = json.dumps([device_name(device), torch.__version__, network, list(batch_shape)], sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def speedup_cache() -> Path:
    """Where measured ratios are kept: $CONDENSE_CACHE, else ~/.cache/condense."""
    root = os.environ.get("CONDENSE_CACHE") or Path.home() / ".cache" / "condense"
    return Path(root) / "precision.json"


def cached_speedup(key: str) -> float | None:
    try:
        entry = json.loads(speedup_cache().read_text()).get(key)
    except (OSError, ValueError):
        return None
    return float(entry["bf16_speedup"]) if isinstance(entry, dict) and "bf16_speedup" in entry else None


def store_speedup(key: str, ratio: float, what: str) -> None:
    path = speedup_cache()
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError):
        table = {}
    table[key] = {"bf16_speedup": ratio, "what": what}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: tmp.write_text(json.dumps(table, indent=1, sort_keys=True)))
    except OSError:  # a read-only home: the run measures again next time, nothing else changes
        pass


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
    tf32: bool = False  # precision=tf32 on CUDA: TF32 matmuls and convolutions while the run works
    auto: Bf16Speedup | None = None  # precision=auto: the measured ratio it decided on

    @classmethod
    def resolve(
        cls,
        device: torch.device,
        precision: str,
        fast: bool,
        heap_reuse: bool,
        compile: bool,
        speedup: Bf16Speedup | None = None,
    ) -> Compute:
        """The plan for these settings on `device`: the straightforward path (fast=false) keeps
        the precision (it is protocol) and drops the speed levers. precision=auto without a
        measured `speedup` stays fp32."""
        bf16 = bf16_parts(precision, speedup.ratio if speedup is not None else None)
        tf32 = precision == "tf32" and device.type == "cuda"
        auto = speedup if precision == "auto" else None
        if not fast:
            return cls(device, bf16, tf32=tf32, auto=auto)
        return cls(device, bf16, heap_reuse and glibc() is not None, compile, tf32, auto)

    @classmethod
    def for_run(
        cls, settings: ComputeSettings, device: torch.device, speedup: Bf16Speedup | None = None
    ) -> Compute:
        """The plan for a run's compute settings (a RunConfig has them; so may any object)."""
        return cls.resolve(
            device, settings.precision, settings.fast, settings.heap_reuse, settings.compile, speedup
        )

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
        until a mallopt call freezes it), so fast=false is plain PyTorch: the honest baseline.
        On CUDA, TF32 is on for matmuls and cuDNN exactly when the plan says tf32 (PyTorch's own
        default leaves cuDNN's on), and the previous flags come back after."""
        saved = cuda_tf32_flags() if self.device.type == "cuda" else None
        if saved is not None:
            set_cuda_tf32_flags("high" if self.tf32 else "highest", self.tf32)
        if self.heap_reuse:
            set_heap_reuse(True)
        try:
            yield
        finally:
            if self.heap_reuse:
                set_heap_reuse(False)
            if saved is not None:
                set_cuda_tf32_flags(*saved)

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
        other = "tf32" if self.tf32 else "fp32"
        return {part: "bf16" if part in self.bf16 else other for part in PARTS}

    def describe(self) -> str:
        levers = (["heap reuse"] if self.heap_reuse else []) + (["torch.compile"] if self.compile else [])
        return ", ".join([precision_tag(self.precisions()), *levers])


def cuda_tf32_flags() -> tuple[str, bool]:
    """(float32 matmul precision, cuDNN TF32): the process's TF32 switches."""
    return torch.get_float32_matmul_precision(), bool(torch.backends.cudnn.allow_tf32)


def set_cuda_tf32_flags(matmul: str, cudnn: bool) -> None:
    torch.set_float32_matmul_precision(matmul)
    torch.backends.cudnn.allow_tf32 = cudnn


def compile_toolchain_missing(device: torch.device) -> str | None:
    """What torch.compile would lack on this device, or None: Inductor builds C++ on a CPU and
    Triton kernels on CUDA, and without them it fails at the first compiled call, mid-run."""
    if device.type == "cuda":
        return None if importlib.util.find_spec("triton") else "the triton package"
    cxx = os.environ.get("CXX") or "g++"  # the compiler Inductor calls on Linux
    return None if shutil.which(cxx) else f"a C++ compiler ({cxx}; set CXX to use another)"


def validate_compute(settings: ComputeSettings) -> None:
    require_choice(settings.precision, PRECISIONS, "precision")
