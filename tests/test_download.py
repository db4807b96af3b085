"""Hugging Face downloads: the real huggingface_hub client against a fake hub on 127.0.0.1.

The fake hub (tests/fake_hub.py) serves "GGUFs" that are JSON for the fake llama-server: each
quant answers with a different number of tokens, so ``usage.completion_tokens`` tells which file
was loaded. A truncated or corrupt file is not JSON, so the fake llama-server would fail to load
it; the tests check it never got the chance (no llama-server started at all).
"""

from __future__ import annotations

import errno
import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import trio

from smart_proxy.catalog import Catalog
from smart_proxy.config import ModelConfig, structure
from smart_proxy.download import (
    DownloadCancelled,
    Downloads,
    Hub,
    Progress,
    RepoFile,
    fetch,
    hub_error,
    resolve,
    select,
)
from smart_proxy.errors import InsufficientStorage, ModelNotFound, UpstreamError
from smart_proxy.memory import read_estimate

from .fake_hub import FakeHub, HubFile, environ_for, split_bytes

REPO = "test-org/tiny-GGUF"
TOKENS = {"Q4_K_M": 4, "Q8_0": 8, "F16": 16, "IQ2_XS": 2}


def gguf(tokens: int, pad: int = 0) -> bytes:
    """A fake GGUF: JSON behaviour for the fake llama-server, padded to a size."""
    return json.dumps({"load_delay": 0.05, "tokens": tokens, "pad": "x" * pad}).encode()


def tiny_repo(hub: FakeHub, pad: int = 0) -> None:
    split = split_bytes(gguf(TOKENS["F16"], pad), 3)
    hub.add_repo(
        REPO,
        [
            HubFile("README.md", b"# tiny\n", lfs=False),
            HubFile("mmproj-tiny-F16.gguf", b"not a model, a projector"),
            HubFile("tiny-IQ2_XS.gguf", gguf(TOKENS["IQ2_XS"])),
            HubFile("tiny-Q4_K_M.gguf", gguf(TOKENS["Q4_K_M"], pad)),
            HubFile("tiny-Q8_0.gguf", gguf(TOKENS["Q8_0"])),
            *(HubFile(f"tiny-F16-{i:05d}-of-00003.gguf", part) for i, part in enumerate(split, 1)),
        ],
    )


def make(tmp_path: Path, fake_binary: str, models: dict[str, dict[str, str]], catalog: dict | None = None, **pool):
    raw: dict[str, dict[str, str]] = {
        "pool": {"llama_server": fake_binary, "load_timeout": "10s", "stop_timeout": "2s", **pool}
    }
    raw.update({f"model:{name}": options for name, options in models.items()})
    if catalog is not None:
        raw["catalog"] = catalog
    return structure(raw, base_dir=str(tmp_path))


async def chat(http: httpx.AsyncClient, url: str, model: str, **kwargs) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    return await http.post(f"{url}/v1/chat/completions", json=body, **kwargs)


def blobs(tmp_path: Path) -> list[str]:
    """Every file in the test's HF cache blobs folder (temporary ones included)."""
    folder = tmp_path / "hf" / "hub" / f"models--{REPO.replace('/', '--')}" / "blobs"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


async def health(http: httpx.AsyncClient, url: str) -> dict:
    return (await http.get(f"{url}/health")).json()


# ---- choosing files, as llama-server -hf does ---------------------------------------------


def _files(*names: str) -> list[RepoFile]:
    return [RepoFile(name) for name in names]


