#!/usr/bin/env python3
"""A/B of two checkouts' CPU per request and per event: ``python bench/ab.py REPO_A REPO_B``.

For changes whose effect is a few percent of CPU, which one ``bench/run.py`` per
checkout cannot show on this shared 2-core machine: the proxy core's speed moves
by up to 2x from one fifth of a second to the next (a pinned Python loop), so two
runs a few seconds apart differ by 10-20 % by themselves. Run it under
``flock /tmp/bench.lock``.

Theory of operation: both checkouts' smart-proxy run at once (``PYTHONPATH=REPO``,
both pinned to the proxy core, each with its own Go fake llama-servers on the
load core), with one proxy.ini: a model ``bench`` (4 slots, as the overhead and
throughput scenarios), a model ``fan`` (1,024 slots, as the fan-out scenario), a
model ``up`` with ``backend = ollama`` served by one more Go fake (shared), and
one agent, ``noop``, whose only hook is an empty request hook (a live chain: the
request goes upstream the ordinary way, so a row shows the route's own cost of
running agents). Each round drives every row (:data:`ROWS`) once, **on both
proxies at the same time** (two load generators started together): the two
share the proxy core, so whatever the machine does in those seconds it does to
both, and the ratio of their CPU per request cancels it. The proxy's CPU time is
read around each run from the scheduler's count (``/proc/PID/task/*/schedstat``,
in ns; the clock-tick sampling of ``/proc/PID/stat`` moves by a few percent per
3-second run by itself). The rows:

* CPU per request (ms), wrk, keep-alive clients: non-streamed chat (the overhead
  scenario's body) at 1 and 64 clients; the same with the ``/noop`` command
  (OpenAI and Ollama dialect); and to the Ollama-upstream model (OpenAI route:
  to its ``/v1/chat/completions``; Ollama route: ``/api/chat``, non-streamed).
* CPU per streamed event (µs), the Go stream client: fan-out (100 chunks 20 ms
  apart per stream, at 64 and 256 streams) and throughput (one unthrottled
  20,000-chunk stream, five times per measurement, OpenAI SSE and translated to
  Ollama NDJSON), as in ``bench/scenarios.py``. A relayed SSE event costs what
  the upstream's bursts make it (the relay passes whatever arrived in one read),
  so for that row the rate is the figure to read, as in the scenario.

Each proxy has half the core while both run, so the absolute figures are not
``bench/run.py``'s (per request a little higher; per relayed event lower, as
more events arrive per read): read the ratios. ``--apart`` drives one checkout at
a time instead, alternating which goes first (the scenarios' conditions; noisier
by the machine's drift). The result per row is the median of the per-round
ratios B/A and their range, beside each side's median; the rate (requests or
events per second) likewise. The rounds are split over ``--sessions`` with both
proxies started afresh each time (in alternating order): two processes of the
same code can differ by a percent or two for the whole of their lives. A and B
the same code gives the noise floor.
``bench/pair.py`` is this with only the overhead rows.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness as h  # noqa: E402
import scenarios  # noqa: E402

from smart_proxy.binary import cpu_name  # noqa: E402

NOOP_AGENT = '''
from smart_proxy.agents import Agent


class Noop(Agent):
    description = "does nothing: an empty request hook (a live chain)"

    async def on_request(self, ctx):
        pass
'''

FANOUT_CHUNKS, FANOUT_INTERVAL_MS = 100, 20
THROUGHPUT_CHUNKS = 20_000


class Row(NamedTuple):
    name: str
    #: "request" (wrk, CPU ms per request) or "event" (the stream client, CPU µs per event)
    per: str
    path: str
    body: dict
    #: wrk connections, or concurrent streams
    clients: int
    #: for streams: "sse" or "ndjson", and the events each stream must bring
    sep: str = "sse"
    expect: int = 0
    #: streams: runs of the stream client per measurement (one 20,000-chunk stream is ~0.2 s)
    repeat: int = 1


def chat(model: str = "bench", text: str = "Hello") -> dict:
    return {**scenarios.CHAT, "model": model, "messages": [{"role": "user", "content": text}]}


def ollama_chat(model: str = "bench", text: str = "Hello") -> dict:
    return {"model": model, "messages": [{"role": "user", "content": text}], "stream": False,
            "options": {"num_predict": 16}}


_FAN = {"model": "fan", "messages": [{"role": "user", "content": "Hello"}], "stream": True,
        "max_tokens": FANOUT_CHUNKS, "x_interval_ms": FANOUT_INTERVAL_MS}
_LONG = {"model": "bench", "messages": [{"role": "user", "content": "Hello"}], "stream": True,
         "max_tokens": THROUGHPUT_CHUNKS}
_LONG_OLLAMA = {"model": "bench", "messages": _LONG["messages"], "stream": True,
                "options": {"num_predict": THROUGHPUT_CHUNKS}}

ROWS = {
    "overhead-1": Row("overhead, 1 client", "request", "/v1/chat/completions", chat(), 1),
    "overhead-64": Row("overhead, 64 clients", "request", "/v1/chat/completions", chat(), 64),
    "fanout-64": Row("fanout, 64 streams", "event", "/v1/chat/completions", _FAN, 64, expect=FANOUT_CHUNKS + 2),
    "fanout-256": Row("fanout, 256 streams", "event", "/v1/chat/completions", _FAN, 256, expect=FANOUT_CHUNKS + 2),
    "throughput": Row("throughput, SSE", "event", "/v1/chat/completions", _LONG, 1, repeat=5),
    "throughput-ollama": Row("throughput, SSE -> NDJSON", "event", "/api/chat", _LONG_OLLAMA, 1, sep="ndjson", repeat=5),
    "agent": Row("agent /noop, 64 clients", "request", "/v1/chat/completions", chat(text="/noop Hello"), 64),
    "agent-ollama": Row("agent /noop, /api/chat, 64 clients", "request", "/api/chat",
                        ollama_chat(text="/noop Hello"), 64),
    "ollama-upstream": Row("Ollama upstream, /v1, 64 clients", "request", "/v1/chat/completions", chat("up"), 64),
    "ollama-upstream-api": Row("Ollama upstream, /api/chat, 64 clients", "request", "/api/chat",
                               ollama_chat("up"), 64),
}


def proxy_ini(work: Path, go: h.GoBinaries, ollama_url: str) -> str:
    """One proxy.ini for both checkouts (see the module docstring)."""
    agents = work / "agents"
    (agents / "noop").mkdir(parents=True, exist_ok=True)
    (agents / "noop" / "agent.py").write_text(textwrap.dedent(NOOP_AGENT))
    ini = h.fake_model_ini(work, go, {"bench": {"slots": 4}, "fan": {"slots": 1024}}, size=2)
    return ini + "\n".join(["[model:up]", "backend = ollama", f"url = {ollama_url}",
                            "[agents]", f"dir = {agents}", "enabled = noop"]) + "\n"


def measure(row: Row, proxy: h.SmartProxy, go: h.GoBinaries, seconds: float,
            started: threading.Barrier | None = None) -> tuple[float, float]:
    """One run of ``row`` against ``proxy``: (CPU ms per request or µs per event, requests or events per second).

    CPU time is the scheduler's (:func:`harness.process_runtime_s`), not /proc/PID/stat's ticks.
    ``started``: wait there before starting the load (the other checkout's run starts with it).
    """
    url = f"{proxy.url}{row.path}"
    if started is not None:
        started.wait()
    before = h.process_runtime_s(proxy.pid)
    if row.per == "request":
        out = h.wrk(url, connections=row.clients, duration=seconds, body=json.dumps(row.body))
        cpu = h.process_runtime_s(proxy.pid) - before
        if out["errors"]:
            raise RuntimeError(f"{row.name}: wrk saw {out['errors']} errors {out['error_kinds']} at {url}")
        return cpu * 1e3 / max(1, out["requests"]), out["rps"]
    events, wall = 0, 0.0
    for _ in range(row.repeat):
        out = h.streamclient(go.streamclient, url, streams=row.clients, body=row.body, expect=row.expect, sep=row.sep)
        lost = out["lost"] + (row.clients - out["complete"]) * row.expect if row.expect else out["lost"]
        if sum(out["errors"].values()) or lost:
            raise RuntimeError(f"{row.name}: stream client saw errors {out['errors']}, lost {lost} at {url}")
        events += out["events"]
        wall += out["duration_s"]
    cpu = h.process_runtime_s(proxy.pid) - before
    return cpu * 1e6 / max(1, events), events / wall if wall else 0.0


class Result(NamedTuple):
    row: Row
    cpu: tuple[list[float], list[float]]
    rate: tuple[list[float], list[float]]

    def ratios(self, which: str = "cpu") -> list[float]:
        a, b = getattr(self, which)
        return [y / x for x, y in zip(a, b, strict=True) if x]


def both(row: Row, proxies: list[h.SmartProxy], go: h.GoBinaries, seconds: float) -> list[tuple[float, float]]:
    """``row`` against both proxies at the same time: each one's figures, as :func:`measure` gives them."""
    started = threading.Barrier(2)
    figures: list[tuple[float, float] | BaseException] = [(0.0, 0.0), (0.0, 0.0)]

    def one(side: int) -> None:
        try:
            figures[side] = measure(row, proxies[side], go, seconds, started)
        except BaseException as exc:  # noqa: BLE001  # raised again below, in the caller's thread
            figures[side] = exc

    threads = [threading.Thread(target=one, args=(side,)) for side in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for figure in figures:
        if isinstance(figure, BaseException):
            raise figure
    return figures  # type: ignore[return-value]


def start_proxies(a: Path, b: Path, work: Path, ini: str, session: int) -> list[h.SmartProxy]:
    """Both checkouts' proxies, ready and each model loaded; started A first in even sessions, B first in odd."""
    order = [(0, "A", a), (1, "B", b)]
    started: dict[int, h.SmartProxy] = {}
    for side, label, repo in order if session % 2 == 0 else order[::-1]:
        h.PROXY_REPO = repo.resolve()
        proxy = h.SmartProxy(work, f"ab-{label}{session}", ini)
        for body in (chat(), chat("fan")):
            status, answer = h.post_json(proxy.url + "/v1/chat/completions", body)
            if status != 200:
                raise RuntimeError(f"{label} {repo}: /v1/chat/completions answered {status}: {answer[:300]!r}")
        started[side] = proxy
    return [started[0], started[1]]


def run(a: Path, b: Path, rows: list[Row], *, rounds: int, seconds: float, together: bool = True, sessions: int = 3,
        progress: Callable[[str], None] = h.log) -> list[Result]:
    """``rounds`` rounds of every row in ``rows`` over both checkouts; the figures per row.

    The rounds are split over ``sessions``, each with both proxies started afresh: one
    process can be a percent or two faster than another of the same code (where its
    memory landed, its hash seed), which more rounds with the same two would not average out.
    """
    h.require_tools()
    work = h.Workdir()
    results = [Result(row, ([], []), ([], [])) for row in rows]
    try:
        go = h.GoBinaries(work.path)
        _, ollama_url = h.start_fakeupstream(work.path, go, {"slots": 1024}, alias="up")
        ini = proxy_ini(work.path, go, ollama_url)
        n = 0
        for session in range(sessions):
            proxies = start_proxies(a, b, work.path, ini, session)
            for row in rows:  # warm up: connections, caches, the agent chain, the upstream's pool
                for proxy in proxies:
                    measure(row._replace(clients=min(row.clients, 64)), proxy, go, 1)
            for _ in range(rounds * (session + 1) // sessions - rounds * session // sessions):
                began = time.monotonic()
                for i, result in enumerate(results):
                    if together:
                        figures = both(result.row, proxies, go, seconds)
                    else:
                        figures = [(0.0, 0.0), (0.0, 0.0)]
                        for side in (0, 1) if (n + i) % 2 == 0 else (1, 0):
                            figures[side] = measure(result.row, proxies[side], go, seconds)
                    for side, (cpu, rate) in enumerate(figures):
                        result.cpu[side].append(cpu)
                        result.rate[side].append(rate)
                n += 1
                progress(f"round {n}/{rounds} (session {session + 1}) in {time.monotonic() - began:.0f} s: "
                         + ", ".join(f"{r.row.name} {r.ratios()[-1]:.3f}" for r in results))
            for proxy in proxies:
                proxy.stop()
    except BaseException:
        h.stop_all()
        h.log(f"failed: logs kept in {work.path}")
        raise
    h.stop_all()
    work.cleanup()
    return results


def table(results: list[Result]) -> list[str]:
    lines = ["| row | unit | A | B | B/A CPU (median) | B/A min..max | A rate | B rate | B/A rate |",
             "|---|---|---|---|---|---|---|---|---|"]
    for result in results:
        unit = "CPU ms/request" if result.row.per == "request" else "CPU µs/event"
        cpu, rate = result.ratios("cpu"), result.ratios("rate")
        a, b = (statistics.median(v) for v in result.cpu)
        ra, rb = (statistics.median(v) for v in result.rate)
        digits = 3 if result.row.per == "request" else 1
        lines.append(f"| {result.row.name} | {unit} | {a:.{digits}f} | {b:.{digits}f} | {statistics.median(cpu):.3f} "
                     f"| {min(cpu):.3f}..{max(cpu):.3f} | {ra:,.0f} | {rb:,.0f} | {statistics.median(rate):.3f} |")
    return lines


def print_report(a: Path, b: Path, results: list[Result], *, rounds: int, seconds: float, took: float,
                 sessions: int) -> None:
    print(f"\nA = {a.resolve()}\nB = {b.resolve()}\n{cpu_name()}, {rounds} rounds in {sessions} sessions (both "
          f"proxies started afresh for each), wrk {seconds} s per run; "
          f"B/A = median of per-round ratios; took {took / 60:.1f} min\n")
    print("\n".join(table(results)), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path)
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of {', '.join(ROWS)}")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--sessions", type=int, default=3, help="times both proxies are started afresh")
    parser.add_argument("--seconds", type=int, default=3, help="wrk run per checkout per round and row")
    parser.add_argument("--json", type=Path, help="write every run's figures here")
    parser.add_argument("--apart", action="store_true",
                        help="drive one checkout at a time (alternating) instead of both at once")
    args = parser.parse_args()
    names = [name.strip() for name in args.rows.split(",") if name.strip()]
    unknown = [name for name in names if name not in ROWS]
    if unknown:
        parser.error(f"unknown rows {', '.join(unknown)}; known: {', '.join(ROWS)}")
    began = time.monotonic()
    results = run(args.a, args.b, [ROWS[name] for name in names], rounds=args.rounds, seconds=args.seconds,
                  together=not args.apart, sessions=args.sessions)
    took = time.monotonic() - began
    print_report(args.a, args.b, results, rounds=args.rounds, seconds=args.seconds, took=took, sessions=args.sessions)
    if args.json:
        args.json.write_text(json.dumps({
            "a": str(args.a.resolve()), "b": str(args.b.resolve()), "cpu": cpu_name(), "rounds": args.rounds,
            "sessions": args.sessions, "together": not args.apart,
            "seconds": args.seconds, "took_s": round(took, 1),
            "rows": {name: {"row": r.row.name, "per": r.row.per, "cpu": r.cpu, "rate": r.rate}
                     for name, r in zip(names, results, strict=True)}}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
