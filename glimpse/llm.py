"""The offline API, shaped like vLLM's: `LLM(model=...).generate(prompts, params)` and `.chat(...)`.

A prompt is a string, a list of token ids, or `{"prompt": str, "multi_modal_data": {"image":
[...], "video": [...]}}` whose string holds one image/video placeholder per item (the model's own,
as its chat template writes it: `LLM.image_placeholder` / `LLM.video_placeholder`). Media come as
vLLM and HF users hold them: paths, bytes, PIL images, uint8 arrays (NumPy `[H, W, 3]`, torch
`[3, H, W]`), videos as files or as `(frames, {"fps": ...})`. Without `model`, a built-in demo
checkpoint with RANDOM weights is made on first use and cached.

A step's prompt tokens may fill the whole default `max_num_batched_tokens` budget
(`max_prefill_tokens` defaults to 2048, or to `max_num_batched_tokens` where that is lower; a larger
value than the budget is refused): larger prefill matmuls read each weight once for more rows (64 image
chats: ~300 vs ~240 output tok/s at 512 on a 2-core Xeon, docs/benchmarks.md).

`warmup=True` (the default) runs one full prefill step at start-up and forgets it
(`LLMEngine.warm_up`), as vLLM's start-up profiling run does: later calls do not pay for compiling
kernels and growing memory. A single batch takes about as long either way; `warmup=False` saves the
start-up step for one-off use.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from glimpse.engine.llm_engine import CompletionOutput, EngineConfig, LLMEngine, RequestOutput
from glimpse.engine.sampling_params import SamplingParams
from glimpse.errors import InvalidInputError
from glimpse.media.video import is_decoded_video
from glimpse.processing.inputs import ProcessedPrompt


def demo_checkpoint(family: str = "glm46v", size: str = "tiny") -> Path:
    """The built-in demo checkpoint (random weights), made once under ~/.cache/glimpse."""
    import os

    from glimpse.testing import make_checkpoint, set_demo_sampling

    root = Path(os.environ.get("GLIMPSE_CACHE", Path.home() / ".cache" / "glimpse")) / f"demo-{family}-{size}"
    if not (root / "config.json").is_file() or not any(root.glob("*.safetensors")):
        make_checkpoint(family, size, root, seed=0)
    set_demo_sampling(root)  # random weights: sample from the whole vocabulary, not near-greedily
    return root


class LLM:
    def __init__(self, model: str | Path | None = None, *, dtype: str = "auto", max_model_len: int | None = None,
                 max_num_seqs: int = 32, max_num_batched_tokens: int = 2048, max_prefill_tokens: int | None = None,
                 kv_cache_memory: int | str = "1GiB",
                 encoder_cache_memory: int | str = "256MiB", seed: int = 0, load_format: str = "auto",
                 enable_prefix_caching: bool = True, enable_encoder_cache: bool = True, block_size: int = 16,
                 encoder_graph: str = "off", encoder_budgets: tuple[int, ...] | None = None,
                 decode_graph: str = "off", video_pruning_rate: float = 0.0, structured_output_max_bytes: int = 64 * 1024,
                 structured_output_max_depth: int = 24, structured_output_compile_timeout: float = 10.0,
                 tensor_parallel_size: int = 1, enable_expert_parallel: bool = False,
                 mm_encoder_tp_mode: str = "weights", warmup: bool = True, device: str = "auto",
                 **model_kwargs: Any) -> None:  # fmt: skip
        self.is_demo = model is None
        if model is None:
            model = demo_checkpoint()
        config = EngineConfig(model=model, dtype=dtype, max_model_len=max_model_len, max_num_seqs=max_num_seqs,
                              max_num_batched_tokens=max_num_batched_tokens, max_prefill_tokens=max_prefill_tokens,
                              kv_cache_memory=kv_cache_memory,
                              encoder_cache_memory=encoder_cache_memory, block_size=block_size,
                              enable_prefix_caching=enable_prefix_caching, enable_encoder_cache=enable_encoder_cache,
                              encoder_graph=encoder_graph, encoder_budgets=encoder_budgets, decode_graph=decode_graph,
                              seed=seed, load_format=load_format, video_pruning_rate=video_pruning_rate,
                              structured_output_max_bytes=structured_output_max_bytes,
                              structured_output_max_depth=structured_output_max_depth,
                              structured_output_compile_timeout=structured_output_compile_timeout,
                              tensor_parallel_size=tensor_parallel_size, enable_expert_parallel=enable_expert_parallel,
                              mm_encoder_tp_mode=mm_encoder_tp_mode, warmup=warmup, device=device,
                              model_kwargs=model_kwargs)  # fmt: skip
        self.engine = LLMEngine(config)
        self.processor = self.engine.processor

    def close(self) -> None:
        """Stop the engine's tensor-parallel worker processes (they also stop when this process exits);
        another `LLM` with tensor_parallel_size > 1 may then start in this process."""
        self.engine.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def image_placeholder(self) -> str:
        """What to put in a raw prompt for each image: its marker as the chat template writes it (GLM
        `<|begin_of_image|><|image|><|end_of_image|>`, Qwen `<|vision_start|><|image_pad|><|vision_end|>`),
        so a raw prompt gets the same tokens as `chat`."""
        return self.processor.tokens.image_placeholder

    @property
    def video_placeholder(self) -> str:
        """The same for each video (GLM `<|begin_of_video|><|video|><|end_of_video|>`)."""
        return self.processor.tokens.video_placeholder

    def get_tokenizer(self):
        return self.processor.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """SamplingParams with the checkpoint's generation_config.json sampling settings (used when none are given)."""
        return SamplingParams(**self.engine.model_config.generation_defaults)

    # ---- generation ------------------------------------------------------------------------
    def generate(self, prompts: Any, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True, mm_processor_kwargs: dict | None = None) -> list[RequestOutput]:  # fmt: skip
        """Generate for one prompt or a list; outputs come back in input order."""
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        processed = _in_parallel(lambda p: self._process(p, mm_processor_kwargs), prompts)
        return self._run(processed, sampling_params, use_tqdm)

    def chat(self, messages: list[dict] | list[list[dict]], sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: bool = True, chat_template_kwargs: dict | None = None,
             mm_processor_kwargs: dict | None = None, add_generation_prompt: bool = True,
             tools: list[dict] | None = None, chat_template: str | None = None) -> list[RequestOutput]:  # fmt: skip
        """Chat with one conversation (a list of messages) or several (a list of such lists).

        `tools`: OpenAI function tools (`{"type": "function", "function": {"name", "description", "parameters"}}`),
        shown to the model by the chat template, as vLLM's `LLM.chat(tools=...)`; the output is text in the model's
        own call format (docs/tool-calling.md shows how to read calls out of it). `chat_template`: this call's
        template instead of the checkpoint's: the Jinja text, a file, or a template glimpse ships by name
        (`qwen2_5_vl_hermes`: Qwen2.5-VL's own template has no tool section)."""
        conversations = messages if messages and isinstance(messages[0], list) else [messages]
        processor = self._chat_processor(chat_template, tools, chat_template_kwargs)

        def process(conv: list[dict]) -> tuple[ProcessedPrompt, float]:
            t0 = time.perf_counter()
            p = processor(conv, chat_template_kwargs=chat_template_kwargs, add_generation_prompt=add_generation_prompt,
                          tools=tools, **(mm_processor_kwargs or {}))  # fmt: skip
            return p, time.perf_counter() - t0

        return self._run(_in_parallel(process, conversations), sampling_params, use_tqdm)

    def stream_chat(self, messages: list[dict], sampling_params: SamplingParams | None = None,
                    chat_template_kwargs: dict | None = None, mm_processor_kwargs: dict | None = None,
                    tools: list[dict] | None = None,
                    chat_template: str | None = None) -> Iterator[RequestOutput]:  # fmt: skip
        """Yield `RequestOutput`s of one conversation as text arrives (`.outputs[0].delta_text` for n=1; with
        n > 1 each output lists only the completions that moved: read `.index`).

        Every output but the last carries new text: a token that adds none yet (part of a UTF-8
        character, a possible stop string, a skipped special token) is held back, and its id rides in
        the `delta_token_ids` of the next output of that completion. The last output (`finished`) lists
        all n completions with their finish_reason, its deltas possibly empty (an EOS adds no text).
        `tools` and `chat_template` as in `chat`.
        """
        processor = self._chat_processor(chat_template, tools, chat_template_kwargs)
        processed = processor(messages, chat_template_kwargs=chat_template_kwargs, tools=tools,
                              **(mm_processor_kwargs or {}))  # fmt: skip
        rid = self.engine.add_request(None, processed, sampling_params or self.get_default_sampling_params())
        held: dict[int, CompletionOutput] = {}  # completion index -> the deltas of its outputs not yielded

        def with_held(c: CompletionOutput) -> CompletionOutput:
            if (before := held.pop(c.index, None)) is None:
                return c
            logprobs = None if c.delta_logprobs is None else before.delta_logprobs + c.delta_logprobs
            return dataclasses.replace(c, delta_token_ids=before.delta_token_ids + c.delta_token_ids,
                                       delta_logprobs=logprobs)  # fmt: skip

        try:
            while self.engine.has_unfinished_requests():
                outputs = self._step()
                for out in outputs:
                    if out.request_id != rid:
                        continue
                    if out.finished:
                        yield self._readable(dataclasses.replace(out, outputs=[with_held(c) for c in out.outputs]))
                        continue
                    moved = []
                    for c in out.outputs:
                        if c.delta_text or c.finish_reason is not None:
                            moved.append(with_held(c))
                        else:
                            held[c.index] = with_held(c)
                    if moved:
                        yield self._readable(dataclasses.replace(out, outputs=moved))
        finally:
            self.engine.abort(rid)

    @cached_property
    def _template_kwargs(self) -> frozenset[str]:
        from glimpse.processing.prompt import template_variables

        return template_variables(self.processor.chat_template)

    def _check_template_kwargs(self, kwargs: dict | None, variables: frozenset[str] | None = None) -> None:
        """As `glimpse serve` does: a key the chat template never reads would be ignored silently, so it is refused.
        `variables`: those of the template in use (default: the checkpoint's)."""
        if kwargs is None:
            return
        if not isinstance(kwargs, dict):
            raise InvalidInputError("chat_template_kwargs must be a dict")
        from glimpse.processing.prompt import check_chat_template_kwargs

        check_chat_template_kwargs(kwargs, self._template_kwargs if variables is None else variables)

    def _chat_processor(self, chat_template: str | None, tools: list[dict] | None, kwargs: dict | None):
        """The processor that renders a chat call: the engine's, or a copy holding this call's `chat_template`;
        `tools` and `chat_template_kwargs` checked against that template first."""
        from jinja2 import TemplateSyntaxError

        from glimpse.processing.prompt import template_variables

        processor, variables = self.processor, None
        if chat_template is not None:
            processor = copy.copy(self.processor)  # shares the tokenizer and the media settings; not the engine's
            processor.chat_template = _read_chat_template(chat_template)
            try:
                variables = template_variables(processor.chat_template)
            except TemplateSyntaxError as exc:
                raise InvalidInputError(f"chat_template is not a valid Jinja template: {exc.message} (line "
                                        f"{exc.lineno})") from None  # fmt: skip
        self._check_template_kwargs(kwargs, variables)
        if tools is not None:
            _check_tools(tools, processor.chat_template)
        return processor

    def _process(self, prompt: Any, mm_kwargs: dict | None) -> tuple[ProcessedPrompt | list[int] | str, float]:
        t0 = time.perf_counter()
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return list(prompt["prompt_token_ids"]), 0.0
            if "prompt" not in prompt:
                raise InvalidInputError("a dict prompt needs 'prompt' (text with media markers) or 'prompt_token_ids'")
            mm = prompt.get("multi_modal_data") or {}
            unknown = set(mm) - {"image", "video"}
            if unknown:
                raise InvalidInputError(f"multi_modal_data keys {sorted(unknown)} are not supported; use image, video")
            images, videos = _images(mm.get("image")), _videos(mm.get("video"))
            kwargs = {**(mm_kwargs or {}), **(prompt.get("mm_processor_kwargs") or {})}
            processed = self.processor(text=prompt["prompt"], images=images, videos=videos, **kwargs)
            return processed, time.perf_counter() - t0
        return prompt, 0.0

    def _run(self, prompts: list, sampling_params, use_tqdm: bool) -> list[RequestOutput]:
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or self.get_default_sampling_params()] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise InvalidInputError(f"{len(params)} sampling params for {len(prompts)} prompts")
        ids = []
        try:
            for (prompt, prep), p in zip(prompts, params, strict=True):
                ids.append(self.engine.add_request(None, prompt, p, preprocess_seconds=prep, final_only=True))
        except Exception:
            for rid in ids:
                self.engine.abort(rid)
            raise
        results: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc="Processed prompts", disable=not use_tqdm or len(ids) < 2)
        try:
            while self.engine.has_unfinished_requests():
                outputs = self._step()
                for out in outputs:
                    if out.finished:
                        results[out.request_id] = out
                        bar.update(1)
        except Exception:
            for rid in ids:
                self.engine.abort(rid)
            raise
        finally:
            bar.close()
        return [self._readable(results[i]) for i in ids]

    def _step(self) -> list[RequestOutput]:
        """One engine step, then the grammar errors it surfaced raised and a pause if it only waited for them."""
        outputs = self.engine.step()
        self._raise_grammar_errors()
        self._idle_while_compiling()
        return outputs

    def _idle_while_compiling(self) -> None:
        """Sleep a moment when the step ran nothing because every request waits for its grammar: the compile
        pool needs the cores more than a busy loop does."""
        if not self.engine.ran_last_step and self.engine.grammars_pending():
            time.sleep(0.002)

    def _raise_grammar_errors(self) -> None:
        """A structured-output constraint that failed to compile (or timed out) is the caller's error."""
        for _, error in self.engine.take_grammar_events():
            if error is not None:
                raise error

    def _readable(self, out: RequestOutput) -> RequestOutput:
        """Let the completions decode their `sample_logprobs` (the engine leaves the tokenizer out: its
        outputs may cross processes)."""
        for c in out.outputs:
            c.tokenizer = self.processor.tokenizer
        return out


