"""Step 8 for decode steps without per-layer Python: the decoder compiled once (torch.compile, C++ wrapper).

A step whose sequences each run one new token (every step of a batch past its prompts) goes through
one compiled graph of `model.decode` instead of the eager module calls: the graph's code is C++
(inductor's `cpp_wrapper`) and calls the same kernels eager code calls (glimpse/kernels.py
`graph_ops()`: the native GEMV, RMSNorm, SwiGLU, rotary, decode attention and oneDNN's packed linear
as torch operators, the KV write as an in-place operator), so it gives the eager step's values bit
for bit; what it removes is the Python around them (module calls, dispatch checks, the shape
bookkeeping of 12-36 layers). Measured on 2 AMD EPYC cores, small glm4v, one engine switching it on and
off: 4.62 -> 4.26 ms per one-row step, 9.17 -> 8.50 ms at 16 rows, 20.97 -> 19.92 at 64; served at
concurrency 1, 7.5 -> 5.7 ms per output token (docs/benchmarks.md, "Session 14").

Shapes: two graphs, compiled at start-up (`capture`): one for a single sequence and one for any number
from two up (the row count and the context slots symbolic; the cache and the weights fixed). Steps with prompt
tokens, with rows to drop before the last layer, or of a shape the graphs do not take run eagerly.
Where it applies: bf16 on a CPU that runs the native kernels, one rank (`DecodeGraph.unsupported`,
`check_model`).

On a GPU the lever is the same, larger (session 11 measured a one-row step there as ~1200 kernel launches
from per-layer Python: 23 ms of host time around 2.8 ms of GPU work), and the means differ:
`CapturedDecodeGraphs` replays one graph captured per (batch, context) bucket (CUDA graphs, from the
platform's backend: `capture_step` in glimpse/backends/cuda.py). A captured graph takes fixed shapes, so
the step is padded: rows up to the batch bucket (the padding rows write their K/V into the cache's scratch
block, which no sequence owns, and attend to it alone), each sequence's context slots up to the context
bucket (masked). `decode_graph_class` picks the kind for a device.
"""

from __future__ import annotations

import logging
import time
import weakref
from dataclasses import dataclass

import torch

from glimpse import kernels
from glimpse.backends.native_cpu import NativeCpuAttention
from glimpse.backends.onednn_packed import keep_packed_handles, release_packed_handles
from glimpse.engine.kv_cache import AttentionMetadata, PagedKVCache, StepKV
from glimpse.models.base import VisionLanguageModel

log = logging.getLogger(__name__)

# Inductor's wrapper checks every buffer's size, stride and alignment on every call (a few microseconds
# each, ~15 per layer); the graph's shapes are checked once by its guards. cpp_wrapper: the graph's calls
# from C++ (1-row steps 4.5 -> 4.2 ms against inductor's Python wrapper, which saved nothing over eager).
COMPILE_OPTIONS = {"cpp_wrapper": True, "size_asserts": False, "alignment_asserts": False, "scalar_asserts": False}

# Dynamo keys its graphs on `_step`'s code object, shared by every DecodeGraph of a process (several engines,
# tests): its per-code recompile limit (8 by default) must not cut the later ones off (as in glimpse/vision/runner.py).
_RECOMPILE_LIMIT = 4096
_RECOMPILE_REFUSED = "Detected recompile"  # how torch 2.14 words the error of set_stance("fail_on_recompile")


@dataclass
class _DecodeMeta:
    """What the attention backend and the KV write read of a decode-only step: tensors, and the same
    constants every call (so the graph's guards hold from one step to the next)."""

    slot_mapping: torch.Tensor
    decode_tables: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    decode_seqs: tuple[int, ...] = (0,)  # non-empty: there are decode rows
    prefill_seqs: tuple[int, ...] = ()


def decode_only(meta: AttentionMetadata, rows: torch.Tensor | None) -> bool:
    """Whether a step is one the decode graphs run: every sequence decoding one token, every row kept."""
    return rows is None and not meta.prefill_seqs and bool(meta.decode_seqs)


