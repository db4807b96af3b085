"""Anthropic's Messages API: the dialect's translation against the SDK's own types, and the routes end to end.

The translation (:mod:`smart_proxy.dialects.anthropic`) is checked against reference
shapes: what it makes is parsed with the official ``anthropic`` SDK's pydantic models (and
the OpenAI side with the ``openai`` SDK's request types). The routes are driven by the
official ``anthropic`` client (sync, in a worker thread) against the in-process proxy over
the fake llama-server (which answers ``/v1/messages`` as llama-server does) and the fake
Ollama (its Anthropic-compatible ``/v1/messages``). An ``echo`` model answers with the exact
body it received, so a test sees what went upstream.
"""

from __future__ import annotations

import json
import typing
from functools import partial
from pathlib import Path

import anthropic
import httpx
import pydantic
import pytest
import trio
from anthropic.types import ErrorType, Message, MessageParam, MessageTokensCount, RawMessageStreamEvent
from anthropic.types.message_create_params import MessageCreateParamsNonStreaming
from openai.types.chat.completion_create_params import CompletionCreateParamsNonStreaming

from smart_proxy.agents import ERRORS_HEADER
from smart_proxy.dialects import anthropic as dialect
from smart_proxy.errors import BadRequest, ModelNotFound, PayloadTooLarge, PoolBusy, ProxyError, Unauthorized

from .test_agents import BOOM, TAG, marker, with_agents, write_agent
from .test_ollama import backend_requests, upstream_config
from .test_ops import with_proxy

CEILING = 30
USER: list[MessageParam] = [{"role": "user", "content": "hi"}]


async def in_thread(fn, *args, **kwargs):
    return await trio.to_thread.run_sync(partial(fn, *args, **kwargs), abandon_on_cancel=True)


def client(url: str, api_key: str = "unused") -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=url, api_key=api_key, max_retries=0, timeout=15)


def sse_events(body: bytes) -> list[tuple[str, dict]]:
    """An Anthropic SSE body as (event name, data) pairs; an event without data is no event (as SSE parsers read it)."""
    events = []
    for block in body.decode().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        if "event" in fields and "data" in fields:
            events.append((fields["event"], json.loads(fields["data"])))
    return events


def echoed(text: str) -> dict:
    """What the echo model received (response hooks may have appended markers)."""
    return json.loads(text[: text.rindex("}") + 1])


# ---- the dialect, against the SDKs' types ---------------------------------------------------

STREAM_EVENT = pydantic.TypeAdapter(RawMessageStreamEvent)
ANTHROPIC_REQUEST = pydantic.TypeAdapter(MessageCreateParamsNonStreaming)
OPENAI_REQUEST = pydantic.TypeAdapter(CompletionCreateParamsNonStreaming)

#: A conversation with every block the translation handles, in the shapes of Anthropic's docs.
CONVERSATION = {
    "model": "m",
    "max_tokens": 64,
    "system": [{"type": "text", "text": "Be brief."}],
    "temperature": 0.5,
    "stop_sequences": ["END"],
    "metadata": {"user_id": "u-1"},
    "tools": [{"name": "get_weather", "description": "Weather of a city",
               "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}],
    "tool_choice": {"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True},
    "messages": [
        {"role": "user", "content": [
            {"type": "text", "text": "What is in this picture, and the weather?"},
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "aGk="}},
            {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
        ]},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "A weather question.", "signature": ""},
            {"type": "text", "text": "Let me look."},
            {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
        ]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "Sunny"}]},
            {"type": "text", "text": "Thanks!"},
        ]},
    ],
}  # fmt: skip


