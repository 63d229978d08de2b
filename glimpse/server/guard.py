"""Step 0 of the data path, the server's outer wall: what every request passes before a route sees it.

`Guard(app, allowed_hosts)` wraps the ASGI app: a Host header outside `--allowed-hosts` gets a
400 (DNS rebinding), and an exception no handler answered becomes a JSON 500 that leaves the
keep-alive connection usable. `read_json(request, ...)` reads a JSON endpoint's body: JSON
content type only (415), size-capped (413), each chunk within `--body-read-timeout` (408), and
refuses JSON that Python would accept but nothing downstream can use (lone surrogates, nesting
deeper than the parser's stack). Errors are `ApiError`s rendered by `error_body` (OpenAI shape).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Iterable

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("glimpse.server")

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")

# The scope key under which `Guard` leaves a function that drops the request's connection at once (uvicorn's
# transport.abort: buffered bytes are discarded); absent where the server's objects do not offer it.
CLOSE_CONNECTION = "glimpse.close_connection"


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param


# ---- error bodies ----------------------------------------------------------------------------------
# A memory address as Python prints it ("at 0x7f3a..."), not hex-looking text inside a word ("8100x8100").
_ADDRESS = re.compile(r"\b0x[0-9a-fA-F]{4,}\b")
_REPR = re.compile(r"<[\w.]+ object at [^>]*>")


def clean(message: str) -> str:
    """No memory addresses or object reprs in anything sent to a client; long texts cut."""
    message = _ADDRESS.sub("0x?", _REPR.sub("<object>", message))
    return message if len(message) <= 2000 else message[:2000] + "..."


def error_body(err: ApiError) -> dict:
    return {"error": {"message": clean(err.message), "type": err.type, "param": err.param, "code": err.code}}


def _raw_response(status: int, body: dict, close: bool = False) -> tuple[Message, Message]:
    payload = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    return ({"type": "http.response.start", "status": status, "headers": headers},
            {"type": "http.response.body", "body": payload, "more_body": False})  # fmt: skip


# ---- the wall -------------------------------------------------------------------------------------
def default_allowed_hosts(bind_host: str) -> tuple[str, ...]:
    """`--allowed-hosts` when unset: loopback names on a loopback bind, anything ('*') otherwise."""
    if bind_host in LOOPBACK_HOSTS:
        return tuple(dict.fromkeys((bind_host, *LOOPBACK_HOSTS)))
    return ("*",)


def check_allowed_hosts(entries: Iterable[str]) -> tuple[str, ...]:
    """`--allowed-hosts` entries: host names or IP literals ('*' for any), without scheme, port or path."""
    from glimpse.errors import InvalidInputError

    hosts = tuple(e.strip() for item in entries for e in item.split(",") if e.strip())
    for host in hosts:
        if any(c in host for c in "/@?# ") or host.count(":") == 1:
            raise InvalidInputError(f"--allowed-hosts: {host!r} is not a host name; give names like 'api.example.com' "
                                    "or addresses like '10.0.0.5', without scheme, port or path ('*' for any)")  # fmt: skip
    if not hosts:
        raise InvalidInputError("--allowed-hosts needs at least one host name ('*' for any)")
    return hosts


def host_of(header: str) -> str:
    """The host part of a Host header: 'a.b:8000' -> 'a.b', '[::1]:8000' -> '::1'; lower case."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class Guard:
    """Host allow-list and last-resort error handling around the whole app (pure ASGI)."""

    def __init__(self, app: ASGIApp, allowed_hosts: Iterable[str] = ("*",)) -> None:
        self.app = app
        hosts = {h.strip().lower().strip("[]") for h in allowed_hosts if h.strip()}
        self.any_host = "*" in hosts
        self.allowed = frozenset(hosts - {"*"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if not self.any_host:
            headers = dict(scope.get("headers") or ())
            host = host_of(headers.get(b"host", b"").decode("latin-1"))
            if host not in self.allowed:
                err = ApiError(400, f"the Host header {host[:100]!r} is not one this server answers to; the "
                                    "operator lists the names clients may use in --allowed-hosts",
                               "invalid_request_error", "invalid_host")  # fmt: skip
                for message in _raw_response(400, error_body(err)):
                    await send(message)
                return
        started = False
        transport = getattr(getattr(send, "__self__", None), "transport", None)  # uvicorn's request cycle
        if transport is not None and hasattr(transport, "abort"):
            scope[CLOSE_CONNECTION] = transport.abort

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            # Reaching here is a bug: every expected error is answered inside. Answer it anyway,
            # without re-raising, so uvicorn does not reset a keep-alive connection.
            log.error("unhandled error while serving %s %s", scope.get("method"), scope.get("path"), exc_info=exc)
            if started:
                return  # the status line is out; the server closes this response's stream
            err = ApiError(500, "internal server error; see the server log", "server_error", "internal_error")
            for message in _raw_response(500, error_body(err)):
                await send(message)


# ---- connections ----------------------------------------------------------------------------------
def h11_with_head_deadline(head_timeout: float) -> type:
    """uvicorn's h11 protocol plus a deadline on each request's line and headers.

    uvicorn times out a keep-alive connection that stays silent between requests, but not one that
    opens and sends nothing, nor one that trickles its headers a byte at a time (each byte resets
    its timer): 512 such sockets would hold every place of `--max-connections`. Here a connection
    that has not sent a whole request head within `head_timeout` seconds of opening, or of its
    previous response, is closed.
    """
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class H11WithHeadDeadline(H11Protocol):
        def connection_made(self, transport) -> None:  # type: ignore[no-untyped-def]
            super().connection_made(transport)
            self._arm_head_deadline()

        def _arm_head_deadline(self) -> None:
            self._head_cycle = self.cycle  # a request head that arrives makes a new cycle
            self._head_deadline = self.loop.call_later(head_timeout, self._head_expired)

        def _head_expired(self) -> None:
            if self.cycle is self._head_cycle and not self.transport.is_closing():
                self.transport.close()

        def handle_events(self) -> None:
            super().handle_events()
            if self.cycle is not self._head_cycle:
                self._head_deadline.cancel()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm_head_deadline()

        def connection_lost(self, exc: Exception | None) -> None:
            self._head_deadline.cancel()
            super().connection_lost(exc)

    return H11WithHeadDeadline


# ---- JSON bodies ----------------------------------------------------------------------------------
_JSON_TYPE = re.compile(r"application/(?:[\w.+-]+\+)?json")
# Deeper than any field of the API (a JSON schema in response_format included) but far below the
# parser's and the validators' recursion limits, so that nothing downstream can exhaust the stack.
MAX_JSON_DEPTH = 64
# A \uD800-\uDFFF escape: the only way a JSON text can smuggle a surrogate into a Python str.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def require_json(request: Request) -> None:
    """415 unless the body is declared JSON: a cross-site form or a no-CORS fetch cannot declare it."""
    declared = request.headers.get("content-type", "")
    if not _JSON_TYPE.fullmatch(declared.split(";")[0].strip().lower()):
        shown = repr(declared[:100]) if declared else "none"
        raise ApiError(415, f"this endpoint takes a JSON body: send 'Content-Type: application/json' (got {shown})",
                       "invalid_request_error", "unsupported_media_type")  # fmt: skip


async def read_json(request: Request, limit: int, chunk_timeout: float) -> dict:
    """The body of a JSON endpoint as a dict; see the module docstring for what is refused."""
    require_json(request)
    declared = request.headers.get("content-length", "")
    too_big = ApiError(413, f"the request body is over the limit of {limit} bytes (--max-request-bytes)",
                       "invalid_request_error", "request_too_large")  # fmt: skip
    if declared.isdigit() and int(declared) > limit:
        raise too_big
    body = bytearray()
    chunks = request.stream().__aiter__()
    while True:
        try:
            async with asyncio.timeout(chunk_timeout):
                piece = await chunks.__anext__()
        except StopAsyncIteration:
            break
        except TimeoutError:
            raise ApiError(408, f"the request body stalled: no data for {chunk_timeout:g} s (--body-read-timeout)",
                           "invalid_request_error", "body_read_timeout") from None  # fmt: skip
        body += piece
        if len(body) > limit:
            raise too_big
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "the request body is not valid JSON", "invalid_request_error", "invalid_json") from None
    except RecursionError:
        raise ApiError(400, "the request body nests arrays or objects too deeply to parse", "invalid_request_error",
                       "invalid_json") from None  # fmt: skip
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object", "invalid_request_error", "invalid_json")
    if not _depth_at_most(data, MAX_JSON_DEPTH):
        raise ApiError(400, f"the request body nests arrays or objects more than {MAX_JSON_DEPTH} deep; no field of "
                            "this API needs that", "invalid_request_error", "invalid_json")  # fmt: skip
    if _SURROGATE_ESCAPE.search(body) and _has_lone_surrogate(data):
        raise ApiError(400, "the request body holds a lone UTF-16 surrogate escape (\\ud800-\\udfff without its "
                            "pair), which is not Unicode text; send valid Unicode", "invalid_request_error",
                       "invalid_json")  # fmt: skip
    return data


def _depth_at_most(data: object, limit: int) -> bool:
    """Whether `data` nests dicts and lists at most `limit` deep (iterative: no recursion to exhaust)."""
    stack = [(data, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return False
        for child in node.values() if isinstance(node, dict) else node:  # type: ignore[union-attr]
            if isinstance(child, dict | list):
                stack.append((child, depth + 1))
    return True


def _has_lone_surrogate(data: object) -> bool:
    """Whether any string in `data` (keys included) holds an unpaired surrogate (json pairs valid ones)."""
    try:
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False
