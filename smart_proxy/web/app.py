"""The Quart-Trio app: every route that is not a model route, and the app the edge wraps.

:func:`create_app` takes the :class:`~smart_proxy.handlers.state.ProxyState` owned by the
root nursery (:mod:`smart_proxy.server`); the app holds no long-lived work of its own.
It answers the lists (``/v1/models``, ``/api/tags``, ``/api/ps``, ``/api/version``, ``/``,
made in :mod:`smart_proxy.handlers`), Ollama's routes for managing models that smart-proxy
does not support (501), and the proxy's own routes, below. The model routes never reach
it: the edge (:mod:`smart_proxy.web.edge`) sends them to :mod:`smart_proxy.web.routes`.
Errors are rendered in the dialect of the path, as the model routes render them
(:func:`smart_proxy.handlers.reply.error_reply`).

The proxy's own routes: the probes, the detailed health view, the metrics, and the agents.
``/health`` is liveness: 200 whenever the process serves, from the in-memory
view of the pool (no upstream call). ``/health/ready`` is readiness: 200 only
while the proxy takes new requests, 503 while starting or draining. Both are
public; ``/metrics`` is Prometheus text and needs a key when keys are set.
``/plugins`` lists the agents found at start-up. ``/ui`` is the dashboard, static files
(:mod:`smart_proxy.handlers.ui_routes`) that need no key: the page asks for one. ``/events`` (the live event stream) and
``/logs/MODEL`` (a model's llama-server output) are made in
:mod:`smart_proxy.handlers.watch_routes`; their streamed replies become Quart streamed
responses (:func:`_streamed`), which Quart-Trio cancels when the client disconnects.

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
import logging
from collections.abc import AsyncIterator

import attrs
from quart import Quart, Response, current_app, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from ..errors import ProxyError, Unauthorized, too_large
from ..handlers import ollama_routes, openai_routes, ui_routes, watch_routes
from ..handlers.reply import Reply, error_reply, json_reply
from ..handlers.state import ProxyState
from ..upstream import ollama_server
from .asgi import BODY_TIMEOUT
from .edge import EdgeMiddleware

__all__ = ["create_app", "state"]

log = logging.getLogger(__name__)


def state() -> ProxyState:
    """The ProxyState of the app serving the current request."""
    return current_app.extensions["smart_proxy"]


def create_app(proxy_state: ProxyState) -> Quart:
    """The app over ``proxy_state``, wrapped in the edge; serve it with Hypercorn."""
    app = QuartTrio("smart_proxy")
    # Generations stream for minutes; bodies (embedding batches) can be large.
    app.config["RESPONSE_TIMEOUT"] = None
    app.config["BODY_TIMEOUT"] = BODY_TIMEOUT
    app.config["MAX_CONTENT_LENGTH"] = proxy_state.config.proxy.max_body
    app.extensions["smart_proxy"] = proxy_state
    for rule, methods, view in _ROUTES:
        app.add_url_rule(rule, view_func=view, methods=methods)

    @app.errorhandler(ProxyError)
    async def _proxy_error(exc: ProxyError) -> Response:
        return _response(error_reply(exc, request.path))

    @app.errorhandler(HTTPException)
    async def _http_error(exc: HTTPException) -> Response:
        if isinstance(exc, RequestEntityTooLarge):  # a chunked body over the limit
            return _response(error_reply(too_large(proxy_state.config.proxy.max_body), request.path))
        error = ProxyError(exc.description or exc.name)
        error.status = exc.code or 500
        error.kind = "invalid_request_error" if error.status < 500 else "server_error"
        return _response(error_reply(error, request.path))

    @app.errorhandler(Exception)
    async def _unexpected(exc: Exception) -> Response:
        log.exception("unexpected error on %s %s", request.method, request.path)
        return _response(error_reply(ProxyError(f"internal error: {type(exc).__name__}: {exc}"), request.path))

    app.asgi_app = EdgeMiddleware(app, proxy_state)  # type: ignore[method-assign]
    return app


def _response(reply: Reply) -> Response:
    """A whole :class:`~smart_proxy.handlers.reply.Reply` as Quart's response."""
    headers = [(name.decode("latin-1"), value.decode("latin-1")) for name, value in reply.headers]
    return Response(reply.body, status=reply.status, headers=headers)


def _streamed(reply: Reply) -> Response:
    """A :class:`~smart_proxy.handlers.reply.Reply` with a stream as Quart's streamed response (a whole one as ``_response``)."""
    if reply.stream is None:
        return _response(reply)
    stream = reply.stream

    async def pieces() -> AsyncIterator[bytes]:
        async with stream as iterator:
            async for piece in iterator:
                yield piece

    headers = [(name.decode("latin-1"), value.decode("latin-1")) for name, value in reply.headers]
    return Response(pieces(), status=reply.status, headers=headers)


def _json(body: object, status: int = 200) -> Response:
    return _response(json_reply(body, status))


# ---- the lists ------------------------------------------------------------------------------


