"""`glimpse bench preprocess` in a tiny mode: the JSON it prints, and that the seek path decodes less.

The bench runs as a program (a subprocess, as a user runs it) on a 12 s clip with three image
passes (the fewest it accepts). The references are independent of glimpse: the clip's frame count comes from the
recipe (12 s x 30 fps), every returned frame carries its own index as a barcode, and the full
decode is a plain PyAV loop over the file.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from glimpse.bench.preprocess import BARCODE_BITS, read_barcodes

ROOT = Path(__file__).resolve().parents[1]


def test_barcode_round_trip_hand_made():
    # Index 5 = bits 0 and 2 set: blocks 0 and 2 of the top strip white, the rest black.
    frame = np.zeros((1, 180, 320, 3), np.uint8)
    block = 320 // BARCODE_BITS
    for bit in (0, 2):
        frame[0, :18, bit * block : (bit + 1) * block] = 255
    assert read_barcodes(frame) == [5]


def test_bench_preprocess_tiny(tmp_path):
    cmd = [sys.executable, "-m", "glimpse.bench.preprocess", "--video-minutes", "0.2", "--image-iters", "3",
           "--limits", "checkpoint", "--image-sides", "224,1024", "--workdir", str(tmp_path)]  # fmt: skip
    start = time.monotonic()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    elapsed = time.monotonic() - start
    assert done.returncode == 0, done.stderr[-3000:]
    assert elapsed < 60
    lines = done.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    assert any(line.startswith("mode") and "decoded" in line for line in lines[:-1])  # the video table
    assert any(line.startswith("family") and "HF img/s" in line for line in lines[:-1])  # the image table

    video = result["video"]
    assert video["total_frames"] == 12 * 30 and video["fps"] == 30.0
    assert video["recipe"]["keyframe_interval"] == 300
    assert video["sampler"] == "glm46v"
    # glm46v on a 12 s clip: 3 samples/s x Tp 2 = 72 frames (parity-spec §2.2 rule, HF's formula).
    assert video["sampled_frames"] == 72
    modes = video["modes"]
    assert set(modes) == {"seek", "full_keep_sampled", "full_keep_all"}
    for mode in modes.values():
        assert mode["frames_match_indices"] is True
        assert mode["wall_s"] > 0 and mode["peak_rss_mb"] > 0
    assert modes["full_keep_sampled"]["frames_decoded"] == 360
    assert modes["full_keep_all"]["frames_decoded"] == 360 and modes["full_keep_all"]["frames_kept"] == 360
    assert modes["seek"]["frames_kept"] == 72
    assert 72 <= modes["seek"]["frames_decoded"] < modes["full_keep_sampled"]["frames_decoded"]
    assert set(video["ratios"]) >= {"frames_decoded_full_over_seek", "peak_rss_full_keep_all_over_seek"}

    images = result["images"]
    assert len(images["images"]) == 3 * 3  # 3 photos, each original plus 2 rescaled copies
    rows = images["rows"]
    assert {(r["family"], r["call"]) for r in rows} == {
        (f, c) for f in ("glm46v", "qwen2_5_vl") for c in ("per_image", "batch")
    }
    for r in rows:
        assert r["equal"] is True and r["limits"] == "checkpoint"
        assert r["glimpse_images_per_s"] > 0 and r["hf_images_per_s"] > 0
        # the JSON rounds each figure to 0.01, hence the tolerance
        assert r["ratio"] == pytest.approx(r["glimpse_images_per_s"] / r["hf_images_per_s"], rel=0.02)
        # The spread, recomputed from the three timed passes per side: HF's fastest over glimpse's
        # slowest, to HF's slowest over glimpse's fastest.
        ours, hf = r["pass_s"]["glimpse"], r["pass_s"]["hf"]
        assert len(ours) == len(hf) == 3 and min(ours) > 0
        assert r["ratio_range"] == pytest.approx([min(hf) / max(ours), max(hf) / min(ours)], rel=0.02)
        lo, hi = r["ratio_range"]
        assert lo <= r["ratio_median"] + 0.01 and r["ratio"] - 0.01 <= hi
    table = next(line for line in lines if line.startswith(("glm46v", "qwen2_5_vl")))
    first = rows[0]
    lo, hi = first["ratio_range"]
    assert f"{first['ratio']:.2f}x ({lo:.2f}-{hi:.2f})" in table  # the spread printed next to the ratio


@pytest.mark.parametrize("iters", ["1", "2"])
def test_too_few_image_passes_are_refused(iters, capsys):
    from glimpse.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["bench", "preprocess", "--image-iters", iters])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "glimpse: error: argument --image-iters: must be >= 3" in err and "Traceback" not in err
