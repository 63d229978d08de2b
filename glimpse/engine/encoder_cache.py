"""Step 6 cache: vision embeddings keyed by media content hash, reused across requests.

Two halves, as the scheduler and the runner may live in different processes:
- `EncoderCacheManager` (the scheduler's) decides: which keys are cached or being encoded, their
  bytes against the budget, pins (entries a running request still needs are reference counted and
  never evicted), least-recently-used eviction of unpinned entries, and the hit-rate counters. The
  scheduler asks `can_fit` before scheduling an item's encoding and `allocate`s it when the chunk is
  scheduled, so the budget is never exceeded. With `retain=False` (encoder cache off) entries live
  only while pinned. The keys it drops reach the runner in the next `SchedulerOutput`
  (`freed_encoder_keys`).
- `EncoderCache` (the runner's) holds the tensors: `[num_tokens, hidden]` embeddings, or an EVS
  video's `PrunedVideo` (kept rows and their indices); it stores what it encodes and frees what it
  is told to.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from glimpse.models.evs import PrunedVideo

Entry = torch.Tensor | PrunedVideo


class EncoderCacheManager:
    def __init__(self, max_bytes: int, retain: bool = True) -> None:
        self.max_bytes = max_bytes
        self.retain = retain  # False: drop embeddings once no request needs them (no cross-request reuse)
        self.sizes: OrderedDict[str, int] = OrderedDict()  # key -> bytes, least recently used first
        self.pins: dict[str, int] = {}
        self.used_bytes = 0
        self.lookups = 0
        self.hits = 0
        self.freed: list[str] = []  # dropped since the last `take_freed`: the runner must free them

    def __contains__(self, key: str) -> bool:
        return key in self.sizes

    def lookup(self, key: str) -> bool:
        """Count a lookup for the hit-rate metric; True when the embeddings are cached (or being encoded)."""
        self.lookups += 1
        hit = key in self.sizes
        self.hits += hit
        if hit:
            self.sizes.move_to_end(key)
        return hit

    def pin(self, key: str) -> None:
        self.pins[key] = self.pins.get(key, 0) + 1

    def unpin(self, key: str) -> None:
        n = self.pins.get(key, 0) - 1
        if n <= 0:
            self.pins.pop(key, None)
            if not self.retain and key in self.sizes:
                self._drop(key)
        else:
            self.pins[key] = n

    def evictable_bytes(self) -> int:
        return sum(n for k, n in self.sizes.items() if k not in self.pins)

    def can_fit(self, nbytes: int) -> bool:
        return self.max_bytes - self.used_bytes + self.evictable_bytes() >= nbytes

    def allocate(self, key: str, nbytes: int) -> None:
        """Reserve `nbytes` for `key` (encoded this step), evicting unpinned entries, oldest first."""
        if key in self.sizes:
            return
        if not self.can_fit(nbytes):
            raise RuntimeError("encoder cache over budget: the scheduler must check can_fit first")
        for old in list(self.sizes):
            if self.used_bytes + nbytes <= self.max_bytes:
                break
            if old not in self.pins:
                self._drop(old)
        self.sizes[key] = nbytes
        self.used_bytes += nbytes

    def clear(self) -> None:
        for key in [k for k in self.sizes if k not in self.pins]:
            self._drop(key)

    def take_freed(self) -> list[str]:
        freed, self.freed = self.freed, []
        return freed

    def _drop(self, key: str) -> None:
        self.used_bytes -= self.sizes.pop(key)
        self.freed.append(key)


class EncoderCache:
    """The runner's embeddings by content hash (the budget is the manager's)."""

    def __init__(self) -> None:
        self.entries: dict[str, Entry] = {}

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def get(self, key: str) -> Entry:
        return self.entries[key]

    def put(self, key: str, embeddings: Entry) -> None:
        self.entries[key] = embeddings

    def free(self, keys: list[str]) -> None:
        for key in keys:
            self.entries.pop(key, None)

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries.values())