TEMPLATES = Path(__file__).resolve().parent / "templates"  # chat templates glimpse ships, by name


PREPROCESS_THREADS = 2  # as `glimpse serve --preprocess-workers`: JPEG decoding and resizing release the GIL


def _in_parallel(fn, items) -> list:
    """[fn(x) for x in items], on a few threads when there are several: 64 image chats take 0.18 s on one
    thread, 0.13 s on two, while the engine's cores would otherwise wait. The first failing item (in
    input order) raises, as the loop would. PIL images are loaded here first: one lazily opened image
    may appear in several prompts, and PIL cannot load an image from two threads at once."""
    items = list(items)
    if len(items) < 2:
        return [fn(x) for x in items]
    _load_images(items)
    with ThreadPoolExecutor(min(PREPROCESS_THREADS, len(items)), thread_name_prefix="glimpse-preprocess") as pool:
        return list(pool.map(fn, items))


def _load_images(x: Any) -> None:
    """Load (decode) every PIL image inside prompts or messages, on this thread."""
    from PIL import Image

    if isinstance(x, Image.Image):
        with contextlib.suppress(Exception):  # a broken image: its prompt's processing reports it, in order
            x.load()
    elif isinstance(x, dict):
        for v in x.values():
            _load_images(v)
    elif isinstance(x, (list, tuple)):
        for v in x:
            _load_images(v)


