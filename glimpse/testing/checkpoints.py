"""The checkpoint factory: complete, offline HF checkpoint folders of the real architectures.

`make_checkpoint(family, size, path, seed)` writes config.json, seeded random safetensors
(optionally sharded, in float32/bfloat16/float16, in the current or the older HF naming
scheme), a trained byte-level BPE tokenizer holding every special token the family needs,
a chat template modelled on the real one, processor configs naming the real HF processor
classes, and generation_config.json. HF's AutoProcessor and AutoModelForImageTextToText
load every folder it writes.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer

from glimpse.testing.tokenizer import (
    GLM41V_TEMPLATE,
    GLM45V_TOOLS_TEMPLATE,
    GLM46V_TEMPLATE,
    QWEN25VL_TEMPLATE,
    build_tokenizer,
)

FAMILIES = ("glm4v", "glm46v", "glm46v_flash", "glmga", "glm4v_moe", "glm46v_moe", "glm_ocr", "qwen2_5_vl")
# GLM-4.5V and GLM-4.6V (Flash too) call tools: their templates carry the real ones' tool section.
TOOL_FAMILIES = ("glm46v", "glm46v_flash", "glm4v_moe", "glm46v_moe")
MOE_FAMILIES = ("glm4v_moe", "glm46v_moe")  # GLM-4.5V, and GLM-4.6V: model_type glm46v over a glm4v_moe_text tower  # fmt: skip
# medium (~700M parameters) is meant for load_format="dummy"; 3b (qwen2_5_vl only) has Qwen2.5-VL-3B-Instruct's
# shapes and token ids, written with weights=False for side-by-side serving benchmarks (vLLM --load-format dummy).
SIZES = ("tiny", "small", "medium", "3b")

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

GLM_SPECIAL = [
    "<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>",
    "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>",
    "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>", "<|end_of_video|>",
    "<|image|>", "<|video|>",
]  # fmt: skip
GLM_ADDED = ["<think>", "</think>", "<answer>", "</answer>", "<|begin_of_box|>", "<|end_of_box|>",
             "<tool_call>", "</tool_call>", "<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>",
             "<tool_response>", "</tool_response>"]  # fmt: skip
QWEN_SPECIAL = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]  # fmt: skip
QWEN_ADDED = ["<tool_call>", "</tool_call>"]


@dataclass(frozen=True)
class _Dims:
    vocab: int
    v_hidden: int
    v_depth: int
    v_heads: int
    v_inter: int
    image_size: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    inter: int
    mrope_section: tuple[int, int, int]
    image_max_tokens: int  # processor ceiling per image (keeps CPU tests and benches quick)
    video_max_tokens: int  # processor ceiling per video (GLM) / per frame-pair (Qwen)
    fullatt_blocks: tuple[int, ...] | None = None  # Qwen vision blocks with full attention (None: two)
    max_positions: int = 32768


_DIMS = {
    ("glm", "tiny"): _Dims(640, 32, 2, 2, 64, 112, 128, 2, 4, 2, 256, (2, 3, 3), 64, 160),
    ("glm", "small"): _Dims(4096, 384, 8, 6, 1536, 336, 768, 12, 12, 4, 2048, (4, 6, 6), 1024, 2048),
    ("glm", "medium"): _Dims(4096, 384, 8, 6, 1536, 336, 1536, 24, 12, 4, 4608, (8, 12, 12), 1024, 2048),
    ("qwen", "tiny"): _Dims(640, 64, 4, 2, 96, 0, 128, 2, 4, 2, 256, (4, 6, 6), 64, 32),
    ("qwen", "small"): _Dims(4096, 384, 8, 6, 1024, 0, 768, 12, 12, 2, 2048, (8, 12, 12), 1024, 256),
    ("qwen", "medium"): _Dims(4096, 384, 8, 6, 1024, 0, 1536, 24, 12, 4, 4608, (16, 24, 24), 1024, 256),
    ("qwen", "3b"): _Dims(151936, 1280, 32, 16, 3420, 0, 2048, 36, 16, 2, 11008, (16, 24, 24), 16384, 16384,
                          fullatt_blocks=(7, 15, 23, 31), max_positions=128000),
}  # fmt: skip
# ("qwen", "3b") is Qwen/Qwen2.5-VL-3B-Instruct's config.json: text 2048 x 36 layers, 16 heads / 2 KV heads,
# MLP 11008, vocab 151936, 128000 positions; vision 1280 x 32 blocks, 16 heads, MLP 3420, full attention in
# blocks 7/15/23/31; preprocessor max_pixels 12845056 (= 16384 merged tokens of 28x28).
# The real Qwen2.5-VL vocabulary puts its special tokens from id 151643 on (in QWEN_SPECIAL's order).
_QWEN_FIRST_SPECIAL_ID = 151643
_PADDED_TRAINED_VOCAB = 4096  # the part of a padded vocabulary that is a trained BPE


@dataclass(frozen=True)
class _TextExtras:
    """What GLM-4.5V/4.6V (MoE) and GLM-OCR add to the GLM dims: an explicit head_dim that differs
    from hidden/heads, as the real checkpoints have (4096 / 96 heads -> 128; 1536 / 16 -> 128), and
    the mrope_section that covers its rotary half (MoE: partial 0.5; OCR: full rotary)."""

    head_dim: int
    moe_section: tuple[int, int, int]  # sums to head_dim * 0.5 / 2
    ocr_section: tuple[int, int, int]  # sums to head_dim / 2


@dataclass(frozen=True)
class _MoeDims:
    experts: int
    top_k: int
    n_group: int
    topk_group: int
    moe_inter: int
    n_shared: int
    dense_layers: int  # first_k_dense_replace


_EXTRAS = {
    "tiny": _TextExtras(48, (2, 5, 5), (4, 10, 10)),
    "small": _TextExtras(96, (4, 10, 10), (8, 20, 20)),
    "medium": _TextExtras(128, (8, 12, 12), (16, 24, 24)),
}
_MOE_DIMS = {
    "tiny": _MoeDims(8, 2, 2, 1, 64, 1, 1),
    "small": _MoeDims(16, 4, 4, 2, 160, 1, 1),
    "medium": _MoeDims(16, 4, 4, 2, 256, 1, 1),
}


def make_checkpoint(
    family: str,
    size: str,
    path: str | Path,
    seed: int = 0,
    *,
    dtype: str = "float32",
    shards: int = 1,
    legacy_names: bool = False,
    weights: bool = True,
    expert_layout: str | None = None,
) -> Path:
    """Write a complete HF checkpoint folder for `family` at `size` into `path` and return it.

    dtype: the on-disk dtype (float32, bfloat16, float16). shards > 1 writes
    `model-0000i-of-0000n.safetensors` plus `model.safetensors.index.json`. legacy_names
    writes the older HF layout (`model.*` text tower, `visual.*` vision tower). weights=False
    writes everything but the safetensors (for `load_format="dummy"`). expert_layout (MoE
    families): "per_expert" writes `mlp.experts.E.{gate,up,down}_proj.weight` as the real GLM-4.5V
    ships and HF saves for glm4v_moe; "stacked" writes HF's in-memory `mlp.experts.gate_up_proj` /
    `down_proj`, which is what HF 5.23 saves for model_type glm46v and the only layout it loads
    there (it has no expert conversion for glm46v). Default: the layout HF loads for the family.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose one of {', '.join(FAMILIES)}")
    is_qwen = family == "qwen2_5_vl"
    if size not in SIZES or (size == "3b" and not is_qwen):
        raise ValueError(f"unknown size {size!r} for {family}; choose one of {', '.join(SIZES)} (3b: qwen2_5_vl only)")  # fmt: skip
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    dims = _DIMS[("qwen" if is_qwen else "glm", size)]

    special, added = (QWEN_SPECIAL, QWEN_ADDED) if is_qwen else (GLM_SPECIAL, GLM_ADDED)
    if size == "3b":
        tok = _padded_tokenizer(dims.vocab, special, added)
    else:
        tok = build_tokenizer(dims.vocab, special, added)
    tok.save(str(out / "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in special + added}
    vocab_size = tok.get_vocab_size()

    config = _qwen_config(dims, ids, vocab_size) if is_qwen else _glm_config(family, size, dims, ids, vocab_size)  # fmt: skip
    _write_json(out / "config.json", config)
    _write_json(out / "generation_config.json", _generation_config(is_qwen, ids))
    _write_tokenizer_files(out, family, ids)
    for name, cfg in _processor_configs(family, dims).items():
        _write_json(out / name, cfg)

    if not weights:
        return out
    tensors = _random_weights(config, seed, getattr(torch, dtype))
    if legacy_names:
        tensors = {_legacy_name(k): v for k, v in tensors.items()}
    layout = expert_layout or ("per_expert" if family == "glm4v_moe" else "stacked")
    if layout not in ("per_expert", "stacked"):
        raise ValueError(f"expert_layout {expert_layout!r}: choose per_expert or stacked")
    if family in MOE_FAMILIES:
        tensors = _moe_on_disk(tensors, config["text_config"]["moe_intermediate_size"], layout == "per_expert")  # fmt: skip
    _save_shards(out, tensors, shards)
    return out


def _padded_tokenizer(vocab_size: int, special: list[str], added: list[str]) -> Tokenizer:
    """A tokenizer of exactly `vocab_size` ids with the specials at the real Qwen2.5-VL ids.

    A BPE trained on the factory's corpus cannot reach a real vocabulary (~150k), so a small trained
    BPE is padded with unreachable `<|pad_i|>` vocabulary entries up to id 151643, the specials and
    added tokens follow there, and special `<|placeholder_i|>` tokens fill the rest: HF and vLLM see a
    tokenizer as long as the config's vocabulary, and every id the model can emit decodes.
    """
    tok = build_tokenizer(_PADDED_TRAINED_VOCAB, [], [])
    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    vocab.update({f"<|pad_{i}|>": i for i in range(len(vocab), _QWEN_FIRST_SPECIAL_ID)})
    tok = Tokenizer.from_str(json.dumps(data))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in added])
    rest = vocab_size - tok.get_vocab_size()
    tok.add_special_tokens([AddedToken(f"<|placeholder_{i}|>", special=True, normalized=False) for i in range(rest)])  # fmt: skip
    assert tok.get_vocab_size() == vocab_size and tok.token_to_id(special[0]) == _QWEN_FIRST_SPECIAL_ID
    return tok


