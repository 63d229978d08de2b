"""`glimpse generate` and `glimpse chat`: the offline engine from the command line.

Words and flags -> (checkpoint folder, prompt, media paths, processor settings), every one checked
before a model loads -> `LLM.chat` / `LLM.stream_chat`. Sampling flags left unset take the checkpoint's
generation_config.json, as `LLM` and `glimpse serve` do. Nothing here imports torch at module level, so
`--help` and usage errors answer at once; the engine is imported only when a command runs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
from pathlib import Path

from glimpse.device_names import DEVICE_HELP, parse_device_name
from glimpse.errors import InvalidInputError
from glimpse.units import int_at_least

DEMO_BANNER = ("[glimpse] no model given: using the built-in demo checkpoint ({path}).\n"
               "[glimpse] It has RANDOM weights, so its text is gibberish; pass a checkpoint folder for real answers.")  # fmt: skip

# Container extensions, to catch a clip given to --image (or a picture to --video) before decoding anything.
VIDEO_SUFFIXES = frozenset({".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".wmv", ".flv",
                            ".3gp", ".ts", ".ogv"})  # fmt: skip
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm",
                            ".ico", ".heic", ".avif"})  # fmt: skip

CHAT_HELP = """commands:
  /image PATH    attach an image to the next message
  /video PATH    attach a video to the next message
  /clear         forget the conversation and pending attachments (also /reset)
  /help          this list (also /?)
  /bye           quit (also /exit, /quit, Ctrl-D)
Ctrl-C stops the reply being written (the conversation stays); at the prompt it quits."""


class UsageError(Exception):
    """A missing or malformed argument found after parsing: `glimpse: error: ...`, exit 2 like argparse's own."""


class DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Appends "(default: X)" to every flag's help unless the help already states its default in words;
    keeps the line breaks of the description and epilog (the chat command list)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if "default:" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


# ---- flag value types: argparse turns ArgumentTypeError into "argument --flag: message", exit 2 -----------------


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def _temperature(text: str) -> float:
    value = _float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 (0 means greedy), got {text}")
    return value


def _positive_float(text: str) -> float:
    value = _float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _top_p(text: str) -> float:
    value = _float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1] (1 disables it), got {text}")
    return value


def _size(knob: str):
    def parse(text: str) -> int:
        from glimpse.units import parse_bytes

        try:
            return parse_bytes(text, knob)
        except InvalidInputError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


def parse_budgets(text: str | None) -> tuple[int, ...] | None:
    """--encoder-budgets "64,256,1024" -> (64, 256, 1024); None keeps the defaults."""
    if not text:
        return None
    try:
        budgets = tuple(int(x) for x in text.split(","))
    except ValueError:
        budgets = ()
    if not budgets or min(budgets) < 1:
        raise InvalidInputError(f"--encoder-budgets must be comma-separated integers >= 1, got {text!r}")
    return budgets


def _budgets(text: str) -> tuple[int, ...] | None:
    try:
        return parse_budgets(text)
    except InvalidInputError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--encoder-budgets ")) from None


def device_name(text: str) -> str:
    """--device's syntax (glimpse/device_names.py); whether that GPU exists is checked as the engine starts."""
    name = parse_device_name(text)
    if name is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device; use {DEVICE_HELP}")
    return name


def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="weight and activation dtype (auto: the checkpoint's)")  # fmt: skip
    p.add_argument("--max-model-len", type=int_at_least(1), metavar="N", default=None,
                   help="longest prompt + reply in tokens (default: the checkpoint's limit)")
    p.add_argument("--max-num-seqs", type=int_at_least(1), metavar="N", default=32, help="sequences decoded at once")
    p.add_argument("--max-num-batched-tokens", type=int_at_least(1), default=2048, metavar="N",
                   help="tokens per engine step")  # fmt: skip
    p.add_argument("--kv-cache-memory", type=_size("--kv-cache-memory"), metavar="SIZE", default="1GiB",
                   help="memory for the KV cache (bytes or 512MiB, 2GiB, ...)")  # fmt: skip
    p.add_argument("--encoder-cache-memory", type=_size("--encoder-cache-memory"), metavar="SIZE", default="256MiB",
                   help="memory for cached vision-encoder outputs")  # fmt: skip
    p.add_argument("--no-prefix-caching", action="store_true", help="recompute shared prompt prefixes")
    p.add_argument("--seed", type=int, default=0, metavar="N",
                   help="seed of the engine (dummy weights, default sampling)")  # fmt: skip
    p.add_argument("--load-format", default="auto", choices=("auto", "safetensors", "dummy"),
                   help="dummy: seeded random weights instead of the folder's safetensors")  # fmt: skip
    p.add_argument("--device", type=device_name, default="auto", metavar="DEVICE", help=DEVICE_HELP)
    p.add_argument("--encoder-graph", choices=("on", "off"), default="off",
                   help="vision encoder in token budgets with one compiled graph each (faster encoder, ~1 min "
                        "of compilation at start with a cold inductor cache)")  # fmt: skip
    p.add_argument("--decode-graph", choices=("on", "off"), default="off",
                   help="decode steps through one compiled graph of the decoder (5-8%% shorter steps; bf16 on a CPU "
                        "with the native kernels; ~30 s of compilation at the first start, ~3 s once inductor's cache holds it; on "
                        "a GPU: graphs captured per batch and context bucket, not yet run on one)")  # fmt: skip
    p.add_argument("--encoder-budgets", type=_budgets, default=None, metavar="N,N,...",
                   help="comma-separated merged-token budgets (default: powers of two from 64 up to "
                        "--max-num-batched-tokens)")  # fmt: skip
    add_parallel_arguments(p)