class DecodeGraph:
    needs_scratch_block = False  # every row of its steps is a real sequence's
    makes = "compile into one graph"  # what a decoder must do for it (the refusal names it)

    @classmethod
    def for_engine(cls, model: VisionLanguageModel, kv_cache: PagedKVCache, max_num_seqs: int,
                   max_model_len: int) -> DecodeGraph:  # fmt: skip
        return cls(model, kv_cache)

    def __init__(self, model: VisionLanguageModel, kv_cache: PagedKVCache) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self._compiled = torch.compile(self._step, dynamic=False, fullgraph=True, options=COMPILE_OPTIONS)
        self.ops = kernels.graph_ops()
        handles = keep_packed_handles(model)  # the packed weights by handle: graphs inductor can cache
        weakref.finalize(self, release_packed_handles, handles)
        self.capture_seconds = 0.0
        self.steps = 0  # decode steps the graphs ran
        self.fallbacks = 0  # decode-only steps that ran eagerly because no graph took their shapes

    @staticmethod
    def unsupported(device: torch.device, dtype: torch.dtype, tensor_parallel_size: int) -> str | None:
        """Why the decode graph cannot run a `dtype` model on `device` (None: it can); checked before loading.
        The model's own requirement (a decoder head dim the native attention takes) is `check_model`'s."""
        if device.type != "cpu" or dtype != torch.bfloat16:
            return f"it runs bf16 models on the CPU (this engine: {dtype} on {device.type})"
        if tensor_parallel_size > 1:
            return "it runs on one rank (tensor_parallel_size > 1)"
        if kernels.cpu_kernels() is None:
            return "it needs the native CPU kernels (a CPU with AVX512-BF16, a C++ compiler, GLIMPSE_NATIVE_KERNELS unset)"
        return None

    @staticmethod
    def check_model(model: VisionLanguageModel) -> str | None:
        """Why the decode graph cannot run this loaded model (None: it can)."""
        if not isinstance(model.backends.attention, NativeCpuAttention):
            return f"it needs the native decode attention (this model's decoder runs {model.backends.attention.name})"
        return None

    def _step(self, embeds: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor, rows: torch.Tensor,
              slots: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:  # fmt: skip
        meta = _DecodeMeta(slot_mapping, (rows, slots, offsets))
        return self.model.decode(embeds, positions, StepKV(self.kv_cache, meta), None)  # type: ignore[arg-type]

    def serves(self, meta: AttentionMetadata, rows: torch.Tensor | None) -> bool:
        return decode_only(meta, rows)

    def __call__(self, embeds: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor | None:
        """The step's final hidden states [B, hidden], or None where no compiled graph takes its shapes
        (the caller then runs it eagerly; nothing was written to the cache)."""
        args = (embeds, positions, meta.slot_mapping, *meta.decode_tables)
        kernels.GRAPH_OPS.ops = self.ops
        try:
            with torch.compiler.set_stance("fail_on_recompile"):
                hidden = self._compiled(*args)
        except RuntimeError as exc:  # shapes the guards refuse: compiling now would stall the step for seconds
            if not str(exc).startswith(_RECOMPILE_REFUSED):
                raise
            self.fallbacks += 1
            return None
        finally:
            kernels.GRAPH_OPS.ops = None
        self.steps += 1
        return hidden

    @torch.inference_mode()
    def capture(self) -> float:
        """Compile both graphs on dummy decode steps (one sequence, then three); returns the seconds taken.
        Runs before the first request: the dummy steps write K/V into the first slots of the cache, which
        a sequence's own tokens overwrite before they are read."""
        start = time.perf_counter()
        kernels.GRAPH_OPS.ops = self.ops
        try:
            with torch._dynamo.config.patch(recompile_limit=_RECOMPILE_LIMIT,
                                            accumulated_recompile_limit=_RECOMPILE_LIMIT):  # fmt: skip
                for batch in (1, 3):
                    self._compiled(*self._dummy_inputs(batch))
        finally:
            kernels.GRAPH_OPS.ops = None
        self.capture_seconds = time.perf_counter() - start
        log.info("decode graphs compiled in %.1f s", self.capture_seconds)
        return self.capture_seconds

    def _dummy_inputs(self, batch: int) -> tuple[torch.Tensor, ...]:
        """A decode step of `batch` sequences of two tokens each, the dims that vary between steps marked
        dynamic (the row count from two rows up; the context slots always)."""
        embeds = self.model.embed_tokens(torch.zeros(batch, dtype=torch.long))
        positions = torch.ones(batch, dtype=torch.long).expand(3, -1)  # as the runner's: one row, three axes
        context = 2
        slots = torch.arange(batch * context, dtype=torch.long)
        slot_mapping = torch.arange(context - 1, batch * context, context)  # each sequence's second slot (stride 1)
        rows = torch.arange(batch, dtype=torch.long)
        offsets = torch.arange(batch + 1, dtype=torch.long) * context
        torch._dynamo.mark_dynamic(slots, 0)
        if batch > 1:
            for t, dim in ((embeds, 0), (positions, 1), (slot_mapping, 0), (rows, 0), (offsets, 0)):
                torch._dynamo.mark_dynamic(t, dim)
        return embeds, positions, slot_mapping, rows, slots, offsets


def decode_graph_class(device: torch.device) -> type[DecodeGraph] | type[CapturedDecodeGraphs]:
    """The decode graph for an engine on `device`: compiled on the CPU, captured per bucket elsewhere."""
    return DecodeGraph if device.type == "cpu" else CapturedDecodeGraphs


# Batch buckets of the captured graphs (up to max_num_seqs, which is always one); a step runs in the
# smallest that holds its rows. Context buckets double from MIN_CONTEXT_WIDTH up to max_model_len.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
MIN_CONTEXT_WIDTH = 256
# A graph gathers batch x width slots of K and V per layer: a bucket whose gathered K and V would pass this
# many bytes is not captured (its steps run eagerly); the graphs' shared pool holds about the largest one's.
MAX_GATHER_BYTES = 256 << 20


class _PaddedDecodeKV:
    """The `KVCache` a captured decode step sees: every row writes its new K/V into `slot_mapping` (a
    padding row: the scratch slot) and attends to its `context_slots` row ([batch, width], masked past
    `context_lens`) through the attention backend's `padded_decode`. Fixed shapes, no host reads."""

    def __init__(self, cache: PagedKVCache, slot_mapping: torch.Tensor, context_slots: torch.Tensor,
                 context_lens: torch.Tensor) -> None:  # fmt: skip
        self.cache = cache
        self.slot_mapping = slot_mapping
        self.context_slots = context_slots
        width = context_slots.shape[1]
        self.mask = (torch.arange(width, device=context_lens.device) < context_lens[:, None])[:, None, None, :]

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        k_flat = self.cache.k[layer_idx].view(-1, *k.shape[1:])
        v_flat = self.cache.v[layer_idx].view(-1, *v.shape[1:])
        k_flat.index_copy_(0, self.slot_mapping, k.to(k_flat.dtype))
        v_flat.index_copy_(0, self.slot_mapping, v.to(v_flat.dtype))
        return self.cache.attention.padded_decode(q, k_flat, v_flat, self.context_slots, self.mask)


class _Bucket:
    """One captured graph: static input buffers of `batch` rows and `width` context slots, and its replay."""

    def __init__(self, owner: CapturedDecodeGraphs, batch: int, width: int) -> None:
        model, cache = owner.model, owner.kv_cache
        device, scratch = cache.k.device, cache.scratch_slot
        self.width, self.scratch = width, scratch
        hidden = model.glimpse_config.hf_config.get_text_config().hidden_size
        self.embeds = torch.zeros(batch, hidden, dtype=model.dtype, device=device)
        self.positions = torch.zeros(3, batch, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((batch,), scratch, dtype=torch.long, device=device)
        self.context_slots = torch.full((batch, width), scratch, dtype=torch.long, device=device)
        self.context_lens = torch.ones(batch, dtype=torch.long, device=device)

        def step() -> torch.Tensor:
            kv = _PaddedDecodeKV(cache, self.slot_mapping, self.context_slots, self.context_lens)
            return model.decode(self.embeds, self.positions, kv, None)  # type: ignore[arg-type]

        self.replay = owner.capture_step(step, device)

    def __call__(self, embeds: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        n, scratch = embeds.shape[0], self.scratch
        self.embeds[:n].copy_(embeds)
        self.positions[:, :n].copy_(positions)
        self.slot_mapping[:n].copy_(meta.slot_mapping)
        self.slot_mapping[n:].fill_(scratch)
        # Row i: sequence i's context slots (meta.all_slots[offsets[i]:offsets[i + 1]], already on the device),
        # then the scratch slot; built on the device from the [n] lengths and offsets alone.
        device = self.context_slots.device
        lens = torch.tensor(meta.context_lens, dtype=torch.long).to(device, non_blocking=True)
        starts = meta.slot_offsets[:-1].to(device, non_blocking=True)
        cols = torch.arange(self.width, device=device)
        index = (starts[:, None] + cols).clamp_(max=meta.all_slots.shape[0] - 1)
        rows = torch.where(cols < lens[:, None], meta.all_slots[index], scratch)
        self.context_slots[:n].copy_(rows)
        self.context_slots[n:].fill_(scratch)
        self.context_lens[:n].copy_(lens)
        self.context_lens[n:].fill_(1)
        return self.replay()[:n].clone()  # the graph's buffer: the next replay overwrites it


class CapturedDecodeGraphs:
    """Decode-only steps replayed from graphs captured per (batch, context) bucket at start-up.

    `capture_step(fn, device)` runs `fn` (a decode step on static buffers) and returns what replays it: the
    platform's graph capture (glimpse/backends/cuda.py `CudaGraphs.capture_step`). The same interface as
    `DecodeGraph` for the runner: `serves`, a call that returns None for a step no bucket holds (more rows
    than max_num_seqs never happen; a context past the widest bucket captured does), `steps`, `fallbacks`."""

    needs_scratch_block = True
    makes = "capture into a graph per batch and context bucket"

    @classmethod
    def for_engine(cls, model: VisionLanguageModel, kv_cache: PagedKVCache, max_num_seqs: int,
                   max_model_len: int) -> CapturedDecodeGraphs:  # fmt: skip
        return cls(model, kv_cache, max_num_seqs, max_model_len, model.backends.graphs.capture_step)  # check_model saw it

    def __init__(self, model: VisionLanguageModel, kv_cache: PagedKVCache, max_num_seqs: int, max_model_len: int,
                 capture_step) -> None:  # fmt: skip
        if kv_cache.scratch_slot is None:
            raise ValueError("captured decode graphs need a KV cache with a scratch block (scratch_block=True)")
        self.model = model
        self.kv_cache = kv_cache
        self.capture_step = capture_step
        self.batches = [b for b in BATCH_BUCKETS if b < max_num_seqs] + [max_num_seqs]
        widths, width = [], min(MIN_CONTEXT_WIDTH, max_model_len)
        while width < max_model_len:
            widths.append(width)
            width *= 2
        self.widths = [*widths, max_model_len]
        self.buckets: dict[tuple[int, int], _Bucket] = {}
        self._keys: list[tuple[int, int]] = []  # the captured buckets, smallest batch first, then width
        self.capture_seconds = 0.0
        self.steps = 0
        self.fallbacks = 0

    @staticmethod
    def unsupported(device: torch.device, dtype: torch.dtype, tensor_parallel_size: int) -> str | None:
        if tensor_parallel_size > 1:
            return "it runs on one rank (tensor_parallel_size > 1)"
        return None

    @staticmethod
    def check_model(model: VisionLanguageModel) -> str | None:
        if getattr(model.glimpse_config.hf_config.get_text_config(), "n_routed_experts", 0):
            return "its experts are routed by the data (each layer reads the per-expert token counts on the host)"
        if not hasattr(model.backends.attention, "padded_decode"):
            return f"its attention backend ({model.backends.attention.name}) has no fixed-shape decode attention"
        if not hasattr(model.backends.graphs, "capture_step"):
            return f"this platform's graph capture ({model.backends.graphs.name}) does not capture decode steps"
        return None

    def serves(self, meta: AttentionMetadata, rows: torch.Tensor | None) -> bool:
        return decode_only(meta, rows)

    def bucket_for(self, rows: int, context: int) -> tuple[int, int] | None:
        """The smallest captured (batch, width) that holds `rows` sequences of up to `context` tokens."""
        for key in self._keys:
            if key[0] >= rows and key[1] >= context:
                return key
        return None

    def __call__(self, embeds: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor | None:
        key = self.bucket_for(embeds.shape[0], max(meta.context_lens))
        if key is None:
            self.fallbacks += 1
            return None
        self.steps += 1
        return self.buckets[key](embeds, positions, meta)

    @torch.inference_mode()
    def capture(self) -> float:
        """Capture every bucket within MAX_GATHER_BYTES (and each batch's narrowest), the largest first (they
        share one memory pool); returns the seconds taken. Capturing writes only into the scratch block."""
        start = time.perf_counter()
        cache = self.kv_cache.k
        slot_bytes = 2 * cache.shape[-2] * cache.shape[-1] * cache.element_size()  # one slot's K and V, one layer
        keys = [(b, w) for b in self.batches for w in self.widths
                if b * w * slot_bytes <= MAX_GATHER_BYTES or w == self.widths[0]]  # fmt: skip
        for batch, width in sorted(keys, key=lambda key: -key[0] * key[1]):
            self.buckets[(batch, width)] = _Bucket(self, batch, width)
        self._keys = sorted(self.buckets)
        self.capture_seconds = time.perf_counter() - start
        log.info("%d decode graphs captured in %.1f s", len(self.buckets), self.capture_seconds)
        return self.capture_seconds
