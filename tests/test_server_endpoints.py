"""The endpoints vLLM users reach for, against a real `glimpse serve` on 127.0.0.1 and the real `openai` client:
GET /v1/models/{id} (an id that is a folder path), /version, /ping, /openapi.json and /docs behind the
API key, and OpenAI-shaped 404s for an unknown model or route. Then `glimpse serve`'s start-up errors:
a port in use reported before the model loads, bad flag values, and the demo checkpoint's banner.

References: the `openai` client's error classes (they parse OpenAI's error shape), the flags the server was
started with, the package metadata (importlib.metadata), OpenAPI's rule that every `$ref` resolves, and
`glimpse generate`'s own banner.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
from test_server import API_KEY, REPO, ServerProcess, free_port, user

MAX_MODEL_LEN = 4096
ERROR_KEYS = {"message", "type", "param", "code"}


@pytest.fixture(scope="module")
def ckpt(tiny_checkpoint) -> Path:
    return tiny_checkpoint("glm46v")


@pytest.fixture(scope="module")
def server(ckpt):
    # The model id is the checkpoint folder as given (glimpse serve's default id): an absolute path, slashes and all.
    srv = ServerProcess(ckpt, "--served-model-name", str(ckpt), "--kv-cache-memory", "64MiB",
                        "--max-model-len", str(MAX_MODEL_LEN), "--dtype", "float32", api_key=API_KEY)  # fmt: skip
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return server.client()


def openai_error(response: httpx.Response, status: int) -> dict:
    """The `error` object of an OpenAI-shaped error response (and nothing else in the body)."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == ERROR_KEYS, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]


# ---- models -------------------------------------------------------------------------------------
def test_models_list_and_retrieve_by_folder_path(server, client, ckpt):
    listed = client.models.list().data
    assert [m.id for m in listed] == [str(ckpt)]
    assert listed[0].max_model_len == MAX_MODEL_LEN  # vLLM's extra field, from --max-model-len
    got = client.models.retrieve(str(ckpt))  # the client sends the slashes percent-encoded
    assert got.id == str(ckpt) and got.object == "model" and got.max_model_len == MAX_MODEL_LEN
    assert got.to_dict() == listed[0].to_dict()
    raw = httpx.get(f"{server.base}/v1/models/{ckpt}", headers=server.headers())  # and here as plain slashes
    assert raw.status_code == 200 and raw.json() == got.to_dict()


@pytest.mark.parametrize("wrong", ["gpt-4o", "tiny-glm", "parent", "child", "trailing-slash"])
def test_unknown_model_id_is_404_model_not_found(client, ckpt, wrong):
    wrong = {"parent": str(ckpt.parent), "child": str(ckpt / "x"), "trailing-slash": f"{ckpt}/"}.get(wrong, wrong)
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve(wrong)
    assert caught.value.code == "model_not_found" and caught.value.type == "invalid_request_error"
    assert set(caught.value.body) == ERROR_KEYS and str(ckpt) in caught.value.message


def test_requests_naming_another_model_are_404_and_the_served_name_works(server, client, ckpt):
    with pytest.raises(openai.NotFoundError) as chat:
        client.chat.completions.create(model="gpt-4o", messages=user("hi"), max_tokens=1)
    with pytest.raises(openai.NotFoundError) as completion:
        client.completions.create(model=str(ckpt.parent), prompt="hi", max_tokens=1)
    for caught in (chat, completion):
        assert caught.value.code == "model_not_found" and caught.value.param == "model"
    assert client.chat.completions.create(model=str(ckpt), messages=user("hi"), max_tokens=1).model == str(ckpt)
    assert client.completions.create(model=str(ckpt), prompt="hi", max_tokens=1).model == str(ckpt)
    # `model` is optional in glimpse (one model per server): leaving it out means the served one.
    r = server.post("/v1/chat/completions", {"messages": user("hi"), "max_tokens": 1})
    assert r.status_code == 200 and r.json()["model"] == str(ckpt)


# ---- routes -------------------------------------------------------------------------------------
@pytest.mark.parametrize("method,path", [("GET", "/nope"), ("GET", "/v1/nope"), ("POST", "/v1/chat/completion"),
                                         ("GET", "/v2/models"), ("PUT", "/v1/nothing")])  # fmt: skip
def test_unknown_route_is_an_openai_404(server, method, path):
    err = openai_error(httpx.request(method, server.base + path, headers=server.headers()), 404)
    assert err["code"] == "not_found" and err["type"] == "invalid_request_error"
    assert path in err["message"]


def test_unknown_route_through_the_client_and_a_wrong_method(server, client):
    with pytest.raises(openai.NotFoundError) as caught:
        client.get("/completion", cast_to=httpx.Response)
    assert caught.value.code == "not_found"
    r = httpx.get(server.base + "/v1/chat/completions", headers=server.headers())
    assert openai_error(r, 405)["code"] == "method_not_allowed"
    assert "POST" in r.headers["allow"]


