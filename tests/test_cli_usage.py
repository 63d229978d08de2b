"""The `glimpse` command line as a newcomer meets it: prompt words, checks before loading, help, errors, chat.

Usage errors and --help run the real CLI in a subprocess (no torch may load); chat runs in a real
pseudo-terminal (`pty`), with keystrokes for line editing, Ctrl-C and Ctrl-D.
"""

from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from types import SimpleNamespace

import pytest

from glimpse import cli, entrypoints
from glimpse.testing import make_checkpoint

REPO = Path(__file__).resolve().parents[1]
MEDIA = REPO / "tests" / "data" / "media"
IMAGE = "tests/data/media/images/rocket.jpg"  # relative to REPO: short lines in the terminal
VIDEO = "tests/data/media/videos/slideshow_30fps.mp4"


def run_cli(*args: str, cwd: Path = REPO, importtime: bool = False) -> tuple[subprocess.CompletedProcess, float]:
    cmd = [sys.executable, *(["-X", "importtime"] if importtime else []), "-m", "glimpse.cli", *args]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    return done, time.perf_counter() - t0


def error_line(stderr: str) -> str:
    """The one `glimpse: error:` line, and no traceback."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("glimpse: error:")]
    assert len(lines) == 1, stderr
    return lines[0]


@pytest.fixture
def no_model(monkeypatch):
    """Fails the test if a model would load: every check must come first."""

    def refuse(model, args):
        raise AssertionError(f"a model was loaded ({model}) before the arguments were checked")

    monkeypatch.setattr(entrypoints, "make_llm", refuse)


class FakeLLM:
    """Stands in for LLM: records what it is asked and answers with fixed text (no model)."""

    def __init__(self, model, reply: str = "abcdefghij", interrupt_after: int | None = None) -> None:
        self.model, self.reply, self.interrupt_after = model, reply, interrupt_after
        self.calls: list[list[dict]] = []
        self.closed = 0

    def get_default_sampling_params(self):
        from glimpse.engine.sampling_params import SamplingParams

        return SamplingParams()

    def chat(self, messages, params, **kwargs):
        self.calls.append(json.loads(json.dumps(messages)))
        comp = SimpleNamespace(text=self.reply, token_ids=[1, 2], finish_reason="length")
        return [SimpleNamespace(outputs=[comp], prompt_token_ids=[1], media_tokens=[], metrics={})]

    def stream_chat(self, messages, params, **kwargs):
        self.calls.append(json.loads(json.dumps(messages)))
        try:
            for i, ch in enumerate(self.reply):
                if i == self.interrupt_after:  # the user presses Ctrl-C while the reply streams
                    os.kill(os.getpid(), signal.SIGINT)
                yield SimpleNamespace(outputs=[SimpleNamespace(delta_text=ch)])
        finally:
            self.closed += 1


@pytest.fixture
def fake_llm(monkeypatch):
    made: list[FakeLLM] = []
    options: dict = {}

    def make(model, args):
        made.append(FakeLLM(model, **options))
        return made[-1]

    monkeypatch.setattr(entrypoints, "make_llm", make)
    return SimpleNamespace(made=made, options=options)


# ---- 1. prompt words ----------------------------------------------------------------------------------------------


def test_an_existing_folder_first_is_the_model_and_the_rest_the_prompt(tmp_path, fake_llm, capsys):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    assert cli.main(["generate", str(ckpt), "Describe", "this", "picture"]) == 0
    llm = fake_llm.made[0]
    assert llm.model == str(ckpt)
    assert llm.calls == [[{"role": "user", "content": [{"type": "text", "text": "Describe this picture"}]}]]


def test_words_without_a_model_are_all_the_prompt(fake_llm, capsys):
    assert cli.main(["generate", "Describe", "this", "picture"]) == 0
    assert fake_llm.made[0].model is None  # the demo checkpoint
    assert fake_llm.made[0].calls[0][0]["content"] == [{"type": "text", "text": "Describe this picture"}]
    assert cli.main(["generate", "What is 1/2 of 6?"]) == 0  # a quoted prompt with a slash is text
    assert fake_llm.made[1].model is None


def test_a_missing_hub_name_says_how_to_download_it(tmp_path, monkeypatch, no_model, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["generate", "THUDM/GLM-4.1V-9B-Thinking", "hi"]) == 1
    line = error_line(capsys.readouterr().err)
    assert "THUDM/GLM-4.1V-9B-Thinking does not exist" in line
    assert ("download it first (huggingface-cli download THUDM/GLM-4.1V-9B-Thinking --local-dir DIR) and pass the "
            "folder") in line  # fmt: skip
    for word in ("./models/ckpt", "/nonexistent/ckpt", "~/no-such-ckpt-here"):
        assert cli.main(["generate", word, "hi"]) == 1
        line = error_line(capsys.readouterr().err)
        assert f"{word} does not exist" in line and "huggingface-cli" not in line


def test_a_model_folder_needs_a_prompt_and_a_config(tmp_path, no_model, capsys):
    (tmp_path / "photos").mkdir()
    assert cli.main(["generate", str(tmp_path / "photos"), "hi"]) == 1
    assert "has no config.json" in error_line(capsys.readouterr().err)
    assert cli.main(["chat", str(tmp_path / "photos")]) == 1
    assert "has no config.json" in error_line(capsys.readouterr().err)
    (tmp_path / "photos" / "config.json").write_text("{}")
    assert cli.main(["generate", str(tmp_path / "photos")]) == 2
    assert "no prompt after the model folder" in error_line(capsys.readouterr().err)


# ---- 2. checks before loading, and loading errors as one line -----------------------------------------------------


@pytest.mark.parametrize("flag, path, message", [
    ("--image", "tests/data/media/images/nope.jpg", "--image tests/data/media/images/nope.jpg: no such file"),
    ("--video", "nope.mp4", "--video nope.mp4: no such file"),
    ("--image", VIDEO, "use --video"),
    ("--video", IMAGE, "use --image"),
    ("--image", "tests/data/media", "is a folder"),
])  # fmt: skip
def test_media_paths_are_checked_before_loading(flag, path, message, monkeypatch, no_model, capsys):
    monkeypatch.chdir(REPO)
    assert cli.main(["generate", "Describe", "this", flag, path]) == 1
    line = error_line(capsys.readouterr().err)
    assert message in line and path in line


@pytest.mark.parametrize("flag, value", [("--temperature", "-1"), ("--top-p", "0"), ("--top-p", "1.5"),
                                         ("--max-tokens", "0"), ("--kv-cache-memory", "lots"),
                                         ("--device", "tpu"), ("--device", "cuda:x")])  # fmt: skip
def test_bad_flag_values_are_usage_errors(flag, value, no_model, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["generate", "hi", flag, value])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: glimpse generate")
    assert error_line(err).startswith(f"glimpse: error: argument {flag}:")


@pytest.fixture(scope="module")
def corrupt_checkpoint(tmp_path_factory) -> Path:
    path = make_checkpoint("glm4v", "tiny", tmp_path_factory.mktemp("corrupt") / "ck")
    (path / "model.safetensors").write_bytes(b"this is not a safetensors file" * 10)
    return path


def test_a_gpu_this_machine_lacks_is_refused_before_the_weights_are_read(corrupt_checkpoint):
    import torch

    if torch.cuda.device_count() > 1:
        pytest.skip("this machine has the GPUs the test asks for")
    wanted = "cuda" if not torch.cuda.is_available() else "cuda:1"
    done, _ = run_cli("generate", str(corrupt_checkpoint), "Describe", "--device", wanted, "--max-tokens", "2")
    assert done.returncode == 1
    assert error_line(done.stderr) == (f"glimpse: error: device '{wanted}': this machine has "
                                       f"{torch.cuda.device_count()} CUDA GPU(s) that torch can use (--device cpu "
                                       "runs on the CPU)")  # fmt: skip


def test_media_errors_come_before_the_weights_are_read(corrupt_checkpoint):
    done, _ = run_cli("generate", str(corrupt_checkpoint), "Describe", "--image", "missing.png", "--max-tokens", "2")
    assert done.returncode == 1
    assert error_line(done.stderr) == "glimpse: error: --image missing.png: no such file"


def test_corrupt_weights_and_unknown_families_are_one_line(corrupt_checkpoint, tmp_path, capsys):
    assert cli.main(["generate", str(corrupt_checkpoint), "hi", "--max-tokens", "2"]) == 1
    line = error_line(capsys.readouterr().err)
    assert "model.safetensors" in line and "corrupt" in line
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert cli.main(["chat", str(llama)]) == 1
    assert "model_type 'llama' is not supported" in error_line(capsys.readouterr().err)


def test_generate_runs_a_real_checkpoint_end_to_end(tiny_checkpoint, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    ckpt = tiny_checkpoint("glm4v")
    assert cli.main(["generate", str(ckpt), "Describe", "this", "picture", "--image", IMAGE,
                     "--max-tokens", "3", "--ignore-eos"]) == 0  # fmt: skip
    summary = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert summary["completion_tokens"] == 3 and summary["finish_reason"] == "length"
    assert [m["type"] for m in summary["media"]] == ["image"]


# ---- 3. version, help, lazy imports, subcommand usage ------------------------------------------------------------


def _imported(importtime_stderr: str) -> set[str]:
    """Top-level package names from `python -X importtime` lines ('import time: self | cumulative | name')."""
    names = set()
    for line in importtime_stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            names.add(line.rsplit("|", 1)[1].strip().split(".")[0])
    return names


@pytest.fixture(scope="module")
def torch_import_seconds() -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch, transformers"], check=True, timeout=300)
    return time.perf_counter() - t0


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["generate", "--help"], ["chat", "--help"],
                                  ["bench", "--help"], ["generate", "hi", "--top-p", "0"], ["serve", "--bogus"],
                                  ["generate", "hi", "--device", "npu"]])  # fmt: skip
def test_help_version_and_usage_errors_do_not_import_torch(args, torch_import_seconds):
    done, seconds = run_cli(*args, importtime=True)
    assert done.returncode in (0, 2)
    imported = _imported(done.stderr)
    assert "glimpse" in imported  # the importtime lines were read
    assert not imported & {"torch", "transformers", "numpy"}, sorted(imported)
    assert seconds < torch_import_seconds / 3, (seconds, torch_import_seconds)


def test_version_is_the_package_version():
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    done, _ = run_cli("--version")
    assert done.returncode == 0 and done.stdout.strip() == f"glimpse {version}"


def test_an_unknown_flag_shows_the_subcommands_usage(capsys):
    for command in ("serve", "generate", "chat", "make-checkpoint"):
        with pytest.raises(SystemExit) as exc:
            cli.main([command, "--bogus"])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith(f"usage: glimpse {command}"), err
        assert "unrecognized arguments: --bogus" in error_line(err) or "required" in error_line(err)


@pytest.mark.parametrize("command", ["generate", "chat"])
def test_every_flag_shows_its_default(command, capsys):
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    text = capsys.readouterr().out
    options = text.split("\noptions:\n", 1)[1]
    entries = re.split(r"\n(?=  -)", options.split("\n\n", 1)[0])  # one entry per flag, continuation lines joined
    flags = [e.split()[0] for e in entries]
    assert {"--max-tokens", "--temperature", "--top-p", "--dtype", "--kv-cache-memory", "--thinking"} <= set(flags)
    for entry in entries:
        if not entry.strip().startswith("-h"):
            assert "default:" in " ".join(entry.split()), entry


def test_bench_names_load_their_module_only_when_run():
    assert set(cli.BENCHES) == {"rope-index", "preprocess", "throughput", "serve", "compare", "offline-compare",
                                "mm-encoder", "kernels", "startup", "structured", "tensor-parallel"}  # fmt: skip
    args = cli.build_parser().parse_args(["bench", "rope-index", "--repeats", "2"])
    assert args.repeats == 2 and args.func.__module__ == "glimpse.bench.rope_index"


def test_the_clis_checkpoint_choices_are_the_factorys():
    from glimpse.testing import checkpoints

    assert cli.FAMILIES == checkpoints.FAMILIES and cli.SIZES == checkpoints.SIZES


# ---- 4. make-checkpoint refuses to write into a non-empty folder -------------------------------------------------


def test_make_checkpoint_refuses_a_non_empty_folder_without_force(tmp_path, capsys):
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    assert cli.main(["make-checkpoint", "glm4v", str(target)]) == 1
    line = error_line(capsys.readouterr().err)
    assert str(target) in line and "--force" in line
    assert sorted(p.name for p in target.iterdir()) == ["notes.txt"]
    assert cli.main(["make-checkpoint", "glm4v", str(target), "--force"]) == 0
    assert (target / "config.json").is_file() and (target / "notes.txt").read_text() == "keep me"
    assert cli.main(["make-checkpoint", "glm4v", str(tmp_path / "new")]) == 0  # a new folder needs no --force


# ---- 5. chat -------------------------------------------------------------------------------------------------------


def test_chat_commands_and_a_stopped_reply_keep_the_conversation(fake_llm, monkeypatch, capsys):
    """Ctrl-C mid-reply (SIGINT from inside the stream) stops it; what was shown stays in the history."""
    import io

    monkeypatch.chdir(REPO)
    fake_llm.options.update(reply="abcdefghijklmnopqrstuvwxyz", interrupt_after=3)
    script = ["/image", "/video", "/image nope.png", f"/image {IMAGE}", "first", "second", "/clear", "third", "/bye",
              "never sent"]  # fmt: skip
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(script) + "\n"))
    assert cli.main(["chat"]) == 0
    out, err = capsys.readouterr()
    assert "/image needs a path" in err and "/video needs a path" in err
    assert "/image nope.png: no such file" in err and f"attached {IMAGE} to the next message" in err
    llm = fake_llm.made[0]
    assert llm.closed == 3  # every stream closed, so the stopped requests were aborted
    shown = out.splitlines()[0]
    assert shown and "abcdefghijklmnopqrstuvwxyz".startswith(shown) and len(shown) < 26
    first, second, third = llm.calls
    assert first == [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": str(Path(IMAGE))}},
                                                  {"type": "text", "text": "first"}]}]  # fmt: skip
    assert second == [*first, {"role": "assistant", "content": shown},
                      {"role": "user", "content": [{"type": "text", "text": "second"}]}]  # fmt: skip
    assert third == [{"role": "user", "content": [{"type": "text", "text": "third"}]}]


class Terminal:
    """A child process on a pseudo-terminal (its controlling tty, so Ctrl-C is a SIGINT from the line discipline)."""

    def __init__(self, args: list[str]) -> None:
        env = {**os.environ, "TERM": "xterm", "PYTHONPATH": str(REPO), "COLUMNS": "200"}
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: become the CLI
            try:
                # As a shell starts a program: Ctrl-C's signal at its default and unblocked, whatever the test run
                # inherited (a runner started in the background without job control ignores SIGINT, and the chat
                # puts back the handler it found after each reply: Ctrl-C at the prompt then did nothing).
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                signal.pthread_sigmask(signal.SIG_SETMASK, [])
                os.chdir(REPO)
                os.execve(sys.executable, [sys.executable, "-m", "glimpse.cli", *args], env)
            finally:
                os._exit(127)
        self.seen = b""
        self.status: int | None = None

    def read(self, timeout: float) -> None:
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if ready:
            try:
                self.seen += os.read(self.fd, 65536)
            except OSError:  # the child closed the terminal
                time.sleep(0.05)

    def expect(self, text: str, timeout: float = 240) -> str:
        """Everything up to and including `text` (consumed); fails with the transcript after `timeout` (generous:
        the first prompt waits for the model to load, and on a fresh or loaded machine for the kernel build)."""
        end = time.monotonic() + timeout
        while text.encode() not in self.seen:
            assert time.monotonic() < end and self.alive(), f"no {text!r} in {self.seen!r}"
            self.read(0.2)
        before, _, self.seen = self.seen.partition(text.encode())
        return before.decode(errors="replace") + text

    def send(self, keys: str) -> None:
        os.write(self.fd, keys.encode())

    def alive(self) -> bool:
        if self.status is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.status = status
        return self.status is None

    def state(self) -> str:
        """The child's scheduler state and signal masks (Linux /proc), for a failure message."""
        try:
            with open(f"/proc/{self.pid}/status") as f:
                lines = [line.strip() for line in f if line.startswith(("State", "SigPnd", "ShdPnd", "SigBlk", "SigIgn", "SigCgt"))]
            with open(f"/proc/{self.pid}/wchan") as f:
                lines.append(f"wchan: {f.read().strip()}")
        except OSError as exc:
            return f"no /proc state ({exc})"
        return ", ".join(lines)

    def wait(self, timeout: float = 240) -> tuple[int, str]:
        """(exit code, the rest of the output)."""
        end = time.monotonic() + timeout
        while self.alive():
            assert time.monotonic() < end, f"still running: {self.seen!r}; {self.state()}"
            self.read(0.1)
        self.read(0.1)
        return os.waitstatus_to_exitcode(self.status), self.seen.decode(errors="replace")

    def close(self) -> None:
        if self.alive():
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        os.close(self.fd)


