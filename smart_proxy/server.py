"""The root nursery: Hypercorn serving the app, and the pool, side by side.

:func:`serve` is the whole life of a proxy. It finds llama-server, opens the
shared HTTP client, starts the pool and then Hypercorn in one nursery, and
reports the bound addresses through ``task_status`` once the socket listens.
When ``shutdown_trigger`` returns (SIGINT or SIGTERM from the CLI), Hypercorn
stops accepting and lets in-flight requests finish within ``[proxy] grace``;
then every llama-server is stopped and :func:`serve` returns.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Awaitable, Callable

import hypercorn.config
import hypercorn.trio
import trio

from .app import ProxyState, create_app
from .catalog import Catalog
from .config import Config
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


def hypercorn_config(config: Config, host: str, port: int) -> hypercorn.config.Config:
    hc = hypercorn.config.Config()
    hc.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    hc.graceful_timeout = config.proxy.grace
    hc.keep_alive_timeout = 75  # longer than nginx's and most clients' idle pools
    # Hypercorn closes a keep-alive connection after 1,000 requests by default; a busy
    # client then pays a new TCP handshake every thousand requests for nothing.
    hc.keep_alive_max_requests = 1_000_000_000
    # A burst of clients (hundreds of streams opened at once) overflows Hypercorn's
    # default listen backlog of 100; dropped SYNs are retried after 1 s, 3 s, ...,
    # which showed up as seconds of time-to-first-chunk. The kernel caps it at somaxconn.
    hc.backlog = 4096
    hc.accesslog = None
    hc.errorlog = logging.getLogger("hypercorn.error")
    return hc


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
    catalog = Catalog(config.models, config.base_dir)
    host = host or config.proxy.host
    port = config.proxy.port if port is None else port
    async with make_client() as http, trio.open_nursery() as nursery:
        pool = Pool(config, catalog, http, binary)
        await nursery.start(pool.run)
        app = create_app(ProxyState(config=config, catalog=catalog, pool=pool, http=http))
        drained = trio.Event()

        async def run_hypercorn(*, task_status: trio.TaskStatus[list[str]]) -> None:
            try:
                await hypercorn.trio.serve(
                    app, hypercorn_config(config, host, port), shutdown_trigger=shutdown_trigger, task_status=task_status
                )
            finally:
                drained.set()

        binds = await nursery.start(run_hypercorn)
        for bind in binds:
            log.info("smart-proxy listening on %s (llama-server: %s)", bind, binary)
        task_status.started(binds)
        await drained.wait()
        log.info("no requests left in flight; stopping llama-servers")
        with trio.CancelScope(shield=True):
            await pool.stop_all()
        nursery.cancel_scope.cancel()
