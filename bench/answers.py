#!/usr/bin/env python3
"""Do two checkouts answer alike, byte for byte? ``python bench/answers.py REPO_A [REPO_B]``.

Theory of operation: one temporary folder holds one proxy.ini, the fake models'
JSON files and a "llama-server" script that runs this repository's
``tests/fake_llama_server.py``. A fake Ollama (``tests/fake_ollama.py``, in a
thread of this process) serves the ``backend = ollama`` models. Each checkout in
turn (A, then B; default B: this repository) runs as ``python -m smart_proxy`` with
``PYTHONPATH=REPO``, on the same port, with that same proxy.ini and the bundled
agents of this repository's ``agents/`` (``--agents``; they import ``smart_proxy``
from the checkout under test). The matrix of :func:`matrix` goes to it one request at a
time, in order, each on a new connection written by hand (so malformed requests
are possible), and the answer is kept: status line, headers, and the body as the
client reads it (de-chunked: how a stream was cut into chunks depends on timing,
not on the code). Then the proxy is stopped, the fake Ollama forgets what it saw,
and the next checkout gets the same matrix. A request that changes state (a load,
an unload) changes it alike on both, so later answers (``/api/ps``) stay
comparable.

What is compared, and what is left out (:data:`DROPPED_HEADERS`, :data:`CLOCKS`):

* status line exactly; headers as a sorted multiset, names and values exactly,
  without ``date`` and ``server`` (Hypercorn's clock and version string); ``allow``
  as a set of methods (werkzeug's order follows the process's hash seed). Every
  request carries its own ``X-Request-Id`` (``answers-N``), so the echoed id is
  deterministic and compared: no header holds a per-process random value then.
* the body byte for byte after :data:`CLOCKS` replaced the values that differ from
  run to run by nature: OpenAI ``created`` (seconds since the epoch, the fake
  llama-server's and ``/v1/models``'s clock), Ollama ``created_at`` and
  ``expires_at`` (wall-clock timestamps), Ollama ``*_duration`` (nanoseconds measured
  per request), /parallel's per-candidate ``seconds``, and in ``/health``'s detail
  each fake llama-server's ``port``, ``pid`` and ``last_used`` time, and a
  model's ``retry_in``. The fakes' own ids are fixed (``fake-1``, ``chatcmpl-1``),
  so ids need no normalising. When a replacement changed the body,
  ``content-length`` is compared against the normalised body's length instead.
* ``/metrics``: status and content type only (its counters and histograms
  differ by what each run's timings were).
* what reached the Ollama upstream while a request was answered: the fake
  Ollama's log of requests (method, path, the body's bytes), sorted (/parallel's
  candidates arrive in either order), without the proxy's ``/api/version`` probes
  (on a timer).
  What reached a llama-server shows in the answers of the ``echo`` model, which
  answers with the request body it was sent, byte for byte.

Exit 0 when every answer matches; otherwise a table of the mismatches and a
unified diff of each (bodies pretty-printed for the diff only), and exit 1.
``--save FILE`` writes every answer of both runs as JSON.

Not covered: chunk boundaries of streams (timing), clients that hang up, API keys
and CORS (the proxy.ini sets neither), WebSocket upgrades, draining, Hugging Face
downloads (``/api/pull`` of a ``repo =`` model), and concurrency (requests go one
at a time).
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import functools
import http.client
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

HERE = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(HERE))

from tests.fake_ollama import FakeOllama  # noqa: E402

#: Response headers not compared: Hypercorn's clock and its version string.
DROPPED_HEADERS = frozenset({"date", "server"})
#: Headers compared as a set of comma-separated tokens: werkzeug lists a route's methods in ``Allow``
#: from a set, in an order that changes with each process's hash seed.
UNORDERED_HEADERS = frozenset({"allow"})

#: (what, pattern, replacement) for the body values that differ from run to run by nature.
CLOCKS: list[tuple[str, re.Pattern[bytes], bytes]] = [
    ("OpenAI created (epoch seconds)", re.compile(rb'"created": ?\d+'), b'"created": 0'),
    ("Ollama created_at (wall clock)", re.compile(rb'"created_at": ?"[^"]*"'), b'"created_at": ""'),
    ("Ollama expires_at (now + keep_alive)", re.compile(rb'"expires_at": ?("[^"]*"|[-\d.e+]+)'), b'"expires_at": 0'),
    ("Ollama *_duration (ns measured)", re.compile(rb'"(\w+_duration)": ?\d+'), rb'"\1": 0'),
    ("/parallel candidate seconds", re.compile(rb'"seconds": ?[-\d.e+]+'), b'"seconds": 0'),
    ("/health server port, pid", re.compile(rb'"(port|pid)": ?\d+'), rb'"\1": 0'),
    ("/health last_used, retry_in", re.compile(rb'"(last_used|retry_in)": ?[-\d.e+]+'), rb'"\1": 0'),
]


class Case(NamedTuple):
    name: str
    method: str
    path: str
    body: bytes | None = None
    headers: tuple[tuple[str, str], ...] = ()
    #: "full", or "status" (status and content type only: /metrics)
    compare: str = "full"


class Answer(NamedTuple):
    status_line: str
    headers: list[tuple[str, str]]
    body: bytes
    #: What the fake Ollama was sent while this request was answered (JSON lines, sorted).
    upstream: bytes = b""


def j(value: object) -> bytes:
    return json.dumps(value).encode()


JSON = (("Content-Type", "application/json"),)


def post(name: str, path: str, body: object, *, method: str = "POST", headers: tuple = JSON) -> Case:
    raw = body if isinstance(body, bytes) else j(body)
    return Case(name, method, path, raw, headers)


def get(name: str, path: str, *, method: str = "GET", headers: tuple = (), compare: str = "full") -> Case:
    return Case(name, method, path, None, headers, compare)


# ---- the matrix ------------------------------------------------------------------------------


MODELS = {
    "local": {"tokens": 3, "slots": 4},
    "echo": {"echo": True, "slots": 4},  # answers with the body the proxy sent it, exactly as received
    "structured": {"content": '{"answer": 42, "ok": true}', "slots": 4},
    "embed": {"slots": 4},
    "broken": {"reject": {"status": 500, "message": "the fake failed"}},
    "html": {"fault": "html_error"},
}


def ini_text(work: Path, binary: str, ollama_url: str, max_body: int, agents: Path) -> str:
    lines = ["[proxy]", "host = 127.0.0.1", "grace = 1s", f"max_body = {max_body}",
             "[pool]", f"llama_server = {binary}", f"size = {len(MODELS) + 1}", "load_timeout = 20s",
             "stop_timeout = 2s", "health_interval = 0"]
    for name, behaviour in MODELS.items():
        path = work / f"{name}.json"
        path.write_text(json.dumps(behaviour))
        lines += [f"[model:{name}]", f"path = {path}"]
        if name == "embed":
            lines.append("embeddings = true")
    # "remote-llm" is its name on the fake too: its requests go as the client's bytes, not re-encoded
    lines += ["[model:remote-llm]", "backend = ollama", f"url = {ollama_url}"]
    lines += ["[model:up]", "backend = ollama", f"url = {ollama_url}", "upstream_model = remote-llm",
              "[model:up-embed]", "backend = ollama", f"url = {ollama_url}", "upstream_model = remote-embed:latest",
              "[agents]", f"dir = {agents}", "enabled = rag, parallel, json", "timeout = 20s"]
    return "\n".join(lines) + "\n"


def _chat(model: str, text: str = "Hello", **extra: object) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": text}], **extra}


def _ollama(path: str, model: str, text: str = "Hello", **extra: object) -> dict:
    """An /api/chat or /api/generate body."""
    asked = {"messages": [{"role": "user", "content": text}]} if path == "/api/chat" else {"prompt": text}
    return {"model": model, **asked, "options": {"num_predict": 3}, **extra}


def matrix(max_body: int) -> list[Case]:
    """Every route, stream or not, each kind of model, agents, load and unload, and the errors; in order."""
    cases: list[Case] = []
    add = cases.append

    # probes and lists before anything is loaded
    for path in ("/", "/health", "/health/ready", "/plugins", "/v1/models", "/api/tags", "/api/ps", "/api/version",
                 "/health/upstreams"):
        add(get(f"GET {path} (cold)", path))
    add(get("HEAD /", "/", method="HEAD"))
    add(get("GET /health behind a proxy (summary only)", "/health", headers=(("X-Forwarded-For", "10.0.0.1"),)))
    add(get("GET /metrics", "/metrics", compare="status"))

    # OpenAI routes
    chat = "/v1/chat/completions"
    for model in ("local", "echo", "up"):
        for stream in (False, True):
            add(post(f"{chat} {model} stream={stream}", chat, _chat(model, max_tokens=3, stream=stream)))
    for path in (chat, "/api/chat"):
        for stream in (False, True):
            odd = b'{ "model":"remote-llm",\n  "messages":[{"role":"user","content":"Hi \\u00e9"}], "stream":%s }'
            add(post(f"{path} remote-llm as sent stream={stream}", path, odd % (b"true" if stream else b"false")))
    add(post(f"{chat} local include_usage", chat, _chat("local", stream=True, stream_options={"include_usage": True})))
    add(post(f"{chat} echo unknown fields kept", chat, {"x_first": [1, {"b": 2}], **_chat("echo"), "temperature": 0.25}))
    add(post(f"{chat} echo unicode", chat, _chat("echo", "h\u00e9llo \u2603 \U0001f600")))
    for agent in ("rag", "json", "parallel"):
        for model in ("local", "echo", "up"):
            for stream in (False, True):
                add(post(f"{chat} /{agent} {model} stream={stream}", chat,
                         _chat(model, f"/{agent} What is smart-proxy?", stream=stream)))
    add(post(f"{chat} /json structured", chat, _chat("structured", "/json give me JSON")))
    add(post(f"{chat} /rag /json chain", chat, _chat("echo", "/rag /json What is smart-proxy?")))
    add(post(f"{chat} /usr is not a command", chat, _chat("echo", "/usr/bin is a folder")))
    for model, stream in (("broken", False), ("broken", True), ("html", False), ("html", True)):
        add(post(f"{chat} upstream 500 {model} stream={stream}", chat, _chat(model, stream=stream)))
    add(post(f"{chat} /rag on broken", chat, _chat("broken", "/rag What is smart-proxy?")))
    add(post(f"{chat} /json on broken", chat, _chat("broken", "/json hi")))

    comp = "/v1/completions"
    for model in ("local", "echo", "up"):
        for stream in (False, True):
            add(post(f"{comp} {model} stream={stream}", comp,
                     {"model": model, "prompt": "Once upon", "max_tokens": 2, "stream": stream}))
    for agent in ("rag", "parallel"):
        for stream in (False, True):
            add(post(f"{comp} /{agent} local stream={stream}", comp,
                     {"model": "local", "prompt": f"/{agent} Once upon", "stream": stream}))
    add(post(f"{comp} /rag up", comp, {"model": "up", "prompt": "/rag Once upon"}))

    emb = "/v1/embeddings"
    add(post(f"{emb} embed list", emb, {"model": "embed", "input": ["a", "b"]}))
    add(post(f"{emb} embed string", emb, {"model": "embed", "input": "a"}))
    add(post(f"{emb} up-embed (the fake has no /v1/embeddings)", emb, {"model": "up-embed", "input": "a"}))

    # Ollama generation routes
    for path in ("/api/chat", "/api/generate"):
        body = functools.partial(_ollama, path)
        for model in ("local", "echo", "up"):
            for stream in (False, True, None):  # None: Ollama streams unless told not to
                extra = {} if stream is None else {"stream": stream}
                add(post(f"{path} {model} stream={stream}", path, body(model, **extra)))
        for agent in ("rag", "json", "parallel"):
            for model in ("local", "up"):
                for stream in (False, True):
                    add(post(f"{path} /{agent} {model} stream={stream}", path,
                             body(model, f"/{agent} What is smart-proxy?", stream=stream)))
        add(post(f"{path} /rag echo", path, body("echo", "/rag What is smart-proxy?", stream=False)))
        add(post(f"{path} echo think", path, body("echo", think=True, stream=False)))
        add(post(f"{path} echo format json", path, body("echo", format="json", stream=False)))
        add(post(f"{path} echo keep_alive 10m", path, body("echo", keep_alive="10m", stream=False)))
        add(post(f"{path} upstream 500 stream=False", path, body("broken", stream=False)))
        add(post(f"{path} upstream 500 stream=True", path, body("broken")))
        add(post(f"{path} html 500", path, body("html", stream=False)))
        add(post(f"{path} bad keep_alive", path, body("local", keep_alive="forever-ish")))
        add(post(f"{path} options not an object", path, {**body("local"), "options": "x"}))
    add(post("/api/generate echo raw", "/api/generate", {"model": "echo", "prompt": "Once", "raw": True, "stream": False}))
    add(post("/api/generate echo system+template", "/api/generate",
             {"model": "echo", "prompt": "Once", "system": "Be brief.", "stream": False}))
    add(post("/api/chat local image (no vision)", "/api/chat",
             {"model": "local", "messages": [{"role": "user", "content": "what", "images": ["aGk="]}], "stream": False}))

    # load, ps, unload, ps: state that later answers depend on
    add(post("/api/chat load local (empty messages)", "/api/chat", {"model": "local", "messages": []}))
    add(post("/api/generate load echo (no prompt)", "/api/generate", {"model": "echo"}))
    add(get("GET /api/ps (loaded)", "/api/ps"))
    add(get("GET /v1/models (loaded)", "/v1/models"))
    add(post("/api/chat unload local (keep_alive 0)", "/api/chat", {"model": "local", "messages": [], "keep_alive": 0}))
    add(post("/api/generate unload echo (keep_alive 0)", "/api/generate", {"model": "echo", "keep_alive": 0}))
    add(get("GET /api/ps (after unload)", "/api/ps"))
    add(get("GET /v1/models (after unload)", "/v1/models"))
    add(post("/api/chat unload not loaded", "/api/chat", {"model": "local", "messages": [], "keep_alive": 0}))
    add(post("/api/chat load up", "/api/chat", {"model": "up", "messages": []}))
    add(post("/api/generate unload up", "/api/generate", {"model": "up", "keep_alive": 0}))
    add(post("/api/chat load with keep_alive -1", "/api/chat", {"model": "local", "messages": [], "keep_alive": -1}))
    add(get("GET /api/ps (forever)", "/api/ps"))

    # embeddings
    for path in ("/api/embed", "/api/embeddings"):
        field = "input" if path == "/api/embed" else "prompt"
        add(post(f"{path} embed", path, {"model": "embed", field: "hello"}))
        add(post(f"{path} up-embed", path, {"model": "up-embed", field: "hello"}))
        add(post(f"{path} empty (load)", path, {"model": "embed", field: ""}))
        add(post(f"{path} not an embedding model", path, {"model": "local", field: "hello"}))
        add(post(f"{path} wrong type", path, {"model": "embed", field: 5}))
    add(post("/api/embed list", "/api/embed", {"model": "embed", "input": ["a", "bb"]}))
    add(post("/api/embed dimensions", "/api/embed", {"model": "embed", "input": ["a"], "dimensions": 2}))

    # models
    for model in ("local", "embed", "up", "nope"):
        add(post(f"/api/show {model}", "/api/show", {"model": model}))
    add(post("/api/show name (old spelling)", "/api/show", {"name": "local"}))
    for model in ("local", "up", "nope"):
        for stream in (False, True):
            add(post(f"/api/pull {model} stream={stream}", "/api/pull", {"model": model, "stream": stream}))
        add(post(f"/api/delete {model}", "/api/delete", {"model": model}, method="DELETE"))
    for path in ("/api/create", "/api/copy", "/api/push", "/api/blobs/sha256:00"):
        add(post(f"{path}", path, {"model": "x"}))
    add(get("HEAD /api/blobs/sha256:00", "/api/blobs/sha256:00", method="HEAD"))

    # errors, on every body-taking route
    routes = [chat, comp, emb, "/api/chat", "/api/generate", "/api/embed", "/api/embeddings", "/api/show", "/api/pull"]
    for path in routes:
        add(post(f"{path} bad JSON", path, b'{"model": "local", '))
        add(post(f"{path} not an object", path, b"[1, 2]"))
        add(post(f"{path} empty body", path, b""))
        add(post(f"{path} missing model", path, {"messages": [], "prompt": "x", "input": "x"}))
        add(post(f"{path} unknown model", path, {"model": "nope", "messages": [], "prompt": "x", "input": "x"}))
        add(post(f"{path} model not a string", path, {"model": 5, "messages": [], "prompt": "x", "input": "x"}))
        add(post(f"{path} over max_body (Content-Length)", path, b'{"model": "local", "x": "' + b"a" * max_body + b'"}'))
        add(Case(f"{path} over max_body (chunked)", "POST", path, b'{"model": "local", "x": "' + b"a" * max_body + b'"}',
                 (*JSON, ("Transfer-Encoding", "chunked"))))
        add(Case(f"{path} Content-Length and Transfer-Encoding", "POST", path, b'{"model": "local"}',
                 (*JSON, ("Transfer-Encoding", "chunked"), ("Content-Length", "18"))))
        add(Case(f"{path} chunked body", "POST", path, j(_chat("echo", prompt="x", input="x")),
                 (*JSON, ("Transfer-Encoding", "chunked"))))
        add(get(f"GET {path} (wrong method)", path))
    add(post(f"{chat} missing messages", chat, {"model": "local"}))
    add(post(f"{chat} messages not a list", chat, {"model": "local", "messages": "hi"}))
    add(post(f"{chat} stream not a bool", chat, _chat("local", stream="yes")))
    add(post(f"{chat} max_tokens not a number (the fake says 400)", chat, _chat("local", max_tokens="x")))
    add(post(f"{comp} missing prompt", comp, {"model": "local"}))
    add(post(f"{emb} missing input", emb, {"model": "embed"}))
    add(post("/api/chat messages not a list", "/api/chat", {"model": "local", "messages": "hi"}))
    add(post("/api/generate prompt not a string", "/api/generate", {"model": "local", "prompt": 5}))
    add(post(f"{chat} no Content-Type", chat, _chat("echo"), headers=()))
    add(post(f"{chat} deep nesting with an agent", chat,
             {**_chat("local", "/rag hi"), "x": json.loads("[" * 200 + "]" * 200)}))
    add(get("GET /nope (unknown path)", "/nope"))
    add(post("POST /nope", "/nope", {}))
    add(get("DELETE /v1/models", "/v1/models", method="DELETE"))
    add(get("OPTIONS /v1/chat/completions (no CORS configured)", chat, method="OPTIONS"))
    add(get("GET /health/../health", "/health/../health"))

    # and the lists again, after everything
    for path in ("/health", "/v1/models", "/api/ps", "/api/tags", "/plugins"):
        add(get(f"GET {path} (end)", path))
    add(get("GET /metrics (end)", "/metrics", compare="status"))
    return cases


# ---- one checkout ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def request_bytes(case: Case, port: int, number: int) -> bytes:
    headers = [("Host", f"127.0.0.1:{port}"), ("X-Request-Id", f"answers-{number}"), *case.headers]
    names = {name.lower() for name, _ in case.headers}
    body = case.body
    if body is not None and "transfer-encoding" in names and "content-length" not in names:
        body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body) if body else b"0\r\n\r\n"
    elif body is not None and "content-length" not in names:
        headers.append(("Content-Length", str(len(body))))
    elif body is not None and "transfer-encoding" in names:  # both: the body as the chunked framing says
        body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    head = f"{case.method} {case.path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n"
    return head.encode("latin-1") + (body or b"")


def exchange(case: Case, port: int, number: int) -> Answer:
    """Send one request on a new connection; the answer as the client reads it."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # an early answer (413) may close first
            sock.sendall(request_bytes(case, port, number))
        response = http.client.HTTPResponse(sock, method=case.method)
        try:
            response.begin()
        except (http.client.HTTPException, OSError) as exc:
            return Answer(f"(no answer: {type(exc).__name__}: {exc})", [], b"")
        try:
            body = response.read()
        except http.client.IncompleteRead as exc:
            body = exc.partial + b"\n(incomplete read)"
        line = f"HTTP/{response.version / 10:.1f} {response.status} {response.reason}"
        return Answer(line, list(response.getheaders()), body)


