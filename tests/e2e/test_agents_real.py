"""/rag and /parallel end to end: the proxy as a process, the real llama-server and gemma,
the openai client and the official ollama client.

The agents are the bundled ones (their agent.py copied next to a config of the
test's making). Generations are kept to a few tokens.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import ollama
import openai
import pytest

pytestmark = pytest.mark.real

REPO = Path(__file__).resolve().parent.parent.parent
SECRET = "4417"
DOC = f"""# The Zorblax vault

The Zorblax vault is in the basement of the old mill. The access code for the Zorblax vault is {SECRET}.
Only the night guard, Mira Okafor, may open it.

# Opening hours

The mill museum opens at nine in the morning and closes at five.
"""


def agent_folder(root: Path, name: str, source: str, config: str) -> None:
    folder = root / name
    folder.mkdir(parents=True)
    shutil.copy(REPO / "agents" / source / "agent.py", folder / "agent.py")
    (folder / "config.toml").write_text(config)


@pytest.fixture
def proxy(tmp_path: Path, proxy_process, llama_server_binary: str, gemma_path: str):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "vault.md").write_text(DOC)
    (docs / "unrelated.txt").write_text("Bananas are berries, botanically speaking.\n\nStrawberries are not.\n")
    agents = tmp_path / "agents"
    agent_folder(agents, "rag", "rag", f'docs = "{docs}"\ntop_k = 1\n')
    agent_folder(agents, "parallel", "parallel", 'samples = 2\nmode = "best"\npick = "logprob"\n')
    agent_folder(agents, "pall", "parallel", 'samples = 2\nmode = "all"\n')
    ini = f"""
[pool]
llama_server = {llama_server_binary}
size = 1
load_timeout = 120s

[model:gemma]
path = {gemma_path}
args = --ctx-size 4096 --parallel 2

