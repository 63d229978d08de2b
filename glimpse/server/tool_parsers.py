"""Step 9 of the data path, after the reasoning split: tool calls in the model's own format -> OpenAI `tool_calls`.

`tool_plan(req, parser, template)` checks a chat request's `tools` / `tool_choice` /
`parallel_tool_calls` against the active chat template and `--tool-call-parser`, and gives the
`ToolPlan`: which parser reads the output and, for `required` or a named function, the xgrammar
structural tag that constrains it. `ToolCallParser.feed(content_delta) -> ToolDelta(content,
calls)` and `finish()` split the answer text into content and calls, a tool's name as soon as it
is complete and its arguments (JSON text, "{}" when empty) when the call closes; the whole text
fed once gives the same split as any chunking of it, so streamed calls equal non-streamed ones.

Formats: glm45 (GLM-4.5V/4.6V) `<tool_call>NAME\\n<arg_key>K</arg_key>\\n<arg_value>V</arg_value>\\n</tool_call>`
(string arguments raw, others JSON); hermes (Qwen2.5) `<tool_call>\\n{"name": NAME, "arguments": {...}}\\n</tool_call>`.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from glimpse.engine.sampling_params import StructuredOutputsParams
from glimpse.engine.structured import StructuredLimits
from glimpse.server.guard import ApiError

TOOL_PARSERS = ("glm45", "hermes")
TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
_NAME_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")  # OpenAI's function names (a-z, A-Z, 0-9, _ and -), plus . and :
_HERMES_HEAD = re.compile(r'^\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"\s*:')
_GLM_PAIR = re.compile(r"<arg_key>(.*?)</arg_key>\s*<arg_value>(.*?)</arg_value>", re.S)
# Consecutive whitespace a constrained call may hold at one place: the layouts the models were trained on (GLM's
# one newline between pairs, Qwen's one-line JSON with ", " and ": ") need one; more would only let a model pad
# (random weights spent 70% of a call's tokens on whitespace with 16).
_MAX_WHITESPACE = 1
# How much of an open call is searched for its name (names are at most 64 characters): past it the name is given
# up until the call closes, so that a call that never names itself costs no rescan of its text per streamed delta.
_NAME_SCAN = 100
_QUOTE_OR_BACKSLASH = re.compile(r'["\\]')


def template_renders_tools(template: str | None) -> bool:
    """True if the chat template reads the `tools` variable (it then shows the functions to the model)."""
    if not template:
        return False
    from jinja2 import meta
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(extensions=[loopcontrols])
    return "tools" in meta.find_undeclared_variables(env.parse(template))


def detect_parser(template: str | None) -> str | None:
    """--tool-call-parser auto: the call format the chat template teaches (None if it renders no tools).

    Read from the template's text, never from a model name: GLM's `<arg_key>` pairs, else hermes-style
    `<tool_call>` JSON.
    """
    if not template_renders_tools(template):
        return None
    if "<arg_key>" in template:
        return "glm45"
    if TOOL_CALL_OPEN in template:
        return "hermes"
    return None


def check_history(messages: list, template: str | None) -> None:
    """Refuse earlier calls or tool results that the chat template would drop without a word (it never names
    `tool_calls`, or the `tool` role): the model would answer a conversation other than the one sent."""
    text = template or ""
    for i, m in enumerate(messages):
        if m.tool_calls and "tool_calls" not in text:
            what, where = "assistant tool_calls", f"messages[{i}].tool_calls"
        elif m.role == "tool" and not re.search(r"""['"]tool['"]""", text):
            what, where = "tool messages", f"messages[{i}]"
        else:
            continue
        raise ApiError(400, f"this model's chat template does not render {what}, so the model would not see them; "
                            "start the server with a template that does (--chat-template; see docs/tool-calling.md)",
                       "invalid_request_error", "tools_not_supported", where)  # fmt: skip


# ---- the request's tools ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class ToolPlan:
    """How one chat request's tools are served: its parser, the constraint (required / named), the call limit."""

    parser: str  # "glm45" | "hermes"
    tools: tuple[dict, ...]  # the request's function definitions ({"name", "parameters", ...})
    constraint: StructuredOutputsParams | None  # tool_choice required or a named function
    max_calls: int | None  # parallel_tool_calls=false: 1
    keep_special_tokens: bool = False  # the tokenizer marks <tool_call> special: detokenize without skipping it

    def new_parser(self) -> ToolCallParser:
        return (GlmToolParser if self.parser == "glm45" else HermesToolParser)(self.tools, self.max_calls)


