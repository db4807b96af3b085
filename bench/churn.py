#!/usr/bin/env python3
"""Connection churn and a mixed load with aborts: ``python bench/churn.py [--proxy-repo REPO] [--quick]``.

smart-proxy runs as a process (pinned to the proxy core, see :mod:`harness`) with one
model served by the project's fake llama-server (``tests/fake_llama_server.py``, pinned
to the load core: no Go needed). The load comes from this process, over raw sockets
to 127.0.0.1, in two bounded phases:

* **churn**: ``--clients`` clients each connect, send one request, read the answer,
  wait ``--linger`` (0.1 s: a client that closes its keep-alive connection a moment
  after its answer), close, and start again, until ``--connections`` connections
  were made or ``--seconds`` passed.
* **mixed**: the same clients for ``--seconds``, each on a keep-alive connection that
  it reuses for a few requests: a non-streamed chat, a streamed chat read to its end,
  a streamed chat abandoned after its first chunk (the connection closed mid-answer),
  a model list; then it closes the connection and opens another.

Before, every second during, and five seconds after each phase it reads the proxy's
open descriptors (``/proc/PID/fd``, with TCP sockets in CLOSE-WAIT counted apart) and
RSS, and prints them with the request counts and errors. The figures for the
``## Churn and soak`` section of ``docs/reliability.md`` come from here. Run it under
``flock /tmp/bench.lock`` on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness as h  # noqa: E402

from smart_proxy.binary import cpu_name  # noqa: E402

FAKE = h.REPO / "tests" / "fake_llama_server.py"


class Sampler:
    """Descriptors, CLOSE-WAIT sockets and RSS of one process: now, and the peak over a phase."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak_fds = 0
        self.peak_rss = 0.0

    def now(self) -> dict:
        kinds = h.fd_kinds(self.pid)
        return {"fds": sum(kinds.values()), "close_wait": kinds.get("tcp close_wait", 0), "rss_mb": h.rss_mb(self.pid)}

    async def run(self) -> None:
        while True:
            sample = self.now()
            self.peak_fds = max(self.peak_fds, sample["fds"])
            self.peak_rss = max(self.peak_rss, sample["rss_mb"])
            await trio.sleep(1)


class Tally:
    def __init__(self) -> None:
        self.connections = 0
        self.requests = 0
        self.aborted = 0
        self.errors: dict[str, int] = {}

    def error(self, what: str) -> None:
        self.errors[what] = self.errors.get(what, 0) + 1


def request(method: str, path: str, body: dict | None = None) -> bytes:
    data = json.dumps(body).encode() if body is not None else b""
    head = f"{method} {path} HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
    return head.encode() + data


CHAT = {"model": "bench", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
REQUESTS = {
    "models": request("GET", "/v1/models"),
    "chat": request("POST", "/v1/chat/completions", CHAT),
    "stream": request("POST", "/v1/chat/completions", {**CHAT, "stream": True}),
}


async def exchange(stream: trio.SocketStream, payload: bytes, *, abort: bool = False) -> int:
    """Send one request, read its answer (Content-Length or chunked); its status. ``abort``: stop after the head."""
    await stream.send_all(payload)
    buffer = b""
    while b"\r\n\r\n" not in buffer:
        data = await stream.receive_some(65536)
        if not data:
            raise ConnectionError("closed before the answer's head")
        buffer += data
    head, _, body = buffer.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    if abort:
        return status
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(b":") for line in lines[1:])}
    if b"content-length" in headers:
        length = int(headers[b"content-length"])
        while len(body) < length:
            data = await stream.receive_some(65536)
            if not data:
                raise ConnectionError("closed in the middle of the body")
            body += data
    else:
        while not body.endswith(b"0\r\n\r\n"):
            data = await stream.receive_some(65536)
            if not data:
                raise ConnectionError("closed in the middle of a chunked body")
            body += data
    return status


async def connect(port: int, tally: Tally) -> trio.SocketStream | None:
    """A new connection to the proxy, counted; None (the error counted, after a pause) if refused."""
    try:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
    except OSError as exc:
        tally.error(f"connect: {exc.strerror or exc}")
        await trio.sleep(0.1)
        return None
    tally.connections += 1
    return stream


async def churn_client(port: int, tally: Tally, budget: list[int], deadline: float, linger: float) -> None:
    while budget[0] > 0 and trio.current_time() < deadline:
        budget[0] -= 1
        stream = await connect(port, tally)
        if stream is None:
            continue
        try:
            status = await exchange(stream, REQUESTS["chat" if tally.connections % 4 == 0 else "models"])
            tally.requests += 1
            if status != 200:
                tally.error(f"HTTP {status}")
            await trio.sleep(linger)
        except (OSError, ConnectionError, trio.BrokenResourceError) as exc:
            tally.error(type(exc).__name__)
        finally:
            await stream.aclose()


