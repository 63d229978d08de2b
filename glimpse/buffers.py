"""Large buffers backed by transparent huge pages: preprocessing outputs, decoded video, model weights."""

from __future__ import annotations

import math
import mmap

import torch
from torch import nn

_HUGE_PAGE_MIN_BYTES = 4 << 20


def empty_buffer(shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Uninitialised tensor for large outputs and scratch, backed by transparent huge pages.

    Why: first-touch page faults dominate preprocessing on CPU. A 42 MB `pixel_values` costs
    ~10k 4 KiB faults (~15 ms on a small VM, as much as the resize itself); an anonymous
    mapping with MADV_HUGEPAGE takes a few hundred. The tensor keeps the mapping alive; plain
    `torch.empty` is used where madvise is unavailable or the buffer is small.
    """
    count = math.prod(shape)
    nbytes = count * torch.empty((), dtype=dtype).element_size()
    if nbytes < _HUGE_PAGE_MIN_BYTES or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.empty(shape, dtype=dtype)
    buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        buf.madvise(mmap.MADV_HUGEPAGE)
    except OSError:
        pass  # still a valid buffer, just with small pages
    return torch.frombuffer(buf, dtype=dtype, count=count).view(shape)


def move_to_huge_pages(model: nn.Module) -> None:
    """Re-home every CPU parameter of at least 4 MiB in its own huge-page mapping: a copy, one
    parameter at a time, each old storage released as soon as it is replaced (the peak is one
    parameter above the model). The Parameter objects stay (`.data` is swapped), so ties,
    `requires_grad` and references elsewhere are unchanged.

    Why: a decode step streams every weight once, and with 4 KiB pages that is a TLB miss every
    4 KiB; bf16 GEMVs over 2 MiB pages ran ~7% faster here (39 -> 42 GB/s)."""
    for param in model.parameters():  # each distinct tensor once, tied ones included
        if param.device.type == "cpu" and param.nbytes >= _HUGE_PAGE_MIN_BYTES:
            data = empty_buffer(tuple(param.shape), param.dtype)
            data.copy_(param.detach())
            param.data = data
