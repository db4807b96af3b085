"""Where a model route's request is served: here, or on a peer (see docs/fleet.md).

Theory of operation: every model route's handler, once it has read the request's
``model``, hands the rest to :func:`serve` with ``here``, the function that serves it
from this proxy (the pool, or a ``backend = ollama`` upstream). With no peer that
has the model, ``here`` runs at once and nothing else happens. Otherwise the
candidates are this proxy (when its catalog has the model) and every peer that has
it, is up (its breaker closed) and takes the route in its dialect
(:func:`takes`); :func:`smart_proxy.routing.rank` orders them and the first is tried.
A peer gets the body byte for byte at the same path, and its answer is relayed as
it comes (:func:`smart_proxy.handlers.reply.relay_answer`).

Failover: if the first candidate fails before anything went to the client (it
could not be reached, timed out, answered 502, 503 or 504, or its whole answer
broke off while being read), the second is tried, once. A stream that breaks off
after its first byte went out is never retried: it ends with the error in its
dialect, so it does not look finished.

Loops: a request forwarded to a peer tells it how many proxies it has passed
(:data:`smart_proxy.routing.HOPS_HEADER`). One that has passed
:data:`smart_proxy.routing.MAX_HOPS` is served here if the catalog has its model and
is refused with :class:`TooManyHops` (508) otherwise: proxies that list each other's
models cannot pass a request round for ever.

The dialects a peer takes: a smart-proxy peer every route; an Ollama peer Ollama's
generation, embedding and show routes and its ``/v1`` chat, completion, embedding,
Responses and Messages routes; an OpenAI peer the ``/v1`` routes, and Ollama's chat and
generate translated to them as for a local llama-server (the route hands :func:`serve` a
``translate``). Any other Ollama route for a model only an OpenAI peer has is refused
with a 400 that says which routes to use.

The lists: :func:`model_entries` and :func:`tag_entries` add the peers' models to
``/v1/models``, ``/api/tags`` and (those loaded on a peer) ``/api/ps``, and
:func:`served_by` says where each lives.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable, Collection
from typing import Any

import attrs

from ..config import ModelConfig
from ..errors import BadRequest, ProxyError, UpstreamError
from ..metrics import note_model, note_peer
from ..pool import State
from ..routing import HOPS_HEADER, LOCAL, MAX_HOPS, Candidate, rank
from ..upstream.peers import Peer, PeerModel, model_key
from ..upstream.relay import UpstreamAnswer, answer_text
from .reply import Reply, Request, relay_answer
from .state import ProxyState

__all__ = [
    "OLLAMA_PEER_ROUTES",
    "PeerDown",
    "Relay",
    "TooManyHops",
    "Translate",
    "Translated",
    "model_entries",
    "serve",
    "served_by",
    "tag_entries",
    "takes",
]

log = logging.getLogger(__name__)

#: The routes an Ollama peer takes (Ollama's own and its OpenAI- and Anthropic-compatible ones).
OLLAMA_PEER_ROUTES = frozenset(
    {
        "/api/chat",
        "/api/generate",
        "/api/embed",
        "/api/embeddings",
        "/api/show",
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/v1/responses",
        "/v1/messages",
    }
)
#: Answers of a candidate that mean "try the next one" (nothing went to the client yet).
_RETRY_STATUSES = frozenset({502, 503, 504})


@attrs.frozen
class Translated:
    """A request rewritten for a peer that does not take its route: an OpenAI peer's ``/v1`` route for an Ollama one."""

    path: str
    body: bytes
    #: How its answer comes back in the caller's dialect: ``relay(answer, on_done)``.
    relay: Relay


#: Makes the :class:`Translated` request for a peer, given the model's name there (None: cannot be translated).
Translate = Callable[[str], "Translated | None"]


class PeerDown(ProxyError):
    status = 503
    kind = "peer_unavailable"
    retry_after = 5


class TooManyHops(ProxyError):
    """A request that has passed ``MAX_HOPS`` proxies, for a model only peers have: a loop among peers."""

    status = 508
    kind = "loop_detected"


def takes(kind: str, path: str) -> bool:
    """Whether a peer of ``kind`` takes a request to ``path`` as it is."""
    if kind == "smart-proxy":
        return True
    if kind == "ollama":
        return path in OLLAMA_PEER_ROUTES
    return path.startswith("/v1/")


