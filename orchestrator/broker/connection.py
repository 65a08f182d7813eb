"""Redis clients built from a URL: the one place that sets the timeouts, TCP keepalive, health
checks and retry policy of every tokiwa client (asyncio and synchronous).

Topologies, by the URL's scheme (:mod:`orchestrator.urls`): one Redis (``redis://``,
``rediss://``, ``unix://``); a Sentinel-managed master (``redis+sentinel://``:
:mod:`orchestrator.broker.sentinel`, which follows a failover); a Redis Cluster
(``redis+cluster://``: redis-py's cluster client, which follows MOVED / ASK itself). The same
options apply to each; :func:`create_pubsub_redis` gives a client for pub/sub on any of them.

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
from typing import Any, TypeVar, cast

import redis
import redis.asyncio as aioredis
from redis import exceptions as rx
from redis.asyncio.cluster import ClusterNode as AsyncClusterNode
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.asyncio.connection import AbstractConnection as AsyncConnection
from redis.asyncio.connection import Connection as AsyncTCPConnection
from redis.asyncio.connection import SSLConnection as AsyncSSLConnection
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import EqualJitterBackoff
from redis.cluster import ClusterNode as SyncClusterNode
from redis.cluster import RedisCluster as SyncRedisCluster
from redis.retry import Retry as SyncRetry

from orchestrator import faults
from orchestrator.broker import sentinel
from orchestrator.faults import Fault
from orchestrator.urls import RedisUrl, Topology, parse_redis_url, scheme_of

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
    return scheme_of(url) != "unix"


def _options(url: str, timeout_s: float, max_connections: int | None) -> dict[str, Any]:
    options: dict[str, Any] = {
        "socket_timeout": timeout_s,
        "socket_connect_timeout": timeout_s,
        "health_check_interval": HEALTH_CHECK_INTERVAL_S,
    }
    if max_connections is not None:
        options["max_connections"] = max_connections
    if _is_tcp(url):  # unix sockets take no keepalive options
        options["socket_keepalive"] = True
        options["socket_keepalive_options"] = keepalive_options(int(timeout_s * 1000))
    return options


# -- how a failure inside redis-py's retry counts ---------------------------------------------
def _counted(error: Exception, failures: int) -> None:
    """Count one failure redis-py met; raise it when its class is not worth a retry."""
    fault = faults.classify(error)
    if fault is Fault.FAILOVER:  # Sentinel: the demoted master's READONLY, no master known yet
        faults.report(error)  # one line per failover, whichever client or component is first
        return
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
            faults.recovered(Fault.CONNECTION, Fault.FAILOVER)
            return response
    else:
        def read_response(self: Any, *args: Any, **kwargs: Any) -> Any:  # type: ignore[misc]
            try:
                response = base.read_response(self, *args, **kwargs)
            except rx.ResponseError:
                faults.recovered(Fault.CONNECTION)
                raise
            faults.recovered(Fault.CONNECTION, Fault.FAILOVER)
            return response
    base: Any = connection_class  # the class read at call time, so its read_response is found there
    return type(f"Tokiwa{connection_class.__name__}", (connection_class,), {"read_response": read_response})


def _hooked(client: T) -> T:
    pool = client.connection_pool  # type: ignore[attr-defined]
    pool.connection_class = _replying(pool.connection_class)
    return client


# -- the clients ------------------------------------------------------------------------------
def _socket_timeout_ms(timeout_ms: int, block_ms: int | None) -> int:
    """``timeout_ms``, grown so that a command blocking ``block_ms`` still gets its reply in time."""
    if block_ms is None:
        return timeout_ms
    return max(timeout_ms, block_ms + max(READ_MARGIN_MIN_MS, timeout_ms // 3))


def create_redis(url: str, *, timeout_ms: int = REDIS_TIMEOUT_MS, block_ms: int | None = None,
                 max_connections: int | None = None, retries: int = COMMAND_RETRIES,
                 counted: bool = True) -> aioredis.Redis:
    """An asyncio client for ``url`` (bytes responses, hiredis parser when installed): a plain
    client, a Sentinel-managed master client, or a Redis Cluster client, by the URL's scheme
    (:mod:`orchestrator.urls`).

    ``timeout_ms`` is ``Settings.redis_timeout_ms``. ``block_ms`` is the longest BLOCK the
    caller's reads use; should it not leave room within ``timeout_ms`` (see
    :func:`read_block_ms`), the socket timeout grows to fit it, so a blocked read never fails
    as a dead link. ``retries`` is how often redis-py resends a command after a connection
    error (0 for callers that never resend blindly); ``counted=False`` leaves the fault model's
    bookkeeping out (a one-shot probe whose failure its caller reports).

    A cluster client is a ``redis.asyncio.cluster.RedisCluster``: it has the same command
    methods (typed as ``Redis`` here), follows MOVED and ASK itself, and refuses scripts in
    pipelines; :func:`is_cluster` tells the two apart."""
    target = parse_redis_url(url)
    options = _options(url, _socket_timeout_ms(timeout_ms, block_ms) / 1000.0, max_connections)
    retry: AsyncRetry = (LinkRetry if counted else AsyncRetry)(_retry_backoff(), retries)
    if target.topology is Topology.SENTINEL:
        client = sentinel.async_master(target, _node_options(target, options), _sentinel_options(target, options),
                                       retry)
    elif target.topology is Topology.CLUSTER:
        return cast(aioredis.Redis, _async_cluster(target, options, retry))
    else:
        client = aioredis.Redis.from_url(url, decode_responses=False, retry=retry,
                                         retry_on_error=[rx.ConnectionError, rx.TimeoutError], **options)
    return _hooked(client) if counted else client


def create_sync_redis(url: str, *, timeout_ms: int = REDIS_TIMEOUT_MS, block_ms: int | None = None,
                      max_connections: int | None = None, retries: int = COMMAND_RETRIES) -> redis.Redis:
    """A synchronous client for ``url`` (any scheme), with the same timeouts, keepalive and
    retry policy as :func:`create_redis` (a cluster client is a ``redis.cluster.RedisCluster``)."""
    target = parse_redis_url(url)
    options = _options(url, _socket_timeout_ms(timeout_ms, block_ms) / 1000.0, max_connections)
    retry = SyncLinkRetry(_retry_backoff(), retries)
    if target.topology is Topology.SENTINEL:
        return _hooked(sentinel.sync_master(target, _node_options(target, options),
                                            _sentinel_options(target, options), retry))
    if target.topology is Topology.CLUSTER:
        return cast(redis.Redis, _sync_cluster(target, options, retry))
    return _hooked(redis.Redis.from_url(url, decode_responses=False, retry=retry,
                                        retry_on_error=[rx.ConnectionError, rx.TimeoutError], **options))


def create_pubsub_redis(url: str, *, timeout_ms: int = REDIS_TIMEOUT_MS, retries: int = 0,
                        counted: bool = True) -> aioredis.Redis:
    """An asyncio client good for PUBLISH, SUBSCRIBE and PSUBSCRIBE on any topology.

    On one Redis and behind Sentinel it is :func:`create_redis`'s client (a Sentinel failover
    closes pub/sub connections; the next connect finds the new master). On a cluster, where
    PUBLISH reaches the subscribers of every node, it is a plain client to one node: each
    (re)connect tries the URL's nodes in turn, starting with the one that last answered, so a
    node that failed is replaced by the next. List several nodes in the URL for that."""
    target = parse_redis_url(url)
    if target.topology is not Topology.CLUSTER:
        return create_redis(url, timeout_ms=timeout_ms, retries=retries, counted=counted)
    options = _options(url, timeout_ms / 1000.0, None)
    connection_class = _rotating(AsyncSSLConnection if target.tls else AsyncTCPConnection)
    pool = aioredis.ConnectionPool(
        connection_class=_replying(connection_class) if counted else connection_class,
        nodes=target.nodes, turn=[0], username=target.username, password=target.password,
        decode_responses=False, retry=(LinkRetry if counted else AsyncRetry)(_retry_backoff(), retries),
        retry_on_error=[rx.ConnectionError, rx.TimeoutError], **options, **target.node_options)
    return aioredis.Redis.from_pool(pool)


def is_cluster(client: object) -> bool:
    """Whether ``client`` is a Redis Cluster client (asyncio or synchronous)."""
    return isinstance(client, (AsyncRedisCluster, SyncRedisCluster))


def topology(url: str) -> Topology:
    """What ``url`` reaches: one Redis, a Sentinel-managed master, or a cluster."""
    return parse_redis_url(url).topology


# -- Sentinel and Cluster options ------------------------------------------------------------
def _node_options(target: RedisUrl, options: dict[str, Any]) -> dict[str, Any]:
    """Connection options of the Redis nodes: login, TLS, the URL's query options."""
    node: dict[str, Any] = {**options, "decode_responses": False, "username": target.username,
                            "password": target.password, **target.node_options}
    if target.tls:
        node["ssl"] = True
    return node


