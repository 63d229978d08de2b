"""`glimpse serve` flags spelled as vLLM spells them: --model, --enable-prefix-caching, --chat-template,
--mm-processor-kwargs, --generation-config auto|vllm|FOLDER, --disable-log-requests, --uvicorn-log-level,
--allowed-origins (CORS), $GLIMPSE_API_KEY, and sizes and counts such as 32k / 32K / 4GiB; and glimpse's own
--structured-output-max-bytes / -max-depth / -compile-timeout (vLLM has no such limits).

First through the serve parser and the start-up checks (hand-worked values, one `glimpse: error:` line each),
then against one real server on 127.0.0.1 started with all of them. References: hand-worked arithmetic, the
checkpoint's own tokenizer and HF transformers' processor (prompt tokens, image grids), the CORS protocol
(Fetch standard headers) and a request that states its sampling settings itself.
"""

from __future__ import annotations

import base64
import json
import re
import socket

import httpx
import openai
import pytest
import transformers
from hf_oracle import hf_inputs, hf_processor, rgb
from test_server import MEDIA, ServerProcess, free_port

from glimpse import cli
from glimpse.errors import GlimpseError, InvalidInputError
from glimpse.server.app import _mm_kwargs
from glimpse.server.cli import (
    cors_options,
    load_chat_template,
    model_argument,
    resolve_api_key,
    sampling_defaults,
)
from glimpse.units import parse_bytes, parse_count

KEY = "env-key-456"
ORIGIN = "https://app.example.com"
SERVER_PIXELS, REQUEST_PIXELS = 28 * 28 * 20, 28 * 28 * 60  # --mm-processor-kwargs max_pixels, and a request's own
# One line in argv: the shell would pass "\n" as backslash + n, which --chat-template reads as a newline (as vLLM).
TEMPLATE = (r"{% for m in messages %}[{{ m.role }}{{ '!' if shout is defined and shout else '' }}]"
            r"{% for p in m.content %}{% if p.type == 'image' %}<|begin_of_image|><|image|><|end_of_image|>"
            r"{% else %}{{ p.text }}{% endif %}{% endfor %}.\n{% endfor %}<|assistant|>")  # fmt: skip


def serve_args(*argv: str):
    return cli.build_parser().parse_args(["serve", *argv])


# ---- sizes and counts -----------------------------------------------------------------------------
@pytest.mark.parametrize("text,count", [("32768", 32768), ("32k", 32_000), ("32K", 32 * 1024), ("1.5m", 1_500_000),
                                        ("2M", 2 * 1024 * 1024), ("1g", 10**9), ("1G", 1024**3),
                                        ("4.35k", 4350), ("25.6k", 25_600), (" 8K ", 8192), (128, 128)])  # fmt: skip
def test_counts_as_vllm_reads_them(text, count):
    assert parse_count(text, "--max-model-len") == count


@pytest.mark.parametrize("text,size", [("1GiB", 2**30), ("512MiB", 512 * 2**20), ("300KiB", 300 * 1024),
                                       ("1.5GiB", 3 * 2**29), ("512MB", 512 * 10**6), ("2kb", 2000), ("4G", 4 * 2**30),
                                       ("4g", 4 * 10**9), ("64M", 64 * 2**20), ("64m", 64 * 10**6), ("1T", 2**40),
                                       ("100", 100), ("7b", 7)])  # fmt: skip
def test_sizes_as_vllm_reads_them(text, size):
    assert parse_bytes(text, "--kv-cache-memory") == size


@pytest.mark.parametrize("text", ["", "lots", "0", "0k", "-5", "1.5", "1.5K", "1.5G", "32kk", "1e3", "3 apples"])
def test_bad_counts_name_the_knob(text):
    with pytest.raises(InvalidInputError, match=r"^--max-model-len=.* is not a positive whole number"):
        parse_count(text, "--max-model-len")
    with pytest.raises(InvalidInputError, match=r"^--kv-cache-memory=.* is not a positive size"):
        parse_bytes(text, "--kv-cache-memory")


def test_sizes_are_not_counts():
    with pytest.raises(InvalidInputError):
        parse_count("4GiB", "--max-model-len")
    with pytest.raises(InvalidInputError, match="1.5g is decimal"):  # vLLM refuses a fraction of K/M/G/T
        parse_count("1.5G", "--max-num-batched-tokens")


