"""Hostile and broken media: only glimpse's named errors may come out, never a crash or a bare exception.

Fuzzing (hypothesis): random bytes behind real format signatures, truncated and corrupted real
files, random geometry. Plus hand-made cases: a PNG header claiming 100000x100000 pixels is
refused before decoding, fps-0 metadata, a video without frames, and the webm whose container
states 0 frames (its real count, 15, comes from decoding every frame with PyAV).
"""

from __future__ import annotations

import io
import struct
import time
import zlib

import av
import numpy as np
import pytest
from conftest import MEDIA
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from glimpse.errors import GlimpseError, InvalidInputError, MediaError, MediaTooLargeError, VideoSamplingError
from glimpse.media.image import load_image
from glimpse.media.video import VideoMetadata, probe_video, read_frames
from glimpse.processing.resize import preprocess_images, preprocess_video
from glimpse.processing.sampling import sample_video
from glimpse.processing.spec import image_spec_from_dict, video_spec_from_dict

IMAGE_FILES = sorted((MEDIA / "images").iterdir())
VIDEO_FILES = sorted((MEDIA / "videos").iterdir())
SIGNATURES = [b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"GIF89a", b"BM", b"RIFF\x00\x00\x00\x00WEBPVP8 ",
              b"II*\x00", b"\x00\x00\x00\x18ftypmp42", b"\x1aE\xdf\xa3"]  # fmt: skip
FUZZ = settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


def only_glimpse_errors(fn, *args, **kwargs):
    """Run fn; success or a GlimpseError are fine, anything else fails the test (by propagating)."""
    try:
        return fn(*args, **kwargs)
    except GlimpseError as exc:
        assert " at 0x" not in str(exc)  # no object reprs / addresses in messages
        return exc


@FUZZ
@given(prefix=st.sampled_from(SIGNATURES), body=st.binary(max_size=2048))
def test_random_image_bytes(prefix, body):
    result = only_glimpse_errors(load_image, prefix + body)
    if not isinstance(result, GlimpseError):
        assert result.mode == "RGB"


@FUZZ
@given(prefix=st.sampled_from(SIGNATURES), body=st.binary(max_size=2048))
def test_random_video_bytes(prefix, body):
    result = only_glimpse_errors(probe_video, prefix + body)
    if not isinstance(result, GlimpseError):
        only_glimpse_errors(read_frames, prefix + body, [0])


