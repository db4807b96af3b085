"""``GET /v1/models``: each model's status (unloaded, downloading, loading, loaded, failed) and ``?status=``.

Over the fake llama-server (a slow load, a load that fails), the fake hub (a slow download, a
failing one) and the fake Ollama (an upstream's loaded models, an upstream that is down).
"""

from __future__ import annotations

import time

import httpx
import pytest
import trio

from smart_proxy.dialects.openai import status_filter, status_object
from smart_proxy.download import DownloadSnapshot
from smart_proxy.errors import BadRequest
from smart_proxy.pool import STATUS_VALUES, ModelStatus
from smart_proxy.process import free_port

from .test_download import REPO, make, tiny_repo
from .test_ollama import upstream_config

CHAT = {"messages": [{"role": "user", "content": "hi"}]}


async def listed(http: httpx.AsyncClient, url: str, **params: str) -> dict[str, dict]:
    response = await http.get(f"{url}/v1/models", params=params)
    assert response.status_code == 200, response.text
    return {entry["id"]: entry for entry in response.json()["data"]}


async def poll_while(http: httpx.AsyncClient, url: str, name: str, running: list[int], seen: list[dict]) -> None:
    """Poll ``/v1/models`` for model ``name``'s status until ``running`` is filled."""
    while not running:
        seen.append((await listed(http, url))[name]["status"])
        await trio.sleep(0.02)
    seen.append((await listed(http, url))[name]["status"])


# ---- the dialect's part, no I/O ----------------------------------------------------------------


def test_status_filter_takes_known_values_comma_separated_or_repeated() -> None:
    assert status_filter([]) is None
    assert status_filter(["loaded"]) == {"loaded"}
    assert status_filter(["loaded, loading", "failed"]) == {"loaded", "loading", "failed"}
    assert status_filter([",".join(STATUS_VALUES)]) == set(STATUS_VALUES)
    for bad in (["bogus"], [""], ["loaded,"], ["LOADED"], ["ready"]):
        with pytest.raises(BadRequest) as info:
            status_filter(bad)
        assert "unknown value" in info.value.message and "unloaded, downloading, loading, loaded, failed" in info.value.message


def test_status_object_shapes() -> None:
    assert status_object(ModelStatus("unloaded")) == {"value": "unloaded"}
    assert status_object(ModelStatus("loaded", "ready")) == {"value": "loaded"}
    assert status_object(ModelStatus("loading", "starting", loading_for=1.5, load_timeout=60.0)) == {
        "value": "loading",
        "progress": {"elapsed": 1.5, "timeout": 60.0},
    }
    download = DownloadSnapshot("m", "o/r", ("a.gguf",), "downloading", 250, 1000, 2, 3.5)
    assert status_object(ModelStatus("downloading", download=download))["progress"] == {
        "stage": "downloading", "done": 250, "total": 1000, "percent": 25.0, "elapsed": 3.5, "files": ["a.gguf"]
    }  # fmt: skip
    resolving = DownloadSnapshot("m", "o/r", (), "resolving", 0, 0, 1, 0.1)
    assert status_object(ModelStatus("downloading", download=resolving))["progress"]["percent"] is None
    failed = ModelStatus("failed", "failed", error="boom", failed_at=12.5, exit_code=3)
    assert status_object(failed) == {"value": "failed", "failed": True, "exit_code": 3, "error": "boom", "failed_at": 12.5}
    assert "exit_code" not in status_object(ModelStatus("failed", error="hub down", failed_at=1.0))


# ---- local models: loading, loaded, failed -----------------------------------------------------


async def test_a_slow_load_shows_loading_then_loaded(make_config, start_proxy, http) -> None:
    url = await start_proxy(make_config({"slow": {"load_delay": 1.0}, "other": {}}, load_timeout="30s"))
    before = await listed(http, url)
    assert before["slow"]["status"] == {"value": "unloaded"} and before["slow"]["loaded"] is False
    running: list[int] = []
    seen: list[dict] = []
    filtered: list[set[str]] = []

    async def ask() -> None:
        running.append((await http.post(f"{url}/v1/chat/completions", json={"model": "slow", **CHAT})).status_code)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ask)
        with trio.fail_after(15):
            while not running:
                seen.append((await listed(http, url))["slow"]["status"])
                if seen[-1]["value"] == "loading" and not filtered:
                    filtered.append(set(await listed(http, url, status="loading")))
                await trio.sleep(0.02)
    assert running == [200]
    values = [status["value"] for status in seen]
    assert "loading" in values, values
    # loading, then loaded: never back
    first = values.index("loading")
    assert set(values[:first]) <= {"unloaded"} and set(values[first:]) <= {"loading", "loaded"}, values
    loading = [status["progress"] for status in seen if status["value"] == "loading"]
    assert all(p["timeout"] == 30.0 for p in loading)
    elapsed = [p["elapsed"] for p in loading]
    assert elapsed == sorted(elapsed) and elapsed[-1] > elapsed[0], elapsed
    assert filtered == [{"slow"}]
    after = await listed(http, url)
    assert after["slow"]["status"] == {"value": "loaded"} and after["slow"]["loaded"] is True
    assert after["slow"]["state"] == "ready" and after["other"]["status"] == {"value": "unloaded"}
    assert set(await listed(http, url, status="loaded")) == {"slow"}
    assert set(await listed(http, url, status="unloaded,failed")) == {"other"}


