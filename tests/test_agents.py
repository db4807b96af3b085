"""Agents: discovery, activation, the chain (order, timeouts, failures, streams) and the bundled agents.

The chain's own rules are tested on agents written into a temporary folder; the
bundled agents (agents/rag, agents/parallel, agents/json) are copied from the
repository with a config of the test's making, so their real code runs. Whole
requests go through the in-process proxy to the fake llama-server; an ``echo``
model answers with the exact body it received, so a test sees what went upstream.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
import textwrap
import time
from pathlib import Path
from types import ModuleType

import attrs
import httpx
import pytest
import trio
import trio.testing

from smart_proxy.agents import (
    ERRORS_HEADER,
    Agent,
    AgentContext,
    AgentEvents,
    AgentRegistry,
    Chain,
    LoadedAgent,
    take_commands,
)
from smart_proxy.config import AgentsConfig

REPO = Path(__file__).resolve().parent.parent
BUNDLED = REPO / "agents"

# ---- helpers ------------------------------------------------------------------------------

MARKER = '''
from smart_proxy.agents import Agent


class Marker(Agent):
    """Leaves a trace of its name on the way in and on the way out."""

    description = "marks the request with [{name}] and the answer with <{name}>"

    async def on_request(self, ctx):
        ctx.text = ctx.text + " [{name}]"

    async def on_response(self, ctx):
        choice = ctx.response["choices"][0]
        if "message" in choice:
            choice["message"]["content"] += "<{name}>"
        else:
            choice["text"] += "<{name}>"
'''

TAG = """
from smart_proxy.agents import Agent


class Tag(Agent):
    description = "request only: adds a system message"

    async def on_request(self, ctx):
        if ctx.kind == "chat":
            ctx.payload["messages"] = [{"role": "system", "content": "tagged"}, *ctx.payload["messages"]]
        else:
            ctx.text = "tagged " + ctx.text
"""

BOOM = """
from smart_proxy.agents import Agent


class Boom(Agent):
    description = "changes the request, then raises"

    async def on_request(self, ctx):
        ctx.payload["temperature"] = 99
        ctx.payload["messages"].append({"role": "user", "content": "half-done"})
        raise RuntimeError("boom")
"""

SLOW = """
import trio
from smart_proxy.agents import Agent


class Slow(Agent):
    description = "changes the request, then takes far too long"

    async def on_request(self, ctx):
        ctx.payload["max_tokens"] = 1
        await trio.sleep(3600)
"""


SWAP = """
from smart_proxy.agents import Agent


class Swap(Agent):
    description = "sends the request to the model its config names"

    async def on_request(self, ctx):
        ctx.model = self.config["to"]
