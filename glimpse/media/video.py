"""Step 1 of the data path, media loading (video): probe a container and decode only the frames asked for.

`probe_video(src) -> VideoMetadata` (frame count, fps, duration, size) without decoding a
frame; `read_frames(src, indices) -> uint8 [n, H, W, 3]` RGB frames in the order asked,
seeking to the keyframe before each needed frame when that skips decoding. With `frame_fn`
each frame is mapped (resized) right after decoding, giving `[n, h, w, 3]`: one full-size frame
is alive at a time. `src` is a path or the file's bytes; error texts never name the path.
PyAV is imported lazily so that a missing codec library only disables video.

Videos already decoded, as vLLM and HF users hold them, come as `(frames, metadata)`:
`video_frames(src) -> (DecodedFrames, VideoMetadata)`, frames being a uint8 array `[T, H, W, 3]`,
a torch tensor `[T, 3, H, W]`, or a list of PIL images or `[H, W, 3]` arrays, and metadata a
dict (vLLM's) or object with the frame rate `fps`, which sampling and timestamps need.
"""

from __future__ import annotations

import bisect
import io
import os
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from glimpse.buffers import empty_buffer
from glimpse.errors import (
    GlimpseError,
    InvalidInputError,
    LimitExceededError,
    MediaError,
    MediaTooLargeError,
    VideoSamplingError,
)
from glimpse.media.image import hwc_pixels, is_pixel_array, to_rgb

VideoSource = str | Path | bytes | bytearray | memoryview
FrameFn = Callable[[np.ndarray], np.ndarray]  # decoded RGB [H, W, 3] uint8 -> the frame to keep [h, w, 3]

VideoFrames = np.ndarray | torch.Tensor | Sequence[Any]  # decoded frames; see `video_frames`

# Seeking flushes the decoder and re-reads from a keyframe; only worth it past this many frames.
_SEEK_MIN_SKIP = 8


@dataclass(frozen=True)
class VideoMetadata:
    """What frame sampling needs to know about a video.

    `fps` is None when neither the container nor the timestamps give a rate (HF treats a
    missing fps the same way); `duration` is `total_num_frames / fps` when both are known (as
    HF's PyAV reader reports it), else the container's stated duration, else None.
    """

    total_num_frames: int
    fps: float | None
    duration: float | None
    width: int
    height: int


@dataclass(frozen=True)
class _FrameIndex:
    """Presentation-ordered timestamps of every frame, from demuxing packets (no decoding)."""

    pts: list[int] | None  # sorted; None if some packet has no timestamp
    keyframes: list[int]  # indices into `pts` of keyframes
    count: int


def _sanitize(exc: BaseException, src: VideoSource) -> str:
    """Exception text without object reprs, addresses (they leak memory layout to clients) or file names.

    PyAV's errors end with the path they opened; the server hands over the resolved path, so a
    file:// URL to a symlink would otherwise reveal the link's hidden target. FFmpeg errors keep
    only their message; any other text has the path, its real path and their file names cut out.
    """
    import av  # already imported: only PyAV's calls get here

    if isinstance(exc, av.error.FFmpegError) and exc.strerror:
        text = str(exc.strerror)
    else:
        text = str(exc)
        if isinstance(src, str | Path):
            real = os.path.realpath(src)
            names = {str(src), real, Path(src).name, Path(real).name}
            # Whole paths before bare names; names of 1-2 characters reveal nothing and match too much.
            for name in sorted((n for n in names if len(n) > 2), key=len, reverse=True):
                text = text.replace(name, "[file]")
    text = re.sub(r"<[^>]*>", "<...>", text)
    text = re.sub(r"0x[0-9a-fA-F]+", "0x?", text)
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__


def _open(src: VideoSource, name: str) -> Any:
    try:
        import av
    except ImportError as exc:  # pragma: no cover - av is a hard dependency in pyproject
        raise MediaError(f"{name}: video support is unavailable (PyAV is not installed)") from exc
    if isinstance(src, bytes | bytearray | memoryview):
        if len(src) == 0:
            raise MediaError(f"{name}: empty video data")
        file: Any = io.BytesIO(bytes(src))
    elif isinstance(src, str | Path):
        if not Path(src).is_file():
            raise MediaError(f"{name}: no such video file")
        file = str(src)
    else:
        raise MediaError(f"{name}: unsupported video source type {type(src).__name__}; pass a path or bytes")
    try:
        container = av.open(file, mode="r")
    except Exception as exc:
        raise MediaError(f"{name}: not a readable video container ({_sanitize(exc, src)})") from None
    if not container.streams.video:
        container.close()
        raise MediaError(f"{name}: the container has no video stream")
    return container


