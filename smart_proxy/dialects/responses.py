"""OpenAI's Responses API as bytes and dicts: request checks, translation to and from chat, SSE framing.

No I/O: :mod:`smart_proxy.handlers.responses_routes` reads the request and calls the pool
or an upstream. llama-server and Ollama both serve ``POST /v1/responses`` natively, so a
request without agent commands is relayed byte for byte and this module only checks what
it must (a JSON object naming ``model`` and carrying ``input``) and judges whether a relayed
stream ended as a complete one does (:class:`ResponsesLines`).

A Responses stream carries named events (``event: response.output_text.delta`` and a
``data:`` object whose ``type`` is the same name) and has no ``data: [DONE]``: it is complete
once a terminal event came, ``response.completed``, ``response.incomplete`` or
``response.failed`` (or an ``error`` event, the upstream's own report of failure). A stream
cut short before any of them gets an ``error`` event and, if the response's id is known from
its ``response.created`` event, a ``response.failed`` event too, so no client mistakes it for
a finished answer.

Agents see OpenAI chat shapes. :func:`to_chat` translates a Responses request to a chat
completion request the way llama-server does (``server_chat_convert_responses_to_chatcmpl``):
``instructions`` become a system message, ``input`` (a string, or a list of message,
function_call, function_call_output and reasoning items) becomes ``messages``,
``max_output_tokens`` becomes ``max_tokens``, function tools are nested under ``function``;
other fields go on as they are. :func:`from_chat` makes a Response object of the
``chat.completion`` the chain ends with, and :func:`replay_sse` the event sequence a
streaming client expects (``response.created``, ``response.in_progress``,
``response.output_item.added``, ``response.content_part.added``,
``response.output_text.delta``, ... ``response.completed``).
"""

from __future__ import annotations

import json
import re
import time
import uuid
from typing import Any

from ..errors import BadRequest
from ..upstream.relay import SSELines

__all__ = [
    "TERMINAL",
    "ResponsesLines",
    "error_events",
    "from_chat",
    "model_of",
    "replay_sse",
    "sse_event",
    "to_chat",
    "user_text",
]

#: The events that end a Responses stream.
TERMINAL = frozenset({"response.completed", "response.incomplete", "response.failed", "error"})
_EVENT = re.compile(rb"^event:[ \t]*([^\r\n]*)", re.M)
_DATA = re.compile(rb"^data:[ \t]?([^\r\n]*)", re.M)


def model_of(payload: dict) -> str:
    """The model a Responses request names.

    Raises:
        BadRequest: no ``model``, or no ``input``.
    """
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("missing 'model': name the model to use")
    if "input" not in payload:
        raise BadRequest("missing 'input'")
    return model


# ---- the request, as agents see it ----------------------------------------------------------


def user_text(payload: dict) -> str | None:
    """The text slash commands are read from: ``input`` itself, or the last user message's first text part."""
    value = payload.get("input")
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        return None
    for item in reversed(value):
        if isinstance(item, dict) and item.get("role") == "user" and item.get("type", "message") == "message":
            content = item.get("content")
            if isinstance(content, str):
                return content
            if isinstance(content, list):
                for part in content:
                    if isinstance(part, dict) and part.get("type") == "input_text" and isinstance(part.get("text"), str):
                        return part["text"]
            return None
    return None


def _text_part(text: object, what: str) -> dict:
    if not isinstance(text, str):
        raise BadRequest(f"{what} needs a string 'text'")
    return {"type": "text", "text": text}


def _image_part(part: dict) -> dict:
    url = part.get("image_url")
    if not isinstance(url, str):
        raise BadRequest("an 'input_image' part needs a string 'image_url' (a URL or a data: URL)")
    image: dict[str, Any] = {"url": url}
    if isinstance(part.get("detail"), str):
        image["detail"] = part["detail"]
    return {"type": "image_url", "image_url": image}


def _input_content(content: list) -> list[dict]:
    parts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "input_text":
            parts.append(_text_part(part.get("text"), "an 'input_text' part"))
        elif kind == "input_image":
            parts.append(_image_part(part))
        elif kind == "input_file":
            raise BadRequest("'input_file' content is not supported")
        else:
            raise BadRequest("a message's content parts must be 'input_text', 'input_image' or 'input_file'")
    return parts


def _output_content(content: object) -> list[dict]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        return []
    parts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("output_text", "input_text"):
            parts.append(_text_part(part.get("text"), f"an {kind!r} part"))
        elif kind == "refusal" and isinstance(part.get("refusal"), str):
            parts.append({"type": "refusal", "refusal": part["refusal"]})
        else:
            raise BadRequest("an assistant message's content parts must be 'output_text' or 'refusal'")
    return parts


