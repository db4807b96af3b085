"""relay.py: coalesced relaying (raw, or as NDJSON), letting go of the lease and upstream
however a body ends, and the retry of a keep-alive connection closed under us."""

from __future__ import annotations

import json
import time
from functools import partial

import httpx
import pytest
import trio
import trio.testing

from smart_proxy.dialects import ollama as translate
from smart_proxy.dialects.openai import sse_error
from smart_proxy.errors import UpstreamError, UpstreamRefused
from smart_proxy.upstream.client import LlamaClient, ProtocolError, ReadFailed
from smart_proxy.upstream.relay import (
    MAX_ANSWER,
    HttpxAnswer,
    LineTooLong,
    NDJSONLines,
    RelayBody,
    SSELines,
    UpstreamAnswer,
    open_httpx,
    open_upstream,
)


async def _body(make_config, start_pool, llama: LlamaClient, **behaviour):
    pool = await start_pool(make_config({"a": {"tokens": 50, "token_delay": 0.01, **behaviour}}))
    lease = await pool.acquire("a")
    request = json.dumps({"prompt": "x", "stream": True}).encode()
    upstream = await open_upstream(llama, "POST", lease.base_url + "/v1/completions", content=request, lease=lease)
    released = []

    def release() -> None:
        released.append(True)
        lease.release()

    return lease, upstream, RelayBody(upstream, on_error=lambda reason: b"", on_done=release), released


async def test_relayed_to_the_end(make_config, start_pool, llama) -> None:
    lease, upstream, body, released = await _body(make_config, start_pool, llama)
    async with body:
        data = b"".join([piece async for piece in body])
    assert data.count(b"data: ") == 50 + 2 and data.endswith(b"data: [DONE]\n\n")
    assert released == [True] and lease.server.in_flight == 0 and upstream.response.closed
    assert lease.server.limiter.borrowed_tokens == 0


async def test_a_burst_goes_out_in_fewer_pieces(make_config, start_pool, llama) -> None:
    lease, upstream, body, released = await _body(make_config, start_pool, llama, tokens=2000, token_delay=0)
    pieces = []
    async with body:
        await trio.sleep(0.3)  # let the burst arrive while nobody reads
        async for piece in body:
            pieces.append(piece)
    data = b"".join(pieces)
    assert data.count(b"data: ") == 2000 + 2
    assert len(pieces) < 2000 / 4  # the fake writes one chunk per event; they went out together


async def test_client_leaving_closes_the_upstream(make_config, start_pool, llama) -> None:
    lease, upstream, body, released = await _body(make_config, start_pool, llama, tokens=1000, token_delay=0.01)
    with trio.move_on_after(0.2):
        async with body:
            async for _ in body:
                pass
    assert released == [True] and lease.server.in_flight == 0 and upstream.response.closed
    assert lease.server.limiter.borrowed_tokens == 0


# ---- with a translation: llama-server's SSE relayed as Ollama's NDJSON ----------------------

_MEASURED_HERE = ("created_at", "total_duration", "load_duration")  # wall-clock values, not the translation's


def _masked(data: bytes) -> list[dict]:
    lines = [json.loads(line) for line in data.splitlines()]
    return [{k: v for k, v in line.items() if k not in _MEASURED_HERE} for line in lines]


def _one_line_per_event(sse: bytes) -> bytes:
    """What the proxy sent before the NDJSON relay coalesced: each event translated and written alone."""
    parser, answer = translate.SSEParser(), translate.Answer("a", chat=True, started=time.perf_counter())
    lines = [translate.ndjson(obj) for event in parser.feed(sse) + parser.close() for obj in answer.feed(event)]
    return b"".join(lines + [translate.ndjson(obj) for obj in answer.final()])


async def _ndjson_body(make_config, start_pool, http: httpx.AsyncClient, via: LlamaClient, **behaviour):
    pool = await start_pool(make_config({"a": {"token_delay": 0, **behaviour}}))
    lease = await pool.acquire("a")
    call = translate.chat_request({"messages": [{"role": "user", "content": "x"}]}, "a")
    request = json.dumps(call.body).encode()
    url = lease.base_url + call.path
    # the same answer, unrelayed, to compare with (a stream that breaks off has none)
    sse = (await http.post(url, content=request)).content if "break_after" not in behaviour else b""
    upstream = await open_upstream(via, "POST", url, content=request, lease=lease)
    released = []

    def release() -> None:
        released.append(True)
        lease.release()

    stream = translate.NDJSONStream(translate.Answer("a", chat=True, started=time.perf_counter()))
    body = RelayBody(upstream, on_error=sse_error, on_done=release, translation=stream)
    return lease, upstream, body, released, sse