class Proxy:
    """``python -m smart_proxy`` of one checkout, on ``port``."""

    def __init__(self, repo: Path, config: Path, port: int, log_path: Path) -> None:
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115  # closed in stop()
        env = {**os.environ, "PYTHONPATH": str(repo)}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "smart_proxy", "--config", str(config), "--port", str(port), "--log-level", "info"],
            stdout=self._log, stderr=subprocess.STDOUT, cwd=config.parent, env=env, start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{repo}: smart-proxy exited {self.process.returncode}:\n{log_path.read_text()}")
            with contextlib.suppress(OSError), urllib.request.urlopen(f"http://127.0.0.1:{port}/health/ready", timeout=2):
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{repo}: smart-proxy did not become ready:\n{log_path.read_text()}")

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self._log.close()


def run_checkout(repo: Path, config: Path, port: int, cases: list[Case], log_path: Path,
                 received: list[tuple[str, str, str]]) -> list[Answer]:
    """Every case through ``repo``'s proxy, each answer with what the fake Ollama ``received`` meanwhile."""
    proxy = Proxy(repo, config, port, log_path)
    answers = []
    try:
        for number, case in enumerate(cases):
            before = len(received)
            answer = exchange(case, port, number)
            answers.append(answer._replace(upstream=upstream_log(received[before:])))
    finally:
        proxy.stop()
    return answers


