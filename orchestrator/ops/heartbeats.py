"""Worker heartbeats in ``{ns}:workers`` (worker id -> msgpack map): how they are read.

Written by :class:`orchestrator.cli.runtime.Heartbeat`; read by the runtime (pruning),
``Orchestrator.workers()``, the inspect CLI / HTTP API and ``tokiwa-worker ps --cluster``.
"""

from __future__ import annotations

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
