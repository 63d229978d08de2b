"""The engine's tensor-parallel ranks: worker processes that run every step the engine runs.

The engine's own process is rank 0 (the driver): it schedules, runs its share of the model and samples.
`start_workers(config)` spawns ranks 1..N-1; each loads its share of the model, builds the same KV cache
(the same block count: block ids mean the same on every rank) and a `ModelRunner` that does not sample.
Per step the driver sends each worker the plain data it needs, `(SchedulerOutput, the tokens sampled
last step)`, over a pipe, and all ranks run the step; the collectives inside the forward keep them in
lockstep, and every rank computes the same gathered logits, of which only the driver samples.

Failure: a worker that dies closes its sockets, so the driver's next collective fails at once; the
driver then finds the dead process and raises `RankDiedError` (the engine core reports it and stops:
HTTP 503). A step that fails on any rank leaves the ranks out of step, so it ends the same way: a
worker exits, and a failure on the driver is itself a `RankDiedError`. A worker whose driver is gone
reads end of file on its pipe and exits.
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import os
import pickle
import signal
import time
from multiprocessing.connection import Connection

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from glimpse import distributed
from glimpse.engine.model_runner import ModelRunner, ModelRunnerOutput
from glimpse.engine.scheduler import SchedulerOutput
from glimpse.errors import GlimpseError, InvalidInputError, RankDiedError

log = logging.getLogger("glimpse.engine")

# How long a worker may take to start and join the group (seconds); loading its share has no bound of its
# own here (the driver loads its own share meanwhile, and a worker that dies is seen at once).
START_TIMEOUT = 300.0
MAIN_GUARD_HINT = ("a script that makes an LLM with tensor_parallel_size > 1 must do so under "
                   "`if __name__ == \"__main__\":` (the ranks are spawned processes that import it)")  # fmt: skip


def threads_per_rank(size: int) -> int:
    """torch threads for each of `size` ranks: the cores this process may run on, split between them."""
    return max(1, len(os.sched_getaffinity(0)) // size)


class Workers:
    """Ranks 1..N-1 of an engine (processes), and the pipes the driver sends steps on."""

    def __init__(self, procs: list, conns: list[Connection], store, saved_threads: int) -> None:
        self.procs, self.conns, self._store = procs, conns, store
        self._saved_threads = saved_threads
        self._closed = False

    def driving(self, runner: ModelRunner) -> ParallelRunner:
        return ParallelRunner(runner, self)

    def send(self, message: tuple) -> None:
        # Once for all workers, and by value: multiprocessing's own pickler would hand each tensor over as a file
        # descriptor that only the first worker to ask can fetch.
        payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        for rank, conn in enumerate(self.conns, start=1):
            try:
                conn.send_bytes(payload)
            except OSError:
                raise RankDiedError(self.describe_dead() or f"tensor-parallel rank {rank} stopped") from None

    def wait(self, expected: str, timeout: float | None) -> None:
        """Until every worker has sent `expected` ("up": started; "ready": loaded), naming any that failed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for rank, (conn, proc) in enumerate(zip(self.conns, self.procs, strict=True), start=1):
            while not conn.poll(0.1):
                if proc.exitcode is not None:
                    hint = f"; {MAIN_GUARD_HINT}" if expected == "up" else ""
                    raise RankDiedError(f"tensor-parallel rank {rank} exited while starting (exit code "
                                        f"{proc.exitcode}){hint}")  # fmt: skip
                if deadline is not None and time.monotonic() > deadline:
                    raise RankDiedError(f"tensor-parallel rank {rank} did not start within {timeout:g} s")
            try:
                message = conn.recv()
            except (EOFError, OSError):
                raise RankDiedError(f"tensor-parallel rank {rank} exited while starting") from None
            if message[0] == "error":
                raise RankDiedError(f"tensor-parallel rank {rank} failed to start: {message[1]}")

    def describe_dead(self) -> str | None:
        """A line naming the workers that exited (None: all alive)."""
        dead = [(rank, p.exitcode) for rank, p in enumerate(self.procs, start=1) if p.exitcode is not None]
        if not dead:
            return None
        return "tensor-parallel rank(s) stopped: " + ", ".join(f"rank {r} (exit code {c})" for r, c in dead)

    def close(self) -> None:
        """Stop the workers (at most ~15 s), leave the process group and give back the thread count."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        for conn in self.conns:
            try:
                conn.send(("stop",))
            except OSError:
                pass
            conn.close()  # a worker still inside a step reads end of file next and exits
        for p in self.procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        if dist.is_initialized():  # this engine's group: another engine of this process may make its own
            dist.destroy_process_group()
        self._store = None
        torch.set_num_threads(self._saved_threads)


class ParallelRunner:
    """The driver's `ModelRunner`, run in step with the workers' (what the engine calls `runner`)."""

    def __init__(self, runner: ModelRunner, workers: Workers) -> None:
        self.runner, self.workers = runner, workers
        only_driver_samples(runner.model)
        self._sampled: tuple[list[str], list[int]] = ([], [])  # last step's tokens, not yet sent to the workers
        self._broken: str | None = None  # why no step can run any more

    def __getattr__(self, name: str):  # num_forwards, requests, encoder_cache, ... are the driver runner's
        return getattr(self.runner, name)

    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        if self._broken is None and (dead := self.workers.describe_dead()) is not None:
            self._broken = dead
        if self._broken is not None:
            raise RankDiedError(self._broken)
        self.workers.send(("step", _for_workers(sched), self._sampled))
        self._sampled = ([], [])
        try:
            out = self.runner.execute(sched)
        except BaseException as exc:
            if self.runner.sampling and isinstance(exc, Exception):
                raise  # past the last collective: the ranks are in step; the engine fails this step's requests
            # A collective failed because a rank died (its sockets closed), or this rank stopped part-way through
            # a step the others may still be in (an error, Ctrl-C): the ranks are out of step for good.
            self._broken = self.workers.describe_dead() or (
                f"a tensor-parallel step stopped on rank 0 ({type(exc).__name__}: {exc}); the ranks are out of step")
            self.workers.close()
            if isinstance(exc, Exception):
                raise RankDiedError(self._broken) from exc
            raise
        self._sampled = (out.req_ids, out.sampled_token_ids)
        return out


def only_driver_samples(model) -> None:
    """The LM head's logits go to rank 0 alone (the engine's ranks: only the driver samples)."""
    from glimpse.distributed.layers import ParallelLMHead

    if isinstance(model.lm_head, ParallelLMHead):
        model.lm_head.only_driver_samples = True


def _for_workers(sched: SchedulerOutput) -> SchedulerOutput:
    """`sched` less what only the sampling driver uses: structured-output constraints (a compiled grammar
    neither travels nor is needed where nothing is sampled)."""
    if all(new.constraint is None for new in sched.new_requests):
        return sched
    new = [dataclasses.replace(n, constraint=None) for n in sched.new_requests]
    return dataclasses.replace(sched, new_requests=new)


def start_workers(config) -> Workers:
    """Spawn ranks 1..N-1 for `config` (an EngineConfig) and join the process group with them as rank 0.
    The caller loads rank 0's share, then `wait("ready", None)`s for theirs."""
    from glimpse import platform

    size = config.tensor_parallel_size
    if dist.is_initialized():
        raise InvalidInputError(
            "tensor_parallel_size > 1: this process already has a torch.distributed process group (another "
            "engine still open: call its close(); or torchrun's: then call glimpse.load_model(..., "
            "tensor_parallel_size=N) on every rank instead)")  # fmt: skip
    platform.check_rank_devices(config.device, size)
    ctx = mp.get_context("spawn")
    store = distributed.start_store()
    procs, conns = [], []
    for rank in range(1, size):
        ours, theirs = ctx.Pipe()
        # Not daemonic: the engine core that starts them is itself a daemonic process, which may only have
        # such children. A worker ends when told, or when its pipe from this process closes (this one died).
        proc = ctx.Process(target=_worker_main, args=(config, rank, store.port, theirs),
                           name=f"glimpse-tp-rank{rank}", daemon=False)  # fmt: skip
        proc.start()
        theirs.close()
        procs.append(proc)
        conns.append(ours)
    workers = Workers(procs, conns, store, torch.get_num_threads())
    atexit.register(workers.close)  # before multiprocessing's own exit hook, which would wait for them forever
    try:
        workers.wait("up", START_TIMEOUT)  # a worker that cannot even start is named now, not at a timeout
        torch.set_num_threads(threads_per_rank(size))
        distributed.init_process_group(0, size, "127.0.0.1", store.port, platform.rank_device(config.device, 0))
    except BaseException:
        workers.close()
        raise
    return workers


