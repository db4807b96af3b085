"""Per-request context end to end: the real llama-server with gemma, through the Ollama and OpenAI clients.

gemma3-270m was trained on a context of 32768. Its section starts it at ``-c 4096``; a
request for more reloads it once with ``--ctx-size``, and the larger server then serves the
smaller requests; ``ollama.ps()`` shows the context llama-server itself reports.
"""

from __future__ import annotations

import httpx
import ollama
import openai
import pytest

from ..conftest import ProxyProcess

pytestmark = pytest.mark.real


def _ini(binary: str, gemma: str, args: str = "-c 4096") -> str:
    return (
        f"[pool]\nsize = 2\nllama_server = {binary}\nload_timeout = 90s\n"
        f"[model:gemma]\npath = {gemma}\nargs = {args}\n"
    )


def _health(proxy: ProxyProcess) -> dict:
    return httpx.get(f"{proxy.url}/health", timeout=10).json()


def _props(server: dict) -> dict:
    return httpx.get(f"http://127.0.0.1:{server['port']}/props", timeout=10).json()


def test_ollama_num_ctx_4096_8192_4096_is_one_reload_and_ps_shows_the_context(
    proxy_process, llama_server_binary, gemma_path
) -> None:
    proxy = proxy_process(_ini(llama_server_binary, gemma_path))
    seen = []
    with ollama.Client(host=proxy.url, timeout=120) as client:
        for num_ctx in (4096, 8192, 4096):
            reply = client.chat(
                model="gemma",
                messages=[{"role": "user", "content": "Say hi."}],
                options={"num_ctx": num_ctx, "num_predict": 4},
            )
            assert reply.done and reply.message.content
            (listed,) = client.ps().models
            servers = [s for s in _health(proxy)["pool"]["servers"] if s["state"] == "ready"]
            seen.append((listed.context_length, [s["context"] for s in servers], [s["pid"] for s in servers]))
    assert [ps for ps, _, _ in seen] == [4096, 8192, 8192]
    assert [contexts for _, contexts, _ in seen] == [[4096], [8192], [8192]]
    assert seen[1][2] == seen[2][2] != seen[0][2]  # the third request went to the second server
    (server,) = _health(proxy)["pool"]["servers"]
    assert _props(server)["default_generation_settings"]["n_ctx"] == 8192  # llama-server's own word
    (model,) = _health(proxy)["pool"]["models"]
    assert model["loads"] == 2  # one reload, not two
    assert "stopping llama-server (replaced by one with a larger context (8192))" in proxy.log()


def test_separate_slots_get_the_context_each_and_more_than_trained_is_a_400(
    proxy_process, llama_server_binary, gemma_path
) -> None:
    proxy = proxy_process(_ini(llama_server_binary, gemma_path, "-c 2048 -np 2"))
    with openai.OpenAI(base_url=f"{proxy.url}/v1", api_key="none", max_retries=0, timeout=120) as client:
        reply = client.completions.create(model="gemma", prompt="Hello", max_tokens=3, extra_body={"num_ctx": 4096})
        assert reply.choices[0].text
        with pytest.raises(openai.BadRequestError) as info:
            client.completions.create(model="gemma", prompt="Hello", max_tokens=3, extra_body={"num_ctx": 65536})
    assert "num_ctx 65536 is larger than the context model 'gemma' was trained for (32768)" in str(info.value)
    (server,) = _health(proxy)["pool"]["servers"]
    props = _props(server)
    assert props["total_slots"] == 2 and props["default_generation_settings"]["n_ctx"] == 4096
    assert server["context"] == 4096
    with ollama.Client(host=proxy.url, timeout=60) as client:
        with pytest.raises(ollama.ResponseError) as refused:
            client.generate(model="gemma", prompt="Hi", options={"num_ctx": 65536})
    assert refused.value.status_code == 400 and "trained for (32768)" in refused.value.error
    assert len(_health(proxy)["pool"]["servers"]) == 1  # the refusals loaded nothing
