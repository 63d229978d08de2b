"""Structured output below the server: the spec, the schema checks, the sampler's mask, the reasoning
phases, and the offline engine (`LLM`) on a tiny random-weight checkpoint.

References: `jsonschema` and `re.fullmatch` judge the outputs (random weights: only the constraint
can make them right); hand-worked bitmasks, log-softmaxes and phase sequences for the pieces.
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
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
    StructuredOutputs,
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
    # xgrammar drops a required name it has no property for: {} would pass
    ({"type": "object", "required": ["a"], "additionalProperties": {"type": "integer"}},
     "'required' name 'a' not under 'properties' at #"),
    # only a raw newline matches, which a JSON string cannot hold
    ({"type": "object", "properties": {"a": {"type": "string", "pattern": "^\\n$"}}, "required": ["a"]},
     "'pattern' matching a control character (below U+0020) at #/properties/a"),
])  # fmt: skip
def test_schema_features_the_grammar_would_ignore_are_refused_by_name(schema, named):
    with pytest.raises(InvalidInputError, match="cannot enforce") as err:
        check_spec(StructuredOutputsParams(json=schema), StructuredLimits())
    assert named in str(err.value)


def test_a_structural_tags_schemas_get_the_same_checks():
    tag = {"type": "structural_tag", "format": {"type": "tag", "begin": "<f>", "end": "</f>", "content": {
        "type": "json_schema", "json_schema": {"type": "object", "properties": {"x": {"type": "string", "format": "iri"}},
                                               "required": ["x", "y"]}}}}  # fmt: skip
    with pytest.raises(InvalidInputError, match="cannot enforce") as err:
        check_spec(StructuredOutputsParams(structural_tag=json.dumps(tag)), StructuredLimits())
    assert "'format': 'iri' at #/format/content/json_schema/properties/x" in str(err.value)
    assert "'required' name 'y' not under 'properties' at #/format/content/json_schema" in str(err.value)
    legacy = {"structures": [{"begin": "<f>", "schema": {"not": {}}, "end": "</f>"}], "triggers": ["<f>"]}
    with pytest.raises(InvalidInputError, match="'not' .* at #/structures/0/schema"):
        check_spec(StructuredOutputsParams(structural_tag=json.dumps(legacy)), StructuredLimits())


def test_patterns_with_control_characters_outside_classes_only_are_refused():
    for pattern in ("a\\tb", "\\x0a", "\\u0009", "x\ny"):
        with pytest.raises(InvalidInputError, match="control character"):
            check_spec(StructuredOutputsParams(json={"type": "string", "pattern": pattern}), StructuredLimits())
    for pattern in ("^[^\\n]*$", "[\\s\\S]+", "\\\\n", "\\x41", "^\\d+$"):  # other characters serve
        check_spec(StructuredOutputsParams(json={"type": "string", "pattern": pattern}), StructuredLimits())


def test_a_schema_text_nested_past_pythons_parser_is_a_users_error():
    with pytest.raises(InvalidInputError, match="nests too deeply"):
        StructuredOutputsParams(json="[" * 5000)
    deep: list = []
    for _ in range(5000):
        deep = [deep]
    with pytest.raises(InvalidInputError, match="structured_output_max_depth"):
        check_spec(StructuredOutputsParams(json={"enum": deep}), StructuredLimits())


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


def test_a_choice_beyond_the_basic_plane_is_matched(llm):
    """Emoji are beyond U+FFFF: escaped as surrogate pairs they would be two invalid code points in the grammar."""
    params = SamplingParams(max_tokens=32, seed=8, structured_outputs=StructuredOutputsParams(choice=["😀", "🐈 cat"]))
    out = llm.generate(PROMPT, params, use_tqdm=False)[0].outputs[0]
    assert out.text in ("😀", "🐈 cat") and out.finish_reason == "stop"


def test_a_constraint_that_allows_no_token_ends_the_request_without_a_stray_token(llm, monkeypatch):
    """A pattern only a raw newline matches (refused up front; the check is bypassed here to reach the runtime
    guard): after '{"a": "' the grammar allows only a raw newline, the JSON mask forbids it. The request ends
    there, finish_reason abort, with finite logprobs, rather than sample from all -inf (token 0, NaN)."""
    import glimpse.engine.structured as structured

    monkeypatch.setattr(structured, "check_spec", lambda spec, limits: None)
    schema = {"type": "object", "properties": {"a": {"type": "string", "pattern": "^\\n$"}}, "required": ["a"]}
    params = SamplingParams(n=2, max_tokens=64, seed=9, logprobs=2,
                            structured_outputs=StructuredOutputsParams(json=schema))  # fmt: skip
    for c in llm.generate(PROMPT, params, use_tqdm=False)[0].outputs:
        assert c.text == '{"a": "' and c.finish_reason == "abort"
        assert len(c.logprobs) == len(c.token_ids)
        assert all(math.isfinite(e.logprob) and all(math.isfinite(v) for _, v in e.top) for e in c.logprobs)
    assert not llm.engine.has_unfinished_requests()


def _blocking_compiles(monkeypatch, structured, started: list, gate: threading.Event) -> None:
    def compile_(spec):
        started.append(spec.regex)
        gate.wait(30)
        return None

    monkeypatch.setattr(structured, "_compile", compile_)


def test_abandoned_compiles_are_cancelled_and_the_queue_is_bounded(monkeypatch):
    """Two workers: a and b run, c queues. When the last request waiting for c gives up, c never starts; a
    running compile cannot stop, but it leaves the cache (the next equal spec compiles afresh). Past
    max_pending compiles queued or running, a new spec is refused naming the limit."""
    structured = StructuredOutputs(None, 64, [0], StructuredLimits(), thinking_family=False, max_pending=3)
    started: list = []
    gate = threading.Event()
    _blocking_compiles(monkeypatch, structured, started, gate)
    spec = {name: StructuredOutputsParams(regex=name) for name in "abcd"}
    try:
        fa, fb, fc = (structured.submit(spec[n]) for n in "abc")
        assert structured.submit(spec["c"]) is fc  # a second request shares c's compile
        with pytest.raises(InvalidInputError, match="3 structured-output grammars are already compiling or queued, "
                                                    "the limit is 3"):
            structured.submit(spec["d"])
        deadline = time.monotonic() + 10
        while len(started) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        structured.release(fc)
        assert not fc.cancelled()  # one request still waits for it
        structured.release(fc)
        assert fc.cancelled()
        fd = structured.submit(spec["d"])  # c's place is free again
        structured.release(fa)  # running: it cannot be stopped, and still counts against the limit
        with pytest.raises(InvalidInputError, match="the limit is 3"):
            structured.submit(spec["a"])
        gate.set()
        fa.result(10), fd.result(10)
        deadline = time.monotonic() + 10
        while structured._pending and time.monotonic() < deadline:  # the done callbacks run just after result()
            time.sleep(0.01)
        again = structured.submit(spec["a"])  # it left the cache: a new request does not inherit an abandoned compile
        assert again is not fa
        again.result(10)
        assert sorted(started) == ["a", "a", "b", "d"]  # c never ran
    finally:
        gate.set()
        structured.shutdown()


def test_aborting_a_request_waiting_for_its_grammar_cancels_the_compile(llm, monkeypatch):
    structured = llm.engine.structured
    started: list = []
    gate = threading.Event()
    real_compile = structured._compile
    try:
        _blocking_compiles(monkeypatch, structured, started, gate)
        for name in ("busy-1", "busy-2", "queued"):
            llm.engine.add_request(name, PROMPT, SamplingParams(structured_outputs=StructuredOutputsParams(regex=name)))
        queued = structured.submit(StructuredOutputsParams(regex="queued"))
        structured.release(queued)  # only the request waits for it now
        for name in ("busy-1", "busy-2", "queued"):
            assert llm.engine.abort(name)
        assert queued.cancelled()
    finally:
        gate.set()
        monkeypatch.setattr(structured, "_compile", real_compile)
    assert not llm.engine.has_unfinished_requests()


def test_the_engine_thread_does_not_wait_for_the_vocabulary_tables(llm, monkeypatch):
    """The grammar engine's first compile builds tables over the vocabulary (seconds on a real one); meanwhile
    the engine thread still submits other specs at once (it used to wait on the lock the build held)."""
    import xgrammar

    real = xgrammar.TokenizerInfo.from_huggingface
    building = threading.Event()

    def slow_tables(*args, **kwargs):
        building.set()
        time.sleep(1.5)
        return real(*args, **kwargs)

    monkeypatch.setattr(xgrammar.TokenizerInfo, "from_huggingface", slow_tables)
    tok = llm.get_tokenizer()
    structured = StructuredOutputs(tok, len(tok), [0], StructuredLimits(), thinking_family=False)
    try:
        first = structured.submit(StructuredOutputsParams(regex="a+"))
        assert building.wait(10)
        t0 = time.monotonic()
        second = structured.submit(StructuredOutputsParams(regex="b+"))
        assert time.monotonic() - t0 < 0.5
        assert first.result(60) is not None and second.result(60) is not None
    finally:
        structured.shutdown()


def test_offline_generate_does_not_spin_while_only_grammars_compile(llm, monkeypatch):
    """While every request waits for its grammar, each step runs nothing; the loop sleeps between them."""
    structured = llm.engine.structured
    real_compile = structured._compile

    def slow(spec):
        time.sleep(0.5)
        return real_compile(spec)

    monkeypatch.setattr(structured, "_compile", slow)
    steps = 0
    real_step = llm.engine.step

    def counting_step():
        nonlocal steps
        steps += 1
        return real_step()

    monkeypatch.setattr(llm.engine, "step", counting_step)
    params = SamplingParams(max_tokens=4, seed=10, structured_outputs=StructuredOutputsParams(regex="slow[0-9]+"))
    out = llm.generate(PROMPT, params, use_tqdm=False)[0].outputs[0]
    assert re.fullmatch("slow[0-9]+", out.text) or out.finish_reason == "length"
    assert steps < 400  # 0.5 s of waiting at one step per 2 ms at most, plus the prefill and decode steps


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
