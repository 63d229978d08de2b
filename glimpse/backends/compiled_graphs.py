"""CPU graph capture for the vision encoder: torch.compile(dynamic=False), one graph per budget
(inductor's on-disk cache makes a restart fast). Measured faster than eager on CPU, so on by default.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# Library kernels a compiled CPU graph calls exactly as eager does (it can only shrink the rest);
# `glimpse bench mm-encoder` measures the share of time inside them.
EXTERN_KERNELS = (
    "aten::mm", "aten::addmm", "aten::bmm", "aten::mkldnn_convolution", "mkldnn::_linear_pointwise",
    "aten::_scaled_dot_product_flash_attention_for_cpu",
)  # fmt: skip


class CompiledGraphs:
    name = "torch.compile"
    default_on = True

    def prepare(self, fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        return torch.compile(fn, dynamic=False, fullgraph=True)

    def capture(
        self, fn: Callable[..., torch.Tensor], inputs: dict[str, torch.Tensor]
    ) -> Callable[..., torch.Tensor]:
        fn(**inputs)  # compiles this budget's shapes
        return fn