#: How a route relays an upstream's answer: ``relay(answer, on_done)``; the route's stream framing.
Relay = Callable[[UpstreamAnswer, Callable[[], object]], Awaitable[Reply]]


async def serve(
    proxy: ProxyState,
    request: Request,
    name: str,
    here: Callable[[], Awaitable[Reply]],
    relay: Relay | None = None,
    translate: Translate | None = None,
) -> Reply:
    """Serve ``request`` for model ``name`` here (``here()``) or on a peer; see the module docstring.

    ``relay`` relays a peer's answer as the route relays its upstream's (a stream judged
    by the route's own end event); by default :func:`smart_proxy.handlers.reply.relay_answer`
    (SSE ending in ``[DONE]``, or NDJSON ending in ``done``). ``translate`` rewrites the
    request for an OpenAI peer, which does not take the route as it is (Ollama's chat and
    generate, translated as for a local llama-server).

    Raises:
        PeerDown: only peers have the model, and none of them is up (503).
        BadRequest: only peers have the model, and none takes this route's dialect.
        ProxyError: whatever the last candidate tried raised.
    """
    fleet = proxy.fleet
    holders = fleet.holders(name) if fleet else []
    if not holders:
        return await here()
    model = proxy.catalog.find(name)
    if request.hops >= MAX_HOPS:  # forwarded round too often: here, or nowhere
        if model is not None:
            return await here()
        raise TooManyHops(
            f"model {name!r}: the request has been forwarded by {request.hops} proxies ({HOPS_HEADER}) and is not "
            f"forwarded again; do peers list each other's models (kind = openai between smart-proxies)?"
        )
    peers: dict[str, tuple[Peer, PeerModel, Translated | None]] = {}
    candidates = [] if model is None else [await _local(proxy, model)]
    for peer, found in holders:
        if not peer.up:
            continue
        translated = None
        if not takes(peer.config.kind, request.path):
            translated = translate(found.name) if translate is not None and peer.config.kind == "openai" else None
            if translated is None:
                continue
        peers[peer.name] = (peer, found, translated)
        candidates.append(peer.candidate(found))
    if not candidates:
        raise _nowhere(name, request.path, holders)
    ranked = rank(candidates)[:2]  # the first, and the one retry
    for attempt, candidate in enumerate(ranked):
        last = attempt == len(ranked) - 1
        note_peer("" if candidate.local else candidate.where)
        try:
            if candidate.local:
                return await here()
            peer, found, translated = peers[candidate.where]
            note_model(found.name)  # a name from the peer's own list, not the client's
            return await _to_peer(proxy, request, peer, relay, translated, last=last)
        except ProxyError as exc:
            if last or exc.status not in _RETRY_STATUSES:
                raise
            log.warning("%s for %r failed before its first byte (%s); trying %s", candidate.where, name, exc.message,
                        ranked[attempt + 1].where)
    raise AssertionError("unreachable")


async def _to_peer(
    proxy: ProxyState, request: Request, peer: Peer, relay: Relay | None, translated: Translated | None, *, last: bool
) -> Reply:
    """The request relayed to ``peer`` at its own path (or as ``translated``); a retryable error status raises
    unless ``last``."""
    if translated is not None:
        path, body, relay = translated.path, translated.body, translated.relay
    else:
        path, body = request.path, request.body
    upstream = await proxy.fleet.send(peer, "POST", path, body, hops=request.hops)
    request.opened.append(upstream)
    if upstream.status_code in _RETRY_STATUSES and not last:
        try:
            body = await upstream.read(64 * 1024)
        except ProxyError:
            body = b""
        finally:
            peer.done()
        error = UpstreamError(f"peer {peer.name!r} answered {upstream.status_code}: {answer_text(body)}")
        error.status = upstream.status_code
        raise error
    if relay is None:
        reply = await relay_answer(upstream, proxy.config.proxy.max_answer, on_done=peer.done)
    else:
        reply = await relay(upstream, peer.done)
    reply.headers.append((b"x-served-by", f"peer:{peer.name}".encode()))
    return reply


