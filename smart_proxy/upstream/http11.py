"""HTTP/1.1 for the client side of the hop to llama-server: a request's bytes, an answer's head and body framing.

No I/O here (like h11's readers): :func:`encode_request` makes a whole request
(Content-Length framed); :func:`parse_head` takes the bytes received so far and
returns the answer's head once it is complete; :func:`body_reader` picks the
body's framing from the request method and the head (RFC 9112 6.3): none for
HEAD, 1xx, 204 and 304; chunked transfer-coding (:class:`Chunked`) when
Transfer-Encoding says so; Content-Length; else until the connection closes. A
reader's ``feed`` turns received bytes into body bytes, all that one read
completes joined in one piece (h11 hands out one event per chunk), and says when
the body is ``done`` and what ``extra`` bytes followed it.

What is accepted is bounded (heads, trailers and chunk-size lines) and anything
not understood is a :class:`ParseError`; :mod:`smart_proxy.upstream.client`
turns it into its own ``ProtocolError``. It is what h11 accepts, a little
stricter: lines end in CRLF (a bare LF, obsolete line folding and HTTP versions
other than 1.0 and 1.1 are refused), the only transfer-coding is chunked, and a
101 is refused (this client never asks to switch protocols). The one leniency h11
lacks is the RFC's whitespace before a chunk extension. ``tests/test_http11.py``
runs the same answers, split into random reads and mutated, through this parser
and through h11 and expects the same result.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = [
    "MAX_CHUNK_LINE",
    "MAX_HEAD",
    "BodyReader",
    "Chunked",
    "Head",
    "ParseError",
    "body_reader",
    "encode_request",
    "parse_head",
]

#: Largest answer head (status line, headers) or trailer section accepted; httpcore allows 100 KiB.
MAX_HEAD = 100 * 1024
#: Largest chunk-size line (size and extensions) accepted.
MAX_CHUNK_LINE = 4096
_HEX = frozenset(b"0123456789abcdefABCDEF")
_DIGITS = frozenset(b"0123456789")
#: Bytes no header name (a token, RFC 9110 5.6.2) may hold.
_TOKEN_BAD = frozenset(b' \t"(),/:;<=>?@[\\]{}\x7f') | frozenset(range(32)) | frozenset(range(128, 256))
#: Bytes no header value or reason phrase may hold (h11 refuses the same: NUL and line-breaking whitespace).
_VALUE_BAD = frozenset(b"\0\n\r\v\f")
#: Bytes that may not appear in a request target or Host (a space, control bytes, anything not ASCII).
_URL_BAD = frozenset(range(33)) | frozenset(range(127, 256))
#: Methods whose request carries Content-Length even when the body is empty (as httpx and curl frame them).
_BODY_METHODS = frozenset({b"POST", b"PUT", b"PATCH"})
#: Request headers :func:`encode_request` writes itself.
_FRAMING = frozenset({b"host", b"content-length", b"transfer-encoding"})


class ParseError(Exception):
    """The bytes received are not an HTTP/1.x answer this parser accepts (or the answer was cut short)."""


def encode_request(
    method: bytes, target: bytes, host: bytes, headers: Iterable[tuple[bytes, bytes]], content: bytes
) -> bytes:
    """A whole request: its line, ``Host``, ``headers`` in order, ``Content-Length`` and ``content``.

    Content-Length goes with a body, and with an empty one for POST, PUT and PATCH.

    Raises:
        ValueError: a method, target or header that would break the head (not a token, a
            space or control byte where none may be), or a framing header (Host,
            Content-Length, Transfer-Encoding), which is this function's to write.
    """
    if not method or not _TOKEN_BAD.isdisjoint(method):
        raise ValueError(f"bad request method {method!r}")
    if not target or not _URL_BAD.isdisjoint(target):
        raise ValueError(f"bad request target {target!r}")
    if not host or not _URL_BAD.isdisjoint(host):
        raise ValueError(f"bad request host {host!r}")
    head = [method, b" ", target, b" HTTP/1.1\r\nHost: ", host, b"\r\n"]
    for name, value in headers:
        if not name or not _TOKEN_BAD.isdisjoint(name) or name.lower() in _FRAMING:
            raise ValueError(f"bad request header name {name!r}")
        if b"\r" in value or b"\n" in value or b"\0" in value:
            raise ValueError(f"bad value of request header {name!r}")
        head += (name, b": ", value, b"\r\n")
    if content or method in _BODY_METHODS:
        head.append(b"Content-Length: %d\r\n" % len(content))
    head += (b"\r\n", content)
    return b"".join(head)


class Head:
    """A parsed answer head: status, reason, raw headers, and what they say about framing."""

    __slots__ = ("status", "reason", "headers", "http10", "content_length", "chunked", "close")

    def __init__(self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]], http10: bool) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        self.http10 = http10
        self.content_length: int | None = None
        self.chunked = False
        #: The connection cannot carry another request after this answer.
        self.close = False
        close = keep_alive = False
        transfer_encoding = False
        length_value: bytes | None = None
        for name, value in headers:
            lower = name.lower()
            if lower == b"content-length":
                if not value or not _DIGITS.issuperset(value):
                    # a list of one repeated value ("5, 5", RFC 9110 8.6) stands for it; anything else is refused
                    values = {length.strip() for length in value.split(b",")}
                    if len(values) != 1:
                        raise ParseError("conflicting Content-Length headers")
                    (value,) = values
                    if not value or not _DIGITS.issuperset(value):
                        raise ParseError(f"bad Content-Length: {value!r}")
                if length_value is not None and length_value != value:
                    raise ParseError("conflicting Content-Length headers")
                length_value = value
            elif lower == b"transfer-encoding":
                # chunked is the only coding a client must know (RFC 9112 6.1); this one knows no other
                if transfer_encoding or value.lower() != b"chunked":
                    raise ParseError(f"unsupported Transfer-Encoding: {value[:40]!r}")
                transfer_encoding = self.chunked = True
            elif lower == b"connection":
                tokens = {token.strip().lower() for token in value.split(b",")}
                if b"close" in tokens:
                    close = True
                elif b"keep-alive" in tokens:
                    keep_alive = True
        self.close = close or (http10 and not keep_alive)
        if transfer_encoding:
            # RFC 9112 6.3: Transfer-Encoding overrides Content-Length, and such an answer
            # must not leave the connection reusable.
            if length_value is not None:
                self.close = True
        elif length_value is not None:
            self.content_length = int(length_value)


def parse_head(buffer: bytes | bytearray) -> tuple[Head, int] | None:
    """The answer head at the start of ``buffer`` and the offset where its body starts; None if incomplete.

    Raises:
        ParseError: not an HTTP/1.x answer head, or larger than :data:`MAX_HEAD`.
    """
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        if len(buffer) > MAX_HEAD:
            raise ParseError(f"answer head larger than {MAX_HEAD} bytes")
        if buffer and not b"HTTP/1."[: len(buffer)].startswith(bytes(buffer[:7])):
            raise ParseError(f"not an HTTP/1.x answer: {bytes(buffer[:40])!r}")
        return None
    if end > MAX_HEAD:
        raise ParseError(f"answer head larger than {MAX_HEAD} bytes")
    lines = bytes(buffer[:end]).split(b"\r\n")
    status_line = lines[0]
    version, _, rest = status_line.partition(b" ")
    code, _, reason = rest.partition(b" ")
    if (
        version not in (b"HTTP/1.1", b"HTTP/1.0")
        or len(code) != 3
        or not _DIGITS.issuperset(code)
        or code[0] == 48  # below 100
        or not _VALUE_BAD.isdisjoint(reason)
    ):
        raise ParseError(f"bad status line: {status_line[:80]!r}")
    if code == b"101":  # this client never asks to switch protocols (RFC 9110 15.2.2)
        raise ParseError("101 Switching Protocols, which was not asked for")
    return Head(int(code), reason, [_field(line) for line in lines[1:]], version == b"HTTP/1.0"), end + 4


def _field(line: bytes) -> tuple[bytes, bytes]:
    """A header (or trailer) line as ``(name, value)``, the value's surrounding spaces and tabs dropped.

    Raises:
        ParseError: not ``token ":" value``, or a value with a byte no field value may hold.
    """
    name, colon, value = line.partition(b":")
    if not colon or not name or not _TOKEN_BAD.isdisjoint(name):
        # also a line folded onto the previous one (obsolete, RFC 9112 5.2) or a bare LF
        raise ParseError(f"bad header line: {line[:80]!r}")
    value = value.strip(b" \t")
    if not _VALUE_BAD.isdisjoint(value):
        raise ParseError(f"bad header value: {line[:80]!r}")
    return name, value


# ---- body framing: each reader turns received bytes into body bytes (no I/O) ------------


class BodyReader:
    """How one answer's body is framed: ``feed`` received bytes, get body bytes."""

    #: The body is complete.
    done = False
    #: Bytes received after the end of the body (nothing should follow an answer).
    extra = b""
    #: The body's end is marked (or there is no body), not just the close of the connection.
    delimited = True

    def feed(self, data: bytes) -> bytes:
        raise NotImplementedError

    def eof(self) -> None:
        """The connection closed. Raises ParseError if the body was not complete."""
        if not self.done:
            raise ParseError("peer closed connection without sending complete message body")


