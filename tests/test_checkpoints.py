"""The checkpoint factory writes folders that HF transformers 5.23 loads as the real architectures."""

from __future__ import annotations

import json
import math

import pytest
import torch
import transformers
from safetensors import safe_open

from glimpse.testing import FAMILIES, make_checkpoint

HF_CLASSES = {
    # family: (model class, processor, image processor, video processor, model_type)
    "glm4v": ("Glm4vForConditionalGeneration", "Glm4vProcessor", "Glm4vImageProcessor", "Glm4vVideoProcessor", "glm4v"),
    "glm46v": ("Glm46VForConditionalGeneration", "Glm46VProcessor", "Glm46VImageProcessor", "Glm46VVideoProcessor", "glm46v"),
    "glm46v_flash": ("Glm4vForConditionalGeneration", "Glm46VProcessor", "Glm46VImageProcessor", "Glm46VVideoProcessor", "glm4v"),
    "glmga": ("Glm46VForConditionalGeneration", "Glm46VProcessor", "GlmgaImageProcessor", "GlmgaVideoProcessor", "glmga"),
    "glm4v_moe": ("Glm4vMoeForConditionalGeneration", "Glm4vProcessor", "Glm4vImageProcessor", "Glm4vVideoProcessor", "glm4v_moe"),
    "glm46v_moe": ("Glm46VForConditionalGeneration", "Glm46VProcessor", "Glm46VImageProcessor", "Glm46VVideoProcessor", "glm46v"),
    "glm_ocr": ("GlmOcrForConditionalGeneration", "Glm46VProcessor", "Glm46VImageProcessor", "Glm46VVideoProcessor", "glm_ocr"),
    "qwen2_5_vl": ("Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLProcessor", "Qwen2VLImageProcessor", "Qwen2VLVideoProcessor", "qwen2_5_vl"),
}  # fmt: skip


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_loads_tiny_checkpoint(family, tiny_checkpoint):
    path = tiny_checkpoint(family)
    model_cls, proc_cls, img_cls, vid_cls, model_type = HF_CLASSES[family]
    proc = transformers.AutoProcessor.from_pretrained(path)
    assert (
        type(proc).__name__,
        type(proc.image_processor).__name__,
        type(proc.video_processor).__name__,
    ) == (proc_cls, img_cls, vid_cls)
    model, info = transformers.AutoModelForImageTextToText.from_pretrained(path, output_loading_info=True)
    assert type(model).__name__ == model_cls
    assert model.config.model_type == model_type
    assert not any(info.values()), info  # no missing, unexpected or mismatched tensors

    # Every special id in config.json is the tokenizer's own id for that token.
    tok = proc.tokenizer
    cfg = json.loads((path / "config.json").read_text())
    names = {"image_token_id": "<|image|>", "video_token_id": "<|video|>", "image_start_token_id": "<|begin_of_image|>",
             "image_end_token_id": "<|end_of_image|>", "video_start_token_id": "<|begin_of_video|>",
             "video_end_token_id": "<|end_of_video|>"}  # fmt: skip
    if family == "qwen2_5_vl":
        names = {"image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>",
                 "vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>"}  # fmt: skip
    for key, token in names.items():
        assert cfg[key] == tok.convert_tokens_to_ids(token), key
    gen = json.loads((path / "generation_config.json").read_text())
    if family != "qwen2_5_vl":
        assert gen["eos_token_id"] == [
            tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|user|>", "<|observation|>")
        ]


@pytest.mark.parametrize("family", ["glm4v", "glm46v", "qwen2_5_vl"])
def test_chat_template_renders_like_the_real_model(family, tiny_checkpoint):
    proc = transformers.AutoProcessor.from_pretrained(tiny_checkpoint(family))
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]}]
    text = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    expected = {
        "glm4v": "[gMASK]<sop><|user|>\n<|begin_of_image|><|image|><|end_of_image|>Describe.<|assistant|>\n",
        "glm46v": "[gMASK]<sop><|user|>\n<|begin_of_image|><|image|><|end_of_image|>Describe.<|assistant|>\n",
        "qwen2_5_vl": "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|><|image_pad|><|vision_end|>Describe.<|im_end|>\n<|im_start|>assistant\n",
    }[family]
    assert text == expected
    if family == "glm46v":
        off = proc.apply_chat_template(
            msgs, add_generation_prompt=True, tokenize=False, enable_thinking=False
        )
        assert off == expected.replace("Describe.", "Describe./nothink") + "<think></think>\n"


