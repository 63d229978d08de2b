"""Frame samplers, GLM timestamps and Qwen second_per_grid_ts vs HF 5.23's own code.

Reference: HF's `sample_frames` called on the HF video processor with an HF VideoMetadata,
HF's processor `replace_video_token` for the timestamp text, HF's `VideoMetadata.sampled_fps`,
and the hand-verified table of parity-spec §2.2. Where HF fails (division by zero, an index
past the end, zero frames) glimpse must raise VideoSamplingError instead.
"""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.models.glm4v.processing_glm4v import Glm4vProcessor
from transformers.models.glm4v.video_processing_glm4v import Glm4vVideoProcessor
from transformers.models.glm46v.processing_glm46v import Glm46VProcessor
from transformers.models.glm46v.video_processing_glm46v import Glm46VVideoProcessor
from transformers.models.glmga.video_processing_glmga import GlmgaVideoProcessor
from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor
from transformers.video_utils import VideoMetadata as HFVideoMetadata

from glimpse.errors import VideoSamplingError
from glimpse.media.video import VideoMetadata
from glimpse.processing.sampling import (
    glm_timestamps,
    sample_glm4v,
    sample_glm46v,
    sample_glmga,
    sample_qwen,
    sample_video,
    second_per_grid_ts,
    timestamp_text,
)
from glimpse.processing.spec import video_spec_from_dict

HF_GLM4V, HF_GLM46V = Glm4vVideoProcessor(), Glm46VVideoProcessor()
HF_GLMGA, HF_QWEN = GlmgaVideoProcessor(), Qwen2VLVideoProcessor()


def hf(processor, n, src_fps, duration, **kwargs):
    """HF's indices, or the exception type when HF fails (later, or right here)."""
    meta = HFVideoMetadata(total_num_frames=n, fps=src_fps, duration=duration)
    try:
        return [int(i) for i in processor.sample_frames(meta, **kwargs)]
    except (ValueError, ZeroDivisionError) as exc:
        return type(exc)


def ours(fn, n, src_fps, duration, **kwargs):
    try:
        return fn(VideoMetadata(n, src_fps, duration, 64, 48), **kwargs)
    except VideoSamplingError:
        return VideoSamplingError


def agree(expected, got, n):
    """Equal indices; or HF fails (now, or later on an empty/past-the-end list) and glimpse raises."""
    if isinstance(expected, list) and expected and max(expected) < n:
        return got == expected
    return got is VideoSamplingError


# parity-spec §2.2's verified table: (N, fps, duration) -> (count, first indices) per sampler.
TABLE = [
    ((300, 30, 10), (20, [0, 15, 30]), (60, [0, 5, 10]), (20, [0, 14, 28])),
    ((3000, 30, 100), (200, [0, 15, 30]), (200, [0, 15, 30]), (200, [0, 14, 29])),
    ((90000, 30, 3000), (600, [0]), (640, [0]), (640, [0])),
    ((3, 30, 0.1), (2, [0, 0]), None, None),
    ((5, 30, None), (2, [0, 4]), (6, [0, 1, 2, 3, 4, 4]), (2, [0, 0])),
]


@pytest.mark.parametrize("row", TABLE, ids=[str(r[0]) for r in TABLE])
def test_verified_table(row):
    (n, fps, duration), *expected = row
    for fn, processor, want in zip((sample_glm4v, sample_glm46v, sample_glmga), (HF_GLM4V, HF_GLM46V, HF_GLMGA),
                                   expected, strict=True):  # fmt: skip
        got = ours(fn, n, fps, duration)
        assert agree(hf(processor, n, fps, duration), got, n)
        if want is None:  # HF gives 0 frames (fails later in smart_resize)
            assert got is VideoSamplingError
        else:
            assert len(got) == want[0] and got[: len(want[1])] == want[1]


def test_glmga_quirks_verified():
    # parity-spec §2.2: a 1 s clip at 30 fps gives [0, 0]; 10 s at 30 fps spreads 20 frames over 0..270.
    assert sample_glmga(VideoMetadata(30, 30.0, 1.0, 8, 8)) == [0, 0]
    got = sample_glmga(VideoMetadata(300, 30.0, 10.0, 8, 8))
    assert len(got) == 20 and got[-1] == 270


