"""OpenAI's Responses API end to end: the official openai client, the proxy as a process, the real
llama-server (which serves ``/v1/responses`` itself) and the real gemma-3-270m model; and agents on
that route, which go to the model's chat route and come back as a Response."""

from __future__ import annotations

import textwrap

import openai
import pytest
from openai.types.responses import ResponseCompletedEvent, ResponseIncompleteEvent, ResponseTextDeltaEvent

from ..conftest import ProxyProcess

pytestmark = pytest.mark.real

MARK = """
from smart_proxy.agents import Agent


class Mark(Agent):
    description = "asks for brevity on the way in, marks the answer on the way out"

    async def on_request(self, ctx):
        ctx.payload["messages"] = [{"role": "system", "content": "Answer in one word."}, *ctx.payload["messages"]]

    async def on_response(self, ctx):
        ctx.response["choices"][0]["message"]["content"] += " [marked]"
"""


@pytest.fixture(scope="module")
def proxy(tmp_path_factory, llama_server_binary: str, gemma_path: str):
    tmp = tmp_path_factory.mktemp("responses-real")
    agents = tmp / "agents" / "mark"
    agents.mkdir(parents=True)
    (agents / "agent.py").write_text(textwrap.dedent(MARK))
    ini = tmp / "proxy.ini"
    ini.write_text(
        f"""
[pool]
size = 1
llama_server = {llama_server_binary}
load_timeout = 120s
[model:gemma]
path = {gemma_path}
args = --ctx-size 2048 --parallel 2
[agents]
dir = {tmp / "agents"}
enabled = mark
timeout = 60s
"""
    )
    proxy = ProxyProcess(ini, tmp / "proxy.log")
    yield proxy
    proxy.stop()


@pytest.fixture(scope="module")
def client(proxy: ProxyProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{proxy.url}/v1", api_key="unused", max_retries=0, timeout=120)


def test_create(client: openai.OpenAI) -> None:
    response = client.responses.create(model="gemma", input="Say hello.", max_output_tokens=12, temperature=0)
    assert response.object == "response" and response.status == "completed"
    assert response.output_text.strip() and response.usage.output_tokens > 0


def test_create_stream_arrives_in_several_events(client: openai.OpenAI) -> None:
    events = list(
        client.responses.create(
            model="gemma", instructions="You are terse.", input=[{"role": "user", "content": "Count to five."}],
            max_output_tokens=24, temperature=0, stream=True,
        )
    )  # fmt: skip
    deltas = [event.delta for event in events if isinstance(event, ResponseTextDeltaEvent)]
    assert events[0].type == "response.created" and len(deltas) > 1
    assert isinstance(events[-1], ResponseCompletedEvent)
    (message,) = [item for item in events[-1].response.output if item.type == "message"]
    assert "".join(deltas) == message.content[0].text


def test_errors(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="nope", input="hi")
    with pytest.raises(openai.BadRequestError):
        client.responses.create(model="gemma", input=5)  # type: ignore[arg-type]


def test_agents(client: openai.OpenAI) -> None:
    response = client.responses.create(model="gemma", input="/mark What colour is the sky?", max_output_tokens=8)
    assert response.output_text.endswith(" [marked]") and len(response.output_text) > len(" [marked]")
    events = list(client.responses.create(model="gemma", input="/mark Name a fruit.", max_output_tokens=8, stream=True))
    assert events[0].type == "response.created"
    assert isinstance(events[-1], (ResponseCompletedEvent, ResponseIncompleteEvent))
    streamed = "".join(event.delta for event in events if isinstance(event, ResponseTextDeltaEvent))
    assert streamed == events[-1].response.output_text and streamed.endswith(" [marked]")


def test_log_has_no_errors(proxy: ProxyProcess) -> None:
    log = proxy.log()
    assert "Traceback" not in log and " ERROR " not in log, log[-3000:]