def add_parallel_arguments(p) -> None:
    """--tensor-parallel-size, --enable-expert-parallel, --mm-encoder-tp-mode (every entry point; docs/scaling.md)."""
    p.add_argument("--tensor-parallel-size", "-tp", type=int_at_least(1), default=1, metavar="N",
                   help="split the model over N ranks (processes, torch.distributed); --kv-cache-memory is per rank")  # fmt: skip
    p.add_argument("--enable-expert-parallel", action="store_true",
                   help="MoE checkpoints: each rank holds whole experts instead of a share of every expert")  # fmt: skip
    p.add_argument("--mm-encoder-tp-mode", choices=("weights", "data"), default="weights",
                   help="with --tensor-parallel-size > 1, the vision encoder split by heads (weights) or whole on "
                        "every rank with the media items split between ranks (data)")  # fmt: skip


# Unset sampling flags: LLM.get_default_sampling_params, i.e. generation_config.json over vLLM's defaults.
_FROM_CHECKPOINT = "default: the checkpoint's generation_config.json, else {}"


def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int_at_least(1), default=128, metavar="N", help="most tokens in a reply")
    p.add_argument("--temperature", type=_temperature, default=None, metavar="T",
                   help=f"0 is greedy ({_FROM_CHECKPOINT.format('1.0')})")  # fmt: skip
    p.add_argument("--top-p", type=_top_p, default=None, metavar="P",
                   help=f"nucleus sampling mass, in (0, 1] ({_FROM_CHECKPOINT.format('1.0: off')})")  # fmt: skip
    p.add_argument("--top-k", type=int_at_least(-1), default=None, metavar="K",
                   help="sample among the k most likely tokens, 0 or -1: all "
                        f"({_FROM_CHECKPOINT.format('0: all')})")  # fmt: skip
    p.add_argument("--repetition-penalty", type=_positive_float, default=None, metavar="R",
                   help="> 1 makes tokens already in the prompt or reply less likely "
                        f"({_FROM_CHECKPOINT.format('1.0: off')})")  # fmt: skip
    p.add_argument("--stop", action="append", metavar="TEXT",
                   help="end the reply before this text (repeatable; default: none)")  # fmt: skip
    p.add_argument("--sampling-seed", type=int_at_least(0), default=None, metavar="N",
                   help="seed of each reply's sampling (default: none, a fresh draw)")  # fmt: skip
    p.add_argument("--ignore-eos", action="store_true", help="go on past end-of-sequence up to --max-tokens")
    p.add_argument("--thinking", choices=("on", "off"), default=None,
                   help="set chat_template_kwargs.enable_thinking (default: the template's own)")  # fmt: skip


def add_prompt_arguments(p: argparse.ArgumentParser) -> None:
    """The system message and the processor settings (mm_processor_kwargs, as a server request sends them)."""
    p.add_argument("--system", metavar="TEXT", default=None,
                   help="a system message before the conversation (default: none)")  # fmt: skip
    p.add_argument("--max-pixels", type=int_at_least(1), default=None, metavar="N",
                   help="most pixels of an image after resizing, and of a video (GLM: all frames together, Qwen: "
                        "each frame); mm_processor_kwargs.max_pixels (default: the checkpoint's, which this may "
                        "only lower)")  # fmt: skip
    p.add_argument("--fps", type=_positive_float, default=None, metavar="F",
                   help="video frames sampled per second (mm_processor_kwargs.fps; default: the checkpoint's)")


# ---- checks that run before any model loads --------------------------------------------------------------------


