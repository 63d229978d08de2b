"""The engine: batching, chunked prefill and preemption never change greedy outputs; they equal
HF `generate`; one decoder forward per step; media-aware prefix and encoder caches; budgets."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import IMAGES, VIDEOS
from hf_oracle import assert_same_until_a_tie, hf_greedy, hf_model, qwen_reference_rope
from PIL import Image

from glimpse.engine.sampling_params import SamplingParams
from glimpse.llm import LLM

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def _img(name: str, crop: tuple[int, int, int, int] | None = None, size: tuple[int, int] | None = None) -> Image.Image:
    im = Image.open(IMAGES / name).convert("RGB")
    if crop:
        im = im.crop(crop)
    return im.resize(size) if size else im


def _conversations(n_text: int = 6) -> list[list[dict]]:
    """16 mixed conversations: images of several sizes, two videos, plain text."""
    def user(*parts):
        return [{"role": "user", "content": list(parts)}]

    img = lambda im: {"type": "image_url", "image_url": {"url": im}}  # noqa: E731
    vid = lambda p: {"type": "video_url", "video_url": {"url": str(p)}}  # noqa: E731
    txt = lambda t: {"type": "text", "text": t}  # noqa: E731
    convs = [
        user(img(_img("astronaut.png")), txt("Describe this image.")),
        user(img(_img("chelsea.png")), txt("What animal is this?")),
        user(img(_img("coffee.png", (0, 0, 300, 200))), txt("Cup?")),
        user(img(_img("rocket.jpg")), img(_img("camera.png")), txt("Compare them.")),
        user(img(_img("hubble_deep_field.jpg", size=(200, 120))), txt("Stars")),
        user(vid(VIDEOS / "slideshow_30fps.mp4"), txt("What happens in the video?")),
        user(vid(VIDEOS / "coffee_15frames_10fps.webm"), txt("Describe the motion.")),
        user(img(_img("astronaut.png", (100, 100, 400, 300))), txt("Who?")),
        user(img(_img("chelsea.png", size=(120, 240))), txt("Tall cat")),
        user(img(_img("rocket.jpg", (50, 0, 640, 300))), txt("Launch")),
    ]
    texts = ["Hello there.", "Tell me about the rocket launch in many words please", "1 2 3 4 5 6 7 8 9",
             "What is the color of the sky at night?", "Summarise: the cat sat on the table near the coffee cup.",
             "Why?"]  # fmt: skip
    convs += [user(txt(t)) for t in texts[:n_text]]
    return convs


@pytest.fixture(scope="module")
def glm_llm(tiny_checkpoint):
    return LLM(tiny_checkpoint("glm46v"), dtype="float32", max_num_batched_tokens=4096)


def _tokens(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


@pytest.fixture(scope="module")
def alone(glm_llm) -> list[list[int]]:
    """Reference: every conversation run on its own."""
    return [glm_llm.chat(c, GREEDY, use_tqdm=False)[0].outputs[0].token_ids for c in _conversations()]


def test_batch_of_16_equals_alone(glm_llm, alone):
    assert len(alone) == 16
    assert _tokens(glm_llm.chat(_conversations(), GREEDY, use_tqdm=False)) == alone


@pytest.mark.parametrize("chunk", [16, 37, 200])
def test_chunked_prefill_equals_alone(tiny_checkpoint, alone, chunk):
    llm = LLM(tiny_checkpoint("glm46v"), dtype="float32", max_num_batched_tokens=chunk)
    outs = llm.chat(_conversations(), GREEDY, use_tqdm=False)
    assert _tokens(outs) == alone


def test_preemption_equals_alone(tiny_checkpoint, alone):
    # 40 blocks of 16 tokens: far less than 16 prompts need at once, so requests are preempted.
    llm = LLM(tiny_checkpoint("glm46v"), dtype="float32", kv_cache_memory=40 * 16 * 1024, max_model_len=640,
              max_num_batched_tokens=256)  # fmt: skip
    outs = llm.chat(_conversations(), GREEDY, use_tqdm=False)
    assert sum(o.metrics["num_preemptions"] for o in outs) > 0
    assert _tokens(outs) == alone
    assert llm.engine.blocks.num_used_blocks == 0


def test_one_decoder_forward_per_step(glm_llm):
    engine = glm_llm.engine
    calls = []
    original = engine.model.decode

    def counting(*args, **kwargs):
        calls.append(args[0].shape[0])
        return original(*args, **kwargs)

    engine.model.decode = counting
    try:
        for i, conv in enumerate(_conversations()[:6]):
            engine.add_request(f"fwd{i}", engine.processor(conv), GREEDY)
        steps = 0
        while engine.has_unfinished_requests():
            before = len(calls)
            running = len(engine.scheduler.running) + len(engine.scheduler.waiting)
            engine.step()
            steps += 1
            assert len(calls) - before == 1, "each step runs exactly one decoder forward"
            if running > 1 and steps > 1:
                assert calls[-1] > 1  # several requests share that forward
    finally:
        engine.model.decode = original


FAMILIES = ["glm4v", "glm46v", "glm46v_flash", "glmga", "glm4v_moe", "glm46v_moe", "glm_ocr", "qwen2_5_vl"]


@pytest.mark.parametrize("family", FAMILIES)
def test_the_last_layer_computes_only_the_rows_asked_for(family, tiny_checkpoint):
    """decode(..., rows) returns the rows of the whole computation and leaves the same K/V in the cache
    (float32; the last layer's o_proj and MLP just see fewer rows); in the engine the last layer's MLP
    sees one row per sampling sequence: none for a prompt chunk that does not end the prompt."""
    from glimpse.models.layers import ContiguousKVCache

    llm = LLM(tiny_checkpoint(family), dtype="float32", max_num_batched_tokens=16)
    model = llm.engine.model
    ids = torch.randint(0, 100, (12,))
    embeds, positions = model.embed_tokens(ids), torch.arange(12).expand(3, -1)
    whole_kv, some_kv, none_kv = (ContiguousKVCache(model.num_decoder_layers) for _ in range(3))
    with torch.inference_mode():
        whole = model.decode(embeds, positions, whole_kv)
        some = model.decode(embeds, positions, some_kv, torch.tensor([3, 11]))
        none = model.decode(embeds, positions, none_kv, torch.tensor([], dtype=torch.long))
    assert some.shape == (2, whole.shape[1]) and none.shape == (0, whole.shape[1])
    torch.testing.assert_close(some, whole[[3, 11]], rtol=1e-5, atol=1e-5)
    for kv in (some_kv, none_kv):
        assert all(torch.equal(a, b) for a, b in zip(kv.k + kv.v, whole_kv.k + whole_kv.v, strict=True))

    seen = {"first": [], "last": []}
    layers = model.model.language_model.layers
    hooks = [layers[i].mlp.register_forward_pre_hook(lambda m, a, key=key: seen[key].append(a[0].shape[0]))
             for i, key in ((0, "first"), (-1, "last"))]  # fmt: skip
    try:
        out = llm.generate(" ".join(["hello"] * 20), SamplingParams(temperature=0, max_tokens=3), use_tqdm=False)[0]
    finally:
        for h in hooks:
            h.remove()
    prompt = len(out.prompt_token_ids)
    assert prompt > 16 and sum(seen["first"][:-2]) == prompt and seen["first"][-2:] == [1, 1]
    chunks = len(seen["first"]) - 2
    assert seen["last"] == [0] * (chunks - 1) + [1, 1, 1]  # the prompt's last chunk samples, then 2 decode steps


@pytest.mark.parametrize("family", FAMILIES)
def test_engine_equals_hf_generate(family, tiny_checkpoint):
    """Batched, chunked engine output == HF generate on each prompt, token for token."""
    path = tiny_checkpoint(family)
    llm = LLM(path, dtype="float32", max_num_batched_tokens=48)
    convs = [c for i, c in enumerate(_conversations(n_text=2)) if i in (0, 3, 5, 10, 11)]
    kwargs = {"fps": 2} if family == "qwen2_5_vl" else {}
    params = SamplingParams(temperature=0, max_tokens=10)
    outs = llm.chat(convs, params, use_tqdm=False, mm_processor_kwargs=kwargs)
    hf = hf_model(path)
    eos = list(llm.engine.eos_token_ids)
    for conv, out in zip(convs, outs, strict=True):
        p = llm.processor(conv, **kwargs)
        inputs = dict(p)
        inputs["mm_token_type_ids"] = llm.engine.model.mm_token_types(inputs["input_ids"][0])[None]
        ctx = qwen_reference_rope(hf) if family == "qwen2_5_vl" else torch.no_grad()
        with ctx:
            ref, margins = hf_greedy(hf, inputs, 10, eos_token_id=eos)
        got = out.outputs[0].token_ids
        assert_same_until_a_tie(got, ref, margins)


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_repeated_image_encoded_once(tiny_checkpoint, prefix_caching):
    """With prefix caching the second request skips the image's KV; without, it reuses its embeddings."""
    llm = LLM(tiny_checkpoint("glm4v"), dtype="float32", enable_prefix_caching=prefix_caching)
    engine = llm.engine
    encoded = []
    original = engine.model.encode_images
    engine.model.encode_images = lambda pv, grid: encoded.append(grid.tolist()) or original(pv, grid)
    conv = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _img("chelsea.png")}},
                                         {"type": "text", "text": "What is it?"}]}]  # fmt: skip
    first = llm.chat(conv, GREEDY, use_tqdm=False)[0]
    second = llm.chat(conv, GREEDY, use_tqdm=False)[0]
    assert len(encoded) == 1
    assert first.num_cached_tokens == 0
    n = len(second.prompt_token_ids)
    if prefix_caching:
        assert second.num_cached_tokens == (n - 1) // 16 * 16 > llm.processor(conv).images[0].end
    else:
        assert second.num_cached_tokens == 0 and engine.encoder_cache.hits == 1
    assert second.outputs[0].token_ids == first.outputs[0].token_ids