@pytest.mark.parametrize(
    ("names", "options", "chosen"),
    [
        # no quant: Q4_K_M first, then Q8_0, then the first model GGUF (never an mmproj)
        (("a-Q8_0.gguf", "a-Q4_K_M.gguf", "a-F16.gguf"), {}, ["a-Q4_K_M.gguf"]),
        (("mmproj-a-Q4_K_M.gguf", "a-F16.gguf", "a-Q8_0.gguf"), {}, ["a-Q8_0.gguf"]),
        (("mmproj-a-F16.gguf", "a-IQ2_XS.gguf", "a-F16.gguf"), {}, ["a-IQ2_XS.gguf"]),
        # a quant tag matches before . or -, case aside; the first match in listing order wins
        (("a-Q4_K_M.gguf", "a-q8_0.gguf"), {"quant": "Q8_0"}, ["a-q8_0.gguf"]),
        (("a-Q4_K_S.gguf", "a-Q4_K_M.gguf"), {"quant": "q4_k_m"}, ["a-Q4_K_M.gguf"]),
        (
            ("Q4_K_M/a-Q4_K_M-00002-of-00002.gguf", "Q4_K_M/a-Q4_K_M-00001-of-00002.gguf"),
            {"quant": "Q4_K_M"},
            ["Q4_K_M/a-Q4_K_M-00001-of-00002.gguf", "Q4_K_M/a-Q4_K_M-00002-of-00002.gguf"],
        ),
        # a file name (case-insensitive) or a glob; any part of a split file means the whole set
        (("a-Q4_K_M.gguf", "a-Q8_0.gguf"), {"file": "A-Q8_0.GGUF"}, ["a-Q8_0.gguf"]),
        (
            ("b-F16-00001-of-00002.gguf", "b-F16-00002-of-00002.gguf", "b-Q8_0.gguf"),
            {"file": "*F16*"},
            ["b-F16-00001-of-00002.gguf", "b-F16-00002-of-00002.gguf"],
        ),
        (
            ("b-F16-00001-of-00002.gguf", "b-F16-00002-of-00002.gguf"),
            {"file": "b-F16-00002-of-00002.gguf"},
            ["b-F16-00001-of-00002.gguf", "b-F16-00002-of-00002.gguf"],
        ),
    ],
)
def test_select_picks_like_llama_server(names: tuple[str, ...], options: dict, chosen: list[str]) -> None:
    parts, mmproj = select(_files(*names), ModelConfig(name="m", repo="o/r", **options))
    assert [f.name for f in parts] == chosen
    assert mmproj is None


def test_select_mmproj_and_failures() -> None:
    files = _files("a-Q4_K_M.gguf", "mmproj-a-F16.gguf", "c-F16-00001-of-00003.gguf", "c-F16-00003-of-00003.gguf")
    parts, mmproj = select(files, ModelConfig(name="m", repo="o/r", mmproj="mmproj-*.gguf"))
    assert [f.name for f in parts] == ["a-Q4_K_M.gguf"]
    assert mmproj is not None and mmproj.name == "mmproj-a-F16.gguf"
    with pytest.raises(
        ModelNotFound, match=r"no Q2_K GGUF in Hugging Face repo 'o/r'; GGUF files there: a-Q4_K_M.gguf"
    ):
        select(files, ModelConfig(name="m", repo="o/r", quant="Q2_K"))
    with pytest.raises(ModelNotFound, match="no file 'nope.gguf'"):
        select(files, ModelConfig(name="m", repo="o/r", file="nope.gguf"))
    with pytest.raises(ModelNotFound, match=r"c-F16 .* lacks part\(s\) 2 of 3"):
        select(files, ModelConfig(name="m", repo="o/r", quant="F16"))
    with pytest.raises(ModelNotFound, match="no mmproj file"):
        select(files, ModelConfig(name="m", repo="o/r", mmproj="proj.gguf"))
    # names from the hub that would climb out of the cache folder are never chosen
    with pytest.raises(ModelNotFound):
        select(_files("../evil-Q4_K_M.gguf", "/abs-Q4_K_M.gguf"), ModelConfig(name="m", repo="o/r"))


def test_progress_bars_count_each_byte_once_for_plain_and_xet_downloads() -> None:
    """huggingface_hub's own Xet reporter drives our bar class without double counting."""
    from types import SimpleNamespace

    from huggingface_hub.utils._xet_progress_reporting import XetDownloadProgressReporter

    progress = Progress("m")
    progress.total = 300
    with progress.bar_class(RepoFile("a.gguf", size=100))(total=100, initial=0, unit="B") as bar:
        bar.update(60)
        bar.update_transfer(60)
        bar.update(40)
    assert progress.done == 100
    report = SimpleNamespace(total_bytes=200, total_bytes_completion_rate=1.0, total_transfer_bytes_completion_rate=1.0)
    with XetDownloadProgressReporter(
        reconstruction_desc="b.gguf", total=200, log_level=30, tqdm_class=progress.bar_class(RepoFile("b.gguf"))
    ) as reporter:
        for written, received in ((50, 80), (200, 150)):
            reporter.update_progress(
                SimpleNamespace(**vars(report), total_bytes_completed=written, total_transfer_bytes_completed=received)
            )
    assert progress.done == 300
    assert progress.fetched == {"a.gguf", "b.gguf"}
    progress.cancelled = True
    with pytest.raises(DownloadCancelled):
        progress.add(1)


