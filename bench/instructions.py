#!/usr/bin/env python3
"""Instructions per request, whatever else the machine runs: ``python bench/instructions.py``.

CPU time per request moves by tens of percent on a shared machine; the number of
instructions the proxy runs per request does not. This runs smart-proxy under
``valgrind --tool=callgrind`` (instrumentation off until the load is warm) behind
the Go fake upstream, drives it with one long wrk run per load level, and counts
the instructions of a window of that run (``callgrind_control -i on``, ``-z``,
``-d``), divided by the requests the upstream answered in the window (its
``/bench/stats``). ``--floor`` counts ``bench/floor.py`` the same way and prints the
proxy's ratio to it. Loads run one after another (``--parallel`` runs them at once:
valgrind's counts do not depend on it).
User-space instructions only: system calls' kernel time, cache misses and the
clock are not in them, so read them beside ``bench/run.py``'s CPU time, not
instead of it. ``--line`` counts the instructions of one access line instead
(``smart_proxy.logs``'s handler into a line-buffered file, 2,000 lines against none).
``--keep DIR`` keeps the callgrind files (``callgrind_annotate FILE``). ``--cache-sim
SIZE,WAYS,LINE`` simulates the caches as well (valgrind's model of a first level and a
last level of the size given) and prints the misses per request: what grows with the
requests in flight when the instructions do not.

Needs valgrind (with ``callgrind_control``), go and wrk; the proxy runs about fifty times slower.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness as h  # noqa: E402
import scenarios  # noqa: E402

_LINE_SCRIPT = """
import logging, sys
from smart_proxy import logs
fmt, n, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
logs.setup_logging("info", fmt, open(path, "w", buffering=1))
log = logging.getLogger("smart_proxy.access")
logs.request_id.set("9dd79f1d1ad0983b00000000c5a31f99")
for _ in range(200 + n):
    logs.emit(log, logging.INFO, "%s %s %d %.3fs%s%s", "POST", "/v1/chat/completions", 200, 0.0012, " model=bench", "")
"""


def _collected(argv: list[str], env: dict, cwd: Path | None = None) -> int:
    done = subprocess.run(["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", *argv],
                          capture_output=True, text=True, env=env, cwd=cwd)
    found = re.search(r"Collected : (\d+)", done.stderr)
    if found is None:
        raise RuntimeError(done.stderr[-2000:])
    return int(found.group(1))


def line_cost(fmt: str, work: Path) -> int:
    """Instructions of one access line in ``fmt``: 2,000 lines' run minus an empty run."""
    env = {**os.environ, "PYTHONPATH": str(h.PROXY_REPO)}
    argv = [h.project_python(), "-c", _LINE_SCRIPT, fmt]
    # (run from the checkout measured: ``python -c`` looks in its working directory first)
    runs = [_collected([*argv, str(n), str(work / f"lines-{n}.log")], env, h.PROXY_REPO) for n in (0, 2000)]
    return (runs[1] - runs[0]) // 2000


def _totals(path: str) -> dict[str, int]:
    """A callgrind file's total of each event (``Ir``, and with ``--cache-sim`` the misses: ``D1mr``, ``DLmr``...)."""
    names: list[str] = []
    with open(path) as file:
        for line in file:
            if line.startswith("events:"):
                names = line.split()[1:]
            elif line.startswith(("summary:", "totals:")):
                return dict(zip(names, map(int, line.split()[1:]), strict=False))
    return {}


