"""Step 0 of the data path, the HTTP front of `glimpse serve`: a FastAPI app over an `AsyncEngine`.

`build_app(state)` serves POST /v1/chat/completions and /v1/completions (JSON or SSE), GET
/v1/models and /v1/models/{id}, vLLM's POST /tokenize and /detokenize, /openapi.json and /docs (all
behind --api-key like /v1), and the open probes /health, /ping, /version and /metrics. A request
flows: Host check (Guard) -> CORS (with --allowed-origins) -> API key -> body-size cap -> JSON + schema
(unknown fields 400) -> admission slot (429) -> media fetch under the MediaPolicy -> processor
(thread pool) -> engine -> reasoning parser -> OpenAI JSON. Errors are OpenAI-shaped
`{"error": {message, type, param, code}}` with sanitised text. `Server` is uvicorn's server with
glimpse's ending: SIGTERM drains (--shutdown-timeout), Ctrl-C stops at once, and neither prints a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import re
import signal
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import anyio
import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from glimpse import __version__
from glimpse.engine.llm_engine import RequestOutput
from glimpse.engine.structured import StructuredLimits
from glimpse.errors import DecodeBusyError, GlimpseError, InvalidInputError, PreprocessCancelled
from glimpse.processing.control import PixelBudget, PreprocessControl
from glimpse.processing.inputs import ProcessedPrompt
from glimpse.processing.processor import Processor
from glimpse.processing.prompt import check_chat_template_kwargs
from glimpse.server import protocol as P
from glimpse.server.async_engine import (
    AsyncEngine,
    EngineDeadError,
    EngineStepError,
    RequestHandle,
    ServerBusyError,
    ServerShuttingDownError,
)
from glimpse.server.guard import CLOSE_CONNECTION, ApiError, Guard, error_body, read_json
from glimpse.server.media_fetch import MediaPolicy, fetch_media
from glimpse.server.metrics import CONTENT_TYPE, ServerMetrics
from glimpse.server.tool_parsers import ToolPlan, check_history, tool_plan

log = logging.getLogger("glimpse.server")


class _ClientGone(Exception):
    """The client closed the connection before the answer was ready."""


@dataclass
class ServerState:
    """Everything the routes need; built once by cli.run (or a test) and handed to build_app."""

    engine: AsyncEngine
    processor: Processor  # with the server's MediaLimits and Ceilings
    model_name: str
    policy: MediaPolicy
    api_key: str | None = None
    max_request_bytes: int = 100 * 2**20
    request_timeout: float = 600.0
    body_read_timeout: float = 5.0  # seconds the body may stall between chunks (--body-read-timeout)
    max_n: int = 16  # sequences one request may ask for: n, times the prompts of a completions batch (--max-n)
    allowed_hosts: tuple[str, ...] = ("*",)  # Host header values served (--allowed-hosts)
    reasoning: bool = True  # GLM <think>/<answer>/box parsing of chat output
    template_kwargs: frozenset[str] = frozenset()  # chat_template_kwargs the template reads
    preprocess_workers: int = 2
    sampling_defaults: dict = field(default_factory=dict)  # from generation_config.json (--generation-config auto)
    pixel_budget: PixelBudget | None = None  # decoded pixels held at once, all requests (--max-decoding-pixels)
    mm_processor_kwargs: dict = field(default_factory=dict)  # defaults under each request's own (--mm-processor-kwargs)
    cors: dict = field(default_factory=dict)  # CORSMiddleware's arguments (--allowed-origins ...); {}: no CORS headers
    tool_parser: str | None = None  # glm45 | hermes: how chat output is read for tool calls (--tool-call-parser)
    tool_tags_special: bool = False  # the tokenizer holds <tool_call> as a special token
    structured_limits: StructuredLimits = field(default_factory=StructuredLimits)  # --structured-output-max-*
    pool: ThreadPoolExecutor = field(init=False)
    metrics: ServerMetrics = field(init=False)
    token_text: P.TokenText = field(init=False)
    preprocessing: int = field(init=False, default=0)  # requests whose media are in the pool now

    def __post_init__(self) -> None:
        self.pool = ThreadPoolExecutor(self.preprocess_workers, thread_name_prefix="glimpse-preprocess")
        self.metrics = ServerMetrics(self.engine.stats, self.server_stats)
        self.token_text = P.TokenText(self.processor.tokenizer)

    def server_stats(self) -> dict:
        budget = self.pixel_budget
        return {**self.engine.server_stats(), "preprocessing": self.preprocessing,
                "decoding_pixels": budget.in_use if budget else 0, "decode_waiting": budget.waiting if budget else 0,
                "decoding_pixels_peak": budget.peak if budget else 0, "decoded_pixels": budget.total if budget else 0}  # fmt: skip


# ---- errors ------------------------------------------------------------------------------------
def _code(exc: BaseException) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", type(exc).__name__).lower()


def _as_api_error(exc: BaseException) -> ApiError:
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, InvalidInputError):
        return ApiError(400, str(exc), "invalid_request_error", _code(exc))
    if isinstance(exc, ServerBusyError | DecodeBusyError):
        return ApiError(429, str(exc), "rate_limit_error", "server_busy")
    if isinstance(exc, TimeoutError):
        return ApiError(504, "the request did not finish within --request-timeout and was aborted", "timeout_error",
                        "request_timeout")  # fmt: skip
    if isinstance(exc, ClientDisconnect):
        return ApiError(400, "the client disconnected while sending the request", "invalid_request_error",
                        "client_disconnected")  # fmt: skip
    if isinstance(exc, PreprocessCancelled):  # only after the client left or the deadline passed
        return ApiError(400, str(exc), "invalid_request_error", "request_cancelled")
    if isinstance(exc, EngineDeadError):
        return ApiError(503, str(exc), "service_unavailable", "engine_dead")
    if isinstance(exc, ServerShuttingDownError):
        return ApiError(503, str(exc), "service_unavailable", "server_shutting_down")
    if isinstance(exc, EngineStepError):
        return ApiError(500, str(exc), "server_error", "engine_error")
    log.error("unexpected error while serving a request", exc_info=exc)
    return ApiError(500, "internal server error; see the server log", "server_error", "internal_error")


def _validation_error(exc: ValidationError) -> ApiError:
    """A pydantic error as one readable 400: unknown fields first, else the most specific problem."""
    errors = exc.errors(include_input=False, include_url=False)
    extra = [e for e in errors if e["type"] == "extra_forbidden"]
    if extra:
        where = _loc(extra[0]["loc"])
        return ApiError(400, f"unknown field '{where}'; glimpse rejects fields it does not know (docs/serving.md "
                             "lists the supported ones)", "invalid_request_error", "unknown_field", where)  # fmt: skip
    err = max(errors, key=lambda e: len(e["loc"]))
    where = _loc(err["loc"])
    return ApiError(400, f"{where}: {err['msg']}" if where else err["msg"], "invalid_request_error", "invalid_value",
                    where or None)  # fmt: skip


def _loc(loc: tuple) -> str:
    parts: list[str] = []
    for item in loc:
        text = str(item)
        # Union branches show up as type labels ("str", "list[...]"); a tagged union repeats the tag.
        if "[" in text or text in ("str", "int", "float", "bool") or (parts and parts[-1] == text):
            continue
        parts.append(text)
    return ".".join(parts)


def _install_error_handlers(app: FastAPI, state: ServerState) -> None:
    async def on_error(request: Request, exc: Exception) -> JSONResponse:
        err = _as_api_error(exc)
        state.metrics.observe_error(err.status)
        return JSONResponse(error_body(err), status_code=err.status)

    async def on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # Only routing raises these (the routes raise ApiError): no route, or not this method.
        where = f"{request.method} {request.url.path[:200]}"
        if exc.status_code == 404:
            err = ApiError(404, f"no route for {where} (GET /openapi.json lists the routes)",
                           "invalid_request_error", "not_found")  # fmt: skip
        elif exc.status_code == 405:
            err = ApiError(405, f"{where}: this route does not take {request.method}", "invalid_request_error",
                           "method_not_allowed")  # fmt: skip
        else:
            err = ApiError(exc.status_code, str(exc.detail), "invalid_request_error", "http_error")
        return JSONResponse(error_body(err), status_code=exc.status_code, headers=exc.headers)

    # Expected errors are answered here; anything else also reaches Starlette's last-resort
    # handler, which logs the traceback server-side (the client still gets only on_error's JSON).
    for exc_type in (ApiError, GlimpseError, TimeoutError, ClientDisconnect, Exception):
        app.add_exception_handler(exc_type, on_error)
    app.add_exception_handler(StarletteHTTPException, on_http)


# ---- request plumbing ----------------------------------------------------------------------------
def _parse(model: type[P._Strict], body: dict):
    name = P.unsupported_field(body)
    if name is not None:
        raise ApiError(400, f"'{name}' is not supported by glimpse and would change the output, so it is refused "
                            "rather than ignored; remove it (docs/serving.md lists the supported fields)",
                       "invalid_request_error", "unsupported_field", name)  # fmt: skip
    try:
        return model.model_validate(P.without_neutral_fields(body))
    except ValidationError as exc:
        raise _validation_error(exc) from None


async def _unless_disconnected(request: Request, work: Awaitable):
    """Await `work`, cancelling it (which aborts its engine request) if the client goes away."""
    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task, watcher = asyncio.ensure_future(work), asyncio.ensure_future(watch())
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # our own deadline (--request-timeout) or shutdown: stop the work too
        await _cancel_and_wait(task)
        raise
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    await _cancel_and_wait(task)
    raise _ClientGone()


async def _cancel_and_wait(task: asyncio.Future) -> None:
    """Cancel `task` and wait until it has let go of what it holds (a pool thread, fetches, an engine add)."""
    task.cancel()
    with contextlib.suppress(BaseException):
        await asyncio.shield(task)


# How long a stream's last events may take to leave after --request-timeout, for a client that reads slowly,
# before the response and its connection are cut off (a client that stopped reading would otherwise hold its slot
# and its connection for good).
WRITE_GRACE_SECONDS = 5.0


class SSEResponse(StreamingResponse):
    """Server-sent events from an async iterator of strings; on client disconnect the iterator is
    closed (aborting its engine request) and `cleanup` always runs, even if streaming never began.
    At `cut_at` (the event loop's clock) the response is cut off wherever its writes stand."""

    def __init__(self, events: AsyncIterator[str], cleanup: Callable[[], Awaitable[None]], cut_at: float) -> None:
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.events, self.cleanup, self.cut_at = events, cleanup, cut_at

    async def __call__(self, scope, receive, send) -> None:
        try:
            with anyio.CancelScope(deadline=self.cut_at) as cut:
                await self._stream(receive, send)
            if cut.cancelled_caught:
                log.warning("a stream was cut off %g s after its --request-timeout: the client did not take its "
                            "last events", WRITE_GRACE_SECONDS)  # fmt: skip
                if (close := scope.get(CLOSE_CONNECTION)) is not None:
                    close()  # at once: what the server still holds for the client is dropped
                    await asyncio.sleep(0)  # the server notes the loss before this returns
        finally:
            with anyio.CancelScope(shield=True):
                await self.events.aclose()  # type: ignore[attr-defined]
                await self.cleanup()

    async def _stream(self, receive, send) -> None:
        async with anyio.create_task_group() as tg:
            async def stream() -> None:
                try:
                    await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
                    async for event in self.events:
                        await send({"type": "http.response.body", "body": event.encode(), "more_body": True})
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                except OSError:  # the socket went away mid-write: same as a disconnect
                    pass
                tg.cancel_scope.cancel()

            async def watch() -> None:
                while (await receive())["type"] != "http.disconnect":
                    pass
                tg.cancel_scope.cancel()

            tg.start_soon(stream)
            tg.start_soon(watch)


def _sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


def _sse_all(events: list[dict]) -> str:
    return "".join(map(_sse, events))


def _auth(state: ServerState) -> Callable:
    expected = state.api_key.encode() if state.api_key else None

    async def check(request: Request) -> None:
        if expected is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        # compare_digest takes time independent of where the strings differ.
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), expected):
            raise ApiError(401, "missing or wrong API key (send 'Authorization: Bearer <key>')",
                           "authentication_error", "invalid_api_key")  # fmt: skip

    return check


