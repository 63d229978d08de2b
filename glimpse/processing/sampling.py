"""Step 2 of the data path, frame sampling: video metadata + a VideoSpec -> frame indices and timestamps.

The four HF 5.23 samplers (glm4v, glm46v, glmga, qwen) as pure functions returning the same
indices as HF's `sample_frames` (parity-spec §2.2), computed in closed form with numpy (no
walk over every source frame), plus the GLM per-temporal-patch timestamps and their prompt
text (§2.4) and Qwen's `second_per_grid_ts` (§2.5). One `SampledFrames` feeds both the
decoder (which frames) and the prompt expansion (which timestamps); `sample_video(...,
max_frames)` refuses a video that would keep more frames than the server's --max-frames.

Departures from HF, all where HF itself fails: fps 0 or missing, zero frames, a Qwen index
past the end, and clips so short that glm46v/glmga sample 0 frames (shorter than one sampling
step, 1/6 s or 1/fps) raise VideoSamplingError naming the value and the limit, instead of
failing later in the resize. Short clips are accepted wherever HF returns frames (glm4v gives
[0, 0] for a 3-frame clip); a clip handed over with `do_sample_frames=False` may have a single
frame, which the resize step repeats to Tp (see resize.video_frames_in).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from glimpse.errors import LimitExceededError, VideoSamplingError
from glimpse.media.video import VideoMetadata
from glimpse.processing.spec import VideoSpec

# glm46v's fixed constants (HF Glm46VVideoProcessor.sample_frames).
_GLM46V_MAX_DURATION = 2400
_GLM46V_MAX_FRAMES = 640


@dataclass(frozen=True)
class SampledFrames:
    """The one sampling result that both pixels and prompt use."""

    indices: tuple[int, ...]  # source frames, in order, duplicates allowed
    timestamps: tuple[float, ...]  # GLM: seconds of the first frame of each temporal patch (gt entries)
    timestamp_text: tuple[str, ...]  # GLM: the text written after each frame's image tokens
    second_per_grid_ts: float | None  # Qwen2.5-VL: seconds per temporal patch


def _checked(meta: VideoMetadata, name: str) -> tuple[int, float, float]:
    """(N, fps, duration) with HF's duration fallback `round((N-1)/fps) + 1` for None or 0."""
    n = meta.total_num_frames
    if n < 1:
        raise VideoSamplingError(f"{name}: the video has {n} frames; at least 1 is needed")
    fps = meta.fps
    if fps is None or not math.isfinite(fps) or fps <= 0:
        raise VideoSamplingError(
            f"{name}: frame rate {fps} is unusable (must be > 0) and sampling by time needs it; "
            "send frames with do_sample_frames=false or fix the container's frame rate"
        )
    duration = meta.duration
    if duration is not None and (not math.isfinite(duration) or duration < 0):
        raise VideoSamplingError(f"{name}: duration {duration} s is invalid (must be a finite number >= 0)")
    return n, float(fps), duration or (round((n - 1) / fps) + 1)


def _dedup_even(indices: np.ndarray | list[int]) -> list[int]:
    """Keep first occurrences in order; make the count even by repeating the last (all GLM samplers)."""
    arr = np.asarray(indices, dtype=np.int64)
    _, first = np.unique(arr, return_index=True)
    uniq = arr[np.sort(first)].tolist()
    if len(uniq) % 2:
        uniq.append(uniq[-1])
    return uniq


def _greedy(n: int, fps: float, step: float, limit: float) -> np.ndarray:
    """HF's frame walk in closed form.

    HF visits frames k = 0..N-1 (time `k * (1/fps)`), takes k when its time >= `cur`, then
    adds `step` to `cur` and stops once `cur >= limit`. The thresholds are the running float
    sums of `step` (np.cumsum adds in the same order as the loop); take j lands on
    `max(prev + 1, first frame at or after cur_j)`, a running maximum.
    """
    times = np.arange(n, dtype=np.float64) * (1 / fps)
    length = min(n, max(0, math.ceil(limit / step)) + 2) + 1
    steps = np.full(length, step)
    steps[0] = 0.0
    cur = np.cumsum(steps)
    stop = np.flatnonzero(cur[1:] >= limit)
    takes = int(stop[0]) + 1 if stop.size else length - 1
    first = np.searchsorted(times, cur[:takes], side="left")
    j = np.arange(takes)
    frames = j + np.maximum.accumulate(first - j)
    return frames[frames < n]


def _fix_count(indices: np.ndarray | list[int], n: int, extract: int) -> np.ndarray | list[int]:
    """glm46v/glmga: stretch a short pick between its ends, or respread a long one over the video."""
    if len(indices) < extract:
        start, end = (0, max(n - 1, 0)) if len(indices) == 0 else (int(indices[0]), int(indices[-1]))
        return np.linspace(start, end, extract, dtype=int)
    if len(indices) > extract:
        return np.linspace(0, n - 1, extract, dtype=int)
    return indices


