"""Agents in the Ollama dialect: /api/chat and /api/generate run the same chain as the OpenAI routes.

The official ``ollama`` client (sync, in a worker thread, like tests/test_ollama.py)
talks to the in-process proxy; the models are the fake llama-server. An ``echo``
model answers with the exact body it received, so a test sees what went upstream.
Agents and helpers are shared with tests/test_agents.py.
"""

from __future__ import annotations

import json
import shutil
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import ollama
import pytest
import trio

from smart_proxy.agents import ERRORS_HEADER
from smart_proxy.dialects import ollama as translate

from .test_agents import (
    BOOM,
    DOCS,
    SLOW,
    SWAP,
    TAG,
    copy_bundled,
    marker,
    parallel_config,
    with_agents,
    write_agent,
    write_docs,
)
from .test_ollama import backend_requests, in_thread

SWAP_AND_MARK = SWAP.replace("class Swap", "class SwapMark").replace(
    'self.config["to"]\n',
    'self.config["to"]\n\n    async def on_response(self, ctx):\n'
    '        ctx.response["choices"][0]["message"]["content"] += "<swapmark>"\n',
)


@pytest.fixture
def agent_dir(tmp_path: Path) -> Path:
    root = tmp_path / "agents"
    root.mkdir()
    return root


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def ask(url: str, call, headers: dict[str, str] | None = None, seen: list[httpx.Response] | None = None):
    """``call(client)`` with a fresh sync ollama client; the raw responses go to ``seen`` (for headers)."""

    def record(response: httpx.Response) -> None:
        if seen is not None:
            seen.append(response)

    with ollama.Client(host=url, headers=headers, event_hooks={"response": [record]}) as client:
        result = call(client)
        return list(result) if hasattr(result, "__next__") else result


def echoed(text: str) -> dict:
    """What the echo model received, from its answer (response hooks may have appended markers)."""
    return json.loads(text[: text.rindex("}") + 1])


def ndjson(body: bytes) -> list[dict]:
    return [json.loads(line) for line in body.splitlines() if line.strip()]


# ---- activation -----------------------------------------------------------------------------


async def test_no_command_goes_upstream_exactly_as_without_agents(
    make_config, start_proxy, agent_dir: Path, http
) -> None:
    write_agent(agent_dir, "a", marker("a"))
    url = await start_proxy(with_agents(make_config({"echo": {"echo": True}}), agent_dir, "a"))
    texts = ("plain é", "/usr/bin is a folder", "/b is no agent", "later /a is not leading")
    for text in texts:
        chat = {"model": "echo", "messages": user(text), "stream": False, "options": {"temperature": 0.5}, "x": [1]}
        generate = {"model": "echo", "prompt": text, "system": "Be brief.", "stream": False}
        raw = {"model": "echo", "prompt": text, "raw": True, "stream": False}
        for route, payload, translated in (
            ("/api/chat", chat, translate.chat_request(chat, "echo")),
            ("/api/generate", generate, translate.generate_request(generate, "echo")),
            ("/api/generate", raw, translate.generate_request(raw, "echo")),
        ):
            response = await http.post(url + route, json=payload)
            assert response.status_code == 200, response.text
            reply = response.json()
            received = reply["message"]["content"] if route == "/api/chat" else reply["response"]
            # byte for byte what the Ollama translation sends when there are no agents at all
            assert received == json.dumps(translated.body, ensure_ascii=False)
            assert ERRORS_HEADER not in response.headers


