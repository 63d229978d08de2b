"""`glimpse bench compare`: the side-by-side harness against fake SSE servers and two real `glimpse serve`s.

References: hand-set server timings (a role-only chunk at once, the first content 0.3 s later),
what the fake servers received (fresh images, the alternation of rounds), and the real servers'
own /metrics counters (requests, tokens, encoder-cache hits) and histograms.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from test_server import ServerProcess

from glimpse.bench import compare, serve
from glimpse.cli import build_parser


class _Fake(BaseHTTPRequestHandler):
    """GET /v1/models names `server.model`; POST streams a role-only chunk at once, the first content
    chunk after `server.first` s, one more per `server.gap` s up to max_tokens, then usage and [DONE]."""

    def log_message(self, *args):
        pass

    def do_GET(self):  # noqa: N802
        self._json({"object": "list", "data": [{"id": self.server.model, "object": "model"}]})

    def _json(self, obj: dict) -> None:
        body = json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):  # noqa: N802
        srv = self.server
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with srv.lock:
            srv.requests.append((time.monotonic(), request))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        self._event({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
        time.sleep(srv.first)
        n = request["max_tokens"]
        for i in range(n):
            if i:
                time.sleep(srv.gap)
            self._event({"choices": [{"index": 0, "delta": {srv.field: f" w{i}"}}]})
        self._event({"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]})
        self._event(
            {"choices": [], "usage": {"prompt_tokens": 80, "completion_tokens": n, "total_tokens": 80 + n}}
        )
        self.wfile.write(b"data: [DONE]\n\n")

    def _event(self, obj: dict) -> None:
        self.wfile.write(b"data: " + json.dumps(obj).encode() + b"\n\n")
        self.wfile.flush()


def _fake(model: str, first: float, gap: float, field: str = "content"):
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Fake)
    httpd.daemon_threads = True
    httpd.model, httpd.first, httpd.gap, httpd.field = model, first, gap, field
    httpd.requests, httpd.lock = [], threading.Lock()
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return httpd


@pytest.fixture
def fakes():
    servers = []

    def make(*args, **kwargs):
        servers.append(_fake(*args, **kwargs))
        return servers[-1]

    yield make
    for httpd in servers:
        httpd.shutdown()
        httpd.server_close()


def _url(httpd) -> str:
    return f"http://127.0.0.1:{httpd.server_address[1]}"


def _args(*argv: str):
    return build_parser().parse_args(["bench", "compare", *argv])


@pytest.mark.parametrize("field", ["content", "reasoning_content", "reasoning"])
def test_ttft_is_stamped_at_the_first_generated_chunk(fakes, field):
    httpd = fakes("m", first=0.3, gap=0.1, field=field)
    body = json.dumps({"model": "m", "messages": [], "max_tokens": 3}).encode()

    async def one():
        async with httpx.AsyncClient(base_url=_url(httpd), trust_env=False) as client:
            return await serve.stream_request(client, "/v1/chat/completions", body)

    result = asyncio.run(one())
    stats = compare.round_stats([result], 1.0)
    # The role-only chunk arrives at once; the first generated text 0.3 s later, then two more 0.1 s apart.
    assert result.ok and len(result.token_times) == 3 and stats["token_counts_from"] == "usage"
    assert stats["mean_ttft_ms"] >= 300
    # TPOT = (latency - TTFT) / (usage completion_tokens - 1), about (2 x 0.1 s) / 2. Only about: on a
    # loaded machine the client may read the first chunk late, which shortens the measured span (a CI
    # run read 99.3 ms), so the bound is half the server's gap.
    assert stats["mean_tpot_ms"] == pytest.approx((result.end - result.token_times[0]) * 1e3 / 2)
    assert stats["mean_tpot_ms"] >= 50 and stats["output_tokens"] == 3


def test_rounds_alternate_with_fresh_images_and_ratios(fakes, tmp_path, capsys):
    slow, fast = fakes("same-model", first=0.3, gap=0.01), fakes("same-model", first=0.1, gap=0.01)
    out = tmp_path / "compare.json"
    args = _args("--url", _url(slow), "--other-url", _url(fast), "--concurrency", "1,2", "--rounds", "3",
                 "--requests-per-round", "2", "--output-len", "4", "--input-len", "8", "--warmup-requests", "1",
                 "--settle", "0", "--json", str(out))  # fmt: skip
    report = compare.run(args)
    assert json.loads(out.read_text()) == report
    assert [r["concurrency"] for r in report["results"]] == [1, 2] and report["model"] == "same-model"

    # Each server: 1 warm-up + 2 concurrencies x 3 rounds x 2 requests, 4 tokens each, every image new.
    for httpd in (slow, fast):
        bodies = [b for _, b in httpd.requests]
        assert len(bodies) == 1 + 2 * 3 * 2
        assert all(b["max_tokens"] == 4 and b["ignore_eos"] is True and b["stream"] is True for b in bodies)
        assert all(
            b["stream_options"] == {"include_usage": True} and b["model"] == "same-model" for b in bodies
        )
    images = [p["image_url"]["url"] for h in (slow, fast) for _, b in h.requests
              for p in b["messages"][0]["content"] if p["type"] == "image_url"]  # fmt: skip
    assert len(images) == 26 and len(set(images)) == 26

    # Rounds alternate: at each concurrency glimpse goes first in rounds 0 and 2, the other in round 1.
    arrivals = sorted(
        [(t, "glimpse") for t, _ in slow.requests[1:]] + [(t, "other") for t, _ in fast.requests[1:]]
    )
    order = [side for _, side in arrivals][::2]  # two requests per round
    assert order == ["glimpse", "other", "other", "glimpse", "glimpse", "other"] * 2

    for res in report["results"]:
        g, o = res["glimpse"], res["other"]
        assert len(g["rounds"]) == len(o["rounds"]) == 3 and g["completed"] == o["completed"] == 6
        assert g["median_ttft_ms"] >= 300 and o["median_ttft_ms"] >= 100  # the servers' sleeps: lower bounds
        assert res["ratio"]["ttft"] == pytest.approx(g["median_ttft_ms"] / o["median_ttft_ms"])
        assert res["ratio"]["output_tok_s"] == pytest.approx(
            g["median_output_tok_s"] / o["median_output_tok_s"]
        )
        assert res["ratio"]["tpot"] == pytest.approx(g["median_tpot_ms"] / o["median_tpot_ms"])
        for r in g["rounds"] + o["rounds"]:
            assert r["output_tokens"] == 8 and r["output_tok_s"] == pytest.approx(8 / r["duration_s"])
            assert r["settle_s"] == 0 and r["quiet"] is True  # --settle 0: no wait
    # 3 rounds of 2: too few requests for --min-requests 16, and never 2 x concurrency 2 in flight.
    assert not any("round(s) per server" in w for w in report["warnings"])
    assert any("6 measured requests" in w for w in report["warnings"])
    table = capsys.readouterr().out
    assert "TTFT ms glimpse" in table and "WARNING: concurrency 1: 6 measured requests" in table


def test_model_names_must_match_and_the_vllm_command(fakes, capsys):
    a, b = fakes("model-a", first=0.0, gap=0.0), fakes("model-b", first=0.0, gap=0.0)
    assert compare.run(_args("--url", _url(a), "--other-url", _url(b), "--checkpoint", "/ckpt")) == 1
    err = capsys.readouterr().err
    assert "glimpse serves 'model-a' but the other server serves 'model-b'" in err
    expected = ("VLLM_CPU_KVCACHE_SPACE=2 VLLM_CPU_OMP_THREADS_BIND=0-1 VENV/bin/python -m "
                "vllm.entrypoints.openai.api_server --model /ckpt --dtype bfloat16 --max-model-len 4096 "
                "--max-num-seqs 64 --port " + str(b.server_address[1]) +
                " --limit-mm-per-prompt '{\"image\": 1, \"video\": 0}' --load-format dummy")  # fmt: skip
    assert expected in err  # /ckpt holds no safetensors: vLLM must make dummy weights too
    assert compare.run(_args("--other-url", _url(b))) == 2  # neither --url nor --checkpoint
    with pytest.raises(SystemExit):
        _args("--other-url", _url(b), "--concurrency", "0,4")


# TTFT/TPOT/e2e buckets as vLLM (v1) exports them; TPOT adds 1-5 ms below vLLM's first bucket.
VLLM_TTFT = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
             40.0, 80.0, 160.0, 640.0, 2560.0]  # fmt: skip
VLLM_TPOT = [
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
]
VLLM_E2E = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0,
            960.0, 1920.0, 7680.0]  # fmt: skip


def test_two_real_glimpse_servers(tiny_checkpoint, tmp_path, capsys):
    ckpt = tiny_checkpoint("qwen2_5_vl")
    other = ServerProcess(ckpt, "--kv-cache-memory", "64MiB", "--max-model-len", "4096", "--dtype", "float32")
    try:
        out = tmp_path / "c.json"
        args = _args("--checkpoint", str(ckpt), "--other-url", other.base, "--dtype", "float32",
                     "--glimpse-args", "--kv-cache-memory 64MiB --encoder-graph off", "--concurrency", "1,2",
                     "--rounds", "1", "--requests-per-round", "2", "--output-len", "4", "--input-len", "16",
                     "--warmup-requests", "0", "--json", str(out))  # fmt: skip
        report = compare.run(args)
        assert isinstance(report, dict), capsys.readouterr().err
        assert json.loads(out.read_text()) == report
        assert set(report) == {"model", "seed", "glimpse_url", "other_url", "rounds", "workload", "results", "warnings",
                               "vllm_command"}  # fmt: skip
        assert (
            report["model"] == "tiny-glm"
        )  # ServerProcess's name, adopted by the glimpse the harness started
        for res in report["results"]:
            assert set(res) == {"concurrency", "requests_per_round", "glimpse", "other", "ratio"}
            assert set(res["ratio"]) == {"output_tok_s", "ttft", "tpot"}
            for side in ("glimpse", "other"):
                s = res[side]
                assert s["completed"] == 2 and s["failed"] == 0
                assert {"median_output_tok_s", "median_ttft_ms", "median_tpot_ms", "rounds"} <= set(s)
                assert all(
                    v > 0 for v in (s["median_output_tok_s"], s["median_ttft_ms"], s["median_tpot_ms"])
                )
                assert s["rounds"][0]["output_tokens"] == 8 and s["rounds"][0]["token_counts_from"] == "usage"
        assert any("only 1 round(s)" in w for w in report["warnings"])
        table = capsys.readouterr().out
        assert "tok/s glimpse" in table and "WARNING: only 1 round(s)" in table
        with pytest.raises(httpx.HTTPError):  # the harness stopped the server it started
            httpx.get(report["glimpse_url"] + "/health", timeout=2)

        # The other server's own books: 4 requests of 4 tokens, no encoder-cache hit (fresh images),
        # and TTFT/TPOT/e2e histograms with one observation per request, on vLLM's buckets.
        m = other.wait_idle()
        assert m["glimpse_generation_tokens_total"] == 16 and m["glimpse_encoder_cache_hits_total"] == 0
        assert m["glimpse_encoder_cache_lookups_total"] == 4
        for name, buckets in (("time_to_first_token_seconds", VLLM_TTFT), ("e2e_request_latency_seconds", VLLM_E2E),
                              ("time_per_output_token_seconds", [0.001, 0.0025, 0.005, *VLLM_TPOT])):  # fmt: skip
            assert m[f"glimpse_{name}_count"] == 4
            assert m[f'glimpse_{name}_bucket{{le="+Inf"}}'] == 4
            les = sorted(
                float(k.split('"')[1])
                for k in m
                if k.startswith(f"glimpse_{name}_bucket{{") and "+Inf" not in k
            )
            assert les == buckets
        # The server stamps from receipt, the client from sending: its TTFT and e2e sums are not larger.
        client_ttft = sum(
            r["mean_ttft_ms"] * r["completed"] for res in report["results"] for r in res["other"]["rounds"]
        )
        assert 0 < m["glimpse_time_to_first_token_seconds_sum"] <= client_ttft / 1e3
    finally:
        other.stop()


def _scripted_cpu(monkeypatch, *cpus: list[float]) -> None:
    """compare.cpu_times reads a machine of len(cpus) CPUs, CPU i idle for the shares cpus[i] of each
    window in turn (its last share repeats): 100 jiffies per window."""
    state = {"t": 0, "idle": [0] * len(cpus)}

    def cpu_times():
        now = {i: (state["idle"][i], 100 * state["t"]) for i in range(len(cpus))}
        for i, shares in enumerate(cpus):
            state["idle"][i] += round(100 * shares[min(state["t"], len(shares) - 1)])
        state["t"] += 1
        return now

    monkeypatch.setattr(compare, "cpu_times", cpu_times)


def test_settle_waits_for_a_quiet_machine(monkeypatch):
    """One core of two spinning for two windows (the machine as a whole half idle), then both quiet:
    three windows waited, quiet. A single busy core of many is not quiet either."""
    _scripted_cpu(monkeypatch, [1.0], [0.0, 0.0, 1.0])
    waited, quiet = asyncio.run(compare.settle(10.0))
    assert quiet and 3 * compare.QUIET_WINDOW <= waited < 10.0
    _scripted_cpu(monkeypatch, *([[1.0]] * 15), [0.0])  # 15 idle CPUs, one spinning: 94% idle in all
    waited, quiet = asyncio.run(compare.settle(0.5))  # gives up once --settle has passed
    assert not quiet and 0.5 <= waited < 0.5 + 3 * compare.QUIET_WINDOW
    assert asyncio.run(compare.settle(0)) == (0.0, True)
    monkeypatch.undo()
    real = compare.cpu_times()  # the real reader, where /proc/stat exists: this process's CPUs
    assert real is None or set(real) == set(os.sched_getaffinity(0))


def test_rounds_started_on_a_busy_machine_are_named(fakes, monkeypatch):
    a, b = fakes("m", first=0.01, gap=0.001), fakes("m", first=0.01, gap=0.001)
    _scripted_cpu(monkeypatch, [1.0], [0.0])
    report = compare.run(_args("--url", _url(a), "--other-url", _url(b), "--concurrency", "1", "--rounds", "3",
                               "--output-len", "2", "--warmup-requests", "0", "--settle", "0.2"))  # fmt: skip
    assert all(not r["quiet"] and r["settle_s"] >= 0.2 for side in ("glimpse", "other")
               for r in report["results"][0][side]["rounds"])  # fmt: skip
    assert any("3 glimpse round(s) started on a busy machine" in w and "--settle 0.2" in w for w in report["warnings"])


def test_offline_ceiling_runs_glimpse_without_a_server(fakes, tiny_checkpoint, capsys):
    """--offline-ceiling: per concurrency, glimpse's offline LLM.chat on back-to-back batches of that many chats
    of the workload (a real worker process on the tiny checkpoint); the report holds each batch's rate, their
    median, the share of it glimpse served and its ratio to the other server's served rate."""
    glimpse_side, other = fakes("same-model", first=0.0, gap=0.01), fakes("same-model", first=0.0, gap=0.02)
    args = _args("--url", _url(glimpse_side), "--other-url", _url(other), "--checkpoint", str(tiny_checkpoint("glm4v")),
                 "--concurrency", "1,2", "--rounds", "1", "--requests-per-round", "2", "--output-len", "4",
                 "--input-len", "8", "--warmup-requests", "0", "--settle", "0", "--offline-ceiling",
                 "--ceiling-batches", "2", "--threads", "1")  # fmt: skip
    report = compare.run(args)
    ceiling = report["offline_ceiling"]
    assert [row["concurrency"] for row in ceiling] == [1, 2]
    for row, res in zip(ceiling, report["results"], strict=True):
        assert row["batches"] == 2 and len(row["batch_tok_s"]) == 2 and all(r > 0 for r in row["batch_tok_s"])
        assert row["median_tok_s"] == pytest.approx(sum(row["batch_tok_s"]) / 2)
        assert row["glimpse_served_share"] == pytest.approx(res["glimpse"]["median_output_tok_s"] / row["median_tok_s"])
        assert row["ceiling_over_other"] == pytest.approx(row["median_tok_s"] / res["other"]["median_output_tok_s"])
    table = capsys.readouterr().out
    assert "offline ceiling: glimpse LLM.chat on back-to-back batches" in table and "offline / other served" in table


def test_offline_ceiling_needs_the_checkpoint(fakes, capsys):
    a = fakes("m", first=0.0, gap=0.0)
    args = _args("--url", _url(a), "--other-url", _url(a), "--offline-ceiling", "--settle", "0")
    assert compare.run(args) == 2
    assert "--offline-ceiling loads the model itself: give --checkpoint" in capsys.readouterr().err
    assert not a.requests  # refused before any request
