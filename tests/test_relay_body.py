"""RelayBody: coalesced relaying, and letting go of the lease and upstream however the response ends."""

from __future__ import annotations

import gc
import json

import httpx
import trio

from smart_proxy.relay import RelayBody, open_upstream


async def _body(make_config, start_pool, http: httpx.AsyncClient, **behaviour):
    pool = await start_pool(make_config({"a": {"tokens": 50, "token_delay": 0.01, **behaviour}}))
    lease = await pool.acquire("a")
    request = json.dumps({"prompt": "x", "stream": True}).encode()
    upstream = await open_upstream(http, "POST", lease.base_url + "/v1/completions", content=request, slots=lease.server.limiter)
    released = []

    def release() -> None:
        released.append(True)
        lease.release()

    return lease, upstream, RelayBody(upstream, on_error=lambda reason: b"", on_done=release), released


async def test_relayed_to_the_end(make_config, start_pool, http) -> None:
    lease, upstream, body, released = await _body(make_config, start_pool, http)
    async with body:
        data = b"".join([piece async for piece in body])
    assert data.count(b"data: ") == 50 + 2 and data.endswith(b"data: [DONE]\n\n")
    assert released == [True] and lease.server.in_flight == 0 and upstream.response.is_closed
    assert lease.server.limiter.borrowed_tokens == 0


async def test_a_burst_goes_out_in_fewer_pieces(make_config, start_pool, http) -> None:
    lease, upstream, body, released = await _body(make_config, start_pool, http, tokens=2000, token_delay=0)
    pieces = []
    async with body:
        await trio.sleep(0.3)  # let the burst arrive while nobody reads
        async for piece in body:
            pieces.append(piece)
    data = b"".join(pieces)
    assert data.count(b"data: ") == 2000 + 2
    assert len(pieces) < 2000 / 4  # the fake writes one chunk per event; they went out together


async def test_client_leaving_closes_the_upstream(make_config, start_pool, http) -> None:
    lease, upstream, body, released = await _body(make_config, start_pool, http, tokens=1000, token_delay=0.01)
    with trio.move_on_after(0.2):
        async with body:
            async for _ in body:
                pass
    assert released == [True] and lease.server.in_flight == 0 and upstream.response.is_closed
    assert lease.server.limiter.borrowed_tokens == 0


async def test_dropped_before_it_started(make_config, start_pool, http) -> None:
    lease, upstream, body, released = await _body(make_config, start_pool, http)
    del body
    gc.collect()
    assert released == [True] and lease.server.in_flight == 0
    with trio.fail_after(2):
        while not upstream.response.is_closed:
            await trio.sleep(0.01)
    assert lease.server.limiter.borrowed_tokens == 0
