"""``GET /events`` and the event bus under it (smart_proxy/eventbus.py, handlers/watch_routes.py)."""

from __future__ import annotations

import httpx
import pytest
import trio

from smart_proxy.eventbus import EventBus, LineLog, Lost
from smart_proxy.upstream.ollama_server import UpstreamMonitor

from .sse import SSEReader
from .test_download import REPO, make, tiny_repo
from .test_ops import with_proxy


def chat(model: str = "a", stream: bool = False) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": stream}


async def post(http: httpx.AsyncClient, url: str, body: dict) -> None:
    await http.post(url + "/v1/chat/completions", json=body)


def kinds(seen: list[tuple[str, dict]], model: str | None = None) -> list[str]:
    """The kinds of the model events in ``seen`` (request summaries and queue depths left out: their order is the client's)."""
    return [kind for kind, data in seen if kind not in ("request", "queue") and (model is None or data.get("model") == model)]


# ---- the bus --------------------------------------------------------------------------------


async def test_bus_fans_out_in_order_and_listeners_hear_everything() -> None:
    bus = EventBus()
    heard = []
    bus.listen(lambda event: heard.append((event.kind, event.data)))
    with bus.subscribe() as one, bus.subscribe() as two:
        bus.publish("loading", model="a", restart=False)
        bus.publish("queued", stream=False, seconds=0.1)
        bus.publish("loaded", model="a", seconds=0.2)
        for subscription in (one, two):
            got = await subscription.get()
            assert [(e.kind, e.data) for e in got] == [("loading", {"model": "a", "restart": False}),
                                                      ("loaded", {"model": "a", "seconds": 0.2})]  # fmt: skip
            assert got[0].id < got[1].id
        assert bus.subscribers == 2
    assert bus.subscribers == 0
    assert [kind for kind, _ in heard] == ["loading", "queued", "loaded"]


async def test_a_slow_subscriber_loses_events_and_is_told_how_many() -> None:
    bus = EventBus()
    with bus.subscribe(limit=3) as slow, bus.subscribe(limit=100) as fast:
        for i in range(5):
            bus.publish("tick", n=i)
        with pytest.raises(Lost) as lost:
            await slow.get()
        assert lost.value.count == 5  # 3 buffered, dropped with the 4th; the 5th came after the loss
        bus.publish("tick", n=5)
        assert [e.data["n"] for e in await slow.get()] == [5]  # it goes on from there
        assert [e.data["n"] for e in await fast.get()] == list(range(6))


async def test_a_listener_that_fails_does_not_break_the_publisher(caplog) -> None:
    bus = EventBus()
    bus.listen(lambda event: 1 / 0)
    with bus.subscribe() as subscription:
        bus.publish("loaded", model="a")
        assert [e.kind for e in await subscription.get()] == ["loaded"]
    assert "event listener" in caplog.text


async def test_line_log_keeps_the_last_lines_and_follows_without_a_gap() -> None:
    lines = LineLog(3)
    for i in range(5):
        lines.append(f"line {i}")
    assert [line.text for line in lines.lines()] == ["line 2", "line 3", "line 4"]
    with lines.follow() as (kept, follower):
        assert [line.text for line in kept] == ["line 2", "line 3", "line 4"]
        lines.append("line 5")
        assert [line.text for line in await follower.get()] == ["line 5"]


async def test_upstream_monitor_publishes_changes_only(http) -> None:
    bus = EventBus()
    monitor = UpstreamMonitor(http, (), bus=bus)
    with bus.subscribe() as subscription:
        up = {"url": "http://o:1", "models": ["m"], "status": "ok", "version": "0.9"}
        down = {"url": "http://o:1", "models": ["m"], "status": "down", "error": "refused"}
        monitor._update([up])
        monitor._update([up])
        monitor._update([down])
        got = await subscription.get()
    assert [(e.kind, e.data["status"]) for e in got] == [("upstream", "ok"), ("upstream", "down")]
    assert got[1].data["error"] == "refused"


# ---- the route ------------------------------------------------------------------------------


