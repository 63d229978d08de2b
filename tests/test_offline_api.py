"""The offline API as vLLM and HF users call it: media in the containers they hold (PIL, NumPy, torch,
`(frames, metadata)` videos), HF's `size=` knob, chat_template_kwargs checked as the server checks them,
`max_tokens=None`, logprobs in vLLM's shape, streaming without empty deltas, the documented placeholders
on every family, and a demo checkpoint whose sampling defaults let sampling show.

References: the same media given as a file (decoded by glimpse's own loader), HF's processor and chat
template on the same checkpoint, the model's full-sequence logits, and hand-worked token counts.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import av
import numpy as np
import pytest
import torch
import transformers
from conftest import IMAGES, VIDEOS
from hf_oracle import hf_inputs, rgb
from PIL import Image
from transformers.video_utils import VideoMetadata

from glimpse import LLM, SamplingParams
from glimpse.engine.sampling_params import Logprob
from glimpse.errors import InvalidInputError
from glimpse.processing.prompt import PlaceholderTokens, wrap_bare_videos

FAMILIES = ("glm4v", "glm46v", "qwen2_5_vl")
GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
IMAGE = IMAGES / "chelsea.png"  # 451x300 RGB
VIDEO = VIDEOS / "coffee_15frames_10fps.webm"  # 15 frames at 10 fps


@pytest.fixture(scope="module")
def llms(tiny_checkpoint):
    """llms(family) -> one LLM per family; no prefix or encoder cache, so every request is computed afresh."""
    made: dict[str, LLM] = {}

    def get(family: str) -> LLM:
        if family not in made:
            made[family] = LLM(tiny_checkpoint(family), dtype="float32", kv_cache_memory="64MiB",
                               enable_prefix_caching=False, enable_encoder_cache=False)  # fmt: skip
        return made[family]

    return get


def video_frames() -> np.ndarray:
    """Every frame of VIDEO, decoded with PyAV directly: [15, H, W, 3] uint8."""
    with av.open(str(VIDEO)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def user(*parts: dict, text: str = "Describe.") -> list[dict]:
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


def same(a, b) -> None:
    assert a.prompt_token_ids == b.prompt_token_ids
    assert a.media_tokens == b.media_tokens
    assert a.outputs[0].token_ids == b.outputs[0].token_ids


# ---- 1. media containers ------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["glm46v", "qwen2_5_vl"])
def test_one_image_in_any_container_gives_the_same_prompt_and_tokens(family, llms):
    llm = llms(family)
    pixels = np.asarray(Image.open(IMAGE).convert("RGB"))  # [H, W, 3]
    chw = torch.from_numpy(pixels.copy()).permute(2, 0, 1)  # [3, H, W], as HF and torchvision hold images
    prompt = llm.image_placeholder + "Describe."
    file = llm.generate({"prompt": prompt, "multi_modal_data": {"image": str(IMAGE)}}, GREEDY, use_tqdm=False)[0]
    for image in (Image.open(IMAGE), pixels, chw, [chw]):
        same(llm.generate({"prompt": prompt, "multi_modal_data": {"image": image}}, GREEDY, use_tqdm=False)[0], file)
    chat_file = llm.chat(user({"type": "image_url", "image_url": {"url": str(IMAGE)}}), GREEDY, use_tqdm=False)[0]
    for part in ({"type": "image_pil", "image_pil": Image.open(IMAGE)}, {"type": "image", "image": pixels},
                 {"type": "image", "image": chw}):  # fmt: skip
        same(llm.chat(user(part), GREEDY, use_tqdm=False)[0], chat_file)


@pytest.mark.parametrize("family", ["glm4v", "qwen2_5_vl"])
def test_one_video_in_any_container_gives_the_same_prompt_and_tokens(family, llms):
    llm = llms(family)
    frames = video_frames()
    assert frames.shape[0] == 15
    prompt = llm.video_placeholder + "What happens?"
    file = llm.generate({"prompt": prompt, "multi_modal_data": {"video": str(VIDEO)}}, GREEDY, use_tqdm=False)[0]
    hf_meta = VideoMetadata(total_num_frames=15, fps=10.0, width=frames.shape[2], height=frames.shape[1])
    videos = [
        (frames, {"fps": 10.0, "total_num_frames": 15, "video_backend": "pyav"}),  # vLLM's tuple
        ([Image.fromarray(f) for f in frames], {"fps": 10}),
        (list(frames), {"fps": 10.0}),
        (torch.from_numpy(frames).permute(0, 3, 1, 2), hf_meta),  # HF's [T, 3, H, W] with its metadata
    ]
    for video in videos:
        same(llm.generate({"prompt": prompt, "multi_modal_data": {"video": video}}, GREEDY, use_tqdm=False)[0], file)
    part = {"type": "video", "video": videos[0]}
    chat_file = llm.chat(user({"type": "video_url", "video_url": {"url": str(VIDEO)}}), GREEDY, use_tqdm=False)[0]
    same(llm.chat(user(part), GREEDY, use_tqdm=False)[0], chat_file)


def test_video_frames_without_a_frame_rate_are_refused(llms):
    llm = llms("glm4v")
    frames = video_frames()

    def run(video):
        return llm.generate({"prompt": llm.video_placeholder, "multi_modal_data": {"video": video}}, GREEDY,
                            use_tqdm=False)  # fmt: skip

    for bare in (frames, torch.from_numpy(frames), [Image.fromarray(f) for f in frames], list(frames)):
        with pytest.raises(InvalidInputError, match=r"need their frame rate; pass \(frames, \{'fps': FPS\}\)"):
            run(bare)
    with pytest.raises(InvalidInputError, match="metadata has no fps"):
        run((frames, {"total_num_frames": 15}))
    with pytest.raises(InvalidInputError, match="fps=0 must be a positive number"):
        run((frames, {"fps": 0}))
    with pytest.raises(InvalidInputError, match="total_num_frames=30 but 15 frames were given"):
        run((frames, {"fps": 10.0, "total_num_frames": 30}))


def test_pixel_arrays_must_be_uint8_rgb(llms):
    llm = llms("glm46v")
    pixels = np.asarray(Image.open(IMAGE).convert("RGB"))

    def run(image):
        return llm.generate({"prompt": llm.image_placeholder, "multi_modal_data": {"image": image}}, GREEDY,
                            use_tqdm=False)  # fmt: skip

    with pytest.raises(InvalidInputError, match="must be uint8 .*got float32"):
        run(pixels.astype(np.float32) / 255)
    with pytest.raises(InvalidInputError, match=r"must be RGB .*got shape \[300, 451, 4\]"):
        run(np.dstack([pixels, pixels[..., :1]]))


def test_a_batch_is_preprocessed_on_threads_in_order(llms):
    """A list of prompts is preprocessed on a small thread pool: each output is the one its prompt gets
    alone, in input order, and of two bad prompts the first in input order is the one reported."""
    llm = llms("glm46v")
    pixels = np.asarray(Image.open(IMAGE).convert("RGB"))
    prompts = [{"prompt": f"{llm.image_placeholder} Picture {i}.", "multi_modal_data": {"image": pixels[:, : 200 + 60 * i]}}
               for i in range(4)]  # fmt: skip
    together = llm.generate(prompts, GREEDY, use_tqdm=False)
    for prompt, out in zip(prompts, together, strict=True):
        same(llm.generate(prompt, GREEDY, use_tqdm=False)[0], out)
    assert len({tuple(o.prompt_token_ids) for o in together}) == 4  # four widths, four prompts
    bad = [prompts[0], {**prompts[1], "multi_modal_data": {"image": pixels.astype(np.float32)}},
           {**prompts[2], "multi_modal_data": {"image": np.dstack([pixels, pixels[..., :1]])}}]  # fmt: skip
    with pytest.raises(InvalidInputError, match="must be uint8 .*got float32"):
        llm.generate(bad, GREEDY, use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()


def test_one_lazily_opened_image_in_many_prompts(llms):
    """The same `Image.open` object (not yet decoded) in several prompts of one call: PIL cannot decode one
    image from two threads at once, so the batch must still give each prompt what it gets alone."""
    llm = llms("glm46v")
    alone = llm.generate({"prompt": f"{llm.image_placeholder} Describe.", "multi_modal_data": {"image": Image.open(IMAGE)}},
                         GREEDY, use_tqdm=False)[0]  # fmt: skip
    shared = Image.open(IMAGE)
    outs = llm.generate([{"prompt": f"{llm.image_placeholder} Describe.", "multi_modal_data": {"image": shared}}] * 4,
                        GREEDY, use_tqdm=False)  # fmt: skip
    for out in outs:
        same(alone, out)


# ---- 2. mm_processor_kwargs and chat_template_kwargs ---------------------------------------------


@pytest.mark.parametrize("family", ["glm46v", "qwen2_5_vl"])
def test_hf_size_is_min_and_max_pixels(family, llms, tiny_checkpoint):
    """HF's Qwen2-VL and GLM processors read size={"shortest_edge", "longest_edge"} as pixel counts."""
    llm = llms(family)
    size = {"shortest_edge": 3136, "longest_edge": 40_000}
    ref = hf_inputs(transformers.AutoProcessor.from_pretrained(tiny_checkpoint(family)),
                    [{"type": "image"}, {"type": "text", "text": "Describe."}], [rgb(IMAGE)], size=size)  # fmt: skip
    msgs = user({"type": "image_url", "image_url": {"url": str(IMAGE)}})
    one = dataclasses.replace(GREEDY, max_tokens=1)
    out = llm.chat(msgs, one, use_tqdm=False, mm_processor_kwargs={"size": size})[0]
    assert out.prompt_token_ids == ref["input_ids"][0].tolist()
    assert [m["grid_thw"] for m in out.media_tokens] == ref["image_grid_thw"].tolist()
    plain = llm.chat(msgs, one, use_tqdm=False, mm_processor_kwargs={"min_pixels": 3136, "max_pixels": 40_000})[0]
    assert plain.prompt_token_ids == out.prompt_token_ids
    default = llm.chat(msgs, one, use_tqdm=False)[0]
    assert len(default.prompt_token_ids) > len(out.prompt_token_ids)  # the knob took effect
    with pytest.raises(InvalidInputError, match="size and max_pixels set the same resize bounds.*not both"):
        llm.chat(msgs, one, use_tqdm=False, mm_processor_kwargs={"size": size, "max_pixels": 40_000})
    with pytest.raises(InvalidInputError, match="size must be .*shortest_edge.*longest_edge"):
        llm.chat(msgs, one, use_tqdm=False, mm_processor_kwargs={"size": {"longest_edge": 40_000}})


