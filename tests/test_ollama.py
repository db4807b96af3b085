"""The Ollama dialect: the official ``ollama`` client against the in-process proxy.

Local models are the fake llama-server; the Ollama upstream backend is tested
against :mod:`tests.fake_ollama`. The sync ``ollama.Client`` runs in a worker
thread (the proxy runs in the test's Trio loop); the asyncio ``AsyncClient``
runs under ``asyncio.run`` in a worker thread too.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from contextlib import aclosing
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import attrs
import httpx
import ollama
import openai
import pytest
import trio

from smart_proxy.config import ModelConfig, structure
from smart_proxy.dialects import ollama as translate
from smart_proxy.errors import BadRequest


async def in_thread(fn, *args, **kwargs):
    return await trio.to_thread.run_sync(partial(fn, *args, **kwargs))


def with_client(url: str, call):
    """Run ``call(client)`` with a fresh sync ollama client (closed after)."""
    with ollama.Client(host=url) as client:
        result = call(client)
        return list(result) if hasattr(result, "__next__") else result


def with_async_client(url: str, call):
    """Run ``await call(client)`` with an ollama AsyncClient under asyncio, in this (worker) thread."""

    async def main():
        async with ollama.AsyncClient(host=url) as client:
            result = await call(client)
            if hasattr(result, "__anext__"):
                return [part async for part in result]
            return result

    return asyncio.run(main())


async def backend_requests(http: httpx.AsyncClient, url: str, model: str) -> list[dict]:
    """What the proxy sent to the fake llama-server of ``model``."""
    servers = (await http.get(f"{url}/health")).json()["pool"]["servers"]
    (port,) = [s["port"] for s in servers if s["model"] == model]
    return (await http.get(f"http://127.0.0.1:{port}/requests")).json()


USER = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    ("value", "seconds"),
    [(None, None), (0, 0.0), ("0", 0.0), (-1, -1.0), ("-1", -1.0), ("-1m", -60.0), (300, 300.0), ("300", 300.0),
     ("5m", 300.0), ("1h30m", 5400.0), ("1.5s", 1.5), ("250ms", 0.25), ("2h0m0s", 7200.0)],
)  # fmt: skip
def test_keep_alive_durations(value: object, seconds: float | None) -> None:
    assert translate.parse_keep_alive(value) == seconds


@pytest.mark.parametrize(
    "value",
    ["soon", "5 minutes", "m5", True, [5], float("inf"), "1h-5m", "nan", "NaN", "inf", "-inf", float("nan"), 1e12,
     -1e12, "1e12", "300000000000s", "2562048h", 10**400, "9" * 400],
)  # fmt: skip
def test_keep_alive_nonsense_is_a_bad_request(value: object) -> None:
    with pytest.raises(BadRequest, match="keep_alive") as info:
        translate.parse_keep_alive(value)
    assert "2562047h" in info.value.message  # the accepted range is named


def test_keep_alive_takes_up_to_gos_largest_duration() -> None:
    assert translate.parse_keep_alive("2562047h") == translate.parse_keep_alive(-2562047 * 3600.0) * -1 == 2562047 * 3600


def test_sse_parser_splits_events_across_chunks() -> None:
    parser = translate.SSEParser()
    assert parser.feed(b'data: {"a"') == []
    assert parser.feed(b": 1}\n\n: ping\n\ndata: [DONE]\n") == [{"a": 1}, "[DONE]"]
    assert parser.feed(b'error: {"message": "boom"}') == []
    assert parser.close() == [{"error": {"message": "boom"}}]


@pytest.mark.parametrize(
    ("line", "event"),
    [(b'data: {"a": 1}', {"a": 1}), (b'data:{"a":1}  ', {"a": 1}), (b"data: [DONE]", "[DONE]"), (b"data:", None),
     (b"data: [1, 2]", None), (b'  data: {"a": 1}', {"a": 1}), (b'data: {"s": "\xff"}', {"s": "\ufffd"}),
     (b"data: {nope", {"error": {"message": "llama-server sent an unreadable event: {nope"}}),
     (b'data: {"a": 1}\x1c', {"a": 1}), (b'event: x', None), (b": ping", None)],
)  # fmt: skip
def test_sse_parser_reads_each_kind_of_line(line: bytes, event: object) -> None:
    parser = translate.SSEParser()
    assert parser.feed(line + b"\n") == ([] if event is None else [event])


def _sse(*events: dict) -> bytes:
    return b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + b"data: [DONE]\n\n"


def _lines(data: bytes) -> list[dict]:
    measured = ("created_at", "total_duration", "load_duration", "prompt_eval_duration", "eval_duration")
    return [{k: v for k, v in json.loads(line).items() if k not in measured} for line in data.splitlines()]


def test_ndjson_stream_makes_the_same_lines_however_the_bytes_come() -> None:
    call = {"index": 0, "id": "c1", "function": {"name": "f", "arguments": '{"x": 1}'}}
    sse = _sse(
        {"choices": [{"delta": {"reasoning_content": "hm"}}]},
        *[{"choices": [{"delta": {"content": f"t{i} é"}}]} for i in range(5)],
        {"choices": [{"delta": {"tool_calls": [call]}, "finish_reason": "tool_calls"}]},
        {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 5}},
    )
    outputs = []
    for size in (1, 7, 64, len(sse)):
        stream = translate.NDJSONStream(translate.Answer("m", chat=True, started=time.perf_counter()))
        data = b"".join(stream.feed(sse[i : i + size]) for i in range(0, len(sse), size)) + stream.close()
        assert not stream.finished
        outputs.append(_lines(data))
    assert all(output == outputs[0] for output in outputs)
    lines = outputs[0]
    assert lines[0]["message"] == {"role": "assistant", "content": "", "thinking": "hm"}
    assert [line["message"]["content"] for line in lines[1:6]] == [f"t{i} é" for i in range(5)]
    assert lines[6]["message"]["tool_calls"] == [{"id": "c1", "function": {"index": 0, "name": "f", "arguments": {"x": 1}}}]
    assert lines[7]["done"] is True and lines[7]["eval_count"] == 5 and len(lines) == 8


def test_ndjson_stream_ends_at_an_error_event() -> None:
    stream = translate.NDJSONStream(translate.Answer("m", chat=False, started=time.perf_counter()))
    burst = b'data: {"choices": [{"text": "a"}]}\n\nerror: {"message": "boom"}\n\ndata: {"choices": [{"text": "b"}]}\n'
    data = stream.feed(burst)
    assert stream.finished
    data += stream.feed(b'data: {"choices": [{"text": "c"}]}\n') + stream.close()
    assert [line.get("response", line.get("error")) for line in _lines(data)] == ["a", "boom"]


def test_ndjson_stream_without_done_ends_with_an_error_not_done() -> None:
    """An upstream body that ended cleanly but before its data: [DONE] (or is not SSE at all) is not finished."""
    for body in (b'data: {"choices": [{"delta": {"content": "a"}}]}\n\n', b'{"choices": [{"message": {}}]}'):
        stream = translate.NDJSONStream(translate.Answer("m", chat=True, started=time.perf_counter()))
        data = stream.feed(body) + stream.close()
        lines = _lines(data)
        assert "no data: [DONE]" in lines[-1]["error"] and not any(line.get("done") for line in lines)
        assert stream.finished


def test_ndjson_stream_that_fails_drops_its_partial_line() -> None:
    stream = translate.NDJSONStream(translate.Answer("m", chat=True, started=time.perf_counter()))
    data = stream.feed(b'data: {"choices": [{"delta": {"content": "a"}}]}\n\ndata: {"choi')
    data += stream.fail("the upstream stream broke off: ReadError")
    assert stream.finished and stream.feed(b'ces": []}\n\n') == b"" and stream.close() == b""
    assert [line.get("error") for line in _lines(data)] == [None, "the upstream stream broke off: ReadError"]


def test_ndjson_stream_refuses_a_line_longer_than_its_limit() -> None:
    stream = translate.NDJSONStream(translate.Answer("m", chat=True, started=time.perf_counter()), max_line=1000)
    assert stream.feed(b"data: " + b"x" * 900) == b""
    (line,) = _lines(stream.feed(b"x" * 200))
    assert "longer than 1000 bytes" in line["error"] and stream.finished


# ---- basics --------------------------------------------------------------------------------


async def test_root_head_and_version(make_config, start_proxy, http) -> None:
    url = await start_proxy(make_config({"m": {}}))
    response = await http.get(f"{url}/")
    assert response.status_code == 200 and response.text == "Ollama is running"
    assert (await http.head(f"{url}/")).status_code == 200
    version = (await http.get(f"{url}/api/version")).json()["version"]
    assert tuple(int(x) for x in version.split(".")) >= (0, 9, 0)


async def test_chat_not_streamed(make_config, start_proxy) -> None:
    url = await start_proxy(make_config({"m": {"tokens": 3}}))
    reply = await in_thread(with_client, url, lambda c: c.chat(model="m", messages=USER))
    assert reply.model == "m"
    assert reply.message.role == "assistant" and reply.message.content == "tok0 tok1 tok2 "
    assert reply.done is True and reply.done_reason == "length"
    assert reply.prompt_eval_count == 3 and reply.eval_count == 3
    assert reply.prompt_eval_duration == 1_500_000  # llama-server's timings, in nanoseconds
    assert reply.eval_duration == 750_000
    assert reply.load_duration > 0 and reply.total_duration >= reply.load_duration


async def test_chat_streamed_is_ndjson_ending_in_done(make_config, start_proxy, http) -> None:
    url = await start_proxy(make_config({"m": {"tokens": 4}}))
    parts = await in_thread(with_client, url, lambda c: c.chat(model="m:latest", messages=USER, stream=True))
    assert [p.message.content for p in parts[:-1]] == ["tok0 ", "tok1 ", "tok2 ", "tok3 "]
    assert all(p.done is False for p in parts[:-1])
    final = parts[-1]
    assert final.done is True and final.done_reason == "length" and final.message.content == ""
    assert final.eval_count == 4 and final.prompt_eval_count == 3 and final.total_duration > 0
    assert final.model == "m:latest"  # the name the client used
    # streaming is the default, and the lines are NDJSON
    async with http.stream("POST", f"{url}/api/chat", json={"model": "m", "messages": USER}) as response:
        assert response.headers["content-type"].startswith("application/x-ndjson")
        lines = [json.loads(line) async for line in response.aiter_lines() if line]
    assert len(lines) == 5 and lines[-1]["done"] is True


async def test_generate_templated_raw_and_system(make_config, start_proxy, http) -> None:
    url = await start_proxy(make_config({"m": {"tokens": 2}}))
    reply = await in_thread(with_client, url, lambda c: c.generate(model="m", prompt="Why?", system="Be brief."))
    assert reply.response == "tok0 tok1 " and reply.done and reply.eval_count == 2
    parts = await in_thread(with_client, url, lambda c: c.generate(model="m", prompt="<raw>", raw=True, stream=True))
    assert "".join(p.response for p in parts) == "tok0 tok1 " and parts[-1].done
    sent = await backend_requests(http, url, "m")
    assert sent[0]["path"] == "/v1/chat/completions"
    assert sent[0]["body"]["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Why?"},
    ]
    assert sent[1]["path"] == "/v1/completions" and sent[1]["body"]["prompt"] == "<raw>"
    assert sent[1]["body"]["stream"] is True


async def test_options_format_and_think_are_translated(make_config, start_proxy, http) -> None:
    url = await start_proxy(make_config({"m": {}}))
    options = {
        "temperature": 0.2, "top_p": 0.9, "top_k": 20, "min_p": 0.05, "seed": 7, "stop": "\n",
        "num_predict": 2, "repeat_penalty": 1.1, "presence_penalty": 0.5, "frequency_penalty": 0.25,
        "num_ctx": 8192, "num_thread": 2, "penalize_newline": True,
    }  # fmt: skip
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}

    def calls(c: ollama.Client) -> None:
        c.chat(model="m", messages=USER, options=options, format="json", think=False)
        c.chat(model="m", messages=USER, format=schema, options={"num_predict": -1})
        c.generate(model="m", prompt="x", raw=True, format=schema)

    await in_thread(with_client, url, calls)
    first, second, third = [r["body"] for r in await backend_requests(http, url, "m")]
    assert first["temperature"] == 0.2 and first["top_p"] == 0.9 and first["top_k"] == 20 and first["min_p"] == 0.05
    assert first["seed"] == 7 and first["stop"] == ["\n"] and first["max_tokens"] == 2
    assert first["repeat_penalty"] == 1.1 and first["presence_penalty"] == 0.5 and first["frequency_penalty"] == 0.25
    for ignored in ("num_ctx", "num_thread", "penalize_newline", "options"):
        assert ignored not in first
    assert first["response_format"] == {"type": "json_object"}
    assert first["chat_template_kwargs"] == {"enable_thinking": False}
    assert second["response_format"] == {"type": "json_schema", "json_schema": {"name": "format", "schema": schema}}
    assert "max_tokens" not in second  # num_predict -1: no limit
    assert third["json_schema"] == schema


async def test_thinking_and_tool_calls(make_config, start_proxy, http) -> None:
    behaviour = {"reasoning": "let me see", "tool_call": {"name": "add", "arguments": {"a": 1, "b": 2}}}
    url = await start_proxy(make_config({"m": behaviour}))
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object", "properties": {}}}}]
    reply = await in_thread(with_client, url, lambda c: c.chat(model="m", messages=USER, tools=tools, think=True))
    assert reply.message.thinking == "let me see"
    (call,) = reply.message.tool_calls
    assert call.function.name == "add" and dict(call.function.arguments) == {"a": 1, "b": 2}
    assert reply.done_reason == "stop"

    parts = await in_thread(with_client, url, lambda c: c.chat(model="m", messages=USER, tools=tools, stream=True))
    assert parts[0].message.thinking == "let me see"
    calls = [p.message.tool_calls for p in parts if p.message.tool_calls]
    assert len(calls) == 1 and dict(calls[0][0].function.arguments) == {"a": 1, "b": 2}  # fragments joined
    assert parts[-1].done

    # a tool result goes back with the call it answers
    history = [
        *USER,
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"function": {"name": "add", "arguments": {"a": 1, "b": 2}}}],
        },
        {"role": "tool", "content": "3", "tool_name": "add"},
    ]
    await in_thread(with_client, url, lambda c: c.chat(model="m", messages=history))
    sent = (await backend_requests(http, url, "m"))[-1]["body"]
    assert sent["messages"][1]["tool_calls"][0]["function"] == {"name": "add", "arguments": '{"a": 1, "b": 2}'}
    call_id = sent["messages"][1]["tool_calls"][0]["id"]
    assert sent["messages"][2] == {"role": "tool", "content": "3", "name": "add", "tool_call_id": call_id}
    first = (await backend_requests(http, url, "m"))[0]["body"]
    assert first["chat_template_kwargs"] == {"enable_thinking": True} and first["tools"] == tools


async def test_images_need_a_vision_model(make_config, start_proxy, http) -> None:
    url = await start_proxy(make_config({"text": {}, "eyes": {"vision": True}}))
    png = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
    messages = [{"role": "user", "content": "what is this?", "images": [png]}]
    with pytest.raises(ollama.ResponseError) as info:
        await in_thread(with_client, url, lambda c: c.chat(model="text", messages=messages))
    assert info.value.status_code == 400 and "cannot take images" in info.value.error
    reply = await in_thread(with_client, url, lambda c: c.generate(model="eyes", prompt="what?", images=[png]))
    assert reply.done
    content = (await backend_requests(http, url, "eyes"))[0]["body"]["messages"][0]["content"]
    assert content == [
        {"type": "text", "text": "what?"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}"}},
    ]


async def test_a_projector_makes_a_vision_model(make_config, start_proxy, http, tmp_path: Path) -> None:
    """``mmproj`` in the section (the usual way) shows ``vision`` like ``--mmproj`` in ``args``, and takes images."""
    projector = tmp_path / "mmproj-eyes.gguf"
    projector.write_bytes(b"a projector")
    models = {"eyes": {"vision": True}, "flagged": {"vision": True}, "text": {}}
    options = {"eyes": {"mmproj": projector.name}, "flagged": {"args": f"--mmproj {projector}"}}
    url = await start_proxy(make_config(models, model_options=options))
    shown = {name: await in_thread(with_client, url, lambda c, name=name: c.show(name)) for name in models}
    assert {name: reply.capabilities for name, reply in shown.items()} == {
        "eyes": ["completion", "vision"],
        "flagged": ["completion", "vision"],
        "text": ["completion"],
    }
    assert "# projector (--mmproj): mmproj-eyes.gguf" in shown["eyes"].modelfile
    png = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
    reply = await in_thread(with_client, url, lambda c: c.generate(model="eyes", prompt="what?", images=[png]))
    assert reply.done
    (server,) = (await http.get(f"{url}/health")).json()["pool"]["servers"]
    props = (await http.get(f"http://127.0.0.1:{server['port']}/props")).json()
    assert props["mmproj"] == str(projector)  # llama-server was given the projector


def test_capabilities_of_a_hugging_face_model_with_an_mmproj() -> None:
    from smart_proxy.config import ModelConfig
    from smart_proxy.handlers.ollama_routes import _capabilities

    with_projector = ModelConfig(name="v", repo="org/vision-GGUF", mmproj="mmproj-*.gguf")
    assert "vision" in _capabilities(with_projector, None)  # known from the section, before any download
    assert "vision" not in _capabilities(ModelConfig(name="t", repo="org/text-GGUF"), None)


# ---- keep_alive, preload, ps ----------------------------------------------------------------


async def _ps(url: str):
    return await in_thread(with_client, url, lambda c: c.ps())


async def test_keep_alive_zero_unloads_after_the_request(make_config, start_proxy) -> None:
    url = await start_proxy(make_config({"m": {}}))
    reply = await in_thread(with_client, url, lambda c: c.chat(model="m", messages=USER, keep_alive=0))
    assert reply.done
    assert (await _ps(url)).models == []


async def test_keep_alive_sets_expiry_shown_by_ps(make_config, start_proxy) -> None:
    url = await start_proxy(make_config({"m": {}}))
    await in_thread(with_client, url, lambda c: c.generate(model="m", prompt="x", keep_alive="10m"))
    (entry,) = (await _ps(url)).models
    assert entry.name == "m:latest" and entry.model == "m:latest"
    left = (entry.expires_at - datetime.now(UTC)).total_seconds()
    assert 590 < left <= 600
    await in_thread(with_client, url, lambda c: c.generate(model="m", prompt="x", keep_alive=-1))
    (entry,) = (await _ps(url)).models
    assert entry.expires_at.year > 2200  # forever
    await in_thread(with_client, url, lambda c: c.generate(model="m", prompt="x", keep_alive="1h30m"))
    left = ((await _ps(url)).models[0].expires_at - datetime.now(UTC)).total_seconds()
    assert 5390 < left <= 5400


async def test_a_bad_keep_alive_is_refused_and_breaks_nothing_for_others(make_config, start_proxy, http) -> None:
    url = await start_proxy(make_config({"m": {}}))
    for keep_alive in ["nan", 1e12, "300000000000s", "inf"]:
        for path, body in [("/api/chat", {"messages": USER}), ("/api/generate", {"prompt": "x"}), ("/api/chat", {})]:
            response = await http.post(f"{url}{path}", json={"model": "m", "keep_alive": keep_alive, "stream": False, **body})
            assert response.status_code == 400 and "2562047h" in response.json()["error"], (keep_alive, response.text)
    await in_thread(with_client, url, lambda c: c.generate(model="m", prompt="x", keep_alive="2562047h"))
    ps = await http.get(f"{url}/api/ps")
    assert ps.status_code == 200 and ps.json()["models"][0]["expires_at"] > "2300"
    health = await http.get(f"{url}/health")
    json.loads(health.text, parse_constant=lambda name: pytest.fail(f"/health holds {name}"))


async def test_preload_and_unload_with_empty_requests(make_config, start_proxy, http) -> None:
    url = await start_proxy(make_config({"m": {}}))
    assert (await _ps(url)).models == []
    loaded = await in_thread(with_client, url, lambda c: c.generate(model="m"))
    assert loaded.done and loaded.done_reason == "load" and loaded.response == ""
    assert [m.name for m in (await _ps(url)).models] == ["m:latest"]
    unloaded = await in_thread(with_client, url, lambda c: c.chat(model="m", messages=[], keep_alive=0))
    assert unloaded.done_reason == "unload"
    assert (await _ps(url)).models == []
    assert (await http.get(f"{url}/health")).json()["pool"]["servers"] == []
    # unloading what is not loaded loads nothing
    await in_thread(with_client, url, lambda c: c.generate(model="m", keep_alive=0))
    assert (await http.get(f"{url}/health")).json()["pool"]["models"][0]["loads"] == 1
    # a chat preload
    loaded = await in_thread(with_client, url, lambda c: c.chat(model="m", messages=[]))
    assert loaded.done_reason == "load" and loaded.message.content == ""
    assert len((await _ps(url)).models) == 1


# ---- embeddings -----------------------------------------------------------------------------


async def test_embed_and_legacy_embeddings(make_config, start_proxy) -> None:
    config = make_config({"e": {}, "chat": {}}, model_options={"e": {"embeddings": "true"}})
    url = await start_proxy(config)
    reply = await in_thread(with_client, url, lambda c: c.embed(model="e", input=["a", "b"]))
    assert reply.model == "e" and len(reply.embeddings) == 2
    assert reply.embeddings[0] == pytest.approx([0.1, 0.2, 0.3])
    assert reply.prompt_eval_count == 1 and reply.total_duration > 0
    short = await in_thread(with_client, url, lambda c: c.embed(model="e", input="a", dimensions=2))
    (vector,) = short.embeddings
    assert len(vector) == 2 and math.isclose(math.hypot(*vector), 1.0)
    legacy = await in_thread(with_client, url, lambda c: c.embeddings(model="e", prompt="a"))
    assert legacy.embedding == pytest.approx([0.1, 0.2, 0.3])
    with pytest.raises(ollama.ResponseError) as info:
        await in_thread(with_client, url, lambda c: c.embed(model="chat", input="a"))
    assert info.value.status_code == 400 and "does not support embeddings" in info.value.error
    # llama-server --embeddings still generates
    assert (await in_thread(with_client, url, lambda c: c.chat(model="e", messages=USER))).done


# ---- models ---------------------------------------------------------------------------------


async def test_tags_show_and_ps(make_config, start_proxy) -> None:
    url = await start_proxy(make_config({"a": {}, "b": {}}, model_options={"a": {"args": "--ctx-size 2048"}}))
    listed = await in_thread(with_client, url, lambda c: c.list())
    assert [m.model for m in listed.models] == ["a:latest", "b:latest"]
    assert all(m.size > 0 and len(m.digest) == 64 and m.details.format == "gguf" for m in listed.models)
    shown = await in_thread(with_client, url, lambda c: c.show("a"))
    assert shown.capabilities == ["completion"] and shown.parameters == ""
    assert "llama-server args: --ctx-size 2048" in shown.modelfile and shown.modelinfo == {}
    await in_thread(with_client, url, lambda c: c.generate(model="b", prompt="x"))
    (running,) = (await _ps(url)).models
    assert running.model == "b:latest" and running.context_length == 4096 and running.expires_at.year > 2200
    (server,) = (await in_thread(lambda: httpx.get(f"{url}/health").json()))["pool"]["servers"]
    assert running.size == server["memory"] > 0 and running.size_vram == 0


async def test_ps_and_health_show_what_is_on_the_gpus(make_config, start_proxy) -> None:
    config = make_config(
        {"a": {}, "huge": {}},
        model_options={"a": {"memory": "6g"}, "huge": {"memory": "40g", "layers": "80", "allow_partial": "true"}},
        gpus="0:24GiB, 1:8GiB",
        memory="off",
    )
    url = await start_proxy(config)
    for name in ("a", "huge"):
        await in_thread(with_client, url, lambda c, name=name: c.generate(model=name, prompt="x"))
    running = {m.model: m for m in (await _ps(url)).models}
    gib = 1024**3
    assert (running["a:latest"].size, running["a:latest"].size_vram) == (6 * gib, 6 * gib)  # whole on GPU 1
    assert (running["huge:latest"].size, running["huge:latest"].size_vram) == (40 * gib, 26 * gib)  # 52 of 80 layers
    pool = (await in_thread(lambda: httpx.get(f"{url}/health").json()))["pool"]
    assert pool["gpus"] == [{"index": 0, "memory": 24 * gib, "used": 24 * gib}, {"index": 1, "memory": 8 * gib, "used": 8 * gib}]
    servers = {s["model"]: s for s in pool["servers"]}
    assert (servers["a"]["gpus"], servers["a"]["vram"], servers["a"]["memory"]) == ([1], 6 * gib, 0)
    assert (servers["huge"]["gpus"], servers["huge"]["gpu_layers"], servers["huge"]["memory"]) == ([0, 1], 52, 14 * gib)
    listed = {m["id"]: m for m in (await in_thread(lambda: httpx.get(f"{url}/v1/models").json()))["data"]}
    assert (listed["a"]["memory"], listed["huge"]["memory"]) == (6 * gib, 40 * gib)  # host and GPU parts together


async def test_model_info_from_a_real_gguf_header(tmp_path: Path) -> None:
    import gguf

    from smart_proxy.modelinfo import read_model_info

    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(8192)
    writer.add_file_type(15)
    writer.add_uint64("general.parameter_count", 268_098_176)
    writer.add_chat_template("{% for m in messages %}{{ m.content }}{% endfor %}{{ tools }}")
    writer.add_token_list([f"t{i}" for i in range(1000)])
    writer.add_token_scores([0.0] * 1000)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    info = read_model_info(str(path))
    assert info.is_gguf and info.architecture == "llama" and info.context_length == 8192
    assert info.details()["quantization_level"] == "Q4_K_M" and info.details()["parameter_size"] == "268.10M"
    assert info.metadata["tokenizer.ggml.tokens"] == [] and "tools" in info.chat_template
    not_gguf = tmp_path / "x.json"
    not_gguf.write_text("{}")
    assert read_model_info(str(not_gguf)).is_gguf is False


# ---- errors ---------------------------------------------------------------------------------


async def test_errors_are_ollama_shaped(make_config, start_proxy, http) -> None:
    url = await start_proxy(make_config({"m": {}, "r": {"reject": {"status": 400, "message": "exceeds the context"}}}))
    with pytest.raises(ollama.ResponseError) as info:
        await in_thread(with_client, url, lambda c: c.chat(model="nope", messages=USER))
    assert info.value.status_code == 404 and "not found" in info.value.error
    with pytest.raises(ollama.ResponseError) as info:
        await in_thread(with_client, url, lambda c: c.chat(model="r", messages=USER))
    assert info.value.status_code == 400 and info.value.error == "exceeds the context"
    cases = [
        ("/api/chat", b"{nope", 400, "not valid JSON"),
        ("/api/chat", json.dumps({"messages": USER}).encode(), 400, "model is required"),
        ("/api/chat", json.dumps({"model": "m", "messages": USER, "keep_alive": "soon"}).encode(), 400, "keep_alive"),
        ("/api/chat", json.dumps({"model": "m", "messages": "hi"}).encode(), 400, "messages must be a list"),
        (
            "/api/chat",
            json.dumps({"model": "m", "messages": [{"role": "assistant", "content": "", "tool_calls": 5}]}).encode(),
            400,
            "messages[0].tool_calls must be a list",
        ),
        (
            "/api/chat",
            json.dumps({"model": "m", "messages": USER, "options": {"temperature": "hot"}}).encode(),
            400,
            "options.temperature must be a number",
        ),
        ("/api/chat", json.dumps({"model": "m", "messages": USER, "format": "xml"}).encode(), 400, "format must be"),
        ("/api/chat", json.dumps({"model": "m", "messages": USER, "think": "maybe"}).encode(), 400, "think must be"),
        ("/api/generate", json.dumps({"model": "m", "prompt": "a", "suffix": "b"}).encode(), 400, "suffix"),
        (
            "/api/generate",
            json.dumps({"model": "m", "prompt": "a", "raw": True, "images": ["aGk="]}).encode(),
            400,
            "raw",
        ),
        ("/api/show", json.dumps({"model": "nope"}).encode(), 404, "not found"),
        ("/api/create", json.dumps({"model": "x"}).encode(), 501, "not supported"),
    ]
    for path, raw, status, text in cases:
        response = await http.post(f"{url}{path}", content=raw)
        assert response.status_code == status, (path, raw, response.text)
        assert text in response.json()["error"], (path, response.text)


async def test_pool_busy_is_503(make_config, start_proxy, http) -> None:
    url = await start_proxy(
        make_config({"a": {"token_delay": 0.2, "tokens": 5}, "b": {}}, size=1, queue_timeout="200ms")
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            partial(http.post, f"{url}/api/generate", json={"model": "a", "prompt": "x", "stream": False})
        )
        await trio.sleep(0.5)
        response = await http.post(f"{url}/api/generate", json={"model": "b", "prompt": "x"})
    assert response.status_code == 503 and "pool" in response.json()["error"]
    assert int(response.headers["retry-after"]) >= 1


async def test_waiting_for_a_slot_is_bounded_by_queue_timeout(make_config, start_proxy, http) -> None:
    """A READY server whose slots are all busy: the wait ends at queue_timeout with Ollama's 503 error."""
    url = await start_proxy(make_config({"a": {"slots": 1, "tokens": 10, "token_delay": 0.15}}, queue_timeout="300ms"))
    await http.post(f"{url}/api/generate", json={"model": "a"})  # load it
    first: list[dict] = []
    streaming = trio.Event()

    async def hold_the_slot() -> None:
        async with http.stream("POST", f"{url}/api/chat", json={"model": "a", "messages": USER}) as response:
            async for line in response.aiter_lines():
                if line:
                    first.append(json.loads(line))
                    streaming.set()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(hold_the_slot)
            await streaming.wait()
            for route, body in (("/api/generate", {"prompt": "y"}), ("/api/chat", {"messages": USER, "stream": False})):
                response = await http.post(f"{url}{route}", json={"model": "a", **body})
                assert response.status_code == 503, response.text
                assert "queue_timeout (0.3s)" in response.json()["error"]
                assert int(response.headers["retry-after"]) >= 1
            assert not any(line.get("done") for line in first)  # answered while the slot was still held
    assert "".join(line["message"]["content"] for line in first) == "".join(f"tok{i} " for i in range(10))
    assert first[-1]["done"] is True
    reply = await in_thread(with_client, url, lambda c: c.generate(model="a", prompt="x", options={"num_predict": 1}))
    assert reply.done and reply.response == "tok0 "


