"""Anthropic's Messages API as bytes and dicts: checks, error objects, SSE framing, and translation to OpenAI chat.

No I/O: :mod:`smart_proxy.handlers.anthropic_routes` reads the request, calls the pool or an
upstream, and uses these to check what came and to shape what goes back.

Theory of operation:

* llama-server answers ``POST /v1/messages`` and ``/v1/messages/count_tokens`` itself, and
  so does Ollama's Anthropic-compatible layer (``/v1/messages``), so a request goes on byte
  for byte. This module checks only what Anthropic requires (a JSON object, ``model``,
  ``messages``, and ``max_tokens`` for a message), writes errors in Anthropic's shape
  (``{"type": "error", "error": {"type", "message"}}``, the type chosen by status as
  Anthropic's API does), and wraps an upstream's error that is not in that shape
  (llama-server answers OpenAI error objects on these routes too).
* Streams: Anthropic's SSE events carry an ``event:`` line, and a stream ends with
  ``message_stop`` (there is no ``data: [DONE]``). :class:`MessageLines` frames a relayed
  stream a line at a time and knows it complete only after ``message_stop`` (or an upstream's
  own ``error`` event); a stream cut short ends with :func:`sse_error`, Anthropic's ``error``
  event, never with what looks like a finished message.
* Agents see OpenAI chat shapes. :func:`to_openai` translates a request there,
  :func:`request_from_openai` brings a request hook's rewritten chat request back (a live
  chain is then relayed natively), and :func:`message_from_openai` turns a buffered chain's
  ``chat.completion`` into an Anthropic message, which :func:`replay_sse` frames as the
  events that would have carried it. The translation follows llama-server's own
  (``convert_anthropic_to_oai`` in its ``server-common.cpp``): system blocks joined, text
  and image blocks as content parts (an image as a ``data:`` URL), ``tool_use`` blocks as
  ``tool_calls`` with their input as a JSON string, each ``tool_result`` block as a ``tool``
  message (before the rest of its user message, which it answers the previous turn of),
  ``thinking`` as ``reasoning_content``.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from .. import jsonbody
from ..errors import BadRequest, ProxyError
from ..upstream.relay import SSELines, answer_text

__all__ = [
    "COUNT_TOKENS",
    "MESSAGES",
    "ROUTES",
    "SSE_HEADERS",
    "MessageLines",
    "check_request",
    "error_body",
    "error_object",
    "error_type",
    "is_anthropic_route",
    "message_from_openai",
    "parse_body",
    "replay_sse",
    "request_from_openai",
    "sse_error",
    "sse_event",
    "to_openai",
    "upstream_error_body",
]

MESSAGES = "/v1/messages"
COUNT_TOKENS = "/v1/messages/count_tokens"
#: The model routes of this dialect.
ROUTES = (MESSAGES, COUNT_TOKENS)
#: Headers every relayed or replayed stream carries: no caching, and no buffering by nginx.
SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}

#: Anthropic's error type for each HTTP status (its API's error page and SDK's ``ErrorType``).
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
    504: "timeout_error",
    529: "overloaded_error",
}
#: OpenAI's finish_reason -> Anthropic's stop_reason.
STOP_REASONS = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}
#: Anthropic's stop_reason -> OpenAI's finish_reason (for a request hook that reads one back).
FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
    "pause_turn": "stop",
}
#: Request fields :func:`to_openai` translates (and :func:`request_from_openai` writes back).
_TRANSLATED = frozenset(
    {"model", "messages", "system", "max_tokens", "temperature", "top_p", "top_k", "stop_sequences", "stream",
     "tools", "tool_choice"}
)  # fmt: skip
#: OpenAI request fields :func:`request_from_openai` maps back, and so does not copy as they are.
_OPENAI_MAPPED = frozenset(
    {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "stop", "stream",
     "stream_options", "tools", "tool_choice", "parallel_tool_calls"}
)  # fmt: skip
#: chat.completion fields with a place in an Anthropic message; the rest are kept as they are.
_COMPLETION_FIELDS = frozenset({"id", "object", "created", "model", "choices", "usage", "system_fingerprint", "timings"})


def is_anthropic_route(path: str) -> bool:
    """Whether ``path`` is one of Anthropic's (``/v1/messages`` and below it): errors there are in its shape."""
    return path == MESSAGES or path.startswith(MESSAGES + "/")


