"""Attacks on a real `glimpse serve` (tiny checkpoint, loopback only): each is refused with a 4xx that
names the limit, the keep-alive connection stays usable, and the server stays healthy and idle.

Covers: `--max-n`, counting media before any fetch, inputs that used to escape as 500s (lone
surrogates, deep nesting, hostile hosts, ports and redirects), error text that is not mangled,
stalled bodies (`--body-read-timeout`), `--max-connections`, the Host allow-list, JSON-only
content types, and an idle server that stays idle. Media come from a local HTTP server on
127.0.0.1, exempted from the public-address rule by GLIMPSE_UNSAFE_MEDIA_ADDRESSES.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
import uvicorn
from test_server import MEDIA, MODEL, ServerProcess, image_part, user
from test_server_bad_input import b64, expect_error, png_header
from test_video_bounds import uhd_clip  # noqa: F401 - a fixture: 100 frames of 4K, ~40 KB

from glimpse.server.guard import Guard, clean, host_of

IMAGE = MEDIA / "images" / "rocket.jpg"


class _Media(BaseHTTPRequestHandler):
    hits: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        self.hits.append(self.path)
        if self.path == "/slow":  # a 10 MB image trickled at 20 KB/s: a fetch of it is only ever cut short
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(10_000_000))
            self.end_headers()
            try:
                for _ in range(10_000):
                    self.wfile.write(b"x" * 1000)
                    self.wfile.flush()
                    time.sleep(0.05)
            except OSError:
                self.hits.append("cut /slow")
            return
        if self.path == "/to-data":
            self.send_response(302)
            self.send_header("Location", "data:image/png;base64,AAAA")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = IMAGE.read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def media_host():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Media)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


@pytest.fixture(scope="module")
def server(tiny_checkpoint, media_host):
    srv = ServerProcess(
        tiny_checkpoint("glm46v"), "--allowed-media-domains", "*", "--limit-mm-per-prompt", '{"image": 4, "video": 1}',
        "--max-image-pixels", "1000000", "--max-pixels", "100000", "--max-frames", "64", "--body-read-timeout", "2",
        "--max-connections", "24", "--max-model-len", "1024", "--kv-cache-memory", "32MiB", "--dtype", "float32",
        env={"GLIMPSE_UNSAFE_MEDIA_ADDRESSES": "127.0.0.1"})  # fmt: skip
    yield srv
    srv.stop()


def chat_body(*parts, **extra) -> dict:
    return {"model": MODEL, "messages": user(*parts), "max_tokens": 1, **extra}


def on_one_connection(server: ServerProcess, body: bytes, headers: dict | None = None,
                      path: str = "/v1/chat/completions") -> tuple[int, dict]:  # fmt: skip
    """POST `body`, then GET /health on the SAME keep-alive connection: the answer, and proof it survived."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
        first = conn.getresponse()
        status, payload = first.status, json.loads(first.read())
        assert (first.getheader("connection") or "").lower() != "close"
        conn.request("GET", "/health")
        second = conn.getresponse()
        assert second.status == 200 and json.loads(second.read()) == {"status": "ok"}
    finally:
        conn.close()
    return status, payload


# ---- --max-n ---------------------------------------------------------------------------------------
def test_n_is_bounded_by_max_n(server):
    err = expect_error(server.post("/v1/chat/completions", chat_body("Hi", n=17)), 400, "limit_exceeded_error", "--max-n")
    assert err["param"] == "n" and "16" in err["message"]
    r = server.post("/v1/completions", {"model": MODEL, "prompt": ["a", "b", "c"], "n": 6, "max_tokens": 1})
    err = expect_error(r, 400, "limit_exceeded_error", "--max-n")
    assert "3 prompts x n=6 = 18" in err["message"]
    r = server.post("/v1/completions", {"model": MODEL, "prompt": ["a"] * 10_000, "max_tokens": 1})
    expect_error(r, 400, "limit_exceeded_error", "--max-n")
    r = server.post("/v1/completions", {"model": MODEL, "prompt": [[5, 6]] * 17, "max_tokens": 1})
    expect_error(r, 400, "limit_exceeded_error", "--max-n")
    # At the limit it is served: 16 sequences, each with its own choice.
    r = server.post("/v1/chat/completions", chat_body("Hi", n=16, temperature=1.0, seed=3))
    assert r.status_code == 200, r.text
    assert sorted(c["index"] for c in r.json()["choices"]) == list(range(16))
    r = server.post("/v1/completions", {"model": MODEL, "prompt": ["a", "b"], "n": 8, "max_tokens": 1})
    assert r.status_code == 200 and len(r.json()["choices"]) == 16, r.text


