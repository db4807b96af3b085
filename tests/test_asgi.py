"""web/asgi.py: the ASGI messages per answer of a model route (two for a whole body, a start,
a message per piece and an empty last one for a stream) and a client that leaves mid-request
cancelling its handler and releasing the lease."""

from __future__ import annotations

import json
import logging

import trio

from smart_proxy.web.asgi import CONNECTION, ClientConnection

from .asgi_driver import Exchange, make_app


def _headers(start: dict) -> dict[bytes, bytes]:
    return dict(start["headers"])


async def test_a_non_streamed_answer_is_a_start_and_one_last_body_message(make_config, start_pool, http, nursery):
    app, pool = await make_app(make_config, start_pool, http, nursery)
    payload = {"model": "a", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    start, body = await Exchange(app, payload).run()
    assert start["type"] == "http.response.start" and start["status"] == 200
    assert body == {"type": "http.response.body", "body": body["body"], "more_body": False}
    assert int(_headers(start)[b"content-length"]) == len(body["body"])
    assert _headers(start)[b"content-type"] == b"application/json"
    answer = json.loads(body["body"])
    assert answer["choices"][0]["message"]["content"] == "tok0 tok1 tok2 tok3 "
    (server,) = pool.servers()
    assert server.in_flight == 0 and server.limiter.borrowed_tokens == 0


async def test_an_error_answer_is_two_messages_too(make_config, start_pool, http, nursery):
    app, _ = await make_app(make_config, start_pool, http, nursery)
    start, body = await Exchange(app, {"model": "nope", "messages": []}).run()
    assert start["status"] == 404 and body["more_body"] is False
    assert json.loads(body["body"])["error"]["code"] == 404
    assert int(_headers(start)[b"content-length"]) == len(body["body"])


async def test_a_streamed_answer_is_a_start_its_pieces_and_an_empty_last_message(make_config, start_pool, http, nursery):
    app, _ = await make_app(make_config, start_pool, http, nursery)
    payload = {"model": "a", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "stream": True}
    start, *pieces = await Exchange(app, payload).run()
    assert start["status"] == 200 and _headers(start)[b"content-type"].startswith(b"text/event-stream")
    assert b"content-length" not in _headers(start)
    assert all(piece["more_body"] for piece in pieces[:-1]) and pieces[-1] == {
        "type": "http.response.body", "body": b"", "more_body": False}
    assert b"".join(piece["body"] for piece in pieces).endswith(b"data: [DONE]\n\n")


async def test_a_client_leaving_mid_request_cancels_it_and_releases_the_lease(make_config, start_pool, http, nursery):
    # the upstream takes 20 x 0.5 s to answer; the client leaves while it works
    app, pool = await make_app(make_config, start_pool, http, nursery, token_delay=0.5)
    payload = {"model": "a", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20}
    exchange = Exchange(app, payload)
    with trio.fail_after(8):
        async with trio.open_nursery() as inner:
            inner.start_soon(exchange.run)
            while not pool.servers() or pool.servers()[0].limiter.borrowed_tokens == 0:
                await trio.sleep(0.01)  # the request is upstream, holding the lease and the slot
            exchange.to_app.send_nowait({"type": "http.disconnect"})
    (server,) = pool.servers()
    assert exchange.sent == []  # cancelled before any answer
    assert server.in_flight == 0 and server.limiter.borrowed_tokens == 0


async def test_on_http1_the_end_of_the_clients_connection_cancels_the_request(make_config, start_pool, http, nursery):
    # under serve(), an HTTP/1 request learns of its client leaving from its connection
    # (ClientConnection.ended, called when the connection's read side ends), not from a task per request
    app, pool = await make_app(make_config, start_pool, http, nursery, token_delay=0.5)
    payload = {"model": "a", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20}
    exchange = Exchange(app, payload)
    connection = ClientConnection()
    with trio.fail_after(8):
        async with trio.open_nursery() as inner:
            token = CONNECTION.set(connection)
            inner.start_soon(exchange.run)  # inherits the connection, as Hypercorn's request task does
            CONNECTION.reset(token)
            while not pool.servers() or pool.servers()[0].limiter.borrowed_tokens == 0:
                await trio.sleep(0.01)
            (task,) = inner.child_tasks
            assert task.child_nurseries == []  # no watcher task, nor a nursery for one
            connection.ended()
    (server,) = pool.servers()
    assert exchange.sent == []
    assert server.in_flight == 0 and server.limiter.borrowed_tokens == 0


async def test_on_http1_a_finished_answer_is_not_cancelled_by_the_disconnect_that_follows_it(
    make_config, start_pool, http, nursery
):
    app, pool = await make_app(make_config, start_pool, http, nursery)
    payload = {"model": "a", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True}
    exchange = Exchange(app, payload)
    connection = ClientConnection()
    token = CONNECTION.set(connection)
    try:
        sent = await exchange.run()
    finally:
        CONNECTION.reset(token)
    connection.ended()  # the client closes its connection once it has the answer: nothing to cancel
    assert sent[-1] == {"type": "http.response.body", "body": b"", "more_body": False}
    assert b"".join(m.get("body", b"") for m in sent[1:]).endswith(b"data: [DONE]\n\n")
    (server,) = pool.servers()
    assert server.in_flight == 0


async def test_a_connection_that_ended_before_its_request_was_served_serves_nothing(
    make_config, start_pool, http, nursery
):
    app, pool = await make_app(make_config, start_pool, http, nursery)
    payload = {"model": "a", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    connection = ClientConnection()
    connection.ended()  # the client sent its request and closed at once
    token = CONNECTION.set(connection)
    try:
        sent = await Exchange(app, payload).run()
    finally:
        CONNECTION.reset(token)
    assert sent == [] and pool.servers() == []


async def test_an_answer_is_counted_before_its_last_message_goes_out_and_logged_after(
    make_config, start_pool, http, nursery, caplog
):
    # a client that has the whole answer and then scrapes /metrics must find it there;
    # the access line need not hold the answer back
    caplog.set_level(logging.INFO, logger="smart_proxy.access")
    app, _ = await make_app(make_config, start_pool, http, nursery)
    proxy = app.extensions["smart_proxy"]
    counted_when_sent = []
    lines_when_sent = []

    class Watched(Exchange):
        async def run(self) -> list[dict]:
            self.to_app.send_nowait({"type": "http.request", "body": self.body, "more_body": False})

            async def send(message: dict) -> None:
                if message["type"] == "http.response.body" and not message.get("more_body", False):
                    labels = {"route": "/v1/chat/completions", "model": "a", "status": "200", "peer": ""}
                    counted_when_sent.append(proxy.metrics.registry.get_sample_value("smart_proxy_requests_total", labels))
                    lines_when_sent.append(len([r for r in caplog.records if r.name == "smart_proxy.access"]))
                self.sent.append(message)
                await trio.lowlevel.checkpoint()

            await self.app(self.scope, self._receive.receive, send)
            return self.sent

    for stream in (False, True):
        payload = {"model": "a", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "stream": stream}
        await Watched(app, payload).run()
    assert counted_when_sent == [1, 2]  # each counted before its last message went out
    assert lines_when_sent == [0, 1]  # and its access line written after
    assert [r.getMessage().split()[:3] for r in caplog.records if r.name == "smart_proxy.access"] == [
        ["POST", "/v1/chat/completions", "200"]
    ] * 2