# ---- the app -------------------------------------------------------------------------------------
def build_app(state: ServerState) -> Guard:
    # FastAPI's own /docs and /openapi.json are plain routes that no dependency reaches, so they are
    # switched off here and served below behind the same API key as /v1.
    app = FastAPI(title="glimpse", version=__version__, docs_url=None, redoc_url=None, openapi_url=None)
    _install_error_handlers(app, state)
    if state.cors:  # inside Guard, so the Host check still comes first; preflights are answered before auth, as vLLM
        app.add_middleware(CORSMiddleware, **state.cors)
    auth = Depends(_auth(state))
    v1 = APIRouter(prefix="/v1", dependencies=[auth])
    engine = state.engine
    card = P.model_card(state.model_name, engine.max_model_len, P.now())

    @app.get("/health")
    async def health() -> Response:
        """200 while the engine core runs, 503 once it has stopped or the server is shutting down."""
        if not engine.is_alive():
            return JSONResponse({"status": "engine stopped", "reason": engine.stop_reason}, status_code=503)
        if not engine.accepting():  # a load balancer stops sending requests here
            return JSONResponse({"status": "shutting down"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.api_route("/ping", methods=["GET", "POST"])
    async def ping() -> Response:
        """vLLM's (and SageMaker's) liveness probe: the same answer as /health."""
        return await health()

    @app.get("/version")
    async def version() -> dict:
        return {"version": __version__}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/openapi.json", include_in_schema=False, dependencies=[auth])
    async def openapi() -> dict:
        return _openapi(app)

    @app.get("/docs", include_in_schema=False, dependencies=[auth])
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title="glimpse API")

    @v1.get("/models")
    async def models() -> dict:
        return {"object": "list", "data": [card]}

    @v1.get("/models/{model_id:path}")
    async def model(model_id: str) -> dict:
        """One model by id; an id may be a folder path, slashes and all (the default id is MODEL as given)."""
        _check_model(state, model_id)
        return card

    @v1.post("/chat/completions")
    async def chat(request: Request) -> Response:
        t0 = time.perf_counter()
        req: P.ChatCompletionRequest = _parse(P.ChatCompletionRequest, await _read_body(request, state))
        _check_model(state, req.model)
        _check_n(state, req.n, 1)
        _check_chat_options(state, req)
        tools = _tool_plan(state, req)
        fmt = P.ChatFormat(req, state.model_name, state.token_text, state.reasoning, tools)
        return await _serve(request, state, req, t0, fmt)

    @v1.post("/completions")
    async def completions(request: Request) -> Response:
        t0 = time.perf_counter()
        req: P.CompletionRequest = _parse(P.CompletionRequest, await _read_body(request, state))
        _check_model(state, req.model)
        _check_n(state, req.n, len(P.prompt_list(req.prompt)))
        return await _serve(request, state, req, t0, P.CompletionFormat(req, state.model_name, state.token_text))

    @app.post("/tokenize", dependencies=[auth])
    async def tokenize(request: Request) -> Response:
        """vLLM's /tokenize. A text prompt is tokenized; chat messages are preprocessed exactly as a chat
        completion of them would be (media fetched and resized under the same limits), without running the
        model, so `count` is that completion's usage.prompt_tokens, media tokens included."""
        body = await _read_body(request, state)
        if ("messages" in body) == ("prompt" in body):
            raise ApiError(400, "a /tokenize body holds either prompt (a text) or messages (a chat, counted as "
                                "a chat completion would count it)", "invalid_request_error",
                           "invalid_value")  # fmt: skip
        req = _parse(P.TokenizeChatRequest if "messages" in body else P.TokenizeCompletionRequest, body)
        _check_model(state, req.model)
        if isinstance(req, P.TokenizeChatRequest):
            _check_chat_options(state, req)
            _tool_plan(state, req)
            if req.add_special_tokens:
                raise ApiError(400, "add_special_tokens=true is not supported with messages: a chat completion's "
                                    "prompt is the chat template's text, which writes its own special tokens, so the "
                                    "count would not be the one it uses", "invalid_request_error", "invalid_value",
                               "add_special_tokens")  # fmt: skip
        ids = await _admitted(request, state, lambda: _token_ids(state, req))
        if isinstance(ids, Response):
            return ids
        strs = state.processor.tokenizer.convert_ids_to_tokens(ids) if req.return_token_strs else None
        return JSONResponse({"count": len(ids), "max_model_len": engine.max_model_len, "tokens": ids,
                             "token_strs": strs})  # fmt: skip

    @app.post("/detokenize", dependencies=[auth])
    async def detokenize(request: Request) -> Response:
        """vLLM's /detokenize: token ids to text, special tokens included (as vLLM); an id the tokenizer
        does not have is a 400 naming it (a tokenizer would silently decode it as nothing)."""
        req: P.DetokenizeRequest = _parse(P.DetokenizeRequest, await _read_body(request, state))
        _check_model(state, req.model)
        tok = state.processor.tokenizer
        size = len(tok)
        bad = next((i for i, t in enumerate(req.tokens) if not 0 <= t < size), None)
        if bad is not None:
            raise ApiError(400, f"tokens[{bad}] is {req.tokens[bad]}, which is not a token id of this model's "
                                f"tokenizer (ids are 0 to {size - 1})", "invalid_request_error", "invalid_value",
                           "tokens")  # fmt: skip
        loop = asyncio.get_running_loop()
        text = await _admitted(request, state, lambda: loop.run_in_executor(state.pool, tok.decode, req.tokens))
        return text if isinstance(text, Response) else JSONResponse({"prompt": text})

    app.include_router(v1)
    return Guard(app, state.allowed_hosts)


def _openapi(app: FastAPI) -> dict:
    """FastAPI's schema of the routes, plus the JSON bodies of the POST routes, which read their body by
    hand (see _parse) so that FastAPI does not know them."""
    if app.openapi_schema is None:
        schema = app.openapi()  # built once and kept in app.openapi_schema
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        bodies = {"/v1/chat/completions": [P.ChatCompletionRequest], "/v1/completions": [P.CompletionRequest],
                  "/tokenize": [P.TokenizeCompletionRequest, P.TokenizeChatRequest],
                  "/detokenize": [P.DetokenizeRequest]}  # fmt: skip
        for path, models in bodies.items():
            refs = []
            for model in models:
                body = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(body.pop("$defs", {}))
                components[model.__name__] = body
                refs.append({"$ref": f"#/components/schemas/{model.__name__}"})
            ref = refs[0] if len(refs) == 1 else {"oneOf": refs}
            schema["paths"][path]["post"]["requestBody"] = {"required": True,
                                                            "content": {"application/json": {"schema": ref}}}  # fmt: skip
    return app.openapi_schema


async def _read_body(request: Request, state: ServerState) -> dict:
    """The JSON body, read within --request-timeout as a whole (and --body-read-timeout per chunk)."""
    try:
        async with asyncio.timeout(state.request_timeout):
            return await read_json(request, state.max_request_bytes, state.body_read_timeout)
    except TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {state.request_timeout:g} s (--request-timeout)",
                       "invalid_request_error", "body_read_timeout") from None  # fmt: skip


