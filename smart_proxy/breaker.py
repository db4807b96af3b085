"""A circuit breaker for one peer: closed (in use), open (taken out), half-open (one probe decides).

Theory of operation: the breaker is a small state machine with an explicit transition
table (:data:`TRANSITIONS`) and no clock of its own: every call is given ``now``
(``trio.current_time()`` in the proxy, plain numbers in tests), so it does no I/O and
is tested without waiting.

- **closed**: requests go to the peer. ``failures`` failures in a row (a request that
  could not be sent or got no answer head in time, or a failed refresh) open it.
- **open**: no request goes to the peer. Once ``cooldown`` seconds have passed since it
  opened, :meth:`Breaker.probe_due` says so, and the owner sends one probe (the peer's
  model list) after :meth:`Breaker.half_open`.
- **half-open**: still no request; the probe's outcome decides: a success closes the
  breaker, a failure opens it again for another ``cooldown``.

A success while closed resets the count of failures in a row.
"""

from __future__ import annotations

import enum

import attrs

__all__ = ["TRANSITIONS", "Breaker", "BreakerState"]


class BreakerState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


#: The moves the breaker may make; anything else is a bug.
TRANSITIONS: dict[BreakerState, frozenset[BreakerState]] = {
    BreakerState.CLOSED: frozenset({BreakerState.OPEN}),
    BreakerState.OPEN: frozenset({BreakerState.HALF_OPEN}),
    BreakerState.HALF_OPEN: frozenset({BreakerState.CLOSED, BreakerState.OPEN}),
}


@attrs.define
class Breaker:
    #: Failures in a row that open a closed breaker.
    failures: int = 2
    #: Seconds an open breaker waits before its half-open probe.
    cooldown: float = 5.0
    state: BreakerState = BreakerState.CLOSED
    #: Failures in a row so far (while closed).
    in_a_row: int = 0
    #: When it last opened (the ``now`` of that call), or None.
    opened_at: float | None = None
    #: Why it last opened (the failure's message), or None.
    reason: str | None = None
    #: How many times it has opened.
    trips: int = 0

    def _move(self, to: BreakerState) -> None:
        if to not in TRANSITIONS[self.state]:
            raise AssertionError(f"breaker: {self.state.value} -> {to.value} is not a transition")
        self.state = to

    @property
    def allows(self) -> bool:
        """Whether requests may go to the peer now (closed)."""
        return self.state is BreakerState.CLOSED

    def success(self) -> None:
        """A request or probe got its answer: close a half-open breaker, reset the count."""
        if self.state is BreakerState.HALF_OPEN:
            self._move(BreakerState.CLOSED)
            self.reason = None
        if self.state is BreakerState.CLOSED:
            self.in_a_row = 0

    def failure(self, now: float, reason: str) -> None:
        """A request or probe failed: count it; open at ``failures`` in a row, or at once when half-open."""
        if self.state is BreakerState.OPEN:
            return  # a request sent before it opened, failing late: the cooldown runs from the opening
        if self.state is BreakerState.CLOSED:
            self.in_a_row += 1
            if self.in_a_row < self.failures:
                return
        self._move(BreakerState.OPEN)
        self.opened_at, self.reason, self.in_a_row = now, reason, 0
        self.trips += 1

    def probe_due(self, now: float) -> bool:
        """Whether an open breaker's cooldown is over, so its half-open probe should go now."""
        return self.state is BreakerState.OPEN and self.opened_at is not None and now - self.opened_at >= self.cooldown

    def half_open(self) -> None:
        """The probe is about to go: requests still stay away until it succeeds."""
        self._move(BreakerState.HALF_OPEN)