def test_different_image_same_size_never_reuses_kv(tiny_checkpoint):
    llm = LLM(tiny_checkpoint("glm4v"), dtype="float32")
    rng = np.random.default_rng(0)
    a = Image.fromarray(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8))
    b = Image.fromarray(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8))

    def conv(im):
        return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": im}},
                                             {"type": "text", "text": "Describe this picture in detail."}]}]  # fmt: skip

    pa, pb = llm.processor(conv(a)), llm.processor(conv(b))
    assert pa.input_ids == pb.input_ids  # identical token ids: only the pixels differ
    image_start = pa.images[0].start
    out_a = llm.chat(conv(a), GREEDY, use_tqdm=False)[0]
    out_b = llm.chat(conv(b), GREEDY, use_tqdm=False)[0]
    assert out_b.num_cached_tokens <= image_start  # only blocks before the image may be shared
    fresh = LLM(tiny_checkpoint("glm4v"), dtype="float32").chat(conv(b), GREEDY, use_tqdm=False)[0]
    assert out_b.outputs[0].token_ids == fresh.outputs[0].token_ids
    assert out_a.outputs[0].token_ids != out_b.outputs[0].token_ids or out_a.outputs[0].text != ""


def test_caches_stay_within_budgets(tiny_checkpoint):
    enc_budget = 3 * 64 * 128 * 4  # three 64-token images of hidden 128 in float32
    llm = LLM(tiny_checkpoint("glm4v"), dtype="float32", encoder_cache_memory=enc_budget,
              kv_cache_memory=64 * 16 * 1024, max_model_len=512)  # fmt: skip
    engine = llm.engine
    assert engine.kv_cache.nbytes <= 64 * 16 * 1024
    rng = np.random.default_rng(1)
    for i in range(12):
        im = Image.fromarray(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8))
        conv = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": im}}, {"type": "text", "text": "Hi"}]}]
        engine.add_request(f"r{i}", engine.processor(conv), GREEDY)
    while engine.has_unfinished_requests():
        engine.step()
        assert engine.encoder_cache.used_bytes <= enc_budget
        # the runner's tensors: only what the scheduler's manager still counts, so within its budget too
        # (or what it dropped since the last schedule: the runner frees those at the next step)
        held, manager = engine.runner.encoder_cache, engine.encoder_cache
        assert set(held.entries) <= set(manager.sizes) | set(manager.freed)
        assert sum(held.entries[k].nbytes for k in held.entries if k in manager.sizes) <= enc_budget
        assert engine.blocks.num_used_blocks <= engine.blocks.num_blocks
    assert engine.blocks.num_used_blocks == 0