@pytest.fixture
def terminal():
    made: list[Terminal] = []
    yield lambda *args: made.append(Terminal(list(args))) or made[-1]
    for t in made:
        t.close()


def test_chat_in_a_terminal_commands_editing_and_ctrl_d(tiny_checkpoint, terminal):
    t = terminal("chat", "--max-tokens", "4", str(tiny_checkpoint("glm4v")))
    t.expect("/help lists the commands")
    t.expect("> ")
    t.send("/hlp\x1b[D\x1b[De\r")  # "/hlp", two steps left, "e": readline makes it "/help"
    listed = t.expect("/exit, /quit, Ctrl-D)")
    assert "(also /?)" in listed and "/bye" in listed and "/clear" in listed
    t.expect("> ")
    t.send("/image\r")
    t.expect("/image needs a path")
    t.send("/image nope.png\r")
    t.expect("/image nope.png: no such file")
    t.send(f"/image {IMAGE}\r")
    t.expect(f"attached {IMAGE} to the next message")
    t.send("Describe it\r")
    t.expect("\n> ")  # a reply of at most 4 tokens, then the prompt again
    t.send("\x1b[A\x1b[A\x1b[A\r")  # history: three lines up is "/image nope.png"
    t.expect("/image nope.png: no such file")
    t.send("/clear\r")
    t.expect("cleared the conversation")
    t.expect("> ")
    t.send("\x04")  # Ctrl-D at the prompt
    code, rest = t.wait()
    assert code == 0 and "Traceback" not in rest


def test_chat_in_a_terminal_ctrl_c_stops_the_reply_then_quits_at_the_prompt(tiny_checkpoint, terminal):
    t = terminal("chat", "--max-tokens", "30000", "--ignore-eos", str(tiny_checkpoint("glm4v")))
    t.expect("> ")
    for message in ("Tell me a long story", "Another one"):
        t.send(message + "\r")
        t.expect(message)  # the echo; then the reply streams
        t.read(5)
        while not t.seen.strip():
            t.read(1)
        t.send("\x03")  # Ctrl-C mid-reply
        t.expect("[stopped]", timeout=30)
        t.expect("> ")
    # CPython's readline loses a SIGINT that lands while it draws the prompt, before it waits for keys; a person
    # never presses that fast, so give it a moment.
    time.sleep(0.5)
    t.send("\x03")  # Ctrl-C at the prompt
    code, rest = t.wait()
    assert code == 0 and "Traceback" not in rest
