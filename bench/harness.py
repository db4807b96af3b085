"""The benchmark harness: tools, pinned processes, load generators and probes.

Theory of operation: every scenario runs three kinds of target side by side in one
run: the upstream **direct**, the **Go** ``httputil`` reverse proxy, **smart-proxy**
(and LiteLLM where a scenario names it). The machine has two cores: the proxy under
test runs alone on core :data:`PROXY_CPU`; the load generator (wrk, the Go stream
client) and the fake upstream share :data:`LOAD_CPU`. Core utilisation is sampled
from ``/proc/stat`` around every measurement, so a report can show which core was
saturated (if the proxy's core is at 100 % and the load core is not, the load
generator was not the bottleneck).

The Go programs in ``bench/go/`` are copied into a temporary directory and built
with the standard library only. smart-proxy is started as a real process
(``python -m smart_proxy``) with a ``proxy.ini`` whose "llama-server" is a shell
script that execs the Go fake upstream pinned to the load core: the proxy spawns
and supervises it like a real llama-server.

Standard library only: this runs under the project's venv; plotting runs in the
bench venv (``bench/plot.py``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import TypeVar

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
#: The checkout whose smart_proxy is measured (``--proxy-repo``); the report goes to REPO's docs/.
PROXY_REPO = REPO
PROXY_CPU = 1
LOAD_CPU = 0
#: The benchmarks' helper venv (LiteLLM, matplotlib, py-spy): ``$BENCH_VENV``, else ``.venv-bench/`` in the checkout.
BENCH_VENV = Path(os.environ.get("BENCH_VENV") or REPO / ".venv-bench")

_started: list[subprocess.Popen] = []


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---- tools -----------------------------------------------------------------------------


def require_tools() -> None:
    """go, wrk and taskset, installed from Debian if missing and we are root."""
    missing = [tool for tool in ("go", "wrk", "taskset") if shutil.which(tool) is None]
    if missing and os.geteuid() == 0 and shutil.which("apt-get"):
        packages = {"go": "golang-go", "wrk": "wrk", "taskset": "util-linux"}
        log(f"installing {', '.join(missing)} from Debian")
        subprocess.run(["apt-get", "install", "-y", "-q", *(packages[t] for t in missing)], check=False,
                       stdout=subprocess.DEVNULL)
        missing = [tool for tool in missing if shutil.which(tool) is None]
    if missing:
        sys.exit(f"bench: missing {', '.join(missing)} (apt-get install golang-go wrk util-linux)")
    if (os.cpu_count() or 1) < 2:
        sys.exit("bench: needs two cores to pin the proxy apart from the load generator")


class GoBinaries:
    """The Go programs of bench/go/, built into a temporary directory."""

    def __init__(self, workdir: Path) -> None:
        self.dir = workdir / "go"
        self.dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "GO111MODULE": "off", "GOCACHE": str(workdir / "gocache"), "GOFLAGS": ""}
        for source in sorted((BENCH_DIR / "go").glob("*.go")):
            package = self.dir / source.stem
            package.mkdir(exist_ok=True)
            shutil.copy(source, package / "main.go")
            subprocess.run(["go", "build", "-o", str(self.dir / f"{source.stem}-bin"), "."], cwd=package, env=env,
                           check=True)
        self.fakeupstream = str(self.dir / "fakeupstream-bin")
        self.goproxy = str(self.dir / "goproxy-bin")
        self.streamclient = str(self.dir / "streamclient-bin")


def go_version() -> str:
    return subprocess.run(["go", "version"], capture_output=True, text=True).stdout.strip()


# ---- processes -------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


#: Niceness for every benchmark process (``--nice``); negative needs root.
NICE = 0


def pinned(cpu: int, argv: list[str]) -> list[str]:
    nice = ["nice", "-n", str(NICE)] if NICE else []
    return [*nice, "taskset", "-c", str(cpu), *argv]


def start(argv: list[str], *, log_path: Path, cwd: Path | None = None, env: dict | None = None) -> subprocess.Popen:
    """Start a process in its own session, output to ``log_path``; stopped by :func:`stop_all`."""
    out = open(log_path, "wb")  # noqa: SIM115  # closed with the process
    process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=cwd, env=env, start_new_session=True)
    process.log_path = log_path  # type: ignore[attr-defined]
    _started.append(process)
    return process


def stop(process: subprocess.Popen, timeout: float = 15.0) -> None:
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    if process in _started:
        _started.remove(process)


def stop_all() -> None:
    for process in list(reversed(_started)):
        stop(process)


def wait_http(url: str, timeout: float = 30.0, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{process.args} exited with {process.returncode}:\n{tail(process)}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{url} did not answer 200 within {timeout}s")


def tail(process: subprocess.Popen, lines: int = 20) -> str:
    path = getattr(process, "log_path", None)
    return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:]) if path else ""


def get_json(url: str, timeout: float = 10.0) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


def post_json(url: str, body: dict, timeout: float = 60.0, auth: str = "") -> tuple[int, bytes]:
    headers = {"Content-Type": "application/json", **({"Authorization": auth} if auth else {})}
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


# ---- probes ----------------------------------------------------------------------------


def cpu_times() -> dict[int, tuple[int, int]]:
    """Per core: (busy, total) jiffies since boot."""
    times = {}
    with open("/proc/stat") as file:
        for line in file:
            if line.startswith("cpu") and line[3].isdigit():
                name, *values = line.split()
                numbers = [int(v) for v in values]
                idle = numbers[3] + numbers[4]
                times[int(name[3:])] = (sum(numbers[:8]) - idle, sum(numbers[:8]))
    return times


def listen_overflows() -> int:
    """The kernel's count of connections dropped because a listen backlog was full (TcpExt ListenOverflows)."""
    with open("/proc/net/netstat") as file:
        lines = file.read().splitlines()
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            table = dict(zip(names.split()[1:], values.split()[1:], strict=True))
            return int(table.get("ListenOverflows", 0))
    return 0


