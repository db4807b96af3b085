"""Peers through the handlers (smart_proxy/handlers/fleet.py): an Ollama peer and smart-proxy peers, in-process.

The fake Ollama (tests/fake_ollama.py) is an Ollama peer whose ``name:tag`` models the
catalog does not name; in-process smart-proxies over the fake llama-server are
smart-proxy peers of a router proxy. The router learns their models, serves them in
every dialect with the official clients, routes a shared model to the node where it is
loaded, and fails over when a node goes away: marked down, the requests go to the other
node with none failed, and it comes back after a restart.
"""

from __future__ import annotations

import json
import logging
import os
from functools import partial
from pathlib import Path

import attrs
import httpx
import ollama
import openai
import pytest
import trio

from smart_proxy import server as server_module
from smart_proxy.config import Config, structure
from smart_proxy.download import Downloads
from smart_proxy.pool import Pool
from smart_proxy.process import free_port
from smart_proxy.server import serve

from . import fake_ollama as fake_ollama_module

USER = [{"role": "user", "content": "hi"}]
NODE_KEY = "sk-node-secret-4242"


async def in_thread(fn, *args, **kwargs):
    return await trio.to_thread.run_sync(partial(fn, *args, **kwargs))


def config(tmp_path: Path, fake_binary: str, models: dict[str, dict], peers: dict[str, dict], **proxy: str) -> Config:
    raw: dict[str, dict[str, str]] = {"pool": {"llama_server": fake_binary, "load_timeout": "10s", "stop_timeout": "2s"}}
    if proxy:
        raw["proxy"] = dict(proxy)
    for name, behaviour in models.items():
        file = tmp_path / f"{name}-{len(list(tmp_path.iterdir()))}.json"
        file.write_text(json.dumps(behaviour))
        raw[f"model:{name}"] = {"path": str(file)}
    for name, settings in peers.items():
        raw[f"peer:{name}"] = {key: str(value) for key, value in settings.items()}
    return structure(raw, base_dir=str(tmp_path))


class Node:
    """A proxy served in-process that a test can stop (its listener closed) and start again on the same port."""

    def __init__(self, nursery: trio.Nursery, config: Config) -> None:
        self._nursery = nursery
        self._config = config
        self._stop = trio.Event()
        self._stopped = trio.Event()
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> Node:
        self._stop, self._stopped = trio.Event(), trio.Event()

        async def run(task_status: trio.TaskStatus[list[str]]) -> None:
            try:
                await serve(self._config, port=self.port, shutdown_trigger=self._stop.wait, task_status=task_status)
            finally:
                self._stopped.set()

        binds = await self._nursery.start(run)
        self.port = int(binds[0].rsplit(":", 1)[1])
        return self

    async def stop(self) -> None:
        self._stop.set()
        await self._stopped.wait()


async def wait_for(predicate, what: str) -> None:
    """Poll ``predicate()`` until it is true; fail (naming ``what``) after 10 s."""
    try:
        with trio.fail_after(10):
            while not await predicate():
                await trio.sleep(0.05)
    except trio.TooSlowError:
        raise AssertionError(f"timed out waiting for {what}") from None


async def peer_report(http: httpx.AsyncClient, url: str) -> dict[str, dict]:
    body = (await http.get(f"{url}/health")).json()
    return {peer["name"]: peer for peer in body.get("peers", [])}


# ---- an Ollama peer ----------------------------------------------------------------------------


@pytest.fixture
def tagged_ollama(monkeypatch: pytest.MonkeyPatch, fake_ollama):
    """The fake Ollama with a ``name:tag`` model besides its ``:latest`` ones."""
    tagged = {"family": "llama", "parameter_size": "7B", "embedding": False}
    monkeypatch.setitem(fake_ollama_module.MODELS, "remote-llm:7b", tagged)
    return fake_ollama


