"""Ollama's routes over the pool, and over Ollama upstreams.

Theory of operation: every model route reads its ``model`` first; a model a peer has may
be served there instead (:func:`smart_proxy.handlers.fleet.serve` decides; an OpenAI peer
gets chat and generate translated, as a llama-server does). Served here, the route resolves
its ``model`` in the catalog.
A model with ``backend = ollama`` is passed to its Ollama server untouched
(:mod:`smart_proxy.upstream.ollama_server`). A local model is served by a llama-server
from the pool: the request is translated by :mod:`smart_proxy.dialects.ollama`, sent to
the server's OpenAI endpoint under a lease (acquired with the request's
``keep_alive``), and the answer translated back, NDJSON line by line when
streaming (coalesced: whatever events have arrived go out as one write). The
lease is released when the last upstream byte is read, or the client leaves.

An empty ``/api/chat`` or ``/api/generate`` (no messages, no prompt) loads the
model and answers ``done_reason: "load"``; with ``keep_alive: 0`` it unloads the
model instead (``"unload"``) and answers once its idle servers have stopped.
Errors are Ollama's ``{"error": "..."}`` with the status our error carries.

Agents: a chat or generate whose user text starts with agent commands
(``/rag ...``) runs the agent chain (:mod:`smart_proxy.agents`) on the OpenAI body
the translation made, exactly as the OpenAI routes do; only the answer is
translated back (a buffered chain's final answer is replayed through the same SSE
-> NDJSON translation a live stream takes). Without a command nothing changes.
So does a request with commands for a model of an Ollama upstream: agents speak
OpenAI, so it is translated like a local model's and goes to that Ollama's
OpenAI-compatible ``/v1`` routes, and the answer comes back the same way
(without a command, such a request still goes to Ollama's own route untouched).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from typing import Any

import attrs
import trio

from .. import logs
from ..agents import Chain
from ..config import AUTO_MMPROJ, ModelConfig, resolve_path
from ..dialects import ollama as dialect
from ..dialects.openai import parse_body, replay_sse, sse_error
from ..download import Download
from ..errors import BadRequest, ProxyError
from ..metrics import note_model
from ..modelinfo import ModelInfo, read_model_info
from ..pool import Lease, State
from ..upstream import ollama_server as upstreams
from ..upstream.client import LlamaClient
from ..upstream.props import check_images, server_props
from ..upstream.relay import MAX_ANSWER, RelayBody, UpstreamAnswer, open_upstream, send_leased
from . import fleet
from .reply import Generated, Reply, Request, encode_headers, error_reply, json_reply, relay_answer
from .state import ProxyState

__all__ = [
    "NotSupported",
    "chat",
    "delete",
    "embed",
    "embeddings",
    "generate",
    "ps",
    "pull",
    "show",
    "tags",
    "version",
]

log = logging.getLogger(__name__)

_NDJSON_HEADERS = encode_headers(dialect.NDJSON_HEADERS)
#: How often a streamed /api/pull reports a download's progress (seconds).
_PULL_EVERY = 0.25


def _json(body: object, status: int = 200, headers: dict[str, str] | None = None) -> Reply:
    return json_reply(body, status, content_type=dialect.JSON_TYPE, headers=headers, ensure_ascii=False)


def _ndjson(body: bytes, headers: dict[str, str] | None = None) -> Reply:
    return Reply(200, _NDJSON_HEADERS + encode_headers(headers or {}), body)


class NotSupported(ProxyError):
    status = 501
    kind = "not_supported"


# ---- the request --------------------------------------------------------------------------


def _model_name(payload: dict[str, Any]) -> str:
    name = payload.get("model") or payload.get("name")  # ``name``: Ollama's older spelling
    if not isinstance(name, str) or not name:
        raise BadRequest("model is required")
    return name


def _tagged(name: str) -> str:
    """A catalog name as Ollama lists names: with a tag (``gemma`` -> ``gemma:latest``)."""
    return name if ":" in name else f"{name}:latest"


async def _info(proxy: ProxyState, model: ModelConfig) -> ModelInfo | None:
    """The model file's description, or None if it cannot be read (yet)."""
    try:
        path = await proxy.catalog.gguf_path(model)
        return await trio.to_thread.run_sync(read_model_info, path)
    except (OSError, ImportError, AttributeError, ProxyError) as exc:
        log.debug("%s: no model info: %s", model.name, exc)
        return None


