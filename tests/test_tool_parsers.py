"""Tool calling without a server: the glm45 and hermes parsers, the templates, the call constraints.

References: hand-written model outputs in each format with the calls a reader sees in them; the
split of the whole text equals the split of that text streamed in any two or more pieces (every
character boundary, and character by character); the factory's GLM-4.5V/4.6V template and the
shipped Qwen2.5-VL hermes template rendered by HF's apply_chat_template against hand-written
prompts; the xgrammar structural tags judged on hand-written accepted and refused texts, and
every accepted text parsed into arguments that validate under `jsonschema`.
"""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import xgrammar as xgr

from glimpse.engine.structured import StructuredLimits
from glimpse.errors import InvalidInputError
from glimpse.processing.prompt import with_argument_objects
from glimpse.server.guard import ApiError
from glimpse.server.tool_parsers import (
    GlmToolParser,
    HermesToolParser,
    call_structural_tag,
    detect_parser,
    template_renders_tools,
    tool_plan,
)
from glimpse.testing.tokenizer import (
    GLM41V_TEMPLATE,
    GLM45V_TOOLS_TEMPLATE,
    GLM46V_TEMPLATE,
    QWEN25VL_TEMPLATE,
)

HERMES_TEMPLATE = (Path(__file__).resolve().parents[1] / "glimpse" / "templates" / "qwen2_5_vl_hermes.jinja").read_text()

WEATHER = {"name": "get_weather", "description": "Weather in a city",
           "parameters": {"type": "object", "properties": {
               "city": {"type": "string", "maxLength": 12},
               "days": {"type": "integer", "minimum": 1, "maximum": 7},
               "units": {"type": "string", "enum": ["c", "f"]},
               "where": {"type": "object", "properties": {"lat": {"type": "number"}}, "required": ["lat"]}},
               "required": ["city", "days"]}}  # fmt: skip
NOW = {"name": "get_time", "parameters": {"type": "object", "properties": {}}}
TOOLS = [WEATHER, NOW]
SCHEMAS = {f["name"]: f["parameters"] for f in TOOLS}

# (model output, parser's content, [(name, arguments object)])
GLM_CASES = [
    ("Let me look.\n<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n<arg_key>days"
     "</arg_key>\n<arg_value>3</arg_value>\n</tool_call>",
     "Let me look.", [("get_weather", {"city": "Paris", "days": 3})]),
    # a string parameter stays raw text even when it reads as JSON; an object parameter is JSON
    ("<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>123</arg_value>\n<arg_key>days</arg_key>\n"
     "<arg_value>7</arg_value>\n<arg_key>where</arg_key>\n<arg_value>{\"lat\": 1.5}</arg_value>\n</tool_call>",
     "", [("get_weather", {"city": "123", "days": 7, "where": {"lat": 1.5}})]),
    # two calls, one without arguments (with and without a newline after the name)
    ("<tool_call>get_time\n</tool_call>\n<tool_call>get_time</tool_call>", "",
     [("get_time", {}), ("get_time", {})]),
    ("no call here, a < b and <tool_ca", "no call here, a < b and <tool_ca", []),
    ("trailing space stays without calls  \n", "trailing space stays without calls  \n", []),
    ("<tool_call>\n</tool_call> is no call", "<tool_call>\n</tool_call> is no call", []),
    # cut short by max_tokens: the complete pairs are the arguments
    ("<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Rome</arg_value>\n<arg_key>days</arg_key>\n<arg_va",
     "", [("get_weather", {"city": "Rome"})]),
    ("A <tool_call>get_time\n</tool_call> then B", "A  then B", [("get_time", {})]),  # text on both sides stays
]  # fmt: skip
HERMES_CASES = [
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}\n</tool_call>', "",
     [("get_weather", {"city": "Paris", "days": 3})]),
    ('Sure.\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>\n<tool_call>\n{"name": "get_weather", '
     '"arguments": "{\\"city\\": \\"Oslo\\", \\"days\\": 1}"}\n</tool_call>\n',
     "Sure.", [("get_time", {}), ("get_weather", {"city": "Oslo", "days": 1})]),
    ('<tool_call>{"name": "get_time"}</tool_call>', "", [("get_time", {})]),
    ("<tool_call>hello</tool_call>", "<tool_call>hello</tool_call>", []),
    ("plain text", "plain text", []),
    # </tool_call> inside a JSON string (a constrained call's grammar allows it there) is text of the argument,
    # after an escaped quote too
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "a</tool_call>b", "days": 2}}\n</tool_call>', "",
     [("get_weather", {"city": "a</tool_call>b", "days": 2})]),
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "\\\\\\"</tool_call>\\\\", "days": 1}}\n</tool_call>'
     ' ok', " ok", [("get_weather", {"city": '\\"</tool_call>\\', "days": 1})]),
]  # fmt: skip


