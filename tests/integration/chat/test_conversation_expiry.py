"""Conversation memory in Redis expires after an idle TTL, renewed by every write, and its
lock's fencing stays safe when the epoch expires too (real redis-server)."""

from __future__ import annotations

import asyncio

import pytest

from orchestrator import Orchestrator
from orchestrator.chat.conversations import DEFAULT_TTL_S, RedisConversationStore
from orchestrator.errors import FencingError, InvalidArgumentError
from orchestrator.locks import conversation_lock

pytestmark = pytest.mark.timeout(30)


def conversation_keys(keys, cid: str) -> list[str]:
    return [keys.conversation(cid), keys.conversation_deltas(cid), keys.conversation_applied(cid),
            keys.conversation_lock_epoch(cid)]


async def tagged_keys(aredis, keys, cid: str) -> list[bytes]:
    return sorted([k async for k in aredis.scan_iter(match=f"{keys.conversation(cid)}*")])


async def test_a_write_sets_the_idle_ttl_on_every_memory_key_of_the_conversation(aredis, keys):
    store = RedisConversationStore(aredis, keys, ttl_s=60)
    lock = conversation_lock(aredis, keys, "c1", ttl_ms=5_000)
    token = await lock.acquire(timeout_s=5)
    await store.apply_delta("c1", {"set": {"a": 1}}, event_id="e1", fencing_token=token)
    await lock.release()
    for key in conversation_keys(keys, "c1"):
        assert 59_000 < await aredis.pttl(key) <= 60_000, key


async def test_a_conversation_idle_past_its_ttl_is_gone_and_starts_from_empty_memory(aredis, keys):
    store = RedisConversationStore(aredis, keys, ttl_s=0.3, compact_after=2)
    for i in range(3):
        await store.apply_delta("c1", {"set": {f"k{i}": i}}, event_id=f"e{i}", fencing_token=1)
    assert await store.get("c1") == {"k0": 0, "k1": 1, "k2": 2}
    await asyncio.sleep(0.5)
    assert await tagged_keys(aredis, keys, "c1") == []
    assert await store.get("c1") == {}


async def test_every_write_renews_the_ttl(aredis, keys):
    store = RedisConversationStore(aredis, keys, ttl_s=0.6)
    await store.set("c1", {"a": 1})
    for i in range(4):
        await asyncio.sleep(0.3)
        await store.set("c1", {"a": i})
    assert await store.get("c1") == {"a": 3}, "renewed at every write, it must not have expired"


async def test_a_ttl_of_zero_never_expires_the_conversation(aredis, keys):
    store = RedisConversationStore(aredis, keys, ttl_s=0)
    await store.apply_delta("c1", {"set": {"a": 1}}, event_id="e1", fencing_token=3)
    for key in conversation_keys(keys, "c1")[:3:2]:  # the snapshot and the applied ids
        assert await aredis.ttl(key) == -1


async def test_reading_the_memory_after_taking_the_lock_gives_its_epoch_a_ttl(aredis, keys):
    """A chatflow that took the lock and then saved nothing (its lock was lost) still leaves an
    epoch that expires: the read that follows every acquire sets its TTL."""
    store = RedisConversationStore(aredis, keys, ttl_s=60)
    lock = conversation_lock(aredis, keys, "c1", ttl_ms=5_000)
    await lock.acquire(timeout_s=5)
    assert await aredis.ttl(keys.conversation_lock_epoch("c1")) == -1
    await store.get("c1")
    await lock.release()
    assert 0 < await aredis.ttl(keys.conversation_lock_epoch("c1")) <= 60


async def test_a_stale_holder_is_refused_after_the_whole_conversation_expired_and_another_took_the_lock(
        aredis, keys):
    store = RedisConversationStore(aredis, keys, ttl_s=0.2)
    stale = conversation_lock(aredis, keys, "c1", ttl_ms=100, renew_ms=50)
    old_token = await stale.acquire(timeout_s=5)
    await store.apply_delta("c1", {"set": {"a": "old"}}, event_id="e1", fencing_token=old_token)
    await stale.release()  # as if its lease ran out: the holder still has old_token
    await asyncio.sleep(0.4)
    assert await tagged_keys(aredis, keys, "c1") == [], "memory, applied ids and epoch expired"
    fresh = conversation_lock(aredis, keys, "c1", ttl_ms=5_000)
    new_token = await fresh.acquire(timeout_s=5)
    try:
        assert new_token > old_token, "a new epoch starts from Redis's clock, above every older token"
        with pytest.raises(FencingError):
            await store.apply_delta("c1", {"set": {"a": "stale"}}, event_id="e2", fencing_token=old_token)
        assert await store.apply_delta("c1", {"set": {"a": "new"}}, event_id="e3", fencing_token=new_token)
    finally:
        await fresh.release()
    assert await store.get("c1") == {"a": "new"}


@pytest.mark.parametrize("bad", [-1, "10", True, None])
def test_a_bad_ttl_is_refused(aredis, keys, bad):
    with pytest.raises(InvalidArgumentError, match="ttl_s"):
        RedisConversationStore(aredis, keys, ttl_s=bad)


async def test_the_app_builds_its_conversation_store_with_the_conversation_ttl_setting(redis_url, namespace):
    app = Orchestrator(redis_url=redis_url, namespace=namespace, conversation_ttl_s=123)
    default = Orchestrator(redis_url=redis_url, namespace=namespace)
    try:
        await app.connect()
        await default.connect()
        assert app.conversation_store.ttl_s == 123
        assert default.conversation_store.ttl_s == DEFAULT_TTL_S == 30 * 86_400
    finally:
        await app.close()
        await default.close()
