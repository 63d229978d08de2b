"""Steps 1-3 behind one object: `processor = glimpse.load_processor(path)`.

`processor(messages=[...])` takes OpenAI-style chat messages; `processor(text=..., images=...,
videos=...)` takes a prompt that already holds one marker per item. Both load the media,
preprocess them exactly as the checkpoint's HF processor would, expand the placeholders and
return a `ProcessedPrompt` (HF's keys, plus each item's spans, grid, timestamps, token count
and content hash).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from glimpse.config import processor_kind, read_json
from glimpse.errors import CheckpointError, InvalidInputError, LimitExceededError
from glimpse.media.image import decode_image, open_image
from glimpse.media.video import is_decoded_video, probe_video, read_frames, video_frames
from glimpse.models.evs import check_pruning_rate, retained_tokens
from glimpse.processing.control import PreprocessControl
from glimpse.processing.inputs import MediaItem, ProcessedPrompt, content_hash
from glimpse.processing.prompt import (
    PlaceholderTokens,
    expand_prompt,
    with_argument_objects,
    wrap_bare_videos,
)
from glimpse.processing.resize import (
    frame_resizer,
    preprocess_image,
    preprocess_resized_video,
    preprocess_video,
    video_target_size,
)
from glimpse.processing.sampling import sample_video
from glimpse.processing.spec import (
    Ceilings,
    ImageSpec,
    VideoSpec,
    check_overrides,
    load_specs,
    size_as_pixels,
    with_overrides,
)

_IMAGE_PARTS = ("image", "image_url", "input_image", "image_pil")  # image_pil: vLLM's part for a PIL image
_VIDEO_PARTS = ("video", "video_url")


@dataclass(frozen=True)
class MediaLimits:
    """Operator limits on what one prompt may carry (the server sets them from its flags)."""

    max_images: int = 16
    max_videos: int = 2
    max_image_pixels: int = 64_000_000  # decoded size, checked from the header before decoding
    max_video_frame_pixels: int = 8_294_400  # 3840x2160
    max_decode_frames: int = 20_000

    def check_counts(self, images: int, videos: int) -> None:
        """Refuse a prompt with more items than allowed (done before any item is fetched or decoded)."""
        for kind, count, limit in (("images", images, self.max_images), ("videos", videos, self.max_videos)):
            if count > limit:
                raise LimitExceededError(f"{count} {kind} in one prompt; the limit is {limit} "
                                         "(server flag --limit-mm-per-prompt)")  # fmt: skip


class Processor:
    def __init__(self, path: Path, tokenizer, image_spec: ImageSpec, video_spec: VideoSpec, tokens: PlaceholderTokens,
                 chat_template: str | None, kind: str, ceilings: Ceilings | None = None,
                 limits: MediaLimits | None = None, video_pruning_rate: float = 0.0) -> None:  # fmt: skip
        self.path = path
        self.tokenizer = tokenizer
        self.image_spec = image_spec
        self.video_spec = video_spec
        self.tokens = tokens
        self.chat_template = chat_template
        self.kind = kind
        self.ceilings = ceilings or Ceilings()
        self.limits = limits or MediaLimits()
        self.video_pruning_rate = self._pruning_rate(video_pruning_rate, "video_pruning_rate")
        # The dtype `pixel_values` are kept in (and hashed in). float32 is HF's processor output; an engine
        # whose model runs in bf16 or fp16 sets its dtype here: the tower casts to it anyway, the cast
        # rounds the same wherever it happens, and a batch of 64 image chats then holds half the bytes
        # (fresh pages the kernel zeroes: 0.27 -> 0.17 s of preprocessing in a process's first batch on
        # 2 cores) and hashes half of them.
        self.pixel_dtype = torch.float32

    # ---- entry points --------------------------------------------------------------------
    def __call__(self, messages: list[dict] | None = None, *, text: str | None = None, images: Sequence[Any] = (),
                 videos: Sequence[Any] = (), chat_template_kwargs: dict | None = None,
                 add_generation_prompt: bool = True, control: PreprocessControl | None = None,
                 tools: list[dict] | None = None, **overrides: Any) -> ProcessedPrompt:  # fmt: skip
        """`control` (per request): its budget bounds the pixels decoded at once; `cancel()` stops it.
        `tools`: OpenAI function tools, rendered by the chat template (messages only)."""
        if (messages is None) == (text is None):
            raise InvalidInputError("pass either messages=[...] or text=... (with images/videos), not both")
        if tools and messages is None:
            raise InvalidInputError("tools are rendered by the chat template, so they need messages=, not text=")
        if messages is not None:
            if images or videos:
                raise InvalidInputError("with messages=, put images and videos inside the message content parts")
            text, images, videos = self.render_chat(messages, chat_template_kwargs, add_generation_prompt, tools)
        return self.process(text, list(images), list(videos), overrides, control)

    def render_chat(self, messages: list[dict], chat_template_kwargs: dict | None = None,
                    add_generation_prompt: bool = True, tools: list[dict] | None = None) -> tuple[str, list, list]:  # fmt: skip
        """Apply the checkpoint's chat template; returns (prompt text, images, videos) in document order."""
        if not isinstance(messages, list) or not messages:
            raise InvalidInputError("messages must be a non-empty list of {role, content} objects")
        images, videos, normal = [], [], []
        for i, msg in enumerate(messages):
            if not isinstance(msg, dict) or "role" not in msg:
                raise InvalidInputError(f"message {i} must be an object with a role")
            content = msg.get("content")
            if isinstance(content, list):
                parts = []
                for j, part in enumerate(content):
                    parts.append(self._normal_part(part, images, videos, f"messages[{i}].content[{j}]"))
                content = parts
            elif content is not None and not isinstance(content, str):
                raise InvalidInputError(f"messages[{i}].content must be a string or a list of parts")
            normal.append(with_argument_objects({**msg, "content": content if content is not None else ""},
                                                f"messages[{i}]"))  # fmt: skip
        if self.chat_template is None:
            raise CheckpointError(f"{self.path} has no chat template (chat_template.jinja or tokenizer_config.json)")
        try:
            text = self.tokenizer.apply_chat_template(
                normal, chat_template=self.chat_template, tokenize=False,
                add_generation_prompt=add_generation_prompt, tools=tools or None, **(chat_template_kwargs or {}))  # fmt: skip
        except Exception as e:  # jinja errors from user-provided structure
            raise InvalidInputError(f"the chat template could not render these messages: {e}") from None
        return text, images, videos

    def process(self, text: str, images: list, videos: list, overrides: dict | None = None,
                control: PreprocessControl | None = None) -> ProcessedPrompt:  # fmt: skip
        """Preprocess media and expand the markers in `text` (which must hold one per item).

        Items go one at a time, each holding a reservation of its decoded pixels in `control`'s
        budget from before its decoding until it is reduced to `pixel_values`, so a request never
        holds more than one decoded item. `control.cancel()` stops the work between items and
        between a video's frames (PreprocessCancelled).
        """
        if control is None:
            control = PreprocessControl()
        elif not isinstance(control, PreprocessControl):
            raise InvalidInputError(f"control must be a PreprocessControl, not {type(control).__name__}; "
                                    "it is not a processor setting")  # fmt: skip
        control.check()
        rate, image_spec, video_spec = self.precheck(len(images), len(videos), overrides)
        image_items = self._images(images, image_spec, control)
        video_items = []
        for i, src in enumerate(videos):
            control.check()
            video_items.append(self._video(src, video_spec, f"video {i}", rate, control))
        control.check()
        per_frame = [(vi["per_frame"], list(vi["stamp_text"])) if vi["stamp_text"] else (vi["tokens"], [])
                     for vi in video_items]  # fmt: skip
        text = wrap_bare_videos(text, self.tokens)
        ids, placements = expand_prompt(text, self.tokenizer, self.tokens, [it["tokens"] for it in image_items], per_frame)
        items = []
        for p in placements:
            info = image_items[p.index] if p.kind == "image" else video_items[p.index]
            items.append(MediaItem(
                kind=p.kind, pixel_values=info["pixel_values"], grid_thw=info["grid"], spans=p.spans,
                num_tokens=p.num_tokens, content_hash=info["hash"], second_per_grid_t=info.get("spg"),
                timestamps=tuple(info.get("stamps", ())), frame_indices=tuple(info.get("indices", ())),
                pruning_rate=info.get("rate", 0.0), unpruned_tokens=info.get("unpruned")))  # fmt: skip
        return ProcessedPrompt(ids, tuple(items), text)

    def specs(self, overrides: dict, images: bool = True, videos: bool = True) -> tuple[ImageSpec, VideoSpec]:
        """Per-request specs for a request that carries `images` / `videos` (or not).

        `min_pixels`/`max_pixels` (or HF's `size={"shortest_edge", "longest_edge"}`, the same pixel
        counts) reach both of HF's processors (Qwen's image and video processors
        both take them; GLM's take the `size` they stand for), the sampling knobs only the video one.
        Every knob is validated, and each pixel value is held to its own modality's ceiling
        (--max-pixels / --max-video-pixels, else that modality's checkpoint value), but only for a
        modality the request carries: an image-only request is never refused for a video ceiling.
        """
        if not isinstance(overrides, dict):
            raise InvalidInputError("mm_processor_kwargs must be an object")
        overrides = size_as_pixels(overrides)

        def applied(spec: Any, present: bool, knobs: dict) -> Any:
            if present:
                return with_overrides(spec, self.ceilings, **knobs)
            check_overrides(spec, **knobs)  # validated all the same, but held to no ceiling: unused
            return spec

        image_keys = {k: v for k, v in overrides.items() if k in ("min_pixels", "max_pixels")}
        return applied(self.image_spec, images, image_keys), applied(self.video_spec, videos, overrides)

    def precheck(self, images: int, videos: int, overrides: dict | None) -> tuple[float, ImageSpec, VideoSpec]:
        """A request's settings (EVS rate, image and video specs) under the limits that need no media:
        item counts, mm_processor_kwargs against the ceilings. The server calls it before fetching
        anything; `process` before decoding."""
        self.limits.check_counts(images, videos)
        overrides = {} if overrides is None else overrides
        if not isinstance(overrides, dict):
            raise InvalidInputError("mm_processor_kwargs must be an object")
        overrides = dict(overrides)
        rate = self.video_pruning_rate
        if "video_pruning_rate" in overrides:
            rate = self._pruning_rate(overrides.pop("video_pruning_rate"), "mm_processor_kwargs.video_pruning_rate")
        return (rate, *self.specs(overrides, images=images > 0, videos=videos > 0))

    def _pruning_rate(self, rate: float, knob: str) -> float:
        """EVS (video token pruning) is a Qwen2.5-VL feature; refuse a rate > 0 for other families."""
        rate = check_pruning_rate(rate, knob)
        if rate and self.kind != "qwen2_5_vl":
            raise InvalidInputError(f"{knob}={rate}: video token pruning (EVS) is supported for Qwen2.5-VL only, "
                                    f"not {self.kind} checkpoints; leave it at 0")  # fmt: skip
        return rate

    # ---- media -----------------------------------------------------------------------------
    def _normal_part(self, part: Any, images: list, videos: list, where: str) -> dict:
        if isinstance(part, str):
            return {"type": "text", "text": part}
        if not isinstance(part, dict):
            raise InvalidInputError(f"{where} must be an object")
        kind = part.get("type")
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise InvalidInputError(f"{where}.text must be a string")
            return {"type": "text", "text": part["text"]}
        if kind in _IMAGE_PARTS:
            images.append(_source(part, kind, where))
            return {"type": "image"}
        if kind in _VIDEO_PARTS:
            videos.append(_source(part, kind, where))
            return {"type": "video"}
        raise InvalidInputError(f"{where}: unsupported content part type {kind!r}; use text, image_url or video_url")

    def _images(self, images: list, spec: ImageSpec, control: PreprocessControl) -> list[dict]:
        """One image at a time: header -> reserve its pixels -> decode -> resize/normalize -> release."""
        out = []
        m2 = spec.merge_size**2
        for i, src in enumerate(images):
            name = f"image {i}"
            control.check()
            image = open_image(_local(src, name), name, self.limits.max_image_pixels)  # header only
            with control.reserve(image.width * image.height, name):
                pv, grid = preprocess_image(decode_image(image, name), spec, name)
                del image  # the decoded pixels go before their reservation does
            pv = pv.to(self.pixel_dtype)
            n = grid[0] * grid[1] * grid[2]
            out.append({"pixel_values": pv, "grid": tuple(grid), "tokens": n // m2, "hash": content_hash("image", pv, grid)})
        return out

    def _video(self, src: Any, spec: VideoSpec, name: str, pruning_rate: float = 0.0,
               control: PreprocessControl | None = None) -> dict:  # fmt: skip
        """One video -> its rows, grid, tokens and timestamps.

        The frames kept are known before decoding (probe + sampling) and held to --max-frames
        there; each is resized to the clip's target size right after it is decoded, so memory
        follows the frames kept at their resized size, never a stack of full-size frames. The
        decode holds one full-size frame's pixels of `control`'s budget and checks `control`
        between frames.
        """
        control = control or PreprocessControl()
        max_frames = self.ceilings.max_frames
        if is_decoded_video(src):  # (frames, metadata) as vLLM passes them; only the sampled frames are converted
            frames, meta = video_frames(src, name, self.limits.max_video_frame_pixels)
            sampled = sample_video(meta, spec, name, max_frames)
            pv, grid = preprocess_video(frames.take(sampled.indices), spec, name)
        else:
            src = _local(src, name)
            meta = probe_video(src, name, self.limits.max_video_frame_pixels)
            sampled = sample_video(meta, spec, name, max_frames)
            t = len(sampled.indices)
            video_target_size(t, meta.height, meta.width, spec, name)  # refuses bad geometry before decoding
            with control.reserve(meta.width * meta.height, name):
                resized = read_frames(src, sampled.indices, name, self.limits.max_decode_frames,
                                      max_frames=max_frames, frame_fn=frame_resizer(t, spec, name),
                                      check=control.check)  # fmt: skip
            pv, grid = preprocess_resized_video(resized, spec)
        grid = tuple(int(x) for x in grid.reshape(-1).tolist())
        pv = pv.to(self.pixel_dtype)
        m2 = spec.merge_size**2
        tokens = grid[0] * grid[1] * grid[2] // m2
        info = {"pixel_values": pv, "grid": grid, "tokens": tokens, "per_frame": grid[1] * grid[2] // m2,
                "stamp_text": sampled.timestamp_text, "stamps": sampled.timestamps, "indices": sampled.indices,
                "spg": sampled.second_per_grid_ts, "hash": content_hash("video", pv, grid, sampled.second_per_grid_ts)}  # fmt: skip
        if pruning_rate:  # EVS: the prompt holds only the tokens kept after encoding (Qwen: one run)
            info.update(tokens=retained_tokens(grid, spec.merge_size, pruning_rate), unpruned=tokens, rate=pruning_rate,
                        hash=content_hash("video", pv, grid, sampled.second_per_grid_ts, pruning_rate))  # fmt: skip
        return info


def _source(part: dict, kind: str, where: str) -> Any:
    """The media source of a content part: OpenAI `{"image_url": {"url": ...}}` or HF `{"image": ...}`."""
    for key in (kind, "image", "video", "url", "path"):
        value = part.get(key)
        if isinstance(value, dict):
            value = value.get("url")
        if value is not None:
            return value
    raise InvalidInputError(f"{where}: a {kind} part needs a source ({kind}.url, or image/video/path)")


def _local(src: Any, name: str) -> Any:
    """Offline sources: paths, file:// URLs, data URLs, bytes, PIL images, arrays. Remote URLs are the server's job."""
    if isinstance(src, str):
        if src.startswith(("http://", "https://")):
            raise InvalidInputError(f"{name}: remote URLs are fetched by `glimpse serve` (--allowed-media-domains); "
                                    "offline, pass a path, bytes or a data URL")  # fmt: skip
        if src.startswith("file://"):
            return src[len("file://") :]
    return src


def placeholder_tokens(tokenizer, kind: str, hf_config) -> PlaceholderTokens:
    """Marker strings and ids from the tokenizer, cross-checked against config.json."""
    def tid(token: str) -> int:
        i = tokenizer.convert_tokens_to_ids(token)
        if i is None or i == tokenizer.unk_token_id:
            raise CheckpointError(f"the tokenizer has no {token} token, which {kind} checkpoints need")
        return i

    if kind == "qwen2_5_vl":
        vision = ("<|vision_start|>", "<|vision_end|>")
        tokens = PlaceholderTokens("<|image_pad|>", "<|video_pad|>", tid("<|image_pad|>"), tid("<|video_pad|>"),
                                   image_wrap=vision, video_wrap=vision)  # fmt: skip
        pairs = {"image_token_id": tokens.image_token_id, "video_token_id": tokens.video_token_id,
                 "vision_start_token_id": tid(vision[0]), "vision_end_token_id": tid(vision[1])}  # fmt: skip
    else:
        image = tid("<|image|>")
        tokens = PlaceholderTokens("<|image|>", "<|video|>", image, image, tid("<|begin_of_image|>"), tid("<|end_of_image|>"),
                                   ("<|begin_of_image|>", "<|end_of_image|>"), ("<|begin_of_video|>", "<|end_of_video|>"))  # fmt: skip
        pairs = {"image_token_id": image, "video_start_token_id": tid("<|begin_of_video|>"),
                 "video_end_token_id": tid("<|end_of_video|>"), "image_start_token_id": tokens.frame_start_id}  # fmt: skip
    for key, value in pairs.items():
        cfg_value = getattr(hf_config, key, value)
        if cfg_value != value:
            raise CheckpointError(f"config.json {key}={cfg_value} but the tokenizer gives {value}; "
                                  "the checkpoint's config and tokenizer disagree")  # fmt: skip
    return tokens


def load_processor(path: str | Path, ceilings: Ceilings | None = None, limits: MediaLimits | None = None,
                   video_pruning_rate: float = 0.0) -> Processor:  # fmt: skip
    """The processor for a checkpoint folder (tokenizer and chat template through transformers).

    `video_pruning_rate` > 0 (Qwen2.5-VL only) expands each video to the tokens EVS will keep.
    """
    import transformers

    path = Path(path)
    raw = read_json(path / "config.json")
    kind = processor_kind(path, raw.get("model_type", ""))
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path)
        hf_config = transformers.AutoConfig.from_pretrained(path)
    except Exception as e:
        raise CheckpointError(f"{path}: the tokenizer or config could not be loaded: {e}") from None
    template_file = path / "chat_template.jinja"
    template = template_file.read_text() if template_file.is_file() else getattr(tokenizer, "chat_template", None)
    image_spec, video_spec = load_specs(path)
    tokens = placeholder_tokens(tokenizer, kind, hf_config)
    return Processor(path, tokenizer, image_spec, video_spec, tokens, template, kind, ceilings, limits,
                     video_pruning_rate)  # fmt: skip
