"""`glimpse bench preprocess`: steps 1-2 (media loading, preprocessing) against naive decoding and HF.

Video: a long H.264 clip with a long keyframe interval (made once with PyAV, cached in --workdir),
sampled with glm46v's rule; glimpse's seek-based `read_frames` against decoding every frame, each
mode in a fresh subprocess: frames decoded (counted as PyAV yields them), wall time, peak RSS.
Images: images/s of `preprocess_images` against the checkpoint's HF image processor (torchvision
backend, CPU), outputs compared with `torch.equal`, over `--image-iters` >= 3 timed passes; each ratio
comes with its spread (HF's fastest pass over glimpse's slowest, to HF's slowest over glimpse's
fastest). Prints tables, then one JSON object (last line).
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    import torch

# torch and glimpse are imported inside functions: the video workers run this file as a script
# and should start in a fraction of a second (importing glimpse pulls in torch and transformers).
MEDIA = Path(__file__).resolve().parents[2] / "examples" / "media"
IMAGE_FILES = ("camera.png", "chelsea.png", "rocket.jpg")
DEFAULT_SIDES = (224, 1024, 2048)  # longest side of the rescaled copies made beside each original
FAMILIES = ("glm46v", "qwen2_5_vl")
# "large": the pixel ceilings of released checkpoints instead of the tiny checkpoints' 64-256 tokens
# (glm46v: HF's Glm46VImageProcessor default; qwen2_5_vl: max_pixels of the Qwen2.5-VL releases).
LARGE_SIZE = {"glm46v": (12544, 11_760_000), "qwen2_5_vl": (3136, 12_845_056)}
BARCODE_BITS = 16  # each frame carries its own index as 16 black/white blocks along the top edge
VIDEO_MODES = {
    "seek": "glimpse probe_video + read_frames (seeks)",
    "full_keep_sampled": "PyAV decode of every frame, keep sampled",
    "full_keep_all": "PyAV decode of every frame, keep all",
}
TARGET_RATIO = 2.0
# Fewer timed passes per side let one scheduler hiccup decide the ratio (`--image-iters 1` printed 8-28x).
MIN_IMAGE_ITERS = 3
WORKER_FLAG = "--video-worker"  # internal: run one decoding mode (this file as a script, job on stdin)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from glimpse.units import int_at_least  # here, not at the top: see the note above

    p.add_argument("--workdir", help="cache for the video and checkpoints (default: a temp dir)")
    p.add_argument("--video-minutes", type=_positive(float), default=10.0)
    p.add_argument("--video-fps", type=_positive(int), default=30)
    p.add_argument("--gop", type=_positive(int), default=300, help="keyframe interval (x264 keyint)")
    p.add_argument("--image-iters", type=int_at_least(MIN_IMAGE_ITERS, "fewer passes make the ratio noise"), default=4,
                   help=f"timed passes per row, >= {MIN_IMAGE_ITERS} (fastest reported, min-max as the spread)")
    p.add_argument("--image-sides", type=_sides, default=DEFAULT_SIDES, help="longest sides of the copies")
    p.add_argument("--limits", choices=("checkpoint", "large", "both"), default="both", help="pixel ceilings")
    p.add_argument(
        "--threads", type=_positive(int), help="torch intra-op threads, both sides (default: torch's)"
    )
    p.add_argument("--skip-video", action="store_true")
    p.add_argument("--skip-images", action="store_true")


def _positive(cast: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {cast.__name__}, got {text!r}") from None
        if not (value > 0 and math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"expected a finite {cast.__name__} > 0, got {text!r}")
        return value

    return parse




def _sides(text: str) -> tuple[int, ...]:
    try:
        sides = tuple(int(x) for x in text.split(",") if x)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if any(s < 28 for s in sides):
        raise argparse.ArgumentTypeError("each side must be >= 28 pixels (one merged patch)")
    return sides


def run(args: argparse.Namespace) -> dict:
    import torch

    with tempfile.TemporaryDirectory(prefix="glimpse-bench-") as tmp:
        workdir = Path(args.workdir) if args.workdir else Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        previous_threads = torch.get_num_threads()
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        try:
            result: dict[str, Any] = {"bench": "preprocess", "torch_threads": torch.get_num_threads()}
            if not args.skip_video:
                result["video"] = bench_video(args, workdir)
                _print_video(result["video"])
            if not args.skip_images:
                result["images"] = bench_images(args, workdir)
                _print_images(result["images"], result["torch_threads"])
        finally:
            torch.set_num_threads(previous_threads)
    print(json.dumps(result), flush=True)
    return result


def _checkpoint(family: str, workdir: Path) -> Path:
    from glimpse.testing import make_checkpoint

    path = workdir / f"tiny-{family}"
    if not (path / "preprocessor_config.json").is_file():
        make_checkpoint(family, "tiny", path, weights=False)  # only the processor configs are read
    return path


# ---- video ----------------------------------------------------------------------------------


def make_video(path: Path, minutes: float, fps: int, gop: int, size: tuple[int, int] = (320, 180)) -> dict:
    """Encode a mostly static H.264 clip (a photo plus a barcode of the frame index) with PyAV.

    x264 `keyint=min-keyint=gop:scenecut=0` puts a keyframe exactly every `gop` frames; the
    ultrafast preset has no B-frames. Returns the recipe. Reused when `path` already exists.
    """
    import av

    from glimpse.errors import InvalidInputError

    width, height = size
    count = round(minutes * 60 * fps)
    if not 1 <= count < 2**BARCODE_BITS:
        raise InvalidInputError(f"the bench video would have {count} frames; it needs 1..{2**BARCODE_BITS - 1} "
                                "(knobs --video-minutes, --video-fps)")  # fmt: skip
    recipe = {"frames": count, "fps": fps, "width": width, "height": height, "keyframe_interval": gop,
              "how": f"PyAV libx264 preset=ultrafast x264-params=keyint={gop}:min-keyint={gop}:scenecut=0, "
                     f"yuv420p; rocket.jpg as a still background, frame index as a {BARCODE_BITS}-bit barcode"}  # fmt: skip
    if path.is_file():
        return dict(recipe, cached=True, bytes=path.stat().st_size)
    start = time.perf_counter()
    background = np.asarray(Image.open(MEDIA / "rocket.jpg").convert("RGB").resize((width, height)))
    bit_of_column = np.arange(width) * BARCODE_BITS // width
    part = path.with_name(path.name + ".part")
    with av.open(str(part), mode="w", format="mp4") as container:
        x264 = f"keyint={gop}:min-keyint={gop}:scenecut=0"
        stream = container.add_stream("libx264", rate=fps, options={"preset": "ultrafast", "x264-params": x264})  # fmt: skip
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(count):
            frame = background.copy()
            frame[: height // 10] = (((i >> bit_of_column) & 1) * 255).astype(np.uint8)[None, :, None]
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    part.replace(path)
    seconds = round(time.perf_counter() - start, 2)
    return dict(recipe, cached=False, bytes=path.stat().st_size, seconds=seconds)


def read_barcodes(frames: np.ndarray) -> list[int]:
    """Frame indices written by `make_video`, from `[n, H, W, 3]` frames (block centres, thresholded)."""
    _, height, width, _ = frames.shape
    centres = ((np.arange(BARCODE_BITS) * 2 + 1) * width) // (2 * BARCODE_BITS)
    strip = frames[:, height // 40 : height // 10 - height // 40, :, :].mean(axis=(1, 3))  # [n, W]
    bits = (strip[:, centres] > 127).astype(np.int64)
    return (bits << np.arange(BARCODE_BITS)).sum(axis=1).tolist()


def bench_video(args: argparse.Namespace, workdir: Path) -> dict:
    from glimpse.media.video import probe_video
    from glimpse.processing.sampling import sample_video
    from glimpse.processing.spec import load_specs

    name = f"long_{args.video_minutes:g}min_{args.video_fps}fps_320x180_gop{args.gop}.mp4"
    path = workdir / name
    recipe = make_video(path, args.video_minutes, args.video_fps, args.gop)
    meta = probe_video(path)
    _, video_spec = load_specs(_checkpoint("glm46v", workdir))
    indices = list(sample_video(meta, video_spec, "bench video").indices)
    modes = {mode: _run_worker({"mode": mode, "path": str(path), "indices": indices}) for mode in VIDEO_MODES}
    methods = {m.pop("memory_method") for m in modes.values()}
    seek, sampled, keep_all = modes["seek"], modes["full_keep_sampled"], modes["full_keep_all"]
    ratios = {
        "frames_decoded_full_over_seek": round(sampled["frames_decoded"] / seek["frames_decoded"], 3),
        "wall_full_keep_sampled_over_seek": round(sampled["wall_s"] / seek["wall_s"], 2),
        "wall_full_keep_all_over_seek": round(keep_all["wall_s"] / seek["wall_s"], 2),
        "peak_rss_full_keep_sampled_over_seek": round(sampled["peak_rss_mb"] / max(seek["peak_rss_mb"], 1e-3), 2),
        "peak_rss_full_keep_all_over_seek": round(keep_all["peak_rss_mb"] / max(seek["peak_rss_mb"], 1e-3), 2),
    }  # fmt: skip
    return {"file": str(path), "recipe": recipe, "total_frames": meta.total_num_frames, "fps": meta.fps,
            "duration_s": meta.duration, "sampler": video_spec.sampler, "sampled_frames": len(indices),
            "unique_sampled_frames": len(set(indices)), "memory_method": " / ".join(sorted(methods)),
            "modes": modes, "ratios": ratios}  # fmt: skip


def _run_worker(job: dict) -> dict:
    """One decoding mode in a fresh interpreter, so that peak RSS starts from the same place."""
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), WORKER_FLAG], input=json.dumps(job),
                          capture_output=True, text=True, env=env, check=False)  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"video worker {job['mode']} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def worker_main() -> None:
    """Subprocess entry: a job on stdin, one JSON result line on stdout."""
    job = json.loads(sys.stdin.read())
    print(json.dumps(decode_job(job["mode"], Path(job["path"]), [int(i) for i in job["indices"]])))


def decode_job(mode: str, path: Path, indices: list[int]) -> dict:
    """Decode `indices` of `path` one way; frames decoded (counted), kept, wall time, peak RSS delta."""
    import av  # noqa: F401 - imports happen before the clock and the RSS baseline

    if mode == "seek":
        import glimpse.media.video  # noqa: F401 - pulls in the whole package (torch, transformers)
    method, rss_before, rss_peak = _rss_probe()
    start = time.perf_counter()
    if mode == "seek":
        frames, decoded = _seek_decode(path, indices)
    else:
        frames, decoded = _plain_decode(path, indices, keep_all=mode == "full_keep_all")
    wall = time.perf_counter() - start
    peak_mb = (rss_peak() - rss_before) / 1024
    picked = np.stack([frames[i] for i in indices]) if isinstance(frames, list) else frames
    return {"mode": mode, "frames_decoded": decoded, "frames_kept": len(frames), "wall_s": round(wall, 3),
            "peak_rss_mb": round(peak_mb, 1), "memory_method": method,
            "frames_match_indices": read_barcodes(picked) == indices}  # fmt: skip


def _seek_decode(path: Path, indices: list[int]) -> tuple[np.ndarray, int]:
    """glimpse's path (probe for exact metadata, then read_frames), counting frames PyAV's decoder yields."""
    from glimpse.media import video

    decoded = 0
    # Every frame read_frames decodes passes through this generator. Frames that FFmpeg's frame
    # threads hold in flight when the reader seeks are never yielded, so are not counted (a few per seek).
    original = video._frames

    def counted(container: Any, stream: Any) -> Iterator[Any]:
        nonlocal decoded
        for frame in original(container, stream):
            decoded += 1
            yield frame

    video._frames = counted  # this subprocess only
    try:
        video.probe_video(path)
        frames = video.read_frames(path, indices)
    finally:
        video._frames = original
    if decoded < len(set(indices)):
        raise RuntimeError("the decode counter saw fewer frames than were returned: read_frames changed")
    return frames, decoded


def _plain_decode(path: Path, indices: list[int], keep_all: bool) -> tuple[Any, int]:
    """A naive loader: decode the whole file in order; keep the sampled frames (or every frame, as HF's
    `load_video` without a sampling function does) as RGB arrays. Keep-all returns a list (no stack)."""
    import av

    wanted = set(indices)
    kept: dict[int, np.ndarray] | list[np.ndarray] = [] if keep_all else {}
    decoded = 0
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"  # as read_frames sets it
        for i, frame in enumerate(container.decode(stream)):
            decoded += 1
            if isinstance(kept, list):
                kept.append(frame.to_ndarray(format="rgb24"))
            elif i in wanted:
                kept[i] = frame.to_ndarray(format="rgb24")
    if isinstance(kept, list):
        return kept, decoded
    return np.stack([kept[i] for i in indices]), decoded


def _rss_probe() -> tuple[str, int, Callable[[], int]]:
    """(method, RSS now in KiB, a reader of the peak since now). Linux: the kernel's VmHWM, reset here
    through /proc/self/clear_refs; elsewhere ru_maxrss, which never resets (import peaks count)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        maxrss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # noqa: E731
        return "ru_maxrss delta (never resets), fresh process per mode", maxrss(), maxrss
    method = "VmHWM minus VmRSS before decoding (HWM reset), fresh process per mode"
    return method, _status_kb("VmRSS"), functools.partial(_status_kb, "VmHWM")


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


