"""Step 4 for the server: the `LLMEngine` in its own thread, an asyncio stream per request, and admission.

`await AsyncEngine.add(request_id, prompt, params)` queues a request and returns a handle whose
`outputs()` yields `RequestOutput`s (one per engine step that gave it tokens, listing only the
completions that moved; the last has `finished=True` and all n); `handle.abort()` (client gone, timeout, error) frees its KV blocks.
`admit()` bounds the requests being served: `max_concurrent` at once plus `max_queue` waiting
for a slot; beyond that it raises `ServerBusyError` (HTTP 429).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from glimpse.engine.llm_engine import LLMEngine, RequestOutput
from glimpse.engine.sampling_params import SamplingParams
from glimpse.errors import GlimpseError
from glimpse.processing.inputs import ProcessedPrompt

log = logging.getLogger("glimpse.server")

# How long the idle engine thread sleeps between checks for new commands (seconds).
_IDLE_POLL = 0.25


class ServerBusyError(GlimpseError):
    """Every admission slot and queue place is taken (HTTP 429)."""


class EngineDeadError(GlimpseError):
    """The engine thread stopped; the server cannot serve (HTTP 503)."""


class EngineStepError(GlimpseError):
    """An unexpected failure inside an engine step; the requests in it were aborted (HTTP 500)."""


@dataclass(eq=False)
class _Stream:
    """Where the engine thread delivers one request's outputs (or an exception)."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue

    def put(self, item: RequestOutput | BaseException) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the event loop is closed (server shutting down): nobody is listening
            pass


class RequestHandle:
    """One queued request: iterate `outputs()`; `abort()` (idempotent) frees its KV blocks if still running."""

    def __init__(self, engine: AsyncEngine, request_id: str, stream: _Stream) -> None:
        self._engine, self.request_id, self._stream = engine, request_id, stream
        self.finished = False

    async def outputs(self) -> AsyncIterator[RequestOutput]:
        while not self.finished:
            item = await self._stream.queue.get()
            if isinstance(item, BaseException):
                self.finished = True  # the engine thread already dropped it
                raise item
            self.finished = item.finished
            yield item

    def abort(self) -> None:
        if not self.finished:
            self.finished = True
            self._engine._commands.put(("abort", self.request_id))


class AsyncEngine:
    def __init__(self, engine: LLMEngine, max_concurrent: int = 64, max_queue: int = 256) -> None:
        self.engine = engine
        self.max_concurrent = max_concurrent
        self.max_queue = max_queue
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}  # touched only by the engine thread
        self._stats = engine.stats()  # replaced (never mutated) by the engine thread after each step
        self._slots: asyncio.Semaphore | None = None  # made lazily inside the server's event loop
        self._in_flight = 0
        self._queued = 0
        self._rejected = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="glimpse-engine", daemon=True)
        self._thread.start()

    # ---- admission (event-loop side) -----------------------------------------------------
    @contextlib.asynccontextmanager
    async def admit(self) -> AsyncIterator[None]:
        """Hold one of `max_concurrent` slots for the body; wait in a queue of `max_queue` places."""
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.max_concurrent)
        if self._in_flight + self._queued >= self.max_concurrent + self.max_queue:
            self._rejected += 1
            raise ServerBusyError(
                f"the server is busy: {self._in_flight} requests are being served and {self._queued} are queued; "
                f"the limits are --max-concurrent-requests {self.max_concurrent} and --max-queue {self.max_queue}; "
                "retry later")  # fmt: skip
        self._queued += 1
        try:
            await self._slots.acquire()
        finally:
            self._queued -= 1
        self._in_flight += 1
        try:
            yield
        finally:
            self._in_flight -= 1
            self._slots.release()

    def server_stats(self) -> dict:
        return {"in_flight": self._in_flight, "queued": self._queued, "rejected": self._rejected}

    def stats(self) -> dict:
        """The engine's stats after its latest step (a snapshot; safe from any thread)."""
        return self._stats

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    # ---- requests (event-loop side) ------------------------------------------------------
    async def add(self, request_id: str, prompt: ProcessedPrompt, params: SamplingParams,
                  preprocess_seconds: float = 0.0) -> RequestHandle:  # fmt: skip
        """Queue a request in the engine; raises the engine's InvalidInputError for a bad prompt."""
        if not self.is_alive():
            raise EngineDeadError("the engine thread has stopped; restart the server")
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        added: concurrent.futures.Future = concurrent.futures.Future()
        self._commands.put(("add", request_id, prompt, params, preprocess_seconds, stream, added))
        try:
            await asyncio.wrap_future(added)
        except asyncio.CancelledError:
            self._commands.put(("abort", request_id))  # after the add, so the engine sees them in order
            raise
        return RequestHandle(self, request_id, stream)

    def shutdown(self) -> None:
        self._stop.set()
        self._commands.put(("wake",))
        self._thread.join(timeout=10)

    # ---- the engine thread ---------------------------------------------------------------
    def _run(self) -> None:
        engine = self.engine
        while not self._stop.is_set():
            if not engine.has_unfinished_requests():  # idle: block until a command arrives
                try:
                    self._handle(self._commands.get(timeout=_IDLE_POLL))
                except queue.Empty:
                    continue
            self._drain()
            if not engine.has_unfinished_requests():
                self._stats = engine.stats()
                continue
            try:
                outputs = engine.step()
            except Exception:  # a bug, not bad input: fail the requests in flight, keep serving
                log.exception("engine step failed; aborting the requests in flight")
                self._fail_all(EngineStepError("the engine failed while running this request (see server log)"))
                continue
            for out in outputs:
                stream = self._streams.get(out.request_id)
                if stream is not None:
                    stream.put(out)
                    if out.finished:
                        del self._streams[out.request_id]
            self._stats = engine.stats()
            if not engine.ran_last_step:
                time.sleep(0.001)  # nothing schedulable (e.g. waiting for blocks): do not spin

    def _drain(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            self._handle(command)

    def _handle(self, command: tuple) -> None:
        kind = command[0]
        if kind == "add":
            _, request_id, prompt, params, prep, stream, added = command
            try:
                self.engine.add_request(request_id, prompt, params, preprocess_seconds=prep)
            except Exception as exc:  # InvalidInputError for a bad prompt; anything else is reported too
                added.set_exception(exc)
                return
            self._streams[request_id] = stream
            added.set_result(None)
        elif kind == "abort":
            self.engine.abort(command[1])
            self._streams.pop(command[1], None)
            self._stats = self.engine.stats()

    def _fail_all(self, exc: BaseException) -> None:
        for request_id, stream in list(self._streams.items()):
            self.engine.abort(request_id)
            stream.put(exc)
        self._streams.clear()
        self._stats = self.engine.stats()
