"""`glimpse bench kernels`: the native CPU kernels (glimpse/csrc) against torch's, side by side.

Each row times both on the same bf16 inputs (median of `--repeats` >= 3 after warm-up) and prints the
rate each reaches (GFLOP/s for attention, GB/s of weights or K/V for the memory-bound kernels)
and the speed-up of the medians with its spread (torch's fastest run over glimpse's slowest, to
torch's slowest over glimpse's fastest):
- vision attention: one image of L patches, 6 heads of 64 (the `small` checkpoint's tower); the
  segment kernel runs on AMX tiles where the CPU has them (the output names the path); on its
  AVX512-BF16 path, also its query rows four at a time (the default) against two (the same bits);
- causal prefill: one 700-token chunk, 12 query heads on 4 kv heads;
- decode attention: 64 sequences of 400-760 cached tokens in a paged cache, one query row each,
  against the bucketed path torch runs (gather + SDPA), and the kernel's work items against each
  other: whole sequences (the default with enough of them) and (sequence, KV head) pairs;
- one-row linear: the 24 layers of a 705M decoder's shapes (2.3 GB of weights, beyond the
  caches), against torch's one-row kernel and oneDNN's;
- linear layers by row count: one Qwen2.5-VL-3B decoder layer with q/k/v and gate/up fused (154 MB
  of bf16 weights) at 1-64 rows through F.linear (oneDNN) and, at one row, the native kernel, each
  as a fraction of a probe from the same run: GB/s of weights against the read probe (`torch.sum`
  of 1 GiB), GFLOP/s against the compute probe (a 2048^3 bf16 matmul).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from glimpse.bench.throughput import read_bandwidth
from glimpse.buffers import empty_buffer
from glimpse.kernels import cpu_kernels
from glimpse.platform import one_row_matmuls
from glimpse.units import int_at_least

# Fewer timed runs per side let one scheduler hiccup decide the speed-up (`--repeats 1` printed 0.19x).
MIN_REPEATS = 3


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--repeats", type=int_at_least(MIN_REPEATS, "fewer runs make the speed-up noise"), default=5,
                   help=f"timed runs per side, >= {MIN_REPEATS} (median reported, min-max as the spread)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--json", action="store_true", help="print only the JSON result")
    p.add_argument("--only-rows", action="store_true", help="only the linear-by-rows sweep and its probes")




@dataclass(frozen=True)
class Timing:
    """Seconds of one side's timed runs."""

    median: float
    fastest: float
    slowest: float


def speedup(ref: Timing, ours: Timing) -> dict:
    """torch's median over glimpse's, and the range the runs allow: the slowest of ours against the fastest
    of torch's, up to the fastest of ours against the slowest of torch's."""
    return {"speedup": ref.median / ours.median,
            "speedup_range": [ref.fastest / ours.slowest, ref.slowest / ours.fastest]}  # fmt: skip


def _timed(fn: Callable[[], object], repeats: int) -> Timing:
    fn(), fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return Timing(statistics.median(times), min(times), max(times))


def _median_seconds(fn: Callable[[], object], repeats: int) -> float:
    return _timed(fn, repeats).median


def _timed_off(switch: Callable[[bool], object], fn: Callable[[], object], repeats: int) -> Timing:
    """`fn` timed with one of the kernels' switches (e.g. `use_sequence_decode`) off; on again afterwards."""
    try:
        switch(False)
        return _timed(fn, repeats)
    finally:
        switch(True)


def _vision_case(native, length: int, gen: torch.Generator) -> tuple[Callable[[], object], tuple, float]:
    """One image of `length` patches, 6 heads of 64: (the segment kernel on it, its q/k/v, its FLOPs)."""
    q, k, v = (torch.randn(length, 6, 64, generator=gen).bfloat16() for _ in range(3))
    out = torch.empty_like(q)
    tables = torch.tensor([0]), torch.tensor([length]), torch.arange(length), torch.tensor([0, length])
    return (lambda: native.segment_attention_bf16(q, k, v, *tables, False, 0.125, out)), (q, k, v), 4 * length**2 * 64 * 6


def _vision_row(native, length: int, gen: torch.Generator, repeats: int) -> dict:
    kernel, qkv, flops = _vision_case(native, length, gen)
    ours = _timed(kernel, repeats)
    ref = _timed(lambda: F.scaled_dot_product_attention(*(t.transpose(0, 1) for t in qkv)), repeats)
    return dict(kernel=f"vision attention, L={length}", unit="GFLOP/s", native=flops / ours.median / 1e9,
                torch=flops / ref.median / 1e9, **speedup(ref, ours))  # fmt: skip


def _rows_per_pass_row(native, gen: torch.Generator, repeats: int) -> dict:
    """The AVX512-BF16 segment path taking query rows four at a time against two (the same bits)."""
    length = 1200
    kernel, _, flops = _vision_case(native, length, gen)
    four = _timed(kernel, repeats)
    two = _timed_off(native.use_wide_attention_rows, kernel, repeats)
    return dict(kernel=f"  4 query rows per pass vs 2, L={length}", unit="GFLOP/s", against="2 rows per pass",
                native=flops / four.median / 1e9, torch=flops / two.median / 1e9, **speedup(two, four))  # fmt: skip


