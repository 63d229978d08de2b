"""The `glimpse` command line: generate, chat, serve, bench, make-checkpoint."""

from __future__ import annotations

import argparse
import importlib
import sys

# bench name -> module exposing add_arguments(parser) and run(args)
BENCHES = {
    "rope-index": "glimpse.bench.rope_index",
    "preprocess": "glimpse.bench.preprocess",
    "throughput": "glimpse.bench.throughput",
    "serve": "glimpse.bench.serve",
    "compare": "glimpse.bench.compare",
    "offline-compare": "glimpse.bench.offline_compare",
    "mm-encoder": "glimpse.bench.mm_encoder",
    "kernels": "glimpse.bench.kernels",
}


def _make_checkpoint(args: argparse.Namespace) -> int:
    from glimpse.testing import make_checkpoint

    try:
        path = make_checkpoint(
            args.family, args.size, args.path, seed=args.seed, dtype=args.dtype, shards=args.shards,
            legacy_names=args.legacy_names, weights=not args.no_weights,
        )  # fmt: skip
    except ValueError as exc:  # a size the family does not have
        print(f"glimpse make-checkpoint: {exc}", file=sys.stderr)
        return 2
    if args.no_weights:
        print(f"wrote a {args.size} {args.family} checkpoint WITHOUT weights to {path} (serve it with --load-format dummy)")  # fmt: skip
    else:
        print(f"wrote a {args.size} {args.family} checkpoint with RANDOM weights to {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from glimpse.testing import FAMILIES, SIZES

    parser = argparse.ArgumentParser(prog="glimpse", description="Fast, exact inference for vision-language models")
    sub = parser.add_subparsers(dest="command", required=True)

    mk = sub.add_parser("make-checkpoint", help="write a small random HF checkpoint folder of a real architecture")
    mk.add_argument("family", choices=FAMILIES)
    mk.add_argument("path")
    mk.add_argument("--size", choices=SIZES, default="tiny")
    mk.add_argument("--seed", type=int, default=0)
    mk.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    mk.add_argument("--shards", type=int, default=1)
    mk.add_argument("--legacy-names", action="store_true", help="write the older model.*/visual.* tensor names")
    mk.add_argument("--no-weights", action="store_true",
                    help="config, tokenizer and processor files only, for --load-format dummy (e.g. --size 3b)")  # fmt: skip
    mk.set_defaults(func=_make_checkpoint)

    from glimpse.entrypoints import add_commands

    add_commands(sub)

    serve = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (docs/serving.md)")
    from glimpse.server import cli as serve_cli

    serve_cli.add_arguments(serve)
    serve.set_defaults(func=serve_cli.run)

    bench = sub.add_parser("bench", help="benchmarks: side-by-side runs that print a table, JSON and ratios")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    for name, module in BENCHES.items():
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError:
            continue
        p = bench_sub.add_parser(name, help=(mod.__doc__ or "").strip().splitlines()[0] if mod.__doc__ else None)
        mod.add_arguments(p)
        p.set_defaults(func=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result = args.func(args)
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
