"""One specification, run against every run store (memory, file, and Redis on a real server)."""

from __future__ import annotations

import json

import msgpack
import pytest
import redis.asyncio as aioredis

from orchestrator.errors import InvalidArgumentError
from orchestrator.keys import Keys
from orchestrator.runs.stores import FileRunStore, InMemoryRunStore, RedisRunStore, RunStore

NOW = 1_800_000_000.0


class Clock:
    def __init__(self, now: float = NOW):
        self.now = now

    def __call__(self) -> float:
        return self.now


def record(run_id: str, started_at: float, *, status: str = "succeeded", workflow: str = "order-flow", **extra):
    return {
        "run_id": run_id,
        "workflow_id": f"id-{workflow}",
        "workflow_name": workflow,
        "status": status,
        "started_at": started_at,
        "finished_at": started_at + 1.5,
        "duration_ms": 1500,
        "error": None,
        "nodes": {"a": {"status": status, "output": [1, 2, {"k": "v"}]}},
        **extra,
    }


@pytest.fixture(params=["memory", "file", "redis"])
async def store(request, tmp_path, redis_url, namespace):
    clock = Clock()
    if request.param == "memory":
        yield InMemoryRunStore(max_log_lines=5, clock=clock)
    elif request.param == "file":
        yield FileRunStore(tmp_path / "runs", max_log_lines=5, clock=clock)
    else:
        client = aioredis.Redis.from_url(redis_url)
        yield RedisRunStore(client, Keys(namespace), max_log_lines=5, clock=clock)
        await client.aclose()


async def test_a_saved_record_is_returned_unchanged_by_get(store: RunStore):
    saved = record("r1", NOW - 10)
    await store.save(saved)
    assert await store.get("r1") == saved


async def test_get_of_an_unknown_run_returns_none(store: RunStore):
    assert await store.get("nope") is None


async def test_saving_again_replaces_the_record(store: RunStore):
    await store.save(record("r1", NOW - 10, status="running", error={"name": "X", "message": "m"}))
    await store.save(record("r1", NOW - 10, status="failed"))
    got = await store.get("r1")
    assert got["status"] == "failed" and got["error"] is None


async def test_list_returns_newest_start_first(store: RunStore):
    for i, started in enumerate([NOW - 30, NOW - 10, NOW - 20]):
        await store.save(record(f"r{i}", started))
    assert [r["run_id"] for r in await store.list()] == ["r1", "r2", "r0"]


async def test_list_filters_by_status(store: RunStore):
    await store.save(record("ok", NOW - 3, status="succeeded"))
    await store.save(record("bad", NOW - 2, status="failed"))
    assert [r["run_id"] for r in await store.list(status="failed")] == ["bad"]


async def test_list_filters_by_workflow_name_or_id(store: RunStore):
    await store.save(record("a", NOW - 3, workflow="alpha"))
    await store.save(record("b", NOW - 2, workflow="beta"))
    assert [r["run_id"] for r in await store.list(workflow="beta")] == ["b"]
    assert [r["run_id"] for r in await store.list(workflow="id-alpha")] == ["a"]


async def test_list_limit_keeps_the_newest(store: RunStore):
    for i in range(6):
        await store.save(record(f"r{i}", NOW - 100 + i))
    assert [r["run_id"] for r in await store.list(limit=2)] == ["r5", "r4"]


async def test_list_limit_applies_after_the_filters(store: RunStore):
    for i in range(6):
        await store.save(record(f"r{i}", NOW - 100 + i, status="failed" if i % 2 else "succeeded"))
    assert [r["run_id"] for r in await store.list(status="succeeded", limit=2)] == ["r4", "r2"]


async def test_prune_removes_runs_older_than_the_cutoff(store: RunStore):
    await store.save(record("old", NOW - 3600))
    await store.save(record("new", NOW - 60))
    assert await store.prune(older_than_s=600) == 1
    assert await store.get("old") is None
    assert [r["run_id"] for r in await store.list()] == ["new"]


async def test_prune_keep_leaves_only_the_newest_runs(store: RunStore):
    for i in range(5):
        await store.save(record(f"r{i}", NOW - 100 + i))
    assert await store.prune(keep=2) == 3
    assert [r["run_id"] for r in await store.list()] == ["r4", "r3"]


async def test_prune_also_deletes_the_runs_logs(store: RunStore):
    await store.save(record("old", NOW - 3600))
    await store.append_logs("old", ["line"])
    await store.prune(older_than_s=60)
    assert await store.get_logs("old") == []


async def test_prune_with_nothing_to_remove_returns_zero(store: RunStore):
    await store.save(record("r", NOW))
    assert await store.prune(older_than_s=60, keep=10) == 0


async def test_logs_come_back_in_order_and_tail_returns_the_last_lines(store: RunStore):
    await store.append_logs("r1", ["one", "two"])
    await store.append_logs("r1", ["three"])
    assert await store.get_logs("r1") == ["one", "two", "three"]
    assert await store.get_logs("r1", tail=2) == ["two", "three"]
    assert await store.get_logs("r1", tail=0) == []


async def test_logs_are_capped_at_max_log_lines(store: RunStore):
    for i in range(4):
        await store.append_logs("r1", [f"l{i}a", f"l{i}b", f"l{i}c"])
    assert await store.get_logs("r1") == ["l2b", "l2c", "l3a", "l3b", "l3c"]


async def test_log_lines_may_contain_newlines_and_unicode(store: RunStore):
    await store.append_logs("r1", ["multi\nline ✅"])
    assert await store.get_logs("r1") == ["multi\nline ✅"]