"""


def write_agent(root: Path, name: str, source: str, config: str | None = None) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "agent.py").write_text(textwrap.dedent(source))
    if config is not None:
        (folder / "config.toml").write_text(textwrap.dedent(config))
    return folder


def marker(name: str) -> str:
    return MARKER.replace("{name}", name)


def copy_bundled(root: Path, name: str, config: str | None = None) -> Path:
    """A bundled agent's real agent.py in ``root``, with the test's own config.toml."""
    folder = root / name
    folder.mkdir(parents=True)
    shutil.copy(BUNDLED / name / "agent.py", folder / "agent.py")
    if config is not None:
        (folder / "config.toml").write_text(textwrap.dedent(config))
    return folder


def import_bundled(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"_test_bundled_{name}", BUNDLED / name / "agent.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def with_agents(config, root: Path, *enabled: str, timeout: str = "10s", **timeouts: float):
    agents = AgentsConfig(dir=str(root), enabled=enabled, timeout=float(timeout.rstrip("s")), timeouts=timeouts)
    return attrs.evolve(config, agents=agents)


def chat(text: str, model: str = "echo", **extra: object) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": text}], **extra}


def echoed(response: httpx.Response) -> dict:
    """What the echo model received, from its answer (response hooks may have appended markers)."""
    content = response.json()["choices"][0]["message"]["content"]
    return json.loads(content[: content.rindex("}") + 1])


def sse_events(body: bytes) -> list[dict | str]:
    events: list[dict | str] = []
    for block in body.decode().split("\n\n"):
        if block.startswith("data: "):
            data = block.removeprefix("data: ")
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def streamed_text(events: list[dict | str]) -> str:
    parts = []
    for event in events:
        if isinstance(event, dict):
            for choice in event.get("choices", []):
                parts.append((choice.get("delta") or {}).get("content") or choice.get("text") or "")
    return "".join(parts)


# ---- activation ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "names", "rest"),
    [
        ("/rag Tell me", ["rag"], "Tell me"),
        ("/rag /json Tell me", ["rag", "json"], "Tell me"),
        ("  /rag\n\n/json   spaced  out \n", ["rag", "json"], "spaced  out \n"),
        ("/usr/bin is where binaries live", [], "/usr/bin is where binaries live"),
        ("/rag /usr/bin is where binaries live", ["rag"], "/usr/bin is where binaries live"),
        ("/unknown /rag hi", [], "/unknown /rag hi"),
        ("/rag/json hi", [], "/rag/json hi"),
        ("/rag /rag twice", ["rag"], "twice"),
        ("/rag", ["rag"], ""),
        ("Tell me /rag", [], "Tell me /rag"),
        ("/RAG case matters", [], "/RAG case matters"),
    ],
)
def test_take_commands(text: str, names: list[str], rest: str) -> None:
    assert take_commands(text, {"rag", "json"}) == (names, rest)


async def test_registry_discovery_and_load_errors(tmp_path: Path) -> None:
    write_agent(tmp_path, "good", marker("good"))
    write_agent(tmp_path, "off", marker("off"))
    write_agent(tmp_path, "syntax", "def broken(:\n")
    write_agent(
        tmp_path,
        "ctor",
        marker("ctor") + "\n    def __init__(self, config, folder):\n        raise OSError('no disk')\n",
    )
    write_agent(tmp_path, "two", marker("a") + "\n\nclass Other(Marker):\n    pass\n")
    write_agent(tmp_path, "nodesc", "from smart_proxy.agents import Agent\n\nclass X(Agent):\n    pass\n")
    write_agent(tmp_path, "badtoml", marker("badtoml"), config="this is = = not toml")
    (tmp_path / "empty").mkdir()
    (tmp_path / "__pycache__").mkdir()
    (tmp_path / "notes.txt").write_text("not an agent")
    config = AgentsConfig(
        dir=str(tmp_path), enabled=("good", "syntax", "ctor", "two", "nodesc", "badtoml", "empty", "ghost")
    )
    registry = AgentRegistry.load(config)
    listing = {entry["name"]: entry for entry in registry.describe()}
    assert sorted(listing) == ["badtoml", "ctor", "empty", "ghost", "good", "nodesc", "off", "syntax", "two"]
    assert listing["good"] == {
        "name": "good",
        "description": "marks the request with [good] and the answer with <good>",
        "enabled": True,
        "loaded": True,
        "error": None,
        "folder": str(tmp_path / "good"),
    }
    assert listing["off"]["enabled"] is False and listing["off"]["loaded"] is False
    assert listing["off"]["error"] is None and listing["off"]["description"].startswith("marks")
    assert listing["syntax"]["error"].startswith("SyntaxError")
    assert listing["ctor"]["error"] == "OSError: no disk"
    assert "exactly one subclass" in listing["two"]["error"] and "Marker, Other" in listing["two"]["error"]
    assert listing["nodesc"]["error"] == "TypeError: X has no description"
    assert listing["badtoml"]["error"].startswith("TOMLDecodeError")
    assert listing["empty"]["error"].startswith("FileNotFoundError")
    assert listing["ghost"]["error"] == f"no folder ghost in {tmp_path}"
    for name in ("syntax", "ctor", "two", "nodesc", "badtoml", "empty", "ghost"):
        assert listing[name]["loaded"] is False, name
    assert registry.get("good") is not None and registry.get("good").agent.name == "good"
    assert registry.get("ctor") is None


def test_registry_relative_dir_and_config_file(tmp_path: Path) -> None:
    write_agent(tmp_path / "plugins", "cfg", marker("cfg"), config='greeting = "hi"\nnumbers = [1, 2]\n')
    registry = AgentRegistry.load(AgentsConfig(dir="plugins", enabled=("cfg",)), base_dir=str(tmp_path))
    agent = registry.get("cfg")
    assert agent is not None
    assert agent.agent.config == {"greeting": "hi", "numbers": [1, 2]}
    assert agent.agent.folder == tmp_path / "plugins" / "cfg"
    assert (agent.on_request, agent.on_response, agent.call) == (True, True, False)


def test_activate_cuts_commands_from_a_copy(tmp_path: Path) -> None:
    write_agent(tmp_path, "a", marker("a"))
    write_agent(tmp_path, "off", marker("off"))
    registry = AgentRegistry.load(AgentsConfig(dir=str(tmp_path), enabled=("a", "broken")))
    assert registry.activate(chat("plain text"), "chat") is None
    assert registry.activate(chat("/usr/bin is"), "chat") is None
    assert registry.activate(chat("/off is disabled"), "chat") is None
    payload = {
        "model": "m",
        "messages": [
            {"role": "user", "content": "/a earlier turn"},
            {"role": "assistant", "content": "ok"},
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": {"url": "x"}}, {"type": "text", "text": "/a  look"}],
            },
            {"role": "assistant", "content": "prefill"},
        ],
        "unknown_field": {"kept": True},
    }
    original = json.loads(json.dumps(payload))
    chain = registry.activate(payload, "chat")
    assert chain is not None
    assert payload == original  # the caller's dict is untouched
    assert chain.names == ("a",)
    assert chain.payload["messages"][2]["content"][1] == {"type": "text", "text": "look"}
    assert chain.payload["messages"][0]["content"] == "/a earlier turn"  # only the last user message
    assert chain.payload["unknown_field"] == {"kept": True}
    completion = registry.activate({"model": "m", "prompt": "/a /broken Once upon"}, "completion")
    assert completion is not None
    assert completion.payload["prompt"] == "Once upon"
    assert completion.missing == ("broken",)  # enabled but not loadable: taken, and reported


# ---- the chain, without HTTP -------------------------------------------------------------


class Recorder(Agent):
    description = "records the order hooks run in"

    def __init__(self, name: str, log: list[str], response: dict | None = None) -> None:
        super().__init__({}, Path("."))
        self.name = name
        self.log = log
        self.response = response

    async def on_request(self, ctx: AgentContext) -> None:
        self.log.append(f"request:{self.name}")
        ctx.payload.setdefault("trail", []).append(self.name)

    async def on_response(self, ctx: AgentContext) -> None:
        self.log.append(f"response:{self.name}")
        ctx.response["choices"][0]["message"]["content"] += f"<{self.name}>"


class Answerer(Recorder):
    """Takes over the upstream call with a canned answer."""

    async def call(self, ctx: AgentContext) -> dict:
        self.log.append(f"call:{self.name}")
        return {"choices": [{"index": 0, "message": {"role": "assistant", "content": f"from {self.name}:"}}]}


class Sleeper(Agent):
    description = "half-changes the request, then sleeps"

    def __init__(self, seconds: float) -> None:
        super().__init__({}, Path("."))
        self.name = "sleeper"
        self.seconds = seconds

    async def on_request(self, ctx: AgentContext) -> None:
        ctx.payload["messages"][0]["content"] = "changed"
        await trio.sleep(self.seconds)


class Raiser(Agent):
    description = "raises from every hook"
    name = "raiser"

    async def on_request(self, ctx: AgentContext) -> None:
        ctx.payload["model"] = "elsewhere"
        raise ValueError("bad request hook")

    async def on_response(self, ctx: AgentContext) -> None:
        ctx.response["choices"] = []
        raise KeyError("bad response hook")

    async def call(self, ctx: AgentContext) -> dict:
        raise RuntimeError("bad call")


def loaded(*agents: Agent, timeout: float = 5.0) -> tuple[LoadedAgent, ...]:
    return tuple(LoadedAgent.wrap(agent, timeout) for agent in agents)


async def test_request_hooks_in_written_order_response_hooks_reversed() -> None:
    log: list[str] = []
    agents = loaded(Recorder("a", log), Answerer("b", log), Recorder("c", log), Answerer("d", log))
    chain = Chain(agents, chat("hi", model="m"), "chat")
    assert chain.live is False
    ctx = await chain.prepare(None, None, "req-1")
    assert ctx.payload["trail"] == ["a", "b", "c", "d"]
    response = await chain.respond(ctx)
    # b is the first agent with a call: it takes over, d's call never runs
    assert log == ["request:a", "request:b", "request:c", "request:d", "call:b",
                   "response:d", "response:c", "response:b", "response:a"]  # fmt: skip
    assert response["choices"][0]["message"]["content"] == "from b:<d><c><b><a>"
    assert ctx.failures == []
    assert ctx.headers() == {}


async def test_a_live_chain_has_only_request_hooks() -> None:
    class OnlyRequest(Agent):
        description = "x"

        async def on_request(self, ctx: AgentContext) -> None:
            pass

    assert Chain(loaded(OnlyRequest({}, Path("."))), chat("x"), "chat").live is True
    assert Chain(loaded(OnlyRequest({}, Path(".")), Recorder("r", [])), chat("x"), "chat").live is False


async def test_timeout_skips_the_hook_by_cancel_scope(autojump_clock: trio.testing.MockClock) -> None:
    log: list[str] = []
    agents = (*loaded(Sleeper(3600), timeout=2.5), *loaded(Recorder("after", log)))
    payload = chat("original", model="m")
    chain = Chain(agents, payload, "chat")
    started = trio.current_time()
    ctx = await chain.prepare(None, None, "req-t")
    assert trio.current_time() - started == pytest.approx(2.5)  # the agent's deadline, not the hour
    assert ctx.payload["messages"][0]["content"] == "original"  # the half-made change is undone
    assert ctx.payload["trail"] == ["after"]  # the next agent still ran
    assert [(f.agent, f.hook, f.reason) for f in ctx.failures] == [("sleeper", "on_request", "timeout")]
    assert ctx.headers()[ERRORS_HEADER] == "sleeper:timeout"


class Runs(AgentEvents):
    def __init__(self) -> None:
        self.runs: list[tuple[str, float, bool, str | None]] = []

    def agent_run(self, name: str, seconds: float, ok: bool, *, result: str | None = None) -> None:
        self.runs.append((name, seconds, ok, result))


async def test_an_outside_cancel_is_not_swallowed(autojump_clock: trio.testing.MockClock) -> None:
    events = Runs()
    chain = Chain(loaded(Sleeper(3600), timeout=100), chat("x", model="m"), "chat", events=events)
    with trio.move_on_after(1) as outer:
        await chain.prepare(None, None)
        pytest.fail("prepare should have been cancelled")
    assert outer.cancelled_caught  # the client went away: the chain does not carry on
    assert events.runs == [("sleeper", 1.0, False, "cancelled")]


async def test_raising_hooks_are_skipped_and_named(caplog: pytest.LogCaptureFixture) -> None:
    log: list[str] = []
    agents = loaded(Raiser({}, Path(".")), Answerer("b", log))
    chain = Chain(agents, chat("x", model="m"), "chat")
    ctx = await chain.prepare(None, None, "req-r")
    assert ctx.payload["model"] == "m"  # restored
    response = await chain.respond(ctx)
    # Raiser's call failed, so the next call (b) answered; Raiser's response hook was undone
    assert response["choices"][0]["message"]["content"] == "from b:<b>"
    assert [(f.hook, f.reason) for f in ctx.failures] == [
        ("on_request", "error"),
        ("call", "error"),
        ("on_response", "error"),
    ]
    assert ctx.headers()[ERRORS_HEADER] == "raiser:error"
    assert "request req-r: agent /raiser on_request failed, skipped: ValueError: bad request hook" in caplog.text


async def test_a_call_that_returns_no_response_object_falls_back() -> None:
    class Wrong(Agent):
        description = "returns text from call"
        name = "wrong"

        async def call(self, ctx: AgentContext) -> dict:
            return "just text"  # type: ignore[return-value]

    log: list[str] = []
    chain = Chain((*loaded(Wrong({}, Path("."))), *loaded(Answerer("b", log))), chat("x", model="m"), "chat")
    ctx = await chain.prepare(None, None)
    response = await chain.respond(ctx)
    assert response["choices"][0]["message"]["content"] == "from b:<b>"
    assert [(f.agent, f.hook, f.detail) for f in ctx.failures] == [
        ("wrong", "call", "call() returned str, not a response object")
    ]


# ---- whole requests through the proxy ---------------------------------------------------


@pytest.fixture
def agent_dir(tmp_path: Path) -> Path:
    root = tmp_path / "agents"
    root.mkdir()
    return root


async def test_no_command_is_forwarded_byte_for_byte(make_config, start_proxy, agent_dir: Path, http) -> None:
    write_agent(agent_dir, "a", marker("a"))
    url = await start_proxy(with_agents(make_config({"echo": {"echo": True}}), agent_dir, "a"))
    # odd spacing, key order, a float written 2.50 and an escape: all must reach upstream as sent
    template = '{ "messages":[{"content":"TEXT","role":"user"}],\n  "model" : "echo", "x":[1,2.50,"\\u00e9"]}'
    for text in ("plain", "/usr/bin is a folder", "/b is no agent", "later /a is not leading"):
        raw = template.replace("TEXT", text).encode()
        response = await http.post(
            url + "/v1/chat/completions", content=raw, headers={"Content-Type": "application/json"}
        )
        assert response.status_code == 200
        assert response.json()["choices"][0]["message"]["content"] == raw.decode()
        assert ERRORS_HEADER not in response.headers


async def test_commands_are_cut_and_hooks_run_in_order(make_config, start_proxy, agent_dir: Path, http) -> None:
    for name in ("a", "b", "c"):
        write_agent(agent_dir, name, marker(name))
    url = await start_proxy(with_agents(make_config({"echo": {"echo": True}}), agent_dir, "a", "b", "c"))
    response = await http.post(url + "/v1/chat/completions", json=chat("/b /a /usr/bin is /c", temperature=0.5))
    assert response.status_code == 200, response.text
    upstream = echoed(response)
    assert upstream["messages"] == [{"role": "user", "content": "/usr/bin is /c [b] [a]"}]
    assert upstream["temperature"] == 0.5 and upstream["stream"] is False
    assert response.json()["choices"][0]["message"]["content"].endswith("}<a><b>")
    assert ERRORS_HEADER not in response.headers
    completion = await http.post(url + "/v1/completions", json={"model": "echo", "prompt": "/c Once upon a time"})
    assert completion.status_code == 200
    text = completion.json()["choices"][0]["text"]
    assert json.loads(text.removesuffix("<c>"))["prompt"] == "Once upon a time [c]"


async def test_failing_hooks_are_named_and_the_request_completes(
    make_config, start_proxy, agent_dir: Path, http, caplog: pytest.LogCaptureFixture
) -> None:
    write_agent(agent_dir, "boom", BOOM)
    write_agent(agent_dir, "slow", SLOW)
    write_agent(agent_dir, "a", marker("a"))
    config = with_agents(make_config({"echo": {"echo": True}}), agent_dir, "boom", "slow", "a", "gone", slow=0.3)
    url = await start_proxy(config)
    with trio.fail_after(5):  # the slow agent's override (0.3s) applies, not [agents] timeout (10s)
        response = await http.post(
            url + "/v1/chat/completions", json=chat("/boom /slow /gone /a hi"), headers={"X-Request-Id": "trace-42"}
        )
    assert response.status_code == 200
    assert response.headers[ERRORS_HEADER] == "gone:not-loaded, boom:error, slow:timeout"
    # each failure is logged with the client's request id
    assert "request trace-42: agent /boom on_request failed, skipped: RuntimeError: boom" in caplog.text
    assert "request trace-42: agent /slow on_request timed out, skipped: no result within 0.3s" in caplog.text
    assert "request trace-42: /gone is enabled but not loaded; skipped" in caplog.text
    upstream = echoed(response)
    assert upstream["messages"] == [{"role": "user", "content": "hi [a]"}]  # boom's half-changes undone
    assert "temperature" not in upstream and "max_tokens" not in upstream


async def test_streaming_live_chain_relays_as_it_arrives(make_config, start_proxy, agent_dir: Path, http) -> None:
    write_agent(agent_dir, "tag", TAG)
    config = with_agents(make_config({"slowtok": {"tokens": 6, "token_delay": 0.1}}), agent_dir, "tag")
    url = await start_proxy(config)
    arrivals: list[float] = []
    body = b""
    async with http.stream(
        "POST", url + "/v1/chat/completions", json=chat("/tag hi", model="slowtok", stream=True)
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        async for chunk in response.aiter_raw():
            arrivals.append(trio.current_time())
            body += chunk
    events = sse_events(body)
    assert streamed_text(events) == "tok0 tok1 tok2 tok3 tok4 tok5 "
    assert events[-1] == "[DONE]"
    # pieces came over ~0.6s, not all at once at the end
    assert arrivals[-1] - arrivals[0] > 0.3


async def test_streaming_buffered_chain_replays_the_final_answer(
    make_config, start_proxy, agent_dir: Path, http
) -> None:
    write_agent(agent_dir, "a", marker("a"))
    url = await start_proxy(with_agents(make_config({"m": {"tokens": 4}}), agent_dir, "a"))
    response = await http.post(url + "/v1/chat/completions", json=chat("/a hi", model="m", stream=True))
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response.content)
    assert streamed_text(events) == "tok0 tok1 tok2 tok3 <a>"
    assert events[-1] == "[DONE]"
    chunks = [e for e in events if isinstance(e, dict)]
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "m" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == 4
    completion = await http.post(url + "/v1/completions", json={"model": "m", "prompt": "/a x", "stream": True})
    events = sse_events(completion.content)
    assert streamed_text(events) == "tok0 tok1 tok2 tok3 <a>"
    assert {e["object"] for e in events if isinstance(e, dict)} == {"text_completion"}


async def test_upstream_error_in_a_buffered_chain_keeps_its_status(
    make_config, start_proxy, agent_dir: Path, http
) -> None:
    write_agent(agent_dir, "a", marker("a"))
    url = await start_proxy(
        with_agents(make_config({"bad": {"reject": {"status": 400, "message": "fake failure"}}}), agent_dir, "a")
    )
    response = await http.post(url + "/v1/chat/completions", json=chat("/a hi", model="bad"))
    assert response.status_code == 400
    assert "fake failure" in response.json()["error"]["message"]
    missing = await http.post(url + "/v1/chat/completions", json=chat("/a hi", model="nope"))
    assert missing.status_code == 404


async def test_an_error_answer_still_names_the_failed_agents(make_config, start_proxy, agent_dir: Path, http) -> None:
    """The errors header is on every answer whose chain recorded failures, error answers included."""
    write_agent(agent_dir, "boom", BOOM)
    write_agent(agent_dir, "a", marker("a"))
    write_agent(agent_dir, "lost", SWAP, config='to = "nowhere"\n')
    models = {"bad": {"reject": {"status": 400, "message": "fake failure"}}, "m": {}}
    url = await start_proxy(with_agents(make_config(models, size=2), agent_dir, "boom", "a", "lost", "gone"))
    for command, stream in (("/boom /a hi", False), ("/boom /a hi", True), ("/boom hi", False), ("/gone /a hi", False)):
        response = await http.post(url + "/v1/chat/completions", json=chat(command, model="bad", stream=stream))
        assert response.status_code == 400, (command, response.text)
        assert "fake failure" in response.json()["error"]["message"]
        assert response.headers[ERRORS_HEADER] == ("gone:not-loaded" if "gone" in command else "boom:error"), command
    # an error the proxy raises itself (the model a hook chose does not exist), buffered and live
    for command in ("/boom /lost /a hi", "/boom /lost hi"):
        response = await http.post(url + "/v1/chat/completions", json=chat(command, model="m"))
        assert response.status_code == 404 and response.json()["error"]["type"] == "model_not_found", command
        assert response.headers[ERRORS_HEADER] == "boom:error", command
    # no failure, no header, on an error answer as on any other
    response = await http.post(url + "/v1/chat/completions", json=chat("/a hi", model="bad"))
    assert response.status_code == 400 and ERRORS_HEADER not in response.headers


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/api/chat"])
async def test_deeply_nested_agent_requests_get_400(
    make_config, start_proxy, agent_dir: Path, http, route: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The chain copies and re-encodes an agent request: nesting past MAX_DEPTH is refused in dialect, not a 500."""
    from smart_proxy.agents import MAX_DEPTH

    write_agent(agent_dir, "a", marker("a"))  # buffered: copies the payload and the response
    write_agent(agent_dir, "tag", TAG)  # live: copies the payload, then relays it
    url = await start_proxy(with_agents(make_config({"echo": {"echo": True}}), agent_dir, "a", "tag"))

    def body(command: str, depth: int) -> bytes:
        # ``tools`` reaches the chain as sent on both routes; the body object is one level itself
        nested = "[" * (depth - 1) + "]" * (depth - 1)
        stream = ',"stream":false' if route == "/api/chat" else ""
        return f'{{"model":"echo"{stream},"messages":[{{"role":"user","content":"{command}"}}],"tools":{nested}}}'.encode()

    headers = {"Content-Type": "application/json"}
    for command in ("/a hi", "/tag hi"):
        ok = await http.post(url + route, content=body(command, MAX_DEPTH), headers=headers)
        assert ok.status_code == 200, (command, ok.text[:300])
        for depth in (MAX_DEPTH + 1, 600, 900):
            caplog.clear()
            refused = await http.post(url + route, content=body(command, depth), headers=headers)
            assert refused.status_code == 400, (command, depth, refused.text[:300])
            error = refused.json()["error"]
            message = error if route == "/api/chat" else error["message"]
            assert f"nests more than {MAX_DEPTH} deep" in message
            if route != "/api/chat":
                assert error["type"] == "invalid_request_error"
            assert "Traceback" not in caplog.text and "RecursionError" not in caplog.text


