"""`glimpse serve` end to end: a real server process on 127.0.0.1, driven by the real `openai` client.

References: HF transformers 5.23 (processor token counts, greedy generate, first-token logprobs)
on the same tiny checkpoint, and hand-worked token sequences forced with `logit_bias` (graded
biases plus a huge repetition penalty make greedy decoding emit a chosen run of distinct tokens).
`ServerProcess` is also used by test_server_bad_input.py and test_server_load.py.
"""

from __future__ import annotations

import base64
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch
from conftest import MEDIA
from hf_oracle import hf_inputs, hf_model, hf_processor, read_all_frames, rgb
from hypothesis import given, settings
from hypothesis import strategies as st

from glimpse.server.reasoning import GlmReasoningParser, parse_box

REPO = Path(__file__).resolve().parents[1]
API_KEY = "test-key-123"
MODEL = "tiny-glm"
EOS = 610  # <|endoftext|> of the factory's GLM tokenizer (checked in the fixture)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m glimpse.cli serve CHECKPOINT ...` on a free loopback port, stopped by `stop()`."""

    def __init__(self, checkpoint: Path, *args: str, api_key: str | None = None, timeout: float = 300.0,
                 env: dict[str, str] | None = None) -> None:  # fmt: skip
        self.port = free_port()
        self.checkpoint = checkpoint
        self.api_key = api_key
        self.log = tempfile.NamedTemporaryFile("w+", prefix="glimpse-serve-", suffix=".log", delete=False)
        if "--encoder-graph" not in args:  # compiling the encoder at every start would slow the suite
            args = (*args, "--encoder-graph", "off")
        cmd = [sys.executable, "-m", "glimpse.cli", "serve", str(checkpoint), "--port", str(self.port),
               "--log-level", "warning", "--served-model-name", MODEL, *args]  # fmt: skip
        if api_key:
            cmd += ["--api-key", api_key]
        env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        self.base = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"glimpse serve exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(self.base + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"glimpse serve did not become healthy within {timeout:g} s:\n{self.output()}")

    def output(self) -> str:
        """The server's log so far (also after stop(), which closes our handle on it)."""
        if not self.log.closed:
            self.log.flush()
        return Path(self.log.name).read_text(errors="replace")[-5000:]

    def client(self, **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base + "/v1", api_key=self.api_key or "none", max_retries=0, **kwargs)

    def async_client(self, **kwargs) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.base + "/v1", api_key=self.api_key or "none", max_retries=0, **kwargs)

    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def post(self, path: str, body=None, timeout: float = 60, **kwargs) -> httpx.Response:
        return httpx.post(self.base + path, json=body, headers=self.headers(), timeout=timeout, **kwargs)

    def metrics(self) -> dict[str, float]:
        """Samples of /metrics as {name: value}; labelled ones keyed as written, e.g. 'x{status="400"}'."""
        text = httpx.get(self.base + "/metrics", timeout=10).text
        out = {}
        for line in text.splitlines():
            m = re.fullmatch(r"([a-zA-Z_:][\w:]*(?:\{[^}]*\})?) ([-+\d.eE]+|NaN)", line)
            if m:
                out[m.group(1)] = float(m.group(2))
        return out

    def wait_idle(self, timeout: float = 30.0) -> dict[str, float]:
        """Poll /metrics until nothing runs and no KV block is held; returns the last reading."""
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            idle = (m["glimpse_num_requests_running"] == 0 and m["glimpse_num_requests_waiting"] == 0
                    and m["glimpse_kv_cache_blocks_used"] == 0 and m["glimpse_server_requests_in_flight"] == 0)  # fmt: skip
            if idle or time.monotonic() > deadline:
                return m
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()


