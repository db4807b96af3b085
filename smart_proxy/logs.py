"""Logging: text for a terminal or JSON lines for a collector, each line with its request id.

Theory of operation: the edge middleware puts the id of the request being
served in :data:`request_id` (a context variable, so every task the request
spawns sees it). :class:`RequestIdFilter`, installed on the one handler that
:func:`setup_logging` makes, copies it onto each record, so any logger (the
pool's, llama-server's output at debug, Hypercorn's) names the request it
worked for without passing ids around. llama-server output arrives through
:mod:`smart_proxy.process` at debug level as ``[MODEL] line``.

Every request writes an access line at info, the level users run, so a line is
kept cheap: :func:`emit` skips the stdlib's search for the caller's file and
line (no format here shows it), :func:`setup_logging` turns off the thread and
process names a record would otherwise look up (documented switches of the
logging module; no format here shows them either), and both formatters make the
text of the time once a second, not once a line. Each line is written to the
stream as it is logged (a line-buffered ``stderr``), so a line logged before the
process ends is never lost in a buffer.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time
from collections.abc import Callable
from typing import TextIO

__all__ = ["JsonFormatter", "RequestIdFilter", "TextFormatter", "emit", "request_id", "setup_logging"]

#: The id of the request being served, or None outside a request.
request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)

_TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s%(request_tag)s: %(message)s"
_encode_json = json.JSONEncoder(ensure_ascii=False).encode


def emit(logger: logging.Logger, level: int, msg: str, *args: object) -> None:
    """``logger.log(level, msg, *args)``, without looking up the caller's file and line.

    For the lines logged on every request; the record's ``pathname`` is empty and its ``lineno`` 0.
    """
    if logger.isEnabledFor(level):
        logger.handle(logger.makeRecord(logger.name, level, "", 0, msg, args, None))


class RequestIdFilter(logging.Filter):
    """Give every record ``request_id`` (or None) and ``request_tag`` (`` [ID]`` or empty)."""

    def filter(self, record: logging.LogRecord) -> bool:
        rid = getattr(record, "request_id", None) or request_id.get()
        record.request_id = rid
        record.request_tag = f" [{rid}]" if rid else ""
        return True


class _SecondCache:
    """The text of a whole second, made again only when the second changes."""

    def __init__(self, convert: Callable[[float], time.struct_time], fmt: str) -> None:
        self._convert = convert
        self._fmt = fmt
        self._second = -1
        self._text = ""

    def __call__(self, created: float) -> str:
        second = int(created)
        if second != self._second:
            self._text = time.strftime(self._fmt, self._convert(second))
            self._second = second
        return self._text


class TextFormatter(logging.Formatter):
    """``TIME LEVEL LOGGER [REQUEST_ID]: message`` (the time in local time, to the millisecond)."""

    def __init__(self) -> None:
        super().__init__(_TEXT_FORMAT)
        self._seconds = _SecondCache(self.converter, self.default_time_format)

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


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, message, request_id, and exc if any."""

    def __init__(self) -> None:
        super().__init__()
        self._seconds = _SecondCache(time.gmtime, "%Y-%m-%dT%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        # what json.dumps(dict) writes, with each string encoded on its own: the encoder's
        # fast path for a lone string skips building an encoder for the object each line
        line = (
            f'{{"time": "{self._seconds(record.created)}.{int(record.msecs):03d}Z", '
            f'"level": {_encode_json(record.levelname.lower())}, "logger": {_encode_json(record.name)}, '
            f'"message": {_encode_json(record.getMessage())}'
        )
        rid = getattr(record, "request_id", None)
        if rid:
            line += f', "request_id": {_encode_json(str(rid))}'
        if record.exc_info:
            line += f', "exc": {_encode_json(self.formatException(record.exc_info))}'
        return line + "}"


def setup_logging(level: str = "info", fmt: str = "text", stream: TextIO | None = None) -> None:
    """Send every log record to ``stream`` (stderr) as ``text`` or ``json``, at ``level`` and above."""
    # No format here shows a thread or process name or id; leaving them out of each
    # record spares a getpid() system call and two lookups per line.
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # httpx logs every request it makes at info, including each /health poll while a model loads
    logging.getLogger("httpx").setLevel(max(logging.WARNING, root.level))
    logging.getLogger("httpcore").setLevel(max(logging.WARNING, root.level))
