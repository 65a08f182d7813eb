"""What the dashboard shows, as JSON-ready dicts: runs (with the DAG of one run laid out by
dependency depth), workers, streams and consumer groups, dead letters, cron jobs and leaders,
conversation locks, relays and their topics, delayed events.

Everything is read through an :class:`~orchestrator.ops.inspector.Inspector` (the same data
as ``tokiwa-producer inspect``); the two things Redis does not hold come from the app when
there is one: a workflow's edges (``depends_on``) and the cron jobs' expressions.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

import msgpack

from orchestrator.ops.inspector import Inspector
from orchestrator.workflow.result import RUN_STATUSES

RUN_LOG_TAIL = 500  # log lines a run page shows (the store keeps at most 1000)
# a relay heartbeats every 2 s by default and is pruned by its peers after 3 intervals
RELAY_STALE_S = 6.0
TERMINAL_NODE = ("succeeded", "failed", "cancelled", "skipped")


def _s(value: Any) -> Any:
    return value.decode("utf-8", "replace") if isinstance(value, (bytes, bytearray)) else value


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


# -- the DAG of one run -------------------------------------------------------------------------
def _depths(order: list[str], deps: Mapping[str, list[str]]) -> dict[str, int]:
    """Longest chain of dependencies above each node (0 = no dependency); ``order`` is the
    nodes' order, ``deps`` name → names it depends on (unknown names ignored, cycles cut)."""
    depth: dict[str, int] = {}
    visiting: set[str] = set()

    def walk(name: str) -> int:
        if name in depth:
            return depth[name]
        if name in visiting:  # a cycle cannot come from a validated workflow; cut it
            return 0
        visiting.add(name)
        above = [walk(d) + 1 for d in deps.get(name, []) if d in deps]
        visiting.discard(name)
        depth[name] = max(above, default=0)
        return depth[name]

    for name in order:
        walk(name)
    return depth


def _timeline_depths(nodes: Mapping[str, Mapping[str, Any]]) -> dict[str, int]:
    """Depths guessed from timing when the edges are unknown: a node sits one column right of
    the deepest node that had finished when it started (a dependency always has). Nodes that
    never started go in the last column."""
    started = sorted((n for n in nodes if _num(nodes[n].get("started_at")) is not None),
                     key=lambda n: (nodes[n]["started_at"], n))
    depth: dict[str, int] = {}
    for name in started:
        t0 = nodes[name]["started_at"]
        before = [depth[o] + 1 for o in depth
                  if (_num(nodes[o].get("finished_at")) or float("inf")) <= t0]
        depth[name] = max(before, default=0)
    last = max(depth.values(), default=-1) + 1
    for name in nodes:
        depth.setdefault(name, last)
    return depth


def _workflow_of(app: Any, record: Mapping[str, Any]) -> Any:
    """The app's registered workflow of ``record`` (by id, then by name), or None."""
    registry = getattr(app, "workflows", None)
    for reg in getattr(registry, "registrations", None) or []:
        wf = getattr(reg, "workflow", None)
        if wf is not None and (wf.id == record.get("workflow_id") or wf.name == record.get("workflow_name")):
            return wf
    return None


def _workflow_edges(workflow: Any) -> dict[str, list[str]]:
    graph = workflow.validate()
    return {node.name: [graph.nodes[d].name for d in graph.deps[i]] for i, node in enumerate(graph.nodes)}


