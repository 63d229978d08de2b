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


class DecodeGraph:
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
        """Whether this step is one the graphs run: every sequence decoding one token, every row kept."""
        return rows is None and not meta.prefill_seqs and bool(meta.decode_seqs)

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