def test_chat_refuses_template_kwargs_the_template_never_reads(llms):
    llm = llms("glm46v")
    msgs = [{"role": "user", "content": "Hello."}]
    one = dataclasses.replace(GREEDY, max_tokens=1)
    on = llm.chat(msgs, one, use_tqdm=False)[0]
    off = llm.chat(msgs, one, use_tqdm=False, chat_template_kwargs={"enable_thinking": False})[0]
    assert off.prompt_token_ids != on.prompt_token_ids  # the template reads it (GLM-4.6V: /nothink, <think></think>)
    with pytest.raises(InvalidInputError, match=r"\['enable_thinkng'\] are not read .*allowed: .*enable_thinking"):
        llm.chat(msgs, one, use_tqdm=False, chat_template_kwargs={"enable_thinkng": False})
    with pytest.raises(InvalidInputError, match=r"\['bogus'\] are not read"):
        next(llm.stream_chat(msgs, one, chat_template_kwargs={"bogus": 1}))
    with pytest.raises(InvalidInputError, match="enable_thinking must be a boolean, number or string"):
        llm.chat(msgs, one, use_tqdm=False, chat_template_kwargs={"enable_thinking": [False]})
    assert not llm.engine.has_unfinished_requests()


# ---- 3. SamplingParams: max_tokens=None, logprobs the vLLM way -------------------------------------