# ---- images ---------------------------------------------------------------------------------


def image_set(sides: tuple[int, ...]) -> list[tuple[str, bytes]]:
    """The shipped photos as file bytes, plus copies rescaled to each longest side, re-encoded the same way."""
    items = []
    for name in IMAGE_FILES:
        data = (MEDIA / name).read_bytes()
        items.append((name, data))
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            for side in sides:
                scale = side / max(image.size)
                resized = image.resize((max(28, round(image.width * scale)), max(28, round(image.height * scale))),
                                       Image.Resampling.LANCZOS)  # fmt: skip
                buf = io.BytesIO()
                resized.save(buf, format=image.format, **({"quality": 90} if image.format == "JPEG" else {}))
                items.append((f"{name}@{resized.width}x{resized.height}", buf.getvalue()))
    return items


def _limit_dirs(family: str, workdir: Path, limits: str) -> list[tuple[str, Path]]:
    checkpoint = _checkpoint(family, workdir)
    out = [("checkpoint", checkpoint)] if limits in ("checkpoint", "both") else []
    if limits in ("large", "both"):
        cfg = json.loads((checkpoint / "preprocessor_config.json").read_text())
        lo, hi = LARGE_SIZE[family]
        cfg["size"] = {"shortest_edge": lo, "longest_edge": hi}
        if "max_pixels" in cfg:  # Qwen's top-level aliases win over size, in HF and glimpse alike
            cfg["min_pixels"], cfg["max_pixels"] = lo, hi
        large = workdir / f"large-{family}"
        large.mkdir(exist_ok=True)
        (large / "preprocessor_config.json").write_text(json.dumps(cfg, indent=2))
        out.append(("large", large))
    return out


