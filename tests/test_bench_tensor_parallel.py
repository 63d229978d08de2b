"""`glimpse bench tensor-parallel` on the tiny glm4v checkpoint: one round of 2 chats x 4 tokens.

References worked out here, not by the bench: the collectives of one decode step of a dense GLM text tower on
2 ranks (an all-reduce after the vocabulary-split embedding, one after each layer's o_proj and down_proj, and
one all-gather of the LM head's logits: 2 x layers + 2), their bytes from config.json's sizes, none on one
rank; the token counts of the workload; and every printed ratio recomputed from the printed numbers.
"""

from __future__ import annotations

import json
import math

import pytest

from glimpse.bench import tensor_parallel
from glimpse.cli import main
from glimpse.testing import make_checkpoint

REQUESTS, OUTPUT_LEN = 2, 4


def _rows(text: str, first_cells: tuple[str, ...]) -> dict[str, list[float]]:
    """Table rows whose first cell is one of `first_cells`, as numbers."""
    out = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.split("|")]
        if len(cells) > 1 and cells[0] in first_cells:
            out[cells[0]] = [float(c) for c in cells[1:]]
    return out


def _agrees(printed: float, num: float, den: float, digits: int, out_digits: int = 2) -> bool:
    """Whether `printed` (to `out_digits` decimals) is num / den for some values that print as `num` and `den`
    (to `digits` decimals): the ratio was worked out from the numbers the table shows."""
    half, out_half = 0.5 * 10**-digits, 0.5 * 10**-out_digits
    low, high = (num - half) / (den + half), (num + half) / (den - half)
    return low - out_half - 1e-9 <= printed <= high + out_half + 1e-9


def test_bad_flags_and_checkpoint_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "tensor-parallel", "--rounds", "0"])
    assert exit_.value.code == 2
    assert "--rounds" in capsys.readouterr().err
    assert main(["bench", "tensor-parallel", "--checkpoint", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "glimpse: error:" in err and "--checkpoint" in err and "Traceback" not in err


def test_moe_checkpoints_add_expert_parallel():
    assert [name for name, _ in tensor_parallel.configurations(False)] == ["tp1", "tp2-weights", "tp2-data"]
    assert tensor_parallel.configurations(True)[-1] == ("tp2-expert", {"tensor_parallel_size": 2,
                                                                      "enable_expert_parallel": True})  # fmt: skip


def test_one_round_on_the_tiny_checkpoint(tmp_path, capsys):
    path = make_checkpoint("glm4v", "tiny", tmp_path / "ckpt", dtype="float32")
    out = tmp_path / "tp.json"
    rc = main(["bench", "tensor-parallel", "--checkpoint", str(path), "--rounds", "1", "--requests", str(REQUESTS),
               "--output-len", str(OUTPUT_LEN), "--dtype", "float32", "--json", str(out)])  # fmt: skip
    assert rc == 0
    text = capsys.readouterr().out
    report = json.loads(text.strip().splitlines()[-1])
    assert report == json.loads(out.read_text())
    assert set(report) == {"bench", "checkpoint", "dtype", "cpu", "threads", "threads_per_rank", "rounds", "workload",
                           "configurations", "medians", "per_round", "memory", "note", "warnings"}  # fmt: skip
    names = ("tp1", "tp2-weights", "tp2-data")
    assert tuple(report["medians"]) == names and tuple(report["per_round"]) == names
    assert set(report["medians"]["tp1"]) == {*tensor_parallel.KEYS, "collective_share", "tok_s_vs_tp1", "step_vs_tp1"}

    text_config = json.loads((path / "config.json").read_text())["text_config"]
    layers, hidden, vocab = text_config["num_hidden_layers"], text_config["hidden_size"], text_config["vocab_size"]
    # per decode step, every request one token: (2L + 1) all-reduces of [REQUESTS, hidden] float32 and the
    # gather of this rank's [REQUESTS, vocab / 2] logits
    step_bytes = 4 * REQUESTS * ((2 * layers + 1) * hidden + math.ceil(vocab / 2))
    for name in names:
        (r,) = report["per_round"][name]
        assert r["output_tokens"] == REQUESTS * OUTPUT_LEN
        assert r["decode_steps"] == OUTPUT_LEN - 1  # the first token comes from the prefill step
        split = name != "tp1"
        assert r["collectives_per_step"] == (2 * layers + 2 if split else 0), name
        assert r["collective_bytes_per_step"] == (step_bytes if split else 0), name
        assert (r["collective_ms_per_step"] > 0) == split and (r["prefill_collectives"] > 0) == split
    assert len({r["prompt_tokens"] for rs in report["per_round"].values() for r in rs}) == 1

    rows = _rows(text, names)
    assert set(rows) == set(names)
    one = rows["tp1"]
    for name, (tok_s, tok_vs, step_ms, step_vs, _enc, calls, coll_ms, kib, share) in rows.items():
        assert _agrees(tok_vs, tok_s, one[0], 2) and _agrees(step_vs, step_ms, one[2], 2), name
        assert name == "tp1" or _agrees(share / 100, coll_ms, step_ms, 2, 3), name  # share printed in % to 1 decimal
        assert calls == (0 if name == "tp1" else 2 * layers + 2), name
        assert kib == pytest.approx((0 if name == "tp1" else step_bytes) / 1024, abs=0.05), name

    mem = _rows(text, ("tp1 r0", "tp2 r0", "tp2 r1"))
    assert set(mem) == {"tp1 r0", "tp2 r0", "tp2 r1"}
    for name, (rss, trimmed, weights, rss_over, trimmed_over, share) in mem.items():
        assert _agrees(rss_over, rss, weights, 1) and _agrees(trimmed_over, trimmed, weights, 1), name
        assert _agrees(share, weights, mem["tp1 r0"][2], 1, 3), name
    assert 0.5 < report["memory"]["tp2"][0]["weights_share"] < 1  # half, plus what is replicated
    assert report["memory"]["tp2"][0]["weight_bytes"] == report["memory"]["tp2"][1]["weight_bytes"]

    assert any(line.startswith("NOTE: ") and "cannot be faster than tp=1" in line for line in text.splitlines())
    warned = [line for line in text.splitlines() if line.startswith("WARNING: ")]
    assert "WARNING: only 1 round(s) per configuration: medians need >= 3 (--rounds)" in warned
    assert any("too little for RSS to measure" in line for line in warned)  # 2 MiB of weights
    assert any("decode steps, too few" in line for line in warned)
