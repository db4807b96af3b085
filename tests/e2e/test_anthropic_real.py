"""Anthropic's Messages API end to end: the official anthropic client, the proxy as a process (with an
API key), the real llama-server answering its own /v1/messages, and the real gemma-3-270m model."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import anthropic
import httpx
import pytest

from ..conftest import ProxyProcess
from ..test_agents import marker, write_agent

pytestmark = pytest.mark.real

KEY = "sk-anthropic-e2e"
USER = [{"role": "user", "content": "Say hello."}]
# (this SDK's create() has no temperature parameter: the API field goes in extra_body)


@pytest.fixture(scope="module")
def proxy(tmp_path_factory, llama_server_binary: str, gemma_path: str) -> Iterator[ProxyProcess]:
    tmp = tmp_path_factory.mktemp("anthropic-real")
    agents = tmp / "agents"
    write_agent(agents, "mark", marker("mark"))
    ini = tmp / "proxy.ini"
    ini.write_text(
        f"""
[proxy]
api_keys = {KEY}

[pool]
size = 1
llama_server = {llama_server_binary}
load_timeout = 120s

[model:gemma]
path = {gemma_path}
args = --ctx-size 2048 --parallel 2

[agents]
dir = {agents}
enabled = mark
timeout = 60s
"""
    )
    proxy = ProxyProcess(ini, tmp / "proxy.log")
    yield proxy
    proxy.stop()


@pytest.fixture(scope="module")
def client(proxy: ProxyProcess) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=proxy.url, api_key=KEY, max_retries=0, timeout=120) as client:
        yield client


def test_create(client: anthropic.Anthropic) -> None:
    reply = client.messages.create(model="gemma", max_tokens=12, messages=USER, extra_body={"temperature": 0})
    assert reply.model == "gemma" and reply.role == "assistant" and reply.type == "message"
    text = "".join(block.text for block in reply.content if block.type == "text")
    assert text.strip() and "<start_of_turn>" not in text
    assert reply.stop_reason in ("end_turn", "max_tokens")
    assert reply.usage.output_tokens > 0 and reply.usage.input_tokens + (reply.usage.cache_read_input_tokens or 0) > 0


def test_stream_arrives_in_several_events(client: anthropic.Anthropic) -> None:
    arrivals, pieces = [], []
    messages = [{"role": "user", "content": "Count from one to twenty."}]
    with client.messages.stream(model="gemma", max_tokens=40, messages=messages, extra_body={"temperature": 0}) as stream:
        for text in stream.text_stream:
            arrivals.append(time.monotonic())
            pieces.append(text)
        final = stream.get_final_message()
    assert len(pieces) >= 5, pieces
    assert arrivals[-1] - arrivals[0] > 0.05  # relayed as generated, not in one piece at the end
    assert "".join(block.text for block in final.content if block.type == "text") == "".join(pieces)
    assert final.stop_reason in ("end_turn", "max_tokens") and final.usage.output_tokens > 0


def test_stream_on_the_wire_ends_with_message_stop(proxy: ProxyProcess) -> None:
    body = {"model": "gemma", "max_tokens": 8, "messages": USER, "stream": True}
    headers = {"x-api-key": KEY, "anthropic-version": "2023-06-01"}
    response = httpx.post(f"{proxy.url}/v1/messages", json=body, headers=headers, timeout=120)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    names = [line.removeprefix("event: ") for line in response.text.splitlines() if line.startswith("event: ")]
    assert names[0] == "message_start" and names[-1] == "message_stop", names
    assert "content_block_delta" in names and "[DONE]" not in response.text


def test_count_tokens(client: anthropic.Anthropic) -> None:
    short = client.messages.count_tokens(model="gemma", messages=USER)
    longer = client.messages.count_tokens(
        model="gemma", system="You are a helpful assistant.", messages=[{"role": "user", "content": "Say hello. " * 20}]
    )
    assert 0 < short.input_tokens < longer.input_tokens


def test_unknown_model_and_bad_request(client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.NotFoundError) as missing:
        client.messages.create(model="no-such-model", max_tokens=4, messages=USER)
    assert missing.value.body["error"]["type"] == "not_found_error" and "known models" in missing.value.body["error"]["message"]
    with pytest.raises(anthropic.BadRequestError) as bad:
        client.messages.create(model="gemma", max_tokens=0, messages=USER)
    assert bad.value.body["error"]["type"] == "invalid_request_error"


def test_api_keys(proxy: ProxyProcess) -> None:
    with anthropic.Anthropic(base_url=proxy.url, api_key="sk-wrong", max_retries=0, timeout=60) as wrong:
        with pytest.raises(anthropic.AuthenticationError) as caught:
            wrong.messages.create(model="gemma", max_tokens=4, messages=USER)
    assert caught.value.body["error"]["type"] == "authentication_error"
    response = httpx.post(f"{proxy.url}/v1/messages/count_tokens", json={"model": "gemma", "messages": USER}, timeout=60)
    assert response.status_code == 401 and response.json()["type"] == "error"


def test_agent_on_request_and_on_response(client: anthropic.Anthropic, proxy: ProxyProcess) -> None:
    """/mark rewrites the request (OpenAI shapes) and the answer; the client gets an Anthropic message, and a stream."""
    asked = [{"role": "user", "content": "/mark Say hello."}]
    raw = client.messages.with_raw_response.create(model="gemma", max_tokens=8, messages=asked, extra_body={"temperature": 0})
    assert "x-smart-proxy-agent-errors" not in raw.headers
    reply = raw.parse()
    assert reply.content[-1].type == "text" and reply.content[-1].text.endswith("<mark>")
    with client.messages.stream(model="gemma", max_tokens=8, messages=asked, extra_body={"temperature": 0}) as stream:
        text = "".join(stream.text_stream)
    assert text == reply.content[-1].text  # same prompt, temperature 0; replayed from the buffered answer
    log = proxy.log()
    assert "Traceback" not in log and " ERROR " not in log, log[-2000:]


def test_stream_cut_short_ends_with_an_error_event(proxy: ProxyProcess) -> None:
    """llama-server killed mid-stream: the relayed stream ends with Anthropic's error event, never message_stop.

    Last in the file: the pool starts gemma again for whatever comes after.
    """
    messages = [{"role": "user", "content": "Count from 1 to 1000, one number a line."}]
    body = {"model": "gemma", "max_tokens": 1000, "messages": messages, "stream": True}
    received = b""
    with httpx.stream("POST", f"{proxy.url}/v1/messages", json=body, headers={"x-api-key": KEY}, timeout=120) as response:
        assert response.status_code == 200
        chunks = response.iter_raw()
        while received.count(b"event: content_block_delta") < 3:
            received += next(chunks)
        health = httpx.get(f"{proxy.url}/health", headers={"x-api-key": KEY}).json()  # its detail needs the key
        servers = health["pool"]["servers"]
        os.kill(next(s["pid"] for s in servers if s["model"] == "gemma"), signal.SIGKILL)
        for chunk in chunks:
            received += chunk
    names = [line.removeprefix("event: ") for line in received.decode().splitlines() if line.startswith("event: ")]
    assert names[-1] == "error" and "message_stop" not in names, names[-5:]
    assert received.endswith(b"\n\n") and b'"type": "api_error"' in received.rsplit(b"event: error", 1)[1]
