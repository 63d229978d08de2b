"""Sampling through the engine: logprobs against HF's logits, seeds across batches, logit_bias, stops."""

from __future__ import annotations

import pytest
import torch
from conftest import IMAGES, KernelSpy
from hf_oracle import hf_model

from glimpse import kernels
from glimpse.engine.sampling_params import SamplingParams
from glimpse.llm import LLM


@pytest.fixture(scope="module")
def llm(tiny_checkpoint):
    return LLM(tiny_checkpoint("glm4v"), dtype="float32")


def _conv(text: str, image: bool = True):
    parts = [{"type": "image_url", "image_url": {"url": str(IMAGES / "coffee.png")}}] if image else []
    return [{"role": "user", "content": parts + [{"type": "text", "text": text}]}]


def test_logprobs_equal_log_softmax_of_hf_logits(llm, tiny_checkpoint):
    conv = _conv("Describe the cup.")
    out = llm.chat(conv, SamplingParams(temperature=0, max_tokens=8, logprobs=5, ignore_eos=True), use_tqdm=False)[0]
    comp = out.outputs[0]
    p = llm.processor(conv)
    inputs = dict(p)
    inputs["input_ids"] = torch.tensor([p.input_ids + comp.token_ids[:-1]])
    inputs["mm_token_type_ids"] = llm.engine.model.mm_token_types(inputs["input_ids"][0])[None]
    with torch.no_grad():
        logits = hf_model(tiny_checkpoint("glm4v"))(**inputs).logits[0, len(p.input_ids) - 1 :]
    ref = torch.log_softmax(logits.double(), dim=-1)
    for step, lp in enumerate(comp.logprobs):
        assert lp.token_id == comp.token_ids[step]
        assert abs(lp.logprob - float(ref[step, lp.token_id])) < 1e-4
        top_ids = ref[step].topk(5).indices.tolist()
        assert [t for t, _ in lp.top] == top_ids
        for t, v in lp.top:
            assert abs(v - float(ref[step, t])) < 1e-4


def test_seeded_request_same_alone_and_in_batch(llm):
    seeded = SamplingParams(temperature=1.0, top_p=0.95, max_tokens=16, seed=1234, ignore_eos=True)
    alone = llm.chat(_conv("Tell me a story."), seeded, use_tqdm=False)[0].outputs[0].token_ids
    others = [SamplingParams(temperature=0.9, max_tokens=12, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=5), SamplingParams(temperature=1.2, seed=7, max_tokens=20)]  # fmt: skip
    convs = [_conv("Other one", image=False), _conv("Tell me a story."), _conv("Third", image=False), _conv("x")]
    outs = llm.chat(convs, [others[0], seeded, others[1], others[2]], use_tqdm=False)
    assert outs[1].outputs[0].token_ids == alone
    different = llm.chat(_conv("Tell me a story."), SamplingParams(temperature=1.0, top_p=0.95, max_tokens=16, seed=99,
                                                                    ignore_eos=True), use_tqdm=False)[0]  # fmt: skip
    assert different.outputs[0].token_ids != alone


def test_logit_bias_forces_a_token_sequence(llm):
    tok = llm.get_tokenizer()
    target = tok.encode(" launch rocket", add_special_tokens=False)
    # +100 on the target ids and -100 on the most likely others: each step must pick from the targets;
    # a stop string then ends generation exactly after the forced text.
    out = llm.chat(_conv("Go", image=False), SamplingParams(temperature=0, max_tokens=len(target),
                   logit_bias={t: 100 for t in target}), use_tqdm=False)[0]  # fmt: skip
    assert set(out.outputs[0].token_ids) <= set(target)
    forced = llm.chat(_conv("Go", image=False), SamplingParams(temperature=0, max_tokens=1,
                      logit_bias={target[0]: 100}), use_tqdm=False)[0]  # fmt: skip
    assert forced.outputs[0].token_ids == [target[0]]