def test_hub_settings_follow_the_environment(tmp_path: Path) -> None:
    hub = Hub.from_env({"HF_HOME": str(tmp_path), "HF_ENDPOINT": "http://127.0.0.1:9/", "HF_HUB_OFFLINE": "1"})
    assert hub == Hub(cache_dir=str(tmp_path / "hub"), endpoint="http://127.0.0.1:9", offline=True)
    assert Hub.from_env({"HF_HUB_CACHE": "/c", "HF_HOME": "/h"}).cache_dir == "/c"
    assert Hub.from_env({"XDG_CACHE_HOME": "/x"}) == Hub(cache_dir="/x/huggingface/hub")


def test_disk_errors_translate_to_507() -> None:
    error = hub_error(OSError(errno.ENOSPC, "No space left on device"), "o/r", "a.gguf")
    assert isinstance(error, InsufficientStorage) and error.status == 507
    assert "a.gguf" in error.message
    assert isinstance(hub_error(OSError(errno.EACCES, "denied"), "o/r"), UpstreamError)


# ---- blocking download functions, against the fake hub ------------------------------------


def test_resolve_and_fetch_into_the_hf_cache(hub: FakeHub, tmp_path: Path) -> None:
    tiny_repo(hub)
    settings = Hub.from_env()
    plan = resolve(ModelConfig(name="m", repo=REPO, quant="F16", mmproj="mmproj-*"), settings)
    assert [f.name for f in plan.model] == [f"tiny-F16-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    assert plan.commit == hub.repos[REPO].commit
    files = fetch(plan, settings)
    snapshot = tmp_path / "hf" / "hub" / "models--test-org--tiny-GGUF" / "snapshots" / hub.repos[REPO].commit
    assert files.model == str(snapshot / "tiny-F16-00001-of-00003.gguf")
    assert files.mmproj == str(snapshot / "mmproj-tiny-F16.gguf")
    assert files.args() == ("--mmproj", files.mmproj)
    joined = b"".join(Path(p).read_bytes() for p in files.parts[:3])
    assert json.loads(joined)["tokens"] == TOKENS["F16"]
    # the standard cache layout other tools read: refs/main -> commit, blobs named by sha256
    assert (snapshot.parent.parent / "refs" / "main").read_text() == hub.repos[REPO].commit
    assert hub.repos[REPO].files["mmproj-tiny-F16.gguf"].sha256 in blobs(tmp_path)


def test_resolve_missing_repo_revision_and_file(hub: FakeHub) -> None:
    tiny_repo(hub)
    settings = Hub.from_env()
    with pytest.raises(ModelNotFound, match="repo 'test-org/nope' not found"):
        resolve(ModelConfig(name="m", repo="test-org/nope"), settings)
    with pytest.raises(ModelNotFound, match="revision not found"):
        resolve(ModelConfig(name="m", repo=REPO, revision="v9"), settings)
    with pytest.raises(ModelNotFound, match="no Q2_K GGUF in Hugging Face repo 'test-org/tiny-GGUF'"):
        resolve(ModelConfig(name="m", repo=REPO, quant="Q2_K"), settings)


def test_hf_token_is_sent_and_private_repo_needs_it(hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    hub.add_repo("test-org/private-GGUF", [HubFile("p-Q4_K_M.gguf", gguf(4))], token="hf_secret")
    model = ModelConfig(name="m", repo="test-org/private-GGUF")
    with pytest.raises(ModelNotFound, match="private or gated, set HF_TOKEN"):
        resolve(model, Hub.from_env())
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    plan = resolve(model, Hub.from_env())
    fetch(plan, Hub.from_env())
    [api] = [r for r in hub.requests if r.path.startswith("/api/models/") and r.authorization]
    [head] = [r for r in hub.requests if r.method == "HEAD"]
    [content] = [r for r in hub.requests if r.path.startswith("/cdn/")]
    assert api.authorization == head.authorization == "Bearer hf_secret"
    assert content.authorization is None  # the CDN never gets the token


def test_disk_full_up_front_is_507_and_downloads_nothing(hub: FakeHub, tmp_path: Path) -> None:
    tiny_repo(hub)
    hub.faults.claimed_size["tiny-Q4_K_M.gguf"] = 10**17  # 100 PB
    with pytest.raises(InsufficientStorage, match="not enough disk space to download test-org/tiny-GGUF"):
        fetch(resolve(ModelConfig(name="m", repo=REPO), Hub.from_env()), Hub.from_env())
    assert hub.content_gets("tiny-Q4_K_M.gguf") == 0


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 1 MB tmpfs for the HF cache (needs root to mount; skipped otherwise)."""
    mount = tmp_path / "small"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {result.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_disk_filling_up_mid_download_is_507_and_leaves_nothing(hub: FakeHub, small_disk: Path) -> None:
    # the hub claims 100 kB, so the up-front check passes; 3 MB come down and the disk fills
    hub.add_repo(REPO, [HubFile("big-Q4_K_M.gguf", b"x" * 3_000_000)])
    hub.faults.claimed_size["big-Q4_K_M.gguf"] = 100_000
    settings = Hub(cache_dir=str(small_disk / "hub"), endpoint=hub.url)
    with pytest.raises(InsufficientStorage, match="disk full while downloading big-Q4_K_M.gguf"):
        fetch(resolve(ModelConfig(name="m", repo=REPO), settings), settings)
    left = [p for p in (small_disk / "hub").rglob("*") if p.is_file() and p.parent.name == "blobs"]
    assert left == []


# ---- through the proxy ----------------------------------------------------------------------


async def test_first_request_downloads_then_serves(hub, tmp_path, fake_binary, start_proxy, http) -> None:
    tiny_repo(hub)
    url = await start_proxy(make(tmp_path, fake_binary, {"tiny": {"repo": REPO, "quant": "Q8_0"}}))
    response = await chat(http, url, "tiny")
    assert response.status_code == 200, response.text
    assert response.json()["model"] == "tiny"
    assert response.json()["usage"]["completion_tokens"] == TOKENS["Q8_0"]
    assert hub.content_gets("tiny-Q8_0.gguf") == 1
    assert hub.repos[REPO].files["tiny-Q8_0.gguf"].sha256 in blobs(tmp_path)
    # the llama-server was given the file in the HF cache
    server = (await health(http, url))["pool"]["servers"][0]
    props = (await http.get(f"http://127.0.0.1:{server['port']}/props")).json()
    assert props["model_path"].startswith(str(tmp_path / "hf" / "hub" / "models--test-org--tiny-GGUF" / "snapshots"))
    # the next request asks the hub nothing
    before = len(hub.requests)
    assert (await chat(http, url, "tiny")).status_code == 200
    assert len(hub.requests) == before


async def test_split_gguf_and_mmproj(hub, tmp_path, fake_binary, start_proxy, http) -> None:
    tiny_repo(hub)
    config = make(
        tmp_path, fake_binary, {"split": {"repo": REPO, "file": "*F16-0000?-of-*.gguf", "mmproj": "mmproj-*"}}
    )
    url = await start_proxy(config)
    response = await chat(http, url, "split")
    assert response.status_code == 200, response.text
    # the fake llama-server joined three parts it found beside the first
    assert response.json()["usage"]["completion_tokens"] == TOKENS["F16"]
    server = (await health(http, url))["pool"]["servers"][0]
    props = (await http.get(f"http://127.0.0.1:{server['port']}/props")).json()
    assert props["model_path"].endswith("/tiny-F16-00001-of-00003.gguf")
    assert props["mmproj"].endswith("/mmproj-tiny-F16.gguf")
    for i in (1, 2, 3):
        assert hub.content_gets(f"tiny-F16-{i:05d}-of-00003.gguf") == 1


async def test_16_concurrent_first_requests_one_download(hub, tmp_path, fake_binary, start_proxy, http) -> None:
    # huggingface_hub reports progress every 10 MiB: 24 MiB show some bytes done before the end
    tiny_repo(hub, pad=24 * 1024 * 1024)
    hub.faults.slow["tiny-Q4_K_M.gguf"] = 0.06  # ~1.5 s for 24 MiB
    url = await start_proxy(make(tmp_path, fake_binary, {"tiny": {"repo": REPO}}))
    statuses: list[int] = []
    seen: list[dict] = []

    async def one() -> None:
        statuses.append((await chat(http, url, "tiny")).status_code)

    async with trio.open_nursery() as nursery:
        for _ in range(16):
            nursery.start_soon(one)
        with trio.fail_after(20):
            while len(statuses) < 16:
                downloads = (await health(http, url))["pool"]["downloads"]
                seen.extend(downloads)
                await trio.sleep(0.05)
    assert statuses == [200] * 16
    assert hub.count("GET", r"^/api/models/test-org/tiny-GGUF") == 1
    assert hub.content_gets("tiny-Q4_K_M.gguf") == 1
    # /health showed the download with its progress while it ran; no server held a place meanwhile
    downloading = [d for d in seen if d["state"] == "downloading"]
    assert downloading, seen
    total = len(gguf(4, 24 * 1024 * 1024))
    assert all(d["bytes_total"] == total and d["files"] == ["tiny-Q4_K_M.gguf"] for d in downloading)
    assert any(0 < d["bytes_done"] < total for d in downloading)
    assert max(d["waiting"] for d in downloading) == 16
    assert (await health(http, url))["pool"]["downloads"] == []


async def test_a_client_leaving_does_not_cancel_the_download(hub, tmp_path, fake_binary, start_proxy, http) -> None:
    tiny_repo(hub, pad=2 * 1024 * 1024)
    hub.faults.slow["tiny-Q4_K_M.gguf"] = 0.5  # ~1 s
    url = await start_proxy(make(tmp_path, fake_binary, {"tiny": {"repo": REPO}}))
    results: dict[str, object] = {}

    async def impatient() -> None:
        try:
            await chat(http, url, "tiny", timeout=0.3)
        except httpx.TimeoutException as exc:
            results["impatient"] = exc

    async def patient() -> None:
        await trio.sleep(0.1)
        results["patient"] = (await chat(http, url, "tiny")).status_code

    async with trio.open_nursery() as nursery:
        nursery.start_soon(impatient)
        nursery.start_soon(patient)
    assert isinstance(results["impatient"], httpx.TimeoutException)
    assert results["patient"] == 200
    assert hub.content_gets("tiny-Q4_K_M.gguf") == 1


async def test_when_every_client_leaves_the_download_finishes(hub, tmp_path, fake_binary, start_proxy, http) -> None:
    tiny_repo(hub, pad=2 * 1024 * 1024)
    hub.faults.slow["tiny-Q4_K_M.gguf"] = 0.5
    url = await start_proxy(make(tmp_path, fake_binary, {"tiny": {"repo": REPO}}))
    with pytest.raises(httpx.TimeoutException):
        await chat(http, url, "tiny", timeout=0.3)
    with trio.fail_after(10):
        while True:
            downloads = (await health(http, url))["pool"]["downloads"]
            if not downloads:
                break
            assert downloads[0]["waiting"] == 0
            await trio.sleep(0.05)
    assert hub.repos[REPO].files["tiny-Q4_K_M.gguf"].sha256 in blobs(tmp_path)
    assert (await chat(http, url, "tiny")).status_code == 200
    assert hub.content_gets("tiny-Q4_K_M.gguf") == 1


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ({"repo": "test-org/no-such-GGUF"}, "Hugging Face repo 'test-org/no-such-GGUF' not found"),
        ({"repo": REPO, "quant": "Q2_K"}, "no Q2_K GGUF in Hugging Face repo 'test-org/tiny-GGUF'"),
        ({"repo": REPO, "file": "tiny-Q5_K_M.gguf"}, "no file 'tiny-Q5_K_M.gguf' in Hugging Face repo"),
    ],
)
async def test_missing_repo_or_file_is_404(hub, tmp_path, fake_binary, start_proxy, http, model, message) -> None:
    tiny_repo(hub)
    url = await start_proxy(make(tmp_path, fake_binary, {"m": model}))
    response = await chat(http, url, "m")
    assert response.status_code == 404
    assert message in response.json()["error"]["message"]
    assert response.json()["error"]["type"] == "model_not_found"
    assert (await health(http, url))["pool"]["servers"] == []


@pytest.mark.parametrize("where", ["api", "file"])
async def test_hub_500_is_502_then_a_retry_succeeds(hub, tmp_path, fake_binary, start_proxy, http, where) -> None:
    tiny_repo(hub)
    if where == "api":
        hub.faults.api_status = 500
    else:
        hub.faults.file_status["tiny-Q4_K_M.gguf"] = 500
    url = await start_proxy(make(tmp_path, fake_binary, {"tiny": {"repo": REPO}}))
    response = await chat(http, url, "tiny")
    assert response.status_code == 502
    assert "500" in response.json()["error"]["message"]
    assert response.json()["error"]["type"] == "upstream_error"
    assert blobs(tmp_path) == []
    assert (await health(http, url))["pool"]["models"] == []  # no llama-server was ever started
    hub.faults.clear()
    response = await chat(http, url, "tiny")
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == TOKENS["Q4_K_M"]


async def test_hub_dropping_mid_file_is_502_then_a_retry_succeeds(
    hub, tmp_path, fake_binary, start_proxy, http
) -> None:
    tiny_repo(hub, pad=1024 * 1024)
    hub.faults.drop_at["tiny-Q4_K_M.gguf"] = (300_000, 100)  # every attempt breaks off at 300 kB
    url = await start_proxy(make(tmp_path, fake_binary, {"tiny": {"repo": REPO}}))
    with trio.fail_after(30):  # huggingface_hub resumes 5 times, a second apart, before giving up
        response = await chat(http, url, "tiny")
    assert response.status_code == 502
    assert "tiny-Q4_K_M.gguf" in response.json()["error"]["message"]
    assert hub.content_gets("tiny-Q4_K_M.gguf") == 6  # huggingface_hub tried again 5 times
    assert blobs(tmp_path) == []  # no partial file left, let alone loaded
    assert (await health(http, url))["pool"]["models"] == []
    hub.faults.clear()
    response = await chat(http, url, "tiny")
    assert response.status_code == 200, response.text


async def test_one_dropped_connection_is_retried(hub, tmp_path, fake_binary, start_proxy, http) -> None:
    tiny_repo(hub, pad=1024 * 1024)
    hub.faults.drop_at["tiny-Q4_K_M.gguf"] = (300_000, 1)
    url = await start_proxy(make(tmp_path, fake_binary, {"tiny": {"repo": REPO}}))
    response = await chat(http, url, "tiny")
    assert response.status_code == 200, response.text
    assert hub.content_gets("tiny-Q4_K_M.gguf") == 2
    [cached] = (tmp_path / "hf" / "hub").glob("models--*/snapshots/*/tiny-Q4_K_M.gguf")
    assert cached.read_bytes() == gguf(TOKENS["Q4_K_M"], 1024 * 1024)


async def test_corrupt_file_is_removed_never_loaded_and_retried(hub, tmp_path, fake_binary, start_proxy, http) -> None:
    tiny_repo(hub)
    hub.faults.corrupt.add("tiny-Q4_K_M.gguf")
    url = await start_proxy(make(tmp_path, fake_binary, {"tiny": {"repo": REPO}}))
    response = await chat(http, url, "tiny")
    assert response.status_code == 502
    assert "came down corrupt (sha256" in response.json()["error"]["message"]
    assert blobs(tmp_path) == []
    assert (await health(http, url))["pool"]["models"] == []
    hub.faults.clear()
    response = await chat(http, url, "tiny")
    assert response.status_code == 200, response.text
    assert hub.content_gets("tiny-Q4_K_M.gguf") == 2


async def test_offline_with_a_warm_cache(hub, tmp_path, fake_binary, start_proxy, http, monkeypatch) -> None:
    tiny_repo(hub)
    config = make(tmp_path, fake_binary, {"tiny": {"repo": REPO, "quant": "Q8_0"}})
    url = await start_proxy(config)
    assert (await chat(http, url, "tiny")).status_code == 200
    hub.stop()  # the hub is gone: a new proxy falls back on the cache
    url = await start_proxy(config)
    response = await chat(http, url, "tiny")
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == TOKENS["Q8_0"]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # and with HF_HUB_OFFLINE it does not even ask
    url = await start_proxy(config)
    assert (await chat(http, url, "tiny")).status_code == 200


async def test_offline_with_a_cold_cache_is_404(hub, tmp_path, fake_binary, start_proxy, http, monkeypatch) -> None:
    tiny_repo(hub)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    url = await start_proxy(make(tmp_path, fake_binary, {"tiny": {"repo": REPO}}))
    response = await chat(http, url, "tiny")
    assert response.status_code == 404
    assert "not in the Hugging Face cache" in response.json()["error"]["message"]
    assert hub.requests == []


async def test_unreachable_hub_with_a_cold_cache_is_502(hub, tmp_path, fake_binary, start_proxy, http) -> None:
    tiny_repo(hub)
    hub.stop()
    url = await start_proxy(make(tmp_path, fake_binary, {"tiny": {"repo": REPO}}))
    response = await chat(http, url, "tiny")
    assert response.status_code == 502
    assert "test-org/tiny-GGUF" in response.json()["error"]["message"]


async def test_on_demand_hf_names(hub, tmp_path, fake_binary, start_proxy, http) -> None:
    tiny_repo(hub)
    catalog = {"allow_hf": "true", "allow_repos": "test-org/*, other/model-GGUF"}
    url = await start_proxy(make(tmp_path, fake_binary, {}, catalog=catalog))
    response = await chat(http, url, f"hf.co/{REPO}:Q8_0")
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == TOKENS["Q8_0"]
    assert response.json()["model"] == f"hf.co/{REPO}:Q8_0"
    response = await chat(http, url, f"huggingface.co/{REPO}:latest")  # Ollama's default tag: default quant
    assert response.json()["usage"]["completion_tokens"] == TOKENS["Q4_K_M"]
    response = await chat(http, url, "hf.co/elsewhere/model-GGUF:Q4_K_M")
    assert response.status_code == 403
    assert "not in [catalog] allow_repos" in response.json()["error"]["message"]
    assert hub.count("GET", "elsewhere") == 0


async def test_on_demand_hf_names_are_off_by_default(hub, tmp_path, fake_binary, start_proxy, http) -> None:
    tiny_repo(hub)
    url = await start_proxy(make(tmp_path, fake_binary, {}))
    response = await chat(http, url, f"hf.co/{REPO}:Q8_0")
    assert response.status_code == 403
    assert "allow_hf = true" in response.json()["error"]["message"]
    assert hub.requests == []


@pytest.mark.parametrize(
    "name",
    [
        "../../etc/passwd",
        "/etc/passwd",
        "~/.ssh/id_rsa",
        "models/../../../etc/shadow",
        "C:\\Windows\\win.ini",
        "tiny-Q4_K_M.gguf",
        "hf.co/../../etc/passwd",
        "hf.co/test-org/..:Q4_K_M",
        "hf.co/test-org/tiny-GGUF/../../x:Q4_K_M",
        "hf.co//etc/passwd",
        "hf.co/test-org/tiny-GGUF:../../x",
    ],
)
async def test_path_traversal_names_are_400(hub, tmp_path, fake_binary, start_proxy, http, name) -> None:
    tiny_repo(hub)
    url = await start_proxy(make(tmp_path, fake_binary, {}, catalog={"allow_hf": "true"}))
    response = await chat(http, url, name)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert hub.requests == []


async def test_downloads_service_shutdown_drops_the_transfer(hub, tmp_path) -> None:
    tiny_repo(hub, pad=40 * 1024 * 1024)
    hub.faults.slow["tiny-Q4_K_M.gguf"] = 0.1  # ~4 s for 40 MiB
    downloads = Downloads()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(downloads.run)
            nursery.start_soon(downloads.fetch, ModelConfig(name="tiny", repo=REPO))
            while True:  # until some bytes are down
                if any(d.bytes_done > 0 for d in downloads.snapshot()):
                    break
                await trio.sleep(0.02)
            nursery.cancel_scope.cancel()
    # the worker thread gave up at its next chunk (hanging up on the hub) and huggingface_hub
    # removed its temporary file
    [content] = [r for r in hub.requests if r.path.startswith("/cdn/")]
    with trio.fail_after(3):
        while True:  # the fake hub's thread notices the hang-up when it next writes
            if content.aborted:
                break
            await trio.sleep(0.02)
    assert content.sent < len(gguf(4, 40 * 1024 * 1024))
    assert blobs(tmp_path) == []


async def test_gguf_path_of_a_repo_model_looks_but_never_downloads(hub, tmp_path) -> None:
    tiny_repo(hub)
    model = ModelConfig(name="tiny", repo=REPO, quant="Q8_0")
    downloads = Downloads()
    catalog = Catalog({"tiny": model}, str(tmp_path), downloads=downloads)
    with pytest.raises(ModelNotFound, match="is not downloaded yet"):
        await catalog.gguf_path(model)
    assert hub.requests == []
    await trio.to_thread.run_sync(lambda: fetch(resolve(model, downloads.hub), downloads.hub))  # e.g. smart-proxy pull
    path = await catalog.gguf_path(model)
    assert path.endswith(f"/snapshots/{hub.repos[REPO].commit}/tiny-Q8_0.gguf")
    assert json.loads(await trio.Path(path).read_bytes())["tokens"] == TOKENS["Q8_0"]


# ---- the command line ----------------------------------------------------------------------


def run_cli(args: list[str], env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "smart_proxy", *args], capture_output=True, text=True, env=env, timeout=timeout
    )


def test_cli_pull_and_models(hub: FakeHub, tmp_path: Path) -> None:
    tiny_repo(hub, pad=512 * 1024)
    (tmp_path / "local.gguf").write_bytes(gguf(1))
    ini = tmp_path / "proxy.ini"
    ini.write_text(
        f"[model:tiny]\nrepo = {REPO}\nquant = Q4_K_M\n"
        f"[model:split]\nrepo = {REPO}\nquant = F16\nmmproj = mmproj-*\n"
        "[model:local]\npath = local.gguf\n"
    )
    env = environ_for(hub, tmp_path / "hf")
    before = run_cli(["models", "--config", str(ini), "--json"], env)
    assert before.returncode == 0, before.stderr
    rows = {row["name"]: row for row in json.loads(before.stdout)}
    assert rows["tiny"]["source"] == f"hf.co/{REPO} quant Q4_K_M"
    assert rows["tiny"]["size"] == len(gguf(4, 512 * 1024))
    assert rows["tiny"]["local"] is False
    assert rows["local"] == {
        "name": "local",
        "source": str(tmp_path / "local.gguf"),
        "size": len(gguf(1)),
        "local": True,
        "files": [str(tmp_path / "local.gguf")],
        "memory": read_estimate([str(tmp_path / "local.gguf")], []).total,
    }
    assert rows["tiny"]["memory"] is None  # not downloaded: nothing to read yet

    pulled = run_cli(["--config", str(ini), "pull", "tiny"], env)
    assert pulled.returncode == 0, pulled.stderr
    assert pulled.stdout.strip().endswith("/tiny-Q4_K_M.gguf")
    assert Path(pulled.stdout.strip()).is_file()
    assert "100%" in pulled.stderr  # the progress bar got to the end
    assert hub.content_gets("tiny-Q4_K_M.gguf") == 1

    after = run_cli(["models", "--config", str(ini), "--json"], env)
    rows = {row["name"]: row for row in json.loads(after.stdout)}
    assert rows["tiny"]["local"] is True and rows["split"]["local"] is False
    assert rows["tiny"]["memory"] == read_estimate([pulled.stdout.strip()], []).total
    table = run_cli(["models", "--config", str(ini)], env)
    assert table.returncode == 0
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["NAME", "SOURCE", "SIZE", "MEMORY", "LOCAL"]
    assert any(line.split()[0] == "tiny" and line.split()[-1] == "yes" for line in lines[1:])

    missing = run_cli(["pull", "nope", "--config", str(ini)], env)
    assert missing.returncode == 1
    assert missing.stderr.strip() == "smart-proxy: pull nope: model 'nope' not found; known models: tiny, split, local"

    hub.faults.api_status = 500
    failing = run_cli(["pull", "split", "--config", str(ini)], env)
    assert failing.returncode == 1
    assert failing.stderr.strip().startswith("smart-proxy: pull split: the Hugging Face hub answered 500")
    assert "Traceback" not in failing.stderr
