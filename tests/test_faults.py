"""The fault matrix: a misbehaving llama-server (``tests/fake_llama_server.py``'s ``fault`` modes)
against the whole proxy, seen by the official ``openai`` and ``ollama`` clients.

Each row is one fault, asked in both dialects, streamed and not. An answer the upstream
did not finish must never look finished: the client raises its own error (an HTTP error
in the dialect, or the error event / line that ends a stream), and ``/metrics`` counts
the request as failed. ``docs/reliability.md`` has the table these rows check.
"""

from __future__ import annotations

import json
import os
import re
import signal
from functools import partial

import httpx
import ollama
import openai
import pytest
import trio

USER = [{"role": "user", "content": "hi"}]
TEXT = "tok0 tok1 tok2 "
#: Every test's ceiling: a fault that hangs the proxy fails the test instead of hanging the suite.
CEILING = 30

OK = "ok"

#: fault -> what the client gets for a (streamed, whole) request: OK (the full text) or an error's HTTP status.
#: A streamed request that fails after its 200 is the stream's own error (status None).
MATRIX: dict[str, tuple[int | str | None, int | str]] = {
    "close_before_head": (502, 502),
    "cut_head": (502, 502),
    "garbage": (502, 502),
    "giant_head": (502, 502),
    "big_header": (OK, OK),
    "bad_status": (502, 502),
    "html_error": (500, 500),
    "unclean_headers": (OK, OK),
    "cut_size_line": (None, 502),
    "cut_chunk": (None, 502),
    "cut_sse_line": (None, 502),
    "cut_between_events": (None, 502),
    "end_without_done": (None, OK),
    "drip": (OK, OK),
    "exit_at_start": (502, 502),
}


async def in_thread(fn, *args, **kwargs):
    return await trio.to_thread.run_sync(partial(fn, *args, **kwargs), abandon_on_cancel=True)


def ask_openai(url: str, stream: bool) -> str:
    """The answer's text through the official openai client (which raises what the proxy reports)."""
    with openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=15) as client:
        if not stream:
            return client.chat.completions.create(model="m", messages=USER).choices[0].message.content or ""
        text = ""
        for chunk in client.chat.completions.create(model="m", messages=USER, stream=True):
            for choice in chunk.choices:
                text += choice.delta.content or ""
        return text


def ask_ollama(url: str, stream: bool) -> str:
    """The answer's text through the official ollama client; a stream must end with ``done``."""
    with ollama.Client(host=url, timeout=15) as client:
        if not stream:
            reply = client.chat(model="m", messages=USER, stream=False)
            assert reply.done
            return reply.message.content or ""
        parts = list(client.chat(model="m", messages=USER, stream=True))
        assert parts and parts[-1].done, "an Ollama stream ended without done and without an error"
        return "".join(part.message.content or "" for part in parts)


ASK = {"openai": ask_openai, "ollama": ask_ollama}
ROUTE = {"openai": "/v1/chat/completions", "ollama": "/api/chat"}


def check_error(dialect: str, exc: BaseException, status: int | None) -> None:
    """``exc`` is the client's own error for what the proxy reported, not a broken connection or a bad parse."""
    if dialect == "openai":
        assert isinstance(exc, openai.APIError) and not isinstance(exc, openai.APIConnectionError), repr(exc)
        if status is None:  # the error event that ends a stream
            assert not isinstance(exc, openai.APIStatusError), repr(exc)
            assert isinstance(exc.body, dict) and exc.body.get("code") == 502, exc.body
        else:
            assert isinstance(exc, openai.APIStatusError) and exc.status_code == status, repr(exc)
            assert isinstance(exc.body, dict) and isinstance(exc.body.get("message"), str), exc.body
    else:
        assert isinstance(exc, ollama.ResponseError), repr(exc)
        assert exc.status_code == (status if status is not None else -1), (exc.status_code, exc.error)
        assert exc.error and not exc.error.lstrip().startswith("<"), exc.error