def test_sharded_bf16_legacy_checkpoint_is_the_same_weights(tmp_path):
    a = make_checkpoint("qwen2_5_vl", "tiny", tmp_path / "a", seed=3)
    b = make_checkpoint(
        "qwen2_5_vl", "tiny", tmp_path / "b", seed=3, dtype="bfloat16", shards=3, legacy_names=True
    )
    index = json.loads((b / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 3
    with safe_open(str(a / "model.safetensors"), "pt") as f:
        ref = {k: f.get_tensor(k) for k in f.keys()}
    got = {}
    for fname in set(index["weight_map"].values()):
        with safe_open(str(b / fname), "pt") as f:
            got.update({k: f.get_tensor(k) for k in f.keys()})
    assert any(k.startswith("visual.") for k in got) and not any(k.startswith("model.visual.") for k in got)
    legacy = {("model." + k if k.startswith("visual.") else k.replace("model.", "model.language_model.", 1)): v
              for k, v in got.items()}  # fmt: skip
    assert legacy.keys() == ref.keys()
    for k, v in ref.items():
        assert legacy[k].dtype == torch.bfloat16
        torch.testing.assert_close(legacy[k].float(), v.to(torch.bfloat16).float(), rtol=0, atol=0)


def test_seeded_and_not_degenerate(tmp_path):
    a = make_checkpoint("glm4v", "tiny", tmp_path / "a", seed=1)
    b = make_checkpoint("glm4v", "tiny", tmp_path / "b", seed=1)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    # Greedy decoding of a random model must not collapse onto one repeated token.
    model = transformers.AutoModelForImageTextToText.from_pretrained(a)
    proc = transformers.AutoProcessor.from_pretrained(a)
    ids = proc.tokenizer(
        "[gMASK]<sop><|user|>\nTell me about the rocket launch.<|assistant|>\n", return_tensors="pt"
    )
    out = model.generate(**ids, max_new_tokens=24, do_sample=False)[0, ids["input_ids"].shape[1] :]
    assert len(set(out.tolist())) >= 6, out.tolist()


@pytest.mark.parametrize("family", ["glm46v", "glm4v_moe", "qwen2_5_vl"])
def test_small_checkpoint_size_and_hf_load(family, tmp_path):
    path = make_checkpoint(family, "small", tmp_path, seed=0, dtype="bfloat16")
    model = transformers.AutoModelForImageTextToText.from_pretrained(path)
    n = sum(p.numel() for p in model.parameters())
    assert 50e6 <= n <= 150e6, n
    assert 2000 <= model.config.get_text_config().vocab_size <= 8000


def test_3b_without_weights_has_the_real_qwen2_5_vl_3b_shapes(tmp_path, capsys):
    from glimpse.cli import main
    from glimpse.testing.checkpoints import hf_parameter_shapes

    path = tmp_path / "q3b"
    assert main(["make-checkpoint", "qwen2_5_vl", str(path), "--size", "3b", "--no-weights"]) == 0
    assert "WITHOUT weights" in capsys.readouterr().out and not list(path.glob("*.safetensors"))
    cfg = json.loads((path / "config.json").read_text())
    text, vision = cfg["text_config"], cfg["vision_config"]
    # The numbers of Qwen/Qwen2.5-VL-3B-Instruct's config.json.
    assert {k: text[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                                 "intermediate_size", "vocab_size", "max_position_embeddings")} == {
        "hidden_size": 2048, "num_hidden_layers": 36, "num_attention_heads": 16, "num_key_value_heads": 2,
        "intermediate_size": 11008, "vocab_size": 151936, "max_position_embeddings": 128000}  # fmt: skip
    assert (
        text["rope_parameters"]["mrope_section"] == [16, 24, 24]
        and text["rope_parameters"]["rope_theta"] == 1e6
    )
    assert {k: vision[k] for k in ("depth", "hidden_size", "num_heads", "intermediate_size", "out_hidden_size",
                                   "fullatt_block_indexes", "window_size", "patch_size")} == {
        "depth": 32, "hidden_size": 1280, "num_heads": 16, "intermediate_size": 3420, "out_hidden_size": 2048,
        "fullatt_block_indexes": [7, 15, 23, 31], "window_size": 112, "patch_size": 14}  # fmt: skip
    assert (cfg["image_token_id"], cfg["video_token_id"], cfg["vision_start_token_id"], cfg["vision_end_token_id"]) == (
        151655, 151656, 151652, 151653)  # fmt: skip
    assert json.loads((path / "preprocessor_config.json").read_text())["max_pixels"] == 12845056
    # HF's tokenizer is exactly as long as the vocabulary, with the real special ids.
    tok = transformers.AutoTokenizer.from_pretrained(path)
    assert len(tok) == 151936
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>", "<|image_pad|>"]) == [
        151643,
        151645,
        151655,
    ]
    # HF's model class on this config has the published 3.75B parameters.
    assert sum(math.prod(s) for s in hf_parameter_shapes(cfg).values()) == 3_754_622_976
    assert main(["make-checkpoint", "glm4v", str(tmp_path / "g"), "--size", "3b"]) == 2
    assert "3b: qwen2_5_vl only" in capsys.readouterr().err


def test_a_folder_without_weights_is_served_with_load_format_dummy(tmp_path):
    from test_server import ServerProcess

    path = make_checkpoint("qwen2_5_vl", "tiny", tmp_path / "nw", weights=False)
    with pytest.raises(RuntimeError, match=r"(?s)exited with 1.*no safetensors weights.*dummy"):  # a checkpoint problem: 1
        ServerProcess(path, "--kv-cache-memory", "64MiB")
    srv = ServerProcess(path, "--load-format", "dummy", "--kv-cache-memory", "64MiB", "--dtype", "float32")
    try:
        r = srv.post("/v1/chat/completions", {"model": "tiny-glm", "messages": [{"role": "user", "content": "hi"}],
                                              "max_tokens": 3, "ignore_eos": True})  # fmt: skip
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    finally:
        srv.stop()
