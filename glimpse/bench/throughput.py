"""Offline throughput: glimpse vs HF transformers' batched generate on one mixed image workload,
plus batch-1 decode speed against the machine's memory read bandwidth.

Part 1 (`small` checkpoint, bfloat16, same thread count): 64 requests, each with its own
distinct image (crops and rescales of the shipped photos, so token counts differ), prompts of
different lengths, 64 output tokens with ignore_eos. HF runs the way its users batch:
left padding, batches of 16. glimpse runs with its prefix and encoder caches off (vision tower
eager, then through its compiled per-budget graphs, `encoder_graph="on"`, the `glimpse serve`
default), then with the caches on.
Part 2: a `load_format="dummy"` checkpoint of >= 500M parameters, decode-only tokens/s at
batch 1, the weight bytes that implies per second, and the read bandwidth of this machine
measured in the same run (summing a tensor far larger than the caches).
`--workload video` (Qwen2.5-VL `small`): distinct clips cut from the shipped slideshow, run with
EVS video token pruning off and at `--video-pruning-rate` (0.5); prints the tokens saved and the speed-up.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from glimpse.device_names import DEVICE_HELP
from glimpse.media.video import VideoMetadata, probe_video, read_frames

MEDIA = Path(__file__).resolve().parents[2] / "examples" / "media"
VIDEO_FPS = 2.0  # frames sampled per second of the video workload's clips
WORDS = "please describe the picture in detail and tell me what stands out about its colours and shapes".split()


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--family", default=None, choices=("glm4v", "glm46v", "glmga", "qwen2_5_vl"),
                   help="default glm46v (image workload); the video workload is qwen2_5_vl only")  # fmt: skip
    p.add_argument("--workload", default="image", choices=("image", "video"),
                   help="video: EVS pruning off vs --video-pruning-rate on video clips (Qwen2.5-VL)")  # fmt: skip
    p.add_argument("--num-videos", type=int, default=8, help="requests of the video workload")
    p.add_argument("--video-pruning-rate", type=float, default=0.5, help="EVS rate the video workload compares to 0")
    p.add_argument("--video-repeats", type=int, default=2, help="timed passes per rate (best is reported)")
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--hf-batch-size", type=int, default=16)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--skip-hf", action="store_true", help="only run glimpse (part 1)")
    p.add_argument("--skip-decode", action="store_true", help="skip part 2 (batch-1 decode vs bandwidth)")
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=None, help="torch threads for both systems (default: torch's)")
    p.add_argument("--device", default="cpu", help=f"where both systems run: {DEVICE_HELP} (default cpu)")
    p.add_argument("--json", action="store_true", help="print only the JSON result")
    p.add_argument("--workdir", default=None, help="where to write checkpoints (default: a temp dir)")


def workload(n: int, seed_offset: int = 0) -> list[tuple[Image.Image, str]]:
    """n distinct images (crops and rescales of the shipped photos) with prompts of different lengths.

    `seed_offset` shifts the crops (a different but same-sized workload, e.g. for warm-up).
    """
    bases = [Image.open(MEDIA / f).convert("RGB") for f in ("rocket.jpg", "chelsea.png", "camera.png")]
    items = []
    for i in range(n):
        base = bases[i % len(bases)]
        w, h = base.size
        left, top = (i * 13 + seed_offset) % (w // 4), (i * 7 + seed_offset) % (h // 4)
        crop = base.crop((left, top, w - (i * 5) % (w // 4), h - (i * 11) % (h // 4)))
        scale = 0.5 + (i % 9) * 0.15
        img = crop.resize((max(56, int(crop.width * scale)), max(56, int(crop.height * scale))))
        prompt = " ".join(WORDS[: 3 + (i * 5) % (len(WORDS) - 3)])
        items.append((img, prompt))
    return items


def _messages(img: Image.Image, prompt: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": img}}, {"type": "text", "text": prompt}]}]


def run_glimpse(path: Path, items, output_len: int, dtype: str, caches: bool, encoder_graph: str = "off",
                device: str = "cpu") -> dict:  # fmt: skip
    from glimpse import LLM, SamplingParams

    # encoder_graph="on" compiles one vision graph per token budget here, before the clock starts
    llm = LLM(path, dtype=dtype, max_num_seqs=len(items), max_num_batched_tokens=4096, enable_prefix_caching=caches,
              enable_encoder_cache=caches, encoder_graph=encoder_graph, device=device)  # fmt: skip
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    warm = Image.new("RGB", (97, 61), (120, 30, 200))  # not in the workload: warms kernels, not caches
    llm.chat(_messages(warm, "warm up"), SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    t0 = time.perf_counter()
    outs = llm.chat([_messages(img, p) for img, p in items], params, use_tqdm=False)
    seconds = time.perf_counter() - t0
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    prompt_tokens = [len(o.prompt_token_ids) for o in outs]
    cache_mode, encoder_mode = "on" if caches else "off", "graph" if encoder_graph == "on" else "eager"
    return {"system": f"glimpse (caches {cache_mode}, encoder {encoder_mode})", "key": f"caches_{cache_mode}_{encoder_mode}",
            "seconds": seconds, "output_tokens": tokens,
            "tokens_per_s": tokens / seconds, "prompt_tokens_min": min(prompt_tokens), "prompt_tokens_max": max(prompt_tokens)}  # fmt: skip


def run_hf(path: Path, items, output_len: int, dtype: str, batch_size: int, device: str = "cpu") -> dict:
    import transformers

    proc = transformers.AutoProcessor.from_pretrained(path)
    proc.tokenizer.padding_side = "left"
    model = transformers.AutoModelForImageTextToText.from_pretrained(path, dtype=getattr(torch, dtype)).eval().to(device)

    def batch(chunk):
        texts = [proc.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": p}]}],
                                          add_generation_prompt=True, tokenize=False) for _, p in chunk]  # fmt: skip
        inputs = proc(text=texts, images=[img for img, _ in chunk], padding=True, return_tensors="pt").to(device)
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=output_len, min_new_tokens=output_len, do_sample=False)
        return (out.shape[1] - inputs["input_ids"].shape[1]) * out.shape[0]

    batch(workload(batch_size, seed_offset=1))  # untimed warm-up batch (oneDNN kernels, allocator)
    t0 = time.perf_counter()
    tokens = 0
    for s in range(0, len(items), batch_size):
        tokens += batch(items[s : s + batch_size])
    seconds = time.perf_counter() - t0
    return {"system": f"HF generate (batch {batch_size}, left pad)", "seconds": seconds, "output_tokens": tokens,
            "tokens_per_s": tokens / seconds}  # fmt: skip


def read_bandwidth(gib: float = 1.0, repeats: int = 5, device: str = "cpu") -> float:
    """Bytes/s of `torch.sum` over a float32 tensor much larger than the caches, on torch's current
    threads or on the GPU `device` (median of `repeats` after one untimed pass)."""
    x = torch.ones(int(gib * 2**30 / 4), dtype=torch.float32, device=device)
    float(x.sum())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        float(x.sum())  # float(): waits for a GPU's result
        times.append(time.perf_counter() - t0)
    return x.nbytes / statistics.median(times)


DECODE_WINDOWS = 3  # decode windows, each right after its own bandwidth probe


def run_decode(workdir: Path, family: str, n_tokens: int, device: str = "cpu") -> dict:
    """Batch-1 decode tokens/s against the read bandwidth measured just before, in DECODE_WINDOWS
    alternating (probe, decode window) pairs: this shared machine's bandwidth drifts between runs,
    so each window is compared with its own probe; the median window is reported."""
    from glimpse import LLM, SamplingParams
    from glimpse.testing import make_checkpoint

    path = make_checkpoint(family, "medium", workdir / f"{family}-medium", weights=False)
    llm = LLM(path, dtype="bfloat16", load_format="dummy", max_num_seqs=1, kv_cache_memory="512MiB", device=device)
    params_count = sum(p.numel() for p in llm.engine.model.parameters())
    weight_bytes = params_count * 2
    engine = llm.engine
    total = DECODE_WINDOWS * n_tokens
    engine.add_request("decode", [1, 2, 3, 4, 5, 6, 7, 8], SamplingParams(temperature=0, max_tokens=total + 2, ignore_eos=True))
    engine.step()  # prefill
    engine.step()  # first decode step (warm-up)
    windows = []
    for _ in range(DECODE_WINDOWS):
        bw = read_bandwidth(device=device)
        t0 = time.perf_counter()
        for _ in range(n_tokens):
            if not engine.has_unfinished_requests():
                raise RuntimeError("the decode request finished early; every timed step must make one token")
            engine.step()
        tok_s = n_tokens / (time.perf_counter() - t0)
        windows.append({"decode_tokens_per_s": tok_s, "read_bandwidth_bytes_per_s": bw,
                        "fraction_of_bandwidth": weight_bytes * tok_s / bw})  # fmt: skip
    engine.abort("decode")
    median = sorted(windows, key=lambda w: w["fraction_of_bandwidth"])[len(windows) // 2]
    return {"parameters": params_count, **median, "weight_bytes_per_s": weight_bytes * median["decode_tokens_per_s"],
            "windows": windows}  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from glimpse.platform import resolve_device
    from glimpse.testing import make_checkpoint

    args.device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.workload == "video":
        return run_video(args)
    args.family = args.family or "glm46v"
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="glimpse-bench-"))
    path = make_checkpoint(args.family, "small", workdir / f"{args.family}-small", seed=0, dtype=args.dtype)
    items = workload(args.num_requests)
    # oneDNN JIT-compiles kernels per shape on first use and keeps them process-wide: one untimed
    # pass over the same workload first, so no measured system pays that cost for the others.
    dev = args.device
    run_glimpse(path, workload(args.num_requests, seed_offset=1), args.output_len, args.dtype, caches=False, device=dev)
    rows = [run_glimpse(path, items, args.output_len, args.dtype, caches=False, device=dev),
            run_glimpse(path, items, args.output_len, args.dtype, caches=False, encoder_graph="on", device=dev),
            run_glimpse(path, items, args.output_len, args.dtype, caches=True, encoder_graph="on", device=dev)]  # fmt: skip
    if not args.skip_hf:
        rows.append(run_hf(path, items, args.output_len, args.dtype, args.hf_batch_size, dev))
    result = {"family": args.family, "dtype": args.dtype, "device": dev, "threads": torch.get_num_threads(),
              "num_requests": args.num_requests, "output_len": args.output_len, "rows": rows}  # fmt: skip
    if not args.skip_hf:
        hf = rows[-1]["tokens_per_s"]
        result["speedup"] = {r["key"]: round(r["tokens_per_s"] / hf, 3) for r in rows[:-1]}
    if not args.skip_decode:
        result["decode_batch1"] = run_decode(workdir, args.family, args.decode_tokens, dev)
    if not args.json:
        print(f"{'system':40s} {'seconds':>9s} {'out tokens':>10s} {'tok/s':>9s}")
        for r in rows:
            print(f"{r['system']:40s} {r['seconds']:9.2f} {r['output_tokens']:10d} {r['tokens_per_s']:9.1f}")
        if "speedup" in result:
            print("glimpse / HF: " + ", ".join(f"{v:.2f}x ({k.replace('_', ' ')})" for k, v in result["speedup"].items()))
        if "decode_batch1" in result:
            d = result["decode_batch1"]
            print("batch-1 decode windows (probe, then decode): " + ", ".join(
                f"{w['decode_tokens_per_s']:.2f} tok/s vs {w['read_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s -> "
                f"{100 * w['fraction_of_bandwidth']:.0f}%" for w in d["windows"]))
            print(f"batch-1 decode (median window), {d['parameters'] / 1e6:.0f}M params bf16: {d['decode_tokens_per_s']:.2f} tok/s = "
                  f"{d['weight_bytes_per_s'] / 1e9:.2f} GB/s of weights; machine read bandwidth "
                  f"{d['read_bandwidth_bytes_per_s'] / 1e9:.2f} GB/s -> {100 * d['fraction_of_bandwidth']:.0f}%")  # fmt: skip
    print(json.dumps(result))
    return 0


# ---- video workload: EVS (video token pruning) off vs on ----------------------------------------


def video_clips(n: int) -> list[tuple[tuple[np.ndarray, VideoMetadata], str]]:
    """n distinct clips of the shipped slideshow (30 fps): different windows, lengths and crops."""
    src = MEDIA / "slideshow_30fps.mp4"
    meta = probe_video(src)
    frames = read_frames(src, range(meta.total_num_frames))
    total, height, width = frames.shape[:3]
    clips = []
    for i in range(n):
        length = 120 + (i * 23) % 150  # 4-9 s: 4 to 9 frames at VIDEO_FPS
        start = (i * 37) % (total - length)
        top, left = (i * 7) % (height // 5), (i * 11) % (width // 5)
        clip = np.ascontiguousarray(frames[start : start + length, top : height - (i * 5) % (height // 5),
                                           left : width - (i * 3) % (width // 5)])  # fmt: skip
        clip_meta = VideoMetadata(total_num_frames=length, fps=30.0, duration=length / 30.0,
                                  width=clip.shape[2], height=clip.shape[1])  # fmt: skip
        clips.append(((clip, clip_meta), " ".join(WORDS[: 3 + (i * 5) % (len(WORDS) - 3)])))
    return clips


def _video_messages(video: tuple[np.ndarray, VideoMetadata], prompt: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": video}}, {"type": "text", "text": prompt}]}]


def evs_engine(path: Path, clips, dtype: str, rate: float):
    """An LLM at pruning `rate` with both caches off (every pass does the full work), warmed up on a
    clip outside the workload, and the workload's prompts preprocessed (outside the clock)."""
    from glimpse import LLM, SamplingParams

    llm = LLM(path, dtype=dtype, max_num_seqs=len(clips), max_num_batched_tokens=4096, video_pruning_rate=rate,
              enable_prefix_caching=False, enable_encoder_cache=False)  # fmt: skip
    (warm, warm_meta), _ = video_clips(1)[0]  # reversed frames: not in the workload
    llm.chat(_video_messages((np.ascontiguousarray(warm[::-1]), warm_meta), "warm up"),
             SamplingParams(temperature=0, max_tokens=4), use_tqdm=False, mm_processor_kwargs={"fps": VIDEO_FPS})  # fmt: skip
    return llm, [llm.processor(_video_messages(v, p), fps=VIDEO_FPS) for v, p in clips]


