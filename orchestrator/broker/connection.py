"""Redis clients built from a URL: the one place that sets the timeouts, TCP keepalive, health
checks and retry policy of every tokiwa client (asyncio and synchronous).

Dead links. A link that blackholes (no FIN, no RST) shows only as silence; three things turn
the silence into an error within seconds, so the client reconnects:

- the socket timeout, ``Settings.redis_timeout_ms`` (default 3 s), bounds every connect and
  every wait for a reply. A command that waits longer fails with a timeout and redis-py drops
  that connection. Blocking commands therefore wait less than it: a worker's XREADGROUP BLOCK is
  :func:`read_block_ms`, ``run_workflow`` BLPOPs in 1 s slices.
- TCP keepalive (idle 5 s, a probe a second, 3 probes) and, on Linux, ``TCP_USER_TIMEOUT``
  (data unacknowledged for the socket timeout): the kernel drops a connection whose peer is
  gone even while no command waits on it.
- health checks: a connection that sat idle in the pool for :data:`HEALTH_CHECK_INTERVAL_S`
  PINGs before its next command, so the command is not written into a connection that died
  while unused.

Retries. redis-py resends a command that failed with a connection error or a timeout, up to
:data:`COMMAND_RETRIES` times, reconnecting in between with jittered backoff. A timed-out
command may have run, so only idempotent commands may go through that: connection setup
(HELLO, AUTH, CLIENT SETINFO, SELECT, PING), XGROUP CREATE (a second one answers BUSYGROUP),
script loading, and publishing, which goes through the PUBLISH_ONCE script (a resent publish
finds its marker and returns the first stream id). Errors of the fault classes that never pass
by themselves (auth, ACL) are raised at once, not retried.

One line per outage. Every failure redis-py meets counts against the process-wide CONNECTION
condition of :mod:`orchestrator.faults`, the one the components report to: the first that is
an outage (a timeout, or a reconnect that fails too) logs the warning, and the first reply read
after it logs the recovery (a reply, not a connect: a TCP connect into a half-open path
succeeds). A connection that the server closed while it was idle, which redis-py replaces at
once, is no outage and logs nothing.
"""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable
from functools import cache
from typing import Any, TypeVar

import redis
import redis.asyncio as aioredis
from redis import exceptions as rx
from redis.asyncio.connection import AbstractConnection as AsyncConnection
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import EqualJitterBackoff
from redis.retry import Retry as SyncRetry

from orchestrator import faults
from orchestrator.faults import Fault

T = TypeVar("T")

#: default of ``Settings.redis_timeout_ms``: longest wait for a connect or a reply
REDIS_TIMEOUT_MS = 3_000
#: redis-py resends a command this many times on a connection error or timeout before raising
COMMAND_RETRIES = 3
#: a connection idle in the pool this long PINGs before its next command
HEALTH_CHECK_INTERVAL_S = 5
#: TCP keepalive: first probe after this many idle seconds, then one a second, 3 unanswered
#: probes drop the connection
KEEPALIVE_IDLE_S, KEEPALIVE_INTERVAL_S, KEEPALIVE_PROBES = 5, 1, 3
#: a blocking read leaves at least this much of the socket timeout for the reply (and at least
#: a third of it)
READ_MARGIN_MIN_MS = 250


def _retry_backoff() -> EqualJitterBackoff:
    return EqualJitterBackoff(cap=1.0, base=0.05)


def read_block_ms(block_ms: int, timeout_ms: int = REDIS_TIMEOUT_MS) -> int:
    """The XREADGROUP BLOCK to use: ``block_ms``, but short enough that the reply comes well
    within the socket timeout (a blocked read is then never mistaken for a dead link)."""
    margin = max(READ_MARGIN_MIN_MS, timeout_ms // 3)
    return max(10, min(block_ms, timeout_ms - margin))


def keepalive_options(timeout_ms: int = REDIS_TIMEOUT_MS) -> dict[int, int]:
    """TCP-level socket options (``IPPROTO_TCP``) for a Redis connection, those this platform
    has: keepalive timing, and ``TCP_USER_TIMEOUT`` (Linux) so that data the peer never
    acknowledges fails the connection after ``timeout_ms``."""
    wanted = [("TCP_KEEPIDLE", KEEPALIVE_IDLE_S), ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL_S),
              ("TCP_KEEPCNT", KEEPALIVE_PROBES), ("TCP_USER_TIMEOUT", timeout_ms)]
    if not hasattr(socket, "TCP_KEEPIDLE"):  # macOS spells the idle time TCP_KEEPALIVE
        wanted[0] = ("TCP_KEEPALIVE", KEEPALIVE_IDLE_S)
    return {getattr(socket, name): value for name, value in wanted if hasattr(socket, name)}


def _is_tcp(url: str) -> bool:
    return url.startswith(("redis://", "rediss://"))