async def _template(proxy: ProxyState, model: ModelConfig, info: ModelInfo | None) -> str:
    """The chat template llama-server applies: the section's ``chat_template`` file, else the GGUF's own."""
    if model.chat_template:
        path = resolve_path(model.chat_template, proxy.config.base_dir)
        try:
            return await trio.to_thread.run_sync(path.read_text)
        except (OSError, UnicodeDecodeError) as exc:
            log.debug("%s: cannot read its chat_template: %s", model.name, exc)
    return info.chat_template if info else ""


def _capabilities(
    model: ModelConfig, info: ModelInfo | None, projector: str | None = None, template: str | None = None
) -> list[str]:
    """Ollama's capabilities of ``model``.

    ``projector``: the one ``mmproj = auto`` found for it, if any; ``template``: the chat
    template it is served with, if not the GGUF's own (see :func:`_template`).
    """
    # a llama-server started with --embeddings still generates
    caps = ["completion", "embedding"] if model.embeddings else ["completion"]
    if template is None:
        template = info.chat_template if info else ""
    if "tools" in template:
        caps.append("tools")
    if any(marker in template for marker in ("enable_thinking", "<think>", "reasoning_content")):
        caps.append("thinking")
    # a projector from the model's own mmproj setting (a local file, one in its repo, or one found), or from args
    named = projector is not None if model.mmproj == AUTO_MMPROJ else bool(model.mmproj)
    if named or any(flag in model.args for flag in ("--mmproj", "-mm", "--mmproj-url", "-mmu")):
        caps.append("vision")
    return caps


async def _check_think(proxy: ProxyState, model: ModelConfig, name: str, think: object) -> None:
    """Ollama refuses ``think`` for a model whose template cannot think; so do we (when we can tell)."""
    if think in (None, False) or model.backend == "ollama":  # an upstream Ollama judges its own models
        return
    info = await _info(proxy, model)
    template = await _template(proxy, model, info)
    if info is not None and info.is_gguf and "thinking" not in _capabilities(model, info, template=template):
        raise BadRequest(f'"{name}" does not support thinking')


# ---- generation ---------------------------------------------------------------------------


async def _post(llama: LlamaClient, lease: Lease, path: str, body: dict[str, Any]) -> UpstreamAnswer:
    content = json.dumps(body, ensure_ascii=False).encode()
    return await open_upstream(
        llama,
        "POST",
        lease.base_url + path,
        content=content,
        headers={"Content-Type": "application/json"},
        lease=lease,  # the same bound on in-flight requests (and on the wait) as the OpenAI routes
    )


async def open_generation(
    proxy: ProxyState,
    name: str,
    call: dialect.Translated,
    keep_alive: float | None,
    answer: dialect.Answer,
    num_ctx: int | None = None,
) -> tuple[Lease, UpstreamAnswer]:
    """Send ``call`` to a llama-server for ``name`` with at least ``num_ctx`` of context; its answer's
    headers are in, and the lease is the caller's."""

    async def acquire() -> Lease:
        lease = await proxy.pool.acquire(name, keep_alive=keep_alive, num_ctx=num_ctx)
        answer.loaded()
        return lease

    async def send(lease: Lease) -> UpstreamAnswer:
        if call.has_images:
            await check_images(proxy.client, lease, name)
        return await _post(proxy.llama, lease, call.path, call.body)

    return await send_leased(acquire, send)


def llama_server(lease: Lease) -> str:
    """Who answered, for error messages."""
    return f"llama-server for {lease.server.name!r}"


async def _generate(
    proxy: ProxyState,
    request: Request,
    name: str,
    call: dialect.Translated,
    keep_alive: float | None,
    answer: dialect.Answer,
    headers: dict[str, str] | None = None,
    num_ctx: int | None = None,
) -> Reply:
    lease, upstream = await open_generation(proxy, name, call, keep_alive, answer, num_ctx)
    request.opened.append(upstream)
    limit = proxy.config.proxy.max_answer
    return await _answered(upstream, call, answer, llama_server(lease), lease.release, headers, limit)