@pytest.mark.parametrize("depth", [300, 100_000])
async def test_a_model_answer_nested_too_deep_is_an_upstream_error(monkeypatch: pytest.MonkeyPatch, depth: int) -> None:
    from smart_proxy.errors import UpstreamError

    async def post(self: AgentContext, payload: object) -> tuple[int, bytes]:
        return 200, b'{"choices": ' + b"[" * depth + b"]" * depth + b"}"

    monkeypatch.setattr(AgentContext, "_post", post)
    ctx = AgentContext("req-d", "chat", chat("x", model="m"), False, ())
    with pytest.raises(UpstreamError) as raised:
        await ctx.complete()
    assert raised.value.status == 502


def test_copy_json_has_no_depth_limit() -> None:
    from smart_proxy.agents import _copy_json, too_deep

    deep: list = []
    inner = deep
    for _ in range(100_000):
        inner.append({"k": [], "v": 1})
        inner = inner[0]["k"]
    copy = _copy_json(deep)
    assert too_deep(copy, 100_000) and not too_deep(copy, 200_001)
    walk, original = copy, deep
    for _ in range(100_000):
        assert walk is not original and list(walk[0]) == ["k", "v"] and walk[0]["v"] == 1
        walk, original = walk[0]["k"], original[0]["k"]
    payload = {"z": 1, "a": [1, {"b": [2, 3], "c": None}, "s"], "m": {"x": 1.5}}
    copied = _copy_json(payload)
    assert copied == payload and list(copied) == ["z", "a", "m"] and copied["a"][1] is not payload["a"][1]


