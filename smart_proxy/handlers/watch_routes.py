"""Routes that watch the proxy live: ``GET /events`` and ``GET /logs/MODEL``.

Theory of operation: :func:`events` answers a Server-Sent Events stream (its event kinds and
fields are in docs/events.md). It subscribes to the proxy's
:class:`~smart_proxy.eventbus.EventBus` in the same step as it takes the ``snapshot``
(no checkpoint between), so a client that connects late gets the current state first and
then every change after it, none missed and none twice. Queue depths are not events on the
bus (they change with every request): each stream compares them every :data:`_TICK`
seconds and sends a ``queue`` event when they changed. A subscriber that falls behind
(its buffer, ``eventbus.DEFAULT_LIMIT`` events, is full) is not waited for: its buffer is
dropped, and it gets a ``lost`` event with the count followed by a fresh ``snapshot``.
A quiet stream gets a comment line every ``[proxy] heartbeat`` seconds, so proxies in
front do not close it. A stream ends when the proxy starts draining.

:func:`logs` answers the last ``[pool] log_lines`` lines a model's llama-servers printed:
plain text, or JSON (``?format=json``); with ``?follow=1``, an SSE stream of ``line``
events (the kept lines first, then new ones as they come), with the same heartbeat and
``lost`` handling.

Both generators yield outside every cancel scope (PEP 789): a wait with a timeout is
closed before the yield.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

import attrs
import trio

from ..errors import BadRequest, ModelNotFound
from ..eventbus import Event, LineLog, Lost, Subscription
from .reply import Generated, Reply, encode_headers, json_reply
from .state import ProxyState

__all__ = ["events", "logs", "snapshot", "sse"]

#: Seconds between looks at the queue depths and the proxy's phase on an open stream.
_TICK = 0.5
_SSE_HEADERS = {
    "content-type": "text/event-stream; charset=utf-8",
    "cache-control": "no-cache",
    "x-accel-buffering": "no",  # nginx: pass each event on at once
}
_TRUE = ("1", "true", "yes")
_FALSE = ("0", "false", "no", "")


def sse(kind: str, data: object, event_id: int | None = None) -> bytes:
    """One SSE message: ``id:`` (if any), ``event:`` and one ``data:`` line of JSON."""
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {kind}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def _now() -> float:
    return round(time.time(), 3)


def _event_message(event: Event) -> bytes:
    return sse(event.kind, {"time": round(event.time, 3), **event.data}, event.id)


def snapshot(proxy: ProxyState) -> dict[str, Any]:
    """The state a late subscriber starts from (the ``snapshot`` event's data)."""
    pool = proxy.pool.snapshot()
    depths = proxy.pool.queue_depths()
    models = []
    for model in proxy.catalog:
        servers = [attrs.asdict(s) for s in pool.servers if s.model == model.name]
        entry: dict[str, Any] = {
            "model": model.name,
            "backend": model.backend,
            "pinned": model.pin,
            "queued": depths.get(model.name, 0),
            "servers": servers,
        }
        if model.backend == "llama":
            status = proxy.pool.model_status(model)
            entry["status"] = status.value
            entry["state"] = status.state
            if status.download is not None:
                entry["download"] = _download(status.download)
            if status.loading_for is not None:
                entry["loading_for"] = status.loading_for
            if status.error is not None:
                entry["error"] = status.error
        else:
            entry["status"] = "upstream"
        models.append(entry)
    return {
        "time": _now(),
        "phase": proxy.lifecycle.phase.value,
        "role": proxy.config.role,
        "pool": {
            "capacity": pool.capacity,
            "queued": pool.queued,
            "memory_budget": pool.memory_budget,
            "memory_used": pool.memory_used,
            "gpus": [attrs.asdict(gpu) for gpu in pool.gpus],
        },
        "models": models,
        "queues": depths,
        "upstreams": proxy.upstreams.report,
        "peers": proxy.fleet.report() if proxy.fleet else [],
    }


def _download(download: Any) -> dict[str, Any]:
    total = download.bytes_total
    return {
        "state": download.state,
        "bytes_done": download.bytes_done,
        "bytes_total": total,
        "percent": round(100 * download.bytes_done / total, 1) if total else None,
    }


async def events(proxy: ProxyState) -> Reply:
    """``GET /events``: the snapshot, then every change, as SSE; see the module docstring."""
    return Reply(200, encode_headers(_SSE_HEADERS), stream=Generated(_event_stream(proxy)))


async def _event_stream(proxy: ProxyState) -> AsyncIterator[bytes]:
    heartbeat = proxy.config.proxy.heartbeat
    with proxy.bus.subscribe() as subscription:
        depths = proxy.pool.queue_depths()  # with the snapshot, before any checkpoint
        yield sse("snapshot", snapshot(proxy))
        beat = _Heartbeat(heartbeat)
        while proxy.lifecycle.accepting:
            found, lost = await _next(subscription)
            out = []
            if lost:
                depths = proxy.pool.queue_depths()
                out += [sse("lost", {"time": _now(), "count": lost}), sse("snapshot", snapshot(proxy))]
            out += [_event_message(event) for event in found]
            now_depths = proxy.pool.queue_depths()
            if now_depths != depths:
                depths = now_depths
                out.append(sse("queue", {"time": _now(), "depths": depths}))
            piece = beat.after(out)
            if piece:
                yield piece


class _Heartbeat:
    """A quiet stream's comment line, due ``every`` seconds after the last thing it sent."""

    def __init__(self, every: float) -> None:
        self._every = every
        self._since = trio.current_time()

    def after(self, out: list[bytes]) -> bytes:
        """What to send after a tick that found ``out``: it joined, a heartbeat when due, else nothing."""
        now = trio.current_time()
        if out:
            self._since = now
            return b"".join(out)
        if now - self._since >= self._every:
            self._since = now
            return b": heartbeat\n\n"
        return b""


async def _next(subscription: Subscription[Any]) -> tuple[list[Any], int]:
    """What the subscription has within a tick: (items, 0), ([], lost count), or ([], 0)."""
    with trio.move_on_after(_TICK):
        try:
            return await subscription.get(), 0
        except Lost as exc:
            return [], exc.count
    return [], 0


def _flag(query: Mapping[str, str], name: str) -> bool:
    value = query.get(name, "").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise BadRequest(f"?{name}= must be 1 or 0 (true or false), not {value[:20]!r}")


async def logs(proxy: ProxyState, name: str, query: Mapping[str, str]) -> Reply:
    """``GET /logs/MODEL``: the model's last llama-server lines; see the module docstring.

    Raises:
        ModelNotFound: no model of that name, or one served by an Ollama upstream or a peer (the message says where).
        BadRequest: ``format`` is not text or json, or ``follow`` not a boolean.
    """
    fmt = query.get("format", "text").strip().lower() or "text"
    if fmt not in ("text", "json"):
        raise BadRequest(f"?format= must be text or json, not {fmt[:20]!r}")
    follow = _flag(query, "follow")
    output = proxy.pool.output(name)
    if output is None:
        model = proxy.catalog.find(name)
        holders = proxy.fleet.holders(name) if model is None and proxy.fleet else []
        if holders:
            where = ", ".join(f"{peer.name!r} ({peer.base_url}/logs/{found.name})" for peer, found in holders)
            raise ModelNotFound(f"model {name!r} is served by peers: its logs are theirs: {where}")
        if model is None:
            known = ", ".join(m.name for m in list(proxy.catalog)[:8]) or "none configured"
            raise ModelNotFound(f"model {name!r} not found; known models: {known}")
        if model.backend != "llama":
            raise ModelNotFound(f"model {name!r} is served by an Ollama upstream: its logs are that server's")
        output = proxy.pool.output(model.name, create=True)
    assert output is not None
    if follow:
        return Reply(200, encode_headers(_SSE_HEADERS), stream=Generated(_follow(proxy, output)))
    lines = output.lines()
    if fmt == "json":
        return json_reply({"model": name, "lines": [attrs.asdict(line) for line in lines]}, ensure_ascii=False)
    text = "".join(line.text + "\n" for line in lines).encode()
    return Reply(200, encode_headers({"content-type": "text/plain; charset=utf-8"}), text)


async def _follow(proxy: ProxyState, output: LineLog) -> AsyncIterator[bytes]:
    heartbeat = proxy.config.proxy.heartbeat
    with output.follow() as (kept, subscription):
        yield b"".join(sse("line", attrs.asdict(line)) for line in kept) or b": following\n\n"
        beat = _Heartbeat(heartbeat)
        while proxy.lifecycle.accepting:
            found, lost = await _next(subscription)
            out = [sse("lost", {"time": _now(), "count": lost})] if lost else []
            out += [sse("line", attrs.asdict(line)) for line in found]
            piece = beat.after(out)
            if piece:
                yield piece
