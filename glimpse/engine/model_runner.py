"""Steps 6-8 for one engine step: encode scheduled media (pruning EVS videos), merge embeddings,
build positions (placing EVS videos' kept tokens) and attention metadata, run ONE decoder forward
over every scheduled token, and return the logits of the requests that need a new token.

Inputs are flat: `[T]` tokens of all scheduled requests back to back, `[3, T]` positions,
`[T, hidden]` embeddings. Output: `[R, vocab]` float32 logits for the R sampling rows.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from glimpse.engine.encoder_cache import EncoderCache
from glimpse.engine.kv_cache import AttentionMetadata, PagedKVCache, StepKV
from glimpse.engine.request import Request
from glimpse.engine.scheduler import ScheduledBatch
from glimpse.kernels import cpu_kernels
from glimpse.models.base import VisionLanguageModel
from glimpse.models.evs import PrunedVideo, prune_video
from glimpse.processing.inputs import MediaItem


@dataclass
class StepResult:
    sample_requests: list[Request]  # requests whose next token is sampled from `logits`
    logits: torch.Tensor  # [len(sample_requests), vocab] float32
    encoder_seconds: float
    forward_seconds: float


class ModelRunner:
    def __init__(self, model: VisionLanguageModel, kv_cache: PagedKVCache, encoder_cache: EncoderCache,
                 encoder_runner=None) -> None:  # fmt: skip
        self.model = model
        self.encoder_runner = encoder_runner  # glimpse.vision.runner.EncoderRunner, or None: eager tower calls
        self.kv_cache = kv_cache
        self.encoder_cache = encoder_cache
        self.device = model.device
        self.num_forwards = 0  # decoder forwards run (one per non-empty step)
        self._reduced_cpu = self.device.type == "cpu" and model.dtype in (torch.bfloat16, torch.float16)
        if self.device.type == "cpu" and model.dtype == torch.bfloat16:
            cpu_kernels()  # build (or load) the native kernels now, not inside the first request

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> StepResult:
        t0 = time.perf_counter()
        self._encode(batch.encode)
        t1 = time.perf_counter()

        ids, positions, sample_rows, sample_requests = [], [], [], []
        row = 0
        for req, n in zip(batch.requests, batch.num_new_tokens, strict=True):
            start = req.num_computed_tokens
            for item in req.media_in(start, start + n):
                if item.pruning_rate:  # EVS: positions of the kept tokens, known now that they are encoded
                    req.place_kept(item, self.encoder_cache.get(item.content_hash).kept)
            ids.extend(req.token_ids(start, start + n))
            positions.append(req.positions(start, start + n))
            row += n
            if start + n == req.num_tokens:
                sample_rows.append(row - 1)
                sample_requests.append(req)
        input_ids = torch.tensor(ids, dtype=torch.long, device=self.device)
        embeds = self.model.embed_tokens(input_ids)
        self._merge_media(batch, embeds)
        meta = AttentionMetadata.build(
            self.kv_cache.block_size,
            [r.block_ids for r in batch.requests],
            [r.num_computed_tokens for r in batch.requests],
            batch.num_new_tokens,
            self.device,
        )
        with _one_row_kernels(input_ids.shape[0] == 1 and self._reduced_cpu):
            hidden = self.model.decode(embeds, torch.cat(positions, dim=1).to(self.device), StepKV(self.kv_cache, meta))
        self.num_forwards += 1
        rows = torch.tensor(sample_rows, dtype=torch.long, device=self.device)
        with _one_row_kernels(len(sample_rows) == 1 and self._reduced_cpu):  # the LM head: one row to sample
            logits = self.model.lm_logits(hidden.index_select(0, rows)).float() if sample_rows else hidden.new_empty(0, 0)
        return StepResult(sample_requests, logits, t1 - t0, time.perf_counter() - t1)

    def _encode(self, items: list[MediaItem]) -> None:
        """Encode media not yet cached, in batches per kind, and store their embeddings (EVS videos pruned)."""
        todo = list({m.content_hash: m for m in items if m.content_hash not in self.encoder_cache}.values())
        if not todo:
            return
        if self.encoder_runner is not None:  # token-budget batches through the captured graphs
            from glimpse.vision.batching import VisionItem

            feats = self.encoder_runner.encode([VisionItem(m.kind, m.pixel_values, m.grid_thw) for m in todo])
            done = list(zip(todo, feats, strict=True))
        else:
            done = []
            for kind, encode in (("image", self.model.encode_images), ("video", self.model.encode_videos)):
                group = [m for m in todo if m.kind == kind]
                if not group:
                    continue
                pixels = torch.cat([m.pixel_values for m in group]).to(self.device, self.model.dtype)
                grids = torch.tensor([m.grid_thw for m in group], dtype=torch.long, device=self.device)
                done += zip(group, encode(pixels, grids).split([m.num_encoded_tokens for m in group]), strict=True)
        for item, emb in done:
            if item.pruning_rate:
                entry = prune_video(emb, item.grid_thw, self.model.spatial_merge_size, item.pruning_rate)
                self.encoder_cache.put(item.content_hash, entry)
            else:
                self.encoder_cache.put(item.content_hash, emb.clone())

    def _merge_media(self, batch: ScheduledBatch, embeds: torch.Tensor) -> None:
        """Write each media item's embedding rows into the slots of this step's tokens."""
        row = 0
        for req, n in zip(batch.requests, batch.num_new_tokens, strict=True):
            start, end = req.num_computed_tokens, req.num_computed_tokens + n
            for item in req.media_in(start, end):
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


_ONE_ROW_LOCK = threading.Lock()
_one_row_depth = 0  # forwards inside `_one_row_kernels` right now, over all threads
_one_row_saved = True  # torch.backends.mkldnn.enabled when the first of them entered


@contextmanager
def _one_row_kernels(active: bool) -> Iterator[None]:
    """Matmuls with one row (batch-1 decode, a one-row LM head) in bf16/fp16 on CPU run on torch's own
    kernels instead of oneDNN's. At one row they stream bf16 weights at ~45-54 GB/s here against
    ~22-31 GB/s for oneDNN's (fp16: 43 vs 41; measured); from two rows on oneDNN wins, so everything
    else stays on it. Both accumulate in float32. The switch is process-wide: the first thread in
    turns oneDNN off and the last one out restores it (a counter under a lock, so engines on
    several threads never leave it off); another thread's matmuls in that window may run on
    torch's kernels too. Where the native kernels build, `models.layers.Linear` layers bypass both
    (~70 GB/s); this switch still serves fp16 and matmuls outside those layers (MoE experts)."""
    global _one_row_depth, _one_row_saved
    if not active:
        yield
        return
    with _ONE_ROW_LOCK:
        _one_row_depth += 1
        if _one_row_depth == 1:
            _one_row_saved = torch.backends.mkldnn.enabled
            torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        with _ONE_ROW_LOCK:
            _one_row_depth -= 1
            if _one_row_depth == 0:
                torch.backends.mkldnn.enabled = _one_row_saved
