"""Step 0 of the data path, the OpenAI wire format: pydantic request models and response builders.

`ChatCompletionRequest` / `CompletionRequest` validate a JSON body; `unsupported_field(body)`
names fields that would change the output but glimpse does not implement (400, never ignored);
`sampling_params(req, ...)` gives the engine's `SamplingParams`. `ChatFormat` and
`CompletionFormat` turn engine `RequestOutput`s into OpenAI dicts, whole or as stream chunks:
`usage` (with per-media token counts), logprobs, and for chat the reasoning/box split and tool calls
(glimpse/server/tool_parsers.py). The bodies
of vLLM's /tokenize (text or messages) and /detokenize are here too.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from types import MappingProxyType
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from glimpse.engine.llm_engine import RequestOutput
from glimpse.engine.sampler import TopLogprobs
from glimpse.engine.sampling_params import SamplingParams, StructuredOutputsParams
from glimpse.errors import InvalidInputError, PromptError
from glimpse.processing.inputs import ProcessedPrompt
from glimpse.server.reasoning import GlmReasoningParser, ParsedDelta
from glimpse.server.tool_parsers import ToolCallParser, ToolDelta, ToolPlan


class _Strict(BaseModel):
    # strict: "2" is not an int; extra="forbid": an unknown field is a 400, never ignored.
    model_config = ConfigDict(extra="forbid", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        """An explicit JSON null for a field with a default means that default (clients send both)."""
        if not isinstance(data, dict):
            return data
        fields = cls.model_fields
        return {k: v for k, v in data.items() if v is not None or k not in fields or fields[k].default is None}


# ---- chat messages ---------------------------------------------------------------------------
class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImageURL(_Strict):
    url: str
    # "low"/"high" would change the token count; per-request resolution goes in mm_processor_kwargs.
    detail: Literal["auto"] | None = None


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


class VideoURL(_Strict):
    url: str


class VideoPart(_Strict):
    type: Literal["video_url"]
    video_url: VideoURL


ContentPart = Annotated[TextPart | ImagePart | VideoPart, Field(discriminator="type")]


class ToolCallFunction(_Strict):
    name: str
    arguments: str  # JSON text of an object, as OpenAI sends it (the template gets the object)


class ToolCallIn(_Strict):
    """A call in an earlier assistant turn (the history), rendered through the chat template."""

    id: str | None = None
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None  # a tool result may hold images and videos too
    name: str | None = None
    reasoning_content: str | None = None  # an earlier assistant turn's thinking (GLM templates render it)
    tool_calls: list[ToolCallIn] | None = None  # assistant turns
    tool_call_id: str | None = None  # tool turns


class FunctionDef(_Strict):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of the arguments object
    strict: bool | None = None  # constrained or not, arguments follow tool_choice (docs/tool-calling.md)


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


class StreamOptions(_Strict):
    include_usage: bool = False


class JsonSchemaFormat(_Strict):
    """OpenAI's `response_format.json_schema`."""

    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None  # the output follows the schema either way, with no properties it does not name


class ResponseFormatParam(_Strict):
    """OpenAI's `response_format`: text (no constraint), any JSON object, or a JSON schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputsBody(_Strict):
    """vLLM's `structured_outputs` extra body: exactly one key."""

    json_: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None  # xgrammar's EBNF
    json_object: bool | None = None
    structural_tag: str | None = None


class _Sampling(_Strict):
    """Fields shared by both endpoints: OpenAI's, then vLLM's extras."""

    model: str | None = None
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: str | list[str] | None = None
    logit_bias: dict[str, float] | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stream: bool = False
    stream_options: StreamOptions | None = None
    # Accepted and not acted on: they never change the output.
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    # vLLM extras
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # Structured output (docs/structured-output.md): OpenAI's response_format, vLLM's structured_outputs extra
    # and its older guided_* fields; at most one of them. thinking_token_budget: reasoning tokens before </think>.
    response_format: ResponseFormatParam | None = None
    structured_outputs: StructuredOutputsBody | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    thinking_token_budget: int | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None  # None: auto with tools
    parallel_tool_calls: bool = True
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    mm_processor_kwargs: dict[str, Any] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = 16  # OpenAI's default for this endpoint
    logprobs: int | None = None
    echo: Literal[False] = False
    best_of: int | None = None


