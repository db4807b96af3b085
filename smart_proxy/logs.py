"""Logging: text for a terminal or JSON lines for a collector, each line with its request id.

Theory of operation: the edge middleware puts the id of the request being
served in :data:`request_id` (a context variable, so every task the request
spawns sees it). :class:`RequestIdFilter`, installed on the one handler that
:func:`setup_logging` makes, copies it onto each record, so any logger (the
pool's, llama-server's output at debug, Hypercorn's) names the request it
worked for without passing ids around. llama-server output arrives through
:mod:`smart_proxy.process` at debug level as ``[MODEL] line``.

Every request writes an access line at info, the level users run, so a line is
kept cheap. :func:`emit` skips the stdlib's search for the caller's file and line
(no format here shows it) and, while the logging set-up is the one
:func:`setup_logging` made, writes the line the handler would write for the record
without making the record (:meth:`LineHandler.write_line`, with the formatter's
:meth:`LineFormatter.line`, which formats records too). :func:`setup_logging` turns
off the thread and process names a record would otherwise look up (documented
switches of the logging module; no format here shows them either), and both
formatters make the text of the time once a second, not once a line. Access lines
to a file or pipe go out in blocks, at most :data:`BLOCK_WAIT` late; to a terminal, as
they are logged; every other line at once. What is kept is written at exit
(``logging.shutdown`` flushes the handler), so a line logged before the process ends
is not lost in a block (a process killed outright loses what it kept, at most
:data:`BLOCK_WAIT` of access lines).
"""

from __future__ import annotations

import abc
import contextvars
import json
import logging
import sys
import time
from collections.abc import Callable
from typing import TextIO

import trio

__all__ = ["JsonFormatter", "LineFormatter", "LineHandler", "RequestIdFilter", "TextFormatter", "emit", "request_id",
           "setup_logging", "write_blocks"]

#: The id of the request being served, or None outside a request.
request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)

_TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s%(request_tag)s: %(message)s"
_encode_json = json.JSONEncoder(ensure_ascii=False).encode


def emit(logger: logging.Logger, level: int, msg: str, *args: object) -> None:
    """``logger.log(level, msg, *args)`` for the lines logged on every request, at less cost.

    The caller's file and line are not looked up (the record's ``pathname`` is empty and
    its ``lineno`` 0). While the logging set-up is the one :func:`setup_logging` made
    (:func:`_sole_handler`), the line is written as that handler would write the record,
    without making one (:meth:`LineHandler.write_line`); otherwise (another handler, a
    filter, a record factory: a plugin's or a test's) the record goes the stdlib's way.
    """
    if logger.isEnabledFor(level):
        handler = _sole_handler(logger, level)
        if handler is not None:
            handler.write_line(level, logger.name, msg % args if args else msg)
        else:
            logger.handle(logger.makeRecord(logger.name, level, "", 0, msg, args, None))


#: The handler :func:`setup_logging` installed.
_installed: LineHandler | None = None


def _sole_handler(logger: logging.Logger, level: int) -> LineHandler | None:
    """The handler :func:`setup_logging` installed, if a ``level`` record from ``logger`` would reach it alone, unchanged.

    That is what the stdlib's ``Logger.handle`` does with it: ``logger`` is not disabled
    and has no filter, the only handler on its way up (as far as ``propagate`` goes) is
    the installed one, at ``level`` or below, with its request-id filter only, and records are
    the stdlib's (no record factory adds to them).
    """
    handler = _installed
    if handler is None or logger.disabled or logger.filters:
        return None
    filters = handler.filters
    if handler.level > level or len(filters) != 1 or filters[0] is not handler.request_ids:
        return None
    if logging.getLogRecordFactory() is not logging.LogRecord:
        return None
    found = None
    node: logging.Logger | None = logger
    while node is not None:
        for other in node.handlers:
            if found is not None or other is not handler:
                return None
            found = handler
        node = node.parent if node.propagate else None
    return found


#: Lines :func:`emit` writes to a file or pipe go out in blocks of at most this many bytes. A
#: pipe takes a write of up to ``PIPE_BUF`` (4,096 bytes on Linux) whole, so the lines of two
#: workers sharing one ``stderr`` never mix within a line.
BLOCK_BYTES = 4096
#: How long (seconds) a line may wait in a block before :func:`write_blocks` writes it.
BLOCK_WAIT = 0.1


class LineHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A ``StreamHandler`` for a :class:`LineFormatter`, ids by a :class:`RequestIdFilter`, writing lines without records too.

    The stdlib's handler calls the stream's ``flush`` after every line; a line-buffered
    stream (``sys.stderr`` is, since Python 3.9) has already written the line by then, so
    for such a stream the call is skipped. Any other stream is flushed after each write.

    Lines from :meth:`write_line` (one a request) to a stream that is not a terminal (a
    file, a pipe to a collector) are kept and written in blocks, as the C library's
    stdio writes to a file: one write of up to :data:`BLOCK_BYTES` rather than one per
    line, at most :data:`BLOCK_WAIT` late (:func:`write_blocks`). Every other line (a
    warning, an error, a start-up line) is written at once, with the kept lines before
    it, and so are the kept lines when the handler is flushed (``logging.shutdown`` at
    exit). A terminal sees every line as it is logged.
    """

    def __init__(self, stream: TextIO, formatter: LineFormatter) -> None:  # noqa: D107
        super().__init__(stream)
        self.setFormatter(formatter)
        #: The :class:`RequestIdFilter` every record passes (:meth:`write_line` does its work itself).
        self.request_ids = RequestIdFilter()
        self.addFilter(self.request_ids)
        self._line = formatter.line
        self._flushes = not getattr(stream, "line_buffering", False)
        try:
            self._blocks = not stream.isatty()
        except (AttributeError, ValueError):
            self._blocks = True
        self._kept: list[str] = []
        self._kept_bytes = 0

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + "\n"
            self._write(self._take_kept())  # (a write of its own: a block stays whole on a pipe)
            self._write(line)
        except RecursionError:
            raise
        except Exception:  # noqa: BLE001  # as the stdlib's handler: report it on stderr, do not raise
            self.handleError(record)

    def write_line(self, level: int, name: str, message: str) -> None:
        """Write what :meth:`emit` writes for a record of ``name`` at ``level`` with ``message``, made now.

        For a record with no exception, from :func:`emit` (which checks that this is what
        the stdlib would do with the record); the request id is the current one, as
        :class:`RequestIdFilter` gives it. To a stream that is not a terminal, the line
        may be kept for a block (see the class docstring).
        """
        line = self._line(time.time(), logging.getLevelName(level), name, request_id.get(), message) + "\n"
        with self.lock:  # type: ignore[union-attr]  # (what acquire() takes)
            try:
                if not self._blocks:
                    self._write(line)
                    return
                size = len(line) if line.isascii() else len(line.encode())
                if self._kept_bytes + size > BLOCK_BYTES:
                    self._write(self._take_kept())
                self._kept.append(line)
                self._kept_bytes += size
            except RecursionError:
                raise
            except Exception:  # noqa: BLE001  # as emit: report it (with the record it stands for)
                self.handleError(logging.makeLogRecord({"name": name, "levelno": level, "msg": message}))

    def write_kept(self) -> None:
        """Write the lines kept for a block, if any."""
        with self.lock:  # type: ignore[union-attr]
            if self._kept:
                try:
                    self._write(self._take_kept())
                except Exception:  # noqa: BLE001  # as emit
                    self.handleError(logging.makeLogRecord({"msg": "(access lines)"}))

    def flush(self) -> None:
        self.write_kept()
        super().flush()

    def _take_kept(self) -> str:
        kept = "".join(self._kept)
        self._kept.clear()
        self._kept_bytes = 0
        return kept

    def _write(self, text: str) -> None:
        if text:
            self.stream.write(text)
            if self._flushes:
                self.stream.flush()


async def write_blocks(every: float = BLOCK_WAIT) -> None:
    """Write the lines :func:`setup_logging`'s handler keeps for a block every ``every`` seconds, and when cancelled.

    :func:`smart_proxy.server.serve` runs it beside Hypercorn.
    """
    while True:
        try:
            await trio.sleep(every)
        finally:
            if _installed is not None:
                _installed.write_kept()


class RequestIdFilter(logging.Filter):
    """Give every record ``request_id`` (or None) and ``request_tag`` (`` [ID]`` or empty)."""

    def filter(self, record: logging.LogRecord) -> bool:
        rid = getattr(record, "request_id", None) or request_id.get()
        record.request_id = rid
        record.request_tag = f" [{rid}]" if rid else ""
        return True


#: The milliseconds of a time as a line shows them, by their number (the stdlib's ``%03d``).
_MILLIS = tuple(f"{ms:03d}" for ms in range(1001))


class _SecondCache:
    """The text of a whole second, made again only when the second changes."""

    def __init__(self, convert: Callable[[float], time.struct_time], fmt: str, separator: str) -> None:
        self._convert = convert
        self._fmt = fmt
        self._separator = separator
        self._second = -1
        self._text = ""
        self._head = ""

    def text(self, created: float) -> str:
        """The second of ``created``, in the format given."""
        second = int(created)
        if second != self._second:
            self._renew(second)
        return self._text

    def stamp(self, created: float) -> str:
        """The second of ``created``, the separator and its milliseconds (as a record's ``msecs`` counts them)."""
        second = int(created)
        if second != self._second:
            self._renew(second)
        return self._head + _MILLIS[int((created - second) * 1000)]

    def _renew(self, second: int) -> None:
        self._text = time.strftime(self._fmt, self._convert(second))
        self._head = self._text + self._separator
        self._second = second


class LineFormatter(logging.Formatter, abc.ABC):
    """A formatter whose line, for a record without an exception, is :meth:`line` of the record's fields."""

    @abc.abstractmethod
    def line(self, created: float, levelname: str, name: str, rid: str | None, message: str) -> str:
        """The line of a record made at ``created`` with these fields and no exception."""


class TextFormatter(LineFormatter):
    """``TIME LEVEL LOGGER [REQUEST_ID]: message`` (the time in local time, to the millisecond)."""

    def __init__(self) -> None:
        super().__init__(_TEXT_FORMAT)
        seconds = _SecondCache(self.converter, self.default_time_format, ",")
        self._seconds, self._stamp = seconds.text, seconds.stamp

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        if datefmt:
            return super().formatTime(record, datefmt)
        return f"{self._seconds(record.created)},{int(record.msecs):03d}"

    def format(self, record: logging.LogRecord) -> str:
        if record.exc_info or record.exc_text or record.stack_info:
            return super().format(record)  # the stdlib's way of adding a traceback
        record.message = record.getMessage()
        record.asctime = self.formatTime(record)
        return f"{record.asctime} {record.levelname} {record.name}{record.request_tag}: {record.message}"

    def line(self, created: float, levelname: str, name: str, rid: str | None, message: str) -> str:
        if rid:
            return f"{self._stamp(created)} {levelname} {name} [{rid}]: {message}"
        return f"{self._stamp(created)} {levelname} {name}: {message}"


class JsonFormatter(LineFormatter):
    """One JSON object a line: time, level, logger, message, request_id, and exc if any."""

    def __init__(self) -> None:
        super().__init__()
        self._stamp = _SecondCache(time.gmtime, "%Y-%m-%dT%H:%M:%S", ".").stamp

    def format(self, record: logging.LogRecord) -> str:
        rid = getattr(record, "request_id", None)
        line = self.line(record.created, record.levelname, record.name, str(rid) if rid else None, record.getMessage())
        if record.exc_info:
            line = f'{line[:-1]}, "exc": {_encode_json(self.formatException(record.exc_info))}}}'
        return line

    def line(self, created: float, levelname: str, name: str, rid: str | None, message: str) -> str:
        # what json.dumps(dict) writes, with each string encoded on its own: the encoder's
        # fast path for a lone string skips building an encoder for the object each line
        line = (
            f'{{"time": "{self._stamp(created)}Z", '
            f'"level": {_encode_json(levelname.lower())}, "logger": {_encode_json(name)}, '
            f'"message": {_encode_json(message)}'
        )
        if rid:
            line += f', "request_id": {_encode_json(rid)}'
        return line + "}"


def setup_logging(level: str = "info", fmt: str = "text", stream: TextIO | None = None) -> None:
    """Send every log record to ``stream`` (stderr) as ``text`` or ``json``, at ``level`` and above."""
    # No format here shows a thread or process name or id; leaving them out of each
    # record spares a getpid() system call and two lookups per line.
    global _installed
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = LineHandler(stream or sys.stderr, JsonFormatter() if fmt == "json" else TextFormatter())
    _installed = handler
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # httpx logs every request it makes at info, including each /health poll while a model loads
    logging.getLogger("httpx").setLevel(max(logging.WARNING, root.level))
    logging.getLogger("httpcore").setLevel(max(logging.WARNING, root.level))
