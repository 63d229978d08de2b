"""Sampler and SamplingParams against independent references.

Filters are checked against brute-force per-row float64 definitions written here; repetition
penalty against HF's `RepetitionPenaltyLogitsProcessor` and a hand-worked example; logprobs
against `torch.log_softmax`; draws against softmax with a chi-square bound.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

from glimpse.engine.sampler import (
    RequestSamplingState,
    apply_min_p,
    apply_penalties,
    apply_top_k,
    apply_top_p,
    sample,
)
from glimpse.engine.sampling_params import MAX_LOGPROBS, SamplingParams
from glimpse.errors import InvalidInputError

# Float32 (implementation) vs float64 (reference) may disagree on a token whose probability
# mass sits within this distance of the cut; such tokens are left out of the comparison.
# Exact ties are not ambiguous: both sides compare identical values.
BOUNDARY_EPS = 1e-5


# ---- brute-force references: one row at a time, float64, plain Python -------------------------


def _probs(row: list[float]) -> list[float]:
    finite = [x for x in row if x != -math.inf]
    top = max(finite)
    e = [0.0 if x == -math.inf else math.exp(x - top) for x in row]
    total = sum(e)
    return [v / total for v in e]


def ref_top_k(row: list[float], k: int) -> tuple[set[int], set[int]]:
    """(kept, ambiguous). The k-th largest value by sorting; ties with it are kept."""
    if k <= 0 or k >= len(row):
        return set(range(len(row))), set()
    kth = sorted(row, reverse=True)[k - 1]
    return {j for j, x in enumerate(row) if x >= kth}, set()


def ref_top_p(row: list[float], p: float) -> tuple[set[int], set[int]]:
    """Keep a token when the mass of tokens strictly more probable than it is < p."""
    if p >= 1:
        return set(range(len(row))), set()
    probs = _probs(row)
    kept, ambiguous = set(), set()
    for j, pj in enumerate(probs):
        above = sum(q for q in probs if q > pj)
        if abs(above - p) < BOUNDARY_EPS:
            ambiguous.add(j)
        elif above < p:
            kept.add(j)
    return kept, ambiguous


def ref_min_p(row: list[float], m: float) -> tuple[set[int], set[int]]:
    """Keep a token when its probability is >= m * the largest probability."""
    probs = _probs(row)
    top = max(probs)
    kept, ambiguous = set(), set()
    for j, pj in enumerate(probs):
        ratio = pj / top
        if ratio != m and abs(ratio - m) < BOUNDARY_EPS:
            ambiguous.add(j)
        elif ratio >= m:
            kept.add(j)
    return kept, ambiguous


def _check_filter(out: torch.Tensor, logits: torch.Tensor, refs: list[tuple[set[int], set[int]]]) -> None:
    for b, (kept, ambiguous) in enumerate(refs):
        for j in range(logits.shape[1]):
            if j in ambiguous:
                continue
            if j in kept:
                assert out[b, j] == logits[b, j], (b, j)  # kept tokens are untouched
            else:
                assert out[b, j] == -math.inf, (b, j)


def _random_logits(seed: int, rows: int, vocab: int, ties: bool, masked: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if ties:  # few distinct values, so ties at every cut are common
        logits = torch.randint(-3, 4, (rows, vocab), generator=g).float() * 0.75
    else:
        logits = torch.randn(rows, vocab, generator=g) * 3
    if masked and vocab > 1:  # tokens already dropped by an earlier filter; never the whole row
        drop = torch.rand(rows, vocab, generator=g) < 0.3
        drop[:, 0] = False
        logits = logits.masked_fill(drop, -math.inf)
    return logits


filter_case = st.fixed_dictionaries({
    "seed": st.integers(0, 2**31 - 1),
    "rows": st.integers(1, 4),
    "vocab": st.integers(1, 40),
    "ties": st.booleans(),
    "masked": st.booleans(),
})  # fmt: skip


@settings(max_examples=80, deadline=None)
@given(case=filter_case, ks=st.lists(st.integers(-1, 45), min_size=4, max_size=4))
def test_top_k_matches_brute_force(case, ks):
    logits = _random_logits(**case)
    k = torch.tensor(ks[: case["rows"]])
    out = apply_top_k(logits, k)
    _check_filter(out, logits, [ref_top_k(logits[b].tolist(), int(k[b])) for b in range(case["rows"])])


@settings(max_examples=80, deadline=None)
@given(case=filter_case, ps=st.lists(st.one_of(st.floats(0.01, 1.0), st.just(1.0)), min_size=4, max_size=4))
def test_top_p_matches_brute_force(case, ps):
    logits = _random_logits(**case)
    p = torch.tensor(ps[: case["rows"]])
    out = apply_top_p(logits, p)
    _check_filter(out, logits, [ref_top_p(logits[b].tolist(), float(p[b])) for b in range(case["rows"])])


@settings(max_examples=80, deadline=None)
@given(case=filter_case, ms=st.lists(st.one_of(st.floats(0.0, 1.0), st.sampled_from([0.0, 1.0])),
                                     min_size=4, max_size=4))  # fmt: skip
def test_min_p_matches_brute_force(case, ms):
    logits = _random_logits(**case)
    m = torch.tensor(ms[: case["rows"]])
    out = apply_min_p(logits, m)
    _check_filter(out, logits, [ref_min_p(logits[b].tolist(), float(m[b])) for b in range(case["rows"])])


def test_filter_edge_values_by_hand():
    logits = torch.tensor([[1.0, 3.0, 3.0, 2.0, -1.0]])
    # top_k=1 keeps the maximum and its tie; top_k=3 cuts at the 3rd largest value, 2.
    assert apply_top_k(logits, torch.tensor([1]))[0].tolist() == [-math.inf, 3.0, 3.0, -math.inf, -math.inf]
    assert apply_top_k(logits, torch.tensor([3]))[0].tolist() == [-math.inf, 3.0, 3.0, 2.0, -math.inf]
    assert torch.equal(apply_top_k(logits, torch.tensor([0])), logits)
    assert torch.equal(apply_top_k(logits, torch.tensor([-1])), logits)
    # min_p=1 keeps exactly the most likely tokens (a tie keeps both).
    assert apply_min_p(logits, torch.tensor([1.0]))[0].tolist() == [-math.inf, 3.0, 3.0, -math.inf, -math.inf]
    assert torch.equal(apply_min_p(logits, torch.tensor([0.0])), logits)
    # top_p=1 keeps everything; a tiny top_p keeps the most likely token and its tie.
    assert torch.equal(apply_top_p(logits, torch.tensor([1.0])), logits)
    tiny_p = apply_top_p(logits, torch.tensor([1e-3]))[0]
    assert tiny_p.tolist() == [-math.inf, 3.0, 3.0, -math.inf, -math.inf]
    # Hand-worked: probs of [ln 5, ln 3, ln 2] are [.5, .3, .2]; p=0.6 -> mass above is 0, .5, .8.
    three = torch.tensor([[math.log(5), math.log(3), math.log(2)]])
    assert apply_top_p(three, torch.tensor([0.6]))[0, 2] == -math.inf
    assert torch.isfinite(apply_top_p(three, torch.tensor([0.6]))[0, :2]).all()


# ---- penalties ------------------------------------------------------------------------------------


def test_penalties_hand_worked():
    logits = torch.tensor([[2.0, -1.0, 0.5, -3.0, 0.0, 4.0]])
    state = RequestSamplingState(prompt_token_ids=[0, 1])
    for t in (2, 2, 3):
        state.append(t)
    params = SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)
    # seen = {0, 1, 2, 3}: 2/2, -1*2, .5/2, -3*2; then token 2 (count 2): .25 - .5 - .5;
    # token 3 (count 1): -6 - .25 - .5; tokens 4, 5 unseen.
    expected = [1.0, -2.0, -0.75, -6.75, 0.0, 4.0]
    assert apply_penalties(logits, [params], [state])[0].tolist() == expected
    assert logits[0].tolist() == [2.0, -1.0, 0.5, -3.0, 0.0, 4.0]  # input untouched


def test_presence_and_frequency_ignore_prompt_tokens():
    logits = torch.zeros(1, 4)
    state = RequestSamplingState(prompt_token_ids=[1, 1, 1])
    state.append(2)
    params = SamplingParams(presence_penalty=1.0, frequency_penalty=1.0)
    assert apply_penalties(logits, [params], [state])[0].tolist() == [0.0, 0.0, -2.0, 0.0]


@pytest.mark.parametrize("penalty", [0.5, 1.3, 2.0])
def test_repetition_penalty_matches_hf(penalty):
    g = torch.Generator().manual_seed(1)
    vocab, rows = 50, 3
    logits = torch.randn(rows, vocab, generator=g) * 4
    logits[:, 7] = 0.0  # a zero logit stays zero under both rules
    histories = [torch.randint(0, vocab, (n,), generator=g) for n in (5, 12, 1)]
    prompt_lens = [3, 12, 0]
    states, expected = [], []
    for b in range(rows):
        ids = histories[b]
        state = RequestSamplingState(prompt_token_ids=ids[: prompt_lens[b]].tolist())
        for t in ids[prompt_lens[b] :].tolist():
            state.append(t)
        states.append(state)
        hf = RepetitionPenaltyLogitsProcessor(penalty=penalty)
        expected.append(hf(ids[None, :], logits[b : b + 1].clone())[0])
    params = [SamplingParams(repetition_penalty=penalty)] * rows
    out = apply_penalties(logits, params, states)
    torch.testing.assert_close(out, torch.stack(expected), rtol=0, atol=0)


def test_rows_without_penalties_are_untouched():
    logits = torch.randn(3, 10)
    states = [RequestSamplingState([1, 2]) for _ in range(3)]
    for s in states:
        s.append(3)
    params = [SamplingParams(), SamplingParams(repetition_penalty=1.5), SamplingParams()]
    out = apply_penalties(logits, params, states)
    assert torch.equal(out[0], logits[0]) and torch.equal(out[2], logits[2])
    assert not torch.equal(out[1], logits[1])


def test_output_buffer_grows():
    state = RequestSamplingState([0])
    for t in range(100):
        state.append(t % 7)
    assert state.output_token_ids.tolist() == [t % 7 for t in range(100)]


# ---- logprobs -------------------------------------------------------------------------------------


def test_logprobs_are_raw_log_softmax_and_top_k_is_true_top_k():
    g = torch.Generator().manual_seed(3)
    vocab = 64
    logits = torch.randn(4, vocab, generator=g) * 3
    params = [
        # The bias steers the pick but must not leak into the logprobs.
        SamplingParams(temperature=0.0, logprobs=5, logit_bias={11: 50.0}),
        SamplingParams(temperature=0.7, top_k=10, logprobs=0, seed=1),
        SamplingParams(logprobs=MAX_LOGPROBS, repetition_penalty=1.7, seed=2),
        SamplingParams(seed=3),  # no logprobs asked
    ]
    states = [RequestSamplingState([11, 12]) for _ in params]
    out = sample(logits, params, states, eos_token_ids=[0])
    reference = torch.log_softmax(logits.double(), dim=-1)
    assert out.logprobs[3] is None
    for b in range(3):
        lp = out.logprobs[b]
        token = out.token_ids[b]
        assert lp.token_id == token
        assert abs(lp.logprob - reference[b, token].item()) < 1e-6
        assert lp.rank == 1 + int((logits[b] > logits[b, token]).sum())
        k = params[b].logprobs
        assert len(lp.top) == k
        true_top = sorted(range(vocab), key=lambda j: -logits[b, j].item())[:k]
        assert [t for t, _ in lp.top] == true_top
        for t, v in lp.top:
            assert abs(v - reference[b, t].item()) < 1e-6
    assert out.token_ids[0] == 11  # the bias did steer the greedy pick


def test_logprobs_k_larger_than_vocab():
    logits = torch.tensor([[0.0, 1.0, 2.0]])
    out = sample(logits, [SamplingParams(temperature=0.0, logprobs=10)], [RequestSamplingState()], [])
    assert [t for t, _ in out.logprobs[0].top] == [2, 1, 0]


# ---- seeded draws ---------------------------------------------------------------------------------


def _run(rows_params, rows_states, steps_logits, target_row, generator):
    tokens = []
    for step_logits in steps_logits:
        out = sample(step_logits, rows_params, rows_states, eos_token_ids=[0], generator=generator)
        for s, t in zip(rows_states, out.token_ids, strict=True):
            s.append(t)
        tokens.append(out.token_ids[target_row])
    return tokens


def test_seeded_request_is_batch_invariant():
    vocab, steps = 64, 30
    g = torch.Generator().manual_seed(5)
    own = [torch.randn(vocab, generator=g) * 2 for _ in range(steps)]
    params = SamplingParams(seed=1234, temperature=0.8, top_p=0.9, top_k=20, min_p=0.01, presence_penalty=0.3)

    alone = _run([params], [RequestSamplingState([1, 2], params.seed)],
                 [x[None] for x in own], 0, torch.Generator().manual_seed(0))  # fmt: skip

    others = [SamplingParams(), SamplingParams(seed=7, top_k=5), SamplingParams(temperature=0.0)]
    for position, shared_seed in ((0, 1), (2, 2), (3, 3)):
        batch_params = list(others)
        batch_params.insert(position, params)
        states = [RequestSamplingState([1, 2], p.seed) for p in batch_params]
        steps_logits = []
        for x in own:
            rest = torch.randn(len(others), vocab, generator=g) * 2
            steps_logits.append(torch.cat([rest[:position], x[None], rest[position:]]))
        shared = torch.Generator().manual_seed(shared_seed)
        batched = _run(batch_params, states, steps_logits, position, shared)
        assert batched == alone

    other_seed = dataclasses.replace(params, seed=1235)
    different = _run([other_seed], [RequestSamplingState([1, 2], other_seed.seed)],
                     [x[None] for x in own], 0, torch.Generator().manual_seed(0))  # fmt: skip
    assert different != alone


def _chi2_sf_even_df(x: float, df: int) -> float:
    """Survival function of chi-square with an even df: exp(-x/2) * sum_{i<df/2} (x/2)^i / i!."""
    half = x / 2
    return math.exp(-half) * sum(half**i / math.factorial(i) for i in range(df // 2))


def _assert_matches(counts: torch.Tensor, probs: torch.Tensor, df: int) -> None:
    n = counts.sum().item()
    expected = probs * n
    stat = (((counts - expected) ** 2) / expected).sum().item()
    # Pearson's chi-square; with fixed seeds the result is deterministic, and a threshold at
    # p = 1e-6 means a correct sampler would fail for fewer than 1 in a million seed choices.
    assert _chi2_sf_even_df(stat, df) > 1e-6, (stat, counts.tolist(), expected.tolist())


def test_seeded_draws_follow_softmax():
    logits = torch.tensor([1.0, 0.0, -1.0, 2.0, 0.5, -0.5, 1.5])  # 7 classes -> df 6
    n = 12000
    params = [SamplingParams(seed=s) for s in range(n)]  # one generator per row
    states = [RequestSamplingState((), p.seed) for p in params]
    out = sample(logits.expand(n, -1), params, states, [])
    counts = torch.bincount(torch.tensor(out.token_ids), minlength=7).double()
    _assert_matches(counts, torch.softmax(logits.double(), 0), df=6)


def test_unseeded_filtered_draws_follow_renormalised_softmax():
    logits = torch.tensor([1.0, 0.0, -1.0, 2.0, 0.5, -0.5, 1.5, -2.0])
    n = 12000
    params = [SamplingParams(temperature=0.7, top_k=5)] * n
    out = sample(logits.expand(n, -1), params, [RequestSamplingState() for _ in range(n)], [],
                 generator=torch.Generator().manual_seed(11))  # fmt: skip
    counts = torch.bincount(torch.tensor(out.token_ids), minlength=8).double()
    top5 = torch.topk(logits, 5).indices
    assert counts[[j for j in range(8) if j not in top5.tolist()]].sum() == 0
    _assert_matches(counts[top5], torch.softmax(logits[top5].double() / 0.7, 0), df=4)


# ---- logit_bias, min_tokens, greedy ---------------------------------------------------------------


def test_logit_bias_forces_a_sequence_and_bans_a_token():
    vocab = 32
    g = torch.Generator().manual_seed(8)
    target = [5, 17, 3, 3, 30, 0]
    state = RequestSamplingState([1], seed=0)
    for t in target:
        out = sample(torch.randn(1, vocab, generator=g) * 5, [SamplingParams(seed=0, logit_bias={t: 100})],
                     [state], eos_token_ids=[31])  # fmt: skip
        assert out.token_ids == [t]
        state.append(t)

    logits = torch.zeros(2000, 4)
    logits[:, 2] = 10.0  # token 2 would win ~99.99% of draws
    params = [SamplingParams(logit_bias={2: -100.0})] * 2000
    states = [RequestSamplingState() for _ in range(2000)]
    out = sample(logits, params, states, [], torch.Generator().manual_seed(0))
    assert 2 not in out.token_ids
    ban = SamplingParams(temperature=0.0, logit_bias={"2": -100.0})
    greedy = sample(logits[:1], [ban], [RequestSamplingState()], [])
    assert greedy.token_ids == [0]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_min_tokens_suppresses_eos_and_stop_ids(temperature):
    vocab, eos, stop = 8, 7, 3
    logits = torch.zeros(1, vocab)
    logits[0, eos], logits[0, stop], logits[0, 5] = 50.0, 40.0, 1.0
    params = SamplingParams(temperature=temperature, min_tokens=3, stop_token_ids=[stop], seed=0)
    state = RequestSamplingState([1], seed=0)
    got = []
    for _ in range(4):
        t = sample(logits, [params], [state], eos_token_ids=[eos]).token_ids[0]
        state.append(t)
        got.append(t)
    assert all(t not in (eos, stop) for t in got[:3])
    assert got[3] == eos
    if temperature == 0.0:
        assert got[:3] == [5, 5, 5]  # the argmax of what is left


def test_greedy_is_argmax_first_on_ties():
    g = torch.Generator().manual_seed(2)
    logits = torch.randint(-2, 3, (6, 9), generator=g).float()
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1e-6)] * 3
    out = sample(logits, params, [RequestSamplingState() for _ in params], [])
    for b in range(6):
        row = logits[b].tolist()
        assert out.token_ids[b] == min(j for j in range(9) if row[j] == max(row))


def test_sample_leaves_inputs_unchanged():
    logits = torch.randn(2, 10)
    copy = logits.clone()
    params = [SamplingParams(logit_bias={1: 5.0}, repetition_penalty=2.0, top_p=0.5, min_tokens=2)] * 2
    states = [RequestSamplingState([1, 2]), RequestSamplingState([3])]
    sample(logits, params, states, [0])
    assert torch.equal(logits, copy)
    assert all(s.num_output_tokens == 0 for s in states)


def test_out_of_vocab_bias_is_a_named_error():
    with pytest.raises(InvalidInputError, match="validate_for_vocab"):
        sample(torch.zeros(1, 4), [SamplingParams(logit_bias={9: 1.0})], [RequestSamplingState()], [])


# ---- SamplingParams validation -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("n", 0), ("n", True), ("n", 1.5),
        ("temperature", -0.1), ("temperature", float("nan")), ("temperature", float("inf")), ("temperature", "1"),
        ("top_p", 0.0), ("top_p", 1.1), ("top_p", -0.5),
        ("top_k", -2), ("top_k", 2.5),
        ("min_p", -0.1), ("min_p", 1.01),
        ("max_tokens", 0), ("max_tokens", 2.5),  # None is valid: up to the context length, as in vLLM
        ("min_tokens", -1), ("min_tokens", 17),  # > max_tokens (16)
        ("repetition_penalty", 0.0), ("repetition_penalty", -1.0),
        ("presence_penalty", 2.5), ("presence_penalty", -2.01),
        ("frequency_penalty", 2.01), ("frequency_penalty", -3.0),
        ("logprobs", -1), ("logprobs", MAX_LOGPROBS + 1), ("logprobs", True),
        ("seed", -2), ("seed", 2**64), ("seed", "7"), ("seed", 1.0),
        ("stop", [""]), ("stop", [1]), ("stop", 5),
        ("stop_token_ids", [-1]), ("stop_token_ids", ["a"]), ("stop_token_ids", 5),
        ("logit_bias", {-1: 1.0}), ("logit_bias", {"x": 1.0}), ("logit_bias", {1: 100.5}),
        ("logit_bias", {1: float("nan")}), ("logit_bias", [1]),
        ("ignore_eos", "yes"), ("skip_special_tokens", None), ("include_stop_str_in_output", 1),
    ],
)  # fmt: skip
def test_invalid_field_raises_naming_it(field, value):
    with pytest.raises(InvalidInputError, match=rf"SamplingParams\.{field}="):
        SamplingParams(**{field: value})


def test_greedy_with_n_above_one_is_refused():
    with pytest.raises(InvalidInputError, match=r"SamplingParams\.n="):
        SamplingParams(temperature=0.0, n=2)


def test_normalisation_and_defaults():
    p = SamplingParams(stop="###", stop_token_ids=[4, 4, 2], logit_bias={"5": 1, 6: -2.5}, seed=-1, top_k=-1)
    assert p.stop == ("###",) and p.stop_token_ids == (4, 2)
    assert p.logit_bias == {5: 1.0, 6: -2.5} and p.seed is None
    assert not p.top_k_enabled and not p.is_greedy
    assert SamplingParams(temperature=5e-6).is_greedy and SamplingParams.greedy().is_greedy
    d = SamplingParams()
    defaults = (d.n, d.temperature, d.top_p, d.top_k, d.min_p, d.max_tokens, d.min_tokens)
    assert defaults == (1, 1.0, 1.0, 0, 0.0, 16, 0)
    assert d.stop == () and d.logprobs is None and d.skip_special_tokens and not d.ignore_eos
    hash(p)  # usable as a dict key despite the logit_bias dict


def test_validate_for_vocab():
    SamplingParams(stop_token_ids=[9], logit_bias={9: 1.0}).validate_for_vocab(10)
    with pytest.raises(InvalidInputError, match=r"stop_token_ids.*vocabulary size 10"):
        SamplingParams(stop_token_ids=[10]).validate_for_vocab(10)
    with pytest.raises(InvalidInputError, match=r"logit_bias.*vocabulary size 10"):
        SamplingParams(logit_bias={12: 1.0}).validate_for_vocab(10)


def test_child_seeds_differ_like_vllm():
    p = SamplingParams(seed=2**64 - 1, n=2)
    a = RequestSamplingState.from_params(p, [1], index=0).generator
    b = RequestSamplingState.from_params(p, [1], index=1).generator
    assert a.initial_seed() == 2**64 - 1 and b.initial_seed() == 0
