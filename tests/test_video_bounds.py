"""What one video may cost (issue #12): frames held to --max-frames before decoding, frames resized as
they are decoded (peak memory follows the frames kept, not a full-resolution stack), error texts that
name the server flags and never a file path, and per-request pixel knobs held to their own modality's
ceiling. References: HF 5.23's processors on the tiny checkpoints, hand-worked frame counts, /proc."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from conftest import IMAGES, VIDEOS
from hf_oracle import hf_inputs, hf_processor, read_all_frames, rgb
from transformers.models.qwen2_vl.video_processing_qwen2_vl import smart_resize as hf_qwen_smart_resize

import glimpse
from glimpse import load_processor
from glimpse.errors import GlimpseError, InvalidInputError, LimitExceededError
from glimpse.media import video
from glimpse.media.image import load_image
from glimpse.media.video import probe_video, read_frames
from glimpse.processing import processor as processor_module
from glimpse.processing.control import PreprocessControl
from glimpse.processing.spec import Ceilings, image_spec_from_dict, video_spec_from_dict, with_overrides

UHD = (2160, 3840)
UHD_FRAMES = 100
FULL_STACK = UHD_FRAMES * UHD[0] * UHD[1] * 3  # 2.49e9 bytes: what decoding every frame at full size holds


def _msg(parts):
    return [{"role": "user", "content": parts}]


def _video_part(path):
    return {"type": "video_url", "video_url": {"url": str(path)}}


def _image_part(path):
    return {"type": "image_url", "image_url": {"url": str(path)}}


@pytest.fixture(scope="module")
def uhd_clip(tmp_path_factory):
    """100 frames of 3840x2160 H.264 of a near-constant picture (a small square changes shade): ~40 KB."""
    path = tmp_path_factory.mktemp("uhd") / "uhd_100.mp4"
    height, width = UHD
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "ultrafast"}
        yuv = np.full((height * 3 // 2, width), 128, np.uint8)
        yuv[:height, : width // 2] = 60
        for i in range(UHD_FRAMES):
            yuv[200:328, 100:228] = 16 + 2 * i
            for packet in stream.encode(av.VideoFrame.from_ndarray(yuv, format="yuv420p")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    assert path.stat().st_size < 1_000_000
    return path


# ---- peak memory follows the frames kept ------------------------------------------------------

_PEAK_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from glimpse import load_processor
    from glimpse.processing.spec import Ceilings

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

    checkpoint, clip = sys.argv[1], sys.argv[2]
    processor = load_processor(checkpoint, Ceilings(max_frames=512))  # far above the 100 frames
    message = [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": clip}}]}]
    try:  # reset the peak (VmHWM) to the current RSS, so that the peak below is this request's
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    before = status("VmRSS")
    out = processor(message)
    print(json.dumps({"growth": status("VmHWM") - before, "grid": list(out.media[0].grid_thw)}))
    """
)


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc for the peak RSS")
def test_uhd_clip_peak_memory_follows_kept_frames(uhd_clip, tiny_checkpoint):
    """Qwen2.5-VL keeps every frame (do_sample_frames=false): 100 frames of 4K must not cost 100 4K frames."""
    path = tiny_checkpoint("qwen2_5_vl")
    # A fresh interpreter (its peak is this request's alone) importing the same glimpse as this one.
    root = str(Path(glimpse.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    run = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(path), str(uhd_clip)],
                         capture_output=True, text=True, timeout=600, env=env)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    spec = json.loads((path / "video_preprocessor_config.json").read_text())["size"]
    h, w = hf_qwen_smart_resize(*UHD, 28, spec["shortest_edge"], spec["longest_edge"])
    assert result["grid"] == [UHD_FRAMES // 2, h // 14, w // 14]
    # Decoder state plus one 4K frame at a time (~25 MB) and the small resized frames; a full-size
    # stack is 2.5 GB. A quarter of it leaves room for a many-threaded decoder on a large machine.
    assert result["growth"] < FULL_STACK // 4, f"peak RSS grew by {result['growth'] / 2**20:.0f} MiB"


# ---- --max-frames refuses before decoding ------------------------------------------------------


@pytest.fixture
def no_decoding(monkeypatch):
    """Fail the test if any frame is decoded (every decode in glimpse goes through read_frames/_frames)."""

    def refuse(*args, **kwargs):
        raise AssertionError("a frame was decoded before the frame ceiling was checked")

    monkeypatch.setattr(processor_module, "read_frames", refuse)
    monkeypatch.setattr(video, "_frames", refuse)


def test_max_frames_refuses_uhd_clip_before_decoding(uhd_clip, tiny_checkpoint, no_decoding):
    proc = load_processor(tiny_checkpoint("qwen2_5_vl"), Ceilings(max_frames=8))
    with pytest.raises(LimitExceededError) as err:
        proc(_msg([_video_part(uhd_clip)]))
    text = str(err.value)
    assert "video 0" in text and "100 frames" in text and "limit of 8" in text and "--max-frames" in text
    assert "do_sample_frames" in text


def test_max_frames_counts_frames_the_container_does_not_state(tiny_checkpoint, no_decoding):
    """The webm states 0 frames; it has 15 (test_bad_media), and GLM told to keep them all is refused."""
    proc = load_processor(tiny_checkpoint("glm4v"), Ceilings(max_frames=8))
    with pytest.raises(LimitExceededError, match=r"keeps 15 frames, over the limit of 8 .*--max-frames"):
        proc(_msg([_video_part(VIDEOS / "coffee_15frames_10fps.webm")]), do_sample_frames=False)


def test_max_frames_bounds_sampled_frames_too(tiny_checkpoint, no_decoding):
    """GLM-4.1V samples 2 frames/s: the 10 s slideshow gives 20 frames (ceil(k * 30 / 2), k < 20)."""
    proc = load_processor(tiny_checkpoint("glm4v"), Ceilings(max_frames=8))
    with pytest.raises(LimitExceededError, match=r"keeps 20 frames, over the limit of 8 .*--max-frames"):
        proc(_msg([_video_part(VIDEOS / "slideshow_30fps.mp4")]))


def test_max_frames_also_bounds_pre_decoded_frames(tiny_checkpoint):
    frames = read_all_frames(VIDEOS / "coffee_15frames_10fps.webm")[0]
    proc = load_processor(tiny_checkpoint("qwen2_5_vl"), Ceilings(max_frames=8))
    meta = {"total_num_frames": 15, "fps": 10.0, "duration": 1.5, "width": 334, "height": 188}
    with pytest.raises(LimitExceededError, match="--max-frames"):
        proc(text="<|vision_start|><|video_pad|><|vision_end|>", videos=[(frames, meta)])


def test_read_frames_max_frames_refuses_before_decoding(no_decoding):
    with pytest.raises(LimitExceededError, match=r"15 frames .* limit of 8 .*--max-frames"):
        read_frames(VIDEOS / "coffee_15frames_10fps.webm", range(15), "video 0", max_frames=8)


def test_a_clip_at_the_ceiling_is_accepted_and_equals_hf(tiny_checkpoint):
    """15 frames under --max-frames 15: kept whole, identical to HF's processor on the same frames."""
    path = tiny_checkpoint("qwen2_5_vl")
    clip = VIDEOS / "coffee_15frames_10fps.webm"
    ours = load_processor(path, Ceilings(max_frames=15))(_msg([_video_part(clip)]))
    ref = hf_inputs(hf_processor(path), [{"type": "video"}], videos=[read_all_frames(clip)])
    assert ours["input_ids"].tolist() == ref["input_ids"].tolist()
    assert torch.equal(ours["pixel_values_videos"], ref["pixel_values_videos"])


# ---- the cancellation hook --------------------------------------------------------------------


class _Stop(GlimpseError):
    pass


def test_read_frames_calls_check_between_frames_and_stops_on_its_error():
    calls = []
    # The hubble clip has one keyframe: frames 0..60 are all decoded on the way to 60.
    read_frames(VIDEOS / "hubble_pan_24fps.mp4", [0, 60], check=lambda: calls.append(1))
    assert len(calls) >= 61

    def stop_at_five():
        calls.append(1)
        if len(calls) == 5:
            raise _Stop("cancelled")

    calls.clear()
    with pytest.raises(_Stop):
        read_frames(VIDEOS / "hubble_pan_24fps.mp4", range(144), check=stop_at_five)
    assert len(calls) == 5


def test_processor_video_forwards_check(tiny_checkpoint):
    proc = load_processor(tiny_checkpoint("glm4v"))
    calls = []

    class Counting(PreprocessControl):
        def check(self) -> None:
            calls.append(1)

    proc._video(str(VIDEOS / "coffee_15frames_10fps.webm"), proc.video_spec, "video 0", control=Counting())
    assert len(calls) >= 4  # glm4v at 2 frames/s picks 4 frames of the 1.5 s clip


# ---- keep-all parity with HF, through the processor --------------------------------------------


@pytest.fixture(scope="module")
def odd_clip(tmp_path_factory):
    """7 frames (odd: the last is repeated) of 334x202 VP9 (not multiples of 28) with fine texture."""
    path = tmp_path_factory.mktemp("odd") / "odd_7.webm"
    base = np.random.default_rng(12).integers(0, 256, (68, 112, 3), dtype=np.uint8).repeat(3, 0).repeat(3, 1)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libvpx-vp9", rate=7)
        stream.width, stream.height, stream.pix_fmt = 334, 202, "yuv420p"
        for i in range(7):
            image = np.ascontiguousarray(np.roll(base, 5 * i, axis=1)[:202, :334])
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


CLIPS = [p.name for p in sorted(VIDEOS.iterdir())] + ["odd"]


@pytest.mark.parametrize("clip", CLIPS)
@pytest.mark.parametrize("family", ["qwen2_5_vl", "glm4v", "glm46v"])
def test_keep_all_frames_equals_hf(family, clip, tiny_checkpoint, odd_clip):
    """do_sample_frames=false (Qwen2.5-VL's default; a request knob for GLM): every frame, resized while
    decoding, bit-identical to HF's processor handed all the frames."""
    path = tiny_checkpoint(family)
    source = odd_clip if clip == "odd" else VIDEOS / clip
    kwargs = {} if family == "qwen2_5_vl" else {"do_sample_frames": False}
    ours = load_processor(path)(_msg([_video_part(source)]), **kwargs)
    ref = hf_inputs(hf_processor(path), [{"type": "video"}], videos=[read_all_frames(source)], **kwargs)
    assert ours["input_ids"].tolist() == ref["input_ids"].tolist()
    assert torch.equal(ours["video_grid_thw"], ref["video_grid_thw"])
    assert torch.equal(ours["pixel_values_videos"], ref["pixel_values_videos"])


# ---- error texts -------------------------------------------------------------------------------


def test_ceiling_errors_name_the_server_flags():
    glm4v = video_spec_from_dict({"video_processor_type": "Glm4vVideoProcessor"})
    qwen = video_spec_from_dict({"video_processor_type": "Qwen2VLVideoProcessor"})
    image = image_spec_from_dict({"image_processor_type": "Qwen2VLImageProcessor", "max_pixels": 50176})
    cases = [
        (lambda: with_overrides(glm4v, Ceilings(max_fps=10), fps=12), "--max-fps"),
        (lambda: with_overrides(qwen, Ceilings(max_frames=16), num_frames=32), "--max-frames"),
        (lambda: with_overrides(qwen, Ceilings(max_frames=16), max_frames=32), "--max-frames"),
        (lambda: with_overrides(image, Ceilings(max_pixels=10_000), max_pixels=20_000), "--max-pixels"),
        (lambda: with_overrides(qwen, Ceilings(max_video_pixels=10_000), max_pixels=20_000), "--max-video-pixels"),
        # No flag: the checkpoint's own value is the ceiling, and the message says which flag sets another.
        (lambda: with_overrides(qwen, max_pixels=qwen.max_pixels + 1), "--max-video-pixels"),
        (lambda: with_overrides(image, min_pixels=image.max_pixels + 1), "--max-pixels"),
    ]
    for call, flag in cases:
        with pytest.raises(LimitExceededError) as err:
            call()
        assert flag in str(err.value) and "Ceilings." not in str(err.value), str(err.value)
    with pytest.raises(LimitExceededError, match=r"the checkpoint's video size.longest_edge"):
        with_overrides(qwen, max_pixels=qwen.max_pixels + 1)


def _hidden_link(tmp_path, suffix: str, payload: bytes):
    """A symlink `link<suffix>` to a corrupt file whose directory and name must stay hidden."""
    secret = tmp_path / "secret_dir_q7"
    secret.mkdir()
    target = secret / f"hidden_target_x9{suffix}"
    target.write_bytes(payload)
    link = tmp_path / f"link{suffix}"
    link.symlink_to(target)
    return link, target


@pytest.fixture
def hidden_target(tmp_path):
    return _hidden_link(tmp_path, ".mp4", b"\x00\x00\x00\x18ftypmp42" + b"not a video at all " * 64)


def _assert_hides(text: str, *paths) -> None:
    for p in paths:
        for part in (str(p), p.name, str(p.parent)):
            assert part not in text, f"the error names {part!r}: {text}"


def test_video_errors_never_name_the_file(hidden_target, tiny_checkpoint):
    link, target = hidden_target
    errors = []
    for src in (link, target, str(link), os.path.realpath(link)):  # the server hands over the real path
        for call in (lambda s: probe_video(s, "video 0"), lambda s: read_frames(s, [0], "video 0")):
            with pytest.raises(InvalidInputError) as err:
                call(src)
            errors.append(str(err.value))
    proc = load_processor(tiny_checkpoint("glm4v"))
    with pytest.raises(InvalidInputError) as err:
        proc(_msg([_video_part(f"file://{os.path.realpath(link)}")]))
    errors.append(str(err.value))
    for text in errors:
        assert text.startswith("video 0: "), text
        assert "Invalid data found" in text  # FFmpeg's reason stays
        _assert_hides(text, link, target)


def test_video_errors_hide_the_file_while_decoding(tmp_path, monkeypatch):
    """A decoder failure whose text names the file (as PyAV's do) is reported without it."""
    target = tmp_path / "hidden_dir_k3" / "clip_name_k3.mp4"
    target.parent.mkdir()
    target.write_bytes((VIDEOS / "hubble_pan_24fps.mp4").read_bytes())

    def failing(container, stream):
        raise RuntimeError(f"decoder gave up on '{target}' ({target.name})")
        yield

    monkeypatch.setattr(video, "_frames", failing)
    with pytest.raises(InvalidInputError) as err:
        read_frames(str(target), [3], "video 0")
    assert "decoder gave up" in str(err.value)
    _assert_hides(str(err.value), target)


def test_image_errors_never_name_the_file(tmp_path):
    link, target = _hidden_link(tmp_path, ".png", b"\x89PNG\r\n\x1a\n" + b"broken" * 40)
    for src in (link, str(link), os.path.realpath(link)):
        with pytest.raises(InvalidInputError) as err:
            load_image(src, "image 0")
        assert str(err.value).startswith("image 0: ")
        _assert_hides(str(err.value), link, target)


# ---- per-request pixel knobs: each modality against its own ceiling ---------------------------


def test_qwen_image_only_request_is_not_held_to_the_video_ceiling(tiny_checkpoint):
    """Tiny Qwen2.5-VL: images up to 50176 pixels, videos up to 25088. HF accepts max_pixels=50176 on an
    image-only request (it reaches both its image and video processors); so must glimpse."""
    path = tiny_checkpoint("qwen2_5_vl")
    proc = load_processor(path)
    assert (proc.image_spec.max_pixels, proc.video_spec.max_pixels) == (50176, 25088)
    image = IMAGES / "hubble_deep_field.jpg"
    ours = proc(_msg([_image_part(image), {"type": "text", "text": "What is it?"}]), max_pixels=50176, min_pixels=6272)
    ref = hf_inputs(hf_processor(path), [{"type": "image"}, {"type": "text", "text": "What is it?"}], [rgb(image)],
                    max_pixels=50176, min_pixels=6272)  # fmt: skip
    assert ours["input_ids"].tolist() == ref["input_ids"].tolist()
    assert torch.equal(ours["image_grid_thw"], ref["image_grid_thw"])
    assert torch.equal(ours["pixel_values"], ref["pixel_values"])
    # With a video the same value is over the video ceiling (the checkpoint's 25088): refused, naming it.
    with pytest.raises(LimitExceededError, match=r"max_pixels=50176 for videos .* 25088 .*--max-video-pixels"):
        proc(_msg([_image_part(image), _video_part(VIDEOS / "coffee_15frames_10fps.webm")]), max_pixels=50176)


def test_glm_video_only_request_is_not_held_to_the_image_ceiling(tiny_checkpoint):
    """Tiny GLM-4.1V: images up to 100352 pixels, videos 250880. max_pixels=200704 (glimpse's name for
    HF's size.longest_edge) on a video-only request equals HF given that size."""
    path = tiny_checkpoint("glm4v")
    proc = load_processor(path)
    assert proc.image_spec.max_pixels < 200704 <= proc.video_spec.max_pixels
    clip = VIDEOS / "hubble_pan_24fps.mp4"
    ours = proc(_msg([_video_part(clip)]), max_pixels=200704)
    size = {"shortest_edge": proc.video_spec.min_pixels, "longest_edge": 200704}
    ref = hf_inputs(hf_processor(path), [{"type": "video"}], videos=[read_all_frames(clip)], size=size)
    assert ours["input_ids"].tolist() == ref["input_ids"].tolist()
    assert torch.equal(ours["pixel_values_videos"], ref["pixel_values_videos"])
    with pytest.raises(LimitExceededError, match=r"max_pixels=200704 for images .*--max-pixels"):
        proc(_msg([_image_part(IMAGES / "rocket.jpg")]), max_pixels=200704)


def test_operator_flags_still_bound_each_modality(tiny_checkpoint):
    proc = load_processor(tiny_checkpoint("qwen2_5_vl"), Ceilings(max_pixels=20_000, max_video_pixels=30_000))
    image_spec, video_spec = proc.specs({"max_pixels": 25_000}, images=False, videos=True)
    assert video_spec.max_pixels == 25_000
    with pytest.raises(LimitExceededError, match="--max-pixels"):
        proc.specs({"max_pixels": 25_000}, images=True, videos=False)
    with pytest.raises(LimitExceededError, match="--max-video-pixels"):
        proc.specs({"max_pixels": 40_000}, images=False, videos=True)
    # Knobs are validated whatever the request carries.
    with pytest.raises(InvalidInputError, match="integer"):
        proc.specs({"max_pixels": "big"}, images=False, videos=False)
    # A video-only clash (min_pixels over the checkpoint's video 25088) does not refuse an image-only request.
    plain = load_processor(tiny_checkpoint("qwen2_5_vl"))
    assert plain.specs({"min_pixels": 30_000}, images=True, videos=False)[0].min_pixels == 30_000
    with pytest.raises(LimitExceededError, match="min_pixels=30000 for videos exceeds the ceiling of 25088"):
        plain.specs({"min_pixels": 30_000}, images=True, videos=True)
