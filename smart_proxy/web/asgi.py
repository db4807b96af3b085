"""Reading a request body and sending a :class:`~smart_proxy.handlers.reply.Reply` on raw ASGI.

Theory of operation: :func:`answer` serves one request to a model route. It reads the
body (:func:`read_body`: bounded by ``[proxy] max_body`` and :data:`BODY_TIMEOUT`), runs
the route's function, and sends what it returns (:func:`send_reply`): a whole body as
the start and one body message with its ``Content-Length``, a stream as one body
message per piece and an empty last one. Errors are answered in the route's dialect;
one raised once the answer has started goes on to Hypercorn, which cuts the connection,
so a broken answer never looks complete.

A client that leaves cancels its request: while the route runs and its answer is sent,
a task waits on ``receive`` for ``http.disconnect``. The cancellation closes the
upstream request (which makes llama-server stop generating) and lets go of the lease.
That task also closes the upstream answers the route opened (``Request.opened``) itself,
right after cancelling, so llama-server sees the close at once rather than when the
cancelled task next runs, a pass of the scheduler later.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import trio

from ..errors import BodyTimeout, ProxyError, too_large
from ..handlers.reply import Reply, Request, error_reply, internal_error
from ..handlers.state import ProxyState
from ..routing import HOPS_HEADER, hops
from ..upstream.relay import UpstreamAnswer

__all__ = ["BODY_TIMEOUT", "Handler", "answer", "read_body", "send_reply"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
#: A model route: the proxy's state and the request in, the reply out.
Handler = Callable[[ProxyState, Request], Awaitable[Reply]]

#: Seconds a client has to send its request body (Quart's ``BODY_TIMEOUT`` too).
BODY_TIMEOUT = 300
_HOPS = HOPS_HEADER.encode()


def _hops(scope: Scope) -> int:
    for name, value in scope["headers"]:
        if name == _HOPS:
            return hops(value)
    return 0


async def answer(proxy: ProxyState, scope: Scope, receive: Receive, send: Send, handler: Handler, length: int | None) -> None:
    """Serve one request to a model route with ``handler``; see the module docstring.

    ``length`` is the request's Content-Length, if it gave one (see :func:`read_body`).
    """
    path = scope["path"]
    started = time.perf_counter()  # Ollama's total_duration counts from here
    try:
        raw = await read_body(receive, proxy.config.proxy.max_body, length)
    except ProxyError as exc:
        await send_reply(send, error_reply(exc, path))
        return
    if raw is None:
        return  # the client left before its request was in
    request = Request(path, raw, started, hops=_hops(scope))
    begun = False

    async def send_start(message: Message) -> None:
        nonlocal begun
        begun = True
        await send(message)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(_cancel_on_disconnect, receive, nursery.cancel_scope, request.opened)
        try:
            await send_reply(send, await handler(proxy, request), send_start)
        except ProxyError as exc:
            if begun:  # an answer is going out already: Hypercorn cuts the connection
                raise
            await send_reply(send, error_reply(exc, path))
        except Exception as exc:
            error = internal_error(scope["method"], path, exc)
            if begun:
                raise
            await send_reply(send, error_reply(error, path))
        nursery.cancel_scope.cancel()  # the watcher: the answer is out


async def send_reply(send: Send, reply: Reply, send_start: Send | None = None) -> None:
    """``reply`` on ASGI: a whole body with its Content-Length in one message, a stream piece by piece.

    ``send_start``, if given, sends the start message (to note that the answer has begun).
    """
    start = send_start or send
    if reply.stream is None:
        body = reply.body
        headers = [*reply.headers, (b"content-length", str(len(body)).encode())]
        await start({"type": "http.response.start", "status": reply.status, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})
        return
    async with reply.stream as pieces:
        await start({"type": "http.response.start", "status": reply.status, "headers": reply.headers})
        async for piece in pieces:
            await send({"type": "http.response.body", "body": piece, "more_body": True})
    await send({"type": "http.response.body", "body": b"", "more_body": False})


async def read_body(receive: Receive, limit: int, length: int | None = None) -> bytes | None:
    """The request body, or None if the client left first.

    With ``length`` (the request's Content-Length) the body is complete once that many bytes
    are in. Hypercorn hands a body over as its bytes (``more_body``) and then an empty last
    message; that one is left in the queue (the disconnect watcher passes over it) rather
    than waited for: a pass of the scheduler per request.

    Raises:
        PayloadTooLarge: more than ``limit`` bytes came (a chunked body; the edge checks Content-Length).
        BodyTimeout: the body did not arrive within ``BODY_TIMEOUT`` seconds.
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


async def _cancel_on_disconnect(receive: Receive, scope: trio.CancelScope, opened: list[UpstreamAnswer]) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    scope.cancel()  # first: the route, waiting on the upstream, takes the cancellation, not a closed socket
    for upstream in opened:
        upstream.abort()  # and llama-server sees the close now, not when the route next runs
