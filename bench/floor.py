#!/usr/bin/env python3
"""The floor: the cheapest reverse proxy one can write on Hypercorn + Trio.

``python bench/floor.py --port P --target http://127.0.0.1:U [--bare]``

smart-proxy's design card fixes Hypercorn (on Trio) as its HTTP server. This
program shows what that server costs by itself, so the benchmark can tell the
proxy's own overhead from the stack's: a raw ASGI callable (no Quart, no routing,
no JSON, no pool, no metrics, no logging) served by ``hypercorn.trio.serve`` with
the same settings smart-proxy uses, forwarding every request to one upstream over
hand-written keep-alive HTTP/1.1 (no httpx, no h11 on the upstream side) and
relaying each network read of the answer as one ASGI body message. It handles
only what the benchmark's fake upstream sends (Content-Length or chunked bodies)
and is not a proxy anyone should deploy; it is a lower bound on the CPU a proxy
built on this stack, as Hypercorn ships it, spends per request and per streamed
chunk. (smart-proxy changes how Hypercorn serves HTTP/1, see
``smart_proxy.server.adapt_hypercorn``; the floor runs Hypercorn unchanged.)

Theory of operation: each request takes an idle upstream connection (LIFO) or
opens one, writes the request head and body in one ``send_all``, reads the
answer head, then relays the body as it arrives, de-chunking a chunked answer.
A connection whose answer was read to the end goes back to the idle list;
anything else (the client left, a parse surprise) closes it. An idle connection
is reused for at most 4 s and only if the upstream has not closed it (the fake
upstream closes idle ones after 5 s, like llama-server).

``--bare`` drops Hypercorn too: the same relay behind a hand-written HTTP/1.1
server on ``trio.serve_tcp`` (keep-alive, Content-Length request bodies only,
answers framed chunked by hand, no h11). That is outside the design card; the
benchmark runs it to tell what Hypercorn costs from what Trio itself costs.
"""

from __future__ import annotations

import argparse
import select
from urllib.parse import urlsplit

import trio
from hypercorn.config import Config
from hypercorn.trio import serve