async def test_plugins_route(make_config, start_proxy, agent_dir: Path, http) -> None:
    write_agent(agent_dir, "a", marker("a"))
    write_agent(agent_dir, "broken", "raise ImportError('missing dependency: frobnicate')\n")
    url = await start_proxy(with_agents(make_config({"m": {}}), agent_dir, "a", "broken"))
    response = await http.get(url + "/plugins")
    assert response.status_code == 200
    agents = {a["name"]: a for a in response.json()["agents"]}
    assert agents["a"]["loaded"] is True and agents["a"]["enabled"] is True
    assert agents["broken"] == {
        "name": "broken",
        "description": "",
        "enabled": True,
        "loaded": False,
        "error": "ImportError: missing dependency: frobnicate",
        "folder": str(agent_dir / "broken"),
    }
    # the proxy serves regardless
    assert (await http.post(url + "/v1/chat/completions", json=chat("hi", model="m"))).status_code == 200


# ---- rag ----------------------------------------------------------------------------------

DOCS = {
    "pool.md": "# Pool\n\nThe pool keeps at most `size` llama-servers alive.\n\n## Eviction\n\n"
    "When the pool is full, the least recently used idle server is evicted.\n",
    "garden/roses.txt": "Roses need six hours of sun and deep watering once a week.\n\nPrune roses in early spring.\n",
    "cooking.md": "# Bread\n\nKnead the dough for ten minutes, then let it rise for an hour.\n",
}


