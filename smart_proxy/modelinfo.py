"""What a GGUF file says about its model: architecture, size, quantization, chat template, tensor bytes.

Ollama's ``/api/tags``, ``/api/show`` and ``/api/ps`` describe models with a
``details`` object and a ``model_info`` map taken from the GGUF header, and the
pool's memory estimate (:mod:`smart_proxy.memory`) needs the size of the weights.
This module reads the header and nothing else: the key-value section at the
start of the file, skipping array contents (the tokenizer's vocabulary) without
decoding them, then the tensor-info section, so what it reads depends on the
header, not on the model's size.

GGUF layout (little-endian): ``b"GGUF"``, version (u32), tensor count (u64),
key-value count (u64), then per pair a string key, a u32 value type and the
value; strings are a u64 length and UTF-8 bytes; an array is an item type
(u32), a count (u64) and the items. Version 1 used u32 counts; it is not read.
Then per tensor: its name (string), the number of dimensions (u32), each
dimension (u64), its ggml type (u32) and its offset in the data section (u64).
A tensor's bytes are its element count over the type's block size, times the
block's bytes (:data:`GGML_BLOCKS`, ggml's type traits).

Reading is blocking file I/O: call :func:`read_model_info` through
``trio.to_thread.run_sync``. Results are cached per (path, size, mtime).
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import struct
from datetime import UTC, datetime
from typing import BinaryIO

import attrs

__all__ = ["GGML_BLOCKS", "ModelInfo", "read_model_info"]

_SCALARS: dict[int, struct.Struct] = {
    0: struct.Struct("<B"),
    1: struct.Struct("<b"),
    2: struct.Struct("<H"),
    3: struct.Struct("<h"),
    4: struct.Struct("<I"),
    5: struct.Struct("<i"),
    6: struct.Struct("<f"),
    7: struct.Struct("<?"),
    10: struct.Struct("<Q"),
    11: struct.Struct("<q"),
    12: struct.Struct("<d"),
}
_STRING, _ARRAY = 8, 9
_U32, _U64 = struct.Struct("<I"), struct.Struct("<Q")
#: No header is this big; a file claiming more is not GGUF.
_MAX_KEYS = 100_000
_MAX_TENSORS = 1_000_000
_MAX_DIMS = 8

#: ggml types as (elements per block, bytes per block): ggml's type traits (``ggml.c``).
GGML_BLOCKS: dict[int, tuple[int, int]] = {
    0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34), 9: (32, 40),
    10: (256, 84), 11: (256, 110), 12: (256, 144), 13: (256, 176), 14: (256, 210), 15: (256, 292),
    16: (256, 66), 17: (256, 74), 18: (256, 98), 19: (256, 50), 20: (32, 18), 21: (256, 110),
    22: (256, 82), 23: (256, 136), 24: (1, 1), 25: (1, 2), 26: (1, 4), 27: (1, 8), 28: (1, 8),
    29: (256, 56), 30: (1, 2), 34: (256, 54), 35: (256, 66), 39: (32, 17), 40: (64, 36), 41: (128, 18),
}  # fmt: skip
#: The names llama.cpp's ``--cache-type-k/-v`` take, as ggml type ids.
GGML_TYPE_NAMES = {
    "f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0": 8, "iq4_nl": 20, "bf16": 30,
}  # fmt: skip

#: llama.cpp's ``general.file_type`` (enum llama_ftype) as Ollama names quantization levels.
FILE_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K",
    11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S",
    17: "Q5_K_M", 18: "Q6_K", 19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS",
    23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL", 26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S",
    29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16", 36: "TQ1_0", 37: "TQ2_0", 38: "MXFP4",
}  # fmt: skip


@attrs.frozen
class ModelInfo:
    """A model file as Ollama's API describes one."""

    path: str
    size: int
    modified_at: str
    #: Stable for an unchanged file (path, size, mtime); not a hash of the content.
    digest: str
    #: Scalar metadata from the GGUF header; arrays appear empty, as in Ollama's non-verbose show.
    metadata: dict[str, object] = attrs.field(factory=dict)
    is_gguf: bool = False
    #: The tensors' bytes, from the tensor-info section; None if it could not be read
    #: (not GGUF, cut short, a ggml type this module does not know).
    tensor_bytes: int | None = None
    tensor_count: int = 0
    #: How many items each array in the header holds (``tokenizer.ggml.tokens``: the vocabulary's size).
    array_lengths: dict[str, int] = attrs.field(factory=dict)

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    @property
    def chat_template(self) -> str:
        return str(self.metadata.get("tokenizer.chat_template", ""))

    @property
    def context_length(self) -> int | None:
        value = self.metadata.get(f"{self.architecture}.context_length")
        return value if isinstance(value, int) else None

    def details(self) -> dict[str, object]:
        """Ollama's ``details`` object."""
        family = self.architecture
        return {
            "parent_model": "",
            "format": "gguf",
            "family": family,
            "families": [family] if family else None,
            "parameter_size": self._parameter_size(),
            "quantization_level": FILE_TYPES.get(self.metadata.get("general.file_type"), ""),  # type: ignore[arg-type]
        }

    def _parameter_size(self) -> str:
        label = self.metadata.get("general.size_label")
        if isinstance(label, str) and label:
            return label
        count = self.metadata.get("general.parameter_count")
        if not isinstance(count, int) or count <= 0:
            return ""
        for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
            if count >= scale:
                return f"{count / scale:.2f}{unit}"
        return str(count)


