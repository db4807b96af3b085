"""The pool of llama-servers: at most ``[pool] size`` alive, started on demand.

Theory of operation:

* A :class:`Server` is one life of one llama-server, from STARTING to STOPPED or
  FAILED; a restart is a new Server. Its states move only along ``TRANSITIONS``.
* :meth:`Pool.acquire` turns a model name into a :class:`Lease` on a READY server.
  Under the model's ``trio.Lock`` it either picks a live server (one with a free
  slot first; a STARTING one is joined, not duplicated) or makes room and spawns
  one, so N concurrent first requests start exactly one process. The lock is held
  only for that decision; waiting for the load happens outside it.
* Making room: a load needs a place (fewer than ``size`` live servers) and, with a
  memory budget (``[pool] memory``), its estimate (:mod:`smart_proxy.memory`, or the
  model's ``memory``) on top of the estimates of the live servers within the budget.
  Without both, idle servers (READY, nothing in flight, nobody waiting) are
  evicted, lowest ``priority`` first and then least recently used, as many as it
  takes and only if that is enough; by SIGKILL, since they have nothing to finish
  and a request waits for their place. A loading or busy server is never evicted,
  nor a pinned one (``pin``). When eviction cannot make room the request queues,
  first come first served, at most ``max_queue`` deep and ``queue_timeout`` long;
  past either bound it gets PoolBusy (503). That is ``[pool] queueing = fifo``; under
  ``swap-aware`` (the default) :mod:`smart_proxy.queueing` decides instead: the queue takes
  turns by model, oldest waiting model first; a server in use keeps its place for
  ``min_residency`` (an idle one, while idle less than its load took); past that, the
  servers the turn's load needs *give way*: they take no new request (those queue), finish
  what they have, and are evicted once idle. A queued request whose model's server stops
  giving way joins it. A model that cannot fit even when
  every server that may ever be stopped is stopped (it is larger than the budget
  less the pinned servers, or pinned servers hold every place) is refused at once
  with ModelTooLarge (507): waiting could not help.
* GPUs (``[pool] gpus``: ``auto`` reads ``nvidia-smi`` once in :meth:`Pool.run`, through a
  worker thread; or declared): a load is placed by :func:`smart_proxy.placement.place` on the
  memory free on each GPU (the inventory less what the live servers' placements hold), its
  estimate's GPU part (:attr:`MemoryEstimate.offloadable`): one GPU, a split, or, with
  ``allow_partial``, some of its layers. Idle servers on the GPUs are evicted (the same order
  as for memory) when that makes it fit whole; busy ones make it wait; a model that would not
  fit with only the pinned servers left is refused at once (ModelTooLarge). What a placement
  leaves on the CPU (the base, or a partial offload's other layers) is what the server counts
  against ``[pool] memory``. The placement becomes llama-server's ``CUDA_VISIBLE_DEVICES`` and
  flags; a model whose args set GPU flags of their own is not placed.
* A request may need a context (``num_ctx``: Ollama's ``options.num_ctx``): a server
  serves it if its context (per slot, planned from its args and then read from its
  ``/props``) is at least that large, the largest first. Else a new one starts with
  ``--ctx-size`` sized for it (:meth:`Pool.plan_context`), admitted by its estimate at that
  context, after the model's smaller idle servers stop; a smaller server that goes idle
  beside a larger READY one stops too. So the larger server stays and serves the smaller
  requests: different sizes never reload back and forth. More than the model's trained
  context (GGUF ``context_length``) is a BadRequest.
* A lease is a place on a server, not yet a slot in it: at most ``slots``
  requests are in flight to one llama-server (its ``/props`` total_slots, the
  server's ``trio.CapacityLimiter``), and :meth:`Lease.take_slot` waits for one
  before the request goes upstream, first come first served. That wait and the
  wait for room share one deadline: ``queue_timeout`` bounds the whole wait for a
  model (the load itself is ``load_timeout``'s to bound), and past it the request
  gets the same PoolBusy.
* Each server's life runs as a task in the pool's nursery (:meth:`Pool._supervise`)
  inside its own cancel scope; cancelling that scope stops the process. When
  every request waiting on a load has left, the load is cancelled.
* A READY server whose process exits on its own has crashed: it is marked FAILED,
  its place is freed at once, and the next request starts it again, after a
  back-off that grows with consecutive failures (no restart storm). A READY server
  that stops answering its ``/health`` probes (``health_interval``, ``health_timeout``,
  ``health_failures``; see :meth:`ServerProcess._watch`) is killed and goes the same way.
* A lease carries the model's ``request_timeout``: how long its request may wait for
  the first byte of an answer before it gets 504.
* An idle server (nothing in flight) is stopped ``idle_ttl`` after its last use;
  a request can override that with Ollama's ``keep_alive``. A pinned model's server
  is not: it stops only with the pool, or when it crashes (and then reloads on demand).
* A Hugging Face model is downloaded (:meth:`Catalog.download`) before the request
  asks for a place: a download can take minutes and must neither hold a place nor
  evict anyone. The snapshot shows downloads in flight beside the servers.
* A spare lifeline (``[pool] spare_lifeline``, see :mod:`smart_proxy.process`) is
  kept started ahead, for the next load to take rather than wait for a lifeline's
  start. The next spare starts ``_SPARE_DELAY`` after one is taken: while llama-server
  loads (seconds), not in the first moments of the load, when the proxy's core takes
  in the requests that wait for it. None is kept when no model can use llama-server.
* Loads, evictions, stops, failures, crashes and queue waits are told to an optional
  :class:`PoolEvents` observer; the pool never waits on it. The proxy's is
  :class:`PublishedEvents`, which puts each on the :class:`~smart_proxy.eventbus.EventBus`
  that the metrics and ``GET /events`` both hear.
* The last ``[pool] log_lines`` lines of each model's llama-server output are kept
  (:meth:`Pool.output`, a :class:`~smart_proxy.eventbus.LineLog` per model, across its
  servers' lives) for ``GET /logs/MODEL``.
"""

from __future__ import annotations

import collections
import contextvars
import enum
import logging
import math
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import attrs
import httpx
import trio

from .catalog import Catalog
from .config import AUTO_GPUS, AUTO_MEMORY, Config, ModelConfig, gpu_setting
from .download import DownloadSnapshot, split_info
from .errors import BadRequest, ModelLoadFailed, ModelTooLarge, PoolBusy, ProxyError, UpstreamError
from .eventbus import EventBus, LineLog
from .memory import (
    MemoryEstimate,
    available_memory,
    ctx_size_for,
    declared_estimate,
    format_size,
    model_estimate,
    parse_server_args,
    slot_context,
)
from .modelinfo import read_model_info
from .placement import Gpu, Placement, place, read_nvidia_smi, sets_gpu_flags
from .process import Lifeline, ServerProcess, describe_exit, exit_message, free_port
from .queueing import Resident, Waiting, may_evict, next_change, next_turn, plan, to_drain

__all__ = [
    "STATUS_VALUES",
    "ContextPlan",
    "GpuSnapshot",
    "Lease",
    "ModelStatus",
    "Pool",
    "PoolEvents",
    "PoolSnapshot",
    "PublishedEvents",
    "ServerSnapshot",
    "Slot",
    "State",
]

log = logging.getLogger(__name__)

#: A server that stayed up this long before crashing starts its failure count afresh.
_STABLE_AFTER = 30.0
_MAX_BACKOFF = 30.0
#: How long after a load took the spare the next one starts.
_SPARE_DELAY = 0.25


def _only_cancelled(exc: BaseException) -> bool:
    """``exc`` is trio.Cancelled, or a group (a nursery's) holding nothing else."""
    if isinstance(exc, BaseExceptionGroup):
        return all(_only_cancelled(inner) for inner in exc.exceptions)
    return isinstance(exc, trio.Cancelled)


class State(enum.Enum):
    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"


