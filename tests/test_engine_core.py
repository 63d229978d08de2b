"""The engine core in its own process (glimpse/engine/core.py) behind a real `glimpse serve`.

References: the offline `LLM` (which drives `LLMEngine.step()` itself, in this process) on the
same checkpoint and prompt, for the greedy tokens; the HF tokenizer for each token's bytes; and
the operating system (/proc, signals) for process lifetimes and CPU time.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from conftest import MEDIA
from test_server import MODEL, REPO, ServerProcess, data_url, free_port, image_part, user

from glimpse.engine.core import ErrorInfo
from glimpse.errors import CheckpointError, PromptError
from glimpse.server.async_engine import AsyncEngine, EngineStepError

IMAGE = MEDIA / "images" / "rocket.jpg"
# How `glimpse serve` ends on SIGTERM: uvicorn shuts down gracefully, then re-raises the signal.
STOPPED = (0, -signal.SIGTERM)


@pytest.fixture(scope="module")
def ckpt(tiny_checkpoint):
    return tiny_checkpoint("glm46v")


@pytest.fixture(scope="module")
def server(ckpt):
    srv = ServerProcess(ckpt, "--kv-cache-memory", "64MiB", "--max-model-len", "4096", "--dtype", "float32",
                        "--generation-config", "none")  # fmt: skip
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def llm(ckpt):
    from glimpse import LLM

    return LLM(ckpt, dtype="float32", kv_cache_memory="64MiB", max_model_len=4096)


@pytest.fixture(scope="module")
def tok(ckpt):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(ckpt)


def core_pid(srv: ServerProcess) -> int:
    """The engine core's pid, from the start-up line `glimpse serve: ... (max_model_len N, engine core pid P)`."""
    match = re.search(r"engine core pid (\d+)\)", srv.output())
    assert match, srv.output()
    return int(match.group(1))


def gone(pid: int) -> bool:
    """No such process, or a zombie waiting for a reaper that is not its old parent."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z")
    except FileNotFoundError:
        return True


def wait_until(check, timeout: float) -> float:
    """Seconds until `check()` held; fails after `timeout`."""
    t0 = time.monotonic()
    while not check():
        assert time.monotonic() - t0 < timeout, f"not within {timeout} s"
        time.sleep(0.05)
    return time.monotonic() - t0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().split(") ")[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def assert_same_tokens(choice, ref_ids: list[int], ref_text: str, tok) -> None:
    """The served tokens are the offline ones: same count, same bytes per token, same text."""
    entries = choice.logprobs.content
    assert len(entries) == len(ref_ids)
    for entry, token_id in zip(entries, ref_ids, strict=True):
        alone = tok.decode([token_id])
        if "\ufffd" not in alone:  # a token holding part of a character has no text of its own
            assert bytes(entry.bytes) == alone.encode()
    assert choice.message.content == ref_text


def test_error_info_crosses_the_boundary_as_plain_data():
    import pickle

    class Unpicklable(Exception):
        def __init__(self, a, b):
            super().__init__(f"{a}/{b}")

    info = pickle.loads(pickle.dumps(ErrorInfo.of(PromptError("the prompt is empty"))))
    rebuilt = info.rebuild()
    assert type(rebuilt) is PromptError and str(rebuilt) == "the prompt is empty"
    assert type(ErrorInfo.of(CheckpointError("x")).rebuild()) is CheckpointError
    other = pickle.loads(pickle.dumps(ErrorInfo.of(Unpicklable(1, 2))))
    assert other.rebuild() is None and str(other) == "Unpicklable: 1/2"


def test_small_pixels_cross_inline_and_large_ones_in_shared_memory():
    """What the API process writes down the command pipe, read back by the core's side of a real pipe: an
    image's pixels as a writable tensor of the core's own (not a shared-memory file), a tensor past
    INLINE_TENSOR_BYTES through torch's shared memory; equal values either way, views made contiguous."""
    import multiprocessing

    import torch
    import torch.multiprocessing  # noqa: F401  (torch's shared-memory reductions, as the API process has them)

    from glimpse.processing.inputs import MediaItem, ProcessedPrompt
    from glimpse.server.async_engine import INLINE_TENSOR_BYTES, dumps_command

    image = torch.randn(256, 1176).bfloat16()
    large = torch.randn(INLINE_TENSOR_BYTES // 4 + 1)  # one float32 past the limit
    view = torch.arange(200.0).view(10, 20)[:, ::2]
    prompt = ProcessedPrompt([1, 2, 3], (MediaItem("image", image, (1, 16, 16), ((3, 67),), 64, "hash"),))
    reader, writer = multiprocessing.Pipe(duplex=False)
    commands = (("add", "r1", prompt, None, 0.0), ("probe", large, view))
    sender = threading.Thread(target=lambda: [writer.send_bytes(dumps_command(c)) for c in commands])
    sender.start()  # a pipe holds less than the image: the writer waits for the reader
    got = reader.recv()[2].media[0].pixel_values
    assert got.dtype == torch.bfloat16 and torch.equal(got, image) and not got.is_shared()
    assert got.data_ptr() != image.data_ptr()
    got.add_(1)  # writable memory of its own
    assert torch.equal(image, prompt.media[0].pixel_values)
    _, got_large, got_view = reader.recv()
    assert got_large.is_shared() and torch.equal(got_large, large)
    assert got_view.is_contiguous() and torch.equal(got_view, view)
    sender.join()


@pytest.mark.parametrize("with_image", [False, True], ids=["text", "image"])
def test_core_process_gives_the_offline_greedy_tokens(server, llm, tok, with_image):
    from glimpse import SamplingParams

    parts = [image_part(data_url(IMAGE, "image/jpeg"))] if with_image else []
    messages = user(*parts, "Describe the weather on Mars in detail.")
    ref = llm.chat(messages, SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)[0]
    ref_ids = ref.outputs[0].token_ids
    assert len(ref_ids) >= 2  # precondition: a stream of several tokens to compare

    r = server.client().chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0,
                                                logprobs=True)  # fmt: skip
    assert r.usage.prompt_tokens == len(ref.prompt_token_ids)
    assert_same_tokens(r.choices[0], ref_ids, ref.outputs[0].text, tok)


