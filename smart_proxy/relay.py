"""Forwarding one request to a llama-server (or any upstream) and relaying the answer.

The body goes upstream as the client sent it, byte for byte, and the answer
comes back unchanged: the proxy must not drop or reorder what it does not
understand. Streams are relayed chunk by chunk as they arrive. The lease on the
server is held until the last byte is relayed (or the client has gone), then
released; closing the upstream response on a client disconnect makes
llama-server free the slot.

Relaying is a plain async generator with no nursery or cancel scope around its
``yield`` (PEP 789); the only cancel scope is the shielded one that closes the
upstream response in ``finally``.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable

import httpx
import trio

from .errors import UpstreamError

__all__ = ["StreamBody", "Upstream", "open_upstream", "relay"]

log = logging.getLogger(__name__)

#: Headers of the upstream answer that describe the connection, not the content.
_HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "transfer-encoding", "content-length", "content-encoding", "date", "server"}
)


def make_client() -> httpx.AsyncClient:
    """The proxy's one HTTP client: no read timeout (generations are long), pooled connections."""
    return httpx.AsyncClient(
        timeout=httpx.Timeout(connect=10.0, read=None, write=60.0, pool=None),
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=256, keepalive_expiry=30.0),
        trust_env=False,
    )


class Upstream:
    """An upstream answer whose headers have arrived and whose body is still to come."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self.status_code = response.status_code

    @property
    def headers(self) -> dict[str, str]:
        return {k: v for k, v in self.response.headers.items() if k.lower() not in _HOP_BY_HOP}

    async def read(self) -> bytes:
        try:
            return await self.response.aread()
        except httpx.HTTPError as exc:
            raise UpstreamError(f"the upstream answer broke off: {describe(exc)}") from exc
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            await self.response.aclose()


def describe(exc: httpx.HTTPError) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


async def open_upstream(
    http: httpx.AsyncClient, method: str, url: str, *, content: bytes | None = None, headers: dict[str, str] | None = None
) -> Upstream:
    """Send the request and return once the answer's headers are in.

    Raises:
        UpstreamError: the upstream could not be reached or broke before answering.
    """
    request = http.build_request(method, url, content=content, headers=headers)
    try:
        response = await http.send(request, stream=True)
    except httpx.HTTPError as exc:
        raise UpstreamError(f"cannot reach {url}: {describe(exc)}") from exc
    return Upstream(response)


async def relay(
    upstream: Upstream,
    *,
    on_error: Callable[[str], bytes],
    on_done: Callable[[], object] | None = None,
) -> AsyncIterator[bytes]:
    """Yield the upstream body as it arrives.

    If the upstream breaks off mid-stream (llama-server crashed), yield
    ``on_error(reason)`` as a last chunk in the caller's dialect and stop. ``on_done``
    runs exactly once when relaying ends, whichever way.
    """
    chunks = upstream.response.aiter_raw()
    try:
        async for chunk in chunks:
            yield chunk
    except httpx.HTTPError as exc:
        reason = f"the upstream stream broke off: {describe(exc)}"
        log.warning("%s", reason)
        yield on_error(reason)
    finally:
        if on_done is not None:
            on_done()
        with trio.CancelScope(shield=True):
            await chunks.aclose()  # httpx's generators, closed now rather than by the GC
        await upstream.aclose()


class StreamBody:
    """A streamed response body that always lets go of its upstream and lease.

    Quart closes a body it has iterated; but a client can leave after the handler has
    returned and before the first byte is sent, and then the body's generator never
    starts, so its ``finally`` never runs. This wrapper runs ``on_done`` and closes the
    upstream answer whichever way the body ends: exhausted, broken off, closed before it
    started, or dropped unclosed (then from ``__del__``, closing the upstream in a system
    task, since a finalizer cannot await).
    """

    def __init__(self, chunks: AsyncGenerator[bytes, None], *, upstream: Upstream, on_done: Callable[[], object]) -> None:
        self._chunks = chunks
        self._upstream = upstream
        self._on_done = on_done
        self._closed = False

    def __aiter__(self) -> StreamBody:
        return self

    async def __anext__(self) -> bytes:
        return await self._chunks.__anext__()

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            with trio.CancelScope(shield=True):
                await self._chunks.aclose()
        finally:
            self._on_done()
            await self._upstream.aclose()

    def __del__(self) -> None:
        if not self._closed:
            self._closed = True
            self._on_done()
            try:
                trio.lowlevel.spawn_system_task(self._upstream.aclose)
            except RuntimeError:  # not in Trio's thread, or the run is over: the GC closes the socket
                pass
