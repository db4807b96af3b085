"""A lean HTTP/1.1 transport for the proxy's hop to its llama-servers.

httpx stays the client API (requests are ``httpx.Request``, answers are
``httpx.Response`` with a streamed body, errors are httpx's), but under it this
module replaces httpcore and h11 with a small keep-alive pool over trio streams
and a minimal response parser (:mod:`smart_proxy.upstream.http11`). The hop to a local llama-server is the proxy's
hot path: through httpx's own transport it cost about 1-2 ms of CPU per request
(more than Hypercorn, h11 and Trio's own floor on the serving side) and a large
share of every streamed chunk; a hand-written exchange costs about 0.1 ms.

Theory of operation:

- One :class:`UpstreamTransport` holds, per ``(host, port)``, a LIFO list of
  idle connections. A request takes the most recently used idle one (dropping
  any idle for longer than ``keepalive_expiry``, or that has become readable:
  the server closed it or sent something unasked), else opens a new one (an IP
  address directly, with one non-blocking connect; a name through
  ``trio.open_tcp_stream``). No
  limit on connections: the per-server ``trio.CapacityLimiter`` in
  :mod:`smart_proxy.upstream.relay` already bounds requests in flight.
- The request goes out in one write. The answer's head is parsed by
  :func:`~smart_proxy.upstream.http11.parse_head`; the body is framed by Content-Length, chunked
  transfer-encoding (:class:`~smart_proxy.upstream.http11.Chunked`) or the close of the connection, and HEAD,
  1xx, 204 and 304 answers have none. The response's stream (:class:`_Body`)
  yields the body bytes of each network read as one piece (all the chunks a read
  brought, joined), so a burst of SSE events costs one step, not one per chunk.
- A connection goes back to the pool only when its answer was read to the end,
  the server did not say ``Connection: close`` (or answer HTTP/1.0 without
  keep-alive) and nothing unexpected followed the body. A body closed before its
  end (the client left mid-stream), a cancelled request and any error close the
  socket, which is what makes llama-server stop generating and free the slot.
- A reused connection that the server closed just before our request was read
  fails with ``httpx.RemoteProtocolError("Server disconnected without sending a
  response.")``, the same error httpcore raises, so
  :func:`smart_proxy.upstream.relay.open_upstream` retries it once on a fresh connection.
- Errors are httpx's: ``ConnectError``/``ConnectTimeout``, ``WriteError``/
  ``WriteTimeout``, ``ReadError``/``ReadTimeout``, ``RemoteProtocolError`` for
  bad framing, so callers map them as they always did. Connect and write
  timeouts come from the request's ``timeout`` extension (as an
  ``httpx.AsyncClient`` sets it) or the transport's defaults; reads have none
  unless the request asks for one (generations are long).
- :meth:`UpstreamTransport.aclose` closes every connection, idle or in use.

Why not h11: measured with the proxy pinned to one core against a Go fake
upstream, an h11 exchange on a trio stream cost ~0.5 ms of CPU per request more
than no upstream call at all, this parser ~0.1 ms; h11 also hands out each
chunk of a chunked body as its own event. What this parser accepts is bounded
(heads and chunk-size lines) and anything it does not understand is an error.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import math
import select
import socket
from collections.abc import AsyncIterator, Mapping

import httpx
import trio

from .http11 import BodyReader, Head, body_reader, parse_head

__all__ = ["UpstreamTransport"]

log = logging.getLogger(__name__)

#: Bytes asked of the socket per read.
_READ_SIZE = 65536
_DISCONNECTED = "Server disconnected without sending a response."
#: Request headers that :meth:`UpstreamTransport.request` leaves to ``httpx.Request`` (it frames them itself).
_PLAIN_HEADERS = frozenset({"host", "content-length", "transfer-encoding"})


@functools.lru_cache(maxsize=256)
def _split_url(url: str) -> tuple[tuple[str, int], bytes, bytes]:
    """``((host, port), request target, Host header)`` of an ``http://`` URL, as httpx parses it.

    The URLs are a llama-server's base URL plus one of a few routes, so the cache stays small.
    """
    parsed = httpx.URL(url)
    if parsed.scheme != "http":
        raise httpx.UnsupportedProtocol(f"only http:// upstreams are supported, not {parsed.scheme!r}")
    return (parsed.host, parsed.port or 80), parsed.raw_path, parsed.netloc


# ---- connections and the pool -------------------------------------------------------------


async def _open_stream(host: str, port: int) -> tuple[trio.SocketStream, socket.socket | None]:
    """A TCP connection to ``host``, and for an IP address its socket (see :class:`_Connection`).

    An IP address (a llama-server's 127.0.0.1) is connected directly.

    ``trio.open_tcp_stream`` resolves the name and races its addresses (happy eyeballs):
    a nursery and a task per attempt, three more passes of the scheduler and twice the CPU
    of a plain non-blocking connect (64 connections on one core: ~13 ms against ~6.5).
    After a cold load every waiting request opens its connection at once, so that is paid
    64 times over before the first request goes out. A name still goes through it.
    """
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        return await trio.open_tcp_stream(host, port), None
    raw = socket.socket(family, socket.SOCK_STREAM)
    sock = trio.socket.from_stdlib_socket(raw)  # the same socket, made non-blocking
    try:
        await sock.connect((host, port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock), raw


class _Connection:
    """One keep-alive TCP connection to an upstream.

    With ``raw``, the non-blocking socket under ``stream``, a send that fits the socket's
    buffer (a request, nearly always) and a read of what has arrived already are plain
    socket calls. ``SocketStream`` wraps each in a conflict check, two context managers and
    a check for cancellation, and yields to the scheduler after a send that went through:
    per relayed stream event, and several times per request, on the proxy's one core.
    A wait (nothing to read yet, a full buffer) is Trio's, so cancellation and closing
    work as with the stream; a name resolved by ``trio.open_tcp_stream`` has no ``raw``.
    """

    __slots__ = ("stream", "key", "idle_since", "reused", "_poller", "_raw")

    def __init__(self, stream: trio.SocketStream, key: tuple[str, int], raw: socket.socket | None = None) -> None:
        self.stream = stream
        self._raw = raw
        self.key = key
        self.idle_since = 0.0
        #: Has carried a request before: a close without an answer means it went stale.
        self.reused = False
        self._poller = select.poll()
        self._poller.register(stream.socket.fileno(), select.POLLIN)

    def readable(self) -> bool:
        """Whether the idle socket has something to read: the server closed it, or sent something unasked."""
        try:
            return bool(self._poller.poll(0))
        except (OSError, ValueError):
            return True

    def close(self) -> None:
        # trio's socket close is synchronous (it wakes any task waiting on the socket), so
        # closing needs no checkpoint and cannot be interrupted by a cancellation.
        self.stream.socket.close()

    async def send(self, data: bytes, within: float | None) -> None:
        try:
            if self._raw is not None:
                try:
                    sent = self._raw.send(data)
                except BlockingIOError:
                    sent = 0
                if sent == len(data):
                    return
                data = data[sent:]
            if within is None:
                await self.stream.send_all(data)
                return
            with trio.move_on_after(within) as scope:
                await self.stream.send_all(data)
            if scope.cancelled_caught:
                raise httpx.WriteTimeout("timed out sending the request")
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            if self.reused:
                raise httpx.RemoteProtocolError(_DISCONNECTED) from exc
            raise httpx.WriteError(str(exc) or type(exc).__name__) from exc

    async def receive(self, within: float | None) -> bytes:
        try:
            if self._raw is not None and within is None:
                while True:
                    try:
                        return self._raw.recv(_READ_SIZE)
                    except BlockingIOError:
                        await trio.lowlevel.wait_readable(self._raw)
            if within is None:
                return await self.stream.receive_some(_READ_SIZE)
            with trio.move_on_after(within):
                return await self.stream.receive_some(_READ_SIZE)
            raise httpx.ReadTimeout("timed out reading the answer")
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise httpx.ReadError(str(exc) or type(exc).__name__) from exc


class _Body(httpx.AsyncByteStream):
    """The streamed body of one answer; gives its connection back to the pool once read to the end."""

    def __init__(
        self,
        transport: UpstreamTransport,
        conn: _Connection,
        reader: BodyReader,
        first: bytes,
        head: Head,
        read_timeout: float | None,
    ) -> None:
        self._transport = transport
        self._conn: _Connection | None = conn
        self._reader = reader
        self._first = first
        self._head = head
        self._timeout = read_timeout
        if reader.done:  # no body at all
            self._finish(reader.feed(first) == b"" and not reader.extra)

    def _finish(self, reusable: bool) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            self._transport._release(conn, reusable and not self._head.close)

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        conn = self._conn
        reader = self._reader
        while conn is not None:
            if self._first:
                data, self._first = self._first, b""
            else:
                try:
                    data = await conn.receive(self._timeout)
                except BaseException:
                    self._finish(False)
                    raise
            if not data:
                self._finish(False)
                reader.eof()
                raise StopAsyncIteration
            try:
                out = reader.feed(data)
            except BaseException:
                self._finish(False)
                raise
            if reader.done:  # the connection may be back in the pool now: do not read it again
                self._finish(not reader.extra)
                if out:
                    return out
                break
            if out:
                return out
        raise StopAsyncIteration

    def abort(self) -> None:
        """Close the connection now unless the body was read to the end (no checkpoint: see relay.Upstream.abort)."""
        self._finish(False)

    async def aclose(self) -> None:
        self._finish(False)  # read to the end: already given back; else the socket is closed


class UpstreamTransport(httpx.AsyncBaseTransport):
    """An ``httpx.AsyncBaseTransport`` for plain-HTTP upstreams; see the module docstring.

    Args:
        connect_timeout, write_timeout: used when a request carries no ``timeout`` extension.
        keepalive_expiry: seconds an idle connection is kept for reuse.
        max_idle: idle connections kept per ``(host, port)``; more are closed.
    """

    def __init__(
        self,
        *,
        connect_timeout: float | None = 10.0,
        write_timeout: float | None = 60.0,
        keepalive_expiry: float = 4.0,
        max_idle: int = 256,
    ) -> None:
        self._timeouts = {"connect": connect_timeout, "write": write_timeout, "read": None}
        self._expiry = keepalive_expiry
        self._max_idle = max_idle
        self._idle: dict[tuple[str, int], list[_Connection]] = {}
        self._open: set[_Connection] = set()
        self._next_sweep = 0.0
        self._closed = False
        #: Where :meth:`run` sleeps, and when it next sweeps (inf: no idle connection to wait for).
        self._sweeper_lot = trio.lowlevel.ParkingLot()
        self._sweep_at = math.inf

    @property
    def connections(self) -> int:
        """Connections open now, idle or in use."""
        return len(self._open)

    @property
    def idle(self) -> int:
        """Idle connections kept for reuse."""
        return sum(len(idle) for idle in self._idle.values())

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Close idle connections as they expire, until cancelled (a service for the root nursery).

        Without it an expired connection is closed only when the next request comes (each
        request sweeps at most every ``keepalive_expiry / 4``), so after a burst its
        descriptors stayed open for as long as the proxy had nothing to relay. It sleeps
        until the oldest idle connection expires, and while none is idle until one is put
        back; a connection put back while it already waits for an older one wakes nobody.
        """
        task_status.started()
        while True:
            now = trio.current_time()
            self._sweep(now)
            oldest = min((conn.idle_since for idle in self._idle.values() for conn in idle), default=math.inf)
            self._sweep_at = oldest + self._expiry
            with trio.move_on_at(self._sweep_at):
                await self._sweeper_lot.park()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self._closed:
            raise RuntimeError("the upstream transport is closed")
        url = request.url
        if url.scheme != "http":
            raise httpx.UnsupportedProtocol(f"only http:// upstreams are supported, not {url.scheme!r}")
        head = [request.method.encode("ascii"), b" ", url.raw_path, b" HTTP/1.1\r\n"]
        for name, value in request.headers.raw:
            if b"\r" in value or b"\n" in value or b"\r" in name or b"\n" in name:
                raise httpx.LocalProtocolError(f"bad request header {name!r}")
            head += (name, b": ", value, b"\r\n")
        head.append(b"\r\n")
        try:
            payload = b"".join(head) + request.content
        except httpx.RequestNotRead:  # a streamed request body: read it and send it as it was framed
            content = await request.aread()
            if request.headers.get("transfer-encoding", "").lower() == "chunked":
                content = (b"%x\r\n%s\r\n0\r\n\r\n" % (len(content), content)) if content else b"0\r\n\r\n"
            payload = b"".join(head) + content
        timeouts = request.extensions.get("timeout") or self._timeouts
        return await self._exchange((url.host, url.port or 80), request.method, payload, timeouts, request)

    async def request(
        self, method: str, url: str, *, content: bytes, headers: Mapping[str, str] | None = None
    ) -> httpx.Response:
        """Send ``content`` to ``url`` as ``handle_async_request(httpx.Request(...))`` would, minus the Request.

        The relay's hot path (:func:`smart_proxy.upstream.relay.open_upstream`): building an
        ``httpx.Request`` (parsing the URL, normalising the headers, wrapping the body in a
        stream) cost more CPU than this transport's whole exchange. The bytes sent are the
        ones httpx would frame (``Host``, the given headers, ``Content-Length``); anything this
        does not cover (an empty body, a framing or ``Host`` header of the caller's) goes
        through ``httpx.Request`` after all. The answer carries no ``request``.
        """
        if not content or (headers is not None and not _PLAIN_HEADERS.isdisjoint(name.lower() for name in headers)):
            return await self.handle_async_request(httpx.Request(method, url, content=content, headers=headers))
        if self._closed:
            raise RuntimeError("the upstream transport is closed")
        method = method.upper()
        key, target, host = _split_url(url)
        head = [method.encode("ascii"), b" ", target, b" HTTP/1.1\r\nHost: ", host, b"\r\n"]
        if headers:
            for name, value in headers.items():
                raw_name, raw_value = name.encode("ascii"), value.encode("ascii")
                if b"\r" in raw_value or b"\n" in raw_value or b"\r" in raw_name or b"\n" in raw_name:
                    raise httpx.LocalProtocolError(f"bad request header {raw_name!r}")
                head += (raw_name, b": ", raw_value, b"\r\n")
        head.append(b"Content-Length: %d\r\n\r\n" % len(content))
        head.append(content)
        return await self._exchange(key, method, b"".join(head), self._timeouts, None)

    async def _exchange(
        self,
        key: tuple[str, int],
        method: str,
        payload: bytes,
        timeouts: Mapping[str, float | None],
        request: httpx.Request | None,
    ) -> httpx.Response:
        """Send ``payload`` (a whole request) on a pooled or new connection; the answer once its head is in."""
        conn = self._checkout(key)
        if conn is None:
            conn = await self._connect(key, timeouts.get("connect"))
        read_timeout = timeouts.get("read")
        try:
            await conn.send(payload, timeouts.get("write"))
            answer, first = await self._read_head(conn, read_timeout)
            reader = body_reader(method.encode("ascii"), answer)
        except BaseException:
            self._release(conn, False)
            raise
        return httpx.Response(
            answer.status,
            headers=answer.headers,
            stream=_Body(self, conn, reader, first, answer, read_timeout),
            extensions={"http_version": b"HTTP/1.0" if answer.http10 else b"HTTP/1.1", "reason_phrase": answer.reason},
            request=request,
        )

    async def _read_head(self, conn: _Connection, within: float | None) -> tuple[Head, bytes]:
        buffer = b""
        while True:
            try:
                data = await conn.receive(within)
            except httpx.ReadError as exc:
                if conn.reused and not buffer:
                    raise httpx.RemoteProtocolError(_DISCONNECTED) from exc
                raise
            if not data:
                if buffer:
                    raise httpx.RemoteProtocolError("server disconnected in the middle of the answer head")
                raise httpx.RemoteProtocolError(_DISCONNECTED)
            buffer = buffer + data if buffer else data
            parsed = parse_head(buffer)
            if parsed is None:
                continue
            head, start = parsed
            if 100 <= head.status < 200 and head.status != 101:  # an interim answer: the real one follows
                buffer = buffer[start:]
                parsed = parse_head(buffer) if buffer else None
                if parsed is None:
                    continue
                head, start = parsed
            return head, buffer[start:]

    async def _connect(self, key: tuple[str, int], within: float | None) -> _Connection:
        try:
            if within is None:
                stream, raw = await _open_stream(*key)
            else:
                with trio.move_on_after(within) as scope:
                    stream, raw = await _open_stream(*key)
                if scope.cancelled_caught:
                    raise httpx.ConnectTimeout(f"timed out connecting to {key[0]}:{key[1]}")
        except OSError as exc:
            raise httpx.ConnectError(str(exc) or type(exc).__name__) from exc
        conn = _Connection(stream, key, raw)
        if self._closed:  # closed while we connected
            conn.close()
            raise RuntimeError("the upstream transport is closed")
        self._open.add(conn)
        return conn

    def _checkout(self, key: tuple[str, int]) -> _Connection | None:
        now = trio.current_time()
        if now >= self._next_sweep:
            self._sweep(now)
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()
            if now - conn.idle_since >= self._expiry or conn.readable():
                self._drop(conn)
                continue
            return conn
        return None

    def _release(self, conn: _Connection, reusable: bool) -> None:
        if not reusable or self._closed:
            self._drop(conn)
            return
        idle = self._idle.setdefault(conn.key, [])
        if len(idle) >= self._max_idle:
            self._drop(conn)
            return
        conn.idle_since = trio.current_time()
        conn.reused = True
        idle.append(conn)
        if self._sweep_at == math.inf:  # run() has no idle connection to wait for: now it has
            self._sweeper_lot.unpark_all()

    def _drop(self, conn: _Connection) -> None:
        conn.close()
        self._open.discard(conn)

    def _sweep(self, now: float) -> None:
        """Close idle connections past their expiry (a stopped llama-server's, say)."""
        self._next_sweep = now + self._expiry / 4
        for key, idle in list(self._idle.items()):
            fresh = [conn for conn in idle if now - conn.idle_since < self._expiry]
            for conn in idle:
                if now - conn.idle_since >= self._expiry:
                    self._drop(conn)
            if fresh:
                self._idle[key] = fresh
            else:
                del self._idle[key]

    async def aclose(self) -> None:
        self._closed = True
        for conn in list(self._open):
            self._drop(conn)
        self._idle.clear()
        await trio.lowlevel.checkpoint_if_cancelled()
