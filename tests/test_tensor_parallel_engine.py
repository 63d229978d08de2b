"""Tensor parallelism through the engine: `LLM(..., tensor_parallel_size=2)` starts a worker process for
rank 1 and runs every step on both ranks (gloo, this machine). Against the same engine in one process,
float32: identical greedy tokens and sampled-token logprobs within float32 noise, for batched requests
with images, a video and text only, with chunked prefill (prompts longer than a step's token budget)
and prefix caching; every layout, each through the engine once, with the vision tower split by heads or
data-parallel and (MoE) expert parallel; structured output unchanged. The served path: `glimpse serve
--tensor-parallel-size 2` answers, and a rank killed with SIGKILL turns in-flight and later requests
and /health into 503s within 5 s.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
from conftest import IMAGES, VIDEOS
from test_server import MODEL, ServerProcess

from glimpse import LLM, SamplingParams, StructuredOutputsParams
from glimpse.errors import InvalidInputError

# each layout once through the engine, with the encoder mode (or expert parallelism) it is run with
LAYOUTS = [
    ("glm4v", {"mm_encoder_tp_mode": "weights"}),
    ("glm46v", {"mm_encoder_tp_mode": "data"}),
    ("glmga", {"mm_encoder_tp_mode": "weights"}),
    ("glm4v_moe", {"enable_expert_parallel": True}),
    ("glm46v_moe", {"mm_encoder_tp_mode": "data"}),
    ("glm_ocr", {"mm_encoder_tp_mode": "weights"}),
    ("qwen2_5_vl", {"mm_encoder_tp_mode": "data"}),
]
SCHEMA = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"], "additionalProperties": False}


def _conversations() -> list[list[dict]]:
    def user(*parts):
        return [{"role": "user", "content": list(parts)}]

    def image(name):
        return {"type": "image_url", "image_url": {"url": str(IMAGES / name)}}

    video = {"type": "video_url", "video_url": {"url": str(VIDEOS / "coffee_15frames_10fps.webm")}}
    text = {"type": "text", "text": "Describe it."}
    return [user(image("chelsea.png"), text), user(image("rocket.jpg"), image("astronaut.png"), text),
            user(video, text), user({"type": "text", "text": "Count to three."}),
            user(image("chelsea.png"), text)]  # fmt: skip   (the last repeats the first: a prefix-cache hit)


def _generate(path, options: dict, structured: bool) -> list:
    # 64 tokens per step: every media prompt is prefilled in several chunks
    llm = LLM(path, dtype="float32", max_num_batched_tokens=64, max_prefill_tokens=64, max_num_seqs=8, **options)
    try:
        greedy = SamplingParams(temperature=0, max_tokens=8, logprobs=2)
        outs = llm.chat(_conversations(), greedy, use_tqdm=False)
        result = [(o.outputs[0].token_ids, [lp.logprob for lp in o.outputs[0].logprobs]) for o in outs]
        if structured:
            params = SamplingParams(temperature=0, max_tokens=40,
                                    structured_outputs=StructuredOutputsParams(json=SCHEMA))  # fmt: skip
            out = llm.chat([{"role": "user", "content": "A number, as JSON."}], params, use_tqdm=False)[0]
            result.append((out.outputs[0].token_ids, out.outputs[0].text, out.outputs[0].finish_reason))
        return result
    finally:
        llm.close()


@pytest.mark.parametrize(("family", "options"), LAYOUTS, ids=[f for f, _ in LAYOUTS])
def test_engine_on_two_ranks_matches_one_process(family, options, tiny_checkpoint):
    path = tiny_checkpoint(family)
    structured = family == "qwen2_5_vl"  # (no reasoning section to wait for)
    one = _generate(path, {}, structured)
    two = _generate(path, {"tensor_parallel_size": 2, **options}, structured)
    for i, ((tokens1, lps1), (tokens2, lps2)) in enumerate(zip(one[:5], two[:5], strict=True)):
        assert tokens2 == tokens1, f"request {i}"
        assert max(abs(a - b) for a, b in zip(lps1, lps2, strict=True)) <= 1e-4, f"request {i}: {lps1} vs {lps2}"
    if structured:  # the constraint is the driver's alone (the workers do not sample): the same JSON either way
        assert two[5] == one[5]
        assert two[5][1].startswith('{"n": ')


def test_bad_parallel_options_are_named(tiny_checkpoint):
    path = tiny_checkpoint("glm4v")  # text: 4 heads, 2 KV heads; vision: 2 heads
    with pytest.raises(InvalidInputError, match="tensor_parallel_size"):
        LLM(path, tensor_parallel_size=0)
    with pytest.raises(InvalidInputError, match="mm_encoder_tp_mode"):
        LLM(path, tensor_parallel_size=2, mm_encoder_tp_mode="heads")
    with pytest.raises(InvalidInputError, match=r"vision_config.num_heads is 2, not divisible by tensor_parallel_size "
                                                r"\(--tensor-parallel-size\) 3; choose a size that divides it or "
                                                "--mm-encoder-tp-mode data"):  # fmt: skip
        LLM(path, tensor_parallel_size=3)
    with pytest.raises(InvalidInputError, match=r"num_attention_heads is 4, not divisible by tensor_parallel_size"):
        LLM(path, tensor_parallel_size=3, mm_encoder_tp_mode="data")
    with pytest.raises(InvalidInputError, match="encoder_graph 'on'"):
        LLM(path, tensor_parallel_size=2, encoder_graph="on")


def test_cli_refuses_bad_parallel_flags(tiny_checkpoint):
    for flags, needle in ((["--tensor-parallel-size", "0"], "--tensor-parallel-size"),
                          (["--mm-encoder-tp-mode", "heads"], "--mm-encoder-tp-mode")):  # fmt: skip
        run = subprocess.run([sys.executable, "-m", "glimpse.cli", "generate", str(tiny_checkpoint("glm4v")), "hi", *flags],
                             capture_output=True, text=True, timeout=120)  # fmt: skip
        assert run.returncode == 2 and needle in run.stderr and "Traceback" not in run.stderr, run.stderr


def _spawned_children(pid: int) -> list[int]:
    """Processes that multiprocessing spawned under `pid` (from /proc)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid == pid and "spawn_main" in _cmdline(int(entry)):
                out.append(int(entry))
    return out


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def test_served_with_two_ranks_and_a_rank_killed(tiny_checkpoint):
    server = ServerProcess(tiny_checkpoint("glm4v"), "--tensor-parallel-size", "2", "--dtype", "float32")
    try:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0}
        ok = server.post("/v1/chat/completions", body)
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 4

        # the engine core is the server's child, and rank 1 the core's
        (core,) = _spawned_children(server.proc.pid)
        (rank1,) = _spawned_children(core)
        in_flight: dict = {}
        long_body = {**body, "max_tokens": 2000, "ignore_eos": True}
        thread = threading.Thread(target=lambda: in_flight.update(r=server.post("/v1/chat/completions", long_body)))
        thread.start()
        time.sleep(1.0)
        os.kill(rank1, signal.SIGKILL)
        killed = time.monotonic()
        thread.join(timeout=30)
        assert not thread.is_alive()
        assert time.monotonic() - killed <= 5.0
        assert in_flight["r"].status_code == 503, in_flight["r"].text
        assert "rank 1" in in_flight["r"].json()["error"]["message"]
        assert httpx.get(server.base + "/health", timeout=5).status_code == 503
        again = server.post("/v1/chat/completions", body, timeout=10)
        assert again.status_code == 503 and again.json()["error"]["code"] == "engine_dead"
    finally:
        server.stop()