class CpuMeter:
    """Busy share of each core, and of some processes, between enter and exit."""

    def __init__(self, pids: dict[str, int] | None = None) -> None:
        self.pids = pids or {}
        self.cores: dict[int, float] = {}
        self.processes: dict[str, float] = {}
        self.cpu_seconds: dict[str, float] = {}

    def __enter__(self) -> CpuMeter:
        self._cores = cpu_times()
        self._procs = {name: process_cpu(pid) for name, pid in self.pids.items()}
        self._t = time.monotonic()
        self._overflows = listen_overflows()
        return self

    def __exit__(self, *exc: object) -> None:
        after = cpu_times()
        self.overflows = listen_overflows() - self._overflows
        elapsed = time.monotonic() - self._t
        for core, (busy, total) in after.items():
            busy0, total0 = self._cores.get(core, (0, 0))
            self.cores[core] = 100.0 * (busy - busy0) / max(1, total - total0)
        tick = os.sysconf("SC_CLK_TCK")
        for name, pid in self.pids.items():
            self.cpu_seconds[name] = (process_cpu(pid) - self._procs[name]) / tick
            self.processes[name] = 100.0 * self.cpu_seconds[name] / max(elapsed, 1e-9)

    def summary(self) -> dict:
        return {"cpu_load_core": round(self.cores.get(LOAD_CPU, 0), 1),
                "cpu_proxy_core": round(self.cores.get(PROXY_CPU, 0), 1),
                "listen_overflows": self.overflows,
                **{f"cpu_{name}": round(value, 1) for name, value in self.processes.items()}}


