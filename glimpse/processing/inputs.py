"""What processing hands to the engine: token ids plus one `MediaItem` per image or video.

A `ProcessedPrompt` is also a read-only mapping with HF's processor keys (`input_ids`,
`pixel_values`, `image_grid_thw`, `pixel_values_videos`, `video_grid_thw`,
`second_per_grid_ts`), so it compares directly with HF's output and feeds `compute_logits`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Literal

import torch


@dataclass(frozen=True, eq=False)
class MediaItem:
    """One image or video after preprocessing and placement in the prompt.

    pixel_values: [t*h*w, C*Tp*P*P] float32; grid_thw: (t, h, w) in patches; spans: token index
    ranges [start, end) of its embedding slots in input_ids, in order (GLM video: one per
    temporal frame); num_tokens: embeddings it needs (= t*h*w / merge^2, or EVS's retained count).
    """

    kind: Literal["image", "video"]
    pixel_values: torch.Tensor = field(repr=False)
    grid_thw: tuple[int, int, int]
    spans: tuple[tuple[int, int], ...]
    num_tokens: int
    content_hash: str
    second_per_grid_t: float | None = None  # Qwen2.5-VL video only
    timestamps: tuple[float, ...] = ()  # seconds of each temporal frame (videos)
    frame_indices: tuple[int, ...] = ()  # source frames sampled (videos)
    pruning_rate: float = 0.0  # EVS (Qwen2.5-VL video): > 0 keeps only `num_tokens` of its embeddings
    unpruned_tokens: int | None = None  # EVS: embeddings the encoder makes (t*h*w / merge^2) before pruning

    @property
    def start(self) -> int:
        return self.spans[0][0]

    @property
    def end(self) -> int:
        return self.spans[-1][1]

    @property
    def num_encoded_tokens(self) -> int:
        """Embeddings the vision encoder makes for this item (before any EVS pruning)."""
        return self.num_tokens if self.unpruned_tokens is None else self.unpruned_tokens


def content_hash(kind: str, pixel_values: torch.Tensor, grid_thw, second_per_grid_t: float | None = None,
                 pruning_rate: float = 0.0) -> str:  # fmt: skip
    """Hash of everything that determines an item's embeddings and positions (EVS rate included)."""
    h = hashlib.sha256()
    h.update(f"{kind}|{tuple(int(x) for x in grid_thw)}|{second_per_grid_t}|{pixel_values.dtype}|".encode())
    if pruning_rate:  # unpruned items keep the hash they always had
        h.update(f"evs={float(pruning_rate)!r}|".encode())
    h.update(pixel_values.contiguous().view(torch.uint8).numpy())  # the buffer itself, no copy
    return h.hexdigest()


@dataclass(frozen=True, eq=False)
class ProcessedPrompt(Mapping):
    """Token ids and media of one prompt; a mapping with the HF processor's keys."""

    input_ids: list[int]
    media: tuple[MediaItem, ...] = ()
    text: str | None = None  # the rendered prompt before expansion, when known

    @property
    def images(self) -> tuple[MediaItem, ...]:
        return tuple(m for m in self.media if m.kind == "image")

    @property
    def videos(self) -> tuple[MediaItem, ...]:
        return tuple(m for m in self.media if m.kind == "video")

    @property
    def media_token_counts(self) -> list[dict]:
        """Per-item token cost, for `usage` reporting."""
        return [{"type": m.kind, "tokens": m.num_tokens, "grid_thw": list(m.grid_thw)} for m in self.media]

    @cached_property
    def _hf(self) -> dict[str, torch.Tensor]:
        """HF's keys, built once (concatenating every item's pixels is not free)."""
        out = {"input_ids": torch.tensor([self.input_ids], dtype=torch.long)}
        for kind, pv_key, grid_key in (("image", "pixel_values", "image_grid_thw"),
                                       ("video", "pixel_values_videos", "video_grid_thw")):  # fmt: skip
            items = [m for m in self.media if m.kind == kind]
            if items:
                out[pv_key] = torch.cat([m.pixel_values for m in items])
                out[grid_key] = torch.tensor([m.grid_thw for m in items], dtype=torch.long)
        spg = [m.second_per_grid_t for m in self.videos if m.second_per_grid_t is not None]
        if spg:
            out["second_per_grid_ts"] = torch.tensor(spg, dtype=torch.float32)
        return out

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._hf[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._hf)

    def __len__(self) -> int:
        return len(self._hf)

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """The media keys for `model.compute_logits` / `model.greedy` (input_ids excluded)."""
        return {k: v for k, v in self._hf.items() if k != "input_ids"}
