"""Prometheus metrics for ``GET /metrics``: requests, tokens, the pool, agents.

Theory of operation: each proxy owns one :class:`Metrics` with its own
``CollectorRegistry`` (never the process-global one, so several proxies in one
test process keep separate counts). Facts reach it three ways:

* Requests. The edge middleware opens an :class:`Exchange` for every HTTP request
  and makes it current (a context variable); it notes the status, the first body
  byte of a streamed answer and the bytes that carry token usage, then hands the
  finished exchange to :meth:`Metrics.observe`. A route that knows which model it
  serves says so with :func:`note_model` (called with a catalog name, so the
  label set stays bounded). An answer that fails after its status went out (a
  stream the upstream broke off) is counted with the status of the error that ends
  it (:func:`note_failed`), not as the 200 it started as.
* Pool events. The pool publishes them on the proxy's :class:`~smart_proxy.eventbus.EventBus`
  (:class:`~smart_proxy.pool.PublishedEvents`), and :meth:`Metrics.hear` listens there:
  loads, load durations, failures, evictions, crashes, restarts, queue waits. (Metrics
  is still a :class:`~smart_proxy.pool.PoolEvents` a pool may be given directly.)
* Agents. :class:`Metrics` serves as the agent chains' :class:`~smart_proxy.agents.AgentEvents`
  (by its :meth:`Metrics.agent_run`; agents sit above this module, so it is not a subclass):
  each hook run, its duration and result (ok, error, timeout, cancelled).

What is true at scrape time (processes by state, queue depth, requests in flight,
readiness) is read from the pool and the lifecycle when ``/metrics`` is asked,
not kept in step by hand.

Token usage is read from what upstream reports: the OpenAI ``usage`` object (in
the JSON answer, or in the last chunk of a stream), else llama-server's
``timings`` (prompt = ``prompt_n`` + ``cache_n``, completion = ``predicted_n``),
else Ollama's ``prompt_eval_count``/``eval_count``. ``timings`` matter for OpenAI
chat streams: llama-server sends ``usage`` in one only when the client asked for
it (``stream_options.include_usage``), but ends every stream with ``timings``;
the proxy never adds that option to a client's request, since it would change
the answer the client gets (an extra chunk with no choices). Only the head and the
tail of an answer (:attr:`UsageScanner.HEAD` and ``TAIL`` bytes) are kept for that,
so a long stream costs no memory.
"""

from __future__ import annotations

import contextvars
import json
import re
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import attrs
import trio
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric

from .eventbus import Event
from .lifecycle import Lifecycle
from .pool import Pool, PoolEvents, State

__all__ = ["Exchange", "Metrics", "UsageScanner", "current_exchange", "note_failed", "note_model"]

_PREFIX = "smart_proxy_"
_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
_TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0)
_LOAD_BUCKETS = (0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)
_WAIT_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_AGENT_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

#: Content types of streamed answers, whose first byte is the time to first token.
STREAM_TYPES = ("text/event-stream", "application/x-ndjson")
_SCANNED_TYPES = (*STREAM_TYPES, "application/json")


_DECODER = json.JSONDecoder()