class SyscallCounter:
    """How many times a process entered some system calls between enter and exit (``perf stat``'s tracepoints).

    ``counts`` maps each call (``sendto``) to its count, or is empty where ``perf`` or its
    syscall tracepoints are not available: the figure is then reported as missing, not as 0.
    """

    def __init__(self, pid: int | None, calls: tuple[str, ...] = ("sendto", "recvfrom")) -> None:
        self.pid, self.calls = pid, calls
        self.counts: dict[str, int] = {}
        self._perf: subprocess.Popen | None = None

    def __enter__(self) -> SyscallCounter:
        if self.pid is None or shutil.which("perf") is None:
            return self
        events = ",".join(f"syscalls:sys_enter_{call}" for call in self.calls)
        self._perf = subprocess.Popen(["perf", "stat", "-x,", "-e", events, "-p", str(self.pid)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        time.sleep(0.3)  # perf attaches before the load starts
        return self

    def __exit__(self, *exc: object) -> None:
        if self._perf is None:
            return
        self._perf.send_signal(signal.SIGINT)
        try:
            _, err = self._perf.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self._perf.kill()
            return
        for line in err.splitlines():
            fields = line.split(",")
            if len(fields) > 2 and fields[0].isdigit() and "sys_enter_" in fields[2]:
                self.counts[fields[2].rsplit("sys_enter_", 1)[1]] = int(fields[0])


def process_cpu(pid: int) -> int:
    """utime + stime of one process, in clock ticks (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as file:
            fields = file.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return 0


def process_runtime_s(pid: int) -> float:
    """CPU time of every running thread of ``pid``, in seconds, from the scheduler's own count (0 if gone).

    ``/proc/PID/task/TID/schedstat`` counts nanoseconds on the CPU; ``/proc/PID/stat``'s
    utime and stime are sampled at each clock tick (10 ms here), which over a 3-second run
    is a count of ~300 samples and moves a few percent from one run to the next by itself.
    The time of a thread that has ended is not in the sum.
    """
    total = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return 0.0
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as file:
                total += int(file.read().split()[0])
        except (FileNotFoundError, ProcessLookupError):  # the thread ended meanwhile
            continue
    return total / 1e9


def median(values: list[float]) -> float:
    """The median (the mean of the middle two for an even count)."""
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


#: How many interleaved rounds the scenarios that compare targets under load run (see :func:`median_row`).
ROUNDS = 3


def median_row(runs: list[dict], sums: tuple[str, ...] = ("errors", "lost", "listen_overflows")) -> dict:
    """One row from a target's rounds: the median of each figure (those in ``sums``: their sum).

    The scenarios that compare targets run every target once per round, each round starting
    with another one, so a slow minute of a shared machine falls on all of them alike.
    """
    row: dict = {"rounds": len(runs)}
    for key in runs[0]:
        values = [run[key] for run in runs if run.get(key) is not None]
        if key in sums:
            row[key] = sum(values)
        elif not values:
            row[key] = None
        elif all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            row[key] = median(values)
        else:
            row[key] = values[0]
    return row


def rounds_note(rounds: int = ROUNDS) -> str:
    """The note a scenario that runs in rounds (:func:`median_row`, :func:`paired`) adds to its table."""
    return (f"each row is the median of {rounds} interleaved rounds per load (lost chunks, errors and listen overflows: "
            "their sum); every round runs every target once, starting with a different one, and the ratios the targets "
            "judge are medians of the rounds' ratios (a slow minute of the machine weighs on both sides of each)")


def paired(a: list[dict], b: list[dict], key: str) -> float:
    """The median over rounds of ``a[key] / b[key]`` in the same round (0 without a pair)."""
    ratios = [x[key] / y[key] for x, y in zip(a, b, strict=False) if x.get(key) and y.get(key)]
    return median(ratios) if ratios else 0.0


#: A target's key in a round: its name, or a (name, load) pair.
T = TypeVar("T", bound=Hashable)


def interleaved(names: list[T], turn: int) -> list[T]:
    """``names`` for round ``turn``: every one once, starting with a different one each round."""
    start = turn % len(names)
    return names[start:] + names[:start]


def in_rounds(names: list[T], count: int, measure: Callable[[T, int], dict]) -> dict[T, list[dict]]:
    """``measure(name, turn)`` for every name once in each of ``count`` :func:`interleaved` rounds: each name's runs."""
    runs: dict[T, list[dict]] = {name: [] for name in names}
    for turn in range(count):
        for name in interleaved(names, turn):
            runs[name].append(measure(name, turn))
    return runs


def process_cpu_s(pid: int) -> float:
    """utime + stime of one process, in seconds (0 if it is gone)."""
    return process_cpu(pid) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as file:
        for line in file:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def fd_kinds(pid: int) -> dict[str, int]:
    """``pid``'s open descriptors by kind: file, pipe, anon_inode:[eventpoll], TCP sockets by state, ..."""
    states = {"01": "established", "02": "syn_sent", "06": "time_wait", "07": "close", "08": "close_wait",
              "04": "fin_wait1", "05": "fin_wait2", "09": "last_ack", "0A": "listen", "0B": "closing"}
    tcp: dict[str, str] = {}  # socket inode -> state
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                for line in f.readlines()[1:]:
                    fields = line.split()
                    tcp[fields[9]] = states.get(fields[3], fields[3])
        except OSError:
            pass
    kinds: dict[str, int] = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:  # closed meanwhile
            continue
        if target.startswith("socket:["):
            state = tcp.get(target[len("socket:["):-1])
            kind = f"tcp {state}" if state else "socket"
        elif target.startswith("anon_inode:"):
            kind = target
        else:
            kind = "file" if target.startswith("/") else target.split(":[")[0]
        kinds[kind] = kinds.get(kind, 0) + 1
    return dict(sorted(kinds.items()))


def tcp_connections(port: int) -> dict[str, int]:
    """Established TCP connections to or from ``port`` on loopback, by state name."""
    states = {"01": "established", "06": "time_wait", "08": "close_wait", "04": "fin_wait1", "05": "fin_wait2"}
    counts: dict[str, int] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError), open(table) as file:
            next(file)
            for line in file:
                fields = line.split()
                local, remote, state = fields[1], fields[2], fields[3]
                if int(local.rsplit(":", 1)[1], 16) == port or int(remote.rsplit(":", 1)[1], 16) == port:
                    key = states.get(state, state)
                    counts[key] = counts.get(key, 0) + 1
    return counts


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as file:
            return [int(p) for p in file.read().split()]
    except FileNotFoundError:
        return []


# ---- load generators -------------------------------------------------------------------


def wrk(url: str, *, connections: int, duration: float, body: str, timeout: float = 5.0, auth: str = "") -> dict:
    """wrk on the load core; returns requests/s, latency percentiles (ms) and errors."""
    seconds, limit = max(1, round(duration)), max(1, round(timeout))  # wrk takes whole seconds
    argv = pinned(LOAD_CPU, ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", f"--timeout={limit}s",
                             "-s", str(BENCH_DIR / "post.lua"), url])
    done = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, "BENCH_BODY": body, "BENCH_AUTH": auth},
                          timeout=duration + 60)
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("BENCHJSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk failed:\n{done.stdout}\n{done.stderr}")
    raw = json.loads(line.removeprefix("BENCHJSON "))
    seconds = raw["duration_us"] / 1e6
    return {
        "requests": raw["requests"],
        "rps": raw["requests"] / seconds,
        "errors": sum(raw["errors"].values()),
        "error_kinds": {k: v for k, v in raw["errors"].items() if v},
        "p50_ms": raw["lat_us"]["p50"] / 1000,
        "p90_ms": raw["lat_us"]["p90"] / 1000,
        "p99_ms": raw["lat_us"]["p99"] / 1000,
        "max_ms": raw["lat_us"]["max"] / 1000,
    }


