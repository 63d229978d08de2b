"""Step 9 of the data path, the sampler: one float32 logits row per request -> the next token id.

`sample(logits [B, V], params[B], states[B], eos_token_ids)` returns `SamplerOutput` with B
token ids and, for rows that asked, the logprobs of the **raw** logits (vLLM's default), or of
the masked ones for rows under a structured-output constraint. Each row is processed in this
order (vLLM v1's, documented once here):

  0. a structured-output row's bitmask (`bitmask [B, ceil(V / 32)]` int32, rows `masked_rows`) sets
     the tokens its grammar forbids to -inf (xgrammar's `apply_token_bitmask_inplace`, one call for
     the batch);
  1. logit_bias is added, then EOS / stop_token_ids are set to -inf while min_tokens is unmet
     (not on masked rows: there the grammar decides when the output may end);
  2. repetition penalty over prompt + output tokens (positive logits divided, negative multiplied);
  3. presence / frequency penalties over output tokens only (OpenAI semantics);
  4. greedy rows (temperature < 1e-5) take the argmax here, ignoring the filters below;
  5. temperature; 6. min_p; 7. top_k; 8. top_p (filters set dropped tokens to -inf);
  9. a draw by exponential race, argmax(p_i / E_i) with E_i ~ Exp(1), which picks i with
     probability p_i exactly. Seeded rows draw E from their own generator and unseeded rows
     from the runner's shared one, so a seeded row's tokens do not depend on the batch it sits in.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from glimpse.engine.sampling_params import SamplingParams
from glimpse.errors import InvalidInputError

_NEG_INF = float("-inf")


@dataclass(frozen=True)
class TopLogprobs:
    """Logprobs of one sampled token: its own, its rank (1 = most likely) and the top-k."""

    token_id: int
    logprob: float
    rank: int  # 1 + the number of tokens strictly more likely than the sampled one
    top: tuple[tuple[int, float], ...]  # (token_id, logprob), most likely first; k = params.logprobs


@dataclass(frozen=True)
class SamplerOutput:
    token_ids: list[int]  # [B]
    logprobs: list[TopLogprobs | None]  # [B]; None where params.logprobs is None


def sequence_seed(params: SamplingParams, index: int) -> int | None:
    """The seed of the `index`-th of the `n` sequences of a request (seed + index, like vLLM)."""
    return None if params.seed is None else (params.seed + index) % 2**64


class RequestSamplingState:
    """Per-request mutable sampling state: RNG stream, prompt ids, output ids so far.

    The model runner makes one per sequence (an `n > 1` request makes `n`, seeded by
    `sequence_seed`) and calls `append` with every token it samples.
    """

    def __init__(self, prompt_token_ids: Sequence[int] | torch.Tensor = (), seed: int | None = None) -> None:
        self.generator: torch.Generator | None = None if seed is None else torch.Generator().manual_seed(seed)
        # Repetition penalty only needs the set of prompt tokens.
        self.prompt_token_ids = torch.unique(torch.as_tensor(prompt_token_ids, dtype=torch.long).reshape(-1))
        self._output = torch.empty(16, dtype=torch.long)  # grows by doubling; first `num_output_tokens` valid
        self.num_output_tokens = 0

    @classmethod
    def from_params(cls, params: SamplingParams, prompt_token_ids: Sequence[int] | torch.Tensor,
                    index: int = 0) -> RequestSamplingState:  # fmt: skip
        """State for the `index`-th of the `n` sequences of a request (see `sequence_seed`)."""
        return cls(prompt_token_ids, sequence_seed(params, index))

    @property
    def output_token_ids(self) -> torch.Tensor:
        """[num_output_tokens] long, a view (do not keep across `append`)."""
        return self._output[: self.num_output_tokens]

    def append(self, token_id: int) -> None:
        if self.num_output_tokens == self._output.numel():
            self._output = torch.cat([self._output, torch.empty_like(self._output)])
        self._output[self.num_output_tokens] = token_id
        self.num_output_tokens += 1


# ---- filters: [B, V] logits -> [B, V] logits with dropped tokens at -inf (new tensors) ----------


def apply_top_k(logits: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """Keep tokens whose logit is >= the row's k-th largest (ties at the k-th value are kept).

    top_k: [B] int; k <= 0 or k >= V leaves the row unchanged.
    """
    vocab = logits.shape[-1]
    enabled = (top_k > 0) & (top_k < vocab)
    k = torch.where(enabled, top_k, 1).long()
    kth = logits.topk(int(k.max()), dim=-1).values.gather(1, k[:, None] - 1)
    return logits.masked_fill((logits < kth) & enabled[:, None], _NEG_INF)


def apply_top_p(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Keep the most likely tokens whose cumulative probability first reaches top_p.

    A token is kept when the mass of the tokens ranked strictly above it is < top_p, so the
    most likely token always survives, and tokens tied with the last one kept survive too.
    top_p: [B] float in (0, 1]; 1 leaves the row unchanged.
    """
    p = top_p.to(logits.dtype)[:, None]
    sorted_logits = logits.sort(dim=-1, descending=True).values
    probs = sorted_logits.softmax(dim=-1)
    # Mass strictly above each sorted position (an exclusive cumsum; non-decreasing in floats).
    mass_above = torch.cat([torch.zeros_like(probs[:, :1]), probs.cumsum(dim=-1)[:, :-1]], dim=-1)
    num_kept = (mass_above < p).sum(dim=-1, keepdim=True)  # >= 1 since mass_above[0] = 0 < p
    threshold = sorted_logits.gather(1, num_kept - 1)
    return logits.masked_fill((logits < threshold) & (p < 1), _NEG_INF)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens with probability < min_p * (the row's largest probability).

    Compared in log space (logit < max_logit + log min_p), which is the same test without
    forming probabilities; min_p = 0 gives log 0 = -inf and drops nothing.
    min_p: [B] float in [0, 1].
    """
    threshold = logits.amax(dim=-1, keepdim=True) + torch.log(min_p.to(logits.dtype))[:, None]
    return logits.masked_fill(logits < threshold, _NEG_INF)


def apply_penalties(logits: torch.Tensor, params: Sequence[SamplingParams],
                    states: Sequence[RequestSamplingState]) -> torch.Tensor:  # fmt: skip
    """Repetition (prompt + output tokens), then presence and frequency (output tokens only).

    Repetition (HF / vLLM rule): a seen token's logit x becomes x / r if x > 0 else x * r.
    Presence / frequency (OpenAI): x -= frequency * count + presence * (count > 0).
    Rows whose params use no penalty are returned unchanged.
    """
    rows = [i for i, p in enumerate(params) if p.uses_penalties]
    if not rows:
        return logits
    num_rows, vocab = len(rows), logits.shape[-1]
    row_index = torch.tensor(rows, device=logits.device)
    sub = logits.index_select(0, row_index)

    outputs = [states[i].output_token_ids for i in rows]
    prompts = [states[i].prompt_token_ids for i in rows]
    counts = torch.zeros(num_rows, vocab, dtype=logits.dtype, device=logits.device)
    out_rows = torch.repeat_interleave(torch.arange(num_rows), torch.tensor([len(o) for o in outputs]))
    counts.index_put_((out_rows.to(logits.device), torch.cat(outputs).to(logits.device)),
                      torch.ones((), dtype=logits.dtype, device=logits.device), accumulate=True)  # fmt: skip
    present = (counts > 0).to(logits.dtype)
    seen = counts > 0
    prompt_rows = torch.repeat_interleave(torch.arange(num_rows), torch.tensor([len(p) for p in prompts]))
    seen[prompt_rows.to(logits.device), torch.cat(prompts).to(logits.device)] = True

    def column(name: str) -> torch.Tensor:
        return torch.tensor([getattr(params[i], name) for i in rows], dtype=logits.dtype,
                            device=logits.device)[:, None]  # fmt: skip

    rep = column("repetition_penalty")
    sub = torch.where(seen, torch.where(sub > 0, sub / rep, sub * rep), sub)
    sub = sub - column("frequency_penalty") * counts - column("presence_penalty") * present
    return logits.index_copy(0, row_index, sub)


# ---- the sampler ---------------------------------------------------------------------------------


def _apply_bias_and_min_tokens(logits: torch.Tensor, params: Sequence[SamplingParams],
                               states: Sequence[RequestSamplingState], eos_token_ids: Sequence[int],
                               masked: frozenset[int] = frozenset()) -> torch.Tensor:  # fmt: skip
    vocab = logits.shape[-1]
    bias_rows: list[int] = []
    bias_ids: list[int] = []
    bias_vals: list[float] = []
    ban_rows: list[int] = []
    ban_ids: list[int] = []
    for i, (p, s) in enumerate(zip(params, states, strict=True)):
        if p.logit_bias:
            bias_rows += [i] * len(p.logit_bias)
            bias_ids += p.logit_bias.keys()
            bias_vals += p.logit_bias.values()
        if s.num_output_tokens < p.min_tokens and i not in masked:
            stops = [*eos_token_ids, *p.stop_token_ids]
            ban_rows += [i] * len(stops)
            ban_ids += stops
    if not bias_ids and not ban_ids:
        return logits
    if max(bias_ids + ban_ids) >= vocab:
        # The engine checks this with validate_for_vocab; a bare IndexError here would hide it.
        raise InvalidInputError(f"a logit_bias or stop token id is >= the logits width {vocab}; "
                                "call SamplingParams.validate_for_vocab when admitting the request")  # fmt: skip
    logits = logits.clone()
    device = logits.device
    if bias_ids:
        logits.index_put_((torch.tensor(bias_rows, device=device), torch.tensor(bias_ids, device=device)),
                          torch.tensor(bias_vals, dtype=logits.dtype, device=device), accumulate=True)  # fmt: skip
    if ban_ids:
        logits[torch.tensor(ban_rows, device=device), torch.tensor(ban_ids, device=device)] = _NEG_INF
    return logits


def _race(logits: torch.Tensor, generators: Sequence[torch.Generator | None],
          shared: torch.Generator | None) -> torch.Tensor:  # fmt: skip
    """[R, V] filtered logits -> [R] draws. Noise is float64 so E == 0 is practically impossible."""
    probs = logits.softmax(dim=-1).double()
    noise = torch.empty_like(probs)
    unseeded = [j for j, g in enumerate(generators) if g is None]
    if unseeded:
        device = shared.device if shared is not None else probs.device
        block = torch.empty(len(unseeded), probs.shape[1], dtype=torch.float64, device=device)
        noise[unseeded] = block.exponential_(generator=shared).to(probs.device)
    for j, g in enumerate(generators):
        if g is not None:
            row = torch.empty(probs.shape[1], dtype=torch.float64, device=g.device)
            noise[j] = row.exponential_(generator=g).to(probs.device)
    return (probs / noise.clamp_min_(torch.finfo(torch.float64).tiny)).argmax(dim=-1)


def _filtered(logits: torch.Tensor, rows: list[int], values: list[float] | list[int],
              fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], dtype: torch.dtype) -> torch.Tensor:  # fmt: skip
    """Apply `fn` to the listed rows only, so rows without a filter skip its sort / top-k."""
    if not rows:
        return logits
    index = torch.tensor(rows, device=logits.device)
    filtered = fn(logits.index_select(0, index), torch.tensor(values, dtype=dtype, device=logits.device))
    return logits.index_copy(0, index, filtered)


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: Sequence[int]) -> None:
    """In place: tokens whose bit is 0 in `bitmask[row]` get -inf, for each listed row of `logits` [B, V]."""
    import xgrammar  # only structured-output batches need it

    xgrammar.apply_token_bitmask_inplace(logits, bitmask.to(logits.device), vocab_size=logits.shape[1],
                                         indices=list(rows))  # fmt: skip


def sample(logits: torch.Tensor, params: Sequence[SamplingParams], states: Sequence[RequestSamplingState],
           eos_token_ids: Sequence[int], generator: torch.Generator | None = None,
           bitmask: torch.Tensor | None = None, masked_rows: Sequence[int] = ()) -> SamplerOutput:  # fmt: skip
    """[B, V] float logits -> one token per row (order in the module docstring).

    generator: the runner's shared stream for unseeded rows (None: torch's global generator).
    bitmask / masked_rows: the structured-output rows' allowed tokens (glimpse/engine/structured.py).
    Does not modify `logits` or `states`; the runner calls `states[i].append` after it.
    """
    num_rows = logits.shape[0]
    if logits.dim() != 2 or len(params) != num_rows or len(states) != num_rows:
        raise ValueError(f"sample needs [B, V] logits with B params and states; got logits "
                         f"{tuple(logits.shape)}, {len(params)} params, {len(states)} states")  # fmt: skip
    raw = logits
    if masked_rows:
        assert bitmask is not None, "masked_rows without a bitmask"
        raw = logits.to(torch.float32, copy=True)
        apply_bitmask(raw, bitmask, masked_rows)  # logprobs are reported after the mask
    logits = _apply_bias_and_min_tokens(raw.float(), params, states, eos_token_ids, frozenset(masked_rows))
    logits = apply_penalties(logits, params, states)

    token_ids = torch.empty(num_rows, dtype=torch.long, device=logits.device)
    greedy = [i for i, p in enumerate(params) if p.is_greedy]
    if greedy:
        index = torch.tensor(greedy, device=logits.device)
        token_ids[index] = logits.index_select(0, index).argmax(dim=-1)
    rand = [i for i, p in enumerate(params) if not p.is_greedy]
    if rand:
        index = torch.tensor(rand, device=logits.device)
        temperature = torch.tensor([params[i].temperature for i in rand], device=logits.device)
        x = logits.index_select(0, index) / temperature[:, None]
        sub = [params[i] for i in rand]
        pick = [j for j, p in enumerate(sub) if p.min_p > 0]
        x = _filtered(x, pick, [sub[j].min_p for j in pick], apply_min_p, torch.float32)
        pick = [j for j, p in enumerate(sub) if p.top_k_enabled]
        x = _filtered(x, pick, [sub[j].top_k for j in pick], apply_top_k, torch.long)
        pick = [j for j, p in enumerate(sub) if p.top_p < 1]
        x = _filtered(x, pick, [sub[j].top_p for j in pick], apply_top_p, torch.float32)
        token_ids[index] = _race(x, [states[i].generator for i in rand], generator)

    ids = token_ids.tolist()
    return SamplerOutput(token_ids=ids, logprobs=_logprobs(raw, token_ids, ids, params))


def _logprobs(raw: torch.Tensor, token_ids: torch.Tensor, ids: list[int],
              params: Sequence[SamplingParams]) -> list[TopLogprobs | None]:  # fmt: skip
    """Log-softmax of the raw logits for rows that asked: sampled token, its rank, top-k."""
    out: list[TopLogprobs | None] = [None] * len(params)
    rows = [i for i, p in enumerate(params) if p.logprobs is not None]
    if not rows:
        return out
    index = torch.tensor(rows, device=raw.device)
    logprobs = raw.index_select(0, index).float().log_softmax(dim=-1)
    chosen = logprobs.gather(1, token_ids.index_select(0, index)[:, None])
    ranks = ((logprobs > chosen).sum(dim=-1) + 1).tolist()
    k = max(params[i].logprobs or 0 for i in rows)
    top_vals, top_ids = logprobs.topk(min(k, logprobs.shape[-1]), dim=-1)
    chosen_list, top_vals_list, top_ids_list = chosen[:, 0].tolist(), top_vals.tolist(), top_ids.tolist()
    for j, i in enumerate(rows):
        n = params[i].logprobs or 0
        # A masked row has fewer than k possible tokens at times: the impossible ones (-inf) are not listed.
        top = tuple((t, lp) for t, lp in zip(top_ids_list[j][:n], top_vals_list[j][:n], strict=True) if lp > _NEG_INF)
        out[i] = TopLogprobs(ids[i], chosen_list[j], ranks[j], top)
    return out