def _looks_like_path(word: str) -> bool:
    """A word meant as a folder: starts with /, . or ~, or holds a slash and no spaces (a quoted prompt
    such as "what is 1/2?" is text)."""
    return word.startswith(("/", ".", "~")) or ("/" in word and not any(c.isspace() for c in word))


def check_model(model: str) -> Path:
    """The checkpoint folder named on the command line, or InvalidInputError saying what it is instead."""
    path = Path(model).expanduser()
    if not path.exists():
        hint = ""
        parts = model.split("/")
        if len(parts) == 2 and all(parts) and not model.startswith((".", "~")):
            hint = (f"; to use the Hugging Face model {model}, download it first (huggingface-cli download {model} "
                    "--local-dir DIR) and pass the folder")  # fmt: skip
        raise InvalidInputError(f"model folder {model} does not exist{hint}")
    if not path.is_dir():
        raise InvalidInputError(f"{model} is a file, not a checkpoint folder; pass the folder holding config.json "
                                "(pictures and clips go to --image / --video)")  # fmt: skip
    if not (path / "config.json").is_file():
        raise InvalidInputError(f"{model} is not a checkpoint folder: it has no config.json (pass the folder an HF "
                                "checkpoint was downloaded to)")  # fmt: skip
    if not os.access(path / "config.json", os.R_OK):
        raise InvalidInputError(f"{model}/config.json cannot be read (permission denied)")
    return path


def split_words(words: list[str]) -> tuple[str | None, str]:
    """`generate`'s words -> (model folder or None for the demo checkpoint, prompt).

    An existing folder as the first word is MODEL and the rest is the prompt; a first word that looks
    like a path but does not exist is an error; otherwise every word is the prompt.
    """
    first = words[0]
    if Path(first).expanduser().is_dir():
        if len(words) == 1:
            raise UsageError(f"no prompt after the model folder {first}; usage: glimpse generate [MODEL] PROMPT")
        return first, " ".join(words[1:])
    if _looks_like_path(first):
        check_model(first)  # raises: missing, or a file
    return None, " ".join(words)


def check_media(path: str, kind: str, flag: str) -> str:
    """A media file given as `flag PATH` (kind "image" or "video"): it exists, is readable and is not
    obviously the other kind. Returns the path with ~ expanded."""
    full = Path(path).expanduser()
    if not full.exists():
        raise InvalidInputError(f"{flag} {path}: no such file")
    if full.is_dir():
        raise InvalidInputError(f"{flag} {path}: is a folder, not a file")
    if not os.access(full, os.R_OK):
        raise InvalidInputError(f"{flag} {path}: cannot read the file (permission denied)")
    suffix = full.suffix.lower()
    other = "video" if kind == "image" else "image"
    other_flag = flag.replace(kind, other)
    if suffix in (VIDEO_SUFFIXES if kind == "image" else IMAGE_SUFFIXES):
        raise InvalidInputError(f"{flag} {path}: a {suffix} file is a {other}; use {other_flag}")
    return str(full)


def mm_processor_kwargs(args: argparse.Namespace) -> dict:
    """--max-pixels / --fps as the processor's per-request settings (only those given)."""
    return {key: value for key, value in (("max_pixels", args.max_pixels), ("fps", args.fps)) if value is not None}


def check_mm_kwargs(path: Path, mm: dict, images: bool = True, videos: bool = True) -> None:
    """--max-pixels / --fps against the checkpoint's processor configs, before the model loads.

    The offline processor holds max_pixels to the checkpoint's own value (as `glimpse serve` does unless
    its operator raises the ceiling), for the kinds of media the prompt carries (`images`, `videos`);
    every other rule (a family whose HF processor ignores fps) is the processor's own `check_overrides`.
    """
    from glimpse.processing.spec import Ceilings, check_overrides, load_specs

    image_spec, video_spec = load_specs(path)
    if "max_pixels" in mm:
        for kind, spec, present in (("image", image_spec, images), ("video", video_spec, videos)):
            if present and mm["max_pixels"] > spec.max_pixels:
                raise UsageError(f"--max-pixels {mm['max_pixels']} is above this checkpoint's {kind} limit of "
                                 f"{spec.max_pixels} pixels (size.longest_edge in its processor config), which "
                                 "--max-pixels may only lower")  # fmt: skip
    if mm.get("fps", 0) > Ceilings.max_fps:
        raise UsageError(f"--fps {mm['fps']} is above the limit of {Ceilings.max_fps} frames per second")
    try:
        check_overrides(video_spec, **mm)
    except InvalidInputError as exc:  # max_pixels >= 1 always passes: the refusal is about fps
        raise UsageError(f"--fps: {exc}") from None