async def test_stream_breaking_off_ends_with_an_error_line(make_config, start_proxy, http) -> None:
    url = await start_proxy(make_config({"m": {"tokens": 10, "break_after": 2, "token_delay": 0.01}}))
    with pytest.raises(ollama.ResponseError, match="broke off"):
        await in_thread(with_client, url, lambda c: c.chat(model="m", messages=USER, stream=True))
    async with http.stream("POST", f"{url}/api/generate", json={"model": "m", "prompt": "x"}) as response:
        lines = [json.loads(line) async for line in response.aiter_lines() if line]
    assert [line.get("response") for line in lines[:2]] == ["tok0 ", "tok1 "]
    assert "error" in lines[-1] and not any(line.get("done") for line in lines)
    assert (await http.get(f"{url}/health")).json()["pool"]["servers"][0]["in_flight"] == 0


async def test_client_leaving_mid_stream_frees_the_server(make_config, start_proxy, http) -> None:
    url = await start_proxy(make_config({"m": {"token_delay": 0.1, "tokens": 100}}))
    async with http.stream("POST", f"{url}/api/chat", json={"model": "m", "messages": USER}) as response:
        async with aclosing(response.aiter_lines()) as lines:
            async for _ in lines:
                break  # leave after the first line
    port = (await http.get(f"{url}/health")).json()["pool"]["servers"][0]["port"]
    with trio.fail_after(3):
        while True:
            slots = (await http.get(f"http://127.0.0.1:{port}/slots")).json()
            in_flight = (await http.get(f"{url}/health")).json()["pool"]["servers"][0]["in_flight"]
            if not any(slot["is_processing"] for slot in slots) and in_flight == 0:
                break
            await trio.sleep(0.05)


