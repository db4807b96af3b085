"""The dashboard (``/ui``) in a real browser, against a real proxy process.

Debian's ``chromium`` (``.ci/install-chromium``) is driven by Playwright's sync API through
``executable_path``: Playwright's own browsers are never downloaded. The tests are plain
functions (Playwright's sync API runs its own loop) and the proxy is a process.

With the real llama-server and gemma-3-270m (``real``), each opens ``/ui``, sees the model,
presses *load* and waits for ``loaded``, opens the model's log and sees llama-server's
lines, and sends a playground message whose answer is seen growing as it streams: with API
keys off, on (the page asks; a wrong key is asked for again), and through real nginx at a
sub-path. With the fake hub and the fake llama-server, one more sees what the real model
does not show on demand: a pull's progress bar, a failed load's error, a load's bar and a
request queued for a busy slot.

With ``SMART_PROXY_UI_SCREENSHOTS=DIR`` the screenshots go to DIR (docs/ui holds the ones
docs/ui.md shows).
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from smart_proxy.process import free_port

from ..conftest import _missing
from .test_nginx import Nginx, find_nginx, render_site

KEY = "sk-ui-browser"
UI_DOC = Path(__file__).parents[2] / "docs" / "ui.md"
#: Gemma's own chat format (for this GGUF llama-server falls back to ChatML, whose markers the model then echoes).
TEMPLATE = Path(__file__).parents[2] / "templates" / "gemma3-tools.jinja"
#: Without the networking flags chromium's background connections are refused on a closed network.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
#: Milliseconds: a cold load of gemma on a busy machine, and a short answer.
LOAD_WAIT = 120_000


def find_chromium() -> str:
    path = shutil.which("chromium") or ("/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else None)
    if path is None:
        _missing("chromium (Debian package chromium: .ci/install-chromium)")
    assert path is not None
    return path


@pytest.fixture
def browser() -> Iterator:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("playwright (pip install playwright; the test extra has it)")
        raise AssertionError("unreachable") from None
    executable = find_chromium()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def gemma_ini(llama_server: str, gemma: str, key: str | None) -> str:
    keys = f"[proxy]\napi_keys = {key}\n" if key else ""
    return (
        f"{keys}[pool]\nllama_server = {llama_server}\nload_timeout = 60s\n"
        f"[model:gemma]\npath = {gemma}\nargs = --ctx-size 1024\nchat_template = {TEMPLATE}\n"
    )


def screenshot(page, name: str, tmp_path: Path) -> None:
    folder = Path(os.environ.get("SMART_PROXY_UI_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(folder / name), full_page=True)


def drive_dashboard(page, url: str, key: str | None, tmp_path: Path, shots: bool = False) -> None:
    """Open the dashboard at ``url`` (its ``/ui``) and use it as a person would; see the module docstring."""
    from playwright.sync_api import expect

    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("console", lambda message: errors.append(message.text) if "Content Security Policy" in message.text else None)
    page.goto(url + "/ui")
    assert page.url == url + "/ui/"  # the relative redirect
    if key:
        dialog = page.locator("#key-dialog")
        expect(dialog).to_be_visible()
        if shots:
            screenshot(page, "key-prompt.png", tmp_path)
        page.fill("#key-input", "sk-wrong")
        page.click("#key-submit")
        expect(page.locator("#key-message")).to_contain_text("refused")
        expect(dialog).to_be_visible()
        page.fill("#key-input", key)
        page.click("#key-submit")
        expect(dialog).to_be_hidden()
    row = page.locator('#models tr[data-model="gemma"]')
    expect(row).to_have_attribute("data-status", "unloaded")
    expect(page.locator("#connection")).to_have_text("live")
    expect(row.locator(".memory")).to_contain_text("MB")  # the estimate, before any load

    # load: the state goes to loaded (through loading, when the look catches it)
    row.locator("button.load").click()
    seen = []
    deadline = time.monotonic() + LOAD_WAIT / 1000
    while time.monotonic() < deadline:
        status = row.get_attribute("data-status")
        if not seen or seen[-1] != status:
            seen.append(status)
            if shots and status == "loading":
                screenshot(page, "loading.png", tmp_path)
        if status == "loaded":
            break
        time.sleep(0.05)
    assert seen[-1] == "loaded", seen
    assert "failed" not in seen, seen
    expect(page.locator("#action-status")).to_have_text("gemma is loaded")
    expect(row.locator(".slots")).to_have_text(re.compile(r"^0/\d+$"))

    # the log: llama-server's own lines
    row.locator("button.log").click()
    log = page.locator("#log")
    expect(log).to_contain_text("llama_server: model loaded", timeout=20_000)
    expect(log).to_contain_text(re.compile(r"listening on http://127\.0\.0\.1:\d+"))
    expect(page.locator("#log-model")).to_have_text("gemma")

    # the playground: the answer is seen growing, chunk by chunk
    page.fill("#chat-max-tokens", "40")
    page.fill("#chat-temperature", "0")
    page.fill("#chat-input", "What is the capital of France? Answer in one sentence.")
    page.click("#chat-send")
    answer = page.locator("#chat-log .message.assistant").last
    lengths: list[int] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        text = answer.locator(".text").inner_text()
        if not lengths or lengths[-1] != len(text):
            lengths.append(len(text))
        if answer.get_attribute("data-streaming") == "false":
            break
        time.sleep(0.02)
    final = answer.locator(".text").inner_text()
    assert final.strip(), (lengths, page.locator("#chat-status").inner_text())
    assert int(answer.get_attribute("data-chunks") or 0) >= 2, lengths
    assert len([n for n in lengths if 0 < n < len(final)]) >= 1, lengths  # seen part-way, before the end
    assert "error" not in (answer.get_attribute("class") or "")

    # the request's summary in the activity table
    activity = page.locator("#activity tbody tr").first
    expect(activity).to_contain_text("POST /v1/chat/completions (stream)")
    expect(activity).to_contain_text("gemma")
    expect(activity.locator("td").nth(3)).to_have_text("200")
    if shots:
        screenshot(page, "dashboard.png", tmp_path)

    # unload: back to unloaded
    row.locator("button.unload").click()
    expect(row).to_have_attribute("data-status", "unloaded", timeout=30_000)
    assert errors == []


@pytest.mark.real
@pytest.mark.parametrize("key", [None, KEY], ids=["keys-off", "keys-on"])
def test_the_dashboard_drives_the_real_model(
    browser, proxy_process, llama_server_binary: str, gemma_path: str, tmp_path: Path, key: str | None
) -> None:
    proxy = proxy_process(gemma_ini(llama_server_binary, gemma_path, key))
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    drive_dashboard(page, proxy.url, key, tmp_path, shots=True)


def ui_location() -> str:
    """The ```nginx block of docs/ui.md: the proxy at a sub-path."""
    blocks = [block.split("\n```", 1)[0] for block in UI_DOC.read_text().split("```nginx\n")[1:]]
    assert len(blocks) == 1, "docs/ui.md: expected one ```nginx block"
    return blocks[0]


