#!/usr/bin/env python3
"""The added latency of a router hop: ``python bench/fleet_hop.py [--requests 300]``.

Theory of operation: a node proxy serving the fake llama-server (``tests/fake_llama_server.py``,
a whole answer of a few tokens, no delay) and a router proxy with the node as its only
peer (``[peer:node] kind = smart-proxy``) run as processes on loopback. Requests go one
at a time, alternating between the node directly and the router, so both see the same
machine load; the result is each target's p50 and p99, and the router's p50 and p99 less
the node's: what one hop through a router adds to a short, unstreamed request.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
FAKE = ROOT / "tests" / "fake_llama_server.py"
BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


def start(ini: Path, log: Path) -> tuple[subprocess.Popen, str]:
    out = open(log, "wb")  # noqa: SIM115
    process = subprocess.Popen(
        [sys.executable, "-m", "smart_proxy", "--config", str(ini), "--port", "0"], stdout=out, stderr=subprocess.STDOUT
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for line in log.read_text(errors="replace").splitlines():
            if "smart-proxy listening on " in line:
                return process, line.split("smart-proxy listening on ")[1].split()[0]
        if process.poll() is not None:
            raise SystemExit(f"proxy exited:\n{log.read_text()}")
        time.sleep(0.05)
    raise SystemExit(f"proxy did not start:\n{log.read_text()}")


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300, help="requests to each target")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        binary = tmp / "fake-llama-server"
        binary.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{FAKE}" "$@"\n')
        binary.chmod(0o755)
        (tmp / "m.json").write_text(json.dumps({"tokens": 3}))
        (tmp / "node.ini").write_text(f"[pool]\nllama_server = {binary}\n[model:m]\npath = {tmp / 'm.json'}\n")
        node, node_url = start(tmp / "node.ini", tmp / "node.log")
        (tmp / "router.ini").write_text(f"[pool]\nllama_server = {binary}\n[peer:node]\nurl = {node_url}\n")
        router, router_url = start(tmp / "router.ini", tmp / "router.log")
        try:
            times: dict[str, list[float]] = {"direct": [], "router": []}
            with httpx.Client(timeout=60) as client:
                for url in (node_url, router_url, node_url, router_url):  # warm: the load, the connections
                    client.post(f"{url}/v1/chat/completions", json=BODY).raise_for_status()
                for _ in range(args.requests):
                    for name, url in (("direct", node_url), ("router", router_url)):
                        started = time.perf_counter()
                        response = client.post(f"{url}/v1/chat/completions", json=BODY)
                        times[name].append(time.perf_counter() - started)
                        response.raise_for_status()
            result = {name: {"p50_ms": percentile(v, 50) * 1e3, "p99_ms": percentile(v, 99) * 1e3,
                             "mean_ms": statistics.fmean(v) * 1e3} for name, v in times.items()}  # fmt: skip
            result["added"] = {key: result["router"][key] - result["direct"][key] for key in ("p50_ms", "p99_ms")}
            print(json.dumps({"requests": args.requests, **result}, indent=2))
        finally:
            for process in (router, node):
                process.terminate()
                process.wait(30)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
