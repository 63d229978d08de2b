"""One timed offline `LLM.chat` run of glimpse or vLLM; the worker of `glimpse bench offline-compare`.

Runs by path under either engine's python (it imports neither glimpse nor vLLM until told which),
so it depends on numpy and PIL only. Builds N chat requests from the seed, each one fresh random
HxW JPEG (a data URL: the form both engines' `LLM.chat` accept) and ~`--input-len` random words;
loads the engine (timed apart), runs one untimed warm-up request from another seed, then times
`llm.chat` on the N requests (greedy, `--output-len` tokens with ignore_eos) and prints one JSON
line: engine, seconds, output_tokens (counted from the outputs), output_tok_s, load_seconds.
`--batches K` times K such calls back to back, each on N fresh requests (the offline ceiling of a
closed-loop served round, `glimpse bench compare --offline-ceiling`); batch_tok_s holds each one's rate.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import sys
import time

import numpy as np

# Short common words: each is usually one token, so N words ~ N prompt tokens. Defined here rather
# than in glimpse.bench.serve (which imports it) because this file must run under vLLM's python,
# where glimpse is not installed.
WORDS = (
    "the of and to in is was for on that with as by at from his her are be this have not but had "
    "they you were which their one all we can there been has an more when will would who so if out "
    "no what up into them time only new some could these two may then do first any my now such like "
    "our over man me even most made after also did many before must through back years where much "
    "your way well down should because each just those people how too little state good very make"
).split()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--engine", required=True, choices=("glimpse", "vllm"))
    p.add_argument("--model", required=True, help="checkpoint folder")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--input-len", type=int, default=64, help="prompt words besides the image")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--load-format", default="auto", choices=("auto", "dummy"))
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--kv-cache-gib", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batches", type=int, default=1, help="timed LLM.chat calls, each on its own fresh requests")
    args = p.parse_args(argv)
    if args.requests < 1 or args.batches < 1:
        p.error(f"--requests and --batches must be >= 1 (got {args.requests}, {args.batches})")
    return args


def conversations(n: int, seed: list[int], image_size: int, input_words: int) -> list[list[dict]]:
    """n one-message chats: a random-pixel JPEG data URL, then `input_words` random words."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        pixels = rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
        url = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
        text = " ".join(rng.choice(WORDS, size=input_words))
        out.append([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                 {"type": "text", "text": text}]}])  # fmt: skip
    return out


def load(args: argparse.Namespace):
    """(llm, sampling params class) for the engine; threads and KV size go in before it is imported."""
    if args.engine == "vllm":
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(args.kv_cache_gib)
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = f"0-{args.threads - 1}"
        from vllm import LLM, SamplingParams

        llm = LLM(model=args.model, dtype=args.dtype, max_model_len=args.max_model_len,
                  max_num_seqs=args.max_num_seqs, load_format=args.load_format, seed=args.seed,
                  limit_mm_per_prompt={"image": 1, "video": 0})  # fmt: skip
        return llm, SamplingParams
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch

    from glimpse import LLM
    from glimpse.engine.sampling_params import SamplingParams

    torch.set_num_threads(args.threads)
    llm = LLM(model=args.model, dtype=args.dtype, max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
              kv_cache_memory=f"{args.kv_cache_gib}GiB", load_format=args.load_format, seed=args.seed)  # fmt: skip
    return llm, SamplingParams


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Inputs first, outside every timer: JPEG encoding is the harness's work, not the engine's.
    batches = [conversations(args.requests, [args.seed, 0, *([b] if b else [])], args.image_size, args.input_len)
               for b in range(args.batches)]  # fmt: skip
    warm = conversations(1, [args.seed, 1], args.image_size, args.input_len)
    t0 = time.perf_counter()
    llm, sampling_params = load(args)
    load_seconds = time.perf_counter() - t0
    params = sampling_params(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)
    llm.chat(warm, params, use_tqdm=False)
    seconds, tokens, prompt_tokens, rates = 0.0, 0, 0, []
    for chats in batches:
        t0 = time.perf_counter()
        outputs = llm.chat(chats, params, use_tqdm=False)
        took = time.perf_counter() - t0
        made = sum(len(c.token_ids) for out in outputs for c in out.outputs)
        seconds, tokens = seconds + took, tokens + made
        rates.append(made / took)
        prompt_tokens += sum(len(o.prompt_token_ids) for o in outputs)
    result = {"engine": args.engine, "requests": len(outputs), "seconds": seconds, "output_tokens": tokens,
              "output_tok_s": tokens / seconds, "prompt_tokens": prompt_tokens, "load_seconds": load_seconds,
              "seed": args.seed, "batches": args.batches, "batch_tok_s": rates}  # fmt: skip
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":  # vLLM spawns its engine process, which re-imports this file
    sys.exit(main())
