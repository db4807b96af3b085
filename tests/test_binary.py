"""Reading a build's instruction sets: tiny objects compiled here for each set, then the real
llama-server, whose build must be portable whatever CPU this machine has."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from smart_proxy import binary
from smart_proxy.binary import Build, cpu_flags, inspect_build, instruction_sets

from .conftest import IN_CI

# Each C body uses one instruction set through its intrinsics; compiled, never run, so any CPU will do.
_SOURCES = {
    "plain": ("", "int f(int a, int b) { return a * b + 1; }"),
    "avx2_fma": (
        "-mavx2 -mfma",
        "__m256 f(__m256 a, __m256 b, __m256 c) { return _mm256_fmadd_ps(a, b, c); }\n"
        "__m256i g(__m256i a, __m256i b) { return _mm256_add_epi32(a, b); }",
    ),
    "f16c": ("-mf16c", "__m128 f(__m128i a) { return _mm_cvtph_ps(a); }"),
    "bmi2": ("-mbmi2", "unsigned long long f(unsigned long long a, unsigned long long m) { return _pdep_u64(a, m); }"),
    "avx512": ("-mavx512f", "__m512 f(__m512 a, __m512 b) { return _mm512_add_ps(a, b); }"),
    "amx": ("-mamx-tile", "void f(void) { _tile_zero(4); }"),
}


@pytest.fixture(scope="module")
def objects(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        if IN_CI:
            pytest.fail("a C compiler is missing, and CI=true (it also builds llama-server)")
        pytest.skip("no C compiler")
    folder = tmp_path_factory.mktemp("isa")
    built = {}
    for name, (flags, body) in _SOURCES.items():
        source = folder / f"{name}.c"
        source.write_text(f"#include <immintrin.h>\n{body}\n")
        target = folder / f"{name}.o"
        subprocess.run([cc, "-O2", "-c", *flags.split(), str(source), "-o", str(target)], check=True)
        built[name] = target
    return built


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("plain", set()),
        ("avx2_fma", {"avx", "avx2", "fma"}),
        ("f16c", {"f16c"}),
        ("bmi2", {"bmi2"}),
        ("avx512", {"avx512"}),
        ("amx", {"amx"}),
    ],
)
def test_instruction_sets_are_read_from_code(objects: dict[str, Path], name: str, expected: set[str]) -> None:
    assert instruction_sets(objects[name]) == expected


def test_a_build_is_portable_only_within_x86_64_v3() -> None:
    portable = Build("x", ("x",), frozenset({"avx", "avx2", "fma", "f16c", "bmi2"}))
    assert portable.portable
    assert not Build("x", ("x",), frozenset({"avx2", "avx512"})).portable
    assert not Build("x", ("x",), frozenset({"amx"})).portable
    assert portable.missing({"avx", "avx2", "fma", "f16c", "bmi2", "sse4_2"}) == frozenset()
    assert Build("x", ("x",), frozenset({"avx2", "avx512", "amx"})).missing({"avx2", "avx512f"}) == {"amx"}


def test_cpu_flags_come_from_cpuinfo(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Test CPU\nflags\t\t: fpu sse avx2 amx_tile\n\nprocessor\t: 1\n")
    assert cpu_flags(str(cpuinfo)) == {"fpu", "sse", "avx2", "amx_tile"}
    assert binary.cpu_name(str(cpuinfo)) == "Test CPU"
    assert cpu_flags(str(tmp_path / "absent")) == frozenset()


def test_build_files_are_the_binary_and_its_llama_libraries(tmp_path: Path, objects: dict[str, Path]) -> None:
    (tmp_path / "llama-server").write_bytes(objects["plain"].read_bytes())
    (tmp_path / "libggml-cpu.so.0.26.0").write_bytes(objects["avx512"].read_bytes())
    (tmp_path / "libggml-cpu.so.0").symlink_to("libggml-cpu.so.0.26.0")  # the same file: read once
    (tmp_path / "libunrelated.so").write_bytes(objects["amx"].read_bytes())
    build = inspect_build(str(tmp_path / "llama-server"))
    assert sorted(Path(f).name for f in build.files) == ["libggml-cpu.so.0", "llama-server"]
    assert build.instruction_sets == {"avx512"} and not build.portable


@pytest.mark.real
def test_the_installed_llama_server_is_portable(llama_server_binary: str) -> None:
    """What the project installs runs on any x86-64-v3 CPU: no AVX-512, no AMX, whatever CPU built it."""
    build = inspect_build(llama_server_binary)
    assert {"avx2", "fma"} <= build.instruction_sets, "the kernels should still use AVX2 and FMA"
    assert build.portable, f"not portable: uses {sorted(build.instruction_sets - binary.PORTABLE)}"
    assert build.missing(cpu_flags()) == frozenset()
