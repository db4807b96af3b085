"""The OpenAI dialect against the fake llama-server, through the whole in-process proxy."""

from __future__ import annotations

import json
import os
import signal
from contextlib import aclosing
from functools import partial

import httpx
import openai
import trio

from .test_ollama import backend_requests


async def test_chat_non_stream_and_stream(make_config, start_proxy, http: httpx.AsyncClient) -> None:
    url = await start_proxy(make_config({"m": {"tokens": 4}}))
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "x_unknown": {"kept": True}}
    response = await http.post(f"{url}/v1/chat/completions", json=body)
    assert response.status_code == 200
    data = response.json()
    assert data["model"] == "m"
    assert data["choices"][0]["message"]["content"] == "tok0 tok1 tok2 tok3 "

    chunks = []
    async with http.stream("POST", f"{url}/v1/chat/completions", json={**body, "stream": True}) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        async for chunk in stream.aiter_text():
            chunks.append(chunk)
    events = [line for line in "".join(chunks).splitlines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    assert len(events) == 4 + 2  # four tokens, the final chunk, [DONE]


async def test_completions_and_embeddings(make_config, start_proxy, http: httpx.AsyncClient) -> None:
    url = await start_proxy(make_config({"m": {"tokens": 2}}))
    response = await http.post(f"{url}/v1/completions", json={"model": "m", "prompt": "Once"})
    assert response.status_code == 200 and response.json()["choices"][0]["text"] == "tok0 tok1 "
    response = await http.post(f"{url}/v1/embeddings", json={"model": "m", "input": ["a", "b"]})
    assert response.status_code == 200 and len(response.json()["data"]) == 2


async def test_models_lists_catalog_with_loaded_state(make_config, start_proxy, http: httpx.AsyncClient) -> None:
    url = await start_proxy(make_config({"a": {}, "b": {}}))
    await http.post(f"{url}/v1/completions", json={"model": "a", "prompt": "x"})
    data = (await http.get(f"{url}/v1/models")).json()["data"]
    assert {m["id"]: m["loaded"] for m in data} == {"a": True, "b": False}


async def test_models_show_the_memory_one_server_holds(make_config, start_proxy, http: httpx.AsyncClient) -> None:
    from smart_proxy.memory import read_estimate

    config = make_config({"a": {}, "b": {}, "d": {}}, {"d": {"memory": "3GiB"}})
    url = await start_proxy(config)
    await http.post(f"{url}/v1/completions", json={"model": "a", "prompt": "x"})
    memory = {m["id"]: m["memory"] for m in (await http.get(f"{url}/v1/models")).json()["data"]}
    (server,) = (await http.get(f"{url}/health")).json()["pool"]["servers"]
    assert memory["a"] == server["memory"] > 0  # the loaded server's, as admitted
    assert memory["b"] == read_estimate([config.models["b"].path], []).total  # estimated, not loaded
    assert memory["d"] == 3 * 1024**3  # declared


async def test_health_shows_pool(make_config, start_proxy, http: httpx.AsyncClient) -> None:
    url = await start_proxy(make_config({"a": {}}, size=3))
    await http.post(f"{url}/v1/completions", json={"model": "a", "prompt": "x"})
    health = (await http.get(f"{url}/health")).json()
    assert health["pool"]["capacity"] == 3
    (server,) = health["pool"]["servers"]
    assert server["model"] == "a" and server["state"] == "ready"
    assert isinstance(server["pid"], int) and isinstance(server["port"], int)


async def test_bad_input_gets_openai_errors(make_config, start_proxy, http: httpx.AsyncClient) -> None:
    url = await start_proxy(make_config({"a": {}}))
    cases = [
        (b"{not json", 400, "not valid JSON"),
        (b"[1, 2]", 400, "must be a JSON object"),
        (json.dumps({"messages": []}).encode(), 400, "missing 'model'"),
        (json.dumps({"model": "a"}).encode(), 400, "missing 'messages'"),
        (json.dumps({"model": "nope", "messages": []}).encode(), 404, "known models: a"),
    ]
    for raw, status, text in cases:
        response = await http.post(f"{url}/v1/chat/completions", content=raw)
        assert response.status_code == status, raw
        error = response.json()["error"]
        assert text in error["message"] and error["code"] == status and error["type"]
    response = await http.get(f"{url}/v1/nothing-here")
    assert response.status_code == 404 and "error" in response.json()
    # and it still serves
    response = await http.post(f"{url}/v1/completions", json={"model": "a", "prompt": "x"})
    assert response.status_code == 200


async def test_load_failure_is_502_with_stderr_tail(make_config, start_proxy, http: httpx.AsyncClient) -> None:
    url = await start_proxy(make_config({"bad": {"exit_on_load": 1}}))
    with trio.fail_after(5):
        response = await http.post(f"{url}/v1/completions", json={"model": "bad", "prompt": "x"})
    assert response.status_code == 502
    assert "invalid magic" in response.json()["error"]["message"]


async def test_load_timeout_is_504(make_config, start_proxy, http: httpx.AsyncClient) -> None:
    url = await start_proxy(make_config({"slow": {"load_delay": 30}}, load_timeout="300ms"))
    response = await http.post(f"{url}/v1/completions", json={"model": "slow", "prompt": "x"})
    assert response.status_code == 504
    assert response.json()["error"]["type"] == "model_load_timeout"


async def test_pool_busy_is_503_with_retry_after(make_config, start_proxy, http: httpx.AsyncClient) -> None:
    url = await start_proxy(make_config({"a": {"token_delay": 0.2, "tokens": 5}, "b": {}}, size=1, queue_timeout="200ms"))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(http.post, f"{url}/v1/completions", json={"model": "a", "prompt": "x"}))
        await trio.sleep(0.5)  # a is now generating for ~1 s
        response = await http.post(f"{url}/v1/completions", json={"model": "b", "prompt": "x"})
    assert response.status_code == 503
    assert int(response.headers["retry-after"]) >= 1


