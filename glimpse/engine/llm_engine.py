"""The engine loop: add requests, run steps (schedule -> model runner, which samples -> stop checks
and detokenize), and hand back `RequestOutput`s shaped like vLLM's.

A step's output work is linear in the sequences it advanced, never in a request's `n`: an
unfinished request's output lists only its completions that got tokens this step (each with
its deltas and cumulative text/token ids), and its final output lists all n in index order.

One `LLMEngine` owns the model, the paged KV cache, the encoder cache and the scheduler. The
scheduler and the runner talk in plain data (`SchedulerOutput` in, `ModelRunnerOutput` back);
the engine applies the sampled tokens to its `Request`s. It is single-threaded; the server
drives it from its own thread. A structured-output request waits outside the scheduler while
its grammar compiles in a thread pool (glimpse/engine/structured.py); each step admits those
whose grammar is ready and fails those whose compile failed or timed out, reporting them in
`take_grammar_events()` (the server answers the request's add only then, so a bad schema is a 400).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
import weakref
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from glimpse.backends import tower_modules
from glimpse.config import ModelConfig
from glimpse.engine.block_manager import BlockManager
from glimpse.engine.detokenizer import IncrementalDetokenizer
from glimpse.engine.encoder_cache import EncoderCache, EncoderCacheManager
from glimpse.engine.kv_cache import PagedKVCache
from glimpse.engine.model_runner import ModelRunner
from glimpse.engine.request import Request
from glimpse.engine.sampler import TopLogprobs, sequence_seed
from glimpse.engine.sampling_params import Logprob, SamplingParams, logprob_dict
from glimpse.engine.scheduler import Scheduler, SchedulerConfig
from glimpse.engine.structured import DEAD_END, THINKING_FAMILIES, StructuredLimits, StructuredOutputs
from glimpse.errors import GlimpseError, InvalidInputError, PromptError
from glimpse.loader import load_model
from glimpse.models.base import MultimodalInputs
from glimpse.models.evs import PrunedVideoSlots, check_pruning_rate, pruned_prompt_positions
from glimpse.platform import ThreadBinding, keep_large_allocations, resolve_device, tune_allocator
from glimpse.processing.inputs import ProcessedPrompt
from glimpse.units import parse_bytes

log = logging.getLogger("glimpse.engine")

# The most decoder work the start-up warm-up step does (2 x parameters x tokens): ~1 s on a 2-core CPU.
WARMUP_MAX_FLOPS = 1e12


# A step's prompt tokens when max_prefill_tokens is not given (within max_num_batched_tokens).
DEFAULT_MAX_PREFILL_TOKENS = 2048


def prefill_budget(max_prefill_tokens: int | None, max_num_batched_tokens: int) -> int:
    """The prompt tokens one step may take: the given max_prefill_tokens, which must fit in a step's whole token
    budget (a larger one could never be used), or the default within that budget."""
    if max_prefill_tokens is None:
        return min(DEFAULT_MAX_PREFILL_TOKENS, max_num_batched_tokens)
    if max_prefill_tokens < 1:
        raise InvalidInputError(f"max_prefill_tokens (--max-prefill-tokens) is {max_prefill_tokens}; it must be >= 1")
    if max_prefill_tokens > max_num_batched_tokens:
        raise InvalidInputError(f"max_prefill_tokens (--max-prefill-tokens) is {max_prefill_tokens}, above "
                                f"max_num_batched_tokens (--max-num-batched-tokens) {max_num_batched_tokens}, a step's "
                                "whole token budget, so it could never be used; raise max_num_batched_tokens too, or "
                                "lower max_prefill_tokens")  # fmt: skip
    return max_prefill_tokens


@dataclass(frozen=True)
class EngineConfig:
    model: str | Path
    dtype: str = "auto"  # "auto": the checkpoint's torch_dtype (float16 runs as bfloat16 on CPU)
    max_model_len: int | None = None  # None: what the model and the KV cache allow
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 2048
    # Prompt tokens per step, after every decoding sequence's token (None: DEFAULT_MAX_PREFILL_TOKENS, or
    # max_num_batched_tokens where that is lower; a value above max_num_batched_tokens is refused).
    # Lower shortens the steps that delay decoding sequences; higher lets a prefill matmul read each
    # weight once for more rows. 2048 against 512 (docs/benchmarks.md, small GLM, 2 threads, AMX):
    # offline 64 image chats 1.25x the tok/s; served at concurrency 16, 1.14x the tok/s, 0.72x the
    # time per output token, 1.13x the time to first token.
    max_prefill_tokens: int | None = None
    kv_cache_memory: int | str = "1GiB"
    encoder_cache_memory: int | str = "256MiB"
    block_size: int = 16
    enable_prefix_caching: bool = True
    enable_encoder_cache: bool = True  # False: embeddings are not kept for reuse by later requests
    # Vision encoder: "on" packs media into token budgets and replays one compiled graph per budget
    # (1.1-1.4x faster encoder on CPU, measured, but ~1 min of compilation at start when the inductor
    # cache is cold); "off" calls the tower eagerly per kind.
    encoder_graph: str = "off"
    encoder_budgets: tuple[int, ...] | None = None
    # Decode steps (every sequence one new token): "on" runs them through one compiled graph of the decoder
    # (glimpse/engine/decode_graph.py: bf16 on a CPU with the native kernels, one rank; 5-8% shorter steps,
    # ~30 s of compilation at start with a cold inductor cache, ~3 s warm); "off" runs every step eagerly.
    decode_graph: str = "off"
    # Tokens per streamed output after a request's first (SGLang's --stream-interval): step() reports a request
    # once it has this many new tokens (or it finished); its first token is reported at once. Higher cuts the
    # per-token cost of streaming (outputs built, sent, formatted and written) for coarser chunks.
    stream_interval: int = 1
    seed: int = 0
    load_format: str = "auto"
    device: str = "auto"  # "auto" (a GPU where torch sees one, else the CPU), "cpu", "cuda", "cuda:N"
    model_kwargs: dict = field(default_factory=dict)  # e.g. {"video_position_rule": "hf"} for Qwen2.5-VL
    video_pruning_rate: float = 0.0  # EVS (Qwen2.5-VL): fraction of each video's tokens dropped after encoding
    # Structured output: bounds checked before a constraint compiles (a request over one is refused, HTTP 400).
    structured_output_max_bytes: int = 64 * 1024  # the constraint's JSON text
    structured_output_max_depth: int = 24  # nesting of subschemas
    structured_output_compile_timeout: float = 10.0  # seconds a request waits for its grammar
    # Tensor parallelism (glimpse/distributed): ranks 1..N-1 run in worker processes this engine starts;
    # kv_cache_memory is per rank. Expert parallel: MoE experts whole on one rank each. The vision tower:
    # "weights" splits it by heads, "data" keeps it whole on every rank and splits the media items.
    tensor_parallel_size: int = 1
    enable_expert_parallel: bool = False
    mm_encoder_tp_mode: str = "weights"
    # Compute threads pinned to cores (glimpse.platform.ThreadBinding): None reads GLIMPSE_CPU_BIND ("auto" when
    # unset: this process's cores in order, split between the ranks), "off", or CPU lists per rank ("0-3|4-7").
    cpu_binding: str | None = None
    # Before the first request, run one step as full as the prefill budget makes it (a text prompt filling
    # it beside a 224x224 image) and forget it (LLMEngine.warm_up): the first real step then finds the
    # kernels for its shapes compiled and the allocator grown to a step's working set.
    warmup: bool = False


@dataclass
class CompletionOutput:
    """One completion's state in a RequestOutput: `text`, `token_ids` and `logprobs` so far (except in the
    engine core's outputs before the last, which carry only the deltas: `LLMEngine.delta_outputs`), and what is new
    since the previous output of its request."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: str | int | None = None
    logprobs: list[TopLogprobs] | None = None
    delta_text: str = ""  # text new since the previous output of this request (streaming)
    delta_token_ids: list[int] = field(default_factory=list)
    delta_logprobs: list[TopLogprobs] | None = None  # the entries of delta_token_ids (None: none were asked for)
    # Set by `LLM` in its own process (outputs that cross processes stay light): decodes `sample_logprobs`.
    tokenizer: Any = field(default=None, repr=False, compare=False)

    @property
    def sample_logprobs(self) -> list[dict[int, Logprob]] | None:
        """`logprobs` as vLLM gives them: per output token `{token_id: Logprob(logprob, rank, decoded_token)}`,
        the sampled token first, then the top-k."""
        if self.logprobs is None:
            return None
        return [logprob_dict(e.token_id, e.logprob, e.rank, e.top, self.tokenizer) for e in self.logprobs]