def test_bad_prompt_is_a_400_across_the_process_boundary(server, tok):
    r = server.post("/v1/completions", {"model": MODEL, "prompt": [len(tok) + 10**6], "max_tokens": 2})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "prompt_error" and "outside the vocabulary" in error["message"]


def test_abort_mid_stream_frees_the_request(server):
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 3000, "ignore_eos": True, "stream": True,
            "temperature": 0}  # fmt: skip
    with httpx.stream("POST", server.base + "/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]  # a few events: the request is running in the core
        assert all(not line or line.startswith("data: ") for line in got)
        # the core sends its stats with its outputs at most every 0.1 s: the first tokens can come before them
        deadline = time.monotonic() + 10
        while server.metrics()["glimpse_num_requests_running"] != 1:
            assert time.monotonic() < deadline, "the running request never showed in /metrics"
            time.sleep(0.05)
    # Closing the connection aborts the request; the core's stats snapshot shows it gone.
    m = server.wait_idle(timeout=10)
    assert m["glimpse_num_requests_running"] == 0 and m["glimpse_kv_cache_blocks_used"] == 0
    assert m["glimpse_server_requests_in_flight"] == 0
    # A stream whose last tokens race with aborts: harmless, and the server keeps serving.
    for max_tokens in (1, 2, 3):
        with httpx.stream("POST", server.base + "/v1/completions", json={**body, "max_tokens": max_tokens},
                          timeout=60) as r:  # fmt: skip
            next(r.iter_lines())
    m = server.wait_idle(timeout=10)
    assert m["glimpse_num_requests_running"] == 0 and m["glimpse_kv_cache_blocks_used"] == 0
    r = server.post("/v1/completions", {"model": MODEL, "prompt": "Hi", "max_tokens": 3, "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


def test_idle_server_does_not_spin(server):
    server.wait_idle()
    pids = [server.proc.pid, core_pid(server)]
    time.sleep(1.0)  # let OpenMP's spinning workers and the last stats message settle
    before = [cpu_seconds(p) for p in pids]
    time.sleep(3.0)
    used = [cpu_seconds(p) - b for p, b in zip(pids, before, strict=True)]
    # A process blocked in a read uses nothing; one clock tick (10 ms) of slack per process.
    assert used[1] <= 0.02, f"the idle core used {used[1]:.3f} s of CPU in 3 s"
    assert used[0] <= 0.1, f"the idle API process used {used[0]:.3f} s of CPU in 3 s"


def test_killed_core_is_reported_and_in_flight_requests_fail(ckpt):
    srv = ServerProcess(ckpt, "--dtype", "float32", "--kv-cache-memory", "64MiB", "--max-model-len", "4096")
    try:
        pid = core_pid(srv)
        assert pid != srv.proc.pid and not gone(pid)
        body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 3000, "ignore_eos": True}
        plain: dict = {}
        waiting = threading.Thread(target=lambda: plain.update(r=srv.post("/v1/completions", body, timeout=30)))  # fmt: skip
        waiting.start()
        with httpx.stream("POST", srv.base + "/v1/completions", json={**body, "stream": True}, timeout=30) as r:  # fmt: skip
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            os.kill(pid, signal.SIGKILL)
            t0 = time.monotonic()
            events = [line.removeprefix("data: ") for line in lines if line]
            elapsed = time.monotonic() - t0
        assert elapsed < 5, f"the stream ended {elapsed:.1f} s after the kill"
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
        assert error["code"] == "engine_dead" and "signal 9" in error["message"]
        waiting.join(5)
        assert plain["r"].status_code == 503 and plain["r"].json()["error"]["code"] == "engine_dead"
        health = httpx.get(srv.base + "/health", timeout=5)
        assert health.status_code == 503 and health.json()["status"] == "engine stopped"
        assert "signal 9" in health.json()["reason"]
        r = srv.post("/v1/completions", {**body, "max_tokens": 2})
        assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable"
        assert gone(pid)  # reaped by the server: no zombie
    finally:
        srv.stop()
    assert srv.proc.returncode in STOPPED, srv.output()


def test_core_exits_when_the_api_process_dies(ckpt):
    srv = ServerProcess(ckpt, "--dtype", "float32", "--kv-cache-memory", "64MiB", "--max-model-len", "4096")
    try:
        pid = core_pid(srv)
        srv.proc.kill()
        srv.proc.wait(10)
        took = wait_until(lambda: gone(pid), timeout=10)
        assert took < 10
    finally:
        srv.stop()
        if not gone(pid):
            os.kill(pid, signal.SIGKILL)


def test_clean_stop_leaves_no_process(ckpt):
    srv = ServerProcess(ckpt, "--dtype", "float32", "--kv-cache-memory", "64MiB", "--max-model-len", "4096")
    pid = core_pid(srv)
    srv.stop()
    assert srv.proc.returncode in STOPPED, srv.output()
    wait_until(lambda: gone(pid), timeout=10)


def test_start_failure_is_one_line(ckpt):
    """An error the engine raises while loading (here a KV cache too small for --max-model-len) comes
    from the core process to the CLI as one line and exit status 2."""
    cmd = [sys.executable, "-m", "glimpse.cli", "serve", str(ckpt), "--encoder-graph", "off", "--port",
           str(free_port()), "--kv-cache-memory", "1MiB", "--max-model-len", "4096"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("glimpse: error: max_model_len 4096 needs") and "raise kv_cache_memory" in last
    assert "Traceback" not in done.stderr


def test_thread_mode_reports_a_failed_step_and_keeps_serving(llm, monkeypatch):
    """--no-engine-process runs the same core loop in a thread; a step that raises fails its requests
    with EngineStepError (HTTP 500) and the next request is served."""
    from glimpse import SamplingParams

    engine = llm.engine
    real_step = engine.step
    calls = {"n": 0}

    def failing_once():
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("boom")
        return real_step()

    monkeypatch.setattr(engine, "step", failing_once)
    prompt = llm.processor(user("Hello there"))
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)

    async def serve() -> list:
        core = AsyncEngine.in_thread(engine)
        try:
            handle = await core.add("a", prompt, params)
            with pytest.raises(EngineStepError):
                async for _ in handle.outputs():
                    pass
            handle = await core.add("b", prompt, params)
            outs = [out async for out in handle.outputs()]
            for _ in range(100):  # the idle core's stats snapshot follows its last output
                if core.stats()["running"] == 0:
                    break
                await asyncio.sleep(0.02)
            return [core.stats()["running"], outs[-1]]
        finally:
            core.shutdown()

    running, final = asyncio.run(serve())
    assert final.finished and len(final.outputs[0].token_ids) == 4
    assert final.prompt_token_ids == prompt.input_ids
    assert running == 0 and not engine.has_unfinished_requests()


def _first_step(llm, monkeypatch, feed) -> tuple[int, float]:
    """Run the core loop in a thread on the real engine; `feed(put, t0)` puts commands. Returns how many
    requests the first step held and when it started (seconds after the first command)."""
    from glimpse.engine.core import EngineCore, QueueCommands

    engine = llm.engine
    real_step, first = engine.step, []
    t0 = time.monotonic()

    def step():
        if not first:
            first.append((len(engine.groups), time.monotonic() - t0))
        return real_step()

    monkeypatch.setattr(engine, "step", step)
    commands, sent = QueueCommands(), []
    core = threading.Thread(target=EngineCore(engine, sent.append).run, args=(commands,))
    core.start()
    try:
        t0 = time.monotonic()
        feed(commands.put)
        wait_until(lambda: sum(o.finished for m in list(sent) if m[0] == "outputs" for o in m[1]) == 3, timeout=60)
    finally:
        commands.put(("shutdown",))
        core.join(timeout=30)
    return first[0]


@pytest.mark.parametrize(("pendings", "gather"), [((2, 1, 0), 3), ((0, 0, 0), 1)], ids=["burst", "no-burst"])
def test_an_idle_core_waits_for_the_adds_said_to_be_coming(llm, monkeypatch, pendings, gather):
    """An add says how many admitted requests the API process has not sent yet: an idle core takes them
    into its first step (they arrive 30 and 60 ms later here); with none announced it steps at once."""
    from glimpse import SamplingParams
    from glimpse.engine import core

    # A loaded machine may delay the feeding thread past 0.1 s; the wait ends when the last add says none are
    # left (at ~60 ms), not at this bound.
    monkeypatch.setattr(core, "GATHER_SECONDS", 5.0)
    prompt = llm.processor(user("Hello there"))
    params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)

    def feed(put):
        for i, pending in enumerate(pendings):
            put(("add", f"r{i}", prompt, params, 0.0, pending))
            time.sleep(0.03)

    held, _ = _first_step(llm, monkeypatch, feed)
    assert held == gather


def test_an_idle_core_waits_no_longer_than_gather_seconds(llm, monkeypatch):
    """Announced requests that do not come (a slow fetch, a failed preprocessing) hold the first step back
    by GATHER_SECONDS at most."""
    from glimpse import SamplingParams
    from glimpse.engine import core

    monkeypatch.setattr(core, "GATHER_SECONDS", 0.5)
    prompt = llm.processor(user("Hello there"))
    params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)

    def feed(put):
        put(("add", "r0", prompt, params, 0.0, 5))
        time.sleep(1.5)  # past the wait: these two start steps of their own
        put(("add", "r1", prompt, params, 0.0, 0))
        put(("add", "r2", prompt, params, 0.0, 0))

    held, started = _first_step(llm, monkeypatch, feed)
    assert held == 1 and 0.5 <= started < 1.4


