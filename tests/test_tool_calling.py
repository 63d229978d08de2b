"""Tool calling end to end: real `glimpse serve` processes on 127.0.0.1, driven by the real `openai` client.

The checkpoints have random weights, so only the constraint can make a call right: with tool_choice
`required` or a named function every answer must carry parsed calls whose arguments validate under
`jsonschema` against the function's schema (GLM-4.5V/4.6V format on the factory's glm46v checkpoint,
hermes on Qwen2.5-VL with the shipped template). References besides the schemas: the non-streamed
answer for the streamed one, HF's tokenizer rendering the same conversation for the prompt, and
hand-written calls forced with a regex for `auto`.
"""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
from conftest import IMAGES
from test_server import MODEL, ServerProcess, data_url, image_part

from glimpse.server.cli import load_chat_template

WEATHER = {"name": "get_weather", "description": "Weather in a city",
           "parameters": {"type": "object", "properties": {
               "city": {"type": "string", "maxLength": 12},
               "days": {"type": "integer", "minimum": 1, "maximum": 7},
               "units": {"type": "string", "enum": ["celsius", "fahrenheit"]},
               "at": {"type": "object", "properties": {"lat": {"type": "integer", "minimum": -90, "maximum": 90}},
                      "required": ["lat"]}},
               "required": ["city", "days"]}}  # fmt: skip
NOW = {"name": "get_time", "description": "The time now", "parameters": {"type": "object", "properties": {}}}
TOOLS = [{"type": "function", "function": f} for f in (WEATHER, NOW)]
SCHEMAS = {"get_weather": WEATHER["parameters"], "get_time": NOW["parameters"]}
ASK = [{"role": "user", "content": "What is the weather in Oslo?"}]
ROCKET = data_url(IMAGES / "rocket.jpg", "image/jpeg")
COMMON = ("--kv-cache-memory", "64MiB", "--max-model-len", "4096", "--dtype", "float32")


@pytest.fixture(scope="module")
def glm(tiny_checkpoint):
    srv = ServerProcess(tiny_checkpoint("glm46v"), *COMMON, "--limit-mm-per-prompt", '{"image": 1, "video": 1}')
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def qwen(tiny_checkpoint):
    srv = ServerProcess(tiny_checkpoint("qwen2_5_vl"), *COMMON, "--chat-template", "qwen2_5_vl_hermes")
    yield srv
    srv.stop()


# GLM's thinking is switched off here so that the constraint starts at the first token (see the thinking test).
NO_THINKING = {"chat_template_kwargs": {"enable_thinking": False}}


def ask(server, extra: dict | None = None, **kwargs):
    extra = {**(NO_THINKING if server.checkpoint.name.startswith("glm") else {}), **(extra or {})}
    kwargs = {"model": MODEL, "messages": ASK, "tools": TOOLS, "max_tokens": 300, **kwargs}
    return server.client().chat.completions.create(extra_body=extra, **kwargs)


def check_calls(message, parallel: bool = True) -> list[tuple[str, dict]]:
    """The message's calls as (name, arguments), each validated against its function's schema."""
    assert message.tool_calls, message
    assert parallel or len(message.tool_calls) == 1
    out = []
    for call in message.tool_calls:
        assert call.type == "function" and call.id.startswith("call_")
        args = json.loads(call.function.arguments)
        jsonschema.validate(args, SCHEMAS[call.function.name])
        out.append((call.function.name, args))
    return out


def streamed_calls(server, **kwargs) -> tuple[list[tuple[str, str]], str | None, str]:
    """A streamed chat's calls rebuilt from delta.tool_calls, its finish_reason and its content."""
    chunks = list(server.client().chat.completions.create(stream=True, **kwargs))
    calls: dict[int, list] = {}
    finish, content = None, ""
    for ch in chunks:
        for c in ch.choices:
            content += c.delta.content or ""
            finish = c.finish_reason or finish
            for d in c.delta.tool_calls or []:
                if d.id is not None:  # the first piece names the call, before any of its arguments
                    assert d.index not in calls and d.type == "function" and d.function.name
                    calls[d.index] = [d.function.name, d.function.arguments or ""]
                else:
                    assert d.index in calls and d.function.name is None
                    calls[d.index][1] += d.function.arguments
    return [tuple(calls[i]) for i in sorted(calls)], finish, content


@pytest.mark.parametrize("which", ["glm", "qwen"])
def test_required_gives_calls_that_validate(which, request):
    server = request.getfixturevalue(which)
    r = ask(server, tool_choice="required", parallel_tool_calls=False, n=4, temperature=1.0, top_p=1.0, seed=7)
    for choice in r.choices:
        assert choice.finish_reason == "tool_calls", choice
        assert choice.message.content is None
        check_calls(choice.message, parallel=False)
    # Several calls in one answer are allowed, and each that closed validates.
    r = ask(server, tool_choice="required", n=2, temperature=1.0, top_p=1.0, seed=3, max_tokens=600)
    for choice in r.choices:
        calls = choice.message.tool_calls
        closed = calls if choice.finish_reason == "tool_calls" else calls[:-1]
        for call in closed:
            jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