class UsageScanner:
    """Keeps the head and tail of an answer and finds the token usage upstream reported in it.

    The tail is at least the last ``TAIL`` bytes and at most twice that.
    """

    HEAD = 8 * 1024
    TAIL = 16 * 1024
    _OPENAI = re.compile(r'(?<!\\)"usage"\s*:\s*(?=\{)')
    _TIMINGS = re.compile(r'(?<!\\)"timings"\s*:\s*(?=\{)')
    _OLLAMA = re.compile(r'(?<!\\)"(prompt_eval_count|eval_count)"\s*:\s*(\d+)')

    def __init__(self) -> None:
        self._head = bytearray()
        self._tail = bytearray()
        self._cut = False

    def feed(self, chunk: bytes) -> None:
        room = self.HEAD - len(self._head)
        if room > 0:
            self._head += chunk[:room]
            chunk = chunk[room:]
        if chunk:
            self._tail += chunk
            if len(self._tail) > 2 * self.TAIL:  # cut back to TAIL now and then, not on every chunk of a long stream
                del self._tail[: len(self._tail) - self.TAIL]
                self._cut = True

    def tokens(self) -> tuple[int, int] | None:
        """``(prompt, completion)`` from the last usage report in the answer, or None."""
        texts = [self._tail, self._head] if self._cut else [self._head + self._tail]
        for raw in texts:
            found = self._find(raw.decode("utf-8", "replace"))
            if found is not None:
                return found
        return None

    def _find(self, text: str) -> tuple[int, int] | None:
        for usage in self._objects('"usage"', self._OPENAI, text):
            if isinstance(usage.get("prompt_tokens"), int):
                completion = usage.get("completion_tokens")
                return usage["prompt_tokens"], completion if isinstance(completion, int) else 0
        for timings in self._objects('"timings"', self._TIMINGS, text):
            counts = [timings.get(key, 0) for key in ("prompt_n", "cache_n", "predicted_n")]
            if "prompt_n" in timings and all(isinstance(n, int) and n >= 0 for n in counts):
                return counts[0] + counts[1], counts[2]  # tokens evaluated plus those reused from the cache
        counts = {key: int(value) for key, value in self._OLLAMA.findall(text)}  # the last of each wins
        if "prompt_eval_count" in counts or "eval_count" in counts:
            return counts.get("prompt_eval_count", 0), counts.get("eval_count", 0)
        return None

    @staticmethod
    def _objects(name: str, key: re.Pattern[str], text: str) -> Iterator[dict]:
        """The JSON objects that follow ``key`` (which starts with ``name``) in ``text``, last first
        (skipping any the head or tail cut). Found from the end: the report is in an answer's last lines."""
        end = len(text)
        while (at := text.rfind(name, 0, end)) >= 0:
            end = at
            match = key.match(text, at)  # (its look-behind sees the text before ``at``)
            if match is None:
                continue
            try:
                found, _ = _DECODER.raw_decode(text, match.end())
            except ValueError:
                continue
            if isinstance(found, dict):
                yield found


@attrs.define(eq=False)
class Exchange:
    """What is measured of one HTTP request while it is served."""

    route: str
    started: float
    model: str = ""
    status: int = 0
    #: When the first body byte of a streamed answer was sent (trio clock).
    first_byte: float | None = None
    streaming: bool = False
    usage: UsageScanner | None = None
    #: The agents that ran for it, in the order they first ran.
    agents: list[str] = attrs.Factory(list)
    #: The peer that served it (``[peer:NAME]``), or "" when this proxy did.
    peer: str = ""

    def response_started(self, status: int, content_type: str) -> None:
        self.status = status
        media = content_type.split(";")[0].strip().lower()
        self.streaming = media in STREAM_TYPES
        if status == 200 and media in _SCANNED_TYPES:
            self.usage = UsageScanner()

    def body_sent(self, chunk: bytes) -> None:
        if not chunk:
            return
        # an SSE comment (": loading MODEL 3 s" while a stream waits for its load) is not a token
        if self.streaming and self.first_byte is None and not chunk.startswith(b":"):
            self.first_byte = trio.current_time()
        if self.usage is not None:
            self.usage.feed(chunk)


current_exchange: contextvars.ContextVar[Exchange | None] = contextvars.ContextVar("exchange", default=None)


def note_model(name: str) -> None:
    """Label the current request's metrics with model ``name`` (a catalog name, not raw client input)."""
    exchange = current_exchange.get()
    if exchange is not None:
        exchange.model = name


def note_peer(name: str) -> None:
    """The current request is being served by peer ``name`` (the last one tried, when one failed first)."""
    exchange = current_exchange.get()
    if exchange is not None:
        exchange.peer = name


def note_failed(status: int = 502) -> None:
    """The current request's answer failed after its start went out: count (and log) it as ``status``."""
    exchange = current_exchange.get()
    if exchange is not None:
        exchange.status = status