# ---- the serve parser -----------------------------------------------------------------------------
def test_serve_parser_reads_vllm_spellings(tmp_path):
    args = serve_args("--max-model-len", "32k", "--max-num-batched-tokens", "8K", "--max-prefill-tokens", "1k",
                      "--kv-cache-memory", "4G", "--disable-log-requests", "--uvicorn-log-level", "trace")  # fmt: skip
    assert (args.max_model_len, args.max_num_batched_tokens, args.max_prefill_tokens) == (32_000, 8192, 1000)
    assert parse_bytes(args.kv_cache_memory, "--kv-cache-memory") == 4 * 2**30
    assert args.disable_log_requests and args.uvicorn_log_level == "trace" and args.log_level == "info"
    assert serve_args().uvicorn_log_level is None  # follows --log-level

    assert serve_args().enable_prefix_caching is True
    assert serve_args("--enable-prefix-caching").enable_prefix_caching is True
    assert serve_args("--no-enable-prefix-caching").enable_prefix_caching is False
    assert serve_args("--no-prefix-caching").enable_prefix_caching is False  # the older name stays

    assert serve_args().generation_config == "auto"
    assert serve_args("--generation-config", "vllm").generation_config == "vllm"
    assert serve_args("--generation-config", "none").generation_config == "none"
    (tmp_path / "generation_config.json").write_text('{"temperature": 0.6, "top_p": 0.95, "eos_token_id": 3}')
    assert serve_args("--generation-config", str(tmp_path)).generation_config == str(tmp_path)

    args = serve_args()  # the structured-output limits' defaults are the engine's (EngineConfig, LLM)
    assert (args.structured_output_max_bytes, args.structured_output_max_depth) == ("64KiB", 24)
    assert parse_bytes(args.structured_output_max_bytes, "") == 64 * 1024
    assert args.structured_output_compile_timeout == 10
    args = serve_args("--structured-output-max-bytes", "1KiB", "--structured-output-max-depth", "3",
                      "--structured-output-compile-timeout", "2.5")  # fmt: skip
    assert parse_bytes(args.structured_output_max_bytes, "") == 1024
    assert (args.structured_output_max_depth, args.structured_output_compile_timeout) == (3, 2.5)

    args = serve_args("--allowed-origins", '["https://a.example", "http://localhost:3000"]',
                      "--mm-processor-kwargs", '{"max_pixels": 50000, "fps": 1}')  # fmt: skip
    assert args.allowed_origins == ["https://a.example", "http://localhost:3000"]
    assert args.mm_processor_kwargs == {"max_pixels": 50000, "fps": 1}


def test_model_positional_or_flag():
    assert model_argument(serve_args("/models/a")) == "/models/a"
    assert model_argument(serve_args("--model", "/models/a")) == "/models/a"
    assert model_argument(serve_args("/models/a", "--model", "/models/a")) == "/models/a"
    assert model_argument(serve_args("/models/a", "--model", "/models/b/../a")) == "/models/a"  # the same folder
    assert model_argument(serve_args()) is None  # the demo checkpoint
    with pytest.raises(InvalidInputError, match="two models given: '/models/a' and --model '/models/b'"):
        model_argument(serve_args("/models/a", "--model", "/models/b"))


def test_generation_config_choices(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "repetition_penalty": 1.05, "eos_token_id": [3, 4],
         "do_sample": True, "max_new_tokens": 99}))  # fmt: skip
    assert sampling_defaults("auto") is None  # the checkpoint's own (read by the engine)
    assert sampling_defaults("vllm") == sampling_defaults("none") == {}
    assert sampling_defaults(str(tmp_path)) == {"temperature": 0.6, "top_p": 0.95, "top_k": 20,
                                                "repetition_penalty": 1.05}  # fmt: skip


