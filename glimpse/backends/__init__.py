"""Attention backends, linear methods and graph capture, chosen once at start-up.

`select_backends(platform, dtype, head_dim, vision_head_dim) -> Backends` decides from the
`Platform` (glimpse/platform.py), the model dtype and its head dims, and logs the choice;
`bind_backends(model, backends)` hands it to every `Linear` and vision attention module of a model
(the loader does both). The paged KV cache and the vision encoder runner take theirs from
`model.backends`. A module never bound (a model built by hand, as tests do) asks `backends_for` on
each call, which selects once per (platform, dtype, head dim) and caches.

Adding a backend (a CUDA attention, a quantized linear method) is one file here with a class
implementing base.py's protocol, and one branch in `select_backends`.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch
from torch import nn

from glimpse.backends.base import AttentionBackend, GraphCapture, LinearMethod
from glimpse.backends.compiled_graphs import CompiledGraphs
from glimpse.backends.cuda import CudaAttention, CudaGraphs
from glimpse.backends.native_cpu import NativeCpuAttention, NativeOneRowLinear
from glimpse.backends.onednn_packed import PackedOneDnnLinear
from glimpse.backends.torch_linear import TorchLinear
from glimpse.backends.torch_sdpa import TorchAttention
from glimpse.kernels import NATIVE_HEAD_DIMS
from glimpse.platform import Platform, detect

logger = logging.getLogger(__name__)

__all__ = ["AttentionBackend", "Backends", "GraphCapture", "LinearMethod", "backends_for", "bind_backends",
           "linear_weight_bytes", "select_backends"]  # fmt: skip


@dataclass(frozen=True)
class Backends:
    attention: AttentionBackend  # the decoder's, over the paged KV cache
    vision_attention: AttentionBackend  # the vision tower's, over segments
    linear: LinearMethod  # the language model's and lm_head's linear layers (decode steps: a few rows per call)
    graphs: GraphCapture  # the vision encoder's per-budget graphs
    tower_linear: LinearMethod | None = None  # the vision tower's linear layers (None: `linear`)

    def __post_init__(self) -> None:
        if self.tower_linear is None:
            object.__setattr__(self, "tower_linear", self.linear)

    def describe(self) -> str:
        tower = "" if self.tower_linear is self.linear else f", vision linear {self.tower_linear.name}"
        return (f"attention {self.attention.name}, vision attention {self.vision_attention.name}, "
                f"linear {self.linear.name}{tower}, encoder graphs {self.graphs.name}")  # fmt: skip


def select_backends(platform: Platform, dtype: torch.dtype, head_dim: int | None,
                    vision_head_dim: int | None = None, linear_weight_bytes: tuple[int, int] = (0, 0)) -> Backends:  # fmt: skip
    """The backends for a `dtype` model with decoder `head_dim` (None: no decoder attention), vision
    `vision_head_dim` (None: the same) and (decoder, vision tower) bytes of linear weights on `platform`.

    Packed bf16 weights (a second copy, `Platform.pack_weights` says how much may be kept) go first to
    the decoder's layers, which decode steps run a few rows at a time, where oneDNN's per-call reorder
    of a plain weight costs most (8-row steps of Qwen2.5-VL-3B's shapes: 254 -> 150 ms); the vision
    tower's layers, which run hundreds of rows per call, get them too when both copies fit."""
    vision_head_dim = head_dim if vision_head_dim is None else vision_head_dim
    if platform.device == "cuda":
        attention = CudaAttention()
        backends = Backends(attention, attention, TorchLinear(), CudaGraphs())
    else:
        native = platform.native_kernels and dtype == torch.bfloat16

        def attention_for(dim: int | None) -> AttentionBackend:
            return NativeCpuAttention() if native and dim in NATIVE_HEAD_DIMS else TorchAttention()

        plain = NativeOneRowLinear() if native else TorchLinear()
        decoder_bytes, tower_bytes = linear_weight_bytes
        linear = tower_linear = plain
        if dtype == torch.bfloat16 and platform.pack_weights(decoder_bytes):
            linear = PackedOneDnnLinear(NativeOneRowLinear() if native else None)
            if platform.pack_weights(decoder_bytes + tower_bytes):
                tower_linear = linear
        backends = Backends(attention_for(head_dim), attention_for(vision_head_dim), linear, CompiledGraphs(),
                            tower_linear)  # fmt: skip
    logger.info("backends for %s on %s: %s", dtype, platform.describe(), backends.describe())
    return backends


def tower_modules(model: nn.Module) -> set[nn.Module]:
    """The modules of `model`'s vision tower (`model.model.visual`; empty for a model without one)."""
    visual = getattr(getattr(model, "model", None), "visual", None)
    return set(visual.modules()) if isinstance(visual, nn.Module) else set()


def linear_weight_bytes(model: nn.Module) -> tuple[int, int]:
    """(decoder, vision tower) bytes of `model`'s `Linear` weights: what a packed copy of each would add."""
    from glimpse.models.layers import Linear

    tower = tower_modules(model)
    sizes = [(m in tower, m.weight.nbytes) for m in model.modules() if isinstance(m, Linear)]
    return sum(n for t, n in sizes if not t), sum(n for t, n in sizes if t)


def bind_backends(model: nn.Module, backends: Backends) -> None:
    """Hand `backends` to every layer of `model` that uses one (the vision tower's linear layers get
    `tower_linear`, the others `linear`, each prepared for its method), and keep them as `model.backends`."""
    from glimpse.models.layers import Linear
    from glimpse.vision.attention import VarlenAttention

    tower = tower_modules(model)
    for module in model.modules():
        if isinstance(module, Linear):
            module.linear_method = backends.tower_linear if module in tower else backends.linear
            module.linear_method.prepare(module)
        elif isinstance(module, VarlenAttention):
            module.backend = backends.vision_attention
    model.backends = backends


def backends_for(t: torch.Tensor, head_dim: int | None = None) -> Backends:
    """The backends for an unbound module's tensors (hand-built models): `select_backends` once per
    (platform, dtype, head dim), cached. The platform is re-read each call: it is cheap once the
    native kernels are built, and a test that switches them off sees the change."""
    return _cached_selection(detect(t.device), t.dtype, head_dim)


@functools.cache
def _cached_selection(platform: Platform, dtype: torch.dtype, head_dim: int | None) -> Backends:
    return select_backends(platform, dtype, head_dim)
