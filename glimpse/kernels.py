"""The native CPU library (glimpse/csrc), compiled on first use by torch's C++ extension loader.

`cpu_kernels()` returns the compiled module (`segment_attention_bf16`, `decode_attention_bf16`,
`linear_one_row_bf16`, `rms_norm_bf16`, `silu_mul_bf16`, `text_rotary_bf16_`, `vision_rotary_bf16`), or None where it cannot run: a CPU without the features glimpse/platform.py
names, no C++ compiler, or `GLIMPSE_NATIVE_KERNELS=0`. Which callers use it is decided once, by
`glimpse.backends.select_backends`; a missing compiler costs speed, never correctness. The build is
cached per machine in torch's extension directory (`TORCH_EXTENSIONS_DIR`), about 30 s the first
time on 2 cores (a line on stderr says so before it starts). torch guards the build with a lock file
there: a build killed midway can leave it behind, and the next build then waits until it is deleted.
`GLIMPSE_NATIVE_KERNELS` is read once per process.
"""

from __future__ import annotations

import functools
import logging
import sys
from pathlib import Path
from types import ModuleType

from glimpse.platform import NATIVE_COMPILER_FLAGS, native_kernels_requested
from glimpse.platform import NATIVE_CPU_FLAGS as REQUIRED_CPU_FLAGS
from glimpse.platform import cpu_flags as _cpu_flags

logger = logging.getLogger(__name__)

_CSRC = Path(__file__).parent / "csrc"
_NAME = "glimpse_cpu_kernels"
BUILD_MESSAGE = "glimpse: building the native CPU kernels (first run only, ~30 s)..."  # measured: 31 s on 2 cores
NATIVE_HEAD_DIMS = frozenset(range(32, 129, 16))  # what csrc/cpu_kernels.cpp is built for


@functools.cache
def cpu_kernels() -> ModuleType | None:
    """The compiled module, or None where it cannot be built or run on this machine."""
    if not native_kernels_requested():
        return None
    missing = REQUIRED_CPU_FLAGS - _cpu_flags()
    if missing:
        logger.info("native CPU kernels off: the CPU lacks %s", ", ".join(sorted(missing)))
        return None
    try:
        quiet_cuda_home_warning()
        from torch.utils.cpp_extension import load

        if build_pending():  # otherwise the user would wait half a minute with no word on what is happening
            print(BUILD_MESSAGE, file=sys.stderr, flush=True)
        return load(name=_NAME, sources=[str(_CSRC / "cpu_kernels.cpp")],
                    extra_cflags=["-O3", "-ffp-contract=off", *NATIVE_COMPILER_FLAGS, "-fopenmp"], extra_ldflags=["-fopenmp"],
                    verbose=False)  # fmt: skip
    except Exception as e:  # no compiler, no ninja, a failed build: torch's SDPA still works
        logger.warning("native CPU kernels unavailable (%s: %s); using torch's", type(e).__name__, e)
        return None


def build_pending() -> bool:
    """Whether torch's loader will compile: its build folder (under TORCH_EXTENSIONS_DIR) has no built
    library, one older than the source, or a build file written for another checkout or torch install
    (the folder is shared per machine, and ninja rebuilds when the build file's commands change). Two
    stat calls and a 1 KB read; a change of compiler flags alone, which also rebuilds, goes unannounced."""
    import torch
    from torch.utils.cpp_extension import LIB_EXT, _get_build_directory

    folder = Path(_get_build_directory(_NAME, verbose=False))
    source = _CSRC / "cpu_kernels.cpp"
    try:
        if (folder / f"{_NAME}{LIB_EXT}").stat().st_mtime < source.stat().st_mtime:
            return True
        commands = (folder / "build.ninja").read_text()
    except FileNotFoundError:
        return True
    return str(source) not in commands or str(Path(torch.__file__).parent) not in commands


def quiet_cuda_home_warning() -> None:
    """torch's extension loader warns "No CUDA runtime is found, using CUDA_HOME=..." on import on
    every machine without a GPU that has a CUDA folder; building CPU kernels needs no CUDA, so that
    one message is dropped (its other messages pass)."""
    torch_logger = logging.getLogger("torch.utils.cpp_extension")  # the logger torch creates on import
    if not any(isinstance(f, _NoCudaRuntimeFilter) for f in torch_logger.filters):
        torch_logger.addFilter(_NoCudaRuntimeFilter())


class _NoCudaRuntimeFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No CUDA runtime is found")