def _nonempty(indices: list[int], name: str, sampler: str, duration: float, rate: str) -> list[int]:
    if not indices:
        raise VideoSamplingError(
            f"{name}: the {duration:g} s clip is too short for {sampler} sampling ({rate}) and yields 0 frames "
            "(HF fails here too); send a longer clip, or the frames with do_sample_frames=false"
        )
    return indices


def sample_glm4v(
    meta: VideoMetadata, fps: float = 2.0, max_duration: float = 300.0, name: str = "video"
) -> list[int]:
    """HF Glm4vVideoProcessor.sample_frames: `fps` frames/s up to `max_duration`, else evenly spaced."""
    n, src_fps, duration = _checked(meta, name)
    if duration <= max_duration:
        count = max(math.floor(duration * fps), 1)
        picks = np.minimum(n - 1, np.ceil(np.arange(count, dtype=np.float64) * src_fps / fps))
    else:
        samples = int(max_duration * fps)
        if samples >= n:
            picks = np.arange(n)
        else:
            seconds = np.linspace(0, duration, samples, endpoint=True)
            picks = np.minimum(n - 1, np.ceil(seconds * src_fps))
    return _nonempty(_dedup_even(picks), name, "glm4v", duration, f"{fps:g} frames/s")


def sample_glm46v(meta: VideoMetadata, temporal_patch_size: int = 2, name: str = "video") -> list[int]:
    """HF Glm46VVideoProcessor.sample_frames: 6, 2 or 1 frames/s by duration, at most 640 frames."""
    n, src_fps, duration = _checked(meta, name)
    effective = min(duration, _GLM46V_MAX_DURATION)
    target = 3 if effective <= 30 else 1 if effective <= 300 else 0.5
    extract = min(int(effective * target * temporal_patch_size), _GLM46V_MAX_FRAMES)
    if n < extract:
        picks: np.ndarray | list[int] = np.linspace(0, n - 1, extract, dtype=int)
    else:
        picks = _greedy(n, src_fps, 1 / (temporal_patch_size * target), int(duration))
    picks = _fix_count(picks, n, extract)
    return _nonempty(
        _dedup_even(picks), name, "glm46v", duration, f"{target * temporal_patch_size:g} frames/s"
    )


def sample_glmga(
    meta: VideoMetadata, fps: float = 2.0, max_frames: int = 640, name: str = "video"
) -> list[int]:
    """HF GlmgaVideoProcessor.sample_frames: `fps` frames/s (checkpoint or request), at most `max_frames`."""
    n, src_fps, duration = _checked(meta, name)
    extract = min(int(duration * fps), max_frames)
    if n < extract:
        picks: np.ndarray | list[int] = np.floor(np.arange(extract) * n / extract).astype(np.int64)
    else:
        step = 1 / fps
        picks = _greedy(n, src_fps, step, duration - step)
    picks = _fix_count(picks, n, extract)
    return _nonempty(_dedup_even(picks), name, "glmga", duration, f"{fps:g} frames/s")


def sample_qwen(
    meta: VideoMetadata,
    temporal_patch_size: int = 2,
    min_frames: int = 4,
    max_frames: int = 768,
    num_frames: int | None = None,
    fps: float | None = None,
    name: str = "video",
) -> list[int]:
    """HF Qwen2VLVideoProcessor.sample_frames: `num_frames` or `fps` (exclusive), else every frame.

    Indices come from HF's own float32 `torch.arange(0, N, N/n)`; when that overshoots to N
    (HF then indexes past the end) this raises instead.
    """
    n = meta.total_num_frames
    if n < 1:
        raise VideoSamplingError(f"{name}: the video has {n} frames; at least 1 is needed")
    if fps is not None and num_frames is not None:
        raise VideoSamplingError(f"{name}: num_frames and fps exclude each other; set only one")
    if num_frames is not None:
        count = round(num_frames / temporal_patch_size) * temporal_patch_size
    elif fps is not None:
        src_fps = meta.fps
        if src_fps is None or not math.isfinite(src_fps) or src_fps <= 0:
            raise VideoSamplingError(
                f"{name}: frame rate {src_fps} is unusable (must be > 0) and sampling by fps needs it; "
                "use num_frames, or send frames with do_sample_frames=false"
            )
        cap = math.floor(min(max_frames, n) / temporal_patch_size) * temporal_patch_size
        count = min(max(n / src_fps * fps, min_frames), cap, n)
        count = math.floor(count / temporal_patch_size) * temporal_patch_size
    else:
        return list(range(n))
    if count > n:
        raise VideoSamplingError(
            f"{name}: {count} frames requested but the video has only {n}; lower num_frames or fps"
        )
    if count <= 0:
        raise VideoSamplingError(
            f"{name}: sampling gives 0 frames (the video has {n} frames; Qwen keeps a multiple of "
            f"temporal_patch_size={temporal_patch_size}); send at least {temporal_patch_size} frames"
        )
    picks = torch.arange(0, n, n / count).int().tolist()
    if picks[-1] >= n:
        raise VideoSamplingError(
            f"{name}: HF's float32 frame spacing for {count} of {n} frames lands on index {picks[-1]}, past the "
            f"last frame {n - 1} (HF fails on this video); choose another num_frames or fps"
        )
    return picks