class TokenizeCompletionRequest(_Strict):
    """vLLM's POST /tokenize body for a text prompt."""

    model: str | None = None
    prompt: str
    add_special_tokens: bool = True  # vLLM's default; /v1/completions tokenizes a text prompt without them
    return_token_strs: bool = False


class TokenizeChatRequest(_Strict):
    """vLLM's POST /tokenize body for chat messages: preprocessed as a chat completion would be, media included."""

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[Tool] | None = None  # rendered as a chat completion renders them, so the count is the same
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False  # only false: a chat prompt is the template's text, special tokens and all
    return_token_strs: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    mm_processor_kwargs: dict[str, Any] | None = None


class DetokenizeRequest(_Strict):
    """vLLM's POST /detokenize body."""

    model: str | None = None
    tokens: list[int]


def prompt_list(prompt: str | list[int] | list[str] | list[list[int]]) -> list[str] | list[list[int]]:
    """A completions `prompt` field as its list of prompts (a string or one token list is one prompt)."""
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        return [prompt]  # type: ignore[list-item]
    return prompt  # type: ignore[return-value]


# Fields of OpenAI's or vLLM's APIs that would change the output and that glimpse does not
# implement -> a predicate saying which values are harmless (absent/neutral) and may pass.
_UNSUPPORTED = MappingProxyType({
    "functions": lambda v: v is None or v == [],  # OpenAI's deprecated form of tools: send tools
    "function_call": lambda v: v is None or v == "none",
    "modalities": lambda v: v is None or v == ["text"],
    "audio": lambda v: v is None,
    "prediction": lambda v: v is None,
    "reasoning_effort": lambda v: v is None,
    "web_search_options": lambda v: v is None,
    "suffix": lambda v: v is None,
    "logits_processors": lambda v: v is None,
    "prompt_logprobs": lambda v: v is None,
    "use_beam_search": lambda v: v is None or v is False,
    "length_penalty": lambda v: v is None or v == 1.0,
    "truncate_prompt_tokens": lambda v: v is None,
    "documents": lambda v: v is None,
    "chat_template": lambda v: v is None,
})


def unsupported_field(body: dict) -> str | None:
    """The first field glimpse would have to ignore (it changes the output but is not implemented)."""
    return next((name for name, harmless in _UNSUPPORTED.items() if name in body and not harmless(body[name])), None)


def without_neutral_fields(body: dict) -> dict:
    """The body minus unsupported fields whose values are neutral (checked by unsupported_field first)."""
    return {k: v for k, v in body.items() if k not in _UNSUPPORTED}


def sampling_params(req: ChatCompletionRequest | CompletionRequest, prompt_len: int, max_model_len: int,
                    defaults: dict | None = None) -> SamplingParams:  # fmt: skip
    """Engine sampling settings from a request; max_tokens defaults to what max_model_len leaves.

    `defaults` (the checkpoint's generation_config.json sampling settings, as vLLM's
    `--generation-config auto`) fill temperature/top_p/top_k/repetition_penalty the request leaves unset.
    """
    given = req.model_fields_set
    pick = {k: (getattr(req, k) if k in given or k not in (defaults or {}) else defaults[k])
            for k in ("temperature", "top_p", "top_k", "repetition_penalty")}  # fmt: skip
    if isinstance(req, ChatCompletionRequest):
        if req.max_tokens is not None and req.max_completion_tokens is not None and req.max_tokens != req.max_completion_tokens:
            raise InvalidInputError("max_tokens and max_completion_tokens disagree; send only one")
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        if req.top_logprobs is not None and not req.logprobs:
            raise InvalidInputError("top_logprobs needs logprobs=true")
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
    else:
        if req.best_of is not None and req.best_of != req.n:
            raise InvalidInputError(f"best_of={req.best_of} (other than n) is not supported; glimpse returns all n samples")
        max_tokens, logprobs = req.max_tokens, req.logprobs
    room = max_model_len - prompt_len
    if room <= 0:
        raise PromptError(
            f"the prompt has {prompt_len} tokens but max_model_len is {max_model_len}, which leaves no room for "
            "output; shorten the prompt, lower image/video resolution (mm_processor_kwargs) or start the server "
            "with a larger --max-model-len")  # fmt: skip
    if max_tokens is None:
        max_tokens = room
    elif prompt_len + max_tokens > max_model_len:
        raise PromptError(
            f"the prompt has {prompt_len} tokens and max_tokens is {max_tokens}, {prompt_len + max_tokens} in all, "
            f"but max_model_len is {max_model_len}; lower max_tokens (at most {room}), shorten the prompt or lower "
            "image/video resolution (mm_processor_kwargs)")  # fmt: skip
    return SamplingParams(
        n=req.n, temperature=pick["temperature"], top_p=pick["top_p"], top_k=pick["top_k"], min_p=req.min_p, seed=req.seed,
        max_tokens=max_tokens, min_tokens=req.min_tokens, stop=req.stop, stop_token_ids=req.stop_token_ids,
        ignore_eos=req.ignore_eos, repetition_penalty=pick["repetition_penalty"], presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty, logprobs=logprobs, logit_bias=req.logit_bias,
        skip_special_tokens=req.skip_special_tokens, include_stop_str_in_output=req.include_stop_str_in_output,
        structured_outputs=structured_outputs(req), thinking_token_budget=req.thinking_token_budget,
    )  # fmt: skip


