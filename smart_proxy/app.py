"""The Quart-Trio application: routes of every dialect over one shared state.

:func:`create_app` takes a :class:`ProxyState` (config, catalog, pool, HTTP
client, llama-server client, lifecycle, metrics, API keys, agents), all owned by the root nursery in
:mod:`smart_proxy.server`; the app holds no long-lived work of its own. Errors are
rendered in the dialect of the route that raised them: Ollama's
``{"error": "..."}`` under ``/api/``, the OpenAI error object everywhere else.
Every request first passes :class:`~smart_proxy.middleware.EdgeMiddleware`
(request id, CORS, API keys, draining, body limit, metrics).
"""

from __future__ import annotations

import logging

import attrs
import httpx
from quart import Quart, Response, current_app, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from .agents import AgentRegistry
from .asgi import HTTPConnection
from .auth import ApiKeys
from .upstream.ollama_server import UpstreamMonitor
from .catalog import Catalog
from .config import Config
from .errors import ProxyError, too_large
from .lifecycle import Lifecycle
from .metrics import Metrics
from .pool import Pool
from .upstream.client import LlamaClient

__all__ = ["ProxyState", "create_app", "state"]

log = logging.getLogger(__name__)

#: Seconds a client has to send its request body (Quart's ``BODY_TIMEOUT``, and smart_proxy.direct's).
BODY_TIMEOUT = 300


@attrs.frozen
class ProxyState:
    config: Config
    catalog: Catalog
    pool: Pool
    http: httpx.AsyncClient
    #: The client for requests relayed to llama-servers (smart_proxy.upstream.client); ``http`` for everything else.
    llama: LlamaClient = attrs.Factory(LlamaClient)
    lifecycle: Lifecycle = attrs.Factory(Lifecycle)
    metrics: Metrics = attrs.Factory(Metrics)
    api_keys: ApiKeys = attrs.Factory(ApiKeys)
    upstreams: UpstreamMonitor = attrs.Factory(lambda self: UpstreamMonitor(self.http, ()), takes_self=True)
    #: The slash-command agents loaded at start-up (none unless [agents] enables some).
    agents: AgentRegistry = attrs.Factory(AgentRegistry)


def state() -> ProxyState:
    """The ProxyState of the app serving the current request."""
    return current_app.extensions["smart_proxy"]


def is_ollama_route(path: str) -> bool:
    return path.startswith("/api/")


def error_response(exc: ProxyError, path: str) -> Response:
    """``exc`` in the dialect of ``path``, with Retry-After where it applies."""
    from .api import ollama_errors, openai_errors

    render = ollama_errors if is_ollama_route(path) else openai_errors
    response = render(exc)
    retry_after = getattr(exc, "retry_after", None)
    if retry_after is not None:
        response.headers["Retry-After"] = str(retry_after)
    return response


def create_app(proxy_state: ProxyState) -> Quart:
    from .api import admin, ollama, openai
    from .middleware import EdgeMiddleware

    app = QuartTrio("smart_proxy")
    app.asgi_http_class = HTTPConnection  # type: ignore[assignment]
    # Generations stream for minutes; bodies (embedding batches) can be large.
    app.config["RESPONSE_TIMEOUT"] = None
    app.config["BODY_TIMEOUT"] = BODY_TIMEOUT
    app.config["MAX_CONTENT_LENGTH"] = proxy_state.config.proxy.max_body
    app.extensions["smart_proxy"] = proxy_state
    app.register_blueprint(openai.blueprint)
    app.register_blueprint(ollama.blueprint)
    app.register_blueprint(admin.blueprint)

    @app.errorhandler(ProxyError)
    async def _proxy_error(exc: ProxyError) -> Response:
        return error_response(exc, request.path)

    @app.errorhandler(HTTPException)
    async def _http_error(exc: HTTPException) -> Response:
        if isinstance(exc, RequestEntityTooLarge):  # a chunked body over the limit
            return error_response(too_large(proxy_state.config.proxy.max_body), request.path)
        error = ProxyError(exc.description or exc.name)
        error.status = exc.code or 500
        error.kind = "invalid_request_error" if error.status < 500 else "server_error"
        return error_response(error, request.path)

    @app.errorhandler(Exception)
    async def _unexpected(exc: Exception) -> Response:
        log.exception("unexpected error on %s %s", request.method, request.path)
        return error_response(ProxyError(f"internal error: {type(exc).__name__}: {exc}"), request.path)

    app.asgi_app = EdgeMiddleware(app, proxy_state)  # type: ignore[method-assign]
    return app