[agents]
dir = {agents}
enabled = rag, parallel, pall
timeout = 60s
"""
    return proxy_process(ini)


def problems(proxy) -> str:
    return "\n".join(line for line in proxy.log().splitlines() if " WARNING " in line or " ERROR " in line)


@pytest.fixture
def ai(proxy) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=proxy.url + "/v1", api_key="unused", max_retries=0, timeout=120) as client:
        yield client


@pytest.fixture
def ol(proxy) -> Iterator[ollama.Client]:
    with ollama.Client(host=proxy.url, timeout=120) as client:
        yield client


def test_rag_with_the_openai_client(proxy, ai: openai.OpenAI) -> None:
    # gemma-3-270m here is a base model with no chat template: a completion is the fair test
    # of whether it read the retrieved passage. Without /rag it can only make a code up.
    prompt = "The access code for the Zorblax vault is"
    plain = ai.completions.create(model="gemma", prompt=prompt, temperature=0, max_tokens=8)
    assert SECRET not in plain.choices[0].text
    raw = ai.completions.with_raw_response.create(model="gemma", prompt="/rag " + prompt, temperature=0, max_tokens=8)
    assert "X-Smart-Proxy-Agent-Errors" not in raw.headers
    answer = raw.parse()
    assert SECRET in answer.choices[0].text, answer.choices[0].text
    assert answer.usage.prompt_tokens > plain.usage.prompt_tokens + 30  # the passage and its source went in

    # chat: the passage goes in as a system message, and the answer streams live, piece by piece
    question = [{"role": "user", "content": "What is the access code for the Zorblax vault?"}]
    asked = [{"role": "user", "content": "/rag What is the access code for the Zorblax vault?"}]
    plain_chat = ai.chat.completions.create(model="gemma", messages=question, temperature=0, max_tokens=8)
    rag_chat = ai.chat.completions.create(model="gemma", messages=asked, temperature=0, max_tokens=8)
    assert rag_chat.usage.prompt_tokens > plain_chat.usage.prompt_tokens + 30
    with ai.chat.completions.create(model="gemma", messages=asked, temperature=0, max_tokens=8, stream=True) as stream:
        pieces = [c.choices[0].delta.content for c in stream if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 1
    assert "".join(pieces) == rag_chat.choices[0].message.content  # same prompt, temperature 0
    plugins = httpx.get(proxy.url + "/plugins").json()["agents"]
    assert {(a["name"], a["loaded"]) for a in plugins} == {("rag", True), ("parallel", True), ("pall", True)}


def test_parallel_with_the_openai_client(proxy, ai: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "/parallel Name a colour of the rainbow."}]
    best = ai.chat.completions.create(model="gemma", messages=messages, temperature=1.0, max_tokens=12)
    assert len(best.choices) == 1 and best.choices[0].message.content
    assert best.choices[0].logprobs is None  # asked for scoring only; the client did not want them
    assert "smart_proxy" in best.model_extra, problems(proxy)  # else every candidate failed: say why
    report = best.model_extra["smart_proxy"]["parallel"]
    assert report["mode"] == "best" and report["pick"] == "logprob"
    rows = report["candidates"]
    assert [(r["model"], r["sample"], r["status"]) for r in rows] == [("gemma", 0, "ok"), ("gemma", 1, "ok")]
    # real logprobs from llama-server scored the candidates; the best one was returned
    scores = [r["score"] for r in rows]
    assert all(isinstance(s, float) and math.isfinite(s) and s <= 0 for s in scores), scores
    assert report["chosen"] == max(range(2), key=lambda i: (scores[i], -i))
    assert all(r["seconds"] > 0 for r in rows)

    every = ai.chat.completions.create(
        model="gemma", messages=[{"role": "user", "content": "/pall Name a fruit."}], temperature=1.0, max_tokens=12
    )
    assert [c.index for c in every.choices] == [0, 1]
    assert all(c.message.content for c in every.choices)
    rows = every.model_extra["smart_proxy"]["parallel"]["candidates"]
    assert every.usage.completion_tokens == sum(r["completion_tokens"] for r in rows)

    # a buffered chain still answers a streaming client, replayed as SSE
    with ai.chat.completions.create(
        model="gemma", messages=messages, temperature=1.0, max_tokens=12, stream=True
    ) as stream:
        text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text


def test_parallel_completions_and_raw_sse(proxy) -> None:
    body = {"model": "gemma", "prompt": "/pall The sky is", "max_tokens": 8, "temperature": 1.0, "stream": True}
    response = httpx.post(proxy.url + "/v1/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    events = [line.removeprefix("data: ") for line in response.text.split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert {c["object"] for c in chunks} == {"text_completion"}
    assert {choice["index"] for c in chunks for choice in c["choices"]} == {0, 1}
    assert "parallel" in chunks[-1]["smart_proxy"]


# ---- the same agents through the Ollama dialect ------------------------------------------


def test_rag_with_the_ollama_client(proxy, ol: ollama.Client) -> None:
    prompt = "The access code for the Zorblax vault is"
    few = {"temperature": 0, "num_predict": 8}
    plain = ol.generate(model="gemma", prompt=prompt, raw=True, options=few)
    assert SECRET not in plain.response
    answer = ol.generate(model="gemma", prompt="/rag " + prompt, raw=True, options=few)
    assert SECRET in answer.response, answer.response
    assert answer.prompt_eval_count > plain.prompt_eval_count + 30  # the passage and its source went in

    # chat: the passage goes in as a system message; a live chain streams NDJSON piece by piece
    asked = [{"role": "user", "content": "/rag What is the access code for the Zorblax vault?"}]
    question = [{"role": "user", "content": "What is the access code for the Zorblax vault?"}]
    plain_chat = ol.chat(model="gemma", messages=question, options=few)
    rag_chat = ol.chat(model="gemma", messages=asked, options=few)
    assert rag_chat.prompt_eval_count > plain_chat.prompt_eval_count + 30
    parts = list(ol.chat(model="gemma:latest", messages=asked, options=few, stream=True))
    assert len(parts) > 2 and parts[-1].done and parts[-1].model == "gemma:latest"
    assert "".join(p.message.content for p in parts) == rag_chat.message.content  # same prompt, temperature 0
    seen = httpx.post(proxy.url + "/api/chat", json={"model": "gemma", "messages": asked, "options": few}, timeout=120)
    assert seen.status_code == 200 and "X-Smart-Proxy-Agent-Errors" not in seen.headers
    assert seen.headers["content-type"] == "application/x-ndjson"


def test_parallel_with_the_ollama_client(proxy, ol: ollama.Client) -> None:
    messages = [{"role": "user", "content": "/parallel Name a colour of the rainbow."}]
    few = {"temperature": 1.0, "num_predict": 12}
    best = ol.chat(model="gemma", messages=messages, options=few)
    assert best.done and best.message.content and best.model == "gemma"
    assert best.logprobs is None  # asked for scoring only
    assert 0 < best.eval_count <= 12

    # the report rides on the last object (the ollama client drops fields it does not know)
    body = {"model": "gemma", "messages": messages, "options": few, "stream": False}
    raw = httpx.post(proxy.url + "/api/chat", json=body, timeout=120).json()
    assert "smart_proxy" in raw, problems(proxy)  # else every candidate failed: say why
    report = raw["smart_proxy"]["parallel"]
    rows = report["candidates"]
    assert [(r["model"], r["sample"], r["status"]) for r in rows] == [("gemma", 0, "ok"), ("gemma", 1, "ok")]
    scores = [r["score"] for r in rows]
    assert all(isinstance(s, float) and math.isfinite(s) and s <= 0 for s in scores), scores
    assert report["chosen"] == max(range(2), key=lambda i: (scores[i], -i))

    # a buffered chain answers a streaming Ollama client with the final answer replayed as NDJSON
    parts = list(ol.generate(model="gemma", prompt="/parallel The sky is", options=few, stream=True))
    assert [p.done for p in parts] == [False, True] and parts[0].response
    assert parts[-1].done_reason in ("stop", "length") and 0 < parts[-1].eval_count <= 12

    # mode = all: every answer is listed, the first is the message
    every = {"model": "gemma", "messages": [{"role": "user", "content": "/pall Name a fruit."}], "options": few}
    raw = httpx.post(proxy.url + "/api/chat", json={**every, "stream": False}, timeout=120).json()
    choices = raw["smart_proxy"]["choices"]
    assert len(choices) == 2 and all(c["message"]["content"] for c in choices)
    assert raw["message"] == choices[0]["message"]
    rows = raw["smart_proxy"]["parallel"]["candidates"]
    assert raw["eval_count"] == sum(r["completion_tokens"] for r in rows)
