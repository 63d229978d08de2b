"""Weight loading: every checkpoint tensor is consumed exactly once; broken folders name the problem."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import checkpoint_tensors, meta_model
from safetensors.torch import save_file

from glimpse import load_model
from glimpse.errors import CheckpointError
from glimpse.loader import load_weights
from glimpse.testing import make_checkpoint


@pytest.mark.parametrize("family", ["glm4v", "glmga", "qwen2_5_vl"])
@pytest.mark.parametrize("layout", [{}, {"shards": 3, "legacy_names": True}, {"dtype": "bfloat16", "shards": 2}])
def test_every_tensor_consumed_once(family, layout, tmp_path):
    path = make_checkpoint(family, "tiny", tmp_path, seed=1, **layout)
    on_disk = checkpoint_tensors(path)
    model = meta_model(path)
    report = load_weights(model, path, torch.float32)
    # Each tensor on disk was read exactly once (the report is keyed by checkpoint name) ...
    assert sorted(report.source) == sorted(on_disk)
    # ... and lands in exactly one parameter, with its value.
    params = dict(model.named_parameters(remove_duplicate=False))
    targets = [report.renamed.get(k, k) for k in on_disk]
    assert len(set(targets)) == len(targets)
    assert set(targets) | set(model.tied_weight_names()) == set(params)
    for key, tensor in on_disk.items():
        torch.testing.assert_close(params[report.renamed.get(key, key)], tensor.float(), rtol=0, atol=0)
    for name, source in model.tied_weight_names().items():
        assert params[name] is params[source] or params[name].data_ptr() == params[source].data_ptr()


def test_dtypes_and_float16_on_disk(tmp_path):
    path = make_checkpoint("glm4v", "tiny", tmp_path, dtype="float16")
    for dtype in (torch.float32, torch.bfloat16):
        model = load_model(path, dtype=dtype)
        assert {p.dtype for p in model.parameters()} == {dtype}


def test_missing_tensor_is_named(tmp_path):
    path = make_checkpoint("glm4v", "tiny", tmp_path)
    tensors = checkpoint_tensors(path)
    tensors.pop("model.language_model.layers.1.mlp.down_proj.weight")
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing tensors: model\.language_model\.layers\.1\.mlp\.down_proj\.weight"):
        load_model(path)


def test_unexpected_tensor_is_named(tmp_path):
    path = make_checkpoint("qwen2_5_vl", "tiny", tmp_path)
    tensors = checkpoint_tensors(path)
    tensors["model.language_model.layers.0.mlp.extra.weight"] = torch.zeros(2)
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"unexpected tensor model\.language_model\.layers\.0\.mlp\.extra\.weight"):
        load_model(path)


def test_wrong_shape_is_named(tmp_path):
    path = make_checkpoint("glm4v", "tiny", tmp_path)
    tensors = checkpoint_tensors(path)
    tensors["lm_head.weight"] = tensors["lm_head.weight"][:-1].clone()
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"lm_head\.weight has shape"):
        load_model(path)


def test_truncated_file_is_named(tmp_path):
    path = make_checkpoint("glm4v", "tiny", tmp_path, shards=2)
    shard = sorted(path.glob("model-*.safetensors"))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=shard.name):
        load_model(path)


def test_corrupt_header_is_named(tmp_path):
    path = make_checkpoint("glm4v", "tiny", tmp_path)
    f = path / "model.safetensors"
    f.write_bytes(b"\xff" * 64 + f.read_bytes()[64:])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(path)


def test_index_naming_a_missing_shard(tmp_path):
    path = make_checkpoint("glm4v", "tiny", tmp_path, shards=2)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    gone = sorted(set(index["weight_map"].values()))[0]
    (path / gone).unlink()
    with pytest.raises(CheckpointError, match=gone):
        load_model(path)


def test_duplicate_tensor_across_files(tmp_path):
    path = make_checkpoint("glm4v", "tiny", tmp_path)
    shutil.copy(path / "model.safetensors", path / "model-copy.safetensors")
    (path / "model.safetensors").rename(path / "model-orig.safetensors")
    with pytest.raises(CheckpointError, match="appears in both"):
        load_model(path)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        load_model(tmp_path)
    with pytest.raises(CheckpointError, match="not a directory"):
        load_model(tmp_path / "nope")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(CheckpointError, match="'llama' is not supported"):
        load_model(tmp_path)


def test_dummy_load_format_needs_only_config(tmp_path):
    path = make_checkpoint("qwen2_5_vl", "tiny", tmp_path)
    for f in path.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(CheckpointError, match="load_format='dummy'"):
        load_model(path)
    a = load_model(path, load_format="dummy", seed=5)
    b = load_model(path, load_format="dummy", seed=5)
    ids = torch.arange(1, 20)
    torch.testing.assert_close(a.compute_logits(ids), b.compute_logits(ids), rtol=0, atol=0)
    assert a.compute_logits(ids).std() > 0.1


def test_large_parameters_move_to_huge_pages_keeping_values_and_ties():
    """glimpse.buffers.move_to_huge_pages: parameters of >= 4 MiB get new (huge-page) storage with the
    same values; tied parameters stay one tensor; small ones stay where they are."""
    from glimpse.buffers import move_to_huge_pages

    torch.manual_seed(0)
    embed = torch.nn.Embedding(8192, 256)  # 8 MiB in float32
    head = torch.nn.Linear(256, 8192, bias=False)
    head.weight = embed.weight  # tied, as lm_head and embed_tokens can be
    small = torch.nn.Linear(16, 16)
    model = torch.nn.ModuleDict({"embed": embed, "head": head, "small": small})
    before = {name: p.detach().clone() for name, p in model.named_parameters(remove_duplicate=False)}
    big_ptr, small_ptr = embed.weight.data_ptr(), small.weight.data_ptr()
    move_to_huge_pages(model)
    assert embed.weight is head.weight  # still tied: one Parameter, new storage
    assert embed.weight.data_ptr() != big_ptr
    assert small.weight.data_ptr() == small_ptr
    for name, p in model.named_parameters(remove_duplicate=False):
        assert torch.equal(p, before[name]), name
    x = torch.randint(0, 8192, (5,))
    torch.testing.assert_close(model["head"](model["embed"](x)), before["head.weight"][x] @ before["head.weight"].T)
