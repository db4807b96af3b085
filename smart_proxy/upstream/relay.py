"""Forwarding one request to a llama-server (or an Ollama upstream) and relaying the answer.

The body goes upstream as the client sent it, byte for byte, and the answer
comes back unchanged: the proxy must not drop or reorder what it does not
understand. Streams are relayed chunk by chunk as they arrive. The lease on the
server is held until the last byte is relayed (or the client has gone), then
released; closing the upstream response on a client disconnect makes
llama-server free the slot.

Two clients, two ways in. Requests to llama-servers go through the proxy's
:class:`~smart_proxy.upstream.client.LlamaClient` (``ProxyState.llama``, made by
:func:`make_llama_client`), opened by :func:`open_upstream`: the hop every
relayed request and streamed event crosses, so it has its own keep-alive pool and
parser. An Ollama upstream (:mod:`smart_proxy.upstream.ollama_server`) goes through
the ordinary ``httpx.AsyncClient`` of :func:`make_client`, opened by
:func:`open_httpx`, which wraps its answer in :class:`HttpxAnswer`. Either way the
caller gets an :class:`UpstreamAnswer`, and this module is where the failures of both
clients become the proxy's errors: :func:`open_upstream` and :func:`open_httpx`
for the opening (a connection refused before anything was sent is an
:class:`~smart_proxy.errors.UpstreamRefused`, any other failure an
:class:`~smart_proxy.errors.UpstreamError` saying "cannot reach"),
:meth:`UpstreamAnswer.read` and :class:`RelayBody` for the body ("broke off").

At most ``slots`` requests are in flight to one llama-server (its ``/props``
``total_slots``): given the request's lease, :func:`open_upstream` takes one of
its server's slots (:meth:`~smart_proxy.pool.Lease.take_slot`: a free one without a
checkpoint, so the requests a finished load releases go out together; else waiting at
most what is left of ``queue_timeout``) before it sends, and the slot is given back
when the answer is closed. llama-server would queue the excess itself; queueing
it here bounds the wait and keeps the connection pool as small as the server's
slots.

A streamed answer is relayed by :class:`RelayBody`, a stream for
:func:`smart_proxy.web.asgi.send_reply`, which enters it as soon as the handler has
returned it and reads the upstream in the request's own task: each piece it hands on is what
one read of the upstream gave (the llama client hands over all the chunks of one
network read as one piece). A model's tokens (one event per network read) go out
one by one as they come; while a write to the client is slow, or the proxy falls
behind, the events that arrive meanwhile wait in the kernel's buffer and the next
read takes them all, so a burst costs one write through Hypercorn and h11
instead of one per event. Through httpx (an Ollama upstream) a piece is one chunk,
as httpcore gives them.

A body given a ``translation`` (Ollama's NDJSON made from llama-server's SSE,
:class:`smart_proxy.dialects.ollama.NDJSONStream`) translates each piece as it is read and
hands on the lines it makes instead, so a burst is still one write;
once the upstream has ended, the translation's closing lines (Ollama's ``done``
object) follow. ``on_done`` runs as soon as the upstream answer is closed, before
those last lines go out, so a client that has the last line knows the lease is gone.

An answer the upstream did not finish never looks finished. A relayed SSE stream
(:class:`SSELines`) goes out a whole line at a time (an SSE client acts on an event
only at its blank line, so holding back a line's start delays nothing it could use);
when the upstream breaks off, the part of a line it sent is dropped and the error
event starts on a fresh line, where every SSE parser reads it. A stream that ends
without ``data: [DONE]`` (llama-server ends every one with it) gets the same error
event. An Ollama upstream's NDJSON (:class:`NDJSONLines`) is relayed a line at a
time too, so its error line also follows a whole line. A translation is told of a break-off (``fail``) rather than fed an
error event, and judges the end itself. A line longer than ``max_line`` is an error
too, so an upstream that never ends a line cannot make the proxy buffer without end;
:meth:`UpstreamAnswer.read` has the same bound, ``[proxy] max_answer``, for a whole answer.
Each such failure counts the request as failed (:func:`~smart_proxy.metrics.note_failed`).

What goes back to the client of the upstream's answer is checked: a status outside
200-599 is an :class:`~smart_proxy.errors.UpstreamError` (502), and so is a
llama-server answer with a ``Content-Encoding`` (the llama client asks for none and
decodes none); :attr:`UpstreamAnswer.headers` leaves out the connection's own headers (hop-by-hop, and
:attr:`UpstreamAnswer.headers` leaves out the connection's own headers (hop-by-hop, and
those ``Connection`` names), ``Set-Cookie``, values with control bytes and oversized
values. A connection the upstream refused carried nothing: :func:`send_leased` waits
for the pool to notice the crash behind it and sends the request once more.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import TYPE_CHECKING, Protocol

import httpx
import trio

from ..errors import UpstreamError, UpstreamRefused, UpstreamTimeout
from ..metrics import note_failed
from .client import ClientError, ConnectFailed, Disconnected, LlamaClient

if TYPE_CHECKING:
    from ..pool import Lease, Slot

__all__ = [
    "MAX_ANSWER",
    "RawAnswer",
    "HttpxAnswer",
    "LineTooLong",
    "Lines",
    "NDJSONLines",
    "RelayBody",
    "SSELines",
    "Translation",
    "answer_text",
    "UpstreamAnswer",
    "make_client",
    "make_llama_client",
    "open_httpx",
    "open_upstream",
    "send_leased",
]

log = logging.getLogger(__name__)

#: How long an idle upstream connection is kept for reuse. llama-server (cpp-httplib)
#: answers ``Keep-Alive: timeout=5, max=100`` and closes a connection idle for 5 s; a
#: connection taken from the pool just as the server closes it fails the request with
#: "Server disconnected without sending a response". Letting go sooner avoids the race.
_KEEPALIVE_EXPIRY = 4.0

#: Headers of the upstream answer that are not passed on: those of the connection (hop-by-hop,
#: RFC 9110 7.6.1, and the framing, which the proxy sets itself), the upstream's own identity,
#: and cookies (the upstream's cookies are not the proxy's to hand out).
_NOT_RELAYED = frozenset(
    {
        b"connection", b"keep-alive", b"proxy-connection", b"proxy-authenticate", b"proxy-authorization", b"te",
        b"trailer", b"trailers", b"transfer-encoding", b"upgrade", b"content-length", b"content-encoding",
        b"date", b"server", b"set-cookie", b"set-cookie2",
    }
)  # fmt: skip
#: Longest header value passed on: llama-server's are short; a client's parser may refuse a long head.
_MAX_HEADER_VALUE = 4096
#: Control bytes (tab aside) that no header value may carry on to a client.
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
#: Largest upstream answer buffered whole, and longest line of a relayed stream (``[proxy] max_answer``).
MAX_ANSWER = 64 * 1024 * 1024
#: How long a request whose connection was refused waits for the pool to see its server gone.
_RESTART_WAIT = 2.0
#: What the two clients raise when an exchange fails: the llama client's errors, and httpx's.
_BROKEN = (ClientError, httpx.HTTPError)


def make_client() -> httpx.AsyncClient:
    """The proxy's HTTP client for all but llama-servers: no read timeout (generations are long), pooled connections."""
    return httpx.AsyncClient(
        timeout=httpx.Timeout(connect=10.0, read=None, write=60.0, pool=None),
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=256, keepalive_expiry=_KEEPALIVE_EXPIRY),
        trust_env=False,
    )


