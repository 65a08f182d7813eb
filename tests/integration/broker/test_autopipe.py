"""AutoPipeline on a real redis-server: concurrent callers share round trips, replies and
errors go to their own callers, scripts run through it (also after the server lost them), a
lost server fails the callers of the batch and the next batch reconnects, and a running app's
handlers share one pipeline through ``app.shared_redis``."""

from __future__ import annotations

import asyncio

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from orchestrator import Event, Orchestrator
from orchestrator.broker.autopipe import AutoPipeline
from orchestrator.broker.connection import create_redis
from orchestrator.errors import StateError

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def client(redis_url):
    c = create_redis(redis_url)
    yield c
    await c.aclose()


@pytest.fixture
async def pipe(client):
    ap = AutoPipeline(client)
    yield ap
    await ap.aclose()


async def test_many_concurrent_tasks_share_a_few_round_trips(pipe, namespace):
    key = f"{namespace}:n"

    async def task(i: int) -> list[int]:
        got = []
        for _ in range(20):
            got.append(await pipe.incr(key))
        return got

    results = await asyncio.gather(*(task(i) for i in range(50)))
    assert sorted(x for r in results for x in r) == list(range(1, 1001))
    assert all(r == sorted(r) for r in results)  # each task's commands kept their order
    # 1,000 commands from 50 concurrent tasks: about one batch per round of the tasks
    assert pipe.stats["commands"] == 1000
    assert pipe.stats["batches"] <= 60


async def test_replies_are_parsed_as_on_the_client_and_errors_stay_per_command(pipe, client, namespace):
    text, zset = f"{namespace}:text", f"{namespace}:z"
    await client.set(text, "abc")
    results = await asyncio.gather(
        pipe.incr(text), pipe.zadd(zset, {"a": 2.5}), pipe.zscore(zset, "a"), pipe.hgetall(f"{namespace}:none"),
        pipe.xadd(f"{namespace}:s", {"f": "v"}), return_exceptions=True)
    assert isinstance(results[0], ResponseError) and "not an integer" in str(results[0])
    assert results[1:4] == [1, 2.5, {}]
    assert isinstance(results[4], bytes) and b"-" in results[4]


async def test_a_group_is_one_unit_of_the_shared_batch(pipe, namespace):
    key = f"{namespace}:g"

    async def handler(i: int) -> list:
        group = pipe.pipeline()
        group.incr(key).zadd(f"{key}:z", {f"m{i}": i}).zcard(f"{key}:z")
        return await group.execute()

    replies = await asyncio.gather(*(handler(i) for i in range(64)))
    assert sorted(r[0] for r in replies) == list(range(1, 65))
    assert all(r[1] == 1 for r in replies)
    assert pipe.stats["batches"] == 1


async def test_scripts_run_through_it_also_after_the_server_lost_them(pipe, client, namespace):
    script = pipe.register_script("return redis.call('INCRBY', KEYS[1], ARGV[1])")
    key = f"{namespace}:script"
    assert await asyncio.gather(*(script(keys=[key], args=[2]) for _ in range(5))) == [2, 4, 6, 8, 10]
    await client.script_flush()
    assert await script(keys=[key], args=[1]) == 11  # NOSCRIPT: loaded again, run once


async def test_a_lost_server_fails_the_batch_and_the_next_batch_reconnects(own_redis):
    client = create_redis(own_redis.url, timeout_ms=2000)
    ap = AutoPipeline(client)
    try:
        assert await ap.set("k", "v") is True
        own_redis.stop()
        results = await asyncio.gather(ap.get("k"), ap.incr("n"), return_exceptions=True)
        assert all(isinstance(r, RedisConnectionError) for r in results)
        own_redis.start()
        assert await ap.get("k") == b"v"  # appendonly: the data survived the restart
    finally:
        await ap.aclose()
        await client.aclose()


async def test_the_app_handlers_share_one_pipeline(redis_url, namespace, sync_redis):
    app = Orchestrator(redis_url, namespace=namespace, concurrency=32)
    with pytest.raises(StateError, match="connect"):
        _ = app.shared_redis
    counter = f"{namespace}:handled"

    async def on_event(event) -> None:
        group = app.shared_redis.pipeline()
        group.incr(counter).sadd(f"{counter}:ids", event.id)
        await group.execute()

    app.dispatcher.subscribe("t.shared", on_event, name="shared")
    try:
        await app.connect()
        assert app.shared_redis is app.shared_redis
        await app.publish_many([Event("t.shared", {"n": i}) for i in range(200)])
        await app.drain(timeout=30)
        assert int(sync_redis.get(counter)) == 200
        assert sync_redis.scard(f"{counter}:ids") == 200
        stats = app.shared_redis.stats
        assert stats["commands"] == 400 and stats["batches"] < 200
    finally:
        await app.close()
