"""`glimpse generate` and `glimpse chat`: the offline engine from the command line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEMO_BANNER = ("[glimpse] no model given: using the built-in demo checkpoint ({path}).\n"
               "[glimpse] It has RANDOM weights, so its text is gibberish; pass a checkpoint folder for real answers.")  # fmt: skip


def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=32)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--kv-cache-memory", default="1GiB")
    p.add_argument("--encoder-cache-memory", default="256MiB")
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--load-format", default="auto", choices=("auto", "safetensors", "dummy"))
    p.add_argument("--encoder-graph", choices=("on", "off"), default="off",
                   help="vision encoder in token budgets with one compiled graph each (faster encoder, ~1 min "
                        "of compilation at start with a cold inductor cache)")  # fmt: skip
    p.add_argument("--encoder-budgets", default=None, help="comma-separated merged-token budgets (default: powers "
                   "of two from 64 up to --max-num-batched-tokens)")  # fmt: skip


def parse_budgets(text: str | None) -> tuple[int, ...] | None:
    """--encoder-budgets "64,256,1024" -> (64, 256, 1024); None keeps the defaults."""
    if not text:
        return None
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise SystemExit(f"--encoder-budgets must be comma-separated integers, got {text!r}") from None


def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--sampling-seed", type=int, default=None)
    p.add_argument("--thinking", choices=("on", "off"), default=None, help="set chat_template_kwargs.enable_thinking")


def make_llm(model: str | None, args: argparse.Namespace):
    from glimpse.llm import LLM, demo_checkpoint

    if model is None:
        print(DEMO_BANNER.format(path=demo_checkpoint()), file=sys.stderr)
    return LLM(model, dtype=args.dtype, max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
               max_num_batched_tokens=args.max_num_batched_tokens, kv_cache_memory=args.kv_cache_memory,
               encoder_cache_memory=args.encoder_cache_memory, enable_prefix_caching=not args.no_prefix_caching,
               seed=args.seed, load_format=args.load_format, encoder_graph=args.encoder_graph,
               encoder_budgets=parse_budgets(args.encoder_budgets))  # fmt: skip


def _params(args: argparse.Namespace):
    from glimpse.engine.sampling_params import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, seed=args.sampling_seed)  # fmt: skip


def _template_kwargs(args: argparse.Namespace) -> dict | None:
    return None if args.thinking is None else {"enable_thinking": args.thinking == "on"}


def _content(text: str, images: list[str], videos: list[str]) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": str(Path(i))}} for i in images]
    parts += [{"type": "video_url", "video_url": {"url": str(Path(v))}} for v in videos]
    return parts + [{"type": "text", "text": text}]


def generate(args: argparse.Namespace) -> int:
    model, prompt = (args.words[0], args.words[1]) if len(args.words) == 2 else (None, args.words[0])
    llm = make_llm(model, args)
    messages = [{"role": "user", "content": _content(prompt, args.image or [], args.video or [])}]
    out = llm.chat(messages, _params(args), use_tqdm=False, chat_template_kwargs=_template_kwargs(args))[0]
    comp = out.outputs[0]
    print(comp.text)
    summary = {"prompt_tokens": len(out.prompt_token_ids), "completion_tokens": len(comp.token_ids),
               "media": out.media_tokens, "finish_reason": comp.finish_reason,
               "timings_s": {k: round(v, 4) for k, v in out.metrics.items() if isinstance(v, float)}}  # fmt: skip
    print(json.dumps(summary), file=sys.stderr)
    return 0


def chat(args: argparse.Namespace) -> int:
    llm = make_llm(args.model, args)
    params = _params(args)
    history: list[dict] = []
    images: list[str] = []
    videos: list[str] = []
    print("glimpse chat: type a message; /image PATH or /video PATH attaches media to the next one; "
          "/reset clears the history; /exit quits.", file=sys.stderr)  # fmt: skip
    for line in sys.stdin if not sys.stdin.isatty() else iter(lambda: input("> "), None):
        line = line.rstrip("\n")
        if line in ("/exit", "/quit"):
            break
        if line.startswith("/image "):
            images.append(line[7:].strip())
            continue
        if line.startswith("/video "):
            videos.append(line[7:].strip())
            continue
        if line == "/reset":
            history.clear()
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": _content(line, images, videos)})
        images, videos = [], []
        reply = ""
        try:
            for out in llm.stream_chat(history, params, chat_template_kwargs=_template_kwargs(args)):
                delta = out.outputs[0].delta_text
                reply += delta
                print(delta, end="", flush=True)
        except Exception as e:  # a bad attachment must not end the session
            from glimpse.errors import GlimpseError

            if not isinstance(e, GlimpseError):
                raise
            history.pop()
            print(f"[error] {e}", file=sys.stderr)
            continue
        print()
        history.append({"role": "assistant", "content": reply})
    return 0


def add_commands(sub) -> None:
    g = sub.add_parser("generate", help="answer one prompt (with --image/--video) and exit")
    g.add_argument("words", nargs="+", metavar="[MODEL] PROMPT", help="optional checkpoint folder, then the prompt")
    g.add_argument("--image", action="append", help="image path (repeatable)")
    g.add_argument("--video", action="append", help="video path (repeatable)")
    add_engine_arguments(g)
    add_sampling_arguments(g)
    g.set_defaults(func=generate)

    c = sub.add_parser("chat", help="interactive, streaming chat")
    c.add_argument("model", nargs="?", default=None)
    add_engine_arguments(c)
    add_sampling_arguments(c)
    c.set_defaults(func=chat)