def test_chat_template_file_or_text(tmp_path):
    file = tmp_path / "t.jinja"
    file.write_text("{{ messages[0].content }}\\n é€", encoding="utf-8")
    assert load_chat_template(str(file)) == "{{ messages[0].content }}\\n é€"  # a file is read as it is
    assert load_chat_template(r"{{ 'é€' }}\n{% if x %}\t{% endif %}") == "{{ 'é€' }}\n{% if x %}\t{% endif %}"
    with pytest.raises(InvalidInputError, match=r"'templates/chat\.jinja': no such file, and not a Jinja template"):
        load_chat_template("templates/chat.jinja")
    bad = tmp_path / "bad.jinja"
    bad.write_bytes(b"{{ x }}\xff\xfe")
    with pytest.raises(GlimpseError, match="could not be read") as caught:
        load_chat_template(str(bad))
    assert not isinstance(caught.value, InvalidInputError)  # a file problem: exit 1, not 2


def test_cors_and_api_key_options():
    assert cors_options(serve_args()) == {}
    assert cors_options(serve_args("--allowed-origins", '["*"]')) == {
        "allow_origins": ["*"], "allow_methods": ["*"], "allow_headers": ["*"], "allow_credentials": False}  # fmt: skip
    assert cors_options(serve_args("--allowed-origins", f'["{ORIGIN}"]', "--allowed-methods", '["GET", "POST"]',
                                   "--allowed-headers", "[]", "--allow-credentials")) == {
        "allow_origins": [ORIGIN], "allow_methods": ["GET", "POST"], "allow_headers": [],
        "allow_credentials": True}  # fmt: skip
    with pytest.raises(InvalidInputError, match="--allowed-methods, --allow-credentials has no effect without"):
        cors_options(serve_args("--allowed-methods", '["GET"]', "--allow-credentials"))

    env = {"GLIMPSE_API_KEY": "from-env"}
    assert resolve_api_key(None, env) == "from-env"
    assert resolve_api_key("from-flag", env) == "from-flag"  # the flag wins
    assert resolve_api_key(None, {}) is None and resolve_api_key(None, {"GLIMPSE_API_KEY": ""}) is None


def test_request_mm_kwargs_win_over_the_servers():
    server = {"max_pixels": 1000, "fps": 2, "min_frames": 4}
    assert _mm_kwargs(server, None) == server
    assert _mm_kwargs(server, {"max_pixels": 5000}) == {"max_pixels": 5000, "fps": 2, "min_frames": 4}
    # fps and num_frames are one choice (Qwen's processor refuses both): a request's num_frames drops the server's fps
    assert _mm_kwargs(server, {"num_frames": 8}) == {"max_pixels": 1000, "min_frames": 4, "num_frames": 8}


def test_every_serve_flag_shows_its_default(capsys):
    with pytest.raises(SystemExit):
        cli.main(["serve", "--help"])
    text = capsys.readouterr().out
    entries: list[str] = []  # one per flag: its line, two spaces in, and the deeper-indented lines that follow
    for line in text.split("\npositional arguments:\n", 1)[1].splitlines():
        if re.match(r"  \S", line):
            entries.append(line)
        elif line.startswith("    ") and entries:
            entries[-1] += " " + line.strip()
    flags = {e.split()[0].rstrip(",") for e in entries}
    assert {"MODEL", "--model", "--chat-template", "--mm-processor-kwargs", "--generation-config", "--allowed-origins",
            "--uvicorn-log-level", "--disable-log-requests", "--enable-prefix-caching", "--no-prefix-caching",
            "--api-key", "--max-model-len", "--port"} <= flags, flags  # fmt: skip
    for entry in entries:
        if not entry.strip().startswith("-h"):
            assert "default:" in " ".join(entry.split()), entry


# ---- start-up errors: one line, before the model loads ---------------------------------------------------
@pytest.fixture
def no_engine(monkeypatch):
    """Fails the test if the engine would start: every check here must come first."""
    from glimpse.server.async_engine import AsyncEngine

    def refuse(*args, **kwargs):
        raise AssertionError("the engine started")

    monkeypatch.setattr(AsyncEngine, "in_process", refuse)
    monkeypatch.setattr(AsyncEngine, "in_thread", refuse)


def start_error(capsys, *argv: str) -> tuple[int, str]:
    """`glimpse serve ARGV` in this process: (exit status, its one error line)."""
    try:
        status = cli.main(["serve", *argv, "--port", str(free_port()), "--encoder-graph", "off"])
    except SystemExit as exc:  # argparse's own errors
        status = exc.code
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("glimpse: error:")]
    assert len(lines) == 1, err
    return status, lines[0]