def test_request_to_openai_is_an_openai_chat_request() -> None:
    ANTHROPIC_REQUEST.validate_python(CONVERSATION)  # the reference itself is a valid Anthropic request
    body = dialect.to_openai(CONVERSATION)
    OPENAI_REQUEST.validate_python(body)
    system, user, assistant, tool, thanks = body["messages"]
    assert system == {"role": "system", "content": "Be brief."}
    assert user["content"] == [
        {"type": "text", "text": "What is in this picture, and the weather?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,aGk="}},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
    ]
    assert assistant == {
        "role": "assistant",
        "content": "Let me look.",
        "reasoning_content": "A weather question.",
        "tool_calls": [
            {"id": "toolu_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
        ],
    }
    assert tool == {"role": "tool", "tool_call_id": "toolu_1", "content": "Sunny"}
    assert thanks == {"role": "user", "content": [{"type": "text", "text": "Thanks!"}]}
    assert body["tools"][0]["function"]["parameters"] == CONVERSATION["tools"][0]["input_schema"]
    assert body["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert body["parallel_tool_calls"] is False
    assert body["stop"] == ["END"] and body["max_tokens"] == 64 and "metadata" not in body


def test_request_round_trips_through_openai() -> None:
    back = dialect.request_from_openai(dialect.to_openai(CONVERSATION), CONVERSATION)
    ANTHROPIC_REQUEST.validate_python(back)
    # what changes: the system blocks and the tool result's blocks become their text
    history = json.loads(json.dumps(CONVERSATION["messages"]))
    history[2]["content"][0]["content"] = "Sunny"
    assert back == {**CONVERSATION, "system": "Be brief.", "messages": history}


def test_request_from_openai_keeps_what_a_hook_added() -> None:
    body = dialect.to_openai({"model": "m", "max_tokens": 8, "messages": USER, "thinking": {"type": "disabled"}})
    body["messages"].insert(0, {"role": "system", "content": "tagged"})
    body["seed"] = 7
    body["model"] = "other"
    back = dialect.request_from_openai(body, {"model": "m", "max_tokens": 8, "messages": USER, "thinking": {"type": "disabled"}})
    assert back == {"model": "other", "max_tokens": 8, "messages": USER, "system": "tagged", "seed": 7,
                    "thinking": {"type": "disabled"}}  # fmt: skip
    # a tool result with no user message after it is a user message of its own
    tail = dialect.request_from_openai(
        {"model": "m", "messages": [{"role": "tool", "tool_call_id": "t", "content": "42"}], "tool_choice": "required"}, {}
    )
    assert tail["messages"] == [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": "42"}]}]
    assert tail["tool_choice"] == {"type": "any"}


COMPLETION = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "created": 1,
    "model": "m",
    "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
        "role": "assistant", "content": "Checking.", "reasoning_content": "Hmm.",
        "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
        ],
    }}],
    "usage": {"prompt_tokens": 10, "completion_tokens": 4, "total_tokens": 14, "prompt_tokens_details": {"cached_tokens": 3}},
    "timings": {"predicted_n": 4},
    "x_report": {"agent": "parallel"},
}  # fmt: skip


def test_message_from_openai_is_an_anthropic_message() -> None:
    message = dialect.message_from_openai(COMPLETION, "m")
    parsed = Message.model_validate(message)
    assert [block.type for block in parsed.content] == ["thinking", "text", "tool_use"]
    assert parsed.content[2].input == {"city": "Paris"} and parsed.content[2].id == "call_1"
    assert parsed.stop_reason == "tool_use"
    assert (parsed.usage.input_tokens, parsed.usage.cache_read_input_tokens, parsed.usage.output_tokens) == (7, 3, 4)
    assert message["x_report"] == {"agent": "parallel"} and "timings" not in message


@pytest.mark.parametrize(
    ("finish", "stop_reason"),
    [("stop", "end_turn"), ("length", "max_tokens"), ("tool_calls", "tool_use"), ("content_filter", "refusal"),
     (None, "end_turn")],
)  # fmt: skip
def test_stop_reasons(finish: str | None, stop_reason: str) -> None:
    completion = {"choices": [{"message": {"role": "assistant", "content": "x"}, "finish_reason": finish}]}
    assert Message.model_validate(dialect.message_from_openai(completion, "m")).stop_reason == stop_reason