def test_max_tokens_none_runs_to_the_context_length(tiny_checkpoint):
    llm = LLM(tiny_checkpoint("glm46v"), dtype="float32", max_model_len=48, kv_cache_memory="16MiB")
    out = llm.generate("Once upon a time", SamplingParams(temperature=0, max_tokens=None, ignore_eos=True),
                       use_tqdm=False)[0]  # fmt: skip
    assert len(out.prompt_token_ids) + len(out.outputs[0].token_ids) == 48
    assert out.outputs[0].finish_reason == "length"
    assert SamplingParams().max_tokens == 16  # vLLM's default is unchanged
    assert SamplingParams(max_tokens=None, min_tokens=100).max_tokens is None
    with pytest.raises(InvalidInputError, match=r"max_tokens=0 is invalid: must be an integer >= 1, or None"):
        SamplingParams(max_tokens=0)


def test_logprobs_read_the_vllm_way(llms):
    """`sample_logprobs`: per token {token_id: Logprob}, the sampled token first, then the top-k with ranks
    1..k, each decoded as vLLM decodes it; values from the model's own full-sequence logits."""
    llm = llms("glm46v")
    tok = llm.get_tokenizer()
    out = llm.generate("Tell me", SamplingParams(temperature=0, max_tokens=4, logprobs=3, ignore_eos=True),
                       use_tqdm=False)[0]  # fmt: skip
    comp = out.outputs[0]
    assert len(comp.sample_logprobs) == len(comp.token_ids) == len(comp.logprobs) == 4  # the old shape stays
    ids = out.prompt_token_ids + comp.token_ids
    with torch.no_grad():
        ref = llm.engine.model.compute_logits(torch.tensor(ids)).double().log_softmax(-1)
    for i, (token, entry) in enumerate(zip(comp.token_ids, comp.sample_logprobs, strict=True)):
        row = ref[len(out.prompt_token_ids) - 1 + i]
        best = row.topk(3)
        assert next(iter(entry)) == token  # the sampled token first
        assert list(entry) == best.indices.tolist()  # greedy: it is the most likely, then the next two
        assert [lp.rank for lp in entry.values()] == [1, 2, 3]
        for t, lp in entry.items():
            assert isinstance(lp, Logprob)
            assert lp.decoded_token == tok.decode([t])
            assert math.isclose(lp.logprob, row[t].item(), abs_tol=1e-4)