# ---- config.json ---------------------------------------------------------------------------


def _text_dims(d: _Dims, vocab: int) -> dict:
    """The text-tower sizes every family's text_config shares."""
    return {"vocab_size": vocab, "hidden_size": d.hidden, "intermediate_size": d.inter,
            "num_hidden_layers": d.layers, "num_attention_heads": d.heads, "num_key_value_heads": d.kv_heads,
            "hidden_act": "silu", "max_position_embeddings": d.max_positions}  # fmt: skip


def _glm_config(family: str, size: str, d: _Dims, ids: dict[str, int], vocab: int) -> dict:
    model_type, arch = {
        "glm4v": ("glm4v", "Glm4vForConditionalGeneration"),
        "glm46v": ("glm46v", "Glm46VForConditionalGeneration"),
        "glm46v_flash": ("glm4v", "Glm4vForConditionalGeneration"),
        "glmga": ("glmga", "Glm46VForConditionalGeneration"),
        "glm4v_moe": ("glm4v_moe", "Glm4vMoeForConditionalGeneration"),
        "glm46v_moe": ("glm46v", "Glm46VForConditionalGeneration"),
        "glm_ocr": ("glm_ocr", "GlmOcrForConditionalGeneration"),
    }[family]
    head_dim = d.hidden // d.heads
    text = {
        "model_type": "glm4v_text",
        **_text_dims(d, vocab),
        "rms_norm_eps": 1e-5,
        "attention_bias": True,
        "pad_token_id": ids["<|endoftext|>"],
        "eos_token_id": [ids["<|endoftext|>"], ids["<|user|>"], ids["<|observation|>"]],
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 10000.0,
            "partial_rotary_factor": 0.5,
            "mrope_section": list(d.mrope_section),
        },
    }
    assert sum(d.mrope_section) * 2 == int(head_dim * 0.5), "mrope_section must cover rotary_dim/2"
    extras = _EXTRAS[size]
    if family in MOE_FAMILIES:
        m = _MOE_DIMS[size]
        text.update({
            "model_type": "glm4v_moe_text", "head_dim": extras.head_dim, "moe_intermediate_size": m.moe_inter,
            "n_routed_experts": m.experts, "num_experts_per_tok": m.top_k, "n_group": m.n_group,
            "topk_group": m.topk_group, "n_shared_experts": m.n_shared, "first_k_dense_replace": m.dense_layers,
            "norm_topk_prob": True, "routed_scaling_factor": 2.5, "use_qk_norm": False,
        })  # fmt: skip
        text["rope_parameters"]["mrope_section"] = list(extras.moe_section)
    elif family == "glm_ocr":
        # GLM-OCR: full rotary, no qkv bias, text MLP 3 x hidden (= the merger width HF derives)
        text.update({"model_type": "glm_ocr_text", "head_dim": extras.head_dim, "intermediate_size": 3 * d.hidden,
                     "attention_bias": False, "num_nextn_predict_layers": 1})  # fmt: skip
        text["rope_parameters"].update({"partial_rotary_factor": 1.0, "mrope_section": list(extras.ocr_section)})  # fmt: skip
    vision = {
        "model_type": "glm4v_vision",
        "depth": d.v_depth,
        "hidden_size": d.v_hidden,
        "num_heads": d.v_heads,
        "intermediate_size": d.v_inter,
        "out_hidden_size": d.hidden,
        "image_size": d.image_size,
        "patch_size": 14,
        "temporal_patch_size": 2,
        "spatial_merge_size": 2,
        "in_channels": 3,
        "rms_norm_eps": 1e-5,
        "attention_bias": False,
        "hidden_act": "silu",
    }
    if family in MOE_FAMILIES:
        vision["model_type"] = "glm4v_moe_vision"
    elif family == "glm_ocr":
        vision.update({"model_type": "glm_ocr_vision", "attention_bias": True})
    return {
        "architectures": [arch],
        "model_type": model_type,
        "text_config": text,
        "vision_config": vision,
        "image_token_id": ids["<|image|>"],
        "video_token_id": ids["<|video|>"],
        "image_start_token_id": ids["<|begin_of_image|>"],
        "image_end_token_id": ids["<|end_of_image|>"],
        "video_start_token_id": ids["<|begin_of_video|>"],
        "video_end_token_id": ids["<|end_of_video|>"],
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "5.23.0",
    }


