"""Prometheus metrics of tokiwa: one registry, the metric objects, and the functions that move them.

Every metric lives in :data:`REGISTRY` (tokiwa's own, not prometheus-client's global one, so
an app's metrics and tokiwa's never collide and tests can scrape exactly ours). Names follow
pyoco's (``pyoco_runs_total`` → ``tokiwa_runs_total``) with the labels the issue asks for.

Who moves what:

* :class:`MetricsHooks` (a :class:`~orchestrator.workflow.hooks.WorkflowHooks`) - runs and nodes;
* :func:`observe_event` / :func:`observe_dead` - called by the consumer per event;
* :func:`refresh_gauges` - stream length, group lag, pending entries (read from Redis at
  scrape time by :mod:`orchestrator.ops.http_api`, or polled by whoever wants to);
* :func:`set_leader`, :func:`observe_relay_overflow` - leadership changes, relay overflow.

Multiprocess mode: when ``PROMETHEUS_MULTIPROC_DIR`` is set **before** prometheus-client is
first imported, every process writes its values to files in that folder, and
:func:`scrape` merges the files of every process, so one scrape of one port shows all the
worker processes of a host (``tokiwa-worker run --processes P``). See docs/observability.md.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client import (
    REGISTRY as DEFAULT_REGISTRY,
)
from prometheus_client import multiprocess as _multiprocess
from prometheus_client.core import GaugeMetricFamily
from redis.exceptions import ResponseError

from orchestrator.errors import InvalidArgumentError
from orchestrator.ops.heartbeats import STALE_HEARTBEATS, worker_beats
from orchestrator.workflow.hooks import WorkflowHooks

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# pyoco's buckets (0.05 ... 60 s) with finer ones for fast nodes and coarser for long runs.
DURATION_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900)
EVENT_OUTCOMES = ("ok", "failed", "dead")
# Distinct event types labelled per process; later types are counted as OTHER_TYPE so that a
# producer inventing types (``order.<uuid>``) cannot blow up Prometheus' memory.
MAX_EVENT_TYPES = 500
OTHER_TYPE = "__other__"

REGISTRY = CollectorRegistry(auto_describe=True)

RUNS = Counter("tokiwa_runs", "Finished workflow runs by final status.",
               ["workflow", "status"], registry=REGISTRY)
RUNS_IN_PROGRESS = Gauge("tokiwa_runs_in_progress", "Workflow runs executing now.",
                         ["workflow"], registry=REGISTRY, multiprocess_mode="livesum")
NODE_DURATION = Histogram("tokiwa_node_duration_seconds", "Node duration, retries included, once per node.",
                          ["workflow", "node"], buckets=DURATION_BUCKETS_S, registry=REGISTRY)
RUN_DURATION = Histogram("tokiwa_run_duration_seconds", "Workflow run duration, once per run.",
                         ["workflow"], buckets=DURATION_BUCKETS_S, registry=REGISTRY)
EVENTS = Counter("tokiwa_events", "Events processed by workers, by type and outcome (ok, failed, dead).",
                 ["type", "outcome"], registry=REGISTRY)
DEAD_LETTERS = Counter("tokiwa_dead_letters", "Stream entries moved to the dead-letter stream.",
                       registry=REGISTRY)
LIMIT_WAITS = Counter("tokiwa_limit_waits", "Times an event was parked because a route's rate or concurrency "
                      "limit was reached (it waits without a slot).", registry=REGISTRY)
UNORDERED = Counter("tokiwa_conversation_unordered", "Chatflow turns that arrived without their conversation "
                    "order (published without the conversation key, e.g. a raw XADD).", registry=REGISTRY)


class ClusterGauges:
    """Cluster-wide values read from Redis (stream lengths, group lag, pending entries).

    Not process metrics: every process would report the same numbers, so they are not
    :class:`Gauge` objects (whose multiprocess files would need merging) but a collector that
    shows what the **scraped** process last read with :func:`refresh_gauges`. In multiprocess
    mode :func:`scrape` adds it to the merged registry, so the one serving process shows them
    once, fresh."""

    FAMILIES = (
        ("tokiwa_stream_length", "Entries in a stream (events or dead), read from Redis.", "stream"),
        ("tokiwa_group_lag", "Entries of the events stream not yet delivered to the group.", "group"),
        ("tokiwa_pending_entries", "Entries delivered to the group but not acked yet.", "group"),
        ("tokiwa_group_live_workers", "Live workers (fresh heartbeat) reading the group: 0 while it has "
                                      "lag or pending entries means its route's events wait for a worker.", "group"),
        ("tokiwa_delayed_events", "Delayed events waiting for their due time.", "namespace"),
    )

    def __init__(self) -> None:
        self.values: dict[str, Mapping[str, float]] = {name: {} for name, _, _ in self.FAMILIES}

    def collect(self) -> Iterator[GaugeMetricFamily]:
        for name, doc, label in self.FAMILIES:
            family = GaugeMetricFamily(name, doc, labels=[label])
            for value_label, value in sorted(self.values[name].items()):
                family.add_metric([value_label], value)
            yield family

    def describe(self) -> list[GaugeMetricFamily]:
        return [GaugeMetricFamily(name, doc, labels=[label]) for name, doc, label in self.FAMILIES]


CLUSTER = ClusterGauges()
REGISTRY.register(CLUSTER)
LEADER = Gauge("tokiwa_leader", "1 while this process (or any live process of the host) leads the role.",
               ["role"], registry=REGISTRY, multiprocess_mode="livemax")
RELAY_OVERFLOW = Counter("tokiwa_relay_overflow", "Relay messages dropped because a child's queue was full.",
                         registry=REGISTRY)

_types_lock = threading.Lock()
_seen_types: set[str] = set()


def multiprocess_dir() -> str | None:
    """The multiprocess folder when multiprocess mode is on, else None."""
    return os.environ.get(MULTIPROC_ENV) or None


def prepare_multiprocess_dir(path: str | os.PathLike[str]) -> Path:
    """Create ``path`` and remove the ``*.db`` files of a previous run (call it in the parent
    **before** starting the processes, then give them ``PROMETHEUS_MULTIPROC_DIR=path``)."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("*.db"):
        stale.unlink(missing_ok=True)
    return folder