async def test_an_ndjson_burst_goes_out_in_fewer_pieces(make_config, start_pool, http, llama) -> None:
    lease, upstream, body, released, sse = await _ndjson_body(make_config, start_pool, http, llama, tokens=2000)
    pieces = []
    async with body:
        await trio.sleep(0.3)  # let the burst arrive while nobody reads
        async for piece in body:
            pieces.append(piece)
    data = b"".join(pieces)
    assert sse.count(b"data: ") > 2000  # the fake writes one chunk per event
    assert len(pieces) < 2000 / 4
    lines = _masked(data)
    assert [line["message"]["content"] for line in lines[:-1]] == [f"tok{i} " for i in range(2000)]
    assert lines[-1]["done"] is True and lines[-1]["eval_count"] == 2000
    assert lines == _masked(_one_line_per_event(sse))  # the same lines, in the same order
    assert released == [True] and lease.server.in_flight == 0 and upstream.response.closed
    assert lease.server.limiter.borrowed_tokens == 0


async def test_an_ndjson_stream_breaking_off_ends_with_its_error_line(make_config, start_pool, http, llama) -> None:
    lease, upstream, body, released, _ = await _ndjson_body(make_config, start_pool, http, llama, tokens=50, break_after=5)
    async with body:
        data = b"".join([piece async for piece in body])
    lines = _masked(data)
    assert [line["message"]["content"] for line in lines[:5]] == [f"tok{i} " for i in range(5)]
    assert len(lines) == 6 and "broke off" in lines[-1]["error"] and not any(line.get("done") for line in lines)
    assert released == [True] and lease.server.in_flight == 0 and upstream.response.closed
    assert lease.server.limiter.borrowed_tokens == 0


async def test_client_leaving_an_ndjson_stream_closes_the_upstream(make_config, start_pool, http, llama) -> None:
    lease, upstream, body, released, _ = await _ndjson_body(make_config, start_pool, http, llama, tokens=1000, token_delay=0.01)
    with trio.move_on_after(0.2):
        async with body:
            async for _ in body:
                pass
    assert released == [True] and lease.server.in_flight == 0 and upstream.response.closed
    assert lease.server.limiter.borrowed_tokens == 0


async def test_entered_and_left_before_reading(make_config, start_pool, llama) -> None:
    lease, upstream, body, released = await _body(make_config, start_pool, llama)
    async with body:
        pass
    assert released == [True] and lease.server.in_flight == 0
    assert upstream.response.closed


async def _serve_once(nursery: trio.Nursery, reply: bytes | None) -> str:
    """A server that reads a request head, sends ``reply`` (None: nothing) and closes; its URL."""

    async def server(stream: trio.SocketStream) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = await stream.receive_some()
            if not chunk:
                return
            data += chunk
        if reply is not None:
            await stream.send_all(reply)
        await stream.aclose()

    (listener,) = await nursery.start(partial(trio.serve_tcp, server, 0, host="127.0.0.1"))
    return f"http://127.0.0.1:{listener.socket.getsockname()[1]}/"