def _check_model(state: ServerState, model: str | None) -> None:
    if model is not None and model != state.model_name:
        raise ApiError(404, f"model '{model}' is not served here; this server serves '{state.model_name}'",
                       "invalid_request_error", "model_not_found", "model")  # fmt: skip


def _check_n(state: ServerState, n: int, prompts: int) -> None:
    """n (times the prompts of a completions batch) is bounded before any work: each sequence costs KV and steps."""
    if isinstance(n, int) and n >= 1 and n * prompts > state.max_n:
        what = f"n={n}" if prompts == 1 else f"{prompts} prompts x n={n} = {n * prompts} sequences"
        raise ApiError(400, f"{what} is over the limit of {state.max_n} sequences per request (server flag --max-n)",
                       "invalid_request_error", "limit_exceeded_error", "n")  # fmt: skip


def _check_chat_options(state: ServerState, req: P.ChatCompletionRequest | P.TokenizeChatRequest) -> None:
    check_chat_template_kwargs(req.chat_template_kwargs or {}, state.template_kwargs)
    if req.continue_final_message and (req.add_generation_prompt or req.messages[-1].role != "assistant"):
        raise InvalidInputError("continue_final_message needs add_generation_prompt=false and a final assistant "
                                "message to continue")  # fmt: skip