def _attention_rows(native, repeats: int) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    rows = [_vision_row(native, length, gen, repeats) for length in (400, 1200, 2704)]
    if not native.use_tile_attention():  # the AVX512-BF16 path is the one that runs here
        rows.append(_rows_per_pass_row(native, gen, repeats))
    n = 700
    q = torch.randn(n, 12, 64, generator=gen).bfloat16()
    k, v = (torch.randn(n, 4, 64, generator=gen).bfloat16() for _ in range(2))
    out = torch.empty_like(q)
    tables = torch.tensor([0]), torch.tensor([n]), torch.arange(n), torch.tensor([0, n])
    flops = 2 * n * n * 64 * 12  # the causal half of 4 n^2 D H

    def sdpa_causal():
        ks, vs = (t.transpose(0, 1).repeat_interleave(3, 0) for t in (k, v))
        return F.scaled_dot_product_attention(q.transpose(0, 1), ks, vs, is_causal=True)

    ours = _timed(lambda: native.segment_attention_bf16(q, k, v, *tables, True, 0.125, out), repeats)
    ref = _timed(sdpa_causal, repeats)
    rows.append(dict(kernel=f"causal prefill, {n} tokens, GQA 12/4", unit="GFLOP/s", native=flops / ours.median / 1e9,
                     torch=flops / ref.median / 1e9, **speedup(ref, ours)))  # fmt: skip
    return rows


