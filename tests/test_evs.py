"""EVS (efficient video sampling, `video_pruning_rate`) for Qwen2.5-VL against a brute-force rule.

EVS has no HF reference. The reference here is the published rule written as plain per-token loops:
keep every token of the first frame, rank the others by 1 - cos(token, the same token one frame
earlier), keep the top int(N * (1 - rate)) (at least one frame; ties to the earlier token), and give
every kept token, all text and every generated token the M-RoPE position it has without pruning.
Rate 0 must equal the unpruned path bit for bit.
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import pytest
import torch
from conftest import IMAGES, VIDEOS

from glimpse.engine.sampling_params import SamplingParams
from glimpse.errors import InvalidInputError
from glimpse.llm import LLM
from glimpse.models.evs import (
    PrunedVideoSlots,
    check_pruning_rate,
    prune_video,
    pruned_prompt_positions,
    retained_tokens,
    retention_mask,
)
from glimpse.models.layers import ContiguousKVCache
from glimpse.models.mrope import qwen_mm_token_types, qwen_mrope_positions

VIDEO = VIDEOS / "slideshow_30fps.mp4"
FPS = {"fps": 2}  # slideshow at 2 fps: grid (10, 8, 14) on the tiny checkpoint -> 280 video tokens


# ---- the brute-force rule ----------------------------------------------------------------------


def brute_keep_count(t: int, per_frame: int, rate: float) -> int:
    return max(per_frame, int(t * per_frame * (1 - rate)))


def brute_kept(emb: torch.Tensor, grid: tuple[int, int, int], m: int, rate: float) -> list[int]:
    """Raster indices of the kept tokens, ascending: one token at a time, in float64."""
    t, h, w = grid
    per_frame = (h // m) * (w // m)
    rows = emb.double().tolist()
    dissimilarity = []
    for i, a in enumerate(rows):
        if i < per_frame:
            dissimilarity.append(math.inf)
            continue
        b = rows[i - per_frame]  # the same (y, x) one frame earlier
        dot = sum(x * y for x, y in zip(a, b, strict=True))
        na, nb = sum(x * x for x in a), sum(y * y for y in b)
        dissimilarity.append(1.0 - dot / math.sqrt(na * nb))
    order = sorted(range(len(rows)), key=lambda i: (-dissimilarity[i], i))
    return sorted(order[: brute_keep_count(t, per_frame, rate)])


def brute_positions(types: list[int], groups: list[dict], tps: float, m: int, rule: str = "reference"):
    """Per-token positions of a prompt whose vision runs may be pruned; -> (positions [3, T], first decode position).

    `groups[g]`: {"grid": (t, h, w), "spg": seconds per grid step (0 for images), "kept": raster indices
    present in the prompt}. Each kept token sits at its unpruned place; dropped tokens take none.
    """
    pos, top, s, i, g = [], -1, 0, 0, 0
    while i < len(types):
        if types[i] == 0:
            pos.append((s, s, s))
            top = max(top, s)
            s, i = s + 1, i + 1
            continue
        group = groups[g]
        t, h, w = group["grid"]
        hh, ww = h // m, w // m
        scale = np.float32(tps * group["spg"])
        placed = []  # every token of the unpruned group, in raster order
        for r in range(t * hh * ww):
            k, rest = divmod(r, hh * ww)
            y, x = divmod(rest, ww)
            placed.append((s + int(np.float32(k) * scale), s + y, s + x))
        pos.extend(placed[r] for r in group["kept"])
        full_max = max(max(p) for p in placed)
        top = max(top, full_max)
        s = full_max + 1 if rule == "reference" else s + max(hh, ww)
        i += len(group["kept"])
        g += 1
    return torch.tensor(pos, dtype=torch.long).T, top + 1


# ---- the rule on its own --------------------------------------------------------------------------


def test_retained_tokens_hand_worked():
    # grid (4, 4, 4), merge 2: 4 frames of 2x2 = 4 tokens, 16 in all
    assert [retained_tokens((4, 4, 4), 2, q) for q in (0.0, 0.3, 0.5, 0.9)] == [16, 11, 8, 4]
    assert retained_tokens((10, 8, 14), 2, 0.5) == 140
    assert retained_tokens((1, 8, 8), 2, 0.75) == 16  # a single frame is always kept whole


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan"), float("inf"), "0.5", True, None])
def test_rate_outside_0_1_is_refused(bad):
    with pytest.raises(InvalidInputError, match=r"video_pruning_rate=.*\[0, 1\)"):
        check_pruning_rate(bad)


def test_tie_break_hand_worked():
    """One-hot tokens make every dissimilarity exactly 0 or 1; ties go to the earlier token."""
    e = torch.eye(4)
    frames = [
        [e[0], e[1], e[2], e[3]],  # frame 0: kept whole
        [e[0], e[2], e[2], e[3]],  # d = 0 1 0 0  (token 5 changed)
        [e[1], e[2], e[0], e[3]],
    ]  # d = 1 0 1 0  (tokens 8 and 10 changed)
    emb = torch.stack([v for f in frames for v in f])
    grid = (3, 4, 4)  # merge 2: 2x2 tokens per frame
    # rate 0.5 keeps 6: frame 0, then two of the three d=1 tokens (5, 8, 10) -> the earlier two
    assert retention_mask(emb, grid, 2, 0.5).nonzero().flatten().tolist() == [0, 1, 2, 3, 5, 8]
    # rate 0.25 keeps 9: frame 0, all three d=1 tokens, then the earliest d=0 tokens (4, 6)
    assert retention_mask(emb, grid, 2, 0.25).nonzero().flatten().tolist() == [0, 1, 2, 3, 4, 5, 6, 8, 10]
    assert retention_mask(emb, grid, 2, 0.9).nonzero().flatten().tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("grid", [(4, 4, 6), (3, 6, 4), (1, 4, 4), (6, 2, 2), (5, 8, 6)])
@pytest.mark.parametrize("rate", [0.0, 0.25, 0.5, 0.75, 0.95])
def test_retention_mask_matches_brute_force(grid, rate):
    t, h, w = grid
    per_frame = (h // 2) * (w // 2)
    gen = torch.Generator().manual_seed(hash(grid) % 1000)
    emb = torch.randn(t * per_frame, 16, generator=gen)
    if t > 2:  # a static stretch: frame 2 repeats frame 1 exactly in its first half of tokens (exact ties)
        half = per_frame // 2
        emb[2 * per_frame : 2 * per_frame + half] = emb[per_frame : per_frame + half]
    expected = brute_kept(emb, grid, 2, rate)
    pruned = prune_video(emb, grid, 2, rate)
    assert pruned.kept.tolist() == expected
    assert torch.equal(pruned.embeddings, emb[expected])
    assert retention_mask(emb, grid, 2, rate).sum() == brute_keep_count(t, per_frame, rate)


def test_rate_zero_keeps_every_token_unchanged():
    emb = torch.randn(5 * 12, 32)
    pruned = prune_video(emb, (5, 6, 8), 2, 0.0)
    assert pruned.kept.tolist() == list(range(60))
    assert torch.equal(pruned.embeddings, emb)


# ---- positions ----------------------------------------------------------------------------------


@pytest.mark.parametrize("rule", ["reference", "hf"])
def test_pruned_positions_match_brute_force(rule):
    """text, video A (pruned), text, image, text, video B (pruned), text: positions and delta."""
    img_id, vid_id, m, tps = 98, 99, 2, 2.0
    grid_a, grid_b, grid_i = (4, 4, 6), (3, 6, 4), (1, 4, 4)
    spg = [0.5, 1.5]
    gen = torch.Generator().manual_seed(3)
    kept = []
    for grid, rate in ((grid_a, 0.5), (grid_b, 0.6)):
        n = grid[0] * grid[1] * grid[2] // 4
        kept.append(brute_kept(torch.randn(n, 8, generator=gen), grid, m, rate))
    pieces = [[1, 2, 3], [vid_id] * len(kept[0]), [4, 5], [img_id] * 4, [6], [vid_id] * len(kept[1]), [7, 8]]
    ids = [x for p in pieces for x in p]
    starts = np.cumsum([0] + [len(p) for p in pieces])
    videos = [
        PrunedVideoSlots(int(starts[1]), len(kept[0]), 24),
        PrunedVideoSlots(int(starts[5]), len(kept[1]), 18),
    ]
    vgrid, igrid = torch.tensor([grid_a, grid_b]), torch.tensor([grid_i])

    def rule_fn(full_ids):
        types = qwen_mm_token_types(full_ids, img_id, vid_id)
        return qwen_mrope_positions(types, igrid, vgrid, torch.tensor(spg), tps, m, video_rule=rule)

    out = pruned_prompt_positions(torch.tensor(ids), videos, vid_id, rule_fn)
    positions = out.positions.clone()
    for v, k in zip(videos, kept, strict=True):
        positions[:, v.start : v.start + v.kept] = out.video_positions[v.start][:, torch.tensor(k)]

    types = qwen_mm_token_types(torch.tensor(ids), img_id, vid_id).tolist()
    groups = [{"grid": grid_a, "spg": spg[0], "kept": kept[0]}, {"grid": grid_i, "spg": 0.0, "kept": list(range(4))},
              {"grid": grid_b, "spg": spg[1], "kept": kept[1]}]  # fmt: skip
    expected, first_decode = brute_positions(types, groups, tps, m, rule)
    assert torch.equal(positions, expected)
    assert out.mrope_delta == first_decode - len(ids)


def test_unpruned_slots_reproduce_the_plain_rule_exactly():
    """With nothing dropped, the EVS position path is the family's rule, column for column."""
    ids = torch.tensor([1, 2] + [99] * 24 + [3, 4])
    grid = torch.tensor([[4, 4, 6]])

    def rule_fn(full_ids):
        return qwen_mrope_positions(
            qwen_mm_token_types(full_ids, 98, 99), None, grid, torch.tensor([1.0]), 2.0, 2
        )

    out = pruned_prompt_positions(ids, [PrunedVideoSlots(2, 24, 24)], 99, rule_fn)
    positions = out.positions.clone()
    positions[:, 2:26] = out.video_positions[2]
    plain, delta = rule_fn(ids)
    assert torch.equal(positions, plain) and out.mrope_delta == delta


