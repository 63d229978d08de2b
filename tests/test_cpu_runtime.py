"""How a CPU engine sets up its process: compute threads pinned to cores (glimpse.platform.ThreadBinding,
GLIMPSE_CPU_BIND) and glibc malloc told to keep freed memory (glimpse.platform.tune_allocator).

The plan is checked against hand-worked CPU sets; the binding itself against what the kernel reports:
each thread's `Cpus_allowed_list` in /proc/self/task/*/status, read in a subprocess (a pinned pool
would otherwise stay pinned in the test process) after an engine has run a step.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from glimpse import platform
from glimpse.errors import InvalidInputError
from glimpse.platform import cpu_binding_plan, format_cpu_list, parse_cpu_list

ALLOWED = sorted(os.sched_getaffinity(0))


def test_auto_pins_only_threads_that_use_every_core():
    """auto: threads that use exactly this process's cores are pinned in order, split between the ranks;
    fewer threads are left floating (several such processes would all pin to the first cores), more too."""
    cores = len(ALLOWED)
    assert cpu_binding_plan(0, 1, cores, "auto") == ALLOWED
    if cores % 2 == 0:
        assert cpu_binding_plan(0, 2, cores // 2, "auto") == ALLOWED[: cores // 2]
        assert cpu_binding_plan(1, 2, cores // 2, "auto") == ALLOWED[cores // 2 :]
    if cores >= 2:
        assert cpu_binding_plan(0, 1, cores - 1, "auto") is None
    assert cpu_binding_plan(0, 1, cores + 1, "auto") is None
    assert cpu_binding_plan(0, 2, cores, "auto") is None
    assert cpu_binding_plan(0, 1, cores, "off") is None


def test_explicit_lists_one_per_rank():
    first = ALLOWED[0]
    assert cpu_binding_plan(0, 1, None, f"{first}") == [first]
    assert cpu_binding_plan(0, 2, None, f"{first}|{first}") == [first]
    assert parse_cpu_list("0-3,8", "x") == [0, 1, 2, 3, 8]
    assert format_cpu_list([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"


@pytest.mark.parametrize(("setting", "size", "words"), [
    ("0-a", 1, ["GLIMPSE_CPU_BIND", "'0-a'", "CPU number or range"]),
    ("3-1", 1, ["GLIMPSE_CPU_BIND", "ascending"]),
    ("0,0", 1, ["GLIMPSE_CPU_BIND", "twice"]),
    ("0|1", 1, ["GLIMPSE_CPU_BIND", "2 CPU list(s) for 1", "'|'"]),
    ("0", 2, ["GLIMPSE_CPU_BIND", "1 CPU list(s) for 2"]),
    ("100000", 1, ["GLIMPSE_CPU_BIND", "[100000]", "may not run on", f"allowed: {format_cpu_list(ALLOWED)}"]),
])  # fmt: skip
def test_bad_settings_are_named(setting, size, words):
    with pytest.raises(InvalidInputError) as err:
        cpu_binding_plan(0, size, None, setting)
    assert all(w in str(err.value) for w in words), str(err.value)


def test_a_bad_setting_stops_the_engine_before_it_loads(tiny_checkpoint, monkeypatch, tmp_path):
    """An engine reads GLIMPSE_CPU_BIND before loading anything: the error names it, even for a folder
    that holds no checkpoint at all (loading would fail there)."""
    from glimpse.engine.llm_engine import EngineConfig, LLMEngine

    monkeypatch.setenv("GLIMPSE_CPU_BIND", "zero")
    with pytest.raises(InvalidInputError, match="GLIMPSE_CPU_BIND='zero'"):
        LLMEngine(EngineConfig(model=tmp_path))


def test_the_cli_names_a_bad_setting_in_one_line(tiny_checkpoint):
    env = {**os.environ, "GLIMPSE_CPU_BIND": "1-0"}
    ckpt = tiny_checkpoint("glm4v")
    proc = subprocess.run([sys.executable, "-m", "glimpse.cli", "generate", str(ckpt), "hi", "--max-tokens", "2"],
                          capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("glimpse: error:") and "GLIMPSE_CPU_BIND='1-0'" in lines[-1], proc.stderr
    assert "Traceback" not in proc.stderr


THREAD_MASKS = textwrap.dedent("""
    import json, os, sys, torch
    torch.set_num_threads(int(sys.argv[2]))
    from glimpse import LLM, SamplingParams

    def masks():  # the main thread's CPU list and every thread's, as the kernel reports them
        lists = {}
        for tid in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{tid}/status") as f:
                line = next(l for l in f if l.startswith("Cpus_allowed_list:"))
            lists[tid] = line.split(":", 1)[1].strip()
        return {"main": lists[str(os.getpid())], "threads": sorted(lists.values())}

    llm = LLM(model=sys.argv[1], dtype="bfloat16", kv_cache_memory="64MiB")
    llm.generate(["hello there"], SamplingParams(max_tokens=3, temperature=0.0), use_tqdm=False)
    stepped = masks()
    llm.close()  # unpins
    print(json.dumps({**stepped, "after_close": masks()}))
