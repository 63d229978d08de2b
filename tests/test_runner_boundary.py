"""The scheduler -> model runner boundary is plain data: a `ModelRunner` in a spawned process that
receives nothing but the pickled `SchedulerOutput`s of an engine run samples exactly the engine's tokens."""

from __future__ import annotations

import multiprocessing
import pickle
from concurrent.futures import ProcessPoolExecutor

import torch
from conftest import IMAGES
from PIL import Image

from glimpse.engine.sampling_params import SamplingParams
from glimpse.llm import LLM


def _replay(setup: dict, steps: list[bytes]) -> list[tuple[list[str], list[int], list]]:
    """In the child: a fresh runner on its own KV cache and encoder cache, fed the pickled outputs."""
    from glimpse.engine.encoder_cache import EncoderCache
    from glimpse.engine.kv_cache import PagedKVCache
    from glimpse.engine.model_runner import ModelRunner
    from glimpse.loader import load_model

    torch.set_num_threads(setup["threads"])  # the same float32 sums as the parent's
    model = load_model(setup["model"], dtype=torch.float32)
    runner = ModelRunner(
        model, PagedKVCache(*setup["kv_cache"]), EncoderCache(), None, setup["eos"], setup["seed"]
    )
    results = []
    for blob in steps:
        out = runner.execute(pickle.loads(blob))
        results.append((out.req_ids, out.sampled_token_ids, out.logprobs))
    assert not runner.requests, "the finished ids reached the runner: it holds no request's state"
    return results


def test_runner_in_a_subprocess_samples_the_engine_tokens(tiny_checkpoint):
    path = tiny_checkpoint("glm46v")
    llm = LLM(path, dtype="float32", max_num_batched_tokens=24, seed=7)
    engine = llm.engine
    steps: list[bytes] = []
    results = []
    execute = engine.runner.execute

    def recording(sched):
        steps.append(pickle.dumps(sched))
        out = execute(sched)
        results.append((out.req_ids, out.sampled_token_ids, out.logprobs))
        return out

    engine.runner.execute = recording
    image = {"type": "image_url", "image_url": {"url": Image.open(IMAGES / "chelsea.png").convert("RGB")}}
    convs = [
        [
            {
                "role": "user",
                "content": [{"type": "text", "text": "Tell me about the rocket launch in many words."}],
            }
        ],
        [{"role": "user", "content": [image, {"type": "text", "text": "What animal is this?"}]}],
        [{"role": "user", "content": [image, {"type": "text", "text": "Describe it."}]}],
    ]
    params = [SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
              SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=8, ignore_eos=True, logprobs=2),
              SamplingParams(temperature=0.8, max_tokens=8, ignore_eos=True)]  # fmt: skip
    outputs = llm.chat(convs, params, use_tqdm=False)

    # The run exercised what the boundary must carry: a prefill chunk that ends inside the image.
    spans: dict[str, list[tuple[int, int]]] = {}
    inside_image = False
    for blob in steps:
        sched = pickle.loads(blob)
        starts = {r.request_id: r.num_computed_tokens for r in [*sched.new_requests, *sched.cached_requests]}
        for new in sched.new_requests:
            spans[new.request_id] = [(m.start, m.end) for m in new.media]
        for request_id, n in sched.num_scheduled_tokens.items():
            end = starts[request_id] + n
            inside_image |= any(a < end < b for a, b in spans[request_id])
    assert inside_image and len(steps) > 5

    ctx = multiprocessing.get_context("spawn")
    setup = {"model": str(path), "kv_cache": (*engine.kv_cache.k.shape, torch.float32),
             "eos": engine.eos_token_ids, "seed": 7, "threads": torch.get_num_threads()}  # fmt: skip
    with ProcessPoolExecutor(1, mp_context=ctx) as pool:
        replayed = pool.submit(_replay, setup, steps).result(timeout=600)
    assert replayed == results  # every step: same requests sampled, same tokens, same logprobs

    sampled: dict[str, list[int]] = {}
    for req_ids, tokens, _ in replayed:
        for request_id, token in zip(req_ids, tokens, strict=True):
            sampled.setdefault(request_id, []).append(token)
    assert [sampled[o.request_id] for o in outputs] == [o.outputs[0].token_ids for o in outputs]
    assert all(len(o.outputs[0].token_ids) == 8 for o in outputs)
