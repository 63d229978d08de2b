"""Step 2 of the data path, preprocessing (control): how many pixels decode at once, and stopping a request.

`PixelBudget(capacity, max_waiters)` is shared by the whole server. Before decoding a media item
the processor reserves its decoded pixel count, width*height read from the header (a whole image;
for a video, one frame: frames are resized as they are decoded), and releases it once the item is
reduced to its resized `pixel_values`. `PreprocessControl(budget)` is per request: `cancel()` from
any thread makes `check()` raise PreprocessCancelled between items and frames, and wakes the
request's reservation if it is waiting for the budget.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from glimpse.errors import DecodeBusyError, MediaTooLargeError, PreprocessCancelled


class PixelBudget:
    """At most `capacity` decoded pixels held at once by all requests; at most `max_waiters` requests
    waiting for room (beyond that, DecodeBusyError: HTTP 429). Waiters are served first come, first
    served, so a large item is not starved by a stream of small ones.

    An item larger than the whole capacity is refused (MediaTooLargeError) rather than admitted
    alone: the bound holds strictly, and the server can keep it above --max-image-pixels.
    Gauges for the server: `in_use` (pixels) and `waiting` (requests), both 0 when idle; `peak`, the
    most pixels ever held at once, and `total`, every pixel ever reserved (both since start).
    """

    def __init__(self, capacity: int, max_waiters: int) -> None:
        if capacity < 1:
            raise ValueError(
                f"the decoding budget must be at least 1 pixel, got {capacity} (--max-decoding-pixels)"
            )
        if max_waiters < 0:
            raise ValueError(f"the number of waiters must be >= 0, got {max_waiters} (--max-queue)")
        self.capacity = capacity
        self.max_waiters = max_waiters
        self._cond = threading.Condition()
        self._in_use = 0
        self._peak = 0
        self._total = 0
        self._queue: deque[object] = deque()  # one ticket per waiting reservation, in arrival order

    @property
    def in_use(self) -> int:
        """Pixels reserved now."""
        return self._in_use

    @property
    def peak(self) -> int:
        """The most pixels reserved at once since start (never above `capacity`)."""
        return self._peak

    @property
    def total(self) -> int:
        """Pixels reserved since start, summed over every reservation."""
        return self._total

    @property
    def waiting(self) -> int:
        """Reservations (one per request: a request reserves one item at a time) waiting for room now."""
        return len(self._queue)

    def acquire(self, pixels: int, name: str, cancelled: Callable[[], bool] = lambda: False) -> None:
        """Block until `pixels` fit; raises DecodeBusyError when the line is full, PreprocessCancelled
        when `cancelled()` turns true while waiting (`wake()` makes a waiter look), MediaTooLargeError
        when `pixels` exceeds the whole capacity."""
        if pixels > self.capacity:
            raise MediaTooLargeError(
                f"{name}: decoding it needs {pixels} pixels at once, more than the server's whole decoding "
                f"budget of {self.capacity} (server flag --max-decoding-pixels; keep it at least "
                "--max-image-pixels)"
            )
        pixels = max(pixels, 0)
        with self._cond:
            if not self._queue and self._in_use + pixels <= self.capacity:
                self._take(pixels)
                return
            if len(self._queue) >= self.max_waiters:
                raise DecodeBusyError(
                    f"{name}: the server is decoding {self._in_use} of its {self.capacity} pixels at once "
                    f"(--max-decoding-pixels) and {len(self._queue)} requests already wait for room "
                    f"(--max-queue); retry later"
                )
            ticket = object()
            self._queue.append(ticket)
            try:
                while True:
                    if cancelled():
                        raise PreprocessCancelled(
                            f"{name}: the request was cancelled while waiting to decode"
                        )
                    if self._queue[0] is ticket and self._in_use + pixels <= self.capacity:
                        self._take(pixels)
                        return
                    self._cond.wait()
            finally:
                self._queue.remove(ticket)
                self._cond.notify_all()  # the next in line may fit now

    def _take(self, pixels: int) -> None:  # under self._cond
        self._in_use += pixels
        self._peak = max(self._peak, self._in_use)
        self._total += pixels

    def release(self, pixels: int) -> None:
        with self._cond:
            self._in_use -= max(pixels, 0)
            assert self._in_use >= 0, "released more pixels than were reserved"
            self._cond.notify_all()

    def wake(self) -> None:
        """Make every waiter re-check its `cancelled()`."""
        with self._cond:
            self._cond.notify_all()


class PreprocessControl:
    """One request's handle on its preprocessing: `cancel()` from any thread (idempotent); the
    processor calls `check()` between items and frames and `reserve()` around each item."""

    def __init__(self, budget: PixelBudget | None = None) -> None:
        self.budget = budget
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        self._cancelled.set()  # before waking, so that a woken waiter sees it
        if self.budget is not None:
            self.budget.wake()

    def check(self) -> None:
        """Raise PreprocessCancelled once `cancel()` was called."""
        if self._cancelled.is_set():
            raise PreprocessCancelled("preprocessing stopped: the request was cancelled")

    @contextmanager
    def reserve(self, pixels: int, name: str) -> Iterator[None]:
        """Hold `pixels` of the budget (none without one) for the body; released however it ends."""
        self.check()
        if self.budget is None:
            yield
            return
        self.budget.acquire(pixels, name, self._cancelled.is_set)
        try:
            yield
        finally:
            self.budget.release(pixels)
