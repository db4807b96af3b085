"""The circuit breaker (smart_proxy/breaker.py): its states and moves, with a clock given by hand."""

from __future__ import annotations

import pytest

from smart_proxy.breaker import TRANSITIONS, Breaker, BreakerState


def test_opens_after_failures_in_a_row_only() -> None:
    breaker = Breaker(failures=2, cooldown=5)
    breaker.failure(0, "refused")
    assert breaker.allows and breaker.in_a_row == 1
    breaker.success()  # a success between resets the count
    breaker.failure(1, "refused")
    assert breaker.allows
    breaker.failure(2, "refused again")
    assert breaker.state is BreakerState.OPEN and not breaker.allows
    assert (breaker.opened_at, breaker.reason, breaker.trips) == (2, "refused again", 1)


def test_half_open_probe_after_cooldown_decides() -> None:
    breaker = Breaker(failures=1, cooldown=5)
    breaker.failure(10, "timeout")
    assert not breaker.probe_due(14.9)
    assert breaker.probe_due(15)
    breaker.half_open()
    assert breaker.state is BreakerState.HALF_OPEN and not breaker.allows  # only the probe goes
    breaker.failure(16, "still down")
    assert breaker.state is BreakerState.OPEN and breaker.opened_at == 16 and breaker.trips == 2
    assert not breaker.probe_due(20) and breaker.probe_due(21)
    breaker.half_open()
    breaker.success()
    assert breaker.state is BreakerState.CLOSED and breaker.allows and breaker.reason is None


def test_a_late_failure_does_not_restart_the_cooldown() -> None:
    breaker = Breaker(failures=1, cooldown=5)
    breaker.failure(0, "down")
    breaker.failure(3, "a request sent before it opened")
    assert breaker.opened_at == 0 and breaker.trips == 1
    breaker.success()  # nor does a late success close an open breaker: only the probe does
    assert breaker.state is BreakerState.OPEN


def test_only_the_table_s_moves() -> None:
    breaker = Breaker()
    with pytest.raises(AssertionError, match="closed -> half_open"):
        breaker.half_open()
    assert TRANSITIONS[BreakerState.OPEN] == {BreakerState.HALF_OPEN}