def _index(container: Any, stream: Any) -> _FrameIndex:
    """Demux every packet of `stream` (cheap: no decoding) to count frames and find keyframes."""
    entries: list[tuple[int | None, bool]] = []
    try:
        for packet in container.demux(stream):
            if packet.size == 0:  # the flush packet at the end
                continue
            entries.append((packet.pts, bool(packet.is_keyframe)))
    except Exception:  # noqa: S110 - a truncated tail: keep the packets read so far
        pass
    if any(pts is None for pts, _ in entries):
        return _FrameIndex(pts=None, keyframes=[], count=len(entries))
    entries.sort(key=lambda e: e[0])
    pts = [p for p, _ in entries]
    keyframes = [i for i, (_, key) in enumerate(entries) if key]
    return _FrameIndex(pts=pts, keyframes=keyframes, count=len(pts))


def _rate(stream: Any) -> float | None:
    for rate in (stream.average_rate, stream.guessed_rate):
        if isinstance(rate, Fraction | int | float) and rate > 0:
            return float(rate)
    return None


def _stated_duration(container: Any, stream: Any) -> float | None:
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    if container.duration:
        return container.duration / 1_000_000  # AV_TIME_BASE
    return None


def probe_video(src: VideoSource, name: str = "video", max_pixels: int | None = None) -> VideoMetadata:
    """Metadata of the first video stream, decoding nothing.

    The frame count comes from demuxing packets (exact, and robust to containers that state
    0 frames or lie after truncation). fps falls back from the container's average rate to
    its guessed rate to `frames / duration`. `max_pixels` caps `width*height` per frame
    (MediaTooLargeError) before anything is decoded.
    """
    with _opened(_open(src, name), src, name, "read") as container:
        stream = container.streams.video[0]
        width, height = int(stream.codec_context.width or 0), int(stream.codec_context.height or 0)
        if width <= 0 or height <= 0:
            raise MediaError(f"{name}: the video stream states no frame size")
        if max_pixels is not None and width * height > max_pixels:
            raise MediaTooLargeError(
                f"{name}: frames are {width}x{height} = {width * height} pixels, over the limit of {max_pixels} "
                "(server flag --max-video-frame-pixels)"
            )
        stated = _stated_duration(container, stream)
        count = _index(container, stream).count
        if count == 0:
            raise VideoSamplingError(f"{name}: the video has no frames")
        fps = _rate(stream)
        if fps is None and stated:
            fps = count / stated
        duration = count / fps if fps else stated
        return VideoMetadata(total_num_frames=count, fps=fps, duration=duration, width=width, height=height)


def read_frames(
    src: VideoSource,
    indices: Sequence[int],
    name: str = "video",
    max_decode_frames: int | None = None,
    *,
    max_frames: int | None = None,
    frame_fn: FrameFn | None = None,
    check: Callable[[], None] | None = None,
) -> np.ndarray:
    """Frames at `indices` (presentation order, 0-based), in the order given: `[len(indices), H, W, 3]` uint8 RGB.

    Indices may repeat. Frames are located by their timestamps; when the next wanted frame
    lies past a later keyframe, the reader seeks to that keyframe instead of decoding the gap,
    so a long file is never decoded whole. The frames kept are exactly those listed, so the
    output's size is fixed before the first decode:

    - `max_frames` caps `len(indices)` (LimitExceededError before anything is decoded);
    - `max_decode_frames` caps the frames decoded on the way (a DoS guard: a tiny, highly
      compressible file can hold millions of frames), checked while decoding;
    - `frame_fn` maps each decoded frame `[H, W, 3]` to the frame kept (the processor passes its
      resize), right after decoding it: the result is `[len(indices), *frame_fn(frame).shape]`
      and no stack of full-size frames is ever held. It must return the same shape every time;
    - `check` is called after every decoded frame; whatever it raises (e.g. a cancellation)
      stops the decode and propagates (GlimpseErrors unchanged, others as MediaError).
    """
    wanted = [int(i) for i in indices]
    if not wanted:
        raise VideoSamplingError(f"{name}: no frame indices to read")
    if min(wanted) < 0:
        raise VideoSamplingError(f"{name}: frame index {min(wanted)} is negative")
    if max_frames is not None and len(wanted) > max_frames:
        raise LimitExceededError(
            f"{name}: {len(wanted)} frames asked for, over the limit of {max_frames} frames per video "
            "(server flag --max-frames)"
        )
    with _opened(_open(src, name), src, name, "decode") as container:
        stream = container.streams.video[0]
        index = _index(container, stream)
        if index.count == 0:
            raise VideoSamplingError(f"{name}: the video has no frames")
        if max(wanted) >= index.count:
            raise VideoSamplingError(
                f"{name}: frame index {max(wanted)} is past the end (the video has {index.count} frames)"
            )
        stream.thread_type = "AUTO"
        frames = _Output(wanted, name, frame_fn)
        stated = (int(stream.codec_context.width or 0), int(stream.codec_context.height or 0))
        steps = _Steps(max_decode_frames, name, check, stated if all(stated) else None)
        if index.pts is None:
            _decode_in_order(container, stream, frames, steps)
        else:
            _decode_with_seeks(container, stream, index, frames, steps)
    return frames.array()


