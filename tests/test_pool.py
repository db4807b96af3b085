"""The pool against the fake llama-server: coalescing, eviction, queueing, failures, idle unload."""

from __future__ import annotations

import os
import signal

import attrs
import pytest
import trio
import trio.testing

from smart_proxy import pool as pool_module
from smart_proxy.catalog import Catalog
from smart_proxy.config import ModelConfig
from smart_proxy.errors import ModelLoadFailed, ModelLoadTimeout, ModelNotFound, ModelTooLarge, PoolBusy, UpstreamError
from smart_proxy.pool import State

from .conftest import lifelines, open_pipes, pids_alive


def _pids(pool) -> list[int]:
    return [s.process.pid for s in pool.servers() if s.process and s.process.pid]


async def test_lazy_start_and_reuse(make_config, start_pool) -> None:
    pool = await start_pool(make_config({"a": {}}))
    assert pool.servers() == []
    async with pool.lease("a") as lease:
        first = lease.server
        assert first.state is State.READY
    async with pool.lease("a") as lease:
        assert lease.server is first
    assert pool.snapshot().models[0].loads == 1


async def test_unknown_model(make_config, start_pool) -> None:
    pool = await start_pool(make_config({"a": {}}))
    with pytest.raises(ModelNotFound, match="known models: a"):
        await pool.acquire("nope")


async def test_32_concurrent_cold_requests_start_one_process(make_config, start_pool) -> None:
    pool = await start_pool(make_config({"a": {"load_delay": 0.3}}))
    servers = []

    async def one() -> None:
        async with pool.lease("a") as lease:
            servers.append(lease.server)

    async with trio.open_nursery() as nursery:
        for _ in range(32):
            nursery.start_soon(one)
    assert len(servers) == 32
    assert len({id(s) for s in servers}) == 1
    assert pool.snapshot().models[0].loads == 1


async def test_lru_idle_server_is_evicted(make_config, start_pool) -> None:
    pool = await start_pool(make_config({"a": {}, "b": {}, "c": {}}, size=2))
    for name in ("a", "b"):
        async with pool.lease(name):
            pass
    async with pool.lease("a"):  # a is now the most recently used
        pass
    async with pool.lease("c"):
        names = sorted(s.name for s in pool.servers())
    assert names == ["a", "c"]


async def test_busy_server_is_never_evicted_b_waits(make_config, start_pool) -> None:
    pool = await start_pool(make_config({"a": {}, "b": {}}, size=1))
    lease_a = await pool.acquire("a")
    got_b = trio.Event()

    async def want_b() -> None:
        async with pool.lease("b"):
            got_b.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(want_b)
        await trio.sleep(0.5)
        assert not got_b.is_set()
        assert [s.name for s in pool.servers()] == ["a"]
        assert pool.snapshot().queued == 1
        lease_a.release()
        with trio.fail_after(5):
            await got_b.wait()
    assert [s.name for s in pool.servers()] == ["b"]


async def test_loading_server_is_never_evicted(make_config, start_pool) -> None:
    pool = await start_pool(make_config({"a": {"load_delay": 0.5}, "b": {}}, size=1, queue_timeout="200ms"))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pool.acquire, "a")
        await trio.sleep(0.1)
        with pytest.raises(PoolBusy):
            await pool.acquire("b")
        assert pool.servers()[0].name == "a"


async def test_queue_timeout_and_queue_full_give_pool_busy(make_config, start_pool) -> None:
    pool = await start_pool(make_config({"a": {}, "b": {}, "c": {}}, size=1, max_queue=1, queue_timeout="300ms"))
    lease = await pool.acquire("a")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_expect_busy, pool, "b")  # takes the one queue place, then times out
        await trio.sleep(0.1)
        with pytest.raises(PoolBusy, match="requests are queued") as info:
            await pool.acquire("c")
        assert info.value.retry_after >= 1
    lease.release()
    # and the pool still serves (stopping a for b may outlast the short queue_timeout on a busy machine)
    with trio.fail_after(20):
        while True:
            try:
                async with pool.lease("b"):
                    break
            except PoolBusy:
                await trio.sleep(0.1)


async def _expect_busy(pool, name: str) -> None:
    with pytest.raises(PoolBusy, match="queue_timeout"):
        await pool.acquire(name)


async def test_process_exiting_while_loading_fails_at_once(make_config, start_pool) -> None:
    pool = await start_pool(make_config({"bad": {"exit_on_load": 3}}))
    start = trio.current_time()
    with pytest.raises(ModelLoadFailed, match="exited with code 3 while loading") as info:
        await pool.acquire("bad")
    assert trio.current_time() - start < 3  # load_timeout is 10 s
    assert "invalid magic" in info.value.message  # the tail of its output
    assert pool.servers() == []
    snap = pool.snapshot().models[0]
    assert snap.failures == 1 and snap.last_exit_code == 3


async def test_load_timeout_kills_the_process(make_config, start_pool) -> None:
    pool = await start_pool(make_config({"slow": {"load_delay": 30}}, load_timeout="500ms"))
    with pytest.raises(ModelLoadTimeout, match="not ready within 0.5s"):
        await pool.acquire("slow")
    assert pool.servers() == []


async def test_load_is_cancelled_when_every_waiter_leaves(make_config, start_pool) -> None:
    pool = await start_pool(make_config({"a": {"load_delay": 30}}))
    with trio.move_on_after(0.5):
        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(pool.acquire, "a")
    await trio.lowlevel.checkpoint()
    server = pool.servers()[0] if pool.servers() else None
    if server is not None:
        assert server.state is State.STOPPING
        pid = server.process.pid
        with trio.fail_after(5):
            await server.gone.wait()
        assert pids_alive([pid]) == []
    assert pool.servers() == []


async def test_crash_is_recovered_by_the_next_request(make_config, start_pool) -> None:
    pool = await start_pool(make_config({"a": {}}))
    async with pool.lease("a") as lease:
        server = lease.server
    os.kill(server.process.pid, signal.SIGKILL)
    with trio.fail_after(5):
        await server.gone.wait()
    assert server.state is State.FAILED
    snap = pool.snapshot().models[0]
    assert snap.crashes == 1 and snap.last_exit_code == -9
    async with pool.lease("a") as lease:
        assert lease.server is not server and lease.server.state is State.READY
    assert pool.snapshot().models[0].loads == 2


async def test_repeated_failures_back_off(make_config, start_pool) -> None:
    pool = await start_pool(make_config({"bad": {"exit_on_load": 1, "load_delay": 0}}))
    for _ in range(2):
        with pytest.raises(ModelLoadFailed):
            await pool.acquire("bad")
    loads = pool.snapshot().models[0].loads
    with pytest.raises(ModelLoadFailed, match="next start allowed in"):
        await pool.acquire("bad")
    assert pool.snapshot().models[0].loads == loads  # refused without starting a process
    assert pool.snapshot().models[0].retry_in > 0


