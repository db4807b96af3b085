"""The pool end to end with the real llama-server, gemma served under several catalog names."""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import signal
import socket
import time

import httpx
import pytest

from ..conftest import ProxyProcess, pids_alive

pytestmark = pytest.mark.real


def _ini(binary: str, gemma: str, size: int, names=("a", "b", "c"), extra: str = "") -> str:
    models = "".join(f"[model:{name}]\npath = {gemma}\nargs = --ctx-size 512 --parallel 2\n" for name in names)
    return f"[pool]\nsize = {size}\nllama_server = {binary}\nload_timeout = 60s\n{extra}\n{models}"


def _health(proxy: ProxyProcess) -> dict:
    return httpx.get(f"{proxy.url}/health", timeout=10).json()


def _complete(proxy: ProxyProcess, model: str, tokens: int = 2) -> httpx.Response:
    return httpx.post(
        f"{proxy.url}/v1/completions", json={"model": model, "prompt": "Hi", "max_tokens": tokens}, timeout=120
    )


def test_32_concurrent_cold_requests_start_one_process(proxy_process, llama_server_binary, gemma_path) -> None:
    proxy = proxy_process(_ini(llama_server_binary, gemma_path, size=2))
    with concurrent.futures.ThreadPoolExecutor(32) as executor:
        responses = list(executor.map(lambda _: _complete(proxy, "a"), range(32)))
    assert [r.status_code for r in responses] == [200] * 32
    health = _health(proxy)
    assert [s["model"] for s in health["pool"]["servers"]] == ["a"]
    assert next(m for m in health["pool"]["models"] if m["model"] == "a")["loads"] == 1
    assert proxy.log().count("started llama-server pid") == 1


def test_lru_idle_server_is_evicted(proxy_process, llama_server_binary, gemma_path) -> None:
    proxy = proxy_process(_ini(llama_server_binary, gemma_path, size=2))
    for model in ("a", "b", "a", "c"):
        assert _complete(proxy, model).status_code == 200
    assert sorted(s["model"] for s in _health(proxy)["pool"]["servers"]) == ["a", "c"]
    assert "b: evicted" in proxy.log()


def test_size_1_streaming_a_is_not_evicted_b_waits(proxy_process, llama_server_binary, gemma_path) -> None:
    proxy = proxy_process(_ini(llama_server_binary, gemma_path, size=1))
    assert _complete(proxy, "a").status_code == 200
    a_done = []
    with httpx.stream(
        "POST", f"{proxy.url}/v1/completions", json={"model": "a", "prompt": "Tell a story", "max_tokens": 60, "stream": True},
        timeout=120,
    ) as stream, concurrent.futures.ThreadPoolExecutor(1) as executor:
        lines = stream.iter_lines()
        next(lines)
        b = executor.submit(_complete, proxy, "b")
        time.sleep(0.5)
        assert not b.done()  # b waits while a streams
        health = _health(proxy)
        assert [s["model"] for s in health["pool"]["servers"]] == ["a"] and health["pool"]["queued"] == 1
        for line in lines:
            a_done.append(line)
        assert b.result(timeout=120).status_code == 200
    assert a_done[-2:] == ["data: [DONE]", ""] or "data: [DONE]" in a_done
    assert [s["model"] for s in _health(proxy)["pool"]["servers"]] == ["b"]


def test_kill_9_mid_stream(proxy_process, llama_server_binary, gemma_path) -> None:
    proxy = proxy_process(_ini(llama_server_binary, gemma_path, size=2))
    assert _complete(proxy, "b").status_code == 200
    events = []
    with httpx.stream(
        "POST", f"{proxy.url}/v1/completions",
        json={"model": "a", "prompt": "Tell a story", "max_tokens": 400, "stream": True, "ignore_eos": True},
        timeout=120,
    ) as stream:
        for line in stream.iter_lines():
            if not line.startswith("data: "):
                continue
            events.append(line)
            if len(events) == 3:
                pid = next(s["pid"] for s in _health(proxy)["pool"]["servers"] if s["model"] == "a")
                os.kill(pid, signal.SIGKILL)
    error = json.loads(events[-1].removeprefix("data: "))["error"]
    assert error["code"] == 502
    assert _complete(proxy, "b").status_code == 200  # the other model is unaffected
    a = next(m for m in _health(proxy)["pool"]["models"] if m["model"] == "a")
    assert a["crashes"] == 1 and a["last_exit_code"] == -9
    assert _complete(proxy, "a").status_code == 200  # and the next request restarts it
    assert next(m for m in _health(proxy)["pool"]["models"] if m["model"] == "a")["loads"] == 2


def test_all_clients_of_a_loading_model_leave(proxy_process, llama_server_binary, gemma_path) -> None:
    proxy = proxy_process(_ini(llama_server_binary, gemma_path, size=2))
    body = json.dumps({"model": "a", "prompt": "x", "max_tokens": 1}).encode()
    host, port = proxy.url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as client:
        client.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                       b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        deadline = time.monotonic() + 30
        while not _health(proxy)["pool"]["servers"]:  # the load has begun
            assert time.monotonic() < deadline, "the load did not begin"
            time.sleep(0.02)
        assert _health(proxy)["pool"]["servers"][0]["state"] != "ready"
    # the only client has left while its model loads
    deadline = time.monotonic() + 10
    while _health(proxy)["pool"]["servers"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _health(proxy)["pool"]["servers"] == []
    log = proxy.log()
    assert "every request waiting on the load has gone" in log
    pid = int(re.search(r"started llama-server pid (\d+)", log).group(1))
    assert pids_alive([pid]) == []
