"""Reading a request body and sending a :class:`~smart_proxy.handlers.reply.Reply` on raw ASGI.

Theory of operation: :func:`answer` serves one request to a model route. It reads the
body (:func:`read_body`: bounded by ``[proxy] max_body`` and :data:`BODY_TIMEOUT`), runs
the route's function, and sends what it returns (:func:`send_reply`): a whole body as
the start and one body message with its ``Content-Length``, a stream as one body
message per piece and an empty last one. Errors are answered in the route's dialect;
one raised once the answer has started goes on to Hypercorn, which cuts the connection,
so a broken answer never looks complete.

A client that leaves cancels its request, which closes the upstream request (so
llama-server stops generating) and lets go of the lease. The upstream answers the route
opened (``Request.opened``) are closed right after cancelling, so llama-server sees the
close at once rather than when the cancelled task next runs, a pass of the scheduler later.
How the proxy learns that the client left depends on the connection:

- HTTP/1 under :func:`smart_proxy.server.serve`: the connection carries one request at a
  time, so its end is the request's. The server puts a :class:`ClientConnection` in the
  context of each connection's task, which the request's task inherits, and tells it
  when the client's side of the connection ends (:meth:`ClientConnection.ended`). The
  request registers its cancel scope with it while its route runs; the end cancels it
  at once. No task per request.
- Anything else (HTTP/2, whose streams end one by one; an ASGI server without the hook):
  a task per request waits on ``receive`` for ``http.disconnect`` and cancels the route.
  Hypercorn tells an app ``http.disconnect`` inside the last send of every answer too,
  so that send is shielded: a cancellation there would stop Hypercorn halfway through
  ending the exchange, with the connection's keep-alive timer left stopped.
"""

from __future__ import annotations

import contextvars
import functools
import math
import time
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import Any

import trio

from ..errors import BodyTimeout, ProxyError, too_large
from ..handlers.reply import Reply, Request, error_reply, internal_error
from ..handlers.state import ProxyState
from ..routing import HOPS_HEADER, hops
from ..upstream.relay import UpstreamAnswer

__all__ = ["BODY_TIMEOUT", "CONNECTION", "ClientConnection", "Handler", "Message", "answer", "read_body", "send_reply"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
#: A model route: the proxy's state and the request in, the reply out.
Handler = Callable[[ProxyState, Request], Awaitable[Reply]]

#: Seconds a client has to send its request body (Quart's ``BODY_TIMEOUT`` too).
BODY_TIMEOUT = 300
_HOPS = HOPS_HEADER.encode()
#: The ``http_version`` values of a connection that carries one request at a time.
_ONE_AT_A_TIME = frozenset({"1.0", "1.1"})


class ClientConnection:
    """An HTTP/1 connection, as the request on it sees it: whether the client's side has ended.

    The server makes one per connection and calls :meth:`ended` once the client's side
    ends (it closed, or the connection broke); see the module docstring.
    """

    __slots__ = ("gone", "_scope", "_opened")

    def __init__(self) -> None:
        #: The client's side has ended.
        self.gone = False
        self._scope: trio.CancelScope | None = None
        self._opened: Sequence[UpstreamAnswer] = ()

    def watch(self, scope: trio.CancelScope, opened: Sequence[UpstreamAnswer]) -> bool:
        """Cancel ``scope`` (and close ``opened``) if the client's side ends; False if it has already."""
        if self.gone:
            return False
        self._scope = scope
        self._opened = opened
        return True

    def unwatch(self) -> None:
        self._scope = None
        self._opened = ()

    def ended(self) -> None:
        """The client's side of the connection has ended: cancel the request being served, if one is."""
        self.gone = True
        scope, opened = self._scope, self._opened
        self.unwatch()
        if scope is not None:
            scope.cancel()  # first: the route, waiting on the upstream, takes the cancellation, not a closed socket
            for upstream in opened:
                upstream.abort()  # and llama-server sees the close now, not when the route next runs


#: The connection of the request being served, where the server tells it (see the module docstring).
CONNECTION: contextvars.ContextVar[ClientConnection | None] = contextvars.ContextVar("connection", default=None)


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
    connection = CONNECTION.get()
    if connection is not None and scope.get("http_version") in _ONE_AT_A_TIME:
        with trio.CancelScope() as cancel:
            if not connection.watch(cancel, request.opened):
                return  # the client left right after its request was in
            try:
                await _respond(proxy, scope, request, handler, send, functools.partial(_unwatched, connection, send))
            finally:
                connection.unwatch()
        return
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_cancel_on_disconnect, receive, nursery.cancel_scope, request.opened)
        await _respond(proxy, scope, request, handler, send, functools.partial(_shielded, send))
        nursery.cancel_scope.cancel()  # the watcher: the answer is out


