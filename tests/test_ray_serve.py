"""`glimpse serve-ray` end to end: a real local Ray cluster with 2 engine replicas behind glimpse's own ingress.

One `glimpse serve-ray` process on 127.0.0.1 (it starts Ray itself and stops it on SIGTERM), the tiny checkpoint,
the real `openai` client and raw HTTP. References: the routing rule stated in docs/scaling.md (same media, same
replica; new media to the least-loaded), the engine's own encoder-cache counters per replica (a repeat of an image
is a hit exactly where the image was encoded), the OpenAI error shape and the SSE protocol ([DONE] ends a stream).
Tests run in file order; the last two kill a replica and stop the server.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from PIL import Image
from test_cli_usage import error_line
from test_server import free_port

from glimpse import cli

REPO = Path(__file__).resolve().parents[1]
KEY = "ray-key-1"
MODEL = "tiny-glm"


def image_url(i: int) -> str:
    """A 56x56 PNG whose pixels differ from every other index's (so its content hash does)."""
    im = Image.new("RGB", (56, 56), ((i * 37) % 256, (i * 91) % 256, (i * 13) % 256))
    im.putpixel((i % 56, i // 56), (255, 255, 255))
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def chat(text: str, *images: int) -> list[dict]:
    """One user message: the text first, so that a repeat's image is not covered by the prefix cache (its
    encoder-cache lookup then happens, and counts)."""
    parts = [{"type": "image_url", "image_url": {"url": image_url(i)}} for i in images]
    return [{"role": "user", "content": [{"type": "text", "text": text}, *parts]}]


class RayServer:
    """`python -m glimpse.cli serve-ray CHECKPOINT ...` on a free loopback port; `stop()` sends SIGTERM."""

    def __init__(self, checkpoint: Path, *args: str, timeout: float = 300.0) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile("w+", prefix="glimpse-serve-ray-", suffix=".log", delete=False)
        cmd = [sys.executable, "-m", "glimpse.cli", "serve-ray", str(checkpoint), "--port", str(self.port),
               "--served-model-name", MODEL, "--api-key", KEY, "--encoder-graph", "off", "--log-level", "warning",
               *args]  # fmt: skip
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
                                     env={**os.environ, "PYTHONPATH": str(REPO)})  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"glimpse serve-ray exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(self.base + "/health", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"glimpse serve-ray did not become healthy within {timeout:g} s:\n{self.output()}")

    def output(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")[-5000:]

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base + "/v1", api_key=KEY, max_retries=0, timeout=120)

    def replicas(self) -> dict[str, dict]:
        health = httpx.get(self.base + "/health", timeout=10).json()
        return {row["replica"]: row for row in health["replicas"]}

    def post(self, body: dict, **kwargs) -> httpx.Response:
        return httpx.post(self.base + "/v1/chat/completions", json={"model": MODEL, **body}, timeout=120,
                          headers={"Authorization": f"Bearer {KEY}"}, **kwargs)  # fmt: skip

    def stop(self, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:  # leave nothing behind: Ray's processes share the session's group
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.log.close()
        return self.proc.returncode


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    srv = RayServer(tiny_checkpoint("glm46v"), "--num-replicas", "2", "--replica-cpus", "0.5", "--max-num-seqs", "2",
                    "--max-request-bytes", "1MiB", "--limit-mm-per-prompt", '{"image": 2}',
                    "--shutdown-timeout", "20")  # fmt: skip
    yield srv
    srv.stop()


# ---- flags: checked before Ray or the model load -------------------------------------------------
@pytest.mark.parametrize("argv,message", [
    (["--num-replicas", "0"], "--num-replicas must be >= 1, got 0"),
    (["--min-replicas", "3", "--max-replicas", "2"], "--min-replicas 3 is above --max-replicas 2"),
    (["--min-replicas", "2", "--max-replicas", "4", "--num-replicas", "5"], "must lie within --min-replicas 2"),
    (["--target-ongoing-requests", "4"], "steers autoscaling"),
    (["--replica-cpus", "-1"], "--replica-cpus must be >= 0"),
])  # fmt: skip
def test_bad_replica_flags_are_one_line_errors(argv, message, capsys):
    assert cli.main(["serve-ray", *argv]) == 2
    assert message in error_line(capsys.readouterr().err)


@pytest.mark.parametrize("argv,plan", [
    ([], (1, None)),
    (["--num-replicas", "3"], (3, None)),
    (["--min-replicas", "2", "--max-replicas", "5"],
     (2, {"min_replicas": 2, "max_replicas": 5, "initial_replicas": 2, "target_ongoing_requests": 32})),
    (["--max-replicas", "4", "--num-replicas", "3", "--target-ongoing-requests", "6"],
     (3, {"min_replicas": 1, "max_replicas": 4, "initial_replicas": 3, "target_ongoing_requests": 6})),
    (["--min-replicas", "2", "--max-num-seqs", "8"],
     (2, {"min_replicas": 2, "max_replicas": 2, "initial_replicas": 2, "target_ongoing_requests": 8})),
])  # fmt: skip
def test_replica_flags_become_serves_autoscaling_config(argv, plan):
    """The autoscaling bounds reach Serve's `autoscaling_config` as worked out by hand (defaults: min 1, max the
    larger of --num-replicas and min, start at --num-replicas else min, target --max-num-seqs, 32 by default)."""
    import argparse

    from glimpse.server import ray_serve

    parser = argparse.ArgumentParser()
    ray_serve.add_arguments(parser)
    assert ray_serve.replica_plan(parser.parse_args(argv)) == plan


def test_serve_flags_are_checked_as_serve_checks_them(capsys):
    assert cli.main(["serve-ray", "--num-replicas", "2", "--max-queue", "-1"]) == 2
    assert error_line(capsys.readouterr().err) == "glimpse: error: --max-queue must be >= 0"


def test_an_engine_error_in_the_replicas_is_one_line(tiny_checkpoint):
    """The replicas' engine refuses the flags (a KV cache too small for --max-model-len): the command says so in
    the engine's words on one line, exits 2 like glimpse serve, and stops the Ray it started."""
    done = subprocess.run([sys.executable, "-m", "glimpse.cli", "serve-ray", str(tiny_checkpoint("glm46v")),
                           "--port", str(free_port()), "--encoder-graph", "off", "--log-level", "warning",
                           "--replica-cpus", "0.5", "--max-model-len", "10000000"],
                          cwd=REPO, capture_output=True, text=True, timeout=300, start_new_session=True)  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "max_model_len 10000000 needs" in error_line(done.stderr)
    assert done.stderr.rstrip().splitlines()[-1].startswith("glimpse: error:")


# ---- routing -------------------------------------------------------------------------------------
def test_repeats_go_where_their_image_was_encoded(server):
    client = server.client()
    before = server.replicas()
    assert len(before) == 2 and all(r["alive"] for r in before.values())
    where: dict[int, list[str]] = {}
    for round_ in range(3):
        for i in range(20):
            raw = client.chat.completions.with_raw_response.create(
                model=MODEL, messages=chat(f"Request {round_}.{i}: what is this?", i), max_tokens=2, temperature=0)
            assert raw.parse().choices[0].finish_reason in ("length", "stop")
            where.setdefault(i, []).append(raw.headers["x-glimpse-replica"])
    per_replica = {name: sum(names.count(name) for names in where.values()) for name in before}
    assert sum(per_replica.values()) == 60, where  # every header names a live replica
    assert all(count >= 0.3 * 60 for count in per_replica.values()), per_replica
    assert all(len(set(names)) == 1 for names in where.values()), where  # all three on one replica
    images_on = {name: sum(names[0] == name for names in where.values()) for name in before}
    # A first sight is a miss, each of the two repeats a hit, on the replica the header names and on no other.
    deadline = time.monotonic() + 10
    while True:
        after = server.replicas()
        got = {name: (after[name]["encoder_cache_hits"] - before[name]["encoder_cache_hits"],
                      after[name]["encoder_cache_lookups"] - before[name]["encoder_cache_lookups"],
                      after[name]["served"] - before[name]["served"]) for name in before}  # fmt: skip
        want = {name: (2 * n, 3 * n, 3 * n) for name, n in images_on.items()}
        if got == want or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert got == want
    metrics = httpx.get(server.base + "/metrics", timeout=10).text
    for name, (hits, _, _) in want.items():
        line = f'glimpse_replica_encoder_cache_hits_total{{replica="{name}"}} '
        assert float(metrics.split(line, 1)[1].split()[0]) == before[name]["encoder_cache_hits"] + hits


def test_streams_name_their_replica_too(server):
    first = server.client().chat.completions.with_raw_response.create(
        model=MODEL, messages=chat("Again:", 3), max_tokens=2, temperature=0)
    with server.client().chat.completions.with_streaming_response.create(
            model=MODEL, messages=chat("Once more:", 3), max_tokens=2, temperature=0, stream=True) as stream:
        assert stream.headers["x-glimpse-replica"] == first.headers["x-glimpse-replica"]
        assert list(stream.iter_lines())[-2:] == ["data: [DONE]", ""]


# ---- the ingress keeps glimpse serve's protections ------------------------------------------------
def test_the_ingress_keeps_its_protections(server):
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.base + "/v1", api_key="wrong", max_retries=0).models.list()
    too_big = server.post({"messages": [{"role": "user", "content": "x" * (1 << 20)}]})
    assert too_big.status_code == 413 and too_big.json()["error"]["type"] == "invalid_request_error"
    three = server.post({"messages": chat("Three images:", 1, 2, 3), "max_tokens": 2})
    assert three.status_code == 400 and set(three.json()["error"]) == {"message", "type", "param", "code"}
    assert "image" in three.json()["error"]["message"]
    evil = httpx.get(server.base + "/health", headers={"Host": "evil.example"}, timeout=10)
    assert evil.status_code == 400 and evil.json()["error"]["code"] == "invalid_host"


# ---- failure: one replica killed mid-load --------------------------------------------------------
def _sse(response: httpx.Response) -> list[dict | str]:
    return [line[6:] if line == "data: [DONE]" else json.loads(line[6:])
            for line in response.iter_lines() if line.startswith("data: ")]  # fmt: skip


def test_a_killed_replica(server):
    """Image 90 is new: its first request (non-streaming) goes to the least-loaded replica V, and every later one
    follows it there. With --max-num-seqs 2, A (non-streaming) and B (streaming) run on V while C (non-streaming)
    and D (streaming) wait in V's scheduler without a token. V is killed: A gets a 503, B an error event then
    [DONE]; C and D, which had no token, are run again on the other replica and finish normally."""
    long = {"max_tokens": 3000, "ignore_eos": True, "temperature": 0}
    pool = ThreadPoolExecutor(4)
    a = pool.submit(server.post, {"messages": chat("A:", 90), **long})
    deadline = time.monotonic() + 30
    while not any(r["running"] for r in server.replicas().values()):
        assert time.monotonic() < deadline, "request A never started"
        time.sleep(0.1)
    stream_b = httpx.stream("POST", server.base + "/v1/chat/completions", timeout=120,
                            headers={"Authorization": f"Bearer {KEY}"},
                            json={"model": MODEL, "messages": chat("B:", 90), "stream": True, **long})  # fmt: skip
    b = stream_b.__enter__()
    victim = b.headers["x-glimpse-replica"]
    b_lines = b.iter_lines()
    for line in b_lines:  # until B's first token has reached the client
        if line.startswith("data: ") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
            break
    c = pool.submit(server.post, {"messages": chat("C:", 90), "max_tokens": 4})

    def stream_d() -> tuple[str, list]:
        body = {"model": MODEL, "messages": chat("D:", 90), "stream": True, "max_tokens": 4}
        with httpx.stream("POST", server.base + "/v1/chat/completions", timeout=120, json=body,
                          headers={"Authorization": f"Bearer {KEY}"}) as r:  # fmt: skip
            return r.headers["x-glimpse-replica"], _sse(r)

    d = pool.submit(stream_d)
    while True:  # C and D queued behind A and B on V
        rows = server.replicas()
        if rows[victim]["running"] == 2 and rows[victim]["waiting"] == 2:
            break
        assert time.monotonic() < deadline + 30, rows
        time.sleep(0.1)
    os.kill(rows[victim]["pid"], signal.SIGKILL)
    killed = time.monotonic()
    survivor = next(name for name in rows if name != victim)

    b_events = [line[6:] for line in b_lines if line.startswith("data: ")]
    stream_b.__exit__(None, None, None)
    assert b_events[-1] == "[DONE]"
    error = json.loads(b_events[-2])["error"]
    assert error["type"] == "service_unavailable" and victim in error["message"]
    answer_a = a.result(60)
    assert answer_a.status_code == 503 and answer_a.json()["error"]["code"] == "engine_dead"
    answer_c = c.result(60)
    assert answer_c.status_code == 200, answer_c.text
    assert answer_c.headers["x-glimpse-replica"] == survivor
    assert answer_c.json()["choices"][0]["finish_reason"] == "length"
    d_replica, d_events = d.result(60)
    assert d_replica == victim  # the headers went out when V took it
    assert d_events[-1] == "[DONE]" and not any("error" in e for e in d_events[:-1])
    assert d_events[-2]["choices"][0]["finish_reason"] == "length"
    assert time.monotonic() - killed < 30  # nothing hung
    after = server.post({"messages": chat("After:", 91), "max_tokens": 2})
    assert after.status_code == 200


def test_sigterm_drains_then_stops(server):
    """In flight at SIGTERM: the stream runs to its end; a new request gets 503; the command exits 0 and leaves
    no Ray process behind."""
    body = {"model": MODEL, "messages": chat("Drain:", 92), "stream": True, "max_tokens": 400, "ignore_eos": True}
    with httpx.stream("POST", server.base + "/v1/chat/completions", json=body, timeout=120,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:  # fmt: skip
        lines = r.iter_lines()
        next(line for line in lines if line.startswith("data: "))
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert server.post({"messages": chat("Late:", 93), "max_tokens": 2}).status_code == 503
        events = [line[6:] for line in lines if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and json.loads(events[-2])["choices"][0]["finish_reason"] == "length"
    assert server.stop() == 0
    time.sleep(2)  # Ray's per-node agents exit once the raylet is gone
    session = ["ps", "-o", "pid=,cmd=", "--sid", str(server.proc.pid)]
    left = subprocess.run(session, capture_output=True, text=True).stdout
    assert "ray" not in left, left
