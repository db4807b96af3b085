"""Tools and images through the OpenAI and Ollama dialects, with the official clients.

Local models are the fake llama-server (``tool_call`` makes a chat that offers tools
answer with calls; it records every body it gets and its command line); models of an
Ollama upstream are :mod:`tests.fake_ollama`. Each test follows one path end to end: the
request as the client sends it, what reaches the upstream (in the upstream's shapes), and
the answer as the client reads it, streamed and whole.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import ollama
import openai
import pytest

from smart_proxy.config import ModelConfig, structure
from smart_proxy.download import RepoFile, find_projector, select

from .test_agents import marker, with_agents, write_agent
from .test_ollama import backend_requests, in_thread, with_client

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "add",
            "description": "Add two numbers",
            "parameters": {"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}},
        },
    },
    {
        "type": "function",
        "function": {"name": "mul", "parameters": {"type": "object", "properties": {"a": {}, "b": {}}}},
    },
]
#: Two calls in parallel: the fake streams them in fragments, interleaved.
CALLS = [{"name": "add", "arguments": {"a": 1, "b": 2}}, {"name": "mul", "arguments": {"a": 3, "b": 4}}]
PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
JPEG = "/9j/4AAQSkZJRgABAQAAAQABAAD/2wBDAAgGBgcGBQgHBwcJCQgKDA=="
USER = [{"role": "user", "content": "what is 1 + 2, and 3 * 4?"}]


def openai_call(url: str, call, headers: dict[str, str] | None = None):
    """``call(client)`` with a fresh sync OpenAI client; a stream is read to its end (a list of chunks)."""
    with openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, default_headers=headers) as client:
        result = call(client)
        return list(result) if isinstance(result, openai.Stream) else result


def gathered(chunks) -> tuple[list[tuple[str, dict]], str | None, str]:
    """A streamed chat's tool calls (fragments joined by index, as the OpenAI SDK documents), finish reason, text."""
    calls: dict[int, dict] = {}
    finish, text = None, ""
    for chunk in chunks:
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            text += choice.delta.content or ""
            for call in choice.delta.tool_calls or []:
                slot = calls.setdefault(call.index, {"id": None, "name": "", "arguments": ""})
                slot["id"] = call.id or slot["id"]
                if call.function is not None:
                    slot["name"] += call.function.name or ""
                    slot["arguments"] += call.function.arguments or ""
    joined = [(calls[i]["name"], json.loads(calls[i]["arguments"])) for i in sorted(calls)]
    assert all(calls[i]["id"] for i in calls), calls  # every call has its id, to answer it by
    return joined, finish, text


def expected_calls() -> list[tuple[str, dict]]:
    return [(call["name"], call["arguments"]) for call in CALLS]


# ---- OpenAI: tools ---------------------------------------------------------------------------


async def test_openai_tool_calls_whole_and_streamed(make_config, start_proxy, http: httpx.AsyncClient) -> None:
    url = await start_proxy(make_config({"m": {"tool_call": CALLS}}))
    ask = {"model": "m", "messages": USER, "tools": TOOLS, "tool_choice": "auto", "parallel_tool_calls": True}
    whole = await in_thread(openai_call, url, lambda c: c.chat.completions.create(**ask))
    (choice,) = whole.choices
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == expected_calls()
    assert all(c.type == "function" and c.id for c in calls)

    chunks = await in_thread(openai_call, url, lambda c: c.chat.completions.create(**ask, stream=True))
    assert gathered(chunks) == (expected_calls(), "tool_calls", "")

    # the tool results go back in the next request, byte for byte as OpenAI's shape (llama-server's own)
    history = [
        *USER,
        {"role": "assistant", "content": None, "tool_calls": [c.model_dump(exclude_none=True) for c in calls]},
        {"role": "tool", "tool_call_id": calls[0].id, "content": "3"},
        {"role": "tool", "tool_call_id": calls[1].id, "content": "12"},
    ]
    await in_thread(openai_call, url, lambda c: c.chat.completions.create(model="m", messages=history, tools=TOOLS))
    sent = await backend_requests(http, url, "m")
    assert sent[0]["body"]["tools"] == TOOLS and sent[0]["body"]["tool_choice"] == "auto"
    assert sent[-1]["body"]["messages"] == history