async def test_idle_ttl_stops_an_idle_server(make_config, start_pool) -> None:
    pool = await start_pool(make_config({"a": {}}, idle_ttl="300ms"))
    async with pool.lease("a") as lease:
        server = lease.server
        await trio.sleep(0.6)  # in flight: not idle, however long
        assert server.state is State.READY
    snap = pool.snapshot().servers[0]
    assert snap.expires_at is not None
    with trio.fail_after(3):
        await server.gone.wait()
    assert server.state is State.STOPPED


async def test_keep_alive_zero_unloads_after_the_request(make_config, start_pool) -> None:
    pool = await start_pool(make_config({"a": {}}))
    async with pool.lease("a", keep_alive=0) as lease:
        server = lease.server
    with trio.fail_after(3):
        await server.gone.wait()


async def test_the_reaper_follows_the_last_use_and_a_keep_alive_that_ends_sooner(make_config, start_pool) -> None:
    # the reaper is woken by a release only when that server expires before its next look
    pool = await start_pool(make_config({"a": {}}, idle_ttl="400ms"))
    async with pool.lease("a") as lease:
        server = lease.server
    await trio.sleep(0.3)
    async with pool.lease("a"):  # used again: its expiry moves 300 ms later, the reaper is not woken for it
        pass
    await trio.sleep(0.25)  # past the first expiry, when the reaper looks again
    assert server.state is State.READY
    with trio.fail_after(3):
        await server.gone.wait()

    pool = await start_pool(make_config({"b": {}}, idle_ttl="60s"))
    async with pool.lease("b") as lease:
        server = lease.server
    await trio.sleep(0.05)  # the reaper now sleeps for a minute
    async with pool.lease("b", keep_alive=0):  # ends sooner than that: it is woken
        pass
    with trio.fail_after(3):
        await server.gone.wait()


async def test_a_loaded_model_is_leased_without_a_checkpoint(make_config, start_pool) -> None:
    pool = await start_pool(make_config({"a": {"slots": 64}}))
    first = await pool.acquire("a")  # loads a (a burst for a model not loaded: test_32_concurrent_cold_requests...)
    # a free model lock is taken without yielding: a burst of requests for a loaded model
    # is not let through one per pass of the scheduler
    with trio.testing.assert_no_checkpoints():
        leases = [await pool.acquire("a") for _ in range(32)]
    assert {lease.server for lease in leases} == {first.server}
    for lease in [first, *leases]:
        lease.release()


async def test_slots_route_to_one_server_and_replicas_add_more(make_config, start_pool) -> None:
    pool = await start_pool(
        make_config({"a": {"slots": 2}, "b": {"slots": 1}}, model_options={"b": {"replicas": 2}}, size=3)
    )
    leases = [await pool.acquire("a") for _ in range(4)]
    assert len({id(lease.server) for lease in leases}) == 1  # 4 requests share a's 2 slots, no second copy
    b1 = await pool.acquire("b")
    b2 = await pool.acquire("b")  # b's only slot is busy and replicas = 2: a second copy
    assert b1.server is not b2.server
    b3 = await pool.acquire("b")  # at replicas: share the least busy
    assert b3.server in (b1.server, b2.server)
    for lease in [*leases, b1, b2, b3]:
        lease.release()


async def test_stop_all_leaves_no_process(make_config, start_pool) -> None:
    pool = await start_pool(make_config({"a": {}, "b": {"ignore_sigterm": True}}, size=2, stop_timeout="300ms"))
    for name in ("a", "b"):
        async with pool.lease(name):
            pass
    pids = _pids(pool)
    assert len(pids) == 2
    with trio.fail_after(5):
        await pool.stop_all()
    with trio.fail_after(2):  # b ignored SIGTERM: its lifeline was killed, and the kernel kills b
        while pids_alive(pids):
            await trio.sleep(0.02)


async def test_queue_timeout_is_one_deadline_for_every_waiter(make_config, start_pool) -> None:
    pool = await start_pool(make_config({"a": {}, "b": {}}, size=1, queue_timeout="400ms"))
    lease = await pool.acquire("a")
    finished = []

    async def want_b() -> None:
        with pytest.raises(PoolBusy):
            await pool.acquire("b")
        finished.append(trio.current_time())

    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        for _ in range(3):  # one queues for a place, two wait on b's lock behind it
            nursery.start_soon(want_b)
    assert len(finished) == 3
    assert max(finished) - start < 0.4 + 0.3  # not three queue_timeouts one after another
    lease.release()


async def test_snapshot_shows_states_as_they_happen(make_config, start_pool) -> None:
    pool = await start_pool(make_config({"a": {"load_delay": 0.3}, "bad": {"exit_on_load": 2}}))

    def state_of(name: str) -> str:
        return next(m.state for m in pool.snapshot().models if m.model == name)

    async def use_a() -> None:
        async with pool.lease("a"):
            pass

    async with trio.open_nursery() as nursery:
        nursery.start_soon(use_a)
        await trio.sleep(0.1)
        assert [s.state for s in pool.snapshot().servers] == ["starting"]
        assert state_of("a") == "starting"
    assert state_of("a") == "ready"
    await pool.unload("a")
    assert state_of("a") == "stopped" and pool.snapshot().servers == ()
    with pytest.raises(ModelLoadFailed):
        await pool.acquire("bad")
    assert state_of("bad") == "failed"


async def test_servers_outlive_the_thread_that_spawned_them(make_config, start_pool, monkeypatch) -> None:
    # trio.run_process spawns from a worker thread, which exits when idle; a parent-death
    # signal tied to that thread would kill llama-server then. Make threads retire fast.
    import trio._core._thread_cache as thread_cache

    monkeypatch.setattr(thread_cache, "IDLE_TIMEOUT", 0.1)
    pool = await start_pool(make_config({"a": {}}))
    async with pool.lease("a") as lease:
        server = lease.server
    await trio.sleep(1.5)
    assert server.state is State.READY
    assert pids_alive([server.process.pid]) == [server.process.pid]


async def test_cancelling_the_pool_is_a_stop_not_a_failure(make_config, http, caplog) -> None:
    from smart_proxy.catalog import Catalog
    from smart_proxy.pool import Pool

    config = make_config({"a": {}})
    pool = Pool(config, Catalog(config.models, config.base_dir), http, config.pool.llama_server)
    async with trio.open_nursery() as nursery:
        await nursery.start(pool.run)
        async with pool.lease("a") as lease:
            server = lease.server
        nursery.cancel_scope.cancel()  # no stop_all(): a hard cancel of the whole pool
    assert server.state is State.STOPPED
    assert pids_alive([server.process.pid]) == []
    assert not [r for r in caplog.records if r.levelname == "ERROR"]


async def test_a_stopping_server_frees_the_place_no_idle_one_is_evicted(make_config, start_pool) -> None:
    pool = await start_pool(make_config({"a": {}, "b": {"load_delay": 30}, "c": {}}, size=2))
    async with pool.lease("a"):
        pass
    with trio.move_on_after(0.3):  # b's only caller leaves while it loads: its load is cancelled
        await pool.acquire("b")
    assert [s.state for s in pool.servers("b")] in ([State.STOPPING], [])
    async with pool.lease("c"):  # takes b's place, not idle a's
        assert sorted(s.name for s in pool.servers()) == ["a", "c"]