async def test_client_leaving_mid_stream_frees_the_slot(make_config, start_proxy, http: httpx.AsyncClient) -> None:
    url = await start_proxy(make_config({"a": {"token_delay": 0.1, "tokens": 100}}))
    async with http.stream("POST", f"{url}/v1/completions", json={"model": "a", "prompt": "x", "stream": True}) as s:
        async with aclosing(s.aiter_raw()) as chunks:
            async for _ in chunks:
                break  # leave after the first chunk
    health = (await http.get(f"{url}/health")).json()
    port = health["pool"]["servers"][0]["port"]
    with trio.fail_after(2):
        while True:
            slots = (await http.get(f"http://127.0.0.1:{port}/slots")).json()
            in_flight = (await http.get(f"{url}/health")).json()["pool"]["servers"][0]["in_flight"]
            if not any(slot["is_processing"] for slot in slots) and in_flight == 0:
                break
            await trio.sleep(0.05)


async def test_kill_9_mid_stream_ends_that_stream_with_an_error_event(make_config, start_proxy, http) -> None:
    url = await start_proxy(make_config({"a": {"token_delay": 0.05, "tokens": 200}, "b": {"tokens": 3}}))
    body = {"model": "a", "prompt": "x", "stream": True}
    received = b""
    async with http.stream("POST", f"{url}/v1/completions", json=body) as stream:
        async with aclosing(stream.aiter_raw()) as chunks:
            async for chunk in chunks:
                received += chunk
                if received.count(b"data: ") == 3:
                    health = (await http.get(f"{url}/health")).json()
                    pid = next(s["pid"] for s in health["pool"]["servers"] if s["model"] == "a")
                    os.kill(pid, signal.SIGKILL)
    last = received.strip().split(b"\n\n")[-1]
    assert last.startswith(b"data: ")
    error = json.loads(last[len(b"data: ") :])["error"]
    assert error["code"] == 502 and "broke off" in error["message"]
    # another model is unaffected, /health tells what happened, and the next request restarts a
    assert (await http.post(f"{url}/v1/completions", json={"model": "b", "prompt": "x"})).status_code == 200
    health = (await http.get(f"{url}/health")).json()
    a_stats = next(m for m in health["pool"]["models"] if m["model"] == "a")
    assert a_stats["crashes"] == 1 and a_stats["last_exit_code"] == -9
    assert a_stats["last_signal"] == "SIGKILL"
    assert "was killed by SIGKILL (not by this proxy) while serving: most often the kernel's out-of-memory killer" in (
        a_stats["last_error"]
    )
    response = await http.post(f"{url}/v1/completions", json={"model": "a", "prompt": "x", "max_tokens": 2})
    assert response.status_code == 200


