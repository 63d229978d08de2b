"""The one module that names devices and CPU features (what the backends in glimpse/backends are chosen from).

`detect(device) -> Platform`: the device kind ("cpu" or "cuda"), the CPU's feature flags (from
/proc/cpuinfo), torch's thread count and whether the native CPU kernels (glimpse/kernels.py) run
here. `one_row_matmuls(rows, dtype, device)` is the one process-wide switch the engine flips (oneDNN
off for one-row reduced-precision matmuls). `ThreadBinding` pins torch's compute threads to cores
(`GLIMPSE_CPU_BIND`); `tune_allocator` and `keep_large_allocations` keep freed memory for reuse. Nothing else in glimpse names a device or a CPU feature;
tests/test_platform_seam.py keeps it so.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

# /proc/cpuinfo names of what csrc/cpu_kernels.cpp is compiled for, and the compiler flags that target them
NATIVE_CPU_FLAGS = frozenset({"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16"})
NATIVE_COMPILER_FLAGS = ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16")
NATIVE_KERNELS_ENV = "GLIMPSE_NATIVE_KERNELS"  # "0" turns the native kernels off
PACKED_WEIGHTS_ENV = "GLIMPSE_PACKED_WEIGHTS"  # "0": never pack; "1": always; unset: while they fit (below)
MALLOC_ENV = "GLIMPSE_MALLOC_TUNING"  # "0": leave glibc malloc's thresholds as they are (tune_allocator)
CPU_BIND_ENV = "GLIMPSE_CPU_BIND"  # "auto" (unset), "off", or CPU lists per rank: "0-3|4-7" (ThreadBinding)


logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Platform:
    """What the backends are selected from; made once at start-up by `detect`."""

    device: str  # "cpu" or "cuda"
    cpu_flags: frozenset[str]
    num_threads: int  # torch's intra-op threads
    native_kernels: bool  # the native CPU kernels are on, the CPU runs them and they built
    packed_weights: bool = False  # bf16 linear weights may be repacked for oneDNN (CPU with bf16 support)
    memory_bytes: int = 0  # the machine's RAM (0: unknown)

    def pack_weights(self, linear_weight_bytes: int) -> bool:
        """Whether to keep a packed copy of `linear_weight_bytes` of linear weights: by default only
        while that copy takes at most a quarter of the RAM (a 9B model's 18 GB would not double on a
        32 GB machine); GLIMPSE_PACKED_WEIGHTS=1 packs whatever the size, =0 never."""
        if not self.packed_weights:
            return False
        forced = os.environ.get(PACKED_WEIGHTS_ENV) == "1"
        return forced or not self.memory_bytes or linear_weight_bytes <= self.memory_bytes // 4

    @property
    def avx512_bf16(self) -> bool:
        return "avx512_bf16" in self.cpu_flags

    @property
    def amx(self) -> bool:
        return {"amx_tile", "amx_bf16"} <= self.cpu_flags

    def describe(self) -> str:
        """One line for the start-up log."""
        features = [
            name for name, present in (("avx512_bf16", self.avx512_bf16), ("amx", self.amx)) if present
        ]
        return (f"{self.device}, {self.num_threads} threads, CPU features: {', '.join(features) or 'none of note'}, "
                f"native kernels {'on' if self.native_kernels else 'off'}, "
                f"packed weights {'on' if self.packed_weights else 'off'}")  # fmt: skip


def detect(device: str | torch.device = "cpu") -> Platform:
    """The platform a model on `device` runs on. Builds the native kernels where they can run (cached
    per machine: ~20 s the first time), so call it at start-up, not inside a request."""
    kind = torch.device(device).type
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"device {kind!r} is not supported; use 'cpu' or 'cuda'")
    native = packed = False
    if kind == "cpu":
        from glimpse import kernels  # it needs this module's flags; imported here to keep the two acyclic

        kernels.quiet_cuda_home_warning()  # before anything imports torch's extension loader (inductor does)
        native = kernels.cpu_kernels() is not None
        packed = packed_weights_requested() and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return Platform(kind, cpu_flags(), torch.get_num_threads(), native, packed, memory_bytes())


def resolve_device(device: str | torch.device = "auto") -> str:
    """The device an engine asked for `device` runs on: "cpu", "cuda" or "cuda:N" as given, "auto" a GPU
    where torch sees one, else the CPU. Raises InvalidInputError for anything else and for a GPU this
    machine does not have, before any weight is read."""
    from glimpse.device_names import DEVICE_HELP, parse_device_name
    from glimpse.errors import InvalidInputError

    name = parse_device_name(str(device))
    if name is None:
        raise InvalidInputError(f"device {str(device)!r} is not supported; use {DEVICE_HELP}")
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name != "cpu":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (torch.device(name).index or 0) >= count:
            raise InvalidInputError(f"device {device!r}: this machine has {count} CUDA GPU(s) that torch can use "
                                    "(--device cpu runs on the CPU)")  # fmt: skip
    return name


def distributed_backend(device: str | torch.device) -> str:
    """The torch.distributed backend for tensor-parallel ranks on `device`: NCCL between GPUs, gloo on CPUs."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def check_rank_devices(device: str | torch.device, size: int) -> None:
    """Refuse `size` tensor-parallel ranks on GPUs this machine does not have (one GPU per rank)."""
    from glimpse.errors import InvalidInputError

    if torch.device(device).type == "cuda" and size > torch.cuda.device_count():
        raise InvalidInputError(f"tensor_parallel_size {size} needs {size} GPUs (one per rank); this machine has "
                                f"{torch.cuda.device_count()}")  # fmt: skip