def last_post(fake) -> tuple:
    """The last request the fake took that was not a GET (its lists are read in the background, any time)."""
    return next(r for r in reversed(fake.requests) if r[0] != "GET")


async def test_ollama_peer_models_are_served_by_name_in_both_dialects(
    tmp_path, fake_binary, nursery, http, tagged_ollama, caplog
) -> None:
    caplog.set_level(logging.DEBUG)
    router = await Node(
        nursery,
        config(tmp_path, fake_binary, {"local": {}},
               {"box": {"url": tagged_ollama.url, "kind": "ollama", "api_key": NODE_KEY, "refresh": "0.2s"}}),
    ).start()
    url = router.url

    with ollama.Client(host=url) as client:
        reply = await in_thread(client.chat, model="remote-llm:7b", messages=USER)
        assert reply.message.content == "piece0 piece1 piece2 "
        assert last_post(tagged_ollama)[:2] == ("POST", "/api/chat")
        assert last_post(tagged_ollama)[2]["model"] == "remote-llm:7b"  # the body as the client sent it
        parts = await in_thread(lambda: list(client.generate(model="remote-llm:7b", prompt="x", stream=True)))
        assert "".join(p.response for p in parts) == "piece0 piece1 piece2 " and parts[-1].done
        embedded = await in_thread(client.embed, model="remote-embed", input=["ab", "c"])
        assert embedded.embeddings == [[0.5, 0.5, 2.0], [0.5, 0.5, 1.0]]
        listed = {m.model: m for m in (await in_thread(client.list)).models}
        # /api/tags merges the catalog's model with every model the peer has
        assert set(listed) == {"local:latest", "remote-llm:latest", "remote-llm:7b", "remote-embed:latest"}
        assert listed["remote-llm:7b"].details.parameter_size == "7B"
        shown = await in_thread(client.show, "remote-llm:7b")
        assert shown.modelfile == "FROM remote-llm:7b\n" and shown.details.parameter_size == "7B"
        local_answer = await in_thread(client.generate, model="local", prompt="x")
        assert local_answer.done
    tags = (await http.get(f"{url}/api/tags")).json()["models"]
    where = {entry["name"]: entry["served_by"] for entry in tags}
    assert where == {
        "local:latest": ["local"], "remote-llm:latest": ["peer:box"], "remote-llm:7b": ["peer:box"],
        "remote-embed:latest": ["peer:box"],
    }

    with openai.OpenAI(base_url=f"{url}/v1", api_key="none") as client:
        completion = await in_thread(client.chat.completions.create, model="remote-llm:7b", messages=USER)
        assert completion.choices[0].message.content == "piece0 piece1 piece2 "
        assert last_post(tagged_ollama)[:2] == ("POST", "/v1/chat/completions")
        stream = await in_thread(
            lambda: list(client.chat.completions.create(model="remote-llm:7b", messages=USER, stream=True))
        )
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "piece0 piece1 piece2 "
        models = {m.id: m for m in (await in_thread(client.models.list)).data}
        assert {"local", "remote-llm:7b", "remote-llm:latest", "remote-embed:latest"} <= set(models)
        assert models["remote-llm:7b"].model_extra["served_by"] == ["peer:box"]
        assert models["local"].model_extra["served_by"] == ["local"]
        with pytest.raises(openai.NotFoundError):  # a name nobody has is still a 404, in OpenAI's shape
            await in_thread(client.chat.completions.create, model="remote-llm:70b", messages=USER)

    # /api/ps on the peer named what the chats loaded; the router reads it into the model's state
    await wait_for(
        lambda: _status(http, url, "remote-llm:7b", "loaded"), "the router to see remote-llm:7b loaded"
    )
    running = [m["name"] for m in (await http.get(f"{url}/api/ps")).json()["models"]]
    assert "remote-llm:7b" in running and "remote-embed:latest" not in running  # loaded on the peer, as its /api/ps says
    assert NODE_KEY not in caplog.text  # the key went to the peer, never to the log
    health = (await http.get(f"{url}/health")).json()
    assert health["peers"][0]["name"] == "box" and health["peers"][0]["status"] == "ok"
    assert NODE_KEY not in json.dumps(health)


