"""Decode budget and cancellation of preprocessing (processing/control.py, issue #12).

References: brute-force bookkeeping kept by the tests themselves (pixels held at once, frames and
images decoded), image sizes read from the file headers with PIL, and HF 5.23's processor on the
same images for the one-at-a-time preprocessing path.
"""

from __future__ import annotations

import io
import random
import threading
import time

import av
import pytest
import torch
from conftest import IMAGES, VIDEOS
from hf_oracle import hf_inputs, hf_processor, rgb
from PIL import Image

import glimpse.processing.processor as processor_module
from glimpse import load_processor
from glimpse.errors import DecodeBusyError, MediaError, MediaTooLargeError, PreprocessCancelled
from glimpse.media.image import load_image
from glimpse.processing.control import PixelBudget, PreprocessControl
from glimpse.processing.resize import preprocess_images

ALL_IMAGES = sorted(IMAGES.iterdir())
VIDEO = VIDEOS / "hubble_pan_24fps.mp4"


def _until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for the condition"
        time.sleep(0.001)


def _image_msg(sources) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": src}} for src in sources]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": "Compare."}]}]


def _video_msg(src) -> list[dict]:
    return [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": src}},
                                         {"type": "text", "text": "What happens?"}]}]  # fmt: skip


def _header_pixels(path) -> int:
    width, height = Image.open(path).size
    return width * height


class RecordingBudget(PixelBudget):
    """A PixelBudget that lists every reservation asked of it."""

    def __init__(self, capacity: int, max_waiters: int = 8) -> None:
        super().__init__(capacity, max_waiters)
        self.asked: list[int] = []

    def acquire(self, pixels, name, cancelled=lambda: False):
        self.asked.append(pixels)
        return super().acquire(pixels, name, cancelled)


# ---- the budget on its own ---------------------------------------------------------------------


