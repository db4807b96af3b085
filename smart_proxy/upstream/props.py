"""What a llama-server says about itself (``GET /props``), and the checks a request needs from it.

Theory of operation: ``/props`` is read once per server life and kept beside the
:class:`~smart_proxy.pool.Server` (a weak map: it goes when the server does); a server that
cannot answer it counts as saying nothing. :func:`check_images` refuses a request with
images for a server whose ``modalities`` say it has no vision, before the request is sent:
llama-server itself answers such a request with a 500, which would read as its failure
rather than the caller's mistake.
"""

from __future__ import annotations

import weakref
from typing import Any

import httpx

from ..errors import BadRequest
from ..pool import Lease, Server

__all__ = ["check_images", "server_props"]

_props: weakref.WeakKeyDictionary[Server, dict[str, Any]] = weakref.WeakKeyDictionary()


async def server_props(http: httpx.AsyncClient, server: Server) -> dict[str, Any]:
    """``server``'s ``/props`` (``modalities``, ``default_generation_settings``, ...); ``{}`` if it gave none."""
    props = _props.get(server)
    if props is None:
        try:
            response = await http.get(server.base_url + "/props", timeout=5.0)
            props = response.json() if response.status_code == 200 else {}
        except (httpx.HTTPError, ValueError):
            props = {}
        props = props if isinstance(props, dict) else {}
        _props[server] = props
    return props


async def check_images(http: httpx.AsyncClient, lease: Lease, name: str) -> None:
    """Images are about to go to the leased server for the model the client calls ``name``: it must see.

    Raises:
        BadRequest: the server's ``/props`` says it has no vision (no projector).
    """
    modalities = (await server_props(http, lease.server)).get("modalities")
    if isinstance(modalities, dict) and not modalities.get("vision"):
        section = lease.server.name
        raise BadRequest(
            f'"{name}" cannot take images: its llama-server has no vision support '
            f"(give it a projector: mmproj = FILE, or mmproj = auto to use the mmproj*.gguf beside the model, "
            f"in [model:{section}])"
        )
