"""Step 6b: efficient video sampling (EVS) - drop the video tokens that change least between frames.

`retained_tokens(grid_thw, m, rate)` -> int, fixed before encoding (it sets the prompt's placeholder count).
`retention_mask([N, hidden] embeddings, grid_thw, m, rate)` -> [N] bool over the video's raster (t, y, x)
tokens; `prune_video` -> `PrunedVideo` ([K, hidden] kept rows, [K] their raster indices).
`pruned_prompt_positions` maps a pruned prompt onto the unpruned layout, whose M-RoPE positions the
kept tokens (and all text) keep. Rule: Bagrov et al. 2025 (EVS), as in vLLM's `multimodal/evs.py`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from glimpse.errors import InvalidInputError

# The first frame is always kept whole: its tokens rank above every real dissimilarity (at most 2).
_FIRST_FRAME = float("inf")
_NORM_EPS = 1e-8


def check_pruning_rate(rate: float, knob: str = "video_pruning_rate") -> float:
    """A pruning rate as a float in [0, 1); anything else is refused naming `knob`."""
    if (
        isinstance(rate, bool)
        or not isinstance(rate, (int, float))
        or not (math.isfinite(rate) and 0 <= rate < 1)
    ):
        raise InvalidInputError(
            f"{knob}={rate!r} must be a number in [0, 1): the fraction of video tokens EVS drops "
            "(0 turns pruning off; 1 would drop every frame but the first)"
        )
    return float(rate)


def retained_tokens(grid_thw: Sequence[int], spatial_merge_size: int, rate: float) -> int:
    """Tokens one video keeps: int(t*h*w/m² * (1 - rate)), never fewer than one whole frame.

    Written as vLLM's `compute_retained_tokens_count` computes it, so prompts have the same length.
    """
    t, h, w = (int(x) for x in grid_thw)
    per_frame = (h // spatial_merge_size) * (w // spatial_merge_size)
    return max(per_frame, int(t * per_frame * (1 - rate)))


def frame_dissimilarity(embeddings: Tensor, grid_thw: Sequence[int], spatial_merge_size: int) -> Tensor:
    """[t*h*w/m², hidden] -> [t, h*w/m²] float32: 1 - cos(token, same token of the previous frame).

    Computed as ½‖â - b̂‖² (â = a/‖a‖), equal to 1 - cos in exact arithmetic; a repeated token gives
    exactly 0, so static regions tie exactly and the tie-break below decides, not rounding noise.
    The first frame gets +inf.
    """
    t, h, w = (int(x) for x in grid_thw)
    per_frame = (h // spatial_merge_size) * (w // spatial_merge_size)
    if embeddings.dim() != 2 or embeddings.shape[0] != t * per_frame:
        raise InvalidInputError(
            f"EVS: a video of grid_thw {(t, h, w)} needs [{t * per_frame}, hidden] embeddings "
            f"(t*h*w/{spatial_merge_size}²), got {tuple(embeddings.shape)}"
        )
    x = embeddings.float().reshape(t, per_frame, -1)
    unit = x / x.norm(dim=-1, keepdim=True).clamp_min(_NORM_EPS)
    change = 0.5 * (unit[1:] - unit[:-1]).square().sum(-1)
    return torch.cat([change.new_full((1, per_frame), _FIRST_FRAME), change])


def retention_mask(
    embeddings: Tensor, grid_thw: Sequence[int], spatial_merge_size: int, rate: float
) -> Tensor:
    """[t*h*w/m², hidden] -> [t*h*w/m²] bool: the `retained_tokens` most dissimilar tokens.

    Ties break towards the earlier token in raster (t, y, x) order (a stable descending sort).
    """
    dissimilarity = frame_dissimilarity(embeddings, grid_thw, spatial_merge_size).flatten()
    keep = retained_tokens(grid_thw, spatial_merge_size, check_pruning_rate(rate))
    order = torch.argsort(dissimilarity, descending=True, stable=True)
    mask = torch.zeros_like(dissimilarity, dtype=torch.bool)
    mask[order[:keep]] = True
    return mask


@dataclass(frozen=True)
class PrunedVideo:
    """One video after EVS, as the encoder cache holds it."""

    embeddings: Tensor  # [K, hidden] kept rows, in raster order
    kept: Tensor  # [K] int64 CPU: ascending raster indices of the kept tokens among the video's t*h*w/m²

    @property
    def nbytes(self) -> int:
        return self.embeddings.nbytes + self.kept.nbytes


def prune_video(
    embeddings: Tensor, grid_thw: Sequence[int], spatial_merge_size: int, rate: float
) -> PrunedVideo:
    """[t*h*w/m², hidden] -> the kept rows and their raster indices."""
    mask = retention_mask(embeddings, grid_thw, spatial_merge_size, rate)
    kept = mask.nonzero().flatten()
    return PrunedVideo(embeddings[kept.to(embeddings.device)], kept.cpu())


# ---- positions ---------------------------------------------------------------------------


@dataclass(frozen=True)
class PrunedVideoSlots:
    """Where one pruned video sits in the prompt: `kept` slots from `start`, of `full` tokens unpruned."""

    start: int
    kept: int
    full: int


@dataclass(frozen=True)
class PrunedPositions:
    positions: Tensor  # [3, T] int64; the slots of pruned videos hold -1 until their kept tokens are known
    mrope_delta: int  # decode position of token i is i + mrope_delta
    video_positions: dict[int, Tensor]  # slot start -> [3, full] positions of that video unpruned


def pruned_prompt_positions(
    input_ids: Tensor,
    videos: Sequence[PrunedVideoSlots],
    video_token_id: int,
    full_positions: Callable[[Tensor], tuple[Tensor, int]],
) -> PrunedPositions:
    """M-RoPE positions of a prompt whose `videos` keep only some of their tokens.

    Pruning removes tokens but moves no position: `full_positions` ([T_full] ids -> ([3, T_full],
    delta), the family's rule) is applied to the prompt with every video run back at full length;
    text and unpruned media take their columns from it, and generated tokens continue where they
    would without pruning (delta grows by the dropped count). A pruned video's slots get
    `video_positions[start][:, kept]` once its kept tokens are known (after encoding).
    """
    ids = torch.as_tensor(input_ids, dtype=torch.long).cpu()
    n = ids.numel()
    # Tokens after a pruned run shift right by the tokens it dropped; the run's own slots map to
    # its first `kept` full slots (placeholders, overwritten once the kept tokens are known).
    grow = torch.zeros(n + 1, dtype=torch.long)
    for v in videos:
        if v.start + v.kept > n or not (0 < v.kept <= v.full):
            raise InvalidInputError(f"EVS: video slots {v} do not fit a prompt of {n} tokens")
        grow[v.start + v.kept] += v.full - v.kept
    index = torch.arange(n) + grow[:n].cumsum(0)
    n_full = n + int(grow.sum())
    full_ids = torch.full((n_full,), video_token_id, dtype=torch.long)
    full_ids[index] = ids
    positions_full, delta_full = full_positions(full_ids)
    positions = positions_full[:, index].clone()
    video_positions = {}
    for v in videos:
        a = int(index[v.start])
        video_positions[v.start] = positions_full[:, a : a + v.full].clone()
        positions[:, v.start : v.start + v.kept] = -1
    return PrunedPositions(positions, int(delta_full) + n_full - n, video_positions)