def _tool_plan(state: ServerState, req: P.ChatCompletionRequest | P.TokenizeChatRequest) -> ToolPlan | None:
    """The request's tools checked against the active chat template and --tool-call-parser (400 otherwise)."""
    check_history(req.messages, state.processor.chat_template)
    tools = [t.model_dump(exclude_none=True) for t in req.tools or []]
    if isinstance(req, P.TokenizeChatRequest):  # counted only: the tools are checked, not called
        return tool_plan(tools, "none", True, state.tool_parser, state.processor.chat_template)
    choice = req.tool_choice.model_dump() if isinstance(req.tool_choice, P.NamedToolChoice) else req.tool_choice
    return tool_plan(tools, choice, req.parallel_tool_calls, state.tool_parser, state.processor.chat_template,
                     state.tool_tags_special, state.structured_limits)  # fmt: skip


def _mm_kwargs(defaults: dict, given: dict | None) -> dict:
    """The server's --mm-processor-kwargs under the request's own, key by key. fps and num_frames are two ways to
    choose frames (Qwen's processor refuses both at once), so a request naming either replaces both defaults."""
    given = given or {}
    if given.keys() & {"fps", "num_frames"}:
        defaults = {k: v for k, v in defaults.items() if k not in ("fps", "num_frames")}
    return {**defaults, **given}


