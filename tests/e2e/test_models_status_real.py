"""``/v1/models`` status end to end: the real llama-server loading gemma, and one failing to load."""

from __future__ import annotations

import concurrent.futures
import time

import httpx
import pytest

pytestmark = pytest.mark.real


def _ini(binary: str, gemma: str, corrupt: str) -> str:
    return (
        f"[pool]\nsize = 2\nllama_server = {binary}\nload_timeout = 60s\n\n"
        f"[model:gemma]\npath = {gemma}\nargs = --ctx-size 512\n\n"
        f"[model:corrupt]\npath = {corrupt}\n"
    )


def _statuses(url: str) -> dict[str, dict]:
    response = httpx.get(f"{url}/v1/models", timeout=10)
    assert response.status_code == 200, response.text
    return {entry["id"]: entry["status"] for entry in response.json()["data"]}


def test_models_shows_loading_then_loaded_during_a_real_load(proxy_process, llama_server_binary, gemma_path, tmp_path):
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(b"GGUF" + b"\x00" * 64)
    proxy = proxy_process(_ini(llama_server_binary, gemma_path, str(corrupt)))
    assert _statuses(proxy.url) == {"gemma": {"value": "unloaded"}, "corrupt": {"value": "unloaded"}}
    seen: list[dict] = []
    body = {"model": "gemma", "prompt": "Hi", "max_tokens": 2}
    with concurrent.futures.ThreadPoolExecutor(1) as executor:
        answer = executor.submit(httpx.post, f"{proxy.url}/v1/completions", json=body, timeout=120)
        deadline = time.monotonic() + 90
        while not answer.done() and time.monotonic() < deadline:
            seen.append(_statuses(proxy.url)["gemma"])
        assert answer.result(timeout=1).status_code == 200
    values = [status["value"] for status in seen]
    assert "loading" in values, values
    first = values.index("loading")
    assert set(values[:first]) <= {"unloaded"} and set(values[first:]) <= {"loading", "loaded"}, values
    progress = [status["progress"] for status in seen if status["value"] == "loading"]
    assert all(p["timeout"] == 60.0 and 0 <= p["elapsed"] < 60 for p in progress), progress
    assert _statuses(proxy.url)["gemma"] == {"value": "loaded"}
    loaded = httpx.get(f"{proxy.url}/v1/models", params={"status": "loaded"}, timeout=10).json()["data"]
    assert [entry["id"] for entry in loaded] == ["gemma"]

    # a GGUF llama-server cannot load: failed, with the error the request got and llama-server's exit code
    failed = httpx.post(f"{proxy.url}/v1/completions", json={**body, "model": "corrupt"}, timeout=120)
    assert failed.status_code == 502
    status = _statuses(proxy.url)["corrupt"]
    assert status["value"] == "failed" and status["failed"] is True, status
    assert status["error"] == failed.json()["error"]["message"]
    assert isinstance(status["exit_code"], int) and status["exit_code"] != 0
    assert time.time() - 120 < status["failed_at"] <= time.time()
