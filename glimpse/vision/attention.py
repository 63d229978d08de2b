"""Step 5 (vision encoder): attention over variable-length segments, as one opaque op.

`varlen_attention(q, k, v, cu_seqlens, max_seqlen)`: q, k, v [N, heads, D], cu_seqlens int32
[S+1] non-decreasing offsets (a padded tail repeats the last offset) -> [N, heads, D]. Rows past
the last offset belong to no segment: they attend to nothing and nothing attends to them (zeros).
It is a registered custom op so that a compiled vision tower keeps it as one node of its graph.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from glimpse.kernels import native_attention


@torch.library.custom_op("glimpse::varlen_attention", mutates_args=())
def varlen_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int
) -> torch.Tensor:
    """Bidirectional attention inside each segment, never across segments (no dense square over N).

    CPU, bf16, where the native kernel builds (glimpse/kernels.py): one call over all segments,
    AVX512-BF16 dot products with float32 softmax, 2.5-2.8x torch's SDPA here. Otherwise segments of
    equal length run as one batched SDPA call (a strided view when they sit back to back, a gather
    otherwise), so the frames of a video or same-size images cost one call.
    CUDA: FlashAttention varlen; `max_seqlen` must bound every segment and may be fixed per
    budget so a captured graph stays valid for every replay (untested here: no GPU).
    """
    if q.is_cuda:  # pragma: no cover - needs a GPU
        from torch.nn.attention.varlen import varlen_attn

        cu = cu_seqlens.to(torch.int32)
        return varlen_attn(q, k, v, cu, cu, max_seqlen, max_seqlen)
    if (native := native_attention(q, k, v)) is not None:
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        offsets = cu_seqlens.to("cpu", torch.long)
        rows = torch.arange(q.shape[0])  # a segment's keys are its own rows
        out = q.new_empty(q.shape)
        out[int(offsets[-1]) :].zero_()
        native.segment_attention_bf16(q, k, v, offsets[:-1], offsets.diff(), rows, offsets, False, q.shape[-1] ** -0.5, out)
        return out
    return _grouped_sdpa(q, k, v, cu_seqlens)


@varlen_attention.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int) -> torch.Tensor:
    return q.new_empty(q.shape)  # contiguous, as every branch returns it


def _grouped_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    offsets = cu_seqlens.tolist()
    starts_by_len: dict[int, list[int]] = {}
    for start, end in zip(offsets[:-1], offsets[1:], strict=True):
        if end > start:  # padded entries repeat the last offset: empty, skipped
            starts_by_len.setdefault(end - start, []).append(start)
    out = q.new_empty(q.shape)
    out[offsets[-1] :].zero_()
    heads_dim = q.shape[1:]
    for length, starts in starts_by_len.items():
        n = len(starts)
        first = starts[0]
        if starts[-1] - first == (n - 1) * length:  # back to back: a view, no copy
            rows = slice(first, first + n * length)
            qs, ks, vs = (t[rows].view(n, length, *heads_dim).transpose(1, 2) for t in (q, k, v))
            o = F.scaled_dot_product_attention(qs, ks, vs)  # [n, heads, L, D]
            out[rows] = o.transpose(1, 2).reshape(n * length, *heads_dim)
        else:
            idx = (torch.tensor(starts, device=q.device)[:, None] + torch.arange(length, device=q.device)).flatten()
            qs, ks, vs = (t.index_select(0, idx).view(n, length, *heads_dim).transpose(1, 2) for t in (q, k, v))
            o = F.scaled_dot_product_attention(qs, ks, vs)
            out.index_copy_(0, idx, o.transpose(1, 2).reshape(n * length, *heads_dim))
    return out


def pad_offsets(cu_seqlens: torch.Tensor, length: int) -> torch.Tensor:
    """[S+1] offsets -> [length] by repeating the last offset (empty padded segments, never a 0 tail)."""
    missing = length - cu_seqlens.shape[0]
    if missing < 0:
        raise ValueError(f"{cu_seqlens.shape[0] - 1} segments do not fit a capacity of {length - 1}")
    return torch.cat([cu_seqlens, cu_seqlens[-1:].expand(missing)])