async def _prepare_chat(state: ServerState, req: P.ChatCompletionRequest | P.TokenizeChatRequest) -> ProcessedPrompt:
    """Check what needs no download, fetch every media URL under the policy, then render and
    preprocess in the thread pool (for a chat completion, and for /tokenize's count of one)."""
    messages = [m.model_dump(exclude_none=True) for m in req.messages]
    parts = [part for msg in messages if isinstance(msg.get("content"), list) for part in msg["content"]
             if part["type"] in ("image_url", "video_url")]  # fmt: skip
    mm = _mm_kwargs(state.mm_processor_kwargs, req.mm_processor_kwargs)
    # Counts and mm_processor_kwargs ceilings are refused before a single fetch.
    state.processor.precheck(sum(p["type"] == "image_url" for p in parts),
                             sum(p["type"] == "video_url" for p in parts), mm)  # fmt: skip
    fetches = [asyncio.ensure_future(fetch_media(p[p["type"]]["url"], state.policy, p["type"].removesuffix("_url")))
               for p in parts]  # fmt: skip
    try:
        fetched = await asyncio.gather(*fetches)
    except BaseException:  # one refused or failed (or the request is cancelled): stop the others
        for fetch in fetches:
            fetch.cancel()
        await asyncio.gather(*fetches, return_exceptions=True)
        raise
    for part, data in zip(parts, fetched, strict=True):
        part[part["type"]] = {"url": data}  # bytes or a vetted local path, read by the processor
    template_kwargs = dict(req.chat_template_kwargs or {})
    if req.continue_final_message:
        template_kwargs["continue_final_message"] = True
    tools = [t.model_dump(exclude_none=True) for t in req.tools or []]

    control = PreprocessControl(state.pixel_budget)

    def work() -> ProcessedPrompt:
        return state.processor(messages, chat_template_kwargs=template_kwargs, tools=tools,
                               add_generation_prompt=req.add_generation_prompt, control=control, **mm)  # fmt: skip

    return await _in_pool(state, work, control)


