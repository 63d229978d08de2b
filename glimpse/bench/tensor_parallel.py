"""`glimpse bench tensor-parallel`: one engine split over 2 ranks against one process, and what the split costs.

Configurations, run in turn within each round (the order rotates every round): offline `LLM` with
tensor_parallel_size 1; 2 with the vision tower split by heads (`mm_encoder_tp_mode="weights"`); 2 with it
whole on each rank and the images split between them ("data"); for MoE checkpoints 2 with the experts whole on
one rank each (expert parallel). Each is loaded anew every round (a process holds one process group, so two
tensor-parallel engines cannot be kept side by side), runs one untimed warm-up chat, then one timed `LLM.chat`
of `--requests` chats, each one fresh random JPEG (new pixels every round, the same for every configuration of
a round) and a few words, `--output-len` greedy tokens with ignore_eos, prefix and encoder caches off.
Per round: output tok/s, the mean decode step (a step in which every request decodes; the whole
`runner.execute`, sampling and the hand-off to the workers included), encoder seconds, and the driver's
(rank 0's) collectives per decode step: how many, milliseconds inside them, bytes it put in, and their share
of the step. Memory: in fresh rank processes (`run_ranks`), each rank's VmRSS growth across `load_model` with
tp=1 and tp=2, next to the bytes of its weights and their share of one process's (packed weights off; the
imports are done first by loading a tiny checkpoint). Prints a table of medians and one JSON line.
On a CPU the ranks share its cores (each gets half the threads), so tp=2 cannot be faster than tp=1 there: read
the collectives' cost per step, not the speed ratio. A speed-up needs a device per rank.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from glimpse.bench._offline_worker import conversations
from glimpse.bench.offline_compare import cpu_model
from glimpse.cli import FAMILIES
from glimpse.errors import GlimpseError
from glimpse.units import int_at_least

IMAGE_SIZE = 224  # pixels a side: 64 image tokens on the GLM and Qwen factory checkpoints
INPUT_WORDS = 16
MIN_ROUNDS = 3  # fewer give a median of one or two noisy numbers
MIN_DECODE_STEPS = 16  # fewer, and per-step means and counts rest on a handful of steps
MIN_ROUND_SECONDS = 0.5  # a shorter timed chat is mostly start-up and scheduling noise
MIN_WEIGHT_BYTES = 64 << 20  # less, and RSS growth is mostly page and allocator granularity
SEED = 20250


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", default=None,
                   help="checkpoint folder (default: the factory's --family --size checkpoint, made in a temp dir)")  # fmt: skip
    p.add_argument("--family", choices=FAMILIES, default="glm4v",
                   help="the factory checkpoint's family; also the tiny checkpoint each rank loads before the memory "
                        "figure, so that imports are not counted as weights")  # fmt: skip
    p.add_argument("--size", choices=("tiny", "small", "medium"), default="small", help="the factory checkpoint's size")
    p.add_argument("--rounds", type=int_at_least(1), default=MIN_ROUNDS, help="timed chats per configuration")
    p.add_argument("--requests", type=int_at_least(1), default=16, help="chats in one timed LLM.chat call")
    p.add_argument("--output-len", type=int_at_least(2), default=32, help="greedy tokens per chat, with ignore_eos")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the JSON here")


def configurations(moe: bool) -> list[tuple[str, dict]]:
    """(name, LLM keyword arguments) of every configuration, tp=1 first."""
    out = [("tp1", {}), ("tp2-weights", {"tensor_parallel_size": 2, "mm_encoder_tp_mode": "weights"}),
           ("tp2-data", {"tensor_parallel_size": 2, "mm_encoder_tp_mode": "data"})]  # fmt: skip
    if moe:
        out.append(("tp2-expert", {"tensor_parallel_size": 2, "enable_expert_parallel": True}))
    return out


class StepMeter:
    """Stands in for the engine's runner: times every step and reads this process's collective counter
    around it. A step is a decode step when no request in it is still in its prompt (read before the
    step, while `num_computed_tokens` still says where each request stands)."""

    def __init__(self, engine) -> None:
        self.engine, self.runner = engine, engine.runner
        self.steps: list[dict] = []

    def __getattr__(self, name: str):  # num_forwards, requests, ... are the runner's
        return getattr(self.runner, name)

    def execute(self, sched):
        from glimpse.distributed import COLLECTIVES

        requests = self.engine.scheduler.requests
        decode = not sched.encode and all(requests[r].num_computed_tokens >= requests[r].num_prompt_tokens
                                          for r in sched.num_scheduled_tokens)  # fmt: skip
        before = COLLECTIVES.snapshot()
        start = time.perf_counter()
        out = self.runner.execute(sched)
        seconds = time.perf_counter() - start
        if sched:  # a step with tokens (not one that only hands over finished requests)
            self.steps.append({"decode": decode, "seconds": seconds, "encoder_s": out.encoder_seconds,
                               "collectives": COLLECTIVES.calls - before.calls,
                               "collective_s": COLLECTIVES.seconds - before.seconds,
                               "collective_bytes": COLLECTIVES.bytes - before.bytes})  # fmt: skip
        return out


def run_round(checkpoint: Path, options: dict, args: argparse.Namespace, chats: list, warm: list) -> dict:
    """Load one configuration, warm it up and time one chat of `chats`; the round's figures."""
    import torch

    from glimpse import LLM, SamplingParams

    llm = LLM(checkpoint, dtype=args.dtype, max_num_seqs=args.requests, kv_cache_memory="512MiB",
              enable_prefix_caching=False, enable_encoder_cache=False, **options)  # fmt: skip
    try:
        params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
        llm.chat(warm, params, use_tqdm=False)
        meter = StepMeter(llm.engine)
        llm.engine.runner = meter
        t0 = time.perf_counter()
        outs = llm.chat(chats, params, use_tqdm=False)
        seconds = time.perf_counter() - t0
    finally:
        llm.close()
        torch.set_num_threads(args.threads)  # a tensor-parallel engine gives this process its share of the cores
    tokens = sum(len(c.token_ids) for o in outs for c in o.outputs)
    decode = [s for s in meter.steps if s["decode"]]
    n = len(decode)
    step_s = sum(s["seconds"] for s in decode)
    coll_s = sum(s["collective_s"] for s in decode)
    return {"seconds": seconds, "output_tokens": tokens, "output_tok_s": tokens / seconds,
            "prompt_tokens": sum(len(o.prompt_token_ids) for o in outs), "steps": len(meter.steps),
            "decode_steps": n, "decode_step_ms": 1e3 * step_s / n if n else None,
            "encoder_s": sum(s["encoder_s"] for s in meter.steps),
            "collectives_per_step": sum(s["collectives"] for s in decode) / n if n else None,
            "collective_ms_per_step": 1e3 * coll_s / n if n else None,
            "collective_bytes_per_step": sum(s["collective_bytes"] for s in decode) / n if n else None,
            "collective_share": coll_s / step_s if step_s else None,
            "prefill_collectives": sum(s["collectives"] for s in meter.steps if not s["decode"])}  # fmt: skip


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def rank_memory(checkpoint: str, size: int, dtype: str, warm: str) -> dict:
    """Rank-side: VmRSS growth across `load_model` of this rank's share, and the bytes its model holds.
    Before it, a tiny checkpoint is loaded (imports, native kernels) and the checkpoint's model is built on
    the meta device (its family's modules), so the growth is the weights'. Measured twice: as `top` sees it,
    and after glibc's `malloc_trim` (the storage `fuse_projections` and `move_to_huge_pages` replaced is free
    but may sit in the allocator's lists, 3-15% of the weights here, until the process allocates again)."""
    os.environ["GLIMPSE_PACKED_WEIGHTS"] = "0"  # bf16 linears would keep a second, packed copy
    from glimpse.loader import check_tensor_parallel, load_model

    load_model(warm, dtype, tensor_parallel_size=size)
    check_tensor_parallel(checkpoint, size)
    gc.collect()
    before = _rss()
    model = load_model(checkpoint, dtype, tensor_parallel_size=size)
    gc.collect()
    growth = _rss() - before
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)  # glibc only
    if trim is not None:
        trim(0)
    held = sum(p.nbytes for p in model.parameters()) + sum(b.nbytes for b in model.buffers())
    return {"rss_growth_bytes": growth, "trimmed_growth_bytes": _rss() - before if trim else None, "weight_bytes": held}


