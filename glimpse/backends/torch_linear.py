"""The linear method on torch's `F.linear`: every device and dtype."""

from __future__ import annotations

import torch
import torch.nn.functional as F


class TorchLinear:
    name = "torch"

    def apply(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, weight, bias)
