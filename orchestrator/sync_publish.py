"""Publishing from synchronous code (a Flask or Django view, a script): ``app.publish_sync``.

It uses redis-py's synchronous client, which costs less per call than the asyncio one when
events are sent one at a time from code that is not async anyway (no event loop round per
call). The wire form, the size limit and the conversation order lists are the same as
``publish``'s; the same scripts run.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from typing import Any

import redis

from . import scripts
from .broker import checked_fields, ordered_publish
from .config import Settings
from .errors import StateError
from .events import Event
from .keys import Keys


class SyncPublisher:
    """A thread-safe synchronous publisher for one app (redis-py's client pools connections)."""

    def __init__(self, settings: Settings) -> None:
        if settings.redis_url is None:
            raise StateError("publish_sync needs a redis_url (TOKIWA_REDIS_URL); the embedded "
                             "Redis is started by the async connect() only")
        self.settings = settings
        self.keys = Keys(settings.namespace)
        self.redis = redis.Redis.from_url(settings.redis_url, socket_timeout=10, socket_connect_timeout=5)
        self._ordered = self.redis.register_script(scripts.PUBLISH_ORDERED)
        self._group_ready = False
        self._lock = threading.Lock()

    def _ensure_group(self) -> None:
        if self._group_ready:
            return
        with self._lock:
            try:
                self.redis.xgroup_create(self.keys.events, self.settings.group, id="0", mkstream=True)
            except redis.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
            self._group_ready = True

    def _add(self, client: Any, event: Event, conversation_ids: Sequence[str]) -> Any:
        fields = checked_fields(event, self.settings.max_event_bytes)
        if conversation_ids:
            keys, args = ordered_publish(self.keys, fields, conversation_ids)
            return self._ordered(keys=keys, args=args, client=client)
        return client.xadd(self.keys.events, fields)

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
