"""http11.py: request bytes, answer heads (split anywhere, malformed, oversized), what they say
about the connection, body framing, chunked bodies split at every byte boundary; and the same
answers through h11, which must agree."""

from __future__ import annotations

import os
import re

import h11
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from smart_proxy.upstream.http11 import MAX_CHUNK_LINE, MAX_HEAD, Chunked, ParseError, body_reader, encode_request, parse_head

#: Examples per differential test; SMART_PROXY_FUZZ_EXAMPLES searches longer.
_EXAMPLES = int(os.environ.get("SMART_PROXY_FUZZ_EXAMPLES", "400"))
_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nX-Thing:  spaced value \t\r\nContent-Length: 5\r\n\r\n"


def test_a_head_is_parsed() -> None:
    head, start = parse_head(_HEAD + b"hello")
    assert (head.status, head.reason, head.content_length, head.chunked, head.close) == (200, b"OK", 5, False, False)
    assert head.headers == [(b"Content-Type", b"text/event-stream"), (b"X-Thing", b"spaced value"), (b"Content-Length", b"5")]
    assert start == len(_HEAD)


def test_a_head_split_anywhere_is_incomplete_until_its_end() -> None:
    for cut in range(len(_HEAD)):
        assert parse_head(_HEAD[:cut]) is None, cut
    assert parse_head(_HEAD) is not None


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/2 200 OK\r\n\r\n",
        b"HTTP/1.1 20 OK\r\n\r\n",
        b"HTTP/1.1 2x0 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nNo-Colon\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nSpace : before colon\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nA: b\r\n folded: line\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n: no name\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nA: bare\nlf\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        b"SSH-2.0-OpenSSH\r\n",
        b"HTTP/1.1 099 Low\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n\r\n",  # never asked for
        b"HTTP/1.1 200 O\x00K\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nA: form\x0cfeed\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nCaf\xc3\xa9: x\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1, 2\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",  # only chunked is known
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
    ],
)
def test_a_bad_head_is_an_error(head: bytes) -> None:
    with pytest.raises(ParseError):
        parse_head(head)


def test_an_oversized_head_is_an_error_even_before_it_ends() -> None:
    big = b"HTTP/1.1 200 OK\r\n" + b"X-Big: " + b"a" * MAX_HEAD
    with pytest.raises(ParseError, match="larger than"):
        parse_head(big)
    with pytest.raises(ParseError, match="larger than"):
        parse_head(big + b"\r\n\r\n")


def test_a_repeated_content_length_stands_for_itself() -> None:
    head, _ = parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\nContent-Length: 5\r\n\r\n")
    assert head.content_length == 5 and not head.close


