"""The proxy as a process with the fake llama-server: signals, and no orphan llama-server ever;
and one ServerProcess noticing that its llama-server is ready."""

from __future__ import annotations

import json
import random
import signal
import time
import tracemalloc
from pathlib import Path

import httpx
import pytest
import trio

from smart_proxy import process
from smart_proxy.errors import ModelLoadFailed, ModelLoadTimeout
from smart_proxy.process import Lifeline, OutputLines, ServerProcess, free_port

from .conftest import ProxyProcess, lifelines, open_pipes, pids_alive


@pytest.fixture
def fake_ini(tmp_path: Path, fake_binary: str) -> Path:
    model = tmp_path / "a.json"
    model.write_text(json.dumps({"token_delay": 0.05, "tokens": 100}))
    ini = tmp_path / "proxy.ini"
    ini.write_text(f"[proxy]\ngrace = 10s\n[pool]\nllama_server = {fake_binary}\n[model:a]\npath = {model}\n")
    return ini


def _load(proxy: ProxyProcess) -> list[int]:
    response = httpx.post(f"{proxy.url}/v1/completions", json={"model": "a", "prompt": "x", "max_tokens": 1}, timeout=30)
    assert response.status_code == 200
    return [s["pid"] for s in httpx.get(f"{proxy.url}/health").json()["pool"]["servers"]]


def _wait_gone(pids: list[int], seconds: float = 2.0) -> list[int]:
    deadline = time.monotonic() + seconds
    while pids_alive(pids) and time.monotonic() < deadline:
        time.sleep(0.02)
    return pids_alive(pids)


