"""A vision tower's per-frame-size tables (position embeddings, rotary cos/sin, window plans), made once per size.

The tables of a (h, w) frame depend on nothing but the size and a few of the tower's weights, yet building them
is not free (the small glm4v's 224x224 tables: ~4.8 ms, a bicubic resampling of the position embeddings and the
rotary angles), and an engine asks again for every batch of images it encodes. `per_frame_size` memoises a
tower's `frame_tables(h, w)`; a cached entry is used only while the weights it was made from are the same
tensors, unchanged (their storage, dtype and version counter are part of the key), so loading weights in place
or moving the tower makes them anew; tables made under `torch.inference_mode` are kept apart from the others.
A tower keeps at most FRAME_TABLE_BYTES of tables (least recently used out first; the newest always stays):
a full-HD frame's tables in GLM-4.1V's tower are ~37 MB, and a server sees images of many sizes.
"""

from __future__ import annotations

import dataclasses
import functools
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

FRAME_TABLE_BYTES = 256 << 20  # per tower


def per_frame_size(*weights: str) -> Callable[[Callable[[Any, int, int], dict]], Callable[[Any, int, int], dict]]:
    """Decorate a tower's `frame_tables(self, h, w)`; `weights` name the parameters the tables are made from
    (`nn.Module.get_parameter` paths; one the tower lacks is skipped, e.g. GLM-OCR's position embeddings).
    The tables returned are shared: callers read them and make new tensors from them, never write to them."""

    def decorate(make: Callable[[Any, int, int], dict]) -> Callable[[Any, int, int], dict]:
        @functools.wraps(make)
        def frame_tables(tower: nn.Module, h: int, w: int) -> dict:
            cache: OrderedDict = tower.__dict__.setdefault("_frame_tables", OrderedDict())
            # inference-mode tensors (the engine's) must not reach code that records autograd
            key = (h, w, torch.is_inference_mode_enabled(), *(_state(tower, name) for name in weights))
            if key in cache:
                cache.move_to_end(key)
                return cache[key][0]
            tables = make(tower, h, w)
            cache[key] = (tables, _nbytes(tables))
            while len(cache) > 1 and sum(size for _, size in cache.values()) > FRAME_TABLE_BYTES:
                cache.popitem(last=False)
            return tables

        return frame_tables

    return decorate


def _state(tower: nn.Module, name: str) -> tuple | None:
    try:
        p = tower.get_parameter(name)
    except AttributeError:
        return None
    return (p.data_ptr(), p.dtype, p.device, p._version)


def _nbytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.nbytes
    if isinstance(value, dict):
        return sum(_nbytes(v) for v in value.values())
    if dataclasses.is_dataclass(value):
        return sum(_nbytes(getattr(value, f.name)) for f in dataclasses.fields(value))
    return 0
