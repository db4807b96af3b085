"""OpenAI's Responses API: the dialect's translation and stream judging against the ``openai`` SDK's
types, and ``POST /v1/responses`` through the whole in-process proxy with the official client,
over the fake llama-server (which answers ``/v1/responses`` as llama-server does) and the fake Ollama."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import httpx
import openai
import pydantic
import pytest
import trio
from openai.types.responses import (
    Response,
    ResponseCompletedEvent,
    ResponseErrorEvent,
    ResponseFailedEvent,
    ResponseIncompleteEvent,
    ResponseStreamEvent,
    ResponseTextDeltaEvent,
)

from smart_proxy.dialects import responses as dialect
from smart_proxy.errors import BadRequest

from .test_agents import marker, with_agents, write_agent
from .test_faults import requests_counted
from .test_ollama import backend_requests, upstream_config

EVENTS = pydantic.TypeAdapter(ResponseStreamEvent)


async def in_thread(fn, *args, **kwargs):
    return await trio.to_thread.run_sync(partial(fn, *args, **kwargs), abandon_on_cancel=True)


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=20)


def create(url: str, **kwargs):
    """``responses.create`` through the official client: a Response, or the list of a stream's events."""
    with client(url) as openai_client:
        answer = openai_client.responses.create(**kwargs)
        return list(answer) if kwargs.get("stream") else answer


def parse_sse(body: bytes) -> list[tuple[str, dict]]:
    """(event name, data) of every event of a Responses SSE body."""
    events = []
    for block in body.decode().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        if "data" in fields:
            events.append((fields.get("event", ""), json.loads(fields["data"])))
    return events


# ---- the dialect: translation ---------------------------------------------------------------


def test_to_chat_translates_as_llama_server_does() -> None:
    request = {
        "model": "m",
        "instructions": "Be brief.",
        "input": [
            {"role": "developer", "content": "Use metric units."},
            {"type": "message", "role": "user", "content": [
                {"type": "input_text", "text": "What is this?"},
                {"type": "input_image", "image_url": "data:image/png;base64,aGk=", "detail": "low"},
            ]},
            {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "A cat."}]},
            {"type": "function_call", "call_id": "c1", "name": "weigh", "arguments": "{\"what\": \"cat\"}"},
            {"type": "function_call_output", "call_id": "c1", "output": "4 kg"},
            {"role": "user", "content": "/a And now?"},
        ],
        "tools": [{"type": "function", "name": "weigh", "parameters": {"type": "object"}}, {"type": "web_search"}],
        "tool_choice": {"type": "function", "name": "weigh"},
        "max_output_tokens": 7,
        "text": {"format": {"type": "json_schema", "name": "out", "schema": {"type": "object"}, "strict": True}},
        "temperature": 0.5,
        "x_unknown": [1],
    }  # fmt: skip
    chat = dialect.to_chat(request)
    assert chat == {
        "model": "m",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "system", "content": [{"type": "text", "text": "Use metric units."}]},
            {"role": "user", "content": [
                {"type": "text", "text": "What is this?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,aGk=", "detail": "low"}},
            ]},
            {"role": "assistant", "content": [{"type": "text", "text": "A cat."}], "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "weigh", "arguments": "{\"what\": \"cat\"}"}},
            ]},
            {"role": "tool", "tool_call_id": "c1", "content": "4 kg"},
            {"role": "user", "content": [{"type": "text", "text": "/a And now?"}]},
        ],
        "tools": [{"type": "function", "function": {"name": "weigh", "parameters": {"type": "object"}}}],
        "tool_choice": {"type": "function", "function": {"name": "weigh"}},
        "max_tokens": 7,
        "response_format": {"type": "json_schema", "json_schema": {"name": "out", "schema": {"type": "object"}, "strict": True}},
        "temperature": 0.5,
        "x_unknown": [1],
    }  # fmt: skip
    assert dialect.to_chat({"model": "m", "input": "hi"})["messages"] == [{"role": "user", "content": "hi"}]
    assert dialect.user_text(request) == "/a And now?"
    assert dialect.user_text({"input": "/a hi"}) == "/a hi"
    assert dialect.user_text({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}) is None


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"input": "hi", "previous_response_id": "resp_1"}, "previous_response_id"),
        ({"input": 5}, "'input' must be a string or a list"),
        ({"input": ["hi"]}, "must be an object"),
        ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]}, "input_file"),
        ({"input": [{"role": "user", "content": [{"type": "input_text"}]}]}, "string 'text'"),
        ({"input": [{"role": "user", "content": [{"type": "input_image"}]}]}, "image_url"),
        ({"input": [{"type": "function_call", "name": "f"}]}, "call_id"),
        ({"input": [{"type": "mystery"}]}, "cannot tell"),
        ({"input": [{"role": "user", "content": 3}]}, "must be a string or a list of parts"),
    ],
)
def test_to_chat_refuses_what_it_cannot_read(payload: dict, message: str) -> None:
    with pytest.raises(BadRequest, match=message):
        dialect.to_chat({"model": "m", **payload})


