"""``GET /logs/MODEL``: each model's last llama-server lines, whole or followed (handlers/watch_routes.py)."""

from __future__ import annotations

import attrs
import trio

from smart_proxy.config import ModelConfig

from .sse import SSEReader
from .test_ops import with_proxy


def chat(model: str = "a") -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}]}


async def test_logs_show_what_the_llama_server_printed(make_config, start_proxy, http) -> None:
    url = await start_proxy(make_config({"a": {"load_delay": 0.05}, "b": {}}))
    assert (await http.post(url + "/v1/chat/completions", json=chat())).status_code == 200
    text = await http.get(url + "/logs/a")
    assert text.status_code == 200 and text.headers["content-type"] == "text/plain; charset=utf-8"
    lines = text.text.splitlines()
    assert any(line.startswith("fake llama-server: model ") and "alias a" in line for line in lines), lines
    assert "llama_server: model loaded" in lines
    assert not any(line.startswith("lifeline: pid") for line in lines)  # the proxy's own plumbing is not in it
    as_json = (await http.get(url + "/logs/a", params={"format": "json"})).json()
    assert as_json["model"] == "a" and [line["text"] for line in as_json["lines"]] == lines
    assert all(isinstance(line["time"], float) for line in as_json["lines"])
    # a model that has not run has an empty log; an unknown one is 404
    empty = await http.get(url + "/logs/b")
    assert empty.status_code == 200 and empty.text == ""
    missing = await http.get(url + "/logs/nope")
    assert missing.status_code == 404 and "'nope' not found" in missing.json()["error"]["message"]
    bad = await http.get(url + "/logs/a", params={"format": "xml"})
    assert bad.status_code == 400 and "format" in bad.json()["error"]["message"]
    bad = await http.get(url + "/logs/a", params={"follow": "maybe"})
    assert bad.status_code == 400 and "follow" in bad.json()["error"]["message"]


async def test_logs_keep_the_last_lines_across_restarts(make_config, start_proxy, http) -> None:
    config = make_config({"a": {"load_delay": 0.05, "signal_on_request": "SIGSEGV"}}, log_lines=4)
    url = await start_proxy(config)
    for _ in range(2):  # each life loads, then dies by SIGSEGV on its request
        assert (await http.post(url + "/v1/chat/completions", json=chat())).status_code >= 500
    lines = (await http.get(url + "/logs/a")).text.splitlines()
    assert len(lines) == 4
    assert lines[-1] == "fake llama-server: dying by SIGSEGV"  # the second life's last words


async def test_follow_streams_new_lines_as_they_come(make_config, start_proxy, http) -> None:
    url = await start_proxy(with_proxy(make_config({"a": {"load_delay": 0.2}}), heartbeat=0.3))
    async with http.stream("GET", url + "/logs/a", params={"follow": "1"}) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        lines = SSEReader(response)
        assert (await http.post(url + "/v1/chat/completions", json=chat())).status_code == 200
        seen = []
        while "llama_server: model loaded" not in seen:
            kind, line = await lines.next()
            assert kind == "line"
            seen.append(line["text"])
        assert any("alias a" in text for text in seen)
        assert "following" in lines.comments  # the log was empty when the stream began
        with trio.move_on_after(1):  # nothing more is printed: only heartbeats come (every 0.3 s)
            await lines.next()
        assert lines.comments.count("heartbeat") >= 2, lines.comments


async def test_logs_need_a_key_when_keys_are_set(make_config, start_proxy, http) -> None:
    url = await start_proxy(with_proxy(make_config({"a": {}}), api_keys=("sk-one",)))
    assert (await http.get(url + "/logs/a")).status_code == 401
    assert (await http.get(url + "/logs/a", params={"follow": "1"})).status_code == 401
    assert (await http.get(url + "/logs/a", headers={"authorization": "Bearer sk-one"})).status_code == 200


async def test_an_ollama_model_has_no_log_here(make_config, start_proxy, http, fake_ollama) -> None:
    config = make_config({"a": {}})
    models = {**config.models, "o": ModelConfig(name="o", backend="ollama", url=fake_ollama.url)}
    url = await start_proxy(attrs.evolve(config, models=models))
    answer = await http.get(url + "/logs/o")
    assert answer.status_code == 404 and "Ollama upstream" in answer.json()["error"]["message"]
