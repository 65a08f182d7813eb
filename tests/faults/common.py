"""Helpers of the fault tests: publishing numbered jobs straight into a stream, reading the
dead letters and the group's state, starting worker processes of the fault app."""

from __future__ import annotations

import subprocess
from pathlib import Path

import redis

from orchestrator.events import Event, encode_fields
from tests.groups import ensure_group as create_group
from tests.groups import group, pending_total
from tests.integration.procs import start_worker, wait_until, worker_env

FAULT_APP = "tests.faults.apps:app"


#: the fault app's one route: its subscriber ``record``; and the counting app's
FAULT_GROUP = group("sub:tests.faults.apps.record")
COUNTING_GROUP = group("sub:tests.integration.apps.counting.record")


def ensure_group(client: redis.Redis, namespace: str, name: str = FAULT_GROUP) -> None:
    create_group(client, namespace, name)


def publish_jobs(client: redis.Redis, namespace: str, count: int, start: int = 0, pad: int = 0,
                 group: bool = True, route_group: str = FAULT_GROUP) -> list[str]:
    """XADD jobs ``start .. start+count-1`` (payload ``{"i": n}``, plus ``pad`` bytes), first
    creating ``route_group`` (the fault app's) unless ``group`` is False; returns their
    stream ids."""
    if group:
        ensure_group(client, namespace, route_group)
    ids: list[str] = []
    for base in range(start, start + count, 1000):
        pipe = client.pipeline(transaction=False)
        for i in range(base, min(base + 1000, start + count)):
            payload = {"i": i, "pad": "x" * pad} if pad else {"i": i}
            pipe.xadd(f"{{{namespace}:0}}:events", encode_fields(Event("job", payload)))
        ids += [x.decode() for x in pipe.execute()]
    return ids


def dead_entries(client: redis.Redis, namespace: str) -> list[dict[bytes, bytes]]:
    return [fields for _, fields in client.xrange(f"{{{namespace}:0}}:dead")]


def pending(client: redis.Redis, namespace: str) -> int:
    return pending_total(client, namespace)


def start_fault_worker(base_env: dict[str, str], url: str, namespace: str, log: Path, out: Path,
                       **settings: object) -> subprocess.Popen:
    env = worker_env(base_env, url, namespace, TEST_OUT=out, **settings)
    return start_worker(env, log, app=FAULT_APP)


def wait_for(predicate, timeout: float, what: str, interval: float = 0.05) -> float:
    """:func:`tests.integration.procs.wait_until` with the description as third argument."""
    return wait_until(predicate, timeout, interval, message=what)
