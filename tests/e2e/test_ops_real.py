"""Operations end to end with the real llama-server and gemma-3-270m: the official openai
client through API keys, the metrics it leaves, and a drain on SIGTERM."""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ..test_ops import wait_not_ready

pytestmark = pytest.mark.real

KEY = "sk-ops-real"


def metric(text: str, name: str, **labels: str) -> float | None:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return None


def test_keys_metrics_and_drain_with_the_real_model(
    proxy_process, llama_server_binary: str, gemma_path: str, tmp_path: Path
) -> None:
    proxy = proxy_process(
        f"[proxy]\napi_keys = {KEY}\ngrace = 60s\n"
        f"[pool]\nllama_server = {llama_server_binary}\nload_timeout = 60s\n"
        f"[model:gemma]\npath = {gemma_path}\nargs = --ctx-size 512\n"
    )
    client = openai.OpenAI(base_url=f"{proxy.url}/v1", api_key=KEY, max_retries=0, timeout=120)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{proxy.url}/v1", api_key="sk-wrong", max_retries=0).models.list()

    messages = [{"role": "user", "content": "Count from one to five."}]
    reply = client.chat.completions.create(model="gemma", messages=messages, max_tokens=8, temperature=0)
    chunks = list(
        client.chat.completions.create(
            model="gemma", messages=messages, max_tokens=8, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )
    )
    usage = [chunk.usage for chunk in chunks if chunk.usage is not None][-1]
    # a stream whose client did not ask for usage: llama-server reports none, the proxy counts its timings
    plain = list(client.chat.completions.create(model="gemma", messages=messages, max_tokens=8, temperature=0, stream=True))
    assert all(chunk.usage is None for chunk in plain)  # the client's answer is llama-server's, untouched

    text = httpx.get(f"{proxy.url}/metrics", headers={"Authorization": f"Bearer {KEY}"}, timeout=10).text
    chat = {"route": "/v1/chat/completions", "model": "gemma"}
    assert metric(text, "smart_proxy_requests_total", **chat, status="200", peer="") == 3
    assert metric(text, "smart_proxy_model_loads_total", model="gemma") == 1
    assert metric(text, "smart_proxy_model_load_duration_seconds_count", model="gemma") == 1
    # the same prompt greedily: the third answer has the same counts as the first
    prompt = reply.usage.prompt_tokens + usage.prompt_tokens + reply.usage.prompt_tokens
    assert metric(text, "smart_proxy_prompt_tokens_total", model="gemma") == prompt
    assert (
        metric(text, "smart_proxy_completion_tokens_total", model="gemma")
        == reply.usage.completion_tokens + usage.completion_tokens + reply.usage.completion_tokens
    )
    assert metric(text, "smart_proxy_time_to_first_token_seconds_count", **chat) == 2
    assert metric(text, "smart_proxy_llama_servers", state="ready") == 1

    # drain: a generation in flight when SIGTERM comes is finished, then the proxy exits 0
    finished: list[str] = []
    streaming = threading.Event()

    def generate() -> None:
        stream = client.chat.completions.create(
            model="gemma", messages=[{"role": "user", "content": "Write a short poem."}], max_tokens=96, stream=True
        )
        text = []
        for chunk in stream:
            streaming.set()
            text += [choice.delta.content or "" for choice in chunk.choices]
        finished.append("".join(text))

    worker = threading.Thread(target=generate)
    worker.start()
    assert streaming.wait(60)
    proxy.process.send_signal(signal.SIGTERM)
    assert wait_not_ready(proxy.url)
    worker.join(60)
    assert finished and finished[0].strip()
    assert proxy.process.wait(60) == 0
    log = proxy.log()
    assert " DEBUG smart_proxy.process: [gemma] " in log  # llama-server's own output, at debug
    assert KEY not in log
