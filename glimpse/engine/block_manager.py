"""Step 4: the KV block pool, block tables and the prefix cache.

Blocks hold `block_size` tokens of K and V. A full block's hash chains its parent's hash,
its token ids and the content hashes of the media whose embedding slots fall inside it
(with the offset into the item), so two prompts with different images never share KV even
when their token ids are identical, while identical images do. Freed blocks keep their hash
and stay reusable until the pool needs them (least recently freed first).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

from glimpse.engine.request import Request


class Block:
    __slots__ = ("block_id", "ref_count", "block_hash")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_count = 0
        self.block_hash: int | None = None


class BlockManager:
    """Allocates KV blocks to requests; block ids index the paged KV tensors."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.block_size = block_size
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))  # LRU order
        self.cached: dict[int, int] = {}  # block hash -> block id
        self.enable_prefix_caching = enable_prefix_caching
        self.queries = 0  # prefix-cache lookups (in tokens) ...
        self.hits = 0  # ... and hits, for metrics

    # ---- accounting ----------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks

    # ---- hashing -------------------------------------------------------------------
    def block_hash(self, request: Request, index: int, parent: int | None) -> int:
        """Hash of full block `index` of `request` (tokens, media inside it, and its parent)."""
        start, end = index * self.block_size, (index + 1) * self.block_size
        h = hashlib.blake2b(digest_size=8)
        h.update(repr((parent, request.token_ids(start, end))).encode())
        for m in request.media_in(start, end):
            h.update(f"|{m.content_hash}@{start - m.start}".encode())
        return int.from_bytes(h.digest(), "little")

    # ---- prefix cache ---------------------------------------------------------------
    def match_prefix(self, request: Request) -> int:
        """Attach cached blocks for the longest cached prefix; returns the tokens they hold.

        At least one prompt token is always left to compute, so the step that finishes the
        prompt has logits to sample from.
        """
        if not self.enable_prefix_caching:
            return 0
        max_blocks = (request.num_tokens - 1) // self.block_size
        parent = None
        hits: list[int] = []
        for i in range(max_blocks):
            h = self.block_hash(request, i, parent)
            block_id = self.cached.get(h)
            if block_id is None:
                break
            hits.append(block_id)
            request.block_hashes.append(h)
            parent = h
        for block_id in hits:
            self._ref(block_id)
        request.block_ids.extend(hits)
        self.queries += request.num_tokens
        self.hits += len(hits) * self.block_size
        return len(hits) * self.block_size

    # ---- allocation ------------------------------------------------------------------
    def can_allocate(self, request: Request, num_new_tokens: int) -> bool:
        need = self._blocks_needed(request, num_new_tokens)
        return need <= self.num_free_blocks

    def allocate(self, request: Request, num_new_tokens: int) -> bool:
        """Grow the block table to hold `num_computed_tokens + num_new_tokens`; False if out of blocks."""
        need = self._blocks_needed(request, num_new_tokens)
        if need > self.num_free_blocks:
            return False
        for _ in range(need):
            request.block_ids.append(self._take_free())
        return True

    def commit_full_blocks(self, request: Request) -> None:
        """Register the hashes of blocks that became full of computed tokens."""
        if not self.enable_prefix_caching:
            return
        full = request.num_computed_tokens // self.block_size
        while len(request.block_hashes) < full:
            i = len(request.block_hashes)
            parent = request.block_hashes[-1] if request.block_hashes else None
            h = self.block_hash(request, i, parent)
            request.block_hashes.append(h)
            block = self.blocks[request.block_ids[i]]
            if block.block_hash is None and h not in self.cached:
                block.block_hash = h
                self.cached[h] = block.block_id

    def free_request(self, request: Request) -> None:
        """Release a request's blocks (most recent last, so earlier prefix blocks are evicted last)."""
        for block_id in reversed(request.block_ids):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free[block_id] = None
        request.block_ids.clear()
        request.block_hashes.clear()

    def reset_prefix_cache(self) -> None:
        for block in self.blocks:
            block.block_hash = None
        self.cached.clear()

    # ---- internals -------------------------------------------------------------------
    def _blocks_needed(self, request: Request, num_new_tokens: int) -> int:
        total = request.num_computed_tokens + num_new_tokens
        return max(0, -(-total // self.block_size) - len(request.block_ids))

    def _ref(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            self.free.pop(block_id, None)
        block.ref_count += 1

    def _take_free(self) -> int:
        block_id, _ = self.free.popitem(last=False)
        block = self.blocks[block_id]
        if block.block_hash is not None:  # evict its cached content
            self.cached.pop(block.block_hash, None)
            block.block_hash = None
        block.ref_count = 1
        return block_id