def _bad(message: str, param: str) -> ApiError:
    return ApiError(400, message, "invalid_request_error", "invalid_value", param)


def tool_plan(tools: list[dict] | None, tool_choice: str | dict | None, parallel_tool_calls: bool, parser: str | None,
              template: str | None, special_tags: bool = False,
              limits: StructuredLimits | None = None) -> ToolPlan | None:  # fmt: skip
    """Check a request's tool fields; None when its output is not parsed for calls (no tools, tool_choice none).

    `parser`: --tool-call-parser as resolved at start-up (None: none); `template`: the active chat template;
    `special_tags`: the tokenizer holds `<tool_call>` as a special token (skipped when detokenizing by default).
    `limits`: the engine's structured-output bounds, which a forced call's parameters schema must keep (default ones
    where None).
    Refused (400): tools under a template that does not render them (the fix is --chat-template), a
    tool_choice that names no given function or needs tools that were not given, calls without a parser.
    """
    if not tools:
        if tool_choice not in (None, "none", "auto"):
            raise _bad("tool_choice 'required' or a named function needs tools; send the functions in 'tools'",
                       "tool_choice")  # fmt: skip
        return None
    if not template_renders_tools(template):
        raise ApiError(400, "this model's chat template does not render 'tools', so the model would never see them; "
                            "start the server with a template that does (--chat-template; glimpse ships "
                            "qwen2_5_vl_hermes for Qwen2.5-VL, see docs/tool-calling.md)", "invalid_request_error",
                       "tools_not_supported", "tools")  # fmt: skip
    functions = [t["function"] for t in tools]
    names = [f["name"] for f in functions]
    for i, f in enumerate(functions):
        if not _NAME_RE.match(f["name"]):
            raise _bad(f"tools[{i}].function.name {f['name'][:80]!r} must be 1 to 64 letters, digits, '_', '-', '.' "
                       "or ':'", f"tools[{i}].function.name")  # fmt: skip
        params = f.get("parameters")
        if params is not None and not (params.get("type", "object") == "object"):
            raise _bad(f"tools[{i}].function.parameters must be a JSON schema of an object (type 'object'), as "
                       "function arguments are", f"tools[{i}].function.parameters")  # fmt: skip
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate is not None:
        raise _bad(f"two tools are named {duplicate!r}; each function needs its own name", "tools")
    if tool_choice == "none":
        return None  # the template still shows the tools, as OpenAI and vLLM do; the output stays content
    if parser is None:
        raise ApiError(400, "calls cannot be parsed: the server runs with --tool-call-parser none, or 'auto' found no "
                            "call format in the chat template; start it with --tool-call-parser glm45 or hermes (or "
                            "send tool_choice 'none')", "invalid_request_error", "tools_not_supported",
                       "tool_choice")  # fmt: skip
    chosen = functions
    if isinstance(tool_choice, dict):
        name = tool_choice["function"]["name"]
        if name not in names:
            raise _bad(f"tool_choice names function {name[:80]!r}, which is not among the tools ({', '.join(names)})",
                       "tool_choice")  # fmt: skip
        chosen = [functions[names.index(name)]]
    constraint = None
    if tool_choice == "required" or isinstance(tool_choice, dict):
        _check_schemas(chosen, functions, limits or StructuredLimits())
        tag = call_structural_tag(parser, chosen, forced=isinstance(tool_choice, dict), parallel=parallel_tool_calls)
        constraint = StructuredOutputsParams(structural_tag=json.dumps(tag, ensure_ascii=False))
    return ToolPlan(parser, tuple(functions), constraint, None if parallel_tool_calls else 1, special_tags)


def _check_schemas(chosen: list[dict], functions: list[dict], limits: StructuredLimits) -> None:
    """A parameters schema the constraint would enforce only in part, or past the limits, is refused, as a
    response_format one is."""
    from glimpse.engine.structured import check_spec
    from glimpse.errors import InvalidInputError

    for f in chosen:
        i = functions.index(f)
        try:
            check_spec(StructuredOutputsParams(json=_parameters(f)), limits)
        except InvalidInputError as exc:
            raise _bad(f"tools[{i}].function.parameters: {exc}", f"tools[{i}].function.parameters") from None


