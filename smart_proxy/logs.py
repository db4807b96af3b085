"""Logging: text for a terminal or JSON lines for a collector, each line with its request id.

Theory of operation: the edge middleware puts the id of the request being
served in :data:`request_id` (a context variable, so every task the request
spawns sees it). :class:`RequestIdFilter`, installed on the one handler that
:func:`setup_logging` makes, copies it onto each record, so any logger (the
pool's, llama-server's output at debug, Hypercorn's) names the request it
worked for without passing ids around. llama-server output arrives through
:mod:`smart_proxy.process` at debug level as ``[MODEL] line``.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time
from typing import TextIO

__all__ = ["JsonFormatter", "RequestIdFilter", "request_id", "setup_logging"]

#: The id of the request being served, or None outside a request.
request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)

_TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s%(request_tag)s: %(message)s"


class RequestIdFilter(logging.Filter):
    """Give every record ``request_id`` (or None) and ``request_tag`` (`` [ID]`` or empty)."""

    def filter(self, record: logging.LogRecord) -> bool:
        rid = getattr(record, "request_id", None) or request_id.get()
        record.request_id = rid
        record.request_tag = f" [{rid}]" if rid else ""
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, message, request_id, and exc if any."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if getattr(record, "request_id", None):
            entry["request_id"] = record.request_id
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def setup_logging(level: str = "info", fmt: str = "text", stream: TextIO | None = None) -> None:
    """Send every log record to ``stream`` (stderr) as ``text`` or ``json``, at ``level`` and above."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(_TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # httpx logs every request it makes at info, including each /health poll while a model loads
    logging.getLogger("httpx").setLevel(max(logging.WARNING, root.level))
    logging.getLogger("httpcore").setLevel(max(logging.WARNING, root.level))