async def test_openai_tool_call_through_a_buffered_agent_chain(
    make_config, start_proxy, tmp_path: Path, http: httpx.AsyncClient
) -> None:
    """A chain with a response hook asks the model whole; its tool-call answer is replayed as SSE."""
    agents = tmp_path / "agents"
    write_agent(agents, "a", marker("a"))
    url = await start_proxy(with_agents(make_config({"m": {"tool_call": CALLS}}), agents, "a"))
    ask = {"model": "m", "messages": [{"role": "user", "content": "/a compute"}], "tools": TOOLS}
    chunks = await in_thread(openai_call, url, lambda c: c.chat.completions.create(**ask, stream=True))
    assert gathered(chunks) == (expected_calls(), "tool_calls", "<a>")
    whole = await in_thread(openai_call, url, lambda c: c.chat.completions.create(**ask))
    calls = whole.choices[0].message.tool_calls
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == expected_calls()
    sent = (await backend_requests(http, url, "m"))[-1]["body"]
    assert sent["tools"] == TOOLS and sent["stream"] is False  # asked whole, for the hook


# ---- OpenAI: images --------------------------------------------------------------------------


async def test_openai_images_reach_a_vision_model_and_others_refuse_them(
    make_config, start_proxy, http: httpx.AsyncClient
) -> None:
    url = await start_proxy(make_config({"eyes": {"vision": True}, "text": {}}))
    content = [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
    ]
    messages = [{"role": "user", "content": content}]
    reply = await in_thread(openai_call, url, lambda c: c.chat.completions.create(model="eyes", messages=messages))
    assert reply.choices[0].message.content
    assert (await backend_requests(http, url, "eyes"))[-1]["body"]["messages"] == messages

    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as info:
            await in_thread(
                openai_call, url, lambda c, s=stream: c.chat.completions.create(model="text", messages=messages, stream=s)
            )
        assert info.value.status_code == 400
        assert '"text" cannot take images' in info.value.message and "mmproj = auto" in info.value.message
    assert await backend_requests(http, url, "text") == []  # refused before llama-server saw it
    # text alone still goes
    reply = await in_thread(
        openai_call, url, lambda c: c.chat.completions.create(model="text", messages=[{"role": "user", "content": "hi"}])
    )
    assert reply.choices[0].message.content


async def test_images_in_a_buffered_agent_chain_are_checked_too(make_config, start_proxy, tmp_path: Path) -> None:
    agents = tmp_path / "agents"
    write_agent(agents, "a", marker("a"))
    url = await start_proxy(with_agents(make_config({"text": {}}), agents, "a"))
    content = [{"type": "text", "text": "/a look"}, {"type": "image_url", "image_url": {"url": "data:image/png;base64,"}}]
    with pytest.raises(openai.BadRequestError) as info:
        await in_thread(
            openai_call,
            url,
            lambda c: c.chat.completions.create(model="text", messages=[{"role": "user", "content": content}]),
        )
    assert '"text" cannot take images' in info.value.message


# ---- Ollama: tools ---------------------------------------------------------------------------


