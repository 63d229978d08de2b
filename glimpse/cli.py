"""The `glimpse` command line: generate, chat, serve, serve-ray, bench, make-checkpoint.

argv -> one subcommand's handler -> exit status. Building the parser imports no torch or
transformers (the bench modules load only when their bench is named), so `--help`, `--version` and
usage errors answer at once. User mistakes end in one `glimpse: error: ...` line: exit 2 for flags
and their values, 1 for files, checkpoints and failures while running.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

import glimpse
from glimpse.entrypoints import UsageError, add_commands
from glimpse.errors import GlimpseError

# bench name -> (module exposing add_arguments(parser) and run(args), one-line help)
BENCHES = {
    "rope-index": ("glimpse.bench.rope_index", "M-RoPE prompt positions, glimpse vs HF transformers' get_rope_index"),
    "preprocess": ("glimpse.bench.preprocess", "media loading and preprocessing against naive decoding and HF"),
    "throughput": ("glimpse.bench.throughput", "offline throughput against HF generate, and batch-1 decode speed"),
    "serve": ("glimpse.bench.serve", "load-test an OpenAI-compatible chat endpoint with random images and videos"),
    "compare": ("glimpse.bench.compare", "glimpse and another OpenAI-compatible server (e.g. vLLM), side by side"),
    "offline-compare": ("glimpse.bench.offline_compare", "glimpse's offline LLM.chat against vLLM's, side by side"),
    "mm-encoder": ("glimpse.bench.mm_encoder", "vision-encoder latency, captured graphs vs eager"),
    "kernels": ("glimpse.bench.kernels", "the native CPU kernels against torch's, side by side"),
    "startup": ("glimpse.bench.startup", "seconds to glimpse --help and to the first token of glimpse generate, cold and warm"),
    "structured": ("glimpse.bench.structured", "decode throughput with a JSON schema per request against none, side by side"),
    "tensor-parallel": ("glimpse.bench.tensor_parallel", "tp=1 against tp=2: collectives per decode step, and each rank's memory"),
}
# The checkpoint factory's choices (glimpse.testing imports torch); tests/test_cli_usage.py keeps them equal.
FAMILIES = ("glm4v", "glm46v", "glm46v_flash", "glmga", "glm4v_moe", "glm46v_moe", "glm_ocr", "qwen2_5_vl")
SIZES = ("tiny", "small", "medium", "3b")


class Parser(argparse.ArgumentParser):
    """Errors as `glimpse: error: ...` after the usage of the (sub)command that failed."""

    def error(self, message: str):
        self.print_usage(sys.stderr)
        self.exit(2, f"glimpse: error: {message}\n")


class SubParser(Parser):
    """A subcommand's parser refuses unknown flags itself; argparse would hand them to the top-level parser,
    whose error shows the top-level usage instead of this command's."""

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return namespace, extras


class BenchParser(SubParser):
    """A bench's parser: its module (and its flags) load only when this bench is the one being run."""

    def __init__(self, *args, module: str, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.module, self.loaded = module, False

    def parse_known_args(self, args=None, namespace=None):
        if not self.loaded:
            try:
                mod = importlib.import_module(self.module)
            except ModuleNotFoundError as exc:  # an optional dependency of this bench
                self.exit(1, f"glimpse: error: {self.prog} needs the Python module {exc.name}; install it\n")
            self.loaded = True
            self.description = mod.__doc__
            self.formatter_class = argparse.RawDescriptionHelpFormatter
            mod.add_arguments(self)
            self.set_defaults(func=mod.run)
        return super().parse_known_args(args, namespace)


def _make_checkpoint(args: argparse.Namespace) -> int:
    path = Path(args.path)
    if path.exists() and not path.is_dir():
        raise GlimpseError(f"{path} is a file; make-checkpoint writes a folder")
    if path.is_dir() and any(path.iterdir()) and not args.force:
        raise GlimpseError(f"{path} is not empty; pass --force to write the checkpoint into it anyway")
    from glimpse.testing import make_checkpoint

    try:
        path = make_checkpoint(
            args.family, args.size, args.path, seed=args.seed, dtype=args.dtype, shards=args.shards,
            legacy_names=args.legacy_names, weights=not args.no_weights,
        )  # fmt: skip
    except ValueError as exc:  # a size the family does not have
        raise UsageError(str(exc)) from None
    if args.no_weights:
        print(f"wrote a {args.size} {args.family} checkpoint WITHOUT weights to {path} (serve it with --load-format dummy)")  # fmt: skip
    else:
        print(f"wrote a {args.size} {args.family} checkpoint with RANDOM weights to {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="glimpse", description="Fast, exact inference for vision-language models")
    parser.add_argument("--version", action="version", version=f"glimpse {glimpse.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=SubParser)

    mk = sub.add_parser("make-checkpoint", help="write a small random HF checkpoint folder of a real architecture",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    mk.add_argument("family", choices=FAMILIES)
    mk.add_argument("path", help="the folder to write (created; must be empty unless --force)")
    mk.add_argument("--size", choices=SIZES, default="tiny")
    mk.add_argument("--seed", type=int, default=0)
    mk.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    mk.add_argument("--shards", type=int, default=1)
    mk.add_argument("--legacy-names", action="store_true", help="write the older model.*/visual.* tensor names")
    mk.add_argument("--no-weights", action="store_true",
                    help="config, tokenizer and processor files only, for --load-format dummy (e.g. --size 3b)")  # fmt: skip
    mk.add_argument("--force", action="store_true",
                    help="write into a non-empty folder (same-named files are replaced, others kept)")
    mk.set_defaults(func=_make_checkpoint)

    add_commands(sub)

    serve = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (docs/serving.md)")
    from glimpse.server import cli as serve_cli

    serve_cli.add_arguments(serve)
    serve.set_defaults(func=serve_cli.run)

    serve_ray = sub.add_parser("serve-ray", help="glimpse serve with N engine replicas on Ray Serve behind one ingress, "
                                                 "routed by cached media and prefixes (docs/scaling.md)")  # fmt: skip
    from glimpse.server import ray_serve

    ray_serve.add_arguments(serve_ray)
    serve_ray.set_defaults(func=ray_serve.run)

    bench = sub.add_parser("bench", help="benchmarks: side-by-side runs that print a table, JSON and ratios")
    bench_sub = bench.add_subparsers(dest="bench", required=True, parser_class=BenchParser)
    for name, (module, help_line) in BENCHES.items():
        bench_sub.add_parser(name, help=help_line, module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        result = args.func(args)
    except UsageError as exc:
        print(f"glimpse: error: {exc}", file=sys.stderr)
        return 2
    except GlimpseError as exc:  # bad files, checkpoints (corrupt weights, unsupported family), media, prompts
        print(f"glimpse: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C while loading or generating
        print(file=sys.stderr)
        return 130
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