def _mutate(data: bytes, draw) -> bytes:
    """A real file with random byte overwrites in its header region and body, then maybe cut short."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 12))):
        pos = draw(st.one_of(st.integers(0, min(len(out) - 1, 600)), st.integers(0, len(out) - 1)))
        out[pos] = draw(st.integers(0, 255))
    return bytes(out[: draw(st.integers(1, len(out)))]) if draw(st.booleans()) else bytes(out)


@settings(max_examples=120, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), path=st.sampled_from(IMAGE_FILES))
def test_mutated_real_images(data, path):
    result = only_glimpse_errors(load_image, _mutate(path.read_bytes(), data.draw))
    if not isinstance(result, GlimpseError):
        assert result.mode == "RGB"


@settings(max_examples=40, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), path=st.sampled_from(VIDEO_FILES))
def test_mutated_real_videos(data, path):
    blob = _mutate(path.read_bytes(), data.draw)
    meta = only_glimpse_errors(probe_video, blob)
    if not isinstance(meta, GlimpseError):
        only_glimpse_errors(read_frames, blob, [0, meta.total_num_frames - 1])


@pytest.mark.parametrize("path", IMAGE_FILES, ids=[p.name for p in IMAGE_FILES])
def test_truncated_and_corrupted_images(path):
    data = path.read_bytes()
    for fraction in (0.0005, 0.01, 0.2, 0.5, 0.9, 0.999):
        result = only_glimpse_errors(load_image, data[: int(len(data) * fraction)])
        assert isinstance(result, MediaError)
    rng = np.random.default_rng(len(data))
    for _ in range(5):
        corrupt = bytearray(data)
        for pos in rng.integers(0, len(data), 20):
            corrupt[pos] = int(rng.integers(0, 256))
        only_glimpse_errors(load_image, bytes(corrupt))


@pytest.mark.parametrize("path", VIDEO_FILES, ids=[p.name for p in VIDEO_FILES])
def test_truncated_and_corrupted_videos(path):
    data = path.read_bytes()
    variants = [data[: int(len(data) * f)] for f in (0.001, 0.05, 0.3, 0.7, 0.97)]
    rng = np.random.default_rng(len(data))
    corrupt = bytearray(data)
    for pos in rng.integers(len(data) // 10, len(data), 40):
        corrupt[pos] = int(rng.integers(0, 256))
    variants.append(bytes(corrupt))
    for variant in variants:
        meta = only_glimpse_errors(probe_video, variant)
        if isinstance(meta, GlimpseError):
            continue
        indices = sorted({0, meta.total_num_frames // 2, meta.total_num_frames - 1})
        frames = only_glimpse_errors(read_frames, variant, indices)
        if not isinstance(frames, GlimpseError):
            assert frames.shape == (len(indices), meta.height, meta.width, 3)


def _png_header(width: int, height: int) -> bytes:
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return (
            struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
        )

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize("side", [100_000, 9_000])
def test_pixel_bomb_refused_before_decoding(side):
    # 100000^2 trips Pillow's own bomb error; 9000^2 = 81 Mpx is under Pillow's limit but over glimpse's 64 Mpx.
    start = time.perf_counter()
    with pytest.raises(MediaTooLargeError):
        load_image(_png_header(side, side))
    assert time.perf_counter() - start < 1.0


@settings(max_examples=60, deadline=None, database=None)
@given(h=st.integers(0, 3000), w=st.integers(0, 3000), thin=st.integers(1, 400))
def test_random_geometry(h, w, thin):
    spec = image_spec_from_dict({"image_processor_type": "Qwen2VLImageProcessor"})
    for shape in ((h, max(0, w // thin), 3), (max(0, h // thin), w, 3)):
        if shape[0] * shape[1] > 2_000_000:
            continue
        image = np.zeros(shape, np.uint8)
        result = only_glimpse_errors(preprocess_images, [image], spec)
        if shape[0] == 0 or shape[1] == 0 or max(shape[:2]) / min(shape[:2]) > 200:
            assert isinstance(result, InvalidInputError)


def test_wrong_arrays_refused():
    spec = image_spec_from_dict({"image_processor_type": "Glm4vImageProcessor"})
    video = video_spec_from_dict({"video_processor_type": "Glm4vVideoProcessor"})
    for bad in (
        np.zeros((10, 10), np.uint8),
        np.zeros((10, 10, 4), np.uint8),
        np.zeros((10, 10, 3), np.float32),
        "x",
    ):
        with pytest.raises(InvalidInputError):
            preprocess_images([bad], spec)
    with pytest.raises(InvalidInputError):
        preprocess_images([], spec)
    for bad in (np.zeros((0, 10, 10, 3), np.uint8), np.zeros((2, 10, 10), np.uint8)):
        with pytest.raises(InvalidInputError):
            preprocess_video(bad, video)


@pytest.mark.parametrize(
    "cls", ["Glm4vVideoProcessor", "Glm46VVideoProcessor", "GlmgaVideoProcessor", "Qwen2VLVideoProcessor"]
)
@pytest.mark.parametrize("do_sample_frames", [True, False])
def test_fps_zero_metadata(cls, do_sample_frames):
    spec = video_spec_from_dict(
        {"video_processor_type": cls, "do_sample_frames": do_sample_frames, "fps": 2.0}
    )
    with pytest.raises(VideoSamplingError, match="frame rate 0"):
        sample_video(VideoMetadata(100, 0.0, 3.3, 64, 48), spec)


def test_frame_indices_checked():
    path = MEDIA / "videos" / "coffee_15frames_10fps.webm"
    with pytest.raises(VideoSamplingError, match="past the end"):
        read_frames(path, [3, 15])
    with pytest.raises(VideoSamplingError, match="negative"):
        read_frames(path, [-1])
    with pytest.raises(VideoSamplingError, match="no frame indices"):
        read_frames(path, [])
    with pytest.raises(MediaError, match="no such video file"):
        probe_video(MEDIA / "videos" / "missing.mp4")


def test_webm_frame_count_is_counted_not_stated():
    path = MEDIA / "videos" / "coffee_15frames_10fps.webm"
    with av.open(str(path)) as container:
        assert container.streams.video[0].frames == 0  # the container does not state it
        decoded = sum(1 for _ in container.decode(video=0))
    assert decoded == 15
    assert probe_video(path).total_num_frames == decoded


def test_video_without_frames():
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height = 64, 48
    data = buf.getvalue()
    with pytest.raises((VideoSamplingError, MediaError)):
        probe_video(data)
    with pytest.raises((VideoSamplingError, MediaError)):
        read_frames(data, [0])
    with pytest.raises(MediaError, match="empty video data"):
        probe_video(b"")


def test_bad_text_sources():
    for bad in (
        "not base64 at all!",
        "data:image/png,rawtext",
        "data:;base64,@@@@",
        "",
        "data:image/png;base64,",
    ):
        with pytest.raises(MediaError):
            load_image(bad)
    with pytest.raises(MediaError, match="unsupported image source"):
        load_image(12345)  # type: ignore[arg-type]