def upstream_requests(upstream: str) -> int:
    """Requests the fake upstream at ``upstream`` has taken so far (its ``/bench/stats``)."""
    return int(get_json(f"{upstream}/bench/stats")["requests"])


#: How long (seconds) :func:`wrk_window` lets the load run before its window opens, and after it closes.
WINDOW_MARGIN = 0.5


def wrk_window(url: str, *, connections: int, seconds: int, body: str, answered: Callable[[], int],
               pids: dict[str, int] | None = None, auth: str = "") -> dict:
    """:func:`wrk` for ``seconds`` + 1, and what the target did in the ``seconds`` in the middle of it.

    The steady state of ``connections`` clients: requests answered in the window (by
    ``answered()``, a running count read where the requests end up, such as the fake
    upstream's ``/bench/stats``) over its length, and the CPU of ``pids`` in it (a
    :class:`CpuMeter`). A whole run's own figures would also count each client's
    connect and, at the end, the requests in flight that wrk leaves unanswered, a part
    that grows with the clients and with a shorter run (docs/bench/findings.md). The latencies
    and errors are wrk's, over the whole run, as are the listen queue's overflows; the
    whole run's requests, requests/s and CPU seconds of ``pids`` are there too
    (``whole_run_...``), for a comparison.
    """
    outcome: dict = {}
    load = threading.Thread(target=lambda: outcome.update(wrk(url, connections=connections, duration=seconds + 1,
                                                              body=body, auth=auth)))
    with CpuMeter(pids) as whole:
        load.start()
        try:
            time.sleep(WINDOW_MARGIN)
            with CpuMeter(pids) as cpu:
                first, opened = answered(), time.monotonic()
                time.sleep(seconds)
                last, closed = answered(), time.monotonic()
        finally:
            load.join()
    if not outcome:
        raise RuntimeError(f"wrk against {url} gave no result")
    cpu.overflows = whole.overflows
    window = {"requests": last - first, "rps": (last - first) / (closed - opened), "cpu": cpu}
    return {**outcome, "whole_run_requests": outcome["requests"], "whole_run_rps": outcome["rps"],
            "whole_run_cpu_seconds": whole.cpu_seconds, **window}