class Upstream:
    """Keep-alive connections to one host:port, and one exchange at a time on each."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.idle: list[tuple[trio.SocketStream, bytearray, float]] = []

    async def exchange(self, head: bytes, body: bytes, send) -> None:
        stream = None
        while self.idle:
            stream, buffer, since = self.idle.pop()
            # the fake upstream, like llama-server, closes a connection idle for 5 s
            if trio.current_time() - since < _KEEPALIVE and not _readable(stream):
                break
            stream.socket.close()
            stream = None
        if stream is None:
            stream, buffer = await trio.open_tcp_stream(self.host, self.port), bytearray()
        reusable = False
        try:
            await stream.send_all(head + body)
            while (end := buffer.find(b"\r\n\r\n")) < 0:
                buffer += await _read(stream)
            lines = bytes(buffer[:end]).split(b"\r\n")
            del buffer[: end + 4]
            status = int(lines[0].split(b" ", 2)[1])
            headers, length, chunked = [], -1, False
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                name, value = name.strip().lower(), value.strip()
                if name == b"content-length":
                    length = int(value)
                elif name == b"transfer-encoding":
                    chunked = value.lower() == b"chunked"
                elif name not in (b"connection", b"keep-alive", b"date"):
                    headers.append((name, value))
            await send({"type": "http.response.start", "status": status, "headers": headers})
            if chunked:
                await _relay_chunked(stream, buffer, send)
            else:
                while len(buffer) < length:
                    buffer += await _read(stream)
                await send({"type": "http.response.body", "body": bytes(buffer[:length])})
                del buffer[:length]
            reusable = True
        finally:
            if reusable:
                self.idle.append((stream, buffer, trio.current_time()))
            else:
                with trio.CancelScope(shield=True):
                    await stream.aclose()


#: Seconds an idle upstream connection is reused for (smart-proxy's own choice, under the upstream's 5 s).
_KEEPALIVE = 4.0


def _readable(stream: trio.SocketStream) -> bool:
    """An idle connection with something to read has been closed by the upstream."""
    return bool(select.select([stream.socket.fileno()], [], [], 0)[0])


async def _read(stream: trio.SocketStream) -> bytes:
    data = await stream.receive_some(65536)
    if not data:
        raise ConnectionError("upstream closed the connection")
    return data


async def _relay_chunked(stream: trio.SocketStream, buffer: bytearray, send) -> None:
    """De-chunk as bytes arrive; whatever one read completes goes out as one body message."""
    out = bytearray()
    while True:
        while (eol := buffer.find(b"\r\n")) < 0:
            if out:
                await send({"type": "http.response.body", "body": bytes(out), "more_body": True})
                out.clear()
            buffer += await _read(stream)
        size = int(bytes(buffer[:eol]).split(b";")[0], 16)
        while len(buffer) < eol + 2 + size + 2:
            if out:
                await send({"type": "http.response.body", "body": bytes(out), "more_body": True})
                out.clear()
            buffer += await _read(stream)
        if size == 0:
            del buffer[: eol + 4]  # no trailers from the fake upstream
            await send({"type": "http.response.body", "body": bytes(out)})
            return
        out += buffer[eol + 2 : eol + 2 + size]
        del buffer[: eol + 2 + size + 2]


def make_app(upstream: Upstream):
    host = f"{upstream.host}:{upstream.port}".encode()

    async def app(scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        body = bytearray()
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        path = scope["raw_path"] + (b"?" + scope["query_string"] if scope["query_string"] else b"")
        head = b"%s %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % (
            scope["method"].encode(), path, host, len(body))
        await upstream.exchange(head, bytes(body), send)

    return app


async def serve_bare(port: int, upstream: Upstream) -> None:
    """The relay on ``trio.serve_tcp``: no Hypercorn, no h11 (see ``--bare``)."""
    host = f"{upstream.host}:{upstream.port}".encode()

    async def connection(client: trio.SocketStream) -> None:
        buffer = bytearray()
        try:
            while True:
                while (end := buffer.find(b"\r\n\r\n")) < 0:
                    data = await client.receive_some(65536)
                    if not data:
                        return
                    buffer += data
                lines = bytes(buffer[:end]).split(b"\r\n")
                del buffer[: end + 4]
                method, path, _ = lines[0].split(b" ", 2)
                length = 0
                for line in lines[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                while len(buffer) < length:
                    data = await client.receive_some(65536)
                    if not data:
                        return
                    buffer += data
                body = bytes(buffer[:length])
                del buffer[:length]
                head = b"%s %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % (
                    method, path, host, len(body))
                await upstream.exchange(head, body, _BareSend(client))
        except (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError):
            return

    await trio.serve_tcp(connection, port, host="127.0.0.1", backlog=4096)


class _BareSend:
    """ASGI ``send`` for the bare server: the head, then each body message as one chunk."""

    def __init__(self, client: trio.SocketStream) -> None:
        self.client = client

    async def __call__(self, message: dict) -> None:
        if message["type"] == "http.response.start":
            head = [b"HTTP/1.1 %d OK" % message["status"]]
            head += [b"%s: %s" % pair for pair in message["headers"]]
            head.append(b"Transfer-Encoding: chunked\r\n\r\n")
            await self.client.send_all(b"\r\n".join(head))
            return
        body = message.get("body", b"")
        data = b"%x\r\n%s\r\n" % (len(body), body) if body else b""
        if not message.get("more_body"):
            data += b"0\r\n\r\n"
        if data:
            await self.client.send_all(data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--target", required=True, help="the upstream, http://HOST:PORT")
    parser.add_argument("--bare", action="store_true", help="no Hypercorn: a hand-written server on trio.serve_tcp")
    args = parser.parse_args()
    target = urlsplit(args.target)
    if args.bare:
        trio.run(serve_bare, args.port, Upstream(target.hostname, target.port))
        return
    config = Config()
    # the settings smart-proxy's server.py gives Hypercorn
    config.bind = [f"127.0.0.1:{args.port}"]
    config.accesslog = None
    config.keep_alive_timeout = 75
    config.keep_alive_max_requests = 1_000_000_000
    config.backlog = 4096
    trio.run(serve, make_app(Upstream(target.hostname, target.port)), config)


if __name__ == "__main__":
    main()
