"""OpenAI's API over the pool: chat and text completions, embeddings, models.

Bodies are forwarded unchanged; llama-server is started with ``--alias NAME``
so the ``model`` it reports is already the name the client asked for.
"""

from __future__ import annotations

import json
import time

from quart import Blueprint, Response, request

from ..app import state
from ..errors import BadRequest, ProxyError
from ..relay import RelayBody, open_upstream

__all__ = ["blueprint", "error_response", "parse_body"]

blueprint = Blueprint("openai", __name__)

_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def error_response(exc: ProxyError) -> Response:
    body = {"error": {"message": exc.message, "type": exc.kind, "code": exc.status}}
    return Response(json.dumps(body), status=exc.status, content_type="application/json")


def sse_error(reason: str) -> bytes:
    """A last SSE event telling a streaming client the answer broke off."""
    body = {"error": {"message": reason, "type": "upstream_error", "code": 502}}
    return b"data: " + json.dumps(body).encode() + b"\n\n"


def parse_body(raw: bytes) -> dict:
    """The request's JSON object, or BadRequest saying what is wrong with it."""
    try:
        payload = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise BadRequest("request body must be a JSON object")
    return payload


async def forward(path: str, required: str) -> Response:
    """Forward the current request to a llama-server for its model."""
    raw = await request.get_data(as_text=False)
    payload = parse_body(raw)
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("missing 'model': name the model to use")
    if required not in payload:
        raise BadRequest(f"missing {required!r}")
    proxy = state()
    lease = await proxy.pool.acquire(model)
    try:
        upstream = await open_upstream(
            proxy.http,
            "POST",
            lease.base_url + path,
            content=raw,
            headers={"Content-Type": "application/json"},
            slots=lease.server.limiter,
        )
    except BaseException:
        lease.release()
        raise
    if payload.get("stream") is True and upstream.status_code == 200:
        return Response(
            RelayBody(upstream, on_error=sse_error, on_done=lease.release),
            status=upstream.status_code,
            headers={**upstream.headers, **_SSE_HEADERS},
        )
    try:
        body = await upstream.read()
    finally:
        lease.release()
    return Response(body, status=upstream.status_code, headers=upstream.headers)


@blueprint.post("/v1/chat/completions")
async def chat_completions() -> Response:
    return await forward("/v1/chat/completions", "messages")


@blueprint.post("/v1/completions")
async def completions() -> Response:
    return await forward("/v1/completions", "prompt")


@blueprint.post("/v1/embeddings")
async def embeddings() -> Response:
    return await forward("/v1/embeddings", "input")


@blueprint.get("/v1/models")
async def models() -> Response:
    proxy = state()
    loaded = {s.name: s.state.value for s in proxy.pool.servers()}
    data = [
        {
            "id": model.name,
            "object": "model",
            "created": int(time.time()),
            "owned_by": "smart-proxy",
            "loaded": loaded.get(model.name) == "ready",
            "state": loaded.get(model.name, "stopped"),
        }
        for model in proxy.catalog
    ]
    return Response(json.dumps({"object": "list", "data": data}), content_type="application/json")
