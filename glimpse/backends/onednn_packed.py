"""bf16 linear layers on oneDNN with weights repacked once at load, for CPUs with bf16 matmuls.

`F.linear` hands oneDNN the plain [out, in] weight, and oneDNN reorders it into its blocked layout
on every call: a full pass over the weight before the matmul. Repacking once (`prepare`, at bind
time) and calling oneDNN's linear on the packed copy skips that pass. Measured on this project's
2-core CPU (AMX-BF16, `glimpse bench kernels`): 1.3-2x faster for 1-64 rows and ~1.3x for a few
hundred, the same values as `F.linear` bit for bit (same kernel, asserted in
tests/test_platform_seam.py). One row still goes to the native GEMV where it runs (it streams the
plain weight faster than oneDNN's packed one-row path), so a layer keeps both copies: the packed one
costs as much memory as the layer's weight. Packed copies may take at most a quarter of the RAM
(`Platform.pack_weights`; `GLIMPSE_PACKED_WEIGHTS=1` forces it, `=0` turns it off): the decoder's
layers get them first (decode steps run them a few rows at a time: Qwen2.5-VL-3B's 8-row steps 254 ->
150 ms on a 2-core AMD EPYC), the vision tower's (hundreds of rows per call) only when both fit
(`select_backends`).
Autograd, torch.compile tracing (except the decode graph's: glimpse/engine/decode_graph.py), other dtypes
and weights that were not packed go to `F.linear`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from glimpse import kernels
from glimpse.backends.native_cpu import NativeOneRowLinear, _records_autograd

# The batch size oneDNN tunes the packed layout for. From 16 up, the packed weight gives results equal
# to F.linear's at every row count tried (2-2048); 512 was the fastest of 1/16/64/512 here.
PACK_BATCH_HINT = 512


class PackedOneDnnLinear:
    name = "onednn-packed-bf16"

    def __init__(self, one_row: NativeOneRowLinear | None = None) -> None:
        self.one_row = one_row  # the native GEMV for single rows, where the kernels run
        if one_row is not None:
            self.name += "+native-one-row"

    def prepare(self, layer: nn.Linear) -> None:
        weight = layer.weight
        if weight.dtype == torch.bfloat16 and weight.dim() == 2 and weight.device.type == "cpu":
            packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), PACK_BATCH_HINT)
            layer.register_buffer("packed_weight", packed, persistent=False)

    def apply(self, layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        if self.one_row is not None and self.one_row.serves(layer, x):
            return self.one_row.apply(layer, x)
        bias = layer.bias
        usable = (x.dtype == torch.bfloat16 and (bias is None or bias.dtype == torch.bfloat16)
                  and not _records_autograd(x, layer.weight, bias))  # fmt: skip
        if torch.compiler.is_compiling():  # the decode graph reaches the packed weight by handle; other graphs: F.linear
            ops, handle = kernels.GRAPH_OPS.ops, getattr(layer, "packed_handle", None)
            if usable and ops is not None and handle is not None:
                return ops.packed_linear(x.contiguous(), handle, layer.out_features, bias)
        elif usable and (packed := getattr(layer, "packed_weight", None)) is not None:
            return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, bias, "none", [], "")
        return F.linear(x, layer.weight, bias)


def keep_packed_handles(model: nn.Module) -> list[int]:
    """Hand every packed weight of `model` to the native library (`keep_packed`) and note its handle on the
    layer (`layer.packed_handle`), for the decode graph's packed_linear operator; returns the handles, which
    `release_packed_handles` lets go of. A packed (mkldnn) tensor among a compiled graph's inputs keeps the
    graph out of inductor's cache; an int handle is a constant of the graph."""
    native = kernels.cpu_kernels()
    handles = []
    for module in model.modules():
        packed = getattr(module, "packed_weight", None)
        if isinstance(module, nn.Linear) and packed is not None:
            module.packed_handle = native.keep_packed(packed)
            handles.append(module.packed_handle)
    return handles


def release_packed_handles(handles: list[int]) -> None:
    native = kernels.cpu_kernels()
    if native is not None:
        for handle in handles:
            native.release_packed(handle)
