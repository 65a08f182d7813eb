"""Scheduler with an injected clock: no real waiting anywhere."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from orchestrator.cron.scheduler import Scheduler
from orchestrator.errors import ConflictError, CronError, InvalidArgumentError

T0 = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)


class FakeClock:
    """Wall time that moves only when someone sleeps (or the test says so)."""

    def __init__(self, start: datetime = T0) -> None:
        self.t = start
        self.sleeps: list[float] = []

    def now(self) -> datetime:
        return self.t

    def monotonic(self) -> float:
        return (self.t - T0).total_seconds()

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.t += timedelta(seconds=seconds)
        await asyncio.sleep(0)


def make(**options) -> tuple[Scheduler, FakeClock]:
    clock = FakeClock()
    return Scheduler(clock=clock, tz="UTC", **options), clock


def test_add_job_returns_a_generated_id_and_the_job_is_scheduled():
    sched, _ = make()
    job_id = sched.add_job("* * * * *", "tick", lambda name, slot: None)
    assert job_id and job_id != "tick"
    assert sched.is_scheduled(job_id) and sched.is_scheduled("tick")
    assert [j.name for j in sched.jobs()] == ["tick"]


def test_a_job_needs_a_non_blank_name():
    sched, _ = make()
    with pytest.raises(InvalidArgumentError):
        sched.add_job("* * * * *", " ", lambda name, slot: None)


def test_two_jobs_cannot_share_a_name():
    sched, _ = make()
    sched.add_job("* * * * *", "tick", lambda name, slot: None)
    with pytest.raises(ConflictError):
        sched.add_job("*/5 * * * *", "tick", lambda name, slot: None)


def test_an_invalid_expression_is_refused_at_registration():
    sched, _ = make()
    with pytest.raises(CronError):
        sched.add_job("* 24 * * *", "bad", lambda name, slot: None)
    assert sched.jobs() == []


def test_remove_job_unschedules_by_id_and_reports_unknown_ids():
    sched, _ = make()
    job_id = sched.add_job("* * * * *", "tick", lambda name, slot: None)
    assert sched.remove_job(job_id) is True
    assert not sched.is_scheduled(job_id)
    assert sched.remove_job(job_id) is False


def test_next_execution_time_is_the_next_matching_time_or_none():
    sched, clock = make()
    job_id = sched.add_job("*/15 * * * *", "q", lambda name, slot: None)
    clock.t = T0 + timedelta(minutes=1)
    assert sched.next_execution_time(job_id) == T0 + timedelta(minutes=15)
    assert sched.next_execution_time("nope") is None


def test_a_fixed_check_interval_must_be_positive():
    with pytest.raises(InvalidArgumentError):
        Scheduler(check_interval_s=0)


async def test_a_tick_fires_only_the_latest_slot_due_since_the_previous_check():
    sched, clock = make()
    calls: list[tuple[str, datetime]] = []

    async def handler(name, slot):
        calls.append((name, slot))

    sched.add_job("* * * * *", "m", handler)
    await sched.tick(T0)
    fired = await sched.tick(T0 + timedelta(minutes=3, seconds=5))
    await sched.stop()
    assert fired == [("m", T0 + timedelta(minutes=3))]
    assert calls == fired


async def test_a_tick_with_nothing_due_fires_nothing():
    sched, _ = make()
    sched.add_job("0 * * * *", "hourly", lambda name, slot: None)
    await sched.tick(T0 + timedelta(minutes=1))
    assert await sched.tick(T0 + timedelta(minutes=2)) == []


async def test_a_new_job_does_not_fire_slots_from_before_it_was_added():
    sched, clock = make()
    await sched.tick(T0)
    clock.t = T0 + timedelta(minutes=5, seconds=30)
    sched.add_job("* * * * *", "late", lambda name, slot: None)
    assert await sched.tick(T0 + timedelta(minutes=5, seconds=40)) == []


async def test_running_scheduler_fires_at_each_minute_boundary_with_the_fake_clock():
    sched, clock = make()
    seen: list[datetime] = []
    three = asyncio.Event()

    async def handler(name, slot):
        seen.append(slot)
        if len(seen) == 3:
            three.set()

    clock.t = T0 + timedelta(seconds=20)
    sched.add_job("* * * * *", "m", handler)
    await sched.start()
    await asyncio.wait_for(three.wait(), 5)
    await sched.stop()
    assert seen[:3] == [T0 + timedelta(minutes=k) for k in (1, 2, 3)]
    assert clock.sleeps[0] == pytest.approx(40.0)  # slept to the boundary, not a fixed minute


async def test_fixed_check_interval_sleeps_exactly_that_long():
    sched, clock = make(check_interval_s=7.5)
    sched.add_job("* * * * *", "m", lambda name, slot: None)
    await sched.start()
    while len(clock.sleeps) < 3:
        await asyncio.sleep(0)
    await sched.stop()
    assert set(clock.sleeps[:3]) == {7.5}


async def test_a_failing_handler_is_logged_and_the_scheduler_keeps_firing(caplog):
    sched, _ = make()
    ok: list[datetime] = []

    def boom(name, slot):
        raise ValueError("handler broke")

    sched.add_job("* * * * *", "bad", boom)
    sched.add_job("* * * * *", "good", lambda name, slot: ok.append(slot))
    await sched.tick(T0)
    await sched.tick(T0 + timedelta(minutes=1))
    await sched.tick(T0 + timedelta(minutes=2))
    await sched.stop()
    assert ok == [T0 + timedelta(minutes=1), T0 + timedelta(minutes=2)]
    assert "handler broke" in caplog.text


async def test_stop_waits_for_a_running_handler_and_is_idempotent():
    sched, _ = make()
    finished = asyncio.Event()

    async def slow(name, slot):
        await asyncio.sleep(0.05)
        finished.set()

    sched.add_job("* * * * *", "slow", slow)
    await sched.tick(T0)
    await sched.tick(T0 + timedelta(minutes=1))
    await sched.stop()
    assert finished.is_set()
    await sched.stop()


async def test_stop_cancels_handlers_that_outlive_the_grace_period():
    sched, _ = make(stop_grace_s=0.05)
    cancelled = asyncio.Event()

    async def stuck(name, slot):
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    sched.add_job("* * * * *", "stuck", stuck)
    await sched.tick(T0)
    await sched.tick(T0 + timedelta(minutes=1))
    await asyncio.wait_for(sched.stop(), 5)
    assert cancelled.is_set()


async def test_describe_lists_expression_and_next_fire():
    sched, _ = make()
    sched.add_job("0 0 * * *", "nightly", lambda name, slot: None)
    [row] = await sched.describe()
    assert row["name"] == "nightly" and row["expr"] == "0 0 * * *"
    assert row["next_fire"] == "2026-01-02T00:00:00+00:00"
