"""The app's link to Redis: the shared embedded redis-server (when no URL is set), the asyncio client
built with the settings' timeouts, and the :class:`~orchestrator.broker.streams.StreamBroker` on it. ``Orchestrator.connect()`` and
``close()`` delegate here.

Opening sets each part as soon as it exists, so a failure part way (the group not created
because Redis is down) leaves what was built in place: ``close()`` still releases it, and the
app does not build a second client over it.
"""

from __future__ import annotations

import asyncio
import logging

import redis.asyncio as aioredis

from orchestrator.broker.connection import create_redis, read_block_ms
from orchestrator.broker.durable import wait_block_ms
from orchestrator.broker.embedded import SharedEmbeddedRedis
from orchestrator.broker.streams import StreamBroker
from orchestrator.config import Settings
from orchestrator.errors import StateError

log = logging.getLogger("tokiwa")


class BrokerSession:
    """The embedded server it uses (optional), a Redis client and a broker, opened and closed
    together. The embedded server is shared by every process of the state directory: closing
    the session leaves it running (``tokiwa-producer redis stop`` stops it)."""

    __slots__ = ("embedded", "redis", "broker")

    def __init__(self) -> None:
        self.embedded: SharedEmbeddedRedis | None = None
        self.redis: aioredis.Redis | None = None
        self.broker: StreamBroker | None = None

    async def open(self, settings: Settings, consumer: str, *, routes: int = 1) -> None:
        """Connect to ``settings.redis_url`` (or, if it is unset, to the shared embedded
        redis-server of ``settings.state_dir``, started if none runs) and build the broker for
        ``consumer``. The consumer groups are the app's (one per route:
        :mod:`orchestrator.broker.groups`); ``routes`` sizes the connection pool (each route's
        consumer has ``concurrency`` slots)."""
        url = settings.redis_url
        if url is None:
            self.embedded = SharedEmbeddedRedis(settings.state_dir)
            url = await asyncio.to_thread(self.embedded.ensure)
            log.info("%s the embedded redis-server at %s (files in %s)",
                     "started" if self.embedded.started else "using", url, self.embedded.dir)
        # every slot of every route may hold a connection (plus each route's read, ack and
        # renewal, heartbeats, the delay mover and the cancel watcher)
        slots = settings.concurrency * max(1, routes)
        self.redis = create_redis(url, timeout_ms=settings.redis_timeout_ms,
                                  block_ms=max(read_block_ms(settings.block_ms, settings.redis_timeout_ms),
                                               wait_block_ms(settings)),  # a durable publish's WAIT blocks too
                                  max_connections=max(100, 2 * slots + 4 * max(1, routes) + 32))
        self.broker = StreamBroker(self.redis, settings, consumer)

    @property
    def embedded_url(self) -> str | None:
        """The embedded server's URL, None when the session uses ``settings.redis_url``."""
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
        """Close the client (an embedded server keeps running for the other processes). Idempotent."""
        if self.redis is not None:
            await self.redis.aclose()
        self.redis = None
        self.broker = None
        self.embedded = None
