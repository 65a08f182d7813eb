"""Redis connections built from a URL, with the timeouts tokiwa relies on.

``socket_timeout`` is longer than the longest XREADGROUP BLOCK so that a blocked read on a
half-open connection (server gone without a FIN) fails instead of hanging forever: a worker
then provably resumes consuming after a reconnect.
"""

from __future__ import annotations

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

# redis-py retries a command this many times on a dropped connection before raising.
COMMAND_RETRIES = 3


def create_redis(url: str, *, block_ms: int = 2_000, max_connections: int | None = None) -> aioredis.Redis:
    """An asyncio Redis client (bytes responses, hiredis parser when installed)."""
    return aioredis.Redis.from_url(
        url,
        decode_responses=False,
        socket_timeout=block_ms / 1000.0 + 5.0,
        socket_connect_timeout=5.0,
        socket_keepalive=True,
        health_check_interval=15,
        retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), COMMAND_RETRIES),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
        max_connections=max_connections,
    )
