"""http11.py: answer heads (split anywhere, malformed, oversized), what they say about the
connection, body framing, and chunked bodies split at every byte boundary."""

from __future__ import annotations

import pytest

from smart_proxy.upstream.http11 import MAX_CHUNK_LINE, MAX_HEAD, Chunked, ParseError, body_reader, encode_request, parse_head

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
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", True),
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
