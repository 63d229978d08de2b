"""Step 8 for the GLM-4.5V / GLM-4.6V text tower (glm4v_moe_text): the routed-expert MLP layers, [T, H] -> [T, H].

The first `first_k_dense_replace` layers are a plain SwiGLU; the rest route each token to `num_experts_per_tok`
experts (sigmoid scores, group-limited, steered by `e_score_correction_bias`) plus the shared experts. Experts
are stacked as HF holds them (`experts.gate_up_proj` [E, 2I, H], `experts.down_proj` [E, H, I]);
`expert_weight_slot` places the per-expert tensors real checkpoints ship (`experts.E.{gate,up,down}_proj.weight`).

Under tensor parallelism (glimpse/distributed) every rank holds either a share of every expert's
intermediate rows (the default) or, with expert parallelism, its share of the experts whole; either
way a rank's routed and shared experts give a partial sum, and the block sums it over ranks once.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from glimpse import distributed
from glimpse.distributed import ShardSpec, TensorParallel
from glimpse.errors import CheckpointError
from glimpse.models.base import WeightSlot
from glimpse.models.layers import SwiGluMLP

MOE_TEXT_TYPES = ("glm4v_moe_text",)

_EXPERT_NAME = re.compile(r"^(?P<prefix>.+\.mlp\.experts)\.(?P<expert>\d+)\.(?P<part>gate_proj|up_proj|down_proj)\.weight$")


def _activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if name != "silu":
        raise CheckpointError(f"text_config.hidden_act {name!r} is not supported for the MoE tower (only 'silu')")
    return F.silu


def check_moe_config(tc) -> None:
    """Refuse routing settings HF itself cannot run (it would fail inside topk), naming the key."""
    experts, groups = int(tc.n_routed_experts), int(tc.n_group)
    top_k, topk_group = int(tc.num_experts_per_tok), int(tc.topk_group)
    if groups < 1 or experts % groups:
        raise CheckpointError(f"text_config.n_routed_experts {experts} is not a multiple of n_group {groups}")
    per_group = experts // groups
    if per_group < 2:  # a group's score is the sum of its two best experts
        raise CheckpointError(
            f"text_config: n_routed_experts {experts} / n_group {groups} leaves {per_group} expert per group; "
            "group scores need at least 2"
        )
    if not 1 <= topk_group <= groups:
        raise CheckpointError(f"text_config.topk_group {topk_group} must be in [1, n_group={groups}]")
    if not 1 <= top_k <= topk_group * per_group:
        raise CheckpointError(
            f"text_config.num_experts_per_tok {top_k} must be in [1, {topk_group * per_group}] "
            f"(topk_group {topk_group} x {per_group} experts per group)"
        )
    if int(tc.n_shared_experts) < 0 or int(tc.first_k_dense_replace) < 0:
        raise CheckpointError("text_config.n_shared_experts and first_k_dense_replace must be >= 0")
    _activation(tc.hidden_act)


def route_tokens(
    router_logits: torch.Tensor,
    correction_bias: torch.Tensor,
    n_group: int,
    topk_group: int,
    top_k: int,
    norm_topk_prob: bool,
    routed_scaling_factor: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 router logits [T, E] -> (gate weights fp32 [T, k], expert ids [T, k]).

    Selection uses sigmoid(logits) + correction_bias: groups are ranked by the sum of their two
    best biased scores, the best `topk_group` groups stay eligible, then the best `top_k` experts
    among them win. The weights are the *un-biased* sigmoid scores of the winners, normalised to
    sum 1 if `norm_topk_prob`, times `routed_scaling_factor`. Ties resolve as torch.topk resolves
    them, the same calls HF makes, so the chosen experts agree with HF's even on ties.
    """
    t, e = router_logits.shape
    scores = router_logits.sigmoid()
    biased = scores + correction_bias
    group_best2 = biased.view(t, n_group, e // n_group).topk(2, dim=-1).values.sum(-1)  # [T, G]
    kept_groups = group_best2.topk(topk_group, dim=-1, sorted=False).indices
    group_keep = torch.zeros_like(group_best2).scatter_(1, kept_groups, 1.0).bool()
    eligible = group_keep[:, :, None].expand(t, n_group, e // n_group).reshape(t, e)
    expert_ids = biased.masked_fill(~eligible, float("-inf")).topk(top_k, dim=-1, sorted=False).indices
    weights = scores.gather(1, expert_ids)
    if norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)  # the epsilon HF adds
    return weights * routed_scaling_factor, expert_ids


class Glm4MoeMLP(SwiGluMLP):
    """SwiGLU with separate gate/up/down (no bias): the dense layers and the shared experts."""

    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str, reduce: bool = True) -> None:
        super().__init__(hidden_size, intermediate_size, _activation(hidden_act), tp=distributed.current(), reduce=reduce)


