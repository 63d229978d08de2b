"""The family-agnostic model driver: vision encode -> embedding merge -> M-RoPE -> decoder -> logits.

A family module (glm4v.py, qwen2_5_vl.py) subclasses `VisionLanguageModel` and supplies
the vision tower, the decoder and its position rule; this file turns those into the small
public API: `compute_logits` (one sequence, every position) and `greedy` (plain KV cache).
Inputs use the HF processor's key names so processor output can be passed straight in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from glimpse.distributed import SINGLE, ShardSpec, TensorParallel
from glimpse.errors import PromptError
from glimpse.models.layers import ContiguousKVCache, KVCache

TEXT, IMAGE, VIDEO = 0, 1, 2


class WeightSlot(NamedTuple):
    """Where a checkpoint tensor that fills part of a stacked parameter goes: parameter `target`, at `index`
    (None: a part another tensor-parallel rank holds, not read here); `source`: the part of the tensor to
    read (None: all of it)."""

    target: str
    index: tuple | None
    source: ShardSpec | None = None


@dataclass(frozen=True)
class MultimodalInputs:
    """One sequence's media tensors, in the HF processor's layout."""

    pixel_values: torch.Tensor | None = None  # [N_patches, C*Tp*P*P]
    image_grid_thw: torch.Tensor | None = None  # [num_images, 3]
    pixel_values_videos: torch.Tensor | None = None
    video_grid_thw: torch.Tensor | None = None  # [num_videos, 3]
    second_per_grid_ts: torch.Tensor | None = None  # [num_videos] (Qwen2.5-VL only)


class VisionLanguageModel(nn.Module):
    """Base class; families implement the abstract hooks below.

    Parameter names follow HF's current layout (`model.visual.*`, `model.language_model.*`,
    `lm_head.*`) so that loading is a direct name match.
    """

    family: str = ""
    supports_video_pruning: bool = False  # EVS (`video_pruning_rate`); Qwen2.5-VL sets it
    spatial_merge_size: int = 2  # families set it from vision_config
    tp: TensorParallel = SINGLE  # the tensor-parallel group it is split over (families set it while building)

    # ---- hooks a family implements -------------------------------------------------
    def encode_images(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """[N_patches, C*Tp*P*P], [num_images, 3] -> [sum(t*h*w/m^2), hidden] in item order."""
        raise NotImplementedError

    def encode_videos(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def mm_token_types(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[T] ids -> [T] int: 0 text, 1 image embedding slot, 2 video embedding slot."""
        raise NotImplementedError

    def mrope_positions(self, input_ids: torch.Tensor, mm: MultimodalInputs) -> tuple[torch.Tensor, int]:
        """[T] ids -> ([3, T] positions, mrope_delta) for the whole prompt."""
        raise NotImplementedError

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, inputs_embeds: torch.Tensor, positions: torch.Tensor, kv: KVCache,
               rows: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """[T, hidden] embeddings, [3, T] positions -> [T, hidden] final-normed hidden states; with
        `rows` ([R] indices into T), [R, hidden]: those rows only. Every token's K/V goes to `kv` either
        way; the last layer runs its o_proj and MLP on `rows` alone (nothing reads the other rows' output:
        a prefill chunk samples at most its last token)."""
        raise NotImplementedError

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @property
    def num_decoder_layers(self) -> int:
        raise NotImplementedError

    # Families set this from config.tie_word_embeddings and own `lm_head` and
    # `model.language_model.embed_tokens`.
    tie_word_embeddings: bool = False

    def tied_weight_names(self) -> dict[str, str]:
        """Parameters that share another's tensor (absent from checkpoints): name -> source name."""
        return {"lm_head.weight": "model.language_model.embed_tokens.weight"} if self.tie_word_embeddings else {}

    # ---- loading hooks (defaults: every tensor loads whole, in the model dtype) ----
    def skip_checkpoint_tensor(self, name: str) -> bool:
        """True for checkpoint tensors glimpse deliberately does not run (e.g. declared MTP draft layers)."""
        return False

    def packed_weight_slot(self, name: str) -> WeightSlot | None:
        """Where a checkpoint tensor that is one slice of a stacked parameter goes; None if it loads whole."""
        return None

    def checkpoint_shard(self, name: str) -> ShardSpec | None:
        """The part of checkpoint tensor `name` (a parameter's name) this rank holds; None: all of it.
        Parallel layers (glimpse/distributed/layers.py) list theirs in `checkpoint_shards`."""
        module_name, _, attr = name.rpartition(".")
        shards = getattr(self.get_submodule(module_name), "checkpoint_shards", None)
        return None if shards is None else shards.get(attr)

    def float32_weight_names(self) -> set[str]:
        """State-dict names kept in float32 whatever the model dtype."""
        return set()

    def fuse_projections(self) -> None:
        """Concatenate each group of sibling projections of one input (q/k/v, gate/up) into one Linear,
        for modules that define `fuse_projections` (the loader calls this once the weights are in).

        Before it the model holds HF's parameter names, so checkpoints and HF state dicts load as they
        are; after it a decode step makes one matmul call where it made two or three.
        """
        for module in [m for m in self.modules() if m is not self and hasattr(m, "fuse_projections")]:
            module.fuse_projections()

    def tie_weights(self) -> None:
        """Share `lm_head.weight` with the input embeddings when the config ties them.

        Tied checkpoints omit `lm_head.weight`; the loader calls this again after assigning weights.
        """
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.language_model.embed_tokens.weight

    # ---- shared driver ------------------------------------------------------------
    def encode_media(self, kind: int, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """`encode_images` / `encode_videos` of the items of `grid_thw`; with a data-parallel encoder
        (`--mm-encoder-tp-mode data`) each rank encodes a run of whole items, about 1/size of the
        patches, and every rank gets all the embeddings (one all-gather)."""
        encode = self.encode_images if kind == IMAGE else self.encode_videos
        tp = self.tp
        if tp.size == 1 or tp.encoder_mode != "data":
            return encode(pixel_values, grid_thw)
        patches = grid_thw.prod(-1).tolist()
        merged = [p // self.spatial_merge_size**2 for p in patches]
        owner = _item_owners(patches, tp.size)
        mine = [i for i, r in enumerate(owner) if r == tp.rank]
        rows = [sum(m for m, r in zip(merged, owner, strict=True) if r == rank) for rank in range(tp.size)]
        if mine:
            first_patch = sum(patches[: mine[0]])
            local = encode(pixel_values[first_patch : first_patch + sum(patches[i] for i in mine)], grid_thw[mine])
        else:
            local = pixel_values.new_empty(0, self.model.language_model.embed_tokens.weight.shape[1], dtype=self.dtype)
        return tp.all_gather_rows(local, rows)

    def embed_multimodal(self, input_ids: torch.Tensor, mm: MultimodalInputs) -> torch.Tensor:
        """Token embeddings with each placeholder slot replaced by its vision embedding, in order."""
        embeds = self.embed_tokens(input_ids)
        types = self.mm_token_types(input_ids)
        for kind, pixels, grid in ((IMAGE, mm.pixel_values, mm.image_grid_thw),
                                   (VIDEO, mm.pixel_values_videos, mm.video_grid_thw)):  # fmt: skip
            slots = types == kind
            n_slots = int(slots.sum())
            if pixels is None:
                if n_slots:
                    raise PromptError(
                        f"the prompt has {n_slots} {_kind_name(kind)} placeholder tokens but no "
                        f"{_kind_name(kind)} pixels were given"
                    )
                continue
            feats = self.encode_media(kind, pixels, grid)
            if feats.shape[0] != n_slots:
                raise PromptError(
                    f"{_kind_name(kind)} placeholders ({n_slots} tokens) do not match the "
                    f"{feats.shape[0]} embeddings of the given grids"
                )
            embeds[slots] = feats.to(embeds.dtype)
        return embeds

    @torch.inference_mode()
    def compute_logits(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_grid_thw: torch.Tensor | None = None,
        second_per_grid_ts: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits for every position of one sequence: [T] (or [1, T]) ids -> [T, vocab] float32."""
        input_ids = _flat_ids(input_ids, self.device)
        mm = self._mm(pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw, second_per_grid_ts)
        embeds = self.embed_multimodal(input_ids, mm)
        positions, _ = self.mrope_positions(input_ids, mm)
        hidden = self.decode(embeds, positions.to(self.device), ContiguousKVCache(self.num_decoder_layers))
        return self.lm_logits(hidden).float()

    @torch.inference_mode()
    def greedy(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_grid_thw: torch.Tensor | None = None,
        second_per_grid_ts: torch.Tensor | None = None,
        eos_token_ids: tuple[int, ...] = (),
    ) -> list[int]:
        """Greedy decoding with a plain KV cache; returns only the new token ids."""
        input_ids = _flat_ids(input_ids, self.device)
        mm = self._mm(pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw, second_per_grid_ts)
        kv = ContiguousKVCache(self.num_decoder_layers)
        embeds = self.embed_multimodal(input_ids, mm)
        positions, delta = self.mrope_positions(input_ids, mm)
        hidden = self.decode(embeds, positions.to(self.device), kv)
        out: list[int] = []
        next_id = int(self.lm_logits(hidden[-1:]).argmax(-1))
        while True:
            out.append(next_id)
            if len(out) >= max_new_tokens or next_id in eos_token_ids:
                return out
            pos = kv.seq_len + delta
            positions = torch.full((3, 1), pos, dtype=torch.long, device=self.device)
            ids = torch.tensor([next_id], device=self.device)
            hidden = self.decode(self.embed_tokens(ids), positions, kv)
            next_id = int(self.lm_logits(hidden).argmax(-1))

    # ---- helpers ------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def _mm(self, pv, igrid, pvv, vgrid, spg) -> MultimodalInputs:
        dev = self.device
        return MultimodalInputs(
            pixel_values=None if pv is None else pv.to(dev),
            image_grid_thw=None if igrid is None else igrid.to(dev).long(),
            pixel_values_videos=None if pvv is None else pvv.to(dev),
            video_grid_thw=None if vgrid is None else vgrid.to(dev).long(),
            second_per_grid_ts=None if spg is None else torch.as_tensor(spg, dtype=torch.float32),
        )


def _flat_ids(input_ids, device) -> torch.Tensor:
    ids = torch.as_tensor(input_ids, dtype=torch.long)
    if ids.dim() == 2:
        if ids.shape[0] != 1:
            raise PromptError(f"compute_logits takes one sequence, got a batch of {ids.shape[0]}")
        ids = ids[0]
    return ids.to(device)


def _item_owners(patches: list[int], ranks: int) -> list[int]:
    """The rank that encodes each item: consecutive runs of items, cut where the running patch count
    crosses a multiple of total / ranks (an item goes to the rank its middle patch falls in)."""
    total, seen, owners = sum(patches), 0, []
    for p in patches:
        owners.append(min(ranks - 1, (2 * seen + p) * ranks // (2 * total)))
        seen += p
    return owners


def _kind_name(kind: int) -> str:
    return {IMAGE: "image", VIDEO: "video"}[kind]