@pytest.mark.parametrize(
    ("head", "close"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", False),
        (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n", True),
        (b"HTTP/1.1 200 OK\r\nConnection: Keep-Alive, Close\r\nContent-Length: 0\r\n\r\n", True),
        (b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n", True),
        (b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n", False),
        # Transfer-Encoding with Content-Length: chunked wins, and the connection is not reused
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 9\r\n\r\n", True),
    ],
)
def test_what_a_head_says_about_the_connection(head: bytes, close: bool) -> None:
    parsed, _ = parse_head(head)
    body_reader(b"GET", parsed)
    assert parsed.close is close


@pytest.mark.parametrize(
    ("method", "head", "framing"),
    [
        (b"HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n", "_Empty"),
        (b"GET", b"HTTP/1.1 204 No Content\r\n\r\n", "_Empty"),
        (b"GET", b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n", "_Empty"),
        (b"GET", b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n", "_Fixed"),
        (b"GET", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 10\r\n\r\n", "Chunked"),
        (b"GET", b"HTTP/1.1 200 OK\r\n\r\n", "_UntilClose"),
    ],
)
def test_body_framing(method: bytes, head: bytes, framing: str) -> None:
    parsed, _ = parse_head(head)
    assert type(body_reader(method, parsed)).__name__ == framing


_CHUNKED = (
    b"5\r\nhello\r\n"
    b"7;name=value;quoted=\"a;b\"\r\n, world\r\n"
    b"1A \t;ext\r\n" + b"z" * 26 + b"\r\n"
    b"0\r\nTrailer-One: 1\r\nTrailer-Two: 2\r\n\r\n"
)
_DECODED = b"hello, world" + b"z" * 26


def _decode(*pieces: bytes) -> tuple[bytes, Chunked]:
    reader = Chunked()
    out = b"".join(reader.feed(piece) for piece in pieces)
    return out, reader


def test_chunked_with_extensions_and_trailers() -> None:
    out, reader = _decode(_CHUNKED)
    assert out == _DECODED and reader.done and reader.extra == b""


def test_chunked_split_at_every_byte_boundary() -> None:
    for i in range(len(_CHUNKED) + 1):
        for j in range(i, len(_CHUNKED) + 1):
            out, reader = _decode(_CHUNKED[:i], _CHUNKED[i:j], _CHUNKED[j:])
            assert out == _DECODED and reader.done and reader.extra == b"", (i, j)


def test_chunked_one_byte_at_a_time_is_done_only_at_the_end() -> None:
    reader = Chunked()
    out = b""
    for k in range(len(_CHUNKED)):
        assert not reader.done, k
        out += reader.feed(_CHUNKED[k : k + 1])
    assert out == _DECODED and reader.done


def test_chunked_joins_the_chunks_of_one_read() -> None:
    events = [b"data: {\"n\": %d}\n\n" % n for n in range(100)]
    wire = b"".join(b"%x\r\n%s\r\n" % (len(e), e) for e in events) + b"0\r\n\r\n"
    reader = Chunked()
    assert reader.feed(wire) == b"".join(events) and reader.done


def test_bytes_after_the_last_chunk_are_kept_apart() -> None:
    out, reader = _decode(b"2\r\nok\r\n0\r\n\r\nHTTP/1.1 200")
    assert out == b"ok" and reader.done and reader.extra == b"HTTP/1.1 200"


@pytest.mark.parametrize(
    "wire",
    [
        b"x\r\n",  # not hex
        b"0x5\r\nhello\r\n",
        b"+5\r\nhello\r\n",
        b"\r\n",  # no size
        b"5\r\nhelloXY",  # data not followed by CRLF
        b"5\r\nhello\rX",
        b"11111111111111111\r\n",  # absurd size
        b"0\r\nno colon\r\n\r\n",  # bad trailer
        b"0\r\nBad Name: x\r\n\r\n",
        b"0;ext\n\r\n\r\n",  # a bare LF in an extension
    ],
)
def test_bad_chunked_framing_is_an_error(wire: bytes) -> None:
    with pytest.raises(ParseError):
        Chunked().feed(wire)


def test_chunk_lines_and_trailers_are_bounded() -> None:
    with pytest.raises(ParseError, match="longer than"):
        Chunked().feed(b"5;" + b"e" * MAX_CHUNK_LINE)
    reader = Chunked()
    reader.feed(b"0\r\n")
    with pytest.raises(ParseError, match="trailers larger"):
        for _ in range(MAX_HEAD // 1000 + 2):
            reader.feed(b"T: " + b"v" * 1000 + b"\r\n")


def test_a_body_cut_short_is_an_error_at_eof() -> None:
    reader = Chunked()
    reader.feed(b"5\r\nhel")
    with pytest.raises(ParseError, match="complete message body"):
        reader.eof()
    fixed = body_reader(b"GET", parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n")[0])
    assert fixed.feed(b"hel") == b"hel" and not fixed.done
    with pytest.raises(ParseError):
        fixed.eof()
    assert fixed.feed(b"loEXTRA") == b"lo" and fixed.done and fixed.extra == b"EXTRA"


# ---- requests ------------------------------------------------------------------------------


@settings(max_examples=_EXAMPLES, deadline=None, derandomize=True, database=None)
@given(
    method=st.sampled_from([b"GET", b"POST", b"HEAD", b"PUT", b"PATCH", b"DELETE"]),
    target=st.sampled_from([b"/", b"/v1/chat/completions", b"/x?y=1&z=%20", b"/completion"]),
    fields=st.lists(st.tuples(st.sampled_from([b"Content-Type", b"X-Two", b"accept"]), st.sampled_from([b"a", b"b c", b""])),
                    max_size=3),
    content=st.binary(max_size=50),
)  # fmt: skip
def test_h11_reads_a_request_as_it_was_meant(method, target, fields, content) -> None:
    wire = encode_request(method, target, b"127.0.0.1:8080", fields, content)
    server = h11.Connection(h11.SERVER)
    server.receive_data(wire)
    request, events = server.next_event(), []
    while type(event := server.next_event()) is h11.Data:
        events.append(bytes(event.data))
    assert type(request) is h11.Request and type(event) is h11.EndOfMessage
    assert (request.method, request.target, b"".join(events)) == (method, target, content)
    framing = [(b"content-length", b"%d" % len(content))] if content or method in (b"POST", b"PUT", b"PATCH") else []
    expected = [(b"host", b"127.0.0.1:8080"), *((name.lower(), value) for name, value in fields), *framing]
    assert list(request.headers) == expected
    assert server.next_event() is h11.NEED_DATA  # nothing after the request


@pytest.mark.parametrize(
    ("method", "target", "host", "fields"),
    [
        (b"GE T", b"/", b"h", []),
        (b"GET", b"/a b", b"h", []),
        (b"GET", b"/\r\nX: y", b"h", []),
        (b"GET", b"/", b"h\r\nX: y", []),
        (b"GET", b"/", b"h", [(b"X-Evil", b"a\r\nInjected: yes")]),
        (b"GET", b"/", b"h", [(b"Bad Name", b"x")]),
        (b"GET", b"/", b"h", [(b"", b"x")]),
        (b"POST", b"/", b"h", [(b"content-length", b"3")]),  # the framing is encode_request's own
        (b"POST", b"/", b"h", [(b"Transfer-Encoding", b"chunked")]),
        (b"GET", b"/", b"h", [(b"Host", b"elsewhere")]),
    ],
)
def test_a_request_that_would_break_the_head_is_refused(method, target, host, fields) -> None:
    with pytest.raises(ValueError):
        encode_request(method, target, host, fields, b"abc")


# ---- differential: the same answers through http11 and through h11 ---------------------------
#
# Each example is an answer (interim heads, a head, a body framed by Content-Length, chunked or
# the close), maybe with one byte replaced, inserted or deleted, or cut short, split into random
# network reads; both parsers must give the same status, reason, headers and body, or both refuse.
# Where they may differ on purpose, http11 is the stricter (except one RFC 9112 leniency):
#   - a bare LF ending a head or trailer line, obsolete line folding, an HTTP version other than
#     1.0 and 1.1: h11 accepts them, http11 refuses (_h11_alone_accepts);
#   - whitespace before a chunk extension's ";" (BWS, RFC 9112 7.1.1): http11 accepts it, h11
#     refuses; that example is compared with h11 on the same bytes without the whitespace.

_REFUSED = "refused"
_TCHAR = b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
_VCHAR = bytes(range(0x21, 0x7F)) + bytes(range(0x80, 0x100))
_SPECIAL = b"\r\n \t:;,0aZ\x00\x0b\xff\"="


def _bytes_of(alphabet: bytes, min_size: int, max_size: int) -> st.SearchStrategy[bytes]:
    return st.lists(st.sampled_from(alphabet), min_size=min_size, max_size=max_size).map(bytes)


_names = _bytes_of(_TCHAR, 1, 10).filter(lambda name: name.lower() not in (b"content-length", b"transfer-encoding"))
_values = st.tuples(
    st.sampled_from([b"", b" ", b"\t", b"  "]),
    st.lists(_bytes_of(_VCHAR, 1, 8), max_size=3).map(b" ".join),
    st.sampled_from([b"", b" ", b"\t "]),
).map(b"".join)
# a body with framing-like bytes in it, but no bare LF (a bare LF is one of the deliberate differences)
_BODY_PARTS = [b"a", b"xyz", b"\r\n", b"\r", b"\x00", b"\xff", b"0\r\n\r\n", b"data: 1\r\n\r\n", b";", b" "]
_bodies = st.lists(st.sampled_from(_BODY_PARTS), max_size=30).map(b"".join)


@st.composite
def _chunked(draw: st.DrawFn, body: bytes) -> bytes:
    cuts = sorted(set(draw(st.lists(st.integers(1, max(1, len(body) - 1)), max_size=4)))) if len(body) > 1 else []
    pieces = [body[i:j] for i, j in zip([0, *cuts], [*cuts, len(body)], strict=True) if body[i:j]]
    out = []
    for piece in [*pieces, b""]:
        size = b"%x" % len(piece)
        size = draw(st.sampled_from([size, size.upper(), b"0" + size, b"00" + size]))
        ext = draw(st.sampled_from([b"", b"", b";a", b";a=b", b';q="x;y"', b" ;bws", b"\t;bws=1"]))
        out.append(size + ext + draw(st.sampled_from([b"", b"", b" "])) + b"\r\n")
        if piece:
            out.append(piece + b"\r\n")
    trailers = draw(st.lists(st.tuples(_names, _values), max_size=2))
    out += [name + b":" + value + b"\r\n" for name, value in trailers]
    return b"".join(out) + b"\r\n"


@st.composite
def _answers(draw: st.DrawFn) -> tuple[bytes, bytes, list[int]]:
    """(method, the answer's bytes, where the reads cut them)."""
    method = draw(st.sampled_from([b"GET", b"POST", b"HEAD"]))
    version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.0"]))
    status = draw(st.sampled_from([200, 201, 204, 299, 304, 404, 500, 599]))
    reason = draw(st.sampled_from([b"OK", b"", b"Not Found", b"x\ty \x80"]))
    line = b"%s %d" % (version, status) + (b" " + reason if reason or draw(st.booleans()) else b"")
    framing = draw(st.sampled_from(["length", "chunked", "close"]))
    body = draw(_bodies)
    fields = draw(st.lists(st.tuples(_names, _values), max_size=4))
    if framing == "length":
        length = b"%d" % len(body)
        lists = [[length], [length], [length + b", " + length], [length, b" " + length], [length, b"0" + length], [length + b",1"]]  # noqa: E501
        for value in draw(st.sampled_from(lists)):
            name = draw(st.sampled_from([b"Content-Length", b"content-length"]))
            fields.insert(draw(st.integers(0, len(fields))), (name, value))
    elif framing == "chunked":
        codings = [[b"chunked"], [b"chunked"], [b"Chunked"], [b"gzip, chunked"], [b"chunked, chunked"], [b"gzip"], [b"chunked"] * 2]  # noqa: E501
        for value in draw(st.sampled_from(codings)):
            fields.insert(draw(st.integers(0, len(fields))), (b"Transfer-Encoding", value))
        if draw(st.booleans()):  # Transfer-Encoding wins over Content-Length
            fields.append((b"Content-Length", b"%d" % (len(body) + 3)))
    if draw(st.booleans()):
        fields.append((b"Connection", draw(st.sampled_from([b"close", b"keep-alive", b"Keep-Alive, Close"]))))
    head = line + b"\r\n" + b"".join(name + b":" + value + b"\r\n" for name, value in fields) + b"\r\n"
    interims = [b"", b"", b"HTTP/1.1 100 Continue\r\n\r\n", b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"]
    interim = draw(st.sampled_from(interims))
    if method == b"HEAD" or status in (204, 304):
        payload = b""
    elif framing == "chunked":
        payload = draw(_chunked(body))
    else:
        payload = body
    wire = interim + head + payload
    mutation = draw(st.sampled_from(["none", "none", "replace", "insert", "delete", "truncate"]))
    if mutation != "none":
        at = draw(st.integers(0, len(wire) - 1))
        byte = bytes([draw(st.one_of(st.sampled_from(_SPECIAL), st.integers(0, 255)))])
        wire = {
            "replace": wire[:at] + byte + wire[at + 1 :],
            "insert": wire[:at] + byte + wire[at:],
            "delete": wire[:at] + wire[at + 1 :],
            "truncate": wire[:at],
        }[mutation]
    cuts = sorted(set(draw(st.lists(st.integers(1, max(1, len(wire) - 1)), max_size=6))))
    return method, wire, cuts


def _reads(wire: bytes, cuts: list[int]) -> list[bytes]:
    return [wire[i:j] for i, j in zip([0, *cuts], [*cuts, len(wire)], strict=True) if wire[i:j]]


def _compared(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The headers to compare: h11 rewrites the framing ones (merges "5, 5", lowercases "Chunked");
    what they mean shows in the body, and the relay never passes them on."""
    return [(name, value) for name, value in headers if name not in (b"content-length", b"transfer-encoding")]


def _through_http11(method: bytes, reads: list[bytes]) -> object:
    """What smart_proxy.upstream.client makes of these reads, then the close of the connection."""
    buffer = b""
    head = reader = None
    body = []
    try:
        for data in reads:
            if reader is None:
                buffer += data
                while (parsed := parse_head(buffer)) is not None:
                    head, start = parsed
                    buffer = buffer[start:]
                    if head.status >= 200:
                        reader = body_reader(method, head)
                        body.append(reader.feed(buffer))
                        break
            elif not reader.done:
                body.append(reader.feed(data))
        if reader is None:
            return _REFUSED  # closed before a whole head
        if not reader.done:
            reader.eof()
    except ParseError:
        return _REFUSED
    assert head is not None
    return head.status, head.reason, _compared([(name.lower(), value) for name, value in head.headers]), b"".join(body)


def _through_h11(method: bytes, reads: list[bytes]) -> object:
    """What h11, as a client that sent ``method``, makes of the same reads and close."""
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method=method, target="/", headers=[("Host", "upstream")]))
    conn.send(h11.EndOfMessage())
    response = None
    body = []
    try:
        for data in [*reads, b""]:
            conn.receive_data(data)
            while (event := conn.next_event()) not in (h11.NEED_DATA, h11.PAUSED):
                if type(event) is h11.Response:
                    response = event
                elif type(event) is h11.Data:
                    body.append(bytes(event.data))
                elif type(event) is h11.EndOfMessage:
                    assert response is not None
                    return response.status_code, bytes(response.reason), _compared(list(response.headers)), b"".join(body)
                elif type(event) is h11.ConnectionClosed:
                    return _REFUSED
    except h11.RemoteProtocolError:
        return _REFUSED
    return _REFUSED


def _heads(wire: bytes) -> list[bytes]:
    """The heads at the start of ``wire`` as h11 delimits them (interim ones, then the final one)."""
    heads, pos = [], 0
    while (end := re.search(rb"\n\r?\n", wire[pos:])) is not None:
        heads.append(wire[pos : pos + end.end()])
        pos += end.end()
        if not re.match(rb"HTTP/\d\.\d 1\d\d", heads[-1]):
            break
    return heads


def _h11_alone_accepts(wire: bytes) -> bool:
    """Whether ``wire`` has what h11 accepts and http11 refuses on purpose (see above)."""
    heads = _heads(wire)
    rest = wire[sum(map(len, heads)) :]
    return any(
        re.search(rb"(?<!\r)\n", text[:-1] if text.endswith(b"\r\n\r\n") else text) is not None  # a bare LF
        or re.search(rb"\n[ \t]", text) is not None  # a folded line
        or not text.startswith((b"HTTP/1.1 ", b"HTTP/1.0 ", b"HTTP/1.1\r", b"HTTP/1.0\r"))
        for text in heads
    ) or re.search(rb"(?<!\r)\n|\n[ \t]", rest) is not None  # in the trailers (the bodies have no bare LF)


def _without_bws(wire: bytes) -> bytes:
    """``wire`` with the whitespace before chunk extensions taken out (the RFC's BWS, which h11 refuses)."""
    heads = _heads(wire)
    start = sum(map(len, heads))
    return wire[:start] + re.sub(rb"(^|\r\n)([0-9A-Fa-f]+)[ \t]+;", rb"\1\2;", wire[start:])


@settings(max_examples=_EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])  # fmt: skip
@given(_answers())
def test_http11_agrees_with_h11(answer: tuple[bytes, bytes, list[int]]) -> None:
    method, wire, cuts = answer
    reads = _reads(wire, cuts)
    ours, theirs = _through_http11(method, reads), _through_h11(method, reads)
    event(f"http11 {'refuses' if ours == _REFUSED else 'accepts'}, h11 {'refuses' if theirs == _REFUSED else 'accepts'}")
    if ours == theirs:
        return
    if ours == _REFUSED and _h11_alone_accepts(wire):
        return
    if theirs == _REFUSED and _without_bws(wire) != wire:
        theirs = _through_h11(method, _reads(_without_bws(wire), []))
    assert ours == theirs, (wire, cuts)


def test_the_differential_harness_sees_a_difference() -> None:
    """The harness itself: an answer the two treat differently on purpose shows as a difference."""
    folded = b"HTTP/1.1 200 OK\r\nA: b\r\n c\r\nContent-Length: 0\r\n\r\n"
    assert _through_http11(b"GET", [folded]) == _REFUSED
    assert _through_h11(b"GET", [folded]) == (200, b"OK", [(b"a", b"b c")], b"")
    assert _h11_alone_accepts(folded) and not _h11_alone_accepts(folded.replace(b"\r\n c", b""))
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3 ;x\r\nabc\r\n0\r\n\r\n"
    assert _through_h11(b"GET", [chunked]) == _REFUSED
    assert _through_http11(b"GET", [chunked])[3] == _through_h11(b"GET", [_without_bws(chunked)])[3] == b"abc"
