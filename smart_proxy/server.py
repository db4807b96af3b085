"""The root nursery: Hypercorn serving the app, the pool and the downloads, side by side.

:func:`serve` is the whole life of a proxy. It finds llama-server, reads the API
keys and the Hypercorn settings (so a mistake stops start-up with one line), loads
the agents, opens the shared HTTP client, starts the Hugging Face downloads service,
the pool and then Hypercorn in one nursery, marks the proxy ready and reports the
bound addresses through ``task_status``. A router (:attr:`smart_proxy.config.Config.role`:
no model it could load itself) looks for no llama-server and starts neither the
downloads nor the pool; its pool stays empty and only answers what it holds (nothing).
Hypercorn serves HTTP/1 with six changes (:func:`adapt_hypercorn`): a connection its
client closes is closed at once, not at ``keep_alive_timeout``; a keep-alive connection
costs no task per request; a whole answer goes out in one send; neither a send, nor
a read, nor a message for the app yields to the scheduler when it need not wait; and a
plain connection's requests of the common kind are read and answered by
:mod:`smart_proxy.http1` instead of h11.

Draining: when ``shutdown_trigger`` returns (by default, the first SIGINT or
SIGTERM) the lifecycle turns DRAINING at once: ``/health/ready`` answers 503 and
so does every new request, while the listener stays open and requests in flight
run on. When the last one is done, or ``[proxy] grace`` is over, Hypercorn is told
to stop: it closes the listener and cuts what is left after a last second. Then
every llama-server is stopped and :func:`serve` returns.

Signals (:class:`StopSignals`, used unless a ``shutdown_trigger`` is given): one
receiver holds SIGINT and SIGTERM from start-up to the end, so a quick second
Ctrl-C cannot fall into a gap where Trio would raise KeyboardInterrupt in
whatever code happens to run (which would end in a traceback). A second SIGINT cuts
the drain short: requests in flight are cut, the llama-servers are stopped as
usual, and :func:`serve` raises KeyboardInterrupt once all is down (the CLI exits
130). A second SIGTERM keeps its default action and kills the proxy at once (the
lifelines then kill its llama-servers).
"""

from __future__ import annotations

import functools
import logging
import math
import os
import signal
import socket
import time
import tomllib
from collections.abc import Awaitable, Callable

import h11
import hypercorn.config
import hypercorn.protocol
import hypercorn.trio
import trio
from hypercorn.events import Closed, Event, RawData
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.trio.task_group import TaskGroup
from hypercorn.trio.tcp_server import MAX_RECV, TCPServer

from .agents import AgentRegistry
from .auth import ApiKeys
from .catalog import Catalog
from .config import Config, resolve_path
from .download import Downloads
from .errors import ConfigError
from .eventbus import EventBus
from .handlers.state import ProxyState
from .http1 import Http1Protocol
from .lifecycle import Lifecycle, Phase
from .logs import write_blocks
from .metrics import Metrics
from .pool import Pool, PublishedEvents
from .process import find_llama_server
from .upstream.ollama_server import UpstreamMonitor
from .upstream.peers import Fleet
from .upstream.relay import make_client, make_llama_client
from .web.app import create_app
from .web.asgi import CONNECTION, ClientConnection, Message

__all__ = ["HypercornConfig", "KeepAliveTimer", "StopSignals", "adapt_hypercorn", "serve"]

log = logging.getLogger(__name__)


