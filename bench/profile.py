#!/usr/bin/env python3
"""Profile smart-proxy's hot path: ``python bench/profile.py [chat|stream|bulk] [--clients N] [--seconds S]``.

Starts smart-proxy (pinned to the proxy core) over the Go fake upstream, drives it
with wrk (``chat``: non-streamed chat) or the stream client (``stream``: 20 ms
chunks; ``bulk``: one unthrottled 20,000-chunk stream), records it with py-spy
from the bench venv, and prints the functions with the most samples, by self
time and inclusive time (by function), plus the proxy's CPU per request. ``--svg FILE`` also
writes a flame graph; ``--raw FILE`` keeps the collapsed stacks.
"""

from __future__ import annotations

import argparse
import collections
import json
import subprocess
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness as h  # noqa: E402
import scenarios  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("load", nargs="?", default="chat", choices=["chat", "stream", "bulk"])
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--slots", type=int, default=4, help="total_slots the fake upstream reports")
    parser.add_argument("--svg", help="also write a flame graph here")
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--raw", help="also keep py-spy's collapsed stacks (one per line) here")
    parser.add_argument("--proxy-repo", type=Path, default=h.REPO, help="profile another checkout's smart_proxy")
    args = parser.parse_args()
    h.PROXY_REPO = args.proxy_repo.resolve()
    h.require_tools()
    py_spy = h.BENCH_VENV / "bin" / "py-spy"
    if not py_spy.exists():
        sys.exit(f"no {py_spy}: run bench/run.py once (it creates the bench venv)")
    work = h.Workdir()
    try:
        go = h.GoBinaries(work.path)
        proxy = h.SmartProxy(work.path, "profile", h.fake_model_ini(work.path, go, {"bench": {"slots": args.slots}}))
        assert h.post_json(f"{proxy.url}/v1/chat/completions", scenarios.CHAT)[0] == 200
        url = f"{proxy.url}/v1/chat/completions"
        raw = work.path / "profile.txt"
        record = [str(py_spy), "record", "-p", str(proxy.pid), "-d", str(int(args.seconds)), "-r", "200",
                  "--nonblocking", "--function", "-f", "raw", "-o", str(raw)]
        spy = threading.Thread(target=subprocess.run, args=(record,), kwargs={"capture_output": True})
        outcome: dict = {}
        with h.CpuMeter({"proxy": proxy.pid}) as cpu:
            spy.start()
            if args.load == "chat":
                outcome = h.wrk(url, connections=args.clients, duration=args.seconds + 1, body=json.dumps(scenarios.CHAT))
                units, count = "request", outcome["requests"]
            else:
                body = {**scenarios.CHAT, "stream": True, "max_tokens": 20_000 if args.load == "bulk" else 100,
                        "x_interval_ms": 0 if args.load == "bulk" else 20}
                outcome = h.streamclient(go.streamclient, url, streams=1 if args.load == "bulk" else args.clients,
                                         body=body)
                units, count = "chunk", outcome["events"]
                outcome = {k: outcome[k] for k in ("events_per_s", "ttfc_ms", "gap_ms", "errors")}
            spy.join()
        print(json.dumps(outcome, default=str)[:600])
        print(f"proxy CPU: {cpu.cpu_seconds['proxy']:.2f} s = {cpu.cpu_seconds['proxy'] * 1e6 / max(1, count):.0f} us "
              f"per {units} ({count:,} {units}s); {cpu.summary()}")
        self_time: collections.Counter[str] = collections.Counter()
        inclusive: collections.Counter[str] = collections.Counter()
        total = 0
        for line in raw.read_text().splitlines():
            stack, _, n = line.rpartition(" ")
            frames = stack.split(";")
            total += int(n)
            self_time[frames[-1]] += int(n)
            for frame in set(frames):
                inclusive[frame] += int(n)
        print(f"\n{total} samples; self time:")
        for frame, n in self_time.most_common(args.top):
            print(f"{100 * n / total:5.1f}%  {frame}")
        print("\ninclusive:")
        for frame, n in inclusive.most_common(args.top + 15):
            print(f"{100 * n / total:5.1f}%  {frame}")
        if args.raw:
            Path(args.raw).write_text(raw.read_text())
        if args.svg:
            subprocess.run([str(py_spy), "record", "-p", str(proxy.pid), "-d", "1", "-o", args.svg], check=False)
    finally:
        h.stop_all()
        work.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