async def test_commands_are_cut_and_hooks_run_in_order(make_config, start_proxy, agent_dir: Path, http) -> None:
    for name in ("a", "b", "c"):
        write_agent(agent_dir, name, marker(name))
    url = await start_proxy(with_agents(make_config({"echo": {"echo": True}}), agent_dir, "a", "b", "c"))
    history = [*user("/a an earlier turn"), {"role": "assistant", "content": "ok"}, *user("/b /a /usr/bin is /c")]
    reply = await in_thread(
        ask, url, lambda c: c.chat(model="echo", messages=history, options={"temperature": 0.5, "num_predict": 50})
    )
    upstream = echoed(reply.message.content)
    assert upstream["messages"] == [
        {"role": "user", "content": "/a an earlier turn"},  # only the last user message is read and cut
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "/usr/bin is /c [b] [a]"},
    ]
    assert upstream["temperature"] == 0.5 and upstream["max_tokens"] == 50 and upstream["stream"] is False
    assert reply.message.content.endswith("}<a><b>")  # response hooks in reverse order: a has the last word
    assert reply.done and reply.model == "echo" and reply.eval_count > 0

    templated = await in_thread(ask, url, lambda c: c.generate(model="echo", prompt="/c Once upon", system="Be brief."))
    assert echoed(templated.response)["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Once upon [c]"},
    ]
    assert templated.response.endswith("}<c>")
    raw = await in_thread(ask, url, lambda c: c.generate(model="echo", prompt="/c /a Once upon", raw=True))
    assert echoed(raw.response)["prompt"] == "Once upon [c] [a]"  # a completion: /v1/completions
    assert raw.response.endswith("}<a><c>")
    sent = await backend_requests(http, url, "echo")
    assert [r["path"] for r in sent[-2:]] == ["/v1/chat/completions", "/v1/completions"]