def _tool_output(output: object) -> object:
    if isinstance(output, str):
        return output
    parts = []
    for part in output:  # type: ignore[union-attr]
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "input_text":
            parts.append(_text_part(part.get("text"), "an 'input_text' part"))
        elif kind == "input_image":
            parts.append(_image_part(part))
        else:
            raise BadRequest("a function_call_output's parts must be 'input_text' or 'input_image'")
    return parts


def _messages(value: object) -> list[dict]:
    """``input`` as chat messages (see the module docstring)."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list):
        raise BadRequest("'input' must be a string or a list of items")
    messages: list[dict] = []
    for item in value:
        if not isinstance(item, dict):
            raise BadRequest("every item of 'input' must be an object")
        follows_assistant = bool(messages) and messages[-1].get("role") == "assistant"
        role, kind = item.get("role"), item.get("type")
        if role in ("user", "system", "developer") and kind in (None, "message"):
            content = item.get("content")
            if isinstance(content, str):
                content = [{"type": "input_text", "text": content}]
            if not isinstance(content, list):
                raise BadRequest(f"a {role} message's 'content' must be a string or a list of parts")
            messages.append({"role": "system" if role == "developer" else role, "content": _input_content(content)})
        elif role == "assistant" and kind in (None, "message"):
            parts = _output_content(item.get("content"))
            if follows_assistant and isinstance(messages[-1].get("content"), list):
                messages[-1]["content"] = [*messages[-1]["content"], *parts]
            else:
                messages.append({"role": "assistant", "content": parts})
        elif kind == "function_call":
            fields = (item.get("call_id"), item.get("name"), item.get("arguments"))
            if not all(isinstance(field, str) for field in fields):
                raise BadRequest("a 'function_call' item needs string 'call_id', 'name' and 'arguments'")
            call = {"id": item["call_id"], "type": "function", "function": {"name": item["name"], "arguments": item["arguments"]}}
            if follows_assistant:
                messages[-1]["tool_calls"] = [*messages[-1].get("tool_calls", []), call]
            else:
                messages.append({"role": "assistant", "tool_calls": [call]})
        elif kind == "function_call_output":
            if not isinstance(item.get("call_id"), str) or not isinstance(item.get("output"), (str, list)):
                raise BadRequest("a 'function_call_output' item needs a string 'call_id' and an 'output'")
            messages.append({"role": "tool", "tool_call_id": item["call_id"], "content": _tool_output(item["output"])})
        elif kind == "reasoning":
            content = item.get("content")
            text = content[0].get("text") if isinstance(content, list) and content and isinstance(content[0], dict) else None
            if not isinstance(text, str):
                continue  # a summary alone holds nothing the model reads back
            if follows_assistant:
                messages[-1]["reasoning_content"] = text
            else:
                messages.append({"role": "assistant", "content": [], "reasoning_content": text})
        else:
            raise BadRequest(f"cannot tell what this 'input' item is (type {kind!r}, role {role!r})")
    return messages


def _chat_tools(tools: object) -> list[dict]:
    if not isinstance(tools, list):
        raise BadRequest("'tools' must be a list")
    converted = []
    for tool in tools:
        if isinstance(tool, dict) and tool.get("type") == "function":
            function = {key: value for key, value in tool.items() if key != "type"}
            converted.append({"type": "function", "function": function})
    return converted


def to_chat(payload: dict) -> dict:
    """A Responses request as a chat completion request (see the module docstring).

    Raises:
        BadRequest: ``previous_response_id`` (nothing is stored), or an ``input`` it cannot read.
    """
    if payload.get("previous_response_id"):
        raise BadRequest("'previous_response_id' is not supported: responses are not stored; send the whole input")
    chat = {key: value for key, value in payload.items() if key not in ("input", "instructions", "max_output_tokens")}
    messages = []
    if isinstance(payload.get("instructions"), str):
        messages.append({"role": "system", "content": payload["instructions"]})
    chat["messages"] = messages + _messages(payload.get("input"))
    if "tools" in payload:
        del chat["tools"]
        if tools := _chat_tools(payload["tools"]):
            chat["tools"] = tools
    choice = payload.get("tool_choice")
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("name"), str):
        chat["tool_choice"] = {"type": "function", "function": {"name": choice["name"]}}
    if "max_output_tokens" in payload:
        chat["max_tokens"] = payload["max_output_tokens"]
    reasoning = chat.pop("reasoning", None)
    if isinstance(reasoning, dict) and "effort" in reasoning:
        chat["reasoning_effort"] = reasoning["effort"]
    text = chat.pop("text", None)
    fmt = text.get("format") if isinstance(text, dict) else None
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        schema = {key: fmt[key] for key in ("name", "schema", "strict", "description") if key in fmt}
        chat["response_format"] = {"type": "json_schema", "json_schema": schema}
    elif isinstance(fmt, dict) and fmt.get("type") == "json_object":
        chat["response_format"] = {"type": "json_object"}
    return chat


# ---- the answer, from a chat completion ---------------------------------------------------


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def _usage(usage: object) -> dict | None:
    if not isinstance(usage, dict):
        return None
    details = usage.get("prompt_tokens_details")
    cached = details.get("cached_tokens", 0) if isinstance(details, dict) else 0
    reasoning = (usage.get("completion_tokens_details") or {}).get("reasoning_tokens", 0)
    prompt, completion = usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": cached or 0, "cache_write_tokens": 0},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": reasoning or 0},
        "total_tokens": usage.get("total_tokens", prompt + completion),
    }


def _output(message: dict, status: str) -> list[dict]:
    output: list[dict] = []
    reasoning = message.get("reasoning_content")
    if isinstance(reasoning, str) and reasoning:
        output.append({
            "id": _new_id("rs"), "type": "reasoning", "summary": [], "status": status,
            "content": [{"type": "reasoning_text", "text": reasoning}],
        })  # fmt: skip
    content = message.get("content")
    if isinstance(content, str) and content:
        text = {"type": "output_text", "text": content, "annotations": [], "logprobs": []}
        output.append({"id": _new_id("msg"), "type": "message", "role": "assistant", "status": status, "content": [text]})
    for call in message.get("tool_calls") or []:
        function = call.get("function") or {}
        call_id = call.get("id") or _new_id("call")
        output.append({
            "id": f"fc_{call_id}", "type": "function_call", "status": "completed", "call_id": call_id,
            "name": function.get("name", ""), "arguments": function.get("arguments", ""),
        })  # fmt: skip
    return output


def from_chat(completion: dict, request: dict) -> dict:
    """A ``chat.completion`` as the Response object answering ``request`` (the Responses request)."""
    choices = completion.get("choices") or [{}]
    choice = choices[0] if isinstance(choices[0], dict) else {}
    finished = choice.get("finish_reason")
    status = "incomplete" if finished == "length" else "completed"
    message = choice.get("message") if isinstance(choice.get("message"), dict) else {}
    created = completion.get("created")
    tools = request.get("tools") if isinstance(request.get("tools"), list) else []
    text = request.get("text") if isinstance(request.get("text"), dict) else {"format": {"type": "text"}}
    return {
        "id": _new_id("resp"),
        "object": "response",
        "created_at": created if isinstance(created, (int, float)) else int(time.time()),
        "status": status,
        "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "instructions": request.get("instructions"),
        "max_output_tokens": request.get("max_output_tokens"),
        "model": completion.get("model") or request.get("model", ""),
        "output": _output(message, status),
        "parallel_tool_calls": request.get("parallel_tool_calls", True),
        "previous_response_id": None,
        "reasoning": request.get("reasoning"),
        "store": False,
        "temperature": request.get("temperature"),
        "text": text,
        "tool_choice": request.get("tool_choice", "auto"),
        "tools": tools,
        "top_p": request.get("top_p"),
        "truncation": "disabled",
        "usage": _usage(completion.get("usage")),
        "metadata": request.get("metadata") if isinstance(request.get("metadata"), dict) else {},
    }


# ---- streams -------------------------------------------------------------------------------


def sse_event(name: str, data: dict) -> bytes:
    """One Responses SSE event: its name, and its data (whose ``type`` is the name)."""
    return b"event: " + name.encode() + b"\ndata: " + json.dumps(data).encode() + b"\n\n"


def replay_sse(response: dict) -> bytes:
    """A complete Response object as the event sequence that would have streamed it."""
    events: list[tuple[str, dict]] = []

    def emit(kind: str, **data: Any) -> None:
        events.append((kind, {"type": kind, "sequence_number": len(events), **data}))

    opening = {**response, "status": "in_progress", "output": [], "usage": None, "incomplete_details": None}
    emit("response.created", response=opening)
    emit("response.in_progress", response=opening)
    for index, item in enumerate(response.get("output") or []):
        kind, item_id = item.get("type"), item.get("id")
        if kind == "message":
            emit("response.output_item.added", output_index=index, item={**item, "status": "in_progress", "content": []})
            for part_index, part in enumerate(item.get("content") or []):
                text = part.get("text", "")
                emit("response.content_part.added", item_id=item_id, output_index=index, content_index=part_index,
                     part={**part, "text": ""})  # fmt: skip
                if text:
                    emit("response.output_text.delta", item_id=item_id, output_index=index, content_index=part_index,
                         delta=text, logprobs=[])  # fmt: skip
                emit("response.output_text.done", item_id=item_id, output_index=index, content_index=part_index,
                     text=text, logprobs=[])  # fmt: skip
                emit("response.content_part.done", item_id=item_id, output_index=index, content_index=part_index, part=part)
        elif kind == "function_call":
            emit("response.output_item.added", output_index=index, item={**item, "status": "in_progress", "arguments": ""})
            emit("response.function_call_arguments.delta", item_id=item_id, output_index=index, delta=item["arguments"])
            emit("response.function_call_arguments.done", item_id=item_id, output_index=index,
                 name=item["name"], arguments=item["arguments"])  # fmt: skip
        elif kind == "reasoning":
            emit("response.output_item.added", output_index=index, item={**item, "status": "in_progress", "content": []})
            for part_index, part in enumerate(item.get("content") or []):
                emit("response.reasoning_text.delta", item_id=item_id, output_index=index, content_index=part_index,
                     delta=part.get("text", ""))  # fmt: skip
                emit("response.reasoning_text.done", item_id=item_id, output_index=index, content_index=part_index,
                     text=part.get("text", ""))  # fmt: skip
        emit("response.output_item.done", output_index=index, item=item)
    final = "response.incomplete" if response.get("status") == "incomplete" else "response.completed"
    emit(final, response=response)
    return b"".join(sse_event(name, data) for name, data in events)


def error_events(reason: str, sequence: int = 0, response: dict | None = None, model: str = "") -> bytes:
    """What ends a stream cut short: an ``error`` event, then ``response.failed`` if the response is known.

    The failed response is the one ``response.created`` announced, with the fields a Response
    object requires filled in where the upstream left them out (llama-server's holds only its id).
    """
    out = sse_event(
        "error",
        {"type": "error", "sequence_number": sequence, "code": "upstream_error", "message": reason, "param": None},
    )
    if response is not None:
        defaults = {
            "object": "response", "created_at": int(time.time()), "model": model, "output": [], "tools": [],
            "tool_choice": "auto", "parallel_tool_calls": True, "incomplete_details": None, "instructions": None,
            "metadata": {}, "temperature": None, "top_p": None, "usage": None,
        }  # fmt: skip
        failed = {**defaults, **response, "status": "failed", "error": {"code": "server_error", "message": reason}}
        out += sse_event("response.failed", {"type": "response.failed", "sequence_number": sequence + 1, "response": failed})
    return out


class ResponsesLines(SSELines):
    """A relayed Responses stream: complete once a terminal event passed (see the module docstring).

    It counts the events passed on, and keeps the response of the ``response.created`` event,
    so that :meth:`error` can carry on the sequence and name the response that failed.
    """

    __slots__ = ("last", "events", "response", "model")

    def __init__(self, limit: int, model: str = "") -> None:
        super().__init__(limit)
        #: The model asked for, named by a failed response that does not name its own.
        self.model = model
        #: The type of the last event passed on.
        self.last: str | None = None
        self.events = 0
        self.response: dict | None = None

    def _passed(self, out: bytes) -> None:
        super()._passed(out)
        data = _DATA.findall(out)
        if not data:
            return
        self.events += len(data)
        names = _EVENT.findall(out)
        if self.response is None and b"response.created" in out:
            self._keep_response(data)
        # the data's own type (llama-server's error line has no event name); else the event's name
        self.last = _data_type(data[-1]) or (names[-1].strip().decode("utf-8", "replace") if names else None)

    def _keep_response(self, data: list[bytes]) -> None:
        for line in data:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict) and event.get("type") == "response.created" and isinstance(event.get("response"), dict):
                self.response = event["response"]
                return

    @property
    def done(self) -> bool:
        return self.last in TERMINAL

    def error(self, reason: str) -> bytes:
        """The events that end this stream, cut short for ``reason``."""
        return error_events(reason, self.events, self.response, self.model)


def _data_type(line: bytes) -> str | None:
    try:
        event = json.loads(line)
    except ValueError:
        return None
    if not isinstance(event, dict):
        return None
    if "error" in event:  # llama-server's own error line (data: {"error": {...}})
        return "error"
    kind = event.get("type")
    return kind if isinstance(kind, str) else None
