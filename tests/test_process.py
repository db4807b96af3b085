"""The proxy as a process with the fake llama-server: signals, and no orphan llama-server ever."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import httpx
import pytest

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
