"""glimpse preprocessing vs HF 5.23's torchvision processors: settings, grids and bit-exact pixel_values.

Reference: HF's image/video processor classes instantiated directly with the same config dicts
(no tokenizer). Images: every file in tests/data/media plus hypothesis-random sizes and aspect
ratios. Videos: frames decoded by glimpse's reader; HF gets the whole clip with its metadata
and samples frames itself, so indices, timestamps and pixels are all compared.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import MEDIA
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from transformers.models.glm4v.image_processing_glm4v import Glm4vImageProcessor
from transformers.models.glm4v.video_processing_glm4v import Glm4vVideoProcessor
from transformers.models.glm46v.image_processing_glm46v import Glm46VImageProcessor
from transformers.models.glm46v.video_processing_glm46v import Glm46VVideoProcessor
from transformers.models.glmga.image_processing_glmga import GlmgaImageProcessor
from transformers.models.glmga.video_processing_glmga import GlmgaVideoProcessor
from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor
from transformers.video_utils import VideoMetadata as HFVideoMetadata

from glimpse.errors import CheckpointError, InvalidInputError, LimitExceededError
from glimpse.media.image import load_image
from glimpse.media.video import probe_video, read_frames
from glimpse.processing import resize
from glimpse.processing.resize import (
    frame_resizer,
    preprocess_images,
    preprocess_resized_video,
    preprocess_video,
    smart_resize_glm,
    smart_resize_qwen,
    video_target_size,
)
from glimpse.processing.sampling import sample_video
from glimpse.processing.spec import (
    Ceilings,
    image_spec_from_dict,
    load_specs,
    video_spec_from_dict,
    with_overrides,
)

IMAGE_FILES = sorted((MEDIA / "images").iterdir())
VIDEO_FILES = sorted((MEDIA / "videos").iterdir())

HF_IMAGE = {
    "Glm4vImageProcessor": Glm4vImageProcessor,
    "Glm46VImageProcessor": Glm46VImageProcessor,
    "GlmgaImageProcessor": GlmgaImageProcessor,
    "Qwen2VLImageProcessor": Qwen2VLImageProcessor,
}
HF_VIDEO = {
    "Glm4vVideoProcessor": Glm4vVideoProcessor,
    "Glm46VVideoProcessor": Glm46VVideoProcessor,
    "GlmgaVideoProcessor": GlmgaVideoProcessor,
    "Qwen2VLVideoProcessor": Qwen2VLVideoProcessor,
}

# (id, config dict) pairs: class defaults, a GLMGA expand-factor-2 case, checkpoint-like overrides.
IMAGE_CONFIGS = [
    ("glm4v", {"image_processor_type": "Glm4vImageProcessor"}),
    ("glm46v", {"image_processor_type": "Glm46VImageProcessor"}),
    ("glmga", {"image_processor_type": "GlmgaImageProcessor"}),
    ("glmga_e2", {"image_processor_type": "GlmgaImageProcessor", "patch_expand_factor": 2}),
    ("qwen", {"image_processor_type": "Qwen2VLImageProcessor", "min_pixels": 3136, "max_pixels": 12845056}),
    (
        "glm_small",
        {
            "image_processor_type": "Glm4vImageProcessorFast",
            "size": {"shortest_edge": 3136, "longest_edge": 200704},
        },
    ),
    ("qwen_small", {"image_processor_type": "Qwen2VLImageProcessor", "max_pixels": 50176}),
]


def hf_image_processor(cfg: dict):
    cls = HF_IMAGE[image_spec_from_dict(cfg).processor_class]
    return cls(**{k: v for k, v in cfg.items() if k != "image_processor_type"})


def hf_video_processor(cfg: dict):
    cls = HF_VIDEO[video_spec_from_dict(cfg).processor_class]
    kwargs = {k: v for k, v in cfg.items() if k not in ("image_processor_type", "video_processor_type")}
    return cls(**kwargs)


def hf_images(cfg: dict, images: list[Image.Image]) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return hf_image_processor(cfg)(images=images, return_tensors="pt")


# ---- settings ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name,cfg", IMAGE_CONFIGS, ids=[c[0] for c in IMAGE_CONFIGS])
def test_image_spec_matches_hf_instance(name, cfg):
    spec = image_spec_from_dict(cfg)
    hf = hf_image_processor(cfg)
    assert (spec.min_pixels, spec.max_pixels) == (hf.size.shortest_edge, hf.size.longest_edge)
    assert (spec.patch_size, spec.temporal_patch_size, spec.merge_size) == (
        hf.patch_size,
        hf.temporal_patch_size,
        hf.merge_size,
    )
    assert spec.patch_expand_factor == getattr(hf, "patch_expand_factor", 1)
    assert spec.image_mean == tuple(hf.image_mean) and spec.image_std == tuple(hf.image_std)


VIDEO_CONFIGS = [
    ("glm4v", {"video_processor_type": "Glm4vVideoProcessor"}),
    ("glm46v", {"video_processor_type": "Glm46VVideoProcessor"}),
    ("glmga", {"video_processor_type": "GlmgaVideoProcessor", "fps": 3, "max_frames": 32}),
    ("glmga_e2", {"video_processor_type": "GlmgaVideoProcessor", "patch_expand_factor": 2}),
    ("qwen", {"video_processor_type": "Qwen2VLVideoProcessor", "do_sample_frames": True, "fps": 2.0}),
    # Every frame kept (Qwen's default; a GLM checkpoint or request may ask for it too).
    ("qwen_all", {"video_processor_type": "Qwen2VLVideoProcessor"}),
    ("glm46v_all", {"video_processor_type": "Glm46VVideoProcessor", "do_sample_frames": False}),
    (
        "qwen_frames",
        {"video_processor_type": "Qwen2VLVideoProcessor", "do_sample_frames": True, "num_frames": 9},
    ),
    (
        "qwen_cap",
        {
            "video_processor_type": "Qwen2VLVideoProcessor",
            "do_sample_frames": True,
            "fps": 4.0,
            "cap_pixels_per_frame": True,
            "max_video_tokens": 2000,
        },
    ),
    # No video config: HF loads the video class from the image config (image limits apply).
    (
        "qwen_from_image",
        {
            "image_processor_type": "Qwen2VLImageProcessor",
            "min_pixels": 3136,
            "max_pixels": 200704,
            "do_sample_frames": True,
            "fps": 1.0,
        },
    ),
    (
        "glm4v_from_image",
        {
            "image_processor_type": "Glm4vImageProcessor",
            "size": {"shortest_edge": 12544, "longest_edge": 2000000},
        },
    ),
]


@pytest.mark.parametrize("name,cfg", VIDEO_CONFIGS, ids=[c[0] for c in VIDEO_CONFIGS])
def test_video_spec_matches_hf_instance(name, cfg):
    spec = video_spec_from_dict(cfg)
    hf = hf_video_processor(cfg)
    assert (spec.min_pixels, spec.max_pixels) == (hf.size.shortest_edge, hf.size.longest_edge)
    assert spec.do_sample_frames == hf.do_sample_frames
    assert spec.patch_expand_factor == getattr(hf, "patch_expand_factor", 1)
    if spec.sampler in ("glm4v", "glmga", "qwen"):
        assert spec.fps == hf.fps
    if spec.sampler in ("glmga", "qwen"):
        assert spec.max_frames == hf.max_frames
    if spec.sampler == "qwen":
        assert (spec.num_frames, spec.min_frames) == (hf.num_frames, hf.min_frames)
        assert spec.cap_pixels_per_frame == bool(hf.cap_pixels_per_frame)


def _write(folder: Path, name: str, data: dict) -> None:
    (folder / name).write_text(json.dumps(data))


def test_load_specs_file_priority(tmp_path):
    # Video falls back to preprocessor_config.json: the image limits apply to videos (parity-spec §1.7).
    _write(
        tmp_path,
        "preprocessor_config.json",
        {"image_processor_type": "Qwen2VLImageProcessor", "max_pixels": 12845056},
    )
    image, video = load_specs(tmp_path)
    assert (image.resize_rule, image.max_pixels) == ("qwen", 12845056)
    assert (video.sampler, video.max_pixels, video.do_sample_frames) == ("qwen", 12845056, False)
    # A video config wins over the image one; processor_config.json (nested) wins over both.
    _write(
        tmp_path,
        "video_preprocessor_config.json",
        {"video_processor_type": "Qwen2VLVideoProcessor", "max_pixels": 602112},
    )
    assert load_specs(tmp_path)[1].max_pixels == 602112
    _write(
        tmp_path,
        "processor_config.json",
        {
            "processor_class": "Glm46VProcessor",
            "image_processor": {"image_processor_type": "Glm46VImageProcessor"},
            "video_processor": {"video_processor_type": "Glm4vVideoProcessor"},
        },
    )
    image, video = load_specs(tmp_path)
    assert image.processor_class == "Glm46VImageProcessor" and video.sampler == "glm4v"
    # GLM-4.6V-Flash style: a 4.1V video class under Glm46VProcessor writes "x.y seconds".
    assert video.timestamp_format == "seconds"


def test_load_specs_rejects_unusable_configs(tmp_path):
    with pytest.raises(CheckpointError, match="no preprocessor_config.json"):
        load_specs(tmp_path)
    _write(tmp_path, "preprocessor_config.json", {"image_processor_type": "SiglipImageProcessor"})
    with pytest.raises(CheckpointError, match="unsupported image_processor_type"):
        load_specs(tmp_path)
    # HF replaces the whole size dict, so a missing key stays missing and HF fails at call time.
    _write(
        tmp_path,
        "preprocessor_config.json",
        {"image_processor_type": "Glm4vImageProcessor", "size": {"shortest_edge": 1}},
    )
    with pytest.raises(CheckpointError, match="longest_edge"):
        load_specs(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="JSON"):
        load_specs(tmp_path)


def test_glm_image_ignores_pixel_aliases_like_hf():
    cfg = {"image_processor_type": "Glm4vImageProcessor", "max_pixels": 5000, "min_pixels": 100}
    spec = image_spec_from_dict(cfg)
    assert (
        (spec.min_pixels, spec.max_pixels)
        == (12544, 11760000)
        == (hf_image_processor(cfg).size.shortest_edge, hf_image_processor(cfg).size.longest_edge)
    )


def test_overrides_validated():
    image = image_spec_from_dict({"image_processor_type": "Glm4vImageProcessor"})
    assert with_overrides(image, max_pixels=200704).max_pixels == 200704
    with pytest.raises(InvalidInputError, match="unknown image setting 'fps'"):
        with_overrides(image, fps=2)
    with pytest.raises(LimitExceededError, match="ceiling"):
        with_overrides(image, max_pixels=image.max_pixels + 1)
    assert with_overrides(image, Ceilings(max_pixels=2 * image.max_pixels), max_pixels=image.max_pixels + 1)
    with pytest.raises(InvalidInputError, match="larger than max_pixels"):
        with_overrides(image, min_pixels=300000, max_pixels=200000)
    with pytest.raises(InvalidInputError, match="integer"):
        with_overrides(image, max_pixels=0)

    glm46v = video_spec_from_dict({"video_processor_type": "Glm46VVideoProcessor"})
    with pytest.raises(InvalidInputError, match="HF ignores it"):
        with_overrides(glm46v, fps=1)
    glmga = video_spec_from_dict({"video_processor_type": "GlmgaVideoProcessor"})
    with pytest.raises(InvalidInputError, match="HF ignores it"):
        with_overrides(glmga, max_frames=10)
    assert with_overrides(glmga, fps=1.5).fps == 1.5
    glm4v = video_spec_from_dict({"video_processor_type": "Glm4vVideoProcessor"})
    with pytest.raises(InvalidInputError, match="HF ignores it"):
        with_overrides(glm4v, max_duration=10)
    with pytest.raises(LimitExceededError, match="--max-fps"):
        with_overrides(glm4v, fps=120)

    qwen = video_spec_from_dict({"video_processor_type": "Qwen2VLVideoProcessor", "fps": 2.0})
    switched = with_overrides(qwen, num_frames=8)
    assert (switched.num_frames, switched.fps, switched.do_sample_frames) == (8, None, True)
    with pytest.raises(InvalidInputError, match="exclude each other"):
        with_overrides(qwen, num_frames=8, fps=1.0)
    with pytest.raises(LimitExceededError, match="--max-frames"):
        with_overrides(qwen, num_frames=10_000)
    with pytest.raises(InvalidInputError, match="do_sample_frames"):
        with_overrides(qwen, fps=1.0, do_sample_frames=False)


# ---- smart_resize vs HF ------------------------------------------------------------------------

SIZE = st.integers(1, 6000)


@settings(max_examples=400, deadline=None, database=None)
@given(
    t=st.integers(2, 700), h=SIZE, w=SIZE, f=st.sampled_from([28, 56]), a_max=st.integers(10_000, 120_000_000)
)
def test_smart_resize_glm_matches_hf(t, h, w, f, a_max):
    from transformers.models.glm4v.image_processing_glm4v import smart_resize

    try:
        expected = smart_resize(t, h, w, 2, f, 12544, a_max)
    except ValueError:
        with pytest.raises(InvalidInputError):
            smart_resize_glm(t, h, w, 2, f, 12544, a_max)
        return
    assert smart_resize_glm(t, h, w, 2, f, 12544, a_max) == expected


@settings(max_examples=400, deadline=None, database=None)
@given(h=SIZE, w=SIZE, a_min=st.integers(1, 200_000), a_max=st.integers(200_000, 20_000_000))
def test_smart_resize_qwen_matches_hf(h, w, a_min, a_max):
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    try:
        expected = smart_resize(h, w, 28, a_min, a_max)
    except ValueError:
        with pytest.raises(InvalidInputError):
            smart_resize_qwen(h, w, 28, a_min, a_max)
        return
    assert smart_resize_qwen(h, w, 28, a_min, a_max) == expected


def test_smart_resize_verified_examples():
    # parity-spec §1.2/§1.3 hand-checked values.
    assert smart_resize_glm(2, 10, 10) == (84, 84)
    assert smart_resize_glm(2, 1, 100, max_pixels=11760000) == (28, 2800)
    assert smart_resize_qwen(10, 10, 28, 3136, 12845056) == (56, 56)
    assert smart_resize_qwen(27, 2000, 28, 3136, 12845056) == (28, 1988)
    with pytest.raises(InvalidInputError, match="aspect ratio"):
        smart_resize_glm(2, 28, 5601)
    with pytest.raises(InvalidInputError, match="at least 1 pixel"):
        smart_resize_qwen(0, 10)


# ---- images: pixel_values bit-exact ------------------------------------------------------------


@pytest.fixture(scope="module")
def media_images():
    return [load_image(path) for path in IMAGE_FILES]


@pytest.mark.parametrize("name,cfg", IMAGE_CONFIGS, ids=[c[0] for c in IMAGE_CONFIGS])
def test_media_images_bit_exact(name, cfg, media_images):
    expected = hf_images(cfg, media_images)
    pixel_values, grid = preprocess_images(media_images, image_spec_from_dict(cfg))
    assert torch.equal(grid, expected["image_grid_thw"])
    assert pixel_values.dtype == torch.float32
    assert torch.equal(pixel_values, expected["pixel_values"])


@settings(max_examples=25, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    h=st.integers(1, 400),
    w=st.integers(1, 400),
    which=st.sampled_from([c[0] for c in IMAGE_CONFIGS]),
)
def test_random_sizes_bit_exact(data, h, w, which):
    cfg = dict(IMAGE_CONFIGS)[which]
    thin = data.draw(st.sampled_from([None, "tall", "wide"]))
    if thin == "tall":
        h, w = min(h * 40, 6000), max(1, w // 20)
    elif thin == "wide":
        h, w = max(1, h // 20), min(w * 40, 6000)
    rng = np.random.default_rng(h * 7919 + w)
    image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    try:
        expected = hf_images(cfg, [image])
    except ValueError:  # HF refuses (aspect > 200): glimpse must refuse with its named error
        with pytest.raises(InvalidInputError):
            preprocess_images([image], image_spec_from_dict(cfg))
        return
    pixel_values, grid = preprocess_images([image], image_spec_from_dict(cfg))
    assert torch.equal(grid, expected["image_grid_thw"])
    assert torch.equal(pixel_values, expected["pixel_values"])


@pytest.mark.parametrize("threads", [1, 3])
def test_batch_of_mixed_sizes_keeps_order(media_images, threads):
    """One thread: images in turn; more: spread over a pool (preprocess_images); same rows, in order."""
    cfg = IMAGE_CONFIGS[0][1]
    batch = [media_images[2], media_images[0], media_images[2], media_images[4]]
    expected = hf_images(cfg, batch)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        pixel_values, grid = preprocess_images(batch, image_spec_from_dict(cfg))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(grid, expected["image_grid_thw"])
    assert torch.equal(pixel_values, expected["pixel_values"])


# ---- videos --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def decoded_videos():
    """path -> (every frame, glimpse metadata): HF gets whole clips and samples them itself."""
    out = {}
    for path in VIDEO_FILES:
        meta = probe_video(path)
        out[path.name] = (read_frames(path, range(meta.total_num_frames)), meta)
    return out


def _hf_replace_video_token(spec, grid, hf_meta):
    """HF's own GLM processor code builds the timestamp text (no tokenizer needed)."""
    from types import SimpleNamespace

    from transformers.models.glm4v.processing_glm4v import Glm4vProcessor
    from transformers.models.glm46v.processing_glm46v import Glm46VProcessor

    cls = Glm4vProcessor if spec.timestamp_format == "int" else Glm46VProcessor
    fake = SimpleNamespace(video_processor=SimpleNamespace(merge_size=spec.merge_size), image_token="")
    fake.replace_frame_token_id = lambda ts, num_image_tokens=1: cls.replace_frame_token_id(
        fake, ts, num_image_tokens
    )
    text = cls.replace_video_token(fake, {"video_grid_thw": grid, "video_metadata": [hf_meta]}, 0)
    return [chunk for chunk in text.split("<|begin_of_image|><|end_of_image|>") if chunk]


