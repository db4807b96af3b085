"""The proxy's own routes: the probes, the detailed health view, the metrics, and the agents.

``/health`` is liveness: 200 whenever the process serves, with the in-memory
view of the pool (no upstream call). ``/health/ready`` is readiness: 200 only
while the proxy takes new requests, 503 while starting or draining. Both are
public; ``/metrics`` is Prometheus text and needs a key when keys are set.
``/plugins`` lists the agents found at start-up.
"""

from __future__ import annotations

import json

import attrs
from quart import Blueprint, Response

from ..app import state
from ..backends import ollama as ollama_backend

__all__ = ["blueprint"]

blueprint = Blueprint("admin", __name__)


def _json(body: object, status: int = 200) -> Response:
    return Response(json.dumps(body), status=status, content_type="application/json")


@blueprint.get("/health")
async def health() -> Response:
    """200 while the proxy serves, with its phase, the pool's capacity and every server's state.

    Ollama upstreams are listed as the background monitor last saw them (no upstream call
    here): one that is down makes the status ``degraded``; the HTTP code stays 200.
    """
    proxy = state()
    snapshot = proxy.pool.snapshot()
    body = {"status": "ok", "phase": proxy.lifecycle.phase.value, "pool": attrs.asdict(snapshot)}
    upstreams = proxy.upstreams.report
    if upstreams:
        body["upstreams"] = upstreams
        if any(upstream["status"] != "ok" for upstream in upstreams):
            body["status"] = "degraded"
    return _json(body)


@blueprint.get("/health/upstreams")
async def upstreams() -> Response:
    """Probe every Ollama upstream now (``/health`` shows the last background probe)."""
    proxy = state()
    return _json({"upstreams": await ollama_backend.health(proxy.http, proxy.catalog)})


@blueprint.get("/health/ready")
async def ready() -> Response:
    """200 when new requests are taken; 503 while starting or draining."""
    lifecycle = state().lifecycle
    if lifecycle.accepting:
        return _json({"status": "ready"})
    response = _json({"status": lifecycle.phase.value}, status=503)
    response.headers["Retry-After"] = "5"
    return response


@blueprint.get("/metrics")
async def metrics() -> Response:
    body, content_type = state().metrics.render()
    return Response(body, content_type=content_type)


@blueprint.get("/plugins")
async def plugins() -> Response:
    """Every discovered agent: name, description, enabled, loaded, or the error that stopped it."""
    return _json({"agents": state().agents.describe()})
