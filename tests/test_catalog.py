"""The catalog: names from proxy.ini, on-demand hf.co names, and names that must never become paths."""

from __future__ import annotations

from pathlib import Path

import pytest

from smart_proxy.catalog import Catalog, parse_hf_name
from smart_proxy.config import CatalogConfig, ModelConfig, structure
from smart_proxy.errors import BadRequest, ModelNotAllowed, ModelNotFound


@pytest.fixture
def catalog(tmp_path: Path) -> Catalog:
    (tmp_path / "a.gguf").write_bytes(b"GGUF")
    (tmp_path / "proj.gguf").write_bytes(b"GGUF")
    config = structure(
        {
            "model:a": {"path": "a.gguf", "mmproj": "proj.gguf"},
            "model:hf": {"repo": "ggml-org/gemma-3-270m-GGUF", "quant": "Q8_0"},
            "catalog": {"allow_hf": "true", "allow_repos": "ggml-org/*, Unsloth/Qwen3-*-GGUF"},
        },
        base_dir=str(tmp_path),
    )
    return Catalog(config.models, config.base_dir, config.catalog)


def test_names_from_proxy_ini(catalog: Catalog) -> None:
    assert catalog.get("a").path == "a.gguf"
    assert catalog.get("a:latest").name == "a"
    assert catalog.get("hf").repo == "ggml-org/gemma-3-270m-GGUF"
    with pytest.raises(ModelNotFound, match="model 'b' not found; known models: a, hf"):
        catalog.get("b")
    with pytest.raises(ModelNotFound):
        catalog.get(None)


@pytest.mark.parametrize(
    ("name", "repo", "quant"),
    [
        ("hf.co/ggml-org/gemma-3-270m-GGUF:Q4_K_M", "ggml-org/gemma-3-270m-GGUF", "Q4_K_M"),
        ("huggingface.co/ggml-org/gemma-3-270m-GGUF", "ggml-org/gemma-3-270m-GGUF", None),
        ("HF.CO/ggml-org/gemma-3-270m-GGUF:latest", "ggml-org/gemma-3-270m-GGUF", None),
        ("hf.co/unsloth/Qwen3-0.6B-GGUF:UD-Q4_K_XL", "unsloth/Qwen3-0.6B-GGUF", "UD-Q4_K_XL"),
    ],
)
def test_parse_hf_name(name: str, repo: str, quant: str | None) -> None:
    assert parse_hf_name(name) == (repo, quant)


@pytest.mark.parametrize(
    "name",
    [
        "hf.co/../../etc/passwd",
        "hf.co/org/..",
        "hf.co/org/repo/extra",
        "hf.co/org",
        "hf.co//etc/passwd",
        "hf.co/org/.hidden",
        "hf.co/org/repo-:Q4",
        "hf.co/org/repo:Q4/../../x",
        "hf.co/org/re po:Q4",
    ],
)
def test_malformed_hf_names_are_400(catalog: Catalog, name: str) -> None:
    with pytest.raises(BadRequest):
        catalog.get(name)


def test_on_demand_names_resolve_within_allow_repos(catalog: Catalog) -> None:
    model = catalog.get("huggingface.co/ggml-org/gemma-3-270m-GGUF:q8_0")
    assert model == ModelConfig(
        name="hf.co/ggml-org/gemma-3-270m-GGUF:q8_0", repo="ggml-org/gemma-3-270m-GGUF", quant="q8_0"
    )
    assert catalog.get("hf.co/unsloth/qwen3-0.6b-GGUF").repo == "unsloth/qwen3-0.6b-GGUF"  # patterns ignore case
    with pytest.raises(ModelNotAllowed, match="repo someone/model-GGUF is not in \\[catalog\\] allow_repos"):
        catalog.get("hf.co/someone/model-GGUF:Q4_K_M")
    off = Catalog({}, ".", CatalogConfig())
    with pytest.raises(ModelNotAllowed, match="set \\[catalog\\] allow_hf = true") as info:
        off.get("hf.co/ggml-org/gemma-3-270m-GGUF")
    assert info.value.status == 403


@pytest.mark.parametrize(
    "name",
    ["../a", "/etc/passwd", "~/.ssh/id_rsa", "./a.gguf", "a.gguf", "x/../../a", "C:\\a", "..\\..\\a", "a\0b"],
)
def test_names_that_look_like_paths_are_400(catalog: Catalog, name: str) -> None:
    with pytest.raises(BadRequest, match="not a file path"):
        catalog.get(name)


async def test_local_files_of_a_local_model(catalog: Catalog, tmp_path: Path) -> None:
    model = catalog.get("a")
    await catalog.download(model)  # nothing to download: returns without a Downloads service
    files = await catalog.local_files(model)
    assert files.model == str(tmp_path / "a.gguf")
    assert files.args() == ("--mmproj", str(tmp_path / "proj.gguf"))
    assert await catalog.gguf_path(model) == str(tmp_path / "a.gguf")
    assert catalog.downloading() == ()


async def test_a_repo_model_needs_the_downloads_service(catalog: Catalog) -> None:
    with pytest.raises(RuntimeError, match="no Downloads service"):
        await catalog.download(catalog.get("hf"))