async def _in_pool(state: ServerState, work: Callable[[], ProcessedPrompt], control: PreprocessControl) -> ProcessedPrompt:
    """Run `work` in the preprocessing pool. If the request is cancelled (client gone, timeout) the work
    is told to stop, and this waits for the thread to let go before returning, so the admission slot
    and the gauges stay true: a request counts as in flight for as long as its media are decoding."""
    state.preprocessing += 1
    try:
        future = asyncio.get_running_loop().run_in_executor(state.pool, work)
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        control.cancel()
        with contextlib.suppress(BaseException):
            await future  # stops between items and between frames
        raise
    finally:
        state.preprocessing -= 1


async def _token_ids(state: ServerState, req: P.TokenizeCompletionRequest | P.TokenizeChatRequest) -> list[int]:
    if isinstance(req, P.TokenizeChatRequest):
        return (await _prepare_chat(state, req)).input_ids
    encode = state.processor.tokenizer.encode
    return await asyncio.get_running_loop().run_in_executor(
        state.pool, lambda: encode(req.prompt, add_special_tokens=req.add_special_tokens))


async def _admitted(request: Request, state: ServerState, work: Callable[[], Awaitable]):
    """The result of `work()`, run under an admission slot (429 when busy, 503 while shutting down) and
    --request-timeout, as a completion's preprocessing is; a 499 Response if the client left."""
    try:
        async with asyncio.timeout(state.request_timeout), state.engine.admit():
            return await _unless_disconnected(request, work())
    except _ClientGone:
        return Response(status_code=499)


def _prepare_completion(state: ServerState, req: P.CompletionRequest) -> list[ProcessedPrompt]:
    prompts = P.prompt_list(req.prompt)
    if not prompts:
        raise InvalidInputError("prompt must not be empty")
    if len(prompts) > 1 and req.stream:
        raise InvalidInputError("streaming several prompts in one request is not supported; send one prompt per request")
    tok = state.processor.tokenizer
    return [ProcessedPrompt(list(p), text=None) if isinstance(p, list) else
            ProcessedPrompt(tok.encode(p, add_special_tokens=False), text=p) for p in prompts]  # fmt: skip


