"""Step 7 of the data path: M-RoPE position ids for one prompt, as pure functions.

`*_mm_token_types` map `[T]` input_ids to `[T]` int64 modality types (0 text, 1 image, 2 video);
`glm_mrope_positions` / `qwen_mrope_positions` map those types plus `grid_thw` rows to
`([3, T] int64 positions, mrope_delta)`; `decode_positions` gives `[3, n]` ids after the prompt.
Spec: parity-spec §3.4 and §4. Groups are found from the non-text tokens; nothing loops per token, and
text is written per segment (vectorized past `_LOOPED_SEGMENTS`).
"""

from __future__ import annotations

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
    frame_video = np.repeat(np.arange(len(videos)), videos[:, 0])  # video index of each frame
    frames = videos[frame_video]
    frames[:, 0] = 1
    groups = _Groups(types, images, frames, m, frame_of=(videos, frame_video))
    return groups.assemble(groups.k, advance=groups.hw_max)


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
    if not len(videos):
        return groups.assemble(groups.k, advance=groups.hw_max)

    is_video = groups.kind == 2
    video_of_group = np.cumsum(is_video) - 1
    video_tok = np.repeat(is_video, groups.length)
    t_off = groups.k.copy()
    t_off[video_tok] = _scaled(t_off[video_tok], time_interval, video_of_group[groups.token_group[video_tok]])
    if video_rule == "hf":
        return groups.assemble(t_off, advance=groups.hw_max)
    # max over the group of its (t, y, x) offsets, + 1; t grows with k, so the last frame holds it
    t_max = groups.thw[:, 0] - 1
    t_max[is_video] = _scaled(t_max[is_video], time_interval, video_of_group[is_video])
    return groups.assemble(t_off, advance=np.maximum(groups.hw_max, t_max + 1))


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
    """The vision groups of one prompt, matched to their grid rows, and each vision token's place.

    A group is a maximal run of equal non-zero type (HF's groupby). Per group [G]: `start`,
    `length`, `kind`, `thw`, `hw_max` = max(H, W). Per vision token [Nv], in prompt order: `index`
    (its place in the prompt), `token_group`, and its offsets `k` (frame), `y` (row), `x` (column).
    """

    def __init__(
        self, types: np.ndarray, images: np.ndarray, videos: np.ndarray, m: int, frame_of: tuple | None = None
    ) -> None:
        n = len(types)
        index = (types != 0).nonzero()[0]  # the vision tokens, in order
        kind = types[index]
        if len(index) and (kind.min() < 0 or kind.max() > 2):
            i = int(index[(kind < 0) | (kind > 2)][0])
            raise PromptError(f"mm_token_types[{i}] = {int(types[i])}; allowed are 0 text, 1 image, 2 video")
        apart = index[1:] != index[:-1] + 1  # vision tokens i and i+1 are not neighbours
        head = np.ones(len(index), dtype=bool)  # a vision token that starts a group
        head[1:] = apart | (kind[1:] != kind[:-1])
        first = head.nonzero()[0]
        self.n = n
        self.index = index
        self.start, self.kind = index[first], kind[first]
        self.length = np.append(first[1:], len(index)) - first
        # The last text token: the one before the trailing block of vision tokens (-1: no text).
        if len(index) == 0 or index[-1] != n - 1:
            self.last_text = n - 1
        else:
            breaks = np.flatnonzero(apart)
            self.last_text = int(index[breaks[-1] + 1 if len(breaks) else 0]) - 1
        self.thw = self._match_grids(images, videos, m, frame_of)

        h, w = self.thw[:, 1] // m, self.thw[:, 2] // m
        self.hw_max = np.maximum(h, w)
        self.token_group = np.repeat(np.arange(len(self.start)), self.length)
        local = np.arange(len(index)) - first[self.token_group]
        self.k, rem = np.divmod(local, (h * w)[self.token_group])
        self.y, self.x = np.divmod(rem, w[self.token_group])

    def _match_grids(
        self, images: np.ndarray, videos: np.ndarray, m: int, frame_of: tuple | None
    ) -> np.ndarray:
        """Grid row of each group in document order -> [G, 3]; refuse any count or size mismatch.

        `frame_of=(video_grid_thw, video index of each frame)`: `videos` are GLM frames (t=1 rows),
        and messages name the frame.
        """
        thw = np.empty((len(self.kind), 3), dtype=np.int64)
        counts = np.bincount(self.kind, minlength=3).tolist()
        for kind, grids in ((1, images), (2, videos)):
            if counts[kind] != len(grids):
                unit = "frame" if kind == 2 and frame_of is not None else _KIND[kind]
                what = (
                    "video frame(s) (sum of t over video_grid_thw)" if unit == "frame" else f"{unit} grid(s)"
                )
                raise PromptError(
                    f"the prompt has {counts[kind]} {_KIND[kind]} placeholder run(s) but there are "
                    f"{len(grids)} {what}; every {unit} needs exactly one unbroken run of placeholder "
                    "tokens (text between runs of the same kind), and every run needs a media item"
                )
            if counts[kind]:
                thw[self.kind == kind] = grids
        expected = thw[:, 0] * (thw[:, 1] // m) * (thw[:, 2] // m)
        if not np.array_equal(expected, self.length):
            bad = int((expected != self.length).nonzero()[0][0])
            self._refuse_length(bad, int(expected[bad]), thw, m, frame_of)
        return thw

    def _refuse_length(self, g: int, expected: int, thw: np.ndarray, m: int, frame_of: tuple | None) -> None:
        kind = int(self.kind[g])
        item = int((self.kind[: g + 1] == kind).sum()) - 1
        if kind == 2 and frame_of is not None:
            videos, frame_video = frame_of
            v = int(frame_video[item])
            frame = item - int((frame_video < v).sum())
            name = f"video {v} frame {frame} (video_grid_thw {videos[v].tolist()}, per frame h*w/m²)"
        else:
            name = f"{_KIND[kind]} {item} ({_KIND[kind]}_grid_thw {thw[g].tolist()}, t*h*w/m²)"
        raise PromptError(
            f"{name} needs {expected} placeholder tokens with spatial_merge_size {m}, but its run "
            f"starting at token {int(self.start[g])} has {int(self.length[g])}"
        )

    def assemble(self, t_off: np.ndarray, advance: np.ndarray) -> tuple[Tensor, int]:
        """-> ([3, T] positions, delta). `t_off` [Nv]: each vision token's t offset; `advance` [G]: how
        far each group moves the running start s. Text token i sits at i plus (advance - length)
        summed over the groups before it; a vision token at its group's s plus (t_off, y, x)."""
        n = self.n
        gap = advance - self.length
        shift = np.cumsum(gap)  # how far the text after group g sits from its own index
        positions = np.empty((3, n), dtype=np.int64)
        base = positions[0]
        # Text token i sits at i + shift of the groups before it. Vision tokens get the same here
        # and are overwritten below. Segment j = [start of group j-1, start of group j).
        bounds = np.concatenate(([0], self.start, [n]))
        offsets = np.concatenate(([0], shift))
        indices = _arange(n)
        if len(offsets) <= _LOOPED_SEGMENTS:
            for a, b, offset in zip(bounds[:-1].tolist(), bounds[1:].tolist(), offsets.tolist(), strict=True):
                np.add(indices[a:b], offset, out=base[a:b])
        else:
            np.add(indices, np.repeat(offsets, np.diff(bounds)), out=base)
        positions[1:] = base
        # Text positions strictly increase (every group advances s by >= 1): the last is their max.
        top = int(base[self.last_text]) if self.last_text >= 0 else -1
        if len(self.index):
            vision = np.array((t_off, self.y, self.x))
            vision += (self.start + shift - gap)[self.token_group]  # + running start s
            positions[:, self.index] = vision
            top = max(top, int(vision.max()))
        return torch.from_numpy(positions), top + 1 - n


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
    values = spg.double().numpy()
    if not (np.isfinite(values).all() and (values >= 0).all()):
        i = int(np.flatnonzero(~(np.isfinite(values) & (values >= 0)))[0])
        raise PromptError(f"second_per_grid_ts[{i}] = {values[i]} must be a finite number >= 0")
    return tokens_per_second * spg


def _scaled(k: np.ndarray, time_interval: Tensor, video: np.ndarray) -> np.ndarray:
    """trunc(k * time_interval[video]) elementwise, k cast to the interval's dtype first, exactly as
    HF's `(arange(t) * time_interval).long()` rounds (float32 for a float32 second_per_grid_ts)."""
    if time_interval.dtype in (torch.float32, torch.float64, torch.int64):
        interval = time_interval.numpy()  # NumPy multiplies and truncates these dtypes like torch
        return (k.astype(interval.dtype) * interval[video]).astype(np.int64)
    k_t = torch.from_numpy(k).to(time_interval.dtype)  # e.g. bfloat16 after BatchFeature.to(dtype)
    return (k_t * time_interval[torch.from_numpy(video)]).long().numpy()


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
    return tensor.detach().cpu().to(torch.int64).numpy()


def _check_types(mm_token_types: Tensor) -> np.ndarray:
    types = _as_ids(mm_token_types, "mm_token_types")
    if len(types) == 0:
        raise PromptError("the prompt has no tokens; M-RoPE positions need at least one")
    return types


def _check_merge(spatial_merge_size: int) -> int:
    if not isinstance(spatial_merge_size, int) or spatial_merge_size < 1:
        raise PromptError(f"spatial_merge_size must be an int >= 1, got {spatial_merge_size!r}")
    return spatial_merge_size


def _check_grid(grid_thw: Tensor | None, name: str, m: int) -> np.ndarray:
    """None or [N, 3] positive ints with h, w divisible by m -> [N, 3] int64 ndarray."""
    if grid_thw is None:
        return np.empty((0, 3), dtype=np.int64)
    grid = torch.as_tensor(grid_thw)
    if grid.dim() != 2 or grid.shape[1] != 3 or grid.is_floating_point() or grid.is_complex():
        raise PromptError(
            f"{name} must be an integer tensor [N, 3] of (t, h, w), got {tuple(grid.shape)} {grid.dtype}"
        )
    grid = grid.cpu().to(torch.int64).numpy()
    for i, (t, h, w) in enumerate(grid.tolist()):  # one row per item: few, and Python is quicker here
        if t < 1 or h < 1 or w < 1 or h % m or w % m:
            raise PromptError(
                f"{name}[{i}] = {[t, h, w]}: t, h, w must be >= 1 and h, w multiples of "
                f"spatial_merge_size {m}"
            )
    return grid
