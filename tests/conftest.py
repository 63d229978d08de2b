"""Shared fixtures: tiny checkpoints made once per session, and the real test media."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from glimpse import kernels
from glimpse.testing import make_checkpoint


@pytest.fixture(scope="session")
def native_kernels():
    """The compiled native CPU kernels: required to build wherever the CPU runs them."""
    if os.environ.get("GLIMPSE_NATIVE_KERNELS", "1") == "0":
        pytest.skip("GLIMPSE_NATIVE_KERNELS=0: the native kernels are switched off for this run")
    if missing := kernels.REQUIRED_CPU_FLAGS - kernels._cpu_flags():
        pytest.skip(f"this CPU lacks {sorted(missing)}: the kernels never run here")
    module = kernels.cpu_kernels()
    assert module is not None, "the CPU supports the native kernels, so they must build (see the logged error)"
    return module


class KernelSpy:
    """Stands in for the native module and counts the calls of each kernel."""

    def __init__(self, module) -> None:
        self.module, self.calls = module, {}

    def __getattr__(self, name):
        fn = getattr(self.module, name)

        def counted(*args, **kwargs):
            self.calls[name] = self.calls.get(name, 0) + 1
            return fn(*args, **kwargs)

        return counted


@pytest.fixture
def kernel_spy(native_kernels, monkeypatch) -> KernelSpy:
    spy = KernelSpy(native_kernels)
    monkeypatch.setattr(kernels, "cpu_kernels", lambda: spy)
    return spy

# The photographs and clips the tests read ship inside the repository (see data/media/README.md).
MEDIA = Path(__file__).resolve().parent / "data" / "media"
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
