#!/usr/bin/env python3
"""Where a model swap's time goes, A/B between two checkouts: ``python bench/swaptimeline.py OLD_REPO NEW_REPO``.

Runs each checkout's proxy (pool size 1, two gemma models, --log-level debug) for 4 swaps,
alternating old, new, new, old, and reads the timestamps of the proxy's debug log and
llama-server's own clock (in its output lines) to split each swap into: stop (STOPPING ->
STOPPED), spawn (STOPPED -> llama-server's clock 0), notice ("listening on" line -> READY)
and proxy_part = time to first byte - llama-server's load (its clock at "listening on") -
(READY -> first byte). Prints the medians in ms. Run it under ``flock /tmp/bench.lock``.
"""
import datetime
import http.client
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness as h  # noqa: E402
import scenarios  # noqa: E402

B, G = scenarios.real_model()
work = Path(tempfile.mkdtemp(prefix="swaptimeline-"))
script = scenarios._real_script(work, B)
ini = (f"[proxy]\nhost = 127.0.0.1\n[pool]\nllama_server = {script}\nsize = 1\nload_timeout = 60s\nstop_timeout = 5s\n"
       + "".join(f"[model:{m}]\npath = {G}\nargs = {scenarios.SWAP_ARGS}\n" for m in "ab"))
os.environ["BENCH_PROXY_LOG"] = "debug"
_STAMP = re.compile(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d+) (.*)")
_CLOCK = re.compile(r"\] (\d+)\.(\d\d)\.(\d\d\d)\.(\d\d\d) ")  # llama-server's clock: m.ss.mmm.uuu


def swap_once(port: int, model: str) -> tuple[float, float]:
    """Send one 4-token streamed chat; (sent, first byte) wall-clock times."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "Say hi."}], "stream": True,
                       "max_tokens": 4})
    sent = time.time()
    conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    response = conn.getresponse()
    response.read(1)
    first = time.time()
    response.read()
    conn.close()
    return sent, first


def split(seg: list[tuple[float, str]], sent: float, first_byte: float) -> dict[str, float]:
    def at(pattern: str) -> float:
        return next(t for t, e in seg if pattern in e)

    listening = next((t, e) for t, e in seg if "listening on http" in e)
    m, s, ms, us = (int(g) for g in _CLOCK.search(listening[1]).groups())
    child = m * 60 + s + ms / 1e3 + us / 1e6  # llama-server's own time from start to listening
    ready = at("starting -> ready")
    out = {"stop": at("stopping -> stopped") - at("ready -> stopping"),
           "spawn": (listening[0] - child) - at("stopping -> stopped"),
           "notice": ready - listening[0], "ttfb": first_byte - sent}
    out["after_ready"] = first_byte - ready  # llama-server answering, and the relay
    out["proxy_part"] = out["ttfb"] - child - out["after_ready"]
    return out


def run(repo: str, tag: str, swaps: int) -> list[dict[str, float]]:
    h.PROXY_REPO = Path(repo)
    proxy = h.SmartProxy(work, tag, ini)
    try:
        times = [swap_once(proxy.port, "ab"[i % 2]) for i in range(swaps + 1)]
    finally:
        proxy.stop()
    events = []
    for line in (work / f"{tag}.log").read_text().splitlines():
        match = _STAMP.match(line)
        if match:
            stamp = datetime.datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S").timestamp()
            events.append((stamp + int(match.group(2)) / 1000, match.group(3)))
    return [split([(t, e) for t, e in events if sent - 0.002 <= t <= first + 0.002], sent, first)
            for sent, first in times[1:]]  # the first request is a cold load, not a swap


old, new = sys.argv[1:3]
results: dict[str, list[dict[str, float]]] = {"old": [], "new": []}
for r in range(2):
    order = [(old, "old"), (new, "new")]
    for repo, tag in order if r == 0 else reversed(order):
        results[tag] += run(repo, f"{tag}{r}", 4)
for tag, rows in results.items():
    print(tag, {k: round(statistics.median(row[k] for row in rows) * 1000, 1) for k in rows[0]}, "ms, swaps:", len(rows))
h.stop_all()
