"""How `glimpse serve` stops: SIGTERM drains for --shutdown-timeout, Ctrl-C ends requests at once; no traceback.

Each test starts a real server in its own session (process group) and signals the whole group, as a
terminal's Ctrl-C or a service manager (systemd's default KillMode) does, so the engine-core process gets
the signal too. References: the operating system (exit status, /proc for the core's pid), the SSE wire
format as clients read it (token events, then an OpenAI-shaped error event, then `data: [DONE]`), and
the wall clock against the flag's value.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest
from test_server import MODEL, REPO, free_port

LONG = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 3000, "ignore_eos": True, "temperature": 0}


@pytest.fixture(scope="module")
def ckpt(tiny_checkpoint):
    return tiny_checkpoint("glm46v")


class Server:
    """`glimpse serve` as its own session leader, its stdout and stderr kept apart."""

    def __init__(self, ckpt: Path, *args: str) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.out = tempfile.TemporaryFile("w+")
        self.err = tempfile.TemporaryFile("w+")
        cmd = [sys.executable, "-m", "glimpse.cli", "serve", str(ckpt), "--port", str(self.port), "--served-model-name",
               MODEL, "--encoder-graph", "off", "--kv-cache-memory", "64MiB", "--max-model-len", "4096", "--dtype",
               "float32", "--log-level", "warning", *args]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=self.out, stderr=self.err, env=env, start_new_session=True)
        deadline = time.monotonic() + 300
        while not self._healthy():
            assert self.proc.poll() is None, self.stderr()
            assert time.monotonic() < deadline, self.stderr()
            time.sleep(0.3)
        self.core_pid = int(re.search(r"engine core pid (\d+)\)", self.stdout()).group(1))

    def _healthy(self) -> bool:
        try:
            return httpx.get(self.base + "/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def stdout(self) -> str:
        self.out.seek(0)
        return self.out.read()

    def stderr(self) -> str:
        self.err.seek(0)
        return self.err.read()

    def signal_group(self, sig: int) -> float:
        os.killpg(self.proc.pid, sig)
        return time.monotonic()

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    def running(self) -> float:
        text = httpx.get(self.base + "/metrics", timeout=5).text
        m = re.search(r"^glimpse_num_requests_running ([\d.]+)$", text, re.M)
        return float(m.group(1))

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


def gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z")
    except FileNotFoundError:
        return True


def wait_for(check, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"not within {timeout} s"
        time.sleep(0.05)


def read_stream(response: httpx.Response, after: int, then) -> tuple[list[dict], list[float], object]:
    """The events of an SSE stream with their arrival times; `then()` is called once `after` events are in."""
    events, times, result = [], [], None
    for line in response.iter_lines():
        if not line:
            continue
        assert line.startswith("data: "), line
        data = line.removeprefix("data: ")
        events.append(data if data == "[DONE]" else json.loads(data))
        times.append(time.monotonic())
        if len(events) == after:
            result = then()
    return events, times, result


def assert_clean_end(events: list, code: str) -> None:
    """Token events, then one error event with `code`, then [DONE]."""
    assert events[-1] == "[DONE]"
    error = events[-2]["error"]
    assert error["code"] == code and error["type"] == "service_unavailable", error
    tokens = events[:-2]
    assert tokens and all(e["choices"][0]["text"] is not None and e["choices"][0]["finish_reason"] is None
                          for e in tokens)  # fmt: skip


def test_sigterm_drains_for_the_timeout_then_ends_requests_and_exits_0(ckpt):
    srv = Server(ckpt, "--shutdown-timeout", "1")
    try:
        plain: dict = {}
        waiting = threading.Thread(target=lambda: plain.update(r=httpx.post(srv.base + "/v1/completions", json=LONG,
                                                                             timeout=60)))  # fmt: skip
        waiting.start()
        during: dict = {}

        def terminate() -> float:
            wait_for(lambda: srv.running() == 2)  # both requests are in the engine (stats lag up to 0.1 s)
            t = srv.signal_group(signal.SIGTERM)
            time.sleep(0.2)  # uvicorn's loop notices a signal within 0.1 s
            during["new"] = httpx.post(srv.base + "/v1/completions", json={**LONG, "max_tokens": 2}, timeout=10)
            during["tokenize"] = httpx.post(srv.base + "/tokenize", json={"prompt": "hi"}, timeout=10)
            during["health"] = httpx.get(srv.base + "/health", timeout=10)
            return t

        wait_for(lambda: srv.running() == 1)  # the non-streamed request is running
        with httpx.stream("POST", srv.base + "/v1/completions", json={**LONG, "stream": True}, timeout=60) as r:
            events, times, signalled = read_stream(r, 5, terminate)
        status = srv.wait(30)
        waiting.join(30)
    finally:
        srv.kill()
    # The stream kept receiving tokens while draining, and ended about --shutdown-timeout after the signal.
    assert_clean_end(events, "server_shutting_down")
    assert "--shutdown-timeout 1 s" in events[-2]["error"]["message"]
    assert sum(t > signalled + 0.5 for t in times[:-2]) >= 1
    assert 0.9 <= times[-1] - signalled < 10
    # New requests were refused with 503 while draining; the non-streamed one in flight ended with a 503.
    for name in ("new", "tokenize"):
        assert during[name].status_code == 503 and during[name].json()["error"]["code"] == "server_shutting_down"
    assert during["health"].status_code == 503 and during["health"].json() == {"status": "shutting down"}
    assert plain["r"].status_code == 503 and plain["r"].json()["error"]["code"] == "server_shutting_down"
    assert status == 0, srv.stderr()
    assert "Traceback" not in srv.stderr()
    assert gone(srv.core_pid)


def test_sigterm_lets_requests_in_flight_finish_and_exits_as_soon_as_they_have(ckpt):
    srv = Server(ckpt)  # the default --shutdown-timeout, 30 s
    try:
        body = {**LONG, "max_tokens": 40, "stream": True, "stream_options": {"include_usage": True}}
        with httpx.stream("POST", srv.base + "/v1/completions", json=body, timeout=60) as r:
            events, times, signalled = read_stream(r, 2, lambda: srv.signal_group(signal.SIGTERM))
        status = srv.wait(30)
        exited = time.monotonic()
    finally:
        srv.kill()
    assert events[-1] == "[DONE]" and all("error" not in e for e in events[:-1])
    assert events[-3]["choices"][0]["finish_reason"] == "length"
    assert events[-2]["usage"]["completion_tokens"] == 40  # every token came
    assert exited - signalled < 15  # it did not wait out the 30 s
    assert status == 0 and "Traceback" not in srv.stderr(), srv.stderr()
    assert gone(srv.core_pid)


def test_ctrl_c_ends_requests_at_once_and_exits_130_without_a_traceback(ckpt):
    srv = Server(ckpt)  # the 30 s --shutdown-timeout applies to SIGTERM only
    try:
        with httpx.stream("POST", srv.base + "/v1/completions", json={**LONG, "stream": True}, timeout=60) as r:
            events, times, signalled = read_stream(r, 5, lambda: srv.signal_group(signal.SIGINT))
        status = srv.wait(30)
    finally:
        srv.kill()
    assert_clean_end(events, "server_shutting_down")
    assert "interrupted" in events[-2]["error"]["message"]
    assert times[-1] - signalled < 5
    assert status == 130, srv.stderr()  # 128 + SIGINT, what a shell reports for a Ctrl-C
    assert "Traceback" not in srv.stderr() and "KeyboardInterrupt" not in srv.stderr(), srv.stderr()
    assert gone(srv.core_pid)
