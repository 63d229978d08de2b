"""Step 9 of the data path, the constraint: structured output as a token bitmask over the vocabulary.

`StructuredOutputs` (one per engine) checks a `StructuredOutputsParams` at once (size, depth, schema
keywords the grammar engine would silently ignore), then compiles it with xgrammar in a thread pool,
off the engine loop, behind an LRU cache keyed by the spec; the engine waits for the future (with a
timeout) while it keeps stepping other requests. `ConstraintSpec` is what a sequence carries to the
model runner; `OutputConstraint` is the runner's per-sequence state (reasoning phase, grammar matcher),
which writes its row of a `[B, ceil(V / 32)]` int32 bitmask each step and advances on each sampled token.

Reasoning first (GLM thinking templates): a prompt that ends inside `<think>` reasons freely until the
model writes `</think>`; one that ends at the assistant turn (`<|assistant|>`) opens with `<think>`
(forced when a constraint is waiting); the constraint starts after `</think>`. While a constraint
waits, the stop tokens are banned (the answer must come). `thinking_token_budget=N` forces `</think>`
once N tokens were spent thinking. Elsewhere (a prompt that closed thinking, Qwen) the constraint
starts at the first token.
"""

from __future__ import annotations

import collections
import json
import logging
import re
import threading
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from glimpse.engine.sampling_params import SamplingParams, StructuredOutputsParams
from glimpse.errors import InvalidInputError, LimitExceededError

log = logging.getLogger("glimpse.engine")

THINK_OPEN, THINK_CLOSE, ASSISTANT = "<think>", "</think>", "<|assistant|>"
# Families whose chat templates think in <think>...</think> (glimpse/server/reasoning.py's GLM_FAMILIES).
THINKING_FAMILIES = ("glm4v", "glm46v", "glmga")


@dataclass(frozen=True)
class StructuredLimits:
    """Bounds on a constraint, checked before it is compiled (EngineConfig / LLM keywords of the same names)."""

    max_bytes: int = 64 * 1024  # structured_output_max_bytes: the spec's JSON text
    max_depth: int = 24  # structured_output_max_depth: nesting of subschemas (properties, items, anyOf, ...)
    compile_timeout: float = 10.0  # structured_output_compile_timeout: seconds, from arrival


# ---- checking a spec before compiling ------------------------------------------------------------

# JSON Schema keywords that constrain values but that xgrammar 0.2.9 ignores (measured: it accepts values
# that break them) or cannot express: refused, never silently dropped. Annotations (title, description,
# default, examples, ...) and unknown keywords do not constrain values, in JSON Schema as in `jsonschema`.
_UNSUPPORTED_KEYWORDS = {
    "not": "negation", "allOf": "schema intersection", "if": "conditionals", "then": "conditionals",
    "else": "conditionals", "dependentRequired": "property dependencies", "dependentSchemas": "property dependencies",
    "dependencies": "property dependencies", "minContains": "contains counts", "maxContains": "contains counts",
    "additionalItems": "draft-7 tuples (use prefixItems)", "$dynamicRef": "dynamic references",
    "$recursiveRef": "dynamic references",
}  # fmt: skip
# Formats whose values xgrammar 0.2.9 checks (measured); another format would be ignored.
_FORMATS = frozenset({"date-time", "date", "time", "duration", "email", "hostname", "ipv4", "ipv6", "uuid", "uri",
                      "uri-reference", "json-pointer"})  # fmt: skip
# Keywords whose value is a subschema, a list of them, or a name -> subschema map.
# How a message names each kind of constraint.
_WHAT = {"json": "JSON schema", "json_object": "JSON object constraint", "regex": "regex", "choice": "choice list",
         "grammar": "grammar", "structural_tag": "structural tag"}  # fmt: skip
_ONE = ("items", "contains", "additionalProperties", "propertyNames", "unevaluatedProperties", "unevaluatedItems")
_LIST = ("prefixItems", "anyOf", "oneOf")
_MAP = ("properties", "patternProperties", "$defs", "definitions")


