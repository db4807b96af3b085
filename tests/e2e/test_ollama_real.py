"""The Ollama dialect end to end: the official ``ollama`` client, the proxy as a real
process, the real llama-server and Gemma 3 270M.

One proxy serves the module (a chat model and an embedding model, pool of 2);
generations are kept to a few tokens. Sync clients run in plain test functions;
the asyncio ``AsyncClient`` under ``asyncio.run``.
"""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import ollama
import openai
import pytest

from ..conftest import ProxyProcess

pytestmark = pytest.mark.real

INI = """
[pool]
size = 2
llama_server = {binary}
load_timeout = 120s
queue_timeout = 120s

[model:gemma]
path = {gemma}
args = --ctx-size 2048 --parallel 2

[model:gemma-embed]
path = {gemma}
args = --ctx-size 512 --parallel 1 --pooling mean
embeddings = true
"""

HI = [{"role": "user", "content": "Say hello in three words."}]
FEW = {"num_predict": 8, "temperature": 0}


@pytest.fixture(scope="module")
def proxy(llama_server_binary: str, gemma_path: str, tmp_path_factory: pytest.TempPathFactory):
    folder: Path = tmp_path_factory.mktemp("ollama-real")
    ini = folder / "proxy.ini"
    ini.write_text(INI.format(binary=llama_server_binary, gemma=gemma_path))
    process = ProxyProcess(ini, folder / "proxy.log")
    yield process
    assert process.stop() == 0, process.log()[-3000:]


@pytest.fixture
def client(proxy: ProxyProcess):
    with ollama.Client(host=proxy.url, timeout=120) as c:
        yield c


def _models_loaded(client: ollama.Client) -> list[str]:
    return [m.model for m in client.ps().models]


def test_chat_streamed_and_not(client: ollama.Client) -> None:
    reply = client.chat(model="gemma", messages=HI, options=FEW)
    assert reply.done and reply.done_reason in ("stop", "length")
    assert reply.message.role == "assistant" and reply.message.content.strip()
    assert 0 < reply.eval_count <= 8 and reply.prompt_eval_count > 5
    assert reply.eval_duration > 0 and reply.prompt_eval_duration > 0
    assert reply.total_duration >= reply.eval_duration

    parts = list(client.chat(model="gemma", messages=HI, options=FEW, stream=True))
    assert len(parts) >= 3 and all(not p.done for p in parts[:-1]) and parts[-1].done
    text = "".join(p.message.content for p in parts)
    assert text.strip()

    # what Gemma 3 270M cannot do is refused up front, as Ollama does
    with pytest.raises(ollama.ResponseError) as info:
        client.chat(model="gemma", messages=HI, think=True)
    assert info.value.status_code == 400 and "does not support thinking" in info.value.error
    png = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
    with pytest.raises(ollama.ResponseError) as info:
        client.generate(model="gemma", prompt="What is this?", images=[png])
    assert info.value.status_code == 400 and "cannot take images" in info.value.error
    assert 0 < parts[-1].eval_count <= 8 and parts[-1].total_duration > 0


