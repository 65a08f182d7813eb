"""The Redis run store keeps run records by count as well as by age: a save that finds the
index more than 1% past ``max_records`` removes the oldest runs with their keys (real
redis-server)."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis

from orchestrator import Orchestrator
from orchestrator.errors import InvalidArgumentError
from orchestrator.runs.stores import DEFAULT_MAX_RECORDS, RedisRunStore

pytestmark = pytest.mark.timeout(60)

NOW = 1_800_000_000.0


def record(n: int, status: str = "succeeded", **extra):
    return {"run_id": f"r{n:04d}", "workflow_name": "flow", "status": status, "started_at": NOW + n,
            "owner_token": f"t{n}", **extra}


@pytest.fixture
async def client(redis_url):
    c = aioredis.Redis.from_url(redis_url)
    yield c
    await c.aclose()


def store(client, keys, max_records, **options):
    return RedisRunStore(client, keys, retention_s=3600, max_records=max_records, clock=lambda: NOW, **options)


async def run_keys(client, keys) -> set[str]:
    prefix = keys.run("")
    return {k.decode()[len(prefix):] async for k in client.scan_iter(match=f"{prefix}*")}


async def test_the_oldest_runs_go_with_their_logs_and_checkpoints_once_the_index_passes_the_cap(client, keys):
    runs = store(client, keys, 200)  # trims when past 202 (1% slack)
    for n in range(203):
        await runs.save(record(n))
        await runs.append_logs(record(n)["run_id"], ["line"])
        await client.hset(keys.run_nodes(record(n)["run_id"]), "a", b"x")
    assert await client.zcard(keys.runs) == 200
    kept = [x.decode() for x in await client.zrange(keys.runs, 0, -1)]
    assert kept == [record(n)["run_id"] for n in range(3, 203)], "the three oldest starts went"
    left = await run_keys(client, keys)
    for gone in ("r0000", "r0001", "r0002"):
        assert not {gone, f"{gone}:logs", f"{gone}:nodes"} & left
    assert {"r0003", "r0003:logs", "r0003:nodes"} <= left


async def test_the_index_grows_a_slack_past_the_cap_between_trims_so_most_saves_trim_nothing(client, keys):
    runs = store(client, keys, 1000)  # slack 10
    for n in range(1000):
        await runs.save(record(n))
    before = await zrange_calls(client)
    sizes = []
    for n in range(1000, 1100):
        await runs.save(record(n))
        sizes.append(await client.zcard(keys.runs))
    trims = await zrange_calls(client) - before
    assert max(sizes) == 1010 and min(sizes) == 1000
    assert trims == 100 // 11, f"one trim per 11 saves past the cap, not one per save ({trims} trims)"


async def zrange_calls(client) -> int:
    stats = await client.info("commandstats")
    return int(stats.get("cmdstat_zrange", {}).get("calls", 0))


async def test_a_running_run_is_never_removed_by_count(client, keys):
    runs = store(client, keys, 100)
    await runs.save_live([(record(0, status="running"), True)])
    for n in range(1, 103):
        await runs.save(record(n))
    ids = {x.decode() for x in await client.zrange(keys.runs, 0, -1)}
    assert "r0000" in ids and await client.hget(keys.run("r0000"), "status") == b"running"
    assert len(ids) <= 100 + runs.trim_slack + 1, "the cap, its slack, and the running run"


async def test_save_many_and_save_live_keep_the_bound_too(client, keys):
    runs = store(client, keys, 100)
    await runs.save_many([record(n) for n in range(150)])
    assert await client.zcard(keys.runs) == 100
    assert await runs.save_live([(record(n, status="running"), True) for n in range(150, 160)]) == [True] * 10
    ids = [x.decode() for x in await client.zrange(keys.runs, 0, -1)]
    assert len(ids) == 100 and ids[-10:] == [record(n)["run_id"] for n in range(150, 160)]


async def test_no_count_bound_when_max_records_is_zero(client, keys):
    runs = store(client, keys, 0)
    await runs.save_many([record(n) for n in range(300)])
    assert await client.zcard(keys.runs) == 300
    assert runs.max_records is None


@pytest.mark.parametrize("bad", [-1, 1.5, "10", True])
def test_a_bad_max_records_is_refused(client, keys, bad):
    with pytest.raises(InvalidArgumentError, match="max_records"):
        store(client, keys, bad)


async def test_the_app_builds_its_run_store_with_the_run_settings(redis_url, namespace):
    app = Orchestrator(redis_url=redis_url, namespace=namespace, run_records_max=500, run_retention_s=60)
    default = Orchestrator(redis_url=redis_url, namespace=namespace)
    try:
        await app.connect()
        await default.connect()
        assert (app.run_store.max_records, app.run_store.retention_s) == (500, 60)
        assert (default.run_store.max_records, default.run_store.retention_s) == (DEFAULT_MAX_RECORDS, 7 * 86_400)
    finally:
        await app.close()
        await default.close()
