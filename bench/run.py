#!/usr/bin/env python3
"""smart-proxy's benchmarks (issue 8): ``python bench/run.py [SCENARIO ...] [--quick]``.

Runs each scenario against the upstream direct, a minimal Go httputil reverse proxy
and smart-proxy (and LiteLLM for overhead) in one run, prints a table and the
targets per scenario, writes ``docs/bench/results.json``, a PNG per scenario in
``docs/bench/`` and the report ``docs/benchmarks.md``. Scenarios run alone merge
their results into the existing results.json, so the report always shows the
latest figures of every scenario (each with its own date and commit).

Run it with the project's venv (``. .venv/bin/activate``); plotting and LiteLLM live
in a separate venv (``$BENCH_VENV``, default ``.venv-bench/`` in the checkout), created on first use.
Needs go, wrk and taskset (installed from Debian when missing and run as root).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness as h  # noqa: E402
import scenarios  # noqa: E402

DOCS = h.REPO / "docs"
RESULTS = DOCS / "bench" / "results.json"


def machine() -> dict:
    cpu = "?"
    with open("/proc/cpuinfo") as file:
        for line in file:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as file:
        mem_kb = int(file.readline().split()[1])
    python = subprocess.run([h.project_python(), "-c", "import sys, trio, hypercorn, httpx, h11; "
                             "print(sys.version.split()[0], trio.__version__, hypercorn.__version__ if hasattr("
                             "hypercorn, '__version__') else '', httpx.__version__, h11.__version__)"],
                            capture_output=True, text=True).stdout.split()
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gb": round(mem_kb / 1024 / 1024, 1),
            "kernel": platform.release(), "go": h.go_version(),
            "python": python[0] if python else "?", "trio": python[1] if len(python) > 1 else "?",
            "httpx": python[-2] if len(python) > 2 else "?", "h11": python[-1] if len(python) > 2 else "?",
            "load_avg_at_start": os.getloadavg()[0], "python_loop_ms": python_loop_ms()}


def python_loop_ms() -> float:
    """The Python speed index of the proxy's core right now: ms for 3 million iterations of a Python loop.

    Lower is faster. It names how fast the machine ran Python when the figures beside it were
    taken, so tables from two machines (or one machine idle and busy) can be read side by side.
    """
    code = (
        "import time\nt = time.perf_counter()\ns = 0\nfor i in range(3_000_000): s += i\n"
        "print((time.perf_counter() - t) * 1000)"
    )
    done = subprocess.run(h.pinned(h.PROXY_CPU, [sys.executable, "-c", code]), capture_output=True, text=True)
    return round(float(done.stdout.strip() or "nan"))


def machine_label(machine: dict) -> str:
    """The CPU model and its Python speed index, as every table of the report names them."""
    return f"{machine['cpu']}, Python speed index {machine.get('python_loop_ms', '?')} ms"


def cpu_tag(cpu: str) -> str:
    """A results.json tag for a CPU model: ``AMD EPYC`` -> ``amd-epyc``."""
    words = "".join(c if c.isalnum() else " " for c in cpu.lower()).split()
    return "-".join(w for w in words if w not in ("cpu", "processor", "r", "tm"))[:40] or "cpu"


def keep_other_machine(results: dict, key: str, machine: dict) -> None:
    """Move ``results[key]`` to ``KEY@CPU`` if it was measured on another CPU model, so a new run keeps it."""
    old = results.get(key)
    if old is None:
        return
    cpu = old["meta"]["machine"]["cpu"]
    if cpu != machine["cpu"]:
        results[f"{key}@{cpu_tag(cpu)}"] = old


def commit() -> str:
    """The measured checkout's commit (and branch), +dirty if smart_proxy/ has uncommitted changes."""
    repo = str(h.PROXY_REPO)
    done = subprocess.run(["git", "-C", repo, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    branch = subprocess.run(["git", "-C", repo, "branch", "--show-current"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", repo, "status", "--porcelain", "--untracked-files=no", "smart_proxy"],
                           capture_output=True, text=True).stdout.strip()
    return f"{done.stdout.strip()}{'+dirty' if dirty else ''} ({branch.stdout.strip() or 'detached'})"


def fmt(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.3f}" if abs(value) < 10 else f"{value:,.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def table(result: dict) -> list[str]:
    columns = result["columns"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in result["rows"]:
        lines.append("| " + " | ".join(fmt(row.get(c)) for c in columns) + " |")
    return lines


def targets(result: dict) -> list[str]:
    lines = ["| target | goal | measured | met |", "|---|---|---|---|"]
    for t in result["targets"]:
        met = {True: "yes", False: "**no**", None: "n/a"}[t["met"]]
        lines.append(f"| {t['what']} | {t['goal']} | {t['measured']} | {met} |")
    return lines


def print_result(result: dict) -> None:
    print(f"\n## {result['title']}\n")
    if "meta" in result:
        print(f"_{machine_label(result['meta']['machine'])}_\n")
    print("\n".join(table(result)))
    print()
    print("\n".join(targets(result)))
    for note in result["notes"]:
        print(f"- {note}")
    sys.stdout.flush()


def write_report(all_results: dict) -> None:
    lines = [
        "# Benchmarks",
        "",
        "Written by `python bench/run.py` (one scenario: `python bench/run.py overhead`; a short smoke run: "
        "`--quick`). Every scenario runs its targets side by side in the same run: the upstream **direct** "
        "(the baseline), a minimal **Go `net/http/httputil`** reverse proxy (the physical limit of a proxy hop, "
        "the primitive llama-swap uses), **smart-proxy** as a process, and LiteLLM's proxy where named.",
        "",
        f"Pinning: the proxy under test runs alone on core {h.PROXY_CPU}; the load generator (wrk, or the Go "
        f"raw-socket stream client) and the fake upstream share core {h.LOAD_CPU}. `cpu_proxy_core` near 100 % with "
        "`cpu_load_core` below it means the proxy, not the load generator, was the limit. The fake upstream is a "
        "Go program that takes llama-server's command line; smart-proxy spawns it as its llama-server. "
        "Latencies are wrk's (ms); added = target minus direct at the same load.",
        "",
        "**These figures were taken on a shared 2-core machine** where other engineers were running tests at the "
        "same time; treat differences of a few percent as noise, and compare targets within one run.",
        "",
    ]
    lines += ["The **Python speed index** beside every table is the time of a fixed 3-million-iteration Python loop "
              "on the proxy core at the start of the scenario (`bench/run.py` `python_loop_ms`): lower is faster. "
              "Compare figures only between tables with the same CPU model and a similar index; results of an "
              "earlier machine are kept under their own heading (`SCENARIO@CPU`), not overwritten.", ""]
    lines += ["## Targets at a glance", "", "| scenario | CPU, Python speed index | target | goal | measured | met |",
              "|---|---|---|---|---|---|"]
    for name, result in all_results.items():
        if "@" in name:
            continue  # tagged runs (another checkout or machine) are shown below, not summarised
        label = machine_label(result["meta"]["machine"])
        for t in result["targets"]:
            met = {True: "yes", False: "**no**", None: "n/a"}[t["met"]]
            lines.append(f"| {result['title'].split(' (')[0]} | {label} | {t['what']} | {t['goal']} | "
                         f"{t['measured']} | {met} |")
    lines.append("")
    for name, result in all_results.items():
        meta = result["meta"]
        m = meta["machine"]
        tag = f" [{name.split('@', 1)[1]}]" if "@" in name else ""
        lines += [f"## {result['title']}{tag}", "", f"**CPU: {machine_label(m)}.** ",
                  f"_{meta['date']}, commit `{meta['commit']}`{' (quick run)' if meta.get('quick') else ''}"
                  f"{', niceness ' + str(meta['nice']) if meta.get('nice') else ''}; "
                  f"{m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB, Linux {m['kernel']}, Python {m['python']} "
                  f"(trio {m['trio']}, httpx {m['httpx']}, h11 {m['h11']}), {m['go']}; "
                  f"load average {m['load_avg_at_start']:.2f} at start; Python speed index "
                  f"{m.get('python_loop_ms', '?')} ms (3M-iteration loop on the proxy core; lower is faster)._", ""]
        lines += table(result) + [""] + targets(result) + [""]
        lines += [f"- {note}" for note in result["notes"]]
        png = name.replace("@", "-") + ".png"
        if (DOCS / "bench" / png).exists():
            lines += ["", f"![{name}](bench/{png})"]
        lines.append("")
    extra = DOCS / "bench" / "findings.md"
    if extra.exists():
        lines += [extra.read_text()]
    (DOCS / "benchmarks.md").write_text("\n".join(lines))


def plot(names: list[str]) -> None:
    python = h.BENCH_VENV / "bin" / "python"
    if not python.exists():
        h.log("no bench venv: plots skipped")
        return
    done = subprocess.run([str(python), str(h.BENCH_DIR / "plot.py"), str(RESULTS), str(DOCS / "bench"), *names])
    if done.returncode != 0:
        h.log("plotting failed (see above)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scenario", nargs="*", help=f"any of {', '.join(scenarios.SCENARIOS)} (default: all)")
    parser.add_argument("--quick", action="store_true", help="short runs, fewer clients: to check the harness")
    parser.add_argument("--no-litellm", action="store_true", help="do not install or run LiteLLM")
    parser.add_argument("--no-report", action="store_true", help="print only; leave docs/ alone")
    parser.add_argument("--nice", type=int, default=0,
                        help="run every benchmark process at this niceness (e.g. -5 on a busy machine; needs root)")
    parser.add_argument("--proxy-repo", type=Path, default=h.REPO,
                        help="measure the smart_proxy of another checkout (default: this one)")
    parser.add_argument("--tag", default="", help="store results under SCENARIO@TAG (e.g. to keep a main-branch run)")
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing: redraw every plot and rewrite docs/benchmarks.md from results.json")
    args = parser.parse_args()
    if args.report_only:
        results = json.loads(RESULTS.read_text())
        plot(list(results))
        write_report(results)
        h.log(f"wrote {DOCS / 'benchmarks.md'}")
        return 0
    h.NICE = args.nice
    h.PROXY_REPO = args.proxy_repo.resolve()
    names = args.scenario or list(scenarios.SCENARIOS)
    unknown = [n for n in names if n not in scenarios.SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario {', '.join(unknown)}; known: {', '.join(scenarios.SCENARIOS)}")
    h.require_tools()
    wants_litellm = "overhead" in names and not args.no_litellm
    status = h.ensure_bench_venv(with_litellm=wants_litellm) if not args.no_report or wants_litellm else "skipped"
    if not wants_litellm:
        status = "--no-litellm" if args.no_litellm else status
    work = h.Workdir()
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() and not args.no_report else {}
    try:
        h.log(f"building the Go programs in {work.path}")
        go = h.GoBinaries(work.path)
        ctx = scenarios.Context(work.path, go, args.quick, status)
        for name in names:
            h.log(f"scenario {name}")
            began = time.monotonic()
            stamp = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "commit": commit(),
                     "machine": machine(), "quick": args.quick, "nice": args.nice}
            result = scenarios.SCENARIOS[name](ctx)
            result["meta"] = {**stamp, "seconds": round(time.monotonic() - began, 1)}
            print_result(result)
            key = f"{name}@{args.tag}" if args.tag else name
            keep_other_machine(results, key, stamp["machine"])
            results[key] = result
            if not args.no_report:
                RESULTS.parent.mkdir(parents=True, exist_ok=True)
                RESULTS.write_text(json.dumps(results, indent=1))
    except BaseException:
        h.stop_all()
        h.log(f"failed: logs kept in {work.path}")
        raise
    else:
        h.stop_all()
        work.cleanup()
    if not args.no_report:
        ordered = {key: results[key] for n in scenarios.SCENARIOS for key in results if key.split("@")[0] == n}
        RESULTS.write_text(json.dumps(ordered, indent=1))
        plot([f"{n}@{args.tag}" if args.tag else n for n in names])
        write_report(ordered)
        h.log(f"wrote {DOCS / 'benchmarks.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