async def test_ollama_tool_calls_whole_and_streamed(make_config, start_proxy, http: httpx.AsyncClient) -> None:
    url = await start_proxy(make_config({"m": {"tool_call": CALLS}}))
    whole = await in_thread(with_client, url, lambda c: c.chat(model="m", messages=USER, tools=TOOLS))
    assert [(c.function.name, dict(c.function.arguments)) for c in whole.message.tool_calls] == expected_calls()
    assert whole.done and whole.done_reason == "stop"

    parts = await in_thread(with_client, url, lambda c: c.chat(model="m", messages=USER, tools=TOOLS, stream=True))
    with_calls = [p for p in parts if p.message.tool_calls]
    assert len(with_calls) == 1 and not with_calls[0].done  # the fragments, gathered into one message
    assert [(c.function.name, dict(c.function.arguments)) for c in with_calls[0].message.tool_calls] == expected_calls()
    assert parts[-1].done and parts[-1].done_reason == "stop"

    # the tool results go back; llama-server gets OpenAI's shapes, each result tied to its call
    history = [
        *USER,
        {"role": "assistant", "content": "", "tool_calls": [c.model_dump() for c in whole.message.tool_calls]},
        {"role": "tool", "content": "3", "tool_name": "add"},
        {"role": "tool", "content": "12", "tool_name": "mul"},
    ]
    await in_thread(with_client, url, lambda c: c.chat(model="m", messages=history, tools=TOOLS))
    sent = await backend_requests(http, url, "m")
    assert sent[0]["body"]["tools"] == TOOLS
    messages = sent[-1]["body"]["messages"]
    assistant = messages[1]
    assert [(c["type"], c["function"]["name"], json.loads(c["function"]["arguments"])) for c in assistant["tool_calls"]] == [
        ("function", name, arguments) for name, arguments in expected_calls()
    ]
    assert all(isinstance(c["function"]["arguments"], str) for c in assistant["tool_calls"])  # a JSON string, as OpenAI's
    ids = {c["function"]["name"]: c["id"] for c in assistant["tool_calls"]}
    assert messages[2] == {"role": "tool", "content": "3", "name": "add", "tool_call_id": ids["add"]}
    assert messages[3] == {"role": "tool", "content": "12", "name": "mul", "tool_call_id": ids["mul"]}


async def test_a_broken_tool_call_ends_the_stream_with_an_error(make_config, start_proxy, http) -> None:
    """Arguments that are not JSON cannot become Ollama's object: the stream ends in an error, never ``done``."""
    url = await start_proxy(make_config({"m": {"tool_call": {"name": "add", "arguments": "{not json"}}}))
    body = {"model": "m", "messages": USER, "tools": TOOLS}
    async with http.stream("POST", f"{url}/api/chat", json=body) as response:
        lines = [json.loads(line) async for line in response.aiter_lines() if line.strip()]
    assert "error" in lines[-1] and "not JSON" in lines[-1]["error"]
    assert not any(line.get("done") for line in lines)
    response = await http.post(f"{url}/api/chat", json={**body, "stream": False})
    assert response.status_code == 502 and "not JSON" in response.json()["error"]


async def test_a_call_cut_off_by_the_token_limit_is_left_out(make_config, start_proxy, http) -> None:
    """At ``length`` the last call may be half written: Ollama's clients get the whole ones and ``done_reason: length``;
    OpenAI's get llama-server's answer as it is, which says ``length`` too."""
    cut = [CALLS[0], {"name": "mul", "arguments": '{"a": 3'}]
    url = await start_proxy(make_config({"m": {"tool_call": cut, "finish_reason": "length"}}))
    whole = await in_thread(with_client, url, lambda c: c.chat(model="m", messages=USER, tools=TOOLS))
    assert [(c.function.name, dict(c.function.arguments)) for c in whole.message.tool_calls] == [("add", {"a": 1, "b": 2})]
    assert whole.done_reason == "length"
    parts = await in_thread(with_client, url, lambda c: c.chat(model="m", messages=USER, tools=TOOLS, stream=True))
    calls = [call for p in parts for call in (p.message.tool_calls or [])]
    assert [c.function.name for c in calls] == ["add"] and parts[-1].done_reason == "length"
    reply = await in_thread(openai_call, url, lambda c: c.chat.completions.create(model="m", messages=USER, tools=TOOLS))
    assert reply.choices[0].finish_reason == "length"
    assert [c.function.arguments for c in reply.choices[0].message.tool_calls] == ['{"a": 1, "b": 2}', '{"a": 3']


# ---- Ollama: images --------------------------------------------------------------------------


async def test_ollama_images_reach_llama_server_as_data_uris(make_config, start_proxy, http) -> None:
    url = await start_proxy(make_config({"eyes": {"vision": True}, "text": {}}))
    messages = [{"role": "user", "content": "what are these?", "images": [PNG, JPEG]}]
    reply = await in_thread(with_client, url, lambda c: c.chat(model="eyes", messages=messages))
    assert reply.done
    (sent,) = (await backend_requests(http, url, "eyes"))[-1]["body"]["messages"]
    assert sent == {
        "role": "user",
        "content": [
            {"type": "text", "text": "what are these?"},
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
            {"type": "image_url", "image_url": {"url": f"data:image/jpeg;base64,{JPEG}"}},
        ],
    }
    for call in (
        lambda c: c.chat(model="text", messages=messages),
        lambda c: c.chat(model="text", messages=messages, stream=True),
        lambda c: c.generate(model="text", prompt="what?", images=[PNG]),
    ):
        with pytest.raises(ollama.ResponseError) as info:
            await in_thread(with_client, url, call)
        assert info.value.status_code == 400 and '"text" cannot take images' in info.value.error