def make_llama_client() -> LlamaClient:
    """The client for the hop to llama-servers (see :mod:`smart_proxy.upstream.client`), timeouts as :func:`make_client`."""
    return LlamaClient(connect_timeout=10.0, write_timeout=60.0, keepalive_expiry=_KEEPALIVE_EXPIRY)


class _Pieces(Protocol):
    def __anext__(self) -> Awaitable[bytes]: ...

    async def aclose(self) -> None: ...


class RawAnswer(Protocol):
    """An answer whose head is in, as :class:`UpstreamAnswer` reads it.

    A :class:`~smart_proxy.upstream.client.LlamaResponse` is one; an ``httpx.Response``
    becomes one in :class:`HttpxAnswer`.
    """

    #: The status code.
    status: int
    #: The raw ``(name, value)`` header pairs as they came.
    headers: list[tuple[bytes, bytes]]

    @property
    def delimited(self) -> bool:
        """The body's end is marked (Content-Length, chunked, no body), not just the close of the connection."""
        ...

    @property
    def closed(self) -> bool:
        """Read to its end, or closed."""
        ...

    def header(self, name: bytes) -> bytes | None:
        """The value of the first header called ``name`` (any case), or None."""
        ...

    def __aiter__(self) -> _Pieces:
        """The body, piece by piece."""
        ...

    def abort(self) -> None:
        """Close it now, without a checkpoint (or leave it to :meth:`aclose`, if that cannot be done)."""
        ...

    async def aclose(self) -> None: ...