def memory(checkpoint: Path, dtype: str, warm: Path) -> dict:
    from glimpse.testing.parallel import run_ranks

    out = {}
    for size in (1, 2):
        out[f"tp{size}"] = run_ranks(rank_memory, size, str(checkpoint), size, dtype, str(warm))
    whole = out["tp1"][0]
    for ranks in out.values():
        for r in ranks:
            r["rss_over_weights"] = r["rss_growth_bytes"] / r["weight_bytes"]
            r["trimmed_over_weights"] = _ratio(r["trimmed_growth_bytes"], r["weight_bytes"])
            r["weights_share"] = r["weight_bytes"] / whole["weight_bytes"]
            r["rss_share"] = r["rss_growth_bytes"] / whole["rss_growth_bytes"] if whole["rss_growth_bytes"] else None
    return out


def _median(values: list) -> float | None:
    kept = [v for v in values if v is not None]
    return statistics.median(kept) if kept else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


KEYS = ("output_tok_s", "decode_step_ms", "encoder_s", "collectives_per_step", "collective_ms_per_step",
        "collective_bytes_per_step")  # fmt: skip


def summarize(rounds: dict[str, list[dict]]) -> dict:
    """Medians per configuration, and the ratios worked out from those medians (what the table prints)."""
    out = {}
    for name, rs in rounds.items():
        med = {key: _median([r[key] for r in rs]) for key in KEYS}
        med["collective_share"] = _ratio(med["collective_ms_per_step"], med["decode_step_ms"])
        out[name] = med
    one = out["tp1"]
    for med in out.values():
        med["tok_s_vs_tp1"] = _ratio(med["output_tok_s"], one["output_tok_s"])
        med["step_vs_tp1"] = _ratio(med["decode_step_ms"], one["decode_step_ms"])
    return out