def test_adds_count_the_admitted_requests_still_to_come(llm):
    """`pending` in each add: the requests admitted and not yet added, the sender itself not counted; an
    admission that ends without an add (a failed preprocessing) stops counting."""
    from glimpse import SamplingParams

    prompt = llm.processor(user("Hello there"))
    params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)

    async def scenario() -> tuple[list[int], int]:
        engine = AsyncEngine.in_thread(llm.engine)
        pendings, submit = [], engine._submit
        engine._submit = lambda c: (pendings.append(c[5]) if c[0] == "add" else None, submit(c))
        admitted = asyncio.Event()
        count = 0

        async def request(i: int, adds: bool) -> None:
            nonlocal count
            async with engine.admit():
                count += 1
                if count == 3:
                    admitted.set()
                await admitted.wait()  # all three admitted before any adds
                await asyncio.sleep(0.01 * i)  # in order
                if adds:
                    handle = await engine.add(f"r{i}", prompt, params)
                    async for _ in handle.outputs():
                        pass

        try:
            await asyncio.gather(request(0, True), request(1, True), request(2, False))
            async with engine.admit():  # alone: nothing else on its way
                handle = await engine.add("r3", prompt, params)
                async for _ in handle.outputs():
                    pass
            return pendings, engine._preparing
        finally:
            engine.shutdown()

    pendings, left = asyncio.run(scenario())
    assert pendings == [2, 1, 0] and left == 0


