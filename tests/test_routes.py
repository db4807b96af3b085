"""web/routes.py and web/asgi.py: the model routes on raw ASGI, one handler per URL, never Quart."""

from __future__ import annotations

import json
import logging
import re

import trio

from smart_proxy.lifecycle import Phase
from smart_proxy.web import asgi

from .asgi_driver import Exchange, make_app

CHAT = {"model": "a", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "x_unknown": [1]}
REQUESTS = [
    ("/v1/chat/completions", CHAT),
    ("/v1/chat/completions", {**CHAT, "stream": True}),
    ("/v1/completions", {"model": "a", "prompt": "Once", "max_tokens": 2}),
    ("/v1/completions", {"model": "a", "prompt": "Once", "max_tokens": 2, "stream": True}),
    ("/v1/embeddings", {"model": "a", "input": ["x", "y"]}),
    ("/v1/chat/completions", {"model": "nope", "messages": []}),  # 404, names the known models
    ("/v1/chat/completions", {"messages": []}),  # 400 missing model
    ("/v1/completions", {"model": "a"}),  # 400 missing prompt
    ("/v1/chat/completions", [1, 2]),  # 400 not an object
]


OLLAMA_CHAT = {"model": "a", "messages": [{"role": "user", "content": "hi"}], "options": {"num_predict": 3}}
OLLAMA_REQUESTS = [
    ("/api/chat", {**OLLAMA_CHAT, "stream": False}),
    ("/api/chat", OLLAMA_CHAT),  # Ollama streams unless told not to
    ("/api/generate", {"model": "a", "prompt": "Once", "stream": False, "options": {"num_predict": 2}}),
    ("/api/generate", {"model": "a", "prompt": "Once", "options": {"num_predict": 2}}),
    ("/api/chat", {"model": "nope", "messages": []}),  # 404
    ("/api/chat", {"messages": []}),  # 400 model is required
    ("/api/chat", {**OLLAMA_CHAT, "keep_alive": "forever-ish"}),  # 400 keep_alive
    ("/api/generate", [1]),  # 400 not an object
]
#: What differs from one answer to the next: the fake's clock, and Ollama's timings and timestamps.
_CLOCKS = [
    (rb'"created": ?\d+', b'"created": 0'),
    (rb'"created_at": ?"[^"]*"', b'"created_at": ""'),
    (rb'"(\w+_duration)": ?\d+', rb'"\1": 0'),
]


def _answer(sent: list[dict]) -> tuple[int, dict[bytes, bytes], bytes]:
    """Status, headers (without the per-request id) and the whole body, with clocks and timings taken out."""
    start, *pieces = sent
    headers = dict(start["headers"])
    headers.pop(b"x-request-id")
    body = b"".join(piece["body"] for piece in pieces)
    for pattern, replacement in _CLOCKS:
        body = re.sub(pattern, replacement, body)
    if b"content-length" in headers:
        headers[b"content-length"] = str(len(body)).encode()
    assert [piece["more_body"] for piece in pieces][-1] is False
    return start["status"], headers, body


async def _statuses(app, requests: list[tuple[str, object]]) -> list[int]:
    return [_answer(await Exchange(app, payload, path).run())[0] for path, payload in requests]


def _recorder(sent: list[dict]):
    """An ASGI ``send`` that keeps what it is given in ``sent``."""

    async def send(message: dict) -> None:
        sent.append(message)

    return send


async def test_the_openai_routes_answer(make_config, start_pool, http, nursery):
    app, _ = await make_app(make_config, start_pool, http, nursery, tokens=3)
    assert await _statuses(app, REQUESTS) == [200, 200, 200, 200, 200, 404, 400, 400, 400]
    status, headers, body = _answer(await Exchange(app, {**CHAT, "stream": True}).run())
    assert headers[b"content-type"].startswith(b"text/event-stream") and body.endswith(b"data: [DONE]\n\n")
    assert headers[b"cache-control"] == b"no-cache" and headers[b"x-accel-buffering"] == b"no"
    status, headers, body = _answer(await Exchange(app, {"model": "nope", "messages": []}).run())
    assert json.loads(body)["error"]["code"] == 404 and headers[b"content-type"] == b"application/json"


