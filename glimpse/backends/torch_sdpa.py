"""Attention on torch's SDPA: every device and dtype (the reference the other backends are tested against).

Vision segments: segments of equal length run as one batched SDPA call (a strided view when they
sit back to back, a gather otherwise), so the frames of a video or same-size images cost one call.
Paged cache: decode rows in buckets of similar context length (`AttentionMetadata.decode_buckets`),
one padded call per bucket; prefill chunks per sequence with a causal mask offset by the tokens
already cached.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from glimpse.engine.kv_cache import AttentionMetadata


class TorchAttention:
    name = "torch-sdpa"

    def varlen(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
               max_seqlen: int) -> torch.Tensor:  # fmt: skip
        return grouped_sdpa_op(q, k, v, cu_seqlens)

    def paged(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
              v_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:  # fmt: skip
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        self.paged_decode(q, k_cache, v_cache, meta, out)
        self.paged_prefill(q, k, v, k_cache, v_cache, meta, out)
        return out

    @classmethod
    def paged_decode(cls, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                     out: torch.Tensor) -> None:  # fmt: skip
        """The decode rows' attention, written into their rows of `out`."""
        for bucket in meta.decode_buckets:
            # index_select, not advanced indexing: on a large cache tensor the latter costs
            # milliseconds per call with 2 threads (measured), the former microseconds.
            o = cls.padded_decode(q.index_select(0, bucket.rows), k_cache, v_cache, bucket.slots, bucket.mask)
            out.index_copy_(0, bucket.rows, o)

    @staticmethod
    def padded_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                      mask: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
        """One query row per sequence ([B, Hq, D]) over its context slots ([B, L], padded; `mask` [B, 1, 1, L]
        True where a key is valid, None: none padded) -> [B, Hq, D]. Fixed shapes and no host reads: a
        captured decode step (glimpse/engine/decode_graph.py `CapturedDecodeGraphs`) calls it too."""
        b, num_heads, head_dim = q.shape
        num_kv_heads = k_cache.shape[1]
        # The query heads of a KV group become that group's queries, [B, Hkv, G, D] against [B, Hkv, L, D].
        # Same maths as GQA attention, and it avoids CPU SDPA's slow single-query GQA path (16x faster in
        # bf16, measured).
        qd = q.reshape(b, num_kv_heads, num_heads // num_kv_heads, head_dim)
        gather_shape = (b, slots.shape[1], num_kv_heads, head_dim)
        kd = k_cache.index_select(0, slots.reshape(-1)).view(gather_shape).transpose(1, 2)
        vd = v_cache.index_select(0, slots.reshape(-1)).view(gather_shape).transpose(1, 2)
        o = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=mask)
        return o.reshape(b, num_heads, head_dim)

    @staticmethod
    def paged_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                      v_cache: torch.Tensor, meta: AttentionMetadata, out: torch.Tensor) -> None:  # fmt: skip
        """The prefill chunks' attention, written into their rows of `out`."""
        num_heads, num_kv_heads, head_dim = q.shape[1], k.shape[1], q.shape[2]
        group = num_heads // num_kv_heads
        for i in meta.prefill_seqs:
            s, n, ctx = meta.query_starts[i], meta.query_lens[i], meta.context_lens[i]
            if n == ctx:  # nothing cached before this chunk: plain causal attention on the new k, v
                # enable_gqa: SDPA maps each query head to its KV head itself, where repeating K and V
                # per group was a copy per call (the same values bit for bit, ~10% faster on CPU here)
                ks, vs = k[s : s + n].transpose(0, 1), v[s : s + n].transpose(0, 1)
                o = F.scaled_dot_product_attention(q[s : s + n].transpose(0, 1), ks, vs, is_causal=True,
                                                   enable_gqa=group > 1)  # fmt: skip
                out[s : s + n] = o.transpose(0, 1)
                continue
            # A chunk after cached tokens: query j sits at ctx - n + j. Grouped-query layout again,
            # [Hkv, G*n, D], with the offset causal mask repeated per group member.
            slots = meta.context_slots[i]
            qg = (
                q[s : s + n]
                .view(n, num_kv_heads, group, head_dim)
                .permute(1, 2, 0, 3)
                .reshape(num_kv_heads, group * n, head_dim)
            )
            ks = k_cache.index_select(0, slots).transpose(0, 1)
            vs = v_cache.index_select(0, slots).transpose(0, 1)
            mask = (
                torch.ones(n, ctx, dtype=torch.bool, device=q.device).tril(diagonal=ctx - n).repeat(group, 1)
            )
            o = F.scaled_dot_product_attention(qg, ks, vs, attn_mask=mask)
            out[s : s + n] = (
                o.view(num_kv_heads, group, n, head_dim).permute(2, 0, 1, 3).reshape(n, num_heads, head_dim)
            )


# A custom op so that a compiled vision tower keeps it as one node (its Python reads the offsets).
@torch.library.custom_op("glimpse::varlen_attention", mutates_args=())
def grouped_sdpa_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor
) -> torch.Tensor:
    return grouped_sdpa(q, k, v, cu_seqlens)


@grouped_sdpa_op.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    return q.new_empty(q.shape)


def grouped_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Segments of equal length as one batched SDPA call each; [N, heads, D] -> [N, heads, D]."""
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
            idx = (
                torch.tensor(starts, device=q.device)[:, None] + torch.arange(length, device=q.device)
            ).flatten()
            qs, ks, vs = (
                t.index_select(0, idx).view(n, length, *heads_dim).transpose(1, 2) for t in (q, k, v)
            )
            o = F.scaled_dot_product_attention(qs, ks, vs)
            out.index_copy_(0, idx, o.transpose(1, 2).reshape(n * length, *heads_dim))
    return out