def upstream_log(requests: list[tuple[str, str, str]]) -> bytes:
    """Requests the fake Ollama saw as sorted JSON lines: sorted, since /parallel sends its candidates at once.

    Left out: the proxy's ``/api/version`` probes, which come on a timer, not from a request.
    """
    lines = sorted(json.dumps(entry, ensure_ascii=False).encode() for entry in requests if entry[1] != "/api/version")
    return b"".join(line + b"\n" for line in lines)


def record_raw(fake: FakeOllama) -> list[tuple[str, str, str]]:
    """Make ``fake`` keep every request as (method, path, body exactly as sent); the list it fills.

    FakeOllama keeps bodies parsed; the bytes are what tells a re-encoded body from a relayed one.
    Its handler class is replaced on its server (a private attribute of tests/fake_ollama.py).
    """
    received: list[tuple[str, str, str]] = []
    base = fake._server.RequestHandlerClass

    class Recording(base):  # type: ignore[misc, valid-type]
        def _body(self) -> dict:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            received.append((self.command, self.path, raw.decode("utf-8", "backslashreplace")))
            real, self.rfile = self.rfile, io.BytesIO(raw)  # the fake reads the body from here
            try:
                return super()._body()
            finally:
                self.rfile = real

        def do_GET(self) -> None:  # noqa: N802
            received.append(("GET", self.path, ""))
            super().do_GET()

    fake._server.RequestHandlerClass = Recording
    return received