async def test_the_ollama_routes_answer(make_config, start_pool, http, nursery):
    app, _ = await make_app(make_config, start_pool, http, nursery, tokens=3)
    assert await _statuses(app, OLLAMA_REQUESTS) == [200, 200, 200, 200, 404, 400, 400, 400]
    metrics = app.extensions["smart_proxy"].metrics.registry
    labels = {"route": "/api/chat", "model": "a", "status": "200", "peer": ""}  # labelled with their model
    assert metrics.get_sample_value("smart_proxy_requests_total", labels) == 2
    status, headers, body = _answer(await Exchange(app, OLLAMA_CHAT, "/api/chat").run())
    lines = [json.loads(line) for line in body.splitlines()]
    assert headers[b"content-type"] == b"application/x-ndjson" and lines[-1]["done"] is True
    assert "".join(line["message"]["content"] for line in lines) == "tok0 tok1 tok2 "
    # an upstream error, in Ollama's shape with its status kept
    app, _ = await make_app(make_config, start_pool, http, nursery, reject={"status": 400, "message": "the prompt is too long"})
    for payload in ({**OLLAMA_CHAT, "stream": False}, OLLAMA_CHAT):
        status, _headers, body = _answer(await Exchange(app, payload, "/api/chat").run())
        assert status == 400 and json.loads(body) == {"error": "the prompt is too long"}


async def test_an_upstream_error_is_relayed_as_the_upstream_gave_it(make_config, start_pool, http, nursery):
    app, _ = await make_app(make_config, start_pool, http, nursery, reject={"status": 400, "message": "the prompt is too long"})
    for payload in ({"model": "a", "prompt": "x"}, {"model": "a", "prompt": "x", "stream": True}):
        status, headers, body = _answer(await Exchange(app, payload, "/v1/completions").run())
        assert status == 400 and json.loads(body)["error"]["message"] == "the prompt is too long"
        assert headers[b"content-type"] == b"application/json"


async def test_a_bug_in_a_route_is_a_500_in_its_dialect(make_config, start_pool, http, nursery, monkeypatch, caplog):
    """A bug before the answer starts is answered in the route's dialect, not left to Hypercorn."""
    app, _ = await make_app(make_config, start_pool, http, nursery)

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr("smart_proxy.dialects.openai.required_field", broken)
    monkeypatch.setattr("smart_proxy.handlers.ollama_routes.plan_generation", broken)
    for path, payload in [("/v1/chat/completions", CHAT), ("/api/chat", OLLAMA_CHAT)]:
        caplog.clear()
        status, _headers, body = _answer(await Exchange(app, payload, path).run())
        logged = [r for r in caplog.records if r.exc_info]
        assert len(logged) == 1 and "unexpected error on POST " + path in logged[0].getMessage()
        message = json.loads(body)["error"]
        assert status == 500 and "internal error: RuntimeError: a bug" in (message if path == "/api/chat" else message["message"])


async def test_another_method_is_quarts_405_in_dialect_and_options_its_allow(make_config, start_pool, http, nursery):
    app, _ = await make_app(make_config, start_pool, http, nursery)
    for path, dialect in [("/v1/chat/completions", "openai"), ("/api/chat", "ollama"), ("/api/delete", "ollama")]:
        exchange = Exchange(app, {}, path)
        exchange.scope["method"] = "GET"
        status, headers, body = _answer(await exchange.run())
        error = json.loads(body)["error"]
        assert status == 405 and (error if dialect == "ollama" else error["message"]).startswith("The method is not allowed")
        exchange = Exchange(app, {}, path)
        exchange.scope["method"] = "OPTIONS"
        status, headers, body = _answer(await exchange.run())
        allow = b"DELETE, OPTIONS" if path == "/api/delete" else b"OPTIONS, POST"
        assert status == 200 and headers[b"allow"] == allow and body == b""


async def test_no_model_route_reaches_quart(make_config, start_pool, http, nursery):
    app, _ = await make_app(make_config, start_pool, http, nursery)
    edge = app.asgi_app
    reached = []
    quart = edge._app

    async def watched(scope, receive, send):
        reached.append(scope["path"])
        await quart(scope, receive, send)

    edge._app = watched
    for path, payload in REQUESTS + OLLAMA_REQUESTS:
        await Exchange(app, payload, path).run()
    assert reached == []
    await Exchange(app, {"model": "a", "messages": []}, "/api/chat").run()  # a load: the same handler
    await Exchange(app, {"model": "a", "input": "x"}, "/api/embed").run()
    await Exchange(app, {"model": "a"}, "/api/show").run()
    assert reached == []
    await Exchange(app, {}, "/v1/models").run()  # the lists go to Quart
    assert reached == ["/v1/models"]