async def _generate_upstream(
    proxy: ProxyState, model: ModelConfig, call: dialect.Translated, answer: dialect.Answer, headers: dict[str, str]
) -> Reply:
    """``call`` to a model of an Ollama upstream, through its OpenAI-compatible /v1 route (an agent chain's)."""
    answer.loaded()  # nothing to load here; the upstream's own load counts as prompt time
    upstream = await upstreams.send(proxy.client, model, "POST", call.path, payload=call.body)
    who = f"the Ollama upstream of model {model.name!r}"
    return await _answered(upstream, call, answer, who, None, headers, proxy.config.proxy.max_answer)


async def _answered(
    upstream: UpstreamAnswer,
    call: dialect.Translated,
    answer: dialect.Answer,
    who: str,
    on_done: Callable[[], object] | None,
    headers: dict[str, str] | None,
    limit: int,
) -> Reply:
    """An OpenAI answer (``who``'s) in Ollama's shape: one object, or NDJSON as it streams (``limit``: max_answer)."""
    if not streams(upstream, call):
        body = await answer_body(upstream, answer, who, on_done, limit)
        return Reply(200, encode_headers({"content-type": dialect.JSON_TYPE, **(headers or {})}), body)
    # one write per burst of events, not one per line (see smart_proxy.upstream.relay)
    translation = dialect.NDJSONStream(answer, limit)
    stream = RelayBody(upstream, on_error=sse_error, on_done=on_done, translation=translation)
    return Reply(200, _NDJSON_HEADERS + encode_headers(headers or {}), stream=stream)


def streams(upstream: UpstreamAnswer, call: dialect.Translated) -> bool:
    """Whether the answer is relayed as NDJSON as it streams (asked for, and not an upstream error)."""
    return call.stream and upstream.status_code == 200


async def answer_body(
    upstream: UpstreamAnswer,
    answer: dialect.Answer,
    who: str,
    on_done: Callable[[], object] | None,
    limit: int = MAX_ANSWER,
) -> bytes:
    """A whole OpenAI answer (at most ``limit`` bytes) read and translated to Ollama's JSON object; ``on_done`` once it is read.

    Raises:
        ProxyError: the upstream answered an error (its status kept), or something that is not JSON,
            or broke off, or more than ``limit`` bytes.
    """
    try:
        body = await upstream.read(limit)
    finally:
        if on_done is not None:
            on_done()
    if upstream.status_code != 200:
        raise dialect.upstream_failure(upstream.status_code, body, who)
    try:
        reply = answer.complete(json.loads(body))
    except ValueError as exc:
        raise dialect.upstream_failure(502, body, f"{who} answered something that is not JSON") from exc
    return json.dumps(reply, ensure_ascii=False).encode()


async def _load_or_unload(
    proxy: ProxyState, name: str, keep_alive: float | None, answer: dialect.Answer, num_ctx: int | None = None
) -> Reply:
    """An empty request: load the model (``load``, with at least ``num_ctx`` of context), or with
    keep_alive 0 unload it (``unload``)."""
    if keep_alive == 0:
        await _unload(proxy, name)
        return _json(answer.load_only("unload"))
    lease = await proxy.pool.acquire(name, keep_alive=keep_alive, num_ctx=num_ctx)
    lease.release()
    return _json(answer.load_only("load"))


async def _unload(proxy: ProxyState, name: str) -> None:
    """Unload ``name`` without loading it: idle servers stop now, busy ones when their requests end."""
    pool = proxy.pool
    model = proxy.catalog.get(name)
    if any(s.state in (State.STARTING, State.READY) for s in pool.servers(model.name)):
        lease = await pool.acquire(model.name, keep_alive=0)  # marks it: stop once idle
        lease.release()
    await pool.unload(model.name)
    for server in pool.servers(model.name):
        if server.state is State.STOPPING:
            await server.gone.wait()


