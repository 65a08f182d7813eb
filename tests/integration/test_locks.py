"""RedisLock on a real redis-server: fencing tokens, renewal, loss, release."""

from __future__ import annotations

import asyncio

import pytest

from orchestrator.errors import InvalidArgumentError, LockError
from orchestrator.locks import conversation_lock


def lock(aredis, keys, cid="c1", **options):
    options.setdefault("ttl_ms", 1_000)
    return conversation_lock(aredis, keys, cid, **options)


async def test_each_acquisition_gets_a_larger_fencing_token(aredis, keys):
    first = lock(aredis, keys)
    t1 = await first.acquire()
    await first.release()
    second = lock(aredis, keys)
    t2 = await second.acquire()
    await second.release()
    assert t2 == t1 + 1
    assert int(await aredis.get(keys.conversation_lock_epoch("c1"))) == t2


async def test_a_held_lock_cannot_be_taken_by_another_holder(aredis, keys):
    holder, other = lock(aredis, keys), lock(aredis, keys)
    await holder.acquire()
    try:
        assert await other.try_acquire() is False
        assert other.fencing_token is None
    finally:
        await holder.release()


async def test_acquire_waits_for_the_release_of_the_holder(aredis, keys):
    holder, waiter = lock(aredis, keys), lock(aredis, keys)
    token = await holder.acquire()
    waiting = asyncio.create_task(waiter.acquire(timeout_s=5))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    await holder.release()
    assert await asyncio.wait_for(waiting, 5) == token + 1
    await waiter.release()


async def test_acquire_gives_up_with_a_lock_error_after_its_timeout(aredis, keys):
    holder = lock(aredis, keys)
    await holder.acquire()
    try:
        with pytest.raises(LockError) as info:
            await lock(aredis, keys).acquire(timeout_s=0.1)
        assert info.value.name == keys.conversation_lock("c1")
    finally:
        await holder.release()


async def test_renewal_keeps_the_lock_past_its_ttl(aredis, keys):
    held = lock(aredis, keys, ttl_ms=200, renew_ms=50)
    await held.acquire()
    await asyncio.sleep(0.5)
    assert held.owned
    assert await aredis.get(keys.conversation_lock("c1")) == held.token.encode()
    await held.release()


async def test_release_deletes_the_key_only_while_it_is_ours(aredis, keys):
    held = lock(aredis, keys, ttl_ms=100, renew_ms=90)
    await held.acquire()
    held._renewer.cancel()  # simulate a frozen holder: no more renewals
    await asyncio.sleep(0.2)
    newer = lock(aredis, keys)
    await newer.acquire()
    assert await held.release() is False
    assert await aredis.get(keys.conversation_lock("c1")) == newer.token.encode()
    assert await newer.release() is True
    assert await aredis.exists(keys.conversation_lock("c1")) == 0


async def test_the_lock_is_lost_when_a_renewal_finds_another_holder(aredis, keys):
    held = lock(aredis, keys, ttl_ms=1_000, renew_ms=30)
    await held.acquire()
    await aredis.set(keys.conversation_lock("c1"), "intruder")
    await asyncio.wait_for(held.lost_event.wait(), 2)
    assert held.lost and not held.owned
    await held.release()
    assert await aredis.get(keys.conversation_lock("c1")) == b"intruder"


async def test_the_lock_counts_as_lost_once_a_whole_ttl_passed_without_renewal(aredis, keys):
    held = lock(aredis, keys, ttl_ms=100, renew_ms=90)
    await held.acquire()
    held._renewer.cancel()
    await asyncio.sleep(0.15)
    assert held.lost
    await held.release()


async def test_async_with_acquires_and_releases(aredis, keys):
    async with lock(aredis, keys) as held:
        assert held.fencing_token is not None
        assert await aredis.exists(keys.conversation_lock("c1")) == 1
    assert await aredis.exists(keys.conversation_lock("c1")) == 0


async def test_one_instance_cannot_acquire_twice(aredis, keys):
    held = lock(aredis, keys)
    await held.acquire()
    with pytest.raises(LockError):
        await held.try_acquire()
    await held.release()


@pytest.mark.parametrize(("ttl_ms", "renew_ms"), [(5, None), (1_000, 1_000), (1_000, 0), ("1s", None)])
def test_bad_lease_settings_are_refused(aredis, keys, ttl_ms, renew_ms):
    with pytest.raises(InvalidArgumentError):
        lock(aredis, keys, ttl_ms=ttl_ms, renew_ms=renew_ms)


def test_a_blank_conversation_id_has_no_lock(aredis, keys):
    with pytest.raises(InvalidArgumentError):
        conversation_lock(aredis, keys, " ")


async def test_acquire_release_round_trip_is_fast(aredis, keys):
    """Measured for the report: one acquire + release round trip on the local server."""
    loop = asyncio.get_running_loop()
    n = 200
    start = loop.time()
    for _ in range(n):
        held = lock(aredis, keys)
        await held.acquire()
        await held.release()
    per_op_us = (loop.time() - start) / n * 1e6
    print(f"lock acquire+release round trip: {per_op_us:.0f} us")
    assert per_op_us < 50_000
