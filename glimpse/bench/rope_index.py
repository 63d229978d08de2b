"""`glimpse bench rope-index`: M-RoPE prompt positions, glimpse vs HF transformers' `get_rope_index`.

Method of SGLang PR 17420: batch 1, prompt lengths 1024, 2048, …, 131072 tokens, one image and
one video of 256 placeholder tokens each, the rest text. Both sides start from the same
`[T]` mm_token_types and produce `[3, T]` positions and the delta; each row reports the median
time of each side, the speed-up, and whether the outputs are identical. glimpse's path is
single-threaded NumPy; HF's loop is Python-bound, but its few large torch ops use torch's
intra-op threads, which stall when the cores are busy: `--threads 1` gives HF's steadiest time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch

from glimpse.models.mrope import (
    glm_mm_token_types,
    glm_mrope_positions,
    qwen_mm_token_types,
    qwen_mrope_positions,
)

DEFAULT_LENGTHS = [1024 * 2**i for i in range(8)]  # 1024 … 131072
MIN_LENGTH = 600  # the GLM image and video take 258 + 284 tokens
MERGE = 2
TOKENS_PER_SECOND = 2  # the value real Qwen2.5-VL checkpoints carry
IMAGE_GRID = [1, 32, 32]  # 16 x 16 = 256 placeholder tokens after the 2x2 merge
VIDEO_GRID = [4, 16, 16]  # 4 frames of 8 x 8 = 256 placeholder tokens
TEXT_ID = 1000
WARMUP = 20  # untimed calls per side: both are timed in steady state (glimpse still speeds up over its first ~10)
GLM = dict(image=151343, boi=151339, eoi=151340, bov=151341, eov=151342)
QWEN = dict(image=151655, video=151656, vision_start=151652, vision_end=151653)
# No bos/eos ids: Qwen's defaults (151643, 151645) lie outside the 64-token vocabulary, which HF warns about.
TINY_TEXT = dict(
    vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
    num_key_value_heads=1, bos_token_id=None, eos_token_id=None,
)  # fmt: skip
TINY_VISION = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=16)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--family", choices=["glm", "qwen", "both"], default="both")
    parser.add_argument(
        "--lengths",
        type=_lengths,
        default=DEFAULT_LENGTHS,
        help=f"comma-separated prompt lengths in tokens (each >= {MIN_LENGTH}); default 1024,2048,…,131072",
    )
    parser.add_argument(
        "--repeats", type=_positive, default=7, help="timed runs per side"
    )
    parser.add_argument(
        "--threads",
        type=_positive,
        default=None,
        help="torch intra-op threads for the run (default: unchanged)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object per (family, length)")


def _lengths(text: str) -> list[int]:
    try:
        lengths = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if min(lengths) < MIN_LENGTH:
        raise argparse.ArgumentTypeError(f"each length must be >= {MIN_LENGTH} (room for the two items)")
    return lengths


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return int(text)


def run(args: argparse.Namespace) -> list[dict]:
    families = ["glm", "qwen"] if args.family == "both" else [args.family]
    previous_threads = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    rows = []
    try:
        for family in families:
            hf_model = _hf_model(family)
            for seq_len in args.lengths:
                rows.append(_measure(family, hf_model, seq_len, args.repeats))
                if args.json:
                    print(json.dumps(rows[-1]), flush=True)
    finally:
        torch.set_num_threads(previous_threads)
    if not args.json:
        _print_table(rows)
    return rows


# ---- prompts --------------------------------------------------------------------------------


def _glm_prompt(seq_len: int) -> tuple[torch.Tensor, dict]:
    """text, image, text, video (4 frames each with a 2-token timestamp), text -> [T] types."""
    image = [GLM["boi"]] + [GLM["image"]] * 256 + [GLM["eoi"]]
    frame = [GLM["boi"]] + [GLM["image"]] * 64 + [GLM["eoi"]] + [TEXT_ID] * 2
    video = [GLM["bov"]] + frame * VIDEO_GRID[0] + [GLM["eov"]]
    ids = _with_text(seq_len, image, video)
    types = glm_mm_token_types(ids, GLM["image"], GLM["bov"], GLM["eov"])
    return types, dict(image_grid_thw=torch.tensor([IMAGE_GRID]), video_grid_thw=torch.tensor([VIDEO_GRID]))


def _qwen_prompt(seq_len: int) -> tuple[torch.Tensor, dict]:
    image = [QWEN["vision_start"]] + [QWEN["image"]] * 256 + [QWEN["vision_end"]]
    video = [QWEN["vision_start"]] + [QWEN["video"]] * 256 + [QWEN["vision_end"]]
    ids = _with_text(seq_len, image, video)
    types = qwen_mm_token_types(ids, QWEN["image"], QWEN["video"])
    grids = dict(image_grid_thw=torch.tensor([IMAGE_GRID]), video_grid_thw=torch.tensor([VIDEO_GRID]))
    return types, dict(grids, second_per_grid_ts=torch.tensor([1.0]))


def _with_text(seq_len: int, image: list[int], video: list[int]) -> torch.Tensor:
    """Spread the remaining tokens as text before, between and after the two items."""
    rest = seq_len - len(image) - len(video)
    a, b = rest // 3, rest // 3
    return torch.tensor([TEXT_ID] * a + image + [TEXT_ID] * b + video + [TEXT_ID] * (rest - a - b))


# ---- measuring ------------------------------------------------------------------------------


def _hf_model(family: str) -> torch.nn.Module:
    """A tiny random HF model: get_rope_index reads only the config's merge size (and Qwen's tps)."""
    from transformers import Glm4vConfig, Glm4vModel, Qwen2_5_VLConfig, Qwen2_5_VLModel

    vision = dict(TINY_VISION, spatial_merge_size=MERGE)
    if family == "glm":
        return Glm4vModel(Glm4vConfig(text_config=TINY_TEXT, vision_config=vision))
    vision = dict(vision, tokens_per_second=TOKENS_PER_SECOND, fullatt_block_indexes=[0])
    return Qwen2_5_VLModel(Qwen2_5_VLConfig(text_config=TINY_TEXT, vision_config=vision))


def _measure(family: str, hf_model: torch.nn.Module, seq_len: int, repeats: int) -> dict:
    types, media = (_glm_prompt if family == "glm" else _qwen_prompt)(seq_len)
    if family == "glm":
        ours = lambda: glm_mrope_positions(types, media["image_grid_thw"], media["video_grid_thw"], MERGE)  # noqa: E731
    else:
        # HF's rule, so the outputs can be compared; the default "reference" rule costs the same.
        ours = lambda: qwen_mrope_positions(  # noqa: E731
            types, media["image_grid_thw"], media["video_grid_thw"], media["second_per_grid_ts"],
            TOKENS_PER_SECOND, MERGE, video_rule="hf",
        )  # fmt: skip
    input_ids = torch.full((1, seq_len), TEXT_ID)  # get_rope_index reads only its shape
    hf = lambda: hf_model.get_rope_index(input_ids, types[None], **media)  # noqa: E731

    glimpse_ms, (pos, delta) = _median_ms(ours, repeats)
    hf_ms, (hf_pos, hf_delta) = _median_ms(hf, repeats)
    equal = torch.equal(pos, hf_pos[:, 0]) and delta == int(hf_delta)
    return dict(
        bench="rope-index", family=family, seq_len=seq_len, hf_ms=round(hf_ms, 4),
        glimpse_ms=round(glimpse_ms, 4), speedup=round(hf_ms / glimpse_ms, 1), equal=equal,
        repeats=repeats, warmup=WARMUP, torch_threads=torch.get_num_threads(),
    )  # fmt: skip


def _median_ms(fn: Callable[[], tuple], repeats: int) -> tuple[float, tuple]:
    out = fn()  # its output is the one compared
    for _ in range(WARMUP - 1):  # the first large allocations page-fault (~1 ms at 128k tokens), caches warm
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), out


def _print_table(rows: list[dict]) -> None:
    if rows:
        print(f"torch intra-op threads: {rows[0]['torch_threads']}")
    print(f"{'family':<7}{'tokens':>8}{'HF ms':>11}{'glimpse ms':>12}{'speed-up':>10}  equal")
    for r in rows:
        print(
            f"{r['family']:<7}{r['seq_len']:>8}{r['hf_ms']:>11.3f}{r['glimpse_ms']:>12.3f}"
            f"{r['speedup']:>9.1f}x  {r['equal']}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    rows = run(parser.parse_args())
    if not all(r["equal"] for r in rows):
        raise SystemExit("glimpse and HF positions differ")


if __name__ == "__main__":
    main()