def _read_chat_template(value: str) -> str:
    """`chat_template=`: Jinja text (it holds '{{' or '{%'), a template file, or a shipped template's name."""
    if not isinstance(value, str):
        raise InvalidInputError(f"chat_template must be a string (the Jinja text, a file or a shipped name), got "
                                f"{type(value).__name__}")  # fmt: skip
    if "{{" in value or "{%" in value:
        return value
    shipped = sorted(f.stem for f in TEMPLATES.glob("*.jinja"))
    if value in shipped:
        return (TEMPLATES / f"{value}.jinja").read_text(encoding="utf-8")
    if Path(value).is_file():
        return Path(value).read_text(encoding="utf-8")
    raise InvalidInputError(f"chat_template {value[:80]!r} is no Jinja text (no '{{{{' or '{{%'), no file and no "
                            f"template glimpse ships ({', '.join(shipped)})")  # fmt: skip


def _check_tools(tools: Any, template: str | None) -> None:
    """OpenAI function tools, under a template that shows them to the model (else they would be dropped silently)."""
    from glimpse.server.tool_parsers import template_renders_tools

    if not isinstance(tools, list):
        raise InvalidInputError(f"tools must be a list of function tools, got {type(tools).__name__}")
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        function = function if isinstance(function, dict) else None
        if function is None or tool.get("type") != "function" or not isinstance(function.get("name"), str):
            raise InvalidInputError(f'tools[{i}] must be {{"type": "function", "function": {{"name": ..., '
                                    '"parameters": {...}}}, as OpenAI and vLLM take tools')  # fmt: skip
    if tools and not template_renders_tools(template):
        raise InvalidInputError("this model's chat template does not render tools, so the model would never see them; "
                                "pass a chat_template that does (glimpse ships chat_template='qwen2_5_vl_hermes' for "
                                "Qwen2.5-VL; see docs/tool-calling.md)")  # fmt: skip


def _images(x: Any) -> list:
    """multi_modal_data["image"] as vLLM reads it: one image, a list of them, or a 4-D array (a batch)."""
    if x is None:
        return []
    if isinstance(x, np.ndarray | torch.Tensor) and x.ndim == 4:
        return list(x)
    return list(x) if isinstance(x, list | tuple) else [x]


def _videos(x: Any) -> list:
    """multi_modal_data["video"] as vLLM reads it: one video (a file, `(frames, metadata)`, a 4-D array, a list
    of frames) or a list of videos."""
    if x is None:
        return []
    return [x] if is_decoded_video(x) or not isinstance(x, list | tuple) else list(x)
