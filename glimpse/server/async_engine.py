"""Step 4 for the server: the engine core (its own process, or a thread), an asyncio stream per request, and admission.

`AsyncEngine.in_process(config)` spawns the engine-core process (glimpse/engine/core.py) and waits
for its model to load; the API process keeps HTTP, media fetching and preprocessing, so the
decode loop no longer shares a GIL with them. `AsyncEngine.in_thread(engine)` runs the same core
loop in a thread (`--no-engine-process`; tests that need a hook into the engine use it).
`await add(request_id, prompt, params)` queues a request and returns a handle whose `outputs()`
yields `RequestOutput`s (one per engine step that gave it tokens, listing only the completions
that moved; the last has `finished=True` and all n); `handle.abort()` frees its KV blocks.
`admit()` bounds the requests being served: `max_concurrent` at once plus `max_queue` waiting for
a slot; beyond that it raises `ServerBusyError` (HTTP 429). If the core dies, every request in
flight gets `EngineDeadError` (HTTP 503) at once, and so does every new one. Shutting down (`Server` in
glimpse/server/app.py) is `refuse_new()` (new requests get `ServerShuttingDownError`, HTTP 503), `wait_idle()`
and, past --shutdown-timeout, `end_requests()` (those still in flight get it too).
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import contextvars
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.reduction import ForkingPickler

import torch
import torch.multiprocessing as mp

from glimpse.engine.core import CoreInfo, EngineCore, ErrorInfo, QueueCommands, core_info, run_core_process
from glimpse.engine.llm_engine import EngineConfig, LLMEngine, RequestOutput
from glimpse.engine.sampling_params import SamplingParams
from glimpse.errors import GlimpseError, InvalidInputError
from glimpse.processing.inputs import ProcessedPrompt

log = logging.getLogger("glimpse.server")

# The admission the running request is inside of: [True] until its first add (a box, so that the tasks a
# request starts, which copy the context, clear the same one).
_PREPARING: contextvars.ContextVar[list[bool] | None] = contextvars.ContextVar("glimpse_preparing", default=None)


class ServerBusyError(GlimpseError):
    """Every admission slot and queue place is taken (HTTP 429)."""


class EngineDeadError(GlimpseError):
    """The engine core stopped; the server cannot serve (HTTP 503)."""


class EngineStepError(GlimpseError):
    """An unexpected failure inside an engine step; the requests in it were aborted (HTTP 500)."""


class EngineStartError(GlimpseError):
    """The engine core could not load the model (the message is the core's own error)."""


class ServerShuttingDownError(GlimpseError):
    """The server is shutting down: it takes no new request, or ended this one at --shutdown-timeout (HTTP 503)."""


@dataclass(eq=False)
class _Stream:
    """Where one request's outputs (or an exception) are delivered, from the core's reader thread."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    prompt_token_ids: list[int]  # the core sends outputs without them (see glimpse/engine/core.py)

    def put(self, item: RequestOutput | BaseException) -> None:
        _deliver([(self, item)])


def _deliver(items: list[tuple[_Stream, RequestOutput | BaseException]]) -> None:
    """Hand items to their streams' event loops, with one wake-up per loop (from the core's reader thread: an
    engine step's outputs for every stream it moved, in one call; a wake-up costs the loop a system call)."""
    by_loop: dict[asyncio.AbstractEventLoop, list] = {}
    for stream, item in items:
        by_loop.setdefault(stream.loop, []).append((stream.queue, item))
    for loop, puts in by_loop.items():
        try:
            loop.call_soon_threadsafe(_put_all, puts)
        except RuntimeError:  # the event loop is closed (server shutting down): nobody is listening
            pass


def _put_all(puts: list[tuple[asyncio.Queue, RequestOutput | BaseException]]) -> None:
    for target, item in puts:
        target.put_nowait(item)


class RequestHandle:
    """One queued request: iterate `outputs()` (or `output_batches()`); `abort()` (idempotent) frees its KV
    blocks if still running."""

    def __init__(self, engine: AsyncEngine, request_id: str, stream: _Stream) -> None:
        self._engine, self.request_id, self._stream = engine, request_id, stream
        self.finished = False
        self._stopped = False  # the core has been told to abort it

    async def outputs(self) -> AsyncIterator[RequestOutput]:
        async for batch in self.output_batches():
            for out in batch:
                yield out

    async def output_batches(self) -> AsyncIterator[list[RequestOutput]]:
        """The outputs in order, every one already waiting taken together (a stream whose reader fell behind
        catches up in one go); an error ends the iteration after the outputs that came before it."""
        waiting = self._stream.queue
        while not self.finished:
            items = [await waiting.get()]
            while not waiting.empty():
                items.append(waiting.get_nowait())
            batch = []
            for item in items:
                if isinstance(item, BaseException):
                    self.finished = True  # the core already dropped it
                    if batch:
                        yield batch
                    raise item
                batch.append(item)
                self.finished = item.finished
                if self.finished:  # the core sends nothing after a request's final output
                    break
            yield batch

    def abort(self) -> None:
        if not self.finished:
            self.finished = True
            self._stop()

    def end_with(self, error: BaseException) -> None:
        """Stop the request in the core and end its `output_batches()` with `error` (event-loop side): the
        outputs already waiting come out first, and if the final output is among them the iteration ends with
        it, as if on time. A no-op once finished."""
        if not self.finished:
            self._stop()
            self._stream.queue.put_nowait(error)

    def _stop(self) -> None:
        if not self._stopped:
            self._stopped = True
            self._engine._abort(self.request_id)


class AsyncEngine:
    """The server's view of the engine core: admission, request streams, stats and liveness."""

    def __init__(self, info: CoreInfo, max_concurrent: int, max_queue: int) -> None:
        self.config: EngineConfig = info.config
        self.max_model_len: int = info.max_model_len
        self.model_config = info.model_config
        self.max_concurrent = max_concurrent
        self.max_queue = max_queue
        self.core_pid: int | None = None  # the engine-core process (None in the in-thread mode)
        self._stats = info.stats  # replaced (never mutated) by each snapshot the core sends
        self._lock = threading.Lock()  # guards the three below (event loop and reader thread)
        self._streams: dict[str, _Stream] = {}
        self._adding: dict[str, concurrent.futures.Future] = {}
        self._stopped: str | None = None  # why the core stopped, once it has
        self._refusing: str | None = None  # why new requests are refused (shutting down), once they are
        self._ended: str | None = None  # why the requests in flight were ended (shutdown timeout), once they were
        self._submit: Callable[[tuple], None] = lambda command: None  # set by the constructors
        self._close: Callable[[], None] = lambda: None
        self._slots: asyncio.Semaphore | None = None  # made lazily inside the server's event loop
        self._in_flight = 0
        self._queued = 0
        self._rejected = 0
        self._preparing = 0  # admitted requests that have not sent their first add (the core's `pending`)

    @classmethod
    def in_process(cls, config: EngineConfig, max_concurrent: int = 64, max_queue: int = 256,
                   log_level: str = "warning") -> AsyncEngine:  # fmt: skip
        """Spawn the engine-core process and wait for its model to load (EngineStartError if it cannot)."""
        core = _CoreProcess(config, log_level)
        self = cls(core.wait_ready(), max_concurrent, max_queue)
        self.core_pid = core.process.pid
        self._submit, self._close = core.submit, core.close
        core.serve(self._on_message, self._on_core_stopped)
        return self

    @classmethod
    def in_thread(cls, engine: LLMEngine, max_concurrent: int = 64, max_queue: int = 256) -> AsyncEngine:
        """Drive an already loaded engine from a thread of this process."""
        self = cls(core_info(engine), max_concurrent, max_queue)
        commands = QueueCommands()
        stopping = threading.Event()

        def run() -> None:
            reason = "the engine thread stopped"
            try:
                EngineCore(engine, self._on_message).run(commands)
            except BaseException as exc:
                log.exception("the engine thread stopped")
                reason = f"the engine thread stopped ({ErrorInfo.of(exc)}); restart the server"
            self._on_core_stopped(reason, expected=stopping.is_set())

        thread = threading.Thread(target=run, name="glimpse-engine", daemon=True)

        def close() -> None:
            stopping.set()
            commands.put(("shutdown",))
            thread.join(timeout=10)

        self._submit, self._close = commands.put, close
        thread.start()
        return self

    # ---- admission (event-loop side) -----------------------------------------------------
    @contextlib.asynccontextmanager
    async def admit(self) -> AsyncIterator[None]:
        """Hold one of `max_concurrent` slots for the body; wait in a queue of `max_queue` places."""
        self._check_alive()
        if self._refusing is not None:
            raise ServerShuttingDownError(self._refusing)
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
        self._preparing += 1
        preparing = [True]  # until this admission's first add (`_preparing_after_add`)
        _PREPARING.set(preparing)  # the request's own context (not reset: the exit may run in a copy of it)
        try:
            self._check_alive()  # the core may have stopped, or the requests been ended, while this one queued
            yield
        finally:
            if preparing[0]:
                self._preparing -= 1
            self._in_flight -= 1
            self._slots.release()

    def _preparing_after_add(self) -> int:
        """The admitted requests still to send an add, once the calling request's own add is counted out."""
        preparing = _PREPARING.get()
        if preparing is not None and preparing[0]:
            preparing[0] = False
            self._preparing -= 1
        return self._preparing

    def server_stats(self) -> dict:
        return {"in_flight": self._in_flight, "queued": self._queued, "rejected": self._rejected}

    def stats(self) -> dict:
        """The engine's stats as of the core's latest snapshot (safe from any thread)."""
        return self._stats

    def is_alive(self) -> bool:
        return self._stopped is None

    def accepting(self) -> bool:
        """False once the server refuses new requests (shutting down) or the core has stopped."""
        return self._stopped is None and self._refusing is None

    @property
    def stop_reason(self) -> str | None:
        """Why the core stopped (None while it runs)."""
        return self._stopped

    # ---- requests (event-loop side) ------------------------------------------------------
    async def add(self, request_id: str, prompt: ProcessedPrompt, params: SamplingParams,
                  preprocess_seconds: float = 0.0) -> RequestHandle:  # fmt: skip
        """Queue a request in the core; raises the engine's InvalidInputError for a bad prompt."""
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue(), prompt.input_ids)
        added: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            self._check_alive()
            # Registered before the core can answer: its outputs may arrive before this coroutine resumes.
            self._streams[request_id], self._adding[request_id] = stream, added
        self._submit(("add", request_id, prompt, params, preprocess_seconds, self._preparing_after_add()))
        try:
            error: ErrorInfo | None = await asyncio.wrap_future(added)
        except asyncio.CancelledError:
            self._abort(request_id)  # sent after the add, so the core sees them in order
            raise
        if error is not None:
            with self._lock:
                self._streams.pop(request_id, None)
            rebuilt = error.rebuild()
            if isinstance(rebuilt, InvalidInputError):
                raise rebuilt
            raise EngineStepError("the engine failed to add this request (see server log)")
        return RequestHandle(self, request_id, stream)

    def shutdown(self) -> None:
        """Stop the core (the process exits, the thread ends) and wait for it."""
        self._close()

    # ---- shutting down (event-loop side) -------------------------------------------------
    def refuse_new(self, reason: str) -> None:
        """From now on `admit()` raises ServerShuttingDownError(reason); requests admitted or queued carry on."""
        self._refusing = reason

    async def wait_idle(self) -> None:
        """Return once no request holds or waits for a slot (a stream holds its slot until its last event is out)."""
        while self._in_flight or self._queued:
            await asyncio.sleep(0.05)

    def end_requests(self, reason: str) -> None:
        """End every request in flight with ServerShuttingDownError(reason) and free its KV blocks in the core;
        one still preprocessing or queued gets the same error from `add()` or `admit()`."""
        error = ServerShuttingDownError(reason)
        with self._lock:
            self._ended = reason
            streams, self._streams = self._streams, {}
            adding, self._adding = self._adding, {}
            alive = self._stopped is None
        if alive:
            for request_id in {*streams, *adding}:
                self._submit(("abort", request_id))
        for stream in streams.values():
            stream.put(error)
        for added in adding.values():
            with contextlib.suppress(concurrent.futures.InvalidStateError):
                added.set_exception(error)

    def _abort(self, request_id: str) -> None:
        with self._lock:
            self._streams.pop(request_id, None)
            self._adding.pop(request_id, None)
            alive = self._stopped is None
        if alive:
            self._submit(("abort", request_id))

    def _check_alive(self) -> None:
        if self._stopped is not None:
            raise EngineDeadError(self._stopped)
        if self._ended is not None:
            raise ServerShuttingDownError(self._ended)

    # ---- the core's messages (reader or engine thread) -----------------------------------
    def _on_message(self, message: tuple) -> None:
        kind = message[0]
        if kind == "outputs":
            _, outputs, stats = message
            moved = []
            with self._lock:
                for out in outputs:
                    take = self._streams.pop if out.finished else self._streams.get
                    stream = take(out.request_id, None)
                    if stream is not None:  # None: aborted, and this news crossed the abort
                        out.prompt_token_ids = stream.prompt_token_ids
                        moved.append((stream, out))
                _deliver(moved)  # under the lock: an error end_requests() puts after it cannot overtake it
            if stats is not None:
                self._stats = stats
        elif kind == "added":
            _, request_id, error = message
            with self._lock:
                added = self._adding.pop(request_id, None)
            if added is not None:
                added.set_result(error)
        elif kind == "failed":
            _, request_ids, text = message
            with self._lock:
                streams = [self._streams.pop(r, None) for r in request_ids]
            for stream in streams:
                if stream is not None:
                    stream.put(EngineStepError(text))
        elif kind == "stats":
            self._stats = message[1]
        else:
            log.error("unexpected message from the engine core: %r", kind)

    def _on_core_stopped(self, reason: str, expected: bool) -> None:
        """Fail everything in flight with EngineDeadError; later requests get it from `admit()`/`add()`."""
        with self._lock:
            self._stopped = reason
            streams, self._streams = list(self._streams.values()), {}
            adding, self._adding = list(self._adding.values()), {}
        if not expected:
            log.error("%s; answering 503 from now on", reason)
        for stream in streams:
            stream.put(EngineDeadError(reason))
        for added in adding:
            with contextlib.suppress(concurrent.futures.InvalidStateError):
                added.set_exception(EngineDeadError(reason))


