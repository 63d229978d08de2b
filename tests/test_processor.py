"""`glimpse.load_processor` against HF's processor for each family: chat messages with real
images and videos in, identical input_ids, pixels, grids, timestamps and Qwen `second_per_grid_ts`."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import IMAGES, VIDEOS
from hf_oracle import hf_inputs, hf_processor, read_all_frames, rgb
from PIL import Image

from glimpse import load_processor
from glimpse.errors import InvalidInputError, LimitExceededError, PromptError

FAMILIES = ["glm4v", "glm46v", "glm46v_flash", "glmga", "glm4v_moe", "glm46v_moe", "glm_ocr", "qwen2_5_vl"]
ALL_IMAGES = sorted(IMAGES.iterdir())
ALL_VIDEOS = sorted(VIDEOS.iterdir())


def _compare(ours, ref) -> None:
    assert ours["input_ids"].tolist() == ref["input_ids"].tolist()
    for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts"):
        assert (key in ours) == (key in ref), key
        if key in ref:
            torch.testing.assert_close(ours[key].to(ref[key].dtype), ref[key], rtol=0, atol=0)


def _msg(parts):
    return [{"role": "user", "content": parts}]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("image", ALL_IMAGES, ids=lambda p: p.name)
def test_image_prompt_equals_hf(family, image, tiny_checkpoint):
    path = tiny_checkpoint(family)
    ours = load_processor(path)(_msg([{"type": "image_url", "image_url": {"url": str(image)}},
                                      {"type": "text", "text": "What is in this image?"}]))  # fmt: skip
    ref = hf_inputs(hf_processor(path), [{"type": "image"}, {"type": "text", "text": "What is in this image?"}], [rgb(image)])
    _compare(ours, ref)
    (item,) = ours.media
    assert item.num_tokens == int(ref["input_ids"][0].eq(ours.input_ids[item.start]).sum())
    assert ours.input_ids[item.start : item.end] == [ours.input_ids[item.start]] * item.num_tokens


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("video", ALL_VIDEOS, ids=lambda p: p.name)
def test_video_prompt_equals_hf(family, video, tiny_checkpoint):
    path = tiny_checkpoint(family)
    kwargs = {"fps": 2} if family == "qwen2_5_vl" else {}
    ours = load_processor(path)(_msg([{"type": "video_url", "video_url": {"url": str(video)}},
                                      {"type": "text", "text": "What happens?"}]), **kwargs)  # fmt: skip
    hf_kwargs = {"fps": 2, "do_sample_frames": True} if family == "qwen2_5_vl" else {}
    proc = hf_processor(path)
    frames, meta = read_all_frames(video)
    ref = hf_inputs(proc, [{"type": "video"}, {"type": "text", "text": "What happens?"}], videos=[(frames, meta)], **hf_kwargs)
    _compare(ours, ref)
    (item,) = ours.media
    if family != "qwen2_5_vl":  # GLM: one span per temporal frame, timestamps as HF writes them
        assert len(item.spans) == item.grid_thw[0] == len(item.timestamps)
        assert list(item.timestamps) == [i / meta.fps for i in item.frame_indices[::2]][: item.grid_thw[0]]


@pytest.mark.parametrize("family", FAMILIES)
def test_two_images_and_text_only_equal_hf(family, tiny_checkpoint):
    path = tiny_checkpoint(family)
    ours = load_processor(path)(_msg([{"type": "image_url", "image_url": {"url": str(IMAGES / "chelsea.png")}},
                                      {"type": "text", "text": "versus"},
                                      {"type": "image_url", "image_url": {"url": str(IMAGES / "hubble_deep_field.jpg")}}]))  # fmt: skip
    ref = hf_inputs(hf_processor(path), [{"type": "image"}, {"type": "text", "text": "versus"}, {"type": "image"}],
                    [rgb(IMAGES / "chelsea.png"), rgb(IMAGES / "hubble_deep_field.jpg")])  # fmt: skip
    _compare(ours, ref)
    text = load_processor(path)(_msg("Just text, no media."))
    assert text["input_ids"].tolist() == hf_inputs(hf_processor(path), [{"type": "text", "text": "Just text, no media."}])["input_ids"].tolist()


def test_qwen_image_and_video_equal_hf(tiny_checkpoint):
    path = tiny_checkpoint("qwen2_5_vl")
    ours = load_processor(path)(_msg([{"type": "image_url", "image_url": {"url": str(IMAGES / "rocket.jpg")}},
                                      {"type": "video_url", "video_url": {"url": str(VIDEOS / "hubble_pan_24fps.mp4")}},
                                      {"type": "text", "text": "Compare."}]), fps=2)  # fmt: skip
    frames, meta = read_all_frames(VIDEOS / "hubble_pan_24fps.mp4")
    ref = hf_inputs(hf_processor(path), [{"type": "image"}, {"type": "video"}, {"type": "text", "text": "Compare."}],
                    [rgb(IMAGES / "rocket.jpg")], [(frames, meta)], fps=2, do_sample_frames=True)  # fmt: skip
    _compare(ours, ref)


def test_glm_image_and_video_in_one_prompt_have_their_own_spans(tiny_checkpoint):
    """HF's GLM cannot run this prompt (parity-spec §3.6); glimpse places each item in document order."""
    proc = load_processor(tiny_checkpoint("glm46v"))
    out = proc(_msg([{"type": "video_url", "video_url": {"url": str(VIDEOS / "coffee_15frames_10fps.webm")}},
                     {"type": "image_url", "image_url": {"url": str(IMAGES / "camera.png")}}]))  # fmt: skip
    video, image = out.media
    assert (video.kind, image.kind) == ("video", "image") and video.end < image.start
    image_id = proc.tokens.image_token_id
    slots = [i for i, t in enumerate(out.input_ids) if t == image_id]
    assert slots == [i for m in out.media for s, e in m.spans for i in range(s, e)]