def data_url(path: Path, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"


def forced_bias(token_ids: list[int], top: float = 100.0, gap: float = 5.0) -> dict[str, float]:
    """logit_bias making greedy decoding emit `token_ids` in order (with repetition_penalty=1e6).

    Bias falls by `gap` per position; once emitted, a token's logit is divided by the penalty
    (to ~0), so the next one wins. The tokens must be distinct and absent from the prompt.
    """
    assert len(set(token_ids)) == len(token_ids) and top - gap * (len(token_ids) - 1) > 0
    return {str(t): top - gap * i for i, t in enumerate(token_ids)}


FORCE = {"temperature": 0, "extra_body": {"repetition_penalty": 1e6}}


@pytest.fixture(scope="module")
def ckpt(tiny_checkpoint):
    return tiny_checkpoint("glm46v")


@pytest.fixture(scope="module")
def server(ckpt):
    srv = ServerProcess(ckpt, "--allowed-local-media-path", str(MEDIA), "--kv-cache-memory", "64MiB",
                        "--max-model-len", "4096", "--dtype", "float32", api_key=API_KEY)  # fmt: skip
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return server.client()


@pytest.fixture(scope="module")
def tok(ckpt):
    import transformers

    t = transformers.AutoTokenizer.from_pretrained(ckpt)
    assert t.convert_ids_to_tokens(EOS) == "<|endoftext|>"
    return t


def ids(tok, *pieces: str) -> list[int]:
    return [i for p in pieces for i in tok.encode(p, add_special_tokens=False)]


def user(*parts) -> list[dict]:
    content = [{"type": "text", "text": p} if isinstance(p, str) else p for p in parts]
    return [{"role": "user", "content": content}]


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def video_part(url: str) -> dict:
    return {"type": "video_url", "video_url": {"url": url}}


def stream_chat(client, **kwargs) -> tuple[list, dict]:
    """Run a streamed chat; returns (chunks, {index: {content, reasoning, boxes, finish}})."""
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    out: dict[int, dict] = {}
    for ch in chunks:
        for c in ch.choices:
            acc = out.setdefault(c.index, {"content": "", "reasoning": "", "boxes": [], "finish": None})
            acc["content"] += c.delta.content or ""
            acc["reasoning"] += getattr(c.delta, "reasoning_content", None) or ""
            acc["boxes"] += getattr(c.delta, "boxes", None) or []
            acc["finish"] = c.finish_reason or acc["finish"]
    return chunks, out


# ---- endpoints and access ----------------------------------------------------------------------
def test_health_models_and_metrics(server, client):
    assert httpx.get(server.base + "/health").json() == {"status": "ok"}
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    m = server.metrics()
    for name in ("glimpse_num_requests_running", "glimpse_num_requests_waiting", "glimpse_kv_cache_usage_ratio",
                 "glimpse_prefix_cache_hit_rate", "glimpse_encoder_cache_hit_rate", "glimpse_time_to_first_token_seconds_count",
                 "glimpse_time_per_output_token_seconds_count", "glimpse_e2e_request_latency_seconds_count",
                 "glimpse_encoder_seconds_count"):  # fmt: skip
        assert name in m, name


def test_api_key_is_required(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {API_KEY}"}):
        r = httpx.get(server.base + "/v1/models", headers=headers)
        assert r.status_code == 401
        assert r.json()["error"]["type"] == "authentication_error"
    bad = openai.OpenAI(base_url=server.base + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model=MODEL, messages=user("hi"), max_tokens=2)


# ---- parity with HF on images and videos --------------------------------------------------------
@pytest.fixture(scope="module")
def hf(ckpt):
    return hf_processor(ckpt), hf_model(ckpt)


def test_image_chat_matches_hf(client, hf, tok):
    proc, model = hf
    image = MEDIA / "images" / "rocket.jpg"
    ref = hf_inputs(proc, [{"type": "image"}, {"type": "text", "text": "What is this?"}], images=[rgb(image)])
    with torch.no_grad():
        gen = model.generate(**ref, max_new_tokens=6, do_sample=False)
        logits = model(**ref).logits[0, -1]
    new = gen[0, ref["input_ids"].shape[1] :].tolist()
    hf_text = tok.decode(new, skip_special_tokens=True)
    assert not re.search(r"<think>|</think>|<answer>|</answer>|<\|(begin|end)_of_box\|>", hf_text)  # precondition

    r = client.chat.completions.create(model=MODEL, messages=user(image_part(data_url(image, "image/jpeg")), "What is this?"),
                                       max_tokens=6, temperature=0, logprobs=True, top_logprobs=5)  # fmt: skip
    choice = r.choices[0]
    assert choice.message.content == hf_text
    assert r.usage.prompt_tokens == ref["input_ids"].shape[1]
    assert r.usage.completion_tokens == len(new)
    grid = ref["image_grid_thw"][0].tolist()
    details = r.usage.prompt_tokens_details
    assert details.image_tokens == grid[0] * grid[1] * grid[2] // 4
    assert details.media == [{"type": "image", "tokens": details.image_tokens, "grid_thw": grid}]
    # First-token logprobs against HF's log-softmax. Tolerance: float32 CPU kernels sum in a
    # different order (paged attention vs HF eager), which moves logits by ~1e-5.
    ref_lp = torch.log_softmax(logits.float(), -1)
    top = ref_lp.topk(5)
    got = choice.logprobs.content[0]
    assert got.logprob == pytest.approx(ref_lp[new[0]].item(), abs=1e-3)
    assert [t.logprob for t in got.top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-3)
    for entry, token_id in zip(got.top_logprobs, top.indices.tolist(), strict=True):
        alone = tok.decode([token_id])
        if "\ufffd" not in alone:  # a token holding part of a character has no text of its own
            assert bytes(entry.bytes) == alone.encode() and entry.token == alone
    # The tokens' bytes concatenate to the answer.
    assert b"".join(bytes(t.bytes) for t in choice.logprobs.content).decode(errors="replace") == hf_text


def test_file_url_equals_data_url(client):
    image = MEDIA / "images" / "chelsea.png"
    a = client.chat.completions.create(model=MODEL, messages=user(image_part(f"file://{image}"), "Cat?"), max_tokens=5,
                                       temperature=0)  # fmt: skip
    b = client.chat.completions.create(model=MODEL, messages=user(image_part(data_url(image, "image/png")), "Cat?"),
                                       max_tokens=5, temperature=0)  # fmt: skip
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.usage.prompt_tokens == b.usage.prompt_tokens
    assert a.usage.prompt_tokens_details.media == b.usage.prompt_tokens_details.media


@pytest.mark.parametrize("name", ["coffee_15frames_10fps.webm", "hubble_pan_24fps.mp4"])
def test_video_chat_usage_matches_hf(client, hf, name):
    proc, _ = hf
    video = MEDIA / "videos" / name
    ref = hf_inputs(proc, [{"type": "video"}, {"type": "text", "text": "Describe."}], videos=[read_all_frames(video)])
    r = client.chat.completions.create(model=MODEL, messages=user(video_part(f"file://{video}"), "Describe."),
                                       max_tokens=3, temperature=0)  # fmt: skip
    assert r.usage.prompt_tokens == ref["input_ids"].shape[1]
    grid = ref["video_grid_thw"][0].tolist()
    media = r.usage.prompt_tokens_details.media
    assert len(media) == 1 and media[0]["type"] == "video" and media[0]["grid_thw"] == grid
    assert media[0]["tokens"] == r.usage.prompt_tokens_details.video_tokens == grid[0] * grid[1] * grid[2] // 4
    assert len(media[0]["timestamps"]) == grid[0]


def test_mm_processor_kwargs_max_pixels_matches_hf(client, hf, ckpt):
    proc, _ = hf
    image = MEDIA / "images" / "coffee.png"
    lowest = json.loads((ckpt / "preprocessor_config.json").read_text())["size"]["shortest_edge"]
    size = {"shortest_edge": lowest, "longest_edge": 28 * 28 * 20}
    ref = hf_inputs(proc, [{"type": "image"}, {"type": "text", "text": "Hm"}], images=[rgb(image)], size=size)
    default = hf_inputs(proc, [{"type": "image"}, {"type": "text", "text": "Hm"}], images=[rgb(image)])
    assert ref["input_ids"].shape[1] < default["input_ids"].shape[1]  # the knob matters here
    r = client.chat.completions.create(model=MODEL, messages=user(image_part(f"file://{image}"), "Hm"), max_tokens=2,
                                       extra_body={"mm_processor_kwargs": {"max_pixels": size["longest_edge"]}})  # fmt: skip
    assert r.usage.prompt_tokens == ref["input_ids"].shape[1]
    assert r.usage.prompt_tokens_details.media[0]["grid_thw"] == ref["image_grid_thw"][0].tolist()


def test_enable_thinking_follows_the_template(client, hf):
    proc, _ = hf
    for flag in (True, False):
        text = proc.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "Think?"}]}],
                                        add_generation_prompt=True, tokenize=False, enable_thinking=flag)  # fmt: skip
        want = len(proc.tokenizer.encode(text, add_special_tokens=False))
        r = client.chat.completions.create(model=MODEL, messages=user("Think?"), max_tokens=1,
                                           extra_body={"chat_template_kwargs": {"enable_thinking": flag}})  # fmt: skip
        assert r.usage.prompt_tokens == want
    assert "/nothink" in text and text.endswith("<think></think>\n")


