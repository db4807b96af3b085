"""The demo's readers and table (smart_proxy/demo.py): each dialect's answer judged from its bytes."""

from __future__ import annotations

import json

import pytest

from smart_proxy.demo import (
    Failed,
    Row,
    demo_ini,
    read_anthropic,
    read_anthropic_stream,
    read_ollama_stream,
    read_openai,
    read_openai_stream,
    read_responses,
    render,
)


def sse(*events: dict | str, comments: tuple[str, ...] = ()) -> bytes:
    out = "".join(f": {c}\n\n" for c in comments)
    for event in events:
        out += f"data: {event if isinstance(event, str) else json.dumps(event)}\n\n"
    return out.encode()


def named(*events: tuple[str, dict]) -> bytes:
    return "".join(f"event: {name}\ndata: {json.dumps(data)}\n\n" for name, data in events).encode()


def chunk(content: str | None = None, finish: str | None = None) -> dict:
    delta = {"content": content} if content is not None else {}
    return {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def test_openai_whole_answer() -> None:
    body = json.dumps({"choices": [{"message": {"content": "Red."}, "finish_reason": "stop"}]}).encode()
    assert read_openai(body).text == "Red."
    blank = json.dumps({"choices": [{"message": {"content": "  "}, "finish_reason": "stop"}]}).encode()
    with pytest.raises(Failed, match="empty answer"):
        read_openai(blank)
    with pytest.raises(Failed, match="not a chat completion"):
        read_openai(b'{"error": {"message": "no"}}')
    with pytest.raises(Failed, match="not JSON"):
        read_openai(b"<html>")


def test_openai_stream_counts_comments_and_needs_done() -> None:
    raw = sse(chunk("Red"), chunk(", blue"), chunk(finish="length"), "[DONE]", comments=("loading a 0 s", "loading a 1 s"))
    reading = read_openai_stream(raw)
    assert (reading.text, reading.finish, reading.comments) == ("Red, blue", "length", 2)
    with pytest.raises(Failed, match=r"\[DONE\]"):
        read_openai_stream(sse(chunk("Red"), chunk(finish="stop")))  # cut short
    with pytest.raises(Failed, match="error event"):
        read_openai_stream(sse({"error": {"message": "boom"}}, "[DONE]"))
    with pytest.raises(Failed, match="no finish reason"):
        read_openai_stream(sse(chunk("Red"), "[DONE]"))


def test_ollama_stream_needs_done_true() -> None:
    lines = [{"message": {"content": "Red"}, "done": False}, {"message": {"content": ""}, "done": True, "done_reason": "stop"}]
    raw = b"\n".join(json.dumps(line).encode() for line in lines) + b"\n"
    assert read_ollama_stream(raw).text == "Red"
    with pytest.raises(Failed, match="done: true"):
        read_ollama_stream(raw.splitlines()[0])
    with pytest.raises(Failed, match="error line"):
        read_ollama_stream(b'{"error": "boom"}\n{"done": true, "done_reason": "stop"}\n')


def test_anthropic_message_and_stream() -> None:
    message = {"type": "message", "content": [{"type": "text", "text": "Red."}], "stop_reason": "end_turn"}
    assert read_anthropic(json.dumps(message).encode()).finish == "end_turn"
    with pytest.raises(Failed, match="not a message"):
        read_anthropic(b'{"type": "error", "error": {"type": "api_error", "message": "no"}}')
    events = [
        ("message_start", {"type": "message_start", "message": {}}),
        ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Red"}}),
        ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "max_tokens"}}),
        ("message_stop", {"type": "message_stop"}),
    ]
    reading = read_anthropic_stream(b": loading a 0 s\n\n" + named(*events))
    assert (reading.text, reading.finish, reading.comments) == ("Red", "max_tokens", 1)
    with pytest.raises(Failed, match="message_stop"):
        read_anthropic_stream(named(*events[:3]))
    with pytest.raises(Failed, match="error event"):
        read_anthropic_stream(named(("error", {"type": "error", "error": {"message": "boom"}}), events[3]))


def test_responses_needs_completed() -> None:
    output = [{"type": "message", "content": [{"type": "output_text", "text": "Red."}]}]
    assert read_responses(json.dumps({"status": "completed", "output": output}).encode()).text == "Red."
    with pytest.raises(Failed, match="incomplete"):
        read_responses(json.dumps({"status": "incomplete", "output": output}).encode())


def test_the_table_and_its_verdict() -> None:
    rows = [
        Row("cold load", "openai stream", "demo-a", 200, 1234.4, 2345.6, note='"Red."'),
        Row("swap", "ollama", "demo-b", 500, None, 10.0, problem="HTTP 500: boom"),
        Row("agent /json", "anthropic", "demo-a", skipped="no agents folder"),
    ]
    text = render(rows)
    lines = text.splitlines()
    assert lines[0].split() == ["STEP", "DIALECT", "MODEL", "STATUS", "FIRST", "ms", "TOTAL", "ms", "RESULT", "NOTE"]
    assert lines[1].split()[-3:] == ["2346", "ok", '"Red."'] and "1234" in lines[1]
    assert lines[2].split()[-2:] == ["10", "FAIL"]
    assert "skip" in lines[3]
    assert "1 of 2 passed, 1 skipped" in text
    assert "FAIL swap (ollama, demo-b): HTTP 500: boom" in text and "skip agent /json: no agents folder" in text
    assert [row.passed for row in rows] == [True, False, False]


def test_the_config_serves_one_model_under_two_names_in_a_pool_of_one(tmp_path) -> None:
    from smart_proxy.config import load_config

    ini = tmp_path / "proxy.ini"
    ini.write_text(demo_ini("/bin/true", None))
    config = load_config(ini)
    assert config.pool.size == 1 and sorted(config.models) == ["demo-a", "demo-b"]
    assert config.models["demo-a"].path == config.models["demo-b"].path


def test_a_proxy_that_cannot_start_is_exit_2(capsys) -> None:
    from smart_proxy import demo

    assert demo.run(llama_server="/nonexistent/llama-server") == 2
    assert "the proxy did not start: [pool] llama_server" in capsys.readouterr().err
