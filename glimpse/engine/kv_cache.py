"""Step 8 attention over the paged KV cache.

`PagedKVCache` owns per-layer K and V tensors `[num_blocks, block_size, Hkv, D]` and the attention
backend that reads them (glimpse/backends, bound once from the model's). For each step the runner
builds an `AttentionMetadata` (slot mapping of the new tokens, each sequence's query range, context
length and block table) and a `StepKV` that implements the `KVCache.attend` protocol the decoders
call: it writes only the new tokens' K and V into their slots, then the backend reads K and V
through the block tables: torch's SDPA path (decode rows bucketed by context length, prefill chunks
per sequence) or the native CPU bf16 kernels (one call for all decode rows, one for all prefill
chunks). The metadata builds each backend's tables lazily, once per step for all layers.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from glimpse import kernels
from glimpse.backends import AttentionBackend, backends_for


class PagedKVCache:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu", scratch_block: bool = False) -> None:  # fmt: skip
        """`scratch_block`: one block past the `num_blocks` the block manager hands out, which no sequence
        owns: the padding rows of a captured decode step write their K/V there (`scratch_slot`)."""
        shape = (num_layers, num_blocks + scratch_block, block_size, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.block_size = block_size
        self.scratch_slot = num_blocks * block_size if scratch_block else None
        self.attention: AttentionBackend | None = None  # the model's (ModelRunner binds it); None: per call

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * block_size * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


@dataclass
class DecodeBucket:
    """Sequences with one new token and similar context lengths, attended in one padded call.

    rows: [B] row of each sequence in the flat batch; slots: [B, max_ctx] their context slots,
    padded with slot 0; mask: [B, 1, 1, max_ctx] True where a key is valid (None: no padding).
    """

    rows: torch.Tensor
    slots: torch.Tensor
    mask: torch.Tensor | None

    @classmethod
    def build(cls, seqs: list[int], starts: list[int], context_lens: list[int], ctx_slots: list[torch.Tensor],
              device: torch.device | str) -> DecodeBucket:  # fmt: skip
        lens = [context_lens[i] for i in seqs]
        max_ctx = max(lens)
        slots = torch.zeros(len(seqs), max_ctx, dtype=torch.long)
        for j, i in enumerate(seqs):
            slots[j, : lens[j]] = ctx_slots[i]
        mask = None
        if min(lens) < max_ctx:
            mask = (torch.arange(max_ctx) < torch.tensor(lens)[:, None])[:, None, None, :].to(device)
        rows = torch.tensor([starts[i] for i in seqs], device=device)
        return cls(rows, slots.to(device), mask)


# Decode sequences are bucketed by context length: a bucket's padded keys stay within
# 1/_BUCKET_MIN_FILL of its real keys and within _BUCKET_MAX_SLOTS (the gathered K and V stay
# small enough to be reused by the allocator instead of page-faulting a fresh mapping per layer).
_BUCKET_MIN_FILL = 0.75
_BUCKET_MAX_SLOTS = 16384


def _buckets(seqs: list[int], context_lens: list[int]) -> list[list[int]]:
    """`seqs` sorted by context length, longest first -> consecutive runs, one per bucket."""
    buckets: list[list[int]] = []
    for i in seqs:
        if buckets:
            bucket = buckets[-1]
            longest = context_lens[bucket[0]]
            fits = (len(bucket) + 1) * longest <= max(_BUCKET_MAX_SLOTS, longest)
            if fits and context_lens[i] >= _BUCKET_MIN_FILL * longest:
                bucket.append(i)
                continue
        buckets.append([i])
    return buckets


@dataclass
class AttentionMetadata:
    """Where one step's tokens go and what each sequence attends to (shared by all layers).

    slot_mapping: [T] cache slot (block_id * block_size + offset) of every new token.
    query_starts/query_lens: each sequence's rows in the flat batch.
    context_lens: tokens in the cache for each sequence after this step's writes.
    all_slots: every sequence's context slots in order, back to back ([sum(context_lens)], each block
    table expanded); slot_offsets: [S+1] where each sequence's run starts (`context_slots` splits them).
    """

    slot_mapping: torch.Tensor
    query_starts: list[int]
    query_lens: list[int]
    context_lens: list[int]
    all_slots: torch.Tensor
    slot_offsets: torch.Tensor
    decode_seqs: tuple[int, ...] = ()  # sequences with one new token
    prefill_seqs: tuple[int, ...] = ()  # the others

    @functools.cached_property
    def context_slots(self) -> list[torch.Tensor]:
        """Per sequence, its [context_len] slots in order (views of `all_slots`)."""
        return list(self.all_slots.split(self.context_lens))

    @functools.cached_property
    def decode_buckets(self) -> list[DecodeBucket]:
        """The decode sequences in buckets of similar context length (torch's path)."""
        device = self.slot_mapping.device
        by_len = sorted(self.decode_seqs, key=lambda i: -self.context_lens[i])
        return [DecodeBucket.build(bucket, self.query_starts, self.context_lens, self.context_slots, device)
                for bucket in _buckets(by_len, self.context_lens)]  # fmt: skip

    @functools.cached_property
    def decode_tables(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The decode sequences for the native kernel, built once for all layers: their query rows,
        their context slots back to back, and those slots' [B+1] offsets (int64 CPU tensors)."""
        starts, _, slots, offsets = self._native_tables(self.decode_seqs)
        return starts, slots, offsets

    @functools.cached_property
    def prefill_tables(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The prefill chunks as segments of the native kernel, built once for all layers: their
        query starts and lengths, their context slots back to back, and those slots' [S+1] offsets."""
        return self._native_tables(self.prefill_seqs)

    def _native_tables(self, seqs: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(query starts, query lengths, context slots back to back, [len(seqs)+1] slot offsets) of
        `seqs`, as int64 CPU tensors."""
        if len(seqs) == len(self.context_lens):  # every sequence (an all-decode or all-prefill step): no copy
            slots, offsets = self.all_slots.cpu(), self.slot_offsets
        else:
            offsets = torch.tensor([0, *(self.context_lens[i] for i in seqs)]).cumsum(0)
            slots = torch.cat([self.context_slots[i] for i in seqs]).cpu()
        starts = torch.tensor([self.query_starts[i] for i in seqs])
        return starts, torch.tensor([self.query_lens[i] for i in seqs]), slots, offsets

    @classmethod
    def build(cls, block_size: int, block_tables: list[list[int]], num_computed: list[int], query_lens: list[int],
              device: torch.device | str = "cpu") -> AttentionMetadata:  # fmt: skip
        """One step's metadata, in a fixed number of tensor ops whatever the number of sequences (a
        decode step of 64 sequences took ~6 small ops per sequence)."""
        n = len(block_tables)
        context_lens = [d + q for d, q in zip(num_computed, query_lens, strict=True)]
        for i, (table, ctx) in enumerate(zip(block_tables, context_lens, strict=True)):
            if len(table) * block_size < ctx:  # the padded table below would silently point at block 0
                raise ValueError(f"sequence {i}: {ctx} tokens need {-(-ctx // block_size)} blocks, its table has "
                                 f"{len(table)}")  # fmt: skip
        starts = [0] * n
        for i in range(1, n):
            starts[i] = starts[i - 1] + query_lens[i - 1]
        width = max((len(t) for t in block_tables), default=0)
        tables = torch.tensor([t + [0] * (width - len(t)) for t in block_tables], dtype=torch.long).view(n, width)
        ctx = torch.tensor(context_lens, dtype=torch.long)
        offsets = torch.zeros(n + 1, dtype=torch.long)
        torch.cumsum(ctx, 0, out=offsets[1:])
        seq = torch.repeat_interleave(torch.arange(n), ctx)  # the sequence of each context position
        pos = torch.arange(int(offsets[-1])) - offsets[:-1][seq]  # its position within that sequence
        all_slots = tables[seq, pos // block_size] * block_size + pos % block_size
        # the new tokens: the last query_lens[i] positions of each sequence's run
        q = torch.tensor(query_lens, dtype=torch.long)
        new_rows = torch.repeat_interleave(offsets[1:] - q - torch.tensor(starts, dtype=torch.long), q)
        slot_mapping = all_slots[new_rows + torch.arange(new_rows.shape[0])]
        decode = tuple(i for i, ql in enumerate(query_lens) if ql == 1)
        prefill = tuple(i for i, ql in enumerate(query_lens) if ql != 1)
        return cls(slot_mapping.to(device), starts, list(query_lens), context_lens, all_slots.to(device), offsets,
                   decode, prefill)  # fmt: skip


class StepKV:
    """The `KVCache` a decoder sees during one engine step."""

    def __init__(self, cache: PagedKVCache, meta: AttentionMetadata) -> None:
        self.cache = cache
        self.meta = meta

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        meta = self.meta
        k_flat = self.cache.k[layer_idx].view(-1, *k.shape[1:])
        v_flat = self.cache.v[layer_idx].view(-1, *v.shape[1:])
        if torch.compiler.is_compiling() and (ops := kernels.GRAPH_OPS.ops) is not None:  # the decode graph
            ops.write_kv_(self.cache.k, self.cache.v, layer_idx, meta.slot_mapping, k, v)  # in place
        else:
            k_flat.index_copy_(0, meta.slot_mapping, k.to(k_flat.dtype))
            v_flat.index_copy_(0, meta.slot_mapping, v.to(v_flat.dtype))
        attention = self.cache.attention or backends_for(q, q.shape[-1]).attention
        return attention.paged(q, k, v, k_flat, v_flat, meta)
