"""Peers: other servers whose models this proxy serves too (``[peer:NAME]`` sections).

Theory of operation: :class:`Fleet` holds one :class:`Peer` per section. Its
:meth:`Fleet.run`, a service of the root nursery, reads every peer's models once
before it reports started, then keeps one task per peer that reads them again every
``refresh`` seconds. What a peer has, and in which state, is read the way its kind
says:

- ``smart-proxy``: ``GET /v1/models``, each entry's ``status.value`` (``loaded`` or
  not) and ``memory``; entries the peer itself serves from its own peers (their
  ``served_by`` does not name ``local``) are left out, so two proxies that name each
  other do not send a request round in a circle;
- ``ollama``: ``GET /api/tags`` (every model, with its size) and ``GET /api/ps`` (the
  loaded ones), concurrently;
- ``openai``: ``GET /v1/models``; an entry with a ``status`` object (llama-server's
  router mode) says whether it is loaded, any other counts as loaded (a plain
  OpenAI-compatible server serves what it lists).

Only the models ``[peer:NAME] models`` lets through are kept. Names are matched as
Ollama matches them: ``name`` and ``name:latest`` are one model; ``name:7b`` is
another.

Each peer has a circuit breaker (:class:`smart_proxy.breaker.Breaker`): a read of its
models that fails, or a request that cannot be sent or gets no answer head within
``request_timeout``, counts as a failure; ``failures`` in a row take the peer out.
While out, its task sleeps until the breaker's ``cooldown`` is over, then sends one
half-open probe (the same read); a success brings the peer back. :meth:`Fleet.send`
relays one request to a peer with its ``api_key`` as ``Authorization: Bearer``; the
key is never logged or shown (errors name the peer and its URL only). An ``http://``
peer is reached through the proxy's own HTTP/1.1 client (the one of the hop to
llama-servers, :mod:`smart_proxy.upstream.client`), an ``https://`` one through httpx.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from typing import Any, Protocol

import attrs
import httpx
import trio

from ..breaker import Breaker, BreakerState
from ..config import PeerConfig
from ..errors import UpstreamError, UpstreamTimeout
from ..eventbus import EventBus
from ..metrics import PeerGauge
from ..routing import HOPS_HEADER, Candidate, rank
from .client import LlamaClient
from .relay import UpstreamAnswer, describe, open_httpx, open_upstream

__all__ = ["Fleet", "Peer", "PeerEvents", "PeerModel", "model_key"]

log = logging.getLogger(__name__)


def model_key(name: str) -> str:
    """The name two spellings of one model share: ``gemma`` and ``gemma:latest`` are one model."""
    return name.removesuffix(":latest")


@attrs.frozen
class PeerModel:
    """One model a peer has, as it last said."""

    #: The name the peer lists it under.
    name: str
    loaded: bool
    #: The peer's word for its state (``loaded``, ``unloaded``, ``loading``, ...).
    state: str
    #: Bytes a load brings into memory (its file size, or the peer's estimate), if the peer says.
    size: int | None
    #: The peer's own list entry (Ollama's ``/api/tags`` object, or the ``/v1/models`` one).
    entry: dict[str, Any] = attrs.field(factory=dict, eq=False)


class PeerEvents(Protocol):
    """What a fleet tells an observer (``smart_proxy.metrics.Metrics``); must not block."""

    def peer_request(self, peer: str, outcome: str) -> None: ...


class Peer:
    """One peer: its settings, its breaker, what it has, and this proxy's requests in flight to it."""

    def __init__(self, config: PeerConfig) -> None:
        self.config = config
        self.breaker = Breaker(failures=config.failures, cooldown=config.cooldown)
        #: By :func:`model_key`.
        self.models: dict[str, PeerModel] = {}
        self.in_flight = 0
        #: When its models were last read (``trio.current_time()``), or None.
        self.learned_at: float | None = None
        #: Why the last read failed, or None.
        self.error: str | None = None
        #: Requests relayed to it (their answer's head came).
        self.served = 0

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def base_url(self) -> str:
        return self.config.url.rstrip("/")

    @property
    def up(self) -> bool:
        return self.breaker.allows

    def headers(self) -> dict[str, str]:
        if self.config.api_key:
            return {"Authorization": f"Bearer {self.config.api_key}"}
        return {}

    def model(self, name: str) -> PeerModel | None:
        return self.models.get(model_key(name))

    def done(self) -> None:
        """A request relayed to it has ended (its answer closed)."""
        self.in_flight -= 1

    def candidate(self, found: PeerModel) -> Candidate:
        """This peer as a place to serve ``found`` (:func:`smart_proxy.routing.rank`)."""
        cold = 0.0 if found.loaded else (float(found.size) if found.size else math.inf)
        return Candidate(self.name, found.loaded, queue=self.in_flight, cold_cost=cold, weight=self.config.weight)


