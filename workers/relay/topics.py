"""The relay's local routing table: which local children subscribe to which exact topic.

Routing is exact-match and case-sensitive, as in Miclow: no wildcards. Subscribing twice is
one subscription (upstream would deliver twice; we chose idempotence, see docs/relay.md).
Delivery encodes a message once per stdin framing and queues it on each subscriber; a
subscriber whose queue is full counts an overflow and the others are not held up
(:meth:`TopicTable.deliver`), or, for a lossless topic, is waited for
(:meth:`TopicTable.deliver_wait`).

``on_change(topic, subscribed)`` is called when a topic gains its first subscriber
(``True``) or loses its last one (``False``): the relay starts and stops reading a lossless
topic's stream there.
"""

from __future__ import annotations

from collections.abc import Callable

from workers.relay.child import ChildProcess
from workers.relay.protocol import encode_counted, encode_line

ChangeHook = Callable[[str, bool], None]


class TopicTable:
    """topic -> subscribed children, in subscription order."""

    __slots__ = ("_subs", "on_change")

    def __init__(self, on_change: ChangeHook | None = None) -> None:
        self._subs: dict[str, dict[ChildProcess, None]] = {}
        self.on_change = on_change

    def subscribe(self, child: ChildProcess, topic: str) -> None:
        """Subscribe ``child`` to ``topic`` (idempotent)."""
        subs = self._subs.get(topic)
        if subs is None:
            subs = self._subs[topic] = {}
            subs[child] = None
            if self.on_change is not None:
                self.on_change(topic, True)
            return
        subs[child] = None

    def unsubscribe(self, child: ChildProcess, topic: str) -> bool:
        """Remove one subscription; False when ``child`` was not subscribed to ``topic``."""
        subs = self._subs.get(topic)
        if not subs or child not in subs:
            return False
        del subs[child]
        if not subs:
            del self._subs[topic]
            if self.on_change is not None:
                self.on_change(topic, False)
        return True

    def remove(self, child: ChildProcess) -> None:
        """Drop every subscription of ``child`` (it exited)."""
        for topic in self.topics_of(child):
            self.unsubscribe(child, topic)

    def has(self, topic: str) -> bool:
        """Whether ``topic`` has a local subscriber."""
        return topic in self._subs

    def topics_of(self, child: ChildProcess) -> list[str]:
        return [t for t, subs in self._subs.items() if child in subs]

    def topics(self) -> list[str]:
        return sorted(self._subs)

    def counts(self) -> list[dict[str, object]]:
        """``[{"name": topic, "subscribers": n}]`` for topics with subscribers (status JSON)."""
        return [{"name": t, "subscribers": len(s)} for t, s in sorted(self._subs.items())]

    def deliver(self, topic: str, message: str) -> int:
        """Queue ``message`` for every subscriber of ``topic``; returns how many accepted it."""
        subs = self._subs.get(topic)
        if not subs:
            return 0
        line = counted = None
        accepted = 0
        for child in list(subs):
            if child.framing == "line":
                line = line or encode_line(topic, message)
                accepted += child.deliver(line)
            else:
                counted = counted or encode_counted(topic, message)
                accepted += child.deliver(counted)
        return accepted

    async def deliver_wait(self, topic: str, messages: list[str]) -> int:
        """Queue ``messages`` for every subscriber of ``topic`` in order, waiting for room in
        full queues (a child that exits meanwhile is skipped); returns how many were queued."""
        accepted = 0
        for message in messages:
            subs = self._subs.get(topic)
            if not subs:
                continue
            line = counted = None
            for child in list(subs):
                if child.framing == "line":
                    line = line or encode_line(topic, message)
                    data = line
                else:
                    counted = counted or encode_counted(topic, message)
                    data = counted
                if child.queue.full():
                    accepted += await child.deliver_wait(data)
                else:
                    child.queue.put_nowait(data)
                    accepted += 1
        return accepted