TRANSITIONS: dict[State, frozenset[State]] = {
    State.STARTING: frozenset({State.READY, State.STOPPING, State.FAILED}),
    State.READY: frozenset({State.STOPPING, State.FAILED}),
    State.STOPPING: frozenset({State.STOPPED}),
    State.STOPPED: frozenset(),
    State.FAILED: frozenset(),
}

#: States that hold a place in the pool (a stopping process still holds its memory).
_LIVE = frozenset({State.STARTING, State.READY, State.STOPPING})
#: States of a server that serves, or will, its model's requests.
_SERVING = frozenset({State.STARTING, State.READY})


@attrs.frozen
class ServerSnapshot:
    model: str
    state: str
    port: int
    pid: int | None
    in_flight: int
    waiting: int
    slots: int
    #: Seconds since the epoch.
    last_used: float
    #: When an idle server will be stopped (seconds since the epoch), or None for never.
    expires_at: float | None
    #: What it is expected to hold (its estimate, or its model's ``memory``), in bytes.
    memory: int = 0
    pinned: bool = False
    #: The context one request may use on it (llama-server's per-slot ``n_ctx``), None if unknown.
    context: int | None = None
    #: Bytes it holds on GPUs (``memory`` is the part in host memory), and on which (nvidia-smi's indexes).
    vram: int = 0
    gpus: tuple[int, ...] = ()
    #: Layers offloaded in a partial offload; None when every layer is (or no GPU is used).
    gpu_layers: int | None = None


@attrs.frozen
class GpuSnapshot:
    #: nvidia-smi's index.
    index: int
    #: Bytes models may use on it (declared, or free when the pool started less ``gpu_reserve``).
    memory: int
    #: Bytes the live servers hold on it, by their placements.
    used: int


@attrs.frozen
class ModelSnapshot:
    model: str
    #: The most advanced state of its live servers; else failed (last life failed) or stopped.
    state: str
    loads: int
    crashes: int
    failures: int
    last_exit_code: int | None
    #: The signal that ended its last llama-server (``SIGILL``), or None.
    last_signal: str | None
    last_error: str | None
    #: Seconds until a restart is allowed after repeated failures (0 = now).
    retry_in: float


@attrs.frozen
class PoolSnapshot:
    capacity: int
    queued: int
    servers: tuple[ServerSnapshot, ...]
    models: tuple[ModelSnapshot, ...]
    #: Hugging Face downloads in flight (state ``downloading``, bytes done / total).
    downloads: tuple[DownloadSnapshot, ...] = ()
    #: ``[pool] memory`` in bytes, or None when loads are not admitted by memory.
    memory_budget: int | None = None
    #: The live servers' estimates together, in bytes (the host part of those on GPUs).
    memory_used: int = 0
    #: The GPUs models are placed on (``[pool] gpus``), none when they are not.
    gpus: tuple[GpuSnapshot, ...] = ()


#: A model's status values, as llama-server's router mode names them (plus ``failed``), in lifecycle order.
STATUS_VALUES = ("unloaded", "downloading", "loading", "loaded", "failed")


@attrs.frozen
class ModelStatus:
    """Where one model is now, for ``/v1/models``: one of :data:`STATUS_VALUES` and what is known of it.

    ``loaded``: a llama-server of it is ready. ``loading``: one is starting (and none ready).
    ``downloading``: its files are coming from Hugging Face. ``failed``: its last load, life or
    download failed and nothing has started since. ``unloaded``: none of these.
    """

    value: str
    #: The pool's own word for it (ready, starting, stopping, failed, stopped; ``upstream`` for Ollama's).
    state: str = "stopped"
    #: downloading: the download in flight.
    download: DownloadSnapshot | None = None
    #: loading: seconds since its llama-server was started, and the most it is given (``load_timeout``).
    loading_for: float | None = None
    load_timeout: float | None = None
    #: failed: the error, when (seconds since the epoch), and the llama-server's exit code if it ran.
    error: str | None = None
    failed_at: float | None = None
    exit_code: int | None = None


@attrs.define(eq=False)
class _ModelStats:
    loads: int = 0
    crashes: int = 0
    failures: int = 0
    consecutive: int = 0
    last_exit_code: int | None = None
    last_error: ProxyError | None = None
    #: When the last failure was (trio clock), and the exit code of its llama-server (None if none ran).
    failed_at: float | None = None
    failed_exit_code: int | None = None
    retry_at: float = -math.inf


@attrs.frozen(eq=False)
class _Ticket:
    """A request's place in the queue for room: its model, when it came (trio clock), the bytes its load needs."""

    model: str
    since: float
    need: int


class PoolEvents:
    """What the pool tells an observer as it happens; subclass and override. Methods must not block."""

    def load_started(self, model: str, restart: bool) -> None:
        """A llama-server is starting; ``restart``: the model's previous server crashed or failed."""

    def load_finished(self, model: str, seconds: float, ok: bool) -> None:
        """A load ended: ready after ``seconds``, or failed (``ok`` False)."""

    def evicted(self, model: str) -> None:
        """An idle server was stopped to make room."""

    def crashed(self, model: str) -> None:
        """A ready server's process exited on its own."""

    def queued(self, seconds: float) -> None:
        """A request waited ``seconds`` in the (pool-wide) queue for room, and then got it or PoolBusy."""

    def slot_waited(self, model: str, seconds: float) -> None:
        """A request found every slot of ``model``'s server busy and waited ``seconds``: got one, PoolBusy, or left."""

    def stopping(self, model: str, why: str) -> None:
        """The proxy began stopping a server of ``model``: ``why`` is evicted, idle, unload requested, ..."""

    def stopped(self, model: str) -> None:
        """A server the proxy stopped has exited."""

    def failed(self, model: str, error: str, crashed: bool, exit_code: int | None) -> None:
        """A server of ``model`` ended on its own: a load that failed, or (``crashed``) a ready server; ``error`` says why."""


class PublishedEvents(PoolEvents):
    """Each pool event as an event on ``bus`` (its kinds and fields are in docs/events.md)."""

    def __init__(self, bus: EventBus) -> None:
        self._bus = bus

    def load_started(self, model: str, restart: bool) -> None:
        self._bus.publish("loading", model=model, restart=restart)

    def load_finished(self, model: str, seconds: float, ok: bool) -> None:
        # a failure is streamed by failed(), with its reason
        self._bus.publish("loaded" if ok else "load_failed", stream=ok, model=model, seconds=round(seconds, 3))

    def evicted(self, model: str) -> None:
        self._bus.publish("evicted", stream=False, model=model)  # streamed as stopping, reason evicted

    def crashed(self, model: str) -> None:
        self._bus.publish("crash", stream=False, model=model)

    def queued(self, seconds: float) -> None:
        self._bus.publish("queued", stream=False, seconds=seconds)

    def slot_waited(self, model: str, seconds: float) -> None:
        self._bus.publish("slot_waited", stream=False, model=model, seconds=seconds)

    def stopping(self, model: str, why: str) -> None:
        self._bus.publish("stopping", model=model, reason=why)

    def stopped(self, model: str) -> None:
        self._bus.publish("stopped", model=model)

    def failed(self, model: str, error: str, crashed: bool, exit_code: int | None) -> None:
        self._bus.publish("crashed" if crashed else "failed", model=model, error=error, exit_code=exit_code)


@attrs.frozen
class ContextPlan:
    """The context a new server of a model is started with (see :meth:`Pool.plan_context`)."""

    #: Arguments after the model's own (``--ctx-size N``), or none to start it as configured.
    args: tuple[str, ...] = ()
    #: The context one request may use on it, None if unknown before it starts.
    context: int | None = None


def _serves(server: Server, num_ctx: int | None) -> bool:
    """``server`` gives a request asking for ``num_ctx`` tokens of context at least that many (unknown: yes)."""
    return num_ctx is None or server.context is None or server.context >= num_ctx


