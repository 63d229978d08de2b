"""Qwen2.5-VL family (steps 6-9: vision encoder -> M-RoPE positions -> Qwen2 decoder -> logits).

Vision: `pixel_values [N, C*Tp*P*P]` + `grid_thw [items, 3]` -> `[sum(t*h*w/m^2), out_hidden]`
in raster merge order, through a windowed ViT whose rows run in window order between the
patch embed and the merger. Decoder: `[T, hidden]` embeddings + `[3, T]` positions -> `[T, hidden]`.
Parameter names equal HF 5.23's state-dict names (`model.visual.*`, `model.language_model.*`, `lm_head`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from glimpse import distributed
from glimpse.distributed.layers import attention_projections, embedding, lm_head, packed_qkv_projections
from glimpse.errors import CheckpointError, InvalidInputError
from glimpse.models.base import MultimodalInputs, VisionLanguageModel
from glimpse.models.layers import (
    KVCache,
    Linear,
    RMSNorm,
    SwiGluMLP,
    fuse_linears,
    keep_rows,
    rotate_text_qk,
    rotate_vision_qk,
)
from glimpse.models.mrope import qwen_mm_token_types, qwen_mrope_positions
from glimpse.vision.attention import VarlenAttention, pad_offsets
from glimpse.vision.tables import per_frame_size

VIDEO_POSITION_RULES = ("reference", "hf")

# HF hard-codes the vision norms' eps; the vision config carries none.
_VISION_NORM_EPS = 1e-6

_ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


def _activation(name: str, where: str):
    if name not in _ACTIVATIONS:
        raise CheckpointError(f"{where}.hidden_act={name!r} is not supported; known: {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


# ---- vision metadata: pure functions of the grid (cacheable by grid) ---------------------


@dataclass(frozen=True)
class VisionPlan:
    """Everything the vision tower derives from `grid_thw` alone.

    The tower runs its rows in *window order*: merged units grouped by attention window,
    windows row-major per frame, units row-major inside a window, the m*m patches of a unit
    kept together. All tensors below index that order.
    """

    window_index: torch.Tensor  # [N/m^2] long: raster merged unit sitting at window slot i
    reverse_index: torch.Tensor  # [N/m^2] long: argsort(window_index), back to raster order
    cu_window_seqlens: torch.Tensor  # [windows+1] int32 patch offsets of the attention windows
    cu_seqlens: torch.Tensor  # [frames+1] int32 patch offsets of whole frames (full-attention blocks)
    pos_hw: torch.Tensor  # [N, 2] long (row, col) patch coordinate of each row


@dataclass(frozen=True)
class FrameWindows:
    """The window order of one frame size, in that frame's own unit numbering."""

    order: torch.Tensor  # [units] long: raster unit at window slot i
    inverse: torch.Tensor  # [units] long: argsort(order)
    window_lens: torch.Tensor  # [windows] long: patches per non-empty window
    pos_hw: torch.Tensor  # [h*w, 2] long (row, col) of each patch, in window order


