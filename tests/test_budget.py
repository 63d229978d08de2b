"""Token budgets: exact counts vs HF, and upper bounds that are never too low and are attained.

References: HF 5.23's `smart_resize` functions (and `get_num_of_video_patches`) for every count;
brute-force sweeps over sizes, aspect ratios and frame counts for "never too low"; the bound's
own witness input, re-counted with HF's `smart_resize`, for "attained"; and the hand-verified
numbers of parity-spec §7.2/§7.4 (7500 image tokens, 43 703 and 59 653 video tokens).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.models.glm4v.image_processing_glm4v import smart_resize as hf_glm_resize
from transformers.models.glm4v.video_processing_glm4v import Glm4vVideoProcessor
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize as hf_qwen_resize

from glimpse.errors import InvalidInputError
from glimpse.media.video import VideoMetadata
from glimpse.processing.budget import (
    frame_cap,
    image_tokens,
    max_image_tokens,
    max_video_tokens,
    video_tokens,
    video_tokens_for,
    worst_image_size,
    worst_video_shape,
)
from glimpse.processing.sampling import sample_video
from glimpse.processing.spec import image_spec_from_dict, video_spec_from_dict


def hf_frame_tokens(spec, t: int, h: int, w: int) -> int:
    """Tokens of one frame with HF's smart_resize (-1 where HF refuses the size)."""
    try:
        if spec.resize_rule == "qwen":
            rh, rw = hf_qwen_resize(h, w, spec.factor, spec.min_pixels, spec.max_pixels)
        else:
            rh, rw = hf_glm_resize(max(t, spec.temporal_patch_size), h, w, spec.temporal_patch_size, spec.factor,
                                   spec.min_pixels, spec.max_pixels)  # fmt: skip
    except (ValueError, ZeroDivisionError):
        return -1
    return (rh // spec.patch_size) * (rw // spec.patch_size) // spec.merge_size**2


IMAGE_SPECS = {
    "glm": {"image_processor_type": "Glm4vImageProcessor"},
    "glmga_e2": {"image_processor_type": "GlmgaImageProcessor", "patch_expand_factor": 2},
    "qwen": {"image_processor_type": "Qwen2VLImageProcessor", "min_pixels": 3136, "max_pixels": 12845056},
    # small areas: the clamp and the rounding-past-aspect-200 outputs decide the maximum here
    "glm_tiny": {
        "image_processor_type": "Glm4vImageProcessor",
        "size": {"shortest_edge": 784, "longest_edge": 28 * 28 * 2 * 7},
    },
    "glm_prime": {
        "image_processor_type": "Glm4vImageProcessor",
        "size": {"shortest_edge": 784, "longest_edge": 28 * 28 * 2 * 7507},
    },
    "qwen_tiny": {
        "image_processor_type": "Qwen2VLImageProcessor",
        "min_pixels": 784,
        "max_pixels": 28 * 28 * 150,
    },
    "glm_min_near_max": {
        "image_processor_type": "Glm4vImageProcessor",
        "size": {"shortest_edge": 400_000, "longest_edge": 500_000},
    },
}


@settings(max_examples=200, deadline=None, database=None)
@given(h=st.integers(1, 8000), w=st.integers(1, 8000), which=st.sampled_from(list(IMAGE_SPECS)))
def test_image_tokens_exact(h, w, which):
    spec = image_spec_from_dict(IMAGE_SPECS[which])
    expected = hf_frame_tokens(spec, spec.temporal_patch_size, h, w)
    if expected < 0:
        with pytest.raises(InvalidInputError):
            image_tokens(h, w, spec)
    else:
        assert image_tokens(h, w, spec) == expected


@settings(max_examples=150, deadline=None, database=None)
@given(t=st.integers(1, 700), h=st.integers(20, 4000), w=st.integers(20, 4000))
def test_video_tokens_exact(t, h, w):
    hf = Glm4vVideoProcessor()
    spec = video_spec_from_dict({"video_processor_type": "Glm4vVideoProcessor"})
    try:
        expected = hf.get_num_of_video_patches(max(t, 2), h, w) // 4
    except ValueError:
        with pytest.raises(InvalidInputError):
            video_tokens(t, h, w, spec)
        return
    assert video_tokens(t, h, w, spec) == expected


def test_video_tokens_for_metadata_needs_no_pixels():
    meta = VideoMetadata(300, 30.0, 10.0, 480, 270)
    spec = video_spec_from_dict({"video_processor_type": "Glm46VVideoProcessor"})
    count = len(sample_video(meta, spec).indices)
    assert (
        video_tokens_for(meta, spec)
        == video_tokens(count, 270, 480, spec)
        == hf_frame_tokens(spec, count, 270, 480) * count // 2
    )


def _image_sweep(rng: np.random.Generator) -> list[tuple[int, int]]:
    """Sizes that stress every resize branch: squares, every aspect up to 200, thin and huge inputs."""
    sizes = [(h, w) for h in range(1, 120, 3) for w in range(1, 120, 7)]
    for ratio in np.concatenate([np.linspace(1, 200, 400), 200 - np.logspace(-4, 0, 40)]):
        for short in (1, 2, 13, 27, 28, 29, 41, 42, 55, 57, 100, 280, 1000, 4096, 30000):
            sizes.append((short, max(1, int(short * ratio))))
    heights = rng.integers(1, 50_000, 3000)
    ratios = np.exp(rng.uniform(0, math.log(200), 3000))
    sizes += [(int(h), max(1, int(h * r))) for h, r in zip(heights, ratios, strict=True)]
    return sizes + [(w, h) for h, w in sizes[::5]]


@pytest.mark.parametrize("which", list(IMAGE_SPECS))
def test_image_bound_never_low_and_attained(which):
    spec = image_spec_from_dict(IMAGE_SPECS[which])
    bound = max_image_tokens(spec)
    truth = max(
        hf_frame_tokens(spec, spec.temporal_patch_size, h, w)
        for h, w in _image_sweep(np.random.default_rng(0))
    )
    assert truth <= bound
    assert (
        hf_frame_tokens(spec, spec.temporal_patch_size, *worst_image_size(spec)) == bound
    )  # attained: tight


def test_image_bound_hand_checked():
    # parity-spec §7.2: 7500 = A/(Tp*784) for GLM defaults (vLLM's square estimate says 7396).
    assert max_image_tokens(image_spec_from_dict(IMAGE_SPECS["glm"])) == 7500
    # Qwen: A/784 = 16384 = 128 x 128 blocks.
    assert max_image_tokens(image_spec_from_dict(IMAGE_SPECS["qwen"])) == 16384
    # 7507 is prime: no factor pair within aspect 200 reaches it.
    assert max_image_tokens(image_spec_from_dict(IMAGE_SPECS["glm_prime"])) < 7507


VIDEO_SPECS = {
    "glm4v": ({"video_processor_type": "Glm4vVideoProcessor"}, None),
    "glm46v": ({"video_processor_type": "Glm46VVideoProcessor"}, None),
    "glmga": ({"video_processor_type": "GlmgaVideoProcessor"}, None),
    "glmga_e2": (
        {"video_processor_type": "GlmgaVideoProcessor", "patch_expand_factor": 2, "max_frames": 99},
        None,
    ),
    "glm46v_given": ({"video_processor_type": "Glm46VVideoProcessor", "do_sample_frames": False}, 40),
    "qwen": ({"video_processor_type": "Qwen2VLVideoProcessor", "do_sample_frames": True, "fps": 2.0}, None),
    "qwen_cap": ({"video_processor_type": "Qwen2VLVideoProcessor", "cap_pixels_per_frame": True}, 64),
    "glm_tiny": (
        {
            "video_processor_type": "Glm4vVideoProcessor",
            "size": {"shortest_edge": 784, "longest_edge": 28 * 28 * 2 * 300},
        },
        30,
    ),
}


def _frame_counts(spec, cap: int) -> list[int]:
    step = 1 if not spec.do_sample_frames else (spec.temporal_patch_size if spec.sampler == "qwen" else 2)
    counts = list(range(step, min(cap, 24) + 1, step)) + list(range(cap, max(step, cap - 12), -step))
    return sorted(set(counts) | {c for c in range(step, cap + 1, step) if c % 37 == 0})


@pytest.mark.parametrize("which", list(VIDEO_SPECS))
def test_video_bound_never_low_and_attained(which):
    cfg, max_frames = VIDEO_SPECS[which]
    spec = video_spec_from_dict(cfg)
    bound = max_video_tokens(spec, max_frames)
    cap = frame_cap(spec, max_frames)
    rng = np.random.default_rng(1)
    sizes = [(h, w) for h, w in _image_sweep(rng)[::6]]
    truth = 0
    for t in _frame_counts(spec, cap):
        if spec.sampler == "qwen" and spec.cap_pixels_per_frame:
            per_frame = max(video_tokens(t, h, w, spec) if h * 200 >= w else -1 for h, w in sizes[:400])
            truth = max(truth, per_frame)
            continue
        per_frame = max(hf_frame_tokens(spec, t, h, w) for h, w in sizes)
        truth = max(truth, -(-t // spec.temporal_patch_size) * per_frame)
    assert truth <= bound
    t, h, w = worst_video_shape(spec, max_frames)
    assert t <= cap
    if spec.sampler == "qwen" and spec.cap_pixels_per_frame:
        assert video_tokens(t, h, w, spec) == bound
    else:
        assert -(-t // spec.temporal_patch_size) * hf_frame_tokens(spec, t, h, w) == bound  # attained


def test_video_bound_hand_checked():
    # parity-spec §7.4: the max(f, ...) clamp lifts GLM-4.6V over A/1568 = 30 000 and GLMGA over 55 790.
    glm46v = video_spec_from_dict({"video_processor_type": "Glm46VVideoProcessor"})
    assert max_video_tokens(glm46v) == 43_703 and worst_video_shape(glm46v) == (638, 28, 5600)
    assert max_video_tokens(video_spec_from_dict({"video_processor_type": "GlmgaVideoProcessor"})) == 59_653
    # Odd T (frames given as is): T=5 rounds to t_bar=4 in the area test: 3 * 15 000 tokens.
    given_frames = video_spec_from_dict(
        {"video_processor_type": "Glm46VVideoProcessor", "do_sample_frames": False}
    )
    assert max_video_tokens(given_frames, 5) == 45_000
    assert 3 * hf_frame_tokens(given_frames, 5, *worst_video_shape(given_frames, 5)[1:]) == 45_000


def test_unbounded_video_needs_a_frame_cap():
    spec = video_spec_from_dict({"video_processor_type": "Qwen2VLVideoProcessor"})  # keeps every frame
    with pytest.raises(InvalidInputError, match="pass max_frames"):
        max_video_tokens(spec)
    assert max_video_tokens(spec, 10) == 5 * 768
