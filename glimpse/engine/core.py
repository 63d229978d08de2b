"""Step 4 for the server, the engine core: one loop that drives an `LLMEngine`, in its own process or a thread.

The loop drains commands, runs `engine.step()`, sends the outputs and, once no request is left,
blocks on its command source (an idle core sleeps in a read, it does not poll). Commands and
messages are tuples of plain picklable data, so the same loop runs in `glimpse serve`'s
engine-core process (`run_core_process`, two pipes; an image's pixels travel inside the message,
a long video's in shared memory) and in its in-thread mode (a queue):

  to the core:   ("add", request_id, ProcessedPrompt, SamplingParams, preprocess_seconds, pending)
                 ("abort", request_id)  ("shutdown",)
  from the core: ("ready", CoreInfo)  ("added", request_id, ErrorInfo | None)
                 ("outputs", [RequestOutput], stats | None)  ("failed", [request_id], message)
                 ("stats", stats)  ("fatal", ErrorInfo)

An add's `pending` counts the requests the API process has admitted and not yet added (parsing,
fetching, preprocessing): a core that was idle waits for them, up to GATHER_SECONDS, before its first
step, so that a burst's first arrival is not prefilled alone while the API process is still busy
with the rest (on a machine whose cores both processes share, that step ran 2-3x slower than alone).
A structured-output request's ("added", ...) is sent once its grammar has compiled (or failed: the
error then goes back as the add's answer, a 400), while the loop keeps stepping the others.
RequestOutputs travel with an empty `prompt_token_ids`: the API process sent the prompt and
puts its own list back, so a long prompt is not pickled again at every step. For the same reason a
request's outputs before its last carry only what is new (`LLMEngine.delta_outputs`: delta_text,
delta_token_ids, delta_logprobs; text and token_ids empty, logprobs None) and its last carries the
whole completion: the cost of a step's outputs does not grow with the tokens generated so far.
Detokenization stays in the core: stop strings are matched on the text, and a sequence that hits
one must end inside the step that produced it, so its KV blocks are freed at once and no token
past the stop is computed or sent.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Protocol

from glimpse import errors
from glimpse.config import ModelConfig
from glimpse.engine.llm_engine import EngineConfig, LLMEngine
from glimpse.errors import GlimpseError, InvalidInputError, RankDiedError

log = logging.getLogger("glimpse.engine")

# A busy core sends a stats snapshot with its outputs at most this often (seconds); an idle one
# sends one whenever the snapshot changed, before it blocks.
STATS_INTERVAL = 0.1
# How long an idle core that got an add waits for the requests the API process says are on their way
# (seconds, from that first add): a burst of 16 image chats takes the API process ~60 ms to hand over
# (docs/benchmarks.md, session 13); a request stuck in a slow fetch delays the others' start by no more.
GATHER_SECONDS = 0.1


@dataclass(frozen=True)
class ErrorInfo:
    """An exception as plain data: it crosses the process boundary whatever its constructor takes."""

    type_name: str
    message: str

    @classmethod
    def of(cls, exc: BaseException) -> ErrorInfo:
        return cls(type(exc).__name__, str(exc))

    def rebuild(self) -> GlimpseError | None:
        """glimpse's own errors (glimpse/errors.py) come back as their class with their message; None otherwise."""
        kind = getattr(errors, self.type_name, None)
        if isinstance(kind, type) and issubclass(kind, GlimpseError):
            return kind(self.message)
        return None

    def __str__(self) -> str:
        return f"{self.type_name}: {self.message}"


@dataclass(frozen=True)
class CoreInfo:
    """What the API process reads from the engine, sent once when the model is loaded."""

    config: EngineConfig
    max_model_len: int
    model_config: ModelConfig
    stats: dict


def core_info(engine: LLMEngine) -> CoreInfo:
    return CoreInfo(engine.config, engine.max_model_len, engine.model_config, engine.stats())


class CommandSource(Protocol):
    def get(self, block: bool, timeout: float | None = None) -> tuple | None:
        """The next command; None when `block` is False and none is waiting, or none came within `timeout` s."""


class QueueCommands:
    """Commands from threads of the same process (the in-thread mode)."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue = queue.SimpleQueue()

    def put(self, command: tuple) -> None:
        self._queue.put(command)

    def get(self, block: bool, timeout: float | None = None) -> tuple | None:
        try:
            return self._queue.get(block, timeout)
        except queue.Empty:
            return None


class PipeCommands:
    """Commands from the API process. End of file means the API process is gone (exited or
    killed: the OS closes its end), so the core shuts down rather than outlive it."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    def get(self, block: bool, timeout: float | None = None) -> tuple | None:
        try:
            if not block:
                timeout = 0
            if timeout is not None and not self._conn.poll(timeout):
                return None
            return self._conn.recv()
        except (EOFError, ConnectionResetError):
            return ("shutdown",)


