"""`glimpse serve [MODEL]`: flags -> engine, processor limits, media policy -> uvicorn on host:port.

`add_arguments(parser)` declares the flags; `run(args)` checks that host:port can be bound, loads
the checkpoint (a demo one with RANDOM weights when MODEL is omitted), starts the engine and
serves until SIGTERM (which drains for --shutdown-timeout; exit 0) or Ctrl-C (exit 130). Start-up errors
are one `glimpse: error: ...` line (exit 2 for flag values, 1 otherwise), found before the model loads
where they can be. Safe defaults: loopback only, no local files,
no remote media, no CORS, bounded bodies, queues and time. Flags that vLLM also has are spelled, and their
values read (32k, 4GiB, JSON lists), as vLLM's.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import math
import os
import signal
import socket
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

from glimpse.errors import GlimpseError, InvalidInputError
from glimpse.processing.prompt import template_variables
from glimpse.units import int_at_least, parse_bytes, parse_count

# Chat-template variables a request may never set through chat_template_kwargs.
API_KEY_ENV = "GLIMPSE_API_KEY"  # the API key from the environment, where `ps` does not show it


def add_arguments(p: argparse.ArgumentParser) -> None:
    from glimpse.entrypoints import DefaultsFormatter

    p.formatter_class = DefaultsFormatter  # "(default: X)" after every flag's help that does not say it in words
    p.add_argument("model", nargs="?", default=None, metavar="MODEL",
                   help="HF checkpoint folder, also as --model (default: a built-in demo checkpoint with RANDOM "
                        "weights)")  # fmt: skip
    p.add_argument("--model", dest="model_option", default=None, metavar="MODEL",
                   help="the checkpoint folder, as vLLM's api_server takes it (default: the positional MODEL; both "
                        "given and different is an error)")  # fmt: skip
    net = p.add_argument_group("network and access")
    net.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, loopback only)")
    net.add_argument("--port", type=int, default=8000, help="TCP port to listen on")
    net.add_argument("--served-model-name", default=None,
                     help="the model id clients send (default: MODEL as given)")  # fmt: skip
    net.add_argument("--api-key", default=None,
                     help="require 'Authorization: Bearer KEY' on /v1/*, /openapi.json and /docs (default: "
                          f"${API_KEY_ENV} if set, else none; the flag wins; prefer the variable, since a key in "
                          "the command line shows in ps)")  # fmt: skip
    net.add_argument("--allowed-hosts", nargs="*", default=None,
                     help="Host header values the server answers (DNS-rebinding guard; '*' for any); default: "
                          "the bind host, localhost and 127.0.0.1 on a loopback bind, any host otherwise")  # fmt: skip
    net.add_argument("--allowed-origins", type=_json_strings("--allowed-origins"), default=None, metavar="JSON",
                     help="CORS: a JSON list of browser origins allowed to call the API, e.g. "
                          "'[\"https://app.example.com\"]' or '[\"*\"]' (default: none, no CORS headers are sent; "
                          "vLLM's is [\"*\"])")  # fmt: skip
    net.add_argument("--allowed-methods", type=_json_strings("--allowed-methods"), default=None, metavar="JSON",
                     help='CORS: JSON list of methods allowed cross-origin (default: ["*"]; needs '
                          "--allowed-origins)")  # fmt: skip
    net.add_argument("--allowed-headers", type=_json_strings("--allowed-headers"), default=None, metavar="JSON",
                     help='CORS: JSON list of request headers allowed cross-origin (default: ["*"]; needs '
                          "--allowed-origins)")  # fmt: skip
    net.add_argument("--allow-credentials", action="store_true",
                     help="CORS: allow credentials (cookies, HTTP auth) cross-origin (needs "
                          "--allowed-origins)")  # fmt: skip
    net.add_argument("--max-connections", type=int, default=512,
                     help="open HTTP connections (idle keep-alive ones included); 503 above")  # fmt: skip
    net.add_argument("--body-read-timeout", type=float, default=5.0,
                     help="seconds a request body may stall between chunks (408); also the time a connection "
                          "has to send a whole request line and headers (closed otherwise)")  # fmt: skip
    net.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
                     help="glimpse's own log (start-up, warnings, errors)")  # fmt: skip
    net.add_argument("--uvicorn-log-level", default=None,
                     choices=("critical", "error", "warning", "info", "debug", "trace"),
                     help="uvicorn's error and access logs (one line per HTTP request at info) (default: "
                          "--log-level's value)")  # fmt: skip
    net.add_argument("--disable-log-requests", action="store_true",
                     help="accepted for vLLM command lines and changes nothing: glimpse never logs requests' "
                          "prompts or parameters (uvicorn's one-line access log is --uvicorn-log-level's)")  # fmt: skip
    media = p.add_argument_group("media sources (all off by default except data: URLs)")
    media.add_argument("--allowed-local-media-path", default=None,
                       help="serve file:// URLs only for regular files under this directory (default: none, "
                            "file:// refused)")  # fmt: skip
    media.add_argument("--allowed-media-domains", nargs="*", default=[],
                       help="hosts http(s) media may come from ('images.example.com', '*.example.com') (default: "
                            "none, http(s) refused)")  # fmt: skip
    media.add_argument("--max-media-bytes", type=_size("--max-media-bytes"), default="64MiB", metavar="SIZE",
                       help="largest media item, any source")  # fmt: skip
    media.add_argument("--media-fetch-timeout", type=float, default=10.0, help="seconds for one remote fetch")
    media.add_argument("--max-media-redirects", type=int, default=3, help="redirect hops per remote fetch")
    lim = p.add_argument_group("request limits")
    lim.add_argument("--limit-mm-per-prompt", default='{"image": 16, "video": 2}',
                     help='JSON, most items per prompt: {"image": N, "video": M}')  # fmt: skip
    lim.add_argument("--max-image-pixels", type=int, default=64_000_000,
                     help="decoded image size, checked from the header")  # fmt: skip
    lim.add_argument("--max-decoding-pixels", type=int, default=None,
                     help="decoded pixels held at once across the server (default: 2 x --max-image-pixels, at "
                          "least --max-video-frame-pixels); "
                          "requests wait for room, and beyond --max-queue waiting get 429")  # fmt: skip
    lim.add_argument("--max-video-frame-pixels", type=int, default=8_294_400, help="decoded video frame size")
    lim.add_argument("--max-decode-frames", type=int, default=20_000, help="frames a video decode may walk")
    lim.add_argument("--max-pixels", type=int, default=None,
                     help="ceiling on a request's image max_pixels (default: the checkpoint's)")  # fmt: skip
    lim.add_argument("--max-video-pixels", type=int, default=None,
                     help="ceiling on a request's video max_pixels (default: the checkpoint's)")  # fmt: skip
    lim.add_argument("--max-frames", type=int, default=768,
                     help="frames a video may keep (sampled, or all of them with do_sample_frames=false); "
                          "also the ceiling on a request's num_frames / max_frames")  # fmt: skip
    lim.add_argument("--max-fps", type=float, default=30.0, help="ceiling on a request's fps")
    lim.add_argument("--max-n", type=int, default=16,
                     help="sequences one request may ask for: n (a completions request counts prompts x n)")  # fmt: skip
    lim.add_argument("--max-request-bytes", type=_size("--max-request-bytes"), default="100MiB", metavar="SIZE",
                     help="largest request body (413 above)")  # fmt: skip
    lim.add_argument("--max-concurrent-requests", type=int, default=64, help="requests served at once")
    lim.add_argument("--max-queue", type=int, default=256, help="requests waiting for a slot (429 beyond)")
    lim.add_argument("--request-timeout", type=float, default=600.0, help="seconds before a request is aborted (504)")
    lim.add_argument("--shutdown-timeout", type=float, default=30.0, metavar="SECONDS",
                     help="on SIGTERM, new requests get 503 while those in flight may run this long; then they end "
                          "with a 503 (streams: an error event and [DONE]) and the server exits 0 (0: at once, as "
                          "vLLM's default; Ctrl-C always ends them at once)")  # fmt: skip
    lim.add_argument("--preprocess-workers", type=int, default=2, help="threads decoding and resizing media")
    out = p.add_argument_group("output")
    out.add_argument("--generation-config", type=_generation_config, default="auto", metavar="auto|vllm|FOLDER",
                     help="auto: unset temperature/top_p/top_k/repetition_penalty come from the checkpoint's "
                          "generation_config.json (as vLLM); vllm (or none): OpenAI's defaults; FOLDER: from "
                          "FOLDER/generation_config.json instead")  # fmt: skip
    out.add_argument("--chat-template", default=None, metavar="FILE|TEMPLATE",
                     help="replaces the checkpoint's chat template for every request: a file, or the Jinja text "
                          "itself (anything holding '{{' or '{%%'; backslash escapes such as \\n are read, as "
                          "vLLM does) (default: the checkpoint's)")  # fmt: skip
    out.add_argument("--mm-processor-kwargs", type=_json_object, default=None, metavar="JSON",
                     help='server-wide defaults for the requests\' mm_processor_kwargs, e.g. \'{"max_pixels": '
                          "1003520}'; checked at start-up like a request's, and a request's own keys win "
                          "(default: none)")  # fmt: skip
    out.add_argument("--reasoning-parser", choices=("auto", "glm", "none"), default="auto",
                     help="split <think> reasoning and box markers from content (auto: on for GLM checkpoints)")  # fmt: skip
    out.add_argument("--tool-call-parser", choices=("auto", "glm45", "hermes", "none"), default="auto",
                     help="read tool calls from chat output into tool_calls: glm45 (GLM-4.5V/4.6V's <arg_key> "
                          "format), hermes (Qwen2.5's <tool_call> JSON); auto: the format the chat template teaches, "
                          "none if it renders no tools; none: requests may send tools only with tool_choice "
                          "'none'")  # fmt: skip
    so = p.add_argument_group("structured output (response_format, structured_outputs, tool_choice required)")
    so.add_argument("--structured-output-max-bytes", type=_size("--structured-output-max-bytes"), default="64KiB",
                    metavar="SIZE",
                    help="largest constraint, as JSON text (a schema, regex, grammar, or the structural tag of a "
                         "request's tools); 400 above")  # fmt: skip
    so.add_argument("--structured-output-max-depth", type=int_at_least(1), default=24, metavar="N",
                    help="deepest nesting of subschemas in a JSON schema (properties, items, anyOf, $defs, ...); 400 "
                         "deeper")  # fmt: skip
    so.add_argument("--structured-output-compile-timeout", type=_seconds, default=10.0, metavar="SECONDS",
                    help="how long a request may wait for its grammar to compile, from its arrival; 400 "
                         "after")  # fmt: skip
    eng = p.add_argument_group("engine")
    eng.add_argument("--engine-process", action=argparse.BooleanOptionalAction, default=True,
                     help="run the engine core (scheduler + model) in its own process, so decoding does not share "
                          "a GIL with HTTP and preprocessing; --no-engine-process: a thread of the API process")  # fmt: skip
    eng.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                     help="weight and activation dtype (auto: the checkpoint's)")  # fmt: skip
    from glimpse.device_names import DEVICE_HELP
    from glimpse.entrypoints import add_parallel_arguments, device_name

    eng.add_argument("--device", type=device_name, default="auto", metavar="DEVICE", help=DEVICE_HELP)
    eng.add_argument("--load-format", default="auto", choices=("auto", "safetensors", "dummy"),
                     help="dummy: seeded random weights instead of the folder's safetensors (benchmarks of a "
                          "config-only checkpoint, as vLLM's --load-format dummy)")  # fmt: skip
    eng.add_argument("--warmup", choices=("on", "off"), default="on",
                     help="before serving, run one full prefill step (an image chat and a prompt filling the "
                          "prefill budget) and forget it, so the first requests do not pay for compiling kernels "
                          "and growing memory")  # fmt: skip
    eng.add_argument("--encoder-graph", choices=("on", "off"), default="off",
                     help="on: the vision encoder in token budgets with one compiled graph each (compiled at "
                          "start-up); off: eager tower calls per step, which serve more tokens/s since the native "
                          "kernels (concurrency 64: 0.92x vLLM-CPU's against 0.79x with graphs, docs/benchmarks.md); "
                          "on is refused with --tensor-parallel-size > 1")  # fmt: skip
    eng.add_argument("--stream-interval", type=_count("--stream-interval"), default=1, metavar="N",
                     help="streamed tokens per chunk after a request's first, as SGLang's flag: higher lowers the "
                          "per-token cost of streaming (engine outputs, event-loop work, writes, client wake-ups) "
                          "for coarser chunks; the first token and the last go out at once")  # fmt: skip
    eng.add_argument("--decode-graph", choices=("on", "off"), default="off",
                     help="on: decode steps (every sequence one new token) through one compiled graph of the "
                          "decoder, 5-8%% shorter steps (bf16 on a CPU with the native kernels, one rank; compiled "
                          "at start-up, ~30 s with a cold inductor cache, ~3 s warm); on a GPU, replayed from graphs "
                          "captured per batch and context bucket at start-up (not yet run on a GPU)")  # fmt: skip
    add_parallel_arguments(eng)
    eng.add_argument("--encoder-budgets", default=None,
                     help="comma-separated merged-token budgets (default: powers of two from 64 up to "
                          "--max-num-batched-tokens)")  # fmt: skip
    eng.add_argument("--max-model-len", type=_count("--max-model-len"), default=None, metavar="N",
                     help="longest prompt + reply in tokens; 32k = 32000, 32K = 32768 (default: the checkpoint's "
                          "limit)")  # fmt: skip
    eng.add_argument("--max-num-seqs", type=_count("--max-num-seqs"), default=32, metavar="N",
                     help="sequences decoded at once")  # fmt: skip
    eng.add_argument("--max-num-batched-tokens", type=_count("--max-num-batched-tokens"), default=2048, metavar="N",
                     help="tokens per engine step (2k = 2000, 2K = 2048)")  # fmt: skip
    eng.add_argument("--max-prefill-tokens", type=_count("--max-prefill-tokens"), default=None, metavar="N",
                     help="prompt tokens per step, after every decoding sequence's token (at most "
                          "--max-num-batched-tokens); lower shortens the steps that delay decoding sequences, "
                          "higher makes prefill matmuls more efficient (default: 2048, or --max-num-batched-tokens "
                          "where lower)")  # fmt: skip
    eng.add_argument("--kv-cache-memory", type=_size("--kv-cache-memory"), default="1GiB", metavar="SIZE",
                     help="memory for the KV cache: bytes, 512MiB, 2GiB, 4G (= 4 x 2^30) or 4g "
                          "(= 4 x 10^9)")  # fmt: skip
    eng.add_argument("--encoder-cache-memory", type=_size("--encoder-cache-memory"), default="256MiB", metavar="SIZE",
                     help="memory for cached vision-encoder outputs")  # fmt: skip
    eng.add_argument("--block-size", type=int, default=16, help="tokens per KV cache block")
    eng.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                     help="reuse the KV cache of shared prompt prefixes, media included (as vLLM); "
                          "--no-prefix-caching is another name for --no-enable-prefix-caching")  # fmt: skip
    eng.add_argument("--no-prefix-caching", dest="enable_prefix_caching", action="store_false",
                     help="another name for --no-enable-prefix-caching (default: prefix caching on)")  # fmt: skip
    eng.add_argument("--video-pruning-rate", type=float, default=0.0,
                     help="EVS, Qwen2.5-VL only: drop this fraction of each video's tokens (those that change least "
                     "between frames) after encoding, in [0, 1); requests may override it in mm_processor_kwargs")  # fmt: skip
    eng.add_argument("--seed", type=int, default=0, help="seed of the engine (dummy weights, default sampling)")


# ---- flag value types: argparse turns ArgumentTypeError into "argument --flag: message", exit 2 -----------------
def _count(knob: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            return parse_count(text, knob)
        except InvalidInputError as exc:
            raise argparse.ArgumentTypeError(str(exc).removeprefix(f"{knob}=")) from None

    return parse


def _size(knob: str) -> Callable[[str], str]:
    """Checks a size now and keeps it as written ("1GiB"), so that later messages quote it so."""
    def parse(text: str) -> str:
        try:
            parse_bytes(text, knob)
            return text
        except InvalidInputError as exc:
            raise argparse.ArgumentTypeError(str(exc).removeprefix(f"{knob}=")) from None

    return parse


def _json_strings(knob: str) -> Callable[[str], list[str]]:
    """A JSON list of strings, as vLLM's CORS flags take them."""
    def parse(text: str) -> list[str]:
        try:
            value = json.loads(text)
        except ValueError:
            value = None
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise argparse.ArgumentTypeError(f"must be a JSON list of strings like '[\"https://app.example.com\"]' "
                                             f"(quoted for the shell), got {text!r}")  # fmt: skip
        return value

    return parse


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object like '{{\"max_pixels\": 1003520}}', got {text!r}")
    return value