def _qwen_config(d: _Dims, ids: dict[str, int], vocab: int) -> dict:
    head_dim = d.hidden // d.heads
    assert sum(d.mrope_section) * 2 == head_dim, "mrope_section must cover head_dim/2"
    text = {
        "model_type": "qwen2_5_vl_text",
        **_text_dims(d, vocab),
        "rms_norm_eps": 1e-6,
        "use_sliding_window": False,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": list(d.mrope_section)},
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "tie_word_embeddings": True,
    }  # fmt: skip
    vision = {
        "model_type": "qwen2_5_vl",
        "depth": d.v_depth,
        "hidden_size": d.v_hidden,
        "num_heads": d.v_heads,
        "intermediate_size": d.v_inter,
        "out_hidden_size": d.hidden,
        "hidden_act": "silu",
        "in_chans": 3,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "window_size": 112,
        "fullatt_block_indexes": list(d.fullatt_blocks or (d.v_depth // 2 - 1, d.v_depth - 1)),
        "tokens_per_second": 2,
    }
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "model_type": "qwen2_5_vl",
        "text_config": text,
        "vision_config": vision,
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        "transformers_version": "5.23.0",
    }


def _generation_config(is_qwen: bool, ids: dict[str, int]) -> dict:
    if is_qwen:
        eos = [ids["<|im_end|>"], ids["<|endoftext|>"]]
        return {"bos_token_id": ids["<|endoftext|>"], "eos_token_id": eos, "pad_token_id": ids["<|endoftext|>"],
                "do_sample": True, "temperature": 0.1, "top_p": 0.001, "top_k": 1, "repetition_penalty": 1.05}  # fmt: skip
    eos = [ids["<|endoftext|>"], ids["<|user|>"], ids["<|observation|>"]]
    return {"eos_token_id": eos, "pad_token_id": ids["<|endoftext|>"], "do_sample": True,
            "temperature": 1.0, "top_p": 0.0001, "top_k": 2}  # fmt: skip


# The demo checkpoint (glimpse.llm.demo_checkpoint) has random weights. The factory's GLM sampling defaults
# (top_p 1e-4, top_k 2, as the real GLM checkpoints ship them) leave one candidate per token, so there any
# temperature and any n > 1 would give one text; the demo samples from the whole vocabulary instead.
DEMO_SAMPLING = {"top_p": 1.0, "top_k": 0}


def set_demo_sampling(path: str | Path) -> None:
    """Give the folder's generation_config.json the demo's sampling defaults; rewritten only when they
    differ (a demo cached by an older glimpse), by an atomic rename, since several processes may open it."""
    file = Path(path) / "generation_config.json"
    gen = json.loads(file.read_text())
    if all(gen.get(k) == v for k, v in DEMO_SAMPLING.items()):
        return
    tmp = file.with_name(f".{file.name}.{os.getpid()}.tmp")
    _write_json(tmp, gen | DEMO_SAMPLING)
    os.replace(tmp, file)


# ---- tokenizer and processor files -------------------------------------------------------------


def _write_tokenizer_files(out: Path, family: str, ids: dict[str, int]) -> None:
    is_qwen = family == "qwen2_5_vl"
    if is_qwen:
        template = QWEN25VL_TEMPLATE  # as Qwen2.5-VL ships it, without tools (glimpse/templates has a tool one)
    elif family == "glm4v":
        template = GLM41V_TEMPLATE
    else:
        template = GLM45V_TOOLS_TEMPLATE if family in TOOL_FAMILIES else GLM46V_TEMPLATE
    (out / "chat_template.jinja").write_text(template)
    if is_qwen:
        cfg = {"tokenizer_class": "Qwen2Tokenizer", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
               "unk_token": None, "bos_token": None, "model_max_length": 32768, "errors": "replace",
               "add_prefix_space": False, "split_special_tokens": False}  # fmt: skip
    else:
        cfg = {"tokenizer_class": "TokenizersBackend", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
               "model_max_length": 32768, "padding_side": "left", "clean_up_tokenization_spaces": False,
               "do_lower_case": False, "remove_space": False}  # fmt: skip
    cfg["chat_template"] = template
    _write_json(out / "tokenizer_config.json", cfg)
    _write_json(out / "special_tokens_map.json", {"eos_token": cfg["eos_token"], "pad_token": cfg["pad_token"]})  # fmt: skip


def _processor_configs(family: str, d: _Dims) -> dict[str, dict]:
    """preprocessor_config.json, video_preprocessor_config.json, processor_config.json."""
    common = {"do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
              "image_mean": CLIP_MEAN, "image_std": CLIP_STD, "do_convert_rgb": True, "resample": 3,
              "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2}  # fmt: skip
    if family == "qwen2_5_vl":
        image = {**common, "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor",
                 "min_pixels": 3136, "max_pixels": 784 * d.image_max_tokens,
                 "size": {"shortest_edge": 3136, "longest_edge": 784 * d.image_max_tokens}}  # fmt: skip
        video = {**common, "video_processor_type": "Qwen2VLVideoProcessor", "processor_class": "Qwen2_5_VLProcessor",
                 "size": {"shortest_edge": 3136, "longest_edge": 784 * d.video_max_tokens},
                 "min_frames": 4, "max_frames": 768, "do_sample_frames": False}  # fmt: skip
        return {"preprocessor_config.json": image, "video_preprocessor_config.json": video,
                "processor_config.json": {"processor_class": "Qwen2_5_VLProcessor"}}  # fmt: skip
    # GLM-4.5V (glm4v_moe) ships the GLM-4.1V processors (HF's auto map too); GLM-OCR the GLM-4.6V ones.
    kind = "glm4v" if family in ("glm4v", "glm4v_moe") else family
    proc = "Glm4vProcessor" if kind == "glm4v" else "Glm46VProcessor"
    img_cls = {"glm4v": "Glm4vImageProcessor", "glmga": "GlmgaImageProcessor"}.get(kind, "Glm46VImageProcessor")  # fmt: skip
    vid_cls = {"glm4v": "Glm4vVideoProcessor", "glmga": "GlmgaVideoProcessor"}.get(kind, "Glm46VVideoProcessor")  # fmt: skip
    # GLM sizes are pixel *areas* over the (2-frame) temporal patch: tokens = area / (2 * 784).
    image = {**common, "image_processor_type": img_cls, "processor_class": proc,
             "size": {"shortest_edge": 12544, "longest_edge": 2 * 784 * d.image_max_tokens}}  # fmt: skip
    video = {**common, "video_processor_type": vid_cls, "processor_class": proc, "do_sample_frames": True,
             "size": {"shortest_edge": 12544, "longest_edge": 2 * 784 * d.video_max_tokens}, "fps": 2}  # fmt: skip
    if kind == "glm4v":
        video["max_duration"] = 300
    if family == "glmga":
        image["patch_expand_factor"] = video["patch_expand_factor"] = 1
        video["max_frames"] = 640
    return {"preprocessor_config.json": image, "video_preprocessor_config.json": video,
            "processor_config.json": {"processor_class": proc}}  # fmt: skip


# ---- weights ---------------------------------------------------------------------------------


def hf_parameter_shapes(config_dict: dict) -> dict[str, tuple[int, ...]]:
    """Names and shapes of every tensor HF's model class saves for this config (meta device, no memory)."""
    import transformers

    config = transformers.AutoConfig.for_model(**config_dict)
    cls = getattr(transformers, config_dict["architectures"][0])
    with torch.device("meta"):
        model = cls(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if config_dict.get("tie_word_embeddings"):
        shapes.pop("lm_head.weight", None)
    return shapes


def _random_weights(config: dict, seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Seeded weights with real margins: unit-scale embeddings, fan-in scaled linears, norms near 1.

    A plain std-0.02 init makes a random model repeat one token from the first step, which
    hides KV-cache bugs; scaling the head and q/k projections keeps greedy choices decisive.
    """
    gen = torch.Generator().manual_seed(seed)
    hidden = config["text_config"]["hidden_size"]
    tensors = {}
    for name, shape in sorted(hf_parameter_shapes(config).items()):
        tensors[name] = _init_tensor(name, shape, gen, hidden).to(dtype).contiguous()
    return tensors


def init_distribution(name: str, shape: tuple[int, ...], hidden: int) -> tuple[float, float]:
    """(mean, std) of the normal distribution a parameter of this name and shape is drawn from."""
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "e_score_correction_bias":
        return 0.0, 0.1  # on the scale of sigmoid score gaps, so it changes some expert choices
    is_norm = any(k in name for k in ("norm", "ln_q")) and "proj" not in name.rsplit(".", 2)[-2]
    if is_norm or name.endswith("post_projection_norm.weight"):
        return (1.0, 0.1) if leaf == "weight" else (0.0, 0.02)
    if leaf == "bias":
        return 0.0, 0.02
    if "embed_tokens" in name:
        return 0.0, 1.0
    if "position_embedding" in name:
        return 0.0, 0.5
    if name == "lm_head.weight":
        return 0.0, 2.0 / math.sqrt(hidden)
    fan_in = math.prod(shape[1:]) if len(shape) > 1 else shape[0]
    if ".mlp.experts." in name and len(shape) == 3:  # stacked experts [E, out, in]: per-expert fan-in
        fan_in = shape[-1]
    std = 1.0 / math.sqrt(fan_in)
    if any(k in name for k in ("q_proj", "k_proj")):
        std *= 2.0  # sharper attention patterns than a plain fan-in init
    return 0.0, std


def _init_tensor(name: str, shape: tuple[int, ...], gen: torch.Generator, hidden: int) -> torch.Tensor:
    mean, std = init_distribution(name, shape, hidden)
    tensor = torch.randn(shape, generator=gen) * std
    return mean + tensor if mean else tensor


def _moe_on_disk(tensors: dict[str, torch.Tensor], moe_inter: int, per_expert: bool) -> dict[str, torch.Tensor]:  # fmt: skip
    """HF's in-memory MoE tensors -> the checkpoint's: router bias in float32 (as GLM-4.5V ships it)
    and, if per_expert, `experts.gate_up_proj` [E, 2I, H] split into `experts.E.gate_proj` (rows [0, I))
    and `up_proj` (rows [I, 2I)), `experts.down_proj` [E, H, I] into `experts.E.down_proj`."""
    out = {}
    for name, t in tensors.items():
        if name.endswith("e_score_correction_bias"):
            out[name] = t.float()
        elif per_expert and name.endswith(".mlp.experts.gate_up_proj"):
            prefix = name[: -len("gate_up_proj")]
            for e in range(t.shape[0]):
                out[f"{prefix}{e}.gate_proj.weight"] = t[e, :moe_inter].contiguous()
                out[f"{prefix}{e}.up_proj.weight"] = t[e, moe_inter:].contiguous()
        elif per_expert and name.endswith(".mlp.experts.down_proj"):
            prefix = name[: -len("down_proj")]
            for e in range(t.shape[0]):
                out[f"{prefix}{e}.down_proj.weight"] = t[e].contiguous()
        else:
            out[name] = t
    return out


def _legacy_name(name: str) -> str:
    """Current HF layout -> the older one (`model.*` text, `visual.*` vision)."""
    if name.startswith("model.language_model."):
        return "model." + name[len("model.language_model.") :]
    if name.startswith("model.visual."):
        return "visual." + name[len("model.visual.") :]
    return name


def _save_shards(out: Path, tensors: dict[str, torch.Tensor], shards: int) -> None:
    for stale in list(out.glob("model*.safetensors")) + list(out.glob("model.safetensors.index.json")):
        stale.unlink()
    meta = {"format": "pt"}
    if shards <= 1:
        save_file(tensors, str(out / "model.safetensors"), metadata=meta)
        return
    names = list(tensors)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    per = math.ceil(len(names) / shards)
    weight_map = {}
    for i in range(shards):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[i * per : (i + 1) * per]}
        save_file(part, str(out / fname), metadata=meta)
        weight_map.update(dict.fromkeys(part, fname))
    _write_json(out / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})  # fmt: skip


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