def glm_timestamps(indices: list[int], fps: float | None, grid_t: int, name: str = "video") -> list[float]:
    """Seconds of the first frame of each temporal patch, padded/truncated to `grid_t` (HF's rule).

    A missing fps means 24 (HF's fallback for frames without metadata); fps 0 is refused.
    """
    if fps is None:
        fps = 24
    if not math.isfinite(fps) or fps <= 0:
        raise VideoSamplingError(f"{name}: frame rate {fps} is unusable for timestamps (must be > 0)")
    stamps = [i / fps for i in indices[::2]][:grid_t]
    while len(stamps) < grid_t:
        stamps.append(stamps[-1] if stamps else 0)
    return stamps


def timestamp_text(seconds: float, style: str) -> str:
    """GLM-4.1V writes whole seconds ("12"); GLM-4.6V/GLMGA write "12.3 seconds"."""
    return str(int(seconds)) if style == "int" else f"{seconds:.1f} seconds"


def second_per_grid_ts(
    num_sampled: int, meta: VideoMetadata, temporal_patch_size: int, name: str = "video"
) -> float:
    """Qwen2.5-VL: `Tp / sampled_fps`, `sampled_fps = sampled / total * fps` (24 fps if fps is unknown)."""
    if meta.fps is None:
        sampled_fps = 24.0
    else:
        if meta.total_num_frames < 1 or not math.isfinite(meta.fps) or meta.fps <= 0:
            raise VideoSamplingError(
                f"{name}: frame rate {meta.fps} with {meta.total_num_frames} frames gives no seconds per "
                "temporal patch (both must be > 0)"
            )
        sampled_fps = num_sampled / meta.total_num_frames * meta.fps
    return temporal_patch_size / sampled_fps


def check_frame_count(count: int, max_frames: int, spec: VideoSpec, name: str = "video") -> None:
    """Refuse a video that would keep more than `max_frames` frames (the server's --max-frames).

    Runs on the sampled indices, before any frame is decoded: memory and encoder work grow with
    the frames kept, and with `do_sample_frames` off HF keeps every frame of the clip.
    """
    if count <= max_frames:
        return
    if not spec.do_sample_frames:
        advice = (
            "do_sample_frames=false keeps every frame of the clip; send a shorter clip or sample frames "
            "(mm_processor_kwargs do_sample_frames=true"
            + (", with fps or num_frames)" if spec.sampler == "qwen" else ")")
        )
    else:
        advice = f"{spec.sampler} frame sampling picked them; send a shorter clip or lower fps/num_frames"
    raise LimitExceededError(
        f"{name}: keeps {count} frames, over the limit of {max_frames} frames per video "
        f"(server flag --max-frames); {advice}"
    )


def sample_video(
    meta: VideoMetadata, spec: VideoSpec, name: str = "video", max_frames: int | None = None
) -> SampledFrames:
    """Indices (and timestamps) for one video under `spec`; every frame when `do_sample_frames` is off.

    `max_frames` (the server's --max-frames): more indices than this is a LimitExceededError.
    """
    tp = spec.temporal_patch_size
    if not spec.do_sample_frames:
        if meta.total_num_frames < 1:
            raise VideoSamplingError(f"{name}: the video has no frames")
        if max_frames is not None:  # before listing millions of indices
            check_frame_count(meta.total_num_frames, max_frames, spec, name)
        indices = list(range(meta.total_num_frames))
    elif spec.sampler == "glm4v":
        indices = sample_glm4v(meta, spec.fps or 2.0, spec.max_duration or 300.0, name)
    elif spec.sampler == "glm46v":
        indices = sample_glm46v(meta, tp, name)
    elif spec.sampler == "glmga":
        indices = sample_glmga(meta, spec.fps or 2.0, spec.max_frames or 640, name)
    else:
        indices = sample_qwen(
            meta, tp, spec.min_frames or 4, spec.max_frames or 768, spec.num_frames, spec.fps, name
        )
    if max_frames is not None:
        check_frame_count(len(indices), max_frames, spec, name)
    if spec.sampler == "qwen":
        spg = second_per_grid_ts(len(indices), meta, tp, name)
        return SampledFrames(tuple(indices), (), (), spg)
    grid_t = -(-len(indices) // tp)
    stamps = glm_timestamps(indices, meta.fps, grid_t, name)
    text = tuple(timestamp_text(s, spec.timestamp_format) for s in stamps)
    return SampledFrames(tuple(indices), tuple(stamps), text, None)