@pytest.fixture(scope="module")
def ckpt(tiny_checkpoint):
    return tiny_checkpoint("glm46v")


def test_bad_flag_values_are_one_line_exit_2(ckpt, tmp_path, capsys, no_engine):
    cases = [
        (["--model", "/elsewhere"], f"two models given: '{ckpt}' and --model '/elsewhere'"),
        (["--chat-template", "no/such/chat.jinja"], "--chat-template 'no/such/chat.jinja': no such file"),
        (["--chat-template", "{% if %}"], "--chat-template is not a valid Jinja template"),
        (["--allow-credentials"], "--allow-credentials has no effect without --allowed-origins"),
        (["--max-model-len", "1.5K"], "argument --max-model-len: '1.5K' is not a positive whole number"),
        (["--kv-cache-memory", "lots"], "argument --kv-cache-memory: 'lots' is not a positive size"),
        (["--stream-interval", "0"], "argument --stream-interval: '0' is not a positive whole number"),
        (["--max-prefill-tokens", "4096"], "max_prefill_tokens (--max-prefill-tokens) is 4096, above "
                                           "max_num_batched_tokens (--max-num-batched-tokens) 2048"),
        (["--allowed-origins", ORIGIN], "argument --allowed-origins: must be a JSON list of strings"),
        (["--mm-processor-kwargs", "max_pixels=5"], "argument --mm-processor-kwargs: must be a JSON object"),
        (["--generation-config", str(tmp_path)], f"argument --generation-config: the folder {tmp_path} has no "
                                                 "generation_config.json"),
        (["--generation-config", "greedy"], "'greedy' is not a folder"),
        (["--uvicorn-log-level", "loud"], "argument --uvicorn-log-level: invalid choice: 'loud'"),
        # held to what a request's mm_processor_kwargs is held to, after the processor (not the model) loads
        (["--mm-processor-kwargs", '{"foo": 1}'], "--mm-processor-kwargs: unknown video setting 'foo'"),
        (["--mm-processor-kwargs", '{"max_pixels": 0}'], "--mm-processor-kwargs: max_pixels must be an integer >= 1"),
        (["--mm-processor-kwargs", '{"max_pixels": 200000}', "--max-pixels", "100000"], "--max-pixels"),
        (["--mm-processor-kwargs", '{"video_pruning_rate": 0.5}'], "Qwen2.5-VL only"),
        (["--structured-output-max-bytes", "0"], "argument --structured-output-max-bytes: '0' is not a positive size"),
        (["--structured-output-max-bytes", "1.5KiB?"], "argument --structured-output-max-bytes: '1.5KiB?' is not"),
        (["--structured-output-max-depth", "0"], "argument --structured-output-max-depth: must be >= 1; got 0"),
        (["--structured-output-max-depth", "deep"], "argument --structured-output-max-depth: must be an integer"),
        (["--structured-output-compile-timeout", "0"], "argument --structured-output-compile-timeout: must be a "
                                                       "number of seconds > 0, got '0'"),
        (["--structured-output-compile-timeout", "nan"], "--structured-output-compile-timeout: must be a number"),
        (["--structured-output-compile-timeout", "inf"], "--structured-output-compile-timeout: must be a number"),
    ]  # fmt: skip
    for argv, message in cases:
        status, line = start_error(capsys, str(ckpt), *argv)
        assert status == 2 and message in line, (argv, line)


def test_unreadable_files_are_exit_1(ckpt, tmp_path, capsys, no_engine):
    (tmp_path / "generation_config.json").write_text("{not json")
    status, line = start_error(capsys, str(ckpt), "--generation-config", str(tmp_path))
    assert status == 1 and "generation_config.json is not valid JSON" in line
    (tmp_path / "t.jinja").write_bytes(b"\xff{{ x }}")
    status, line = start_error(capsys, str(ckpt), "--chat-template", str(tmp_path / "t.jinja"))
    assert status == 1 and f"--chat-template {tmp_path / 't.jinja'}: the file could not be read" in line


