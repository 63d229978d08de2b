"""Step 4 on Ray Serve, the ingress side of `glimpse serve-ray`: glimpse's own HTTP app over engine replicas.

`RayEngine` is an `AsyncEngine` whose engine core is a Ray Serve deployment of `EngineReplica`
(glimpse/server/ray_replica.py): the API process keeps HTTP, media fetching and preprocessing as in
`glimpse serve`, and each engine request becomes one streaming call to a replica. A request that got
no token before its replica died is tried on another replica (at most REPLICA_RETRIES more); one that
did gets EngineDeadError (a stream: an error event and [DONE]; otherwise a 503). `RayIngress` sits
inside `Guard`: it names the replica in each response's `x-glimpse-replica` header and answers /health
and /ping with every replica's counters; `ReplicaCollector` adds them to /metrics with a `replica` label.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import json
import logging
from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from ray.exceptions import ActorUnavailableError, RayActorError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from glimpse.engine.core import CoreInfo, ErrorInfo
from glimpse.engine.sampling_params import SamplingParams
from glimpse.processing.inputs import ProcessedPrompt
from glimpse.server.async_engine import AsyncEngine, EngineDeadError, EngineStepError
from glimpse.server.ray_replica import affinity_keys

log = logging.getLogger("glimpse.server")

REPLICA_RETRIES = 2  # other replicas a request that got no token is tried on when its replica dies
ROWS_TIMEOUT = 2.0  # seconds /health and /metrics wait for the replicas' counters

# Which replica took each engine request of the HTTP request being served: a dict set per HTTP request by
# RayIngress and filled by RayEngine (tasks started inside the request share the dict through their context).
_SERVED_BY: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar("glimpse_served_by", default=None)


class _ReplicaLost(Exception):
    """The replica's engine core stopped before this request got a token."""


class RayEngine(AsyncEngine):
    """The engine client of `glimpse serve-ray`.

    The seam is AsyncEngine's transport and nothing more: `_submit(command)` receives the engine core's own
    commands (("add", id, ProcessedPrompt, SamplingParams, preprocess_s, pending), ("abort", id);
    glimpse/engine/core.py; a replica's own core has no burst of this process to wait for: `pending` stays here)
    and `_on_message` takes its messages (("added", id, error), ("outputs", [RequestOutput], stats)). Here an
    add is a streaming call to the replica Serve's router picks, so admission (--max-concurrent-requests,
    --max-queue), the per-request streams, the shutdown drain and each error's HTTP status stay AsyncEngine's
    and glimpse/server/app.py serves this engine unchanged."""

    def __init__(self, handle, info: CoreInfo, max_concurrent: int, max_queue: int, prefix_blocks: int,
                 close: Callable[[], None]) -> None:  # fmt: skip
        super().__init__(info, max_concurrent, max_queue)
        self._handle = handle
        self._generate = handle.options(stream=True).generate
        self._prefix_blocks = prefix_blocks
        self._tasks: dict[str, asyncio.Task] = {}
        self.replica_rows: list[dict] = []  # every live replica's counters, as of the last refresh()
        self._submit, self._close = self._send, close

    # ---- the transport (event-loop side) -------------------------------------------------
    def _send(self, command: tuple) -> None:
        if command[0] == "add":
            _, request_id, prompt, params, prep, _pending = command
            # A fresh prompt: no cached HF view (a concatenated copy of the pixels) travels to the replica.
            prompt = ProcessedPrompt(prompt.input_ids, prompt.media, prompt.text)
            task = asyncio.get_running_loop().create_task(self._run(request_id, prompt, params, prep,
                                                                    _SERVED_BY.get()))  # fmt: skip
            self._tasks[request_id] = task
            task.add_done_callback(lambda _: self._tasks.pop(request_id, None))
        elif command[0] == "abort":
            task = self._tasks.get(command[1])
            if task is not None:
                task.cancel()  # cancels the replica call, whose generator then aborts the request there

    async def _run(self, request_id: str, prompt: ProcessedPrompt, params: SamplingParams, prep: float,
                   served_by: dict[str, str] | None) -> None:  # fmt: skip
        keys = affinity_keys(prompt, self.config.block_size, self._prefix_blocks)
        lost: list[str] = []
        started = False  # a token reached this side: the request can no longer be replayed unseen
        for _ in range(1 + REPLICA_RETRIES):
            call = self._generate.remote(request_id, prompt, params, prep, affinity=keys, avoid=tuple(lost))
            replica = "(not known yet)"
            try:
                async for kind, replica, value in call:
                    if kind == "added":
                        if served_by is not None:
                            served_by[request_id] = replica
                        self._on_message(("added", request_id, None))  # a no-op after a retry
                    elif kind == "outputs":
                        started = started or any(c.delta_token_ids or c.token_ids for c in value.outputs)
                        self._on_message(("outputs", [value], None))
                    elif not started and value.type_name in ("EngineDeadError", "ServerShuttingDownError"):
                        raise _ReplicaLost(value.message)
                    else:
                        self._fail(request_id, replica, value)
                        return
                self._end(request_id, EngineStepError(f"engine replica {replica} ended this request without its last "
                                                      "output"))  # fmt: skip
                return
            except asyncio.CancelledError:
                call.cancel()
                raise
            except (RayActorError, ActorUnavailableError, _ReplicaLost) as exc:
                if started:
                    self._end(request_id, EngineDeadError(
                        f"engine replica {replica} stopped ({type(exc).__name__}) while this request was running, "
                        "after its first tokens were sent; retry the request"))  # fmt: skip
                    return
                lost.append(replica)
                log.warning("engine replica %s stopped (%s) before request %s got a token; trying another", replica,
                            type(exc).__name__, request_id)  # fmt: skip
            except Exception:
                log.exception("the call to engine replica %s failed for request %s", replica, request_id)
                self._end(request_id, EngineStepError("the engine replica failed while running this request "
                                                      "(see server log)"))  # fmt: skip
                return
        self._end(request_id, EngineDeadError(f"the engine replicas that took this request stopped before it got a "
                                              f"token ({', '.join(lost)}); retry the request"))  # fmt: skip

    def _fail(self, request_id: str, replica: str, error: ErrorInfo) -> None:
        """A replica's error, as the engine core's would be: before the add was answered it is the add's answer
        (InvalidInputError: 400), after it an EngineStepError (500) or, for a dead engine, EngineDeadError (503)."""
        if request_id in self._adding:
            self._on_message(("added", request_id, error))
        elif error.type_name == "EngineDeadError":  # the core's words end "restart the server": Serve does that here
            why = error.message.removesuffix("; restart the server")
            self._end(request_id, EngineDeadError(f"engine replica {replica}: {why}, after this request's first "
                                                  "tokens were sent; Ray Serve replaces the replica; retry the "
                                                  "request"))  # fmt: skip
        else:
            self._on_message(("failed", [request_id], error.message))

    def _end(self, request_id: str, exc: Exception) -> None:
        """End one request with `exc`, whether or not its add was answered (a no-op once it has finished)."""
        with self._lock:
            stream = self._streams.pop(request_id, None)
            added = self._adding.pop(request_id, None)
        if added is not None:
            with contextlib.suppress(concurrent.futures.InvalidStateError):
                added.set_exception(exc)
        if stream is not None:
            stream.put(exc)

    # ---- the replicas' counters ----------------------------------------------------------
    async def refresh(self) -> None:
        """Every live replica's counters, asked of all at once (ROWS_TIMEOUT s at most); `stats()` sums them."""
        try:
            rows = await self._handle.broadcast("row").results_async(timeout_s=ROWS_TIMEOUT, return_exceptions=True)
        except TimeoutError:
            log.warning("the engine replicas did not report their counters within %g s", ROWS_TIMEOUT)
            return
        rows = sorted((r for r in rows if isinstance(r, dict)), key=lambda r: r["replica"])
        self.replica_rows = rows
        engines = [r for r in rows if "running" in r]
        if engines:
            total = {k: sum(r[k] for r in engines) for k in engines[0] if k in self._stats}
            total["kv_usage"] = total["kv_blocks_used"] / max(1, total["kv_blocks_total"])
            self._stats = {**self._stats, **total}


