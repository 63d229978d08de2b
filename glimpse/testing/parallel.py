"""Run a function on several ranks of a real torch.distributed process group (fresh processes, gloo on
this machine): what the tensor-parallel tests and benchmarks use to drive `load_model(...,
tensor_parallel_size=N)` the way torchrun would."""

from __future__ import annotations

import io
import queue
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.multiprocessing as mp

from glimpse import distributed


def run_ranks(fn: Callable[..., Any], size: int, *args: Any, threads: int = 1, timeout: float = 900.0) -> list[Any]:
    """fn(*args) on ranks 0..size-1, each a spawned process in one process group with `threads` torch
    threads; returns the results in rank order. A rank that raises or dies fails the call, naming it."""
    ctx = mp.get_context("spawn")
    store = distributed.start_store()
    results = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(rank, size, store.port, threads, fn, args, results), daemon=True)
             for rank in range(size)]  # fmt: skip
    for p in procs:
        p.start()
    got: dict[int, Any] = {}
    try:
        while len(got) < size:
            try:
                rank, ok, value = results.get(timeout=1.0)
            except queue.Empty:
                timeout -= 1.0
                dead = [r for r, p in enumerate(procs) if r not in got and p.exitcode is not None]
                if dead or timeout <= 0:
                    raise RuntimeError(f"rank(s) {dead} exited (codes {[procs[r].exitcode for r in dead]})"
                                       if dead else "the ranks did not finish in time") from None  # fmt: skip
                continue
            if not ok:
                raise RuntimeError(f"rank {rank} failed:\n{value}")
            got[rank] = torch.load(io.BytesIO(value), weights_only=False)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return [got[r] for r in range(size)]


def _rank(rank: int, size: int, port: int, threads: int, fn, args, results) -> None:
    torch.set_num_threads(threads)
    try:
        distributed.init_process_group(rank, size, "127.0.0.1", port)
        # as bytes: a tensor put on the queue as is travels as a file descriptor the parent fetches from
        # this process, which may have exited by then
        buffer = io.BytesIO()
        torch.save(fn(*args), buffer)
        results.put((rank, True, buffer.getvalue()))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
