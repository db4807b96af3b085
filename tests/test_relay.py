"""The streamed body lets go of its lease and upstream however the response ends."""

from __future__ import annotations

import gc
from functools import partial

import httpx
import trio

from smart_proxy.relay import StreamBody, open_upstream, relay


async def _stream(make_config, start_pool, http: httpx.AsyncClient):
    pool = await start_pool(make_config({"a": {"tokens": 50, "token_delay": 0.01}}))
    lease = await pool.acquire("a")
    upstream = await open_upstream(
        http, "POST", lease.base_url + "/v1/completions", content=b'{"prompt": "x", "stream": true}'
    )
    released = []

    def release() -> None:
        released.append(True)
        lease.release()

    body = StreamBody(relay(upstream, on_error=lambda reason: b""), upstream=upstream, on_done=release)
    return lease, upstream, body, released


async def test_closed_before_it_started(make_config, start_pool, http) -> None:
    lease, upstream, body, released = await _stream(make_config, start_pool, http)
    await body.aclose()
    assert released == [True] and lease.server.in_flight == 0
    assert upstream.response.is_closed


async def test_dropped_unclosed(make_config, start_pool, http) -> None:
    lease, upstream, body, released = await _stream(make_config, start_pool, http)
    del body
    gc.collect()
    assert released == [True] and lease.server.in_flight == 0
    with trio.fail_after(2):
        while not upstream.response.is_closed:
            await trio.sleep(0.01)


async def test_iterated_to_the_end(make_config, start_pool, http) -> None:
    lease, upstream, body, released = await _stream(make_config, start_pool, http)
    data = b"".join([chunk async for chunk in body])
    await body.aclose()
    assert data.endswith(b"data: [DONE]\n\n")
    assert released == [True] and lease.server.in_flight == 0


async def test_a_keep_alive_connection_closed_under_us_is_retried_once() -> None:
    """A server that closes a reused connection without answering: the request is sent again."""
    answered = []

    async def server(stream: trio.SocketStream) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = await stream.receive_some()
            if not chunk:
                return
            data += chunk
        answered.append(True)
        if len(answered) == 1:  # the first request finds a connection closing under it
            await stream.aclose()
            return
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        (listener,) = await nursery.start(partial(trio.serve_tcp, server, 0, host="127.0.0.1"))
        port = listener.socket.getsockname()[1]
        async with httpx.AsyncClient() as client:
            upstream = await open_upstream(client, "GET", f"http://127.0.0.1:{port}/")
            assert upstream.status_code == 200 and await upstream.read() == b"ok"
        nursery.cancel_scope.cancel()
    assert len(answered) == 2
