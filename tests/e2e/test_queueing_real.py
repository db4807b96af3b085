"""Swap-aware queueing end to end: the real llama-server, gemma under two names, a pool of one.

Clients of both models keep sending short completions with short pauses; the pool must take
turns by model (a swap at most about every ``min_residency``), answer every request, and
never stop a server under a request.
"""

from __future__ import annotations

import random
import re
import threading
import time

import httpx
import pytest

from ..conftest import ProxyProcess

pytestmark = pytest.mark.real

_SECONDS = 20.0
_RESIDENCY = 3.0
_CLIENTS = 4


def _client(proxy: ProxyProcess, model: str, stop_at: float, seed: int, out: list[tuple[str, int, bool]]) -> None:
    rng = random.Random(seed)
    with httpx.Client(timeout=120) as client:
        while time.monotonic() < stop_at:
            answer = client.post(f"{proxy.url}/v1/completions", json={"model": model, "prompt": "Hello", "max_tokens": 4})
            finished = answer.status_code == 200 and answer.json()["choices"][0].get("finish_reason") in ("length", "stop")
            out.append((model, answer.status_code, finished))
            time.sleep(rng.uniform(0.0, 0.5))


def test_two_models_at_size_one_take_turns(proxy_process, llama_server_binary, gemma_path) -> None:
    models = "".join(f"[model:{name}]\npath = {gemma_path}\nargs = -c 2048\n" for name in ("a", "b"))
    ini = (f"[pool]\nsize = 1\nllama_server = {llama_server_binary}\nload_timeout = 90s\nqueue_timeout = 60s\n"
           f"queueing = swap-aware\nmin_residency = {_RESIDENCY:g}s\n{models}")
    proxy = proxy_process(ini)
    out: list[tuple[str, int, bool]] = []
    stop_at = time.monotonic() + _SECONDS
    threads = [threading.Thread(target=_client, args=(proxy, name, stop_at, i * 2 + (name == "b"), out))
               for i in range(_CLIENTS) for name in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    loads = sum(m["loads"] for m in httpx.get(f"{proxy.url}/health", timeout=10).json()["pool"]["models"])
    served = {name: sum(1 for m, status, done in out if m == name and status == 200 and done) for name in ("a", "b")}
    print(f"swap-aware, real gemma: {loads} loads, served {served}, {len(out)} requests in {_SECONDS:g} s")
    assert [o for o in out if o[1] != 200 or not o[2]] == []  # every answer 200 and finished
    # both models had turns of about equal length (under fifo one model's busy server keeps the other waiting)
    assert min(served.values()) >= 3 and min(served.values()) >= max(served.values()) / 4, served
    # turns, not a swap per request: at most one swap per residency (plus the first load and one in flight)
    assert loads <= _SECONDS / _RESIDENCY + 2, loads
    assert len(out) >= 3 * loads
    # no server was stopped under a request: every stop the log tells of is an eviction of an idle server
    stops = re.findall(r"(\w+): stopping llama-server \((.+?)\)", proxy.log())
    assert all(why == "evicted" for _, why in stops), stops
