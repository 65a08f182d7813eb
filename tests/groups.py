"""Consumer groups as tests see them: every route has its own group (``workers:<route>``), so
"how much is pending" is summed over the stream's groups."""

from __future__ import annotations

import redis

PREFIX = "workers"


def group(route: str, prefix: str = PREFIX) -> str:
    """The consumer group of a route such as ``sub:tests.faults.apps.record`` or ``wf:order-flow``."""
    return f"{prefix}:{route}"


def groups(client: redis.Redis, namespace: str) -> dict[str, dict]:
    """name -> XINFO GROUPS row of the events stream (empty when there is no stream)."""
    try:
        rows = client.xinfo_groups(f"{{{namespace}:0}}:events")
    except redis.ResponseError:
        return {}
    return {(r["name"].decode() if isinstance(r["name"], bytes) else r["name"]): r for r in rows}


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
    over every group."""
    total = 0
    for name in groups(client, namespace):
        for c in client.xpending(f"{{{namespace}:0}}:events", name)["consumers"] or []:
            if f"-{pid}-" in c["name"].decode():
                total += int(c["pending"])
    return total
