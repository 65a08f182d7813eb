"""The app's link to Redis: the embedded redis-server (when no URL is set), the asyncio client
built with the settings' timeouts, the :class:`~orchestrator.broker.streams.StreamBroker` on it,
and the consumer group, created under the fault policy. ``Orchestrator.connect()`` and
``close()`` delegate here.

Opening sets each part as soon as it exists, so a failure part way (the group not created
because Redis is down) leaves what was built in place: ``close()`` still releases it, and the
app does not build a second client over it.
"""

from __future__ import annotations

import asyncio
import logging

import redis.asyncio as aioredis

from orchestrator import faults
from orchestrator.broker.connection import create_redis, read_block_ms
from orchestrator.broker.embedded import EmbeddedRedis
from orchestrator.broker.streams import StreamBroker
from orchestrator.config import Settings
from orchestrator.errors import StateError

log = logging.getLogger("tokiwa")


class BrokerSession:
    """An embedded server (optional), a Redis client and a broker, opened and closed together."""

    __slots__ = ("embedded", "redis", "broker")

    def __init__(self) -> None:
        self.embedded: EmbeddedRedis | None = None
        self.redis: aioredis.Redis | None = None
        self.broker: StreamBroker | None = None

    async def open(self, settings: Settings, consumer: str, *, wait_for_group: bool) -> None:
        """Connect to ``settings.redis_url`` (or start an embedded redis-server if it is
        unset), build the broker for ``consumer`` and create the consumer group.

        ``wait_for_group`` (a worker) waits for Redis (unreachable, loading, full without a
        group yet) as its consumer would, logging once per condition; otherwise (callers that
        publish) the first failure is raised."""
        url = settings.redis_url
        if url is None:
            self.embedded = EmbeddedRedis(settings.state_dir / "redis")
            await asyncio.to_thread(self.embedded.start)
            url = self.embedded.url
            log.info("started embedded redis-server at %s", url)
        # every slot may hold a connection (plus reads, acks, renewals, heartbeats)
        self.redis = create_redis(url, timeout_ms=settings.redis_timeout_ms,
                                  block_ms=read_block_ms(settings.block_ms, settings.redis_timeout_ms),
                                  max_connections=max(100, 2 * settings.concurrency + 32))
        self.broker = broker = StreamBroker(self.redis, settings, consumer)
        if wait_for_group:
            await faults.retry_transient(broker.ensure_group)
        else:
            await broker.ensure_group()

    @property
    def embedded_url(self) -> str | None:
        """The embedded server's URL, None when none was started."""
        return self.embedded.url if self.embedded is not None else None

    def client(self) -> aioredis.Redis:
        """The Redis client; StateError when not open."""
        if self.redis is None:
            raise StateError("not connected to Redis: call connect() first")
        return self.redis

    def stream_broker(self) -> StreamBroker:
        """The broker; StateError when not open."""
        if self.broker is None:
            raise StateError("not connected to Redis: call connect() first")
        return self.broker

    async def close(self) -> None:
        """Close the client and stop an embedded server. Idempotent."""
        if self.redis is not None:
            await self.redis.aclose()
        self.redis = None
        self.broker = None
        if self.embedded is not None:
            await asyncio.to_thread(self.embedded.stop)
            self.embedded = None