class Fleet:
    """Every peer, what each has, and the task that keeps that fresh; see the module docstring."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        peers: Iterable[PeerConfig] = (),
        events: PeerEvents | None = None,
        llama: LlamaClient | None = None,
        bus: EventBus | None = None,
    ) -> None:
        self._http = http
        #: Where a peer's going out and coming back is published (a ``peer`` event).
        self._bus = bus
        #: The proxy's own HTTP/1.1 client, for requests to ``http://`` peers (httpx for ``https://``).
        self._llama = llama
        self.peers: dict[str, Peer] = {config.name: Peer(config) for config in peers}
        self._events = events

    def __bool__(self) -> bool:
        return bool(self.peers)

    # ---- what the peers have ------------------------------------------------------------

    def holders(self, name: str) -> list[tuple[Peer, PeerModel]]:
        """Every peer that has model ``name`` (up or not), with its entry."""
        found = []
        for peer in self.peers.values():
            model = peer.model(name)
            if model is not None:
                found.append((peer, model))
        return found

    def best(self, name: str) -> tuple[Peer, PeerModel] | None:
        """The peer that is up and has model ``name`` that routing prefers, with its entry; None if none."""
        up = {peer.name: (peer, found) for peer, found in self.holders(name) if peer.up}
        if not up:
            return None
        return up[rank([peer.candidate(found) for peer, found in up.values()])[0].where]

    def listed(self) -> list[tuple[Peer, PeerModel]]:
        """Every model of every peer that is up, peer by peer."""
        return [(peer, model) for peer in self.peers.values() if peer.up for model in peer.models.values()]

    def gauges(self) -> list[PeerGauge]:
        """Every peer as ``/metrics`` shows it."""
        return [
            PeerGauge(peer.name, peer.up, peer.breaker.state.value, len(peer.models), peer.in_flight)
            for peer in self.peers.values()
        ]

    def report(self) -> list[dict[str, Any]]:
        """Every peer for ``/health``: its state, its models, and why it is out (never its key)."""
        now = trio.current_time()
        report = []
        for peer in self.peers.values():
            breaker = peer.breaker
            entry: dict[str, Any] = {
                "name": peer.name,
                "url": peer.base_url,
                "kind": peer.config.kind,
                "status": "ok" if peer.up else "down",
                "breaker": breaker.state.value,
                "models": sorted(model.name for model in peer.models.values()),
                "loaded": sorted(model.name for model in peer.models.values() if model.loaded),
                "in_flight": peer.in_flight,
                "served": peer.served,
                "trips": breaker.trips,
                "refreshed_ago": None if peer.learned_at is None else round(now - peer.learned_at, 3),
            }
            if not peer.up:
                entry["error"] = breaker.reason
                if breaker.opened_at is not None and breaker.state is BreakerState.OPEN:
                    entry["probe_in"] = round(max(0.0, breaker.opened_at + breaker.cooldown - now), 3)
            elif peer.error is not None:
                entry["error"] = peer.error
            report.append(entry)
        return report

    # ---- requests -----------------------------------------------------------------------

    async def send(self, peer: Peer, method: str, path: str, content: bytes, *, hops: int = 0) -> UpstreamAnswer:
        """Send a request to ``peer`` at ``path``; return once the answer's head is in, counted in ``in_flight``.

        ``hops``: the proxies the request had passed before this one; the peer is told one more
        (:data:`smart_proxy.routing.HOPS_HEADER`). The caller calls ``peer.done()`` when the answer is closed.

        Raises:
            UpstreamError: the peer cannot be reached (502); counted against its breaker.
            UpstreamTimeout: no answer head within its ``request_timeout`` (504); counted likewise.
        """
        who = f"peer {peer.name!r}"
        url = peer.base_url + path
        headers = {"Content-Type": "application/json", HOPS_HEADER: str(hops + 1), **peer.headers()}
        first_byte = peer.config.request_timeout or math.inf
        answer: UpstreamAnswer | None = None
        try:
            if self._llama is not None and url.startswith("http://"):
                try:
                    answer = await open_upstream(self._llama, method, url, content=content, headers=headers,
                                                 first_byte=peer.config.request_timeout)  # fmt: skip
                except (UpstreamError, UpstreamTimeout) as exc:
                    exc.message = f"{who}: {exc.message}"
                    raise
            else:
                request = self._http.build_request(method, url, content=content, headers=headers)
                with trio.move_on_after(first_byte):
                    answer = await open_httpx(self._http, request, name=who)
                if answer is None:
                    raise UpstreamTimeout(f"{who} did not answer within request_timeout ({first_byte:g}s)")
        except (UpstreamError, UpstreamTimeout) as exc:
            self._failed(peer, exc.message)
            self._note(peer, "failed")
            raise
        self._succeeded(peer)
        peer.in_flight += 1
        peer.served += 1
        self._note(peer, "ok")
        return answer

    def _note(self, peer: Peer, outcome: str) -> None:
        if self._events is not None:
            self._events.peer_request(peer.name, outcome)

    def _failed(self, peer: Peer, reason: str) -> None:
        was_up = peer.up
        peer.breaker.failure(trio.current_time(), reason)
        if was_up and not peer.up:
            log.warning("peer %r is taken out (circuit open for %gs): %s", peer.name, peer.breaker.cooldown, reason)
            self._publish(peer)

    def _succeeded(self, peer: Peer) -> None:
        was_up = peer.up
        peer.breaker.success()
        if not was_up and peer.up:
            log.info("peer %r is back (%d models)", peer.name, len(peer.models))
            self._publish(peer)

    def _publish(self, peer: Peer) -> None:
        """A ``peer`` event: ``peer`` has gone out (``down``, with why) or come back (``ok``, with its models)."""
        if self._bus is None:
            return
        if peer.up:
            self._bus.publish("peer", name=peer.name, status="ok", models=sorted(m.name for m in peer.models.values()))
        else:
            self._bus.publish("peer", name=peer.name, status="down", error=peer.breaker.reason)

    # ---- the background task ------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Read every peer's models once, report started, then keep them fresh (one task per peer)."""
        async with trio.open_nursery() as nursery:
            for peer in self.peers.values():
                nursery.start_soon(self.refresh, peer)
        task_status.started()
        async with trio.open_nursery() as nursery:
            for peer in self.peers.values():
                nursery.start_soon(self._watch, peer)

    async def _watch(self, peer: Peer) -> None:
        while True:
            breaker = peer.breaker
            if breaker.state is BreakerState.OPEN and breaker.opened_at is not None:
                await trio.sleep_until(breaker.opened_at + breaker.cooldown)
                if breaker.probe_due(trio.current_time()):
                    breaker.half_open()
                    log.info("peer %r: half-open, probing", peer.name)
                    await self.refresh(peer)
                continue
            await trio.sleep(peer.config.refresh)
            await self.refresh(peer)

    async def refresh(self, peer: Peer) -> bool:
        """Read ``peer``'s models and their states now; a failure counts against its breaker."""
        try:
            models = await self._learn(peer)
        except _ReadFailed as exc:
            peer.error = str(exc)
            self._failed(peer, f"cannot read the models of peer {peer.name!r} ({peer.base_url}): {exc}")
            return False
        peer.models = {model_key(model.name): model for model in models if peer.config.serves(model.name)}
        peer.learned_at, peer.error = trio.current_time(), None
        self._succeeded(peer)
        return True

    async def _learn(self, peer: Peer) -> list[PeerModel]:
        kind = peer.config.kind
        if kind == "ollama":
            results: dict[str, Any] = {}

            async def get(route: str) -> None:
                try:
                    results[route] = await self._get_json(peer, route)
                except _ReadFailed as exc:  # kept, not raised: both reads failing must not make a group
                    results[route] = exc

            async with trio.open_nursery() as nursery:
                nursery.start_soon(get, "/api/tags")
                nursery.start_soon(get, "/api/ps")
            for route in ("/api/tags", "/api/ps"):
                if isinstance(results[route], _ReadFailed):
                    raise _ReadFailed(f"{route}: {results[route]}")
            return _ollama_models(results["/api/tags"], results["/api/ps"])
        body = await self._get_json(peer, "/v1/models")
        return _openai_models(body, own_only=kind == "smart-proxy")

    async def _get_json(self, peer: Peer, route: str) -> Any:
        url = peer.base_url + route
        try:
            response = await self._http.get(url, headers=peer.headers(), timeout=peer.config.timeout)
        except httpx.HTTPError as exc:
            raise _ReadFailed(describe(exc)) from None
        if response.status_code != 200:
            raise _ReadFailed(f"HTTP {response.status_code} from {route}")
        try:
            return response.json()
        except ValueError:
            raise _ReadFailed(f"{route} did not answer JSON") from None


