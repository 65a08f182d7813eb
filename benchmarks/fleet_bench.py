"""Fan-out benchmarks: what one consumer group per registration costs.

Every registration (a subscriber ``sub:<name>``, a registered workflow ``wf:<name>``) reads the
events stream through its own group (docs/delivery.md), so N registrations on one event type
read, decode, dispatch and ack every entry N times. For N in 1, 3 and 10, in-process
(``Orchestrator(mode="all")``, ``max_concurrent_events=64`` like the broker suite's worker):

* ``subscribers``: N subscribers (distinct ``name=``) on ``bench``, no-op async handlers that
  count the event ids they see; E events published with ``publish_many`` (500 per call)
  before consuming, then ``app.drain()`` timed until every group is drained.
* ``workflows``: the same with N registered one-node workflows triggered by ``bench`` (each
  run recorded in the Redis run store, as a worker does), smaller E.

events/s = E / seconds; calls/s = E * N / seconds (handler calls, or workflow runs).
``slowdown`` = events/s at N=1 / events/s at N (N means the per-group work is all there is).
Every handler must see every event exactly once (and every workflow run be recorded
``succeeded`` once), or the suite raises. tokiwa's warnings during a case are counted
(``warnings``, with the first of each kind), not printed per event: a run that failed on a
transient Redis error is redone, so it costs time but is not a failure.

``python -m benchmarks.fleet_bench`` runs it alone on a redis-server it starts and writes
``benchmarks/results/fleet-<utc time>.json``; ``make bench`` runs it with the others.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import platform
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from orchestrator import Event, Node, Orchestrator, Workflow
from orchestrator.broker.embedded import EmbeddedRedis

RESULTS = Path(__file__).resolve().parent / "results"
CONCURRENCY = 64
FANOUT = (1, 3, 10)
# events per case: a few seconds each on the 2-core box
SUB_EVENTS = {1: 60_000, 3: 30_000, 10: 10_000}
WF_EVENTS = {1: 8_000, 3: 4_000, 10: 1_000}
PAYLOAD = {"data": "x" * 120}  # ~200-byte entries, as in the broker suite


def _counting(counter: Counter[str]) -> Callable[[Event], Awaitable[None]]:
    # one parameter: a two-parameter handler is given the DispatchContext as well
    async def handler(event: Event) -> None:
        counter[event.id] += 1
    return handler


def _counting_node(counter: Counter[str]) -> Callable[[Any], Awaitable[None]]:
    async def node(ctx: Any) -> None:
        counter[ctx.event.id] += 1
    return node


def _subscribers(app: Orchestrator, n: int) -> list[Counter[str]]:
    seen: list[Counter[str]] = []
    for i in range(n):
        counter: Counter[str] = Counter()
        app.dispatcher.subscribe("bench", _counting(counter), name=f"bench-sub-{i}")
        seen.append(counter)
    return seen


def _workflows(app: Orchestrator, n: int) -> list[Counter[str]]:
    seen: list[Counter[str]] = []
    for i in range(n):
        counter: Counter[str] = Counter()
        app.register_workflow(Workflow(name=f"w{i}", nodes=[Node(name="n", handler=_counting_node(counter))]),
                              trigger={"type": "event", "event_type": "bench"})
        seen.append(counter)
    return seen


class _Warnings(logging.Handler):
    """Counts tokiwa's warnings during a case (and keeps the first of each kind) instead of
    printing one line per event: a run that failed on a transient error is redone, so the
    counts are reported, not fatal."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.kinds: Counter[str] = Counter()
        self.first: dict[str, str] = {}

    def emit(self, record: logging.LogRecord) -> None:
        kind = str(record.msg).split("%")[0].strip()
        self.kinds[kind] += 1
        self.first.setdefault(kind, record.getMessage())


async def _run_statuses(app: Orchestrator) -> Counter[str]:
    """Status -> count of the runs in the Redis run store."""
    run_ids = await app.redis.zrange(app.keys.runs, 0, -1)
    async with app.redis.pipeline(transaction=False) as pipe:
        for rid in run_ids:
            pipe.hget(app.keys.run(rid.decode()), "status")
        return Counter((s or b"missing").decode() for s in await pipe.execute())


async def _clear(app: Orchestrator, namespace: str) -> None:
    keys = [k async for k in app.redis.scan_iter(match=f"{namespace}:*", count=1000)]
    for start in range(0, len(keys), 500):
        await app.redis.delete(*keys[start:start + 500])


