"""Step 2 of the data path, token budgets: vision tokens of an item before any pixel is decoded.

`image_tokens(h, w, spec)` / `video_tokens(T, h, w, spec)` are exact (the same resize rule as
preprocessing; tokens = t*h*w/m^2 of the grid). `max_image_tokens(spec)` /
`max_video_tokens(spec, max_frames)` are per-item upper bounds over every input size (and every
frame count up to the cap): never below a real count, and attained by the input that
`worst_image_size` / `worst_video_shape` return (parity-spec §7.4, including the `max(f, ...)`
clamp that lets very thin frames exceed `A/T` and the odd-T rounding branch).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from glimpse.errors import InvalidInputError
from glimpse.media.video import VideoMetadata
from glimpse.processing.resize import (
    MAX_ASPECT_RATIO,
    image_target_size,
    smart_resize_glm,
    smart_resize_qwen,
    video_frames_in,
    video_target_size,
)
from glimpse.processing.sampling import sample_video
from glimpse.processing.spec import ImageSpec, VideoSpec


def _grid_tokens(height: int, width: int, spec: ImageSpec) -> int:
    return (height // spec.patch_size) * (width // spec.patch_size) // (spec.merge_size**2)


def image_tokens(height: int, width: int, spec: ImageSpec) -> int:
    """Vision tokens of one `height x width` image (InvalidInputError for sizes the processor refuses)."""
    return _grid_tokens(*image_target_size(height, width, spec), spec)


def video_tokens(num_frames: int, height: int, width: int, spec: VideoSpec) -> int:
    """Vision tokens of `num_frames` sampled `height x width` frames: `ceil(T/Tp) * tokens per frame`."""
    h, w = video_target_size(num_frames, height, width, spec)
    grid_t = -(-num_frames // spec.temporal_patch_size)
    return grid_t * _grid_tokens(h, w, spec)


def video_tokens_for(meta: VideoMetadata, spec: VideoSpec, name: str = "video") -> int:
    """Exact tokens of a probed video: runs the sampler on the metadata only (no decoding)."""
    count = len(sample_video(meta, spec, name).indices)
    return video_tokens(count, meta.height, meta.width, spec)


@dataclass(frozen=True)
class _Frame:
    """One resize setting: the rule, the raw T and t_bar it sees, factor and the area limits."""

    resize: Callable[[int, int], tuple[int, int]]
    t: int  # raw T (beta uses it); 1 for Qwen
    t_bar: int  # rounded T (the rounding branch uses it); 1 for Qwen
    f: int
    a_min: int
    a_max: int

    def blocks(self, height: int, width: int) -> int:
        """Merged-token blocks `(h/f) * (w/f)` of one frame, or -1 if the processor refuses the size."""
        try:
            h, w = self.resize(height, width)
        except InvalidInputError:
            return -1
        return (h // self.f) * (w // self.f)


def _frame_worst(fr: _Frame) -> tuple[int, int, tuple[int, int]]:
    """(largest blocks over every input, an upper bound on it, an input attaining the first).

    Every output of the resize falls in one branch; each branch's maximum has a witness:
    * rounding branch, aspect <= 200: best factor pair a*b <= A/(t_bar f^2), input (a f, b f);
    * rounding branch past aspect 200 (rounding widens it): short input side as large as still
      rounds to a, long side 200 times that;
    * beta branch: for short side a the long side is floor(A/(T a f^2)), reached exactly by the
      input (T a^2 f^2, A) whose beta is the integer T a f;
    * the `max(f, ...)` clamp: aspect exactly 200, long side floor(sqrt(200 A / T) / f);
    * the up-scaling branch (only matters when min_pixels is near max_pixels): closed-form cap.
    """
    f, t, a_min, a_max = fr.f, fr.t, fr.a_min, fr.a_max
    witnesses: list[tuple[int, int]] = []
    k_round = a_max // (fr.t_bar * f * f)
    if k_round >= 1:
        a = np.arange(1, math.isqrt(k_round) + 1, dtype=np.int64)
        b = np.minimum(k_round // a, MAX_ASPECT_RATIO * a)
        i = int(np.argmax(a * b))
        witnesses.append((int(a[i]) * f, int(b[i]) * f))
        for short in range(1, math.isqrt(k_round // MAX_ASPECT_RATIO) + 2):
            h_max = math.ceil((short + 0.5) * f)  # the largest H with round(H/f) == short
            while h_max > 0 and round(h_max / f) != short:
                h_max -= 1
            long_side = min(k_round // short, round(MAX_ASPECT_RATIO * h_max / f))
            witnesses.append((h_max, min(long_side * f, MAX_ASPECT_RATIO * h_max)))
    beta_area = a_max / (t * f * f)
    lo = max(1, math.ceil(math.sqrt(a_max / (MAX_ASPECT_RATIO * t * f * f))))
    hi = math.isqrt(max(int(beta_area), 0))
    if hi >= lo:
        a = np.arange(lo, hi + 1, dtype=np.int64)
        i = int(np.argmax(a * np.floor(a_max / (t * a * f * f))))
        witnesses.append((t * int(a[i]) ** 2 * f * f, a_max))
    for k in (f, 2 * f + 1, 1000, 4099, 65536):
        witnesses.append((k, MAX_ASPECT_RATIO * k))
    best, arg = -1, (f, f)
    for height, width in witnesses:
        for h, w in ((height, width), (width, height)):
            value = fr.blocks(h, w)
            if value > best:
                best, arg = value, (h, w)
    bound = best
    if a_max < MAX_ASPECT_RATIO * t * f * f:  # the clamp can fire: its closed form is an upper bound
        bound = max(bound, min(MAX_ASPECT_RATIO - 1, math.floor(math.sqrt(MAX_ASPECT_RATIO * a_max / t) / f)))
    return best, max(bound, _upscale_cap(t, f, a_min)), arg


def _upscale_cap(t: int, f: int, a_min: int) -> int:
    """Most blocks the up-scaling branch can give: `ceil(u/f) * ceil(v/f)` with `u*v = A_min/T`, `v <= 200u`.

    For short side a the long side is largest at the smallest `u` with `ceil(u/f) == a`; a
    relative slack of 1e-12 covers float64 rounding pushing an exact integer over a ceil.
    """
    area = a_min / t
    u_lo = math.sqrt(area / MAX_ASPECT_RATIO)
    cap = 0
    for a in range(max(1, math.ceil(u_lo / f)), math.ceil(math.sqrt(area) / f) + 1):
        u = max((a - 1) * f, u_lo)
        if u > 0:
            cap = max(cap, a * math.ceil(area / (u * f) * (1 + 1e-12)))
    return cap


def _image_frame(spec: ImageSpec) -> _Frame:
    if spec.resize_rule == "qwen":
        return _Frame(
            lambda h, w: smart_resize_qwen(h, w, spec.factor, spec.min_pixels, spec.max_pixels),
            1,
            1,
            spec.factor,
            spec.min_pixels,
            spec.max_pixels,
        )
    tp = spec.temporal_patch_size
    return _Frame(
        lambda h, w: smart_resize_glm(tp, h, w, tp, spec.factor, spec.min_pixels, spec.max_pixels),
        tp,
        tp,
        spec.factor,
        spec.min_pixels,
        spec.max_pixels,
    )


def _video_frame(spec: VideoSpec, num_frames: int) -> _Frame:
    t = video_frames_in(num_frames, spec)
    tp = spec.temporal_patch_size
    if spec.resize_rule == "qwen":
        a_max = spec.max_pixels
        if spec.cap_pixels_per_frame:
            total = int(spec.max_video_tokens * spec.factor * spec.factor * 0.9)
            a_max = max(min(a_max, total * tp // t), int(spec.min_pixels * 1.05))
        return _Frame(
            lambda h, w: smart_resize_qwen(h, w, spec.factor, spec.min_pixels, a_max),
            1,
            1,
            spec.factor,
            spec.min_pixels,
            a_max,
        )
    return _Frame(
        lambda h, w: smart_resize_glm(t, h, w, tp, spec.factor, spec.min_pixels, spec.max_pixels),
        t,
        round(t / tp) * tp,
        spec.factor,
        spec.min_pixels,
        spec.max_pixels,
    )


def _per_block(spec: ImageSpec) -> int:
    """Tokens per f x f block: `e^2` (GLMGA's patch_expand_factor), 1 otherwise."""
    return (spec.factor // spec.patch_size) ** 2 // (spec.merge_size**2)


def max_image_tokens(spec: ImageSpec) -> int:
    """Largest token count any single image can reach under `spec`."""
    return _frame_worst(_image_frame(spec))[1] * _per_block(spec)


def worst_image_size(spec: ImageSpec) -> tuple[int, int]:
    """An input `(height, width)` with the most tokens (equal to `max_image_tokens` when attained)."""
    return _frame_worst(_image_frame(spec))[2]


def frame_cap(spec: VideoSpec, max_frames: int | None = None) -> int:
    """Most frames that reach the processor for one video: the sampler's own cap, lowered by `max_frames`."""
    tp = spec.temporal_patch_size
    cap: int | None = None
    if spec.do_sample_frames:
        if spec.sampler == "glm4v":
            cap = int((spec.max_duration or 300.0) * (spec.fps or 2.0))
        elif spec.sampler == "glm46v":
            cap = 640
        elif spec.sampler == "glmga":
            cap = spec.max_frames or 640
        elif spec.num_frames is not None:
            cap = round(spec.num_frames / tp) * tp
        elif spec.fps is not None:
            cap = (spec.max_frames or 768) // tp * tp
        if spec.sampler != "qwen" and cap % 2:
            cap += 1  # GLM samplers even an odd count by repeating the last index
    if max_frames is not None:
        cap = max_frames if cap is None else min(cap, max_frames)
    if cap is None or cap < 1:
        raise InvalidInputError(
            f"{spec.processor_class} keeps every frame here (do_sample_frames=false or no Qwen fps/num_frames); "
            "pass max_frames, the server's frame ceiling, to bound a video"
        )
    return cap


def _frame_counts(spec: VideoSpec, cap: int) -> range:
    if not spec.do_sample_frames:
        return range(1, cap + 1)
    step = 2 if spec.sampler != "qwen" else spec.temporal_patch_size
    return range(step, cap + 1, step)


def _video_worst(spec: VideoSpec, max_frames: int | None) -> tuple[int, tuple[int, int, int]]:
    best, arg = -1, (0, 0, 0)
    per_block = _per_block(spec)
    for t in _frame_counts(spec, frame_cap(spec, max_frames)):
        _, bound, (h, w) = _frame_worst(_video_frame(spec, t))
        total = -(-t // spec.temporal_patch_size) * bound * per_block
        if total > best:
            best, arg = total, (t, h, w)
    if best < 0:
        raise InvalidInputError(f"no frame count fits under the cap for {spec.processor_class}")
    return best, arg


def max_video_tokens(spec: VideoSpec, max_frames: int | None = None) -> int:
    """Largest token count of one video: max over frame counts up to the cap and over frame sizes.

    The frame counts are those the sampler can hand to the processor (even for GLM, multiples
    of Tp for Qwen) or, with `do_sample_frames=False`, every count up to `max_frames`.
    """
    return _video_worst(spec, max_frames)[0]


def worst_video_shape(spec: VideoSpec, max_frames: int | None = None) -> tuple[int, int, int]:
    """`(num_frames, height, width)` with the most tokens (equal to `max_video_tokens` when attained)."""
    return _video_worst(spec, max_frames)[1]
