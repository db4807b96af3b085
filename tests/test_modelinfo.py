"""smart_proxy/modelinfo.py: the GGUF header reader, checked against the ``gguf`` package's reader."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from smart_proxy.modelinfo import GGML_BLOCKS, read_model_info

#: (type, numpy shape: rows first, a row of elements last) for the tiny files, every kind of block size.
TENSORS = [
    (GGMLQuantizationType.F32, (3, 5)),
    (GGMLQuantizationType.F16, (7,)),
    (GGMLQuantizationType.BF16, (2, 2, 2)),
    (GGMLQuantizationType.Q8_0, (4, 64)),
    (GGMLQuantizationType.Q4_0, (32,)),
    (GGMLQuantizationType.Q5_0, (2, 96)),
    (GGMLQuantizationType.Q4_K, (3, 256)),
    (GGMLQuantizationType.Q6_K, (512,)),
    (GGMLQuantizationType.IQ4_XS, (2, 256)),
    (GGMLQuantizationType.MXFP4, (64,)),
]


def write_gguf(path: Path, tensors=TENSORS, arch: str = "llama", **keys: object) -> Path:
    """A GGUF with ``tensors`` (zeros), the ``keys`` (ints as u32, floats, strings) and a tokenizer."""
    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in keys.items():
        if isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        else:
            writer.add_string(key, str(value))
    writer.add_token_list([f"t{i}" for i in range(100)])
    plain = {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16}
    for index, (kind, shape) in enumerate(tensors):
        if kind in plain:
            writer.add_tensor(f"t{index}", np.zeros(shape, dtype=plain[kind]))
        else:  # a quantized tensor is given as bytes: each row as its blocks' bytes
            block, size = GGML_QUANT_SIZES[kind]
            writer.add_tensor(f"t{index}", np.zeros((*shape[:-1], shape[-1] // block * size), np.uint8), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_block_sizes_are_ggmls() -> None:
    """Every type the reader knows has the block the reference (``gguf``'s GGML_QUANT_SIZES) gives it."""
    reference = {int(kind): sizes for kind, sizes in GGML_QUANT_SIZES.items()}
    assert GGML_BLOCKS == {kind: reference[kind] for kind in GGML_BLOCKS}
    assert set(reference) - set(GGML_BLOCKS) == set()


def test_tensor_bytes_match_the_reference_reader(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "t.gguf", general_name="tiny")
    info = read_model_info(str(path))
    reference = gguf.GGUFReader(str(path))
    assert info.tensor_count == len(reference.tensors) == len(TENSORS)
    assert info.tensor_bytes == sum(int(t.n_bytes) for t in reference.tensors) > 0
    # the data section holds exactly the tensors, each padded to the alignment
    assert info.tensor_bytes <= info.size - reference.data_offset


def test_a_file_without_tensors_has_zero_tensor_bytes(tmp_path: Path) -> None:
    info = read_model_info(str(write_gguf(tmp_path / "t.gguf", tensors=[])))
    assert info.is_gguf and info.tensor_bytes == 0 and info.tensor_count == 0


def test_cut_tensor_infos_keep_the_metadata(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "t.gguf", **{"llama.block_count": 3})
    whole = path.read_bytes()
    reference = gguf.GGUFReader(str(path))
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(whole[: reference.data_offset - 40])
    info = read_model_info(str(cut))
    assert info.is_gguf and info.metadata["llama.block_count"] == 3
    assert info.tensor_bytes is None


@pytest.mark.parametrize("kind", [31, 99])
def test_an_unknown_ggml_type_gives_no_tensor_bytes(tmp_path: Path, kind: int) -> None:
    path = write_gguf(tmp_path / "t.gguf", tensors=[(GGMLQuantizationType.F32, (4,))])
    reference = gguf.GGUFReader(str(path))
    field_offset = int(reference.tensors[0].field.offset)
    data = bytearray(path.read_bytes())
    # the type is the u32 after the name (u64 length + bytes), n_dims (u32) and one u64 dimension
    name_length = int.from_bytes(data[field_offset : field_offset + 8], "little")
    at = field_offset + 8 + name_length + 4 + 8
    assert int.from_bytes(data[at : at + 4], "little") == 0
    data[at : at + 4] = kind.to_bytes(4, "little")
    path.write_bytes(bytes(data))
    info = read_model_info(str(path))
    assert info.is_gguf and info.tensor_bytes is None
