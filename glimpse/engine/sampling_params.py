"""Step 9 of the data path, the request's sampling settings: vLLM's `SamplingParams`, validated.

Plain frozen data with vLLM's field names and defaults so users' habits carry over. Every
field is checked on construction (`InvalidInputError` naming the field, the value and the
allowed range); ids that depend on the model's vocabulary are checked by `validate_for_vocab`.
`StructuredOutputsParams` is vLLM's constraint on the output (a JSON schema, any JSON object, a
regex, a choice, a grammar or an xgrammar structural tag), compiled by glimpse/engine/structured.py.
`Logprob` is vLLM's per-token logprob record, for outputs read the vLLM way.
"""

from __future__ import annotations

import json as _json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from glimpse.errors import InvalidInputError

# Below this temperature a request is greedy (vLLM's `_SAMPLING_EPS`).
GREEDY_TEMPERATURE = 1e-5
# Most alternatives a request may ask for per token (OpenAI's `top_logprobs` ceiling, vLLM's default).
MAX_LOGPROBS = 20
# OpenAI's range for `logit_bias` values: -100 bans a token, +100 all but forces it.
MAX_LOGIT_BIAS = 100.0
# vLLM's range for presence and frequency penalties (OpenAI's too).
MAX_ADDITIVE_PENALTY = 2.0
# `torch.Generator.manual_seed` takes seeds in [0, 2**64).
_SEED_LIMIT = 2**64


def _fail(name: str, value: object, allowed: str) -> InvalidInputError:
    return InvalidInputError(f"SamplingParams.{name}={value!r} is invalid: {allowed}")


def _check_int(name: str, value: object, low: int, allowed: str) -> int:
    # bool is an int subclass; `n=True` is a mistake, not 1.
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise _fail(name, value, allowed)
    return value


def _check_float(name: str, value: object, low: float, high: float, allowed: str,
                 low_open: bool = False) -> float:  # fmt: skip
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _fail(name, value, allowed + " (a finite number)")
    if value < low or value > high or (low_open and value == low):
        raise _fail(name, value, allowed)
    return float(value)


def _check_bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise _fail(name, value, "must be true or false")


def _token_id(name: str, value: object) -> int:
    """A token id from an int or, for JSON object keys such as logit_bias's, a decimal string."""
    if isinstance(value, str):
        try:
            value = int(value)
        except ValueError:
            raise _fail(name, value, "token ids must be integers >= 0") from None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _fail(name, value, "token ids must be integers >= 0")
    return value


_CONSTRAINT_FIELDS = ("json", "json_object", "regex", "choice", "grammar", "structural_tag")