def _completion(**message: object) -> dict:
    return {
        "id": "chatcmpl-1", "object": "chat.completion", "created": 1700000000, "model": "m",
        "choices": [{"index": 0, "finish_reason": message.pop("finish_reason", "stop"),
                     "message": {"role": "assistant", **message}}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7, "prompt_tokens_details": {"cached_tokens": 1}},
    }  # fmt: skip


def test_from_chat_makes_a_valid_response() -> None:
    request = {"model": "m", "input": "hi", "instructions": "Be brief.", "temperature": 0.2}
    response = Response.model_validate(dialect.from_chat(_completion(content="Hello there."), request))
    assert response.output_text == "Hello there." and response.status == "completed" and response.model == "m"
    assert response.instructions == "Be brief." and response.temperature == 0.2 and response.created_at == 1700000000
    assert response.usage.input_tokens == 3 and response.usage.output_tokens == 4 and response.usage.total_tokens == 7
    assert response.usage.input_tokens_details.cached_tokens == 1

    calls = [{"id": "call_9", "type": "function", "function": {"name": "f", "arguments": "{\"x\": 1}"}}]
    completion = _completion(content="", reasoning_content="think", tool_calls=calls, finish_reason="tool_calls")
    raw = dialect.from_chat(completion, request)
    response = Response.model_validate(raw)
    reasoning, call = response.output
    assert reasoning.type == "reasoning" and reasoning.content[0].text == "think"
    assert call.type == "function_call" and call.call_id == "call_9" and call.name == "f" and call.arguments == "{\"x\": 1}"

    cut = Response.model_validate(dialect.from_chat(_completion(content="Hel", finish_reason="length"), request))
    assert cut.status == "incomplete" and cut.incomplete_details.reason == "max_output_tokens"