# ---- the engine ---------------------------------------------------------------------------------


def _video_conv(text: str = "What happens in the video?", video=VIDEO) -> list[dict]:
    return [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": str(video)}},
                                         {"type": "text", "text": text}]}]  # fmt: skip


def _image_conv(text: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": str(IMAGES / "chelsea.png")}},
                                         {"type": "text", "text": text}]}]  # fmt: skip


PARAMS = SamplingParams(temperature=0, max_tokens=8, logprobs=5, ignore_eos=True)


@pytest.fixture(scope="module")
def qwen(tiny_checkpoint):
    return tiny_checkpoint("qwen2_5_vl")


@pytest.fixture(scope="module")
def evs_llm(qwen):
    return LLM(qwen, dtype="float32", video_pruning_rate=0.5, max_num_batched_tokens=64)


def _brute_force_run(model, prompt, rate: float, max_new: int, dense_positions: bool = False):
    """Greedy decode of a pruned prompt the plain way: encode the whole video, keep the brute-force
    tokens, place them and the text per token, one contiguous forward; -> (tokens, [steps, vocab] log-probs)."""
    item = prompt.videos[0]
    m = model.spatial_merge_size
    emb = model.encode_videos(item.pixel_values, torch.tensor([item.grid_thw]))
    kept = brute_kept(emb, item.grid_thw, m, rate)
    ids = torch.tensor(prompt.input_ids)
    embeds = model.embed_tokens(ids)
    embeds[item.start : item.end] = emb[kept]
    types = model.mm_token_types(ids).tolist()
    if dense_positions:  # the wrong rule: kept tokens as if they were the video's first ones
        kept = list(range(len(kept)))
    positions, next_pos = brute_positions(types, [{"grid": item.grid_thw, "spg": item.second_per_grid_t, "kept": kept}],
                                          model.tokens_per_second, m)  # fmt: skip
    kv = ContiguousKVCache(model.num_decoder_layers)
    logits = model.lm_logits(model.decode(embeds, positions, kv)[-1:])
    tokens, logprobs = [], []
    for step in range(max_new):
        logprobs.append(torch.log_softmax(logits[0].double(), -1))
        tokens.append(int(logits.argmax(-1)))
        if step + 1 == max_new:
            break
        pos = torch.full((3, 1), next_pos + step, dtype=torch.long)
        logits = model.lm_logits(model.decode(model.embed_tokens(torch.tensor(tokens[-1:])), pos, kv))
    return tokens, torch.stack(logprobs), kept, positions, next_pos


