"""The proxy's HTTP/1.1 client for its hop to llama-servers: a keep-alive pool over trio sockets.

Every relayed request and every streamed event crosses the hop to a local
llama-server, so :class:`LlamaClient` does only what that hop needs: plain
``http://`` to an address it was given, a request whose whole body is at hand,
an answer read as it arrives. The bytes are made and parsed by
:mod:`smart_proxy.upstream.http11` (no I/O); this module does the I/O and keeps
the connections. Everything else the proxy fetches (an Ollama upstream, health
probes, downloads) goes through httpx.

Theory of operation:

- One :class:`LlamaClient` holds, per ``(host, port)``, a LIFO list of idle
  connections. A request takes the most recently used idle one (dropping any
  idle for longer than ``keepalive_expiry``, or that has become readable: the
  server closed it or sent something unasked), else opens a new one (an IP
  address directly, with one non-blocking connect; a name through
  ``trio.open_tcp_stream``). No limit on connections: each server's slots
  (:attr:`smart_proxy.pool.Server.limiter`, taken through
  :meth:`~smart_proxy.pool.Lease.take_slot` before the relay sends) already bound the
  requests in flight.
- Each connection is in one :class:`ConnState` and moves only along
  :data:`TRANSITIONS` (a wrong move is a bug, raised as ``RuntimeError``):
  IDLE -> SENDING -> AWAITING_HEAD -> RECEIVING_BODY -> IDLE for an exchange
  that leaves it reusable, CLOSED from anywhere. Only IDLE ones are pooled.
- The request goes out in one write. The answer (:class:`LlamaResponse`) is
  handed over once its head is in (interim 1xx heads skipped); iterating it gives
  the body bytes of each network read as one piece (all the chunks a read
  brought, joined), so a burst of SSE events costs one step, not one per chunk.
- A connection goes back to the pool only when its answer was read to the end,
  the server did not say ``Connection: close`` (or answer HTTP/1.0 without
  keep-alive) and nothing followed the body. An answer closed or aborted before
  its end (the client left mid-stream), a cancelled request and any error close
  the socket, which is what makes llama-server stop generating and free the slot.
- Errors are this module's, :class:`ClientError` and below; the relay maps them
  to the proxy's. A reused connection that the server closed just before our
  request reached it (llama-server closes connections idle for 5 s) fails with
  :class:`Disconnected`: nothing was answered, so the relay sends once more.
  Connecting and sending are bounded (``connect_timeout``, ``write_timeout``:
  :class:`TimedOut`); reading is not (generations are long; the relay bounds
  the wait for the head).

Checkpoints: every coroutine here is a cancellation point (a cancelled caller
gets ``trio.Cancelled``, and the connection in use, if any, is closed), but a
schedule point only when it has to wait, with one exception below. A send that fits
the socket's buffer and a read of bytes that have already arrived are plain socket
calls: ``SocketStream`` would wrap each in a conflict check, two context managers and a
yield to the scheduler, paid per relayed event on the proxy's one core. A send, read or
connect that waits is Trio's (``wait_readable``, ``send_all``, ``connect``), so
it can be cancelled and a close wakes it. The exception: each network read of an
answer's body is preceded by one yield to the scheduler. A stream's task comes back
to its socket only after every other runnable task has had its turn, so under load a
read takes all the events that came meanwhile (one piece, one send to the client)
instead of the one that came while its own piece was being sent; when the proxy is
idle the yield costs one pass of an empty run queue. The yield is a cancellation point
too: a client that leaves cancels its route and then closes the route's upstream
connection (:class:`smart_proxy.web.asgi.ClientConnection`), both while the route waits
its turn, and the route must come back to the cancellation, not to a read of a closed
socket (which would count as the upstream breaking off). ``tests/test_client.py`` checks that a
cancelled request sends nothing, even on a pooled connection, and that a
cancelled read of body bytes that have already arrived raises ``Cancelled`` and
closes the connection.
"""

from __future__ import annotations

import enum
import functools
import ipaddress
import logging
import math
import select
import socket
import urllib.parse
from collections.abc import Mapping
from types import TracebackType

import trio

from .http11 import BodyReader, Head, ParseError, body_reader, encode_request, parse_head

__all__ = [
    "TRANSITIONS",
    "ClientError",
    "ConnState",
    "ConnectFailed",
    "Disconnected",
    "LlamaClient",
    "LlamaResponse",
    "ProtocolError",
    "ReadFailed",
    "SendFailed",
    "TimedOut",
]

