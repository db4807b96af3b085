"""Reranking: ``rerank = true`` models started with ``--reranking``, and the four rerank routes relayed
through the in-process proxy to the fake llama-server, which answers them as llama-server does
(Jina's shape, TEI's for ``texts``) only when started with that flag."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from smart_proxy.config import ConfigError, structure

from .test_ollama import backend_requests, upstream_config

PATHS = ["/v1/rerank", "/rerank", "/v1/reranking", "/reranking"]
QUERY = {
    "query": "the cat sat",
    "documents": ["a dog ran", "the cat sat on the mat", "cat", "nothing here at all"],
    "top_n": 3,
}


@pytest.fixture
async def url(make_config, start_proxy) -> str:
    return await start_proxy(make_config({"rr": {}, "chat": {}}, model_options={"rr": {"rerank": "true"}}))


async def test_rerank_relays_llama_servers_answer(url: str, http: httpx.AsyncClient) -> None:
    answers = []
    for path in PATHS:
        response = await http.post(url + path, json={"model": "rr", **QUERY})
        assert response.status_code == 200, response.text
        answers.append(response.json())
    assert all(answer == answers[0] for answer in answers)  # the same on every path llama-server serves
    answer = answers[0]
    assert answer["model"] == "rr" and answer["object"] == "list" and answer["usage"]["prompt_tokens"] > 0
    assert [r["index"] for r in answer["results"]] == [2, 1, 0]  # most relevant first, top_n of them
    scores = [r["relevance_score"] for r in answer["results"]]
    assert scores == sorted(scores, reverse=True) and scores[0] == 1.0
    sent = await backend_requests(http, url, "rr")
    assert [r["path"] for r in sent] == PATHS and all(r["body"] == {"model": "rr", **QUERY} for r in sent)

    tei = await http.post(url + "/rerank", json={"model": "rr", "query": "the cat", "texts": ["cat", "dog"]})
    assert tei.status_code == 200 and [r["index"] for r in tei.json()] == [0, 1] and "score" in tei.json()[0]


async def test_rerank_body_byte_for_byte(url: str, http: httpx.AsyncClient) -> None:
    raw = b'{"documents":["b a"] , "model":"rr",\n "query":"a", "extra": {"kept": [1, 2.50]}}'
    response = await http.post(url + "/v1/rerank", content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 200 and response.json()["results"] == [{"index": 0, "relevance_score": 0.5}]
    (sent,) = await backend_requests(http, url, "rr")
    assert sent["body"] == json.loads(raw)


async def test_rerank_errors(url: str, http: httpx.AsyncClient) -> None:
    cases = [
        ({"model": "chat", **QUERY}, 400, "set rerank = true in its [model:chat] section"),
        ({"model": "nope", **QUERY}, 404, "nope"),
        ({"query": "x", "documents": ["a"]}, 400, "missing 'model'"),
        ({"model": "rr", "documents": ["a"]}, 400, "missing 'query'"),
        ({"model": "rr", "query": "x", "documents": []}, 400, "non-empty string array"),  # llama-server's, relayed
        ({"model": "rr", "query": 5, "documents": ["a"]}, 400, "must be a string"),
    ]
    for body, status, text in cases:
        response = await http.post(url + "/v1/rerank", json=body)
        error = response.json()["error"]
        assert response.status_code == status and text in error["message"] and error["code"] == status, body
    response = await http.post(url + "/rerank", content=b"{nope")
    assert response.status_code == 400 and "not valid JSON" in response.json()["error"]["message"]


async def test_the_fake_refuses_reranking_without_the_flag(url: str, http: httpx.AsyncClient) -> None:
    """As llama-server does: so the answers above prove the pool passed --reranking."""
    assert (await http.post(url + "/v1/chat/completions", json={"model": "chat", "messages": []})).status_code == 200
    servers = (await http.get(f"{url}/health")).json()["pool"]["servers"]
    (port,) = [s["port"] for s in servers if s["model"] == "chat"]
    response = await http.post(f"http://127.0.0.1:{port}/v1/rerank", json={"model": "chat", **QUERY})
    assert response.status_code == 501 and "--reranking" in response.json()["error"]["message"]


async def test_ollama_models_do_not_rerank(tmp_path: Path, fake_binary: str, start_proxy, fake_ollama, http) -> None:
    url = await start_proxy(upstream_config(tmp_path, fake_binary, fake_ollama.url))
    response = await http.post(url + "/v1/rerank", json={"model": "up", **QUERY})
    assert response.status_code == 400 and "Ollama upstream" in response.json()["error"]["message"]


def test_rerank_config(tmp_path: Path) -> None:
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    config = structure({"model:r": {"path": str(model), "rerank": "true"}}, base_dir=str(tmp_path))
    assert config.models["r"].rerank is True
    with pytest.raises(ConfigError, match=r"\[model:r\] rerank: give rerank or embeddings, not both"):
        structure({"model:r": {"path": str(model), "rerank": "true", "embeddings": "true"}}, base_dir=str(tmp_path))
    with pytest.raises(ConfigError, match=r"\[model:o\] rerank: only for backend = llama"):
        structure({"model:o": {"backend": "ollama", "url": "http://h:1", "rerank": "true"}}, base_dir=str(tmp_path))
