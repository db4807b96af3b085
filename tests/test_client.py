"""client.py: the llama client against real local servers: keep-alive reuse, framings, stale and
idle connections, connection states, cancellation, errors, closing; and with the fake
llama-server through the relay."""

from __future__ import annotations

import json
import os
from collections.abc import Awaitable, Callable
from functools import partial

import httpx
import pytest
import trio
import trio.testing

from smart_proxy.errors import UpstreamError
from smart_proxy.upstream.client import (
    ConnectFailed,
    ConnState,
    Disconnected,
    LlamaClient,
    LlamaResponse,
    ProtocolError,
    ReadFailed,
)
from smart_proxy.upstream.relay import RelayBody, open_upstream

# ---- the client against a scripted trio server -- --------------------------------------------


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
        #: The server's side of each connection, in the order they came.
        self.streams: list[trio.SocketStream] = []

    async def start(self, nursery: trio.Nursery) -> Peer:
        (listener,) = await nursery.start(partial(trio.serve_tcp, self._serve, 0, host="127.0.0.1"))
        self.port = listener.socket.getsockname()[1]
        return self

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def _serve(self, stream: trio.SocketStream) -> None:
        self.streams.append(stream)
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


async def _read(response: LlamaResponse) -> bytes:
    return b"".join([piece async for piece in response])


async def _get(client: LlamaClient, url: str, method: str = "GET", content: bytes = b"") -> tuple[LlamaResponse, bytes]:
    """The answer to one request, read to its end: (response, body)."""
    response = await client.request(method, url, content=content)
    body = await _read(response)
    await response.aclose()
    return response, body


async def test_keep_alive_reuses_one_connection(nursery) -> None:
    peer = await Peer(lambda head, body: _ok(b"echo:" + body)).start(nursery)
    async with LlamaClient() as client:
        for n in range(3):
            response, body = await _get(client, peer.url("/x?y=1"), "POST", b"n=%d" % n)
            assert response.status == 200 and response.reason == b"OK" and body == b"echo:n=%d" % n
        assert client.connections == 1 and client.idle == 1
    assert peer.connections == 1 and [number for number, _, _ in peer.requests] == [1, 1, 1]
    head = peer.requests[0][1]
    assert head.startswith(b"POST /x?y=1 HTTP/1.1\r\n") and b"Host: 127.0.0.1:%d" % peer.port in head
    assert client.connections == 0  # closed with the client


async def test_a_connection_moves_through_its_states(nursery) -> None:
    peer = await Peer(lambda head, body: _ok(b"abc")).start(nursery)
    async with LlamaClient() as client:
        response = await client.request("GET", peer.url())
        (conn,) = client._open
        assert conn.state is ConnState.RECEIVING_BODY and not response.closed
        with pytest.raises(RuntimeError, match="RECEIVING_BODY -> SENDING"):
            conn.to(ConnState.SENDING)  # no second request on a connection whose answer is being read
        assert await _read(response) == b"abc" and response.closed
        assert conn.state is ConnState.IDLE and client.idle == 1
        await _get(client, peer.url())  # IDLE -> SENDING -> AWAITING_HEAD -> RECEIVING_BODY -> IDLE
        assert client._open == {conn} and conn.state is ConnState.IDLE
        response = await client.request("GET", peer.url())
        await response.aclose()  # closed before its end: the connection with it
        assert conn.state is ConnState.CLOSED and client.connections == 0
        with pytest.raises(RuntimeError, match="CLOSED -> IDLE"):
            conn.to(ConnState.IDLE)


async def test_abort_closes_an_unfinished_answer_at_once(nursery) -> None:
    # a chunked answer that never ends: the server waits for the client to close
    async def forever(head: bytes, body: bytes) -> bytes | None:
        return b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"

    peer = await Peer(forever).start(nursery)
    async with LlamaClient() as client:
        upstream = await open_upstream(client, "POST", peer.url("/stream"), content=b"{}")
        chunks = upstream.response.__aiter__()
        assert await chunks.__anext__() == b"hello"
        with trio.testing.assert_no_checkpoints():
            upstream.abort()  # the client left: closed now, by the task that saw it
        assert client.connections == 0
        with trio.fail_after(2):
            while peer.closed_by_client == 0:
                await trio.sleep(0.01)
        await upstream.aclose()  # the relay's own close afterwards finds nothing left to do
        assert client.connections == 0 and client.idle == 0
        # an answer read to the end went back to the pool: abort leaves it there
        done = await Peer(lambda head, body: _ok(b"x")).start(nursery)
        upstream = await open_upstream(client, "GET", done.url())
        assert await upstream.read() == b"x"
        upstream.abort()
        assert client.idle == 1