def test_stop_strings_and_token_ids(llm):
    base = llm.chat(_conv("Say something"), SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), use_tqdm=False)[0]
    text = base.outputs[0].text
    assert len(text) > 6
    stop = text[3:6]
    cut = llm.chat(_conv("Say something"), SamplingParams(temperature=0, max_tokens=24, stop=[stop], ignore_eos=True),
                   use_tqdm=False)[0].outputs[0]  # fmt: skip
    assert cut.text == text[: text.index(stop)] and cut.finish_reason == "stop" and cut.stop_reason == stop
    tok_id = base.outputs[0].token_ids[4]
    by_id = llm.chat(_conv("Say something"), SamplingParams(temperature=0, max_tokens=24, stop_token_ids=[tok_id],
                     ignore_eos=True), use_tqdm=False)[0].outputs[0]  # fmt: skip
    assert by_id.token_ids == base.outputs[0].token_ids[: base.outputs[0].token_ids.index(tok_id) + 1]
    assert by_id.stop_reason == tok_id


def test_n_sequences_and_streamed_deltas_concatenate(llm):
    params = SamplingParams(temperature=1.0, n=3, seed=5, max_tokens=10, ignore_eos=True)
    out = llm.chat(_conv("Many"), params, use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    streamed = "".join(o.outputs[0].delta_text for o in llm.stream_chat(_conv("Many"), SamplingParams(
        temperature=0, max_tokens=20, ignore_eos=True)))  # fmt: skip
    full = llm.chat(_conv("Many"), SamplingParams(temperature=0, max_tokens=20, ignore_eos=True), use_tqdm=False)[0]
    assert streamed == full.outputs[0].text




def test_streamed_token_and_logprob_deltas_add_up_to_the_final_output(llm):
    # stream_chat holds back outputs that add no text (a partial character, a possible stop string): their token
    # ids and logprobs ride with the next output it yields.
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, logprobs=1)
    outs = list(llm.stream_chat(_conv("Many"), params))
    final = outs[-1].outputs[0]
    assert sum((o.outputs[0].delta_token_ids for o in outs), []) == final.token_ids
    assert sum((o.outputs[0].delta_logprobs for o in outs), []) == final.logprobs and len(final.logprobs) == 20

def _run_outputs(llm, requests: list[tuple], delta: bool) -> list:
    """Every RequestOutput of `requests` ((conversation, params) pairs run together), step by step."""
    llm.engine.delta_outputs = delta
    try:
        for conv, params in requests:
            llm.engine.add_request(None, llm.processor(conv), params)
        steps = []
        while llm.engine.has_unfinished_requests():
            steps.append(llm.engine.step())
        return steps
    finally:
        llm.engine.delta_outputs = False


def test_delta_outputs_add_up_to_the_whole_outputs_at_every_step(llm):
    # The engine core sends each request's outputs before its last as deltas only (their cost must not grow with
    # the tokens generated so far); the API process still needs what the whole outputs say, step by step.
    base = llm.chat(_conv("Say something"), SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
                    use_tqdm=False)[0].outputs[0].text  # fmt: skip
    requests = [
        (_conv("Many"), SamplingParams(temperature=1.0, n=2, seed=7, max_tokens=12, ignore_eos=True, logprobs=2)),
        (_conv("Say something"), SamplingParams(temperature=0, max_tokens=24, stop=[base[5:8]], ignore_eos=True,
                                                logprobs=0)),  # fmt: skip
        (_conv("Plain", image=False), SamplingParams(temperature=0, max_tokens=9, ignore_eos=True)),
    ]
    whole, deltas = _run_outputs(llm, requests, delta=False), _run_outputs(llm, requests, delta=True)
    assert len(whole) == len(deltas) > 10
    key = {}  # the two runs' request ids, in the order their first outputs appear
    sums: dict[tuple, list] = {}
    for step_whole, step_delta in zip(whole, deltas, strict=True):
        assert len(step_whole) == len(step_delta)
        for w, d in zip(step_whole, step_delta, strict=True):
            key.setdefault(w.request_id, d.request_id)
            assert key[w.request_id] == d.request_id and w.finished == d.finished
            for cw, cd in zip(w.outputs, d.outputs, strict=True):
                text, ids, lps = sums.setdefault((d.request_id, cd.index), ["", [], []])
                sums[(d.request_id, cd.index)] = [text + cd.delta_text, ids + cd.delta_token_ids,
                                                  lps + (cd.delta_logprobs or [])]  # fmt: skip
                text, ids, lps = sums[(d.request_id, cd.index)]
                assert (cd.delta_text, cd.delta_token_ids, cd.delta_logprobs) == (
                    cw.delta_text, cw.delta_token_ids, cw.delta_logprobs)
                assert (text, ids) == (cw.text, cw.token_ids)
                assert lps == (cw.logprobs or [])
                if d.finished:  # the last output is whole
                    assert (cd.text, cd.token_ids, cd.logprobs) == (cw.text, cw.token_ids, cw.logprobs)
                    assert (cd.finish_reason, cd.stop_reason) == (cw.finish_reason, cw.stop_reason)
                else:
                    assert (cd.text, cd.token_ids, cd.logprobs) == ("", [], None)
    finals = [c for step in whole for out in step if out.finished for c in out.outputs]
    assert {c.finish_reason for c in finals} == {"length", "stop"} and any(c.logprobs for c in finals)

