"""Tensor parallelism against one process: 2 ranks of a real gloo process group on this machine.

For every layout (glm4v, glm46v, glm46v Flash, glmga, glm4v_moe, glm46v MoE, glm_ocr, qwen2_5_vl) in
float32, the logits at every position of an image prompt and a video prompt on 2 ranks are within 2e-5
of one process's scale and greedy tokens are identical; with the vision tower split by heads ("weights"), kept
whole with the media split between ranks ("data"), and for the MoE layouts with experts whole on one
rank each (expert parallel). HF parity of the one-process model is tests/test_model_parity.py's.
"""

from __future__ import annotations

import pytest
import torch
from conftest import IMAGES, VIDEOS

from glimpse import load_model
from glimpse.errors import InvalidInputError
from glimpse.processing.processor import load_processor
from glimpse.testing import FAMILIES
from glimpse.testing.checkpoints import MOE_FAMILIES
from glimpse.testing.parallel import run_ranks

GREEDY_TOKENS = 6


def _prompts(path) -> dict[str, dict]:
    processor = load_processor(path)
    image = {"type": "image_url", "image_url": {"url": str(IMAGES / "chelsea.png")}}
    image2 = {"type": "image_url", "image_url": {"url": str(IMAGES / "rocket.jpg")}}
    video = {"type": "video_url", "video_url": {"url": str(VIDEOS / "coffee_15frames_10fps.webm")}}
    out = {}
    for name, parts in (("images", [image, image2, {"type": "text", "text": "Compare them."}]),
                        ("video", [video, {"type": "text", "text": "What happens?"}])):  # fmt: skip
        processed = processor(messages=[{"role": "user", "content": parts}])
        out[name] = {k: v for k, v in processed.items() if k != "attention_mask"}
    return out


def _run(path, prompts: dict[str, dict], options: dict) -> dict:
    """Logits at every position and greedy tokens of each prompt, on this process's share of the model."""
    model = load_model(path, "float32", **options)
    out = {}
    for name, inputs in prompts.items():
        out[name] = (model.compute_logits(**inputs), model.greedy(max_new_tokens=GREEDY_TOKENS, **inputs))
    return out


def _on_ranks(jobs: list[tuple]) -> list[dict]:
    """Rank-side: every job (path, prompts, options) with tensor_parallel_size 2; rank 0's results."""
    return [_run(path, prompts, {"tensor_parallel_size": 2, **options}) for path, prompts, options in jobs]


def _cases(family: str) -> list[dict]:
    cases = [{"mm_encoder_tp_mode": "weights"}, {"mm_encoder_tp_mode": "data"}]
    if family in MOE_FAMILIES:
        cases.append({"enable_expert_parallel": True})
    return cases


@pytest.fixture(scope="module")
def two_rank_results(tiny_checkpoint):
    """One 2-rank run for every family and case (process start-up is the slow part); with the
    one-process reference of each family."""
    jobs, keys, reference = [], [], {}
    for family in FAMILIES:
        path = tiny_checkpoint(family)
        prompts = _prompts(path)
        reference[family] = _run(path, prompts, {})
        for options in _cases(family):
            jobs.append((path, prompts, options))
            keys.append((family, tuple(sorted(options.items()))))
    rank0, rank1 = run_ranks(_on_ranks, 2, jobs)
    return reference, dict(zip(keys, rank0, strict=True)), dict(zip(keys, rank1, strict=True))


@pytest.mark.parametrize("family", FAMILIES)
def test_two_ranks_match_one_process(family, two_rank_results):
    reference, rank0, rank1 = two_rank_results
    for options in _cases(family):
        key = (family, tuple(sorted(options.items())))
        for prompt, (ref_logits, ref_tokens) in reference[family].items():
            logits, tokens = rank0[key][prompt]
            where = f"{family} {options} {prompt}"
            assert logits.shape == ref_logits.shape, where
            # Splitting a sum over ranks rounds it in another order: float32 noise, relative to the logits'
            # scale (the tiny GLM's reach ~9: 1.2e-4 at most; the tiny Qwen's ~105, where one process with 1
            # thread against 2 already differs by 2.3e-4).
            diff, scale = (logits - ref_logits).abs().max().item(), ref_logits.abs().max().item()
            assert diff <= 2e-5 * scale, f"{where}: logits differ by {diff} (scale {scale})"
            assert tokens == ref_tokens, where
            # every rank computes the same (gathered) logits, so their greedy choices agree
            assert rank1[key][prompt][1] == tokens, where


def test_kv_head_share_by_hand():
    from glimpse.distributed import TensorParallel

    assert [TensorParallel(r, 4).kv_head_share(2) for r in range(4)] == [(0, 1), (0, 1), (1, 1), (1, 1)]
    assert [TensorParallel(r, 2).kv_head_share(4) for r in range(2)] == [(0, 2), (2, 2)]
    with pytest.raises(InvalidInputError, match="num_key_value_heads 2 is fewer than tensor_parallel_size"):
        TensorParallel(0, 3).kv_head_share(2)


def _on_four_ranks(path, prompts) -> dict:
    return _run(path, prompts, {"tensor_parallel_size": 4, "mm_encoder_tp_mode": "data"})


