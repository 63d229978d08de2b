"""`glimpse bench serve`: load-test any OpenAI-compatible chat endpoint with random images and videos.

Like `vllm bench serve --dataset-name random-mm`: each request carries random text of a random
length and k media items drawn from (H, W, T) buckets (T=1: a JPEG image; T>1: an MP4 of T
frames), all as data URLs made before the clock starts. Requests go out at `--request-rate`
(Poisson, or gamma with `--burstiness`) under `--max-concurrency`, as streaming chat completions;
the run reports TTFT, TPOT, ITL and end-to-end latency (mean, median, percentiles) and
request/token throughput, as a table or one JSON object (`--json`).
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import base64
import io
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from glimpse.bench._offline_worker import WORDS

if TYPE_CHECKING:  # httpx is imported when a run starts, not when the CLI builds its parser
    import httpx

DEFAULT_BUCKETS = "{(256, 256, 1): 0.4, (512, 384, 1): 0.4, (224, 224, 8): 0.2}"


@dataclass
class RequestResult:
    """What one request did, in perf_counter seconds; token counts from the server's usage if sent."""

    ok: bool
    start: float
    end: float = 0.0
    token_times: list[float] = field(default_factory=list)  # arrival of each chunk that carried text
    prompt_tokens: int | None = None
    output_tokens: int | None = None
    error: str = ""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base-url", type=base_url, default="http://127.0.0.1:8000",
                        help="server root, e.g. http://host:8000 (a trailing /v1, as openai clients take, is dropped)")
    parser.add_argument("--endpoint", default="/v1/chat/completions")
    parser.add_argument("--model", default=None, help="model name (default: the first of GET /v1/models)")
    parser.add_argument(
        "--api-key", default=os.environ.get("OPENAI_API_KEY"), help="default: $OPENAI_API_KEY"
    )
    parser.add_argument("--dataset-name", choices=["random-mm"], default="random-mm")
    parser.add_argument("--num-prompts", type=_int_min(1), default=100)
    parser.add_argument("--random-input-len", type=_int_min(1), default=128, help="prompt words (~tokens)")
    parser.add_argument("--random-output-len", type=_int_min(1), default=64, help="max_tokens per request")
    parser.add_argument(
        "--random-range-ratio", type=_ratio, default=0.0, help="lengths vary in [n(1-r), n(1+r)]"
    )
    parser.add_argument("--random-mm-base-items-per-request", type=_int_min(0), default=1)
    parser.add_argument("--random-mm-num-mm-items-range-ratio", type=_ratio, default=0.0)
    parser.add_argument(
        "--random-mm-limit-mm-per-prompt", type=_limits, default={"image": 4, "video": 1},
        help='JSON caps per modality, e.g. \'{"image": 3, "video": 1}\'',
    )  # fmt: skip
    parser.add_argument(
        "--random-mm-bucket-config", type=_buckets, default=_buckets(DEFAULT_BUCKETS),
        help=f"{{(H, W, T): probability}}; T=1 is an image, T>1 a video of T frames (default {DEFAULT_BUCKETS})",
    )  # fmt: skip
    parser.add_argument(
        "--video-fps", type=_positive, default=2.0, help="frame rate written into generated videos"
    )
    parser.add_argument(
        "--request-rate", type=_positive, default=math.inf, help="requests/s (default inf: all at once)"
    )
    parser.add_argument(
        "--burstiness", type=_positive, default=1.0, help="gamma shape of the gaps; 1 is Poisson"
    )
    parser.add_argument("--max-concurrency", type=_int_min(1), default=None)
    parser.add_argument(
        "--warmup-requests", type=_int_min(0), default=1, help="unmeasured requests sent first"
    )
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument(
        "--ignore-eos", action="store_true", help="send vLLM's ignore_eos so outputs run to length"
    )
    parser.add_argument(
        "--metric-percentiles", type=_percentiles, default=[99.0], help="comma-separated, e.g. 90,99"
    )
    parser.add_argument("--timeout", type=_positive, default=600.0, help="seconds per request")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")


