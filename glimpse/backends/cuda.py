"""CUDA backends: FlashAttention varlen for vision segments, torch's SDPA over the paged cache, and
CUDA graphs for the vision encoder.

Written against torch's public CUDA APIs but never run: this project has no GPU to test on
(`# pragma: no cover`). `--encoder-graph auto` leaves capture off on CUDA for that reason.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from glimpse.backends.torch_sdpa import TorchAttention


class CudaAttention(TorchAttention):  # pragma: no cover - needs a GPU
    """Vision segments on FlashAttention varlen; `max_seqlen` must bound every segment and may be
    fixed per budget so a captured graph stays valid for every replay. The paged cache: torch's path."""

    name = "cuda-flash-varlen"

    def varlen(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
               max_seqlen: int) -> torch.Tensor:  # fmt: skip
        from torch.nn.attention.varlen import varlen_attn

        cu = cu_seqlens.to(torch.int32)
        return varlen_attn(q, k, v, cu, cu, max_seqlen, max_seqlen)


class CudaGraphs:  # pragma: no cover - needs a GPU
    """One torch.cuda.CUDAGraph per budget, replayed on static input buffers."""

    name = "cuda-graphs"
    default_on = False  # untested: opt in with --encoder-graph on

    def prepare(self, fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        return fn

    def capture(
        self, fn: Callable[..., torch.Tensor], inputs: dict[str, torch.Tensor]
    ) -> Callable[..., torch.Tensor]:
        return _CudaGraph(fn, inputs)


class _CudaGraph:  # pragma: no cover - needs a GPU
    """One budget: static input buffers, the captured graph, and its output buffer."""

    def __init__(self, fn: Callable[..., torch.Tensor], inputs: dict[str, torch.Tensor]) -> None:
        self.inputs = {k: v.clone() for k, v in inputs.items()}
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn(**self.inputs)  # warm-up: kernel choice and workspaces happen outside the capture
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.output = fn(**self.inputs)

    def __call__(self, **inputs: torch.Tensor) -> torch.Tensor:
        for key, value in inputs.items():
            self.inputs[key].copy_(value)
        self.graph.replay()
        return self.output.clone()  # the buffer is overwritten by the next replay
