"""What happens in the proxy, fanned out to whoever listens: :class:`EventBus`, and :class:`LineLog` for output lines.

Theory of operation: a part of the proxy that has news (the pool, the downloads, the
Ollama monitor, the edge) calls :meth:`EventBus.publish`, which never blocks and never
waits on a reader. Two kinds of reader hear it:

* **Listeners** (:meth:`EventBus.listen`): plain callables run inside ``publish``, in
  order, for facts that must be counted at once (the metrics). They must not block.
* **Subscriptions** (:meth:`EventBus.subscribe`): a bounded buffer per reader (the
  ``GET /events`` streams), read with ``await subscription.get()``. A reader that falls
  ``limit`` events behind is not waited for and its buffer does not grow: the buffer is
  dropped and the reader's next :meth:`Subscription.get` raises :class:`Lost` with how
  many events it missed, so it can start again from a fresh picture of the state. So a
  slow reader costs at most ``limit`` events of memory and never slows the proxy.

Events marked ``stream=False`` (per-request waits) reach the listeners only.

:class:`LineLog` is the same fan-out for lines of a program's output, with the last
``size`` lines kept for a reader that comes later (``GET /logs/MODEL``).

Everything here runs in the Trio thread; nothing does I/O.
"""

from __future__ import annotations

import collections
import itertools
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Generic, TypeVar

import attrs
import trio

__all__ = ["Event", "EventBus", "LineLog", "LogLine", "Lost", "Subscription"]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Events a subscriber may fall behind by before it is told it lost them.
DEFAULT_LIMIT = 1024


@attrs.frozen
class Event:
    """One thing that happened: its kind, its fields, when (seconds since the epoch), and its number."""

    kind: str
    data: dict[str, Any]
    time: float
    #: Increases by one per published event (listener-only events included), from 1.
    id: int


class Lost(Exception):
    """The subscriber fell too far behind: ``count`` items were dropped (and its buffer emptied)."""

    def __init__(self, count: int) -> None:
        super().__init__(f"{count} items lost")
        self.count = count


class Subscription(Generic[T]):
    """A bounded buffer of items for one reader; see the module docstring."""

    def __init__(self, limit: int, on_close: Callable[[Subscription[T]], None]) -> None:
        self._limit = max(1, limit)
        self._items: collections.deque[T] = collections.deque()
        self._lost = 0
        self._lot = trio.lowlevel.ParkingLot()
        self._on_close = on_close
        self.closed = False

    def put(self, item: T) -> None:
        """Add ``item``; never blocks. Past the limit the buffer is dropped and the loss counted."""
        if self.closed:
            return
        if len(self._items) >= self._limit:
            self._lost += len(self._items) + 1
            self._items.clear()
        else:
            self._items.append(item)
        self._lot.unpark_all()

    async def get(self) -> list[T]:
        """Every item buffered now (at least one), waiting for one if none is.

        Raises:
            Lost: items were dropped since the last call; the buffer is empty now.
        """
        while not self._items and not self._lost:
            await self._lot.park()
        if self._lost:  # what came after the loss goes too: the reader starts again from a fresh state
            lost, self._lost = self._lost + len(self._items), 0
            self._items.clear()
            raise Lost(lost)
        items = list(self._items)
        self._items.clear()
        return items

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._on_close(self)


class EventBus:
    """Publish events to listeners and subscriptions; see the module docstring."""

    def __init__(self) -> None:
        self._ids = itertools.count(1)
        self._listeners: list[Callable[[Event], object]] = []
        self._subscriptions: set[Subscription[Event]] = set()

    @property
    def subscribers(self) -> int:
        return len(self._subscriptions)

    def listen(self, listener: Callable[[Event], object]) -> None:
        """Call ``listener(event)`` for every event, inside :meth:`publish` (it must not block)."""
        self._listeners.append(listener)

    def publish(self, kind: str, *, stream: bool = True, **data: Any) -> Event:
        """Tell every listener, and (``stream``) every subscription, that ``kind`` happened."""
        event = Event(kind, data, time.time(), next(self._ids))
        for listener in self._listeners:
            try:
                listener(event)
            except Exception:  # a listener's bug must not break the part of the proxy that published
                log.exception("event listener %r failed on %s", listener, kind)
        if stream:
            for subscription in self._subscriptions:
                subscription.put(event)
        return event

    @contextmanager
    def subscribe(self, limit: int = DEFAULT_LIMIT) -> Iterator[Subscription[Event]]:
        """A subscription for the block: every streamed event published from now on, ``limit`` buffered at most."""
        subscription: Subscription[Event] = Subscription(limit, self._subscriptions.discard)
        self._subscriptions.add(subscription)
        try:
            yield subscription
        finally:
            subscription.close()


@attrs.frozen
class LogLine:
    #: When it was read, seconds since the epoch.
    time: float
    text: str


class LineLog:
    """The last ``size`` lines of a program's output, and the lines that come after, for followers."""

    def __init__(self, size: int) -> None:
        self._lines: collections.deque[LogLine] = collections.deque(maxlen=max(1, size))
        self._followers: set[Subscription[LogLine]] = set()

    def append(self, text: str) -> None:
        line = LogLine(time.time(), text)
        self._lines.append(line)
        for follower in self._followers:
            follower.put(line)

    def lines(self) -> list[LogLine]:
        return list(self._lines)

    @contextmanager
    def follow(self, limit: int = DEFAULT_LIMIT) -> Iterator[tuple[list[LogLine], Subscription[LogLine]]]:
        """The lines kept now and a subscription to the ones that come after (none lost between the two)."""
        subscription: Subscription[LogLine] = Subscription(limit, self._followers.discard)
        self._followers.add(subscription)
        try:
            yield self.lines(), subscription
        finally:
            subscription.close()
