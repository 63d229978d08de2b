"""Step 5 (vision encoder), execution: packed batches -> per-item embeddings through captured graphs.

`EncoderRunner(model, budgets, max_num_batched_tokens)` captures one static graph per budget at
start-up; `encode([VisionItem])` returns one [t*h*w / m^2, hidden] tensor per item, in input order.
How a graph is captured is the model's graph backend's (glimpse/backends: torch.compile on CPU,
one graph per budget, recompiles refused at replay; CUDA graphs, untested here).
Items larger than every budget, and graph=False, run the same static-shape tower eagerly, unpadded.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

import torch
import torch._dynamo
from torch._dynamo.utils import counters
from tqdm import tqdm

from glimpse.backends import Backends, backends_for, bind_backends
from glimpse.errors import InvalidInputError
from glimpse.models.base import VisionLanguageModel
from glimpse.vision.batching import (
    Batch,
    Capacity,
    Piece,
    VisionItem,
    capacity,
    check_budgets,
    check_limit,
    default_budgets,
    parse_budgets,
    plan_batches,
)


class VisionTower(Protocol):
    """What a family's `model.visual` offers the runner (glm4v.py and qwen2_5_vl.py implement it)."""

    def frame_tables(self, h: int, w: int) -> dict:
        """Tables of one (1, h, w) frame size, reused for every frame of that size (made once: vision/tables.py)."""

    def batch_metadata(
        self,
        grids: Sequence[tuple[int, int, int]],
        tables: Mapping[tuple[int, int], dict],
        capacity_patches: int | None = None,
        capacity_frames: int | None = None,
    ) -> dict[str, torch.Tensor]:
        """forward_static's tensors for items back to back, padded to the capacities when given."""

    def forward_static(self, pixel_values: torch.Tensor, **metadata: torch.Tensor) -> torch.Tensor:
        """[N, C*Tp*P*P] -> [N / m^2, hidden]; every shape depends on N alone."""


# Dynamo keys its graph cache on the tower's code object, shared by every runner of a family,
# so the per-code recompile limit (8 by default) must cover all budgets of all runners.
_RECOMPILE_LIMIT = 4096
# Compiling one budget's graph with a cold inductor cache: ~9 s on 2 cores for the tiny demo model (6 budgets: 53 s
# cold, 8 s warm), more for deeper towers. Off a terminal, a capture of this many graphs or more is announced.
ANNOUNCE_GRAPHS = 4


