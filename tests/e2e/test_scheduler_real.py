"""The memory scheduler end to end: the real llama-server, gemma under several catalog names.

The estimate is checked against what the real process holds (VmRSS after a load and one
request) and its KV cache against llama-server's own figure; admission, eviction, refusal
and pinning against a ``[pool] memory`` budget sized so that two servers fit and three do not.
"""

from __future__ import annotations

import re
import time

import httpx
import pytest

from smart_proxy.memory import format_size, read_estimate

from ..conftest import ProxyProcess

pytestmark = pytest.mark.real

#: The acceptance bound: an estimate within this fraction of the measured resident memory.
TOLERANCE = 0.25
_ARGS = "-c 2048"
_KV_LINE = re.compile(r"\[(?P<model>[\w-]+)\].*KV buffer size\s*=\s*(?P<mib>[\d.]+) MiB")


def _health(proxy: ProxyProcess) -> dict:
    return httpx.get(f"{proxy.url}/health", timeout=10).json()


def _complete(proxy: ProxyProcess, model: str) -> httpx.Response:
    return httpx.post(f"{proxy.url}/v1/completions", json={"model": model, "prompt": "Hello there", "max_tokens": 4}, timeout=120)


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as file:
        for line in file:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def _loaded(proxy: ProxyProcess) -> list[str]:
    return sorted(s["model"] for s in _health(proxy)["pool"]["servers"] if s["state"] in ("starting", "ready"))


@pytest.mark.parametrize("ctx", [2048, 8192, 32768])
def test_the_estimate_is_within_25_percent_of_the_resident_memory(
    proxy_process, llama_server_binary, gemma_path, ctx: int
) -> None:
    name = f"g{ctx}"
    ini = f"[pool]\nsize = 1\nllama_server = {llama_server_binary}\nload_timeout = 90s\n"
    args = ["-c", str(ctx), "-lv", "4"]  # verbosity 4: llama-server logs its buffers' sizes
    ini += f"[model:{name}]\npath = {gemma_path}\nargs = {' '.join(args)}\n"
    proxy = proxy_process(ini)
    assert _complete(proxy, name).status_code == 200
    (server,) = _health(proxy)["pool"]["servers"]
    estimate = read_estimate([gemma_path], args)
    assert server["memory"] == estimate.total  # what the pool admitted is the estimate
    rss = _rss(server["pid"])
    error = (estimate.total - rss) / rss
    print(f"ctx {ctx}: estimate {estimate.describe()}, RSS {format_size(rss)}, {error:+.1%}")
    assert abs(error) <= TOLERANCE, f"estimate {estimate.describe()} vs RSS {format_size(rss)}: {error:+.1%}"
    # the KV part against llama-server's own figure (two caches for gemma: full and sliding-window layers)
    reported = sum(float(m["mib"]) for m in _KV_LINE.finditer(proxy.log()) if m["model"] == name) * 1024**2
    assert reported > 0, "llama-server's log has no KV buffer size line"
    assert abs(estimate.kv_cache - reported) <= 0.01 * reported + 1024**2, (estimate.kv_cache, reported)


def _budget_ini(binary: str, gemma: str, names: tuple[str, ...], extra_models: str = "") -> tuple[str, int]:
    """Gemma under ``names``, ``[pool] memory`` 2.5 servers' worth (``size`` is no limit): two fit, three do not."""
    one = read_estimate([gemma], _ARGS.split()).total
    budget = one * 5 // 2
    models = "".join(f"[model:{name}]\npath = {gemma}\nargs = {_ARGS}\n" for name in names)
    ini = f"[pool]\nsize = 8\nmemory = {budget}\nllama_server = {binary}\nload_timeout = 90s\n{models}{extra_models}"
    return ini, budget


def test_two_fit_three_do_not_and_a_model_too_large_is_refused_at_once(proxy_process, llama_server_binary, gemma_path) -> None:
    huge = f"[model:huge]\npath = {gemma_path}\nmemory = 1TiB\n"
    ini, budget = _budget_ini(llama_server_binary, gemma_path, ("a", "b", "c"), huge)
    proxy = proxy_process(ini)
    seen = []
    for name in ("a", "b", "a", "c", "b", "a"):
        assert _complete(proxy, name).status_code == 200
        seen.append(_loaded(proxy))
        assert len(seen[-1]) <= 2, seen
    # a, b; a used; c evicts b (the LRU idle one); b evicts a; a evicts c
    assert seen == [["a"], ["a", "b"], ["a", "b"], ["a", "c"], ["b", "c"], ["a", "b"]]
    assert re.findall(r"(\w+): evicted \(idle", proxy.log()) == ["b", "a", "c"]
    health = _health(proxy)["pool"]
    assert health["memory_budget"] == budget and health["memory_used"] <= budget

    started = time.monotonic()
    refused = _complete(proxy, "huge")
    assert time.monotonic() - started < 5  # at once, not after queue_timeout
    assert refused.status_code == 507
    message = refused.json()["error"]["message"]
    assert "needs 1.0 TiB" in message and f"budget of {format_size(budget)}" in message
    assert _loaded(proxy) == ["a", "b"]  # nobody was evicted for it


def test_a_pinned_model_survives_any_sequence_of_requests(proxy_process, llama_server_binary, gemma_path) -> None:
    pinned = f"[model:p]\npath = {gemma_path}\nargs = {_ARGS}\npin = true\n"
    ini, _ = _budget_ini(llama_server_binary, gemma_path, ("a", "b", "c"), pinned)
    proxy = proxy_process(ini)
    assert _complete(proxy, "p").status_code == 200
    (server,) = _health(proxy)["pool"]["servers"]
    pid = server["pid"]
    for name in ("a", "b", "c", "a", "c", "b"):  # p is the least recently used every time
        assert _complete(proxy, name).status_code == 200
        loaded = _loaded(proxy)
        assert "p" in loaded and len(loaded) == 2, loaded
    # Ollama's unload (keep_alive 0) and a request that asks for it after answering
    assert httpx.post(f"{proxy.url}/api/generate", json={"model": "p", "keep_alive": 0}, timeout=30).status_code == 200
    answer = httpx.post(
        f"{proxy.url}/api/generate",
        json={"model": "p", "prompt": "Hi", "keep_alive": 0, "stream": False, "options": {"num_predict": 2}},
        timeout=120,
    )
    assert answer.status_code == 200
    time.sleep(1)
    pool = _health(proxy)["pool"]
    (p,) = [s for s in pool["servers"] if s["model"] == "p"]
    assert p["pid"] == pid and p["pinned"] is True and p["state"] == "ready"
    assert next(m for m in pool["models"] if m["model"] == "p")["loads"] == 1