class Metrics(PoolEvents):
    """Every metric of one proxy, in a registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            _PREFIX + "requests", "HTTP requests served, by route, model, status and the peer that served (\"\": here).",
            ["route", "model", "status", "peer"],
            registry=r,
        )
        self.latency = Histogram(
            _PREFIX + "request_duration_seconds", "Time from request to the last byte of the answer.",
            ["route", "model"], buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.ttft = Histogram(
            _PREFIX + "time_to_first_token_seconds", "Time from request to the first byte of a streamed answer.",
            ["route", "model"], buckets=_TTFT_BUCKETS, registry=r,
        )
        self.prompt_tokens = Counter(
            _PREFIX + "prompt_tokens", "Prompt tokens, as upstream reported them.", ["model"], registry=r
        )
        self.completion_tokens = Counter(
            _PREFIX + "completion_tokens", "Completion tokens, as upstream reported them.", ["model"], registry=r
        )
        self.loads = Counter(_PREFIX + "model_loads", "llama-server loads started.", ["model"], registry=r)
        self.load_failures = Counter(
            _PREFIX + "model_load_failures", "Loads that failed (exit, timeout, missing file).", ["model"], registry=r
        )
        self.load_duration = Histogram(
            _PREFIX + "model_load_duration_seconds", "Time from starting llama-server to ready.", ["model"],
            buckets=_LOAD_BUCKETS, registry=r,
        )
        self.evictions = Counter(
            _PREFIX + "model_evictions", "Idle servers stopped to make room for another model.", ["model"], registry=r
        )
        self.crashes = Counter(
            _PREFIX + "model_crashes", "Ready llama-servers that exited on their own.", ["model"], registry=r
        )
        self.restarts = Counter(
            _PREFIX + "model_restarts", "Loads of a model whose previous server crashed or failed.", ["model"],
            registry=r,
        )
        self.queue_wait = Histogram(
            _PREFIX + "queue_wait_seconds", "Time requests spent queued for a place in the pool.",
            buckets=_WAIT_BUCKETS, registry=r,
        )
        self.slot_wait = Histogram(
            _PREFIX + "slot_wait_seconds", "Time requests waited for a free slot of their model's llama-server.",
            ["model"], buckets=_WAIT_BUCKETS, registry=r,
        )
        self.agent_runs = Counter(
            _PREFIX + "agent_runs", "Agent hook runs, by agent and result (ok, error, timeout, cancelled).", ["agent", "result"],
            registry=r,
        )
        self.peer_requests = Counter(
            _PREFIX + "peer_requests", "Requests relayed to peers, by peer and outcome (ok, failed).", ["peer", "outcome"],
            registry=r,
        )
        #: (metric, label values) -> its child (see :meth:`_child`); as many as prometheus_client keeps itself.
        self._children: dict[tuple[object, tuple[str, ...]], Any] = {}
        self.agent_duration = Histogram(
            _PREFIX + "agent_run_duration_seconds", "How long agent hook runs took.", ["agent"], buckets=_AGENT_BUCKETS,
            registry=r,
        )

    def peer_request(self, peer: str, outcome: str) -> None:
        """Count a request relayed to ``peer``: ``ok`` (its answer's head came) or ``failed``."""
        self.peer_requests.labels(peer, outcome).inc()

    def track_peers(self, peers: Callable[[], Iterable[PeerGauge]]) -> None:
        """Report every peer's state at every scrape; ``peers()`` gives them as they are now."""
        self.registry.register(_PeerCollector(peers))

    def track(self, pool: Pool, lifecycle: Lifecycle) -> None:
        """Report the pool's and the lifecycle's present state at every scrape."""
        self.registry.register(_LiveCollector(pool, lifecycle))

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    # ---- requests ----------------------------------------------------------------------

    def observe(self, exchange: Exchange, tokens: tuple[int, int] | None) -> None:
        """Count a finished request; call once, when its last byte has gone (or the client has).

        ``tokens``: ``exchange.usage.tokens()`` (read once by the caller, who needs them too), or None.
        """
        route, model = exchange.route, exchange.model
        self._child(self.requests, (route, model, str(exchange.status), exchange.peer)).inc()
        self._child(self.latency, (route, model)).observe(trio.current_time() - exchange.started)
        if exchange.first_byte is not None:
            self._child(self.ttft, (route, model)).observe(exchange.first_byte - exchange.started)
        if tokens is not None:
            self._child(self.prompt_tokens, (model,)).inc(tokens[0])
            self._child(self.completion_tokens, (model,)).inc(tokens[1])

    def _child(self, metric: Counter | Histogram, labels: tuple[str, ...]) -> Any:
        """``metric.labels(*labels)``, remembered: prometheus_client checks and looks the labels up on every call."""
        key = (metric, labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    # ---- pool events -------------------------------------------------------------------

    def hear(self, event: Event) -> None:
        """Count one event of the bus the pool publishes on (:class:`~smart_proxy.pool.PublishedEvents`)."""
        data = event.data
        match event.kind:
            case "loading":
                self.load_started(data["model"], data["restart"])
            case "loaded" | "load_failed":
                self.load_finished(data["model"], data["seconds"], event.kind == "loaded")
            case "evicted":
                self.evicted(data["model"])
            case "crash":
                self.crashed(data["model"])
            case "queued":
                self.queued(data["seconds"])
            case "slot_waited":
                self.slot_waited(data["model"], data["seconds"])

    def load_started(self, model: str, restart: bool) -> None:
        self.loads.labels(model).inc()
        if restart:
            self.restarts.labels(model).inc()

    def load_finished(self, model: str, seconds: float, ok: bool) -> None:
        if ok:
            self.load_duration.labels(model).observe(seconds)
        else:
            self.load_failures.labels(model).inc()

    def evicted(self, model: str) -> None:
        self.evictions.labels(model).inc()

    def crashed(self, model: str) -> None:
        self.crashes.labels(model).inc()

    def queued(self, seconds: float) -> None:
        self.queue_wait.observe(seconds)

    def slot_waited(self, model: str, seconds: float) -> None:
        self._child(self.slot_wait, (model,)).observe(seconds)  # (once per queued request: remembered)

    # ---- agents ------------------------------------------------------------------------

    def agent_run(self, name: str, seconds: float, ok: bool, *, result: str | None = None) -> None:
        """Count one run of agent ``name`` that took ``seconds``; ``ok`` False counts an error."""
        self.agent_runs.labels(name, result or ("ok" if ok else "error")).inc()
        exchange = current_exchange.get()
        if exchange is not None and name not in exchange.agents:
            exchange.agents.append(name)
        self.agent_duration.labels(name).observe(seconds)

    @contextmanager
    def agent_timer(self, name: str) -> Iterator[None]:
        """Time the block as one run of agent ``name``: ok, error (an exception) or cancelled."""
        started = trio.current_time()
        result = "error"
        try:
            yield
            result = "ok"
        except trio.Cancelled:
            result = "cancelled"
            raise
        finally:
            self.agent_run(name, trio.current_time() - started, result == "ok", result=result)


class _LiveCollector:
    """Reads the pool and the lifecycle at scrape time."""

    def __init__(self, pool: Pool, lifecycle: Lifecycle) -> None:
        self._pool = pool
        self._lifecycle = lifecycle

    def describe(self) -> Iterable[Metric]:
        return self._families()

    def collect(self) -> Iterable[Metric]:
        families = self._families()
        servers, queued, capacity, in_flight, ready = families
        snapshot = self._pool.snapshot()
        for state in State:
            count = sum(1 for server in snapshot.servers if server.state == state.value)
            servers.add_metric([state.value], count)
        queued.add_metric([], snapshot.queued)
        capacity.add_metric([], snapshot.capacity)
        in_flight.add_metric([], self._lifecycle.in_flight)
        ready.add_metric([], 1 if self._lifecycle.accepting else 0)
        return families

    @staticmethod
    def _families() -> list[GaugeMetricFamily]:
        return [
            GaugeMetricFamily(_PREFIX + "llama_servers", "llama-server processes by state.", labels=["state"]),
            GaugeMetricFamily(_PREFIX + "queue_depth", "Requests queued for a place in the pool."),
            GaugeMetricFamily(_PREFIX + "pool_capacity", "llama-servers the pool may run at once."),
            GaugeMetricFamily(_PREFIX + "requests_in_flight", "Requests being served (probes left out)."),
            GaugeMetricFamily(_PREFIX + "ready", "1 while the proxy takes new requests, 0 starting or draining."),
        ]


@attrs.frozen
class PeerGauge:
    """One peer as ``/metrics`` shows it."""

    name: str
    up: bool
    breaker: str
    models: int
    in_flight: int


class _PeerCollector:
    """Reads the peers' states at scrape time."""

    def __init__(self, peers: Callable[[], Iterable[PeerGauge]]) -> None:
        self._peers = peers

    def describe(self) -> Iterable[Metric]:
        return self._families()

    def collect(self) -> Iterable[Metric]:
        families = self._families()
        up, breaker, models, in_flight = families
        for peer in self._peers():
            up.add_metric([peer.name], 1 if peer.up else 0)
            breaker.add_metric([peer.name, peer.breaker], 1)
            models.add_metric([peer.name], peer.models)
            in_flight.add_metric([peer.name], peer.in_flight)
        return families

    @staticmethod
    def _families() -> list[GaugeMetricFamily]:
        return [
            GaugeMetricFamily(_PREFIX + "peer_up", "1 while a peer takes requests, 0 while it is out.", labels=["peer"]),
            GaugeMetricFamily(_PREFIX + "peer_breaker", "A peer's circuit breaker state.", labels=["peer", "state"]),
            GaugeMetricFamily(_PREFIX + "peer_models", "Models a peer has, as last read.", labels=["peer"]),
            GaugeMetricFamily(_PREFIX + "peer_requests_in_flight", "Requests in flight to a peer.", labels=["peer"]),
        ]