# ---- limits checked before any fetch -----------------------------------------------------------------
def test_media_counted_before_fetching(server, media_host):
    _Media.hits.clear()
    parts = [image_part(f"{media_host}/img{i}.jpg") for i in range(60)]
    expect_error(server.post("/v1/chat/completions", chat_body(*parts, "Hi")), 400, "limit_exceeded_error",
                 "--limit-mm-per-prompt")  # fmt: skip
    # A ceiling in mm_processor_kwargs needs no download either.
    body = chat_body(image_part(f"{media_host}/one.jpg"), "Hi", mm_processor_kwargs={"max_pixels": 10**7})
    expect_error(server.post("/v1/chat/completions", body), 400, "limit_exceeded_error", "--max-pixels")
    assert _Media.hits == []
    # Positive control: the same host is fetched when the request is within the limits.
    r = server.post("/v1/chat/completions", chat_body(image_part(f"{media_host}/ok.jpg"), "Hi"))
    assert r.status_code == 200, r.text
    assert _Media.hits == ["/ok.jpg"]


# ---- inputs that escaped as 500s: each a 400, and the connection lives on -----------------------------
def _raw(body: dict) -> bytes:
    return json.dumps(body).encode()


@pytest.mark.parametrize("name, body, code", [
    ("lone surrogate in content", _raw(chat_body("hi \ud800")), "invalid_json"),
    ("lone surrogate in model", _raw({**chat_body("hi"), "model": "\udc00x"}), "invalid_json"),
    ("lone surrogate in a file URL", _raw(chat_body(image_part("file:///x\ud800.png"))), "invalid_json"),
    ("JSON nested 100k deep", b'{"model": "m", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "invalid_json"),
    ("a host label of 64+ characters", _raw(chat_body(image_part(f"http://{'a' * 70}.localhost/x.png"))), None),
    ("an empty host label", _raw(chat_body(image_part("http://x..localhost/x.png"))), None),
    ("port 99999", _raw(chat_body(image_part("http://example.com:99999/x.png"))), None),
    ("JSON nested 984 deep around a lone surrogate", b'{"model": "m", "messages": [{"role": "user", "content": "x"}], '
     b'"metadata": ' + b"[" * 984 + b'"\\ud800"' + b"]" * 984 + b"}", "invalid_json"),
    ("JSON nested 65 deep", _raw({**chat_body("hi"), "mm_processor_kwargs": {"fps": json.loads("[" * 64 + "]" * 64)}}),
     "invalid_json"),
    ("an internal keyword in mm_processor_kwargs", _raw(chat_body("Hi", mm_processor_kwargs={"control": 1})), None),
])  # fmt: skip
def test_former_500s_are_400s_on_a_live_connection(server, name, body, code):
    status, payload = on_one_connection(server, body)
    assert status == 400, payload
    if code is not None:
        assert payload["error"]["code"] == code, payload


def test_redirect_to_a_data_url_is_a_400(server, media_host):
    status, payload = on_one_connection(server, _raw(chat_body(image_part(f"{media_host}/to-data"), "Hi")))
    assert status == 400 and payload["error"]["code"] in ("media_error", "media_access_error"), payload


def test_a_refused_item_stops_the_other_fetches(server, media_host):
    """One bad item among slow downloads: the 400 comes at once and the downloads are cut, not left running."""
    _Media.hits.clear()
    body = chat_body(image_part(f"{media_host}/slow"), image_part(f"{media_host}/slow"),
                     image_part("data:image/png;base64,***"), "Hi")  # fmt: skip
    t0 = time.monotonic()
    expect_error(server.post("/v1/chat/completions", body), 400, "media_error")
    assert time.monotonic() - t0 < 5
    time.sleep(1.5)  # a fetch left running has connected by now
    deadline = time.monotonic() + 5  # well under --media-fetch-timeout (10 s), when a left-over fetch would end
    while _Media.hits.count("cut /slow") < _Media.hits.count("/slow"):
        assert time.monotonic() < deadline, _Media.hits
        time.sleep(0.05)


def test_valid_surrogate_pairs_pass(server):
    # "\ud83d\ude00" is a JSON escape of one emoji (a valid pair), not a lone surrogate.
    status, payload = on_one_connection(server, b'{"model": "tiny-glm", "messages": [{"role": "user", '
                                                b'"content": "smile \\ud83d\\ude00"}], "max_tokens": 1}')  # fmt: skip
    assert status == 200, payload


def test_error_text_is_not_mangled(server):
    """The address scrubber hides 0x7f3a... but leaves sizes like 8100x8100 alone."""
    err = expect_error(server.post("/v1/chat/completions", chat_body(image_part(b64(png_header(8100, 8100), "image/png")))),
                       400, "media_too_large_error")  # fmt: skip
    assert "8100x8100" in err["message"], err
    assert clean("at 0x7f3a2b1c4d5e and 8100x8100 and 0xdeadbeef") == "at 0x? and 8100x8100 and 0x?"


# ---- bodies, connections, hosts, content types ---------------------------------------------------------
def _headers_then_stall(server: ServerProcess, length: int, sent: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nContent-Type: "
                 f"application/json\r\nContent-Length: {length}\r\n\r\n".encode() + sent)  # fmt: skip
    return sock


def test_stalled_body_times_out(server):
    sock = _headers_then_stall(server, 1000, b'{"model": ')
    t0 = time.monotonic()
    reply = b""
    while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
        chunk = sock.recv(65536)
        if not chunk:
            break
        reply += chunk
    sock.close()
    assert time.monotonic() - t0 < 20
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), reply[:300]
    assert json.loads(body)["error"]["code"] == "body_read_timeout" and b"--body-read-timeout" in body


