#!/usr/bin/env python3
"""Paired A/B of two checkouts' CPU per request: ``python bench/pair.py REPO_A REPO_B [CLIENTS ...]``.

On this shared 2-core machine one ``bench/run.py overhead`` run per checkout is too
noisy to show a 10 % change (the floor's own CPU per request moved 1.1-2.7 ms between
runs minutes apart). This starts both checkouts' smart-proxy at once (each pinned to
the proxy core, each over its own Go fake upstream), then drives them in turn with
short wrk runs (non-streamed chat, like the overhead scenario), alternating which
goes first, and reports each one's CPU per request (``/proc/PID/stat``) per round
and the median of the per-round ratios B/A. Run it under ``flock /tmp/bench.lock``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness as h  # noqa: E402
import scenarios  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path)
    parser.add_argument("clients", type=int, nargs="*", default=[64])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--seconds", type=int, default=3, help="wrk run per checkout per round")
    parser.add_argument("--ollama", action="store_true", help="non-streamed /api/chat instead of the OpenAI route")
    args = parser.parse_args()
    h.require_tools()
    work = h.Workdir()
    try:
        go = h.GoBinaries(work.path)
        proxies = []
        for i, repo in enumerate((args.a, args.b)):
            h.PROXY_REPO = repo.resolve()
            proxy = h.SmartProxy(work.path, f"pair{i}", h.fake_model_ini(work.path, go, {"bench": {"slots": 4}}))
            assert h.post_json(f"{proxy.url}/v1/chat/completions", scenarios.CHAT)[0] == 200
            proxies.append(proxy)
        path = "/api/chat" if args.ollama else "/v1/chat/completions"
        body = json.dumps({**scenarios.CHAT, "stream": False} if args.ollama else scenarios.CHAT)
        for clients in args.clients:
            cpu_ms: list[list[float]] = [[], []]
            for n in range(args.rounds):
                for i in (0, 1) if n % 2 == 0 else (1, 0):
                    proxy = proxies[i]
                    with h.CpuMeter({"proxy": proxy.pid}) as cpu:
                        out = h.wrk(f"{proxy.url}{path}", connections=clients, duration=args.seconds,
                                    body=body)
                    if out["errors"]:
                        sys.exit(f"{proxy.url}{path}: wrk saw {out['errors']} errors {out['error_kinds']}")
                    cpu_ms[i].append(round(cpu.cpu_seconds["proxy"] * 1e3 / max(1, out["requests"]), 3))
            ratios = [b / a for a, b in zip(*cpu_ms, strict=True)]
            for name, repo, figures in (("A", args.a, cpu_ms[0]), ("B", args.b, cpu_ms[1])):
                print(f"{clients:4d} clients  {name} {repo}: cpu_ms_per_req {figures} median {statistics.median(figures):.3f}")
            print(f"{clients:4d} clients  B/A per round {[round(r, 3) for r in ratios]} median {statistics.median(ratios):.3f}",
                  flush=True)
    finally:
        h.stop_all()
        work.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