def run(args: argparse.Namespace) -> dict | int:
    limits, buckets = args.random_mm_limit_mm_per_prompt, args.random_mm_bucket_config
    if args.random_mm_base_items_per_request > sum(limits.values()):
        print(
            "--random-mm-base-items-per-request is over the sum of --random-mm-limit-mm-per-prompt",
            file=sys.stderr,
        )
        return 2
    rng = np.random.default_rng(args.seed)
    total = args.warmup_requests + args.num_prompts
    payloads, media = [], {"image": 0, "video": 0}
    for i in range(total):
        items = sample_items(rng, buckets, limits, args.random_mm_base_items_per_request,
                             args.random_mm_num_mm_items_range_ratio)  # fmt: skip
        for key in items if i >= args.warmup_requests else ():
            media[_modality(key)] += 1
        payloads.append(_payload(args, rng, items))
    delays = arrival_delays(args.num_prompts, args.request_rate, args.burstiness, rng)
    try:
        results, duration, model = asyncio.run(_drive(args, payloads, delays))
    except EndpointError as exc:
        print(f"glimpse bench serve: {exc}", file=sys.stderr)
        return 1
    summary = summarize(results, duration, args.metric_percentiles)
    summary.update(
        backend="openai-chat", base_url=args.base_url, endpoint=args.endpoint, model=model,
        num_prompts=args.num_prompts, request_rate=args.request_rate, burstiness=args.burstiness,
        max_concurrency=args.max_concurrency, images_sent=media["image"], videos_sent=media["video"],
    )  # fmt: skip
    if args.json:
        print(json.dumps(summary), flush=True)
    else:
        print_table(summary, args.metric_percentiles)
    return summary


# ---- workload ---------------------------------------------------------------------------------------


def sample_items(
    rng: np.random.Generator, buckets: dict, limits: dict[str, int], base: int, ratio: float
) -> list[tuple[int, int, int]]:
    """k ~ U[floor(n(1-r)), ceil(n(1+r))] capped by the limits; each item from the buckets, renormalised
    over the modalities that are still under their cap."""
    k = int(rng.integers(math.floor(base * (1 - ratio)), math.ceil(base * (1 + ratio)) + 1))
    k = min(k, sum(limits.values()))
    keys, probs = list(buckets), np.array(list(buckets.values()), dtype=float)
    used = {"image": 0, "video": 0}
    items = []
    for _ in range(k):
        open_ = np.array([used[_modality(key)] < limits.get(_modality(key), 0) for key in keys])
        weights = probs * open_
        if weights.sum() <= 0:
            break  # every bucket's modality is at its cap
        key = keys[int(rng.choice(len(keys), p=weights / weights.sum()))]
        used[_modality(key)] += 1
        items.append(key)
    return items


def arrival_delays(n: int, rate: float, burstiness: float, rng: np.random.Generator) -> np.ndarray:
    """Send times in seconds from the start: cumulative gamma gaps with mean 1/rate (shape 1: Poisson)."""
    if math.isinf(rate):
        return np.zeros(n)
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=n)
    gaps[0] = 0.0  # the first request goes out at once
    return np.cumsum(gaps)


def _payload(args: argparse.Namespace, rng: np.random.Generator, items: list[tuple[int, int, int]]) -> dict:
    n_in = _vary(rng, args.random_input_len, args.random_range_ratio)
    content = media_parts(rng, items, args.video_fps)
    n_out = _vary(rng, args.random_output_len, args.random_range_ratio)
    return chat_body(content, rng, n_in, n_out, temperature=args.temperature, ignore_eos=args.ignore_eos)


def media_parts(
    rng: np.random.Generator, items: list[tuple[int, int, int]], video_fps: float = 2.0
) -> list[dict]:
    """Chat content parts for media items (H, W, T): a random JPEG when T=1, else an MP4 of T frames."""
    parts = []
    for h, w, t in items:
        if t == 1:
            parts.append({"type": "image_url", "image_url": {"url": _jpeg_data_url(rng, h, w)}})
        else:
            parts.append({"type": "video_url", "video_url": {"url": _mp4_data_url(rng, h, w, t, video_fps)}})
    return parts