log = logging.getLogger(__name__)

#: Bytes asked of the socket per read.
_READ_SIZE = 65536
_DISCONNECTED = "server disconnected without sending a response"


# ---- errors ------------------------------------------------------------------------------


class ClientError(Exception):
    """An exchange with a llama-server failed; nothing of it can be used."""


class ConnectFailed(ClientError):
    """The connection could not be opened (refused, unreachable): nothing was sent."""


class Disconnected(ClientError):
    """A reused connection closed before any byte of an answer: it went stale as it was taken."""


class SendFailed(ClientError):
    """The request could not be written on a new connection (it broke, or was closed)."""


class ReadFailed(ClientError):
    """The connection broke while the answer was read."""


class TimedOut(ClientError):
    """Connecting or sending took longer than the client's limit."""


class ProtocolError(ClientError):
    """The answer is not HTTP/1.x as :mod:`~smart_proxy.upstream.http11` accepts it, or was cut short."""


# ---- connections -------------------------------------------------------------------------


class ConnState(enum.Enum):
    """Where a connection is in its exchange (see :data:`TRANSITIONS`)."""

    #: No exchange: it may carry a request (new, or back in the pool).
    IDLE = "idle"
    #: The request is being written.
    SENDING = "sending"
    #: The request is out; the answer's head has not all come.
    AWAITING_HEAD = "awaiting_head"
    #: The head is in; the body is being read.
    RECEIVING_BODY = "receiving_body"
    #: The socket is closed.
    CLOSED = "closed"

    # A member is its own only instance and equal only to itself, so its identity hashes it,
    # without Enum's hash of its name (a Python call for every look-up in TRANSITIONS).
    __hash__ = object.__hash__


#: The moves a connection may make (to CLOSED from anywhere, which :meth:`_Connection.close` does).
TRANSITIONS: dict[ConnState, frozenset[ConnState]] = {
    ConnState.IDLE: frozenset({ConnState.SENDING, ConnState.CLOSED}),
    ConnState.SENDING: frozenset({ConnState.AWAITING_HEAD, ConnState.CLOSED}),
    ConnState.AWAITING_HEAD: frozenset({ConnState.RECEIVING_BODY, ConnState.CLOSED}),
    ConnState.RECEIVING_BODY: frozenset({ConnState.IDLE, ConnState.CLOSED}),
    ConnState.CLOSED: frozenset({ConnState.CLOSED}),
}


@functools.lru_cache(maxsize=256)
def _split_url(url: str) -> tuple[tuple[str, int], bytes, bytes]:
    """``((host, port), request target, Host header)`` of an ``http://`` URL.

    The URLs are a llama-server's base URL plus one of a few routes, so the cache stays small.

    Raises:
        ValueError: not an ``http://`` URL with a host (or its port is not a number).
    """
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname
    if parts.scheme != "http" or not host:
        raise ValueError(f"not an http:// URL with a host: {url!r}")
    port = parts.port
    netloc = f"[{host}]" if ":" in host else host
    if port is not None and port != 80:
        netloc += f":{port}"
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return (host, port or 80), target.encode("ascii"), netloc.encode("ascii")