def test_replay_is_the_event_sequence_of_the_message() -> None:
    message = dialect.message_from_openai(COMPLETION, "m")
    events = sse_events(dialect.replay_sse(message))
    for name, data in events:
        assert STREAM_EVENT.validate_python(data).type == name
    assert [name for name, _ in events] == [
        "message_start",
        *["content_block_start", "content_block_delta", "content_block_delta", "content_block_stop"],  # thinking
        *["content_block_start", "content_block_delta", "content_block_stop"],  # text
        *["content_block_start", "content_block_delta", "content_block_stop"],  # tool_use
        "message_delta",
        "message_stop",
    ]
    deltas = [data["delta"] for name, data in events if name == "content_block_delta"]
    assert [delta["type"] for delta in deltas] == ["thinking_delta", "signature_delta", "text_delta", "input_json_delta"]
    assert json.loads(deltas[-1]["partial_json"]) == {"city": "Paris"}
    assert events[0][1]["message"]["content"] == [] and events[0][1]["message"]["stop_reason"] is None
    assert events[-2][1] == {"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": None},
                             "usage": {"output_tokens": 4}}  # fmt: skip


@pytest.mark.parametrize(
    ("status", "kind"),
    [(400, "invalid_request_error"), (401, "authentication_error"), (403, "permission_error"), (404, "not_found_error"),
     (405, "invalid_request_error"), (413, "request_too_large"), (429, "rate_limit_error"), (500, "api_error"),
     (502, "api_error"), (503, "overloaded_error"), (504, "timeout_error"), (529, "overloaded_error")],
)  # fmt: skip
def test_error_types_by_status(status: int, kind: str) -> None:
    error = ProxyError("no")
    error.status = status
    body = json.loads(dialect.error_body(error, "req_1"))
    assert body == {"type": "error", "error": {"type": kind, "message": "no"}, "request_id": "req_1"}
    # the SDK's ErrorType lists all but request_too_large, which Anthropic's errors page gives for 413
    assert kind in typing.get_args(ErrorType) or (status, kind) == (413, "request_too_large")


def test_upstream_errors_are_wrapped_unless_anthropic() -> None:
    openai_error = json.dumps({"error": {"code": 400, "message": "bad thing", "type": "invalid_request_error"}}).encode()
    assert json.loads(dialect.upstream_error_body(400, openai_error) or b"") == {
        "type": "error", "error": {"type": "invalid_request_error", "message": "bad thing"}}  # fmt: skip
    assert json.loads(dialect.upstream_error_body(404, b'{"error": "model not found"}') or b"")["error"] == {
        "type": "not_found_error", "message": "model not found"}  # fmt: skip
    page = json.loads(dialect.upstream_error_body(502, b"<html><h1>Bad Gateway</h1></html>") or b"")
    assert page["error"] == {"type": "api_error", "message": "the upstream answered HTTP 502: Bad Gateway"}
    native = json.dumps({"type": "error", "error": {"type": "overloaded_error", "message": "busy"}}).encode()
    assert dialect.upstream_error_body(529, native) is None
    assert dialect.upstream_error_body(200, b"{}") is None


def test_message_lines_know_a_complete_stream() -> None:
    whole = dialect.replay_sse(dialect.message_from_openai(COMPLETION, "m"))
    lines = dialect.MessageLines(1 << 20)
    cut = whole.rindex(b"event: message_stop")
    assert lines.feed(whole[:cut]) == whole[:cut] and not lines.done  # up to message_delta: not finished
    assert lines.feed(whole[cut:]) == whole[cut:] and lines.done
    errored = dialect.MessageLines(1 << 20)
    errored.feed(whole[:cut] + dialect.sse_error("broke"))
    assert errored.done  # an upstream's own error event ends it: no second one
    tricky = dialect.MessageLines(1 << 20)
    tricky.feed(b'event: content_block_delta\ndata: {"delta": {"text": "event: message_stop"}}\n\n')
    assert not tricky.done  # the name is read from an event line, never from data


