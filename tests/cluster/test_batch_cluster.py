"""Batch and SyncBatch on the local cluster: one pipeline per master with the scripts loaded
first, replies in call order, per-key order kept, a moved slot followed, cross-slot refused."""

from __future__ import annotations

import uuid

import pytest
import redis
from redis.exceptions import ClusterCrossSlotError

from orchestrator.broker.batch import Batch, SyncBatch
from orchestrator.broker.connection import create_redis, create_sync_redis
from tests.cluster.local import LocalCluster

pytestmark = pytest.mark.timeout(60)

PUSH = "return redis.call('RPUSH', KEYS[1], ARGV[1])"


def keys_on_every_master(cluster: LocalCluster, prefix: str) -> list[str]:
    """One hash-tagged list key per master."""
    found: dict[int, str] = {}
    n = 0
    while len(found) < len(cluster.masters()):
        key = f"{{{prefix}:{n}}}:list"
        found.setdefault(cluster.master_of(key).port, key)
        n += 1
    return list(found.values())


def commandstats(cluster: LocalCluster, name: str) -> dict[int, int]:
    out = {}
    for master in cluster.masters():
        stat = master.info("commandstats").get(f"cmdstat_{name}")
        out[master.port] = int(stat["calls"]) if stat else 0
    return out


@pytest.fixture
async def client(cluster_url):
    c = create_redis(cluster_url)
    yield c
    await c.aclose()


async def test_calls_on_every_master_come_back_in_order_and_keep_per_key_order(cluster, client):
    lists = keys_on_every_master(cluster, f"b{uuid.uuid4().hex[:6]}")
    push = client.register_script(PUSH)
    batch = Batch(client)
    for n in range(30):
        key = lists[n % len(lists)]
        if n % 2:
            batch.script(push, keys=[key], args=[n])
        else:
            batch.command("rpush", key, n)
    before = commandstats(cluster, "evalsha")
    replies = await batch.execute()
    assert replies == [n // len(lists) + 1 for n in range(30)]
    for i, key in enumerate(lists):
        assert [int(x) for x in await client.lrange(key, 0, -1)] == list(range(i, 30, len(lists)))
    after = commandstats(cluster, "evalsha")
    assert all(after[port] > before[port] for port in after), "every master ran its scripts"


async def test_scripts_every_master_lost_still_run(cluster, client):
    lists = keys_on_every_master(cluster, f"f{uuid.uuid4().hex[:6]}")
    push = client.register_script(PUSH)
    for master in cluster.masters():
        plain = master.client()
        plain.script_flush()
        plain.close()
    batch = Batch(client)
    for key in lists:
        batch.script(push, keys=[key], args=["x"])
    assert await batch.execute() == [1] * len(lists)


async def test_a_call_whose_slot_moved_is_sent_again_to_its_new_master(cluster, client):
    key = f"{{m{uuid.uuid4().hex[:6]}}}:list"
    push = client.register_script(PUSH)
    await push(keys=[key], args=["before"])  # the client's slot map now points at the old master
    old = cluster.master_of(key)
    new = next(m for m in cluster.masters() if m.port != old.port)
    slot = redis.crc.key_slot(key.encode())
    for master in (old, new):  # move the slot with its key (MIGRATE), as a resharding does
        plain = master.client()
        plain.execute_command("CLUSTER SETSLOT", slot, "IMPORTING" if master is new else "MIGRATING",
                              old.node_id if master is new else new.node_id)
        plain.close()
    mover = old.client()
    mover.execute_command("MIGRATE", "127.0.0.1", new.port, "", 0, 5000, "KEYS", key)
    mover.close()
    for master in cluster.masters():
        plain = master.client()
        plain.execute_command("CLUSTER SETSLOT", slot, "NODE", new.node_id)
        plain.close()
    batch = Batch(client)
    batch.script(push, keys=[key], args=["after-1"]).command("rpush", key, "after-2")
    assert await batch.execute() == [2, 3]
    assert await client.lrange(key, 0, -1) == [b"before", b"after-1", b"after-2"]
    assert cluster.master_of(key).port == new.port


async def test_a_script_over_two_slots_is_refused_by_the_master(client):
    push = client.register_script("redis.call('SET', KEYS[2], 1) return redis.call('RPUSH', KEYS[1], 1)")
    batch = Batch(client)
    batch.script(push, keys=["{a}:x", "{b}:y"])
    with pytest.raises(ClusterCrossSlotError):
        await batch.execute()


def test_the_synchronous_batch_sends_one_pipeline_per_master(cluster, cluster_url):
    client = create_sync_redis(cluster_url)
    try:
        lists = keys_on_every_master(cluster, f"s{uuid.uuid4().hex[:6]}")
        push = client.register_script(PUSH)
        batch = SyncBatch(client)
        for n in range(12):
            batch.script(push, keys=[lists[n % len(lists)]], args=[n])
        assert batch.execute() == [n // len(lists) + 1 for n in range(12)]
        for i, key in enumerate(lists):
            assert [int(x) for x in client.lrange(key, 0, -1)] == list(range(i, 12, len(lists)))
    finally:
        client.close()