# ---- comparing ---------------------------------------------------------------------------------


def normalise(case: Case, answer: Answer) -> Answer:
    """The answer as compared: see the module docstring."""
    headers = [(name.lower(), value) for name, value in answer.headers if name.lower() not in DROPPED_HEADERS]
    headers = [(n, ", ".join(sorted(v.split(", "))) if n in UNORDERED_HEADERS else v) for n, v in headers]
    if case.compare == "status":
        kept = [(name, value) for name, value in headers if name == "content-type"]
        return Answer(answer.status_line, kept, b"", answer.upstream)
    body = answer.body
    for _what, pattern, replacement in CLOCKS:
        body = pattern.sub(replacement, body)
    if body != answer.body:
        headers = [(n, str(len(body)) if n == "content-length" else v) for n, v in headers]
    return Answer(answer.status_line, sorted(headers), body, answer.upstream)


def readable(answer: Answer) -> list[str]:
    """Lines for a diff: the status line, the headers, the body (JSON lines pretty-printed)."""
    lines = [answer.status_line, *(f"{name}: {value}" for name, value in answer.headers), ""]
    for line in answer.body.decode("utf-8", "backslashreplace").split("\n"):
        text = line.removeprefix("data: ")
        try:
            parsed = json.loads(text)
        except ValueError:
            lines.append(line)
            continue
        prefix = "data: " if line.startswith("data: ") else ""
        pretty = json.dumps(parsed, indent=1, ensure_ascii=False).split("\n")
        lines += [prefix + pretty[0], *pretty[1:]]
    if answer.upstream:
        lines += ["", "(sent to the fake Ollama meanwhile)"]
        lines += answer.upstream.decode("utf-8", "backslashreplace").splitlines()
    return lines


