"""Helpers to drive HF transformers 5.23 as the oracle: real media in, HF processor outputs out.

Videos are decoded here with PyAV directly (HF's own loader needs torchcodec), every frame,
and handed to HF's processor with their metadata so that HF samples frames itself.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import transformers
from PIL import Image
from transformers.video_utils import VideoMetadata


def read_all_frames(path: Path) -> tuple[np.ndarray, VideoMetadata]:
    import av  # here, not at the top: tests/test_cuda.py runs on GPU machines without PyAV
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        frames = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(s)])
        fps = float(s.average_rate)
    n = len(frames)
    meta = VideoMetadata(total_num_frames=n, fps=fps, width=frames.shape[2], height=frames.shape[1],
                         duration=n / fps, frames_indices=list(range(n)))  # fmt: skip
    return frames, meta


def rgb(path: Path) -> Image.Image:
    return Image.open(path).convert("RGB")


def hf_inputs(proc, content: list[dict], images=(), videos=(), **kwargs) -> dict:
    """Render the chat template and run HF's processor on the given media (document order)."""
    text = proc.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False)
    call = {"text": [text], "return_tensors": "pt", **kwargs}
    if images:
        call["images"] = list(images)
    if videos:
        call["videos"] = [v[0] for v in videos]
        call["video_metadata"] = [v[1] for v in videos]
    return dict(proc(**call))


@contextmanager
def qwen_reference_rope(model):
    """Patch HF's Qwen2.5-VL `get_rope_index` to the reference rule (text after a video at max+1).

    The only patch allowed to the oracle (issue: foundation). The replacement is written here
    from the published rule as a plain per-token loop, independent of glimpse's vectorised code.
    """
    inner = model.model
    original = inner.get_rope_index
    cfg = model.config
    tps = cfg.vision_config.tokens_per_second
    merge = cfg.vision_config.spatial_merge_size

    def reference(input_ids, mm_token_type_ids, image_grid_thw=None, video_grid_thw=None,
                  second_per_grid_ts=None, attention_mask=None, **kwargs):  # fmt: skip
        assert input_ids.shape[0] == 1 and attention_mask is None or bool(attention_mask.all())
        types = mm_token_type_ids[0].tolist()
        images = iter(image_grid_thw.tolist() if image_grid_thw is not None else [])
        videos = iter(video_grid_thw.tolist() if video_grid_thw is not None else [])
        spg = iter(second_per_grid_ts.tolist() if second_per_grid_ts is not None else [])
        pos, i, s = [], 0, 0
        while i < len(types):
            if types[i] == 0:
                pos.append((s, s, s))
                s, i = s + 1, i + 1
                continue
            t, h, w = next(images) if types[i] == 1 else next(videos)
            scale = torch.tensor(tps * (next(spg) if types[i] == 2 else 0.0), dtype=torch.float32)
            hh, ww = h // merge, w // merge
            for k in range(t):
                tk = int((torch.tensor(float(k)) * scale).item())
                for y in range(hh):
                    for x in range(ww):
                        pos.append((s + tk, s + y, s + x))
            s = max(max(p) for p in pos[-t * hh * ww :]) + 1
            i += t * hh * ww
        positions = torch.tensor(pos, dtype=torch.long).T[:, None, :]
        delta = positions.max() + 1 - len(types)
        return positions.to(input_ids.device), torch.tensor([[delta]], device=input_ids.device)

    inner.get_rope_index = reference
    try:
        yield
    finally:
        inner.get_rope_index = original


def hf_model(path: Path, dtype=torch.float32):
    return transformers.AutoModelForImageTextToText.from_pretrained(path, dtype=dtype).eval()


def hf_processor(path: Path):
    return transformers.AutoProcessor.from_pretrained(path)


__all__ = ["read_all_frames", "rgb", "hf_inputs", "qwen_reference_rope", "hf_model", "hf_processor"]


# float32 noise band for logits: a top-2 margin below this is a tie that rounding may break either way.
TIE_MARGIN = 1e-4


def hf_greedy(model, inputs: dict, max_new_tokens: int, **kwargs) -> tuple[list[int], list[float]]:
    """HF greedy tokens and, per step, HF's top-2 logit margin."""
    import torch

    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, **kwargs)  # fmt: skip
    tokens = out.sequences[0, inputs["input_ids"].shape[1] :].tolist()
    margins = []
    for step_logits in out.logits:
        top2 = step_logits[0].float().topk(2).values
        margins.append(float(top2[0] - top2[1]))
    return tokens, margins


def assert_same_until_a_tie(got: list[int], ref: list[int], margins: list[float]) -> None:
    """Engine tokens `got` equal HF's `ref` (with HF's per-step top-2 `margins`), or first differ at a float32
    tie in HF's own logits (< TIE_MARGIN); past that the two follow different prefixes."""
    k = next((i for i, (a, b) in enumerate(zip(got, ref, strict=False)) if a != b), None)
    if k is None:
        assert got == ref
    else:
        assert margins[k] < TIE_MARGIN, f"token {k}: {got[k]} vs HF {ref[k]} with HF margin {margins[k]:.2e}"


def assert_greedy_matches(ref: list[int], margins: list[float], generate_from) -> int:
    """Assert glimpse's greedy tokens equal HF's, token for token.

    Where they differ, HF's own top-2 margin at that step must be a tie within float32 noise
    (< TIE_MARGIN); glimpse then continues from HF's token (`generate_from(prefix, n)` must
    return n greedy tokens after the prompt plus `prefix`) and must match again. Returns the
    number of tie steps met (usually 0).
    """
    pos, ties = 0, 0
    while pos < len(ref):
        got = generate_from(ref[:pos], len(ref) - pos)
        k = next((i for i, (a, b) in enumerate(zip(got, ref[pos:], strict=False)) if a != b), None)
        if k is None:
            assert len(got) == len(ref) - pos, (got, ref[pos:])
            return ties
        step = pos + k
        assert margins[step] < TIE_MARGIN, (
            f"greedy token {step} differs from HF ({got[k]} vs {ref[step]}) although HF's top-2 margin is "
            f"{margins[step]:.2e}, well above float32 noise")  # fmt: skip
        ties += 1
        pos = step + 1
    return ties
