"""Paged attention (glimpse/engine/kv_cache.py) against brute-force attention per sequence."""

from __future__ import annotations

import math

import pytest
import torch

from glimpse.engine import kv_cache
from glimpse.engine.kv_cache import AttentionMetadata, PagedKVCache, StepKV

HEADS, KV_HEADS, DIM, BLOCK = 6, 2, 8, 4


def brute_force(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q [n, H, D] at the last n of ctx positions, k, v [ctx, Hkv, D] -> [n, H, D], causal, GQA."""
    n, ctx = q.shape[0], k.shape[0]
    group = HEADS // KV_HEADS
    out = torch.empty_like(q)
    for h in range(HEADS):
        scores = q[:, h] @ k[:, h // group].T / math.sqrt(DIM)  # [n, ctx]
        for j in range(n):
            scores[j, ctx - n + j + 1 :] = -math.inf
        out[:, h] = scores.softmax(-1) @ v[:, h // group]
    return out


@pytest.mark.parametrize("max_slots", [16384, 24])
def test_step_attention_equals_brute_force(monkeypatch, max_slots):
    """Decode rows with assorted context lengths (several buckets, one with equal lengths and so no
    mask), a fresh prompt and a chunk after cached tokens, in one step, in shuffled block tables."""
    monkeypatch.setattr(kv_cache, "_BUCKET_MAX_SLOTS", max_slots)
    gen = torch.Generator().manual_seed(0)
    # (tokens already cached, new tokens) per sequence
    seqs = [(40, 1), (3, 1), (38, 1), (9, 1), (0, 7), (9, 1), (17, 1), (12, 5), (9, 1), (29, 1)]
    blocks_needed = [math.ceil((done + new) / BLOCK) for done, new in seqs]
    order = torch.randperm(sum(blocks_needed), generator=gen).tolist()
    tables, at = [], 0
    for count in blocks_needed:
        tables.append(order[at : at + count])
        at += count
    cache = PagedKVCache(1, sum(blocks_needed), BLOCK, KV_HEADS, DIM, torch.float32)
    # The whole context of every sequence: cached part written up front, new part by attend().
    ks = [torch.randn(d + n, KV_HEADS, DIM, generator=gen) for d, n in seqs]
    vs = [torch.randn(d + n, KV_HEADS, DIM, generator=gen) for d, n in seqs]
    for table, (done, _), k, v in zip(tables, seqs, ks, vs, strict=True):
        for pos in range(done):
            block, offset = table[pos // BLOCK], pos % BLOCK
            cache.k[0, block, offset], cache.v[0, block, offset] = k[pos], v[pos]
    meta = AttentionMetadata.build(BLOCK, tables, [d for d, _ in seqs], [n for _, n in seqs])
    sizes = sorted(len(b.rows) for b in meta.decode_buckets)
    assert len(meta.decode_buckets) >= 3 and sum(sizes) == 8, sizes
    assert any(b.mask is None for b in meta.decode_buckets)  # the three sequences at 10 tokens

    qs = [torch.randn(n, HEADS, DIM, generator=gen) for _, n in seqs]
    new_k = torch.cat([k[d:] for k, (d, _) in zip(ks, seqs, strict=True)])
    new_v = torch.cat([v[d:] for v, (d, _) in zip(vs, seqs, strict=True)])
    out = StepKV(cache, meta).attend(0, torch.cat(qs), new_k, new_v)
    expected = torch.cat([brute_force(q, k, v) for q, k, v in zip(qs, ks, vs, strict=True)])
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_buckets_bound_padding_and_size(monkeypatch):
    monkeypatch.setattr(kv_cache, "_BUCKET_MAX_SLOTS", 1000)
    lens = [900, 700, 690, 500, 400, 399, 300, 300, 300, 300, 300, 2000, 5]
    seqs = sorted(range(len(lens)), key=lambda i: -lens[i])
    buckets = kv_cache._buckets(seqs, lens)
    assert [i for b in buckets for i in b] == seqs  # consecutive runs, every sequence once
    for b in buckets:
        longest = lens[b[0]]
        assert all(lens[i] >= kv_cache._BUCKET_MIN_FILL * longest for i in b)
        assert len(b) == 1 or len(b) * longest <= 1000
    # Worked by hand, longest first, with a 1000-slot cap and 75% fill: 2000 is over the cap alone;
    # 900, 700, 690 and 500 cannot pair (two of them exceed 1000 slots); 400 joins 500 (2x500 = 1000);
    # 300 joins 399 (2x399 = 798); three 300s fill 900 slots, a fourth would need 1200; 5 < 0.75x300.
    assert [[lens[i] for i in b] for b in buckets] == [
        [2000], [900], [700], [690], [500, 400], [399, 300], [300, 300, 300], [300], [5],
    ]  # fmt: skip


def test_metadata_slots_follow_the_block_tables():
    """Every slot the metadata names, against the definition worked out per position: position p of a
    sequence lives in slot table[p // block] * block + p % block; the step's new tokens are the last
    query_len positions of each sequence, rows back to back in sequence order."""
    import random

    rng = random.Random(0)
    for _ in range(200):
        block = rng.choice([1, 4, 16])
        tables, done, lens = [], [], []
        for _ in range(rng.randint(1, 9)):
            d, q = rng.randint(0, 50), rng.choice([1, 1, rng.randint(1, 40)])
            tables.append(rng.sample(range(1000), -(-(d + q) // block)))
            done.append(d)
            lens.append(q)
        meta = AttentionMetadata.build(block, tables, done, lens)
        expected_ctx = [[t[p // block] * block + p % block for p in range(d + q)]
                        for t, d, q in zip(tables, done, lens, strict=True)]  # fmt: skip
        assert [s.tolist() for s in meta.context_slots] == expected_ctx
        assert meta.slot_mapping.tolist() == [s for ctx, d in zip(expected_ctx, done, strict=True) for s in ctx[d:]]
        assert meta.query_starts == [sum(lens[:i]) for i in range(len(lens))]
        assert meta.decode_seqs == tuple(i for i, q in enumerate(lens) if q == 1)
        for seqs, name in ((meta.decode_seqs, "decode_tables"), (meta.prefill_seqs, "prefill_tables")):
            if seqs:  # the native kernels' tables: the chosen sequences' slots back to back, and their offsets
                slots, offsets = getattr(meta, name)[-2:]
                assert slots.tolist() == [s for i in seqs for s in expected_ctx[i]]
                assert offsets.tolist() == [sum(len(expected_ctx[i]) for i in seqs[:j]) for j in range(len(seqs) + 1)]


def test_metadata_refuses_a_block_table_too_short_for_its_tokens():
    with pytest.raises(ValueError, match="sequence 1: 9 tokens need 3 blocks, its table has 2"):
        AttentionMetadata.build(4, [[0, 1, 2], [3, 4]], [8, 8], [1, 1])
    meta = AttentionMetadata.build(4, [[0, 1, 2, 7], [3, 4, 5]], [8, 8], [1, 1])  # longer tables are fine
    assert meta.slot_mapping.tolist() == [8, 20]
