"""RedisLock on a real redis-server: fencing tokens, renewal, loss, release."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis.asyncio as aioredis

from orchestrator.errors import InvalidArgumentError, LockError
from orchestrator.keys import Keys
from orchestrator.locks import ACQUIRE, claim, conversation_lock


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


@pytest.mark.parametrize(("change", "reason"), [("taken", "another holder took it"),
                                                ("deleted", "its key expired or was deleted")])
async def test_on_lost_callbacks_run_once_when_a_renewal_finds_the_lock_changed(aredis, keys, change, reason):
    held = lock(aredis, keys, ttl_ms=2_000, renew_ms=30)
    calls: list[str] = []
    held.on_lost(calls.append)
    await held.acquire()
    if change == "taken":
        await aredis.set(keys.conversation_lock("c1"), "intruder", px=5_000)
    else:
        await aredis.delete(keys.conversation_lock("c1"))
    await asyncio.wait_for(held.lost_event.wait(), 2)
    await asyncio.sleep(0.1)  # more renewal periods: still one call
    assert calls == [reason] and held.lost_reason == reason
    await held.release()


async def test_release_does_not_call_on_lost(aredis, keys):
    held = lock(aredis, keys, ttl_ms=100, renew_ms=30)
    calls: list[str] = []
    held.on_lost(calls.append)
    await held.acquire()
    await held.release()
    await asyncio.sleep(0.2)  # past the lease: the watchdog is gone with the lock
    assert calls == [] and not held.lost


async def test_after_a_freeze_past_the_lease_the_loss_is_handled_before_any_task_resumes(aredis, keys):
    """The loop is blocked (as under SIGSTOP) past the lease. On resume, the watchdog's overdue
    timer runs in the loop's first round, so a callback that cancels the protected work cancels
    it before a task whose sleep ended during the freeze takes its next step."""
    held = lock(aredis, keys, ttl_ms=150, renew_ms=50)
    await held.acquire()
    steps: list[str] = []

    async def work() -> None:
        try:
            await asyncio.sleep(0.05)
            steps.append("resumed")
        except asyncio.CancelledError:
            steps.append("cancelled")
            raise

    task = asyncio.create_task(work())
    held.on_lost(lambda reason: task.cancel())
    await asyncio.sleep(0.01)
    time.sleep(0.3)  # the freeze
    await asyncio.gather(task, return_exceptions=True)
    assert steps == ["cancelled"]
    assert held.lost and "lease" in held.lost_reason
    await held.release()


async def test_a_lock_that_cannot_reach_redis_is_lost_when_its_lease_would_expire(own_redis):
    """Redis stops answering (CLIENT PAUSE): renewals hang, and the lock must count as lost
    when a whole ttl passed since its last successful renewal, without any answer."""
    client = aioredis.Redis.from_url(own_redis.url)
    held = conversation_lock(client, Keys("pause"), "c1", ttl_ms=600, renew_ms=100)
    lost_at: list[float] = []
    held.on_lost(lambda reason: lost_at.append(time.monotonic()))
    await held.acquire()
    blocker = aioredis.Redis.from_url(own_redis.url)
    await blocker.execute_command("CLIENT", "PAUSE", "2000", "ALL")
    paused = time.monotonic()
    try:
        await asyncio.wait_for(held.lost_event.wait(), 5)
    finally:
        await blocker.execute_command("CLIENT", "UNPAUSE")
        await held.release()
        await blocker.aclose()
        await client.aclose()
    assert len(lost_at) == 1 and "lease" in held.lost_reason
    print(f"lock lost {lost_at[0] - paused:.2f} s after Redis stopped answering (ttl 0.6 s, renew 0.1 s)")


async def test_an_acquire_that_finds_its_own_token_counts_as_acquired(aredis, keys):
    """redis-py resends the acquire script when the reply was lost: the first attempt took the
    key (done here by hand, with the same token), the resent one must count as acquired."""
    held = lock(aredis, keys)
    landed = int(await aredis.eval(ACQUIRE, 2, keys.conversation_lock("c1"), keys.conversation_lock_epoch("c1"),
                                   held.token, 1_000))
    token = await held.acquire(timeout_s=0)
    assert token > landed, "the fencing token grows past the lost reply's epoch"
    assert await aredis.get(keys.conversation_lock("c1")) == held.token.encode()
    assert await lock(aredis, keys).try_acquire() is False
    assert await held.release() is True


async def test_acquire_waits_out_a_redis_restart_within_its_timeout(own_redis):
    client = aioredis.Redis.from_url(own_redis.url)
    try:
        own_redis.stop()
        waiting = asyncio.create_task(conversation_lock(client, Keys("restart"), "c1").acquire(timeout_s=10))
        await asyncio.sleep(0.3)
        assert not waiting.done()
        await asyncio.to_thread(own_redis.start)
        assert await asyncio.wait_for(waiting, 10) >= 1
    finally:
        await client.aclose()


async def test_acquire_gives_up_on_an_outage_with_a_lock_error(own_redis):
    client = aioredis.Redis.from_url(own_redis.url)
    own_redis.stop()
    try:
        with pytest.raises(LockError) as info:
            await conversation_lock(client, Keys("down"), "c1", ttl_ms=200).acquire(timeout_s=0.3)
        assert info.value.__cause__ is not None
    finally:
        await asyncio.to_thread(own_redis.start)
        await client.aclose()


async def test_claim_is_taken_once_and_a_resent_claim_with_the_same_token_is_ours(aredis, keys):
    key = keys.once("sub")
    assert await claim(aredis, key, "a/1") is True
    assert await claim(aredis, key, "a/1") is True  # the resend after a lost reply
    assert await claim(aredis, key, "a/2") is False
    assert await claim(aredis, key, "b/1") is False
    assert await aredis.get(key) == b"a/1"
    assert await aredis.pttl(key) == -1
    assert await claim(aredis, keys.once("ttl"), "x", ttl_ms=5_000) is True
    assert 0 < await aredis.pttl(keys.once("ttl")) <= 5_000


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


async def test_reads_sent_with_the_acquisition_see_the_state_after_the_take_in_one_round_trip(aredis, keys):
    await aredis.hset(keys.conversation("r1"), "m:n", b"\x01")
    await aredis.script_flush()  # the first attempt meets NOSCRIPT and loads the script
    before = (await aredis.info("commandstats")).get("cmdstat_exec", {}).get("calls", 0)
    lock = conversation_lock(aredis, keys, "r1", ttl_ms=5_000)
    token = await lock.acquire(0, reads=lambda pipe: (pipe.hgetall(keys.conversation("r1")),
                                                      pipe.get(keys.conversation_lock_epoch("r1"))))
    try:
        snapshot, epoch = lock.reads_at_acquire
        assert snapshot == {b"m:n": b"\x01"}
        assert int(epoch) == token, "the reads ran after the take, in the same transaction"
        after = (await aredis.info("commandstats"))["cmdstat_exec"]["calls"]
        assert after - before == 2, "one MULTI/EXEC, sent again once after loading the script"
        other = conversation_lock(aredis, keys, "r1", ttl_ms=5_000)
        assert not await other.try_acquire(lambda pipe: pipe.hgetall(keys.conversation("r1")))
        assert other.reads_at_acquire is None, "a failed take hands back no reads"
    finally:
        await lock.release()