@pytest.mark.parametrize("how", ["batch", "while_decoding"])
@pytest.mark.parametrize("video", [p.name for p in VIDEO_FILES])
@pytest.mark.parametrize("name,cfg", VIDEO_CONFIGS, ids=[c[0] for c in VIDEO_CONFIGS])
def test_videos_bit_exact(name, cfg, video, how, decoded_videos):
    """HF gets every full-size frame. glimpse resizes the sampled frames as one batch ("batch",
    pre-decoded input) or one by one as read_frames decodes them ("while_decoding", the processor's
    path for files: no full-size stack is held)."""
    frames, meta = decoded_videos[video]
    spec = video_spec_from_dict(cfg)
    sampled = sample_video(meta, spec)
    hf_meta = HFVideoMetadata(total_num_frames=meta.total_num_frames, fps=meta.fps, duration=meta.duration,
                              width=meta.width, height=meta.height)  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = hf_video_processor(cfg)(videos=[frames], video_metadata=[hf_meta], return_metadata=True,
                                           return_tensors="pt")  # fmt: skip
    hf_meta = expected["video_metadata"][0]
    if hf_meta.frames_indices is None:  # HF kept every frame; its loaders then list them all (hf_oracle too)
        hf_meta.frames_indices = list(range(meta.total_num_frames))
    assert list(sampled.indices) == [int(i) for i in hf_meta.frames_indices]

    if how == "batch":
        pixel_values, grid = preprocess_video(frames[list(sampled.indices)], spec)
    else:
        size = video_target_size(len(sampled.indices), meta.height, meta.width, spec)
        resizer = frame_resizer(len(sampled.indices), spec)
        resized = read_frames(MEDIA / "videos" / video, sampled.indices, frame_fn=resizer)
        assert resized.shape == (len(sampled.indices), *size, 3)
        pixel_values, grid = preprocess_resized_video(resized, spec)
    assert torch.equal(grid, expected["video_grid_thw"])
    assert torch.equal(pixel_values, expected["pixel_values_videos"])

    if spec.sampler == "qwen":
        assert sampled.second_per_grid_ts == pytest.approx(
            spec.temporal_patch_size / hf_meta.sampled_fps, rel=0, abs=0
        )
    else:
        assert list(sampled.timestamp_text) == _hf_replace_video_token(
            spec, expected["video_grid_thw"], hf_meta
        )