def write_docs(folder: Path, docs: dict[str, str]) -> None:
    for name, text in docs.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)


def test_rag_passages_keep_their_headings() -> None:
    rag = import_bundled("rag")
    passages = rag.split_passages("pool.md", DOCS["pool.md"], 800)
    assert [(p.heading, p.text) for p in passages] == [
        ("Pool", "The pool keeps at most `size` llama-servers alive."),
        ("Eviction", "When the pool is full, the least recently used idle server is evicted."),
    ]
    long = " ".join(f"Sentence number {i} is here." for i in range(40))
    pieces = rag.split_passages("long.txt", long, 120)
    assert len(pieces) > 5 and all(len(p.text) <= 120 for p in pieces)
    assert " ".join(p.text for p in pieces) == long


async def test_rag_retrieves_and_refreshes_when_files_change(tmp_path: Path) -> None:
    rag = import_bundled("rag")
    docs = tmp_path / "docs"
    write_docs(docs, DOCS)
    agent = rag.Rag({"docs": str(docs), "top_k": 2}, tmp_path)
    hits = await agent.search("which server is evicted when the pool is full?")
    assert hits[0][1].label() == "pool.md > Eviction"
    assert all(score > 0 for score, _ in hits)
    assert (
        await agent.search("how long should dough rise")
        and (await agent.search("dough rise"))[0][1].source == "cooking.md"
    )
    assert await agent.search("quantum chromodynamics") == []  # no shared word: nothing, not noise
    assert agent.builds == 1  # built once for all these searches
    (docs / "garden" / "tulips.md").write_text("# Tulips\n\nPlant tulip bulbs in autumn, pointy end up.\n")
    assert (await agent.search("when to plant tulip bulbs"))[0][1].source == "garden/tulips.md"
    assert agent.builds == 2
    (docs / "cooking.md").write_text("# Soup\n\nSimmer the lentils for twenty minutes.\n")
    assert (await agent.search("lentils"))[0][1].label() == "cooking.md > Soup"
    assert await agent.search("dough") == []
    (docs / "pool.md").unlink()
    assert await agent.search("evicted") == []
    assert agent.builds == 4


async def test_rag_through_the_proxy(make_config, start_proxy, agent_dir: Path, tmp_path: Path, http) -> None:
    docs = tmp_path / "docs"
    write_docs(docs, DOCS)
    copy_bundled(agent_dir, "rag", config=f'docs = "{docs}"\ntop_k = 1\n')
    url = await start_proxy(with_agents(make_config({"echo": {"echo": True}}), agent_dir, "rag"))
    response = await http.post(url + "/v1/chat/completions", json=chat("/rag How often should I water roses?"))
    assert response.status_code == 200 and ERRORS_HEADER not in response.headers
    messages = echoed(response)["messages"]
    assert messages[-1] == {"role": "user", "content": "How often should I water roses?"}
    assert messages[0]["role"] == "system"
    assert (
        "[1] (source: garden/roses.txt)\nRoses need six hours of sun and deep watering once a week."
        in messages[0]["content"]
    )
    assert "pool" not in messages[0]["content"].lower()  # top_k = 1
    # an existing system message is extended, not joined by a second one (gemma allows one, first)
    response = await http.post(
        url + "/v1/chat/completions",
        json={
            "model": "echo",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "/rag evicted server?"},
            ],
        },
    )
    messages = echoed(response)["messages"]
    assert [m["role"] for m in messages] == ["system", "user"]
    assert messages[0]["content"].startswith("Be brief.\n\nAnswer the user's question")
    assert "(source: pool.md > Eviction)" in messages[0]["content"]
    # a question no document matches goes upstream as it was
    response = await http.post(url + "/v1/chat/completions", json=chat("/rag zzz qqq"))
    assert echoed(response)["messages"] == [{"role": "user", "content": "zzz qqq"}]
    completion = await http.post(url + "/v1/completions", json={"model": "echo", "prompt": "/rag knead the dough"})
    prompt = json.loads(completion.json()["choices"][0]["text"])["prompt"]
    assert "(source: cooking.md > Bread)" in prompt and prompt.endswith("\n\nknead the dough")


async def test_rag_a_huge_question_keeps_to_the_timeout_and_starves_no_one(
    make_config, start_proxy, agent_dir: Path, tmp_path: Path, http, caplog: pytest.LogCaptureFixture
) -> None:
    """An 8 MB question is refused by /rag in time; a small /rag request meanwhile gets its passages."""
    docs = tmp_path / "docs"
    write_docs(docs, DOCS)
    copy_bundled(agent_dir, "rag", config=f'docs = "{docs}"\ntop_k = 1\n')
    config = with_agents(make_config({"echo": {"echo": True}, "plain": {}}, size=2), agent_dir, "rag", rag=2.0)
    url = await start_proxy(config)
    assert (await http.post(url + "/v1/chat/completions", json=chat("/rag roses"))).status_code == 200  # built
    words = " ".join(f"roses{i} water{i % 97} the pool" for i in range(400_000))[: 8 * 1024 * 1024]
    huge: dict[str, object] = {}
    small: dict[str, object] = {}

    async def ask(into: dict[str, object], text: str, model: str, delay: float) -> None:
        await trio.sleep(delay)
        started = trio.current_time()
        into["response"] = await http.post(url + "/v1/chat/completions", json=chat(text, model=model), timeout=120)
        into["seconds"] = trio.current_time() - started

    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ask, huge, "/rag " + words, "plain", 0)
            nursery.start_soon(ask, small, "/rag How often should I water roses?", "echo", 0.2)
    response = huge["response"]
    assert isinstance(response, httpx.Response) and response.status_code == 200
    assert huge["seconds"] < 6  # the 2s timeout and a margin (the 8 MB body is parsed and sent upstream too)
    assert response.headers[ERRORS_HEADER] == "rag:error"
    assert "/rag searches at most 32768 (max_query_chars)" in caplog.text
    response = small["response"]
    assert isinstance(response, httpx.Response) and response.status_code == 200
    assert ERRORS_HEADER not in response.headers, response.headers[ERRORS_HEADER]
    assert "(source: garden/roses.txt)" in echoed(response)["messages"][0]["content"]