# ---- the asyncio client; and both dialects at once ----------------------------------------


async def test_async_client(make_config, start_proxy) -> None:
    url = await start_proxy(make_config({"m": {"tokens": 2}}))
    reply = await in_thread(with_async_client, url, lambda c: c.chat(model="m", messages=USER))
    assert reply.message.content == "tok0 tok1 " and reply.done
    parts = await in_thread(with_async_client, url, lambda c: c.generate(model="m", prompt="x", stream=True))
    assert "".join(p.response for p in parts) == "tok0 tok1 " and parts[-1].done and parts[-1].eval_count == 2
    assert [m.model for m in (await in_thread(with_async_client, url, lambda c: c.ps())).models] == ["m:latest"]
    with pytest.raises(ollama.ResponseError) as info:
        await in_thread(with_async_client, url, lambda c: c.generate(model="nope", prompt="x"))
    assert info.value.status_code == 404


async def test_openai_and_ollama_clients_share_one_loaded_model(make_config, start_proxy, http) -> None:
    url = await start_proxy(make_config({"m": {"tokens": 5, "token_delay": 0.1, "slots": 2}}))
    texts: dict[str, str] = {}
    spans: dict[str, tuple[float, float]] = {}  # first and last piece received

    def openai_side() -> None:
        with openai.OpenAI(base_url=f"{url}/v1", api_key="none") as client:
            stream = client.chat.completions.create(model="m", messages=USER, stream=True)
            pieces = [
                (time.monotonic(), c.choices[0].delta.content)
                for c in stream
                if c.choices and c.choices[0].delta.content
            ]
        texts["openai"] = "".join(text for _, text in pieces)
        spans["openai"] = (pieces[0][0], pieces[-1][0])

    def ollama_side() -> None:
        with ollama.Client(host=url) as client:
            stream = client.chat(model="m", messages=USER, stream=True)
            pieces = [(time.monotonic(), p.message.content) for p in stream if p.message.content]
        texts["ollama"] = "".join(text for _, text in pieces)
        spans["ollama"] = (pieces[0][0], pieces[-1][0])

    async with trio.open_nursery() as nursery:
        nursery.start_soon(in_thread, openai_side)
        nursery.start_soon(in_thread, ollama_side)
    assert texts == {"openai": "tok0 tok1 tok2 tok3 tok4 ", "ollama": "tok0 tok1 tok2 tok3 tok4 "}
    (a_first, a_last), (b_first, b_last) = spans["openai"], spans["ollama"]
    assert a_first < b_last and b_first < a_last  # generated side by side, not one after the other
    health = (await http.get(f"{url}/health")).json()["pool"]
    assert len(health["servers"]) == 1 and health["models"][0]["loads"] == 1


