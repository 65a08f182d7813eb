"""Worker heartbeats in ``{ns}:workers`` (worker id -> msgpack map): how they are read.

Written by :class:`orchestrator.cli.runtime.Heartbeat`; read, through :func:`worker_beats`, by
the runtime (pruning), ``Orchestrator.workers()``, the inspect CLI / HTTP API and
``tokiwa-worker ps --cluster``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import msgpack

STALE_HEARTBEATS = 3  # a heartbeat older than this many intervals is stale (and pruned)


def decode_heartbeat(blob: bytes) -> dict[str, Any] | None:
    """The heartbeat map, or None when the value is not a msgpack map (foreign or corrupt)."""
    try:
        beat = msgpack.unpackb(blob, raw=False)
    except Exception:  # msgpack raises several unrelated types on garbage
        return None
    return beat if isinstance(beat, dict) else None


def heartbeat_age(beat: dict[str, Any], now: float) -> float | None:
    """Seconds since the heartbeat's ``last_seen``, or None when it has none."""
    seen = beat.get("last_seen")
    return now - seen if isinstance(seen, (int, float)) else None


@dataclass(frozen=True)
class WorkerBeat:
    """One entry of ``{ns}:workers``: its hash field as stored (to HDEL it), the worker id as
    text, the heartbeat (None when undecodable), its age, and whether it is stale."""

    key: bytes | str
    id: str
    beat: dict[str, Any] | None
    age_s: float | None
    stale: bool

    def fields(self) -> dict[str, Any]:
        """The heartbeat, or ``{"error": "undecodable heartbeat"}`` in its place."""
        return self.beat or {"error": "undecodable heartbeat"}


def worker_beats(entries: Mapping[Any, bytes], *, now: float, stale_after_s: float) -> list[WorkerBeat]:
    """The ``{ns}:workers`` hash (an HGETALL reply) decoded, sorted by worker id. A heartbeat
    is stale when it is undecodable, has no ``last_seen``, or is older than ``stale_after_s``."""
    rows = []
    for key, blob in entries.items():
        worker_id = key.decode("utf-8", "replace") if isinstance(key, (bytes, bytearray)) else str(key)
        beat = decode_heartbeat(blob)
        age = None if beat is None else heartbeat_age(beat, now)
        rows.append(WorkerBeat(key, worker_id, beat, age, age is None or age > stale_after_s))
    return sorted(rows, key=lambda row: row.id)
