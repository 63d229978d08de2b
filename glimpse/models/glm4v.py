"""Steps 5-8 for the GLM-V family: glm4v (GLM-4.1V), glm46v (GLM-4.6V, -Flash), glmga, glm4v_moe (GLM-4.5V), glm_ocr.

Vision encoder: pixel_values [N_patches, C*Tp*P*P] + grid_thw [items, 3] -> [N_patches / m^2, H_text],
every frame (t row) being its own attention segment. Decoder: inputs_embeds [T, H] + M-RoPE
positions [3, T] -> final-normed hidden [T, H] -> logits [T, vocab]. Parameter names equal HF
5.23's state dict (`model.visual.*`, `model.language_model.*`, `lm_head.weight`). Variants are
data (`TextVariant`, `VisionVariant`); the MoE layers live in glm4_moe.py.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from glimpse import distributed
from glimpse.distributed.layers import (
    attention_projections,
    column_linear,
    embedding,
    lm_head,
    packed_qkv_projections,
    row_linear,
)
from glimpse.errors import CheckpointError, InvalidInputError, PromptError
from glimpse.models.base import MultimodalInputs, VisionLanguageModel, WeightSlot
from glimpse.models.glm4_moe import MOE_TEXT_TYPES, check_moe_config, expert_weight_slot, make_moe_text_mlp
from glimpse.models.layers import (
    KVCache,
    Linear,
    RMSNorm,
    SwiGluMLP,
    fuse_linears,
    keep_rows,
    native_matmul_ok,
    rotate_half,
    rotate_text_qk,
    rotate_vision_qk,
    swiglu,
)
from glimpse.models.mrope import glm_mm_token_types, glm_mrope_positions
from glimpse.vision.attention import VarlenAttention, pad_offsets
from glimpse.vision.tables import per_frame_size

# ----------------------------------------------------------------------------------------
# Family check: which HF configs this file serves
# ----------------------------------------------------------------------------------------

MODEL_TYPES = ("glm4v", "glm46v", "glmga", "glm4v_moe", "glm_ocr")
DENSE_TEXT_TYPES = ("glm4v_text", "glm_ocr_text")


@dataclass(frozen=True)
class TextVariant:
    """How a GLM text tower differs by `text_config.model_type` (HF 5.23's classes)."""

    head_dim: int
    qkv_bias: bool  # glm4v_text hard-codes True; glm_ocr_text False; MoE reads attention_bias
    sandwich_norms: bool  # post_self_attn / post_mlp norms (dense GLM4 only)
    neox_rotary: bool  # half-split pairs (MoE) instead of interleaved pairs (dense)
    moe: bool


def text_variant(tc) -> TextVariant:
    kind = getattr(tc, "model_type", None)
    default_head_dim = tc.hidden_size // tc.num_attention_heads
    if kind == "glm4v_text":  # HF's glm4v attention ignores text_config.head_dim
        return TextVariant(default_head_dim, True, True, False, False)
    head_dim = getattr(tc, "head_dim", None) or default_head_dim
    if kind == "glm_ocr_text":
        return TextVariant(head_dim, False, True, False, False)
    return TextVariant(head_dim, bool(tc.attention_bias), False, True, True)


@dataclass(frozen=True)
class VisionVariant:
    """GLM-OCR's tower (glm_ocr_vision) drops the learned position table and the post-conv norm,
    RMS-normalises q and k per head, puts biases on attention and MLP, and sizes the MLP by
    intermediate_size and the merger by out_hidden_size * in_channels (parity-spec §5.6)."""

    ocr: bool
    mlp_width: int
    mlp_bias: bool
    proj_bias: bool
    merger_context: int


def vision_variant(vc) -> VisionVariant:
    if getattr(vc, "model_type", None) == "glm_ocr_vision":
        bias = bool(vc.attention_bias)
        return VisionVariant(True, vc.intermediate_size, bias, bias, vc.out_hidden_size * vc.in_channels)
    return VisionVariant(False, vc.out_hidden_size, False, False, vc.intermediate_size)


def check_config(config) -> None:
    """Refuse configs this file cannot run exactly, naming the key to look at."""
    model_type = getattr(config, "model_type", None)
    if model_type not in MODEL_TYPES:
        raise CheckpointError(f"config.model_type {model_type!r} is not served by glm4v.py (serves {MODEL_TYPES})")
    tc = config.text_config
    text_type = getattr(tc, "model_type", None)
    if text_type not in DENSE_TEXT_TYPES + MOE_TEXT_TYPES:
        raise CheckpointError(
            f"{model_type}: text_config.model_type {text_type!r} is not supported "
            f"(supported: {DENSE_TEXT_TYPES + MOE_TEXT_TYPES})"
        )
    rope = tc.rope_parameters or {}
    if rope.get("rope_type", "default") != "default":
        raise CheckpointError(f"{model_type}: text rope_type {rope.get('rope_type')!r} is not supported (only 'default')")
    variant = text_variant(tc)
    if text_type == "glm4v_text" and getattr(tc, "head_dim", None) not in (None, variant.head_dim):
        raise CheckpointError(
            f"{model_type}: text_config.head_dim {tc.head_dim} != hidden_size/num_attention_heads {variant.head_dim}; "
            "HF's glm4v attention ignores head_dim, so such a checkpoint has no defined behaviour"
        )
    rd = text_rotary_dim(tc)
    section = list(rope.get("mrope_section", [8, 12, 12]))
    if sum(section) * 2 != rd:
        raise CheckpointError(
            f"{model_type}: text_config.rope_parameters.mrope_section {section} sums to {sum(section)} but the "
            f"rotary dim is {rd} (head_dim {variant.head_dim} x partial_rotary_factor "
            f"{rope.get('partial_rotary_factor', 1.0)}); GLM-4.1V checkpoints set partial_rotary_factor 0.5"
        )
    if variant.moe:
        if getattr(tc, "use_qk_norm", False):
            raise CheckpointError(
                f"{model_type}: text_config.use_qk_norm is true, but HF 5.23's glm4v_moe text tower has no q/k "
                "norm (it deletes the key), so the checkpoint's behaviour is undefined; not supported"
            )
        check_moe_config(tc)
    rope_v = config.vision_config.rope_parameters or {}
    if rope_v.get("rope_type", "axial") != "axial":
        raise CheckpointError(f"{model_type}: vision rope_type {rope_v.get('rope_type')!r} is not supported")


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if name == "silu":
        return F.silu
    if name == "gelu":
        return F.gelu
    raise CheckpointError(f"hidden_act {name!r} is not supported (supported: 'silu', 'gelu')")


# ----------------------------------------------------------------------------------------
# Per-grid tables (pure functions of the grid, safe to cache by (h, w))
# ----------------------------------------------------------------------------------------


def merge_order_coords(h: int, w: int, merge: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, x) patch coordinates of one frame [h*w] each, in the processor's merge-block order."""
    ys = torch.arange(h).view(h // merge, merge, 1, 1).expand(h // merge, merge, w // merge, merge)
    xs = torch.arange(w).view(1, 1, w // merge, merge).expand(h // merge, merge, w // merge, merge)
    # rows of pixel_values walk (block row, block col, in-block row, in-block col)
    return ys.permute(0, 2, 1, 3).reshape(-1), xs.permute(0, 2, 1, 3).reshape(-1)


def vision_rotary_cos_sin(h: int, w: int, merge: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """2-D rotary tables of one frame, fp32 [h*w, head_dim]: angles [y*inv, x*inv, y*inv, x*inv]."""
    spatial = head_dim // 2
    inv_freq = 1.0 / (theta ** (torch.arange(0, spatial, 2, dtype=torch.float) / spatial))
    ys, xs = merge_order_coords(h, w, merge)
    angles = torch.cat([ys[:, None].float() * inv_freq, xs[:, None].float() * inv_freq], dim=-1)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def bicubic_axis_matrix(size: int, side: int) -> torch.Tensor:
    """fp32 [size, side] resampling matrix equal to HF's `F.grid_sample(bicubic, border, align_corners=False)`.

    Row i holds the Keys (a=-0.75) weights of output cell i over the `side` table cells; taps
    past the border are clamped onto the edge cell (weights from the unclamped distance), as
    grid_sample's border padding does. Arithmetic follows HF's normalisation and grid_sample's
    unnormalisation step by step in fp32.
    """
    coord = ((torch.arange(size) + 0.5) / float(size)) * 2 - 1  # HF's grid value in [-1, 1]
    src = ((coord + 1) * side - 1) / 2  # grid_sample's source pixel
    base = torch.floor(src)
    t = src - base
    a = -0.75

    def near(x: torch.Tensor) -> torch.Tensor:  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x: torch.Tensor) -> torch.Tensor:  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    t2 = 1 - t
    weights = torch.stack([far(t + 1), near(t), near(t2), far(t2 + 1)], dim=1)
    taps = (base.long()[:, None] + torch.arange(-1, 3)).clamp(0, side - 1)
    return torch.zeros(size, side).scatter_add_(1, taps, weights)


def frame_segments(grid_thw: torch.Tensor) -> torch.Tensor:
    """cu_seqlens int32 [frames+1]: one attention segment of h*w patches per frame of every item."""
    seqlens = torch.repeat_interleave(grid_thw[:, 1] * grid_thw[:, 2], grid_thw[:, 0])
    return F.pad(seqlens.cumsum(0), (1, 0)).to(torch.int32)


# ----------------------------------------------------------------------------------------
# Vision tower
# ----------------------------------------------------------------------------------------


class Glm4vVisionPatchEmbed(nn.Module):
    def __init__(self, vc) -> None:
        super().__init__()
        self.patch_shape = (vc.in_channels, vc.temporal_patch_size, vc.patch_size, vc.patch_size)
        kernel = self.patch_shape[1:]
        self.proj = nn.Conv3d(vc.in_channels, vc.hidden_size, kernel_size=kernel, stride=kernel)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        weight = self.proj.weight
        x = pixel_values.to(weight.dtype)
        if native_matmul_ok(x):
            # The same products as the Conv3d (its kernel is its stride), summed in another order:
            # 10-20x faster than oneDNN's bf16 convolution here, within the bf16 error bound of the
            # native path (tests/test_glm4v_model.py), so used where the native kernels run.
            return F.linear(x.view(x.shape[0], -1), weight.view(weight.shape[0], -1), self.proj.bias)
        # HF's Conv3d otherwise: torch's kernels cast for cast as HF's (the bit-equal comparison)
        return self.proj(x.view(-1, *self.patch_shape)).view(x.shape[0], -1)


class Glm4vVisionEmbeddings(nn.Module):
    """Learned S x S position table, resampled bicubically to a frame's (h, w) grid in fp32."""

    def __init__(self, vc) -> None:
        super().__init__()
        self.side = vc.image_size // vc.patch_size
        self.merge = vc.spatial_merge_size
        self.position_embedding = nn.Embedding(self.side * self.side, vc.hidden_size)

    def frame_table(self, h: int, w: int) -> torch.Tensor:
        """[h*w, C] position embeddings of one frame in merge-block order, in the table's dtype."""
        weight = self.position_embedding.weight
        table = weight.float().view(self.side, self.side, -1)  # [y, x, C]
        wy = bicubic_axis_matrix(h, self.side).to(table.device)
        wx = bicubic_axis_matrix(w, self.side).to(table.device)
        along_x = torch.matmul(wx, table)  # [S, w, C]
        grid = (wy @ along_x.flatten(1)).view(h, w, -1)
        m = self.merge
        grid = grid.view(h // m, m, w // m, m, -1).permute(0, 2, 1, 3, 4).reshape(h * w, -1)
        return grid.to(weight.dtype)


class Glm4vVisionAttention(nn.Module):
    def __init__(self, vc, variant: VisionVariant) -> None:
        super().__init__()
        self.num_heads, self.qkv, self.proj = packed_qkv_projections(
            vc.hidden_size, vc.num_heads, vc.attention_bias, variant.proj_bias, distributed.current().vision)
        self.varlen = VarlenAttention()  # its backend is bound by the loader (glimpse/backends)
        if variant.ocr:  # per-head RMSNorm of q and k before the rotary
            head_dim = vc.hidden_size // vc.num_heads
            self.q_norm = RMSNorm(head_dim, eps=vc.rms_norm_eps)
            self.k_norm = RMSNorm(head_dim, eps=vc.rms_norm_eps)
        self.qk_norm = variant.ocr

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        qkv = self.qkv(x).view(n, 3, self.num_heads, -1)
        if self.qk_norm:
            q, k, v = qkv.unbind(1)
            q, k = self.q_norm(q), self.k_norm(k)
            q, k = _vision_rotary(q, cos, sin), _vision_rotary(k, cos, sin)
        else:
            (q, k), v = rotate_vision_qk(qkv, cos, sin), qkv[:, 2]
        out = self.varlen(q, k, v, cu_seqlens, n)  # every segment fits in the n rows
        return self.proj(out.reshape(n, -1))


def _vision_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """NeoX rotation over the full head dim, in fp32 as HF does, cast back to x's dtype."""
    xf = x.float()
    return (xf * cos[:, None] + rotate_half(xf) * sin[:, None]).to(x.dtype)


class Glm4vVisionMlp(SwiGluMLP):
    """SwiGLU whose width is out_hidden_size (not intermediate_size), no bias; GLM-OCR: intermediate_size, bias."""

    def __init__(self, vc, variant: VisionVariant) -> None:
        super().__init__(vc.hidden_size, variant.mlp_width, activation(vc.hidden_act), bias=variant.mlp_bias,
                         tp=distributed.current().vision)  # fmt: skip


class Glm4vVisionBlock(nn.Module):
    def __init__(self, vc, variant: VisionVariant) -> None:
        super().__init__()
        self.norm1 = RMSNorm(vc.hidden_size, eps=vc.rms_norm_eps)
        self.norm2 = RMSNorm(vc.hidden_size, eps=vc.rms_norm_eps)
        self.attn = Glm4vVisionAttention(vc, variant)
        self.mlp = Glm4vVisionMlp(vc, variant)

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cu_seqlens, cos, sin)
        return x + self.mlp(self.norm2(x))


class Glm4vVisionPatchMerger(SwiGluMLP):
    """proj -> LayerNorm -> exact GELU -> SwiGLU (context width: `VisionVariant.merger_context`)."""

    def __init__(self, dim: int, context_dim: int, hidden_act: str) -> None:
        super().__init__(dim, context_dim, activation(hidden_act))
        self.proj = Linear(dim, dim, bias=False)
        self.post_projection_norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.gelu(self.post_projection_norm(self.proj(x))))


class Glm4vVisionModel(nn.Module):
    """[N_patches, C*Tp*P*P] + grid_thw [items, 3] -> [N_patches / m^2, out_hidden_size]."""

    def __init__(self, vc) -> None:
        super().__init__()
        self.merge = vc.spatial_merge_size
        self.head_dim = vc.hidden_size // vc.num_heads
        self.theta = float((vc.rope_parameters or {}).get("rope_theta", 10000.0))
        variant = vision_variant(vc)
        self.patch_embed = Glm4vVisionPatchEmbed(vc)
        # GLM-OCR has neither: an identity norm and all-zero position tables keep one static graph
        self.post_conv_layernorm = nn.Identity() if variant.ocr else RMSNorm(vc.hidden_size, eps=vc.rms_norm_eps)
        self.embeddings = None if variant.ocr else Glm4vVisionEmbeddings(vc)
        self.blocks = nn.ModuleList(Glm4vVisionBlock(vc, variant) for _ in range(vc.depth))
        self.post_layernorm = RMSNorm(vc.hidden_size, eps=vc.rms_norm_eps)
        self.downsample = nn.Conv2d(vc.hidden_size, vc.out_hidden_size, kernel_size=self.merge, stride=self.merge)
        self.merger = Glm4vVisionPatchMerger(vc.out_hidden_size, variant.merger_context, vc.hidden_act)

    # The tower runs in two parts: per-batch metadata from the grids alone (built from
    # per-frame-size tables, made once per size: glimpse/vision/tables.py), then `forward_static`,
    # whose shapes depend only on the row count, so one compiled graph serves every batch padded to a budget.

    @per_frame_size("patch_embed.proj.weight", "embeddings.position_embedding.weight")
    def frame_tables(self, h: int, w: int) -> dict[str, torch.Tensor]:
        """Tables of one (1, h, w) frame: pos_embeds [h*w, C] (weight dtype), cos/sin fp32 [h*w, D]."""
        cos, sin = vision_rotary_cos_sin(h, w, self.merge, self.head_dim, self.theta)
        weight = self.patch_embed.proj.weight
        if self.embeddings is None:
            pos_embeds = weight.new_zeros(h * w, weight.shape[0])
        else:
            pos_embeds = self.embeddings.frame_table(h, w)
        return {"pos_embeds": pos_embeds, "cos": cos.to(weight.device), "sin": sin.to(weight.device)}

    def batch_metadata(
        self,
        grids: Sequence[tuple[int, int, int]],
        tables: Mapping[tuple[int, int], dict[str, torch.Tensor]],
        capacity_patches: int | None = None,
        capacity_frames: int | None = None,
    ) -> dict[str, torch.Tensor]:
        """`forward_static`'s keyword inputs for items laid out back to back in `grids` order.

        With capacities, pos_embeds/cos/sin get zero rows up to `capacity_patches` and cu_seqlens
        repeats its last offset up to `capacity_frames` segments (padded rows sit in no segment).
        """
        rows = {key: [tables[(h, w)][key].repeat(t, 1) for t, h, w in grids] for key in ("pos_embeds", "cos", "sin")}
        cu_seqlens = frame_segments(torch.tensor(grids, dtype=torch.long).view(-1, 3))
        n = int(cu_seqlens[-1])
        if capacity_patches is not None:
            for parts in rows.values():
                parts.append(parts[0].new_zeros(capacity_patches - n, parts[0].shape[1]))
        if capacity_frames is not None:
            cu_seqlens = pad_offsets(cu_seqlens, capacity_frames + 1)
        meta = {key: torch.cat(parts) for key, parts in rows.items()}
        meta["cu_seqlens"] = cu_seqlens.to(meta["cos"].device)
        return meta

    def forward_static(
        self,
        pixel_values: torch.Tensor,
        pos_embeds: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cu_seqlens: torch.Tensor,
    ) -> torch.Tensor:
        """[N, C*Tp*P*P] plus `batch_metadata` -> [N / m^2, out_hidden]; N a multiple of m^2."""
        x = self.post_conv_layernorm(self.patch_embed(pixel_values)) + pos_embeds
        for block in self.blocks:
            x = block(x, cu_seqlens, cos, sin)
        x = self.post_layernorm(x)
        # rows 4i..4i+3 are one merge block in (row, col) order, i.e. the 2x2 conv window
        x = x.view(-1, self.merge, self.merge, x.shape[-1]).permute(0, 3, 1, 2)
        if native_matmul_ok(x):  # the conv as one matmul over the window, as in the patch embedding
            weight = self.downsample.weight
            x = F.linear(x.reshape(x.shape[0], -1), weight.view(weight.shape[0], -1), self.downsample.bias)
        else:
            x = self.downsample(x).flatten(1)
        return self.merger(x)

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        grids = [tuple(g) for g in grid_thw.tolist()]
        tables = {(h, w): self.frame_tables(h, w) for _, h, w in grids}
        meta = self.batch_metadata(grids, tables)
        return self.forward_static(pixel_values, **{k: v.to(pixel_values.device) for k, v in meta.items()})


# ----------------------------------------------------------------------------------------
# Text decoder (dense GLM4: sandwich norms, q/k/v bias, partial interleaved M-RoPE, fused gate_up;
# GLM-OCR: no q/k/v bias; MoE: pre-norm only, half-split rotary, glm4_moe.py MLPs)
# ----------------------------------------------------------------------------------------


def text_rotary_dim(tc) -> int:
    rope = tc.rope_parameters or {}
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    return int(head_dim * rope.get("partial_rotary_factor", 1.0))


def mrope_cos_sin(
    positions: torch.Tensor,
    theta: float,
    rotary_dim: int,
    mrope_section: list[int],
    dtype: torch.dtype,
    neox: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """[3, T] positions -> cos, sin [T, rotary_dim] in `dtype` (angles in fp32, cast like HF).

    Frequency chunk i (sizes `mrope_section`) takes its angle from axis i % 3 (t, h, w); each
    frequency j then covers one interleaved pair (2j, 2j+1), or with `neox` the pair (j, j + rd/2).
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float, device=positions.device) / rotary_dim))
    angles = positions[..., None].float() * inv_freq  # [3, T, rd/2]
    chunks = angles[..., : sum(mrope_section)].split(list(mrope_section), dim=-1)  # slices, not a gather by an index tensor: nothing
    angles = torch.cat([c[i % 3] for i, c in enumerate(chunks)], dim=-1)  # from the host (a captured step copies none)
    # (the duplication as a view: repeat_interleave costs ~0.2 ms a call on CPU, every decode step)
    angles = torch.cat([angles, angles], dim=-1) if neox else angles[..., None].expand(-1, -1, 2).flatten(-2)
    return angles.cos().to(dtype), angles.sin().to(dtype)


class Glm4vTextAttention(nn.Module):
    def __init__(self, tc, layer_idx: int, variant: TextVariant) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = d = variant.head_dim
        self.neox = variant.neox_rotary
        hq, hkv, self.q_proj, self.k_proj, self.v_proj, self.o_proj = attention_projections(
            tc.hidden_size, tc.num_attention_heads, tc.num_key_value_heads, d, variant.qkv_bias, distributed.current())
        self.heads = (hq, hkv)  # this rank's
        self.qkv_proj: Linear | None = None  # q_proj + k_proj + v_proj, set by fuse_projections()

    def fuse_projections(self) -> None:
        self.qkv_proj = fuse_linears(self.q_proj, self.k_proj, self.v_proj)
        del self.q_proj, self.k_proj, self.v_proj

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv: KVCache,
                rows: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """[T, H] -> [T, H]; with `rows`, every token's K/V still goes to the cache but only those
        rows come out (o_proj runs on them alone)."""
        t, (hq, hkv) = x.shape[0], self.heads
        if self.qkv_proj is None:
            qkv = torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)
        else:
            qkv = self.qkv_proj(x)
        qkv = qkv.view(t, hq + 2 * hkv, self.head_dim)
        # q and k heads side by side take one rotary pass (the same per-head arithmetic as two)
        q, k = rotate_text_qk(qkv, hq + hkv, cos, sin, self.neox).split([hq, hkv], dim=1)
        return self.o_proj(keep_rows(kv.attend(self.layer_idx, q, k, qkv[:, hq + hkv :]).reshape(t, -1), rows))


class Glm4vTextMLP(nn.Module):
    """Fused gate_up_proj: first half gate, second half up; down(up * act(gate))."""

    def __init__(self, tc) -> None:
        super().__init__()
        tp, h, inter = distributed.current(), tc.hidden_size, tc.intermediate_size
        first, rows = tp.share(inter, "text_config.intermediate_size")
        # HF's gate_up_proj is packed (gate rows, then up rows): this rank's rows of each
        self.gate_up_proj = column_linear(h, 2 * inter, False, tp, [(first, rows), (inter + first, rows)])
        self.down_proj = row_linear(inter, h, False, tp, [(first, rows)])
        self.act = activation(tc.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(swiglu(self.gate_up_proj(x), self.act))


def make_text_mlp(tc, layer_idx: int, variant: TextVariant) -> nn.Module:
    """The seam for MoE towers (glm4v_moe_text): dense layers and routed-expert layers differ only here."""
    if variant.moe:
        return make_moe_text_mlp(tc, layer_idx)
    return Glm4vTextMLP(tc)  # dense towers use one MLP shape for every layer


class Glm4vTextDecoderLayer(nn.Module):
    def __init__(self, tc, layer_idx: int, variant: TextVariant) -> None:
        super().__init__()
        self.self_attn = Glm4vTextAttention(tc, layer_idx, variant)
        self.mlp = make_text_mlp(tc, layer_idx, variant)
        eps = tc.rms_norm_eps
        self.sandwich = variant.sandwich_norms
        self.input_layernorm = RMSNorm(tc.hidden_size, eps=eps)
        self.post_attention_layernorm = RMSNorm(tc.hidden_size, eps=eps)
        if self.sandwich:
            self.post_self_attn_layernorm = RMSNorm(tc.hidden_size, eps=eps)
            self.post_mlp_layernorm = RMSNorm(tc.hidden_size, eps=eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv: KVCache,
                rows: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        attn = self.self_attn(self.input_layernorm(x), cos, sin, kv, rows)
        attn = self.post_self_attn_layernorm(attn) if self.sandwich else attn
        x, h = self.post_attention_layernorm.add(keep_rows(x, rows), attn)  # x + attn, and its norm
        mlp = self.mlp(h)
        return x + (self.post_mlp_layernorm(mlp) if self.sandwich else mlp)


class Glm4vTextModel(nn.Module):
    """inputs_embeds [T, H] + positions [3, T] -> final-normed hidden [T, H]."""

    def __init__(self, tc) -> None:
        super().__init__()
        rope = tc.rope_parameters or {}
        self.theta = float(rope.get("rope_theta", 10000.0))
        self.rotary_dim = text_rotary_dim(tc)
        self.mrope_section = list(rope.get("mrope_section", [8, 12, 12]))
        variant = text_variant(tc)
        self.neox = variant.neox_rotary
        self.embed_tokens = embedding(tc.vocab_size, tc.hidden_size, distributed.current())
        self.layers = nn.ModuleList(Glm4vTextDecoderLayer(tc, i, variant) for i in range(tc.num_hidden_layers))
        self.norm = RMSNorm(tc.hidden_size, eps=tc.rms_norm_eps)

    def forward(self, inputs_embeds: torch.Tensor, positions: torch.Tensor, kv: KVCache,
                rows: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        cos, sin = mrope_cos_sin(
            positions, self.theta, self.rotary_dim, self.mrope_section, inputs_embeds.dtype, self.neox
        )
        x, last = inputs_embeds, len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, kv, rows if i == last else None)
        return self.norm(x)


# ----------------------------------------------------------------------------------------
# The family model: hooks for base.VisionLanguageModel
# ----------------------------------------------------------------------------------------


class Glm4vBackbone(nn.Module):
    """Holds `visual` and `language_model` so parameter names read `model.visual.*`, `model.language_model.*`."""

    def __init__(self, config) -> None:
        super().__init__()
        self.visual = Glm4vVisionModel(config.vision_config)
        self.language_model = Glm4vTextModel(config.text_config)


class Glm4vModel(VisionLanguageModel):
    """GLM-4.1V / GLM-4.6V(-Flash) / GLMGA / GLM-4.5V / GLM-OCR from the HF top-level config."""

    family = "glm4v"
    model_types = MODEL_TYPES

    def __init__(self, config) -> None:
        super().__init__()
        check_config(config)
        vc, tc = config.vision_config, config.text_config
        if vc.out_hidden_size != tc.hidden_size:
            raise CheckpointError(
                f"vision_config.out_hidden_size {vc.out_hidden_size} != text_config.hidden_size {tc.hidden_size}"
            )
        self.image_token_id = int(config.image_token_id)
        self.video_start_token_id = int(config.video_start_token_id)
        self.video_end_token_id = int(config.video_end_token_id)
        self.vocab_size = tc.vocab_size
        self.spatial_merge_size = vc.spatial_merge_size
        self.patch_dim = vc.in_channels * vc.temporal_patch_size * vc.patch_size**2
        self.model = Glm4vBackbone(config)
        self.tp = distributed.current()
        self.lm_head = lm_head(tc.hidden_size, tc.vocab_size, self.tp)
        self.tie_word_embeddings = bool(config.tie_word_embeddings)
        self.tie_weights()
        moe = text_variant(tc).moe
        self.num_experts = int(tc.n_routed_experts) if moe else 0
        self.moe_intermediate_size = int(tc.moe_intermediate_size) if moe else 0
        n_mtp = int(getattr(tc, "num_nextn_predict_layers", 0) or 0)
        self.mtp_layers = range(tc.num_hidden_layers, tc.num_hidden_layers + n_mtp)

    # ---- checkpoint hooks (read by glimpse.loader) ------------------------------------------
    def skip_checkpoint_tensor(self, name: str) -> bool:
        """True for the `text_config.num_nextn_predict_layers` multi-token-prediction layers stored after
        the decoder (`model.language_model.layers.{num_hidden_layers + i}.*`): draft heads glimpse does not run."""
        match = re.match(r"model\.language_model\.layers\.(\d+)\.", name)
        return match is not None and int(match[1]) in self.mtp_layers

    def packed_weight_slot(self, name: str) -> WeightSlot | None:
        """Per-expert checkpoint tensor -> its slot in the stacked parameter; None if `name` is loaded whole."""
        if not self.num_experts:
            return None
        return expert_weight_slot(name, self.num_experts, self.moe_intermediate_size, self.tp)

    def float32_weight_names(self) -> set[str]:
        """Tensors kept in float32 whatever the model dtype (HF keeps the router's correction bias so)."""
        return {name for name, _ in self.named_buffers() if name.endswith("e_score_correction_bias")}

    # ---- vision ------------------------------------------------------------------------
    def encode_images(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """[N_patches, C*Tp*P*P], [num_images, 3] -> [sum(t*h*w/m^2), hidden] in item order."""
        self._check_pixels(pixel_values, grid_thw, "image")
        return self.model.visual(pixel_values, grid_thw)

    def encode_videos(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """Like encode_images; each of a video's t frames is a separate (1, h, w) attention segment."""
        self._check_pixels(pixel_values, grid_thw, "video")
        return self.model.visual(pixel_values, grid_thw)

    def _check_pixels(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor, kind: str) -> None:
        if grid_thw.dim() != 2 or grid_thw.shape[1] != 3:
            raise InvalidInputError(f"{kind}_grid_thw must have shape [num_{kind}s, 3], got {tuple(grid_thw.shape)}")
        m = self.spatial_merge_size
        for i, (t, h, w) in enumerate(grid_thw.tolist()):
            if t < 1 or h < 1 or w < 1 or h % m or w % m:
                raise InvalidInputError(
                    f"{kind} {i}: grid_thw ({t}, {h}, {w}) needs t >= 1 and h, w positive multiples of "
                    f"spatial_merge_size {m}"
                )
        expected = int(grid_thw.prod(-1).sum())
        if pixel_values.dim() != 2 or tuple(pixel_values.shape) != (expected, self.patch_dim):
            raise InvalidInputError(
                f"{kind} pixel_values has shape {tuple(pixel_values.shape)}, but {kind}_grid_thw needs "
                f"({expected}, {self.patch_dim}) (sum of t*h*w patches, C*Tp*P*P values each)"
            )

    # ---- positions -----------------------------------------------------------------------
    def mm_token_types(self, input_ids: torch.Tensor) -> torch.Tensor:
        return glm_mm_token_types(input_ids, self.image_token_id, self.video_start_token_id, self.video_end_token_id)

    def mrope_positions(self, input_ids: torch.Tensor, mm: MultimodalInputs) -> tuple[torch.Tensor, int]:
        positions, delta = glm_mrope_positions(
            self.mm_token_types(input_ids), mm.image_grid_thw, mm.video_grid_thw, self.spatial_merge_size
        )
        return positions, int(delta)

    # ---- decoder ---------------------------------------------------------------------------
    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        outside = (input_ids < 0) | (input_ids >= self.vocab_size)
        if bool(outside.any()):  # one host sync; nn.Embedding would raise a bare IndexError
            i = int(outside.nonzero()[0])
            raise PromptError(
                f"token {i} has id {int(input_ids[i])}, outside the vocabulary [0, {self.vocab_size}) "
                "(text_config.vocab_size)"
            )
        return self.model.language_model.embed_tokens(input_ids)

    def decode(self, inputs_embeds: torch.Tensor, positions: torch.Tensor, kv: KVCache,
               rows: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        return self.model.language_model(inputs_embeds, positions, kv, rows)

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    @property
    def num_decoder_layers(self) -> int:
        return len(self.model.language_model.layers)