def test_budget_never_exceeds_capacity_under_threads():
    capacity, threads, rounds = 100, 8, 150
    budget = PixelBudget(capacity, max_waiters=threads)
    lock, held, peak, asked, errors = threading.Lock(), [0], [0], [0], []

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(rounds):
                n = rng.randint(1, 60)
                budget.acquire(n, "item")
                with lock:  # our own count of what is held, independent of the budget's
                    held[0] += n
                    asked[0] += n
                    peak[0] = max(peak[0], held[0])
                time.sleep(rng.random() * 1e-4)
                with lock:
                    held[0] -= n
                budget.release(n)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    pool = [threading.Thread(target=worker, args=(s,)) for s in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(60)
    assert not errors and not any(t.is_alive() for t in pool)
    assert peak[0] <= capacity
    assert peak[0] > capacity // 2  # the threads did contend (8 x up to 60 pixels on 100)
    assert (budget.in_use, budget.waiting) == (0, 0)
    # the budget's own high-water mark: we count a reservation after the budget takes it and drop it
    # before the budget releases it, so ours can only be lower
    assert peak[0] <= budget.peak <= capacity
    assert budget.total == asked[0]


def test_waiters_beyond_the_cap_get_decode_busy():
    budget = PixelBudget(10, max_waiters=2)
    budget.acquire(10, "first")
    done = []

    def waiter() -> None:
        budget.acquire(5, "waiter")
        done.append(5)

    pool = [threading.Thread(target=waiter) for _ in range(2)]
    for t in pool:
        t.start()
    _until(lambda: budget.waiting == 2)
    with pytest.raises(DecodeBusyError) as err:
        budget.acquire(1, "image 3")
    assert "--max-decoding-pixels" in str(err.value) and "--max-queue" in str(err.value)
    assert "image 3" in str(err.value)
    assert budget.waiting == 2 and done == []
    budget.release(10)  # both waiters fit now (5 + 5)
    for t in pool:
        t.join(10)
    assert done == [5, 5] and (budget.in_use, budget.waiting) == (10, 0)
    budget.release(10)
    assert budget.in_use == 0


def test_waiters_are_served_in_arrival_order():
    """A large item waiting first is not overtaken by a small one that would fit (no starvation)."""
    budget = PixelBudget(100, max_waiters=4)
    budget.acquire(60, "held")
    order = []

    def waiter(n: int) -> None:
        budget.acquire(n, f"item of {n}")
        order.append(n)

    big = threading.Thread(target=waiter, args=(100,))
    big.start()
    _until(lambda: budget.waiting == 1)
    small = threading.Thread(target=waiter, args=(10,))
    small.start()
    _until(lambda: budget.waiting == 2)
    time.sleep(0.05)
    assert order == [] and budget.in_use == 60  # 10 would fit, but the 100 came first
    budget.release(60)
    big.join(10)
    assert order == [100]
    budget.release(100)
    small.join(10)
    assert order == [100, 10]
    budget.release(10)
    assert (budget.in_use, budget.waiting) == (0, 0)


def test_an_item_over_the_whole_capacity_is_refused_not_deadlocked():
    budget = PixelBudget(1000, max_waiters=4)
    with pytest.raises(MediaTooLargeError) as err:
        budget.acquire(1001, "image 2")
    assert (
        "image 2" in str(err.value) and "--max-decoding-pixels" in str(err.value) and "1000" in str(err.value)
    )
    assert (budget.in_use, budget.waiting) == (0, 0)


def test_cancel_wakes_a_waiting_reservation():
    budget = PixelBudget(10, max_waiters=4)
    budget.acquire(10, "holder")
    control = PreprocessControl(budget)
    result = []

    def request() -> None:
        try:
            with control.reserve(5, "image 0"):
                result.append("reserved")
        except PreprocessCancelled:
            result.append("cancelled")

    t = threading.Thread(target=request)
    t.start()
    _until(lambda: budget.waiting == 1)
    control.cancel()
    t.join(5)
    assert not t.is_alive() and result == ["cancelled"]
    assert (budget.in_use, budget.waiting) == (10, 0)  # only the holder's pixels
    budget.release(10)
    with pytest.raises(PreprocessCancelled):
        control.check()


# ---- the processor under a control -------------------------------------------------------------


@pytest.mark.parametrize("family", ["glm4v", "qwen2_5_vl"])
def test_one_image_at_a_time_equals_hf_and_the_batched_path(family, tiny_checkpoint):
    """A budget that fits only the largest image forces one decoded image at a time; the pixels stay HF's."""
    path = tiny_checkpoint(family)
    sizes = [_header_pixels(p) for p in ALL_IMAGES]
    budget = RecordingBudget(max(sizes))
    processor = load_processor(path)
    ours = processor(_image_msg([str(p) for p in ALL_IMAGES]), control=PreprocessControl(budget))
    assert budget.asked == sizes  # one reservation per image, of its header's width*height, in order
    assert (budget.in_use, budget.waiting) == (0, 0)

    content = [*({"type": "image"} for _ in ALL_IMAGES), {"type": "text", "text": "Compare."}]
    ref = hf_inputs(hf_processor(path), content, [rgb(p) for p in ALL_IMAGES])
    assert ours["input_ids"].tolist() == ref["input_ids"].tolist()
    torch.testing.assert_close(ours["pixel_values"], ref["pixel_values"], rtol=0, atol=0)
    assert ours["image_grid_thw"].tolist() == ref["image_grid_thw"].tolist()

    batched, grids = preprocess_images([load_image(p) for p in ALL_IMAGES], processor.image_spec)
    assert torch.equal(ours["pixel_values"], batched) and torch.equal(ours["image_grid_thw"], grids)


def test_an_image_over_the_budget_names_the_flag(tiny_checkpoint):
    processor = load_processor(tiny_checkpoint("glm4v"))
    control = PreprocessControl(PixelBudget(200_000, max_waiters=4))
    with pytest.raises(MediaTooLargeError) as err:  # chelsea.png is 451x300, astronaut.png 512x512 = 262144
        processor(_image_msg([str(IMAGES / "chelsea.png"), str(IMAGES / "astronaut.png")]), control=control)
    assert "image 1" in str(err.value) and "--max-decoding-pixels" in str(err.value)
    assert (control.budget.in_use, control.budget.waiting) == (0, 0)


def test_concurrent_requests_hold_at_most_the_budget(tiny_checkpoint, monkeypatch):
    """Issue #12's shape, scaled down: 3 requests of 6 small JPEGs declaring 1200x1200 each."""
    buf = io.BytesIO()
    Image.new("RGB", (1200, 1200), (90, 140, 200)).save(buf, "JPEG")
    blob = buf.getvalue()
    assert len(blob) < 30_000
    per_image = 1200 * 1200
    capacity = 2 * per_image + per_image // 2
    lock, held, peak = threading.Lock(), [0], [0]
    decode, preprocess = processor_module.decode_image, processor_module.preprocess_image

    def counted_decode(image, name):  # a decoded image is held from here ...
        with lock:
            held[0] += image.width * image.height
            peak[0] = max(peak[0], held[0])
        return decode(image, name)

    def counted_preprocess(image, spec, name):  # ... until it is reduced to pixel_values
        pixels = image.width * image.height
        try:
            return preprocess(image, spec, name)
        finally:
            with lock:
                held[0] -= pixels

    monkeypatch.setattr(processor_module, "decode_image", counted_decode)
    monkeypatch.setattr(processor_module, "preprocess_image", counted_preprocess)
    processor = load_processor(tiny_checkpoint("glm4v"))
    budget = PixelBudget(capacity, max_waiters=3)
    results, errors = [], []

    def request() -> None:
        try:
            results.append(processor(_image_msg([blob] * 6), control=PreprocessControl(budget)))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    pool = [threading.Thread(target=request) for _ in range(3)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(120)
    assert not errors and len(results) == 3
    assert peak[0] <= capacity and held[0] == 0
    assert (budget.in_use, budget.waiting) == (0, 0)


def test_cancel_stops_between_images(tiny_checkpoint, monkeypatch):
    decoded = []
    control = PreprocessControl(PixelBudget(10_000_000, max_waiters=4))
    decode = processor_module.decode_image

    def decode_then_cancel(image, name):
        decoded.append(name)
        control.cancel()  # the client goes away while the first image decodes
        return decode(image, name)

    monkeypatch.setattr(processor_module, "decode_image", decode_then_cancel)
    processor = load_processor(tiny_checkpoint("glm4v"))
    with pytest.raises(PreprocessCancelled):
        processor(_image_msg([str(p) for p in ALL_IMAGES[:4]]), control=control)
    assert decoded == ["image 0"]
    assert (control.budget.in_use, control.budget.waiting) == (0, 0)


def test_cancel_stops_a_video_within_a_frame(tiny_checkpoint, monkeypatch):
    """Cancelled after its first decoded frame, a video decode stops at the next frame boundary."""
    frames, cancel_after = [], [None]
    control = [PreprocessControl()]
    read = processor_module.read_frames

    def counted(*args, check, **kwargs):  # counts the video's between-frames checks
        def frame_check() -> None:
            frames.append(1)
            if len(frames) == cancel_after[0]:
                control[0].cancel()  # the client goes away here
            check()

        return read(*args, check=frame_check, **kwargs)

    monkeypatch.setattr(processor_module, "read_frames", counted)
    processor = load_processor(tiny_checkpoint("glm4v"))
    processor(_video_msg(str(VIDEO)), control=control[0])
    assert len(frames) >= 8  # uncancelled, the clip decodes many frames, each followed by a check

    frames.clear()
    cancel_after[0] = 1
    control[0] = PreprocessControl(PixelBudget(10_000_000, max_waiters=4))
    with pytest.raises(PreprocessCancelled):
        processor(_video_msg(str(VIDEO)), control=control[0])
    assert len(frames) <= 2
    assert (control[0].budget.in_use, control[0].budget.waiting) == (0, 0)


def test_gauges_return_to_zero_after_success_error_and_cancel(tiny_checkpoint):
    processor = load_processor(tiny_checkpoint("glm4v"))
    budget = RecordingBudget(10_000_000)
    # success: an image and a video; the video reserves one frame's pixels (its stream header's size)
    with av.open(str(VIDEO)) as c:
        frame_pixels = c.streams.video[0].codec_context.width * c.streams.video[0].codec_context.height
    processor(_image_msg([str(IMAGES / "rocket.jpg")]), control=PreprocessControl(budget))
    processor(_video_msg(str(VIDEO)), control=PreprocessControl(budget))
    assert budget.asked == [_header_pixels(IMAGES / "rocket.jpg"), frame_pixels]
    assert (budget.in_use, budget.waiting) == (0, 0)
    # error while decoding inside the reservation: a JPEG cut short (its header is intact)
    data = (IMAGES / "rocket.jpg").read_bytes()
    with pytest.raises(MediaError):
        processor(
            _image_msg([str(IMAGES / "chelsea.png"), data[: len(data) // 2]]),
            control=PreprocessControl(budget),
        )
    assert budget.asked[-2:] == [
        _header_pixels(IMAGES / "chelsea.png"),
        _header_pixels(IMAGES / "rocket.jpg"),
    ]
    assert (budget.in_use, budget.waiting) == (0, 0)
    # cancelled before it starts, and while waiting for room
    control = PreprocessControl(budget)
    control.cancel()
    with pytest.raises(PreprocessCancelled):
        processor(_image_msg([str(IMAGES / "rocket.jpg")]), control=control)
    assert (budget.in_use, budget.waiting) == (0, 0)
    budget.acquire(budget.capacity, "holder")
    waiting = PreprocessControl(budget)
    raised = []
    t = threading.Thread(target=lambda: raised.append(_raises(processor, _video_msg(str(VIDEO)), waiting)))
    t.start()
    _until(lambda: budget.waiting == 1)
    waiting.cancel()
    t.join(10)
    assert raised == [PreprocessCancelled]
    budget.release(budget.capacity)
    assert (budget.in_use, budget.waiting) == (0, 0)


def _raises(processor, messages, control) -> type | None:
    try:
        processor(messages, control=control)
    except Exception as exc:
        return type(exc)
    return None
