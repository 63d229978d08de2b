"""GLM-4.5V / GLM-4.6V MoE layers against HF 5.23's own modules, and the MoE checkpoint layouts.

Routing (sigmoid scores, correction bias for selection only, group-limited top-k, ties) and the
whole sparse block are compared with HF's `Glm4vMoeTextTopkRouter` / `Glm4vMoeTextMoE` on the
same weights; a hand-worked example pins the rule itself. Loading covers the per-expert names real
GLM-4.5V ships, HF's stacked layout, the float32 router bias, gaps, and the skipped MTP layers.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import transformers
from conftest import IMAGES, checkpoint_tensors, meta_model
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors.torch import save_file
from transformers.models.glm4v_moe import modeling_glm4v_moe as hf_moe

from glimpse import load_model
from glimpse.distributed import ShardSpec, TensorParallel
from glimpse.engine.sampling_params import SamplingParams
from glimpse.errors import CheckpointError
from glimpse.llm import LLM
from glimpse.loader import load_weights
from glimpse.models.glm4_moe import Glm4MoeRouter, Glm4MoeSparseBlock, expert_weight_slot, route_tokens
from glimpse.testing import make_checkpoint


def _text_config(**kw) -> transformers.Glm4vMoeTextConfig:
    base = {"hidden_size": 32, "intermediate_size": 48, "moe_intermediate_size": 16, "n_routed_experts": 8,
            "num_experts_per_tok": 2, "n_group": 2, "topk_group": 1, "n_shared_experts": 1,
            "routed_scaling_factor": 2.5, "norm_topk_prob": True}  # fmt: skip
    cfg = transformers.Glm4vMoeTextConfig(**{**base, **kw})
    cfg._experts_implementation = "eager"
    return cfg


def _hf_router_and_ours(cfg, seed: int, bias_std: float = 0.1):
    gen = torch.Generator().manual_seed(seed)
    hf = hf_moe.Glm4vMoeTextTopkRouter(cfg)
    ours = Glm4MoeRouter(cfg)
    weight = torch.randn(cfg.n_routed_experts, cfg.hidden_size, generator=gen) / math.sqrt(cfg.hidden_size)
    bias = torch.randn(cfg.n_routed_experts, generator=gen) * bias_std
    for module in (hf, ours):
        module.weight.data.copy_(weight)
        module.e_score_correction_bias.copy_(bias)
    return hf, ours


# ---- routing -------------------------------------------------------------------------------


def test_hand_worked_routing():
    """4 experts in 2 groups, keep 1 group, pick 1 expert; numbers worked by hand below."""
    logits = torch.tensor([[1.0, 0.9, 2.0, -3.0]])
    s = torch.sigmoid(logits)[0]  # 0.731, 0.711, 0.881, 0.047
    # Group {0,1} scores 0.731+0.711 = 1.442 > group {2,3} 0.881+0.047 = 0.928: expert 2, the single
    # best, is not eligible; expert 0 wins. Normalised over one expert its weight is 1, times 2.5.
    w, ids = route_tokens(logits, torch.zeros(4), 2, 1, 1, True, 2.5)
    assert ids.tolist() == [[0]] and w.tolist() == [[2.5]]
    # A bias of +1 on expert 3 lifts group {2,3} to 0.881+1.047 = 1.928 and expert 3 above expert 2
    # (1.047 > 0.881): expert 3 is chosen, but its weight is its *unbiased* score 0.047 (norm off).
    w, ids = route_tokens(logits, torch.tensor([0.0, 0.0, 0.0, 1.0]), 2, 1, 1, False, 2.5)
    assert ids.tolist() == [[3]]
    torch.testing.assert_close(w, (s[3] * 2.5).view(1, 1), rtol=0, atol=0)
    # Two experts from the one kept group, normalised: s0 / (s0 + s1) and s1 / (s0 + s1).
    w, ids = route_tokens(logits, torch.zeros(4), 2, 1, 2, True, 1.0)
    got = dict(zip(ids[0].tolist(), w[0].tolist(), strict=True))
    assert got.keys() == {0, 1}
    assert got[0] == pytest.approx(float(s[0] / (s[0] + s[1])), abs=1e-7)
    assert got[1] == pytest.approx(float(s[1] / (s[0] + s[1])), abs=1e-7)


@settings(max_examples=40, deadline=None)
@given(
    layout=st.sampled_from([(4, 1), (4, 2), (8, 1), (8, 2), (8, 4), (16, 4), (16, 8), (12, 3)]),
    data=st.data(),
    norm=st.booleans(),
    scale=st.sampled_from([1.0, 2.5]),
    seed=st.integers(0, 2**16),
)
def test_router_equals_hf(layout, data, norm, scale, seed):
    experts, groups = layout
    topk_group = data.draw(st.integers(1, groups))
    top_k = data.draw(st.integers(1, topk_group * experts // groups))
    cfg = _text_config(n_routed_experts=experts, n_group=groups, topk_group=topk_group, num_experts_per_tok=top_k,
                       norm_topk_prob=norm, routed_scaling_factor=scale)  # fmt: skip
    hf, ours = _hf_router_and_ours(cfg, seed)
    x = torch.randn(23, cfg.hidden_size, generator=torch.Generator().manual_seed(seed + 1))
    _, ref_w, ref_ids = hf(x)
    w, ids = ours(x)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(w, ref_w, rtol=0, atol=0)


@pytest.mark.parametrize("case", ["all_equal", "tied_groups", "tied_experts_at_cut", "bias_breaks_tie"])
def test_router_ties_equal_hf(case):
    """Exact ties (identical router rows give bit-identical scores) resolve as HF resolves them."""
    cfg = _text_config(n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=3)
    hf, ours = _hf_router_and_ours(cfg, seed=7, bias_std=0.0)
    w = hf.weight.data.clone()
    bias = torch.zeros(8)
    if case == "all_equal":
        w.zero_()  # every score is sigmoid(0) = 0.5
    elif case == "tied_groups":
        w[2:4], w[6:8] = w[0:2], w[4:6]  # group 1 == group 0, group 3 == group 2
    elif case == "tied_experts_at_cut":
        w[1], w[3], w[5] = w[0], w[0], w[0]  # four experts with one score, only some can be picked
    else:
        w.zero_()
        bias[5] = 1e-3  # tie broken for selection only; weights stay the equal unbiased 0.5
    for module in (hf, ours):
        module.weight.data.copy_(w)
        module.e_score_correction_bias.copy_(bias)
    x = torch.randn(9, cfg.hidden_size, generator=torch.Generator().manual_seed(3))
    _, ref_w, ref_ids = hf(x)
    got_w, got_ids = ours(x)
    assert torch.equal(got_ids, ref_ids)
    torch.testing.assert_close(got_w, ref_w, rtol=0, atol=0)
    # Whatever the tie-break, the rule holds: k distinct experts, all from the kept groups.
    for row in got_ids.tolist():
        assert len(set(row)) == 3 and len({e // 2 for e in row}) <= 2
    if case in ("all_equal", "bias_breaks_tie"):
        torch.testing.assert_close(got_w, torch.full_like(got_w, 2.5 / 3), rtol=1e-6, atol=0)
    if case == "bias_breaks_tie":
        assert (got_ids == 5).any(-1).all()


# ---- the sparse block ----------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["eager", "grouped_mm"])
@pytest.mark.parametrize("tokens", [1, 3, 64])
def test_sparse_block_equals_hf(impl, tokens):
    cfg = _text_config(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4, n_shared_experts=2)
    cfg._experts_implementation = impl
    gen = torch.Generator().manual_seed(tokens)
    hf = hf_moe.Glm4vMoeTextMoE(cfg).eval()
    state = {k: torch.randn(v.shape, generator=gen) / math.sqrt(v.shape[-1]) for k, v in hf.state_dict().items()}
    state["gate.e_score_correction_bias"] = torch.randn(16, generator=gen) * 0.1
    hf.load_state_dict(state)
    ours = Glm4MoeSparseBlock(cfg)
    ours.load_state_dict(state)  # same names: gate.{weight,e_score_correction_bias}, experts.*, shared_experts.*
    x = torch.randn(tokens, cfg.hidden_size, generator=gen)
    with torch.no_grad():
        ref = hf(x[None])[0]
        got = ours(x)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)


def test_expert_weight_slot():
    i = 16
    assert expert_weight_slot("model.language_model.layers.3.mlp.experts.5.gate_proj.weight", 8, i) == (
        "model.language_model.layers.3.mlp.experts.gate_up_proj", (5, slice(0, 16)), None)
    assert expert_weight_slot("m.layers.3.mlp.experts.5.up_proj.weight", 8, i) == (
        "m.layers.3.mlp.experts.gate_up_proj", (5, slice(16, 32)), None)
    assert expert_weight_slot("m.layers.3.mlp.experts.0.down_proj.weight", 8, i) == (
        "m.layers.3.mlp.experts.down_proj", (0,), None)
    assert expert_weight_slot("m.layers.3.mlp.shared_experts.gate_proj.weight", 8, i) is None
    with pytest.raises(CheckpointError, match="expert 8 is out of range"):
        expert_weight_slot("m.layers.3.mlp.experts.8.up_proj.weight", 8, i)


def test_expert_weight_slot_split_over_ranks():
    """Rank 1 of 2: every expert's rows 8..15 of I = 16 (read from the tensor's rows or, for down_proj, its
    columns), or with expert parallelism experts 4..7 whole, at local indices 0..3."""
    i, rank1 = 16, TensorParallel(rank=1, size=2)
    assert expert_weight_slot("m.mlp.experts.5.up_proj.weight", 8, i, rank1) == (
        "m.mlp.experts.gate_up_proj", (5, slice(8, 16)), ShardSpec(0, 16, ((8, 8),)))
    assert expert_weight_slot("m.mlp.experts.5.down_proj.weight", 8, i, rank1) == (
        "m.mlp.experts.down_proj", (5,), ShardSpec(1, 16, ((8, 8),)))
    ep = TensorParallel(rank=1, size=2, expert_parallel=True)
    assert expert_weight_slot("m.mlp.experts.5.gate_proj.weight", 8, i, ep) == ("m.mlp.experts.gate_up_proj", (1, slice(0, 16)), None)
    assert expert_weight_slot("m.mlp.experts.3.gate_proj.weight", 8, i, ep) == ("m.mlp.experts.gate_up_proj", None, None)


# ---- checkpoints: layouts, float32 bias, gaps, MTP layers -------------------------------------------





def test_factory_writes_real_glm45v_names(tmp_path):
    path = make_checkpoint("glm4v_moe", "tiny", tmp_path, seed=2, dtype="bfloat16")
    names = checkpoint_tensors(path)
    tc = json.loads((path / "config.json").read_text())["text_config"]
    e, layers = tc["n_routed_experts"], tc["num_hidden_layers"]
    lm = "model.language_model.layers"
    # layer 0 dense with separate projections; the others routed, one tensor per expert as GLM-4.5V ships
    assert {f"{lm}.0.mlp.{p}_proj.weight" for p in ("gate", "up", "down")} <= names.keys()
    for layer in range(1, layers):
        for x in range(e):
            for part in ("gate", "up", "down"):
                assert f"{lm}.{layer}.mlp.experts.{x}.{part}_proj.weight" in names
        assert names[f"{lm}.{layer}.mlp.gate.e_score_correction_bias"].dtype == torch.float32
        assert names[f"{lm}.{layer}.mlp.gate.weight"].dtype == torch.bfloat16
    assert not any(k.endswith(("experts.gate_up_proj", "experts.down_proj")) for k in names)


@pytest.mark.parametrize(
    "family,layout", [("glm4v_moe", {}), ("glm4v_moe", {"shards": 3}), ("glm46v_moe", {}),
                      ("glm46v_moe", {"expert_layout": "per_expert"}), ("glm4v_moe", {"legacy_names": True})],
)  # fmt: skip
def test_every_expert_tensor_lands_once(family, layout, tmp_path):
    path = make_checkpoint(family, "tiny", tmp_path, seed=1, **layout)
    on_disk = checkpoint_tensors(path)
    model = meta_model(path)
    report = load_weights(model, path, torch.float32)
    assert sorted(report.source) == sorted(on_disk) and not report.skipped
    state = model.state_dict()
    stacked = make_checkpoint(family, "tiny", tmp_path / "stacked", seed=1, expert_layout="stacked")
    ref = checkpoint_tensors(stacked)  # the same seeded weights in HF's in-memory names
    assert state.keys() == ref.keys()
    for name, tensor in ref.items():
        torch.testing.assert_close(state[name], tensor.float(), rtol=0, atol=0)


def test_router_bias_stays_float32_in_bfloat16(tmp_path):
    path = make_checkpoint("glm4v_moe", "tiny", tmp_path, seed=0, dtype="bfloat16")
    disk = checkpoint_tensors(path)
    model = load_model(path, dtype="bfloat16")
    buffers = {n: b for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")}
    assert buffers
    for name, b in buffers.items():
        assert b.dtype == torch.float32
        assert torch.equal(b, disk[name])
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    dummy = load_model(path, dtype="bfloat16", load_format="dummy")
    assert {b.dtype for n, b in dummy.named_buffers() if n.endswith("e_score_correction_bias")} == {torch.float32}


def test_missing_expert_is_named(tmp_path):
    path = make_checkpoint("glm4v_moe", "tiny", tmp_path, seed=0)
    tensors = checkpoint_tensors(path)
    del tensors["model.language_model.layers.1.mlp.experts.3.up_proj.weight"]
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"layers\.1\.mlp\.experts\.gate_up_proj .*missing"):
        load_model(path)


def test_whole_and_sliced_expert_tensor_refused(tmp_path):
    path = make_checkpoint("glm4v_moe", "tiny", tmp_path, seed=0)
    tensors = checkpoint_tensors(path)
    stacked = checkpoint_tensors(make_checkpoint("glm4v_moe", "tiny", tmp_path / "s", seed=0, expert_layout="stacked"))
    name = "model.language_model.layers.1.mlp.experts.down_proj"
    tensors[name] = stacked[name]
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="both whole and in slices"):
        load_model(path)


def _add_mtp_layer(path, declare: bool) -> list[str]:
    """Append a GLM-style MTP layer after the decoder (as GLM-OCR and GLM-4.5 ship one)."""
    tensors = checkpoint_tensors(path)
    cfg = json.loads((path / "config.json").read_text())
    n = cfg["text_config"]["num_hidden_layers"]
    h = cfg["text_config"]["hidden_size"]
    extra = {f"model.language_model.layers.{n}.eh_proj.weight": torch.randn(h, 2 * h),
             f"model.language_model.layers.{n}.enorm.weight": torch.ones(h),
             f"model.language_model.layers.{n}.self_attn.q_proj.weight": torch.randn(8, h)}  # fmt: skip
    save_file({**tensors, **extra}, str(path / "model.safetensors"), metadata={"format": "pt"})
    if declare:
        cfg["text_config"]["num_nextn_predict_layers"] = 1
    else:
        cfg["text_config"].pop("num_nextn_predict_layers", None)
    (path / "config.json").write_text(json.dumps(cfg))
    return sorted(extra)


@pytest.mark.parametrize("family", ["glm4v_moe", "glm_ocr"])
def test_mtp_layer_skipped_only_when_declared(family, tmp_path):
    path = make_checkpoint(family, "tiny", tmp_path, seed=0)
    ids = torch.tensor([5, 17, 33, 100, 7])
    before = load_model(path).compute_logits(ids)
    extra = _add_mtp_layer(path, declare=True)
    model = meta_model(path)
    assert sorted(load_weights(model, path, torch.float32).skipped) == extra
    torch.testing.assert_close(load_model(path).compute_logits(ids), before, rtol=0, atol=0)
    _add_mtp_layer(path, declare=False)
    with pytest.raises(CheckpointError, match="unexpected tensor"):
        load_model(path)


@pytest.mark.parametrize(
    "change,match",
    [({"use_qk_norm": True}, "use_qk_norm"), ({"n_group": 3}, "multiple of n_group"),
     ({"n_group": 8, "topk_group": 1}, "at least 2"), ({"topk_group": 3}, "topk_group"),
     ({"num_experts_per_tok": 5}, "num_experts_per_tok")],
)  # fmt: skip
def test_bad_moe_config_is_refused(change, match, tmp_path):
    path = make_checkpoint("glm4v_moe", "tiny", tmp_path, seed=0, weights=False)
    cfg = json.loads((path / "config.json").read_text())
    cfg["text_config"].update(change)
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=match):
        load_model(path, load_format="dummy")


# ---- the engine on MoE: batching, chunking and prefix caching change nothing -----------------------


def test_engine_batches_moe_like_alone(tiny_checkpoint):
    path = tiny_checkpoint("glm4v_moe")
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    image = Image.open(IMAGES / "chelsea.png").convert("RGB")

    def conv(text, with_image):
        parts = [{"type": "image_url", "image_url": {"url": image}}] if with_image else []
        return [{"role": "user", "content": parts + [{"type": "text", "text": text}]}]

    convs = [conv("What animal is this?", True), conv("Hello there.", False), conv("1 2 3 4 5 6 7", False),
             conv("Describe it in many words please", True), conv("Why?", False)]  # fmt: skip
    llm = LLM(path, dtype="float32")
    alone = [llm.chat(c, params, use_tqdm=False)[0].outputs[0].token_ids for c in convs]
    assert len({tuple(a) for a in alone}) > 1
    chunked = LLM(path, dtype="float32", max_num_batched_tokens=37)
    assert [o.outputs[0].token_ids for o in chunked.chat(convs, params, use_tqdm=False)] == alone
    again = llm.chat(convs[0], params, use_tqdm=False)[0]  # same prompt again: served from the prefix cache
    assert again.num_cached_tokens > 0 and again.outputs[0].token_ids == alone[0]