async def test_a_body_in_pieces_and_a_chunked_body_over_the_limit(make_config, start_pool, http, nursery):
    app, _ = await make_app(make_config, start_pool, http, nursery)
    limit = app.extensions["smart_proxy"].config.proxy.max_body
    exchange = Exchange(app, {})
    exchange.scope["headers"] = [(b"content-type", b"application/json")]  # chunked: no Content-Length
    half = len(json.dumps(CHAT)) // 2
    raw = json.dumps(CHAT).encode()
    for piece in (raw[:half], raw[half:]):
        exchange.to_app.send_nowait({"type": "http.request", "body": piece, "more_body": True})
    exchange.to_app.send_nowait({"type": "http.request", "body": b"", "more_body": False})
    sent: list[dict] = []
    send = _recorder(sent)
    await app(exchange.scope, exchange._receive.receive, send)
    assert sent[0]["status"] == 200 and json.loads(sent[1]["body"])["model"] == "a"

    sent.clear()
    exchange = Exchange(app, {})
    exchange.scope["headers"] = [(b"content-type", b"application/json")]
    piece = b" " * (limit // 8 + 1)
    for _ in range(8):
        exchange.to_app.send_nowait({"type": "http.request", "body": piece, "more_body": True})
    await app(exchange.scope, exchange._receive.receive, send)
    error = json.loads(sent[1]["body"])["error"]
    assert sent[0]["status"] == 413 and error["type"] == "request_too_large" and f"{limit} bytes" in error["message"]


async def test_a_body_of_its_content_length_is_not_followed_by_a_wait_for_the_last_message(
    make_config, start_pool, http, nursery
):
    # Hypercorn sends the body, then an empty last message; the relay starts on the body
    app, _ = await make_app(make_config, start_pool, http, nursery)
    for path, payload in [("/v1/chat/completions", CHAT), ("/api/chat", {"model": "a", "messages": []})]:
        exchange = Exchange(app, payload, path)  # the second: an Ollama load
        exchange.to_app.send_nowait({"type": "http.request", "body": exchange.body, "more_body": True})
        sent: list[dict] = []
        with trio.fail_after(5):
            await app(exchange.scope, exchange._receive.receive, _recorder(sent))
        assert sent[0]["status"] == 200, (path, sent)


async def test_a_client_leaving_before_its_body_is_in_takes_nothing(make_config, start_pool, http, nursery):
    app, pool = await make_app(make_config, start_pool, http, nursery)
    exchange = Exchange(app, CHAT)
    exchange.to_app.send_nowait({"type": "http.request", "body": exchange.body[:10], "more_body": True})
    exchange.to_app.send_nowait({"type": "http.disconnect"})
    sent: list[dict] = []
    send = _recorder(sent)
    with trio.fail_after(5):
        await app(exchange.scope, exchange._receive.receive, send)
    assert sent == [] and pool.servers() == []  # no answer, and no model was loaded for it
    metrics = app.extensions["smart_proxy"].metrics.registry
    labels = {"route": "/v1/chat/completions", "model": "", "status": "499", "peer": ""}
    assert metrics.get_sample_value("smart_proxy_requests_total", labels) == 1


async def test_while_draining_a_model_route_is_refused_in_openai_dialect(make_config, start_pool, http, nursery):
    app, pool = await make_app(make_config, start_pool, http, nursery)
    app.extensions["smart_proxy"].lifecycle.move(Phase.DRAINING)
    start, body = await Exchange(app, CHAT).run()
    assert start["status"] == 503 and json.loads(body["body"])["error"]["code"] == 503
    assert pool.servers() == []


async def test_a_client_leaving_mid_stream_closes_the_upstream_quietly(make_config, start_pool, http, nursery, caplog):
    app, pool = await make_app(make_config, start_pool, http, nursery, token_delay=0.2)
    llama = app.extensions["smart_proxy"].llama
    exchange = Exchange(app, {**CHAT, "stream": True, "max_tokens": 50})
    exchange.to_app.send_nowait({"type": "http.request", "body": exchange.body, "more_body": False})
    first_piece = trio.Event()

    async def send(message: dict) -> None:
        exchange.sent.append(message)
        if message["type"] == "http.response.body" and message["body"]:
            first_piece.set()

    with trio.fail_after(5):
        async with trio.open_nursery() as inner:
            inner.start_soon(app, exchange.scope, exchange._receive.receive, send)
            await first_piece.wait()
            assert llama.connections == 1
            exchange.to_app.send_nowait({"type": "http.disconnect"})
    (server,) = pool.servers()
    assert server.in_flight == 0 and server.limiter.borrowed_tokens == 0
    assert llama.connections == 0  # closed, not kept: that is what stops llama-server generating
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]  # a client leaving is no upstream error


async def test_a_body_that_does_not_arrive_in_time_is_a_408(make_config, start_pool, http, nursery, monkeypatch):
    monkeypatch.setattr(asgi, "BODY_TIMEOUT", 0.2)
    app, pool = await make_app(make_config, start_pool, http, nursery)
    exchange = Exchange(app, CHAT)
    exchange.to_app.send_nowait({"type": "http.request", "body": exchange.body[:10], "more_body": True})
    sent: list[dict] = []
    send = _recorder(sent)
    with trio.fail_after(5):
        await app(exchange.scope, exchange._receive.receive, send)
    error = json.loads(sent[1]["body"])["error"]
    assert sent[0]["status"] == 408 and error["code"] == 408 and "did not arrive" in error["message"]
    assert pool.servers() == []
