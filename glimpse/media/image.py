"""Step 1 of the data path, media loading (images): bytes / path / base64 / data URL / PIL / array -> RGB PIL image.

`load_image(src) -> PIL.Image` in mode RGB: the header size is checked against `max_pixels`
before any pixel is decoded, EXIF orientation is applied, and transparency is composited onto
white exactly as HF's torchvision backend does for PIL input (parity-spec §1.1). Every failure
is a MediaError (or MediaTooLargeError) whose text carries no object reprs. `load_image` is
`decode_image(open_image(...))`: between the two a caller knows the decoded size (`image.size`)
and may wait for room to decode it (processing/control.py). Pixel arrays as vLLM and HF users pass
them (NumPy `[H, W, 3]`, torch `[3, H, W]`, uint8) become the PIL image of the same pixels.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from glimpse.errors import GlimpseError, MediaError, MediaTooLargeError

ImageSource = str | Path | bytes | bytearray | memoryview | Image.Image | np.ndarray | torch.Tensor

# Pillow's own bomb threshold (Image.MAX_IMAGE_PIXELS) is 89.5 Mpx; glimpse's default is lower.
DEFAULT_MAX_PIXELS = 64_000_000

_DATA_URL = re.compile(r"^data:([\w.+-]+/[\w.+-]+)?((?:;[\w.+-]+=[\w.+-]+)*)(;base64)?,", re.ASCII)


def _sanitize(exc: BaseException) -> str:
    """Exception text without object reprs or addresses (they leak memory layout to clients)."""
    text = re.sub(r"<[^>]*>", "<...>", str(exc))
    text = re.sub(r"0x[0-9a-fA-F]+", "0x?", text)
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB; transparency (alpha band or `info["transparency"]`) composited onto white.

    The same PIL operations as HF's `convert_to_rgb` for PIL input: RGBA conversion, then
    `alpha_composite` over opaque white, then RGB. Bit-exact with HF by construction.
    """
    if image.mode == "RGB":
        return image
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _decode_text(src: str, name: str) -> bytes:
    """A data URL or bare base64 text -> bytes."""
    match = _DATA_URL.match(src)
    if match:
        if not match.group(3):
            raise MediaError(f"{name}: data URL is not base64-encoded (';base64,' is required)")
        payload = src[match.end() :]
    elif src.startswith("data:"):
        raise MediaError(f"{name}: malformed data URL")
    else:
        payload = src
    try:
        try:
            data = base64.b64decode(payload, validate=True)
        except binascii.Error:  # line breaks or spaces inside (MIME-style base64): strip them, which costs a pass
            data = base64.b64decode(re.sub(r"\s+", "", payload), validate=True)
    except (binascii.Error, ValueError):
        raise MediaError(f"{name}: not a file path, a data URL or valid base64 image data") from None
    if not data:
        raise MediaError(f"{name}: empty image data")
    return data


def is_pixel_array(src: object) -> bool:
    return isinstance(src, np.ndarray | torch.Tensor)


def hwc_pixels(src: object, name: str) -> np.ndarray:
    """One image as an array -> `[H, W, 3]` uint8: NumPy arrays are `[H, W, 3]` (PIL's and vLLM's layout),
    torch tensors `[3, H, W]` (torchvision's and HF's); each takes the other layout when its own does
    not fit (a `[3, H, W]` array, an `[H, W, 3]` tensor). Values are taken as they are: uint8 only,
    since float pixels have no agreed scale (0-1 or 0-255)."""
    is_tensor = isinstance(src, torch.Tensor)
    what = "tensor" if is_tensor else "array"
    arr = src.detach().cpu().numpy() if is_tensor else np.asarray(src)
    if arr.dtype != np.uint8:
        raise MediaError(f"{name}: a pixel {what} must be uint8 (0-255), got {arr.dtype}; convert it first")
    channels_first = arr.ndim == 3 and arr.shape[0] == 3 and (is_tensor or arr.shape[2] != 3)
    if channels_first:
        arr = arr.transpose(1, 2, 0)
    if arr.ndim != 3 or arr.shape[2] != 3:
        layout = "[3, H, W] (or [H, W, 3])" if is_tensor else "[H, W, 3] (or [3, H, W])"
        raise MediaError(f"{name}: a pixel {what} must be RGB {layout}, got shape {list(arr.shape)}")
    return np.ascontiguousarray(arr)


def _open(src: ImageSource, name: str) -> Image.Image:
    if isinstance(src, Image.Image):
        return src
    if is_pixel_array(src):
        return Image.fromarray(hwc_pixels(src, name))
    if isinstance(src, Path):
        data = _read_file(src, name)
    elif isinstance(src, str):
        # A short string naming an existing file is a path; anything else must be base64 text.
        data = _read_file(Path(src), name) if len(src) < 4096 and _is_file(src) else _decode_text(src, name)
    elif isinstance(src, bytes | bytearray | memoryview):
        data = bytes(src)
        if not data:
            raise MediaError(f"{name}: empty image data")
    else:
        raise MediaError(f"{name}: unsupported image source type {type(src).__name__}")
    try:
        return Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise MediaTooLargeError(f"{name}: {_sanitize(exc)} (Pillow's decompression-bomb limit)") from None
    except Exception as exc:
        raise MediaError(f"{name}: not a readable image ({_sanitize(exc)})") from None


def _is_file(path: str) -> bool:
    try:
        return Path(path).is_file()
    except (OSError, ValueError):
        return False


def _read_file(path: Path, name: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise MediaError(f"{name}: cannot read the image file ({type(exc).__name__})") from None
    if not data:
        raise MediaError(f"{name}: empty image file")
    return data


def open_image(src: ImageSource, name: str = "image", max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """`src` opened but not decoded (`.size` is the header's), refused when over `max_pixels`.

    `src`: a path (str or Path), raw bytes, base64 text, a `data:image/...;base64,` URL, a PIL
    image, or a uint8 pixel array (NumPy `[H, W, 3]`, torch `[3, H, W]`; see `hwc_pixels`).
    """
    image = _open(src, name)
    width, height = image.size
    if width <= 0 or height <= 0:
        raise MediaError(f"{name}: the image has size {width}x{height}")
    if width * height > max_pixels:
        raise MediaTooLargeError(
            f"{name}: {width}x{height} = {width * height} pixels is over the limit of {max_pixels} "
            "(server flag --max-image-pixels)"
        )
    return image


def decode_image(image: Image.Image, name: str = "image") -> Image.Image:
    """An image from `open_image` -> RGB PIL image: decode, EXIF transpose, composite onto white, RGB."""
    try:
        image.load()
        image = ImageOps.exif_transpose(image) or image
        return to_rgb(image)
    except GlimpseError:
        raise
    except Image.DecompressionBombError as exc:
        raise MediaTooLargeError(f"{name}: {_sanitize(exc)} (Pillow's decompression-bomb limit)") from None
    except Exception as exc:
        raise MediaError(f"{name}: cannot decode the image ({_sanitize(exc)})") from None


def load_image(src: ImageSource, name: str = "image", max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode `src` into an RGB PIL image, refusing images over `max_pixels` before decoding.

    `src` as for `open_image`. Order: header size check, decode, EXIF transpose, composite onto
    white, RGB.
    """
    return decode_image(open_image(src, name, max_pixels), name)