# ---- the Ollama upstream backend ------------------------------------------------------------


def upstream_config(tmp_path: Path, fake_binary: str, upstream_url: str):
    local = tmp_path / "local.json"
    local.write_text("{}")
    return structure(
        {
            "pool": {"llama_server": fake_binary, "load_timeout": "10s"},
            "model:local": {"path": str(local)},
            "model:up": {"backend": "ollama", "url": upstream_url, "upstream_model": "remote-llm"},
            "model:up-embed": {"backend": "ollama", "url": upstream_url + "/", "upstream_model": "remote-embed:latest"},
        },
        base_dir=str(tmp_path),
    )


async def test_upstream_serves_ollama_clients_natively(tmp_path, fake_binary, start_proxy, fake_ollama) -> None:
    url = await start_proxy(upstream_config(tmp_path, fake_binary, fake_ollama.url))
    reply = await in_thread(with_client, url, lambda c: c.chat(model="up", messages=USER))
    assert reply.message.content == "piece0 piece1 piece2 " and reply.model == "remote-llm:latest"
    assert fake_ollama.requests[-1][:2] == ("POST", "/api/chat")
    assert fake_ollama.requests[-1][2]["model"] == "remote-llm"
    parts = await in_thread(with_client, url, lambda c: c.generate(model="up", prompt="x", stream=True))
    assert "".join(p.response for p in parts) == "piece0 piece1 piece2 " and parts[-1].done
    embedded = await in_thread(with_client, url, lambda c: c.embed(model="up-embed", input=["ab", "c"]))
    assert embedded.embeddings == [[0.5, 0.5, 2.0], [0.5, 0.5, 1.0]]
    assert (await in_thread(with_client, url, lambda c: c.embeddings(model="up-embed", prompt="x"))).embedding == [
        0.25,
        0.75,
    ]

    listed = {m.model: m for m in (await in_thread(with_client, url, lambda c: c.list())).models}
    assert set(listed) == {"local:latest", "up:latest", "up-embed:latest"}
    assert listed["up:latest"].details.family == "llama" and listed["up-embed:latest"].details.family == "bert"
    shown = await in_thread(with_client, url, lambda c: c.show("up"))
    assert shown.modelfile == "FROM remote-llm:latest\n"
    pulled = await in_thread(with_client, url, lambda c: c.pull("up", stream=True))
    assert [p.status for p in pulled] == ["pulling manifest", "verifying sha256 digest", "success"]
    assert (await in_thread(with_client, url, lambda c: c.delete("up"))).status == "success"
    assert fake_ollama.requests[-1] == ("DELETE", "/api/delete", {"model": "remote-llm"})
    running = [m.model for m in (await _ps(url)).models]
    assert running == ["up:latest"]  # loaded on the upstream by the chat above; nothing local
    # the local model still works beside it
    assert (await in_thread(with_client, url, lambda c: c.generate(model="local", prompt="x"))).done


