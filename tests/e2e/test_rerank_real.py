"""Reranking end to end: the proxy as a process and the real llama-server started with ``--reranking``
on a tiny random-weight BERT reranker (a GGUF written here with PyPI's ``gguf``: two layers, a
classification head, a WordPiece vocabulary of letters). Its scores mean nothing; what is proven
is the path: the flag, the four routes, llama-server's answer shape relayed, and the 400 for a
model that is not a reranker."""

from __future__ import annotations

import string
from pathlib import Path

import httpx
import numpy as np
import pytest

from ..conftest import ProxyProcess

pytestmark = pytest.mark.real

PATHS = ["/v1/rerank", "/rerank", "/v1/reranking", "/reranking"]


def write_tiny_reranker(path: Path, seed: int = 0) -> None:
    """A BERT cross-encoder GGUF with random weights, as llama.cpp loads one (src/models/bert.cpp)."""
    import gguf

    n_embd, n_ff, n_layer, n_ctx, n_head = 32, 64, 2, 128, 2
    specials = {0: "[PAD]", 100: "[UNK]", 101: "[CLS]", 102: "[SEP]", 103: "[MASK]"}
    tokens = [specials.get(i, f"[unused{i}]") for i in range(104)]
    tokens += list(string.ascii_lowercase) + [f"##{c}" for c in string.ascii_lowercase] + list(".,?!")
    types = [gguf.TokenType.CONTROL if t.startswith("[") else gguf.TokenType.NORMAL for t in tokens]
    types[100] = gguf.TokenType.UNKNOWN
    rng = np.random.default_rng(seed)

    def weights(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.2).astype(np.float32)

    writer = gguf.GGUFWriter(str(path), "bert")
    writer.add_name("tiny-random-reranker")
    writer.add_context_length(n_ctx)
    writer.add_embedding_length(n_embd)
    writer.add_feed_forward_length(n_ff)
    writer.add_block_count(n_layer)
    writer.add_head_count(n_head)
    writer.add_layer_norm_eps(1e-12)
    writer.add_causal_attention(False)
    writer.add_pooling_type(gguf.PoolingType.RANK)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("bert")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_type_count(2)
    writer.add_bos_token_id(101)
    writer.add_sep_token_id(102)
    writer.add_pad_token_id(0)
    writer.add_unk_token_id(100)
    writer.add_mask_token_id(103)
    ones, zeros = np.ones(n_embd, np.float32), np.zeros(n_embd, np.float32)
    writer.add_tensor("token_embd.weight", weights(len(tokens), n_embd))
    writer.add_tensor("token_types.weight", weights(2, n_embd))
    writer.add_tensor("position_embd.weight", weights(n_ctx, n_embd))
    writer.add_tensor("token_embd_norm.weight", ones)
    writer.add_tensor("token_embd_norm.bias", zeros)
    for i in range(n_layer):
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            writer.add_tensor(f"blk.{i}.{name}.weight", weights(n_embd, n_embd))
            writer.add_tensor(f"blk.{i}.{name}.bias", weights(n_embd))
        writer.add_tensor(f"blk.{i}.attn_output_norm.weight", ones)
        writer.add_tensor(f"blk.{i}.attn_output_norm.bias", zeros)
        writer.add_tensor(f"blk.{i}.ffn_up.weight", weights(n_ff, n_embd))
        writer.add_tensor(f"blk.{i}.ffn_up.bias", weights(n_ff))
        writer.add_tensor(f"blk.{i}.ffn_down.weight", weights(n_embd, n_ff))
        writer.add_tensor(f"blk.{i}.ffn_down.bias", weights(n_embd))
        writer.add_tensor(f"blk.{i}.layer_output_norm.weight", ones)
        writer.add_tensor(f"blk.{i}.layer_output_norm.bias", zeros)
    writer.add_tensor("cls.weight", weights(n_embd, n_embd))
    writer.add_tensor("cls.bias", weights(n_embd))
    writer.add_tensor("cls.output.weight", weights(1, n_embd))
    writer.add_tensor("cls.output.bias", weights(1))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def proxy(tmp_path_factory, llama_server_binary: str):
    tmp = tmp_path_factory.mktemp("rerank-real")
    reranker = tmp / "tiny-reranker.gguf"
    write_tiny_reranker(reranker)
    ini = tmp / "proxy.ini"
    ini.write_text(
        f"""
[pool]
size = 2
llama_server = {llama_server_binary}
load_timeout = 120s
[model:rr]
path = {reranker}
rerank = true
args = --ctx-size 128
[model:plain]
path = {reranker}
"""
    )
    proxy = ProxyProcess(ini, tmp / "proxy.log")
    yield proxy
    proxy.stop()


def test_rerank_on_every_path(proxy: ProxyProcess) -> None:
    documents = ["a cat sat on a mat", "dogs bark", "the sky is blue", "cats"]
    answers = []
    for path in PATHS:
        response = httpx.post(proxy.url + path, json={"model": "rr", "query": "cat", "documents": documents, "top_n": 3},
                              timeout=120)  # fmt: skip
        assert response.status_code == 200, response.text
        answers.append(response.json())
    assert all(answer == answers[0] for answer in answers)  # random weights, but deterministic ones
    answer = answers[0]
    assert answer["model"] == "rr" and answer["object"] == "list" and answer["usage"]["prompt_tokens"] > 0
    results = answer["results"]
    assert len(results) == 3 and len({r["index"] for r in results}) == 3 and all(0 <= r["index"] < 4 for r in results)
    scores = [r["relevance_score"] for r in results]
    assert scores == sorted(scores, reverse=True) and all(isinstance(s, float) for s in scores)

    tei = httpx.post(proxy.url + "/rerank", json={"model": "rr", "query": "cat", "texts": documents}, timeout=120)
    assert tei.status_code == 200 and sorted(r["index"] for r in tei.json()) == [0, 1, 2, 3] and "score" in tei.json()[0]


def test_rerank_errors(proxy: ProxyProcess) -> None:
    refused = httpx.post(proxy.url + "/v1/rerank", json={"model": "plain", "query": "q", "documents": ["d"]}, timeout=120)
    assert refused.status_code == 400 and "rerank = true" in refused.json()["error"]["message"]
    empty = httpx.post(proxy.url + "/v1/rerank", json={"model": "rr", "query": "q", "documents": []}, timeout=120)
    assert empty.status_code == 400 and "documents" in empty.json()["error"]["message"]  # llama-server's own check