@contextmanager
def _opened(container: Any, src: VideoSource, name: str, action: str) -> Iterator[Any]:
    """Close `container` afterwards; PyAV's own exceptions become a MediaError naming the video (not its path)."""
    try:
        yield container
    except GlimpseError:
        raise
    except Exception as exc:
        raise MediaError(f"{name}: cannot {action} the video ({_sanitize(exc, src)})") from None
    finally:
        container.close()


class _Output:
    """The frames asked for, converted to RGB once each (and mapped by `frame_fn`), written straight
    into one `[n, h, w, 3]` array (huge pages) at every place they were asked for.

    The array is allocated at the first kept frame for exactly `len(wanted)` frames; only the
    distinct indices in `wanted` are ever written, so what a decode holds is bounded before it
    starts, whatever the container states about its length.
    """

    def __init__(self, wanted: list[int], name: str, frame_fn: FrameFn | None = None) -> None:
        self.name = name
        self.frame_fn = frame_fn
        self.slots: dict[int, list[int]] = {}
        for k, i in enumerate(wanted):
            self.slots.setdefault(i, []).append(k)
        self.todo = sorted(self.slots)  # distinct frame indices, in decoding order
        self.count = len(wanted)
        self.out: np.ndarray | None = None
        self.decoded_shape: tuple[int, ...] | None = None
        self.done: set[int] = set()

    def put(self, i: int, frame: Any) -> None:
        rgb = frame.to_ndarray(format="rgb24")
        if self.decoded_shape is None:
            self.decoded_shape = rgb.shape
        elif rgb.shape != self.decoded_shape:
            raise MediaError(
                f"{self.name}: the frame size changes inside the video; glimpse needs one size per video"
            )
        kept = rgb if self.frame_fn is None else self.frame_fn(rgb)
        del rgb  # the full-size frame goes now: only the kept (resized) frames accumulate
        if self.out is None:
            self.out = empty_buffer((self.count, *kept.shape), torch.uint8).numpy()
        self.out[self.slots[i]] = kept
        self.done.add(i)

    def missing(self, i: int) -> VideoSamplingError:
        return VideoSamplingError(f"{self.name}: frame {i} could not be decoded (the file may be truncated)")

    def array(self) -> np.ndarray:
        if self.out is None or len(self.done) < len(self.todo):  # the decoders raise before this
            raise self.missing(min(set(self.todo) - self.done))
        return self.out


def _frames(container: Any, stream: Any) -> Iterator[Any]:
    """Decoded frames from the current position; a corrupt tail ends the stream quietly."""
    decoder = container.decode(stream)
    while True:
        try:
            frame = next(decoder)
        except StopIteration:
            return
        except Exception:  # truncated/corrupt data: the caller reports missing frames
            return
        yield frame


