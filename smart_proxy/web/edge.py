"""The edge every HTTP request passes before its route runs, and its answer after.

Theory of operation: :class:`EdgeMiddleware` wraps the Quart app's ASGI callable.
For each request it

1. takes the client's ``X-Request-Id`` (if it is a sane token) or makes one, puts
   it in the log context and on the answer;
2. opens a metrics :class:`~smart_proxy.metrics.Exchange` labelled with the
   matched route (a URL rule, never the raw path, so labels stay bounded);
3. answers a CORS preflight itself, without asking for a key;
4. admits the request or answers at once, in the caller's dialect: 503 while the
   proxy is draining, 401 without a valid API key, 413 when ``Content-Length`` is
   over ``[proxy] max_body`` (a chunked body over it gets 413 from Quart's own
   limit, which is set to the same value), 400 with ``Connection: close`` when it
   has both ``Content-Length`` and ``Transfer-Encoding`` (h11 reads such a body as
   chunked and would keep the connection; RFC 9112 6.3 says close it: the two
   framings are how request smuggling works);
5. hands it to its route: a model route's path to :func:`smart_proxy.web.routes.dispatch`
   on raw ASGI, any other to the Quart-Trio app;
6. counts it in flight for the drain (probes, scrapes and the watching streams,
   ``/events`` and ``/logs/MODEL``, are not counted, so they never hold a shutdown up),
   and as the last byte goes out (or once the client has gone), hands the exchange to
   the metrics, writes one access line, and for a model route publishes a ``request``
   summary on the event bus (docs/events.md).

The probes (``/health``, ``/health/ready``) and the dashboard's static files (``/ui``,
``/ui/...``: the page must load to ask for a key) are public and answered in every phase;
``/metrics`` is answered while draining but needs a key like the API.

No route speaks WebSocket: an upgrade is refused here, before the app sees it,
with the answer an HTTP request to the path would get for a missing key (401), or
else 404, in the caller's dialect (ASGI's ``websocket.http.response``; a server
without that extension gets ``websocket.close``, which it answers with 403).
Lifespan events go to the app.
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
import re
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import trio
from quart import Quart
from werkzeug.exceptions import HTTPException
from werkzeug.routing import RoutingException

from .. import logs
from ..dialects.anthropic import is_anthropic_route
from ..errors import BadRequest, ProxyError, ShuttingDown, too_large
from ..handlers.reply import Reply, encode_headers, error_reply, is_ollama_route
from ..handlers.state import ProxyState
from ..metrics import Exchange, current_exchange
from .asgi import send_reply
from .routes import ROUTES, dispatch

__all__ = ["PUBLIC_PATHS", "EdgeMiddleware", "is_public"]

log = logging.getLogger("smart_proxy.access")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

#: Answered without a key and in every phase.
PUBLIC_PATHS = frozenset({"/health", "/health/ready"})
#: The dashboard's page and files (static, public) are at this path and under it.
_UI = "/ui"


def is_public(path: str) -> bool:
    """Whether ``path`` is answered without a key and in every phase: the probes and the dashboard's files."""
    return path in PUBLIC_PATHS or path == _UI or path.startswith(_UI + "/")


#: Answered while draining and not counted in flight.
_UNCOUNTED = PUBLIC_PATHS | {"/metrics"}

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:/+=@-]{1,128}$")
_CORS_METHODS = "GET, POST, DELETE, OPTIONS"
_CORS_HEADERS = "anthropic-version, authorization, content-type, x-api-key, x-request-id"
#: (path, method) pairs whose route is remembered; paths are the client's, so the cache is bounded.
_ROUTE_CACHE = 1024
#: The status counted for a request whose client left before any answer was sent (nginx's choice).
_CLIENT_GONE = 499


#: The request headers the edge reads (ASGI servers give the names in lower case).
_WANTED = frozenset(
    {b"x-request-id", b"origin", b"authorization", b"x-api-key", b"content-length", b"transfer-encoding",
     b"access-control-request-method", b"access-control-request-headers"}
)
#: Request ids the proxy makes: 32 hex digits, a random half per process and a counter.
#: Unique like uuid4().hex for every practical purpose, at a fraction of its CPU.
_ID_PREFIX = os.urandom(8).hex()
_id_counter = itertools.count(int.from_bytes(os.urandom(4), "big"))


def _new_request_id() -> str:
    return f"{_ID_PREFIX}{next(_id_counter) & 0xFFFF_FFFF_FFFF_FFFF:016x}"


def _declared_length(headers: dict[str, str]) -> int | None:
    """The request's Content-Length, if it gave one that is a number."""
    length = headers.get("content-length", "")
    return int(length) if length.isdigit() else None


