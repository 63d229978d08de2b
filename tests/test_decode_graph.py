"""The compiled decode step (glimpse/engine/decode_graph.py) against the eager one.

Reference: the same engine's eager steps. The graph calls the same kernels in the same order, so
greedy tokens and every logprob must be equal bit for bit, for one sequence and for a batch (image
chats and text, mixed prefill/decode steps in between), on both decoder layouts (GLM's sandwich
norms and partial rotary; Qwen2.5-VL's plain layers). One graph engine per family per module
(compiling is the slow part: ~15-25 s each with a cold inductor cache on 2 cores).
"""

from __future__ import annotations

import pytest
import torch
from conftest import IMAGES
from PIL import Image

from glimpse import LLM, SamplingParams
from glimpse.engine.decode_graph import CapturedDecodeGraphs, DecodeGraph
from glimpse.engine.kv_cache import AttentionMetadata
from glimpse.errors import InvalidInputError

FAMILIES = ["glm4v", "qwen2_5_vl"]


@pytest.fixture(scope="module")
def engines(native_kernels, tiny_checkpoint):
    """family -> LLM with the decode graph on (bf16, the native kernels)."""
    made = {}

    def get(family: str) -> LLM:
        if family not in made:
            made[family] = LLM(tiny_checkpoint(family), dtype="bfloat16", decode_graph="on", warmup=False)
        return made[family]

    return get


def _requests():
    image = Image.open(IMAGES / sorted(p.name for p in IMAGES.iterdir() if p.suffix == ".jpg")[0]).convert("RGB")
    chats = [[{"role": "user", "content": [{"type": "image", "image": image.resize((112 + 28 * i, 84))},
                                           {"type": "text", "text": f"Describe it, {i}."}]}] for i in range(3)]  # fmt: skip
    return chats + [[{"role": "user", "content": "Count to ten."}]]


def _run(llm: LLM, graph: bool, chats) -> list[tuple[list[int], list]]:
    runner = llm.engine.runner
    saved, runner.decode_graph = runner.decode_graph, (runner.decode_graph if graph else None)
    try:
        params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=3)
        outs = llm.chat(chats, params, use_tqdm=False)
    finally:
        runner.decode_graph = saved
    return [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in outs]


@pytest.mark.parametrize("family", FAMILIES)
def test_graph_steps_give_the_eager_bits(engines, family):
    llm = engines(family)
    graph = llm.engine.runner.decode_graph
    for chats in (_requests()[:1], _requests()):  # one sequence (its own graph), then four
        before = graph.steps
        eager, compiled = _run(llm, False, chats), _run(llm, True, chats)
        assert graph.steps > before and graph.fallbacks == 0
        for (tokens_e, logprobs_e), (tokens_g, logprobs_g) in zip(eager, compiled, strict=True):
            assert tokens_g == tokens_e
            assert logprobs_g == logprobs_e  # every top-3 logprob of every step, exactly


def test_a_shape_the_graphs_refuse_runs_eagerly(engines):
    """A step whose tensors the guards refuse is not compiled on the spot (seconds of stall): the call
    returns None, the runner steps eagerly, nothing was written."""
    llm = engines("glm4v")
    graph = llm.engine.runner.decode_graph
    cache_before = graph.kv_cache.k.clone()
    embeds, positions, *tables = graph._dummy_inputs(2)
    from glimpse.engine.kv_cache import AttentionMetadata

    meta = AttentionMetadata.build(graph.kv_cache.block_size, [[0], [1]], [1, 1], [1, 1])
    fallbacks = graph.fallbacks
    with torch.inference_mode():
        assert graph(embeds.float(), positions, meta) is None  # float32 rows: a dtype the graph was not built for
    assert graph.fallbacks == fallbacks + 1
    assert torch.equal(graph.kv_cache.k, cache_before)


def test_the_graph_is_refused_where_it_cannot_run(native_kernels, tiny_checkpoint):
    path = tiny_checkpoint("glm4v")
    with pytest.raises(InvalidInputError, match=r"decode_graph 'on' \(--decode-graph on\): it runs bf16 models"):
        LLM(path, dtype="float32", decode_graph="on", warmup=False)
    with pytest.raises(InvalidInputError, match=r"decode_graph='sometimes' \(--decode-graph\); use 'on' or 'off'"):
        LLM(path, dtype="bfloat16", decode_graph="sometimes", warmup=False)
    with pytest.raises(InvalidInputError, match=r"--decode-graph on\): this model's decoder does not compile into one "
                       r"graph \(GuardOnDataDependentSymNode: .*\); use --decode-graph off"):  # fmt: skip
        LLM(tiny_checkpoint("glm4v_moe"), dtype="bfloat16", decode_graph="on", warmup=False)  # experts routed by data
    assert DecodeGraph.unsupported(torch.device("cpu"), torch.bfloat16, 2) == "it runs on one rank (tensor_parallel_size > 1)"
    assert DecodeGraph.unsupported(torch.device("cpu"), torch.bfloat16, 1) is None
    # the captured graphs (a GPU's) refuse the MoE decoder before capturing: its layers read expert counts on the host
    from glimpse import load_model

    moe = load_model(tiny_checkpoint("glm4v_moe"))
    assert CapturedDecodeGraphs.check_model(moe) == ("its experts are routed by the data (each layer reads the "
                                                     "per-expert token counts on the host)")  # fmt: skip
    assert CapturedDecodeGraphs.check_model(load_model(path)) == (
        "this platform's graph capture (torch.compile) does not capture decode steps")  # a CPU's graphs: no capture_step


