"""``smart-proxy ps``, ``stop`` and ``logs`` as subprocesses against a running proxy (smart_proxy/control.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

USER = [{"role": "user", "content": "hi"}]


def ini(tmp_path: Path, fake_binary: str, extra: str = "") -> str:
    for name, behaviour in {"a": {"load_delay": 0.05}, "p": {"load_delay": 0.05}}.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(behaviour))
    return (
        f"[proxy]\n{extra}\n"
        f"[pool]\nllama_server = {fake_binary}\nsize = 2\nload_timeout = 10s\nstop_timeout = 2s\n"
        f"[model:a]\npath = {tmp_path / 'a.json'}\n"
        f"[model:p]\npath = {tmp_path / 'p.json'}\npin = true\n"
    )


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k != "SMART_PROXY_API_KEY"}
    return subprocess.run(
        [sys.executable, "-m", "smart_proxy", *args], capture_output=True, text=True, timeout=60, env={**environ, **(env or {})}
    )


def load(url: str, model: str, key: str | None = None) -> None:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    with httpx.Client(timeout=30) as client:
        answer = client.post(url + "/v1/chat/completions", json={"model": model, "messages": USER}, headers=headers)
    assert answer.status_code == 200, answer.text


def test_a_proxy_that_is_not_running_is_one_clear_line() -> None:
    for args in (["ps"], ["stop", "a"], ["logs", "a"], ["logs", "a", "-f"]):
        done = cli(*args, "--url", "http://127.0.0.1:9")
        assert done.returncode == 1, done
        assert done.stderr.count("\n") == 1 and "no smart-proxy answers at http://127.0.0.1:9" in done.stderr
        assert "is it running?" in done.stderr and "Traceback" not in done.stderr


def test_ps_shows_loaded_models_and_stop_unloads_them(proxy_process, fake_binary, tmp_path) -> None:
    proxy = proxy_process(ini(tmp_path, fake_binary))
    empty = cli("ps", "--url", proxy.url)
    assert empty.returncode == 0 and empty.stdout.split() == ["NAME", "STATE", "MEMORY", "IN", "USE", "UNTIL"]
    load(proxy.url, "a")
    load(proxy.url, "p")
    table = cli("ps", "--url", proxy.url)
    assert table.returncode == 0, table.stderr
    rows = {line.split()[0]: line for line in table.stdout.splitlines()[1:]}
    assert set(rows) == {"a", "p"}
    assert rows["a"].split()[1:2] == ["ready"] and rows["a"].rstrip().endswith("forever")  # idle_ttl 0: kept
    assert rows["p"].rstrip().endswith("pinned")
    as_json = json.loads(cli("ps", "--json", "--url", proxy.url).stdout)
    by_name = {row["name"]: row for row in as_json}
    assert by_name["a"]["state"] == "ready" and by_name["a"]["slots"] == 2 and by_name["a"]["in_flight"] == 0
    assert by_name["p"]["pinned"] is True and isinstance(by_name["a"]["pid"], int)

    stopped = cli("stop", "a", "--url", proxy.url)
    assert stopped.returncode == 0 and stopped.stdout == "stopped a\n", stopped
    assert [row["name"] for row in json.loads(cli("ps", "--json", "--url", proxy.url).stdout)] == ["p"]
    again = cli("stop", "a", "--url", proxy.url)
    assert again.returncode == 0 and again.stdout == "a was not loaded\n"

    pinned = cli("stop", "p", "--url", proxy.url)
    assert pinned.returncode == 1 and "p is pinned" in pinned.stderr and "pin = true" in pinned.stderr
    assert [row["name"] for row in json.loads(cli("ps", "--json", "--url", proxy.url).stdout)] == ["p"]

    unknown = cli("stop", "nope", "--url", proxy.url)
    assert unknown.returncode == 1 and "'nope' not found" in unknown.stderr


def test_logs_prints_and_follows_a_models_output(proxy_process, fake_binary, tmp_path) -> None:
    proxy = proxy_process(ini(tmp_path, fake_binary))
    load(proxy.url, "a")
    printed = cli("logs", "a", "--url", proxy.url)
    assert printed.returncode == 0 and "llama_server: model loaded" in printed.stdout.splitlines()
    missing = cli("logs", "nope", "--url", proxy.url)
    assert missing.returncode == 1 and "'nope' not found" in missing.stderr

    follower = subprocess.Popen(  # noqa: SIM115 (closed by communicate)
        [sys.executable, "-m", "smart_proxy", "logs", "p", "-f", "--url", proxy.url],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        time.sleep(1.0)  # subscribed before p prints anything
        load(proxy.url, "p")
        seen = []
        deadline = time.monotonic() + 20
        while "llama_server: model loaded" not in seen and time.monotonic() < deadline:
            seen.append(follower.stdout.readline().rstrip("\n"))
        assert "llama_server: model loaded" in seen and any("alias p" in line for line in seen), seen
    finally:
        follower.send_signal(signal.SIGINT)
        code = follower.wait(10)
        _rest, errors = follower.communicate()  # and its pipes closed
    assert code == 130 and "Traceback" not in errors, errors


def test_the_api_key_comes_from_the_option_or_the_environment(proxy_process, fake_binary, tmp_path) -> None:
    proxy = proxy_process(ini(tmp_path, fake_binary, "api_keys = sk-one"))
    refused = cli("ps", "--url", proxy.url)
    assert refused.returncode == 1 and "missing API key" in refused.stderr and "--api-key" in refused.stderr
    wrong = cli("ps", "--url", proxy.url, "--api-key", "sk-two")
    assert wrong.returncode == 1 and "invalid API key" in wrong.stderr
    assert cli("ps", "--url", proxy.url, "--api-key", "sk-one").returncode == 0
    load(proxy.url, "a", key="sk-one")
    from_env = cli("ps", "--json", "--url", proxy.url, env={"SMART_PROXY_API_KEY": "sk-one"})
    assert from_env.returncode == 0 and [row["name"] for row in json.loads(from_env.stdout)] == ["a"]
    assert cli("stop", "a", "--url", proxy.url, env={"SMART_PROXY_API_KEY": "sk-one"}).stdout == "stopped a\n"
    assert "llama_server" in cli("logs", "a", "--url", proxy.url, "--api-key", "sk-one").stdout


def test_ps_says_where_each_server_is_as_ollama_ps_does() -> None:
    from smart_proxy.control import _processor, ps_rows

    server = {"state": "ready", "memory": 0, "vram": 6, "gpus": [1], "in_flight": 0, "slots": 4, "pinned": False,
              "expires_at": None, "pid": 1, "port": 2}  # fmt: skip
    state = {"models": [{"model": "a", "queued": 0, "pinned": False, "servers": [server]}]}
    (row,) = ps_rows(state)
    assert (row["vram"], row["gpus"]) == (6, [1])
    assert _processor(row) == "100% GPU 1"
    assert _processor({**row, "memory": 14, "vram": 26, "gpus": [0, 1]}) == "35%/65% CPU/GPU 0,1"
    assert _processor({**row, "memory": 5, "vram": 0, "gpus": []}) == "100% CPU"
    older = {key: value for key, value in server.items() if key not in ("vram", "gpus")}  # a proxy without GPU fields
    assert ps_rows({"models": [{"model": "a", "queued": 0, "pinned": False, "servers": [older]}]})[0]["vram"] == 0
