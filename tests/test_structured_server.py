"""Structured output through `glimpse serve` and the real `openai` client, on a tiny random-weight GLM checkpoint.

The reference is `jsonschema` (and `re.fullmatch`, and the choice list): with random weights nothing
but the constraint can make an answer valid. tests/data/schemas holds the 50-schema suite; the
first test checks that the suite covers what issue #15 asks of it, by reading the schemas.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
from collections import Counter
from pathlib import Path

import jsonschema
import openai
import pytest
from test_server import MODEL, ServerProcess

SCHEMAS = sorted((Path(__file__).resolve().parent / "data" / "schemas").glob("*.json"))
# Sampling from the whole vocabulary (the factory's GLM defaults keep one candidate per token).
SAMPLE = {"temperature": 1.0, "top_p": 1.0, "max_tokens": 512}
QUESTION = [{"role": "user", "content": "Fill in the fields from the picture."}]
# GLM-4.6V's template opens thinking by default, and random weights never close it: the answer starts at once.
NO_THINK = {"chat_template_kwargs": {"enable_thinking": False}}


def _subschemas(schema):
    if isinstance(schema, dict):
        yield schema
        for key, value in schema.items():
            if key in ("properties", "$defs", "patternProperties"):
                for sub in value.values():
                    yield from _subschemas(sub)
            elif key in ("items", "additionalProperties", "contains") and isinstance(value, dict):
                yield from _subschemas(value)
            elif key in ("anyOf", "oneOf", "prefixItems"):
                for sub in value:
                    yield from _subschemas(sub)


def _features(schema: dict) -> set[str]:
    def is_object(s) -> bool:
        return isinstance(s, dict) and s.get("type") == "object" and "properties" in s

    found = set()
    for s in _subschemas(schema):
        if is_object(s):
            if any(is_object(p) or (isinstance(p, dict) and "$ref" in p) for p in s["properties"].values()):
                found.add("nested objects")
            if set(s["properties"]) - set(s.get("required", [])):
                found.add("optional fields")
        types = s.get("type") if isinstance(s.get("type"), list) else [s.get("type")]
        if "array" in types and {"minItems", "maxItems"} & set(s):
            found.add("arrays with minItems/maxItems")
        if "enum" in s:
            found.add("enums")
        if {"integer", "number"} & set(types) and {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"} & set(s):
            found.add("integer and number bounds")
        if "string" in types and {"maxLength", "pattern"} & set(s):
            found.add("strings with maxLength or pattern")
    return found


def test_the_suite_has_fifty_valid_schemas_covering_each_feature_eight_times():
    assert len(SCHEMAS) == 50
    counts: Counter = Counter()
    for path in SCHEMAS:
        schema = json.loads(path.read_text())
        jsonschema.Draft202012Validator.check_schema(schema)
        counts.update(_features(schema))
    wanted = ["nested objects", "arrays with minItems/maxItems", "enums", "integer and number bounds",
              "optional fields", "strings with maxLength or pattern"]  # fmt: skip
    assert all(counts[w] >= 8 for w in wanted), counts


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    srv = ServerProcess(tiny_checkpoint("glm46v"), "--kv-cache-memory", "64MiB", "--max-model-len", "2048",
                        "--dtype", "float32", "--max-num-seqs", "64")  # fmt: skip
    yield srv
    srv.stop()


def _schema_format(path: Path) -> dict:
    return {"type": "json_schema", "json_schema": {"name": path.stem, "schema": json.loads(path.read_text()),
                                                   "strict": True}}  # fmt: skip


async def _chat(client: openai.AsyncOpenAI, stream: bool, seed: int, think: bool = False,
                **kwargs) -> tuple[str, str | None, str]:  # fmt: skip
    """(content, reasoning_content, finish_reason) of one chat completion, streamed or not."""
    kwargs["extra_body"] = kwargs.get("extra_body", {}) | ({} if think else NO_THINK)
    if not stream:
        r = await client.chat.completions.create(model=MODEL, messages=QUESTION, seed=seed, **SAMPLE, **kwargs)
        msg = r.choices[0].message
        return msg.content or "", getattr(msg, "reasoning_content", None), r.choices[0].finish_reason
    content, reasoning, finish = [], [], None
    async for chunk in await client.chat.completions.create(model=MODEL, messages=QUESTION, seed=seed, stream=True,
                                                            **SAMPLE, **kwargs):  # fmt: skip
        for c in chunk.choices:
            content.append(c.delta.content or "")
            reasoning.append(getattr(c.delta, "reasoning_content", None) or "")
            finish = c.finish_reason or finish
    return "".join(content), "".join(reasoning) or None, finish


@pytest.mark.parametrize("stream", [False, True])
def test_fifty_schemas_give_valid_json_that_stops(server, stream):
    """All 50 at once (distinct schemas batched together), half as OpenAI's response_format, half as vLLM's
    structured_outputs extra."""
    async def run():
        async with server.async_client(timeout=600) as client:
            jobs = []
            for i, path in enumerate(SCHEMAS):
                if i % 2:
                    extra = {"extra_body": {"structured_outputs": {"json": json.loads(path.read_text())}}}
                else:
                    extra = {"response_format": _schema_format(path)}
                jobs.append(_chat(client, stream, seed=i, **extra))
            return await asyncio.gather(*jobs)

    results = asyncio.run(run())
    for path, (content, _, finish) in zip(SCHEMAS, results, strict=True):
        assert finish == "stop", (path.name, content)
        jsonschema.validate(json.loads(content), json.loads(path.read_text()))


@pytest.mark.parametrize("stream", [False, True])
def test_regex_and_choice_on_both_endpoints(server, stream):
    pattern = r"(19|20)\d{2}-(0[1-9]|1[0-2])-[0-2]\d [A-Z][a-z]{1,8}"
    choices = ["cat", "dog", "a red bicycle", 'say "cheese"']

    async def completion(client, seed: int, constraint: dict) -> tuple[str, str]:
        args = dict(model=MODEL, prompt="Label: ", seed=seed, extra_body={"structured_outputs": constraint}, **SAMPLE)
        if not stream:
            r = await client.completions.create(**args)
            return r.choices[0].text, r.choices[0].finish_reason
        text, finish = [], None
        async for chunk in await client.completions.create(stream=True, **args):
            for c in chunk.choices:
                text.append(c.text)
                finish = c.finish_reason or finish
        return "".join(text), finish

    async def run():
        async with server.async_client(timeout=600) as client:
            jobs = []
            for seed in range(6):
                jobs.append(_chat(client, stream, seed, extra_body={"structured_outputs": {"regex": pattern}}))
                jobs.append(_chat(client, stream, seed, extra_body={"structured_outputs": {"choice": choices}}))
                jobs.append(completion(client, seed, {"regex": pattern}))
                jobs.append(completion(client, seed, {"choice": choices}))
            return await asyncio.gather(*jobs)

    results = asyncio.run(run())
    for i, result in enumerate(results):
        text, finish = result[0], result[-1]
        assert finish == "stop", result
        assert re.fullmatch(pattern, text) if i % 2 == 0 else text in choices, result


def test_json_object_with_n_and_logprobs(server):
    """Any object: its keys and string values are free text, which random weights would write for hundreds of
    tokens (one token of the vocabulary closes a string), so a logit_bias on that token makes them short; the
    JSON is still valid only by the constraint."""
    [quote] = server.post("/tokenize", {"prompt": '"', "add_special_tokens": False}).json()["tokens"]
    client = server.client(timeout=300)
    r = client.chat.completions.create(model=MODEL, messages=QUESTION, n=3, logprobs=True, top_logprobs=3, seed=11,
                                       response_format={"type": "json_object"}, logit_bias={str(quote): 6},
                                       extra_body=NO_THINK, **SAMPLE)  # fmt: skip
    assert len(r.choices) == 3
    for c in r.choices:
        assert isinstance(json.loads(c.message.content), dict) and c.finish_reason == "stop"
        entries = c.logprobs.content
        assert "".join(e.token for e in entries) == c.message.content
        for e in entries:  # after the mask: every listed alternative is possible, the sampled one included
            assert math.isfinite(e.logprob) and all(math.isfinite(t.logprob) for t in e.top_logprobs)
            assert e.logprob <= 0 and sum(math.exp(t.logprob) for t in e.top_logprobs) <= 1 + 1e-4


@pytest.mark.parametrize("stream", [False, True])
def test_a_thinking_request_reasons_freely_then_answers_by_the_schema(server, stream):
    schema = json.loads(SCHEMAS[8].read_text())  # the scene description

    async def run():
        async with server.async_client(timeout=300) as client:
            return await _chat(client, stream, seed=3, think=True, response_format=_schema_format(SCHEMAS[8]),
                               extra_body={"thinking_token_budget": 12})  # fmt: skip

    content, reasoning, finish = asyncio.run(run())
    assert reasoning and len(reasoning.strip()) > 0  # 12 tokens of free (random) text
    assert finish == "stop"
    jsonschema.validate(json.loads(content), schema)


def test_hostile_and_unsupported_constraints_are_400s_and_the_engine_keeps_serving(server):
    deep: dict = {"type": "integer"}
    for _ in range(27):  # past the 24 levels of subschemas, within the server's 64 levels of JSON
        deep = {"type": "object", "properties": {"a": deep}, "required": ["a"]}
    big = {"type": "string", "enum": [f"value number {i}" for i in range(8000)]}
    cases = [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "d", "schema": deep}}},
         "structured_output_max_depth"),
        ({"extra_body": {"structured_outputs": {"json": big}}}, "structured_output_max_bytes"),
        ({"extra_body": {"structured_outputs": {"json": {"type": "object", "not": {"required": ["a"]}}}}}, "'not'"),
        ({"extra_body": {"structured_outputs": {"regex": "(unclosed"}}}, "cannot be compiled"),
        ({"extra_body": {"structured_outputs": {"grammar": "root ::= missing_rule"}}}, "cannot be compiled"),
        ({"extra_body": {"structured_outputs": {"regex": "a", "choice": ["a"]}}}, "exactly one of"),
        ({"response_format": {"type": "json_object"}, "extra_body": {"guided_regex": "a+"}}, "send one of them"),
        ({"extra_body": {"structured_outputs": {"json": {}, "disable_any_whitespace": True}}},
         "structured_outputs.disable_any_whitespace"),
        ({"extra_body": {"guided_json": "[" * 5000}}, "nests too deeply"),  # Python's parser gives up: not a 500
        ({"extra_body": {"structured_outputs": {"json": {"type": "object", "required": ["a"], "additionalProperties": {
            "type": "integer"}}}}}, "'required' name 'a' not under 'properties'"),
    ]  # fmt: skip
    client = server.client(timeout=120)
    for kwargs, named in cases:
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=8, **kwargs)
        assert named in err.value.body["message"], (named, err.value.body)
    r = client.chat.completions.create(model=MODEL, messages=QUESTION, seed=1, extra_body={"structured_outputs": {
        "choice": ["still", "serving"]}, **NO_THINK}, **SAMPLE)  # fmt: skip
    assert r.choices[0].message.content in ("still", "serving")
    assert server.wait_idle()["glimpse_kv_cache_blocks_used"] == 0