class _Steps:
    """Runs after every decoded frame: the decode-walk cap (`max_decode_frames`) and the caller's `check`."""

    def __init__(self, limit: int | None, name: str, check: Callable[[], None] | None,
                 stated: tuple[int, int] | None = None) -> None:  # fmt: skip
        self.limit, self.name, self.check, self.stated = limit, name, check, stated
        self.decoded = 0

    def __call__(self, frame: Any = None) -> None:
        # Every limit on frame size (and the decoding budget's reservation) was judged on the size the
        # stream header states; a frame that decodes to another size (an in-band header that lies) is refused.
        if frame is not None and self.stated is not None and (frame.width, frame.height) != self.stated:
            raise MediaError(f"{self.name}: a frame decodes to {frame.width}x{frame.height} but the stream "
                             f"states {self.stated[0]}x{self.stated[1]}; glimpse needs one size per video")  # fmt: skip
        self.decoded += 1
        if self.limit is not None and self.decoded > self.limit:
            raise MediaTooLargeError(
                f"{self.name}: decoding needs more than {self.limit} frames (server flag --max-decode-frames)"
            )
        if self.check is not None:
            self.check()


def _decode_in_order(container: Any, stream: Any, frames: _Output, step: _Steps) -> None:
    """Fallback without timestamps: decode from the start, counting frames (HF's PyAV reader does this)."""
    want = set(frames.todo)
    for i, frame in enumerate(_frames(container, stream)):
        step(frame)
        if i in want:
            frames.put(i, frame)
            if len(frames.done) == len(want):
                return
    raise frames.missing(min(want - frames.done))


def _decode_with_seeks(
    container: Any, stream: Any, index: _FrameIndex, frames: _Output, step: _Steps
) -> None:
    pts, keyframes = index.pts or [], index.keyframes
    position = {p: i for i, p in reversed(list(enumerate(pts)))}  # pts -> first frame index
    decoded: Iterator[Any] | None = None
    last = -1  # index of the last decoded frame
    for target in frames.todo:
        k = bisect.bisect_right(keyframes, target) - 1
        keyframe = keyframes[k] if k >= 0 else 0
        if decoded is None or target < last or keyframe - last > _SEEK_MIN_SKIP:
            container.seek(pts[keyframe], backward=True, any_frame=False, stream=stream)
            decoded = _frames(container, stream)
            last = -1
        for frame in decoded:
            step(frame)
            i = position.get(frame.pts, -1) if frame.pts is not None else -1
            if i < 0:
                continue  # a frame we cannot place (no timestamp): never guess
            last = i
            if i == target:
                frames.put(target, frame)
                break
            if i > target:
                break
        if target not in frames.done:
            raise frames.missing(target)


# ---- videos already decoded ----------------------------------------------------------------------------


class DecodedFrames:
    """The frames of a decoded video, `[T, H, W, 3]` uint8 once taken: `take(indices)` converts only the
    frames sampled (a list of PIL images is never stacked whole)."""

    def __init__(self, frames: VideoFrames, name: str) -> None:
        self.name = name
        if isinstance(frames, torch.Tensor):
            if frames.ndim == 4 and frames.shape[1] == 3 and frames.shape[3] != 3:  # HF's [T, 3, H, W]
                frames = frames.permute(0, 2, 3, 1)
            frames = frames.detach().cpu().numpy()
        if isinstance(frames, np.ndarray):
            if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[3] != 3:
                raise MediaError(f"{name}: video frames must be a uint8 array [T, H, W, 3] (or a tensor "
                                 f"[T, 3, H, W]), got {frames.dtype} {list(frames.shape)}")  # fmt: skip
            self._frames: np.ndarray | list = frames
            self.shape = (int(frames.shape[1]), int(frames.shape[2]))
            return
        if not isinstance(frames, list | tuple) or not frames:
            raise MediaError(f"{name}: video frames must be an array, a tensor or a non-empty list of frames")
        self._pil = _is_pil(frames[0])
        if not all(_is_pil(f) if self._pil else is_pixel_array(f) for f in frames):
            raise MediaError(f"{name}: a list of video frames must hold only PIL images or only uint8 arrays")
        self._frames = list(frames)
        first = self._frame(0)
        self.shape = (first.shape[0], first.shape[1])

    def __len__(self) -> int:
        return len(self._frames)

    def _frame(self, i: int) -> np.ndarray:
        frame = self._frames[i]
        return np.asarray(to_rgb(frame)) if self._pil else hwc_pixels(frame, f"{self.name} frame {i}")

    def take(self, indices: Sequence[int]) -> np.ndarray:
        """`[len(indices), H, W, 3]` uint8, the frames at `indices` (repeats allowed) in that order."""
        if isinstance(self._frames, np.ndarray):
            return self._frames[list(indices)]
        out = np.empty((len(indices), *self.shape, 3), dtype=np.uint8)
        for k, i in enumerate(indices):
            frame = self._frame(i)
            if frame.shape[:2] != self.shape:
                raise MediaError(f"{self.name}: frame {i} is {frame.shape[1]}x{frame.shape[0]} but frame 0 is "
                                 f"{self.shape[1]}x{self.shape[0]}; glimpse needs one size per video")  # fmt: skip
            out[k] = frame
        return out