def test_content_hash_follows_pixels(tiny_checkpoint):
    proc = load_processor(tiny_checkpoint("glm4v"))
    rng = np.random.default_rng(0)
    a = Image.fromarray(rng.integers(0, 256, (200, 300, 3), dtype=np.uint8))
    b = Image.fromarray(np.asarray(a)[:, :, ::-1].copy())
    ha = proc(text="<|image|>", images=[a]).media[0].content_hash
    assert ha == proc(text="<|image|>", images=[a.copy()]).media[0].content_hash
    assert ha != proc(text="<|image|>", images=[b]).media[0].content_hash


def test_markers_must_match_items(tiny_checkpoint):
    proc = load_processor(tiny_checkpoint("glm4v"))
    im = rgb(IMAGES / "rocket.jpg")
    with pytest.raises(PromptError, match="1 image and 0 video placeholders but 2 images"):
        proc(text="<|image|> two?", images=[im, im])
    with pytest.raises(PromptError, match="2 image and 0 video placeholders but 1 images"):
        proc(text="<|image|><|image|>", images=[im])


def test_overrides_are_validated_and_capped(tiny_checkpoint):
    proc = load_processor(tiny_checkpoint("glm46v"))
    msg = _msg([{"type": "image_url", "image_url": {"url": str(IMAGES / "rocket.jpg")}}])
    small = proc(msg, max_pixels=2 * 784 * 16)
    assert small.media[0].num_tokens <= 16 < proc(msg).media[0].num_tokens
    with pytest.raises(InvalidInputError, match="unknown"):
        proc(msg, resized_height=100)
    with pytest.raises(LimitExceededError, match="max_pixels"):
        proc(msg, max_pixels=10**9)
    with pytest.raises(InvalidInputError, match="HF ignores it"):
        proc(_msg([{"type": "video_url", "video_url": {"url": str(VIDEOS / "slideshow_30fps.mp4")}}]), fps=4)