# ---- streaming equals non-streaming ------------------------------------------------------------------
def test_stream_equals_non_stream_with_usage(server, client):
    msgs = user(image_part(f"file://{MEDIA / 'images' / 'astronaut.png'}"), "Who?")
    full = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=12, temperature=0)
    chunks, out = stream_chat(client, model=MODEL, messages=msgs, max_tokens=12, temperature=0,
                              stream_options={"include_usage": True})  # fmt: skip
    assert out[0]["content"] + out[0]["reasoning"] == (full.choices[0].message.content or "") + (
        full.choices[0].message.reasoning_content or "")  # fmt: skip
    assert out[0]["content"] == full.choices[0].message.content
    assert out[0]["finish"] == full.choices[0].finish_reason
    assert chunks[0].choices[0].delta.role == "assistant"
    usage = chunks[-1].usage.model_dump()
    want = full.usage.model_dump()
    for u in (usage, want):  # the second run finds the first one's prompt in the prefix cache
        u["prompt_tokens_details"].pop("cached_tokens")
    assert chunks[-1].choices == [] and usage == want
    assert all(c.usage is None for c in chunks[:-1])
    # The raw wire format: `data: {json}\n\n` events, ending with `data: [DONE]`.
    body = {"model": MODEL, "messages": msgs, "max_tokens": 3, "stream": True}
    with httpx.stream("POST", server.base + "/v1/chat/completions", json=body, headers=server.headers()) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    for e in events[:-2]:
        assert e.startswith("data: ") and json.loads(e[len("data: ") :])["object"] == "chat.completion.chunk"



