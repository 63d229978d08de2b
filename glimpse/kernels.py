"""Native CPU kernels (glimpse/csrc), compiled on first use by torch's C++ extension loader.

`native_attention(q, ...)` and `native_linear(x, weight, bias)` return the compiled module when it serves
those tensors (CPU, bf16, shapes it is built for), or None: another device or dtype, another OS, a
CPU without AVX512-BF16, no C++ compiler, or `GLIMPSE_NATIVE_KERNELS=0`. Callers then use torch's
kernels, so a missing compiler costs speed, never correctness. The engine builds it when it starts (`engine/model_runner.py`),
not inside a request; the build is cached per machine in torch's extension directory
(`TORCH_EXTENSIONS_DIR`), about 20 s the first time. torch guards the build with a lock file there:
a build killed midway can leave it behind, and the next build then waits until it is deleted.
`GLIMPSE_NATIVE_KERNELS` is read once per process.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from types import ModuleType

import torch

logger = logging.getLogger(__name__)

_CSRC = Path(__file__).parent / "csrc"
NATIVE_HEAD_DIMS = frozenset(range(32, 129, 16))  # what csrc/cpu_kernels.cpp is built for
REQUIRED_CPU_FLAGS = frozenset({"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16"})  # /proc/cpuinfo names
_FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16", "-fopenmp"]


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def native_attention(q: torch.Tensor, *others: torch.Tensor) -> ModuleType | None:
    """The module (`segment_attention_bf16`, `decode_attention_bf16`) if it serves q and the tensors
    read with it (k, v, a cache), else None."""
    if q.shape[-1] not in NATIVE_HEAD_DIMS or not all(_cpu_bf16(t) for t in (q, *others)):
        return None
    return cpu_kernels()


def native_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> ModuleType | None:
    """The module (`linear_one_row_bf16`) if x is one bf16 CPU row for this layer, else None: also
    when autograd would record the call, or while torch.compile traces (both need torch's ops)."""
    if x.dim() == 0 or x.shape[-1] != weight.shape[-1] or x.numel() != weight.shape[-1]:
        return None
    tensors = (x, weight) if bias is None else (x, weight, bias)
    if not all(_cpu_bf16(t) for t in tensors) or not weight.is_contiguous() or (bias is not None and not bias.is_contiguous()):
        return None
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors) or torch.compiler.is_compiling():
        return None
    return cpu_kernels()


def _cpu_bf16(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and t.dtype == torch.bfloat16


@functools.cache
def cpu_kernels() -> ModuleType | None:
    """The compiled module, or None where it cannot be built or run on this machine."""
    if os.environ.get("GLIMPSE_NATIVE_KERNELS", "1") == "0":
        return None
    missing = REQUIRED_CPU_FLAGS - _cpu_flags()
    if missing:
        logger.info("native CPU kernels off: the CPU lacks %s", ", ".join(sorted(missing)))
        return None
    try:
        from torch.utils.cpp_extension import load

        return load(name="glimpse_cpu_kernels", sources=[str(_CSRC / "cpu_kernels.cpp")],
                    extra_cflags=_FLAGS, extra_ldflags=["-fopenmp"], verbose=False)  # fmt: skip
    except Exception as e:  # no compiler, no ninja, a failed build: torch's SDPA still works
        logger.warning("native CPU kernels unavailable (%s: %s); using torch's", type(e).__name__, e)
        return None