class Glm4MoeRouter(nn.Module):
    """`gate.weight` [E, H] (applied in fp32) and the fp32 `e_score_correction_bias` [E]."""

    def __init__(self, tc) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(tc.n_routed_experts, tc.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(tc.n_routed_experts, dtype=torch.float32))
        self.n_group, self.topk_group, self.top_k = int(tc.n_group), int(tc.topk_group), int(tc.num_experts_per_tok)
        self.norm_topk_prob = bool(tc.norm_topk_prob)
        self.routed_scaling_factor = float(tc.routed_scaling_factor)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = F.linear(x.float(), self.weight.float())
        return route_tokens(logits, self.e_score_correction_bias.float(), self.n_group, self.topk_group,
                            self.top_k, self.norm_topk_prob, self.routed_scaling_factor)  # fmt: skip


def expert_share(num_experts: int, intermediate: int, tp: TensorParallel) -> tuple[int, int, int, int]:
    """(first expert, experts, first intermediate row, rows) this rank holds: every expert with its share of the
    rows, or (expert parallel) its share of the experts with all their rows."""
    if tp.expert_parallel:
        first, held = tp.share(num_experts, "text_config.n_routed_experts (with --enable-expert-parallel)")
        return first, held, 0, intermediate
    first_row, rows = tp.share(intermediate, "text_config.moe_intermediate_size")
    return 0, num_experts, first_row, rows


