"""Structured output below the server: the spec, the schema checks, the sampler's mask, the reasoning
phases, and the offline engine (`LLM`) on a tiny random-weight checkpoint.

References: `jsonschema` and `re.fullmatch` judge the outputs (random weights: only the constraint
can make them right); hand-worked bitmasks, log-softmaxes and phase sequences for the pieces.
"""

from __future__ import annotations

import json
import math
import re
from concurrent.futures import Future

import jsonschema
import pytest
import torch

from glimpse import LLM, SamplingParams, StructuredOutputsParams
from glimpse.engine.sampler import RequestSamplingState, sample
from glimpse.engine.structured import (
    ConstraintSpec,
    OutputConstraint,
    StructuredLimits,
    check_spec,
    reasoning_start,
)
from glimpse.errors import InvalidInputError

# ---- the spec ----------------------------------------------------------------------------------


def test_exactly_one_constraint_is_set():
    with pytest.raises(InvalidInputError, match="exactly one of .*got none"):
        StructuredOutputsParams()
    with pytest.raises(InvalidInputError, match="got regex, choice"):
        StructuredOutputsParams(regex="a+", choice=["a"])
    with pytest.raises(InvalidInputError, match="choice"):
        StructuredOutputsParams(choice=[])
    with pytest.raises(InvalidInputError, match="JSON"):
        StructuredOutputsParams(json="{not json")
    with pytest.raises(InvalidInputError, match="thinking_token_budget"):
        SamplingParams(thinking_token_budget=-1)


def test_a_schema_as_text_equals_the_same_schema_as_a_dict():
    a = StructuredOutputsParams(json='{"type": "object", "properties": {"x": {"type": "integer"}}}')
    b = StructuredOutputsParams(json={"properties": {"x": {"type": "integer"}}, "type": "object"})
    assert a == b and a.key() == b.key()
    assert a.key() != StructuredOutputsParams(regex='{"type": "object"}').key()
    assert hash(SamplingParams(structured_outputs=a)) == hash(SamplingParams(structured_outputs=b))


# ---- checks before compiling ---------------------------------------------------------------------


@pytest.mark.parametrize("schema, named", [
    ({"type": "object", "properties": {"a": {"not": {"type": "string"}}}}, "'not' (negation) at #/properties/a"),
    ({"allOf": [{"type": "integer"}, {"minimum": 3}]}, "'allOf'"),
    ({"type": "string", "if": {"maxLength": 2}, "then": {"pattern": "a"}}, "'if' (conditionals)"),
    ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "'uniqueItems' at #"),
    ({"type": "string", "format": "iri"}, "'format': 'iri'"),
    ({"type": "number", "multipleOf": 0.5}, "'multipleOf'"),
    ({"type": "object", "dependentRequired": {"a": ["b"]}}, "'dependentRequired'"),
    ({"type": "array", "items": [{"type": "integer"}]}, "'items' as a list"),
    ({"$ref": "https://example.com/schema.json"}, "only references inside the schema"),
])  # fmt: skip
def test_schema_features_the_grammar_would_ignore_are_refused_by_name(schema, named):
    with pytest.raises(InvalidInputError, match="cannot enforce") as err:
        check_spec(StructuredOutputsParams(json=schema), StructuredLimits())
    assert named in str(err.value)


def test_annotations_and_supported_keywords_pass():
    schema = {"title": "t", "description": "d", "$comment": "c", "examples": [{}], "type": "object",
              "properties": {"n": {"type": "integer", "multipleOf": 5, "default": 5, "deprecated": False},
                             "d": {"type": "string", "format": "date"}}}  # fmt: skip
    check_spec(StructuredOutputsParams(json=schema), StructuredLimits())


def test_size_and_depth_limits_name_their_knob():
    deep: dict = {"type": "integer"}
    for _ in range(30):
        deep = {"type": "object", "properties": {"a": deep}}
    with pytest.raises(InvalidInputError, match=r"deeper than 24 levels .*structured_output_max_depth; glimpse serve "
                                                r"--structured-output-max-depth\)"):
        check_spec(StructuredOutputsParams(json=deep), StructuredLimits())
    check_spec(StructuredOutputsParams(json=deep), StructuredLimits(max_depth=31))
    big = {"type": "string", "enum": [f"value {i}" for i in range(10000)]}
    with pytest.raises(InvalidInputError, match=r"bytes, over the limit of 65536 \(structured_output_max_bytes; "
                                                r"glimpse serve --structured-output-max-bytes\)"):
        check_spec(StructuredOutputsParams(json=big), StructuredLimits())
    with pytest.raises(InvalidInputError, match="structured_output_max_bytes"):
        check_spec(StructuredOutputsParams(regex="a" * 100), StructuredLimits(max_bytes=50))


