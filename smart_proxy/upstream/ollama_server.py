"""An Ollama server as a backend: catalog models with ``backend = ollama`` are served there.

Theory of operation: no pool and no process. A request for such a model goes to
``url + path`` on that Ollama server: Ollama's own routes for Ollama clients, its
``/v1`` routes for OpenAI clients. The body goes as the client sent it, except
the ``model`` field when ``upstream_model`` names the model differently there.
:func:`send` returns the answer once its head is in; the handlers relay it untouched
(:func:`smart_proxy.handlers.reply.relay_answer`: streams a line at a time as they arrive,
so its ``model`` is the upstream's name). An upstream that cannot be reached is
a 502 naming the upstream and the reason, and the model's ``request_timeout``
bounds the wait for an answer's first byte (504).

Connections: a burst of first requests (64 clients at once) would open as many
connections to the Ollama server at the same moment, more than its listen queue
takes, and the excess is reset before it is served. So at most :data:`OPENING`
new connections to one upstream are unproven at once: opened, and not yet given
the head of an answer (which means the server took them); the rest wait their
turn, first come first served. A request on a pooled connection never waits. A
request whose connection was refused, or reset or closed before any answer came,
is sent once more, in turn (Ollama had not begun it: it sent nothing back). Both
go by httpx's ``trace`` request extension, which reports each connection's
opening and the answer's head. :func:`health` probes every upstream
for ``/health``, and :func:`list_models` reads their ``/api/tags`` and
``/api/ps`` concurrently, each within a short timeout (:func:`loaded_models` reads
``/api/ps`` to say which of our models each has loaded).

Agents (:mod:`smart_proxy.agents`) speak OpenAI; a request with agent commands
for such a model reaches it through the same ``/v1`` routes, by :func:`send`.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import weakref
from collections.abc import Iterable
from typing import Any

import httpx
import trio

from ..config import ModelConfig
from ..errors import UpstreamError, UpstreamTimeout
from ..eventbus import EventBus
from .relay import UpstreamAnswer, describe, open_httpx

__all__ = ["OPENING", "health", "list_models", "loaded_models", "remote_name", "send"]

log = logging.getLogger(__name__)

#: How long a probe of an upstream (health, tags, ps) may take.
PROBE_TIMEOUT = 3.0
#: New connections to one upstream opened and not yet answered at once.
OPENING = 16
#: Per client, per upstream base URL: the gate for opening connections.
_gates: weakref.WeakKeyDictionary[httpx.AsyncClient, dict[str, _Gate]] = weakref.WeakKeyDictionary()
_STREAM_TYPES = ("application/x-ndjson", "text/event-stream")


def remote_name(model: ModelConfig) -> str:
    """The model's name on its Ollama server."""
    return model.upstream_model or model.name


def base_url(model: ModelConfig) -> str:
    assert model.url is not None
    return model.url.rstrip("/")


async def send(
    http: httpx.AsyncClient,
    model: ModelConfig,
    method: str,
    path: str,
    *,
    payload: dict[str, Any] | None = None,
    raw: bytes | None = None,
) -> UpstreamAnswer:
    """Send a request for ``model`` to its Ollama server; return once the answer's headers are in.

    The body is ``raw`` as the client sent it, unless its ``model`` must be renamed
    (``upstream_model``) or there is no ``raw``: then ``payload``, with the upstream's name.

    Raises:
        UpstreamError: the Ollama server cannot be reached (502); refused or dropped before
            any answer, the request goes once more first.
        UpstreamTimeout: no answer head within the model's ``request_timeout`` (504).
    """
    content = raw
    if payload is not None and (raw is None or payload.get("model") != remote_name(model)):
        content = json.dumps({**payload, "model": remote_name(model)}).encode()
    url = base_url(model) + path
    gate = _gate(http, base_url(model))
    first_byte = model.request_timeout or math.inf
    for retry in (False, True):
        attempt = _Attempt(gate)
        request = http.build_request(
            method, url, content=content, headers={"Content-Type": "application/json"}, extensions={"trace": attempt.trace}
        )
        try:
            with trio.move_on_after(first_byte):
                return await open_httpx(http, request, name=f"the Ollama upstream of model {model.name!r}")
            raise UpstreamTimeout(
                f"the Ollama upstream of model {model.name!r} did not answer within request_timeout ({first_byte:g}s)"
            )
        except UpstreamError as exc:
            cause = exc.__cause__
            if not retry and isinstance(cause, httpx.HTTPError) and attempt.unanswered(cause):
                log.info("%s: %s before any answer; sending once more", url, describe(cause))
                continue
            raise
        finally:
            attempt.done()
    raise AssertionError("unreachable")