async def test_upstream_stream_is_relayed_as_it_comes(tmp_path, fake_binary, start_proxy, fake_ollama, http) -> None:
    url = await start_proxy(upstream_config(tmp_path, fake_binary, fake_ollama.url))
    body = {"model": "up", "messages": [{"role": "user", "content": "hold"}]}
    async with http.stream("POST", f"{url}/api/chat", json=body) as response:
        lines = response.aiter_lines()
        with trio.fail_after(5):
            first = json.loads(await anext(lines))  # arrives while the upstream still holds the rest
        assert first["message"]["content"] == "piece0 " and not fake_ollama.gate.is_set()
        fake_ollama.release()
        rest = [json.loads(line) async for line in lines if line]
    assert rest[-1]["done"] is True and len(rest) == 3


async def test_openai_clients_reach_the_upstream_through_v1(
    tmp_path, fake_binary, start_proxy, fake_ollama, http
) -> None:
    url = await start_proxy(upstream_config(tmp_path, fake_binary, fake_ollama.url))

    def calls() -> tuple[str, str]:
        with openai.OpenAI(base_url=f"{url}/v1", api_key="none") as client:
            whole = client.chat.completions.create(model="up", messages=USER).choices[0].message.content
            stream = client.chat.completions.create(model="up", messages=USER, stream=True)
            return whole, "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    assert await in_thread(calls) == ("piece0 piece1 piece2 ", "piece0 piece1 piece2 ")
    assert (
        fake_ollama.requests[-1][1] == "/v1/chat/completions" and fake_ollama.requests[-1][2]["model"] == "remote-llm"
    )
    models = {m["id"]: m for m in (await http.get(f"{url}/v1/models")).json()["data"]}
    assert set(models) == {"local", "up", "up-embed"}
    assert models["up"]["owned_by"] == "ollama" and models["local"]["owned_by"] == "smart-proxy"


