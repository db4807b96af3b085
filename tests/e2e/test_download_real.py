"""Hugging Face downloads end to end: the real gemma GGUF, a split copy of it made with
llama-gguf-split, the real llama-server, the proxy as a real process, and the real
huggingface_hub client against the fake hub (``HF_ENDPOINT``) with a per-test ``HF_HOME``.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import httpx
import pytest

from ..conftest import _missing
from ..fake_hub import FakeHub, HubFile

pytestmark = pytest.mark.real

WHOLE = "test-org/gemma-3-270m-it-GGUF"
SPLIT = "test-org/gemma-3-270m-it-split-GGUF"
NAME = "gemma-3-270m-it-Q4_K_M"


@pytest.fixture(scope="session")
def gemma_whole(gemma_path: str) -> HubFile:
    """The gemma GGUF as a hub file, streamed from where the package put it (never copied)."""
    return HubFile(f"{NAME}.gguf", Path(gemma_path))


@pytest.fixture(scope="session")
def gemma_parts(gemma_path: str, llama_server_binary: str, tmp_path_factory: pytest.TempPathFactory) -> list[HubFile]:
    """gemma split in three with llama-gguf-split (which ships beside llama-server), once a session."""
    tool = Path(llama_server_binary).parent / "llama-gguf-split"
    if not tool.exists():
        _missing(f"llama-gguf-split beside {llama_server_binary}")
    out = tmp_path_factory.mktemp("gemma-split")
    command = [str(tool), "--split-max-size", "100M", gemma_path, str(out / NAME)]
    subprocess.run(command, check=True, capture_output=True, timeout=120)
    parts = sorted(out.glob(f"{NAME}-*.gguf"))
    assert [p.name for p in parts] == [f"{NAME}-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    return [HubFile(p.name, p) for p in parts]


def ini(binary: str, *models: str) -> str:
    text = f"[pool]\nllama_server = {binary}\nsize = 2\nload_timeout = 60s\n"
    return text + "".join(models)


def chat(url: str, model: str) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 4}
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)


def test_real_gemma_downloads_then_serves_and_then_works_offline(
    hub: FakeHub, gemma_whole: HubFile, llama_server_binary: str, proxy_process, tmp_path: Path, monkeypatch
) -> None:
    hub.add_repo(WHOLE, [HubFile("README.md", b"# gemma\n", lfs=False), gemma_whole])
    config = ini(llama_server_binary, f"[model:gemma]\nrepo = {WHOLE}\nquant = Q4_K_M\n")
    proxy = proxy_process(config)
    response = chat(proxy.url, "gemma")
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"]
    assert hub.content_gets(gemma_whole.name) == 1
    [cached] = (tmp_path / "hf" / "hub").glob(f"models--*/snapshots/*/{gemma_whole.name}")
    assert cached.stat().st_size == gemma_whole.size
    log = proxy.log()
    assert f"gemma: downloading 1 file(s) of {WHOLE}" in log
    assert "gemma: downloaded 253.1 MB" in log
    assert proxy.stop() == 0

    hub.stop()  # a warm cache needs no hub
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    proxy = proxy_process(config)
    response = chat(proxy.url, "gemma")
    assert response.status_code == 200, response.text
    assert "downloading" not in proxy.log()


def test_real_split_gemma_is_fetched_whole_and_loaded_from_the_first_part(
    hub: FakeHub, gemma_parts: list[HubFile], llama_server_binary: str, proxy_process, tmp_path: Path
) -> None:
    hub.add_repo(SPLIT, gemma_parts)
    proxy = proxy_process(ini(llama_server_binary, f"[model:split]\nrepo = {SPLIT}\n"))
    response = chat(proxy.url, "split")
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"]
    for part in gemma_parts:
        assert hub.content_gets(part.name) == 1
    # llama-server was given the first part (a few MB of the 253) and found the others beside it
    log = proxy.log()
    first = f"{NAME}-00001-of-00003.gguf"
    assert gemma_parts[0].size < gemma_parts[1].size
    assert re.search(rf"loading model '\S+/snapshots/[0-9a-f]{{40}}/{re.escape(first)}'", log), log
    assert "llama_server: model loaded" in log


def test_real_corrupt_download_is_never_loaded_and_a_retry_succeeds(
    hub: FakeHub, gemma_whole: HubFile, llama_server_binary: str, proxy_process, tmp_path: Path
) -> None:
    hub.add_repo(WHOLE, [gemma_whole])
    hub.faults.corrupt.add(gemma_whole.name)  # one byte flipped, halfway through
    proxy = proxy_process(ini(llama_server_binary, f"[model:gemma]\nrepo = {WHOLE}\n"))
    response = chat(proxy.url, "gemma")
    assert response.status_code == 502
    assert "came down corrupt" in response.json()["error"]["message"]
    assert "started llama-server" not in proxy.log()
    assert list((tmp_path / "hf" / "hub").glob("models--*/blobs/*")) == []
    hub.faults.clear()
    response = chat(proxy.url, "gemma")
    assert response.status_code == 200, response.text
    assert proxy.log().count("started llama-server") == 1
