"""The reference handler for the peers of the perf suite, synchronous: INCR and two ZADD in
one pipelined round trip on the task's own redis-py client (``benchmarks.perf_apps`` has the
asyncio one). ``$BENCH_REDIS_URL`` and ``$BENCH_NAMESPACE`` say where."""

from __future__ import annotations

import os
import threading
import time

import redis

REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
NAMESPACE = os.environ.get("BENCH_NAMESPACE", "perfpeer")
QUEUE = "perfref"
KEYS = (f"{NAMESPACE}:ref:count", f"{NAMESPACE}:ref:a", f"{NAMESPACE}:ref:b")
_local = threading.local()


def _client() -> redis.Redis:
    client = getattr(_local, "client", None)
    if client is None:
        client = _local.client = redis.Redis.from_url(REDIS_URL)
    return client


def reference_sync(member: str) -> None:
    now = time.time()
    pipe = _client().pipeline(transaction=False)
    pipe.incr(KEYS[0])
    pipe.zadd(KEYS[1], {member: now})
    pipe.zadd(KEYS[2], {member: -now})
    pipe.execute()