def _parameters(function: dict) -> dict:
    return function.get("parameters") or {"type": "object", "properties": {}}


def call_structural_tag(parser: str, functions: list[dict], forced: bool, parallel: bool) -> dict:
    """The xgrammar structural tag whose matches are exactly tool calls in `parser`'s format.

    forced (a named function): one call of functions[0]. Otherwise (required): one or more calls of the
    given functions, separated by a newline (one call when `parallel` is false). Arguments match each
    function's parameters schema: JSON for hermes, GLM's `<arg_key>`/`<arg_value>` pairs for glm45.
    """
    def tag(function: dict) -> dict:
        content = {"type": "json_schema", "json_schema": _parameters(function), "max_whitespace_cnt": _MAX_WHITESPACE}
        if parser == "glm45":
            return {"type": "tag", "begin": TOOL_CALL_OPEN + function["name"], "end": TOOL_CALL_CLOSE,
                    "content": content | {"style": "glm_xml"}}  # fmt: skip
        return {"type": "tag", "begin": f'{TOOL_CALL_OPEN}\n{{"name": {json.dumps(function["name"])}, "arguments": ',
                "end": "}\n" + TOOL_CALL_CLOSE, "content": content}  # fmt: skip

    if forced:
        fmt = tag(functions[0])
    else:
        fmt = {"type": "tags_with_separator", "tags": [tag(f) for f in functions], "separator": "\n",
               "at_least_one": True, "stop_after_first": not parallel}  # fmt: skip
    return {"type": "structural_tag", "format": fmt}