def test_a_rank_that_cannot_start_is_named_not_waited_for(tiny_checkpoint, tmp_path):
    """The common mistake: a script that makes a tensor-parallel LLM without the main guard. Its spawned rank
    re-imports the script and dies at once; the driver names that (and the fix) instead of waiting."""
    script = tmp_path / "no_guard.py"
    script.write_text(f"from glimpse import LLM\nLLM({str(tiny_checkpoint('glm4v'))!r}, tensor_parallel_size=2)\n")
    started = time.monotonic()
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=240)
    assert run.returncode != 0
    assert "tensor-parallel rank 1 exited while starting" in run.stderr and "__main__" in run.stderr, run.stderr[-2000:]
    assert time.monotonic() - started < 120


def test_engine_start_failure_leaves_no_rank_behind(tiny_checkpoint):
    """A start that fails after the ranks are up (a KV cache too small for max_model_len) stops them, and the
    next tensor-parallel engine of this process starts."""
    import torch.distributed as dist

    path = tiny_checkpoint("glm4v")
    with pytest.raises(InvalidInputError, match="kv_cache_memory"):
        LLM(path, tensor_parallel_size=2, kv_cache_memory="64KiB", max_model_len=4096)
    assert not dist.is_initialized()
    with LLM(path, tensor_parallel_size=2) as llm:
        assert len(llm.generate("hi", SamplingParams(max_tokens=2), use_tqdm=False)[0].outputs[0].token_ids) == 2


def test_four_ranks_through_the_engine(tiny_checkpoint):
    """Three workers get every step (one message pickled for all of them, tensors by value): the same greedy
    tokens as one process, 2 KV heads over 4 ranks, media split between the ranks."""
    path = tiny_checkpoint("glm4v")
    conversations = _conversations()[:3]
    params = SamplingParams(temperature=0, max_tokens=6)
    with LLM(path, dtype="float32") as llm:
        one = [o.outputs[0].token_ids for o in llm.chat(conversations, params, use_tqdm=False)]
    with LLM(path, dtype="float32", tensor_parallel_size=4, mm_encoder_tp_mode="data") as llm:
        four = [o.outputs[0].token_ids for o in llm.chat(conversations, params, use_tqdm=False)]
    assert four == one