@attrs.frozen
class Asked:
    """What every model route reads first: the body, its model, and when it came."""

    started: float
    payload: dict[str, Any]
    raw: bytes
    name: str
    proxy: ProxyState
    model: ModelConfig

    @classmethod
    def parse(cls, proxy: ProxyState, request: Request, payload: dict[str, Any] | None = None) -> Asked:
        """The request, its body checked (unless ``payload`` is the body, read already) and its model found in the catalog."""
        raw, started = request.body, request.started
        if payload is None:
            payload = parse_body(raw or b"{}")
        name = _model_name(payload)
        model = proxy.catalog.get(name)
        note_model(model.name)
        return cls(started, payload, raw, name, proxy, model)

    async def to_upstream(self, path: str, method: str = "POST") -> Reply:
        """Send the request untouched to the Ollama upstream that serves its model, at ``path``."""
        proxy = self.proxy
        upstream = await upstreams.send(proxy.client, self.model, method, path, payload=self.payload, raw=self.raw)
        return await relay_answer(upstream, proxy.config.proxy.max_answer)


async def _routed(
    proxy: ProxyState,
    request: Request,
    here: Callable[[ProxyState, Request, dict[str, Any]], Awaitable[Reply]],
    *,
    translatable: bool = False,
) -> Reply:
    """The request served here (``here(proxy, request, payload)``) or on a peer that has its model
    (:func:`smart_proxy.handlers.fleet.serve`); ``translatable``: a chat or generate, which an
    OpenAI peer takes translated to its ``/v1`` route."""
    payload = parse_body(request.body or b"{}")
    translate = (lambda remote: _for_openai_peer(proxy, request, payload, remote)) if translatable else None
    return await fleet.serve(proxy, request, _model_name(payload), lambda: here(proxy, request, payload), None, translate)


def _for_openai_peer(proxy: ProxyState, request: Request, payload: dict[str, Any], remote: str) -> fleet.Translated | None:
    """``/api/chat`` or ``/api/generate`` translated for an OpenAI peer's model ``remote``, as for a local llama-server.

    None for an empty request (a load or unload: nothing an OpenAI server can be asked).
    """
    chat = request.path == "/api/chat"
    if (not payload.get("messages")) if chat else not (payload.get("prompt") or payload.get("images")):
        return None
    call = (dialect.chat_request if chat else dialect.generate_request)(payload, remote)
    answer = dialect.Answer(_model_name(payload), chat=chat, started=request.started)
    limit = proxy.config.proxy.max_answer

    async def relay(upstream: UpstreamAnswer, on_done: Callable[[], object]) -> Reply:
        answer.loaded()  # the peer's own load, if any, counts as prompt time
        return await _answered(upstream, call, answer, f"the peer serving {remote!r}", on_done, None, limit)

    return fleet.Translated(call.path, json.dumps(call.body, ensure_ascii=False).encode(), relay)


async def chat(proxy: ProxyState, request: Request) -> Reply:
    """``POST /api/chat``."""
    return await _routed(proxy, request, _complete, translatable=True)


async def generate(proxy: ProxyState, request: Request) -> Reply:
    """``POST /api/generate``."""
    return await _routed(proxy, request, _complete, translatable=True)


@attrs.frozen
class Generation:
    """A ``/api/chat`` or ``/api/generate`` for the pool, translated (see :func:`plan_generation`)."""

    keep_alive: float | None
    answer: dialect.Answer
    #: The request for llama-server, or None for an empty request (load, or unload).
    call: dialect.Translated | None
    #: The agents the request's leading slash commands switch on, or None.
    chain: Chain | None
    #: The context the request needs (``options.num_ctx``), or None.
    num_ctx: int | None = None

    @property
    def relayed(self) -> bool:
        """A generation sent to a llama-server as translated (not a load, no agents)."""
        return self.call is not None and self.chain is None


def plan_generation(asked: Asked, path: str) -> Generation | None:
    """What ``/api/chat`` or ``/api/generate`` (``path``) asks of the pool, or None for an Ollama upstream's route.

    None: the model is an Ollama upstream's and no agent command is asked for, so the
    request goes to that Ollama's own route untouched.

    Raises:
        BadRequest: a keep_alive or a body the translation cannot read.
    """
    chat = path == "/api/chat"
    payload, model = asked.payload, asked.model
    if model.backend == "ollama" and asked.proxy.agents.activate(payload, "chat" if chat else "completion") is None:
        return None  # no agent command (read from the Ollama body as from the OpenAI one)
    keep_alive = dialect.parse_keep_alive(payload.get("keep_alive"))
    num_ctx = dialect.requested_context(payload)
    answer = dialect.Answer(asked.name, chat=chat, started=asked.started)
    empty = not payload.get("messages") if chat else not (payload.get("prompt") or payload.get("images"))
    if empty:
        return Generation(keep_alive, answer, None, None, num_ctx)
    call = (dialect.chat_request if chat else dialect.generate_request)(payload, model.name)
    return Generation(keep_alive, answer, call, asked.proxy.agents.activate(call.body, call.kind), num_ctx)