def http_chunks(server, path: str, body: dict) -> list[bytes]:
    """POST over a plain socket and return the response body's HTTP/1.1 chunks as the server framed them (one
    chunk per write the server made; httpx and the openai client join them)."""
    data = json.dumps(body).encode()
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {server.api_key}\r\nContent-Length: {len(data)}\r\nConnection: close\r\n\r\n")
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as sock:
        sock.sendall(head.encode() + data)
        raw = b""
        while piece := sock.recv(1 << 16):
            raw += piece
    headers, _, rest = raw.partition(b"\r\n\r\n")
    assert b"transfer-encoding: chunked" in headers.lower(), headers
    chunks = []
    while True:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            return chunks
        chunks.append(rest[:size])
        assert rest[size : size + 2] == b"\r\n"
        rest = rest[size + 2 :]


def test_stream_writes_each_step_once_and_the_end_together(server):
    # A write per SSE event is a system call and a wake-up of the client on the cores the engine computes on:
    # the role chunk goes out alone, then one write per engine step, and the last step's content and finish
    # chunks leave in one write with the usage chunk and [DONE] (OpenAI's wire format is unchanged).
    body = {"model": MODEL, "messages": user("Count."), "max_tokens": 6, "ignore_eos": True, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    chunks = http_chunks(server, "/v1/chat/completions", body)
    events = [[e for e in c.decode().split("\n\n") if e] for c in chunks]
    for group in events:  # every write holds whole events
        assert all(e.startswith("data: ") for e in group) and chunks[events.index(group)].endswith(b"\n\n")
    role = json.loads(events[0][0][len("data: ") :])
    assert len(events[0]) == 1 and role["choices"][0]["delta"]["role"] == "assistant"
    last = events[-1]
    assert last[-1] == "data: [DONE]"
    usage, finish = (json.loads(e[len("data: ") :]) for e in last[-2:-4:-1])
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 6
    assert finish["choices"][0]["finish_reason"] == "length"
    # At most one write per generated token besides the role chunk's (fewer if the reader fell behind).
    assert len(chunks) <= 1 + 6
    texts = [json.loads(e[len("data: ") :]) for group in events for e in group if e != "data: [DONE]"]
    assert sum(len(t["choices"]) and bool(t["choices"][0]["delta"].get("content")) for t in texts) >= 1

def test_multibyte_characters_split_across_tokens(client, tok):
    seq = ids(tok, "猫", "😀")
    assert len(seq) == 7  # 3 + 4 byte-level tokens: both characters are split across tokens
    kwargs = dict(model=MODEL, messages=user("Look."), max_tokens=12, logit_bias=forced_bias(seq + [EOS]), **FORCE)
    full = client.chat.completions.create(**kwargs)
    assert full.choices[0].message.content == "猫😀"
    assert full.choices[0].finish_reason == "stop" and full.usage.completion_tokens == 8
    chunks, out = stream_chat(client, **kwargs)
    assert out[0]["content"] == "猫😀"
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) >= 2 and not any("\ufffd" in p for p in pieces)


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_spanning_tokens(client, tok, include):
    seq = ids(tok, " ca", " do", "g")
    assert tok.decode(seq) == " ca dog"
    extra = {"repetition_penalty": 1e6, "include_stop_str_in_output": include}
    kwargs = dict(model=MODEL, messages=user("Look."), max_tokens=8, temperature=0, stop=["a d"],
                  logit_bias=forced_bias(seq + [EOS]), extra_body=extra)  # fmt: skip
    full = client.chat.completions.create(**kwargs)
    want = " ca d" if include else " c"  # "a d" spans the tokens " ca" and " do"
    assert full.choices[0].message.content == want
    assert full.choices[0].finish_reason == "stop" and full.choices[0].model_extra["stop_reason"] == "a d"
    _, out = stream_chat(client, **kwargs)
    assert out[0]["content"] == want and out[0]["finish"] == "stop"


