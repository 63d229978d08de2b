"""Media loading: images (sources, EXIF, transparency, modes) and videos (probe, frame reads, seeking).

References: HF's own `convert_to_rgb` / `load_image` and its image processor on the same PIL
input (transparency compositing is pixel-exact), PyAV decoding every frame in order (frame
reads), and the frame counts / rates documented in tests/data/media/README.md.
"""

from __future__ import annotations

import base64
import io

import av
import numpy as np
import pytest
import torch
from conftest import MEDIA
from PIL import Image
from transformers.image_transforms import convert_to_rgb as hf_convert_to_rgb
from transformers.image_utils import load_image as hf_load_image
from transformers.models.glm4v.image_processing_glm4v import Glm4vImageProcessor

from glimpse.errors import MediaTooLargeError
from glimpse.media.image import load_image
from glimpse.media.video import probe_video, read_frames
from glimpse.processing.resize import preprocess_images
from glimpse.processing.spec import image_spec_from_dict

IMAGES, VIDEOS = MEDIA / "images", MEDIA / "videos"
GLM = {"image_processor_type": "Glm4vImageProcessor"}


def png_bytes(image: Image.Image, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", **kwargs)
    return buf.getvalue()


def test_image_sources_agree():
    path = IMAGES / "rocket.jpg"
    data = path.read_bytes()
    b64 = base64.b64encode(data).decode()
    expected = np.asarray(Image.open(path).convert("RGB"))
    for src in (
        path,
        str(path),
        data,
        bytearray(data),
        b64,
        f"data:image/jpeg;base64,{b64}",
        "data:image/jpeg;base64," + "\n".join(b64[i : i + 76] for i in range(0, len(b64), 76)),  # MIME line breaks
        " " + b64[:100] + " \r\n\t" + b64[100:] + "\n",
        Image.open(path),
    ):
        image = load_image(src)
        assert image.mode == "RGB"
        assert np.array_equal(np.asarray(image), expected)


def _transparent_images() -> dict[str, Image.Image]:
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (37, 53, 4), dtype=np.uint8)
    palette = Image.fromarray(rng.integers(0, 256, (29, 31, 3), dtype=np.uint8)).quantize(16)
    palette.info["transparency"] = 3
    la = Image.fromarray(rgba[..., :2].copy(), mode="LA")
    return {"RGBA": Image.fromarray(rgba, mode="RGBA"), "LA": la, "P+transparency": palette,
            "L+transparency": Image.fromarray(rgba[..., 0].copy(), mode="L")}  # fmt: skip


@pytest.mark.parametrize("kind", list(_transparent_images()))
def test_transparency_composited_like_hf(kind):
    original = _transparent_images()[kind]
    kwargs = {"transparency": 7} if kind == "L+transparency" else {}
    data = png_bytes(original, **kwargs)
    hf_input = Image.open(io.BytesIO(data))  # HF gets the same file as an in-memory PIL image
    assert "A" in hf_input.getbands() or hf_input.info.get("transparency") is not None
    ours = load_image(data)
    assert np.array_equal(
        np.asarray(ours), hf_convert_to_rgb(Image.open(io.BytesIO(data)), return_numpy=True)
    )
    expected = Glm4vImageProcessor()(images=[hf_input], return_tensors="pt")
    pixel_values, grid = preprocess_images([ours], image_spec_from_dict(GLM))
    assert torch.equal(grid, expected["image_grid_thw"]) and torch.equal(
        pixel_values, expected["pixel_values"]
    )
    # An in-memory PIL image with alpha takes the same path (no silent alpha drop).
    pixel_values, _ = preprocess_images([Image.open(io.BytesIO(data))], image_spec_from_dict(GLM))
    assert torch.equal(pixel_values, expected["pixel_values"])