def rank_device(device: str | torch.device, rank: int) -> str:
    """The device of tensor-parallel rank `rank`: GPU `rank` (made this process's current one), or the CPU."""
    if torch.device(device).type == "cuda":
        torch.cuda.set_device(rank)
        return f"cuda:{rank}"
    return str(device)


def memory_bytes() -> int:
    """MemTotal from /proc/meminfo (0 where there is none)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def packed_weights_requested() -> bool:
    """False when `GLIMPSE_PACKED_WEIGHTS=0` (bf16 linear layers then keep one copy of their weights)."""
    return os.environ.get(PACKED_WEIGHTS_ENV, "1") != "0"


def native_kernels_requested() -> bool:
    """False when `GLIMPSE_NATIVE_KERNELS=0`."""
    return os.environ.get(NATIVE_KERNELS_ENV, "1") != "0"


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as /proc/cpuinfo names them (empty where there is no such file)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


_ONE_ROW_LOCK = threading.Lock()
_one_row_depth = 0  # forwards inside `one_row_matmuls` right now, over all threads
_one_row_saved = True  # torch.backends.mkldnn.enabled when the first of them entered


@contextmanager
def one_row_matmuls(rows: int, dtype: torch.dtype, device: torch.device) -> Iterator[None]:
    """Matmuls with one row (batch-1 decode, a one-row LM head) in bf16/fp16 on CPU run on torch's own
    kernels instead of oneDNN's; anything else (more rows, float32, another device) is left alone.
    At one row torch's kernels stream bf16 weights at ~45-54 GB/s here against ~22-31 GB/s for oneDNN's
    (fp16: 43 vs 41; measured); from two rows on oneDNN wins. Both accumulate in float32. The switch is
    process-wide: the first thread in turns oneDNN off and the last one out restores it (a counter
    under a lock, so engines on several threads never leave it off); another thread's matmuls in that
    window may run on torch's kernels too. The native one-row linear (glimpse/backends/native_cpu.py)
    bypasses both (~70 GB/s); this switch still serves fp16 and matmuls outside `Linear` (MoE experts)."""
    global _one_row_depth, _one_row_saved
    if rows != 1 or torch.device(device).type != "cpu" or dtype not in (torch.bfloat16, torch.float16):
        yield
        return
    with _ONE_ROW_LOCK:
        _one_row_depth += 1
        if _one_row_depth == 1:
            _one_row_saved = torch.backends.mkldnn.enabled
            torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        with _ONE_ROW_LOCK:
            _one_row_depth -= 1
            if _one_row_depth == 0:
                torch.backends.mkldnn.enabled = _one_row_saved


# ----------------------------------------------------------------------------------------
# Compute threads pinned to cores
# ----------------------------------------------------------------------------------------


def cpu_binding_plan(rank: int = 0, size: int = 1, threads: int | None = None,
                     setting: str | None = None) -> list[int] | None:  # fmt: skip
    """The CPUs that tensor-parallel rank `rank` of `size` pins its `threads` torch threads to, one each
    (None: leave them floating), from `setting` (default: GLIMPSE_CPU_BIND, unset meaning "auto").

    "auto": when the ranks' threads use exactly the CPUs this process may run on (the default thread
    count: one per core), each rank takes its run of them in order (rank r the r-th); with fewer threads
    nothing is pinned, since other processes on the machine would pin to the same first cores; "off":
    never; otherwise one CPU list per rank separated by "|", each like "0-3,8" (the rank then runs one
    thread per CPU listed). Raises
    InvalidInputError, naming GLIMPSE_CPU_BIND, for a list that does not parse, does not match the ranks,
    or names a CPU this process may not use."""
    from glimpse.errors import InvalidInputError

    setting = cpu_bind_setting(setting)
    if setting == "off" or not hasattr(os, "sched_getaffinity"):
        return None
    allowed = sorted(os.sched_getaffinity(0))
    if setting == "auto":
        threads = threads or torch.get_num_threads()
        return allowed[rank * threads : (rank + 1) * threads] if threads * size == len(allowed) else None
    lists = setting.split("|")
    if len(lists) != size:
        raise InvalidInputError(f"{CPU_BIND_ENV}={setting!r} gives {len(lists)} CPU list(s) for {size} "
                                "tensor-parallel rank(s); give one per rank, separated by '|', or 'auto' or 'off'")  # fmt: skip
    cpus = parse_cpu_list(lists[rank], f"{CPU_BIND_ENV}={setting!r}")
    if outside := sorted(set(cpus) - set(allowed)):
        raise InvalidInputError(f"{CPU_BIND_ENV}={setting!r} names CPU(s) {outside} this process may not run on "
                                f"(allowed: {format_cpu_list(allowed)})")  # fmt: skip
    return cpus


def cpu_bind_setting(setting: str | None) -> str:
    """`setting`, or GLIMPSE_CPU_BIND where it is None, stripped; "auto" when empty or unset."""
    return (os.environ.get(CPU_BIND_ENV, "auto") if setting is None else setting).strip() or "auto"


def parse_cpu_list(text: str, what: str) -> list[int]:
    """"0-3,8" -> [0, 1, 2, 3, 8] (no repeats, ascending ranges); `what` names the setting in errors."""
    from glimpse.errors import InvalidInputError

    cpus: list[int] = []
    for part in text.split(","):
        first, _, last = part.strip().partition("-")
        try:
            lo, hi = int(first), int(last or first)
        except ValueError:
            raise InvalidInputError(f"{what}: {part.strip()!r} is not a CPU number or range like 0-3") from None
        if lo < 0 or hi < lo:
            raise InvalidInputError(f"{what}: {part.strip()!r} is not an ascending range of CPU numbers")
        cpus.extend(range(lo, hi + 1))
    if len(set(cpus)) != len(cpus):
        raise InvalidInputError(f"{what}: a CPU is listed twice")
    return cpus


def format_cpu_list(cpus: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2,5"."""
    runs: list[list[int]] = []
    for c in sorted(cpus):
        if runs and c == runs[-1][1] + 1:
            runs[-1][1] = c
        else:
            runs.append([c, c])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