def timed_pass(llm, prompts, output_len: int) -> tuple[float, int]:
    """(seconds, output tokens) of one pass over all prompts, from queueing to the last token."""
    from glimpse import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    engine = llm.engine
    t0 = time.perf_counter()
    for i, prompt in enumerate(prompts):
        engine.add_request(f"video-{i}", prompt, params)
    outs = []
    while engine.has_unfinished_requests():
        outs += [o for o in engine.step() if o.finished]
    return time.perf_counter() - t0, sum(len(o.outputs[0].token_ids) for o in outs)


def run_video(args: argparse.Namespace) -> int:
    from glimpse.models.evs import check_pruning_rate
    from glimpse.testing import make_checkpoint

    family = args.family or "qwen2_5_vl"
    if family != "qwen2_5_vl":
        raise SystemExit("--workload video measures EVS, which is Qwen2.5-VL only: use --family qwen2_5_vl")
    rate = check_pruning_rate(args.video_pruning_rate, "--video-pruning-rate")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="glimpse-bench-"))
    path = make_checkpoint(family, "small", workdir / f"{family}-small", seed=0, dtype=args.dtype)
    clips = video_clips(args.num_videos)
    engines = [evs_engine(path, clips, args.dtype, r) for r in (0.0, rate)]
    best, out_tokens = [float("inf"), float("inf")], [0, 0]
    for _ in range(args.video_repeats):  # alternate the two so that load from other processes hits both
        for j, (llm, prompts) in enumerate(engines):
            seconds, tokens = timed_pass(llm, prompts, args.output_len)
            best[j], out_tokens[j] = min(best[j], seconds), tokens
    rows = []
    for (_, prompts), r, seconds, tokens in zip(engines, (0.0, rate), best, out_tokens, strict=True):
        videos = [m for p in prompts for m in p.videos]
        rows.append({"system": f"glimpse, video_pruning_rate {r}", "rate": r, "seconds": seconds, "output_tokens": tokens,
                     "tokens_per_s": tokens / seconds, "prompt_tokens": sum(len(p.input_ids) for p in prompts),
                     "video_tokens": sum(m.num_tokens for m in videos),
                     "video_tokens_unpruned": sum(m.num_encoded_tokens for m in videos)})  # fmt: skip
    off, on = rows
    saved = off["prompt_tokens"] - on["prompt_tokens"]
    result = {"workload": "video", "family": family, "dtype": args.dtype, "threads": torch.get_num_threads(),
              "num_requests": len(clips), "output_len": args.output_len, "repeats": args.video_repeats, "rows": rows,
              "tokens_saved": saved, "tokens_saved_fraction": saved / off["prompt_tokens"],
              "speedup": off["seconds"] / on["seconds"]}  # fmt: skip
    if not args.json:
        print(f"{'system':34s} {'prompt tok':>10s} {'video tok':>9s} {'seconds':>8s} {'out tok/s':>9s}")
        for r in rows:
            print(f"{r['system']:34s} {r['prompt_tokens']:10d} {r['video_tokens']:9d} {r['seconds']:8.2f} "
                  f"{r['tokens_per_s']:9.1f}")  # fmt: skip
        print(f"EVS at {rate}: {saved} of {off['prompt_tokens']} prompt tokens saved "
              f"({100 * result['tokens_saved_fraction']:.1f}%; video {off['video_tokens']} -> {on['video_tokens']}); "
              f"speed-up {result['speedup']:.2f}x ({len(clips)} requests, {args.output_len} output tokens each, "
              f"best of {args.video_repeats}; the vision encoder's work is the same in both)")  # fmt: skip
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    raise SystemExit(run(parser.parse_args()))
