"""OpenAI's routes over the pool: chat and text completions, embeddings, and the model list.

Theory of operation: :func:`model_route` serves all three model routes, and their aliases
without ``/v1`` (``/chat/completions``, ...), which llama-server also serves: an alias is
answered as the ``/v1`` route it stands for, and sent upstream to that route. It checks the
body once (:mod:`smart_proxy.dialects.openai`); a model a peer has may be served there
instead (:func:`smart_proxy.handlers.fleet.serve` decides). Served here, it finds the model in the catalog. A
chat or completion whose user text starts with agent commands (``/rag ...``) runs the
agent chain (:mod:`smart_proxy.agents`), for either kind of model. Otherwise a model
with ``backend = ollama`` is forwarded to its Ollama server's ``/v1`` routes
(:mod:`smart_proxy.upstream.ollama_server`), and a local one to a llama-server from
the pool, the body byte for byte: llama-server is started with ``--alias NAME``, so the
``model`` it reports is already the name the client asked for. Tools, tool calls and
``image_url`` parts pass through as they are; a chat with images for a server without
vision is refused here with a 400 (llama-server itself would answer 500). A top-level
``num_ctx`` (our extension) asks the pool for a server with at least that context. The answer is relayed as
it comes (a stream piece by piece, a whole answer once read, under ``[proxy]
max_answer``); the lease is released when the upstream answer is closed. A stream request
whose model has no ready llama-server gets SSE comments while it waits
(:func:`waiting_reply`, which the Anthropic and Responses routes use too, each with its
own :class:`~smart_proxy.handlers.loading_stream.Framing`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping

from .. import logs
from ..agents import Chain
from ..config import ModelConfig
from ..dialects import openai as dialect
from ..errors import ProxyError
from ..metrics import note_model
from ..pool import Lease, ModelStatus, State
from ..upstream import ollama_server
from ..upstream.props import check_images
from ..upstream.relay import RelayBody, SSELines, UpstreamAnswer, open_upstream, send_leased
from . import fleet
from .loading_stream import OPENAI, Framing, LoadingStream
from .reply import Reply, Request, encode_headers, error_reply, json_reply, merge_headers, read_answer, relay_answer
from .state import ProxyState

__all__ = ["ROUTES", "model_route", "models", "open_relay", "waiting_reply"]

#: The model routes :func:`model_route` serves (``POST``), and their aliases without ``/v1``.
ROUTES = (*dialect.REQUIRED, *dialect.ALIASES)

_JSON_HEADERS = {"Content-Type": "application/json"}
_SSE_HEADERS = {name.lower(): value for name, value in dialect.SSE_HEADERS.items()}


async def model_route(proxy: ProxyState, request: Request) -> Reply:
    """``POST /v1/chat/completions``, ``/v1/completions`` or ``/v1/embeddings`` (or an alias); see the module docstring.

    Raises:
        BadRequest: the body is not a JSON object, or lacks ``model`` or the route's required field.
        ModelNotFound, ModelNotAllowed: as :meth:`smart_proxy.catalog.Catalog.get`.
        ProxyError: whatever loading the model or reaching its upstream raised.
    """
    request.path = dialect.ALIASES.get(request.path, request.path)  # an alias is served as the route it stands for
    payload = dialect.parse_body(request.body)
    name = dialect.required_field(request.path, payload)
    return await fleet.serve(proxy, request, name, lambda: _here(proxy, request, payload, name))


async def _here(proxy: ProxyState, request: Request, payload: dict, name: str) -> Reply:
    """:func:`model_route` served by this proxy: agents, an Ollama upstream, or the pool."""
    path, raw = request.path, request.body
    target = proxy.catalog.get(name)
    note_model(target.name)
    kind = dialect.AGENT_KINDS.get(path)
    chain = proxy.agents.activate(payload, kind) if kind is not None else None
    if chain is not None:
        return await _with_agents(proxy, request, chain)
    limit = proxy.config.proxy.max_answer
    if target.backend == "ollama":  # served by an upstream Ollama through its /v1 routes, not the pool
        upstream = await ollama_server.send(proxy.client, target, "POST", path, payload=payload, raw=raw)
        return await relay_answer(upstream, limit)
    images = dialect.has_images(payload)
    num_ctx = dialect.requested_context(payload)
    stream = payload.get("stream") is True
    return await _relay(proxy, request, target.name, raw, stream=stream, images=images, num_ctx=num_ctx)


async def open_relay(
    proxy: ProxyState, path: str, model: str, body: bytes, *, images: bool = False, num_ctx: int | None = None
) -> tuple[Lease, UpstreamAnswer]:
    """POST ``body`` to a llama-server for ``model``; its answer's headers are in, and the lease is the caller's.

    ``images``: the body carries images, so the server must have vision
    (:func:`smart_proxy.upstream.props.check_images`, a 400 otherwise). ``num_ctx``: the
    server must have at least that context (:meth:`smart_proxy.pool.Pool.acquire`).
    """

    async def send(lease: Lease) -> UpstreamAnswer:
        if images:
            await check_images(proxy.client, lease, model)
        url = lease.base_url + path
        return await open_upstream(proxy.llama, "POST", url, content=body, headers=_JSON_HEADERS, lease=lease)

    return await send_leased(lambda: proxy.pool.acquire(model, num_ctx=num_ctx), send)


def waiting_reply(
    proxy: ProxyState,
    request: Request,
    model: str,
    body: bytes,
    framing: Framing,
    *,
    images: bool = False,
    num_ctx: int | None = None,
    headers: Mapping[str, str] | None = None,
) -> Reply | None:
    """A stream request's reply while ``model`` has no ready llama-server: a :class:`LoadingStream`
    in ``framing``'s dialect, SSE comments while it waits ``[proxy] loading_comments`` seconds or
    more for the load; None when a server is ready or the comments are off (relay as usual).
    """
    interval = proxy.config.proxy.loading_comments
    if interval <= 0 or any(s.state is State.READY for s in proxy.pool.servers(model)):
        return None
    waiting = LoadingStream(
        proxy.pool,
        proxy.catalog.get(model),
        lambda: open_relay(proxy, request.path, model, body, images=images, num_ctx=num_ctx),
        interval=interval,
        limit=proxy.config.proxy.max_answer,
        opened=request.opened,
        framing=framing,
    )
    return Reply(200, merge_headers({"content-type": "text/event-stream"}, _SSE_HEADERS, headers or {}), stream=waiting)


async def _relay(
    proxy: ProxyState,
    request: Request,
    model: str,
    body: bytes,
    *,
    stream: bool,
    headers: dict[str, str] | None = None,
    images: bool = False,
    num_ctx: int | None = None,
) -> Reply:
    """POST ``body`` to a llama-server for ``model`` and relay its answer (a stream as it arrives).

    A stream request for a model with no ready llama-server is a :func:`waiting_reply`.
    """
    if stream:
        waiting = waiting_reply(proxy, request, model, body, OPENAI, images=images, num_ctx=num_ctx, headers=headers)
        if waiting is not None:
            return waiting
    lease, upstream = await open_relay(proxy, request.path, model, body, images=images, num_ctx=num_ctx)
    request.opened.append(upstream)
    limit = proxy.config.proxy.max_answer
    if stream and upstream.status_code == 200:
        relayed = RelayBody(upstream, on_error=dialect.sse_error, on_done=lease.release, lines=SSELines(limit))
        return Reply(upstream.status_code, merge_headers(upstream.headers, _SSE_HEADERS, headers or {}), stream=relayed)
    return await read_answer(upstream, limit, on_done=lease.release, wrap=dialect.upstream_error_body, headers=headers)


async def _with_agents(proxy: ProxyState, request: Request, chain: Chain) -> Reply:
    """Run the chain's hooks around the upstream call; a buffered stream is replayed as SSE.

    A live chain's request goes to the model the hooks left in it, a llama-server or
    an Ollama upstream. Every answer carries the chain's failures (``ctx.headers()``),
    an error answer too.
    """
    ctx = await chain.prepare(
        proxy.pool, proxy.llama, logs.request_id.get(), catalog=proxy.catalog, client=proxy.client, fleet=proxy.fleet
    )
    try:
        if chain.live:
            target = proxy.catalog.get(ctx.model)
            if target.backend == "ollama":
                upstream = await ollama_server.send(proxy.client, target, "POST", request.path, payload=ctx.payload)
                return await relay_answer(upstream, proxy.config.proxy.max_answer, ctx.headers())
            body = json.dumps(ctx.payload).encode()
            stream = ctx.payload.get("stream") is True
            images = dialect.has_images(ctx.payload)
            return await _relay(proxy, request, ctx.model, body, stream=stream, headers=ctx.headers(), images=images)
        response = await chain.respond(ctx)
    except ProxyError as exc:
        if not ctx.failures:
            raise
        return error_reply(exc, request.path, ctx.headers())
    if ctx.stream:
        headers = {"content-type": "text/event-stream", **_SSE_HEADERS, **ctx.headers()}
        return Reply(200, encode_headers(headers), dialect.replay_sse(response, ctx.kind))
    return json_reply(response, headers=ctx.headers())


async def _memory(proxy: ProxyState, model: ModelConfig) -> int | None:
    """Bytes one llama-server of ``model`` holds: a live server's admitted size (host and GPUs), else the estimate
    (None: unknown)."""
    live = [server.memory + server.vram for server in proxy.pool.servers(model.name)]
    if live:
        return live[0]
    estimate = await proxy.pool.estimate(model, download=False)
    return estimate.total if estimate is not None else None


async def models(proxy: ProxyState, status: list[str] | None = None) -> Reply:
    """``GET /v1/models``: every catalog model with its status (those of ``status`` only when given) and
    the memory one llama-server of it holds (``memory``, bytes; None for an upstream's model or one not on disk).

    A local model's status comes from the pool (:meth:`smart_proxy.pool.Pool.model_status`); a
    model of an Ollama upstream is ``loaded`` when that server's ``/api/ps`` lists it, else
    ``unloaded``, or ``failed`` with the reason when the server does not answer. ``loaded`` and
    ``state`` are the list's older fields, kept for the clients that read them.

    Raises:
        BadRequest: an unknown ``status`` value.
    """
    wanted = dialect.status_filter(status or [])
    catalog = list(proxy.catalog)
    upstream = await ollama_server.loaded_models(proxy.client, catalog)
    created = int(time.time())
    data = []
    for model in catalog:
        if model.backend == "ollama":
            known = upstream.get(model.name, False)
            if isinstance(known, str):
                current = ModelStatus("failed", "upstream", error=known, failed_at=round(time.time(), 3))
            else:
                current = ModelStatus("loaded" if known else "unloaded", "upstream")
        else:
            current = proxy.pool.model_status(model)
        if wanted is not None and current.value not in wanted:
            continue
        data.append(
            {
                "id": model.name,
                "object": "model",
                "created": created,
                "owned_by": "ollama" if model.backend == "ollama" else "smart-proxy",
                "loaded": current.value == "loaded",
                "state": current.state,
                "status": dialect.status_object(current),
                "memory": await _memory(proxy, model),
            }
        )
    if proxy.fleet:
        for entry in data:
            entry["served_by"] = fleet.served_by(proxy, entry["id"], local=True)
        data.extend(fleet.model_entries(proxy, created, wanted))
    return json_reply({"object": "list", "data": data})