# ---- errors -------------------------------------------------------------------------------


def error_type(status: int) -> str:
    """Anthropic's error type for ``status``: its own table, else invalid_request_error for a 4xx, api_error for the rest."""
    return ERROR_TYPES.get(status) or ("invalid_request_error" if 400 <= status < 500 else "api_error")


def error_object(status: int, message: str, request_id: str | None = None) -> dict[str, Any]:
    """An error as Anthropic answers one, with ``request_id`` when there is one."""
    body: dict[str, Any] = {"type": "error", "error": {"type": error_type(status), "message": message}}
    if request_id is not None:
        body["request_id"] = request_id
    return body


def error_body(exc: ProxyError, request_id: str | None = None) -> bytes:
    """``exc`` as Anthropic's error object."""
    return json.dumps(error_object(exc.status, exc.message, request_id)).encode()


def sse_event(name: str, data: dict[str, Any]) -> bytes:
    """One SSE event as Anthropic frames them: an ``event:`` line naming its type, then its data."""
    return b"event: " + name.encode() + b"\ndata: " + json.dumps(data).encode() + b"\n\n"


def sse_error(reason: str) -> bytes:
    """The last SSE event of a stream that broke off: Anthropic's ``error`` event (never a ``message_stop``)."""
    return sse_event("error", {"type": "error", "error": {"type": "api_error", "message": reason}})


def _is_anthropic_error(parsed: object) -> bool:
    if not isinstance(parsed, dict) or parsed.get("type") != "error":
        return False
    error = parsed.get("error")
    return isinstance(error, dict) and isinstance(error.get("type"), str) and isinstance(error.get("message"), str)


def upstream_error_body(status: int, body: bytes) -> bytes | None:
    """An upstream's error answer (status 400 or more) in Anthropic's shape; None if it is in that shape already.

    llama-server's OpenAI error object (``{"error": {"message": ...}}``) and Ollama's
    ``{"error": "..."}`` keep their message; anything else (an HTML page, plain text)
    becomes a message quoting its text. The status is kept, and picks the type.
    """
    if status < 400:
        return None
    try:
        parsed = json.loads(body)
    except ValueError:
        parsed = None
    if _is_anthropic_error(parsed):
        return None
    message = None
    if isinstance(parsed, dict):
        error = parsed.get("error")
        message = error.get("message") if isinstance(error, dict) else error
    if not isinstance(message, str) or not message:
        text = answer_text(body)
        message = f"the upstream answered HTTP {status}" + (f": {text}" if text else "")
    return json.dumps(error_object(status, message)).encode()


# ---- requests -----------------------------------------------------------------------------


def parse_body(raw: bytes) -> dict[str, Any]:
    """The request's JSON object (decoded by :func:`smart_proxy.jsonbody.decode`), or BadRequest saying what is wrong."""
    payload = jsonbody.decode(raw)
    if not isinstance(payload, dict):
        raise BadRequest("request body must be a JSON object")
    return payload


def _check_blocks(where: str, content: object) -> None:
    if isinstance(content, str):
        return
    if not isinstance(content, list):
        raise BadRequest(f"{where}: must be a string or a list of content blocks")
    for index, block in enumerate(content):
        if not isinstance(block, dict) or not isinstance(block.get("type"), str):
            raise BadRequest(f"{where}.{index}: a content block must be an object with a 'type'")


