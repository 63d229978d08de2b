"""Per-step outputs of an `n > 1` request: a step reports only the sequences it advanced, so its
output work grows with them and not with n; the final output carries all n completions; the
streamed deltas add up to it; the server's stream formats report each choice's finish once."""

from __future__ import annotations

from collections import Counter, defaultdict

import pytest

from glimpse.engine import llm_engine
from glimpse.engine.detokenizer import IncrementalDetokenizer
from glimpse.engine.llm_engine import EngineConfig, LLMEngine
from glimpse.engine.sampling_params import SamplingParams
from glimpse.server.protocol import (
    ChatCompletionRequest,
    ChatFormat,
    CompletionFormat,
    CompletionRequest,
    TokenText,
)

MAX_NUM_SEQS = 4
BUDGET = 16  # tokens per step: a prompt of more than 16 tokens takes several prefill steps
PROMPT = "Count the cats and dogs on the long table by the window, then tell me how many there are in all."


@pytest.fixture(scope="module")
def engine(tiny_checkpoint) -> LLMEngine:
    return LLMEngine(EngineConfig(model=tiny_checkpoint("glm46v"), dtype="float32", max_num_seqs=MAX_NUM_SEQS,
                                  max_num_batched_tokens=BUDGET))  # fmt: skip


def _run(engine: LLMEngine, request_id: str, params: SamplingParams, monkeypatch) -> list[dict]:
    """Step one request to the end; per step: its RequestOutput (or None), and the CompletionOutputs
    built and detokenizer deltas taken during that step (the per-sequence output work)."""
    work = Counter()

    class CountedCompletion(llm_engine.CompletionOutput):
        def __init__(self, *args, **kwargs) -> None:
            work["built"] += 1
            super().__init__(*args, **kwargs)

    delta = IncrementalDetokenizer.delta

    def counted_delta(self, finished: bool) -> str:
        work["deltas"] += 1
        return delta(self, finished)

    monkeypatch.setattr(llm_engine, "CompletionOutput", CountedCompletion)
    monkeypatch.setattr(IncrementalDetokenizer, "delta", counted_delta)
    prompt = engine.tokenizer.encode(PROMPT, add_special_tokens=False)
    assert len(prompt) > BUDGET
    engine.add_request(request_id, prompt, params)
    steps = []
    while engine.has_unfinished_requests():
        work.clear()
        outs = [o for o in engine.step() if o.request_id == request_id]
        assert len(outs) <= 1
        steps.append({"out": outs[0] if outs else None, "built": work["built"], "deltas": work["deltas"]})
    monkeypatch.undo()
    return steps