def test_the_command_line_flags_reach_the_engine(tiny_checkpoint):
    """`glimpse serve --decode-graph on` puts it in the engine's config; `glimpse generate` refuses a float32
    engine with the graph in one line, before loading anything."""
    import argparse
    import subprocess
    import sys

    from glimpse.server.cli import add_arguments, build_state

    class Started(Exception):
        pass

    configs = []

    def start(config):
        configs.append(config)
        raise Started

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    path = str(tiny_checkpoint("glm4v"))
    with pytest.raises(Started):
        build_state(parser.parse_args([path, "--decode-graph", "on", "--encoder-graph", "off"]), start)
    assert configs[-1].decode_graph == "on"
    with pytest.raises(Started):
        build_state(parser.parse_args([path, "--encoder-graph", "off"]), start)
    assert configs[-1].decode_graph == "off"  # the default

    done = subprocess.run([sys.executable, "-m", "glimpse.cli", "generate", path, "hello", "--dtype", "float32",
                           "--decode-graph", "on"], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        "glimpse: error: decode_graph 'on' (--decode-graph on): it runs bf16 models on the CPU (this engine: "
        "torch.float32 on cpu); use --decode-graph off")
    assert "Traceback" not in done.stderr


def test_packed_weights_by_handle(native_kernels):
    """The graph reaches oneDNN's packed weights through int handles (a packed tensor among a graph's inputs
    keeps the graph out of inductor's cache): the operator gives oneDNN's eager result bit for bit, and a
    released handle is refused by name."""
    from glimpse import kernels
    from glimpse.backends.onednn_packed import PackedOneDnnLinear, keep_packed_handles, release_packed_handles
    from glimpse.models.layers import Linear

    layer = Linear(96, 40, bias=True).to(torch.bfloat16)
    method = PackedOneDnnLinear()
    method.prepare(layer)
    model = torch.nn.Sequential(layer)
    (handle,) = keep_packed_handles(model)
    assert layer.packed_handle == handle
    x = torch.randn(5, 96, dtype=torch.bfloat16)
    with torch.inference_mode():
        by_handle = kernels.graph_ops().packed_linear(x, handle, 40, layer.bias)
        assert torch.equal(by_handle, method.apply(layer, x))  # the eager call on the packed tensor
        with pytest.raises(RuntimeError, match="packed weight .* has 40 outputs, not 41"):
            kernels.graph_ops().packed_linear(x, handle, 41, layer.bias)
        release_packed_handles([handle])
        with pytest.raises(RuntimeError, match=f"no packed weight has handle {handle}"):
            kernels.graph_ops().packed_linear(x, handle, 40, layer.bias)


# ---- the captured decode graphs (CUDA graphs per bucket), their device-agnostic part on the CPU ----------------


class _EagerCaptured(CapturedDecodeGraphs):
    """`CapturedDecodeGraphs` with a capture that replays by calling the step again: everything the GPU path
    does but the capture itself (static buffers, bucket choice, padding rows writing to the scratch block,
    the fixed-width masked attention), on a float32 CPU engine."""

    @classmethod
    def for_engine(cls, model, kv_cache, max_num_seqs, max_model_len):
        return cls(model, kv_cache, max_num_seqs, max_model_len, capture_step=lambda step, device: step)

    @staticmethod
    def check_model(model):
        return None if hasattr(model.backends.attention, "padded_decode") else "no padded_decode"