class RayIngress:
    """Inside Guard (the Host check comes first): each response names the replica(s) that ran its engine requests in
    `x-glimpse-replica` (a stream: the replica that took it; retried elsewhere, the stream keeps that name), and
    GET /health and /ping list the replicas: 200 while the server takes requests and a replica is alive, else 503."""

    def __init__(self, app: ASGIApp, engine: RayEngine) -> None:
        self.app, self.engine = app, engine

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope["path"] in ("/health", "/ping"):
            await self._health(scope, receive, send)
            return
        if scope["path"] == "/metrics":
            await self.engine.refresh()
        served_by: dict[str, str] = {}
        token = _SERVED_BY.set(served_by)

        async def naming_send(message: Message) -> None:
            if message["type"] == "http.response.start" and served_by:
                names = ",".join(dict.fromkeys(served_by.values()))
                message = {**message, "headers": [*message.get("headers", ()), (b"x-glimpse-replica", names.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, naming_send)
        finally:
            _SERVED_BY.reset(token)

    async def _health(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] not in ("GET", "HEAD") and not (scope["path"] == "/ping" and scope["method"] == "POST"):
            await self.app(scope, receive, send)  # the app's own 405
            return
        await self.engine.refresh()
        rows = self.engine.replica_rows
        alive = sum(bool(r.get("alive")) for r in rows)
        if not self.engine.accepting():
            status, code = "shutting down", 503
        elif not alive:
            status, code = "no engine replica is running (Ray Serve restarts failed ones)", 503
        else:
            status, code = "ok", 200
        body = json.dumps({"status": status, "replicas_alive": alive, "replicas": rows}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": code, "headers": headers})
        await send({"type": "http.response.body", "body": body if scope["method"] != "HEAD" else b""})


class ReplicaCollector(Collector):
    """/metrics per engine replica (label `replica`), from the counters RayIngress fetched for this scrape."""

    COUNTERS = {"served": "requests that ran to their end on the replica",
                "encoder_cache_hits": "media items found in the replica's encoder cache",
                "encoder_cache_lookups": "media items looked up in the replica's encoder cache",
                "prefix_cache_hits": "prompt tokens found in the replica's prefix cache"}  # fmt: skip
    GAUGES = {"running": "sequences the replica's engine is running", "waiting": "sequences queued in its scheduler"}

    def __init__(self, engine: RayEngine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        rows = self.engine.replica_rows
        for kinds, family in ((self.COUNTERS, CounterMetricFamily), (self.GAUGES, GaugeMetricFamily)):
            for key, doc in kinds.items():
                name = "requests_served" if key == "served" else key
                metric = family(f"glimpse_replica_{name}", doc, labels=["replica"])
                for row in rows:
                    if key in row:
                        metric.add_metric([row["replica"]], float(row[key]))
                yield metric


def wrap_app(state, app):
    """`glimpse serve`'s app (a Guard) with RayIngress inside its Host check, and the per-replica metrics."""
    engine: RayEngine = state.engine
    app.app = RayIngress(app.app, engine)
    state.metrics.registry.register(ReplicaCollector(engine))
    return app