def warnings(args: argparse.Namespace, rounds: dict[str, list[dict]], mem: dict) -> list[str]:
    out = []
    if mem["tp1"][0]["weight_bytes"] < MIN_WEIGHT_BYTES:
        out.append(f"the weights are {mem['tp1'][0]['weight_bytes'] / 2**20:.1f} MiB: too little for RSS to measure "
                   f"(pages, allocator); the memory figures need >= {MIN_WEIGHT_BYTES >> 20} MiB (--size small)")  # fmt: skip
    if args.rounds < MIN_ROUNDS:
        out.append(f"only {args.rounds} round(s) per configuration: medians need >= {MIN_ROUNDS} (--rounds)")
    for name, rs in rounds.items():
        for i, r in enumerate(rs):
            if r["decode_steps"] < MIN_DECODE_STEPS:
                out.append(f"{name} round {i}: {r['decode_steps']} decode steps, too few for per-step figures "
                           f"(>= {MIN_DECODE_STEPS}: raise --output-len)")  # fmt: skip
            if r["seconds"] < MIN_ROUND_SECONDS:
                out.append(f"{name} round {i}: the timed chat took {r['seconds']:.2f} s, too short to mean much "
                           f"(>= {MIN_ROUND_SECONDS:g} s: raise --requests or --output-len)")  # fmt: skip
            if r["output_tokens"] != args.requests * args.output_len:
                out.append(f"{name} round {i}: {r['output_tokens']} tokens, not {args.requests} x {args.output_len}")
        first = [r["prompt_tokens"] for r in rounds["tp1"]]
        if [r["prompt_tokens"] for r in rs] != first:
            out.append(f"{name}: prompt tokens {[r['prompt_tokens'] for r in rs]} differ from tp1's {first}")
    return out


def _cell(value: float | None, width: int, digits: int = 2) -> str:
    return f"{'n/a':>{width}}" if value is None else f"{value:>{width}.{digits}f}"


def print_report(report: dict) -> None:
    w = report["workload"]
    print(f"glimpse bench tensor-parallel: {report['checkpoint']} ({report['dtype']})")
    print(f"CPU: {report['cpu']}; tp=1 runs on {report['threads']} threads, each of 2 ranks on "
          f"{report['threads_per_rank']}")  # fmt: skip
    print(f"workload: {w['requests']} chats per LLM.chat, each one fresh {IMAGE_SIZE}x{IMAGE_SIZE} JPEG + "
          f"{INPUT_WORDS} words, {w['output_tokens']} greedy tokens (ignore_eos), caches off; medians over "
          f"{report['rounds']} round(s); collectives are rank 0's, per decode step")  # fmt: skip
    head = (f"{'configuration':<13} | {'tok/s':>8} | {'vs tp1':>6} | {'step ms':>8} | {'vs tp1':>6} | "
            f"{'encoder s':>9} | {'coll/step':>9} | {'coll ms':>8} | {'coll KiB':>9} | {'share %':>7}")  # fmt: skip
    print(head)
    print("-" * len(head))
    for name, m in report["medians"].items():
        kib = None if m["collective_bytes_per_step"] is None else m["collective_bytes_per_step"] / 1024
        share = None if m["collective_share"] is None else 100 * m["collective_share"]
        print(f"{name:<13} | {_cell(m['output_tok_s'], 8)} | {_cell(m['tok_s_vs_tp1'], 6)} | "
              f"{_cell(m['decode_step_ms'], 8)} | {_cell(m['step_vs_tp1'], 6)} | {_cell(m['encoder_s'], 9, 3)} | "
              f"{_cell(m['collectives_per_step'], 9, 1)} | {_cell(m['collective_ms_per_step'], 8)} | "
              f"{_cell(kib, 9, 1)} | {_cell(share, 7, 1)}")  # fmt: skip
    print("memory at load (VmRSS growth across load_model in fresh rank processes, packed weights off; trimmed: "
          "after malloc_trim, without the allocator's free lists):")  # fmt: skip
    head = (f"{'rank':<9} | {'RSS MiB':>8} | {'trimmed MiB':>11} | {'weights MiB':>11} | {'RSS/weights':>11} | "
            f"{'trimmed/weights':>15} | {'weights share':>13}")  # fmt: skip
    print(head)
    print("-" * len(head))
    for name, ranks in report["memory"].items():
        for rank, r in enumerate(ranks):
            trimmed = None if r["trimmed_growth_bytes"] is None else r["trimmed_growth_bytes"] / 2**20
            print(f"{name + ' r' + str(rank):<9} | {r['rss_growth_bytes'] / 2**20:8.1f} | {_cell(trimmed, 11, 1)} | "
                  f"{r['weight_bytes'] / 2**20:11.1f} | {r['rss_over_weights']:11.2f} | "
                  f"{_cell(r['trimmed_over_weights'], 15)} | {r['weights_share']:13.3f}")  # fmt: skip
    print(f"NOTE: {report['note']}")
    for warning in report["warnings"]:
        print(f"WARNING: {warning}")