def check_spec(spec: StructuredOutputsParams, limits: StructuredLimits) -> None:
    """Raise InvalidInputError if `spec` is over the limits, or is a schema using a keyword that would be ignored."""
    try:
        size = len(spec.key().encode())
    except RecursionError:  # a dict nested thousands deep (offline): past any depth limit
        raise InvalidInputError(f"the structured-output {_WHAT[spec.kind]} nests deeper than {limits.max_depth} "
                                "levels (structured_output_max_depth; glimpse serve --structured-output-max-depth); "
                                "flatten it") from None  # fmt: skip
    if size > limits.max_bytes:
        raise InvalidInputError(
            f"the structured-output {_WHAT[spec.kind]} is {size} bytes, over the limit of {limits.max_bytes} "
            "(structured_output_max_bytes; glimpse serve --structured-output-max-bytes); simplify it")  # fmt: skip
    problems: list[str] = []
    if spec.json is not None:
        _walk_schema(spec.json, "#", 0, limits.max_depth, problems)
    elif spec.structural_tag is not None:
        # A user's tag (or a tool call's) holds JSON schemas too: the same keywords would be ignored there.
        try:
            tag = json.loads(spec.structural_tag)
        except (ValueError, RecursionError):
            return  # not JSON: the compile says so
        for path, schema in _tag_schemas(tag, "#"):
            _walk_schema(schema, path, 0, limits.max_depth, problems)
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise InvalidInputError(f"the JSON schema uses features glimpse cannot enforce: {shown}. Remove them "
                                "(docs/structured-output.md lists what is supported)")  # fmt: skip


def _walk_schema(schema: Any, path: str, depth: int, max_depth: int, problems: list[str]) -> None:
    if isinstance(schema, bool):
        return
    if not isinstance(schema, dict):
        problems.append(f"{path} is a {type(schema).__name__}, not a schema object")
        return
    if depth > max_depth:
        raise InvalidInputError(f"the JSON schema nests deeper than {max_depth} levels at {path} (structured_output_"
                                "max_depth; glimpse serve --structured-output-max-depth); flatten it")  # fmt: skip
    for key, what in _UNSUPPORTED_KEYWORDS.items():
        if key in schema:
            problems.append(f"'{key}' ({what}) at {path}")
    if schema.get("uniqueItems") is True:
        problems.append(f"'uniqueItems' at {path}")
    fmt = schema.get("format")
    if fmt is not None and fmt not in _FORMATS:
        problems.append(f"'format': {fmt!r} at {path} (supported: {', '.join(sorted(_FORMATS))})")
    if "multipleOf" in schema and (schema.get("type") != "integer" or not isinstance(schema["multipleOf"], int)):
        problems.append(f"'multipleOf' other than an integer step of an integer at {path}")
    if isinstance(schema.get("items"), list):
        problems.append(f"'items' as a list (draft-7 tuples; use prefixItems) at {path}")
    pattern = schema.get("pattern")
    if isinstance(pattern, str) and _control_in_pattern(pattern):
        problems.append(f"'pattern' matching a control character (below U+0020) at {path} (JSON strings hold those "
                        "only escaped, which the grammar cannot produce; the answer could never be valid)")  # fmt: skip
    ref = schema.get("$ref")
    if ref is not None and not (isinstance(ref, str) and ref.startswith("#")):
        problems.append(f"'$ref': {ref!r} at {path} (only references inside the schema, '#/...')")
    required, properties = schema.get("required"), schema.get("properties")
    if isinstance(required, list):
        named = properties if isinstance(properties, dict) else {}
        missing = [name for name in required if isinstance(name, str) and name not in named]
        if missing:  # xgrammar drops them: {} would pass
            problems.append(f"'required' name{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))} not "
                            f"under 'properties' at {path} (list each required property there)")  # fmt: skip
    for key in _ONE:
        if isinstance(schema.get(key), dict):
            _walk_schema(schema[key], f"{path}/{key}", depth + 1, max_depth, problems)
    for key in _LIST:
        if isinstance(schema.get(key), list):
            for i, sub in enumerate(schema[key]):
                _walk_schema(sub, f"{path}/{key}/{i}", depth + 1, max_depth, problems)
    for key in _MAP:
        if isinstance(schema.get(key), dict):
            for name, sub in schema[key].items():
                _walk_schema(sub, f"{path}/{key}/{name}", depth + 1, max_depth, problems)


_CONTROL_ESCAPE = re.compile(r"\\(?:[nrtfv0a]|c[A-Za-z]|x[01][0-9A-Fa-f]|u00[01][0-9A-Fa-f])")


