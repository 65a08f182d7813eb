"""The consume loop: fetch (never more than free slots), process concurrently, ack in batches,
renew the leases of in-flight entries, reclaim entries of dead consumers, trim, dead-letter.

Lives in ``orchestrator`` (not ``workers``) because ``Orchestrator.start()`` in mode ``all``
and ``Orchestrator.drain()`` need it; the ``workers`` package adds the process around it
(signals, heartbeat, reconnect policy, relay, process management).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from orchestrator import faults
from orchestrator.broker import signing
from orchestrator.broker.connection import read_block_ms
from orchestrator.broker.streams import Delivery, StreamBroker
from orchestrator.config import Settings
from orchestrator.errors import BrokerError, EventDecodeError
from orchestrator.events import Event, decode_fields
from orchestrator.faults import (
    TRANSIENT,
    Backoff,
    Fault,
    RestartBudget,
    classify,
)
from orchestrator.locks import cancel_and_wait

log = logging.getLogger("tokiwa.consumer")

# seconds between trims of the stream by a worker (any worker may trim; it is idempotent)
TRIM_INTERVAL_S = 1.0
# a consumer stops reading while this many entries per slot wait for a limit
PARKED_MAX_PER_SLOT = 8
# seconds between removals of the consumers of exited workers (see dead_consumer_idle_ms)
CLEANUP_INTERVAL_S = 10.0


def dead_consumer_idle_ms(settings: Settings) -> int:
    """How long a consumer with nothing pending must not have read before it counts as an
    exited worker's and is removed from its group: a minute, or three visibility timeouts if
    longer (a live consumer reads at least every ``block_ms``), unless ``dead_consumer_idle_ms``
    says otherwise."""
    if settings.dead_consumer_idle_ms is not None:
        return settings.dead_consumer_idle_ms
    return max(60_000, 3 * settings.visibility_timeout_ms)
# a worker reconnecting after Redis failures waits min(cap, base * 2**n) with full jitter
RECONNECT_BASE_S, RECONNECT_CAP_S = 0.1, 5.0
# seconds shutdown keeps retrying the last acks while Redis is unavailable
FINAL_FLUSH_S = 5.0


@dataclass(slots=True)
class Outcome:
    """What processing one event came to: ``ok`` acks it; a failure is acked or redelivered
    as ``ack_policy`` says, unless ``retry``. ``error`` says what failed (a dead letter keeps it)."""

    ok: bool
    error: str = ""
    #: redeliver even under ack_policy "always": the event did not fail, something under it
    #: did (Redis, a conversation lock not had in time), or a chatflow was fenced out
    retry: bool = False


ProcessFn = Callable[[Event], Awaitable[Outcome]]
DeadFn = Callable[[Event], Awaitable[None]]


@dataclass(slots=True)
class Stats:
    fetched: int = 0
    processed: int = 0
    failed: int = 0
    dead: int = 0
    reclaimed: int = 0
    lost: int = 0
    acked: int = 0
    trimmed: int = 0
    reconnects: int = 0
    redelivered: int = 0
    groups_recreated: int = 0
    task_restarts: int = 0
    #: entries whose dead-lettering waits for Redis (full, unreachable); renewed meanwhile
    dead_waiting: int = 0
    #: consumers of exited workers removed from the groups
    consumers_removed: int = 0
    #: times an entry was parked because a rate or concurrency limit was reached
    parked: int = 0


class ConsumerFailed(BrokerError):
    """Raised by :meth:`Consumer.run` when a background task failed on something that is not
    a transient Redis fault (or failed too often): the worker exits non-zero so that its
    supervisor restarts it, instead of looking healthy while it is not."""


def _being_cancelled() -> bool:
    """Whether the current task itself was cancelled (not only an awaited child)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


class _InFlight:
    __slots__ = ("delivery", "task", "lost", "parked")

    def __init__(self, delivery: Delivery) -> None:
        self.delivery = delivery
        self.task: asyncio.Task[Any] | None = None
        self.lost = False
        self.parked = False