def chat_body(media: list[dict], rng: np.random.Generator, input_words: int, max_tokens: int, *,
              temperature: float = 0.0, ignore_eos: bool = False) -> dict:  # fmt: skip
    """A streaming chat request without its model: the media parts, then `input_words` random
    words; usage is asked for, so token counts come from the server."""
    text = {"type": "text", "text": " ".join(rng.choice(WORDS, size=input_words))}
    body = {
        "messages": [{"role": "user", "content": [*media, text]}],
        "max_tokens": max_tokens,
        "temperature": temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if ignore_eos:
        body["ignore_eos"] = True
    return body


def _jpeg_data_url(rng: np.random.Generator, h: int, w: int) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def _mp4_data_url(rng: np.random.Generator, h: int, w: int, t: int, fps: float) -> str:
    import av  # lazily: only runs with video buckets need a video encoder

    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
        stream = container.add_stream(codec, rate=max(1, round(fps)))
        stream.width, stream.height, stream.pix_fmt = (
            w + w % 2,
            h + h % 2,
            "yuv420p",
        )  # yuv420p needs even sides
        for _ in range(t):
            frame = rng.integers(0, 256, (stream.height, stream.width, 3), dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return "data:video/mp4;base64," + base64.b64encode(buf.getvalue()).decode()


# ---- driving the endpoint -----------------------------------------------------------------------------


class EndpointError(Exception):
    """The endpoint cannot be benchmarked (no model, warm-up failed)."""


async def _drive(
    args: argparse.Namespace, payloads: list[dict], delays: np.ndarray
) -> tuple[list[RequestResult], float, str]:
    import httpx

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    # trust_env=False: measure the endpoint itself, never a proxy from the environment.
    limits = httpx.Limits(
        max_connections=args.max_concurrency, max_keepalive_connections=args.max_concurrency
    )
    async with httpx.AsyncClient(
        base_url=args.base_url,
        headers=headers,
        timeout=httpx.Timeout(args.timeout),
        trust_env=False,
        limits=limits,
    ) as client:
        model = args.model or await first_model(client)
        bodies = [json.dumps({"model": model, **p}).encode() for p in payloads]
        for body in bodies[: args.warmup_requests]:
            result = await stream_request(client, args.endpoint, body)
            if not result.ok:
                raise EndpointError(f"warm-up request failed: {result.error}")
        measured = bodies[args.warmup_requests :]
        gate = asyncio.Semaphore(args.max_concurrency or len(measured))
        t0 = time.perf_counter()

        async def timed(body: bytes, at: float) -> RequestResult:
            await asyncio.sleep(max(0.0, t0 + at - time.perf_counter()))
            async with gate:
                return await stream_request(client, args.endpoint, body)

        results = await asyncio.gather(*(timed(b, float(d)) for b, d in zip(measured, delays, strict=True)))
        return list(results), time.perf_counter() - t0, model


async def first_model(client: httpx.AsyncClient) -> str:
    try:
        response = await client.get("/v1/models")
        return response.json()["data"][0]["id"]
    except Exception as exc:  # any failure here means: tell the user to pass --model
        raise EndpointError(f"could not read GET /v1/models ({type(exc).__name__}); pass --model") from None


async def stream_request(client: httpx.AsyncClient, endpoint: str, body: bytes) -> RequestResult:
    """One streaming chat completion; every SSE chunk whose delta carries generated text is one token
    arrival (a role-only or empty chunk is not: TTFT is stamped at the first chunk with content,
    reasoning_content or vLLM's newer `reasoning`)."""
    import httpx

    result = RequestResult(ok=False, start=time.perf_counter())
    try:
        async with client.stream(
            "POST", endpoint, content=body, headers={"Content-Type": "application/json"}
        ) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                result.error = f"HTTP {response.status_code}: {text[:300]}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if chunk.get("error"):
                    result.error = str(chunk["error"])[:300]
                    return result
                now = time.perf_counter()
                if any(_generated(c.get("delta") or {}) for c in chunk.get("choices") or ()):
                    result.token_times.append(now)
                if chunk.get("usage"):
                    result.prompt_tokens = chunk["usage"].get("prompt_tokens")
                    result.output_tokens = chunk["usage"].get("completion_tokens")
    except (httpx.HTTPError, ValueError, AttributeError, TypeError) as exc:  # transport or malformed chunks
        result.error = f"{type(exc).__name__}: {str(exc)[:200]}"
        return result
    result.end = time.perf_counter()
    result.ok = True
    if result.output_tokens is None:
        result.output_tokens = len(result.token_times)
    return result


def _generated(delta: dict) -> bool:
    return bool(delta.get("content") or delta.get("reasoning_content") or delta.get("reasoning"))


# ---- metrics ---------------------------------------------------------------------------------------


def summarize(results: list[RequestResult], duration: float, percentiles: list[float]) -> dict:
    """Per-run metrics with vLLM's definitions, times in ms.

    TTFT: first text chunk - send; TPOT per request: (end - first chunk) / (output_tokens - 1),
    over requests with > 1 token; ITL: every gap between consecutive text chunks, pooled over
    requests; E2EL: end - send. Throughputs divide by the wall time of the measured run.
    """
    done = [r for r in results if r.ok]
    ttft = [(r.token_times[0] - r.start) * 1e3 for r in done if r.token_times]
    tpot = [
        (r.end - r.token_times[0]) * 1e3 / (r.output_tokens - 1)
        for r in done
        if r.token_times and r.output_tokens > 1
    ]
    itl = [gap * 1e3 for r in done for gap in np.diff(r.token_times)]
    e2el = [(r.end - r.start) * 1e3 for r in done]
    total_in = sum(r.prompt_tokens or 0 for r in done)
    total_out = sum(r.output_tokens or 0 for r in done)
    summary = {
        "completed": len(done),
        "failed": len(results) - len(done),
        "duration": duration,
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": len(done) / duration,
        "output_throughput": total_out / duration,
        "total_token_throughput": (total_in + total_out) / duration,
        "token_counts_from": "usage" if done and all(r.prompt_tokens is not None for r in done) else "chunks",
        "errors": [r.error for r in results if not r.ok][:5],
    }
    for name, values in (("ttft", ttft), ("tpot", tpot), ("itl", itl), ("e2el", e2el)):
        arr = np.asarray(values, dtype=float)
        summary[f"mean_{name}_ms"] = float(arr.mean()) if arr.size else None
        summary[f"median_{name}_ms"] = float(np.median(arr)) if arr.size else None
        summary[f"std_{name}_ms"] = float(arr.std()) if arr.size else None
        for p in percentiles:
            summary[f"p{p:g}_{name}_ms"] = float(np.percentile(arr, p)) if arr.size else None
    return summary


def print_table(s: dict, percentiles: list[float]) -> None:
    def row(label: str, value) -> None:
        text = "n/a" if value is None else (f"{value:.2f}" if isinstance(value, float) else str(value))
        print(f"{label:<40}{text:>12}")

    print(f"{' Serving Benchmark Result ':=^52}")
    row("Successful requests:", s["completed"])
    row("Failed requests:", s["failed"])
    row("Benchmark duration (s):", s["duration"])
    row("Total input tokens:", s["total_input_tokens"])
    row("Total generated tokens:", s["total_output_tokens"])
    row("Images / videos sent:", f"{s['images_sent']} / {s['videos_sent']}")
    row("Request throughput (req/s):", s["request_throughput"])
    row("Output token throughput (tok/s):", s["output_throughput"])
    row("Total token throughput (tok/s):", s["total_token_throughput"])
    titles = {"ttft": "Time to First Token", "tpot": "Time per Output Token (excl. 1st token)",
              "itl": "Inter-token Latency", "e2el": "End-to-end Latency"}  # fmt: skip
    for name, title in titles.items():
        print(f"{' ' + title + ' ':-^52}")
        row(f"Mean {name.upper()} (ms):", s[f"mean_{name}_ms"])
        row(f"Median {name.upper()} (ms):", s[f"median_{name}_ms"])
        for p in percentiles:
            row(f"P{p:g} {name.upper()} (ms):", s[f"p{p:g}_{name}_ms"])
    print("=" * 52)
    for error in s["errors"]:
        print(f"error: {error}")


# ---- argument parsing -----------------------------------------------------------------------------


def base_url(text: str) -> str:
    """The server root: `http://host:8000/v1/` -> `http://host:8000`. The openai client's base URL ends
    in /v1, and --endpoint and GET /v1/models already carry it (kept, it would double: /v1/v1/...)."""
    root = text.strip().rstrip("/")
    if root.endswith("/v1"):
        root = root[: -len("/v1")].rstrip("/")
    if not root.startswith(("http://", "https://")):
        raise argparse.ArgumentTypeError(f"expected an http(s):// URL such as http://127.0.0.1:8000, got {text!r}")
    return root


def _modality(key: tuple[int, int, int]) -> str:
    return "image" if key[2] == 1 else "video"


def _vary(rng: np.random.Generator, n: int, ratio: float) -> int:
    return max(1, int(rng.integers(math.floor(n * (1 - ratio)), math.ceil(n * (1 + ratio)) + 1)))


def _int_min(minimum: int):
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _non_negative(text: str) -> float:
    value = float(text)
    if not 0 <= value < math.inf:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def _ratio(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1], got {value}")
    return value


def _percentiles(text: str) -> list[float]:
    values = [float(p) for p in text.split(",") if p.strip()]
    if not values or any(not 0 < p <= 100 for p in values):
        raise argparse.ArgumentTypeError("give comma-separated percentiles in (0, 100], e.g. 90,99")
    return values


def _limits(text: str) -> dict[str, int]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        raise argparse.ArgumentTypeError('give JSON such as {"image": 3, "video": 1}') from None
    if (
        not isinstance(value, dict)
        or set(value) - {"image", "video"}
        or any(not isinstance(v, int) or v < 0 for v in value.values())
    ):
        raise argparse.ArgumentTypeError('keys "image" and "video" with integer caps >= 0')
    return {"image": value.get("image", 0), "video": value.get("video", 0)}


def _buckets(text: str) -> dict[tuple[int, int, int], float]:
    try:
        value = ast.literal_eval(text)  # literals only: no code runs
    except (ValueError, SyntaxError):
        raise argparse.ArgumentTypeError(
            "give a dict such as {(256, 256, 1): 0.5, (224, 224, 8): 0.5}"
        ) from None
    ok = isinstance(value, dict) and all(
        isinstance(k, tuple) and len(k) == 3 and all(isinstance(x, int) and x > 0 for x in k)
        and isinstance(p, int | float) and p >= 0 for k, p in value.items()
    )  # fmt: skip
    if not ok or sum(value.values()) <= 0:
        raise argparse.ArgumentTypeError(
            "keys are (H, W, T) positive ints, values probabilities >= 0, not all 0"
        )
    return {k: float(p) for k, p in value.items() if p > 0}