def test_bf16_batch1_decode_runs_on_native_kernels_as_accurately_as_hf(tiny_checkpoint, monkeypatch):
    """One-token steps in bf16 run their matmuls outside oneDNN (engine/model_runner.py), on the
    native kernels where they run (vision attention, prefill attention without AMX, decode
    attention, one-row linear; RMSNorm, SwiGLU and the rotaries on every step);
    every other step inside. The decode logprobs are no further from HF's float32 ones than HF's
    own bf16 model."""
    path = tiny_checkpoint("glm4v")
    llm = LLM(path, dtype="bfloat16")
    seen: list[tuple[int, bool]] = []
    decode = llm.engine.model.decode

    def spy(embeds, *args, **kwargs):
        seen.append((embeds.shape[0], torch.backends.mkldnn.enabled))
        return decode(embeds, *args, **kwargs)

    monkeypatch.setattr(llm.engine.model, "decode", spy)
    native = kernels.cpu_kernels()  # where it runs here, all three kernels must serve this request
    if native is not None:
        kernel_spy = KernelSpy(native)
        monkeypatch.setattr(kernels, "cpu_kernels", lambda: kernel_spy)
    conv = _conv("Describe the cup.")
    out = llm.chat(conv, SamplingParams(temperature=0, max_tokens=12, logprobs=0, ignore_eos=True), use_tqdm=False)[0]
    if native is not None:
        # the tiny tower's heads (16) are not a native head dim: its attention is torch's SDPA
        elementwise = {"rms_norm_bf16", "silu_mul_bf16", "text_rotary_bf16_", "vision_rotary_bf16"}  # every step
        computed = set(kernel_spy.calls) - {"bind_threads"}  # the engine's first step pins its threads
        assert computed == {"decode_attention_bf16", "segment_attention_bf16", "linear_one_row_bf16"} | elementwise
    assert seen[0][0] > 1 and seen[0][1] is True  # the prompt: oneDNN
    assert [enabled for rows, enabled in seen[1:]] == [False] * 11 and all(rows == 1 for rows, _ in seen[1:])
    assert torch.backends.mkldnn.enabled  # restored

    comp = out.outputs[0]
    p = llm.processor(conv)
    inputs = dict(p)
    inputs["input_ids"] = torch.tensor([p.input_ids + comp.token_ids[:-1]])
    inputs["mm_token_type_ids"] = llm.engine.model.mm_token_types(inputs["input_ids"][0])[None]
    start = len(p.input_ids) - 1
    with torch.no_grad():
        exact = torch.log_softmax(hf_model(path)(**inputs).logits[0, start:].double(), -1)
        hf_bf16 = torch.log_softmax(hf_model(path, torch.bfloat16)(**inputs).logits[0, start:].double(), -1)
    chosen = torch.tensor(comp.token_ids)[:, None]
    ours = torch.tensor([lp.logprob for lp in comp.logprobs], dtype=torch.float64)
    hf_error = float((hf_bf16.gather(1, chosen) - exact.gather(1, chosen)).abs().max())
    # same reasoning as tests/test_model_parity.py::test_bfloat16_close: within HF's bf16 error, with
    # room for rounding at different points (the decode steps here also read a bf16 KV cache)
    assert float((ours - exact.gather(1, chosen)[:, 0]).abs().max()) <= 2 * hf_error