@pytest.mark.parametrize("family", FAMILIES)
def test_captured_buckets_give_the_eager_tokens(tiny_checkpoint, monkeypatch, family):
    """Reference: the same float32 engine's eager steps. Three chats and a text (four rows: the batch bucket
    of four, then three, two and one as chats end at different lengths); a long prompt takes a context past
    the first width (256) into the second. Greedy tokens equal, logprobs within float32 rounding (the
    padded attention sums masked zeros too: 1e-6 relative, these tiny models' logprobs reach -60). Then one step by hand in the four-row bucket with three
    sequences: the cache changes in their three new slots and the scratch block, nowhere else."""
    import glimpse.engine.decode_graph as decode_graph

    monkeypatch.setattr(decode_graph, "decode_graph_class", lambda device: _EagerCaptured)
    llm = LLM(tiny_checkpoint(family), dtype="float32", decode_graph="on", warmup=False, max_num_seqs=8,
              max_model_len=640, kv_cache_memory="64MiB")  # fmt: skip
    graphs = llm.engine.runner.decode_graph
    assert isinstance(graphs, _EagerCaptured)
    assert graphs.batches == [1, 2, 4, 8] and graphs.widths == [256, 512, 640]
    assert sorted(graphs.buckets) == [(b, w) for b in (1, 2, 4, 8) for w in (256, 512, 640)]
    cache = llm.engine.kv_cache
    assert cache.k.shape[1] == llm.engine.blocks.num_blocks + 1  # the scratch block, past the ones handed out
    assert cache.scratch_slot == llm.engine.blocks.num_blocks * cache.block_size

    long_text = " ".join(["seven"] * 260)
    chats = _requests() + [[{"role": "user", "content": long_text}]]
    params = [SamplingParams(temperature=0.0, max_tokens=6 + 3 * i, ignore_eos=True, logprobs=3) for i in range(len(chats))]

    def run(graph: bool):
        runner = llm.engine.runner
        saved, runner.decode_graph = runner.decode_graph, (runner.decode_graph if graph else None)
        try:
            outs = llm.chat(chats, params, use_tqdm=False)
        finally:
            runner.decode_graph = saved
        return [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in outs]

    eager = run(False)
    steps = graphs.steps
    captured = run(True)
    assert graphs.steps > steps and graphs.fallbacks == 0
    for (tokens_e, logprobs_e), (tokens_g, logprobs_g) in zip(eager, captured, strict=True):
        assert tokens_g == tokens_e
        for step_e, step_g in zip(logprobs_e, logprobs_g, strict=True):
            assert step_g.logprob == pytest.approx(step_e.logprob, rel=1e-6, abs=1e-5)
            assert [t for t, _ in step_g.top] == [t for t, _ in step_e.top]
            assert [p for _, p in step_g.top] == pytest.approx([p for _, p in step_e.top], rel=1e-6, abs=1e-5)

    # one step by hand: three sequences of 5, 20 and 300 tokens (blocks 0, 1-2, 3-21), the fourth row padding
    lens = [5, 20, 300]
    tables, first = [], 0
    for n in lens:
        blocks = -(-n // cache.block_size)
        tables.append(list(range(first, first + blocks)))
        first += blocks
    meta = AttentionMetadata.build(cache.block_size, tables, [n - 1 for n in lens], [1, 1, 1])
    hidden = llm.engine.model_config.hf_config.get_text_config().hidden_size
    before_k, before_v = cache.k.clone(), cache.v.clone()
    with torch.inference_mode():
        out = graphs(torch.randn(3, hidden), (torch.tensor(lens) - 1).expand(3, -1), meta)
    assert out.shape == (3, hidden) and graphs.bucket_for(3, 300) == (4, 512)
    changed = ((cache.k != before_k) | (cache.v != before_v)).flatten(3).any(-1).any(0).flatten().nonzero().flatten()
    scratch = set(range(cache.scratch_slot, cache.scratch_slot + cache.block_size))
    assert set(changed.tolist()) - scratch == set(meta.slot_mapping.tolist())
    assert set(changed.tolist()) & scratch  # the padding row wrote there


def test_a_capture_that_fails_is_refused_in_its_own_words(tiny_checkpoint, monkeypatch):
    """A GPU's captured graphs that fail to capture refuse the engine naming what failed (a capture per bucket,
    not the CPU graph's compilation) and the knob that turns them off."""
    import glimpse.engine.decode_graph as decode_graph

    class FailingCapture(_EagerCaptured):
        @classmethod
        def for_engine(cls, model, kv_cache, max_num_seqs, max_model_len):
            def capture_step(step, device):
                raise RuntimeError("operation not permitted when stream is capturing")

            return cls(model, kv_cache, max_num_seqs, max_model_len, capture_step=capture_step)

    monkeypatch.setattr(decode_graph, "decode_graph_class", lambda device: FailingCapture)
    with pytest.raises(InvalidInputError, match=r"--decode-graph on\): this model's decoder does not capture into a "
                       r"graph per batch and context bucket \(RuntimeError: operation not permitted when stream is "
                       r"capturing\); use --decode-graph off"):  # fmt: skip
        LLM(tiny_checkpoint("glm4v"), dtype="float32", decode_graph="on", warmup=False, max_num_seqs=2,
            max_model_len=256, kv_cache_memory="16MiB")  # fmt: skip
