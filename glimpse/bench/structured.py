"""Structured output's cost: decode throughput with a distinct JSON schema per request against none, side by side.

One engine, one batch of `--batch` requests that all decode exactly `--output-len` tokens (each schema is
an array of at least that many integers, so no answer can end early and both sides run the same batch
shapes), alternating unconstrained and constrained rounds after one untimed warm-up round of each (the
engine's first batch can be far slower: 7 against 42 tok/s in one run at batch 16 on the 3b shapes; the
warm-up's schemas are other ones, so the first timed round still compiles its own). Decode throughput is
the tokens after each request's first over the wall time from the last first token to the end (sampling
and masking included); grammar compilation is reported apart, as the TTFT it adds (`grammar_s`): on a cold
engine (the warm-up: xgrammar's tables of the vocabulary and the schemas), for new schemas (the first
timed round) and cached (the later rounds). Prints a table and one JSON line. The issue's target: at batch
16 with a vocabulary of at least 150k tokens (`make-checkpoint qwen2_5_vl --size 3b --no-weights`,
`--load-format dummy`), the constraint costs at most 10% of decode throughput.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from glimpse.units import int_at_least


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="checkpoint folder (the 3b one: make-checkpoint --size 3b)")
    p.add_argument("--load-format", choices=("auto", "dummy"), default="auto", help="dummy: random weights, no files")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--batch", type=int_at_least(1), default=16, help="requests decoding together")
    p.add_argument("--output-len", type=int_at_least(8), default=32, help="tokens each request decodes")
    p.add_argument("--rounds", type=int_at_least(3), default=3, help="rounds per side (alternating)")
    p.add_argument("--json", default=None, help="also write the JSON to this file")


def schema(i: int, length: int) -> dict:
    """Request i's own schema: an array of `length`+ integers, its bounds and key distinct per request."""
    item = {"type": "integer", "minimum": -(i + 1) * 7, "maximum": 1000 + 13 * i}
    return {"type": "object", "properties": {f"values_{i}": {"type": "array", "items": item, "minItems": length}},
            "required": [f"values_{i}"]}  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from glimpse import LLM, SamplingParams, StructuredOutputsParams

    t0 = time.perf_counter()
    llm = LLM(args.checkpoint, load_format=args.load_format, dtype=args.dtype, max_num_seqs=args.batch,
              max_model_len=1024, kv_cache_memory="1GiB")  # fmt: skip
    load_s = time.perf_counter() - t0
    vocab = llm.engine.vocab_size
    prompt = "Write the numbers."

    def params(i: int, constrained: bool) -> SamplingParams:
        so = StructuredOutputsParams(json=schema(i, args.output_len)) if constrained else None
        return SamplingParams(temperature=1.0, top_p=1.0, top_k=0, max_tokens=args.output_len, ignore_eos=True,
                              seed=i, structured_outputs=so)  # fmt: skip

    def one_round(r: int, constrained: bool, first: int = 0) -> dict:
        """One batch; requests first .. first + batch - 1 (their schemas are theirs alone)."""
        start = time.perf_counter()
        outs = llm.generate([prompt] * args.batch, [params(first + i, constrained) for i in range(args.batch)],
                            use_tqdm=False)  # fmt: skip
        wall = time.perf_counter() - start
        tokens = sum(len(c.token_ids) for o in outs for c in o.outputs)
        last_first = max(o.metrics["ttft_s"] for o in outs)  # every request has its first token by then
        decode = wall - last_first
        return {"round": r, "tokens": tokens, "wall_s": wall, "decode_s": decode,
                "decode_tok_s": (tokens - len(outs)) / decode,
                "ttft_s": statistics.median(o.metrics["ttft_s"] for o in outs),
                "grammar_s": max(o.metrics["grammar_s"] for o in outs)}  # fmt: skip

    # Untimed: warms the engine (its first batch is the slowest) and the grammar engine (the vocabulary's tables),
    # with schemas of requests batch .. 2 * batch - 1, so that the timed rounds' schemas are still new.
    warmup = {"none": one_round(-1, False), "schema": one_round(-1, True, first=args.batch)}
    rows: dict[str, list[dict]] = {"none": [], "schema": []}
    for r in range(args.rounds):
        for side in ("none", "schema") if r % 2 == 0 else ("schema", "none"):
            rows[side].append(one_round(r, side == "schema"))

    def med(side: str, key: str, skip_first: bool = False) -> float:
        vals = [row[key] for row in rows[side][1 if skip_first else 0 :]] or [rows[side][0][key]]
        return statistics.median(vals)

    ratio = med("schema", "decode_tok_s") / med("none", "decode_tok_s")
    result = {"checkpoint": str(args.checkpoint), "vocab_size": vocab, "batch": args.batch,
              "output_len": args.output_len, "rounds": args.rounds, "load_s": load_s, "rows": rows,
              "decode_tok_s_none": med("none", "decode_tok_s"), "decode_tok_s_schema": med("schema", "decode_tok_s"),
              "throughput_ratio": ratio, "overhead_pct": 100 * (1 - ratio),
              "ttft_s_none": med("none", "ttft_s"), "ttft_s_schema_cached": med("schema", "ttft_s", True),
              "warmup": warmup, "cold_engine_grammar_s": warmup["schema"]["grammar_s"],
              "first_round_grammar_s": rows["schema"][0]["grammar_s"],
              "cached_grammar_s": med("schema", "grammar_s", True)}  # fmt: skip
    print(f"vocabulary {vocab}, batch {args.batch}, {args.output_len} tokens each, {args.rounds} rounds per side")
    print(f"{'':28s}{'no constraint':>16s}{'a schema each':>16s}{'ratio':>8s}")
    print(f"{'decode tok/s (median)':28s}{result['decode_tok_s_none']:16.1f}{result['decode_tok_s_schema']:16.1f}"
          f"{ratio:8.3f}")  # fmt: skip
    for side, label in (("none", "no constraint"), ("schema", "a schema each")):
        print(f"  rounds, {label}: " + ", ".join(f"{row['decode_tok_s']:.1f}" for row in rows[side]))
    print(f"  untimed warm-up round: {warmup['none']['decode_tok_s']:.1f} (no constraint), "
          f"{warmup['schema']['decode_tok_s']:.1f} (a schema each)")  # fmt: skip
    print(f"{'TTFT s (median, cached)':28s}{result['ttft_s_none']:16.3f}{result['ttft_s_schema_cached']:16.3f}")
    print(f"grammar compilation as added TTFT, {args.batch} schemas: {result['cold_engine_grammar_s']:.3f} s on a cold "
          f"engine (vocabulary tables included, the warm-up), {result['first_round_grammar_s']:.3f} s new (first timed "
          f"round), {result['cached_grammar_s']:.3f} s cached")  # fmt: skip
    print(f"overhead on decode throughput {result['overhead_pct']:.1f}% (target <= 10%)")
    text = json.dumps(result)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    return 0
