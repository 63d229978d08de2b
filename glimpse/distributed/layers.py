"""The parallel layers: linear layers split by output rows or input columns, the vocabulary-split
embedding and LM head. Each is the plain layer when the group has one rank, so single-process models
are unchanged; each says in `checkpoint_shards` which slice of HF's tensor it holds.

- `column_linear`: this rank's output rows (q/k/v heads, MLP gate/up rows). No communication: the
  next layer consumes the split. `ranges` may be several pieces of one packed tensor (q|k|v, gate|up).
- `RowParallelLinear`: this rank's input columns; the partial products are summed over ranks
  (one all-reduce). Its bias is held by rank 0 only (zeros elsewhere), so the sum adds it once.
- `VocabParallelEmbedding` / `ParallelLMHead`: ceil(vocab / size) rows each (the last share padded
  with zero rows); a token outside a rank's rows embeds to zeros there and the all-reduce fills it in;
  the head's logits are gathered and trimmed back to the vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from glimpse.distributed import SINGLE, ShardSpec, TensorParallel
from glimpse.models.layers import Linear

Ranges = Sequence[tuple[int, int]]


def column_linear(in_features: int, out_features: int, bias: bool, tp: TensorParallel = SINGLE,
                  ranges: Ranges | None = None) -> Linear:  # fmt: skip
    """A Linear holding output rows `ranges` of the full [out_features, in_features] layer (None: an
    equal share of all of them); the plain Linear on one rank."""
    if tp.size == 1:
        return Linear(in_features, out_features, bias=bias)
    if ranges is None:
        ranges = (tp.share(out_features, "a linear layer's output size"),)
    spec = ShardSpec(0, out_features, tuple(ranges))
    layer = Linear(in_features, spec.length, bias=bias)
    layer.checkpoint_shards = {"weight": spec, "bias": spec}
    return layer


def head_ranges(first: int, count: int, head_dim: int, offset: int = 0) -> tuple[int, int]:
    """The rows of heads first..first+count-1 in a projection whose heads start at row `offset`."""
    return offset + first * head_dim, count * head_dim


def attention_projections(hidden: int, heads: int, kv_heads: int, head_dim: int, qkv_bias: bool,
                          tp: TensorParallel = SINGLE) -> tuple[int, int, Linear, Linear, Linear, Linear]:  # fmt: skip
    """A decoder's (this rank's heads, its KV heads, q_proj, k_proj, v_proj, o_proj under HF's names): q/k/v
    by heads (KV heads shared by ranks when fewer than them), o_proj over the same heads' columns (no bias)."""
    q_first, hq = tp.share(heads, "text_config.num_attention_heads")
    kv_first, hkv = tp.kv_head_share(kv_heads)
    q_rows, kv_rows = [head_ranges(q_first, hq, head_dim)], [head_ranges(kv_first, hkv, head_dim)]
    q_out, kv_out = heads * head_dim, kv_heads * head_dim
    return (hq, hkv, column_linear(hidden, q_out, qkv_bias, tp, q_rows), column_linear(hidden, kv_out, qkv_bias, tp, kv_rows),
            column_linear(hidden, kv_out, qkv_bias, tp, kv_rows), row_linear(q_out, hidden, False, tp, q_rows))  # fmt: skip