def mark_process_dead(pid: int, path: str | os.PathLike[str] | None = None) -> None:
    """Drop the live gauges (in progress, leader) of an exited process; the supervisor calls it."""
    folder = path or multiprocess_dir()
    if folder:
        _multiprocess.mark_process_dead(pid, str(folder))


def scrape(path: str | os.PathLike[str] | None = None, *, include_default: bool = True) -> tuple[bytes, str]:
    """The Prometheus text of tokiwa's metrics and its content type.

    With a multiprocess folder (``path``, else ``PROMETHEUS_MULTIPROC_DIR``) the values of
    every process that wrote there are merged (tokiwa's and the app's own metrics alike).
    Otherwise this process's registry is read, followed by prometheus-client's default one
    (``process_*`` and ``python_*`` metrics, and any metric the app registered there) unless
    ``include_default`` is False."""
    folder = path or multiprocess_dir()
    if folder:
        registry = CollectorRegistry()
        _multiprocess.MultiProcessCollector(registry, path=str(folder))
        registry.register(CLUSTER)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    body = generate_latest(REGISTRY)
    if include_default:
        body += generate_latest(DEFAULT_REGISTRY)
    return body, CONTENT_TYPE_LATEST


def metric_names() -> set[str]:
    """Every sample name tokiwa exposes (``tokiwa_runs_total``, ``..._bucket``, ``..._sum`` ...)."""
    names: set[str] = set()
    for family in REGISTRY.collect():
        names.add(family.name)
        suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created")}
        names.update(family.name + s for s in suffixes.get(family.type, ()))
    return names


# -- events ----------------------------------------------------------------------------------
def _type_label(event_type: str) -> str:
    if event_type in _seen_types:
        return event_type
    with _types_lock:
        if len(_seen_types) >= MAX_EVENT_TYPES:
            return OTHER_TYPE
        _seen_types.add(event_type)
    return event_type


def observe_event(event_type: str, outcome: str) -> None:
    """Count one processed event: ``outcome`` is ``ok``, ``failed`` (will be retried or was
    acked as failed) or ``dead`` (moved to the dead-letter stream)."""
    if outcome not in EVENT_OUTCOMES:
        raise InvalidArgumentError(f"event outcome must be one of {EVENT_OUTCOMES}, got {outcome!r}")
    if not isinstance(event_type, str) or not event_type:
        raise InvalidArgumentError(f"event type must be a non-empty string, got {event_type!r}")
    EVENTS.labels(type=_type_label(event_type), outcome=outcome).inc()


def observe_dead(count: int = 1) -> None:
    """Count entries moved to the dead-letter stream (decode errors, max deliveries)."""
    DEAD_LETTERS.inc(count)


def observe_relay_overflow(count: int = 1) -> None:
    """Count relay messages dropped because a child's stdin queue was full."""
    RELAY_OVERFLOW.inc(count)