class _Gate:
    """At most :data:`OPENING` new connections to one upstream unproven (opened, unanswered) at once."""

    def __init__(self) -> None:
        self._semaphore = trio.Semaphore(OPENING)
        self.opening = 0
        #: The most ever unproven at once (for tests and curiosity).
        self.peak = 0

    async def enter(self) -> None:
        await self._semaphore.acquire()
        self.opening += 1
        self.peak = max(self.peak, self.opening)

    def leave(self) -> None:
        self.opening -= 1
        self._semaphore.release()


def _gate(http: httpx.AsyncClient, url: str) -> _Gate:
    gates = _gates.setdefault(http, {})
    gate = gates.get(url)
    if gate is None:
        gate = gates[url] = _Gate()
    return gate


class _Attempt:
    """One try at sending a request, followed through httpx's ``trace`` extension."""

    def __init__(self, gate: _Gate) -> None:
        self._gate = gate
        self._opening = False
        #: This try opened a connection (else it reused a pooled one).
        self.fresh = False
        #: The answer's head came (from then on Ollama has begun the request: never resend).
        self.answered = False

    async def trace(self, event: str, info: dict[str, Any]) -> None:
        if event == "connection.connect_tcp.started":
            await self._gate.enter()
            self._opening = self.fresh = True
        elif event == "connection.connect_tcp.failed":
            self.done()
        elif event == "http11.receive_response_headers.complete":
            self.answered = True
            self.done()

    def done(self) -> None:
        """The connection has its answer's head, or the try is over: let the next one go."""
        if self._opening:
            self._opening = False
            self._gate.leave()

    def unanswered(self, exc: httpx.HTTPError) -> bool:
        """Whether ``exc`` says the upstream refused the connection, or dropped it before answering."""
        if self.answered or isinstance(exc, httpx.TimeoutException):
            return False
        if isinstance(exc, httpx.ConnectError):
            return True
        if not isinstance(exc, (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError)):
            return False
        if "without sending a response" in str(exc):  # closed at once: a fresh one, or a stale pooled one
            return True
        cause = exc.__cause__ or exc.__context__
        while cause is not None and not isinstance(cause, OSError):
            cause = cause.__cause__ or cause.__context__
        return self.fresh and isinstance(cause, OSError) and cause.errno in (errno.ECONNRESET, errno.EPIPE)


async def _get_json(http: httpx.AsyncClient, url: str) -> tuple[Any, str | None]:
    """``GET url`` within PROBE_TIMEOUT: (the JSON, None) or (None, why not)."""
    try:
        response = await http.get(url, timeout=PROBE_TIMEOUT)
    except httpx.HTTPError as exc:
        return None, describe(exc)
    if response.status_code != 200:
        return None, f"HTTP {response.status_code} from {url}"
    try:
        return response.json(), None
    except ValueError:
        return None, f"{url} did not answer JSON"


async def _gather(http: httpx.AsyncClient, urls: Iterable[str]) -> dict[str, tuple[Any, str | None]]:
    results: dict[str, tuple[Any, str | None]] = {}

    async def one(url: str) -> None:
        results[url] = await _get_json(http, url)

    async with trio.open_nursery() as nursery:
        for url in set(urls):
            nursery.start_soon(one, url)
    return results


def _upstreams(models: Iterable[ModelConfig]) -> dict[str, list[ModelConfig]]:
    by_url: dict[str, list[ModelConfig]] = {}
    for model in models:
        if model.backend == "ollama":
            by_url.setdefault(base_url(model), []).append(model)
    return by_url