@pytest.mark.parametrize("mode", ["L", "CMYK", "P", "I;16", "1"])
def test_modes_convert_like_hf(mode):
    rng = np.random.default_rng(1)
    base = Image.fromarray(rng.integers(0, 256, (24, 40, 3), dtype=np.uint8))
    image = (
        base.convert(mode)
        if mode != "I;16"
        else Image.fromarray(rng.integers(0, 65535, (24, 40), dtype=np.uint16))
    )
    buf = io.BytesIO()
    image.save(buf, format="TIFF" if mode in ("CMYK", "I;16") else "PNG")
    ours = load_image(buf.getvalue())
    expected = hf_convert_to_rgb(Image.open(io.BytesIO(buf.getvalue())), return_numpy=True)
    assert ours.mode == "RGB" and np.array_equal(np.asarray(ours), expected)


def test_exif_orientation_applied(tmp_path):
    rng = np.random.default_rng(2)
    image = Image.fromarray(rng.integers(0, 256, (30, 50, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif.tobytes(), quality=95)
    ours = load_image(path)
    assert ours.size == (30, 50)  # width and height swapped
    assert np.array_equal(np.asarray(ours), np.asarray(hf_load_image(str(path))))


def test_real_images_load_as_rgb():
    for path in sorted(IMAGES.iterdir()):
        image = load_image(path)
        assert image.mode == "RGB" and image.size == Image.open(path).size


def test_image_pixel_cap():
    with pytest.raises(MediaTooLargeError, match="512x512 = 262144 pixels"):
        load_image(IMAGES / "astronaut.png", max_pixels=100_000)


# ---- video ---------------------------------------------------------------------------------


def decode_all(src) -> np.ndarray:
    file = io.BytesIO(src) if isinstance(src, bytes) else str(src)
    with av.open(file) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


# README: frames, fps, duration, width, height
README = {
    "hubble_pan_24fps.mp4": (144, 24.0, 6.0, 640, 360),
    "slideshow_30fps.mp4": (300, 30.0, 10.0, 480, 270),
    "coffee_15frames_10fps.webm": (15, 10.0, 1.5, 334, 188),
}


@pytest.mark.parametrize("name", list(README))
def test_probe_matches_readme_and_decode(name):
    meta = probe_video(VIDEOS / name)
    assert (meta.total_num_frames, meta.fps, meta.duration, meta.width, meta.height) == README[name]
    assert meta.total_num_frames == len(decode_all(VIDEOS / name))
    assert probe_video((VIDEOS / name).read_bytes()) == meta


@pytest.mark.parametrize("name", list(README))
def test_read_frames_equals_sequential_decode(name):
    everything = decode_all(VIDEOS / name)
    n = len(everything)
    indices = [n - 1, 0, 3, 3, n // 2, 1, n - 1]  # any order, duplicates allowed
    assert np.array_equal(read_frames(VIDEOS / name, indices), everything[indices])


@pytest.fixture(scope="module")
def keyframe_video() -> bytes:
    """200 frames of 64x48 H.264 with a keyframe every 10 frames and B-frames (frame i has red = i)."""
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.options = {"g": "10", "bf": "2", "keyint_min": "10"}
        for i in range(200):
            image = np.full((48, 64, 3), 40, np.uint8)
            image[:, :, 0] = i
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def test_seeking_reads_the_right_frames(keyframe_video):
    everything = decode_all(keyframe_video)
    for indices in ([0, 199], [150, 3, 77, 77, 12, 199, 100], list(range(0, 200, 7)), [5], [191, 190, 189]):
        assert np.array_equal(read_frames(keyframe_video, indices), everything[indices])


def test_seeking_skips_decoding(keyframe_video):
    # Frame 195 sits 5 frames after a keyframe: with seeking ~6-8 frames are decoded, not 196.
    last = read_frames(keyframe_video, [195], max_decode_frames=20)
    assert np.array_equal(last, decode_all(keyframe_video)[[195]])
    # The hubble clip has a single keyframe: reaching frame 140 needs ~141 decodes, over the cap.
    with pytest.raises(MediaTooLargeError, match="more than 20 frames"):
        read_frames(VIDEOS / "hubble_pan_24fps.mp4", [140], max_decode_frames=20)