def _calls(parser) -> list[tuple[str, dict]]:
    return [(c.name, json.loads(c.arguments)) for c in parser.calls]


@pytest.mark.parametrize("cls, text, content, calls",
                         [(GlmToolParser, *c) for c in GLM_CASES] + [(HermesToolParser, *c) for c in HERMES_CASES])  # fmt: skip
def test_parser_reads_hand_written_outputs(cls, text, content, calls):
    parser = cls(TOOLS)
    got_content, got_calls = parser.parse(text)
    assert got_content == content
    assert [(c.name, json.loads(c.arguments)) for c in got_calls] == calls
    assert all(c.id.startswith("call_") for c in got_calls) and len({c.id for c in got_calls}) == len(got_calls)


def _stream(cls, pieces: list[str], **kwargs) -> tuple[str, list[tuple[str, str]], list]:
    """Feed `pieces`; returns (content, [(name, arguments)] rebuilt from the deltas, the deltas)."""
    parser = cls(TOOLS, **kwargs)
    content, deltas = "", []
    for piece in pieces:
        out = parser.feed(piece)
        content += out.content
        deltas += out.calls
    out = parser.finish()
    content += out.content
    deltas += out.calls
    calls: dict[int, list] = {}
    for d in deltas:
        if d.name is not None:
            assert d.index not in calls, "a call is named once"
            calls[d.index] = [d.name, None]
        else:
            assert calls[d.index][1] is None, "the arguments come once, after the name"
            calls[d.index][1] = d.arguments
    assert sorted(calls) == list(range(len(calls)))
    return content, [(n, a) for n, a in (calls[i] for i in sorted(calls))], deltas


@pytest.mark.parametrize("cls, text", [(GlmToolParser, c[0]) for c in GLM_CASES] +
                         [(HermesToolParser, c[0]) for c in HERMES_CASES])  # fmt: skip
def test_streaming_split_anywhere_gives_the_same_calls(cls, text):
    whole_content, whole_calls = cls(TOOLS).parse(text)
    whole = [(c.name, c.arguments) for c in whole_calls]
    cuts = [[text[:i], text[i:]] for i in range(len(text) + 1)] + [list(text)]
    for pieces in cuts:
        content, calls, deltas = _stream(cls, pieces)
        assert (content, calls) == (whole_content, whole), pieces
        for d in deltas:  # every call's arguments are sent, "{}" included
            assert d.name is not None or d.arguments


def test_name_is_streamed_before_the_call_closes():
    parser = GlmToolParser(TOOLS)
    out = parser.feed("<tool_call>get_weather\n<arg_key>city</arg_key>")
    assert [(d.name, d.arguments) for d in out.calls] == [("get_weather", None)]
    out = parser.feed("\n<arg_value>Oslo</arg_value>\n<arg_key>days</arg_key>\n<arg_value>2</arg_value>\n</tool_call>")
    assert [(d.name, json.loads(d.arguments)) for d in out.calls] == [(None, {"city": "Oslo", "days": 2})]
    hermes = HermesToolParser(TOOLS)
    out = hermes.feed('<tool_call>\n{"name": "get_weather", "arguments": {"ci')
    assert [d.name for d in out.calls] == ["get_weather"]


def test_parallel_tool_calls_false_keeps_one_call():
    text = "<tool_call>get_time\n</tool_call>\n<tool_call>get_time\n</tool_call>"
    content, calls = GlmToolParser(TOOLS, max_calls=1).parse(text)
    assert [c.name for c in calls] == ["get_time"]
    assert content == "\n<tool_call>get_time\n</tool_call>"  # the second block is left as text, not dropped
    assert _stream(GlmToolParser, list(text), max_calls=1)[:2] == (content, [("get_time", "{}")])


def test_unbalanced_quote_ends_the_call_at_its_first_close():
    """An unconstrained call with an odd quote would swallow the rest of the output: at the end it is cut at the
    first </tool_call> after all, and what follows is read as if no close had been skipped."""
    text = ('<tool_call>{"name": "get_time", "arguments": {"a": "x}}</tool_call> then "text" '
            '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>')  # fmt: skip
    expected = (" then \"text\"", [("get_time", '{"a": "x}'), ("get_time", "{}")])
    content, calls = HermesToolParser(TOOLS).parse(text)
    assert (content, [(c.name, c.arguments) for c in calls]) == expected
    for pieces in [[text[:i], text[i:]] for i in range(len(text) + 1)] + [list(text)]:
        assert _stream(HermesToolParser, pieces)[:2] == expected, pieces


