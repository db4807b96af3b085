"""OpenAI stream requests that wait for a load get SSE comments (smart_proxy/handlers/loading_stream.py)."""

from __future__ import annotations

import json
from functools import partial

import openai
import pytest
import trio

from .sse import SSEReader
from .test_ops import with_proxy

USER = [{"role": "user", "content": "hi"}]


def chat(model: str = "a", stream: bool = True) -> dict:
    return {"model": model, "messages": USER, "stream": stream}


async def raw_stream(http, url: str, body: dict) -> tuple[int, dict, bytes]:
    async with http.stream("POST", url + "/v1/chat/completions", json=body) as response:
        return response.status_code, dict(response.headers), await response.aread()


def data_lines(raw: bytes) -> list[str]:
    return [line for line in raw.decode().split("\n") if line.startswith("data: ")]


def text_of(raw: bytes) -> str:
    text = ""
    for line in data_lines(raw):
        if line != "data: [DONE]":
            for choice in json.loads(line[6:])["choices"]:
                text += choice["delta"].get("content") or ""
    return text


def ask_openai(url: str, model: str) -> str:
    with openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=15) as client:
        text = ""
        for chunk in client.chat.completions.create(model=model, messages=USER, stream=True):
            for choice in chunk.choices:
                text += choice.delta.content or ""
        return text


async def in_thread(fn, *args):
    return await trio.to_thread.run_sync(partial(fn, *args), abandon_on_cancel=True)


async def test_a_stream_waiting_for_a_load_gets_comments_then_the_same_answer(make_config, start_proxy, http) -> None:
    config = with_proxy(make_config({"a": {"load_delay": 1.2, "tokens": 4}}), loading_comments=0.3)
    url = await start_proxy(config)
    status, headers, cold = await raw_stream(http, url, chat())
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    comments = [line for line in cold.decode().split("\n") if line.startswith(":")]
    assert 2 <= len(comments) <= 5, cold  # one every 0.3 s of a 1.2 s load
    assert all(line.startswith(": loading a ") and line.endswith(" s") for line in comments), comments
    assert cold.startswith(b": loading a 0 s\n\n")  # before the upstream's first byte, each an event of its own
    first_data = cold.index(b"data: ")
    assert cold[:first_data].count(b"\n\n") == len(comments)
    # the answer itself is what a warm request gets
    _, _, warm = await raw_stream(http, url, chat())
    assert not warm.startswith(b":")
    assert text_of(cold) == text_of(warm) == "tok0 tok1 tok2 tok3 "
    assert data_lines(cold)[-1] == data_lines(warm)[-1] == "data: [DONE]"
    # time to first token is the first token's, not the first comment's
    metrics = (await http.get(url + "/metrics")).text
    slow = [line for line in metrics.splitlines() if line.startswith("smart_proxy_time_to_first_token_seconds_bucket")
            and 'le="1.0"' in line and "/v1/chat/completions" in line]  # fmt: skip
    assert slow and slow[0].endswith(" 1.0"), slow  # only the warm one was under 1 s


async def test_the_official_client_reads_through_the_comments(make_config, start_proxy) -> None:
    url = await start_proxy(with_proxy(make_config({"a": {"load_delay": 0.8, "tokens": 3}}), loading_comments=0.2))
    assert await in_thread(ask_openai, url, "a") == "tok0 tok1 tok2 "


async def test_a_load_that_fails_after_the_comments_is_an_error_event(make_config, start_proxy, http) -> None:
    config = with_proxy(make_config({"bad": {"exit_on_load": 3, "load_delay": 0.8}}), loading_comments=0.2)
    url = await start_proxy(config)
    status, _, raw = await raw_stream(http, url, chat("bad"))
    assert status == 200 and raw.startswith(b": loading bad ")
    events = data_lines(raw)
    assert len(events) == 1 and "data: [DONE]" not in raw.decode()  # never looks finished
    error = json.loads(events[0][6:])["error"]
    assert "exited with code 3" in error["message"] and error["code"] == 502
    # the official client raises it
    with pytest.raises(openai.APIError, match="exited with code 3"):
        await in_thread(ask_openai, url, "bad")
    # counted as the failure it was
    metrics = (await http.get(url + "/metrics")).text
    assert 'smart_proxy_requests_total{model="bad",route="/v1/chat/completions",status="502"} 2.0' in metrics


async def test_a_quick_failure_keeps_its_status(make_config, start_proxy, http) -> None:
    config = with_proxy(make_config({"bad": {"exit_on_load": 3, "load_delay": 0.01}}), loading_comments=2)
    url = await start_proxy(config)
    status, headers, raw = await raw_stream(http, url, chat("bad"))
    assert status == 502 and headers["content-type"] == "application/json"
    assert "exited with code 3" in json.loads(raw)["error"]["message"]