def read_model_info(path: str) -> ModelInfo:
    """Describe the model file at ``path`` (blocking; cached while the file is unchanged).

    A file that is not GGUF (or is cut short) gives a ModelInfo with ``is_gguf = False``
    and no metadata; a missing file raises OSError.
    """
    stat = os.stat(path)
    return _read_cached(os.path.abspath(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _read_cached(path: str, size: int, mtime_ns: int) -> ModelInfo:
    modified = datetime.fromtimestamp(mtime_ns / 1e9, UTC).isoformat().replace("+00:00", "Z")
    digest = hashlib.sha256(f"{path}\0{size}\0{mtime_ns}".encode()).hexdigest()
    metadata: dict[str, object] = {}
    is_gguf = False
    tensor_bytes: int | None = None
    tensors = 0
    lengths: dict[str, int] = {}
    with open(path, "rb") as file:
        try:
            tensors, metadata = _read_header(file, lengths)
            is_gguf = True
        except (ValueError, struct.error, UnicodeDecodeError, MemoryError):
            metadata = {}
        if is_gguf:
            try:
                tensor_bytes = _read_tensor_bytes(file, tensors)
            except (ValueError, struct.error, UnicodeDecodeError, MemoryError):
                tensor_bytes = None
    return ModelInfo(
        path=path,
        size=size,
        modified_at=modified,
        digest=digest,
        metadata=metadata,
        is_gguf=is_gguf,
        tensor_bytes=tensor_bytes,
        tensor_count=tensors,
        array_lengths=lengths if is_gguf else {},
    )


def _read_header(file: BinaryIO, lengths: dict[str, int]) -> tuple[int, dict[str, object]]:
    """The tensor count and the key-value pairs (arrays' lengths into ``lengths``); leaves ``file`` at the tensor infos."""
    if file.read(4) != b"GGUF":
        raise ValueError("not a GGUF file")
    (version,) = _U32.unpack(_exactly(file, 4))
    if version < 2:
        raise ValueError(f"GGUF version {version} is not supported")
    tensors, count = struct.unpack("<QQ", _exactly(file, 16))
    if count > _MAX_KEYS or tensors > _MAX_TENSORS:
        raise ValueError("implausible GGUF header")
    metadata: dict[str, object] = {}
    for _ in range(count):
        key = _string(file)
        (kind,) = _U32.unpack(_exactly(file, 4))
        if kind == _ARRAY:
            (item_kind,) = _U32.unpack(_exactly(file, 4))
            (lengths[key],) = _U64.unpack(_exactly(file, 8))
            _skip_array(file, item_kind, lengths[key])
            metadata[key] = []
        else:
            metadata[key] = _value(file, kind)
    return tensors, metadata


def _read_tensor_bytes(file: BinaryIO, count: int) -> int:
    """The sum of the bytes of ``count`` tensors, read from their infos at ``file``'s position."""
    total = 0
    for _ in range(count):
        (length,) = _U64.unpack(_exactly(file, 8))
        file.seek(length, os.SEEK_CUR)  # the name
        (n_dims,) = _U32.unpack(_exactly(file, 4))
        if n_dims > _MAX_DIMS:
            raise ValueError("implausible tensor info")
        elements = math.prod(struct.unpack(f"<{n_dims}Q", _exactly(file, 8 * n_dims)))
        kind, _offset = struct.unpack("<IQ", _exactly(file, 12))
        block = GGML_BLOCKS.get(kind)
        if block is None:
            raise ValueError(f"unknown ggml type {kind}")
        elements_per_block, bytes_per_block = block
        total += elements // elements_per_block * bytes_per_block
    return total


def _exactly(file: BinaryIO, n: int) -> bytes:
    data = file.read(n)
    if len(data) != n:
        raise ValueError("GGUF header cut short")
    return data


def _string(file: BinaryIO) -> str:
    (length,) = _U64.unpack(_exactly(file, 8))
    return _exactly(file, length).decode("utf-8")


def _value(file: BinaryIO, kind: int) -> object:
    if kind == _STRING:
        return _string(file)
    if kind == _ARRAY:
        (item_kind,) = _U32.unpack(_exactly(file, 4))
        (count,) = _U64.unpack(_exactly(file, 8))
        _skip_array(file, item_kind, count)
        return []
    scalar = _SCALARS.get(kind)
    if scalar is None:
        raise ValueError(f"unknown GGUF value type {kind}")
    return scalar.unpack(_exactly(file, scalar.size))[0]


def _skip_array(file: BinaryIO, kind: int, count: int) -> None:
    scalar = _SCALARS.get(kind)
    if scalar is not None:
        file.seek(scalar.size * count, os.SEEK_CUR)
    elif kind == _STRING:
        for _ in range(count):
            (length,) = _U64.unpack(_exactly(file, 8))
            file.seek(length, os.SEEK_CUR)
    elif kind == _ARRAY:
        for _ in range(count):
            (inner,) = _U32.unpack(_exactly(file, 4))
            (inner_count,) = _U64.unpack(_exactly(file, 8))
            _skip_array(file, inner, inner_count)
    else:
        raise ValueError(f"unknown GGUF array type {kind}")