@pytest.mark.parametrize(
    ("body", "path", "message"),
    [
        ({"messages": USER, "max_tokens": 1}, dialect.MESSAGES, "model: Field required"),
        ({"model": "m", "max_tokens": 1}, dialect.MESSAGES, "messages: Field required"),
        ({"model": "m", "messages": [], "max_tokens": 1}, dialect.MESSAGES, "at least one message"),
        ({"model": "m", "messages": USER}, dialect.MESSAGES, "max_tokens: Field required"),
        ({"model": "m", "messages": USER, "max_tokens": 0}, dialect.MESSAGES, "max_tokens: must be an integer"),
        ({"model": "m", "messages": USER, "max_tokens": True}, dialect.MESSAGES, "max_tokens: must be an integer"),
        ({"model": "m", "messages": [{"role": "system", "content": "x"}], "max_tokens": 1}, dialect.MESSAGES, "role"),
        ({"model": "m", "messages": [{"role": "user", "content": [1]}], "max_tokens": 1}, dialect.MESSAGES, "content.0"),
        ({"model": "m", "messages": USER, "max_tokens": 1, "stream": "yes"}, dialect.MESSAGES, "stream"),
        ({"model": "m", "messages": USER, "system": 5}, dialect.COUNT_TOKENS, "system"),
    ],
)
def test_check_request(body: dict, path: str, message: str) -> None:
    with pytest.raises(BadRequest, match=message):
        dialect.check_request(path, body)


def test_check_request_passes_a_good_one() -> None:
    assert dialect.check_request(dialect.MESSAGES, CONVERSATION) == "m"
    assert dialect.check_request(dialect.COUNT_TOKENS, {"model": "m", "messages": USER}) == "m"  # no max_tokens needed


# ---- the routes, with the official client ---------------------------------------------------


async def test_create_and_stream(make_config, start_proxy, http: httpx.AsyncClient) -> None:
    with trio.fail_after(CEILING):
        url = await start_proxy(make_config({"m": {"tokens": 4, "cached": 1}}))

        def ask() -> tuple[Message, list[str], Message]:
            with client(url) as c:
                reply = c.messages.create(model="m", max_tokens=16, messages=USER)
                with c.messages.stream(model="m", max_tokens=16, messages=USER) as stream:
                    pieces = list(stream.text_stream)
                    final = stream.get_final_message()
            return reply, pieces, final

        reply, pieces, final = await in_thread(ask)
        assert reply.model == "m" and reply.type == "message" and reply.role == "assistant"
        assert [block.type for block in reply.content] == ["text"] and reply.content[0].text == "tok0 tok1 tok2 tok3 "
        assert reply.stop_reason == "max_tokens"
        assert (reply.usage.input_tokens, reply.usage.cache_read_input_tokens, reply.usage.output_tokens) == (2, 1, 4)
        assert pieces == ["tok0 ", "tok1 ", "tok2 ", "tok3 "]  # several events, as generated
        assert final.content[0].text == "tok0 tok1 tok2 tok3 " and final.stop_reason == "max_tokens"

        # on the wire: event-named SSE, ending with message_stop and no data: [DONE]
        body = {"model": "m", "max_tokens": 16, "messages": USER, "stream": True}
        response = await http.post(f"{url}/v1/messages", json=body, headers={"anthropic-version": "2023-06-01"})
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["cache-control"] == "no-cache"
        events = sse_events(response.content)
        assert events[0][0] == "message_start" and events[-1][0] == "message_stop"
        assert b"[DONE]" not in response.content


async def test_body_goes_upstream_byte_for_byte(make_config, start_proxy, http: httpx.AsyncClient) -> None:
    url = await start_proxy(make_config({"echo": {"echo": True}}))
    raw = b'{"model":"echo","max_tokens":9,"x_unknown":{"kept":[1,2]},  "messages":[{"role":"user","content":"hi"}]}'
    response = await http.post(f"{url}/v1/messages", content=raw)
    assert response.status_code == 200
    assert response.json()["content"][0]["text"] == raw.decode()


