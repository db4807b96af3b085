"""Driving the app's ASGI callable as Hypercorn would, for tests of what it sends (test_asgi, test_routes)."""

from __future__ import annotations

import json

import trio

from smart_proxy.catalog import Catalog
from smart_proxy.handlers.state import ProxyState
from smart_proxy.lifecycle import Phase
from smart_proxy.upstream.relay import make_llama_client
from smart_proxy.web.app import create_app


def scope(path: str, body: bytes) -> dict:
    headers = [(b"host", b"proxy"), (b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    return {"type": "http", "http_version": "1.1", "asgi": {"spec_version": "2.1", "version": "3.0"},
            "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
            "root_path": "", "headers": headers, "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8080),
            "state": {}, "extensions": {}}


class Exchange:
    """One request driven through the app as Hypercorn would: body queued, messages recorded."""

    def __init__(self, app, payload: dict, path: str = "/v1/chat/completions") -> None:
        self.app = app
        self.body = json.dumps(payload).encode()
        self.scope = scope(path, self.body)
        self.to_app, self._receive = trio.open_memory_channel[dict](10)
        self.sent: list[dict] = []

    async def run(self) -> list[dict]:
        self.to_app.send_nowait({"type": "http.request", "body": self.body, "more_body": True})
        self.to_app.send_nowait({"type": "http.request", "body": b"", "more_body": False})

        async def send(message: dict) -> None:
            self.sent.append(message)
            await trio.lowlevel.checkpoint()

        await self.app(self.scope, self._receive.receive, send)
        return self.sent


async def make_app(make_config, start_pool, http, nursery, **behaviour):
    """The app over a pool with one fake model ``a``."""
    config = make_config({"a": {"slots": 1, **behaviour}})
    pool = await start_pool(config)
    llama = make_llama_client()
    nursery.start_soon(_close_at_end, llama)
    proxy = ProxyState(config, Catalog(config.models, config.base_dir), pool, http, llama=llama)
    proxy.lifecycle.move(Phase.READY)
    return create_app(proxy), pool


async def _close_at_end(llama) -> None:
    try:
        await trio.sleep_forever()
    finally:
        await llama.aclose()
