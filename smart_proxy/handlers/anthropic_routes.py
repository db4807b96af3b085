"""Anthropic's routes over the pool and over Ollama upstreams: ``POST /v1/messages`` and ``/v1/messages/count_tokens``.

Theory of operation: each route checks the body once (:mod:`smart_proxy.dialects.anthropic`:
a JSON object, ``model``, ``messages``, and ``max_tokens`` for a message) and finds the
model in the catalog. llama-server answers both routes natively, so a local model's request
goes to a llama-server from the pool byte for byte, and the answer is relayed as it comes:
a stream an SSE line at a time (:class:`~smart_proxy.dialects.anthropic.MessageLines`: a
stream that breaks off, or ends before ``message_stop``, ends with Anthropic's ``error``
event), a whole answer once read, an error answer in Anthropic's shape whatever shape
llama-server gave it. A request with ``image`` blocks for a server without vision is a 400
before it is sent (:func:`smart_proxy.upstream.props.check_images`), not llama-server's 500.
A stream that waits for its model's load gets SSE comments meanwhile
(:func:`~smart_proxy.handlers.openai_routes.waiting_reply`), and ends with the ``error``
event if the load then fails.
A model with ``backend = ollama`` is sent to its Ollama server's own
Anthropic-compatible ``/v1/messages`` route and relayed the same way; Ollama has no token
counting route, so ``count_tokens`` for such a model is a 501 that says so.

Agents: a message whose last user message's text starts with agent commands (``/rag ...``;
the text sits where the agent registry looks for it in both dialects) runs the agent chain
on the request translated to OpenAI chat (:func:`~smart_proxy.dialects.anthropic.to_openai`).
A live chain's rewritten request is translated back and relayed natively, to the model the
request hooks left in it; a buffered chain's ``chat.completion`` becomes an Anthropic
message, replayed as Anthropic's SSE events if the client asked for a stream. Every answer
carries the chain's failures (``X-Smart-Proxy-Agent-Errors``), an error answer too.
``count_tokens`` counts the request as sent, commands included.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

from .. import logs
from ..agents import Chain
from ..config import ModelConfig
from ..dialects import anthropic as dialect
from ..dialects.openai import requested_context
from ..errors import ProxyError
from ..metrics import note_model
from ..upstream import ollama_server
from ..upstream.relay import RelayBody, UpstreamAnswer
from . import fleet
from .loading_stream import Framing
from .openai_routes import open_relay, waiting_reply
from .reply import Reply, Request, encode_headers, error_reply, json_reply, merge_headers, read_answer
from .state import ProxyState

__all__ = ["count_tokens", "messages"]


class NotSupported(ProxyError):
    status = 501
    kind = "not_supported"


async def messages(proxy: ProxyState, request: Request) -> Reply:
    """``POST /v1/messages``; see the module docstring.

    Raises:
        BadRequest: the body is not a JSON object, or lacks what Anthropic requires.
        ModelNotFound, ModelNotAllowed: as :meth:`smart_proxy.catalog.Catalog.get`.
        ProxyError: whatever loading the model or reaching its upstream raised.
    """
    payload = dialect.parse_body(request.body)
    name = dialect.check_request(request.path, payload)
    return await fleet.serve(proxy, request, name, lambda: _messages_here(proxy, request, payload, name), _peer_relay(proxy))


async def _messages_here(proxy: ProxyState, request: Request, payload: dict[str, Any], name: object) -> Reply:
    """:func:`messages` served by this proxy: agents, an Ollama upstream, or the pool."""
    target = proxy.catalog.get(name)
    note_model(target.name)
    chain = _activate(proxy, payload)
    if chain is not None:
        return await _with_agents(proxy, request, payload, chain)
    return await _forward(proxy, request, target, payload, request.body)


async def count_tokens(proxy: ProxyState, request: Request) -> Reply:
    """``POST /v1/messages/count_tokens``: llama-server's own count (``{"input_tokens": N}``), for local models.

    Raises:
        BadRequest, ModelNotFound, ModelNotAllowed, ProxyError: as :func:`messages`.
        NotSupported: the model is an Ollama upstream's (501).
    """
    payload = dialect.parse_body(request.body)
    name = dialect.check_request(request.path, payload)
    return await fleet.serve(
        proxy, request, name, lambda: _count_here(proxy, request, payload, name), _peer_relay(proxy)
    )


def _peer_relay(proxy: ProxyState) -> fleet.Relay:
    """A peer's answer relayed as an upstream's is on these routes (a stream complete at ``message_stop``)."""
    limit = proxy.config.proxy.max_answer
    return lambda upstream, done: _relayed(upstream, limit, done, None)


async def _count_here(proxy: ProxyState, request: Request, payload: dict[str, Any], name: object) -> Reply:
    """:func:`count_tokens` served by this proxy."""
    target = proxy.catalog.get(name)
    note_model(target.name)
    if target.backend == "ollama":
        raise NotSupported(
            f"count_tokens is not available for {target.name!r}: it is served by an Ollama upstream, "
            "and Ollama has no token counting route"
        )
    return await _forward(proxy, request, target, payload, request.body)


async def _forward(
    proxy: ProxyState,
    request: Request,
    target: ModelConfig,
    payload: dict[str, Any],
    raw: bytes | None,
    headers: Mapping[str, str] | None = None,
) -> Reply:
    """The request (``raw``, else ``payload`` encoded) to ``target``'s upstream at the request's path, its answer relayed."""
    limit = proxy.config.proxy.max_answer
    if target.backend == "ollama":  # its own Anthropic-compatible route, not the pool
        upstream = await ollama_server.send(proxy.client, target, "POST", request.path, payload=payload, raw=raw)
        return await _relayed(upstream, limit, None, headers)
    body = raw if raw is not None else json.dumps(payload).encode()
    images, num_ctx = dialect.has_images(payload), requested_context(payload)
    if payload.get("stream") is True and request.path == dialect.MESSAGES:
        waiting = waiting_reply(proxy, request, target.name, body, _WAITING, images=images, num_ctx=num_ctx, headers=headers)
        if waiting is not None:
            return waiting
    lease, upstream = await open_relay(proxy, request.path, target.name, body, images=images, num_ctx=num_ctx)
    request.opened.append(upstream)
    return await _relayed(upstream, limit, lease.release, headers)


async def _relayed(
    upstream: UpstreamAnswer, limit: int, on_done: Callable[[], object] | None, headers: Mapping[str, str] | None
) -> Reply:
    """An upstream's answer as it came: an SSE stream a line at a time, else read whole (an error in Anthropic's shape).

    ``on_done`` runs once the answer is closed; ``limit`` bounds an answer read whole and a
    line of a stream (``[proxy] max_answer``).
    """
    extra = headers or {}
    if upstream.status_code == 200 and upstream.headers.get("content-type", "").startswith("text/event-stream"):
        relayed = _stream(upstream, "", limit, on_done)
        return Reply(200, merge_headers(upstream.headers, dialect.SSE_HEADERS, extra), stream=relayed)
    return await read_answer(upstream, limit, on_done=on_done, wrap=dialect.upstream_error_body, headers=extra)


def _stream(upstream: UpstreamAnswer, model: str, limit: int, on_done: Callable[[], object] | None) -> RelayBody:
    """A message stream relayed a line at a time, complete at ``message_stop`` (else it ends with an ``error`` event)."""
    return RelayBody(upstream, on_error=dialect.sse_error, on_done=on_done, lines=dialect.MessageLines(limit))


def _error_event(exc: ProxyError, model: str) -> bytes:
    return dialect.sse_event("error", dialect.error_object(exc.status, exc.message))


#: A message stream that waits for its load (:func:`~smart_proxy.handlers.openai_routes.waiting_reply`).
_WAITING = Framing(_stream, _error_event)


def _activate(proxy: ProxyState, payload: dict[str, Any]) -> Chain | None:
    """The chain the last user message's commands name, over the request in OpenAI's shape; None without commands.

    The registry reads the text where both dialects keep it (a string, or the first text
    block), so a request without commands is never translated.
    """
    if proxy.agents.activate(payload, "chat") is None:
        return None
    return proxy.agents.activate(dialect.to_openai(payload), "chat")


async def _with_agents(proxy: ProxyState, request: Request, payload: dict[str, Any], chain: Chain) -> Reply:
    """Run the chain's hooks around the upstream call; see the module docstring."""
    ctx = await chain.prepare(
        proxy.pool, proxy.llama, logs.request_id.get(), catalog=proxy.catalog, client=proxy.client, fleet=proxy.fleet
    )
    try:
        if chain.live:
            rewritten = dialect.request_from_openai(ctx.payload, payload)
            target = proxy.catalog.get(ctx.model)
            return await _forward(proxy, request, target, rewritten, None, ctx.headers())
        response = await chain.respond(ctx)
    except ProxyError as exc:
        if not ctx.failures:
            raise
        return error_reply(exc, request.path, ctx.headers())
    message = dialect.message_from_openai(response, ctx.model)
    if ctx.stream:
        headers = {"content-type": "text/event-stream", **dialect.SSE_HEADERS, **ctx.headers()}
        return Reply(200, encode_headers(headers), dialect.replay_sse(message))
    return json_reply(message, headers=ctx.headers())