async def _status(http: httpx.AsyncClient, url: str, model: str, value: str) -> bool:
    data = (await http.get(f"{url}/v1/models")).json()["data"]
    return any(entry["id"] == model and entry["status"]["value"] == value for entry in data)


async def test_an_openai_peer_takes_ollama_chat_translated_and_refuses_the_rest(
    tmp_path, fake_binary, nursery, http
) -> None:
    node = await Node(nursery, config(tmp_path, fake_binary, {"only-openai": {"tokens": 3}}, {})).start()
    router = await Node(
        nursery, config(tmp_path, fake_binary, {}, {"vllm": {"url": node.url, "kind": "openai"}})
    ).start()
    ok = await http.post(f"{router.url}/v1/chat/completions", json={"model": "only-openai", "messages": USER})
    assert ok.status_code == 200 and ok.headers["x-served-by"] == "peer:vllm"
    with ollama.Client(host=router.url) as client:  # translated to /v1/chat/completions and back, as for llama-server
        parts = await in_thread(lambda: list(client.chat(model="only-openai", messages=USER, stream=True)))
        assert "".join(p.message.content for p in parts) == "tok0 tok1 tok2 " and parts[-1].done
        whole = await in_thread(client.generate, model="only-openai", prompt="x")
        assert whole.response == "tok0 tok1 tok2 " and whole.done and whole.model == "only-openai"
    refused = await http.post(f"{router.url}/api/embed", json={"model": "only-openai", "input": "x"})
    assert refused.status_code == 400
    assert "does not take /api/embed" in refused.json()["error"] and "/v1/embeddings" in refused.json()["error"]
    load = await http.post(f"{router.url}/api/chat", json={"model": "only-openai", "messages": []})
    assert load.status_code == 400  # a load request: nothing an OpenAI server can be asked


# ---- smart-proxy peers -------------------------------------------------------------------------


async def test_smart_proxy_peer_serves_every_dialect_with_its_key(tmp_path, fake_binary, nursery, http, caplog) -> None:
    caplog.set_level(logging.INFO, "smart_proxy.access")
    node = await Node(
        nursery, config(tmp_path, fake_binary, {"node-only": {"tokens": 3}}, {}, api_keys=NODE_KEY)
    ).start()
    router = await Node(
        nursery,
        config(tmp_path, fake_binary, {}, {"node": {"url": node.url, "api_key": NODE_KEY, "refresh": "0.2s"}}),
    ).start()
    with openai.OpenAI(base_url=f"{router.url}/v1", api_key="none") as client:
        raw = await in_thread(
            client.chat.completions.with_raw_response.create, model="node-only", messages=USER
        )
        assert raw.headers["x-served-by"] == "peer:node"
        assert raw.parse().choices[0].message.content == "tok0 tok1 tok2 "
        stream = await in_thread(lambda: list(client.chat.completions.create(model="node-only", messages=USER, stream=True)))
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "tok0 tok1 tok2 "
    with ollama.Client(host=router.url) as client:
        parts = await in_thread(lambda: list(client.chat(model="node-only", messages=USER, stream=True)))
        assert "".join(p.message.content for p in parts) == "tok0 tok1 tok2 " and parts[-1].done
    messages = await http.post(
        f"{router.url}/v1/messages",
        json={"model": "node-only", "max_tokens": 8, "messages": USER, "stream": True},
    )
    assert messages.status_code == 200 and "event: message_stop" in messages.text and "event: error" not in messages.text
    responses = await http.post(f"{router.url}/v1/responses", json={"model": "node-only", "input": "hi", "stream": True})
    assert responses.status_code == 200 and responses.headers["x-served-by"] == "peer:node"
    assert "response.completed" in responses.text and "response.failed" not in responses.text  # judged by its own end
    # the router's access lines and metrics name the peer that served
    assert "POST /v1/chat/completions 200" in caplog.text and "model=node-only peer=node" in caplog.text
    metrics = (await http.get(f"{router.url}/metrics")).text
    assert 'smart_proxy_peer_requests_total{outcome="ok",peer="node"} 5.0' in metrics
    assert 'smart_proxy_requests_total{model="node-only",peer="node",route="/v1/chat/completions",status="200"} 2.0' in metrics
    # without the key the node refuses: the router sent it
    assert (await http.post(f"{node.url}/v1/chat/completions", json={"model": "node-only", "messages": USER})).status_code == 401