async def test_an_upstream_refusal_after_the_comments_is_an_error_event(make_config, start_proxy, http) -> None:
    behaviour = {"load_delay": 0.6, "reject": {"status": 400, "message": "the prompt is too long"}}
    url = await start_proxy(with_proxy(make_config({"a": behaviour}), loading_comments=0.2))
    status, _, raw = await raw_stream(http, url, chat())
    assert status == 200 and raw.startswith(b": loading a ")
    [event] = data_lines(raw)
    assert json.loads(event[6:])["error"] == {"message": "the prompt is too long", "type": "invalid_request_error", "code": 400}
    # once loaded, the same request gets llama-server's 400 as before
    status, _, raw = await raw_stream(http, url, chat())
    assert status == 400 and json.loads(raw)["error"]["message"] == "the prompt is too long"


async def test_no_comments_when_off_or_not_streaming(make_config, start_proxy, http) -> None:
    url = await start_proxy(with_proxy(make_config({"a": {"load_delay": 0.5}, "b": {"load_delay": 0.5}}), loading_comments=0))
    _, _, raw = await raw_stream(http, url, chat("a"))
    assert not raw.startswith(b":") and data_lines(raw)[-1] == "data: [DONE]"
    url = await start_proxy(with_proxy(make_config({"b": {"load_delay": 0.5}}), loading_comments=0.1))
    answer = await http.post(url + "/v1/chat/completions", json=chat("b", stream=False))
    assert answer.status_code == 200 and answer.json()["choices"][0]["message"]["content"]


async def test_a_client_that_leaves_while_waiting_cancels_the_load(make_config, start_proxy, http) -> None:
    url = await start_proxy(with_proxy(make_config({"a": {"load_delay": 3}}), loading_comments=0.2))
    async with http.stream("GET", url + "/events") as watched:
        events = SSEReader(watched)
        await events.next()
        async with http.stream("POST", url + "/v1/chat/completions", json=chat()) as response:
            assert response.status_code == 200
            assert (await anext(response.aiter_raw())).startswith(b": loading a")
        _, stopping = await events.until("stopping", model="a")
        assert stopping["reason"] == "load abandoned"
        _, summary = await events.until("request")
        assert summary["status"] == 200 and summary["ttft"] is None


# ---- the other SSE dialects: Anthropic messages, Responses (one mechanism, their own framing) -------


def messages(model: str = "a") -> dict:
    return {"model": model, "max_tokens": 16, "messages": USER, "stream": True}


def responses(model: str = "a") -> dict:
    return {"model": model, "input": "hi", "stream": True}


async def raw_post(http, url: str, path: str, body: dict) -> tuple[int, bytes]:
    async with http.stream("POST", url + path, json=body) as response:
        return response.status_code, await response.aread()


def comments_then_events(raw: bytes) -> tuple[list[str], list[str]]:
    """The comment lines before the first event, and the event names, in order."""
    head, first, _ = raw.partition(b"event: ")
    comments = [line for line in head.decode().split("\n") if line.startswith(":")]
    names = [line[7:] for line in raw.decode().split("\n") if line.startswith("event: ")]
    assert first and head.count(b"\n\n") == len(comments)  # each comment an event of its own, all before the answer
    return comments, names


def ask_anthropic(url: str, model: str) -> str:
    import anthropic

    with anthropic.Anthropic(base_url=url, api_key="none", max_retries=0, timeout=15) as client:
        text = ""
        with client.messages.stream(model=model, max_tokens=16, messages=USER) as stream:
            for piece in stream.text_stream:
                text += piece
            assert stream.get_final_message().stop_reason in ("end_turn", "max_tokens")
        return text


def ask_responses(url: str, model: str) -> str:
    with openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=15) as client:
        text = ""
        for event in client.responses.create(model=model, input="hi", stream=True):
            if event.type == "response.output_text.delta":
                text += event.delta
            if event.type == "response.completed":
                return text
        raise AssertionError("no response.completed")


async def test_an_anthropic_stream_waiting_for_a_load_gets_comments_then_the_same_answer(make_config, start_proxy, http) -> None:
    url = await start_proxy(with_proxy(make_config({"a": {"load_delay": 1.2, "tokens": 4}}), loading_comments=0.3))
    status, cold = await raw_post(http, url, "/v1/messages", messages())
    assert status == 200 and cold.startswith(b": loading a 0 s\n\n")
    comments, names = comments_then_events(cold)
    assert 2 <= len(comments) <= 5 and all(line.startswith(": loading a ") for line in comments), comments
    assert names[0] == "message_start" and names[-1] == "message_stop"
    _, warm = await raw_post(http, url, "/v1/messages", messages())
    assert not warm.startswith(b":") and cold[cold.index(b"event: "):] .count(b"event: ") == warm.count(b"event: ")
    # the official client reads through the comments, to the same text
    url = await start_proxy(with_proxy(make_config({"b": {"load_delay": 0.8, "tokens": 3}}), loading_comments=0.2))
    assert await in_thread(ask_anthropic, url, "b") == await in_thread(ask_anthropic, url, "b") != ""


