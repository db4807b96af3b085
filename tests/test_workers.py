"""``[proxy] workers``: a router as several processes on one port (smart_proxy/workers.py)."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from smart_proxy.cli import main
from smart_proxy.config import load_config
from smart_proxy.errors import ConfigError
from tests.conftest import pids_alive


def children(parent: int) -> list[int]:
    """The running processes whose parent is ``parent``."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == parent and fields[0] not in ("Z", "X"):
            found.append(int(proc.name))
    return found


def workers_of(supervisor: int) -> list[int]:
    """The worker processes: each the child of a lifeline the supervisor started."""
    return sorted(pid for lifeline in children(supervisor) for pid in children(lifeline))


def established(pid: int, port: int) -> int:
    """How many established TCP connections to local ``port`` process ``pid`` holds."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as file:
            for line in list(file)[1:]:
                fields = line.split()
                if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "01":
                    inodes.add(fields[9])
    held = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = str(fd.readlink())
        except OSError:
            continue
        if target.startswith("socket:[") and target[8:-1] in inodes:
            held += 1
    return held


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def chat(port: int, connection: http.client.HTTPConnection | None = None) -> int:
    conn = connection or http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    body = {"model": "bench", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    response.read()
    if connection is None:
        conn.close()
    return response.status


def wait_for(predicate, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def router_ini(tmp_path: Path, node_url: str, workers: int | None = None) -> Path:
    path = tmp_path / "router.ini"
    lines = ["[proxy]", "host = 127.0.0.1", "grace = 2s"]
    if workers is not None:
        lines.append(f"workers = {workers}")
    lines += ["[peer:node]", f"url = {node_url}", "kind = smart-proxy", "refresh = 1s"]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_workers_need_a_router_and_a_port(tmp_path: Path, fake_binary: str, capsys: pytest.CaptureFixture[str]) -> None:
    model = tmp_path / "m.json"
    model.write_text("{}")
    with_model = tmp_path / "node.ini"
    with_model.write_text(f"[proxy]\nworkers = 2\n[pool]\nllama_server = {fake_binary}\n[model:bench]\npath = {model}\n")
    with pytest.raises(ConfigError, match=r"workers: 2 processes need a router.*cannot be shared"):
        load_config(str(with_model))
    zero = router_ini(tmp_path, "http://127.0.0.1:9", workers=0)
    with pytest.raises(ConfigError, match="workers: must be at least 1"):
        load_config(str(zero))

    router = router_ini(tmp_path, "http://127.0.0.1:9")
    assert main(["--config", str(router), "--port", "0", "--workers", "2"]) == 2
    assert "the workers share one port; give one" in capsys.readouterr().err
    with_model.write_text(with_model.read_text().replace("workers = 2\n", ""))
    assert main(["--config", str(with_model), "--port", "8", "--workers", "3"]) == 2
    assert "workers: 3 processes need a router" in capsys.readouterr().err


def test_two_workers_share_the_port_survive_a_killed_one_and_stop_together(
    tmp_path: Path, fake_binary: str, proxy_process
) -> None:
    model = tmp_path / "bench.json"
    model.write_text("{}")
    node = proxy_process(f"[pool]\nllama_server = {fake_binary}\nload_timeout = 10s\n[model:bench]\npath = {model}\n")
    port = free_port()
    log = open(tmp_path / "router.log", "wb")  # noqa: SIM115
    supervisor = subprocess.Popen(
        [sys.executable, "-m", "smart_proxy", "--config", str(router_ini(tmp_path, node.url, workers=2)),
         "--port", str(port)],
        stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        wait_for(lambda: len(workers_of(supervisor.pid)) == 2, "two workers")
        workers = workers_of(supervisor.pid)
        wait_for(lambda: (tmp_path / "router.log").read_text().count("smart-proxy listening on") == 2, "both listening")
        wait_for(lambda: chat(port) == 200, "the node's model through the router")

        # 16 keep-alive connections, each answered: the kernel spreads them over both workers
        connections = [http.client.HTTPConnection("127.0.0.1", port, timeout=30) for _ in range(16)]
        assert [chat(port, conn) for conn in connections] == [200] * 16
        held = {pid: established(pid, port) for pid in workers}
        assert sum(held.values()) == 16 and all(held.values()), held
        for conn in connections:
            conn.close()

        # one worker killed: new connections go to the other, and the supervisor starts it again
        killed = workers[0]
        os.kill(killed, signal.SIGKILL)
        wait_for(lambda: not pids_alive([killed]), "the worker to die")
        assert [chat(port) for _ in range(20)] == [200] * 20
        wait_for(lambda: len(workers_of(supervisor.pid)) == 2 and killed not in workers_of(supervisor.pid),
                 "the killed worker started again")
        text = (tmp_path / "router.log").read_text()
        assert "worker 1 stopped (signal SIGKILL); starting it again" in text or \
            "worker 2 stopped (signal SIGKILL); starting it again" in text, text
        wait_for(lambda: (tmp_path / "router.log").read_text().count("smart-proxy listening on") == 3, "restarted")
        assert [chat(port) for _ in range(10)] == [200] * 10

        # SIGTERM: every worker drains and stops, then the supervisor exits 0
        every = workers_of(supervisor.pid) + children(supervisor.pid)
        supervisor.send_signal(signal.SIGTERM)
        assert supervisor.wait(30) == 0
        wait_for(lambda: not pids_alive(every), "no worker left")
        assert (tmp_path / "router.log").read_text().count("received SIGTERM: draining") == 2
    finally:
        if supervisor.poll() is None:
            supervisor.kill()
            supervisor.wait()
        log.close()


def test_a_killed_supervisor_takes_its_workers_with_it(tmp_path: Path, fake_binary: str, proxy_process) -> None:
    port = free_port()
    supervisor = subprocess.Popen(
        [sys.executable, "-m", "smart_proxy", "--config", str(router_ini(tmp_path, "http://127.0.0.1:9", workers=2)),
         "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: len(workers_of(supervisor.pid)) == 2, "two workers")
        every = workers_of(supervisor.pid) + children(supervisor.pid)
        supervisor.kill()
        supervisor.wait()
        wait_for(lambda: not pids_alive(every), "the workers to die with their supervisor", timeout=10)
    finally:
        if supervisor.poll() is None:
            supervisor.kill()
