"""What a backend implements: attention (vision segments, the paged decoder cache), a linear method,
and the vision encoder's graph capture. One class per backend, one file per family of backends
(torch_sdpa.py, native_cpu.py, cuda.py, ...); `glimpse.backends.select_backends` picks them once.

Shapes: q [T, Hq, D]; k, v [T, Hkv, D] (the new tokens); k_cache, v_cache [slots, Hkv, D] (the paged
cache of one layer, flat, the new tokens already written); outputs [T, Hq, D], contiguous.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import torch
from torch import nn

if TYPE_CHECKING:
    from glimpse.engine.kv_cache import AttentionMetadata


class AttentionBackend(Protocol):
    name: str

    def varlen(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
               max_seqlen: int) -> torch.Tensor:  # fmt: skip
        """Bidirectional attention inside each segment of `cu_seqlens` ([S+1] int32 offsets, a padded
        tail repeating the last one); rows past the last offset are zeros. Must stay one node when a
        vision tower is compiled (a custom op, or an op torch.compile already keeps whole)."""

    def paged(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
              v_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:  # fmt: skip
        """Causal attention of one engine step's queries over their sequences' cached K and V."""


class LinearMethod(Protocol):
    name: str

    def prepare(self, layer: nn.Linear) -> None:
        """Once per layer, after its weights are loaded (and fused): keep what `apply` needs on the
        layer (e.g. a weight repacked for the kernel)."""

    def apply(self, layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] @ layer.weight[out, in].T + layer.bias -> [..., out], as `F.linear`."""


class GraphCapture(Protocol):
    name: str
    default_on: bool  # what `--encoder-graph auto` means on this platform

    def prepare(self, fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        """Once per vision tower: wrap its static-shape forward."""

    def capture(
        self, fn: Callable[..., torch.Tensor], inputs: dict[str, torch.Tensor]
    ) -> Callable[..., torch.Tensor]:
        """Once per budget: run `fn` on dummy `inputs` of the budget's shapes; returns what replays it."""

    # A backend whose graphs can also replay a decode step (CUDA graphs: glimpse/backends/cuda.py) has
    #   capture_step(fn: Callable[[], Tensor], device: torch.device) -> Callable[[], Tensor]
    # which runs `fn` (a decode step on static buffers on `device`) and returns what replays it.
