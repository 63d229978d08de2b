"""Native CPU kernels (glimpse/csrc), compiled on first use by torch's C++ extension loader.

`native_attention(q)` and `native_linear(x, weight)` return the compiled module when it serves
those tensors (CPU, bf16, shapes it is built for), or None: another device or dtype, another OS, a
CPU without AVX512-BF16, no C++ compiler, or `GLIMPSE_NATIVE_KERNELS=0`. Callers then use torch's
kernels, so a missing compiler costs speed, never correctness. The build is cached per machine
in torch's extension directory (`TORCH_EXTENSIONS_DIR`), about 30 s the first time.
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


def native_attention(q: torch.Tensor) -> ModuleType | None:
    """The module (`segment_attention_bf16`, `decode_attention_bf16`) if it serves q, else None."""
    if q.device.type != "cpu" or q.dtype != torch.bfloat16 or q.shape[-1] not in NATIVE_HEAD_DIMS:
        return None
    return cpu_kernels()


def native_linear(x: torch.Tensor, weight: torch.Tensor) -> ModuleType | None:
    """The module (`linear_one_row_bf16`) if x is one bf16 CPU row for this weight, else None."""
    if x.numel() != weight.shape[-1] or x.device.type != "cpu" or x.dtype != torch.bfloat16:
        return None
    if weight.dtype != torch.bfloat16 or not weight.is_contiguous() or weight.requires_grad and torch.is_grad_enabled():
        return None
    return cpu_kernels()


@functools.cache
def cpu_kernels() -> ModuleType | None:
    """The compiled module, or None where it cannot be built or run on this machine."""
    if os.environ.get("GLIMPSE_NATIVE_KERNELS", "1") == "0":
        return None
    missing = {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16"} - _cpu_flags()
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