async def test_upstream_down_is_502_and_health_says_so(tmp_path, fake_binary, start_proxy, http) -> None:
    from smart_proxy.process import free_port

    dead = f"http://127.0.0.1:{free_port()}"
    url = await start_proxy(upstream_config(tmp_path, fake_binary, dead))
    with pytest.raises(ollama.ResponseError) as info:
        await in_thread(with_client, url, lambda c: c.chat(model="up", messages=USER))
    assert info.value.status_code == 502
    assert "Ollama upstream of model 'up' is unreachable" in info.value.error and "ConnectError" in info.value.error
    response = await http.post(f"{url}/v1/chat/completions", json={"model": "up", "messages": USER})
    assert response.status_code == 502 and "unreachable" in response.json()["error"]["message"]
    health = (await http.get(f"{url}/health")).json()
    assert health["status"] == "degraded"
    (upstream,) = health["upstreams"]
    assert upstream["url"] == dead and upstream["status"] == "down" and upstream["models"] == ["up", "up-embed"]
    assert "ConnectError" in upstream["error"]
    # still listed (so clients see it exists), and local models still serve
    listed = (await http.get(f"{url}/api/tags")).json()["models"]
    assert {m["name"] for m in listed} == {"local:latest", "up:latest", "up-embed:latest"}
    started = time.monotonic()
    assert (
        await http.post(f"{url}/api/generate", json={"model": "local", "prompt": "x", "stream": False})
    ).status_code == 200
    assert time.monotonic() - started < 5