class _Empty(BodyReader):
    done = True

    def feed(self, data: bytes) -> bytes:
        self.extra += data
        return b""


class _Fixed(BodyReader):
    def __init__(self, length: int) -> None:
        self._remaining = length
        self.done = length == 0

    def feed(self, data: bytes) -> bytes:
        remaining = self._remaining
        if len(data) < remaining:
            self._remaining = remaining - len(data)
            return data
        self._remaining = 0
        self.done = True
        if len(data) > remaining:
            self.extra = data[remaining:]
            return data[:remaining]
        return data


class _UntilClose(BodyReader):
    delimited = False

    def feed(self, data: bytes) -> bytes:
        return data

    def eof(self) -> None:
        self.done = True


_SIZE, _DATA, _DATA_END, _TRAILER, _DONE = range(5)


class Chunked(BodyReader):
    """Chunked transfer-coding (RFC 9112 7.1): chunk extensions ignored, trailers read and dropped.

    ``feed`` returns the data of every chunk (or part of one) the bytes complete, joined.
    """

    def __init__(self) -> None:
        self._state = _SIZE
        self._remaining = 0
        self._pending = b""  # an incomplete size line, data CRLF or trailer line
        self._trailers = 0

    def feed(self, data: bytes) -> bytes:
        if self._pending:
            data = self._pending + data
            self._pending = b""
        out: list[bytes] = []
        pos = 0
        size = len(data)
        state = self._state
        while pos < size:
            if state == _DATA:
                take = self._remaining
                if size - pos < take:
                    out.append(data[pos:] if pos else data)
                    self._remaining = take - (size - pos)
                    pos = size
                    break
                out.append(data[pos : pos + take])
                pos += take
                state = _DATA_END
            elif state == _DATA_END:
                if size - pos < 2:
                    if data[pos:] != b"\r":
                        raise ParseError("chunk data not followed by CRLF")
                    self._pending = data[pos:]
                    pos = size
                    break
                if data[pos] != 13 or data[pos + 1] != 10:
                    raise ParseError("chunk data not followed by CRLF")
                pos += 2
                state = _SIZE
            elif state == _SIZE:
                eol = data.find(b"\r\n", pos)
                if eol < 0:
                    if size - pos > MAX_CHUNK_LINE:
                        raise ParseError(f"chunk-size line longer than {MAX_CHUNK_LINE} bytes")
                    self._pending = data[pos:]
                    pos = size
                    break
                if eol - pos > MAX_CHUNK_LINE:
                    raise ParseError(f"chunk-size line longer than {MAX_CHUNK_LINE} bytes")
                digits, _, extension = data[pos:eol].partition(b";")  # extensions are ignored, but no line break
                digits = digits.rstrip(b" \t")
                if not digits or len(digits) > 16 or not _HEX.issuperset(digits) or b"\n" in extension:
                    raise ParseError(f"bad chunk size: {data[pos:eol][:40]!r}")
                pos = eol + 2
                self._remaining = int(digits, 16)
                state = _DATA if self._remaining else _TRAILER
            elif state == _TRAILER:
                eol = data.find(b"\r\n", pos)
                if eol < 0:
                    if self._trailers + size - pos > MAX_HEAD:
                        raise ParseError(f"trailers larger than {MAX_HEAD} bytes")
                    self._pending = data[pos:]
                    pos = size
                    break
                if eol == pos:
                    pos += 2
                    state = _DONE
                    self.done = True
                    continue
                self._trailers += eol + 2 - pos
                if self._trailers > MAX_HEAD:
                    raise ParseError(f"trailers larger than {MAX_HEAD} bytes")
                _field(data[pos:eol])  # checked like a header line, then dropped
                pos = eol + 2
            else:  # _DONE
                self.extra += data[pos:]
                pos = size
        self._state = state
        if not out:
            return b""
        return out[0] if len(out) == 1 else b"".join(out)


def body_reader(method: bytes, head: Head) -> BodyReader:
    """How the body of this answer to ``method`` is framed (RFC 9112 6.3)."""
    if method == b"HEAD" or head.status in (204, 304) or head.status < 200:
        return _Empty()
    if head.chunked:
        return Chunked()
    if head.content_length is not None:
        return _Fixed(head.content_length)
    head.close = True
    return _UntilClose()