def run_graph(record: Mapping[str, Any], app: Any = None) -> dict[str, Any]:
    """The run's DAG: ``nodes`` (name, status, attempts, duration, error, traceback,
    depends_on, depth, row) and ``edges_from``: ``record`` (the record has ``depends_on`` per node), ``workflow``
    (the app's registered workflow of that name), or ``timeline`` (no edges known: columns
    follow the start order)."""
    recorded: dict[str, dict[str, Any]] = {
        name: n for name, n in (record.get("nodes") or {}).items() if isinstance(n, dict)}
    deps: dict[str, list[str]] | None = None
    source = "timeline"
    if recorded and all(isinstance(n.get("depends_on"), list) for n in recorded.values()):
        deps, source = {name: [str(d) for d in n["depends_on"]] for name, n in recorded.items()}, "record"
    else:
        workflow = _workflow_of(app, record) if app is not None else None
        if workflow is not None:
            edges = _workflow_edges(workflow)
            if set(recorded) <= set(edges):
                deps, source = edges, "workflow"
    if deps is not None:
        # ids in depends_on (a record's or a workflow's) are shown by name
        by_id = {n.get("node_id"): name for name, n in recorded.items()}
        deps = {name: [by_id.get(d, d) for d in ds] for name, ds in deps.items()}
        order = list(deps)
        depth = _depths(order, deps)
    else:
        order = list(recorded)
        depth = _timeline_depths(recorded)
    errors = record.get("errors") or {}
    rows: dict[int, int] = {}
    out = []
    for name in order:
        n = recorded.get(name, {})
        col = depth.get(name, 0)
        rows[col] = rows.get(col, -1) + 1
        out.append({
            "name": name, "node_id": n.get("node_id"), "status": n.get("status") or "pending",
            "attempts": n.get("attempts") or 0, "duration_ms": n.get("duration_ms"),
            "started_at": n.get("started_at"), "finished_at": n.get("finished_at"),
            "error": n.get("error") or errors.get(n.get("node_id") or ""), "traceback": n.get("traceback"),
            "depends_on": list(deps.get(name, [])) if deps is not None else [],
            "depth": col, "row": rows[col],
        })
    return {"nodes": out, "edges_from": source, "columns": max(depth.values(), default=-1) + 1,
            "rows": max(rows.values(), default=-1) + 1}


# -- the other pages ----------------------------------------------------------------------------
def relay_rows(entries: Mapping[Any, bytes], now: float) -> list[dict[str, Any]]:
    """``{ns}:relays`` (relay id → msgpack heartbeat) decoded: host, pid, tasks, topics, age."""
    rows = []
    for key, blob in entries.items():
        try:
            beat = msgpack.unpackb(blob, raw=False)
        except Exception:  # msgpack raises several unrelated types on garbage
            beat = None
        relay_id = _s(key)
        if not isinstance(beat, dict):
            rows.append({"relay_id": relay_id, "error": "undecodable heartbeat", "topics": [], "tasks": [],
                         "stale": True, "age_s": None})
            continue
        at = _num(beat.get("at"))
        age = None if at is None else round(now - at, 1)
        tasks = [t.get("name") for t in beat.get("tasks") or [] if isinstance(t, dict)]
        rows.append({"relay_id": relay_id, "host": beat.get("host"), "pid": beat.get("pid"), "tasks": tasks,
                     "topics": [str(t) for t in beat.get("topics") or []],
                     "lossless": [str(t) for t in beat.get("lossless") or []],
                     "age_s": age, "stale": age is None or age > RELAY_STALE_S})
    return sorted(rows, key=lambda r: str(r["relay_id"]))


def _iso(dt: datetime) -> str:
    return dt.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