class EncoderRunner:
    """Budget batching + one captured graph per budget for a model's vision tower.

    budgets: merged-token budgets (None: powers of two from 64 up to max_num_batched_tokens,
    plus it). max_items_per_batch / max_frames_per_batch: packing limits (None: only the
    budget limits). graph: capture graphs (True) or run every batch eagerly (False).
    """

    def __init__(
        self,
        model: VisionLanguageModel,
        budgets: Sequence[int] | None,
        max_num_batched_tokens: int,
        max_items_per_batch: int | None = None,
        max_frames_per_batch: int | None = None,
        graph: bool = True,
    ) -> None:
        self.tower: VisionTower = model.model.visual
        self.merge = model.spatial_merge_size
        self.budgets = default_budgets(max_num_batched_tokens) if budgets is None else check_budgets(list(budgets))
        self.max_items_per_batch = check_limit(max_items_per_batch, "max_items_per_batch")
        self.max_frames_per_batch = check_limit(max_frames_per_batch, "max_frames_per_batch")
        weight = self.tower.patch_embed.proj.weight
        self.device, self.dtype = weight.device, weight.dtype
        self.patch_dim = weight[0].numel()
        self.backends = _bound_backends(model, weight)
        self.graph = graph
        self._graphs: dict[int, Callable[..., torch.Tensor]] = {}
        self.capture_seconds = 0.0
        self.compiled_graphs = 0
        if graph:
            self._capture()

    # ---- start-up ---------------------------------------------------------------------------
    def _capture(self) -> None:
        start, before = time.perf_counter(), counters["stats"]["unique_graphs"]
        fn = self.backends.graphs.prepare(self.tower.forward_static)
        with torch.inference_mode(), torch._dynamo.config.patch(
            recompile_limit=_RECOMPILE_LIMIT, accumulated_recompile_limit=_RECOMPILE_LIMIT
        ):
            for budget in _compile_progress(list(reversed(self.budgets))):  # largest first, as vLLM (peak memory)
                inputs = self._dummy_inputs(self._capacity(budget))
                self._graphs[budget] = self.backends.graphs.capture(fn, inputs)
        self.compiled_graphs = counters["stats"]["unique_graphs"] - before
        self.capture_seconds = time.perf_counter() - start

    @torch.inference_mode()
    def warmup(self) -> float:
        """Run every budget's shape once eagerly (library kernels pick and JIT their code per shape,
        which a capture does as a side effect); returns the seconds taken. For fair comparisons."""
        start = time.perf_counter()
        for budget in self.budgets:
            self.tower.forward_static(**self._dummy_inputs(self._capacity(budget)))
        return time.perf_counter() - start

    def _dummy_inputs(self, cap: Capacity) -> dict[str, torch.Tensor]:
        """A typical layout for the budget: frames of (1, m, m * 64) (fewer if the budget is small), zero pixels.

        Only the shapes are baked into the graph; the layout just keeps the warm-up run cheap
        (one frame spanning the whole budget would make it one dense square attention).
        """
        tokens = min(cap.tokens, 64)
        grid = (min(cap.frames, cap.tokens // tokens), self.merge, self.merge * tokens)
        tables = {grid[1:]: self.tower.frame_tables(*grid[1:])}
        meta = self.tower.batch_metadata([grid], tables, cap.patches, cap.frames)
        pixels = torch.zeros(cap.patches, self.patch_dim, dtype=self.dtype, device=self.device)
        return {"pixel_values": pixels, **meta}

    def _capacity(self, budget: int) -> Capacity:
        return capacity(budget, self.merge, self.max_frames_per_batch)

    # ---- serving ----------------------------------------------------------------------------
    def plan(self, items: Sequence[VisionItem]) -> list[Batch]:
        """The batches `encode` runs for these items (validated), with their budgets."""
        grids = [self._check_item(i, item) for i, item in enumerate(items)]
        return plan_batches(grids, self.budgets, self.merge, self.max_items_per_batch, self.max_frames_per_batch)

    @torch.inference_mode()
    def encode(self, items: Sequence[VisionItem]) -> list[torch.Tensor]:
        """One [t*h*w / m^2, hidden] embedding tensor per item, in input order."""
        batches = self.plan(items)
        pixels = [item.pixel_values.to(self.device, self.dtype) for item in items]
        parts: list[list[tuple[int, torch.Tensor]]] = [[] for _ in items]
        for batch in batches:
            out = self._run(batch, pixels)
            offset = 0
            for piece in batch.pieces:
                parts[piece.item].append((piece.first_frame, out[offset : offset + piece.tokens]))
                offset += piece.tokens
        return [chunks[0][1] if len(chunks) == 1 else torch.cat([c for _, c in sorted(chunks)]) for chunks in parts]

    def _run(self, batch: Batch, pixels: list[torch.Tensor]) -> torch.Tensor:
        graph = self._graphs.get(batch.budget) if batch.budget is not None else None
        cap = self._capacity(batch.budget) if graph is not None else None
        inputs = self._batch_inputs(batch.pieces, pixels, cap)
        if graph is None:
            return self.tower.forward_static(**inputs)
        # A recompile here would mean a shape or guard escaped the static contract: fail loudly.
        with torch._dynamo.config.patch(error_on_recompile=True):
            return graph(**inputs)[: batch.tokens]

    def _batch_inputs(
        self, pieces: Sequence[Piece], pixels: list[torch.Tensor], cap: Capacity | None
    ) -> dict[str, torch.Tensor]:
        rows, grids = [], []
        for p in pieces:
            size = p.h * p.w
            rows.append(pixels[p.item][p.first_frame * size : (p.first_frame + p.frames) * size])
            if grids and grids[-1][1:] == (p.h, p.w):  # same frame size: one run of frames
                grids[-1] = (grids[-1][0] + p.frames, p.h, p.w)
            else:
                grids.append((p.frames, p.h, p.w))
        tables = {(h, w): self.tower.frame_tables(h, w) for _, h, w in grids}
        if cap is None:
            meta = self.tower.batch_metadata(grids, tables)
        else:
            meta = self.tower.batch_metadata(grids, tables, cap.patches, cap.frames)
            n = sum(r.shape[0] for r in rows)
            rows.append(rows[0].new_zeros(cap.patches - n, self.patch_dim))
        return {"pixel_values": torch.cat(rows) if len(rows) > 1 else rows[0], **meta}

    def _check_item(self, i: int, item: VisionItem) -> tuple[int, int, int]:
        if item.kind not in ("image", "video"):
            raise InvalidInputError(f"vision item {i}: kind {item.kind!r} is not 'image' or 'video'")
        grid = tuple(int(v) for v in item.grid_thw)
        m = self.merge
        if len(grid) != 3 or grid[0] < 1 or grid[1] < m or grid[2] < m or grid[1] % m or grid[2] % m:
            raise InvalidInputError(
                f"{item.kind} item {i}: grid_thw {grid} needs t >= 1 and h, w positive multiples of "
                f"spatial_merge_size {m}"
            )
        t, h, w = grid
        shape = tuple(item.pixel_values.shape)
        if shape != (t * h * w, self.patch_dim):
            raise InvalidInputError(
                f"{item.kind} item {i}: pixel_values has shape {shape}, but grid_thw {grid} needs "
                f"({t * h * w}, {self.patch_dim}) (t*h*w patches, C*Tp*P*P values each)"
            )
        return grid


def _compile_progress(budgets: list[int]) -> tqdm:
    """The budgets, with a bar on stderr when it is a terminal (a first start can compile for minutes);
    in logs one line, and only for ANNOUNCE_GRAPHS graphs or more, so tests' small captures stay quiet."""
    what = f"glimpse: compiling the vision encoder graphs for {len(budgets)} size{'s' * (len(budgets) != 1)}"
    if not sys.stderr.isatty() and len(budgets) >= ANNOUNCE_GRAPHS:
        print(f"{what}...", file=sys.stderr, flush=True)
    return tqdm(budgets, desc=what, unit="graph", file=sys.stderr, disable=None)


def add_encoder_arguments(parser: argparse.ArgumentParser) -> None:
    """The engine's vision-encoder flags: --encoder-graph, --encoder-budgets and the packing limits."""
    parser.add_argument(
        "--encoder-graph", choices=("auto", "on", "off"), default="auto",
        help="one captured graph per token budget for the vision encoder (auto: the graph backend's "
        "default: on for CPU, where it is measured faster; off where capture is untested)",
    )  # fmt: skip
    parser.add_argument(
        "--encoder-budgets", type=budgets_arg, default=None,
        help="comma-separated budgets in vision tokens (default: 64, 128, ... up to max_num_batched_tokens)",
    )  # fmt: skip
    parser.add_argument("--encoder-max-items-per-batch", type=int, default=None)
    parser.add_argument("--encoder-max-frames-per-batch", type=int, default=None)


def runner_from_args(model: VisionLanguageModel, args: argparse.Namespace, max_num_batched_tokens: int) -> EncoderRunner:
    """An EncoderRunner configured by `add_encoder_arguments`' flags."""
    default_on = _bound_backends(model).graphs.default_on
    graph = args.encoder_graph == "on" or (args.encoder_graph == "auto" and default_on)
    return EncoderRunner(
        model, args.encoder_budgets, max_num_batched_tokens, args.encoder_max_items_per_batch,
        args.encoder_max_frames_per_batch, graph=graph,
    )  # fmt: skip


def budgets_arg(text: str) -> tuple[int, ...]:
    """argparse `type` for --encoder-budgets."""
    try:
        return parse_budgets(text)
    except InvalidInputError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _bound_backends(model: VisionLanguageModel, weight: torch.Tensor | None = None) -> Backends:
    """The model's backends (bound by the loader); a hand-built model is bound here, once, so that a
    captured graph never selects inside its trace."""
    backends = getattr(model, "backends", None)
    if backends is None:
        weight = model.model.visual.patch_embed.proj.weight if weight is None else weight
        backends = backends_for(weight)
        bind_backends(model, backends)
    return backends