async def test_shared_model_goes_where_it_is_loaded(tmp_path, fake_binary, nursery, http) -> None:
    a = await Node(nursery, config(tmp_path, fake_binary, {"shared": {}, "a-only": {}}, {})).start()
    b = await Node(nursery, config(tmp_path, fake_binary, {"shared": {}, "b-only": {}}, {})).start()
    peers = {"a": {"url": a.url, "refresh": "0.1s"}, "b": {"url": b.url, "refresh": "0.1s"}}
    router = await Node(nursery, config(tmp_path, fake_binary, {}, peers)).start()
    for model, node in (("a-only", "peer:a"), ("b-only", "peer:b")):
        answer = await http.post(f"{router.url}/v1/chat/completions", json={"model": model, "messages": USER})
        assert answer.status_code == 200 and answer.headers["x-served-by"] == node
    # load "shared" on b only (straight to b); once the router has read that, it goes to b
    assert (await http.post(f"{b.url}/v1/chat/completions", json={"model": "shared", "messages": USER})).status_code == 200
    await wait_for(lambda: _loaded_on(http, router.url, "b", "shared"), "the router to see shared loaded on b")
    for _ in range(4):
        answer = await http.post(f"{router.url}/v1/chat/completions", json={"model": "shared", "messages": USER})
        assert answer.headers["x-served-by"] == "peer:b"
    models = {m["id"]: m for m in (await http.get(f"{router.url}/v1/models")).json()["data"]}
    assert models["shared"]["served_by"] == ["peer:a", "peer:b"] and models["shared"]["status"]["value"] == "loaded"


async def _loaded_on(http: httpx.AsyncClient, url: str, peer: str, model: str) -> bool:
    return model in (await peer_report(http, url)).get(peer, {}).get("loaded", [])


async def test_a_node_that_goes_away_is_taken_out_and_comes_back(tmp_path, fake_binary, nursery, http) -> None:
    a = await Node(nursery, config(tmp_path, fake_binary, {"shared": {}}, {})).start()
    b = await Node(nursery, config(tmp_path, fake_binary, {"shared": {}}, {})).start()
    settings = {"refresh": "0.2s", "failures": "2", "cooldown": "0.5s"}
    router = await Node(
        nursery, config(tmp_path, fake_binary, {}, {"a": {"url": a.url, **settings}, "b": {"url": b.url, **settings}})
    ).start()
    assert (await http.post(f"{a.url}/v1/chat/completions", json={"model": "shared", "messages": USER})).status_code == 200
    await wait_for(lambda: _loaded_on(http, router.url, "a", "shared"), "the router to see shared loaded on a")

    await a.stop()  # its listener closed: connections refused
    served: list[str] = []
    for _ in range(6):
        answer = await http.post(f"{router.url}/v1/chat/completions", json={"model": "shared", "messages": USER})
        assert answer.status_code == 200, answer.text  # none failed: each went on to b before any byte went out
        served.append(answer.headers["x-served-by"])
    assert served == ["peer:b"] * 6
    report = await peer_report(http, router.url)
    assert report["a"]["status"] == "down" and report["a"]["breaker"] in ("open", "half_open")
    assert "cannot reach" in report["a"]["error"] or "cannot read" in report["a"]["error"]
    metrics = (await http.get(f"{router.url}/metrics")).text
    assert 'smart_proxy_peer_up{peer="a"} 0.0' in metrics and 'smart_proxy_peer_up{peer="b"} 1.0' in metrics
    assert 'smart_proxy_peer_requests_total{outcome="failed",peer="a"}' in metrics
    assert (await http.get(f"{router.url}/health")).json()["status"] == "degraded"

    await a.start()  # the same port again
    await wait_for(lambda: _up(http, router.url, "a"), "a to be back after its half-open probe")
    assert (await http.post(f"{a.url}/v1/chat/completions", json={"model": "shared", "messages": USER})).status_code == 200
    await wait_for(lambda: _loaded_on(http, router.url, "a", "shared"), "the router to see shared loaded on a again")
    assert (await http.get(f"{router.url}/health")).json()["status"] == "ok"


