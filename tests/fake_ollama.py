"""A small Ollama server on 127.0.0.1 for testing the Ollama upstream backend.

It implements the documented shapes of Ollama's chat, generate, tags, show, ps,
embed, embeddings, pull and delete routes, plus ``/v1/chat/completions``,
``/v1/completions`` and ``/v1/responses`` (its OpenAI-compatible routes; a Responses
stream is Ollama's named events with ``sequence_number``, ending in ``response.completed``)
and ``/v1/messages`` (its Anthropic-compatible one: Anthropic's message, ``event:``-named SSE
events and error objects), with NDJSON streaming on by default. Each model answers ``tokens``
pieces (``piece0 piece1 ...``); a chat whose last message is ``"hold"`` sends its first
piece and then waits for :meth:`FakeOllama.release` before the rest, so a test
can see that the proxy relays bytes as they come. Every request is recorded in
:attr:`FakeOllama.requests` as ``(method, path, body)``. After
:meth:`FakeOllama.reset_next` ``(N)``, the next N connections are reset (RST) unread
and unanswered, all together once the N-th is accepted, as an overloaded server
does to a burst: a connection opened after that is served.

Standard library only; it runs in a thread of the test process.
"""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MODELS = {
    "remote-llm:latest": {"family": "llama", "parameter_size": "1B", "embedding": False},
    "remote-embed:latest": {"family": "bert", "parameter_size": "22M", "embedding": True},
}


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime())


def _details(info: dict) -> dict:
    return {
        "parent_model": "",
        "format": "gguf",
        "family": info["family"],
        "families": [info["family"]],
        "parameter_size": info["parameter_size"],
        "quantization_level": "Q4_0",
    }


class _Server(ThreadingHTTPServer):
    # Ollama's Go listener takes the kernel's backlog (somaxconn); socketserver's default of 5
    # overflows under a burst, and then the kernel, not the fake, drops connections
    request_queue_size = 1024