# ---- models of an Ollama upstream ------------------------------------------------------------


def upstream_config(tmp_path: Path, fake_binary: str, upstream_url: str):
    return structure(
        {
            "pool": {"llama_server": fake_binary, "load_timeout": "10s"},
            "model:up": {"backend": "ollama", "url": upstream_url, "upstream_model": "remote-llm"},
        },
        base_dir=str(tmp_path),
    )


async def test_an_ollama_upstream_gets_ollamas_own_shapes(tmp_path, fake_binary, start_proxy, fake_ollama) -> None:
    fake_ollama.tool_call = {"name": "add", "arguments": {"a": 1, "b": 2}}
    url = await start_proxy(upstream_config(tmp_path, fake_binary, fake_ollama.url))
    history = [
        {"role": "user", "content": "add these", "images": [PNG]},
        {"role": "assistant", "content": "I add", "tool_calls": [{"function": {"name": "add", "arguments": {"a": 1}}}]},
        {"role": "tool", "content": "1", "tool_name": "add"},
    ]
    whole = await in_thread(with_client, url, lambda c: c.chat(model="up", messages=history, tools=TOOLS))
    assert [(c.function.name, dict(c.function.arguments)) for c in whole.message.tool_calls] == [("add", {"a": 1, "b": 2})]
    method, path, body = fake_ollama.requests[-1]
    assert (method, path) == ("POST", "/api/chat")
    assert body["messages"] == history and body["tools"] == TOOLS  # untouched: images, tool_calls, tool_name

    parts = await in_thread(with_client, url, lambda c: c.chat(model="up", messages=history, tools=TOOLS, stream=True))
    calls = [call for p in parts for call in (p.message.tool_calls or [])]
    assert [(c.function.name, dict(c.function.arguments)) for c in calls] == [("add", {"a": 1, "b": 2})]
    assert parts[-1].done

    # an OpenAI client's request goes to the upstream's OpenAI route as sent
    openai_history = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}}]}]
    reply = await in_thread(
        openai_call, url, lambda c: c.chat.completions.create(model="up", messages=openai_history, tools=TOOLS)
    )
    (call,) = reply.choices[0].message.tool_calls
    assert (call.function.name, json.loads(call.function.arguments)) == ("add", {"a": 1, "b": 2})
    method, path, body = fake_ollama.requests[-1]
    assert (method, path) == ("POST", "/v1/chat/completions")
    assert body["messages"] == openai_history and body["tools"] == TOOLS


# ---- the projector: mmproj = auto ------------------------------------------------------------


@pytest.mark.parametrize(
    ("names", "model", "found"),
    [
        # beside the model; the quantization closest to the model's wins, the first among equals
        (["m-Q4_K_M.gguf", "mmproj-m-F16.gguf", "mmproj-m-Q8_0.gguf"], "m-Q4_K_M.gguf", "mmproj-m-Q8_0.gguf"),
        (["m-F16.gguf", "mmproj-m-Q8_0.gguf", "mmproj-m-F16.gguf"], "m-F16.gguf", "mmproj-m-F16.gguf"),
        (["m-Q8_0.gguf", "mmproj-F16.gguf", "mmproj-BF16.gguf"], "m-Q8_0.gguf", "mmproj-F16.gguf"),
        (["m.gguf", "mmproj.gguf"], "m.gguf", "mmproj.gguf"),
        # the model's own folder before a folder above it; never one beside or below it
        (["mmproj-F16.gguf", "q4/m-Q4_K_M.gguf", "q4/mmproj-F32.gguf"], "q4/m-Q4_K_M.gguf", "q4/mmproj-F32.gguf"),
        (["mmproj-F16.gguf", "q4/m-Q4_K_M.gguf", "q8/mmproj-Q4_0.gguf"], "q4/m-Q4_K_M.gguf", "mmproj-F16.gguf"),
        (["m-Q4_K_M.gguf", "sub/mmproj-F16.gguf"], "m-Q4_K_M.gguf", None),
        # only GGUFs with mmproj in their name
        (["m-Q4_K_M.gguf", "mmproj-F16.bin", "projector-F16.gguf"], "m-Q4_K_M.gguf", None),
    ],
)
def test_find_projector_picks_as_llama_cpp_hf_does(names: list[str], model: str, found: str | None) -> None:
    assert find_projector(names, model) == found