# ---- 4. streaming --------------------------------------------------------------------------------


def test_stream_chat_yields_no_empty_deltas(llms):
    llm = llms("glm46v")
    msgs = [{"role": "user", "content": "Tell me a story."}]
    params = SamplingParams(temperature=1.0, seed=0, max_tokens=24, ignore_eos=True)
    # The engine's own steps: some add a token but no text (a partial UTF-8 character, a skipped special token).
    llm.engine.add_request("raw", llm.processor(msgs), params)
    raw = []
    while llm.engine.has_unfinished_requests():
        raw += [o for o in llm.engine.step() if not o.finished]
    assert any(o.outputs[0].delta_text == "" for o in raw), "the check below would prove nothing"
    outs = list(llm.stream_chat(msgs, params))
    assert outs[-1].finished and all(not o.finished for o in outs[:-1])
    assert all(o.outputs[0].delta_text for o in outs[:-1])
    final = outs[-1].outputs[0]
    assert "".join(o.outputs[0].delta_text for o in outs) == final.text
    assert [t for o in outs for t in o.outputs[0].delta_token_ids] == final.token_ids  # no token lost


# ---- 5. placeholders -----------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", ["image", "video"])
def test_documented_placeholders_work_for_every_family(family, kind, llms, tiny_checkpoint):
    llm = llms(family)
    src = str(IMAGE if kind == "image" else VIDEO)
    placeholder = llm.image_placeholder if kind == "image" else llm.video_placeholder
    # HF's rendering of the chat template holds the placeholder exactly as glimpse documents it.
    hf = transformers.AutoProcessor.from_pretrained(tiny_checkpoint(family))
    text = hf.apply_chat_template([{"role": "user", "content": [{"type": kind}, {"type": "text", "text": "Describe."}]}],
                                  add_generation_prompt=True, tokenize=False)  # fmt: skip
    assert text.count(placeholder) == 1
    chat = llm.chat(user({"type": f"{kind}_url", f"{kind}_url": {"url": src}}), GREEDY, use_tqdm=False)[0]
    same(llm.generate({"prompt": text, "multi_modal_data": {kind: src}}, GREEDY, use_tqdm=False)[0], chat)
    short = llm.generate({"prompt": f"{placeholder}Describe.", "multi_modal_data": {kind: [src]}}, GREEDY,
                         use_tqdm=False)[0]  # fmt: skip
    assert short.media_tokens == chat.media_tokens
    assert len(short.outputs[0].token_ids) == GREEDY.max_tokens


@pytest.mark.parametrize("family", ["glm4v", "glm46v"])
def test_a_bare_glm_video_marker_gets_the_templates_wrapper(family, llms):
    """`<|video|>` alone used to fail ("N image placeholder runs but 0 image grids"): on GLM only the video
    wrapper makes a video's image-token slots a video."""
    llm = llms(family)
    bare = llm.generate({"prompt": "<|video|>Describe.", "multi_modal_data": {"video": str(VIDEO)}}, GREEDY,
                        use_tqdm=False)[0]  # fmt: skip
    wrapped = llm.generate({"prompt": "<|begin_of_video|><|video|><|end_of_video|>Describe.",
                            "multi_modal_data": {"video": str(VIDEO)}}, GREEDY, use_tqdm=False)[0]  # fmt: skip
    same(bare, wrapped)


