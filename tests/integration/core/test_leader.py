"""Leader election and LeaderScheduler on a real redis-server, in-process (the three real
candidate processes, SIGKILLed, are in tests/faults/test_leader_processes.py)."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from orchestrator.cron.expr import parse_slot, slot_iso
from orchestrator.cron.scheduler import LeaderScheduler
from orchestrator.errors import InvalidArgumentError
from orchestrator.keys import Keys
from orchestrator.leader import LeaderElector

PROC = Path(__file__).resolve().parents[1] / "procs" / "leader_scheduler.py"
T0 = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)


def elector(aredis, keys, **options):
    options.setdefault("ttl_ms", 1_000)
    return LeaderElector(aredis, keys, "cron", **options)


class WallClock:
    """A settable wall clock for the scheduler side (leases keep the real monotonic clock)."""

    def __init__(self) -> None:
        self.t = T0

    def now(self) -> datetime:
        return self.t

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(0.01)


# -- LeaderElector ---------------------------------------------------------------------------
async def test_the_first_candidate_becomes_leader_with_a_fencing_epoch(aredis, keys):
    first, second = elector(aredis, keys), elector(aredis, keys)
    assert await first.try_acquire() is True
    assert await second.try_acquire() is False
    assert first.is_leader and not second.is_leader
    assert first.epoch == int(await aredis.get(keys.leader_epoch("cron")))
    assert await second.current_leader() == first.holder_id
    await first.stop()


async def test_stop_releases_the_lease_so_another_candidate_leads_at_once(aredis, keys):
    first, second = elector(aredis, keys), elector(aredis, keys)
    await first.try_acquire()
    epoch = first.epoch
    await first.stop()
    assert not first.is_leader
    assert await second.try_acquire() is True
    assert second.epoch == epoch + 1
    await second.stop()


async def test_callbacks_report_election_and_demotion(aredis, keys):
    seen: list[object] = []
    first = elector(aredis, keys, renew_ms=50, on_elected=seen.append,
                    on_demoted=lambda: seen.append("demoted"))
    await first.start()
    for _ in range(100):
        if first.is_leader:
            break
        await asyncio.sleep(0.01)
    await first.stop()
    assert len(seen) == 2 and isinstance(seen[0], int) and seen[0] >= 1
    assert seen[1] == "demoted"


async def test_a_leader_whose_lease_was_taken_steps_down_on_its_next_renewal(aredis, keys):
    demoted = asyncio.Event()
    first = elector(aredis, keys, renew_ms=30, on_demoted=demoted.set)
    await first.start()
    while not first.is_leader:
        await asyncio.sleep(0.01)
    await aredis.set(keys.leader("cron"), "someone-else", px=5_000)
    await asyncio.wait_for(demoted.wait(), 2)
    assert not first.is_leader
    await first.stop()
    assert await aredis.get(keys.leader("cron")) == b"someone-else"


async def test_a_leader_whose_lease_vanished_steps_down_on_its_next_renewal(aredis, keys, caplog):
    demoted = asyncio.Event()
    first = elector(aredis, keys, renew_ms=30, on_demoted=demoted.set)
    await first.start()
    while not first.is_leader:
        await asyncio.sleep(0.01)
    await aredis.delete(keys.leader("cron"))
    await asyncio.wait_for(demoted.wait(), 2)
    assert not first.is_leader
    assert "the lease expired in Redis" in caplog.text
    await first.stop()


async def test_a_campaign_that_finds_its_own_holder_id_counts_as_elected(aredis, keys):
    """redis-py resends the campaign script when its reply was lost: the first attempt took
    the lease (done here by hand, with the same holder id), the resent one must elect us."""
    me = elector(aredis, keys)
    await aredis.set(keys.leader("cron"), me.holder_id, px=1_000)
    landed = await aredis.incr(keys.leader_epoch("cron"))
    assert await me.try_acquire() is True
    assert me.is_leader and me.epoch > landed
    assert await elector(aredis, keys).try_acquire() is False
    await me.stop()


async def test_a_leader_that_cannot_reach_redis_steps_down_before_its_lease_expires(own_redis):
    """Redis stops answering (CLIENT PAUSE): renewals hang, and the leader must consider
    itself a follower before ttl has passed since its last successful renewal."""
    client = aioredis.Redis.from_url(own_redis.url)
    keys = Keys("freeze")
    leader = LeaderElector(client, keys, "cron", ttl_ms=1_000, renew_ms=200, safety_margin_ms=200)
    await leader.try_acquire()
    renewed_at = time.monotonic()
    await leader.start()
    blocker = aioredis.Redis.from_url(own_redis.url)
    await blocker.execute_command("CLIENT", "PAUSE", "2000", "ALL")
    try:
        for _ in range(300):
            if not leader.is_leader:
                break
            await asyncio.sleep(0.01)
        stepped_down_after = time.monotonic() - renewed_at
    finally:
        await blocker.execute_command("CLIENT", "UNPAUSE")
        await leader.stop()
        await blocker.aclose()
        await client.aclose()
    assert stepped_down_after < 1.0


@pytest.mark.parametrize("options", [{"role": " "}, {"ttl_ms": 1_000, "safety_margin_ms": 900},
                                     {"ttl_ms": 1_000, "retry_ms": 0}])
def test_bad_election_settings_are_refused(aredis, keys, options):
    with pytest.raises(InvalidArgumentError):
        LeaderElector(aredis, keys, **{"role": "cron", **options})


# -- LeaderScheduler (one process, wall clock set by the test) -------------------------------
async def last_fired_was(aredis, keys, slot: datetime) -> None:
    """Record ``slot`` as the job ``sec``'s last fired slot, as an earlier leader's fire did."""
    await aredis.hset(keys.cron_job("sec"), mapping={"slot": slot_iso(slot), "token": "earlier-leader/x"})


async def last_fired(aredis, keys) -> datetime:
    return parse_slot(await aredis.hget(keys.cron_job("sec"), "slot"))


async def leader_scheduler(aredis, keys, clock, policy="latest", **options):
    el = elector(aredis, keys, ttl_ms=5_000, clock=clock)
    sched = LeaderScheduler(el, aredis, keys, missed_policy=policy, clock=clock, tz="UTC", **options)
    fired: list[datetime] = []
    sched.add_job("* * * * * *", "sec", lambda name, slot: fired.append(slot))
    return sched, el, fired


async def test_a_follower_fires_nothing(aredis, keys):
    clock = WallClock()
    sched, el, fired = await leader_scheduler(aredis, keys, clock)
    await aredis.set(keys.leader("cron"), "other", px=5_000)
    await sched.tick(T0)
    assert await sched.tick(T0 + timedelta(seconds=3)) == []
    await sched.stop()


@pytest.mark.parametrize(("policy", "expected"), [
    ("latest", [5]), ("all", [1, 2, 3, 4, 5]), ("none", [5])])
async def test_a_new_leader_handles_missed_slots_by_policy(aredis, keys, policy, expected):
    """The previous leader last fired T0; this one is elected at T0+5.5 s, having last
    checked (as a follower) at T0+4.5 s."""
    clock = WallClock()
    sched, el, fired = await leader_scheduler(aredis, keys, clock, policy)
    await last_fired_was(aredis, keys, T0)
    await sched.tick(T0 + timedelta(seconds=4.5))  # still a follower
    await el.try_acquire()
    got = await sched.tick(T0 + timedelta(seconds=5.5))
    await sched.stop()
    assert [int((slot - T0).total_seconds()) for _, slot in got] == expected
    assert await last_fired(aredis, keys) == T0 + timedelta(seconds=5)


async def test_missed_slots_older_than_the_window_are_not_fired(aredis, keys):
    clock = WallClock()
    sched, el, fired = await leader_scheduler(aredis, keys, clock, "all", missed_window_s=2)
    await last_fired_was(aredis, keys, T0)
    await el.try_acquire()
    got = await sched.tick(T0 + timedelta(seconds=10.5))
    await sched.stop()
    assert [int((slot - T0).total_seconds()) for _, slot in got] == [9, 10]


async def test_a_leader_fires_every_slot_of_its_term_even_after_a_slow_check(aredis, keys):
    clock = WallClock()
    sched, el, fired = await leader_scheduler(aredis, keys, clock, "latest")
    await el.try_acquire()
    await sched.tick(T0 + timedelta(seconds=0.5))
    got = await sched.tick(T0 + timedelta(seconds=3.5))
    await sched.stop()
    assert [int((slot - T0).total_seconds()) for _, slot in got] == [1, 2, 3]


async def test_a_slot_fired_by_one_leader_is_not_fired_again_by_the_next(aredis, keys):
    clock = WallClock()
    first, el1, fired1 = await leader_scheduler(aredis, keys, clock, "all")
    await el1.try_acquire()
    await first.tick(T0)
    await first.tick(T0 + timedelta(seconds=2.5))  # fires 1, 2
    await el1.stop()
    second, el2, fired2 = await leader_scheduler(aredis, keys, clock, "all")
    await el2.try_acquire()
    job = second.get_job("sec")
    # claims of slots 1 and 2 (a leader whose view of the last fired slot is stale) lose
    assert [await second._claim(job, T0 + timedelta(seconds=n)) for n in (1, 2)] == [False, False]
    await second.tick(T0 + timedelta(seconds=3.5))
    await first.stop()
    await second.stop()
    assert [s.second for s in fired1] == [1, 2]
    assert [s.second for s in fired2] == [3]


async def test_describe_shows_last_fired_slot_and_current_leader(aredis, keys):
    clock = WallClock()
    sched, el, _ = await leader_scheduler(aredis, keys, clock)
    await el.try_acquire()
    await sched.tick(T0 + timedelta(seconds=0.5))
    await sched.tick(T0 + timedelta(seconds=1.5))
    [row] = await sched.describe()
    await sched.stop()
    assert row["last_fired"] == slot_iso(T0 + timedelta(seconds=1))
    assert row["leader"] == el.holder_id
    assert row["expr"] == "* * * * * *"


def test_an_unknown_missed_policy_is_refused(aredis, keys):
    with pytest.raises(InvalidArgumentError, match="missed_policy"):
        LeaderScheduler(elector(aredis, keys), aredis, keys, missed_policy="some")


async def test_fencing_epochs_keep_growing_after_redis_comes_back_empty(own_redis, namespace):
    """An emptied Redis (restarted without its data) must not hand out a fencing token again:
    epochs start from Redis's clock in ms, not from 1."""
    from orchestrator.broker.connection import create_redis
    from orchestrator.keys import Keys
    from orchestrator.leader import LeaderElector
    from orchestrator.locks import conversation_lock

    keys = Keys(namespace)
    client = create_redis(own_redis.url)
    try:
        tokens = []
        for _ in range(2):
            leader = LeaderElector(client, keys, "cron", ttl_ms=2_000)
            assert await leader.try_acquire() is True
            lock = conversation_lock(client, keys, "c1", ttl_ms=2_000)
            lock_token = await lock.acquire(timeout_s=5)
            tokens.append((leader.epoch, lock_token))
            await lock.release()
            await leader.stop()  # releases the lease
            await client.flushall()  # Redis came back empty
        (leader_1, lock_1), (leader_2, lock_2) = tokens
        assert leader_2 > leader_1 and lock_2 > lock_1, tokens
        assert leader_1 > 10**12, "epochs start from Redis's clock (ms)"
    finally:
        await client.aclose()