@pytest.mark.parametrize("cls, head", [(HermesToolParser, '<tool_call>{"name": "'), (GlmToolParser, "<tool_call>")])
def test_a_call_that_never_names_itself_is_not_rescanned(cls, head):
    """20,000 one-character deltas of a call whose name never ends: the name is looked for in the call's first 100
    characters only (a name has at most 64), not in the whole call once per delta; at the end the call is text."""
    scanned = []

    class Counting(cls):
        def read_name(self, call):
            scanned.append(len(call))
            return super().read_name(call)

    parser = Counting(TOOLS)
    out = [parser.feed(head)] + [parser.feed("a") for _ in range(20_000)] + [parser.finish()]
    assert "".join(d.content for d in out) == head + "a" * 20_000 and not parser.calls
    assert max(scanned) <= 100 and len(scanned) <= 101 + 1  # each delta up to the 100th, and the close


def test_a_name_past_the_first_100_characters_is_read_when_the_call_closes():
    text = "<tool_call>" + " " * 150 + '{"name": "get_time", "arguments": {}}'
    parser = HermesToolParser(TOOLS)
    assert not parser.feed(text).calls  # not announced while open: the name was given up
    assert [(d.name, d.arguments) for d in parser.feed("</tool_call>").calls] == [("get_time", None), (None, "{}")]


def test_deep_nesting_is_no_crash():
    """json.loads raises RecursionError, not ValueError, past ~1000 levels: a model's call stays an unparsed one,
    a request's history is a 400 naming the field."""
    deep = "[" * 5000
    content, calls = HermesToolParser(TOOLS).parse(f'<tool_call>{{"name": "get_time", "arguments": {deep}</tool_call>')
    assert content == "" and [(c.name, c.arguments) for c in calls] == [("get_time", deep)]
    _, calls = HermesToolParser(TOOLS).parse(f'<tool_call>{{"name": "get_time", "arguments": "{deep}"}}</tool_call>')
    assert [(c.name, c.arguments) for c in calls] == [("get_time", f'"{deep}"')]
    _, calls = GlmToolParser(TOOLS).parse(f"<tool_call>get_weather\n<arg_key>days</arg_key>\n<arg_value>{deep}"
                                          "</arg_value>\n</tool_call>")  # fmt: skip
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"days": deep})]
    message = {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": deep}}]}
    with pytest.raises(InvalidInputError, match=r"^messages\[1\]\.tool_calls\[0\]\.function\.arguments nests too"):
        with_argument_objects(message, "messages[1]")


# ---- templates ---------------------------------------------------------------------------------------------
def _render(template: str, messages: list[dict], tools: list[dict] | None = None, **kwargs) -> str:
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, _ = render_jinja_template(conversations=[messages], tools=tools, chat_template=template,
                                        add_generation_prompt=True, **kwargs)  # fmt: skip
    return rendered[0]


CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]},
     {"role": "assistant", "content": "A cat.", "reasoning_content": "hmm"}, {"role": "user", "content": "Sure?"}],
]  # fmt: skip


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_tool_templates_render_as_before_without_tools(messages):
    for kwargs in ({}, {"enable_thinking": False}):
        assert _render(GLM45V_TOOLS_TEMPLATE, messages, **kwargs) == _render(GLM46V_TEMPLATE, messages, **kwargs)
    assert _render(HERMES_TEMPLATE, messages) == _render(QWEN25VL_TEMPLATE, messages)


CALL_HISTORY = [
    {"role": "user", "content": "Weather in Oslo?"},
    {"role": "assistant", "content": "", "tool_calls": [{"id": "call_1", "type": "function", "function": {
        "name": "get_weather", "arguments": {"city": "Oslo", "days": 2}}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "Sunny"},
    {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "image"}, {"type": "text", "text": "map"}]},
]  # fmt: skip


