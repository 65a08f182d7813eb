"""Publishing from synchronous code (a Flask or Django view, a script): ``app.publish_sync``.

It uses redis-py's synchronous client, which costs less per call than the asyncio one when
events are sent one at a time from code that is not async anyway (no event loop round per
call). The wire form, the size limit, the conversation order lists and the once-only marker
are the same as ``publish``'s; the same script runs, on a client with the same timeouts and
retry policy (:mod:`orchestrator.broker.connection`).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from typing import Any

import redis

from orchestrator.broker import scripts
from orchestrator.broker.connection import create_sync_redis
from orchestrator.broker.streams import checked_fields, publish_once_call
from orchestrator.config import Settings
from orchestrator.errors import StateError
from orchestrator.events import Event
from orchestrator.faults import is_group_exists, is_missing_key
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
        self._group_ready = False
        self._lock = threading.Lock()

    def _ensure_group(self) -> None:
        if self._group_ready:
            return
        with self._lock:
            if not self._group_exists():  # look first: a full Redis refuses XGROUP CREATE
                try:
                    self.redis.xgroup_create(self.keys.events, self.settings.group, id="0", mkstream=True)
                except redis.ResponseError as exc:
                    if not is_group_exists(exc):
                        raise
            self._group_ready = True

    def _group_exists(self) -> bool:
        try:
            groups = self.redis.xinfo_groups(self.keys.events)
        except redis.ResponseError as exc:
            if is_missing_key(exc):
                return False
            raise
        wanted = self.settings.group.encode()
        return any(g["name"] in (wanted, self.settings.group) for g in groups)

    def _add(self, client: Any, event: Event, conversation_ids: Sequence[str]) -> Any:
        fields = checked_fields(event, self.settings.max_event_bytes)
        call = publish_once_call(self.keys, event.id, fields, conversation_ids, self.settings.publish_dedup_ms)
        if call is None:
            return client.xadd(self.keys.events, fields)
        return self._publish_once(keys=call[0], args=call[1], client=client)

    def publish(self, event: Event, conversation_ids: Sequence[str] = ()) -> str:
        self._ensure_group()
        stream_id = self._add(self.redis, event, conversation_ids)
        event.stream_id = stream_id.decode() if isinstance(stream_id, bytes) else stream_id
        return event.stream_id

    def publish_many(self, events: Iterable[Event], conversation_ids: Sequence[Sequence[str]]) -> list[str]:
        self._ensure_group()
        events = list(events)
        pipe = self.redis.pipeline(transaction=False)
        for event, convs in zip(events, conversation_ids, strict=True):
            self._add(pipe, event, convs)
        ids = [x.decode() if isinstance(x, bytes) else x for x in pipe.execute()]
        for event, stream_id in zip(events, ids, strict=True):
            event.stream_id = stream_id
        return ids

    def close(self) -> None:
        self.redis.close()
