"""The swap-aware queueing policy, case by case (no pool, no clock: times are plain numbers)."""

from __future__ import annotations

from smart_proxy.queueing import Resident, Waiting, may_evict, next_change, next_turn, plan, protected, to_drain

R = 10.0  # min_residency in these cases


def server(model: str, *, ready_at: float | None = 0.0, busy: bool = False, last_used: float = 0.0, load: float = 1.0,
           **kw) -> Resident:
    return Resident(model=model, ready_at=ready_at, busy=busy, last_used=last_used, load_seconds=load, key=model, **kw)


def drained(residents, waiting, now, size=1, budget=None) -> list[str]:
    return [r.key for r in to_drain(residents, waiting, now=now, min_residency=R, size=size, budget=budget)]


# ---- whose turn ------------------------------------------------------------------------------


def test_the_model_whose_oldest_request_came_first_has_the_turn() -> None:
    assert next_turn([Waiting("y", 5.0), Waiting("z", 3.0), Waiting("w", 4.0)]).model == "z"
    assert next_turn([Waiting("y", 3.0), Waiting("z", 3.0)]).model == "y"  # a tie: queue order
    assert next_turn([]) is None


# ---- residency -------------------------------------------------------------------------------


def test_a_busy_server_is_protected_for_its_residency_then_not() -> None:
    busy = server("x", ready_at=100.0, busy=True, last_used=100.0)
    assert protected(busy, now=100.0 + R - 0.01, min_residency=R)
    assert not protected(busy, now=100.0 + R, min_residency=R)


def test_an_idle_server_is_protected_while_idle_less_than_its_load_took() -> None:
    idle = server("x", ready_at=100.0, last_used=103.0, load=2.0)
    assert protected(idle, now=104.9, min_residency=R)  # idle 1.9 s < a 2 s load: a swap back would cost more
    assert not protected(idle, now=105.0, min_residency=R)
    assert may_evict(idle, now=105.0, min_residency=R) and not may_evict(idle, now=104.0, min_residency=R)


def test_residency_ends_protection_even_for_a_server_just_used() -> None:
    idle = server("x", ready_at=100.0, last_used=100.0 + R - 0.5, load=2.0)
    assert not protected(idle, now=100.0 + R, min_residency=R)


def test_loading_pinned_and_stopping_servers_are_always_protected() -> None:
    for resident in (server("x", ready_at=None), server("x", pinned=True), server("x", stopping=True)):
        assert protected(resident, now=1e9, min_residency=R)
        assert not may_evict(resident, now=1e9, min_residency=R)


def test_min_residency_zero_protects_nothing_ready() -> None:
    assert not protected(server("x", ready_at=5.0, busy=True, last_used=5.0), now=5.0, min_residency=0.0)


def test_next_change_is_when_the_first_protection_ends() -> None:
    residents = [
        server("x", ready_at=100.0, busy=True, last_used=100.0),  # residency ends at 110
        server("y", ready_at=102.0, last_used=104.0, load=3.0),  # idle allowance ends at 107
        server("z", ready_at=None),  # loading: nothing to wait for
        server("p", pinned=True),
    ]
    assert next_change(residents, now=105.0, min_residency=R) == 107.0
    assert next_change(residents, now=108.0, min_residency=R) == 110.0
    assert next_change(residents, now=112.5, min_residency=R) is None


# ---- who gives way ---------------------------------------------------------------------------


def test_a_busy_server_keeps_taking_requests_within_its_residency() -> None:
    residents = [server("x", ready_at=100.0, busy=True, last_used=101.0)]
    assert drained(residents, [Waiting("y", 101.0)], now=105.0) == []
    assert drained(residents, [Waiting("y", 101.0)], now=110.0) == ["x"]  # past it: it drains for y


def test_nothing_drains_when_nobody_waits_or_the_load_fits() -> None:
    residents = [server("x", ready_at=0.0, busy=True)]
    assert drained(residents, [], now=100.0) == []
    assert drained(residents, [Waiting("y", 1.0)], now=100.0, size=2) == []


def test_the_turns_model_already_live_drains_nobody() -> None:
    residents = [server("x", busy=True), server("y", ready_at=None)]
    assert drained(residents, [Waiting("y", 1.0)], now=100.0, size=2) == []


