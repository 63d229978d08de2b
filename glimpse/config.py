"""Reading a checkpoint folder's configuration: the HF config, the family, the processor kind.

The model family (which code runs the weights) comes from `model_type`; the processing
behaviour (frame sampler, timestamp format) comes from the *processor classes* the folder
names, because GLM-4.6V-Flash ships `model_type: glm4v` with the GLM-4.6V processors.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from glimpse.errors import CheckpointError

# model_type -> model code family
MODEL_FAMILIES = {"glm4v": "glm4v", "glm46v": "glm4v", "glmga": "glm4v", "glm4v_moe": "glm4v", "glm_ocr": "glm4v",
                  "qwen2_5_vl": "qwen2_5_vl"}  # fmt: skip


@dataclass(frozen=True)
class ModelConfig:
    """What glimpse needs to know about a checkpoint folder, read once at load time."""

    path: Path
    hf_config: Any = field(repr=False, compare=False)  # transformers PretrainedConfig
    model_type: str
    family: str  # model code: "glm4v" | "qwen2_5_vl"
    processor_kind: str  # processing behaviour: "glm4v" | "glm46v" | "glmga" | "qwen2_5_vl"
    eos_token_ids: tuple[int, ...]
    generation_defaults: dict = field(default_factory=dict, compare=False)


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None


def processor_kind(path: Path, model_type: str) -> str:
    """The processing behaviour named by the folder's processor classes (parity-spec §0)."""
    names = []
    for fname, key in (
        ("processor_config.json", "processor_class"),
        ("preprocessor_config.json", "image_processor_type"),
        ("preprocessor_config.json", "processor_class"),
        ("video_preprocessor_config.json", "video_processor_type"),
    ):
        value = read_json(path / fname).get(key)
        if isinstance(value, str):
            names.append(value)
    if any(n.startswith("Qwen2") for n in names):
        return "qwen2_5_vl"
    if any("Glmga" in n for n in names):
        return "glmga"
    if any(n.startswith("Glm46V") for n in names):
        return "glm46v"
    if any(n.startswith("Glm4v") for n in names):
        return "glm4v"
    # No processor files: fall back to the model type's own processor (HF's auto map; glm_ocr has none).
    fallback = {"glm4v": "glm4v", "glm46v": "glm46v", "glmga": "glmga", "glm4v_moe": "glm4v", "qwen2_5_vl": "qwen2_5_vl"}
    if model_type in fallback:
        return fallback[model_type]
    raise CheckpointError(f"{path}: cannot tell the processor kind from its processor configs ({names})")


def load_config(path: str | Path) -> ModelConfig:
    """Read config.json (through transformers), generation_config.json and the processor class names."""
    import transformers

    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"model path {path} is not a directory (expected an HF checkpoint folder)")
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path} has no config.json; is it an HF checkpoint folder?")
    raw = read_json(path / "config.json")
    model_type = raw.get("model_type")
    if model_type not in MODEL_FAMILIES:
        raise CheckpointError(
            f"{path}: model_type {model_type!r} is not supported; glimpse serves {', '.join(sorted(MODEL_FAMILIES))}"
        )
    try:
        hf_config = transformers.AutoConfig.from_pretrained(path)
    except Exception as e:  # transformers raises many types for a bad config
        raise CheckpointError(f"{path}/config.json could not be read by transformers: {e}") from None
    gen = read_json(path / "generation_config.json")
    eos = gen.get("eos_token_id", getattr(hf_config.get_text_config(), "eos_token_id", None))
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
    return ModelConfig(
        path=path,
        hf_config=hf_config,
        model_type=model_type,
        family=MODEL_FAMILIES[model_type],
        processor_kind=processor_kind(path, model_type),
        eos_token_ids=eos_ids,
        generation_defaults={k: gen[k] for k in ("temperature", "top_p", "top_k", "repetition_penalty") if k in gen},
    )