class ThreadBinding:
    """Pins the compute threads of whichever thread runs the steps: torch's OpenMP thread i to core
    `cpus[i]`, as vLLM-CPU binds its own. Floating threads migrate between cores and lose their caches;
    measured +5% tok/s offline (docs/benchmarks.md, session 9). OpenMP keeps one team per thread that
    starts parallel work, so `ensure()` is called before every step and binds again when the stepping
    thread changes. The stepping thread itself (OpenMP's thread 0) keeps the CPUs it had: it is the
    caller's thread (the user's, with `LLM`), and the threads and processes it starts later inherit its
    mask. `release()` (the engine's close) gives its OpenMP team back those CPUs too.

    Needs the native CPU kernels (glimpse/kernels.py); without them (logged for an explicit list), or
    for a plan of None, a no-op."""

    def __init__(self, device: str | torch.device, rank: int = 0, size: int = 1, setting: str | None = None,
                 threads: int | None = None) -> None:  # fmt: skip
        """Rank `rank` of `size` with `threads` torch threads (None: torch's count); `setting` as in
        `cpu_binding_plan`. Raises InvalidInputError for a bad setting, before anything is loaded."""
        on_cpu = torch.device(device).type == "cpu"
        self.cpus = cpu_binding_plan(rank, size, threads, setting) if on_cpu else None
        self.explicit = cpu_bind_setting(setting) not in ("auto", "off")  # CPU lists the user gave
        self._thread: int | None = None
        self._saved: set[int] = set()  # the stepping thread's CPUs before it was pinned

    def ensure(self) -> None:
        if self.cpus is None or self._thread == threading.get_ident():
            return
        from glimpse import kernels

        module = kernels.cpu_kernels()
        if module is None:
            if self.explicit:
                logger.warning("%s is ignored: pinning threads needs the native CPU kernels, which do not run "
                               "here", CPU_BIND_ENV)  # fmt: skip
            self.cpus = None
            return
        self._thread, self._saved = threading.get_ident(), os.sched_getaffinity(0)
        if len(self.cpus) != torch.get_num_threads():  # an explicit list sets the thread count
            torch.set_num_threads(len(self.cpus))
        try:
            module.bind_threads([[c] for c in self.cpus])
            os.sched_setaffinity(0, self._saved)  # thread 0 is the stepping thread: it keeps its own CPUs
        except (RuntimeError, OSError) as exc:  # e.g. a CPU taken offline since start-up
            logger.warning("compute threads left floating: pinning them to CPUs %s failed (%s); %s=off skips "
                           "it", format_cpu_list(self.cpus), exc, CPU_BIND_ENV)  # fmt: skip
            self.release()
            self.cpus = None

    def release(self) -> None:
        """Give the stepping thread's OpenMP team back the CPUs that thread has (from that thread only:
        another thread's team is not this one)."""
        if self._thread is None or self._thread != threading.get_ident():
            return
        from glimpse import kernels

        saved = sorted(self._saved)
        self._thread = None
        try:
            kernels.cpu_kernels().bind_threads([saved] * torch.get_num_threads())
        finally:
            os.sched_setaffinity(0, saved)


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -2, -3, -4


