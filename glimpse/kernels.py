"""The native CPU library (glimpse/csrc), compiled on first use by torch's C++ extension loader.

`cpu_kernels()` returns the compiled module (`segment_attention_bf16`, `decode_attention_bf16`,
`linear_one_row_bf16`, `rms_norm_bf16`, `silu_mul_bf16`, `text_rotary_bf16_`, `vision_rotary_bf16`), or None where it cannot run: a CPU without the features glimpse/platform.py
names, no C++ compiler, or `GLIMPSE_NATIVE_KERNELS=0`. Which callers use it is decided once, by
`glimpse.backends.select_backends`; a missing compiler costs speed, never correctness. The build is
cached per machine in torch's extension directory (`TORCH_EXTENSIONS_DIR`), about 30 s the first
time on 2 cores (a line on stderr says so before it starts). torch guards the build with a lock file
there: a build killed midway can leave it behind, and the next build then waits until it is deleted.
`GLIMPSE_NATIVE_KERNELS` is read once per process.

The decode step's kernels are also torch operators (`torch.ops.glimpse_cpu`), so that a compiled
decode step (glimpse/engine/decode_graph.py) keeps them as nodes of its graph: `graph_ops()` is
that namespace behind the module's own call signatures; code traced by torch.compile calls it where
`GRAPH_OPS.ops` holds it (the decode graph) and torch's ops where it is None (the vision tower's graphs).
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


class GRAPH_OPS:  # noqa: N801 - a switch read while tracing (torch.compile guards on its value)
    ops: _GraphOps | None = None  # graph_ops(), set by glimpse.engine.decode_graph around its compiled calls


def graph_ops() -> _GraphOps | None:
    """The decode step's kernels as graph nodes, with `cpu_kernels()`'s signatures (None where the kernels
    are not built). Only what a text decoder's step calls: linear_one_row_bf16, rms_norm_bf16,
    silu_mul_bf16, text_rotary_bf16_, decode_attention_bf16; and two of their own: write_kv_ (the
    step's K/V into the cache, in place) and packed_linear (oneDNN's linear on a packed weight, given
    by the handle `keep_packed` returned)."""
    return _graph_ops() if cpu_kernels() is not None else None


class _GraphOps:
    def __init__(self) -> None:
        import torch

        ops = torch.ops.glimpse_cpu
        self.linear_one_row_bf16 = ops.linear_one_row_bf16
        self.silu_mul_bf16 = ops.silu_mul_bf16
        self.text_rotary_bf16_ = ops.text_rotary_bf16_
        self.decode_attention_bf16 = ops.decode_attention_bf16
        self.write_kv_ = ops.write_kv_  # new K/V rows into their cache slots, in place
        self.packed_linear = ops.packed_linear  # oneDNN's linear on a packed weight, by handle (onednn_packed.py)
        self._norm, self._add_norm = ops.rms_norm_bf16, ops.add_rms_norm_bf16

    def rms_norm_bf16(self, x, delta, weight, eps):  # noqa: ANN001, ANN201 - the module's signature
        if delta is None:
            return x, self._norm(x, weight, eps)
        return self._add_norm(x, delta, weight, eps)


@functools.cache
def _graph_ops() -> _GraphOps:
    import torch

    # What each operator returns, for tracing (torch.compile runs these on shapes, not data).
    @torch.library.register_fake("glimpse_cpu::linear_one_row_bf16")
    def _(x, w, bias):  # noqa: ANN001, ANN202
        return x.new_empty((*x.shape[:-1], w.shape[0]))

    @torch.library.register_fake("glimpse_cpu::packed_linear")
    def _(x, handle, out_features, bias):  # noqa: ANN001, ANN202
        return x.new_empty((*x.shape[:-1], out_features))

    @torch.library.register_fake("glimpse_cpu::rms_norm_bf16")
    def _(x, weight, eps):  # noqa: ANN001, ANN202
        return torch.empty_like(x)

    @torch.library.register_fake("glimpse_cpu::add_rms_norm_bf16")
    def _(x, delta, weight, eps):  # noqa: ANN001, ANN202
        return torch.empty_like(x), torch.empty_like(x)

    @torch.library.register_fake("glimpse_cpu::silu_mul_bf16")
    def _(x):  # noqa: ANN001, ANN202
        return x.new_empty((*x.shape[:-1], x.shape[-1] // 2))

    @torch.library.register_fake("glimpse_cpu::text_rotary_bf16_")
    def _(qkv, heads, cos, sin, neox):  # noqa: ANN001, ANN202
        return None

    @torch.library.register_fake("glimpse_cpu::write_kv_")
    def _(k_cache, v_cache, layer, slots, k, v):  # noqa: ANN001, ANN202
        return None

    @torch.library.register_fake("glimpse_cpu::decode_attention_bf16")
    def _(q, k, v, rows, kv_slots, kv_offsets, scale, out):  # noqa: ANN001, ANN202
        return None

    return _GraphOps()


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