def _wanted_headers(raw: list[tuple[bytes, bytes]]) -> dict[str, str]:
    """The request headers the edge reads, decoded (the last of a repeated one wins); the rest are skipped."""
    return {name.decode("latin-1"): value.decode("latin-1") for name, value in raw if name in _WANTED}


def _dialect(path: str) -> str:
    if is_ollama_route(path):
        return "ollama"
    return "anthropic" if is_anthropic_route(path) else "openai"


def _summary(
    exchange: Exchange, tokens: tuple[int, int] | None, request_id: str, method: str, path: str, seconds: float
) -> dict[str, Any]:
    """The ``request`` event of a finished model-route request (docs/events.md)."""
    ttft = exchange.first_byte - exchange.started if exchange.first_byte is not None else None
    completion = tokens[1] if tokens is not None else None
    # generation time: from the first byte of a stream, else the whole request
    generating = seconds - ttft if ttft is not None else seconds
    rate = round(completion / generating, 2) if completion and generating > 0 else None
    return {
        "id": request_id,
        "method": method,
        "path": path,
        "dialect": _dialect(path),
        "model": exchange.model or None,
        "peer": exchange.peer or None,
        "status": exchange.status,
        "streamed": exchange.streaming,
        "seconds": round(seconds, 4),
        "ttft": round(ttft, 4) if ttft is not None else None,
        "prompt_tokens": tokens[0] if tokens is not None else None,
        "completion_tokens": completion,
        "tokens_per_second": rate,
        "agents": list(exchange.agents),
    }


