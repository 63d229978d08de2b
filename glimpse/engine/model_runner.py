"""Steps 6-8 for one engine step, and the sampling of step 9: the model runner.

It takes the scheduler's plain-data `SchedulerOutput` and keeps its own record of each request
(`CachedRequestState`: tokens, positions, block table, sampling state), so it could live in
another process. Per step: encode scheduled media (pruning EVS videos), merge embeddings, build
positions (placing EVS videos' kept tokens) and attention metadata, run ONE decoder forward over
every scheduled token, and sample the requests that need a new token (structured-output rows
under their grammar's bitmask, one `[R, ceil(vocab / 32)]` int32 tensor per step).

Inputs are flat: `[T]` tokens of all scheduled requests back to back, `[3, T]` positions,
`[T, hidden]` embeddings; `[R, vocab]` float32 logits for the R sampling rows. Output: a
`ModelRunnerOutput` (request ids -> sampled token id and logprobs), plain data too.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from glimpse.engine.encoder_cache import EncoderCache
from glimpse.engine.kv_cache import AttentionMetadata, PagedKVCache, StepKV
from glimpse.engine.sampler import RequestSamplingState, TopLogprobs, sample
from glimpse.engine.sampling_params import SamplingParams
from glimpse.engine.scheduler import NewRequestData, SchedulerOutput
from glimpse.engine.structured import OutputConstraint, bitmask_width
from glimpse.models.base import IMAGE, VIDEO, VisionLanguageModel
from glimpse.models.evs import PrunedVideo, prune_video
from glimpse.platform import one_row_matmuls
from glimpse.processing.inputs import MediaItem


@dataclass
class ModelRunnerOutput:
    """One step's result: `sampled_token_ids[i]` (and its logprobs) for request `req_ids[i]`."""

    req_ids: list[str]
    sampled_token_ids: list[int]
    logprobs: list[TopLogprobs | None]  # None where the request asked for none
    encoder_seconds: float = 0.0
    forward_seconds: float = 0.0
    # ended[i]: request i's grammar reached its end with this token (True: it stops, finish_reason "stop"), or
    # structured.DEAD_END (its grammar allowed no token: it ends, "abort"); [] if none has either
    ended: list[bool | str] = field(default_factory=list)


@dataclass(eq=False)
class CachedRequestState:
    """The runner's record of one request: made from its `NewRequestData`, then kept up to date from
    each step's `SchedulerOutput` and from the tokens the runner samples for it."""

    request_id: str
    token_ids: list[int]  # prompt, then sampled tokens
    num_prompt_tokens: int
    prompt_positions: torch.Tensor  # [3, num_prompt_tokens]; EVS videos' slots set by `place_kept`
    mrope_delta: int  # decode position of token i is i + mrope_delta (all three axes)
    media: tuple[MediaItem, ...]
    pruned_video_positions: dict[int, torch.Tensor]  # EVS: span start -> [3, unpruned] positions
    sampling_params: SamplingParams
    sampling_state: RequestSamplingState
    block_ids: list[int]  # the block table
    num_computed_tokens: int
    constraint: OutputConstraint | None = None  # structured output / thinking budget; survives preemption

    @classmethod
    def from_new(cls, data: NewRequestData) -> CachedRequestState:
        # EVS writes kept positions into the table: a copy, not the scheduler's (or another sequence's).
        positions = data.prompt_positions.clone() if data.pruned_video_positions else data.prompt_positions
        return cls(data.request_id, list(data.prompt_token_ids), len(data.prompt_token_ids), positions,
                   data.mrope_delta, data.media, data.pruned_video_positions, data.sampling_params,
                   RequestSamplingState(data.prompt_token_ids, data.seed), list(data.block_ids),
                   data.num_computed_tokens, None if data.constraint is None else OutputConstraint(data.constraint))  # fmt: skip

    def positions(self, start: int, end: int) -> torch.Tensor:
        """[3, end - start] M-RoPE positions of tokens start..end-1 (prompt table, then i + delta)."""
        p = self.num_prompt_tokens
        parts = []
        if start < p:
            parts.append(self.prompt_positions[:, start : min(end, p)])
        if end > p:
            tail = torch.arange(max(start, p), end, dtype=torch.long) + self.mrope_delta
            parts.append(tail.expand(3, -1))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def place_kept(self, item: MediaItem, kept: torch.Tensor) -> None:
        """EVS: a pruned video's kept tokens ([K] raster indices) take their positions in the unpruned layout."""
        self.prompt_positions[:, item.start : item.end] = self.pruned_video_positions[item.start][:, kept]

    def media_in(self, start: int, end: int) -> list[MediaItem]:
        """Media whose embedding slots overlap tokens start..end-1."""
        return [m for m in self.media if m.start < end and m.end > start]