async def test_logs_of_an_unknown_run_are_empty(store: RunStore):
    assert await store.get_logs("unknown", tail=3) == []


@pytest.mark.parametrize("bad", [{"started_at": NOW}, {"run_id": "x"}, {"run_id": "x", "started_at": "today"}])
async def test_save_rejects_a_record_without_run_id_or_numeric_started_at(store: RunStore, bad):
    with pytest.raises(InvalidArgumentError):
        await store.save(bad)


@pytest.mark.parametrize("run_id", ["../etc/passwd", "", ".hidden", "a/b", "sp ace"])
async def test_unsafe_run_ids_are_rejected(store: RunStore, run_id):
    with pytest.raises(InvalidArgumentError, match="invalid run_id"):
        await store.get(run_id)


async def test_bad_list_prune_and_tail_arguments_are_clear_errors(store: RunStore):
    with pytest.raises(InvalidArgumentError, match="limit"):
        await store.list(limit=0)
    with pytest.raises(InvalidArgumentError, match="older_than_s, keep"):
        await store.prune()
    with pytest.raises(InvalidArgumentError, match="tail"):
        await store.get_logs("r1", tail=-1)


# --- implementation details users rely on -------------------------------------------------


async def test_file_store_writes_pretty_json_with_a_trailing_newline(tmp_path):
    store = FileRunStore(tmp_path)
    await store.save(record("r1", NOW))
    text = (tmp_path / "r1.json").read_text()
    assert text.endswith("}\n") and text.startswith('{\n  "run_id": "r1"')
    assert json.loads(text)["status"] == "succeeded"


async def test_memory_store_returns_copies_that_callers_cannot_change_it_through():
    store = InMemoryRunStore()
    await store.save(record("r1", NOW))
    (await store.get("r1"))["status"] = "tampered"
    assert (await store.get("r1"))["status"] == "succeeded"


@pytest.fixture
async def redis_store(redis_url, namespace):
    client = aioredis.Redis.from_url(redis_url)
    yield RedisRunStore(client, Keys(namespace), retention_s=3600, clock=Clock())
    await client.aclose()


async def test_redis_store_keeps_scalars_readable_in_the_run_hash(redis_store, sync_redis, namespace):
    await redis_store.save(record("r1", NOW, status="failed", error={"name": "StepExecutionError", "message": "m"}))
    fields = {k.decode(): v for k, v in sync_redis.hgetall(Keys(namespace).run("r1")).items()}
    assert fields["status"] == b"failed"
    assert fields["workflow"] == b"order-flow"
    assert fields["workflow_id"] == b"id-order-flow"
    assert float(fields["started_at"]) == NOW
    assert json.loads(fields["error"]) == {"name": "StepExecutionError", "message": "m"}
    assert msgpack.unpackb(fields["record"])["nodes"]["a"]["output"] == [1, 2, {"k": "v"}]


async def test_redis_store_indexes_runs_and_expires_them_after_the_retention(redis_store, sync_redis, namespace):
    keys = Keys(namespace)
    await redis_store.save(record("r1", NOW))
    await redis_store.append_logs("r1", ["x"])
    assert sync_redis.zscore(keys.runs, "r1") == NOW
    assert 3500 < sync_redis.ttl(keys.run("r1")) <= 3600
    assert 3500 < sync_redis.ttl(keys.run_logs("r1")) <= 3600


async def test_redis_store_drops_index_entries_whose_run_expired(redis_store, sync_redis, namespace):
    await redis_store.save(record("gone", NOW - 5))
    await redis_store.save(record("kept", NOW))
    sync_redis.delete(Keys(namespace).run("gone"))  # as if its TTL had passed
    assert [r["run_id"] for r in await redis_store.list()] == ["kept"]
    assert sync_redis.zscore(Keys(namespace).runs, "gone") is None


async def test_redis_store_save_trims_index_entries_older_than_the_retention(redis_store, sync_redis, namespace):
    await redis_store.save(record("ancient", NOW - 7200))
    await redis_store.save(record("fresh", NOW))
    assert sync_redis.zscore(Keys(namespace).runs, "ancient") is None


def test_redis_store_rejects_a_non_positive_retention():
    with pytest.raises(InvalidArgumentError, match="retention_s"):
        RedisRunStore(object(), Keys("x"), retention_s=0)


async def test_redis_store_refuses_a_client_that_decodes_responses(redis_url):
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        with pytest.raises(InvalidArgumentError, match="decode_responses=False"):
            RedisRunStore(client, Keys("x"))
    finally:
        await client.aclose()


@pytest.mark.parametrize("make", [
    lambda tmp: InMemoryRunStore(max_log_lines=0),
    lambda tmp: FileRunStore(tmp, max_log_lines=0),
    lambda tmp: RedisRunStore(object(), Keys("x"), max_log_lines=0),
])
def test_every_store_rejects_a_log_cap_below_one(tmp_path, make):
    with pytest.raises(InvalidArgumentError, match="max_log_lines"):
        make(tmp_path)


async def test_file_store_ignores_json_files_that_are_not_runs(tmp_path):
    store = FileRunStore(tmp_path)
    await store.save(record("r1", NOW))
    (tmp_path / "notes.json").write_text('{"hello": 1}')
    (tmp_path / "broken.json").write_text("{not json")
    assert [r["run_id"] for r in await store.list()] == ["r1"]
    assert await store.prune(keep=0) == 1
