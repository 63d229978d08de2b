"""`glimpse bench offline-compare`: glimpse's offline `LLM.chat` against vLLM-CPU's, side by side.

Each round runs `_offline_worker.py` once per engine, each in its own process (glimpse under this
python, vLLM under `--other-python`; the engine that goes first swaps every round). Both engines of
a round get the same N chats, one fresh random 224x224 JPEG and ~64 random words each (a new seed
per round: no cache hits), 32 greedy tokens with ignore_eos. Per round: output tokens/s of the timed
`LLM.chat` call (loading and a one-request warm-up are outside it). Prints the medians and the
ratio glimpse/vLLM as a table with the CPU model and threads, and every round as JSON (`--json FILE`).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from glimpse.bench import compare, serve
from glimpse.bench.compare import MIN_ROUNDS, _fmt, _load_format, _median, _ratio

WORKER = Path(__file__).with_name("_offline_worker.py")
SIDES = ("glimpse", "vllm")
DEFAULT_OTHER_PYTHON = Path.home() / ".cache" / "vllm-cpu-venv" / "bin" / "python"
TAIL_LINES = 25  # of a failed worker's stderr


class WorkerError(RuntimeError):
    """A worker exited non-zero, timed out or printed no result line; the message holds its log tail."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="checkpoint folder both engines load")
    parser.add_argument("--other-python", default=str(DEFAULT_OTHER_PYTHON),
                        help="python of the venv that has vLLM (it runs the worker script by path)")  # fmt: skip
    same = parser.add_argument_group("settings both engines get")
    same.add_argument("--load-format", default=None, choices=("auto", "dummy"),
                      help="default: dummy for a folder without *.safetensors, else auto")  # fmt: skip
    compare.add_engine_settings(same)
    work = parser.add_argument_group("workload")
    work.add_argument(
        "--requests", type=serve._int_min(1), default=64, help="chats in one timed LLM.chat call"
    )
    compare.add_media_workload(work)
    work.add_argument("--output-len", type=serve._int_min(1), default=32, help="max_tokens, with ignore_eos")
    work.add_argument("--rounds", type=serve._int_min(1), default=MIN_ROUNDS, help="timed runs per engine")
    work.add_argument("--seed", type=serve._int_min(0), default=0, help="round r uses seed + r")
    work.add_argument("--timeout", type=serve._positive, default=3600.0,
                      help="seconds one worker (load, warm-up and timed run) may take")  # fmt: skip
    parser.add_argument(
        "--json", default=None, metavar="FILE", help="also write every round and the medians here"
    )


def run(args: argparse.Namespace) -> dict | int:
    load_format = args.load_format or _load_format(args.checkpoint)
    rounds: dict[str, list[dict]] = {side: [] for side in SIDES}
    try:
        for r in range(args.rounds):
            for side in SIDES if r % 2 == 0 else SIDES[::-1]:
                rounds[side].append(run_worker(args, side, args.seed + r, load_format))
    except WorkerError as exc:
        print(f"glimpse bench offline-compare: {exc}", file=sys.stderr)
        return 1
    report = summarize(args, rounds, load_format)
    print_table(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return report


def worker_command(args: argparse.Namespace, side: str, seed: int, load_format: str, batches: int = 1) -> list[str]:
    """glimpse: this python, `-m` (so the package resolves); vLLM: the other python on the file, `-P` so the
    script's folder (glimpse/bench, whose module names could shadow a library's) stays off sys.path."""
    if side == "glimpse":
        head = [sys.executable, "-m", "glimpse.bench._offline_worker", "--engine", "glimpse"]
    else:
        head = [args.other_python, "-P", str(WORKER), "--engine", "vllm"]
    return [*head, "--model", str(args.checkpoint), "--requests", str(args.requests), "--output-len",
            str(args.output_len), "--input-len", str(args.input_len), "--image-size", str(args.image_size),
            "--seed", str(seed), "--load-format", load_format, "--max-model-len", str(args.max_model_len),
            "--max-num-seqs", str(args.max_num_seqs), "--dtype", args.dtype, "--kv-cache-gib",
            str(args.kv_cache_gib), "--threads", str(args.threads), "--batches", str(batches)]  # fmt: skip


def run_worker(args: argparse.Namespace, side: str, seed: int, load_format: str, batches: int = 1) -> dict:
    """One worker process (`batches` timed calls); its result line, or WorkerError with the tail of its stderr."""
    cmd = worker_command(args, side, seed, load_format, batches)
    root = str(Path(__file__).resolve().parents[2])  # the glimpse this harness belongs to, installed or not
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    # The worker sets the threads and KV size itself (OMP_NUM_THREADS, VLLM_CPU_*) from its flags.
    env = {**os.environ, "PYTHONPATH": path} if side == "glimpse" else None
    print(f"{side} (seed {seed}): {' '.join(cmd)}", file=sys.stderr, flush=True)
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        try:
            # Its own session, so a timeout ends the worker and any engine process it spawned.
            proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, start_new_session=True)
        except OSError as exc:
            raise WorkerError(f"{side} worker could not start ({cmd[0]}): {exc} (--other-python)") from None
        try:
            rc = proc.wait(args.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = None
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    tail = "\n".join(stderr.splitlines()[-TAIL_LINES:])
    if rc is None:
        raise WorkerError(f"{side} worker ran past --timeout {args.timeout:g} s; last stderr lines:\n{tail}")
    result = _result_line(stdout)
    if rc != 0 or result is None:
        why = f"exited with {rc}" if rc != 0 else "printed no result line"
        raise WorkerError(f"{side} worker {why}; last stderr lines:\n{tail}")
    return result


def _result_line(stdout: str) -> dict | None:
    """The worker's JSON line (the last one; an engine may log to stdout before it)."""
    for line in reversed(stdout.splitlines()):
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict) and "output_tok_s" in value:
            return value
    return None


