"""A lean HTTP/1.1 transport for the proxy's hop to its llama-servers.

httpx stays the client API (requests are ``httpx.Request``, answers are
``httpx.Response`` with a streamed body, errors are httpx's), but under it this
module replaces httpcore and h11 with a small keep-alive pool over trio streams
and a minimal response parser. The hop to a local llama-server is the proxy's
hot path: through httpx's own transport it cost about 1-2 ms of CPU per request
(more than Hypercorn, h11 and Trio's own floor on the serving side) and a large
share of every streamed chunk; a hand-written exchange costs about 0.1 ms.

Theory of operation:

- One :class:`UpstreamTransport` holds, per ``(host, port)``, a LIFO list of
  idle connections. A request takes the most recently used idle one (dropping
  any idle for longer than ``keepalive_expiry``, or that has become readable:
  the server closed it or sent something unasked), else opens a new one. No
  limit on connections: the per-server ``trio.CapacityLimiter`` in
  :mod:`smart_proxy.relay` already bounds requests in flight.
- The request goes out in one write. The answer's head is parsed by
  :func:`parse_head`; the body is framed by Content-Length, chunked
  transfer-encoding (:class:`Chunked`) or the close of the connection, and HEAD,
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
  :func:`smart_proxy.relay.open_upstream` retries it once on a fresh connection.
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

import logging
import select
from collections.abc import AsyncIterator

import httpx
import trio

__all__ = ["Chunked", "UpstreamTransport", "parse_head"]

log = logging.getLogger(__name__)

#: Largest answer head (status line, headers) or trailer section accepted; httpcore allows 100 KiB.
MAX_HEAD = 100 * 1024
#: Largest chunk-size line (size and extensions) accepted.
MAX_CHUNK_LINE = 4096
#: Bytes asked of the socket per read.
_READ_SIZE = 65536
_DISCONNECTED = "Server disconnected without sending a response."
_HEX = frozenset(b"0123456789abcdefABCDEF")
_DIGITS = frozenset(b"0123456789")
_TOKEN_BAD = frozenset(b' \t"(),/:;<=>?@[\\]{}\x7f') | frozenset(range(32))


class Head:
    """A parsed answer head: status, reason, raw headers, and what they say about framing."""

    __slots__ = ("status", "reason", "headers", "http10", "content_length", "chunked", "close")

    def __init__(self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]], http10: bool) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        self.http10 = http10
        self.content_length: int | None = None
        self.chunked = False
        #: The connection cannot carry another request after this answer.
        self.close = False
        close = keep_alive = False
        transfer_encoding = False
        for name, value in headers:
            lower = name.lower()
            if lower == b"content-length":
                if not value or not _DIGITS.issuperset(value):
                    raise httpx.RemoteProtocolError(f"bad Content-Length: {value!r}")
                length = int(value)
                if self.content_length is not None and self.content_length != length:
                    raise httpx.RemoteProtocolError("conflicting Content-Length headers")
                self.content_length = length
            elif lower == b"transfer-encoding":
                transfer_encoding = True
                self.chunked = value.rsplit(b",", 1)[-1].strip().lower() == b"chunked"
            elif lower == b"connection":
                tokens = {token.strip().lower() for token in value.split(b",")}
                if b"close" in tokens:
                    close = True
                elif b"keep-alive" in tokens:
                    keep_alive = True
        self.close = close or (http10 and not keep_alive)
        if transfer_encoding:
            # RFC 9112 6.3: Transfer-Encoding overrides Content-Length, and such an answer
            # (or one whose last coding is not chunked) must not leave the connection reusable.
            if self.content_length is not None or not self.chunked:
                self.close = True
            self.content_length = None


def parse_head(buffer: bytes | bytearray) -> tuple[Head, int] | None:
    """The answer head at the start of ``buffer`` and the offset where its body starts; None if incomplete.

    Raises:
        httpx.RemoteProtocolError: not an HTTP/1.x answer head, or larger than :data:`MAX_HEAD`.
    """
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        if len(buffer) > MAX_HEAD:
            raise httpx.RemoteProtocolError(f"answer head larger than {MAX_HEAD} bytes")
        if buffer and not b"HTTP/1."[: len(buffer)].startswith(bytes(buffer[:7])):
            raise httpx.RemoteProtocolError(f"not an HTTP/1.x answer: {bytes(buffer[:40])!r}")
        return None
    if end > MAX_HEAD:
        raise httpx.RemoteProtocolError(f"answer head larger than {MAX_HEAD} bytes")
    lines = bytes(buffer[:end]).split(b"\r\n")
    status_line = lines[0]
    version, _, rest = status_line.partition(b" ")
    code, _, reason = rest.partition(b" ")
    if version not in (b"HTTP/1.1", b"HTTP/1.0") or len(code) != 3 or not _DIGITS.issuperset(code):
        raise httpx.RemoteProtocolError(f"bad status line: {status_line[:80]!r}")
    headers = []
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not name or not _TOKEN_BAD.isdisjoint(name):
            # also a line folded onto the previous one (obsolete, RFC 9112 5.2) or a bare LF
            raise httpx.RemoteProtocolError(f"bad header line: {line[:80]!r}")
        value = value.strip(b" \t")
        if b"\r" in value or b"\n" in value or b"\0" in value:
            raise httpx.RemoteProtocolError(f"bad header value: {line[:80]!r}")
        headers.append((name, value))
    return Head(int(code), reason, headers, version == b"HTTP/1.0"), end + 4


# ---- body framing: each reader turns received bytes into body bytes (no I/O) ------------


class _Reader:
    #: The body is complete.
    done = False
    #: Bytes received after the end of the body (nothing should follow an answer).
    extra = b""

    def feed(self, data: bytes) -> bytes:
        raise NotImplementedError

    def eof(self) -> None:
        """The connection closed. Raises httpx.RemoteProtocolError if the body was not complete."""
        if not self.done:
            raise httpx.RemoteProtocolError("peer closed connection without sending complete message body")


class _Empty(_Reader):
    done = True

    def feed(self, data: bytes) -> bytes:
        self.extra += data
        return b""


class _Fixed(_Reader):
    def __init__(self, length: int) -> None:
        self._remaining = length
        self.done = length == 0

    def feed(self, data: bytes) -> bytes:
        remaining = self._remaining
        if len(data) < remaining:
            self._remaining = remaining - len(data)
            return data
        self._remaining = 0
        self.done = True
        if len(data) > remaining:
            self.extra = data[remaining:]
            return data[:remaining]
        return data


class _UntilClose(_Reader):
    def feed(self, data: bytes) -> bytes:
        return data

    def eof(self) -> None:
        self.done = True


_SIZE, _DATA, _DATA_END, _TRAILER, _DONE = range(5)


class Chunked(_Reader):
    """Chunked transfer-coding (RFC 9112 7.1): chunk extensions ignored, trailers read and dropped.

    ``feed`` returns the data of every chunk (or part of one) the bytes complete, joined.
    """

    def __init__(self) -> None:
        self._state = _SIZE
        self._remaining = 0
        self._pending = b""  # an incomplete size line, data CRLF or trailer line
        self._trailers = 0

    def feed(self, data: bytes) -> bytes:
        if self._pending:
            data = self._pending + data
            self._pending = b""
        out: list[bytes] = []
        pos = 0
        size = len(data)
        state = self._state
        while pos < size:
            if state == _DATA:
                take = self._remaining
                if size - pos < take:
                    out.append(data[pos:] if pos else data)
                    self._remaining = take - (size - pos)
                    pos = size
                    break
                out.append(data[pos : pos + take])
                pos += take
                state = _DATA_END
            elif state == _DATA_END:
                if size - pos < 2:
                    if data[pos:] != b"\r":
                        raise httpx.RemoteProtocolError("chunk data not followed by CRLF")
                    self._pending = data[pos:]
                    pos = size
                    break
                if data[pos] != 13 or data[pos + 1] != 10:
                    raise httpx.RemoteProtocolError("chunk data not followed by CRLF")
                pos += 2
                state = _SIZE
            elif state == _SIZE:
                eol = data.find(b"\r\n", pos)
                if eol < 0:
                    if size - pos > MAX_CHUNK_LINE:
                        raise httpx.RemoteProtocolError(f"chunk-size line longer than {MAX_CHUNK_LINE} bytes")
                    self._pending = data[pos:]
                    pos = size
                    break
                if eol - pos > MAX_CHUNK_LINE:
                    raise httpx.RemoteProtocolError(f"chunk-size line longer than {MAX_CHUNK_LINE} bytes")
                digits = data[pos:eol].split(b";", 1)[0].rstrip(b" \t")
                if not digits or len(digits) > 16 or not _HEX.issuperset(digits):
                    raise httpx.RemoteProtocolError(f"bad chunk size: {data[pos:eol][:40]!r}")
                pos = eol + 2
                self._remaining = int(digits, 16)
                state = _DATA if self._remaining else _TRAILER
            elif state == _TRAILER:
                eol = data.find(b"\r\n", pos)
                if eol < 0:
                    if self._trailers + size - pos > MAX_HEAD:
                        raise httpx.RemoteProtocolError(f"trailers larger than {MAX_HEAD} bytes")
                    self._pending = data[pos:]
                    pos = size
                    break
                if eol == pos:
                    pos += 2
                    state = _DONE
                    self.done = True
                    continue
                self._trailers += eol + 2 - pos
                if self._trailers > MAX_HEAD:
                    raise httpx.RemoteProtocolError(f"trailers larger than {MAX_HEAD} bytes")
                if b":" not in data[pos:eol]:
                    raise httpx.RemoteProtocolError(f"bad trailer line: {data[pos:eol][:80]!r}")
                pos = eol + 2
            else:  # _DONE
                self.extra += data[pos:]
                pos = size
        self._state = state
        if not out:
            return b""
        return out[0] if len(out) == 1 else b"".join(out)


def body_reader(method: bytes, head: Head) -> _Reader:
    """How the body of this answer to ``method`` is framed (RFC 9112 6.3)."""
    if method == b"HEAD" or head.status in (204, 304) or head.status < 200:
        return _Empty()
    if head.chunked:
        return Chunked()
    if head.content_length is not None:
        return _Fixed(head.content_length)
    head.close = True
    return _UntilClose()


# ---- connections and the pool -------------------------------------------------------------


class _Connection:
    """One keep-alive TCP connection to an upstream."""

    __slots__ = ("stream", "key", "idle_since", "reused", "_poller")

    def __init__(self, stream: trio.SocketStream, key: tuple[str, int]) -> None:
        self.stream = stream
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
        reader: _Reader,
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

    @property
    def connections(self) -> int:
        """Connections open now, idle or in use."""
        return len(self._open)

    @property
    def idle(self) -> int:
        """Idle connections kept for reuse."""
        return sum(len(idle) for idle in self._idle.values())

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self._closed:
            raise RuntimeError("the upstream transport is closed")
        url = request.url
        if url.scheme != "http":
            raise httpx.UnsupportedProtocol(f"only http:// upstreams are supported, not {url.scheme!r}")
        timeouts = request.extensions.get("timeout") or self._timeouts
        method = request.method.encode("ascii")
        head = [method, b" ", url.raw_path, b" HTTP/1.1\r\n"]
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
        key = (url.host, url.port or 80)
        conn = self._checkout(key)
        if conn is None:
            conn = await self._connect(key, timeouts.get("connect"))
        read_timeout = timeouts.get("read")
        try:
            await conn.send(payload, timeouts.get("write"))
            answer, first = await self._read_head(conn, read_timeout)
            reader = body_reader(method, answer)
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
                stream = await trio.open_tcp_stream(*key)
            else:
                with trio.move_on_after(within) as scope:
                    stream = await trio.open_tcp_stream(*key)
                if scope.cancelled_caught:
                    raise httpx.ConnectTimeout(f"timed out connecting to {key[0]}:{key[1]}")
        except OSError as exc:
            raise httpx.ConnectError(str(exc) or type(exc).__name__) from exc
        conn = _Connection(stream, key)
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