async def test_kill_9_mid_request_non_stream_is_502(make_config, start_proxy, http) -> None:
    url = await start_proxy(make_config({"a": {"token_delay": 0.05, "tokens": 100}}))

    async def kill_soon() -> None:
        await trio.sleep(0.5)
        health = (await http.get(f"{url}/health")).json()
        os.kill(health["pool"]["servers"][0]["pid"], signal.SIGKILL)

    async with trio.open_nursery() as nursery:
        await http.post(f"{url}/v1/completions", json={"model": "a", "prompt": "x", "max_tokens": 1})  # load it
        nursery.start_soon(kill_soon)
        response = await http.post(f"{url}/v1/completions", json={"model": "a", "prompt": "x"})
    assert response.status_code == 502
    assert response.json()["error"]["type"] == "upstream_error"


async def test_in_flight_requests_bounded_by_server_slots(make_config, start_proxy, http) -> None:
    """The proxy sends a llama-server at most total_slots requests at once and queues the rest itself."""
    url = await start_proxy(make_config({"a": {"slots": 2, "token_delay": 0.05, "tokens": 6}}))
    await http.post(f"{url}/v1/completions", json={"model": "a", "prompt": "x", "max_tokens": 1})  # load it
    port = (await http.get(f"{url}/health")).json()["pool"]["servers"][0]["port"]
    busiest = 0
    statuses = []

    async def ask() -> None:
        async with http.stream("POST", f"{url}/v1/completions", json={"model": "a", "prompt": "x", "stream": True}) as s:
            statuses.append(s.status_code)
            async for _ in s.aiter_raw():
                pass

    async def watch() -> None:
        nonlocal busiest
        while True:
            props = (await http.get(f"http://127.0.0.1:{port}/props")).json()
            busiest = max(busiest, props["fake_busy"])
            await trio.sleep(0.01)

    with trio.fail_after(10):
        async with trio.open_nursery() as watcher:
            watcher.start_soon(watch)
            async with trio.open_nursery() as clients:
                for _ in range(5):
                    clients.start_soon(ask)
            watcher.cancel_scope.cancel()
    assert statuses == [200] * 5
    assert busiest == 2  # both slots were used, never more


async def _hold_the_slot(http: httpx.AsyncClient, url: str, streaming: trio.Event, received: list[bytes]) -> None:
    """A stream that holds model a's one slot until it ends; ``streaming`` is set at its first chunk."""
    async with http.stream("POST", f"{url}/v1/completions", json={"model": "a", "prompt": "x", "stream": True}) as s:
        assert s.status_code == 200
        async for chunk in s.aiter_raw():
            received.append(chunk)
            streaming.set()


async def test_waiting_for_a_slot_is_bounded_by_queue_timeout(make_config, start_proxy, http) -> None:
    """A READY server whose slots are all busy: the wait for one ends at queue_timeout with the pool's 503."""
    url = await start_proxy(make_config({"a": {"slots": 1, "tokens": 10, "token_delay": 0.15}}, queue_timeout="300ms"))
    await http.post(f"{url}/v1/completions", json={"model": "a", "prompt": "x", "max_tokens": 1})  # load it
    streaming, received = trio.Event(), []
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_hold_the_slot, http, url, streaming, received)
            await streaming.wait()
            for body in ({"model": "a", "prompt": "y"}, {"model": "a", "prompt": "y", "stream": True}):
                response = await http.post(f"{url}/v1/completions", json=body)
                assert response.status_code == 503, response.text
                error = response.json()["error"]
                assert error["type"] == "server_busy" and "queue_timeout (0.3s)" in error["message"], error
                assert int(response.headers["retry-after"]) >= 1
            assert b"data: [DONE]" not in b"".join(received)  # answered while the slot was still held
    # the stream that held the slot was not disturbed, and nothing was leaked: the one slot serves again
    text = b"".join(received)
    assert text.count(b'"text": "tok') == 10 and text.endswith(b"data: [DONE]\n\n")
    again = await http.post(f"{url}/v1/completions", json={"model": "a", "prompt": "x", "max_tokens": 1})
    assert again.status_code == 200
    assert (await http.get(f"{url}/health")).json()["pool"]["servers"][0]["in_flight"] == 0