def test_stop_token_ids_and_max_tokens(client, tok):
    seq = ids(tok, " ca", " do", "g")
    r = client.chat.completions.create(model=MODEL, messages=user("Look."), max_tokens=8, temperature=0,
                                       logit_bias=forced_bias(seq + [EOS]),
                                       extra_body={"repetition_penalty": 1e6, "stop_token_ids": [seq[1]]})  # fmt: skip
    assert r.choices[0].finish_reason == "stop" and r.choices[0].model_extra["stop_reason"] == seq[1]
    assert r.usage.completion_tokens == 2
    r = client.chat.completions.create(model=MODEL, messages=user("Look."), max_completion_tokens=2,
                                       temperature=0, logit_bias=forced_bias(seq + [EOS]),
                                       extra_body={"repetition_penalty": 1e6})  # fmt: skip
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 2
    assert r.choices[0].message.content == " ca do"
    # ignore_eos: EOS is forced first, yet generation runs to max_tokens.
    r = client.chat.completions.create(model=MODEL, messages=user("Look."), max_tokens=3, temperature=0,
                                       logit_bias={str(EOS): 100}, extra_body={"ignore_eos": True})  # fmt: skip
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3


def test_generation_config_defaults_fill_unset_fields(client, ckpt):
    """As vLLM's --generation-config auto: unset sampling fields come from generation_config.json."""
    gen = json.loads((ckpt / "generation_config.json").read_text())
    assert gen["top_p"] < 1e-3  # the factory's GLM config, like the real one, samples near-greedily
    kwargs = dict(model=MODEL, messages=user("Tell me a story."), max_tokens=8, temperature=1.0, n=3,
                  extra_body={"ignore_eos": True})  # fmt: skip
    r = client.chat.completions.create(seed=5, **kwargs)
    greedy = client.chat.completions.create(model=MODEL, messages=user("Tell me a story."), max_tokens=8,
                                            temperature=0, extra_body={"ignore_eos": True})  # fmt: skip
    assert {ch.message.content for ch in r.choices} == {greedy.choices[0].message.content}


