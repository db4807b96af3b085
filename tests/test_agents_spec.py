"""Plugins written to the original Ollama-proxy spec, loaded through :class:`smart_proxy.agents.SpecPlugin`.

The example plugin (``tests/spec_plugins/redact``: a class with a sync ``on_request``, an async
``on_response`` and a ``config.json``) is copied into the test's agent folder beside plugins of
the test's making, and runs through the in-process proxy over the fake llama-server, whose
``echo`` model answers with the exact body it received.
"""

from __future__ import annotations

import json
import shutil
import textwrap
import time
from pathlib import Path

import pytest
import trio

from smart_proxy.agents import ERRORS_HEADER, AgentRegistry, SpecPlugin
from smart_proxy.config import AgentsConfig

from .test_agents import chat, echoed, sse_events, streamed_text, with_agents

EXAMPLE = Path(__file__).parent / "spec_plugins" / "redact"
NOTE = "\n(e-mail addresses were redacted)"


def write_plugin(root: Path, name: str, source: str, config: object = None, file: str = "plugin.py") -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / file).write_text(textwrap.dedent(source))
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture
def agent_dir(tmp_path: Path) -> Path:
    root = tmp_path / "agents"
    shutil.copytree(EXAMPLE, root / "redact")
    return root


def test_the_example_loads_with_its_config(agent_dir: Path) -> None:
    registry = AgentRegistry.load(AgentsConfig(dir=str(agent_dir), enabled=("redact",)))
    loaded = registry.get("redact")
    assert loaded is not None and isinstance(loaded.agent, SpecPlugin)
    assert (loaded.on_request, loaded.on_response, loaded.call) == (True, True, False)
    assert loaded.agent.plugin.replacement == "[email]" and loaded.agent.plugin.note == NOTE
    assert loaded.agent.config == {"replacement": "[email]", "note": NOTE}
    (info,) = registry.describe()
    assert info == {
        "name": "redact",
        "description": "Hides e-mail addresses from the model, and tells the reader it did.",
        "enabled": True,
        "loaded": True,
        "error": None,
        "folder": str(agent_dir / "redact"),
    }


async def test_the_example_runs_on_request_and_on_response(make_config, start_proxy, agent_dir: Path, http) -> None:
    url = await start_proxy(with_agents(make_config({"echo": {"echo": True}}), agent_dir, "redact"))
    plugins = (await http.get(url + "/plugins")).json()["agents"]
    assert [(p["name"], p["loaded"], p["error"]) for p in plugins] == [("redact", True, None)]

    response = await http.post(url + "/v1/chat/completions", json=chat("/redact write to bob@example.com today"))
    assert response.status_code == 200 and ERRORS_HEADER not in response.headers
    assert echoed(response)["messages"] == [{"role": "user", "content": "write to [email] today"}]
    assert response.json()["choices"][0]["message"]["content"].endswith("}" + NOTE)

    # a stream is buffered (the plugin has on_response) and replayed, ending as a stream ends
    streamed = await http.post(url + "/v1/chat/completions", json=chat("/redact hi a@b.io", stream=True))
    events = sse_events(streamed.content)
    assert events[-1] == "[DONE]" and streamed_text(events).endswith(NOTE)
    assert json.loads(streamed_text(events).removesuffix(NOTE))["messages"][0]["content"] == "hi [email]"

    completion = await http.post(url + "/v1/completions", json={"model": "echo", "prompt": "/redact x@y.org said"})
    text = completion.json()["choices"][0]["text"]
    assert json.loads(text.removesuffix(NOTE))["prompt"] == "[email] said" and text.endswith(NOTE)

    # an Ollama client: the plugin sees the same OpenAI shapes
    ollama = await http.post(
        url + "/api/chat",
        json={"model": "echo", "stream": False, "messages": [{"role": "user", "content": "/redact me@x.com"}]},
    )
    assert ollama.status_code == 200, ollama.text
    content = ollama.json()["message"]["content"]
    assert content.endswith(NOTE) and json.loads(content.removesuffix(NOTE))["messages"][-1]["content"] == "[email]"

    # no command, no plugin: the address goes through
    plain = await http.post(url + "/v1/chat/completions", json=chat("write to bob@example.com"))
    assert echoed(plain)["messages"][0]["content"] == "write to bob@example.com"


RAISES = """
class Flaky:
    def on_request(self, payload):
        payload["temperature"] = 99
        raise RuntimeError("flaky plugin")
"""

RETURNS_NONE = """
class Forgetful:
    async def on_response(self, payload):
        payload["choices"] = []  # changed in place, then forgot to return it
"""

SLEEPS = """
import time


class Sleepy:
    def on_request(self, payload):
        payload["max_tokens"] = 1
        time.sleep(3)
        return payload
"""

SLEEPS_ASYNC = """
import trio


class Dozy:
    async def on_request(self, payload):
        await trio.sleep(3600)
        return payload
"""