def test_encoder_cache_off_leaves_the_runner_no_embeddings(tiny_checkpoint):
    """enable_encoder_cache=False: the scheduler's manager drops an entry when its last request is done,
    and the runner (which holds the tensors) is told to free it, even when no step follows."""
    llm = LLM(tiny_checkpoint("glm4v"), dtype="float32", enable_encoder_cache=False)
    engine = llm.engine
    im = Image.fromarray(np.random.default_rng(2).integers(0, 256, (224, 224, 3), dtype=np.uint8))
    conv = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": im}}, {"type": "text", "text": "Hi"}]}]
    for i in range(2):  # the same image twice: no reuse across requests with the cache off
        engine.add_request(f"r{i}", engine.processor(conv), GREEDY)
        while engine.has_unfinished_requests():
            engine.step()
            manager = engine.encoder_cache  # the runner holds at most what it counts or just dropped
            assert set(engine.runner.encoder_cache.entries) <= set(manager.sizes) | set(manager.freed)
        assert not engine.runner.encoder_cache.entries and not engine.encoder_cache.sizes
    assert engine.encoder_cache.hits == 0


@pytest.mark.parametrize("family", ["glm46v", "qwen2_5_vl"])
def test_encoder_graph_engine_equals_eager(family, tiny_checkpoint):
    """The engine with the compiled, budget-batched encoder gives the eager engine's greedy tokens."""
    convs = [c for i, c in enumerate(_conversations(n_text=1)) if i in (0, 3, 5, 10)]
    kwargs = {"fps": 2} if family == "qwen2_5_vl" else {}
    eager = LLM(tiny_checkpoint(family), dtype="float32").chat(convs, GREEDY, use_tqdm=False, mm_processor_kwargs=kwargs)
    graph_llm = LLM(tiny_checkpoint(family), dtype="float32", encoder_graph="on", encoder_budgets=(64, 256),
                    max_num_batched_tokens=256)  # fmt: skip
    assert graph_llm.engine.runner.encoder_runner.compiled_graphs >= 1
    graph = graph_llm.chat(convs, GREEDY, use_tqdm=False, mm_processor_kwargs=kwargs)
    assert _tokens(graph) == _tokens(eager)


