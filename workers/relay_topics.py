"""The relay's local routing table: which local children subscribe to which exact topic.

Routing is exact-match and case-sensitive, as in Miclow: no wildcards. Subscribing twice is
one subscription (upstream would deliver twice; we chose idempotence, see docs/relay.md).
Delivery encodes a message once per stdin framing and queues it on each subscriber; a
subscriber whose queue is full counts an overflow and the others are not held up.
"""

from __future__ import annotations

from .relay_child import ChildProcess
from .relay_protocol import encode_counted, encode_line


class TopicTable:
    """topic -> subscribed children, in subscription order."""

    __slots__ = ("_subs",)

    def __init__(self) -> None:
        self._subs: dict[str, dict[ChildProcess, None]] = {}

    def subscribe(self, child: ChildProcess, topic: str) -> None:
        """Subscribe ``child`` to ``topic`` (idempotent)."""
        self._subs.setdefault(topic, {})[child] = None

    def unsubscribe(self, child: ChildProcess, topic: str) -> bool:
        """Remove one subscription; False when ``child`` was not subscribed to ``topic``."""
        subs = self._subs.get(topic)
        if not subs or child not in subs:
            return False
        del subs[child]
        if not subs:
            del self._subs[topic]
        return True

    def remove(self, child: ChildProcess) -> None:
        """Drop every subscription of ``child`` (it exited)."""
        for topic in self.topics_of(child):
            self.unsubscribe(child, topic)

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