async def _complete(proxy: ProxyState, request: Request, payload: dict[str, Any]) -> Reply:
    """``/api/chat`` or ``/api/generate`` served here: translated to llama-server's OpenAI routes."""
    asked = Asked.parse(proxy, request, payload)
    payload, name, model = asked.payload, asked.name, asked.model
    generation = plan_generation(asked, request.path)
    if generation is None:
        return await asked.to_upstream(request.path)
    keep_alive, answer, call, chain = generation.keep_alive, generation.answer, generation.call, generation.chain
    if call is None:
        return await _load_or_unload(proxy, name, keep_alive, answer, generation.num_ctx)
    await _check_think(proxy, model, name, payload.get("think"))
    if chain is not None:
        return await _generate_with_agents(proxy, request, asked, call, keep_alive, answer, chain)
    return await _generate(proxy, request, name, call, keep_alive, answer, num_ctx=generation.num_ctx)


# ---- agents: a chat or generate that starts with /commands ---------------------------------


async def _generate_with_agents(
    proxy: ProxyState,
    request: Request,
    asked: Asked,
    call: dialect.Translated,
    keep_alive: float | None,
    answer: dialect.Answer,
    chain: Chain,
) -> Reply:
    """Run the chain over ``call``'s OpenAI body, and answer in Ollama's shape.

    A live chain's rewritten body goes upstream the ordinary way (:func:`_generate`),
    to the model the request hooks chose (an Ollama upstream's: :func:`_generate_upstream`).
    A buffered chain's final OpenAI answer is
    translated like llama-server's; for a stream it is replayed as the SSE a live
    answer would have been (:func:`~smart_proxy.dialects.openai.replay_sse`) and that is
    translated into NDJSON, line by line, by the same code as a live stream.
    The answer names the model the client asked for, unless an agent sent the
    request to another one; then it names that one. Every answer carries the
    chain's failures (``ctx.headers()``), an error answer too.
    """
    name, model, payload = asked.name, asked.model, asked.payload
    ctx = await chain.prepare(
        proxy.pool, proxy.llama, logs.request_id.get(), keep_alive=keep_alive,
        catalog=proxy.catalog, client=proxy.client, fleet=proxy.fleet,
    )
    try:
        if chain.live:
            target, target_model = name, model
            if proxy.catalog.find(ctx.model) is not model:  # a request hook chose another model
                target_model = proxy.catalog.get(ctx.model)
                await _check_think(proxy, target_model, ctx.model, payload.get("think"))
                target = answer.model = ctx.model
            rewritten = attrs.evolve(call, body=ctx.payload)
            if target_model.backend == "ollama":
                return await _generate_upstream(proxy, target_model, rewritten, answer, ctx.headers())
            return await _generate(proxy, request, target, rewritten, keep_alive, answer, headers=ctx.headers())
        response = await chain.respond(ctx)
        answered = response.get("model")
        if isinstance(answered, str) and proxy.catalog.find(answered) not in (None, model):
            answer.model = answered
        extras = answer.extras(response)
        if not ctx.stream:
            reply = answer.complete(response)
            reply.update({key: value for key, value in extras.items() if key not in reply})
            return _json(reply, headers=ctx.headers())
        first = {**response, "choices": (response.get("choices") or [])[:1]}  # Ollama has no n
        objects = [obj for event in dialect.SSEParser().feed(replay_sse(first, ctx.kind)) for obj in answer.feed(event)]
        objects += answer.final()
        objects[-1].update({key: value for key, value in extras.items() if key not in objects[-1]})
        body = b"".join(dialect.ndjson(obj) for obj in objects)
        return _ndjson(body, ctx.headers())
    except ProxyError as exc:
        if not ctx.failures:
            raise
        return error_reply(exc, request.path, ctx.headers())


# ---- embeddings ---------------------------------------------------------------------------