async def test_a_responses_stream_waiting_for_a_load_gets_comments_then_the_same_answer(make_config, start_proxy, http) -> None:
    url = await start_proxy(with_proxy(make_config({"a": {"load_delay": 1.2, "tokens": 4}}), loading_comments=0.3))
    status, cold = await raw_post(http, url, "/v1/responses", responses())
    assert status == 200 and cold.startswith(b": loading a 0 s\n\n")
    comments, names = comments_then_events(cold)
    assert 2 <= len(comments) <= 5 and all(line.startswith(": loading a ") for line in comments), comments
    assert names[0] == "response.created" and names[-1] == "response.completed"
    _, warm = await raw_post(http, url, "/v1/responses", responses())
    assert not warm.startswith(b":") and names == comments_then_events(warm)[1]
    url = await start_proxy(with_proxy(make_config({"b": {"load_delay": 0.8, "tokens": 3}}), loading_comments=0.2))
    assert await in_thread(ask_responses, url, "b") == await in_thread(ask_responses, url, "b") != ""


async def test_a_load_that_fails_after_the_comments_ends_in_each_dialects_error(make_config, start_proxy, http) -> None:
    config = with_proxy(make_config({"bad": {"exit_on_load": 3, "load_delay": 0.8}}), loading_comments=0.2)
    url = await start_proxy(config)
    status, raw = await raw_post(http, url, "/v1/messages", messages("bad"))
    assert status == 200 and raw.startswith(b": loading bad ")
    _, names = comments_then_events(raw)
    assert names == ["error"]  # never a message_stop
    error = json.loads(raw.decode().split("data: ")[-1])
    assert error["type"] == "error" and "exited with code 3" in error["error"]["message"]
    status, raw = await raw_post(http, url, "/v1/responses", responses("bad"))
    assert status == 200 and raw.startswith(b": loading bad ")
    _, names = comments_then_events(raw)
    assert names == ["error"]  # never a response.completed
    assert "exited with code 3" in json.loads(raw.decode().split("data: ")[-1])["message"]
    # the official anthropic client raises it
    import anthropic

    with pytest.raises(anthropic.APIStatusError, match="exited with code 3"):
        await in_thread(ask_anthropic, url, "bad")
    # and the openai client's Responses stream too
    with pytest.raises(openai.APIError, match="exited with code 3"):
        await in_thread(ask_responses, url, "bad")


async def test_a_quick_answer_or_failure_is_as_before_in_the_other_dialects(make_config, start_proxy, http) -> None:
    config = with_proxy(make_config({"bad": {"exit_on_load": 3, "load_delay": 0.01}, "a": {"tokens": 2}}), loading_comments=2)
    url = await start_proxy(config)
    for path, body in (("/v1/messages", messages("bad")), ("/v1/responses", responses("bad"))):
        status, raw = await raw_post(http, url, path, body)
        assert status == 502 and "exited with code 3" in raw.decode(), (path, raw)
    for path, body in (("/v1/messages", messages()), ("/v1/responses", responses())):
        status, raw = await raw_post(http, url, path, body)
        assert status == 200 and not raw.startswith(b":"), (path, raw)


async def test_an_ollama_stream_waiting_for_a_load_gets_nothing_until_its_first_line(make_config, start_proxy, http) -> None:
    url = await start_proxy(with_proxy(make_config({"a": {"load_delay": 0.8, "tokens": 3}}), loading_comments=0.2))
    status, raw = await raw_post(http, url, "/api/chat", {"model": "a", "messages": USER, "stream": True})
    lines = [json.loads(line) for line in raw.splitlines()]
    assert status == 200 and raw.startswith(b"{") and lines[-1]["done"] is True


@pytest.mark.parametrize("keepalive", [b"\n", b"{}\n", b" \n"])
def test_the_ollama_client_takes_no_keepalive_line_so_ollama_streams_wait_silently(keepalive: bytes) -> None:
    """NDJSON has no comment line: whatever a proxy sent while it waits, the official ollama client fails on it."""
    import httpx
    import ollama

    last = {"model": "a", "created_at": "2025-01-01T00:00:00Z", "message": {"role": "assistant", "content": "hi"},
            "done": True, "done_reason": "stop"}  # fmt: skip

    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=keepalive + json.dumps(last).encode() + b"\n")

    client = ollama.Client(host="http://ollama.test", transport=httpx.MockTransport(answer))
    with pytest.raises(Exception) as caught:  # noqa: B017 (JSONDecodeError or pydantic's ValidationError)
        list(client.chat(model="a", messages=USER, stream=True))
    assert type(caught.value).__name__ in ("JSONDecodeError", "ValidationError")
    # without it, the same answer reads
    quiet = ollama.Client(host="http://ollama.test", transport=httpx.MockTransport(
        lambda request: httpx.Response(200, content=json.dumps(last).encode() + b"\n")))  # fmt: skip
    assert [part.message.content for part in quiet.chat(model="a", messages=USER, stream=True)] == ["hi"]
