"""Shared fixtures: tiny checkpoints made once per session, and the real test media."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from glimpse.testing import make_checkpoint

MEDIA = Path(__file__).resolve().parents[2] / "shared" / "media"
IMAGES = MEDIA / "images"
VIDEOS = MEDIA / "videos"


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """tiny_checkpoint(family) -> path of a tiny float32 checkpoint, made once per session."""
    made: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in made:
            made[family] = make_checkpoint(family, "tiny", tmp_path_factory.mktemp(family), seed=0)
        return made[family]

    return get


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def checkpoint_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor stored in a checkpoint folder's safetensors files, by checkpoint name."""
    from safetensors import safe_open

    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def meta_model(path: Path):
    """The folder's glimpse model built on the meta device (no weights), as the loader builds it."""
    from glimpse.config import load_config
    from glimpse.loader import model_class

    cfg = load_config(path)
    with torch.device("meta"):
        return model_class(cfg)(cfg.hf_config)
