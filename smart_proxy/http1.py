"""HTTP/1.1 for Hypercorn: the common exchange read and framed here, anything else by Hypercorn.

Hypercorn serves HTTP/1 with h11 (``hypercorn.protocol.h11.H11Protocol``, which hands
each request to an ``HTTPStream``). Between them a request passes through h11's events,
state machine and validation each way, and Hypercorn's wrapping of them: the largest
part of what a proxied request costs. :class:`Http1Protocol` stands in for that pair on
a plain (not TLS) connection. It reads the requests of the common kind itself
(:func:`parse_head`): HTTP/1.1, an origin-form target, one Host, no body or a
Content-Length one, no Transfer-Encoding, Expect or Upgrade, a Connection header of
``close`` or ``keep-alive`` only. The first request of any other kind, or any bytes it
cannot read (a bad request among them), hands the connection over at that request to a
``H11Protocol`` of its own, which serves it and the rest of the connection as Hypercorn
always has (its errors, HTTP/1.0, chunked bodies, 100-continue, upgrades to HTTP/2 or
WebSocket). A request it reads is one h11 would read the same way (``tests/test_http1.py``
checks that against h11).

Answers are framed as h11 frames them (:func:`response_head`): the same head, byte for
byte, with Hypercorn's ``Date`` and ``Server``; a body with a Content-Length as it comes,
any other chunked; header names and values h11 would refuse are refused the same way.
The app sees what ``HTTPStream`` gives it: the same scope, messages and
``http.disconnect``, and the connection is kept alive, paused for a pipelined request,
and closed when h11 would. Two things differ, both about clients that break the
protocol: bytes after a request that asked to close the connection are not read (h11
answers that request with a 400 instead of the app's answer when they come with it), and
a client that closes in the middle of a request's body gets no 400 (h11 sends one).
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from time import time
from typing import Any
from urllib.parse import unquote

import h11
import trio
from hypercorn.events import Closed, Event, RawData, Updated
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.utils import UnexpectedMessageError, build_and_validate_headers

__all__ = ["FALLBACK", "Http1Protocol", "RequestHead", "parse_head", "response_head"]

# h11's grammar (h11/_abnf.py), which the common kind of request must match whole
_TOKEN = rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]+"
_FIELD_VCHAR = rb"[^\x00\s]"
_FIELD_CONTENT = _FIELD_VCHAR + rb"+(?:[ \t]+" + _FIELD_VCHAR + rb"+)*"
_REQUEST_LINE = re.compile(rb"(" + _TOKEN + rb") (/[\x21-\x7e]*) HTTP/1\.1")
_HEADER_LINE = re.compile(rb"(" + _TOKEN + rb"):[ \t]*((?:" + _FIELD_CONTENT + rb")?)[ \t]*")
_NAME = re.compile(_TOKEN)
_VALUE = re.compile(rb"(?:" + _FIELD_CONTENT + rb")?")
_LENGTH = re.compile(rb"[0-9]{1,20}")
#: Request headers that make a request of another kind than the common one.
_OTHER_KIND = frozenset({b"transfer-encoding", b"expect", b"upgrade", b"http2-settings"})


class _Fallback:
    def __repr__(self) -> str:
        return "FALLBACK"


#: What :func:`parse_head` returns for bytes that are not the head of a request of the common kind.
FALLBACK = _Fallback()


class RequestHead:
    """The head of a request of the common kind, as :func:`parse_head` reads it."""

    __slots__ = ("method", "target", "headers", "length", "close", "size")

    def __init__(
        self, method: bytes, target: bytes, headers: list[tuple[bytes, bytes]], length: int, close: bool, size: int
    ) -> None:
        self.method = method
        #: The request target (``/path?query``), as sent.
        self.target = target
        #: ``(name, value)``, names lower-cased, values without surrounding blanks, in order.
        self.headers = headers
        #: The body's Content-Length (0 without one).
        self.length = length
        #: The client asked to close the connection after this exchange.
        self.close = close
        #: The bytes of the head, its blank line included.
        self.size = size


def parse_head(data: bytes, limit: int) -> RequestHead | _Fallback | None:
    """The head at the start of ``data``: a :class:`RequestHead`, :data:`FALLBACK`, or None for more bytes.

    :data:`FALLBACK`: the bytes are not (the start of) a request of the common kind, or
    more than ``limit`` bytes came without the head's end (h11's
    ``max_incomplete_event_size``, which it answers with a 431). h11 reads them instead.
    """
    end = data.find(b"\r\n\r\n")
    if end < 0:
        # h11 refuses at once what cannot start a request line, and a head too long; a head
        # with bare line feeds is h11's to read
        if not data:
            return None
        if data[0] < 0x21 or len(data) > limit or b"\n\n" in data or b"\n\r\n" in data:
            return FALLBACK
        return None
    lines = data[:end].split(b"\r\n")
    line = _REQUEST_LINE.fullmatch(lines[0])
    if line is None:
        return FALLBACK
    method = line[1]
    if method.upper() in (b"HEAD", b"CONNECT"):  # (Hypercorn's scope has the method upper-cased)
        return FALLBACK
    headers = []
    length = -1
    hosts = 0
    close = False
    for raw in lines[1:]:
        field = _HEADER_LINE.fullmatch(raw)
        if field is None:
            return FALLBACK
        name = field[1].lower()
        value = field[2]
        if name == b"content-length":
            if length >= 0 or _LENGTH.fullmatch(value) is None:
                return FALLBACK
            length = int(value)
        elif name == b"host":
            hosts += 1
        elif name == b"connection":
            token = value.lower()
            if token == b"close":
                close = True
            elif token != b"keep-alive":
                return FALLBACK
        elif name in _OTHER_KIND:
            return FALLBACK
        headers.append((name, value))
    if hosts != 1:
        return FALLBACK
    return RequestHead(method, line[2], headers, max(length, 0), close, end + 4)


def response_head(
    status: int, headers: list[tuple[bytes, bytes]], close: bool
) -> tuple[bytes, int | None, bool]:
    """The head h11 writes for an answer to a request of the common kind, and its framing.

    ``close``: the request asked to close the connection. Returns ``(head, length,
    closes)``: ``length`` is the body's Content-Length, or None for a chunked body;
    ``closes``, whether the connection closes after it (``close``, or a ``Connection:
    close`` in ``headers``).

    Raises:
        h11.LocalProtocolError: a header name or value h11 would refuse, a Content-Length
            that is not a number or two that differ, a Transfer-Encoding other than chunked.
    """
    items: list[tuple[bytes, bytes, bytes]] = []  # (as given, lower-cased, value), as h11 keeps them
    closes = close
    length: int | None = None
    chunked = False
    for raw_name, value in headers:
        if _NAME.fullmatch(raw_name) is None:
            raise h11.LocalProtocolError(f"Illegal header name {raw_name!r}")
        if _VALUE.fullmatch(value) is None:
            raise h11.LocalProtocolError(f"Illegal header value {value!r}")
        name = raw_name.lower()
        if name == b"content-length":
            values = {v.strip() for v in value.split(b",")}
            if len(values) != 1:
                raise h11.LocalProtocolError("conflicting Content-Length headers")
            value = values.pop()
            if _LENGTH.fullmatch(value) is None:
                raise h11.LocalProtocolError("bad Content-Length")
            if length is not None:
                if int(value) != length:
                    raise h11.LocalProtocolError("conflicting Content-Length headers")
                continue
            length = int(value)
        elif name == b"transfer-encoding":
            if chunked:
                raise h11.LocalProtocolError("multiple Transfer-Encoding headers")
            value = value.lower()
            if value != b"chunked":
                raise h11.LocalProtocolError("Only Transfer-Encoding: chunked is supported")
            chunked = True
        elif name == b"connection" and b"close" in (v.strip().lower() for v in value.split(b",")):
            closes = True
        items.append((raw_name, name, value))
    if status in (204, 304):
        length, chunked = 0, False
    elif chunked or length is None:  # (h11 drops a Content-Length beside Transfer-Encoding)
        items = [item for item in items if item[1] != b"content-length" and item[1] != b"transfer-encoding"]
        items.append((b"Transfer-Encoding", b"transfer-encoding", b"chunked"))
        length = None
    if close:  # the client asked to close: h11 says so in the answer (an answer that says so itself stays as it is)
        tokens = {v.strip().lower() for _, name, value in items if name == b"connection" for v in value.split(b",")}
        tokens.discard(b"keep-alive")
        tokens.discard(b"")
        tokens.add(b"close")
        items = [item for item in items if item[1] != b"connection"]
        items.extend((b"Connection", b"connection", token) for token in sorted(tokens))
    lines = [b"HTTP/1.1 %d \r\n" % status]
    lines.extend(b"%s: %s\r\n" % (raw, value) for raw, name, value in items if name == b"host")
    lines.extend(b"%s: %s\r\n" % (raw, value) for raw, name, value in items if name != b"host")
    lines.append(b"\r\n")
    return b"".join(lines), length, closes


# ---- the protocol ----------------------------------------------------------------------------

_REQUEST, _RESPONSE, _TRAILERS, _CLOSED = "REQUEST", "RESPONSE", "TRAILERS", "CLOSED"


class Http1Protocol:
    """Hypercorn's ``H11Protocol`` for a plain connection, for requests of the common kind; see the module docstring.

    Made with ``H11Protocol``'s arguments (by :func:`smart_proxy.server.adapt_hypercorn`);
    ``ssl`` is False, as for every connection it is made for.
    """

    def __init__(
        self,
        app: Any,
        config: Any,
        context: Any,
        task_group: Any,
        connection_state: dict,
        ssl: bool,
        client: tuple[str, int] | None,
        server: tuple[str, int] | None,
        send: Callable[[Event], Awaitable[None]],
    ) -> None:
        self.app = app
        self.config = config
        self.context = context
        self.task_group = task_group
        self.connection_state = connection_state
        self.client = client
        self.server = server
        self.send = send
        self.keep_alive_requests = 0
        self._buffer = b""
        self._h11: H11Protocol | None = None  # once the connection is handed over
        self._exchange: _Exchange | None = None
        self._can_read = trio.Event()
        self._closed = False  # by this side: nothing more is read

    async def initiate(self) -> None:
        pass

    async def handle(self, event: Event) -> None:
        if self._h11 is not None:
            await self._h11.handle(event)
        elif self._closed:
            return
        elif type(event) is RawData:
            if not event.data and self._buffer and self._exchange is None:
                await self._hand_over()  # the client's end within a request's head: h11 answers it
                await self._h11.handle(event)
                return
            self._buffer = self._buffer + event.data if self._buffer else event.data
            await self._advance()
        elif type(event) is Closed:
            exchange = self._exchange
            if exchange is not None:
                await exchange.stream_closed()

    async def _advance(self) -> None:
        while self._buffer:
            exchange = self._exchange
            if exchange is not None:
                if exchange.body_left:
                    data = self._buffer[: exchange.body_left]
                    self._buffer = self._buffer[len(data) :]
                    await exchange.body(data)
                    continue
                # a request that came before the answer to the last (pipelined): it waits, as
                # h11 pauses; the connection's reader waits with it
                self._can_read = trio.Event()
                await self._can_read.wait()
                if self._closed:
                    return
                continue
            head = parse_head(self._buffer, self.config.h11_max_incomplete_size)
            if head is None:
                return
            if head is FALLBACK:
                await self._hand_over()
                return
            assert isinstance(head, RequestHead)
            self._buffer = self._buffer[head.size :]
            await self._start(head)

    async def _hand_over(self) -> None:
        self._h11 = protocol = H11Protocol(
            self.app, self.config, self.context, self.task_group, self.connection_state, False, self.client,
            self.server, self.send,
        )
        data, self._buffer = self._buffer, b""
        await protocol.handle(RawData(data=data))

    async def _start(self, head: RequestHead) -> None:
        await self.send(Updated(idle=False))
        path, _, query = head.target.partition(b"?")
        scope = {
            "type": "http",
            "http_version": "1.1",
            "asgi": {"spec_version": "2.1", "version": "3.0"},
            "method": head.method.decode("ascii").upper(),
            "scheme": "http",
            "path": unquote(path.decode("ascii")),
            "raw_path": path,
            "query_string": query,
            "root_path": self.config.root_path,
            "headers": head.headers,
            "client": self.client,
            "server": self.server,
            "state": self.connection_state.copy(),
            "extensions": {},
        }
        self._exchange = exchange = _Exchange(self, scope, head)
        exchange.app_put = await self.task_group.spawn_app(self.app, self.config, scope, exchange.app_send)
        self.keep_alive_requests += 1
        await self.context.mark_request()
        if not head.length:
            await exchange.app_put({"type": "http.request", "body": b"", "more_body": False})

    async def _ended(self, exchange: _Exchange, reusable: bool) -> None:
        """``exchange`` is over: the next request may come (H11Protocol's ``_maybe_recycle``)."""
        if self._exchange is exchange:
            self._exchange = None
        if reusable and not self.context.terminated.is_set():
            self._can_read.set()
            await self.send(Updated(idle=True))
        else:
            self._closed = True
            self._can_read.set()
            await self.send(Closed())


class _Exchange:
    """One request and its answer (Hypercorn's ``HTTPStream`` on HTTP/1.1, with h11's framing)."""

    __slots__ = (
        "protocol", "scope", "app_put", "body_left", "close", "state", "closed", "failed",
        "status", "response", "held", "length", "left", "started",
    )

    def __init__(self, protocol: Http1Protocol, scope: dict, head: RequestHead) -> None:
        self.protocol = protocol
        self.scope = scope
        self.app_put: Callable[[dict], Awaitable[None]] | None = None
        self.body_left = head.length
        self.close = head.close
        self.state = _REQUEST
        self.closed = False
        self.failed = False
        self.status = 0
        self.response: dict | None = None
        self.held = b""  # the head of an answer with a Content-Length, sent with its body
        self.length: int | None = None
        self.left = 0
        self.started = time()

    async def body(self, data: bytes) -> None:
        self.body_left -= len(data)
        if self.closed:  # answered (or the client left) before its body was in: HTTPStream drops it too
            return
        await self.app_put({"type": "http.request", "body": data, "more_body": True})
        if not self.body_left:
            await self.app_put({"type": "http.request", "body": b"", "more_body": False})

    async def stream_closed(self) -> None:
        """The exchange is over, or the client left (HTTPStream's StreamClosed): the app is told."""
        if self.closed:
            return
        self.closed = True
        if self.state != _CLOSED:
            await self.protocol.config.log.access(self.scope, None, time() - self.started)
        if self.app_put is not None:
            await self.app_put({"type": "http.disconnect"})

    async def app_send(self, message: dict | None) -> None:
        if message is None:  # the app is done
            if not self.closed:
                if self.state == _REQUEST:
                    await self._error(500)
                await self._finish()
            return
        kind = message["type"]
        if kind == "http.response.start" and self.state == _REQUEST:
            self.response = message
            status = self.status = int(message["status"])
            if status < 200:
                raise UnexpectedMessageError(self.state, kind)  # (an interim answer: not on this path)
            headers = build_and_validate_headers(message.get("headers", []))
            headers.extend(self.protocol.config.response_headers("h11"))
            protocol = self.protocol
            if protocol.keep_alive_requests >= protocol.config.keep_alive_max_requests:
                headers.append((b"connection", b"close"))
            try:
                head, self.length, self.close = response_head(status, headers, self.close)
            except h11.LocalProtocolError:
                self.failed = True
                raise
            self.state = _RESPONSE
            if self.length is None:
                await self._write(head)  # a stream's head goes out at once
            else:
                self.held, self.left = head, self.length
        elif kind == "http.response.body" and self.state == _RESPONSE:
            body = message.get("body", b"")
            if body and self.status not in (204, 304):
                await self._body(bytes(body))
            if not message.get("more_body", False):
                if self.response.get("trailers", False):
                    self.state = _TRAILERS
                else:
                    await self._end()
        else:
            raise UnexpectedMessageError(self.state, kind)

    async def _body(self, data: bytes) -> None:
        if self.length is None:
            await self._write(b"%x\r\n%s\r\n" % (len(data), data))
            return
        if len(data) > self.left:
            self.failed = True
            raise h11.LocalProtocolError("Too much data for declared Content-Length")
        self.left -= len(data)
        held, self.held = self.held, b""
        await self._write(held + data if held else data)

    async def _end(self) -> None:
        if self.length is None:
            await self._write(b"0\r\n\r\n")
        elif self.left:
            self.failed = True
            raise h11.LocalProtocolError("Too little data for declared Content-Length")
        elif self.held:
            held, self.held = self.held, b""
            await self._write(held)
        self.state = _CLOSED
        await self.protocol.config.log.access(self.scope, self.response, time() - self.started)
        await self._finish()

    async def _finish(self) -> None:
        """The exchange is over (HTTPStream's StreamClosed, then H11Protocol's ``_maybe_recycle``)."""
        await self.stream_closed()
        reusable = self.state == _CLOSED and not self.failed and not self.close and not self.body_left
        await self.protocol._ended(self, reusable)

    async def _error(self, status: int) -> None:
        headers = [(b"content-length", b"0"), (b"connection", b"close"), *self.protocol.config.response_headers("h11")]
        head, _, self.close = response_head(status, headers, self.close)
        await self._write(head)
        self.state = _CLOSED
        await self.protocol.config.log.access(self.scope, {"status": status, "headers": []}, time() - self.started)

    async def _write(self, data: bytes) -> None:
        await self.protocol.send(RawData(data=data))