class HttpxAnswer:
    """An ``httpx.Response`` streamed by ``httpx.AsyncClient`` (an Ollama upstream's) as an :class:`RawAnswer`.

    Its pieces are httpx's, one chunk each, decoded when the answer has a Content-Encoding
    (httpx asks for gzip and deflate, and the encoding header is not relayed). httpx cannot
    close a response without awaiting, so :meth:`abort` leaves it to :meth:`aclose`.
    """

    __slots__ = ("response", "status", "headers")

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self.status = response.status_code
        self.headers = response.headers.raw

    @property
    def delimited(self) -> bool:
        headers = self.response.headers
        return "content-length" in headers or "chunked" in headers.get("transfer-encoding", "").lower()

    @property
    def closed(self) -> bool:
        return self.response.is_closed

    def header(self, name: bytes) -> bytes | None:
        value = self.response.headers.get(name.decode("latin-1"))
        return None if value is None else value.encode("latin-1")

    def __aiter__(self) -> _Pieces:
        response = self.response
        return response.aiter_bytes() if "content-encoding" in response.headers else response.stream.__aiter__()

    def abort(self) -> None:
        pass

    async def aclose(self) -> None:
        await self.response.aclose()


def _too_large(limit: int) -> UpstreamError:
    return UpstreamError(f"the upstream answer is larger than {limit} bytes ([proxy] max_answer)")


class UpstreamAnswer:
    """An upstream answer whose headers have arrived and whose body is still to come."""

    def __init__(self, response: RawAnswer, slot: Slot | None = None) -> None:
        self.response = response
        self.status_code = response.status
        self._slot = slot

    @property
    def headers(self) -> dict[str, str]:
        """The answer's headers that go on to the client (names in lower case); see the module docstring."""
        raw = self.response.headers
        named = {
            token.strip().lower() for name, value in raw if name.lower() == b"connection" for token in value.split(b",")
        }
        relayed = {}
        for name, value in raw:
            lower = name.lower()
            if lower in _NOT_RELAYED or lower in named or len(value) > _MAX_HEADER_VALUE or _CONTROL.search(value):
                continue
            relayed[lower.decode("latin-1")] = value.decode("latin-1")
        return relayed

    @property
    def delimited(self) -> bool:
        """The body's end is marked (Content-Length, chunked), not just the close of the connection."""
        return self.response.delimited

    async def read(self, limit: int = MAX_ANSWER) -> bytes:
        """The whole body, at most ``limit`` bytes.

        Raises:
            UpstreamError: the answer broke off (or, framed by the close of the connection,
                is JSON cut short), or is larger than ``limit``.
        """
        response = self.response
        try:
            length = response.header(b"content-length")
            if length is not None and length.isdigit() and int(length) > limit:
                raise _too_large(limit)
            parts = []
            size = 0
            async for piece in response:
                size += len(piece)
                if size > limit:
                    raise _too_large(limit)
                parts.append(piece)
            body = parts[0] if len(parts) == 1 else b"".join(parts)
        except _BROKEN as exc:
            raise UpstreamError(f"the upstream answer broke off: {describe(exc)}") from exc
        finally:
            await self.aclose()
        if not self.delimited and b"json" in (response.header(b"content-type") or b""):
            try:
                json.loads(body)
            except ValueError:
                raise UpstreamError("the upstream answer broke off: its JSON ends early (framed by the close)") from None
        return body

    def abort(self) -> None:
        """Close the connection under a llama-server's answer at once, without a checkpoint.

        For the task that sees its client leave: the cancelled relay closes the answer too,
        but only when it next runs, a pass of the scheduler later; closing the socket here
        stops llama-server's generation that much sooner when many clients leave at once.
        An Ollama upstream's answer (:class:`HttpxAnswer`) is left to that close.
        """
        self.response.abort()

    async def aclose(self) -> None:
        try:
            if not self.response.closed:  # (an answer read to its end has nothing left to close)
                with trio.CancelScope(shield=True):
                    await self.response.aclose()
        finally:
            if self._slot is not None:
                self._slot.release()
                self._slot = None


_TAG = re.compile(rb"<[^>]*>")


