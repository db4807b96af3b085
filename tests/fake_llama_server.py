#!/usr/bin/env python3
"""A tiny stand-in for llama-server, for fast and deterministic pool tests.

It takes llama-server's command line (``-m FILE --host H --port P --alias NAME ...``)
and ignores the flags it does not know. The "model file" is JSON that says how to
behave, so each catalog entry in a test can act differently::

    {"load_delay": 0.2,       # seconds /health answers 503 before 200
     "exit_on_load": 3,       # exit with this code while loading (a corrupt model)
     "token_delay": 0.01,     # seconds between streamed tokens
     "tokens": 5,             # tokens per answer
     "slots": 4,              # /props total_slots
     "ignore_sigterm": false} # only SIGKILL stops it

Answers use the OpenAI shapes llama-server uses, with ``model`` = the alias.
``GET /slots`` shows which slots are processing, like llama-server's.
Standard library only: it must start in milliseconds.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, dict]:
    parser = argparse.ArgumentParser()
    parser.add_argument("-m", "--model", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--alias", default="fake")
    parser.add_argument("--parallel", "-np", type=int, default=None)
    args, _unknown = parser.parse_known_args(argv)
    with open(args.model, encoding="utf-8") as file:
        behaviour = json.load(file)
    return args, behaviour


class State:
    def __init__(self, args: argparse.Namespace, behaviour: dict) -> None:
        self.alias = args.alias
        self.behaviour = behaviour
        self.ready_at = time.monotonic() + float(behaviour.get("load_delay", 0.05))
        self.slots = args.parallel or int(behaviour.get("slots", 2))
        self.busy = 0
        self.lock = threading.Lock()


def make_handler(state: State) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

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
            if self.path == "/health":
                if time.monotonic() < state.ready_at:
                    self._json(503, {"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}})
                else:
                    self._json(200, {"status": "ok"})
            elif self.path == "/props":
                with state.lock:
                    busy = state.busy
                # fake_busy is ours (llama-server has no such field): requests being answered now,
                # which may exceed total_slots when a client sends more than it should
                self._json(200, {"total_slots": state.slots, "model_alias": state.alias, "fake_busy": busy})
            elif self.path == "/slots":
                with state.lock:
                    busy = state.busy
                self._json(200, [{"id": i, "is_processing": i < busy} for i in range(state.slots)])
            else:
                self._json(404, {"error": {"code": 404, "message": "File Not Found", "type": "not_found_error"}})

        def do_POST(self) -> None:  # noqa: N802
            length = int(self.headers.get("Content-Length") or 0)
            try:
                body = json.loads(self.rfile.read(length) or b"{}")
            except ValueError:
                self._json(400, {"error": {"code": 400, "message": "bad json", "type": "invalid_request_error"}})
                return
            if self.path == "/v1/embeddings":
                inputs = body.get("input")
                inputs = inputs if isinstance(inputs, list) else [inputs]
                data = [{"object": "embedding", "index": i, "embedding": [0.1, 0.2, 0.3]} for i in range(len(inputs))]
                self._json(200, {"object": "list", "model": state.alias, "data": data, "usage": {"prompt_tokens": 1, "total_tokens": 1}})
                return
            if self.path not in ("/v1/chat/completions", "/v1/completions"):
                self._json(404, {"error": {"code": 404, "message": "File Not Found", "type": "not_found_error"}})
                return
            with state.lock:
                state.busy += 1
            try:
                self._answer(body, chat=self.path == "/v1/chat/completions")
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client (the proxy) went away: free the slot
            finally:
                with state.lock:
                    state.busy -= 1

        def _answer(self, body: dict, chat: bool) -> None:
            tokens = int(body.get("max_tokens") or state.behaviour.get("tokens", 5))
            delay = float(state.behaviour.get("token_delay", 0.0))
            words = [f"tok{i} " for i in range(tokens)]
            created = int(time.time())
            if not body.get("stream"):
                time.sleep(delay * tokens)
                text = "".join(words)
                choice = {"index": 0, "finish_reason": "length"}
                choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
                usage = {"prompt_tokens": 3, "completion_tokens": tokens, "total_tokens": tokens + 3}
                kind = "chat.completion" if chat else "text_completion"
                self._json(200, {"id": "fake-1", "object": kind, "created": created, "model": state.alias, "choices": [choice], "usage": usage})
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for word in words:
                delta = {"delta": {"content": word}} if chat else {"text": word}
                chunk = {"id": "fake-1", "object": "chat.completion.chunk", "created": created, "model": state.alias,
                         "choices": [{"index": 0, "finish_reason": None, **delta}]}
                self._chunk(b"data: " + json.dumps(chunk).encode() + b"\n\n")
                if delay:
                    time.sleep(delay)
            final = {"id": "fake-1", "object": "chat.completion.chunk", "created": created, "model": state.alias,
                     "choices": [{"index": 0, "finish_reason": "length", "delta": {}}],
                     "usage": {"prompt_tokens": 3, "completion_tokens": tokens, "total_tokens": tokens + 3}}
            self._chunk(b"data: " + json.dumps(final).encode() + b"\n\n")
            self._chunk(b"data: [DONE]\n\n")
            self._chunk(b"")

        def _chunk(self, data: bytes) -> None:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()

    return Handler


def main(argv: list[str]) -> int:
    args, behaviour = parse_args(argv)
    print(f"fake llama-server: model {args.model} alias {args.alias}", flush=True)
    if "exit_on_load" in behaviour:
        time.sleep(float(behaviour.get("load_delay", 0.05)))
        print("gguf_init_from_file: failed to load model: invalid magic", flush=True)
        return int(behaviour["exit_on_load"])
    if behaviour.get("ignore_sigterm"):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    state = State(args, behaviour)
    server = ThreadingHTTPServer((args.host, args.port), make_handler(state))
    server.daemon_threads = True
    print(f"main: server is listening on http://{args.host}:{args.port}", flush=True)
    try:
        server.serve_forever(poll_interval=0.05)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