def bench_images(args: argparse.Namespace, workdir: Path) -> dict:
    import transformers

    from glimpse.processing.spec import load_specs

    blobs = image_set(args.image_sides)
    rows = []
    for family in FAMILIES:
        for limits, folder in _limit_dirs(family, workdir, args.limits):
            image_spec, _ = load_specs(folder)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                hf = transformers.AutoImageProcessor.from_pretrained(folder, backend="torchvision")
            for call in ("per_image", "batch"):
                row = _measure_images(
                    hf, image_spec, [b for _, b in blobs], args.image_iters, call == "batch"
                )
                rows.append(dict(family=family, limits=limits, limits_pixels=[image_spec.min_pixels,
                                 image_spec.max_pixels], call=call, **row))  # fmt: skip
    return {"images": [n for n, _ in blobs], "hf_processor": "AutoImageProcessor(backend='torchvision'), CPU",
            "timing": "images/s of the fastest pass over the set (ratio_median: of the median pass; ratio_range: "
                      "HF's fastest pass over glimpse's slowest, to HF's slowest over glimpse's fastest); sides "
                      "alternate call by call; PIL decode from bytes before each call, untimed",
            "target_ratio": TARGET_RATIO, "rows": rows}  # fmt: skip


def _measure_images(hf: Any, spec: Any, blobs: list[bytes], iters: int, batched: bool) -> dict:
    """Pass times over the set per side. The sides alternate call by call (one image, or the batch), so
    both see the same load on a shared machine; each call gets freshly decoded PIL images (untimed)
    and its outputs are compared with torch.equal. Pass 0 warms up and is not timed."""
    import torch

    from glimpse.media.image import load_image
    from glimpse.processing.resize import preprocess_images

    def call(side: str, group: list[int]) -> tuple[torch.Tensor, torch.Tensor, float]:
        images = [load_image(blobs[i], f"image {i}") for i in group]  # fresh objects, nothing memoised
        start = time.perf_counter()
        if side == "glimpse":
            pv, grid = preprocess_images(images, spec)
        else:
            out = hf(images=images, return_tensors="pt")
            pv, grid = out["pixel_values"], out["image_grid_thw"]
        return pv, grid, time.perf_counter() - start

    groups = [list(range(len(blobs)))] if batched else [[i] for i in range(len(blobs))]
    times: dict[str, list[float]] = {"glimpse": [], "hf": []}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for it in range(iters + 1):
            spent = {"glimpse": 0.0, "hf": 0.0}
            for k, group in enumerate(groups):
                order = ("glimpse", "hf") if (it + k) % 2 else ("hf", "glimpse")
                outs = {side: call(side, group) for side in order}
                (pv, grid, _), (hf_pv, hf_grid, _) = outs["glimpse"], outs["hf"]
                if not (torch.equal(pv, hf_pv) and torch.equal(grid, hf_grid)):
                    raise RuntimeError(f"glimpse and HF outputs differ on images {group}; see tests/test_preprocess_parity.py")  # fmt: skip
                for side in spent:
                    spent[side] += outs[side][2]
            if it:
                for side in spent:
                    times[side].append(spent[side])
    n = len(blobs)
    best = {side: min(t) for side, t in times.items()}
    median = {side: statistics.median(t) for side, t in times.items()}
    return {"glimpse_images_per_s": round(n / best["glimpse"], 2), "hf_images_per_s": round(n / best["hf"], 2),
            "ratio": round(best["hf"] / best["glimpse"], 2), "ratio_median": round(median["hf"] / median["glimpse"], 2),
            "ratio_range": [round(best["hf"] / max(times["glimpse"]), 2), round(max(times["hf"]) / best["glimpse"], 2)],
            "equal": True, "passes": iters, "num_images": n,
            "pass_s": {side: [round(t, 6) for t in ts] for side, ts in times.items()}}  # fmt: skip