async def _up(http: httpx.AsyncClient, url: str, peer: str) -> bool:
    return (await peer_report(http, url)).get(peer, {}).get("status") == "ok"


async def test_only_peers_have_it_and_all_are_down(tmp_path, fake_binary, nursery, http) -> None:
    a = await Node(nursery, config(tmp_path, fake_binary, {"remote": {}}, {})).start()
    router = await Node(
        nursery, config(tmp_path, fake_binary, {}, {"a": {"url": a.url, "failures": "1", "cooldown": "30s"}})
    ).start()
    await a.stop()
    first = await http.post(f"{router.url}/api/chat", json={"model": "remote", "messages": USER})
    assert first.status_code == 502 and "peer 'a'" in first.json()["error"]  # the one candidate, in Ollama's dialect
    second = await http.post(f"{router.url}/v1/chat/completions", json={"model": "remote", "messages": USER})
    assert second.status_code == 503 and second.headers["retry-after"] == "5"
    assert "served by peers that are down" in second.json()["error"]["message"]


async def test_local_queue_full_spills_over_to_a_peer(tmp_path, fake_binary, nursery, http) -> None:
    slow = {"slots": 1, "tokens": 40, "token_delay": 0.05}
    # the node's model file is the larger, so its cold start costs more: the first request stays here
    node = await Node(nursery, config(tmp_path, fake_binary, {"shared": {"padding": "x" * 4096}}, {})).start()
    router_config = config(tmp_path, fake_binary, {"shared": slow}, {"node": {"url": node.url, "refresh": "0.2s"}})
    router_config = attrs.evolve(router_config, pool=attrs.evolve(router_config.pool, max_queue=1))
    router = await Node(nursery, router_config).start()
    body = {"model": "shared", "messages": USER, "stream": True}
    async with http.stream("POST", f"{router.url}/v1/chat/completions", json=body) as holding:
        assert "x-served-by" not in holding.headers  # the router's own pool: its one slot is now busy
        waiting = trio.Event()

        async def second() -> None:
            answer = await http.post(f"{router.url}/v1/chat/completions", json={**body, "stream": False})
            assert answer.status_code == 200 and "x-served-by" not in answer.headers  # waited for the local slot
            waiting.set()

        nursery.start_soon(second)
        await wait_for(lambda: _waiters(http, router.url, 1), "the second request to wait for the local slot")
        third = await http.post(f"{router.url}/v1/chat/completions", json={**body, "stream": False})
        assert third.status_code == 200 and third.headers["x-served-by"] == "peer:node"  # the local queue was full
        async for _ in holding.aiter_bytes():
            pass
    with trio.fail_after(10):
        await waiting.wait()


async def _waiters(http: httpx.AsyncClient, url: str, count: int) -> bool:
    servers = (await http.get(f"{url}/health")).json()["pool"]["servers"]
    return sum(max(0, server["in_flight"] - server["slots"]) for server in servers) >= count


