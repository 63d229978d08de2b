"""`glimpse bench startup`: seconds to `glimpse --help` and to the first token of `glimpse generate`, cold and warm.

Every figure is a fresh process (`python -m glimpse.cli`, this interpreter), timed from spawn:
`--help` and `--version` to exit; `generate CKPT "hi" --max-tokens 1` to its reply line on stdout
(unbuffered: the one token is decoded) and to exit. Cold: each round gets new, empty
TORCH_EXTENSIONS_DIR and TORCHINDUCTOR_CACHE_DIR folders, so the native kernels are rebuilt; warm:
the next process on the same folders (`--skip-cold`: on this environment's own, after one untimed run).
Prints a table (median and min-max over `--rounds`), then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from glimpse.errors import GlimpseError
from glimpse.units import int_at_least

ROOT = Path(__file__).resolve().parents[2]
CACHE_ENV = ("TORCH_EXTENSIONS_DIR", "TORCHINDUCTOR_CACHE_DIR")
COLD_WARNING = ("cold figures include the native-kernel build (torch's C++ extension loader, once per machine and "
                "torch version, cached in TORCH_EXTENSIONS_DIR); compare warm figures across versions")  # fmt: skip


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", default=None, help="checkpoint folder (default: a tiny glm4v one in a temp dir)")
    p.add_argument("--rounds", type=int_at_least(1), default=3,
                   help="processes per figure; a round is a cold start on new cache folders, then a warm one")
    p.add_argument("--skip-cold", action="store_true",
                   help="no cold starts (they rebuild the native kernels, 20-40 s); warm on this environment's caches")
    p.add_argument("--timeout", type=int_at_least(1), default=600, help="seconds one process may take")




def time_process(argv: list[str], env: dict[str, str], timeout: float) -> tuple[int, float, float, str]:
    """(exit status, seconds from spawn to the first stdout line, seconds to exit, stderr's last line)."""
    with tempfile.TemporaryFile(mode="w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL, env=env,
                                cwd=ROOT, text=True)  # fmt: skip
        killer = threading.Timer(timeout, proc.kill)  # readline() below has no timeout of its own
        killer.start()
        try:
            assert proc.stdout is not None
            proc.stdout.readline()
            first = time.perf_counter() - start
            proc.stdout.read()
            code = proc.wait()
            total = time.perf_counter() - start
        finally:
            killer.cancel()
            proc.kill()  # a no-op once it has exited
            proc.wait()
        err.seek(0)
        lines = [line for line in err.read().splitlines() if line.strip()]
    return code, first, total, (lines[-1] if lines else "")


def _env(**overrides: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", **overrides)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))  # this tree's glimpse
    return env


def _stats(what: str, runs: list[float]) -> dict:
    runs = [round(r, 4) for r in runs]
    return {"what": what, "median_s": round(statistics.median(runs), 4), "min_s": min(runs), "max_s": max(runs),
            "runs_s": runs}  # fmt: skip


def run(args: argparse.Namespace) -> int:
    cli = [sys.executable, "-m", "glimpse.cli"]
    with tempfile.TemporaryDirectory(prefix="glimpse-startup-") as tmp:
        made = args.checkpoint is None
        if made:
            from glimpse.testing import make_checkpoint

            checkpoint = make_checkpoint("glm4v", "tiny", Path(tmp) / "checkpoint")
        else:
            checkpoint = Path(args.checkpoint)
            if not (checkpoint / "config.json").is_file():
                raise GlimpseError(f"{checkpoint} is not a checkpoint folder (no config.json); check --checkpoint")
        generate = [*cli, "generate", str(checkpoint), "hi", "--max-tokens", "1"]

        def timed(argv: list[str], env: dict[str, str]) -> tuple[float, float]:
            code, first, total, last = time_process(argv, env, args.timeout)
            if code != 0:
                shown = " ".join(argv[2:])
                raise GlimpseError(f"`python {shown}` exited with status {code} after {total:.1f} s (--timeout "
                                   f"{args.timeout}); its stderr ends: {last or '(empty)'}")  # fmt: skip
            return first, total

        results: dict[str, dict] = {}
        env = _env()
        results["help"] = _stats("glimpse --help", [timed([*cli, "--help"], env)[1] for _ in range(args.rounds)])
        if time_process([*cli, "--version"], env, args.timeout)[0] == 0:  # the flag is newer than this bench
            version = [timed([*cli, "--version"], env)[1] for _ in range(args.rounds)]
            results["version"] = _stats("glimpse --version", version)
        cold: list[tuple[float, float]] = []
        warm: list[tuple[float, float]] = []
        if args.skip_cold:
            timed(generate, env)  # untimed: fills this environment's caches if they are empty
        for i in range(args.rounds):
            if not args.skip_cold:
                caches = {name: Path(tmp) / f"round{i}" / name.lower() for name in CACHE_ENV}
                for folder in caches.values():
                    folder.mkdir(parents=True)
                env = _env(**{name: str(folder) for name, folder in caches.items()})
                cold.append(timed(generate, env))
            warm.append(timed(generate, env))
        for kind, runs in (("cold", cold), ("warm", warm)):
            if runs:
                results[f"{kind}_first_token"] = _stats(f"generate, {kind}: to the first token", [r[0] for r in runs])
                results[f"{kind}_exit"] = _stats(f"generate, {kind}: to exit", [r[1] for r in runs])

    print(f"{'what':<40}{'seconds':>9}  (min-max over {args.rounds} run(s))")
    for row in results.values():
        print(f"{row['what']:<40}{row['median_s']:>9.2f}  ({row['min_s']:.2f}-{row['max_s']:.2f})")
    if cold:
        print(f"warning: {COLD_WARNING}")
    out = {"bench": "startup", "python": sys.executable, "checkpoint": None if made else str(checkpoint),
           "rounds": args.rounds, "skip_cold": args.skip_cold, "results": results}  # fmt: skip
    print(json.dumps(out), flush=True)
    return 0