def check_request(path: str, payload: dict[str, Any]) -> str:
    """The model a request to ``path`` (one of :data:`ROUTES`) names, once its body has what Anthropic requires.

    Both routes need ``model`` and a non-empty ``messages`` list of ``user`` and
    ``assistant`` messages whose ``content`` is a string or a list of typed blocks;
    ``/v1/messages`` also needs ``max_tokens``, a positive integer. ``system``,
    ``tools`` and ``stream`` must have their types when present.

    Raises:
        BadRequest: saying which field is wrong, as Anthropic's API does (``max_tokens: Field required``).
    """
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("model: Field required (a non-empty string naming the model)")
    messages = payload.get("messages")
    if not isinstance(messages, list):
        raise BadRequest("messages: Field required (a list of messages)")
    if not messages:
        raise BadRequest("messages: at least one message is required")
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise BadRequest(f"messages.{index}: must be an object with 'role' and 'content'")
        if message.get("role") not in ("user", "assistant"):
            raise BadRequest(f"messages.{index}.role: must be 'user' or 'assistant'")
        if "content" not in message:
            raise BadRequest(f"messages.{index}.content: Field required")
        _check_blocks(f"messages.{index}.content", message["content"])
    if path == MESSAGES:
        max_tokens = payload.get("max_tokens")
        if "max_tokens" not in payload:
            raise BadRequest("max_tokens: Field required")
        if type(max_tokens) is not int or max_tokens < 1:
            raise BadRequest("max_tokens: must be an integer of at least 1")
    if "system" in payload:
        _check_blocks("system", payload["system"])
    tools = payload.get("tools")
    if tools is not None and (not isinstance(tools, list) or not all(isinstance(tool, dict) for tool in tools)):
        raise BadRequest("tools: must be a list of tool objects")
    if "stream" in payload and not isinstance(payload["stream"], bool):
        raise BadRequest("stream: must be a boolean")
    return model


def _text(value: object) -> str:
    """The text of a string, or of the text blocks of a block list, joined as llama-server joins them."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "".join(
            block["text"]
            for block in value
            if isinstance(block, dict) and block.get("type") == "text" and isinstance(block.get("text"), str)
        )
    return ""


def _image_url(source: object) -> str:
    if isinstance(source, dict):
        if source.get("type") == "base64" and isinstance(source.get("data"), str):
            media_type = source.get("media_type") if isinstance(source.get("media_type"), str) else "image/jpeg"
            return f"data:{media_type};base64,{source['data']}"
        if source.get("type") == "url" and isinstance(source.get("url"), str):
            return source["url"]
    kind = source.get("type") if isinstance(source, dict) else None
    raise BadRequest(f"image source {kind!r} is not supported here: send base64 data or a url")


def _arguments(value: object) -> str:
    return json.dumps(value if isinstance(value, dict) else {})


def _openai_messages(message: dict[str, Any]) -> list[dict[str, Any]]:
    """One Anthropic message as OpenAI chat messages: its tool results first, then the message itself."""
    role, content = message["role"], message["content"]
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    parts: list[dict[str, Any]] = []
    calls: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []
    reasoning = ""
    for block in content:
        kind = block["type"]
        if kind == "text":
            parts.append({"type": "text", "text": block.get("text") if isinstance(block.get("text"), str) else ""})
        elif kind == "image":
            parts.append({"type": "image_url", "image_url": {"url": _image_url(block.get("source"))}})
        elif kind == "tool_use":
            name = block.get("name") if isinstance(block.get("name"), str) else ""
            function = {"name": name, "arguments": _arguments(block.get("input"))}
            calls.append({"id": str(block.get("id") or f"toolu_{len(calls)}"), "type": "function", "function": function})
        elif kind == "tool_result":
            result = {"role": "tool", "tool_call_id": str(block.get("tool_use_id") or ""), "content": _text(block.get("content"))}
            results.append(result)
        elif kind == "thinking" and isinstance(block.get("thinking"), str):
            reasoning += block["thinking"]
    out: dict[str, Any] = {"role": role}
    if role == "assistant":
        out["content"] = "".join(part["text"] for part in parts if part["type"] == "text")
        keep = bool(out["content"] or calls or reasoning)
    else:
        out["content"] = parts
        keep = bool(parts)
    if calls:
        out["tool_calls"] = calls
    if reasoning:
        out["reasoning_content"] = reasoning
    return [*results, out] if keep else results


def _openai_tool(tool: dict[str, Any]) -> dict[str, Any]:
    function = {"name": tool.get("name", ""), "parameters": tool.get("input_schema") or {"type": "object"}}
    if "description" in tool:
        function["description"] = tool["description"]
    return {"type": "function", "function": function}


def _openai_tool_choice(choice: object) -> object:
    if not isinstance(choice, dict):
        return None
    kind = choice.get("type")
    if kind == "tool" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    return {"auto": "auto", "any": "required", "none": "none"}.get(kind)  # type: ignore[arg-type]


def to_openai(payload: dict[str, Any]) -> dict[str, Any]:
    """A checked Anthropic request (:func:`check_request`) as an OpenAI chat request, for agents.

    Fields without an OpenAI counterpart (``thinking``, ``metadata``, ...) are left out;
    :func:`request_from_openai` takes them from the original again.

    Raises:
        BadRequest: an image whose source is neither base64 data nor a URL.
    """
    messages: list[dict[str, Any]] = []
    system = _text(payload.get("system"))
    if system:
        messages.append({"role": "system", "content": system})
    for message in payload["messages"]:
        messages += _openai_messages(message)
    body: dict[str, Any] = {"model": payload["model"], "messages": messages}
    for field in ("max_tokens", "temperature", "top_p", "top_k", "stream"):
        if field in payload:
            body[field] = payload[field]
    if "stop_sequences" in payload:
        body["stop"] = payload["stop_sequences"]
    if payload.get("tools"):
        body["tools"] = [_openai_tool(tool) for tool in payload["tools"]]
    choice = payload.get("tool_choice")
    translated = _openai_tool_choice(choice)
    if translated is not None:
        body["tool_choice"] = translated
        if isinstance(choice, dict) and choice.get("disable_parallel_tool_use") is True:
            body["parallel_tool_calls"] = False
    return body


def _blocks(content: object) -> list[dict[str, Any]]:
    """OpenAI message content (a string or parts) as Anthropic blocks."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    blocks: list[dict[str, Any]] = []
    for part in content if isinstance(content, list) else []:
        if not isinstance(part, dict):
            continue
        if part.get("type") == "text" and isinstance(part.get("text"), str):
            blocks.append({"type": "text", "text": part["text"]})
        elif part.get("type") == "image_url":
            url = (part.get("image_url") or {}).get("url") if isinstance(part.get("image_url"), dict) else None
            if isinstance(url, str):
                blocks.append({"type": "image", "source": _image_source(url)})
    return blocks