async def test_connection_close_and_http10_answers_are_not_reused(nursery) -> None:
    answers = [_ok(b"a", b"Connection: close"), b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\nb", _ok(b"c")]
    peer = await Peer(lambda head, body: answers[len(peer.requests) - 1]).start(nursery)
    async with LlamaClient() as client:
        assert (await _get(client, peer.url()))[1] == b"a"
        assert client.connections == 0
        response, body = await _get(client, peer.url())
        assert body == b"b" and response.http10 and client.connections == 0
        assert (await _get(client, peer.url()))[1] == b"c"
        assert client.connections == 1
    assert peer.connections == 3


async def test_a_close_delimited_body_is_read_to_the_end(nursery) -> None:
    async def answer(head: bytes, body: bytes) -> bytes:
        raise SendAndClose(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n" + b"x" * 200_000)

    peer = await Peer(answer).start(nursery)
    async with LlamaClient() as client:
        response, body = await _get(client, peer.url())
        assert body == b"x" * 200_000 and not response.delimited and client.connections == 0


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
    async with LlamaClient() as client:
        response = await client.request("HEAD", peer.url())
        assert response.closed and response.delimited  # nothing to read: already back in the pool
        assert response.status == 200 and await _read(response) == b""
        assert (await _get(client, peer.url("/204")))[0].status == 204
        assert (await _get(client, peer.url("/304")))[0].status == 304
        assert (await _get(client, peer.url()))[1] == b"last"
    assert peer.connections == 1 and len(peer.requests) == 4


async def test_interim_answers_are_skipped(nursery) -> None:
    interim = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
    peer = await Peer(lambda head, body: interim + _ok(b"final")).start(nursery)
    async with LlamaClient() as client:
        response, body = await _get(client, peer.url())
        assert response.status == 200 and body == b"final"


async def test_a_chunked_body_in_odd_pieces_is_relayed_byte_for_byte(nursery) -> None:
    events = [b"data: %d %s\n\n" % (n, b"y" * (n * 37 % 500)) for n in range(60)]
    wire = b"".join(b"%x;ext=1\r\n%s\r\n" % (len(e), e) for e in events) + b"0\r\nX-Trailer: t\r\n\r\n"

    async def answer(head: bytes, body: bytes) -> bytes:
        # the head, then the body in pieces that cut through sizes, data and CRLFs
        await peer.streams[0].send_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        cut = 0
        while cut < len(wire):
            step = 1 + (cut * 7919) % 97
            await peer.streams[0].send_all(wire[cut : cut + step])
            cut += step
            await trio.lowlevel.checkpoint()
        return b""

    peer = await Peer(answer).start(nursery)
    async with LlamaClient() as client:
        response = await client.request("GET", peer.url())
        assert await _read(response) == b"".join(events)
        assert client.idle == 1  # read to the end: pooled
        assert (await _get(client, peer.url()))[1] == b"".join(events)  # and reusable
    assert peer.connections == 1


async def test_a_last_chunk_that_arrives_alone_ends_the_body(nursery) -> None:
    """The terminating chunk in a read of its own: the body ends there, the connection is pooled."""

    async def answer(head: bytes, body: bytes) -> bytes:
        await peer.streams[-1].send_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await trio.sleep(0.05)
        await peer.streams[-1].send_all(b"0\r\n")
        await trio.sleep(0.05)
        return b"\r\n"

    peer = await Peer(answer).start(nursery)
    async with LlamaClient() as client:
        for _ in range(2):
            with trio.fail_after(2):
                response = await client.request("GET", peer.url())
                assert [piece async for piece in response] == [b"hello"]
            assert client.idle == 1
    assert peer.connections == 1


async def test_a_burst_in_one_read_is_one_piece(nursery) -> None:
    events = [b"data: %d\n\n" % n for n in range(200)]
    wire = b"".join(b"%x\r\n%s\r\n" % (len(e), e) for e in events) + b"0\r\n\r\n"
    peer = await Peer(lambda head, body: b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + wire).start(nursery)
    async with LlamaClient() as client:
        response = await client.request("GET", peer.url())
        pieces = [piece async for piece in response]
        assert b"".join(pieces) == b"".join(events) and len(pieces) <= 3


class _SendWhenTaskYields(trio.abc.Instrument):
    """Writes ``data`` to socket ``fd`` the first time ``task`` gives way to the scheduler once armed."""

    def __init__(self, task: trio.lowlevel.Task, fd: int, data: bytes) -> None:
        self.task, self.fd, self.data, self.armed = task, fd, data, False

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        if self.armed and task is self.task:
            self.armed = False
            os.write(self.fd, self.data)


async def _held_stream(nursery: trio.Nursery) -> tuple[Peer, trio.Event]:
    """A peer whose answer is chunked: ``a`` at once, the end once the event returned is set."""
    finish = trio.Event()

    async def answer(head: bytes, body: bytes) -> bytes:
        await peer.streams[-1].send_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n")
        await finish.wait()
        return b"0\r\n\r\n"

    peer = await Peer(answer).start(nursery)
    return peer, finish


async def test_a_body_read_gives_way_first_so_it_takes_what_came_meanwhile(nursery) -> None:
    """Under load, one piece carries what arrived while the other tasks had their turn."""
    chunk = b"%x\r\n%s\r\n"
    peer, finish = await _held_stream(nursery)
    async with LlamaClient() as client:
        response = await client.request("GET", peer.url())
        assert await response.__anext__() == b"a"
        server = peer.streams[-1].socket.fileno()
        os.write(server, chunk % (1, b"b"))
        await trio.sleep(0.05)  # b has arrived
        later = _SendWhenTaskYields(trio.lowlevel.current_task(), server, chunk % (1, b"c"))
        trio.lowlevel.add_instrument(later)
        try:
            later.armed = True
            piece = await response.__anext__()
        finally:
            trio.lowlevel.remove_instrument(later)
        assert piece == b"bc"  # read after giving way: c came meanwhile
        finish.set()
        assert [piece async for piece in response] == []


class _LeaveWhenTaskYields(trio.abc.Instrument):
    """What a client's leaving does (smart_proxy.web.asgi.ClientConnection.ended) the first time ``task`` gives way."""

    def __init__(self, task: trio.lowlevel.Task, scope: trio.CancelScope, response: LlamaResponse) -> None:
        self.task, self.scope, self.response = task, scope, response

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        if task is self.task and self.scope is not None:
            self.scope.cancel()  # first the route's cancellation, then the close of its upstream
            self.response.abort()
            self.scope = None


async def test_a_client_leaving_while_a_body_read_gives_way_cancels_it_and_does_not_break_it(nursery) -> None:
    """The read takes the cancellation, not the closed socket (which would count as the upstream breaking off)."""
    peer, finish = await _held_stream(nursery)
    async with LlamaClient() as client:
        response = await client.request("GET", peer.url())
        assert await response.__anext__() == b"a"
        with trio.CancelScope() as scope:
            leave = _LeaveWhenTaskYields(trio.lowlevel.current_task(), scope, response)
            trio.lowlevel.add_instrument(leave)
            try:
                await response.__anext__()
            finally:
                trio.lowlevel.remove_instrument(leave)
        assert scope.cancelled_caught and leave.scope is None and response.closed
        finish.set()


async def test_closing_a_body_midway_closes_the_connection(nursery) -> None:
    async def answer(head: bytes, body: bytes) -> bytes:
        return b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n" + b"z" * 1000

    peer = await Peer(answer).start(nursery)
    async with LlamaClient() as client:
        response = await client.request("GET", peer.url())
        async for piece in response:
            assert piece
            break
        await response.aclose()
        assert client.connections == 0 and client.idle == 0
        with trio.fail_after(5):
            while not peer.closed_by_client:
                await trio.sleep(0.01)


async def test_cancelled_while_waiting_for_the_head_closes_the_connection(nursery) -> None:
    async def answer(head: bytes, body: bytes) -> bytes:
        await trio.sleep_forever()

    peer = await Peer(answer).start(nursery)
    async with LlamaClient() as client:
        with trio.move_on_after(0.1) as scope:
            await client.request("GET", peer.url())
        assert scope.cancelled_caught and client.connections == 0


async def test_a_cancelled_request_is_not_sent_even_on_a_ready_connection(nursery) -> None:
    """request() is a cancellation point although a pooled connection's send needs no wait."""
    peer = await Peer(lambda head, body: _ok()).start(nursery)
    async with LlamaClient() as client:
        await _get(client, peer.url())
        assert client.idle == 1
        with trio.CancelScope() as scope:
            scope.cancel()
            await client.request("POST", peer.url(), content=b"not this")
        assert scope.cancelled_caught and client.idle == 1  # the pooled connection was not touched
        await trio.sleep(0.1)
    assert len(peer.requests) == 1


async def test_a_cancelled_read_of_a_body_that_has_arrived_closes_the_connection(nursery) -> None:
    """Iterating the body is a cancellation point although its bytes are there to take without a wait:
    those that came with the head, and those that came after it."""

    async def serve(stream: trio.SocketStream) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            head += await stream.receive_some()
        if b"/later" in head:
            await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 20\r\n\r\n")
            await trio.sleep(0.05)
        else:
            await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 20\r\n\r\n")
        await stream.send_all(b"x" * 10)
        await trio.sleep_forever()

    (listener,) = await nursery.start(partial(trio.serve_tcp, serve, 0, host="127.0.0.1"))
    url = f"http://127.0.0.1:{listener.socket.getsockname()[1]}"
    async with LlamaClient() as client:
        for path in ("/with-head", "/later"):
            response = await client.request("GET", url + path)
            await trio.sleep(0.2)  # the 10 bytes are in (in the client's hands, or the socket's buffer)
            with trio.CancelScope() as scope:
                scope.cancel()
                await response.__anext__()
            assert scope.cancelled_caught and response.closed and client.connections == 0, path
        # uncancelled, the same reads give the bytes at once
        for path in ("/with-head", "/later"):
            response = await client.request("GET", url + path)
            await trio.sleep(0.2)
            with trio.fail_after(1):
                assert await response.__anext__() == b"x" * 10
            response.abort()


async def test_a_connection_the_server_closed_while_idle_is_not_used(nursery) -> None:
    async def answer(head: bytes, body: bytes) -> bytes:
        raise SendAndClose(_ok(b"bye"))  # says nothing about closing, then closes

    peer = Peer(answer)
    await peer.start(nursery)
    async with LlamaClient() as client:
        assert (await _get(client, peer.url()))[1] == b"bye"
        assert client.idle == 1
        await trio.sleep(0.1)  # the FIN arrives
        assert (await _get(client, peer.url()))[1] == b"bye"  # on a fresh connection, not an error
    assert peer.connections == 2 and len(peer.requests) == 2


async def test_idle_connections_expire(nursery) -> None:
    peer = await Peer(lambda head, body: _ok()).start(nursery)
    async with LlamaClient(keepalive_expiry=0.2) as client:
        await _get(client, peer.url())
        await _get(client, peer.url())
        assert peer.connections == 1
        await trio.sleep(0.3)
        await _get(client, peer.url())
        assert peer.connections == 2 and client.connections == 1


async def test_run_closes_idle_connections_as_they_expire_without_a_request(nursery) -> None:
    peer = await Peer(lambda head, body: _ok()).start(nursery)
    async with LlamaClient(keepalive_expiry=0.3) as client:
        await nursery.start(client.run)  # nothing idle yet: it waits for a connection to be put back
        await _get(client, peer.url())
        await trio.sleep(0.15)
        await _get(client, peer.url())  # the same connection, idle again from now
        assert client.idle == 1 and peer.connections == 1
        await trio.sleep(0.2)  # 0.35 s after the first put back, 0.2 s after the second
        assert client.idle == 1
        with trio.fail_after(2):
            while peer.closed_by_client == 0:
                await trio.sleep(0.02)
        assert client.connections == 0 and client.idle == 0
        # and again, once the sweeper has had nothing to wait for
        await _get(client, peer.url())
        with trio.fail_after(2):
            while peer.closed_by_client < 2:
                await trio.sleep(0.02)
        assert client.connections == 0


async def test_a_stale_connection_is_retried_once_by_open_upstream(nursery) -> None:
    """The server takes the request on a kept-alive connection and closes it without answering."""

    def answer(head: bytes, body: bytes) -> bytes | None:
        return _ok(b"first") if len(peer.requests) == 1 else None if len(peer.requests) == 2 else _ok(b"again")

    peer = await Peer(answer).start(nursery)
    async with LlamaClient() as client:
        assert await (await open_upstream(client, "GET", peer.url())).read() == b"first"
        with pytest.raises(Disconnected):  # what the client says, on its own
            await client.request("GET", peer.url())
        peer.requests.clear()
        assert await (await open_upstream(client, "GET", peer.url())).read() == b"first"
        upstream = await open_upstream(client, "GET", peer.url())  # reuses the connection, which dies: retried
        assert upstream.status_code == 200 and await upstream.read() == b"again"
    assert len(peer.requests) == 3 and peer.connections == 3


async def test_a_new_connection_closed_without_an_answer_is_not_retried(nursery) -> None:
    """Only a reused connection can have gone stale; a new one closed unanswered is the server failing."""
    peer = await Peer(lambda head, body: None).start(nursery)
    async with LlamaClient() as client:
        with pytest.raises(ProtocolError, match="without answering"):
            await client.request("GET", peer.url())
        with pytest.raises(UpstreamError, match="cannot reach .*ProtocolError"):
            await open_upstream(client, "GET", peer.url())
        assert client.connections == 0
    assert len(peer.requests) == 2


async def test_errors_are_the_clients_own(nursery) -> None:
    async with LlamaClient() as client:
        with pytest.raises(ConnectFailed):
            await _get(client, "http://127.0.0.1:1/")
        with pytest.raises(ValueError, match="http://"):
            await _get(client, "https://127.0.0.1:1/")

        garbage = await Peer(lambda head, body: b"garbage garbage\r\n\r\n").start(nursery)
        with pytest.raises(ProtocolError, match="status line"):
            await _get(client, garbage.url())

        ssh = await Peer(lambda head, body: b"SSH-2.0-OpenSSH\r\n").start(nursery)
        with pytest.raises(ProtocolError, match="not an HTTP/1.x answer"):
            await _get(client, ssh.url())

        async def short(head: bytes, body: bytes) -> bytes:
            raise SendAndClose(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")

        cut = await Peer(short).start(nursery)
        response = await client.request("GET", cut.url())
        with pytest.raises(ProtocolError, match="complete message body"):
            await _read(response)
        assert response.closed

        async def bad_chunks(head: bytes, body: bytes) -> bytes:
            return b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"

        bad = await Peer(bad_chunks).start(nursery)
        response = await client.request("GET", bad.url())
        with pytest.raises(ProtocolError, match="chunk size"):
            await _read(response)
        assert client.connections == 0


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
    async with LlamaClient() as client:
        for _ in range(2):
            response, body = await _get(client, url)
            assert response.status == 200 and body == b"ok"
        assert client.connections == 1  # kept and reused, whichever way it was opened


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
    async with LlamaClient() as client:
        before = _open_fds()
        for _ in range(5):
            with pytest.raises(ConnectFailed):
                await _get(client, "http://127.0.0.1:1/")
        assert _open_fds() == before and client.connections == 0


def _as_httpx_frames_it(method: str, url: str, content: bytes, headers: dict[str, str] | None) -> tuple[bytes, set[bytes], bytes]:
    """The request line, header lines and body httpx would send: the reference for the client's own framing."""
    request = httpx.Request(method, url, content=content, headers=headers)
    line = b"%s %s HTTP/1.1" % (request.method.encode(), request.url.raw_path)
    return line, {b"%s: %s" % (name, value) for name, value in request.headers.raw}, request.read()


@pytest.mark.parametrize(
    ("method", "path", "content", "headers"),
    [
        ("POST", "/v1/chat/completions", b'{"model": "a"}', {"Content-Type": "application/json"}),
        ("post", "/x?y=1&z=%20", b"n=1", {"Content-Type": "text/plain", "X-Two": "2"}),
        ("POST", "/empty", b"", {"Content-Type": "application/json"}),  # Content-Length: 0, as httpx frames it
        ("GET", "/get", b"", None),  # no Content-Length
        ("GET", "", b"", None),  # the target of an empty path is /
    ],
)
async def test_a_request_is_framed_as_httpx_frames_it(nursery, method, path, content, headers) -> None:
    peer = await Peer(lambda head, body: _ok(b"echo:" + body)).start(nursery)
    url = peer.url(path) if path else peer.url().rstrip("/")
    async with LlamaClient() as client:
        response = await client.request(method, url, content=content, headers=headers)
        assert await _read(response) == b"echo:" + content and response.status == 200
    ((_, head, body),) = peer.requests
    line, *fields = head.split(b"\r\n")
    assert (line, set(fields), body) == _as_httpx_frames_it(method, url, content, headers)
    assert len(fields) == len(set(fields)) and fields[0].startswith(b"Host: ")
    given = [name.encode() for name in headers or {}]
    assert [name for name, _, _ in (f.partition(b":") for f in fields) if name in given] == given  # in order


async def test_a_request_the_client_cannot_frame_is_refused_before_anything_is_sent(nursery) -> None:
    peer = await Peer(lambda head, body: _ok()).start(nursery)
    async with LlamaClient() as client:
        for headers in ({"X-Evil": "a\r\nInjected: yes"}, {"Bad Name": "x"}, {"Content-Length": "1"}, {"Host": "elsewhere"}):
            with pytest.raises(ValueError, match="request header"):
                await client.request("POST", peer.url(), content=b"x", headers=headers)
        for url in ("https://127.0.0.1/", "http:///no-host", "http://127.0.0.1:1/a b"):
            with pytest.raises(ValueError):
                await client.request("POST", url, content=b"x")
        assert client.connections == 0
    assert peer.requests == [] and peer.connections == 0


async def test_an_encoded_answer_is_refused_by_open_upstream(nursery) -> None:
    """The client asks for no Content-Encoding and decodes none: such an answer cannot be relayed as it is."""
    import gzip

    answers = [_ok(gzip.compress(b"zipped"), b"Content-Encoding: gzip"), _ok(b"plain", b"Content-Encoding: identity")]
    peer = await Peer(lambda head, body: answers[len(peer.requests) - 1]).start(nursery)
    async with LlamaClient() as client:
        with pytest.raises(UpstreamError, match="Content-Encoding 'gzip'"):
            await open_upstream(client, "POST", peer.url("/a"), content=b"{}")
        assert client.connections == 0  # the answer unread: its connection closed
        assert await (await open_upstream(client, "POST", peer.url("/b"), content=b"{}")).read() == b"plain"
    assert b"accept-encoding" not in peer.requests[0][1].lower()


async def test_a_request_larger_than_the_socket_buffer_is_sent_whole(nursery) -> None:
    # the first send takes what fits the buffer; the rest waits for the peer to read
    peer = await Peer(lambda head, body: _ok(b"%d %d" % (len(body), hash(body)))).start(nursery)
    content = os.urandom(8 << 20)
    async with LlamaClient() as client:
        _, body = await _get(client, peer.url(), "POST", content)
    assert body == b"%d %d" % (len(content), hash(content))


async def test_closing_the_client_closes_connections_in_use(nursery) -> None:
    peer = await Peer(lambda head, body: b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial").start(nursery)
    client = LlamaClient()
    response = await client.request("GET", peer.url())
    assert client.connections == 1
    await client.aclose()
    assert client.connections == 0
    assert await response.__anext__() == b"partial"  # what had arrived with the head
    with pytest.raises(ReadFailed):
        await response.__anext__()
    with pytest.raises(RuntimeError, match="closed"):
        await client.request("GET", peer.url())


# ---- with the fake llama-server and the relay ------------------------------------------------


async def test_a_relayed_stream_matches_the_httpx_clients_byte_for_byte(make_config, start_pool, http) -> None:
    pool = await start_pool(make_config({"a": {"tokens": 300, "token_delay": 0}}))
    request = json.dumps({"prompt": "x", "stream": True}).encode()
    async with pool.lease("a") as lease:
        bodies = [(await http.post(lease.base_url + "/v1/completions", content=request)).content]
    async with LlamaClient() as client:
        for _ in range(2):
            lease = await pool.acquire("a")
            upstream = await open_upstream(client, "POST", lease.base_url + "/v1/completions", content=request)
            body = RelayBody(upstream, on_error=lambda reason: b"", on_done=lease.release)
            async with body:
                bodies.append(b"".join([piece async for piece in body]))
            assert upstream.response.closed
        assert client.connections == 1 and client.idle == 1  # read to the end twice on one connection
    assert bodies[0].count(b"data: ") == 300 + 2
    assert bodies[0] == bodies[1] == bodies[2]


async def test_a_relay_left_midway_frees_the_connection(make_config, start_pool) -> None:
    pool = await start_pool(make_config({"a": {"tokens": 1000, "token_delay": 0.01}}))
    request = json.dumps({"prompt": "x", "stream": True}).encode()
    async with LlamaClient() as client:
        lease = await pool.acquire("a")
        upstream = await open_upstream(client, "POST", lease.base_url + "/v1/completions", content=request)
        body = RelayBody(upstream, on_error=lambda reason: b"", on_done=lease.release)
        with trio.move_on_after(0.2):
            async with body:
                async for _ in body:
                    pass
        assert upstream.response.closed and client.connections == 0
