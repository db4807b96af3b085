"""http1.py: a request of the common kind is read as h11 reads it, anything else is left to h11,
and an answer's head and framing are h11's, byte for byte; then the protocol under Hypercorn."""

from __future__ import annotations

import os

import h11
import hypercorn.config
import hypercorn.trio
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from smart_proxy.http1 import FALLBACK, RequestHead, parse_head, response_head
from smart_proxy.server import adapt_hypercorn

#: Examples per differential test; SMART_PROXY_FUZZ_EXAMPLES searches longer.
_EXAMPLES = int(os.environ.get("SMART_PROXY_FUZZ_EXAMPLES", "400"))
_LIMIT = 16 * 1024
_CHAT = (
    b"POST /v1/chat/completions?x=1 HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nContent-Type: application/json\r\n"
    b"Content-Length: 2\r\nX-Spaced:  a  b \t\r\n\r\n{}"
)


def _h11_events(data: bytes) -> list:
    """What h11, as a server, reads from ``data`` (its events up to NEED_DATA), or the error it raises."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=_LIMIT)
    conn.receive_data(data)
    events = []
    while True:
        try:
            got = conn.next_event()
        except h11.RemoteProtocolError as exc:
            events.append(exc)
            return events
        if got is h11.NEED_DATA or got is h11.PAUSED:
            return events
        events.append(got)


def test_a_request_of_the_common_kind_is_read() -> None:
    head = parse_head(_CHAT, _LIMIT)
    assert isinstance(head, RequestHead)
    assert (head.method, head.target, head.length, head.close, head.size) == (
        b"POST", b"/v1/chat/completions?x=1", 2, False, len(_CHAT) - 2
    )
    assert head.headers == [
        (b"host", b"127.0.0.1:8080"), (b"content-type", b"application/json"), (b"content-length", b"2"),
        (b"x-spaced", b"a  b"),
    ]


def test_a_head_split_anywhere_waits_for_its_end() -> None:
    end = _CHAT.index(b"\r\n\r\n") + 4
    for cut in range(1, end):
        assert parse_head(_CHAT[:cut], _LIMIT) is None, cut
    assert isinstance(parse_head(_CHAT[:end], _LIMIT), RequestHead)


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.0\r\nHost: a\r\n\r\n",  # HTTP/1.0
        b"GET http://a/ HTTP/1.1\r\nHost: a\r\n\r\n",  # absolute form
        b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n",
        b"HEAD / HTTP/1.1\r\nHost: a\r\n\r\n",
        b"head / HTTP/1.1\r\nHost: a\r\n\r\n",
        b"CONNECT a:443 HTTP/1.1\r\nHost: a\r\n\r\n",
        b"GET / HTTP/1.1\r\n\r\n",  # no Host
        b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1,1\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +1\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, Upgrade\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n",  # obs-fold
        b"GET / HTTP/1.1\r\nHost : a\r\n\r\n",
        b"GET / HTTP/1.1\nHost: a\n\n",  # bare line feeds
        b"GET / HTTP/1.1\r\nHost: a\n\r\n",
        b"\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n",
        b"\x16\x03\x01\x02\x00",  # a TLS hello
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",  # HTTP/2 with prior knowledge
        b"GET / HTTP/1.1\r\nHost: a\r\nX: \x00\r\n\r\n",
        b"G\xc3T / HTTP/1.1\r\nHost: a\r\n\r\n",
        b"GET /" + b"a" * _LIMIT,  # too long without its end
    ],
)
def test_a_request_of_another_kind_is_left_to_h11(data: bytes) -> None:
    assert parse_head(data, _LIMIT) is FALLBACK


def test_connection_close_and_keep_alive() -> None:
    for value, close in [(b"close", True), (b"Close", True), (b"keep-alive", False), (b"Keep-Alive", False)]:
        head = parse_head(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: %s\r\n\r\n" % value, _LIMIT)
        assert isinstance(head, RequestHead) and head.close is close


# ---- differential: requests ----------------------------------------------------------------

def _mostly(good: list, bad: st.SearchStrategy) -> st.SearchStrategy:
    """One of ``good`` nine times in ten, else from ``bad``."""
    return st.integers(0, 9).flatmap(lambda pick: bad if pick == 9 else st.sampled_from(good))


_methods = _mostly([b"GET", b"POST", b"PUT", b"DELETE", b"PATCH", b"get"],
                   st.sampled_from([b"HEAD", b"OPTIONS", b"CONNECT", b"PO ST", b"", b"G\xc3T"]))
_targets = _mostly(
    [b"/", b"/v1/chat/completions", b"/a?b=c&d", b"/%20x", b"/a/../b?x=%41#frag"],
    st.one_of(st.sampled_from([b"*", b"http://x/", b"/a b", b"", b"a"]), st.binary(max_size=12).map(lambda b: b"/" + b)),
)
_versions = _mostly([b"HTTP/1.1"], st.sampled_from([b"HTTP/1.0", b"HTTP/2.0", b"http/1.1", b"HTTP/1.1 ", b"HTTP/1.10"]))
_names = _mostly(
    [b"Content-Type", b"content-type", b"X-Request-Id", b"Authorization", b"Accept", b"Content-Length",
     b"Connection", b"User-Agent", b"x_under", b"X-1~!#$%&'*+.^`|"],
    st.one_of(
        st.sampled_from([b"Host", b"Transfer-Encoding", b"Expect", b"Upgrade", b"HTTP2-Settings", b"Bad Name", b"",
                         b"X:", b"X\x00"]),
        st.binary(min_size=1, max_size=8),
    ),
)
_values = _mostly(
    [b"application/json", b"0", b"12", b"007", b"close", b"keep-alive", b"Keep-Alive", b"a  b", b"caf\xc3\xa9",
     b"127.0.0.1:8080", b"Bearer x.y.z", b"", b"\x7f\x01"],
    st.one_of(
        st.sampled_from([b"1,1", b"-1", b" 5 ", b"99999999999999999999999", b"Keep-Alive, close", b"chunked",
                         b"100-continue", b"websocket", b"\tx\t", b"a\x00b", b"a\rb", b"a\nb", b"\x0bx"]),
        st.binary(max_size=10),
    ),
)
_separators = _mostly([b": ", b":"], st.sampled_from([b":  ", b" : ", b":\t", b"::"]))


@st.composite
def _requests(draw: st.DrawFn) -> bytes:
    eol = draw(_mostly([b"\r\n"], st.just(b"\n")))
    line = draw(_methods) + b" " + draw(_targets) + b" " + draw(_versions)
    fields = draw(st.lists(st.tuples(_names, _separators, _values), max_size=6))
    if draw(_mostly([True], st.just(False))):
        fields.insert(draw(st.integers(0, len(fields))), (b"Host", b": ", b"a"))
    head = eol.join([line, *(n + sep + v for n, sep, v in fields)]) + eol + draw(_mostly([eol], st.just(b"\n")))
    data = draw(_mostly([b""], st.just(b"\r\n"))) + head + draw(st.binary(max_size=8))
    cut = draw(_mostly([None], st.integers(1, len(data))))
    return data[:cut]


@settings(max_examples=_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_requests())
def test_a_request_read_here_is_read_the_same_by_h11(data: bytes) -> None:
    if not data:
        return
    head = parse_head(data, _LIMIT)
    if head is FALLBACK:
        event("left to h11")
        return
    events = _h11_events(data)
    if head is None:
        event("needs more")
        assert events == [], events  # h11 too waits for more, without an error
        return
    event("read here")
    assert isinstance(head, RequestHead)
    request = events[0]
    assert isinstance(request, h11.Request), events
    assert (request.method, request.target, request.http_version) == (head.method, head.target, b"1.1")
    assert list(request.headers) == head.headers
    # the same body: h11's next events, given the head, the body and a request after it
    body = bytes(range(head.length % 256)) * (head.length // 256 + 1)
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=_LIMIT)
    after = b"" if head.close else b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"
    conn.receive_data(data[: head.size] + body[: head.length] + after)
    assert isinstance(conn.next_event(), h11.Request)
    got = b""
    while True:
        step = conn.next_event()
        if isinstance(step, h11.Data):
            got += step.data
            continue
        assert isinstance(step, h11.EndOfMessage), step
        break
    assert got == body[: head.length]
    assert conn.next_event() is (h11.NEED_DATA if head.close else h11.PAUSED)  # the next request starts where the body ends
    response = conn.send(h11.Response(status_code=200, headers=[(b"content-length", b"0")]))
    conn.send(h11.EndOfMessage())
    assert (conn.our_state is h11.MUST_CLOSE) is head.close, response


# ---- differential: answers -----------------------------------------------------------------

_answer_names = _mostly(
    [b"content-type", b"content-length", b"Content-Length", b"transfer-encoding", b"connection", b"Connection",
     b"x-request-id", b"date", b"server", b"cache-control", b"x-accel-buffering"],
    st.one_of(st.sampled_from([b"host", b"bad name", b"", b"x\x00"]), st.binary(min_size=1, max_size=6)),
)
_answer_values = _mostly(
    [b"application/json", b"5", b"0", b"5, 5", b"12", b"chunked", b"Chunked", b"close", b"keep-alive",
     b"Keep-Alive, Close", b"upgrade", b"", b"a b", b"no-cache", b"caf\xc3\xa9"],
    st.one_of(st.sampled_from([b"5, 6", b"x", b"gzip", b"a\nb", b"a\x00", b" 5", b"-1"]), st.binary(max_size=8)),
)


@settings(max_examples=_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    status=st.sampled_from([200, 201, 204, 206, 304, 400, 404, 413, 500, 502, 503]),
    headers=st.lists(st.tuples(_answer_names, _answer_values), max_size=5, unique_by=lambda h: h[0].lower()),
    close=st.booleans(),
)
def test_an_answer_is_framed_as_h11_frames_it(status: int, headers: list, close: bool) -> None:
    conn = h11.Connection(h11.SERVER)
    asked = b"Connection: close\r\n" if close else b""
    conn.receive_data(b"POST / HTTP/1.1\r\nHost: a\r\n%sContent-Length: 0\r\n\r\n" % asked)
    assert isinstance(conn.next_event(), h11.Request)
    assert conn.next_event() == h11.EndOfMessage()
    try:
        expected = conn.send(h11.Response(status_code=status, headers=headers))
    except h11.LocalProtocolError:
        event("refused")
        with pytest.raises(h11.LocalProtocolError):
            response_head(status, headers, close)
        return
    head, length, closes = response_head(status, headers, close)
    assert head == expected
    if length is None:
        event("chunked")
        assert conn.send(h11.Data(data=b"hello")) == b"5\r\nhello\r\n"
    elif length > 1000:
        return
    else:
        event("content-length")
        assert conn.send(h11.Data(data=b"x" * length)) == b"x" * length
    assert conn.send(h11.EndOfMessage()) == (b"0\r\n\r\n" if length is None else b"")
    assert (conn.our_state is h11.MUST_CLOSE) is closes


# ---- under Hypercorn -----------------------------------------------------------------------

_seen: list[dict] = []  # what the app was told: per request, its scope's essentials and messages


async def _app(scope: dict, receive, send) -> None:  # type: ignore[no-untyped-def]
    if scope["type"] == "lifespan":
        while (message := await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    path = scope["path"]
    if path == "/early":
        await send({"type": "http.response.start", "status": 413, "headers": [(b"content-length", b"0")]})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        return
    record = {"method": scope["method"], "path": path, "query": scope["query_string"], "headers": scope["headers"],
              "version": scope["http_version"], "messages": []}
    _seen.append(record)
    body = b""
    if path != "/fail-before":
        while True:
            message = await receive()
            record["messages"].append(message)
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
    if path == "/fail-before":
        raise RuntimeError("the app fails before it answers")
    if path == "/stream":
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        for piece in (b"data: 1\n\n", b"data: 2\n\n"):
            await send({"type": "http.response.body", "body": piece, "more_body": True})
        if scope["query_string"] == b"fail":
            raise RuntimeError("the app fails in the middle of its answer")
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        return
    if path == "/wait":
        record["messages"].append(await receive())  # the client's leaving
        return
    answer = b"%s %s %d" % (scope["method"].encode(), path.encode(), len(body))
    headers = [(b"content-type", b"text/plain"), (b"content-length", b"%d" % len(answer))]
    if path == "/close":
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": answer[:3], "more_body": True})
    await send({"type": "http.response.body", "body": answer[3:], "more_body": False})


@pytest.fixture
async def served(nursery) -> tuple[str, int]:  # type: ignore[no-untyped-def]
    adapt_hypercorn()
    _seen.clear()
    config = hypercorn.config.Config()
    config.bind = ["127.0.0.1:0"]
    config.include_date_header = False
    config.include_server_header = False
    config.h11_max_incomplete_size = 4096
    binds = await nursery.start(hypercorn.trio.serve, _app, config)
    host, port = binds[0].removeprefix("http://").rsplit(":", 1)
    return host, int(port)


async def _exchange(address: tuple[str, int], *parts: bytes, close: bool = False) -> bytes:
    """Send ``parts`` on a new connection (a short pause between them); what comes back until EOF or 2 s of quiet."""
    stream = await trio.open_tcp_stream(*address)
    for part in parts:
        await stream.send_all(part)
        await trio.sleep(0.05)
    if close:
        await stream.send_eof()
    received = b""
    with trio.move_on_after(2):
        while chunk := await stream.receive_some():
            received += chunk
        received += b"<EOF>"
    await stream.aclose()
    return received


_GET = b"GET /a?q=1 HTTP/1.1\r\nHost: h\r\n\r\n"
_ANSWER_GET = b"HTTP/1.1 200 \r\ncontent-type: text/plain\r\ncontent-length: 8\r\n\r\nGET /a 0"


async def test_requests_of_the_common_kind_are_served_on_one_kept_alive_connection(served) -> None:
    post = b"POST /b HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello"
    received = await _exchange(served, _GET, post[:20], post[20:40], post[40:])
    post_answer = b"HTTP/1.1 200 \r\ncontent-type: text/plain\r\ncontent-length: 9\r\n\r\nPOST /b 5"
    assert received == _ANSWER_GET + post_answer
    first, second = _seen
    assert (first["method"], first["path"], first["query"], first["version"]) == ("GET", "/a", b"q=1", "1.1")
    assert first["headers"] == [(b"host", b"h")]
    assert first["messages"] == [{"type": "http.request", "body": b"", "more_body": False}]
    assert b"".join(m["body"] for m in second["messages"]) == b"hello" and not second["messages"][-1]["more_body"]


async def test_pipelined_requests_are_answered_in_order(served) -> None:
    post = b"POST /b HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\nhi"
    received = await _exchange(served, _GET + post + _GET)
    post_answer = b"HTTP/1.1 200 \r\ncontent-type: text/plain\r\ncontent-length: 9\r\n\r\nPOST /b 2"
    assert received == _ANSWER_GET + post_answer + _ANSWER_GET


async def test_a_stream_is_chunked_and_ends_with_its_last_chunk(served) -> None:
    received = await _exchange(served, b"GET /stream HTTP/1.1\r\nHost: h\r\n\r\n", close=True)
    assert received == (
        b"HTTP/1.1 200 \r\ncontent-type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"9\r\ndata: 1\n\n\r\n9\r\ndata: 2\n\n\r\n0\r\n\r\n<EOF>"
    )


async def test_a_stream_the_app_does_not_finish_is_cut_without_its_last_chunk(served) -> None:
    received = await _exchange(served, b"GET /stream?fail HTTP/1.1\r\nHost: h\r\n\r\n")
    assert received.endswith(b"9\r\ndata: 2\n\n\r\n<EOF>")  # no 0-length chunk: it cannot look finished


async def test_an_app_that_fails_before_answering_gets_a_500_and_the_connection_closes(served) -> None:
    received = await _exchange(served, b"GET /fail-before HTTP/1.1\r\nHost: h\r\n\r\n" + _GET)
    assert received == b"HTTP/1.1 500 \r\ncontent-length: 0\r\nconnection: close\r\n\r\n<EOF>"


async def test_connection_close_from_the_client_or_the_app_closes_after_the_answer(served) -> None:
    received = await _exchange(served, b"GET /a HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n" + _GET)
    assert received == b"HTTP/1.1 200 \r\ncontent-type: text/plain\r\ncontent-length: 8\r\nConnection: close\r\n\r\nGET /a 0<EOF>"
    received = await _exchange(served, b"GET /close HTTP/1.1\r\nHost: h\r\n\r\n" + _GET)
    assert received == (
        b"HTTP/1.1 200 \r\ncontent-type: text/plain\r\ncontent-length: 12\r\nconnection: close\r\n\r\nGET /close 0<EOF>"
    )


async def test_a_client_that_leaves_is_told_to_the_app(served) -> None:
    await _exchange(served, b"GET /wait HTTP/1.1\r\nHost: h\r\n\r\n", close=True)
    (record,) = _seen
    assert record["messages"][-1] == {"type": "http.disconnect"}


@pytest.mark.parametrize(
    ("parts", "expected"),
    [
        # HTTP/1.0: h11 answers, and closes
        ([b"GET /a HTTP/1.0\r\n\r\n"],
         b"HTTP/1.1 200 \r\ncontent-type: text/plain\r\ncontent-length: 8\r\nConnection: close\r\n\r\nGET /a 0<EOF>"),
        # a chunked body, then a request of the common kind on the same connection (h11 serves it too)
        ([b"POST /c HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n" + _GET],
         b"HTTP/1.1 200 \r\ncontent-type: text/plain\r\ncontent-length: 9\r\n\r\nPOST /c 3" + _ANSWER_GET),
        # 100-continue
        ([b"POST /c HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n", b"hi"],
         b"HTTP/1.1 100 \r\n\r\nHTTP/1.1 200 \r\ncontent-type: text/plain\r\ncontent-length: 9\r\n\r\nPOST /c 2"),
        # a bad request: h11's 400, after the answer to the good one before it
        ([_GET + b"GET / HTTP/1.1\r\nHost: h\r\nBad Header: x\r\n\r\n"],
         _ANSWER_GET + b"HTTP/1.1 400 \r\ncontent-length: 0\r\nconnection: close\r\n\r\n<EOF>"),
        # a head too long
        ([b"GET /" + b"a" * 5000], b"HTTP/1.1 431 \r\ncontent-length: 0\r\nconnection: close\r\n\r\n<EOF>"),
    ],
    ids=["http10", "chunked-body", "100-continue", "bad-request", "head-too-long"],
)
async def test_a_request_of_another_kind_is_served_by_h11(served, parts: list[bytes], expected: bytes) -> None:
    assert await _exchange(served, *parts) == expected


async def test_the_client_closing_in_the_middle_of_a_head_gets_h11s_400(served) -> None:
    assert await _exchange(served, b"GET /a HTTP/1.1\r\nHo", close=True) == (
        b"HTTP/1.1 400 \r\ncontent-length: 0\r\nconnection: close\r\n\r\n<EOF>"
    )


def test_the_hypercorn_code_http1_stands_in_for_is_unchanged() -> None:
    # Http1Protocol does what H11Protocol and HTTPStream do for a request of the common kind
    # (the scope, the messages to and from the app, recycling and closing the connection), and
    # ProtocolWrapper makes it through hypercorn.protocol.H11Protocol with H11Protocol's
    # arguments; checked against Hypercorn 0.18.0. If this fails, Hypercorn changed: re-read
    # hypercorn/protocol/__init__.py, h11.py and http_stream.py, bring smart_proxy.http1 in
    # line, then update the digests. (h11's own reading and framing are checked against the
    # installed h11 by the differential tests above.)
    import hashlib
    import inspect

    import hypercorn.protocol
    from hypercorn.protocol import ProtocolWrapper
    from hypercorn.protocol.h11 import H11Protocol
    from hypercorn.protocol.http_stream import HTTPStream
    from hypercorn.trio.worker_context import WorkerContext
    from hypercorn.utils import build_and_validate_headers

    from smart_proxy.http1 import Http1Protocol

    adapt_hypercorn()
    # TLS, and the settings Hypercorn serves its own way, go Hypercorn's way
    for ssl, setting, kind in [
        (False, {}, Http1Protocol), (True, {}, H11Protocol),
        (False, {"server_names": ["p"]}, H11Protocol), (False, {"h11_pass_raw_headers": True}, H11Protocol),
    ]:
        config, context = hypercorn.config.Config(), WorkerContext(None)
        for name, value in setting.items():
            setattr(config, name, value)
        made = hypercorn.protocol.H11Protocol(None, config, context, None, {}, ssl, None, None, None)
        assert type(made) is kind, (ssl, setting)
    digests = {
        name: hashlib.sha256(inspect.getsource(function).encode()).hexdigest()[:16]
        for name, function in [
            ("ProtocolWrapper.__init__", ProtocolWrapper.__init__),
            ("H11Protocol.__init__", H11Protocol.__init__),
            ("H11Protocol.handle", H11Protocol.handle),
            ("H11Protocol._handle_events", H11Protocol._handle_events),
            ("H11Protocol._create_stream", H11Protocol._create_stream),
            ("H11Protocol._maybe_recycle", H11Protocol._maybe_recycle),
            ("HTTPStream.handle", HTTPStream.handle),
            ("HTTPStream._send_closed", HTTPStream._send_closed),
            ("build_and_validate_headers", build_and_validate_headers),
        ]
    }
    assert digests == {
        "ProtocolWrapper.__init__": "df25e181b9e2e64d",
        "H11Protocol.__init__": "c7c989fd6a352626",
        "H11Protocol.handle": "3b56e067447488df",
        "H11Protocol._handle_events": "bd4a76b2837e8722",
        "H11Protocol._create_stream": "a2338a57ab343908",
        "H11Protocol._maybe_recycle": "3ac53f52bc4e65de",
        "HTTPStream.handle": "6ed2e34c5e708c6a",
        "HTTPStream._send_closed": "9aaf2e1ac611e51c",
        "build_and_validate_headers": "0d636273d7dc86a3",
    }


# ---- differential: whole connections, against Hypercorn's own protocol ---------------------


async def _echo(scope: dict, receive, send) -> None:  # type: ignore[no-untyped-def]
    """Answers with what it was told: its scope's essentials and body; chunked for ``/s``, a 500 for ``/x``."""
    body = b""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    if scope["path"] == "/x":
        raise RuntimeError("no answer")
    told = repr((scope["method"], scope["path"], scope["raw_path"], scope["query_string"], scope["headers"],
                 scope["http_version"], scope["scheme"], body)).encode()
    if scope["path"] == "/s":
        await send({"type": "http.response.start", "status": 200, "headers": [(b"x-told", b"yes")]})
        await send({"type": "http.response.body", "body": told, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        return
    status = 204 if scope["path"] == "/n" else 200
    headers = [(b"content-type", b"text/plain"), (b"content-length", b"%d" % len(told))]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": told, "more_body": False})


async def _serve_bytes(kind: type, chunks: list[bytes], seen: list | None = None) -> tuple[bytes, bool]:
    """What a connection of protocol ``kind`` writes, given ``chunks`` and then the client's end; and whether it closed first."""
    from hypercorn.app_wrappers import ASGIWrapper
    from hypercorn.events import Closed as ClosedEvent
    from hypercorn.events import RawData as RawDataEvent
    from hypercorn.trio.task_group import TaskGroup
    from hypercorn.trio.worker_context import WorkerContext

    written: list[bytes] = []
    closed = []

    async def send(event: object) -> None:
        if isinstance(event, RawDataEvent):
            written.append(event.data)
        elif isinstance(event, ClosedEvent):
            closed.append(True)

    config = hypercorn.config.Config()
    config.include_date_header = config.include_server_header = False
    config.h11_max_incomplete_size = 2048
    config.accesslog = None
    async with TaskGroup() as group:
        app = ASGIWrapper(_echo)
        protocol = kind(app, config, WorkerContext(None), group, {}, False, ("10.0.0.1", 5), ("10.0.0.2", 80), send)
        for chunk in chunks:
            if closed:
                break
            await protocol.handle(RawDataEvent(data=chunk))
            await trio.testing.wait_all_tasks_blocked()
        if not closed:
            await protocol.handle(RawDataEvent(data=b""))
            await protocol.handle(ClosedEvent())
        await trio.testing.wait_all_tasks_blocked()
        group._nursery.cancel_scope.cancel()
    if seen is not None:
        seen.append(protocol)
    return b"".join(written), bool(closed)


_paths = st.sampled_from([b"/", b"/a", b"/s", b"/n", b"/x", b"/q?x=1&y", b"/%7Euser"])


@st.composite
def _connections(draw: st.DrawFn) -> list[bytes]:
    """Requests on one connection, mostly of the common kind, some not, cut into reads anywhere but in a body's end."""
    requests = []
    for index in range(draw(st.integers(1, 4))):
        method = draw(st.sampled_from([b"GET", b"POST", b"PUT", b"HEAD", b"OPTIONS", b"DELETE", b"head", b"post"]))
        body = draw(st.binary(max_size=20)) if method in (b"POST", b"PUT", b"post") else b""
        fields = [b"Host: h"] if draw(_mostly([True], st.just(False))) else []
        fields += draw(st.lists(_mostly([b"Accept: */*", b"X-A:  b ", b"Connection: keep-alive", b"User-Agent: t/1"],
                                        st.sampled_from([b"Expect: 100-continue", b"Bad Name: x", b"X: \x00",
                                                         b"Connection: upgrade", b" folded"])), max_size=3))
        version = draw(_mostly([b"HTTP/1.1"], st.sampled_from([b"HTTP/1.0", b"HTTP/2.0"])))
        chunked = body and draw(_mostly([False], st.just(True)))
        if chunked:
            fields.append(b"Transfer-Encoding: chunked")
            body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body) if body else b"0\r\n\r\n"
        elif body or draw(st.booleans()):
            fields.append(b"Content-Length: %d" % len(body))
        last = index == 3 or draw(st.integers(0, 4)) == 0
        if last and draw(st.booleans()):
            fields.append(b"Connection: close")
        requests.append(b"%s %s %s\r\n%s\r\n%s" % (method, draw(_paths), version, b"".join(f + b"\r\n" for f in fields), body))
        if last:
            break
    data = b"".join(requests)
    cuts = sorted(draw(st.sets(st.integers(1, max(1, len(data) - 1)), max_size=4)))
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True) if data[a:b]]


@settings(max_examples=_EXAMPLES // 2, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_connections())
async def test_a_connection_is_served_as_hypercorns_own_protocol_serves_it(chunks: list[bytes]) -> None:
    from hypercorn.protocol.h11 import H11Protocol

    from smart_proxy.http1 import Http1Protocol

    adapt_hypercorn()
    seen: list = []
    ours = await _serve_bytes(Http1Protocol, chunks, seen)
    theirs = await _serve_bytes(H11Protocol, chunks)
    event("closed by the server" if theirs[1] else "closed by the client")
    event("handed over to h11" if seen[0]._h11 is not None else "served here throughout")
    event("answered" if b"HTTP/1.1 200" in theirs[0] else "not answered")
    assert ours == theirs


async def test_an_answer_before_the_body_is_in_closes_the_connection(served) -> None:
    # the app answers at once, without reading the body, as the edge answers a 413
    received = await _exchange(served, b"POST /early HTTP/1.1\r\nHost: h\r\nContent-Length: 100000\r\n\r\nxxxxxxxxxx")
    assert received == b"HTTP/1.1 413 \r\ncontent-length: 0\r\n\r\n<EOF>"
