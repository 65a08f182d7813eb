"""A cron job's Redis state is one key: its last fired slot and the claim that fired it,
moved forward by the FIRE script's compare-and-set (real redis-server, in-process)."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest

from orchestrator.cron.expr import slot_iso
from orchestrator.cron.scheduler import FIRE, LeaderScheduler
from orchestrator.leader import LeaderElector
from orchestrator.ops.dashboard.data import DashboardData
from orchestrator.ops.inspector import Inspector
from tests.integration.core.test_leader import T0, WallClock

DAY_S = 86_400

pytestmark = pytest.mark.timeout(30)


async def scheduler(aredis, keys, expr="* * * * * *", name="sec", **options):
    clock = WallClock()
    elector = LeaderElector(aredis, keys, "cron", ttl_ms=5_000, clock=clock)
    sched = LeaderScheduler(elector, aredis, keys, clock=clock, tz="UTC", **options)
    fired: list[datetime] = []
    sched.add_job(expr, name, lambda _name, slot: fired.append(slot))
    assert await elector.try_acquire()
    return sched, elector, fired


async def fire(aredis, keys, holder: str, slot: datetime, token: str, ttl_s: int = 100) -> int:
    return int(await aredis.eval(FIRE, 2, keys.cron_job("sec"), keys.leader("cron"),
                                 holder, slot_iso(slot), token, ttl_s))


async def cron_keys(aredis, keys) -> list[bytes]:
    return sorted([k async for k in aredis.scan_iter(match=keys.cron_job("*"))])


async def test_an_every_second_job_keeps_one_key_however_many_slots_it_fires(aredis, keys):
    sched, elector, fired = await scheduler(aredis, keys)
    await sched.tick(T0)
    for n in range(1, 121):
        await sched.tick(T0 + timedelta(seconds=n, milliseconds=500))
    await sched.stop()
    assert len(fired) == 120
    assert await cron_keys(aredis, keys) == [keys.cron_job("sec").encode()]
    state = await aredis.hgetall(keys.cron_job("sec"))
    assert state[b"slot"] == slot_iso(T0 + timedelta(seconds=120)).encode()
    assert state[b"token"].decode().startswith(f"{elector.holder_id}/")


async def test_the_state_expires_a_period_plus_the_missed_window_plus_a_day_after_a_fire(aredis, keys):
    sched, _, fired = await scheduler(aredis, keys, missed_window_s=600)
    await sched.tick(T0)
    await sched.tick(T0 + timedelta(seconds=1.5))
    await sched.stop()
    assert fired and DAY_S + 600 - 2 <= await aredis.ttl(keys.cron_job("sec")) <= DAY_S + 601


async def test_a_daily_job_keeps_its_state_longer_than_its_period(aredis, keys):
    sched, _, _ = await scheduler(aredis, keys, expr="0 3 * * *", name="nightly")
    job = sched.get_job("nightly")
    await sched.stop()
    assert sched.state_ttl_s(job, T0.replace(hour=3)) == DAY_S + 3_600 + DAY_S


async def test_a_claim_resent_with_its_own_token_fires_and_any_other_claim_of_that_slot_does_not(aredis, keys):
    await aredis.set(keys.leader("cron"), "me", px=5_000)
    slot = T0 + timedelta(seconds=1)
    assert await fire(aredis, keys, "me", slot, "me/1") == 1
    assert await fire(aredis, keys, "me", slot, "me/1") == 1, "the resent claim (reply lost) must fire"
    assert await fire(aredis, keys, "me", slot, "me/2") == 0, "a new claim of a fired slot must not"


async def test_a_slot_at_or_before_the_last_fired_one_never_fires(aredis, keys):
    await aredis.set(keys.leader("cron"), "me", px=5_000)
    assert await fire(aredis, keys, "me", T0 + timedelta(seconds=5), "me/1") == 1
    assert await fire(aredis, keys, "me", T0 + timedelta(seconds=3), "me/2") == 0
    assert await fire(aredis, keys, "me", T0 + timedelta(seconds=6), "me/3") == 1
    assert await aredis.hget(keys.cron_job("sec"), "slot") == slot_iso(T0 + timedelta(seconds=6)).encode()


async def test_a_process_that_does_not_hold_the_lease_fires_nothing_and_writes_nothing(aredis, keys):
    await aredis.set(keys.leader("cron"), "other", px=5_000)
    assert await fire(aredis, keys, "me", T0, "me/1") == -1
    assert await aredis.exists(keys.cron_job("sec")) == 0


async def test_a_job_removed_from_the_code_leaves_a_key_that_expires(aredis, keys):
    sched, _, _ = await scheduler(aredis, keys)
    await sched.tick(T0)
    await sched.tick(T0 + timedelta(seconds=1.5))
    sched.remove_job("sec")
    await sched.tick(T0 + timedelta(seconds=2.5))
    await sched.stop()
    assert 0 < await aredis.ttl(keys.cron_job("sec")) <= DAY_S + 3_601


async def test_the_dashboard_shows_the_last_fired_slot_of_jobs_it_finds_in_redis(aredis, keys):
    sched, _, _ = await scheduler(aredis, keys)
    await sched.tick(T0)
    await sched.tick(T0 + timedelta(seconds=2.5))
    await sched.stop()
    data = await DashboardData(lambda: Inspector(aredis, keys)).cron()
    assert [(j["name"], j["last_fired"], j["known"]) for j in data["jobs"]] == [
        ("sec", slot_iso(T0 + timedelta(seconds=2)), False)]
