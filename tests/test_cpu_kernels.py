"""The native CPU kernels (glimpse/csrc/cpu_kernels.cpp: segment attention, decode attention,
one-row linear) against brute-force float32 attention and matmul, and their callers (vision
segments, the paged decoder cache, `Linear`) against torch's path.

Tolerance: the kernel takes bf16 inputs and writes a bf16 output, so its error against a float32
reference is dominated by that output rounding. Each case is held to 1.5x the error of torch's
own bf16 SDPA on the same inputs (plus 1e-3 for cases where both are near exact).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from glimpse.backends.native_cpu import NativeCpuAttention
from glimpse.backends.torch_sdpa import TorchAttention, grouped_sdpa
from glimpse.engine.kv_cache import AttentionMetadata, PagedKVCache, StepKV
from glimpse.models.layers import Linear
from glimpse.vision.attention import varlen_attention


def _reference(q, k_cache, v_cache, slots, n, causal, dtype):
    """Queries [n, H, D] against the keys at `slots`, grouped-query, the queries last when causal."""
    group = q.shape[1] // k_cache.shape[1]
    ks, vs = (c[slots].transpose(0, 1).repeat_interleave(group, 0).to(dtype) for c in (k_cache, v_cache))
    ctx = len(slots)
    mask = torch.ones(n, ctx, dtype=torch.bool).tril(ctx - n) if causal else None
    return F.scaled_dot_product_attention(q.transpose(0, 1).to(dtype), ks, vs, attn_mask=mask).transpose(0, 1)


def _check(out, q, k_cache, v_cache, slots, n, causal):
    exact = _reference(q, k_cache, v_cache, slots, n, causal, torch.float32)
    torch_bf16 = _reference(q, k_cache, v_cache, slots, n, causal, torch.bfloat16).float()
    err, torch_err = (out.float() - exact).abs().max().item(), (torch_bf16 - exact).abs().max().item()
    assert err <= 1.5 * torch_err + 1e-3, (err, torch_err)


@pytest.fixture(params=["avx512-bf16", "amx-tiles"])
def segment_path(request, native_kernels):
    """Segment attention on each of its two paths: AVX512-BF16 dot products, and AMX tiles where the CPU
    has them (the kernel picks the tiles by itself there; the other path is asked for)."""
    tiles = request.param == "amx-tiles"
    if tiles and not native_kernels.use_tile_attention():
        pytest.skip("this CPU has no AMX-BF16 tiles (or the OS does not grant them): only the AVX512-BF16 path runs")
    native_kernels.use_tile_attention(tiles)
    yield native_kernels
    native_kernels.use_tile_attention(True)


@pytest.mark.parametrize("head_dim", [32, 48, 64, 80, 96, 112, 128])
@pytest.mark.parametrize(("heads", "kv_heads"), [(3, 3), (12, 4), (4, 1)])
@pytest.mark.parametrize("causal", [False, True])
def test_kernel_matches_float32_attention(segment_path, head_dim, heads, kv_heads, causal):
    # (query start, queries, keys): single rows, a block edge (63/64/65), a causal chunk after
    # cached keys, a long segment, an odd tail of a 32-row query block.
    segments = [(0, 1, 1), (1, 63, 63), (64, 1, 70), (65, 65, 65), (130, 60, 300), (190, 777, 777), (967, 33, 100)]
    rows, num_slots = 1003, 1500
    gen = torch.Generator().manual_seed(head_dim * 7 + heads)
    q = (2 * torch.randn(rows, heads, head_dim, generator=gen)).bfloat16()
    k_cache, v_cache = ((2 * torch.randn(num_slots, kv_heads, head_dim, generator=gen)).bfloat16() for _ in range(2))
    slot_lists = [torch.randperm(num_slots, generator=gen)[:ctx] for *_, ctx in segments]
    out = torch.full_like(q, 7.0)
    offsets = torch.tensor([0] + [ctx for *_, ctx in segments]).cumsum(0)
    starts, lens = (torch.tensor(col) for col in list(zip(*segments, strict=True))[:2])
    segment_path.segment_attention_bf16(q, k_cache, v_cache, starts, lens, torch.cat(slot_lists), offsets, causal,
                                        head_dim**-0.5, out)  # fmt: skip
    covered = torch.zeros(rows, dtype=torch.bool)
    for (start, n, _), slots in zip(segments, slot_lists, strict=True):
        covered[start : start + n] = True
        _check(out[start : start + n], q[start : start + n], k_cache, v_cache, slots, n, causal)
    assert (out[~covered] == 7).all()  # rows outside every segment are left alone


@pytest.mark.parametrize("head_dim", [32, 64, 80, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_four_rows_per_pass_give_the_bits_of_two(native_kernels, head_dim, causal):
    """The AVX512-BF16 segment path takes query rows four at a time (two for P V at head dim 128); each
    row's sums are the same additions in the same order as with two rows per pass, so the outputs are
    equal bit for bit, including segments whose row count is not a multiple of four (1, 2, 3, 5, 33, 63)
    and causal chunks after cached keys. Accuracy against float32: the test above (it runs this path)."""
    native_kernels.use_tile_attention(False)  # the AVX512-BF16 path, where AMX would be picked
    segments = [(0, 1, 1), (1, 2, 9), (3, 3, 3), (6, 5, 70), (11, 33, 33), (44, 63, 130), (107, 256, 256)]
    rows, num_slots, heads, kv_heads = 363, 900, 12, 4
    gen = torch.Generator().manual_seed(head_dim + causal)
    q = (2 * torch.randn(rows, heads, head_dim, generator=gen)).bfloat16()
    k_cache, v_cache = ((2 * torch.randn(num_slots, kv_heads, head_dim, generator=gen)).bfloat16() for _ in range(2))
    slots = torch.cat([torch.randperm(num_slots, generator=gen)[:ctx] for *_, ctx in segments])
    offsets = torch.tensor([0] + [ctx for *_, ctx in segments]).cumsum(0)
    starts, lens = (torch.tensor(col) for col in list(zip(*segments, strict=True))[:2])
    outs = []
    try:
        for wide in (True, False):
            assert native_kernels.use_wide_attention_rows(wide) == wide
            out = torch.zeros_like(q)
            native_kernels.segment_attention_bf16(q, k_cache, v_cache, starts, lens, slots, offsets, causal,
                                                  head_dim**-0.5, out)  # fmt: skip
            outs.append(out)
    finally:
        native_kernels.use_wide_attention_rows(True)
        native_kernels.use_tile_attention(True)  # as the segment_path fixture leaves it
    assert torch.equal(outs[0], outs[1])
    assert outs[0].abs().sum() > 0


@pytest.mark.parametrize("head_dim", [32, 48, 64, 80, 96, 112, 128])
@pytest.mark.parametrize(("heads", "kv_heads"), [(3, 3), (12, 4), (32, 1), (20, 1), (6, 2)])
def test_decode_kernel_matches_float32_attention(native_kernels, head_dim, heads, kv_heads):
    # one query row per sequence, rows out of order, contexts of 1 key up to past several blocks;
    # 32 and 20 heads on one kv head cross the kernel's 16-head chunk (a full and a partial second)
    contexts, rows = [1, 15, 16, 17, 300, 1000], [5, 0, 3, 1, 2, 4]
    num_slots = 1500
    gen = torch.Generator().manual_seed(head_dim + heads)
    q = (2 * torch.randn(7, heads, head_dim, generator=gen)).bfloat16()
    k_cache, v_cache = ((2 * torch.randn(num_slots, kv_heads, head_dim, generator=gen)).bfloat16() for _ in range(2))
    slot_lists = [torch.randperm(num_slots, generator=gen)[:ctx] for ctx in contexts]
    out = torch.full_like(q, 7.0)
    offsets = torch.tensor([0, *contexts]).cumsum(0)
    native_kernels.decode_attention_bf16(q, k_cache, v_cache, torch.tensor(rows), torch.cat(slot_lists), offsets,
                                 head_dim**-0.5, out)  # fmt: skip
    for row, slots in zip(rows, slot_lists, strict=True):
        _check(out[row : row + 1], q[row : row + 1], k_cache, v_cache, slots, 1, False)
    assert (out[6] == 7).all()  # a row no sequence names is left alone


def test_causal_rows_never_see_later_keys(segment_path):
    """Keys after a query's position carry V = 1000: any leak shows in the output's size. Rows
    0-15 of the chunk sit at positions 240-255 and see nothing of the block from 256 on."""
    ctx, n = 300, 60
    gen = torch.Generator().manual_seed(11)
    q = torch.randn(n, 4, 64, generator=gen).bfloat16()
    k = torch.randn(ctx, 2, 64, generator=gen).bfloat16()
    v = torch.randn(ctx, 2, 64, generator=gen).clamp(-1, 1).bfloat16()
    out = torch.empty_like(q)
    for last in range(ctx - n, ctx):  # the keys after each row's position, one row at a time
        v_leaky = v.clone()
        v_leaky[last + 1 :] = 1000
        segment_path.segment_attention_bf16(q, k, v_leaky, torch.tensor([0]), torch.tensor([n]), torch.arange(ctx),
                                            torch.tensor([0, ctx]), True, 0.125, out)  # fmt: skip
        row = last - (ctx - n)
        assert out[row].abs().max() <= 1, (row, out[row].abs().max())


def test_kernel_refuses_bad_tables(native_kernels):
    q = torch.zeros(4, 2, 64, dtype=torch.bfloat16)
    kv = torch.zeros(8, 2, 64, dtype=torch.bfloat16)
    one = torch.tensor([0]), torch.tensor([4])
    with pytest.raises(RuntimeError, match="kv slot out of range"):
        native_kernels.segment_attention_bf16(q, kv, kv, *one, torch.tensor([0, 1, 2, 8]), torch.tensor([0, 4]), True, 0.125, q.clone())
    with pytest.raises(RuntimeError, match="has 4 queries but 3 keys"):
        native_kernels.segment_attention_bf16(q, kv, kv, *one, torch.tensor([0, 1, 2]), torch.tensor([0, 3]), True, 0.125, q.clone())
    with pytest.raises(RuntimeError, match="non-decreasing"):  # a range running backwards
        native_kernels.segment_attention_bf16(q, kv, kv, torch.tensor([0, 0]), torch.tensor([1, 0]), torch.arange(8),
                                      torch.tensor([0, 1000000, 5]), True, 0.125, q.clone())  # fmt: skip
    with pytest.raises(RuntimeError, match="query rows lie outside"):
        native_kernels.segment_attention_bf16(q, kv, kv, torch.tensor([2]), torch.tensor([2**62]), torch.arange(8),
                                      torch.tensor([0, 8]), False, 0.125, q.clone())  # fmt: skip
    with pytest.raises(RuntimeError, match="contiguous bfloat16 CPU"):
        native_kernels.segment_attention_bf16(q.float(), kv, kv, *one, torch.arange(4), torch.tensor([0, 4]), True, 0.125, q.clone())
    with pytest.raises(RuntimeError, match="contiguous bfloat16 CPU"):
        meta = kv.to("meta")
        native_kernels.segment_attention_bf16(q, meta, meta, *one, torch.arange(4), torch.tensor([0, 4]), True, 0.125, q.clone())
    with pytest.raises(RuntimeError, match="head dim 40"):
        q40, kv40 = q[..., :40].contiguous(), kv[..., :40].contiguous()
        native_kernels.segment_attention_bf16(q40, kv40, kv40, *one, torch.arange(4), torch.tensor([0, 4]), True, 0.125, q40.clone())


@pytest.mark.parametrize("head_dim", [48, 64, 128])
@pytest.mark.parametrize(("heads", "kv_heads", "sequences"), [(12, 4, 64), (32, 1, 6), (16, 2, 9), (6, 2, 1)])
def test_decode_by_sequence_gives_the_bits_of_decode_by_head(native_kernels, head_dim, heads, kv_heads, sequences):
    """Whole sequences as work items (every KV head of a slot row in one pass) compute each head in the
    same order as (sequence, KV head) items: the outputs are equal bit for bit. One sequence stays on
    per-head items (two threads need two items)."""
    gen = torch.Generator().manual_seed(head_dim * heads + sequences)
    contexts = [1 + (37 * i) % 400 for i in range(sequences)]
    num_slots = sum(contexts) + 64
    q = (2 * torch.randn(sequences, heads, head_dim, generator=gen)).bfloat16()
    k_cache, v_cache = ((2 * torch.randn(num_slots, kv_heads, head_dim, generator=gen)).bfloat16() for _ in range(2))
    slots = torch.randperm(num_slots, generator=gen)[: sum(contexts)]
    offsets = torch.tensor([0, *contexts]).cumsum(0)
    rows = torch.randperm(sequences, generator=gen)
    outs = []
    try:
        for by_sequence in (True, False):
            native_kernels.use_sequence_decode(by_sequence)
            out = torch.zeros_like(q)
            native_kernels.decode_attention_bf16(q, k_cache, v_cache, rows, slots, offsets, head_dim**-0.5, out)
            outs.append(out)
    finally:
        native_kernels.use_sequence_decode(True)
    assert torch.equal(outs[0], outs[1])
    _check(outs[0][rows[0] : rows[0] + 1], q[rows[0] : rows[0] + 1], k_cache, v_cache, slots[: contexts[0]], 1, False)


def test_decode_kernel_refuses_bad_tables(native_kernels):
    q = torch.zeros(2, 2, 64, dtype=torch.bfloat16)
    kv = torch.zeros(8, 2, 64, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="row 2 lies outside"):
        native_kernels.decode_attention_bf16(q, kv, kv, torch.tensor([2]), torch.tensor([0]), torch.tensor([0, 1]), 0.125, q.clone())
    with pytest.raises(RuntimeError, match="has no keys"):
        native_kernels.decode_attention_bf16(q, kv, kv, torch.tensor([0]), torch.tensor([0]), torch.tensor([0, 0]), 0.125, q.clone())
    with pytest.raises(RuntimeError, match="kv slot out of range"):
        native_kernels.decode_attention_bf16(q, kv, kv, torch.tensor([0]), torch.tensor([9]), torch.tensor([0, 1]), 0.125, q.clone())


def test_vision_segments_match_grouped_sdpa(kernel_spy):
    """varlen_attention's native branch against its torch branch: segments of mixed lengths,
    empty padded entries, rows past the last offset (zeros)."""
    gen = torch.Generator().manual_seed(3)
    n, heads, head_dim = 900, 6, 80
    q, k, v = ((2 * torch.randn(n, heads, head_dim, generator=gen)).bfloat16() for _ in range(3))
    cu = torch.tensor([0, 196, 392, 393, 700, 850, 850, 850], dtype=torch.int32)
    got = varlen_attention(q, k, v, cu, n, NativeCpuAttention())
    assert kernel_spy.calls == {"segment_attention_bf16": 1}
    exact = grouped_sdpa(q.float(), k.float(), v.float(), cu)
    torch_bf16 = grouped_sdpa(q, k, v, cu).float()
    assert (got[850:] == 0).all()
    err, torch_err = (got.float() - exact).abs().max().item(), (torch_bf16 - exact).abs().max().item()
    assert err <= 1.5 * torch_err + 1e-3, (err, torch_err)


def test_paged_step_matches_torch_path(kernel_spy):
    """One step over the paged cache with decode rows, a fresh prefill and a chunk after cached
    tokens: the native call against StepKV's torch path (buckets, SDPA), layer by layer."""
    gen = torch.Generator().manual_seed(5)
    block_size, heads, kv_heads, head_dim = 16, 12, 4, 64
    cache = PagedKVCache(2, 64, block_size, kv_heads, head_dim, torch.bfloat16)
    cache.k.copy_(torch.randn(cache.k.shape, generator=gen))
    cache.v.copy_(torch.randn(cache.v.shape, generator=gen))
    tables = [[3, 9, 4], [0, 1], [20, 21, 22, 23, 24], [7]]
    computed, new = [40, 0, 50, 5], [1, 30, 17, 1]  # decode, fresh prefill, chunk after cache, decode
    meta = AttentionMetadata.build(block_size, tables, computed, new)
    t = sum(new)
    q = torch.randn(t, heads, head_dim, generator=gen).bfloat16()
    k, v = (torch.randn(t, kv_heads, head_dim, generator=gen).bfloat16() for _ in range(2))
    for layer in range(2):
        before = cache.k.clone(), cache.v.clone()
        cache.attention = NativeCpuAttention()
        got = StepKV(cache, meta).attend(layer, q, k, v)
        assert kernel_spy.calls == {"decode_attention_bf16": layer + 1, "segment_attention_bf16": layer + 1}
        cache.k.copy_(before[0]), cache.v.copy_(before[1])
        cache.attention = TorchAttention()
        torch_bf16 = StepKV(cache, meta).attend(layer, q, k, v).float()
        exact = StepKV(_float(cache), meta).attend(layer, q.float(), k.float(), v.float())
        err, torch_err = (got.float() - exact).abs().max().item(), (torch_bf16 - exact).abs().max().item()
        assert err <= 1.5 * torch_err + 1e-3, (layer, err, torch_err)