class DashboardData:
    """The dashboard's JSON, read through ``inspector()`` (called per request: the HTTP API
    builds one on the app's current connection). ``app`` (optional) supplies workflow edges
    and cron jobs; without it the run graph follows the timeline and cron shows only the jobs
    that have fired (Redis keeps their last slot, not their expression)."""

    def __init__(self, inspector: Callable[[], Inspector], app: Any = None, *,
                 clock: Callable[[], float] = time.time) -> None:
        self._inspector = inspector
        self.app = app
        self._clock = clock

    @property
    def inspector(self) -> Inspector:
        return self._inspector()

    # -- runs -------------------------------------------------------------------------------
    async def workflow_names(self, seen: Iterable[Any] = ()) -> list[str]:
        """Workflow names for the filter: from the routes' adverts, the app, and ``seen``."""
        from orchestrator.runs.routes import decode_advert

        i = self.inspector
        names = {str(n) for n in seen if n}
        for blob in (await i.redis.hgetall(i.keys.routes)).values():
            advert = decode_advert(blob) or {}
            if advert.get("kind") in ("workflow", "chatflow") and advert.get("name"):
                names.add(str(advert["name"]))
        registry = getattr(self.app, "workflows", None)
        names |= {r.workflow.name for r in getattr(registry, "registrations", None) or []}
        return sorted(names)

    async def runs(self, *, status: str | None, workflow: str | None, limit: int) -> dict[str, Any]:
        rows = await self.inspector.runs(status=status, workflow=workflow, limit=limit)
        return {"runs": rows, "workflows": await self.workflow_names(r.get("workflow") for r in rows),
                "statuses": [str(s) for s in RUN_STATUSES]}

    async def run(self, run_id: str) -> dict[str, Any]:
        record = await self.inspector.run(run_id, tail=RUN_LOG_TAIL)
        record["graph"] = run_graph(record, self.app)
        return record

    # -- workers and streams ----------------------------------------------------------------
    async def workers(self) -> list[dict[str, Any]]:
        return await self.inspector.workers()

    async def streams(self) -> dict[str, Any]:
        """The events and dead streams, with each events group's route, live readers and
        ``waiting`` flag (work that no live worker reads) merged in."""
        i = self.inspector
        streams = await i.streams()
        groups = {g["group"]: g for g in await i.groups()}
        for stream in streams:
            if not stream["stream"].endswith(":events"):
                continue
            for g in stream["groups"]:
                extra = groups.get(g["name"], {})
                g.update(kind=extra.get("kind"), route=extra.get("name"), live_workers=extra.get("live_workers", 0),
                         waiting=bool(extra.get("waiting")))
        return {"streams": streams, "waiting": sorted(n for n, g in groups.items() if g.get("waiting"))}

    # -- cron, leaders, locks, relays, delayed ----------------------------------------------
    async def _cron_last(self) -> dict[str, str | None]:
        i = self.inspector
        prefix = i.keys.cron_job("")  # "{ns:leader:cron}:job:"
        names: dict[str, str | None] = {}
        async for raw in i.redis.scan_iter(match=i.keys.cron_job("*"), count=500):
            key = _s(raw)
            if key.startswith(prefix):
                names[key[len(prefix):]] = None
        if names:
            async with i.redis.pipeline(transaction=False) as pipe:
                for n in names:
                    pipe.hget(i.keys.cron_job(n), "slot")
                values = await pipe.execute()
            names = {n: _s(v) for n, v in zip(names, values, strict=True)}
        return names

    async def cron(self) -> dict[str, Any]:
        """Cron jobs (the app's, plus jobs that fired but the app does not have) with their next
        fire and last fired slot, and every leader lease (the cron leader first)."""
        from orchestrator.cron.expr import Cron

        last = await self._cron_last()
        leaders = await self.inspector.leaders()
        cron_leader = next((r for r in leaders if r["role"] == "cron"), None)
        registry = getattr(self.app, "cron", None)
        specs = list(getattr(registry, "specs", None) or [])
        tz = getattr(registry, "tz", None)
        now = datetime.now(UTC)
        jobs = []
        for spec in specs:
            try:
                next_fire: str | None = _iso(Cron(spec.expr, tz).next_after(now))
            except Exception as exc:  # an expression that validated at registration; be safe
                next_fire = f"error: {exc}"
            jobs.append({"name": spec.name, "kind": spec.kind, "expr": spec.expr, "tz": str(tz or "UTC"),
                         "next_fire": next_fire, "last_fired": last.pop(spec.name, None), "known": True})
        for name, slot in sorted(last.items()):
            jobs.append({"name": name, "kind": None, "expr": None, "tz": None, "next_fire": None,
                         "last_fired": slot, "known": False})
        return {"jobs": jobs, "leader": cron_leader, "leaders": leaders, "app": self.app is not None and bool(specs)}

    async def locks(self) -> list[dict[str, Any]]:
        return await self.inspector.locks()

    async def relays(self) -> list[dict[str, Any]]:
        i = self.inspector
        return relay_rows(await i.redis.hgetall(i.keys.relays), self._clock())

    async def delayed(self, *, limit: int) -> list[dict[str, Any]]:
        return await self.inspector.delayed(limit=limit)

    async def summary(self) -> dict[str, Any]:
        """Counts for the navigation bar: live workers, running runs, dead letters, groups
        waiting with no live worker, delayed events, conversation locks."""
        i = self.inspector
        dead = delayed = 0
        for part in await i.partitions():
            async with i.redis.pipeline(transaction=False) as pipe:
                pipe.xlen(part.dead)
                pipe.zcard(part.delayed)
                n_dead, n_delayed = await pipe.execute()
            dead, delayed = dead + int(n_dead), delayed + int(n_delayed)
        workers = await i.workers()
        groups = await i.groups()
        running = await i.runs(status="running", limit=200)
        return {"workers": sum(1 for w in workers if not w.get("stale")), "workers_total": len(workers),
                "running": len(running), "dead": int(dead), "delayed": int(delayed),
                "waiting_groups": sum(1 for g in groups if g.get("waiting")), "now": self._clock()}
