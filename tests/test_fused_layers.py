"""The decode-step fusions (glimpse/models/layers.py): `fuse_linears` against the projections it
replaces, the native RMSNorm (alone and after the residual add) against a float64 reference of
HF's roundings, and loaded (fused) models against the unfused ones, which the parity tests hold to HF.
"""

from __future__ import annotations

import pytest
import torch
from conftest import KernelSpy, meta_model
from torch import nn

from glimpse import kernels, load_model
from glimpse.loader import load_weights
from glimpse.models.layers import RMSNorm, fuse_linears
from glimpse.testing import make_checkpoint


@pytest.mark.parametrize("bias", [True, False])
def test_fuse_linears_is_the_parts_side_by_side(bias):
    torch.manual_seed(0)
    parts = [nn.Linear(48, n, bias=bias) for n in (32, 16, 16)]
    x = torch.randn(5, 48)
    fused = fuse_linears(*parts)
    assert tuple(fused.weight.shape) == (64, 48) and (fused.bias is not None) == bias
    ref = torch.cat(
        [x.double() @ p.weight.double().T + (p.bias.double() if bias else 0) for p in parts], dim=-1
    )
    torch.testing.assert_close(fused(x).double(), ref, atol=1e-5, rtol=1e-5)


def _reference_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF's RMSNorm roundings with float64 arithmetic: bf16(x * rsqrt(mean(x^2) + eps)), then bf16(w * that)."""
    h = x.double()
    normed = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).bfloat16()
    return (weight.double() * normed.double()).bfloat16()


@pytest.mark.parametrize(("rows", "hidden"), [(1, 768), (7, 2048), (130, 100)])
def test_native_rms_norm_and_residual_add(native_kernels, monkeypatch, rows, hidden):
    spy = KernelSpy(native_kernels)
    monkeypatch.setattr(kernels, "cpu_kernels", lambda: spy)
    gen = torch.Generator().manual_seed(rows)
    norm = RMSNorm(hidden, eps=1e-5).bfloat16()
    with torch.no_grad():
        norm.weight.copy_(1 + 0.2 * torch.randn(hidden, generator=gen))
    x = (3 * torch.randn(rows, hidden, generator=gen)).bfloat16()
    delta = torch.randn(rows, hidden, generator=gen).bfloat16()
    with torch.inference_mode():
        total, normed = norm.add(x, delta)
        alone = norm(x)
    assert spy.calls == {"rms_norm_bf16": 2}
    torch.testing.assert_close(
        total, (x.float() + delta.float()).bfloat16(), rtol=0, atol=0
    )  # torch's bf16 add
    for got, ref in (
        (normed, _reference_norm(total, norm.weight, 1e-5)),
        (alone, _reference_norm(x, norm.weight, 1e-5)),
    ):
        # the float32 mean square may round differently from float64's: at most one bf16 step, rarely
        ulp = ref.float().abs().clamp_min(1e-30) * 2.0**-7
        assert bool(((got.float() - ref.float()).abs() <= ulp).all())
        assert float((got != ref).float().mean()) < 0.01


@pytest.mark.parametrize("family", ["glm4v", "qwen2_5_vl", "glm4v_moe"])
def test_loaded_model_is_fused_and_equals_the_unfused_one(family, tmp_path):
    path = make_checkpoint(family, "tiny", tmp_path, seed=2)
    fused = load_model(path)
    unfused = meta_model(path)
    load_weights(unfused, path, torch.float32)
    names = {name.rsplit(".", 2)[-2] for name, _ in fused.model.language_model.named_parameters()}
    assert "qkv_proj" in names and not {"q_proj", "k_proj", "v_proj"} & names
    if family != "glm4v":  # GLM's dense checkpoints store gate_up_proj fused already
        assert "gate_up_proj" in names and not {"gate_proj", "up_proj"} & names
    ids = torch.tensor([5, 17, 33, 100, 7, 64, 9])
    torch.testing.assert_close(
        fused.compute_logits(ids), unfused.eval().compute_logits(ids), atol=1e-4, rtol=1e-5
    )
    assert fused.greedy(ids, 8) == unfused.greedy(ids, 8)