class EdgeMiddleware:
    def __init__(self, app: Quart, proxy: ProxyState) -> None:
        self._app = app.asgi_app
        self._proxy = proxy
        self._routes = app.url_map.bind("localhost")
        # werkzeug's matcher leaves a reference cycle (a recursive closure) behind on every
        # call, which the cyclic GC must then collect; the routes are fixed, so remember them.
        self._route = functools.lru_cache(maxsize=_ROUTE_CACHE)(self._match_route)
        self._origins = frozenset(proxy.config.proxy.cors_origins)
        self._max_body = proxy.config.proxy.max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            await self._refuse_websocket(scope, receive, send)
            return
        if scope["type"] != "http":  # lifespan
            await self._app(scope, receive, send)
            return
        headers = _wanted_headers(scope["headers"])
        path, method = scope["path"], scope["method"]
        request_id = headers.get("x-request-id", "")
        if not _REQUEST_ID.match(request_id):
            request_id = _new_request_id()
        exchange = Exchange(route=self._route(path, method), started=trio.current_time())
        lifecycle = self._proxy.lifecycle
        counted = path not in _UNCOUNTED and path != "/events" and not path.startswith("/logs/")
        by_quart = path not in ROUTES
        extra = self._extra_headers(request_id, headers.get("origin"), scope)

        async def send_observed(message: Message) -> None:
            if message.get("more_body"):  # a piece of a body, not its last (a stream's): the common case first
                exchange.body_sent(message.get("body", b""))
                await send(message)
                return
            if message["type"] == "http.response.start":
                response_headers = [*message.get("headers", ()), *extra]
                message = {**message, "headers": response_headers}
                content_type = next((v for k, v in response_headers if k.lower() == b"content-type"), b"")
                exchange.response_started(message["status"], content_type.decode("latin-1"))
            elif message["type"] == "http.response.body":  # the last piece
                exchange.body_sent(message.get("body", b""))
                # counted before the last write, not after: a client that has the whole
                # answer finds it in /metrics (and a test can rely on that); its access line
                # is written when the exchange ends, so that the answer does not wait for it
                count()
                if by_quart:
                    # Shielded: inside this send Hypercorn ends the exchange (it tells the app
                    # http.disconnect, which Quart-Trio takes as the client leaving) and restarts
                    # the connection's keep-alive timer; a cancellation landing there left the
                    # timer stopped, and an idle connection open for good. (A model route's
                    # answer ends its own way: smart_proxy.web.asgi.)
                    with trio.CancelScope(shield=True):
                        await send(message)
                    return
            await send(message)

        observed = False
        seconds = 0.0

        def count() -> None:
            nonlocal observed, seconds
            if observed:
                return
            observed = True
            if not exchange.status:
                exchange.status = _CLIENT_GONE
            # the usage report is found by scanning the answer's head and tail: once, for both
            tokens = exchange.usage.tokens() if exchange.usage is not None else None
            self._proxy.metrics.observe(exchange, tokens)
            seconds = trio.current_time() - exchange.started
            if path in ROUTES and self._proxy.bus.subscribers:  # for /events readers; no listener counts it
                self._proxy.bus.publish("request", **_summary(exchange, tokens, request_id, method, path, seconds))

        id_token = logs.request_id.set(request_id)
        exchange_token = current_exchange.set(exchange)
        if counted:
            lifecycle.enter()
        try:
            early = self._gate(path, method, headers)
            if early is not None:
                await send_reply(send_observed, early)
            elif not by_quart:
                await dispatch(self._proxy, scope, receive, send_observed, _declared_length(headers))
            else:
                await self._app(scope, receive, send_observed)
        finally:
            if counted:
                lifecycle.leave()
            count()
            logs.emit(
                log,
                logging.INFO if counted else logging.DEBUG,
                "%s %s %d %.3fs%s%s",
                method,
                path,
                exchange.status,
                seconds,
                f" model={exchange.model}" if exchange.model else "",
                f" peer={exchange.peer}" if exchange.peer else "",
            )
            current_exchange.reset(exchange_token)
            logs.request_id.reset(id_token)

    def _match_route(self, path: str, method: str) -> str:
        """The URL rule ``path`` matches (``/v1/chat/completions``), or ``other``."""
        route = ROUTES.get(path)
        if route is not None:
            return path if method == route[0] else "other"
        try:
            rule, _ = self._routes.match(path, method, return_rule=True)
        except (HTTPException, RoutingException):
            return "other"
        return rule.rule

    def _gate(self, path: str, method: str, headers: dict[str, str]) -> Reply | None:
        """An answer given here and now (a preflight, or an error), or None to let the route run."""
        if "transfer-encoding" in headers and "content-length" in headers:
            error = BadRequest("a request may carry Content-Length or Transfer-Encoding, not both (RFC 9112 6.3)")
            return error_reply(error, path, {"connection": "close"})
        if self._origins and method == "OPTIONS" and "access-control-request-method" in headers:
            return self._preflight(headers)
        if is_public(path):
            return None
        try:
            if not self._proxy.lifecycle.accepting and path not in _UNCOUNTED:
                raise ShuttingDown("the proxy is shutting down and takes no new requests; retry shortly")
            self._proxy.api_keys.check(headers.get("authorization"), headers.get("x-api-key"))
            length = _declared_length(headers)
            if length is not None and length > self._max_body:
                raise too_large(self._max_body)
        except ProxyError as exc:
            return error_reply(exc, path)
        return None

    async def _refuse_websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Refuse a WebSocket upgrade (see the module docstring): 401 without a valid key where one is needed, else 404."""
        headers = _wanted_headers(scope["headers"])
        path = scope["path"]
        try:
            if not is_public(path):
                self._proxy.api_keys.check(headers.get("authorization"), headers.get("x-api-key"))
            error = ProxyError(f"{path} does not speak WebSocket: smart-proxy's routes are plain HTTP")
            error.status, error.kind = 404, "not_found"
        except ProxyError as exc:
            error = exc
        await receive()  # websocket.connect
        if "websocket.http.response" in scope.get("extensions", {}):
            reply = error_reply(error, path)
            headers = [*reply.headers, (b"content-length", str(len(reply.body)).encode())]
            await send({"type": "websocket.http.response.start", "status": reply.status, "headers": headers})
            await send({"type": "websocket.http.response.body", "body": reply.body})
        else:
            await send({"type": "websocket.close", "code": 1008})  # policy violation; the server answers 403
        log.info("WEBSOCKET %s %d refused", path, error.status)

    def _allowed(self, origin: str | None) -> bool:
        return origin is not None and ("*" in self._origins or origin in self._origins)

    def _preflight(self, headers: dict[str, str]) -> Reply:
        answer = {"content-type": "text/html; charset=utf-8"}
        if self._allowed(headers.get("origin")):
            answer["access-control-allow-methods"] = _CORS_METHODS
            answer["access-control-allow-headers"] = headers.get("access-control-request-headers", _CORS_HEADERS)
            answer["access-control-max-age"] = "600"
        return Reply(204, encode_headers(answer))

    def _extra_headers(self, request_id: str, origin: str | None, scope: Scope) -> list[tuple[bytes, bytes]]:
        """Headers every answer gets: the request id, CORS, and ``Connection: close`` while draining."""
        extra = [(b"x-request-id", request_id.encode())]
        if self._origins:
            extra.append((b"vary", b"Origin"))
            if self._allowed(origin):
                assert origin is not None
                extra += [
                    (b"access-control-allow-origin", origin.encode("latin-1")),
                    (b"access-control-expose-headers", b"x-request-id, retry-after"),
                ]
        if not self._proxy.lifecycle.accepting and scope.get("http_version", "1.1").startswith("1"):
            extra.append((b"connection", b"close"))  # let clients reconnect to an instance that stays
        return extra