def per_request(work: Path, go: h.GoBinaries, clients: int, args: argparse.Namespace, target: str = "proxy") -> dict:
    """Instructions per request of ``target`` (``proxy`` or ``floor``) at ``clients`` keep-alive wrk clients.

    Requests are counted where both targets send them, at the fake upstream (``/bench/stats``).
    """
    tag = f"{target}-c{clients}"
    out = work / f"callgrind.{tag}.out"
    log_path = work / f"{tag}.log"
    port = h.free_port()
    url = f"http://127.0.0.1:{port}"
    valgrind = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}"]
    if args.cache_sim:
        valgrind += ["--cache-sim=yes", f"--LL={args.cache_sim}"]
    env = {**os.environ, "PYTHONPATH": str(h.PROXY_REPO)}
    if target == "floor":
        _, upstream = h.start_fakeupstream(work, go, alias=f"bench-{tag}")
        argv = [*valgrind, h.project_python(), str(h.BENCH_DIR / "floor.py"), "--port", str(port), "--target", upstream]
    else:
        ini = work / f"{tag}.ini"
        ini.write_text(h.fake_model_ini(work, go, {"bench": {"slots": args.slots}}))
        argv = [*valgrind, h.project_python(), "-m", "smart_proxy", "--config", str(ini), "--port", str(port),
                "--log-level", args.log_level, "--log-format", args.log_format]
    process = h.start(argv, log_path=log_path, cwd=h.PROXY_REPO, env=env)
    try:
        if target == "floor":
            h.wait_listening(port, process, "bench/floor.py", timeout=300)
        else:
            h.wait_http(f"{url}/health", timeout=300, process=process)
        assert h.post_json(f"{url}/v1/chat/completions", scenarios.CHAT, timeout=120)[0] == 200
        if target != "floor":
            server = next(s for s in h.get_json(f"{url}/health")["pool"]["servers"] if s["state"] == "ready")
            upstream = f"http://127.0.0.1:{server['port']}"
        outcome: dict = {}
        load = threading.Thread(target=lambda: outcome.update(h.wrk(
            f"{url}/v1/chat/completions", connections=clients, duration=args.warm + args.window + 30,
            body=json.dumps(scenarios.CHAT), timeout=120)))
        load.start()
        control = ["callgrind_control"]
        time.sleep(args.warm)
        subprocess.run([*control, "-i", "on", str(process.pid)], check=True, capture_output=True)
        time.sleep(5)  # code is instrumented anew as it runs: count from after that
        subprocess.run([*control, "-z", str(process.pid)], check=True, capture_output=True)
        first = h.upstream_requests(upstream)
        time.sleep(args.window)
        subprocess.run([*control, "-d", str(process.pid)], check=True, capture_output=True)
        requests = h.upstream_requests(upstream) - first
        load.join()
    finally:
        h.stop(process)
    dumps = sorted(work.glob(f"{out.name}.*"), key=lambda p: p.stat().st_mtime)
    totals = _totals(str(dumps[-1])) if dumps else {}
    total = totals.get("Ir", 0)
    if args.keep:
        Path(args.keep).mkdir(parents=True, exist_ok=True)
        for dump in dumps:
            shutil.copy(dump, Path(args.keep) / dump.name)
    misses = {f"{event}_per_request": round(count / max(1, requests))
              for event, count in totals.items() if event.endswith(("mr", "mw"))}
    return {"target": target, "clients": clients, "requests": requests, "instructions": total,
            "per_request": round(total / max(1, requests)), **misses, "wrk_errors": outcome.get("errors")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="1,64,256", help="load levels, comma-separated (default 1,64,256)")
    parser.add_argument("--log-format", default="text", choices=["text", "json"])
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning"],
                        help="the proxy's log level (info, as users run it; warning: no access line)")
    parser.add_argument("--slots", type=int, default=4, help="total_slots the fake upstream reports")
    parser.add_argument("--warm", type=float, default=40, help="seconds of load before counting")
    parser.add_argument("--window", type=float, default=60, help="seconds counted")
    parser.add_argument("--parallel", action="store_true", help="run the load levels (and targets) at once")
    parser.add_argument("--floor", action="store_true", help="count bench/floor.py too, and print the ratio")
    parser.add_argument("--line", action="store_true", help="count one access line (text and JSON) instead")
    parser.add_argument("--keep", help="copy the callgrind files here")
    parser.add_argument("--cache-sim", metavar="SIZE,WAYS,LINE",
                        help="simulate the caches too, the last level as given (e.g. 524288,8,64: one core's L2), "
                             "and print misses per request (D1mr: first-level data read misses; DLmr: last-level)")
    parser.add_argument("--proxy-repo", type=Path, default=h.REPO, help="measure another checkout's smart_proxy")
    args = parser.parse_args()
    h.PROXY_REPO = args.proxy_repo.resolve()
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        sys.exit("needs valgrind (apt-get install valgrind)")
    work = h.Workdir()
    try:
        if args.line:
            for fmt in ("text", "json"):
                print(json.dumps({"format": fmt, "instructions_per_line": line_cost(fmt, work.path)}))
            return 0
        h.require_tools()
        go = h.GoBinaries(work.path)
        levels = [int(c) for c in args.clients.split(",")]
        targets = ["proxy", "floor"] if args.floor else ["proxy"]
        results: dict[tuple[str, int], dict] = {}
        runs = [threading.Thread(target=lambda t=t, c=c: results.update({(t, c): per_request(work.path, go, c, args, t)}))
                for c in levels for t in targets]
        for run in runs:
            run.start()
            if not args.parallel:
                run.join()
        for run in runs:
            run.join()
        for c in levels:
            for t in targets:
                print(json.dumps(results.get((t, c), {"target": t, "clients": c, "error": "see the log above"})))
            if args.floor and all((t, c) in results for t in targets):
                ratio = results[("proxy", c)]["per_request"] / max(1, results[("floor", c)]["per_request"])
                print(json.dumps({"clients": c, "proxy_over_floor": round(ratio, 3)}))
    finally:
        h.stop_all()
        work.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