# ---- report ---------------------------------------------------------------------------------


def _print_video(v: dict) -> None:
    r = v["recipe"]
    made = "reused" if r["cached"] else f"made in {r['seconds']} s"
    print(f"video: {v['file']} ({made}, {r['bytes'] / 1e6:.1f} MB)\n  {r['how']}")
    print(f"  {v['total_frames']} frames, {v['fps']:g} fps, {v['duration_s']:g} s, keyframe every "
          f"{r['keyframe_interval']} frames; {v['sampler']} sampler picks {v['sampled_frames']} frames")  # fmt: skip
    print(f"{'mode':<46}{'decoded':>9}{'kept':>8}{'wall s':>9}{'peak RSS MB':>13}  frames ok")
    for mode, label in VIDEO_MODES.items():
        m = v["modes"][mode]
        print(f"{label:<46}{m['frames_decoded']:>9}{m['frames_kept']:>8}{m['wall_s']:>9.2f}"
              f"{m['peak_rss_mb']:>13.1f}  {m['frames_match_indices']}")  # fmt: skip
    print(f"  memory: {v['memory_method']}")
    print("  ratios: " + ", ".join(f"{k} {x}" for k, x in v["ratios"].items()))


def _print_images(res: dict, threads: int) -> None:
    print(f"\nimages: {len(res['images'])} ({', '.join(res['images'])}); torch threads {threads}; {res['timing']}")  # fmt: skip
    print(f"{'family':<12}{'limits':<12}{'call':<11}{'glimpse img/s':>14}{'HF img/s':>10}{'ratio (spread)':>20}"
          f"{'(median)':>10}  equal")  # fmt: skip
    for r in res["rows"]:
        lo, hi = r["ratio_range"]
        ratio = f"{r['ratio']:.2f}x ({lo:.2f}-{hi:.2f})"
        print(f"{r['family']:<12}{r['limits']:<12}{r['call']:<11}{r['glimpse_images_per_s']:>14.1f}"
              f"{r['hf_images_per_s']:>10.1f}{ratio:>20}{r['ratio_median']:>9.2f}x  {r['equal']}")  # fmt: skip
    print(f"  target: glimpse >= {res['target_ratio']:g}x HF's images/s")


def main() -> None:
    if sys.argv[1:] == [WORKER_FLAG]:
        worker_main()
        return
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    add_arguments(parser)
    run(parser.parse_args())


if __name__ == "__main__":
    main()
