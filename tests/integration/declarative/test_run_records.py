"""A workflow file's run record in the Redis run store, on a real redis-server."""

from __future__ import annotations

import redis.asyncio as aioredis

from orchestrator.declarative.files import run_workflow_file
from orchestrator.keys import Keys
from orchestrator.runs.stores import RedisRunStore


async def test_a_run_record_round_trips_through_the_redis_run_store(example_copy, tmp_path, redis_url, namespace):
    client = aioredis.Redis.from_url(redis_url)
    try:
        store = RedisRunStore(client, Keys(namespace))
        result = await run_workflow_file(example_copy, {"who": "Ada"}, artifacts_dir=tmp_path / "a", store=store)
        assert await store.get(result.run_id) == result.to_record()
        assert [r["run_id"] for r in await store.list(workflow="daily-report")] == [result.run_id]
        assert (await store.get_logs(result.run_id, tail=1))[0].endswith("[summarize] summarizing with token ***")
    finally:
        await client.aclose()