def _nowhere(name: str, path: str, holders: list[tuple[Peer, PeerModel]]) -> ProxyError:
    """Why no candidate is left for ``name`` on ``path``: every peer that has it is down, or none takes the route."""
    down = [peer for peer, _ in holders if not peer.up]
    if down:
        why = "; ".join(f"{peer.name!r}: {peer.breaker.reason}" for peer in down)
        return PeerDown(f"model {name!r} is served by peers that are down ({why})")
    kinds = ", ".join(sorted({f"{peer.name!r} ({peer.config.kind})" for peer, _ in holders}))
    return BadRequest(
        f"model {name!r} is served by peer {kinds}, which does not take {path}; "
        "ask for it on the OpenAI routes (/v1/chat/completions, /v1/completions, /v1/embeddings)"
    )


async def _local(proxy: ProxyState, model: ModelConfig) -> Candidate:
    """This proxy as a candidate for ``model``: its servers' free slots and waiters, or what a load costs."""
    if model.backend != "llama":  # an Ollama upstream's: its state is not known here without asking
        return Candidate(LOCAL, loaded=False)
    ready = [server for server in proxy.pool.servers(model.name) if server.state is State.READY]
    if ready:
        free = sum(max(0, server.slots - server.in_flight) for server in ready)
        # leases beyond a server's slots wait for one (see smart_proxy.pool.Lease.take_slot)
        waiting = sum(max(0, server.in_flight - server.slots) + server.waiters for server in ready)
        full = free == 0 and waiting >= proxy.config.pool.max_queue
        return Candidate(LOCAL, loaded=True, free_slots=free, queue=waiting, queue_full=full, cold_cost=0.0)
    queued = proxy.pool.snapshot().queued
    estimate = await proxy.pool.estimate(model, download=False)
    cost = float(estimate.total) if estimate is not None and estimate.total else math.inf
    return Candidate(LOCAL, loaded=False, queue=queued, queue_full=queued >= proxy.config.pool.max_queue, cold_cost=cost)


# ---- the lists -------------------------------------------------------------------------------


def served_by(proxy: ProxyState, name: str, *, local: bool) -> list[str]:
    """Where model ``name`` lives: ``local`` (this proxy's catalog) and ``peer:NAME`` for each peer up that has it."""
    where = ["local"] if local else []
    return where + [f"peer:{peer.name}" for peer, _ in proxy.fleet.holders(name) if peer.up]


def model_entries(proxy: ProxyState, created: int, wanted: Collection[str] | None) -> list[dict[str, Any]]:
    """``/v1/models`` entries of the peers' models the catalog does not name, one per name."""
    entries: dict[str, dict[str, Any]] = {}
    for peer, found in proxy.fleet.listed():
        key = model_key(found.name)
        if proxy.catalog.find(found.name) is not None or key in entries:
            continue
        holders = [holder for holder, model in proxy.fleet.holders(found.name) if holder.up]
        loaded = any(model.loaded for holder, model in proxy.fleet.holders(found.name) if holder.up)
        value = "loaded" if loaded else "unloaded"
        if wanted is not None and value not in wanted:
            continue
        entries[key] = {
            "id": found.name,
            "object": "model",
            "created": created,
            "owned_by": peer.config.kind,
            "loaded": loaded,
            "state": "peer",
            "status": {"value": value},
            "memory": found.size,
            "served_by": [f"peer:{holder.name}" for holder in holders],
        }
    return list(entries.values())


def tag_entries(proxy: ProxyState, *, loaded: bool = False) -> list[dict[str, Any]]:
    """``/api/tags`` entries of the peers' models the catalog does not name: an Ollama peer's as it lists them.

    ``loaded``: only those loaded on a peer (for ``/api/ps``).
    """
    entries: dict[str, dict[str, Any]] = {}
    for peer, found in proxy.fleet.listed():
        key = model_key(found.name)
        if proxy.catalog.find(found.name) is not None or key in entries or (loaded and not found.loaded):
            continue
        tagged = found.name if ":" in found.name else f"{found.name}:latest"
        entry = dict(found.entry) if peer.config.kind == "ollama" else {"size": found.size or 0, "digest": "", "details": {}}
        entry.update(name=tagged, model=tagged, served_by=served_by(proxy, found.name, local=False))
        entries[key] = entry
    return list(entries.values())