@pytest.mark.parametrize("which", ["glm", "qwen"])
def test_named_function_and_stream_equal_non_stream(which, request):
    server = request.getfixturevalue(which)
    for name in ("get_weather", "get_time"):
        choice = {"type": "function", "function": {"name": name}}
        kwargs = dict(model=MODEL, messages=ASK, tools=TOOLS, tool_choice=choice, max_tokens=300, temperature=0,
                      extra_body=NO_THINKING if which == "glm" else {})  # fmt: skip
        full = server.client().chat.completions.create(**kwargs).choices[0]
        assert full.finish_reason == "tool_calls"
        (got_name, args), = check_calls(full.message)
        assert got_name == name
        calls, finish, content = streamed_calls(server, **kwargs)
        assert calls == [(name, full.message.tool_calls[0].function.arguments)] and finish == "tool_calls"
        assert content == ""
        if name == "get_time":
            assert calls[0][1] == "{}"  # no arguments is still an arguments piece


def literal_regex(text: str) -> str:
    """A regex matching exactly `text` (metacharacters escaped, a newline as \\n)."""
    return "".join("\\n" if ch == "\n" else "\\" + ch if ch in ".^$*+?()[]{}|\\/" else ch for ch in text)


def test_auto_parses_calls_written_in_the_models_format(glm, qwen):
    """tool_choice auto does not constrain; here a regex forces the model's own call format, which the parser reads."""
    for server, call in ((glm, "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Oslo</arg_value>\n"
                               "<arg_key>days</arg_key>\n<arg_value>2</arg_value>\n</tool_call>"),
                         (qwen, '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "days": 2}}\n'
                                "</tool_call>")):  # fmt: skip
        regex = literal_regex("Let me check.\n" + call)
        kwargs = dict(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="auto", max_tokens=120, temperature=0)
        extra = {"structured_outputs": {"regex": regex}, **(NO_THINKING if server is glm else {})}
        full = server.client().chat.completions.create(extra_body=extra, **kwargs).choices[0]
        assert full.message.content == "Let me check."
        assert check_calls(full.message) == [("get_weather", {"city": "Oslo", "days": 2})]
        assert full.finish_reason == "tool_calls"
        calls, finish, content = streamed_calls(server, extra_body=extra, **kwargs)
        assert (calls, finish, content) == ([("get_weather", '{"city": "Oslo", "days": 2}')], "tool_calls", "Let me check.")
        # tool_choice none: the same text is plain content
        plain = server.client().chat.completions.create(extra_body=extra, **{**kwargs, "tool_choice": "none"})
        assert plain.choices[0].message.content == "Let me check.\n" + call and not plain.choices[0].message.tool_calls


def test_thinking_then_a_constrained_call(glm):
    """On a thinking template the reasoning stays free text; the call constraint starts after </think>."""
    r = ask(glm, extra={"chat_template_kwargs": {"enable_thinking": True}, "thinking_token_budget": 12},
            tool_choice="required", parallel_tool_calls=False, temperature=1.0, top_p=1.0, seed=11)
    choice = r.choices[0]
    assert choice.message.reasoning_content  # free text, as many tokens as the budget allows
    assert choice.finish_reason == "tool_calls"
    check_calls(choice.message, parallel=False)