@torch.inference_mode()
def test_engine_matches_brute_force_forward(evs_llm):
    """Chunked prefill through the video (64-token chunks): kept tokens, positions, delta, logits."""
    engine, model = evs_llm.engine, evs_llm.engine.model
    prompt = evs_llm.processor(_video_conv(), **FPS)
    item = prompt.videos[0]
    assert item.grid_thw == (10, 8, 14) and item.unpruned_tokens == 280 and item.num_tokens == 140
    assert (
        len(prompt.input_ids)
        == len(evs_llm.processor(_video_conv(), **FPS, video_pruning_rate=0).input_ids) - 140
    )
    ref_tokens, ref_lp, ref_kept, ref_pos, next_pos = _brute_force_run(model, prompt, 0.5, PARAMS.max_tokens)

    engine.add_request("evs", prompt, PARAMS)
    req = engine.scheduler.waiting[0]
    steps = 0
    while req.num_computed_tokens < req.num_prompt_tokens:
        engine.step()
        steps += 1
    assert steps > 2  # the video was prefilled over several chunks
    assert engine.runner.encoder_cache.get(item.content_hash).kept.tolist() == ref_kept
    assert torch.equal(engine.runner.requests[req.request_id].prompt_positions, ref_pos)
    assert req.mrope_delta == next_pos - len(prompt.input_ids)
    final = None
    while engine.has_unfinished_requests():
        final = (engine.step() or [final])[-1]
    comp = final.outputs[0]
    assert comp.token_ids == ref_tokens
    # Paged, chunked attention sums in another order than one contiguous forward: float32 noise only.
    for step, lp in enumerate(comp.logprobs):
        for token, value in lp.top:
            assert abs(value - float(ref_lp[step, token])) < 1e-4
    # The comparison is sensitive to positions: packing the kept tokens densely changes the logits.
    _, dense_lp, *_ = _brute_force_run(model, prompt, 0.5, 1, dense_positions=True)
    assert (dense_lp[0] - ref_lp[0]).abs().max() > 1e-3