""")


def thread_masks(ckpt, threads: int, setting: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "GLIMPSE_CPU_BIND"}
    if setting is not None:
        env["GLIMPSE_CPU_BIND"] = setting
    proc = subprocess.run([sys.executable, "-c", THREAD_MASKS, str(ckpt), str(threads)], capture_output=True,
                          text=True, env=env, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(len(ALLOWED) < 2, reason="pinning threads to separate cores needs two cores")
def test_an_engine_pins_its_compute_threads(tiny_checkpoint, native_kernels):
    """One torch thread per core of this process: after a step each OpenMP worker is pinned to its own
    core while the stepping (main) thread keeps all of them (the caller's thread is never narrowed); with
    GLIMPSE_CPU_BIND=off nothing is pinned; the engine's close() unpins the workers."""
    ckpt = tiny_checkpoint("glm4v")
    everything = format_cpu_list(ALLOWED)
    bound = thread_masks(ckpt, len(ALLOWED), None)
    assert bound["main"] == everything
    assert all(str(c) in bound["threads"] for c in ALLOWED[1:]), bound  # the workers, one core each
    free = thread_masks(ckpt, len(ALLOWED), "off")
    assert free["main"] == everything and set(free["threads"]) == {everything}, free
    explicit = thread_masks(ckpt, len(ALLOWED), f"{ALLOWED[1]},{ALLOWED[0]}")  # two CPUs listed, in this order
    assert explicit["main"] == everything and str(ALLOWED[1]) not in explicit["threads"], explicit
    assert str(ALLOWED[0]) in explicit["threads"]  # the one worker, on the second CPU listed
    for masks in (bound, explicit):
        after = masks["after_close"]
        assert after["main"] == everything and set(after["threads"]) == {everything}, after


def test_binding_is_a_no_op_off_the_cpu_and_when_off():
    assert platform.ThreadBinding("cpu", setting="off").cpus is None
    assert platform.ThreadBinding("meta", setting="auto").cpus is None
    platform.ThreadBinding("cpu", setting="off").ensure()  # nothing to do, nothing raised


ALLOCATIONS = textwrap.dedent("""
    import ctypes, sys, torch
    from glimpse import platform
    mode, mib = sys.argv[1], int(sys.argv[2])
    tuned = {"tune": platform.tune_allocator, "keep": platform.keep_large_allocations}.get(mode, lambda d: False)("cpu")
    class MallInfo2(ctypes.Structure):  # glibc's struct mallinfo2: ten size_t counters
        _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                                         "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
    mallinfo2 = getattr(ctypes.CDLL(None), "mallinfo2", None)  # glibc >= 2.33
    if mallinfo2 is None:
        print(tuned, "none")
        raise SystemExit(0)
    mallinfo2.restype = MallInfo2
    before = mallinfo2().hblkhd  # bytes in mappings of their own
    x = torch.ones(mib << 19, dtype=torch.bfloat16)  # an activation of `mib` MiB
    print(tuned, (mallinfo2().hblkhd - before) >> 20)
""")


def mapped_for_activation(mode: str, env: dict | None = None, mib: int = 24) -> tuple[str, int]:
    """(whether tuned, MiB of fresh mappings glibc made for one `mib` MiB tensor)."""
    proc = subprocess.run([sys.executable, "-c", ALLOCATIONS, mode, str(mib)], capture_output=True, text=True,
                          timeout=300, env=env or os.environ)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    tuned, mib = proc.stdout.split()
    if mib == "none":
        pytest.skip("this C library has no mallinfo2 (glibc >= 2.33) to read the allocator's mappings with")
    return tuned, int(mib)


@pytest.mark.skipif(sys.platform != "linux", reason="mallopt and mallinfo2 are glibc's")
def test_tuned_malloc_serves_activations_from_its_heap():
    """glibc's defaults serve a 24 MiB tensor from a mapping of its own (the threshold starts at 128 KiB),
    which goes back to the kernel when freed and is zeroed page by page when made again; tuned, it comes
    from the heap, whose freed memory glibc keeps for the next one. GLIMPSE_MALLOC_TUNING=0 leaves glibc alone."""
    assert mapped_for_activation("plain") == ("False", 24)
    assert mapped_for_activation("tune") == ("True", 0)
    assert mapped_for_activation("tune", {**os.environ, "GLIMPSE_MALLOC_TUNING": "0"}) == ("False", 24)


@pytest.mark.skipif(sys.platform != "linux", reason="mallopt and mallinfo2 are glibc's")
def test_large_activations_come_from_the_heap_once_the_model_is_in():
    """Above 32 MiB (glibc's ceiling for the mmap threshold) a tensor gets a mapping of its own even when
    tuned; after keep_large_allocations (what the engine calls once its weights and KV cache are in) a
    96 MiB one comes from the heap too. GLIMPSE_MALLOC_TUNING=0 leaves glibc alone here as well."""
    assert mapped_for_activation("tune", mib=96) == ("True", 96)
    assert mapped_for_activation("keep", mib=96) == ("True", 0)
    assert mapped_for_activation("keep", {**os.environ, "GLIMPSE_MALLOC_TUNING": "0"}, mib=96) == ("False", 96)