def test_open_connections_are_bounded(server):
    idle = [socket.create_connection(("127.0.0.1", server.port), timeout=30) for _ in range(24)]
    try:
        time.sleep(0.1)  # under --body-read-timeout (2 s here), after which the idle sockets are closed
        r = httpx.get(server.base + "/health", timeout=10)
        assert r.status_code == 503
    finally:
        for sock in idle:
            sock.close()
    deadline = time.monotonic() + 30
    while httpx.get(server.base + "/health", timeout=10).status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(0.2)


@pytest.mark.parametrize("sent", [b"", b"GET /health HTTP/1.1\r\nHo"])
def test_a_connection_must_send_its_head_in_time(server, sent):
    """A socket that sends nothing, or trickles its request head a byte at a time, is closed after
    --body-read-timeout (2 s here) instead of holding a place of --max-connections forever."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    t0 = time.monotonic()
    closed = False
    try:
        sock.sendall(sent)
        for _ in range(40):  # one more byte every 0.25 s: each resets uvicorn's own idle timer
            time.sleep(0.25)
            try:
                sock.sendall(b"s")
            except OSError:
                closed = True
                break
            sock.setblocking(False)
            try:
                closed = sock.recv(1024) == b""
            except BlockingIOError:
                pass
            except OSError:
                closed = True
            sock.setblocking(True)
            if closed:
                break
    finally:
        sock.close()
    assert closed and time.monotonic() - t0 < 8, "the connection was still open"


def test_host_header_allow_list(server):
    body = _raw(chat_body("Hi"))
    for host in ("evil.example.com", "evil.example.com:8000", "127.0.0.1.nip.io"):
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        conn.request("POST", "/v1/chat/completions", body=body, headers={"Host": host, "Content-Type": "application/json"})
        r = conn.getresponse()
        payload = json.loads(r.read())
        conn.close()
        assert r.status == 400 and payload["error"]["code"] == "invalid_host", payload
        assert "--allowed-hosts" in payload["error"]["message"]
    for host in (f"localhost:{server.port}", f"127.0.0.1:{server.port}", "LOCALHOST"):
        status, payload = on_one_connection(server, body, {"Host": host})
        assert status == 200, payload


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data", None])
def test_json_endpoints_refuse_other_content_types(server, content_type):
    headers = {"Content-Type": content_type} if content_type else {}
    for path in ("/v1/chat/completions", "/v1/completions"):
        r = httpx.post(server.base + path, content=_raw(chat_body("Hi")), headers=headers, timeout=30)
        expect_error(r, 415, "unsupported_media_type", "application/json")
    ok = httpx.post(server.base + "/v1/chat/completions", content=_raw(chat_body("Hi")),
                    headers={"Content-Type": "application/json; charset=utf-8"}, timeout=30)  # fmt: skip
    assert ok.status_code == 200, ok.text


# ---- media work is bounded and cancellable -------------------------------------------------------------
def _status(pid: int, key: str) -> int:
    for line in open(f"/proc/{pid}/status"):  # noqa: SIM115
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _all_frames(clip) -> dict:
    return chat_body({"type": "video_url", "video_url": {"url": b64(clip.read_bytes(), "video/mp4")}}, "What?",
                     mm_processor_kwargs={"do_sample_frames": False})  # fmt: skip


@pytest.fixture(scope="module")
def frames_server(server):
    srv = ServerProcess(server.checkpoint, "--max-frames", "128", "--max-model-len", "8192", "--dtype", "float32")
    yield srv
    srv.stop()


def test_keeping_every_4k_frame_is_bounded(server, frames_server, uhd_clip):  # noqa: F811
    """100 frames of 4K with do_sample_frames=false: refused above --max-frames before decoding; within it,
    the server grows by far less than the 2.4 GB full-resolution stack (frames are resized as decoded)."""
    t0 = time.monotonic()
    expect_error(server.post("/v1/chat/completions", _all_frames(uhd_clip)), 400, "limit_exceeded_error", "--max-frames")
    assert time.monotonic() - t0 < 10  # counted from the container, not decoded
    with open(f"/proc/{frames_server.proc.pid}/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    before = _status(frames_server.proc.pid, "VmRSS")
    r = frames_server.post("/v1/chat/completions", _all_frames(uhd_clip), timeout=300)
    growth = _status(frames_server.proc.pid, "VmHWM") - before
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] > 100
    assert growth < 2**30, f"the server grew by {growth / 2**20:.0f} MiB"


def test_decoded_pixels_are_bounded_across_requests(server):
    """Six requests of four 1000x1000 images at once: never more than --max-decoding-pixels (default
    2 x --max-image-pixels = 2,000,000 here) decoded at a time, every image decoded under the budget,
    every request still answered, and /health answers within 1 s throughout.

    The bound is read from the server's own high-water mark (`decoding_pixels_peak`, taken under the
    budget's lock at every reservation), not by polling the live gauge, which can miss a short decode."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (1000, 1000), (90, 30, 200)).save(buf, format="PNG")
    body = chat_body(*[image_part(b64(buf.getvalue(), "image/png"))] * 4, "Hi")
    decoded_before = server.metrics()["glimpse_server_decoded_pixels_total"]
    slowest_health, done = [0.0], threading.Event()

    def watch() -> None:
        while not done.is_set():
            t0 = time.monotonic()
            assert httpx.get(server.base + "/health", timeout=10).status_code == 200
            slowest_health[0] = max(slowest_health[0], time.monotonic() - t0)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with httpx.Client(timeout=120) as client:
            results = []
            threads = [threading.Thread(target=lambda: results.append(client.post(
                server.base + "/v1/chat/completions", json=body))) for _ in range(6)]  # fmt: skip
            for t in threads:
                t.start()
            for t in threads:
                t.join()
    finally:
        done.set()
        watcher.join()
    assert [r.status_code for r in results] == [200] * 6, [r.text for r in results if r.status_code != 200]
    m = server.wait_idle()
    # every one of the 24 images (the same bytes each time: no decode is skipped) reserved its 1,000,000 pixels
    assert m["glimpse_server_decoded_pixels_total"] - decoded_before == 24 * 1_000_000
    assert 1_000_000 <= m["glimpse_server_decoding_pixels_peak"] <= 2_000_000
    assert slowest_health[0] < 1.0, f"/health took {slowest_health[0]:.2f} s while media decoded"
    assert m["glimpse_server_decoding_pixels"] == 0 and m["glimpse_server_requests_waiting_to_decode"] == 0