def _check_embeds(model: ModelConfig, name: str) -> None:
    if not model.embeddings:
        raise BadRequest(f'"{name}" does not support embeddings (set embeddings = true in [model:{model.name}])')


async def _embed(
    proxy: ProxyState,
    model: ModelConfig,
    name: str,
    inputs: list[str],
    keep_alive: float | None,
    num_ctx: int | None = None,
) -> tuple[dict[str, Any], float]:
    """(llama-server's ``/v1/embeddings`` answer, seconds spent getting the model loaded)."""
    _check_embeds(model, name)
    body = dialect.embed_request(inputs, model.name)
    before = time.perf_counter()
    load = 0.0

    async def acquire() -> Lease:
        nonlocal load
        lease = await proxy.pool.acquire(name, keep_alive=keep_alive, num_ctx=num_ctx)
        load = time.perf_counter() - before
        return lease

    async def send(lease: Lease) -> UpstreamAnswer:
        return await _post(proxy.llama, lease, "/v1/embeddings", body)

    lease, upstream = await send_leased(acquire, send)
    try:
        raw = await upstream.read(proxy.config.proxy.max_answer)
    finally:
        lease.release()
    if upstream.status_code != 200:
        error = dialect.upstream_failure(upstream.status_code, raw, f"llama-server for {model.name!r}")
        if "pooling type 'none'" in error.message.lower():  # a GGUF with no pooling type of its own
            error.message += f" (add --pooling mean to args in [model:{model.name}])"
        raise error
    try:
        return json.loads(raw), load
    except ValueError as exc:
        raise dialect.upstream_failure(502, raw, "llama-server answered something that is not JSON") from exc


async def embed(proxy: ProxyState, request: Request) -> Reply:
    """``POST /api/embed``."""
    return await _routed(proxy, request, _embed_here)


async def _embed_here(proxy: ProxyState, request: Request, payload: dict[str, Any]) -> Reply:
    asked = Asked.parse(proxy, request, payload)
    started, payload, name, model = asked.started, asked.payload, asked.name, asked.model
    if model.backend == "ollama":
        return await asked.to_upstream("/api/embed")
    keep_alive = dialect.parse_keep_alive(payload.get("keep_alive"))
    num_ctx = dialect.requested_context(payload)
    inputs = payload.get("input")
    if isinstance(inputs, str):
        inputs = [inputs] if inputs else []
    if inputs is None:
        inputs = []
    if not isinstance(inputs, list):
        raise BadRequest("input must be a string or a list of strings")
    if not inputs:  # Ollama loads the model and answers no embeddings
        _check_embeds(model, name)
        await _load_or_unload(proxy, name, keep_alive, dialect.Answer(name, chat=False, started=started), num_ctx)
        return _json({"model": name, "embeddings": []})
    body, load = await _embed(proxy, model, name, inputs, keep_alive, num_ctx)
    vectors, tokens = dialect.embeddings_from(body, payload.get("dimensions"))
    return _json(
        {
            "model": name,
            "embeddings": vectors,
            "total_duration": int((time.perf_counter() - started) * dialect.NS_PER_S),
            "load_duration": int(load * dialect.NS_PER_S),
            "prompt_eval_count": tokens,
        }
    )


async def embeddings(proxy: ProxyState, request: Request) -> Reply:
    """The legacy single-prompt route: ``{"prompt"}`` -> ``{"embedding": [...]}``."""
    return await _routed(proxy, request, _embeddings_here)


async def _embeddings_here(proxy: ProxyState, request: Request, payload: dict[str, Any]) -> Reply:
    asked = Asked.parse(proxy, request, payload)
    started, payload, name, model = asked.started, asked.payload, asked.name, asked.model
    if model.backend == "ollama":
        return await asked.to_upstream("/api/embeddings")
    keep_alive = dialect.parse_keep_alive(payload.get("keep_alive"))
    num_ctx = dialect.requested_context(payload)
    prompt = payload.get("prompt") or ""
    if not isinstance(prompt, str):
        raise BadRequest("prompt must be a string")
    if not prompt:
        _check_embeds(model, name)
        await _load_or_unload(proxy, name, keep_alive, dialect.Answer(name, chat=False, started=started), num_ctx)
        return _json({"embedding": []})
    body, _load = await _embed(proxy, model, name, [prompt], keep_alive, num_ctx)
    vectors, _tokens = dialect.embeddings_from(body)
    return _json({"embedding": vectors[0] if vectors else []})