def _control_in_pattern(pattern: str) -> bool:
    """Whether `pattern` names a control character outside a character class (a literal, or an escape like \\n):
    xgrammar matches patterns against a JSON string's raw characters, and those cannot be raw. Inside a class
    ([^\\n], [\\s\\S]) another character usually serves, so classes are left alone."""
    depth, i, outside = 0, 0, []
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            if depth == 0:
                outside.append(pattern[i:i + 6])
            i += 2
            continue
        if c == "[":
            depth = 1
        elif c == "]" and depth:
            depth = 0
        elif depth == 0 and c < " ":
            return True
        i += 1
    return any(_CONTROL_ESCAPE.match(e) for e in outside)


def _tag_schemas(node: Any, path: str, depth: int = 0) -> Iterable[tuple[str, Any]]:
    """The JSON schemas inside a structural tag: each {"type": "json_schema", "json_schema": ...} and each
    legacy {"begin", "schema", "end"} structure, with where they are."""
    if depth > 64:
        return
    if isinstance(node, dict):
        for key, value in node.items():
            if (key == "json_schema" and node.get("type") == "json_schema") or (key == "schema" and "begin" in node):
                yield f"{path}/{key}", value
            else:
                yield from _tag_schemas(value, f"{path}/{key}", depth + 1)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _tag_schemas(value, f"{path}/{i}", depth + 1)


# ---- what a sequence carries to the runner -------------------------------------------------------


@dataclass(frozen=True)
class ConstraintSpec:
    """Plain data for the runner: the compiled grammar (None: only a thinking budget), where the answer starts."""

    grammar: Any  # xgrammar.CompiledGrammar | None
    reasoning: str  # "none": the answer starts at once; "inside": the prompt opened <think>; "opens": it may open
    think_open: int | None
    think_close: int | None
    thinking_budget: int | None
    stop_token_ids: tuple[int, ...]  # the model's end-of-sequence ids: the grammar's end
    # [ceil(V / 32)] int32 ANDed into the grammar's rows (None: nothing more): for JSON, the tokens without raw
    # control characters, which xgrammar 0.2.9 lets into strings with minLength/maxLength (invalid JSON).
    allowed: torch.Tensor | None = None


def reasoning_start(prompt_ids: Sequence[int], think_open: int | None, think_close: int | None,
                    assistant: int | None, whitespace: frozenset[int]) -> str:  # fmt: skip
    """Where a thinking template's prompt leaves the output: "inside" an open <think> block, "opens" at the
    assistant turn (the model writes <think> next), or "none" (thinking closed, e.g. enable_thinking false)."""
    if think_open is None or think_close is None:
        return "none"
    last_open = last_close = -1
    for i in range(len(prompt_ids) - 1, -1, -1):
        t = prompt_ids[i]
        if t == think_open and last_open < 0:
            last_open = i
        elif t == think_close and last_close < 0:
            last_close = i
        if last_open >= 0 and last_close >= 0:
            break
    if last_open > last_close:
        return "inside"
    end = len(prompt_ids)
    while end > 0 and prompt_ids[end - 1] in whitespace:
        end -= 1
    return "opens" if end > 0 and assistant is not None and prompt_ids[end - 1] == assistant else "none"


# ---- compiling -----------------------------------------------------------------------------------