def answer_text(body: bytes, limit: int = 500) -> str:
    """An upstream answer's body as the text of an error message: an HTML page's tags left out, spaces collapsed."""
    return " ".join(_TAG.sub(b" ", body[: limit * 8]).decode("utf-8", "replace").split())[:limit]


def describe(exc: BaseException) -> str:
    """An error as a message quotes it: its type, and what it says."""
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _unreachable(url: str, exc: ClientError | httpx.HTTPError, *, sent: bool, name: str | None = None) -> UpstreamError:
    """A failure to open ``url`` as the proxy's error: refused (nothing was ever sent) or not."""
    message = f"cannot reach {url}: {describe(exc)}"
    if name:
        message = f"{name} is unreachable: {message}"
    if not sent and isinstance(exc, (ConnectFailed, httpx.ConnectError)):
        return UpstreamRefused(message)
    return UpstreamError(message)


class _Unbounded:
    """A wait with no time limit, where a ``trio.move_on_after`` would stand: no cancel scope to enter and leave."""

    cancelled_caught = False

    def __enter__(self) -> _Unbounded:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


_UNBOUNDED = _Unbounded()


async def open_upstream(
    llama: LlamaClient,
    method: str,
    url: str,
    *,
    content: bytes = b"",
    headers: dict[str, str] | None = None,
    lease: Lease | None = None,
    first_byte: float | None = None,
) -> UpstreamAnswer:
    """Send a request to a llama-server through ``llama`` and return once the answer's head is in.

    With ``lease``, first take a slot of its server; the answer holds it until
    :meth:`UpstreamAnswer.aclose`. ``first_byte`` (else the lease's ``request_timeout``; 0 or
    None: no limit) bounds the wait for the answer's head. A reused connection the server
    closed before answering (:class:`~smart_proxy.upstream.client.Disconnected`) was not
    answered, so the request goes once more on a new one.

    Raises:
        PoolBusy: no slot of the lease's server came free within its queue_timeout.
        UpstreamRefused: the connection was refused, before anything was sent.
        UpstreamError: the server could not be reached or broke before answering, or
            answered an invalid status or an encoded body.
        UpstreamTimeout: no answer head within ``first_byte`` seconds (504).
    """
    slot = await lease.take_slot() if lease is not None else None
    if first_byte is None:
        first_byte = lease.request_timeout if lease is not None else 0.0
    sent = False  # a request went out on an earlier attempt (the server may have acted on it)
    try:
        with trio.move_on_after(first_byte) if first_byte else _UNBOUNDED as waiting:
            try:
                response = await llama.request(method, url, content=content, headers=headers)
            except Disconnected as exc:
                log.debug("%s: %s; retrying once", url, exc)
                sent = True
                response = await llama.request(method, url, content=content, headers=headers)
        if waiting.cancelled_caught:
            raise UpstreamTimeout(f"no answer from {url} within request_timeout ({first_byte:g}s)")
    except BaseException as exc:
        if slot is not None:
            slot.release()
        if isinstance(exc, ClientError):
            raise _unreachable(url, exc, sent=sent) from exc
        raise
    upstream = UpstreamAnswer(response, slot)
    if not 200 <= response.status <= 599:  # 1xx are the client's; anything else is not HTTP
        await upstream.aclose()
        raise UpstreamError(f"{url} answered an invalid status: {response.status}")
    encoding = response.header(b"content-encoding")
    if encoding is not None and encoding.strip().lower() != b"identity":
        await upstream.aclose()
        raise UpstreamError(f"{url} answered with Content-Encoding {encoding.decode('latin-1')!r}, which was not asked for")
    return upstream


async def open_httpx(http: httpx.AsyncClient, request: httpx.Request, *, name: str | None = None) -> UpstreamAnswer:
    """Send ``request`` through ``http`` (an Ollama upstream's hop) and return once the answer's head is in.

    ``name`` names the upstream in error messages ("the Ollama upstream of model 'x'").
    No retry, no slot, no time limit: :func:`smart_proxy.upstream.ollama_server.send`
    decides those.

    Raises:
        UpstreamRefused: the connection was refused (``__cause__`` is httpx's error).
        UpstreamError: any other failure before the head (``__cause__`` likewise), or an
            invalid status.
    """
    try:
        response = await http.send(request, stream=True)
    except httpx.HTTPError as exc:
        raise _unreachable(str(request.url), exc, sent=False, name=name) from exc
    upstream = UpstreamAnswer(HttpxAnswer(response))
    if not 200 <= response.status_code <= 599:  # 1xx are httpx's; anything else is not HTTP
        await upstream.aclose()
        raise UpstreamError(f"{name or request.url} answered an invalid status: {response.status_code}")
    return upstream