# ---- parsing the output ------------------------------------------------------------------------------------
@dataclass
class ToolCallDelta:
    """One piece of a streamed call: the first names it (id, name), a later one carries its arguments."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str | None = None

    def as_openai(self) -> dict:
        if self.name is not None:
            return {"index": self.index, "id": self.id, "type": "function",
                    "function": {"name": self.name, "arguments": ""}}  # fmt: skip
        return {"index": self.index, "function": {"arguments": self.arguments}}


@dataclass
class ToolDelta:
    content: str = ""
    calls: list[ToolCallDelta] = field(default_factory=list)


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text

    def as_openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def _partial_len(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag` (text held back for a split tag)."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


class ToolCallParser:
    """Incremental splitter of answer text into content and tool calls (the format's subclass reads a call).

    Text outside `<tool_call>...</tool_call>` is content; whitespace at the end of the content is held
    back and dropped once a call has been made (the newlines between calls are layout). A call whose
    name cannot be read stays content, verbatim. After `max_calls` calls, further blocks are content.
    A call still open when the output ends (max_tokens) is returned with the arguments read so far.
    The name is looked for in the call's first `_NAME_SCAN` characters only, and the call's text is kept in
    pieces, so that streaming stays linear in the output's length however long a call runs.
    """

    def __init__(self, tools: tuple[dict, ...] | list[dict] = (), max_calls: int | None = None) -> None:
        self.params = {t["name"]: (_parameters(t).get("properties") or {}) for t in tools}
        self.max_calls = max_calls
        self.calls: list[ToolCall] = []
        self._buf = ""  # text not yet routed (a possibly split tag)
        self._space = ""  # trailing whitespace of the content, held back
        self._call: list[str] | None = None  # pieces of the open call's text after <tool_call>
        self._head = ""  # the open call's first _NAME_SCAN characters, where its name is
        self._seek_name = True  # False once the open call's name is out or given up
        self._named: ToolCall | None = None  # the open call, once its name is out
        self._skipped: int | None = None  # where in the open call the first </tool_call> not taken as its end is
        self._any_close_ends = False  # a call ran to the end past a skipped </tool_call>: from there on, any ends one

    def _grow(self, text: str) -> None:
        """Add text to the open call."""
        if text:
            self._call.append(text)  # type: ignore[union-attr]
            if len(self._head) < _NAME_SCAN:
                self._head += text[: _NAME_SCAN - len(self._head)]

    def _open(self) -> None:
        self._call, self._head, self._seek_name, self._skipped = [], "", True, None

    # -- the format's part --
    def read_name(self, call: str) -> str | None:
        """The function name, once `call` (the text after <tool_call> so far) holds all of it."""
        raise NotImplementedError

    def read_arguments(self, name: str | None, call: str, closed: bool) -> tuple[str | None, str]:
        """(name, arguments JSON text) of a call's text; name None when the call is unreadable."""
        raise NotImplementedError

    def ends_here(self, piece: str) -> bool:
        """Whether a `</tool_call>` that follows `piece` (the call's text since the last one) ends the call."""
        return True

    # -- streaming --
    def feed(self, text: str) -> ToolDelta:
        out = ToolDelta()
        buf = self._buf + text
        while buf:
            if self._call is None:
                if self.max_calls is not None and len(self.calls) >= self.max_calls:
                    self._content(out, buf)
                    buf = ""
                    break
                i = buf.find(TOOL_CALL_OPEN)
                if i < 0:
                    hold = _partial_len(buf, TOOL_CALL_OPEN)
                    self._content(out, buf[: len(buf) - hold])
                    buf = buf[len(buf) - hold :]
                    break
                self._content(out, buf[:i])
                buf = buf[i + len(TOOL_CALL_OPEN) :]
                self._open()
            else:
                j = buf.find(TOOL_CALL_CLOSE)
                if j < 0:
                    hold = _partial_len(buf, TOOL_CALL_CLOSE)
                    self._grow(buf[: len(buf) - hold])
                    self.ends_here(buf[: len(buf) - hold])  # the format's reading of the call moves on
                    buf = buf[len(buf) - hold :]
                    self._name_out(out)
                    break
                self._grow(buf[:j])
                ends = self.ends_here(buf[:j]) or self._any_close_ends
                buf = buf[j + len(TOOL_CALL_CLOSE) :]
                if ends:
                    self._close(out, closed=True)
                else:  # inside a JSON string: text of the call
                    if self._skipped is None:
                        self._skipped = sum(map(len, self._call or []))
                    self._grow(TOOL_CALL_CLOSE)
        self._buf = buf
        return out

    def finish(self) -> ToolDelta:
        """The end of the output: release held text, close a call left open.

        A call left open after a `</tool_call>` that was not taken as its end (it stood in a JSON string, say an
        unbalanced quote of an unconstrained model) ends there after all, and the rest is read again.
        """
        out = ToolDelta()
        if self._call is not None:
            self._grow(self._buf)
            self._buf = ""
            if self._skipped is not None:
                text, cut = "".join(self._call), self._skipped
                self._call = [text[:cut]]
                self._close(out, closed=True)
                self._any_close_ends = True  # the rest is read once, as without the rule: linear, no recursion
                more, end = self.feed(text[cut + len(TOOL_CALL_CLOSE) :]), self.finish()
                return ToolDelta(out.content + more.content + end.content, out.calls + more.calls + end.calls)
            self._close(out, closed=False)
        else:
            self._content(out, self._buf)
        self._buf = ""
        if not self.calls:
            out.content += self._space
        self._space = ""
        return out

    def parse(self, text: str) -> tuple[str, list[ToolCall]]:
        """The whole output at once: exactly what feed(text) + finish() stream."""
        a, b = self.feed(text), self.finish()
        return a.content + b.content, list(self.calls)

    def _content(self, out: ToolDelta, text: str) -> None:
        if not text:
            return
        text = self._space + text
        body = text.rstrip()
        self._space = text[len(body) :]
        out.content += body

    def _name_out(self, out: ToolDelta) -> None:
        if self._named is None and self._call is not None and self._seek_name:
            name = self.read_name(self._head)
            self._seek_name = name is None and len(self._head) < _NAME_SCAN  # else given up until the call closes
            if name is not None:
                self._named = ToolCall(f"call_{uuid.uuid4().hex[:24]}", name, "")
                out.calls.append(ToolCallDelta(len(self.calls), self._named.id, name))

    def _close(self, out: ToolDelta, closed: bool) -> None:
        self._name_out(out)  # before the call is cleared: a whole text names its calls as a stream of it does
        call, self._call = "".join(self._call or ()), None
        named, self._named = self._named, None
        name, arguments = self.read_arguments(named.name if named else None, call, closed)
        if named is None and name is None:  # unreadable and never announced: it stays text
            self._content(out, TOOL_CALL_OPEN + call + (TOOL_CALL_CLOSE if closed else ""))
            return
        if named is None:
            named = ToolCall(f"call_{uuid.uuid4().hex[:24]}", name, "")
            out.calls.append(ToolCallDelta(len(self.calls), named.id, name))
        named.arguments = arguments
        out.calls.append(ToolCallDelta(len(self.calls), arguments=arguments))
        self.calls.append(named)


class GlmToolParser(ToolCallParser):
    """GLM-4.5V/4.6V: `NAME\\n<arg_key>K</arg_key>\\n<arg_value>V</arg_value>...`; a value is raw text for a
    parameter whose schema type is string, else JSON (raw text where it is not JSON)."""

    def read_name(self, call: str) -> str | None:
        call = call.lstrip()
        ends = [i for i in (call.find("\n"), call.find("<arg_key>")) if i >= 0]
        if not ends:
            return None
        name = call[: min(ends)].strip()
        return name if _NAME_RE.match(name) else None

    def read_arguments(self, name: str | None, call: str, closed: bool) -> tuple[str | None, str]:
        if name is None:
            head = call.split("<arg_key>", 1)[0].strip()
            name = head if _NAME_RE.match(head) and ("<arg_key>" in call or closed) else None
        props = self.params.get(name or "", {})
        args: dict[str, Any] = {}
        for key, value in _GLM_PAIR.findall(call):
            key, value = key.strip(), value.strip()
            args[key] = value if _is_string(props.get(key)) else _json_or_text(value)
        return name, json.dumps(args, ensure_ascii=False)


class HermesToolParser(ToolCallParser):
    """Qwen2.5's hermes format: `{"name": NAME, "arguments": {...}}` between the tags."""

    def _open(self) -> None:
        super()._open()
        self._in_string = self._escape = False  # where the JSON text of the call so far ends

    def ends_here(self, piece: str) -> bool:
        """`</tool_call>` inside a JSON string is part of that string (a constrained call's grammar lets the
        model write it there), not the call's end. Scanned once per piece: streaming stays linear."""
        i = 0
        if self._escape and piece:
            i, self._escape = 1, False
        while (m := _QUOTE_OR_BACKSLASH.search(piece, i)) is not None:
            i = m.end()
            if m.group() == '"':
                self._in_string = not self._in_string
            elif self._in_string:  # a backslash escapes the next character, perhaps in the next piece
                if i == len(piece):
                    self._escape = True
                i += 1
        return not self._in_string

    def read_name(self, call: str) -> str | None:
        m = _HERMES_HEAD.match(call)
        if m is None:
            return None
        try:
            return json.loads(f'"{m.group(1)}"')
        except ValueError:
            return None

    def read_arguments(self, name: str | None, call: str, closed: bool) -> tuple[str | None, str]:
        try:
            obj = json.loads(call)
        except (ValueError, RecursionError):  # RecursionError: nested too deeply for the decoder
            obj = None
        if isinstance(obj, dict) and isinstance(obj.get("name"), str):
            args = obj.get("arguments", obj.get("parameters", {}))
            if isinstance(args, str):  # some models write the arguments as a JSON string
                args = _json_or_text(args)
            if isinstance(args, dict):
                return name or obj["name"], json.dumps(args, ensure_ascii=False)
        m = _HERMES_HEAD.match(call)
        if name is None or m is None:
            return None, ""
        # Not JSON (cut short by max_tokens, or malformed): the arguments as written, less the wrapper's "}".
        raw = call[m.end() :].strip()
        return name, raw[:-1].rstrip() if closed and raw.endswith("}") else raw


def _is_string(schema: Any) -> bool:
    if not isinstance(schema, dict):
        return False
    kind = schema.get("type")
    if kind is None and "enum" in schema:
        return all(isinstance(v, str) for v in schema["enum"])
    return kind == "string" or (isinstance(kind, list) and kind == ["string"])


def _json_or_text(value: str) -> Any:
    try:
        return json.loads(value)
    except (ValueError, RecursionError):  # RecursionError: nested too deeply for the decoder
        return value


def call_tags_are_special(tokenizer) -> bool:
    """True if the tokenizer holds `<tool_call>` as a special token, which detokenizing would skip by default."""
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return any(t.content == TOOL_CALL_OPEN and t.special for t in added.values())
