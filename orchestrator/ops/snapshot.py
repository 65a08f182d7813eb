"""``Orchestrator.snapshot()``: one process's counters and the cluster state it sees (group
state, dead letters, registered workers), as a JSON-ready dict. It is given what it reads (the
broker, the consumer if any, the app's counters and extra sections), not the app."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, cast

from orchestrator.ops.heartbeats import STALE_HEARTBEATS, worker_beats

#: the workflow run counters of ``snapshot()["runs"]``
RUN_COUNTER_KEYS = ("started", "running", "succeeded", "failed", "timed_out", "cancelled", "node_errors",
                    "record_writes", "record_writes_refused", "record_write_errors")

if TYPE_CHECKING:
    import redis.asyncio as aioredis

    from orchestrator.broker.groups import ConsumerGroups
    from orchestrator.broker.streams import StreamBroker


async def app_snapshot(
    *,
    broker: StreamBroker,
    groups: Mapping[str, Mapping[str, Any]],
    consumer: ConsumerGroups | None,
    workers: Callable[[], Awaitable[dict[str, dict[str, Any]]]],
    mode: str,
    is_running: bool,
    namespace: str,
    metrics: Mapping[str, int],
    extra: Mapping[str, Callable[[], Any]],
    runs: Callable[[], Mapping[str, int]] | None = None,
) -> dict[str, Any]:
    """Counters and cluster state: published, processed, failed, dead, in flight, pending,
    stream length and lag, the workers registered in Redis (``workers()``), the workflow run
    counters of this process under ``runs`` (``runs()``: see
    :meth:`orchestrator.runs.registry.WorkflowRegistry.run_counters`; every key is there, at 0,
    when not given), and one section per ``extra`` entry (its function's result). ``pending``
    and ``lag`` are summed over the app's route ``groups``, and each group's state is under
    ``groups``."""
    length = await broker.stream_length_all() if not groups else next(iter(groups.values()))["length"]
    registered = await workers()
    stats = consumer.stats if consumer else None
    return {
        "mode": mode,
        "is_running": is_running,
        "namespace": namespace,
        "published": metrics["published"],
        "processed": metrics["processed"],
        "failed": metrics["failed"],
        "dispatch_errors": metrics["dispatch_errors"],
        "dead": await broker.dead_count_all(),
        "in_flight": consumer.in_flight_count if consumer else 0,
        "pending": sum(int(g["pending"]) for g in groups.values()),
        "lag": sum(int(g["lag"]) for g in groups.values()),
        "stream_length": length,
        "groups": {name: dict(g) for name, g in groups.items()},
        "consumer": {} if stats is None else {k: getattr(stats, k) for k in stats.__slots__},
        "workers": registered,
        "runs": {**dict.fromkeys(RUN_COUNTER_KEYS, 0), **(runs() if runs is not None else {})},
        "timestamp": time.time(),
        **{name: fn() for name, fn in extra.items()},
    }


async def registered_workers(redis: aioredis.Redis, key: str, *,
                             heartbeat_interval_s: float) -> dict[str, dict[str, Any]]:
    """Worker id -> heartbeat dict, from the ``{ns}:workers`` hash at ``key``."""
    entries = cast("Mapping[Any, bytes]", await redis.hgetall(key))
    beats = worker_beats(entries, now=time.time(), stale_after_s=STALE_HEARTBEATS * heartbeat_interval_s)
    return {w.id: w.fields() for w in beats}
