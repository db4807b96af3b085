"""Swap-aware queueing: which waiting model gets the next place, and which loaded one gives it up.

A pure policy (no I/O, no clock of its own): the pool describes its live servers and its
queue, this module answers; :mod:`smart_proxy.pool` acts on the answer.

Theory of operation, when the pool is full and requests wait for models that are not loaded:

* **Residency**: for ``min_residency`` after it became ready, a server in use keeps its
  place (:func:`protected`): while it is busy, and while it has been idle for less time
  than its own load took. Clients of a loaded model leave it idle for moments between their
  requests; evicting it in such a moment to load another model, and loading it again for
  its next request, is the thrashing this prevents. The idle allowance is the rent-or-buy
  rule: keep paying for the place while the idle time is shorter than what a reload would
  cost, so giving way late never costs more than one more load. A model left alone longer
  than that gives way at once, so a user switching models waits at most one extra load.
* **Whose turn**: the waiting model whose oldest request came first (:func:`next_turn`).
  Requests for one model wait together, so when its server is ready every one of them goes
  to it at once, up to its slots; the pool does not alternate X, Y, X, Y request by request.
* **Who gives way** (:func:`plan`): the fewest servers whose places (and memory) let the
  turn's load fit, in the order the pool evicts: idle servers first (lowest ``priority``,
  then least recently used), then busy ones past their residency (lowest ``priority``, then
  the one ready longest); none if even all of them would not be enough. Those of them past
  their protection *drain* (:func:`to_drain`): they take no new request (those queue, as
  requests for a model not loaded do) and finish the ones they have. The load evicts them
  when all are idle and none is protected. A request in flight is never cut short, however
  long it runs. Loading and pinned servers never give way.
* **No starvation**: turns go oldest-first across models, and a draining model's new
  requests queue with their own arrival times, so a model that keeps its server busy
  cannot hold the place past ``min_residency`` while an older request waits. Every wait
  stays bounded by ``queue_timeout`` (the pool's deadline), whatever this policy answers.

With ``queueing = fifo`` the pool does not consult this module: requests take room first
come first served, an idle server is evicted at once and a busy one never gives way.
"""

from __future__ import annotations

from collections.abc import Iterable

import attrs

__all__ = ["Resident", "Waiting", "may_evict", "next_change", "next_turn", "plan", "protected", "to_drain"]


@attrs.frozen
class Resident:
    """One live (loading or ready) server, as the policy sees it."""

    model: str
    #: When it became ready (the caller's clock), or None while it loads.
    ready_at: float | None
    #: Requests in flight on it or waiting for its load.
    busy: bool
    pinned: bool = False
    priority: int = 0
    #: When its last request ended (the caller's clock): among idle servers, the least recent gives way.
    last_used: float = 0.0
    #: How long its load took, in seconds: what a swap back to it would cost.
    load_seconds: float = 0.0
    #: What it holds against the memory budget, in bytes.
    memory: int = 0
    #: It is being stopped: it still holds its place and memory, and is nobody's to give.
    stopping: bool = False
    #: The caller's handle for it; the policy only hands it back.
    key: object = None


@attrs.frozen
class Waiting:
    """A model with requests queued for a place."""

    model: str
    #: When its oldest queued request arrived (the caller's clock).
    since: float
    #: The bytes its load needs.
    need: int = 0


def next_turn(waiting: Iterable[Waiting]) -> Waiting | None:
    """The waiting model whose oldest request came first (earlier in ``waiting`` on a tie); None if none waits."""
    turn: Waiting | None = None
    for entry in waiting:
        if turn is None or entry.since < turn.since:
            turn = entry
    return turn


def protected(resident: Resident, *, now: float, min_residency: float) -> bool:
    """It keeps its place against another model's load: within ``min_residency`` of its load and in use.

    In use: busy, or idle for less than its load took. Pinned servers are always protected; a
    loading one is never evicted either way.
    """
    if resident.pinned or resident.ready_at is None or resident.stopping:
        return True
    if now - resident.ready_at >= min_residency:
        return False
    return resident.busy or now - resident.last_used < resident.load_seconds


def may_evict(resident: Resident, *, now: float, min_residency: float) -> bool:
    """An idle server may be evicted for another model's load: it is not :func:`protected`."""
    return not resident.busy and not protected(resident, now=now, min_residency=min_residency)


def next_change(residents: Iterable[Resident], *, now: float, min_residency: float) -> float | None:
    """The next time a protected server stops being protected, if nothing else happens; None if none will."""
    times = []
    for r in residents:
        if r.pinned or r.ready_at is None or r.stopping or now - r.ready_at >= min_residency:
            continue
        times.append(r.ready_at + min_residency)
        if not r.busy and now - r.last_used < r.load_seconds:
            times.append(r.last_used + r.load_seconds)
    return min(times, default=None)


def plan(
    residents: Iterable[Resident], need: int, *, now: float, min_residency: float, size: int, budget: int | None
) -> list[Resident] | None:
    """The servers to stop, in order, so a load of ``need`` bytes fits in ``size`` places and ``budget`` bytes.

    ``residents`` are every live server (stopping ones count, and are never chosen).

    Returns:
        [] when it fits as things are; None when stopping every server that may give way
        (idle, or busy past its residency; not loading, pinned or stopping) would not be
        enough; else the fewest such servers, idle ones first (lowest priority, then least
        recently used), then busy ones (lowest priority, then the one ready longest).
    """
    residents = list(residents)
    count, used = len(residents), sum(r.memory for r in residents)

    def fits() -> bool:
        return count < size and (budget is None or used + need <= budget)

    if fits():
        return []
    movable = [r for r in residents if r.ready_at is not None and not r.pinned and not r.stopping]
    idle = sorted((r for r in movable if not r.busy), key=lambda r: (r.priority, r.last_used))
    busy = sorted(
        (r for r in movable if r.busy and not protected(r, now=now, min_residency=min_residency)),
        key=lambda r: (r.priority, r.ready_at),
    )
    chosen: list[Resident] = []
    for r in idle + busy:
        if fits():
            break
        chosen.append(r)
        count -= 1
        used -= r.memory
    return chosen if fits() else None


def to_drain(
    residents: Iterable[Resident],
    waiting: Iterable[Waiting],
    *,
    now: float,
    min_residency: float,
    size: int,
    budget: int | None,
) -> list[Resident]:
    """The servers that take no new request, so that the model whose turn it is can load.

    Those of the turn's :func:`plan` that are not :func:`protected`: an idle server still in
    use keeps taking requests (refusing them would end its protection by itself). None when
    nobody waits, the turn's model has a live server (its requests join it), or no plan.
    """
    turn = next_turn(waiting)
    if turn is None:
        return []
    residents = list(residents)
    if any(r.model == turn.model and not r.stopping for r in residents):
        return []
    chosen = plan(residents, turn.need, now=now, min_residency=min_residency, size=size, budget=budget)
    return [r for r in chosen or [] if not protected(r, now=now, min_residency=min_residency)]
