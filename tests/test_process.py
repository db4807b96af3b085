"""The proxy as a process with the fake llama-server: signals, and no orphan llama-server ever;
and one ServerProcess noticing that its llama-server is ready."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import httpx
import pytest
import trio

from smart_proxy import process
from smart_proxy.process import ServerProcess, free_port

from .conftest import ProxyProcess, pids_alive


@pytest.fixture
def fake_ini(tmp_path: Path, fake_binary: str) -> Path:
    model = tmp_path / "a.json"
    model.write_text(json.dumps({"token_delay": 0.05, "tokens": 100}))
    ini = tmp_path / "proxy.ini"
    ini.write_text(f"[proxy]\ngrace = 10s\n[pool]\nllama_server = {fake_binary}\n[model:a]\npath = {model}\n")
    return ini


def _load(proxy: ProxyProcess) -> list[int]:
    response = httpx.post(f"{proxy.url}/v1/completions", json={"model": "a", "prompt": "x", "max_tokens": 1}, timeout=30)
    assert response.status_code == 200
    return [s["pid"] for s in httpx.get(f"{proxy.url}/health").json()["pool"]["servers"]]


def _wait_gone(pids: list[int], seconds: float = 2.0) -> list[int]:
    deadline = time.monotonic() + seconds
    while pids_alive(pids) and time.monotonic() < deadline:
        time.sleep(0.02)
    return pids_alive(pids)


def test_sigkill_of_the_proxy_leaves_no_llama_server(fake_ini: Path, tmp_path: Path) -> None:
    proxy = ProxyProcess(fake_ini, tmp_path / "log")
    try:
        pids = _load(proxy)
        assert pids_alive(pids) == pids
        proxy.process.kill()
        proxy.process.wait(10)
        assert _wait_gone(pids) == []
    finally:
        proxy.stop()


def test_sigterm_lets_a_stream_finish_then_exits_0(fake_ini: Path, tmp_path: Path) -> None:
    proxy = ProxyProcess(fake_ini, tmp_path / "log")
    try:
        pids = _load(proxy)
        body = {"model": "a", "prompt": "x", "stream": True, "max_tokens": 20}  # ~1 s of tokens
        with httpx.stream("POST", f"{proxy.url}/v1/completions", json=body, timeout=30) as stream:
            lines = stream.iter_lines()
            next(lines)
            proxy.process.send_signal(signal.SIGTERM)
            rest = list(lines)
        assert "data: [DONE]" in rest  # the in-flight stream was not cut
        assert proxy.process.wait(30) == 0
        assert _wait_gone(pids) == []
    finally:
        proxy.stop()


def test_sigint_exits_0(fake_ini: Path, tmp_path: Path) -> None:
    proxy = ProxyProcess(fake_ini, tmp_path / "log")
    try:
        pids = _load(proxy)
        proxy.process.send_signal(signal.SIGINT)
        assert proxy.process.wait(30) == 0
        assert _wait_gone(pids) == []
        assert "Traceback" not in proxy.log()
    finally:
        proxy.stop()


# ---- ServerProcess: readiness ------------------------------------------------------------


async def _run_until_ready(
    fake_binary: str, tmp_path: Path, http: httpx.AsyncClient, behaviour: dict, within: float = 8.0
) -> ServerProcess:
    """Start the fake, wait at most ``within`` seconds for ready, stop it."""
    model = tmp_path / "m.json"
    model.write_text(json.dumps(behaviour))
    port = free_port()
    server = ServerProcess([fake_binary, "-m", str(model), "--port", str(port)], name="m", port=port, http=http)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.run, 30.0)
        with trio.move_on_after(within):
            await server.ready.wait()
        nursery.cancel_scope.cancel()
    return server


def _pipes() -> set[str]:
    found = set()
    for fd in Path("/proc/self/fd").iterdir():
        try:
            target = str(fd.readlink())
        except OSError:  # the listing's own descriptor, closed by now
            continue
        if target.startswith("pipe:"):
            found.add(target)
    return found


async def test_a_finished_server_holds_no_pipe(fake_binary: str, tmp_path: Path, http: httpx.AsyncClient) -> None:
    before = _pipes()
    servers = [await _run_until_ready(fake_binary, tmp_path, http, {}) for _ in range(3)]
    assert all(server.exited.is_set() for server in servers)
    assert _pipes() - before == set()  # while the ServerProcess objects are still alive


async def test_a_loaded_line_triggers_the_health_check(
    fake_binary: str, tmp_path: Path, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    # polls a minute apart: only llama-server's "model loaded" line can make it ready in time
    monkeypatch.setattr(process, "_POLL_FIRST", 60.0)
    monkeypatch.setattr(process, "_POLL_MAX", 60.0)
    server = await _run_until_ready(fake_binary, tmp_path, http, {"load_delay": 0.5})
    assert server.ready.is_set()
    assert "llama_server: model loaded" in server.tail_text()


async def test_a_silent_load_is_found_by_polling(fake_binary: str, tmp_path: Path, http: httpx.AsyncClient) -> None:
    server = await _run_until_ready(fake_binary, tmp_path, http, {"load_delay": 0.5, "silent_load": True})
    assert server.ready.is_set()
    assert "model loaded" not in server.tail_text()
    assert server.slots == 2  # /props was read after /health said 200


async def test_a_silent_load_is_not_taken_for_ready_by_the_hint_alone(
    fake_binary: str, tmp_path: Path, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the "server is listening" line comes before the load ends: it triggers a poll, which says 503
    monkeypatch.setattr(process, "_POLL_FIRST", 60.0)
    monkeypatch.setattr(process, "_POLL_MAX", 60.0)
    server = await _run_until_ready(fake_binary, tmp_path, http, {"load_delay": 0.3, "silent_load": True}, within=1.5)
    assert "server is listening" in server.tail_text()
    assert not server.ready.is_set()