def test_wrap_bare_videos_by_hand():
    glm = PlaceholderTokens("<|image|>", "<|video|>", 7, 7, 5, 6, ("<|boi|>", "<|eoi|>"), ("<|bov|>", "<|eov|>"))
    assert wrap_bare_videos("a<|video|>b<|bov|><|video|><|eov|>c<|video|>", glm) == (
        "a<|bov|><|video|><|eov|>b<|bov|><|video|><|eov|>c<|bov|><|video|><|eov|>")
    assert wrap_bare_videos("<|image|> text", glm) == "<|image|> text"
    qwen = PlaceholderTokens("<|image_pad|>", "<|video_pad|>", 1, 2, image_wrap=("<|vs|>", "<|ve|>"),
                             video_wrap=("<|vs|>", "<|ve|>"))  # fmt: skip
    assert wrap_bare_videos("<|video_pad|>x", qwen) == "<|video_pad|>x"  # its own token id: left as HF leaves it


# ---- 6. the demo checkpoint's sampling defaults ------------------------------------------------------


def test_demo_checkpoint_defaults_let_sampling_show(tmp_path, monkeypatch, llms):
    from glimpse.llm import demo_checkpoint

    def two_choices(llm: LLM) -> list[list[int]]:
        params = dataclasses.replace(llm.get_default_sampling_params(), n=2, temperature=0.9, seed=3, max_tokens=8,
                                     ignore_eos=True)  # fmt: skip
        return [c.token_ids for c in llm.generate("Tell me a story.", params, use_tqdm=False)[0].outputs]

    # The factory's GLM defaults, as the real checkpoints ship them (top_p 1e-4, top_k 2), are near-greedy.
    a, b = two_choices(llms("glm46v"))
    assert a == b
    monkeypatch.setenv("GLIMPSE_CACHE", str(tmp_path))
    path = demo_checkpoint()
    assert path.parent == tmp_path
    gen_file = path / "generation_config.json"
    stale = json.loads(gen_file.read_text()) | {"top_p": 0.0001, "top_k": 2}  # a demo cached by an older glimpse
    gen_file.write_text(json.dumps(stale))
    assert demo_checkpoint() == path
    gen = json.loads(gen_file.read_text())
    assert (gen["top_p"], gen["top_k"]) == (1.0, 0) and gen["eos_token_id"] == stale["eos_token_id"]
    a, b = two_choices(LLM(kv_cache_memory="64MiB"))
    assert a != b


# ---- 7. tools, as vLLM's LLM.chat(tools=...) takes them ---------------------------------------------

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                   "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                   "required": ["city", "days"]}}}  # fmt: skip
ASK = [{"role": "user", "content": "What is the weather in Oslo?"}]
ONE = SamplingParams(temperature=0, max_tokens=1)
HERMES = Path(__file__).resolve().parents[1] / "glimpse" / "templates" / "qwen2_5_vl_hermes.jinja"


@pytest.mark.parametrize("family", ["glm46v", "qwen2_5_vl"])
def test_chat_with_tools_gives_hf_apply_chat_templates_prompt(family, llms, tiny_checkpoint):
    """GLM-4.6V's own template; Qwen2.5-VL's has no tool section, so the call passes glimpse's (by name, by file,
    as text). The reference: HF's tokenizer rendering the same messages and tools."""
    llm = llms(family)
    tok = transformers.AutoTokenizer.from_pretrained(tiny_checkpoint(family))
    template = None if family == "glm46v" else HERMES.read_text()
    text = tok.apply_chat_template(ASK, tools=[WEATHER], chat_template=template, add_generation_prompt=True,
                                   tokenize=False)  # fmt: skip
    assert "get_weather" in text and "Weather in a city" in text  # the reference shows the function
    expected = tok.encode(text, add_special_tokens=False)
    given = [None] if family == "glm46v" else ["qwen2_5_vl_hermes", str(HERMES), HERMES.read_text()]
    for chat_template in given:
        out = llm.chat(ASK, ONE, use_tqdm=False, tools=[WEATHER], chat_template=chat_template)[0]
        assert out.prompt_token_ids == expected, chat_template
        streamed = list(llm.stream_chat(ASK, ONE, tools=[WEATHER], chat_template=chat_template))
        assert streamed[-1].prompt_token_ids == expected
    without = llm.chat(ASK, ONE, use_tqdm=False, chat_template=given[0])[0]
    assert without.prompt_token_ids == tok.encode(tok.apply_chat_template(ASK, chat_template=template, tokenize=False,
                                                                          add_generation_prompt=True),
                                                  add_special_tokens=False)  # fmt: skip
    assert len(without.prompt_token_ids) < len(expected)


