"""Step 2 of the data path, preprocessing: resize maths, resampling, normalisation, patchify.

Takes RGB uint8 images (PIL or `[H, W, 3]` arrays) or a video `[T, H, W, 3]` uint8 and returns
HF's `pixel_values` `[N_patches, C*Tp*P*P]` float32 plus `grid_thw` int64 rows, bit-exact with
HF 5.23's torchvision backend on CPU (same `tvF.resize` call, same fused float32 normalize,
same merge-block row order; parity-spec §1.2-§1.6 and §2.1). A decoded video can also be
resized frame by frame as it is decoded (`frame_resizer`), then patchified (`preprocess_resized_video`).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as tvF

from glimpse.buffers import empty_buffer
from glimpse.errors import InvalidInputError
from glimpse.media.image import to_rgb
from glimpse.processing.spec import ImageSpec, VideoSpec

MAX_ASPECT_RATIO = 200

_INTERPOLATION = {
    2: tvF.InterpolationMode.BILINEAR,
    3: tvF.InterpolationMode.BICUBIC,
}


def _check_sides(height: int, width: int, what: str) -> None:
    if height <= 0 or width <= 0:
        raise InvalidInputError(f"{what} has size {height}x{width}: both sides must be at least 1 pixel")


def _check_aspect(height: float, width: float, what: str, shape: str) -> None:
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:
        raise InvalidInputError(
            f"{what} of size {shape} has aspect ratio {ratio:.2f} (after resizing rules), over the limit of "
            f"{MAX_ASPECT_RATIO} that the model's processor accepts; crop or pad it"
        )


def smart_resize_glm(
    num_frames: int,
    height: int,
    width: int,
    temporal_factor: int = 2,
    factor: int = 28,
    min_pixels: int = 112 * 112,
    max_pixels: int = 14 * 14 * 2 * 2 * 2 * 6144,
    what: str = "image",
) -> tuple[int, int]:
    """GLM target `(height, width)`, multiples of `factor` (parity-spec §1.2).

    Float64 with Python's round-half-even, in HF's expression order (`H / beta / f`), because
    values on a boundary flip the floor. `num_frames` is the raw T (images pass `temporal_factor`).
    """
    if num_frames < temporal_factor:
        raise InvalidInputError(
            f"{what} has {num_frames} frame(s); the GLM resize needs at least temporal_patch_size="
            f"{temporal_factor}"
        )
    _check_sides(height, width, what)
    shape = f"{height}x{width}"
    if height < factor or width < factor:
        # HF first scales tiny inputs up so that the short side is about `factor` (truncating).
        scale = max(factor / height, factor / width)
        height = int(height * scale)
        width = int(width * scale)
        if height == 0 or width == 0:
            raise InvalidInputError(
                f"{what} of size {shape} is too thin to resize (a side rounds to 0 pixels)"
            )
    _check_aspect(height, width, what, shape)
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    t_bar = round(num_frames / temporal_factor) * temporal_factor
    if t_bar * h_bar * w_bar > max_pixels:
        # The raw T (not t_bar) enters beta: HF does the same, and it matters for odd T.
        beta = math.sqrt((num_frames * height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (num_frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def smart_resize_qwen(
    height: int,
    width: int,
    factor: int = 28,
    min_pixels: int = 56 * 56,
    max_pixels: int = 14 * 14 * 4 * 1280,
    what: str = "image",
) -> tuple[int, int]:
    """Qwen2-VL target `(height, width)` (parity-spec §1.3): no up-scaling pre-step."""
    _check_sides(height, width, what)
    _check_aspect(height, width, what, f"{height}x{width}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    if h_bar == 0 or w_bar == 0:
        raise InvalidInputError(
            f"{what} of size {height}x{width} resizes to {h_bar}x{w_bar}; raise min_pixels ({min_pixels})"
        )
    return h_bar, w_bar


def image_target_size(height: int, width: int, spec: ImageSpec, what: str = "image") -> tuple[int, int]:
    """Resized `(height, width)` of one image under `spec`."""
    if spec.resize_rule == "qwen":
        return smart_resize_qwen(height, width, spec.factor, spec.min_pixels, spec.max_pixels, what)
    return smart_resize_glm(
        spec.temporal_patch_size,
        height,
        width,
        spec.temporal_patch_size,
        spec.factor,
        spec.min_pixels,
        spec.max_pixels,
        what,
    )


def video_frames_in(num_frames: int, spec: VideoSpec) -> int:
    """Frame count T that the resize rule sees for a clip of `num_frames` frames.

    Departure from HF (documented): HF's GLM resize raises for T < Tp ("t:1 must be larger than
    temporal_factor:2"); glimpse accepts a 1-frame clip and treats it as that frame repeated,
    which is what HF produces for the same frame handed in twice. Qwen needs no change: HF
    accepts T=1 there (only `cap_pixels_per_frame` reads T, and it reads the raw T).
    """
    if spec.resize_rule == "qwen":
        return num_frames
    return max(num_frames, spec.temporal_patch_size)


def video_target_size(
    num_frames: int, height: int, width: int, spec: VideoSpec, what: str = "video"
) -> tuple[int, int]:
    """Resized `(height, width)` shared by all `num_frames` frames of one video."""
    if num_frames < 1:
        raise InvalidInputError(f"{what} has no frames")
    t = video_frames_in(num_frames, spec)
    if spec.resize_rule == "qwen":
        max_pixels = spec.max_pixels
        if spec.cap_pixels_per_frame:
            # HF Qwen2VLVideoProcessor(cap_pixels_per_frame=True): an even share of the video budget.
            total_pixels = int(spec.max_video_tokens * spec.factor * spec.factor * 0.9)
            max_pixels = max(
                min(max_pixels, total_pixels * spec.temporal_patch_size // t), int(spec.min_pixels * 1.05)
            )
        return smart_resize_qwen(height, width, spec.factor, spec.min_pixels, max_pixels, what)
    return smart_resize_glm(
        t, height, width, spec.temporal_patch_size, spec.factor, spec.min_pixels, spec.max_pixels, what
    )


def resize_uint8(images: torch.Tensor, size: tuple[int, int], resample: int = 3) -> torch.Tensor:
    """`[..., 3, H, W]` uint8 -> `[..., 3, h, w]` uint8 with HF's exact call (antialiased, CPU uint8 kernel).

    Channels-last inputs (a permuted HWC array) take torch's fast uint8 path; the output is
    bit-identical to the contiguous layout HF uses (checked in tests/test_preprocess_parity.py).
    """
    return tvF.resize(images, list(size), interpolation=_INTERPOLATION[resample], antialias=True)


# Patch rows normalised per chunk in `_patch_rows`: 256 rows are ~1.2 MB of float32, which stays in
# a core's L2 from the uint8 shuffle through normalisation to the write into the output rows.
_CHUNK_ROWS = 256


def normalize_constants(spec: ImageSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """HF's fused rescale+normalize constants: float32 `mean/r` and `std/r`, shaped `[1, 3, 1, 1]`.

    Built with HF's exact expression (`tensor(mean) * (1 / rescale_factor)`), so that
    `(x - mean_r) / std_r` in float32 is bit-identical to HF's torchvision backend.
    """
    mean_r = torch.tensor(spec.image_mean) * (1.0 / spec.rescale_factor)
    std_r = torch.tensor(spec.image_std) * (1.0 / spec.rescale_factor)
    return mean_r.view(1, -1, 1, 1), std_r.view(1, -1, 1, 1)


def _image_hw(image: Image.Image | np.ndarray, what: str) -> tuple[int, int]:
    """(height, width) of one image, checking its type and layout without converting it."""
    if isinstance(image, Image.Image):
        return image.height, image.width
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise InvalidInputError(
                f"{what}: array must be uint8 [H, W, 3], got {image.dtype} {list(image.shape)}"
            )
        return image.shape[0], image.shape[1]
    raise InvalidInputError(
        f"{what}: unsupported type {type(image).__name__}; pass a PIL image or a uint8 array"
    )


def _hwc_array(image: Image.Image | np.ndarray) -> np.ndarray:
    """One RGB image (checked by `_image_hw`) -> `[H, W, 3]` uint8 array that torch may wrap."""
    if isinstance(image, Image.Image):
        if image.mode != "RGB":
            image = to_rgb(image)  # HF's compositing of transparency onto white
        return np.array(image)  # a private, writable copy (PIL hands out a read-only buffer)
    return image if image.flags.writeable else image.copy()


_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _pool(workers: int) -> ThreadPoolExecutor:
    """The process-wide pool `preprocess_images` spreads a batch over (regrown if torch's thread
    count went up; a replaced pool finishes the work it holds)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None or _POOL._max_workers < workers:
            _POOL = ThreadPoolExecutor(workers, thread_name_prefix="glimpse-image-batch")
        return _POOL


