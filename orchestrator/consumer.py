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
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .broker import Delivery, StreamBroker
from .config import Settings
from .errors import EventDecodeError
from .events import Event, decode_fields

log = logging.getLogger("tokiwa.consumer")

# seconds between trims of the stream by a worker (any worker may trim; it is idempotent)
TRIM_INTERVAL_S = 1.0
# a worker reconnecting after Redis failures waits min(cap, base * 2**n) with full jitter
RECONNECT_BASE_S, RECONNECT_CAP_S = 0.1, 5.0
REDIS_ERRORS = (RedisConnectionError, RedisTimeoutError, ConnectionError, OSError)


@dataclass(slots=True)
class Outcome:
    """What processing one event came to."""

    ok: bool
    error: str = ""
    #: redeliver even under ack_policy "always" (a chatflow fenced out by a newer lock holder)
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


def _being_cancelled() -> bool:
    """Whether the current task itself was cancelled (not only an awaited child)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


class _InFlight:
    __slots__ = ("delivery", "task", "lost")

    def __init__(self, delivery: Delivery) -> None:
        self.delivery = delivery
        self.task: asyncio.Task | None = None
        self.lost = False


class Consumer:
    """Consumes the events stream for one consumer name until stopped."""

    def __init__(self, broker: StreamBroker, settings: Settings, process: ProcessFn,
                 on_dead: DeadFn | None = None) -> None:
        self.broker = broker
        self.settings = settings
        self.process = process
        self.on_dead = on_dead  # called with the decoded event after it was dead-lettered
        self.observe: Callable[[str, str], None] | None = None  # (event type, ok|failed|dead)
        self.stats = Stats()
        self.in_flight: dict[str, _InFlight] = {}
        self._ack_buffer: list[str] = []
        self._ack_wakeup = asyncio.Event()
        self._slot_freed = asyncio.Event()
        self._stopping = asyncio.Event()
        # ready entries and idle slots; see _slot() for the lazy wake-up
        self._ready: deque[_InFlight] = deque()
        self._idle: deque[asyncio.Future] = deque()
        self._wake_scheduled = False
        self._read_task: asyncio.Task | None = None
        #: extra slots only reclaimed entries may fill: older work of a dead worker can always
        #: be rescued, even when every regular slot waits (say, for a conversation's turn that
        #: belongs to exactly that entry)
        self.reserve = settings.concurrency // 4 + 1
        self._closing = False
        self._last_reclaim = 0.0
        self._last_trim = 0.0
        self.connected = asyncio.Event()

    # -- lifecycle --------------------------------------------------------------------------
    async def run(self, *, until_drained: bool = False) -> None:
        """Consume until :meth:`request_stop` (or, with ``until_drained``, until the group has
        nothing undelivered or pending). Then finish in-flight work within the grace period,
        hand back the rest, and flush acks."""
        helpers = [
            asyncio.create_task(self._ack_loop(), name="tokiwa-acker"),
            asyncio.create_task(self._renew_loop(), name="tokiwa-renewer"),
        ]
        slots = [asyncio.create_task(self._slot(), name=f"tokiwa-slot-{i}")
                 for i in range(self.settings.concurrency + self.reserve)]
        try:
            await self._read_loop(until_drained)
        finally:
            await self._finish(helpers, slots)

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

    async def _finish(self, helpers: list[asyncio.Task], slots: list[asyncio.Task]) -> None:
        deadline = time.monotonic() + self.settings.grace_period_s
        while self.in_flight and time.monotonic() < deadline:
            self._slot_freed.clear()
            try:
                await asyncio.wait_for(self._slot_freed.wait(), deadline - time.monotonic())
            except TimeoutError:
                break
        self._closing = True
        for task in slots:
            task.cancel()
        await asyncio.gather(*slots, return_exceptions=True)
        self._ack_wakeup.set()
        for task in helpers:
            task.cancel()
        await asyncio.gather(*helpers, return_exceptions=True)
        await self._flush_acks_safely()
        try:
            # everything still pending for us: unfinished work, and entries a cancelled read
            # was handed but never saw (hand_back skips any we no longer own)
            mine = list(await self.broker.pending_ids())
            if mine:
                await self.broker.hand_back(mine)
                log.info("handed back %d unfinished entries", len(mine))
        except REDIS_ERRORS as exc:
            log.warning("could not hand back unfinished entries (they return after the lease): %s", exc)

    # -- reading --------------------------------------------------------------------------
    async def _read_loop(self, until_drained: bool) -> None:
        failures = 0
        while not self._stopping.is_set():
            try:
                progressed = await self._read_once(until_drained)
                if not self.connected.is_set():
                    self.connected.set()
                failures = 0
            except ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                log.warning("consumer group missing (Redis restarted empty?): recreating it")
                await self.broker.ensure_group()
                continue
            except REDIS_ERRORS as exc:
                failures += 1
                self.connected.clear()
                self.stats.reconnects += 1
                delay = random.uniform(0, min(RECONNECT_CAP_S, RECONNECT_BASE_S * 2 ** min(failures, 10)))
                log.warning("redis unavailable (%s); retrying in %.2fs", exc, delay)
                await asyncio.sleep(delay)
                continue
            if until_drained and not progressed and await self._drained():
                return

    async def _read_once(self, until_drained: bool) -> bool:
        free = self.settings.concurrency - len(self.in_flight)
        now = time.monotonic()
        got = 0
        if now - self._last_reclaim >= self.settings.renew_interval_s:
            self._last_reclaim = now
            got += await self._reclaim(free + self.reserve)
            free = self.settings.concurrency - len(self.in_flight)
        if free <= 0:
            self._slot_freed.clear()
            try:  # wake up for the next reclaim round even if no slot frees up
                await asyncio.wait_for(self._slot_freed.wait(), self.settings.renew_interval_s)
            except TimeoutError:
                pass
            return True
        if now - self._last_trim >= TRIM_INTERVAL_S:
            self._last_trim = now
            self.stats.trimmed += await self.broker.trim()
        if free > 0:
            block = 50 if (until_drained or got) else self.settings.block_ms
            self._read_task = asyncio.create_task(self.broker.read(free, block))
            try:
                deliveries = await self._read_task
            except asyncio.CancelledError:
                if self._stopping.is_set() and not _being_cancelled():
                    return got > 0
                raise
            finally:
                self._read_task = None
            self.stats.fetched += len(deliveries)
            for d in deliveries:
                self._start(d)
            got += len(deliveries)
        return got > 0 or bool(self.in_flight)

    async def _reclaim(self, free: int) -> int:
        deliveries, deleted = await self.broker.reclaim(free)
        if deleted:
            log.warning("%d pending entries no longer existed in the stream", deleted)
        for d in deliveries:
            self.stats.reclaimed += 1
            if d.stream_id in self.in_flight:
                continue  # our own entry came back to us: keep working on it
            if d.deliveries > self.settings.max_deliveries:
                await self._dead_letter(d, "max_deliveries",
                                        f"delivered {d.deliveries} times (max {self.settings.max_deliveries})")
                continue
            self._start(d)
        return len(deliveries)

    async def _drained(self) -> bool:
        if self.in_flight or self._ack_buffer:
            return False
        state = await self.broker.group_state()
        return state["pending"] == 0 and state["lag"] == 0

    # -- processing -----------------------------------------------------------------------
    def _start(self, delivery: Delivery) -> None:
        entry = _InFlight(delivery)
        self.in_flight[delivery.stream_id] = entry
        self._ready.append(entry)
        self._kick()

    def _kick(self) -> None:
        """Schedule the wake-up of one idle slot. It runs only when the current task yields, so
        a slot whose handlers finish without suspending processes a whole batch back to back
        (no task switch per event), and concurrency grows exactly when handlers block."""
        if not self._wake_scheduled and self._ready and self._idle:
            self._wake_scheduled = True
            asyncio.get_running_loop().call_soon(self._wake_one)

    def _wake_one(self) -> None:
        self._wake_scheduled = False
        while self._ready and self._idle:
            waiter = self._idle.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def _slot(self) -> None:
        """One of the long-lived slot tasks; each handles one entry at a time (no task is
        created per event)."""
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
            finally:
                entry.task = None

    async def _handle(self, entry: _InFlight) -> None:
        d = entry.delivery
        try:
            try:
                event = decode_fields(d.fields, entry_id=d.stream_id, max_bytes=self.settings.max_event_bytes)
            except EventDecodeError as exc:
                await self._dead_letter(d, exc.reason, str(exc))
                return
            event.deliveries = d.deliveries
            outcome = await self._process(event)
            if self.observe is not None:
                self.observe(event.type, "ok" if outcome.ok else "failed")
            if entry.lost:
                log.warning("entry %s was reclaimed by another worker while we ran it; not acking",
                            d.stream_id)
                return
            await self._settle(entry, outcome)
        finally:
            self.in_flight.pop(d.stream_id, None)
            self._slot_freed.set()

    async def _process(self, event: Event) -> Outcome:
        try:
            return await self.process(event)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the process function should not raise; never crash on it
            log.exception("processing event %s failed unexpectedly", event.id)
            return Outcome(False, f"{type(exc).__name__}: {exc}")

    async def _settle(self, entry: _InFlight, outcome: Outcome) -> None:
        d = entry.delivery
        if outcome.ok:
            self.stats.processed += 1
            self._queue_ack(d.stream_id)
            return
        self.stats.failed += 1
        if d.deliveries >= self.settings.max_deliveries:
            await self._dead_letter(d, "max_deliveries", outcome.error)
        elif self.settings.ack_policy == "always" and not outcome.retry:
            self._queue_ack(d.stream_id)
        else:
            log.info("event %s failed (delivery %d/%d); left pending for redelivery",
                     d.stream_id, d.deliveries, self.settings.max_deliveries)

    async def _dead_letter(self, d: Delivery, reason: str, error: str) -> None:
        try:
            dead_id = await asyncio.shield(self.broker.dead_letter(d, reason=reason, error=error))
        except REDIS_ERRORS as exc:
            log.error("could not dead-letter %s (%s); it stays pending", d.stream_id, exc)
            return
        if dead_id:
            self.stats.dead += 1
            if self.observe is not None:
                raw_type = d.fields.get(b"type", b"unknown")
                self.observe(raw_type.decode("utf-8", "replace") if isinstance(raw_type, bytes) else "unknown", "dead")
            log.warning("entry %s dead-lettered: %s %s", d.stream_id, reason, error[:200])
            await self._after_dead(d)
        else:
            self.stats.lost += 1

    async def _after_dead(self, d: Delivery) -> None:
        if self.on_dead is None:
            return
        try:
            event = decode_fields(d.fields, entry_id=d.stream_id)
        except EventDecodeError:
            return
        try:
            await self.on_dead(event)
        except Exception:
            log.exception("on_dead hook failed for %s", d.stream_id)

    # -- acking and renewing ---------------------------------------------------------------
    def _queue_ack(self, stream_id: str) -> None:
        self._ack_buffer.append(stream_id)
        self._ack_wakeup.set()

    async def _ack_loop(self) -> None:
        while True:
            await self._ack_wakeup.wait()
            self._ack_wakeup.clear()
            await self._flush_acks_safely()

    async def _flush_acks_safely(self) -> None:
        while self._ack_buffer:
            batch, self._ack_buffer = self._ack_buffer, []
            try:
                lost = await asyncio.shield(self.broker.ack(batch))
            except REDIS_ERRORS as exc:
                log.warning("ack of %d entries failed (%s); retrying", len(batch), exc)
                self._ack_buffer[:0] = batch
                await asyncio.sleep(0.2)
                continue
            self.stats.acked += len(batch) - len(lost)
            if lost:
                self.stats.lost += len(lost)
                log.warning("%d entries were no longer ours at ack time: %s", len(lost), lost[:5])

    async def _renew_loop(self) -> None:
        interval = self.settings.renew_interval_s
        while True:
            await asyncio.sleep(interval)
            ids = [sid for sid, f in self.in_flight.items() if not f.lost]
            if not ids:
                continue
            try:
                lost = await self.broker.renew(ids)
            except REDIS_ERRORS as exc:
                log.warning("lease renewal failed: %s", exc)
                continue
            for sid in lost:
                entry = self.in_flight.get(sid)
                if entry is not None and not entry.lost:
                    entry.lost = True
                    self.stats.lost += 1
                    log.warning("lost entry %s to another worker (lease expired); cancelling it", sid)
                    if entry.task:
                        entry.task.cancel()

    # -- introspection --------------------------------------------------------------------
    @property
    def in_flight_count(self) -> int:
        return len(self.in_flight)
