"""A stream request that waits for its model: SSE comment lines until the answer starts.

Theory of operation: a ``"stream": true`` request whose model has no ready llama-server may
wait long before the upstream's first byte (a download, the queue, a load), and nginx and
clients with read timeouts give up on a silent connection. :class:`LoadingStream` opens the
relay (:func:`~smart_proxy.handlers.openai_routes.open_relay`) in a task of its own and
waits up to ``[proxy] loading_comments`` seconds for it:

* The relay opened within that time: nothing changes. A 200 is relayed as the dialect's
  usual :class:`~smart_proxy.upstream.relay.RelayBody`; an error (the load failed, the pool
  is busy, llama-server refused the request) is raised from ``__aenter__``, before any byte
  went out, so the client gets it with its real status in the dialect's error shape.
* Still waiting: the status (200) and the SSE headers go out, and a comment line every
  ``loading_comments`` seconds says what the request waits for (``: downloading MODEL 42%``,
  ``: loading MODEL 3 s``, ``: waiting for MODEL 5 s``). SSE clients skip comments, so the
  answer is unchanged. When the relay opens with a 200, its pieces follow. When it fails, the
  stream's last piece is the dialect's error event and the stream never ends as a finished
  one does, so an answer the upstream did not give never looks finished. The failure is
  counted with its own status (:func:`~smart_proxy.metrics.note_failed`).

The dialects that stream SSE share this class; a :class:`Framing` holds what differs
between them: how the upstream's answer is relayed (OpenAI chat and completions, Anthropic
messages, Responses each judge their stream's end their own way) and the event that ends
a stream whose wait failed. Comments are the same in all three: the SSE standard's, which
the official openai and anthropic clients skip. Ollama's NDJSON has no comment or
keep-alive line its clients skip, so Ollama streams wait silently.

The task lives in a nursery this stream opens in ``__aenter__`` and closes in ``__aexit__``,
so it is the request's and ends with it: a client that leaves cancels the wait (and, if it
was the last one waiting, the load, as any request that leaves does). The pieces are
returned by ``__anext__``, a plain coroutine, never yielded from inside the nursery.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Awaitable, Callable
from types import TracebackType

import attrs
import trio

from ..config import ModelConfig
from ..dialects import openai as dialect
from ..errors import ProxyError
from ..metrics import note_failed
from ..pool import Lease, Pool
from ..upstream.relay import RelayBody, SSELines, UpstreamAnswer

__all__ = ["OPENAI", "Framing", "LoadingStream", "waiting_comment"]

log = logging.getLogger(__name__)

Opener = Callable[[], Awaitable[tuple[Lease, UpstreamAnswer]]]


@attrs.frozen
class Framing:
    """What a dialect's waiting stream does its own way (see the module docstring)."""

    #: The upstream's 200 answer relayed in the dialect: ``relay(answer, model, limit, on_done)``,
    #: ``on_done`` releasing the lease once the answer is closed.
    relay: Callable[[UpstreamAnswer, str, int, Callable[[], object]], RelayBody]
    #: The last piece of a stream whose wait failed, for the model named.
    error_event: Callable[[ProxyError, str], bytes]


def waiting_comment(pool: Pool, model: ModelConfig, waited: float) -> bytes:
    """The comment line for a request that has waited ``waited`` seconds for ``model``."""
    status = pool.model_status(model)
    if status.download is not None:
        total = status.download.bytes_total
        done = f"{100 * status.download.bytes_done / total:.0f}%" if total else status.download.state
        return f": downloading {model.name} {done}\n\n".encode()
    if status.loading_for is not None:
        return f": loading {model.name} {math.floor(status.loading_for)} s\n\n".encode()
    return f": waiting for {model.name} {math.floor(waited)} s\n\n".encode()


def _message(status: int, body: bytes) -> str:
    """The message of llama-server's error answer (an OpenAI error object, or made one)."""
    wrapped = dialect.upstream_error_body(status, body) or body
    try:
        message = json.loads(wrapped)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = None
    return message if isinstance(message, str) and message else f"llama-server answered HTTP {status}"


def _openai_relay(upstream: UpstreamAnswer, model: str, limit: int, on_done: Callable[[], object]) -> RelayBody:
    return RelayBody(upstream, on_error=dialect.sse_error, on_done=on_done, lines=SSELines(limit))


def _openai_error(exc: ProxyError, model: str) -> bytes:
    return b"data: " + dialect.error_body(exc) + b"\n\n"