def test_output_batches_take_what_waits_and_raise_after_it():
    # The reader thread hands a step's outputs to the event loop in one wake-up; a stream that fell behind
    # takes every waiting output at once, in order, and an error comes after the outputs sent before it.
    from glimpse.engine.llm_engine import RequestOutput
    from glimpse.server.async_engine import RequestHandle, _deliver, _Stream

    def out(i: int, finished: bool = False) -> RequestOutput:
        return RequestOutput(f"r{i}", [], [], finished)

    async def main() -> tuple[list, list, list]:
        loop = asyncio.get_running_loop()
        a, b = _Stream(loop, asyncio.Queue(), []), _Stream(loop, asyncio.Queue(), [])
        done = threading.Event()

        def reader() -> None:  # the core's reader thread: two steps of news for both streams, then an error for b
            _deliver([(a, out(1)), (b, out(1))])
            _deliver([(a, out(2, finished=True)), (b, out(2))])
            _deliver([(b, EngineStepError("boom"))])
            done.set()

        threading.Thread(target=reader).start()
        await asyncio.to_thread(done.wait)
        got_a = [[o.request_id for o in batch] async for batch in RequestHandle(None, "a", a).output_batches()]
        got_b, error = [], None
        try:
            async for batch in RequestHandle(None, "b", b).output_batches():
                got_b.append([o.request_id for o in batch])
        except EngineStepError as exc:
            error = exc
        return got_a, got_b, [str(error)]

    got_a, got_b, error = asyncio.run(main())
    assert got_a == [["r1", "r2"]]  # both waited: one batch, ended by the finished output
    assert got_b == [["r1", "r2"]] and error == ["boom"]


