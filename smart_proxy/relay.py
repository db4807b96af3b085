"""Forwarding one request to a llama-server (or any upstream) and relaying the answer.

The body goes upstream as the client sent it, byte for byte, and the answer
comes back unchanged: the proxy must not drop or reorder what it does not
understand. Streams are relayed chunk by chunk as they arrive. The lease on the
server is held until the last byte is relayed (or the client has gone), then
released; closing the upstream response on a client disconnect makes
llama-server free the slot.

Requests to llama-servers go through :class:`~smart_proxy.upstream.UpstreamTransport`
(``ProxyState.llama``, made by :func:`make_transport`), an httpx transport with
its own keep-alive pool and a minimal HTTP/1.1 parser, called directly rather
than through ``httpx.AsyncClient``: the client, httpcore and h11 together cost
more CPU per request than the rest of the proxy. Everything else (an upstream
Ollama, health probes, downloads) uses the ordinary client of :func:`make_client`.
:func:`open_upstream` takes either.

At most ``slots`` requests are in flight to one llama-server (its ``/props``
``total_slots``): given the request's lease, :func:`open_upstream` takes one of
its server's slots (:meth:`~smart_proxy.pool.Lease.take_slot`: a free one without a
checkpoint, so the requests a finished load releases go out together; else waiting at
most what is left of ``queue_timeout``) before it sends, and the slot is given back
when the answer is closed. llama-server would queue the excess itself; queueing
it here bounds the wait and keeps the connection pool as small as the server's
slots (with httpx's own transport that mattered more: httpcore rescans every
pooled connection on each request and release, encode/httpx#3215).

A streamed answer is relayed by :class:`RelayBody`, a Quart response body that
reads the upstream in the response's own task: each piece it hands Quart is what
one read of the upstream gave (the upstream transport hands over all the chunks of
one network read as one piece; the body iterates ``response.stream`` itself,
skipping ``aiter_raw``'s layers). A model's tokens (one event per network read)
go out one by one as they come; while a write to the client is slow, or the proxy
falls behind, the events that arrive meanwhile wait in the kernel's buffer and the
next read takes them all, so a burst costs one write through Quart, Hypercorn and
h11 instead of one per event. (An earlier version read ahead in a pump task
through a channel; with a transport that already hands over a read at a time, the
second task and channel only added a task switch per event: 10-15 % of the CPU per
relayed event at 64-512 streams.) Through the ordinary httpx client (an upstream
Ollama) a piece is one chunk, as httpcore gives them.

A body given a ``translation`` (Ollama's NDJSON made from llama-server's SSE,
:class:`smart_proxy.ollama.NDJSONStream`) translates each piece as it is read and
hands on the lines it makes instead, so a burst is still one write;
once the upstream has ended, the translation's closing lines (Ollama's ``done``
object) follow. ``on_done`` runs as soon as the upstream answer is closed, before
those last lines go out, so a client that has the last line knows the lease is gone.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Protocol

import httpx
import trio
from quart.wrappers.response import ResponseBody

from .errors import UpstreamError, UpstreamTimeout
from .upstream import UpstreamTransport

if TYPE_CHECKING:
    from .pool import Lease, Slot

__all__ = ["RelayBody", "Translation", "Upstream", "make_client", "make_transport", "open_upstream"]

log = logging.getLogger(__name__)

#: How long an idle upstream connection is kept for reuse. llama-server (cpp-httplib)
#: answers ``Keep-Alive: timeout=5, max=100`` and closes a connection idle for 5 s; a
#: connection taken from the pool just as the server closes it fails the request with
#: "Server disconnected without sending a response". Letting go sooner avoids the race.
_KEEPALIVE_EXPIRY = 4.0

#: Headers of the upstream answer that describe the connection, not the content.
_HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "transfer-encoding", "content-length", "content-encoding", "date", "server"}
)


def make_client() -> httpx.AsyncClient:
    """The proxy's one HTTP client: no read timeout (generations are long), pooled connections."""
    return httpx.AsyncClient(
        timeout=httpx.Timeout(connect=10.0, read=None, write=60.0, pool=None),
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=256, keepalive_expiry=_KEEPALIVE_EXPIRY),
        trust_env=False,
    )


def make_transport() -> UpstreamTransport:
    """The transport for the hop to llama-servers (see :mod:`smart_proxy.upstream`), timeouts as :func:`make_client`."""
    return UpstreamTransport(connect_timeout=10.0, write_timeout=60.0, keepalive_expiry=_KEEPALIVE_EXPIRY)


class Upstream:
    """An upstream answer whose headers have arrived and whose body is still to come."""

    def __init__(self, response: httpx.Response, slot: Slot | None = None) -> None:
        self.response = response
        self.status_code = response.status_code
        self._slot = slot

    @property
    def headers(self) -> dict[str, str]:
        return {k: v for k, v in self.response.headers.items() if k.lower() not in _HOP_BY_HOP}

    async def read(self) -> bytes:
        response = self.response
        try:
            if "content-encoding" in response.headers:
                return await response.aread()  # httpx decodes it
            # nothing to decode: the raw pieces, without aread's three generator layers per piece
            return b"".join([piece async for piece in response.stream])
        except httpx.HTTPError as exc:
            raise UpstreamError(f"the upstream answer broke off: {describe(exc)}") from exc
        finally:
            await self.aclose()

    def abort(self) -> None:
        """Close the connection under a llama-server's answer at once, without a checkpoint.

        For the task that sees its client leave: the cancelled relay closes the answer too,
        but only when it next runs, a pass of the scheduler later; closing the socket here
        stops llama-server's generation that much sooner when many clients leave at once.
        Answers through the ordinary httpx client (an Ollama upstream) are left to that close.
        """
        abort = getattr(self.response.stream, "abort", None)
        if abort is not None:
            abort()

    async def aclose(self) -> None:
        try:
            with trio.CancelScope(shield=True):
                await self.response.aclose()
        finally:
            if self._slot is not None:
                self._slot.release()
                self._slot = None