# ---- one real server with all of them ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def gen_folder(tmp_path_factory):
    """A generation_config.json other than the checkpoint's (whose top_p 0.0001 is all but greedy)."""
    folder = tmp_path_factory.mktemp("genconfig")
    (folder / "generation_config.json").write_text(json.dumps({"temperature": 2.0, "top_p": 1.0, "top_k": 0}))
    return folder


@pytest.fixture(scope="module")
def server(ckpt, gen_folder):
    srv = ServerProcess(ckpt, "--model", str(ckpt), "--max-model-len", "2k", "--kv-cache-memory", "64MiB",
                        "--dtype", "float32", "--chat-template", TEMPLATE,
                        "--mm-processor-kwargs", json.dumps({"max_pixels": SERVER_PIXELS}),
                        "--generation-config", str(gen_folder), "--allowed-origins", json.dumps([ORIGIN]),
                        "--uvicorn-log-level", "info", "--disable-log-requests", "--no-enable-prefix-caching",
                        "--structured-output-max-bytes", "1KiB", "--structured-output-max-depth", "3",
                        env={"GLIMPSE_API_KEY": KEY})  # fmt: skip
    srv.api_key = KEY  # given to the server through the environment only; the client sends it
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return server.client()


def test_env_api_key_model_flag_and_readable_max_model_len(server, client):
    assert "--api-key" not in server.proc.args
    assert httpx.get(server.base + "/v1/models").status_code == 401
    assert httpx.get(server.base + "/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
    (model,) = client.models.list().data
    assert model.max_model_len == 2000  # --max-model-len 2k


def test_chat_template_replaces_the_checkpoints(server, client, ckpt):
    tok = transformers.AutoTokenizer.from_pretrained(ckpt)
    msgs = [{"role": "user", "content": [{"type": "text", "text": "hello world"}]}]
    for kwargs, text in (({}, "[user]hello world.\n<|assistant|>"),
                         ({"shout": True}, "[user!]hello world.\n<|assistant|>")):  # fmt: skip
        # the hand-worked text is what HF renders with the template, its "\n" a newline
        assert tok.apply_chat_template(msgs, chat_template=TEMPLATE.replace("\\n", "\n"), tokenize=False,
                                       **kwargs) == text  # fmt: skip
        r = client.chat.completions.create(model="tiny-glm", messages=msgs, max_tokens=1,
                                           extra_body={"chat_template_kwargs": kwargs})  # fmt: skip
        assert r.usage.prompt_tokens == len(tok.encode(text, add_special_tokens=False))
    # The checkpoint's template reads enable_thinking; this one does not, so it is refused like any unknown variable.
    with pytest.raises(openai.BadRequestError, match="allowed: shout"):
        client.chat.completions.create(model="tiny-glm", messages=msgs, max_tokens=1,
                                       extra_body={"chat_template_kwargs": {"enable_thinking": False}})  # fmt: skip


def test_mm_processor_kwargs_are_defaults_a_request_overrides(server, client, ckpt):
    proc = hf_processor(ckpt)
    image = MEDIA / "images" / "coffee.png"
    url = "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()
    lowest = json.loads((ckpt / "preprocessor_config.json").read_text())["size"]["shortest_edge"]

    def hf_grid(max_pixels: int | None) -> list[int]:
        size = {"size": {"shortest_edge": lowest, "longest_edge": max_pixels}} if max_pixels else {}
        ref = hf_inputs(proc, [{"type": "image"}, {"type": "text", "text": "Hm"}], images=[rgb(image)], **size)
        return ref["image_grid_thw"][0].tolist()

    def grid(**body) -> list[int]:
        msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": "Hm"}]}]  # fmt: skip
        r = client.chat.completions.create(model="tiny-glm", messages=msgs, max_tokens=1, extra_body=body)
        return r.usage.prompt_tokens_details.media[0]["grid_thw"]

    assert len({str(hf_grid(SERVER_PIXELS)), str(hf_grid(REQUEST_PIXELS)), str(hf_grid(None))}) == 3  # all matter
    assert grid() == hf_grid(SERVER_PIXELS)  # the server's default
    assert grid(mm_processor_kwargs={"max_pixels": REQUEST_PIXELS}) == hf_grid(REQUEST_PIXELS)  # the request wins


def test_generation_config_folder_fills_unset_sampling(client):
    def text(**kwargs) -> str:
        r = client.completions.create(model="tiny-glm", prompt="Once upon a time", max_tokens=12, seed=7,
                                      extra_body={"ignore_eos": True, **kwargs.pop("extra", {})}, **kwargs)  # fmt: skip
        return r.choices[0].text

    unset = text()
    assert unset == text(temperature=2.0, top_p=1.0, extra={"top_k": 0})  # FOLDER's values, stated by the request
    assert unset != text(temperature=0)  # not greedy, as the checkpoint's own top_p 0.0001 would all but be


def test_cors_for_allowed_origins_only(server):
    url = server.base + "/v1/chat/completions"
    preflight = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}  # fmt: skip
    r = httpx.options(url, headers=preflight)  # browsers send no credentials on a preflight
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
    assert "POST" in r.headers["access-control-allow-methods"]
    assert "authorization" in r.headers["access-control-allow-headers"].lower()
    assert httpx.options(url, headers={**preflight, "Origin": "https://evil.example"}).status_code == 400

    r = httpx.get(server.base + "/v1/models", headers={"Origin": ORIGIN, **server.headers()})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
    r = httpx.get(server.base + "/v1/models", headers={"Origin": "https://evil.example", **server.headers()})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
    r = httpx.get(server.base + "/v1/models", headers={"Origin": ORIGIN})  # the key is still needed
    assert r.status_code == 401 and r.headers["access-control-allow-origin"] == ORIGIN
    r = httpx.get(server.base + "/v1/models", headers={"Host": "evil.example", "Origin": ORIGIN, **server.headers()})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_host"  # the Host check comes first


