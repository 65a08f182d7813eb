"""Consumer groups of the events stream: creating them, and the consumers of one worker.

Every route (a registration: a subscriber, a workflow, a processor) reads the stream through
its own group; a worker runs one :class:`~orchestrator.broker.consumer.Consumer` per route it
has, all under one :class:`ConsumerGroups`, which looks like a single consumer to the rest of
the app (stats summed, one stop, one failure, ownership asked of the right group).

:func:`declare_groups` creates missing groups: from ``0`` when the stream has no group at all
of this fleet (nothing was consumed by a route yet, so events published before any worker
started are processed),
else from ``$`` (a route new to the fleet runs for events published from now on). It reads
first and writes only what is missing, so a worker starts on a full Redis when its groups
exist.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Sequence
from dataclasses import fields
from typing import Any

from redis.exceptions import ResponseError

from orchestrator.broker.consumer import Consumer, ConsumerFailed, Stats
from orchestrator.errors import BrokerError
from orchestrator.events import Event
from orchestrator.faults import Fault, classify, is_group_exists, is_missing_key

log = logging.getLogger("tokiwa.consumer")


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def group_names(redis: Any, stream: str) -> list[str]:
    """The groups of ``stream`` (none when the stream does not exist)."""
    try:
        groups = await redis.xinfo_groups(stream)
    except ResponseError as exc:
        if is_missing_key(exc):
            return []
        raise
    return [_s(g["name"]) for g in groups]


async def declare_groups(redis: Any, stream: str, wanted: Iterable[str], prefix: str) -> list[str]:
    """Create the groups in ``wanted`` that ``stream`` lacks (see the module docstring for where
    they start: only route groups, named ``{prefix}:…``, count, so a group of another kind, an
    audit consumer or the single group of an older tokiwa, does not make new routes skip the
    entries still in the stream); returns the ones created. Only BUSYGROUP (created meanwhile)
    is benign; OOM, READONLY and the like are raised for the caller's fault policy."""
    wanted = list(dict.fromkeys(wanted))
    if not wanted:
        return []
    existing = await group_names(redis, stream)
    start = "$" if any(g.startswith(f"{prefix}:") for g in existing) else "0"
    created = []
    for group in wanted:
        if group in existing:
            continue
        try:
            await redis.xgroup_create(stream, group, id=start, mkstream=True)
            created.append(group)
        except ResponseError as exc:
            if is_group_exists(exc):
                continue
            if classify(exc) is not Fault.FATAL:
                raise
            raise BrokerError(f"cannot create group {group!r} on {stream}: {exc}") from exc
    if created:
        log.info("created consumer groups %s on %s from %s", created, stream, start)
    return created


class ConsumerGroups:
    """One worker's consumers, one per route group and stream partition, run and stopped
    together. A consumer that fails for good (:class:`ConsumerFailed`) stops the others: the
    worker exits non-zero."""

    def __init__(self, consumers: dict[tuple[str, int], Consumer]) -> None:
        self.consumers = consumers
        trimmed: set[int] = set()
        for (_, partition), consumer in consumers.items():
            consumer.trims = partition not in trimmed  # one trim per partition covers every group
            trimmed.add(partition)
        self._stop = asyncio.Event()
        self.failure: BaseException | None = None

    @property
    def groups(self) -> list[str]:
        return list(dict.fromkeys(group for group, _ in self.consumers))

    async def run(self, *, until_drained: bool = False) -> None:
        if not self.consumers:
            if not until_drained:
                await self._stop.wait()
            if self.failure is not None:
                raise ConsumerFailed(f"stopped: {self.failure!r}") from self.failure
            return
        tasks = {asyncio.create_task(c.run(until_drained=until_drained), name=f"tokiwa-consumer-{g}-p{p}"): g
                 for (g, p), c in self.consumers.items()}
        failed: BaseException | None = None
        try:
            pending = set(tasks)
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    exc = task.exception()
                    if exc is not None and failed is None:
                        failed = exc
                        log.error("the consumer of group %s failed; stopping the others", tasks[task])
                        self.request_stop()
        except asyncio.CancelledError:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        failed = failed or self.failure  # a consumer's, or another component's (request_stop'ed)
        if failed is not None:
            self.failure = failed
            if isinstance(failed, ConsumerFailed):
                raise failed
            raise ConsumerFailed(f"consumer stopped: {failed!r}") from failed

    def request_stop(self) -> None:
        self._stop.set()
        for consumer in self.consumers.values():
            consumer.request_stop()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    @property
    def stats(self) -> Stats:
        """Every consumer's counters, summed."""
        total = Stats()
        for consumer in self.consumers.values():
            for f in fields(Stats):
                setattr(total, f.name, getattr(total, f.name) + getattr(consumer.stats, f.name))
        return total

    @property
    def in_flight_count(self) -> int:
        return sum(c.in_flight_count for c in self.consumers.values())

    def set_observer(self, observe: Any) -> None:
        for consumer in self.consumers.values():
            consumer.observe = observe

    def consumer_of(self, group: str | None, partition: int = 0) -> Consumer | None:
        return self.consumers.get((group, partition)) if group is not None else None

    async def owned_events(self, events: Sequence[Event]) -> set[tuple[str | None, int, str]]:
        """The entries (:func:`entry_of`) of ``events`` this worker still holds, asked of each
        event's own group and partition (one query each)."""
        by_consumer: dict[tuple[str | None, int], list[str]] = {}
        for e in events:
            if e.stream_id:
                by_consumer.setdefault((e.group, e.partition), []).append(e.stream_id)
        out: set[tuple[str | None, int, str]] = set()
        for (group, partition), ids in by_consumer.items():
            consumer = self.consumer_of(group, partition)
            if consumer is None:
                continue  # not delivered by a consumer of ours: not ours to record
            out |= {(group, partition, sid) for sid in await consumer.owned(ids)}
        return out


def entry_of(event: Event) -> tuple[str | None, int, str | None]:
    """What names an event's stream entry among a worker's: its group, partition and id (ids
    of different partitions may be equal)."""
    return event.group, event.partition, event.stream_id