async def _open_stream(host: str, port: int) -> tuple[trio.SocketStream, socket.socket | None]:
    """A TCP connection to ``host``, and for an IP address its socket (see :class:`_Connection`).

    An IP address (a llama-server's 127.0.0.1) is connected with one non-blocking
    connect. ``trio.open_tcp_stream`` resolves a name and races its addresses (happy
    eyeballs) in a nursery with a task per attempt: several more passes of the scheduler,
    paid by every waiting request at once when a cold load ends. A name still goes
    through it.
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
    """One keep-alive TCP connection to a llama-server, and its :class:`ConnState`.

    With ``raw``, the non-blocking socket under ``stream``, a send that fits the socket's
    buffer and a read of what has arrived already are plain socket calls (see the module
    docstring); a wait is Trio's. A name resolved by ``trio.open_tcp_stream`` has no ``raw``.
    """

    __slots__ = ("stream", "key", "state", "idle_since", "reused", "_poller", "_raw")

    def __init__(self, stream: trio.SocketStream, key: tuple[str, int], raw: socket.socket | None = None) -> None:
        self.stream = stream
        self._raw = raw
        self.key = key
        self.state = ConnState.IDLE
        self.idle_since = 0.0
        #: Has carried a request before: a close without an answer means it went stale.
        self.reused = False
        self._poller = select.poll()
        self._poller.register(stream.socket.fileno(), select.POLLIN)

    def to(self, state: ConnState) -> None:
        """Move to ``state``. Raises RuntimeError if :data:`TRANSITIONS` has no such move."""
        if state not in TRANSITIONS[self.state]:
            raise RuntimeError(f"connection to {self.key[0]}:{self.key[1]}: {self.state.name} -> {state.name}")
        self.state = state

    def readable(self) -> bool:
        """Whether the idle socket has something to read: the server closed it, or sent something unasked."""
        try:
            return bool(self._poller.poll(0))
        except (OSError, ValueError):
            return True

    def close(self) -> None:
        # trio's socket close is synchronous (it wakes any task waiting on the socket), so
        # closing needs no checkpoint and cannot be interrupted by a cancellation.
        self.state = ConnState.CLOSED
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
                raise TimedOut("timed out sending the request")
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            if self.reused:
                raise Disconnected(_DISCONNECTED) from exc
            raise SendFailed(str(exc) or type(exc).__name__) from exc

    async def receive(self) -> bytes:
        """What has arrived (waiting until something has); b"" once the server has closed."""
        try:
            raw = self._raw
            if raw is not None:
                while True:
                    try:
                        return raw.recv(_READ_SIZE)
                    except BlockingIOError:
                        await trio.lowlevel.wait_readable(raw)
            return await self.stream.receive_some(_READ_SIZE)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise ReadFailed(str(exc) or type(exc).__name__) from exc


# ---- the answer --------------------------------------------------------------------------


class LlamaResponse:
    """An answer whose head has arrived; iterate it for the body, one piece per network read.

    ``headers`` are the raw ``(name, value)`` pairs as they came. The connection goes
    back to the client's pool once the body has been read to its end (if it may be
    reused); :meth:`aclose` or :meth:`abort` before then closes it.
    """

    __slots__ = ("status", "reason", "headers", "http10", "delimited", "_client", "_conn", "_reader", "_first", "_close")

    def __init__(self, client: LlamaClient, conn: _Connection, head: Head, reader: BodyReader, first: bytes) -> None:
        self.status = head.status
        self.reason = head.reason
        self.headers = head.headers
        self.http10 = head.http10
        #: The body's end is marked (Content-Length, chunked, or no body), not just the close of the connection.
        self.delimited = reader.delimited
        self._client = client
        self._conn: _Connection | None = conn
        self._reader = reader
        self._first = first
        self._close = head.close
        if reader.done:  # no body at all
            self._finish(reader.feed(first) == b"" and not reader.extra)

    def header(self, name: bytes) -> bytes | None:
        """The value of the first header called ``name`` (any case), or None."""
        name = name.lower()
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None

    @property
    def closed(self) -> bool:
        """The body was read to its end, or closed: its connection is back in the pool or closed."""
        return self._conn is None

    def _finish(self, reusable: bool) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            self._client._release(conn, reusable and not self._close)

    def __aiter__(self) -> LlamaResponse:
        return self

    async def __anext__(self) -> bytes:
        conn = self._conn
        reader = self._reader
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            while conn is not None:
                if self._first:
                    data, self._first = self._first, b""
                else:
                    await trio.lowlevel.checkpoint()  # batch under load, and take a cancellation: see the module docstring
                    data = await conn.receive()
                if not data:
                    self._finish(False)
                    reader.eof()
                    break
                out = reader.feed(data)
                if reader.done:  # the connection may be back in the pool now: do not read it again
                    self._finish(not reader.extra)
                    if out:
                        return out
                    break
                if out:
                    return out
        except ParseError as exc:
            self._finish(False)
            raise ProtocolError(str(exc)) from exc
        except BaseException:
            self._finish(False)
            raise
        raise StopAsyncIteration

    def abort(self) -> None:
        """Close the connection now unless the body was read to its end; no checkpoint.

        For a task that must stop a generation at once without awaiting (see
        :meth:`smart_proxy.upstream.relay.UpstreamAnswer.abort`).
        """
        self._finish(False)

    async def aclose(self) -> None:
        """Like :meth:`abort`, then a cancellation point."""
        self._finish(False)
        await trio.lowlevel.checkpoint_if_cancelled()


# ---- the client --------------------------------------------------------------------------


class LlamaClient:
    """Keep-alive HTTP/1.1 to llama-servers; see the module docstring.

    Args:
        connect_timeout, write_timeout: seconds a connect or the write of a request may
            take (None: no limit); longer is :class:`TimedOut`.
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
        self._connect_timeout = connect_timeout
        self._write_timeout = write_timeout
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

    async def __aenter__(self) -> LlamaClient:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.aclose()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Close idle connections as they expire, until cancelled (a service for the root nursery).

        Without it an expired connection is closed only when the next request comes (each
        request sweeps at most every ``keepalive_expiry / 4``), and after a burst its
        descriptor would stay open for as long as the proxy has nothing to relay. It sleeps
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

    async def request(
        self, method: str, url: str, *, content: bytes = b"", headers: Mapping[str, str] | None = None
    ) -> LlamaResponse:
        """Send ``content`` to ``url`` (``http://`` only) and return once the answer's head is in.

        The request carries ``Host``, ``headers`` in order and ``Content-Length`` (see
        :func:`~smart_proxy.upstream.http11.encode_request`).

        Raises:
            ConnectFailed, Disconnected, SendFailed, ReadFailed, TimedOut, ProtocolError:
                see each; the connection is closed.
            ValueError: a URL, method or header this client cannot send as it is.
            RuntimeError: the client is closed.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._closed:
            raise RuntimeError("the llama client is closed")
        key, target, host = _split_url(url)
        raw_method = method.upper().encode("ascii")
        raw_headers = [(name.encode("ascii"), value.encode("ascii")) for name, value in headers.items()] if headers else ()
        payload = encode_request(raw_method, target, host, raw_headers, content)
        conn = self._checkout(key)
        if conn is None:
            conn = await self._connect(key)
        try:
            conn.to(ConnState.SENDING)
            await conn.send(payload, self._write_timeout)
            conn.to(ConnState.AWAITING_HEAD)
            head, first = await self._read_head(conn)
            reader = body_reader(raw_method, head)
            conn.to(ConnState.RECEIVING_BODY)
        except BaseException:
            self._drop(conn)
            raise
        return LlamaResponse(self, conn, head, reader, first)

    async def _read_head(self, conn: _Connection) -> tuple[Head, bytes]:
        """The answer's final head (interim 1xx ones skipped) and the bytes after it."""
        buffer = b""
        while True:
            try:
                data = await conn.receive()
            except ReadFailed as exc:
                if conn.reused and not buffer:
                    raise Disconnected(_DISCONNECTED) from exc
                raise
            if not data:
                if buffer:
                    raise ProtocolError("server disconnected in the middle of the answer head")
                if conn.reused:
                    raise Disconnected(_DISCONNECTED)
                raise ProtocolError("server closed a new connection without answering")
            buffer = buffer + data if buffer else data
            try:
                while (parsed := parse_head(buffer)) is not None:
                    head, start = parsed
                    if head.status < 200:  # an interim answer (http11 refuses a 101): the real one follows
                        buffer = buffer[start:]
                        continue
                    return head, buffer[start:]
            except ParseError as exc:
                raise ProtocolError(str(exc)) from exc

    async def _connect(self, key: tuple[str, int]) -> _Connection:
        within = self._connect_timeout
        try:
            if within is None:
                stream, raw = await _open_stream(*key)
            else:
                with trio.move_on_after(within) as scope:
                    stream, raw = await _open_stream(*key)
                if scope.cancelled_caught:
                    raise TimedOut(f"timed out connecting to {key[0]}:{key[1]}")
        except OSError as exc:
            raise ConnectFailed(str(exc) or type(exc).__name__) from exc
        conn = _Connection(stream, key, raw)
        if self._closed:  # closed while we connected
            conn.close()
            raise RuntimeError("the llama client is closed")
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
        """An answer is over: pool its connection (now IDLE) if it may carry another request, else close it."""
        if not reusable or self._closed:
            self._drop(conn)
            return
        idle = self._idle.setdefault(conn.key, [])
        if len(idle) >= self._max_idle:
            self._drop(conn)
            return
        conn.to(ConnState.IDLE)
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
        """Close every connection, idle or in use (a read waiting on one gets ReadFailed)."""
        self._closed = True
        for conn in list(self._open):
            self._drop(conn)
        self._idle.clear()
        await trio.lowlevel.checkpoint_if_cancelled()