def report(cases: list[Case], a: list[Answer], b: list[Answer], names: tuple[str, str]) -> int:
    mismatches = []
    for number, (case, one, two) in enumerate(zip(cases, a, b, strict=True)):
        left, right = normalise(case, one), normalise(case, two)
        if left != right:
            mismatches.append((number, case, left, right))
    print(f"{len(cases)} requests, {len(cases) - len(mismatches)} alike, {len(mismatches)} different")
    if not mismatches:
        return 0
    print("\n| # | request | A | B | differs in |\n|---|---|---|---|---|")
    for number, case, left, right in mismatches:
        parts = [what for what, x, y in (("status", left.status_line, right.status_line),
                                         ("headers", left.headers, right.headers), ("body", left.body, right.body),
                                         ("upstream", left.upstream, right.upstream)) if x != y]
        print(f"| {number} | {case.name} | {left.status_line.split(' ', 1)[-1]} | {right.status_line.split(' ', 1)[-1]} "
              f"| {', '.join(parts)} |")
    for number, case, left, right in mismatches:
        print(f"\n### {number}: {case.method} {case.path}: {case.name}")
        diff = difflib.unified_diff(readable(left), readable(right), f"A {names[0]}", f"B {names[1]}", lineterm="", n=2)
        print("\n".join(diff))
    return 1