class StopSignals:
    """SIGINT and SIGTERM for a proxy: the first asks for a drain, a second SIGINT to stop now.

    :meth:`run` is a service for the root nursery; it holds one signal receiver until it
    is cancelled (or until a second SIGINT, after which a third Ctrl-C is Trio's
    KeyboardInterrupt, which the CLI also turns into exit status 130).
    """

    def __init__(self) -> None:
        #: Set by the first SIGINT or SIGTERM: drain, then stop.
        self.drain = trio.Event()
        #: Set by a SIGINT that comes while draining or stopping: cut what is in flight.
        self.now = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[StopSignals] = trio.TASK_STATUS_IGNORED) -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            task_status.started(self)
            async for signum in signals:
                name = signal.Signals(signum).name
                if not self.drain.is_set():
                    log.info("received %s: draining", name)
                    self.drain.set()
                elif signum == signal.SIGTERM:
                    log.warning("received SIGTERM again: exiting at once")
                    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the default action: die by it
                    os.kill(os.getpid(), signal.SIGTERM)
                else:
                    log.warning("received SIGINT again: stopping now, cutting what is in flight")
                    self.now.set()
                    return


#: Hypercorn settings smart-proxy sets itself; a ``[proxy] hypercorn_config`` file may not.
_OWNED_SETTINGS = frozenset(
    {"bind", "insecure_bind", "quic_bind", "graceful_timeout", "accesslog", "errorlog", "logconfig", "logconfig_dict",
     "workers", "worker_class", "application_path", "pid_path", "use_reloader", "debug"}
)
#: How long Hypercorn lets requests run on once the drain is over (they are either done or out of grace).
_CUT_AFTER = 1.0


class HypercornConfig(hypercorn.config.Config):
    """Hypercorn's settings, whose headers for every answer (``Date``, ``Server``) are made once a second.

    Hypercorn formats the ``Date`` header anew for every answer; it only changes when the second does.
    """

    def __init__(self) -> None:
        super().__init__()
        self._made: dict[str, tuple[int, list[tuple[bytes, bytes]]]] = {}

    def response_headers(self, protocol: str) -> list[tuple[bytes, bytes]]:
        second = int(time.time())
        made = self._made.get(protocol)
        if made is None or made[0] != second:
            made = self._made[protocol] = (second, super().response_headers(protocol))
        return list(made[1])  # a list of its own: Hypercorn's callers add to theirs


def hypercorn_config(config: Config, host: str, port: int) -> hypercorn.config.Config:
    """Hypercorn's settings: ``[proxy] hypercorn_config`` (TOML) if given, then ours.

    Raises:
        ConfigError: the TOML file is unreadable, or sets a setting Hypercorn lacks or we own.
    """
    hc = HypercornConfig()
    hc.keep_alive_timeout = 75  # longer than nginx's and most clients' idle pools
    # Hypercorn closes a keep-alive connection after 1,000 requests by default; a busy
    # client then pays a new TCP handshake every thousand requests for nothing.
    hc.keep_alive_max_requests = 1_000_000_000
    # A burst of clients (hundreds of streams opened at once) overflows Hypercorn's
    # default listen backlog of 100; dropped SYNs are retried after 1 s, 3 s, ..., so
    # those clients would wait seconds for their first chunk. The kernel caps it at somaxconn.
    hc.backlog = 4096
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


def shared_port(host: str, port: int) -> str:
    """A socket bound to ``host:port`` with ``SO_REUSEPORT``, as a Hypercorn ``fd://`` bind.

    Every worker of :mod:`smart_proxy.workers` binds its own, and the kernel spreads new
    connections over them. Hypercorn takes the descriptor over (and listens on it); it does
    not set ``TCP_NODELAY`` on an ``fd://`` socket, so that is set here, as for its own binds.
    """
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    return f"fd://{sock.detach()}"


