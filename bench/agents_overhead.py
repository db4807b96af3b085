#!/usr/bin/env python3
"""What a chain of agents costs per request: 5 no-op agents against none.

Two measurements, in one run:

1. The chain alone, in-process: ``activate`` (finding and cutting the commands),
   ``prepare`` (5 request hooks, each in its own cancel scope with a deadline and
   an undo snapshot) and the 5 response hooks of ``respond``, on a canned upstream
   answer. This is the overhead the issue bounds (under 1 ms per request).
2. Whole requests through the in-process proxy to the fake llama-server, with
   httpx, one at a time, the variants interleaved in a shuffled order each round so
   that drift and warm-up hit them alike:
   no agents configured; agents enabled but no command (the byte-for-byte path);
   5 no-op request-only agents (a live chain); 5 no-op agents with request and
   response hooks (a buffered chain: upstream is asked without streaming and the
   answer is re-encoded). The three agent variants share one proxy and one fake
   llama-server. Medians; the differences are the end-to-end overhead, within the
   noise of a shared machine: the chain-alone figure is the precise one.

Figures only; nothing here asserts a time. Run from the repository root::

    python bench/agents_overhead.py [--requests 300] [--chain-runs 5000]
"""

from __future__ import annotations

import argparse
import json
import random
import stat
import statistics
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import attrs
import httpx
import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from smart_proxy.agents import AgentContext, AgentRegistry  # noqa: E402
from smart_proxy.config import AgentsConfig, structure  # noqa: E402
from smart_proxy.server import serve  # noqa: E402

NAMES = ("n1", "n2", "n3", "n4", "n5")
NOOP = """
from smart_proxy.agents import Agent


class Noop(Agent):
    description = "does nothing, in both directions"

    async def on_request(self, ctx):
        pass
{response}
"""
RESPONSE_HOOK = """
    async def on_response(self, ctx):
        pass
"""
CANNED = {
    "id": "x",
    "object": "chat.completion",
    "created": 0,
    "model": "m",
    "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "hello " * 40}}],
    "usage": {"prompt_tokens": 30, "completion_tokens": 40, "total_tokens": 70},
}


def payload(text: str) -> dict:
    history = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i} " * 20} for i in range(6)]
    messages = [{"role": "system", "content": "Be brief."}, *history, {"role": "user", "content": text}]
    # "stream": false as the buffered chain sends it, so every variant asks upstream the same thing
    return {"model": "m", "messages": messages, "temperature": 0.7, "max_tokens": 1, "stream": False}


def write_agents(root: Path) -> None:
    for prefix, response in (("n", RESPONSE_HOOK), ("r", "")):
        for i in range(1, 6):
            folder = root / f"{prefix}{i}"
            folder.mkdir(parents=True)
            (folder / "agent.py").write_text(textwrap.dedent(NOOP.format(response=response)))


async def bench_chain(root: Path, runs: int) -> tuple[float, float]:
    """Microseconds per request for the chain alone: no agents vs 5 no-op agents."""
    registry = AgentRegistry.load(AgentsConfig(dir=str(root), enabled=NAMES))

    async def canned(self: AgentContext, payload: object = None) -> dict:
        return json.loads(json.dumps(CANNED))  # what parsing an upstream answer would give

    plain = payload("Tell me about trio")
    commanded = payload("/n1 /n2 /n3 /n4 /n5 Tell me about trio")
    timings: dict[str, list[float]] = {"none": [], "five": []}
    real_complete = AgentContext.complete
    AgentContext.complete = canned  # type: ignore[method-assign]  # no upstream in this measurement
    try:
        for _ in range(runs):
            started = time.perf_counter()
            assert registry.activate(plain, "chat") is None
            timings["none"].append(time.perf_counter() - started)
            started = time.perf_counter()
            chain = registry.activate(commanded, "chat")
            assert chain is not None
            ctx = await chain.prepare(None, None)
            response = await chain.respond(ctx)
            timings["five"].append(time.perf_counter() - started)
            assert response["id"] == "x" and not ctx.failures
    finally:
        AgentContext.complete = real_complete  # type: ignore[method-assign]  # the HTTP part goes upstream
    return statistics.median(timings["none"]) * 1e6, statistics.median(timings["five"]) * 1e6


