"""M-RoPE positions (glimpse/models/mrope.py) against HF transformers 5.23.

References: the real `Glm4vModel.get_rope_index` / `Qwen2_5_VLModel.get_rope_index` on tiny
random models, HF's processors' `create_mm_token_type_ids`, HF's decode-time
`compute_3d_position_ids`, and for Qwen's reference rule (text after a video resumes at
max(video positions) + 1, parity-spec §4.2) a brute-force per-token oracle written here from
the spec; that oracle is itself checked against unmodified HF under the HF rule.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import (
    Glm4vConfig,
    Glm4vModel,
    Glm4vProcessor,
    Qwen2_5_VLConfig,
    Qwen2_5_VLModel,
    Qwen2_5_VLProcessor,
)

from glimpse.errors import PromptError
from glimpse.models.mrope import (
    decode_positions,
    glm_mm_token_types,
    glm_mrope_positions,
    qwen_mm_token_types,
    qwen_mrope_positions,
)

M = 2  # spatial_merge_size of every real checkpoint of both families
# GLM-4.1V ids (parity-spec §3.1)
G_IMAGE, G_BOI, G_EOI, G_BOV, G_EOV = 151343, 151339, 151340, 151341, 151342
# Qwen2.5-VL ids
Q_IMAGE, Q_VIDEO, Q_VS, Q_VE = 151655, 151656, 151652, 151653
TEXT_ID = 1000  # any id that is not special
TINY_TEXT = dict(
    vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
    num_key_value_heads=1,
)  # fmt: skip
TINY_VISION = dict(
    depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=16, spatial_merge_size=M
)


@pytest.fixture(scope="module")
def glm_hf() -> Glm4vModel:
    return Glm4vModel(Glm4vConfig(text_config=TINY_TEXT, vision_config=TINY_VISION))


@pytest.fixture(scope="module")
def qwen_hf():
    models: dict[float, Qwen2_5_VLModel] = {}

    def get(tps: float) -> Qwen2_5_VLModel:
        if tps not in models:
            vision = dict(TINY_VISION, tokens_per_second=tps, fullatt_block_indexes=[0])
            models[tps] = Qwen2_5_VLModel(Qwen2_5_VLConfig(text_config=TINY_TEXT, vision_config=vision))
        return models[tps]

    return get


# ---- prompts --------------------------------------------------------------------------------
# A prompt is a list of segments: ("text", n), ("image", (t, h, w)) or ("video", (t, h, w)).


def build_glm(segments) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Expanded GLM prompt as HF's processor writes it (§3.2, §3.3) -> ids, image_grid_thw, video_grid_thw."""
    ids, images, videos = [], [], []
    for kind, arg in segments:
        if kind == "text":
            ids += [TEXT_ID] * arg
        elif kind == "image":
            images.append(arg)
            ids += [G_BOI] + [G_IMAGE] * (arg[0] * arg[1] * arg[2] // M**2) + [G_EOI]
        else:
            videos.append(arg)
            ids.append(G_BOV)
            for k in range(arg[0]):  # each frame, then a timestamp of 1-3 text tokens
                ids += [G_BOI] + [G_IMAGE] * (arg[1] * arg[2] // M**2) + [G_EOI] + [TEXT_ID] * (1 + k % 3)
            ids.append(G_EOV)
    return torch.tensor(ids, dtype=torch.long), _grid(images), _grid(videos)


def build_qwen(segments) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    ids, images, videos = [], [], []
    for kind, arg in segments:
        if kind == "text":
            ids += [TEXT_ID] * arg
        else:
            (images if kind == "image" else videos).append(arg)
            pad = Q_IMAGE if kind == "image" else Q_VIDEO
            ids += [Q_VS] + [pad] * (arg[0] * arg[1] * arg[2] // M**2) + [Q_VE]
    return torch.tensor(ids, dtype=torch.long), _grid(images), _grid(videos)


def _grid(rows) -> torch.Tensor | None:
    return torch.tensor(rows, dtype=torch.long).reshape(-1, 3) if rows else None


def hf_glm_types(ids: torch.Tensor) -> torch.Tensor:
    stub = SimpleNamespace(image_token_id=G_IMAGE, video_start_id=G_BOV, video_end_id=G_EOV)
    return torch.tensor(Glm4vProcessor.create_mm_token_type_ids(stub, [ids.tolist()])[0], dtype=torch.long)


def hf_qwen_types(ids: torch.Tensor) -> torch.Tensor:
    stub = SimpleNamespace(image_token_ids=[Q_IMAGE], video_token_ids=[Q_VIDEO], audio_token_ids=[])
    return torch.tensor(
        Qwen2_5_VLProcessor.create_mm_token_type_ids(stub, [ids.tolist()])[0], dtype=torch.long
    )


def hf_glm_positions(model, types, image_grid, video_grid) -> tuple[torch.Tensor, int]:
    ids = torch.full((1, len(types)), TEXT_ID)  # get_rope_index reads only the types and the length
    pos, delta = model.get_rope_index(ids, types[None], _clone(image_grid), _clone(video_grid))
    return pos[:, 0], int(delta)


def hf_qwen_positions(model, types, image_grid, video_grid, spg) -> tuple[torch.Tensor, int]:
    ids = torch.full((1, len(types)), TEXT_ID)
    pos, delta = model.get_rope_index(ids, types[None], _clone(image_grid), _clone(video_grid), _clone(spg))
    return pos[:, 0], int(delta)


def _clone(t):
    return None if t is None else t.clone()


def qwen_oracle(types, image_grid, video_grid, spg, tps, rule) -> tuple[torch.Tensor, int]:
    """Brute force from parity-spec §4.2, one token at a time.

    The temporal offset is trunc(k * (tps * spg)) with both products rounded to float32 as HF
    does for the processor's float32 `second_per_grid_ts` (exact integers when spg is None).
    """
    types = types.tolist()
    images = [] if image_grid is None else image_grid.tolist()
    videos = [] if video_grid is None else video_grid.tolist()
    out, s, i = [], 0, 0
    while i < len(types):
        if types[i] == 0:
            out.append((s, s, s))
            s, i = s + 1, i + 1
            continue
        t, h, w = (images if types[i] == 1 else videos).pop(0)
        hh, ww = h // M, w // M
        if types[i] == 2:
            v = len(video_grid) - len(videos) - 1
            if spg is None:
                scale = lambda k: k * tps  # noqa: E731  (HF multiplies integers here)
            else:
                ti = np.float32(tps) * np.float32(spg[v].item())
                scale = lambda k, ti=ti: int(np.float32(k) * ti)  # noqa: E731
        else:
            scale = lambda k: k  # noqa: E731
        block = [(s + scale(k), s + y, s + x) for k in range(t) for y in range(hh) for x in range(ww)]
        out += block
        i += len(block)
        s = max(max(p) for p in block) + 1 if rule == "reference" else s + max(hh, ww)
    pos = torch.tensor(out, dtype=torch.long).T
    return pos, int(pos.max()) + 1 - len(types)


def assert_same(ours: tuple[torch.Tensor, int], ref: tuple[torch.Tensor, int]) -> None:
    assert ours[0].dtype == torch.int64 and ours[0].shape == ref[0].shape
    assert torch.equal(ours[0], ref[0]), (ours[0].tolist(), ref[0].tolist())
    assert ours[1] == ref[1]


# ---- hand-written prompts -------------------------------------------------------------------

PROMPTS = {
    "text_only": [("text", 7)],
    "one_image": [("text", 3), ("image", (1, 4, 6)), ("text", 2)],
    "two_images": [("text", 2), ("image", (1, 8, 4)), ("text", 1), ("image", (1, 2, 2)), ("text", 3)],
    "image_then_video": [("text", 2), ("image", (1, 4, 4)), ("text", 2), ("video", (2, 4, 6)), ("text", 2)],
    "video_many_frames": [("text", 4), ("video", (5, 6, 4))],
    "text_after_video": [("video", (3, 2, 8)), ("text", 6)],
    "video_then_image": [("video", (2, 2, 2)), ("image", (1, 6, 2)), ("text", 1)],
    "image_with_two_frames": [("text", 2), ("image", (2, 4, 4)), ("text", 1)],  # t > 1 without video time
    # more groups than mrope._LOOPED_SEGMENTS: text is written in one vectorized pass, not per segment
    "forty_frames_and_images": [("text", 2), ("video", (40, 2, 4))] + [("image", (1, 2, 2)), ("text", 1)] * 36,
}


@pytest.mark.parametrize("name", PROMPTS)
def test_glm_hand_prompts_match_hf(glm_hf, name):
    ids, image_grid, video_grid = build_glm(PROMPTS[name])
    types = glm_mm_token_types(ids, G_IMAGE, G_BOV, G_EOV)
    assert torch.equal(types, hf_glm_types(ids))
    ours = glm_mrope_positions(types, image_grid, video_grid, M)
    assert_same(ours, hf_glm_positions(glm_hf, types, image_grid, video_grid))


@pytest.mark.parametrize("name", PROMPTS)
@pytest.mark.parametrize("tps,spg", [(2, 1.0), (2, 0.5), (4, None), (2, 2 / 3), (25, 2 / 29.97)])
def test_qwen_hand_prompts_match_hf_and_reference(qwen_hf, name, tps, spg):
    ids, image_grid, video_grid = build_qwen(PROMPTS[name])
    types = qwen_mm_token_types(ids, Q_IMAGE, Q_VIDEO)
    assert torch.equal(types, hf_qwen_types(ids))
    n_videos = 0 if video_grid is None else len(video_grid)
    spg_t = None if spg is None else torch.tensor([spg] * n_videos)  # float32, as the processor makes it
    hf = hf_qwen_positions(qwen_hf(tps), types, image_grid, video_grid, spg_t)
    assert_same(qwen_mrope_positions(types, image_grid, video_grid, spg_t, tps, M, video_rule="hf"), hf)
    assert_same(qwen_oracle(types, image_grid, video_grid, spg_t, tps, "hf"), hf)
    ref = qwen_oracle(types, image_grid, video_grid, spg_t, tps, "reference")
    assert_same(qwen_mrope_positions(types, image_grid, video_grid, spg_t, tps, M), ref)


def test_qwen_spec_example(qwen_hf):
    """parity-spec §4.2: 3 text, video grid (6,4,4), tps 2, spg 1.0, 2 text."""
    types = torch.tensor([0] * 3 + [2] * 24 + [0] * 2)
    grid, spg = torch.tensor([[6, 4, 4]]), torch.tensor([1.0])
    t_video = [3 + 2 * k for k in range(6) for _ in range(4)]  # 3, 5, ..., 13, four tokens each
    pos, delta = qwen_mrope_positions(types, None, grid, spg, 2, M, video_rule="hf")
    assert pos[0, 3:27].tolist() == t_video and pos[:, 27:].tolist() == [[5, 6]] * 3 and delta == -15
    assert_same((pos, delta), hf_qwen_positions(qwen_hf(2), types, None, grid, spg))
    pos, delta = qwen_mrope_positions(types, None, grid, spg, 2, M)
    assert pos[0, 3:27].tolist() == t_video and pos[:, 27:].tolist() == [[14, 15]] * 3 and delta == -13


def test_qwen_temporal_scale_is_float32_like_hf(qwen_hf):
    """fps 25 -> spg = float32(2/25); 25 * float32(2 * 0.08) rounds to 4.0 in float32 (HF) while
    float64 gives 3.999… -> 3 (vLLM, §4.2 Precision). We follow HF."""
    t = 26
    types = torch.tensor([0] + [2] * t + [0])
    grid, spg = torch.tensor([[t, 2, 2]]), torch.tensor([2 / 25])
    assert int(25 * (spg.item() * 2)) == 3  # the float64 product really does truncate differently
    for rule in ("hf", "reference"):
        pos, delta = qwen_mrope_positions(types, None, grid, spg, 2, M, video_rule=rule)
        assert int(pos[0, 1 + 25]) == 1 + 4
    assert pos[:, -1].tolist() == [1 + 4 + 1] * 3  # reference: text resumes after the float32 maximum
    assert_same((pos, delta), qwen_oracle(types, None, grid, spg, 2, "reference"))
    hf = hf_qwen_positions(qwen_hf(2), types, None, grid, spg)
    assert_same(qwen_mrope_positions(types, None, grid, spg, 2, M, video_rule="hf"), hf)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_qwen_second_per_grid_ts_dtype_follows_hf(qwen_hf, dtype):
    """`processor(...).to(dtype)` casts second_per_grid_ts too; HF then scales in that dtype."""
    types = torch.tensor([0] + [2] * 60 + [0] + [2] * 4 + [0] * 2)
    grid, spg = torch.tensor([[60, 2, 2], [4, 2, 2]]), torch.tensor([2 / 29.97, 2 / 3], dtype=dtype)
    hf = hf_qwen_positions(qwen_hf(2), types, None, grid, spg)
    assert_same(qwen_mrope_positions(types, None, grid, spg, 2, M, video_rule="hf"), hf)


def test_decode_positions_match_hf(glm_hf):
    """HF's incremental path: arange(past, past + n) + rope_deltas on all three axes (§4.3)."""
    ids, image_grid, video_grid = build_glm(PROMPTS["image_then_video"])
    types = glm_mm_token_types(ids, G_IMAGE, G_BOV, G_EOV)
    _, delta = glm_mrope_positions(types, image_grid, video_grid, M)
    past = SimpleNamespace(get_seq_length=lambda: len(ids) + 3)
    glm_hf.rope_deltas = torch.tensor([[delta]])
    try:
        hf = glm_hf.compute_3d_position_ids(None, torch.zeros(1, 4, 16), past_key_values=past)
    finally:
        glm_hf.rope_deltas = None
    assert torch.equal(decode_positions(len(ids) + 3, 4, delta), hf[:, 0])
    assert decode_positions(10, 0, -2).shape == (3, 0)


# ---- random prompts -------------------------------------------------------------------------

HW = st.sampled_from([2, 4, 6, 8])
FPS = st.sampled_from([1.0, 2.0, 3.0, 7.0, 23.976, 25.0, 29.97, 30.0, 0.5])


def _items(max_t: int):
    image = st.tuples(st.just("image"), st.tuples(st.just(1), HW, HW))
    video = st.tuples(st.just("video"), st.tuples(st.integers(1, max_t), HW, HW))
    return st.lists(st.tuples(st.integers(0, 4), st.one_of(image, video)), max_size=5)


def _segments(items, tail: int):
    segments = []
    for gap, item in items:
        segments += [("text", gap), item]
    return segments + [("text", tail)]


@settings(max_examples=60, deadline=None)
@given(items=_items(max_t=4), tail=st.integers(0, 4))
def test_glm_random_prompts_match_hf(glm_hf, items, tail):
    ids, image_grid, video_grid = build_glm(_segments(items, tail))
    if len(ids) == 0:
        return
    types = glm_mm_token_types(ids, G_IMAGE, G_BOV, G_EOV)
    assert torch.equal(types, hf_glm_types(ids))
    ours = glm_mrope_positions(types, image_grid, video_grid, M)
    assert_same(ours, hf_glm_positions(glm_hf, types, image_grid, video_grid))


@settings(max_examples=60, deadline=None)
@given(items=_items(max_t=6), tail=st.integers(0, 4), tps=st.sampled_from([1, 2, 4, 25]), data=st.data())
def test_qwen_random_prompts_match_hf_and_reference(qwen_hf, items, tail, tps, data):
    ids, image_grid, video_grid = build_qwen(_segments(items, tail))
    if len(ids) == 0:
        return
    n_videos = 0 if video_grid is None else len(video_grid)
    spg = None
    if data.draw(st.booleans()):  # the processor's second_per_grid_ts = temporal_patch_size / fps, float32
        spg = torch.tensor([2 / data.draw(FPS) for _ in range(n_videos)], dtype=torch.float32)
    types = qwen_mm_token_types(ids, Q_IMAGE, Q_VIDEO)
    assert torch.equal(types, hf_qwen_types(ids))
    hf = hf_qwen_positions(qwen_hf(tps), types, image_grid, video_grid, spg)
    assert_same(qwen_mrope_positions(types, image_grid, video_grid, spg, tps, M, video_rule="hf"), hf)
    assert_same(qwen_oracle(types, image_grid, video_grid, spg, tps, "hf"), hf)
    ref = qwen_oracle(types, image_grid, video_grid, spg, tps, "reference")
    assert_same(qwen_mrope_positions(types, image_grid, video_grid, spg, tps, M), ref)


@st.composite
def raw_types(draw, glm: bool):
    """mm_token_types drawn directly: groups may touch (image then video), open or close the prompt.

    Two groups of the same type are kept apart by at least one text token, else they are one run.
    Returns types, image_grid_thw, video_grid_thw (GLM frames sit apart, separated by text).
    """
    types, images, videos, last = [], [], [], 0
    for _ in range(draw(st.integers(0, 5))):
        kind = draw(st.sampled_from([1, 2]))
        t = 1 if kind == 1 else draw(st.integers(1, 3))
        h, w = draw(HW), draw(HW)
        gap = draw(st.integers(1 if kind == last else 0, 3))
        types += [0] * gap
        if kind == 2 and glm:
            for k in range(t):
                types += [0] * (k > 0) * draw(st.integers(1, 2)) + [2] * (h * w // M**2)
        else:
            types += [kind] * (t * h * w // M**2)
        (images if kind == 1 else videos).append((t, h, w))
        last = kind
    types += [0] * draw(st.integers(0 if types else 1, 3))
    return torch.tensor(types, dtype=torch.long), _grid(images), _grid(videos)


@settings(max_examples=60, deadline=None)
@given(sample=raw_types(glm=True))
def test_glm_raw_types_match_hf(glm_hf, sample):
    types, image_grid, video_grid = sample
    ours = glm_mrope_positions(types, image_grid, video_grid, M)
    assert_same(ours, hf_glm_positions(glm_hf, types, image_grid, video_grid))


@settings(max_examples=60, deadline=None)
@given(sample=raw_types(glm=False), fps=FPS)
def test_qwen_raw_types_match_hf_and_reference(qwen_hf, sample, fps):
    types, image_grid, video_grid = sample
    spg = None if video_grid is None else torch.full((len(video_grid),), 2 / fps)
    hf = hf_qwen_positions(qwen_hf(2), types, image_grid, video_grid, spg)
    assert_same(qwen_mrope_positions(types, image_grid, video_grid, spg, 2, M, video_rule="hf"), hf)
    ref = qwen_oracle(types, image_grid, video_grid, spg, 2, "reference")
    assert_same(qwen_mrope_positions(types, image_grid, video_grid, spg, 2, M), ref)


# ---- errors ---------------------------------------------------------------------------------

IMG = torch.tensor([[1, 4, 4]])  # 4 slots


@pytest.mark.parametrize(
    "types,image_grid,video_grid,match",
    [
        (
            [0, 1, 1, 1, 1, 0, 1, 1, 1, 1],
            IMG,
            None,
            r"2 image placeholder run\(s\) but there are 1",
        ),  # more groups
        (
            [0, 1, 1, 1, 1, 0],
            torch.tensor([[1, 4, 4], [1, 2, 2]]),
            None,
            r"1 image placeholder run\(s\)",
        ),  # fewer
        ([0, 2, 2, 2, 2], None, None, r"1 video placeholder run\(s\) but there are 0"),  # no grid at all
        ([0, 1, 1, 1, 0], IMG, None, "image 0 .* needs 4 placeholder tokens .* token 1 has 3"),
        (
            [1] * 8,
            torch.tensor([[1, 4, 4], [1, 4, 4]]),
            None,
            r"1 image placeholder run\(s\)",
        ),  # touching images
        ([0, 1, 1, 1, 1], torch.tensor([[1, 3, 4]]), None, r"image_grid_thw\[0\] .* multiples"),
        ([0, 1], torch.tensor([[0, 2, 2]]), None, r">= 1"),
        ([0, 3, 0], None, None, r"mm_token_types\[1\] = 3"),
        ([], None, None, "no tokens"),
    ],
)
def test_bad_prompts_raise_prompt_error(types, image_grid, video_grid, match):
    types = torch.tensor(types, dtype=torch.long)
    with pytest.raises(PromptError, match=match):
        glm_mrope_positions(types, image_grid, video_grid, M)
    with pytest.raises(PromptError, match=match):
        qwen_mrope_positions(types, image_grid, video_grid, None, 2, M)


def test_glm_frame_errors_name_the_frame():
    # video (2, 4, 4): two frames of 4 slots; the second frame's run is one token short
    types = torch.tensor([0, 2, 2, 2, 2, 0, 2, 2, 2, 0])
    with pytest.raises(PromptError, match=r"video 0 frame 1 .* needs 4 .* token 6 has 3"):
        glm_mrope_positions(types, None, torch.tensor([[2, 4, 4]]), M)
    # frames not separated by text merge into one run: 1 run for 2 frames
    with pytest.raises(PromptError, match=r"1 video placeholder run\(s\) but there are 2 video frame"):
        glm_mrope_positions(torch.tensor([0] + [2] * 8), None, torch.tensor([[2, 4, 4]]), M)
    # an absurd frame count is refused up front, not listed frame by frame
    with pytest.raises(PromptError, match=r"2199023255552 frames in all, but the prompt has only 4 tokens"):
        glm_mrope_positions(torch.tensor([0, 2, 2, 0]), None, torch.tensor([[2**41, 2, 4]]), M)


def test_qwen_input_errors():
    types, grid = torch.tensor([0] + [2] * 8), torch.tensor([[2, 4, 4]])
    with pytest.raises(PromptError, match="second_per_grid_ts has 2 entries but video_grid_thw has 1"):
        qwen_mrope_positions(types, None, grid, torch.tensor([1.0, 1.0]), 2, M)
    with pytest.raises(PromptError, match=r"second_per_grid_ts\[0\]"):
        qwen_mrope_positions(types, None, grid, torch.tensor([float("nan")]), 2, M)
    with pytest.raises(PromptError, match="video_rule"):
        qwen_mrope_positions(types, None, grid, None, 2, M, video_rule="vllm")
    with pytest.raises(PromptError, match="tokens_per_second"):
        qwen_mrope_positions(types, None, grid, None, float("inf"), M)
    with pytest.raises(PromptError, match="video 0 .* needs 8 .* has 7"):
        qwen_mrope_positions(types[:-1], None, grid, None, 2, M)


def test_other_input_errors():
    with pytest.raises(PromptError, match="1-D"):
        glm_mm_token_types(torch.zeros(1, 3, dtype=torch.long), G_IMAGE, G_BOV, G_EOV)
    with pytest.raises(PromptError, match="1-D"):
        qwen_mrope_positions(torch.zeros(1, 3, dtype=torch.long), None, None, None, 2, M)
    with pytest.raises(PromptError, match=r"\[N, 3\]"):
        glm_mrope_positions(torch.tensor([0, 1]), torch.tensor([1, 2, 2]), None, M)
    with pytest.raises(PromptError, match="spatial_merge_size"):
        glm_mrope_positions(torch.tensor([0]), None, None, 0)
    with pytest.raises(PromptError, match="num_new"):
        decode_positions(3, -1, 0)