def redelivery_delay_ms(settings: Settings, deliveries: int) -> int:
    """How long a failed event waits before its next delivery: ``redelivery_backoff_ms``
    doubled per delivery so far, capped at ``redelivery_backoff_max_ms`` and at the visibility
    timeout (an entry handed back is claimable after at most that), half fixed, half jitter."""
    base = settings.redelivery_backoff_ms * 2 ** min(max(deliveries - 1, 0), 20)
    delay = min(base, settings.redelivery_backoff_max_ms, settings.visibility_timeout_ms)
    return int(delay / 2 + random.uniform(0, delay / 2))


class SlotShare:
    """The concurrency of one route, shared by its consumers of the stream partitions.

    Each consumer may fill the slots the others leave free, and always gets its even share
    (``concurrency / partitions``, rounded up) however busy the others are: an idle partition
    leaves its slots to a busy one, and a busy partition never starves another. A read asks for
    at most one share, so readers that return at the same moment overshoot the concurrency by
    less than a share each."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.members: list[Consumer] = []

    def free_for(self, consumer: Consumer) -> int:
        share = -(-self.total // max(1, len(self.members)))
        active = sum(c.active for c in self.members)
        own = consumer.active
        return min(share, self.total - own, max(share - own, self.total - active))

    def freed(self) -> None:
        """A slot of one member freed up: the others may read again."""
        for c in self.members:
            c._slot_freed.set()


class Consumer:
    """Consumes one partition of the events stream for one consumer name until stopped.

    Every Redis error is handled by the fault model (:mod:`orchestrator.faults`): transient
    faults are waited out with backoff and logged once per episode, a missing group is
    recreated, and a background task that fails on anything else is logged and restarted; after
    :data:`MAX_RESTARTS` such failures in :data:`RESTART_WINDOW_S` (or at once on a fatal Redis
    error such as a refused permission) :meth:`run` raises :class:`ConsumerFailed`."""

    def __init__(self, broker: StreamBroker, settings: Settings, process: ProcessFn,
                 on_dead: DeadFn | None = None) -> None:
        self.broker = broker
        self.settings = settings
        self.process = process
        self.on_dead = on_dead  # called with the decoded event after it was dead-lettered
        self.observe: Callable[[str, str], None] | None = None  # (event type, ok|failed|dead)
        #: a route's flow-control limits (:class:`orchestrator.runs.limits.Gate`), if any
        self.gate: Any = None
        self.observe_wait: Callable[[], None] | None = None  # an entry parked by a limit
        self._parked = 0
        self.stats = Stats()
        self.in_flight: dict[str, _InFlight] = {}
        self._ack_buffer: list[str] = []
        self._redeliver: list[tuple[str, int]] = []  # (stream id, delay ms) to hand back
        self._dead_waiting: dict[str, tuple[Delivery, str, str]] = {}
        self._dead_wakeup = asyncio.Event()
        self._ack_wakeup = asyncio.Event()
        self._slot_freed = asyncio.Event()
        self._stopping = asyncio.Event()
        # ready entries and idle slots; see _slot() for the lazy wake-up
        self._ready: deque[_InFlight] = deque()
        self._idle: deque[asyncio.Future[None]] = deque()
        self._wake_scheduled = False
        self._read_task: asyncio.Task[list[Delivery]] | None = None
        #: extra slots only reclaimed entries may fill: older work of a dead worker can always
        #: be rescued, even when every regular slot waits (say, for a conversation's turn that
        #: belongs to exactly that entry)
        self.reserve = settings.concurrency // 4 + 1
        self._closing = False
        self._next_reclaim = 0.0
        self._last_trim = 0.0
        self._last_cleanup = 0.0
        #: whether this consumer trims the stream (one consumer per worker does: the trim
        #: covers every group)
        self.trims = True
        self._budget = RestartBudget("consumer task", stops="the worker")
        self.failure: BaseException | None = None
        self.connected = asyncio.Event()
        #: the route's concurrency when its consumers of several partitions share it
        self.share: SlotShare | None = None

    # -- lifecycle --------------------------------------------------------------------------
    async def run(self, *, until_drained: bool = False) -> None:
        """Consume until :meth:`request_stop` (or, with ``until_drained``, until the group has
        nothing undelivered or pending). Then finish in-flight work within the grace period,
        flush the acks, and hand back only what did not finish. Raises :class:`ConsumerFailed`
        when a background task failed for good."""
        acker = asyncio.create_task(self._supervised("acker", self._ack_loop), name="tokiwa-acker")
        helpers = [
            asyncio.create_task(self._supervised("renewer", self._renew_loop), name="tokiwa-renewer"),
            asyncio.create_task(self._supervised("dead-letterer", self._dead_loop), name="tokiwa-dead-letterer"),
        ]
        slots = [asyncio.create_task(self._slot(), name=f"tokiwa-slot-{i}")
                 for i in range(self.settings.concurrency + self.reserve)]
        try:
            await self._supervised("reader", lambda: self._read_loop(until_drained))
        finally:
            await self._finish(acker, helpers, slots)
        if self.failure is not None:
            raise ConsumerFailed(f"consumer stopped: {self.failure!r}") from self.failure

    def request_stop(self) -> None:
        """Stop fetching; in-flight work finishes (see :meth:`run`). Safe to call twice.
        A blocked XREADGROUP is cancelled at once (entries it may have been handed are
        handed back by :meth:`run`'s shutdown)."""
        self._stopping.set()
        self._slot_freed.set()
        if self._read_task is not None and not self._read_task.done():
            self._read_task.cancel()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    async def _finish(
        self, acker: asyncio.Task[None], helpers: list[asyncio.Task[None]], slots: list[asyncio.Task[None]]
    ) -> None:
        deadline = time.monotonic() + self.settings.grace_period_s
        while self._working() and time.monotonic() < deadline:
            self._slot_freed.clear()
            try:
                await asyncio.wait_for(self._slot_freed.wait(), deadline - time.monotonic())
            except TimeoutError:
                break
        self._closing = True
        await asyncio.gather(*(cancel_and_wait(t) for t in slots))
        # the acker finishes its current batch and flushes the rest: an ack in flight is never
        # cut off, so nothing that finished is handed back and run again
        self._ack_wakeup.set()
        try:
            await asyncio.wait_for(asyncio.shield(acker), FINAL_FLUSH_S)
        except (TimeoutError, Exception):
            await cancel_and_wait(acker)
        await asyncio.gather(*(cancel_and_wait(t) for t in helpers))
        if self._ack_buffer or self._redeliver:
            log.error("%d acks could not be sent before shutdown; those events will run again",
                      len(self._ack_buffer))
        try:
            # everything still pending for us: unfinished work, entries waiting for their
            # dead-lettering, and entries a cancelled read was handed but never saw
            mine = list(await self.broker.pending_ids())
            if mine:
                await self.broker.hand_back(mine)
                log.info("handed back %d unfinished entries", len(mine))
        except Exception as exc:
            log.warning("could not hand back unfinished entries (they return after the lease): %s",
                        faults.describe(exc))

    def _working(self) -> bool:
        """Whether an entry is being processed (entries waiting for a dead-letter or parked by
        a limit do not count: shutdown hands them back)."""
        return len(self.in_flight) > len(self._dead_waiting) + self._parked

    # -- the fault policy -----------------------------------------------------------------
    async def _supervised(self, name: str, loop: Callable[[], Awaitable[None]]) -> None:
        """Run ``loop`` until it returns; on an error apply the fault policy and run it again."""
        backoff = Backoff(RECONNECT_BASE_S, RECONNECT_CAP_S)
        while True:
            try:
                await loop()
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not await self._on_fault(name, exc, backoff):
                    return

    async def _on_fault(self, name: str, exc: BaseException, backoff: Backoff) -> bool:
        """Handle ``exc`` met by the task ``name``; returns False when the task must end (the
        consumer has failed)."""
        fault = classify(exc)
        if fault is Fault.NOGROUP:
            faults.report(exc)
            try:
                await self._recreate_group()
            except Exception as again:  # a full Redis refuses the create: wait, try again
                if classify(again) not in TRANSIENT:
                    return self._fail(name, again)
                faults.report(again)
                await backoff.sleep()
            return True
        if fault in TRANSIENT:
            faults.report(exc)
            if fault is Fault.CONNECTION:
                self.connected.clear()
                self.stats.reconnects += 1
            await backoff.sleep()
            return not self._stopping.is_set() or name != "reader"
        if not self._fail(name, exc):
            return False
        await backoff.sleep()
        return True

    def _fail(self, name: str, exc: BaseException) -> bool:
        """A task failed on a non-transient error: log it; restart it unless that happened too
        often (or the error is a fatal Redis reply), in which case the consumer stops."""
        self._budget.what = f"consumer task {name}"
        if not self._budget.spend(exc):
            if self.failure is None:
                self.failure = exc
            self.request_stop()
            return False
        self.stats.task_restarts += 1
        return True

    async def _recreate_group(self) -> None:
        created = await self.broker.ensure_group()
        self.broker.reset_reclaim_cursor()
        if created:
            self.stats.groups_recreated += 1
            log.warning("recreated consumer group %r on %s from 0 (Redis lost it); resuming",
                        self.broker.group, self.broker.stream)
        faults.recovered(Fault.NOGROUP)

    # -- reading --------------------------------------------------------------------------
    async def _read_loop(self, until_drained: bool) -> None:
        while not self._stopping.is_set():
            progressed = await self._read_once(until_drained)
            if not self.connected.is_set():
                self.connected.set()
            if until_drained and not progressed and await self._drained():
                return

    @property
    def active(self) -> int:
        """Entries that hold a slot: in flight, not waiting for a dead-letter nor parked."""
        return len(self.in_flight) - len(self._dead_waiting) - self._parked

    def _free(self) -> int:
        if self._parked >= PARKED_MAX_PER_SLOT * self.settings.concurrency:
            return 0  # enough entries wait for a limit already: read no more
        if self.share is not None:
            return self.share.free_for(self)
        return self.settings.concurrency - self.active

    def _park(self, entry: _InFlight, wait_ms: int) -> bool:
        """Keep ``entry`` in flight (owned, renewed) without a slot for ``wait_ms``, then hand
        it to a slot again. Returns True (the entry stays in flight)."""
        entry.parked = True
        self._parked += 1
        self.stats.parked += 1
        if self.observe_wait is not None:
            self.observe_wait()

        def unpark() -> None:
            entry.parked = False
            self._parked -= 1
            self._ready.append(entry)
            self._kick()

        asyncio.get_running_loop().call_later(wait_ms / 1000, unpark)
        return True

    async def _read_once(self, until_drained: bool) -> bool:
        free = self._free()
        now = time.monotonic()
        got = 0
        if now >= self._next_reclaim:
            want = free + self.reserve
            got += await self._reclaim(want)
            # a full batch, or a scan that did not reach the end: look again at once
            more = got >= want or self.broker.reclaim_cursor != "0-0"
            self._next_reclaim = now if more and got else now + self.settings.reclaim_interval_s
            free = self._free()
        if free <= 0:
            self._slot_freed.clear()
            try:  # wake up for the next reclaim round even if no slot frees up
                await asyncio.wait_for(self._slot_freed.wait(), self.settings.reclaim_interval_s)
            except TimeoutError:
                pass
            return True
        if self.trims and now - self._last_trim >= TRIM_INTERVAL_S:
            self._last_trim = now
            self.stats.trimmed += await self.broker.trim()
            idle_ms = dead_consumer_idle_ms(self.settings)
            if now - self._last_cleanup >= min(CLEANUP_INTERVAL_S, idle_ms / 2000):
                self._last_cleanup = now
                removed = await self.broker.delete_idle_consumers(idle_ms)
                if removed:
                    self.stats.consumers_removed += removed
                    log.info("removed %d consumers of exited workers (nothing pending, idle over %.0fs)",
                             removed, idle_ms / 1000)
        block = 50 if (until_drained or got) else self._block_ms()
        self._read_task = asyncio.create_task(self.broker.read(free, block))
        try:
            deliveries = await self._read_task
        except asyncio.CancelledError:
            if self._stopping.is_set() and not _being_cancelled():
                return got > 0
            raise
        finally:
            self._read_task = None
        # a reply: a failover or a busy script is over (the end of an outage is logged by the
        # connection layer, at the first reply it reads)
        faults.recovered(Fault.FAILOVER, Fault.BUSY)
        self.stats.fetched += len(deliveries)
        for d in deliveries:
            self._start(d)
        got += len(deliveries)
        return got > 0 or bool(self.in_flight)

    def _block_ms(self) -> int:
        """Block no longer than until the next reclaim round is due."""
        until = (self._next_reclaim - time.monotonic()) * 1000
        block = read_block_ms(self.settings.block_ms, self.settings.redis_timeout_ms)
        return max(10, min(block, int(until)))

    async def _reclaim(self, free: int) -> int:
        deliveries, deleted = await self.broker.reclaim(free)
        if deleted:
            log.warning("%d pending entries no longer existed in the stream", deleted)
        for d in deliveries:
            self.stats.reclaimed += 1
            if d.stream_id in self.in_flight:
                continue  # our own entry came back to us: keep working on it
            if d.deliveries > self.settings.max_deliveries:
                self.in_flight[d.stream_id] = _InFlight(d)
                done = False
                try:
                    done = await self._dead_letter(
                        d, "max_deliveries", f"delivered {d.deliveries} times (max {self.settings.max_deliveries})")
                finally:
                    if done or d.stream_id not in self._dead_waiting:
                        self.in_flight.pop(d.stream_id, None)
                continue
            self._start(d)
        return len(deliveries)

    async def _drained(self) -> bool:
        if self.in_flight or self._ack_buffer or self._redeliver:
            return False
        state = await self.broker.group_state()
        drained: bool = state["pending"] == 0 and state["lag"] == 0
        return drained

    # -- processing -----------------------------------------------------------------------
    def _start(self, delivery: Delivery) -> None:
        entry = _InFlight(delivery)
        self.in_flight[delivery.stream_id] = entry
        self._ready.append(entry)
        self._kick()

    def _kick(self) -> None:
        """Schedule the wake-up of idle slots. It runs only when the current task yields, so a
        slot whose handlers finish without suspending processes a whole batch back to back (no
        task switch per event); when it yields, one idle slot per ready entry wakes at once, so
        handlers that block all start within one turn of the loop instead of one per turn."""
        if not self._wake_scheduled and self._ready and self._idle:
            self._wake_scheduled = True
            asyncio.get_running_loop().call_soon(self._wake_slots)

    def _wake_slots(self) -> None:
        self._wake_scheduled = False
        wanted = len(self._ready)
        while wanted and self._idle:
            waiter = self._idle.popleft()
            if not waiter.done():
                waiter.set_result(None)
                wanted -= 1

    async def _slot(self) -> None:
        """One of the long-lived slot tasks; each handles one entry at a time (no task is
        created per event). An unexpected error on one entry is logged and the slot goes on."""
        me = asyncio.current_task()
        loop = asyncio.get_running_loop()
        while True:
            if not self._ready:
                waiter = loop.create_future()
                self._idle.append(waiter)
                await waiter
                continue
            entry = self._ready.popleft()
            self._kick()  # more ready work: another slot takes it if we block
            if entry.lost:
                self.in_flight.pop(entry.delivery.stream_id, None)
                self._slot_freed.set()
                continue
            entry.task = me
            try:
                await self._handle(entry)
            except asyncio.CancelledError:
                if entry.lost and not self._closing and me is not None:
                    me.uncancel()  # only this entry was cancelled: keep the slot
                    continue
                raise
            except Exception as exc:
                # the entry stays pending and comes back after the lease (then, past
                # max_deliveries, it is dead-lettered by a path that keeps none of its data)
                if classify(exc) in TRANSIENT:  # Redis failing over or unreachable: not a bug
                    faults.report(exc)
                else:
                    self._fail(f"slot ({entry.delivery.stream_id})", exc)
            finally:
                entry.task = None

    async def _handle(self, entry: _InFlight) -> None:
        d = entry.delivery
        keep = False
        try:
            refused = signing.check(d.fields, self.settings)
            if refused is not None:  # a forged, unsigned or wrongly signed entry never runs
                keep = not await self._dead_letter(d, *refused)
                return
            try:
                event = decode_fields(d.fields, entry_id=d.stream_id, max_bytes=self.settings.max_event_bytes)
            except EventDecodeError as exc:
                keep = not await self._dead_letter(d, exc.reason, str(exc))
                return
            except Exception as exc:  # anything else a malformed entry may cause
                keep = not await self._dead_letter(d, "undecodable", f"{type(exc).__name__}: {exc}")
                return
            event.deliveries = d.deliveries
            event.group = self.broker.group
            event.partition = self.broker.partition
            if self.gate is not None:
                wait_ms = await self.gate.enter(event)
                if wait_ms:  # over a limit: park it (pending, renewed, no slot), try again later
                    keep = self._park(entry, wait_ms)
                    return
                try:
                    outcome = await self._process(event)
                finally:
                    await self.gate.leave(event)
            else:
                outcome = await self._process(event)
            if self.observe is not None:
                self.observe(event.type, "ok" if outcome.ok else "failed")
            if self.lost(d.stream_id):
                log.warning("entry %s was reclaimed by another worker while we ran it; not acking",
                            d.stream_id)
                return
            keep = await self._settle(entry, outcome)
        finally:
            if not keep:
                self.in_flight.pop(d.stream_id, None)
            self._slot_freed.set()
            if self.share is not None:
                self.share.freed()

    async def _process(self, event: Event) -> Outcome:
        try:
            return await self.process(event)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the process function should not raise; never crash on it
            log.exception("processing event %s failed unexpectedly", event.id)
            return Outcome(False, f"{type(exc).__name__}: {exc}")

    async def _settle(self, entry: _InFlight, outcome: Outcome) -> bool:
        """Ack, redeliver later or dead-letter; returns True when the entry stays in flight
        (its dead-lettering waits for Redis)."""
        d = entry.delivery
        if outcome.ok:
            self.stats.processed += 1
            self._queue_ack(d.stream_id)
            return False
        self.stats.failed += 1
        if d.deliveries >= self.settings.max_deliveries:
            return not await self._dead_letter(d, "max_deliveries", outcome.error)
        if self.settings.ack_policy == "always" and not outcome.retry:
            self._queue_ack(d.stream_id)
            return False
        delay = redelivery_delay_ms(self.settings, d.deliveries)
        log.info("event %s failed (delivery %d/%d); redelivered in %.2fs",
                 d.stream_id, d.deliveries, self.settings.max_deliveries, delay / 1000)
        self._redeliver.append((d.stream_id, delay))
        self._ack_wakeup.set()
        return False

    async def _dead_letter(self, d: Delivery, reason: str, error: str) -> bool:
        """Dead-letter an entry we hold. Returns False when Redis could not take it now (full,
        unreachable): it then stays in flight, renewed, and is dead-lettered by the
        dead-letterer as soon as Redis takes writes again."""
        try:
            dead_id = await asyncio.shield(self.broker.dead_letter(d, reason=reason, error=error))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            fault = classify(exc)
            if fault not in TRANSIENT and fault is not Fault.NOGROUP:
                raise
            faults.report(exc)
            self._dead_waiting[d.stream_id] = (d, reason, error)
            self.stats.dead_waiting = len(self._dead_waiting)
            self._dead_wakeup.set()
            return False
        self._dead_done(d, dead_id, reason, error)
        await self._after_dead(d, dead_id)
        return True

    def _dead_done(self, d: Delivery, dead_id: str | None, reason: str, error: str) -> None:
        if dead_id:
            self.stats.dead += 1
            if self.observe is not None:
                raw_type = d.fields.get(b"type", b"unknown")
                self.observe(raw_type.decode("utf-8", "replace") if isinstance(raw_type, bytes) else "unknown", "dead")
            log.warning("entry %s dead-lettered: %s %s", d.stream_id, reason, error[:200])
        else:
            self.stats.lost += 1

    async def _dead_loop(self) -> None:
        """Dead-letter the entries whose first attempt met a full or unreachable Redis, with
        backoff; the entries stay in flight (and renewed) until then."""
        backoff = Backoff(0.2, 5.0)
        while True:
            if not self._dead_waiting:
                self._dead_wakeup.clear()
                await self._dead_wakeup.wait()
                continue
            await backoff.sleep()
            for sid, (d, reason, error) in list(self._dead_waiting.items()):
                entry = self.in_flight.get(sid)
                if entry is None or entry.lost:
                    self._forget_dead_waiting(sid)
                    continue
                dead_id = await self.broker.dead_letter(d, reason=reason, error=error)  # errors: _on_fault
                self._forget_dead_waiting(sid)
                faults.recovered(Fault.OOM)
                backoff.reset()
                self._dead_done(d, dead_id, reason, error)
                await self._after_dead(d, dead_id)

    def _forget_dead_waiting(self, sid: str) -> None:
        """The entry no longer waits for its dead-lettering (done, or lost to another worker)."""
        self._dead_waiting.pop(sid, None)
        self.in_flight.pop(sid, None)
        self.stats.dead_waiting = len(self._dead_waiting)
        self._slot_freed.set()

    async def _after_dead(self, d: Delivery, dead_id: str | None) -> None:
        if self.on_dead is None or not dead_id:
            return
        try:
            event = decode_fields(d.fields, entry_id=d.stream_id)
        except Exception:
            return
        event.group = self.broker.group
        event.partition = self.broker.partition
        try:
            await self.on_dead(event)
        except Exception:
            log.exception("on_dead hook failed for %s", d.stream_id)

    # -- acking, redelivering and renewing -------------------------------------------------
    def _queue_ack(self, stream_id: str) -> None:
        self._ack_buffer.append(stream_id)
        self._ack_wakeup.set()

    async def _ack_loop(self) -> None:
        """Flush acks (and failed entries to hand back for redelivery) as they come. Ends only
        at shutdown, after a last flush; a failed flush keeps its batch for the next one."""
        while True:
            await self._flush()
            if self._closing and not self._ack_buffer and not self._redeliver:
                return
            await self._ack_wakeup.wait()
            self._ack_wakeup.clear()

    async def _flush(self) -> None:
        sent = False
        while self._ack_buffer:
            sent = True
            batch, self._ack_buffer = self._ack_buffer, []
            try:
                lost = await asyncio.shield(self.broker.ack(batch))
            except asyncio.CancelledError:
                raise
            except Exception:
                self._ack_buffer[:0] = batch
                raise
            self.stats.acked += len(batch) - len(lost)
            if lost:
                self.stats.lost += len(lost)
                log.warning("%d entries were no longer ours at ack time: %s", len(lost), lost[:5])
        while self._redeliver:
            sent = True
            handbacks, self._redeliver = self._redeliver, []
            by_delay: dict[int, list[str]] = {}
            for sid, delay in handbacks:
                by_delay.setdefault(delay // 10 * 10, []).append(sid)
            try:
                for delay, ids in by_delay.items():
                    await self.broker.redeliver_after(ids, delay)
                    self.stats.redelivered += len(ids)
            except Exception:
                self._redeliver[:0] = handbacks  # a repeat hand-back is harmless
                raise
        if sent:  # only a reply from Redis ends a failover
            faults.recovered(Fault.FAILOVER)

    async def _renew_loop(self) -> None:
        interval = self.settings.renew_interval_s
        while True:
            await asyncio.sleep(interval)
            ids = [sid for sid, f in self.in_flight.items() if not f.lost]
            if not ids:
                continue
            lost = await self.broker.renew(ids)  # errors: the fault policy (_on_fault)
            for sid in lost:
                entry = self.in_flight.get(sid)
                if entry is not None and not entry.lost:
                    entry.lost = True
                    self.stats.lost += 1
                    log.warning("lost entry %s to another worker (lease expired); cancelling it", sid)
                    if entry.task:
                        entry.task.cancel()

    # -- ownership ------------------------------------------------------------------------
    def lost(self, stream_id: str) -> bool:
        """Whether this worker knows that another one took ``stream_id`` (a renewal found it
        taken): its result must be neither acked nor recorded."""
        entry = self.in_flight.get(stream_id)
        return entry is not None and entry.lost

    async def owned(self, stream_ids: Sequence[str]) -> set[str]:
        """The subset of ``stream_ids`` this worker still holds: not known lost here, and still
        pending for this consumer in Redis (one query). This is the ownership rule: run
        records and ``Orchestrator.owns`` use it, and a slot applies its first half before it
        acks (the ack script checks the second half atomically)."""
        return await self.broker.owned([sid for sid in stream_ids if not self.lost(sid)])

    # -- introspection --------------------------------------------------------------------
    @property
    def in_flight_count(self) -> int:
        return len(self.in_flight)