def _is_pil(x: object) -> bool:
    return isinstance(x, Image.Image)


def _with_metadata(src: object) -> bool:
    """vLLM's `(frames, metadata)`: metadata a dict or an object with `fps` (VideoMetadata, HF's own)."""
    return isinstance(src, tuple) and len(src) == 2 and (isinstance(src[1], dict) or hasattr(src[1], "fps"))


def is_decoded_video(src: object) -> bool:
    """Whether `src` is one decoded video (frames, with or without metadata) rather than a path or bytes:
    `(frames, metadata)`, a 4-D array or tensor, or a non-empty list of frames (PIL images, 3-D arrays)."""
    if _with_metadata(src) or isinstance(src, np.ndarray | torch.Tensor):
        return True
    is_frame = lambda f: _is_pil(f) or (isinstance(f, np.ndarray | torch.Tensor) and f.ndim == 3)  # noqa: E731
    return isinstance(src, list | tuple) and bool(src) and all(is_frame(f) for f in src)


def _metadata_fps(meta: Any, name: str) -> tuple[float, int | None]:
    """(fps, total_num_frames or None) from vLLM's metadata dict, a VideoMetadata or any object with `fps`."""
    if isinstance(meta, dict):
        fps, total = meta.get("fps"), meta.get("total_num_frames")
    else:
        fps, total = getattr(meta, "fps", None), getattr(meta, "total_num_frames", None)
    if fps is None:
        raise InvalidInputError(f"{name}: the video's metadata has no fps; frame sampling and timestamps need "
                                "the frame rate: pass (frames, {'fps': FPS})")  # fmt: skip
    if isinstance(fps, bool) or not isinstance(fps, int | float) or not np.isfinite(fps) or fps <= 0:
        raise InvalidInputError(f"{name}: the video's metadata fps={fps!r} must be a positive number")
    if total is not None and (isinstance(total, bool) or not isinstance(total, int)):
        raise InvalidInputError(f"{name}: the video's metadata total_num_frames={total!r} must be an integer")
    return float(fps), total


def video_frames(src: Any, name: str = "video", max_pixels: int | None = None) -> tuple[DecodedFrames, VideoMetadata]:
    """A decoded video `(frames, metadata)` -> its frames and the metadata sampling needs.

    Frames without metadata are refused: their frame rate is unknown, and glimpse does not guess one
    (sampling by time and the GLM timestamps depend on it). A `total_num_frames` that differs from the
    frames given (vLLM's loader sends a sample of a longer video) is refused too: glimpse samples the
    frames itself, as HF's processor does, so it needs them all. `max_pixels` caps `width*height`.
    """
    if not _with_metadata(src):
        raise InvalidInputError(f"{name}: video frames need their frame rate; pass (frames, {{'fps': FPS}}) "
                                "as vLLM does, not the frames alone")  # fmt: skip
    frames, meta = src
    fps, total = _metadata_fps(meta, name)
    decoded = DecodedFrames(frames, name)
    count = len(decoded)
    if total is not None and total != count:
        raise InvalidInputError(f"{name}: the metadata says total_num_frames={total} but {count} frames were given; "
                                "glimpse samples frames itself (as HF's processor does), so pass every frame of "
                                "the video")  # fmt: skip
    height, width = decoded.shape
    if max_pixels is not None and width * height > max_pixels:
        raise MediaTooLargeError(f"{name}: frames are {width}x{height} = {width * height} pixels, over the limit of "
                                 f"{max_pixels} (server flag --max-video-frame-pixels)")  # fmt: skip
    return decoded, VideoMetadata(total_num_frames=count, fps=fps, duration=count / fps, width=width, height=height)
