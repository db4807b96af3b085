"""Real nginx, with the site from docs/deploy.md, in front of a real proxy process.

nginx runs in the foreground with its own prefix, pid and logs in tmp_path, on
127.0.0.1; the site is the documented one with only its two ports changed, inside
an ``http`` block that compresses event streams, as a busy server's might. The
fake llama-server writes a token every 0.25 s, so "streamed through nginx" is a
question of timing that cannot pass by luck: the chunks must arrive apart. Both
dialects are measured: OpenAI's SSE (``/v1/chat/completions``) and Ollama's NDJSON
(``/api/chat``, which the proxy translates from llama-server's SSE line by line). A
control run with the site's streaming lines undone shows the same measurement
catching a buffered stream.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import attrs
import httpx
import pytest

from smart_proxy.process import free_port

from ..conftest import _missing, deploy_doc_block

TOKEN_DELAY = 0.25
TOKENS = 8


def find_nginx() -> str:
    path = shutil.which("nginx") or ("/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None)
    if path is None:
        _missing("nginx (Debian package nginx: .ci/install-nginx)")
    assert path is not None
    return path


def render_site(proxy_port: int, nginx_port: int, edits: dict[str, str]) -> str:
    """The documented site, listening on 127.0.0.1:nginx_port and proxying to proxy_port."""
    site = deploy_doc_block("nginx", "upstream smart_proxy {")
    for old, new in [
        ("server 127.0.0.1:8080;", f"server 127.0.0.1:{proxy_port};"),
        ("listen 80;", f"listen 127.0.0.1:{nginx_port};"),
        *edits.items(),
    ]:
        assert site.count(old) == 1, f"the documented site no longer has {old!r}; update this test with it"
        site = site.replace(old, new)
    return site


class Nginx:
    def __init__(self, binary: str, prefix: Path, site: str, port: int) -> None:
        self.prefix = prefix
        self.url = f"http://127.0.0.1:{port}"
        prefix.mkdir()
        (prefix / "site.conf").write_text(site)
        temp = {name: prefix / name for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")}
        (prefix / "nginx.conf").write_text(
            f"""
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log info;
events {{ worker_connections 64; }}
http {{
    access_log {prefix}/access.log;
    gzip on;
    gzip_min_length 1;
    gzip_types text/event-stream application/x-ndjson application/json;
    client_body_temp_path {temp["client_body"]};
    proxy_temp_path {temp["proxy"]};
    fastcgi_temp_path {temp["fastcgi"]};
    uwsgi_temp_path {temp["uwsgi"]};
    scgi_temp_path {temp["scgi"]};
    include {prefix}/site.conf;
}}
"""
        )
        conf = ["-p", str(prefix), "-c", str(prefix / "nginx.conf"), "-g", "daemon off;"]
        test = subprocess.run([binary, "-t", *conf], capture_output=True, text=True, timeout=30)
        assert test.returncode == 0, test.stderr
        self.process = subprocess.Popen([binary, *conf], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 15
        while True:
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"nginx did not come up:\n{self.error_log()}")
            time.sleep(0.05)

    def error_log(self) -> str:
        path = self.prefix / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGQUIT)  # graceful: finish and exit
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        assert self.process.stdout is not None
        self.process.stdout.close()


@pytest.fixture
def nginx_in_front(proxy_process, fake_binary: str, tmp_path: Path) -> Iterator:
    """``nginx_in_front(edits={})``: a proxy process and nginx with the (edited) documented site before it."""
    binary = find_nginx()
    started: list[Nginx] = []

    def start(edits: dict[str, str] | None = None) -> tuple[Nginx, object]:
        model = tmp_path / "a.json"
        model.write_text(json.dumps({"token_delay": TOKEN_DELAY}))
        ini = f"[pool]\nllama_server = {fake_binary}\nload_timeout = 10s\n[model:a]\npath = {model}\n"
        proxy = proxy_process(ini, "--log-format", "json")
        proxy_port = int(proxy.url.rsplit(":", 1)[1])
        nginx_port = free_port()
        site = render_site(proxy_port, nginx_port, edits or {})
        started.append(Nginx(binary, tmp_path / f"nginx{len(started)}", site, nginx_port))
        return started[-1], proxy

    try:
        yield start
    finally:
        for nginx in started:
            nginx.stop()


def chat(stream: bool, max_tokens: int) -> dict:
    return {"model": "a", "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens, "stream": stream}


def ollama_chat(stream: bool, num_predict: int) -> dict:
    return {
        "model": "a",
        "messages": [{"role": "user", "content": "hi"}],
        "options": {"num_predict": num_predict},
        "stream": stream,
    }


@attrs.frozen
class Dialect:
    """How one API streams: where to post, what to post, what the stream is and how to read it."""

    path: str
    body: Callable[[bool, int], dict]
    content_type: str

    def check(self, body: bytes) -> None:
        """``body`` is a whole streamed answer of TOKENS tokens, properly ended."""
        if self.content_type == "text/event-stream":
            assert body.count(b'"content"') == TOKENS and body.endswith(b"data: [DONE]\n\n"), body
            return
        lines = [json.loads(line) for line in body.decode().splitlines() if line]
        assert [line["done"] for line in lines] == [False] * TOKENS + [True], lines
        assert "".join(line["message"]["content"] for line in lines) == "".join(f"tok{i} " for i in range(TOKENS))
        assert lines[-1]["eval_count"] == TOKENS


OPENAI = Dialect("/v1/chat/completions", chat, "text/event-stream")
OLLAMA = Dialect("/api/chat", ollama_chat, "application/x-ndjson")
DIALECTS = pytest.mark.parametrize("dialect", [OPENAI, OLLAMA], ids=["openai-sse", "ollama-ndjson"])


def stream_arrivals(url: str, dialect: Dialect) -> tuple[list[float], bytes]:
    """Seconds after the request at which each piece of a streamed answer arrived, and the whole answer."""
    with httpx.Client(base_url=url, timeout=30) as client:  # it asks for gzip, as browsers and SDKs do
        assert client.post(dialect.path, json=dialect.body(False, 1)).status_code == 200  # load the model
        arrivals: list[tuple[float, bytes]] = []
        start = time.monotonic()
        with client.stream("POST", dialect.path, json=dialect.body(True, TOKENS)) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith(dialect.content_type)
            for chunk in response.iter_bytes():
                arrivals.append((time.monotonic() - start, chunk))
    return [at for at, _ in arrivals], b"".join(chunk for _, chunk in arrivals)


@DIALECTS
def test_a_streamed_answer_comes_through_nginx_chunk_by_chunk(nginx_in_front, dialect: Dialect) -> None:
    nginx, _proxy = nginx_in_front()
    times, body = stream_arrivals(nginx.url, dialect)
    dialect.check(body)
    assert len(times) >= TOKENS // 2, f"nginx delivered the stream in {len(times)} pieces: {times}"
    generation = TOKENS * TOKEN_DELAY  # 2 s
    assert times[0] < generation / 3, f"the first token came after {times[0]:.2f}s: {times}"
    assert times[-1] - times[0] > generation * 0.6, f"the stream arrived all at once: {times}"
    # and the pieces came spread out, not bunched at both ends
    assert sum(1 for at in times if generation * 0.25 < at < generation * 0.85) >= 2, times


@DIALECTS
def test_control_without_the_sites_streaming_lines_the_answer_arrives_at_once(nginx_in_front, dialect) -> None:
    """The measurement above can fail: undo ``proxy_buffering off`` and ``gzip off`` and it does."""
    nginx, _proxy = nginx_in_front(
        {
            # the proxy's X-Accel-Buffering: no would turn buffering off on its own; a proxy in between may drop it
            "proxy_buffering off;": "proxy_buffering on; proxy_ignore_headers X-Accel-Buffering;",
            "gzip off;": "gzip on;",
        }
    )
    times, body = stream_arrivals(nginx.url, dialect)
    dialect.check(body)
    assert times[0] > TOKENS * TOKEN_DELAY * 0.8, f"a buffered stream came in pieces after all: {times}"


def test_probes_and_request_ids_through_nginx(nginx_in_front) -> None:
    nginx, proxy = nginx_in_front()
    with httpx.Client(base_url=nginx.url, timeout=30) as client:
        ready = client.get("/health/ready")
        assert (ready.status_code, ready.json()) == (200, {"status": "ready"})
        health = client.get("/health")
        assert health.status_code == 200 and health.json()["pool"]["capacity"] == 2
        assert client.get("/metrics").status_code == 200  # from 127.0.0.1: allowed
        kept = client.post("/v1/chat/completions", json=chat(False, 2), headers={"X-Request-Id": "through-nginx-1"})
        assert kept.headers["x-request-id"] == "through-nginx-1"
        made = client.get("/v1/models")
        assert len(made.headers["x-request-id"]) == 32  # nginx's $request_id, kept by the proxy
    assert proxy.stop() == 0  # the access line is written just after the answer: stop, so it is in the log
    log = [json.loads(line) for line in proxy.log().splitlines() if line.startswith("{")]
    assert any(line.get("request_id") == made.headers["x-request-id"] for line in log)
    assert any(line.get("request_id") == "through-nginx-1" for line in log)