async def test_late_subscriber_gets_the_state_first_then_request_summaries(make_config, start_proxy, http) -> None:
    url = await start_proxy(make_config({"a": {"load_delay": 0.05, "tokens": 5}, "b": {}}))
    assert (await http.post(url + "/v1/chat/completions", json=chat())).status_code == 200
    async with http.stream("GET", url + "/events") as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["cache-control"] == "no-cache"
        events = SSEReader(response)
        kind, state = await events.next()
        assert kind == "snapshot"
        models = {m["model"]: m for m in state["models"]}
        assert models["a"]["status"] == "loaded" and models["a"]["servers"][0]["state"] == "ready"
        assert models["b"]["status"] == "unloaded" and models["b"]["servers"] == []
        assert state["phase"] == "ready" and state["pool"]["capacity"] == 2

        assert (await http.post(url + "/v1/chat/completions", json=chat(stream=True))).status_code == 200
        _, summary = await events.until("request")
        assert summary["model"] == "a" and summary["dialect"] == "openai" and summary["status"] == 200
        assert summary["streamed"] is True and summary["path"] == "/v1/chat/completions"
        assert summary["completion_tokens"] == 5 and summary["prompt_tokens"] == 3
        assert 0 < summary["ttft"] <= summary["seconds"]
        assert summary["tokens_per_second"] > 0 and summary["agents"] == [] and summary["peer"] is None

        ollama = {"model": "a", "messages": [{"role": "user", "content": "hi"}], "stream": False}
        assert (await http.post(url + "/api/chat", json=ollama)).status_code == 200
        _, summary = await events.until("request")
        assert summary["dialect"] == "ollama" and summary["ttft"] is None and summary["completion_tokens"] == 5

        assert (await http.post(url + "/v1/chat/completions", json=chat("nope"))).status_code == 404
        _, summary = await events.until("request")
        assert summary["status"] == 404 and summary["model"] is None


async def test_a_load_a_crash_and_a_restart_are_seen_in_order(make_config, start_proxy, http) -> None:
    url = await start_proxy(make_config({"a": {"load_delay": 0.1, "signal_on_request": "SIGSEGV"}}))
    async with http.stream("GET", url + "/events") as response:
        events = SSEReader(response)
        kind, state = await events.next()
        assert kind == "snapshot" and state["models"][0]["status"] == "unloaded"
        assert (await http.post(url + "/v1/chat/completions", json=chat())).status_code >= 500
        seen, crashed = await events.until("crashed", model="a")
        assert kinds(seen, "a") == ["loading", "loaded", "crashed"]
        loading, loaded = [data for kind, data in seen if kind in ("loading", "loaded")]
        assert loading["restart"] is False and loaded["seconds"] > 0
        assert "SIGSEGV" in crashed["error"] and crashed["exit_code"] == -11
        assert (await http.post(url + "/v1/chat/completions", json=chat())).status_code >= 500
        seen, _ = await events.until("crashed", model="a")
        assert kinds(seen, "a") == ["loading", "loaded", "crashed"]
        assert [data for kind, data in seen if kind == "loading"][0]["restart"] is True  # as the metrics count it
    metrics = (await http.get(url + "/metrics")).text
    assert 'smart_proxy_model_restarts_total{model="a"} 1.0' in metrics
    assert 'smart_proxy_model_crashes_total{model="a"} 2.0' in metrics


async def test_a_failed_load_says_why_and_eviction_and_stop_are_seen(make_config, start_proxy, http) -> None:
    config = make_config({"a": {"load_delay": 0.05}, "b": {"load_delay": 0.05}, "bad": {"exit_on_load": 3}}, size=1)
    url = await start_proxy(config)
    async with http.stream("GET", url + "/events") as response:
        events = SSEReader(response)
        await events.next()
        assert (await http.post(url + "/v1/chat/completions", json=chat("bad"))).status_code == 502
        seen, failed = await events.until("failed", model="bad")
        assert kinds(seen, "bad") == ["loading", "failed"]
        assert "exited with code 3" in failed["error"] and failed["exit_code"] == 3
        assert (await http.post(url + "/v1/chat/completions", json=chat("a"))).status_code == 200
        await events.until("loaded", model="a")
        assert (await http.post(url + "/v1/chat/completions", json=chat("b"))).status_code == 200
        seen, _ = await events.until("loaded", model="b")
        order = [(kind, data.get("model"), data.get("reason")) for kind, data in seen if kind != "queue"]
        assert order.index(("stopping", "a", "evicted")) < order.index(("stopped", "a", None))
        assert order.index(("stopped", "a", None)) < order.index(("loading", "b", None))
    metrics = (await http.get(url + "/metrics")).text
    assert 'smart_proxy_model_evictions_total{model="a"} 1.0' in metrics
    assert 'smart_proxy_model_load_failures_total{model="bad"} 1.0' in metrics


