"""The native CPU kernels (glimpse/kernels.py, glimpse/csrc) as a backend: bf16 on AVX512-BF16.

Attention: one call over all vision segments; in the paged cache one call for every decode row
and one for every prefill chunk, K and V read through each sequence's slots (no gather), float32
softmax; 2.5-2.8x torch's SDPA on an AVX512-BF16 EPYC. On CPUs with AMX the segment kernel runs its
two products on AMX tiles (the kernel decides, glimpse/csrc/cpu_kernels.cpp): vision segments 3.1x
its AVX512-BF16 path, and a 64-chat offline run 15% faster than with the decoder's prefill on
torch's SDPA (docs/benchmarks.md, session 10). Linear: one-row GEMV (batch-1 decode), 1.04-1.6x the weight
bandwidth of torch's and oneDNN's one-row kernels here (`glimpse bench kernels`); other shapes,
autograd and torch.compile tracing go to `F.linear`. Selected only for a bf16 model on a CPU that
runs the kernels, with head dims in `NATIVE_HEAD_DIMS` (glimpse/backends/__init__.py).
"""

from __future__ import annotations

from types import ModuleType
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from glimpse import kernels

if TYPE_CHECKING:
    from glimpse.engine.kv_cache import AttentionMetadata


def _ops() -> ModuleType:
    """The compiled module: built once per process (glimpse/kernels.py); selection made sure it exists.
    While the decode graph is traced: the same kernels as torch operators (`kernels.graph_ops()`)."""
    module = (kernels.GRAPH_OPS.ops if torch.compiler.is_compiling() else None) or kernels.cpu_kernels()
    assert module is not None, "native CPU backend selected where the kernels do not run"
    return module


class NativeCpuAttention:
    name = "native-cpu-bf16"

    def varlen(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
               max_seqlen: int) -> torch.Tensor:  # fmt: skip
        return native_segments_op(q, k, v, cu_seqlens)

    def paged(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
              v_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:  # fmt: skip
        q = q.contiguous()
        out = torch.empty(q.shape, dtype=q.dtype)
        if meta.decode_seqs:
            _ops().decode_attention_bf16(q, k_cache, v_cache, *meta.decode_tables, q.shape[-1] ** -0.5, out)
        self.paged_prefill(q, k, v, k_cache, v_cache, meta, out)
        return out

    def paged_prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                      v_cache: torch.Tensor, meta: AttentionMetadata, out: torch.Tensor) -> None:  # fmt: skip
        """The prefill chunks' attention (q contiguous), written into their rows of `out`."""
        if meta.prefill_seqs:
            _ops().segment_attention_bf16(q, k_cache, v_cache, *meta.prefill_tables, True, q.shape[-1] ** -0.5, out)


@torch.library.custom_op("glimpse::native_varlen_attention", mutates_args=())
def native_segments_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor
) -> torch.Tensor:
    """Every segment in one kernel call; a segment's keys are its own rows."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    offsets = cu_seqlens.to("cpu", torch.long)
    rows = torch.arange(q.shape[0])
    out = q.new_empty(q.shape)
    out[int(offsets[-1]) :].zero_()
    _ops().segment_attention_bf16(
        q, k, v, offsets[:-1], offsets.diff(), rows, offsets, False, q.shape[-1] ** -0.5, out
    )
    return out


@native_segments_op.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    return q.new_empty(q.shape)


class NativeOneRowLinear:
    name = "native-cpu-one-row-bf16"

    def prepare(self, layer: nn.Linear) -> None:
        pass

    def apply(self, layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        if self.serves(layer, x):
            return _ops().linear_one_row_bf16(x.contiguous(), layer.weight, layer.bias)
        return F.linear(x, layer.weight, layer.bias)

    @staticmethod
    def serves(layer: nn.Linear, x: torch.Tensor) -> bool:
        """One bf16 row for this layer's bf16 weight (a bf16 model may keep some weights in float32),
        outside autograd and torch.compile tracing (both need torch's ops), except the decode graph's."""
        weight, bias = layer.weight, layer.bias
        if x.dim() == 0 or x.numel() != weight.shape[-1] or x.shape[-1] != weight.shape[-1]:
            return False
        if x.dtype != torch.bfloat16 or weight.dtype != torch.bfloat16 or not weight.is_contiguous():
            return False
        if bias is not None and (bias.dtype != torch.bfloat16 or not bias.is_contiguous()):
            return False
        if _records_autograd(x, weight, bias):
            return False
        return not torch.compiler.is_compiling() or kernels.GRAPH_OPS.ops is not None


def _records_autograd(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