def _options(url: str, timeout_s: float, max_connections: int | None) -> dict[str, Any]:
    options: dict[str, Any] = {
        "socket_timeout": timeout_s,
        "socket_connect_timeout": timeout_s,
        "health_check_interval": HEALTH_CHECK_INTERVAL_S,
        "max_connections": max_connections,
    }
    if _is_tcp(url):  # unix sockets take no keepalive options
        options["socket_keepalive"] = True
        options["socket_keepalive_options"] = keepalive_options(int(timeout_s * 1000))
    return options


# -- how a failure inside redis-py's retry counts ---------------------------------------------
def _counted(error: Exception, failures: int) -> None:
    """Count one failure redis-py met; raise it when its class is not worth a retry."""
    fault = faults.classify(error)
    if fault is not Fault.CONNECTION:
        raise error  # auth / ACL errors subclass ConnectionError in redis-py: fail at once
    if failures > 1 or isinstance(error, (rx.TimeoutError, TimeoutError)):
        faults.report(error)  # an outage: logs once, whichever client or component is first


class LinkRetry(AsyncRetry):
    """redis-py's asyncio retry, counting failures against the fault model.

    Only counts: redis-py's own retry loop decides when to resend and how long to wait."""

    async def call_with_retry(self, do: Callable[[], Awaitable[T]], fail: Callable[..., Any],
                              *args: Any, **kwargs: Any) -> T:
        failures = 0

        async def counted_fail(error: Exception, *rest: Any) -> None:
            nonlocal failures
            failures += 1
            await fail(error, *rest)
            _counted(error, failures)

        return await super().call_with_retry(do, counted_fail, *args, **kwargs)


class SyncLinkRetry(SyncRetry):
    """:class:`LinkRetry` for redis-py's synchronous client."""

    def call_with_retry(self, do: Callable[[], T], fail: Callable[..., Any],
                        *args: Any, **kwargs: Any) -> T:
        failures = 0

        def counted_fail(error: Exception, *rest: Any) -> None:
            nonlocal failures
            failures += 1
            fail(error, *rest)
            _counted(error, failures)

        return super().call_with_retry(do, counted_fail, *args, **kwargs)


@cache
def _replying(connection_class: type) -> type:
    """``connection_class`` whose every reply read (error replies too) ends an outage."""
    if issubclass(connection_class, AsyncConnection):
        async def read_response(self: Any, *args: Any, **kwargs: Any) -> Any:
            try:
                response = await base.read_response(self, *args, **kwargs)
            except rx.ResponseError:
                faults.recovered(Fault.CONNECTION)
                raise
            faults.recovered(Fault.CONNECTION)
            return response
    else:
        def read_response(self: Any, *args: Any, **kwargs: Any) -> Any:  # type: ignore[misc]
            try:
                response = base.read_response(self, *args, **kwargs)
            except rx.ResponseError:
                faults.recovered(Fault.CONNECTION)
                raise
            faults.recovered(Fault.CONNECTION)
            return response
    base: Any = connection_class  # the class read at call time, so its read_response is found there
    return type(f"Tokiwa{connection_class.__name__}", (connection_class,), {"read_response": read_response})


def _hooked(client: T) -> T:
    pool = client.connection_pool  # type: ignore[attr-defined]
    pool.connection_class = _replying(pool.connection_class)
    return client


def create_redis(url: str, *, timeout_ms: int = REDIS_TIMEOUT_MS, block_ms: int | None = None,
                 max_connections: int | None = None) -> aioredis.Redis:
    """An asyncio Redis client (bytes responses, hiredis parser when installed).

    ``timeout_ms`` is ``Settings.redis_timeout_ms``. ``block_ms`` is the longest BLOCK the
    caller's reads use; should it not leave room within ``timeout_ms`` (see
    :func:`read_block_ms`), the socket timeout grows to fit it, so a blocked read never fails
    as a dead link."""
    timeout = timeout_ms
    if block_ms is not None:
        timeout = max(timeout, block_ms + max(READ_MARGIN_MIN_MS, timeout_ms // 3))
    return _hooked(aioredis.Redis.from_url(
        url,
        decode_responses=False,
        retry=LinkRetry(_retry_backoff(), COMMAND_RETRIES),
        retry_on_error=[rx.ConnectionError, rx.TimeoutError],
        **_options(url, timeout / 1000.0, max_connections),
    ))


def create_sync_redis(url: str, *, timeout_ms: int = REDIS_TIMEOUT_MS,
                      max_connections: int | None = None) -> redis.Redis:
    """A synchronous Redis client with the same timeouts, keepalive and retry policy."""
    return _hooked(redis.Redis.from_url(
        url,
        decode_responses=False,
        retry=SyncLinkRetry(_retry_backoff(), COMMAND_RETRIES),
        retry_on_error=[rx.ConnectionError, rx.TimeoutError],
        **_options(url, timeout_ms / 1000.0, max_connections),
    ))
