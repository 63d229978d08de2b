"""`glimpse bench compare`: glimpse and another OpenAI-compatible server (e.g. vLLM-CPU), side by side.

At each concurrency (default 1, 16, 64) the rounds alternate between the two servers (the first
server swaps every round, so slow drift hits both). Every request of every round carries a fresh
random 224x224 JPEG and random words (a new seed per round per server: no prefix- or encoder-cache
hits), asks for 32 tokens with ignore_eos and streams with usage. Per round: output tokens/s, mean
TTFT (send -> first chunk carrying generated text, not a role-only chunk) and mean TPOT
((latency - TTFT) / (usage completion_tokens - 1)). Prints the medians over rounds and the ratios
glimpse/other per concurrency as a table, and all rounds as JSON (`--json FILE`).

Before each round the harness waits until the machine is quiet (`--settle`): a server whose threads
keep spinning after its round (vLLM-CPU's keep one of two cores busy for ~0.9 s, measured) would
otherwise slow the first requests of the other server's round (a glimpse request sent inside that
window took 0.58-0.78 s to its first token instead of 0.1 s).

`--offline-ceiling` then times glimpse's offline `LLM.chat` on back-to-back batches of `concurrency`
chats of the same workload, without a server (a `bench offline-compare` worker with `--batches`, after
the glimpse server this started has stopped). Every request of a round asks for the same number of
tokens, so a closed-loop round runs in lockstep waves of `concurrency` requests: that rate is the most
glimpse's scheduler gets out of this machine on the round's work, and `ceiling / other` is the highest
throughput ratio over the other server that glimpse could show at that concurrency with serving free.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

from glimpse.bench import serve
from glimpse.bench.serve import EndpointError, RequestResult

MIN_ROUNDS = 3  # fewer rounds per server give a median of one or two noisy numbers
SIDES = ("glimpse", "other")


def add_engine_settings(group: argparse._ArgumentGroup) -> None:
    """The settings both sides of a side-by-side run get (here and in `bench offline-compare`)."""
    group.add_argument("--max-num-seqs", type=serve._int_min(1), default=64)
    group.add_argument("--max-model-len", type=serve._int_min(1), default=4096)
    group.add_argument("--kv-cache-gib", type=serve._int_min(1), default=2,
                       help="KV cache size (glimpse: kv_cache_memory; vLLM: VLLM_CPU_KVCACHE_SPACE)")  # fmt: skip
    group.add_argument("--threads", type=serve._int_min(1), default=2,
                       help="compute threads (glimpse: OMP_NUM_THREADS; vLLM: VLLM_CPU_OMP_THREADS_BIND=0-N-1)")  # fmt: skip
    group.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))


def add_media_workload(group: argparse._ArgumentGroup) -> None:
    """Each request's media and words (here and in `bench offline-compare`)."""
    group.add_argument("--image-size", type=serve._int_min(28), default=224, help="side of the square JPEG")
    group.add_argument(
        "--input-len", type=serve._int_min(1), default=64, help="prompt words (~tokens) besides the image"
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--other-url", required=True, help="root of the other server, e.g. http://127.0.0.1:8001"
    )
    parser.add_argument("--url", default=None, help="root of a running glimpse serve (default: start one)")
    parser.add_argument("--checkpoint", default=None,
                        help="checkpoint folder: glimpse serve is started on it, and it goes into the vLLM command")  # fmt: skip
    parser.add_argument("--glimpse-args", default="", help="extra flags for the glimpse serve this starts")
    parser.add_argument(
        "--api-key", default=None, help="glimpse's --api-key (also given to the one this starts)"
    )
    parser.add_argument("--other-api-key", default=None)
    same = parser.add_argument_group(
        "settings both servers get (the started glimpse and the printed vLLM command)"
    )
    add_engine_settings(same)
    run_ = parser.add_argument_group("workload")
    run_.add_argument(
        "--concurrency", type=_concurrencies, default=[1, 16, 64], help="comma-separated, e.g. 1,16,64"
    )
    run_.add_argument(
        "--rounds", type=serve._int_min(1), default=MIN_ROUNDS, help="rounds per server per concurrency"
    )
    run_.add_argument("--requests-per-round", type=serve._int_min(1), default=None,
                      help="requests in one round (default: 2 x concurrency, at least 8)")  # fmt: skip
    run_.add_argument("--min-requests", type=serve._int_min(1), default=16,
                      help="warn when a server gets fewer measured requests at a concurrency")  # fmt: skip
    run_.add_argument(
        "--warmup-requests", type=serve._int_min(0), default=2, help="unmeasured, per server, first"
    )
    add_media_workload(run_)
    run_.add_argument("--output-len", type=serve._int_min(2), default=32, help="max_tokens, with ignore_eos")
    run_.add_argument("--timeout", type=serve._positive, default=600.0, help="seconds per request")
    run_.add_argument("--settle", type=serve._non_negative, default=10.0, metavar="SECONDS",
                      help="before each round, wait up to this long for each CPU to be 90%% idle over 0.2 s "
                           "(0: no wait)")  # fmt: skip
    run_.add_argument("--start-timeout", type=serve._positive, default=900.0,
                      help="seconds the glimpse serve this starts may take to become healthy")  # fmt: skip
    run_.add_argument("--offline-ceiling", action="store_true",
                      help="then time glimpse's offline LLM.chat on back-to-back batches of each concurrency's "
                           "size of this workload, no server (needs --checkpoint)")  # fmt: skip
    run_.add_argument("--ceiling-batches", type=serve._int_min(1), default=6,
                      help="timed batches per concurrency for --offline-ceiling (their median is reported)")  # fmt: skip
    run_.add_argument("--seed", type=serve._int_min(0), default=None,
                      help="media and words seed (default: a random one, printed; a running server "
                           "remembers the images of an earlier run with the same seed in its caches)")  # fmt: skip
    parser.add_argument(
        "--json", default=None, metavar="FILE", help="also write every round and the medians here"
    )


