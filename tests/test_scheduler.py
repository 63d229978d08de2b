"""The scheduler on its own (no model): hand-worked schedules of the decode-first policy, preemption,
and the plain-data `SchedulerOutput` it hands the model runner."""

from __future__ import annotations

import pickle

import pytest
import torch

from glimpse.engine.block_manager import BlockManager
from glimpse.engine.encoder_cache import EncoderCacheManager
from glimpse.engine.request import Request
from glimpse.engine.sampling_params import SamplingParams
from glimpse.engine.scheduler import Scheduler, SchedulerConfig


def _request(request_id: str, num_prompt_tokens: int) -> Request:
    ids = [(7 * i + sum(map(ord, request_id))) % 50 for i in range(num_prompt_tokens)]  # no shared prefixes
    return Request(
        request_id, ids, SamplingParams(), (), torch.zeros(3, num_prompt_tokens, dtype=torch.long), 0
    )


def _scheduler(budget: int, prefill: int | None, num_blocks: int = 64, block_size: int = 16) -> Scheduler:
    config = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=budget, max_prefill_tokens=prefill)
    return Scheduler(
        config, BlockManager(num_blocks, block_size), EncoderCacheManager(1 << 20), embedding_bytes_per_token=4
    )


def _step(sched: Scheduler) -> dict[str, int]:
    """One step as the engine runs it: schedule, advance, and give each request that finished its
    prompt (or decoded) one output token."""
    out = sched.schedule()
    sched.update(out)
    for request_id in out.num_scheduled_tokens:
        req = sched.requests[request_id]
        if req.num_computed_tokens == req.num_tokens:
            req.output_token_ids.append(1)
    return out.num_scheduled_tokens


def test_decodes_first_then_prefill_within_its_budget():
    """3 decoding requests + 2 prompts of 100 tokens, budget 64 tokens, prefill budget 32 (worked by hand):
    every decoder gets its token each step; the prompts share 32 prefill tokens per step, the older first,
    and the second is admitted in the step where the first's prompt ends and leaves room."""
    sched = _scheduler(budget=64, prefill=32)
    for name in ("d0", "d1", "d2"):
        sched.add(_request(name, 10))
    assert _step(sched) == {"d0": 10, "d1": 10, "d2": 10}  # admitted: 30 prefill tokens <= 32
    sched.add(_request("p0", 100))
    sched.add(_request("p1", 100))
    dec = {"d0": 1, "d1": 1, "d2": 1}
    assert _step(sched) == dec | {"p0": 32}  # p1 waits: the prefill budget is spent
    assert _step(sched) == dec | {"p0": 32}
    assert _step(sched) == dec | {"p0": 32}  # 96 of p0's 100 prompt tokens
    assert _step(sched) == dec | {"p0": 4, "p1": 28}  # p0's last 4, then 28 of p1
    assert _step(sched) == dec | {"p0": 1, "p1": 32}  # p0 decodes now, in arrival order after d2
    assert _step(sched) == dec | {"p0": 1, "p1": 32}
    assert _step(sched) == dec | {"p0": 1, "p1": 8}
    assert _step(sched) == dec | {"p0": 1, "p1": 1}


def test_without_prefill_budget_prefill_takes_the_rest_of_the_step():
    """No prefill budget: decodes first, then one prompt takes all that is left (64 - 3 = 61)."""
    sched = _scheduler(budget=64, prefill=None)
    for name in ("d0", "d1", "d2"):
        sched.add(_request(name, 10))
    _step(sched)
    sched.add(_request("p0", 100))
    sched.add(_request("p1", 100))
    dec = {"d0": 1, "d1": 1, "d2": 1}
    assert _step(sched) == dec | {"p0": 61}
    assert _step(sched) == dec | {"p0": 39, "p1": 22}