def test_batched_chunked_preempted_equal_alone(qwen, evs_llm):
    convs = [_video_conv(), _image_conv("What animal?"), _video_conv("Describe it.", VIDEOS / "coffee_15frames_10fps.webm"),
             [{"role": "user", "content": "Hello there, how are you?"}]]  # fmt: skip
    alone = [
        evs_llm.chat(c, PARAMS, use_tqdm=False, mm_processor_kwargs=FPS)[0].outputs[0].token_ids
        for c in convs
    ]
    for kwargs in ({"max_num_batched_tokens": 37}, {"kv_cache_memory": 24 * 16 * 1024, "max_model_len": 384}):
        llm = LLM(qwen, dtype="float32", video_pruning_rate=0.5, **kwargs)
        outs = llm.chat(convs, PARAMS, use_tqdm=False, mm_processor_kwargs=FPS)
        assert [o.outputs[0].token_ids for o in outs] == alone
        if "kv_cache_memory" in kwargs:
            assert sum(o.metrics["num_preemptions"] for o in outs) > 0
        assert llm.engine.blocks.num_used_blocks == 0


def test_rate_zero_is_bit_identical_to_no_pruning(qwen):
    convs = [_video_conv(), _image_conv("What animal?")]
    plain = LLM(qwen, dtype="float32", max_num_batched_tokens=64)
    zero = LLM(qwen, dtype="float32", max_num_batched_tokens=64, video_pruning_rate=0.0)
    a = plain.chat(convs, PARAMS, use_tqdm=False, mm_processor_kwargs=FPS)
    b = zero.chat(convs, PARAMS, use_tqdm=False, mm_processor_kwargs=FPS)
    for x, y in zip(a, b, strict=True):
        assert x.prompt_token_ids == y.prompt_token_ids
        assert x.outputs[0].token_ids == y.outputs[0].token_ids
        assert [(lp.token_id, lp.logprob, lp.top) for lp in x.outputs[0].logprobs] == \
               [(lp.token_id, lp.logprob, lp.top) for lp in y.outputs[0].logprobs]  # fmt: skip
    pa, pb = plain.processor(convs[0], **FPS), zero.processor(convs[0], **FPS)
    assert pa.videos[0].content_hash == pb.videos[0].content_hash and pb.videos[0].pruning_rate == 0