async def _serve(request: Request, state: ServerState, req, t0: float, fmt: P.ResponseFormat) -> Response:
    """Admission, preprocessing and generation under one deadline (the wait for a slot counts too)."""
    stack = contextlib.AsyncExitStack()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + state.request_timeout
    try:
        async with asyncio.timeout_at(deadline):
            await stack.enter_async_context(state.engine.admit())
            if isinstance(req, P.ChatCompletionRequest):
                prompts = [await _unless_disconnected(request, _prepare_chat(state, req))]
            else:
                prompts = await loop.run_in_executor(state.pool, _prepare_completion, state, req)
            max_len = state.engine.max_model_len
            params = [fmt.engine_params(P.sampling_params(req, len(p.input_ids), max_len, state.sampling_defaults))
                      for p in prompts]  # fmt: skip
            run = _Run(state, fmt, prompts, params, t0)
            stack.callback(run.abort)
            await _unless_disconnected(request, run.start())
        if req.stream:
            # From here the SSE response owns the admission slot and the engine requests.
            return SSEResponse(run.stream(deadline), stack.aclose, deadline + WRITE_GRACE_SECONDS)
        async with stack, asyncio.timeout_at(deadline):
            return JSONResponse(await _unless_disconnected(request, run.collect()))
    except _ClientGone:
        await stack.aclose()
        return Response(status_code=499)  # nobody reads it; nginx's code for "client closed request"
    except BaseException:
        await stack.aclose()
        raise


class _Run:
    """One HTTP request's engine requests (several for a completions batch) and their outputs."""

    def __init__(self, state: ServerState, fmt: P.ResponseFormat, prompts: list[ProcessedPrompt], params: list,
                 t0: float) -> None:  # fmt: skip
        self.state, self.fmt, self.prompts, self.params, self.t0 = state, fmt, prompts, params, t0
        self.prep = time.perf_counter() - t0
        self.handles: list[RequestHandle] = []
        self.ttft: float | None = None

    async def start(self) -> None:
        for i, (prompt, params) in enumerate(zip(self.prompts, self.params, strict=True)):
            self.handles.append(await self.state.engine.add(f"{self.fmt.id}-{i}", prompt, params, self.prep))

    def abort(self) -> None:
        for handle in self.handles:
            if not handle.finished:
                self.state.metrics.aborted.inc()
            handle.abort()  # a no-op once finished; otherwise frees the request's KV blocks

    def _expire(self) -> None:
        """At a stream's deadline: stop the engine's work; its outputs end with a TimeoutError (counted as an
        abort where the stream reads it, or by `abort` if it never does)."""
        for handle in self.handles:
            handle.end_with(TimeoutError())

    def _seen(self, out: RequestOutput) -> None:
        if self.ttft is None and any(c.delta_token_ids for c in out.outputs):
            self.ttft = time.perf_counter() - self.t0

    def _observe(self, finals: list[RequestOutput]) -> None:
        e2e = time.perf_counter() - self.t0
        for out in finals:
            self.state.metrics.observe_request(
                ttft=self.ttft, e2e=e2e, prompt_tokens=len(out.prompt_token_ids),
                output_tokens=[len(c.token_ids) for c in out.outputs],
                finish_reasons=[c.finish_reason for c in out.outputs],
                encoder_s=out.metrics.get("encoder_s") or 0.0, preprocess_s=self.prep)  # fmt: skip

    async def collect(self) -> dict:
        finals = []
        for handle in self.handles:
            last = None
            async for out in handle.outputs():
                self._seen(out)
                last = out
            finals.append(last)
        self._observe(finals)
        return self.fmt.full(self.prompts, finals)

    async def stream(self, deadline: float) -> AsyncIterator[str]:
        """The response's server-sent events, as text to write. The events of the outputs waiting together go
        out in one write, and the last output's with the usage chunk and [DONE]: each write is a system call
        (and a wake-up of the client) on the cores the engine computes on (docs/benchmarks.md, session 17)."""
        prompt, handle = self.prompts[0], self.handles[0]  # streaming serves one prompt (_prepare_completion)
        pending: list[dict] = []  # events made and not yet written (the last output's wait for the usage and [DONE])
        batches = handle.output_batches()
        # The deadline is kept by a timer, never by a timeout around the yields: while this generator waits at a
        # yield its task awaits a write to the client, where a cancellation would cut the stream short (SSEResponse
        # bounds those writes). At the deadline the engine's work stops whatever the client does, and the outputs
        # end with a TimeoutError after those made in time (none if the request had finished by then).
        expiry = asyncio.get_running_loop().call_at(deadline, self._expire)
        try:
            if start := _sse_all(self.fmt.start(prompt, self.params[0].n)):
                yield start
            final = None
            while True:
                outs = await anext(batches, None)
                if outs is None:
                    break
                for out in outs:
                    self._seen(out)
                    pending += self.fmt.step(out)
                    final = out
                if pending and not final.finished:
                    text, pending = _sse_all(pending), []
                    yield text
            self._observe([final])
            pending += self.fmt.end(prompt, final)
        except Exception as exc:  # the headers are out: report in-band, as vLLM and OpenAI do
            if isinstance(exc, TimeoutError):  # _expire's: the request did not finish in time
                self.state.metrics.aborted.inc()
            self.abort()
            err = _as_api_error(exc)
            self.state.metrics.observe_error(err.status)
            pending.append(error_body(err))
        finally:
            expiry.cancel()
            await batches.aclose()
        yield _sse_all(pending) + _sse("[DONE]")


