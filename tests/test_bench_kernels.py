"""`glimpse bench kernels`: too few timed runs are refused, and each speed-up carries its spread.

The spread is checked on hand-worked timings (a fake clock whose runs take known seconds), not on
the kernels themselves, which are covered by tests/test_cpu_kernels.py.
"""

from __future__ import annotations

import pytest

from glimpse.bench import kernels
from glimpse.bench.kernels import Timing, format_speedup, speedup


@pytest.mark.parametrize("repeats", ["0", "1", "2"])
def test_too_few_repeats_are_refused(repeats, capsys):
    from glimpse.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["bench", "kernels", "--repeats", repeats])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "glimpse: error: argument --repeats: must be >= 3" in err and "Traceback" not in err


def test_timed_runs_on_a_fake_clock(monkeypatch):
    # Two untimed warm-up calls, then runs of 3, 1 and 2 s: median 2, fastest 1, slowest 3.
    durations = iter([50.0, 50.0, 3.0, 1.0, 2.0])
    clock = [0.0]
    monkeypatch.setattr(kernels.time, "perf_counter", lambda: clock[0])

    def run_once():
        clock[0] += next(durations)

    assert kernels._timed(run_once, 3) == Timing(median=2.0, fastest=1.0, slowest=3.0)


def test_speedup_spread_hand_worked():
    # torch: runs of 1.8-2.4 s, median 2.0; glimpse: 0.9-1.2 s, median 1.0.
    row = speedup(Timing(2.0, 1.8, 2.4), Timing(1.0, 0.9, 1.2))
    assert row["speedup"] == pytest.approx(2.0)
    assert row["speedup_range"] == pytest.approx([1.8 / 1.2, 2.4 / 0.9])  # 1.5 to 2.67
    assert format_speedup(row) == "2.00x (1.50-2.67)"