async def fanout(url: str, kind: str, n: int, events: int) -> dict[str, Any]:
    """N registrations of ``kind`` ('subscribers' or 'workflows') on ``bench``; E events."""
    namespace = f"fleet{uuid.uuid4().hex[:8]}"
    app = Orchestrator(url, namespace=namespace, mode="all", max_concurrent_events=CONCURRENCY)
    register: Callable[[Orchestrator, int], list[Counter[str]]] = \
        _subscribers if kind == "subscribers" else _workflows
    seen = register(app, n)
    warnings = _Warnings()
    logging.getLogger("tokiwa").addHandler(warnings)
    try:
        await app.connect()  # declares the N groups (from 0) before anything is published
        if len(app.route_groups()) != n:
            raise RuntimeError(f"expected {n} routes, the app has {app.route_groups()}")
        batch = [Event("bench", PAYLOAD) for _ in range(events)]
        for start in range(0, events, 500):
            await app.publish_many(batch[start:start + 500])
        t0 = time.perf_counter()
        await app.drain(timeout=600)
        seconds = time.perf_counter() - t0
        states = await app.group_states()
        runs = await _run_statuses(app)
    finally:
        logging.getLogger("tokiwa").removeHandler(warnings)
        await _clear(app, namespace)
        await app.close()
    _check(kind, n, {e.id for e in batch}, seen, states)
    expected = {"succeeded": events * n} if kind == "workflows" else {}
    if dict(runs) != expected:
        raise RuntimeError(f"{kind} N={n}: run records {dict(runs)}, expected {expected}")
    return {"registrations": n, "events": events, "seconds": round(seconds, 3),
            "events_per_s": events / seconds, "calls_per_s": events * n / seconds,
            "warnings": sum(warnings.kinds.values()),
            **({"first_warnings": list(warnings.first.values())} if warnings.first else {})}


def _check(kind: str, n: int, published: set[str], seen: list[Counter[str]], states: dict) -> None:
    for i, counter in enumerate(seen):
        missing = len(published - counter.keys())
        extra = len(counter.keys() - published)
        twice = sum(1 for c in counter.values() if c != 1)
        if missing or extra or twice:
            raise RuntimeError(f"{kind} N={n}: registration {i} missed {missing}, saw {extra} unknown and "
                               f"{twice} more than once (of {len(published)} events)")
    busy = {g: s for g, s in states.items() if s["pending"] or s["lag"]}
    if len(states) != n or busy:
        raise RuntimeError(f"{kind} N={n}: groups not drained after drain(): {states}")


def _summary(cases: dict[str, dict[str, Any]]) -> dict[str, Any]:
    base = cases["n1"]["events_per_s"]
    for case in cases.values():
        case["slowdown"] = base / case["events_per_s"]
    return cases


async def run(url: str) -> dict[str, Any]:
    out: dict[str, Any] = {"concurrency": CONCURRENCY}
    for kind, sizes in (("subscribers", SUB_EVENTS), ("workflows", WF_EVENTS)):
        out[kind] = _summary({f"n{n}": await fanout(url, kind, n, sizes[n]) for n in FANOUT})
    return out


def table(result: dict[str, Any]) -> str:
    lines = [f"{'kind':11} {'N':>3} {'events':>7} {'seconds':>8} {'events/s':>10} {'calls/s':>10} {'slowdown':>9} {'warnings':>8}"]
    for kind in ("subscribers", "workflows"):
        for case in result[kind].values():
            lines.append(f"{kind:11} {case['registrations']:>3} {case['events']:>7,} {case['seconds']:>8.2f} "
                         f"{case['events_per_s']:>10,.0f} {case['calls_per_s']:>10,.0f} {case['slowdown']:>8.2f}x"
                         f" {case['warnings']:>8}")
            for text in case.get("first_warnings", []):
                lines.append(f"    warning: {text}")
    lines.append(f"concurrency {result['concurrency']} per route; slowdown = events/s at N=1 / at N")
    return "\n".join(lines)


def main() -> None:
    report: dict[str, Any] = {"machine": {"python": platform.python_version(), "cpu_count": os.cpu_count(),
                                          "platform": platform.platform()}, "started": time.time()}
    with tempfile.TemporaryDirectory() as tmp, EmbeddedRedis(Path(tmp) / "redis") as server:
        report["fleet"] = asyncio.run(run(server.url))
    print(table(report["fleet"]))
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"fleet-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written to {path}")


if __name__ == "__main__":
    main()
