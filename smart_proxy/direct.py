"""The relay routes answered on raw ASGI, without Quart's per-request machinery.

Theory of operation: the edge middleware (:mod:`smart_proxy.middleware`) hands a
``POST`` to one of the routes that forward to a llama-server (:data:`ROUTES`: OpenAI's
``/v1/chat/completions``, ``/v1/completions`` and ``/v1/embeddings``, Ollama's
``/api/chat`` and ``/api/generate``) to :func:`relay` instead of the Quart app.
:func:`relay` does what the route's Quart handler does for a request that goes to a
llama-server (:func:`smart_proxy.api.openai.forward`, ``smart_proxy.api.ollama``'s
``_complete``), with the same functions: read the body, check it
(:func:`~smart_proxy.api.openai.plan`; :func:`~smart_proxy.api.ollama.plan_generation`
and its translation), take a lease and a slot, send, and relay the answer, a stream
piece by piece as it comes (:class:`~smart_proxy.upstream.relay.RelayBody`, translated to
NDJSON for Ollama). What it leaves out is what Quart does for every request besides:
its ``Request`` with its ``Headers`` and body object, the app and request contexts
and their signals, URL matching, the ``Response`` object and its headers. Measured
with ``bench/pair.py``, that was about a fifth of the proxy's CPU per relayed request.

The answers are the Quart routes': the same status, body and headers (Hypercorn
adds ``date`` and ``server`` to both), errors in the caller's dialect with the same
messages (``tests/test_direct.py`` compares the two paths). A request this module
does not relay itself (agent commands, a model served by an Ollama upstream, an
Ollama load or unload) goes on to the Quart app with the body it has read replayed,
so there is one place that knows how to run agents.

A client that leaves cancels the relay, as it cancels a Quart handler
(:mod:`smart_proxy.asgi`): while the answer is prepared and sent, a task waits on
``receive`` for ``http.disconnect``. The cancellation closes the upstream request
(which makes llama-server stop generating) and lets go of the lease. That task also
closes the upstream connection itself (:meth:`~smart_proxy.upstream.relay.Upstream.abort`), right
after cancelling: the cancelled relay would close it too, but only when it next runs, a
pass of the scheduler later, and when a thousand clients leave at once a pass is long
(bench aborts: p99 from hang-up to upstream close 48-96 -> 26-51 ms).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any

import trio
from quart import Response

from .api import ollama, openai
from .app import BODY_TIMEOUT, ProxyState, error_response
from .errors import BodyTimeout, ProxyError, too_large
from .dialects.ollama import NDJSONStream
from .upstream.relay import RelayBody, SSELines, Upstream

__all__ = ["ROUTES", "encode_headers", "relay", "send_response"]

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: Ollama's generation routes, translated to llama-server's OpenAI ones.
OLLAMA_ROUTES = frozenset({"/api/chat", "/api/generate"})
#: The paths :func:`relay` answers (for ``POST``).
ROUTES = frozenset(openai.REQUIRED) | OLLAMA_ROUTES


def encode_headers(headers: Mapping[str, str]) -> list[tuple[bytes, bytes]]:
    """Headers as ASGI sends them: lower-case names and values, in latin-1."""
    return [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in headers.items()]


_SSE_HEADERS = encode_headers(openai.SSE_HEADERS)
_SSE_NAMES = frozenset(name for name, _ in _SSE_HEADERS)
_NDJSON_HEADERS = encode_headers(ollama.NDJSON_HEADERS)
_JSON_TYPE = ollama.JSON_TYPE.encode("latin-1")


async def relay(
    proxy: ProxyState, scope: Scope, receive: Receive, send: Send, app: ASGIApp, length: int | None = None
) -> None:
    """Answer a ``POST`` to one of :data:`ROUTES`; see the module docstring. ``app`` takes what is not relayed.

    ``length`` is the request's Content-Length, if it gave one (see :func:`read_body`).
    """
    path = scope["path"]
    started = time.perf_counter()  # Ollama's total_duration counts from here
    try:
        raw = await read_body(receive, proxy.config.proxy.max_body, length)
        if raw is None:
            return  # the client left before its request was in
        forward = await (_plan_ollama if path in OLLAMA_ROUTES else _plan_openai)(proxy, path, raw, started)
    except ProxyError as exc:
        await send_response(send, error_response(exc, path))
        return
    except Exception as exc:  # a bug: answered in the route's dialect, as the Quart app answers it
        await send_response(send, error_response(_internal_error(path, exc), path))
        return
    if forward is None:
        await app(scope, _replay(raw, receive), send)
        return
    started = False

    async def send_start(message: Message) -> None:
        nonlocal started
        started = True
        await send(message)

    opened: list[Upstream] = []  # the upstream answer, once there is one
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_cancel_on_disconnect, receive, nursery.cancel_scope, opened)
        try:
            await forward(send_start, send, opened)
        except ProxyError as exc:
            if started:  # an answer is going out already: Hypercorn cuts the connection
                raise
            await send_response(send, error_response(exc, path))
        except Exception as exc:
            error = _internal_error(path, exc)
            if started:
                raise
            await send_response(send, error_response(error, path))
        nursery.cancel_scope.cancel()  # the watcher: the answer is out


Forward = Callable[[Send, Send, list[Upstream]], Awaitable[None]]


def _internal_error(path: str, exc: Exception) -> ProxyError:
    """Log ``exc``, a bug, with its traceback; the 500 that tells the client (the Quart app's ``internal error``)."""
    log.exception("unexpected error on POST %s", path)
    return ProxyError(f"internal error: {type(exc).__name__}: {exc}")


async def _plan_openai(proxy: ProxyState, path: str, raw: bytes, started: float) -> Forward | None:
    plan = openai.plan(proxy, path, raw)
    return functools.partial(_forward_openai, proxy, path, plan, raw) if plan.relayed else None


async def _plan_ollama(proxy: ProxyState, path: str, raw: bytes, started: float) -> Forward | None:
    asked = ollama.Asked.parse(proxy, raw, started)
    generation = ollama.plan_generation(asked, path)
    if generation is None or not generation.relayed:
        return None  # an Ollama upstream's model, a load or unload, agent commands: Quart's route
    await ollama.check_think(asked)
    return functools.partial(_forward_ollama, proxy, asked, generation)


async def _forward_openai(
    proxy: ProxyState, path: str, plan: openai.Plan, raw: bytes, send_start: Send, send: Send, opened: list[Upstream]
) -> None:
    lease, upstream = await openai.open_relay(proxy, path, plan.target.name, raw)
    opened.append(upstream)
    limit = proxy.config.proxy.max_answer
    relayed = upstream.headers
    if openai.streams(upstream, plan.payload.get("stream") is True):
        headers = [header for header in encode_headers(relayed) if header[0] not in _SSE_NAMES] + _SSE_HEADERS
        body = RelayBody(upstream, on_error=openai.sse_error, on_done=lease.release, lines=SSELines(limit))
        await _stream(body, upstream.status_code, headers, send_start, send)
        return
    try:
        answer = await upstream.read(limit)
    finally:
        lease.release()
    wrapped = openai.upstream_error_body(upstream.status_code, answer)
    if wrapped is not None:
        answer, relayed["content-type"] = wrapped, "application/json"
    await _whole(upstream.status_code, encode_headers(relayed), answer, send_start, send)


async def _forward_ollama(
    proxy: ProxyState,
    asked: ollama.Asked,
    generation: ollama.Generation,
    send_start: Send,
    send: Send,
    opened: list[Upstream],
) -> None:
    call, answer = generation.call, generation.answer
    assert call is not None
    lease, upstream = await ollama.open_generation(proxy, asked.name, call, generation.keep_alive, answer)
    opened.append(upstream)
    limit = proxy.config.proxy.max_answer
    if ollama.streams(upstream, call):
        translation = NDJSONStream(answer, limit)
        body = RelayBody(upstream, on_error=openai.sse_error, on_done=lease.release, translation=translation)
        await _stream(body, 200, _NDJSON_HEADERS, send_start, send)
        return
    reply = await ollama.answer_body(upstream, answer, ollama.llama_server(lease), lease.release, limit)
    await _whole(200, [(b"content-type", _JSON_TYPE)], reply, send_start, send)


async def _stream(body: RelayBody, status: int, headers: list[tuple[bytes, bytes]], send_start: Send, send: Send) -> None:
    """A relayed stream: the start, a body message per piece as it comes, and an empty last one."""
    async with body:
        await send_start({"type": "http.response.start", "status": status, "headers": headers})
        async for piece in body:
            await send({"type": "http.response.body", "body": piece, "more_body": True})
    await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _whole(status: int, headers: list[tuple[bytes, bytes]], body: bytes, send_start: Send, send: Send) -> None:
    """A whole answer: the start, with its Content-Length, and one body message."""
    headers = [*headers, (b"content-length", str(len(body)).encode())]
    await send_start({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def read_body(receive: Receive, limit: int, length: int | None = None) -> bytes | None:
    """The request body, or None if the client left first.

    With ``length`` (the request's Content-Length) the body is complete once that many bytes
    are in. Hypercorn hands a body over as its bytes (``more_body``) and then an empty last
    message; that one is left in the queue (the disconnect watcher, or :func:`_replay`,
    passes over it) rather than waited for: a pass of the scheduler per request.

    Raises:
        PayloadTooLarge: more than ``limit`` bytes came (a chunked body; the edge checks Content-Length).
        BodyTimeout: the body did not arrive within ``BODY_TIMEOUT`` seconds (Quart's own limit).
    """
    parts: list[bytes] = []
    size = 0
    with trio.move_on_after(BODY_TIMEOUT):
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            data = message.get("body", b"")
            size += len(data)
            if size > limit:
                raise too_large(limit)
            parts.append(data)
            if not message.get("more_body", False) or size == length:
                return parts[0] if len(parts) == 1 else b"".join(parts)
    raise BodyTimeout(f"the request body did not arrive within {BODY_TIMEOUT} s")


def _replay(raw: bytes, receive: Receive) -> Receive:
    """``receive`` for a request whose body was read already: the body once, then what ``receive`` gives.

    An empty ``http.request`` message from ``receive`` is the end of that body (which
    :func:`read_body` may not have waited for), so it is passed over.
    """
    pending: Message | None = {"type": "http.request", "body": raw, "more_body": False}

    async def replayed() -> Message:
        nonlocal pending
        if pending is not None:
            message, pending = pending, None
            return message
        while True:
            message = await receive()
            if message["type"] != "http.request" or message.get("body"):
                return message

    return replayed


async def _cancel_on_disconnect(receive: Receive, scope: trio.CancelScope, opened: list[Upstream]) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    scope.cancel()  # first: the relay, waiting on the upstream, takes the cancellation, not a closed socket
    for upstream in opened:
        upstream.abort()  # and llama-server sees the close now, not when the relay next runs


async def send_response(send: Send, response: Response) -> None:
    """A Quart response (an error, a preflight) sent on raw ASGI."""
    body = await response.get_data()
    await send({"type": "http.response.start", "status": response.status_code, "headers": encode_headers(response.headers)})
    await send({"type": "http.response.body", "body": body, "more_body": False})
