"""Step 4: the token-budget scheduler (no separate prefill and decode phases).

Each step gets `max_num_batched_tokens` tokens. Running requests are served first, in
arrival order: a decoding request takes one token, a prefilling one takes the rest of its
prompt or what is left of the budget (chunked prefill; a chunk may end inside an image).
Waiting requests are admitted while budget, sequence slots and KV blocks allow, after
matching their prefix against the cache. Vision encoding is scheduled with the tokens that
need it, within an encoder budget and the encoder cache's capacity: a chunk stops short of
an item that cannot be encoded this step. When KV blocks run out, the most recently
arrived running request is preempted and later recomputed from scratch.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from glimpse.engine.block_manager import BlockManager
from glimpse.engine.encoder_cache import EncoderCache
from glimpse.engine.request import Request, RequestStatus
from glimpse.processing.inputs import MediaItem


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 2048
    max_model_len: int = 8192
    encoder_budget: int = 4096  # vision embedding tokens encoded per step


@dataclass
class ScheduledBatch:
    """What one step computes: `num_new_tokens[i]` tokens of `requests[i]`, and media to encode first."""

    requests: list[Request] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    encode: list[MediaItem] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def total_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def __bool__(self) -> bool:
        return bool(self.requests)


class Scheduler:
    def __init__(self, config: SchedulerConfig, blocks: BlockManager, encoder_cache: EncoderCache,
                 embedding_bytes_per_token: int) -> None:  # fmt: skip
        self.config = config
        self.blocks = blocks
        self.encoder_cache = encoder_cache
        self.embedding_bytes_per_token = embedding_bytes_per_token
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.pinned: dict[str, set[str]] = {}  # request id -> media keys it pins

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    # ---- scheduling ---------------------------------------------------------------------
    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.config.max_num_batched_tokens
        encoding: dict[str, MediaItem] = {}

        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = self._fit(req, min(req.num_tokens - req.num_computed_tokens, budget), encoding, batch)
            if n == 0:
                i += 1
                continue
            while not self.blocks.allocate(req, n):
                victim = self.running[-1]
                budget += self._preempt(victim, batch)
                if victim is req:
                    break
            else:
                batch.requests.append(req)
                batch.num_new_tokens.append(n)
                budget -= n
                i += 1

        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs and not batch.preempted:
            req = self.waiting[0]
            if req.num_computed_tokens == 0 and not req.block_ids:
                req.num_computed_tokens = self.blocks.match_prefix(req)
                req.num_cached_prompt_tokens = min(req.num_computed_tokens, req.num_prompt_tokens)
            self._pin(req)
            n = self._fit(req, min(req.num_tokens - req.num_computed_tokens, budget), encoding, batch)
            if n == 0 or not self.blocks.allocate(req, n):
                break
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            batch.requests.append(req)
            batch.num_new_tokens.append(n)
            budget -= n
        batch.encode = list(encoding.values())
        return batch

    def _fit(self, req: Request, n: int, encoding: dict[str, MediaItem], batch: ScheduledBatch) -> int:
        """Shrink `n` so every media item the chunk touches has (or gets) its embeddings this step."""
        start = req.num_computed_tokens
        for item in req.media_in(start, start + n):
            key = item.content_hash
            if key in encoding or key in self.encoder_cache:
                continue
            scheduled = sum(m.num_encoded_tokens for m in encoding.values())
            nbytes = self.item_bytes(item)
            pending = sum(self.item_bytes(m) for m in encoding.values())
            fits_budget = scheduled + item.num_encoded_tokens <= self.config.encoder_budget or not encoding
            if fits_budget and self.encoder_cache.can_fit(pending + nbytes):
                encoding[key] = item
            else:
                return max(0, item.start - start)  # stop before this item; encode it in a later step
        return n

    def item_bytes(self, item: MediaItem) -> int:
        """Encoder-cache bytes of an item's embeddings; an EVS video also keeps its int64 kept indices."""
        return item.num_tokens * (self.embedding_bytes_per_token + (8 if item.pruning_rate else 0))

    def _pin(self, req: Request) -> None:
        keys = self.pinned.setdefault(req.request_id, set())
        for item in req.media:
            if item.end > req.num_computed_tokens and item.content_hash not in keys:
                self.encoder_cache.lookup(item.content_hash)  # hit-rate metric: once per admission
                keys.add(item.content_hash)
                self.encoder_cache.pin(item.content_hash)

    def _unpin(self, req: Request, all_: bool = False) -> None:
        keys = self.pinned.get(req.request_id, set())
        for item in req.media:
            if item.content_hash in keys and (all_ or item.end <= req.num_computed_tokens):
                keys.discard(item.content_hash)
                self.encoder_cache.unpin(item.content_hash)
        if all_:
            self.pinned.pop(req.request_id, None)

    def _preempt(self, req: Request, batch: ScheduledBatch) -> int:
        """Evict a running request (recomputed later); returns the tokens it gives back to this step."""
        self.running.remove(req)
        given_back = 0
        if req in batch.requests:
            j = batch.requests.index(req)
            given_back = batch.num_new_tokens[j]
            del batch.requests[j], batch.num_new_tokens[j]
        self.blocks.free_request(req)
        self._unpin(req, all_=True)
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        req.status = RequestStatus.WAITING
        self.waiting.appendleft(req)
        batch.preempted.append(req)
        return given_back

    # ---- after the step -------------------------------------------------------------------
    def update(self, batch: ScheduledBatch) -> None:
        """Advance computed-token counts, register full blocks, release consumed media."""
        for req, n in zip(batch.requests, batch.num_new_tokens, strict=True):
            req.num_computed_tokens += n
            self.blocks.commit_full_blocks(req)
            self._unpin(req)

    def finish(self, requests: list[Request]) -> None:
        """Remove finished or aborted requests and free their blocks and pins.

        One pass over each queue for them all: removing them one by one (list.remove) would cost
        O(k * queue) for the k sequences of an `n > 1` request that finish or abort together.
        """
        live = [req for req in requests if req.status != RequestStatus.FINISHED]
        gone = set(live)  # requests hash by identity
        if any(req.status == RequestStatus.RUNNING for req in live):
            self.running = [r for r in self.running if r not in gone]
        if any(req.status == RequestStatus.WAITING for req in live):
            self.waiting = deque(r for r in self.waiting if r not in gone)
        for req in live:  # in the given order: it decides which freed blocks the pool reuses first
            self.blocks.free_request(req)
            self._unpin(req, all_=True)
            req.status = RequestStatus.FINISHED
