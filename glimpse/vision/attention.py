"""Step 5 (vision encoder): attention over variable-length segments, as one opaque op.

`VarlenAttention()(q, k, v, cu_seqlens, max_seqlen)`: q, k, v [N, heads, D], cu_seqlens int32
[S+1] non-decreasing offsets (a padded tail repeats the last offset) -> [N, heads, D]. Rows past
the last offset belong to no segment: they attend to nothing and nothing attends to them (zeros).
Bidirectional inside each segment, never across segments (no dense square over N). The work is the
bound attention backend's (glimpse/backends: torch SDPA, the native CPU bf16 kernel, FlashAttention
varlen on CUDA), each a single op a compiled vision tower keeps as one node of its graph.
"""

from __future__ import annotations

import torch
from torch import nn

from glimpse.backends import AttentionBackend, backends_for


class VarlenAttention(nn.Module):
    """A vision attention layer's attention op; `glimpse.backends.bind_backends` sets its backend."""

    backend: AttentionBackend | None = None  # None: chosen per call from the tensors (an unbound model)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                max_seqlen: int) -> torch.Tensor:  # fmt: skip
        return varlen_attention(q, k, v, cu_seqlens, max_seqlen, self.backend)


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                     backend: AttentionBackend | None = None) -> torch.Tensor:  # fmt: skip
    """Attention inside each segment on `backend` (None: the one `backends_for` picks for these tensors).
    `max_seqlen` must bound every segment (FlashAttention sizes its work by it)."""
    backend = backend or backends_for(q, q.shape[-1]).vision_attention
    return backend.varlen(q, k, v, cu_seqlens, max_seqlen)


def pad_offsets(cu_seqlens: torch.Tensor, length: int) -> torch.Tensor:
    """[S+1] offsets -> [length] by repeating the last offset (empty padded segments, never a 0 tail)."""
    missing = length - cu_seqlens.shape[0]
    if missing < 0:
        raise ValueError(f"{cu_seqlens.shape[0] - 1} segments do not fit a capacity of {length - 1}")
    return torch.cat([cu_seqlens, cu_seqlens[-1:].expand(missing)])
