"""vLLM's POST /tokenize and /detokenize against a real `glimpse serve` on 127.0.0.1.

For chat messages /tokenize must give the exact prompt a chat completion of them would run, media tokens
included, after the same preprocessing (fetch, resize, limits, media policy). References: HF transformers'
processor and tokenizer on the same checkpoint (token ids, lengths, token strings and decoded text), and a
real chat completion's `usage.prompt_tokens` for the same messages.
"""

from __future__ import annotations

import json

import httpx
import pytest
from conftest import IMAGES, VIDEOS
from hf_oracle import hf_inputs, hf_processor, read_all_frames, rgb
from test_server import API_KEY, MODEL, ServerProcess, data_url, image_part, user, video_part

MAX_MODEL_LEN = 4096
ROCKET = data_url(IMAGES / "rocket.jpg", "image/jpeg")


@pytest.fixture(scope="module")
def ckpt(tiny_checkpoint):
    return tiny_checkpoint("glm46v")


@pytest.fixture(scope="module")
def server(ckpt):
    srv = ServerProcess(ckpt, "--kv-cache-memory", "64MiB", "--max-model-len", str(MAX_MODEL_LEN), "--dtype", "float32",
                        "--limit-mm-per-prompt", '{"image": 2, "video": 1}', api_key=API_KEY)  # fmt: skip
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def proc(ckpt):
    return hf_processor(ckpt)


def ok(response: httpx.Response) -> dict:
    assert response.status_code == 200, response.text
    return response.json()


def error(response: httpx.Response, status: int, code: str, *words: str) -> dict:
    assert response.status_code == status, response.text
    err = response.json()["error"]
    assert err["code"] == code, err
    for word in words:
        assert word in err["message"], err
    return err


def completion_prompt_tokens(server, messages: list[dict], **extra) -> int:
    r = server.post("/v1/chat/completions", {"model": MODEL, "messages": messages, "max_tokens": 1, **extra})
    return ok(r)["usage"]["prompt_tokens"]


# ---- messages: the count a chat completion uses ----------------------------------------------------
def test_image_chat_count_is_the_completions_and_hfs(server, proc):
    messages = user(image_part(ROCKET), "What is this?")
    got = ok(server.post("/tokenize", {"model": MODEL, "messages": messages}))
    content = [{"type": "image"}, {"type": "text", "text": "What is this?"}]
    ref = hf_inputs(proc, content, images=[rgb(IMAGES / "rocket.jpg")])
    want = ref["input_ids"][0].tolist()
    grid = ref["image_grid_thw"][0].tolist()
    assert grid[0] * grid[1] * grid[2] // 4 > 10  # precondition: the image is most of the prompt
    assert got == {"count": len(want), "max_model_len": MAX_MODEL_LEN, "tokens": want, "token_strs": None}
    assert got["count"] == completion_prompt_tokens(server, messages)


def test_video_chat_count_is_the_completions_and_hfs(server, proc):
    video = VIDEOS / "coffee_15frames_10fps.webm"
    messages = user(video_part(data_url(video, "video/webm")), "Describe.")
    got = ok(server.post("/tokenize", {"messages": messages}))  # `model` is optional, as in vLLM
    ref = hf_inputs(proc, [{"type": "video"}, {"type": "text", "text": "Describe."}], videos=[read_all_frames(video)])
    assert got["tokens"] == ref["input_ids"][0].tolist()
    assert got["count"] == completion_prompt_tokens(server, messages)


def test_chat_options_change_the_count_as_they_change_the_completion(server, proc, ckpt):
    """mm_processor_kwargs resize the image and chat_template_kwargs change the template, in both routes alike."""
    lowest = json.loads((ckpt / "preprocessor_config.json").read_text())["size"]["shortest_edge"]
    size = {"shortest_edge": lowest, "longest_edge": 28 * 28 * 20}
    ref = hf_inputs(proc, [{"type": "image"}, {"type": "text", "text": "Hm"}], images=[rgb(IMAGES / "rocket.jpg")],
                    size=size)  # fmt: skip
    options = {"mm_processor_kwargs": {"max_pixels": size["longest_edge"]}}
    messages = user(image_part(ROCKET), "Hm")
    got = ok(server.post("/tokenize", {"messages": messages, **options}))
    assert got["tokens"] == ref["input_ids"][0].tolist()
    assert got["count"] == completion_prompt_tokens(server, messages, **options)

    text = proc.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "Think?"}]}],
                                    add_generation_prompt=True, tokenize=False, enable_thinking=False)  # fmt: skip
    options = {"chat_template_kwargs": {"enable_thinking": False}}
    got = ok(server.post("/tokenize", {"messages": user("Think?"), "return_token_strs": True, **options}))
    want = proc.tokenizer.encode(text, add_special_tokens=False)
    assert got["tokens"] == want and got["token_strs"] == proc.tokenizer.convert_ids_to_tokens(want)
    assert got["count"] == completion_prompt_tokens(server, user("Think?"), **options)
    no_prompt = ok(server.post("/tokenize", {"messages": user("Think?"), "add_generation_prompt": False, **options}))
    assert no_prompt["count"] < got["count"]