async def requests_counted(http: httpx.AsyncClient, url: str, route: str) -> dict[str, float]:
    """``smart_proxy_requests_total`` for model m on ``route``, by status."""
    text = (await http.get(f"{url}/metrics")).text
    counted: dict[str, float] = {}
    pattern = r'smart_proxy_requests_total\{model="m",route="' + re.escape(route) + r'",status="(\d+)"\} (\S+)'
    for status, value in re.findall(pattern, text):
        counted[status] = float(value)
    return counted


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole"])
@pytest.mark.parametrize("dialect", ["openai", "ollama"])
@pytest.mark.parametrize("fault", list(MATRIX))
async def test_fault_matrix(fault: str, dialect: str, stream: bool, make_config, start_proxy, http) -> None:
    await _matrix_row(fault, dialect, stream, make_config, start_proxy, http)


async def _matrix_row(fault: str, dialect: str, stream: bool, make_config, start_proxy, http) -> None:
    expected = MATRIX[fault][0 if stream else 1]
    with trio.fail_after(CEILING):
        url = await start_proxy(make_config({"m": {"fault": fault}}))
        try:
            text = await in_thread(ASK[dialect], url, stream)
        except Exception as exc:  # noqa: BLE001 - judged below
            assert expected != OK, f"{fault}: expected the answer, got {exc!r}"
            check_error(dialect, exc, expected)  # type: ignore[arg-type]
            counted = await requests_counted(http, url, ROUTE[dialect])
            assert "200" not in counted and sum(counted.values()) == 1, counted
        else:
            assert expected == OK, f"{fault}: expected an error, got the answer {text!r}"
            assert text == TEXT
        health = (await http.get(f"{url}/health")).json()
        assert all(server["in_flight"] == 0 for server in health["pool"]["servers"])


async def test_unclean_upstream_headers_are_not_forwarded(make_config, start_proxy, http) -> None:
    with trio.fail_after(CEILING):
        url = await start_proxy(make_config({"m": {"fault": "unclean_headers"}}))
        for route, body in (("/v1/chat/completions", {}), ("/v1/chat/completions", {"stream": True})):
            response = await http.post(f"{url}{route}", json={"model": "m", "messages": USER, **body})
            assert response.status_code == 200
            names = {name.lower() for name in response.headers}
            assert response.headers.get("x-fine") == "yes"
            forbidden = {"set-cookie", "x-control", "x-del", "x-hop", "keep-alive", "proxy-authenticate", "upgrade", "trailer"}
            assert not names & forbidden, names & forbidden


async def test_a_big_upstream_header_is_not_forwarded(make_config, start_proxy, http) -> None:
    with trio.fail_after(CEILING):
        url = await start_proxy(make_config({"m": {"fault": "big_header"}}))
        response = await http.post(f"{url}/v1/chat/completions", json={"model": "m", "messages": USER})
        assert response.status_code == 200 and "x-big" not in response.headers


@pytest.mark.parametrize("dialect", ["openai", "ollama"])
async def test_an_html_error_reaches_clients_as_an_error_in_their_dialect(dialect, make_config, start_proxy, http) -> None:
    with trio.fail_after(CEILING):
        url = await start_proxy(make_config({"m": {"fault": "html_error"}}))
        for stream in (False, True):
            body = {"model": "m", "messages": USER, "stream": stream}
            response = await http.post(f"{url}{ROUTE[dialect]}", json=body)
            assert response.status_code == 500 and response.headers["content-type"].startswith("application/json")
            error = response.json()["error"]
            if dialect == "openai":
                assert error["code"] == 500 and error["type"] == "upstream_error"
                error = error["message"]
            assert "Oops" in error and "<" not in error, error