async def test_a_failing_load_shows_failed_with_its_error(make_config, start_proxy, http) -> None:
    url = await start_proxy(make_config({"broken": {"exit_on_load": 3}, "good": {}}))
    started = time.time()
    response = await http.post(f"{url}/v1/chat/completions", json={"model": "broken", **CHAT})
    assert response.status_code == 502
    models = await listed(http, url)
    status = models["broken"]["status"]
    assert status["value"] == "failed" and status["failed"] is True and status["exit_code"] == 3
    assert status["error"] == response.json()["error"]["message"] and "exited with code 3" in status["error"]
    assert started - 1 <= status["failed_at"] <= time.time() + 1
    assert models["broken"]["loaded"] is False and models["broken"]["state"] == "failed"
    assert set(await listed(http, url, status="failed")) == {"broken"}
    assert set(await listed(http, url, status="loaded")) == set()


async def test_an_unknown_status_filter_is_a_clear_400(make_config, start_proxy, http) -> None:
    url = await start_proxy(make_config({"a": {}}))
    for query in ("status=bogus", "status=", "status=loaded,nope", "status=loaded&status=ready"):
        response = await http.get(f"{url}/v1/models?{query}")
        assert response.status_code == 400, (query, response.text)
        error = response.json()["error"]
        assert error["type"] == "invalid_request_error" and error["code"] == 400
        assert "status: unknown value" in error["message"]
    both = await http.get(f"{url}/v1/models?status=loaded&status=unloaded")
    assert [entry["id"] for entry in both.json()["data"]] == ["a"]


# ---- Hugging Face models: downloading, and a failed download ------------------------------------


async def test_a_download_shows_downloading_with_progress_then_loaded(hub, tmp_path, fake_binary, start_proxy, http) -> None:
    tiny_repo(hub, pad=24 * 1024 * 1024)  # huggingface_hub reports progress every 10 MiB
    hub.faults.slow["tiny-Q4_K_M.gguf"] = 0.06  # ~1.5 s
    url = await start_proxy(make(tmp_path, fake_binary, {"tiny": {"repo": REPO}}))
    running: list[int] = []
    seen: list[dict] = []

    async def ask() -> None:
        running.append((await http.post(f"{url}/v1/chat/completions", json={"model": "tiny", **CHAT})).status_code)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ask)
        with trio.fail_after(20):
            await poll_while(http, url, "tiny", running, seen)
    assert running == [200]
    downloading = [status["progress"] for status in seen if status["value"] == "downloading"]
    assert downloading, seen
    total = hub.repos[REPO].files["tiny-Q4_K_M.gguf"].size
    counted = [p for p in downloading if p["stage"] == "downloading"]
    assert counted and all(p["total"] == total and p["files"] == ["tiny-Q4_K_M.gguf"] for p in counted)
    assert any(0 < p["done"] < total and 0 < p["percent"] < 100 for p in counted), counted
    assert all(p["percent"] == round(100 * p["done"] / p["total"], 1) for p in counted)
    assert seen[-1] == {"value": "loaded"}


async def test_a_failed_download_shows_failed_until_one_succeeds(hub, tmp_path, fake_binary, start_proxy, http) -> None:
    tiny_repo(hub)
    hub.faults.api_status = 500
    url = await start_proxy(make(tmp_path, fake_binary, {"tiny": {"repo": REPO}}))
    started = time.time()
    response = await http.post(f"{url}/v1/chat/completions", json={"model": "tiny", **CHAT})
    assert response.status_code == 502
    status = (await listed(http, url))["tiny"]["status"]
    assert status["value"] == "failed" and status["error"] == response.json()["error"]["message"]
    assert "500" in status["error"] and "exit_code" not in status  # no llama-server ran
    assert started - 1 <= status["failed_at"] <= time.time() + 1
    hub.faults.clear()
    assert (await http.post(f"{url}/v1/chat/completions", json={"model": "tiny", **CHAT})).status_code == 200
    assert (await listed(http, url))["tiny"]["status"] == {"value": "loaded"}


# ---- models of an Ollama upstream --------------------------------------------------------------


async def test_upstream_models_are_loaded_as_their_ollama_says(tmp_path, fake_binary, start_proxy, fake_ollama, http) -> None:
    url = await start_proxy(upstream_config(tmp_path, fake_binary, fake_ollama.url))
    models = await listed(http, url)
    assert models["up"]["status"] == {"value": "unloaded"} and models["up"]["state"] == "upstream"
    response = await http.post(f"{url}/api/chat", json={"model": "up", "stream": False, **CHAT})
    assert response.status_code == 200 and "remote-llm:latest" in fake_ollama.loaded
    models = await listed(http, url)
    assert models["up"]["status"] == {"value": "loaded"} and models["up"]["loaded"] is True
    assert models["up-embed"]["status"] == {"value": "unloaded"}
    assert set(await listed(http, url, status="loaded")) == {"up"}


async def test_an_unreachable_upstream_makes_its_models_failed(tmp_path, fake_binary, start_proxy, http) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    url = await start_proxy(upstream_config(tmp_path, fake_binary, dead))
    models = await listed(http, url)
    for name in ("up", "up-embed"):
        status = models[name]["status"]
        assert status["value"] == "failed" and "ConnectError" in status["error"], status
        assert isinstance(status["failed_at"], float)
    assert models["local"]["status"] == {"value": "unloaded"}