class EngineCore:
    """Runs `engine` on commands from a `CommandSource`, handing every message to `send`."""

    def __init__(self, engine: LLMEngine, send: Callable[[tuple], None]) -> None:
        self.engine, self.send = engine, send
        self._live: set[str] = set()  # requests added and not yet finished, failed or aborted
        self._sent_stats: dict | None = None
        self._stats_due = 0.0
        self._pending = 0  # requests the API process had admitted but not added, as of its latest add

    def run(self, commands: CommandSource) -> None:
        """Serve until a ("shutdown",) command (or the end of the command source)."""
        engine = self.engine
        saved, engine.delta_outputs = engine.delta_outputs, True  # outputs before a request's last: what is new
        try:
            self._serve(commands)
        finally:
            engine.delta_outputs = saved  # an engine lent to an in-thread core (tests) gets its own outputs back

    def _serve(self, commands: CommandSource) -> None:
        engine = self.engine
        while True:
            if not engine.has_unfinished_requests():
                self._send_stats_if_changed()
                self._pending = 0
                if not self._handle(commands.get(block=True)) or not self._gather(commands):
                    return
            while (command := commands.get(block=False)) is not None:
                if not self._handle(command):
                    return
            if engine.has_unfinished_requests():
                self._step()
                self._send_grammar_events()

    def _gather(self, commands: CommandSource) -> bool:
        """After an idle core's first command: take the adds the API process said were coming, for up to
        GATHER_SECONDS; False for shutdown."""
        deadline = time.monotonic() + GATHER_SECONDS
        while self._pending > 0 and (left := deadline - time.monotonic()) > 0:
            command = commands.get(block=True, timeout=left)
            if command is None:
                break
            if not self._handle(command):
                return False
        return True

    def _send_grammar_events(self) -> None:
        """Answer the adds of requests whose grammar compiled (admitted) or failed (the error, a 400)."""
        for request_id, error in self.engine.take_grammar_events():
            if error is not None:
                self._live.discard(request_id)
            self.send(("added", request_id, None if error is None else ErrorInfo.of(error)))

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except RankDiedError:  # no step can run any more: the core stops, and the server answers 503
            raise
        except Exception:  # a bug, not bad input: fail the requests in flight, keep serving
            log.exception("engine step failed; aborting the requests in flight")
            self._fail_all("the engine failed while running this request (see server log)")
            return
        for out in outputs:
            out.prompt_token_ids = []
            if out.finished:
                self._live.discard(out.request_id)
        now = time.monotonic()
        stats = None
        if now >= self._stats_due:
            stats = self._sent_stats = self.engine.stats()
            self._stats_due = now + STATS_INTERVAL
        if outputs or stats is not None:
            self.send(("outputs", outputs, stats))
        if not self.engine.ran_last_step:
            time.sleep(0.001)  # requests wait but nothing was schedulable (e.g. no free blocks): do not spin

    def _handle(self, command: tuple) -> bool:
        """Apply one command; False for shutdown."""
        kind = command[0]
        if kind == "add":
            _, request_id, prompt, params, preprocess_seconds, self._pending = command
            try:
                self.engine.add_request(request_id, prompt, params, preprocess_seconds=preprocess_seconds)
            except Exception as exc:  # InvalidInputError for a bad prompt; anything else is a bug, logged
                if not isinstance(exc, InvalidInputError):
                    log.exception("adding request %s failed", request_id)
                self.send(("added", request_id, ErrorInfo.of(exc)))
                return True
            self._live.add(request_id)
            if not self.engine.waiting_for_grammar(request_id):
                self.send(("added", request_id, None))
        elif kind == "abort":
            # An abort that crossed its request's final output finds nothing to do.
            self._live.discard(command[1])
            self.engine.abort(command[1])
        elif kind == "shutdown":
            return False
        else:
            raise ValueError(f"unknown engine-core command {kind!r}")
        return True

    def _fail_all(self, message: str) -> None:
        failed = sorted(self._live)
        for request_id in failed:
            if self.engine.waiting_for_grammar(request_id):  # its add is not answered yet: answer it with the failure
                self.send(("added", request_id, ErrorInfo("EngineStepError", message)))
            self.engine.abort(request_id)
        self._live.clear()
        self.send(("failed", failed, message))

    def _send_stats_if_changed(self) -> None:
        stats = self.engine.stats()
        if stats != self._sent_stats:
            self._sent_stats = stats
            self.send(("stats", stats))


def run_core_process(config: EngineConfig, commands: Connection, outputs: Connection, log_level: str) -> None:
    """The engine-core process: load the model, send ("ready", CoreInfo) or ("fatal", ErrorInfo), serve."""
    # Ctrl-C reaches the whole process group, and a service manager's SIGTERM may too (systemd's default
    # KillMode): the API process decides when the core stops, after draining (glimpse/server/app.py). If the
    # API process dies instead, the core still ends: its command pipe reaches end of file.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        engine = LLMEngine(config)
    except Exception as exc:
        if not isinstance(exc, GlimpseError):  # a bug, not a bad flag or checkpoint: keep the traceback
            log.exception("the engine core failed to start")
        outputs.send(("fatal", ErrorInfo.of(exc)))
        return
    try:
        outputs.send(("ready", core_info(engine)))
        EngineCore(engine, outputs.send).run(PipeCommands(commands))
    except (BrokenPipeError, ConnectionResetError):  # the API process is gone: nobody to serve
        return
    except Exception as exc:
        log.exception("the engine core stopped")
        with contextlib.suppress(OSError):
            outputs.send(("fatal", ErrorInfo.of(exc)))
        raise SystemExit(1) from None
    finally:
        engine.close()  # its tensor-parallel ranks, before this process exits (which would wait for them)