class StructuredOutputs:
    """The engine's grammar compiler: checks, an LRU cache of compile futures, a small thread pool.

    xgrammar's tokenizer tables (a pass over the vocabulary) are built once, in the pool, by the first
    compile. Compiles release the GIL, so the engine loop keeps stepping meanwhile.
    """

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: Iterable[int], limits: StructuredLimits,
                 thinking_family: bool, workers: int = 2, cache_size: int = 256, max_pending: int = 64) -> None:  # fmt: skip
        self.tokenizer, self.vocab_size, self.limits = tokenizer, vocab_size, limits
        self.stop_token_ids = tuple(sorted(stop_token_ids))
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="glimpse-grammar")
        self._cache: collections.OrderedDict[str, Future] = collections.OrderedDict()
        self._cache_size = cache_size
        # The cache and counts: held briefly (the engine thread takes it in submit()); reentrant, as cancelling a
        # future under it runs its done callback (_settled) at once.
        self._lock = threading.RLock()
        self._build_lock = threading.Lock()  # the one-time vocabulary tables (seconds): only the pool's threads wait
        # Requests waiting on each compile still queued or running (submit counts one up, release one down): the
        # last to give up (timeout, abort) cancels it, so abandoned compiles do not hold the pool's workers.
        self._waiters: dict[Future, int] = {}
        self._pending: set[Future] = set()  # compiles queued or running, at most max_pending
        self.max_pending = max_pending
        self._compiler = None
        self._json_tokens: torch.Tensor | None = None  # set with the compiler
        vocab = tokenizer.get_vocab() if thinking_family else {}  # <think> etc. are single tokens or absent
        self.think_open, self.think_close = vocab.get(THINK_OPEN), vocab.get(THINK_CLOSE)
        if self.think_open is None or self.think_close is None:
            self.think_open = self.think_close = None
        self.assistant = vocab.get(ASSISTANT) if self.think_open is not None else None
        self._whitespace: frozenset[int] | None = None

    @property
    def thinks(self) -> bool:
        """Whether this model's template thinks in <think> ... </think> (single tokens in its vocabulary)."""
        return self.think_open is not None

    def whitespace_ids(self) -> frozenset[int]:
        """Token ids that decode to whitespace only (found once, on first use)."""
        if self._whitespace is None:
            ids = [i for t, i in self.tokenizer.get_vocab().items() if t.strip("ĠĊĉč \n\t\r") == ""]
            self._whitespace = frozenset(i for i in ids if self.tokenizer.decode([i]).strip() == "")
        return self._whitespace

    def spec_for(self, params: SamplingParams, prompt_ids: Sequence[int], grammar: Any) -> ConstraintSpec:
        """The runner's view of a sequence's constraint, once its grammar (if any) is compiled."""
        reasoning = "none"
        if self.thinks:
            reasoning = reasoning_start(prompt_ids, self.think_open, self.think_close, self.assistant,
                                        self.whitespace_ids())  # fmt: skip
        so = params.structured_outputs
        allowed = self._json_tokens if so is not None and so.kind in ("json", "json_object") else None
        return ConstraintSpec(grammar, reasoning, self.think_open, self.think_close, params.thinking_token_budget,
                              self.stop_token_ids, allowed)  # fmt: skip

    def check_budget(self, params: SamplingParams) -> None:
        if params.thinking_token_budget is not None and not self.thinks:
            raise InvalidInputError(
                "thinking_token_budget needs a thinking model (a GLM thinking template with <think> and </think> "
                "tokens); this model does not think, so leave it unset")  # fmt: skip

    def submit(self, spec: StructuredOutputsParams) -> Future:
        """Check `spec` now (InvalidInputError), then a future of its compiled grammar (shared by equal specs)."""
        check_spec(spec, self.limits)
        key = spec.key()
        with self._lock:
            future = self._cache.get(key)
            if future is not None and not future.cancelled() and not (future.done() and future.exception() is not None):
                self._cache.move_to_end(key)
            else:
                if len(self._pending) >= self.max_pending:
                    raise LimitExceededError(
                        f"{len(self._pending)} structured-output grammars are already compiling or queued, the "
                        f"limit is {self.max_pending}; retry when fewer requests are waiting for theirs")  # fmt: skip
                future = self._pool.submit(self._compile, spec)
                self._pending.add(future)
                future.add_done_callback(self._settled)
                self._cache[key] = future
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
            if not future.done():
                self._waiters[future] = self._waiters.get(future, 0) + 1
        return future

    def release(self, future: Future) -> None:
        """A request stops waiting for `future` (admitted, timed out or aborted); when none waits for an unfinished
        compile any more, cancel it (a queued compile never starts) and drop it from the cache (a running one cannot
        be stopped, but the next equal spec starts afresh rather than inherit a compile that already timed out)."""
        with self._lock:
            left = self._waiters.get(future, 0) - 1
            if left > 0:
                self._waiters[future] = left
                return
            self._waiters.pop(future, None)
            if future.done():
                return
            future.cancel()
            for key, cached in list(self._cache.items()):
                if cached is future:
                    del self._cache[key]

    def _settled(self, future: Future) -> None:
        with self._lock:
            self._pending.discard(future)

    def compile_error(self, spec: StructuredOutputsParams, exc: BaseException) -> InvalidInputError:
        """A failed compile as the user's error (400): the grammar engine's own words, trimmed."""
        if isinstance(exc, InvalidInputError):
            return exc
        text = str(exc).strip().splitlines()
        detail = text[-1] if text else type(exc).__name__
        detail = detail.split("] ", 1)[-1] if detail.startswith("[") else detail
        detail = detail.split(": ", 1)[-1] if ".cc:" in detail else detail
        return InvalidInputError(f"the structured-output {_WHAT[spec.kind]} cannot be compiled: {detail[:300]}")

    def timeout_error(self, spec: StructuredOutputsParams) -> InvalidInputError:
        return InvalidInputError(
            f"compiling the structured-output {_WHAT[spec.kind]} took longer than {self.limits.compile_timeout:g} s "
            "(structured_output_compile_timeout; glimpse serve --structured-output-compile-timeout); "
            "simplify it")  # fmt: skip

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _xgrammar_compiler(self):
        with self._build_lock:
            if self._compiler is None:
                import xgrammar as xgr

                t0 = time.perf_counter()
                info = xgr.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.vocab_size,
                                                          stop_token_ids=list(self.stop_token_ids))  # fmt: skip
                # Compact JSON holds no raw byte below 0x20 anywhere (whitespace is ", " and ": " only).
                plain = [b.translate(None, _CONTROL_BYTES) == b for b in info.decoded_vocab]
                plain += [True] * (self.vocab_size - len(plain))
                self._json_tokens = _bitmask_of(plain)
                if self.thinks:
                    self.whitespace_ids()  # here rather than on the engine thread when the first grammar is used
                # glimpse keeps its own cache (keyed by the spec); xgrammar's would be a second, unbounded one.
                self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
                log.info("grammar engine ready for a %d-token vocabulary in %.2f s", self.vocab_size,
                         time.perf_counter() - t0)  # fmt: skip
            return self._compiler

    def _compile(self, spec: StructuredOutputsParams):
        compiler = self._xgrammar_compiler()
        kind = spec.kind
        if kind == "json":
            # One line with ", " / ": " separators: no whitespace for a model to loop in.
            return compiler.compile_json_schema(spec.json, any_whitespace=False, strict_mode=True)
        if kind == "json_object":
            return compiler.compile_json_schema({"type": "object"}, any_whitespace=False, strict_mode=False)
        if kind == "regex":
            return compiler.compile_regex(spec.regex)
        if kind == "choice":
            # EBNF strings take JSON's escapes, but a character beyond U+FFFF must stay as itself: a surrogate pair
            # of escapes (ensure_ascii) would be read as two (invalid) code points and match nothing.
            return compiler.compile_grammar("root ::= " + " | ".join(json.dumps(c, ensure_ascii=False)
                                                                      for c in spec.choice))  # fmt: skip
        if kind == "grammar":
            return compiler.compile_grammar(spec.grammar)
        return compiler.compile_structural_tag(spec.structural_tag)


