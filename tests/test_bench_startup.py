"""`glimpse bench startup`: separate processes timed from spawn, on a tiny checkpoint (warm starts only).

References independent of the bench: a child that prints a line and then sleeps a known time (its
first-line and exit stamps must straddle the sleep), the exit status of `python -m glimpse.cli --version`
run here, and the JSON keys the bench documents. The cold start (a ~40 s native-kernel rebuild) is
not run here.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from glimpse.bench import startup
from glimpse.errors import GlimpseError

ROOT = Path(__file__).resolve().parents[1]


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    startup.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_first_line_and_exit_straddle_a_known_sleep():
    child = [sys.executable, "-c", "import time; print('token', flush=True); time.sleep(0.5)"]
    code, first, total, _ = startup.time_process(child, dict(os.environ), timeout=30)
    assert code == 0
    assert 0 < first < total and total >= 0.5 and total - first >= 0.45


def test_a_hung_process_is_killed_at_the_timeout():
    child = [sys.executable, "-c", "import sys, time; print('dying', file=sys.stderr); time.sleep(60)"]
    start = time.monotonic()
    code, _, total, last = startup.time_process(child, dict(os.environ), timeout=1)
    assert code != 0 and 1 <= total < 10 and time.monotonic() - start < 10
    assert last == "dying"


def test_bad_flags_and_checkpoint_are_refused(tmp_path):
    with pytest.raises(SystemExit):
        _args("--rounds", "0")
    with pytest.raises(GlimpseError, match="--checkpoint"):
        startup.run(_args("--checkpoint", str(tmp_path), "--skip-cold"))


def test_warm_start_on_a_tiny_checkpoint():
    code = "import argparse, sys; from glimpse.bench import startup; p = argparse.ArgumentParser(); " \
           "startup.add_arguments(p); sys.exit(startup.run(p.parse_args(sys.argv[1:])))"  # fmt: skip
    # no wall-clock bound: on a loaded CI machine (or one that rebuilds the native kernels) this takes minutes
    done = subprocess.run([sys.executable, "-c", code, "--rounds", "1", "--skip-cold"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    has_version = subprocess.run([sys.executable, "-m", "glimpse.cli", "--version"], cwd=ROOT,
                                 capture_output=True, check=False).returncode == 0  # fmt: skip
    expected = {"help", "warm_first_token", "warm_exit"} | ({"version"} if has_version else set())
    assert result["bench"] == "startup" and result["rounds"] == 1 and result["skip_cold"] is True
    assert set(result["results"]) == expected  # no cold rows with --skip-cold
    for row in result["results"].values():
        assert len(row["runs_s"]) == 1 and row["runs_s"][0] > 0
        assert row["min_s"] == row["median_s"] == row["max_s"] == row["runs_s"][0]
        assert any(line.startswith(row["what"]) for line in lines[:-1])  # each figure has a table row
    results = result["results"]
    assert results["warm_first_token"]["median_s"] <= results["warm_exit"]["median_s"]
    assert not any(line.startswith("warning:") for line in lines)  # the cold-build warning needs cold rows
