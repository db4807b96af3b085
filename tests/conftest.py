"""Shared fixtures: a fake llama-server, configs written on the fly, an in-process proxy."""

from __future__ import annotations

import json
import os
import stat
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import pytest
import trio

from smart_proxy.catalog import Catalog
from smart_proxy.config import Config, structure
from smart_proxy.pool import Pool
from smart_proxy.relay import make_client
from smart_proxy.server import serve

FAKE_SERVER = Path(__file__).parent / "fake_llama_server.py"


@pytest.fixture
def fake_binary(tmp_path: Path) -> str:
    """An executable that runs the fake llama-server with this interpreter."""
    path = tmp_path / "fake-llama-server"
    path.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{FAKE_SERVER}" "$@"\n')
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


@pytest.fixture
def make_config(tmp_path: Path, fake_binary: str) -> Callable[..., Config]:
    """``make_config({"a": {"load_delay": 0.1}}, size=1)``: a Config whose models are fake."""

    def make(models: dict[str, dict], model_options: dict[str, dict] | None = None, **pool: object) -> Config:
        raw: dict[str, dict[str, str]] = {"pool": {"llama_server": fake_binary, "load_timeout": "10s", "stop_timeout": "2s"}}
        raw["pool"].update({key: str(value) for key, value in pool.items()})
        for name, behaviour in models.items():
            file = tmp_path / f"{name}.json"
            file.write_text(json.dumps(behaviour))
            raw[f"model:{name}"] = {"path": str(file)}
            raw[f"model:{name}"].update({k: str(v) for k, v in (model_options or {}).get(name, {}).items()})
        return structure(raw, base_dir=str(tmp_path))

    return make


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with make_client() as client:
        yield client


@pytest.fixture
def start_pool(nursery: trio.Nursery, http: httpx.AsyncClient) -> Callable[[Config], trio.lowlevel.Task]:
    async def start(config: Config) -> Pool:
        pool = Pool(config, Catalog(config.models, config.base_dir), http, config.pool.llama_server)
        await nursery.start(pool.run)
        return pool

    return start


@pytest.fixture
def start_proxy(nursery: trio.Nursery):
    """Start the whole proxy in-process on a free port; returns its base URL."""

    async def start(config: Config) -> str:
        stop = trio.Event()
        binds = await nursery.start(lambda task_status: serve(config, port=0, shutdown_trigger=stop.wait, task_status=task_status))
        return binds[0]

    return start


def pids_alive(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        alive.append(pid)
    return alive