async def test_a_client_leaving_while_it_waits_for_a_slot_leaks_nothing(make_config, start_proxy, http) -> None:
    url = await start_proxy(make_config({"a": {"slots": 1, "tokens": 6, "token_delay": 0.1}}, queue_timeout="30s"))
    await http.post(f"{url}/v1/completions", json={"model": "a", "prompt": "x", "max_tokens": 1})  # load it
    streaming, received = trio.Event(), []
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_hold_the_slot, http, url, streaming, received)
            await streaming.wait()
            with trio.move_on_after(0.2) as waited:  # hangs up while it waits for the slot
                await http.post(f"{url}/v1/completions", json={"model": "a", "prompt": "y"})
            assert waited.cancelled_caught
    with trio.fail_after(5):  # the one slot and the lease are free: the next request is served at once
        again = await http.post(f"{url}/v1/completions", json={"model": "a", "prompt": "x", "max_tokens": 1})
    assert again.status_code == 200
    assert (await http.get(f"{url}/health")).json()["pool"]["servers"][0]["in_flight"] == 0


async def test_a_hung_llama_server_gives_502_and_request_timeout_504(make_config, start_proxy, http: httpx.AsyncClient) -> None:
    config = make_config({"hung": {"hang_after": 0}}, health_interval="100ms", health_timeout="200ms", health_failures=2)
    url = await start_proxy(config)
    for stream in (False, True):
        with trio.fail_after(10):
            body = {"model": "hung", "stream": stream, "messages": [{"role": "user", "content": "hi"}]}
            response = await http.post(f"{url}/v1/chat/completions", json=body)
        assert response.status_code == 502
        error = response.json()["error"]
        assert error["type"] == "upstream_error" and error["code"] == 502
    with trio.fail_after(5):  # the answer may go out before the pool has counted the kill behind it
        while True:
            health = (await http.get(f"{url}/health")).json()
            [hung] = [m for m in health["pool"]["models"] if m["model"] == "hung"]
            if hung["crashes"] >= 1:
                break
            await trio.sleep(0.05)
    assert "stopped answering" in hung["last_error"]
    # a proxy of its own, probing at the default pace: only request_timeout can end this request
    url = await start_proxy(make_config({"limited": {"hang_after": 0}}, {"limited": {"request_timeout": "300ms"}}))
    with trio.fail_after(5):
        response = await http.post(f"{url}/v1/completions", json={"model": "limited", "prompt": "x"})
    assert response.status_code == 504
    error = response.json()["error"]
    assert error["type"] == "upstream_timeout" and "request_timeout (0.3s)" in error["message"]



def _timeless(value: object) -> object:
    """An answer without its ``created`` times (the fake stamps each answer with the second it made it)."""
    if isinstance(value, dict):
        return {key: _timeless(item) for key, item in value.items() if key != "created"}
    if isinstance(value, list):
        return [_timeless(item) for item in value]
    return value


async def test_paths_without_v1_are_the_same_routes(make_config, start_proxy, http: httpx.AsyncClient) -> None:
    """``/chat/completions``, ``/completions``, ``/embeddings`` and ``/models``: llama-server's aliases, same answers."""
    url = await start_proxy(make_config({"m": {"tokens": 3}}, model_options={"m": {"embeddings": "true"}}))
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    requests = [
        ("/chat/completions", chat),
        ("/chat/completions", {**chat, "stream": True}),
        ("/completions", {"model": "m", "prompt": "Once"}),
        ("/embeddings", {"model": "m", "input": ["a", "b"]}),
        ("/chat/completions", {"model": "nope", "messages": []}),
        ("/completions", {"model": "m"}),
    ]
    for path, body in requests:
        answers = [await http.post(url + prefix + path, json=body) for prefix in ("/v1", "")]
        assert answers[0].status_code == answers[1].status_code, path
        assert answers[0].headers["content-type"] == answers[1].headers["content-type"]
        if body.get("stream"):
            events = [[line for line in a.text.splitlines() if line] for a in answers]
            assert events[0][-1] == events[1][-1] == "data: [DONE]"
            parsed = [[json.loads(line.removeprefix("data: ")) for line in e[:-1]] for e in events]
            assert _timeless(parsed[0]) == _timeless(parsed[1])
        else:
            assert _timeless(answers[0].json()) == _timeless(answers[1].json()), path
    sent = await backend_requests(http, url, "m")
    assert [r["path"] for r in sent] == [p for path, _ in requests[:4] for p in ["/v1" + path] * 2]  # both to /v1
    models = [(await http.get(url + path)).json() for path in ("/v1/models", "/models")]
    assert _timeless(models[0]) == _timeless(models[1])

    def ask() -> str | None:  # the official client with a base URL without /v1, as some clients are set up
        with openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=15) as client:
            return client.chat.completions.create(model="m", messages=chat["messages"]).choices[0].message.content

    assert await trio.to_thread.run_sync(ask) == "tok0 tok1 tok2 "
