"""What a route answers (:class:`Reply`) and what it is asked (:class:`Request`), without HTTP framing.

A :class:`Reply` is a status, headers as ASGI carries them, and either a whole body or
a stream: an object entered with ``async with`` and iterated for its pieces (a
:class:`~smart_proxy.upstream.relay.RelayBody`, or :class:`Generated`). The web layer
sends a whole body with its ``Content-Length`` in one message, a stream piece by piece.
Errors are replies too, in the dialect of the route's path (:func:`error_reply`):
Ollama's ``{"error": "..."}`` under ``/api/``, Anthropic's error object under
``/v1/messages``, OpenAI's error object everywhere else.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from types import TracebackType
from typing import Any, Protocol

import attrs

from .. import logs
from ..dialects import anthropic as anthropic_dialect
from ..dialects import ollama as ollama_dialect
from ..dialects import openai as openai_dialect
from ..errors import ProxyError
from ..upstream.relay import NDJSONLines, RelayBody, SSELines, UpstreamAnswer

__all__ = [
    "Generated",
    "Headers",
    "Reply",
    "Request",
    "Stream",
    "encode_headers",
    "error_reply",
    "internal_error",
    "is_ollama_route",
    "json_reply",
    "read_answer",
    "relay_answer",
]

log = logging.getLogger(__name__)

#: Headers as ASGI carries them: lower-case names and values in latin-1.
Headers = list[tuple[bytes, bytes]]


class Stream(Protocol):
    """A streamed body: entered once, iterated for its pieces, closed on exit whatever happened."""

    async def __aenter__(self) -> AsyncIterator[bytes]: ...

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> object: ...


@attrs.define
class Reply:
    status: int
    headers: Headers
    #: The whole body (with no ``stream``).
    body: bytes = b""
    stream: Stream | None = None


@attrs.define
class Request:
    """A request to a model route: its path, its whole body, and when it came (``time.perf_counter``)."""

    path: str
    body: bytes
    started: float
    #: Proxies that forwarded it here (``X-Smart-Proxy-Hops``; 0 from a client).
    hops: int = 0
    #: UpstreamAnswer answers the route opened: closed at once when the client leaves (see smart_proxy.web.asgi).
    opened: list[UpstreamAnswer] = attrs.Factory(list)


def encode_headers(headers: Mapping[str, str]) -> Headers:
    """Headers as ASGI sends them: lower-case names and values, in latin-1."""
    return [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in headers.items()]


def merge_headers(*parts: Mapping[str, str]) -> Headers:
    """Several header mappings, later ones replacing earlier ones of the same name (any case), encoded."""
    merged: dict[str, str] = {}
    for part in parts:
        for name, value in part.items():
            merged[name.lower()] = value
    return encode_headers(merged)


def json_reply(
    body: object, status: int = 200, *, content_type: str = "application/json", headers: Mapping[str, str] | None = None,
    ensure_ascii: bool = True,
) -> Reply:
    """``body`` as JSON, with ``headers`` after its Content-Type."""
    encoded = json.dumps(body, ensure_ascii=ensure_ascii).encode()
    return Reply(status, encode_headers({"content-type": content_type, **(headers or {})}), encoded)


def is_ollama_route(path: str) -> bool:
    return path.startswith("/api/")


def error_reply(exc: ProxyError, path: str, headers: Mapping[str, str] | None = None) -> Reply:
    """``exc`` in the dialect of ``path``, with Retry-After where it applies, and ``headers``."""
    if is_ollama_route(path):
        body = ollama_dialect.error_body(exc.message)
    elif anthropic_dialect.is_anthropic_route(path):
        body = anthropic_dialect.error_body(exc, logs.request_id.get())
    else:
        body = openai_dialect.error_body(exc)
    extra = dict(headers or {})
    retry_after = getattr(exc, "retry_after", None)
    if retry_after is not None:
        extra["retry-after"] = str(retry_after)
    return Reply(exc.status, encode_headers({"content-type": "application/json", **extra}), body)


def internal_error(method: str, path: str, exc: Exception) -> ProxyError:
    """Log ``exc``, a bug, with its traceback; the 500 that tells the client."""
    log.exception("unexpected error on %s %s", method, path)
    return ProxyError(f"internal error: {type(exc).__name__}: {exc}")


class Generated:
    """An async generator as a :class:`Stream`: closed on exit, whether it ran out or not."""

    def __init__(self, generator: AsyncIterator[bytes]) -> None:
        self._generator = generator

    async def __aenter__(self) -> AsyncIterator[bytes]:
        return self._generator

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        await self._generator.aclose()  # type: ignore[attr-defined]


_STREAM_TYPES = ("application/x-ndjson", "text/event-stream")
_NO_CACHE = {"cache-control": "no-cache", "x-accel-buffering": "no"}


def _ndjson_error(reason: str) -> bytes:
    return ollama_dialect.error_body(reason) + b"\n"


async def relay_answer(
    upstream: UpstreamAnswer,
    limit: int,
    headers: Mapping[str, str] | None = None,
    on_done: Callable[[], object] | None = None,
) -> Reply:
    """An Ollama upstream's (or a peer's) answer as it came: a stream (SSE or NDJSON) relayed a line at a time,
    else read whole.

    ``headers`` are added to the answer's own; ``limit`` bounds an answer read whole and a
    line of a stream (``[proxy] max_answer``); ``on_done`` runs once the answer is closed.
    """
    content_type = upstream.headers.get("content-type", "")
    if upstream.status_code == 200 and content_type.startswith(_STREAM_TYPES):
        sse = content_type.startswith("text/event-stream")
        lines = SSELines(limit) if sse else NDJSONLines(limit)
        body = RelayBody(
            upstream, on_error=openai_dialect.sse_error if sse else _ndjson_error, on_done=on_done, lines=lines
        )
        return Reply(200, merge_headers(upstream.headers, _NO_CACHE, headers or {}), stream=body)
    return await read_answer(upstream, limit, on_done=on_done, headers=headers)


async def read_answer(
    upstream: UpstreamAnswer,
    limit: int,
    *,
    on_done: Callable[[], object] | None = None,
    wrap: Callable[[int, bytes], bytes | None] | None = None,
    headers: Mapping[str, str] | None = None,
) -> Reply:
    """An upstream's whole answer, read under ``limit``, with ``headers`` added to its own.

    ``on_done`` runs once the answer is read, or reading it failed. ``wrap`` (a dialect's
    ``upstream_error_body``) turns an error answer that is not in the dialect's shape into one.
    """
    try:
        answer = await upstream.read(limit)
    finally:
        if on_done is not None:
            on_done()
    answer_headers = upstream.headers
    wrapped = wrap(upstream.status_code, answer) if wrap is not None else None
    if wrapped is not None:
        answer, answer_headers["content-type"] = wrapped, "application/json"
    return Reply(upstream.status_code, merge_headers(answer_headers, headers or {}), answer)
