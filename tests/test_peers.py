"""Peers (smart_proxy/upstream/peers.py): what each kind says it has, the breaker around reads and sends, the key."""

from __future__ import annotations

import json

import httpx
import pytest
import trio

from smart_proxy.config import structure
from smart_proxy.errors import UpstreamError
from smart_proxy.eventbus import EventBus
from smart_proxy.upstream.peers import Fleet, _ollama_models, _openai_models, _ReadFailed, model_key

KEY = "sk-peer-7e57"


def peer_configs(**peers: dict) -> list:
    raw = {f"peer:{name}": {key: str(value) for key, value in settings.items()} for name, settings in peers.items()}
    return list(structure(raw).peers.values())


def test_model_key_joins_latest() -> None:
    assert model_key("gemma:latest") == model_key("gemma") == "gemma"
    assert model_key("qwen3:8b") == "qwen3:8b"


def test_ollama_models_from_tags_and_ps() -> None:
    tags = {"models": [{"name": "a:latest", "size": 10}, {"name": "b:7b", "size": 70}, {"nope": 1}, "junk"]}
    ps = {"models": [{"name": "b:7b", "model": "b:7b"}]}
    models = {m.name: m for m in _ollama_models(tags, ps)}
    assert set(models) == {"a:latest", "b:7b"}
    assert (models["a:latest"].loaded, models["a:latest"].size) == (False, 10)
    assert (models["b:7b"].loaded, models["b:7b"].state) == (True, "loaded")
    with pytest.raises(_ReadFailed, match="no 'models' list"):
        _ollama_models({"models": "x"}, ps)


def test_openai_models_states_and_own_only() -> None:
    body = {
        "data": [
            {"id": "here", "status": {"value": "unloaded"}, "memory": 5, "served_by": ["local", "peer:x"]},
            {"id": "loaded-here", "status": {"value": "loaded"}, "served_by": ["local"]},
            {"id": "elsewhere", "status": {"value": "loaded"}, "served_by": ["peer:x"]},
            {"id": "plain"},
            {"id": 3},
        ]
    }
    own = {m.name: m for m in _openai_models(body, own_only=True)}
    assert set(own) == {"here", "loaded-here", "plain"}  # what a smart-proxy serves from its own peers is left out
    assert (own["here"].loaded, own["here"].size, own["loaded-here"].loaded) == (False, 5, True)
    assert own["plain"].loaded  # a plain OpenAI server serves what it lists
    assert "elsewhere" in {m.name for m in _openai_models(body, own_only=False)}


async def test_refresh_send_and_breaker_with_the_key() -> None:
    seen: list[httpx.Request] = []
    down = False

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if down:
            raise httpx.ConnectError("refused", request=request)
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "m", "status": {"value": "loaded"}}]})
        return httpx.Response(200, json={"ok": True})

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
        fleet = Fleet(http, peer_configs(p={"url": "http://p:1", "api_key": KEY, "failures": 2, "cooldown": "30s"}))
        peer = fleet.peers["p"]
        assert await fleet.refresh(peer)
        assert [m.name for _, m in fleet.holders("m")] == ["m"] and fleet.holders("m")[0][0] is peer
        answer = await fleet.send(peer, "POST", "/v1/chat/completions", b"{}")
        assert json.loads(await answer.read()) == {"ok": True} and peer.in_flight == 1
        peer.done()
        assert all(r.headers["authorization"] == f"Bearer {KEY}" for r in seen)

        down = True
        with pytest.raises(UpstreamError) as caught:
            await fleet.send(peer, "POST", "/v1/chat/completions", b"{}")
        assert "peer 'p'" in caught.value.message and KEY not in caught.value.message
        assert peer.up  # one failure of two
        assert not await fleet.refresh(peer)
        assert not peer.up and fleet.listed() == []  # out: its models are not listed
        report = fleet.report()[0]
        assert (report["status"], report["breaker"], report["models"]) == ("down", "open", ["m"])
        assert KEY not in json.dumps(report) and 0 < report["probe_in"] <= 30
        assert [g.up for g in fleet.gauges()] == [False]


async def test_run_probes_half_open_brings_the_peer_back_and_publishes_both(autojump_clock) -> None:
    down = True

    def handler(request: httpx.Request) -> httpx.Response:
        if down:
            raise httpx.ConnectError("refused", request=request)
        return httpx.Response(200, json={"models": [{"name": "x:1b", "size": 1}]})

    bus = EventBus()
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
        fleet = Fleet(http, peer_configs(o={"url": "http://o:1", "kind": "ollama", "failures": 1, "cooldown": "5s"}), bus=bus)
        peer = fleet.peers["o"]
        with bus.subscribe() as events:
            async with trio.open_nursery() as nursery:
                await nursery.start(fleet.run)
                assert not peer.up  # the first read failed: out at once with failures = 1
                await trio.sleep(4)
                assert not peer.up and peer.breaker.trips == 1
                down = False
                await trio.sleep(2)  # past the cooldown: the half-open probe succeeded
                assert peer.up and [m.name for m in peer.models.values()] == ["x:1b"]
                nursery.cancel_scope.cancel()
            seen = [(e.kind, e.data) for e in await events.get()]
    # its going out and its coming back, each once (the probes while it was out are not news)
    assert [kind for kind, _ in seen] == ["peer", "peer"]
    assert seen[0][1]["name"] == "o" and seen[0][1]["status"] == "down" and "refused" in seen[0][1]["error"]
    assert seen[1][1] == {"name": "o", "status": "ok", "models": ["x:1b"]}