def set_leader(role: str, leading: bool) -> None:
    """Record whether this process leads ``role`` (call from ``on_elected`` / ``on_demoted``)."""
    LEADER.labels(role=role).set(1 if leading else 0)


# -- gauges read from Redis ------------------------------------------------------------------
def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def refresh_gauges(broker: Any) -> dict[str, int]:
    """Read stream lengths, group lag and pending counts from Redis into the gauges.

    ``broker`` is a :class:`~orchestrator.broker.streams.StreamBroker` (anything with ``redis``,
    ``keys`` and ``group``). Every group of the events stream gets its own label, so a
    second group (an audit consumer ...) shows up too. Returns what it set, for logging."""
    redis, keys = broker.redis, broker.keys
    out = {"events": 0, "dead": 0, "delayed": 0}
    lags: dict[str, int] = {}
    pendings: dict[str, int] = {}
    for part in keys.partitions(broker.settings.partitions):
        async with redis.pipeline(transaction=False) as pipe:
            pipe.xlen(part.events)
            pipe.xlen(part.dead)
            pipe.zcard(part.delayed)
            events_len, dead_len, delayed = await pipe.execute()
        out["events"] += int(events_len)
        out["dead"] += int(dead_len)
        out["delayed"] += int(delayed)
        try:
            groups = await redis.xinfo_groups(part.events)
        except ResponseError:  # no stream yet: no group either
            groups = []
        for group in groups:
            name = _text(group["name"])
            lag = group.get("lag")
            # NULL lag: count it all as lag
            lags[name] = lags.get(name, 0) + (int(lag) if lag is not None else int(events_len))
            pendings[name] = pendings.get(name, 0) + int(group["pending"])
    for name in lags:
        out[f"lag:{name}"], out[f"pending:{name}"] = lags[name], pendings[name]
    beats = await redis.hgetall(keys.workers)
    live = live_group_readers(beats, heartbeat_interval_s=broker.settings.heartbeat_interval_s)
    CLUSTER.values = {"tokiwa_stream_length": {"events": out["events"], "dead": out["dead"]},
                      "tokiwa_group_lag": lags, "tokiwa_pending_entries": pendings,
                      "tokiwa_group_live_workers": {name: live.get(name, 0) for name in lags},
                      "tokiwa_delayed_events": {keys.namespace: out["delayed"]}}
    return out


def live_group_readers(entries: Mapping[Any, bytes], *, heartbeat_interval_s: float,
                       now: float | None = None) -> dict[str, int]:
    """group -> how many workers with a fresh heartbeat read it (their heartbeat's ``groups``)."""
    counts: dict[str, int] = {}
    beats = worker_beats(entries, now=time.time() if now is None else now,
                         stale_after_s=STALE_HEARTBEATS * heartbeat_interval_s)
    for beat in beats:
        if beat.stale:
            continue
        for group in beat.fields().get("groups") or []:
            counts[str(group)] = counts.get(str(group), 0) + 1
    return counts


# -- runs and nodes --------------------------------------------------------------------------
class MetricsHooks(WorkflowHooks):
    """Runner hooks that count runs and time runs and nodes.

    ``runs_in_progress`` goes up at run start and down at run completion. Durations are
    observed once per run and once per node when the run settles (a node's duration includes
    its retries, as in pyoco), labelled by workflow **name** and node **name** (readable, and
    bounded by the code, unlike ids of runs)."""

    def __init__(self) -> None:
        self._running: dict[str, Any] = {}  # run id -> its in-progress gauge child, for the dec()
        # labelled children cached per workflow / node: ``labels()`` takes a lock and builds a
        # tuple on every call, which doubled the cost of the hooks on a tiny run.
        self._children: dict[tuple[Any, ...], Any] = {}

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def on_run_start(self, workflow: Any, run_id: str) -> None:
        gauge = self._child(RUNS_IN_PROGRESS, getattr(workflow, "name", None) or str(workflow))
        self._running[run_id] = gauge
        gauge.inc()

    def on_run_complete(self, result: Any) -> None:
        gauge = self._running.pop(result.run_id, None)
        if gauge is not None:
            gauge.dec()
        workflow = result.workflow_name or "unknown"
        self._child(RUNS, workflow, result.status).inc()
        if result.duration_ms is not None:
            self._child(RUN_DURATION, workflow).observe(result.duration_ms / 1000.0)
        for node in result.nodes.values():
            if node.duration_ms is not None:
                self._child(NODE_DURATION, workflow, node.name).observe(node.duration_ms / 1000.0)
