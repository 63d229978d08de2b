"""Step 7-8 building blocks shared by every family: linear layers, norms, rotary helpers, attention.

Shapes are token-major and unbatched: a decoder sees `[T, H]` hidden states for the
tokens of one step, attention sees `q [T, Hq, D]`, `k, v [T, Hkv, D]`. How K and V are
stored is the job of a `KVCache` (plain contiguous here, paged in the engine).
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from glimpse import kernels
from glimpse.backends import LinearMethod, backends_for
from glimpse.distributed import SINGLE, TensorParallel


class Linear(nn.Linear):
    """nn.Linear (same parameters and weight names) whose matmul is the bound linear method's
    (glimpse/backends: e.g. the native one-row bf16 GEMV for batch-1 decode on CPU)."""

    linear_method: LinearMethod | None = None  # set by glimpse.backends.bind_backends; None: chosen per call

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        method = self.linear_method or backends_for(x).linear
        return method.apply(self, x)


class RMSNorm(nn.Module):
    """HF's RMSNorm: normalise in fp32, cast back, then multiply by the weight in the input dtype."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (native := _native_norm(x, self.weight)) is not None:  # bf16 on CPU: one call instead of eight ops
            return native.rms_norm_bf16(x.contiguous(), None, self.weight, self.variance_epsilon)[1]
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(dtype)

    def add(self, x: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual add and the norm after it: (x + delta, self(x + delta)), in one native call where
        `forward` makes one (the sum rounds as torch's bf16 add does, the norm as `forward`)."""
        if (native := _native_norm(x, self.weight)) is not None and delta.dtype == x.dtype:
            eps = self.variance_epsilon
            h, y = native.rms_norm_bf16(x.contiguous(), delta.contiguous(), self.weight, eps)
            return h, y
        x = x + delta
        return x, self(x)


def keep_rows(x: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """x's rows `rows` (all of x when None): where a decoder's last layer drops the rows no one reads."""
    return x if rows is None else x.index_select(0, rows)


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


def _native_norm(x: torch.Tensor, weight: torch.Tensor) -> ModuleType | None:
    """The native module when it serves RMSNorm of x: bf16 rows on CPU (torch's ops otherwise: other
    dtypes and devices, autograd, torch.compile tracing)."""
    return _native_for(x, weight) if x.dim() else None


def _native_for(*tensors: torch.Tensor) -> ModuleType | None:
    """The native kernels when they serve these tensors: all bf16 on CPU, outside autograd and
    torch.compile tracing (None: use torch's ops)."""
    for t in tensors:  # a loop, not any(genexpr): this runs several times per layer per step
        if t.dtype is not torch.bfloat16 or not t.is_cpu:
            return None
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return None
    if torch.compiler.is_compiling():  # the decode graph keeps the kernels as nodes; other graphs trace torch's ops
        return kernels.GRAPH_OPS.ops
    return kernels.cpu_kernels()  # looked up per call: tests switch the kernels off by patching it


def native_matmul_ok(x: torch.Tensor) -> bool:
    """Whether a convolution whose kernel is its stride may run as a matmul for x: where the native
    kernels serve x (bf16 on CPU). The matmul sums the same products in another order; the native
    path is bounded against float32 truth, torch's path compared with HF cast for cast."""
    return _native_for(x) is not None


def swiglu(gate_up: torch.Tensor, act: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """act(gate) * up for `gate_up` laid out (gate, up) on its last dim, rounded as HF rounds it
    (act to the dtype, then the product); SiLU in bf16 on CPU is one native pass (bit-equal)."""
    if act is F.silu and (native := _native_for(gate_up)) is not None:
        return native.silu_mul_bf16(gate_up.contiguous())
    gate, up = gate_up.chunk(2, dim=-1)
    return act(gate) * up


class SwiGluMLP(nn.Module):
    """down(act(gate(x)) * up(x)) under HF's names. `fuse_projections` (called by the loader) makes
    gate and up one matmul, whose output `swiglu` turns into the product in one pass."""

    def __init__(self, dim: int, hidden: int, act: Callable[[torch.Tensor], torch.Tensor], bias: bool = False,
                 tp: TensorParallel = SINGLE, reduce: bool = True) -> None:  # fmt: skip
        """With `tp` of several ranks each holds a share of the `hidden` rows (glimpse/distributed/layers.py);
        `reduce=False` leaves the down projection's sum over ranks to the caller."""
        from glimpse.distributed.layers import column_linear, row_linear  # they build on this module's Linear

        super().__init__()
        self.gate_proj = column_linear(dim, hidden, bias, tp)
        self.up_proj = column_linear(dim, hidden, bias, tp)
        self.down_proj = row_linear(hidden, dim, bias, tp, reduce=reduce)
        self.act = act
        self.gate_up_proj: Linear | None = None  # gate_proj + up_proj, set by fuse_projections()

    def fuse_projections(self) -> None:
        self.gate_up_proj = fuse_linears(self.gate_proj, self.up_proj)
        del self.gate_proj, self.up_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is None:
            return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(swiglu(self.gate_up_proj(x), self.act))


def rotate_text_qk(qkv: torch.Tensor, heads: int, cos: torch.Tensor, sin: torch.Tensor, neox: bool) -> torch.Tensor:
    """The text towers' rotary of q and k: the first `heads` heads of qkv [T, all heads, D] with their
    first rd = cos.shape[-1] dims rotated (NeoX halves or GPT-J pairs) and the rest passed, computed as
    HF does in the activation dtype (cos, sin [T, rd] in it too). bf16 on CPU: one native pass, in
    place in qkv (bit-equal to torch's three ops); otherwise a new tensor."""
    if (native := _native_for(qkv, cos, sin)) is not None and qkv.is_contiguous():
        native.text_rotary_bf16_(qkv, heads, cos.contiguous(), sin.contiguous(), neox)
        return qkv[:, :heads]
    x, rd = qkv[:, :heads], cos.shape[-1]
    rot = x[..., :rd]
    rot = rot * cos[:, None] + (rotate_half(rot) if neox else rotate_interleaved(rot)) * sin[:, None]
    return rot if rd == x.shape[-1] else torch.cat([rot, x[..., rd:]], dim=-1)


def rotate_vision_qk(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The vision towers' rotary of q and k from qkv [N, 3, heads, D]: NeoX halves over the whole
    head, in float32 as HF computes it (cos, sin [N, D] float32), cast back to qkv's dtype. bf16 on
    CPU: one native pass with the same roundings (bit-equal)."""
    if cos.dtype == torch.float32 and sin.dtype == torch.float32 and (native := _native_for(qkv)) is not None:
        q, k = native.vision_rotary_bf16(qkv.contiguous(), cos.contiguous(), sin.contiguous())
        return q, k
    cos, sin = cos[:, None], sin[:, None]
    q, k = qkv[:, 0].float(), qkv[:, 1].float()
    return (q * cos + rotate_half(q) * sin).to(qkv.dtype), (k * cos + rotate_half(k) * sin).to(qkv.dtype)


def fuse_linears(*parts: nn.Linear) -> Linear:
    """One Linear whose output is the parts' outputs side by side ([..., sum of out_features]).

    For sibling projections of one input (q/k/v, gate/up): one matmul streams all their weights,
    where a decode step otherwise pays a call and a thread fork-join per part. Each output value
    is the same dot product; a GEMM may block the wider matrix differently (bf16 sums can then
    round differently, float32 ones agree to rounding).
    """
    assert len({p.in_features for p in parts}) == 1 and len({p.bias is None for p in parts}) == 1
    out_features = sum(p.out_features for p in parts)
    with torch.device("meta"):
        fused = Linear(parts[0].in_features, out_features, bias=parts[0].bias is not None)
    grad = parts[0].weight.requires_grad
    fused.weight = nn.Parameter(torch.cat([p.weight.detach() for p in parts]), requires_grad=grad)
    if fused.bias is not None:
        fused.bias = nn.Parameter(torch.cat([p.bias.detach() for p in parts]), requires_grad=grad)
    return fused