def test_warm_up_runs_one_full_step_and_leaves_nothing_behind(tiny_checkpoint, monkeypatch):
    """`warmup=True`: one step as full as the prefill budget (an image chat plus a filler prompt), then an
    engine in the state of a fresh one: no request, every KV block free, nothing in the prefix cache; its
    greedy answers equal those of an engine that did not warm up."""
    from glimpse.engine.model_runner import ModelRunner
    from glimpse.errors import InvalidInputError

    steps = []
    execute = ModelRunner.execute

    def spy(self, sched):
        steps.append((sum(sched.num_scheduled_tokens.values()), len(sched.encode)))
        return execute(self, sched)

    monkeypatch.setattr(ModelRunner, "execute", spy)
    path = tiny_checkpoint("glm46v")
    warm = LLM(path, dtype="float32", max_num_batched_tokens=256, max_prefill_tokens=200)
    assert steps[0] == (200, 1)  # the budget's 200 prompt tokens, the image encoded in the same step
    engine = warm.engine
    assert not engine.has_unfinished_requests() and not engine.blocks.cached
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks
    cold = LLM(path, dtype="float32", max_num_batched_tokens=256, max_prefill_tokens=200, warmup=False)
    convs = _conversations(2)[:4]
    assert _tokens(warm.chat(convs, GREEDY, use_tqdm=False)) == _tokens(cold.chat(convs, GREEDY, use_tqdm=False))
    engine.add_request("busy", "Hello", SamplingParams(max_tokens=2))
    with pytest.raises(InvalidInputError, match="before the first request"):
        engine.warm_up()
    steps.clear()  # an engine too short for the image warms up on text alone, as long as it allows
    LLM(path, dtype="float32", max_model_len=48, kv_cache_memory="16MiB")
    assert steps[0] == (46, 0)
    # the warm-up's decoder work is capped (a real-size model would spend many seconds on a full budget):
    # 2 x decoder parameters x tokens <= WARMUP_MAX_FLOPS, counted here from the parameters by hand
    import glimpse.engine.llm_engine as llm_engine

    decoder = sum(p.numel() for name, p in engine.model.named_parameters() if not name.startswith("model.visual."))
    monkeypatch.setattr(llm_engine, "WARMUP_MAX_FLOPS", 2 * decoder * 120)
    steps.clear()
    LLM(path, dtype="float32", max_num_batched_tokens=256, max_prefill_tokens=200)
    assert steps[0] == (120, 1)