def run(args: argparse.Namespace) -> dict | int:
    if args.seed is None:
        args.seed = secrets.randbelow(2**31)
    print(f"seed {args.seed} (pass --seed {args.seed} to draw the same media again)", file=sys.stderr)
    if not args.url and not args.checkpoint:
        print("glimpse bench compare: give --url (a running glimpse serve) or --checkpoint (to start one)",
              file=sys.stderr)  # fmt: skip
        return 2
    if args.offline_ceiling and not args.checkpoint:
        print("glimpse bench compare: --offline-ceiling loads the model itself: give --checkpoint", file=sys.stderr)
        return 2
    command = vllm_command(args)
    print(
        f"Start the other server with the same settings, e.g. vLLM-CPU:\n  {command}\n",
        file=sys.stderr,
        flush=True,
    )
    server = None
    try:
        other_model = asyncio.run(_served_model(args.other_url, args.other_api_key, args.timeout))
        if args.url:
            url = args.url
            model = asyncio.run(_served_model(url, args.api_key, args.timeout))
            if model != other_model:
                raise EndpointError(f"glimpse serves {model!r} but the other server serves {other_model!r}; "
                                    "start them with the same --served-model-name")  # fmt: skip
        else:
            server = GlimpseServer(args, other_model)  # serves the other's model name
            url = server.url
        report = asyncio.run(_compare(args, {"glimpse": url, "other": args.other_url}, other_model))
    except EndpointError as exc:
        print(f"glimpse bench compare: {exc}", file=sys.stderr)
        return 1
    finally:
        if server is not None:
            server.stop()
    report["vllm_command"] = command
    if args.offline_ceiling:
        try:
            report["offline_ceiling"] = offline_ceiling(args, report["results"])
        except EndpointError as exc:
            print(f"glimpse bench compare: {exc}", file=sys.stderr)
            return 1
    print_table(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return report


def vllm_command(args: argparse.Namespace) -> str:
    """The vLLM-CPU command with this run's settings (prefix caching is on by default in vLLM V1)."""
    port = str(urlsplit(args.other_url).port or 8000)
    ckpt = args.checkpoint or "CKPT"
    parts = [f"VLLM_CPU_KVCACHE_SPACE={args.kv_cache_gib}", f"VLLM_CPU_OMP_THREADS_BIND=0-{args.threads - 1}",
             "VENV/bin/python", "-m", "vllm.entrypoints.openai.api_server", "--model", shlex.quote(ckpt),
             "--dtype", args.dtype, "--max-model-len", str(args.max_model_len), "--max-num-seqs",
             str(args.max_num_seqs), "--port", port, "--limit-mm-per-prompt", shlex.quote('{"image": 1, "video": 0}')]  # fmt: skip
    if args.checkpoint and _load_format(args.checkpoint) == "dummy":
        parts += ["--load-format", "dummy"]
    return " ".join(parts)


def _load_format(checkpoint: str) -> str:
    """A folder without safetensors (`make-checkpoint --no-weights`) is served with random weights."""
    return "auto" if any(Path(checkpoint).glob("*.safetensors")) else "dummy"


def offline_ceiling(args: argparse.Namespace, results: list[dict]) -> list[dict]:
    """Per concurrency c: glimpse's offline rate on `--ceiling-batches` back-to-back batches of c chats of this
    workload (one worker process each), the share of it glimpse served, and its ratio to the other's served rate.
    A worker that fails is an EndpointError with the tail of its stderr."""
    from glimpse.bench.offline_compare import WorkerError, run_worker  # that module reads this one's helpers

    out = []
    for res in results:
        c = res["concurrency"]
        worker = argparse.Namespace(**{**vars(args), "requests": c, "timeout": args.start_timeout + args.timeout})
        try:  # the timeout covers the load, then the batches
            line = run_worker(worker, "glimpse", args.seed, _load_format(args.checkpoint), args.ceiling_batches)
        except WorkerError as exc:
            raise EndpointError(str(exc)) from None
        rate = _median(line["batch_tok_s"])
        out.append({"concurrency": c, "batches": line["batches"], "batch_tok_s": line["batch_tok_s"],
                    "median_tok_s": rate,
                    "glimpse_served_share": _ratio(res["glimpse"]["median_output_tok_s"], rate),
                    "ceiling_over_other": _ratio(rate, res["other"]["median_output_tok_s"])})  # fmt: skip
    return out


# ---- the glimpse server this starts ---------------------------------------------------------------


class GlimpseServer:
    """`glimpse serve CHECKPOINT` on a free loopback port with the shared settings; `stop()` ends it."""

    def __init__(self, args: argparse.Namespace, model_name: str) -> None:
        import httpx

        port = _free_port()
        cmd = [sys.executable, "-m", "glimpse.cli", "serve", args.checkpoint, "--host", "127.0.0.1", "--port",
               str(port), "--served-model-name", model_name, "--dtype", args.dtype,
               "--load-format", _load_format(args.checkpoint), "--max-num-seqs", str(args.max_num_seqs),
               "--max-model-len", str(args.max_model_len), "--kv-cache-memory", f"{args.kv_cache_gib}GiB",
               "--limit-mm-per-prompt", '{"image": 1, "video": 0}',
               "--max-concurrent-requests", str(max(64, *args.concurrency)), "--log-level", "warning"]  # fmt: skip
        if args.api_key:
            cmd += ["--api-key", args.api_key]
        cmd += shlex.split(args.glimpse_args)
        self.log = tempfile.NamedTemporaryFile("w+", prefix="glimpse-compare-", suffix=".log", delete=False)
        # The glimpse this harness belongs to, installed or not; OMP_NUM_THREADS sets torch's threads.
        root = str(Path(__file__).resolve().parents[2])
        path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": path}
        print(f"starting: {shlex.join(cmd)}  (log: {self.log.name})", file=sys.stderr, flush=True)
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        self.url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + args.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise EndpointError(f"glimpse serve exited with {self.proc.returncode}:\n{self._tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=2, trust_env=False).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise EndpointError(f"glimpse serve was not healthy within --start-timeout {args.start_timeout:g} s:\n"
                            f"{self._tail()}")  # fmt: skip

    def _tail(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- rounds ------------------------------------------------------------------------------------------


def _client(url: str, api_key: str | None, timeout: float, connections: int):
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    # trust_env=False: measure the servers themselves, never a proxy from the environment.
    return httpx.AsyncClient(base_url=url, headers=headers, timeout=httpx.Timeout(timeout), trust_env=False,
                             limits=limits)  # fmt: skip


async def _served_model(url: str, api_key: str | None, timeout: float) -> str:
    async with _client(url, api_key, timeout, 1) as client:
        try:
            return await serve.first_model(client)
        except EndpointError:
            raise EndpointError(f"{url}: could not read GET /v1/models (is the server up?)") from None


async def _compare(args: argparse.Namespace, urls: dict[str, str], model: str) -> dict:
    keys = {"glimpse": args.api_key, "other": args.other_api_key}
    top = max(args.concurrency)
    clients = {side: _client(urls[side], keys[side], args.timeout, top) for side in SIDES}
    try:
        for i, side in enumerate(SIDES):
            warm = _bodies(args, model, args.warmup_requests, (args.seed, 0, 0, i, 1))
            for result in await asyncio.gather(*(serve.stream_request(clients[side], "/v1/chat/completions", b)
                                                 for b in warm)):  # fmt: skip
                if not result.ok:
                    raise EndpointError(f"{side} ({urls[side]}): warm-up request failed: {result.error}")
        results = []
        for c in args.concurrency:
            n = args.requests_per_round or max(8, 2 * c)
            rounds: dict[str, list[dict]] = {side: [] for side in SIDES}
            for r in range(args.rounds):
                for i in (0, 1) if r % 2 == 0 else (1, 0):
                    side = SIDES[i]
                    bodies = _bodies(args, model, n, (args.seed, c, r, i, 0))
                    waited, quiet = await settle(args.settle)
                    rounds[side].append(await _round(clients[side], bodies, c) | {"settle_s": waited, "quiet": quiet})
            results.append(_medians(c, n, rounds))
    finally:
        for client in clients.values():
            await client.aclose()
    workload = {"image": [args.image_size, args.image_size], "input_words": args.input_len,
                "output_tokens": args.output_len, "ignore_eos": True, "stream": True}  # fmt: skip
    report = {"model": model, "seed": args.seed, "glimpse_url": urls["glimpse"], "other_url": urls["other"], "rounds": args.rounds,
              "workload": workload, "results": results}  # fmt: skip
    report["warnings"] = warnings(report, args)
    return report


QUIET_IDLE = 0.9  # the share of each CPU's time idle over a window that counts as quiet
QUIET_WINDOW = 0.2  # seconds


def cpu_times() -> dict[int, tuple[int, int]] | None:
    """(idle, total) jiffies since boot of each CPU this process may run on, from /proc/stat's `cpuN`
    lines (None where there is no such file)."""
    try:
        with open("/proc/stat") as f:
            lines = [line.split() for line in f if line.startswith("cpu") and line[3:4].isdigit()]
    except OSError:
        return None
    mine = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    out = {}
    for fields in lines:
        cpu, values = int(fields[0][3:]), [int(x) for x in fields[1:9]]
        if mine is None or cpu in mine:
            out[cpu] = (values[3] + values[4], sum(values))  # idle + iowait, of everything up to steal
    return out


async def settle(max_seconds: float) -> tuple[float, bool]:
    """Wait until each CPU this process may use was at least QUIET_IDLE idle over one QUIET_WINDOW (one
    spinning core is enough to slow the next round), or `max_seconds` passed. Returns (seconds waited,
    whether it got quiet); (0, True) without waiting where /proc/stat is missing (`warnings` says so)
    or `max_seconds` is 0."""
    start = time.perf_counter()
    before = cpu_times()
    if before is None or max_seconds <= 0:
        return 0.0, True
    while True:
        await asyncio.sleep(QUIET_WINDOW)
        after = cpu_times()
        waited = time.perf_counter() - start
        deltas = [(after[c][0] - before[c][0], after[c][1] - before[c][1]) for c in after if c in before]
        if deltas and all(total > 0 and idle >= QUIET_IDLE * total for idle, total in deltas):
            return waited, True
        if waited >= max_seconds:
            return waited, False
        before = after


def _bodies(args: argparse.Namespace, model: str, n: int, seed: tuple[int, ...]) -> list[bytes]:
    """n requests with fresh media and words: the seed names the concurrency, round and server."""
    rng = np.random.default_rng(list(seed))
    side = args.image_size
    out = []
    for _ in range(n):
        media = serve.media_parts(rng, [(side, side, 1)])
        body = serve.chat_body(media, rng, args.input_len, args.output_len, ignore_eos=True)
        out.append(json.dumps({"model": model, **body}).encode())
    return out


async def _round(client, bodies: list[bytes], concurrency: int) -> dict:
    gate = asyncio.Semaphore(concurrency)

    async def one(body: bytes) -> RequestResult:
        async with gate:
            return await serve.stream_request(client, "/v1/chat/completions", body)

    t0 = time.perf_counter()
    results = await asyncio.gather(*(one(b) for b in bodies))
    return round_stats(list(results), time.perf_counter() - t0)


def round_stats(results: list[RequestResult], duration: float) -> dict:
    """One round: output tokens/s over its wall time; mean TTFT and TPOT over its requests (ms)."""
    s = serve.summarize(results, duration, [])
    return {"output_tok_s": s["output_throughput"], "mean_ttft_ms": s["mean_ttft_ms"], "mean_tpot_ms": s["mean_tpot_ms"],
            "completed": s["completed"], "failed": s["failed"], "output_tokens": s["total_output_tokens"],
            "duration_s": duration, "token_counts_from": s["token_counts_from"], "errors": s["errors"]}  # fmt: skip


def _medians(concurrency: int, per_round: int, rounds: dict[str, list[dict]]) -> dict:
    out: dict = {"concurrency": concurrency, "requests_per_round": per_round}
    for side in SIDES:
        rs = rounds[side]
        out[side] = {"median_output_tok_s": _median([r["output_tok_s"] for r in rs]),
                     "median_ttft_ms": _median([r["mean_ttft_ms"] for r in rs]),
                     "median_tpot_ms": _median([r["mean_tpot_ms"] for r in rs]),
                     "completed": sum(r["completed"] for r in rs), "failed": sum(r["failed"] for r in rs),
                     "rounds": rs}  # fmt: skip
    g, o = out["glimpse"], out["other"]
    out["ratio"] = {"output_tok_s": _ratio(g["median_output_tok_s"], o["median_output_tok_s"]),
                    "ttft": _ratio(g["median_ttft_ms"], o["median_ttft_ms"]),
                    "tpot": _ratio(g["median_tpot_ms"], o["median_tpot_ms"])}  # fmt: skip
    return out


def warnings(report: dict, args: argparse.Namespace) -> list[str]:
    """What makes this run's figures weak: too few rounds or requests, failures, ignored settings."""
    out = []
    if args.settle > 0 and cpu_times() is None:
        out.append("--settle needs /proc/stat (Linux): rounds started without waiting for a quiet machine")
    if report["rounds"] < MIN_ROUNDS:
        out.append(f"only {report['rounds']} round(s) per server: medians need >= {MIN_ROUNDS} (--rounds)")
    for res in report["results"]:
        c, n = res["concurrency"], res["requests_per_round"]
        if report["rounds"] * n < args.min_requests:
            out.append(f"concurrency {c}: {report['rounds'] * n} measured requests per server, fewer than "
                       f"--min-requests {args.min_requests} (raise --rounds or --requests-per-round)")  # fmt: skip
        if n < 2 * c:
            out.append(f"concurrency {c}: {n} requests per round never keep {c} in flight for long "
                       "(--requests-per-round >= 2 x concurrency)")  # fmt: skip
        for side in SIDES:
            rs = res[side]["rounds"]
            if noisy := sum(not r.get("quiet", True) for r in rs):
                out.append(f"concurrency {c}: {noisy} {side} round(s) started on a busy machine (not 90% idle "
                           f"within --settle {args.settle} s): something else is using the CPUs")  # fmt: skip
            if res[side]["failed"]:
                out.append(f"concurrency {c}: {res[side]['failed']} {side} request(s) failed, e.g. "
                           f"{next(e for r in rs for e in r['errors'])}")  # fmt: skip
            if any(r["token_counts_from"] != "usage" for r in rs if r["completed"]):
                out.append(f"concurrency {c}: {side} sent no usage (stream_options.include_usage): tokens counted "
                           "from chunks")  # fmt: skip
            expected = args.output_len * sum(r["completed"] for r in rs)
            if sum(r["output_tokens"] for r in rs) != expected:
                out.append(f"concurrency {c}: {side} did not produce {args.output_len} tokens per request "
                           "(ignore_eos not honoured?)")  # fmt: skip
    return out


def print_table(report: dict) -> None:
    print(
        f"glimpse bench compare: {report['model']}  glimpse={report['glimpse_url']}  other={report['other_url']}"
    )
    w = report["workload"]
    print(f"workload: one {w['image'][0]}x{w['image'][1]} image + {w['input_words']} words, {w['output_tokens']} "
          f"output tokens (ignore_eos, streaming); medians over {report['rounds']} round(s) per server; "
          "ratio = glimpse / other")  # fmt: skip
    head = (f"{'conc':>5} {'req/round':>9} | {'tok/s glimpse':>13} {'other':>9} {'ratio':>6} | "
            f"{'TTFT ms glimpse':>15} {'other':>9} {'ratio':>6} | {'TPOT ms glimpse':>15} {'other':>9} {'ratio':>6}")  # fmt: skip
    print(head)
    print("-" * len(head))
    for res in report["results"]:
        g, o, q = res["glimpse"], res["other"], res["ratio"]
        print(f"{res['concurrency']:>5} {res['requests_per_round']:>9} | {_fmt(g['median_output_tok_s'], 13)} "
              f"{_fmt(o['median_output_tok_s'], 9)} {_fmt(q['output_tok_s'], 6)} | {_fmt(g['median_ttft_ms'], 15)} "
              f"{_fmt(o['median_ttft_ms'], 9)} {_fmt(q['ttft'], 6)} | {_fmt(g['median_tpot_ms'], 15)} "
              f"{_fmt(o['median_tpot_ms'], 9)} {_fmt(q['tpot'], 6)}")  # fmt: skip
    if ceiling := report.get("offline_ceiling"):
        print(f"offline ceiling: glimpse LLM.chat on back-to-back batches of `conc` chats of this workload, no server "
              f"(median of {ceiling[0]['batches']} batches)")  # fmt: skip
        head = f"{'conc':>5} | {'offline tok/s':>13} | {'glimpse served / offline':>24} | {'offline / other served':>22}"
        print(head)
        print("-" * len(head))
        for row in ceiling:
            print(f"{row['concurrency']:>5} | {_fmt(row['median_tok_s'], 13)} | {_fmt(row['glimpse_served_share'], 24)} "
                  f"| {_fmt(row['ceiling_over_other'], 22)}")  # fmt: skip
    for warning in report["warnings"]:
        print(f"WARNING: {warning}")


# ---- helpers -----------------------------------------------------------------------------------------


def _median(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return float(np.median(kept)) if kept else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _fmt(value: float | None, width: int) -> str:
    return f"{'n/a':>{width}}" if value is None else f"{value:>{width}.2f}"


def _concurrencies(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(
            f"give comma-separated concurrencies >= 1, e.g. 1,16,64; got {text!r}"
        )
    return values