def frame_window_plan(h: int, w: int, spatial_merge_size: int, window_units: int) -> FrameWindows:
    """Window order of one (1, h, w) frame; the same for every frame of that size.

    `window_units` is the window side in merged units (`window_size // m // patch_size`).
    Partial windows at the bottom/right edge are kept (shorter segments); HF's padding also
    emits empty windows when a side divides evenly, which drop out of its cu_seqlens, so
    ceil-division here gives the same segments.
    """
    m = spatial_merge_size
    mh, mw = h // m, w // m
    ys = torch.arange(mh).repeat_interleave(mw)
    xs = torch.arange(mw).repeat(mh)
    windows_per_row = -(-mw // window_units)
    window_id = (ys // window_units) * windows_per_row + xs // window_units
    # Stable sort keeps raster order inside a window, which is row-major within it.
    order = torch.argsort(window_id, stable=True)
    py = (ys[order][:, None] * m + torch.arange(m).repeat_interleave(m)).flatten()
    px = (xs[order][:, None] * m + torch.arange(m).repeat(m)).flatten()
    return FrameWindows(
        order=order,
        inverse=torch.argsort(order),
        window_lens=torch.bincount(window_id) * (m * m),
        pos_hw=torch.stack([py, px], dim=-1),
    )


def vision_plan(grid_thw: tuple[tuple[int, int, int], ...], spatial_merge_size: int, window_units: int) -> VisionPlan:
    """Window permutation, attention segments and patch coordinates for a batch of grids."""
    frames = {(h, w): frame_window_plan(h, w, spatial_merge_size, window_units) for _, h, w in grid_thw}
    return _assemble_plan(grid_thw, frames, spatial_merge_size)


def _assemble_plan(
    grid_thw: Sequence[tuple[int, int, int]], frames: Mapping[tuple[int, int], FrameWindows], spatial_merge_size: int
) -> VisionPlan:
    """Concatenate per-frame window plans over the frames of the items, offsetting the unit indices."""
    unit = spatial_merge_size**2
    index_parts, reverse_parts, window_lens, frame_lens, pos_parts = [], [], [], [], []
    offset = 0
    for t, h, w in grid_thw:
        plan, frame_units = frames[(h, w)], h * w // unit
        starts = torch.arange(t)[:, None] * frame_units + offset
        index_parts.append((starts + plan.order).flatten())
        reverse_parts.append((starts + plan.inverse).flatten())
        window_lens.append(plan.window_lens.repeat(t))
        frame_lens.append(torch.full((t,), h * w))
        pos_parts.append(plan.pos_hw.repeat(t, 1))
        offset += t * frame_units
    zero = torch.zeros(1, dtype=torch.long)
    return VisionPlan(
        window_index=torch.cat(index_parts),
        reverse_index=torch.cat(reverse_parts),
        cu_window_seqlens=torch.cat([zero, torch.cat(window_lens).cumsum(0)]).to(torch.int32),
        cu_seqlens=torch.cat([zero, torch.cat(frame_lens).cumsum(0)]).to(torch.int32),
        pos_hw=torch.cat(pos_parts),
    )


def window_capacity(units: int, frames: int, window_units: int) -> int:
    """Most attention windows `frames` frames of `units` merged units in all can have.

    A frame of H x W units has ceil(H/ws)*ceil(W/ws) <= H*W/ws + 1 windows, and never more
    windows than units, so min(units, frames + ceil(units / ws)) bounds every layout.
    """
    return min(units, frames + -(-units // window_units))


def vision_rotary(pos_hw: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """2-D rotary tables in fp32: [N, 2] (row, col) -> cos, sin [N, head_dim].

    head_dim/4 frequencies; the angle vector is [row*f, col*f, row*f, col*f] so that the
    rotate-half pairing (j, j + D/2) rotates each axis by its own coordinate.
    """
    spatial = head_dim // 2
    inv_freq = 1.0 / (theta ** (torch.arange(0, spatial, 2, dtype=torch.float) / spatial))
    freqs = (pos_hw[..., None].float() * inv_freq.to(pos_hw.device)).flatten(1)  # [N, D/2]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


# ---- vision tower ------------------------------------------------------------------------


class Qwen2_5_VisionPatchEmbed(nn.Module):
    """[N, C*Tp*P*P] -> [N, hidden]: a Conv3d whose kernel equals its stride, run as one matmul."""

    def __init__(self, in_channels: int, temporal_patch_size: int, patch_size: int, embed_dim: int) -> None:
        super().__init__()
        kernel = (temporal_patch_size, patch_size, patch_size)
        self.proj = nn.Conv3d(in_channels, embed_dim, kernel_size=kernel, stride=kernel, bias=False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        weight = self.proj.weight
        return F.linear(pixel_values.to(weight.dtype), weight.view(weight.shape[0], -1))


class Qwen2_5_VisionAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads, self.qkv, self.proj = packed_qkv_projections(dim, num_heads, True, True,
                                                                     distributed.current().vision)  # fmt: skip
        self.varlen = VarlenAttention()  # its backend is bound by the loader (glimpse/backends)

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        qkv = self.qkv(x).view(n, 3, self.num_heads, -1)
        (q, k), v = rotate_vision_qk(qkv, cos, sin), qkv[:, 2]  # in fp32 as HF, whatever the activation dtype
        return self.proj(self.varlen(q, k, v, cu_seqlens, n).reshape(n, -1))


class Qwen2_5_VisionMLP(SwiGluMLP):
    def __init__(self, dim: int, hidden: int, act: str) -> None:
        super().__init__(dim, hidden, _activation(act, "vision_config"), bias=True, tp=distributed.current().vision)


class Qwen2_5_VisionBlock(nn.Module):
    def __init__(self, vc) -> None:
        super().__init__()
        self.norm1 = RMSNorm(vc.hidden_size, eps=_VISION_NORM_EPS)
        self.norm2 = RMSNorm(vc.hidden_size, eps=_VISION_NORM_EPS)
        self.attn = Qwen2_5_VisionAttention(vc.hidden_size, vc.num_heads)
        self.mlp = Qwen2_5_VisionMLP(vc.hidden_size, vc.intermediate_size, vc.hidden_act)

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cu_seqlens, cos, sin)
        return x + self.mlp(self.norm2(x))


class Qwen2_5_VisionMerger(nn.Module):
    """[N, C] in window order -> [N/m^2, out_hidden]: norm, group each unit's m*m rows, 2-layer GELU MLP."""

    def __init__(self, context_dim: int, out_dim: int, spatial_merge_size: int) -> None:
        super().__init__()
        self.hidden_size = context_dim * spatial_merge_size**2
        self.ln_q = RMSNorm(context_dim, eps=_VISION_NORM_EPS)
        # nn.Sequential keeps HF's parameter names `mlp.0` / `mlp.2`.
        self.mlp = nn.Sequential(
            Linear(self.hidden_size, self.hidden_size), nn.GELU(), Linear(self.hidden_size, out_dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.ln_q(x).view(-1, self.hidden_size))


class Qwen2_5_VisionTower(nn.Module):
    """`model.visual`: windowed ViT. [N, C*Tp*P*P], grid_thw [items, 3] -> [N/m^2, out_hidden]."""

    def __init__(self, vc) -> None:
        super().__init__()
        self.in_channels = vc.in_channels
        self.patch_size = vc.patch_size
        self.temporal_patch_size = vc.temporal_patch_size
        self.spatial_merge_size = vc.spatial_merge_size
        self.window_units = vc.window_size // vc.spatial_merge_size // vc.patch_size
        self.fullatt_block_indexes = frozenset(vc.fullatt_block_indexes)
        self.head_dim = vc.hidden_size // vc.num_heads
        self.rope_theta = vc.rope_parameters["rope_theta"]
        if self.window_units < 1:
            raise CheckpointError(
                f"vision_config.window_size={vc.window_size} is smaller than one merged unit "
                f"(spatial_merge_size*patch_size = {vc.spatial_merge_size * vc.patch_size})"
            )
        self.patch_embed = Qwen2_5_VisionPatchEmbed(vc.in_channels, vc.temporal_patch_size, vc.patch_size, vc.hidden_size)
        self.blocks = nn.ModuleList(Qwen2_5_VisionBlock(vc) for _ in range(vc.depth))
        self.merger = Qwen2_5_VisionMerger(vc.hidden_size, vc.out_hidden_size, vc.spatial_merge_size)

    def check_inputs(
        self, pixel_values: torch.Tensor, grid_thw: torch.Tensor, kind: str
    ) -> tuple[tuple[int, int, int], ...]:
        """Validate the processor output; returns the grids as a hashable tuple of (t, h, w)."""
        row = self.in_channels * self.temporal_patch_size * self.patch_size**2
        if grid_thw.dim() != 2 or grid_thw.shape[1] != 3:
            raise InvalidInputError(f"{kind}_grid_thw must have shape [num_{kind}s, 3], got {tuple(grid_thw.shape)}")
        if pixel_values.dim() != 2 or pixel_values.shape[1] != row:
            raise InvalidInputError(
                f"{kind} pixel_values must have shape [N_patches, {row}] (C*Tp*P*P), got {tuple(pixel_values.shape)}"
            )
        grids = tuple(tuple(int(v) for v in g) for g in grid_thw.tolist())
        m = self.spatial_merge_size
        for i, (t, h, w) in enumerate(grids):
            if t < 1 or h < m or w < m or h % m or w % m:
                raise InvalidInputError(
                    f"{kind} {i}: grid_thw {(t, h, w)} is invalid; t must be >= 1 and h, w positive "
                    f"multiples of spatial_merge_size={m}"
                )
        n = sum(t * h * w for t, h, w in grids)
        if n != pixel_values.shape[0]:
            raise InvalidInputError(
                f"{kind} pixel_values has {pixel_values.shape[0]} patch rows but {kind}_grid_thw "
                f"describes {n} (sum of t*h*w)"
            )
        return grids

    # The tower runs in two parts: per-batch metadata from the grids alone (built from
    # per-frame-size tables, made once per size: glimpse/vision/tables.py), then `forward_static`,
    # whose shapes depend only on the row count, so one compiled graph serves every batch padded to a budget.

    @per_frame_size("patch_embed.proj.weight")
    def frame_tables(self, h: int, w: int) -> dict[str, object]:
        """Tables of one (1, h, w) frame: its window plan and fp32 cos/sin [h*w, D] in window order."""
        plan = frame_window_plan(h, w, self.spatial_merge_size, self.window_units)
        cos, sin = vision_rotary(plan.pos_hw, self.head_dim, self.rope_theta)
        dev = self.patch_embed.proj.weight.device
        return {"windows": plan, "cos": cos.to(dev), "sin": sin.to(dev)}

    def batch_metadata(
        self,
        grids: Sequence[tuple[int, int, int]],
        tables: Mapping[tuple[int, int], dict[str, object]],
        capacity_patches: int | None = None,
        capacity_frames: int | None = None,
    ) -> dict[str, torch.Tensor]:
        """`forward_static`'s keyword inputs for items laid out back to back in `grids` order.

        With capacities (both or neither), cos/sin get zero rows up to `capacity_patches`, the
        padded units map to themselves in window_index/reverse_index, and both offset lists
        repeat their last offset (frames up to `capacity_frames`, windows up to `window_capacity`).
        """
        unit = self.spatial_merge_size**2
        plan = _assemble_plan(grids, {key: tab["windows"] for key, tab in tables.items()}, self.spatial_merge_size)
        cos = [tables[(h, w)]["cos"].repeat(t, 1) for t, h, w in grids]
        sin = [tables[(h, w)]["sin"].repeat(t, 1) for t, h, w in grids]
        window_index, reverse_index = plan.window_index, plan.reverse_index
        cu_seqlens, cu_window = plan.cu_seqlens, plan.cu_window_seqlens
        if capacity_patches is not None and capacity_frames is not None:
            n = int(cu_seqlens[-1])
            cos.append(cos[0].new_zeros(capacity_patches - n, cos[0].shape[1]))
            sin.append(sin[0].new_zeros(capacity_patches - n, sin[0].shape[1]))
            tail = torch.arange(n // unit, capacity_patches // unit)
            window_index = torch.cat([window_index, tail])
            reverse_index = torch.cat([reverse_index, tail])
            cu_seqlens = pad_offsets(cu_seqlens, capacity_frames + 1)
            windows = window_capacity(capacity_patches // unit, capacity_frames, self.window_units)
            cu_window = pad_offsets(cu_window, windows + 1)
        dev = cos[0].device
        return {
            "cos": torch.cat(cos),
            "sin": torch.cat(sin),
            "window_index": window_index.to(dev),
            "reverse_index": reverse_index.to(dev),
            "cu_seqlens": cu_seqlens.to(dev),
            "cu_window_seqlens": cu_window.to(dev),
        }

    def forward_static(
        self,
        pixel_values: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        window_index: torch.Tensor,
        reverse_index: torch.Tensor,
        cu_seqlens: torch.Tensor,
        cu_window_seqlens: torch.Tensor,
    ) -> torch.Tensor:
        """[N, C*Tp*P*P] plus `batch_metadata` -> [N / m^2, out_hidden] in raster merge order."""
        unit = self.spatial_merge_size**2
        x = self.patch_embed(pixel_values)
        n = x.shape[0]
        x = x.view(n // unit, unit, -1)[window_index].view(n, -1)
        for i, block in enumerate(self.blocks):
            cu = cu_seqlens if i in self.fullatt_block_indexes else cu_window_seqlens
            x = block(x, cu, cos, sin)
        return self.merger(x)[reverse_index]

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor, kind: str = "image") -> torch.Tensor:
        grids = self.check_inputs(pixel_values, grid_thw, kind)
        tables = {(h, w): self.frame_tables(h, w) for _, h, w in grids}
        meta = self.batch_metadata(grids, tables)
        return self.forward_static(pixel_values, **{k: v.to(pixel_values.device) for k, v in meta.items()})


# ---- Qwen2 decoder -------------------------------------------------------------------------


def text_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    """[head_dim/2] fp32 rotary frequencies theta^(-2j/D), computed on CPU like HF's init."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float, device="cpu") / head_dim))


def mrope_cos_sin(
    positions: torch.Tensor, inv_freq: torch.Tensor, mrope_section: tuple[int, ...], dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """[3, T] (t, h, w) positions -> cos, sin [T, D] in `dtype` (angles in fp32, like HF).

    Frequency chunk i of the half vector comes from axis i % 3; the half is then duplicated
    for NeoX rotate-half pairing (j, j + D/2).
    """
    freqs = positions[..., None].float() * inv_freq.to(positions.device)  # [3, T, D/2]
    chunks = freqs.split(list(mrope_section), dim=-1)
    half = torch.cat([c[i % 3] for i, c in enumerate(chunks)], dim=-1)
    emb = torch.cat([half, half], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


class Qwen2Attention(nn.Module):
    def __init__(self, tc, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = d = tc.hidden_size // tc.num_attention_heads
        # this rank's heads and projections
        self.num_heads, self.num_kv_heads, self.q_proj, self.k_proj, self.v_proj, self.o_proj = attention_projections(
            tc.hidden_size, tc.num_attention_heads, tc.num_key_value_heads, d, True, distributed.current())
        self.qkv_proj: Linear | None = None  # q_proj + k_proj + v_proj, set by fuse_projections()

    def fuse_projections(self) -> None:
        self.qkv_proj = fuse_linears(self.q_proj, self.k_proj, self.v_proj)
        del self.q_proj, self.k_proj, self.v_proj

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv: KVCache,
                rows: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """[T, H] -> [T, H]; with `rows`, every token's K/V still goes to the cache but only those
        rows come out (o_proj runs on them alone)."""
        t, hq, hkv = x.shape[0], self.num_heads, self.num_kv_heads
        if self.qkv_proj is None:
            qkv = torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)
        else:
            qkv = self.qkv_proj(x)
        qkv = qkv.view(t, hq + 2 * hkv, self.head_dim)
        # Rotary in the activation dtype with cos/sin already cast to it, as HF does; q and k heads
        # side by side take one pass (the same per-head arithmetic as two).
        q, k = rotate_text_qk(qkv, hq + hkv, cos, sin, neox=True).split([hq, hkv], dim=1)
        return self.o_proj(keep_rows(kv.attend(self.layer_idx, q, k, qkv[:, hq + hkv :]).reshape(t, -1), rows))


class Qwen2MLP(SwiGluMLP):
    def __init__(self, tc) -> None:
        super().__init__(tc.hidden_size, tc.intermediate_size, _activation(tc.hidden_act, "text_config"),
                         tp=distributed.current())  # fmt: skip


class Qwen2DecoderLayer(nn.Module):
    def __init__(self, tc, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(tc.hidden_size, eps=tc.rms_norm_eps)
        self.self_attn = Qwen2Attention(tc, layer_idx)
        self.post_attention_layernorm = RMSNorm(tc.hidden_size, eps=tc.rms_norm_eps)
        self.mlp = Qwen2MLP(tc)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv: KVCache,
                rows: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        attn = self.self_attn(self.input_layernorm(x), cos, sin, kv, rows)
        x, h = self.post_attention_layernorm.add(keep_rows(x, rows), attn)
        return x + self.mlp(h)


class Qwen2TextModel(nn.Module):
    """`model.language_model`: embeddings, pre-norm decoder layers, final norm."""

    def __init__(self, tc) -> None:
        super().__init__()
        self.embed_tokens = embedding(tc.vocab_size, tc.hidden_size, distributed.current())
        self.layers = nn.ModuleList(Qwen2DecoderLayer(tc, i) for i in range(tc.num_hidden_layers))
        self.norm = RMSNorm(tc.hidden_size, eps=tc.rms_norm_eps)


def _check_text_config(tc) -> tuple[int, float, tuple[int, ...]]:
    """Refuse text configs whose behaviour this decoder does not reproduce; returns (D, theta, section)."""
    if tc.hidden_size % tc.num_attention_heads or tc.num_attention_heads % tc.num_key_value_heads:
        raise CheckpointError(
            f"text_config: hidden_size={tc.hidden_size}, num_attention_heads={tc.num_attention_heads} and "
            f"num_key_value_heads={tc.num_key_value_heads} must divide evenly"
        )
    head_dim = tc.hidden_size // tc.num_attention_heads
    rope = tc.rope_parameters or {}
    if rope.get("rope_type", "default") != "default":
        raise CheckpointError(f"text_config.rope_parameters.rope_type={rope['rope_type']!r}; only M-RoPE 'default' is supported")
    section = tuple(rope.get("mrope_section", (16, 24, 24)))
    if sum(section) != head_dim // 2:
        raise CheckpointError(f"text_config mrope_section {list(section)} must sum to head_dim/2 = {head_dim // 2}")
    if any(kind != "full_attention" for kind in tc.layer_types):
        raise CheckpointError("text_config uses sliding-window layers (use_sliding_window=True); not supported")
    return head_dim, rope["rope_theta"], section


class _Qwen2_5_VLBackbone(nn.Module):
    """Holds `visual` and `language_model` under the `model.` prefix of HF's names."""

    def __init__(self, config) -> None:
        super().__init__()
        self.visual = Qwen2_5_VisionTower(config.vision_config)
        self.language_model = Qwen2TextModel(config.text_config)


# ---- the family model ------------------------------------------------------------------------


class Qwen2_5_VLModel(VisionLanguageModel):
    """Qwen2.5-VL for glimpse's driver; `config` is HF's `Qwen2_5_VLConfig`.

    `video_position_rule` picks where text resumes after a video (parity-spec §4.2):
    "reference" (max position + 1, as the original Qwen code and vLLM) or "hf" (HF 5.23).
    """

    family = "qwen2_5_vl"
    supports_video_pruning = True  # EVS (glimpse/models/evs.py): the engine may drop video tokens after encoding

    def __init__(self, config, video_position_rule: str = "reference") -> None:
        super().__init__()
        if video_position_rule not in VIDEO_POSITION_RULES:
            raise InvalidInputError(
                f"video_position_rule={video_position_rule!r}; choose one of {list(VIDEO_POSITION_RULES)}"
            )
        tc, vc = config.text_config, config.vision_config
        self.head_dim, self.rope_theta, self.mrope_section = _check_text_config(tc)
        self._inv_freq = text_inv_freq(self.head_dim, self.rope_theta)  # moved to the decoder's device at its first step
        if vc.out_hidden_size != tc.hidden_size:
            raise CheckpointError(
                f"vision_config.out_hidden_size={vc.out_hidden_size} differs from text hidden_size={tc.hidden_size}"
            )
        self.video_position_rule = video_position_rule
        self.image_token_id = config.image_token_id
        self.video_token_id = config.video_token_id
        # HF 5.23 reads tokens_per_second from the vision config (class default 4 when absent).
        self.tokens_per_second = vc.tokens_per_second
        self.spatial_merge_size = vc.spatial_merge_size
        self.tie_word_embeddings = bool(config.tie_word_embeddings)
        self.model = _Qwen2_5_VLBackbone(config)
        self.tp = distributed.current()
        self.lm_head = lm_head(tc.hidden_size, tc.vocab_size, self.tp)
        self.tie_weights()

    # ---- vision -------------------------------------------------------------------
    def encode_images(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        return self.model.visual(pixel_values, grid_thw, kind="image")

    def encode_videos(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        return self.model.visual(pixel_values, grid_thw, kind="video")

    # ---- positions ----------------------------------------------------------------
    def mm_token_types(self, input_ids: torch.Tensor) -> torch.Tensor:
        return qwen_mm_token_types(input_ids, self.image_token_id, self.video_token_id)

    def mrope_positions(self, input_ids: torch.Tensor, mm: MultimodalInputs) -> tuple[torch.Tensor, int]:
        return qwen_mrope_positions(
            self.mm_token_types(input_ids),
            mm.image_grid_thw,
            mm.video_grid_thw,
            mm.second_per_grid_ts,
            self.tokens_per_second,
            self.spatial_merge_size,
            video_rule=self.video_position_rule,
        )

    # ---- decoder ------------------------------------------------------------------
    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.language_model.embed_tokens(input_ids)

    def decode(self, inputs_embeds: torch.Tensor, positions: torch.Tensor, kv: KVCache,
               rows: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        lm = self.model.language_model
        if self._inv_freq.device != positions.device:  # once: a captured decode step may not copy from the host
            self._inv_freq = self._inv_freq.to(positions.device)
        cos, sin = mrope_cos_sin(positions, self._inv_freq, self.mrope_section, inputs_embeds.dtype)
        x, last = inputs_embeds, len(lm.layers) - 1
        for i, layer in enumerate(lm.layers):
            x = layer(x, cos, sin, kv, rows if i == last else None)
        return lm.norm(x)

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    @property
    def num_decoder_layers(self) -> int:
        return len(self.model.language_model.layers)