def test_end_with_ends_the_outputs_after_what_waits():
    # A stream's deadline (`RequestHandle.end_with`): the core is told to stop the request once, the outputs already
    # waiting come out first, then the error, also for a reader paused between two batches; a request whose final
    # output was already waiting ends with it, as if on time.
    from glimpse.engine.llm_engine import RequestOutput
    from glimpse.server.async_engine import RequestHandle, _Stream

    class Core:  # the engine's abort channel, recorded
        def __init__(self) -> None:
            self.aborted: list[str] = []

        def _abort(self, request_id: str) -> None:
            self.aborted.append(request_id)

    def out(i: int, finished: bool = False) -> RequestOutput:
        return RequestOutput(f"r{i}", [], [], finished)

    async def drain(handle: RequestHandle) -> tuple[list, str | None]:
        got = []
        try:
            async for batch in handle.output_batches():
                got.append([o.request_id for o in batch])
        except TimeoutError:
            return got, "timeout"
        return got, None

    async def main() -> dict:
        loop = asyncio.get_running_loop()
        core, seen = Core(), {}
        waiting = RequestHandle(core, "a", _Stream(loop, asyncio.Queue(), []))  # an output waits, then the deadline
        waiting._stream.queue.put_nowait(out(1))
        waiting.end_with(TimeoutError())
        seen["waiting"] = await drain(waiting)
        waiting.abort()  # the stream's own abort afterwards: nothing more goes to the core
        done = RequestHandle(core, "b", _Stream(loop, asyncio.Queue(), []))  # the final output waits already
        done._stream.queue.put_nowait(out(1))
        done._stream.queue.put_nowait(out(2, finished=True))
        done.end_with(TimeoutError())
        seen["done"] = await drain(done)
        paused = RequestHandle(core, "c", _Stream(loop, asyncio.Queue(), []))  # the reader is between two batches
        paused._stream.queue.put_nowait(out(1))
        batches = paused.output_batches()
        first = await anext(batches)
        paused.end_with(TimeoutError())
        try:
            await anext(batches)
            seen["paused"] = ([o.request_id for o in first], "ended without the error")
        except TimeoutError:
            seen["paused"] = ([o.request_id for o in first], "timeout")
        seen["aborted"] = core.aborted
        return seen

    seen = asyncio.run(main())
    assert seen["waiting"] == ([["r1"]], "timeout")
    assert seen["done"] == ([["r1", "r2"]], None)
    assert seen["paused"] == (["r1"], "timeout")
    assert seen["aborted"] == ["a", "b", "c"]  # once each