def run(args: argparse.Namespace) -> int:
    import torch

    from glimpse.config import read_json
    from glimpse.distributed.executor import threads_per_rank
    from glimpse.testing import make_checkpoint

    args.threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="glimpse-tp-bench-") as tmp:
        if args.checkpoint is None:
            checkpoint = make_checkpoint(args.family, args.size, Path(tmp) / "checkpoint", dtype=args.dtype)
        else:
            checkpoint = Path(args.checkpoint)
            if not (checkpoint / "config.json").is_file():
                raise GlimpseError(f"{checkpoint} is not a checkpoint folder (no config.json); check --checkpoint")
        warm = make_checkpoint(args.family, "tiny", Path(tmp) / "warm", dtype=args.dtype)
        text_config = read_json(checkpoint / "config.json").get("text_config", {})
        configs = configurations(bool(text_config.get("n_routed_experts")))
        rounds: dict[str, list[dict]] = {name: [] for name, _ in configs}
        # Untimed: the process's first engine pays one-time costs (kernel builds for the batch's shapes, allocator
        # growth) that would otherwise land on round 0's first configuration.
        print("warm-up: tp1", file=sys.stderr, flush=True)
        run_round(checkpoint, {}, args, conversations(args.requests, [SEED + 2, 0], IMAGE_SIZE, INPUT_WORDS),
                  conversations(1, [SEED + 3, 0], IMAGE_SIZE, INPUT_WORDS))  # fmt: skip
        for r in range(args.rounds):
            chats = conversations(args.requests, [SEED, r], IMAGE_SIZE, INPUT_WORDS)
            warm_chat = conversations(1, [SEED + 1, r], IMAGE_SIZE, INPUT_WORDS)
            shift = r % len(configs)
            for name, options in configs[shift:] + configs[:shift]:
                print(f"round {r}: {name}", file=sys.stderr, flush=True)
                rounds[name].append(run_round(checkpoint, options, args, chats, warm_chat))
        print("memory: loading in rank processes", file=sys.stderr, flush=True)
        mem = memory(checkpoint, args.dtype, warm)
    cores = os.cpu_count() or 1
    report = {"bench": "tensor-parallel", "checkpoint": str(args.checkpoint or f"factory {args.family} {args.size}"),
              "dtype": args.dtype, "cpu": cpu_model(), "threads": args.threads, "threads_per_rank": threads_per_rank(2),
              "rounds": args.rounds,
              "workload": {"requests": args.requests, "output_tokens": args.output_len, "image": [IMAGE_SIZE, IMAGE_SIZE],
                           "input_words": INPUT_WORDS},
              "configurations": {name: options for name, options in configs},
              "medians": summarize(rounds), "per_round": rounds, "memory": mem,
              "note": f"{cores} logical CPU(s) here, shared by the ranks: tp=2 on one CPU cannot be faster than tp=1 "
                      "(a speed-up needs a device per rank); what this run measures is the collectives' cost per step",
              "warnings": warnings(args, rounds, mem)}  # fmt: skip
    print_report(report)
    text = json.dumps(report)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0