def test_n_and_seed(client):
    # top_p/top_k given explicitly: unset, they would come from generation_config.json (top_p 1e-4).
    kwargs = dict(model=MODEL, messages=user("Tell me a story."), max_tokens=10, temperature=1.0, top_p=1.0, n=3,
                  extra_body={"ignore_eos": True, "top_k": -1})  # fmt: skip
    a = client.chat.completions.create(seed=1234, **kwargs)
    b = client.chat.completions.create(seed=1234, **kwargs)
    c = client.chat.completions.create(seed=99, **kwargs)
    texts = lambda r: [ch.message.content for ch in sorted(r.choices, key=lambda ch: ch.index)]  # noqa: E731
    assert [ch.index for ch in sorted(a.choices, key=lambda ch: ch.index)] == [0, 1, 2]
    assert texts(a) == texts(b)  # same seed, same samples
    assert texts(a) != texts(c)
    assert len(set(texts(a))) > 1  # each of the n samples draws its own stream (seed + index)
    assert a.usage.completion_tokens == 30
    _, streamed = stream_chat(client, seed=1234, **kwargs)
    assert [streamed[i]["content"] for i in range(3)] == texts(a)


# ---- reasoning and boxes -----------------------------------------------------------------------
def test_reasoning_and_boxes_end_to_end(client, tok):
    pieces = ["<think>", " do", "</think>", " ca", "<|begin_of_box|>", "[", "1", "2", ",", "3", "4", " ", "5", "6",
              "\t", "7", "8", "]", "<|end_of_box|>"]  # fmt: skip
    seq = ids(tok, *pieces)
    assert len(seq) == len(pieces)  # every tag is one token
    kwargs = dict(model=MODEL, messages=user("Where is it?"), max_tokens=len(seq), logit_bias=forced_bias(seq),
                  logprobs=True, **FORCE)  # fmt: skip
    full = client.chat.completions.create(**kwargs)
    # The run really was forced (the tokens, via their bytes), so the expectations below are hand-worked.
    assert [bytes(t.bytes) for t in full.choices[0].logprobs.content] == [p.encode() for p in pieces]
    msg = full.choices[0].message
    assert msg.reasoning_content == " do"
    assert msg.content == " ca[12,34 56\t78]"
    assert msg.model_extra["boxes"] == [{"text": "[12,34 56\t78]", "coordinates": [[12, 34, 56, 78]]}]
    chunks, out = stream_chat(client, **kwargs)
    assert out[0] == {"content": msg.content, "reasoning": " do", "boxes": msg.model_extra["boxes"], "finish": "length"}
    for ch in chunks:
        for c in ch.choices:
            for text in (c.delta.content, getattr(c.delta, "reasoning_content", None)):
                assert not re.search(r"<|>", text or "")  # no tag, or piece of one, ever leaks