def _params(n: int, max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(n=n, max_tokens=max_tokens, temperature=1.0, seed=3, ignore_eos=True, **kw)


def test_a_step_reports_only_the_sequences_it_advanced(engine, monkeypatch):
    n, max_tokens = 16, 3
    steps = _run(engine, "adv", _params(n, max_tokens), monkeypatch)
    final = steps[-1]["out"]
    assert final.finished and [c.index for c in final.outputs] == list(range(n))
    assert all(len(c.token_ids) == max_tokens and c.finish_reason == "length" for c in final.outputs)
    # The prompt is longer than a step's budget: the first step only prefills and reports nothing.
    assert steps[0]["out"] is None and steps[0]["built"] == steps[0]["deltas"] == 0
    for s in steps[:-1]:
        entries = s["out"].outputs if s["out"] is not None else []
        assert not (s["out"] is not None and s["out"].finished)
        # At most max_num_seqs sequences run in a step, each samples at most one token.
        assert len(entries) <= MAX_NUM_SEQS
        assert all(len(c.delta_token_ids) == 1 for c in entries)
        assert len({c.index for c in entries}) == len(entries)
        assert s["built"] == s["deltas"] == len(entries)
    # The streamed deltas of each index add up to its final completion; every token is reported once.
    tokens, text = defaultdict(list), defaultdict(str)
    for s in steps:
        for c in s["out"].outputs if s["out"] is not None else []:
            tokens[c.index] += c.delta_token_ids
            text[c.index] += c.delta_text
    for c in final.outputs:
        assert tokens[c.index] == c.token_ids and text[c.index] == c.text


def test_output_work_grows_linearly_with_n(engine, monkeypatch):
    max_tokens, built = 2, {}
    for n in (16, 32):
        steps = _run(engine, f"lin{n}", _params(n, max_tokens), monkeypatch)
        built[n] = sum(s["built"] for s in steps)
        deltas = sum(s["deltas"] for s in steps)
        assert built[n] == deltas
        # By hand: each of the n * max_tokens tokens is reported once, by one entry, and the final
        # output lists all n again, less those whose last token the final step itself reported.
        assert n * max_tokens + n - MAX_NUM_SEQS <= built[n] <= n * (max_tokens + 1)
    assert built[32] <= 2 * built[16] + MAX_NUM_SEQS  # twice the sequences, twice the work (not 4x)


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_stream_reports_each_finish_once(engine, monkeypatch, endpoint):
    """Choices 0-3 finish steps before 4-7 (max_num_seqs 4): each finish is sent once, and each
    choice's streamed text and logprobs equal its final completion."""
    n, max_tokens = 8, 3
    steps = _run(engine, f"fmt-{endpoint}", _params(n, max_tokens, logprobs=1), monkeypatch)
    outs = [s["out"] for s in steps if s["out"] is not None]
    final = outs[-1]
    finished_at = {c.index: i for i, o in enumerate(outs) for c in o.outputs if c.finish_reason and c.delta_token_ids}
    assert max(finished_at[i] for i in range(4)) < min(finished_at[i] for i in range(4, 8))
    text_of = TokenText(engine.tokenizer)
    body = {"n": n, "stream": True, "logprobs": 1 if endpoint == "completions" else True}
    if endpoint == "chat":
        fmt = ChatFormat(ChatCompletionRequest.model_validate(body | {"messages": [{"role": "user", "content": "x"}]}),
                         "m", text_of, reasoning=False)  # fmt: skip
    else:
        fmt = CompletionFormat(CompletionRequest.model_validate(body | {"prompt": "x"}), "m", text_of)
    finishes, text, logprobs = Counter(), defaultdict(str), defaultdict(list)
    for o in outs:
        for event in fmt.step(o):
            for ch in event["choices"]:
                i = ch["index"]
                finishes[i] += ch["finish_reason"] is not None
                if endpoint == "chat":
                    text[i] += ch["delta"].get("content", "")
                    logprobs[i] += [e["logprob"] for e in (ch["logprobs"] or {}).get("content", [])]
                else:
                    text[i] += ch["text"]
                    logprobs[i] += (ch["logprobs"] or {}).get("token_logprobs", [])
    assert finishes == {i: 1 for i in range(n)}
    for c in final.outputs:
        assert text[c.index] == c.text
        assert logprobs[c.index] == [e.logprob for e in c.logprobs]


def test_final_only_requests_report_once_with_the_same_result(engine, monkeypatch):
    """`final_only` (what `LLM.generate` asks for): no output and no completion built until the request
    finishes, then one output equal to the streamed request's last one (same seed, so the same tokens),
    while a streamed request beside it keeps its per-step outputs."""
    params = SamplingParams(n=2, max_tokens=6, temperature=0.8, seed=7, ignore_eos=True)
    streamed = _run(engine, "streamed", params, monkeypatch)
    assert sum(s["out"] is not None for s in streamed) > 1

    built = Counter()

    class CountedCompletion(llm_engine.CompletionOutput):
        def __init__(self, *args, **kwargs) -> None:
            built["n"] += 1
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(llm_engine, "CompletionOutput", CountedCompletion)
    prompt = engine.tokenizer.encode(PROMPT, add_special_tokens=False)
    engine.add_request("final", prompt, params, final_only=True)
    engine.add_request("beside", prompt, SamplingParams(max_tokens=3, ignore_eos=True))
    seen: dict[str, list] = defaultdict(list)
    while engine.has_unfinished_requests():
        for out in engine.step():
            seen[out.request_id].append(out)
    assert [o.finished for o in seen["final"]] == [True]
    assert len(seen["beside"]) == 3  # one output per token
    assert built["n"] == 2 + 3  # the final request's two completions, once; the other's three outputs
    final, last = seen["final"][0], streamed[-1]["out"]
    assert [(c.token_ids, c.text, c.finish_reason) for c in final.outputs] == [
        (c.token_ids, c.text, c.finish_reason) for c in last.outputs
    ]
    assert [c.delta_token_ids for c in final.outputs] == [c.token_ids for c in final.outputs]
