"""smart_proxy/memory.py: a llama-server's memory estimate, from tiny GGUFs written by the ``gguf`` package.

The KV cache's sizes restate llama.cpp's rules (``src/llama-context.cpp``, ``src/llama-kv-cache*.cpp``)
case by case; tests/e2e/test_scheduler_real.py checks them against the real llama-server's own figures.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from smart_proxy.memory import (
    BASE_BYTES,
    COMPUTE_FLOOR,
    ServerArgs,
    compute_bytes,
    declared_estimate,
    estimate,
    format_size,
    kv_cache_bytes,
    parse_meminfo,
    parse_server_args,
    read_estimate,
)
from smart_proxy.modelinfo import read_model_info

from .test_modelinfo import TENSORS, write_gguf

F16 = 2


def _llama(tmp_path: Path, name: str = "m.gguf", **keys: object):
    """A llama-architecture GGUF: 4 layers, 8 heads of which 2 for K/V, width 512, trained on 2048."""
    base = {
        "llama.block_count": 4,
        "llama.attention.head_count": 8,
        "llama.attention.head_count_kv": 2,
        "llama.embedding_length": 512,
        "llama.feed_forward_length": 1024,
        "llama.context_length": 2048,
    }
    return read_model_info(str(write_gguf(tmp_path / name, arch="llama", **{**base, **keys})))


def _gemma(tmp_path: Path, **keys: object):
    """A gemma3 GGUF: 6 layers (5 sliding-window, 1 full), 1 K/V head of 256, a 128-token window."""
    base = {
        "gemma3.block_count": 6,
        "gemma3.attention.head_count": 4,
        "gemma3.attention.head_count_kv": 1,
        "gemma3.attention.key_length": 256,
        "gemma3.attention.value_length": 256,
        "gemma3.embedding_length": 640,
        "gemma3.feed_forward_length": 2048,
        "gemma3.context_length": 32768,
        "gemma3.attention.sliding_window": 128,
    }
    return read_model_info(str(write_gguf(tmp_path / "g.gguf", arch="gemma3", **{**base, **keys})))


@pytest.mark.parametrize(
    ("args", "parsed"),
    [
        ([], ServerArgs()),
        (["-c", "8192", "-np", "2"], ServerArgs(ctx_size=8192, parallel=2)),
        (["--ctx-size=4096", "--parallel=3", "--kv-unified"], ServerArgs(ctx_size=4096, parallel=3, kv_unified=True)),
        (
            ["-ctk", "Q8_0", "--cache-type-v", "q4_0", "--swa-full"],
            ServerArgs(cache_type_k="q8_0", cache_type_v="q4_0", swa_full=True),
        ),
        (
            ["-c", "1", "-c", "2", "-ub", "256", "-b", "128", "--embeddings"],
            ServerArgs(ctx_size=2, ubatch=256, batch=128, embeddings=True),
        ),
        (["--jinja", "-ngl", "99", "-c", "x", "--mmproj", "p.gguf", "-c"], ServerArgs(mmproj="p.gguf")),
        (["--reranking", "-fa", "OFF"], ServerArgs(embeddings=True, flash_attn="off")),
    ],
)
def test_parse_server_args(args: list[str], parsed: ServerArgs) -> None:
    assert parse_server_args(args) == parsed


def test_slots_and_unified_follow_llama_servers_defaults() -> None:
    assert (ServerArgs().slots, ServerArgs().unified) == (4, True)  # --parallel auto: 4 slots, one cache
    assert (ServerArgs(parallel=2).slots, ServerArgs(parallel=2).unified) == (2, False)
    assert ServerArgs(parallel=2, kv_unified=True).unified is True


def test_kv_cache_of_a_plain_model(tmp_path: Path) -> None:
    info = _llama(tmp_path)
    per_cell_layer = 2 * 64 * F16 * 2  # K and V: 2 heads of 512/8 = 64
    assert kv_cache_bytes(info, ServerArgs(ctx_size=1000)) == (4 * 1024 * per_cell_layer, 1024)  # padded to 256
    # no -c: the trained context
    assert kv_cache_bytes(info, ServerArgs()) == (4 * 2048 * per_cell_layer, 2048)
    # -np 3 without a unified cache: 3 streams of 1024/3 cells, each padded to 256
    assert kv_cache_bytes(info, ServerArgs(ctx_size=1024, parallel=3)) == (4 * 3 * 512 * per_cell_layer, 1536)
    # --kv-unified-per-slot without -c: slots x that
    assert kv_cache_bytes(info, ServerArgs(per_slot=512))[1] == 4 * 512


def test_kv_cache_types(tmp_path: Path) -> None:
    info = _llama(tmp_path)
    f16, _ = kv_cache_bytes(info, ServerArgs(ctx_size=1024))
    q8, _ = kv_cache_bytes(info, ServerArgs(ctx_size=1024, cache_type_k="q8_0", cache_type_v="q8_0"))
    mixed, _ = kv_cache_bytes(info, ServerArgs(ctx_size=1024, cache_type_k="q8_0"))
    assert q8 == f16 * 34 // 64  # a q8_0 block: 32 values in 34 bytes
    assert mixed == (f16 + q8) // 2


def test_kv_cache_head_sizes_from_the_header(tmp_path: Path) -> None:
    explicit = _llama(tmp_path, "k.gguf", **{"llama.attention.key_length": 128, "llama.attention.value_length": 32})
    assert kv_cache_bytes(explicit, ServerArgs(ctx_size=256))[0] == 4 * 256 * 2 * (128 + 32) * F16


def test_kv_cache_with_a_sliding_window(tmp_path: Path) -> None:
    info = _gemma(tmp_path)
    per_cell_layer = 256 * F16 * 2
    # auto slots (4, unified): window x 4 + ubatch 512 = 1024 cells for the 5 sliding-window layers
    assert kv_cache_bytes(info, ServerArgs(ctx_size=8192))[0] == per_cell_layer * (1 * 8192 + 5 * 1024)
    assert kv_cache_bytes(info, ServerArgs(ctx_size=8192, swa_full=True))[0] == per_cell_layer * 6 * 8192
    # a context smaller than the window's cells: every layer holds the context
    assert kv_cache_bytes(info, ServerArgs(ctx_size=512))[0] == per_cell_layer * 6 * 512
    # -np 2 (not unified): per stream min(4096, 128 + 512) -> 768 cells, two streams
    assert kv_cache_bytes(info, ServerArgs(ctx_size=8192, parallel=2))[0] == per_cell_layer * (8192 + 5 * 2 * 768)
    # the GGUF's own pattern wins over the architecture's: every 2nd layer full -> 3 and 3
    two = _gemma(tmp_path, **{"gemma3.attention.sliding_window_pattern": 2})
    assert kv_cache_bytes(two, ServerArgs(ctx_size=8192))[0] == per_cell_layer * (3 * 8192 + 3 * 1024)


def test_a_window_on_an_architecture_without_a_known_pattern_counts_every_layer_full(tmp_path: Path) -> None:
    info = _llama(tmp_path, **{"llama.attention.sliding_window": 128})
    plain = _llama(tmp_path, "p.gguf")
    assert kv_cache_bytes(info, ServerArgs(ctx_size=4096)) == kv_cache_bytes(plain, ServerArgs(ctx_size=4096))


def test_estimate_sums_its_parts(tmp_path: Path) -> None:
    info = _llama(tmp_path)
    est = estimate(info, ["-c", "1024"], projector=1000)
    assert est.weights == info.tensor_bytes > 0
    assert est.kv_cache == kv_cache_bytes(info, ServerArgs(ctx_size=1024))[0]
    assert est.compute == compute_bytes(info, ServerArgs(ctx_size=1024)) >= COMPUTE_FLOOR
    assert (est.projector, est.base, est.context, est.slots) == (1000, BASE_BYTES, 1024, 4)
    assert est.total == est.weights + est.kv_cache + est.compute + est.projector + est.base
    assert est.as_dict()["total"] == est.total and est.as_dict()["declared"] is False
    assert est.layers == est.as_dict()["layers"] == 4  # block_count: what --n-gpu-layers counts
    assert est.offloadable == est.total - BASE_BYTES  # on a GPU: all but llama-server's own base
    assert est.describe().startswith(format_size(est.total)) and "at 1024 ctx" in est.describe()


def test_a_longer_context_costs_its_kv_cells_and_their_attention_masks(tmp_path: Path) -> None:
    info = _llama(tmp_path)
    short, long = estimate(info, ["-c", "1024"]), estimate(info, ["-c", "2048"])
    assert long.kv_cache == 2 * short.kv_cache
    assert long.compute - short.compute == 2 * 512 * 1024  # an f16 mask row per ubatch token per added cell
    assert long.total - short.total == short.kv_cache + 2 * 512 * 1024


def test_compute_buffers(tmp_path: Path) -> None:
    info = _gemma(tmp_path)
    auto = compute_bytes(info, ServerArgs(ctx_size=8192))
    # without flash attention: f32 masks and the scores of 4 heads over the 8192 cells
    no_fa = compute_bytes(info, ServerArgs(ctx_size=8192, flash_attn="off"))
    assert no_fa - auto == 2 * 512 * (8192 + 1024) + 4 * 4 * 8192 * 512
    # --swa-full: the sliding-window cache's mask covers the whole context too
    full = compute_bytes(info, ServerArgs(ctx_size=8192, swa_full=True))
    assert full - auto == 2 * 512 * (8192 - 1024)
    # a smaller ubatch: smaller masks and activations
    assert compute_bytes(info, ServerArgs(ctx_size=8192, ubatch=128)) < auto
    # one output row per slot: 100 tokens of f32 logits each (the tiny files' vocabulary)
    assert compute_bytes(info, ServerArgs(ctx_size=8192, parallel=1)) < auto
    assert compute_bytes(info, ServerArgs(ctx_size=8192, embeddings=True)) - auto == 4 * 100 * (512 - 4)


def test_read_estimate_sums_split_parts_and_sizes_the_projector(tmp_path: Path) -> None:
    first = _llama(tmp_path, "m-00001-of-00002.gguf")
    second = write_gguf(tmp_path / "m-00002-of-00002.gguf", tensors=TENSORS[:3])
    projector = tmp_path / "mmproj.gguf"
    projector.write_bytes(b"\0" * 4096)
    est = read_estimate([first.path, str(second)], ["-c", "512"], str(projector))
    assert est.weights == first.tensor_bytes + read_model_info(str(second)).tensor_bytes
    assert est.projector == 4096
    assert read_estimate([first.path], ["--mmproj", str(projector)]).projector == 4096
    with pytest.raises(OSError):
        read_estimate([str(tmp_path / "missing.gguf")], [])


def test_a_file_that_is_not_gguf_is_its_size_and_the_base(tmp_path: Path) -> None:
    path = tmp_path / "x.bin"
    path.write_bytes(b"x" * 5000)
    est = read_estimate([str(path)], ["-c", "4096"])
    assert (est.weights, est.kv_cache, est.base) == (5000, 0, BASE_BYTES)


GIB = 1024**3


def test_a_declared_size_is_the_total() -> None:
    est = declared_estimate(3 * 1024**3)
    assert est.total == 3 * 1024**3 and est.describe() == "3.0 GiB (declared)"
    assert est.as_dict() == {"total": 3 * 1024**3, "declared": True}
    assert (est.offloadable, est.layers) == (3 * 1024**3, 0)  # taken whole onto a GPU
    assert declared_estimate(GIB, 80).layers == 80


def test_parse_meminfo() -> None:
    text = "MemTotal:       24000000 kB\nMemFree:         1000 kB\nMemAvailable:   20000000 kB\n"
    assert parse_meminfo(text) == 20000000 * 1024
    assert parse_meminfo("MemTotal: 5 kB\n") is None


@pytest.mark.parametrize(
    ("size", "text"), [(0, "0 B"), (1023, "1023 B"), (1536, "1.5 KiB"), (5 * 1024**3, "5.0 GiB"), (2 * 1024**4, "2.0 TiB")]
)
def test_format_size(size: int, text: str) -> None:
    assert format_size(size) == text
