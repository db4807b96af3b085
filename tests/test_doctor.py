"""``smart-proxy doctor``: every check passes on a working set-up, and each missing piece fails
with a line that says what and what to do."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from smart_proxy import doctor

from .conftest import IN_CI

ROOT = Path(__file__).parent.parent


def _ini(tmp_path: Path, binary: str, behaviour: dict | None = None, path: str | None = None) -> str:
    model = tmp_path / "a.json"
    model.write_text(json.dumps(behaviour or {}))
    ini = tmp_path / "proxy.ini"
    ini.write_text(f"[pool]\nllama_server = {binary}\nload_timeout = 10s\n[model:a]\npath = {path or model}\n")
    return str(ini)


def _run(ini: str, model: str | None = None) -> tuple[int, list[str]]:
    lines: list[str] = []
    code = doctor.run(ini, model, out=lines.append)
    return code, lines


def test_all_checks_pass_with_a_working_llama_server(tmp_path: Path, fake_binary: str) -> None:
    code, lines = _run(_ini(tmp_path, fake_binary))
    assert code == 0, "\n".join(lines)
    assert lines[0].startswith("ok    config: ")
    assert lines[1].startswith(f"ok    llama-server: {fake_binary}")
    assert any(line.startswith("ok    cpu: ") for line in lines)
    assert any(line.startswith("warn  build: ") and "not an ELF binary" in line for line in lines)
    assert any(line.startswith("ok    generation: a answered in ") for line in lines)
    assert any(line.startswith("ok    memory: ") for line in lines)
    assert any(line.startswith("ok    disk: ") for line in lines)
    assert lines[-1] == "all checks passed"


def test_a_missing_llama_server_fails_with_what_to_do(tmp_path: Path) -> None:
    code, lines = _run(_ini(tmp_path, "/nonexistent/llama-server"))
    assert code == 1
    assert "FAIL  llama-server: [pool] llama_server: /nonexistent/llama-server is not an executable file" in lines
    assert "      -> run `bash scripts/install` (builds a portable llama-server)" in lines
    assert not any("generation" in line for line in lines)  # nothing to run it with
    assert lines[-1] == "1 check failed"


def test_a_missing_model_fails_with_the_config_line(tmp_path: Path, fake_binary: str) -> None:
    code, lines = _run(_ini(tmp_path, fake_binary, path=str(tmp_path / "absent.gguf")))
    assert code == 1
    assert lines[0] == f"FAIL  config: [model:a] path: no such file: {tmp_path / 'absent.gguf'}"


def test_an_unknown_model_name_fails(tmp_path: Path, fake_binary: str) -> None:
    code, lines = _run(_ini(tmp_path, fake_binary), model="nope")
    assert code == 1 and "FAIL  generation: no model 'nope' in the catalog" in lines


def test_a_llama_server_that_dies_by_sigill_fails_generation_by_name(tmp_path: Path, fake_binary: str) -> None:
    code, lines = _run(_ini(tmp_path, fake_binary, {"signal_on_load": "SIGILL"}))
    assert code == 1
    failed = [line for line in lines if line.startswith("FAIL  generation: a: 502 ")]
    assert len(failed) == 1 and "was killed by SIGILL (illegal instruction) while loading" in failed[0]


def test_a_build_this_cpu_cannot_run_fails(tmp_path: Path) -> None:
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        if IN_CI:
            pytest.fail("a C compiler is missing, and CI=true (it also builds llama-server)")
        pytest.skip("no C compiler")
    source = tmp_path / "k.c"
    source.write_text("#include <immintrin.h>\n__m512 f(__m512 a, __m512 b) { return _mm512_add_ps(a, b); }\n")
    subprocess.run([cc, "-O2", "-mavx512f", "-c", str(source), "-o", str(tmp_path / "llama-server")], check=True)
    checks: list[doctor.Check] = []
    doctor._build(str(tmp_path / "llama-server"), frozenset({"avx", "avx2", "fma"}), checks.append)
    assert [c.status for c in checks] == ["FAIL"]
    assert "this CPU lacks avx512: llama-server would die by SIGILL" in checks[0].text
    checks.clear()
    doctor._build(str(tmp_path / "llama-server"), frozenset({"avx512f"}), checks.append)
    assert [c.status for c in checks] == ["ok"] and "built for CPUs like this one" in checks[0].text


@pytest.mark.real
def test_doctor_passes_on_this_machine_with_the_project_config(llama_server_binary: str, gemma_path: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "smart_proxy", "doctor", "--config", str(ROOT / "proxy.ini")],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert any(line.startswith("ok    build: ") and "portable" in line for line in lines)
    assert any(line.startswith("ok    generation: gemma3-270m answered in ") for line in lines)
    assert lines[-1] == "all checks passed"


def test_memory_is_judged_by_the_pools_estimate(tmp_path: Path) -> None:
    """A model's declared ``memory`` (else the estimate) is what the memory check weighs, not its file's size."""
    from smart_proxy.config import load_config

    ini = tmp_path / "proxy.ini"
    model = tmp_path / "a.json"
    model.write_text("{}")  # a few bytes: by its size alone it would fit anywhere
    ini.write_text(f"[pool]\nllama_server = /bin/true\nmemory = off\n[model:a]\npath = {model}\nmemory = 1TiB\n")
    config = load_config(str(ini))
    needs = doctor._needs(config, doctor._sizes(config))
    assert needs == {"a": 1 << 40}
    checks: list[doctor.Check] = []
    doctor._memory(needs, checks.append)
    assert [c.status for c in checks] == ["FAIL"]
    assert checks[0].text.endswith("a needs about 1099.5 GB") and "smaller quantization or context" in (checks[0].fix or "")


def test_gpus_are_listed_against_the_largest_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from smart_proxy.config import structure
    from smart_proxy.placement import Gpu

    def checks(pool: dict, needs: dict[str, int], model: dict | None = None) -> list[doctor.Check]:
        config = structure({"pool": pool, "model:a": {"path": "/etc/hostname", **(model or {})}})
        found: list[doctor.Check] = []
        doctor._gpus(config, needs, found.append)
        return found

    (none,) = checks({"gpus": "none"}, {"a": 1})
    assert (none.status, none.text) == ("ok", "none ([pool] gpus = none): llama-server gets no GPU flags")
    monkeypatch.setattr(doctor, "read_nvidia_smi", lambda: ())
    assert checks({}, {"a": 1})[0].text == "none found (no nvidia-smi, or it failed): models run on the CPU"
    monkeypatch.setattr(doctor, "read_nvidia_smi", lambda: (Gpu(0, 8 * 10**9),))
    (auto,) = checks({"gpu_reserve": "0"}, {"a": 4 * 10**9})
    assert auto.text == "GPU 0 8.0 GB (free less [pool] gpu_reserve); the largest model, a, needs about 4.0 GB"
    (big,) = checks({"gpus": "0:1GiB, 1:1GiB"}, {"a": 4 * 10**9})
    assert big.status == "warn" and "a needs about 4.0 GB, more than all of them" in big.text and "allow_partial" in big.fix
    assert checks({"gpus": "0:1GiB"}, {"a": 4 * 10**9}, {"allow_partial": "true"})[0].status == "ok"


def test_a_router_is_checked_by_its_peers_not_a_llama_server(tmp_path: Path, fake_ollama) -> None:
    ini = tmp_path / "router.ini"
    ini.write_text(
        "[pool]\nllama_server = /nonexistent/llama-server\n"
        f"[peer:box]\nurl = {fake_ollama.url}\nkind = ollama\n"
        "[peer:gone]\nurl = http://127.0.0.1:9\nkind = smart-proxy\n"
    )
    code, lines = _run(str(ini))
    assert code == 1
    assert lines[0].startswith("ok    config:") and "a router: no llama-server runs here" in lines[1]
    assert not any("llama-server" in line.split(":")[0] for line in lines)  # no llama-server check at all
    box = next(line for line in lines if line.startswith(("ok    peer box", "warn  peer box")))
    assert f"ollama at {fake_ollama.url}" in box
    gone = lines.index(next(line for line in lines if line.startswith("FAIL  peer gone")))
    assert "http://127.0.0.1:9/v1/models" in lines[gone] and "start it, or fix [peer:gone] url" in lines[gone + 1]
    assert lines[-1] == "1 check failed"

    ini.write_text(ini.read_text().split("[peer:gone]")[0])
    code, lines = _run(str(ini))
    assert code == 0 and lines[-1] == "all checks passed"
