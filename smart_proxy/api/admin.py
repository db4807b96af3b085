"""The proxy's own routes: health and what the pool holds, and the agents found at start-up."""

from __future__ import annotations

import json

import attrs
from quart import Blueprint, Response

from ..app import state

__all__ = ["blueprint"]

blueprint = Blueprint("admin", __name__)


@blueprint.get("/health")
async def health() -> Response:
    """200 while the proxy serves, with the pool's capacity and every server's state."""
    snapshot = state().pool.snapshot()
    body = {"status": "ok", "pool": attrs.asdict(snapshot)}
    return Response(json.dumps(body), content_type="application/json")


@blueprint.get("/plugins")
async def plugins() -> Response:
    """Every discovered agent: name, description, enabled, loaded, or the error that stopped it."""
    body = {"agents": state().agents.describe()}
    return Response(json.dumps(body), content_type="application/json")
