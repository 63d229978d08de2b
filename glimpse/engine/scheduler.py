"""Step 4: the token-budget scheduler (no separate prefill and decode phases).

Each step gets `max_num_batched_tokens` tokens, handed out in three passes:
  1. every decoding request (one token left to compute) gets its token, so all sequences
     advance every step (time per output token);
  2. running requests still prefilling get chunks in arrival order, and
  3. waiting requests are admitted (after matching their prefix against the cache) while
     budget, sequence slots and KV blocks allow;
passes 2 and 3 share at most `max_prefill_tokens` per step, which bounds how much a burst of
new prompts slows the decoders, while a new request still starts in the next step with room
(time to first token). A chunk may end inside an image. Vision encoding is scheduled with the
tokens that need it, within an encoder budget and the encoder cache's capacity: a chunk stops
short of an item that cannot be encoded this step. When KV blocks run out, the most recently
arrived running request is preempted and later recomputed from scratch.

The output, `SchedulerOutput`, is plain data (it pickles): a request's full inputs the first
time the model runner sees it, then only its new block ids and computed-token count.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch

from glimpse.engine.block_manager import BlockManager
from glimpse.engine.encoder_cache import EncoderCacheManager
from glimpse.engine.request import Request, RequestStatus
from glimpse.engine.sampling_params import SamplingParams
from glimpse.engine.structured import ConstraintSpec
from glimpse.processing.inputs import MediaItem


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 2048
    max_model_len: int = 8192
    encoder_budget: int = 4096  # vision embedding tokens encoded per step
    # Prefill tokens per step (None: max_num_batched_tokens). LLMEngine passes what llm_engine.prefill_budget makes of
    # its own setting (refused above the step budget, 2048 within it when not given).
    max_prefill_tokens: int | None = None

    @property
    def prefill_budget(self) -> int:
        """Prompt tokens one step may take: max_prefill_tokens, within max_num_batched_tokens."""
        return min(self.max_prefill_tokens or self.max_num_batched_tokens, self.max_num_batched_tokens)


@dataclass(frozen=True)
class NewRequestData:
    """A request the runner has not seen: everything its forwards and its sampler need, sent once."""

    request_id: str
    prompt_token_ids: list[int]
    prompt_positions: torch.Tensor  # [3, num_prompt_tokens] M-RoPE positions
    mrope_delta: int
    media: tuple[MediaItem, ...]  # with their pixel values
    pruned_video_positions: dict[int, torch.Tensor]  # EVS: span start -> [3, unpruned] positions
    sampling_params: SamplingParams
    seed: int | None  # this sequence's sampler seed (None: the runner's shared stream)
    block_ids: list[int]
    num_computed_tokens: int
    constraint: ConstraintSpec | None = None  # structured output / thinking budget: the runner masks its logits


@dataclass(frozen=True)
class CachedRequestData:
    """A request the runner holds: blocks added to its table (all of them after a preemption)."""

    request_id: str
    new_block_ids: list[int]
    num_computed_tokens: int


@dataclass
class SchedulerOutput:
    """One step: `num_scheduled_tokens[id]` tokens of each request, in batch order (decodes first);
    media (by content hash) to encode before the forward; requests the runner must forget or whose
    blocks were taken back (preempted, recomputed later)."""

    new_requests: list[NewRequestData] = field(default_factory=list)
    cached_requests: list[CachedRequestData] = field(default_factory=list)
    num_scheduled_tokens: dict[str, int] = field(default_factory=dict)
    encode: list[str] = field(default_factory=list)
    freed_encoder_keys: list[str] = field(default_factory=list)  # embeddings the runner must drop first
    preempted_req_ids: list[str] = field(default_factory=list)
    finished_req_ids: list[str] = field(default_factory=list)

    @property
    def total_tokens(self) -> int:
        return sum(self.num_scheduled_tokens.values())

    def __bool__(self) -> bool:
        return bool(self.num_scheduled_tokens)


class Scheduler:
    def __init__(self, config: SchedulerConfig, blocks: BlockManager, encoder_cache: EncoderCacheManager,
                 embedding_bytes_per_token: int) -> None:  # fmt: skip
        self.config = config
        self.blocks = blocks
        self.encoder_cache = encoder_cache
        self.embedding_bytes_per_token = embedding_bytes_per_token
        self.requests: dict[str, Request] = {}  # live requests (waiting or running) by id
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.pinned: dict[str, set[str]] = {}  # request id -> media keys it pins
        self.runner_blocks: dict[str, int] = {}  # request id -> blocks the runner holds (known ones)
        self.finished_ids: list[str] = []  # known to the runner, finished since the last output

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, request: Request) -> None:
        self.requests[request.request_id] = request
        self.waiting.append(request)

    # ---- scheduling ---------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput(finished_req_ids=self.finished_ids)
        self.finished_ids = []
        step: dict[Request, int] = {}  # requests hash by identity; insertion order is batch order
        encoding: dict[str, MediaItem] = {}
        tokens = self.config.max_num_batched_tokens
        prefill = self.config.prefill_budget

        for decode in (True, False):  # passes 1 and 2 over the running requests
            i = 0
            while i < len(self.running) and (tokens if decode else min(tokens, prefill)) > 0:
                req = self.running[i]
                left = req.num_tokens - req.num_computed_tokens
                i += 1
                if req in step or (left == 1) != decode:
                    continue
                n, media = self._fit(req, 1 if decode else min(left, tokens, prefill), encoding)
                if n == 0:
                    continue
                while not self.blocks.allocate(req, n):
                    victim = self.running[-1]
                    tokens += self._preempt(victim, step, out)
                    if victim is req:
                        break
                else:
                    step[req] = n
                    encoding.update(media)
                    tokens -= n
                    prefill -= 0 if decode else n

        while (self.waiting and min(tokens, prefill) > 0 and len(self.running) < self.config.max_num_seqs
               and not out.preempted_req_ids):  # fmt: skip
            req = self.waiting[0]
            if req.num_computed_tokens == 0 and not req.block_ids:
                req.num_computed_tokens = self.blocks.match_prefix(req)
                req.num_cached_prompt_tokens = min(req.num_computed_tokens, req.num_prompt_tokens)
            self._pin(req)
            left = req.num_tokens - req.num_computed_tokens
            n, media = self._fit(req, min(left, tokens, prefill), encoding)
            if n == 0 or not self.blocks.allocate(req, n):
                break
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            step[req] = n
            encoding.update(media)
            tokens -= n
            prefill -= n

        for req, n in step.items():
            self._describe(req, out)
            out.num_scheduled_tokens[req.request_id] = n
        touched = {m.content_hash for req in step for m in req.media}  # not those of requests preempted since
        out.encode = [key for key in encoding if key in touched]
        for key in out.encode:  # evicts unpinned entries if it must: freed before the runner encodes
            self.encoder_cache.allocate(key, self.item_bytes(encoding[key]))
        out.freed_encoder_keys = self.encoder_cache.take_freed()
        return out

    def _describe(self, req: Request, out: SchedulerOutput) -> None:
        """What the runner must learn about a scheduled request: all of it once, then new blocks."""
        known = self.runner_blocks.get(req.request_id)
        if known is None:
            out.new_requests.append(NewRequestData(
                req.request_id, req.prompt_token_ids, req.prompt_positions, req.mrope_delta, req.media,
                req.pruned_video_positions, req.sampling_params, req.seed, list(req.block_ids),
                req.num_computed_tokens, req.constraint))  # fmt: skip
        else:
            new_blocks = req.block_ids[known:]
            out.cached_requests.append(CachedRequestData(req.request_id, new_blocks, req.num_computed_tokens))
        self.runner_blocks[req.request_id] = len(req.block_ids)

    def _fit(self, req: Request, n: int, encoding: dict[str, MediaItem]) -> tuple[int, dict[str, MediaItem]]:
        """Shrink `n` so every media item the chunk touches has (or gets) its embeddings this step.

        Returns it with the items the chunk needs encoded, which the caller adds to `encoding` once
        the chunk is scheduled (blocks allocated), so a request left out does not hold encoder budget.
        """
        start = req.num_computed_tokens
        new: dict[str, MediaItem] = {}
        for item in req.media_in(start, start + n):
            key = item.content_hash
            if key in encoding or key in new or key in self.encoder_cache:
                continue
            planned = [*encoding.values(), *new.values()]
            scheduled = sum(m.num_encoded_tokens for m in planned)
            pending = sum(self.item_bytes(m) for m in planned)
            fits_budget = scheduled + item.num_encoded_tokens <= self.config.encoder_budget or not planned
            if fits_budget and self.encoder_cache.can_fit(pending + self.item_bytes(item)):
                new[key] = item
            else:
                return max(0, item.start - start), new  # stop before this item; encode it in a later step
        return n, new

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

    def _preempt(self, req: Request, step: dict[Request, int], out: SchedulerOutput) -> int:
        """Evict a running request (recomputed later); returns the tokens it gives back to this step."""
        self.running.remove(req)
        given_back = step.pop(req, 0)
        self.blocks.free_request(req)
        self._unpin(req, all_=True)
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        req.status = RequestStatus.WAITING
        self.waiting.appendleft(req)
        if req.request_id in self.runner_blocks:  # always: running requests were scheduled before
            self.runner_blocks[req.request_id] = 0
            out.preempted_req_ids.append(req.request_id)
        return given_back

    # ---- after the step -------------------------------------------------------------------
    def update(self, out: SchedulerOutput) -> None:
        """Advance computed-token counts, register full blocks, release consumed media."""
        for request_id, n in out.num_scheduled_tokens.items():
            req = self.requests[request_id]
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
            del self.requests[req.request_id]
            if self.runner_blocks.pop(req.request_id, None) is not None:
                self.finished_ids.append(req.request_id)
