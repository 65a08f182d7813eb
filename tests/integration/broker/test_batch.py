"""Batch and SyncBatch on one real redis-server: script calls and commands in one pipeline,
replies in order, scripts the server lost still run in order, error replies per call."""

from __future__ import annotations

import pytest
import redis
from redis.exceptions import ResponseError

from orchestrator.broker.batch import Batch, SyncBatch
from orchestrator.broker.connection import create_redis, create_sync_redis
from orchestrator.errors import InvalidArgumentError

PUSH = "return redis.call('RPUSH', KEYS[1], ARGV[1])"


@pytest.fixture
async def client(redis_url):
    c = create_redis(redis_url)
    yield c
    await c.aclose()


async def test_replies_come_back_in_call_order_for_scripts_and_commands(client, namespace):
    push = client.register_script(PUSH)
    key = f"{namespace}:list"
    batch = Batch(client)
    batch.script(push, keys=[key], args=["a"])
    batch.command("rpush", key, "b")
    batch.script(push, keys=[key], args=["c"])
    batch.command("lrange", key, 0, -1)
    assert len(batch) == 4
    assert await batch.execute() == [1, 2, 3, [b"a", b"b", b"c"]]
    assert len(batch) == 0 and await batch.execute() == []


async def test_a_server_that_lost_its_scripts_runs_every_call_once_and_in_order(client, namespace):
    push = client.register_script(PUSH)
    key = f"{namespace}:list"
    await push(keys=[key], args=["first"])
    await client.script_flush()  # as after a restart or a failover to a replica
    batch = Batch(client)
    for value in ("s1", "s2"):
        batch.script(push, keys=[key], args=[value])
        batch.command("rpush", key, value.replace("s", "c"))
    await batch.execute()
    assert await client.lrange(key, 0, -1) == [b"first", b"s1", b"c1", b"s2", b"c2"]


async def test_an_error_reply_is_raised_after_the_other_calls_ran_or_returned_in_place(client, namespace):
    push = client.register_script(PUSH)
    key, text = f"{namespace}:list", f"{namespace}:text"
    await client.set(text, "x")
    batch = Batch(client)
    batch.script(push, keys=[text], args=["v"])  # WRONGTYPE inside the script
    batch.command("rpush", key, "kept")
    with pytest.raises(ResponseError, match="WRONGTYPE"):
        await batch.execute()
    assert await client.lrange(key, 0, -1) == [b"kept"]
    batch.script(push, keys=[text], args=["v"]).command("llen", key)
    error, length = await batch.execute(raise_on_error=False)
    assert isinstance(error, ResponseError) and length == 1


async def test_a_name_that_is_no_command_method_is_refused(client):
    with pytest.raises(InvalidArgumentError, match="not a command method"):
        Batch(client).command("no_such_command", "k")
    with pytest.raises(InvalidArgumentError, match="max_in_flight"):
        Batch(client, max_in_flight=0)


def test_the_synchronous_batch_pipelines_scripts_and_commands_in_order(redis_url, namespace):
    client = create_sync_redis(redis_url)
    try:
        push = client.register_script(PUSH)
        key = f"{namespace}:list"
        client.script_flush()
        batch = SyncBatch(client)
        batch.script(push, keys=[key], args=["a"]).command("rpush", key, "b").command("time")
        first, second, now = batch.execute()
        assert (first, second) == (1, 2) and isinstance(now, tuple)
        assert client.lrange(key, 0, -1) == [b"a", b"b"]
    finally:
        client.close()


def test_a_plain_redis_py_client_works_too(redis_url, namespace):
    client = redis.Redis.from_url(redis_url)
    try:
        batch = SyncBatch(client)
        batch.script(client.register_script(PUSH), keys=[f"{namespace}:l"], args=["x"])
        assert batch.execute() == [1]
    finally:
        client.close()
