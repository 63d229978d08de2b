"""Step 7 of the data path: M-RoPE position ids for one prompt, as pure tensor functions.

`*_mm_token_types` map `[T]` input_ids to `[T]` int64 modality types (0 text, 1 image, 2 video);
`glm_mrope_positions` / `qwen_mrope_positions` map those types plus `grid_thw` rows to
`([3, T] int64 positions, mrope_delta)`; `decode_positions` gives `[3, n]` ids after the prompt.
Spec: parity-spec §3.4 and §4. Runs are found with diff/nonzero; nothing loops per token or per group.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from glimpse.errors import PromptError

_KIND = {1: "image", 2: "video"}


# ---- modality types (§3.4) -----------------------------------------------------------------


def glm_mm_token_types(
    input_ids: Tensor, image_token_id: int, video_start_token_id: int, video_end_token_id: int
) -> Tensor:
    """[T] ids -> [T] int64. GLM uses `<|image|>` for both media; it is a video slot inside
    `<|begin_of_video|> … <|end_of_video|>` (HF: cumsum(start) > cumsum(end) at that position)."""
    ids = _as_ids(input_ids)
    inside_video = torch.cumsum(ids == video_start_token_id, 0) > torch.cumsum(ids == video_end_token_id, 0)
    types = (ids == image_token_id).to(torch.int64)
    return types + (types & inside_video.to(torch.int64))


def qwen_mm_token_types(input_ids: Tensor, image_token_id: int, video_token_id: int) -> Tensor:
    """[T] ids -> [T] int64: 1 for `<|image_pad|>`, 2 for `<|video_pad|>`, 0 otherwise."""
    ids = _as_ids(input_ids)
    types = (ids == image_token_id).to(torch.int64)
    return torch.where(ids == video_token_id, 2, types)


# ---- prompt positions (§4.1, §4.2) ---------------------------------------------------------


def glm_mrope_positions(
    mm_token_types: Tensor,
    image_grid_thw: Tensor | None,
    video_grid_thw: Tensor | None,
    spatial_merge_size: int,
) -> tuple[Tensor, int]:
    """[T] types -> ([3, T] int64 positions, mrope_delta = max + 1 - T), HF 5.23's GLM rule.

    Each video frame is its own group: the frames of video i are `video_grid_thw[i, 0]` runs of
    `h*w/m²` slots, separated in the prompt by timestamp text, and each is placed like an image.
    """
    types = _check_types(mm_token_types)
    m = _check_merge(spatial_merge_size)
    images = _check_grid(image_grid_thw, "image_grid_thw", m)
    videos = _check_grid(video_grid_thw, "video_grid_thw", m)
    frame_video = torch.repeat_interleave(torch.arange(len(videos)), videos[:, 0])
    frames = videos[frame_video].clone()
    frames[:, 0] = 1
    groups = _Groups.find(types)
    thw = groups.attach_grids(images, frames, m, frame_of=(videos, frame_video))
    t_off, y, x, hw_max = _offsets(groups, thw, m)
    return _assemble(types.numel(), groups, t_off, y, x, advance=hw_max)


def qwen_mrope_positions(
    mm_token_types: Tensor,
    image_grid_thw: Tensor | None,
    video_grid_thw: Tensor | None,
    second_per_grid_ts: Tensor | None,
    tokens_per_second: float,
    spatial_merge_size: int,
    video_rule: Literal["reference", "hf"] = "reference",
) -> tuple[Tensor, int]:
    """[T] types -> ([3, T] int64 positions, mrope_delta), Qwen2.5-VL rule.

    A video's t axis is `s + trunc(k * tokens_per_second * second_per_grid_ts)`, computed in the
    same dtype as HF 5.23 (float32 for the processor's float32 `second_per_grid_ts`).
    `video_rule="reference"`: text after a video starts at max(video positions) + 1 (original
    Qwen2.5-VL code and vLLM; what checkpoints were trained with). `"hf"`: HF 5.23's `s + max(H, W)`.
    """
    if video_rule not in ("reference", "hf"):
        raise PromptError(f"video_rule must be 'reference' or 'hf', got {video_rule!r}")
    if not (isinstance(tokens_per_second, (int, float)) and math.isfinite(tokens_per_second)) or (
        tokens_per_second < 0
    ):
        raise PromptError(
            f"tokens_per_second must be a finite number >= 0, got {tokens_per_second!r} "
            "(checkpoint config vision_config.tokens_per_second)"
        )
    types = _check_types(mm_token_types)
    m = _check_merge(spatial_merge_size)
    images = _check_grid(image_grid_thw, "image_grid_thw", m)
    videos = _check_grid(video_grid_thw, "video_grid_thw", m)
    # HF multiplies tokens_per_second by one element of second_per_grid_ts (or by the int 1 when
    # it is absent); the same multiply on the whole vector keeps HF's result dtype per video.
    if second_per_grid_ts is None:
        spg = torch.ones(len(videos), dtype=torch.int64)
    else:
        spg = torch.as_tensor(second_per_grid_ts).reshape(-1)
        if spg.numel() != len(videos):
            raise PromptError(
                f"second_per_grid_ts has {spg.numel()} entries but video_grid_thw has {len(videos)} "
                "videos; pass one entry per video"
            )
        bad = ~torch.isfinite(spg.double()) | (spg < 0)
        if bool(bad.any()):
            i = int(bad.nonzero()[0])
            raise PromptError(f"second_per_grid_ts[{i}] = {spg[i].item()} must be a finite number >= 0")
    time_interval = tokens_per_second * spg

    groups = _Groups.find(types)
    thw = groups.attach_grids(images, videos, m)
    t_off, y, x, hw_max = _offsets(groups, thw, m)
    is_video_tok = groups.token_kind == 2
    if bool(is_video_tok.any()):
        # Video group g is the (g - #images before it)-th video; same float op as HF, per token.
        video_of_group = torch.cumsum(groups.kind == 2, 0) - 1
        ti_tok = time_interval[video_of_group[groups.token_group[is_video_tok]]]
        k = t_off[is_video_tok]
        t_off[is_video_tok] = (k.to(ti_tok.dtype) * ti_tok).long()
    if video_rule == "hf":
        advance = hw_max
    else:
        # max over the group of (t, y, x) offsets + 1; t offsets grow with k, so the last frame holds it.
        last_t = thw[:, 0] - 1
        t_max = last_t.clone()
        vid = groups.kind == 2
        if bool(vid.any()):
            ti_g = time_interval[torch.cumsum(vid, 0)[vid] - 1]
            t_max[vid] = (last_t[vid].to(ti_g.dtype) * ti_g).long()
        advance = torch.maximum(hw_max, t_max + 1)
    return _assemble(types.numel(), groups, t_off, y, x, advance=advance)


def decode_positions(num_computed_tokens: int, num_new: int, mrope_delta: int) -> Tensor:
    """[3, num_new] int64: token at absolute index i (prompt + generated) gets i + mrope_delta on all axes."""
    for name, value in (("num_computed_tokens", num_computed_tokens), ("num_new", num_new)):
        if not isinstance(value, int) or value < 0:
            raise PromptError(f"{name} must be an int >= 0, got {value!r}")
    if not isinstance(mrope_delta, int):
        raise PromptError(f"mrope_delta must be an int, got {mrope_delta!r}")
    start = num_computed_tokens + mrope_delta
    return torch.arange(start, start + num_new, dtype=torch.int64).expand(3, -1).contiguous()


# ---- internals -----------------------------------------------------------------------------


class _Groups:
    """The vision groups of one prompt: maximal runs of equal non-zero type (HF's groupby)."""

    def __init__(self, start: Tensor, length: Tensor, kind: Tensor) -> None:
        self.start, self.length, self.kind = start, length, kind  # [G] each
        g = torch.arange(len(start))
        self.token_group = torch.repeat_interleave(g, length)  # [Nv]: group of each vision token
        first = torch.cumsum(length, 0) - length
        self.token_local = torch.arange(len(self.token_group)) - first[self.token_group]  # [Nv]
        self.token_kind = kind[self.token_group]

    @classmethod
    def find(cls, types: Tensor) -> _Groups:
        n = types.numel()
        change = torch.nonzero(types[1:] != types[:-1]).reshape(-1) + 1
        run_start = torch.cat([torch.zeros(1, dtype=torch.int64), change])
        run_end = torch.cat([change, torch.tensor([n])])
        run_kind = types[run_start]
        vision = run_kind != 0
        return cls(run_start[vision], (run_end - run_start)[vision], run_kind[vision])

    def attach_grids(
        self, images: Tensor, videos: Tensor, m: int, frame_of: tuple[Tensor, Tensor] | None = None
    ) -> Tensor:
        """Give each group its grid row in document order -> [G, 3]; refuse any count or size mismatch.

        `frame_of=(video_grid_thw, video index of each frame)`: `videos` are GLM frames (t=1 rows),
        and messages name the frame.
        """
        thw = torch.empty(len(self.kind), 3, dtype=torch.int64)
        for kind, grids in ((1, images), (2, videos)):
            is_kind = self.kind == kind
            count = int(is_kind.sum())
            unit = "frame" if kind == 2 and frame_of is not None else _KIND[kind]
            if count != len(grids):
                what = "video frames (sum of t over video_grid_thw)" if unit == "frame" else f"{unit} grids"
                raise PromptError(
                    f"the prompt has {count} {_KIND[kind]} placeholder runs but there are {len(grids)} "
                    f"{what}; every {unit} needs exactly one unbroken run of placeholder tokens, "
                    "and every run needs a media item"
                )
            thw[is_kind] = grids
        expected = thw[:, 0] * (thw[:, 1] // m) * (thw[:, 2] // m)
        bad = expected != self.length
        if bool(bad.any()):
            self._refuse_length(int(bad.nonzero()[0]), int(expected[bad][0]), thw, m, frame_of)
        return thw

    def _refuse_length(self, g: int, expected: int, thw: Tensor, m: int, frame_of: tuple | None) -> None:
        kind = int(self.kind[g])
        item = int((self.kind[: g + 1] == kind).sum()) - 1
        grid = thw[g].tolist()
        if kind == 2 and frame_of is not None:
            videos, frame_video = frame_of
            v = int(frame_video[item])
            frame = item - int((frame_video < v).sum())
            name = f"video {v} frame {frame} (video_grid_thw {videos[v].tolist()}, per frame h*w/m²)"
        else:
            name = f"{_KIND[kind]} {item} ({_KIND[kind]}_grid_thw {grid}, t*h*w/m²)"
        raise PromptError(
            f"{name} needs {expected} placeholder tokens with spatial_merge_size {m}, but its run "
            f"starting at token {int(self.start[g])} has {int(self.length[g])}"
        )


def _offsets(groups: _Groups, thw: Tensor, m: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per vision token: frame index k (t-major), row y, column x; per group max(H, W)."""
    h, w = thw[:, 1] // m, thw[:, 2] // m
    hw_tok = (h * w)[groups.token_group]
    w_tok = w[groups.token_group]
    local = groups.token_local
    k = torch.div(local, hw_tok, rounding_mode="floor")
    rem = local - k * hw_tok
    y = torch.div(rem, w_tok, rounding_mode="floor")
    return k, y, rem - y * w_tok, torch.maximum(h, w)


def _assemble(
    n: int, groups: _Groups, t_off: Tensor, y: Tensor, x: Tensor, advance: Tensor
) -> tuple[Tensor, int]:
    """Text token i sits at i + (advance - length summed over earlier groups); vision tokens at s_g + offsets."""
    gap = advance - groups.length  # how far each group moves the running start beyond its length
    step = torch.zeros(n + 1, dtype=torch.int64)
    step.index_add_(0, groups.start + groups.length, gap)
    base = torch.arange(n, dtype=torch.int64)
    base += torch.cumsum(step[:n], 0)
    positions = base.expand(3, n).contiguous()
    if len(groups.token_group):
        group_s = groups.start + torch.cumsum(gap, 0) - gap  # running start s of each group
        s = group_s[groups.token_group]
        index = groups.start[groups.token_group] + groups.token_local
        positions[:, index] = s + torch.stack([t_off, y, x])
    return positions, int(positions.max()) + 1 - n


def _as_ids(input_ids: Tensor) -> Tensor:
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 1:
        shape = tuple(input_ids.shape) if isinstance(input_ids, Tensor) else type(input_ids).__name__
        raise PromptError(f"input_ids must be a 1-D tensor [T] for one sequence, got {shape}")
    return input_ids.cpu()


def _check_types(mm_token_types: Tensor) -> Tensor:
    types = _as_ids(mm_token_types).to(torch.int64)
    if types.numel() == 0:
        raise PromptError("the prompt has no tokens; M-RoPE positions need at least one")
    bad = (types < 0) | (types > 2)
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise PromptError(f"mm_token_types[{i}] = {int(types[i])}; allowed are 0 text, 1 image, 2 video")
    return types


def _check_merge(spatial_merge_size: int) -> int:
    if not isinstance(spatial_merge_size, int) or spatial_merge_size < 1:
        raise PromptError(f"spatial_merge_size must be an int >= 1, got {spatial_merge_size!r}")
    return spatial_merge_size


def _check_grid(grid_thw: Tensor | None, name: str, m: int) -> Tensor:
    """None or [N, 3] positive ints with h, w divisible by m -> [N, 3] int64 CPU."""
    if grid_thw is None:
        return torch.empty(0, 3, dtype=torch.int64)
    grid = torch.as_tensor(grid_thw)
    if grid.dim() != 2 or grid.shape[1] != 3 or grid.is_floating_point() or grid.is_complex():
        raise PromptError(
            f"{name} must be an integer tensor [N, 3] of (t, h, w), got {tuple(grid.shape)} {grid.dtype}"
        )
    grid = grid.cpu().to(torch.int64)
    bad = (grid < 1).any(1) | (grid[:, 1:] % m != 0).any(1)
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise PromptError(
            f"{name}[{i}] = {grid[i].tolist()}: t, h, w must be >= 1 and h, w multiples of "
            f"spatial_merge_size {m}"
        )
    return grid
