"""Ollama's API over the pool (the Ollama-dialect issue builds the routes)."""

from __future__ import annotations

import json

from quart import Blueprint, Response

from ..errors import ProxyError

__all__ = ["blueprint", "error_response"]

blueprint = Blueprint("ollama", __name__)


def error_response(exc: ProxyError) -> Response:
    return Response(json.dumps({"error": exc.message}), status=exc.status, content_type="application/json")