async def test_failing_spec_plugins_fail_soft(make_config, start_proxy, agent_dir: Path, http) -> None:
    write_plugin(agent_dir, "flaky", RAISES)
    write_plugin(agent_dir, "forgetful", RETURNS_NONE)
    write_plugin(agent_dir, "sleepy", SLEEPS)
    write_plugin(agent_dir, "dozy", SLEEPS_ASYNC)
    enabled = ("redact", "flaky", "forgetful", "sleepy", "dozy")
    config = with_agents(make_config({"echo": {"echo": True}}), agent_dir, *enabled, sleepy=0.3, dozy=0.3)
    url = await start_proxy(config)
    started = time.monotonic()
    with trio.fail_after(10):
        response = await http.post(
            url + "/v1/chat/completions", json=chat("/flaky /sleepy /dozy /forgetful /redact mail c@d.eu")
        )
    assert time.monotonic() - started < 2.5  # the sleeping sync hook was abandoned at its timeout
    assert response.status_code == 200, response.text
    assert response.headers[ERRORS_HEADER] == "flaky:error, sleepy:timeout, dozy:timeout, forgetful:error"
    upstream = echoed(response)
    assert upstream["messages"] == [{"role": "user", "content": "mail [email]"}]
    assert "temperature" not in upstream and "max_tokens" not in upstream  # half-changes undone
    # forgetful's in-place change is undone too; redact's on_response (which ran first) stays
    assert response.json()["choices"][0]["message"]["content"].endswith(NOTE)


async def test_sync_hooks_run_one_at_a_time_off_the_event_loop(make_config, start_proxy, agent_dir: Path, http) -> None:
    write_plugin(
        agent_dir,
        "counting",
        """
        import threading
        import time


        class Counting:
            def __init__(self):
                self.lock = threading.Lock()
                self.inside = 0
                self.most = 0

            def on_request(self, payload):
                with self.lock:
                    self.inside += 1
                    self.most = max(self.most, self.inside)
                time.sleep(0.2)
                with self.lock:
                    self.inside -= 1
                payload["messages"][-1]["content"] += " most=" + str(self.most)
                return payload
        """,
    )
    url = await start_proxy(with_agents(make_config({"echo": {"echo": True}}), agent_dir, "counting"))
    contents: list[str] = []
    health_times: list[float] = []

    async def ask() -> None:
        response = await http.post(url + "/v1/chat/completions", json=chat("/counting hi"))
        contents.append(echoed(response)["messages"][-1]["content"])

    async with trio.open_nursery() as nursery:
        for _ in range(4):
            nursery.start_soon(ask)
        await trio.sleep(0.1)
        before = time.monotonic()
        assert (await http.get(url + "/health")).status_code == 200
        health_times.append(time.monotonic() - before)
    assert sorted(contents) == ["hi most=1"] * 4
    assert health_times[0] < 0.15  # the proxy answered while a sync hook slept


@pytest.mark.parametrize(
    ("source", "config", "expected"),
    [
        ("class P:\n    def on_request(self, payload):\n        return {**payload, 'n': 1}\n", None, {}),
        (
            "class P:\n    def __init__(self, *, config):\n        self.config = config\n"
            "    def on_response(self, payload):\n        return payload\n",
            {"k": 2},
            {"k": 2},
        ),
        (
            "class P:\n    def __init__(self, settings):\n        self.config = settings\n"
            "    def on_request(self, payload):\n        return payload\n",
            {"k": [1, 2]},
            {"k": [1, 2]},
        ),
    ],
)
def test_constructors_with_and_without_the_config(tmp_path: Path, source: str, config: object, expected: dict) -> None:
    write_plugin(tmp_path, "p", source, config, file="agent.py")
    registry = AgentRegistry.load(AgentsConfig(dir=str(tmp_path), enabled=("p",)))
    loaded = registry.get("p")
    assert loaded is not None, registry.describe()
    assert loaded.agent.config == expected
    assert getattr(loaded.agent.plugin, "config", expected) == expected
    assert registry.describe()[0]["description"].startswith("P: an Ollama-proxy plugin (on_")


def test_spec_plugins_that_cannot_load_are_listed_with_their_error(tmp_path: Path) -> None:
    write_plugin(tmp_path, "array", "class P:\n    def on_request(self, p):\n        return p\n", config=[1, 2])
    (tmp_path / "badjson").mkdir()
    (tmp_path / "badjson" / "plugin.py").write_text("class P:\n    def on_request(self, p):\n        return p\n")
    (tmp_path / "badjson" / "config.json").write_text("{not json")
    write_plugin(tmp_path, "ctor", "class P:\n    def __init__(self, c):\n        raise OSError('no disk')\n"
                 "    def on_request(self, p):\n        return p\n")  # fmt: skip
    write_plugin(tmp_path, "two", "class A:\n    def on_request(self, p): ...\nclass B:\n    def on_response(self, p): ...\n")
    write_plugin(tmp_path, "none", "class Helper:\n    pass\n")
    enabled = ("array", "badjson", "ctor", "two", "none")
    registry = AgentRegistry.load(AgentsConfig(dir=str(tmp_path), enabled=enabled))
    errors = {info["name"]: info["error"] for info in registry.describe()}
    assert errors["array"] == "TypeError: config.json must hold a JSON object, not list"
    assert errors["badjson"].startswith("JSONDecodeError")
    assert errors["ctor"] == "OSError: no disk"
    assert "one class with on_request/on_response" in errors["two"] and "(found: A, B)" in errors["two"]
    assert "(found: none)" in errors["none"]
    assert all(registry.get(name) is None for name in enabled)