def _float(cache: PagedKVCache) -> PagedKVCache:
    out = PagedKVCache(cache.k.shape[0], cache.k.shape[1], cache.block_size, cache.k.shape[3], cache.k.shape[4], torch.float32)
    out.k.copy_(cache.k), out.v.copy_(cache.v)
    out.attention = TorchAttention()  # the float32 reference
    return out


@pytest.mark.parametrize(("out_features", "in_features"), [(4, 32), (3, 8), (5, 40), (1023, 1000), (2048, 1536), (7, 8960)])
@pytest.mark.parametrize("bias", [False, True])
def test_one_row_linear_matches_float32(native_kernels, out_features, in_features, bias):
    """Row counts that are and are not multiples of 4, widths with and without a 32-wide tail (and
    one that is only a tail)."""
    gen = torch.Generator().manual_seed(out_features + in_features)
    layer = Linear(in_features, out_features, bias=bias).to(torch.bfloat16).requires_grad_(False)
    layer.weight.copy_(torch.randn(out_features, in_features, generator=gen) / in_features**0.5)
    if bias:
        layer.bias.copy_(torch.randn(out_features, generator=gen))
    x = torch.randn(1, in_features, generator=gen).bfloat16()
    exact = F.linear(x.float(), layer.weight.float(), layer.bias.float() if bias else None)
    torch_err = (F.linear(x, layer.weight, layer.bias).float() - exact).abs().max().item()
    for shaped in (x, x.view(in_features), x.view(1, 1, in_features)):
        got = layer(shaped)
        assert got.shape == (*shaped.shape[:-1], out_features) and got.dtype == torch.bfloat16
        err = (got.float().reshape(1, -1) - exact).abs().max().item()
        assert err <= 1.5 * torch_err + 1e-3, (err, torch_err)