async def send_leased(
    acquire: Callable[[], Awaitable[Lease]], send: Callable[[Lease], Awaitable[UpstreamAnswer]]
) -> tuple[Lease, UpstreamAnswer]:
    """``send(lease)`` on a lease from ``acquire()``; the answer's headers are in, and the lease is the caller's.

    A llama-server that has just crashed refuses connections before the pool has seen it
    exit (its process is reaped a moment later). Nothing was sent, so the request goes
    once more: when the pool has seen the server gone (within ``_RESTART_WAIT``), on a
    new lease, which starts the model again.

    Raises:
        UpstreamRefused: refused twice, or the server refused without going away.
        whatever ``acquire`` and ``send`` raise.
    """
    lease = await acquire()
    try:
        return lease, await send(lease)
    except UpstreamRefused as exc:
        lease.release()
        server = lease.server
        with trio.move_on_after(_RESTART_WAIT):
            await server.gone.wait()
        if not server.gone.is_set():
            raise
        log.info("%s: %s; sending again once its server is restarted", server.name, exc.message)
    except BaseException:
        lease.release()
        raise
    lease = await acquire()
    try:
        return lease, await send(lease)
    except BaseException:
        lease.release()
        raise


class Translation(Protocol):
    """What a :class:`RelayBody` may send instead of the upstream's bytes (no I/O; see the module docstring)."""

    @property
    def finished(self) -> bool:
        """Nothing more will come out: stop reading the upstream."""
        ...

    def feed(self, chunk: bytes) -> bytes:
        """A piece of the upstream body -> what to send for it now (maybe nothing)."""
        ...

    def close(self) -> bytes:
        """The upstream has ended: what to send last (an error, if it ended before its end)."""
        ...

    def fail(self, reason: str) -> bytes:
        """The upstream broke off: the error to send last, in the translation's dialect."""
        ...


class LineTooLong(Exception):
    """A relayed stream's line is longer than its limit."""


class Lines:
    """A line-framed stream cut at line ends, and what was passed on of it (no I/O; see the module docstring).

    :meth:`feed` gives the complete lines of what came, holding the rest of a line back
    (at most ``limit`` bytes: more raises :class:`LineTooLong`). A subclass says what
    a complete stream ends with (:attr:`done`) and what an error must be preceded by
    (:attr:`at_event_end`).
    """

    __slots__ = ("_held", "_size", "_limit", "_tail")

    def __init__(self, limit: int) -> None:
        self._held: list[bytes] = []
        self._size = 0
        self._limit = limit
        self._tail = b""  # the last bytes passed on

    def feed(self, data: bytes) -> bytes:
        end = data.rfind(b"\n") + 1
        if not end:
            self._held.append(data)
            self._size += len(data)
            if self._size > self._limit:
                raise LineTooLong(f"a line of the upstream stream is longer than {self._limit} bytes ([proxy] max_answer)")
            return b""
        out = data if end == len(data) else data[:end]
        if self._held:
            out = b"".join([*self._held, out])
            self._held.clear()
        self._size = len(data) - end
        if self._size:
            self._held.append(data[end:])
        self._passed(out)
        return out

    def _passed(self, out: bytes) -> None:
        self._tail = out[-32:] if len(out) >= 32 else (self._tail + out)[-32:]

    def rest(self) -> bytes:
        """The stream ended: the line held back, as it came."""
        out = b"".join(self._held)
        self.drop()
        if out:
            self._passed(out)
        return out

    def drop(self) -> None:
        """The stream broke off: the line held back is never sent."""
        self._held.clear()
        self._size = 0

    @property
    def at_event_end(self) -> bool:
        """What was passed on ends where an event may follow as it is (or is nothing)."""
        return not self._tail or self._tail.endswith(b"\n")

    @property
    def done(self) -> bool:
        """What was passed on is a complete stream."""
        raise NotImplementedError