def test_glm_template_renders_tools_calls_and_results():
    got = _render(GLM45V_TOOLS_TEMPLATE, CALL_HISTORY, [{"type": "function", "function": NOW}])
    want = ("[gMASK]<sop><|system|>\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
            "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
            '{"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}\n'
            "</tools>\n\nFor each function call, output the function name and arguments within the following XML "
            "format:\n<tool_call>{function-name}\n<arg_key>{arg-key-1}</arg_key>\n<arg_value>{arg-value-1}</arg_value>\n"
            "<arg_key>{arg-key-2}</arg_key>\n<arg_value>{arg-value-2}</arg_value>\n...\n</tool_call>"
            "<|user|>\nWeather in Oslo?<|assistant|>\n<think></think>\n"
            "\n<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Oslo</arg_value>\n<arg_key>days</arg_key>\n"
            "<arg_value>2</arg_value>\n</tool_call>"
            "<|observation|>\n<tool_response>\nSunny\n</tool_response>"
            "\n<tool_response>\n<|begin_of_image|><|image|><|end_of_image|>map\n</tool_response><|assistant|>\n")  # fmt: skip
    assert got == want


def test_hermes_template_renders_tools_calls_and_results():
    got = _render(HERMES_TEMPLATE, CALL_HISTORY, [{"type": "function", "function": NOW}])
    want = ("<|im_start|>system\nYou are a helpful assistant.\n\n# Tools\n\nYou may call one or more functions to "
            "assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML "
            'tags:\n<tools>\n{"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", '
            '"properties": {}}}}\n</tools>\n\nFor each function call, return a json object with function name and '
            "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, "
            "\"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n"
            "<|im_start|>user\nWeather in Oslo?<|im_end|>\n"
            '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "days": 2}}\n'
            "</tool_call><|im_end|>\n"
            "<|im_start|>user\n<tool_response>\nSunny\n</tool_response>\n<tool_response>\n"
            "<|vision_start|><|image_pad|><|vision_end|>map\n</tool_response><|im_end|>\n<|im_start|>assistant\n")  # fmt: skip
    assert got == want


@pytest.mark.parametrize("template, cls", [(GLM45V_TOOLS_TEMPLATE, GlmToolParser), (HERMES_TEMPLATE, HermesToolParser)])
def test_a_rendered_call_parses_back(template, cls):
    """The call a template writes into the history is the call the parser reads from the model's output."""
    args = {"city": "Oslo", "days": 2, "where": {"lat": 59.9}}
    history = [{"role": "user", "content": "?"}, {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": args}}]}]  # fmt: skip
    text = _render(template, history)
    answer = text[text.index("<tool_call>"):text.rindex("</tool_call>") + len("</tool_call>")]
    assert [(c.name, json.loads(c.arguments)) for c in cls(TOOLS).parse(answer)[1]] == [("get_weather", args)]


def test_parser_is_chosen_from_the_template_text():
    assert detect_parser(GLM45V_TOOLS_TEMPLATE) == "glm45"
    assert detect_parser(HERMES_TEMPLATE) == "hermes"
    for template in (GLM41V_TEMPLATE, GLM46V_TEMPLATE, QWEN25VL_TEMPLATE, None):
        assert not template_renders_tools(template) and detect_parser(template) is None


def test_tool_plan_refusals():
    tools = [{"type": "function", "function": f} for f in TOOLS]
    functions = [t["function"] for t in tools]
    for args, param, words in [
        ((tools, "auto", True, "glm45", QWEN25VL_TEMPLATE), "tools", "--chat-template"),
        ((tools, "auto", True, None, GLM45V_TOOLS_TEMPLATE), "tool_choice", "--tool-call-parser"),
        ((None, "required", True, "glm45", GLM45V_TOOLS_TEMPLATE), "tool_choice", "tools"),
        ((tools, {"type": "function", "function": {"name": "nope"}}, True, "glm45", GLM45V_TOOLS_TEMPLATE),
         "tool_choice", "get_weather, get_time"),
        ((tools + tools[:1], "auto", True, "glm45", GLM45V_TOOLS_TEMPLATE), "tools", "two tools"),
        (([{"type": "function", "function": {"name": "bad name"}}], "auto", True, "glm45", GLM45V_TOOLS_TEMPLATE),
         "tools[0].function.name", "letters"),
        (([{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}], "auto", True, "glm45",
          GLM45V_TOOLS_TEMPLATE), "tools[0].function.parameters", "object"),
        (([{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "not": {}}}}], "required",
          True, "glm45", GLM45V_TOOLS_TEMPLATE), "tools[0].function.parameters", "negation"),
    ]:  # fmt: skip
        with pytest.raises(ApiError) as e:
            tool_plan(*args)
        assert e.value.status == 400 and e.value.param == param and words in e.value.message
    assert tool_plan(tools, "none", True, None, GLM45V_TOOLS_TEMPLATE) is None  # shown to the model, not parsed
    plan = tool_plan(tools, None, False, "hermes", HERMES_TEMPLATE)
    assert plan.constraint is None and plan.max_calls == 1 and list(plan.tools) == functions
    plan = tool_plan(tools, "required", True, "glm45", GLM45V_TOOLS_TEMPLATE)
    assert plan.constraint is not None and json.loads(plan.constraint.structural_tag)["type"] == "structural_tag"