def test_output_is_plain_data_new_once_then_new_blocks_only():
    sched = _scheduler(budget=20, prefill=None, block_size=8)
    sched.add(_request("a", 30))
    first = sched.schedule()
    assert [r.request_id for r in first.new_requests] == ["a"] and not first.cached_requests
    new = first.new_requests[0]
    assert (
        new.block_ids == [0, 1, 2]
        and new.num_computed_tokens == 0
        and new.prompt_token_ids == _request("a", 30).prompt_token_ids
    )
    copy = pickle.loads(pickle.dumps(first))
    assert copy.num_scheduled_tokens == {"a": 20} and copy.new_requests[0].block_ids == [0, 1, 2]
    assert torch.equal(copy.new_requests[0].prompt_positions, new.prompt_positions)
    sched.update(first)
    second = sched.schedule()
    assert not second.new_requests and second.num_scheduled_tokens == {"a": 10}
    (cached,) = second.cached_requests
    assert (cached.request_id, cached.new_block_ids, cached.num_computed_tokens) == ("a", [3], 20)


def test_preemption_takes_the_latest_request_and_it_returns_with_its_whole_block_table():
    """4 blocks of 4 tokens: two 8-token prompts fill them; a's decode token needs a fifth block, so the
    latest arrival (b) is preempted; it comes back, recomputed, once a finishes."""
    sched = _scheduler(budget=64, prefill=None, num_blocks=4, block_size=4)
    a, b = _request("a", 8), _request("b", 8)
    sched.add(a)
    sched.add(b)
    assert _step(sched) == {"a": 8, "b": 8}
    out = sched.schedule()
    assert out.num_scheduled_tokens == {"a": 1} and out.preempted_req_ids == ["b"]
    assert b.num_computed_tokens == 0 and b.num_preemptions == 1 and list(sched.waiting) == [b]
    sched.update(out)
    a.output_token_ids.append(1)
    sched.finish([a])
    out = sched.schedule()
    assert out.finished_req_ids == ["a"] and not out.new_requests  # the runner knows b already
    (cached,) = out.cached_requests
    assert cached.request_id == "b" and cached.new_block_ids == b.block_ids and len(b.block_ids) == 3
    # Freed blocks are reused least recently freed first: a's decode block was b's second (freed first,
    # being the later one), so only b's first block of 4 prompt tokens is still in the prefix cache.
    assert cached.num_computed_tokens == 4 and out.num_scheduled_tokens == {"b": 5}


def test_engine_refuses_a_prefill_budget_below_one(tiny_checkpoint):
    from glimpse.engine.llm_engine import EngineConfig, LLMEngine
    from glimpse.errors import InvalidInputError

    with pytest.raises(
        InvalidInputError, match=r"max_prefill_tokens \(--max-prefill-tokens\) is 0; it must be >= 1"
    ):
        LLMEngine(EngineConfig(tiny_checkpoint("glm46v"), max_prefill_tokens=0))


def test_a_prefill_budget_above_the_step_budget_is_refused_not_clamped():
    # It used to be cut to max_num_batched_tokens without a word (`--max-prefill-tokens 4096` ran at 2048).
    from glimpse.engine.llm_engine import prefill_budget
    from glimpse.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match=r"max_prefill_tokens \(--max-prefill-tokens\) is 4096, above "
                                                r"max_num_batched_tokens \(--max-num-batched-tokens\) 2048"):
        prefill_budget(4096, 2048)
    assert prefill_budget(2048, 2048) == 2048 and prefill_budget(300, 2048) == 300
    # Not given: 2048, within a smaller step budget (as before: the default never needs the other knob raised).
    assert prefill_budget(None, 8192) == 2048 and prefill_budget(None, 512) == 512


def test_engine_refuses_a_prefill_budget_above_the_step_budget_before_loading(tiny_checkpoint, monkeypatch):
    from glimpse.engine import llm_engine
    from glimpse.errors import InvalidInputError

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the flag was refused")

    monkeypatch.setattr(llm_engine, "resolve_model_dtype", no_load)
    with pytest.raises(InvalidInputError, match="above max_num_batched_tokens"):
        llm_engine.LLMEngine(llm_engine.EngineConfig(tiny_checkpoint("glm46v"), max_num_batched_tokens=256,
                                                     max_prefill_tokens=512))  # fmt: skip
