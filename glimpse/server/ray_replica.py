"""Step 4 on Ray Serve, the replica side of `glimpse serve-ray`: the engine replicas and the affinity router.

`EngineReplica` is the Serve deployment: one `LLMEngine` driven by the `EngineCore` loop of
glimpse/engine/core.py through an `AsyncEngine` (a thread of the replica, or with --engine-process its
own child process). `generate(request_id, ProcessedPrompt, SamplingParams, preprocess_seconds,
affinity=keys)` streams plain tuples (kind, replica, value): ("added", replica, None) once the engine
took the request, then ("outputs", replica, RequestOutput) per step (prompt ids left out, as the core
sends them), or ("error", replica, ErrorInfo) in place of either. `AffinityRouter` plugs into Serve's
request-router extension point: a request goes to the replica that owns one of its affinity keys
(media content hashes, then a prompt-prefix hash), else to the least-loaded replica. `row()` is a
replica's counters, which the ingress collects from every replica at once (`handle.broadcast`) for
/health and /metrics.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import OrderedDict
from collections.abc import AsyncIterator

import ray
from ray import serve
from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from glimpse.engine.core import CoreInfo, ErrorInfo
from glimpse.engine.llm_engine import EngineConfig, LLMEngine
from glimpse.engine.sampling_params import SamplingParams
from glimpse.errors import GlimpseError
from glimpse.processing.inputs import ProcessedPrompt
from glimpse.server.async_engine import AsyncEngine

log = logging.getLogger("glimpse.server")

MAX_AFFINITY_KEYS = 100_000  # keys the router remembers (least recently used dropped first)


def affinity_keys(prompt: ProcessedPrompt, block_size: int, prefix_blocks: int) -> tuple[str, ...]:
    """The keys a replica's caches are found by: every media item's content hash (its encoder-cache key), then,
    for a prompt of at least `prefix_blocks` KV blocks, a hash of those blocks' token ids and of the media in them
    (placeholder ids are the same for every image, so the media hashes keep two images' prefixes apart)."""
    keys = [f"media:{m.content_hash}" for m in prompt.media]
    n = block_size * prefix_blocks
    if prefix_blocks > 0 and len(prompt.input_ids) >= n:
        h = hashlib.sha256(",".join(map(str, prompt.input_ids[:n])).encode())
        for m in prompt.media:
            if m.start < n:
                h.update(m.content_hash.encode())
        keys.append("prefix:" + h.hexdigest()[:32])
    return tuple(keys)


# ---- the router (runs inside the ingress's deployment handle) -------------------------------------
class AffinityRouter(RequestRouter):
    """A request goes to the replica that owns one of its affinity keys (first key with a live owner wins) unless
    that replica has more than `max_imbalance` requests more than the least-loaded one; otherwise to the least
    loaded (Serve's queue lengths; ties: the replica owning fewest keys, so new media spread evenly). The keys of
    a routed request become its replica's if they had no live owner. Replicas come and go with Serve's own
    bookkeeping (autoscaling, restarts); a departed replica's keys are forgotten. A retried request avoids the
    replicas that lost it (one whose engine core died lives on until Serve's health check replaces it)."""

    def __init__(self, *args, **kwargs) -> None:
        self._owner: OrderedDict[str, ReplicaID] = OrderedDict()  # affinity key -> replica, least recent first
        self._owned: dict[ReplicaID, int] = {}  # replica -> keys it owns
        self._max_imbalance = 8
        super().__init__(*args, **kwargs)

    def initialize_state(self, max_imbalance: int = 8) -> None:
        """Serve passes RequestRouterConfig.request_router_kwargs here."""
        self._max_imbalance = max_imbalance

    def _load(self, replica: RunningReplica) -> int:
        return self.replica_queue_len_cache.get(replica.replica_id) or 0

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:  # fmt: skip
        if pending_request is not None:
            # Sleep between rounds when every rank is full, rather than spin (Serve's rule for custom ranks).
            pending_request.routing_context.should_backoff = True
        ranked = sorted(candidate_replicas, key=lambda r: (self._load(r), self._owned.get(r.replica_id, 0),
                                                           r.replica_id.unique_id))  # fmt: skip
        if pending_request is None or not ranked:
            return [ranked]
        avoid = set(pending_request.kwargs.get("avoid") or ())  # replicas that lost this request already
        if avoid and any(r.replica_id.unique_id not in avoid for r in ranked):
            ranked = [r for r in ranked if r.replica_id.unique_id not in avoid]
        by_id = {r.replica_id: r for r in ranked}
        for key in pending_request.kwargs.get("affinity") or ():
            owner = self._owner.get(key)
            if owner in by_id:
                self._owner.move_to_end(key)
                if self._load(by_id[owner]) - self._load(ranked[0]) > self._max_imbalance:
                    break  # a hot item: spill to the least loaded, the owner keeps the key
                return [[by_id[owner]], *([r] for r in ranked if r.replica_id != owner)]
        return [[r] for r in ranked]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        for key in pending_request.kwargs.get("affinity") or ():
            owner = self._owner.get(key)
            if owner is None or owner not in self.curr_replicas:
                self._set_owner(key, replica_id)
        while len(self._owner) > MAX_AFFINITY_KEYS:
            _, owner = self._owner.popitem(last=False)
            self._owned[owner] = self._owned.get(owner, 1) - 1

    def _set_owner(self, key: str, replica_id: ReplicaID) -> None:
        old = self._owner.pop(key, None)
        if old is not None:
            self._owned[old] = self._owned.get(old, 1) - 1
        self._owner[key] = replica_id
        self._owned[replica_id] = self._owned.get(replica_id, 0) + 1

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        self._forget(set(self._owned) - set(self.curr_replicas))

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._forget({replica_id})

    def _forget(self, gone: set[ReplicaID]) -> None:
        if not gone:
            return
        self._owner = OrderedDict((k, r) for k, r in self._owner.items() if r not in gone)
        for replica_id in gone:
            self._owned.pop(replica_id, None)


# ---- the replica ----------------------------------------------------------------------------------
class EngineReplica:
    """One engine replica. A start-up failure is kept, not raised, so that `ready()` hands it to the ingress as the
    engine core's own ("fatal", ErrorInfo) would (Serve would retry a raising constructor and bury the message)."""

    def __init__(self, config: EngineConfig, engine_process: bool, max_concurrent: int, log_level: str) -> None:
        logging.basicConfig(level=log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
        self.replica = serve.get_replica_context().replica_tag
        self.served = 0  # requests that ran to their end here
        self.engine: AsyncEngine | None = None
        self.start_error: ErrorInfo | None = None
        try:
            if engine_process:
                self.engine = AsyncEngine.in_process(config, max_concurrent, 0, log_level)
            else:
                self.engine = AsyncEngine.in_thread(LLMEngine(config), max_concurrent, 0)
        except Exception as exc:
            if not isinstance(exc, GlimpseError):  # a bug, not a bad flag or checkpoint: keep the traceback
                log.exception("the engine replica failed to start")
            self.start_error = ErrorInfo.of(exc)

    def ready(self) -> tuple:
        """("ready", CoreInfo) or ("fatal", ErrorInfo), the engine core's start-up answer."""
        if self.engine is None:
            return ("fatal", self.start_error)
        e = self.engine
        return ("ready", CoreInfo(e.config, e.max_model_len, e.model_config, e.stats()))

    def check_health(self) -> None:
        """Serve replaces a replica whose engine core has stopped."""
        if self.engine is not None and not self.engine.is_alive():
            raise RuntimeError(self.engine.stop_reason)

    async def generate(self, request_id: str, prompt: ProcessedPrompt, params: SamplingParams,
                       preprocess_seconds: float = 0.0, affinity: tuple[str, ...] = (),
                       avoid: tuple[str, ...] = ()) -> AsyncIterator[tuple]:  # fmt: skip
        """`affinity` and `avoid` are read by the router only."""
        if self.engine is None:
            yield ("error", self.replica, self.start_error)
            return
        try:
            handle = await self.engine.add(request_id, prompt, params, preprocess_seconds)
        except Exception as exc:  # InvalidInputError (a 400), EngineDeadError (tried on another replica), ...
            yield ("error", self.replica, ErrorInfo.of(exc))
            return
        try:
            yield ("added", self.replica, None)
            async for out in handle.outputs():
                out.prompt_token_ids = []  # the ingress holds them
                yield ("outputs", self.replica, out)
            self.served += 1
        except Exception as exc:  # EngineDeadError, EngineStepError: the ingress decides (retry, 503, 500)
            yield ("error", self.replica, ErrorInfo.of(exc))
        finally:  # also when the ingress cancels the call (client gone, timeout, shutdown)
            handle.abort()  # a no-op once finished; otherwise frees its KV blocks

    def row(self) -> dict:
        e = self.engine
        return {"replica": self.replica, "pid": os.getpid(), "node": ray.get_runtime_context().get_node_id(),
                "core_pid": e.core_pid if e else None, "served": self.served, "alive": bool(e and e.is_alive()),
                **(e.stats() if e else {})}  # fmt: skip

    def __del__(self) -> None:  # Serve's graceful stop (scale-down, shutdown): after in-flight requests drained
        if getattr(self, "engine", None) is not None:
            self.engine.shutdown()