def as_json(answers: list[Answer]) -> Iterator[dict]:
    for answer in answers:
        yield {"status": answer.status_line, "headers": answer.headers,
               "body": answer.body.decode("utf-8", "backslashreplace"),
               "upstream": answer.upstream.decode("utf-8", "backslashreplace")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", type=Path, help="a checkout (its smart_proxy is run with PYTHONPATH=A)")
    parser.add_argument("b", type=Path, nargs="?", default=HERE, help="another checkout (default: this one)")
    parser.add_argument("--max-body", type=int, default=4096, help="[proxy] max_body for the run (bytes)")
    parser.add_argument("--agents", type=Path, default=HERE / "agents",
                        help="the agents folder (default: this repository's; they import smart_proxy.agents)")
    parser.add_argument("--save", type=Path, help="write every answer of both runs to this JSON file")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (proxy.ini, logs)")
    args = parser.parse_args()
    repos = (args.a.resolve(), args.b.resolve())
    for repo in repos:
        if not (repo / "smart_proxy" / "__init__.py").is_file():
            parser.error(f"{repo} is not a smart-proxy checkout")
    began = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="smart-proxy-answers-"))
    fake = FakeOllama(tokens=3)
    received = record_raw(fake)
    fake.start()
    try:
        binary = work / "fake-llama-server"
        binary.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{HERE / "tests" / "fake_llama_server.py"}" "$@"\n')
        binary.chmod(0o755)
        config = work / "proxy.ini"
        config.write_text(ini_text(work, str(binary), fake.url, args.max_body, args.agents.resolve()))
        cases = matrix(args.max_body)
        port = free_port()
        answers = []
        for label, repo in zip("AB", repos, strict=True):
            fake.requests.clear()
            fake.loaded.clear()
            received.clear()
            started = time.monotonic()
            answers.append(run_checkout(repo, config, port, cases, work / f"proxy-{label}.log", received))
            print(f"{label} {repo}: {len(cases)} requests in {time.monotonic() - started:.1f} s", file=sys.stderr)
        if args.save:
            args.save.write_text(json.dumps({"cases": [c.name for c in cases], "A": list(as_json(answers[0])),
                                             "B": list(as_json(answers[1]))}, indent=1))
        status = report(cases, answers[0], answers[1], (str(repos[0]), str(repos[1])))
        print(f"normalised: {'; '.join(what for what, _, _ in CLOCKS)}; headers dropped: "
              f"{', '.join(sorted(DROPPED_HEADERS))}; unordered: {', '.join(sorted(UNORDERED_HEADERS))}; "
              "/metrics: status and content-type only")
        print(f"took {time.monotonic() - began:.1f} s", file=sys.stderr)
        return status
    finally:
        fake.stop()
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