async def health(http: httpx.AsyncClient, models: Iterable[ModelConfig]) -> list[dict[str, Any]]:
    """Every Ollama upstream: ``{"url", "models", "status": "ok"|"down", "version" or "error"}``."""
    by_url = _upstreams(models)
    results = await _gather(http, [url + "/api/version" for url in by_url])
    report = []
    for url, served in sorted(by_url.items()):
        body, error = results[url + "/api/version"]
        entry: dict[str, Any] = {"url": url, "models": [m.name for m in served]}
        if error is None:
            entry.update(status="ok", version=(body or {}).get("version") if isinstance(body, dict) else None)
        else:
            entry.update(status="down", error=error)
        report.append(entry)
    return report


class UpstreamMonitor:
    """Probes every Ollama upstream now and then, so ``/health`` can say which are down
    without calling them on the probe's own time. With a ``bus``, an upstream whose status
    changed (``ok``, ``down``) is published as an ``upstream`` event, its report entry the data."""

    def __init__(
        self, http: httpx.AsyncClient, models: Iterable[ModelConfig], interval: float = 10.0, *, bus: EventBus | None = None
    ) -> None:
        self._http = http
        self._models = list(models)
        self._interval = interval
        self._bus = bus
        #: The last probe's report, as :func:`health` gives it; empty with no upstreams.
        self.report: list[dict[str, Any]] = []

    def _update(self, report: list[dict[str, Any]]) -> None:
        before = {entry["url"]: entry["status"] for entry in self.report}
        self.report = report
        if self._bus is not None:
            for entry in report:
                if before.get(entry["url"]) != entry["status"]:
                    self._bus.publish("upstream", **entry)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        if not _upstreams(self._models):
            task_status.started()
            return
        self._update(await health(self._http, self._models))
        task_status.started()
        while True:
            await trio.sleep(self._interval)
            self._update(await health(self._http, self._models))


async def list_models(http: httpx.AsyncClient, models: Iterable[ModelConfig], route: str) -> dict[str, dict[str, Any]]:
    """Our upstream models as their Ollama servers list them on ``route`` (``/api/tags`` or ``/api/ps``).

    Returns ``{catalog name: the upstream's entry}`` for the models the upstream
    has; upstreams that do not answer are left out (``/health`` says why).
    """
    by_url = _upstreams(models)
    results = await _gather(http, [url + route for url in by_url])
    found: dict[str, dict[str, Any]] = {}
    for url, served in by_url.items():
        body, _error = results[url + route]
        entries = body.get("models") if isinstance(body, dict) else None
        if not isinstance(entries, list):
            continue
        for model in served:
            wanted = {remote_name(model), f"{remote_name(model)}:latest"}
            for entry in entries:
                if isinstance(entry, dict) and (entry.get("name") in wanted or entry.get("model") in wanted):
                    found[model.name] = entry
                    break
    return found


async def loaded_models(http: httpx.AsyncClient, models: Iterable[ModelConfig]) -> dict[str, bool | str]:
    """Whether each of our upstream models is loaded on its Ollama server, by its ``/api/ps``.

    Returns ``{catalog name: True (listed), False (not listed), or why the upstream did not answer}``.
    """
    by_url = _upstreams(models)
    results = await _gather(http, [url + "/api/ps" for url in by_url])
    found: dict[str, bool | str] = {}
    for url, served in by_url.items():
        body, error = results[url + "/api/ps"]
        entries = body.get("models") if isinstance(body, dict) else None
        if not isinstance(entries, list):
            why = error or f"{url}/api/ps did not list models"
            found.update((model.name, why) for model in served)
            continue
        names = {
            name
            for entry in entries
            if isinstance(entry, dict)
            for name in (entry.get("name"), entry.get("model"))
            if isinstance(name, str)
        }
        for model in served:
            found[model.name] = bool(names & {remote_name(model), f"{remote_name(model)}:latest"})
    return found
