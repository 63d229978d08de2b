"""Native CPU kernels (glimpse/csrc), compiled on first use by torch's C++ extension loader.

`native_attention(q)` returns the compiled attention module when it serves q (CPU, bf16, a head
dim it is built for), or None: another device or dtype, another OS, a CPU without AVX512-BF16, no
C++ compiler, or `GLIMPSE_NATIVE_KERNELS=0`. Callers then use torch's SDPA, so a missing compiler
costs speed, never correctness. The build is cached per machine
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
NATIVE_HEAD_DIMS = frozenset(range(32, 129, 16))  # what csrc/cpu_attention.cpp is built for
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
    """The module with `segment_attention_bf16` (csrc/cpu_attention.cpp) if it serves q, else None."""
    if q.device.type != "cpu" or q.dtype != torch.bfloat16 or q.shape[-1] not in NATIVE_HEAD_DIMS:
        return None
    return cpu_attention()


@functools.cache
def cpu_attention() -> ModuleType | None:
    """The compiled module, or None where it cannot be built or run on this machine."""
    if os.environ.get("GLIMPSE_NATIVE_KERNELS", "1") == "0":
        return None
    missing = {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16"} - _cpu_flags()
    if missing:
        logger.info("native CPU attention off: the CPU lacks %s", ", ".join(sorted(missing)))
        return None
    try:
        from torch.utils.cpp_extension import load

        return load(name="glimpse_cpu_attention", sources=[str(_CSRC / "cpu_attention.cpp")],
                    extra_cflags=_FLAGS, extra_ldflags=["-fopenmp"], verbose=False)  # fmt: skip
    except Exception as e:  # no compiler, no ninja, a failed build: torch's SDPA still works
        logger.warning("native CPU attention unavailable (%s: %s); using torch's SDPA", type(e).__name__, e)
        return None