@pytest.mark.parametrize("family", ["glm4v", "qwen2_5_vl"])
def test_fewer_kv_heads_than_ranks(family, tiny_checkpoint):
    """4 ranks over 4 query heads and 2 KV heads: each KV head is kept by the 2 ranks whose query heads use
    it (ranks 0-1 head 0, ranks 2-3 head 1); the same logits and tokens as one process."""
    path = tiny_checkpoint(family)
    prompts = _prompts(path)
    prompts.pop("video")
    reference = _run(path, prompts, {})
    results = run_ranks(_on_four_ranks, 4, path, prompts)
    for rank, got in enumerate(results):
        logits, tokens = got["images"]
        ref_logits, ref_tokens = reference["images"]
        assert (logits - ref_logits).abs().max().item() <= 2e-5 * ref_logits.abs().max().item(), rank
        assert tokens == ref_tokens, rank


def _bf16_logits(jobs: list[tuple]) -> list[dict]:
    return [{name: load_model(path, "bfloat16", tensor_parallel_size=2, mm_encoder_tp_mode=mode).compute_logits(**inputs)
             for name, inputs in prompts.items()} for path, prompts, mode in jobs]  # fmt: skip


def test_bfloat16_on_two_ranks_is_as_close_to_float32(tiny_checkpoint):
    """bf16 (the native CPU kernels, with each rank's share of the heads) against float32 truth: splitting
    changes the roundings, not their size; every error within 1.5x one process's (measured: at most 1.26x)."""
    families = ["glm4v", "glm4v_moe", "qwen2_5_vl"]
    jobs, truth, one = [], {}, {}
    for family in families:
        path = tiny_checkpoint(family)
        prompts = _prompts(path)
        truth[family] = {k: load_model(path, "float32").compute_logits(**v) for k, v in prompts.items()}
        one[family] = {k: load_model(path, "bfloat16").compute_logits(**v) for k, v in prompts.items()}
        jobs += [(path, prompts, "weights"), (path, prompts, "data")]
    two = run_ranks(_bf16_logits, 2, jobs)[0]
    for i, (family, mode) in enumerate((f, m) for f in families for m in ("weights", "data")):
        for name, ref in truth[family].items():
            err_one = (one[family][name] - ref).abs().max().item()
            err_two = (two[i][name] - ref).abs().max().item()
            assert err_two <= 1.5 * err_one, f"{family} {mode} {name}: {err_two} against one process's {err_one}"


def _vocab_layers(path) -> dict:
    """Rank-side: a 641-id vocabulary over 2 ranks (321 + 320 ids, the second share padded with a zero row),
    read from a safetensors file as the loader reads a shard, against the whole table."""
    import torch.distributed as dist
    from safetensors import safe_open

    from glimpse.distributed import TensorParallel
    from glimpse.distributed.layers import ParallelLMHead, VocabParallelEmbedding
    from glimpse.loader import _read

    tp = TensorParallel(dist.get_rank(), 2, dist.group.WORLD)
    embedding, head = VocabParallelEmbedding(641, 8, tp), ParallelLMHead(8, 641, tp)
    with safe_open(str(path), "pt") as f:
        for layer in (embedding, head):
            spec = layer.checkpoint_shards["weight"]
            layer.weight.data = _read(f, "w", spec, tuple(layer.weight.shape), path.name)
    ids = torch.tensor([0, 5, 320, 321, 322, 640])
    return {"rows": embedding.weight.shape[0], "embed": embedding(ids), "logits": head(torch.eye(8))}


def test_vocabulary_split_with_padding(tmp_path):
    from safetensors.torch import save_file

    table = torch.randn(641, 8, generator=torch.Generator().manual_seed(0))
    save_file({"w": table}, tmp_path / "w.safetensors")
    for rank, got in enumerate(run_ranks(_vocab_layers, 2, tmp_path / "w.safetensors")):
        assert got["rows"] == 321, rank  # ceil(641 / 2) on both ranks
        ids = torch.tensor([0, 5, 320, 321, 322, 640])
        assert torch.equal(got["embed"], table[ids]), rank  # each row from the rank that holds it, summed with zeros
        assert got["logits"].shape == (8, 641), rank
        torch.testing.assert_close(got["logits"], table.T, rtol=0, atol=1e-6)


def _encode_split(path, pixels, grids) -> dict:
    from glimpse.models.base import IMAGE

    model = load_model(path, "float32", tensor_parallel_size=2, mm_encoder_tp_mode="data")
    seen = []
    encode = model.encode_images

    def counting(pixel_values, grid_thw):
        seen.append(grid_thw.tolist())
        return encode(pixel_values, grid_thw)

    model.encode_images = counting
    return {"seen": seen, "out": model.encode_media(IMAGE, pixels, grids)}


def test_data_parallel_encoder_splits_the_items(tiny_checkpoint):
    """Three images of 36, 24 and 48 patches over 2 ranks: rank 0 encodes the first two (its run holds the
    middle patches up to 54 of 108), rank 1 the third; both get all three embeddings, equal to one process's."""
    path = tiny_checkpoint("glm4v")
    model = load_model(path, "float32")
    grids = torch.tensor([[1, 6, 6], [1, 4, 6], [1, 6, 8]])
    pixels = torch.randn(int(grids.prod(-1).sum()), model.patch_dim, generator=torch.Generator().manual_seed(1))
    whole = model.encode_images(pixels, grids)
    results = run_ranks(_encode_split, 2, path, pixels, grids)
    assert results[0]["seen"] == [[[1, 6, 6], [1, 4, 6]]]
    assert results[1]["seen"] == [[[1, 6, 8]]]
    for got in results:
        torch.testing.assert_close(got["out"], whole, rtol=0, atol=1e-5)