class KeepAliveTimer:
    """One connection's keep-alive timer: one task for the connection's life, whose deadline moves.

    It stands in for Hypercorn's ``idle_task`` (a ``TrioSingleTask`` running
    ``TCPServer._idle_timeout``), which starts a task each time the connection turns idle
    and cancels it when the next request comes: a task started, scheduled and torn down
    for every request. Here a request only moves a deadline. The behaviour is
    Hypercorn's: a connection idle for ``keep_alive_timeout``, or idle while the server
    stops (``context.terminated``), is closed with ``_initiate_server_close``; a request
    in flight is never cut by it. Hypercorn calls :meth:`restart` when the connection
    turns idle and :meth:`stop` when a request comes; :meth:`end` (from
    :func:`adapt_hypercorn`'s ``_read_data``) lets the task go once the read side has ended.
    """

    def __init__(self, server: TCPServer) -> None:
        self._server = server
        self._scope = trio.CancelScope()
        self._idle = False
        self._running = False
        self._ended = False

    async def restart(self, task_group: TaskGroup, action: object) -> None:
        self._idle = True
        if self._server.context.terminated.is_set():
            self._scope.deadline = -math.inf
        else:
            self._scope.deadline = trio.current_time() + self._server.config.keep_alive_timeout
        if not self._running:
            self._running = True
            task_group.spawn(self._run)

    async def stop(self) -> None:
        self._idle = False
        self._scope.deadline = math.inf

    def end(self) -> None:
        self._ended = True
        self._scope.cancel()

    async def _run(self) -> None:
        with self._scope:
            await self._server.context.terminated.wait()
            if not self._idle:
                await trio.sleep_forever()  # the server stops during a request: restart() ends this after it
        if not self._ended:
            with trio.CancelScope(shield=True):
                await self._server._initiate_server_close()


async def _send_h11_event(self: H11Protocol, event: h11.Event) -> None:
    """Hypercorn's ``H11Protocol._send_h11_event``, holding a Content-Length answer's head; see :func:`adapt_hypercorn`."""
    try:
        data = self.connection.send(event)
    except h11.LocalProtocolError:
        if self.connection.their_state != h11.ERROR:
            raise
        return
    if type(event) is h11.Response and any(name == b"content-length" for name, _ in event.headers):
        self._held_head = data
        return
    held = getattr(self, "_held_head", None)
    if held:
        data = held + data
        self._held_head = None
    if data:
        await self.send(RawData(data=data))


async def _protocol_send(self: TCPServer, event: Event) -> None:
    """Hypercorn's ``TCPServer.protocol_send``, writing bytes at once when it can; see :func:`adapt_hypercorn`."""
    if type(event) is RawData and type(self.stream) is trio.SocketStream and not self.send_lock.locked():
        data = event.data
        fd = self.stream.socket.fileno()  # -1 once closed, so a number the kernel gave out again is never written
        try:
            sent = os.write(fd, data) if fd >= 0 else 0
        except OSError:  # full (BlockingIOError), or broken: Hypercorn's path waits, or reports it
            sent = 0
        if sent == len(data):
            return
        if sent:  # the rest must follow, so it goes out whatever cancels this task
            with trio.CancelScope(shield=True):
                await _protocol_send.__wrapped__(self, RawData(data=data[sent:]))  # type: ignore[attr-defined]
            return
    await _protocol_send.__wrapped__(self, event)  # type: ignore[attr-defined]


async def _read_socket(self: TCPServer) -> None:
    """Hypercorn's ``TCPServer._read_data`` on a plain socket, reading as soon as it is readable; see :func:`adapt_hypercorn`."""
    sock = self.stream.socket
    timeout = self.config.read_timeout
    waited = True
    while True:
        fd = sock.fileno()
        if fd < 0:
            break  # closed by the server (keep-alive timer, shutdown)
        try:
            data = os.read(fd, MAX_RECV)
        except BlockingIOError:
            try:
                if timeout:
                    with trio.fail_after(timeout):
                        await trio.lowlevel.wait_readable(sock)
                else:  # (no cancel scope for no deadline)
                    await trio.lowlevel.wait_readable(sock)
            except (trio.ClosedResourceError, trio.TooSlowError):
                break
            waited = True
            continue
        except OSError:  # reset by the client
            break
        if not waited:  # bytes kept coming without a wait: let the other tasks run first
            await trio.lowlevel.checkpoint()
        waited = False
        await self.protocol.handle(RawData(data))
        if not data:
            break
    await self.protocol.handle(Closed())