class Server:
    """One life of one llama-server in the pool."""

    def __init__(
        self,
        model: ModelConfig,
        port: int,
        now: float,
        request_timeout: float = 0.0,
        memory: int = 0,
        context: ContextPlan | None = None,
        placement: Placement | None = None,
    ) -> None:
        self.model = model
        #: Where it goes among the GPUs (its environment and flags); None: started without GPU flags.
        self.placement = placement
        plan = context or ContextPlan()
        #: Arguments after the model's own: ``--ctx-size N`` when started for a request's larger context.
        self.extra_args = plan.args
        #: The context one request may use on it (per slot): planned from its arguments, then what
        #: its ``/props`` says once READY; None while unknown.
        self.context = plan.context
        #: What it is expected to hold in host memory, in bytes: counted against ``[pool] memory``
        #: while it is live (on GPUs: what its placement leaves on the CPU).
        self.memory = memory
        #: Seconds a request may wait for the first byte of an answer (0: no limit).
        self.request_timeout = model.request_timeout if model.request_timeout is not None else request_timeout
        self.name = model.name
        self.port = port
        self.state = State.STARTING
        self.process: ServerProcess | None = None
        self.in_flight = 0
        self.waiters = 0
        self.slots = 1
        #: At most ``slots`` upstream requests at once (see Lease.take_slot); sized when READY.
        self.limiter = trio.CapacityLimiter(1)
        self.last_used = now
        self.ready_at: float | None = None
        #: Ollama keep_alive of the latest request: seconds, negative = forever, None = config.
        self.keep_alive: float | None = None
        self.error: ProxyError | None = None
        self.cancel_scope = trio.CancelScope()
        #: Set when the server leaves STARTING (READY, or gone).
        self.settled = trio.Event()
        self.gone = trio.Event()
        self.started_at = now

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def vram(self) -> int:
        """Bytes it holds on GPUs, by its placement (``memory`` is the rest)."""
        return self.placement.vram if self.placement is not None else 0

    @property
    def idle(self) -> bool:
        return self.state is State.READY and self.in_flight == 0 and self.waiters == 0

    @property
    def evictable(self) -> bool:
        """Idle, and not pinned: the pool may stop it to make room."""
        return self.idle and not self.model.pin

    def __repr__(self) -> str:
        return f"<Server {self.name} {self.state.value} port={self.port} in_flight={self.in_flight}>"


class Slot:
    """One of a server's slots, held by one upstream request; released by whoever closes the answer."""

    def __init__(self, limiter: trio.CapacityLimiter) -> None:
        self._limiter: trio.CapacityLimiter | None = limiter

    def release(self) -> None:
        """Give the slot back; idempotent."""
        limiter, self._limiter = self._limiter, None
        if limiter is not None:
            limiter.release_on_behalf_of(self)


class Lease:
    """A claim on a READY server for one request; release it when the response is done."""

    def __init__(self, pool: Pool, server: Server, deadline: float) -> None:
        self._pool = pool
        self.server = server
        self.base_url = server.base_url
        #: When the request's wait for its model ends (trio clock): what is left of queue_timeout.
        self.deadline = deadline
        #: Seconds the request may wait for the first byte of the answer (0: no limit).
        self.request_timeout = server.request_timeout
        self._released = False

    async def take_slot(self) -> Slot:
        """A free slot on the server, for one upstream request (see the module docstring).

        A free slot is taken at once, even past the deadline; else the request waits,
        behind the ones that came first, until the lease's deadline. Cancelled (the
        client left), it takes nothing.

        Raises:
            PoolBusy: every slot stayed busy until the deadline.
        """
        limiter = self.server.limiter
        slot = Slot(limiter)
        try:
            # free, and nobody queued before us: no checkpoint, straight on to the send. After a
            # cold load every waiting request wakes in one pass of the scheduler; a yield here
            # would cost each of them one more pass before its request goes out
            limiter.acquire_on_behalf_of_nowait(slot)
        except trio.WouldBlock:
            waiting = trio.current_time()
            try:
                with trio.move_on_at(self.deadline):
                    await limiter.acquire_on_behalf_of(slot)
                    return slot
                raise self._pool._busy_slots(self.server) from None
            finally:
                self._pool._events.slot_waited(self.server.name, trio.current_time() - waiting)
        return slot

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._pool._release(self.server)

    def __repr__(self) -> str:
        return f"<Lease {self.server!r}>"


