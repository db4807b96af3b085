"""The proxy's own routes: the probes, the detailed health view, the metrics, and the agents.

``/health`` is liveness: 200 whenever the process serves, from the in-memory
view of the pool (no upstream call). ``/health/ready`` is readiness: 200 only
while the proxy takes new requests, 503 while starting or draining. Both are
public; ``/metrics`` is Prometheus text and needs a key when keys are set.
``/plugins`` lists the agents found at start-up.

Public means anyone may probe, so ``/health`` tells anyone only the status, the
phase and the pool's counts. Its detail (every server's port, pid and state, each
model's last error, which may quote llama-server's output and file paths,
downloads, Ollama upstreams) goes to whoever may use the API anyway: with API
keys configured, a request carrying a valid one; without keys, a client on the
loopback interface that came straight, not through a reverse proxy (no
``Forwarded``, ``X-Forwarded-For`` or ``X-Real-IP`` header), since a proxy in
front would make every client look local.
"""

from __future__ import annotations

import ipaddress
import json

import attrs
from quart import Blueprint, Response, request

from ..app import ProxyState, state
from ..upstream import ollama_server as ollama_backend
from ..errors import Unauthorized

__all__ = ["blueprint"]

blueprint = Blueprint("admin", __name__)


def _json(body: object, status: int = 200) -> Response:
    return Response(json.dumps(body), status=status, content_type="application/json")


@blueprint.get("/health")
async def health() -> Response:
    """200 while the proxy serves, with its phase and the pool's counts; the detail for those allowed it.

    The detail (see the module docstring): every server's state, each model's history,
    downloads, and the Ollama upstreams as the background monitor last saw them (no
    upstream call here). One upstream down makes the status ``degraded`` for everyone;
    the HTTP code stays 200.
    """
    proxy = state()
    snapshot = proxy.pool.snapshot()
    upstreams = proxy.upstreams.report
    degraded = any(upstream["status"] != "ok" for upstream in upstreams)
    body = {"status": "degraded" if degraded else "ok", "phase": proxy.lifecycle.phase.value}
    if not _may_see_detail(proxy):
        loaded = sum(server.state == "ready" for server in snapshot.servers)
        body["pool"] = {"capacity": snapshot.capacity, "queued": snapshot.queued, "loaded": loaded}
        return _json(body)
    body["pool"] = attrs.asdict(snapshot)
    if upstreams:
        body["upstreams"] = upstreams
    return _json(body)


_FORWARDING = ("forwarded", "x-forwarded-for", "x-real-ip")


def _may_see_detail(proxy: ProxyState) -> bool:
    """A valid API key when keys are configured; else a loopback client that came straight."""
    if proxy.api_keys.required:
        try:
            proxy.api_keys.check(request.headers.get("authorization"), request.headers.get("x-api-key"))
        except Unauthorized:
            return False
        return True
    if any(name in request.headers for name in _FORWARDING):
        return False
    client = request.scope.get("client")  # the socket's peer, never a header
    try:
        address = ipaddress.ip_address(client[0] if client else "")
    except ValueError:  # no address (a Unix socket) or not an IP
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


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