@pytest.mark.real
def test_the_dashboard_behind_nginx_at_a_sub_path(
    browser, proxy_process, llama_server_binary: str, gemma_path: str, tmp_path: Path
) -> None:
    """docs/ui.md's location in the documented site: the page and every call it makes go through ``/llm/``."""
    binary = find_nginx()
    proxy = proxy_process(gemma_ini(llama_server_binary, gemma_path, KEY))
    proxy_port = int(proxy.url.rsplit(":", 1)[1])
    nginx_port = free_port()
    probes = "    # probes: public, cheap, not logged\n"
    site = render_site(proxy_port, nginx_port, {probes: ui_location() + "\n" + probes})
    nginx = Nginx(binary, tmp_path / "nginx", site, nginx_port)
    try:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        drive_dashboard(page, nginx.url + "/llm", KEY, tmp_path)
        page.close()  # ends the page's streams, so that nginx logs them
    finally:
        nginx.stop()
    access = (tmp_path / "nginx" / "access.log").read_text()
    for path in ("/llm/ui/app.js", "/llm/events", "/llm/v1/models", "/llm/api/generate", "/llm/logs/gemma?follow=1",
                 "/llm/v1/chat/completions"):  # fmt: skip
        assert f" {path} " in access, path


def test_the_dashboard_shows_downloads_failures_and_queues(browser, proxy_process, hub, fake_binary: str, tmp_path: Path):
    """With the fake hub and llama-server: a pull's progress bar, a failed load's error, a load's bar, a queue."""
    import threading

    import httpx
    from playwright.sync_api import expect

    from ..test_download import REPO, tiny_repo

    tiny_repo(hub, pad=24 * 1024 * 1024)  # huggingface_hub reports progress every 10 MiB
    hub.faults.slow["tiny-Q4_K_M.gguf"] = 0.1  # a few seconds for 24 MiB
    (tmp_path / "a.json").write_text('{"load_delay": 1.5, "slots": 1, "token_delay": 0.25, "tokens": 8}')
    (tmp_path / "broken.json").write_text('{"exit_on_load": 3}')
    proxy = proxy_process(
        f"[pool]\nllama_server = {fake_binary}\nload_timeout = 10s\nstop_timeout = 2s\n"
        f"[model:tiny]\nrepo = {REPO}\nquant = Q4_K_M\n"
        f"[model:a]\npath = {tmp_path / 'a.json'}\n[model:broken]\npath = {tmp_path / 'broken.json'}\n"
    )
    page = browser.new_page(viewport={"width": 1280, "height": 720})
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("console", lambda message: errors.append(message.text) if "Content Security Policy" in message.text else None)
    page.goto(proxy.url + "/ui/")
    rows = {name: page.locator(f'#models tr[data-model="{name}"]') for name in ("tiny", "a", "broken")}
    for row in rows.values():
        expect(row).to_have_attribute("data-status", "unloaded")

    # pull: the row's progress bar moves, the status line follows Ollama's progress, then it is done
    rows["tiny"].locator("button.pull").click()
    bar = rows["tiny"].locator("progress.download")
    expect(bar).to_be_visible(timeout=20_000)
    values = set()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and bar.count():
        try:
            value = bar.evaluate("node => node.position >= 0 ? node.value : null", timeout=1000)
        except Exception:  # re-drawn or gone between the look and the read
            continue
        if value is not None:
            values.add(round(value))
            if 0 < value < 100 and os.environ.get("SMART_PROXY_UI_SCREENSHOTS"):
                screenshot(page, "download.png", tmp_path)
        time.sleep(0.05)
    expect(page.locator("#action-status")).to_have_text("pull tiny: success", timeout=30_000)
    assert any(0 < value < 100 for value in values), values
    expect(rows["tiny"]).to_have_attribute("data-status", "unloaded")

    # a load that fails shows why
    rows["broken"].locator("button.load").click()
    expect(rows["broken"]).to_have_attribute("data-status", "failed", timeout=20_000)
    expect(rows["broken"].locator("td.progress.error")).not_to_be_empty()
    expect(page.locator("#action-status")).to_contain_text("load broken:")

    # two answers for a one-slot model: a load's bar, then one of them queued
    def ask() -> None:
        body = {"model": "a", "messages": [{"role": "user", "content": "hi"}], "stream": True}
        with httpx.Client(timeout=30) as client:
            client.post(proxy.url + "/v1/chat/completions", json=body).raise_for_status()

    askers = [threading.Thread(target=ask) for _ in range(2)]
    for asker in askers:
        asker.start()
    expect(rows["a"].locator("progress.loading")).to_be_visible(timeout=10_000)
    expect(rows["a"].locator("td.queued")).to_have_text("1", timeout=10_000)
    expect(rows["a"]).to_have_attribute("data-status", "loaded", timeout=10_000)
    for asker in askers:
        asker.join(30)
    expect(page.locator("#activity tbody tr", has_text="/v1/chat/completions (stream)")).to_have_count(2, timeout=10_000)
    expect(rows["a"].locator("td.queued")).to_have_text("0")
    assert errors == []


