"""Reading a build's instruction sets: tiny objects compiled here for each set, then the real
llama-server, whose build must be portable whatever CPU this machine has."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import httpx
import pytest

from smart_proxy import binary
from smart_proxy.binary import Build, cpu_flags, inspect_build, instruction_sets
from smart_proxy.process import free_port

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
    # AVX-512 on 256-bit registers only (VL), and AVX-VNNI (the VEX form of AVX-512 VNNI's dot product)
    "avx512vl": (
        "-mavx512f -mavx512vl",
        "__m256i f(__m256i a, __m256i b, __m256i c) { return _mm256_ternarylogic_epi32(a, b, c, 0x96); }",
    ),
    "avx_vnni": ("-mavxvnni", "__m256i f(__m256i a, __m256i b, __m256i c) { return _mm256_dpbusd_avx_epi32(a, b, c); }"),
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
        ("avx512vl", {"avx", "avx2", "avx512"}),
        ("avx_vnni", {"avx", "avx_vnni"}),
    ],
)
def test_instruction_sets_are_read_from_code(objects: dict[str, Path], name: str, expected: set[str]) -> None:
    assert instruction_sets(objects[name]) == expected


def _build(**needs: set[str]) -> Build:
    return Build("llama-server", {f"/b/{name.replace('_', '-')}": frozenset(sets) for name, sets in needs.items()})


def test_a_single_level_build_is_portable_only_within_x86_64_v3() -> None:
    portable = _build(**{"llama-server": set(), "libggml-cpu.so": {"avx", "avx2", "fma", "f16c", "bmi2"}})
    assert portable.portable and portable.variants == {}
    assert not _build(**{"libggml-cpu.so": {"avx2", "avx512"}}).portable
    assert not _build(**{"libggml-cpu.so": {"amx"}}).portable
    assert portable.missing({"avx", "avx2", "fma", "f16c", "bmi2", "sse4_2"}) == frozenset()
    assert _build(**{"libggml-cpu.so": {"avx2", "avx512", "amx"}}).missing({"avx2", "avx512f"}) == {"amx"}


_VARIANTS = {
    "libggml_cpu_x64.so": set(),
    "libggml_cpu_haswell.so": {"avx", "avx2", "fma", "f16c", "bmi2"},
    "libggml_cpu_zen4.so": {"avx", "avx2", "fma", "f16c", "bmi2", "avx512"},
}


def test_dispatched_variants_are_portable_without_amx() -> None:
    build = _build(**{"llama-server": set(), "libggml-base.so.0": set(), **_VARIANTS})
    assert set(build.variants) == {"x64", "haswell", "zen4"}
    assert build.always == frozenset() and build.portable
    # an AMX variant is loaded wherever cpuid lists AMX, also where AMX faults: not portable
    with_amx = _build(**_VARIANTS, **{"libggml-cpu-sapphirerapids.so": {"avx512", "amx"}})
    assert "sapphirerapids" in with_amx.variants and not with_amx.portable
    # wide code outside the variants is loaded everywhere
    assert not _build(**_VARIANTS, **{"libllama.so": {"avx512"}}).portable


def test_the_variant_a_cpu_loads_and_what_it_lacks() -> None:
    build = _build(**_VARIANTS)
    epyc = {"sse4_2", "avx", "avx2", "fma", "f16c", "bmi2", "avx512f"}
    assert build.chosen(epyc) == "zen4" and build.missing(epyc) == frozenset()
    assert build.chosen({"sse4_2", "avx", "avx2", "fma", "f16c", "bmi2"}) == "haswell"
    assert build.chosen({"sse2"}) == "x64"
    only_wide = _build(**{"libggml_cpu_zen4.so": {"avx2", "avx512"}})
    assert only_wide.chosen({"avx2"}) is None and only_wide.missing({"avx2"}) == {"avx512"}


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


def test_variant_libraries_are_read_one_by_one(tmp_path: Path, objects: dict[str, Path]) -> None:
    (tmp_path / "llama-server").write_bytes(objects["plain"].read_bytes())
    (tmp_path / "libggml-cpu-haswell.so").write_bytes(objects["avx2_fma"].read_bytes())
    (tmp_path / "libggml-cpu-sapphirerapids.so").write_bytes(objects["amx"].read_bytes())
    build = inspect_build(str(tmp_path / "llama-server"))
    assert build.variants == {"haswell": {"avx", "avx2", "fma"}, "sapphirerapids": {"amx"}}
    assert not build.portable
    (tmp_path / "libggml-cpu-sapphirerapids.so").unlink()
    assert inspect_build(str(tmp_path / "llama-server")).portable


@pytest.mark.real
def test_the_installed_llama_server_is_portable(llama_server_binary: str) -> None:
    """What the project installs runs on any x86-64-v3 CPU: no AVX-512, no AMX, whatever CPU built it."""
    build = inspect_build(llama_server_binary)
    assert {"avx2", "fma"} <= build.instruction_sets, "the kernels should still use AVX2 and FMA"
    amx = sorted(name for name, sets in build.variants.items() if "amx" in sets)
    assert build.portable, f"not portable: always loaded {sorted(build.always)}, variants with AMX {amx}"
    assert build.missing(cpu_flags()) == frozenset()


@pytest.mark.real
def test_the_running_llama_server_loads_the_variant_for_this_cpu(llama_server_binary: str, gemma_path: str) -> None:
    """What the CPU backend dispatch loads on this machine: the variant :meth:`Build.chosen` names, never AMX code."""
    import time

    build = inspect_build(llama_server_binary)
    if not build.variants:
        pytest.fail("the installed llama-server has no CPU backend variants: scripts/install builds them")
    port = free_port()
    process = subprocess.Popen(
        [llama_server_binary, "-m", gemma_path, "--port", str(port), "--ctx-size", "512"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        # ggml opens every variant to score it and closes all but the best, so the maps are read
        # once llama-server answers /health: by then the backends are settled
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and process.poll() is None:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        assert process.poll() is None, f"llama-server exited with {process.returncode}"
        maps = Path(f"/proc/{process.pid}/maps").read_text()
        loaded = {m.group(1) for m in (binary.VARIANT.match(Path(line.split()[-1]).name) for line in maps.splitlines()) if m}
        assert loaded == {build.chosen(cpu_flags())}
        assert "amx" not in build.variants[loaded.pop()]
    finally:
        process.kill()
        process.wait()
