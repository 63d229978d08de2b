"""Step 7 of the data path: M-RoPE position ids for one prompt, as pure functions.

`*_mm_token_types` map `[T]` input_ids to `[T]` int64 modality types (0 text, 1 image, 2 video);
`glm_mrope_positions` / `qwen_mrope_positions` map those types plus `grid_thw` rows to
`([3, T] int64 positions, mrope_delta)`; `decode_positions` gives `[3, n]` ids after the prompt.
Spec: parity-spec §3.4 and §4. Groups are found from the non-text tokens; nothing loops per token.
Each group's block is written in one NumPy call from a cached per-frame-size table, text per segment
(vectorized past `_LOOPED_SEGMENTS`): ~0.1 ms at 128k tokens, ~2 us per group beyond that.
"""

from __future__ import annotations

import functools
import math
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from glimpse.errors import PromptError

# The per-token work runs in NumPy on zero-copy views of the CPU tensors. NumPy is single-threaded;
# torch's intra-op-parallel CPU kernels (nonzero, arange, large copies) were measured to stall for
# milliseconds when the cores are shared, which would swamp the ~0.2 ms this takes at 128k tokens.

_KIND = {1: "image", 2: "video"}


# ---- modality types (§3.4) -----------------------------------------------------------------


def glm_mm_token_types(
    input_ids: Tensor, image_token_id: int, video_start_token_id: int, video_end_token_id: int
) -> Tensor:
    """[T] ids -> [T] int64. GLM uses `<|image|>` for both media; it is a video slot inside
    `<|begin_of_video|> … <|end_of_video|>` (HF: cumsum(start) > cumsum(end) at that position)."""
    ids = _as_ids(input_ids, "input_ids")
    opened = np.cumsum(ids == video_start_token_id)
    closed = np.cumsum(ids == video_end_token_id)
    types = (ids == image_token_id).astype(np.int64)
    types += types * (opened > closed)
    return torch.from_numpy(types)