def _sentinel_options(target: RedisUrl, options: dict[str, Any]) -> dict[str, Any]:
    """Connection options of the sentinels: the same timeouts and TLS, their own login."""
    wanted = {k: v for k, v in options.items() if k.startswith("socket_")}
    tls = {k: v for k, v in target.node_options.items() if k.startswith("ssl_")}
    return {**wanted, **target.sentinel_auth, **({"ssl": True, **tls} if target.tls else {})}


# -- Cluster ----------------------------------------------------------------------------------
def _async_cluster(target: RedisUrl, options: dict[str, Any], retry: AsyncRetry) -> AsyncRedisCluster:
    """redis-py's asyncio cluster client: it follows MOVED / ASK, retries TRYAGAIN and, after
    a connection error or CLUSTERDOWN, reloads the slot map and tries again (``retry``'s count
    of times); what still fails reaches the caller's fault policy."""
    return AsyncRedisCluster(startup_nodes=[AsyncClusterNode(h, p) for h, p in target.nodes],
                             retry=retry, **_node_options(target, options))


def _sync_cluster(target: RedisUrl, options: dict[str, Any], retry: SyncRetry) -> SyncRedisCluster:
    node = _node_options(target, options)
    if node.pop("ssl", False):  # the synchronous cluster's node pools take the class, not the flag
        node["connection_class"] = redis.SSLConnection
    seeds = [cast(Any, SyncClusterNode)(h, p) for h, p in target.nodes]  # untyped in redis-py
    return SyncRedisCluster(startup_nodes=seeds, retry=retry, **node)


@cache
def _rotating(connection_class: type) -> type:
    """``connection_class`` that connects to the first of a shared list of nodes that accepts,
    starting with the one that answered last (the cluster pub/sub client's)."""

    class Rotating(connection_class):  # type: ignore[misc]
        def __init__(self, *, nodes: tuple[tuple[str, int], ...], turn: list[int], **kwargs: Any) -> None:
            self._nodes, self._turn = nodes, turn
            host, port = nodes[turn[0] % len(nodes)]
            super().__init__(host=host, port=port, **kwargs)

        async def _connect(self) -> None:
            error: BaseException | None = None
            for _ in range(len(self._nodes)):
                self.host, self.port = self._nodes[self._turn[0] % len(self._nodes)]
                try:
                    await super()._connect()
                    return
                except (TimeoutError, OSError) as exc:
                    error = exc
                    self._turn[0] += 1
            raise cast(BaseException, error)

    Rotating.__name__ = f"NodeRotating{connection_class.__name__}"
    return Rotating