async def test_an_evicted_idle_server_is_killed_not_waited_for(make_config, start_pool) -> None:
    # a ignores SIGTERM, and stop_timeout is long: only a SIGKILL lets b start in time
    pool = await start_pool(make_config({"a": {"ignore_sigterm": True}, "b": {}}, size=1, stop_timeout="20s"))
    async with pool.lease("a") as lease:
        a_pid = lease.server.process.pid
    with trio.fail_after(5):
        async with pool.lease("b"):
            pass
    assert pids_alive([a_pid]) == []
    snap = next(m for m in pool.snapshot().models if m.model == "a")
    assert snap.state == "stopped" and snap.last_exit_code == -signal.SIGKILL
    assert snap.crashes == 0 and snap.failures == 0  # a stop, not a failure


async def test_an_idle_unload_is_still_graceful(make_config, start_pool) -> None:
    pool = await start_pool(make_config({"a": {}}))
    async with pool.lease("a"):
        pass
    assert await pool.unload("a") == 1
    snap = pool.snapshot().models[0]
    assert snap.last_exit_code == -signal.SIGTERM  # the fake dies by SIGTERM's default action


# ---- slots: the wait for one shares queue_timeout ----------------------------------------------


async def test_a_slot_wait_ends_at_queue_timeout_and_takes_nothing(make_config, start_pool) -> None:
    pool = await start_pool(make_config({"a": {"slots": 1}}, queue_timeout="300ms"))
    first = await pool.acquire("a")
    slot = await first.take_slot()
    second = await pool.acquire("a")  # a lease on the same server: a place, not yet a slot
    assert second.server is first.server
    limiter = first.server.limiter
    with trio.fail_after(3), pytest.raises(PoolBusy, match=r"no free slot .* 'a' within queue_timeout \(0.3s\)") as info:
        await second.take_slot()
    assert info.value.retry_after >= 1
    assert limiter.borrowed_tokens == 1 and limiter.statistics().tasks_waiting == 0
    # cancelled while it waits (the client left): it takes nothing either
    third = await pool.acquire("a")
    with trio.move_on_after(0.1) as scope:
        await third.take_slot()
    assert scope.cancelled_caught
    assert limiter.borrowed_tokens == 1 and limiter.statistics().tasks_waiting == 0
    third.release()
    slot.release()
    slot.release()  # idempotent
    first.release()
    assert limiter.borrowed_tokens == 0
    # a free slot is taken even once the lease's wait is over
    late = await second.take_slot()
    assert limiter.borrowed_tokens == 1
    late.release()
    second.release()
    assert limiter.borrowed_tokens == 0 and first.server.in_flight == 0


async def test_a_free_slot_is_taken_without_a_pass_of_the_scheduler(make_config, start_pool) -> None:
    """After a load every waiting request takes its slot at once: none waits a scheduler pass for it."""
    pool = await start_pool(make_config({"a": {"slots": 2}}))
    first, second = await pool.acquire("a"), await pool.acquire("a")
    with trio.testing.assert_no_checkpoints():
        slots = [await first.take_slot(), await second.take_slot()]
    assert first.server.limiter.borrowed_tokens == 2
    for slot in slots:
        slot.release()
    first.release()
    second.release()


async def test_slots_are_given_in_arrival_order(make_config, start_pool, nursery) -> None:
    """A request that finds no free slot waits its turn; a newcomer does not take the slot it is owed."""
    pool = await start_pool(make_config({"a": {"slots": 1}}))
    held = await (await pool.acquire("a")).take_slot()
    order: list[str] = []

    async def take(name: str) -> None:
        lease = await pool.acquire("a")
        slot = await lease.take_slot()
        order.append(name)
        await trio.sleep(0.01)
        slot.release()
        lease.release()

    nursery.start_soon(take, "waiting")
    await trio.testing.wait_all_tasks_blocked()
    held.release()  # the slot is the waiting request's now, though it has not run yet
    nursery.start_soon(take, "newcomer")
    await trio.testing.wait_all_tasks_blocked()
    await trio.sleep(0.05)
    assert order == ["waiting", "newcomer"]


async def test_a_slot_freed_in_time_goes_to_the_waiter(make_config, start_pool) -> None:
    pool = await start_pool(make_config({"a": {"slots": 1}}, queue_timeout="2s"))
    first = await pool.acquire("a")
    slot = await first.take_slot()
    second = await pool.acquire("a")
    got = []

    async def wait_for_it() -> None:
        got.append(await second.take_slot())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(wait_for_it)
        await trio.sleep(0.2)
        assert got == [] and first.server.limiter.statistics().tasks_waiting == 1
        slot.release()
    assert len(got) == 1 and first.server.limiter.borrowed_tokens == 1
    got[0].release()
    first.release()
    second.release()


async def test_the_load_does_not_count_against_the_wait_for_a_slot(make_config, start_pool) -> None:
    """queue_timeout bounds the waits for room and for a slot; a load longer than it is load_timeout's business."""
    pool = await start_pool(make_config({"a": {"slots": 1, "load_delay": 0.6}}, queue_timeout="400ms"))
    leases = []

    async def one() -> None:
        leases.append(await pool.acquire("a"))

    async with trio.open_nursery() as nursery:  # both join the one load, which outlasts queue_timeout
        nursery.start_soon(one)
        nursery.start_soon(one)
    first, second = leases
    slot = await first.take_slot()
    got = []

    async def wait_for_it() -> None:
        got.append(await second.take_slot())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(wait_for_it)
        await trio.sleep(0.1)  # well within what is left of queue_timeout after the load
        slot.release()
    assert len(got) == 1
    got[0].release()
    first.release()
    second.release()


# ---- the spare lifeline ------------------------------------------------------------------------


def _lifeline_pid(server) -> int:
    return server.process._process.pid


async def test_a_load_takes_the_spare_and_the_next_one_starts(make_config, start_pool, monkeypatch) -> None:
    monkeypatch.setattr(pool_module, "_SPARE_DELAY", 0.2)
    pool = await start_pool(make_config({"a": {"load_delay": 1.0}, "b": {}}))
    first = pool.spare
    assert first is not None and first.available  # started with the pool, before any request
    leases = []

    async def use_a() -> None:
        async with pool.lease("a") as lease:
            leases.append(lease)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(use_a)
        await trio.sleep(0.1)
        assert pool.spare is None  # taken; the next one waits until the load is under way
        with trio.fail_after(3):
            while pool.spare is None:
                await trio.sleep(0.02)
        assert pool.servers("a")[0].state is State.STARTING  # it came during the load
    [lease] = leases
    assert lease.server.process.took_spare
    assert _lifeline_pid(lease.server) == first.process.pid
    second = pool.spare
    assert second is not first and second.available
    async with pool.lease("b") as lease:
        assert _lifeline_pid(lease.server) == second.process.pid


async def test_loads_that_find_no_spare_start_their_own_and_one_spare_follows(make_config, start_pool) -> None:
    pool = await start_pool(make_config({"a": {}, "b": {}, "c": {}}, size=3))
    leases = []

    async def acquire(name: str) -> None:
        leases.append(await pool.acquire(name))

    async with trio.open_nursery() as nursery:  # three loads at once: one spare for them
        for name in ("a", "b", "c"):
            nursery.start_soon(acquire, name)
    assert sorted(lease.server.process.took_spare for lease in leases) == [False, False, True]
    await trio.sleep(1.0)
    spare = pool.spare
    assert spare is not None and spare.available
    assert len(lifelines(os.getpid())) == 4  # three servers' and one spare: no second spare
    for lease in leases:
        lease.release()