def summarize(args: argparse.Namespace, rounds: dict[str, list[dict]], load_format: str) -> dict:
    report: dict = {"model": str(args.checkpoint), "cpu": cpu_model(), "threads": args.threads,
                    "other_python": args.other_python, "rounds": args.rounds,
                    "workload": {"requests": args.requests, "image": [args.image_size, args.image_size],
                                 "input_words": args.input_len, "output_tokens": args.output_len,
                                 "temperature": 0.0, "ignore_eos": True},
                    "settings": {"load_format": load_format, "dtype": args.dtype, "max_model_len": args.max_model_len,
                                 "max_num_seqs": args.max_num_seqs, "kv_cache_gib": args.kv_cache_gib}}  # fmt: skip
    for side in SIDES:
        rs = rounds[side]
        report[side] = {"median_output_tok_s": _median([r["output_tok_s"] for r in rs]),
                        "median_seconds": _median([r["seconds"] for r in rs]),
                        "median_load_seconds": _median([r["load_seconds"] for r in rs]), "rounds": rs}  # fmt: skip
    report["ratio"] = {"output_tok_s": _ratio(report["glimpse"]["median_output_tok_s"],
                                              report["vllm"]["median_output_tok_s"])}  # fmt: skip
    report["warnings"] = warnings(report, args)
    return report


def warnings(report: dict, args: argparse.Namespace) -> list[str]:
    """What makes this run's figures weak: too few rounds, tokens missing, different prompts, too many threads."""
    out = []
    if args.rounds < MIN_ROUNDS:
        out.append(f"only {args.rounds} round(s) per engine: medians need >= {MIN_ROUNDS} (--rounds)")
    if args.threads > (os.cpu_count() or 1):
        out.append(f"--threads {args.threads} is more than the {os.cpu_count()} CPUs here")
    for side in SIDES:
        for r in report[side]["rounds"]:
            if r["output_tokens"] != args.requests * args.output_len:
                out.append(f"{side} (seed {r['seed']}) made {r['output_tokens']} tokens, not {args.requests} x "
                           f"{args.output_len} (ignore_eos not honoured?)")  # fmt: skip
    for g, v in zip(report["glimpse"]["rounds"], report["vllm"]["rounds"], strict=True):
        if g["prompt_tokens"] != v["prompt_tokens"]:
            out.append(f"seed {g['seed']}: the same chats made {g['prompt_tokens']} prompt tokens in glimpse, "
                       f"{v['prompt_tokens']} in vLLM (different chat template or image resize?)")  # fmt: skip
    return out


def print_table(report: dict) -> None:
    w, s = report["workload"], report["settings"]
    print(f"glimpse bench offline-compare: {report['model']}  (load format {s['load_format']}, {s['dtype']})")
    print(f"CPU: {report['cpu']}; {report['threads']} threads per engine (glimpse OMP_NUM_THREADS, "
          f"vLLM VLLM_CPU_OMP_THREADS_BIND=0-{report['threads'] - 1})")  # fmt: skip
    print(f"workload: {w['requests']} chats in one LLM.chat call, each one {w['image'][0]}x{w['image'][1]} image + "
          f"{w['input_words']} words, {w['output_tokens']} output tokens (greedy, ignore_eos); "
          f"medians over {report['rounds']} round(s) per engine")  # fmt: skip
    head = f"{'engine':<8} | {'tok/s':>9} | {'seconds':>9} | {'load s':>8} | tok/s per round"
    print(head)
    print("-" * len(head))
    for side, label in zip(SIDES, ("glimpse", "vLLM"), strict=True):
        r = report[side]
        per_round = " ".join(f"{x['output_tok_s']:.2f}" for x in r["rounds"])
        print(f"{label:<8} | {_fmt(r['median_output_tok_s'], 9)} | {_fmt(r['median_seconds'], 9)} | "
              f"{_fmt(r['median_load_seconds'], 8)} | {per_round}")  # fmt: skip
    print(f"ratio glimpse / vLLM, output tok/s: {_fmt(report['ratio']['output_tok_s'], 0).strip()}")
    for warning in report["warnings"]:
        print(f"WARNING: {warning}")


def cpu_model() -> str:
    """The CPU's model name as lscpu shows it (from /proc/cpuinfo), with the count of logical CPUs."""
    name = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        import platform

        name = platform.processor() or name
    return f"{name} ({os.cpu_count()} logical CPUs)"