class Pool:
    """At most ``config.pool.size`` llama-servers, started lazily and shared."""

    def __init__(
        self, config: Config, catalog: Catalog, http: httpx.AsyncClient, binary: str, events: PoolEvents | None = None
    ) -> None:
        self._config = config.pool
        self._events = events or PoolEvents()
        self._catalog = catalog
        self._http = http
        self._binary = binary
        self._servers: list[Server] = []
        self._locks: collections.defaultdict[str, trio.Lock] = collections.defaultdict(trio.Lock)
        self._stats: collections.defaultdict[str, _ModelStats] = collections.defaultdict(_ModelStats)
        self._queue: collections.deque[_Ticket] = collections.deque()
        self._changed_lot = trio.lowlevel.ParkingLot()
        #: Where the idle reaper sleeps, and when it next looks (trio clock) unless woken sooner.
        self._reaper_lot = trio.lowlevel.ParkingLot()
        self._reap_at = -math.inf
        self._nursery: trio.Nursery | None = None
        #: The lifeline started ahead for the next load, if any (see the module docstring).
        self._spare: Lifeline | None = None
        self._spare_taken = trio.Event()
        self._keep_spare = self._config.spare_lifeline and (
            config.catalog.allow_hf or any(model.backend == "llama" for model in config.models.values())
        )
        #: Each model's trained context (GGUF ``context_length``), by model name: (file, its mtime, the context).
        self._trained: dict[str, tuple[str, float, int | None]] = {}
        #: Bytes the live servers may hold together; None: no memory budget. ``auto`` is read in run().
        self._budget: int | None = self._config.memory if self._config.memory > 0 else None
        #: Each model's llama-server output, its last ``log_lines`` lines (see :meth:`output`).
        self._output: dict[str, LineLog] = {}
        setting = gpu_setting(self._config)
        #: The GPUs models are placed on; none: llama-server gets no GPU flags. ``auto`` is read in run().
        self._gpus: tuple[Gpu, ...] = () if isinstance(setting, str) else tuple(Gpu(i, size) for i, size in setting)

    # ---- life of the pool ------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[Pool] = trio.TASK_STATUS_IGNORED) -> None:
        """Supervise the servers until cancelled; cancelling stops every llama-server."""
        if self._config.memory == AUTO_MEMORY:
            self._budget = self._auto_budget()
        if gpu_setting(self._config) == AUTO_GPUS:
            self._gpus = await self._auto_gpus()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._reap_idle)
                if self._keep_spare:  # started before the first request can come
                    await nursery.start(self._keep_a_spare)
                task_status.started(self)
                await trio.sleep_forever()
        finally:
            self._nursery = None

    async def stop_all(self) -> None:
        """Stop every server and the spare lifeline, and wait until their processes have exited."""
        self._keep_spare = False
        spare, self._spare = self._spare, None
        if spare is not None:
            spare.cancel()
        servers = [server for server in self._servers if server.state in _LIVE]
        for server in servers:
            self._stop(server, "proxy shutting down")
        for server in servers:
            await server.gone.wait()
        if spare is not None:
            await spare.done.wait()

    def _auto_budget(self) -> int | None:
        available = available_memory()
        if available is None:
            log.warning("[pool] memory = auto: cannot read the available memory here; loads are not admitted by memory")
            return None
        budget = max(0, available - self._config.memory_reserve)
        if budget == 0:
            log.warning(
                "[pool] memory = auto: only %s available, less than [pool] memory_reserve (%s): every load will be "
                "refused; lower memory_reserve, or set memory to a size or off",
                format_size(available),
                format_size(self._config.memory_reserve),
            )
        log.info(
            "memory budget %s (%s available less [pool] memory_reserve %s)",
            format_size(budget),
            format_size(available),
            format_size(self._config.memory_reserve),
        )
        return budget

    async def _auto_gpus(self) -> tuple[Gpu, ...]:
        """``[pool] gpus = auto``: what ``nvidia-smi`` says is free on each GPU now, less ``gpu_reserve``."""
        found = await trio.to_thread.run_sync(read_nvidia_smi)
        if not found:
            log.debug("[pool] gpus = auto: no GPU found (no nvidia-smi, or it failed); llama-server gets no GPU flags")
            return ()
        gpus = tuple(Gpu(gpu.index, max(0, gpu.memory - self._config.gpu_reserve)) for gpu in found)
        log.info(
            "GPUs for models: %s (free less [pool] gpu_reserve %s)",
            ", ".join(f"{gpu.index}: {format_size(gpu.memory)}" for gpu in gpus),
            format_size(self._config.gpu_reserve),
        )
        return gpus

    @property
    def gpus(self) -> tuple[Gpu, ...]:
        """The GPUs models are placed on, with the bytes models may use on each; none when they are not."""
        return self._gpus

    @property
    def memory_budget(self) -> int | None:
        """The bytes the live servers may hold together; None when loads are not admitted by memory."""
        return self._budget

    @property
    def spare(self) -> Lifeline | None:
        """The lifeline waiting for the next load, if any."""
        return self._spare

    async def _keep_a_spare(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep a spare lifeline started; replace it ``_SPARE_DELAY`` after a load takes it."""
        assert self._nursery is not None
        while self._keep_spare:
            if self._spare is None:  # else a load came while it started: the one there is still spare
                spare = Lifeline()
                try:
                    await self._nursery.start(spare.run)
                except OSError as exc:  # the next load starts its own lifeline, and tries again after
                    log.warning("cannot start a spare lifeline: %s", exc)
                else:
                    if self._keep_spare and self._spare is None:
                        self._spare = spare
                    else:  # stop_all came while it started
                        spare.cancel()
            task_status.started()
            task_status = trio.TASK_STATUS_IGNORED
            await self._spare_taken.wait()
            self._spare_taken = trio.Event()
            await trio.sleep(_SPARE_DELAY)

    def _take_spare(self) -> Lifeline | None:
        """The spare lifeline for a load about to start, if one is ready; the next starts soon."""
        spare, self._spare = self._spare, None
        self._spare_taken.set()
        if spare is not None and not spare.available:
            spare.cancel()  # died, or the environment llama-server would inherit changed
            return None
        return spare

    # ---- acquiring and releasing -----------------------------------------------------

    async def acquire(self, name: str, *, keep_alive: float | None = None, num_ctx: int | None = None) -> Lease:
        """A lease on a READY server for model ``name``, starting one if needed.

        ``num_ctx``: the context the request needs (Ollama's ``options.num_ctx``): a server whose
        context is at least that large serves it; if none is live, one is started with a
        context that fits (see :meth:`plan_context`), and smaller idle ones of the model stop.

        Raises:
            ModelNotFound: the catalog has no such model.
            BadRequest: ``num_ctx`` is larger than the model's trained context.
            ModelTooLarge: the model, at that context, cannot fit the memory budget.
            PoolBusy: no room in the pool within the queue's bounds.
            ModelLoadFailed, ModelLoadTimeout: the load failed.
        """
        model = self._catalog.get(name)
        await self._catalog.download(model)
        if num_ctx is not None:
            await self._check_context(model, num_ctx)
        joined_smaller = False
        # One deadline for the whole wait for a place, however many turns it takes.
        deadline = trio.current_time() + self._config.queue_timeout
        while True:
            lock = self._locks[model.name]
            try:
                # Free (so nobody waits for it: trio hands a released lock to its next waiter):
                # taken without a checkpoint, as a free slot in take_slot. `await lock.acquire()`
                # yields while holding the lock, so a burst of requests for a loaded model would
                # pass it one per pass of the scheduler, and a pass is long when hundreds of
                # streams are running.
                lock.acquire_nowait()
            except trio.WouldBlock:
                with trio.move_on_at(deadline) as waiting:
                    await lock.acquire()
                if waiting.cancelled_caught:
                    raise self._busy(f"no room in the pool within queue_timeout ({self._config.queue_timeout:g}s)") from None
            spawned = False
            try:
                server = self._pick(model, num_ctx)
                if server is None:
                    self._check_backoff(model)
                    # a replica beside a larger server matches it: a smaller one would stop once idle, and start again
                    live = [s.context or 0 for s in self._servers if s.name == model.name and s.state in _SERVING]
                    plan = await self.plan_context(model, max([num_ctx or 0, *live]) or None)
                    estimate = await self._estimate_for(model, plan)
                    need = estimate.total
                    placed = self._placed(model)
                    if placed:  # a hopeless load must not stop the smaller servers first
                        self._check_fits(model, self._host_part(estimate, self._check_gpus(model, estimate)))
                    else:
                        self._check_fits(model, need)
                    await self._retire_smaller(model, plan.context)
                    placement = await self._gpu_room(deadline, model, estimate) if placed else None
                    host = self._host_part(estimate, placement)
                    if not await self._make_room(deadline, model, host, num_ctx):
                        continue  # a server of the model took requests again while it waited: join it
                    if placement is not None and not self._gpus_hold(placement):
                        continue  # another load took its GPU memory meanwhile: place it again
                    server = self._spawn(model, host, plan, placement)
                    spawned = True
            finally:
                lock.release()
            if server.state is not State.READY:
                settling = trio.current_time()
                await self._wait_settled(server)
                deadline += trio.current_time() - settling  # the load is load_timeout's to bound
            if server.state is State.READY and not spawned and not joined_smaller and not _serves(server, num_ctx):
                # joined a load whose context was unknown, and its /props says it is smaller: start one that fits
                joined_smaller = True
                continue
            if server.state is State.READY:
                if keep_alive is not None:
                    server.keep_alive = keep_alive
                server.in_flight += 1
                server.last_used = trio.current_time()
                return Lease(self, server, deadline)
            if server.state is State.FAILED and server.error is not None:
                raise server.error
            # stopped under us (evicted or unloaded before we got it): try again

    @asynccontextmanager
    async def lease(
        self, name: str, *, keep_alive: float | None = None, num_ctx: int | None = None
    ) -> AsyncIterator[Lease]:
        lease = await self.acquire(name, keep_alive=keep_alive, num_ctx=num_ctx)
        try:
            yield lease
        finally:
            lease.release()

    def _release(self, server: Server) -> None:
        server.in_flight -= 1
        server.last_used = trio.current_time()
        if server.in_flight == 0:  # idle (evictable, reapable): the only change a waiter needs
            self._stop_superseded(server.name)
            self._changed_lot.unpark_all()  # requests queued for room (nothing to do when none are)
            if self._expiry(server) < self._reap_at:
                # Only then: waking the reaper on every request that leaves a server idle
                # would cost a task switch and a cancel scope per request on the hot path.
                self._reaper_lot.unpark_all()

    async def _wait_settled(self, server: Server) -> None:
        server.waiters += 1
        try:
            await server.settled.wait()
        finally:
            server.waiters -= 1
            if server.waiters == 0 and server.state is State.STARTING and not server.model.pin:
                log.info("%s: every request waiting on the load has gone; cancelling it", server.name)
                self._stop(server, "load abandoned")

    def _choose(self, model: ModelConfig, num_ctx: int | None = None) -> Server | None:
        """A live server to use for ``model`` with at least ``num_ctx`` of context, or None to start one.

        Among free servers the largest context goes first, so a smaller one left beside it
        drains and stops (:meth:`_stop_superseded`).
        """
        live = [
            s
            for s in self._servers
            if s.name == model.name and s.state in (State.STARTING, State.READY) and _serves(s, num_ctx)
        ]
        if not live:
            return None
        free = [s for s in live if s.state is State.READY and s.in_flight < s.slots]
        if free:
            return min(free, key=lambda s: (-(s.context or 0), s.in_flight))
        starting = any(s.state is State.STARTING for s in live)
        if len(live) < model.replicas and not starting and self._has_room(live[0].memory) and self._gpus_take(live[0]):
            return None  # every slot busy and room for another replica
        return min(live, key=lambda s: s.in_flight + s.waiters)

    def _check_backoff(self, model: ModelConfig) -> None:
        stats = self._stats[model.name]
        wait = stats.retry_at - trio.current_time()
        if wait > 0 and stats.last_error is not None:
            raise ModelLoadFailed(
                f"{stats.last_error.message}\n(failed {stats.consecutive} times in a row; next start allowed in {wait:.0f}s)"
            )

    # ---- room in the pool ------------------------------------------------------------

    def _live_count(self) -> int:
        return sum(1 for s in self._servers if s.state in _LIVE)

    def _memory_used(self) -> int:
        return sum(s.memory for s in self._servers if s.state in _LIVE)

    def _has_room(self, need: int) -> bool:
        """A place, and ``need`` bytes within the budget, with no one stopped."""
        if self._live_count() >= self._config.size:
            return False
        return self._budget is None or self._memory_used() + need <= self._budget

    async def _estimate_for(self, model: ModelConfig, plan: ContextPlan | None = None) -> MemoryEstimate:
        """What a new server of ``model`` (started as ``plan`` says) is admitted for: its ``memory``, else its estimate.

        Without a budget the estimate is still made (the snapshot shows it). A model whose
        files cannot be read yet counts as 0 (an empty estimate): its load fails with the reason.
        """
        if plan is not None and plan.args:
            model = attrs.evolve(model, args=(*model.args, *plan.args))
        estimate = await self.estimate(model)
        return estimate if estimate is not None else MemoryEstimate()

    # ---- GPUs ------------------------------------------------------------------------

    def _placed(self, model: ModelConfig) -> bool:
        """``model`` is placed on the GPUs: there are some, and its own args do not say where it goes."""
        return bool(self._gpus) and model.backend == "llama" and not sets_gpu_flags(model.args)

    def _allow_partial(self, model: ModelConfig) -> bool:
        return model.allow_partial if model.allow_partial is not None else self._config.allow_partial

    @staticmethod
    def _host_part(estimate: MemoryEstimate, placement: Placement | None) -> int:
        """What a server of ``estimate`` holds in host memory: all of it, or what ``placement`` leaves on the CPU."""
        return estimate.total if placement is None else max(0, estimate.total - placement.vram)

    def _gpu_free(self, without: frozenset[Server] | set[Server] = frozenset()) -> dict[int, int]:
        """Bytes free on each GPU: what models may use less what the live servers (but ``without``) hold."""
        free = {gpu.index: gpu.memory for gpu in self._gpus}
        for server in self._servers:
            if server.state in _LIVE and server.placement is not None and server not in without:
                for index, share in zip(server.placement.gpus, server.placement.shares, strict=True):
                    if index in free:
                        free[index] = max(0, free[index] - share)
        return free

    def _gpus_hold(self, placement: Placement) -> bool:
        """``placement`` fits on the GPUs as the live servers leave them now."""
        free = self._gpu_free()
        return all(free.get(index, 0) >= placement.on(index) for index in set(placement.gpus))

    def _gpus_take(self, server: Server) -> bool:
        """The GPUs have room for another server like ``server`` now (no eviction), or it is not on them."""
        if server.placement is None:
            return True
        try:
            place(server.name, server.placement.vram, 0, self._gpu_free())
        except ModelTooLarge:
            return False
        return True

    def _try_place(
        self, model: ModelConfig, estimate: MemoryEstimate, without: set[Server], partial: bool
    ) -> Placement | None:
        try:
            return place(model.name, estimate.offloadable, estimate.layers, self._gpu_free(without), allow_partial=partial)
        except ModelTooLarge:
            return None

    def _check_gpus(self, model: ModelConfig, estimate: MemoryEstimate) -> Placement:
        """Where ``model`` would go with every server that may ever be stopped stopped (only pinned ones left).

        Raises:
            ModelTooLarge: it fits on no GPU nor across them even then, and a partial offload is
                not allowed or could not take one layer.
        """
        unpinned = {s for s in self._servers if not s.model.pin}
        free = self._gpu_free(unpinned)
        return place(model.name, estimate.offloadable, estimate.layers, free, allow_partial=self._allow_partial(model))

    async def _gpu_room(self, deadline: float, model: ModelConfig, estimate: MemoryEstimate) -> Placement:
        """Where a new server of ``model`` goes on the GPUs now, evicting idle servers if that makes it fit.

        Whole (one GPU, else a split) if it fits with no one stopped, or with the fewest idle
        servers evicted (lowest priority, then least recently used; under swap-aware queueing not
        one still within its residency); else, if the model allows it, a partial offload with the
        GPU memory free now (evicting idle servers only until one layer fits); else it waits for
        busy and loading servers to go, until ``deadline``.

        Raises:
            PoolBusy: the GPUs stayed too full until ``deadline``.
        """
        swap_aware = self._config.queueing == "swap-aware"
        while True:
            stopping = [s for s in self._servers if s.state is State.STOPPING and s.placement is not None]
            if stopping:  # its GPU memory is about to be free: take it before evicting anyone
                await stopping[0].gone.wait()
                continue
            now = trio.current_time()
            candidates = sorted(
                (
                    s
                    for s in self._servers
                    if s.evictable
                    and s.placement is not None
                    and s.placement.gpus
                    and (not swap_aware or may_evict(self._resident(s), now=now, min_residency=self._config.min_residency))
                ),
                key=lambda s: (s.model.priority, s.last_used),
            )
            modes = (False, True) if self._allow_partial(model) else (False,)
            for partial in modes:
                victims: set[Server] = set()
                placement = self._try_place(model, estimate, victims, partial)
                for candidate in candidates:
                    if placement is not None:
                        break
                    victims.add(candidate)
                    placement = self._try_place(model, estimate, victims, partial)
                if placement is not None:
                    # spare those that were taken in turn but are not needed (their GPU was too small anyway),
                    # the most recently used first
                    for candidate in reversed(candidates):
                        if candidate in victims:
                            again = self._try_place(model, estimate, victims - {candidate}, partial)
                            if again is not None:
                                victims, placement = victims - {candidate}, again
                    break
            if placement is not None and not victims:
                log.info("%s: placed on %s", model.name, placement.describe())
                return placement
            if placement is not None:
                for victim in sorted(victims, key=lambda s: (s.model.priority, s.last_used)):
                    log.info(
                        "%s: evicted (idle, priority %d, %s on GPU) to make room on the GPUs for %s",
                        victim.name,
                        victim.model.priority,
                        format_size(victim.placement.vram if victim.placement else 0),
                        model.name,
                    )
                    self._stop(victim, "evicted", kill=True)
                    self._events.evicted(victim.name)
                for victim in victims:
                    await victim.gone.wait()
                continue  # placed again as the GPUs are now
            if trio.current_time() >= deadline:
                raise self._busy(
                    f"no room on the GPUs for model {model.name!r} within queue_timeout ({self._config.queue_timeout:g}s)"
                )
            with trio.move_on_at(self._wake_at(deadline)):
                await self._changed_lot.park()

    # ---- context per request -----------------------------------------------------------

    async def trained_context(self, model: ModelConfig) -> int | None:
        """``model``'s trained context (its GGUF ``context_length``); None if its file says none or is not GGUF.

        Read once per file (and again when the file changes): a GGUF header with a large
        vocabulary takes a while to read.
        """
        if model.backend != "llama":
            return None
        try:
            path = await self._catalog.gguf_path(model)
            mtime = (await trio.Path(path).stat()).st_mtime
        except (OSError, ProxyError):
            return None
        known = self._trained.get(model.name)
        if known is not None and known[:2] == (path, mtime):
            return known[2]
        try:
            info = await trio.to_thread.run_sync(read_model_info, path)
        except (OSError, ValueError, ImportError, AttributeError) as exc:
            log.debug("%s: cannot read its trained context: %s", model.name, exc)
            return None
        trained = info.context_length if info.is_gguf else None
        self._trained[model.name] = (path, mtime, trained)
        return trained

    async def _check_context(self, model: ModelConfig, num_ctx: int) -> None:
        """Raises BadRequest when ``num_ctx`` is more than ``model`` was trained for."""
        trained = await self.trained_context(model)
        if trained is not None and num_ctx > trained:
            raise BadRequest(
                f"num_ctx {num_ctx} is larger than the context model {model.name!r} was trained for ({trained})"
            )

    async def plan_context(self, model: ModelConfig, num_ctx: int | None) -> ContextPlan:
        """How to start a new server of ``model`` for a request needing ``num_ctx`` tokens of context.

        As configured when that context is enough (or none is asked for, or it cannot be
        told); else with ``--ctx-size`` after the model's args, sized so that each slot has
        ``num_ctx`` (:func:`smart_proxy.memory.ctx_size_for`: ``--parallel`` auto and
        ``--kv-unified`` share one cache of that size; ``-np N`` divides it, so N times).
        """
        parsed = parse_server_args(model.args)
        trained = await self.trained_context(model)
        configured = slot_context(parsed, trained)
        if num_ctx is None or (configured is not None and configured >= num_ctx):
            return ContextPlan((), configured)
        args = ("--ctx-size", str(ctx_size_for(parsed, num_ctx)))
        return ContextPlan(args, slot_context(parse_server_args((*model.args, *args)), trained))

    async def _retire_smaller(self, model: ModelConfig, context: int | None) -> None:
        """Stop ``model``'s idle servers whose context is less than ``context``: a larger one replaces them."""
        if context is None:
            return
        smaller = [
            s for s in self._servers if s.name == model.name and s.evictable and s.context is not None and s.context < context
        ]
        for server in smaller:
            self._stop(server, f"replaced by one with a larger context ({context})", kill=True)
        for server in smaller:
            await server.gone.wait()

    def _stop_superseded(self, name: str) -> None:
        """Stop idle servers of model ``name`` that a READY one with a larger context replaces."""
        ready = [s for s in self._servers if s.name == name and s.state is State.READY and s.context is not None]
        if len(ready) < 2:
            return
        largest = max(s.context or 0 for s in ready)
        for server in ready:
            if server.evictable and (server.context or 0) < largest:
                self._stop(server, f"a server of it with a larger context ({largest}) is ready")

    async def estimate(self, model: ModelConfig, *, download: bool = True) -> MemoryEstimate | None:
        """What one llama-server of ``model`` will hold: its ``[model] memory``, else estimated from its files.

        Args:
            download: False: a Hugging Face model is read from the cache, never fetched (for
                lists, which must not download gigabytes nor ask the hub): None if it is not
                there; its projector, if any, is not counted.

        Returns:
            None when the model's files cannot be read (missing, not downloaded).
        """
        if model.memory is not None:
            return declared_estimate(model.memory, model.layers or 0)
        if model.backend != "llama":
            return None
        try:
            if model.repo is not None and not download:
                # the cache's copy, never the hub: a split model's parts beside its first; no projector
                first = await self._catalog.gguf_path(model)
                stem, _, total = split_info(os.path.basename(first))
                folder = os.path.dirname(first)
                parts = [os.path.join(folder, f"{stem}-{i:05d}-of-{total:05d}.gguf") for i in range(1, total + 1)]
                return await trio.to_thread.run_sync(model_estimate, model, parts if total > 1 else [first])
            files = await self._catalog.local_files(model)
            parts = [part for part in files.parts if part != files.mmproj] or [files.model]
            return await trio.to_thread.run_sync(model_estimate, model, parts, files.mmproj)
        except (OSError, ImportError, AttributeError, ProxyError) as exc:
            log.debug("%s: no memory estimate: %s", model.name, exc)
            return None

    def _check_fits(self, model: ModelConfig, need: int) -> None:
        """Refuse at once a model that could not start even with every evictable server stopped.

        Raises:
            ModelTooLarge: it is larger than the budget, or than what pinned servers leave of it,
                or pinned servers hold every place.
        """
        pinned = [s for s in self._servers if s.state in _LIVE and s.model.pin]
        if len(pinned) >= self._config.size:
            names = ", ".join(sorted({s.name for s in pinned}))
            raise ModelTooLarge(
                f"model {model.name!r} cannot be loaded: pinned models ({names}) hold all "
                f"{self._config.size} places of the pool ([pool] size)"
            )
        if self._budget is None:
            return
        if need > self._budget:
            raise ModelTooLarge(
                f"model {model.name!r} needs {format_size(need)} of memory, more than the pool's budget of "
                f"{format_size(self._budget)} ([pool] memory); give it a smaller context (-c) or raise the budget"
            )
        held = sum(s.memory for s in pinned)
        if need > self._budget - held:
            names = ", ".join(sorted({s.name for s in pinned}))
            raise ModelTooLarge(
                f"model {model.name!r} needs {format_size(need)} of memory; the pool's budget is "
                f"{format_size(self._budget)} ([pool] memory) and pinned models ({names}) hold {format_size(held)}"
            )

    async def _make_room(self, deadline: float, model: ModelConfig, need: int, num_ctx: int | None = None) -> bool:
        """Return True when a new server of ``need`` bytes may start: room, evictions, or a turn in the queue.

        Returns False (swap-aware queueing only) when, while it waited, a live server of the
        model with at least ``num_ctx`` takes requests again (it no longer gives way): the request
        joins it instead.

        Raises:
            ModelTooLarge: it cannot fit even in a pool of nothing but pinned servers (now, or while it waits).
            PoolBusy: the queue is full, or queue_timeout passed.
        """
        self._check_fits(model, need)
        swap_aware = self._config.queueing == "swap-aware"
        if swap_aware and self._pick(model, num_ctx) is not None:  # one became free while its size was estimated
            return False
        if not self._queue and await self._take_room(need):
            return True
        if len(self._queue) >= self._config.max_queue:
            raise self._busy(f"the pool is full and {len(self._queue)} requests are queued (max_queue)")
        ticket = _Ticket(model.name, deadline - self._config.queue_timeout, need)
        self._queue.append(ticket)
        queued_at = trio.current_time()
        try:
            with trio.move_on_at(deadline):
                while True:
                    self._check_fits(model, need)  # a pinned model loaded meanwhile may have made it hopeless
                    if swap_aware and self._pick(model, num_ctx) is not None:
                        return False
                    if self._is_turn(ticket) and await self._take_room(need):
                        return True
                    with trio.move_on_at(self._wake_at(deadline)):
                        await self._changed_lot.park()
            raise self._busy(f"no room in the pool within queue_timeout ({self._config.queue_timeout:g}s)")
        finally:
            self._queue.remove(ticket)
            self._changed()  # the next in line may go
            self._events.queued(trio.current_time() - queued_at)

    # ---- swap-aware queueing (see smart_proxy.queueing) ------------------------------------

    def _pick(self, model: ModelConfig, num_ctx: int | None = None) -> Server | None:
        """:meth:`_choose`, but not a server that is giving way to a waiting model (it takes no new request)."""
        server = self._choose(model, num_ctx)
        if server is not None and self._queue and server in self._giving_way():
            return None
        return server

    def _giving_way(self) -> list[Server]:
        """The live servers draining so the queued model whose turn it is can load; none under fifo."""
        if self._config.queueing != "swap-aware" or not self._queue:
            return []
        drained = to_drain(
            self._residents(),
            self._waiting(),
            now=trio.current_time(),
            min_residency=self._config.min_residency,
            size=self._config.size,
            budget=self._budget,
        )
        return [r.key for r in drained]  # type: ignore[misc]

    def _swap_victims(self, need: int) -> list[Server] | None:
        """swap-aware :meth:`_victims`: the policy's plan, once every server in it may be evicted now."""
        now, residency = trio.current_time(), self._config.min_residency
        chosen = plan(
            self._residents(), need, now=now, min_residency=residency, size=self._config.size, budget=self._budget
        )
        if not chosen or not all(may_evict(r, now=now, min_residency=residency) for r in chosen):
            return None
        return [r.key for r in chosen]  # type: ignore[misc]

    def _wake_at(self, deadline: float) -> float:
        """When a queued request looks again without being woken: its deadline, or sooner when a residency ends."""
        if self._config.queueing != "swap-aware":
            return deadline
        change = next_change(self._residents(), now=trio.current_time(), min_residency=self._config.min_residency)
        return deadline if change is None else min(deadline, change)

    def _resident(self, server: Server) -> Resident:
        return Resident(
            model=server.name,
            ready_at=server.ready_at if server.state is State.READY else None,
            busy=not server.idle,
            pinned=server.model.pin,
            priority=server.model.priority,
            last_used=server.last_used,
            load_seconds=(server.ready_at - server.started_at) if server.ready_at is not None else 0.0,
            memory=server.memory,
            stopping=server.state is State.STOPPING,
            key=server,
        )

    def _residents(self) -> list[Resident]:
        return [self._resident(s) for s in self._servers if s.state in _LIVE]

    def _waiting(self) -> list[Waiting]:
        return [Waiting(t.model, t.since, t.need) for t in self._queue]

    def _is_turn(self, ticket: _Ticket) -> bool:
        """fifo: first in the queue. swap-aware: its model's oldest request is the oldest queued one."""
        if self._config.queueing != "swap-aware":
            return self._queue[0] is ticket
        turn = next_turn(self._waiting())
        return turn is not None and turn.model == ticket.model and turn.since == ticket.since

    def _busy(self, why: str) -> PoolBusy:
        budget = f" (memory budget {format_size(self._budget)})" if self._budget is not None else ""
        return PoolBusy(
            f"{why}: all {self._config.size} llama-servers{budget} are busy or loading; retry later",
            retry_after=self._retry_after(),
        )

    def _victims(self, need: int) -> list[Server] | None:
        """The fewest idle servers to evict, in eviction order, for a place and ``need`` bytes; None if no set is enough."""
        if self._config.queueing == "swap-aware":
            return self._swap_victims(need)
        count, used = self._live_count(), self._memory_used()
        victims: list[Server] = []
        # lower priority first, then least recently used; pinned and busy servers are not candidates
        for server in sorted((s for s in self._servers if s.evictable), key=lambda s: (s.model.priority, s.last_used)):
            if count < self._config.size and (self._budget is None or used + need <= self._budget):
                break
            victims.append(server)
            count -= 1
            used -= server.memory
        if count < self._config.size and (self._budget is None or used + need <= self._budget):
            return victims
        return None

    async def _take_room(self, need: int) -> bool:
        if self._has_room(need):
            return True
        stopping = [s for s in self._servers if s.state is State.STOPPING]
        if stopping:  # a place is about to free itself (abandoned load, idle ttl): take it, evict no one
            await stopping[0].gone.wait()
            return self._has_room(need)
        victims = self._victims(need)
        if not victims:  # eviction cannot make room (busy or loading servers hold it): wait
            return False
        for victim in victims:
            log.info(
                "%s: evicted (idle, priority %d, %s) to make room for a load of %s",
                victim.name,
                victim.model.priority,
                format_size(victim.memory),
                format_size(need),
            )
            self._stop(victim, "evicted", kill=True)
            self._events.evicted(victim.name)
        for victim in victims:
            await victim.gone.wait()
        return self._has_room(need)

    def _busy_slots(self, server: Server) -> PoolBusy:
        return PoolBusy(
            f"no free slot on the llama-server of model {server.name!r} within queue_timeout "
            f"({self._config.queue_timeout:g}s): its slots ({server.slots}) are all busy; retry later",
            retry_after=self._retry_after(),
        )

    def _retry_after(self) -> int:
        return max(1, math.ceil(self._config.queue_timeout / 4))

    def _changed(self) -> None:
        """Something that frees room or ends idleness happened: let waiters (and the reaper) look again."""
        self._changed_lot.unpark_all()
        self._reaper_lot.unpark_all()

    # ---- one server's life -----------------------------------------------------------

    def _spawn(
        self, model: ModelConfig, memory: int = 0, context: ContextPlan | None = None, placement: Placement | None = None
    ) -> Server:
        assert self._nursery is not None, "Pool.run() is not running"
        server = Server(model, free_port(), trio.current_time(), self._config.request_timeout, memory, context, placement)
        self._servers.append(server)
        # the server outlives the request that started it: its task must not inherit that
        # request's context (its id in every log line, its metrics exchange)
        contextvars.Context().run(self._nursery.start_soon, self._supervise, server)
        return server

    def _argv(self, model: ModelConfig, path: str, port: int) -> list[str]:
        argv = [self._binary, "-m", path, "--host", "127.0.0.1", "--port", str(port), "--alias", model.name]
        argv += model.args
        if model.embeddings:
            argv.append("--embeddings")
            # A chat model's GGUF says pooling "none", which /v1/embeddings refuses; mean is
            # what a user asking a chat model for embeddings expects. An explicit --pooling wins.
            if "--pooling" not in model.args:
                argv += ["--pooling", "mean"]
        if model.rerank:
            argv.append("--reranking")
        return argv

    async def _supervise(self, server: Server) -> None:
        stats = self._stats[server.name]
        try:
            with server.cancel_scope:
                try:
                    files = await self._catalog.local_files(server.model)
                except ProxyError as exc:
                    server.error = exc
                except Exception as exc:
                    server.error = ModelLoadFailed(f"model {server.name!r}: cannot get its GGUF file: {exc}")
                else:
                    placement = server.placement
                    process = ServerProcess(
                        self._argv(server.model, files.model, server.port)
                        + list(files.args())
                        + list(server.extra_args)
                        + list(placement.args() if placement is not None else ()),
                        name=server.name,
                        port=server.port,
                        http=self._http,
                        stop_timeout=self._config.stop_timeout,
                        on_ready=lambda: self._on_ready(server),
                        lifeline=self._take_spare() if self._keep_spare else None,
                        health_interval=self._config.health_interval,
                        health_timeout=self._config.health_timeout,
                        health_failures=self._config.health_failures,
                        output=self.output(server.name, create=True),
                        env=placement.env() if placement is not None else None,
                    )
                    server.process = process
                    stats.loads += 1
                    self._events.load_started(server.name, restart=stats.consecutive > 0)
                    await process.run(self._config.load_timeout)
                    if process.failure is not None:
                        server.error = process.failure
                    elif server.state is State.READY and process.hung is not None:
                        server.error = process.hung
                    elif server.state is State.READY:
                        server.error = UpstreamError(
                            exit_message(server.name, process.returncode, "while serving", process.tail_text())
                        )
        except BaseException as exc:
            if _only_cancelled(exc):  # cancelled from outside: the pool is stopping, not a failure
                self._stop(server, "pool shutting down")
            raise
        finally:
            self._on_gone(server, stats)

    def _on_ready(self, server: Server) -> None:
        assert server.process is not None
        server.slots = server.process.slots
        server.limiter.total_tokens = server.slots
        if server.process.context is not None:
            server.context = server.process.context
        server.ready_at = server.last_used = trio.current_time()
        self._set_state(server, State.READY)
        self._events.load_finished(server.name, server.ready_at - server.started_at, ok=True)
        server.settled.set()
        self._stop_superseded(server.name)
        self._changed()

    def _on_gone(self, server: Server, stats: _ModelStats) -> None:
        process = server.process
        if process is not None:
            stats.last_exit_code = process.returncode
        if server.state is State.STOPPING:
            self._set_state(server, State.STOPPED)
            self._events.stopped(server.name)
        else:
            crashed = server.state is State.READY
            self._set_state(server, State.FAILED)
            if server.error is None:
                server.error = ModelLoadFailed(f"model {server.name!r}: llama-server ended with no reason given")
            up_for = trio.current_time() - (server.ready_at or trio.current_time())
            stats.consecutive = 1 if crashed and up_for > _STABLE_AFTER else stats.consecutive + 1
            stats.crashes += crashed
            stats.failures += not crashed
            self._events.failed(server.name, server.error.message, crashed, process.returncode if process is not None else None)
            if crashed:
                self._events.crashed(server.name)
            else:
                self._events.load_finished(server.name, trio.current_time() - server.started_at, ok=False)
            stats.last_error = server.error
            stats.failed_at = trio.current_time()
            stats.failed_exit_code = process.returncode if process is not None else None
            backoff = 0.0 if stats.consecutive <= 1 else min(2.0 ** (stats.consecutive - 2), _MAX_BACKOFF)
            stats.retry_at = trio.current_time() + backoff
            log.error("%s: %s", server.name, server.error.message)
        if server.state is State.STOPPED and server.ready_at is not None:
            stats.consecutive = 0
        self._servers.remove(server)
        server.settled.set()
        server.gone.set()
        self._changed()

    def _set_state(self, server: Server, state: State) -> None:
        if state not in TRANSITIONS[server.state]:
            raise RuntimeError(f"{server!r}: no transition {server.state.value} -> {state.value}")
        log.debug("%s: %s -> %s", server.name, server.state.value, state.value)
        server.state = state

    def _stop(self, server: Server, why: str, *, kill: bool = False) -> None:
        """Begin stopping ``server`` (its task ends the process); idempotent.

        ``kill``: SIGKILL rather than a graceful stop, for an idle server whose place is wanted now.
        """
        if server.state in (State.STARTING, State.READY):
            log.info("%s: stopping llama-server (%s)", server.name, why)
            if kill and server.process is not None:
                server.process.kill_on_stop = True
            self._set_state(server, State.STOPPING)
            server.cancel_scope.cancel()
            self._events.stopping(server.name, why)

    async def unload(self, name: str) -> int:
        """Stop every idle server of model ``name`` now; return how many were stopped."""
        model = self._catalog.get(name)
        if model.pin:
            log.info("%s: unload requested, but the model is pinned ([model:%s] pin): it stays", model.name, model.name)
            return 0
        servers = [s for s in self._servers if s.name == model.name and s.idle]
        for server in servers:
            self._stop(server, "unload requested")
        for server in servers:
            await server.gone.wait()
        return len(servers)

    # ---- idle unload -----------------------------------------------------------------

    def _expiry(self, server: Server) -> float:
        """When an idle server should stop (trio clock), or inf."""
        if server.model.pin:
            return math.inf
        ttl = server.keep_alive
        if ttl is None:
            ttl = server.model.idle_ttl if server.model.idle_ttl is not None else self._config.idle_ttl
            if ttl <= 0:
                return math.inf
        elif ttl < 0:
            return math.inf
        return server.last_used + ttl

    async def _reap_idle(self) -> None:
        while True:
            now = trio.current_time()
            next_check = math.inf
            for server in list(self._servers):
                if not server.idle:
                    continue
                expiry = self._expiry(server)
                if expiry <= now:
                    self._stop(server, "idle")
                else:
                    next_check = min(next_check, expiry)
            self._reap_at = next_check
            with trio.move_on_at(next_check):
                await self._reaper_lot.park()

    # ---- looking in ------------------------------------------------------------------

    def output(self, name: str, *, create: bool = False) -> LineLog | None:
        """The last ``[pool] log_lines`` lines model ``name``'s llama-servers printed; None if none ran (and not ``create``)."""
        lines = self._output.get(name)
        if lines is None and create:
            lines = self._output[name] = LineLog(self._config.log_lines)
        return lines

    def queue_depths(self) -> dict[str, int]:
        """Requests waiting, by model: for room in the pool, for a load, or for a free slot (models with none left out)."""
        depths: collections.Counter[str] = collections.Counter()
        for ticket in self._queue:
            if isinstance(ticket, _Ticket):
                depths[ticket.model] += 1
        for server in self._servers:
            waiting = server.waiters + server.limiter.statistics().tasks_waiting
            if waiting:
                depths[server.name] += waiting
        return dict(depths)

    def servers(self, name: str | None = None) -> list[Server]:
        return [s for s in self._servers if name is None or s.name == name]

    def _model_state(self, name: str, stats: _ModelStats) -> str:
        live = {s.state for s in self._servers if s.name == name}
        for state in (State.READY, State.STARTING, State.STOPPING):
            if state in live:
                return state.value
        if stats.last_error is not None and stats.consecutive > 0:
            return State.FAILED.value
        return State.STOPPED.value

    def model_status(self, model: ModelConfig) -> ModelStatus:
        """Where ``model`` is now (see :class:`ModelStatus`), from its servers, its history and its download."""
        now = trio.current_time()
        stats = self._stats.get(model.name) or _ModelStats()
        state = self._model_state(model.name, stats)
        if state == State.READY.value:
            return ModelStatus("loaded", state)
        if state == State.STARTING.value:
            started = min(s.started_at for s in self._servers if s.name == model.name and s.state is State.STARTING)
            return ModelStatus(
                "loading", state, loading_for=round(now - started, 3), load_timeout=self._config.load_timeout
            )
        download = self._catalog.download_of(model)
        if download is not None:
            return ModelStatus("downloading", state, download=download)
        failed = self._catalog.download_failure(model)
        if failed is not None:
            return ModelStatus("failed", state, error=failed.message, failed_at=round(failed.at, 3))
        if state == State.FAILED.value and stats.last_error is not None and stats.failed_at is not None:
            return ModelStatus(
                "failed",
                state,
                error=stats.last_error.message,
                failed_at=round(time.time() - (now - stats.failed_at), 3),
                exit_code=stats.failed_exit_code,
            )
        return ModelStatus("unloaded", state)

    def snapshot(self) -> PoolSnapshot:
        now, wall = trio.current_time(), time.time()
        free = self._gpu_free()

        def to_wall(t: float) -> float:
            return wall - (now - t)

        servers = []
        for s in self._servers:
            expiry = self._expiry(s)
            servers.append(
                ServerSnapshot(
                    model=s.name,
                    state=s.state.value,
                    port=s.port,
                    pid=s.process.pid if s.process else None,
                    in_flight=s.in_flight,
                    waiting=s.waiters,
                    slots=s.slots,
                    last_used=to_wall(s.last_used),
                    expires_at=None if math.isinf(expiry) else to_wall(expiry),
                    memory=s.memory,
                    pinned=s.model.pin,
                    context=s.context,
                    vram=s.vram,
                    gpus=s.placement.gpus if s.placement is not None else (),
                    gpu_layers=s.placement.gpu_layers if s.placement is not None else None,
                )
            )
        models = tuple(
            ModelSnapshot(
                model=name,
                state=self._model_state(name, st),
                loads=st.loads,
                crashes=st.crashes,
                failures=st.failures,
                last_exit_code=st.last_exit_code,
                last_signal=describe_exit(st.last_exit_code).signal,
                last_error=st.last_error.message if st.last_error else None,
                retry_in=max(0.0, st.retry_at - now),
            )
            for name, st in self._stats.items()
        )
        return PoolSnapshot(
            capacity=self._config.size,
            queued=len(self._queue),
            servers=tuple(servers),
            models=models,
            downloads=self._catalog.downloading(),
            memory_budget=self._budget,
            memory_used=self._memory_used(),
            gpus=tuple(GpuSnapshot(gpu.index, gpu.memory, gpu.memory - free[gpu.index]) for gpu in self._gpus),
        )
