"""Each tensor-parallel rank holds only its share of the weights: the `small` glm4v checkpoint in float32,
`load_model(..., tensor_parallel_size=2)` on 2 ranks of a real gloo process group (packed weights off).

The share is worked out here from the checkpoint's tensor names and sizes alone: the projections of the text
and vision blocks (q/k/v/o_proj, qkv/proj, gate_up/gate/up/down_proj) and the vocabulary tensors (embed_tokens,
lm_head) are split in two, everything else (norms, merger, patch embedding, downsample, position embedding) is
whole on every rank. Each rank's VmRSS growth across the load is within 1.15x of that share (and not far
below it: the weights are really there); a second check, the ranks' parameter bytes sum to the checkpoint's
bytes plus the replicated part once more.
"""

from __future__ import annotations

import ctypes
import gc
import math
import os
import re

from safetensors import safe_open

from glimpse.testing import make_checkpoint
from glimpse.testing.parallel import run_ranks

# HF names of the tensors split between ranks (row-parallel biases would be held whole: glm4v has none)
SPLIT = re.compile(
    r"model\.(language_model\.layers|visual\.blocks)\.\d+\."
    r"((self_attn\.[qkvo]_proj|attn\.(qkv|proj)|mlp\.(gate_up|gate|up|down)_proj)\.weight"
    r"|(self_attn\.[qkv]_proj|attn\.qkv)\.bias)"
    r"|model\.language_model\.embed_tokens\.weight|lm_head\.weight"
)


def _rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def _settle() -> None:
    """Free what is garbage and hand glibc's free lists back to the OS: what is left is what the process holds
    (the storage that fusing q/k/v and moving weights to huge pages replaced may otherwise sit in them)."""
    gc.collect()
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if trim is not None:
        trim(0)


def _load_share(path: str, warm: str) -> tuple[int, int]:
    """Rank-side: (VmRSS growth across load_model of this rank's share, its parameters' bytes)."""
    os.environ["GLIMPSE_PACKED_WEIGHTS"] = "0"
    from glimpse.loader import load_model

    load_model(warm, "float32", tensor_parallel_size=2)  # imports and native kernels, outside the measurement
    _settle()
    before = _rss()
    model = load_model(path, "float32", tensor_parallel_size=2)
    _settle()
    return _rss() - before, sum(p.nbytes for p in model.parameters())


def test_each_rank_holds_its_share(tmp_path, tiny_checkpoint):
    path = make_checkpoint("glm4v", "small", tmp_path / "small", dtype="float32")
    split = replicated = 0
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        for name in f.keys():
            shape = f.get_slice(name).get_shape()
            nbytes = 4 * math.prod(shape)  # float32
            if SPLIT.fullmatch(name):
                assert shape[0] % 2 == 0 and (len(shape) == 1 or shape[-1] % 2 == 0), name  # halves exactly
                split += nbytes
            else:
                replicated += nbytes
    assert split > 4 * replicated  # the check means something: most of the model is split
    share = split // 2 + replicated

    results = run_ranks(_load_share, 2, str(path), str(tiny_checkpoint("glm4v")), timeout=600)
    for rank, (growth, _) in enumerate(results):
        why = f"rank {rank}: RSS grew {growth / 2**20:.1f} MiB for a share of {share / 2**20:.1f} MiB"
        assert 0.9 * share <= growth <= 1.15 * share, why
    assert sum(params for _, params in results) == split + 2 * replicated