async def _models() -> Response:
    return _response(await openai_routes.models(state(), request.args.getlist("status")))


async def _tags() -> Response:
    return _response(await ollama_routes.tags(state()))


async def _ps() -> Response:
    return _response(await ollama_routes.ps(state()))


async def _version() -> Response:
    return _response(ollama_routes.version())


async def _root() -> Response:
    return _response(ollama_routes.root())


async def _not_supported(digest: str | None = None) -> Response:
    raise ollama_routes.NotSupported(f"{request.path} is not supported by smart-proxy: models are configured in proxy.ini")


# ---- the proxy's own ------------------------------------------------------------------------


async def health() -> Response:
    """200 while the proxy serves, with its phase, its role and the pool's counts; the detail for those allowed it.

    ``role`` is ``router`` for a proxy that loads no model itself (it has no pool, so no
    ``pool`` key), else ``node`` (see :attr:`smart_proxy.config.Config.role`).

    The detail (see the module docstring): every server's state, each model's history,
    downloads, and the Ollama upstreams as the background monitor last saw them (no
    upstream call here). One upstream down makes the status ``degraded`` for everyone;
    the HTTP code stays 200.
    """
    proxy = state()
    role = proxy.config.role
    snapshot = proxy.pool.snapshot()
    upstreams = proxy.upstreams.report
    peers = proxy.fleet.report() if proxy.fleet else []
    degraded = any(upstream["status"] != "ok" for upstream in [*upstreams, *peers])
    body = {"status": "degraded" if degraded else "ok", "phase": proxy.lifecycle.phase.value, "role": role}
    if not _may_see_detail(proxy):
        if role == "node":
            loaded = sum(server.state == "ready" for server in snapshot.servers)
            body["pool"] = {"capacity": snapshot.capacity, "queued": snapshot.queued, "loaded": loaded}
        if peers:
            up = sum(peer["status"] == "ok" for peer in peers)
            body["peers"] = {"up": up, "down": len(peers) - up}
        return _json(body)
    if role == "node":
        body["pool"] = attrs.asdict(snapshot)
    if upstreams:
        body["upstreams"] = upstreams
    if peers:
        body["peers"] = peers
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


async def upstreams() -> Response:
    """Probe every Ollama upstream now (``/health`` shows the last background probe)."""
    proxy = state()
    return _json({"upstreams": await ollama_server.health(proxy.client, proxy.catalog)})


async def ready() -> Response:
    """200 when new requests are taken; 503 while starting or draining."""
    lifecycle = state().lifecycle
    if lifecycle.accepting:
        return _json({"status": "ready"})
    response = _json({"status": lifecycle.phase.value}, status=503)
    response.headers["Retry-After"] = "5"
    return response


async def metrics() -> Response:
    body, content_type = state().metrics.render()
    return Response(body, content_type=content_type)


async def events() -> Response:
    """``GET /events``: what happens in the proxy, as Server-Sent Events (docs/events.md)."""
    return _streamed(await watch_routes.events(state()))


async def model_logs(model: str) -> Response:
    """``GET /logs/MODEL``: the last lines its llama-servers printed (``?format=json``, ``?follow=1``)."""
    return _streamed(await watch_routes.logs(state(), model, request.args))


async def ui_redirect() -> Response:
    """``GET /ui``: to ``ui/``, where the dashboard's relative URLs resolve (docs/ui.md)."""
    return _response(await ui_routes.redirect())


async def ui_page() -> Response:
    """``GET /ui/``: the dashboard (docs/ui.md)."""
    return _response(await ui_routes.page())


async def ui_asset(name: str) -> Response:
    """``GET /ui/NAME``: the dashboard's script and style sheet."""
    return _response(await ui_routes.asset(name))


async def plugins() -> Response:
    """Every discovered agent: name, description, enabled, loaded, or the error that stopped it."""
    return _json({"agents": state().agents.describe()})


#: (rule, methods, view) of every route the app answers.
_ROUTES = [
    ("/v1/models", ["GET"], _models),
    ("/models", ["GET"], _models),
    ("/api/tags", ["GET"], _tags),
    ("/api/ps", ["GET"], _ps),
    ("/api/version", ["GET"], _version),
    ("/", ["GET"], _root),
    ("/api/create", ["POST"], _not_supported),
    ("/api/copy", ["POST"], _not_supported),
    ("/api/push", ["POST"], _not_supported),
    ("/api/blobs/<path:digest>", ["HEAD", "POST"], _not_supported),
    ("/health", ["GET"], health),
    ("/health/upstreams", ["GET"], upstreams),
    ("/health/ready", ["GET"], ready),
    ("/metrics", ["GET"], metrics),
    ("/plugins", ["GET"], plugins),
    ("/events", ["GET"], events),
    ("/logs/<path:model>", ["GET"], model_logs),
    ("/ui", ["GET"], ui_redirect),
    ("/ui/", ["GET"], ui_page),
    ("/ui/<path:name>", ["GET"], ui_asset),
]