# ---- shutdown ------------------------------------------------------------------------------------
class Server(uvicorn.Server):
    """uvicorn's server, ended glimpse's way. SIGTERM drains: new requests get 503 (/health too, so that a
    load balancer moves on) while those in flight run for up to `shutdown_timeout` s; any still running then
    end with a 503 `server_shutting_down` (a stream: an error event, then [DONE]) and the server stops.
    SIGINT (Ctrl-C), or a second SIGTERM, ends the requests in flight at once; a second Ctrl-C (or a third
    SIGTERM) stops waiting for connections to close. uvicorn itself raises the signal again once stopped
    (KeyboardInterrupt, or exit status 143); here `exit_status` is 130 after a Ctrl-C (what a shell reports
    for one, so a script can tell an interrupt from a clean stop), else 0."""

    def __init__(self, config: uvicorn.Config, engine: AsyncEngine, shutdown_timeout: float) -> None:
        super().__init__(config)
        self.engine, self.shutdown_timeout = engine, shutdown_timeout
        self.signals: list[int] = []  # received, in order
        self._ending: asyncio.Task | None = None
        self._now = asyncio.Event()  # set: end the requests in flight without waiting

    @property
    def exit_status(self) -> int:
        return 130 if signal.SIGINT in self.signals else 0

    @contextlib.contextmanager
    def capture_signals(self):
        """uvicorn's, without raising the signal again after the server has stopped."""
        if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig: int, frame) -> None:
        # Runs between two bytecodes of the event loop's thread: only take note; on_tick acts within the loop.
        self.signals.append(sig)
        if len(self.signals) >= 3 or self.signals.count(signal.SIGINT) >= 2:
            self.force_exit = True

    async def on_tick(self, counter: int) -> bool:
        """uvicorn calls this every 0.1 s; True stops the server (it then closes the connections)."""
        if self.signals:
            if self._ending is None:
                self._ending = asyncio.create_task(self._end())
            if signal.SIGINT in self.signals or len(self.signals) > 1:
                self._now.set()
        stop = await super().on_tick(counter)
        return stop or self.force_exit or (self._ending is not None and self._ending.done())

    async def _end(self) -> None:
        engine = self.engine
        engine.refuse_new("the server is shutting down and takes no new requests; send them to another server")
        if not self._now.is_set():
            busy = engine.server_stats()
            log.info("shutting down: new requests get 503; waiting up to %g s (--shutdown-timeout) for the "
                     "requests in flight (%d, and %d queued)", self.shutdown_timeout, busy["in_flight"],
                     busy["queued"])  # fmt: skip
        idle, now = asyncio.ensure_future(engine.wait_idle()), asyncio.ensure_future(self._now.wait())
        await asyncio.wait({idle, now}, timeout=self.shutdown_timeout, return_when=asyncio.FIRST_COMPLETED)
        now.cancel()
        if idle.done():
            return
        idle.cancel()
        why = "interrupted" if self._now.is_set() else f"after --shutdown-timeout {self.shutdown_timeout:g} s"
        busy = engine.server_stats()
        log.warning("shutting down (%s): ending the requests still in flight (%d, and %d queued) with a 503", why,
                    busy["in_flight"], busy["queued"])  # fmt: skip
        engine.end_requests(f"the server shut down before this request finished ({why}); retry it elsewhere")
        with contextlib.suppress(TimeoutError):  # the ended requests send their last event and let go of their slot
            async with asyncio.timeout(5):
                await engine.wait_idle()
