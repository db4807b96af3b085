"""Model-aware routing: which of the places that can serve a model gets a request, in order.

Theory of operation: a pure policy over what is known now, no I/O. The handlers
(:mod:`smart_proxy.handlers.fleet`) describe each candidate, the local pool (when the
catalog has the model) and each peer that lists it with its breaker closed, as a
:class:`Candidate`, and :func:`rank` orders them. The first is tried; if it fails
before any byte went to the client, the second is tried once.

The order, best first (``docs/fleet.md`` has the table of cases):

1. **loaded, with a free slot** (known free slots > 0; only the local pool knows its
   slots): more free slots first;
2. **loaded**, free slots unknown or none: the shortest queue first, the queue divided
   by the candidate's ``weight`` (a peer of weight 2 takes twice the requests before
   it counts as long as one of weight 1);
3. **not loaded**: the cheapest cold start first (the bytes the load must bring into
   memory, divided by ``weight``; unknown counts as infinite);
4. **queue full** (the local pool would answer 503): last, so a request spills over
   to a peer, whatever the peer's state.

Ties go to the local pool (no network hop), then the higher weight, then the name.

Loops: each forward to a peer carries :data:`HOPS_HEADER`, the count of proxies the
request has passed; a request that has passed :data:`MAX_HOPS` has no peer among its
candidates (see :func:`smart_proxy.handlers.fleet.serve`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import attrs

__all__ = ["HOPS_HEADER", "LOCAL", "MAX_HOPS", "Candidate", "hops", "rank", "tier"]

#: The ``where`` of the local pool.
LOCAL = "local"
#: The request header that counts the proxies a request has been forwarded by (a proxy sends its own count + 1).
HOPS_HEADER = "x-smart-proxy-hops"
#: A request forwarded this many times already is not forwarded again: it is served here or refused
#: (508), so proxies that are each other's peers cannot pass a request round for ever.
MAX_HOPS = 3


def hops(value: bytes | str | None) -> int:
    """The hop count a request's :data:`HOPS_HEADER` says (0 when absent or not a number)."""
    if value is None:
        return 0
    text = value.decode("latin-1") if isinstance(value, bytes) else value
    text = text.strip()
    return min(int(text), 1_000) if text.isdigit() and len(text) <= 6 else 0


@attrs.frozen
class Candidate:
    """One place that can serve the model, as known now."""

    #: ``local``, or the peer's name.
    where: str
    #: The model is loaded there (a ready llama-server; a peer's ``loaded`` status).
    loaded: bool
    #: Slots free for one more request, if known (the local pool knows; peers do not say).
    free_slots: int | None = None
    #: Requests waiting there, as far as this proxy knows (local: waiting for a slot; a peer: ours in flight to it).
    queue: int = 0
    #: A new request would be refused for a full queue (the local pool's ``max_queue``).
    queue_full: bool = False
    #: What a cold start costs: the bytes the load brings into memory (0 when loaded; inf when unknown).
    cold_cost: float = math.inf
    #: The operator's preference (``[peer:NAME] weight``; 1 for the local pool).
    weight: float = 1.0

    @property
    def local(self) -> bool:
        return self.where == LOCAL


def tier(candidate: Candidate) -> int:
    """The candidate's rank class: 0 loaded with a free slot, 1 loaded, 2 cold, 3 queue full."""
    if candidate.queue_full:
        return 3
    if candidate.loaded and candidate.free_slots is not None and candidate.free_slots > 0:
        return 0
    return 1 if candidate.loaded else 2


def _key(candidate: Candidate) -> tuple:
    level = tier(candidate)
    weight = candidate.weight if candidate.weight > 0 else 1.0
    if level == 0:
        measure = -float(candidate.free_slots or 0)
    elif level == 1:
        measure = candidate.queue / weight
    elif level == 2:
        measure = candidate.cold_cost / weight
    else:
        measure = candidate.queue / weight
    return (level, measure, not candidate.local, -weight, candidate.where)


def rank(candidates: Iterable[Candidate]) -> list[Candidate]:
    """``candidates`` best first, by the policy in the module docstring."""
    return sorted(candidates, key=_key)