async def test_rag_search_is_abandoned_at_the_timeout_and_stops(tmp_path: Path) -> None:
    """Scoring runs word by word in a thread; a request that gives up leaves it, and it stops at the next word."""
    rag = import_bundled("rag")
    vocabulary = [f"word{i}" for i in range(400)]
    write_docs(tmp_path / "docs", {**DOCS, "words.txt": " ".join(vocabulary)})
    agent = rag.Rag({"docs": str(tmp_path / "docs"), "max_query_words": 1000}, tmp_path)
    assert (await agent.search("prune roses"))[0][1].source == "garden/roses.txt"  # builds the index
    real = agent.index.bm25.get_scores
    scored: list[str] = []

    def slow_scores(words: list[str]):  # 10 ms a word: 4 s for the whole vocabulary
        for word in words:
            time.sleep(0.01)
            scored.append(word)
        return real(words)

    agent.index.bm25.get_scores = slow_scores
    seconds: dict[str, float] = {}

    async def big() -> None:
        started = trio.current_time()
        with trio.move_on_after(0.5) as scope:
            await agent.search(" ".join(vocabulary))
        assert scope.cancelled_caught
        seconds["big"] = trio.current_time() - started

    async def small() -> None:
        await trio.sleep(0.1)
        started = trio.current_time()
        assert (await agent.search("roses prune"))[0][1].source == "garden/roses.txt"
        seconds["small"] = trio.current_time() - started

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(big)
            nursery.start_soon(small)
    assert seconds["big"] < 2  # abandoned at 0.5s, not after 4s of scoring
    assert seconds["small"] < 2  # no lock held across the big search
    await trio.sleep(0.3)  # the abandoned thread notices at its next word
    stopped_at = len([w for w in scored if w.startswith("word")])
    await trio.sleep(0.5)
    assert len([w for w in scored if w.startswith("word")]) == stopped_at < 200


async def test_rag_build_is_shared_and_outlives_the_requests_that_time_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rag = import_bundled("rag")
    write_docs(tmp_path / "docs", DOCS)
    started: list[float] = []

    class SlowIndex(rag.Index):
        def __init__(self, *args: object) -> None:
            started.append(time.monotonic())
            time.sleep(1.0)
            super().__init__(*args)

    monkeypatch.setattr(rag, "Index", SlowIndex)
    agent = rag.Rag({"docs": str(tmp_path / "docs")}, tmp_path)

    async def give_up() -> None:
        with trio.move_on_after(0.3) as scope:
            await agent.search("prune roses")
        assert scope.cancelled_caught

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(give_up)
        assert len(started) == 1 and agent.builds == 0  # one build for all three, still running
        await give_up()  # a later request waits for the same build
        assert len(started) == 1
        while agent.builds == 0:  # it finishes although every request for it timed out
            await trio.sleep(0.05)
        assert (await agent.search("prune roses"))[0][1].source == "garden/roses.txt"
    assert len(started) == 1


def test_rag_config_is_checked(tmp_path: Path) -> None:
    copy_bundled(tmp_path, "rag", config="top_k = 0\n")
    registry = AgentRegistry.load(AgentsConfig(dir=str(tmp_path), enabled=("rag",)))
    assert registry.describe()[0]["error"] == "ValueError: top_k must be at least 1 and passage_chars at least 50"
    (tmp_path / "rag" / "config.toml").write_text("max_query_chars = 0\n")
    registry = AgentRegistry.load(AgentsConfig(dir=str(tmp_path), enabled=("rag",)))
    assert registry.describe()[0]["error"] == "ValueError: max_query_chars and max_query_words must be at least 1"


# ---- metrics -----------------------------------------------------------------------------


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/api/chat"])
async def test_agent_runs_are_counted_in_metrics(
    make_config, start_proxy, agent_dir: Path, tmp_path: Path, http, route: str
) -> None:
    """Every hook run reaches GET /metrics, by agent and result, whichever dialect asked."""
    from .test_ops import samples, value

    docs = tmp_path / "docs"
    write_docs(docs, DOCS)
    copy_bundled(agent_dir, "rag", config=f'docs = "{docs}"\n')
    copy_bundled(agent_dir, "json")
    write_agent(agent_dir, "boom", BOOM)
    write_agent(agent_dir, "slow", SLOW)
    config = with_agents(make_config({"echo": {"echo": True}}), agent_dir, "rag", "json", "boom", "slow", slow=0.2)
    url = await start_proxy(config)
    before = samples((await http.get(url + "/metrics")).text)
    assert value(before, "smart_proxy_agent_runs_total", agent="rag", result="ok") is None
    extra = {"stream": False} if route == "/api/chat" else {}
    for text in ("/json /rag how often to water roses?", "/rag prune roses", "/boom /slow hi"):
        response = await http.post(url + route, json=chat(text, **extra))
        assert response.status_code == 200, response.text
    found = samples((await http.get(url + "/metrics")).text)
    runs = {
        (agent, result): value(found, "smart_proxy_agent_runs_total", agent=agent, result=result)
        for agent in ("rag", "json", "boom", "slow")
        for result in ("ok", "error", "timeout", "cancelled")
    }
    assert {key: count for key, count in runs.items() if count} == {
        ("rag", "ok"): 2,
        ("json", "ok"): 2,  # its request hook and its response hook
        ("boom", "error"): 1,
        ("slow", "timeout"): 1,
    }
    assert value(found, "smart_proxy_agent_run_duration_seconds_count", agent="rag") == 2
    assert value(found, "smart_proxy_agent_run_duration_seconds_sum", agent="slow") >= 0.2


# ---- models of an Ollama upstream ---------------------------------------------------------