def _image_source(url: str) -> dict[str, Any]:
    head, comma, data = url.partition(",")
    if url.startswith("data:") and comma and head.endswith(";base64"):
        return {"type": "base64", "media_type": head[len("data:") : -len(";base64")], "data": data}
    return {"type": "url", "url": url}


def _tool_use(call: object, index: int) -> dict[str, Any] | None:
    if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
        return None
    function = call["function"]
    arguments = function.get("arguments")
    try:
        tool_input = json.loads(arguments) if isinstance(arguments, str) else arguments
    except ValueError:
        tool_input = None
    name = function.get("name") if isinstance(function.get("name"), str) else ""
    block_id = call.get("id") if isinstance(call.get("id"), str) and call.get("id") else f"toolu_{index}"
    return {"type": "tool_use", "id": block_id, "name": name, "input": tool_input if isinstance(tool_input, dict) else {}}


def request_from_openai(body: dict[str, Any], original: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI chat request (an agent's rewrite of :func:`to_openai`'s) as an Anthropic request again.

    What ``original`` holds that the translation does not touch (``thinking``, ``metadata``,
    fields this proxy does not know) is kept as it was; OpenAI fields with no Anthropic
    counterpart that a hook added are passed on as they are. System messages become
    ``system``; ``tool`` messages become ``tool_result`` blocks at the head of the next user
    message (one of their own if none follows).
    """
    out = {key: value for key, value in original.items() if key not in _TRANSLATED}
    out.update({key: value for key, value in body.items() if key not in _OPENAI_MAPPED and key not in out})
    system: list[str] = []
    messages: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []
    for message in body.get("messages") or []:
        if not isinstance(message, dict):
            continue
        role = message.get("role")
        if role in ("system", "developer"):
            system.append(_text(message.get("content")))
        elif role == "tool":
            results.append({"type": "tool_result", "tool_use_id": str(message.get("tool_call_id") or ""),
                            "content": _text(message.get("content"))})  # fmt: skip
        elif role == "user":
            content = message.get("content")
            if results:
                messages.append({"role": "user", "content": [*results, *_blocks(content)]})
                results = []
            else:
                messages.append({"role": "user", "content": content if isinstance(content, str) else _blocks(content)})
        elif role == "assistant":
            if results:
                messages.append({"role": "user", "content": results})
                results = []
            blocks: list[dict[str, Any]] = []
            if isinstance(message.get("reasoning_content"), str) and message["reasoning_content"]:
                blocks.append({"type": "thinking", "thinking": message["reasoning_content"], "signature": ""})
            blocks += _blocks(message.get("content"))
            calls = message.get("tool_calls")
            blocks += [b for i, call in enumerate(calls if isinstance(calls, list) else []) if (b := _tool_use(call, i))]
            messages.append({"role": "assistant", "content": blocks})
    if results:
        messages.append({"role": "user", "content": results})
    out["model"] = body.get("model", original.get("model"))
    out["messages"] = messages
    if system:
        out["system"] = "\n\n".join(text for text in system if text)
    max_tokens = body.get("max_tokens", body.get("max_completion_tokens", original.get("max_tokens")))
    if max_tokens is not None:
        out["max_tokens"] = max_tokens
    for field in ("temperature", "top_p", "top_k", "stream"):
        if field in body:
            out[field] = body[field]
    stop = body.get("stop")
    if stop is not None:
        out["stop_sequences"] = [stop] if isinstance(stop, str) else stop
    tools = body.get("tools")
    if isinstance(tools, list) and tools:
        out["tools"] = [_anthropic_tool(tool) for tool in tools if isinstance(tool, dict)]
    choice = _anthropic_tool_choice(body.get("tool_choice"), body.get("parallel_tool_calls"))
    if choice is not None:
        out["tool_choice"] = choice
    return out


def _anthropic_tool(tool: dict[str, Any]) -> dict[str, Any]:
    function = tool.get("function") if isinstance(tool.get("function"), dict) else {}
    out = {"name": function.get("name", ""), "input_schema": function.get("parameters") or {"type": "object"}}
    if "description" in function:
        out["description"] = function["description"]
    return out


def _anthropic_tool_choice(choice: object, parallel: object) -> dict[str, Any] | None:
    if isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        out: dict[str, Any] = {"type": "tool", "name": choice["function"].get("name", "")}
    elif isinstance(choice, str) and choice in ("auto", "required", "none"):
        out = {"type": {"auto": "auto", "required": "any", "none": "none"}[choice]}
    else:
        return None
    if parallel is False and out["type"] != "none":
        out["disable_parallel_tool_use"] = True
    return out


# ---- answers ------------------------------------------------------------------------------


def message_from_openai(response: dict[str, Any], model: str) -> dict[str, Any]:
    """A ``chat.completion`` (its first choice) as an Anthropic message, as llama-server would have answered it.

    Blocks in llama-server's order: ``thinking`` (from ``reasoning_content``), ``text``,
    then one ``tool_use`` per tool call. ``usage`` counts cached prompt tokens apart
    (``cache_read_input_tokens``), as llama-server's does. Fields of the response with no
    place in a message (an agent's report) are kept at its top level.
    """
    choices = response.get("choices")
    choice = choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], dict) else {}
    message = choice.get("message") if isinstance(choice.get("message"), dict) else {}
    content: list[dict[str, Any]] = []
    reasoning = message.get("reasoning_content")
    if isinstance(reasoning, str) and reasoning:
        content.append({"type": "thinking", "thinking": reasoning, "signature": ""})
    content += _blocks(message.get("content"))
    calls = message.get("tool_calls")
    content += [block for i, call in enumerate(calls if isinstance(calls, list) else []) if (block := _tool_use(call, i))]
    finish = choice.get("finish_reason")
    stop_reason = STOP_REASONS.get(finish, "end_turn") if isinstance(finish, str) else "end_turn"
    if stop_reason == "end_turn" and any(block["type"] == "tool_use" for block in content):
        stop_reason = "tool_use"
    usage = response.get("usage") if isinstance(response.get("usage"), dict) else {}
    details = usage.get("prompt_tokens_details") if isinstance(usage.get("prompt_tokens_details"), dict) else {}
    prompt, cached = _count(usage.get("prompt_tokens")), _count(details.get("cached_tokens"))
    answer_model = response.get("model") if isinstance(response.get("model"), str) else model
    answer_id = response.get("id") if isinstance(response.get("id"), str) else f"msg_{uuid.uuid4().hex[:24]}"
    return {
        **{key: value for key, value in response.items() if key not in _COMPLETION_FIELDS},
        "id": answer_id,
        "type": "message",
        "role": "assistant",
        "content": content,
        "model": answer_model,
        "stop_reason": stop_reason,
        "stop_sequence": None,
        "usage": {
            "cache_read_input_tokens": cached,
            "input_tokens": max(prompt - cached, 0),
            "output_tokens": _count(usage.get("completion_tokens")),
        },
    }


def _count(value: object) -> int:
    return value if type(value) is int and value >= 0 else 0


def replay_sse(message: dict[str, Any]) -> bytes:
    """A complete Anthropic message as the SSE events that would have carried it.

    ``message_start`` (the message with no content and no stop reason yet), then per block
    ``content_block_start``, one ``content_block_delta`` with all of its text
    (``text_delta``), thinking (``thinking_delta``, then its ``signature_delta``) or input
    (``input_json_delta``), and ``content_block_stop``; then ``message_delta`` with the
    stop reason and output tokens, and ``message_stop``.
    """
    usage = message.get("usage") if isinstance(message.get("usage"), dict) else {}
    start = {**message, "content": [], "stop_reason": None, "stop_sequence": None, "usage": {**usage, "output_tokens": 0}}
    events = [sse_event("message_start", {"type": "message_start", "message": start})]
    for index, block in enumerate(message.get("content") or []):
        kind = block.get("type")
        deltas: list[dict[str, Any]] = []
        if kind == "text":
            first = {"type": "text", "text": ""}
            deltas.append({"type": "text_delta", "text": block.get("text", "")})
        elif kind == "thinking":
            first = {"type": "thinking", "thinking": "", "signature": ""}
            deltas.append({"type": "thinking_delta", "thinking": block.get("thinking", "")})
            deltas.append({"type": "signature_delta", "signature": block.get("signature", "")})
        elif kind == "tool_use":
            first = {"type": "tool_use", "id": block.get("id"), "name": block.get("name"), "input": {}}
            deltas.append({"type": "input_json_delta", "partial_json": json.dumps(block.get("input") or {})})
        else:
            first = block
        events.append(sse_event("content_block_start", {"type": "content_block_start", "index": index, "content_block": first}))
        for delta in deltas:
            events.append(sse_event("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta}))
        events.append(sse_event("content_block_stop", {"type": "content_block_stop", "index": index}))
    stop = {"stop_reason": message.get("stop_reason"), "stop_sequence": message.get("stop_sequence")}
    events.append(sse_event("message_delta", {"type": "message_delta", "delta": stop,
                                              "usage": {"output_tokens": usage.get("output_tokens", 0)}}))  # fmt: skip
    events.append(sse_event("message_stop", {"type": "message_stop"}))
    return b"".join(events)


class MessageLines(SSELines):
    """An Anthropic SSE stream, relayed a line at a time: complete once its last event is ``message_stop``.

    An upstream's own ``error`` event ends a stream too (it tells the client already, so no
    second one follows). The last event is read from each ``event:`` line passed on.
    """

    __slots__ = ("_event",)

    def __init__(self, limit: int) -> None:
        super().__init__(limit)
        self._event = b""

    def feed(self, data: bytes) -> bytes:
        out = super().feed(data)
        self._note(out)
        return out

    def rest(self) -> bytes:
        out = super().rest()
        self._note(out)
        return out

    def _note(self, out: bytes) -> None:
        """Remember the name on the last ``event:`` line of what is passed on."""
        start = out.rfind(b"event:")
        while start > 0 and out[start - 1] not in b"\r\n":  # only at the start of a line
            start = out.rfind(b"event:", 0, start)
        if start >= 0:
            end = out.find(b"\n", start)
            self._event = out[start + len(b"event:") : end if end >= 0 else len(out)].strip()

    @property
    def done(self) -> bool:
        return self._event in (b"message_stop", b"error")