async def test_an_abandoned_load_on_the_spare_is_stopped(make_config, start_pool) -> None:
    pool = await start_pool(make_config({"a": {"load_delay": 30}}))
    spare = pool.spare
    assert spare is not None and spare.process is not None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pool.acquire, "a")
        await trio.sleep(0.5)
        [server] = pool.servers("a")
        assert server.process.took_spare and server.process.pid is not None
        nursery.cancel_scope.cancel()  # its only caller leaves: the load is cancelled
    with trio.fail_after(3):
        await server.gone.wait()
    assert server.state is State.STOPPED and spare.done.is_set()
    assert pids_alive([spare.process.pid, server.process.pid]) == []


async def test_the_switch_off_starts_no_spare(make_config, start_pool) -> None:
    pool = await start_pool(make_config({"a": {}}, spare_lifeline="false"))
    assert pool.spare is None
    async with pool.lease("a") as lease:
        assert not lease.server.process.took_spare
    await trio.sleep(0.5)
    assert pool.spare is None
    assert lifelines(os.getpid()) == [_lifeline_pid(lease.server)]


async def test_an_ollama_only_catalog_starts_no_spare(make_config, start_pool) -> None:
    config = make_config({})
    config = attrs.evolve(
        config, models={"o": ModelConfig(name="o", backend="ollama", url="http://127.0.0.1:9")}
    )
    pool = await start_pool(config)
    assert pool.spare is None
    assert lifelines(os.getpid()) == []


async def test_stop_all_and_cancelling_the_pool_stop_the_spare(make_config, http) -> None:
    from smart_proxy.catalog import Catalog
    from smart_proxy.pool import Pool

    config = make_config({"a": {}})
    for stop_all in (True, False):
        pool = Pool(config, Catalog(config.models, config.base_dir), http, config.pool.llama_server)
        before = open_pipes()
        async with trio.open_nursery() as nursery:
            await nursery.start(pool.run)
            spare = pool.spare
            assert spare is not None and spare.process is not None
            if stop_all:
                with trio.fail_after(3):
                    await pool.stop_all()
                assert spare.done.is_set() and pool.spare is None
            nursery.cancel_scope.cancel()
        assert pids_alive([spare.process.pid]) == []
        assert lifelines(os.getpid()) == []
        assert open_pipes() - before == set()



# ---- a ready server that stops answering --------------------------------------------------------


async def test_a_hung_server_is_killed_and_the_next_request_restarts_it(make_config, start_pool, llama) -> None:
    from smart_proxy.upstream.relay import open_upstream

    pool = await start_pool(
        make_config({"a": {"hang_after": 1}}, health_interval="100ms", health_timeout="200ms", health_failures=2)
    )
    async with pool.lease("a") as lease:
        server = lease.server
        pid = server.process.pid
        answer = await open_upstream(llama, "POST", f"{lease.base_url}/v1/completions", content=b'{"prompt":"x"}', lease=lease)
        await answer.aclose()  # the one completion it answers
    async with pool.lease("a") as lease:
        assert lease.server is server
        with trio.fail_after(10), pytest.raises(UpstreamError, match="cannot reach"):
            # held until the watch kills it: then the connection breaks
            await open_upstream(llama, "POST", f"{lease.base_url}/v1/completions", content=b'{"prompt":"x"}', lease=lease)
    with trio.fail_after(5):
        await server.gone.wait()
    assert server.state is State.FAILED and pids_alive([pid]) == []
    snap = pool.snapshot().models[0]
    assert snap.crashes == 1 and snap.state == "failed"
    assert "stopped answering (2 health probes in a row failed" in snap.last_error
    async with pool.lease("a") as lease:
        assert lease.server is not server and lease.server.state is State.READY
    assert pool.snapshot().models[0].loads == 2


async def test_a_busy_server_that_answers_its_probes_is_left_alone(make_config, start_pool, llama) -> None:
    from smart_proxy.upstream.relay import open_upstream

    pool = await start_pool(
        make_config({"a": {"tokens": 10, "token_delay": 0.1}}, health_interval="50ms", health_timeout="500ms", health_failures=1)
    )
    async with pool.lease("a") as lease:
        answer = await open_upstream(
            llama, "POST", f"{lease.base_url}/v1/completions", content=b'{"prompt":"x","stream":true}', lease=lease
        )
        assert b"data: [DONE]" in await answer.read()  # a second of tokens, probed twenty times
    assert pool.snapshot().models[0].crashes == 0


# ---- memory budget, pins and priorities ------------------------------------------------------

GiB = 1024**3


def _memory_config(make_config, sizes: dict[str, str], budget: str = "2.5g", size: int = 8, **options):
    """Fake models with declared ``memory`` (``sizes``), under a ``[pool] memory`` budget; ``options`` per model."""
    per_model = {name: {"memory": memory, **options.get(name, {})} for name, memory in sizes.items()}
    pool_keys = {key: value for key, value in options.items() if key not in sizes}
    return make_config({name: {} for name in sizes}, per_model, size=size, memory=budget, **pool_keys)


async def _use(pool, *names: str) -> None:
    for name in names:
        async with pool.lease(name):
            pass


def _loaded(pool) -> list[str]:
    return sorted(s.name for s in pool.servers() if s.state is State.READY)


async def test_a_load_evicts_the_lru_idle_server_when_memory_runs_out(make_config, start_pool) -> None:
    pool = await start_pool(_memory_config(make_config, {"a": "1g", "b": "1g", "c": "1g"}))
    await _use(pool, "a", "b", "a")
    assert _loaded(pool) == ["a", "b"] and pool.snapshot().memory_used == 2 * GiB
    await _use(pool, "c")  # 3 GiB would not fit 2.5: b, the least recently used, goes
    assert _loaded(pool) == ["a", "c"]
    snapshot = pool.snapshot()
    assert (snapshot.memory_budget, snapshot.memory_used) == (int(2.5 * GiB), 2 * GiB)
    assert [s.memory for s in snapshot.servers] == [GiB, GiB]


async def test_a_load_evicts_as_many_idle_servers_as_it_needs_and_no_more(make_config, start_pool) -> None:
    pool = await start_pool(_memory_config(make_config, {"a": "1g", "b": "1g", "d": "1g", "big": "2g"}, budget="3g"))
    await _use(pool, "a", "b", "d")
    await _use(pool, "big")  # needs 2 of the 3 GiB: the two least recently used go, d stays
    assert _loaded(pool) == ["big", "d"]


