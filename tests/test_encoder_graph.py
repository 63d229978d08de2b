"""Vision encoder at full speed: budget packing, the segment attention op, and captured graphs.

References: brute force (packing invariants, window counts, per-segment softmax attention),
hand-worked plans, HF transformers 5.23's vision towers on the same checkpoint and media, and
the eager tower. Graph runners are built once per module (compiling is the slow part).
"""

from __future__ import annotations

import argparse
import itertools
import math

import pytest
import torch
from conftest import IMAGES, VIDEOS
from hf_oracle import hf_inputs, hf_model, hf_processor, read_all_frames, rgb
from hypothesis import given, settings
from hypothesis import strategies as st

from glimpse import load_model
from glimpse.errors import InvalidInputError
from glimpse.models.qwen2_5_vl import frame_window_plan, window_capacity
from glimpse.vision import EncoderRunner, VisionItem, default_budgets, plan_batches
from glimpse.vision.attention import pad_offsets, varlen_attention
from glimpse.vision.batching import check_budgets, parse_budgets
from glimpse.vision.runner import add_encoder_arguments

FAMILIES = ["glm4v", "qwen2_5_vl"]
BUDGETS = (32, 96)  # merged tokens; small so the tiny towers compile quickly
MAX_FRAMES = 4
ROW = 1176  # C * Tp * P * P


# ---- packing (pure) --------------------------------------------------------------------------


def test_default_budgets():
    assert default_budgets(4096) == (64, 128, 256, 512, 1024, 2048, 4096)
    assert default_budgets(3000) == (64, 128, 256, 512, 1024, 2048, 3000)
    assert default_budgets(40) == (40,)


@pytest.mark.parametrize("bad", [[], [0], [64, -1], [1.5]])
def test_bad_budgets_are_refused(bad):
    with pytest.raises(InvalidInputError, match="encoder-budgets"):
        check_budgets(bad)


def test_encoder_flags():
    parser = argparse.ArgumentParser()
    add_encoder_arguments(parser)
    args = parser.parse_args(["--encoder-graph", "off", "--encoder-budgets", "256,64,128"])
    assert args.encoder_graph == "off" and args.encoder_budgets == (64, 128, 256)
    assert parser.parse_args([]).encoder_graph == "auto"
    with pytest.raises(InvalidInputError, match="comma-separated integers"):
        parse_budgets("64,lots")


