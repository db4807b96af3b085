"""What every route serves from: :class:`ProxyState`, owned by the root nursery (:mod:`smart_proxy.server`)."""

from __future__ import annotations

import attrs
import httpx

from ..agents import AgentRegistry
from ..auth import ApiKeys
from ..catalog import Catalog
from ..config import Config
from ..eventbus import EventBus
from ..lifecycle import Lifecycle
from ..metrics import Metrics
from ..pool import Pool
from ..upstream.client import LlamaClient
from ..upstream.ollama_server import UpstreamMonitor
from ..upstream.peers import Fleet

__all__ = ["ProxyState"]


@attrs.frozen
class ProxyState:
    """The proxy's long-lived parts; the routes hold no state of their own."""

    config: Config
    catalog: Catalog
    pool: Pool
    #: The HTTP client for Ollama upstreams, health probes and llama-server's ``/props``.
    client: httpx.AsyncClient
    #: The client of the hop to llama-servers (:mod:`smart_proxy.upstream.client`).
    llama: LlamaClient = attrs.Factory(LlamaClient)
    lifecycle: Lifecycle = attrs.Factory(Lifecycle)
    metrics: Metrics = attrs.Factory(Metrics)
    api_keys: ApiKeys = attrs.Factory(ApiKeys)
    upstreams: UpstreamMonitor = attrs.Factory(lambda self: UpstreamMonitor(self.client, ()), takes_self=True)
    #: The slash-command agents loaded at start-up (none unless [agents] enables some).
    agents: AgentRegistry = attrs.Factory(AgentRegistry)
    #: What happens in the proxy (the pool's events, downloads, upstreams, finished requests), for ``GET /events``.
    bus: EventBus = attrs.Factory(EventBus)
    #: The ``[peer:NAME]`` servers and what they have (none unless proxy.ini names some).
    fleet: Fleet = attrs.Factory(lambda self: Fleet(self.client), takes_self=True)