def test_reasoning_opened_by_the_prompt(client, tok):
    """An assistant turn ending in `<think>` (continue_final_message): the output starts inside reasoning.

    The same forced tokens after a normal prompt are plain content. (`</think>` cannot be forced
    here: the GLM template already put it in the prompt, where the repetition penalty kills it;
    closing is covered by the test above.)
    """
    seq = ids(tok, " do", " ca")
    common = dict(model=MODEL, max_tokens=2, temperature=0, logit_bias=forced_bias(seq))
    opened = user("Go.") + [{"role": "assistant", "content": "<think>"}]
    extra = {"repetition_penalty": 1e6, "add_generation_prompt": False, "continue_final_message": True}
    full = client.chat.completions.create(messages=opened, extra_body=extra, **common)
    assert (full.choices[0].message.reasoning_content, full.choices[0].message.content) == (" do ca", "")
    _, out = stream_chat(client, messages=opened, extra_body=extra, **common)
    assert (out[0]["reasoning"], out[0]["content"]) == (" do ca", "")
    plain = client.chat.completions.create(messages=user("Go."), extra_body={"repetition_penalty": 1e6}, **common)
    assert (plain.choices[0].message.reasoning_content, plain.choices[0].message.content) == (None, " do ca")


# ---- completions ------------------------------------------------------------------------------------
def test_completions_endpoint(client, tok):
    full = client.completions.create(model=MODEL, prompt="Hello world", max_tokens=8, temperature=0, logprobs=2)
    text = full.choices[0].text
    streamed = list(client.completions.create(model=MODEL, prompt="Hello world", max_tokens=8, temperature=0,
                                              stream=True, stream_options={"include_usage": True}))  # fmt: skip
    assert "".join(c.choices[0].text for c in streamed if c.choices) == text
    assert streamed[-1].usage.completion_tokens == full.usage.completion_tokens == 8
    lp = full.choices[0].logprobs
    assert len(lp.tokens) == 8 and all(len(t) == 2 for t in lp.top_logprobs)
    prompt_ids = tok.encode("Hello world", add_special_tokens=False)
    assert full.usage.prompt_tokens == len(prompt_ids)
    by_ids = client.completions.create(model=MODEL, prompt=prompt_ids, max_tokens=8, temperature=0)
    assert by_ids.choices[0].text == text
    other = client.completions.create(model=MODEL, prompt="Red cat", max_tokens=8, temperature=0)
    batch = client.completions.create(model=MODEL, prompt=["Hello world", "Red cat"], max_tokens=8, temperature=0)
    assert [c.index for c in batch.choices] == [0, 1]
    assert [c.text for c in batch.choices] == [text, other.choices[0].text]
    assert batch.usage.prompt_tokens == full.usage.prompt_tokens + other.usage.prompt_tokens


def test_fields_that_do_not_change_output_are_accepted(client):
    r = client.chat.completions.create(model=MODEL, messages=user("hi"), max_tokens=2, user="u1",
                                       metadata={"k": "v"}, store=False, response_format={"type": "text"})  # fmt: skip
    assert r.choices[0].finish_reason == "length"
    for field, value in (("reasoning_effort", "high"),):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=MODEL, messages=user("hi"), max_tokens=2, extra_body={field: value})
        assert e.value.body["param"] == field and field in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=user("hi"), extra_body={"best_guess": 1})
    assert e.value.body["code"] == "unknown_field" and e.value.body["param"] == "best_guess"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=user("hi"), extra_body={"chat_template_kwargs": {"x": 1}})
    assert "enable_thinking" in e.value.body["message"]