class _ReadFailed(Exception):
    pass


def _entries(body: Any, key: str) -> list[dict[str, Any]]:
    entries = body.get(key) if isinstance(body, dict) else None
    if not isinstance(entries, list):
        raise _ReadFailed(f"the answer has no {key!r} list")
    return [entry for entry in entries if isinstance(entry, dict)]


def _ollama_models(tags: Any, ps: Any) -> list[PeerModel]:
    """Ollama's ``/api/tags`` and ``/api/ps`` answers as the peer's models."""
    loaded = {
        model_key(name)
        for entry in _entries(ps, "models")
        for name in (entry.get("name"), entry.get("model"))
        if isinstance(name, str)
    }
    models = []
    for entry in _entries(tags, "models"):
        name = entry.get("name") or entry.get("model")
        if not isinstance(name, str) or not name:
            continue
        size = entry.get("size")
        is_loaded = model_key(name) in loaded
        models.append(
            PeerModel(name, is_loaded, "loaded" if is_loaded else "unloaded", size if isinstance(size, int) else None, entry)
        )
    return models


def _openai_models(body: Any, *, own_only: bool) -> list[PeerModel]:
    """A ``/v1/models`` answer as the peer's models; ``own_only``: leave out what a smart-proxy serves from its peers."""
    models = []
    for entry in _entries(body, "data"):
        name = entry.get("id")
        if not isinstance(name, str) or not name:
            continue
        served_by = entry.get("served_by")
        if own_only and isinstance(served_by, list) and "local" not in served_by:
            continue
        status = entry.get("status")
        value = status.get("value") if isinstance(status, dict) else None
        state = value if isinstance(value, str) else "loaded"
        memory = entry.get("memory")
        models.append(PeerModel(name, state == "loaded", state, memory if isinstance(memory, int) else None, entry))
    return models