def test_linear_uses_native_kernel_only_for_one_bf16_row(kernel_spy):
    layer = Linear(64, 16).to(torch.bfloat16).requires_grad_(False)
    layer(torch.randn(1, 64).bfloat16())
    assert kernel_spy.calls == {"linear_one_row_bf16": 1}
    rows = torch.randn(3, 64).bfloat16()
    assert torch.equal(layer(rows), F.linear(rows, layer.weight, layer.bias))  # torch's path
    f32 = Linear(64, 16).requires_grad_(False)
    assert torch.equal(f32(rows[:1].float()), F.linear(rows[:1].float(), f32.weight, f32.bias))
    assert kernel_spy.calls == {"linear_one_row_bf16": 1}
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):  # 64 values, not a row of 64
        Linear(64, 16).bfloat16().requires_grad_(False)(torch.randn(8, 8).bfloat16())
    grad_layer = Linear(64, 16).bfloat16()  # autograd records the call: torch's op, with a grad_fn
    x = torch.randn(1, 64).bfloat16().requires_grad_()
    assert layer(x).grad_fn is not None and grad_layer(torch.randn(1, 64).bfloat16()).grad_fn is not None
    assert kernel_spy.calls == {"linear_one_row_bf16": 1}


def test_one_row_linear_refuses_bad_shapes(native_kernels):
    w = torch.zeros(8, 64, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="one row of 64 features"):
        native_kernels.linear_one_row_bf16(torch.zeros(2, 64, dtype=torch.bfloat16), w)
    with pytest.raises(RuntimeError, match="one value per output"):
        native_kernels.linear_one_row_bf16(torch.zeros(1, 64, dtype=torch.bfloat16), w, torch.zeros(7, dtype=torch.bfloat16))