def test_a_router_dashboard_shows_its_peers_going_down_and_back(browser, proxy_process, fake_binary: str, tmp_path: Path):
    """A router's page: its peer, the peer's models (in the playground's list too), the peer out and back."""
    from playwright.sync_api import expect

    (tmp_path / "remote.json").write_text("{}")
    node_ini = f"[pool]\nllama_server = {fake_binary}\nload_timeout = 10s\n[model:remote]\npath = {tmp_path / 'remote.json'}\n"
    node = proxy_process(node_ini)
    router = proxy_process(
        f"[peer:node]\nurl = {node.url}\nkind = smart-proxy\nrefresh = 1s\nfailures = 1\ncooldown = 1s\n"
    )
    page = browser.new_page(viewport={"width": 1280, "height": 720})
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(router.url + "/ui/")
    row = page.locator('#peers tr[data-peer="node"]')
    expect(row).to_have_attribute("data-status", "ok", timeout=20_000)
    expect(row.locator("td.peer-models")).to_have_text("remote")
    expect(page.locator("#role")).to_contain_text("router")
    expect(page.locator("#chat-model option[value='remote']")).to_have_count(1)

    port = node.url.rsplit(":", 1)[1]
    node.stop()
    expect(row).to_have_attribute("data-status", "down", timeout=20_000)
    expect(row.locator("td.error")).not_to_be_empty()
    proxy_process(node_ini, "--port", port)  # the node again, on its port: the router's probe brings it back
    expect(row).to_have_attribute("data-status", "ok", timeout=30_000)
    assert errors == []
