"""OpenAI's Responses API over the pool: ``POST /v1/responses``.

Theory of operation: :func:`responses` checks the body once
(:mod:`smart_proxy.dialects.responses`) and finds the model in the catalog. Without agent
commands the request is relayed byte for byte, to a llama-server from the pool (which
serves ``/v1/responses`` itself) or, for a model with ``backend = ollama``, to its Ollama
server's ``/v1/responses``; the answer comes back as it arrives, a stream line by line.
A stream is complete only once a terminal event came (``response.completed``, ...): one
cut short ends with an ``error`` and a ``response.failed`` event instead
(:class:`~smart_proxy.dialects.responses.ResponsesLines`). A stream that waits for its
model's load gets SSE comments meanwhile
(:func:`~smart_proxy.handlers.openai_routes.waiting_reply`), and ends with an ``error``
event if the load then fails.

Agent commands are read from the last user input's text. Agents see OpenAI chat shapes,
so the request is translated to a chat completion request
(:func:`~smart_proxy.dialects.responses.to_chat`) and the chain runs buffered whatever
its hooks: the chat answer it ends with becomes a Response object, replayed as the
Responses event sequence when the client asked for a stream. A chain with only request
hooks therefore does not stream as the model generates on this route.
"""

from __future__ import annotations

from collections.abc import Callable

from .. import logs
from ..agents import Chain
from ..dialects import openai as openai_dialect
from ..dialects import responses as dialect
from ..errors import ProxyError
from ..metrics import note_model
from ..upstream import ollama_server
from ..upstream.relay import RelayBody, UpstreamAnswer
from . import fleet
from .loading_stream import Framing
from .openai_routes import open_relay, waiting_reply
from .reply import Reply, Request, encode_headers, error_reply, json_reply, merge_headers, read_answer
from .state import ProxyState

__all__ = ["ROUTES", "responses"]

#: The routes :func:`responses` serves (``POST``).
ROUTES = ("/v1/responses",)

_SSE_HEADERS = {name.lower(): value for name, value in openai_dialect.SSE_HEADERS.items()}


async def responses(proxy: ProxyState, request: Request) -> Reply:
    """``POST /v1/responses``; see the module docstring.

    Raises:
        BadRequest: the body is not a JSON object, lacks ``model`` or ``input``, or (with agent
            commands) holds input that cannot be read as chat messages.
        ModelNotFound, ModelNotAllowed: as :meth:`smart_proxy.catalog.Catalog.get`.
        ProxyError: whatever loading the model or reaching its upstream raised.
    """
    payload = openai_dialect.parse_body(request.body)
    name = dialect.model_of(payload)
    return await fleet.serve(
        proxy, request, name, lambda: _here(proxy, request, payload, name),
        lambda upstream, done: _relay(proxy, upstream, name, done),
    )


async def _here(proxy: ProxyState, request: Request, payload: dict, name: str) -> Reply:
    """:func:`responses` served by this proxy: agents, an Ollama upstream, or the pool."""
    raw = request.body
    target = proxy.catalog.get(name)
    note_model(target.name)
    chain = _activate(proxy, payload)
    if chain is not None:
        return await _with_agents(proxy, request, payload, chain)
    if target.backend == "ollama":
        upstream = await ollama_server.send(proxy.client, target, "POST", request.path, payload=payload, raw=raw)
        request.opened.append(upstream)
        return await _relay(proxy, upstream, target.name)
    num_ctx = openai_dialect.requested_context(payload)
    if payload.get("stream") is True:
        waiting = waiting_reply(proxy, request, target.name, raw, _WAITING, num_ctx=num_ctx)
        if waiting is not None:
            return waiting
    lease, upstream = await open_relay(proxy, request.path, target.name, raw, num_ctx=num_ctx)
    request.opened.append(upstream)
    return await _relay(proxy, upstream, target.name, lease.release)


def _activate(proxy: ProxyState, payload: dict) -> Chain | None:
    """The agent chain the input's leading commands name.

    The request is translated only when its text names an agent, so a request without
    commands goes on untouched even if it holds what the translation cannot read.
    """
    text = dialect.user_text(payload)
    if text is None or not text.lstrip().startswith("/"):
        return None
    if proxy.agents.activate({"messages": [{"role": "user", "content": text}]}, "chat") is None:
        return None
    return proxy.agents.activate(dialect.to_chat(payload), "chat")


async def _relay(
    proxy: ProxyState, upstream: UpstreamAnswer, model: str, release: Callable[[], object] | None = None
) -> Reply:
    """The upstream's answer as it comes: a stream judged by its events, else read whole (an error wrapped as OpenAI's)."""
    limit = proxy.config.proxy.max_answer
    content_type = upstream.headers.get("content-type", "")
    if upstream.status_code == 200 and content_type.startswith("text/event-stream"):
        relayed = _stream(upstream, model, limit, release)
        return Reply(200, merge_headers(upstream.headers, _SSE_HEADERS), stream=relayed)
    return await read_answer(upstream, limit, on_done=release, wrap=openai_dialect.upstream_error_body)


def _stream(upstream: UpstreamAnswer, model: str, limit: int, on_done: Callable[[], object] | None) -> RelayBody:
    """A Responses stream relayed a line at a time, complete at a terminal event (else ``error``, ``response.failed``)."""
    lines = dialect.ResponsesLines(limit, model)
    return RelayBody(upstream, on_error=lines.error, on_done=on_done, lines=lines)


def _error_event(exc: ProxyError, model: str) -> bytes:
    return dialect.error_events(exc.message, model=model)


#: A Responses stream that waits for its load (:func:`~smart_proxy.handlers.openai_routes.waiting_reply`).
_WAITING = Framing(_stream, _error_event)


async def _with_agents(proxy: ProxyState, request: Request, payload: dict, chain: Chain) -> Reply:
    """Run the chain (buffered) on the chat translation; answer a Response, or its event sequence.

    Every answer carries the chain's failures (``ctx.headers()``), an error answer too.
    """
    ctx = await chain.prepare(
        proxy.pool, proxy.llama, logs.request_id.get(), catalog=proxy.catalog, client=proxy.client, fleet=proxy.fleet
    )
    try:
        completion = await chain.respond(ctx)
    except ProxyError as exc:
        if not ctx.failures:
            raise
        return error_reply(exc, request.path, ctx.headers())
    response = dialect.from_chat(completion, payload)
    if payload.get("stream") is True:
        headers = {"content-type": "text/event-stream", **_SSE_HEADERS, **ctx.headers()}
        return Reply(200, encode_headers(headers), dialect.replay_sse(response))
    return json_reply(response, headers=ctx.headers())
