"""Sentinel-managed master clients (``redis+sentinel://``), built by
:mod:`orchestrator.broker.connection`.

redis-py's Sentinel pool asks the sentinels for the master's address on every new connection
and, when a command meets READONLY (a demoted master), drops that connection and raises a
ConnectionError, which the client's retry resends on a new connection to the new master. That
is not enough on its own: after ``SENTINEL FAILOVER`` the old master keeps serving as a master
for about ten seconds, until the sentinels reconfigure it (measured on Redis 7.0: promoted
after 1.2 s, demoted after 11 s), so clients holding connections to it would go on writing
there, and those writes vanish when it resyncs. So the pool here also asks the sentinels
again, at most every :data:`MASTER_CHECK_S`, when a command takes a connection; when the
master moved it drops the idle connections to the old one and closes those in use as soon as
their command returns. Producers and workers follow a failover within about a second of the
promotion (plus a blocked read's ``block_ms``).

The sentinels themselves are asked with no resends (an unreachable sentinel is skipped for
the next at once) and with the same timeouts, keepalive and TLS as the Redis nodes.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, cast

import redis
import redis.asyncio as aioredis
from redis import exceptions as rx
from redis.asyncio.retry import Retry as AsyncRetry
from redis.asyncio.sentinel import Sentinel as AsyncSentinel
from redis.asyncio.sentinel import SentinelConnectionPool as AsyncSentinelPool
from redis.backoff import NoBackoff
from redis.retry import Retry as SyncRetry
from redis.sentinel import Sentinel as SyncSentinel
from redis.sentinel import SentinelConnectionPool as SyncSentinelPool

from orchestrator.urls import RedisUrl

log = logging.getLogger("tokiwa.broker")

#: a pool asks the sentinels where the master is at most this often (when a command takes a
#: connection): the longest time a client keeps writing to a master the sentinels replaced
MASTER_CHECK_S = 0.5


def _moved(service: str, old: Any, new: Any) -> None:
    log.warning("redis sentinel: the master of %r moved from %s to %s; reconnecting there", service,
                ":".join(map(str, old)), ":".join(map(str, new)))


class _CheckedAsyncPool(AsyncSentinelPool):
    """redis-py's asyncio Sentinel pool that re-checks the master (see the module docstring)."""

    def __init__(self, service_name: str, sentinel_manager: Any, **kwargs: Any) -> None:
        cast(Any, super()).__init__(service_name, sentinel_manager, **kwargs)  # untyped in redis-py
        self._checked_at = time.monotonic()
        self._checking = False

    async def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        if self.is_master and not self._checking and time.monotonic() - self._checked_at >= MASTER_CHECK_S:
            self._checking = True
            try:
                await self._check_master()
            finally:
                self._checking = False
        return await cast(Any, super()).get_connection(*args, **kwargs)

    async def _check_master(self) -> None:
        self._checked_at = time.monotonic()
        try:
            address = await self.get_master_address()
        except (rx.ConnectionError, rx.TimeoutError):
            return  # no sentinel answered: the next connect asks again and reports it
        self._mark_stale(address)

    async def get_master_address(self) -> Any:
        """The master's address from the sentinels; when it moved, the idle connections to the
        old one are dropped (by redis-py) and those in use are closed once their command
        returns (whichever path asked: a new connection, or the periodic check)."""
        old = self.master_address
        address = await cast(Any, super()).get_master_address()
        if old is not None and address != old:
            _moved(self.service_name, old, address)
            self._mark_stale(address)
        return address

    def _mark_stale(self, address: Any) -> None:
        for connection in list(self._in_use_connections):
            if connection.is_connected and (getattr(connection, "host", None),
                                            getattr(connection, "port", None)) != tuple(address):
                cast(Any, connection).mark_for_reconnect()  # closed when its command returns


class _CheckedSyncPool(SyncSentinelPool):
    """:class:`_CheckedAsyncPool` for the synchronous client (it drops connections in use on
    release by itself: they no longer belong to the master's address)."""

    def __init__(self, service_name: str, sentinel_manager: Any, **kwargs: Any) -> None:
        cast(Any, super()).__init__(service_name, sentinel_manager, **kwargs)  # untyped in redis-py
        self._checked_at = time.monotonic()
        self._check_lock = threading.Lock()
        self._seen: Any = None  # the master address the last check found

    def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        if self.is_master and time.monotonic() - self._checked_at >= MASTER_CHECK_S and \
                self._check_lock.acquire(blocking=False):
            try:
                self._checked_at = time.monotonic()
                address = cast(Any, self).get_master_address()  # drops the idle connections when it moved
                if self._seen is not None and address != self._seen:
                    _moved(self.service_name, self._seen, address)
                self._seen = address
            except (rx.ConnectionError, rx.TimeoutError):
                pass  # no sentinel answered: the next connect asks again and reports it
            finally:
                self._check_lock.release()
        return cast(Any, super()).get_connection(*args, **kwargs)


class AsyncSentinelMaster(aioredis.Redis):
    """The master client of a Sentinel service; closing it closes its sentinel clients too."""

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        manager = getattr(self.connection_pool, "sentinel_manager", None)
        await super().aclose(close_connection_pool)
        if manager is not None:
            await manager.aclose()


class SyncSentinelMaster(redis.Redis):
    """:class:`AsyncSentinelMaster` for the synchronous client."""

    def close(self) -> None:
        manager = getattr(self.connection_pool, "sentinel_manager", None)
        super().close()
        for sentinel in getattr(manager, "sentinels", ()):
            sentinel.close()


def async_master(target: RedisUrl, node: dict[str, Any], sentinel: dict[str, Any],
                 retry: AsyncRetry) -> aioredis.Redis:
    """The asyncio master client of ``target``'s service: ``node`` are the Redis nodes'
    connection options, ``sentinel`` the sentinels', ``retry`` the command retry policy."""
    manager: Any = cast(Any, AsyncSentinel)(  # untyped in redis-py
        list(target.nodes), sentinel_kwargs={**sentinel, "retry": AsyncRetry(NoBackoff(), 0)})
    return cast(aioredis.Redis, manager.master_for(
        cast(str, target.service), redis_class=AsyncSentinelMaster, connection_pool_class=_CheckedAsyncPool,
        db=target.db, retry=retry, retry_on_error=[rx.ConnectionError, rx.TimeoutError], **node))


def sync_master(target: RedisUrl, node: dict[str, Any], sentinel: dict[str, Any], retry: SyncRetry) -> redis.Redis:
    """:func:`async_master` for redis-py's synchronous client."""
    manager: Any = cast(Any, SyncSentinel)(  # untyped in redis-py
        list(target.nodes), sentinel_kwargs={**sentinel, "retry": SyncRetry(NoBackoff(), 0)})
    return cast(redis.Redis, manager.master_for(
        cast(str, target.service), redis_class=SyncSentinelMaster, connection_pool_class=_CheckedSyncPool,
        db=target.db, retry=retry, retry_on_error=[rx.ConnectionError, rx.TimeoutError], **node))