def _generation_config(text: str) -> str:
    """auto, vllm (none: its old name here) or a folder holding generation_config.json."""
    if text in ("auto", "vllm", "none"):
        return text
    if not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"must be auto, vllm or a folder holding generation_config.json; {text!r} "
                                         "is not a folder")  # fmt: skip
    if not (Path(text) / "generation_config.json").is_file():
        raise argparse.ArgumentTypeError(f"the folder {text} has no generation_config.json")
    return text


def _seconds(text: str) -> float:
    """A positive, finite number of seconds."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (0 < value < math.inf):
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0, got {text!r}")
    return value


def _positive(name: str, value: float) -> None:
    if value <= 0:
        raise InvalidInputError(f"{name} must be > 0, got {value}")


def parse_mm_limits(text: str) -> tuple[int, int]:
    """--limit-mm-per-prompt: {"image": N, "video": M} (or vLLM's {"image": {"count": N}})."""
    try:
        data = json.loads(text)
    except ValueError:
        raise InvalidInputError(f"--limit-mm-per-prompt must be JSON like '{{\"image\": 4, \"video\": 1}}', got {text!r}") from None
    if not isinstance(data, dict) or set(data) - {"image", "video"}:
        raise InvalidInputError('--limit-mm-per-prompt takes the keys "image" and "video"')
    counts = []
    for kind, default in (("image", 16), ("video", 2)):
        value = data.get(kind, default)
        value = value.get("count") if isinstance(value, dict) else value
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise InvalidInputError(f"--limit-mm-per-prompt {kind} must be an integer >= 0")
        counts.append(value)
    return counts[0], counts[1]


def model_argument(args: argparse.Namespace) -> str | None:
    """MODEL, given as the positional argument or as --model (vLLM's api_server spelling)."""
    given, option = args.model, getattr(args, "model_option", None)
    if given is not None and option is not None and given != option and Path(given).resolve() != Path(option).resolve():
        raise InvalidInputError(f"two models given: {given!r} and --model {option!r}; glimpse serves one, so give "
                                "it once")  # fmt: skip
    return given if given is not None else option


def resolve_api_key(flag: str | None, environ: Mapping[str, str]) -> str | None:
    """--api-key, else $GLIMPSE_API_KEY (where `ps` does not show it); None (no key) if neither is set or empty."""
    return flag or environ.get(API_KEY_ENV) or None


# Chat templates glimpse ships (glimpse/templates/NAME.jinja), given to --chat-template by NAME.
TEMPLATES = Path(__file__).resolve().parents[1] / "templates"


def shipped_templates() -> list[str]:
    return sorted(p.stem for p in TEMPLATES.glob("*.jinja"))


def load_chat_template(value: str) -> str:
    """--chat-template as vLLM reads it: the file's text if `value` names a file, else `value` itself when it
    looks like a Jinja template ('{{' or '{%'), with backslash escapes read (so a shell's '\\n' is a newline);
    else the template glimpse ships under that name (qwen2_5_vl_hermes)."""
    if Path(value).is_file():
        try:
            return Path(value).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise GlimpseError(f"--chat-template {value}: the file could not be read ({exc})") from None
    if value in shipped_templates():
        return (TEMPLATES / f"{value}.jinja").read_text(encoding="utf-8")
    if "{{" not in value and "{%" not in value:
        raise InvalidInputError(f"--chat-template {value!r}: no such file, and not a Jinja template either (no "
                                f"'{{{{' or '{{%'), nor a template glimpse ships ({', '.join(shipped_templates())}); "
                                "give a template file, the template text or a shipped name")  # fmt: skip
    try:  # non-Latin-1 characters pass through as \uXXXX escapes and come back unchanged
        return value.encode("latin-1", "backslashreplace").decode("unicode_escape")
    except UnicodeDecodeError as exc:
        raise InvalidInputError(f"--chat-template: a bad backslash escape in the template text "
                                f"({exc.reason})") from None  # fmt: skip


def check_mm_defaults(processor, kwargs: dict) -> None:
    """--mm-processor-kwargs held to what a request's mm_processor_kwargs is held to: known keys, good values, and
    the server ceilings for both images and videos (they apply to every request, whatever it carries)."""
    try:
        processor.precheck(0, 0, kwargs)  # keys, values and the EVS rate
        processor.specs({k: v for k, v in kwargs.items() if k != "video_pruning_rate"})  # and the ceilings
    except InvalidInputError as exc:
        raise InvalidInputError(f"--mm-processor-kwargs: {exc}") from None


def sampling_defaults(choice: str) -> dict | None:
    """--generation-config: the sampling settings that fill what a request leaves unset; None for auto (the
    checkpoint's own, which the engine reads)."""
    if choice == "auto":
        return None
    if choice in ("vllm", "none"):
        return {}
    from glimpse.config import read_json

    gen = read_json(Path(choice) / "generation_config.json")  # CheckpointError (exit 1) if not JSON
    return {k: gen[k] for k in ("temperature", "top_p", "top_k", "repetition_penalty") if k in gen}  # as load_config


def cors_options(args: argparse.Namespace) -> dict:
    """CORSMiddleware's keyword arguments from the CORS flags; {} (no CORS headers) without --allowed-origins."""
    if args.allowed_origins is None:
        given = [flag for flag, on in (("--allowed-methods", args.allowed_methods is not None),
                                       ("--allowed-headers", args.allowed_headers is not None),
                                       ("--allow-credentials", args.allow_credentials)) if on]  # fmt: skip
        if given:
            raise InvalidInputError(f"{', '.join(given)} has no effect without --allowed-origins (CORS is off)")
        return {}
    methods, headers = args.allowed_methods, args.allowed_headers
    return {"allow_origins": args.allowed_origins, "allow_methods": ["*"] if methods is None else methods,
            "allow_headers": ["*"] if headers is None else headers,
            "allow_credentials": args.allow_credentials}  # fmt: skip


def build_state(args: argparse.Namespace, start_engine: Callable | None = None):
    """Load everything `glimpse serve` needs; returns the ServerState (engine core started, model loaded).
    `start_engine(config)` replaces the engine-core process or thread (`glimpse serve-ray`: Ray Serve replicas)."""
    from jinja2 import TemplateSyntaxError

    from glimpse.config import load_config
    from glimpse.engine.llm_engine import (
        EngineConfig,
        LLMEngine,
        pixel_dtype,
        prefill_budget,
        resolve_model_dtype,
    )
    from glimpse.engine.structured import StructuredLimits
    from glimpse.entrypoints import parse_budgets
    from glimpse.llm import demo_checkpoint
    from glimpse.models.evs import check_pruning_rate
    from glimpse.processing.control import PixelBudget
    from glimpse.processing.processor import MediaLimits, load_processor
    from glimpse.processing.spec import Ceilings
    from glimpse.server.app import ServerState
    from glimpse.server.async_engine import AsyncEngine
    from glimpse.server.guard import check_allowed_hosts, default_allowed_hosts
    from glimpse.server.media_fetch import MediaPolicy, unsafe_media_addresses_from_env
    from glimpse.server.reasoning import GLM_FAMILIES
    from glimpse.server.tool_parsers import call_tags_are_special, detect_parser

    for name in ("max_concurrent_requests", "request_timeout", "preprocess_workers", "media_fetch_timeout", "max_n",
                 "body_read_timeout", "max_connections"):  # fmt: skip
        _positive("--" + name.replace("_", "-"), getattr(args, name))
    if args.max_queue < 0:
        raise InvalidInputError("--max-queue must be >= 0")
    if args.shutdown_timeout < 0:
        raise InvalidInputError(f"--shutdown-timeout must be >= 0 (0: end requests in flight at once), got "
                                f"{args.shutdown_timeout:g}")  # fmt: skip
    decoding_pixels = args.max_decoding_pixels
    if decoding_pixels is None:  # two images at the limit, and never less than one video frame at its limit
        decoding_pixels = max(2 * args.max_image_pixels, args.max_video_frame_pixels)
    if decoding_pixels < max(args.max_image_pixels, args.max_video_frame_pixels):
        raise InvalidInputError(f"--max-decoding-pixels {decoding_pixels} is below --max-image-pixels "
                                f"{args.max_image_pixels} or --max-video-frame-pixels {args.max_video_frame_pixels}: "
                                "an item within those limits could never be decoded")  # fmt: skip
    check_pruning_rate(args.video_pruning_rate, "--video-pruning-rate")
    prefill_budget(args.max_prefill_tokens, args.max_num_batched_tokens)
    from glimpse.platform import resolve_device

    args.device = resolve_device(args.device)  # a GPU this machine lacks is refused before anything loads
    model_arg = model_argument(args)
    cors = cors_options(args)
    api_key = resolve_api_key(args.api_key, os.environ)
    chat_template = load_chat_template(args.chat_template) if args.chat_template is not None else None
    generation_defaults = sampling_defaults(args.generation_config)
    if chat_template is not None:
        try:
            template_variables(chat_template)
        except TemplateSyntaxError as exc:
            raise InvalidInputError(f"--chat-template is not a valid Jinja template: {exc.message} (line "
                                    f"{exc.lineno})") from None  # fmt: skip
    hosts = check_allowed_hosts(args.allowed_hosts) if args.allowed_hosts is not None else default_allowed_hosts(args.host)
    max_images, max_videos = parse_mm_limits(args.limit_mm_per_prompt)
    domains = tuple(d.strip() for item in args.allowed_media_domains for d in item.split(",") if d.strip())
    policy = MediaPolicy(
        allowed_local_media_path=Path(args.allowed_local_media_path) if args.allowed_local_media_path else None,
        allowed_media_domains=domains, max_bytes=parse_bytes(args.max_media_bytes, "--max-media-bytes"),
        timeout_s=args.media_fetch_timeout, max_redirects=args.max_media_redirects,
        unsafe_media_addresses=unsafe_media_addresses_from_env())  # fmt: skip
    limits = MediaLimits(max_images=max_images, max_videos=max_videos, max_image_pixels=args.max_image_pixels,
                         max_video_frame_pixels=args.max_video_frame_pixels, max_decode_frames=args.max_decode_frames)  # fmt: skip
    ceilings = Ceilings(max_pixels=args.max_pixels, max_video_pixels=args.max_video_pixels, max_frames=args.max_frames,
                        max_fps=args.max_fps)  # fmt: skip
    model = Path(model_arg) if model_arg else demo_checkpoint()
    load_config(model)  # a folder that is no checkpoint fails here, with the engine's own message
    # The processor loads before the engine (seconds against minutes for a real model), so that the server-wide
    # request settings are refused before the model loads.
    processor = load_processor(model, ceilings, limits, args.video_pruning_rate)
    if chat_template is not None:
        processor.chat_template = chat_template  # every request renders with it (Processor.render_chat)
    mm_defaults = args.mm_processor_kwargs or {}
    check_mm_defaults(processor, mm_defaults)
    config = EngineConfig(model=model, dtype=args.dtype, max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                          max_num_batched_tokens=args.max_num_batched_tokens, max_prefill_tokens=args.max_prefill_tokens,
                          kv_cache_memory=args.kv_cache_memory,
                          encoder_cache_memory=args.encoder_cache_memory, block_size=args.block_size,
                          enable_prefix_caching=args.enable_prefix_caching, seed=args.seed,
                          load_format=args.load_format, device=args.device,
                          video_pruning_rate=args.video_pruning_rate, encoder_graph=args.encoder_graph,
                          decode_graph=args.decode_graph, stream_interval=args.stream_interval,
                          tensor_parallel_size=args.tensor_parallel_size,
                          enable_expert_parallel=args.enable_expert_parallel, mm_encoder_tp_mode=args.mm_encoder_tp_mode,
                          encoder_budgets=parse_budgets(args.encoder_budgets),
                          structured_output_max_bytes=parse_bytes(args.structured_output_max_bytes,
                                                                  "--structured-output-max-bytes"),
                          structured_output_max_depth=args.structured_output_max_depth,
                          structured_output_compile_timeout=args.structured_output_compile_timeout,
                          warmup=args.warmup == "on")  # fmt: skip
    processor.pixel_dtype = pixel_dtype(resolve_model_dtype(config))  # as the engine's own processor
    if start_engine is not None:
        engine = start_engine(config)
    elif args.engine_process:
        engine = AsyncEngine.in_process(config, args.max_concurrent_requests, args.max_queue, args.log_level)
    else:
        engine = AsyncEngine.in_thread(LLMEngine(config), args.max_concurrent_requests, args.max_queue)
    if args.reasoning_parser == "auto":
        reasoning = engine.model_config.processor_kind in GLM_FAMILIES
    else:
        reasoning = args.reasoning_parser == "glm"
    tool_parser = {"auto": detect_parser(processor.chat_template), "none": None}.get(args.tool_call_parser,
                                                                                       args.tool_call_parser)  # fmt: skip
    for warning in policy.warnings():
        logging.getLogger("glimpse.server").warning(warning)
    return ServerState(
        engine=engine, processor=processor,
        model_name=args.served_model_name or (model_arg or "glimpse-demo"), policy=policy, api_key=api_key,
        max_request_bytes=parse_bytes(args.max_request_bytes, "--max-request-bytes"),
        request_timeout=args.request_timeout, body_read_timeout=args.body_read_timeout, max_n=args.max_n,
        allowed_hosts=hosts, pixel_budget=PixelBudget(decoding_pixels, args.max_queue),
        reasoning=reasoning,
        template_kwargs=template_variables(processor.chat_template), preprocess_workers=args.preprocess_workers,
        sampling_defaults=(engine.model_config.generation_defaults if generation_defaults is None
                           else generation_defaults),
        mm_processor_kwargs=mm_defaults, cors=cors, tool_parser=tool_parser,
        tool_tags_special=call_tags_are_special(processor.tokenizer),
        structured_limits=StructuredLimits(config.structured_output_max_bytes, config.structured_output_max_depth,
                                           config.structured_output_compile_timeout))  # fmt: skip


def bind_problem(host: str, port: int) -> tuple[str, int] | None:
    """Why uvicorn could not listen on host:port, as (message, exit status), or None if it can.

    Binds and closes a socket for each address of `host` the way uvicorn's server does (asyncio's
    create_server: SO_REUSEADDR, IPv6 sockets v6-only), so that a port in use is reported at once
    rather than after the model has loaded (minutes on a real checkpoint)."""
    if not 0 <= port <= 65535:
        return f"--port must be in 0..65535, got {port}", 2
    try:
        addresses = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return f"--host {host!r} is not an address or a name this machine resolves ({exc.strerror})", 2
    for family, kind, proto, _, address in addresses:
        try:
            sock = socket.socket(family, kind, proto)
        except OSError:  # a family this machine lacks: asyncio skips it too
            continue
        with sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    return f"port {port} on {host} is in use (pick another with --port)", 1
                if exc.errno == errno.EACCES:
                    return (f"no permission to listen on port {port} on {host}: ports below 1024 need root "
                            "(pick another with --port)", 1)  # fmt: skip
                if exc.errno == errno.EADDRNOTAVAIL:
                    return f"{host} is not an address of this machine (pick another with --host)", 2
                return f"cannot listen on port {port} on {host}: {exc.strerror or exc} (see --host and --port)", 1
    return None


def _stop_starting(sig: int, frame) -> None:
    """SIGTERM before the server runs: unwind (the core is stopped on the way) and exit 0, as a drained stop does."""
    raise SystemExit(0)


def run(args: argparse.Namespace, start_engine: Callable | None = None, wrap_app: Callable | None = None) -> int:
    """`start_engine(config)` -> the AsyncEngine (default: the engine core) and `wrap_app(state, app)` -> the ASGI
    app (default: build_app's) are `glimpse serve-ray`'s two hooks (glimpse/server/ray_serve.py)."""
    import uvicorn

    from glimpse.entrypoints import DEMO_BANNER
    from glimpse.server.app import Server, build_app
    from glimpse.server.guard import h11_with_head_deadline

    try:
        model = model_argument(args)
    except InvalidInputError as exc:
        print(f"glimpse: error: {exc}", file=sys.stderr)
        return 2
    problem = bind_problem(args.host, args.port)
    if problem is not None:
        print(f"glimpse: error: {problem[0]}", file=sys.stderr)
        return problem[1]
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    if model is None:
        from glimpse.llm import demo_checkpoint

        print(DEMO_BANNER.format(path=demo_checkpoint()), file=sys.stderr)
    signal.signal(signal.SIGTERM, _stop_starting)  # until the server's own handlers take over (Server)
    try:
        state = build_state(args, start_engine)
    except InvalidInputError as exc:  # a flag value (the engine's too, e.g. a KV cache too small for --max-model-len)
        print(f"glimpse: error: {exc}", file=sys.stderr)
        return 2
    except GlimpseError as exc:  # a checkpoint or file that does not load (EngineStartError: the core's own error)
        print(f"glimpse: error: {exc}", file=sys.stderr)
        return 1
    if args.host not in ("127.0.0.1", "::1", "localhost") and not state.api_key:
        logging.getLogger("glimpse.server").warning(
            "listening on %s without --api-key (or $%s): anyone who can reach this address can use the model",
            args.host, API_KEY_ENV)  # fmt: skip
    app = build_app(state) if wrap_app is None else wrap_app(state, build_app(state))
    server = Server(uvicorn.Config(
        app, host=args.host, port=args.port, log_level=args.uvicorn_log_level or args.log_level,
        lifespan="off",
        http=h11_with_head_deadline(args.body_read_timeout), timeout_graceful_shutdown=5,
        limit_concurrency=args.max_connections), state.engine, args.shutdown_timeout)  # fmt: skip
    core = f", engine core pid {state.engine.core_pid}" if state.engine.core_pid is not None else ""
    print(f"glimpse serve: {state.model_name} on http://{args.host}:{args.port} (max_model_len "
          f"{state.engine.max_model_len}{core})", flush=True)  # fmt: skip
    try:
        server.run()
    finally:
        state.engine.shutdown()
        state.pool.shutdown(wait=False, cancel_futures=True)
    return server.exit_status
