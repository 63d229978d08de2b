"""`glimpse generate` / `glimpse chat` flags against independent references, and a first run that says what it does.

Sampling flags left unset take the checkpoint's generation_config.json (edited here); --system, --max-pixels
and --fps are checked against HF's chat template and processors on the same checkpoint; --stop against the
unstopped text. Start-up messages (native build, weight loading, graph compilation) and the benches' log noise
are checked on stderr.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import transformers
from hf_oracle import hf_inputs, hf_processor, read_all_frames, rgb

from glimpse import cli, entrypoints, kernels, loader
from glimpse.engine.sampling_params import SamplingParams

REPO = Path(__file__).resolve().parents[1]
IMAGE = REPO / "tests" / "data" / "media" / "images" / "rocket.jpg"
VIDEO = REPO / "tests" / "data" / "media" / "videos" / "coffee_15frames_10fps.webm"  # 15 frames: cheap to decode


def generate(capsys, *args: str) -> tuple[str, dict]:
    """Run `glimpse generate` in this process: (the reply text, the JSON summary line on stderr)."""
    assert cli.main(["generate", *args, "--kv-cache-memory", "64MiB"]) == 0
    out, err = capsys.readouterr()
    return out.removesuffix("\n"), json.loads(err.strip().splitlines()[-1])


@pytest.fixture
def own_checkpoint(tiny_checkpoint, tmp_path):
    """A copy of the tiny GLM-4.6V checkpoint whose generation_config.json a test may rewrite."""
    path = Path(shutil.copytree(tiny_checkpoint("glm46v"), tmp_path / "ck"))

    def set_generation_config(**settings) -> Path:
        file = path / "generation_config.json"
        base = {k: v for k, v in json.loads(file.read_text()).items() if k in ("eos_token_id", "pad_token_id")}
        file.write_text(json.dumps(base | settings))
        return path

    return set_generation_config


@pytest.fixture
def no_model(monkeypatch):
    def refuse(model, args):
        raise AssertionError("a model was loaded before the flags were checked")

    monkeypatch.setattr(entrypoints, "make_llm", refuse)


# ---- 1. sampling: generation_config.json, then the flags ------------------------------------------------------------


def test_unset_sampling_flags_take_the_generation_config_and_given_flags_override_it(own_checkpoint, capsys):
    """With temperature 0 in generation_config.json the reply is greedy, whatever the seed; with temperature 1
    over the whole vocabulary (random weights) two seeds give two replies, until --temperature 0 is given."""
    reply = lambda ck, seed, *more: generate(capsys, str(ck), "Describe", "a", "rocket", "--max-tokens", "12",  # noqa: E731
                                             "--ignore-eos", "--sampling-seed", str(seed), *more)[0]  # fmt: skip
    ck = own_checkpoint(temperature=0.0)
    assert reply(ck, 1) == reply(ck, 2)
    ck = own_checkpoint(temperature=1.0, top_p=1.0, top_k=0)
    assert reply(ck, 1) != reply(ck, 2)
    assert reply(ck, 1, "--temperature", "0") == reply(ck, 2, "--temperature", "0")


def test_repetition_penalty_from_the_config_or_the_flag_as_the_offline_api_applies_it(own_checkpoint, capsys):
    from glimpse import LLM

    words = ["Describe", "a", "rocket", "--max-tokens", "12", "--ignore-eos"]
    ck = own_checkpoint(temperature=0.0, repetition_penalty=1000.0)
    from_config = generate(capsys, str(ck), *words)[0]
    plain = generate(capsys, str(ck), *words, "--repetition-penalty", "1")[0]
    assert from_config != plain  # the penalty changes this model's greedy reply
    llm = LLM(ck, kv_cache_memory="64MiB")
    messages = [{"role": "user", "content": [{"type": "text", "text": "Describe a rocket"}]}]
    params = SamplingParams(temperature=0.0, repetition_penalty=1000.0, max_tokens=12, ignore_eos=True)
    assert llm.chat(messages, params, use_tqdm=False)[0].outputs[0].text == from_config
    ck = own_checkpoint(temperature=0.0)
    assert generate(capsys, str(ck), *words, "--repetition-penalty", "1000")[0] == from_config


def test_stop_ends_the_reply_before_the_first_stop_string(own_checkpoint, capsys):
    ck = own_checkpoint(temperature=0.0)
    words = [str(ck), "Describe", "a", "rocket", "--max-tokens", "24", "--ignore-eos"]
    full, summary = generate(capsys, *words)
    assert summary["finish_reason"] == "length"
    at = next(i for i in range(3, len(full) - 1) if full[i : i + 2].isascii() and full[i : i + 2].isalnum())
    stop = full[at : at + 2]
    text, summary = generate(capsys, *words, "--stop", "never-said", "--stop", stop)
    assert text == full[: full.index(stop)]
    assert summary["finish_reason"] == "stop"


# ---- 2. the prompt: --system, --max-pixels, --fps -------------------------------------------------------------------


def test_system_adds_the_chat_templates_system_message(tiny_checkpoint, capsys):
    ck = tiny_checkpoint("glm46v")
    tokenizer = transformers.AutoTokenizer.from_pretrained(ck)
    system = "You are a terse assistant."
    user = {"role": "user", "content": "Describe a rocket"}
    for flags, messages in (([], [user]), (["--system", system], [{"role": "system", "content": system}, user])):
        expected = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        expected = expected["input_ids"] if isinstance(expected, dict | transformers.BatchEncoding) else expected
        _, summary = generate(capsys, str(ck), "Describe", "a", "rocket", "--max-tokens", "1", *flags)
        assert summary["prompt_tokens"] == len(expected)


def test_max_pixels_resizes_images_as_hfs_processor_does(tiny_checkpoint, capsys):
    ck = tiny_checkpoint("glm46v")
    size = json.loads((ck / "preprocessor_config.json").read_text())["size"]
    hf = hf_inputs(hf_processor(ck), [{"type": "image"}, {"type": "text", "text": "hi"}], images=[rgb(IMAGE)],
                   size={"shortest_edge": size["shortest_edge"], "longest_edge": 20000})  # fmt: skip
    _, default = generate(capsys, str(ck), "hi", "--image", str(IMAGE), "--max-tokens", "1")
    _, small = generate(capsys, str(ck), "hi", "--image", str(IMAGE), "--max-tokens", "1", "--max-pixels", "20000")
    assert small["media"][0]["grid_thw"] == hf["image_grid_thw"][0].tolist() != default["media"][0]["grid_thw"]
    assert small["prompt_tokens"] == hf["input_ids"].shape[1]


def test_fps_samples_videos_as_hfs_processor_does(tiny_checkpoint, capsys):
    ck = tiny_checkpoint("glm4v")  # GLM-4.1V samples by fps
    hf = hf_inputs(hf_processor(ck), [{"type": "video"}, {"type": "text", "text": "hi"}],
                   videos=[read_all_frames(VIDEO)], fps=1)  # fmt: skip
    _, default = generate(capsys, str(ck), "hi", "--video", str(VIDEO), "--max-tokens", "1")
    _, slow = generate(capsys, str(ck), "hi", "--video", str(VIDEO), "--max-tokens", "1", "--fps", "1")
    assert slow["media"][0]["grid_thw"] == hf["video_grid_thw"][0].tolist() != default["media"][0]["grid_thw"]
    assert slow["prompt_tokens"] == hf["input_ids"].shape[1]


@pytest.mark.parametrize("flags, message", [
    (["--image", str(IMAGE), "--max-pixels", "1000000000"], "--max-pixels 1000000000 is above this checkpoint's "
                                                            "image limit of 100352 pixels"),
    (["--fps", "2"], "--fps: 'fps' cannot be set per request for Glm46VVideoProcessor"),  # HF would ignore it
    (["--video", str(VIDEO), "--fps", "31"], "--fps 31.0 is above the limit of 30.0"),
])  # fmt: skip
def test_processor_flags_the_checkpoint_refuses_are_usage_errors_before_loading(tiny_checkpoint, no_model, capsys,
                                                                                 flags, message):  # fmt: skip
    assert cli.main(["generate", str(tiny_checkpoint("glm46v")), "hi", *flags]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith(f"glimpse: error: {message}"), err


@pytest.mark.parametrize("flag, value", [("--repetition-penalty", "0"), ("--fps", "-1"), ("--max-pixels", "0")])
def test_bad_values_of_the_new_flags_are_argparse_errors(flag, value, no_model, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["generate", "hi", flag, value])
    assert exc.value.code == 2
    assert f"glimpse: error: argument {flag}:" in capsys.readouterr().err


def test_chat_keeps_the_system_message_and_passes_the_flags(tiny_checkpoint, monkeypatch, capsys):
    """Each turn sees the system message first (also after /clear), the processor settings and the stop strings."""
    calls = []

    class Recorder:
        def get_default_sampling_params(self) -> SamplingParams:
            return SamplingParams(temperature=0.7)  # as if from generation_config.json

        def stream_chat(self, messages, params, **kwargs):
            calls.append((json.loads(json.dumps(messages)), params, kwargs))
            yield SimpleNamespace(outputs=[SimpleNamespace(delta_text="ok")])

    monkeypatch.setattr(entrypoints, "make_llm", lambda model, args: Recorder())
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n/clear\nagain\n"))
    assert cli.main(["chat", str(tiny_checkpoint("glm46v")), "--system", "Be brief.", "--max-pixels", "20000",
                     "--stop", "END", "--top-k", "5"]) == 0  # fmt: skip
    system = {"role": "system", "content": "Be brief."}
    user = lambda text: {"role": "user", "content": [{"type": "text", "text": text}]}  # noqa: E731
    assert [c[0] for c in calls] == [[system, user("hello")], [system, user("again")]]
    for _, params, kwargs in calls:
        assert kwargs["mm_processor_kwargs"] == {"max_pixels": 20000}
        assert (params.temperature, params.top_k, params.stop, params.max_tokens) == (0.7, 5, ("END",), 128)


# ---- 3. a first run that says what it does --------------------------------------------------------------------------


def test_build_pending_reads_torchs_build_folder(tmp_path, monkeypatch):
    import torch

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert kernels.build_pending()  # nothing built yet
    folder = tmp_path / "glimpse_cpu_kernels"
    built = folder / "glimpse_cpu_kernels.so"
    built.write_bytes(b"")
    source = Path(kernels.__file__).parent / "csrc" / "cpu_kernels.cpp"
    torch_dir = Path(torch.__file__).parent
    # what torch's loader writes there, cut to the lines that name the install and the source
    (folder / "build.ninja").write_text(f"cflags = -isystem {torch_dir}/include -O3\n"
                                        f"build cpu_kernels.o: compile {source}\n")  # fmt: skip
    os.utime(built, (source.stat().st_mtime - 60,) * 2)
    assert kernels.build_pending()  # built from an older source
    os.utime(built, (source.stat().st_mtime + 60,) * 2)
    assert not kernels.build_pending()
    (folder / "build.ninja").write_text(f"cflags = -isystem {torch_dir}/include -O3\n"
                                        "build cpu_kernels.o: compile /another/checkout/glimpse/csrc/cpu_kernels.cpp\n")  # fmt: skip
    assert kernels.build_pending()  # the shared folder was last built for another checkout: ninja rebuilds


@pytest.mark.parametrize("pending", [True, False])
def test_the_native_build_is_announced_only_when_it_will_happen(pending, monkeypatch, capsys):
    import torch.utils.cpp_extension

    monkeypatch.setattr(kernels, "native_kernels_requested", lambda: True)
    monkeypatch.setattr(kernels, "_cpu_flags", lambda: kernels.REQUIRED_CPU_FLAGS)
    monkeypatch.setattr(kernels, "build_pending", lambda: pending)
    monkeypatch.setattr(torch.utils.cpp_extension, "load", lambda **kwargs: "the module")
    assert kernels.cpu_kernels.__wrapped__() == "the module"  # undecorated: the process's cached module stays
    assert (kernels.BUILD_MESSAGE in capsys.readouterr().err) is pending


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_weights_and_graph_capture_show_progress_on_a_terminal(tiny_checkpoint, monkeypatch):
    from glimpse import load_model
    from glimpse.vision import EncoderRunner

    ck = tiny_checkpoint("glm46v")
    monkeypatch.setattr(sys, "stderr", Terminal())
    model = load_model(ck)
    assert "loading weights" not in sys.stderr.getvalue()  # a tiny checkpoint loads at once: no bar
    monkeypatch.setattr(loader, "PROGRESS_BYTES", 0)
    load_model(ck)
    size = sum(f.stat().st_size for f in ck.glob("*.safetensors"))
    bar = sys.stderr.getvalue().split("\r")[-1]
    assert bar.startswith("glimpse: loading weights: 100%"), bar
    assert f"{size / 1024:.0f}k/{size / 1024:.0f}k" in bar or f"{size / 2**20:.2f}M/{size / 2**20:.2f}M" in bar, bar
    EncoderRunner(model, (64, 128), 128)
    assert "glimpse: compiling the vision encoder graphs for 2 sizes: 100%" in sys.stderr.getvalue()


def test_graph_capture_off_a_terminal_is_one_line_and_only_when_long(monkeypatch):
    from glimpse.vision import runner

    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)
    assert list(runner._compile_progress([256, 128, 64])) == [256, 128, 64]
    assert log.getvalue() == ""  # tests and small captures stay quiet
    budgets = [2**i for i in range(runner.ANNOUNCE_GRAPHS)]
    assert list(runner._compile_progress(budgets)) == budgets
    assert log.getvalue() == f"glimpse: compiling the vision encoder graphs for {len(budgets)} sizes...\n"


# ---- 4. quiet benches ---------------------------------------------------------------------------------------------


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "KINETO_LOG_LEVEL"} | {"PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def test_rope_index_bench_prints_no_transformers_warnings():
    done = _run("-m", "glimpse.cli", "bench", "rope-index", "--lengths", "1024", "--repeats", "1")
    assert done.returncode == 0, done.stderr
    assert "must be `None` or an integer within the vocabulary" not in done.stderr, done.stderr
    assert "[transformers]" not in done.stderr, done.stderr
    assert done.stdout.count("True") == 2, done.stdout  # both families still equal HF's positions


def test_mm_encoder_benchs_profiler_prints_no_kineto_lines():
    """The bench's profiled call (its smallest full run takes ~25 s, so the profiled part runs alone)."""
    done = _run("-c", textwrap.dedent("""
        import torch
        from glimpse.bench.mm_encoder import _extern_share

        class Runner:
            def encode(self, items):
                return torch.ones(64, 64) @ torch.ones(64, 64)

        for _ in range(2):  # kineto logs at every start and stop
            assert 0 <= _extern_share(Runner(), []) <= 1
    """))
    assert done.returncode == 0, done.stderr
    for noise in ("USDT:", "profiler_start", "gpuGetDeviceCount", "STAGE:"):
        assert noise not in done.stderr, done.stderr
