"""A bounded load test of `glimpse serve` on loopback: 200 mixed requests from 32 concurrent clients, then 20 cancelled streams.

Reference: every job (its own question, after nothing, an image or a video; six variants) is
first run alone; under load every greedy answer must equal its solo answer (the engine is
batch-invariant), every job must get exactly one answer, and the KV pool must drain to zero.
Cancelled streams must free their blocks long before their 1000 tokens could have finished.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from test_server import MEDIA, MODEL, ServerProcess, data_url, image_part, user, video_part

N_REQUESTS = 200
N_CLIENTS = 32


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    srv = ServerProcess(tiny_checkpoint("glm46v"), "--allowed-local-media-path", str(MEDIA), "--dtype", "float32",
                        "--max-concurrent-requests", str(N_CLIENTS), "--max-queue", "64", "--max-num-seqs", "32",
                        "--kv-cache-memory", "128MiB", "--max-model-len", "2048")  # fmt: skip
    yield srv
    srv.stop()


VARIANTS = [
    [],
    [],
    [image_part(f"file://{MEDIA / 'images' / 'rocket.jpg'}")],
    [image_part(data_url(MEDIA / "images" / "chelsea.png", "image/png"))],
    [video_part(f"file://{MEDIA / 'videos' / 'coffee_15frames_10fps.webm'}")],
    [video_part(data_url(MEDIA / "videos" / "hubble_pan_24fps.mp4", "video/mp4"))],
]


def job(i: int) -> list[dict]:
    """Job i: a variant's media (if any) and a question of its own, so every prompt differs."""
    return user(*VARIANTS[i % len(VARIANTS)], f"Question {i}: what do you see, in {i % 7 + 1} words?")


async def _ask(client, messages, stream: bool) -> tuple[str, str, int]:
    """(response id, text, prompt tokens) of one greedy 8-token chat."""
    kwargs = dict(model=MODEL, messages=messages, max_tokens=8, temperature=0)
    if not stream:
        r = await client.chat.completions.create(**kwargs)
        return r.id, r.choices[0].message.content, r.usage.prompt_tokens
    text, rid, prompt_tokens = "", None, None
    async for chunk in await client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs):
        rid = chunk.id
        if chunk.usage is not None:
            prompt_tokens = chunk.usage.prompt_tokens
        for c in chunk.choices:
            text += c.delta.content or ""
    return rid, text, prompt_tokens


def test_200_mixed_requests_from_32_clients(server):
    async def main():
        client = server.async_client(timeout=300)
        solo = [await _ask(client, job(i), stream=False) for i in range(N_REQUESTS)]  # one at a time
        jobs: asyncio.Queue = asyncio.Queue()
        for i in range(N_REQUESTS):
            jobs.put_nowait(i)
        answers: dict[int, list[tuple[str, str, int]]] = {}

        async def worker() -> None:
            while True:
                try:
                    i = jobs.get_nowait()
                except asyncio.QueueEmpty:
                    return
                answers.setdefault(i, []).append(await _ask(client, job(i), stream=i % 2 == 1))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(N_CLIENTS)))
        return solo, answers, time.perf_counter() - start

    solo, answers, seconds = asyncio.run(main())
    assert sorted(answers) == list(range(N_REQUESTS))  # none lost
    assert all(len(a) == 1 for a in answers.values())  # none answered twice
    ids = [a[0][0] for a in answers.values()]
    assert len(set(ids)) == N_REQUESTS  # every answer is its own request
    for i, [(_, text, prompt_tokens)] in answers.items():
        _, want_text, want_tokens = solo[i]
        assert (text, prompt_tokens) == (want_text, want_tokens), f"job {i} (variant {i % len(VARIANTS)})"
    m = server.wait_idle()
    assert m["glimpse_kv_cache_blocks_used"] == 0 and m["glimpse_kv_cache_usage_ratio"] == 0
    assert m["glimpse_num_requests_running"] == 0 and m["glimpse_num_requests_waiting"] == 0
    assert m["glimpse_server_requests_in_flight"] == 0 and m["glimpse_server_requests_rejected_busy_total"] == 0
    assert m["glimpse_e2e_request_latency_seconds_count"] >= N_REQUESTS
    assert m["glimpse_prefix_cache_hit_rate"] > 0  # repeated prompts (media included) reuse their KV
    print(f"\n{N_REQUESTS} requests from {N_CLIENTS} clients in {seconds:.1f} s")


def test_cancelled_streams_free_their_blocks(server):
    n = 20
    before = server.metrics()

    async def main():
        client = server.async_client(timeout=300)
        streams = []
        for i in range(n):
            s = await client.chat.completions.create(model=MODEL, messages=user(f"Story number {i}."), max_tokens=1000,
                                                     temperature=1.0, seed=i, stream=True,
                                                     extra_body={"ignore_eos": True})  # fmt: skip
            streams.append(s)
        for s in streams:  # read a few tokens from each: all are running, holding KV blocks
            got = 0
            async for chunk in s:
                got += sum(bool(c.delta.content) for c in chunk.choices)
                if got >= 3:
                    break
        busy = server.metrics()
        for s in streams:
            await s.close()  # drops the connection mid-stream
        return busy, time.perf_counter()

    busy, closed_at = asyncio.run(main())
    assert busy["glimpse_kv_cache_blocks_used"] > 0 and busy["glimpse_num_requests_running"] > 0
    m = server.wait_idle(timeout=30)
    freed_after = time.perf_counter() - closed_at
    assert m["glimpse_kv_cache_blocks_used"] == 0 and m["glimpse_num_requests_running"] == 0
    assert m["glimpse_server_requests_in_flight"] == 0
    # 20 x 1000 tokens take well over 10 s here; the blocks came back because the requests were aborted.
    assert freed_after < 8, freed_after
    assert m["glimpse_request_aborted_total"] - before["glimpse_request_aborted_total"] == n
    finished = lambda mm: sum(v for k, v in mm.items() if k.startswith("glimpse_request_finished_total"))  # noqa: E731
    assert finished(m) == finished(before)  # none of them ran to its end