# ---- the sampler's mask ----------------------------------------------------------------------------


def _bits(allowed: list[int], vocab: int) -> torch.Tensor:
    """A bitmask row written by hand: bit t of word t // 32 for each allowed token."""
    words = [0] * ((vocab + 31) // 32)
    for t in allowed:
        words[t // 32] |= 1 << (t % 32)
    return torch.tensor([w - (1 << 32) if w >= 1 << 31 else w for w in words], dtype=torch.int32)


def test_masked_rows_sample_only_allowed_tokens_and_report_logprobs_after_the_mask():
    vocab = 70
    logits = torch.randn(2, vocab, generator=torch.Generator().manual_seed(1))
    allowed = [3, 40, 63]  # word 0, word 1 and bit 31 of word 1 (the sign bit)
    bitmask = torch.stack([_bits(allowed, vocab), _bits([], vocab)])
    params = [SamplingParams(temperature=1.0, logprobs=5), SamplingParams(temperature=1.0, logprobs=1)]
    seen = set()
    for seed in range(60):
        states = [RequestSamplingState([], seed), RequestSamplingState([], seed + 1000)]
        out = sample(logits, params, states, [0], bitmask=bitmask, masked_rows=[0])
        seen.add(out.token_ids[0])
        assert out.token_ids[0] in allowed
    assert seen == set(allowed)  # each allowed token comes up
    # logprobs after the mask: the log-softmax over the three allowed logits, worked by hand
    z = math.log(sum(math.exp(logits[0, t].item()) for t in allowed))
    lp = out.logprobs[0]
    assert lp.logprob == pytest.approx(logits[0, out.token_ids[0]].item() - z, abs=1e-5)
    assert [t for t, _ in lp.top] == sorted(allowed, key=lambda t: -logits[0, t].item())  # no -inf entries
    assert sum(math.exp(v) for _, v in lp.top) == pytest.approx(1.0, abs=1e-5)
    # the unmasked row is untouched: its logprob is over the whole vocabulary
    assert out.logprobs[1].logprob == pytest.approx(torch.log_softmax(logits[1], -1)[out.token_ids[1]].item(), abs=1e-5)


def test_a_masked_row_is_not_held_open_by_min_tokens():
    """min_tokens bans the end-of-sequence ids, but where the grammar allows only them, the grammar wins."""
    logits = torch.zeros(1, 40)
    out = sample(logits, [SamplingParams(temperature=0, min_tokens=5)], [RequestSamplingState()], [7],
                 bitmask=_bits([7], 40)[None], masked_rows=[0])  # fmt: skip
    assert out.token_ids == [7]


# ---- where the answer starts ---------------------------------------------------------------------

OPEN, CLOSE, ASSISTANT, NL = 100, 101, 102, 103


@pytest.mark.parametrize("prompt, where", [
    ([5, ASSISTANT, NL], "opens"),  # GLM's generation prompt: the model writes <think> next
    ([5, ASSISTANT, NL, OPEN, 6], "inside"),  # a template that opened thinking
    ([5, ASSISTANT, NL, OPEN, CLOSE, NL], "none"),  # enable_thinking false: <think></think>
    ([5, ASSISTANT, OPEN, 6, CLOSE, 7, 8, ASSISTANT], "opens"),  # an earlier turn's thinking is history
    ([5, 6, 7], "none"),  # a raw completion prompt
])  # fmt: skip
def test_reasoning_start(prompt, where):
    assert reasoning_start(prompt, OPEN, CLOSE, ASSISTANT, frozenset({NL})) == where
    assert reasoning_start(prompt, None, None, None, frozenset()) == "none"  # a model that does not think


def test_phases_force_think_then_close_at_the_budget_then_follow_the_grammar(tiny_checkpoint):
    """On the factory GLM tokenizer: <think> forced, 3 free thinking tokens without the stop ids, </think> forced,
    then the grammar's own mask; the constraint ends on the grammar's last token."""
    import xgrammar as xgr
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_checkpoint("glm46v"))
    vocab = len(tok)
    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab, stop_token_ids=[eos])
    grammar = xgr.GrammarCompiler(info).compile_regex("(yes|no)")
    think_open, think_close = tok.convert_tokens_to_ids("<think>"), tok.convert_tokens_to_ids("</think>")
    spec = ConstraintSpec(grammar, "opens", think_open, think_close, 3, (eos,))
    c = OutputConstraint(spec)
    row = torch.empty((vocab + 31) // 32, dtype=torch.int32)

    def allowed() -> set[int]:
        assert c.mask_row(row)
        bits = (row[:, None] >> torch.arange(32)) & 1
        return set(torch.nonzero(bits.reshape(-1)[:vocab]).reshape(-1).tolist())

    assert allowed() == {think_open}
    assert not c.accept(think_open)
    word = tok.encode("cat", add_special_tokens=False)[0]
    for _ in range(3):
        free = allowed()
        assert eos not in free and word in free and len(free) == vocab - 1
        assert not c.accept(word)
    assert allowed() == {think_close}
    assert not c.accept(think_close)
    answer = allowed()
    texts = {tok.decode([t]) for t in answer}
    assert answer and all("yes".startswith(t) or "no".startswith(t) for t in texts)
    ids = tok.encode("no", add_special_tokens=False)
    ends = [c.accept(t) for t in ids]
    assert ends[-1] and not any(ends[:-1])  # "no" is complete and nothing may follow: the sequence stops


# ---- the offline engine ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llm(tiny_checkpoint):
    # A small KV cache and token budget: chunked prefill, and preemption (no prefix cache to share prompts).
    return LLM(tiny_checkpoint("glm46v"), dtype="float32", kv_cache_memory="1MiB", max_model_len=1024,
               max_num_batched_tokens=64, max_prefill_tokens=64, enable_prefix_caching=False)  # fmt: skip


SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 12}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b", "c"]}, "minItems": 1, "maxItems": 3}},
    "required": ["name", "age", "tags"]}  # fmt: skip
