"""Link benchmarks: how fast a blackholed connection is noticed, and what publishing once costs.

- ``detect``: a client made by :func:`orchestrator.broker.connection.create_redis` talks to Redis
  through the fault proxy; the proxy blackholes at a random moment and we time until the fault
  model's CONNECTION condition starts (the worker's one warning line). Two clients: an idle
  worker (XREADGROUP BLOCK loop) and a busy one (a command every 20 ms). Median and max of
  :data:`TRIALS`, plus how long the blocked command takes to raise to its caller (redis-py
  retries it meanwhile).
- ``publish``: events/s of ``StreamBroker.publish_many`` of 20,000 events in one pipeline and
  of 2,000 one-by-one ``publish`` calls, with the once-only marker (``publish_dedup_ms``
  default) and without (plain XADD), and the Redis memory each marker holds while it lives.
  ``xadd_pipeline`` runs one pipeline of pre-encoded XADDs on a ``create_redis`` client and
  on a plain redis-py client: the cost of tokiwa's connection layer itself (reply hook, retry
  counting).
"""

from __future__ import annotations

import asyncio
import logging
import random
import statistics
import time
import uuid

import redis.asyncio as aioredis

from orchestrator.broker.connection import REDIS_TIMEOUT_MS, create_redis, read_block_ms
from orchestrator.broker.streams import StreamBroker
from orchestrator.config import Settings
from orchestrator.events import Event, encode_fields
from orchestrator.faults import Fault, condition, reset_conditions
from tests.faults.proxy import FaultProxy

TRIALS = 5
PAYLOAD = {"data": "x" * 120}  # ~200-byte encoded entries, as in broker_bench


# -- detection -------------------------------------------------------------------------------
async def _idle_reader(client: aioredis.Redis, stream: str) -> None:
    block = read_block_ms(2_000, REDIS_TIMEOUT_MS)
    while True:
        try:
            await client.xreadgroup("g", "c", {stream: ">"}, count=10, block=block)
        except Exception:
            await asyncio.sleep(0.1)


async def _busy_client(client: aioredis.Redis, key: str) -> None:
    while True:
        try:
            await client.incr(key)
        except Exception:
            pass
        await asyncio.sleep(0.02)


async def _detect_once(url: str, kind: str) -> float:
    reset_conditions()
    with FaultProxy.for_url(url) as proxy:
        client = create_redis(proxy.url, block_ms=2_000)
        name = f"linksbench:{uuid.uuid4().hex[:8]}"
        await client.xgroup_create(name, "g", id="0", mkstream=True)
        task = asyncio.create_task(_idle_reader(client, name) if kind == "idle" else _busy_client(client, name + ":n"))
        await asyncio.sleep(1.0 + random.uniform(0, 2.0))  # any moment of a block
        cut = time.monotonic()
        proxy.blackhole()
        cond = condition(Fault.CONNECTION)
        while cond.since is None and time.monotonic() - cut < 30:
            await asyncio.sleep(0.01)
        detected = (cond.since or time.monotonic()) - cut
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        proxy.heal()
        await client.delete(name, name + ":n")
        await client.aclose()
    return detected


async def _surfaces(url: str) -> float:
    """Seconds until a command written into a blackhole raises to its caller."""
    with FaultProxy.for_url(url) as proxy:
        client = create_redis(proxy.url)
        await client.ping()
        proxy.blackhole()
        started = time.monotonic()
        try:
            await client.ping()
        except Exception:
            pass
        took = time.monotonic() - started
        proxy.heal()
        await client.aclose()
    return took


async def detect(url: str) -> dict:
    out: dict = {"redis_timeout_ms": REDIS_TIMEOUT_MS}
    for kind in ("idle", "busy"):
        times = [await _detect_once(url, kind) for _ in range(TRIALS)]
        out[f"{kind}_median_s"] = statistics.median(times)
        out[f"{kind}_max_s"] = max(times)
    out["command_raises_after_s"] = await _surfaces(url)
    reset_conditions()
    return out


# -- publish cost ----------------------------------------------------------------------------
async def _memory(client: aioredis.Redis) -> int:
    return int((await client.info("memory"))["used_memory"])


async def _publish_rates(url: str, dedup_ms: int, n: int, singles: int) -> dict:
    namespace = f"linksbench{uuid.uuid4().hex[:8]}"
    client = create_redis(url)
    broker = StreamBroker(client, Settings(redis_url=url, namespace=namespace, publish_dedup_ms=dedup_ms))
    await broker.ensure_group()
    await broker.publish(Event("bench.noop", PAYLOAD))  # loads the script
    events = [Event("bench.noop", PAYLOAD) for _ in range(n)]
    before = await _memory(client)
    t0 = time.perf_counter()
    await broker.publish_many(events)
    t1 = time.perf_counter()
    grown = await _memory(client) - before
    t2 = time.perf_counter()
    for _ in range(singles):
        await broker.publish(Event("bench.noop", PAYLOAD))
    t3 = time.perf_counter()
    await client.delete(broker.stream)
    cursor = 0
    while True:  # drop this run's markers
        cursor, found = await client.scan(cursor, match=f"{{{namespace}:0}}:published:*", count=5000)
        if found:
            await client.delete(*found)
        if cursor == 0:
            break
    await client.aclose()
    return {"pipeline_per_s": n / (t1 - t0), "single_per_s": singles / (t3 - t2), "memory_bytes": grown}


async def _xadd_pipeline(client: aioredis.Redis, n: int) -> float:
    stream = f"linksbench:raw:{uuid.uuid4().hex[:8]}"
    fields = [encode_fields(Event("bench.noop", PAYLOAD)) for _ in range(n)]
    await client.ping()
    t0 = time.perf_counter()
    pipe = client.pipeline(transaction=False)
    for f in fields:
        pipe.xadd(stream, f)
    await pipe.execute()
    took = time.perf_counter() - t0
    await client.delete(stream)
    await client.aclose()
    return n / took


async def publish(url: str, n: int = 20_000, singles: int = 2_000, rounds: int = 3) -> dict:
    runs: dict[str, list[dict]] = {"dedup": [], "plain": []}
    for _ in range(rounds):
        runs["dedup"].append(await _publish_rates(url, 60_000, n, singles))
        runs["plain"].append(await _publish_rates(url, 0, n, singles))
    out: dict = {"events": n, "singles": singles}
    for name, results in runs.items():
        out[name] = {key: statistics.median(r[key] for r in results) for key in results[0]}
    out["dedup_cost_pipeline"] = 1 - out["dedup"]["pipeline_per_s"] / out["plain"]["pipeline_per_s"]
    out["dedup_cost_single"] = 1 - out["dedup"]["single_per_s"] / out["plain"]["single_per_s"]
    out["marker_bytes"] = (out["dedup"]["memory_bytes"] - out["plain"]["memory_bytes"]) / n
    ours, plain = [], []
    for _ in range(rounds):
        ours.append(await _xadd_pipeline(create_redis(url), n))
        plain.append(await _xadd_pipeline(aioredis.Redis.from_url(url), n))
    out["xadd_pipeline"] = {"create_redis_per_s": statistics.median(ours),
                            "plain_redis_py_per_s": statistics.median(plain)}
    return out


async def run(url: str) -> dict:
    faults_log = logging.getLogger("tokiwa.faults")
    level = faults_log.level
    faults_log.setLevel(logging.ERROR)  # the outage lines of the trials are expected
    try:
        return {"detect": await detect(url), "publish": await publish(url)}
    finally:
        faults_log.setLevel(level)


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(asyncio.run(run(sys.argv[1])), indent=2))