def test_one_frame_clip():
    """Qwen: HF accepts T=1 as is. GLM: HF refuses T < 2; glimpse pads, equal to HF given the frame twice."""
    rng = np.random.default_rng(3)
    frame = rng.integers(0, 256, (1, 90, 130, 3), dtype=np.uint8)
    qwen_cfg = {"video_processor_type": "Qwen2VLVideoProcessor"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = hf_video_processor(qwen_cfg)(videos=[frame], return_tensors="pt")
    pixel_values, grid = preprocess_video(frame, video_spec_from_dict(qwen_cfg))
    assert torch.equal(pixel_values, expected["pixel_values_videos"]) and torch.equal(
        grid, expected["video_grid_thw"]
    )

    glm_cfg = {"video_processor_type": "Glm4vVideoProcessor"}
    with pytest.raises(ValueError, match="temporal_factor"):
        hf_video_processor(glm_cfg)(videos=[frame], do_sample_frames=False, return_tensors="pt")
    twice = np.concatenate([frame, frame])
    expected = hf_video_processor(glm_cfg)(videos=[twice], do_sample_frames=False, return_tensors="pt")
    pixel_values, grid = preprocess_video(frame, video_spec_from_dict(glm_cfg))
    assert torch.equal(pixel_values, expected["pixel_values_videos"]) and torch.equal(
        grid, expected["video_grid_thw"]
    )


def test_odd_frame_count_pads_last_frame():
    rng = np.random.default_rng(5)
    frames = rng.integers(0, 256, (5, 60, 100, 3), dtype=np.uint8)
    cfg = {"video_processor_type": "Glm46VVideoProcessor"}
    expected = hf_video_processor(cfg)(videos=[frames], do_sample_frames=False, return_tensors="pt")
    pixel_values, grid = preprocess_video(frames, video_spec_from_dict(cfg))
    assert torch.equal(grid, expected["video_grid_thw"]) and torch.equal(
        pixel_values, expected["pixel_values_videos"]
    )


@pytest.mark.parametrize("chunk_rows", [1, 300, 10**9])
def test_chunked_normalisation_bit_exact(monkeypatch, media_images, chunk_rows):
    """`_patch_rows` normalises in chunks of block rows; every chunking gives HF's bits: one block
    row per chunk, a size that leaves a partial last chunk, and the whole output at once."""
    monkeypatch.setattr(resize, "_CHUNK_ROWS", chunk_rows)
    cfg = dict(IMAGE_CONFIGS)["qwen"]  # astronaut: 18 block rows of 72 patch rows; chelsea: 11 of 64
    batch = [media_images[0], media_images[2]]
    expected = hf_images(cfg, batch)
    pixel_values, grid = preprocess_images(batch, image_spec_from_dict(cfg))
    assert torch.equal(grid, expected["image_grid_thw"])
    assert torch.equal(pixel_values, expected["pixel_values"])

    frames = np.random.default_rng(9).integers(0, 256, (6, 120, 200, 3), dtype=np.uint8)
    video_cfg = {"video_processor_type": "Glm46VVideoProcessor"}
    expected = hf_video_processor(video_cfg)(videos=[frames], do_sample_frames=False, return_tensors="pt")
    pixel_values, grid = preprocess_video(frames, video_spec_from_dict(video_cfg))
    assert torch.equal(grid, expected["video_grid_thw"])
    assert torch.equal(pixel_values, expected["pixel_values_videos"])
