"""Publishing from synchronous code (a Flask or Django view, a script): ``app.publish_sync``.

It uses redis-py's synchronous client, which costs less per call than the asyncio one when
events are sent one at a time from code that is not async anyway (no event loop round per
call). The wire form, the size limit, the conversation order lists and the once-only marker
are the same as ``publish``'s (it creates no consumer group: workers do, see
:mod:`orchestrator.broker.groups`); the same script runs, on a client with the same timeouts and
retry policy (:mod:`orchestrator.broker.connection`), and with ``publish_wait_replicas`` the
same WAIT for replicas (:mod:`orchestrator.broker.durable`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from orchestrator.broker import scripts
from orchestrator.broker.batch import SyncBatch
from orchestrator.broker.connection import create_sync_redis, is_cluster
from orchestrator.broker.durable import check_acked, publish_and_wait_sync, wait_block_ms
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
        # the socket timeout leaves room for a durable publish's WAIT (it blocks up to its timeout)
        self.redis = create_sync_redis(settings.redis_url, timeout_ms=settings.redis_timeout_ms,
                                       block_ms=wait_block_ms(settings) or None)
        self._publish_once = self.redis.register_script(scripts.PUBLISH_ONCE)

    def _add(self, client: Any, event: Event, order_lists: Sequence[str], dedup_ms: int | None = None,
             partition: int = 0) -> Any:
        fields = wire_fields(event, self.settings)
        window = self.settings.publish_dedup_ms if dedup_ms is None else dedup_ms
        part = self.keys.partition(partition)
        call = publish_once_call(part, event.id, fields, order_lists, window)
        if call is None:
            return client.xadd(part.events, fields)
        return self._publish_once(keys=call[0], args=call[1], client=client)

    def _queue(self, batch: SyncBatch, event: Event, order_lists: Sequence[str], partition: int) -> None:
        """:meth:`_add` into a batch (scripts cannot go into a cluster pipeline)."""
        fields = wire_fields(event, self.settings)
        part = self.keys.partition(partition)
        call = publish_once_call(part, event.id, fields, order_lists, self.settings.publish_dedup_ms)
        if call is None:
            batch.command("xadd", part.events, fields)
        else:
            batch.script(self._publish_once, keys=call[0], args=call[1])

    def publish(self, event: Event, order_lists: Sequence[str] = (), *, dedup_ms: int | None = None,
                partition: int = 0) -> str:
        """Publish ``event`` to ``partition`` once, appending its id to ``order_lists``."""
        if self.settings.publish_wait_replicas:  # durable: WAIT for replicas on the same connection
            fields = wire_fields(event, self.settings)
            window = self.settings.publish_dedup_ms if dedup_ms is None else dedup_ms
            part = self.keys.partition(partition)
            call = publish_once_call(part, event.id, fields, order_lists, window)
            event.stream_id = publish_and_wait_sync(self.redis, self._publish_once, part.events, fields, call,
                                                    self.settings)
            return event.stream_id
        stream_id = self._add(self.redis, event, order_lists, dedup_ms, partition)
        event.stream_id = stream_id.decode() if isinstance(stream_id, bytes) else stream_id
        return event.stream_id

    def publish_many(self, events: Iterable[Event], order_lists: Sequence[Sequence[str]],
                     partitions: Sequence[int] | None = None) -> list[str]:
        """Publish ``events`` in one round trip, event ``i`` to ``partitions[i]`` (default 0)."""
        events = list(events)
        if not events:
            return []
        where = list(partitions) if partitions else [0] * len(events)
        durable = bool(self.settings.publish_wait_replicas)
        if durable and is_cluster(self.redis):  # entries of several slots: one WAIT per entry's node
            return [self.publish(event, convs, partition=p)
                    for event, convs, p in zip(events, order_lists, where, strict=True)]
        batch = SyncBatch(self.redis)  # one pipeline on one Redis, one per master on a cluster
        for event, convs, p in zip(events, order_lists, where, strict=True):
            self._queue(batch, event, convs, partition=p)
        if durable:  # one WAIT after the last write of the connection covers them all
            batch.command("wait", self.settings.publish_wait_replicas, self.settings.publish_wait_timeout_ms)
        replies = batch.execute()
        ids = [x.decode() if isinstance(x, bytes) else x for x in replies[:len(events)]]
        for event, stream_id in zip(events, ids, strict=True):
            event.stream_id = stream_id
        if durable and ids:
            check_acked(replies[-1], ids[-1], self.settings)
        return ids

    def close(self) -> None:
        self.redis.close()
