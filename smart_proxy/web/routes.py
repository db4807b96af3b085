"""The model routes, answered on raw ASGI: one handler per URL, whatever the body holds.

Every route that names a model in its body and may relay an upstream's answer is here
(:data:`ROUTES`); the edge (:mod:`smart_proxy.web.edge`) hands a request for one of these
paths to :func:`dispatch`, and every other path to the Quart-Trio app
(:mod:`smart_proxy.web.app`). Agent commands, models of an Ollama upstream and Ollama's
load and unload requests go through the same handler as plain requests.

These routes skip Quart's per-request machinery (its request and response objects, the
app and request contexts, URL matching), which is most of the proxy's own CPU on a
relayed request. A request with another method than the route's gets the 405 Quart
would give, in the route's dialect; ``OPTIONS`` gets the ``Allow`` answer Quart gives.
"""

from __future__ import annotations

from collections.abc import Awaitable

from ..errors import ProxyError
from ..handlers import anthropic_routes, ollama_routes, openai_routes, rerank_routes, responses_routes
from ..handlers.reply import Reply, error_reply
from ..handlers.state import ProxyState
from .asgi import Handler, Receive, Scope, Send, answer, send_reply

__all__ = ["ROUTES", "dispatch"]

#: Path -> (method, handler).
ROUTES: dict[str, tuple[str, Handler]] = {
    **{path: ("POST", openai_routes.model_route) for path in openai_routes.ROUTES},
    **{path: ("POST", responses_routes.responses) for path in responses_routes.ROUTES},
    **{path: ("POST", rerank_routes.rerank) for path in rerank_routes.ROUTES},
    "/api/chat": ("POST", ollama_routes.chat),
    "/api/generate": ("POST", ollama_routes.generate),
    "/api/embed": ("POST", ollama_routes.embed),
    "/api/embeddings": ("POST", ollama_routes.embeddings),
    "/api/show": ("POST", ollama_routes.show),
    "/api/pull": ("POST", ollama_routes.pull),
    "/api/delete": ("DELETE", ollama_routes.delete),
    "/v1/messages": ("POST", anthropic_routes.messages),
    "/v1/messages/count_tokens": ("POST", anthropic_routes.count_tokens),
}


def dispatch(proxy: ProxyState, scope: Scope, receive: Receive, send: Send, length: int | None) -> Awaitable[None]:
    """Answer a request to one of :data:`ROUTES`' paths (await what it returns).

    Not a coroutine itself: it hands on the one that answers, a frame fewer on the request's stack.
    """
    path, method = scope["path"], scope["method"]
    allowed, handler = ROUTES[path]
    if method == allowed:
        return answer(proxy, scope, receive, send, handler, length)
    if method == "OPTIONS":
        allow = ", ".join(sorted({allowed, "OPTIONS"}))
        return send_reply(send, Reply(200, [(b"allow", allow.encode()), (b"content-type", b"text/html; charset=utf-8")]))
    error = ProxyError("The method is not allowed for the requested URL.")
    error.status, error.kind = 405, "invalid_request_error"
    return send_reply(send, error_reply(error, path))