async def test_idle_servers_are_not_evicted_when_that_would_not_be_enough(make_config, start_pool) -> None:
    pool = await start_pool(_memory_config(make_config, {"a": "1g", "b": "1g", "big": "2g"}, budget="2g"))
    await _use(pool, "b")
    lease_a = await pool.acquire("a")  # busy: holds its GiB
    got_big = trio.Event()

    async def want_big() -> None:
        async with pool.lease("big"):
            got_big.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(want_big)
        await trio.sleep(0.3)
        # evicting b alone cannot make 2 GiB while a is busy: b keeps serving, big waits
        assert not got_big.is_set() and _loaded(pool) == ["a", "b"] and pool.snapshot().queued == 1
        await _use(pool, "b")
        lease_a.release()
        # two stops and a load (load_timeout 10s) on a machine that may be slow; a lost
        # wakeup would leave big queued until queue_timeout (60s)
        with trio.fail_after(30):
            await got_big.wait()
    assert _loaded(pool) == ["big"]


async def test_a_model_larger_than_the_budget_is_refused_at_once(make_config, start_pool) -> None:
    from smart_proxy.errors import ModelTooLarge

    pool = await start_pool(_memory_config(make_config, {"a": "1g", "huge": "1TiB"}, budget="2g"))
    await _use(pool, "a")
    with trio.fail_after(1), pytest.raises(ModelTooLarge) as info:
        await pool.acquire("huge")
    assert info.value.status == 507
    assert "'huge' needs 1.0 TiB" in info.value.message and "budget of 2.0 GiB" in info.value.message
    assert _loaded(pool) == ["a"] and pool.snapshot().queued == 0  # nobody was evicted for it


async def test_a_pinned_model_survives_any_sequence_of_requests(make_config, start_pool) -> None:
    config = _memory_config(make_config, {"p": "1g", "a": "1g", "b": "1g"}, budget="2g", p={"pin": "true"})
    pool = await start_pool(config)
    await _use(pool, "p")
    pinned = pool.servers("p")[0]
    for name in ("a", "b", "a", "b", "b", "a"):  # p is the least recently used every time
        await _use(pool, name)
        assert _loaded(pool) == sorted(["p", name])
    assert pool.servers("p") == [pinned] and pinned.state is State.READY
    assert await pool.unload("p") == 0
    async with pool.lease("p", keep_alive=0):  # Ollama's "unload after this request"
        pass
    await trio.sleep(0.2)
    assert pool.servers("p") == [pinned] and pool.snapshot().models[0].loads == 1
    assert [s.pinned for s in pool.snapshot().servers if s.model == "p"] == [True]


async def test_a_pinned_model_is_not_stopped_by_idle_ttl(make_config, start_pool) -> None:
    config = _memory_config(make_config, {"p": "1g", "a": "1g"}, budget="off", idle_ttl="200ms", p={"pin": "true"})
    pool = await start_pool(config)
    await _use(pool, "p", "a")
    a = pool.servers("a")[0]
    with trio.fail_after(3):
        await a.gone.wait()
    await trio.sleep(0.3)
    assert _loaded(pool) == ["p"] and pool.snapshot().servers[0].expires_at is None


async def test_what_pinned_models_leave_is_the_budget_for_the_rest(make_config, start_pool) -> None:
    from smart_proxy.errors import ModelTooLarge

    config = _memory_config(make_config, {"p": "1.5g", "a": "1g"}, budget="2g", p={"pin": "true"})
    pool = await start_pool(config)
    await _use(pool, "p")
    with trio.fail_after(1), pytest.raises(ModelTooLarge, match=r"pinned models \(p\) hold 1.5 GiB"):
        await pool.acquire("a")


async def test_pinned_models_holding_every_place_refuse_the_rest_at_once(make_config, start_pool) -> None:
    from smart_proxy.errors import ModelTooLarge

    config = make_config({"p": {}, "a": {}}, {"p": {"pin": "true"}}, size=1, memory="off")
    pool = await start_pool(config)
    await _use(pool, "p")
    with trio.fail_after(1), pytest.raises(ModelTooLarge, match=r"pinned models \(p\) hold all 1 places"):
        await pool.acquire("a")


async def test_lower_priority_is_evicted_before_the_least_recently_used(make_config, start_pool) -> None:
    config = _memory_config(
        make_config, {"hi": "1g", "lo": "1g", "c": "1g"}, budget="2g", hi={"priority": "5"}, lo={"priority": "-1"}
    )
    pool = await start_pool(config)
    await _use(pool, "hi", "lo")  # hi is the least recently used, but lo has the lower priority
    await _use(pool, "c")
    assert _loaded(pool) == ["c", "hi"]
    await _use(pool, "lo")  # c (priority 0) goes before hi (5), though hi is older
    assert _loaded(pool) == ["hi", "lo"]


async def test_the_count_cap_still_holds_under_a_memory_budget(make_config, start_pool) -> None:
    pool = await start_pool(_memory_config(make_config, {"a": "1m", "b": "1m", "c": "1m"}, budget="1g", size=2))
    await _use(pool, "a", "b", "c")
    assert _loaded(pool) == ["b", "c"]


async def test_memory_auto_is_what_is_available_less_the_reserve(make_config, start_pool, monkeypatch) -> None:
    monkeypatch.setattr(pool_module, "available_memory", lambda: 5 * GiB)
    pool = await start_pool(make_config({"a": {}}, memory="auto", memory_reserve="1.5g"))
    assert pool.memory_budget == pool.snapshot().memory_budget == int(3.5 * GiB)
    monkeypatch.setattr(pool_module, "available_memory", lambda: None)  # no /proc/meminfo: no budget
    assert (await start_pool(make_config({"a": {}}, memory="auto"))).memory_budget is None
    assert (await start_pool(make_config({"a": {}}, memory="off"))).memory_budget is None


async def test_an_undeclared_model_is_admitted_by_its_estimate(make_config, start_pool) -> None:
    from smart_proxy.memory import BASE_BYTES

    pool = await start_pool(make_config({"a": {}}, memory="1g"))
    estimate = await pool.estimate(pool._catalog.get("a"))
    assert estimate is not None and estimate.declared is None and estimate.total > BASE_BYTES
    await _use(pool, "a")
    assert pool.snapshot().servers[0].memory == estimate.total == pool.snapshot().memory_used


async def test_a_listed_repo_model_is_estimated_from_the_cache_and_never_fetched(hub, tmp_path, http) -> None:
    from smart_proxy.catalog import Catalog
    from smart_proxy.config import structure
    from smart_proxy.download import Downloads, fetch, resolve
    from smart_proxy.pool import Pool

    from .test_download import REPO, tiny_repo

    tiny_repo(hub)
    model = ModelConfig(name="split", repo=REPO, quant="F16")
    downloads = Downloads()
    pool = Pool(structure({}), Catalog({"split": model}, str(tmp_path), downloads=downloads), http, "llama-server")
    assert await pool.estimate(model, download=False) is None
    assert hub.requests == []
    files = await trio.to_thread.run_sync(lambda: fetch(resolve(model, downloads.hub), downloads.hub))
    assert len(files.parts) == 3
    estimate = await pool.estimate(model, download=False)
    sizes = await trio.to_thread.run_sync(lambda: sum(os.path.getsize(part) for part in files.parts))
    assert estimate is not None and estimate.weights == sizes