async def _respond(proxy: ProxyState, scope: Scope, request: Request, handler: Handler, send: Send, last: Send) -> None:
    """Run ``handler`` and send its reply, or the error it raised in the route's dialect (see :func:`send_reply`)."""
    begun = False

    async def send_start(message: Message) -> None:
        nonlocal begun
        begun = True
        await send(message)

    path = request.path
    try:
        await send_reply(send, await handler(proxy, request), send_start, last)
    except ProxyError as exc:
        if begun:  # an answer is going out already: Hypercorn cuts the connection
            raise
        await send_reply(send, error_reply(exc, path), last=last)
    except Exception as exc:
        error = internal_error(scope["method"], path, exc)
        if begun:
            raise
        await send_reply(send, error_reply(error, path), last=last)


async def _unwatched(connection: ClientConnection, send: Send, message: Message) -> None:
    """The last message of an answer: the answer is out, so the client's leaving cancels nothing now."""
    connection.unwatch()
    await send(message)


async def _shielded(send: Send, message: Message) -> None:
    """The last message of an answer, shielded (see the module docstring)."""
    with trio.CancelScope(shield=True):
        await send(message)


async def send_reply(send: Send, reply: Reply, send_start: Send | None = None, last: Send | None = None) -> None:
    """``reply`` on ASGI: a whole body with its Content-Length in one message, a stream piece by piece.

    ``send_start``, if given, sends the start message (to note that the answer has begun);
    ``last``, if given, the last one (to end the exchange its own way).
    """
    start = send_start or send
    end = last or send
    if reply.stream is None:
        body = reply.body
        headers = [*reply.headers, (b"content-length", str(len(body)).encode())]
        await start({"type": "http.response.start", "status": reply.status, "headers": headers})
        await end({"type": "http.response.body", "body": body, "more_body": False})
        return
    async with reply.stream as pieces:
        await start({"type": "http.response.start", "status": reply.status, "headers": reply.headers})
        async for piece in pieces:
            await send({"type": "http.response.body", "body": piece, "more_body": True})
    await end({"type": "http.response.body", "body": b"", "more_body": False})


async def read_body(receive: Receive, limit: int, length: int | None = None) -> bytes | None:
    """The request body, or None if the client left first.

    With ``length`` (the request's Content-Length) the body is complete once that many bytes
    are in. Hypercorn hands a body over as its bytes (``more_body``) and then an empty last
    message; that one is left in the queue (the disconnect watcher passes over it) rather
    than waited for. Hypercorn's ``receive`` is a Trio memory channel's: what has arrived
    already (most often the whole body, which came with the request's head) is taken with
    the channel's ``receive_nowait``, without a pass of the scheduler; only a wait for more
    goes through ``receive``, bounded by :data:`BODY_TIMEOUT`.

    Raises:
        PayloadTooLarge: more than ``limit`` bytes came (a chunked body; the edge checks Content-Length).
        BodyTimeout: the body did not arrive within ``BODY_TIMEOUT`` seconds.
    """
    by_channel = getattr(receive, "__func__", None) is trio.MemoryReceiveChannel.receive
    nowait = receive.__self__.receive_nowait if by_channel else None  # type: ignore[attr-defined]
    deadline = math.inf
    parts: list[bytes] = []
    size = 0
    while True:
        message = None
        if nowait is not None:
            try:
                message = nowait()
            except trio.WouldBlock:
                pass
        if message is None:
            if deadline == math.inf:
                deadline = trio.current_time() + BODY_TIMEOUT
            with trio.move_on_at(deadline):
                message = await receive()
            if message is None:
                raise BodyTimeout(f"the request body did not arrive within {BODY_TIMEOUT} s")
        if message["type"] == "http.disconnect":
            return None
        data = message.get("body", b"")
        size += len(data)
        if size > limit:
            raise too_large(limit)
        parts.append(data)
        if not message.get("more_body", False) or size == length:
            return parts[0] if len(parts) == 1 else b"".join(parts)


async def _cancel_on_disconnect(receive: Receive, scope: trio.CancelScope, opened: list[UpstreamAnswer]) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    scope.cancel()  # first: the route, waiting on the upstream, takes the cancellation, not a closed socket
    for upstream in opened:
        upstream.abort()  # and llama-server sees the close now, not when the route next runs