# ---- the conversation: tool results and earlier calls through the template ----------------------------------
HISTORY = [
    {"role": "user", "content": "Weather in Oslo?"},
    {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
        "name": "get_weather", "arguments": '{"city": "Oslo", "days": 2}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 21 C"},
]  # fmt: skip


@pytest.mark.parametrize("which", ["glm", "qwen"])
def test_history_with_calls_and_results_renders_through_the_template(which, request):
    import transformers

    server = request.getfixturevalue(which)
    tok = transformers.AutoTokenizer.from_pretrained(server.checkpoint)
    template = load_chat_template("qwen2_5_vl_hermes") if which == "qwen" else None  # the server's --chat-template
    as_template = [dict(m) for m in HISTORY]
    as_template[1] = {**HISTORY[1], "content": "", "tool_calls": [{**HISTORY[1]["tool_calls"][0], "function": {
        "name": "get_weather", "arguments": {"city": "Oslo", "days": 2}}}]}  # fmt: skip
    extra = NO_THINKING if which == "glm" else {}
    text = tok.apply_chat_template(as_template, tools=TOOLS, chat_template=template, tokenize=False,
                                   add_generation_prompt=True, **extra.get("chat_template_kwargs", {}))  # fmt: skip
    assert "Sunny, 21 C" in text and "get_weather" in text
    want = tok.encode(text, add_special_tokens=False)
    got = server.post("/tokenize", {"model": MODEL, "messages": HISTORY, "tools": TOOLS, **extra}).json()
    assert got["tokens"] == want
    r = server.client().chat.completions.create(model=MODEL, messages=HISTORY, tools=TOOLS, max_tokens=1,
                                                extra_body=extra)  # fmt: skip
    assert r.usage.prompt_tokens == len(want)


def test_images_in_tool_results(glm):
    """An image in a tool result reaches the model, and counts against --limit-mm-per-prompt before any fetch."""
    with_image = HISTORY[:2] + [{"role": "tool", "tool_call_id": "call_1",
                                 "content": [{"type": "text", "text": "map:"}, image_part(ROCKET)]}]  # fmt: skip
    r = glm.client().chat.completions.create(model=MODEL, messages=with_image, tools=TOOLS, max_tokens=1)
    assert r.usage.prompt_tokens_details.image_tokens > 0
    # The user's image plus the tool's is two, over the limit of one: refused before the (unreachable) URL is fetched.
    two = [{"role": "user", "content": [image_part(ROCKET), {"type": "text", "text": "and?"}]}, with_image[1],
           {"role": "tool", "tool_call_id": "call_1", "content": [image_part("http://127.0.0.1:9/never.png")]}]  # fmt: skip
    with pytest.raises(openai.BadRequestError) as e:
        glm.client().chat.completions.create(model=MODEL, messages=two, tools=TOOLS, max_tokens=1)
    assert e.value.body["code"] == "limit_exceeded_error" and "--limit-mm-per-prompt" in e.value.body["message"]


# ---- refusals --------------------------------------------------------------------------------------------
def test_template_without_tools_is_refused(tiny_checkpoint):
    srv = ServerProcess(tiny_checkpoint("qwen2_5_vl"), *COMMON)  # Qwen2.5-VL's own template: no tool section
    try:
        for path, body in (("/v1/chat/completions", {"max_tokens": 1}), ("/tokenize", {})):
            r = srv.post(path, {"model": MODEL, "messages": ASK, "tools": TOOLS, **body})
            assert r.status_code == 400, r.text
            err = r.json()["error"]
            assert err["code"] == "tools_not_supported" and err["param"] == "tools"
            assert "--chat-template" in err["message"] and "qwen2_5_vl_hermes" in err["message"]
        # Earlier calls and tool results it would drop without a word are refused too, tools or not.
        for messages, param in ((HISTORY[:2], "messages[1].tool_calls"), ([*ASK, HISTORY[2]], "messages[1]")):
            r = srv.post("/v1/chat/completions", {"model": MODEL, "messages": messages, "max_tokens": 1})
            assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
            assert "--chat-template" in r.json()["error"]["message"]
        plain = srv.client().chat.completions.create(model=MODEL, messages=ASK, max_tokens=1)
        assert plain.choices[0].finish_reason == "length"
    finally:
        srv.stop()


def test_bad_tool_requests(glm):
    client = glm.client()
    for kwargs, param, words in [
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice",
         "get_weather, get_time"),
        ({"tool_choice": "required"}, "tool_choice", "tools"),
        ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools[0].function.name", "letters"),
        ({"tools": [{"type": "function"}]}, "tools.0.function", "Field required"),
    ]:  # fmt: skip
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=1, **kwargs)
        assert e.value.body["param"] == param and words in e.value.body["message"], e.value.body
    bad_history = [*HISTORY[:1], {**HISTORY[1], "tool_calls": [{"id": "c", "type": "function",
                                                                "function": {"name": "f", "arguments": "{oops"}}]}]  # fmt: skip
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=bad_history, tools=TOOLS, max_tokens=1)
    assert "messages[1].tool_calls[0].function.arguments is not JSON" in e.value.body["message"]
    deep_history = [*HISTORY[:1], {**HISTORY[1], "tool_calls": [{"id": "c", "type": "function",
                                                                 "function": {"name": "f", "arguments": "[" * 5000}}]}]  # fmt: skip
    with pytest.raises(openai.BadRequestError) as e:  # the JSON decoder's RecursionError, not a 500
        client.chat.completions.create(model=MODEL, messages=deep_history, tools=TOOLS, max_tokens=1)
    assert "messages[1].tool_calls[0].function.arguments nests too deeply" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:  # two constraints on one output
        client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=1,
                                       response_format={"type": "json_object"})  # fmt: skip
    assert "response_format" in e.value.body["message"]