def test_select_auto_in_a_repo() -> None:
    files = [RepoFile(n) for n in ("g-Q4_K_M.gguf", "g-Q8_0.gguf", "mmproj-g-F16.gguf", "mmproj-g-Q8_0.gguf")]
    parts, mmproj = select(files, ModelConfig(name="g", repo="o/g", quant="Q8_0", mmproj="auto"))
    assert [p.name for p in parts] == ["g-Q8_0.gguf"] and mmproj is not None and mmproj.name == "mmproj-g-Q8_0.gguf"
    _, none = select(files[:2], ModelConfig(name="g", repo="o/g", mmproj="auto"))
    assert none is None  # no projector in the repo: the model loads without one, as with -hf


async def test_mmproj_auto_passes_the_projector_beside_the_model(
    tmp_path: Path, fake_binary: str, start_proxy, http: httpx.AsyncClient
) -> None:
    seeing, blind = tmp_path / "seeing", tmp_path / "blind"
    seeing.mkdir()
    blind.mkdir()
    (seeing / "eyes-Q4_K_M.gguf").write_text(json.dumps({"vision": True}))
    (seeing / "mmproj-eyes-F16.gguf").write_bytes(b"a projector")
    (seeing / "mmproj-eyes-Q8_0.gguf").write_bytes(b"a closer projector")
    (blind / "text-Q4_K_M.gguf").write_text(json.dumps({}))
    (blind / "notes.txt").write_text("no projector here")
    config = structure(
        {
            "pool": {"llama_server": fake_binary, "load_timeout": "10s"},
            "model:eyes": {"path": "seeing/eyes-Q4_K_M.gguf", "mmproj": "auto"},
            "model:text": {"path": "blind/text-Q4_K_M.gguf", "mmproj": "auto"},
        },
        base_dir=str(tmp_path),
    )
    url = await start_proxy(config)
    shown = await in_thread(with_client, url, lambda c: c.show("eyes"))
    assert "vision" in shown.capabilities and str(seeing / "mmproj-eyes-Q8_0.gguf") in shown.modelfile
    assert "vision" not in (await in_thread(with_client, url, lambda c: c.show("text"))).capabilities

    reply = await in_thread(with_client, url, lambda c: c.generate(model="eyes", prompt="what?", images=[PNG]))
    assert reply.done
    servers = {s["model"]: s["port"] for s in (await http.get(f"{url}/health")).json()["pool"]["servers"]}
    argv = (await http.get(f"http://127.0.0.1:{servers['eyes']}/argv")).json()
    assert argv[argv.index("--mmproj") + 1] == str(seeing / "mmproj-eyes-Q8_0.gguf")

    with pytest.raises(ollama.ResponseError) as info:
        await in_thread(with_client, url, lambda c: c.generate(model="text", prompt="what?", images=[PNG]))
    assert info.value.status_code == 400 and '"text" cannot take images' in info.value.error
    servers = {s["model"]: s["port"] for s in (await http.get(f"{url}/health")).json()["pool"]["servers"]}
    assert "--mmproj" not in (await http.get(f"http://127.0.0.1:{servers['text']}/argv")).json()


def test_mmproj_auto_needs_no_file_named_auto(tmp_path: Path) -> None:
    (tmp_path / "m.gguf").write_text("{}")
    config = structure({"model:m": {"path": "m.gguf", "mmproj": "auto"}}, base_dir=str(tmp_path))
    assert config.models["m"].mmproj == "auto"