class _CoreProcess:
    """The engine-core process and the two threads that talk to it: a writer (pickling, and moving
    media pixels into the message, happen off the event loop, which never blocks on a full pipe)
    and a reader that hands the core's messages on and notices the pipe's end when the core dies."""

    def __init__(self, config: EngineConfig, log_level: str) -> None:
        ctx = mp.get_context("spawn")  # fork after torch has started threads is unsafe
        self._commands_out: queue.SimpleQueue = queue.SimpleQueue()
        command_reader, self._command_writer = ctx.Pipe(duplex=False)
        _widen_pipe(self._command_writer)  # an image's add in one write, not ten 64 KiB hand-offs
        self._output_reader, output_writer = ctx.Pipe(duplex=False)
        # Daemonic, so that it never outlives this process, except with tensor parallelism: a daemonic process may
        # not start processes, and the core starts the ranks (it still ends when its command pipe closes).
        self.process = ctx.Process(target=run_core_process, args=(config, command_reader, output_writer, log_level),
                                   name="glimpse-engine-core", daemon=config.tensor_parallel_size == 1)  # fmt: skip
        self.process.start()
        # Only the child holds these ends now, so each side sees end-of-file when the other dies.
        command_reader.close()
        output_writer.close()
        self._stopping = self._serving = False
        # If this process exits without close() (an unexpected error), multiprocessing's own exit hook would
        # SIGTERM the core, which ignores it, and wait for it forever: stop it first (hooks run last-in first).
        atexit.register(self._stop, 0)

    def wait_ready(self) -> CoreInfo:
        try:
            message = self._output_reader.recv()
        except (EOFError, OSError):
            message = None
        except BaseException:  # Ctrl-C while the model loads
            self._stop(grace=0)
            raise
        if message is not None and message[0] == "ready":
            return message[1]
        self._stop(grace=10)
        if message is not None and message[0] == "fatal":
            error: ErrorInfo = message[1]
            raise error.rebuild() or EngineStartError(f"the engine core failed to start: {error}")
        raise EngineStartError(f"the engine core failed to start: {_exit_description(self.process)}")

    def serve(self, on_message: Callable[[tuple], None], on_stopped: Callable[[str, bool], None]) -> None:
        self._serving = True
        threading.Thread(target=self._write, name="glimpse-core-writer", daemon=True).start()
        threading.Thread(target=self._read, args=(on_message, on_stopped), name="glimpse-core-reader",
                         daemon=True).start()  # fmt: skip

    def submit(self, command: tuple) -> None:
        self._commands_out.put(command)

    def close(self) -> None:
        self._stop(grace=10)

    def _stop(self, grace: float) -> None:
        """Ask the core to stop, wait up to `grace` s (then SIGKILL: the core ignores SIGTERM), and reap it."""
        if self.process.exitcode is not None:  # already stopped and reaped
            return
        self._stopping = True
        if self._serving:  # the writer thread owns the pipe
            self.submit(("shutdown",))
            self.submit(None)  # ends the writer thread
        else:
            with contextlib.suppress(OSError):
                self._command_writer.send(("shutdown",))
        for stop, wait in ((None, grace), (self.process.kill, 5)):
            if stop is not None:
                stop()
            self.process.join(timeout=wait)
            if not self.process.is_alive():
                break

    def _write(self) -> None:
        while (command := self._commands_out.get()) is not None:
            if command[0] == "add":  # a fresh prompt: no cached HF view (a concatenated copy of the pixels)
                _, request_id, prompt, params, prep, pending = command
                prompt = ProcessedPrompt(prompt.input_ids, prompt.media, prompt.text)
                command = ("add", request_id, prompt, params, prep, pending)
            try:
                self._command_writer.send_bytes(dumps_command(command))
            except (OSError, ValueError):  # the core is gone; the reader reports it
                return

    def _read(self, on_message: Callable[[tuple], None], on_stopped: Callable[[str, bool], None]) -> None:
        reason = None
        try:
            while True:
                message = self._output_reader.recv()
                if message[0] == "fatal":
                    reason = f"the engine core failed: {message[1]}"
                else:
                    on_message(message)
        except (EOFError, OSError):
            pass
        except Exception:  # a bug on this side: stop the core rather than leave requests waiting
            log.exception("reading the engine core's messages failed")
            reason = "the server stopped reading the engine core (see server log)"
            self.process.kill()
        self.process.join(timeout=5)
        if reason is None:
            reason = f"the engine core process (pid {self.process.pid}) {_exit_description(self.process)}"
        on_stopped(f"{reason}; restart the server", self._stopping)