PROMPT = "Describe the picture as JSON. " * 20  # ~300 tokens: 5 prefill chunks, 19 KV blocks per sequence


def test_offline_schema_regex_and_choice_with_n_logprobs_and_preemption(llm):
    params = [
        SamplingParams(n=3, max_tokens=256, logprobs=2, seed=1, structured_outputs=StructuredOutputsParams(json=SCHEMA)),
        SamplingParams(n=2, max_tokens=64, seed=2, structured_outputs=StructuredOutputsParams(regex=r"[A-Z]{2}-\d{3}")),
        SamplingParams(max_tokens=64, seed=3, structured_outputs=StructuredOutputsParams(choice=["red", "green", "blue"])),
        SamplingParams(max_tokens=256, seed=4, structured_outputs=StructuredOutputsParams(json_object=True)),
    ]  # fmt: skip
    outs = llm.generate([PROMPT] * len(params), params, use_tqdm=False)
    for c in outs[0].outputs:
        jsonschema.validate(json.loads(c.text), SCHEMA)
        assert c.finish_reason == "stop" and c.stop_reason is None
        assert len(c.logprobs) == len(c.token_ids)
        assert all(math.isfinite(e.logprob) and all(math.isfinite(v) for _, v in e.top) for e in c.logprobs)
    for c in outs[1].outputs:
        assert re.fullmatch(r"[A-Z]{2}-\d{3}", c.text) and c.finish_reason == "stop"
    assert outs[2].outputs[0].text in ("red", "green", "blue") and outs[2].outputs[0].finish_reason == "stop"
    assert isinstance(json.loads(outs[3].outputs[0].text), dict) and outs[3].outputs[0].finish_reason == "stop"
    assert sum(o.metrics["num_preemptions"] for o in outs) > 0  # 64 KV blocks for 7 sequences of 19+: preempted


def test_offline_stop_string_and_unconstrained_neighbours(llm):
    """A stop string still ends a constrained output (the user's choice: the text is cut there); an
    unconstrained request in the same batch is unaffected by its neighbour's mask."""
    cut = SamplingParams(max_tokens=64, seed=5, stop=["-"], structured_outputs=StructuredOutputsParams(regex=r"ab-cd"))
    free = SamplingParams(max_tokens=8, seed=6, ignore_eos=True)
    a, b = llm.generate([PROMPT, PROMPT], [cut, free], use_tqdm=False)
    assert a.outputs[0].text == "ab" and a.outputs[0].finish_reason == "stop" and a.outputs[0].stop_reason == "-"
    assert len(b.outputs[0].token_ids) == 8 and b.outputs[0].finish_reason == "length"