def test_a_gone_client_stops_its_preprocessing(frames_server, uhd_clip):  # noqa: F811
    """The client leaves while 100 4K frames decode: the work stops within a frame or so, and the gauges
    (requests preprocessing, in flight, decoding pixels) return to 0 long before the work would have ended."""
    body = _all_frames(uhd_clip)
    body["mm_processor_kwargs"]["max_pixels"] = 50_000  # under this server's --max-pixels
    big = frames_server
    t0 = time.monotonic()
    assert big.post("/v1/chat/completions", body, timeout=300).status_code == 200
    whole = time.monotonic() - t0  # preprocessing dominates: 100 4K frames decoded and resized
    with httpx.Client(timeout=300) as client:
        try:
            client.post(big.base + "/v1/chat/completions", json=body, timeout=whole / 5)
        except httpx.TimeoutException:
            pass  # the client gives up and closes the connection
    left = time.monotonic()
    while True:
        m = big.metrics()
        if m["glimpse_server_requests_preprocessing"] == 0 and m["glimpse_server_requests_in_flight"] == 0:
            break
        assert time.monotonic() - left < whole / 2, f"still preprocessing; a whole request takes {whole:.1f} s"
        time.sleep(0.05)
    assert m["glimpse_server_decoding_pixels"] == 0


