"""The root nursery: Hypercorn serving the app, the pool and the downloads, side by side.

:func:`serve` is the whole life of a proxy. It finds llama-server, reads the API
keys and the Hypercorn settings (so a mistake stops start-up with one line), loads
the agents, opens the shared HTTP client, starts the Hugging Face downloads service,
the pool and then Hypercorn in one nursery, marks the proxy ready and reports the
bound addresses through ``task_status``.

Draining: when ``shutdown_trigger`` returns (SIGINT or SIGTERM from the CLI) the
lifecycle turns DRAINING at once: ``/health/ready`` answers 503 and so does every
new request, while the listener stays open and requests in flight run on. When
the last one is done, or ``[proxy] grace`` is over, Hypercorn is told to stop: it
closes the listener and cuts what is left after a last second. Then every
llama-server is stopped and :func:`serve` returns. A second SIGTERM meanwhile
kills the proxy at once (its llama-servers die with it).
"""

from __future__ import annotations

import logging
import signal
import tomllib
from collections.abc import Awaitable, Callable

import hypercorn.config
import hypercorn.trio
import trio

from .agents import AgentRegistry
from .app import ProxyState, create_app
from .auth import ApiKeys
from .backends.ollama import UpstreamMonitor
from .catalog import Catalog
from .config import Config, resolve_path
from .download import Downloads
from .errors import ConfigError
from .lifecycle import Lifecycle, Phase
from .metrics import Metrics
from .pool import Pool
from .process import find_llama_server
from .relay import make_client

__all__ = ["serve", "wait_for_signal"]

log = logging.getLogger(__name__)


async def wait_for_signal() -> None:
    """Return on the first SIGINT or SIGTERM."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            log.info("received %s: draining", signal.Signals(signum).name)
            return


#: Hypercorn settings smart-proxy sets itself; a ``[proxy] hypercorn_config`` file may not.
_OWNED_SETTINGS = frozenset(
    {"bind", "insecure_bind", "quic_bind", "graceful_timeout", "accesslog", "errorlog", "logconfig", "logconfig_dict",
     "workers", "worker_class", "application_path", "pid_path", "use_reloader", "debug"}
)
#: How long Hypercorn lets requests run on once the drain is over (they are either done or out of grace).
_CUT_AFTER = 1.0


def hypercorn_config(config: Config, host: str, port: int) -> hypercorn.config.Config:
    """Hypercorn's settings: ``[proxy] hypercorn_config`` (TOML) if given, then ours.

    Raises:
        ConfigError: the TOML file is unreadable, or sets a setting Hypercorn lacks or we own.
    """
    hc = hypercorn.config.Config()
    hc.keep_alive_timeout = 75  # longer than nginx's and most clients' idle pools
    if config.proxy.hypercorn_config:
        path = resolve_path(config.proxy.hypercorn_config, config.base_dir)
        where = "[proxy] hypercorn_config"
        try:
            with open(path, "rb") as file:
                settings = tomllib.load(file)
        except OSError as exc:
            raise ConfigError(f"{where}: cannot read {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{where}: {path} is not valid TOML: {exc}") from None
        for key, value in settings.items():
            if key in _OWNED_SETTINGS:
                raise ConfigError(f"{where}: {key} is set by smart-proxy ([proxy] host, port, grace; --log-*)")
            if not hasattr(hypercorn.config.Config, key):
                raise ConfigError(f"{where}: {path} sets {key!r}, which is not a Hypercorn setting")
            setattr(hc, key, value)
    hc.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    hc.graceful_timeout = _CUT_AFTER
    hc.accesslog = None  # smart_proxy.access logs each request, with its id
    hc.errorlog = logging.getLogger("hypercorn.error")
    return hc


async def drain(lifecycle: Lifecycle, grace: float) -> None:
    """Turn DRAINING and return when no request is in flight, or ``grace`` seconds have passed."""
    lifecycle.move(Phase.DRAINING)
    log.info(
        "draining: readiness is 503 and new requests get 503; %d in flight, %gs to finish", lifecycle.in_flight, grace
    )
    with trio.move_on_after(grace):
        await lifecycle.idle()
    if lifecycle.in_flight:
        log.warning("grace period over: cutting %d requests still in flight", lifecycle.in_flight)


async def serve(
    config: Config,
    *,
    host: str | None = None,
    port: int | None = None,
    shutdown_trigger: Callable[[], Awaitable[None]] = wait_for_signal,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the proxy until ``shutdown_trigger`` returns; then drain and stop every llama-server."""
    binary = find_llama_server(config.pool.llama_server)
    downloads = Downloads()
    catalog = Catalog(config.models, config.base_dir, config.catalog, downloads)
    api_keys = ApiKeys.from_config(config.proxy, config.base_dir)
    agents = AgentRegistry.load(config.agents, config.base_dir)
    host = host or config.proxy.host
    port = config.proxy.port if port is None else port
    hc = hypercorn_config(config, host, port)
    lifecycle = Lifecycle()
    metrics = Metrics()
    async with make_client() as http, trio.open_nursery() as nursery:
        await nursery.start(downloads.run)
        pool = Pool(config, catalog, http, binary, events=metrics)
        await nursery.start(pool.run)
        metrics.track(pool, lifecycle)
        upstreams = UpstreamMonitor(http, catalog)
        await nursery.start(upstreams.run)
        proxy_state = ProxyState(
            config,
            catalog,
            pool,
            http,
            lifecycle=lifecycle,
            metrics=metrics,
            api_keys=api_keys,
            upstreams=upstreams,
            agents=agents,
        )
        app = create_app(proxy_state)
        stopped = trio.Event()

        async def trigger_then_drain() -> None:
            await shutdown_trigger()
            await drain(lifecycle, config.proxy.grace)

        async def run_hypercorn(*, task_status: trio.TaskStatus[list[str]]) -> None:
            try:
                await hypercorn.trio.serve(app, hc, shutdown_trigger=trigger_then_drain, task_status=task_status)
            finally:
                stopped.set()

        binds = await nursery.start(run_hypercorn)
        lifecycle.move(Phase.READY)
        for bind in binds:
            log.info("smart-proxy listening on %s (llama-server: %s)", bind, binary)
        if api_keys.required:
            log.info("API keys are required (Authorization: Bearer or x-api-key)")
        task_status.started(binds)
        await stopped.wait()
        log.info("no requests left in flight; stopping llama-servers")
        with trio.CancelScope(shield=True):
            await pool.stop_all()
        lifecycle.move(Phase.STOPPED)
        nursery.cancel_scope.cancel()
