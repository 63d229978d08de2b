"""The CUDA paths (glimpse/backends/cuda.py and the engine on `device="cuda"`) against HF transformers on
the same GPU. They need an NVIDIA GPU, so they skip everywhere else (CI has none); docs/benchmarks.md
"CUDA" records the one machine they ran on and what it printed.

References: HF's model on the same GPU in float32 (TF32 off on both sides, so float32 means float32)
for logits and greedy tokens; a float32 softmax written out per segment for the varlen kernel; the
eager tower for the captured CUDA graphs.
"""

from __future__ import annotations

import pytest
import torch
from conftest import IMAGES
from hf_oracle import (
    assert_greedy_matches,
    assert_same_until_a_tie,
    hf_greedy,
    hf_inputs,
    hf_model,
    hf_processor,
    qwen_reference_rope,
    rgb,
)

from glimpse import LLM, SamplingParams, load_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none is visible to torch)")

GPU = "cuda"
IMG = {"type": "image"}


@pytest.fixture(autouse=True)
def _exact_float32():
    """TF32 would round float32 matmuls and convolutions to 10 mantissa bits on either side."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _reference_segments(q, k, v, offsets):
    """Per-segment softmax(q k^T / sqrt(d)) v in float32, written out; rows past the last offset 0."""
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    scale = q.shape[-1] ** -0.5
    for start, end in zip(offsets[:-1], offsets[1:], strict=True):
        if end == start:
            continue
        qs, ks, vs = (t[start:end].float().transpose(0, 1) for t in (q, k, v))  # [H, L, D]
        weights = torch.softmax(qs @ ks.transpose(1, 2) * scale, dim=-1)
        out[start:end] = (weights @ vs).transpose(0, 1)
    return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_varlen_attention_equals_per_segment_softmax(dtype):
    from glimpse.backends.cuda import CudaAttention

    gen = torch.Generator(device=GPU).manual_seed(0)
    rows, heads, dim = 160, 4, 64
    offsets = [0, 5, 5, 37, 100, 131, 131, 131]  # empty segments, a padded tail, rows 131..159 in none
    q, k, v = (torch.randn(rows, heads, dim, generator=gen, device=GPU, dtype=dtype) for _ in range(3))
    cu = torch.tensor(offsets, dtype=torch.int32, device=GPU)
    got = CudaAttention().varlen(q, k, v, cu, max_seqlen=rows)
    ref = _reference_segments(q, k, v, offsets)
    assert got.dtype == dtype and got.shape == q.shape
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # bf16/fp16: inputs and output rounded to 8/11 bits
    torch.testing.assert_close(got.float(), ref, atol=tol, rtol=0)
    assert torch.equal(got[131:], torch.zeros_like(got[131:]))


@pytest.mark.parametrize("family", ["glm4v", "glm4v_moe", "glm_ocr", "qwen2_5_vl"])
def test_float32_model_equals_hf_on_the_gpu(family, tiny_checkpoint):
    """Vision embeddings, logits at every position and 24 greedy tokens, as tests/test_model_parity.py on the CPU."""
    path = tiny_checkpoint(family)
    proc, hf = hf_processor(path), hf_model(path).to(GPU)
    ours = load_model(path, dtype=torch.float32, device=GPU)
    assert ours.device.type == "cuda"
    inputs = hf_inputs(proc, [IMG, {"type": "text", "text": "Describe this image."}], [rgb(IMAGES / "astronaut.png")])
    inputs = {k: v.to(GPU) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    ids = inputs["input_ids"]
    media = {k: inputs[k] for k in ("pixel_values", "image_grid_thw")}
    oracle = qwen_reference_rope(hf) if family == "qwen2_5_vl" else torch.no_grad()
    with torch.no_grad():
        ref = torch.cat(hf.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output)
        got = ours.encode_images(inputs["pixel_values"], inputs["image_grid_thw"])
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
        with oracle:
            ref_logits = hf(**inputs).logits[0]
            ref_tokens, margins = hf_greedy(hf, inputs, 24)
    logits = ours.compute_logits(ids, **media)
    assert logits.device.type == "cuda"
    torch.testing.assert_close(logits, ref_logits, atol=1e-3, rtol=0)
    eos = tuple(ours.glimpse_config.eos_token_ids)

    def generate_from(prefix: list[int], n: int) -> list[int]:
        prompt = torch.cat([ids[0], torch.tensor(prefix, dtype=torch.long, device=GPU)])
        return ours.greedy(prompt, n, eos_token_ids=eos, **media)

    assert_greedy_matches(ref_tokens, margins, generate_from)


def _chats():
    def image(name, size=None):
        im = rgb(IMAGES / name)
        return im.resize(size) if size else im

    def user(*parts):
        return [{"role": "user", "content": list(parts)}]

    img = lambda im: {"type": "image_url", "image_url": {"url": im}}  # noqa: E731
    txt = lambda t: {"type": "text", "text": t}  # noqa: E731
    return [user(img(image("astronaut.png")), txt("Describe this image.")),
            user(txt("Write a haiku about the sea.")),
            user(img(image("chelsea.png", (160, 112))), txt("What animal is this?")),
            user(img(image("rocket.jpg", (96, 200))), txt("and"), img(image("camera.png", (128, 128))),
                 txt("Which is older?")),
            user(txt("Count from one to twenty, in words, separated by commas."))]  # fmt: skip


@pytest.mark.parametrize("family", ["glm4v", "qwen2_5_vl"])
def test_engine_on_the_gpu_equals_hf_generate(family, tiny_checkpoint):
    """Batched, chunked engine on the paged KV cache (torch's SDPA path) == HF generate, token for token."""
    path = tiny_checkpoint(family)
    llm = LLM(path, dtype="float32", max_num_batched_tokens=64, device=GPU)
    assert llm.engine.model.device.type == "cuda" and llm.engine.config.device == GPU
    chats = _chats()
    outs = llm.chat(chats, SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)
    hf = hf_model(path).to(GPU)
    eos = list(llm.engine.eos_token_ids)
    for chat, out in zip(chats, outs, strict=True):
        inputs = dict(llm.processor(chat))
        inputs["mm_token_type_ids"] = llm.engine.model.mm_token_types(inputs["input_ids"][0].to(GPU))[None]
        inputs = {k: v.to(GPU) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        with qwen_reference_rope(hf) if family == "qwen2_5_vl" else torch.no_grad():
            ref, margins = hf_greedy(hf, inputs, 12, eos_token_id=eos)
        got = out.outputs[0].token_ids
        assert_same_until_a_tie(got, ref, margins)


@pytest.mark.parametrize("family", ["glm4v", "qwen2_5_vl"])
def test_encoder_cuda_graphs_equal_the_eager_tower(family, tiny_checkpoint):
    """A bf16 tower captured per budget (--encoder-graph on) gives the eager runner's embeddings for
    every item bit for bit (the same kernels on the same padded rows; seen so on an H200), and each item alone through the model's own encode path agrees
    within bf16 rounding (padding and packing change which rows share a kernel call)."""
    from glimpse.vision.batching import VisionItem
    from glimpse.vision.runner import EncoderRunner

    path = tiny_checkpoint(family)
    model = load_model(path, dtype=torch.bfloat16, device=GPU)
    assert (model.backends.graphs.name, model.backends.vision_attention.name) == ("cuda-graphs", "cuda-flash-varlen")
    proc = hf_processor(path)
    items = []
    for name, size in (("astronaut.png", (224, 224)), ("chelsea.png", (140, 84)), ("rocket.jpg", (84, 196))):
        image = hf_inputs(proc, [IMG], images=[rgb(IMAGES / name).resize(size)])
        items.append(VisionItem("image", image["pixel_values"], tuple(image["image_grid_thw"][0].tolist())))
    graphed = EncoderRunner(model, [64, 128, 256], 256)
    eager = EncoderRunner(model, [64, 128, 256], 256, graph=False)
    assert graphed._graphs and all(type(g).__name__ == "_CudaGraph" for g in graphed._graphs.values())
    for i, (got, ref) in enumerate(zip(graphed.encode(items), eager.encode(items), strict=True)):
        torch.testing.assert_close(got, ref, atol=0, rtol=0, msg=f"item {i}")
        bf16_step = 2**-7 * float(ref.float().abs().max())  # one bf16 rounding step at the largest value
        with torch.inference_mode():
            alone = model.encode_images(items[i].pixel_values.to(GPU, torch.bfloat16),
                                        torch.tensor([items[i].grid_thw], device=GPU))  # fmt: skip
        torch.testing.assert_close(got.float(), alone.float(), atol=4 * bf16_step, rtol=0, msg=f"item {i}")


def test_bfloat16_engine_serves_on_the_gpu(tiny_checkpoint):
    """The engine in bf16 with graphs, caches and continuous batching: every request finishes with its
    token budget, a repeated image hits the caches, and the same greedy request twice gives one answer."""
    path = tiny_checkpoint("glm4v")
    llm = LLM(path, dtype="bfloat16", encoder_graph="on", device=GPU)
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    chats = _chats()
    first = llm.chat(chats, params, use_tqdm=False)
    again = llm.chat(chats[:1], params, use_tqdm=False)[0]
    assert all(len(o.outputs[0].token_ids) == 16 for o in first)
    assert again.num_cached_tokens > 0
    assert again.outputs[0].token_ids == first[0].outputs[0].token_ids


@pytest.mark.parametrize("family", ["glm4v", "qwen2_5_vl"])
def test_decode_cuda_graphs_equal_the_eager_steps(family, tiny_checkpoint):
    """`decode_graph="on"` on a GPU: decode steps replayed from CUDA graphs captured per (batch, context)
    bucket. Reference: the same float32 engine stepping eagerly. Greedy tokens equal, logprobs within float32
    rounding (a captured step attends over its bucket's padded width), no step fell back."""
    from glimpse.engine.decode_graph import CapturedDecodeGraphs

    llm = LLM(tiny_checkpoint(family), dtype="float32", decode_graph="on", max_num_seqs=8, max_model_len=640,
              device=GPU)  # fmt: skip
    graphs = llm.engine.runner.decode_graph
    assert isinstance(graphs, CapturedDecodeGraphs) and len(graphs.buckets) == 12
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=3)
    chats = _chats()
    runner = llm.engine.runner
    runner.decode_graph = None
    eager = llm.chat(chats, params, use_tqdm=False)
    runner.decode_graph = graphs
    captured = llm.chat(chats, params, use_tqdm=False)
    assert graphs.steps > 0 and graphs.fallbacks == 0
    for e, g in zip(eager, captured, strict=True):
        assert g.outputs[0].token_ids == e.outputs[0].token_ids
        for step_e, step_g in zip(e.outputs[0].logprobs, g.outputs[0].logprobs, strict=True):
            assert step_g.logprob == pytest.approx(step_e.logprob, rel=1e-5, abs=1e-4)