async def test_queue_depth_per_model(make_config, start_proxy, http) -> None:
    url = await start_proxy(make_config({"a": {"load_delay": 1.0}}))
    async with http.stream("GET", url + "/events") as response, trio.open_nursery() as nursery:
        events = SSEReader(response)
        await events.next()
        for _ in range(3):
            nursery.start_soon(post, http, url, chat())
        _, queue = await events.until("queue", depths={"a": 3})
        _, queue = await events.until("queue", depths={})
        assert queue == {"time": queue["time"], "depths": {}}


async def test_a_download_and_a_load_emit_their_progress_in_order(hub, tmp_path, fake_binary, start_proxy, http) -> None:
    # huggingface_hub reports progress every 10 MiB: 24 MiB show some bytes done before the end
    tiny_repo(hub, pad=24 * 1024 * 1024)
    hub.faults.slow["tiny-Q4_K_M.gguf"] = 0.06  # about 1.5 s for 24 MiB
    url = await start_proxy(make(tmp_path, fake_binary, {"tiny": {"repo": REPO, "quant": "Q4_K_M"}}))
    async with http.stream("GET", url + "/events") as response:
        events = SSEReader(response)
        await events.next()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(post, http, url, chat("tiny"))
            seen, _ = await events.until("loaded", wait=30, model="tiny")
            _, snap = await _late_snapshot(http, url)
            assert {m["model"]: m["status"] for m in snap["models"]} == {"tiny": "loaded"}
    order = kinds(seen, "tiny")
    downloads = [data for kind, data in seen if kind == "download"]
    assert order[: len(downloads)] == ["download"] * len(downloads)
    assert order[len(downloads):] == ["loading", "loaded"]
    assert downloads[-1]["state"] == "done" and downloads[-1]["percent"] == 100.0
    progress = [d["bytes_done"] for d in downloads if d["state"] == "downloading"]
    assert progress == sorted(progress) and len(set(progress)) >= 2, downloads
    assert any(0 < (d["percent"] or 0) < 100 for d in downloads), downloads
    assert all(d["bytes_total"] == downloads[-1]["bytes_total"] for d in downloads if d["state"] == "downloading")


async def _late_snapshot(http: httpx.AsyncClient, url: str) -> tuple[str, dict]:
    async with http.stream("GET", url + "/events") as response:
        return await SSEReader(response).next()


async def test_events_need_a_key_when_keys_are_set(make_config, start_proxy, http) -> None:
    url = await start_proxy(with_proxy(make_config({"a": {}}), api_keys=("sk-one",)))
    refused = await http.get(url + "/events")
    assert refused.status_code == 401 and refused.json()["error"]["code"] == 401
    assert (await http.get(url + "/events", headers={"authorization": "Bearer sk-two"})).status_code == 401
    async with http.stream("GET", url + "/events", headers={"x-api-key": "sk-one"}) as response:
        assert response.status_code == 200
        assert (await SSEReader(response).next())[0] == "snapshot"


async def test_a_quiet_stream_gets_heartbeats_and_does_not_hold_the_drain(make_config, start_proxy, http) -> None:
    config = with_proxy(make_config({"a": {}}), heartbeat=0.2)
    url = await start_proxy(config)
    async with http.stream("GET", url + "/events") as response:
        raw = response.aiter_raw()
        first = await anext(raw)
        assert first.startswith(b"event: snapshot\n")
        with trio.fail_after(3):
            assert await anext(raw) == b": heartbeat\n\n"
        health = (await http.get(url + "/health")).json()
        assert health["phase"] == "ready"
    metrics = (await http.get(url + "/metrics")).text
    assert "smart_proxy_requests_in_flight 0.0" in metrics  # the stream is not counted in flight


def test_docs_name_every_event_kind() -> None:
    from pathlib import Path

    text = (Path(__file__).parent.parent / "docs" / "events.md").read_text()
    for kind in ("snapshot", "download", "loading", "loaded", "failed", "crashed", "stopping", "stopped", "queue",
                 "upstream", "peer", "request", "lost", "line"):  # fmt: skip
        assert f"`{kind}`" in text, kind