async def test_count_tokens(make_config, start_proxy) -> None:
    url = await start_proxy(make_config({"m": {}}))

    def count(messages: list[MessageParam], **extra: object) -> MessageTokensCount:
        with client(url) as c:
            return c.messages.count_tokens(model="m", messages=messages, **extra)  # type: ignore[arg-type]

    short = await in_thread(count, USER)
    longer = await in_thread(count, [{"role": "user", "content": "one two three four"}], system="Be brief.")
    assert isinstance(short, MessageTokensCount)
    assert (short.input_tokens, longer.input_tokens) == (1 + 3, 6 + 3)  # the fake's count: words + 3


async def test_unknown_model_and_bad_requests(make_config, start_proxy, http: httpx.AsyncClient) -> None:
    url = await start_proxy(make_config({"m": {}}))

    def ask(**kwargs: object) -> Exception:
        with client(url) as c, pytest.raises(anthropic.APIStatusError) as caught:
            c.messages.create(**{"model": "m", "max_tokens": 8, "messages": USER, **kwargs})  # type: ignore[call-overload]
        return caught.value

    missing = await in_thread(ask, model="nope")
    assert isinstance(missing, anthropic.NotFoundError)
    assert missing.body["error"]["type"] == "not_found_error" and "nope" in missing.body["error"]["message"]
    bad = await in_thread(ask, max_tokens=0)
    assert isinstance(bad, anthropic.BadRequestError) and bad.body["error"]["type"] == "invalid_request_error"
    with_system = await in_thread(ask, messages=[{"role": "system", "content": "x"}])
    assert isinstance(with_system, anthropic.BadRequestError)

    cases = [
        ("POST", "/v1/messages", b"{not json", 400, "invalid_request_error"),
        ("POST", "/v1/messages", b"[1]", 400, "invalid_request_error"),
        ("POST", "/v1/messages", b'{"model": "m", "messages": [{"role": "user", "content": "x"}]}', 400, "invalid_request_error"),
        ("POST", "/v1/messages/count_tokens", b'{"model": "m"}', 400, "invalid_request_error"),
        ("POST", "/v1/messages/count_tokens", b'{"model": "nope", "messages": [{"role": "user", "content": "x"}]}', 404,
         "not_found_error"),
        ("GET", "/v1/messages", None, 405, "invalid_request_error"),
        ("GET", "/v1/messages/batches", None, 404, "not_found_error"),
    ]  # fmt: skip
    for method, path, content, status, kind in cases:
        response = await http.request(method, url + path, content=content)
        assert response.status_code == status, (path, content, response.text)
        body = response.json()
        assert body["type"] == "error" and body["error"]["type"] == kind, body
        assert body["error"]["message"] and body["request_id"] == response.headers["x-request-id"]


async def test_api_keys_and_too_large(make_config, start_proxy, http: httpx.AsyncClient) -> None:
    url = await start_proxy(with_proxy(make_config({"m": {}}), api_keys=("sk-one",), max_body=4096))

    def ask(key: str) -> Message:
        with client(url, key) as c:
            return c.messages.create(model="m", max_tokens=2, messages=USER)

    assert (await in_thread(ask, "sk-one")).content[0].text == "tok0 tok1 "  # sent as x-api-key
    with pytest.raises(anthropic.AuthenticationError) as caught:
        await in_thread(ask, "sk-wrong")
    assert caught.value.body["error"]["type"] == "authentication_error"
    response = await http.post(f"{url}/v1/messages", content=b"x" * 5000, headers={"x-api-key": "sk-one"})
    assert response.status_code == 413 and response.json()["error"]["type"] == "request_too_large"