class SSELines(Lines):
    """An SSE stream (OpenAI's): an event ends at a blank line, the stream with ``data: [DONE]``."""

    __slots__ = ()

    @property
    def at_event_end(self) -> bool:
        tail = self._tail.replace(b"\r", b"")
        return not tail or tail.endswith(b"\n\n")

    @property
    def done(self) -> bool:
        lines = self._tail.replace(b"\r", b"").rstrip(b"\n").rsplit(b"\n", 1)
        field, _, value = lines[-1].partition(b":")
        return field == b"data" and value.strip() == b"[DONE]"


class NDJSONLines(Lines):
    """An NDJSON stream (an Ollama upstream's own). Its routes end their streams differently (a
    ``done`` object, a pull's ``success`` status), so a body the upstream ended cleanly is complete."""

    __slots__ = ()

    @property
    def done(self) -> bool:
        return True


class RelayBody:
    """A streamed upstream answer, entered once and iterated for its pieces; see the module docstring.

    If the upstream breaks off mid-stream (llama-server crashed), the last piece is
    ``on_error(reason)`` in the caller's dialect (``translation.fail(reason)`` with a
    translation). With ``lines`` (an :class:`SSELines` or :class:`NDJSONLines`), the
    stream is relayed a line at a time and must end as a complete one does. ``on_done``
    runs exactly once when relaying ends, whichever way, after the upstream answer is closed.
    """

    def __init__(
        self,
        upstream: UpstreamAnswer,
        *,
        on_error: Callable[[str], bytes],
        on_done: Callable[[], object] | None = None,
        translation: Translation | None = None,
        lines: Lines | None = None,
    ) -> None:
        self._upstream = upstream
        self._on_error = on_error
        self._on_done = on_done
        self._translation = translation
        self._lines = lines if translation is None else None
        self._chunks = upstream.response.__aiter__()
        self._ended = False
        self._finished = False

    async def __aenter__(self) -> RelayBody:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        await self._finish()  # done, or the client left (Cancelled goes on unwrapped)

    def _done(self) -> None:
        on_done, self._on_done = self._on_done, None
        if on_done is not None:
            on_done()

    async def _finish(self) -> None:
        """Close the upstream answer (whatever was left unread) and let go of the lease, once."""
        if self._finished:
            return
        self._finished = True
        try:
            with trio.CancelScope(shield=True):
                await self._chunks.aclose()  # the answer, or httpx's generator, closed now rather than by the GC
                await self._upstream.aclose()
        finally:
            self._done()

    def __aiter__(self) -> RelayBody:
        return self

    async def __anext__(self) -> bytes:
        translation = self._translation
        lines = self._lines
        while not self._ended:
            try:
                chunk = await self._chunks.__anext__()
            except StopAsyncIteration:
                return await self._last(self._ending())
            except _BROKEN as exc:
                # broken because this relay was cut (its client left, the proxy stops: the route is
                # cancelled and its upstream closed): the answer is cut too, not ended with an error
                await trio.lowlevel.checkpoint_if_cancelled()
                return await self._last(self._failed(f"the upstream stream broke off: {describe(exc)}"))
            if translation is not None:
                out = translation.feed(chunk)
                if translation.finished:
                    note_failed()
                    return await self._last(out)
                if out:
                    return out
                continue
            if lines is not None:
                try:
                    chunk = lines.feed(chunk)
                except LineTooLong as exc:
                    return await self._last(self._failed(str(exc)))
            if chunk:
                return chunk
        raise StopAsyncIteration

    def _ending(self) -> bytes:
        """The upstream ended its body: what is left to send (an error, if the stream was not complete)."""
        if self._translation is not None:
            out = self._translation.close()
            if self._translation.finished:
                note_failed()
            return out
        if self._lines is None:
            return b""
        rest = self._lines.rest()
        if self._lines.done:
            return rest
        return self._failed("the upstream stream ended before its end (no data: [DONE])")

    def _failed(self, reason: str) -> bytes:
        """The last piece of a stream the upstream did not finish: the error, on a line of its own."""
        log.warning("%s", reason)
        note_failed()
        if self._translation is not None:
            return self._translation.fail(reason)
        if self._lines is not None:
            self._lines.drop()
            return (b"" if self._lines.at_event_end else b"\n") + self._on_error(reason)
        return self._on_error(reason)

    async def _last(self, piece: bytes) -> bytes:
        """The upstream has ended (or broke off): close it, then the last piece."""
        self._ended = True
        await self._finish()
        if not piece:
            raise StopAsyncIteration
        return piece