def test_generate_streamed_and_not(client: ollama.Client) -> None:
    reply = client.generate(model="gemma", prompt="The capital of France is", system="Answer briefly.", options=FEW)
    assert reply.done and reply.response.strip() and 0 < reply.eval_count <= 8
    parts = list(client.generate(model="gemma:latest", prompt="1, 2, 3, 4,", raw=True, options=FEW, stream=True))
    assert parts[-1].done and parts[-1].model == "gemma:latest"
    assert "".join(p.response for p in parts).strip()
    # format: a grammar, so the answer is JSON whatever the model would say
    shaped = client.generate(
        model="gemma",
        prompt="Give a JSON object with a key n set to 3.",
        format={"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]},
        options={"num_predict": 24, "temperature": 0},
    )
    assert isinstance(json.loads(shaped.response)["n"], int)


def test_embed(client: ollama.Client) -> None:
    reply = client.embed(model="gemma-embed", input=["hello world", "a cat sat on the mat"])
    assert len(reply.embeddings) == 2
    first, second = reply.embeddings
    assert len(first) == len(second) > 100
    assert math.isclose(math.sqrt(sum(x * x for x in first)), 1.0, rel_tol=1e-3)
    assert first != second and reply.prompt_eval_count > 0
    legacy = client.embeddings(model="gemma-embed", prompt="hello world")
    assert legacy.embedding == pytest.approx(first, abs=1e-4)
    with pytest.raises(ollama.ResponseError) as info:
        client.embed(model="gemma", input="x")
    assert info.value.status_code == 400


def test_tags_and_show(client: ollama.Client) -> None:
    listed = {m.model: m for m in client.list().models}
    assert set(listed) == {"gemma:latest", "gemma-embed:latest"}
    gemma = listed["gemma:latest"]
    assert gemma.size > 100_000_000 and gemma.details.format == "gguf"
    assert gemma.details.family == "gemma3" and gemma.details.quantization_level == "Q4_K_M"
    assert gemma.details.parameter_size
    shown = client.show("gemma")
    assert shown.modelinfo["general.architecture"] == "gemma3"
    assert shown.modelinfo["gemma3.context_length"] > 2048
    assert shown.capabilities == ["completion"] and "--ctx-size 2048" in shown.modelfile
    assert client.show("gemma-embed").capabilities == ["completion", "embedding"]


def test_ps_expiry_keep_alive_zero_and_preload(client: ollama.Client) -> None:
    loaded = client.generate(model="gemma", keep_alive="2m")
    assert loaded.done and loaded.done_reason == "load"
    (entry,) = [m for m in client.ps().models if m.model == "gemma:latest"]
    left = (entry.expires_at - datetime.now(UTC)).total_seconds()
    assert 100 < left <= 120 and entry.size > 100_000_000
    assert 0 < entry.context_length <= 2048  # llama-server's n_ctx per slot

    reply = client.chat(model="gemma", messages=HI, options=FEW, keep_alive=0)
    assert reply.done
    assert "gemma:latest" not in _models_loaded(client)

    assert client.chat(model="gemma", messages=[], keep_alive=-1).done_reason == "load"
    (entry,) = [m for m in client.ps().models if m.model == "gemma:latest"]
    assert entry.expires_at.year > 2200
    unloaded = client.generate(model="gemma", keep_alive=0)
    assert unloaded.done_reason == "unload"
    assert "gemma:latest" not in _models_loaded(client)


def test_unknown_model_is_404(client: ollama.Client, proxy: ProxyProcess) -> None:
    with pytest.raises(ollama.ResponseError) as info:
        client.chat(model="no-such-model", messages=HI)
    assert info.value.status_code == 404 and "gemma" in info.value.error  # names models that exist

    async def main() -> int:
        async with ollama.AsyncClient(host=proxy.url) as async_client:
            try:
                await async_client.generate(model="no-such-model", prompt="x")
            except ollama.ResponseError as exc:
                return exc.status_code
        return 0

    assert asyncio.run(main()) == 404


def test_async_client(proxy: ProxyProcess) -> None:
    async def main():
        async with ollama.AsyncClient(host=proxy.url, timeout=120) as c:
            reply = await c.chat(model="gemma", messages=HI, options=FEW)
            parts = [p async for p in await c.generate(model="gemma", prompt="Hello", options=FEW, stream=True)]
            ps = await c.ps()
            return reply, parts, ps

    reply, parts, ps = asyncio.run(main())
    assert reply.message.content.strip() and reply.done
    assert parts[-1].done and "".join(p.response for p in parts).strip()
    assert "gemma:latest" in [m.model for m in ps.models]


def test_openai_and_ollama_clients_share_the_loaded_model(client: ollama.Client, proxy: ProxyProcess) -> None:
    client.generate(model="gemma", keep_alive=-1)  # loaded once, before both start
    loads_before = _loads(proxy)
    spans: dict[str, tuple[float, float]] = {}
    texts: dict[str, str] = {}
    errors: list[BaseException] = []
    long = {"num_predict": 24, "temperature": 0}

    def via_openai() -> None:
        try:
            with openai.OpenAI(base_url=f"{proxy.url}/v1", api_key="none", timeout=120) as oa:
                stream = oa.chat.completions.create(model="gemma", messages=HI, max_tokens=24, stream=True)
                start, text = None, ""
                for chunk in stream:
                    if chunk.choices and chunk.choices[0].delta.content:
                        start = start or time.monotonic()
                        text += chunk.choices[0].delta.content
                spans["openai"], texts["openai"] = (start, time.monotonic()), text
        except BaseException as exc:
            errors.append(exc)

    def via_ollama() -> None:
        try:
            with ollama.Client(host=proxy.url, timeout=120) as ol:
                start, text = None, ""
                for part in ol.chat(model="gemma", messages=HI, options=long, stream=True):
                    if part.message.content:
                        start = start or time.monotonic()
                        text += part.message.content
                spans["ollama"], texts["ollama"] = (start, time.monotonic()), text
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=via_openai), threading.Thread(target=via_ollama)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors
    assert texts["openai"].strip() and texts["ollama"].strip()
    (a_start, a_end), (b_start, b_end) = spans["openai"], spans["ollama"]
    assert a_start < b_end and b_start < a_end  # the two answers were generated at the same time
    assert _loads(proxy) == loads_before  # by the one llama-server already loaded
    servers = [s for s in httpx.get(f"{proxy.url}/health").json()["pool"]["servers"] if s["model"] == "gemma"]
    assert len(servers) == 1 and servers[0]["in_flight"] == 0


def _loads(proxy: ProxyProcess) -> int:
    models = httpx.get(f"{proxy.url}/health").json()["pool"]["models"]
    return sum(m["loads"] for m in models if m["model"] == "gemma")