@pytest.mark.parametrize("dialect", ["openai", "ollama"])
async def test_a_cut_stream_error_starts_on_a_fresh_line(dialect: str, make_config, start_proxy, http) -> None:
    """The exact bytes: the relayed part ends where a line ended, and the error comes after it."""
    with trio.fail_after(CEILING):
        url = await start_proxy(make_config({"m": {"fault": "cut_chunk"}}))
        response = await http.post(f"{url}{ROUTE[dialect]}", json={"model": "m", "messages": USER, "stream": True})
        assert response.status_code == 200
        if dialect == "openai":
            events = response.content.split(b"\n\n")
            assert events[-1] == b""
            *good, last = events[:-1]
            assert [json.loads(e[len(b"data: ") :])["choices"][0]["delta"]["content"] for e in good] == ["tok0 ", "tok1 "]
            assert last.startswith(b"data: ") and json.loads(last[len(b"data: ") :])["error"]["code"] == 502
        else:
            lines = [json.loads(line) for line in response.content.splitlines()]
            assert [line["message"]["content"] for line in lines[:-1]] == ["tok0 ", "tok1 "]
            assert "broke off" in lines[-1]["error"] and not any(line.get("done") for line in lines)


@pytest.mark.parametrize("dialect", ["openai", "ollama"])
async def test_an_endless_whole_answer_is_capped(dialect: str, make_config, start_proxy, http) -> None:
    with trio.fail_after(CEILING):
        url = await start_proxy(_with_max_answer(make_config({"m": {"fault": "endless"}}), 1024 * 1024))
        response = await http.post(f"{url}{ROUTE[dialect]}", json={"model": "m", "messages": USER, "stream": False})
        assert response.status_code == 502, response.text
        error = response.json()["error"]
        message = error["message"] if dialect == "openai" else error
        assert "max_answer" in message
        await _wait_released(http, url, 1)


@pytest.mark.parametrize("dialect", ["openai", "ollama"])
async def test_an_endless_line_in_a_stream_is_an_error(dialect: str, make_config, start_proxy) -> None:
    with trio.fail_after(CEILING):
        url = await start_proxy(_with_max_answer(make_config({"m": {"fault": "endless_line"}}), 256 * 1024))
        with pytest.raises(Exception) as caught:
            await in_thread(ASK[dialect], url, True)
        check_error(dialect, caught.value, None)


@pytest.mark.parametrize("fault", ["hang_head", "hang_mid", "endless"])
@pytest.mark.parametrize("dialect", ["openai", "ollama"])
async def test_a_client_that_leaves_frees_a_hung_upstream(fault: str, dialect: str, make_config, start_proxy, http) -> None:
    """Nothing bounds a hung answer but the client (or a configured timeout): its leaving closes the upstream."""
    with trio.fail_after(CEILING):
        url = await start_proxy(make_config({"m": {"fault": fault}}))
        async with trio.open_nursery() as nursery:

            async def ask() -> None:
                body = {"model": "m", "messages": USER, "stream": True}
                async with http.stream("POST", f"{url}{ROUTE[dialect]}", json=body) as r:
                    async for _ in r.aiter_raw():
                        pass

            nursery.start_soon(ask)
            await _wait_answering(http, url)
            await trio.sleep(0.3)  # the request on its way to the fake, which hangs on it (or answers without end)
            nursery.cancel_scope.cancel()  # the client leaves
        await _wait_released(http, url, 1)