def test_caches_reuse_only_the_same_rate(evs_llm, qwen):
    conv = _video_conv("Summarise the video.")
    first = evs_llm.chat(conv, PARAMS, use_tqdm=False, mm_processor_kwargs=FPS)[0]
    again = evs_llm.chat(conv, PARAMS, use_tqdm=False, mm_processor_kwargs=FPS)[0]
    video = evs_llm.processor(conv, **FPS).videos[0]
    assert again.num_cached_tokens > video.end  # the pruned video's KV came from the prefix cache
    assert again.outputs[0].token_ids == first.outputs[0].token_ids
    other = evs_llm.processor(conv, **FPS, video_pruning_rate=0.25).videos[0]
    assert other.content_hash != video.content_hash and other.num_tokens == 210
    out = evs_llm.chat(conv, PARAMS, use_tqdm=False, mm_processor_kwargs={**FPS, "video_pruning_rate": 0.25})[
        0
    ]
    assert out.num_cached_tokens <= video.start  # a different rate shares no KV past the video's start
    fresh = LLM(qwen, dtype="float32", video_pruning_rate=0.25).chat(
        conv, PARAMS, use_tqdm=False, mm_processor_kwargs=FPS
    )[0]
    assert out.outputs[0].token_ids == fresh.outputs[0].token_ids
    # Encoder cache only (no prefix cache): the second request places its kept tokens from the cache.
    llm = LLM(qwen, dtype="float32", video_pruning_rate=0.5, enable_prefix_caching=False)
    outs = [llm.chat(conv, PARAMS, use_tqdm=False, mm_processor_kwargs=FPS)[0] for _ in range(2)]
    assert llm.engine.encoder_cache.hits >= 1
    assert outs[0].outputs[0].token_ids == outs[1].outputs[0].token_ids == first.outputs[0].token_ids


def test_unsupported_family_and_bad_rates_are_refused(tiny_checkpoint, evs_llm):
    with pytest.raises(InvalidInputError, match="Qwen2.5-VL only"):
        LLM(tiny_checkpoint("glm4v"), dtype="float32", video_pruning_rate=0.5)
    with pytest.raises(InvalidInputError, match=r"\[0, 1\)"):
        LLM(tiny_checkpoint("qwen2_5_vl"), dtype="float32", video_pruning_rate=1.0)
    with pytest.raises(InvalidInputError, match=r"mm_processor_kwargs.video_pruning_rate=-0.1"):
        evs_llm.chat(_video_conv(), PARAMS, use_tqdm=False, mm_processor_kwargs={"video_pruning_rate": -0.1})
    glm = LLM(tiny_checkpoint("glm4v"), dtype="float32")
    with pytest.raises(InvalidInputError, match="Qwen2.5-VL only"):
        glm.chat(_video_conv(), PARAMS, use_tqdm=False, mm_processor_kwargs={"video_pruning_rate": 0.5})


def test_serve_flag(qwen, tiny_checkpoint):
    from glimpse.server.cli import add_arguments, build_state

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    with pytest.raises(InvalidInputError, match=r"--video-pruning-rate=1.0 must be a number in \[0, 1\)"):
        build_state(parser.parse_args([str(qwen), "--video-pruning-rate", "1", "--encoder-graph", "off"]))
    with pytest.raises(InvalidInputError, match="Qwen2.5-VL only"):
        build_state(parser.parse_args([str(tiny_checkpoint("glm4v")), "--video-pruning-rate", "0.5", "--encoder-graph", "off"]))
    state = build_state(parser.parse_args([str(qwen), "--video-pruning-rate", "0.5", "--encoder-graph", "off"]))
    try:
        assert state.engine.config.video_pruning_rate == 0.5
        assert state.processor.video_pruning_rate == 0.5
        assert state.processor(_video_conv(), **FPS).videos[0].num_tokens == 140
    finally:
        state.engine.shutdown()
        state.pool.shutdown(wait=False, cancel_futures=True)


def test_serve_http_uses_the_rate_and_per_request_override(qwen):
    """`glimpse serve --video-pruning-rate 0.5`: usage counts the kept video tokens; a request may set its own rate."""
    import base64

    from test_server import MODEL, ServerProcess

    url = "data:video/mp4;base64," + base64.b64encode(VIDEO.read_bytes()).decode()
    messages = [
        {
            "role": "user",
            "content": [{"type": "video_url", "video_url": {"url": url}}, {"type": "text", "text": "Hi"}],
        }
    ]
    srv = ServerProcess(qwen, "--video-pruning-rate", "0.5")
    try:
        for mm, video_tokens in (
            ({}, 140),
            ({"video_pruning_rate": 0}, 280),
            ({"video_pruning_rate": 0.75}, 70),
        ):
            body = {"model": MODEL, "max_tokens": 2, "temperature": 0, "messages": messages,
                    "mm_processor_kwargs": {**FPS, **mm}}  # fmt: skip
            r = srv.post("/v1/chat/completions", body)
            assert r.status_code == 200, r.text
            assert r.json()["usage"]["prompt_tokens_details"]["video_tokens"] == video_tokens
        r = srv.post("/v1/chat/completions", {**body, "mm_processor_kwargs": {"video_pruning_rate": 1.5}})
        assert r.status_code == 400 and "video_pruning_rate=1.5" in r.json()["error"]["message"]
    finally:
        srv.stop()