# ---- models -------------------------------------------------------------------------------


def root() -> Reply:
    """``GET /``: Ollama clients probe it (GET or HEAD) to see whether the server is up."""
    return Reply(200, [(b"content-type", b"text/plain; charset=utf-8")], b"Ollama is running")


def version() -> Reply:
    """``GET /api/version``: the Ollama version this proxy's API follows, and its own."""
    try:
        ours = package_version("smart-proxy")
    except PackageNotFoundError:
        ours = "dev"
    return _json({"version": dialect.OLLAMA_VERSION, "smart_proxy": ours})


def _local_entry(name: str, info: ModelInfo | None) -> dict[str, Any]:
    tagged = _tagged(name)
    entry: dict[str, Any] = {"name": tagged, "model": tagged}
    if info is not None:
        entry.update(modified_at=info.modified_at, size=info.size, digest=info.digest, details=info.details())
    else:
        entry.update(size=0, digest="", details={"format": "gguf", "family": "", "families": None})
    return entry


def _upstream_entry(model: ModelConfig, remote: dict[str, Any] | None) -> dict[str, Any]:
    tagged = _tagged(model.name)
    entry = dict(remote or {"size": 0, "digest": "", "details": {}})
    entry.update(name=tagged, model=tagged)
    return entry


async def tags(proxy: ProxyState) -> Reply:
    """``GET /api/tags``: every catalog model, local ones described from their GGUF, upstream ones as their Ollama lists them."""
    catalog = list(proxy.catalog)
    remote = await upstreams.list_models(proxy.client, catalog, "/api/tags")
    listed = []
    for model in catalog:
        if model.backend == "ollama":
            listed.append(_upstream_entry(model, remote.get(model.name)))
        else:
            listed.append(_local_entry(model.name, await _info(proxy, model)))
    if proxy.fleet:
        for entry in listed:
            entry["served_by"] = fleet.served_by(proxy, entry["name"], local=True)
        listed.extend(fleet.tag_entries(proxy))
    return _json({"models": listed})


async def ps(proxy: ProxyState) -> Reply:
    """``GET /api/ps``: loaded models, ready llama-servers (with when they will be stopped and the memory they
    hold, ``size``), and upstream ones loaded there."""
    now = time.time()
    newest: dict[str, tuple[float, int]] = {}
    for snap in proxy.pool.snapshot().servers:
        if snap.state != State.READY.value:
            continue
        if snap.in_flight == 0 and snap.waiting == 0 and snap.expires_at is not None and snap.expires_at <= now:
            continue  # about to be stopped (keep_alive 0, or expired)
        expires = snap.expires_at if snap.expires_at is not None else float("inf")
        if snap.model not in newest or expires > newest[snap.model][0]:
            newest[snap.model] = (expires, snap.port)
    servers = {server.port: server for server in proxy.pool.servers()}
    listed = []
    for name, (expires, port) in newest.items():
        model = proxy.catalog.get(name)
        entry = _local_entry(name, await _info(proxy, model))
        # whatever a request's keep_alive left there (NaN, a year past 9999), this list must still be answered
        forever = not math.isfinite(expires) or expires - now > dialect.MAX_KEEP_ALIVE
        entry["expires_at"] = dialect.far_future() if forever else dialect.iso_time(expires)
        entry["size_vram"] = 0
        server = servers.get(port)
        if server is not None:
            # in /api/ps, Ollama's size is the memory the loaded model holds, size_vram the part on GPUs
            entry["size"] = server.memory + server.vram
            entry["size_vram"] = server.vram
            n_ctx = ((await server_props(proxy.client, server)).get("default_generation_settings") or {}).get("n_ctx")
            if isinstance(n_ctx, int):
                entry["context_length"] = n_ctx
        listed.append(entry)
    upstream_models = [m for m in proxy.catalog if m.backend == "ollama"]
    remote = await upstreams.list_models(proxy.client, upstream_models, "/api/ps")
    for model in upstream_models:
        if model.name in remote:
            listed.append(_upstream_entry(model, remote[model.name]))
    if proxy.fleet:
        listed.extend(fleet.tag_entries(proxy, loaded=True))
    return _json({"models": listed})