def _patch_rows(
    resized: torch.Tensor,
    spec: ImageSpec,
    mean_r: torch.Tensor,
    std_r: torch.Tensor,
    repeat_frame: bool,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, list[int]]:
    """Resized frames `[T, 3, h, w]` uint8 (HWC memory) -> rows `[gt*gh*gw, C*Tp*P*P]` float32.

    Rows are in merge-block order `(gt, bh, bw, mh, mw)` and each row flattens `(c, tau, py, px)`
    (parity-spec §1.6). The block shuffle runs on uint8 (a quarter of the bytes of HF's float
    shuffle) and normalisation is elementwise afterwards, so the bits are the same. With
    `repeat_frame` (images) the single frame fills every tau slot. Rows are written into `out`
    when given, so a batch needs no final concatenation.
    """
    tp, p, m = spec.temporal_patch_size, spec.patch_size, spec.merge_size
    t, c, h, w = resized.shape
    gh, gw = h // p, w // p
    gt, tau = (t, 1) if repeat_frame else (t // tp, tp)
    bh, per_bh = gh // m, gw * m  # block rows per frame group, patch rows per block row
    hwc = resized.permute(0, 2, 3, 1).contiguous().numpy()  # free when the resize kept HWC memory
    x = hwc.reshape(gt, tau, bh, m, p, gw // m, m, p, c)
    # (gt, tau, bh, mh, py, bw, mw, px, c) -> (gt, bh, c, bw, mh, mw, tau, py, px): merge-block
    # order per channel plane. numpy's strided copy is faster than torch's on these 14-byte runs.
    planes = x.transpose(0, 2, 8, 5, 3, 6, 1, 4, 7)
    if out is None:
        out = empty_buffer((gt * bh * per_bh, c * tp * p * p))
    out_np = out.numpy()
    # Chunks of whole block rows, so that every pass below stays in the cache. Each chunk is shuffled
    # into channel planes (uint8), converted and normalised there with one scalar per plane (long
    # contiguous loops), then written once into its rows (c, tau) slots. NumPy is single-threaded:
    # torch's intra-op threads cost more than they gain on chunks this small; the float32 ops are
    # IEEE's, as in HF's torch calls, so the bits are the same.
    step = max(1, _CHUNK_ROWS // per_bh)
    most = min(step, bh) * per_bh
    u8 = np.empty((c, most, tau, p * p), dtype=np.uint8)
    f32 = np.empty((c, most, tau, p * p), dtype=np.float32)
    mean, std = mean_r.numpy().reshape(c, 1, 1, 1), std_r.numpy().reshape(c, 1, 1, 1)
    for g in range(gt):
        for b0 in range(0, bh, step):
            b1 = min(b0 + step, bh)
            start, stop = (g * bh + b0) * per_bh, (g * bh + b1) * per_bh
            k = stop - start
            src = planes[g, b0:b1]  # (b, c, bw, mh, mw, tau, py, px)
            np.copyto(u8[:, :k].reshape(c, b1 - b0, *src.shape[2:]), src.swapaxes(0, 1))
            plane = f32[:, :k]
            np.copyto(plane, u8[:, :k])  # uint8 -> float32, exact
            np.subtract(plane, mean, out=plane)
            np.divide(plane, std, out=plane)
            rows = out_np[start:stop].reshape(k, c, tp, p * p)
            for slot in range(0, tp, tau):  # images fill every tau slot with their one frame
                np.copyto(rows[:, :, slot : slot + tau], plane.swapaxes(0, 1))
    return out, [gt, gh, gw]


def patchify_image(resized: torch.Tensor, spec: ImageSpec) -> tuple[torch.Tensor, list[int]]:
    """`[3, h, w]` uint8 (resized) -> (`[gh*gw, C*Tp*P*P]` float32, `[1, gh, gw]`); tau repeats the image."""
    mean_r, std_r = normalize_constants(spec)
    return _patch_rows(resized.unsqueeze(0), spec, mean_r, std_r, repeat_frame=True)


def patchify_video(resized: torch.Tensor, spec: ImageSpec) -> tuple[torch.Tensor, list[int]]:
    """`[T, 3, h, w]` uint8 (resized) -> (`[gt*gh*gw, C*Tp*P*P]` float32, `[gt, gh, gw]`).

    T is padded to a multiple of Tp by repeating the last frame, as HF does.
    """
    if pad := -resized.shape[0] % spec.temporal_patch_size:
        resized = torch.cat([resized, resized[-1:].expand(pad, *resized.shape[1:])])
    mean_r, std_r = normalize_constants(spec)
    return _patch_rows(resized, spec, mean_r, std_r, repeat_frame=False)


def preprocess_images(
    images: Sequence[Image.Image | np.ndarray], spec: ImageSpec
) -> tuple[torch.Tensor, torch.Tensor]:
    """RGB images -> (`pixel_values` `[sum(gh*gw), 1176]` f32, `image_grid_thw` `[n, 3]` int64).

    Items keep their input order. Each image is resized on its own (HF batches same-shape
    images, which gives the same pixels: the kernel is per image).
    """
    if len(images) == 0:
        raise InvalidInputError("no images to preprocess")
    mean_r, std_r = normalize_constants(spec)
    sizes = []
    for i, image in enumerate(images):  # all sizes first: one output buffer, no concatenation
        height, width = _image_hw(image, f"image {i}")
        if isinstance(image, Image.Image):
            image.load()  # decode a lazy image here, once: PIL objects are not safe to load from two threads
        sizes.append(image_target_size(height, width, spec, f"image {i}"))
    p = spec.patch_size
    counts = [(h // p) * (w // p) for h, w in sizes]
    pixel_values = empty_buffer((sum(counts), 3 * spec.temporal_patch_size * p * p))
    starts = np.cumsum([0, *counts]).tolist()

    def one(i: int) -> list[int]:
        """Image i's rows, written into its slice of `pixel_values`; its grid."""
        resized = _resized_image(images[i], sizes[i], spec)
        return _patch_rows(resized, spec, mean_r, std_r, True, pixel_values[starts[i] : starts[i + 1]])[1]

    # Images are independent and PIL, torch's resize and NumPy release the GIL: a batch runs on
    # as many threads as torch may use (its own kernels gain little on one image; measured).
    workers = min(torch.get_num_threads(), len(images))
    if workers <= 1:
        grids = [one(i) for i in range(len(images))]
    else:
        grids = list(_pool(workers).map(one, range(len(images))))  # raises the first failure in order
    return pixel_values, torch.tensor(grids, dtype=torch.int64)


def preprocess_image(image: Image.Image | np.ndarray, spec: ImageSpec, name: str = "image 0") -> tuple[torch.Tensor, list[int]]:
    """One RGB image -> (`[gh*gw, C*Tp*P*P]` float32, grid `[1, gh, gw]`): `preprocess_images` for a single
    image (the same calls, so the same bits), naming it in its errors."""
    height, width = _image_hw(image, name)
    return patchify_image(_resized_image(image, image_target_size(height, width, spec, name), spec)[0], spec)


def _resized_image(image: Image.Image | np.ndarray, size: tuple[int, int], spec: ImageSpec) -> torch.Tensor:
    """One RGB image -> `[1, 3, h, w]` uint8 at `size`. A permuted HWC view is channels-last: torch's fast
    uint8 path, the same pixels as HF."""
    return resize_uint8(torch.from_numpy(_hwc_array(image)).permute(2, 0, 1).unsqueeze(0), size, spec.resample)


def frame_resizer(
    num_frames: int, spec: VideoSpec, what: str = "video"
) -> Callable[[np.ndarray], np.ndarray]:
    """A function `[H, W, 3]` uint8 -> `[h, w, 3]` uint8 that resizes a clip's frames one at a time.

    `(h, w)` is `video_target_size(num_frames, H, W)`: the size `preprocess_video` gives the whole
    clip of `num_frames` frames (the caller may compute it from the stream's stated size to refuse
    a clip before decoding; here it follows the frames as decoded, as HF does). Each frame takes the
    same `tvF.resize` call as `preprocess_video`'s batch, and that kernel works image by image, so
    the pixels are the same (tests/test_preprocess_parity.py).
    """
    sizes: dict[tuple[int, int], tuple[int, int]] = {}

    def resize_frame(rgb: np.ndarray) -> np.ndarray:
        hw = (rgb.shape[0], rgb.shape[1])
        if hw not in sizes:
            sizes[hw] = video_target_size(num_frames, *hw, spec, what)
        if not rgb.flags.writeable:
            rgb = rgb.copy()
        # A permuted HWC array is channels-last: torch's fast uint8 path, same pixels as HF.
        frame = torch.from_numpy(rgb).permute(2, 0, 1).unsqueeze(0)
        return resize_uint8(frame, sizes[hw], spec.resample)[0].permute(1, 2, 0).numpy()

    return resize_frame


def preprocess_resized_video(resized: np.ndarray, spec: VideoSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Frames already resized to the clip's target size, `[T, h, w, 3]` uint8 -> (`pixel_values_videos`, `[1, 3]` grid).

    Same rows as `preprocess_video` on the frames before resizing: padding T to a multiple of Tp
    (also a clip shorter than Tp) repeats the last frame, which commutes with the per-frame resize.
    """
    rows, grid = patchify_video(torch.from_numpy(resized).permute(0, 3, 1, 2), spec)
    return rows, torch.tensor([grid], dtype=torch.int64)


def preprocess_video(
    frames: np.ndarray | torch.Tensor, spec: VideoSpec, what: str = "video"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampled frames `[T, H, W, 3]` uint8 -> (`pixel_values_videos` `[gt*gh*gw, 1176]`, `video_grid_thw` `[1, 3]`).

    All frames share one target size computed with the T handed in (before temporal padding).
    A clip shorter than Tp is padded first (see `video_frames_in`).
    """
    if isinstance(frames, np.ndarray):
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[3] != 3:
            raise InvalidInputError(
                f"video frames must be uint8 [T, H, W, 3], got {frames.dtype} {list(frames.shape)}"
            )
        if not frames.flags.writeable:
            frames = frames.copy()
        frames = torch.from_numpy(frames)
    if frames.dtype != torch.uint8 or frames.ndim != 4 or frames.shape[3] != 3:
        raise InvalidInputError(
            f"video frames must be uint8 [T, H, W, 3], got {frames.dtype} {list(frames.shape)}"
        )
    t, h, w = int(frames.shape[0]), int(frames.shape[1]), int(frames.shape[2])
    if t == 0:
        raise InvalidInputError(f"{what} has no frames")
    size = video_target_size(t, h, w, spec, what)
    if t < spec.temporal_patch_size:
        frames = torch.cat([frames, frames[-1:].expand(spec.temporal_patch_size - t, h, w, 3)])
    resized = resize_uint8(frames.permute(0, 3, 1, 2), size, spec.resample)
    rows, grid = patchify_video(resized, spec)
    return rows, torch.tensor([grid], dtype=torch.int64)