async def test_agents_run_on_models_of_an_ollama_upstream(
    tmp_path: Path, fake_binary: str, start_proxy, fake_ollama, agent_dir: Path, http
) -> None:
    """The chain runs for a ``backend = ollama`` model too; it is reached through its Ollama's /v1 routes."""
    from .test_ollama import upstream_config

    write_agent(agent_dir, "a", marker("a"))
    write_agent(agent_dir, "tag", TAG)
    write_agent(agent_dir, "boom", BOOM)
    write_agent(agent_dir, "swap", SWAP, config='to = "up"\n')
    copy_bundled(agent_dir, "parallel", parallel_config(["up", "local"], samples=1, mode="all"))
    config = upstream_config(tmp_path, fake_binary, fake_ollama.url)
    url = await start_proxy(with_agents(config, agent_dir, "a", "tag", "boom", "swap", "parallel"))
    pieces = "piece0 piece1 piece2 "

    # buffered: the rewritten body goes to the upstream's /v1 route, the answer back through the response hook
    response = await http.post(url + "/v1/chat/completions", json=chat("/a hi", model="up", temperature=0.5))
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == pieces + "<a>"
    method, path, sent = fake_ollama.requests[-1]
    assert (method, path, sent["model"]) == ("POST", "/v1/chat/completions", "remote-llm")
    assert sent["messages"] == [{"role": "user", "content": "hi [a]"}]
    assert sent["stream"] is False and sent["temperature"] == 0.5
    # live: the rewritten request is relayed, its stream as it comes
    streamed = await http.post(url + "/v1/chat/completions", json=chat("/tag hi", model="up", stream=True))
    assert streamed.status_code == 200 and streamed.headers["content-type"].startswith("text/event-stream")
    events = sse_events(streamed.content)
    assert streamed_text(events) == pieces and events[-1] == "[DONE]"
    sent = fake_ollama.requests[-1][2]
    assert sent["messages"] == [{"role": "system", "content": "tagged"}, {"role": "user", "content": "hi"}]
    assert sent["stream"] is True and sent["model"] == "remote-llm"
    # a completion goes to /v1/completions
    completion = await http.post(url + "/v1/completions", json={"model": "up", "prompt": "/a Once upon"})
    assert completion.json()["choices"][0]["text"] == pieces + "<a>"
    sent = {"model": "remote-llm", "prompt": "Once upon [a]", "stream": False}
    assert fake_ollama.requests[-1][1:] == ("/v1/completions", sent)
    # failures are named, as for any model
    failed = await http.post(url + "/v1/chat/completions", json=chat("/boom hi", model="up"))
    assert failed.status_code == 200 and failed.headers[ERRORS_HEADER] == "boom:error"
    # a hook may send a local model's request there, and ctx.complete reaches both kinds
    swapped = await http.post(url + "/v1/chat/completions", json=chat("/swap hi", model="local"))
    assert swapped.json()["choices"][0]["message"]["content"] == pieces
    both = (await http.post(url + "/v1/chat/completions", json=chat("/parallel hi", model="local"))).json()
    assert [c["message"]["content"] for c in both["choices"]] == [pieces, "tok0 tok1 tok2 tok3 tok4 "]
    assert [row["status"] for row in both["smart_proxy"]["parallel"]["candidates"]] == ["ok", "ok"]
    assert [s["model"] for s in (await http.get(url + "/health")).json()["pool"]["servers"]] == ["local"]
    # no command: passed through untouched, as without agents
    raw = b'{"model": "up", "messages": [{"role": "user", "content": "/usr/bin is a folder"}], "x": 2.50}'
    plain = await http.post(url + "/v1/chat/completions", content=raw, headers={"Content-Type": "application/json"})
    assert plain.status_code == 200 and ERRORS_HEADER not in plain.headers
    assert fake_ollama.requests[-1][2]["messages"] == [{"role": "user", "content": "/usr/bin is a folder"}]


# ---- parallel ---------------------------------------------------------------------------


def parallel_config(models: list[str], **options: object) -> str:
    lines = [f"models = {json.dumps(models)}"] + [f"{key} = {json.dumps(value)}" for key, value in options.items()]
    return "\n".join(lines) + "\n"


async def test_parallel_best_by_logprob_with_a_failing_candidate(
    make_config, start_proxy, agent_dir: Path, http
) -> None:
    copy_bundled(
        agent_dir, "parallel", parallel_config(["sure", "unsure", "broken"], samples=1, mode="best", pick="logprob")
    )
    models = {
        "sure": {"content": "Paris", "logprob": -0.05, "token_delay": 0.4},
        "unsure": {"content": "Lyon maybe", "logprob": -2.5},
        "broken": {"exit_on_load": 3},
    }
    url = await start_proxy(with_agents(make_config(models, size=3), agent_dir, "parallel"))
    for model in ("sure", "unsure"):  # loaded beforehand, so the timings below are generation only
        await http.post(url + "/v1/chat/completions", json=chat("warm up", model=model))
    response = await http.post(url + "/v1/chat/completions", json=chat("/parallel Capital of France?", model="unsure"))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["choices"] == [
        {"index": 0, "finish_reason": "length", "message": {"role": "assistant", "content": "Paris"}}
    ]
    assert body["model"] == "sure"
    report = body["smart_proxy"]["parallel"]
    assert (report["mode"], report["pick"], report["chosen"]) == ("best", "logprob", 0)
    rows = {row["model"]: row for row in report["candidates"]}
    assert rows["sure"]["status"] == "ok" and rows["sure"]["score"] == pytest.approx(-0.05)
    assert rows["unsure"]["status"] == "ok" and rows["unsure"]["score"] == pytest.approx(-2.5)
    assert rows["broken"]["status"] == "error" and "exited" in rows["broken"]["error"]
    assert all(row["seconds"] > 0 for row in rows.values())
    assert rows["sure"]["seconds"] >= 0.4 > rows["unsure"]["seconds"]  # timed per candidate
    assert ERRORS_HEADER not in response.headers


async def test_parallel_all_samples_run_at_once(make_config, start_proxy, agent_dir: Path, http) -> None:
    copy_bundled(agent_dir, "parallel", parallel_config([], samples=3, mode="all"))
    url = await start_proxy(
        with_agents(make_config({"m": {"echo": True, "token_delay": 0.05, "slots": 4}}), agent_dir, "parallel")
    )
    started = trio.current_time()
    response = await http.post(url + "/v1/chat/completions", json=chat("/parallel hi", model="m"))
    elapsed = trio.current_time() - started
    assert response.status_code == 200, response.text
    body = response.json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    seeds = [json.loads(c["message"]["content"])["seed"] for c in body["choices"]]
    assert sorted(seeds) == [1, 2, 3]  # distinct samples
    assert all("logprobs" not in json.loads(c["message"]["content"]) for c in body["choices"])
    report = body["smart_proxy"]["parallel"]
    assert [row["choice"] for row in report["candidates"]] == [0, 1, 2]
    slowest = max(row["seconds"] for row in report["candidates"])
    total = sum(row["seconds"] for row in report["candidates"])
    assert elapsed < total  # concurrent, not one after the other
    assert slowest > 0.25  # each echo answer takes many tokens * 0.05s
    assert body["usage"]["completion_tokens"] == sum(row["completion_tokens"] for row in report["candidates"])


async def test_agent_calls_keep_to_the_server_slots(make_config, start_proxy, agent_dir: Path, http) -> None:
    """ctx.complete takes a slot like any request: three samples on a 1-slot server go one at a time."""
    copy_bundled(agent_dir, "parallel", parallel_config([], samples=3, mode="all"))
    url = await start_proxy(
        with_agents(make_config({"m": {"slots": 1, "tokens": 4, "token_delay": 0.1}}), agent_dir, "parallel")
    )
    await http.post(url + "/v1/chat/completions", json=chat("warm up", model="m", max_tokens=1))  # load it
    port = (await http.get(url + "/health")).json()["pool"]["servers"][0]["port"]
    busiest = 0

    async def watch() -> None:
        nonlocal busiest
        while True:
            busiest = max(busiest, (await http.get(f"http://127.0.0.1:{port}/props")).json()["fake_busy"])
            await trio.sleep(0.01)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            response = await http.post(url + "/v1/chat/completions", json=chat("/parallel hi", model="m"))
            nursery.cancel_scope.cancel()
    assert response.status_code == 200, response.text
    assert [row["status"] for row in response.json()["smart_proxy"]["parallel"]["candidates"]] == ["ok"] * 3
    assert busiest == 1  # the one slot was used, never more


