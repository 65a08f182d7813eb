"""An in-process FIFO queue of events: tokiwa's ``Queue`` (enqueue, dequeue, peek, size,
clear, list, drain).

It holds :class:`~orchestrator.events.Event` objects in this process only; nothing here
touches Redis. Between processes, events go through the Redis stream (``Orchestrator.publish``).
A common use is to collect events while some work runs and publish them in one round trip at
the end::

    queue = Queue()
    queue.enqueue(Event("order.created", {"order_ref": "A-001"}))
    ...
    await app.publish_many(queue.drain())

Every method is safe to call from several threads (a lock guards the items).
"""

from __future__ import annotations

import builtins
import threading
from collections import deque
from collections.abc import Iterable, Iterator

from orchestrator.errors import InvalidArgumentError
from orchestrator.events import Event


class Queue:
    """A first-in, first-out queue of events, in memory."""

    __slots__ = ("_items", "_lock")

    def __init__(self, events: Iterable[Event] = ()) -> None:
        self._items: deque[Event] = deque()
        self._lock = threading.Lock()
        for event in events:
            self.enqueue(event)

    def enqueue(self, event: Event) -> None:
        """Add ``event`` at the end; anything but an Event is an InvalidArgumentError."""
        if not isinstance(event, Event):
            raise InvalidArgumentError(f"Queue.enqueue expects an Event, got {type(event).__name__}")
        with self._lock:
            self._items.append(event)

    def dequeue(self) -> Event | None:
        """Take the oldest event out of the queue; None when it is empty."""
        with self._lock:
            return self._items.popleft() if self._items else None

    def peek(self) -> Event | None:
        """The oldest event, left in the queue; None when it is empty."""
        with self._lock:
            return self._items[0] if self._items else None

    def size(self) -> int:
        """How many events wait in the queue."""
        return len(self._items)

    def clear(self) -> None:
        """Drop every waiting event."""
        with self._lock:
            self._items.clear()

    def list(self) -> builtins.list[Event]:
        """The waiting events, oldest first; the queue is not changed."""
        with self._lock:
            return builtins.list(self._items)

    def drain(self) -> builtins.list[Event]:
        """Take every waiting event out of the queue, oldest first (the queue is then empty)."""
        with self._lock:
            drained = builtins.list(self._items)
            self._items.clear()
        return drained

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[Event]:
        """The waiting events, oldest first, as they are now (a snapshot)."""
        return iter(self.list())

    def __repr__(self) -> str:
        return f"Queue(size={len(self._items)})"