# ---- the reasoning parser alone (no server) ------------------------------------------------------------
# Hand-worked splits: (output text, opened by prompt) -> (content, reasoning, box texts).
PARSER_CASES = [
    ("<think>abc</think><answer>The cat</answer>", False, ("The cat", "abc", [])),
    ("<think></think>\nHi", False, ("\nHi", "", [])),
    ("plain text, a < b > c", False, ("plain text, a < b > c", "", [])),
    ("why</think>because", True, ("because", "why", [])),
    ("still thinking", True, ("", "still thinking", [])),
    ("stray</think> close", False, ("stray close", "", [])),
    ("<think>x<think>y</think>z", False, ("z", "xy", [])),
    ("It is <|begin_of_box|>[1,2,3,4]<|end_of_box|>.", False, ("It is [1,2,3,4].", "", ["[1,2,3,4]"])),
    ("<think>a<|begin_of_box|>b<|end_of_box|></think>c", False, ("c", "ab", [])),
    ("<|begin_of_box|>B", False, ("B", "", ["B"])),
    ("ends with <thi", False, ("ends with <thi", "", [])),
    ("<|end_of_box|>x<answer>", False, ("x", "", [])),
]


@pytest.mark.parametrize("text, opened, want", PARSER_CASES)
def test_reasoning_parser_cases(text, opened, want):
    out = GlmReasoningParser(opened).parse(text)
    assert (out.content, out.reasoning, [b["text"] for b in out.boxes]) == want


@settings(max_examples=300, deadline=None, database=None)
@given(case=st.sampled_from(PARSER_CASES), cuts=st.lists(st.integers(0, 60), max_size=12))
def test_reasoning_parser_chunking_does_not_matter(case, cuts):
    """Fed in any pieces (tags split anywhere), the parser gives the hand-worked split, and no
    piece of a tag ever reaches content or reasoning."""
    text, opened, want = case
    bounds = sorted({min(c, len(text)) for c in cuts} | {0, len(text)})
    parser = GlmReasoningParser(opened)
    content = reasoning = ""
    boxes = []
    for a, b in zip(bounds, bounds[1:], strict=False):
        out = parser.feed(text[a:b])
        content, reasoning, boxes = content + out.content, reasoning + out.reasoning, boxes + out.boxes
    tail = parser.finish()
    assert (content + tail.content, reasoning + tail.reasoning, [b["text"] for b in boxes + tail.boxes]) == want


def test_parse_box_coordinates():
    assert parse_box("[[12, 34, 560, 1000]]")["coordinates"] == [[12, 34, 560, 1000]]
    assert parse_box("[1,2,3,4] and [5 6 7 8]")["coordinates"] == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert parse_box("[0.5,0.25]")["coordinates"] == [[0.5, 0.25]]
    assert parse_box("B")["coordinates"] == [] and parse_box("[1,2,3]")["coordinates"] == []


def test_default_compiled_encoder_serves_the_same_answers(ckpt, client):
    """`glimpse serve` defaults to the budget-batched compiled encoder; its answers equal the eager server's."""
    srv = ServerProcess(ckpt, "--allowed-local-media-path", str(MEDIA), "--kv-cache-memory", "64MiB",
                        "--max-model-len", "4096", "--dtype", "float32", "--encoder-graph", "on",
                        "--encoder-budgets", "64,256", "--max-num-batched-tokens", "256", api_key=API_KEY,
                        timeout=300.0)  # fmt: skip
    try:
        graph_client = srv.client()
        for name in ("rocket.jpg", "chelsea.png"):
            msgs = [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": f"file://{MEDIA / 'images' / name}"}},
                {"type": "text", "text": "Describe."}]}]  # fmt: skip
            kwargs = dict(model=MODEL, messages=msgs, max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
            a = client.chat.completions.create(**kwargs)
            b = graph_client.chat.completions.create(**kwargs)
            assert b.choices[0].message.content == a.choices[0].message.content
            assert b.usage.prompt_tokens == a.usage.prompt_tokens
    finally:
        srv.stop()