# ---- running -----------------------------------------------------------------------------------------------------


def _checkpoint(model: str | None) -> Path:
    from glimpse.llm import demo_checkpoint

    return demo_checkpoint() if model is None else Path(model).expanduser()


def make_llm(model: str | None, args: argparse.Namespace):
    from glimpse.llm import LLM

    if model is None:
        print(DEMO_BANNER.format(path=_checkpoint(None)), file=sys.stderr)
    return LLM(model, dtype=args.dtype, max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
               max_num_batched_tokens=args.max_num_batched_tokens, kv_cache_memory=args.kv_cache_memory,
               encoder_cache_memory=args.encoder_cache_memory, enable_prefix_caching=not args.no_prefix_caching,
               seed=args.seed, load_format=args.load_format, encoder_graph=args.encoder_graph,
               decode_graph=args.decode_graph,
               tensor_parallel_size=args.tensor_parallel_size, enable_expert_parallel=args.enable_expert_parallel,
               mm_encoder_tp_mode=args.mm_encoder_tp_mode, encoder_budgets=args.encoder_budgets,
               device=args.device, warmup=False)  # one prompt: a warm-up step would only add its own time  # fmt: skip


def _params(llm, args: argparse.Namespace):
    """The flags given, over the model's defaults (its generation_config.json, else vLLM's)."""
    import dataclasses

    given = {"temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k,
             "repetition_penalty": args.repetition_penalty}  # fmt: skip
    return dataclasses.replace(llm.get_default_sampling_params(), max_tokens=args.max_tokens, stop=args.stop,
                               seed=args.sampling_seed, ignore_eos=args.ignore_eos,
                               **{k: v for k, v in given.items() if v is not None})  # fmt: skip


def _template_kwargs(args: argparse.Namespace) -> dict | None:
    return None if args.thinking is None else {"enable_thinking": args.thinking == "on"}


def _system(args: argparse.Namespace) -> list[dict]:
    """The conversation's opening: the --system message, if any."""
    return [] if args.system is None else [{"role": "system", "content": args.system}]


def _content(text: str, images: list[str], videos: list[str]) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": i}} for i in images]
    parts += [{"type": "video_url", "video_url": {"url": v}} for v in videos]
    return parts + [{"type": "text", "text": text}]


def generate(args: argparse.Namespace) -> int:
    model, prompt = split_words(args.words)
    if model is not None:
        check_model(model)
    images = [check_media(p, "image", "--image") for p in args.image or []]
    videos = [check_media(p, "video", "--video") for p in args.video or []]
    mm = mm_processor_kwargs(args)
    if mm:
        check_mm_kwargs(_checkpoint(model), mm, images=bool(images), videos=bool(videos))
    llm = make_llm(model, args)
    messages = [*_system(args), {"role": "user", "content": _content(prompt, images, videos)}]
    out = llm.chat(messages, _params(llm, args), use_tqdm=False, chat_template_kwargs=_template_kwargs(args),
                   mm_processor_kwargs=mm or None)[0]  # fmt: skip
    comp = out.outputs[0]
    print(comp.text)
    summary = {"prompt_tokens": len(out.prompt_token_ids), "completion_tokens": len(comp.token_ids),
               "media": out.media_tokens, "finish_reason": comp.finish_reason,
               "timings_s": {k: round(v, 4) for k, v in out.metrics.items() if isinstance(v, float)}}  # fmt: skip
    print(json.dumps(summary), file=sys.stderr)
    return 0


def _lines():
    """Input lines: a readline prompt on a terminal (editing, history), plain lines from a pipe."""
    if not sys.stdin.isatty():
        for line in sys.stdin:
            yield line.rstrip("\n")
        return
    try:
        import readline  # noqa: F401 -- importing it gives input() line editing and history
    except ImportError:  # Windows
        pass
    while True:
        yield input("> ")


def _stream_reply(llm, history: list[dict], params, template_kwargs: dict | None,
                  mm: dict | None = None) -> tuple[str, bool]:  # fmt: skip
    """Print one streamed reply; returns (text shown, whether Ctrl-C stopped it).

    Ctrl-C only raises a flag, read between engine steps, so the engine is never left mid-step; the
    request is then aborted. A second Ctrl-C before the step ends raises KeyboardInterrupt (quit).
    """
    stopped = False

    def on_sigint(signum, frame) -> None:
        nonlocal stopped
        if stopped:
            raise KeyboardInterrupt
        stopped = True

    previous = signal.signal(signal.SIGINT, on_sigint)
    stream = llm.stream_chat(history, params, chat_template_kwargs=template_kwargs, mm_processor_kwargs=mm)
    reply = ""
    try:
        for out in stream:
            delta = out.outputs[0].delta_text
            reply += delta
            print(delta, end="", flush=True)
            if stopped:
                break
    finally:
        stream.close()  # aborts the request if it is still running
        signal.signal(signal.SIGINT, previous)
    return reply, stopped