def fake_config(tmp: Path, agents_dir: Path, enabled: tuple[str, ...]):
    binary = tmp / "fake-llama-server"
    binary.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{ROOT / "tests" / "fake_llama_server.py"}" "$@"\n')
    binary.chmod(binary.stat().st_mode | stat.S_IXUSR)
    (tmp / "m.json").write_text(json.dumps({"tokens": 1, "slots": 4}))
    config = structure({"pool": {"llama_server": str(binary)}, "model:m": {"path": str(tmp / "m.json")}}, str(tmp))
    return attrs.evolve(config, agents=AgentsConfig(dir=str(agents_dir), enabled=enabled))


async def bench_http(tmp: Path, agents_dir: Path, requests: int) -> dict[str, float]:
    """Median milliseconds per request through the proxy, per variant."""
    every = (*NAMES, "r1", "r2", "r3", "r4", "r5")
    plain = fake_config(tmp, agents_dir, ())
    with_agents = fake_config(tmp, agents_dir, every)  # the agent variants share one proxy and upstream
    variants = {
        "no agents configured": (plain, "Tell me about trio"),
        "agents enabled, no command": (with_agents, "Tell me about trio"),
        "5 no-op request-only agents (live)": (with_agents, "/r1 /r2 /r3 /r4 /r5 Tell me about trio"),
        "5 no-op agents, both hooks (buffered)": (with_agents, "/n1 /n2 /n3 /n4 /n5 Tell me about trio"),
    }
    timings: dict[str, list[float]] = {name: [] for name in variants}
    failed = dict.fromkeys(variants, 0)
    async with trio.open_nursery() as nursery, httpx.AsyncClient(timeout=30) as http:
        started: dict[int, str] = {}
        urls = {}
        for name, (config, _) in variants.items():
            if id(config) not in started:
                binds = await nursery.start(
                    lambda task_status, c=config: serve(
                        c, port=0, shutdown_trigger=trio.sleep_forever, task_status=task_status
                    )
                )
                started[id(config)] = binds[0]
            urls[name] = started[id(config)]
        for name, (_, text) in variants.items():  # warm up: load llama-servers, open connections
            for _ in range(20):
                response = await http.post(urls[name] + "/v1/chat/completions", json=payload(text))
                response.raise_for_status()
        order = list(variants.items())
        shuffler = random.Random(6)
        for _ in range(requests):
            shuffler.shuffle(order)  # a fixed order favours whoever follows a warm request
            for name, (_, text) in order:
                body = payload(text)
                started = time.perf_counter()
                response = await http.post(urls[name] + "/v1/chat/completions", json=body)
                if response.status_code == 200:
                    timings[name].append(time.perf_counter() - started)
                else:  # e.g. a fake llama-server that died and is being restarted: not a timing
                    failed[name] += 1
        nursery.cancel_scope.cancel()
    for name, count in failed.items():
        if count:
            print(f"  ({name}: {count} requests failed and are left out)")
    return {name: statistics.median(values) * 1e3 for name, values in timings.items()}


async def main(requests: int, chain_runs: int) -> None:
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        agents_dir = tmp / "agents"
        write_agents(agents_dir)
        none_us, five_us = await bench_chain(agents_dir, chain_runs)
        print(f"chain alone, median of {chain_runs} runs (no upstream):")
        print(f"  no command (activate only)      {none_us:8.1f} us")
        print(f"  5 no-op agents, both hooks      {five_us:8.1f} us")
        print(f"  overhead of the chain           {five_us - none_us:8.1f} us  = {(five_us - none_us) / 1000:.3f} ms")
        medians = await bench_http(tmp, agents_dir, requests)
    baseline = medians["no agents configured"]
    print(f"\nwhole requests through the proxy to the fake llama-server, median of {requests} each:")
    for name, value in medians.items():
        print(f"  {name:40s} {value:7.3f} ms  ({value - baseline:+.3f} ms)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--chain-runs", type=int, default=5000)
    args = parser.parse_args()
    trio.run(main, args.requests, args.chain_runs)