def _worker_main(config, rank: int, port: int, conn: Connection) -> None:
    """Rank `rank`: load this share, then run the driver's steps until it says stop (or is gone)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the driver decides when ranks stop
    from glimpse import platform
    from glimpse.engine.encoder_cache import EncoderCache
    from glimpse.engine.llm_engine import (
        _parallel_kwargs,
        kv_cache_blocks,
        make_kv_cache,
        resolve_model_dtype,
    )
    from glimpse.loader import load_model

    conn.send(("up",))
    size = config.tensor_parallel_size
    torch.set_num_threads(threads_per_rank(size))
    device = platform.rank_device(config.device, rank)
    distributed.init_process_group(rank, size, "127.0.0.1", port, device)
    try:
        binding = platform.ThreadBinding(device, rank, size, config.cpu_binding, threads_per_rank(size))
        platform.tune_allocator(device)
        dtype = resolve_model_dtype(config)
        model = load_model(config.model, dtype=dtype, load_format=config.load_format, device=device,
                           seed=config.seed, **_parallel_kwargs(config), **config.model_kwargs)  # fmt: skip
        kv_cache = make_kv_cache(dataclasses.replace(config, device=device), model,
                                 kv_cache_blocks(config, model, dtype), dtype)  # fmt: skip
        runner = ModelRunner(model, kv_cache, EncoderCache(), None, frozenset(), config.seed, samples=False)
        only_driver_samples(model)
        platform.keep_large_allocations(device)
    except Exception as exc:  # named by the driver (a bug keeps its traceback in this rank's log)
        if not isinstance(exc, GlimpseError):
            log.exception("tensor-parallel rank %d failed to load", rank)
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        raise SystemExit(1) from None
    conn.send(("ready",))
    while True:
        try:
            message = pickle.loads(conn.recv_bytes())
        except (EOFError, OSError):
            return  # the driver is gone
        if message[0] == "stop":
            return
        _, sched, (req_ids, tokens) = message
        try:
            binding.ensure()
            runner.append_sampled(req_ids, tokens)
            runner.execute(sched)
        except Exception:
            # Out of step with the others (or the driver died mid-collective): stop, so that the driver's next
            # collective fails at once instead of waiting for this rank.
            log.exception("tensor-parallel rank %d: a step failed; this rank stops", rank)
            raise SystemExit(1) from None
