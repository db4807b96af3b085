"""Parsing an HTTP/1.1 answer as a client receives it: the head, then the body's framing.

No I/O here (like h11): :func:`parse_head` takes the bytes received so far and
returns the head once it is complete; :func:`body_reader` picks the body's framing
from the request method and the head (RFC 9112 6.3): none for HEAD, 1xx, 204 and
304; chunked transfer-coding (:class:`Chunked`) when Transfer-Encoding ends in
chunked; Content-Length; else until the connection closes. A reader's ``feed``
turns received bytes into body bytes, all that one read completes joined in one
piece (h11 hands out one event per chunk), and says when the body is ``done``
and what ``extra`` bytes followed it.

What is accepted is bounded (heads, trailers and chunk-size lines) and anything
not understood is an ``httpx.RemoteProtocolError``, so callers map it like any
other httpx error. Lines end in CRLF; obsolete line folding and a bare LF in a
head are refused. :mod:`smart_proxy.upstream.client` uses this for the hop to
llama-server, where h11 cost ~0.4 ms of CPU per request more (see there).
"""

from __future__ import annotations

import httpx

__all__ = ["MAX_CHUNK_LINE", "MAX_HEAD", "BodyReader", "Chunked", "Head", "body_reader", "parse_head"]

#: Largest answer head (status line, headers) or trailer section accepted; httpcore allows 100 KiB.
MAX_HEAD = 100 * 1024
#: Largest chunk-size line (size and extensions) accepted.
MAX_CHUNK_LINE = 4096
_HEX = frozenset(b"0123456789abcdefABCDEF")
_DIGITS = frozenset(b"0123456789")
_TOKEN_BAD = frozenset(b' \t"(),/:;<=>?@[\\]{}\x7f') | frozenset(range(32))


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
        for name, value in headers:
            lower = name.lower()
            if lower == b"content-length":
                if not value or not _DIGITS.issuperset(value):
                    raise httpx.RemoteProtocolError(f"bad Content-Length: {value!r}")
                length = int(value)
                if self.content_length is not None and self.content_length != length:
                    raise httpx.RemoteProtocolError("conflicting Content-Length headers")
                self.content_length = length
            elif lower == b"transfer-encoding":
                transfer_encoding = True
                self.chunked = value.rsplit(b",", 1)[-1].strip().lower() == b"chunked"
            elif lower == b"connection":
                tokens = {token.strip().lower() for token in value.split(b",")}
                if b"close" in tokens:
                    close = True
                elif b"keep-alive" in tokens:
                    keep_alive = True
        self.close = close or (http10 and not keep_alive)
        if transfer_encoding:
            # RFC 9112 6.3: Transfer-Encoding overrides Content-Length, and such an answer
            # (or one whose last coding is not chunked) must not leave the connection reusable.
            if self.content_length is not None or not self.chunked:
                self.close = True
            self.content_length = None


def parse_head(buffer: bytes | bytearray) -> tuple[Head, int] | None:
    """The answer head at the start of ``buffer`` and the offset where its body starts; None if incomplete.

    Raises:
        httpx.RemoteProtocolError: not an HTTP/1.x answer head, or larger than :data:`MAX_HEAD`.
    """
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        if len(buffer) > MAX_HEAD:
            raise httpx.RemoteProtocolError(f"answer head larger than {MAX_HEAD} bytes")
        if buffer and not b"HTTP/1."[: len(buffer)].startswith(bytes(buffer[:7])):
            raise httpx.RemoteProtocolError(f"not an HTTP/1.x answer: {bytes(buffer[:40])!r}")
        return None
    if end > MAX_HEAD:
        raise httpx.RemoteProtocolError(f"answer head larger than {MAX_HEAD} bytes")
    lines = bytes(buffer[:end]).split(b"\r\n")
    status_line = lines[0]
    version, _, rest = status_line.partition(b" ")
    code, _, reason = rest.partition(b" ")
    if version not in (b"HTTP/1.1", b"HTTP/1.0") or len(code) != 3 or not _DIGITS.issuperset(code):
        raise httpx.RemoteProtocolError(f"bad status line: {status_line[:80]!r}")
    headers = []
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not name or not _TOKEN_BAD.isdisjoint(name):
            # also a line folded onto the previous one (obsolete, RFC 9112 5.2) or a bare LF
            raise httpx.RemoteProtocolError(f"bad header line: {line[:80]!r}")
        value = value.strip(b" \t")
        if b"\r" in value or b"\n" in value or b"\0" in value:
            raise httpx.RemoteProtocolError(f"bad header value: {line[:80]!r}")
        headers.append((name, value))
    return Head(int(code), reason, headers, version == b"HTTP/1.0"), end + 4


# ---- body framing: each reader turns received bytes into body bytes (no I/O) ------------


class BodyReader:
    """How one answer's body is framed: ``feed`` received bytes, get body bytes."""

    #: The body is complete.
    done = False
    #: Bytes received after the end of the body (nothing should follow an answer).
    extra = b""

    def feed(self, data: bytes) -> bytes:
        raise NotImplementedError

    def eof(self) -> None:
        """The connection closed. Raises httpx.RemoteProtocolError if the body was not complete."""
        if not self.done:
            raise httpx.RemoteProtocolError("peer closed connection without sending complete message body")


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
                        raise httpx.RemoteProtocolError("chunk data not followed by CRLF")
                    self._pending = data[pos:]
                    pos = size
                    break
                if data[pos] != 13 or data[pos + 1] != 10:
                    raise httpx.RemoteProtocolError("chunk data not followed by CRLF")
                pos += 2
                state = _SIZE
            elif state == _SIZE:
                eol = data.find(b"\r\n", pos)
                if eol < 0:
                    if size - pos > MAX_CHUNK_LINE:
                        raise httpx.RemoteProtocolError(f"chunk-size line longer than {MAX_CHUNK_LINE} bytes")
                    self._pending = data[pos:]
                    pos = size
                    break
                if eol - pos > MAX_CHUNK_LINE:
                    raise httpx.RemoteProtocolError(f"chunk-size line longer than {MAX_CHUNK_LINE} bytes")
                digits = data[pos:eol].split(b";", 1)[0].rstrip(b" \t")
                if not digits or len(digits) > 16 or not _HEX.issuperset(digits):
                    raise httpx.RemoteProtocolError(f"bad chunk size: {data[pos:eol][:40]!r}")
                pos = eol + 2
                self._remaining = int(digits, 16)
                state = _DATA if self._remaining else _TRAILER
            elif state == _TRAILER:
                eol = data.find(b"\r\n", pos)
                if eol < 0:
                    if self._trailers + size - pos > MAX_HEAD:
                        raise httpx.RemoteProtocolError(f"trailers larger than {MAX_HEAD} bytes")
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
                    raise httpx.RemoteProtocolError(f"trailers larger than {MAX_HEAD} bytes")
                if b":" not in data[pos:eol]:
                    raise httpx.RemoteProtocolError(f"bad trailer line: {data[pos:eol][:80]!r}")
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