def _http1_protocol(app, config, context, task_group, state, ssl, client, server, send):  # type: ignore[no-untyped-def]
    """The HTTP/1 protocol Hypercorn's ``ProtocolWrapper`` makes: :class:`~smart_proxy.http1.Http1Protocol` on a plain connection.

    Hypercorn's own with TLS, and with settings it serves its own way: ``server_names`` (a
    request for another host gets a 404) and ``h11_pass_raw_headers`` (header names as sent).
    """
    kind = H11Protocol if ssl or config.server_names or config.h11_pass_raw_headers else Http1Protocol
    return kind(app, config, context, task_group, state, ssl, client, server, send)


async def _spawn_app(self: TaskGroup, *args: object) -> Callable[[Message], Awaitable[None]]:
    """Hypercorn's ``TaskGroup.spawn_app``, whose request channel takes a message without a yield when it has room."""
    send = await _spawn_app.__wrapped__(self, *args)  # type: ignore[attr-defined]
    return functools.partial(_put, send.__self__)


async def _put(channel: trio.MemorySendChannel[Message], message: Message) -> None:
    try:
        channel.send_nowait(message)
    except trio.WouldBlock:
        await channel.send(message)


def adapt_hypercorn() -> None:
    """Six changes to Hypercorn's HTTP/1 serving on Trio (checked against Hypercorn 0.18.0); idempotent.

    Hypercorn offers no setting or hook for any of them, so ``TCPServer.__init__``,
    ``_read_data``, ``protocol_send`` and ``TaskGroup.spawn_app`` are wrapped,
    ``H11Protocol._send_h11_event`` is replaced, and ``hypercorn.protocol.H11Protocol`` (what
    ``ProtocolWrapper`` makes for HTTP/1) becomes :func:`_http1_protocol`;
    ``tests/test_ops.py`` and ``tests/test_http1.py`` pin the source of what this relies on.

    - **A closed connection is freed at once.** ``TCPServer`` reads until the client's
      EOF, then waits for its connection's task group before it closes the socket.
      Between requests that group holds the keep-alive timer, so a client that closes an
      idle keep-alive connection would leave its socket in CLOSE-WAIT, descriptor and
      buffers held, until ``keep_alive_timeout``. Once the read side has ended, the
      timer is let go, and the connection closes as soon as no request runs on it (a
      request in flight has been told ``http.disconnect`` by then, as Hypercorn does).
      The same wrapper is where a model route on HTTP/1 learns that its client left: it
      puts a :class:`~smart_proxy.web.asgi.ClientConnection` in the connection task's
      context (the request tasks Hypercorn starts from ``_read_data`` inherit it) and
      tells it when the read side ends (see :mod:`smart_proxy.web.asgi`).
    - **The keep-alive timer costs no task per request**: :class:`KeepAliveTimer`.
    - **A whole answer goes out in one send** (HTTP/1). Hypercorn's ``H11Protocol`` writes
      each h11 event as it comes: the head, the body, then the end of the message (nothing,
      for a body with a Content-Length, but still a ``send_all`` and a yield to the
      scheduler). Its ``_send_h11_event`` is replaced by :func:`_send_h11_event`, which
      holds the head of an answer that has a Content-Length (its body follows at once: an
      app that knows the length has the body) and sends it with the next bytes, and sends
      nothing for an event that has no bytes. A head without a Content-Length (a stream)
      goes out at once, as before.
    - **Bytes go out without a yield when the socket takes them** (:func:`_protocol_send`).
      Hypercorn's send takes the connection's send lock and then writes through Trio's
      ``SocketStream``; each of the two yields to the scheduler, a pass of it per send.
      When no other send holds the lock, the bytes are written at once; what the socket
      does not take goes Hypercorn's way (lock, wait until writable), shielded, since
      the first part has gone out. A TLS connection goes Hypercorn's way throughout.
    - **The connection's reader reads as soon as the socket is readable**
      (:func:`_read_socket`, plain sockets). ``SocketStream.receive_some`` yields after
      every read, even one it woke up for, so each request cost its connection's task a
      pass of the scheduler more. The reader yields once per read: waiting, or, when
      bytes keep coming without a wait, before handing them on. ``read_timeout`` bounds
      each wait, as Hypercorn's bounds each read.
    - **A message for the app is queued without a yield** while its queue has room
      (:func:`_spawn_app`): Hypercorn's memory channel ``send`` yields after queueing,
      and every request ends with one (``http.disconnect``).
    - **Requests of the common kind are read and answered without h11**
      (:class:`smart_proxy.http1.Http1Protocol`, plain connections; see
      :func:`_http1_protocol`): h11's events, state machine and validation, and
      Hypercorn's ``HTTPStream`` around them, were the largest part of a proxied request's
      cost. Anything else on the connection goes to a ``H11Protocol`` from that request on.

    A kept-alive request then wakes its connection's task once and its own task twice
    (to send the request upstream; to relay the answer).
    """
    init, read = TCPServer.__init__, TCPServer._read_data
    if getattr(read, "__wrapped__", None) is not None:
        return
    _send_h11_event.__wrapped__ = H11Protocol._send_h11_event  # type: ignore[attr-defined]
    H11Protocol._send_h11_event = _send_h11_event  # type: ignore[method-assign]
    _protocol_send.__wrapped__ = TCPServer.protocol_send  # type: ignore[attr-defined]
    TCPServer.protocol_send = _protocol_send  # type: ignore[method-assign]
    _spawn_app.__wrapped__ = TaskGroup.spawn_app  # type: ignore[attr-defined]
    TaskGroup.spawn_app = _spawn_app  # type: ignore[method-assign]
    hypercorn.protocol.H11Protocol = _http1_protocol  # type: ignore[assignment,misc]

    def __init__(self: TCPServer, *args: object, **kwargs: object) -> None:
        init(self, *args, **kwargs)
        self.idle_task = KeepAliveTimer(self)

    async def _read_data(self: TCPServer) -> None:
        connection = ClientConnection()
        CONNECTION.set(connection)  # the request tasks Hypercorn starts from here inherit it
        try:  # (an error cancels the connection's task group, the timer with it)
            await (_read_socket(self) if type(self.stream) is trio.SocketStream else read(self))
        finally:
            connection.ended()
        self.idle_task.end()

    __init__.__wrapped__ = init  # type: ignore[attr-defined]
    _read_data.__wrapped__ = read  # type: ignore[attr-defined]
    TCPServer.__init__ = __init__  # type: ignore[method-assign]
    TCPServer._read_data = _read_data  # type: ignore[method-assign]