@dataclass
class RequestOutput:
    """One step's news of a request: `outputs` holds the completions that got tokens this step
    (read `.index`); when `finished`, all n completions in index order, the earlier-finished ones
    with empty deltas. `prompt_token_ids` is one list shared by all outputs of the request."""

    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    media_tokens: list[dict] = field(default_factory=list)  # per media item: type, tokens, grid_thw
    num_cached_tokens: int = 0
    metrics: dict = field(default_factory=dict)


@dataclass(eq=False)
class _Sequence:
    request: Request
    detok: IncrementalDetokenizer
    index: int
    emitted_tokens: int = 0


@dataclass(eq=False)
class _Group:
    request_id: str
    prompt: ProcessedPrompt
    params: SamplingParams
    seqs: list[_Sequence]  # seqs[i].request.index == i
    prompt_token_ids: list[int]  # one copy, handed to every output of the group
    num_unfinished: int
    num_preemptions: int = 0
    grammar: Future | None = None  # the structured-output grammar being compiled (the group waits outside the scheduler)
    grammar_since: float = 0.0  # time.monotonic() when its compile was asked for
    final_only: bool = False  # step() returns this group's output once, when it has finished

    @property
    def finished(self) -> bool:
        return self.num_unfinished == 0


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        config = dataclasses.replace(config, device=resolve_device(config.device),
                                     max_prefill_tokens=prefill_budget(config.max_prefill_tokens,
                                                                       config.max_num_batched_tokens))  # fmt: skip
        self.config = config
        check_pruning_rate(config.video_pruning_rate)
        if not isinstance(config.stream_interval, int) or config.stream_interval < 1:
            raise InvalidInputError(f"stream_interval (--stream-interval) is {config.stream_interval!r}; it must be a "
                                    "whole number >= 1 (1: every token as it comes)")  # fmt: skip
        for name in ("encoder_graph", "decode_graph"):
            if getattr(config, name) not in ("on", "off"):
                raise InvalidInputError(f"{name}={getattr(config, name)!r} (--{name.replace('_', '-')}); use 'on' or 'off'")
        dtype = resolve_model_dtype(config)
        check_parallel_config(config)
        graphs = None  # the decode graph's class (compiled on the CPU, captured per bucket on a GPU)
        if config.decode_graph == "on":
            from glimpse.engine.decode_graph import decode_graph_class

            graphs = decode_graph_class(torch.device(config.device))
            why = graphs.unsupported(torch.device(config.device), dtype, config.tensor_parallel_size)
            if why is not None:
                raise _decode_graph_refused(why)
        self.workers = None
        size = config.tensor_parallel_size
        threads = None
        if size > 1:
            from glimpse.distributed.executor import threads_per_rank

            threads = threads_per_rank(size)
        # checked for every rank before anything loads; each worker rank binds its own threads
        bindings = [ThreadBinding(config.device, rank, size, config.cpu_binding, threads) for rank in range(size)]
        self.binding = bindings[0]
        tune_allocator(config.device)
        if size > 1:
            from glimpse.distributed.executor import start_workers
            from glimpse.loader import check_tensor_parallel

            check_tensor_parallel(config.model, **_parallel_kwargs(config), **config.model_kwargs)
            self.workers = start_workers(config)  # ranks 1..N-1 load their shares while this process loads rank 0's
        try:
            self._build(config, dtype, graphs)
            keep_large_allocations(config.device)  # the weights and KV cache are in: reuse big activations' memory
            if config.warmup:
                try:
                    self.warm_up()
                except GlimpseError as exc:
                    raise type(exc)(f"the start-up warm-up step failed: {exc} (warmup=False / --warmup off "
                                    "skips it)") from exc  # fmt: skip
        except BaseException:
            self.close()  # a failed start leaves no process behind
            raise
        if self.workers is not None:  # an engine dropped without close() still stops its ranks
            weakref.finalize(self, self.workers.close)

    def _build(self, config: EngineConfig, dtype: torch.dtype, graphs: type | None) -> None:
        """The model (this rank's share), processor, KV cache, scheduler and runner (with `graphs`, the decode
        graph's class, when decode_graph is on)."""
        self.model = load_model(config.model, dtype=dtype, load_format=config.load_format, device=config.device,
                                seed=config.seed, **_parallel_kwargs(config), **config.model_kwargs)  # fmt: skip
        if self.workers is not None:
            self.workers.wait("ready", None)  # their shares are loaded too (or the rank that failed is named)
        self.model_config: ModelConfig = self.model.glimpse_config
        from glimpse.processing.processor import load_processor

        self._check_pruning_support(config.video_pruning_rate, "video_pruning_rate")
        self.processor = load_processor(config.model, video_pruning_rate=config.video_pruning_rate)
        self.processor.pixel_dtype = pixel_dtype(dtype)
        self.tokenizer = self.processor.tokenizer
        text_cfg = self.model_config.hf_config.get_text_config()
        self.vocab_size = text_cfg.vocab_size

        num_blocks = kv_cache_blocks(config, self.model, dtype)
        capacity = num_blocks * config.block_size
        max_len = config.max_model_len or min(text_cfg.max_position_embeddings, capacity)
        if max_len > capacity:
            raise InvalidInputError(
                f"max_model_len {max_len} needs {-(-max_len // config.block_size)} KV blocks but kv_cache_memory "
                f"{config.kv_cache_memory} holds {num_blocks} ({capacity} tokens); raise kv_cache_memory or lower max_model_len")
        if max_len > text_cfg.max_position_embeddings:
            raise InvalidInputError(f"max_model_len {max_len} exceeds the model's max_position_embeddings "
                                    f"{text_cfg.max_position_embeddings}")  # fmt: skip
        self.max_model_len = max_len
        self.kv_cache = make_kv_cache(config, self.model, num_blocks, dtype, graphs is not None and graphs.needs_scratch_block)
        self.blocks = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        # the scheduler's half of the encoder cache (budget, pins, eviction); the runner holds the tensors
        self.encoder_cache = EncoderCacheManager(parse_bytes(config.encoder_cache_memory, "encoder_cache_memory"),
                                                 retain=config.enable_encoder_cache)  # fmt: skip
        emb_bytes = text_cfg.hidden_size * torch.empty((), dtype=dtype).element_size()
        sched = SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens, max_len,
                                encoder_budget=max(config.max_num_batched_tokens, 4096),
                                max_prefill_tokens=config.max_prefill_tokens)  # fmt: skip
        self.scheduler = Scheduler(sched, self.blocks, self.encoder_cache, emb_bytes)
        encoder_runner = None
        if config.encoder_graph == "on":
            from glimpse.vision.runner import EncoderRunner

            encoder_runner = EncoderRunner(self.model, config.encoder_budgets, config.max_num_batched_tokens,
                                           graph=self.model.device.type == "cpu")  # fmt: skip
        self.eos_token_ids = frozenset(self.model_config.eos_token_ids)
        self.runner = ModelRunner(self.model, self.kv_cache, EncoderCache(), encoder_runner,
                                  self.eos_token_ids, config.seed)  # fmt: skip
        if graphs is not None:
            if (why := graphs.check_model(self.model)) is not None:
                raise _decode_graph_refused(why)
            self.runner.decode_graph = graphs.for_engine(self.model, self.kv_cache, config.max_num_seqs, max_len)
            try:
                self.runner.decode_graph.capture()
            except Exception as exc:  # e.g. MoE routing (glm4v_moe): shapes that depend on the data
                first = (str(exc).strip().splitlines() or [""])[0][:200]
                raise _decode_graph_refused(f"this model's decoder does not {graphs.makes} "
                                            f"({type(exc).__name__}: {first})") from exc  # fmt: skip
        if self.workers is not None:  # every step runs on all ranks; this process samples
            self.runner = self.workers.driving(self.runner)
        limits = StructuredLimits(config.structured_output_max_bytes, config.structured_output_max_depth,
                                  config.structured_output_compile_timeout)  # fmt: skip
        self.structured = StructuredOutputs(self.tokenizer, self.vocab_size, self.eos_token_ids, limits,
                                            self.model_config.processor_kind in THINKING_FAMILIES)  # fmt: skip
        self.groups: dict[str, _Group] = {}
        self._compiling: dict[str, _Group] = {}  # groups waiting for their grammar, by request id
        self._grammar_events: list[tuple[str, InvalidInputError | None]] = []
        self.ran_last_step = False  # whether the latest step() found a batch to run (the server idles if not)
        # True in the engine core: an output before a request's last carries only what is new (delta_text,
        # delta_token_ids, delta_logprobs), with empty text and token_ids and no logprobs, so that a step's outputs
        # cost the same to build, pickle and send at the 10,000th token as at the first; the last output carries
        # everything. False (LLM, in-process): every output holds the completion so far, as vLLM's do.
        self.delta_outputs = False
        self._counter = itertools.count()

    def warm_up(self) -> float:
        """Run and forget one step as full as the prefill budget makes it: a 224x224 image chat beside a
        text prompt that fills the rest of the budget, one output token each. oneDNN compiles its kernels
        for a shape the first time it sees it, and the allocator's heap grows to a step's working set on
        first use (page faults that zero every new page): the first step of 64 image chats carried ~25k
        of them and the whole batch ran 4-5% slower than a batch after a warm one (small glm4v, 2 cores,
        docs/benchmarks.md). vLLM pays the same once at start-up (its profiling run). Afterwards the
        prefix cache is emptied; the image's embedding stays in the encoder cache until evicted.
        The filler stops at WARMUP_MAX_FLOPS of decoder work: a full 2048-token step of Qwen2.5-VL-3B
        took 13 of a 61 s start-up on 2 cores, for faults and kernel compiles that a few hundred tokens
        already bring (the small checkpoints still warm up on a whole budget).
        Returns the seconds it took. Call it with no request in flight."""
        from PIL import Image

        if self.has_unfinished_requests():
            raise InvalidInputError("warm_up() runs before the first request, with none in flight")
        t0 = time.perf_counter()
        image = Image.new("RGB", (224, 224), (128, 128, 128))
        chat = self.processor([{"role": "user", "content": [{"type": "image", "image": image},
                                                            {"type": "text", "text": "Warm up."}]}])  # fmt: skip
        once = SamplingParams(max_tokens=1, ignore_eos=True, temperature=0.0)
        try:
            self.add_request("glimpse-warmup-image", chat, once)
            used = len(chat.input_ids)
        except PromptError:  # the image's tokens do not fit this engine's max_model_len or encoder cache
            used = 0
        # 2 FLOPs per decoder parameter per token (the vision tower's are not: the image ran above)
        tower = {id(p) for m in tower_modules(self.model) for p in m.parameters(recurse=False)}
        decoder_params = sum(p.numel() for p in self.model.parameters() if id(p) not in tower)
        affordable = max(1, int(WARMUP_MAX_FLOPS // (2 * max(decoder_params, 1))) - used)
        filler = min(self.scheduler.config.prefill_budget - used, self.max_model_len - 2, affordable)
        if filler > 0:
            words = self.tokenizer.encode(" warm up", add_special_tokens=False) or [0]
            self.add_request("glimpse-warmup-text", (words * (filler // len(words) + 1))[:filler], once)
        while self.has_unfinished_requests():
            self.step()
        self.blocks.reset_prefix_cache()
        self._reset_counters()
        seconds = time.perf_counter() - t0
        log.info("warm-up step ran in %.2f s", seconds)
        return seconds

    def close(self) -> None:
        """Stop the tensor-parallel worker processes (if any) and unpin this thread's compute threads (from
        the thread that stepped); the engine cannot step afterwards."""
        self.binding.release()
        if self.workers is not None:
            self.workers.close()

    # ---- requests ----------------------------------------------------------------------
    def add_request(self, request_id: str | None, prompt: ProcessedPrompt | list[int] | str,
                    params: SamplingParams | None = None, preprocess_seconds: float = 0.0,
                    final_only: bool = False) -> str:  # fmt: skip
        """Queue one request (fanned out into `params.n` sequences); returns its id. `final_only`: step()
        returns no output for it until it has finished (a batch caller that reads only final outputs
        spares the engine an output object per request and step; the text is still decoded as tokens
        come, for stop strings)."""
        params = params or SamplingParams()
        request_id = request_id if request_id is not None else str(next(self._counter))
        seq_ids = [f"{request_id}-{i}" for i in range(params.n)] if params.n > 1 else [request_id]
        if request_id in self.groups or any(s in self.scheduler.requests for s in seq_ids):
            # Sequences are known by id to the scheduler and the runner: "a" with n=2 owns "a-0" and "a-1".
            raise InvalidInputError(f"request id {request_id!r} is already in use (or one of its sequence ids "
                                    f"{seq_ids}, by another request's n > 1 sequences)")  # fmt: skip
        prompt = self._as_processed(prompt)
        params.validate_for_vocab(self.vocab_size)
        self.structured.check_budget(params)
        n_prompt = len(prompt.input_ids)
        if n_prompt == 0:
            raise PromptError("the prompt is empty")
        if n_prompt >= self.max_model_len:
            raise PromptError(f"the prompt has {n_prompt} tokens but max_model_len is {self.max_model_len}; "
                              "shorten it, lower image/video resolution (max_pixels, fps), or raise max_model_len")  # fmt: skip
        if any(i < 0 or i >= self.vocab_size for i in prompt.input_ids):
            raise PromptError(f"the prompt holds token ids outside the vocabulary [0, {self.vocab_size})")
        for item in prompt.media:
            if item.pruning_rate:
                self._check_pruning_support(item.pruning_rate, f"{item.kind} pruning_rate")
            need = self.scheduler.item_bytes(item)
            if need > self.encoder_cache.max_bytes:
                raise PromptError(f"a {item.kind} of {item.num_tokens} tokens needs {need} bytes of encoder cache, "
                                  f"more than encoder_cache_memory ({self.encoder_cache.max_bytes}); raise it or "
                                  "lower the item's resolution")  # fmt: skip
        positions, delta, pruned = self._prompt_positions(prompt)
        # Checks the constraint now (size, depth, unsupported keywords: InvalidInputError); compiles in the pool.
        grammar = None if params.structured_outputs is None else self.structured.submit(params.structured_outputs)
        seqs = []
        for i in range(params.n):
            req = Request(
                request_id=seq_ids[i],
                prompt_token_ids=list(prompt.input_ids),
                sampling_params=params,
                media=prompt.media,
                prompt_positions=positions,  # shared: the runner copies it where EVS fills it in
                mrope_delta=int(delta),
                eos_token_ids=frozenset() if params.ignore_eos else self.eos_token_ids,
                group_id=request_id,
                index=i,
                seed=sequence_seed(params, i),
                pruned_video_positions=pruned,
            )
            req.timings.preprocess = preprocess_seconds
            detok = IncrementalDetokenizer(self.tokenizer, params.skip_special_tokens, params.stop,
                                           params.include_stop_str_in_output)  # fmt: skip
            seqs.append(_Sequence(req, detok, i))
        group = _Group(request_id, prompt, params, seqs, list(prompt.input_ids), params.n, final_only=final_only)
        if grammar is not None and not grammar.done():
            group.grammar, group.grammar_since = grammar, time.monotonic()
            self._compiling[request_id] = group
        else:
            try:
                self._admit(group, grammar)  # raises for a compile that already failed, before the group is known
            finally:
                if grammar is not None:
                    self.structured.release(grammar)
        self.groups[request_id] = group
        return request_id

    def waiting_for_grammar(self, request_id: str) -> bool:
        """Whether the request's structured-output grammar is still compiling (its add is not settled yet)."""
        return request_id in self._compiling

    def grammars_pending(self) -> bool:
        """Whether any request still waits for its grammar (a step may then run nothing, and should not spin)."""
        return bool(self._compiling)

    def take_grammar_events(self) -> list[tuple[str, InvalidInputError | None]]:
        """Requests whose grammar finished compiling since the last call: (request id, None) once admitted, or
        (request id, the error) when it failed or timed out (the request is gone)."""
        events, self._grammar_events = self._grammar_events, []
        return events

    def _admit(self, group: _Group, grammar: Future | None) -> None:
        """Hand a group's sequences to the scheduler, with their constraint (a compiled grammar, a thinking budget).

        A failed compile raises the user's InvalidInputError (the caller decides how to report it)."""
        params = group.params
        if grammar is not None:
            exc = grammar.exception()
            if exc is not None:
                raise self.structured.compile_error(params.structured_outputs, exc)
        if grammar is not None or params.thinking_token_budget is not None:
            spec = self.structured.spec_for(params, group.prompt_token_ids, None if grammar is None else grammar.result())
            for seq in group.seqs:
                seq.request.constraint = spec
        for seq in group.seqs:
            self.scheduler.add(seq.request)

    def _poll_grammars(self) -> None:
        """Admit the groups whose grammar is ready; drop (and report) those whose compile failed or ran out of time."""
        now = time.monotonic()
        for request_id, group in list(self._compiling.items()):
            future = group.grammar
            assert future is not None
            waited = now - group.grammar_since
            if not future.done() and waited < self.structured.limits.compile_timeout:
                continue
            del self._compiling[request_id]
            timed_out = not future.done()
            self.structured.release(future)  # the last waiter to give up on an unfinished compile cancels it
            for seq in group.seqs:
                seq.request.timings.grammar = waited
            try:
                if timed_out:
                    raise self.structured.timeout_error(group.params.structured_outputs)
                self._admit(group, future)
            except Exception as exc:  # the add must be answered whatever went wrong
                if not isinstance(exc, InvalidInputError):
                    log.exception("admitting request %s after its grammar compiled failed", request_id)
                    exc = InvalidInputError(f"the request could not be started after its grammar compiled: {exc}")
                self.groups.pop(request_id, None)
                for seq in group.seqs:  # _admit may have handed some to the scheduler before it failed
                    if seq.request.request_id in self.scheduler.requests:
                        seq.request.finish_reason = "abort"
                        self.scheduler.finish([seq.request])
                self._grammar_events.append((request_id, exc))
                continue
            self._grammar_events.append((request_id, None))

    def abort(self, request_id: str) -> bool:
        """Stop a request and free its KV blocks; False if unknown or finished."""
        group = self.groups.pop(request_id, None)
        if group is None:
            return False
        compiling = self._compiling.pop(request_id, None)
        if compiling is not None:
            self.structured.release(compiling.grammar)  # the last to wait for it cancels the compile
            return True  # its sequences never reached the scheduler
        live = [s.request for s in group.seqs if not s.request.is_finished]
        for req in live:
            req.finish_reason = "abort"
        self.scheduler.finish(live)
        self._release_finished()
        return True

    def has_unfinished_requests(self) -> bool:
        return bool(self.groups)

    # ---- the step ----------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one scheduled batch; [] when nothing could be scheduled (see `ran_last_step`) or when the
        batch only prefilled (no request got a token)."""
        self.binding.ensure()  # on the thread that steps (once; again if another thread takes over)
        if self._compiling:
            self._poll_grammars()
        sched = self.scheduler.schedule()
        self.ran_last_step = bool(sched)
        if not sched:
            if sched.finished_req_ids or sched.freed_encoder_keys:
                self.runner.execute(sched)  # only drops finished requests' state and freed embeddings
            return []
        result = self.runner.execute(sched)
        requests = self.scheduler.requests
        for request_id in sched.num_scheduled_tokens:
            req = requests[request_id]
            phase = "prefill" if req.num_computed_tokens < req.num_prompt_tokens else "decode"
            setattr(req.timings, phase, getattr(req.timings, phase) + result.forward_seconds)
            if any(m.content_hash in sched.encode for m in req.media):
                req.timings.encoder += result.encoder_seconds
        for request_id in sched.preempted_req_ids:
            group = self.groups.get(requests[request_id].group_id)
            if group is not None:
                group.num_preemptions += 1
        self.scheduler.update(sched)
        now = time.perf_counter()
        reqs = [requests[request_id] for request_id in result.req_ids]
        ended = result.ended or [False] * len(reqs)
        for req, token, logprob, done in zip(reqs, result.sampled_token_ids, result.logprobs, ended, strict=True):
            self._accept(req, token, logprob, now, done)
        advanced = [r for r in reqs if r.group_id in self.groups]
        # One pass over the scheduler's queues for all sequences that finished this step.
        self.scheduler.finish([r for r in advanced if r.finish_reason is not None])
        self._release_finished()
        return self._outputs(advanced)

    def _release_finished(self) -> None:
        """With no request left to schedule, hand the runner the finished ids (and the embeddings the
        encoder cache dropped) now rather than at the next step, which may be far off: it holds their
        pixels, tokens and embeddings until told."""
        if not self.scheduler.has_work and (self.scheduler.finished_ids or self.encoder_cache.freed):
            self.runner.execute(self.scheduler.schedule())

    def _accept(self, req: Request, token: int, logprob: TopLogprobs | None, now: float,
                ended: bool | str = False) -> None:
        """Apply one sampled token; `ended`: the request's grammar reached its end with it (DEAD_END: its grammar
        allowed no token, and this one is not kept)."""
        params = req.sampling_params
        if ended == DEAD_END:
            if req.timings.first_token is None:
                req.timings.first_token = now
            self._finish(req, "abort", None)
            return
        if req.timings.first_token is None:
            req.timings.first_token = now
        req.output_token_ids.append(token)
        if logprob is not None:
            req.logprobs.append(logprob)
        seq = self._seq(req)
        n_out = len(req.output_token_ids)
        stop_str = seq.detok.add(token, check_stop=n_out >= params.min_tokens)
        if stop_str is not None:
            self._finish(req, "stop", stop_str)
        elif token in req.eos_token_ids and n_out >= params.min_tokens:
            self._finish(req, "stop", None)
        elif token in params.stop_token_ids and n_out >= params.min_tokens:
            self._finish(req, "stop", token)
        elif ended:  # the constraint allows nothing more (min_tokens cannot extend a complete answer)
            self._finish(req, "stop", None)
        elif (params.max_tokens is not None and n_out >= params.max_tokens) or req.num_tokens >= self.max_model_len:
            self._finish(req, "length", None)

    def _finish(self, req: Request, reason: str, stop_reason) -> None:
        """Mark a sequence finished; the step hands it to the scheduler with the others that finished."""
        req.finish_reason, req.stop_reason = reason, stop_reason
        req.timings.finished = time.perf_counter()
        if stop_reason is None or isinstance(stop_reason, int):
            self._seq(req).detok.flush()
        self.groups[req.group_id].num_unfinished -= 1

    def _seq(self, req: Request) -> _Sequence:
        return self.groups[req.group_id].seqs[req.index]

    def _outputs(self, advanced: list[Request]) -> list[RequestOutput]:
        """One output per group with a sequence that got tokens this step (each sampled once per step)."""
        by_group: dict[str, list[_Sequence]] = {}
        for req in advanced:
            by_group.setdefault(req.group_id, []).append(self._seq(req))
        outputs = []
        for gid, seqs in by_group.items():
            group = self.groups[gid]
            if group.final_only and not group.finished:
                continue
            if not group.finished and not self._due(seqs):
                continue  # its tokens wait in the sequences (emitted_tokens, the detokenizer) for the next output
            if group.finished:
                del self.groups[gid]
                seqs = group.seqs  # the final output lists all n
            outputs.append(self._make_output(group, seqs))
        return outputs

    def _due(self, seqs: list[_Sequence]) -> bool:
        """Whether a running group's output goes out this step: a sequence's first token, stream_interval new ones,
        or a sequence that ended (n > 1: its choice finishes now, not when the last one does)."""
        interval = self.config.stream_interval
        return interval == 1 or any(
            s.emitted_tokens == 0 or s.request.is_finished
            or len(s.request.output_token_ids) - s.emitted_tokens >= interval for s in seqs)  # fmt: skip

    def _make_output(self, group: _Group, seqs: list[_Sequence]) -> RequestOutput:
        comps = []
        whole = group.finished or not self.delta_outputs
        asked = group.params.logprobs is not None
        for seq in seqs:
            req = seq.request
            start, seq.emitted_tokens = seq.emitted_tokens, len(req.output_token_ids)
            new_tokens = req.output_token_ids[start:]
            new_logprobs = req.logprobs[start:] if asked else None  # one entry per token when asked for
            delta = seq.detok.delta(req.is_finished)
            comps.append(CompletionOutput(
                index=seq.index, text=seq.detok.text[: seq.detok.emitted] if whole else "",
                token_ids=list(req.output_token_ids) if whole else [],
                finish_reason=req.finish_reason, stop_reason=req.stop_reason,
                logprobs=list(req.logprobs) if asked and whole else None,
                delta_text=delta, delta_token_ids=new_tokens, delta_logprobs=new_logprobs))  # fmt: skip
        first = group.seqs[0].request
        metrics = first.timings.as_dict() | {"num_preemptions": group.num_preemptions}
        return RequestOutput(group.request_id, group.prompt_token_ids, comps, group.finished,
                             group.prompt.media_token_counts, first.num_cached_prompt_tokens, metrics)  # fmt: skip

    # ---- helpers -------------------------------------------------------------------------
    def _prompt_positions(self, prompt: ProcessedPrompt) -> tuple[torch.Tensor, int, dict[int, torch.Tensor]]:
        """([3, T] prompt positions, mrope_delta, EVS: span start -> unpruned positions of each pruned video)."""
        ids = torch.tensor(prompt.input_ids)
        grids = _grids(prompt)
        videos = [PrunedVideoSlots(m.start, m.num_tokens, m.num_encoded_tokens) for m in prompt.media if m.pruning_rate]
        if not videos:
            positions, delta = self.model.mrope_positions(ids, grids)
            return positions, int(delta), {}
        out = pruned_prompt_positions(ids, videos, self.model.video_token_id,
                                      lambda full_ids: self.model.mrope_positions(full_ids, grids))  # fmt: skip
        return out.positions, out.mrope_delta, out.video_positions

    def _check_pruning_support(self, rate: float, knob: str) -> None:
        if rate and not self.model.supports_video_pruning:
            raise InvalidInputError(f"{knob}={rate}: video token pruning (EVS) is supported for Qwen2.5-VL only, not "
                                    f"{self.model.family} checkpoints; leave it at 0")  # fmt: skip

    def _as_processed(self, prompt) -> ProcessedPrompt:
        if isinstance(prompt, ProcessedPrompt):
            return prompt
        if isinstance(prompt, str):
            return ProcessedPrompt(self.tokenizer.encode(prompt, add_special_tokens=False), text=prompt)
        if isinstance(prompt, (list, tuple)) and all(isinstance(i, int) for i in prompt):
            return ProcessedPrompt(list(prompt))
        raise InvalidInputError(f"a prompt must be a string, a list of token ids or a ProcessedPrompt, not {type(prompt).__name__}")

    def _reset_counters(self) -> None:
        """The since-start counters that /metrics reports, back to zero (after the warm-up step)."""
        self.blocks.queries = self.blocks.hits = 0
        self.encoder_cache.lookups = self.encoder_cache.hits = 0
        getattr(self.runner, "runner", self.runner).num_forwards = 0  # the driver's runner under tensor parallelism

    def stats(self) -> dict:
        return {
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting),
            "kv_blocks_used": self.blocks.num_used_blocks,
            "kv_blocks_total": self.blocks.num_blocks,
            "kv_usage": self.blocks.usage(),
            "prefix_cache_queries": self.blocks.queries,
            "prefix_cache_hits": self.blocks.hits,
            "encoder_cache_lookups": self.encoder_cache.lookups,
            "encoder_cache_hits": self.encoder_cache.hits,
            "encoder_cache_bytes": self.encoder_cache.used_bytes,
            "decoder_forwards": self.runner.num_forwards,
        }


def _grids(prompt: ProcessedPrompt) -> MultimodalInputs:
    images, videos = prompt.images, prompt.videos
    grid = lambda items: torch.tensor([m.grid_thw for m in items], dtype=torch.long) if items else None  # noqa: E731
    spg = [m.second_per_grid_t for m in videos if m.second_per_grid_t is not None]
    return MultimodalInputs(image_grid_thw=grid(images), video_grid_thw=grid(videos),
                            second_per_grid_ts=torch.tensor(spg, dtype=torch.float32) if spg else None)  # fmt: skip


def kv_cache_blocks(config: EngineConfig, model, dtype: torch.dtype) -> int:
    """KV blocks that fit kv_cache_memory (per rank) for this rank's KV heads; the same on every rank."""
    text_cfg = model.glimpse_config.hf_config.get_text_config()
    per_block = PagedKVCache.bytes_per_block(text_cfg.num_hidden_layers, config.block_size,
                                             _kv_heads(model, text_cfg), _head_dim(text_cfg), dtype)  # fmt: skip
    return parse_bytes(config.kv_cache_memory, "kv_cache_memory") // per_block


def make_kv_cache(config: EngineConfig, model, num_blocks: int, dtype: torch.dtype,
                  scratch_block: bool = False) -> PagedKVCache:  # fmt: skip
    text_cfg = model.glimpse_config.hf_config.get_text_config()
    return PagedKVCache(text_cfg.num_hidden_layers, num_blocks, config.block_size, _kv_heads(model, text_cfg),
                        _head_dim(text_cfg), dtype, config.device, scratch_block)  # fmt: skip


def _kv_heads(model, text_cfg) -> int:
    return model.tp.kv_head_share(text_cfg.num_key_value_heads)[1]  # this rank's (all of them on one rank)


def _head_dim(text_cfg) -> int:
    return getattr(text_cfg, "head_dim", None) or text_cfg.hidden_size // text_cfg.num_attention_heads


def _decode_graph_refused(why: str) -> InvalidInputError:
    return InvalidInputError(f"decode_graph 'on' (--decode-graph on): {why}; use --decode-graph off")


def check_parallel_config(config: EngineConfig) -> None:
    """The tensor-parallel options, before any process starts or any weight is read."""
    from glimpse.distributed import check_parallel_options

    check_parallel_options(config.tensor_parallel_size, config.mm_encoder_tp_mode)
    if config.encoder_graph == "on" and config.tensor_parallel_size > 1:
        raise InvalidInputError("encoder_graph 'on' (--encoder-graph on) is not supported with tensor_parallel_size "
                                "> 1 yet; use --encoder-graph off")  # fmt: skip


def _parallel_kwargs(config: EngineConfig) -> dict:
    return {"tensor_parallel_size": config.tensor_parallel_size, "enable_expert_parallel": config.enable_expert_parallel,
            "mm_encoder_tp_mode": config.mm_encoder_tp_mode}  # fmt: skip


def pixel_dtype(model_dtype: torch.dtype) -> torch.dtype:
    """What a processor feeding a `model_dtype` model keeps pixel values in (Processor.pixel_dtype)."""
    return model_dtype if model_dtype in (torch.bfloat16, torch.float16) else torch.float32


def resolve_model_dtype(config: EngineConfig) -> torch.dtype:
    """The dtype an engine with `config` runs its model in (`dtype="auto"`: the checkpoint's)."""
    from glimpse.config import read_json
    from glimpse.loader import resolve_dtype

    if config.dtype != "auto":
        return resolve_dtype(config.dtype)
    raw = read_json(Path(config.model) / "config.json")
    name = raw.get("torch_dtype") or raw.get("dtype") or "float32"
    return torch.bfloat16 if name in ("bfloat16", "float16") else torch.float32