async def test_a_crash_under_load_fails_every_answer(make_config, start_proxy, http) -> None:
    """llama-server killed while 16 streams and 4 whole answers run, in both dialects: each ends with its error."""
    with trio.fail_after(CEILING):
        url = await start_proxy(make_config({"m": {"tokens": 400, "token_delay": 0.01, "slots": 20}}))
        await http.post(f"{url}/v1/chat/completions", json={"model": "m", "messages": USER, "max_tokens": 1})
        server = (await http.get(f"{url}/health")).json()["pool"]["servers"][0]
        outcomes: list[tuple[str, bool, BaseException | str]] = []

        async def one(dialect: str, stream: bool) -> None:
            try:
                outcomes.append((dialect, stream, await in_thread(ASK[dialect], url, stream)))
            except Exception as exc:  # noqa: BLE001 - judged below
                outcomes.append((dialect, stream, exc))

        async with trio.open_nursery() as nursery:
            for i in range(20):
                nursery.start_soon(one, "openai" if i % 2 else "ollama", i >= 4)
            # every request being answered (a request still connecting would be refused, and sent again)
            async with httpx.AsyncClient() as direct:
                while (await direct.get(f"http://127.0.0.1:{server['port']}/props")).json()["fake_busy"] < 20:
                    await trio.sleep(0.02)
            await trio.sleep(0.1)
            os.kill(server["pid"], signal.SIGKILL)
        assert len(outcomes) == 20
        for dialect, stream, outcome in outcomes:
            assert isinstance(outcome, Exception), f"{dialect}: an answer cut by the crash ended as {outcome!r}"
            # a stream's error; or, for an answer that had not started (every whole one), a 502
            started = not isinstance(outcome, openai.APIStatusError) and getattr(outcome, "status_code", -1) == -1
            check_error(dialect, outcome, None if started else 502)
            if not stream:
                assert not started, f"{dialect}: a whole answer ended as {outcome!r}"
        assert await requests_counted(http, url, "/api/chat") == {"502": 10}
        assert await requests_counted(http, url, "/v1/chat/completions") == {"200": 1, "502": 10}  # and the load
        response = await http.post(f"{url}/v1/chat/completions", json={"model": "m", "messages": USER, "max_tokens": 2})
        assert response.status_code == 200 and response.json()["choices"][0]["message"]["content"] == "tok0 tok1 "


@pytest.mark.parametrize("dialect", ["openai", "ollama"])
async def test_a_request_just_after_a_crash_is_served_by_the_restarted_server(dialect, make_config, start_proxy, http) -> None:
    """The server stops listening (a crash); a request that finds the port refused waits for the restart and is sent again."""
    with trio.fail_after(CEILING):
        url = await start_proxy(make_config({"m": {"tokens": 3}}))
        await http.post(f"{url}/v1/chat/completions", json={"model": "m", "messages": USER})
        server = (await http.get(f"{url}/health")).json()["pool"]["servers"][0]
        async with httpx.AsyncClient() as direct:
            assert (await direct.get(f"http://127.0.0.1:{server['port']}/vanish")).status_code == 200
        body = {"model": "m", "messages": USER, "stream": False}
        response = await http.post(f"{url}{ROUTE[dialect]}", json=body)
        assert response.status_code == 200, response.text
        assert (await http.get(f"{url}/health")).json()["pool"]["servers"][0]["pid"] != server["pid"]


def _with_max_answer(config, limit: int):
    import attrs

    return attrs.evolve(config, proxy=attrs.evolve(config.proxy, max_answer=limit))


async def _wait_answering(http: httpx.AsyncClient, url: str) -> None:
    """Until the model's server is loaded and holds the request (a slot leased to it)."""
    while True:
        servers = (await http.get(f"{url}/health")).json()["pool"]["servers"]
        if servers and servers[0]["state"] == "ready" and servers[0]["in_flight"] >= 1:
            return
        await trio.sleep(0.05)


async def _wait_released(http: httpx.AsyncClient, url: str, count: int) -> None:
    """Until the fake has seen ``count`` hung or endless answers closed by the proxy, and the lease is back."""
    port = (await http.get(f"{url}/health")).json()["pool"]["servers"][0]["port"]
    async with httpx.AsyncClient() as direct:
        while True:
            released = (await direct.get(f"http://127.0.0.1:{port}/faults")).json()["released"]
            in_flight = (await http.get(f"{url}/health")).json()["pool"]["servers"][0]["in_flight"]
            if released >= count and in_flight == 0:
                return
            await trio.sleep(0.05)