def test_chat_requests_meet_the_completions_limits_and_policy(server):
    for body, status, code, words in [
        ({"messages": user(*[image_part(ROCKET)] * 3, "Hi")}, 400, "limit_exceeded_error", ["--limit-mm-per-prompt"]),
        ({"messages": user(image_part("http://169.254.169.254/latest/meta-data/"))}, 400, "media_access_error",
         ["--allowed-media-domains"]),
        ({"messages": user(image_part("file:///etc/passwd"))}, 400, "media_access_error",
         ["--allowed-local-media-path"]),
        ({"messages": user(image_part(ROCKET)), "mm_processor_kwargs": {"max_pixels": 10**9}}, 400,
         "limit_exceeded_error", ["ceiling"]),
        ({"messages": user("Hi"), "chat_template_kwargs": {"not_in_template": 1}}, 400, "invalid_input_error",
         ["not_in_template"]),
        ({"messages": user("Hi"), "tools": [{"type": "function", "function": {"name": "f g"}}]}, 400,
         "invalid_value", ["tools[0].function.name"]),
    ]:  # fmt: skip
        r = server.post("/tokenize", body)
        error(r, status, code, *words)
        # The same body as a chat completion is refused the same way.
        same = server.post("/v1/chat/completions", {**body, "max_tokens": 1})
        assert same.status_code == status and same.json()["error"]["code"] == code, same.text


# ---- text prompts and detokenize -------------------------------------------------------------------
def test_text_prompt_is_the_tokenizers(server, proc):
    text = "Describe the rocket, then the sky: 火箭 ✓"
    tok = proc.tokenizer
    got = ok(server.post("/tokenize", {"model": MODEL, "prompt": text, "return_token_strs": True}))
    want = tok.encode(text, add_special_tokens=True)  # vLLM's default for a text prompt
    assert got == {"count": len(want), "max_model_len": MAX_MODEL_LEN, "tokens": want,
                   "token_strs": tok.convert_ids_to_tokens(want)}  # fmt: skip
    bare = ok(server.post("/tokenize", {"prompt": text, "add_special_tokens": False}))
    assert bare["tokens"] == tok.encode(text, add_special_tokens=False)
    # /v1/completions tokenizes a text prompt without special tokens: the same count.
    r = ok(server.post("/v1/completions", {"model": MODEL, "prompt": text, "max_tokens": 1}))
    assert r["usage"]["prompt_tokens"] == bare["count"]


def test_detokenize_is_the_tokenizers_decode(server, proc):
    tok = proc.tokenizer
    chat = ok(server.post("/tokenize", {"messages": user("Say 火箭 ✓")}))["tokens"]
    got = ok(server.post("/detokenize", {"model": MODEL, "tokens": chat}))
    assert got == {"prompt": tok.decode(chat, skip_special_tokens=False)}  # special tokens kept, as vLLM
    assert "<|user|>" in got["prompt"] and "火箭 ✓" in got["prompt"]
    assert ok(server.post("/detokenize", {"tokens": []})) == {"prompt": ""}


@pytest.mark.parametrize("where", [0, 2])
def test_detokenize_names_an_id_outside_the_vocabulary(server, proc, where):
    size = len(proc.tokenizer)
    for bad in (size, size + 10**6, -1):
        tokens = [5, 6, 7]
        tokens[where] = bad
        err = error(server.post("/detokenize", {"tokens": tokens}), 400, "invalid_value", f"tokens[{where}]", str(bad),
                    str(size - 1))  # fmt: skip
        assert err["param"] == "tokens"
    error(server.post("/detokenize", {"tokens": [5, "6"]}), 400, "invalid_value", "tokens.1")


# ---- access and bad bodies -----------------------------------------------------------------------------
def test_same_key_and_model_check_as_v1(server):
    for path, body in (("/tokenize", {"prompt": "hi"}), ("/tokenize", {"messages": user("hi")}),
                       ("/detokenize", {"tokens": [5]})):  # fmt: skip
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            r = httpx.post(server.base + path, json=body, headers=headers, timeout=30)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", r.text
        err = error(server.post(path, {**body, "model": "gpt-4o"}), 404, "model_not_found", "gpt-4o", MODEL)
        assert err["param"] == "model"


def test_bad_tokenize_bodies(server):
    error(server.post("/tokenize", {"model": MODEL}), 400, "invalid_value", "prompt", "messages")
    error(server.post("/tokenize", {"prompt": "hi", "messages": user("hi")}), 400, "invalid_value", "either")
    error(server.post("/tokenize", {"prompt": "hi", "max_tokens": 3}), 400, "unknown_field", "max_tokens")
    err = error(server.post("/tokenize", {"messages": user("hi"), "add_special_tokens": True}), 400, "invalid_value",
                "add_special_tokens")  # fmt: skip
    assert err["param"] == "add_special_tokens"


def test_openapi_lists_both_routes_with_their_bodies(server):
    schema = ok(httpx.get(server.base + "/openapi.json", headers=server.headers(), timeout=30))
    tokenize = schema["paths"]["/tokenize"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert tokenize == {"oneOf": [{"$ref": "#/components/schemas/TokenizeCompletionRequest"},
                                  {"$ref": "#/components/schemas/TokenizeChatRequest"}]}  # fmt: skip
    detokenize = schema["paths"]["/detokenize"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert set(schema["components"]["schemas"]["DetokenizeRequest"]["properties"]) == {"model", "tokens"}
    assert detokenize == {"$ref": "#/components/schemas/DetokenizeRequest"}
