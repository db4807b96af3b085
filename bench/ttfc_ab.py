#!/usr/bin/env python3
"""A/B of two checkouts' time to first chunk under a burst: ``python bench/ttfc_ab.py REPO_A REPO_B``.

The fan-out scenario's TTFC p50 at 64 streams (``bench/scenarios.py``) is a latency of a
burst of 64 new streams on one core, so it moves with whatever else the machine runs in
that second: one ``bench/run.py fanout`` per checkout cannot tell two checkouts apart,
and ``bench/ab.py`` runs both proxies at once, which makes their latencies each other's.
Run it under ``flock /tmp/bench.lock``.

Theory of operation: both checkouts' smart-proxy run side by side on the proxy core,
each with its own Go fake llama-server (the fan-out scenario's model: 1,024 slots, 100
chunks 20 ms apart), and the Hypercorn + Trio floor (``bench/floor.py``) in front of
A's upstream. Each round sends one burst of N streams (the Go stream client, on the
load core) to the upstream directly, then to the floor, then to A and B, one target
at a time, in alternating order. The result is each target's median TTFC p50 over
the rounds, and its median added to the same round's direct figure, as the
scenario's "added TTFC p50" target reads it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness as h  # noqa: E402

from smart_proxy.binary import cpu_name  # noqa: E402

CHUNKS = 100
BODY = {"model": "bench", "messages": [{"role": "user", "content": "Hello"}], "stream": True,
        "max_tokens": CHUNKS, "x_interval_ms": 20}  # fmt: skip
HELLO = {"model": "bench", "messages": [{"role": "user", "content": "hi"}]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--streams", type=int, default=64)
    args = parser.parse_args()
    h.require_tools()
    work = Path(tempfile.mkdtemp(prefix="ttfc-ab-"))
    go = h.GoBinaries(work)
    proxies = []
    for i, repo in enumerate((args.a, args.b)):
        h.PROXY_REPO = repo.resolve()
        proxies.append(h.SmartProxy(work, f"p{i}", h.fake_model_ini(work, go, {"bench": {"slots": 1024}})))
    for proxy in proxies:
        assert h.post_json(f"{proxy.url}/v1/chat/completions", HELLO)[0] == 200
    direct = f"http://127.0.0.1:{proxies[0].upstream_port('bench')}"
    floor, floor_url = h.start_floor(work, direct)
    targets = {"direct": direct, "floor": floor_url, "A": proxies[0].url, "B": proxies[1].url}
    p50: dict[str, list[float]] = {name: [] for name in targets}
    try:
        for round_ in range(args.rounds):
            order = ["A", "B"] if round_ % 2 == 0 else ["B", "A"]
            for name in ["direct", "floor", *order]:
                result = h.streamclient(go.streamclient, f"{targets[name]}/v1/chat/completions", streams=args.streams,
                                        body=BODY, expect=CHUNKS + 2)
                p50[name].append(result["ttfc_ms"]["p50"])
            h.log(f"round {round_}: " + "  ".join(f"{name} {values[-1]:.1f}" for name, values in p50.items()))
    finally:
        for proxy in proxies:
            proxy.stop()
        h.stop(floor)
    print(f"TTFC p50 at {args.streams} streams, {args.rounds} rounds; CPU: {cpu_name()}")
    print(f"A = {args.a}, B = {args.b}")
    print("| target | median TTFC p50 (ms) | range | median added to direct (ms) |")
    print("| --- | --- | --- | --- |")
    for name, values in p50.items():
        added = [value - base for value, base in zip(values, p50["direct"], strict=True)]
        print(f"| {name} | {statistics.median(values):.1f} | {min(values):.1f}-{max(values):.1f} | "
              f"{statistics.median(added):.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