class Glm4MoeExperts(nn.Module):
    """Stacked routed experts: gate_up_proj [E, 2I, H] (gate rows first), down_proj [E, H, I].

    Split over ranks, a rank holds experts first_expert..first_expert+E'-1 with I' of their rows:
    all E experts with I / size rows each, or (expert parallel) E / size experts whole."""

    def __init__(self, tc) -> None:
        super().__init__()
        e, h, i = tc.n_routed_experts, tc.hidden_size, tc.moe_intermediate_size
        tp = distributed.current()
        self.num_experts = e
        self.first_expert, local_e, first_row, local_i = expert_share(e, i, tp)
        self.gate_up_proj = nn.Parameter(torch.empty(local_e, 2 * local_i, h))
        self.down_proj = nn.Parameter(torch.empty(local_e, h, local_i))
        self.act = _activation(tc.hidden_act)
        if tp.size > 1:  # what a rank reads of HF's stacked tensors
            if tp.expert_parallel:
                experts = ShardSpec(0, e, ((self.first_expert, local_e),))
                self.checkpoint_shards = {"gate_up_proj": experts, "down_proj": experts}
            else:
                rows = (first_row, local_i)
                self.checkpoint_shards = {"gate_up_proj": ShardSpec(1, 2 * i, (rows, (i + rows[0], local_i))),
                                          "down_proj": ShardSpec(2, i, (rows,))}  # fmt: skip

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [T, H], expert_ids / weights [T, k] -> [T, H]: sum_j weights[:, j] * expert_{ids[:, j]}(x).

        The T*k (token, expert) pairs are sorted by expert so each expert that got tokens runs
        one matmul over a contiguous slice; one host sync (the per-expert counts) per layer.
        """
        t, k = expert_ids.shape
        flat = expert_ids.reshape(-1)
        order = torch.argsort(flat, stable=True)
        token_of_pair = order // k
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        rows = x.index_select(0, token_of_pair)
        held = self.gate_up_proj.shape[0]
        # pairs routed to another rank's experts (expert parallel) add nothing here
        out = torch.zeros_like(rows) if held < self.num_experts else torch.empty_like(rows)
        start = 0
        for expert, n in enumerate(counts):
            local = expert - self.first_expert
            if n and 0 <= local < held:
                gate, up = F.linear(rows[start : start + n], self.gate_up_proj[local]).chunk(2, dim=-1)
                out[start : start + n] = F.linear(self.act(gate) * up, self.down_proj[local])
            start += n
        # weight and sum in fp32 (the weights are fp32), then back to the activation dtype
        weighted = out * weights.reshape(-1)[order, None]
        return torch.zeros(t, x.shape[1], dtype=weighted.dtype, device=x.device).index_add_(0, token_of_pair, weighted).to(x.dtype)


class Glm4MoeSparseBlock(nn.Module):
    """`gate` (router) + `experts` + `shared_experts`; [T, H] -> [T, H]."""

    def __init__(self, tc) -> None:
        super().__init__()
        self.tp: TensorParallel = distributed.current()
        self.gate = Glm4MoeRouter(tc)
        self.experts = Glm4MoeExperts(tc)
        self.shared_experts = Glm4MoeMLP(tc.hidden_size, tc.moe_intermediate_size * tc.n_shared_experts,
                                         tc.hidden_act, reduce=False)  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, expert_ids = self.gate(x)
        return self.tp.all_reduce(self.experts(x, expert_ids, weights) + self.shared_experts(x))  # one sum over ranks


def make_moe_text_mlp(tc, layer_idx: int) -> nn.Module:
    """Dense SwiGLU for the first `first_k_dense_replace` layers, routed experts after."""
    if layer_idx < int(tc.first_k_dense_replace):
        return Glm4MoeMLP(tc.hidden_size, tc.intermediate_size, tc.hidden_act)
    return Glm4MoeSparseBlock(tc)


def expert_weight_slot(name: str, num_experts: int, moe_intermediate_size: int,
                       tp: TensorParallel = distributed.SINGLE) -> WeightSlot | None:  # fmt: skip
    """Per-expert checkpoint name -> its `WeightSlot` in the stacked parameter; None for other names.

    `...mlp.experts.3.gate_proj.weight` -> (`...mlp.experts.gate_up_proj`, (3, rows [0, I)), None);
    `up_proj` fills rows [I, 2I) (HF's MergeModulelist + Concatenate(dim=1) layout); `down_proj`
    fills `...mlp.experts.down_proj[3]`. Split over ranks (`Glm4MoeExperts`), the index is local and a
    rank reads its rows of each expert (or, expert parallel, its experts whole).
    """
    match = _EXPERT_NAME.match(name)
    if match is None:
        return None
    expert, part, prefix = int(match["expert"]), match["part"], match["prefix"]
    if expert >= num_experts:
        raise CheckpointError(f"tensor {name}: expert {expert} is out of range (text_config.n_routed_experts {num_experts})")
    first, held, first_row, i = expert_share(num_experts, moe_intermediate_size, tp)
    if not first <= expert < first + held:  # expert parallel: another rank's
        return WeightSlot(f"{prefix}.down_proj" if part == "down_proj" else f"{prefix}.gate_up_proj", None)
    expert -= first
    source = None if i == moe_intermediate_size else ShardSpec(1 if part == "down_proj" else 0, moe_intermediate_size,
                                                               ((first_row, i),))  # fmt: skip
    if part == "down_proj":
        return WeightSlot(f"{prefix}.down_proj", (expert,), source)
    rows = slice(0, i) if part == "gate_proj" else slice(i, 2 * i)
    return WeightSlot(f"{prefix}.gate_up_proj", (expert, rows), source)


__all__ = [
    "MOE_TEXT_TYPES", "check_moe_config", "route_tokens", "Glm4MoeMLP", "Glm4MoeRouter", "Glm4MoeExperts",
    "Glm4MoeSparseBlock", "make_moe_text_mlp", "expert_share", "expert_weight_slot",
]  # fmt: skip
