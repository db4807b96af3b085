"""OpenAI's API as bytes: request checks, error objects, SSE framing of errors and of whole answers.

No I/O: :mod:`smart_proxy.handlers.openai_routes` reads the request, calls the pool or an
upstream, and uses these to check what came and to shape what goes back. Bodies are
forwarded unchanged (llama-server speaks this dialect natively), so this module only
checks what it must (a JSON object, ``model``, the route's required field; whether a chat
carries images, which only a model with a projector takes), wraps an
upstream's error that is not an OpenAI error object, and replays a whole answer as the
SSE stream that would have carried it (for an agent chain that buffered the answer).
A request may name the context it needs in a top-level ``num_ctx`` (our extension, the
name Ollama's option has; llama-server ignores the field, so it is forwarded as it is):
:func:`requested_context` checks it for the pool.
``/v1/models`` entries carry a ``status`` object shaped like llama-server's router mode's
(:func:`status_object`), and ``?status=`` filters them (:func:`status_filter`).
"""

from __future__ import annotations

import json

from .. import jsonbody
from ..errors import BadRequest, ProxyError
from ..pool import STATUS_VALUES, ModelStatus
from ..upstream.relay import answer_text

__all__ = [
    "ALIASES",
    "REQUIRED",
    "SSE_HEADERS",
    "MAX_NUM_CTX",
    "error_body",
    "has_images",
    "num_ctx_value",
    "parse_body",
    "requested_context",
    "replay_sse",
    "required_field",
    "sse_error",
    "status_filter",
    "status_object",
    "upstream_error_body",
]

#: Headers every relayed SSE stream carries: no caching, and no buffering by nginx.
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
#: The field each model route requires besides ``model``.
REQUIRED = {"/v1/chat/completions": "messages", "/v1/completions": "prompt", "/v1/embeddings": "input"}
#: Paths without the ``/v1`` prefix, as llama-server serves them, and the route each stands for.
ALIASES = {"/chat/completions": "/v1/chat/completions", "/completions": "/v1/completions", "/embeddings": "/v1/embeddings"}
#: The routes whose requests agents may take, and the kind of request each is to them.
AGENT_KINDS = {"/v1/chat/completions": "chat", "/v1/completions": "completion"}


def error_body(exc: ProxyError) -> bytes:
    """``exc`` as an OpenAI error object."""
    return json.dumps({"error": {"message": exc.message, "type": exc.kind, "code": exc.status}}).encode()


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


def required_field(path: str, payload: dict) -> str:
    """The model ``payload`` names for the model route ``path`` (one of :data:`REQUIRED`).

    Raises:
        BadRequest: no ``model``, or no field the route requires.
    """
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("missing 'model': name the model to use")
    required = REQUIRED[path]
    if required not in payload:
        raise BadRequest(f"missing {required!r}")
    return model


#: The largest ``num_ctx`` taken: llama.cpp's context sizes are 32-bit signed integers.
MAX_NUM_CTX = 2**31 - 1


def num_ctx_value(value: object, field: str) -> int | None:
    """A request's context size (``field`` names it in the message): None if absent, else a positive integer.

    A whole float (``8192.0``) is taken as that integer, as JSON numbers from some clients are.

    Raises:
        BadRequest: not a number, not whole, less than 1, or more than :data:`MAX_NUM_CTX`.
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadRequest(f"{field} must be an integer (tokens of context), not {value!r}")
    if isinstance(value, float) and not value.is_integer():
        raise BadRequest(f"{field} must be an integer (tokens of context), not {value!r}")
    if not 1 <= value <= MAX_NUM_CTX:
        raise BadRequest(f"{field} must be between 1 and {MAX_NUM_CTX} (tokens of context), not {value!r}")
    return int(value)


def requested_context(payload: dict) -> int | None:
    """The context the request asks its llama-server for: its top-level ``num_ctx``, or None.

    Raises:
        BadRequest: see :func:`num_ctx_value`.
    """
    return num_ctx_value(payload.get("num_ctx"), "num_ctx")


def has_images(payload: dict) -> bool:
    """Whether a chat body's messages carry images: ``image_url`` parts in a message's ``content`` list."""
    messages = payload.get("messages")
    if not isinstance(messages, list):
        return False
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list) and any(
            isinstance(part, dict) and part.get("type") == "image_url" for part in content
        ):
            return True
    return False


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


def status_filter(values: list[str]) -> frozenset[str] | None:
    """The statuses ``GET /v1/models?status=...`` asks for (each value comma-separated); None for all.

    Raises:
        BadRequest: an empty or unknown value (the message lists the known ones).
    """
    if not values:
        return None
    wanted = [part.strip() for value in values for part in value.split(",")]
    unknown = [part for part in wanted if part not in STATUS_VALUES]
    if unknown:
        raise BadRequest(
            f"status: unknown value {unknown[0]!r}; give one or more of {', '.join(STATUS_VALUES)}, comma-separated"
        )
    return frozenset(wanted)


def status_object(status: ModelStatus) -> dict:
    """A model's ``status`` in the model list: llama-server router mode's ``value`` (and its
    ``failed``/``exit_code`` for a failure), with ``progress`` for a download or a load and the
    ``error`` and its time (``failed_at``, seconds since the epoch) for a failure."""
    body: dict = {"value": status.value}
    download = status.download
    if download is not None:
        total = download.bytes_total
        body["progress"] = {
            "stage": download.state,  # resolving, downloading or verifying
            "done": download.bytes_done,
            "total": total,
            "percent": round(100 * download.bytes_done / total, 1) if total else None,
            "elapsed": download.elapsed,
            "files": list(download.files),
        }
    if status.loading_for is not None:
        body["progress"] = {"elapsed": status.loading_for, "timeout": status.load_timeout}
    if status.value == "failed":
        body["failed"] = True
        if status.exit_code is not None:
            body["exit_code"] = status.exit_code
        body["error"] = status.error
        body["failed_at"] = status.failed_at
    return body