def _modelfile(model: ModelConfig, info: ModelInfo | None, projector: str | None = None) -> str:
    """A modelfile-like summary of the model's proxy.ini section (Ollama's show has one)."""
    lines = [f"# {model.name}: served by smart-proxy from proxy.ini [model:{model.name}]"]
    lines.append(f"FROM {info.path if info else model.path}")
    if model.args:
        lines.append("# llama-server args: " + " ".join(model.args))
    if model.mmproj == AUTO_MMPROJ:
        lines.append(f"# projector (--mmproj): auto, {projector or 'none found beside the model'}")
    elif model.mmproj:
        lines.append(f"# projector (--mmproj): {model.mmproj}")
    if model.chat_template:
        lines.append(f"# chat template (--jinja --chat-template-file): {model.chat_template}")
    if model.embeddings:
        lines.append("# llama-server --embeddings")
    return "\n".join(lines) + "\n"


async def show(proxy: ProxyState, request: Request) -> Reply:
    """``POST /api/show``: what the model is (from its GGUF) and how it is served (a peer's: as it says)."""
    return await _routed(proxy, request, _show_here)


async def _show_here(proxy: ProxyState, request: Request, payload: dict[str, Any]) -> Reply:
    asked = Asked.parse(proxy, request, payload)
    model = asked.model
    if model.backend == "ollama":
        return await asked.to_upstream("/api/show")
    info = await _info(proxy, model)
    projector = await proxy.catalog.projector(model) if model.mmproj == AUTO_MMPROJ else None
    template = await _template(proxy, model, info)
    body: dict[str, Any] = {
        "modelfile": _modelfile(model, info, projector),
        "parameters": "",
        "template": template,
        "details": _local_entry(model.name, info)["details"],
        "model_info": dict(info.metadata) if info else {},
        "capabilities": _capabilities(model, info, projector, template),
    }
    if info is not None:
        body["modified_at"] = info.modified_at
    return _json(body)


async def pull(proxy: ProxyState, request: Request) -> Reply:
    """``POST /api/pull``: make a model ready to load: an upstream's Ollama server pulls it; a Hugging Face
    model is downloaded into the HF cache, with Ollama's progress objects; a local file is already here."""
    raw = request.body
    payload = parse_body(raw or b"{}")
    model = proxy.catalog.get(_model_name(payload))
    if model.backend == "ollama":
        upstream = await upstreams.send(proxy.client, model, "POST", "/api/pull", payload=payload, raw=raw)
        return await relay_answer(upstream, MAX_ANSWER)
    stream = payload.get("stream", True) is not False
    if model.repo is None:
        if not stream:
            return _json({"status": "success"})
        return _ndjson(dialect.ndjson({"status": "success"}))
    download = proxy.catalog.start_download(model)
    if not stream:
        await download.wait()
        return _json({"status": "success"})
    return Reply(200, _NDJSON_HEADERS, stream=Generated(_pull_stream(download)))


async def _pull_stream(download: Download) -> AsyncIterator[bytes]:
    """The download's progress every ``_PULL_EVERY`` seconds while it runs, then success or the error.

    The client counts among the download's waiters while it watches; leaving stops the
    watching, never the download (see :mod:`smart_proxy.download`).
    """
    report = dialect.PullReport()
    yield dialect.ndjson(report.FIRST)
    with download.waiting():
        while True:
            finished = download.done.is_set()
            for obj in report.update(download.status()):
                yield dialect.ndjson(obj)
            if finished:
                break
            with trio.move_on_after(_PULL_EVERY):
                await download.done.wait()
    if download.error is not None:
        yield dialect.ndjson({"error": download.error.message})
        return
    for obj in report.LAST:
        yield dialect.ndjson(obj)


async def delete(proxy: ProxyState, request: Request) -> Reply:
    """``DELETE /api/delete``: only for an Ollama upstream's models; the catalog's own are proxy.ini's."""
    asked = Asked.parse(proxy, request)
    model = asked.model
    if model.backend == "ollama":
        return await asked.to_upstream("/api/delete", "DELETE")
    raise BadRequest(f"{asked.name!r} is configured in proxy.ini; remove its [model:{model.name}] section to delete it")