def test_edge_errors_are_anthropic_shaped() -> None:
    """Every error the edge or the app answers goes through error_reply, which picks the dialect by path."""
    from smart_proxy.handlers.reply import error_reply

    for exc in (Unauthorized("no key"), PayloadTooLarge("big"), PoolBusy("busy"), ModelNotFound("nope")):
        reply = error_reply(exc, "/v1/messages/count_tokens")
        body = json.loads(reply.body)
        assert body["type"] == "error" and body["error"]["type"] == dialect.error_type(exc.status), body
    assert (b"retry-after", b"1") in error_reply(PoolBusy("busy"), "/v1/messages").headers


async def test_upstream_error_is_anthropic_shaped(make_config, start_proxy) -> None:
    url = await start_proxy(make_config({"m": {"reject": {"status": 400, "message": "the prompt is too long"}}}))

    def ask() -> None:
        with client(url) as c:
            c.messages.create(model="m", max_tokens=8, messages=USER)

    with pytest.raises(anthropic.BadRequestError) as caught:
        await in_thread(ask)
    assert caught.value.body == {"type": "error", "error": {"type": "invalid_request_error", "message": "the prompt is too long"}}


async def test_tool_use_and_images_against_the_fake(make_config, start_proxy, http: httpx.AsyncClient) -> None:
    weather = {"name": "get_weather", "arguments": {"city": "Paris"}}
    config = make_config({"tools": {"tool_call": weather}, "echo": {"echo": True, "vision": True}})
    url = await start_proxy(config)
    tools = CONVERSATION["tools"]

    def ask() -> tuple[Message, Message, Message]:
        with client(url) as c:
            called = c.messages.create(model="tools", max_tokens=8, messages=USER, tools=tools)  # type: ignore[arg-type]
            with c.messages.stream(model="tools", max_tokens=8, messages=USER, tools=tools) as stream:  # type: ignore[arg-type]
                streamed = stream.get_final_message()
            history = CONVERSATION["messages"]
            echo = c.messages.create(model="echo", max_tokens=8, messages=history, tools=tools)  # type: ignore[arg-type]
        return called, streamed, echo

    called, streamed, echo = await in_thread(ask)
    for answer in (called, streamed):
        (block,) = answer.content
        assert block.type == "tool_use" and block.name == "get_weather" and block.input == {"city": "Paris"}
        assert answer.stop_reason == "tool_use"
    # the tool_use, tool_result and image blocks reached llama-server as the client sent them
    received = json.loads(echo.content[0].text)
    assert received["messages"] == CONVERSATION["messages"] and received["tools"] == tools


async def test_images_for_a_model_without_vision_are_refused_before_llama_server(
    make_config, start_proxy, http: httpx.AsyncClient
) -> None:
    url = await start_proxy(make_config({"text": {}}))
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "aGk="}}
    messages = [{"role": "user", "content": [{"type": "text", "text": "what is this?"}, image]}]

    def ask(stream: bool) -> None:
        with client(url) as c:
            c.messages.create(model="text", max_tokens=8, messages=messages, stream=stream)  # type: ignore[arg-type]

    for stream in (False, True):
        with pytest.raises(anthropic.BadRequestError) as caught:
            await in_thread(ask, stream)
        assert caught.value.status_code == 400
        assert caught.value.body["error"]["type"] == "invalid_request_error"
        assert '"text" cannot take images' in caught.value.body["error"]["message"]
    assert await backend_requests(http, url, "text") == []  # refused before llama-server saw it
    answer = await in_thread(lambda: _text_reply(url))
    assert answer  # the same model still answers text


def _text_reply(url: str) -> str:
    with client(url) as c:
        reply = c.messages.create(model="text", max_tokens=8, messages=USER)
    return reply.content[0].text