async def test_an_agent_chain_for_an_ollama_upstream_model_carries_tools_both_ways(
    tmp_path: Path, fake_binary: str, start_proxy, fake_ollama
) -> None:
    """With a command, an Ollama client's chat goes to the upstream's OpenAI route: tools and images in OpenAI's
    shapes there, the call back in Ollama's."""
    fake_ollama.tool_call = {"name": "add", "arguments": {"a": 1, "b": 2}}
    agents = tmp_path / "agents"
    write_agent(agents, "a", marker("a"))
    url = await start_proxy(with_agents(upstream_config(tmp_path, fake_binary, fake_ollama.url), agents, "a"))
    messages = [{"role": "user", "content": "/a add", "images": [PNG]}]
    for stream in (False, True):
        reply = await in_thread(
            with_client, url, lambda c, s=stream: c.chat(model="up", messages=messages, tools=TOOLS, stream=s)
        )
        parts = reply if stream else [reply]
        calls = [call for p in parts for call in (p.message.tool_calls or [])]
        assert [(c.function.name, dict(c.function.arguments)) for c in calls] == [("add", {"a": 1, "b": 2})]
        assert parts[-1].done
        method, path, body = fake_ollama.requests[-1]
        assert (method, path) == ("POST", "/v1/chat/completions") and body["tools"] == TOOLS
        assert body["messages"][0]["content"][1] == {
            "type": "image_url",
            "image_url": {"url": f"data:image/png;base64,{PNG}"},
        }


# ---- a chat template with tools: chat_template = FILE ----------------------------------------


async def test_chat_template_starts_llama_server_with_it(
    tmp_path: Path, fake_binary: str, start_proxy, http: httpx.AsyncClient
) -> None:
    (tmp_path / "m.gguf").write_text(json.dumps({"tool_call": CALLS}))
    (tmp_path / "tools.jinja").write_text("{% for m in messages %}{{ m.content }}{% endfor %}{{ tools }}")
    config = structure(
        {
            "pool": {"llama_server": fake_binary, "load_timeout": "10s"},
            "model:m": {"path": "m.gguf", "chat_template": "tools.jinja"},
        },
        base_dir=str(tmp_path),
    )
    url = await start_proxy(config)
    shown = await in_thread(with_client, url, lambda c: c.show("m"))
    assert "tools" in shown.capabilities and shown.template == (tmp_path / "tools.jinja").read_text()
    reply = await in_thread(with_client, url, lambda c: c.chat(model="m", messages=USER, tools=TOOLS))
    assert [c.function.name for c in reply.message.tool_calls] == ["add", "mul"]
    (server,) = (await http.get(f"{url}/health")).json()["pool"]["servers"]
    argv = (await http.get(f"http://127.0.0.1:{server['port']}/argv")).json()
    assert argv[argv.index("--chat-template-file") + 1] == str(tmp_path / "tools.jinja") and "--jinja" in argv


def test_chat_template_must_exist_and_be_local(tmp_path: Path) -> None:
    from smart_proxy.errors import ConfigError

    (tmp_path / "m.gguf").write_text("{}")
    with pytest.raises(ConfigError, match=r"\[model:m\] chat_template: no such file"):
        structure({"model:m": {"path": "m.gguf", "chat_template": "nope.jinja"}}, base_dir=str(tmp_path))
    with pytest.raises(ConfigError, match=r"\[model:u\] chat_template: only for backend = llama"):
        structure(
            {"model:u": {"backend": "ollama", "url": "http://h:11434", "chat_template": "x.jinja"}},
            base_dir=str(tmp_path),
        )


def test_the_shipped_gemma_template_is_in_the_shipped_proxy_ini() -> None:
    """(Read as text: loading it would need the gemma package; tests/e2e/test_openai_real.py serves it.)"""
    import configparser

    root = Path(__file__).parent.parent
    parser = configparser.ConfigParser(interpolation=None, inline_comment_prefixes=(";", "#"))
    parser.read(root / "proxy.ini")
    template = parser["model:gemma3-270m"]["chat_template"]
    assert template == "templates/gemma3-tools.jinja" and "<tool_call>" in (root / template).read_text()