# ---- the runner's per-sequence state -------------------------------------------------------------


# What `OutputConstraint.accept` returns when the constraint allowed no token at all (say a pattern only raw
# control characters satisfy, which JSON strings may not hold): the engine ends the sequence with finish_reason
# "abort" instead of emitting a token the grammar never allowed.
DEAD_END = "dead_end"


def bitmask_width(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


_CONTROL_BYTES = bytes(range(32))


def _bitmask_of(allowed: Sequence[bool]) -> torch.Tensor:
    """A [ceil(V / 32)] int32 bitmask row from V booleans (bit t % 32 of word t // 32)."""
    flags = torch.tensor(allowed, dtype=torch.int64)
    flags = torch.cat([flags, flags.new_zeros(-len(allowed) % 32)]).view(-1, 32)
    words = (flags << torch.arange(32, dtype=torch.int64)).sum(dim=1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _bit(token: int) -> int:
    """The token's bit in its int32 bitmask word (word token // 32); bit 31 is the int32 sign bit."""
    bit = token % 32
    return (1 << bit) - (1 << 32 if bit == 31 else 0)


def _only(token: int, width: int) -> torch.Tensor:
    """A bitmask row allowing one token."""
    row = torch.zeros(width, dtype=torch.int32)
    row[token // 32] = _bit(token)
    return row


def _clear(row: torch.Tensor, tokens: Iterable[int]) -> None:
    for t in tokens:
        row[t // 32] &= ~_bit(t)


class OutputConstraint:
    """One sequence's constraint: its phase (before / thinking / answer) and its grammar matcher.

    `mask_row(out)` writes the next token's bitmask row (or says any token may come), `accept(token)`
    advances and returns True once the grammar has reached its end (the sequence then stops with
    finish_reason stop, without spending a step on the end-of-sequence token).
    """

    def __init__(self, spec: ConstraintSpec) -> None:
        self.spec = spec
        self.width = 0  # the bitmask row's length, ceil(logits width / 32): known from the first mask_row
        self.matcher = None
        if spec.grammar is not None:
            import xgrammar as xgr

            self.matcher = xgr.GrammarMatcher(spec.grammar, terminate_without_stop_token=False)
        self.phase = {"inside": "thinking", "opens": "before"}.get(spec.reasoning, "answer")
        self.thinking_tokens = 0
        self._next_row: torch.Tensor | None = None  # computed early by `accept` when the grammar could end
        self._no_stop: torch.Tensor | None = None
        self.dead_end = False  # the last row allowed nothing: the sequence ends (see DEAD_END)

    @property
    def forced_token(self) -> int | None:
        """The token this step must be, if any: <think> to open a constrained answer's reasoning, </think> at the budget."""
        spec = self.spec
        if self.phase == "before" and self.matcher is not None:
            return spec.think_open
        if self.phase == "thinking" and spec.thinking_budget is not None and self.thinking_tokens >= spec.thinking_budget:
            return spec.think_close
        return None

    def mask_row(self, out: torch.Tensor) -> bool:
        """Write the next token's allowed set into `out` ([width] int32); False when any token may come."""
        self.width = out.numel()
        forced = self.forced_token
        if forced is not None:
            out.copy_(_only(forced, self.width))
            return True
        if self.phase != "answer":
            if self.matcher is None:
                return False
            if self._no_stop is None:  # thinking before a constrained answer: anything but the end
                self._no_stop = torch.full((self.width,), -1, dtype=torch.int32)
                _clear(self._no_stop, self.spec.stop_token_ids)
            out.copy_(self._no_stop)
            return True
        if self.matcher is None:
            return False
        if self._next_row is not None:
            out.copy_(self._next_row)
            self._next_row = None
            return True
        self._grammar_row(out)
        if not bool(out.any()):
            # Nothing may come: all logits would be -inf (token 0 sampled, NaN logprobs). Let the end-of-sequence
            # tokens through so the sampler has finite values; `accept` then ends the sequence as a dead end.
            log.error("the structured-output constraint allows no token here; ending the sequence (finish_reason "
                      "abort)")  # fmt: skip
            self.dead_end = True
            if self.spec.stop_token_ids:
                out.zero_()
                for t in self.spec.stop_token_ids:
                    out[t // 32] |= _bit(t)
            else:
                out.fill_(-1)
        return True

    def _grammar_row(self, out: torch.Tensor) -> torch.Tensor:
        """The matcher's next-token row written into `out`, less the tokens the spec never allows."""
        self.matcher.fill_next_token_bitmask(out.unsqueeze(0), 0)
        if self.spec.allowed is not None:
            out &= self.spec.allowed
        return out

    def accept(self, token: int) -> bool | str:
        """Advance past a sampled token; True when the grammar is complete and allows nothing but the stop tokens,
        DEAD_END when the last row allowed no token (the token is not the grammar's; the sequence must end)."""
        if self.dead_end:
            return DEAD_END
        spec = self.spec
        if self.phase == "before":
            if token == spec.think_open:
                self.phase = "thinking"
            elif self.matcher is None:
                self.phase = "answer"  # the model answered without thinking; nothing to constrain
            return False
        if self.phase == "thinking":
            if token == spec.think_close:
                self.phase = "answer"
            else:
                self.thinking_tokens += 1
            return False
        matcher = self.matcher
        if matcher is None:
            return False
        if not matcher.accept_token(token):
            # The mask allowed it, so this is a grammar-engine bug; stop rather than emit unconstrained text.
            log.error("the grammar matcher refused token %d that its mask allowed; ending the sequence", token)
            return True
        if matcher.is_terminated():
            return True
        if matcher.is_completed():
            row = self._grammar_row(torch.empty(self.width, dtype=torch.int32))
            rest = row.clone()
            _clear(rest, spec.stop_token_ids)
            if not bool(rest.any()):
                return True
            self._next_row = row
        return False