# ---- elementwise kernels: SwiGLU's product and the vision rotary, bit for bit with torch's ops -------


@pytest.mark.parametrize(("rows", "width"), [(1, 2048), (7, 74), (515, 4096), (3, 2)])
def test_silu_mul_is_torchs_ops_bit_for_bit(native_kernels, rows, width):
    gen = torch.Generator().manual_seed(rows * width)
    x = (4 * torch.randn(rows, width, generator=gen)).bfloat16()
    gate, up = x.chunk(2, dim=-1)
    assert torch.equal(native_kernels.silu_mul_bf16(x), up * F.silu(gate))


def test_silu_mul_special_values(native_kernels):
    gate = torch.tensor([-200.0, -88.0, -20.0, -0.0, 0.0, 1e-38, 20.0, 100.0, float("inf"), -float("inf"), float("nan")])
    x = torch.cat([gate, torch.linspace(-3, 3, len(gate))]).bfloat16()[None]
    g, u = x.chunk(2, dim=-1)
    torch.testing.assert_close(native_kernels.silu_mul_bf16(x), u * F.silu(g), rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize(("rows", "heads", "head_dim"), [(768, 6, 64), (5, 3, 40), (9, 16, 80), (1, 1, 2)])
def test_vision_rotary_is_torchs_float32_formula_bit_for_bit(native_kernels, rows, heads, head_dim):
    gen = torch.Generator().manual_seed(rows + head_dim)
    qkv = torch.randn(rows, 3, heads, head_dim, generator=gen).bfloat16()
    angles = 10 * torch.randn(rows, head_dim, generator=gen)
    cos, sin = angles.cos(), angles.sin()
    q, k = native_kernels.vision_rotary_bf16(qkv, cos, sin)
    for got, x in ((q, qkv[:, 0]), (k, qkv[:, 1])):
        xf = x.float()  # HF: x * cos + rotate_half(x) * sin in float32, then the cast
        ref = (xf * cos[:, None] + torch.cat([-xf[..., head_dim // 2 :], xf[..., : head_dim // 2]], -1) * sin[:, None])
        assert torch.equal(got, ref.bfloat16())


def test_elementwise_kernels_refuse_bad_shapes(native_kernels):
    with pytest.raises(RuntimeError, match="even number"):
        native_kernels.silu_mul_bf16(torch.zeros(2, 5, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="bfloat16"):
        native_kernels.silu_mul_bf16(torch.zeros(2, 4))
    qkv = torch.zeros(4, 3, 2, 8, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match=r"\[N, 3, heads, D\]"):
        native_kernels.vision_rotary_bf16(qkv[:, :2].contiguous(), torch.zeros(4, 8), torch.zeros(4, 8))
    with pytest.raises(RuntimeError, match="float32"):
        native_kernels.vision_rotary_bf16(qkv, torch.zeros(3, 8), torch.zeros(3, 8))
    with pytest.raises(RuntimeError, match="float32"):
        native_kernels.vision_rotary_bf16(qkv, torch.zeros(4, 8, dtype=torch.bfloat16), torch.zeros(4, 8))


def test_glm_patch_embedding_as_matmul_is_as_accurate_as_the_conv(kernel_spy):
    """With the native kernels on, GLM's patch Conv3d (kernel = stride) runs as one bf16 matmul: its
    error against the float64 convolution stays within 1.5x that of torch's own bf16 Conv3d."""
    from transformers import Glm4vConfig

    from glimpse.models.glm4v import Glm4vVisionPatchEmbed

    vc = Glm4vConfig(vision_config={"hidden_size": 64, "patch_size": 14, "temporal_patch_size": 2}).vision_config
    gen = torch.Generator().manual_seed(3)
    embed = Glm4vVisionPatchEmbed(vc)
    with torch.no_grad():
        for p in embed.parameters():
            p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    pixels = torch.randn(100, 3 * 2 * 14 * 14, generator=gen)
    with torch.inference_mode():
        exact = embed.double()(pixels.double())
        embed.bfloat16()
        conv = embed.proj(pixels.bfloat16().view(-1, 3, 2, 14, 14)).view(100, -1)
        embed.proj.forward = lambda x: pytest.fail("the Conv3d ran on the native path")
        got = embed(pixels)
    assert got.dtype == torch.bfloat16
    err, conv_err = (got.double() - exact).abs().max().item(), (conv.double() - exact).abs().max().item()
    assert err <= 1.5 * conv_err, (err, conv_err)


@pytest.mark.parametrize("neox", [False, True])
@pytest.mark.parametrize(("rows", "heads", "rot_heads", "head_dim", "rd"), [(7, 20, 16, 64, 32), (300, 6, 4, 128, 128), (1, 3, 3, 40, 20)])
def test_text_rotary_is_torchs_bf16_ops_bit_for_bit_in_place(native_kernels, neox, rows, heads, rot_heads, head_dim, rd):
    gen = torch.Generator().manual_seed(rows * heads + rd)
    qkv = (3 * torch.randn(rows, heads, head_dim, generator=gen)).bfloat16()
    angles = 50 * torch.rand(rows, rd, generator=gen)
    cos, sin = angles.cos().bfloat16(), angles.sin().bfloat16()
    x = qkv[:, :rot_heads].clone()
    rot = x[..., :rd]  # HF's bf16 ops: rot * cos + rotated(rot) * sin, each op rounding to bf16
    if neox:
        rotated = torch.cat([-rot[..., rd // 2 :], rot[..., : rd // 2]], -1)
    else:
        rotated = torch.stack([-rot[..., 1::2], rot[..., 0::2]], -1).flatten(-2)
    ref = torch.cat([rot * cos[:, None] + rotated * sin[:, None], x[..., rd:]], -1)
    untouched = qkv[:, rot_heads:].clone()
    native_kernels.text_rotary_bf16_(qkv, rot_heads, cos, sin, neox)
    assert torch.equal(qkv[:, :rot_heads], ref)
    assert torch.equal(qkv[:, rot_heads:], untouched)
