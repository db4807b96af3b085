"""The live event stream, the model logs and the loading comments with the real llama-server and gemma-3-270m."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import httpx
import openai
import pytest

pytestmark = pytest.mark.real

KEY = "sk-events-real"
AUTH = {"Authorization": f"Bearer {KEY}"}
MESSAGES = [{"role": "user", "content": "Count from one to five."}]


class Watcher(threading.Thread):
    """Reads ``GET /events`` in a thread, keeping every (kind, data)."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.events: list[tuple[str, dict]] = []
        self.seen = threading.Condition()
        self.client = httpx.Client(timeout=httpx.Timeout(10, read=None))

    def run(self) -> None:
        kind = "message"
        try:
            with self.client.stream("GET", self.url + "/events", headers=AUTH) as response:
                for line in response.iter_lines():
                    if line.startswith("event:"):
                        kind = line[6:].strip()
                    elif line.startswith("data:"):
                        with self.seen:
                            self.events.append((kind, json.loads(line[5:])))
                            self.seen.notify_all()
        except httpx.HTTPError:
            pass  # closed at the end of the test

    def wait_for(self, kind: str, **fields: object) -> dict:
        def found() -> dict | None:
            for k, data in self.events:
                if k == kind and all(data.get(key) == value for key, value in fields.items()):
                    return data
            return None

        with self.seen:
            assert self.seen.wait_for(lambda: found() is not None, timeout=120), self.events
            return found()  # type: ignore[return-value]


def test_events_logs_and_loading_comments_with_the_real_model(
    proxy_process, llama_server_binary: str, gemma_path: str, tmp_path: Path
) -> None:
    proxy = proxy_process(
        f"[proxy]\napi_keys = {KEY}\nloading_comments = 50ms\n"
        f"[pool]\nllama_server = {llama_server_binary}\nload_timeout = 60s\n"
        f"[model:gemma]\npath = {gemma_path}\nargs = --ctx-size 512\n"
    )
    watcher = Watcher(proxy.url)
    watcher.start()
    snapshot = watcher.wait_for("snapshot")
    assert [(m["model"], m["status"]) for m in snapshot["models"]] == [("gemma", "unloaded")]

    # a cold stream: comments while llama-server loads, then its answer, complete
    body = {"model": "gemma", "messages": MESSAGES, "max_tokens": 8, "temperature": 0, "stream": True}
    with httpx.Client(timeout=120) as client:
        raw = client.post(proxy.url + "/v1/chat/completions", json=body, headers=AUTH).content
    # (the first comment may say "waiting": the memory estimate is read before llama-server starts)
    assert raw.startswith((b": loading gemma ", b": waiting for gemma ")) and b"\n\n: loading gemma " in raw, raw[:200]
    data = [line for line in raw.decode().split("\n") if line.startswith("data: ")]
    assert data[-1] == "data: [DONE]" and len(data) > 2
    assert all(not line.startswith(":") for line in raw.decode().split("\n")[raw.decode().split("\n").index(data[0]):])

    loading = watcher.wait_for("loading", model="gemma")
    loaded = watcher.wait_for("loaded", model="gemma")
    kinds = [kind for kind, event in watcher.events if event.get("model") == "gemma" and kind != "request"]
    assert kinds[:2] == ["loading", "loaded"] and loading["restart"] is False and loaded["seconds"] > 0
    summary = watcher.wait_for("request", model="gemma")
    assert summary["status"] == 200 and summary["streamed"] is True and summary["completion_tokens"] == 8
    assert summary["ttft"] is not None and summary["tokens_per_second"] > 0

    # llama-server's own lines
    logs = httpx.get(proxy.url + "/logs/gemma", headers=AUTH, timeout=10)
    assert logs.status_code == 200
    lines = logs.text.splitlines()
    assert any("load_model: loading model" in line and gemma_path in line for line in lines), lines[:40]
    assert any(line.endswith("llama_server: model loaded") for line in lines), lines
    assert any("print_timing" in line and "eval time" in line for line in lines), lines  # the request's own timings
    assert httpx.get(proxy.url + "/logs/gemma", timeout=10).status_code == 401

    # unloaded, then a cold stream through the official client: the comments do not disturb it
    unload = httpx.post(proxy.url + "/api/generate", json={"model": "gemma", "keep_alive": 0}, headers=AUTH, timeout=60)
    assert unload.status_code == 200 and unload.json()["done_reason"] == "unload"
    watcher.wait_for("stopped", model="gemma")
    client = openai.OpenAI(base_url=f"{proxy.url}/v1", api_key=KEY, max_retries=0, timeout=120)
    text = "".join(
        chunk.choices[0].delta.content or ""
        for chunk in client.chat.completions.create(model="gemma", messages=MESSAGES, max_tokens=8, temperature=0, stream=True)
        if chunk.choices
    )
    assert text.strip()
    assert watcher.wait_for("loading", model="gemma", restart=False)
    watcher.client.close()
