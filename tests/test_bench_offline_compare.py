"""`glimpse bench offline-compare`: the worker's glimpse side on the tiny checkpoint, and the driver
against a fake "other python" written here.

References: the workload's own arithmetic (2 requests x 4 tokens with ignore_eos), HF's processor's
prompt length for the same chats, and the fake
worker's hand-set figures (the ratio is worked out here from the numbers it prints).
"""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hf_oracle import hf_inputs, hf_processor
from PIL import Image

from glimpse.bench import _offline_worker, offline_compare
from glimpse.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]


def _glimpse_worker(ckpt, *flags: str) -> dict:
    cmd = [sys.executable, "-m", "glimpse.bench._offline_worker", "--engine", "glimpse", "--model", str(ckpt),
           "--requests", "2", "--output-len", "4", "--dtype", "float32", "--max-num-seqs", "4", "--threads", "1",
           "--seed", "5", *flags]  # fmt: skip
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
    }
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _hf_prompt_tokens(ckpt, seeds: list[list[int]]) -> int:
    """HF's processor's prompt lengths (template + image placeholders) over the chats of these seeds."""
    proc = hf_processor(ckpt)
    ref = 0
    for seed in seeds:
        for chat in _offline_worker.conversations(2, seed, 224, 64):
            image, text = chat[0]["content"]
            data = base64.b64decode(image["image_url"]["url"].split(",", 1)[1])
            inputs = hf_inputs(proc, [{"type": "image"}, text], [Image.open(io.BytesIO(data)).convert("RGB")])
            ref += inputs["input_ids"].shape[1]
    return ref


def test_worker_glimpse_side_counts_the_tokens(tiny_checkpoint):
    ckpt = tiny_checkpoint("glm4v")
    line = _glimpse_worker(ckpt)
    assert line["engine"] == "glimpse" and line["requests"] == 2 and line["seed"] == 5
    assert line["output_tokens"] == 2 * 4  # ignore_eos: every request runs to max_tokens
    assert line["seconds"] > 0 and line["load_seconds"] > 0
    assert line["output_tok_s"] == pytest.approx(8 / line["seconds"])
    # The prompts the engine saw are HF's processor's on the same chats (template + image placeholders).
    assert line["prompt_tokens"] == _hf_prompt_tokens(ckpt, [[5, 0]])


def test_worker_times_back_to_back_batches_of_fresh_chats(tiny_checkpoint):
    """--batches 3 (the offline ceiling `bench compare --offline-ceiling` measures): three timed calls, each on
    its own two chats (the first batch's are those of one batch), every request run to max_tokens."""
    ckpt = tiny_checkpoint("glm4v")
    line = _glimpse_worker(ckpt, "--batches", "3")
    assert line["batches"] == 3 and len(line["batch_tok_s"]) == 3 and all(r > 0 for r in line["batch_tok_s"])
    assert line["output_tokens"] == 3 * 2 * 4
    assert line["output_tok_s"] == pytest.approx(24 / line["seconds"])
    assert line["prompt_tokens"] == _hf_prompt_tokens(ckpt, [[5, 0], [5, 0, 1], [5, 0, 2]])


def test_conversations_are_fresh_and_reproducible():
    a = _offline_worker.conversations(3, [1, 0], 32, 8)
    assert a == _offline_worker.conversations(3, [1, 0], 32, 8)
    urls = [c[0]["content"][0]["image_url"]["url"] for c in a]
    assert len(set(urls)) == 3 and all(u.startswith("data:image/jpeg;base64,") for u in urls)
    other = _offline_worker.conversations(3, [2, 0], 32, 8)  # the next round's seed
    assert not set(urls) & {c[0]["content"][0]["image_url"]["url"] for c in other}
    assert all(len(c[0]["content"][1]["text"].split()) == 8 for c in a)


FAKE = """#!{python}
# Stands in for vLLM's python: logs to stdout like an engine would, then prints a result line.
import json, sys
argv = sys.argv[1:]
flag = lambda name: argv[argv.index(name) + 1]
with open({log!r}, "a") as f:
    f.write(json.dumps(argv) + "\\n")
if {fail!r}:
    sys.stderr.write("Traceback (most recent call last):\\nRuntimeError: no vllm here\\n")
    sys.exit(3)
n, out = int(flag("--requests")), int(flag("--output-len"))
seconds = {{"0": 2.0, "1": 4.0, "2": 1.0}}[flag("--seed")]
print("INFO engine starting")
print(json.dumps({{"engine": "vllm", "requests": n, "seconds": seconds, "output_tokens": n * out,
                  "output_tok_s": n * out / seconds, "prompt_tokens": {prompt}, "load_seconds": 9.0,
                  "seed": int(flag("--seed"))}}))
"""


def _fake(tmp_path: Path, prompt: str = "None", fail: bool = False) -> tuple[Path, Path]:
    script, log = tmp_path / "fake-python", tmp_path / "fake.log"
    script.write_text(FAKE.format(python=sys.executable, log=str(log), fail=fail, prompt=prompt))
    script.chmod(0o755)
    return script, log


