"""Tools and images end to end: the openai and ollama clients, the proxy as a process, the real
llama-server and the real gemma-3-270m model with the shipped chat template that has tools
(templates/gemma3-tools.jinja).

A 270M model says odd things, so the tests hold it to the shape of what it says, not to its
words: llama-server constrains a tool call to the tools' JSON schema, so a call names a
function that was offered and its arguments are a JSON object with the required fields.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import ollama
import openai
import pytest

from ..conftest import ProxyProcess

pytestmark = pytest.mark.real

TEMPLATE = Path(__file__).parents[2] / "templates" / "gemma3-tools.jinja"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
#: Enough for what the model writes before its call, and the call.
MAX_TOKENS = 80
PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="


@pytest.fixture(scope="module")
def proxy(tmp_path_factory, llama_server_binary: str, gemma_path: str):
    tmp = tmp_path_factory.mktemp("tools-real")
    ini = tmp / "proxy.ini"
    ini.write_text(
        f"""
[pool]
size = 1
llama_server = {llama_server_binary}
load_timeout = 60s
[model:gemma]
path = {gemma_path}
chat_template = {TEMPLATE}
args = --ctx-size 2048 --parallel 1
"""
    )
    proxy = ProxyProcess(ini, tmp / "proxy.log")
    yield proxy
    proxy.stop()


@pytest.fixture(scope="module")
def client(proxy: ProxyProcess):
    with openai.OpenAI(base_url=f"{proxy.url}/v1", api_key="unused", max_retries=0, timeout=300) as client:
        yield client


@pytest.fixture(scope="module")
def ollama_client(proxy: ProxyProcess):
    with ollama.Client(host=proxy.url, timeout=300) as client:
        yield client


def a_weather_call(name: str, arguments: object) -> None:
    """The shape the schema asks for: get_weather, with a city."""
    assert name == "get_weather"
    assert isinstance(arguments, dict) and isinstance(arguments.get("city"), str), arguments


def weather_calls(calls: list[tuple[str, str]], finish: str | None) -> None:
    """OpenAI calls (name, arguments as JSON text) of an answer that ended with ``finish``: each a weather call.

    The model tends to call again and again until ``max_tokens``; llama-server then gives the
    call it was writing as far as it got, under ``finish_reason: length``: only that last one
    may be cut short.
    """
    assert calls and finish in ("tool_calls", "length")
    whole = calls[:-1] if finish == "length" else calls
    assert whole, f"no complete call before the token limit: {calls}"
    for name, arguments in whole:
        a_weather_call(name, json.loads(arguments))
    assert calls[-1][0] == "get_weather"


def llama_server_port(proxy: ProxyProcess) -> int:
    servers = httpx.get(f"{proxy.url}/health").json()["pool"]["servers"]
    return next(s["port"] for s in servers if s["model"] == "gemma")


def test_openai_tool_call_whole(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model="gemma", messages=ASK, tools=[WEATHER], tool_choice="required", max_tokens=MAX_TOKENS, temperature=0
    )
    (choice,) = reply.choices
    calls = choice.message.tool_calls or []
    assert all(call.type == "function" and call.id for call in calls)
    weather_calls([(call.function.name, call.function.arguments) for call in calls], choice.finish_reason)


def test_openai_tool_call_streamed(client: openai.OpenAI) -> None:
    calls: dict[int, dict] = {}
    finish = None
    with client.chat.completions.create(
        model="gemma",
        messages=ASK,
        tools=[WEATHER],
        tool_choice="required",
        max_tokens=MAX_TOKENS,
        temperature=0,
        stream=True,
    ) as stream:
        for chunk in stream:
            for choice in chunk.choices:
                finish = choice.finish_reason or finish
                for call in choice.delta.tool_calls or []:
                    slot = calls.setdefault(call.index, {"name": "", "arguments": "", "id": None})
                    slot["id"] = call.id or slot["id"]
                    if call.function is not None:
                        slot["name"] += call.function.name or ""
                        slot["arguments"] += call.function.arguments or ""
    assert all(slot["id"] for slot in calls.values())
    weather_calls([(calls[i]["name"], calls[i]["arguments"]) for i in sorted(calls)], finish)


def test_openai_tool_result_reaches_the_model(client: openai.OpenAI, proxy: ProxyProcess) -> None:
    history = [
        *ASK,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees and sunny"},
    ]
    reply = client.chat.completions.create(model="gemma", messages=history, tools=[WEATHER], max_tokens=24, temperature=0)
    assert reply.choices[0].message.content is not None or reply.choices[0].message.tool_calls
    # what the model read: the call in its turn, the result in the template's <tool_response>
    port = llama_server_port(proxy)
    prompt = httpx.post(f"http://127.0.0.1:{port}/apply-template", json={"messages": history, "tools": [WEATHER]}).json()[
        "prompt"
    ]
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in prompt
    assert "<start_of_turn>user\n<tool_response>\n18 degrees and sunny\n</tool_response><end_of_turn>" in prompt
    assert reply.usage.prompt_tokens > 40


def test_ollama_tool_call_whole_and_streamed(ollama_client: ollama.Client) -> None:
    options = {"temperature": 0, "num_predict": MAX_TOKENS}
    reply = ollama_client.chat(model="gemma", messages=ASK, tools=[WEATHER], options=options)
    assert reply.message.tool_calls, reply.message
    for call in reply.message.tool_calls:
        a_weather_call(call.function.name, dict(call.function.arguments))
    assert reply.done

    parts = list(ollama_client.chat(model="gemma", messages=ASK, tools=[WEATHER], options=options, stream=True))
    calls = [call for part in parts for call in (part.message.tool_calls or [])]
    assert calls and parts[-1].done
    for call in calls:
        a_weather_call(call.function.name, dict(call.function.arguments))


def test_ollama_tool_result_goes_back(ollama_client: ollama.Client) -> None:
    history = [
        *ASK,
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
        },
        {"role": "tool", "content": "18 degrees and sunny", "tool_name": "get_weather"},
    ]
    reply = ollama_client.chat(model="gemma", messages=history, tools=[WEATHER], options={"num_predict": 24})
    assert reply.done and reply.prompt_eval_count > 40
    assert reply.message.content or reply.message.tool_calls


def test_images_to_a_model_without_a_projector_are_refused_in_each_dialect(
    client: openai.OpenAI, ollama_client: ollama.Client
) -> None:
    content = [
        {"type": "text", "text": "What is in this picture?"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
    ]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="gemma", messages=[{"role": "user", "content": content}], max_tokens=4)
    assert '"gemma" cannot take images' in info.value.message  # not llama-server's 500
    with pytest.raises(ollama.ResponseError) as refused:
        ollama_client.chat(model="gemma", messages=[{"role": "user", "content": "What is this?", "images": [PNG]}])
    assert refused.value.status_code == 400 and '"gemma" cannot take images' in refused.value.error