@pytest.mark.parametrize(
    "fn,processor", [(sample_glm4v, HF_GLM4V), (sample_glm46v, HF_GLM46V), (sample_glmga, HF_GLMGA)]
)
@pytest.mark.parametrize("duration", [None, 3.3])
def test_fps_zero_raises(fn, processor, duration):
    got = ours(fn, 100, 0, duration)
    assert got is VideoSamplingError
    expected = hf(processor, 100, 0, duration)
    if isinstance(
        expected, list
    ):  # glm4v with a duration: HF samples [0, 0], then divides by 0 for timestamps
        with pytest.raises(ZeroDivisionError):
            HFVideoMetadata(total_num_frames=100, fps=0, frames_indices=expected).timestamps  # noqa: B018
    else:
        assert expected is ZeroDivisionError


def test_zero_frames_and_bad_metadata_raise():
    for fn in (sample_glm4v, sample_glm46v, sample_glmga, sample_qwen):
        with pytest.raises(VideoSamplingError, match="0 frames"):
            fn(VideoMetadata(0, 30.0, 1.0, 8, 8))
    for fn in (sample_glm4v, sample_glm46v, sample_glmga):
        with pytest.raises(VideoSamplingError, match="frame rate None"):
            fn(VideoMetadata(10, None, 1.0, 8, 8))
        with pytest.raises(VideoSamplingError, match="duration"):
            fn(VideoMetadata(10, 30.0, float("nan"), 8, 8))
    with pytest.raises(VideoSamplingError, match="too short"):
        sample_glm46v(VideoMetadata(3, 30.0, 0.1, 8, 8))


GLM_CASES = st.tuples(
    st.one_of(st.integers(1, 60), st.integers(1, 3000), st.integers(1, 40000)),
    st.sampled_from([1, 5, 10, 23.976, 24, 25, 29.97, 30, 50, 60, 0.5, 7.3]),
    st.one_of(st.none(), st.just(0), st.floats(0.01, 4000), st.just("n/fps")),
    st.sampled_from([1, 2, 3, 0.5, 4.7]),
)


@settings(max_examples=300, deadline=None, database=None)
@given(case=GLM_CASES)
def test_glm_samplers_match_hf(case):
    n, fps, duration, target = case
    if duration == "n/fps":
        duration = n / fps
    assert agree(
        hf(HF_GLM4V, n, fps, duration, fps=target), ours(sample_glm4v, n, fps, duration, fps=target), n
    )
    assert agree(hf(HF_GLM46V, n, fps, duration), ours(sample_glm46v, n, fps, duration), n)
    assert agree(
        hf(HF_GLMGA, n, fps, duration, fps=target), ours(sample_glmga, n, fps, duration, fps=target), n
    )


def test_glm4v_max_duration_and_glmga_max_frames_are_instance_values():
    long = (9000, 30.0, 300.5)
    assert ours(sample_glm4v, *long, max_duration=100) == hf(Glm4vVideoProcessor(max_duration=100), *long)
    assert ours(sample_glmga, *long, max_frames=50) == hf(GlmgaVideoProcessor(max_frames=50), *long)
    # HF ignores a per-call max_frames for GLMGA: the instance value (640) wins.
    assert hf(HF_GLMGA, *long, max_frames=50) == hf(HF_GLMGA, *long)


@settings(max_examples=300, deadline=None, database=None)
@given(
    n=st.one_of(st.integers(1, 40), st.integers(1, 3000)),
    fps=st.sampled_from([1, 10, 24, 25, 29.97, 30, 60, 0.7]),
    mode=st.sampled_from(["fps", "num_frames"]),
    value=st.one_of(st.sampled_from([0.5, 1, 2, 3.5]), st.integers(2, 64)),
)
def test_qwen_sampler_matches_hf(n, fps, mode, value):
    kwargs = {"fps": float(value)} if mode == "fps" else {"num_frames": max(2, int(value))}
    expected = hf(HF_QWEN, n, fps, None, **kwargs)
    assert agree(expected, ours(sample_qwen, n, fps, None, **kwargs), n)


def test_qwen_float32_tail_index_raises():
    # parity-spec §2.2: N=230 at 30 fps sampled at 2 fps -> n=14, float32 arange gives 15 indices ending at 230.
    expected = hf(HF_QWEN, 230, 30, None, fps=2.0)
    assert len(expected) == 15 and expected[-1] == 230
    with pytest.raises(VideoSamplingError, match="past the"):
        sample_qwen(VideoMetadata(230, 30.0, None, 8, 8), fps=2.0)
    # N < 2 gives n = 0: HF divides by zero.
    assert hf(HF_QWEN, 1, 30, None, fps=2.0) is ZeroDivisionError
    with pytest.raises(VideoSamplingError, match="0 frames"):
        sample_qwen(VideoMetadata(1, 30.0, None, 8, 8), fps=2.0)
    assert hf(HF_QWEN, 10, 30, None, num_frames=12) is ValueError
    with pytest.raises(VideoSamplingError, match="only 10"):
        sample_qwen(VideoMetadata(10, 30.0, None, 8, 8), num_frames=12)