def packed_qkv_projections(dim: int, heads: int, qkv_bias: bool, proj_bias: bool,
                           tp: TensorParallel = SINGLE) -> tuple[int, Linear, Linear]:  # fmt: skip
    """A vision block's (this rank's heads, qkv, proj): HF's `qkv` packs q, k and v one after the other, so a
    rank takes its heads' rows of each; `proj` the same heads' columns."""
    first, held = tp.share(heads, "vision_config.num_heads", " or --mm-encoder-tp-mode data")
    rows = [head_ranges(first, held, dim // heads, offset=part * dim) for part in range(3)]
    return held, column_linear(dim, 3 * dim, qkv_bias, tp, rows), row_linear(dim, dim, proj_bias, tp, [rows[0]])


class RowParallelLinear(Linear):
    """y = sum over ranks of x[:, my columns] @ W[:, my columns].T, + bias (held by rank 0).

    `reduce=False` leaves the partial sum to the caller, which may fold several into one all-reduce
    (an MoE block's routed and shared experts)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TensorParallel,
                 ranges: Ranges | None = None, reduce: bool = True) -> None:  # fmt: skip
        ranges = tuple(ranges) if ranges is not None else (tp.share(in_features, "a linear layer's input size"),)
        spec = ShardSpec(1, in_features, ranges)
        super().__init__(spec.length, out_features, bias=bias)
        self.tp, self.reduce = tp, reduce
        self.checkpoint_shards = {"weight": spec}
        if not tp.is_driver:
            self.checkpoint_shards["bias"] = ShardSpec(0, out_features, (), zero=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        return self.tp.all_reduce(y) if self.reduce else y


def row_linear(in_features: int, out_features: int, bias: bool, tp: TensorParallel = SINGLE,
               ranges: Ranges | None = None, reduce: bool = True) -> Linear:  # fmt: skip
    """A RowParallelLinear over `tp`; the plain Linear on one rank."""
    if tp.size == 1:
        return Linear(in_features, out_features, bias=bias)
    return RowParallelLinear(in_features, out_features, bias, tp, ranges, reduce)


def _vocab_share(vocab: int, tp: TensorParallel) -> tuple[int, int, int]:
    """(first id, ids held, rows allocated) of this rank's share of the vocabulary."""
    per = -(-vocab // tp.size)
    start = min(tp.rank * per, vocab)
    return start, min(per, vocab - start), per


class VocabParallelEmbedding(nn.Embedding):
    """nn.Embedding over this rank's share of the vocabulary; ids outside it look up zeros and the
    all-reduce brings every row in from the rank that holds it (an exact sum: one term is not zero)."""

    def __init__(self, vocab_size: int, dim: int, tp: TensorParallel) -> None:
        self.vocab_start, held, per = _vocab_share(vocab_size, tp)
        super().__init__(per, dim)
        self.tp, self.vocab_held = tp, held
        self.checkpoint_shards = {"weight": ShardSpec(0, vocab_size, ((self.vocab_start, held),))}

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.vocab_held)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out.masked_fill_(outside[..., None], 0)
        return self.tp.all_reduce(out)


def embedding(vocab_size: int, dim: int, tp: TensorParallel = SINGLE) -> nn.Embedding:
    return nn.Embedding(vocab_size, dim) if tp.size == 1 else VocabParallelEmbedding(vocab_size, dim, tp)


class ParallelLMHead(Linear):
    """The LM head over this rank's vocabulary rows; every rank gets the full [T, vocab] logits, or with
    `only_driver_samples` (the engine, where rank 0 alone samples) rank 0 does and the others keep their own
    rows: half the traffic of an all-gather on 2 ranks (e.g. 64 rows x 152k ids in bf16: 19 MB a step)."""

    only_driver_samples = False

    def __init__(self, hidden: int, vocab_size: int, tp: TensorParallel) -> None:
        start, held, per = _vocab_share(vocab_size, tp)
        super().__init__(hidden, per, bias=False)
        self.tp, self.vocab_size = tp, vocab_size
        self.checkpoint_shards = {"weight": ShardSpec(0, vocab_size, ((start, held),))}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        local = super().forward(x)
        if self.only_driver_samples:
            full = self.tp.gather(local, dim=-1)
            return local if full is None else full[..., : self.vocab_size]
        return self.tp.all_gather(local, dim=-1)[..., : self.vocab_size]


def lm_head(hidden: int, vocab_size: int, tp: TensorParallel = SINGLE) -> Linear:
    return Linear(hidden, vocab_size, bias=False) if tp.size == 1 else ParallelLMHead(hidden, vocab_size, tp)
