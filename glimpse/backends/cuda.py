"""CUDA backends: FlashAttention varlen for vision segments, torch's SDPA over the paged cache, and
CUDA graphs for the vision encoder and for decode steps.

Run on an NVIDIA H200 lent for one session (docs/benchmarks.md "CUDA"): tests/test_cuda.py, which
skips on machines without a GPU, is what was run there. CI has no GPU (`# pragma: no cover`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from glimpse.backends.torch_sdpa import TorchAttention

HALF_DTYPES = (torch.float16, torch.bfloat16)  # what FlashAttention computes in
# SDPA over the paged cache, without cuDNN's attention: it builds an execution plan for every new shape, and a
# decode step's key length is new every step (2.5 ms of host time per layer and step, 57 ms steps for a 705M
# model on an H200; torch's profiler). Flash, memory-efficient and math kernels have no per-shape set-up.
PAGED_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@functools.cache
def _flash_varlen() -> Callable | None:
    """torch's FlashAttention varlen entry point (torch >= 2.9), or None where this torch lacks it."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


class CudaAttention(TorchAttention):  # pragma: no cover - needs a GPU
    """Vision segments on FlashAttention varlen (fp16/bf16; float32 stays on torch's SDPA, as exact
    as the reference); `max_seqlen` must bound every segment and may be fixed per budget so a captured
    graph stays valid for every replay. The paged cache: torch's path, on SDPA kernels without a
    per-shape set-up."""

    name = "cuda-flash-varlen"

    def paged(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
              v_cache: torch.Tensor, meta) -> torch.Tensor:  # fmt: skip
        with sdpa_kernel(PAGED_SDPA_BACKENDS):
            return super().paged(q, k, v, k_cache, v_cache, meta)

    @staticmethod
    def padded_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                      mask: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
        with sdpa_kernel(PAGED_SDPA_BACKENDS):
            return TorchAttention.padded_decode(q, k_cache, v_cache, slots, mask)

    def varlen(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
               max_seqlen: int) -> torch.Tensor:  # fmt: skip
        flash = _flash_varlen()
        if flash is None or q.dtype not in HALF_DTYPES:
            return super().varlen(q, k, v, cu_seqlens, max_seqlen)
        cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
        out = flash(q, k, v, cu, cu, max_seqlen, max_seqlen)
        # Rows past the last offset belong to no segment: zeros (no host sync, so it can be captured).
        tail = torch.arange(q.shape[0], device=q.device) >= cu[-1]
        return out.masked_fill(tail[:, None, None], 0)


class CudaGraphs:  # pragma: no cover - needs a GPU
    """One torch.cuda.CUDAGraph per budget, replayed on static input buffers (fp16/bf16 towers: a
    float32 one attends through torch's SDPA per segment length, which reads the offsets on the host
    and cannot be captured, so it runs eagerly)."""

    name = "cuda-graphs"
    default_on = False  # opt in with --encoder-graph on

    def __init__(self) -> None:
        self._pool = None  # the decode graphs' shared memory pool, made at the first capture

    def prepare(self, fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        return fn

    def capture(
        self, fn: Callable[..., torch.Tensor], inputs: dict[str, torch.Tensor]
    ) -> Callable[..., torch.Tensor]:
        if inputs["pixel_values"].dtype not in HALF_DTYPES or _flash_varlen() is None:
            return fn
        return _CudaGraph(fn, inputs)

    def capture_step(self, fn: Callable[[], torch.Tensor], device: torch.device) -> Callable[[], torch.Tensor]:
        """One decode step on static buffers on `device` (glimpse/engine/decode_graph.py `CapturedDecodeGraphs`):
        warmed up, captured into one CUDA graph, and returned as what replays it (the output buffer is the
        graph's: the next replay of any decode graph may overwrite it). Every decode graph of the process
        shares one memory pool, captured largest first, so that they take the largest one's memory, not the
        sum. Capture and replay run with `device` current: streams and graphs are the current device's, and a
        single-rank engine on cuda:N never makes it current for the threads that step it."""
        with torch.cuda.device(device):
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph, output = _capture(fn, self._pool)

        def replay() -> torch.Tensor:
            with torch.cuda.device(device):
                graph.replay()
            return output

        return replay


def _capture(fn: Callable[..., torch.Tensor], pool, **inputs: torch.Tensor) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:  # pragma: no cover
    """`fn(**inputs)` warmed up on a side stream (kernel choice and workspaces happen outside the capture),
    then captured on the current device; (the graph, its output buffer)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn(**inputs)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        output = fn(**inputs)
    return graph, output


class _CudaGraph:  # pragma: no cover - needs a GPU
    """One budget: static input buffers, the captured graph, and its output buffer."""

    def __init__(self, fn: Callable[..., torch.Tensor], inputs: dict[str, torch.Tensor]) -> None:
        self.inputs = {k: v.clone() for k, v in inputs.items()}
        self.device = inputs["pixel_values"].device  # current while capturing and replaying (cuda:N, N > 0)
        with torch.cuda.device(self.device):
            self.graph, self.output = _capture(fn, None, **self.inputs)

    def __call__(self, **inputs: torch.Tensor) -> torch.Tensor:
        for key, value in inputs.items():
            self.inputs[key].copy_(value)
        with torch.cuda.device(self.device):
            self.graph.replay()
        return self.output.clone()  # the buffer is overwritten by the next replay