async def test_the_llama_clients_failures_become_the_proxys_errors(nursery, llama) -> None:
    with pytest.raises(UpstreamRefused, match=r"cannot reach http://127.0.0.1:1/: ConnectFailed: .*refused"):
        await open_upstream(llama, "GET", "http://127.0.0.1:1/")
    unanswered = await _serve_once(nursery, None)
    with pytest.raises(UpstreamError, match="cannot reach .*: ProtocolError: server closed a new connection") as info:
        await open_upstream(llama, "GET", unanswered)
    assert not isinstance(info.value, UpstreamRefused)  # it was sent: not to be sent again
    cut = await _serve_once(nursery, b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    upstream = await open_upstream(llama, "GET", cut)
    with pytest.raises(UpstreamError, match="the upstream answer broke off: ProtocolError: .*complete message body"):
        await upstream.read()
    switched = await _serve_once(nursery, b"HTTP/1.1 101 Switching Protocols\r\n\r\n")
    with pytest.raises(UpstreamError, match="cannot reach .*: ProtocolError: 101 Switching Protocols"):
        await open_upstream(llama, "GET", switched)
    beyond = await _serve_once(nursery, b"HTTP/1.1 600 Beyond\r\nContent-Length: 0\r\n\r\n")
    with pytest.raises(UpstreamError, match="answered an invalid status: 600"):
        await open_upstream(llama, "GET", beyond)
    assert llama.connections == llama.idle == 1  # none in use: only the 600's, whose empty body ended


async def test_httpxs_failures_become_the_proxys_errors(nursery, http) -> None:
    """The Ollama upstream's hop: the same errors, its name in front."""
    with pytest.raises(UpstreamRefused, match="^the Ollama upstream is unreachable: cannot reach .*: ConnectError"):
        await open_httpx(http, http.build_request("GET", "http://127.0.0.1:1/"), name="the Ollama upstream")
    cut = await _serve_once(nursery, b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    upstream = await open_httpx(http, http.build_request("GET", cut))
    with pytest.raises(UpstreamError, match="the upstream answer broke off: RemoteProtocolError"):
        await upstream.read()
    assert upstream.response.closed


class Scripted:
    """An :class:`~smart_proxy.upstream.relay.RawAnswer` whose body is ``pieces``, then ``error`` if given."""

    def __init__(self, *pieces: bytes, error: Exception | None = None, headers: list[tuple[bytes, bytes]] | None = None):
        self.status = 200
        self.headers = headers or []
        self.delimited = True
        self.closed = False
        self._pieces = list(pieces)
        self._error = error

    def header(self, name: bytes) -> bytes | None:
        return next((value for key, value in self.headers if key.lower() == name), None)

    def __aiter__(self) -> Scripted:
        return self

    async def __anext__(self) -> bytes:
        await trio.lowlevel.checkpoint()
        if self._pieces:
            return self._pieces.pop(0)
        if self._error is not None:
            raise self._error
        raise StopAsyncIteration

    def abort(self) -> None:
        self.closed = True

    async def aclose(self) -> None:
        self.closed = True


# ---- SSELines: a relayed SSE stream, a whole line at a time ----------------------------------


def _relay_lines(data: bytes, size: int, limit: int = 1024) -> tuple[bytes, SSELines]:
    lines = SSELines(limit)
    out = b"".join(lines.feed(data[i : i + size]) for i in range(0, len(data), size))
    return out, lines


@pytest.mark.parametrize("size", [1, 3, 7, 64])
def test_sse_lines_pass_whole_lines_on_and_hold_back_the_rest(size: int) -> None:
    stream = b'data: {"a": 1}\n\ndata: {"b": 2}\n\ndata: {"c"'
    out, lines = _relay_lines(stream, size)
    assert out == b'data: {"a": 1}\n\ndata: {"b": 2}\n\n'
    assert lines.at_event_end and not lines.done
    assert lines.rest() == b'data: {"c"' and not lines.done


def test_sse_lines_know_an_event_left_open_and_the_done_event() -> None:
    out, lines = _relay_lines(b'data: {"a": 1}\n', 4)
    assert out == b'data: {"a": 1}\n' and not lines.at_event_end
    out, lines = _relay_lines(b'data: {"a": 1}\r\n\r\ndata: [DONE]\r\n\r\n', 5)
    assert lines.at_event_end and lines.done
    _, lines = _relay_lines(b"data:[DONE]", 5)
    assert lines.rest() == b"data:[DONE]" and lines.done
    assert SSELines(10).at_event_end  # nothing passed on yet


def test_sse_lines_refuse_a_line_longer_than_the_limit() -> None:
    lines = SSELines(100)
    assert lines.feed(b"data: " + b"x" * 90) == b""
    with pytest.raises(LineTooLong, match="100 bytes"):
        lines.feed(b"x" * 20)


@pytest.mark.parametrize("via", ["llama", "httpx"])
async def test_relay_body_ends_a_broken_sse_stream_with_a_readable_error_event(via: str) -> None:
    pieces = (b'data: {"a": 1}\n\ndata: {"b"', b": 2}\n", b'data: {"c')  # the second a whole line, its event still open
    if via == "llama":
        answer = Scripted(*pieces, error=ProtocolError("peer closed connection without sending complete message body"))
    else:

        class Broken(httpx.AsyncByteStream):
            async def __aiter__(self):
                for piece in pieces:
                    yield piece
                raise httpx.RemoteProtocolError("peer closed connection without sending complete message body")

        answer = HttpxAnswer(httpx.Response(200, stream=Broken()))
    body = RelayBody(UpstreamAnswer(answer), on_error=sse_error, lines=SSELines(MAX_ANSWER))
    async with body:
        data = b"".join([piece async for piece in body])
    events = data.split(b"\n\n")
    assert events[:2] == [b'data: {"a": 1}', b'data: {"b": 2}'] and events[-1] == b""
    error = json.loads(events[2].removeprefix(b"data: "))["error"]
    assert error["code"] == 502 and len(events) == 4 and answer.closed
    kind = "ProtocolError" if via == "llama" else "RemoteProtocolError"
    cause = "peer closed connection without sending complete message body"
    assert error["message"] == f"the upstream stream broke off: {kind}: {cause}"


async def test_a_stream_that_breaks_off_because_its_relay_was_cut_is_cut_not_ended_with_an_error() -> None:
    class ClosedUnderIt(Scripted):
        async def __anext__(self) -> bytes:  # a read of a socket closed under it fails without a yield
            if self._pieces:
                return self._pieces.pop(0)
            raise ReadFailed("[Errno 9] Bad file descriptor")

    answer = ClosedUnderIt(b'data: {"a": 1}\n\n')
    body = RelayBody(UpstreamAnswer(answer), on_error=sse_error, lines=SSELines(MAX_ANSWER))
    got = []
    with trio.CancelScope() as scope:
        async with body:
            async for piece in body:
                got.append(piece)
                scope.cancel()  # the client left: its route is cancelled and the upstream closed
    assert scope.cancelled_caught and got == [b'data: {"a": 1}\n\n'] and answer.closed


async def test_relay_body_ends_an_sse_stream_without_done_with_an_error_event() -> None:
    body = RelayBody(UpstreamAnswer(Scripted(b'data: {"a": 1}\n\n')), on_error=sse_error, lines=SSELines(MAX_ANSWER))
    async with body:
        data = b"".join([piece async for piece in body])
    first, error, end = data.split(b"\n\n")
    assert first == b'data: {"a": 1}' and end == b""
    assert "no data: [DONE]" in json.loads(error.removeprefix(b"data: "))["error"]["message"]


async def test_read_stops_at_the_limit() -> None:
    async def endless():
        while True:
            yield b"x" * 1000
            await trio.lowlevel.checkpoint()

    content = endless()
    upstream = UpstreamAnswer(HttpxAnswer(httpx.Response(200, content=content)))
    with pytest.raises(UpstreamError, match="larger than 5000 bytes"):
        await upstream.read(5000)
    assert upstream.response.closed
    await content.aclose()  # the test's own generator (httpx closes only its own, which read() did)
    declared = UpstreamAnswer(Scripted(b"x" * 6000, headers=[(b"Content-Length", b"6000")]))
    with pytest.raises(UpstreamError, match="max_answer"):
        await declared.read(5000)  # refused before reading
    assert declared.response.closed and declared.response._pieces  # unread


async def test_read_of_an_httpx_answer_decodes_its_content_encoding(nursery, http) -> None:
    """httpx asks for gzip; the encoding header is not relayed, so the body must be decoded."""
    import gzip

    zipped = gzip.compress(b"zipped " * 100)
    head = b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n" % len(zipped)
    url = await _serve_once(nursery, head + zipped)
    upstream = await open_httpx(http, http.build_request("GET", url))
    assert "content-encoding" not in upstream.headers and await upstream.read() == b"zipped " * 100


def test_upstream_headers_leave_out_the_connections_own_and_unclean_ones() -> None:
    raw = [
        (b"Content-Type", b"application/json"), (b"Set-Cookie", b"a=b"), (b"Connection", b"keep-alive, X-Hop"),
        (b"X-Hop", b"1"), (b"Keep-Alive", b"timeout=5"), (b"Upgrade", b"h2c"), (b"X-Ctl", b"a\x01b"),
        (b"X-Long", b"y" * 5000), (b"X-Fine", b"caf\xc3\xa9"), (b"Proxy-Authenticate", b"Basic"),
    ]  # fmt: skip
    upstream = UpstreamAnswer(Scripted(headers=raw))
    assert upstream.headers == {"content-type": "application/json", "x-fine": "caf\xc3\xa9"}


async def test_relay_body_ends_a_broken_ndjson_stream_with_an_error_line_of_its_own() -> None:
    """An Ollama upstream's own NDJSON: the partial line is dropped, the error line follows the last whole one."""

    def ndjson_error(reason: str) -> bytes:
        return json.dumps({"error": reason}).encode() + b"\n"

    class Broken(httpx.AsyncByteStream):
        async def __aiter__(self):
            yield b'{"response": "a", "done": false}\n{"respo'
            raise httpx.ReadError("connection reset")

    class Ended(httpx.AsyncByteStream):
        def __init__(self, *pieces: bytes) -> None:
            self.pieces = pieces

        async def __aiter__(self):
            for piece in self.pieces:
                yield piece

    async def relayed(stream: httpx.AsyncByteStream) -> list[dict]:
        upstream = UpstreamAnswer(HttpxAnswer(httpx.Response(200, stream=stream)))
        body = RelayBody(upstream, on_error=ndjson_error, lines=NDJSONLines(MAX_ANSWER))
        async with body:
            return [json.loads(line) for line in b"".join([piece async for piece in body]).splitlines()]

    lines = await relayed(Broken())
    assert lines[0] == {"response": "a", "done": False} and "broke off" in lines[1]["error"] and len(lines) == 2
    for complete in (b'{"response": "a", "done": false}\n{"done": true}', b'{"status": "success"}\n'):
        assert (await relayed(Ended(complete[:9], complete[9:]))) == [json.loads(x) for x in complete.splitlines()]
