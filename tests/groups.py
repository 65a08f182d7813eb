"""Consumer groups as tests see them: every route has its own group (``workers:<route>``) on
every partition's stream, so "how much is pending" is summed over groups and partitions. The
number of partitions is the one the namespace recorded in Redis (``{ns}:layout``; 1 if none)."""

from __future__ import annotations

import redis

from orchestrator.keys import Keys

PREFIX = "workers"


def group(route: str, prefix: str = PREFIX) -> str:
    """The consumer group of a route such as ``sub:tests.faults.apps.record`` or ``wf:order-flow``."""
    return f"{prefix}:{route}"


def streams(client: redis.Redis, namespace: str) -> list[str]:
    """The events stream of every partition of the namespace."""
    raw = client.hget(Keys(namespace).layout, "partitions")
    return [p.events for p in Keys(namespace).partitions(int(raw) if raw else 1)]


def _rows(client: redis.Redis, stream: str) -> dict[str, dict]:
    try:
        rows = client.xinfo_groups(stream)
    except redis.ResponseError:
        return {}
    return {(r["name"].decode() if isinstance(r["name"], bytes) else r["name"]): r for r in rows}


def groups(client: redis.Redis, namespace: str) -> dict[str, dict]:
    """name -> XINFO GROUPS row of the events stream (partition 0's stream; with partitions,
    ``pending`` and ``lag`` summed over all of them). Empty when there is no stream."""
    out: dict[str, dict] = {}
    for stream in streams(client, namespace):
        for name, row in _rows(client, stream).items():
            if name not in out:
                out[name] = dict(row)
                continue
            out[name]["pending"] = int(out[name]["pending"]) + int(row["pending"])
            out[name]["lag"] = int(out[name].get("lag") or 0) + int(row.get("lag") or 0)
    return out


def pending_total(client: redis.Redis, namespace: str) -> int:
    """Entries delivered but not acked, over every group."""
    return sum(int(r["pending"]) for r in groups(client, namespace).values())


def lag_total(client: redis.Redis, namespace: str) -> int:
    """Entries not yet delivered, over every group."""
    return sum(int(r.get("lag") or 0) for r in groups(client, namespace).values())


def ensure_group(client: redis.Redis, namespace: str, name: str) -> None:
    """Create ``name`` from the stream's start (tests that publish before a worker starts)."""
    try:
        client.xgroup_create(f"{{{namespace}:0}}:events", name, id="0", mkstream=True)
    except redis.ResponseError as exc:
        assert "BUSYGROUP" in str(exc)


def consumer_pending(client: redis.Redis, namespace: str, pid: int) -> int:
    """Entries pending for the worker process ``pid`` (its consumer name holds ``-{pid}-``),
    over every group and partition."""
    total = 0
    for stream in streams(client, namespace):
        for name in _rows(client, stream):
            for c in client.xpending(stream, name)["consumers"] or []:
                if f"-{pid}-" in c["name"].decode():
                    total += int(c["pending"])
    return total