def test_sigkill_of_the_proxy_leaves_no_llama_server(fake_ini: Path, tmp_path: Path) -> None:
    proxy = ProxyProcess(fake_ini, tmp_path / "log")
    try:
        pids = _load(proxy)
        assert pids_alive(pids) == pids
        deadline = time.monotonic() + 5  # the next spare starts 0.25 s after the load took the first
        while len(lifelines(proxy.process.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        started = lifelines(proxy.process.pid)
        assert len(started) == 2  # the loaded server's and the spare, which sees its pipe close too
        pids += started
        proxy.process.kill()
        proxy.process.wait(10)
        assert _wait_gone(pids) == []
    finally:
        proxy.stop()


def test_sigterm_lets_a_stream_finish_then_exits_0(fake_ini: Path, tmp_path: Path) -> None:
    proxy = ProxyProcess(fake_ini, tmp_path / "log")
    try:
        pids = _load(proxy)
        body = {"model": "a", "prompt": "x", "stream": True, "max_tokens": 20}  # ~1 s of tokens
        with httpx.stream("POST", f"{proxy.url}/v1/completions", json=body, timeout=30) as stream:
            lines = stream.iter_lines()
            next(lines)
            proxy.process.send_signal(signal.SIGTERM)
            rest = list(lines)
        assert "data: [DONE]" in rest  # the in-flight stream was not cut
        assert proxy.process.wait(30) == 0
        assert _wait_gone(pids) == []
    finally:
        proxy.stop()


def test_sigint_exits_0(fake_ini: Path, tmp_path: Path) -> None:
    proxy = ProxyProcess(fake_ini, tmp_path / "log")
    try:
        pids = _load(proxy)
        proxy.process.send_signal(signal.SIGINT)
        assert proxy.process.wait(30) == 0
        assert _wait_gone(pids) == []
        assert "Traceback" not in proxy.log()
    finally:
        proxy.stop()


# ---- ServerProcess: readiness ------------------------------------------------------------


async def _run_until_ready(
    fake_binary: str, tmp_path: Path, http: httpx.AsyncClient, behaviour: dict, within: float = 8.0
) -> ServerProcess:
    """Start the fake, wait at most ``within`` seconds for ready, stop it."""
    model = tmp_path / "m.json"
    model.write_text(json.dumps(behaviour))
    port = free_port()
    server = ServerProcess([fake_binary, "-m", str(model), "--port", str(port)], name="m", port=port, http=http)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.run, 30.0)
        with trio.move_on_after(within):
            await server.ready.wait()
        nursery.cancel_scope.cancel()
    return server


async def test_a_finished_server_holds_no_pipe(fake_binary: str, tmp_path: Path, http: httpx.AsyncClient) -> None:
    before = open_pipes()
    servers = [await _run_until_ready(fake_binary, tmp_path, http, {}) for _ in range(3)]
    assert all(server.exited.is_set() for server in servers)
    assert open_pipes() - before == set()  # while the ServerProcess objects are still alive


async def test_a_loaded_line_triggers_the_health_check(
    fake_binary: str, tmp_path: Path, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    # polls a minute apart: only llama-server's "model loaded" line can make it ready in time
    monkeypatch.setattr(process, "_POLL_FIRST", 60.0)
    monkeypatch.setattr(process, "_POLL_MAX", 60.0)
    server = await _run_until_ready(fake_binary, tmp_path, http, {"load_delay": 0.5})
    assert server.ready.is_set()
    assert "llama_server: model loaded" in server.tail_text()


async def test_a_silent_load_is_found_by_polling(fake_binary: str, tmp_path: Path, http: httpx.AsyncClient) -> None:
    server = await _run_until_ready(fake_binary, tmp_path, http, {"load_delay": 0.5, "silent_load": True})
    assert server.ready.is_set()
    assert "model loaded" not in server.tail_text()
    assert server.slots == 2  # /props was read after /health said 200


async def test_a_silent_load_is_not_taken_for_ready_by_the_hint_alone(
    fake_binary: str, tmp_path: Path, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the "server is listening" line comes before the load ends: it triggers a poll, which says 503
    monkeypatch.setattr(process, "_POLL_FIRST", 60.0)
    monkeypatch.setattr(process, "_POLL_MAX", 60.0)
    server = await _run_until_ready(fake_binary, tmp_path, http, {"load_delay": 0.3, "silent_load": True}, within=1.5)
    assert "server is listening" in server.tail_text()
    assert not server.ready.is_set()


# ---- a spare lifeline: started ahead, given its command at the load -----------------------------


async def _spare(nursery: trio.Nursery) -> Lifeline:
    spare = Lifeline()
    await nursery.start(spare.run)
    assert spare.available
    return spare


def _fake(fake_binary: str, tmp_path: Path, behaviour: dict) -> tuple[list[str], int]:
    model = tmp_path / "m.json"
    model.write_text(json.dumps(behaviour))
    port = free_port()
    return [fake_binary, "-m", str(model), "--port", str(port)], port


async def test_a_load_takes_a_spare_lifeline(fake_binary: str, tmp_path: Path, http: httpx.AsyncClient) -> None:
    before = open_pipes()
    argv, port = _fake(fake_binary, tmp_path, {})
    async with trio.open_nursery() as nursery:
        spare = await _spare(nursery)
        assert spare.process is not None
        lifeline_pid = spare.process.pid
        await trio.sleep(0.3)  # the spare has started its Python and waits for a command
        assert pids_alive([lifeline_pid]) == [lifeline_pid]
        server = ServerProcess(argv, name="m", port=port, http=http, lifeline=spare)
        nursery.start_soon(server.run, 10.0)
        with trio.fail_after(8):
            await server.ready.wait()
        assert server.took_spare and not spare.available
        assert server._process is spare.process  # no lifeline was started for the load
        assert server.pid is not None and server.pid != lifeline_pid
        assert (await http.get(f"{server.base_url}/health")).status_code == 200
        nursery.cancel_scope.cancel()
    assert server.returncode == -signal.SIGTERM  # stopped the usual way: SIGTERM, forwarded
    assert pids_alive([lifeline_pid, server.pid]) == []
    assert spare.done.is_set()
    assert open_pipes() - before == set()


async def test_arguments_reach_the_command_as_they_are(tmp_path: Path, http: httpx.AsyncClient) -> None:
    argv = ["sh", "-c", 'for a in "$@"; do printf "<%s>\\n" "$a"; done; exit 3', "sh", "two\nlines", "", "x y", "é"]
    async with trio.open_nursery() as nursery:
        server = ServerProcess(argv, name="m", port=free_port(), http=http, lifeline=await _spare(nursery))
        with trio.fail_after(5):
            await server.run(10.0)
    assert server.took_spare
    assert isinstance(server.failure, ModelLoadFailed)
    assert server.returncode == 3
    assert server.tail_text().endswith("<two\nlines>\n<>\n<x y>\n<é>")  # a newline, an empty one, a space


async def test_a_spare_load_that_exits_fails_fast_with_its_output(
    fake_binary: str, tmp_path: Path, http: httpx.AsyncClient
) -> None:
    before = open_pipes()
    argv, port = _fake(fake_binary, tmp_path, {"exit_on_load": 2})
    async with trio.open_nursery() as nursery:
        server = ServerProcess(argv, name="m", port=port, http=http, lifeline=await _spare(nursery))
        with trio.fail_after(5):
            await server.run(30.0)
    assert server.took_spare
    assert isinstance(server.failure, ModelLoadFailed)
    assert "exited with code 2" in server.failure.message
    assert "invalid magic" in server.failure.message  # the last words, read before the pipe was closed
    assert open_pipes() - before == set()


async def test_a_spare_load_that_times_out_is_stopped(fake_binary: str, tmp_path: Path, http: httpx.AsyncClient) -> None:
    argv, port = _fake(fake_binary, tmp_path, {"load_delay": 30})
    async with trio.open_nursery() as nursery:
        server = ServerProcess(argv, name="m", port=port, http=http, stop_timeout=2, lifeline=await _spare(nursery))
        with trio.fail_after(5):
            await server.run(0.5)
    assert server.took_spare
    assert isinstance(server.failure, ModelLoadTimeout)
    assert server.pid is not None and pids_alive([server.pid]) == []
    assert server.returncode == -signal.SIGTERM


async def test_kill_on_stop_kills_a_spare_loads_server_at_once(
    fake_binary: str, tmp_path: Path, http: httpx.AsyncClient
) -> None:
    # ignores SIGTERM and the grace is long: only the SIGKILL to llama-server stops it in time
    argv, port = _fake(fake_binary, tmp_path, {"ignore_sigterm": True})
    async with trio.open_nursery() as nursery:
        server = ServerProcess(argv, name="m", port=port, http=http, stop_timeout=20, lifeline=await _spare(nursery))
        nursery.start_soon(server.run, 10.0)
        with trio.fail_after(8):
            await server.ready.wait()
        server.kill_on_stop = True
        stopping = trio.current_time()
        nursery.cancel_scope.cancel()
    assert trio.current_time() - stopping < 5  # not the 20 s grace that ends in a SIGKILL to the lifeline
    assert server.took_spare
    assert server.returncode == -signal.SIGKILL


async def test_a_spare_load_cancelled_before_the_command_is_written(
    fake_binary: str, tmp_path: Path, http: httpx.AsyncClient
) -> None:
    before = open_pipes()
    argv, port = _fake(fake_binary, tmp_path, {})
    async with trio.open_nursery() as nursery:
        spare = await _spare(nursery)
        server = ServerProcess(argv, name="m", port=port, http=http, lifeline=spare)
        with trio.CancelScope() as scope:
            scope.cancel()
            await server.run(10.0)
        with trio.fail_after(2):
            await spare.done.wait()
    assert server.pid is None and server.exited.is_set()
    assert open_pipes() - before == set()


async def test_a_dead_spare_is_passed_over(fake_binary: str, tmp_path: Path, http: httpx.AsyncClient) -> None:
    before = open_pipes()
    argv, port = _fake(fake_binary, tmp_path, {})
    async with trio.open_nursery() as nursery:
        spare = await _spare(nursery)
        assert spare.process is not None
        spare.process.kill()
        with trio.fail_after(2):
            await spare.done.wait()
        assert not spare.available
        server = ServerProcess(argv, name="m", port=port, http=http, lifeline=spare)
        nursery.start_soon(server.run, 10.0)
        with trio.fail_after(8):
            await server.ready.wait()
        assert not server.took_spare  # it started a lifeline of its own
        nursery.cancel_scope.cancel()
    assert open_pipes() - before == set()


async def test_a_spare_is_not_used_once_the_environment_changed(
    fake_binary: str, tmp_path: Path, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = open_pipes()
    argv, port = _fake(fake_binary, tmp_path, {})
    async with trio.open_nursery() as nursery:
        spare = await _spare(nursery)
        monkeypatch.setenv("SMART_PROXY_TEST_SPARE", "1")  # llama-server would not inherit it from the spare
        assert not spare.available
        server = ServerProcess(argv, name="m", port=port, http=http, lifeline=spare)
        nursery.start_soon(server.run, 10.0)
        with trio.fail_after(8):
            await server.ready.wait()
        assert not server.took_spare
        with trio.fail_after(2):  # the spare nobody can take is stopped
            await spare.done.wait()
        nursery.cancel_scope.cancel()
    assert open_pipes() - before == set()


async def test_an_untaken_spare_is_stopped_and_leaves_no_pipe() -> None:
    before = open_pipes()
    async with trio.open_nursery() as nursery:
        spare = await _spare(nursery)
        assert spare.process is not None
        pid = spare.process.pid
        nursery.cancel_scope.cancel()
    assert spare.done.is_set() and pids_alive([pid]) == []
    assert open_pipes() - before == set()


# ---- a llama-server killed by a signal is named ------------------------------------------


def test_describe_exit_names_signals_and_codes() -> None:
    assert process.describe_exit(3).what == "exited with code 3"
    assert process.describe_exit(3).signal is None
    ill = process.describe_exit(-signal.SIGILL)
    assert (ill.what, ill.signal) == ("was killed by SIGILL (illegal instruction)", "SIGILL")
    assert "CPU instructions this machine cannot run" in ill.hint
    assert "out-of-memory killer" in process.describe_exit(-signal.SIGKILL).hint
    assert process.describe_exit(-signal.SIGSEGV).what == "was killed by SIGSEGV (segmentation fault)"
    assert process.describe_exit(-signal.SIGABRT).what == "was killed by SIGABRT (aborted)"
    assert process.describe_exit(-signal.SIGUSR2) == process.Exit("was killed by SIGUSR2", None, "SIGUSR2")


async def _model_health(http: httpx.AsyncClient, url: str, name: str) -> dict:
    return next(m for m in (await http.get(f"{url}/health")).json()["pool"]["models"] if m["model"] == name)


_EXPECTED = {
    "SIGILL": "was killed by SIGILL (illegal instruction) while loading: the binary uses CPU instructions this machine "
    "cannot run",
    "SIGKILL": "was killed by SIGKILL (not by this proxy) while loading: most often the kernel's out-of-memory killer",
    "SIGSEGV": "was killed by SIGSEGV (segmentation fault) while loading: llama-server crashed",
    "SIGABRT": "was killed by SIGABRT (aborted) while loading: llama-server stopped on a failed check",
}


@pytest.mark.parametrize("name", sorted(_EXPECTED))
async def test_a_signal_while_loading_is_named_in_502_health_and_log(
    name: str, make_config, start_proxy, http: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    url = await start_proxy(make_config({"a": {"signal_on_load": name}}))
    expected = f"llama-server for model 'a' {_EXPECTED[name]}"
    response = await http.post(f"{url}/v1/chat/completions", json={"model": "a", "messages": [{"role": "user", "content": "x"}]})
    assert response.status_code == 502
    message = response.json()["error"]["message"]
    assert message.startswith(expected)
    assert "Its last output:\n" in message and "\ninit: llama threadpool init, n_threads = 2\n" in message
    response = await http.post(f"{url}/api/generate", json={"model": "a", "prompt": "x", "stream": False})
    assert response.status_code == 502 and response.json()["error"].startswith("llama-server for model 'a'")
    model = next(m for m in (await http.get(f"{url}/health")).json()["pool"]["models"] if m["model"] == "a")
    assert model["last_signal"] == name and model["last_error"].startswith(expected)
    assert model["last_exit_code"] == -getattr(signal, name)
    assert any(record.levelname == "ERROR" and expected in record.getMessage() for record in caplog.records)


async def test_a_signal_while_serving_is_named(make_config, start_proxy, http: httpx.AsyncClient) -> None:
    url = await start_proxy(make_config({"a": {"signal_on_request": "SIGSEGV"}}))
    response = await http.post(f"{url}/v1/completions", json={"model": "a", "prompt": "x"})
    assert response.status_code == 502
    with trio.fail_after(5):  # the relay may answer before the pool has seen the process go
        while (model := await _model_health(http, url, "a"))["crashes"] == 0:
            await trio.sleep(0.02)
    assert model["last_signal"] == "SIGSEGV" and model["crashes"] == 1
    assert "was killed by SIGSEGV (segmentation fault) while serving: llama-server crashed" in model["last_error"]


# ---- reading llama-server's output ----------------------------------------------------------------


def _reference_lines(data: bytes, limit: int) -> list[bytes]:
    lines = data.split(b"\n")
    last = lines.pop()
    cut = [line if len(line) <= limit else line[:limit] + OutputLines.CUT_MARK for line in lines]
    if last:
        cut.append(last if len(last) <= limit else last[:limit] + OutputLines.CUT_MARK)
    return cut


@pytest.mark.parametrize("seed", range(20))
def test_output_lines_match_a_split_whatever_the_chunks(seed: int) -> None:
    rng = random.Random(seed)
    data = b"".join(rng.choice([b"\n", b"a", b"bc", b"x" * rng.randrange(1, 40)]) for _ in range(300))
    lines, out, at = OutputLines(limit=16), [], 0
    while at < len(data):
        size = rng.randrange(1, 50)
        out += lines.feed(data[at : at + size])
        assert lines.pending <= 16
        at += size
    last = lines.close()
    if last is not None:
        out.append(last)
    assert out == _reference_lines(data, 16)


async def test_a_huge_line_of_output_is_read_in_bounded_memory(
    fake_binary: str, tmp_path: Path, http: httpx.AsyncClient
) -> None:
    noise = 16 * 1024 * 1024  # 16 MiB with no newline, before the load's lines
    tracemalloc.start()
    try:
        server = await _run_until_ready(fake_binary, tmp_path, http, {"noise": noise}, within=60)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert server.ready.is_set()  # the lines after the noise were read
    assert peak < 4 * 1024 * 1024  # never the whole line, let alone copies of it
    longest = max(len(line) for line in server.tail)
    assert 8000 < longest <= process._MAX_LINE + len(OutputLines.CUT_MARK)


@pytest.mark.parametrize("spare", [True, False])
async def test_variables_reach_the_command_through_the_lifeline(
    spare: bool, tmp_path: Path, http: httpx.AsyncClient
) -> None:
    argv = ["sh", "-c", 'printf "<%s|%s|%s>\\n" "$CUDA_VISIBLE_DEVICES" "$CUDA_DEVICE_ORDER" "$1"; exit 3', "sh", "--env"]
    env = {"CUDA_VISIBLE_DEVICES": "1,0", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    async with trio.open_nursery() as nursery:
        lifeline = await _spare(nursery) if spare else None
        server = ServerProcess(argv, name="m", port=free_port(), http=http, lifeline=lifeline, env=env)
        assert server.command[:4] == ["--env", "CUDA_VISIBLE_DEVICES=1,0", "--env", "CUDA_DEVICE_ORDER=PCI_BUS_ID"]
        with trio.fail_after(5):
            await server.run(10.0)
    assert server.took_spare is spare and server.returncode == 3
    assert server.tail_text().endswith("<1,0|PCI_BUS_ID|--env>")  # the command's own --env is its argument