async def test_ollama_upstream(tmp_path, fake_binary, start_proxy, fake_ollama) -> None:
    url = await start_proxy(upstream_config(tmp_path, fake_binary, fake_ollama.url))

    def ask() -> tuple[Message, list[str]]:
        with client(url) as c:
            reply = c.messages.create(model="up", max_tokens=8, messages=USER)
            with c.messages.stream(model="up", max_tokens=8, messages=USER) as stream:
                pieces = list(stream.text_stream)
        return reply, pieces

    reply, pieces = await in_thread(ask)
    assert reply.content[0].text == "piece0 piece1 piece2 "
    assert pieces == ["piece0 ", "piece1 ", "piece2 "]
    method, path, body = fake_ollama.requests[-1]
    assert (method, path, body["model"]) == ("POST", "/v1/messages", "remote-llm")  # Ollama's own Anthropic route

    def count() -> None:
        with client(url) as c:
            c.messages.count_tokens(model="up", messages=USER)

    with pytest.raises(anthropic.InternalServerError) as caught:
        await in_thread(count)
    assert caught.value.status_code == 501 and "no token counting" in caught.value.body["error"]["message"]


@pytest.mark.parametrize(
    "behaviour",
    [{"break_after": 2}, {"fault": "cut_chunk"}, {"fault": "cut_sse_line"}, {"fault": "end_without_done"}],
    ids=["break_after", "cut_chunk", "cut_sse_line", "end_without_done"],
)
async def test_a_stream_cut_short_ends_with_an_error_event(behaviour: dict, make_config, start_proxy, http) -> None:
    with trio.fail_after(CEILING):
        url = await start_proxy(make_config({"m": behaviour}))
        body = {"model": "m", "max_tokens": 8, "messages": USER, "stream": True}
        response = await http.post(f"{url}/v1/messages", json=body)
        assert response.status_code == 200
        assert response.content.endswith(b"\n\n")
        events = sse_events(response.content)
        assert events[-1][0] == "error" and events[-1][1]["error"]["type"] == "api_error", events
        assert "message_stop" not in [name for name, _ in events]
        assert any(name == "content_block_delta" for name, _ in events)  # what came before was relayed

        def ask() -> None:
            with client(url) as c, c.messages.stream(model="m", max_tokens=8, messages=USER) as stream:
                for _ in stream:
                    pass

        with pytest.raises(anthropic.APIStatusError) as caught:
            await in_thread(ask)
        assert caught.value.body["error"]["type"] == "api_error"


# ---- agents ---------------------------------------------------------------------------------


@pytest.fixture
async def agents_url(make_config, start_proxy, tmp_path: Path) -> str:
    root = tmp_path / "agents"
    write_agent(root, "tag", TAG)
    write_agent(root, "mark", marker("mark"))
    write_agent(root, "boom", BOOM)
    config = make_config(
        {"echo": {"echo": True, "vision": True}, "m": {"tokens": 3, "vision": True},
         "bad": {"reject": {"status": 400, "message": "too long"}}}
    )  # fmt: skip
    return await start_proxy(with_agents(config, root, "tag", "mark", "boom"))


async def test_request_agent_live(agents_url: str, http: httpx.AsyncClient) -> None:
    """A chain with only a request hook is live: its rewrite goes to llama-server's own /v1/messages, relayed as it streams."""
    url = agents_url
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "aGk="}}
    messages = [{"role": "user", "content": [{"type": "text", "text": "/tag what is this?"}, image]}]

    def ask() -> tuple[Message, list[str]]:
        with client(url) as c:
            reply = c.messages.create(model="echo", max_tokens=8, messages=messages, metadata={"user_id": "u"})
            with c.messages.stream(model="m", max_tokens=8, messages=messages) as stream:
                pieces = list(stream.text_stream)
        return reply, pieces

    reply, pieces = await in_thread(ask)
    received = json.loads(reply.content[0].text)
    assert received["system"] == "tagged"
    assert received["messages"] == [{"role": "user", "content": [{"type": "text", "text": "what is this?"}, image]}]
    assert received["metadata"] == {"user_id": "u"} and received["max_tokens"] == 8
    assert pieces == ["tok0 ", "tok1 ", "tok2 "]