def structured_outputs(req: ChatCompletionRequest | CompletionRequest) -> StructuredOutputsParams | None:
    """The request's output constraint from response_format, structured_outputs or guided_* (one of them at most)."""
    given: dict[str, StructuredOutputsParams | None] = {}
    fmt = req.response_format
    if fmt is not None and fmt.type != "text":
        if fmt.type == "json_object":
            if fmt.json_schema is not None:
                raise InvalidInputError("response_format: json_schema goes with type 'json_schema', not 'json_object'")
            given["response_format"] = StructuredOutputsParams(json_object=True)
        else:
            if fmt.json_schema is None:
                raise InvalidInputError("response_format of type 'json_schema' needs a json_schema object with a schema")
            given["response_format"] = StructuredOutputsParams(json=fmt.json_schema.schema_)
    if req.structured_outputs is not None:
        body = req.structured_outputs
        keys = [k for k in ("json", "regex", "choice", "grammar", "json_object", "structural_tag")
                if getattr(body, "json_" if k == "json" else k) not in (None, False)]  # fmt: skip
        if len(keys) != 1:
            raise InvalidInputError("structured_outputs needs exactly one of json, regex, choice, grammar, json_object, "
                                    f"structural_tag; got {', '.join(keys) if keys else 'none'}")  # fmt: skip
        value = getattr(body, "json_" if keys[0] == "json" else keys[0])
        given["structured_outputs"] = StructuredOutputsParams(**{keys[0]: value})
    for name, key in (("guided_json", "json"), ("guided_regex", "regex"), ("guided_choice", "choice"),
                      ("guided_grammar", "grammar")):  # fmt: skip
        if getattr(req, name) is not None:
            given[name] = StructuredOutputsParams(**{key: getattr(req, name)})
    if len(given) > 1:
        raise InvalidInputError(f"{' and '.join(given)} each constrain the output; send one of them")
    return next(iter(given.values()), None)


# ---- responses -------------------------------------------------------------------------------
def usage(prompt: ProcessedPrompt, completion_tokens: int, cached_tokens: int = 0) -> dict:
    """OpenAI usage plus `prompt_tokens_details.{image_tokens, video_tokens, media}` (per item)."""
    media = []
    for m in prompt.media:
        item: dict[str, Any] = {"type": m.kind, "tokens": m.num_tokens, "grid_thw": list(m.grid_thw)}
        if m.kind == "video":
            item["frame_indices"] = list(m.frame_indices)
            item["timestamps"] = [round(t, 6) for t in m.timestamps]
        media.append(item)
    n_prompt = len(prompt.input_ids)
    return {
        "prompt_tokens": n_prompt,
        "completion_tokens": completion_tokens,
        "total_tokens": n_prompt + completion_tokens,
        "prompt_tokens_details": {
            "cached_tokens": cached_tokens,
            "image_tokens": sum(m.num_tokens for m in prompt.media if m.kind == "image"),
            "video_tokens": sum(m.num_tokens for m in prompt.media if m.kind == "video"),
            "media": media,
        },
    }