async def test_memory_auto_below_the_reserve_refuses_every_load_and_says_so(
    make_config, start_pool, monkeypatch, caplog
) -> None:
    from smart_proxy.errors import ModelTooLarge

    monkeypatch.setattr(pool_module, "available_memory", lambda: GiB // 2)
    pool = await start_pool(make_config({"a": {}}, memory="auto"))
    assert pool.memory_budget == 0
    assert "every load will be refused; lower memory_reserve" in caplog.text
    with trio.fail_after(1), pytest.raises(ModelTooLarge, match="budget of 0 B"):
        await pool.acquire("a")


# ---- swap-aware queueing (smart_proxy.queueing): turns by model, residency, no starvation --------


@attrs.define
class _Load:
    """What a two-model workload saw: requests served and refused per model, waits, and loads."""

    served: dict = attrs.Factory(dict)
    busy: dict = attrs.Factory(dict)
    waits: list = attrs.Factory(list)
    loads: int = 0


async def _workload(pool, models, *, clients: int, seconds: float, work: float, think: float) -> _Load:
    """``clients`` closed-loop clients per model for ``seconds``: lease, a slot for ``work`` s, release, ``think`` s."""
    seen = _Load(served=dict.fromkeys(models, 0), busy=dict.fromkeys(models, 0))

    async def client(name: str, index: int) -> None:
        await trio.sleep(index * think / clients)  # spread the clients over one think time
        while True:
            start = trio.current_time()
            try:
                async with pool.lease(name) as lease:
                    slot = await lease.take_slot()
                    seen.waits.append(trio.current_time() - start)
                    try:
                        await trio.sleep(work)
                    finally:
                        slot.release()
            except PoolBusy:
                seen.busy[name] += 1
            else:
                seen.served[name] += 1
            await trio.sleep(think)

    with trio.move_on_after(seconds):
        async with trio.open_nursery() as nursery:
            for name in models:
                for index in range(clients):
                    nursery.start_soon(client, name, index)
    seen.loads = sum(m.loads for m in pool.snapshot().models)
    return seen


async def test_swap_aware_at_size_1_swaps_far_less_than_fifo_and_refuses_nobody(make_config, http) -> None:
    """Two models with clients that pause between requests: fifo swaps in every pause, swap-aware takes turns."""
    results = {}
    for queueing in ("fifo", "swap-aware"):
        config = make_config(
            {"a": {"load_delay": 0.1, "slots": 2}, "b": {"load_delay": 0.1, "slots": 2}},
            size=1, queue_timeout="5s", queueing=queueing, min_residency="1s",
        )
        async with trio.open_nursery() as nursery:
            pool = pool_module.Pool(config, Catalog(config.models, config.base_dir), http, config.pool.llama_server)
            await nursery.start(pool.run)
            results[queueing] = await _workload(pool, ("a", "b"), clients=4, seconds=4.0, work=0.02, think=0.05)
            await pool.stop_all()
            nursery.cancel_scope.cancel()
    fifo, swap = results["fifo"], results["swap-aware"]
    print(f"fifo: {fifo.loads} loads, served {fifo.served}, busy {fifo.busy}; "
          f"swap-aware: {swap.loads} loads, served {swap.served}, busy {swap.busy}")
    assert swap.loads * 2 <= fifo.loads, (swap.loads, fifo.loads)
    assert swap.busy == {"a": 0, "b": 0}
    assert min(swap.served.values()) > 0  # both models served: nobody starves
    assert max(swap.waits) < 5.0


async def _run_workload(make_config, http, queueing: str, **workload) -> _Load:
    config = make_config(
        {"a": {"load_delay": 0.1, "slots": 2}, "b": {"load_delay": 0.1, "slots": 2}},
        size=1, queue_timeout="2s", queueing=queueing, min_residency="0.5s",
    )
    async with trio.open_nursery() as nursery:
        pool = pool_module.Pool(config, Catalog(config.models, config.base_dir), http, config.pool.llama_server)
        await nursery.start(pool.run)
        seen = await _workload(pool, ("a", "b"), **workload)
        await pool.stop_all()
        nursery.cancel_scope.cancel()
    return seen


async def test_a_model_kept_busy_does_not_starve_the_other(make_config, http) -> None:
    """Clients that never pause keep a server busy for ever: fifo lets the other model's requests time out."""
    fifo = await _run_workload(make_config, http, "fifo", clients=4, seconds=4.0, work=0.02, think=0.0)
    swap = await _run_workload(make_config, http, "swap-aware", clients=4, seconds=4.0, work=0.02, think=0.0)
    print(f"fifo: {fifo.loads} loads, served {fifo.served}, busy {fifo.busy}; "
          f"swap-aware: {swap.loads} loads, served {swap.served}, busy {swap.busy}")
    assert min(fifo.served.values()) == 0 and max(fifo.busy.values()) > 0  # one model held the pool
    assert swap.busy == {"a": 0, "b": 0}
    assert min(swap.served.values()) >= 20  # each model had turns
    assert swap.loads >= 3  # turns: a, b, a at least


async def test_queue_timeout_holds_while_a_long_request_keeps_its_server(make_config, start_pool) -> None:
    """llama-swap #588: a request in flight is never cut short for another model's turn; the wait stays bounded."""
    pool = await start_pool(
        make_config({"a": {}, "b": {}}, size=1, queue_timeout="600ms", queueing="swap-aware", min_residency="100ms")
    )
    lease = await pool.acquire("a")  # a long job: holds its slot well past min_residency and queue_timeout
    server, pid = lease.server, lease.server.process.pid
    slot = await lease.take_slot()
    start = trio.current_time()
    with trio.fail_after(3), pytest.raises(PoolBusy, match=r"queue_timeout \(0.6s\)"):
        await pool.acquire("b")
    assert 0.6 <= trio.current_time() - start < 0.6 + 0.3
    assert server.state is State.READY and server.process.pid == pid  # never stopped under its job
    slot.release()
    lease.release()
    async with pool.lease("a") as again:  # nobody waits any more: a takes requests again, no reload
        assert again.server is server
    assert pool.snapshot().models[0].loads == 1


async def test_a_draining_server_finishes_its_jobs_then_the_waiting_model_loads(make_config, start_pool) -> None:
    pool = await start_pool(
        make_config({"a": {}, "b": {}}, size=1, queue_timeout="5s", queueing="swap-aware", min_residency="200ms")
    )
    lease = await pool.acquire("a")
    server = lease.server
    got_b = trio.Event()
    order = []

    async def want(name: str, event: trio.Event | None = None) -> None:
        async with pool.lease(name) as held:
            order.append((name, held.server.name))
            if event is not None:
                event.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(want, "b", got_b)
        await trio.sleep(0.4)  # a is past its residency with b waiting: it drains
        assert not got_b.is_set() and server.state is State.READY
        nursery.start_soon(want, "a")  # a new request for a queues behind b instead of joining
        await trio.sleep(0.2)
        assert order == [] and pool.snapshot().queued == 2
        lease.release()  # a's last job ends: a is evicted, b loads and serves, then a's turn comes
        with trio.fail_after(5):
            await got_b.wait()
    assert order == [("b", "b"), ("a", "a")]


async def test_a_model_left_alone_gives_way_at_once_despite_min_residency(make_config, start_pool) -> None:
    """A user switching models waits for no residency: the idle server was not used for longer than its load took."""
    pool = await start_pool(
        make_config({"a": {"load_delay": 0.1}, "b": {}}, size=1, queueing="swap-aware", min_residency="30s")
    )
    async with pool.lease("a") as lease:
        load = lease.server.ready_at - lease.server.started_at
    await trio.sleep(load + 0.05)
    start = trio.current_time()
    async with pool.lease("b"):
        pass
    assert trio.current_time() - start < 5  # its load and nothing like 30 s


async def test_a_model_in_use_keeps_its_place_for_its_idle_allowance(make_config, start_pool) -> None:
    """Just used and idle for less than its load took: it is kept a moment, then gives way (no min_residency wait)."""
    pool = await start_pool(
        make_config({"a": {"load_delay": 0.4}, "b": {}}, size=1, queueing="swap-aware", min_residency="30s")
    )
    async with pool.lease("a") as lease:
        server = lease.server
    start = trio.current_time()
    async with pool.lease("b") as lease:
        kept = lease.server.started_at - server.last_used  # a's place went to b this long after a's last use
    allowance = server.ready_at - server.started_at
    assert server.state is State.STOPPED
    assert allowance - 0.01 <= kept < allowance + 1  # kept while a swap back would cost more than the wait
    assert trio.current_time() - start < 10  # nothing like min_residency


async def test_fifo_evicts_an_idle_server_at_once(make_config, start_pool) -> None:
    pool = await start_pool(
        make_config({"a": {"load_delay": 0.4}, "b": {}}, size=1, queueing="fifo", min_residency="30s")
    )
    async with pool.lease("a") as lease:
        server = lease.server
    async with pool.lease("b") as lease:
        kept = lease.server.started_at - server.last_used
    assert kept < (server.ready_at - server.started_at) / 2  # no allowance under fifo


# ---- GPU placement (declared inventories; the fake records its environment and flags) ----------


def _gpu_config(make_config, sizes: dict[str, str], gpus: str = "0:24GiB, 1:24GiB", budget: str = "off", **options):
    """Fake models with declared ``memory`` placed on the declared ``gpus``; ``options`` per model or for the pool."""
    return _memory_config(make_config, sizes, budget=budget, gpus=gpus, queueing="fifo", **options)


async def _started(http, server) -> tuple[list[str], dict[str, str]]:
    """What the fake llama-server behind ``server`` was started with: its arguments and its CUDA_ variables."""
    answer = (await http.get(f"{server.base_url}/env")).json()
    return answer["argv"], answer["env"]


def _gpu_use(pool) -> dict[int, int]:
    return {gpu.index: gpu.used for gpu in pool.snapshot().gpus}


async def test_two_models_two_gpus_one_model_on_each(make_config, start_pool, http, monkeypatch) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    pool = await start_pool(_gpu_config(make_config, {"a": "20g", "b": "20g"}))
    await _use(pool, "a", "b")
    (a,), (b,) = pool.servers("a"), pool.servers("b")
    argv_a, env_a = await _started(http, a)
    argv_b, env_b = await _started(http, b)
    assert env_a == {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": "0"}  # best fit, lowest index on a tie
    assert env_b == {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": "1"}  # GPU 0 has 4 GiB left
    whole = ["--device", "CUDA0", "--split-mode", "none", "--n-gpu-layers", "all", "--fit", "off"]
    assert argv_a[-len(whole) :] == argv_b[-len(whole) :] == whole
    assert _gpu_use(pool) == {0: 20 * GiB, 1: 20 * GiB}
    snapshot = {s.model: s for s in pool.snapshot().servers}
    assert (snapshot["a"].gpus, snapshot["a"].vram, snapshot["a"].memory, snapshot["a"].gpu_layers) == ((0,), 20 * GiB, 0, None)
    assert snapshot["b"].gpus == (1,)
    assert pool.snapshot().memory_used == 0  # declared sizes go whole onto the GPU


async def test_the_smallest_gpu_that_holds_it(make_config, start_pool, http) -> None:
    pool = await start_pool(_gpu_config(make_config, {"small": "8g"}, gpus="0:24GiB, 1:12GiB"))
    await _use(pool, "small")
    assert (await _started(http, pool.servers("small")[0]))[1]["CUDA_VISIBLE_DEVICES"] == "1"


async def test_a_model_larger_than_any_gpu_is_split_in_proportion(make_config, start_pool, http) -> None:
    pool = await start_pool(_gpu_config(make_config, {"70b": "36g"}, gpus="0:16GiB, 1:24GiB, 2:8GiB"))
    await _use(pool, "70b")
    argv, env = await _started(http, pool.servers("70b")[0])
    assert env["CUDA_VISIBLE_DEVICES"] == "1,0"  # the fewest GPUs, the largest first
    split = argv[argv.index("--device") :]
    assert split == [
        "--device", "CUDA0,CUDA1", "--split-mode", "layer", "--tensor-split", "22118,14745", "--n-gpu-layers", "all",
        "--fit", "off",
    ]  # fmt: skip
    assert _gpu_use(pool) == {0: 36 * GiB * 16 // 40, 1: 36 * GiB * 24 // 40, 2: 0}  # 24:16 of 36 GiB


async def test_a_partial_offload_leaves_the_rest_on_the_cpu_against_the_budget(make_config, start_pool, http) -> None:
    config = _gpu_config(
        make_config, {"huge": "40g", "other": "4g"}, gpus="0:10GiB", budget="35g", allow_partial="true", huge={"layers": "80"}
    )
    pool = await start_pool(config)
    await _use(pool, "huge")
    (server,) = pool.servers("huge")
    argv, env = await _started(http, server)
    assert env["CUDA_VISIBLE_DEVICES"] == "0"
    assert argv[argv.index("--n-gpu-layers") + 1] == "20"  # 0.5 GiB a layer, 10 GiB free: 20 of 80
    assert (server.placement.vram, server.memory) == (10 * GiB, 30 * GiB)  # the rest counts in host memory
    assert pool.snapshot().memory_used == 30 * GiB and pool.snapshot().servers[0].gpu_layers == 20
    # a model that fits whole once the idle partial one is evicted goes whole, rather than partial beside it
    await _use(pool, "other")
    assert _loaded(pool) == ["other"] and pool.servers("other")[0].placement.gpu_layers is None
    assert pool.snapshot().memory_used == 0


async def test_a_partial_offload_whose_cpu_part_exceeds_the_budget_is_refused(make_config, start_pool) -> None:
    config = _gpu_config(
        make_config, {"huge": "40g"}, gpus="0:10GiB", budget="25g", allow_partial="true", huge={"layers": "80"}
    )
    pool = await start_pool(config)
    with trio.fail_after(1), pytest.raises(ModelTooLarge, match=r"'huge' needs 30\.0 GiB of memory, more than .* 25\.0 GiB"):
        await pool.acquire("huge")
    assert pool.servers() == []


async def test_a_model_that_fits_nowhere_is_refused_at_once_naming_need_and_capacity(make_config, start_pool) -> None:
    pool = await start_pool(_gpu_config(make_config, {"a": "4g", "huge": "40g"}, gpus="0:24GiB, 1:8GiB"))
    await _use(pool, "a")
    with trio.fail_after(1), pytest.raises(ModelTooLarge) as info:
        await pool.acquire("huge")
    assert info.value.status == 507
    assert info.value.message == (
        "model 'huge' needs 40.0 GiB of GPU memory and fits on no GPU nor across them "
        "(free: GPU 0: 24.0 GiB, GPU 1: 8.0 GiB); allow_partial = true ([pool] or [model:huge]) would offload only some layers"
    )  # what it would have with every unpinned server stopped, so a is not evicted for nothing
    assert _loaded(pool) == ["a"]
    # a model's own allow_partial and layer count
    config = _gpu_config(make_config, {"huge": "40g"}, gpus="0:24GiB", huge={"allow_partial": "true"})
    with pytest.raises(ModelTooLarge, match=r"needs its layer count \(\[model:huge\] layers\)"):
        await (await start_pool(config)).acquire("huge")


async def test_a_load_evicts_the_lru_idle_server_on_the_gpu_it_needs(make_config, start_pool, http) -> None:
    config = _gpu_config(
        make_config, {"a": "20g", "b": "20g", "c": "20g", "p": "20g"}, queue_timeout="300ms", p={"pin": "true"}
    )
    pool = await start_pool(config)
    await _use(pool, "a", "b", "a")  # a on GPU 0, b on GPU 1; b is the least recently used
    await _use(pool, "c")
    assert _loaded(pool) == ["a", "c"]
    assert (await _started(http, pool.servers("c")[0]))[1]["CUDA_VISIBLE_DEVICES"] == "1"  # b's GPU
    # a pinned model takes the LRU one's GPU (a's), and is never evicted itself
    await _use(pool, "p", "c", "a")
    assert _loaded(pool) == ["a", "p"]
    assert {s.name: s.placement.gpus for s in pool.servers()} == {"p": (0,), "a": (1,)}
    # busy servers hold the GPUs: the load waits, and gets 503 at queue_timeout
    async with pool.lease("a"):
        with trio.fail_after(2), pytest.raises(PoolBusy, match="no room on the GPUs for model 'b' within queue_timeout"):
            await pool.acquire("b")
    assert _loaded(pool) == ["a", "p"]
    # with every unpinned server stopped, the pinned one still holds GPU 0: a model needing more is refused at once
    pinned = await start_pool(_gpu_config(make_config, {"p": "20g", "d": "30g"}, p={"pin": "true"}))
    await _use(pinned, "p")
    with trio.fail_after(1), pytest.raises(ModelTooLarge, match=r"free: GPU 0: 4\.0 GiB, GPU 1: 24\.0 GiB"):
        await pinned.acquire("d")


async def test_gpus_none_starts_llama_server_exactly_as_before(make_config, start_pool, http, monkeypatch) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    for gpus in ("none", "auto"):  # auto without nvidia-smi: no GPU
        monkeypatch.setattr(pool_module, "read_nvidia_smi", lambda: ())
        config = make_config({"a": {}}, {"a": {"args": "-c 2048"}}, gpus=gpus)
        pool = await start_pool(config)
        await _use(pool, "a")
        (server,) = pool.servers("a")
        argv, env = await _started(http, server)
        path = config.models["a"].path
        port = str(server.port)
        assert argv == ["-m", path, "--host", "127.0.0.1", "--port", port, "--alias", "a", "-c", "2048"]
        assert env == {} and server.placement is None and pool.snapshot().gpus == ()
        assert pool.snapshot().servers[0].vram == 0


async def test_gpus_auto_reads_nvidia_smi_once_less_the_reserve(make_config, start_pool, http, monkeypatch) -> None:
    from smart_proxy.placement import Gpu

    calls = []

    def fake_smi() -> tuple[Gpu, ...]:
        calls.append(1)
        return (Gpu(0, 8 * GiB), Gpu(1, 24 * GiB))

    monkeypatch.setattr(pool_module, "read_nvidia_smi", fake_smi)
    pool = await start_pool(_gpu_config(make_config, {"a": "20g"}, gpus="auto", gpu_reserve="1g"))
    assert [(gpu.index, gpu.memory) for gpu in pool.gpus] == [(0, 7 * GiB), (1, 23 * GiB)]
    await _use(pool, "a", "a")
    assert (await _started(http, pool.servers("a")[0]))[1]["CUDA_VISIBLE_DEVICES"] == "1"
    assert calls == [1]


async def test_a_model_that_sets_its_own_gpu_flags_is_started_as_configured(make_config, start_pool, http) -> None:
    pool = await start_pool(_gpu_config(make_config, {"a": "20g"}, a={"args": "-ngl 10"}))
    await _use(pool, "a")
    (server,) = pool.servers("a")
    argv, env = await _started(http, server)
    assert argv[-2:] == ["-ngl", "10"] and "--device" not in argv and "CUDA_VISIBLE_DEVICES" not in env
    assert (server.placement, server.memory, _gpu_use(pool)) == (None, 20 * GiB, {0: 0, 1: 0})  # all on the host's count


async def test_swap_aware_evicts_for_a_gpu_once_the_idle_allowance_is_over(make_config, start_pool, http) -> None:
    config = _memory_config(make_config, {"a": "20g", "b": "20g", "c": "20g"}, budget="off", gpus="0:24GiB, 1:24GiB")
    assert config.pool.queueing == "swap-aware"
    pool = await start_pool(config)
    await _use(pool, "a", "b")
    with trio.fail_after(5):  # b was used last: a goes, once idle longer than its load took
        await _use(pool, "c")
    assert _loaded(pool) == ["b", "c"]
    assert (await _started(http, pool.servers("c")[0]))[1]["CUDA_VISIBLE_DEVICES"] == "0"


async def test_a_partial_offload_takes_what_busy_servers_leave_rather_than_wait(make_config, start_pool, http) -> None:
    config = _gpu_config(make_config, {"a": "20g", "huge": "40g"}, gpus="0:24GiB", allow_partial="true", huge={"layers": "80"})
    pool = await start_pool(config)
    async with pool.lease("a"):
        with trio.fail_after(5):
            await _use(pool, "huge")
    argv, _ = await _started(http, pool.servers("huge")[0])
    assert argv[argv.index("--n-gpu-layers") + 1] == "8"  # 4 GiB free beside busy a: 8 layers of 0.5 GiB
    assert _loaded(pool) == ["a", "huge"] and pool.servers("huge")[0].memory == 36 * GiB


async def test_only_the_servers_whose_gpu_it_needs_are_evicted(make_config, start_pool) -> None:
    pool = await start_pool(_gpu_config(make_config, {"a": "10g", "b": "20g", "c": "20g"}, gpus="0:12GiB, 1:24GiB"))
    await _use(pool, "a", "b")  # a on GPU 0 (the smallest that holds it), b on GPU 1; a is the LRU
    await _use(pool, "c")  # a goes first in LRU order, but its GPU is too small for c: only b is evicted
    assert _loaded(pool) == ["a", "c"] and pool.servers("c")[0].placement.gpus == (1,)