def test_replay_sse_is_the_event_sequence_of_the_response() -> None:
    calls = [{"id": "call_9", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
    response = dialect.from_chat(_completion(content="Hello there.", tool_calls=calls), {"model": "m", "input": "hi"})
    events = parse_sse(dialect.replay_sse(response))
    parsed = [EVENTS.validate_python(data) for _name, data in events]
    assert [name for name, _ in events] == [data["type"] for _, data in events]
    assert [event.sequence_number for event in parsed] == list(range(len(parsed)))
    assert [event.type for event in parsed] == [
        "response.created", "response.in_progress",
        "response.output_item.added", "response.content_part.added", "response.output_text.delta",
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.output_item.added", "response.function_call_arguments.delta", "response.function_call_arguments.done",
        "response.output_item.done", "response.completed",
    ]  # fmt: skip
    assert parsed[0].response.status == "in_progress" and parsed[0].response.output == []
    assert "".join(e.delta for e in parsed if isinstance(e, ResponseTextDeltaEvent)) == "Hello there."
    assert isinstance(parsed[-1], ResponseCompletedEvent) and parsed[-1].response.model_dump() == Response.model_validate(
        response
    ).model_dump()
    cut = dialect.from_chat(_completion(content="Hel", finish_reason="length"), {"model": "m", "input": "hi"})
    assert parse_sse(dialect.replay_sse(cut))[-1][0] == "response.incomplete"


# ---- the dialect: judging a relayed stream -------------------------------------------------


def _event(name: str, **data: object) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + json.dumps({"type": name, **data}).encode() + b"\n\n"


def test_lines_are_done_only_after_a_terminal_event() -> None:
    opening = {"id": "resp_7", "object": "response", "status": "in_progress"}
    stream = [
        _event("response.created", response=opening),
        _event("response.output_text.delta", item_id="m", delta="hi"),
        _event("response.completed", response={**opening, "status": "completed"}),
    ]
    lines = dialect.ResponsesLines(1 << 20)
    passed = b""
    for piece in stream[:2]:
        passed += lines.feed(piece[:7]) + lines.feed(piece[7:])
    assert not lines.done and passed == b"".join(stream[:2])
    error, failed = parse_sse(lines.error("the upstream stream broke off"))
    assert error == ("error", {"type": "error", "sequence_number": 2, "code": "upstream_error",
                               "message": "the upstream stream broke off", "param": None})  # fmt: skip
    assert failed[0] == "response.failed" and failed[1]["sequence_number"] == 3
    event = ResponseFailedEvent.model_validate(failed[1])
    assert event.response.id == "resp_7" and event.response.status == "failed"
    assert event.response.error.message == "the upstream stream broke off"
    lines.feed(stream[2])
    assert lines.done

    # llama-server's own error line (no event name) ends a stream too; so does data that names its type
    for last in (b'data: {"error": {"code": 500, "message": "x", "type": "server_error"}}\n\n',
                 b'data: {"type": "response.incomplete", "response": {}}\n\n'):  # fmt: skip
        lines = dialect.ResponsesLines(1 << 20)
        lines.feed(stream[1] + last)
        assert lines.done
    # before response.created, only the error event can be sent
    lines = dialect.ResponsesLines(1 << 20)
    assert [name for name, _ in parse_sse(lines.error("gone"))] == ["error"]


# ---- the route, through the proxy ---------------------------------------------------------


async def test_create_non_stream_and_stream(make_config, start_proxy, http: httpx.AsyncClient) -> None:
    url = await start_proxy(make_config({"m": {"tokens": 4}}))
    response = await in_thread(create, url, model="m", input="hi", instructions="Be brief.")
    assert isinstance(response, Response) and response.output_text == "tok0 tok1 tok2 tok3 " and response.model == "m"
    events = await in_thread(create, url, model="m", input=[{"role": "user", "content": "hi"}], stream=True)
    deltas = [event.delta for event in events if isinstance(event, ResponseTextDeltaEvent)]
    assert deltas == ["tok0 ", "tok1 ", "tok2 ", "tok3 "]
    assert events[0].type == "response.created" and isinstance(events[-1], ResponseCompletedEvent)
    assert events[-1].response.output_text == "tok0 tok1 tok2 tok3 "
    sent = await backend_requests(http, url, "m")
    assert [request["path"] for request in sent] == ["/v1/responses", "/v1/responses"]
    assert sent[0]["body"] == {"model": "m", "input": "hi", "instructions": "Be brief."}


async def test_body_goes_byte_for_byte_and_stream_as_it_comes(make_config, start_proxy, http: httpx.AsyncClient) -> None:
    url = await start_proxy(make_config({"echo": {"echo": True}, "slow": {"tokens": 3, "token_delay": 0.3}}))
    raw = b'{ "input":"hi" ,\n "model" : "echo", "x":[1,2.50,"\\u00e9"]}'
    response = await http.post(f"{url}/v1/responses", content=raw)
    assert response.status_code == 200 and response.json()["output"][0]["content"][0]["text"] == raw.decode()
    arrivals = []
    async with http.stream("POST", f"{url}/v1/responses", json={"model": "slow", "input": "hi", "stream": True}) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        async for chunk in stream.aiter_bytes():
            if b"output_text.delta" in chunk:
                arrivals.append(trio.current_time())
    assert len(arrivals) == 3 and arrivals[-1] - arrivals[0] > 0.4  # each delta as it was made, not all at the end


async def test_errors_are_openai_errors(make_config, start_proxy, http: httpx.AsyncClient) -> None:
    url = await start_proxy(make_config({"m": {}, "r": {"reject": {"status": 400, "message": "exceeds the context"}}}))
    with pytest.raises(openai.NotFoundError) as info:
        await in_thread(create, url, model="nope", input="hi")
    assert "nope" in info.value.message
    with pytest.raises(openai.BadRequestError) as info:
        await in_thread(create, url, model="r", input="hi")
    assert "exceeds the context" in info.value.message
    cases = [
        (b"{nope", "not valid JSON"),
        (b"[1]", "must be a JSON object"),
        (json.dumps({"input": "hi"}).encode(), "missing 'model'"),
        (json.dumps({"model": "m"}).encode(), "missing 'input'"),
    ]
    for raw, text in cases:
        response = await http.post(f"{url}/v1/responses", content=raw)
        error = response.json()["error"]
        assert response.status_code == 400 and text in error["message"] and error["code"] == 400, raw
    with pytest.raises(openai.BadRequestError) as info:  # the llama-server's own check, relayed
        await in_thread(create, url, model="m", input=5)
    assert "input" in info.value.message


async def test_a_stream_cut_short_ends_with_error_events(make_config, start_proxy, http: httpx.AsyncClient) -> None:
    url = await start_proxy(make_config({"m": {"tokens": 5, "break_after": 2}}))
    events = await in_thread(create, url, model="m", input="hi", stream=True)
    assert [e.delta for e in events if isinstance(e, ResponseTextDeltaEvent)] == ["tok0 ", "tok1 "]
    assert not any(isinstance(e, ResponseCompletedEvent) for e in events)
    error, failed = events[-2:]
    assert isinstance(error, ResponseErrorEvent) and "broke off" in error.message
    assert isinstance(failed, ResponseFailedEvent) and failed.response.id == "resp_fake" and failed.response.status == "failed"
    assert failed.sequence_number == error.sequence_number + 1
    assert await requests_counted(http, url, "/v1/responses") == {"502": 1.0}  # counted as failed, not as its 200


async def test_ollama_upstream_serves_responses(tmp_path: Path, fake_binary: str, start_proxy, fake_ollama) -> None:
    url = await start_proxy(upstream_config(tmp_path, fake_binary, fake_ollama.url))
    response = await in_thread(create, url, model="up", input="hi")
    assert response.output_text == "piece0 piece1 piece2 " and response.model == "remote-llm:latest"
    assert fake_ollama.requests[-1][:2] == ("POST", "/v1/responses") and fake_ollama.requests[-1][2]["model"] == "remote-llm"
    events = await in_thread(create, url, model="up", input="hi", stream=True)
    assert "".join(e.delta for e in events if isinstance(e, ResponseTextDeltaEvent)) == "piece0 piece1 piece2 "
    assert isinstance(events[-1], ResponseCompletedEvent)
    assert [e.sequence_number for e in events] == list(range(len(events)))
    with pytest.raises(openai.NotFoundError):
        await in_thread(create, url, model="up-missing", input="hi")


# ---- agents ---------------------------------------------------------------------------------


@pytest.fixture
def agent_dir(tmp_path: Path) -> Path:
    root = tmp_path / "agents"
    write_agent(root, "a", marker("a"))
    write_agent(root, "tag", """
        from smart_proxy.agents import Agent


        class Tag(Agent):
            description = "request only: adds a system message"

            async def on_request(self, ctx):
                ctx.payload["messages"] = [{"role": "system", "content": "tagged"}, *ctx.payload["messages"]]
    """)  # fmt: skip
    return root


async def test_agents_see_chat_and_answer_a_response(make_config, start_proxy, http, agent_dir: Path) -> None:
    url = await start_proxy(with_agents(make_config({"echo": {"echo": True}}), agent_dir, "a", "tag"))
    request = {"model": "echo", "instructions": "Be brief.", "input": [{"role": "user", "content": "/tag /a hello"}]}
    response = await in_thread(create, url, **request)
    text = response.output_text
    assert text.endswith("<a>")  # a's response hook
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"  # as the fake said
    upstream = json.loads(text.removesuffix("<a>"))  # what the echo model received: a chat request
    assert upstream["messages"] == [
        {"role": "system", "content": "tagged"},
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "hello [a]"}]},
    ]
    assert upstream["stream"] is False
    sent = await backend_requests(http, url, "echo")
    assert [r["path"] for r in sent] == ["/v1/chat/completions"]

    events = await in_thread(create, url, **request, stream=True)
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[0].type == "response.created" and isinstance(events[-1], ResponseIncompleteEvent)
    streamed = "".join(e.delta for e in events if isinstance(e, ResponseTextDeltaEvent))
    assert streamed == events[-1].response.output_text and streamed.endswith("<a>")

    # a request hook alone: still a Response, streamed or not
    events = await in_thread(create, url, model="echo", input="/tag hi", stream=True)
    assert json.loads(events[-1].response.output_text)["messages"][0] == {"role": "system", "content": "tagged"}
    # no command: relayed untouched to /v1/responses, even what the translation for agents would refuse
    plain = await in_thread(create, url, model="echo", input="/usr/bin is a folder")
    assert json.loads(plain.output_text) == {"model": "echo", "input": "/usr/bin is a folder"}
    parts = [{"type": "input_text", "text": "/usr/bin x"}, {"type": "input_file", "file_id": "f"}]
    plain = await in_thread(create, url, model="echo", input=[{"role": "user", "content": parts}])
    assert json.loads(plain.output_text)["input"] == [{"role": "user", "content": parts}]