def _bytes_to_unicode() -> dict[int, str]:
    """The byte-level BPE alphabet: printable bytes map to themselves, the rest to code points >= 256."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


class TokenText:
    """Token id -> (display text, exact bytes), for logprobs. A token that ends inside a multi-byte
    character shows as `bytes:\\xe7\\x8c` (vLLM's convention) while `bytes` stays exact."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.byte_of = {c: b for b, c in _bytes_to_unicode().items()}
        self.added = {i: t.content for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()}
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        hit = self._cache.get(token_id)
        if hit is not None:
            return hit
        if token_id in self.added:
            raw = self.added[token_id].encode()
        else:
            piece = self.tokenizer.convert_ids_to_tokens(token_id) or ""
            if all(c in self.byte_of for c in piece):
                raw = bytes(self.byte_of[c] for c in piece)
            else:  # not a byte-level vocabulary entry: fall back to decoding it
                raw = self.tokenizer.decode([token_id]).encode()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
        self._cache[token_id] = out = (text, list(raw))
        return out


def chat_logprobs(entries: list[TopLogprobs], token_text: TokenText) -> dict:
    def one(token_id: int, logprob: float) -> dict:
        text, raw = token_text(token_id)
        return {"token": text, "logprob": logprob, "bytes": raw}

    return {"content": [one(e.token_id, e.logprob) | {"top_logprobs": [one(t, lp) for t, lp in e.top]}
                        for e in entries]}  # fmt: skip


def completion_logprobs(entries: list[TopLogprobs], token_text: TokenText, prefix: bytes = b"") -> tuple[dict, bytes]:
    """Legacy completions logprobs; `prefix` is the output bytes before `entries` (for text_offset).

    Returns the dict and the output bytes after `entries`. A token's text_offset counts the
    complete characters before it.
    """
    tokens, token_logprobs, tops, offsets = [], [], [], []
    for e in entries:
        text, raw = token_text(e.token_id)
        tokens.append(text)
        token_logprobs.append(e.logprob)
        tops.append({token_text(t)[0]: lp for t, lp in e.top})
        offsets.append(len(prefix.decode("utf-8", errors="ignore")))
        prefix += bytes(raw)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": tops, "text_offset": offsets}, prefix


def chunk(request_id: str, model: str, created: int, choices: list[dict], obj: str = "chat.completion.chunk",
          include_usage: bool = False, usage_: dict | None = None) -> dict:  # fmt: skip
    out = {"id": request_id, "object": obj, "created": created, "model": model, "choices": choices}
    if include_usage:
        out["usage"] = usage_
    return out


def now() -> int:
    return int(time.time())


def model_card(model_id: str, max_model_len: int, created: int) -> dict:
    """One entry of GET /v1/models (and the answer of GET /v1/models/{id}), with vLLM's `max_model_len`."""
    return {"id": model_id, "object": "model", "created": created, "owned_by": "glimpse",
            "max_model_len": max_model_len}  # fmt: skip


# ---- response formats: engine outputs -> one endpoint's JSON ----------------------------------
class ResponseFormat:
    """Turns engine outputs into one endpoint's JSON: `full` (non-streaming) or start/step/end chunks."""

    id: str

    def full(self, prompts: list[ProcessedPrompt], finals: list[RequestOutput]) -> dict:
        raise NotImplementedError

    def engine_params(self, params: SamplingParams) -> SamplingParams:
        """The engine's settings for this format (chat with tools adds the call constraint)."""
        return params

    def start(self, prompt: ProcessedPrompt, n: int) -> list[dict]:
        return []

    def step(self, out: RequestOutput) -> list[dict]:
        raise NotImplementedError

    def end(self, prompt: ProcessedPrompt, final: RequestOutput) -> list[dict]:
        raise NotImplementedError


class ChatFormat(ResponseFormat):
    def __init__(self, req: ChatCompletionRequest, model_name: str, token_text: TokenText, reasoning: bool,
                 tools: ToolPlan | None = None) -> None:  # fmt: skip
        self.req, self.model_name, self.token_text, self.reasoning = req, model_name, token_text, reasoning
        self.tools = tools  # None: the content is not read for tool calls
        self.tool_parsers: dict[int, ToolCallParser] = {}
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = now()
        self.include_usage = bool(req.stream_options and req.stream_options.include_usage)
        self.parsers: dict[int, GlmReasoningParser] = {}
        self.finish_sent: set[int] = set()  # choices whose finish chunk is out
        self.prompt_text: str | None = None

    def _split(self, index: int, text: str, finished: bool) -> ParsedDelta:
        """Route text through choice `index`'s parser (streaming and non-streaming use the same one)."""
        if not self.reasoning:
            return ParsedDelta(content=text)
        if index not in self.parsers:
            self.parsers[index] = GlmReasoningParser(GlmReasoningParser.prompt_opens_thinking(self.prompt_text))
        parser = self.parsers[index]
        out = parser.feed(text)
        if finished:
            tail = parser.finish()
            out = ParsedDelta(out.content + tail.content, out.reasoning + tail.reasoning, out.boxes + tail.boxes)
        return out

    def _calls(self, index: int, content: str, finished: bool) -> ToolDelta:
        """Route answer text through choice `index`'s tool-call parser (content unchanged without tools)."""
        if self.tools is None:
            return ToolDelta(content)
        if index not in self.tool_parsers:
            self.tool_parsers[index] = self.tools.new_parser()
        parser = self.tool_parsers[index]
        out = parser.feed(content)
        if finished:
            tail = parser.finish()
            out = ToolDelta(out.content + tail.content, out.calls + tail.calls)
        return out

    def _finish_reason(self, index: int, reason: str | None) -> str | None:
        """OpenAI's "tool_calls" for a choice that stopped after calling tools."""
        parser = self.tool_parsers.get(index)
        return "tool_calls" if reason == "stop" and parser is not None and parser.calls else reason

    def engine_params(self, params: SamplingParams) -> SamplingParams:
        if self.tools is None:
            return params
        changes: dict[str, Any] = {}
        if self.tools.constraint is not None:
            if params.structured_outputs is not None:
                raise InvalidInputError("tool_choice 'required' or a named function constrains the output to tool "
                                        "calls, so response_format / structured_outputs cannot constrain it too; "
                                        "send one of them")  # fmt: skip
            changes["structured_outputs"] = self.tools.constraint
        if self.tools.keep_special_tokens:
            changes["skip_special_tokens"] = False  # the call tags are special tokens here: the parser must see them
        return dataclasses.replace(params, **changes) if changes else params

    def _chunk(self, choice: dict) -> dict:
        return chunk(self.id, self.model_name, self.created, [choice], include_usage=self.include_usage)

    def full(self, prompts: list[ProcessedPrompt], finals: list[RequestOutput]) -> dict:
        final, prompt = finals[0], prompts[0]
        self.prompt_text = prompt.text
        choices = []
        for c in final.outputs:
            parsed = self._split(c.index, c.text, finished=True)
            answer = self._calls(c.index, parsed.content, finished=True)
            calls = self.tool_parsers[c.index].calls if self.tools is not None else []
            message: dict[str, Any] = {"role": "assistant", "content": answer.content if answer.content or not calls
                                       else None}  # fmt: skip
            if calls:
                message["tool_calls"] = [call.as_openai() for call in calls]
            if self.reasoning:
                message |= {"reasoning_content": parsed.reasoning or None, "boxes": parsed.boxes}
            logprobs = chat_logprobs(c.logprobs, self.token_text) if c.logprobs is not None else None
            choices.append({"index": c.index, "message": message, "logprobs": logprobs,
                            "finish_reason": self._finish_reason(c.index, c.finish_reason),
                            "stop_reason": c.stop_reason})  # fmt: skip
        n_out = sum(len(c.token_ids) for c in final.outputs)
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model_name,
                "choices": choices, "usage": usage(prompt, n_out, final.num_cached_tokens)}  # fmt: skip

    def start(self, prompt: ProcessedPrompt, n: int) -> list[dict]:
        self.prompt_text = prompt.text
        return [self._chunk({"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None}) for i in range(n)]  # fmt: skip

    def step(self, out: RequestOutput) -> list[dict]:
        events = []
        for c in out.outputs:
            if c.index in self.finish_sent:
                continue  # the final output lists every choice again, earlier-finished ones included
            done = c.finish_reason is not None
            parsed = self._split(c.index, c.delta_text, done)
            answer = self._calls(c.index, parsed.content, done)
            delta: dict = {}
            if parsed.reasoning:
                delta["reasoning_content"] = parsed.reasoning
            if answer.content:
                delta["content"] = answer.content
            if parsed.boxes:
                delta["boxes"] = parsed.boxes
            logprobs = None
            if c.delta_logprobs:
                logprobs = chat_logprobs(c.delta_logprobs, self.token_text)
            if delta or logprobs:
                events.append(self._chunk({"index": c.index, "delta": delta, "logprobs": logprobs, "finish_reason": None}))
            # One chunk per call piece: a call's name (and id) goes out in one chunk, its arguments in a later one.
            for call in answer.calls:
                events.append(self._chunk({"index": c.index, "delta": {"tool_calls": [call.as_openai()]},
                                           "logprobs": None, "finish_reason": None}))  # fmt: skip
            if done:
                self.finish_sent.add(c.index)
                events.append(self._chunk({"index": c.index, "delta": {}, "logprobs": None,
                                           "finish_reason": self._finish_reason(c.index, c.finish_reason),
                                           "stop_reason": c.stop_reason}))  # fmt: skip
        return events

    def end(self, prompt: ProcessedPrompt, final: RequestOutput) -> list[dict]:
        if not self.include_usage:
            return []
        n_out = sum(len(c.token_ids) for c in final.outputs)
        return [chunk(self.id, self.model_name, self.created, [], include_usage=True,
                      usage_=usage(prompt, n_out, final.num_cached_tokens))]  # fmt: skip


class CompletionFormat(ResponseFormat):
    def __init__(self, req: CompletionRequest, model_name: str, token_text: TokenText) -> None:
        self.req, self.model_name, self.token_text = req, model_name, token_text
        self.id = f"cmpl-{uuid.uuid4().hex}"
        self.created = now()
        self.include_usage = bool(req.stream_options and req.stream_options.include_usage)
        self.logprobs_prefix: dict[int, bytes] = {}  # index -> the output's bytes so far (text_offset)
        self.finish_sent: set[int] = set()  # choices whose finish chunk is out

    def _chunk(self, choices: list[dict], usage_: dict | None = None) -> dict:
        return chunk(self.id, self.model_name, self.created, choices, obj="text_completion",
                     include_usage=self.include_usage, usage_=usage_)  # fmt: skip

    def full(self, prompts: list[ProcessedPrompt], finals: list[RequestOutput]) -> dict:
        choices, n_prompt, n_out, cached = [], 0, 0, 0
        for i, final in enumerate(finals):
            for c in final.outputs:
                lp = completion_logprobs(c.logprobs, self.token_text)[0] if c.logprobs is not None else None
                choices.append({"index": i * self.req.n + c.index, "text": c.text, "logprobs": lp,
                                "finish_reason": c.finish_reason, "stop_reason": c.stop_reason})  # fmt: skip
                n_out += len(c.token_ids)
            n_prompt += len(final.prompt_token_ids)
            cached += final.num_cached_tokens
        totals = {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out,
                  "prompt_tokens_details": {"cached_tokens": cached}}  # fmt: skip
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model_name,
                "choices": choices, "usage": totals}  # fmt: skip

    def step(self, out: RequestOutput) -> list[dict]:
        events = []
        for c in out.outputs:
            if c.index in self.finish_sent:
                continue  # the final output lists every choice again, earlier-finished ones included
            lp = None
            if c.delta_logprobs:
                prefix = self.logprobs_prefix.get(c.index, b"")
                lp, self.logprobs_prefix[c.index] = completion_logprobs(c.delta_logprobs, self.token_text, prefix)
            if c.finish_reason is not None:
                self.finish_sent.add(c.index)
            if c.delta_text or lp or c.finish_reason is not None:
                events.append(self._chunk([{"index": c.index, "text": c.delta_text, "logprobs": lp,
                                            "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}]))  # fmt: skip
        return events

    def end(self, prompt: ProcessedPrompt, final: RequestOutput) -> list[dict]:
        if not self.include_usage:
            return []
        n_out = sum(len(c.token_ids) for c in final.outputs)
        n_prompt = len(final.prompt_token_ids)
        return [self._chunk([], {"prompt_tokens": n_prompt, "completion_tokens": n_out,
                                 "total_tokens": n_prompt + n_out})]  # fmt: skip
