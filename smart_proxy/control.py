"""``smart-proxy ps``, ``stop`` and ``logs``: a running proxy, looked at and driven through its HTTP API.

Theory of operation: these commands never read proxy.ini nor touch the pool; they are
clients of a proxy at ``--url`` (default ``http://127.0.0.1:8080``), with ``--api-key`` (or
``SMART_PROXY_API_KEY``) when it has keys:

* ``ps`` reads the first event of ``GET /events``, the ``snapshot`` (docs/events.md), and
  closes the stream: the models with a llama-server (starting, ready, stopping) or a
  download, with their memory, slots in use and when an idle one will be stopped.
* ``stop MODEL`` asks for Ollama's unload (``POST /api/generate`` with ``keep_alive: 0``),
  which stops the model's idle servers and answers once they have exited; then it looks
  again. A pinned model (``pin = true``) refuses unloads: its server stays, and ``stop``
  says so and exits 1. So does a model whose server is busy with requests (only idle
  servers are stopped; run ``stop`` again when they are done).
* ``logs MODEL`` prints ``GET /logs/MODEL``; with ``-f``, follows ``?follow=1`` (SSE
  ``line`` events) until Ctrl-C.

A proxy that does not answer, a missing or wrong key, and an unknown model are one line on
stderr and exit status 1.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx

__all__ = ["DEFAULT_URL", "ControlError", "logs", "ps", "stop"]

DEFAULT_URL = "http://127.0.0.1:8080"
_TIMEOUT = httpx.Timeout(10.0, read=None)
#: How long ``stop`` waits for the proxy's answer (it answers once the servers have exited).
_STOP_TIMEOUT = 60.0


class ControlError(Exception):
    """Something the user must be told in one line (exit status 1)."""


def _client(url: str, api_key: str | None) -> httpx.Client:
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    return httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=_TIMEOUT, trust_env=False)


def _check(response: httpx.Response, url: str) -> None:
    if response.status_code < 400:
        return
    response.read()
    try:
        body = response.json()
        error = body.get("error")
        message = error.get("message") if isinstance(error, dict) else error
    except (ValueError, AttributeError):
        message = None
    message = message or response.text[:200] or f"HTTP {response.status_code}"
    if response.status_code == 401:
        raise ControlError(f"{url}: {message} (give --api-key, or set SMART_PROXY_API_KEY)")
    raise ControlError(f"{url}: {message}")


def _connect_error(url: str, exc: httpx.HTTPError) -> ControlError:
    return ControlError(
        f"no smart-proxy answers at {url} ({exc}); is it running? Start it with `smart-proxy`, or give --url"
    )


def _events(client: httpx.Client, url: str) -> Iterator[tuple[str, Any]]:
    """The events of ``GET /events`` as (kind, data), as long as the caller reads."""
    with client.stream("GET", "/events") as response:
        _check(response, url)
        kind, data = "message", []
        for line in response.iter_lines():
            if line.startswith("event:"):
                kind = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].strip())
            elif line == "" and data:
                yield kind, json.loads("\n".join(data))
                kind, data = "message", []


def snapshot(url: str, api_key: str | None) -> dict[str, Any]:
    """The proxy's state now: the ``snapshot`` that starts ``GET /events``.

    Raises:
        ControlError: no proxy answers, it refuses the key, or it sent no snapshot.
    """
    try:
        with _client(url, api_key) as client:
            for kind, data in _events(client, url):
                if kind == "snapshot":
                    return data
    except httpx.HTTPError as exc:
        raise _connect_error(url, exc) from None
    raise ControlError(f"{url}: /events ended before its snapshot; is this a smart-proxy?")


def _until(expires_at: float | None, pinned: bool, now: float) -> str:
    if pinned:
        return "pinned"
    if expires_at is None:
        return "forever"
    seconds = max(0, round(expires_at - now))
    if seconds < 120:
        return f"{seconds} seconds from now"
    if seconds < 2 * 3600:
        return f"{seconds // 60} minutes from now"
    return f"{seconds // 3600} hours from now"


def _size(size: int | None) -> str:
    if not size:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024  # type: ignore[assignment]
    raise AssertionError("unreachable")


def _processor(row: dict[str, Any]) -> str:
    """Where a server's memory is, as ``ollama ps`` says it: ``100% GPU 0``, ``30%/70% CPU/GPU 0,1``, ``100% CPU``."""
    vram, total = row["vram"], (row["memory"] or 0) + row["vram"]
    if not vram or not total:
        return "100% CPU"
    on = ",".join(str(index) for index in row["gpus"])
    gpu = round(100 * vram / total)
    return f"100% GPU {on}" if gpu == 100 else f"{100 - gpu}%/{gpu}% CPU/GPU {on}"