async def test_a_request_summary_names_the_agents_that_ran(make_config, start_proxy, http, tmp_path) -> None:
    from .test_agents import copy_bundled, with_agents

    root = tmp_path / "agents"
    root.mkdir()
    copy_bundled(root, "json", "constrain = true\n")
    url = await start_proxy(with_agents(make_config({"a": {"content": '{"ok": 1}'}}), root, "json"))
    async with http.stream("GET", url + "/events") as response:
        events = SSEReader(response)
        await events.next()
        body = {"model": "a", "messages": [{"role": "user", "content": "/json give me JSON"}]}
        assert (await http.post(url + "/v1/chat/completions", json=body)).status_code == 200
        _, summary = await events.until("request")
        assert summary["agents"] == ["json"] and summary["status"] == 200
        assert (await http.post(url + "/v1/chat/completions", json=chat())).status_code == 200
        _, summary = await events.until("request")
        assert summary["agents"] == []


async def test_a_stream_that_falls_behind_gets_lost_then_a_fresh_snapshot(make_config, start_pool, http) -> None:
    from smart_proxy.catalog import Catalog
    from smart_proxy.handlers import watch_routes
    from smart_proxy.handlers.state import ProxyState
    from smart_proxy.lifecycle import Phase

    config = make_config({"a": {}})
    proxy = ProxyState(config, Catalog(config.models, config.base_dir), await start_pool(config), http)
    proxy.lifecycle.move(Phase.READY)
    reply = await watch_routes.events(proxy)
    assert reply.stream is not None
    async with reply.stream as pieces:
        first = await anext(pieces)
        assert first.startswith(b"event: snapshot\n")
        for i in range(3000):  # more than a subscriber's buffer, published while it does not read
            proxy.bus.publish("tick", n=i)
        piece = await anext(pieces)
        messages = piece.split(b"\n\n")
        assert messages[0].startswith(b"event: lost\n") and b'"count":3000' in messages[0]
        assert messages[1].startswith(b"event: snapshot\n")
        proxy.bus.publish("tick", n=3000)
        assert b'"n":3000' in await anext(pieces)  # and on it goes
        proxy.lifecycle.move(Phase.DRAINING)
        with trio.fail_after(2):
            assert [piece async for piece in pieces] == []  # the stream ends when the proxy drains


async def test_a_client_that_leaves_is_unsubscribed(make_config, start_pool, http) -> None:
    from smart_proxy.catalog import Catalog
    from smart_proxy.handlers.state import ProxyState
    from smart_proxy.lifecycle import Phase
    from smart_proxy.web.app import create_app

    from .asgi_driver import scope

    config = make_config({"a": {}})
    proxy = ProxyState(config, Catalog(config.models, config.base_dir), await start_pool(config), http)
    proxy.lifecycle.move(Phase.READY)
    app = create_app(proxy)
    request = {**scope("/events", b""), "method": "GET", "headers": [(b"host", b"proxy")]}
    to_app, receive = trio.open_memory_channel[dict](4)
    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    to_app.send_nowait({"type": "http.request", "body": b"", "more_body": False})
    async with trio.open_nursery() as nursery:
        nursery.start_soon(app, request, receive.receive, send)
        with trio.fail_after(5):
            while not any(m.get("body", b"").startswith(b"event: snapshot") for m in sent):
                await trio.sleep(0.01)
        assert proxy.bus.subscribers == 1 and sent[0]["status"] == 200
        to_app.send_nowait({"type": "http.disconnect"})
        with trio.fail_after(5):
            while proxy.bus.subscribers:
                await trio.sleep(0.01)
    assert proxy.bus.subscribers == 0


async def test_an_idle_stop_and_an_unload_say_why(make_config, start_proxy, http) -> None:
    url = await start_proxy(make_config({"a": {"load_delay": 0.05}, "b": {"load_delay": 0.05}}, idle_ttl=0.5))
    async with http.stream("GET", url + "/events") as response:
        events = SSEReader(response)
        await events.next()
        assert (await http.post(url + "/v1/chat/completions", json=chat("a"))).status_code == 200
        seen, stopping = await events.until("stopping", model="a")
        assert stopping["reason"] == "idle" and kinds(seen, "a") == ["loading", "loaded", "stopping"]
        await events.until("stopped", model="a")
        assert (await http.post(url + "/v1/chat/completions", json=chat("b"))).status_code == 200
        unload = await http.post(url + "/api/generate", json={"model": "b", "keep_alive": 0})
        assert unload.status_code == 200 and unload.json()["done_reason"] == "unload"
        seen, stopping = await events.until("stopping", model="b")
        assert stopping["reason"] == "unload requested"
