"""Publishing from synchronous code (a Flask or Django view, a script): ``app.publish_sync``.

It uses redis-py's synchronous client, which costs less per call than the asyncio one when
events are sent one at a time from code that is not async anyway (no event loop round per
call). The wire form, the size limit, the conversation order lists and the once-only marker
are the same as ``publish``'s (it creates no consumer group: workers do, see
:mod:`orchestrator.broker.groups`); the same script runs, on a client with the same timeouts and
retry policy (:mod:`orchestrator.broker.connection`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from orchestrator.broker import scripts
from orchestrator.broker.connection import create_sync_redis
from orchestrator.broker.streams import publish_once_call, wire_fields
from orchestrator.config import Settings
from orchestrator.errors import StateError
from orchestrator.events import Event
from orchestrator.keys import Keys


class SyncPublisher:
    """A thread-safe synchronous publisher for one app (redis-py's client pools connections)."""

    def __init__(self, settings: Settings) -> None:
        if settings.redis_url is None:
            raise StateError("publish_sync needs a redis_url (TOKIWA_REDIS_URL); the embedded "
                             "Redis is started by the async connect() only")
        self.settings = settings
        self.keys = Keys(settings.namespace)
        self.redis = create_sync_redis(settings.redis_url, timeout_ms=settings.redis_timeout_ms)
        self._publish_once = self.redis.register_script(scripts.PUBLISH_ONCE)

    def _add(self, client: Any, event: Event, order_lists: Sequence[str], dedup_ms: int | None = None) -> Any:
        fields = wire_fields(event, self.settings)
        window = self.settings.publish_dedup_ms if dedup_ms is None else dedup_ms
        call = publish_once_call(self.keys, event.id, fields, order_lists, window)
        if call is None:
            return client.xadd(self.keys.events, fields)
        return self._publish_once(keys=call[0], args=call[1], client=client)

    def publish(self, event: Event, order_lists: Sequence[str] = (), *, dedup_ms: int | None = None) -> str:
        stream_id = self._add(self.redis, event, order_lists, dedup_ms)
        event.stream_id = stream_id.decode() if isinstance(stream_id, bytes) else stream_id
        return event.stream_id

    def publish_many(self, events: Iterable[Event], order_lists: Sequence[Sequence[str]]) -> list[str]:
        events = list(events)
        pipe = self.redis.pipeline(transaction=False)
        for event, convs in zip(events, order_lists, strict=True):
            self._add(pipe, event, convs)
        ids = [x.decode() if isinstance(x, bytes) else x for x in pipe.execute()]
        for event, stream_id in zip(events, ids, strict=True):
            event.stream_id = stream_id
        return ids

    def close(self) -> None:
        self.redis.close()