def streamclient(binary: str, url: str, *, streams: int, body: dict, expect: int = 0, sep: str = "sse",
                 abort: str = "", timeout: float = 120.0, id_prefix: str = "s", stagger_ms: float = 0,
                 tail: int = 0) -> dict:
    """The Go stream client on the load core; see bench/go/streamclient.go for the fields.

    ``tail`` > 0 adds ``"tail"``: the text of the first stream's last ``tail`` events.
    """
    argv = pinned(LOAD_CPU, [binary, "-url", url, "-n", str(streams), "-body", json.dumps(body), "-expect", str(expect),
                             "-sep", sep, "-timeout", str(timeout), "-id-prefix", id_prefix,
                             "-stagger-ms", str(stagger_ms), "-tail", str(tail)])
    if abort:
        argv += ["-abort", abort]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout + 60)
    if done.returncode != 0:
        raise RuntimeError(f"streamclient failed ({done.returncode}):\n{done.stderr}")
    return json.loads(done.stdout)


# ---- the targets -----------------------------------------------------------------------


class Workdir:
    """A temporary directory for one run's configs, logs and binaries."""

    def __init__(self) -> None:
        self.path = Path(tempfile.mkdtemp(prefix="smart-proxy-bench-"))

    def cleanup(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def fake_llama_script(workdir: Path, go: GoBinaries) -> str:
    """A "llama-server" for proxy.ini: execs the Go fake upstream pinned to the load core."""
    script = workdir / "fake-llama-server"
    script.write_text(f'#!/bin/sh\nexec {" ".join(pinned(LOAD_CPU, [go.fakeupstream]))} "$@"\n')
    script.chmod(0o755)
    return str(script)


def project_python() -> str:
    """The interpreter that runs smart-proxy: this one if it can import the proxy's dependencies."""
    override = os.environ.get("SMART_PROXY_PYTHON")
    if override:
        return override
    probe = subprocess.run([sys.executable, "-c", "import trio, hypercorn, quart_trio, httpx, attrs, cattrs"],
                           capture_output=True)
    if probe.returncode == 0:
        return sys.executable
    for candidate in (REPO / ".venv/bin/python", Path("/work/main/.venv/bin/python")):
        if candidate.exists():
            return str(candidate)
    sys.exit("bench: run with the project's venv (python -m pip install -e .), or set SMART_PROXY_PYTHON")


class SmartProxy:
    """smart-proxy as a process pinned to the proxy core (or ``cpu``), with models served by the fake upstream.

    It logs at ``log_level`` (default: ``$BENCH_PROXY_LOG`` or ``info``, the level users
    run) in ``log_format`` (default: ``$BENCH_PROXY_FORMAT`` or ``text``), to a file.
    """

    def __init__(self, workdir: Path, name: str, ini: str, cpu: int = PROXY_CPU, *, log_level: str | None = None,
                 log_format: str | None = None) -> None:
        self.config = workdir / f"{name}.ini"
        self.config.write_text(ini)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_level = log_level or os.environ.get("BENCH_PROXY_LOG", "info")
        self.log_format = log_format or os.environ.get("BENCH_PROXY_FORMAT", "text")
        self.process = start(
            pinned(cpu, [project_python(), "-m", "smart_proxy", "--config", str(self.config), "--port",
                         str(self.port), "--log-level", self.log_level, "--log-format", self.log_format]),
            log_path=workdir / f"{name}.log", cwd=PROXY_REPO,
            env={**os.environ, "PYTHONPATH": str(PROXY_REPO)},
        )
        wait_http(f"{self.url}/health", timeout=60, process=self.process)

    @property
    def pid(self) -> int:
        return self.process.pid

    def health(self) -> dict:
        return get_json(f"{self.url}/health")

    def upstream_port(self, model: str) -> int:
        for server in self.health()["pool"]["servers"]:
            if server["model"] == model and server["state"] == "ready":
                return server["port"]
        raise RuntimeError(f"no ready server for {model}: {self.health()}")

    def stop(self) -> None:
        stop(self.process)


def fake_model_ini(workdir: Path, go: GoBinaries, models: dict[str, dict], **pool: object) -> str:
    """proxy.ini text for models served by the fake upstream; ``models`` maps name -> behaviour JSON."""
    lines = ["[proxy]", "host = 127.0.0.1", "grace = 2s", "[pool]", f"llama_server = {fake_llama_script(workdir, go)}",
             "load_timeout = 30s", "stop_timeout = 2s", "max_queue = 4096"]
    lines += [f"{key} = {value}" for key, value in pool.items()]
    for name, behaviour in models.items():
        path = workdir / f"model-{name}.json"
        path.write_text(json.dumps(behaviour))
        lines += [f"[model:{name}]", f"path = {path}"]
    return "\n".join(lines) + "\n"


def start_goproxy(workdir: Path, go: GoBinaries, target: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    process = start(pinned(PROXY_CPU, [go.goproxy, "-listen", f"127.0.0.1:{port}", "-target", target]),
                    log_path=workdir / f"goproxy-{port}.log")
    wait_listening(port, process, "goproxy", timeout=10)
    return process, f"http://127.0.0.1:{port}"


def start_floor(workdir: Path, target: str, *, bare: bool = False) -> tuple[subprocess.Popen, str]:
    """bench/floor.py (the cheapest proxy on Hypercorn + Trio; with ``bare``, on Trio alone) on the proxy core."""
    port = free_port()
    process = start(pinned(PROXY_CPU, [project_python(), str(BENCH_DIR / "floor.py"), "--port", str(port),
                                       "--target", target, *(["--bare"] if bare else [])]),
                    log_path=workdir / f"floor-{port}.log")
    wait_listening(port, process, "bench/floor.py", timeout=30)
    return process, f"http://127.0.0.1:{port}"


def wait_listening(port: int, process: subprocess.Popen, name: str, *, timeout: float) -> None:
    """Return once something accepts connections on 127.0.0.1:``port``; fail early if ``process`` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        if process.poll() is not None:
            break
        time.sleep(0.02)
    raise RuntimeError(f"{name} did not listen:\n{tail(process)}")


def start_fakeupstream(workdir: Path, go: GoBinaries, behaviour: dict | None = None,
                       alias: str = "bench") -> tuple[subprocess.Popen, str]:
    port = free_port()
    model = workdir / f"direct-{port}.json"
    model.write_text(json.dumps(behaviour or {}))
    process = start(pinned(LOAD_CPU, [go.fakeupstream, "-m", str(model), "--port", str(port), "--alias", alias]),
                    log_path=workdir / f"fakeupstream-{port}.log")
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/health", timeout=10, process=process)
    return process, url


# ---- LiteLLM ---------------------------------------------------------------------------


def litellm_binary() -> str | None:
    path = BENCH_VENV / "bin" / "litellm"
    return str(path) if path.exists() else None


def ensure_bench_venv(with_litellm: bool) -> str:
    """Create the bench venv (matplotlib, py-spy, pyinstrument, LiteLLM) if missing; return a status line."""
    python = BENCH_VENV / "bin" / "python"
    if not python.exists():
        log(f"creating the bench venv {BENCH_VENV} (matplotlib, py-spy, pyinstrument)")
        subprocess.run([sys.executable, "-m", "venv", str(BENCH_VENV)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q"]
    have = subprocess.run([str(python), "-c", "import matplotlib"], capture_output=True).returncode == 0
    if not have:
        subprocess.run([*pip, "matplotlib", "py-spy", "pyinstrument"], check=False)
    if with_litellm and litellm_binary() is None:
        log("installing litellm[proxy] into the bench venv")
        done = subprocess.run([*pip, "litellm[proxy]"], capture_output=True, text=True)
        if done.returncode != 0:
            return "litellm[proxy] did not install: " + (done.stderr.strip().splitlines() or ["?"])[-1]
    return "ok"


class LiteLLM:
    """LiteLLM's proxy pinned to the proxy core, one model routed to an OpenAI-compatible upstream."""

    def __init__(self, workdir: Path, upstream: str, model: str = "bench") -> None:
        config = workdir / "litellm.yaml"
        config.write_text(
            "model_list:\n"
            f"  - model_name: {model}\n"
            "    litellm_params:\n"
            f"      model: openai/{model}\n"
            f"      api_base: {upstream}/v1\n"
            "      api_key: unused\n"
            "litellm_settings:\n"
            "  telemetry: false\n"
            "  drop_params: true\n"
        )
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # LiteLLM refuses to start without a master key; clients then send it as a bearer token
        self.auth = "Bearer sk-smart-proxy-bench"
        env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR",
               "LITELLM_TELEMETRY": "False", "NO_PROXY": "*", "LITELLM_MASTER_KEY": self.auth.split()[1]}
        binary = litellm_binary()
        assert binary is not None
        self.process = start(pinned(PROXY_CPU, [binary, "--config", str(config), "--host", "127.0.0.1", "--port",
                                                str(self.port), "--num_workers", "1"]),
                             log_path=workdir / "litellm.log", env=env)
        wait_http(f"{self.url}/health/liveliness", timeout=120, process=self.process)

    @property
    def pid(self) -> int:
        return self.process.pid

    def pause(self) -> None:
        """SIGSTOP its process group: its background jobs and any backlog left from its own run would
        otherwise take turns on the proxy core while another target is measured there."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGCONT)

    def stop(self) -> None:
        self.resume()
        stop(self.process)