@dataclass(frozen=True)
class StructuredOutputsParams:
    """What the output must match (vLLM's `StructuredOutputsParams`): exactly one field is set.

    json: a JSON schema (a dict, or its JSON text, which is parsed here); json_object: any JSON
    object (OpenAI's `response_format` `{"type": "json_object"}`); regex; choice: one of these
    strings exactly; grammar: xgrammar's EBNF; structural_tag: xgrammar's structural-tag JSON text
    (tool calling). After construction `json` is a dict and `choice` a tuple of strings. How big a
    schema may be, and how long it may take to compile, is checked by the engine (structured.py).
    """

    # A dict is unhashable: left out of the hash (it still takes part in ==), like logit_bias.
    json: dict | str | None = field(default=None, hash=False)
    json_object: bool = False
    regex: str | None = None
    choice: Sequence[str] | None = None
    grammar: str | None = None
    structural_tag: str | None = None

    def __post_init__(self) -> None:
        def fail(name: str, value: object, allowed: str) -> InvalidInputError:
            return InvalidInputError(f"StructuredOutputsParams.{name}={_short(value)} is invalid: {allowed}")

        given = [name for name in _CONSTRAINT_FIELDS if _is_set(self, name)]
        if len(given) != 1:
            raise InvalidInputError(
                f"StructuredOutputsParams needs exactly one of {', '.join(_CONSTRAINT_FIELDS)}; got "
                f"{', '.join(given) if given else 'none'}")  # fmt: skip
        if not isinstance(self.json_object, bool):
            raise fail("json_object", self.json_object, "must be true or false")
        if isinstance(self.json, str):
            try:
                schema = _json.loads(self.json)
            except ValueError as exc:
                raise fail("json", self.json, f"a schema given as text must be JSON ({exc})") from None
            except RecursionError:  # thousands of '[': Python's parser gives up, a user's mistake all the same
                raise fail("json", self.json, "a schema given as text nests too deeply to parse") from None
            object.__setattr__(self, "json", schema)
        if self.json is not None and not isinstance(self.json, dict):
            raise fail("json", self.json, "must be a JSON schema: an object (or its JSON text)")
        for name in ("regex", "grammar", "structural_tag"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise fail(name, value, "must be a non-empty string")
        if self.choice is not None:
            if isinstance(self.choice, str) or not isinstance(self.choice, Sequence) or not self.choice:
                raise fail("choice", self.choice, "must be a non-empty list of strings")
            if not all(isinstance(c, str) for c in self.choice):
                raise fail("choice", self.choice, "every choice must be a string")
            object.__setattr__(self, "choice", tuple(self.choice))

    @property
    def kind(self) -> str:
        """Which field is set ("json", "json_object", "regex", "choice", "grammar" or "structural_tag")."""
        return next(name for name in _CONSTRAINT_FIELDS if _is_set(self, name))

    def key(self) -> str:
        """A canonical text of the constraint: equal constraints have equal keys (the grammar cache's key)."""
        value = getattr(self, self.kind)
        return self.kind + ":" + _json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _is_set(params: StructuredOutputsParams, name: str) -> bool:
    value = getattr(params, name)
    return value is not False if name == "json_object" else value is not None


def _short(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each output token of one request (vLLM semantics; see sampler.py for the order).

    After construction `stop` is a tuple of strings, `stop_token_ids` a tuple of unique ints,
    `logit_bias` a `{token_id: float}` copy or None, and `seed=-1` (vLLM's "no seed") is None.
    `temperature < 1e-5` means greedy; the filters (top_p, top_k, min_p) are then ignored.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16  # None: up to the context length (max_model_len), as in vLLM
    min_tokens: int = 0
    stop: str | Sequence[str] | None = None
    stop_token_ids: Sequence[int] | None = None
    ignore_eos: bool = False
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None  # k: the sampled token's logprob plus the k most likely
    # A dict is unhashable, so it is left out of the hash (it still takes part in ==).
    logit_bias: Mapping[int, float] | None = field(default=None, hash=False)
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # The output must match this constraint (after the reasoning, on thinking templates; see structured.py).
    structured_outputs: StructuredOutputsParams | None = None
    # Thinking templates: output tokens the reasoning may take before `</think>` is forced (None: no limit).
    thinking_token_budget: int | None = None

    def __post_init__(self) -> None:
        # Normalising a frozen dataclass has to go through object.__setattr__; it happens only
        # here, before anyone can see the object.
        def put(name: str, value: object) -> None:
            object.__setattr__(self, name, value)

        _check_int("n", self.n, 1, "must be an integer >= 1")
        _check_float("temperature", self.temperature, 0.0, math.inf, "must be >= 0 (0 means greedy)")
        _check_float("top_p", self.top_p, 0.0, 1.0, "must be in (0, 1] (1 disables it)", low_open=True)
        _check_int("top_k", self.top_k, -1, "must be an integer >= 1, or 0 / -1 to disable it")
        _check_float("min_p", self.min_p, 0.0, 1.0, "must be in [0, 1] (0 disables it)")
        if self.max_tokens is not None:
            _check_int("max_tokens", self.max_tokens, 1, "must be an integer >= 1, or None for up to the context length")
        _check_int("min_tokens", self.min_tokens, 0, "must be an integer >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise _fail("min_tokens", self.min_tokens, f"must be <= max_tokens ({self.max_tokens})")
        _check_float("repetition_penalty", self.repetition_penalty, 0.0, math.inf,
                     "must be > 0 (1 disables it)", low_open=True)  # fmt: skip
        for name in ("presence_penalty", "frequency_penalty"):
            _check_float(name, getattr(self, name), -MAX_ADDITIVE_PENALTY, MAX_ADDITIVE_PENALTY,
                         f"must be in [-{MAX_ADDITIVE_PENALTY:g}, {MAX_ADDITIVE_PENALTY:g}] (0 disables it)")  # fmt: skip
        for name in ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output"):
            _check_bool(name, getattr(self, name))

        if type(self.seed) is int and self.seed == -1:
            put("seed", None)
        elif self.seed is not None:
            allowed = "must be an integer in [0, 2**64), or -1 / null for none"
            if _check_int("seed", self.seed, 0, allowed) >= _SEED_LIMIT:
                raise _fail("seed", self.seed, allowed)

        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, 0, f"must be null or an integer in [0, {MAX_LOGPROBS}]")
            if self.logprobs > MAX_LOGPROBS:
                raise _fail("logprobs", self.logprobs, f"must be null or an integer in [0, {MAX_LOGPROBS}]")

        if self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputsParams):
            raise _fail("structured_outputs", self.structured_outputs, "must be a StructuredOutputsParams or None")
        if self.thinking_token_budget is not None:
            _check_int("thinking_token_budget", self.thinking_token_budget, 0,
                       "must be null or an integer >= 0 (output tokens of reasoning before </think> is forced)")  # fmt: skip

        put("stop", self._normalise_stop(self.stop))
        put("stop_token_ids", self._normalise_stop_token_ids(self.stop_token_ids))
        put("logit_bias", self._normalise_logit_bias(self.logit_bias))

        if self.is_greedy and self.n > 1:
            # Every greedy sample is the same sequence; vLLM refuses this too.
            raise _fail("n", self.n, "must be 1 when temperature is 0 (greedy); raise temperature for n > 1")

    @staticmethod
    def _normalise_stop(stop: object) -> tuple[str, ...]:
        if stop is None:
            return ()
        items = [stop] if isinstance(stop, str) else stop
        if not isinstance(items, Sequence):
            raise _fail("stop", stop, "must be a string, a list of strings or null")
        for s in items:
            if not isinstance(s, str) or not s:
                raise _fail("stop", stop, "every stop string must be a non-empty string")
        return tuple(items)

    @staticmethod
    def _normalise_stop_token_ids(ids: object) -> tuple[int, ...]:
        if ids is None:
            return ()
        if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
            raise _fail("stop_token_ids", ids, "must be a list of token ids or null")
        # dict.fromkeys keeps first-occurrence order while dropping repeats.
        return tuple(dict.fromkeys(_token_id("stop_token_ids", t) for t in ids))

    @staticmethod
    def _normalise_logit_bias(bias: object) -> dict[int, float] | None:
        if bias is None:
            return None
        if not isinstance(bias, Mapping):
            raise _fail("logit_bias", bias, "must be a {token_id: bias} mapping or null")
        out: dict[int, float] = {}
        for key, value in bias.items():
            token = _token_id("logit_bias", key)
            allowed = f"bias for token {token} must be in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}]"
            out[token] = _check_float("logit_bias", value, -MAX_LOGIT_BIAS, MAX_LOGIT_BIAS, allowed)
        return out

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def top_k_enabled(self) -> bool:
        return self.top_k > 0 and not self.is_greedy

    @property
    def uses_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    def validate_for_vocab(self, vocab_size: int) -> None:
        """Raise InvalidInputError if a token id in stop_token_ids or logit_bias is >= vocab_size."""
        for name, ids in (("stop_token_ids", self.stop_token_ids), ("logit_bias", self.logit_bias or ())):
            bad = [t for t in ids if t >= vocab_size]
            if bad:
                raise _fail(name, bad, f"token ids must be < the model's vocabulary size {vocab_size}")

    @classmethod
    def greedy(cls, **overrides: object) -> SamplingParams:
        """Greedy decoding (temperature 0); other fields as given."""
        return cls(temperature=0.0, **overrides)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Logprob:
    """vLLM's `Logprob`: one candidate token's log probability, its rank among all tokens (1 = most likely)
    and its text (`tokenizer.decode([token_id])`, as vLLM decodes it)."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


def logprob_dict(token_id: int, logprob: float, rank: int, top: Sequence[tuple[int, float]],
                 tokenizer: Any = None) -> dict[int, Logprob]:  # fmt: skip
    """One output position as vLLM's `{token_id: Logprob}`: the sampled token first, then the top-k with
    ranks 1..k (a sampled token among them takes its top-k entry, as in vLLM's dict). Without a
    tokenizer `decoded_token` is None."""
    def entry(t: int, lp: float, r: int) -> Logprob:
        return Logprob(lp, r, None if tokenizer is None else tokenizer.decode([t]))

    out = {token_id: entry(token_id, logprob, rank)}
    for k, (t, lp) in enumerate(top):
        out[t] = entry(t, lp, k + 1)
    return out
