"""Step 6 cache: vision embeddings keyed by media content hash, reused across requests.

A byte budget bounds it. Entries a running request still needs are pinned (reference
counted) and never evicted; unpinned entries are evicted least recently used first. The
scheduler asks `can_fit` before scheduling an item's encoding, so the budget is never
exceeded. With `retain=False` (encoder cache off) entries live only while pinned. An entry is
`[num_tokens, hidden]` embeddings, or an EVS video's `PrunedVideo` (kept rows and their indices).
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from glimpse.models.evs import PrunedVideo

Entry = torch.Tensor | PrunedVideo


class EncoderCache:
    def __init__(self, max_bytes: int, retain: bool = True) -> None:
        self.max_bytes = max_bytes
        self.retain = retain  # False: drop embeddings once no request needs them (no cross-request reuse)
        self.entries: OrderedDict[str, Entry] = OrderedDict()
        self.pins: dict[str, int] = {}
        self.used_bytes = 0
        self.lookups = 0
        self.hits = 0

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def get(self, key: str) -> Entry:
        self.entries.move_to_end(key)
        return self.entries[key]

    def lookup(self, key: str) -> bool:
        """Count a lookup for the hit-rate metric; True when the embeddings are cached."""
        self.lookups += 1
        hit = key in self.entries
        self.hits += hit
        return hit

    def pin(self, key: str) -> None:
        self.pins[key] = self.pins.get(key, 0) + 1

    def unpin(self, key: str) -> None:
        n = self.pins.get(key, 0) - 1
        if n <= 0:
            self.pins.pop(key, None)
            if not self.retain and key in self.entries:
                self.used_bytes -= self.entries.pop(key).nbytes
        else:
            self.pins[key] = n

    def evictable_bytes(self) -> int:
        return sum(t.nbytes for k, t in self.entries.items() if k not in self.pins)

    def can_fit(self, nbytes: int) -> bool:
        return self.max_bytes - self.used_bytes + self.evictable_bytes() >= nbytes

    def put(self, key: str, embeddings: Entry) -> None:
        if key in self.entries:
            return
        nbytes = embeddings.nbytes
        if not self.can_fit(nbytes):
            raise RuntimeError("encoder cache over budget: the scheduler must check can_fit first")
        for old in list(self.entries):
            if self.used_bytes + nbytes <= self.max_bytes:
                break
            if old not in self.pins:
                self.used_bytes -= self.entries.pop(old).nbytes
        self.entries[key] = embeddings
        self.used_bytes += nbytes

    def clear(self) -> None:
        for key in [k for k in self.entries if k not in self.pins]:
            self.used_bytes -= self.entries.pop(key).nbytes
