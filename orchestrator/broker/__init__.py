"""The Redis side of events: connections (the one place every client is built), the
events stream and its Lua scripts, the consumer loop and the consumer groups (one per route),
delayed events, the synchronous publisher, bulk publishing, and the embedded redis-server.
"""

from __future__ import annotations

from orchestrator._lazy import lazy_exports

_EXPORTS = {
    "publish_file": "bulk",
    "read_events": "bulk",
    "LinkRetry": "connection",
    "SyncLinkRetry": "connection",
    "create_redis": "connection",
    "create_sync_redis": "connection",
    "keepalive_options": "connection",
    "read_block_ms": "connection",
    "Consumer": "consumer",
    "ConsumerFailed": "consumer",
    "Outcome": "consumer",
    "Stats": "consumer",
    "redelivery_delay_ms": "consumer",
    "DelayMover": "delayed",
    "DelayedEvents": "delayed",
    "EmbeddedRedis": "embedded",
    "find_redis_server": "embedded",
    "free_port": "embedded",
    "ConsumerGroups": "groups",
    "declare_groups": "groups",
    "group_names": "groups",
    "Delivery": "streams",
    "StreamBroker": "streams",
    "checked_fields": "streams",
    "dead_fields": "streams",
    "entry_summary": "streams",
    "id_bounds": "streams",
    "publish_once_call": "streams",
    "SyncPublisher": "sync_publish",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports('orchestrator.broker', _EXPORTS)