def children(parent: int) -> list[str]:
    """The command lines of ``parent``'s running child processes."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if int(fields[1]) == parent and fields[0] not in ("Z", "X"):
            found.append(cmdline)
    return found


async def test_a_router_without_models_starts_no_pool_and_serves_peers(
    tmp_path, fake_binary, nursery, http, tagged_ollama, monkeypatch
) -> None:
    def never(*args, **kwargs):
        raise AssertionError("a router must not look for llama-server, nor start its pool or downloads")

    monkeypatch.setattr(server_module, "find_llama_server", never)
    monkeypatch.setattr(Pool, "run", never)
    monkeypatch.setattr(Downloads, "run", never)
    router_config = config(tmp_path, fake_binary, {}, {"box": {"url": tagged_ollama.url, "kind": "ollama"}})
    assert router_config.role == "router"
    router = await Node(nursery, router_config).start()
    assert children(os.getpid()) == []  # no llama-server, no spare lifeline
    answer = await http.post(f"{router.url}/api/chat", json={"model": "remote-llm:7b", "messages": USER, "stream": False})
    assert answer.status_code == 200 and answer.json()["message"]["content"] == "piece0 piece1 piece2 "
    missing = await http.post(f"{router.url}/api/chat", json={"model": "nowhere", "messages": USER})
    assert missing.status_code == 404 and "not found" in missing.json()["error"]
    health = (await http.get(f"{router.url}/health")).json()
    assert health["role"] == "router" and "pool" not in health and health["peers"][0]["status"] == "ok"
    metrics = (await http.get(f"{router.url}/metrics")).text
    assert 'smart_proxy_peer_up{peer="box"} 1.0' in metrics
    for path in ("/v1/models", "/api/tags", "/api/ps"):  # the lists work without a pool
        assert (await http.get(f"{router.url}{path}")).status_code == 200, path
    logs = await http.get(f"{router.url}/logs/remote-llm:7b")
    assert logs.status_code == 404 and f"'box' ({tagged_ollama.url}/logs/remote-llm:7b)" in logs.json()["error"]["message"]
    async with http.stream("GET", f"{router.url}/events") as events:
        assert events.status_code == 200
        async for line in events.aiter_lines():
            if line.startswith("data:"):
                snapshot = json.loads(line[5:])
                break
    assert snapshot["role"] == "router" and snapshot["models"] == []
    assert snapshot["peers"][0]["name"] == "box" and "remote-llm:7b" in snapshot["peers"][0]["models"]


async def test_a_peer_stream_cut_after_its_first_byte_ends_with_an_error_and_is_not_retried(
    tmp_path, fake_binary, nursery, http
) -> None:
    a = await Node(nursery, config(tmp_path, fake_binary, {"cut": {"tokens": 6, "break_after": 2}}, {})).start()
    b = await Node(nursery, config(tmp_path, fake_binary, {"cut": {"tokens": 6, "padding": "x" * 4096}}, {})).start()
    router = await Node(nursery, config(tmp_path, fake_binary, {}, {"a": {"url": a.url}, "b": {"url": b.url}})).start()
    body = {"model": "cut", "messages": USER, "stream": True}
    answer = await http.post(f"{router.url}/v1/chat/completions", json=body)
    assert answer.status_code == 200 and answer.headers["x-served-by"] == "peer:a"  # a's cold start is the cheaper
    assert "tok0" in answer.text and "\"error\"" in answer.text and "data: [DONE]" not in answer.text.splitlines()
    with openai.OpenAI(base_url=f"{router.url}/v1", api_key="none", max_retries=0) as client:
        with pytest.raises(openai.APIError):
            await in_thread(lambda: list(client.chat.completions.create(model="cut", messages=USER, stream=True)))
    metrics = (await http.get(f"{router.url}/metrics")).text
    assert 'smart_proxy_peer_requests_total{outcome="ok",peer="a"} 2.0' in metrics
    assert 'peer="b"' not in metrics.split("smart_proxy_peer_requests_total", 1)[1].split("# HELP", 1)[0]  # never retried


async def test_proxies_that_list_each_others_models_refuse_a_loop_quickly(tmp_path, fake_binary, nursery, http) -> None:
    # c has the model but refuses every request with a 503 (so each proxy tries its next candidate); a and b
    # name each other as OpenAI peers, which lists every model the other serves, its peers' included
    c = await Node(nursery, config(tmp_path, fake_binary, {"m": {"reject": {"status": 503, "message": "busy"}}}, {})).start()
    a_port, b_port = free_port(), free_port()
    fast = {"refresh": "0.2s"}
    a = Node(nursery, config(tmp_path, fake_binary, {}, {"c": {"url": c.url, **fast},
                                                         "b": {"url": f"http://127.0.0.1:{b_port}", "kind": "openai", **fast}}))
    b = Node(nursery, config(tmp_path, fake_binary, {}, {"c": {"url": c.url, **fast},
                                                         "a": {"url": f"http://127.0.0.1:{a_port}", "kind": "openai", **fast}}))
    a.port, b.port = a_port, b_port
    await a.start()
    await b.start()

    async def both_list_each_other() -> bool:
        reports = [await peer_report(http, node.url) for node in (a, b)]
        return reports[0]["b"]["models"] == ["m"] and reports[1]["a"]["models"] == ["m"]

    await wait_for(both_list_each_other, "a and b to list m from each other")
    with trio.fail_after(10):
        answer = await http.post(f"{a.url}/v1/chat/completions", json={"model": "m", "messages": USER})
        ollama_answer = await http.post(f"{b.url}/api/chat", json={"model": "m", "messages": USER})
    assert answer.status_code == 508 and answer.json()["error"]["type"] == "loop_detected"
    assert "forwarded by 3 proxies" in answer.json()["error"]["message"]
    assert ollama_answer.status_code == 508 and "not forwarded again" in ollama_answer.json()["error"]
    direct = await http.post(
        f"{a.url}/v1/chat/completions", json={"model": "m", "messages": USER}, headers={"X-Smart-Proxy-Hops": "3"}
    )
    assert direct.status_code == 508  # a request that says it has passed 3 proxies goes to no peer


async def test_an_agent_reaches_a_peers_model(tmp_path, fake_binary, nursery, http, tagged_ollama) -> None:
    """``ctx.complete`` asks a peer for a model the catalog does not have: /parallel over a local and a peer's model."""
    from .test_agents import chat, copy_bundled, parallel_config, with_agents

    agent_dir = tmp_path / "agents"
    agent_dir.mkdir()
    copy_bundled(agent_dir, "parallel", parallel_config(["local", "remote-llm:7b"], samples=1, mode="all"))
    node = Node(
        nursery,
        with_agents(config(tmp_path, fake_binary, {"local": {}},
                           {"box": {"url": tagged_ollama.url, "kind": "ollama", "refresh": "0.2s"}}), agent_dir, "parallel"),
    )
    url = (await node.start()).url
    response = await http.post(url + "/v1/chat/completions", json=chat("/parallel hi", model="local"))
    assert response.status_code == 200, response.text
    body = response.json()
    assert [c["message"]["content"] for c in body["choices"]] == ["tok0 tok1 tok2 tok3 tok4 ", "piece0 piece1 piece2 "]
    rows = body["smart_proxy"]["parallel"]["candidates"]
    assert [(row["model"], row["status"]) for row in rows] == [("local", "ok"), ("remote-llm:7b", "ok")]
    method, path, sent = last_post(tagged_ollama)
    assert (method, path, sent["model"], sent["stream"]) == ("POST", "/v1/chat/completions", "remote-llm:7b", False)
    peer = (await http.get(url + "/health")).json()["peers"][0]
    assert peer["served"] == 1 and peer["in_flight"] == 0  # counted, and let go