async def drain(lifecycle: Lifecycle, grace: float, now: trio.Event | None = None) -> None:
    """Turn DRAINING and return when no request is in flight, ``grace`` seconds have passed, or ``now`` is set."""
    lifecycle.move(Phase.DRAINING)
    log.info(
        "draining: readiness is 503 and new requests get 503; %d in flight, %gs to finish", lifecycle.in_flight, grace
    )
    with trio.move_on_after(grace):
        async with trio.open_nursery() as nursery:
            if now is not None:
                nursery.start_soon(_cancel_when, now, nursery.cancel_scope)
            await lifecycle.idle()
            nursery.cancel_scope.cancel()
    if lifecycle.in_flight:
        why = "stopping now" if now is not None and now.is_set() else "grace period over"
        log.warning("%s: cutting %d requests still in flight", why, lifecycle.in_flight)


async def _cancel_when(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


async def serve(
    config: Config,
    *,
    host: str | None = None,
    port: int | None = None,
    shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
    reuse_port: bool = False,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the proxy until ``shutdown_trigger`` returns; then drain and stop every llama-server.

    Args:
        shutdown_trigger: returns when the proxy should drain and stop; None: on SIGINT or
            SIGTERM (see :class:`StopSignals`).
        reuse_port: listen with ``SO_REUSEPORT``, beside the other workers of :mod:`smart_proxy.workers`.

    Raises:
        KeyboardInterrupt: a second SIGINT cut the drain short; raised after everything has stopped.
    """
    router = config.role == "router"
    # a router loads nothing: it needs no llama-server binary, and its pool is never started
    binary = "" if router else find_llama_server(config.pool.llama_server)
    metrics = Metrics()
    bus = EventBus()
    bus.listen(metrics.hear)
    downloads = Downloads(bus=bus)
    catalog = Catalog(config.models, config.base_dir, config.catalog, downloads)
    api_keys = ApiKeys.from_config(config.proxy, config.base_dir)
    agents = AgentRegistry.load(config.agents, config.base_dir, events=metrics)
    host = host or config.proxy.host
    port = config.proxy.port if port is None else port
    hc = hypercorn_config(config, host, port)
    if reuse_port:
        hc.bind = [shared_port(host, port)]
    adapt_hypercorn()
    lifecycle = Lifecycle()
    signals: StopSignals | None = None
    async with make_client() as client, make_llama_client() as llama, trio.open_nursery() as nursery:
        trigger = shutdown_trigger
        if trigger is None:
            signals = await nursery.start(StopSignals().run)
            trigger = signals.drain.wait
        nursery.start_soon(write_blocks)  # the access lines kept for a block (smart_proxy.logs)
        await nursery.start(llama.run)
        pool = Pool(config, catalog, client, binary, events=PublishedEvents(bus))
        if not router:
            await nursery.start(downloads.run)
            await nursery.start(pool.run)
        metrics.track(pool, lifecycle)
        upstreams = UpstreamMonitor(client, catalog, bus=bus)
        await nursery.start(upstreams.run)
        fleet = Fleet(client, config.peers.values(), events=metrics, llama=llama, bus=bus)
        if fleet:
            metrics.track_peers(fleet.gauges)
            await nursery.start(fleet.run)
        proxy_state = ProxyState(
            config,
            catalog,
            pool,
            client,
            llama=llama,
            lifecycle=lifecycle,
            metrics=metrics,
            api_keys=api_keys,
            upstreams=upstreams,
            agents=agents,
            bus=bus,
            fleet=fleet,
        )
        app = create_app(proxy_state)
        stopped = trio.Event()

        async def trigger_then_drain() -> None:
            await trigger()
            await drain(lifecycle, config.proxy.grace, signals.now if signals is not None else None)

        async def run_hypercorn(*, task_status: trio.TaskStatus[list[str]]) -> None:
            try:
                # the edge itself, not the Quart app whose __call__ only hands on to it: one frame
                # fewer for every resumption of every request's task
                await hypercorn.trio.serve(app.asgi_app, hc, shutdown_trigger=trigger_then_drain, task_status=task_status)
            finally:
                stopped.set()

        binds = await nursery.start(run_hypercorn)
        if lifecycle.phase is Phase.STARTING:  # a signal during start-up may have begun the drain already
            lifecycle.move(Phase.READY)
        for bind in binds:
            if router:
                log.info("smart-proxy listening on %s (router: %d peers, no pool)", bind, len(config.peers))
            else:
                log.info("smart-proxy listening on %s (llama-server: %s)", bind, binary)
        if api_keys.required:
            log.info("API keys are required (Authorization: Bearer or x-api-key)")
        task_status.started(binds)
        await stopped.wait()
        log.info("stopped listening; stopping llama-servers")
        with trio.CancelScope(shield=True):
            await pool.stop_all()
        lifecycle.move(Phase.STOPPED)
        nursery.cancel_scope.cancel()
    if signals is not None and signals.now.is_set():
        raise KeyboardInterrupt
