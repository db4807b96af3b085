"""Ollama's API in llama-server's terms: requests translated there, answers translated back.

Theory of operation: an Ollama request becomes one request to llama-server's
OpenAI endpoints, and its answer (one JSON body, or an SSE stream) becomes
Ollama's (one JSON object, or NDJSON lines). Nothing here does I/O; the routes
in :mod:`smart_proxy.handlers.ollama_routes` hold the lease and move the bytes.

* ``/api/chat`` -> ``/v1/chat/completions``. ``/api/generate`` -> the same, with
  ``system`` and ``prompt`` as a system and a user message, so the model's chat
  template applies as in Ollama; with ``raw: true`` -> ``/v1/completions``, the
  prompt untouched. ``/api/embed`` and ``/api/embeddings`` -> ``/v1/embeddings``.
* ``options`` map onto llama-server's sampling fields (:data:`SAMPLING`); ``num_ctx``
  is for the pool (:func:`requested_context`: a server with at least that context);
  other load-time options are set per model in proxy.ini and ignored per request
  (:data:`LOAD_TIME`); a wrong type is a 400. ``format`` becomes ``response_format`` (a grammar in
  llama-server), ``think`` becomes ``chat_template_kwargs.enable_thinking`` and
  ``reasoning_effort``, images become ``image_url`` content parts, tool calls
  change their ``arguments`` between a JSON object (Ollama) and a JSON string (OpenAI).
* :class:`Answer` follows one generation: it turns OpenAI chunks into Ollama's
  partial objects as they come, gathers tool-call fragments, ``usage`` and
  llama-server's ``timings``, and ends with the ``done`` object and its durations
  (nanoseconds, like Ollama's). Where llama-server gave no timings, the durations
  are measured here instead. An agent chain's answer (:mod:`smart_proxy.agents`)
  is translated the same way; what it adds beyond one choice (an agent's report,
  more choices) comes from :meth:`Answer.extras`.
* :class:`NDJSONStream` is that translation on bytes: whatever SSE bytes have
  arrived in, the NDJSON lines they make out, as one piece, so a burst of events
  costs one write (:class:`smart_proxy.upstream.relay.RelayBody` feeds it).
* :class:`PullReport` turns a Hugging Face download's status, file by file, into
  ``/api/pull``'s progress objects: ``pulling manifest``, one ``pulling DIGEST``
  object per file (its ``digest``, ``total``, ``completed``) each time it moves,
  then ``verifying sha256 digest`` and ``success``.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import attrs

from ..download import DownloadStatus, FileStatus
from ..errors import BadRequest, ProxyError, UpstreamError
from ..upstream.relay import answer_text
from .openai import num_ctx_value

__all__ = [
    "JSON_TYPE",
    "LOAD_TIME",
    "NDJSON_HEADERS",
    "SAMPLING",
    "Answer",
    "NDJSONStream",
    "PullReport",
    "SSEParser",
    "Translated",
    "chat_request",
    "embed_request",
    "embeddings_from",
    "error_body",
    "generate_request",
    "iso_time",
    "ndjson",
    "parse_keep_alive",
    "requested_context",
    "upstream_failure",
]

NS_PER_S = 1_000_000_000
#: The version ``/api/version`` reports: the Ollama API this dialect follows (thinking, tools, embed).
OLLAMA_VERSION = "0.12.0"

#: Ollama option -> llama-server field, per request.
SAMPLING = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "typical_p": "typical_p",
    "seed": "seed",
    "num_predict": "max_tokens",
    "stop": "stop",
    "repeat_penalty": "repeat_penalty",
    "repeat_last_n": "repeat_last_n",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "mirostat": "mirostat",
    "mirostat_tau": "mirostat_tau",
    "mirostat_eta": "mirostat_eta",
    "num_keep": "n_keep",
}
_INTEGER_OPTIONS = {"top_k", "seed", "num_predict", "repeat_last_n", "mirostat", "num_keep"}
#: Options that shape the loaded model, not one request: set them in proxy.ini ``args``.
#: (``num_ctx`` shapes it too, but the pool serves it: see :func:`requested_context`.)
LOAD_TIME = frozenset(
    {
        "num_batch", "num_gpu", "main_gpu", "low_vram", "f16_kv", "logits_all",
        "vocab_only", "use_mmap", "use_mlock", "embedding_only", "num_thread", "numa",
    }
)  # fmt: skip
#: Options llama-server has no sampler for (both are deprecated in Ollama too).
NO_EQUIVALENT = frozenset({"penalize_newline", "tfs_z"})

#: The longest keep_alive taken, in seconds (either sign): Go's largest duration in whole hours (about 292 years).
MAX_KEEP_ALIVE = 2562047 * 3600
_MAX_KEEP_ALIVE_TEXT = "2562047h"
_GO_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_GO_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


# ---- small shared pieces ---------------------------------------------------------------


def iso_time(seconds: float | None = None) -> str:
    """A wall-clock time as Ollama writes it: ``2024-06-04T14:38:31.837530Z``."""
    moment = datetime.now(UTC) if seconds is None else datetime.fromtimestamp(seconds, UTC)
    return moment.isoformat().replace("+00:00", "Z")


def far_future() -> str:
    """``expires_at`` for a model kept forever (Ollama reports now + the largest Go duration)."""
    return (datetime.now(UTC) + timedelta(seconds=(2**63 - 1) / NS_PER_S)).isoformat().replace("+00:00", "Z")


#: One encoder for every line: ``json.dumps`` with options builds a new one per call.
_NDJSON_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


#: The content type of Ollama's JSON answers.
JSON_TYPE = "application/json; charset=utf-8"
#: Headers of a streamed NDJSON answer: its type, no caching, and no buffering by nginx.
NDJSON_HEADERS = {"Content-Type": "application/x-ndjson", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def error_body(message: str) -> bytes:
    """An error as Ollama answers one: ``{"error": "..."}``."""
    return json.dumps({"error": message}).encode()


def ndjson(obj: object) -> bytes:
    return _NDJSON_ENCODER.encode(obj).encode() + b"\n"


def parse_keep_alive(value: object) -> float | None:
    """Ollama's ``keep_alive``: seconds as a number, or a Go duration (``"5m"``, ``"1h30m"``, ``"-1"``).

    Returns seconds (negative = keep loaded forever, 0 = unload after the request),
    or None when absent (the model's ``idle_ttl`` applies).

    Raises:
        BadRequest: it is neither, or not finite, or longer than :data:`MAX_KEEP_ALIVE` either way.
    """
    if value is None:
        return None
    seconds: float | None = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = value  # type: ignore[assignment]
    elif isinstance(value, str):
        text = value.strip()
        try:
            seconds = float(text)  # "300" or "-1": seconds, as Ollama's CLI takes them
        except ValueError:
            sign = -1.0 if text.startswith("-") else 1.0
            body = text.lstrip("+-")
            parts = _GO_DURATION.findall(body)
            if parts and "".join(number + unit for number, unit in parts) == body:
                seconds = sign * sum(float(number) * _GO_UNITS[unit] for number, unit in parts)
    # compared before any conversion: NaN fails it, and so does an int too large for a float
    if seconds is None or not -MAX_KEEP_ALIVE <= seconds <= MAX_KEEP_ALIVE:
        raise BadRequest(
            f"keep_alive: {value!r} is not a duration between -{_MAX_KEEP_ALIVE_TEXT} and {_MAX_KEEP_ALIVE_TEXT} "
            "(use e.g. 5m, 30s, 0 to unload after the request, or -1 to keep the model loaded)"
        )
    return float(seconds)


def upstream_failure(status: int, body: bytes, what: str) -> ProxyError:
    """llama-server's error answer (``{"error": {"message": ...}}``) as our error, status kept."""
    try:
        error = json.loads(body).get("error")
        message = error.get("message") if isinstance(error, dict) else error
    except (ValueError, AttributeError):
        message = None
    if not isinstance(message, str) or not message:
        message = answer_text(body) or f"HTTP {status}"
    exc: ProxyError = BadRequest(message) if 400 <= status < 500 else UpstreamError(f"{what}: {message}")
    exc.status = status if 400 <= status < 600 else 502
    return exc


# ---- requests ----------------------------------------------------------------------------


@attrs.frozen
class Translated:
    """One request for llama-server: where to send it, and the body."""

    path: str
    body: dict[str, Any]
    stream: bool
    #: The request has images (the model must take them).
    has_images: bool = False

    @property
    def kind(self) -> str:
        """``chat`` or ``completion``: which OpenAI shape ``body`` has (what agents see)."""
        return "chat" if self.path == "/v1/chat/completions" else "completion"


def requested_context(payload: dict[str, Any]) -> int | None:
    """The context the request needs (``options.num_ctx``), or None when it names none.

    Raises:
        BadRequest: ``options`` is not an object, or ``num_ctx`` is not a positive integer.
    """
    options = payload.get("options")
    if options is None:
        return None
    if not isinstance(options, dict):
        raise BadRequest("options must be a JSON object")
    return num_ctx_value(options.get("num_ctx"), "options.num_ctx")


def _sampling(options: object) -> dict[str, Any]:
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise BadRequest("options must be a JSON object")
    out: dict[str, Any] = {}
    for key, value in options.items():
        target = SAMPLING.get(key)
        if target is None or value is None:
            continue  # LOAD_TIME, NO_EQUIVALENT and unknown keys: a documented no-op, as in Ollama
        if key == "stop":
            if isinstance(value, str):
                value = [value]
            if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
                raise BadRequest("options.stop must be a string or a list of strings")
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            raise BadRequest(f"options.{key} must be a number, not {value!r}")
        elif key in _INTEGER_OPTIONS:
            if value != int(value):
                raise BadRequest(f"options.{key} must be an integer, not {value!r}")
            value = int(value)
        if key == "num_predict" and value < 0:
            continue  # -1 (no limit) and -2 (fill the context): llama-server's default
        out[target] = value
    return out


def _response_format(fmt: object, *, chat: bool) -> dict[str, Any]:
    if fmt is None or fmt == "":
        return {}
    if fmt == "json":
        schema: dict[str, Any] = {}
    elif isinstance(fmt, dict):
        schema = fmt
    else:
        raise BadRequest(f'format must be "json" or a JSON schema object, not {fmt!r}')
    if not chat:  # /v1/completions takes llama-server's own field
        return {"json_schema": schema or {"type": "object"}}
    if not schema:
        return {"response_format": {"type": "json_object"}}
    return {"response_format": {"type": "json_schema", "json_schema": {"name": "format", "schema": schema}}}


def _think(think: object) -> dict[str, Any]:
    if think is None:
        return {}
    if think is True:
        return {"chat_template_kwargs": {"enable_thinking": True}, "reasoning_format": "deepseek"}
    if think is False:
        return {"chat_template_kwargs": {"enable_thinking": False}, "reasoning_effort": "none"}
    if think in ("low", "medium", "high"):
        return {
            "chat_template_kwargs": {"enable_thinking": True, "reasoning_effort": think},
            "reasoning_effort": think,
            "reasoning_format": "deepseek",
        }
    raise BadRequest(f'think must be true, false, "low", "medium" or "high", not {think!r}')


def _image_url(image: object) -> dict[str, Any]:
    if not isinstance(image, str) or not image:
        raise BadRequest("images must be base64-encoded strings")
    if image.startswith("data:"):
        url = image
    else:
        mime = "image/png"
        for prefix, kind in (
            ("/9j/", "image/jpeg"),
            ("R0lGOD", "image/gif"),
            ("UklGR", "image/webp"),
            ("Qk", "image/bmp"),
        ):
            if image.startswith(prefix):
                mime = kind
        url = f"data:{mime};base64,{image}"
    return {"type": "image_url", "image_url": {"url": url}}


def _with_images(text: object, images: object) -> Any:
    if not images:
        return text if text is not None else ""
    if not isinstance(images, list):
        raise BadRequest("images must be a list of base64-encoded strings")
    parts: list[dict[str, Any]] = [{"type": "text", "text": text}] if text else []
    return parts + [_image_url(image) for image in images]


def _messages(messages: object) -> tuple[list[dict[str, Any]], bool]:
    """Ollama messages as OpenAI's; and whether any carries images."""
    if not isinstance(messages, list):
        raise BadRequest("messages must be a list of message objects")
    out: list[dict[str, Any]] = []
    has_images = False
    calls: list[tuple[str, str]] = []  # (id, function name) of earlier tool calls, to answer them by name
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise BadRequest(f"messages[{index}] must be an object with a role")
        converted = {k: v for k, v in message.items() if k not in ("images", "tool_calls", "tool_name", "thinking")}
        converted["content"] = _with_images(message.get("content"), message.get("images"))
        has_images = has_images or bool(message.get("images"))
        if message.get("thinking"):
            converted["reasoning_content"] = message["thinking"]
        if message.get("tool_calls"):
            if not isinstance(message["tool_calls"], list):
                raise BadRequest(f"messages[{index}].tool_calls must be a list of tool calls")
            converted["tool_calls"] = []
            for call in message["tool_calls"]:
                function = call.get("function") if isinstance(call, dict) else None
                if not isinstance(function, dict) or not isinstance(function.get("name"), str):
                    raise BadRequest(f"messages[{index}].tool_calls: each needs function.name")
                call_id = call.get("id") or f"call_{len(calls)}"
                arguments = function.get("arguments", {})
                calls.append((call_id, function["name"]))
                converted["tool_calls"].append(
                    {
                        "id": call_id,
                        "type": "function",
                        "function": {
                            "name": function["name"],
                            "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments),
                        },
                    }
                )
        if message["role"] == "tool":
            name = message.get("tool_name") or message.get("name")
            if name:
                converted["name"] = name
            if "tool_call_id" not in converted:
                match = [cid for cid, fname in reversed(calls) if fname == name] or [cid for cid, _ in calls[-1:]]
                if match:
                    converted["tool_call_id"] = match[0]
        out.append(converted)
    return out, has_images


def _stream(payload: dict[str, Any]) -> bool:
    stream = payload.get("stream", True)
    if stream is None:
        return True
    if not isinstance(stream, bool):
        raise BadRequest("stream must be true or false")
    return stream


def _common(payload: dict[str, Any], model: str, stream: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    body.update(_sampling(payload.get("options")))
    if payload.get("logprobs"):
        body["logprobs"] = True
        if payload.get("top_logprobs"):
            body["top_logprobs"] = payload["top_logprobs"]
    return body


def chat_request(payload: dict[str, Any], model: str) -> Translated:
    """``/api/chat`` -> ``/v1/chat/completions``."""
    stream = _stream(payload)
    messages, has_images = _messages(payload.get("messages"))
    body = _common(payload, model, stream)
    body["messages"] = messages
    body.update(_response_format(payload.get("format"), chat=True))
    body.update(_think(payload.get("think")))
    tools = payload.get("tools")
    if tools:
        if not isinstance(tools, list):
            raise BadRequest("tools must be a list of tool objects")
        body["tools"] = tools
    return Translated("/v1/chat/completions", body, stream, has_images)


def generate_request(payload: dict[str, Any], model: str) -> Translated:
    """``/api/generate`` -> ``/v1/chat/completions`` (templated) or ``/v1/completions`` (raw)."""
    for unsupported, why in (
        ("suffix", "fill-in-the-middle (suffix) is not supported"),
        ("template", "template overrides are not supported; the model's own chat template applies"),
        ("context", "context (deprecated token memory) is not supported; use /api/chat with messages"),
    ):
        if payload.get(unsupported):
            raise BadRequest(why)
    prompt = payload.get("prompt") or ""
    if not isinstance(prompt, str):
        raise BadRequest("prompt must be a string")
    stream = _stream(payload)
    body = _common(payload, model, stream)
    images = payload.get("images")
    if payload.get("raw"):
        if images:
            raise BadRequest("images cannot be sent with raw: true (they need the chat template)")
        if payload.get("think"):
            raise BadRequest("think cannot be used with raw: true (it needs the chat template)")
        body["prompt"] = prompt
        body.update(_response_format(payload.get("format"), chat=False))
        return Translated("/v1/completions", body, stream)
    messages: list[dict[str, Any]] = []
    system = payload.get("system")
    if system:
        if not isinstance(system, str):
            raise BadRequest("system must be a string")
        messages.append({"role": "system", "content": system})
    messages.append({"role": "user", "content": _with_images(prompt, images)})
    body["messages"] = messages
    body.update(_response_format(payload.get("format"), chat=True))
    body.update(_think(payload.get("think")))
    return Translated("/v1/chat/completions", body, stream, bool(images))


def embed_request(inputs: list[str], model: str) -> dict[str, Any]:
    if not all(isinstance(text, str) for text in inputs):
        raise BadRequest("input must be a string or a list of strings")
    return {"model": model, "input": inputs, "encoding_format": "float"}


def embeddings_from(body: dict[str, Any], dimensions: object = None) -> tuple[list[list[float]], int]:
    """``/v1/embeddings``' answer -> vectors in input order, and the prompt token count.

    ``dimensions`` truncates each vector and normalizes it again, as Ollama does.
    """
    data = sorted(body.get("data") or [], key=lambda item: item.get("index", 0))
    vectors = [list(item.get("embedding") or []) for item in data]
    if dimensions is not None:
        if isinstance(dimensions, bool) or not isinstance(dimensions, int) or dimensions < 1:
            raise BadRequest("dimensions must be a positive integer")
        vectors = [_normalize(vector[:dimensions]) for vector in vectors]
    tokens = (body.get("usage") or {}).get("prompt_tokens") or 0
    return vectors, int(tokens)


def _normalize(vector: list[float]) -> list[float]:
    norm = math.sqrt(sum(x * x for x in vector))
    return [x / norm for x in vector] if norm else vector


# ---- answers -----------------------------------------------------------------------------


class SSEParser:
    """Incremental server-sent events: bytes in, decoded ``data:`` payloads out.

    llama-server sends ``data: {json}`` events, ``data: [DONE]`` at the end, and (in
    some versions) ``error: {json}`` for a failure mid-stream; ``:`` lines are pings.
    """

    DONE = "[DONE]"

    def __init__(self) -> None:
        # the start of a line not yet ended, in pieces: joined once when its end comes
        self._held: list[bytes] = []
        #: Bytes held of the line not yet ended.
        self.pending = 0

    def feed(self, chunk: bytes) -> list[dict[str, Any] | str]:
        end = chunk.rfind(b"\n") + 1
        if not end:
            if chunk:
                self._held.append(chunk)
                self.pending += len(chunk)
            return []
        data = chunk[:end]
        if self._held:
            data = b"".join([*self._held, data])
            self._held.clear()
        self.pending = len(chunk) - end
        if self.pending:
            self._held.append(chunk[end:])
        lines = data.split(b"\n")
        lines.pop()  # empty: data ends with a newline
        return [event for line in lines if (event := self._event(line)) is not None]

    def close(self) -> list[dict[str, Any] | str]:
        line = b"".join(self._held)
        self.drop()
        event = self._event(line)
        return [event] if event is not None else []

    def drop(self) -> None:
        """Forget the line not yet ended (the stream broke off in it)."""
        self._held.clear()
        self.pending = 0

    @staticmethod
    def _event(line: bytes) -> dict[str, Any] | str | None:
        if line.startswith(b"data:"):
            # the common case, parsed from the bytes; anything unusual (not UTF-8, not
            # JSON, odd whitespace) takes the general way below and ends the same
            value = line[5:].strip()
            if not value:
                return None
            if value != b"[DONE]":
                try:
                    event = json.loads(value.decode())  # strict UTF-8: bytes would let json guess
                except ValueError:
                    pass
                else:
                    return event if isinstance(event, dict) else None
        text = line.decode("utf-8", "replace").strip()
        field, _, value = text.partition(":")
        value = value.strip()
        if field not in ("data", "error") or not value:
            return None
        if value == SSEParser.DONE:
            return SSEParser.DONE
        try:
            event = json.loads(value)
        except ValueError:
            return {"error": {"message": f"llama-server sent an unreadable event: {value[:200]}"}}
        if field == "error":
            return {"error": event}
        return event if isinstance(event, dict) else None


_DONE_REASONS = {"stop": "stop", "length": "length", "tool_calls": "stop", "function_call": "stop"}
#: The top-level fields of an OpenAI answer that :class:`Answer` translates (or drops); see :meth:`Answer.extras`.
_OPENAI_ANSWER_FIELDS = frozenset(
    {"id", "object", "created", "model", "choices", "usage", "timings", "system_fingerprint"}
)


class Answer:
    """One generation in Ollama's shape, built from llama-server's OpenAI answer.

    Args:
        model: the name to report (the one the client asked for).
        chat: ``/api/chat`` (a ``message``) or ``/api/generate`` (a ``response``).
        started: when the request arrived (``clock()`` time).
        clock: seconds, monotonic.
    """

    def __init__(self, model: str, *, chat: bool, started: float, clock: Callable[[], float] = time.perf_counter):
        self.model = model
        self.chat = chat
        self._clock = clock
        self._started = started
        self._loaded: float | None = None
        self._first: float | None = None
        self._usage: dict[str, Any] = {}
        self._timings: dict[str, Any] = {}
        self._finish: str | None = None
        self._tool_calls: dict[int, dict[str, Any]] = {}
        self._pieces = 0
        self.failed = False

    def loaded(self) -> None:
        """The model is ready (the lease is held): what came before is load time."""
        self._loaded = self._clock()

    # -- streamed --

    def feed(self, event: dict[str, Any] | str) -> list[dict[str, Any]]:
        """One SSE event -> the Ollama objects to send now (maybe none)."""
        if event == SSEParser.DONE or not isinstance(event, dict):
            return []
        if "error" in event:
            self.failed = True
            error = event["error"]
            message = error.get("message") if isinstance(error, dict) else str(error)
            return [{"error": message or "llama-server reported an error"}]
        self._collect(event)
        out = []
        for choice in event.get("choices") or []:
            if choice.get("finish_reason"):
                self._finish = choice["finish_reason"]
            delta = choice.get("delta") or {}
            text = delta.get("content") if self.chat_source(choice) else choice.get("text")
            thinking = delta.get("reasoning_content")
            for call in delta.get("tool_calls") or []:
                self._gather_tool_call(call)
            logprobs = _logprobs(choice.get("logprobs"))
            if text or thinking or logprobs:
                if self._first is None:
                    self._first = self._clock()
                self._pieces += 1
                out.append(self._piece(text or "", thinking, None, logprobs, done=False))
        return out

    def final(self) -> list[dict[str, Any]]:
        """The objects that end a stream: gathered tool calls, then the ``done`` object."""
        out = []
        calls = _ollama_tool_calls([self._tool_calls[i] for i in sorted(self._tool_calls)], self._finish)
        if calls:
            out.append(self._piece("", None, calls, None, done=False))
        out.append({**self._piece("", None, None, None, done=True), **self._stats()})
        return out

    # -- whole --

    def complete(self, body: dict[str, Any]) -> dict[str, Any]:
        """A non-streamed OpenAI answer -> the one Ollama object."""
        self._collect(body)
        choices = body.get("choices") or [{}]
        choice = choices[0]
        self._finish = choice.get("finish_reason")
        text, thinking, calls = self._parts(choice)
        if text and self._first is None:
            self._first = self._loaded
        piece = self._piece(text, thinking, calls or None, _logprobs(choice.get("logprobs")), done=True)
        return {**piece, **self._stats()}

    def extras(self, body: dict[str, Any]) -> dict[str, Any]:
        """What an agent's OpenAI answer holds beyond what :meth:`complete` translates.

        Its extra top-level fields (an agent's report, such as ``smart_proxy``), and, when
        it has several choices (``/parallel`` with ``mode = "all"``; Ollama has no ``n``),
        every choice in Ollama's shape under ``smart_proxy.choices``. The routes add
        these to the last object they send.
        """
        out = {key: value for key, value in body.items() if key not in _OPENAI_ANSWER_FIELDS}
        choices = body.get("choices") or []
        if len(choices) > 1:
            report = out.get("smart_proxy")
            report = dict(report) if isinstance(report, dict) else {}
            report["choices"] = [self._alternative(choice) for choice in choices]
            out["smart_proxy"] = report
        return out

    def _parts(self, choice: dict[str, Any]) -> tuple[str, str | None, list[dict[str, Any]]]:
        """A whole choice's text, thinking and (Ollama-shaped) tool calls."""
        if self.chat_source(choice):
            message = choice.get("message") or {}
            calls = _ollama_tool_calls(message.get("tool_calls") or [], choice.get("finish_reason"))
            return message.get("content") or "", message.get("reasoning_content"), calls
        return choice.get("text") or "", None, []

    def _alternative(self, choice: dict[str, Any]) -> dict[str, Any]:
        text, thinking, calls = self._parts(choice)
        piece = self._piece(text, thinking, calls or None, _logprobs(choice.get("logprobs")), done=True)
        view = {key: value for key, value in piece.items() if key not in ("model", "created_at", "done")}
        finish = choice.get("finish_reason") or "stop"
        view["done_reason"] = _DONE_REASONS.get(finish, finish)
        return view

    @staticmethod
    def chat_source(choice: dict[str, Any]) -> bool:
        """A chat-completions choice (``message``/``delta``), not a completions one (``text``)."""
        return "message" in choice or "delta" in choice

    def load_only(self, reason: str) -> dict[str, Any]:
        """The answer to an empty request: the model was loaded (``load``) or unloaded (``unload``)."""
        piece = self._piece("", None, None, None, done=True)
        piece["done_reason"] = reason
        return piece

    # -- helpers --

    def _collect(self, body: dict[str, Any]) -> None:
        if isinstance(body.get("usage"), dict):
            self._usage = body["usage"]
        if isinstance(body.get("timings"), dict):
            self._timings = body["timings"]

    def _gather_tool_call(self, call: dict[str, Any]) -> None:
        index = call.get("index", len(self._tool_calls))
        slot = self._tool_calls.setdefault(index, {"id": None, "function": {"name": "", "arguments": ""}})
        if call.get("id"):
            slot["id"] = call["id"]
        function = call.get("function") or {}
        slot["function"]["name"] += function.get("name") or ""
        slot["function"]["arguments"] += function.get("arguments") or ""

    def _piece(
        self,
        text: str,
        thinking: str | None,
        tool_calls: list[dict[str, Any]] | None,
        logprobs: list[dict[str, Any]] | None,
        *,
        done: bool,
    ) -> dict[str, Any]:
        obj: dict[str, Any] = {"model": self.model, "created_at": iso_time()}
        if self.chat:
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if thinking:
                message["thinking"] = thinking
            if tool_calls:
                message["tool_calls"] = tool_calls
            obj["message"] = message
        else:
            obj["response"] = text
            if thinking:
                obj["thinking"] = thinking
        if logprobs:
            obj["logprobs"] = logprobs
        obj["done"] = done
        return obj

    def _stats(self) -> dict[str, Any]:
        end = self._clock()
        loaded = self._loaded if self._loaded is not None else self._started
        first = self._first if self._first is not None else end
        timings = self._timings
        prompt_count = self._usage.get("prompt_tokens")
        if prompt_count is None:
            prompt_count = (timings.get("prompt_n") or 0) + (timings.get("cache_n") or 0)
        eval_count = self._usage.get("completion_tokens")
        if eval_count is None:
            eval_count = timings.get("predicted_n", self._pieces)
        if "prompt_ms" in timings:
            prompt_ns = int(float(timings["prompt_ms"]) * 1e6)
        else:
            prompt_ns = int((first - loaded) * NS_PER_S)
        if "predicted_ms" in timings:
            eval_ns = int(float(timings["predicted_ms"]) * 1e6)
        else:
            eval_ns = int((end - first) * NS_PER_S)
        return {
            "done_reason": _DONE_REASONS.get(self._finish or "stop", self._finish),
            "total_duration": int((end - self._started) * NS_PER_S),
            "load_duration": int((loaded - self._started) * NS_PER_S),
            "prompt_eval_count": int(prompt_count),
            "prompt_eval_duration": max(0, prompt_ns),
            "eval_count": int(eval_count),
            "eval_duration": max(0, eval_ns),
        }


class NDJSONStream:
    """llama-server's SSE stream as Ollama's NDJSON: bytes in, the lines they complete out.

    :meth:`feed` takes any piece of the upstream body (events may be split across
    pieces, or many in one) and returns every line those events make, joined; after
    the upstream ends, :meth:`close` returns what is left: the last unterminated
    event's lines, the gathered tool calls and the ``done`` object; or an error line
    if the tool calls cannot be read, or if the stream ended before its ``data: [DONE]``
    (a stream llama-server did not finish never ends ``done``). Once an event is an
    error (llama-server reported one; a line longer than ``max_line``; or the relay saw
    the upstream break off and called :meth:`fail`), its error line is the last:
    :attr:`finished` turns true and later input makes nothing.
    """

    def __init__(self, answer: Answer, max_line: int = 64 * 1024 * 1024) -> None:
        self._answer = answer
        self._parser = SSEParser()
        self._max_line = max_line
        self._done = False

    @property
    def finished(self) -> bool:
        """An error line has been made: nothing more will be, so stop reading."""
        return self._answer.failed

    def feed(self, chunk: bytes) -> bytes:
        if self._answer.failed:
            return b""
        lines = []
        for event in self._parser.feed(chunk):
            self._done = event == SSEParser.DONE
            lines.extend(ndjson(obj) for obj in self._answer.feed(event))
            if self._answer.failed:
                return b"".join(lines)
        if self._parser.pending > self._max_line:
            lines.append(self.fail(f"a line of llama-server's stream is longer than {self._max_line} bytes"))
        return b"".join(lines)

    def close(self) -> bytes:
        if self._answer.failed:
            return b""
        lines = []
        for event in self._parser.close():
            self._done = event == SSEParser.DONE
            lines.extend(ndjson(obj) for obj in self._answer.feed(event))
        if self._answer.failed:
            return b"".join(lines)
        if not self._done:
            return b"".join(lines) + self.fail("the upstream stream ended before its end (no data: [DONE])")
        try:
            finals = self._answer.final()
        except ProxyError as exc:
            self._answer.failed = True
            finals = [{"error": exc.message}]
        return b"".join(lines + [ndjson(obj) for obj in finals])

    def fail(self, reason: str) -> bytes:
        """The stream broke off (``reason``): its error line, the last; the part of a line that came is dropped."""
        if self._answer.failed:
            return b""
        self._answer.failed = True
        self._parser.drop()
        return ndjson({"error": reason})


def _ollama_tool_calls(calls: list[dict[str, Any]], finish: str | None) -> list[dict[str, Any]]:
    """OpenAI tool calls in Ollama's shape, arguments parsed into objects.

    An answer cut off at its token limit (``finish``: ``length``) may end inside a call: a last
    call whose arguments are not a whole JSON object is left out, as Ollama leaves out a call it
    has not finished reading, and the answer's ``done_reason`` says ``length``. Anywhere else such
    arguments are the upstream's failure (:class:`~smart_proxy.errors.UpstreamError`).
    """
    out = []
    for index, call in enumerate(calls):
        try:
            out.append(_ollama_tool_call(call, index))
        except UpstreamError:
            if finish != "length" or index != len(calls) - 1:
                raise
    return out


def _ollama_tool_call(call: dict[str, Any], index: int) -> dict[str, Any]:
    function = call.get("function") or {}
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except ValueError as exc:
            raise UpstreamError(
                f"the model called {function.get('name')!r} with arguments that are not JSON: {arguments[:200]}"
            ) from exc
    if arguments is None:
        arguments = {}
    if not isinstance(arguments, dict):  # Ollama's arguments are an object: anything else cannot be given
        raise UpstreamError(
            f"the model called {function.get('name')!r} with arguments that are not a JSON object: "
            f"{json.dumps(arguments)[:200]}"
        )
    out: dict[str, Any] = {"function": {"index": index, "name": function.get("name", ""), "arguments": arguments}}
    if call.get("id"):
        out["id"] = call["id"]
    return out


def _logprobs(logprobs: object) -> list[dict[str, Any]] | None:
    """OpenAI ``choice.logprobs.content`` -> Ollama's ``logprobs`` list."""
    if not isinstance(logprobs, dict) or not isinstance(logprobs.get("content"), list):
        return None
    out = []
    for item in logprobs["content"]:
        entry: dict[str, Any] = {"token": item.get("token", ""), "logprob": item.get("logprob", 0.0)}
        if item.get("top_logprobs"):
            entry["top_logprobs"] = [
                {"token": t.get("token", ""), "logprob": t.get("logprob", 0.0)} for t in item["top_logprobs"]
            ]
        out.append(entry)
    return out or None


# ---- /api/pull -------------------------------------------------------------------------------


class PullReport:
    """A download's statuses as Ollama's ``/api/pull`` progress objects.

    Ollama names a layer by its digest (``sha256:HEX``) and its status by the first 12 hex
    digits (``pulling 8934d96d3f08``); a GGUF from Hugging Face has the same kind of digest,
    the sha256 the hub lists for it. A file without one (a small non-LFS file, or a plan
    made from the cache while offline) is reported by name, without a digest.
    """

    FIRST = {"status": "pulling manifest"}
    LAST = ({"status": "verifying sha256 digest"}, {"status": "success"})

    def __init__(self) -> None:
        self._sent: dict[str, tuple[int, int]] = {}

    def update(self, status: DownloadStatus) -> list[dict[str, Any]]:
        """An object for each file that moved since the last update (every file, the first time)."""
        changed = []
        for file in status.files:
            if self._sent.get(file.name) != (file.total, file.completed):
                self._sent[file.name] = (file.total, file.completed)
                changed.append(self.progress(file))
        return changed

    @staticmethod
    def progress(file: FileStatus) -> dict[str, Any]:
        if file.sha256 is None:
            return {"status": f"pulling {file.name}", "total": file.total, "completed": file.completed}
        return {
            "status": f"pulling {file.sha256[:12]}",
            "digest": f"sha256:{file.sha256}",
            "total": file.total,
            "completed": file.completed,
        }