def chat(args: argparse.Namespace) -> int:
    """The conversation loop. Replies go to stdout, everything else (banner, acknowledgements, errors) to
    stderr, so `glimpse chat < questions.txt > answers.txt` keeps only the replies."""
    from glimpse.errors import GlimpseError

    if args.model is not None:
        check_model(args.model)
    mm = mm_processor_kwargs(args)
    if mm:  # media come later: images are what most chats attach, a video's limit is checked when one comes
        check_mm_kwargs(_checkpoint(args.model), mm, videos=False)
    llm = make_llm(args.model, args)
    params = _params(llm, args)
    template_kwargs = _template_kwargs(args)
    history: list[dict] = _system(args)
    media: dict[str, list[str]] = {"image": [], "video": []}
    print("glimpse chat: type a message; /help lists the commands; Ctrl-C stops a reply; Ctrl-D or /bye quits.",
          file=sys.stderr)  # fmt: skip
    lines = _lines()
    while True:
        try:
            line = next(lines)
        except (EOFError, KeyboardInterrupt, StopIteration):  # Ctrl-D, Ctrl-C at the prompt, end of piped input
            print(file=sys.stderr)
            return 0
        command, _, rest = line.strip().partition(" ")
        rest = rest.strip().strip("'\"")
        if line.startswith("/"):
            if command in ("/bye", "/exit", "/quit"):
                return 0
            if command in ("/help", "/?"):
                print(CHAT_HELP, file=sys.stderr)
            elif command in ("/clear", "/reset"):
                history = _system(args)
                media = {"image": [], "video": []}
                print("[cleared the conversation]", file=sys.stderr)
            elif command in ("/image", "/video"):
                kind = command[1:]
                if not rest:
                    print(f"[error] {command} needs a path: {command} PATH", file=sys.stderr)
                    continue
                try:
                    media[kind].append(check_media(rest, kind, command))
                except InvalidInputError as exc:
                    print(f"[error] {exc}", file=sys.stderr)
                    continue
                print(f"[attached {rest} to the next message]", file=sys.stderr)
            else:
                print(f"[error] unknown command {command}; /help lists them (start with a space to send it as text)",
                      file=sys.stderr)  # fmt: skip
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": _content(line, media["image"], media["video"])})
        media = {"image": [], "video": []}
        try:
            reply, stopped = _stream_reply(llm, history, params, template_kwargs, mm or None)
        except GlimpseError as exc:  # e.g. a prompt over --max-model-len: the session goes on without it
            history.pop()
            print(f"[error] {exc}", file=sys.stderr)
            continue
        print()
        if stopped:
            print("[stopped]", file=sys.stderr)
        if reply:  # a stopped reply stays as far as it was shown, so the model sees what the user saw
            history.append({"role": "assistant", "content": reply})
        else:
            history.pop()


def add_commands(sub) -> None:
    g = sub.add_parser("generate", help="answer one prompt (with --image/--video) and exit",
                       formatter_class=DefaultsFormatter,
                       usage="%(prog)s [MODEL] PROMPT... [--image PATH] [--video PATH] [options]",
                       description="Answer one prompt. MODEL is a checkpoint folder; without one the built-in\n"
                                   "demo checkpoint (random weights) is used.")  # fmt: skip
    g.add_argument("words", nargs="+", metavar="[MODEL] PROMPT",
                   help="an optional checkpoint folder, then the prompt (the words are joined)")  # fmt: skip
    g.add_argument("--image", action="append", metavar="PATH", help="image file (repeatable; default: none)")
    g.add_argument("--video", action="append", metavar="PATH", help="video file (repeatable; default: none)")
    add_engine_arguments(g)
    add_sampling_arguments(g)
    add_prompt_arguments(g)
    g.set_defaults(func=generate)

    c = sub.add_parser("chat", help="interactive, streaming chat", formatter_class=DefaultsFormatter,
                       usage="%(prog)s [MODEL] [options]",
                       description="Interactive, streaming chat.", epilog=CHAT_HELP)
    c.add_argument("model", nargs="?", default=None, metavar="MODEL",
                   help="checkpoint folder (default: the built-in demo checkpoint, random weights)")  # fmt: skip
    add_engine_arguments(c)
    add_sampling_arguments(c)
    add_prompt_arguments(c)
    c.set_defaults(func=chat)