class ModelRunner:
    def __init__(self, model: VisionLanguageModel, kv_cache: PagedKVCache, encoder_cache: EncoderCache,
                 encoder_runner=None, eos_token_ids: frozenset[int] = frozenset(), seed: int = 0,
                 samples: bool = True) -> None:  # fmt: skip
        """`samples=False`: a tensor-parallel worker's runner (glimpse/distributed/executor.py), which runs
        every forward with the driver but takes the sampled tokens from it (`append_sampled`)."""
        self.model = model
        self.samples = samples
        self.sampling = False  # inside a step's sampling, past its last collective (tensor parallelism)
        self.encoder_runner = encoder_runner  # glimpse.vision.runner.EncoderRunner, or None: eager tower calls
        self.kv_cache = kv_cache
        self.encoder_cache = encoder_cache
        self.device = model.device
        self.eos_token_ids = sorted(eos_token_ids)  # banned while a request's min_tokens is unmet
        self.generator = torch.Generator().manual_seed(seed)  # the draws of requests without a seed
        self.requests: dict[str, CachedRequestState] = {}
        self.num_forwards = 0  # decoder forwards run (one per non-empty step)
        self.decode_graph = None  # glimpse.engine.decode_graph.DecodeGraph: decode-only steps compiled
        kv_cache.attention = model.backends.attention  # chosen once when the model was loaded (glimpse/backends)

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        """Apply the step's request updates, then (when it has tokens) encode, forward and sample."""
        self._update_states(sched)
        if not sched.num_scheduled_tokens:
            return ModelRunnerOutput([], [], [])
        states = [self.requests[request_id] for request_id in sched.num_scheduled_tokens]
        counts = list(sched.num_scheduled_tokens.values())
        t0 = time.perf_counter()
        self._encode(sched.encode, states)
        t1 = time.perf_counter()

        ids, positions, sample_rows, sampled = [], [], [], []
        decoding: list[int] = []  # positions of consecutive decode tokens, made one tensor (not one per request)

        def flush_decoding() -> None:
            if decoding:
                positions.append(torch.tensor(decoding, dtype=torch.long).expand(3, -1))
                decoding.clear()

        row = 0
        for state, n in zip(states, counts, strict=True):
            start = state.num_computed_tokens
            ids.extend(state.token_ids[start : start + n])
            row += n
            if n == 1 and start >= state.num_prompt_tokens:  # a decode token: position start + delta on every axis
                decoding.append(start + state.mrope_delta)
            else:
                for item in state.media_in(start, start + n):
                    if item.pruning_rate:  # EVS: positions of the kept tokens, known now that they are encoded
                        state.place_kept(item, self.encoder_cache.get(item.content_hash).kept)
                flush_decoding()
                positions.append(state.positions(start, start + n))
            if start + n == len(state.token_ids):
                sample_rows.append(row - 1)
                sampled.append(state)
        flush_decoding()
        input_ids = torch.tensor(ids, dtype=torch.long, device=self.device)
        embeds = self.model.embed_tokens(input_ids)
        self._merge_media(states, counts, embeds)
        meta = AttentionMetadata.build(
            self.kv_cache.block_size,
            [s.block_ids for s in states],
            [s.num_computed_tokens for s in states],
            counts,
            self.device,
        )
        # Only the rows that sample leave the last layer (its o_proj, MLP and the LM head skip the rest:
        # a prefill chunk samples its last token at most); a step of decode tokens keeps every row.
        every_row = len(sample_rows) == row
        rows = None if every_row else torch.tensor(sample_rows, dtype=torch.long, device=self.device)
        with one_row_matmuls(input_ids.shape[0], self.model.dtype, self.device):
            positions_t = positions[0] if len(positions) == 1 else torch.cat(positions, dim=1)
            positions_t = positions_t.to(self.device)
            hidden = None
            if self.decode_graph is not None and self.decode_graph.serves(meta, rows):
                hidden = self.decode_graph(embeds, positions_t, meta)
            if hidden is None:
                hidden = self.model.decode(embeds, positions_t, StepKV(self.kv_cache, meta), rows)
        self.num_forwards += 1
        with one_row_matmuls(len(sample_rows), self.model.dtype, self.device):  # the LM head: one row to sample
            logits = self.model.lm_logits(hidden).float() if sample_rows else hidden.new_empty(0, 0)
        t2 = time.perf_counter()
        if not sampled or not self.samples:
            return ModelRunnerOutput([], [], [], t1 - t0, t2 - t1)
        self.sampling = True
        try:
            bitmask, masked = self._bitmask(sampled, logits.shape[1])
            out = sample(logits, [s.sampling_params for s in sampled], [s.sampling_state for s in sampled],
                         self.eos_token_ids, self.generator, bitmask, masked)  # fmt: skip
        finally:
            self.sampling = False
        ended = []
        for state, token in zip(sampled, out.token_ids, strict=True):
            state.token_ids.append(token)
            state.sampling_state.append(token)
            ended.append(state.constraint is not None and state.constraint.accept(token))
        req_ids = [s.request_id for s in sampled]
        return ModelRunnerOutput(req_ids, out.token_ids, out.logprobs, t1 - t0, t2 - t1, ended if any(ended) else [])

    def append_sampled(self, req_ids: list[str], tokens: list[int]) -> None:
        """Tokens the driver sampled for these requests (a worker's runner, before the next step)."""
        for request_id, token in zip(req_ids, tokens, strict=True):
            state = self.requests.get(request_id)
            if state is not None:
                state.token_ids.append(token)

    @staticmethod
    def _bitmask(sampled: list[CachedRequestState], vocab: int) -> tuple[torch.Tensor | None, list[int]]:
        """The rows' allowed tokens this step ([R, ceil(vocab / 32)] int32) and the rows that have a mask."""
        if all(s.constraint is None for s in sampled):
            return None, []
        bitmask = torch.empty(len(sampled), bitmask_width(vocab), dtype=torch.int32)
        masked = [j for j, s in enumerate(sampled) if s.constraint is not None and s.constraint.mask_row(bitmask[j])]
        return bitmask, masked

    def _update_states(self, sched: SchedulerOutput) -> None:
        self.encoder_cache.free(sched.freed_encoder_keys)
        for request_id in sched.finished_req_ids:
            del self.requests[request_id]
        for request_id in sched.preempted_req_ids:  # its blocks went back to the pool; tokens stay
            self.requests[request_id].block_ids = []
        for new in sched.new_requests:
            self.requests[new.request_id] = CachedRequestState.from_new(new)
        for cached in sched.cached_requests:
            state = self.requests[cached.request_id]
            state.block_ids.extend(cached.new_block_ids)
            state.num_computed_tokens = cached.num_computed_tokens

    def _encode(self, keys: list[str], states: list[CachedRequestState]) -> None:
        """Encode the media the scheduler named (it allocated their cache room), in batches per kind, and
        store their embeddings (EVS videos pruned)."""
        items = {m.content_hash: m for s in states for m in s.media}  # the scheduled chunks touch them all
        todo = [items[key] for key in dict.fromkeys(keys) if key not in self.encoder_cache]
        if not todo:
            return
        if self.encoder_runner is not None:  # token-budget batches through the captured graphs
            from glimpse.vision.batching import VisionItem

            feats = self.encoder_runner.encode([VisionItem(m.kind, m.pixel_values, m.grid_thw) for m in todo])
            done = list(zip(todo, feats, strict=True))
        else:
            done = []
            for kind, name in ((IMAGE, "image"), (VIDEO, "video")):
                group = [m for m in todo if m.kind == name]
                if not group:
                    continue
                pixels = torch.cat([m.pixel_values for m in group]).to(self.device, self.model.dtype)
                grids = torch.tensor([m.grid_thw for m in group], dtype=torch.long, device=self.device)
                embeddings = self.model.encode_media(kind, pixels, grids)  # split between ranks in data mode
                done += zip(group, embeddings.split([m.num_encoded_tokens for m in group]), strict=True)
        for item, emb in done:
            if item.pruning_rate:
                entry = prune_video(emb, item.grid_thw, self.model.spatial_merge_size, item.pruning_rate)
                self.encoder_cache.put(item.content_hash, entry)
            else:
                self.encoder_cache.put(item.content_hash, emb.clone())

    def _merge_media(self, states: list[CachedRequestState], counts: list[int], embeds: torch.Tensor) -> None:
        """Write each media item's embedding rows into the slots of this step's tokens."""
        row = 0
        for state, n in zip(states, counts, strict=True):
            start, end = state.num_computed_tokens, state.num_computed_tokens + n
            for item in state.media_in(start, end):
                emb = self.encoder_cache.get(item.content_hash)
                if isinstance(emb, PrunedVideo):
                    emb = emb.embeddings
                offset = 0  # embedding rows before the current span
                for a, b in item.spans:
                    lo, hi = max(a, start), min(b, end)
                    if lo < hi:
                        embeds[row + lo - start : row + hi - start] = emb[offset + lo - a : offset + hi - a].to(embeds.dtype)
                    offset += b - a
            row += n