def test_uvicorn_log_level_and_prefix_caching_off(server):
    r = httpx.get(server.base + "/version")
    assert r.status_code == 200
    prompt = "the same words again " * 12
    usages = [server.post("/v1/completions", {"prompt": prompt, "max_tokens": 1}).json()["usage"] for _ in range(2)]
    assert usages[1]["prompt_tokens"] >= 32 and usages[1]["prompt_tokens_details"]["cached_tokens"] == 0
    log = server.output()
    assert '"GET /version HTTP/1.1" 200' in log  # uvicorn's access log at --uvicorn-log-level info
    assert "INFO glimpse" not in log  # while glimpse's own log stays at --log-level warning


def nested(levels: int) -> dict:
    """An object schema whose innermost subschema sits `levels` subschemas below the root."""
    schema: dict = {"type": "integer"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
    return schema


def test_structured_output_limits_reach_the_engine(server):
    """--structured-output-max-bytes 1KiB and --structured-output-max-depth 3 (the defaults: 64 KiB, 24)."""
    def constrained(schema: dict) -> httpx.Response:
        return server.post("/v1/completions", {"model": "tiny-glm", "prompt": "JSON:", "max_tokens": 40,
                                               "structured_outputs": {"json": schema}})  # fmt: skip

    r = constrained(nested(3))  # root, then 3 levels of properties: within the limit
    assert r.status_code == 200, r.text
    r = constrained(nested(4))
    assert r.status_code == 400
    assert "nests deeper than 3 levels at #/properties/a/properties/a/properties/a/properties/a" in r.text
    assert "--structured-output-max-depth" in r.json()["error"]["message"]
    # The size counted is the constraint's compact text with its kind, hand-counted: 'json:{"enum":["' (15 bytes),
    # the string, '"]}' (3 bytes). So a 1006-character string makes 1024 bytes, at the limit; one more is over.
    assert constrained({"enum": ["x" * 1006]}).status_code == 200
    r = constrained({"enum": ["x" * 1007]})
    assert r.status_code == 400
    message = r.json()["error"]["message"]
    assert "is 1025 bytes, over the limit of 1024" in message and "--structured-output-max-bytes" in message


def test_port_check_still_runs_first(ckpt, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        status = cli.main(["serve", "--model", str(ckpt), "--port", str(port)])
    assert status == 1 and f"port {port} on 127.0.0.1 is in use" in capsys.readouterr().err