def test_tools_under_a_template_without_them_are_refused(llms):
    qwen, glm = llms("qwen2_5_vl"), llms("glm46v")
    own = qwen.processor.chat_template
    with pytest.raises(InvalidInputError, match=r"does not render tools.*chat_template='qwen2_5_vl_hermes'"):
        qwen.chat(ASK, ONE, use_tqdm=False, tools=[WEATHER])  # Qwen2.5-VL's own template drops tools
    with pytest.raises(InvalidInputError, match=r"does not render tools.*chat_template"):
        list(qwen.stream_chat(ASK, ONE, tools=[WEATHER]))
    with pytest.raises(InvalidInputError, match=r"tools\[0\] must be \{\"type\": \"function\""):
        glm.chat(ASK, ONE, use_tqdm=False, tools=[WEATHER["function"]])  # the function without its wrapper
    with pytest.raises(InvalidInputError, match="chat_template 'no/such.jinja' is no Jinja text"):
        qwen.chat(ASK, ONE, use_tqdm=False, chat_template="no/such.jinja")
    with pytest.raises(InvalidInputError, match="chat_template is not a valid Jinja template"):
        qwen.chat(ASK, ONE, use_tqdm=False, chat_template="{% if %}")
    # chat_template_kwargs are held to the call's template: GLM's reads enable_thinking, the hermes one does not
    with pytest.raises(InvalidInputError, match="enable_thinking"):
        glm.chat(ASK, ONE, use_tqdm=False, chat_template=HERMES.read_text(),
                 chat_template_kwargs={"enable_thinking": False})  # fmt: skip
    assert qwen.processor.chat_template == own  # a call's template is that call's only
    assert not qwen.engine.has_unfinished_requests() and not glm.engine.has_unfinished_requests()


def test_a_forced_call_offline_reads_back_with_the_servers_parser(llms):
    """docs/tool-calling.md's offline recipe: random weights, so only the constraint can make the call right;
    `jsonschema` judges its arguments."""
    import jsonschema

    from glimpse.engine.sampling_params import StructuredOutputsParams
    from glimpse.server.tool_parsers import GlmToolParser, call_structural_tag

    functions = [WEATHER["function"]]
    tag = call_structural_tag("glm45", functions, forced=True, parallel=False)
    constraint = StructuredOutputsParams(structural_tag=json.dumps(tag))
    params = SamplingParams(max_tokens=200, seed=3, structured_outputs=constraint)
    out = llms("glm46v").chat(ASK, params, use_tqdm=False, tools=[WEATHER],
                              chat_template_kwargs={"enable_thinking": False})[0].outputs[0]  # fmt: skip
    assert out.finish_reason == "stop" and out.text.startswith("<tool_call>get_weather")
    content, calls = GlmToolParser(functions).parse(out.text)
    assert content == "" and [c.name for c in calls] == ["get_weather"]
    jsonschema.validate(json.loads(calls[0].arguments), WEATHER["function"]["parameters"])


def test_a_bf16_engine_keeps_pixels_in_bf16_rounded_as_the_tower_would(tiny_checkpoint, llms):
    """The processor of a bf16 engine hands over bf16 pixel values: exactly the float32 values (HF's
    processor output, tests/test_preprocess_parity.py) rounded to bf16, which the tower did itself
    before; a float32 engine keeps float32. Images and videos; the content hashes differ by dtype."""
    path = tiny_checkpoint("qwen2_5_vl")
    f32 = llms("qwen2_5_vl").processor
    bf16 = LLM(path, dtype="bfloat16", kv_cache_memory="64MiB", warmup=False).processor
    conv = user({"type": "image_url", "image_url": {"url": rgb(IMAGES / "astronaut.png")}},
                {"type": "video_url", "video_url": {"url": str(VIDEO)}})  # fmt: skip
    ours, ref = bf16(conv), f32(conv)
    assert ours.input_ids == ref.input_ids
    for mine, theirs in zip(ours.media, ref.media, strict=True):
        assert theirs.pixel_values.dtype == torch.float32 and mine.pixel_values.dtype == torch.bfloat16
        assert torch.equal(mine.pixel_values, theirs.pixel_values.to(torch.bfloat16))
        assert mine.content_hash != theirs.content_hash