def test_offline_refusals(llm):
    with pytest.raises(InvalidInputError, match="'not'"):
        llm.generate(PROMPT, SamplingParams(structured_outputs=StructuredOutputsParams(json={"not": {}})), use_tqdm=False)
    with pytest.raises(InvalidInputError, match="cannot be compiled"):
        llm.generate(PROMPT, SamplingParams(structured_outputs=StructuredOutputsParams(regex="(a")), use_tqdm=False)
    with pytest.raises(InvalidInputError, match="cannot be compiled"):
        llm.generate(PROMPT, SamplingParams(structured_outputs=StructuredOutputsParams(grammar="root ::= ")),
                     use_tqdm=False)  # fmt: skip
    assert not llm.engine.has_unfinished_requests()
    out = llm.generate(PROMPT, SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 4  # still serving


def test_a_compile_past_the_timeout_fails_the_request_and_others_go_on(llm, monkeypatch):
    structured = llm.engine.structured
    never: Future = Future()  # a compile that does not finish
    real_submit = structured.submit
    monkeypatch.setattr(structured, "submit", lambda spec: never if spec.regex == "slow" else real_submit(spec))
    monkeypatch.setattr(structured, "limits", StructuredLimits(compile_timeout=0.2))
    engine = llm.engine
    engine.add_request("slow", PROMPT, SamplingParams(structured_outputs=StructuredOutputsParams(regex="slow")))
    engine.add_request("fine", PROMPT, SamplingParams(max_tokens=3, ignore_eos=True))
    assert engine.waiting_for_grammar("slow") and not engine.waiting_for_grammar("fine")
    events, finished = [], {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
        events += engine.take_grammar_events()
    assert list(finished) == ["fine"]
    [(rid, error)] = events
    assert rid == "slow" and "longer than 0.2 s (structured_output_compile_timeout; glimpse serve " \
        "--structured-output-compile-timeout)" in str(error)


def test_thinking_budget_offline(llm):
    """GLM-4.6V's template ends at the assistant turn: <think> is forced, 5 free tokens, </think>, then the choice."""
    params = SamplingParams(max_tokens=64, seed=7, thinking_token_budget=5,
                            structured_outputs=StructuredOutputsParams(choice=["yes", "no"]))  # fmt: skip
    out = llm.chat([{"role": "user", "content": "Is there a cat?"}], params, use_tqdm=False)[0].outputs[0]
    tok = llm.get_tokenizer()
    ids = out.token_ids
    assert ids[0] == tok.convert_tokens_to_ids("<think>") and ids[6] == tok.convert_tokens_to_ids("</think>")
    assert tok.decode(ids[7:]) in ("yes", "no") and out.finish_reason == "stop"
    # enable_thinking false renders <think></think>: the answer starts at the first token
    out = llm.chat([{"role": "user", "content": "Is there a cat?"}], params, use_tqdm=False,
                   chat_template_kwargs={"enable_thinking": False})[0].outputs[0]  # fmt: skip
    assert out.text in ("yes", "no")


# ---- the cost benchmark ----------------------------------------------------------------------------


def test_bench_structured_warms_up_untimed_and_reports_compile_time_apart(tiny_checkpoint, tmp_path, capsys):
    """`glimpse bench structured`: one warm-up round per side outside the timed rounds (the engine's first batch
    is its slowest), the timed rounds' schemas still new after it, compile time as added TTFT on its own lines.
    Hand-worked: every request decodes exactly --output-len tokens (its schema's array is at least that long)."""
    from glimpse.cli import main

    out = tmp_path / "structured.json"
    assert main(["bench", "structured", "--checkpoint", str(tiny_checkpoint("qwen2_5_vl")), "--batch", "2",
                 "--output-len", "8", "--rounds", "3", "--json", str(out)]) == 0  # fmt: skip
    result = json.loads(out.read_text())
    for side in ("none", "schema"):
        assert [row["round"] for row in result["rows"][side]] == [0, 1, 2]  # the warm-up is not among them
        assert result["warmup"][side]["round"] == -1
        assert all(row["tokens"] == 2 * 8 for row in [*result["rows"][side], result["warmup"][side]])
    assert result["warmup"]["none"]["grammar_s"] == 0 and all(row["grammar_s"] == 0 for row in result["rows"]["none"])
    # the warm-up waited for the grammar engine's first compile (the vocabulary's tables are built then); the later
    # rounds' compile times are on their own line (too short here to assert more than that they are reported)
    assert result["cold_engine_grammar_s"] > 0 and result["first_round_grammar_s"] >= result["cached_grammar_s"] == 0
    text = capsys.readouterr().out
    assert "untimed warm-up round:" in text and "grammar compilation as added TTFT, 2 schemas:" in text
