"""The linear method on torch's `F.linear`: every device and dtype."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TorchLinear:
    name = "torch"

    def prepare(self, layer: nn.Linear) -> None:
        pass

    def apply(self, layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, layer.weight, layer.bias)
