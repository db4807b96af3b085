"""Agents: slash-command plugins that act on a request and on its response.

Theory of operation:

* Discovery, once at start-up (:meth:`AgentRegistry.load`): every folder in
  ``[agents] dir`` is an agent named after the folder. Its ``agent.py`` is imported
  and must define exactly one subclass of :class:`Agent`; ``config.toml`` beside it,
  if present, is parsed and handed to the constructor. Every folder is imported (so
  ``GET /plugins`` can show its description), only the ones named in
  ``[agents] enabled`` are constructed. A folder that fails to import or construct
  is logged and listed with its error; the proxy starts regardless.
* Plugins written to the original Ollama-proxy spec load too: a folder whose module
  (``agent.py``, else ``plugin.py``) defines no Agent subclass but one class with
  ``on_request(payload) -> dict`` and/or ``on_response(payload) -> dict`` (sync or
  async), configured by ``config.json``. :class:`SpecPlugin` adapts it: it is an agent
  like the others (its folder's name is its command, the same chain, timeouts and
  soft failures), whose hooks hand the plugin the OpenAI request or response dict and
  put the dict it returns in its place. Sync hooks run in a worker thread, one call at
  a time per plugin, so they neither block the event loop nor escape the timeout.
* Activation (:meth:`AgentRegistry.activate`): the last user message of a chat, or
  a completion's prompt, may begin with slash commands: ``/rag /parallel Tell me``.
  Leading words that name an enabled agent are taken and cut, with the whitespace
  after them, up to the first word that does not; the rest of the text stays as
  written (``/usr/bin is ...`` is no command). No command: ``activate`` returns
  None and the caller forwards the request untouched, byte for byte.
* A :class:`Chain` runs the active agents over one request, sharing one
  :class:`AgentContext`::

      on_request    in the order written            may rewrite ctx.payload (messages,
                                                    parameters, model) and ctx.text
      call          the first agent that has one    takes over the upstream call;
                    (else the upstream model once)  returns the response
      on_response   in the reverse order written    may rewrite ctx.response

  Response hooks nest like ``with`` blocks: for ``/a /b`` a's request hook runs first
  and its response hook last, so the first-written agent has the last word.
* Streams: response hooks see the whole answer at the end, never pieces of it. A
  chain with no ``on_response`` and no ``call`` is *live*: after the request hooks
  the request goes upstream the ordinary way and a stream is relayed as it
  arrives. Any other chain is *buffered*: upstream is asked without streaming, the
  hooks see the complete response, and a client that asked for a stream gets the
  final answer replayed in its dialect's stream format.
* Soft failure: each hook runs in its own cancel scope with the agent's timeout
  (``[agents] timeout``, or ``timeout.NAME``). A hook that raises or times out is
  skipped: what it may have half-changed (the payload, or the response) is put back
  as it was, the failure is logged with the request id and named in the
  ``X-Smart-Proxy-Agent-Errors`` header, and the request goes on. A failed ``call``
  falls back to the next agent's ``call``, then to the ordinary upstream call. A
  ``trio.Cancelled`` from outside (the client went away) is never swallowed.
* Observing: every hook that runs is reported to the registry's
  :class:`AgentEvents` (the proxy's metrics) with its duration and result: ``ok``,
  ``error``, ``timeout``, or ``cancelled`` when the client went away.

Agents see OpenAI shapes (a chat's ``messages`` or a completion's ``prompt``, and
``chat.completion`` or ``text_completion`` responses) whatever the client's
dialect; the dialect modules translate at their edges (see docs/agents.md).
Models are reached through the pool, a lease and a slot per call; a model with
``backend = ollama`` through its Ollama server's OpenAI-compatible ``/v1`` routes
(:func:`smart_proxy.upstream.ollama_server.send`), which take the same shapes.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import logging
import re
import sys
import tomllib
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import attrs
import httpx
import trio

from .config import AGENT_NAME, AgentsConfig, resolve_path
from .dialects.openai import has_images
from .errors import BadRequest, ProxyError, UpstreamError
from .jsonbody import MAX_DEPTH
from .upstream import ollama_server as ollama_backend
from .upstream.client import LlamaClient
from .upstream.peers import Fleet, Peer, PeerModel
from .upstream.props import check_images
from .upstream.relay import open_upstream

if TYPE_CHECKING:
    from .catalog import Catalog
    from .pool import Pool

__all__ = [
    "Agent",
    "AgentContext",
    "AgentEvents",
    "AgentFailure",
    "AgentInfo",
    "AgentRegistry",
    "Chain",
    "ERRORS_HEADER",
    "LoadedAgent",
    "MAX_DEPTH",
    "SpecPlugin",
    "new_request_id",
    "too_deep",
]

log = logging.getLogger(__name__)

#: The response header naming the agents whose hooks failed: ``rag:timeout, json:error``.
ERRORS_HEADER = "X-Smart-Proxy-Agent-Errors"
#: Where a request goes upstream, by kind; agents see these OpenAI shapes.
UPSTREAM_PATHS = {"chat": "/v1/chat/completions", "completion": "/v1/completions"}
AGENT_FILE = "agent.py"
CONFIG_FILE = "config.toml"
#: A spec plugin's module when there is no agent.py, and its config (a JSON object).
SPEC_FILE = "plugin.py"
SPEC_CONFIG_FILE = "config.json"
_SPEC_HOOKS = ("on_request", "on_response")

# A command: optional whitespace, a slash, a name, then whitespace or the end.
# ``/usr/bin`` is followed by ``/``, so it is never a command.
_COMMAND = re.compile(r"\s*/([^\s/]+)(?=\s|$)")


class Agent:
    """Base class of an agent: subclass it once in ``agents/NAME/agent.py``.

    Define only the hooks you need; the chain knows which ones a class overrides.
    ``name`` is set to the folder's name (what the user types after the slash).
    The constructor gets the parsed ``config.toml`` (``{}`` without one) and the
    agent's folder; keep it cheap and do slow work (reading files, building
    indexes) lazily in a hook, off the event loop with ``trio.to_thread``.
    """

    name: str = ""
    #: One line, shown by ``GET /plugins``.
    description: str = ""

    def __init__(self, config: Mapping[str, Any], folder: Path) -> None:
        self.config = config
        self.folder = folder

    async def on_request(self, ctx: AgentContext) -> None:
        """Rewrite ``ctx.payload`` (messages, parameters, ``ctx.model``) before it goes upstream."""

    async def on_response(self, ctx: AgentContext) -> None:
        """Rewrite ``ctx.response``, the complete response, before it goes to the client."""

    async def call(self, ctx: AgentContext) -> dict[str, Any]:
        """Take over the upstream call: return the response (use ``ctx.complete`` to ask models)."""
        raise NotImplementedError


def _overrides(cls: type, hook: str) -> bool:
    return getattr(cls, hook) is not getattr(Agent, hook)


def _defines(agent: Agent, hook: str) -> bool:
    """Whether ``agent`` has its own ``hook`` (for a spec plugin: whether the plugin has it)."""
    if isinstance(agent, SpecPlugin):
        return hook in agent.hooks
    return _overrides(type(agent), hook)


class SpecPlugin(Agent):
    """A plugin written to the original Ollama-proxy spec, as an agent.

    The plugin is any object with ``on_request(payload) -> dict`` and/or
    ``on_response(payload) -> dict``, sync or async. Its request hook gets the OpenAI
    request body (``ctx.payload``, commands already cut) and its response hook the
    OpenAI response (``ctx.response``); the dict each returns replaces what it was
    given. Anything but a dict is an error, and the chain skips the hook as it skips a
    native agent's that raises. Async hooks are awaited under Trio (so they may not use
    asyncio); sync ones run in a worker thread, one call at a time per plugin, and a
    call past the agent's timeout is abandoned there.
    """

    def __init__(self, plugin: object, config: Mapping[str, Any], folder: Path) -> None:
        super().__init__(config, folder)
        self.plugin = plugin
        #: The hooks the plugin has: on_request, on_response or both.
        self.hooks = frozenset(hook for hook in _SPEC_HOOKS if callable(getattr(plugin, hook, None)))
        self._one_at_a_time = trio.CapacityLimiter(1)

    async def on_request(self, ctx: AgentContext) -> None:
        ctx.payload = await self._run("on_request", ctx.payload)

    async def on_response(self, ctx: AgentContext) -> None:
        ctx.response = await self._run("on_response", ctx.response)

    async def _run(self, hook: str, payload: dict[str, Any] | None) -> dict[str, Any]:
        method = getattr(self.plugin, hook)
        if inspect.iscoroutinefunction(method):
            result = await method(payload)
        else:
            result = await trio.to_thread.run_sync(
                method, payload, abandon_on_cancel=True, limiter=self._one_at_a_time
            )
            if inspect.isawaitable(result):  # a plain function that returned a coroutine
                result = await result
        if not isinstance(result, dict):
            raise TypeError(f"{type(self.plugin).__name__}.{hook}() returned {type(result).__name__}, not a dict")
        return result


class AgentEvents:
    """What the chain tells an observer about the hooks it runs; subclass and override. Must not block."""

    def agent_run(self, name: str, seconds: float, ok: bool, *, result: str | None = None) -> None:
        """A hook of agent ``name`` ran for ``seconds``; ``result`` is ok, error, timeout or cancelled."""


@attrs.frozen
class AgentFailure:
    """One hook that was skipped: ``reason`` is ``timeout``, ``error`` or ``not-loaded``."""

    agent: str
    hook: str
    reason: str
    detail: str = ""


def new_request_id() -> str:
    return uuid.uuid4().hex[:16]


@attrs.define(eq=False)
class AgentContext:
    """The state of one request, handed to every hook of every active agent.

    ``payload`` is the OpenAI request body that will go upstream; ``response`` is
    the OpenAI response once there is one. ``state`` is scratch space the hooks of
    one request share (key it by your agent's name). ``stream`` says whether the
    client asked for a stream; how upstream is called is the chain's business.
    ``keep_alive`` is an Ollama client's ``keep_alive`` in seconds (None from OpenAI
    clients): every model the request reaches through ``complete`` gets it.
    """

    request_id: str
    kind: str  # "chat" or "completion"
    payload: dict[str, Any]
    stream: bool
    agents: tuple[str, ...]
    response: dict[str, Any] | None = None
    state: dict[str, Any] = attrs.Factory(dict)
    failures: list[AgentFailure] = attrs.Factory(list)
    keep_alive: float | None = None
    pool: Pool | None = attrs.field(default=None, repr=False)
    #: What requests to llama-servers go through (the proxy's LlamaClient).
    llama: LlamaClient | None = attrs.field(default=None, repr=False)
    #: Which models an Ollama upstream serves (without one, every model is the pool's).
    catalog: Catalog | None = attrs.field(default=None, repr=False)
    #: The proxy's HTTP client, for those upstreams.
    client: httpx.AsyncClient | None = attrs.field(default=None, repr=False)
    #: The proxy's peers: a model the catalog does not have is asked of a peer that has it.
    fleet: Fleet | None = attrs.field(default=None, repr=False)

    @property
    def model(self) -> str:
        """The model the request goes to; assign to retarget it."""
        return self.payload.get("model", "")

    @model.setter
    def model(self, name: str) -> None:
        self.payload["model"] = name

    @property
    def text(self) -> str | None:
        """The last user message's text (chat) or the prompt (completion); None if there is none."""
        return _get_text(self.payload, self.kind)

    @text.setter
    def text(self, value: str) -> None:
        self.payload = _with_text(self.payload, self.kind, value)

    def headers(self) -> dict[str, str]:
        """Response headers: the failed agents, when there are any.

        (The request id is the edge's to echo, like every response's; the agents only log it.)
        """
        if not self.failures:
            return {}
        seen = dict.fromkeys(f"{f.agent}:{f.reason}" for f in self.failures)
        return {ERRORS_HEADER: ", ".join(seen)}

    async def complete(self, payload: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Ask a model, through the proxy's pool (or its Ollama upstream), without streaming; return its response.

        ``payload`` defaults to ``ctx.payload``; its ``model`` names the model. This is
        how an agent's ``call`` reaches models (``/parallel`` calls it once per candidate).

        Raises:
            ProxyError: the model is unknown or busy, or upstream failed or answered
                with an error (its status is kept for 4xx answers).
        """
        status, body = await self._post(self.payload if payload is None else payload)
        if status != 200:
            raise _upstream_failure(status, body)
        try:
            response = json.loads(body)
        except (ValueError, RecursionError) as exc:
            raise UpstreamError(f"upstream answered with something that is not JSON: {exc}") from None
        if not isinstance(response, dict):
            raise UpstreamError("upstream answered with JSON that is not an object")
        if too_deep(response):
            raise UpstreamError(f"upstream answered with JSON nested more than {MAX_DEPTH} deep")
        return response

    async def _post(self, payload: Mapping[str, Any]) -> tuple[int, bytes]:
        model = payload.get("model")
        if not isinstance(model, str) or not model:
            raise BadRequest("missing 'model': name the model to use")
        body = {key: value for key, value in payload.items() if key != "stream_options"}
        body["stream"] = False
        if self.fleet and self.catalog is not None and self.catalog.find(model) is None:
            best = self.fleet.best(model)
            if best is not None:
                return await self._post_to_peer(*best, body)
        target = self.catalog.get(model) if self.catalog is not None else None
        if target is not None and target.backend == "ollama":
            if self.client is None:
                raise RuntimeError("this AgentContext has no client to call Ollama upstreams with")
            upstream = await ollama_backend.send(self.client, target, "POST", UPSTREAM_PATHS[self.kind], payload=body)
            return upstream.status_code, await upstream.read()
        if self.pool is None or self.llama is None:
            raise RuntimeError("this AgentContext has no pool to call models with")
        lease = await self.pool.acquire(model, keep_alive=self.keep_alive)
        try:
            if self.kind == "chat" and self.client is not None and has_images(body):
                await check_images(self.client, lease, model)
            upstream = await open_upstream(
                self.llama,
                "POST",
                lease.base_url + UPSTREAM_PATHS[self.kind],
                content=json.dumps(body).encode(),
                headers={"Content-Type": "application/json"},
                lease=lease,  # a slot, within queue_timeout, like every request to a llama-server
            )
            return upstream.status_code, await upstream.read()
        finally:
            lease.release()


    async def _post_to_peer(self, peer: Peer, found: PeerModel, body: dict[str, Any]) -> tuple[int, bytes]:
        """``body`` sent to ``peer``, for its model as it names it."""
        assert self.fleet is not None
        body = {**body, "model": found.name}
        upstream = await self.fleet.send(peer, "POST", UPSTREAM_PATHS[self.kind], json.dumps(body).encode())
        try:
            return upstream.status_code, await upstream.read()  # (read closes the answer, whatever happens)
        finally:
            peer.done()


def _upstream_failure(status: int, body: bytes) -> ProxyError:
    """An upstream error answer as a ProxyError; a 4xx keeps its status (the request was bad)."""
    try:
        error = json.loads(body).get("error")
        message = error.get("message") if isinstance(error, dict) else error
    except (ValueError, AttributeError):
        message = None
    message = str(message or body[:200].decode(errors="replace") or f"HTTP {status}")
    failure = UpstreamError(f"upstream answered {status}: {message}")
    if 400 <= status < 500:
        failure.status = status
        failure.kind = "invalid_request_error"
    return failure


# ---- the text commands live in ------------------------------------------------------------


def _last_user(messages: object) -> int | None:
    if not isinstance(messages, list):
        return None
    for index in range(len(messages) - 1, -1, -1):
        message = messages[index]
        if isinstance(message, dict) and message.get("role") == "user":
            return index
    return None


def _text_part(content: object) -> int | None:
    """Where the first text part is in a list of content parts (OpenAI's multimodal form)."""
    if isinstance(content, list):
        for index, part in enumerate(content):
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                return index
    return None


def _get_text(payload: Mapping[str, Any], kind: str) -> str | None:
    if kind == "completion":
        prompt = payload.get("prompt")
        return prompt if isinstance(prompt, str) else None
    messages = payload.get("messages")
    index = _last_user(messages)
    if index is None:
        return None
    content = messages[index].get("content")  # type: ignore[index]
    if isinstance(content, str):
        return content
    part = _text_part(content)
    return None if part is None else content[part]["text"]  # type: ignore[index]


def _with_text(payload: dict[str, Any], kind: str, text: str) -> dict[str, Any]:
    """A copy of ``payload`` whose user text is ``text``; nothing else is copied or changed."""
    payload = dict(payload)
    if kind == "completion":
        payload["prompt"] = text
        return payload
    messages = list(payload["messages"])
    index = _last_user(messages)
    if index is None:
        raise ValueError("the request has no user message")
    message = dict(messages[index])
    content = message.get("content")
    if isinstance(content, list) and (part := _text_part(content)) is not None:
        content = list(content)
        content[part] = {**content[part], "text": text}
        message["content"] = content
    else:
        message["content"] = text
    messages[index] = message
    payload["messages"] = messages
    return payload


def take_commands(text: str, known: Iterable[str] | Mapping[str, object]) -> tuple[list[str], str]:
    """``("/rag /x hi", {"rag"})`` -> ``(["rag"], "/x hi")``: leading commands naming known agents.

    Taking stops at the first word that is not a known command; the text after the
    last command (less the whitespace that separated them) is returned as it was.
    """
    names: list[str] = []
    position = 0
    while (match := _COMMAND.match(text, position)) is not None and match.group(1) in known:
        if match.group(1) not in names:
            names.append(match.group(1))
        position = match.end()
    if not names:
        return [], text
    return names, text[position:].lstrip()


# ---- discovery ------------------------------------------------------------------------------


@attrs.frozen
class AgentInfo:
    """What ``GET /plugins`` says about one discovered (or enabled but missing) agent."""

    name: str
    description: str
    enabled: bool
    loaded: bool
    error: str | None
    folder: str


@attrs.frozen
class LoadedAgent:
    """An enabled, constructed agent, with its timeout and the hooks its class defines."""

    name: str
    agent: Agent
    timeout: float
    on_request: bool
    on_response: bool
    call: bool

    @classmethod
    def wrap(cls, agent: Agent, timeout: float) -> LoadedAgent:
        return cls(
            name=agent.name,
            agent=agent,
            timeout=timeout,
            on_request=_defines(agent, "on_request"),
            on_response=_defines(agent, "on_response"),
            call=_defines(agent, "call"),
        )


_module_counter = 0


def _import_module(name: str, path: Path) -> ModuleType:
    """Import ``path`` as a fresh module, named uniquely for agent ``name``."""
    global _module_counter
    _module_counter += 1
    module_name = f"_smart_proxy_agent_{_module_counter}_" + re.sub(r"\W", "_", name)
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module


def _classes(module: ModuleType) -> list[type]:
    """The classes ``module`` defines itself (not those it imports)."""
    return [
        value for value in vars(module).values() if inspect.isclass(value) and value.__module__ == module.__name__
    ]


def _import_agent(name: str, folder: Path) -> tuple[str, Callable[[], Agent]]:
    """The agent in ``folder``: its description, and how to construct it (with its config).

    ``agent.py`` (else ``plugin.py``) must define exactly one subclass of :class:`Agent`, or,
    defining none, exactly one class with ``on_request``/``on_response``: a spec plugin.

    Raises:
        Exception: whatever importing the module raised; TypeError for a folder with no agent
            class, several, or a native agent without a description.
    """
    path = folder / AGENT_FILE
    if not path.is_file() and (folder / SPEC_FILE).is_file():
        path = folder / SPEC_FILE
    module = _import_module(name, path)
    classes = _classes(module)
    native = [cls for cls in classes if issubclass(cls, Agent) and cls is not Agent]
    if len(native) == 1:
        agent_class = native[0]
        description = " ".join(str(agent_class.description).split())
        if not description:
            raise TypeError(f"{agent_class.__name__} has no description")
        return description, lambda: agent_class(_read_config(folder), folder)
    spec = [cls for cls in classes if any(callable(getattr(cls, hook, None)) for hook in _SPEC_HOOKS)]
    if native or len(spec) != 1:
        found = ", ".join(sorted(c.__name__ for c in native or spec)) or "none"
        raise TypeError(
            f"{path.name} must define exactly one subclass of smart_proxy.agents.Agent, or one class with "
            f"on_request/on_response (an Ollama-proxy plugin) (found: {found})"
        )
    plugin_class = spec[0]

    def construct() -> Agent:
        config = _read_json_config(folder)
        return SpecPlugin(_construct_plugin(plugin_class, config), config, folder)

    return _spec_description(plugin_class, module), construct


def _spec_description(plugin_class: type, module: ModuleType) -> str:
    """A spec plugin's ``description`` attribute, else the first paragraph of its class's or module's docstring."""
    for text in (getattr(plugin_class, "description", None), plugin_class.__doc__, module.__doc__):
        if isinstance(text, str) and text.strip():
            return " ".join(text.strip().split("\n\n")[0].split())
    hooks = ", ".join(hook for hook in _SPEC_HOOKS if callable(getattr(plugin_class, hook, None)))
    return f"{plugin_class.__name__}: an Ollama-proxy plugin ({hooks})"


def _construct_plugin(plugin_class: type, config: dict[str, Any]) -> object:
    """``plugin_class(config)`` if its constructor takes an argument (positional, or ``config=``), else ``plugin_class()``."""
    try:
        parameters = list(inspect.signature(plugin_class).parameters.values())
    except (TypeError, ValueError):  # no signature to read (a builtin's): give it the config
        return plugin_class(config)
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)
    if any(parameter.kind in positional for parameter in parameters):
        return plugin_class(config)
    if any(parameter.name == "config" for parameter in parameters):
        return plugin_class(config=config)
    return plugin_class()


def _describe_error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


class AgentRegistry:
    """Every agent found at start-up; :meth:`activate` builds a chain for one request."""

    def __init__(
        self,
        loaded: Iterable[LoadedAgent] = (),
        infos: Iterable[AgentInfo] = (),
        enabled: Iterable[str] = (),
        *,
        events: AgentEvents | None = None,
    ):
        self._loaded = {agent.name: agent for agent in loaded}
        self._events = events if events is not None else AgentEvents()
        self._infos = tuple(sorted(infos, key=lambda info: info.name))
        # every enabled name is a command, loaded or not: a broken agent is reported, not ignored
        self._commands = frozenset(enabled) | frozenset(self._loaded)

    @classmethod
    def load(cls, config: AgentsConfig, base_dir: str = ".", *, events: AgentEvents | None = None) -> AgentRegistry:
        """Discover, import and construct the agents in ``config.dir``; never raises for an agent.

        ``events`` hears of every hook the chains of this registry run.
        """
        folder = resolve_path(config.dir, base_dir)
        enabled = set(config.enabled)
        loaded: list[LoadedAgent] = []
        infos: list[AgentInfo] = []
        candidates = sorted(folder.iterdir()) if folder.is_dir() else []
        if not folder.is_dir() and enabled:
            log.error("[agents] dir %s is not a folder; enabled agents cannot load", folder)
        found = set()
        for path in candidates:
            if not path.is_dir() or path.name.startswith((".", "_")) or not AGENT_NAME.match(path.name):
                continue
            name = path.name
            found.add(name)
            description, error, agent = "", None, None
            try:
                description, construct = _import_agent(name, path)
                if name in enabled:
                    agent = construct()
                    agent.name = name
            except Exception as exc:
                error = _describe_error(exc)
                log.error(
                    "agent %s (%s) failed to load: %s", name, path, error, exc_info=log.isEnabledFor(logging.DEBUG)
                )
            if agent is not None:
                loaded.append(LoadedAgent.wrap(agent, config.timeout_for(name)))
                log.info("agent /%s loaded: %s", name, description)
            infos.append(AgentInfo(name, description, name in enabled, agent is not None, error, str(path)))
        for name in sorted(enabled - found):
            error = f"no folder {name} in {folder}"
            log.error("agent %s is enabled but cannot load: %s", name, error)
            infos.append(AgentInfo(name, "", True, False, error, str(folder / name)))
        for name in sorted(set(config.timeouts) - enabled):
            log.warning("[agents] timeout.%s is set but %s is not enabled", name, name)
        return cls(loaded, infos, config.enabled, events=events)

    def describe(self) -> list[dict[str, Any]]:
        """Every discovered agent, for ``GET /plugins``."""
        return [attrs.asdict(info) for info in self._infos]

    def get(self, name: str) -> LoadedAgent | None:
        return self._loaded.get(name)

    def activate(self, payload: dict[str, Any], kind: str) -> Chain | None:
        """The chain of agents the request's leading slash commands name, or None for none.

        ``kind`` is ``chat`` (``payload["messages"]``) or ``completion``
        (``payload["prompt"]``). ``payload`` is not modified; the chain holds a copy
        with the commands cut from the text.
        """
        if not self._commands:
            return None
        text = _get_text(payload, kind)
        if text is None or not text.lstrip().startswith("/"):
            return None
        names, rest = take_commands(text, self._commands)
        if not names:
            return None
        if too_deep(payload):
            raise BadRequest(f"request JSON nests more than {MAX_DEPTH} deep; agent requests allow at most that")
        agents = tuple(self._loaded[name] for name in names if name in self._loaded)
        missing = tuple(name for name in names if name not in self._loaded)
        return Chain(agents, _with_text(payload, kind, rest), kind, missing, events=self._events)


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG_FILE
    if not path.is_file():
        return {}
    with open(path, "rb") as file:
        return tomllib.load(file)


def _read_json_config(folder: Path) -> dict[str, Any]:
    """A spec plugin's ``config.json`` (a JSON object), or ``{}`` without one."""
    path = folder / SPEC_CONFIG_FILE
    if not path.is_file():
        return {}
    with open(path, "rb") as file:
        config = json.load(file)
    if not isinstance(config, dict):
        raise TypeError(f"{SPEC_CONFIG_FILE} must hold a JSON object, not {type(config).__name__}")
    return config


# ---- running a chain ----------------------------------------------------------------------


class Chain:
    """The active agents of one request, in the order written, and its payload with the commands cut.

    A dialect route runs it like this (see docs/agents.md)::

        ctx = await chain.prepare(pool, llama, request_id)  # request hooks
        if chain.live:
            ...forward ctx.payload as usual, adding ctx.headers()
        else:
            response = await chain.respond(ctx)             # call + response hooks
            ...render response (or replay it as a stream), adding ctx.headers()
    """

    def __init__(
        self,
        agents: tuple[LoadedAgent, ...],
        payload: dict[str, Any],
        kind: str,
        missing: tuple[str, ...] = (),
        *,
        events: AgentEvents | None = None,
    ):
        self.agents = agents
        self.events = events if events is not None else AgentEvents()
        self.payload = payload
        self.kind = kind
        self.missing = missing
        #: No response hook and no takeover: the answer can be relayed as it streams.
        self.live = not any(agent.on_response or agent.call for agent in agents)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(agent.name for agent in self.agents)

    async def prepare(
        self,
        pool: Pool | None,
        llama: LlamaClient | None,
        request_id: str | None = None,
        *,
        keep_alive: float | None = None,
        catalog: Catalog | None = None,
        client: httpx.AsyncClient | None = None,
        fleet: Fleet | None = None,
    ) -> AgentContext:
        """Make the request's context and run every request hook, in the order written.

        ``keep_alive`` (seconds; an Ollama client's) applies to every lease ``ctx.complete`` takes.
        With ``catalog`` and ``client``, ``ctx.complete`` reaches models of Ollama upstreams too;
        with ``fleet``, the models of peers.
        """
        ctx = AgentContext(
            request_id=request_id or new_request_id(),
            kind=self.kind,
            payload=self.payload,
            stream=self.payload.get("stream") is True,
            agents=self.names,
            keep_alive=keep_alive,
            pool=pool,
            llama=llama,
            catalog=catalog,
            client=client,
            fleet=fleet,
        )
        for name in self.missing:
            log.warning("request %s: /%s is enabled but not loaded; skipped", ctx.request_id, name)
            ctx.failures.append(AgentFailure(name, "load", "not-loaded"))
        for agent in self.agents:
            if agent.on_request:
                await self._run_hook(ctx, agent, "on_request", "payload")
        return ctx

    async def respond(self, ctx: AgentContext) -> dict[str, Any]:
        """Get the response (an agent's takeover, else the upstream model) and run the response hooks.

        Raises:
            ProxyError: the upstream call failed or answered with an error; the
                response hooks do not run then.
        """
        response = None
        for agent in self.agents:
            if agent.call:
                response = await self._run_call(ctx, agent)
                if response is not None:
                    break
        if response is None:
            response = await ctx.complete()
        ctx.response = response
        for agent in reversed(self.agents):
            if agent.on_response:
                await self._run_hook(ctx, agent, "on_response", "response")
        assert ctx.response is not None
        return ctx.response

    async def _run_hook(self, ctx: AgentContext, agent: LoadedAgent, hook: str, target: str) -> None:
        # A skipped hook must leave no trace: keep what it may change, put it back if it fails.
        saved = _copy_json(getattr(ctx, target))
        with self._reported(ctx, agent):
            ok, _ = await _guarded(ctx, agent, hook)
        if not ok:
            setattr(ctx, target, saved)

    async def _run_call(self, ctx: AgentContext, agent: LoadedAgent) -> dict[str, Any] | None:
        with self._reported(ctx, agent):
            ok, response = await _guarded(ctx, agent, "call")
            if not ok:
                return None
            if not isinstance(response, dict):
                _fail(ctx, agent, "call", "error", f"call() returned {type(response).__name__}, not a response object")
                return None
            return response

    @contextmanager
    def _reported(self, ctx: AgentContext, agent: LoadedAgent) -> Iterator[None]:
        """Report the block as one run of ``agent``: ok, or the reason of the failure it recorded, or cancelled."""
        started, failures = trio.current_time(), len(ctx.failures)
        result = "error"
        try:
            yield
            result = ctx.failures[-1].reason if len(ctx.failures) > failures else "ok"
        except trio.Cancelled:
            result = "cancelled"
            raise
        finally:
            self.events.agent_run(agent.name, trio.current_time() - started, result == "ok", result=result)


def _copy_json(value: Any) -> Any:
    """A deep copy of JSON data (dicts and lists; the rest is immutable or shared), without deepcopy's memo and dispatch.

    Iterative, so no nesting depth can exhaust the stack: the copy runs outside any hook's guard.
    """
    if type(value) is not dict and type(value) is not list:
        return value
    root: Any = {} if type(value) is dict else []
    pending = [(value, root)]
    while pending:
        source, target = pending.pop()
        items = source.items() if type(source) is dict else enumerate(source)
        is_dict = type(target) is dict
        for key, item in items:
            kind = type(item)
            if kind is dict or kind is list:
                child: Any = {} if kind is dict else []
                pending.append((item, child))
                item = child
            if is_dict:
                target[key] = item
            else:
                target.append(item)
    return root


def too_deep(value: Any, limit: int = MAX_DEPTH) -> bool:
    """Whether JSON data nests dicts and lists more than ``limit`` deep (iteratively, stopping early)."""
    pending = [(value, 0)]
    while pending:
        item, depth = pending.pop()
        kind = type(item)
        if kind is dict or kind is list:
            if depth >= limit:
                return True
            children = item.values() if kind is dict else item
            pending.extend((child, depth + 1) for child in children if type(child) in (dict, list))
    return False


async def _guarded(ctx: AgentContext, agent: LoadedAgent, hook: str) -> tuple[bool, Any]:
    """Run one hook within the agent's timeout: ``(True, result)``, or ``(False, None)`` once recorded as failed."""
    with trio.move_on_after(agent.timeout) as scope:
        try:
            return True, await getattr(agent.agent, hook)(ctx)
        except Exception as exc:
            _fail(ctx, agent, hook, "error", _describe_error(exc), exc)
            return False, None
    # only our own deadline lands here; a cancel from outside propagates past the scope
    assert scope.cancelled_caught
    _fail(ctx, agent, hook, "timeout", f"no result within {agent.timeout:g}s")
    return False, None


def _fail(
    ctx: AgentContext, agent: LoadedAgent, hook: str, reason: str, detail: str, exc: BaseException | None = None
) -> AgentFailure:
    log.warning(
        "request %s: agent /%s %s %s, skipped: %s",
        ctx.request_id,
        agent.name,
        hook,
        "timed out" if reason == "timeout" else "failed",
        detail,
        exc_info=exc,
    )
    failure = AgentFailure(agent.name, hook, reason, detail)
    ctx.failures.append(failure)
    return failure