def qwen_mm_token_types(input_ids: Tensor, image_token_id: int, video_token_id: int) -> Tensor:
    """[T] ids -> [T] int64: 1 for `<|image_pad|>`, 2 for `<|video_pad|>`, 0 otherwise."""
    ids = _as_ids(input_ids, "input_ids")
    types = (ids == image_token_id).astype(np.int64)
    types[ids == video_token_id] = 2
    return torch.from_numpy(types)


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
    num_frames = sum(t for t, _, _ in videos)
    if num_frames > len(types):  # each frame needs a token; refuse before listing absurd counts
        raise PromptError(
            f"video_grid_thw holds {num_frames} frames in all, but the prompt has only {len(types)} tokens; "
            "every frame needs its own run of placeholder tokens"
        )
    frames = [(1, h, w) for t, h, w in videos for _ in range(t)]
    groups = _Groups(types, images, frames, m, glm_videos=videos)
    return groups.assemble(groups.hw_max)


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
    if not isinstance(tokens_per_second, (int, float)) or not (
        math.isfinite(tokens_per_second) and tokens_per_second >= 0
    ):
        raise PromptError(
            f"tokens_per_second must be a finite number >= 0, got {tokens_per_second!r} "
            "(checkpoint config vision_config.tokens_per_second)"
        )
    types = _check_types(mm_token_types)
    m = _check_merge(spatial_merge_size)
    images = _check_grid(image_grid_thw, "image_grid_thw", m)
    videos = _check_grid(video_grid_thw, "video_grid_thw", m)
    time_interval = _time_interval(second_per_grid_ts, tokens_per_second, len(videos))
    groups = _Groups(types, images, videos, m)
    # Each video's frame k sits at t = trunc(k * interval), HF's dtype and rounding (_frame_times).
    videos_in_order = [g for g, kind in enumerate(groups.kind) if kind == 2]
    frame_t = {g: _frame_times(groups.t[g], time_interval, v) for v, g in enumerate(videos_in_order)}
    if video_rule == "hf":
        return groups.assemble(groups.hw_max, frame_t)
    # max over the group of its (t, y, x) offsets, + 1; t grows with k, so the last frame holds it
    last_t = [int(frame_t[g][-1]) if g in frame_t else t - 1 for g, t in enumerate(groups.t)]
    return groups.assemble([max(hw, lt + 1) for hw, lt in zip(groups.hw_max, last_t, strict=True)], frame_t)


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
    """The vision groups of one prompt, matched to their grid rows.

    A group is a maximal run of equal non-zero type (HF's groupby). Per group, as Python lists in
    prompt order (a prompt has few groups; a long GLM video has one per frame): `start`, `length`,
    `kind`, `t` (frames), `h`, `w` (after the merge) and `hw_max` = max(h, w).
    """

    def __init__(
        self, types: np.ndarray, image_rows: list, video_rows: list, m: int, glm_videos: list | None = None
    ) -> None:
        """`image_rows`/`video_rows`: [t, h, w] grid rows in prompt order. `glm_videos`: GLM's video
        grid rows when `video_rows` are their frames (t = 1 each), so that errors name the frame."""
        n = len(types)
        index = (types != 0).nonzero()[0]  # the vision tokens, in order
        kind = types[index]
        if (kind.view(np.uint64) > 2).any():  # a negative type is huge as uint64: one test for both ends
            i = int(index[(kind < 0) | (kind > 2)][0])
            raise PromptError(f"mm_token_types[{i}] = {int(types[i])}; allowed are 0 text, 1 image, 2 video")
        apart = index[1:] != index[:-1] + 1  # vision tokens i and i+1 are not neighbours
        head = np.ones(len(index), dtype=bool)  # a vision token that starts a group
        head[1:] = apart | (kind[1:] != kind[:-1])
        first = head.nonzero()[0]
        self.n = n
        self.start, self.kind = index[first].tolist(), kind[first].tolist()
        heads = first.tolist()
        ends = [*heads[1:], len(index)] if heads else []
        self.length = [b - a for a, b in zip(heads, ends, strict=True)]
        # The last text token: the one before the trailing block of vision tokens (-1: no text).
        if len(index) == 0 or index[-1] != n - 1:
            self.last_text = n - 1
        else:
            breaks = apart.nonzero()[0]
            self.last_text = int(index[breaks[-1] + 1 if len(breaks) else 0]) - 1
        self._match_grids(image_rows, video_rows, m, glm_videos)

    def _match_grids(self, image_rows: list, video_rows: list, m: int, glm_videos: list | None) -> None:
        """Give each group its grid row (the next unused one of its kind); refuse any count or size mismatch."""
        rows = {1: image_rows, 2: video_rows}
        for kind in (1, 2):
            count = self.kind.count(kind)
            if count != len(rows[kind]):
                unit = "frame" if kind == 2 and glm_videos is not None else _KIND[kind]
                what = "video frame(s) (sum of t over video_grid_thw)" if unit == "frame" else f"{unit} grid(s)"
                raise PromptError(
                    f"the prompt has {count} {_KIND[kind]} placeholder run(s) but there are "
                    f"{len(rows[kind])} {what}; every {unit} needs exactly one unbroken run of placeholder "
                    "tokens (text between runs of the same kind), and every run needs a media item"
                )
        used = {1: 0, 2: 0}
        self.t, self.h, self.w, self.hw_max = [], [], [], []
        for g, kind in enumerate(self.kind):
            item = used[kind]
            used[kind] += 1
            t, h, w = rows[kind][item]
            expected = t * (h // m) * (w // m)
            if expected != self.length[g]:
                self._refuse_length(g, item, [t, h, w], expected, m, glm_videos)
            self.t.append(t)
            self.h.append(h // m)
            self.w.append(w // m)
            self.hw_max.append(max(h, w) // m)

    def _refuse_length(self, g: int, item: int, thw: list, expected: int, m: int, glm_videos: list | None) -> None:
        kind = self.kind[g]
        if kind == 2 and glm_videos is not None:
            v, frame = 0, item  # item counts frames over all videos
            while frame >= glm_videos[v][0]:
                frame -= glm_videos[v][0]
                v += 1
            name = f"video {v} frame {frame} (video_grid_thw {glm_videos[v]}, per frame h*w/m²)"
        else:
            name = f"{_KIND[kind]} {item} ({_KIND[kind]}_grid_thw {thw}, t*h*w/m²)"
        raise PromptError(
            f"{name} needs {expected} placeholder tokens with spatial_merge_size {m}, but its run "
            f"starting at token {self.start[g]} has {self.length[g]}"
        )

    def assemble(self, advance: list[int], frame_t: dict[int, np.ndarray] | None = None) -> tuple[Tensor, int]:
        """-> ([3, T] positions, delta). `advance` [G]: how far each group moves the running start s;
        `frame_t`: group -> [t] t offsets of its frames where they are not 0, 1, 2, ... (Qwen's
        scaled video time). Text token i sits at i plus (advance - length) summed over the groups
        before it; vision token (k, y, x) of a group at its s plus (t offset of frame k, y, x)."""
        n = self.n
        positions = np.empty((3, n), dtype=np.int64)
        base = positions[0]
        # Text: segment j = [start of group j-1, start of group j), shifted by the groups before it.
        # Its vision tokens get the same values here and are overwritten below.
        running, shift = [], 0  # running start s of each group; shift of the text after it
        offsets = [0]
        for start, length, adv in zip(self.start, self.length, advance, strict=True):
            running.append(start + shift)
            shift += adv - length
            offsets.append(shift)
        bounds = [0, *self.start, n]
        indices = _arange(n)
        if len(offsets) <= _LOOPED_SEGMENTS:
            for a, b, offset in zip(bounds[:-1], bounds[1:], offsets, strict=True):
                np.add(indices[a:b], offset, out=base[a:b])
                positions[1:, a:b] = base[a:b]  # while the segment is still in the cache
        else:
            np.add(indices, np.repeat(offsets, np.diff(bounds)), out=base)
            positions[1:] = base
        # Text positions strictly increase (every group advances s by >= 1): the last is their max.
        top = int(base[self.last_text]) if self.last_text >= 0 else -1
        frame_t = frame_t or {}
        for g, (start, s) in enumerate(zip(self.start, running, strict=True)):
            t, h, w = self.t[g], self.h[g], self.w[g]
            table = _frame_offsets(h, w)  # (0, y, x) of one frame
            if t == 1:
                np.add(table, s, out=positions[:, start : start + h * w])
                last_t = 0
            else:
                block = positions[:, start : start + t * h * w].reshape(3, t, h * w)
                np.add(table[:, None], s, out=block)
                times = frame_t[g] if g in frame_t else _arange(t)
                np.add(block[0], times[:, None], out=block[0])
                last_t = int(times[-1])
            top = max(top, s + max(last_t, h - 1, w - 1))
        return torch.from_numpy(positions), top + 1 - n


@functools.lru_cache(maxsize=64)
def _frame_offsets(h: int, w: int) -> np.ndarray:
    """[3, h*w] read-only (0, y, x) of one frame's tokens in row-major order. Cached: few distinct
    sizes recur (at most 64 kept; the largest real frames are ~400 KB)."""
    table = np.zeros((3, h * w), dtype=np.int64)
    table[1] = np.repeat(np.arange(h), w)
    table[2] = np.tile(np.arange(w), h)
    table.flags.writeable = False
    return table


# Up to this many text segments, positions are written segment by segment (fewer passes over T);
# beyond (long GLM videos: a group per frame), in one vectorized pass.
_LOOPED_SEGMENTS = 32
_ARANGE = np.arange(0)


def _arange(n: int) -> np.ndarray:
    """np.arange(n) as a read-only view of a cached, growing array: writing 0..n-1 costs as much as
    the whole position fill, and every call needs it. Safe across threads: each call works on its
    own reference, and the cache is only ever replaced by a longer array."""
    global _ARANGE
    cached = _ARANGE
    if len(cached) < n:
        cached = np.arange(max(n, 2 * len(cached)), dtype=np.int64)
        cached.flags.writeable = False
        if len(cached) > len(_ARANGE):
            _ARANGE = cached
    return cached[:n]


def _time_interval(second_per_grid_ts: Tensor | None, tokens_per_second: float, num_videos: int) -> Tensor:
    """[num_videos] tokens_per_second * second_per_grid_ts, with HF's operands and so HF's dtype.

    HF multiplies by one element of `second_per_grid_ts`, or by the int 1 when it is absent; the
    same multiply on the whole vector gives the same value and dtype per video.
    """
    if second_per_grid_ts is None:
        return tokens_per_second * torch.ones(num_videos, dtype=torch.int64)
    spg = torch.as_tensor(second_per_grid_ts).cpu().reshape(-1)
    if spg.numel() != num_videos:
        raise PromptError(
            f"second_per_grid_ts has {spg.numel()} entries but video_grid_thw has {num_videos} "
            "videos; pass one entry per video"
        )
    for i, value in enumerate(spg.double().tolist()):  # one per video: few
        if not (math.isfinite(value) and value >= 0):
            raise PromptError(f"second_per_grid_ts[{i}] = {value} must be a finite number >= 0")
    return tokens_per_second * spg


def _frame_times(t: int, time_interval: Tensor, video: int) -> np.ndarray:
    """[t] int64 trunc(k * time_interval[video]) for frames k = 0..t-1, k cast to the interval's dtype
    first, exactly as HF's `(arange(t) * time_interval).long()` rounds (float32 for a float32
    second_per_grid_ts)."""
    if time_interval.dtype in (torch.float32, torch.float64, torch.int64):
        interval = time_interval.numpy()  # NumPy multiplies and truncates these dtypes like torch
        return (np.arange(t, dtype=interval.dtype) * interval[video]).astype(np.int64)
    k = torch.arange(t).to(time_interval.dtype)  # e.g. bfloat16 after BatchFeature.to(dtype)
    return (k * time_interval[video]).long().numpy()


def _as_ids(tensor: Tensor, name: str) -> np.ndarray:
    """[T] integer tensor -> [T] int64 ndarray (a view when already int64 on CPU)."""
    if (
        not isinstance(tensor, Tensor)
        or tensor.dim() != 1
        or tensor.is_floating_point()
        or tensor.is_complex()
    ):
        what = (
            f"{tuple(tensor.shape)} {tensor.dtype}" if isinstance(tensor, Tensor) else type(tensor).__name__
        )
        raise PromptError(f"{name} must be a 1-D integer tensor [T] for one sequence, got {what}")
    if tensor.dtype != torch.int64 or tensor.device.type != "cpu":
        tensor = tensor.cpu().to(torch.int64)
    return tensor.numpy()  # integer tensors never require grad


def _check_types(mm_token_types: Tensor) -> np.ndarray:
    types = _as_ids(mm_token_types, "mm_token_types")
    if len(types) == 0:
        raise PromptError("the prompt has no tokens; M-RoPE positions need at least one")
    return types


def _check_merge(spatial_merge_size: int) -> int:
    if not isinstance(spatial_merge_size, int) or spatial_merge_size < 1:
        raise PromptError(f"spatial_merge_size must be an int >= 1, got {spatial_merge_size!r}")
    return spatial_merge_size


def _check_grid(grid_thw: Tensor | None, name: str, m: int) -> list[list[int]]:
    """None or [N, 3] positive ints with h, w divisible by m -> N [t, h, w] rows."""
    if grid_thw is None:
        return []
    grid = torch.as_tensor(grid_thw)
    if grid.dim() != 2 or grid.shape[1] != 3 or grid.is_floating_point() or grid.is_complex():
        raise PromptError(
            f"{name} must be an integer tensor [N, 3] of (t, h, w), got {tuple(grid.shape)} {grid.dtype}"
        )
    rows = grid.to(torch.int64).tolist()
    for i, (t, h, w) in enumerate(rows):  # one row per item: few, and Python is quicker here
        if t < 1 or h < 1 or w < 1 or h % m or w % m:
            raise PromptError(
                f"{name}[{i}] = {[t, h, w]}: t, h, w must be >= 1 and h, w multiples of "
                f"spatial_merge_size {m}"
            )
    return rows