async def test_response_agent_buffered(agents_url: str, http: httpx.AsyncClient) -> None:
    """A response hook buffers: the chain's chat.completion comes back as an Anthropic message, replayed as SSE for a stream.

    (The chain asks llama-server's OpenAI route, where the fake answers max_tokens tokens.)
    """
    url = agents_url

    marked: list[MessageParam] = [{"role": "user", "content": "/mark hi"}]

    def ask() -> tuple[Message, Message, list[str]]:
        with client(url) as c:
            echo = c.messages.create(model="echo", max_tokens=8, system="Be brief.", messages=marked)
            reply = c.messages.create(model="m", max_tokens=3, messages=marked)
            with c.messages.stream(model="m", max_tokens=3, messages=marked) as stream:
                pieces = list(stream.text_stream)
        return echo, reply, pieces

    echo, reply, pieces = await in_thread(ask)
    received = echoed(echo.content[0].text)  # the chain called llama-server's OpenAI route
    assert received["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi [mark]"}]
    assert echo.content[0].text.endswith("<mark>")
    assert reply.content[0].text == "tok0 tok1 tok2 <mark>" and reply.stop_reason == "max_tokens" and reply.model == "m"
    assert "".join(pieces) == "tok0 tok1 tok2 <mark>"

    body = {"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": "/mark hi"}], "stream": True}
    response = await http.post(f"{url}/v1/messages", json=body)
    names = [name for name, _ in sse_events(response.content)]
    assert names[0] == "message_start" and names[-1] == "message_stop"


async def test_agent_failures_are_named(agents_url: str, http: httpx.AsyncClient) -> None:
    url = agents_url
    body = {"model": "m", "max_tokens": 3, "messages": [{"role": "user", "content": "/boom /mark hi"}]}
    response = await http.post(f"{url}/v1/messages", json=body)
    assert response.status_code == 200 and response.headers[ERRORS_HEADER] == "boom:error"
    assert Message.model_validate(response.json()).content[0].text == "tok0 tok1 tok2 <mark>"
    # an upstream error after a failed hook is Anthropic's too, and still names the failure
    response = await http.post(f"{url}/v1/messages", json={**body, "model": "bad"})
    assert response.status_code == 400 and response.headers[ERRORS_HEADER] == "boom:error"
    error = response.json()
    assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
    assert "too long" in error["error"]["message"]


async def test_agents_on_an_ollama_upstream(tmp_path, fake_binary, start_proxy, fake_ollama) -> None:
    """A live chain's rewrite goes to Ollama's own /v1/messages; a buffered chain asks its OpenAI route.

    Either way the client gets Anthropic's answer (a buffered one replayed as events for a stream).
    """
    root = tmp_path / "agents"
    write_agent(root, "tag", TAG)
    write_agent(root, "mark", marker("mark"))
    url = await start_proxy(with_agents(upstream_config(tmp_path, fake_binary, fake_ollama.url), root, "tag", "mark"))

    def ask(text: str, stream: bool) -> str:
        with client(url) as c:
            messages: list[MessageParam] = [{"role": "user", "content": text}]
            if not stream:
                return c.messages.create(model="up", max_tokens=8, messages=messages).content[0].text  # type: ignore[union-attr]
            with c.messages.stream(model="up", max_tokens=8, messages=messages) as events:
                return "".join(events.text_stream)

    assert await in_thread(ask, "/tag hi", True) == "piece0 piece1 piece2 "
    method, path, body = fake_ollama.requests[-1]
    assert (method, path) == ("POST", "/v1/messages")
    assert body["system"] == "tagged" and body["messages"] == USER and body["model"] == "remote-llm"
    assert await in_thread(ask, "/mark hi", False) == "piece0 piece1 piece2 <mark>"
    method, path, body = fake_ollama.requests[-1]
    assert (method, path) == ("POST", "/v1/chat/completions")
    assert body["messages"] == [{"role": "user", "content": "hi [mark]"}]
    assert await in_thread(ask, "/mark hi", True) == "piece0 piece1 piece2 <mark>"
