"""Step 1 of the data path, media loading (video): probe a container and decode only the frames asked for.

`probe_video(src) -> VideoMetadata` (frame count, fps, duration, size) without decoding a
frame; `read_frames(src, indices) -> uint8 [n, H, W, 3]` RGB frames in the order asked,
seeking to the keyframe before each needed frame when that skips decoding. With `frame_fn`
each frame is mapped (resized) right after decoding, giving `[n, h, w, 3]`: one full-size frame
is alive at a time. `src` is a path or the file's bytes; error texts never name the path.
PyAV is imported lazily so that a missing codec library only disables video.
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

from glimpse.buffers import empty_buffer
from glimpse.errors import (
    GlimpseError,
    LimitExceededError,
    MediaError,
    MediaTooLargeError,
    VideoSamplingError,
)

VideoSource = str | Path | bytes | bytearray | memoryview
FrameFn = Callable[[np.ndarray], np.ndarray]  # decoded RGB [H, W, 3] uint8 -> the frame to keep [h, w, 3]

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