# ---- /api/pull of Hugging Face models -------------------------------------------------------


def timed_pull(url: str, name: str) -> list[tuple[float, ollama.ProgressResponse]]:
    """``client.pull(name, stream=True)``: each progress object with the seconds after the call it came."""
    with ollama.Client(host=url) as client:
        start = time.monotonic()
        return [(time.monotonic() - start, part) for part in client.pull(name, stream=True)]


async def test_pull_streams_a_hugging_face_download_as_ollama_progress(
    hub, tmp_path, fake_binary, start_proxy, http
) -> None:
    from .test_download import REPO, TOKENS, blobs, gguf, make, tiny_repo

    tiny_repo(hub, pad=24 * 1024 * 1024)  # huggingface_hub reports every 10 MiB: progress before the end
    hub.faults.slow["tiny-Q4_K_M.gguf"] = 0.06  # ~1.5 s
    url = await start_proxy(make(tmp_path, fake_binary, {"tiny": {"repo": REPO}}))
    chats: list[httpx.Response] = []

    async def chat_meanwhile() -> None:
        await trio.sleep(0.3)  # the pull has started the download: this request waits for the same one
        chats.append(await http.post(f"{url}/api/chat", json={"model": "tiny", "messages": USER, "stream": False}))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(chat_meanwhile)
        timed = await in_thread(timed_pull, url, "tiny")
    statuses = [part.status for _, part in timed]
    assert statuses[0] == "pulling manifest" and statuses[-2:] == ["verifying sha256 digest", "success"]
    hub_file = hub.repos[REPO].files["tiny-Q4_K_M.gguf"]
    progress = [part for _, part in timed[1:-2]]
    assert progress and all(p.digest == f"sha256:{hub_file.sha256}" for p in progress)
    assert all(p.status == f"pulling {hub_file.sha256[:12]}" and p.total == hub_file.size for p in progress)
    completed = [p.completed for p in progress]
    assert completed == sorted(completed) and completed[-1] == hub_file.size
    assert any(0 < c < hub_file.size for c in completed), completed  # seen part way, not just at both ends
    times = [at for at, _ in timed]
    assert times[-1] - times[0] > 1.0, times  # streamed while it downloaded, not all at the end
    # one download for the pull and the chat; the file is in the HF cache and the chat was served from it
    assert hub.content_gets("tiny-Q4_K_M.gguf") == 1
    assert hub_file.sha256 in blobs(tmp_path)
    assert chats[0].status_code == 200 and chats[0].json()["eval_count"] == TOKENS["Q4_K_M"]
    assert len(hub_file.source) == len(gguf(TOKENS["Q4_K_M"], 24 * 1024 * 1024))
    # pulled again: nothing to download, every file already complete
    before = len(hub.requests)
    again = await in_thread(with_client, url, lambda c: c.pull("tiny", stream=True))
    assert [p.status for p in again] == ["pulling manifest", f"pulling {hub_file.sha256[:12]}", *statuses[-2:]]
    assert again[1].completed == again[1].total == hub_file.size
    assert len(hub.requests) == before


async def test_pull_not_streamed_answers_once_the_files_are_down(hub, tmp_path, fake_binary, start_proxy) -> None:
    from .test_download import REPO, blobs, make, tiny_repo

    tiny_repo(hub, pad=2 * 1024 * 1024)
    hub.faults.slow["tiny-Q8_0.gguf"] = 0.3
    config = make(tmp_path, fake_binary, {"split": {"repo": REPO, "file": "*F16-00001*", "mmproj": "mmproj-*"}})
    url = await start_proxy(config)
    reply = await in_thread(with_client, url, lambda c: c.pull("split", stream=False))
    assert reply.status == "success" and reply.digest is None
    files = hub.repos[REPO].files
    wanted = ["tiny-F16-00001-of-00003.gguf", "tiny-F16-00002-of-00003.gguf", "tiny-F16-00003-of-00003.gguf"]
    assert {files[name].sha256 for name in [*wanted, "mmproj-tiny-F16.gguf"]} <= set(blobs(tmp_path))
    # streamed, a split GGUF and its mmproj are one progress line each, in download order
    parts = await in_thread(with_client, url, lambda c: c.pull("split", stream=True))
    digests = [p.digest for p in parts if p.digest]
    assert digests == [f"sha256:{files[name].sha256}" for name in [*wanted, "mmproj-tiny-F16.gguf"]]


async def test_pull_failures_are_ollama_errors(hub, tmp_path, fake_binary, start_proxy) -> None:
    from .test_download import REPO, blobs, make, tiny_repo

    tiny_repo(hub)
    models = {"nope": {"repo": REPO, "quant": "Q2_K"}, "tiny": {"repo": REPO}}
    url = await start_proxy(make(tmp_path, fake_binary, models))
    with pytest.raises(ollama.ResponseError) as not_streamed:
        await in_thread(with_client, url, lambda c: c.pull("nope", stream=False))
    assert not_streamed.value.status_code == 404
    assert "no Q2_K GGUF in Hugging Face repo 'test-org/tiny-GGUF'" in not_streamed.value.error
    # streamed, the answer has begun (200) when the download fails: the error is the last line, as Ollama's
    with pytest.raises(ollama.ResponseError, match="no Q2_K GGUF"):
        await in_thread(with_client, url, lambda c: c.pull("nope", stream=True))
    hub.faults.corrupt.add("tiny-Q4_K_M.gguf")
    with pytest.raises(ollama.ResponseError, match=r"came down corrupt \(sha256"):
        await in_thread(with_client, url, lambda c: c.pull("tiny", stream=True))
    with pytest.raises(ollama.ResponseError) as corrupt:
        await in_thread(with_client, url, lambda c: c.pull("tiny", stream=False))
    assert corrupt.value.status_code == 502
    assert blobs(tmp_path) == []
    hub.faults.clear()  # nothing is remembered: the next pull downloads it
    assert (await in_thread(with_client, url, lambda c: c.pull("tiny", stream=False))).status == "success"
    assert hub.repos[REPO].files["tiny-Q4_K_M.gguf"].sha256 in blobs(tmp_path)