def ps_rows(state: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per live llama-server, and per model downloading, from a ``snapshot``."""
    rows = []
    for model in state["models"]:
        for server in model["servers"]:
            rows.append(
                {
                    "name": model["model"],
                    "state": server["state"],
                    "memory": server["memory"],
                    "vram": server.get("vram", 0),
                    "gpus": server.get("gpus", []),
                    "in_flight": server["in_flight"],
                    "slots": server["slots"],
                    "waiting": model["queued"],
                    "pinned": server["pinned"],
                    "expires_at": server["expires_at"],
                    "pid": server["pid"],
                    "port": server["port"],
                }
            )
        download = model.get("download")
        if download is not None and not model["servers"]:
            percent = download["percent"]
            rows.append(
                {
                    "name": model["model"],
                    "state": "downloading" + (f" {percent:.0f}%" if percent is not None else ""),
                    "memory": None,
                    "vram": 0,
                    "gpus": [],
                    "in_flight": 0,
                    "slots": 0,
                    "waiting": model["queued"],
                    "pinned": model["pinned"],
                    "expires_at": None,
                    "pid": None,
                    "port": None,
                }
            )
    return rows


def ps(url: str, api_key: str | None, *, as_json: bool = False) -> int:
    """Print the running proxy's llama-servers, like ``ollama ps``."""
    rows = ps_rows(snapshot(url, api_key))
    if as_json:
        print(json.dumps(rows, indent=2))
        return 0
    now = time.time()
    gpus = any(row["vram"] for row in rows)  # the PROCESSOR column only where models are on GPUs
    table: list[tuple[str, ...]] = [("NAME", "STATE", "MEMORY", *(("PROCESSOR",) if gpus else ()), "IN USE", "UNTIL")]
    for row in rows:
        in_use = f"{row['in_flight']}/{row['slots']}" + (f" +{row['waiting']} waiting" if row["waiting"] else "")
        memory = (row["memory"] or 0) + row["vram"]
        processor = (_processor(row),) if gpus else ()
        table.append(
            (row["name"], row["state"], _size(memory), *processor, in_use, _until(row["expires_at"], row["pinned"], now))
        )
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    for line in table:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip())
    return 0


def stop(url: str, api_key: str | None, model: str) -> int:
    """Unload ``model`` (its idle servers stop); exit 1 if it is still loaded after (pinned, or busy)."""
    try:
        with _client(url, api_key) as client:
            before = _servers(snapshot(url, api_key), model)
            response = client.post(
                "/api/generate", json={"model": model, "keep_alive": 0}, timeout=httpx.Timeout(_STOP_TIMEOUT)
            )
            _check(response, url)
    except httpx.HTTPError as exc:
        raise _connect_error(url, exc) from None
    left = _servers(snapshot(url, api_key), model)
    if not left:
        print(f"stopped {model}" if before else f"{model} was not loaded")
        return 0
    if any(server["pinned"] for server in left):
        print(
            f"smart-proxy: {model} is pinned ([model:{model}] pin = true): the proxy keeps it loaded and "
            f"refuses unloads; it stops only with the proxy",
            file=sys.stderr,
        )
        return 1
    busy = sum(server["in_flight"] for server in left)
    print(
        f"smart-proxy: {model} is still loaded: its server is busy ({busy} requests in flight) or loading; "
        f"only idle servers are stopped: run `smart-proxy stop {model}` again when it is idle",
        file=sys.stderr,
    )
    return 1


def _servers(state: dict[str, Any], model: str) -> list[dict[str, Any]]:
    for entry in state["models"]:
        if entry["model"] == model:
            return [s for s in entry["servers"] if s["state"] in ("starting", "ready")]
    return []


def logs(url: str, api_key: str | None, model: str, *, follow: bool = False) -> int:
    """Print ``model``'s last llama-server lines; with ``follow``, then every new one until Ctrl-C."""
    path = "/logs/" + model
    try:
        with _client(url, api_key) as client:
            if not follow:
                response = client.get(path)
                _check(response, url)
                sys.stdout.write(response.text)
                return 0
            with client.stream("GET", path, params={"follow": "1"}) as response:
                _check(response, url)
                for line in response.iter_lines():
                    if line.startswith("data:"):
                        event = json.loads(line[5:])
                        if "text" in event:
                            print(event["text"], flush=True)
                        elif "count" in event:
                            print(f"[smart-proxy: {event['count']} lines lost: this terminal read too slowly]", flush=True)
    except httpx.HTTPError as exc:
        raise _connect_error(url, exc) from None
    return 0
