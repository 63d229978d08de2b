"""Step 5 (vision encoder), packing: pending images and video frames -> batches that fit token budgets.

Pure functions of the grids. Budgets count merged (output) tokens; a budget B holds B*m^2 patch
rows and at most `Capacity.frames` attention segments. `plan_batches(grids, budgets, merge)`
returns `Batch`es of `Piece`s (a run of frames of one item, in the batch's row order) with the
budget each is padded to, or budget None for an item too large for every budget (run eagerly).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from glimpse.errors import InvalidInputError

MIN_BUDGET = 64  # smallest default budget, in merged tokens (one 224x224 image)


@dataclass(frozen=True)
class VisionItem:
    """One image or video as the processor made it: pixel_values [t*h*w, C*Tp*P*P], grid (t, h, w)."""

    kind: Literal["image", "video"]
    pixel_values: torch.Tensor
    grid_thw: tuple[int, int, int]


@dataclass(frozen=True)
class Piece:
    """Frames [first_frame, first_frame + frames) of item `item`; each frame (1, h, w) is one segment.

    Frames are independent in both towers (attention, windows and merge stay inside a frame),
    so a video may be split across batches at frame boundaries and re-joined exactly.
    """

    item: int
    first_frame: int
    frames: int
    h: int
    w: int
    frame_tokens: int  # h*w / m^2

    @property
    def tokens(self) -> int:
        return self.frames * self.frame_tokens

    def take(self, frames: int) -> tuple[Piece, Piece | None]:
        """Split off the first `frames` frames; returns (head, rest or None)."""
        head = Piece(self.item, self.first_frame, frames, self.h, self.w, self.frame_tokens)
        if frames == self.frames:
            return head, None
        rest = Piece(self.item, self.first_frame + frames, self.frames - frames, self.h, self.w, self.frame_tokens)
        return head, rest


@dataclass(frozen=True)
class Batch:
    """Pieces laid out back to back; `budget` is the captured size it runs in (None: eager, unpadded)."""

    pieces: tuple[Piece, ...]
    budget: int | None

    @property
    def tokens(self) -> int:
        return sum(p.tokens for p in self.pieces)

    @property
    def frames(self) -> int:
        return sum(p.frames for p in self.pieces)


@dataclass(frozen=True)
class Capacity:
    """Static sizes of one budget: merged tokens, patch rows (tokens * m^2) and attention segments."""

    tokens: int
    patches: int
    frames: int


def capacity(budget: int, merge: int, max_frames_per_batch: int | None) -> Capacity:
    """Every frame has >= 1 merged token, so a budget never holds more than `budget` frames."""
    frames = budget if max_frames_per_batch is None else min(budget, max_frames_per_batch)
    return Capacity(tokens=budget, patches=budget * merge * merge, frames=frames)


def default_budgets(max_num_batched_tokens: int) -> tuple[int, ...]:
    """Powers of two from MIN_BUDGET while <= max_num_batched_tokens, then the maximum itself."""
    if max_num_batched_tokens < 1:
        raise InvalidInputError(f"max_num_batched_tokens must be >= 1, got {max_num_batched_tokens}")
    budgets, b = [], MIN_BUDGET
    while b <= max_num_batched_tokens:
        budgets.append(b)
        b *= 2
    if not budgets or budgets[-1] != max_num_batched_tokens:
        budgets.append(max_num_batched_tokens)
    return tuple(budgets)


def check_budgets(budgets: Sequence[int]) -> tuple[int, ...]:
    """Sorted, de-duplicated budgets; refuses empty lists and non-positive values (--encoder-budgets)."""
    if not budgets:
        raise InvalidInputError("--encoder-budgets is empty; give at least one token budget (e.g. 64,128,256)")
    for b in budgets:
        if isinstance(b, bool) or not isinstance(b, int) or b < 1:
            raise InvalidInputError(f"--encoder-budgets entry {b!r} is not a positive integer token count")
    return tuple(sorted(set(budgets)))


def parse_budgets(text: str) -> tuple[int, ...]:
    """`--encoder-budgets 64,128,256` -> (64, 128, 256)."""
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        raise InvalidInputError(f"--encoder-budgets {text!r}: expected comma-separated integers") from None
    return check_budgets(values)


def check_limit(value: int | None, knob: str) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise InvalidInputError(f"{knob} must be a positive integer or None (no limit), got {value!r}")
    return value


def smallest_budget(tokens: int, budgets: Sequence[int]) -> int | None:
    """The smallest budget >= tokens, or None when none fits."""
    return next((b for b in budgets if b >= tokens), None)


def plan_batches(
    grids: Sequence[tuple[int, int, int]],
    budgets: Sequence[int],
    merge: int,
    max_items_per_batch: int | None = None,
    max_frames_per_batch: int | None = None,
) -> list[Batch]:
    """Pack items (grids in patch units) into batches that fit `budgets` (sorted, merged tokens).

    1. An item whose single frame exceeds the largest budget runs alone, eagerly (budget None).
    2. The rest go first-fit, largest frames first, into bins of the largest budget, at most
       `max_items_per_batch` pieces and `max_frames_per_batch` frames each; a video that does
       not fit whole continues in the next bin (split at a frame boundary).
    3. A bin that would be padded is split again when smaller budgets cost fewer rows than
       the padded one (e.g. 448 tokens run as 256 + 128 + 64, not padded to 512).
    """
    top = budgets[-1]
    eager, pending = [], []
    for i, (t, h, w) in enumerate(grids):
        piece = Piece(i, 0, t, h, w, (h // merge) * (w // merge))
        (eager if piece.frame_tokens > top else pending).append(piece)
    # Same-size frames end up adjacent, so attention runs them as one batched call.
    pending.sort(key=lambda p: (-p.frame_tokens, p.h, p.w, p.item))
    bins = _first_fit(pending, top, max_items_per_batch, max_frames_per_batch)
    batches = [b for pieces in bins for b in _fit_ladder(pieces, budgets)]
    return batches + [Batch((p,), None) for p in eager]


def _first_fit(
    pieces: list[Piece], top: int, max_items: int | None, max_frames: int | None
) -> list[list[Piece]]:
    bins: list[list[Piece]] = []
    room_tokens: list[int] = []
    room_frames: list[int] = []
    frame_cap = top if max_frames is None else max_frames
    for piece in pieces:
        rest: Piece | None = piece
        for b in range(len(bins)):
            if rest is None:
                break
            fit = min(rest.frames, room_frames[b], room_tokens[b] // rest.frame_tokens)
            if fit < 1 or (max_items is not None and len(bins[b]) >= max_items):
                continue
            head, rest = rest.take(fit)
            bins[b].append(head)
            room_tokens[b] -= head.tokens
            room_frames[b] -= head.frames
        while rest is not None:
            head, rest = rest.take(min(rest.frames, frame_cap, top // rest.frame_tokens))
            bins.append([head])
            room_tokens.append(top - head.tokens)
            room_frames.append(frame_cap - head.frames)
    return bins


def _fit_ladder(pieces: list[Piece], budgets: Sequence[int]) -> list[Batch]:
    """Run `pieces` in its smallest budget, or peel off a part that fills a smaller budget when cheaper."""
    tokens = sum(p.tokens for p in pieces)
    budget = smallest_budget(tokens, budgets)
    lower = [b for b in budgets if b < tokens]
    if budget == tokens or not lower:
        return [Batch(tuple(pieces), budget)]
    room = lower[-1]
    head: list[Piece] = []
    rest: list[Piece] = []
    for piece in pieces:  # greedy fill of `room`, splitting a video at a frame boundary
        fit = min(piece.frames, room // piece.frame_tokens)
        if fit < 1:
            rest.append(piece)
            continue
        taken, left = piece.take(fit)
        head.append(taken)
        room -= taken.tokens
        if left is not None:
            rest.append(left)
    if not head:
        return [Batch(tuple(pieces), budget)]
    split = [Batch(tuple(head), smallest_budget(sum(p.tokens for p in head), budgets)), *_fit_ladder(rest, budgets)]
    # padded rows are compute; an extra call is cheap next to them (CPU), so split when it saves rows
    return split if sum(b.budget for b in split) < budget else [Batch(tuple(pieces), budget)]