async def test_pull_of_a_local_model_is_success_at_once(make_config, start_proxy, http) -> None:
    url = await start_proxy(make_config({"m": {}}))
    assert [p.status for p in await in_thread(with_client, url, lambda c: c.pull("m", stream=True))] == ["success"]
    assert (await in_thread(with_client, url, lambda c: c.pull("m:latest"))).status == "success"
    assert (await http.get(f"{url}/health")).json()["pool"]["servers"] == []  # nothing was loaded


def test_pull_report_sends_each_file_when_it_moves() -> None:
    from smart_proxy.download import DownloadStatus, FileStatus

    report = translate.PullReport()
    a, b = FileStatus("a.gguf", "ab" * 32, 100, 0), FileStatus("b.gguf", None, 50, 50)
    first = report.update(DownloadStatus("downloading", (a, b)))
    assert first == [
        {"status": "pulling abababababab", "digest": "sha256:" + "ab" * 32, "total": 100, "completed": 0},
        {"status": "pulling b.gguf", "total": 50, "completed": 50},  # no hash known: by name, no digest
    ]
    assert report.update(DownloadStatus("downloading", (a, b))) == []
    moved = report.update(DownloadStatus("downloading", (attrs.evolve(a, completed=60), b)))
    assert moved == [{"status": "pulling abababababab", "digest": "sha256:" + "ab" * 32, "total": 100, "completed": 60}]
    assert report.update(DownloadStatus("resolving", ())) == []


async def test_a_hung_llama_server_gives_502_and_request_timeout_504_in_ollamas_dialect(
    make_config, start_proxy, http: httpx.AsyncClient
) -> None:
    config = make_config({"hung": {"hang_after": 0}}, health_interval="100ms", health_timeout="200ms", health_failures=2)
    url = await start_proxy(config)
    for stream in (False, True):
        with trio.fail_after(10):
            response = await http.post(
                f"{url}/api/chat", json={"model": "hung", "stream": stream, "messages": [{"role": "user", "content": "hi"}]}
            )
        assert response.status_code == 502
        assert isinstance(response.json()["error"], str)
    # a proxy of its own, probing at the default pace: only request_timeout can end this request
    url = await start_proxy(make_config({"limited": {"hang_after": 0}}, {"limited": {"request_timeout": "300ms"}}))
    with trio.fail_after(5):
        response = await http.post(f"{url}/api/generate", json={"model": "limited", "prompt": "x", "stream": False})
    assert response.status_code == 504
    assert "request_timeout" in response.json()["error"]


async def test_a_cold_burst_to_an_upstream_that_resets_connections_gets_no_error(
    tmp_path, fake_binary, start_proxy, fake_ollama, http
) -> None:
    url = await start_proxy(upstream_config(tmp_path, fake_binary, fake_ollama.url))
    fake_ollama.reset_next(8)  # the first 8 connections the proxy opens are reset, unanswered
    statuses = []

    async def one(n: int) -> None:
        body = {"model": "up", "messages": USER, "stream": n % 2 == 0}
        response = await http.post(f"{url}/api/chat", json=body)
        statuses.append(response.status_code if '"error"' not in response.text else response.text)

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            for n in range(64):
                nursery.start_soon(one, n)
    assert [status for status in statuses if status != 200] == []
    assert len(statuses) == 64 and fake_ollama.resets == 0  # the resets happened


async def test_connections_to_an_upstream_are_opened_a_few_at_a_time(fake_ollama, http) -> None:
    from smart_proxy.upstream import ollama_server as backend

    model = ModelConfig(name="up", backend="ollama", url=fake_ollama.url, upstream_model="remote-llm")
    fake_ollama.reset_next(4)

    async def one() -> None:
        upstream = await backend.send(http, model, "POST", "/api/chat", payload={"messages": USER, "stream": False})
        assert upstream.status_code == 200
        await upstream.read()

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            for _ in range(64):
                nursery.start_soon(one)
    gate = backend._gate(http, fake_ollama.url)
    assert 1 <= gate.peak <= backend.OPENING and gate.opening == 0
    assert fake_ollama.resets == 0


async def test_an_upstream_model_answers_504_past_its_request_timeout(http) -> None:
    from smart_proxy.errors import UpstreamTimeout
    from smart_proxy.upstream import ollama_server as backend

    [listener] = await trio.open_tcp_listeners(0, host="127.0.0.1")  # accepts (the kernel does), never answers
    port = listener.socket.getsockname()[1]
    model = ModelConfig(name="up", backend="ollama", url=f"http://127.0.0.1:{port}", request_timeout=0.3)
    with trio.fail_after(5), pytest.raises(UpstreamTimeout, match=r"request_timeout \(0.3s\)"):
        await backend.send(http, model, "POST", "/api/chat", payload={"messages": USER})
    await listener.aclose()


async def test_health_upstreams_probes_every_upstream_now(tmp_path, fake_binary, start_proxy, fake_ollama, http) -> None:
    """``GET /health/upstreams``: each Ollama upstream asked now, with its models, and why a down one is down."""
    from smart_proxy.process import free_port

    dead = f"http://127.0.0.1:{free_port()}"
    config = upstream_config(tmp_path, fake_binary, fake_ollama.url)
    models = {**config.models, "gone": attrs.evolve(config.models["up"], name="gone", url=dead)}
    url = await start_proxy(attrs.evolve(config, models=models))
    response = await http.get(f"{url}/health/upstreams")
    assert response.status_code == 200
    by_url = {entry["url"]: entry for entry in response.json()["upstreams"]}
    assert set(by_url) == {fake_ollama.url.rstrip("/"), dead}
    up = by_url[fake_ollama.url.rstrip("/")]
    assert up["status"] == "ok" and up["models"] == ["up", "up-embed"] and isinstance(up["version"], str)
    down = by_url[dead]
    assert down["status"] == "down" and down["models"] == ["gone"] and "ConnectError" in down["error"]