def _tokens(grid, merge=2):
    t, h, w = grid
    return t * (h // merge) * (w // merge)


def test_hand_worked_plans():
    img = (1, 16, 16)  # 64 tokens
    # 3 images = 192 tokens: run as 128 + 64 rather than padded to 256
    plan = plan_batches([img] * 3, (64, 128, 256), 2)
    assert [(b.budget, b.tokens) for b in plan] == [(128, 128), (64, 64)]
    # 7 images = 448 tokens: 256 + 128 + 64 rows, not 512 (nor 256 + 256)
    plan = plan_batches([img] * 7, (64, 128, 256, 512), 2)
    assert [(b.budget, b.tokens) for b in plan] == [(256, 256), (128, 128), (64, 64)]
    # exactly fills a budget: one batch, no padding
    plan = plan_batches([img, img], (64, 128), 2)
    assert [(b.budget, b.tokens, len(b.pieces)) for b in plan] == [(128, 128, 2)]
    # an image larger than every budget runs alone, eagerly; the rest still pack
    plan = plan_batches([(1, 18, 16), img], (32, 64), 2)
    assert [(b.budget, b.tokens) for b in plan] == [(64, 64), (None, 72)]
    # a 6-frame video crosses a 4-frame limit: split 4 + 2 at a frame boundary
    plan = plan_batches([(6, 4, 4)], (32, 64), 2, max_frames_per_batch=4)
    assert [[(p.first_frame, p.frames) for p in b.pieces] for b in plan] == [[(0, 4)], [(4, 2)]]


@st.composite
def _packing_case(draw):
    budgets = sorted(set(draw(st.lists(st.integers(1, 80), min_size=1, max_size=4))))
    grids = draw(
        st.lists(
            st.tuples(st.integers(1, 6), st.integers(1, 6).map(lambda v: 2 * v), st.integers(1, 6).map(lambda v: 2 * v)),
            min_size=1,
            max_size=12,
        )
    )
    max_items = draw(st.none() | st.integers(1, 5))
    max_frames = draw(st.none() | st.integers(1, 8))
    return grids, tuple(budgets), max_items, max_frames


@settings(max_examples=300, deadline=None)
@given(_packing_case())
def test_plan_covers_every_frame_once_within_limits(case):
    grids, budgets, max_items, max_frames = case
    plan = plan_batches(grids, budgets, 2, max_items, max_frames)
    seen = {i: [] for i in range(len(grids))}
    for batch in plan:
        for p in batch.pieces:
            seen[p.item].extend(range(p.first_frame, p.first_frame + p.frames))
            assert (p.h, p.w) == grids[p.item][1:]
        if batch.budget is None:  # eager: one whole item whose frame alone exceeds every budget
            (p,) = batch.pieces
            assert p.first_frame == 0 and p.frames == grids[p.item][0]
            assert p.frame_tokens > budgets[-1]
            continue
        assert batch.budget == min(b for b in budgets if b >= batch.tokens)
        assert max_items is None or len(batch.pieces) <= max_items
        assert max_frames is None or batch.frames <= max_frames
    for i, (t, h, w) in enumerate(grids):
        assert sorted(seen[i]) == list(range(t)), f"item {i} frames {seen[i]}"
        if (h // 2) * (w // 2) > budgets[-1]:
            assert any(b.budget is None and b.pieces[0].item == i for b in plan)


def test_window_capacity_bounds_every_layout():
    """Brute force: windows of H x W merged units are ceil(H/ws)*ceil(W/ws) <= H*W//ws + 1."""
    for ws, mh, mw in itertools.product(range(1, 5), range(1, 13), range(1, 13)):
        windows = math.ceil(mh / ws) * math.ceil(mw / ws)
        assert len(frame_window_plan(2 * mh, 2 * mw, 2, ws).window_lens) == windows
        assert windows <= min(mh * mw, 1 + mh * mw // ws)
    # and summed over frames: never above window_capacity(units, frames, ws)
    for frames in itertools.combinations_with_replacement([(1, 1), (1, 9), (5, 5), (4, 7), (3, 3)], 3):
        for ws in (1, 2, 4):
            units = sum(a * b for a, b in frames)
            windows = sum(math.ceil(a / ws) * math.ceil(b / ws) for a, b in frames)
            assert windows <= window_capacity(units, len(frames), ws)


# ---- the attention op ----------------------------------------------------------------------------


def test_pad_offsets_repeats_the_last_offset():
    cu = torch.tensor([0, 4, 12], dtype=torch.int32)
    assert pad_offsets(cu, 6).tolist() == [0, 4, 12, 12, 12, 12]


@pytest.mark.parametrize("lengths,total", [([4, 8, 4, 8], 24), ([5, 5, 5], 20), ([16], 16), ([3, 9, 3, 1], 30)])
def test_varlen_attention_equals_per_segment_softmax(lengths, total):
    """Brute force per segment; rows past the last offset (padding) come out as exact zeros."""
    gen = torch.Generator().manual_seed(sum(lengths))
    q, k, v = (torch.randn(total, 2, 8, generator=gen) for _ in range(3))
    cu = pad_offsets(torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32), len(lengths) + 3)
    got = varlen_attention(q, k, v, cu, total)
    start = 0
    for n in lengths:
        qs, ks, vs = q[start : start + n], k[start : start + n], v[start : start + n]
        scores = torch.einsum("qhd,khd->hqk", qs, ks) / math.sqrt(8)
        ref = torch.einsum("hqk,khd->qhd", scores.softmax(-1), vs)
        torch.testing.assert_close(got[start : start + n], ref, atol=1e-6, rtol=1e-5)
        start += n
    assert torch.equal(got[start:], torch.zeros_like(got[start:]))


# ---- graph runners on the tiny checkpoints --------------------------------------------------


@pytest.fixture(scope="module")
def runners(tiny_checkpoint):
    """family -> (model, graph runner, eager runner) in float32, compiled once for the module."""
    made = {}

    def get(family):
        if family not in made:
            model = load_model(tiny_checkpoint(family))
            graph = EncoderRunner(model, BUDGETS, 96, max_frames_per_batch=MAX_FRAMES)
            eager = EncoderRunner(model, BUDGETS, 96, max_frames_per_batch=MAX_FRAMES, graph=False)
            made[family] = (model, graph, eager)
        return made[family]

    return get


def _items(grids, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return [
        VisionItem("image" if t == 1 else "video", torch.randn(t * h * w, ROW, generator=gen).to(dtype), (t, h, w))
        for t, h, w in grids
    ]


def _per_item_reference(model, items):
    """Each item alone through the model's own encode path (proven equal to HF in test_*_model.py)."""
    with torch.inference_mode():
        return [
            (model.encode_images if it.kind == "image" else model.encode_videos)(
                it.pixel_values, torch.tensor([it.grid_thw])
            )
            for it in items
        ]


# mixed sizes and videos; exactly 96; larger than every budget; frames past the frame limit
CASES = {
    "mixed": [(1, 4, 4), (1, 4, 6), (3, 4, 4), (1, 8, 8), (2, 2, 2), (1, 6, 10), (2, 8, 4), (1, 12, 16)],
    "exact_fill": [(1, 8, 16), (1, 8, 16), (1, 8, 16)],
    "larger_than_every_budget": [(1, 20, 20), (1, 4, 4)],
    "frames_cross_limit": [(6, 4, 4), (1, 4, 4), (5, 2, 6)],
}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("case", list(CASES))
def test_graph_equals_eager_item_by_item(runners, family, case):
    model, graph, eager = runners(family)
    items = _items(CASES[case], seed=len(case))
    plan = graph.plan(items)
    if case == "exact_fill":
        assert [(b.budget, b.tokens) for b in plan] == [(96, 96)]
    if case == "larger_than_every_budget":
        assert (None, 100) in [(b.budget, b.tokens) for b in plan]
    if case == "frames_cross_limit":
        assert all(b.frames <= MAX_FRAMES for b in plan)
        assert sum(1 for b in plan for p in b.pieces if p.item == 0) >= 2  # the 6-frame video is split
    got, ref_runner, ref_alone = graph.encode(items), eager.encode(items), _per_item_reference(model, items)
    for i, (g, e, r) in enumerate(zip(got, ref_runner, ref_alone, strict=True)):
        assert g.shape == (_tokens(items[i].grid_thw), model.model.language_model.embed_tokens.weight.shape[1])
        torch.testing.assert_close(g, e, atol=1e-5, rtol=0, msg=f"{case} item {i}")
        torch.testing.assert_close(g, r, atol=1e-5, rtol=0, msg=f"{case} item {i}")


@pytest.mark.parametrize("family", FAMILIES)
def test_graph_runner_matches_hf_on_real_media(runners, tiny_checkpoint, family):
    """Processor output for a real photo and a real video -> the graph runner == HF's vision tower.

    The video's frames (66 tokens each for GLM) are split over two budget-96 batches."""
    model, graph, _ = runners(family)
    path = tiny_checkpoint(family)
    proc, hf = hf_processor(path), hf_model(path)
    image = hf_inputs(proc, [{"type": "image"}], images=[rgb(IMAGES / "astronaut.png")])
    video = hf_inputs(proc, [{"type": "video"}], videos=[read_all_frames(VIDEOS / "coffee_15frames_10fps.webm")])
    items = [
        VisionItem("image", image["pixel_values"], tuple(image["image_grid_thw"][0].tolist())),
        VisionItem("video", video["pixel_values_videos"], tuple(video["video_grid_thw"][0].tolist())),
    ]
    with torch.no_grad():
        ref_image = torch.cat(hf.get_image_features(image["pixel_values"], image["image_grid_thw"]).pooler_output)
        ref_video = torch.cat(
            hf.get_video_features(video["pixel_values_videos"], video["video_grid_thw"]).pooler_output
        )
    got = graph.encode(items)
    assert all(b.budget is not None for b in graph.plan(items)), "both items should run in captured graphs"
    torch.testing.assert_close(got[0], ref_image, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got[1], ref_video, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_one_graph_per_budget_and_no_recompile_at_replay(runners, family):
    _, graph, _ = runners(family)
    assert graph.compiled_graphs == len(BUDGETS)
    assert graph.capture_seconds > 0
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for seed, grids in enumerate(CASES.values()):  # every budget, every padding shape
        graph.encode(_items(grids, seed=seed))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == before
    assert graph.encode([]) == []
    # the guarantee behind it: a shape outside the captured budgets is refused, not recompiled
    inputs = graph._dummy_inputs(graph._capacity(BUDGETS[0]))
    inputs["pixel_values"] = inputs["pixel_values"][:-4]
    with (
        pytest.raises(torch._dynamo.exc.RecompileError),
        torch.inference_mode(),
        torch._dynamo.config.patch(error_on_recompile=True),
    ):
        graph._graphs[BUDGETS[0]](**inputs)


@pytest.mark.parametrize("family", FAMILIES)
def test_padded_batch_attends_per_segment_not_over_the_budget(runners, family, monkeypatch):
    """Every SDPA call inside a replay sees at most the longest frame, never the padded capacity."""
    _, graph, _ = runners(family)
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        seen.append(q.shape[-2])
        return sdpa(q, k, v, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    items = _items([(1, 4, 4), (1, 4, 6), (2, 4, 4)], seed=3)  # 14 tokens padded to budget 32
    assert [b.budget for b in graph.plan(items)] == [32]
    graph.encode(items)
    assert seen and max(seen) <= 4 * 6  # longest frame: 24 patches; capacity is 128


@pytest.mark.parametrize("family", FAMILIES)
def test_bfloat16_graph_is_as_close_to_float32_as_eager(tiny_checkpoint, family):
    """bf16: graph vs eager differ by rounding order (inductor keeps fused elementwise chains in
    fp32 and rounds once; eager rounds after every op). Stated tolerance: the graph's error
    against the float32 model is at most 1.5x eager's plus 1% of the output scale, and the two
    bf16 paths agree within 5% of the output scale."""
    model32 = load_model(tiny_checkpoint(family))
    model16 = load_model(tiny_checkpoint(family), dtype="bfloat16")
    graph = EncoderRunner(model16, (96,), 96, max_frames_per_batch=MAX_FRAMES)
    eager = EncoderRunner(model16, (96,), 96, max_frames_per_batch=MAX_FRAMES, graph=False)
    items = _items(CASES["mixed"], seed=7)
    truth = EncoderRunner(model32, (96,), 96, graph=False).encode(items)
    got = graph.encode(_items(CASES["mixed"], seed=7, dtype=torch.bfloat16))
    ref = eager.encode(_items(CASES["mixed"], seed=7, dtype=torch.bfloat16))
    for i, (g, e, t) in enumerate(zip(got, ref, truth, strict=True)):
        scale = float(t.abs().max())
        err_graph, err_eager = float((g.float() - t).abs().max()), float((e.float() - t).abs().max())
        assert err_graph <= 1.5 * err_eager + 0.01 * scale, f"item {i}: {err_graph} vs eager {err_eager}"
        assert float((g.float() - e.float()).abs().max()) <= 0.05 * scale, f"item {i}"


def test_frame_tables_are_computed_once_per_frame_size(tiny_checkpoint, monkeypatch):
    """The window plan (the costly part of a Qwen2.5-VL frame's tables) is made once per frame size, however
    many batches the runner encodes (the tower memoises its tables: glimpse/vision/tables.py)."""
    from glimpse.models import qwen2_5_vl

    model = load_model(tiny_checkpoint("qwen2_5_vl"))
    runner = EncoderRunner(model, BUDGETS, 96, graph=False)
    calls = []
    original = qwen2_5_vl.frame_window_plan
    monkeypatch.setattr(qwen2_5_vl, "frame_window_plan", lambda h, w, *a: calls.append((h, w)) or original(h, w, *a))
    for seed in range(3):
        runner.encode(_items(CASES["mixed"], seed=seed))
    assert sorted(calls) == sorted({g[1:] for g in CASES["mixed"]})


# ---- bad input ------------------------------------------------------------------------------


def test_bad_items_raise_named_errors(runners):
    model, _, eager = runners("glm4v")
    good = torch.randn(16, ROW)
    with pytest.raises(InvalidInputError, match="kind"):
        eager.encode([VisionItem("audio", good, (1, 4, 4))])
    with pytest.raises(InvalidInputError, match="multiples of spatial_merge_size"):
        eager.encode([VisionItem("image", torch.randn(15, ROW), (1, 3, 5))])
    with pytest.raises(InvalidInputError, match=r"item 1: pixel_values has shape \(15, 1176\)"):
        eager.encode([VisionItem("image", good, (1, 4, 4)), VisionItem("image", good[:15], (1, 4, 4))])
    with pytest.raises(InvalidInputError, match="max_frames_per_batch"):
        EncoderRunner(model, None, 64, max_frames_per_batch=0, graph=False)
