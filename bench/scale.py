"""The ``scale`` scenario: a router past one core, one process against two (``[proxy] workers``).

A router (a proxy.ini of peers only, no pool) relays to the Go fake upstream as its one
``kind = openai`` peer. Measured in one run, each on the same upstream and load generator:

* ``hypercorn-floor``: bench/floor.py on the proxy core, the least a Hypercorn relay costs;
* ``router-1``: smart-proxy as a router, one process on the proxy core;
* ``router-2``: the same with ``--workers 2``, the two workers free to run on both cores
  (the load generator and the upstream run on the load core, so the second worker shares
  that core with them: two workers on a two-core machine are not two free cores).

Fan-out (100 chunks every 20 ms per stream) at 64 / 256 / 512 streams, and non-streamed
requests (wrk) at 64 and 256 clients. The proxy runs at ``$BENCH_PROXY_LOG`` like every
scenario's smart-proxy.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import harness as h

CHAT = {"model": "bench", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 16}
BOTH_CORES = f"{h.LOAD_CPU},{h.PROXY_CPU}"


def _target(what: str, goal: str, measured: str, met: bool | None) -> dict:
    return {"what": what, "goal": goal, "measured": measured, "met": met}


class Router:
    """smart-proxy with only the upstream as a peer, ``workers`` processes; pinned to ``cpus``."""

    def __init__(self, workdir: Path, name: str, upstream: str, workers: int, cpus: str) -> None:
        self.config = workdir / f"{name}.ini"
        self.config.write_text("\n".join([
            "[proxy]", "host = 127.0.0.1", "grace = 2s",
            "[peer:upstream]", f"url = {upstream}", "kind = openai", "refresh = 5s",
        ]) + "\n")
        self.port = h.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        argv = [h.project_python(), "-m", "smart_proxy", "--config", str(self.config), "--port", str(self.port),
                "--log-level", os.environ.get("BENCH_PROXY_LOG", "info"), "--workers", str(workers)]
        self.process = h.start(["taskset", "-c", cpus, *argv], log_path=workdir / f"{name}.log", cwd=h.PROXY_REPO,
                               env={**os.environ, "PYTHONPATH": str(h.PROXY_REPO)})
        self.workers = workers
        h.wait_http(f"{self.url}/v1/models", timeout=60, process=self.process)
        if workers > 1:  # the port answers once one worker listens: wait for every one
            deadline = time.monotonic() + 60
            while len(self.pids()) < workers or _listeners(self.port) < workers:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{name}: {workers} workers did not start:\n{h.tail(self.process)}")
                time.sleep(0.1)

    def pids(self) -> dict[str, int]:
        """The processes that serve: the one proxy, or each worker (the child of its lifeline)."""
        if self.workers == 1:
            return {"w1": self.process.pid}
        workers = [pid for lifeline in h.children(self.process.pid) for pid in h.children(lifeline)]
        return {f"w{i}": pid for i, pid in enumerate(sorted(workers), 1)}

    def stop(self) -> None:
        h.stop(self.process)


def scale(ctx) -> dict:
    """Fan-out and request overhead through one router process and two, beside the Hypercorn floor."""
    chunks, interval = 100, 20
    stream = {"model": "bench", "messages": [{"role": "user", "content": "Hello"}], "stream": True,
              "max_tokens": chunks, "x_interval_ms": interval}
    expect = chunks + 2
    upstream_process, upstream = h.start_fakeupstream(ctx.work, ctx.go, {"slots": 1024})
    floor, floor_url = h.start_floor(ctx.work, upstream)
    one = Router(ctx.work, "router-1", upstream, 1, str(h.PROXY_CPU))
    two = Router(ctx.work, "router-2", upstream, 2, BOTH_CORES)
    for router in (one, two):  # each worker learns the peer's models before it is measured
        for _ in range(8):
            assert h.post_json(f"{router.url}/v1/chat/completions", CHAT)[0] == 200
    targets = {"direct": (upstream, {}), "hypercorn-floor": (floor_url, {"floor": floor.pid}),
               "router-1": (one.url, one.pids()), "router-2": (two.url, two.pids())}
    h.log(f"  scale: router-2 workers {two.pids()}")
    rows = []
    rounds: dict[tuple[str, str, int], list[dict]] = {}
    duration = ctx.seconds(10) / h.ROUNDS  # of each wrk run
    body = json.dumps(CHAT)

    def measure(kind: str, load: int, run: Callable[[str], tuple[dict, dict]]) -> None:
        def logged(name: str, turn: int) -> dict:
            record, cores = run(name)
            h.log(f"  scale: {kind} {name:15} {load:<4} round {turn + 1}: {record['rate']:8.0f}/s  "
                  f"lost {record.get('lost', 0)}  errors {record['errors']}  {cores}")
            return {**record, **cores}

        for name, runs in h.in_rounds(list(targets), h.ROUNDS, logged).items():
            rounds[(kind, name, load)] = runs
        for name in targets:
            row = h.median_row(rounds[(kind, name, load)])
            rows.append({"kind": kind, "target": name, "load": load, **row, "rate": round(row["rate"]),
                         "cpu_us_per_unit": round(row["cpu_us_per_unit"], 1) if row["cpu_us_per_unit"] else None})

    def fanout(streams: int) -> Callable[[str], tuple[dict, dict]]:
        def run(name: str) -> tuple[dict, dict]:
            url, pids = targets[name]
            with h.CpuMeter(pids) as cpu:
                result = h.streamclient(ctx.go.streamclient, f"{url}/v1/chat/completions", streams=streams,
                                        body=stream, expect=expect)
            cpu_s = sum(cpu.cpu_seconds.values())
            return {"rate": result["events_per_s"],
                    "cpu_us_per_unit": cpu_s * 1e6 / max(1, result["events"]) if pids else None,
                    "ttfc_p50_ms": round(result["ttfc_ms"].get("p50", float("nan")), 2),
                    "gap_p99_ms": round(result["gap_ms"].get("p99", float("nan")), 2),
                    "lost": result["lost"] + (streams - result["complete"]) * expect,
                    "errors": sum(result["errors"].values())}, _cores(cpu)
        return run

    def requests(clients: int) -> Callable[[str], tuple[dict, dict]]:
        def run(name: str) -> tuple[dict, dict]:
            url, pids = targets[name]
            h.wrk(f"{url}/v1/chat/completions", connections=clients, duration=1.0, body=body)
            with h.CpuMeter(pids) as cpu:
                result = h.wrk(f"{url}/v1/chat/completions", connections=clients, duration=duration, body=body)
            cpu_s = sum(cpu.cpu_seconds.values())
            return {"rate": result["rps"], "cpu_us_per_unit": cpu_s * 1e6 / max(1, result["requests"]) if pids else None,
                    "p50_ms": round(result["p50_ms"], 3), "p99_ms": round(result["p99_ms"], 3),
                    "errors": result["errors"]}, _cores(cpu)
        return run

    for streams in (64, 256, 512):
        measure("fanout", streams, fanout(streams))
    for clients in (64, 256):
        measure("requests", clients, requests(clients))
    one.stop()
    two.stop()
    h.stop(floor)
    h.stop(upstream_process)

    def rate(kind: str, name: str, load: int) -> float:
        return next(r["rate"] for r in rows if r["kind"] == kind and r["target"] == name and r["load"] == load)

    for r in rows:
        r["vs_floor"] = round(r["rate"] / max(1, rate(r["kind"], "hypercorn-floor", r["load"])), 3)
    def paired(kind: str, a: str, b: str, load: int) -> float:  # the median of the rounds' ratios
        return h.paired(rounds[(kind, a, load)], rounds[(kind, b, load)], "rate")

    within = {n: paired("fanout", "router-1", "hypercorn-floor", n) for n in (64, 256, 512)}
    gain = paired("fanout", "router-2", "router-1", 512)
    rps_gain = {c: paired("requests", "router-2", "router-1", c) for c in (64, 256)}
    errors = sum(r["errors"] + r.get("lost", 0) for r in rows if r["target"].startswith("router"))
    return {
        "title": "9. A router past one core (peers only; one process against --workers 2)",
        "rows": rows,
        "columns": ["kind", "target", "load", "rate", "vs_floor", "cpu_us_per_unit", "ttfc_p50_ms", "gap_p99_ms",
                    "p50_ms", "p99_ms", "lost", "errors", "cpu_load_core", "cpu_proxy_core", "cpu_serving"],
        "targets": [
            *(_target(f"fan-out chunks/s, one router vs floor at {n}", ">= 0.95x", f"{within[n]:.3f}x", within[n] >= 0.95)
              for n in (64, 256, 512)),
            _target("fan-out chunks/s at 512, two workers vs one", "> 1x (report)", f"{gain:.2f}x", gain > 1.0),
            _target("requests/s, two workers vs one", "report",
                    f"{rps_gain[64]:.2f}x at 64, {rps_gain[256]:.2f}x at 256 clients", None),
            _target("lost chunks and errors through the routers", "0", str(errors), errors == 0),
        ],
        "notes": [
            "rate = chunks/s (fanout: 100 chunks every 20 ms per stream) or requests/s (wrk, non-streamed); "
            "cpu_us_per_unit = CPU of the serving processes (every worker) per chunk or request",
            "router-1 runs on the proxy core alone; router-2's two workers may run on both cores, and the load "
            "core also runs the load generator and the fake upstream, so the second worker has what they leave",
            "hypercorn-floor = bench/floor.py on the proxy core (see the overhead scenario's note)",
            h.rounds_note(),
        ],
    }


def _listeners(port: int) -> int:
    """How many sockets listen on 127.0.0.1:``port`` (one per worker, with SO_REUSEPORT)."""
    with open("/proc/net/tcp") as file:
        return sum(1 for line in list(file)[1:]
                   if int(line.split()[1].rsplit(":", 1)[1], 16) == port and line.split()[3] == "0A")


def _cores(cpu: h.CpuMeter) -> dict:
    return {"cpu_load_core": round(cpu.cores.get(h.LOAD_CPU, 0), 1),
            "cpu_proxy_core": round(cpu.cores.get(h.PROXY_CPU, 0), 1),
            "cpu_serving": round(sum(cpu.processes.values()), 1)}
