"""Schedulers that fire cron jobs: ``Scheduler`` (one process) and ``LeaderScheduler``
(many processes, one leader).

A job is ``(expr, name, handler)``; the handler is called as ``handler(job_name, slot)``
where ``slot`` is the aware firing time in the job's zone. Plain ``def`` handlers run in a
thread, ``async def`` ones on the loop; handler errors are logged, never fatal, and handlers
are not awaited before the next check (runs of one job may overlap, as in tokiwa).

When it checks: by default the loop sleeps until the earliest next firing time of any job
(minute boundaries for 5-field jobs, seconds for 6-field ones), at most 60 s; with
``check_interval_s`` it checks at that fixed interval instead. Each check fires, per job,
the latest slot that came due since the previous check (no catch-up, as in tokiwa).

The clock is injectable: ``clock.now()`` (aware datetime) and ``await clock.sleep(s)``; a
test can also call :meth:`Scheduler.tick` with any ``now``.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, tzinfo
from enum import StrEnum
from typing import Any

from orchestrator.callbacks import call_maybe_async
from orchestrator.clock import SystemClock
from orchestrator.cron.expr import Cron, parse_slot, slot_iso
from orchestrator.errors import ConflictError, InvalidArgumentError
from orchestrator.keys import Keys
from orchestrator.leader import LeaderElector
from orchestrator.locks import cancel_and_wait, new_token

log = logging.getLogger(__name__)

Handler = Callable[[str, datetime], Any]
# the longest the loop sleeps without checking (a wall-clock jump is noticed within this).
_MAX_SLEEP_S = 60.0
# the most slots a leader fires for one job in one check (catch-up after a long outage).
_MAX_SLOTS_PER_CHECK = 1_000
# a job's state key (keys.cron_job) lives this long past its next slot and the missed-slot window
_STATE_TTL_MARGIN_S = 86_400


@dataclass
class CronJob:
    """One registered job. ``last_slot`` is the last slot this process fired."""

    id: str
    name: str
    cron: Cron
    handler: Handler
    added_at: datetime
    last_slot: datetime | None = None
    next_fire: datetime | None = None

    @property
    def expr(self) -> str:
        return self.cron.expr


class MissedSlotPolicy(StrEnum):
    """What a newly elected leader does with slots that came due while nobody fired them."""

    LATEST = "latest"  # fire the most recent missed slot once (tokiwa's rule)
    ALL = "all"  # fire every missed slot within the window, oldest first
    NONE = "none"  # fire none of them


class Scheduler:
    """Fires cron jobs in this process (see the module docstring)."""

    def __init__(self, *, check_interval_s: float | None = None, tz: str | tzinfo | None = None,
                 clock: Any = None, stop_grace_s: float = 30.0) -> None:
        if check_interval_s is not None and not check_interval_s > 0:
            raise InvalidArgumentError(f"check_interval_s must be > 0, got {check_interval_s!r}")
        self.check_interval_s = check_interval_s
        self.tz = tz
        self.clock = clock or SystemClock()
        self.stop_grace_s = stop_grace_s
        self._jobs: dict[str, CronJob] = {}
        self._running: set[asyncio.Task[None]] = set()
        self._loop_task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._last_check: datetime | None = None

    # -- registry -------------------------------------------------------------------------
    def add_job(self, expr: str, name: str, handler: Handler) -> str:
        """Register a job; returns its generated id. The name is required and unique."""
        if not isinstance(name, str) or not name.strip():
            raise InvalidArgumentError(f"a cron job needs a non-blank name, got {name!r}")
        if any(c.isspace() for c in name):
            raise InvalidArgumentError(f"cron job name {name!r} must not contain whitespace")
        if not callable(handler):
            raise InvalidArgumentError(f"cron job {name!r}: handler must be callable")
        if self.get_job(name) is not None:
            raise ConflictError(f"a cron job named {name!r} is already registered")
        cron = Cron(expr, self.tz)
        now = self.clock.now()
        job = CronJob(id=uuid.uuid4().hex, name=name, cron=cron, handler=handler, added_at=now,
                      next_fire=cron.next_after(now))
        self._jobs[job.id] = job
        self._wake.set()
        return job.id

    def get_job(self, job_id_or_name: str) -> CronJob | None:
        job = self._jobs.get(job_id_or_name)
        if job is None:
            job = next((j for j in self._jobs.values() if j.name == job_id_or_name), None)
        return job

    def remove_job(self, job_id_or_name: str) -> bool:
        """Unregister a job by id or name; returns whether it existed."""
        job = self.get_job(job_id_or_name)
        if job is None:
            return False
        del self._jobs[job.id]
        return True

    def is_scheduled(self, job_id_or_name: str) -> bool:
        return self.get_job(job_id_or_name) is not None

    def jobs(self) -> list[CronJob]:
        return list(self._jobs.values())

    def next_execution_time(self, job_id_or_name: str) -> datetime | None:
        """The next firing time after now, or None for an unknown job."""
        job = self.get_job(job_id_or_name)
        return None if job is None else job.cron.next_after(self.clock.now())

    async def describe(self) -> list[dict[str, Any]]:
        """One dict per job: name, id, expr, tz, next_fire, last_fired, leader."""
        now = self.clock.now()
        return [{"name": j.name, "id": j.id, "expr": j.expr, "tz": str(j.cron.tz),
                 "next_fire": j.cron.next_after(now).isoformat(),
                 "last_fired": slot_iso(j.last_slot) if j.last_slot else None, "leader": None}
                for j in self._jobs.values()]

    # -- checking and firing --------------------------------------------------------------
    async def tick(self, now: datetime | None = None) -> list[tuple[str, datetime]]:
        """One check at ``now``: fire what came due since the previous check.
        Returns the (job name, slot) pairs fired."""
        now = now or self.clock.now()
        prev = self._last_check or now
        self._last_check = now
        fired: list[tuple[str, datetime]] = []
        for job in list(self._jobs.values()):
            for slot in await self._due(job, max(prev, job.added_at), now):
                if await self._claim(job, slot):
                    job.last_slot = slot
                    self._spawn(job, slot)
                    fired.append((job.name, slot))
            job.next_fire = job.cron.next_after(now)
        return fired

    async def _due(self, job: CronJob, since: datetime, now: datetime) -> list[datetime]:
        return job.cron.slots_between(max(since, now - timedelta(days=1)), now, limit=1)

    async def _claim(self, job: CronJob, slot: datetime) -> bool:
        return True

    def _spawn(self, job: CronJob, slot: datetime) -> None:
        task = asyncio.create_task(self._call(job, slot), name=f"cron:{job.name}:{slot_iso(slot)}")
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def _call(self, job: CronJob, slot: datetime) -> None:
        try:
            await call_maybe_async(job.handler, job.name, slot)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("cron job %r failed for slot %s", job.name, slot_iso(slot))

    def _delay(self, now: datetime) -> float:
        if self.check_interval_s is not None:
            return self.check_interval_s
        upcoming = [j.next_fire for j in self._jobs.values() if j.next_fire is not None]
        if not upcoming:
            return _MAX_SLEEP_S
        return min(_MAX_SLEEP_S, max(0.0, (min(upcoming) - now).total_seconds()))

    async def _wait(self, delay: float) -> None:
        sleeper = asyncio.ensure_future(self.clock.sleep(delay))
        waker = asyncio.ensure_future(self._wake.wait())
        try:
            await asyncio.wait({sleeper, waker}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (sleeper, waker):
                if not task.done():
                    await cancel_and_wait(task)
        self._wake.clear()

    async def _run(self) -> None:
        while True:
            now = self.clock.now()
            try:
                await self.tick(now)
            except asyncio.CancelledError:
                raise
            except Exception:  # Redis down, ...: the next check tries again
                log.exception("cron check failed")
            await self._wait(self._delay(now))

    # -- lifecycle ------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._loop_task is not None and not self._loop_task.done()

    async def start(self) -> None:
        """Start checking in a task owned by the scheduler (idempotent)."""
        if self.running:
            return
        self._last_check = self.clock.now() - timedelta(microseconds=1)
        self._loop_task = asyncio.create_task(self._run(), name="cron-scheduler")

    async def stop(self) -> None:
        """Stop checking, wait up to ``stop_grace_s`` for running handlers, then cancel
        them (idempotent)."""
        task, self._loop_task = self._loop_task, None
        if task is not None:
            await cancel_and_wait(task)
        if self._running:
            _, pending = await asyncio.wait(set(self._running), timeout=self.stop_grace_s)
            for leftover in pending:
                await cancel_and_wait(leftover)


# KEYS[1] = the job's state hash (keys.cron_job: fields slot, token), KEYS[2] = leader lease
# (keys.leader('cron'))
# ARGV[1] = holder id, ARGV[2] = slot (slot_iso, ordered like the times), ARGV[3] = claim token
# (``<holder id>/<random>``, new for every claim call), ARGV[4] = the state's TTL s
# Compare-and-set: fires only while ARGV[1] holds the lease and the job's last fired slot is
# older than ARGV[2]; then records ARGV[2] with the token and renews the TTL. A state that
# already holds ARGV[2] with ARGV[3] is this very claim, resent by redis-py after its reply
# was lost: it fires. Returns 1 = fire, 0 = this slot (or a later one) already fired,
# -1 = not the leader.
FIRE = """
local state = redis.call('HMGET', KEYS[1], 'slot', 'token')
if state[1] == ARGV[2] and state[2] == ARGV[3] then return 1 end
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return -1 end
if state[1] and state[1] >= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], 'slot', ARGV[2], 'token', ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[4])
return 1
"""


@dataclass
class _Term:
    """One leadership term of this process: when it began and the last slots seen."""

    start: datetime
    prev: datetime
    last: dict[str, datetime | None] = field(default_factory=dict)
    checked: bool = False  # the term's first check (where missed slots are handled) is done


class LeaderScheduler(Scheduler):
    """Fires jobs only while ``elector`` says this process leads; each (job, slot) fires at
    most once cluster-wide, idempotent when redis-py resends the claim after a lost reply
    (see :data:`FIRE`).

    One key per job holds its state (``keys.cron_job``: the last fired slot and the claim
    token that fired it), moved forward by compare-and-set: slots fire in time order, and a
    slot at or before the last fired one never fires again, whoever leads. So a job's Redis
    footprint is one small hash whatever its frequency (a marker key per slot would be 86 400
    keys a day for an every-second job). The key expires the job's period plus
    ``missed_window_s`` plus a day after its last fire: long enough that the state is there
    for every slot it guards, and a job removed from the code leaves nothing for ever.

    The leader fires every slot of its own term. Slots that came due before its term and
    after the last fired slot, within ``missed_window_s``, follow ``missed_policy``. A job
    that never fired anywhere (or not for longer than its state lives) has no missed slots.
    The state is set before the handler runs: a leader that dies mid-handler does not re-run
    it (at most once). A claim whose reply was lost and that redis-py resends after another
    leader already fired a later slot is answered "already fired": that slot is marked and
    unfired, at most once still holding.
    """

    def __init__(self, elector: LeaderElector, redis: Any, keys: Keys, *,
                 missed_policy: MissedSlotPolicy | str = MissedSlotPolicy.LATEST,
                 missed_window_s: float = 3_600.0, **options: Any) -> None:
        super().__init__(**options)
        try:
            self.missed_policy = MissedSlotPolicy(missed_policy)
        except ValueError as exc:
            raise InvalidArgumentError(
                f"missed_policy must be one of latest, all, none; got {missed_policy!r}") from exc
        if not missed_window_s >= 0:
            raise InvalidArgumentError(f"missed_window_s must be >= 0, got {missed_window_s!r}")
        self.elector, self.redis, self.keys = elector, redis, keys
        self.missed_window = timedelta(seconds=missed_window_s)
        self._term: _Term | None = None
        self._fire = redis.register_script(FIRE)
        elector.add_listener(on_elected=lambda _epoch: self._wake.set())

    async def tick(self, now: datetime | None = None) -> list[tuple[str, datetime]]:
        now = now or self.clock.now()
        if not self.elector.is_leader:
            self._term, self._last_check = None, now
            return []
        if self._term is None:
            self._term = _Term(start=now, prev=self._last_check or now)
        term = self._term
        fired = await super().tick(now)
        term.checked = True
        return fired

    async def _last_fired(self, term: _Term, job: CronJob) -> datetime | None:
        if job.name not in term.last:
            raw = await self.redis.hget(self.keys.cron_job(job.name), "slot")
            term.last[job.name] = parse_slot(raw) if raw else None
        return term.last[job.name]

    async def _due(self, job: CronJob, since: datetime, now: datetime) -> list[datetime]:
        term = self._term
        if term is None:  # tick() opens a term before checking jobs; nothing is due outside one
            return []
        last = await self._last_fired(term, job)
        floor = now - self.missed_window
        if term.checked:  # inside our term: every slot since our last fire
            start = max(last or since, term.start, floor)
            return job.cron.slots_between(start, now, limit=_MAX_SLOTS_PER_CHECK)
        if last is None:  # first check of the term, job never fired anywhere
            return job.cron.slots_between(max(since, floor), now, limit=1)
        start = max(last, floor)
        if self.missed_policy is MissedSlotPolicy.LATEST:
            return job.cron.slots_between(start, now, limit=1)
        if self.missed_policy is MissedSlotPolicy.NONE:  # only what came due since we last looked
            start = max(start, term.prev)
        return job.cron.slots_between(start, now, limit=_MAX_SLOTS_PER_CHECK)

    async def _claim(self, job: CronJob, slot: datetime) -> bool:
        if not self.elector.is_leader:
            return False
        result = int(await self._fire(
            keys=[self.keys.cron_job(job.name), self.elector.key],
            args=[self.elector.holder_id, slot_iso(slot), f"{self.elector.holder_id}/{new_token()}",
                  self.state_ttl_s(job, slot)]))
        if result == 1 and self._term is not None:
            self._term.last[job.name] = slot
        return result == 1

    def state_ttl_s(self, job: CronJob, slot: datetime) -> int:
        """Seconds the job's state lives after firing ``slot``: until its next slot, plus the
        missed-slot window, plus a day (a 1-second job: 1 day 1 h; a daily one: 2 days 1 h)."""
        period = job.cron.next_after(slot) - slot
        return int(period.total_seconds() + self.missed_window.total_seconds() + _STATE_TTL_MARGIN_S)

    async def describe(self) -> list[dict[str, Any]]:
        rows = await super().describe()
        leader = await self.elector.current_leader()
        for row in rows:
            raw = await self.redis.hget(self.keys.cron_job(row["name"]), "slot")
            row["last_fired"] = raw.decode() if isinstance(raw, bytes) else raw
            row["leader"] = leader
        return rows

    async def start(self) -> None:
        """Start campaigning (the elector) and checking."""
        await self.elector.start()
        await super().start()

    async def stop(self) -> None:
        """Stop checking, wait for running handlers, then release leadership."""
        await super().stop()
        await self.elector.stop()