async def mixed_client(port: int, tally: Tally, deadline: float, rng: random.Random) -> None:
    while trio.current_time() < deadline:
        stream = await connect(port, tally)
        if stream is None:
            continue
        try:
            for _ in range(rng.randint(1, 6)):
                kind = rng.choice(["models", "chat", "chat", "stream", "stream", "abort"])
                if kind == "abort":  # a streamed answer left after its head: the connection goes with it
                    await exchange(stream, REQUESTS["stream"], abort=True)
                    tally.aborted += 1
                    break
                status = await exchange(stream, REQUESTS[kind])
                tally.requests += 1
                if status != 200:
                    tally.error(f"HTTP {status}")
        except (OSError, ConnectionError, trio.BrokenResourceError) as exc:
            tally.error(type(exc).__name__)
        finally:
            await stream.aclose()


async def phase(name: str, pid: int, load) -> dict:
    sampler = Sampler(pid)
    before = sampler.now()
    tally = Tally()
    started = time.monotonic()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sampler.run)
        await load(tally)
        nursery.cancel_scope.cancel()
    took = time.monotonic() - started
    await trio.sleep(5)  # past the 4 s an idle upstream connection is kept
    after = sampler.now()
    return {"phase": name, "seconds": round(took, 1), "connections": tally.connections, "requests": tally.requests,
            "aborted": tally.aborted, "errors": tally.errors, "before": before,
            "peak": {"fds": sampler.peak_fds, "rss_mb": sampler.peak_rss}, "after": after}


async def drive(port: int, pid: int, args: argparse.Namespace) -> list[dict]:
    rng = random.Random(17)

    async def churn(tally: Tally) -> None:
        budget = [args.connections]
        deadline = trio.current_time() + args.seconds
        async with trio.open_nursery() as nursery:
            for _ in range(args.clients):
                nursery.start_soon(churn_client, port, tally, budget, deadline, args.linger)

    async def mixed(tally: Tally) -> None:
        deadline = trio.current_time() + args.seconds
        async with trio.open_nursery() as nursery:
            for n in range(args.clients):
                nursery.start_soon(mixed_client, port, tally, deadline, random.Random(rng.random() + n))

    # one request first: the model is loaded and its upstream connection pooled before "before"
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        await exchange(stream, REQUESTS["chat"])
    await trio.sleep(1)
    return [await phase("churn", pid, churn), await phase("mixed with aborts", pid, mixed)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--proxy-repo", type=Path, default=h.REPO, help="measure another checkout's smart_proxy")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--connections", type=int, default=6000, help="churn: connections in all")
    parser.add_argument("--seconds", type=float, default=40.0, help="each phase at most this long")
    parser.add_argument("--linger", type=float, default=0.1, help="churn: seconds a client waits before closing")
    parser.add_argument("--quick", action="store_true", help="a few seconds, to check the script")
    args = parser.parse_args()
    if args.quick:
        args.clients, args.connections, args.seconds = 8, 300, 5.0
    h.PROXY_REPO = args.proxy_repo.resolve()
    work = h.Workdir()
    try:
        script = work.path / "fake-llama-server"
        script.write_text(f'#!/bin/sh\nexec {" ".join(h.pinned(h.LOAD_CPU, [h.project_python(), str(FAKE)]))} "$@"\n')
        script.chmod(0o755)
        model = work.path / "bench.json"
        model.write_text(json.dumps({"tokens": 8, "slots": 8}))
        ini = (f"[proxy]\nhost = 127.0.0.1\ngrace = 2s\n[pool]\nllama_server = {script}\nload_timeout = 30s\n"
               f"stop_timeout = 2s\nmax_queue = 4096\n[model:bench]\npath = {model}\n")
        proxy = h.SmartProxy(work.path, "churn", ini)
        results = trio.run(drive, proxy.port, proxy.pid, args)
        health = proxy.health()
        proxy.stop()
    finally:
        h.stop_all()
        work.cleanup()
    print(f"# churn and soak: {h.PROXY_REPO}, {cpu_name()}, {args.clients} clients, linger {args.linger:g}s")
    print("| phase | s | connections | requests | aborted | errors | fds before / peak / after "
          "| CLOSE-WAIT after | RSS MB before / peak / after |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        errors = ", ".join(f"{k}: {v}" for k, v in r["errors"].items()) or "0"
        print(f"| {r['phase']} | {r['seconds']} | {r['connections']} | {r['requests']} | {r['aborted']} | {errors} | "
              f"{r['before']['fds']} / {r['peak']['fds']} / {r['after']['fds']} | {r['after']['close_wait']} | "
              f"{r['before']['rss_mb']:.0f} / {r['peak']['rss_mb']:.0f} / {r['after']['rss_mb']:.0f} |")
    print(f"proxy status at the end: {health.get('status')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