async def test_failing_hooks_are_named_and_the_request_completes(
    make_config, start_proxy, agent_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_agent(agent_dir, "boom", BOOM)
    write_agent(agent_dir, "slow", SLOW)
    write_agent(agent_dir, "a", marker("a"))
    url = await start_proxy(
        with_agents(make_config({"echo": {"echo": True}}), agent_dir, "boom", "slow", "a", "gone", slow=0.3)
    )
    seen: list[httpx.Response] = []
    with trio.fail_after(5):  # slow's own timeout (0.3s) applies, not [agents] timeout (10s)
        reply = await in_thread(
            ask, url, lambda c: c.chat(model="echo", messages=user("/boom /slow /gone /a hi")), {"X-Request-Id": "ol-9"}, seen
        )
    assert seen[-1].headers[ERRORS_HEADER] == "gone:not-loaded, boom:error, slow:timeout"
    upstream = echoed(reply.message.content)
    assert upstream["messages"] == user("hi [a]")  # boom's half-made changes are undone
    assert "temperature" not in upstream and "max_tokens" not in upstream
    assert reply.message.content.endswith("}<a>") and reply.done
    assert "request ol-9: agent /boom on_request failed, skipped: RuntimeError: boom" in caplog.text
    assert "request ol-9: agent /slow on_request timed out, skipped: no result within 0.3s" in caplog.text
    # a live chain (request hooks only) carries the header too, on its NDJSON stream
    seen.clear()
    parts = await in_thread(ask, url, lambda c: c.chat(model="echo", messages=user("/boom hi"), stream=True), None, seen)
    assert seen[-1].headers[ERRORS_HEADER] == "boom:error"
    assert seen[-1].headers["content-type"] == "application/x-ndjson"
    assert parts[-1].done and echoed("".join(p.message.content for p in parts))["messages"] == user("hi")


# ---- streams --------------------------------------------------------------------------------


def timed_parts(url: str, call) -> list[tuple[float, object]]:
    with ollama.Client(host=url) as client:
        return [(time.monotonic(), part) for part in call(client)]


async def test_a_live_chain_streams_ndjson_as_it_arrives(make_config, start_proxy, agent_dir: Path, http) -> None:
    write_agent(agent_dir, "tag", TAG)
    url = await start_proxy(
        with_agents(make_config({"slowtok": {"tokens": 6, "token_delay": 0.1}}), agent_dir, "tag")
    )
    timed = await in_thread(
        timed_parts, url, lambda c: c.chat(model="slowtok", messages=user("/tag hi"), stream=True)
    )
    parts = [part for _, part in timed]
    assert [p.message.content for p in parts[:-1]] == [f"tok{i} " for i in range(6)]
    assert parts[-1].done and parts[-1].done_reason == "length" and parts[-1].eval_count == 6
    assert timed[-2][0] - timed[0][0] > 0.3  # piece by piece over ~0.6s, not all at the end
    (sent,) = await backend_requests(http, url, "slowtok")
    assert sent["body"]["messages"] == [{"role": "system", "content": "tagged"}, *user("hi")]
    assert sent["body"]["stream"] is True  # a live chain streams from upstream
    generated = await in_thread(
        ask, url, lambda c: c.generate(model="slowtok", prompt="/tag x", raw=True, stream=True)
    )
    assert "".join(p.response for p in generated) == "tok0 tok1 tok2 tok3 tok4 tok5 "
    assert (await backend_requests(http, url, "slowtok"))[-1]["body"]["prompt"] == "tagged x"


async def test_a_buffered_chain_replays_the_final_answer_as_ndjson(
    make_config, start_proxy, agent_dir: Path, http
) -> None:
    write_agent(agent_dir, "a", marker("a"))
    models = {"m": {"tokens": 4}, "tools": {"reasoning": "let me think", "tool_call": {"name": "f", "arguments": {"x": 1}}}}
    url = await start_proxy(with_agents(make_config(models, size=2), agent_dir, "a"))
    parts = await in_thread(ask, url, lambda c: c.chat(model="m:latest", messages=user("/a hi"), stream=True))
    assert [(p.message.content, p.done) for p in parts] == [("tok0 tok1 tok2 tok3 <a>", False), ("", True)]
    final = parts[-1]
    assert final.model == "m:latest" and final.done_reason == "length"
    assert final.eval_count == 4 and final.prompt_eval_count == 3
    assert final.prompt_eval_duration == 1_500_000  # llama-server's timings came through the replay
    assert (await backend_requests(http, url, "m"))[-1]["body"]["stream"] is False  # asked whole, for the hooks
    generated = await in_thread(
        ask, url, lambda c: c.generate(model="m", prompt="/a x", raw=True, stream=True)
    )
    assert "".join(p.response for p in generated) == "tok0 tok1 tok2 tok3 <a>" and generated[-1].done

    # thinking and tool calls go through the replay as a live stream's would
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    parts = await in_thread(
        ask, url, lambda c: c.chat(model="tools", messages=user("/a call f"), tools=[tool], stream=True)
    )
    assert "".join(p.message.thinking or "" for p in parts) == "let me think"
    calls = [call for p in parts for call in (p.message.tool_calls or [])]
    assert [(call.function.name, dict(call.function.arguments)) for call in calls] == [("f", {"x": 1})]
    assert "".join(p.message.content for p in parts) == "<a>" and parts[-1].done_reason == "stop"
    whole = await in_thread(ask, url, lambda c: c.chat(model="tools", messages=user("/a call f"), tools=[tool]))
    assert whole.message.thinking == "let me think" and whole.message.tool_calls[0].function.arguments == {"x": 1}


# ---- the target model ------------------------------------------------------------------------


async def test_request_hooks_may_change_the_model(make_config, start_proxy, agent_dir: Path, http) -> None:
    write_agent(agent_dir, "swap", SWAP, config='to = "other:latest"\n')
    write_agent(agent_dir, "swapmark", SWAP_AND_MARK, config='to = "other"\n')
    write_agent(agent_dir, "lost", SWAP, config='to = "nowhere"\n')
    write_agent(agent_dir, "lostmark", SWAP_AND_MARK, config='to = "nowhere"\n')
    write_agent(agent_dir, "a", marker("a"))
    models = {"m": {"content": "from m"}, "other": {"content": "from other"}}
    enabled = ("swap", "swapmark", "lost", "lostmark", "a")
    url = await start_proxy(with_agents(make_config(models, size=2), agent_dir, *enabled))

    async def loaded() -> set[str]:
        return {s["model"] for s in (await http.get(url + "/health")).json()["pool"]["servers"]}

    reply = await in_thread(ask, url, lambda c: c.chat(model="m", messages=user("/swap hi")))
    assert reply.message.content == "from other" and reply.model == "other:latest"
    parts = await in_thread(ask, url, lambda c: c.generate(model="m", prompt="/swap hi", stream=True))
    assert "".join(p.response for p in parts) == "from other" and parts[-1].model == "other:latest"
    assert await loaded() == {"other"}  # m was never started
    # a buffered chain: ctx.complete goes where ctx.model says, and the answer names it
    reply = await in_thread(ask, url, lambda c: c.chat(model="m", messages=user("/swapmark hi")))
    assert reply.message.content == "from other<swapmark>" and reply.model == "other"
    assert await loaded() == {"other"}
    # an answer from the model asked for keeps the client's spelling of its name
    reply = await in_thread(ask, url, lambda c: c.chat(model="m:latest", messages=user("/a hi")))
    assert reply.message.content == "from m<a>" and reply.model == "m:latest"
    # a model that does not exist is Ollama's 404, whichever hook named it
    for command in ("/lost hi", "/lostmark hi"):
        with pytest.raises(ollama.ResponseError) as info:
            await in_thread(ask, url, lambda c, command=command: c.chat(model="m", messages=user(command)))
        assert info.value.status_code == 404 and "'nowhere' not found" in info.value.error


async def test_keep_alive_reaches_the_models_an_agent_calls(make_config, start_proxy, agent_dir: Path) -> None:
    write_agent(agent_dir, "a", marker("a"))
    url = await start_proxy(with_agents(make_config({"m": {}}), agent_dir, "a"))
    reply = await in_thread(ask, url, lambda c: c.chat(model="m", messages=user("/a hi"), keep_alive=0))
    assert reply.message.content.endswith("<a>")
    assert (await in_thread(ask, url, lambda c: c.ps())).models == []  # unloaded after the buffered call
    await in_thread(ask, url, lambda c: c.generate(model="m", prompt="/a x", keep_alive="10m"))
    (entry,) = (await in_thread(ask, url, lambda c: c.ps())).models
    assert 590 < (entry.expires_at - datetime.now(UTC)).total_seconds() <= 600


# ---- the bundled agents ----------------------------------------------------------------------


async def test_rag_in_chat_and_generate(make_config, start_proxy, agent_dir: Path, tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    write_docs(docs, DOCS)
    copy_bundled(agent_dir, "rag", config=f'docs = "{docs}"\ntop_k = 1\n')
    url = await start_proxy(with_agents(make_config({"echo": {"echo": True}}), agent_dir, "rag"))
    reply = await in_thread(ask, url, lambda c: c.chat(model="echo", messages=user("/rag How often should I water roses?")))
    system, question = echoed(reply.message.content)["messages"]
    assert question == {"role": "user", "content": "How often should I water roses?"}
    assert system["role"] == "system"
    assert "[1] (source: garden/roses.txt)\nRoses need six hours of sun" in system["content"]
    # generate's system prompt is the one system message; the passages join it
    reply = await in_thread(
        ask, url, lambda c: c.generate(model="echo", prompt="/rag which server is evicted?", system="Be brief.")
    )
    system, question = echoed(reply.response)["messages"]
    assert system["content"].startswith("Be brief.\n\nAnswer the user's question")
    assert "(source: pool.md > Eviction)" in system["content"]
    assert question == {"role": "user", "content": "which server is evicted?"}
    raw = await in_thread(ask, url, lambda c: c.generate(model="echo", prompt="/rag knead the dough", raw=True))
    prompt = echoed(raw.response)["prompt"]
    assert "(source: cooking.md > Bread)" in prompt and prompt.endswith("\n\nknead the dough")


async def test_parallel_best_and_all(make_config, start_proxy, agent_dir: Path, http) -> None:
    copy_bundled(agent_dir, "parallel", parallel_config(["sure", "unsure", "broken"], samples=1, pick="logprob"))
    shutil.copytree(agent_dir / "parallel", agent_dir / "pall")  # the same agent under another name
    (agent_dir / "pall" / "config.toml").write_text(parallel_config([], samples=3, mode="all"))
    models = {
        "sure": {"content": "Paris", "logprob": -0.05},
        "unsure": {"content": "Lyon maybe", "logprob": -2.5},
        "broken": {"exit_on_load": 3},
        "echo": {"echo": True, "slots": 3},
    }
    url = await start_proxy(with_agents(make_config(models, size=4), agent_dir, "parallel", "pall"))
    question = user("/parallel Capital of France?")
    reply = await in_thread(ask, url, lambda c: c.chat(model="unsure", messages=question))
    assert reply.message.content == "Paris" and reply.model == "sure"  # the best candidate, named
    assert reply.logprobs is None  # asked for scoring only
    # the report rides on the last object; the ollama client drops fields it does not know, raw JSON has it
    body = (await http.post(url + "/api/chat", json={"model": "unsure", "messages": question, "stream": False})).json()
    report = body["smart_proxy"]["parallel"]
    assert report["chosen"] == 0
    assert [(r["model"], r["status"]) for r in report["candidates"]] == [
        ("sure", "ok"),
        ("unsure", "ok"),
        ("broken", "error"),
    ]
    streamed = await http.post(url + "/api/generate", json={"model": "unsure", "prompt": "/parallel Capital?"})
    lines = ndjson(streamed.content)
    assert [(line["response"], line["done"]) for line in lines] == [("Paris", False), ("", True)]
    assert lines[-1]["smart_proxy"]["parallel"]["chosen"] == 0 and lines[-1]["model"] == "sure"

    # mode = all: Ollama has no n; the first answer is the message and every one is listed
    body = (
        await http.post(url + "/api/chat", json={"model": "echo", "messages": user("/pall hi"), "stream": False})
    ).json()
    choices = body["smart_proxy"]["choices"]
    assert [c["done_reason"] for c in choices] == ["length"] * 3
    seeds = sorted(echoed(c["message"]["content"])["seed"] for c in choices)
    assert seeds == [1, 2, 3] and body["message"] == choices[0]["message"]
    assert body["eval_count"] == sum(r["completion_tokens"] for r in body["smart_proxy"]["parallel"]["candidates"])
    streamed = await http.post(url + "/api/chat", json={"model": "echo", "messages": user("/pall hi")})
    lines = ndjson(streamed.content)
    assert len(lines) == 2 and lines[0]["message"] == choices[0]["message"] | {"content": lines[0]["message"]["content"]}
    assert len(lines[-1]["smart_proxy"]["choices"]) == 3


async def test_parallel_all_failing_falls_back_and_says_so(make_config, start_proxy, agent_dir: Path) -> None:
    copy_bundled(agent_dir, "parallel", parallel_config(["nope1", "nope2"], samples=1))
    url = await start_proxy(with_agents(make_config({"m": {"content": "plain answer"}}), agent_dir, "parallel"))
    seen: list[httpx.Response] = []
    reply = await in_thread(ask, url, lambda c: c.chat(model="m", messages=user("/parallel hi")), None, seen)
    assert reply.message.content == "plain answer" and reply.model == "m"
    assert seen[-1].headers[ERRORS_HEADER] == "parallel:error"


async def test_upstream_errors_keep_their_status(make_config, start_proxy, agent_dir: Path) -> None:
    write_agent(agent_dir, "a", marker("a"))
    write_agent(agent_dir, "tag", TAG)
    url = await start_proxy(
        with_agents(make_config({"bad": {"reject": {"status": 400, "message": "fake failure"}}}), agent_dir, "a", "tag")
    )
    for command in ("/a hi", "/tag hi"):  # buffered and live
        with pytest.raises(ollama.ResponseError) as info:
            await in_thread(ask, url, lambda c, command=command: c.chat(model="bad", messages=user(command)))
        assert info.value.status_code == 400 and "fake failure" in info.value.error
    with pytest.raises(ollama.ResponseError) as info:
        await in_thread(ask, url, lambda c: c.generate(model="nope", prompt="/a hi"))
    assert info.value.status_code == 404


async def test_an_error_answer_still_names_the_failed_agents(make_config, start_proxy, agent_dir: Path, http) -> None:
    write_agent(agent_dir, "boom", BOOM)
    write_agent(agent_dir, "a", marker("a"))
    write_agent(agent_dir, "lost", SWAP, config='to = "nowhere"\n')
    models = {"bad": {"reject": {"status": 400, "message": "fake failure"}}, "m": {}}
    url = await start_proxy(with_agents(make_config(models, size=2), agent_dir, "boom", "a", "lost"))
    for command in ("/boom /a hi", "/boom hi"):  # buffered and live
        for stream in (False, True):
            body = {"model": "bad", "messages": user(command), "stream": stream}
            response = await http.post(url + "/api/chat", json=body)
            assert response.status_code == 400, (command, stream, response.text)
            assert "fake failure" in response.json()["error"]
            assert response.headers[ERRORS_HEADER] == "boom:error", (command, stream)
    for command in ("/boom /lost /a hi", "/boom /lost hi"):
        response = await http.post(url + "/api/chat", json={"model": "m", "messages": user(command), "stream": False})
        assert response.status_code == 404 and "'nowhere' not found" in response.json()["error"], command
        assert response.headers[ERRORS_HEADER] == "boom:error", command
    response = await http.post(url + "/api/generate", json={"model": "bad", "prompt": "/a hi", "stream": False})
    assert response.status_code == 400 and ERRORS_HEADER not in response.headers


# ---- models of an Ollama upstream -------------------------------------------------------------


async def test_agents_run_on_models_of_an_ollama_upstream(
    tmp_path: Path, fake_binary: str, start_proxy, fake_ollama, agent_dir: Path
) -> None:
    """/api/chat and /api/generate run the chain for a ``backend = ollama`` model, through its /v1 routes."""
    from .test_ollama import upstream_config

    write_agent(agent_dir, "a", marker("a"))
    write_agent(agent_dir, "tag", TAG)
    write_agent(agent_dir, "boom", BOOM)
    write_agent(agent_dir, "swap", SWAP, config='to = "up"\n')
    config = upstream_config(tmp_path, fake_binary, fake_ollama.url)
    url = await start_proxy(with_agents(config, agent_dir, "a", "tag", "boom", "swap"))
    pieces = ["piece0 ", "piece1 ", "piece2 "]

    reply = await in_thread(ask, url, lambda c: c.chat(model="up", messages=user("/a hi"), options={"temperature": 0.5}))
    assert reply.message.content == "".join(pieces) + "<a>" and reply.model == "up" and reply.done
    assert reply.eval_count == 3 and reply.prompt_eval_count == 2
    method, path, sent = fake_ollama.requests[-1]
    assert (method, path, sent["model"]) == ("POST", "/v1/chat/completions", "remote-llm")
    assert sent["messages"] == user("hi [a]") and sent["stream"] is False and sent["temperature"] == 0.5
    # live: the upstream's SSE is translated into NDJSON as it comes
    parts = await in_thread(ask, url, lambda c: c.chat(model="up", messages=user("/tag hi"), stream=True))
    assert [p.message.content for p in parts[:-1]] == pieces and parts[-1].done and parts[-1].model == "up"
    sent = fake_ollama.requests[-1][2]
    assert sent["messages"] == [{"role": "system", "content": "tagged"}, *user("hi")] and sent["stream"] is True
    # generate: templated (chat) and raw (/v1/completions), streamed and not
    generated = await in_thread(ask, url, lambda c: c.generate(model="up", prompt="/a Once upon", stream=True))
    assert "".join(p.response for p in generated) == "".join(pieces) + "<a>" and generated[-1].done
    raw = await in_thread(ask, url, lambda c: c.generate(model="up", prompt="/tag Once upon", raw=True))
    assert raw.response == "".join(pieces) and raw.done
    assert fake_ollama.requests[-1][1] == "/v1/completions" and fake_ollama.requests[-1][2]["prompt"] == "tagged Once upon"
    # failures are named; a hook may send a local model's request there
    seen: list[httpx.Response] = []
    await in_thread(ask, url, lambda c: c.chat(model="up", messages=user("/boom hi")), None, seen)
    assert seen[-1].headers[ERRORS_HEADER] == "boom:error"
    swapped = await in_thread(ask, url, lambda c: c.chat(model="local", messages=user("/swap hi")))
    assert swapped.message.content == "".join(pieces) and swapped.model == "up"
    # no command: Ollama's own route, untouched
    plain = await in_thread(ask, url, lambda c: c.chat(model="up", messages=user("/usr/bin is a folder")))
    assert plain.message.content == "".join(pieces)
    assert fake_ollama.requests[-1][:2] == ("POST", "/api/chat")
    assert fake_ollama.requests[-1][2]["messages"] == user("/usr/bin is a folder")