#: OpenAI's chat and completion streams: complete at ``data: [DONE]``; an error is a ``data: {"error": ...}`` event.
OPENAI = Framing(_openai_relay, _openai_error)


class LoadingStream:
    """A :class:`~smart_proxy.handlers.reply.Stream` for a stream request in ``framing``'s dialect; see the module docstring."""

    def __init__(
        self,
        pool: Pool,
        model: ModelConfig,
        open_relay: Opener,
        *,
        interval: float,
        limit: int,
        opened: list[UpstreamAnswer],
        framing: Framing = OPENAI,
    ) -> None:
        self._pool = pool
        self._model = model
        self._open = open_relay
        self._framing = framing
        self._interval = interval
        self._limit = limit
        #: The request's open upstream answers (closed at once if the client leaves).
        self._opened = opened
        self._done = trio.Event()
        self._lease: Lease | None = None
        self._upstream: UpstreamAnswer | None = None
        self._error: ProxyError | None = None
        self._relay: RelayBody | None = None
        self._ended = False
        self._nursery_manager = trio.open_nursery()
        self._nursery: trio.Nursery | None = None
        self._started = 0.0

    async def _run(self) -> None:
        try:
            self._lease, self._upstream = await self._open()
            self._opened.append(self._upstream)
        except ProxyError as exc:
            self._error = exc
        except Exception as exc:  # a bug: logged, and still an error for the client, never a stream that just stops
            log.exception("unexpected error opening a relay for %s", self._model.name)
            self._error = ProxyError(f"internal error: {type(exc).__name__}: {exc}")
        finally:
            self._done.set()

    async def __aenter__(self) -> LoadingStream:
        self._started = trio.current_time()
        self._nursery = await self._nursery_manager.__aenter__()
        try:
            self._nursery.start_soon(self._run)
            with trio.move_on_after(self._interval):
                await self._done.wait()
        except BaseException as exc:  # cancelled: the client left before the answer began
            self._nursery.cancel_scope.cancel()
            manager, self._nursery = self._nursery_manager, None
            try:
                await manager.__aexit__(type(exc), exc, exc.__traceback__)
            finally:
                await self._let_go()
            raise
        if self._done.is_set():
            await self._close_nursery()
            if self._error is not None:
                raise self._error
            if self._upstream is not None and self._upstream.status_code != 200:
                raise await self._refused()
            self._relay = self._relay_body()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            if self._nursery is not None:
                self._nursery.cancel_scope.cancel()  # the client left mid-wait, or the answer is out
                await self._close_nursery()
        finally:
            if self._relay is not None:
                await self._relay.__aexit__(exc_type, exc, tb)
            else:
                await self._let_go()

    async def _let_go(self) -> None:
        """Close an upstream answer that will not be relayed, and release its lease."""
        lease, self._lease = self._lease, None
        if lease is None:
            return
        try:
            if self._upstream is not None:
                with trio.CancelScope(shield=True):
                    await self._upstream.aclose()
        finally:
            lease.release()

    async def _close_nursery(self) -> None:
        manager, self._nursery = self._nursery_manager, None
        await manager.__aexit__(None, None, None)

    def _relay_body(self) -> RelayBody:
        assert self._upstream is not None and self._lease is not None
        lease, self._lease = self._lease, None  # the relay releases it now
        return self._framing.relay(self._upstream, self._model.name, self._limit, lease.release)

    async def _refused(self) -> ProxyError:
        """llama-server answered the request with an error: that error, and the lease let go."""
        assert self._upstream is not None and self._lease is not None
        status = self._upstream.status_code
        try:
            body = await self._upstream.read(self._limit)
        finally:
            lease, self._lease = self._lease, None
            lease.release()
        error = ProxyError(_message(status, body))
        error.status = status
        error.kind = "invalid_request_error" if status < 500 else "upstream_error"
        return error

    def __aiter__(self) -> LoadingStream:
        return self

    async def __anext__(self) -> bytes:
        if self._relay is not None:
            return await self._relay.__anext__()
        if self._ended:
            raise StopAsyncIteration
        if not self._done.is_set():
            with trio.move_on_after(self._interval):
                await self._done.wait()
            if not self._done.is_set():
                return waiting_comment(self._pool, self._model, trio.current_time() - self._started)
            await self._close_nursery()
        if self._error is None and self._upstream is not None and self._upstream.status_code != 200:
            self._error = await self._refused()
        if self._error is not None:
            self._ended = True
            note_failed(self._error.status)
            return self._framing.error_event(self._error, self._model.name)
        self._relay = self._relay_body()
        return await self._relay.__anext__()