def test_version_and_ping_are_open_probes(server):
    r = httpx.get(server.base + "/version")  # no API key: a probe, like /health
    assert r.status_code == 200 and r.json() == {"version": importlib.metadata.version("glimpse-vlm")}
    for method in ("GET", "POST"):
        assert httpx.request(method, server.base + "/ping").status_code == 200


# ---- OpenAPI and docs ----------------------------------------------------------------------------
def resolve(spec: dict, ref: str) -> dict:
    assert ref.startswith("#/"), ref
    node = spec
    for part in ref[2:].split("/"):
        node = node[part]
    return node


def refs(node) -> list[str]:
    """Every `$ref` string anywhere in a JSON document."""
    if isinstance(node, list):
        return [r for item in node for r in refs(item)]
    if not isinstance(node, dict):
        return []
    own = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
    return own + [r for value in node.values() for r in refs(value)]


def test_openapi_and_docs_need_the_api_key(server):
    for path in ("/openapi.json", "/docs"):
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            err = openai_error(httpx.get(server.base + path, headers=headers), 401)
            assert err["code"] == "invalid_api_key"
    docs = httpx.get(server.base + "/docs", headers=server.headers())
    assert docs.status_code == 200 and docs.headers["content-type"].startswith("text/html")
    assert "swagger-ui" in docs.text and "/openapi.json" in docs.text

    r = httpx.get(server.base + "/openapi.json", headers=server.headers())
    assert r.status_code == 200
    spec = r.json()
    assert spec["openapi"].startswith("3.") and spec["info"]["version"] == importlib.metadata.version("glimpse-vlm")
    paths = spec["paths"]
    for path, method in (("/v1/chat/completions", "post"), ("/v1/completions", "post"), ("/v1/models", "get"),
                         ("/v1/models/{model_id}", "get"), ("/health", "get"), ("/ping", "post"), ("/version", "get"),
                         ("/metrics", "get")):  # fmt: skip
        assert method in paths.get(path, {}), path
    assert "/docs" not in paths and "/openapi.json" not in paths
    for path, required in (("/v1/chat/completions", "messages"), ("/v1/completions", "prompt")):
        body = resolve(spec, paths[path]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"])
        assert required in body["required"] and "model" in body["properties"]
    assert refs(spec) and all(resolve(spec, ref) for ref in refs(spec))


# ---- start-up errors ----------------------------------------------------------------------------
def serve(*args: str, env: dict | None = None, timeout: float = 300) -> tuple[subprocess.CompletedProcess, float]:
    """`python -m glimpse.cli serve ARGS` to completion; (the process, its seconds)."""
    t0 = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "glimpse.cli", "serve", *args, "--encoder-graph", "off"], cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})}, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip
    return done, time.monotonic() - t0


@pytest.fixture(scope="module")
def corrupt_ckpt(ckpt, tmp_path_factory) -> Path:
    """The tiny checkpoint with its weights file overwritten: loading it fails."""
    path = tmp_path_factory.mktemp("corrupt") / "ckpt"
    shutil.copytree(ckpt, path)
    for weights in path.glob("*.safetensors"):
        weights.write_bytes(b"not a safetensors file")
    return path


def test_port_in_use_is_reported_before_the_model_loads(corrupt_ckpt):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # The weights are corrupt: had the model been loaded first, that would be the error.
        done, seconds = serve(str(corrupt_ckpt), "--port", str(port), timeout=120)
    assert done.returncode == 1, done.stderr
    want = f"glimpse: error: port {port} on 127.0.0.1 is in use (pick another with --port)"
    assert done.stderr.splitlines() == [want]
    assert done.stdout == ""
    assert seconds < 60


def test_a_checkpoint_that_fails_to_load_is_one_error_line(corrupt_ckpt):
    done, _ = serve(str(corrupt_ckpt), "--port", str(free_port()))
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("glimpse: error: ")
    assert "Traceback" not in done.stderr and "glimpse serve:" not in done.stderr


def test_no_model_prints_the_banner_of_generate_and_a_bad_flag_is_one_line(tmp_path):
    """No MODEL: the same random-weights banner as `glimpse generate` prints; a bad flag value is then one
    `glimpse: error:` line with exit status 2 (it is refused before the model loads)."""
    env = {"GLIMPSE_CACHE": str(tmp_path)}  # the demo checkpoint is written here, not under ~/.cache
    generate = subprocess.run([sys.executable, "-m", "glimpse.cli", "generate", "Hi", "--max-tokens", "1"], cwd=REPO,
                              env={**os.environ, "PYTHONPATH": str(REPO), **env}, capture_output=True, text=True,
                              timeout=300)  # fmt: skip
    assert generate.returncode == 0, generate.stderr
    banner = [line for line in generate.stderr.splitlines() if line.startswith("[glimpse]")]
    assert len(banner) >= 2 and "RANDOM weights" in "\n".join(banner)
    done, _ = serve("--port", str(free_port()), "--max-queue", "-1", env=env)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.splitlines()
    assert lines[: len(banner)] == banner
    assert lines[len(banner) :] == ["glimpse: error: --max-queue must be >= 0"]