def test_forced_call_schemas_keep_the_servers_limits():
    """A forced call's parameters are held to the engine's bounds (glimpse serve --structured-output-max-*), not
    to the defaults: {"type": "object", "properties": {"a": {"type": "object", "properties": {"a": ...}}}} nests
    one level per "a", so 3 levels pass a depth limit of 3 and 4 do not."""
    def tool(levels: int) -> list[dict]:
        schema: dict = {"type": "string"}
        for _ in range(levels):
            schema = {"type": "object", "properties": {"a": schema}}
        return [{"type": "function", "function": {"name": "f", "parameters": schema}}]

    limits = StructuredLimits(max_depth=3)
    assert tool_plan(tool(3), "required", True, "glm45", GLM45V_TOOLS_TEMPLATE, limits=limits).constraint is not None
    assert tool_plan(tool(4), "required", True, "glm45", GLM45V_TOOLS_TEMPLATE).constraint is not None  # default 24
    with pytest.raises(ApiError) as e:
        tool_plan(tool(4), "required", True, "glm45", GLM45V_TOOLS_TEMPLATE, limits=limits)
    assert e.value.status == 400 and e.value.param == "tools[0].function.parameters"
    assert "deeper than 3 levels" in e.value.message and "--structured-output-max-depth" in e.value.message


# ---- constraints -------------------------------------------------------------------------------------------
def _matcher(tag: dict) -> xgr.GrammarMatcher:
    info = xgr.TokenizerInfo(["<eos>", "a"], stop_token_ids=[0])
    return xgr.GrammarMatcher(xgr.GrammarCompiler(info).compile_structural_tag(json.dumps(tag)))


def _accepts(tag: dict, text: str) -> bool:
    m = _matcher(tag)
    return m.accept_string(text) and m.is_completed()


GLM_CALL = ("<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Oslo</arg_value>\n<arg_key>days</arg_key>\n"
            "<arg_value>{days}</arg_value>\n</tool_call>")  # fmt: skip
HERMES_CALL = '<tool_call>\n{{"name": "get_weather", "arguments": {{"city": "Oslo", "days": {days}}}}}\n</tool_call>'


@pytest.mark.parametrize("parser, call, cls", [("glm45", GLM_CALL, GlmToolParser), ("hermes", HERMES_CALL, HermesToolParser)])
def test_constraint_admits_exactly_valid_calls(parser, call, cls):
    required = call_structural_tag(parser, TOOLS, forced=False, parallel=True)
    one = call_structural_tag(parser, TOOLS, forced=False, parallel=False)
    named = call_structural_tag(parser, [WEATHER], forced=True, parallel=True)
    good, bad_value = call.format(days=3), call.format(days=9)
    assert _accepts(required, good) and _accepts(one, good) and _accepts(named, good)
    assert _accepts(required, good + "\n" + good) and not _accepts(one, good + "\n" + good)
    assert not _accepts(named, good + "\n" + good)
    for text in (bad_value, "Sure. " + good, "", good.replace("get_weather", "get_wether")):
        assert not _accepts(required, text) and not _accepts(named, text)
    missing = good.replace("city", "town") if parser == "hermes" else good.replace("<arg_key>city", "<arg_key>town")
    assert not _accepts(required, missing)
    assert not _accepts(named, call.format(days=3).replace("get_weather", "get_time"))
    # Whatever the constraint admits, the parser reads as calls whose arguments validate.
    variants = [good, good + "\n" + good.replace("Oslo", "Ulan Bator"), good.replace("3", "7")]
    if parser == "glm45":
        variants.append(good.replace("</arg_value>\n</tool_call>",
                                     "</arg_value>\n<arg_key>units</arg_key><arg_value>f</arg_value></tool_call>"))
    for text in variants:
        assert _accepts(required, text), text
        calls = cls(TOOLS).parse(text)[1]
        assert calls
        for c in calls:
            jsonschema.validate(json.loads(c.arguments), SCHEMAS[c.name])