def _glimpse_rounds(monkeypatch, calls: list):
    """The glimpse side without an engine: hand-set seconds per seed (the real worker is tested above)."""
    real = offline_compare.run_worker
    seconds = {0: 1.0, 1: 1.0, 2: 4.0}

    def run_worker(args, side, seed, load_format):
        calls.append((side, seed, load_format))
        if side != "glimpse":
            return real(args, side, seed, load_format)
        n = args.requests * args.output_len
        return {"engine": "glimpse", "requests": args.requests, "seconds": seconds[seed], "output_tokens": n,
                "output_tok_s": n / seconds[seed], "prompt_tokens": None, "load_seconds": 3.0, "seed": seed}  # fmt: skip

    monkeypatch.setattr(offline_compare, "run_worker", run_worker)


def test_driver_alternates_rounds_and_states_medians_and_ratio(tmp_path, monkeypatch, capsys):
    script, log = _fake(tmp_path)
    calls: list = []
    _glimpse_rounds(monkeypatch, calls)
    out = tmp_path / "offline.json"
    args = build_parser().parse_args(["bench", "offline-compare", "--checkpoint", str(tmp_path), "--other-python",
                                      str(script), "--requests", "8", "--output-len", "4", "--rounds", "3",
                                      "--json", str(out)])  # fmt: skip
    report = args.func(args)
    # The engine that goes first swaps every round; one fresh seed per round, the same for both engines.
    assert [c[:2] for c in calls] == [("glimpse", 0), ("vllm", 0), ("vllm", 1), ("glimpse", 1), ("glimpse", 2), ("vllm", 2)]  # fmt: skip
    assert {c[2] for c in calls} == {"dummy"}  # a folder without safetensors
    argv = [json.loads(x) for x in log.read_text().splitlines()]
    assert [a[:3] for a in argv] == [["-P", str(offline_compare.WORKER), "--engine"]] * 3
    assert all(a[a.index("--requests") + 1] == "8" and a[a.index("--threads") + 1] == "2" for a in argv)
    # glimpse rounds: 32 tokens in 1, 1, 4 s -> median 32 tok/s; vLLM: 2, 4, 1 s -> median 16 tok/s.
    assert report["glimpse"]["median_output_tok_s"] == pytest.approx(32.0)
    assert report["vllm"]["median_output_tok_s"] == pytest.approx(16.0)
    assert report["ratio"]["output_tok_s"] == pytest.approx(2.0)
    assert (
        report["vllm"]["median_load_seconds"] == 9.0 and report["threads"] == 2 and report["warnings"] == []
    )
    saved = json.loads(out.read_text())
    assert set(saved) >= {"model", "cpu", "threads", "rounds", "workload", "settings", "glimpse", "vllm", "ratio",
                          "warnings"}  # fmt: skip
    assert saved["ratio"] == report["ratio"] and len(saved["vllm"]["rounds"]) == 3
    text = capsys.readouterr().out
    assert "ratio glimpse / vLLM, output tok/s: 2.00" in text and "CPU: " in text and "WARNING" not in text


def test_driver_warns_on_one_round_and_missing_tokens(tmp_path, monkeypatch, capsys):
    script, _ = _fake(tmp_path, prompt="123")
    _glimpse_rounds(monkeypatch, [])
    rc = main(["bench", "offline-compare", "--checkpoint", str(tmp_path), "--other-python", str(script),
               "--requests", "2", "--output-len", "3", "--rounds", "1"])  # fmt: skip
    assert rc == 0
    text = capsys.readouterr().out
    assert "WARNING: only 1 round(s) per engine: medians need >= 3 (--rounds)" in text
    assert "123 in vLLM" in text  # the two engines' prompt token counts differ


def test_a_failing_worker_prints_its_stderr_and_exits_1(tmp_path, capsys):
    script, _ = _fake(tmp_path, fail=True)
    args = build_parser().parse_args(["bench", "offline-compare", "--checkpoint", str(tmp_path), "--other-python",
                                      str(script), "--rounds", "1"])  # fmt: skip
    with pytest.raises(
        offline_compare.WorkerError, match="(?s)vllm worker exited with 3; last stderr lines:\n.*no vllm here"
    ):
        offline_compare.run_worker(args, "vllm", 0, "dummy")
    args.other_python = str(tmp_path / "nope")
    with pytest.raises(offline_compare.WorkerError, match="vllm worker could not start .*--other-python"):
        offline_compare.run_worker(args, "vllm", 0, "dummy")
    # The real glimpse worker on a folder with no checkpoint: its error, then exit 1 from the driver.
    rc = main(
        ["bench", "offline-compare", "--checkpoint", str(tmp_path / "empty"), "--other-python", str(script)]
    )
    err = capsys.readouterr().err
    assert (
        rc == 1
        and "glimpse worker exited with 1; last stderr lines:" in err
        and "empty" in err.split("last stderr")[1]
    )