def _exit_description(process) -> str:
    code = process.exitcode
    if code is None:
        return "stopped answering"
    if code < 0:
        return f"was killed by signal {-code}" + (" (SIGKILL: out of memory?)" if code == -9 else "")
    return f"exited with code {code}"


# A tensor up to this size crosses to the engine core inside the command's bytes; a larger one (a long video's
# pixels) through torch's shared memory, which costs a file, a copy and a descriptor handed over the API
# process's socket per tensor whatever its size. Served rounds of 224x224 images (602 KB in bf16): the core
# read an add in 2.3 ms shared, 0.62 ms inline (docs/benchmarks.md, session 13).
INLINE_TENSOR_BYTES = 8 << 20
# The command pipe's kernel buffer (Linux's default is 64 KiB, its unprivileged limit 1 MiB): a message larger
# than the buffer crosses in turns of the writer filling and the core draining it.
PIPE_BYTES = 1 << 20


class _CommandPickler(ForkingPickler):
    """multiprocessing's pickler (torch's shared-memory reductions for tensors) with small CPU tensors inline."""

    def reducer_override(self, obj):  # type: ignore[no-untyped-def]
        if type(obj) is torch.Tensor and obj.device.type == "cpu" and obj.nbytes <= INLINE_TENSOR_BYTES:
            raw = obj.detach().contiguous().view(-1).view(torch.uint8).numpy()
            return _inline_tensor, (raw, obj.dtype, tuple(obj.shape))
        return NotImplemented


def _inline_tensor(raw, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.from_numpy(raw).view(dtype).view(shape)


def _widen_pipe(conn: Connection) -> None:
    """Give a pipe connection `PIPE_BYTES` of kernel buffer where the OS allows it (Linux; best effort)."""
    with contextlib.suppress(ImportError, AttributeError, OSError):
        import fcntl

        fcntl.fcntl(conn.fileno(), fcntl.F_SETPIPE_SZ, PIPE_BYTES)


def dumps_command(command: tuple) -> memoryview:
    """A command as the bytes `Connection.recv()` on the core's side unpickles (pickle protocol 5: a
    writable buffer goes in as a bytearray, so the core's tensor is writable memory of its own)."""
    return _CommandPickler.dumps(command, 5)