async def test_agents_on_an_ollama_upstream(tmp_path: Path, fake_binary: str, start_proxy, fake_ollama, agent_dir) -> None:
    config = with_agents(upstream_config(tmp_path, fake_binary, fake_ollama.url), agent_dir, "a", "tag")
    url = await start_proxy(config)
    response = await in_thread(create, url, model="up", input="/tag /a hi")
    assert response.output_text == "piece0 piece1 piece2 <a>"
    method, path, sent = fake_ollama.requests[-1]
    assert (method, path, sent["model"]) == ("POST", "/v1/chat/completions", "remote-llm")
    assert sent["messages"] == [{"role": "system", "content": "tagged"}, {"role": "user", "content": "hi [a]"}]
    events = await in_thread(create, url, model="up", input="/a hi", stream=True)
    assert isinstance(events[-1], ResponseCompletedEvent) and events[-1].response.output_text == "piece0 piece1 piece2 <a>"


async def test_agent_request_that_cannot_be_read_is_a_bad_request(make_config, start_proxy, agent_dir: Path) -> None:
    url = await start_proxy(with_agents(make_config({"echo": {"echo": True}}), agent_dir, "a"))
    with pytest.raises(openai.BadRequestError) as info:
        await in_thread(create, url, model="echo", input=[{"role": "user", "content": "/a hi"}], previous_response_id="r1")
    assert "previous_response_id" in info.value.message