def _decode_rows(native, repeats: int) -> list[dict]:
    gen = torch.Generator().manual_seed(1)
    seqs, heads, kv_heads, dim, block = 64, 12, 4, 64, 16
    contexts = torch.randint(400, 760, (seqs,), generator=gen).tolist()
    num_blocks = sum((c + block - 1) // block for c in contexts) * 2
    k_cache, v_cache = (torch.randn(num_blocks * block, kv_heads, dim, generator=gen).bfloat16() for _ in range(2))
    order = torch.randperm(num_blocks, generator=gen)
    slot_lists, used = [], 0
    for c in contexts:  # each sequence on scattered blocks, as a paged cache holds it
        nb = (c + block - 1) // block
        slot_lists.append((order[used : used + nb, None] * block + torch.arange(block)).flatten()[:c])
        used += nb
    slots, offsets = torch.cat(slot_lists), torch.tensor([0, *contexts]).cumsum(0)
    q = torch.randn(seqs, heads, dim, generator=gen).bfloat16()
    out = torch.empty_like(q)
    rows = torch.arange(seqs)
    longest = max(contexts)
    padded = torch.zeros(seqs, longest, dtype=torch.long)
    mask = torch.zeros(seqs, 1, 1, longest, dtype=torch.bool)
    for i, s in enumerate(slot_lists):
        padded[i, : len(s)], mask[i, ..., : len(s)] = s, True

    def torch_path():  # what engine/kv_cache.py runs without the kernel: gather, then SDPA
        kd, vd = (c.index_select(0, padded.view(-1)).view(seqs, longest, kv_heads, dim).transpose(1, 2) for c in (k_cache, v_cache))
        return F.scaled_dot_product_attention(q.view(seqs, kv_heads, heads // kv_heads, dim), kd, vd, attn_mask=mask)

    kv_bytes = 2 * sum(contexts) * kv_heads * dim * 2

    def kernel():
        return native.decode_attention_bf16(q, k_cache, v_cache, rows, slots, offsets, 0.125, out)

    ours = _timed(kernel, repeats)
    ref = _timed(torch_path, repeats)
    by_head = _timed_off(native.use_sequence_decode, kernel, repeats)
    return [dict(kernel="decode attention, 64 rows x 400-760 keys", unit="GB/s of K/V",
                 native=kv_bytes / ours.median / 1e9, torch=kv_bytes / ref.median / 1e9, **speedup(ref, ours)),
            dict(kernel="  by sequence vs by (seq, KV head) items", unit="GB/s of K/V", against="by-head items",
                 native=kv_bytes / ours.median / 1e9, torch=kv_bytes / by_head.median / 1e9,
                 **speedup(by_head, ours))]  # fmt: skip


def _linear_rows(native, repeats: int) -> list[dict]:
    gen = torch.Generator().manual_seed(2)
    shapes = [(2048, 1536), (256, 1536), (256, 1536), (1536, 1536), (8960, 1536), (8960, 1536), (1536, 8960)] * 24
    weights = [empty_buffer(shape, torch.bfloat16).copy_(torch.randn(shape, generator=gen)) for shape in shapes]
    xs = {k: torch.randn(1, k, generator=gen).bfloat16() for _, k in shapes}
    total = sum(w.nbytes for w in weights)

    def sweep(fn):
        return lambda: [fn(xs[w.shape[1]], w) for w in weights]

    ours = _timed(sweep(native.linear_one_row_bf16), repeats)
    with one_row_matmuls(1, torch.bfloat16, torch.device("cpu")):  # oneDNN off: torch's own one-row kernel
        ref = _timed(sweep(F.linear), repeats)
    onednn = _timed(sweep(F.linear), repeats)  # oneDNN, torch's default
    native_rate = total / ours.median / 1e9
    return [dict(kernel="one-row linear vs torch's own kernel", unit="GB/s of weights", native=native_rate,
                 torch=total / ref.median / 1e9, **speedup(ref, ours)),
            dict(kernel="one-row linear vs oneDNN", unit="GB/s of weights", native=native_rate,
                 torch=total / onednn.median / 1e9, **speedup(onednn, ours))]  # fmt: skip


# One Qwen2.5-VL-3B decoder layer, fused as glimpse runs it: qkv, o, gate_up, down ([out, in]).
QWEN_3B_LAYER = ((2560, 2048), (2048, 2048), (22016, 2048), (2048, 11008))
ROW_COUNTS = (1, 2, 4, 8, 16, 32, 64)


def compute_rate(size: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of one large bf16 matmul ([size, size] @ [size, size], median of `repeats`)."""
    gen = torch.Generator().manual_seed(3)
    a, b = (torch.randn(size, size, generator=gen).bfloat16() for _ in range(2))
    return 2 * size**3 / _median_seconds(lambda: a @ b, repeats)


def _row_sweep(native, repeats: int, read_bw: float, flops: float) -> list[dict]:
    gen = torch.Generator().manual_seed(4)
    weights = [empty_buffer(s, torch.bfloat16).copy_(torch.randn(s, generator=gen)) for s in QWEN_3B_LAYER]
    nbytes = sum(w.nbytes for w in weights)
    params = sum(w.numel() for w in weights)
    rows = []
    for n in ROW_COUNTS:
        xs = {w.shape[1]: torch.randn(n, w.shape[1], generator=gen).bfloat16() for w in weights}
        impls = [("oneDNN", F.linear)] + ([("native", native.linear_one_row_bf16)] if n == 1 else [])
        for name, fn in impls:
            seconds = _median_seconds(lambda fn=fn, xs=xs: [fn(xs[w.shape[1]], w) for w in weights], repeats)
            flop_s = 2 * n * params / seconds
            rows.append(dict(rows=n, impl=name, gb_per_s=nbytes / seconds / 1e9, gflop_per_s=flop_s / 1e9,
                             of_read_probe=nbytes / seconds / read_bw, of_compute_probe=flop_s / flops))  # fmt: skip
    return rows


def format_speedup(row: dict) -> str:
    """`1.85x (1.62-2.03)`: the speed-up of the medians, then its spread."""
    lo, hi = row["speedup_range"]
    return f"{row['speedup']:.2f}x ({lo:.2f}-{hi:.2f})"


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    native = cpu_kernels()
    if native is None:
        print("the native kernels do not run on this machine (see the log): nothing to compare")
        return 1
    with torch.inference_mode():
        rows = []
        if not args.only_rows:
            rows = _attention_rows(native, args.repeats) + _decode_rows(native, args.repeats)
            rows += _linear_rows(native, args.repeats)
        probe, flops = read_bandwidth(), compute_rate()
        sweep = _row_sweep(native, args.repeats, probe, flops)
    segment_path = "AMX tiles" if native.use_tile_attention() else "AVX512-BF16 dot products"
    result = {"threads": torch.get_num_threads(), "repeats": args.repeats, "segment_attention_path": segment_path,
              "rows": rows,
              "read_bandwidth_bytes_per_s": probe,
              "compute_flop_per_s": flops, "linear_by_rows": sweep}  # fmt: skip
    if not args.json:
        print(f"native segment attention (vision, causal prefill) on {segment_path}")
        print(f"{'kernel':44s} {'unit':16s} {'native':>8s} {'torch':>8s} {'speed-up (spread)':>20s}")
        for r in rows:
            against = f"  (the torch column: {r['against']})" if "against" in r else ""
            print(f"{r['kernel']:44s} {r['unit']:16s} {r['native']:8.1f} {r['torch']:8.1f} {format_speedup(r):>20s}{against}")
        print(f"probes: read {probe / 1e9:.1f} GB/s (torch.sum of 1 GiB float32, median of 5); "
              f"compute {flops / 1e9:.0f} GFLOP/s (2048^3 bf16 matmul)")
        print("Qwen2.5-VL-3B decoder layer (fused q/k/v and gate/up), bf16, by rows:")
        print(f"{'rows':>4s} {'impl':7s} {'GB/s':>7s} {'of read':>8s} {'GFLOP/s':>8s} {'of compute':>10s}")
        for r in sweep:
            print(f"{r['rows']:4d} {r['impl']:7s} {r['gb_per_s']:7.1f} {100 * r['of_read_probe']:7.0f}% "
                  f"{r['gflop_per_s']:8.1f} {100 * r['of_compute_probe']:9.0f}%")
    print(json.dumps(result))
    return 0