def _hf_text(style: str, indices: list[int], fps: float | None, grid_t: int) -> list[str]:
    cls = Glm4vProcessor if style == "int" else Glm46VProcessor
    fake = SimpleNamespace(video_processor=SimpleNamespace(merge_size=2), image_token="")
    fake.replace_frame_token_id = lambda ts, num_image_tokens=1: cls.replace_frame_token_id(
        fake, ts, num_image_tokens
    )
    import torch

    meta = HFVideoMetadata(total_num_frames=max(indices, default=0) + 1, fps=fps, frames_indices=indices)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        text = cls.replace_video_token(
            fake, {"video_grid_thw": torch.tensor([[grid_t, 2, 2]]), "video_metadata": [meta]}, 0
        )
    return [chunk for chunk in text.split("<|begin_of_image|><|end_of_image|>") if chunk]


@settings(max_examples=150, deadline=None, database=None)
@given(
    indices=st.lists(st.integers(0, 5000), min_size=1, max_size=30).map(sorted),
    fps=st.one_of(st.none(), st.sampled_from([1.0, 23.976, 29.97, 30.0, 7.0])),
    extra=st.integers(-3, 3),
    style=st.sampled_from(["int", "seconds"]),
)
def test_timestamp_text_matches_hf(indices, fps, extra, style):
    grid_t = max(1, (len(indices) + 1) // 2 + extra)  # also exercises HF's truncate / repeat-last padding
    got = [timestamp_text(s, style) for s in glm_timestamps(indices, fps, grid_t)]
    assert got == _hf_text(style, indices, fps, grid_t)


def test_timestamp_fps_zero_raises():
    with pytest.raises(VideoSamplingError, match="frame rate 0"):
        glm_timestamps([0, 1], 0.0, 1)


@pytest.mark.parametrize("n,fps,count", [(300, 30.0, 20), (15, 10.0, 4), (144, 24.0, 144), (7, None, 7)])
def test_second_per_grid_ts_matches_hf(n, fps, count):
    indices = list(range(count))
    expected = 2 / HFVideoMetadata(total_num_frames=n, fps=fps, frames_indices=indices).sampled_fps
    assert second_per_grid_ts(count, VideoMetadata(n, fps, None, 8, 8), 2) == expected
    with pytest.raises(VideoSamplingError):
        second_per_grid_ts(count, VideoMetadata(n, 0.0, None, 8, 8), 2)


def test_sample_video_dispatch():
    meta = VideoMetadata(300, 30.0, 10.0, 480, 270)
    glm46v = sample_video(meta, video_spec_from_dict({"video_processor_type": "Glm46VVideoProcessor"}))
    assert list(glm46v.indices) == hf(HF_GLM46V, 300, 30, 10.0)
    assert len(glm46v.timestamps) == len(glm46v.indices) // 2 and glm46v.timestamp_text[:3] == (
        "0.0 seconds",
        "0.3 seconds",
        "0.7 seconds",
    )  # parity-spec §2.4
    glm4v = sample_video(meta, video_spec_from_dict({"video_processor_type": "Glm4vVideoProcessor"}))
    assert glm4v.timestamp_text[:3] == ("0", "1", "2")
    qwen = sample_video(meta, video_spec_from_dict({"video_processor_type": "Qwen2VLVideoProcessor"}))
    assert list(qwen.indices) == list(range(300)) and qwen.second_per_grid_ts == 2 / 30
    given_frames = sample_video(VideoMetadata(3, None, None, 8, 8),
                                video_spec_from_dict({"video_processor_type": "Glm4vVideoProcessor", "do_sample_frames": False}))  # fmt: skip
    assert given_frames.indices == (0, 1, 2) and given_frames.timestamp_text == (
        "0",
        "0",
    )  # 24 fps assumed, as HF


def test_greedy_walk_is_closed_form_on_long_videos():
    # 3 hours at 60 fps (648k source frames): HF walks every frame in Python; glimpse must not.
    import time

    meta = VideoMetadata(648_000, 60.0, 10_800.0, 8, 8)
    start = time.perf_counter()
    got = sample_glm46v(meta)
    assert time.perf_counter() - start < 0.5
    assert len(got) == 640 and got == hf(HF_GLM46V, 648_000, 60.0, 10_800.0)