@functools.cache
def tune_allocator(device: str | torch.device = "cpu") -> bool:
    """Make glibc malloc keep freed memory for reuse in this process (CPU engines; GLIMPSE_MALLOC_TUNING=0:
    leave it). A step's activations are large tensors made and freed every layer; by default glibc
    serves many of them from fresh mappings (or trims its heap after them), and the kernel then zeroes
    every page again on first touch: 130-170k page faults, ~7% of an offline run of 64 image chats in the
    kernel's clear_page (perf), measured on a 2-core Xeon. Allocations up to 32 MiB (glibc's ceiling for
    this threshold) now come from the heap, which keeps up to 512 MiB free before trimming: 52k faults,
    +3% tok/s (8 of 10 alternating runs faster). vLLM-CPU gets the same by preloading tcmalloc.
    True if the thresholds were set (glibc on a CPU device)."""
    if torch.device(device).type != "cpu" or os.environ.get(MALLOC_ENV, "1") == "0":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # glibc's; other C libraries have none
    except (OSError, AttributeError):
        return False
    settings = ((_M_MMAP_THRESHOLD, 32 << 20), (_M_TRIM_THRESHOLD, 512 << 20), (_M_TOP_PAD, 64 << 20))
    return all(mallopt(param, value) == 1 for param, value in settings)


def keep_large_allocations(device: str | torch.device = "cpu") -> bool:
    """Once the model and its KV cache are in (after `tune_allocator`): serve allocations above 32 MiB
    from the heap as well (glibc's M_MMAP_MAX = 0; its mmap threshold cannot go higher), after handing
    back to the kernel what loading freed (malloc_trim: the per-projection weights `fuse_projections`
    replaced). Above 32 MiB glibc maps every allocation afresh and unmaps it when freed, so each
    large activation (Qwen2.5-VL-3B's gate_up over a 1.5k-token prefill: 68 MB per layer) is zeroed
    page by page on every call. Worst on cheap matmuls with large outputs: a 16k-row bf16 matmul with
    K = 384 ran at 570 GFLOP/s into fresh output against 910 into reused memory (AMD EPYC, 2 cores);
    the 3B prefill gained 2%, the small checkpoint (activations under 32 MiB) nothing.
    Not before loading: freed weights would then stay in the middle of the heap. Applies to the
    main heap, where the engine's step runs (the offline engine's thread, the engine-core process);
    GLIMPSE_MALLOC_TUNING=0 leaves glibc alone. True if set."""
    if not tune_allocator(device):
        return False
    libc = ctypes.CDLL(None)
    trim = getattr(libc, "malloc_trim", None)
    if trim is not None:
        trim(0)
    return libc.mallopt(_M_MMAP_MAX, 0) == 1