async def test_parallel_candidate_timeout_and_all_failed_fallback(
    make_config, start_proxy, agent_dir: Path, http
) -> None:
    copy_bundled(
        agent_dir, "parallel", parallel_config(["fast", "stuck"], samples=1, mode="all", candidate_timeout=1.0)
    )
    models = {"fast": {"content": "quick"}, "stuck": {"content": "never", "token_delay": 30}}
    url = await start_proxy(with_agents(make_config(models, size=2), agent_dir, "parallel"))
    await http.post(url + "/v1/chat/completions", json=chat("warm up", model="fast"))  # its load is not timed
    with trio.fail_after(10):
        response = await http.post(url + "/v1/chat/completions", json=chat("/parallel hi", model="fast"))
    body = response.json()
    assert [c["message"]["content"] for c in body["choices"]] == ["quick"]
    rows = body["smart_proxy"]["parallel"]["candidates"]
    assert [(r["model"], r["status"]) for r in rows] == [("fast", "ok"), ("stuck", "timeout")]
    assert 0.9 < rows[1]["seconds"] < 3


async def test_parallel_all_candidates_failing_falls_back(make_config, start_proxy, agent_dir: Path, http) -> None:
    copy_bundled(agent_dir, "parallel", parallel_config(["nope1", "nope2"], samples=1))
    url = await start_proxy(with_agents(make_config({"m": {"content": "plain answer"}}), agent_dir, "parallel"))
    response = await http.post(url + "/v1/chat/completions", json=chat("/parallel hi", model="m"))
    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["content"] == "plain answer"
    assert response.headers[ERRORS_HEADER] == "parallel:error"


async def test_parallel_client_disconnect_cancels_every_candidate(
    make_config, start_proxy, agent_dir: Path, http
) -> None:
    copy_bundled(agent_dir, "parallel", parallel_config(["a", "b"], samples=1))
    models = {"a": {"tokens": 40, "token_delay": 0.25}, "b": {"tokens": 40, "token_delay": 0.25}}
    url = await start_proxy(with_agents(make_config(models, size=2), agent_dir, "parallel"))

    async def in_flight() -> int:
        servers = (await http.get(url + "/health")).json()["pool"]["servers"]
        return sum(server["in_flight"] for server in servers)

    for model in models:  # loaded beforehand, so both candidates are generating when the client leaves
        await http.post(url + "/v1/chat/completions", json=chat("warm up", model=model, max_tokens=1))
    async with httpx.AsyncClient(timeout=None) as client, trio.open_nursery() as nursery:
        gave_up = trio.CancelScope()

        async def ask() -> None:
            with gave_up:
                await client.post(url + "/v1/chat/completions", json=chat("/parallel hi", model="a"))
                pytest.fail("the answers take 10s; the client gives up first")

        nursery.start_soon(ask)
        with trio.fail_after(5):
            while await in_flight() < 2:  # noqa: ASYNC110  # another process's state: poll it
                await trio.sleep(0.05)
        gave_up.cancel()
    # the client has gone: both candidates are cancelled and their leases released, long before 10s
    with trio.fail_after(3):
        while await in_flight():  # noqa: ASYNC110
            await trio.sleep(0.05)


def test_parallel_config_is_checked(tmp_path: Path) -> None:
    copy_bundled(tmp_path, "parallel", 'mode = "most"\n')
    registry = AgentRegistry.load(AgentsConfig(dir=str(tmp_path), enabled=("parallel",)))
    assert registry.describe()[0]["error"] == "ValueError: mode must be one of best, all, not 'most'"


# ---- json -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ('{"a": 1}', {"a": 1}),
        ("```json\n{'a': True, 'b': [1, 2,], 'c': None,}\n```", {"a": True, "b": [1, 2], "c": None}),
        ('Sure! Here you go: {"x": "y"} Hope that helps.', {"x": "y"}),
        ('{"name": "Bob", "tags": ["a", "b', {"name": "Bob", "tags": ["a", "b"]}),
        ('{"a": 1, "b": ', {"a": 1}),
        ('{"a": 1, "b', {"a": 1}),
        ("[1, 2, 3", [1, 2, 3]),
        ("{'it\\'s': 'say \"hi\"'}", {"it's": 'say "hi"'}),
        ('```\n[{"k": "v"}]', [{"k": "v"}]),
    ],
)
def test_json_repair(text: str, value: object) -> None:
    assert import_bundled("json").repair(text) == value


@pytest.mark.parametrize("text", ["no json here", "{:::}", ""])
def test_json_repair_gives_up(text: str) -> None:
    with pytest.raises(ValueError):
        import_bundled("json").repair(text)


async def test_json_through_the_proxy(make_config, start_proxy, agent_dir: Path, http) -> None:
    copy_bundled(agent_dir, "json", "constrain = true\n")
    models = {
        "fenced": {"content": "```json\n{'answer': 42, 'ok': True,}\n```"},
        "valid": {"content": '{ "a" :1 }'},
        "prose": {"content": "I cannot do that."},
        "echo": {"echo": True},
    }
    url = await start_proxy(with_agents(make_config(models, size=4), agent_dir, "json"))

    async def ask(model: str, **extra: object) -> httpx.Response:
        return await http.post(url + "/v1/chat/completions", json=chat("/json give me JSON", model=model, **extra))

    response = await ask("fenced")
    assert response.json()["choices"][0]["message"]["content"] == '{"answer": 42, "ok": true}'
    assert ERRORS_HEADER not in response.headers
    assert (await ask("valid")).json()["choices"][0]["message"]["content"] == '{ "a" :1 }'  # valid: untouched
    response = await ask("prose")
    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["content"] == "I cannot do that."
    assert response.headers[ERRORS_HEADER] == "json:error"
    upstream = json.loads((await ask("echo")).json()["choices"][0]["message"]["content"])
    assert upstream["response_format"] == {"type": "json_object"}
    assert upstream["messages"][0]["content"] == "give me JSON"
    own = json.loads((await ask("echo", response_format={"type": "text"})).json()["choices"][0]["message"]["content"])
    assert own["response_format"] == {"type": "text"}  # the client's own choice wins
    streamed = await ask("fenced", stream=True)
    assert streamed_text(sse_events(streamed.content)) == '{"answer": 42, "ok": true}'


# ---- the worked example in docs/agents.md ---------------------------------------------------


def doc_block(language: str, after: str) -> str:
    text = (REPO / "docs" / "agents.md").read_text()
    section = text[text.index(after) :]
    start = section.index(f"```{language}\n") + len(f"```{language}\n")
    return section[start : section.index("```", start)]


async def test_the_documented_example_works(make_config, start_proxy, agent_dir: Path, http) -> None:
    write_agent(
        agent_dir, "shout", doc_block("python", "## A worked example"), config=doc_block("toml", "## A worked example")
    )
    url = await start_proxy(with_agents(make_config({"m": {"content": "hi there"}}), agent_dir, "shout"))
    response = await http.post(url + "/v1/chat/completions", json=chat("/shout say hi", model="m"))
    assert response.json()["choices"][0]["message"]["content"] == "HI THERE!!!"
    streamed = await http.post(url + "/v1/chat/completions", json=chat("/shout say hi", model="m", stream=True))
    assert streamed_text(sse_events(streamed.content)) == "HI THERE!!!"
    plugins = (await http.get(url + "/plugins")).json()["agents"]
    assert plugins[0]["description"] == "Answers in capital letters" and plugins[0]["loaded"] is True
