"""Tensor parallelism over torch.distributed: which share of the model this process holds, and the collectives.

One process is one rank. `TensorParallel` names the rank, the group size, the process group and the
two choices a user makes (`expert_parallel`: MoE experts whole on one rank each instead of every expert
split; `encoder_mode`: the vision tower split by heads, "weights", or whole on every rank, each rank
encoding whole media items, "data"). Model constructors read `current()` (set by the loader around
construction with `building(tp)`) and make their layers parallel (glimpse/distributed/layers.py);
with one rank every layer is the plain one, so nothing changes for a single process.

A layer that holds part of a checkpoint tensor says which part in `checkpoint_shards` (parameter
name -> `ShardSpec`), and the loader reads only those slices from the safetensors files.
Where the process group comes from: `init_process_group` (the engine's worker processes,
glimpse/distributed/executor.py) or the caller's own (torchrun, a test), found by `load_model`.
"""

from __future__ import annotations

import contextlib
import datetime
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from glimpse.errors import InvalidInputError

ENCODER_MODES = ("weights", "data")
# How long a rank waits for the others inside a collective. A dead rank's sockets close at once, so
# this bounds only a rank that hangs alive; a long prefill on the others must not trip it.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=10)


@dataclass(frozen=True)
class TensorParallel:
    """This process's place in a tensor-parallel group (size 1: no parallelism, no collectives)."""

    rank: int = 0
    size: int = 1
    group: dist.ProcessGroup | None = None
    expert_parallel: bool = False
    encoder_mode: str = "weights"

    @property
    def is_driver(self) -> bool:
        return self.rank == 0

    def share(self, n: int, what: str, other_way: str = "") -> tuple[int, int]:
        """(start, count) of this rank's equal share of `n` things (heads, MLP rows, experts)."""
        if n % self.size:
            raise InvalidInputError(f"{what} is {n}, not divisible by tensor_parallel_size (--tensor-parallel-size) "
                                    f"{self.size}; choose a size that divides it{other_way}")  # fmt: skip
        count = n // self.size
        return self.rank * count, count

    def kv_head_share(self, num_kv_heads: int) -> tuple[int, int]:
        """(first KV head, count) this rank holds: an equal share, or with fewer KV heads than ranks one
        head replicated on size / num_kv_heads consecutive ranks (each keeps the KV of its own query heads)."""
        if num_kv_heads >= self.size:
            return self.share(num_kv_heads, "num_key_value_heads")
        if self.size % num_kv_heads:
            raise InvalidInputError(f"num_key_value_heads {num_kv_heads} is fewer than tensor_parallel_size "
                                    f"(--tensor-parallel-size) {self.size} and does not divide it; choose a size "
                                    "it divides")  # fmt: skip
        return self.rank // (self.size // num_kv_heads), 1

    @property
    def vision(self) -> TensorParallel:
        """The group the vision tower is split over: this one in "weights" mode, none in "data" mode."""
        return self if self.encoder_mode == "weights" else SINGLE

    # ---- collectives (no-ops on one rank; each one over several ranks is counted in `COLLECTIVES`) ----
    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum over ranks, in place."""
        if self.size > 1:
            start = time.perf_counter()
            dist.all_reduce(x, group=self.group)
            COLLECTIVES.add(x.nbytes, start)
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """The ranks' equal-shaped `x` side by side along `dim`, in rank order."""
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        start = time.perf_counter()
        dist.all_gather(parts, x.contiguous(), group=self.group)
        COLLECTIVES.add(x.nbytes, start)
        return torch.cat(parts, dim)

    def gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor | None:
        """The ranks' equal-shaped `x` side by side along `dim` on rank 0 (None on the others)."""
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)] if self.is_driver else None
        start = time.perf_counter()
        dist.gather(x.contiguous(), parts, dst=0, group=self.group)
        COLLECTIVES.add(x.nbytes, start)
        return torch.cat(parts, dim) if parts is not None else None

    def all_gather_rows(self, x: torch.Tensor, rows: Sequence[int]) -> torch.Tensor:
        """Rank r's [rows[r], ...] tensors stacked in rank order (padded to the longest for the collective)."""
        if self.size == 1:
            return x
        longest = max(rows)
        padded = x.new_zeros(longest, *x.shape[1:])
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in range(self.size)]
        start = time.perf_counter()
        dist.all_gather(parts, padded, group=self.group)
        COLLECTIVES.add(padded.nbytes, start)
        return torch.cat([p[:n] for p, n in zip(parts, rows, strict=True)])