class FakeOllama:
    def __init__(self, tokens: int = 3) -> None:
        self.tokens = tokens
        self.requests: list[tuple[str, str, object]] = []
        self.loaded: dict[str, float] = {}
        self.gate = threading.Event()
        #: Connections still to reset (see the module docstring).
        self.resets = 0
        self._lock = threading.Lock()
        self._burst: threading.Barrier | None = None
        self._server = _Server(("127.0.0.1", 0), _make_handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> FakeOllama:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.gate.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def release(self) -> None:
        self.gate.set()

    def reset_next(self, count: int) -> None:
        with self._lock:
            self.resets = count
            self._burst = threading.Barrier(count)

    def take_reset(self) -> bool:
        """For a connection just accepted: whether to reset it (after waiting for the rest of its burst)."""
        with self._lock:
            if self.resets <= 0 or self._burst is None:
                return False
            self.resets -= 1
            burst = self._burst
        try:
            burst.wait(10)
        except threading.BrokenBarrierError:
            pass
        return True

    def resolve(self, name: object) -> str | None:
        if not isinstance(name, str):
            return None
        for candidate in (name, f"{name}:latest"):
            if candidate in MODELS:
                return candidate
        return None


def _make_handler(fake: FakeOllama) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            pass

        def handle(self) -> None:
            if fake.take_reset():
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.connection.close()  # the last reference goes after finish(): an RST, the request unread
                return
            super().handle()

        def _send(self, status: int, body: object, content_type: str = "application/json; charset=utf-8") -> None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _start_chunked(self, content_type: str) -> None:
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()

        def _chunk(self, data: bytes) -> None:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()

        def _body(self) -> dict:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            try:
                body = json.loads(raw) if raw else {}
            except ValueError:
                body = {"_unparsed": raw.decode("utf-8", "replace")}
            self.server_record(body)
            return body

        def server_record(self, body: object) -> None:
            fake.requests.append((self.command, self.path, body))

        def _model(self, body: dict) -> str | None:
            name = fake.resolve(body.get("model") or body.get("name"))
            if name is None:
                self._send(404, {"error": f'model "{body.get("model")}" not found, try pulling it first'})
            return name

        # ---- GET ------------------------------------------------------------------------

        def do_HEAD(self) -> None:  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def do_GET(self) -> None:  # noqa: N802
            fake.requests.append(("GET", self.path, None))
            if self.path == "/":
                self._send(200, b"Ollama is running", "text/plain; charset=utf-8")
            elif self.path == "/api/version":
                self._send(200, {"version": "0.9.9-fake"})
            elif self.path == "/api/tags":
                models = [
                    {
                        "name": n,
                        "model": n,
                        "modified_at": "2025-01-01T00:00:00Z",
                        "size": 1000 + i,
                        "digest": f"{i:064x}",
                        "details": _details(info),
                    }
                    for i, (n, info) in enumerate(MODELS.items())
                ]
                self._send(200, {"models": models})
            elif self.path == "/api/ps":
                models = [
                    {
                        "name": n,
                        "model": n,
                        "size": 1000,
                        "digest": "0" * 64,
                        "details": _details(MODELS[n]),
                        "expires_at": "2099-01-01T00:00:00Z",
                        "size_vram": 0,
                    }
                    for n in fake.loaded
                ]
                self._send(200, {"models": models})
            else:
                self._send(404, b"404 page not found", "text/plain")

        # ---- POST / DELETE ---------------------------------------------------------------

        def do_DELETE(self) -> None:  # noqa: N802
            body = self._body()
            if self.path != "/api/delete":
                self._send(404, b"404 page not found", "text/plain")
            elif self._model(body) is not None:
                self._send(200, b"", "text/plain")

        def do_POST(self) -> None:  # noqa: N802
            body = self._body()
            routes = {
                "/api/chat": self._chat,
                "/api/generate": self._generate,
                "/api/embed": self._embed,
                "/api/embeddings": self._embeddings,
                "/api/show": self._show,
                "/api/pull": self._pull,
                "/v1/chat/completions": self._openai_chat,
                "/v1/completions": self._openai_completion,
                "/v1/messages": self._anthropic_messages,
                "/v1/responses": self._openai_responses,
            }
            route = routes.get(self.path)
            if route is None:
                self._send(404, b"404 page not found", "text/plain")
                return
            try:
                route(body)
            except (BrokenPipeError, ConnectionResetError):
                pass

        def _generation(self, body: dict, *, chat: bool) -> None:
            name = self._model(body)
            if name is None:
                return
            fake.loaded[name] = time.time()
            hold = chat and (body.get("messages") or [{}])[-1].get("content") == "hold"
            pieces = [f"piece{i} " for i in range(fake.tokens)]

            def obj(text: str, done: bool) -> dict:
                out: dict = {"model": name, "created_at": _now()}
                if chat:
                    out["message"] = {"role": "assistant", "content": text}
                else:
                    out["response"] = text
                out["done"] = done
                if done:
                    out.update(
                        done_reason="stop",
                        total_duration=1000,
                        load_duration=10,
                        prompt_eval_count=2,
                        prompt_eval_duration=100,
                        eval_count=len(pieces),
                        eval_duration=500,
                    )
                return out

            if body.get("stream") is False:
                self._send(200, obj("".join(pieces), True))
                return
            self._start_chunked("application/x-ndjson")
            for i, piece in enumerate(pieces):
                self._chunk(json.dumps(obj(piece, False)).encode() + b"\n")
                if hold and i == 0:
                    fake.gate.wait(10)
            self._chunk(json.dumps(obj("", True)).encode() + b"\n")
            self._chunk(b"")

        def _chat(self, body: dict) -> None:
            self._generation(body, chat=True)

        def _generate(self, body: dict) -> None:
            self._generation(body, chat=False)

        def _embed(self, body: dict) -> None:
            name = self._model(body)
            if name is None:
                return
            inputs = body.get("input")
            inputs = [inputs] if isinstance(inputs, str) else list(inputs or [])
            vectors = [[0.5, 0.5, float(len(text))] for text in inputs]
            self._send(
                200,
                {
                    "model": name,
                    "embeddings": vectors,
                    "total_duration": 10,
                    "load_duration": 1,
                    "prompt_eval_count": len(inputs),
                },
            )

        def _embeddings(self, body: dict) -> None:
            if self._model(body) is not None:
                self._send(200, {"embedding": [0.25, 0.75]})

        def _show(self, body: dict) -> None:
            name = self._model(body)
            if name is not None:
                self._send(
                    200,
                    {
                        "modelfile": f"FROM {name}\n",
                        "parameters": "",
                        "template": "{{ .Prompt }}",
                        "details": _details(MODELS[name]),
                        "model_info": {"general.architecture": MODELS[name]["family"]},
                        "capabilities": ["embedding"] if MODELS[name]["embedding"] else ["completion"],
                        "modified_at": "2025-01-01T00:00:00Z",
                    },
                )

        def _pull(self, body: dict) -> None:
            if self._model(body) is None:
                return
            statuses = [{"status": "pulling manifest"}, {"status": "verifying sha256 digest"}, {"status": "success"}]
            if body.get("stream") is False:
                self._send(200, statuses[-1])
                return
            self._start_chunked("application/x-ndjson")
            for status in statuses:
                self._chunk(json.dumps(status).encode() + b"\n")
            self._chunk(b"")

        def _openai_chat(self, body: dict) -> None:
            name = fake.resolve(body.get("model"))
            if name is None:
                self._send(404, {"error": {"message": f'model "{body.get("model")}" not found', "type": "api_error"}})
                return
            text = "".join(f"piece{i} " for i in range(fake.tokens))
            if not body.get("stream"):
                self._send(
                    200,
                    {
                        "id": "chatcmpl-1",
                        "object": "chat.completion",
                        "created": int(time.time()),
                        "model": name,
                        "choices": [
                            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
                        ],
                        "usage": {
                            "prompt_tokens": 2,
                            "completion_tokens": fake.tokens,
                            "total_tokens": 2 + fake.tokens,
                        },
                    },
                )
                return
            self._start_chunked("text/event-stream")
            for i in range(fake.tokens):
                chunk = {
                    "id": "chatcmpl-1",
                    "object": "chat.completion.chunk",
                    "created": int(time.time()),
                    "model": name,
                    "choices": [
                        {"index": 0, "delta": {"role": "assistant", "content": f"piece{i} "}, "finish_reason": None}
                    ],
                }
                self._chunk(b"data: " + json.dumps(chunk).encode() + b"\n\n")
            self._chunk(b"data: [DONE]\n\n")
            self._chunk(b"")

        def _openai_completion(self, body: dict) -> None:
            name = fake.resolve(body.get("model"))
            if name is None:
                self._send(404, {"error": {"message": f'model "{body.get("model")}" not found', "type": "api_error"}})
                return
            pieces = [f"piece{i} " for i in range(fake.tokens)]
            usage = {"prompt_tokens": 2, "completion_tokens": fake.tokens, "total_tokens": 2 + fake.tokens}

            def answer(text: str, finish: str | None, **extra: object) -> dict:
                choice = {"index": 0, "text": text, "finish_reason": finish}
                return {"id": "cmpl-1", "object": "text_completion", "created": int(time.time()), "model": name,
                        "choices": [choice], **extra}

            if not body.get("stream"):
                self._send(200, answer("".join(pieces), "stop", usage=usage))
                return
            self._start_chunked("text/event-stream")
            for piece in pieces:
                self._chunk(b"data: " + json.dumps(answer(piece, None)).encode() + b"\n\n")
            self._chunk(b"data: " + json.dumps(answer("", "stop", usage=usage)).encode() + b"\n\n")
            self._chunk(b"data: [DONE]\n\n")
            self._chunk(b"")

        def _anthropic_messages(self, body: dict) -> None:
            """Ollama's Anthropic-compatible route: its errors, messages and ``event:``-named SSE events are Anthropic's."""
            name = fake.resolve(body.get("model"))
            if name is None:
                error = {"type": "not_found_error", "message": f"model {body.get('model')!r} not found"}
                self._send(404, {"type": "error", "error": error, "request_id": "req_fake"})
                return
            pieces = [f"piece{i} " for i in range(fake.tokens)]
            usage = {"input_tokens": 2, "output_tokens": fake.tokens}
            message = {"id": "msg_fake", "type": "message", "role": "assistant", "model": name,
                       "content": [{"type": "text", "text": "".join(pieces)}], "stop_reason": "end_turn", "usage": usage}
            if not body.get("stream"):
                self._send(200, message)
                return

            def event(kind: str, data: dict) -> None:
                self._chunk(f"event: {kind}\ndata: {json.dumps(data)}\n\n".encode())

            self._start_chunked("text/event-stream")
            start = {**message, "content": [], "stop_reason": "", "usage": {"input_tokens": 2, "output_tokens": 0}}
            event("message_start", {"type": "message_start", "message": start})
            block = {"type": "text", "text": ""}
            event("content_block_start", {"type": "content_block_start", "index": 0, "content_block": block})
            for piece in pieces:
                delta = {"type": "text_delta", "text": piece}
                event("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta})
            event("content_block_stop", {"type": "content_block_stop", "index": 0})
            event("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": usage})
            event("message_stop", {"type": "message_stop"})
            self._chunk(b"")

        def _openai_responses(self, body: dict) -> None:
            name = fake.resolve(body.get("model"))
            if name is None:
                self._send(404, {"error": {"message": f'model "{body.get("model")}" not found', "type": "api_error"}})
                return
            pieces = [f"piece{i} " for i in range(fake.tokens)]
            text = "".join(pieces)
            part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
            item = {"id": "msg_1", "type": "message", "status": "completed", "role": "assistant", "content": [part]}
            usage = {"input_tokens": 2, "output_tokens": fake.tokens, "total_tokens": 2 + fake.tokens,
                     "input_tokens_details": {"cached_tokens": 0}, "output_tokens_details": {"reasoning_tokens": 0}}

            def response(status: str, output: list, usage: dict | None) -> dict:
                return {"id": "resp_1", "object": "response", "created_at": int(time.time()), "status": status,
                        "model": name, "output": output, "error": None, "incomplete_details": None,
                        "instructions": body.get("instructions"), "tools": [], "tool_choice": "auto",
                        "parallel_tool_calls": True, "text": {"format": {"type": "text"}}, "usage": usage,
                        "metadata": {}, "store": False, "truncation": "disabled"}

            if not body.get("stream"):
                self._send(200, response("completed", [item], usage))
                return
            self._start_chunked("text/event-stream")
            sequence = iter(range(1000))

            def event(kind: str, **data: object) -> None:
                payload = {"type": kind, "sequence_number": next(sequence), **data}
                self._chunk(b"event: " + kind.encode() + b"\ndata: " + json.dumps(payload).encode() + b"\n\n")

            event("response.created", response=response("in_progress", [], None))
            event("response.in_progress", response=response("in_progress", [], None))
            event("response.output_item.added", output_index=0, item={**item, "status": "in_progress", "content": []})
            event("response.content_part.added", item_id="msg_1", output_index=0, content_index=0, part={**part, "text": ""})
            for piece in pieces:
                event("response.output_text.delta", item_id="msg_1", output_index=0, content_index=0, delta=piece, logprobs=[])
            event("response.output_text.done", item_id="msg_1", output_index=0, content_index=0, text=text, logprobs=[])
            event("response.content_part.done", item_id="msg_1", output_index=0, content_index=0, part=part)
            event("response.output_item.done", output_index=0, item=item)
            event("response.completed", response=response("completed", [item], usage))
            self._chunk(b"")

    return Handler
