"""The proxy's own routes: health and what the pool holds."""

from __future__ import annotations

import json

import attrs
from quart import Blueprint, Response

from ..app import state
from ..backends import ollama as ollama_backend

__all__ = ["blueprint"]

blueprint = Blueprint("admin", __name__)


@blueprint.get("/health")
async def health() -> Response:
    """200 while the proxy serves, with the pool's capacity and every server's state.

    With Ollama upstreams, each is probed: one that is down makes the status ``degraded``.
    """
    proxy = state()
    snapshot = proxy.pool.snapshot()
    body = {"status": "ok", "pool": attrs.asdict(snapshot)}
    upstreams = await ollama_backend.health(proxy.http, proxy.catalog)
    if upstreams:
        body["upstreams"] = upstreams
        if any(upstream["status"] != "ok" for upstream in upstreams):
            body["status"] = "degraded"
    return Response(json.dumps(body), content_type="application/json")
