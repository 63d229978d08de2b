"""Step 7-8 building blocks shared by every family: linear layers, norms, rotary helpers, attention.

Shapes are token-major and unbatched: a decoder sees `[T, H]` hidden states for the
tokens of one step, attention sees `q [T, Hq, D]`, `k, v [T, Hkv, D]`. How K and V are
stored is the job of a `KVCache` (plain contiguous here, paged in the engine).
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from glimpse.kernels import native_linear


class Linear(nn.Linear):
    """nn.Linear (same parameters and weight names) whose one-row bf16 CPU calls, the matmuls of
    batch-1 decode, run on the native kernel (glimpse/kernels.py): 1.04-1.6x the weight bandwidth
    of torch's and oneDNN's one-row kernels here (`glimpse bench kernels`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (native := native_linear(x, self.weight, self.bias)) is not None:
            return native.linear_one_row_bf16(x.contiguous(), self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    """HF's RMSNorm: normalise in fp32, cast back, then multiply by the weight in the input dtype."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """NeoX pairing: (x1, x2) -> (-x2, x1) over the two halves of the last dim."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotate_interleaved(x: torch.Tensor) -> torch.Tensor:
    """GPT-J pairing: (x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...)."""
    x1 = x[..., 0::2]
    x2 = x[..., 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


class KVCache(Protocol):
    """Where a decoder layer's attention gets its keys and values.

    `attend(layer_idx, q, k, v)` stores the new tokens' k, v ([T, Hkv, D]) and returns the
    causal attention output [T, Hq, D] of the new queries over everything stored so far.
    """

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor: ...


class ContiguousKVCache:
    """A plain per-layer KV cache for one sequence (used by `compute_logits` and `greedy`).

    Tensors grow by concatenation: fine for tests and single-sequence use; the engine's
    paged cache replaces it for serving.
    """

    def __init__(self, num_layers: int) -> None:
        self.k: list[torch.Tensor | None] = [None] * num_layers
        self.v: list[torch.Tensor | None] = [None] * num_layers

    @property
    def seq_len(self) -> int:
        k0 = self.k[0]
        return 0 if k0 is None else k0.shape[0]

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        past_k, past_v = self.k[layer_idx], self.v[layer_idx]
        if past_k is not None:
            k = torch.cat([past_k, k], dim=0)
            v = torch.cat([past_v, v], dim=0)
        self.k[layer_idx], self.v[layer_idx] = k, v
        return causal_attention(q, k, v)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention of the last `T = q.shape[0]` positions over `S = k.shape[0]` keys (GQA aware).

    q: [T, Hq, D]; k, v: [S, Hkv, D] with S >= T; query i sits at absolute position S - T + i.
    """
    t, s = q.shape[0], k.shape[0]
    groups = q.shape[1] // k.shape[1]
    qh = q.transpose(0, 1)
    kh = k.transpose(0, 1).repeat_interleave(groups, dim=0)
    vh = v.transpose(0, 1).repeat_interleave(groups, dim=0)
    if t == 1:
        out = F.scaled_dot_product_attention(qh, kh, vh)
    else:
        mask = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(diagonal=s - t)
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask)
    return out.transpose(0, 1)
