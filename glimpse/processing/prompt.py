"""Step 3: prompt expansion. A prompt holding one marker per media item -> token ids with each
marker replaced by the family's exact token run, plus where every item's embedding slots sit.

GLM image: `<|image|>` -> `<|image|>` x n.   GLM video: `<|video|>` -> per temporal frame
`<|begin_of_image|> <|image|> x n <|end_of_image|> TS`.  Qwen: `<|image_pad|>` / `<|video_pad|>`
x n. Markers are special tokens, so tokenizing the text between them piece by piece equals
HF's tokenization of the whole expanded string (special tokens split the text first).
A bare GLM `<|video|>` is first wrapped as the chat template writes it (`wrap_bare_videos`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from glimpse.errors import InvalidInputError, PromptError


@dataclass(frozen=True)
class PlaceholderTokens:
    """The marker strings and ids of one checkpoint, read from its tokenizer and config."""

    image_marker: str  # "<|image|>" / "<|image_pad|>"
    video_marker: str  # "<|video|>" / "<|video_pad|>"
    image_token_id: int  # id written into every image embedding slot
    video_token_id: int  # id of video slots (GLM: the image token id; Qwen: <|video_pad|>)
    frame_start_id: int | None = None  # GLM <|begin_of_image|>
    frame_end_id: int | None = None  # GLM <|end_of_image|>
    # The text the chat template writes around one marker (GLM <|begin_of_image|> ... <|end_of_image|>,
    # Qwen <|vision_start|> ... <|vision_end|>): a raw prompt that uses `*_placeholder` gets the same tokens.
    image_wrap: tuple[str, str] = ("", "")
    video_wrap: tuple[str, str] = ("", "")

    @property
    def image_placeholder(self) -> str:
        """One image as the chat template writes it (vLLM's placeholder string)."""
        return self.image_wrap[0] + self.image_marker + self.image_wrap[1]

    @property
    def video_placeholder(self) -> str:
        return self.video_wrap[0] + self.video_marker + self.video_wrap[1]


@dataclass(frozen=True)
class MediaPlacement:
    """Where one media item's embedding slots sit in the final input_ids.

    spans: [(start, end)] token index ranges holding its embedding slots (one per frame for
    GLM video, one for everything else); num_tokens = sum of span lengths = embeddings it needs.
    """

    kind: str  # "image" | "video"
    index: int  # position among items of its kind
    spans: tuple[tuple[int, int], ...]
    num_tokens: int


def wrap_bare_videos(text: str, tokens: PlaceholderTokens) -> str:
    """GLM: wrap each video marker that stands alone in `<|begin_of_video|> ... <|end_of_video|>`.

    A GLM video's slots are image tokens; only the video wrapper around them makes them a video (for
    M-RoPE, mrope.glm_mm_token_types), so a bare `<|video|>` has just one meaning, and without its
    wrapper the prompt cannot run. A marker with either neighbour already in place is left as written;
    families whose video slots have their own token id (Qwen) are left unchanged, as HF leaves them.
    """
    opening, closing = tokens.video_wrap
    if tokens.video_token_id != tokens.image_token_id or not opening or tokens.video_marker not in text:
        return text
    bare = f"(?<!{re.escape(opening)}){re.escape(tokens.video_marker)}(?!{re.escape(closing)})"
    return re.sub(bare, lambda _: tokens.video_placeholder, text)


def expand_prompt(
    text: str,
    tokenizer,
    tokens: PlaceholderTokens,
    image_tokens: list[int],
    video_frames: list[tuple[int, list[str]]],
) -> tuple[list[int], list[MediaPlacement]]:
    """Tokenize `text`, expanding each media marker in document order.

    image_tokens[i]: embedding count of image i. video_frames[j]: (tokens per temporal frame,
    the timestamp text of each temporal frame) for GLM; for Qwen the list of timestamps is
    empty and the count is the video's total. Raises PromptError when the number of markers
    and items differ.
    """
    pattern = "(" + "|".join(re.escape(m) for m in (tokens.image_marker, tokens.video_marker)) + ")"
    pieces = re.split(pattern, text)
    n_img = pieces.count(tokens.image_marker)
    n_vid = pieces.count(tokens.video_marker)
    if n_img != len(image_tokens) or n_vid != len(video_frames):
        raise PromptError(
            f"the prompt has {n_img} image and {n_vid} video placeholders but {len(image_tokens)} images "
            f"and {len(video_frames)} videos were given; each item needs exactly one placeholder "
            f"({tokens.image_marker} / {tokens.video_marker}) in document order"
        )
    ids: list[int] = []
    placements: list[MediaPlacement] = []
    counters = {"image": 0, "video": 0}
    for piece in pieces:
        if piece == tokens.image_marker:
            i = counters["image"]
            n = image_tokens[i]
            placements.append(MediaPlacement("image", i, ((len(ids), len(ids) + n),), n))
            ids.extend([tokens.image_token_id] * n)
            counters["image"] += 1
        elif piece == tokens.video_marker:
            j = counters["video"]
            per_frame, stamps = video_frames[j]
            spans = []
            if stamps:  # GLM: one image-like run per temporal frame, then its timestamp text
                for ts in stamps:
                    ids.append(tokens.frame_start_id)
                    spans.append((len(ids), len(ids) + per_frame))
                    ids.extend([tokens.video_token_id] * per_frame)
                    ids.append(tokens.frame_end_id)
                    ids.extend(tokenizer.encode(ts, add_special_tokens=False))
            else:
                spans.append((len(ids), len(ids) + per_frame))
                ids.extend([tokens.video_token_id] * per_frame)
            placements.append(MediaPlacement("video", j, tuple(spans), sum(e - s for s, e in spans)))
            counters["video"] += 1
        elif piece:
            ids.extend(tokenizer.encode(piece, add_special_tokens=False))
    return ids, placements


def check_chat_template_kwargs(kwargs: dict, allowed: frozenset[str] | set[str]) -> None:
    """Refuse `chat_template_kwargs` the chat template never reads (they would be ignored silently) and
    values that are not plain scalars; `allowed`: the template's variables. Used by `LLM.chat` and the server."""
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        names = ", ".join(sorted(allowed)) or "none"
        raise InvalidInputError(f"chat_template_kwargs {unknown} are not read by this model's chat template, so they "
                                f"would be ignored; allowed: {names}")  # fmt: skip
    for key, value in kwargs.items():
        if not isinstance(value, bool | int | float | str):
            raise InvalidInputError(f"chat_template_kwargs.{key} must be a boolean, number or string")


# Variables every chat template gets from the caller or from the renderer, never from a request's kwargs
_RESERVED_TEMPLATE_VARS = frozenset({"messages", "add_generation_prompt", "continue_final_message", "tools",
                                     "documents", "raise_exception", "strftime_now", "chat_template"})  # fmt: skip


def template_variables(template: str | None) -> frozenset[str]:
    """The variables a chat template reads that requests may set (e.g. enable_thinking, add_vision_id)."""
    if not template:
        return frozenset()
    from jinja2 import meta
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(extensions=[loopcontrols])
    names = meta.find_undeclared_variables(env.parse(template))
    return frozenset(n for n in names if n not in _RESERVED_TEMPLATE_VARS and not n.endswith("_token"))


def with_argument_objects(message: dict, where: str) -> dict:
    """An assistant message whose `tool_calls` arguments are objects, as chat templates read them (GLM's
    iterates `arguments.items()`); OpenAI clients send them as JSON text, which must hold an object."""
    calls = message.get("tool_calls")
    if not calls:
        return message
    if not isinstance(calls, list):
        raise InvalidInputError(f"{where}.tool_calls must be a list of calls")
    out = []
    for i, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise InvalidInputError(f"{where}.tool_calls[{i}] must be {{\"type\": \"function\", \"function\": "
                                    "{\"name\": ..., \"arguments\": ...}}")  # fmt: skip
        args = fn.get("arguments", "{}")
        if isinstance(args, str):
            try:
                args = json.loads(args or "{}")
            except ValueError as exc:
                raise InvalidInputError(f"{where}.tool_calls[{i}].function.arguments is not JSON ({exc})") from None
            except RecursionError:  # the decoder recurses once per level: deep nesting would otherwise be a 500
                raise InvalidInputError(f"{where}.tool_calls[{i}].function.arguments nests too deeply to decode as "
                                        "JSON") from None  # fmt: skip
        if not isinstance(args, dict):
            raise InvalidInputError(f"{where}.tool_calls[{i}].function.arguments must be a JSON object")
        out.append({**call, "function": {**fn, "arguments": args}})
    return {**message, "tool_calls": out}
