"""OpenAI's API over the pool: chat and text completions, embeddings, models.

Bodies are forwarded unchanged; llama-server is started with ``--alias NAME``
so the ``model`` it reports is already the name the client asked for. A model
with ``backend = ollama`` is forwarded to its Ollama server's ``/v1`` routes
(:mod:`smart_proxy.upstream.ollama_server`). A chat or completion whose user text starts
with agent commands (``/rag ...``) goes through the agent chain instead, for
either kind of model (the section at the end; see :mod:`smart_proxy.agents`).
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, NamedTuple

from quart import Blueprint, Response, request

from .. import jsonbody, logs
from ..agents import AgentContext, Chain
from ..app import ProxyState, state
from ..app import error_response as dialect_error
from ..upstream import ollama_server as ollama_backend
from ..errors import BadRequest, ProxyError
from ..metrics import note_model
from ..upstream.relay import RelayBody, SSELines, Upstream, answer_text, open_upstream, send_leased

if TYPE_CHECKING:
    from ..config import ModelConfig
    from ..pool import Lease

__all__ = [
    "REQUIRED",
    "SSE_HEADERS",
    "Plan",
    "blueprint",
    "chain_error",
    "error_response",
    "open_relay",
    "parse_body",
    "plan",
    "sse_error",
    "streams",
    "upstream_error_body",
]

blueprint = Blueprint("openai", __name__)

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def error_response(exc: ProxyError) -> Response:
    body = {"error": {"message": exc.message, "type": exc.kind, "code": exc.status}}
    return Response(json.dumps(body), status=exc.status, content_type="application/json")


def sse_error(reason: str) -> bytes:
    """A last SSE event telling a streaming client the answer broke off."""
    body = {"error": {"message": reason, "type": "upstream_error", "code": 502}}
    return b"data: " + json.dumps(body).encode() + b"\n\n"


def upstream_error_body(status: int, body: bytes) -> bytes | None:
    """An upstream's error answer (status 400 or more) as an OpenAI error object; None if it is one already.

    llama-server's errors are OpenAI error objects, passed on as they are; anything else
    (a web server's HTML page, plain text) becomes one, with its text as the message.
    """
    if status < 400:
        return None
    try:
        parsed = json.loads(body)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict) and "error" in parsed:
        return None
    text = answer_text(body)
    message = f"the upstream answered HTTP {status}" + (f": {text}" if text else "")
    return json.dumps({"error": {"message": message, "type": "upstream_error", "code": status}}).encode()


def parse_body(raw: bytes) -> dict:
    """The request's JSON object (decoded by :func:`smart_proxy.jsonbody.decode`), or BadRequest saying what is wrong."""
    payload = jsonbody.decode(raw)
    if not isinstance(payload, dict):
        raise BadRequest("request body must be a JSON object")
    return payload


#: The field each relayed route requires besides ``model``.
REQUIRED = {"/v1/chat/completions": "messages", "/v1/completions": "prompt", "/v1/embeddings": "input"}


class Plan(NamedTuple):
    """What to do with a relayed request: its body, parsed, the model it names, and its agents."""

    payload: dict
    target: ModelConfig
    #: The agents its leading slash commands switch on, or None.
    chain: Chain | None

    @property
    def relayed(self) -> bool:
        """Sent to a llama-server as it came (no agents, no Ollama upstream)."""
        return self.chain is None and self.target.backend != "ollama"


def plan(proxy: ProxyState, path: str, raw: bytes) -> Plan:
    """Check the body of a request to ``path`` (one of :data:`REQUIRED`) and find what serves it.

    Raises:
        BadRequest: the body is not a JSON object, or lacks ``model`` or the route's required field.
        ModelNotFound, ModelNotAllowed: as :meth:`smart_proxy.catalog.Catalog.get`.
    """
    payload = parse_body(raw)
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("missing 'model': name the model to use")
    required = REQUIRED[path]
    if required not in payload:
        raise BadRequest(f"missing {required!r}")
    target = proxy.catalog.get(model)
    note_model(target.name)
    chain = proxy.agents.activate(payload, _AGENT_KINDS[path]) if path in _AGENT_KINDS else None
    return Plan(payload, target, chain)


async def forward(path: str) -> Response:
    """Forward the current request to what serves its model (see :mod:`smart_proxy.direct` for the common case)."""
    raw = await request.get_data(as_text=False)
    proxy = state()
    payload, target, chain = plan(proxy, path, raw)
    if chain is not None:
        return await forward_with_agents(proxy, path, chain)
    if target.backend == "ollama":  # served by an upstream Ollama through its /v1 routes, not the pool
        limit = proxy.config.proxy.max_answer
        return await ollama_backend.forward(proxy.http, target, "POST", path, payload=payload, raw=raw, limit=limit)
    return await send(proxy, path, target.name, raw, stream=payload.get("stream") is True)


async def open_relay(proxy: ProxyState, path: str, model: str, body: bytes) -> tuple[Lease, Upstream]:
    """POST ``body`` to a llama-server for ``model``; its answer's headers are in, and the lease is the caller's."""

    async def send(lease: Lease) -> Upstream:
        url = lease.base_url + path
        return await open_upstream(proxy.llama, "POST", url, content=body, headers=_JSON_HEADERS, lease=lease)

    return await send_leased(lambda: proxy.pool.acquire(model), send)


_JSON_HEADERS = {"Content-Type": "application/json"}


def streams(upstream: Upstream, stream: bool) -> bool:
    """Whether the answer is relayed as a stream (asked for, and the upstream did not answer an error)."""
    return stream and upstream.status_code == 200


async def send(
    proxy: ProxyState, path: str, model: str, body: bytes, *, stream: bool, headers: dict[str, str] | None = None
) -> Response:
    """POST ``body`` to a llama-server for ``model`` and relay its answer (a stream as it arrives)."""
    lease, upstream = await open_relay(proxy, path, model, body)
    limit = proxy.config.proxy.max_answer
    if streams(upstream, stream):
        return Response(
            RelayBody(upstream, on_error=sse_error, on_done=lease.release, lines=SSELines(limit)),
            status=upstream.status_code,
            headers={**upstream.headers, **SSE_HEADERS, **(headers or {})},
        )
    try:
        answer = await upstream.read(limit)
    finally:
        lease.release()
    relayed = upstream.headers
    wrapped = upstream_error_body(upstream.status_code, answer)
    if wrapped is not None:
        answer, relayed["content-type"] = wrapped, "application/json"
    return Response(answer, status=upstream.status_code, headers={**relayed, **(headers or {})})


@blueprint.post("/v1/chat/completions")
async def chat_completions() -> Response:
    return await forward("/v1/chat/completions")


@blueprint.post("/v1/completions")
async def completions() -> Response:
    return await forward("/v1/completions")


@blueprint.post("/v1/embeddings")
async def embeddings() -> Response:
    return await forward("/v1/embeddings")


@blueprint.get("/v1/models")
async def models() -> Response:
    proxy = state()
    loaded = {s.name: s.state.value for s in proxy.pool.servers()}
    data = [
        {
            "id": model.name,
            "object": "model",
            "created": int(time.time()),
            "owned_by": "ollama" if model.backend == "ollama" else "smart-proxy",
            "loaded": loaded.get(model.name) == "ready",
            "state": "upstream" if model.backend == "ollama" else loaded.get(model.name, "stopped"),
        }
        for model in proxy.catalog
    ]
    return Response(json.dumps({"object": "list", "data": data}), content_type="application/json")


# ---- agents: a request that starts with /commands ----------------------------------------

_AGENT_KINDS = {"/v1/chat/completions": "chat", "/v1/completions": "completion"}


async def forward_with_agents(proxy: ProxyState, path: str, chain: Chain) -> Response:
    """Run the chain's hooks around the upstream call; a buffered stream is replayed as SSE.

    A live chain's request goes to the model the hooks left in it, a llama-server or
    an Ollama upstream. Every answer carries the chain's failures (``ctx.headers()``),
    an error answer too.
    """
    ctx = await chain.prepare(
        proxy.pool, proxy.llama, logs.request_id.get(), catalog=proxy.catalog, client=proxy.http
    )
    try:
        if chain.live:
            target = proxy.catalog.get(ctx.model)
            if target.backend == "ollama":
                return await ollama_backend.forward(
                    proxy.http, target, "POST", path, payload=ctx.payload, headers=ctx.headers(),
                    limit=proxy.config.proxy.max_answer,
                )
            body = json.dumps(ctx.payload).encode()
            stream = ctx.payload.get("stream") is True
            return await send(proxy, path, ctx.model, body, stream=stream, headers=ctx.headers())
        response = await chain.respond(ctx)
    except ProxyError as exc:
        if not ctx.failures:
            raise
        return chain_error(exc, ctx)
    if ctx.stream:
        return Response(
            replay_sse(response, ctx.kind),
            headers={"Content-Type": "text/event-stream", **SSE_HEADERS, **ctx.headers()},
        )
    return Response(json.dumps(response), content_type="application/json", headers=ctx.headers())


def chain_error(exc: ProxyError, ctx: AgentContext) -> Response:
    """``exc`` in the caller's dialect, with the chain's failures: they belong on an error answer too."""
    reply = dialect_error(exc, request.path)
    reply.headers.update(ctx.headers())
    return reply


def replay_sse(response: dict, kind: str) -> bytes:
    """A complete chat.completion or text_completion as the SSE stream that would have carried it.

    Per choice, one chunk with all its text and one with its finish_reason; the last
    chunk carries ``usage`` and any extra top-level fields (as llama-server's does),
    then ``data: [DONE]``.
    """
    known = {"id", "object", "created", "model", "choices", "usage", "system_fingerprint"}
    base = {key: response[key] for key in ("id", "created", "model", "system_fingerprint") if key in response}
    base["object"] = "chat.completion.chunk" if kind == "chat" else "text_completion"
    chunks: list[dict] = []
    for choice in response.get("choices") or []:
        index = choice.get("index", 0)
        if kind == "chat":
            message = dict(choice.get("message") or {})
            message.setdefault("role", "assistant")
            if message.get("tool_calls"):
                message["tool_calls"] = [{"index": i, **call} for i, call in enumerate(message["tool_calls"])]
            first = {"index": index, "delta": message, "logprobs": choice.get("logprobs"), "finish_reason": None}
            last = {"index": index, "delta": {}, "finish_reason": choice.get("finish_reason")}
        else:
            text = choice.get("text", "")
            first = {"index": index, "text": text, "logprobs": choice.get("logprobs"), "finish_reason": None}
            last = {"index": index, "text": "", "finish_reason": choice.get("finish_reason")}
        chunks += [{**base, "choices": [first]}, {**base, "choices": [last]}]
    if not chunks:
        chunks.append({**base, "choices": []})
    chunks[-1].update({key: value for key, value in response.items() if key not in known})
    if "usage" in response:
        chunks[-1]["usage"] = response["usage"]
    events = [b"data: " + json.dumps(chunk).encode() + b"\n\n" for chunk in chunks]
    return b"".join(events) + b"data: [DONE]\n\n"
