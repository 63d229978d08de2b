"""`glimpse bench serve` against a fake OpenAI-compatible SSE server (not glimpse) on loopback.

The metric maths is checked against a brute-force recomputation from hand-set timings; the
driver is checked by what the fake server received (media decoded back to the bucket sizes and
frame counts, concurrency cap, auth) and by the totals the server itself reported.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import av
import numpy as np
import pytest
from PIL import Image

from glimpse.bench import serve
from glimpse.bench.serve import RequestResult, arrival_delays, sample_items, summarize

FIRST_TOKEN_DELAY = 0.02  # the fake server waits this long before the first token ...
TOKEN_GAP = 0.005  # ... and this long between tokens


class _FakeOpenAI(BaseHTTPRequestHandler):
    """POST /v1/chat/completions streams `max_tokens` one-word chunks, then a usage chunk and [DONE];
    GET /v1/models lists one model. Any other path is a 404, remembered in `server.bad_paths`."""

    def log_message(self, *args):
        pass

    def _unknown_path(self, expected: str) -> bool:
        if self.path == expected:
            return False
        self.server.bad_paths.append(self.path)
        self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()
        return True

    def do_GET(self):  # noqa: N802
        if self._unknown_path("/v1/models"):
            return
        body = json.dumps({"object": "list", "data": [{"id": "fake-vlm", "object": "model"}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):  # noqa: N802
        srv = self.server
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self._unknown_path("/v1/chat/completions"):
            return
        if srv.fail_status:
            body = json.dumps({"error": {"message": "overloaded"}}).encode()
            self.send_response(srv.fail_status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        with srv.lock:
            srv.requests.append((self.headers.get("Authorization"), request))
            srv.in_flight += 1
            srv.peak = max(srv.peak, srv.in_flight)
        try:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            text = next(p["text"] for p in request["messages"][0]["content"] if p["type"] == "text")
            n = request["max_tokens"]
            self._event({"choices": [{"index": 0, "delta": {"role": "assistant"}}]})
            time.sleep(FIRST_TOKEN_DELAY)
            for i in range(n):
                if i:
                    time.sleep(TOKEN_GAP)
                self._event({"choices": [{"index": 0, "delta": {"content": f" w{i}"}}]})
            self._event({"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]})
            usage = {
                "prompt_tokens": len(text.split()),
                "completion_tokens": n,
                "total_tokens": len(text.split()) + n,
            }
            self._event({"choices": [], "usage": usage})
            self.wfile.write(b"data: [DONE]\n\n")
        finally:
            with srv.lock:
                srv.in_flight -= 1

    def _event(self, obj: dict) -> None:
        self.wfile.write(
            b"data: " + json.dumps({"object": "chat.completion.chunk", **obj}).encode() + b"\n\n"
        )
        self.wfile.flush()


@pytest.fixture
def fake_server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _FakeOpenAI)
    httpd.daemon_threads = True
    httpd.requests, httpd.lock, httpd.in_flight, httpd.peak, httpd.fail_status = [], threading.Lock(), 0, 0, 0
    httpd.bad_paths = []
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()
    thread.join(5)


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    return parser.parse_args(list(argv))


def _decode_media(part: dict) -> tuple[str, tuple[int, int, int]]:
    """A content part -> (kind, (H, W, frames)) read back from its data URL."""
    kind = part["type"]
    url = part[kind]["url"]
    header, data = url.split(",", 1)
    raw = base64.b64decode(data)
    if kind == "image_url":
        assert header == "data:image/jpeg;base64"
        image = Image.open(io.BytesIO(raw))
        return kind, (image.height, image.width, 1)
    assert header == "data:video/mp4;base64"
    with av.open(io.BytesIO(raw)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    return kind, (frames[0].shape[0], frames[0].shape[1], len(frames))


def test_drives_an_openai_compatible_server(fake_server, capsys):
    port = fake_server.server_address[1]
    buckets = "{(48, 64, 1): 0.5, (32, 32, 1): 0.3, (40, 56, 3): 0.2}"
    args = _args(
        "--base-url", f"http://127.0.0.1:{port}", "--api-key", "sk-test", "--num-prompts", "10",
        "--max-concurrency", "3", "--random-input-len", "20", "--random-output-len", "6",
        "--random-range-ratio", "0.5", "--random-mm-base-items-per-request", "2",
        "--random-mm-limit-mm-per-prompt", '{"image": 2, "video": 1}', "--random-mm-bucket-config", buckets,
        "--metric-percentiles", "50,99", "--json", "--seed", "3",
    )  # fmt: skip
    start = time.monotonic()
    summary = serve.run(args)
    assert time.monotonic() - start < 20
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed == summary

    # What the server saw: 1 warm-up + 10 measured requests, each well-formed and authorised.
    requests = fake_server.requests
    assert fake_server.bad_paths == []
    assert len(requests) == 11 and fake_server.peak <= 3
    allowed = {(48, 64, 1), (32, 32, 1), (40, 56, 3)}
    kinds = []
    for auth, body in requests:
        assert auth == "Bearer sk-test" and body["model"] == "fake-vlm"  # the model came from GET /v1/models
        assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
        assert 3 <= body["max_tokens"] <= 9
        parts = body["messages"][0]["content"]
        assert 10 <= len(parts[-1]["text"].split()) <= 30
        media = [_decode_media(p) for p in parts[:-1]]
        assert len(media) == 2
        assert all(shape in allowed for _, shape in media)
        assert sum(k == "image_url" for k, _ in media) <= 2 and sum(k == "video_url" for k, _ in media) <= 1
        kinds.append([k for k, _ in media])

    # Totals are the server's own usage numbers for the 10 measured requests.
    measured = [body for _, body in requests[1:]]
    assert summary["completed"] == 10 and summary["failed"] == 0 and summary["errors"] == []
    assert summary["token_counts_from"] == "usage"
    assert summary["total_output_tokens"] == sum(b["max_tokens"] for b in measured)
    assert summary["total_input_tokens"] == sum(
        len(b["messages"][0]["content"][-1]["text"].split()) for b in measured
    )
    assert summary["images_sent"] == sum(k.count("image_url") for k in kinds[1:])
    assert summary["videos_sent"] == sum(k.count("video_url") for k in kinds[1:])
    assert summary["request_throughput"] == pytest.approx(10 / summary["duration"])
    assert summary["output_throughput"] == pytest.approx(summary["total_output_tokens"] / summary["duration"])

    # Timings: the server's sleeps are lower bounds for TTFT and end-to-end latency. (ITL and TPOT
    # have none: a client starved of CPU can read several chunks at once; their maths is checked
    # against a brute-force recomputation below.) Upper bounds depend on the machine's load.
    shortest = FIRST_TOKEN_DELAY + (min(b["max_tokens"] for b in measured) - 1) * TOKEN_GAP
    assert summary["median_ttft_ms"] >= FIRST_TOKEN_DELAY * 1e3
    assert summary["median_e2el_ms"] >= shortest * 1e3 and summary["mean_e2el_ms"] >= summary["mean_ttft_ms"]
    for name in ("ttft", "tpot", "itl", "e2el"):
        for stat in ("mean", "median", "p50", "p99"):
            assert isinstance(summary[f"{stat}_{name}_ms"], float)


def test_table_output_and_cli_registration(fake_server, capsys):
    from glimpse.cli import build_parser

    port = fake_server.server_address[1]
    args = build_parser().parse_args(
        ["bench", "serve", "--base-url", f"http://127.0.0.1:{port}", "--model", "m", "--num-prompts", "2",
         "--random-output-len", "3", "--random-mm-bucket-config", "{(32, 32, 1): 1.0}", "--warmup-requests", "0"]
    )  # fmt: skip
    assert args.func is serve.run
    args.func(args)
    out = capsys.readouterr().out
    for label in ("Successful requests:", "Mean TTFT (ms):", "Median TPOT (ms):", "P99 ITL (ms):",
                  "Request throughput (req/s):", "Output token throughput (tok/s):"):  # fmt: skip
        assert label in out
    assert [b["model"] for _, b in fake_server.requests] == ["m", "m"]


def test_failed_requests_are_counted_not_timed(fake_server, capsys):
    fake_server.fail_status = 503
    base = ["--base-url", f"http://127.0.0.1:{fake_server.server_address[1]}", "--model", "m", "--json",
            "--num-prompts", "2", "--random-mm-base-items-per-request", "0"]  # fmt: skip
    summary = serve.run(_args(*base, "--warmup-requests", "0"))
    assert summary["completed"] == 0 and summary["failed"] == 2
    assert summary["errors"] == ['HTTP 503: {"error": {"message": "overloaded"}}'] * 2
    assert summary["mean_ttft_ms"] is None and summary["total_output_tokens"] == 0
    assert serve.run(_args(*base)) == 1  # a failed warm-up stops the run before measuring
    assert "warm-up request failed: HTTP 503" in capsys.readouterr().err


@pytest.mark.parametrize("suffix", ["", "/", "/v1", "/v1/"])
def test_base_url_as_the_openai_client_takes_it(fake_server, capsys, suffix):
    # The openai client's base_url ends in /v1; the bench's endpoint and GET /v1/models carry it already.
    root = f"http://127.0.0.1:{fake_server.server_address[1]}"
    summary = serve.run(_args("--base-url", root + suffix, "--num-prompts", "2", "--warmup-requests", "0", "--json",
                              "--random-output-len", "2", "--random-mm-base-items-per-request", "0"))  # fmt: skip
    assert fake_server.bad_paths == []  # a doubled /v1/v1/... would be a 404 here
    assert summary["completed"] == 2 and summary["failed"] == 0
    assert summary["model"] == "fake-vlm" and summary["base_url"] == root  # the model came from GET /v1/models
    assert len(fake_server.requests) == 2


@pytest.mark.parametrize(
    "given, root",
    [("http://h:8000", "http://h:8000"), ("http://h:8000/v1", "http://h:8000"), ("https://h/v1/", "https://h"),
     ("http://h:8000/proxy/v1", "http://h:8000/proxy"), ("http://h:8000/v1beta", "http://h:8000/v1beta")],
)  # fmt: skip
def test_base_url_drops_only_a_trailing_v1(given, root):
    assert _args("--base-url", given).base_url == root


def _brute_percentile(values: list[float], p: float) -> float:
    """Linear interpolation between closest ranks, written out (numpy's default method)."""
    xs = sorted(values)
    pos = (len(xs) - 1) * p / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def test_summary_matches_brute_force():
    # start, token arrival times, end, output tokens; seconds
    spec = [
        (0.00, [0.10, 0.15, 0.21, 0.30], 0.31, 4),
        (0.05, [0.40], 0.41, 1),  # one token: in TTFT and E2EL, not in TPOT, no ITL
        (0.10, [0.20, 0.22, 0.27], 0.30, 6),  # usage reports more tokens than chunks (multi-token chunks)
        (0.20, [0.90, 1.00, 1.40, 1.45, 1.47], 1.50, 5),
        (0.30, [], 0.35, 0),  # finished with no text
    ]
    results = [
        RequestResult(ok=True, start=s, end=e, token_times=t, prompt_tokens=10 + i, output_tokens=n)
        for i, (s, t, e, n) in enumerate(spec)
    ]
    results.append(RequestResult(ok=False, start=0.0, error="HTTP 500: boom"))
    got = summarize(results, duration=2.0, percentiles=[50.0, 90.0, 99.0])

    ttft = [(t[0] - s) * 1000 for s, t, e, n in spec if t]
    tpot = [(e - t[0]) * 1000 / (n - 1) for s, t, e, n in spec if t and n > 1]
    itl = [(b - a) * 1000 for s, t, e, n in spec for a, b in zip(t, t[1:], strict=False)]
    e2el = [(e - s) * 1000 for s, t, e, n in spec]
    assert ttft == pytest.approx([100, 350, 100, 700]) and len(itl) == 3 + 2 + 4
    for name, values in (("ttft", ttft), ("tpot", tpot), ("itl", itl), ("e2el", e2el)):
        assert got[f"mean_{name}_ms"] == pytest.approx(sum(values) / len(values))
        assert got[f"median_{name}_ms"] == pytest.approx(_brute_percentile(values, 50))
        for p in (50, 90, 99):
            assert got[f"p{p}_{name}_ms"] == pytest.approx(_brute_percentile(values, p))
    assert got["completed"] == 5 and got["failed"] == 1 and got["errors"] == ["HTTP 500: boom"]
    assert got["total_input_tokens"] == 10 + 11 + 12 + 13 + 14 and got["total_output_tokens"] == 16
    assert got["request_throughput"] == 2.5 and got["output_throughput"] == 8.0
    assert got["total_token_throughput"] == pytest.approx((60 + 16) / 2.0)


def test_arrival_schedule_is_poisson_at_the_rate():
    rng = np.random.default_rng(0)
    assert (arrival_delays(5, math.inf, 1.0, rng) == 0).all()
    times = arrival_delays(20001, 50.0, 1.0, rng)
    gaps = np.diff(times)
    # Exponential gaps with rate 50: mean 1/50 and standard deviation 1/50 (within 3% for 20000 draws).
    assert gaps.mean() == pytest.approx(0.02, rel=0.03) and gaps.std() == pytest.approx(0.02, rel=0.03)
    bursty = np.diff(arrival_delays(20001, 50.0, 0.25, rng))  # gamma shape 0.25: same mean, std 2x
    assert bursty.mean() == pytest.approx(0.02, rel=0.05) and bursty.std() == pytest.approx(0.04, rel=0.1)


def test_item_sampling_respects_caps_and_bucket_weights():
    rng = np.random.default_rng(1)
    buckets = {(8, 8, 1): 0.75, (16, 16, 1): 0.25, (8, 8, 4): 0.0001}
    drawn = [sample_items(rng, buckets, {"image": 2, "video": 0}, 3, 0.0) for _ in range(4000)]
    assert all(len(items) == 2 for items in drawn)  # k=3 capped by the sum of the caps
    assert all(key[2] == 1 for items in drawn for key in items)  # video capped at 0
    share = np.mean([key == (8, 8, 1) for items in drawn for key in items])
    assert share == pytest.approx(0.75, abs=0.03)
    counts = [len(sample_items(rng, {(8, 8, 1): 1.0}, {"image": 9, "video": 0}, 4, 0.5)) for _ in range(2000)]
    assert set(counts) == {2, 3, 4, 5, 6}  # U[floor(4*0.5), ceil(4*1.5)]


@pytest.mark.parametrize(
    "flag, value",
    [("--random-mm-bucket-config", "{(0, 8, 1): 1.0}"), ("--random-mm-bucket-config", "__import__('os')"),
     ("--random-mm-limit-mm-per-prompt", '{"audio": 1}'), ("--metric-percentiles", "0"),
     ("--random-range-ratio", "1.5"), ("--request-rate", "0"), ("--burstiness", "nan"),
     ("--base-url", "127.0.0.1:8000")],
)  # fmt: skip
def test_bad_arguments_are_refused(flag, value):
    with pytest.raises(SystemExit):
        _args(flag, value)
