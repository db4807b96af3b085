#!/usr/bin/env python3
"""Paired A/B of two checkouts' CPU per request: ``python bench/pair.py REPO_A REPO_B [CLIENTS ...]``.

The overhead rows of ``bench/ab.py`` alone (non-streamed chat through wrk, at each
number of CLIENTS; with ``--ollama``, non-streamed ``/api/chat`` to the same local
model): both checkouts' smart-proxy up at once, driven in turn, alternating which
goes first, each one's CPU per request (the scheduler's count) per round, and the
median of the per-round ratios B/A. ``bench/ab.py`` has the other rows (fan-out,
throughput, agents, an Ollama upstream). Run it under ``flock /tmp/bench.lock``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import ab  # noqa: E402
import scenarios  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path)
    parser.add_argument("clients", type=int, nargs="*", default=[64])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--seconds", type=int, default=3, help="wrk run per checkout per round")
    parser.add_argument("--sessions", type=int, default=2, help="times both proxies are started afresh")
    parser.add_argument("--ollama", action="store_true", help="non-streamed /api/chat instead of the OpenAI route")
    args = parser.parse_args()
    path = "/api/chat" if args.ollama else "/v1/chat/completions"
    body = {**scenarios.CHAT, "stream": False} if args.ollama else scenarios.CHAT
    rows = [ab.Row(f"{path}, {clients} clients", "request", path, body, clients)
            for clients in args.clients]
    began = time.monotonic()
    results = ab.run(args.a, args.b, rows, rounds=args.rounds, seconds=args.seconds, sessions=args.sessions)
    ab.print_report(args.a, args.b, results, rounds=args.rounds, seconds=args.seconds, took=time.monotonic() - began,
                    sessions=args.sessions)
    return 0


if __name__ == "__main__":
    sys.exit(main())