def describe(exc: httpx.HTTPError) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


async def open_upstream(
    http: httpx.AsyncClient | httpx.AsyncBaseTransport,
    method: str,
    url: str,
    *,
    content: bytes | None = None,
    headers: dict[str, str] | None = None,
    lease: Lease | None = None,
    first_byte: float | None = None,
) -> Upstream:
    """Send the request and return once the answer's headers are in.

    With ``lease`` (on a llama-server), first take a slot of its server; the answer
    holds it until :meth:`Upstream.aclose`. ``first_byte`` (else the lease's
    ``request_timeout``; 0 or None: no limit) bounds the wait for the answer's head. ``http`` is a client, or a transport
    (the llama-server hop's :class:`~smart_proxy.upstream.UpstreamTransport`) that
    is called directly: ``httpx.AsyncClient``'s own layer (request merging, auth,
    redirects, cookies) cost ~0.4 ms of CPU per request, more than that transport.

    Raises:
        PoolBusy: no slot of the lease's server came free within its queue_timeout.
        UpstreamError: the upstream could not be reached or broke before answering.
        UpstreamTimeout: no answer head within ``first_byte`` seconds (504).
    """
    if isinstance(http, httpx.AsyncClient):
        client = http

        async def send() -> httpx.Response:
            return await client.send(client.build_request(method, url, content=content, headers=headers), stream=True)
    elif isinstance(http, UpstreamTransport):
        upstream = http

        async def send() -> httpx.Response:
            return await upstream.request(method, url, content=content or b"", headers=headers)
    else:
        transport = http

        async def send() -> httpx.Response:
            return await transport.handle_async_request(httpx.Request(method, url, content=content, headers=headers))

    slot = await lease.take_slot() if lease is not None else None
    if first_byte is None:
        first_byte = lease.request_timeout if lease is not None else 0.0
    try:
        with trio.move_on_after(first_byte or math.inf) as waiting:
            try:
                response = await send()
            except httpx.RemoteProtocolError as exc:
                if "without sending a response" not in str(exc):
                    raise
                # A pooled keep-alive connection the server closed just as we reused it (it
                # closes idle ones after 5 s): nothing was answered, so send once more on a
                # fresh connection.
                log.debug("%s: %s; retrying once", url, exc)
                response = await send()
        if waiting.cancelled_caught:
            raise UpstreamTimeout(f"no answer from {url} within request_timeout ({first_byte:g}s)")
    except BaseException as exc:
        if slot is not None:
            slot.release()
        if isinstance(exc, httpx.HTTPError):
            raise UpstreamError(f"cannot reach {url}: {describe(exc)}") from exc
        raise
    return Upstream(response, slot)


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
        """The upstream has ended (or broke off): what to send last."""
        ...


class RelayBody(ResponseBody):
    """A streamed upstream answer as a Quart response body; see the module docstring.

    If the upstream breaks off mid-stream (llama-server crashed), the last piece is
    ``on_error(reason)`` in the caller's dialect (fed through ``translation``, if
    given, like any other piece). ``on_done`` runs exactly once when relaying ends,
    whichever way, after the upstream answer is closed.
    """

    def __init__(
        self,
        upstream: Upstream,
        *,
        on_error: Callable[[str], bytes],
        on_done: Callable[[], object] | None = None,
        translation: Translation | None = None,
    ) -> None:
        self._upstream = upstream
        self._on_error = on_error
        self._on_done = on_done
        self._translation = translation
        # the raw body straight from the transport's stream: Response.aiter_raw adds two
        # generator layers per piece (~0.5 us each time, measured) and nothing the relay needs
        self._chunks = upstream.response.stream.__aiter__()
        self._entered = False
        self._ended = False
        self._finished = False

    async def __aenter__(self) -> RelayBody:
        self._entered = True
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        await self._finish()  # done, or the client left (Cancelled goes on unwrapped)

    def __del__(self) -> None:
        # A client that leaves after the handler returned and before Quart starts the
        # body: Quart never enters it, so let go of the lease and the upstream here
        # (in a system task, since a finalizer cannot await).
        if not self._entered:
            self._entered = True
            self._done()
            try:
                trio.lowlevel.spawn_system_task(self._upstream.aclose)
            except RuntimeError:  # not in Trio's thread, or the run is over: the GC closes the socket
                pass

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
                await self._chunks.aclose()  # the stream or httpx's generator, closed now rather than by the GC
                await self._upstream.aclose()
        finally:
            self._done()

    def __aiter__(self) -> RelayBody:
        return self

    async def __anext__(self) -> bytes:
        translation = self._translation
        while not self._ended:
            try:
                chunk = await self._chunks.__anext__()
            except StopAsyncIteration:
                return await self._last(b"")
            except httpx.HTTPError as exc:
                reason = f"the upstream stream broke off: {describe(exc)}"
                log.warning("%s", reason)
                error = self._on_error(reason)
                return await self._last(error if translation is None else translation.feed(error))
            if translation is None:
                if chunk:
                    return chunk
                continue
            out = translation.feed(chunk)
            if translation.finished:
                return await self._last(out)
            if out:
                return out
        raise StopAsyncIteration

    async def _last(self, piece: bytes) -> bytes:
        """The upstream has ended (or broke off): close it, then the last piece (and the translation's closing lines)."""
        self._ended = True
        await self._finish()
        if self._translation is not None:
            piece += self._translation.close()
        if not piece:
            raise StopAsyncIteration
        return piece