# ---- an idle server stays idle -----------------------------------------------------------------------
def _cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its live children, from /proc."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    pids = [pid]
    for task in os.listdir(f"/proc/{pid}/task"):
        children = open(f"/proc/{pid}/task/{task}/children").read().split()  # noqa: SIM115
        pids += [int(c) for c in children]
    for p in pids:
        fields = open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()  # noqa: SIM115
        total += (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
    return total


def test_zz_idle_server_uses_almost_no_cpu(server):
    server.wait_idle()
    time.sleep(2)  # let the last request's threads settle
    before = _cpu_seconds(server.proc.pid)
    time.sleep(10)
    used = _cpu_seconds(server.proc.pid) - before
    assert used <= 0.2, f"the idle server used {used:.2f} s of CPU in 10 s"
    m = server.wait_idle()
    assert m["glimpse_server_requests_in_flight"] == 0 and m["glimpse_kv_cache_blocks_used"] == 0


# ---- the last-resort handler, on a real connection -----------------------------------------------------
def test_guard_answers_a_bug_with_json_and_keeps_the_connection():
    async def buggy(scope, receive, send) -> None:
        if scope["path"] == "/bug":
            raise RuntimeError("a bug at 0x7f00deadbeef")
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(Guard(buggy, ["127.0.0.1"]), host="127.0.0.1", port=port,
                                           log_level="critical", lifespan="off"))  # fmt: skip
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.05)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/bug")
        r = conn.getresponse()
        payload = json.loads(r.read())
        assert r.status == 500 and payload["error"]["code"] == "internal_error"
        assert "0x7f00" not in json.dumps(payload)
        conn.request("GET", "/fine")  # same connection
        r = conn.getresponse()
        assert r.status == 200 and r.read() == b"ok"
        conn.close()
    finally:
        server.should_exit = True
        thread.join(10)


def test_a_deadline_cancels_the_work_it_waits_for():
    """--request-timeout (a cancellation from outside) stops the awaited work and waits for it to let go."""
    from glimpse.server.app import _unless_disconnected

    events = []

    class Connected:  # a client that stays connected
        async def receive(self) -> dict:
            await asyncio.sleep(3600)
            return {"type": "http.disconnect"}

    async def work() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            await asyncio.sleep(0.05)  # letting go takes a moment (a thread finishing its frame)
            events.append("stopped")
            raise

    async def main() -> None:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.1):
                await _unless_disconnected(Connected(), work())
        events.append("timed out")

    asyncio.run(main())
    assert events == ["stopped", "timed out"]


def test_frames_that_decode_to_another_size_are_refused():
    """The frame-size limits and the decoding budget judge the stated size; a frame of another size is refused."""
    from types import SimpleNamespace

    from glimpse.errors import MediaError
    from glimpse.media.video import _Steps

    steps = _Steps(None, "video 0", None, (64, 64))
    steps(SimpleNamespace(width=64, height=64))
    with pytest.raises(MediaError, match="7680x4320 but the stream states 64x64"):
        steps(SimpleNamespace(width=7680, height=4320))


def test_host_of():
    assert host_of("Example.COM:8000") == "example.com"
    assert host_of("[::1]:8000") == "::1"
    assert host_of("::1") == "::1"
    assert host_of("localhost") == "localhost"