def test_an_idle_server_in_use_keeps_taking_requests_and_one_left_alone_gives_way() -> None:
    in_use = server("x", ready_at=100.0, last_used=104.5, load=1.0)
    assert drained([in_use], [Waiting("y", 104.0)], now=105.0) == []
    left = server("x", ready_at=100.0, last_used=102.0, load=1.0)
    assert drained([left], [Waiting("y", 104.0)], now=105.0) == ["x"]


def test_idle_servers_give_way_before_busy_ones_by_priority_then_lru() -> None:
    residents = [
        server("busy", busy=True, memory=1),
        server("old", last_used=10.0, memory=1),
        server("new", last_used=20.0, memory=1),
        server("low", last_used=30.0, priority=-1, memory=1),
    ]
    got = plan(residents, 0, now=100.0, min_residency=R, size=4, budget=None)
    assert [r.key for r in got] == ["low"]  # a place: the lowest priority, though the most recently used
    got = plan(residents, 3, now=100.0, min_residency=R, size=4, budget=4)  # 4 servers of 1 byte; 3 more needed
    assert [r.key for r in got] == ["low", "old", "new"]


def test_among_busy_servers_the_one_ready_longest_gives_way() -> None:
    residents = [server("a", ready_at=50.0, busy=True), server("b", ready_at=20.0, busy=True)]
    assert drained(residents, [Waiting("c", 60.0)], now=100.0, size=2) == ["b"]


def test_no_plan_when_the_servers_that_may_give_way_are_not_enough() -> None:
    # b is idle, but a holds its place and memory busy within its residency: draining b would not help
    residents = [server("a", ready_at=95.0, busy=True, memory=1), server("b", memory=1)]
    assert plan(residents, 2, now=100.0, min_residency=R, size=8, budget=2) is None
    assert drained(residents, [Waiting("big", 96.0, need=2)], now=100.0, size=8, budget=2) == []
    # once a is past its residency, both give way
    assert drained(residents, [Waiting("big", 96.0, need=2)], now=106.0, size=8, budget=2) == ["b", "a"]


def test_stopping_servers_count_but_are_never_chosen() -> None:
    residents = [server("a", stopping=True), server("b")]
    assert [r.key for r in plan(residents, 0, now=100.0, min_residency=R, size=2, budget=None)] == ["b"]
    assert plan([server("a", stopping=True)], 0, now=100.0, min_residency=R, size=1, budget=None) is None


def test_pinned_and_loading_servers_never_give_way() -> None:
    residents = [server("p", pinned=True), server("l", ready_at=None)]
    assert plan(residents, 0, now=100.0, min_residency=R, size=2, budget=None) is None


def test_the_oldest_waiter_decides_which_load_the_plan_is_for() -> None:
    # y (need 1) is older than z (need 3): y's plan needs one server, z's would need both
    residents = [server("a", busy=True, memory=2), server("b", memory=2)]
    waiting = [Waiting("z", 50.0, need=3), Waiting("y", 40.0, need=1)]
    assert drained(residents, waiting, now=100.0, size=4, budget=4) == ["b"]
    assert drained(residents, [Waiting("z", 50.0, need=3)], now=100.0, size=4, budget=4) == ["b", "a"]


# ---- the cases together: two models at size 1 ------------------------------------------------


def test_two_models_take_turns_no_sooner_than_min_residency() -> None:
    """X serves steadily from t=0; Y's requests wait from t=1. X keeps the place until t=R, then drains."""
    x_busy = server("x", ready_at=0.0, busy=True, last_used=0.5)
    y = [Waiting("y", 1.0)]
    for now in (1.0, 5.0, R - 0.001):
        assert drained([x_busy], y, now=now) == []
    assert drained([x_busy], y, now=R) == ["x"]
    # drained and idle (its new requests queue behind y's): evicted at once
    x_idle = server("x", ready_at=0.0, last_used=R + 0.2)
    assert may_evict(x_idle, now=R + 0.2, min_residency=R)
    # y loaded at R+1 with x's requests waiting since R+0.1: y keeps the place its residency
    y_busy = server("y", ready_at=R + 1, busy=True, last_used=R + 1)
    assert drained([y_busy], [Waiting("x", R + 0.1)], now=R + 5) == []
    assert drained([y_busy], [Waiting("x", R + 0.1)], now=2 * R + 1) == ["y"]
