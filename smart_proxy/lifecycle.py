"""The proxy's own life, as the probes report it: starting, ready, draining, stopped.

Theory of operation: :func:`smart_proxy.server.serve` moves the one
:class:`Lifecycle` along ``TRANSITIONS``: READY once Hypercorn listens, DRAINING
when SIGTERM arrives, STOPPED when the pool is down. ``GET /health/ready``
answers 200 only while READY, so a load balancer stops sending work the moment
draining begins; while DRAINING the listener stays open, new requests get 503
and the ones already in flight run on. The edge middleware counts those with
:meth:`Lifecycle.enter` / :meth:`Lifecycle.leave` (probes and scrapes are not
counted), and :meth:`Lifecycle.idle` returns when the last one has finished, which
is when the server may stop listening.
"""

from __future__ import annotations

import enum
import logging

import trio

__all__ = ["Lifecycle", "Phase"]

log = logging.getLogger(__name__)


class Phase(enum.Enum):
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"
    STOPPED = "stopped"


TRANSITIONS: dict[Phase, frozenset[Phase]] = {
    Phase.STARTING: frozenset({Phase.READY, Phase.DRAINING, Phase.STOPPED}),
    Phase.READY: frozenset({Phase.DRAINING, Phase.STOPPED}),
    Phase.DRAINING: frozenset({Phase.STOPPED}),
    Phase.STOPPED: frozenset(),
}


class Lifecycle:
    def __init__(self) -> None:
        self.phase = Phase.STARTING
        #: Requests being served now, probes and scrapes left out.
        self.in_flight = 0
        self._lot = trio.lowlevel.ParkingLot()

    @property
    def accepting(self) -> bool:
        """Whether new work is taken (READY); probes are answered in every phase."""
        return self.phase is Phase.READY

    def move(self, phase: Phase) -> None:
        if phase is self.phase:
            return
        if phase not in TRANSITIONS[self.phase]:
            raise RuntimeError(f"no lifecycle transition {self.phase.value} -> {phase.value}")
        log.debug("lifecycle: %s -> %s", self.phase.value, phase.value)
        self.phase = phase

    def enter(self) -> None:
        self.in_flight += 1

    def leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self._lot.unpark_all()

    async def idle(self) -> None:
        """Return once no counted request is in flight."""
        while self.in_flight:
            await self._lot.park()