def test_one_row_kernel_switch_is_restored_across_threads():
    """Engines on two threads: A enters, B enters, A leaves, B leaves. oneDNN stays off until the
    last one leaves, then is exactly as before (a naive save/restore would leave it off)."""
    import threading

    from glimpse.platform import one_row_matmuls

    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def a():
        with one_row_matmuls(1, torch.bfloat16, torch.device("cpu")):
            a_in.set()
            b_in.wait(5)
        a_out.set()

    def b():
        a_in.wait(5)
        with one_row_matmuls(1, torch.bfloat16, torch.device("cpu")):
            b_in.set()
            a_out.wait(5)
            seen["after_a_left"] = torch.backends.mkldnn.enabled

    before = torch.backends.mkldnn.enabled
    threads = [threading.Thread(target=a), threading.Thread(target=b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert seen["after_a_left"] is False
    assert torch.backends.mkldnn.enabled == before


def test_stream_interval_reports_the_first_token_then_every_n(tiny_checkpoint):
    # SGLang's --stream-interval: fewer outputs to build, send and write per token; nothing is lost or changed.
    from glimpse.engine.llm_engine import EngineConfig, LLMEngine
    from glimpse.errors import InvalidInputError

    def run(interval: int) -> list:
        engine = LLMEngine(EngineConfig(tiny_checkpoint("glm4v"), dtype="float32", stream_interval=interval))
        rid = engine.add_request(None, "Count to ten", SamplingParams(temperature=0, max_tokens=9, ignore_eos=True,
                                                                      logprobs=1))  # fmt: skip
        outs = []
        while engine.has_unfinished_requests():
            outs += [o for o in engine.step() if o.request_id == rid]
        return outs

    every, coarse = run(1), run(3)
    assert [len(o.outputs[0].delta_token_ids) for o in coarse] == [1, 3, 3, 2]  # first at once, the last when done
    final = coarse[-1].outputs[0]
    same = every[-1].outputs[0]
    assert (final.text, final.token_ids, final.logprobs, final.finish_reason) == (
        same.text, same.token_ids, same.logprobs, same.finish_reason)
    assert sum((o.outputs[0].delta_token_ids for o in coarse), []) == final.token_ids
    assert "".join(o.outputs[0].delta_text for o in coarse) == final.text
    assert sum((o.outputs[0].delta_logprobs for o in coarse), []) == final.logprobs
    with pytest.raises(InvalidInputError, match=r"stream_interval \(--stream-interval\) is 0"):
        LLMEngine(EngineConfig(tiny_checkpoint("glm4v"), stream_interval=0))


def test_stream_interval_sends_a_choice_that_ends_at_once():
    # n > 1: a choice that ends between reports goes out in the step it ends, not with the request's last output.
    from types import SimpleNamespace

    from glimpse.engine.llm_engine import LLMEngine

    def seq(tokens: int, emitted: int, finished: bool = False) -> SimpleNamespace:
        return SimpleNamespace(emitted_tokens=emitted,
                               request=SimpleNamespace(output_token_ids=[7] * tokens, is_finished=finished))  # fmt: skip

    engine = SimpleNamespace(config=SimpleNamespace(stream_interval=4))
    assert LLMEngine._due(engine, [seq(1, 0)])  # a first token: at once
    assert not LLMEngine._due(engine, [seq(7, 5), seq(6, 5)])  # 2 and 1 new of 4
    assert LLMEngine._due(engine, [seq(7, 5), seq(6, 5, finished=True)])  # one of them ended
    assert LLMEngine._due(engine, [seq(9, 5), seq(6, 5)])  # 4 new
    assert LLMEngine._due(SimpleNamespace(config=SimpleNamespace(stream_interval=1)), [seq(6, 5)])