@dataclass
class CollectiveCounter:
    """The collectives this process ran over more than one rank: how many, the seconds spent inside them
    (waiting for the slowest rank included) and the bytes this rank put in. Process-local: each rank
    counts its own. `glimpse bench tensor-parallel` reads it around engine steps; nothing else does.
    On GPUs (NCCL queues the collective and returns) the seconds are the launch only."""

    calls: int = 0
    seconds: float = 0.0
    bytes: int = 0

    def add(self, nbytes: int, start: float) -> None:
        self.calls += 1
        self.seconds += time.perf_counter() - start
        self.bytes += nbytes

    def snapshot(self) -> CollectiveCounter:
        return CollectiveCounter(self.calls, self.seconds, self.bytes)

    def reset(self) -> None:
        self.calls, self.seconds, self.bytes = 0, 0.0, 0


COLLECTIVES = CollectiveCounter()
SINGLE = TensorParallel()
_current = SINGLE


def current() -> TensorParallel:
    """The group the model being built is split over (SINGLE outside `building`)."""
    return _current


@contextlib.contextmanager
def building(tp: TensorParallel) -> Iterator[None]:
    """Model constructors inside read `tp` from `current()`."""
    global _current
    saved, _current = _current, tp
    try:
        yield
    finally:
        _current = saved


def check_parallel_options(size: int, encoder_mode: str) -> None:
    """The user's tensor-parallel options, checked before anything starts (the messages name the knobs)."""
    if size < 1:
        raise InvalidInputError(f"tensor_parallel_size (--tensor-parallel-size) is {size}; it must be >= 1")
    if encoder_mode not in ENCODER_MODES:
        raise InvalidInputError(f"mm_encoder_tp_mode (--mm-encoder-tp-mode) is {encoder_mode!r}; "
                                f"choose one of {', '.join(ENCODER_MODES)}")  # fmt: skip


def from_process_group(size: int, expert_parallel: bool = False, encoder_mode: str = "weights") -> TensorParallel:
    """This process's rank in the default process group, which must span `size` ranks (size 1: SINGLE)."""
    check_parallel_options(size, encoder_mode)
    if size == 1:
        return TensorParallel(expert_parallel=expert_parallel, encoder_mode=encoder_mode)
    if not dist.is_available() or not dist.is_initialized():
        raise InvalidInputError(
            f"tensor_parallel_size={size} needs a torch.distributed process group of {size} ranks in this process "
            "(torchrun, or dist.init_process_group); LLM(..., tensor_parallel_size=N) and the CLI start their own"
        )
    if dist.get_world_size() != size:
        raise InvalidInputError(f"tensor_parallel_size={size} but the process group has {dist.get_world_size()} ranks")
    return TensorParallel(dist.get_rank(), size, dist.group.WORLD, expert_parallel, encoder_mode)


def start_store(host: str = "127.0.0.1") -> dist.TCPStore:
    """The rendezvous the ranks meet at, on a free port the OS picks (`store.port`); the caller keeps it alive."""
    return dist.TCPStore(host, 0, is_master=True, wait_for_workers=False, timeout=COLLECTIVE_TIMEOUT)


def init_process_group(rank: int, size: int, host: str, port: int, device: str = "cpu") -> None:
    """Join the default process group of `size` ranks through the store at host:port (gloo on CPU, NCCL on GPUs)."""
    from glimpse import platform

    store = dist.TCPStore(host, port, is_master=False, timeout=COLLECTIVE_TIMEOUT)
    dist.init_process_group(platform.distributed_backend(device), store=store, rank=rank, world_size=size,
                            timeout=COLLECTIVE_TIMEOUT)  # fmt: skip


@dataclass(frozen=True)
class ShardSpec:
    """Which part of a checkpoint tensor a rank holds: along `dim` (whose full size is `full`), the
    `ranges` ((start, length) each) back to back. `zero`: none of it, zeros instead (a row-parallel
    layer's bias lives on rank 0 only, so the sum over ranks adds it once)."""

    dim: int
    full: int
    ranges: tuple[tuple[int, int], ...]
    zero: bool = False

    @property
    def length(self) -> int:
        return sum(n for _, n in self.ranges)

    def full_shape(self, local: Sequence[int]) -> tuple[int, ...]:
        shape = list(local)
        if not self.zero:
            shape[self.dim] = self.full
        return tuple(shape)

    def take(self, tensor) -> torch.Tensor:
        """This rank's part of `tensor` (a torch tensor or a safetensors slice, which then reads only it)."""
        parts = []
        for start, n in self.ranges:
            index = (slice(None),) * self.dim + (slice(start, start + n),)
            parts.append(tensor[index])
        return parts[0] if len(parts) == 1 else torch.cat(parts, self.dim)


__all__ = ["COLLECTIVES", "COLLECTIVE_TIMEOUT", "ENCODER_MODES", "SINGLE", "CollectiveCounter", "ShardSpec",
           "TensorParallel", "building", "check_parallel_options", "current", "from_process_group",
           "init_process_group", "start_store"]  # fmt: skip
