"""upstream.py: the transport against real local servers: keep-alive reuse, framings, stale and
idle connections, errors, closing; and with the fake llama-server through the relay."""

from __future__ import annotations

import json
import os
from collections.abc import Awaitable, Callable
from functools import partial

import httpx
import pytest
import trio
import trio.testing

from smart_proxy.upstream.client import UpstreamTransport
from smart_proxy.upstream.relay import RelayBody, open_upstream

# ---- the transport against a scripted trio server --------------------------------------------


class SendAndClose(Exception):
    """Raised by an answer: send ``reply``, then close the connection."""

    def __init__(self, reply: bytes) -> None:
        self.reply = reply


class Peer:
    """A local HTTP/1.1 server: ``answer(request_head, body) -> bytes`` (None: close without answering;
    raise SendAndClose to answer and close)."""

    def __init__(self, answer: Callable[[bytes, bytes], Awaitable[bytes | None] | bytes | None]) -> None:
        self.answer = answer
        self.connections = 0
        self.requests: list[tuple[int, bytes, bytes]] = []  # (connection number, head, body)
        self.closed_by_client = 0
        self.port = 0

    async def start(self, nursery: trio.Nursery) -> Peer:
        (listener,) = await nursery.start(partial(trio.serve_tcp, self._serve, 0, host="127.0.0.1"))
        self.port = listener.socket.getsockname()[1]
        return self

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def _serve(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        number = self.connections
        buffer = b""
        try:
            while True:
                while b"\r\n\r\n" not in buffer:
                    data = await stream.receive_some()
                    if not data:
                        self.closed_by_client += 1
                        return
                    buffer += data
                head, _, buffer = buffer.partition(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                while len(buffer) < length:
                    buffer += await stream.receive_some()
                body, buffer = buffer[:length], buffer[length:]
                self.requests.append((number, head, body))
                try:
                    reply = self.answer(head, body)
                    if not isinstance(reply, bytes | None):
                        reply = await reply
                except SendAndClose as last:
                    await stream.send_all(last.reply)
                    return
                if reply is None:
                    return
                await stream.send_all(reply)
        except trio.BrokenResourceError:
            self.closed_by_client += 1
        finally:
            await stream.aclose()


def _ok(body: bytes = b"ok", *headers: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), b"".join(h + b"\r\n" for h in headers), body)


async def _get(transport: UpstreamTransport, url: str, method: str = "GET", content: bytes | None = None) -> httpx.Response:
    response = await transport.handle_async_request(httpx.Request(method, url, content=content))
    await response.aread()
    await response.aclose()
    return response


async def test_keep_alive_reuses_one_connection(nursery) -> None:
    peer = await Peer(lambda head, body: _ok(b"echo:" + body)).start(nursery)
    async with UpstreamTransport() as transport:
        for n in range(3):
            response = await _get(transport, peer.url("/x?y=1"), "POST", b"n=%d" % n)
            assert response.status_code == 200 and response.content == b"echo:n=%d" % n
        assert transport.connections == 1 and transport.idle == 1
    assert peer.connections == 1 and [number for number, _, _ in peer.requests] == [1, 1, 1]
    head = peer.requests[0][1]
    assert head.startswith(b"POST /x?y=1 HTTP/1.1\r\n") and b"Host: 127.0.0.1:%d" % peer.port in head
    assert transport.connections == 0  # closed with the transport


async def test_abort_closes_an_unfinished_answer_at_once(nursery) -> None:
    # a chunked answer that never ends: the server waits for the client to close
    async def forever(head: bytes, body: bytes) -> bytes | None:
        return b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"

    peer = await Peer(forever).start(nursery)
    async with UpstreamTransport() as transport:
        upstream = await open_upstream(transport, "POST", peer.url("/stream"), content=b"{}")
        chunks = upstream.response.stream.__aiter__()
        assert await chunks.__anext__() == b"hello"
        with trio.testing.assert_no_checkpoints():
            upstream.abort()  # the client left: closed now, by the task that saw it
        assert transport.connections == 0
        with trio.fail_after(2):
            while peer.closed_by_client == 0:
                await trio.sleep(0.01)
        await upstream.aclose()  # the relay's own close afterwards finds nothing left to do
        assert transport.connections == 0 and transport.idle == 0
        # an answer read to the end went back to the pool: abort leaves it there
        done = await Peer(lambda head, body: _ok(b"x")).start(nursery)
        upstream = await open_upstream(transport, "GET", done.url())
        assert await upstream.read() == b"x"
        upstream.abort()
        assert transport.idle == 1


async def test_connection_close_and_http10_answers_are_not_reused(nursery) -> None:
    answers = [_ok(b"a", b"Connection: close"), b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\nb", _ok(b"c")]
    peer = await Peer(lambda head, body: answers[len(peer.requests) - 1]).start(nursery)
    async with UpstreamTransport() as transport:
        assert (await _get(transport, peer.url())).content == b"a"
        assert transport.connections == 0
        assert (await _get(transport, peer.url())).content == b"b"
        assert transport.connections == 0
        assert (await _get(transport, peer.url())).content == b"c"
        assert transport.connections == 1
    assert peer.connections == 3


async def test_a_close_delimited_body_is_read_to_the_end(nursery) -> None:
    async def answer(head: bytes, body: bytes) -> bytes:
        raise SendAndClose(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n" + b"x" * 200_000)

    peer = await Peer(answer).start(nursery)
    async with UpstreamTransport() as transport:
        response = await _get(transport, peer.url())
        assert response.content == b"x" * 200_000 and transport.connections == 0


async def test_no_body_for_head_204_and_304_and_the_connection_is_reused(nursery) -> None:
    def answer(head: bytes, body: bytes) -> bytes:
        if head.startswith(b"HEAD"):
            return b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n"
        if b"/204" in head:
            return b"HTTP/1.1 204 No Content\r\n\r\n"
        if b"/304" in head:
            return b"HTTP/1.1 304 Not Modified\r\nContent-Length: 1000\r\n\r\n"
        return _ok(b"last")

    peer = await Peer(answer).start(nursery)
    async with UpstreamTransport() as transport:
        response = await _get(transport, peer.url(), "HEAD")
        assert response.status_code == 200 and response.content == b""
        assert (await _get(transport, peer.url("/204"))).status_code == 204
        assert (await _get(transport, peer.url("/304"))).status_code == 304
        assert (await _get(transport, peer.url())).content == b"last"
    assert peer.connections == 1 and len(peer.requests) == 4


async def test_an_interim_answer_is_skipped(nursery) -> None:
    peer = await Peer(lambda head, body: b"HTTP/1.1 100 Continue\r\n\r\n" + _ok(b"final")).start(nursery)
    async with UpstreamTransport() as transport:
        response = await _get(transport, peer.url())
        assert response.status_code == 200 and response.content == b"final"


async def test_a_chunked_body_in_odd_pieces_is_relayed_byte_for_byte(nursery) -> None:
    events = [b"data: %d %s\n\n" % (n, b"y" * (n * 37 % 500)) for n in range(60)]
    wire = b"".join(b"%x;ext=1\r\n%s\r\n" % (len(e), e) for e in events) + b"0\r\nX-Trailer: t\r\n\r\n"

    async def answer(head: bytes, body: bytes) -> None:
        # the head, then the body in pieces that cut through sizes, data and CRLFs
        await stream_box[0].send_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        cut = 0
        while cut < len(wire):
            step = 1 + (cut * 7919) % 97
            await stream_box[0].send_all(wire[cut : cut + step])
            cut += step
            await trio.lowlevel.checkpoint()
        return b""

    stream_box: list[trio.SocketStream] = []
    peer = Peer(answer)
    original = peer._serve

    async def serve(stream: trio.SocketStream) -> None:
        stream_box.append(stream)
        await original(stream)

    peer._serve = serve  # type: ignore[method-assign]
    await peer.start(nursery)
    async with UpstreamTransport() as transport:
        response = await transport.handle_async_request(httpx.Request("GET", peer.url()))
        pieces = [piece async for piece in response.stream]
        await response.aclose()
        assert b"".join(pieces) == b"".join(events)
        assert transport.idle == 1  # read to the end: pooled
        assert (await _get(transport, peer.url())).content == b"".join(events)  # and reusable
    assert peer.connections == 1


async def test_a_last_chunk_that_arrives_alone_ends_the_body(nursery) -> None:
    """The terminating chunk in a read of its own: the body ends there, the connection is pooled."""

    async def answer(head: bytes, body: bytes) -> bytes:
        await streams[-1].send_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await trio.sleep(0.05)
        await streams[-1].send_all(b"0\r\n")
        await trio.sleep(0.05)
        return b"\r\n"

    streams: list[trio.SocketStream] = []
    peer = Peer(answer)
    serve = peer._serve

    async def remember(stream: trio.SocketStream) -> None:
        streams.append(stream)
        await serve(stream)

    peer._serve = remember  # type: ignore[method-assign]
    await peer.start(nursery)
    async with UpstreamTransport() as transport:
        for _ in range(2):
            with trio.fail_after(2):
                response = await transport.handle_async_request(httpx.Request("GET", peer.url()))
                assert [piece async for piece in response.stream] == [b"hello"]
            assert transport.idle == 1
    assert peer.connections == 1


async def test_a_burst_in_one_read_is_one_piece(nursery) -> None:
    events = [b"data: %d\n\n" % n for n in range(200)]
    wire = b"".join(b"%x\r\n%s\r\n" % (len(e), e) for e in events) + b"0\r\n\r\n"
    peer = await Peer(lambda head, body: b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + wire).start(nursery)
    async with UpstreamTransport() as transport:
        response = await transport.handle_async_request(httpx.Request("GET", peer.url()))
        pieces = [piece async for piece in response.stream]
        assert b"".join(pieces) == b"".join(events) and len(pieces) <= 3


async def test_closing_a_body_midway_closes_the_connection(nursery) -> None:
    async def answer(head: bytes, body: bytes) -> bytes:
        return b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n" + b"z" * 1000

    peer = await Peer(answer).start(nursery)
    async with UpstreamTransport() as transport:
        response = await transport.handle_async_request(httpx.Request("GET", peer.url()))
        async for piece in response.stream:
            assert piece
            break
        await response.aclose()
        assert transport.connections == 0 and transport.idle == 0
        with trio.fail_after(5):
            while not peer.closed_by_client:
                await trio.sleep(0.01)


async def test_cancelled_while_waiting_for_the_head_closes_the_connection(nursery) -> None:
    async def answer(head: bytes, body: bytes) -> bytes:
        await trio.sleep_forever()

    peer = await Peer(answer).start(nursery)
    async with UpstreamTransport() as transport:
        with trio.move_on_after(0.1) as scope:
            await transport.handle_async_request(httpx.Request("GET", peer.url()))
        assert scope.cancelled_caught and transport.connections == 0


async def test_a_connection_the_server_closed_while_idle_is_not_used(nursery) -> None:
    async def answer(head: bytes, body: bytes) -> bytes:
        raise SendAndClose(_ok(b"bye"))  # says nothing about closing, then closes

    peer = Peer(answer)
    await peer.start(nursery)
    async with UpstreamTransport() as transport:
        assert (await _get(transport, peer.url())).content == b"bye"
        assert transport.idle == 1
        await trio.sleep(0.1)  # the FIN arrives
        assert (await _get(transport, peer.url())).content == b"bye"  # on a fresh connection, not an error
    assert peer.connections == 2 and len(peer.requests) == 2


async def test_idle_connections_expire(nursery) -> None:
    peer = await Peer(lambda head, body: _ok()).start(nursery)
    async with UpstreamTransport(keepalive_expiry=0.2) as transport:
        await _get(transport, peer.url())
        await _get(transport, peer.url())
        assert peer.connections == 1
        await trio.sleep(0.3)
        await _get(transport, peer.url())
        assert peer.connections == 2 and transport.connections == 1


async def test_run_closes_idle_connections_as_they_expire_without_a_request(nursery) -> None:
    peer = await Peer(lambda head, body: _ok()).start(nursery)
    async with UpstreamTransport(keepalive_expiry=0.3) as transport:
        await nursery.start(transport.run)  # nothing idle yet: it waits for a connection to be put back
        await _get(transport, peer.url())
        await trio.sleep(0.15)
        await _get(transport, peer.url())  # the same connection, idle again from now
        assert transport.idle == 1 and peer.connections == 1
        await trio.sleep(0.2)  # 0.35 s after the first put back, 0.2 s after the second
        assert transport.idle == 1
        with trio.fail_after(2):
            while peer.closed_by_client == 0:
                await trio.sleep(0.02)
        assert transport.connections == 0 and transport.idle == 0
        # and again, once the sweeper has had nothing to wait for
        await _get(transport, peer.url())
        with trio.fail_after(2):
            while peer.closed_by_client < 2:
                await trio.sleep(0.02)
        assert transport.connections == 0


@pytest.mark.parametrize("via", ["client", "transport"])
async def test_a_stale_connection_is_retried_once_by_open_upstream(nursery, via: str) -> None:
    """The server takes the request on a kept-alive connection and closes it without answering."""

    def answer(head: bytes, body: bytes) -> bytes | None:
        return _ok(b"first") if len(peer.requests) == 1 else None if len(peer.requests) == 2 else _ok(b"again")

    peer = await Peer(answer).start(nursery)
    async with httpx.AsyncClient() as client, UpstreamTransport() as transport:
        http = client if via == "client" else transport
        assert await (await open_upstream(http, "GET", peer.url())).read() == b"first"
        upstream = await open_upstream(http, "GET", peer.url())  # reuses the connection, which dies: retried
        assert upstream.status_code == 200 and await upstream.read() == b"again"
    assert len(peer.requests) == 3 and peer.connections == 2


async def test_errors_are_httpx_errors(nursery) -> None:
    async with UpstreamTransport() as transport:
        with pytest.raises(httpx.ConnectError):
            await _get(transport, "http://127.0.0.1:1/")
        with pytest.raises(httpx.UnsupportedProtocol):
            await _get(transport, "https://127.0.0.1:1/")

        garbage = await Peer(lambda head, body: b"garbage garbage\r\n\r\n").start(nursery)
        with pytest.raises(httpx.RemoteProtocolError, match="status line"):
            await _get(transport, garbage.url())

        async def short(head: bytes, body: bytes) -> bytes:
            raise SendAndClose(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")

        cut = await Peer(short).start(nursery)
        response = await transport.handle_async_request(httpx.Request("GET", cut.url()))
        with pytest.raises(httpx.RemoteProtocolError, match="complete message body"):
            await response.aread()
        await response.aclose()

        async def bad_chunks(head: bytes, body: bytes) -> bytes:
            return b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"

        bad = await Peer(bad_chunks).start(nursery)
        response = await transport.handle_async_request(httpx.Request("GET", bad.url()))
        with pytest.raises(httpx.RemoteProtocolError, match="chunk size"):
            await response.aread()
        await response.aclose()
        assert transport.connections == 0


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost"])
async def test_an_address_or_a_name_is_reached(nursery, host: str) -> None:
    """An IP address (a llama-server's 127.0.0.1) is connected directly, a name through trio's resolver."""
    bind = "::1" if host == "::1" else "127.0.0.1"
    try:
        (listener,) = await nursery.start(partial(trio.serve_tcp, _answer_ok, 0, host=bind))
    except OSError:
        pytest.skip(f"cannot listen on {bind}")
    port = listener.socket.getsockname()[1]
    url = f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"
    async with UpstreamTransport() as transport:
        for _ in range(2):
            response = await _get(transport, url)
            assert response.status_code == 200 and response.content == b"ok"
        assert transport.connections == 1  # kept and reused, whichever way it was opened


async def _answer_ok(stream: trio.SocketStream) -> None:
    data = b""
    async with stream:
        while True:
            while b"\r\n\r\n" not in data:
                chunk = await stream.receive_some()
                if not chunk:
                    return
                data += chunk
            data = data.partition(b"\r\n\r\n")[2]
            await stream.send_all(_ok())


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts open files in /proc")
async def test_a_refused_connection_leaves_no_socket_open() -> None:
    async with UpstreamTransport() as transport:
        before = _open_fds()
        for _ in range(5):
            with pytest.raises(httpx.ConnectError):
                await _get(transport, "http://127.0.0.1:1/")
        assert _open_fds() == before and transport.connections == 0


async def test_a_header_with_a_line_break_is_refused(nursery) -> None:
    peer = await Peer(lambda head, body: _ok()).start(nursery)
    async with UpstreamTransport() as transport:
        request = httpx.Request("GET", peer.url())
        request.headers["X-Evil"] = "a\r\nInjected: yes"
        with pytest.raises(httpx.LocalProtocolError):
            await transport.handle_async_request(request)
    assert peer.requests == []


@pytest.mark.parametrize(
    ("method", "path", "content", "headers"),
    [
        ("POST", "/v1/chat/completions", b'{"model": "a"}', {"Content-Type": "application/json"}),
        ("post", "/x?y=1&z=%20", b"n=1", {"Content-Type": "text/plain", "X-Two": "2"}),
        ("POST", "/empty", b"", {"Content-Type": "application/json"}),  # httpx frames it: Content-Length 0 first
        ("GET", "/get", b"", None),
        ("POST", "/own-length", b"abc", {"content-length": "3"}),  # the caller's framing header: httpx's way
    ],
)
async def test_request_sends_what_an_httpx_request_would(nursery, method, path, content, headers) -> None:
    peer = await Peer(lambda head, body: _ok(b"echo:" + body)).start(nursery)
    async with UpstreamTransport() as transport:
        lean = await transport.request(method, peer.url(path), content=content, headers=headers)
        assert await lean.aread() == b"echo:" + content and lean.status_code == 200
        await _get(transport, peer.url(path), method, content)  # the same request through httpx.Request
        plain = await transport.handle_async_request(httpx.Request(method, peer.url(path), content=content, headers=headers))
        await plain.aread()
    (_, lean_head, lean_body), _, (_, plain_head, plain_body) = peer.requests
    assert (lean_head, lean_body) == (plain_head, plain_body)
    assert peer.connections == 1  # one keep-alive connection carried all three


async def test_request_refuses_a_header_with_a_line_break(nursery) -> None:
    peer = await Peer(lambda head, body: _ok()).start(nursery)
    async with UpstreamTransport() as transport:
        with pytest.raises(httpx.LocalProtocolError):
            await transport.request("POST", peer.url(), content=b"x", headers={"X-Evil": "a\r\nInjected: yes"})
        with pytest.raises(httpx.UnsupportedProtocol):
            await transport.request("POST", "https://127.0.0.1/", content=b"x")
    assert peer.requests == []


async def test_read_gives_the_body_decoded_whether_or_not_it_was_encoded(nursery) -> None:
    import gzip

    answers = [_ok(b"plain " * 100), _ok(gzip.compress(b"zipped " * 100), b"Content-Encoding: gzip")]
    peer = await Peer(lambda head, body: answers[len(peer.requests) - 1]).start(nursery)
    async with UpstreamTransport() as transport:
        plain = await open_upstream(transport, "POST", peer.url("/a"), content=b"{}")
        assert await plain.read() == b"plain " * 100
        zipped = await open_upstream(transport, "POST", peer.url("/b"), content=b"{}")
        assert await zipped.read() == b"zipped " * 100
        assert transport.idle == 1  # both read to the end: the connection went back each time


async def test_a_streamed_request_body_is_sent(nursery) -> None:
    peer = await Peer(lambda head, body: _ok(body)).start(nursery)

    async def parts():
        yield b"abc"
        yield b"def"

    async with UpstreamTransport() as transport:
        request = httpx.Request("POST", peer.url(), content=parts(), headers={"Content-Length": "6"})
        response = await transport.handle_async_request(request)
        assert await response.aread() == b"abcdef"


async def test_a_request_larger_than_the_socket_buffer_is_sent_whole(nursery) -> None:
    # the first send takes what fits the buffer; the rest waits for the peer to read
    peer = await Peer(lambda head, body: _ok(b"%d %d" % (len(body), hash(body)))).start(nursery)
    content = os.urandom(8 << 20)
    async with UpstreamTransport() as transport:
        response = await _get(transport, peer.url(), "POST", content)
    assert response.content == b"%d %d" % (len(content), hash(content))


async def test_closing_the_transport_closes_connections_in_use(nursery) -> None:
    peer = await Peer(lambda head, body: b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial").start(nursery)
    transport = UpstreamTransport()
    response = await transport.handle_async_request(httpx.Request("GET", peer.url()))
    assert transport.connections == 1
    await transport.aclose()
    assert transport.connections == 0
    with pytest.raises(httpx.ReadError):
        await response.aread()
    with pytest.raises(RuntimeError, match="closed"):
        await transport.handle_async_request(httpx.Request("GET", peer.url()))


# ---- with the fake llama-server and the relay ------------------------------------------------


async def test_a_relayed_stream_matches_the_httpx_clients_byte_for_byte(make_config, start_pool, http) -> None:
    pool = await start_pool(make_config({"a": {"tokens": 300, "token_delay": 0}}))
    request = json.dumps({"prompt": "x", "stream": True}).encode()
    bodies = []
    async with UpstreamTransport() as transport:
        for via in (http, transport, transport):
            lease = await pool.acquire("a")
            upstream = await open_upstream(via, "POST", lease.base_url + "/v1/completions", content=request)
            body = RelayBody(upstream, on_error=lambda reason: b"", on_done=lease.release)
            async with body:
                bodies.append(b"".join([piece async for piece in body]))
            assert upstream.response.is_closed
        assert transport.connections == 1 and transport.idle == 1  # read to the end twice on one connection
    assert bodies[0].count(b"data: ") == 300 + 2
    assert bodies[0] == bodies[1] == bodies[2]


async def test_a_relay_left_midway_frees_the_connection(make_config, start_pool) -> None:
    pool = await start_pool(make_config({"a": {"tokens": 1000, "token_delay": 0.01}}))
    request = json.dumps({"prompt": "x", "stream": True}).encode()
    async with UpstreamTransport() as transport:
        lease = await pool.acquire("a")
        upstream = await open_upstream(transport, "POST", lease.base_url + "/v1/completions", content=request)
        body = RelayBody(upstream, on_error=lambda reason: b"", on_done=lease.release)
        with trio.move_on_after(0.2):
            async with body:
                async for _ in body:
                    pass
        assert upstream.response.is_closed and transport.connections == 0
