"""Which partition of the event streams an event goes to.

An event's partition comes from its partition key: the publisher's explicit ``key=``, else the
conversation id of the (first) chatflow it triggers, else its event id. The key is hashed with
CRC-32, which every producer, whatever its version or language, computes the same, modulo
``Settings.partitions``. All events of one conversation therefore share a partition, where its
order lists live; events without a key spread evenly.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from orchestrator import faults
from orchestrator.errors import ConfigError
from orchestrator.events import Event
from orchestrator.keys import Keys


def partition_of(key: str, partitions: int) -> int:
    """The partition (0 .. ``partitions`` - 1) of a partition key."""
    if partitions <= 1:
        return 0
    return zlib.crc32(key.encode("utf-8", "surrogatepass")) % partitions


def partition_key(event: Event, conversation_ids: Sequence[str] = ()) -> str:
    """The partition key of ``event``: its explicit key, else the first conversation id it
    carries to a chatflow, else its id."""
    return event.key or (conversation_ids[0] if conversation_ids else event.id)


@dataclass(frozen=True, slots=True)
class Placement:
    """Where a publish writes: the partition, and the conversation order lists (keys in that
    partition) the stream id is appended to."""

    partition: int = 0
    order_lists: list[str] = field(default_factory=list)


async def check_layout(redis: Any, keys: Keys, partitions: int) -> int:
    """Record ``partitions`` as the namespace's layout when none is recorded (``{ns}:layout``),
    else check that it is the recorded one: ConfigError naming both numbers when not (every
    producer and worker of a namespace must agree, or events land where nobody reads). On a
    Redis that refuses the write (full, read-only for a moment) it only reads."""
    try:
        await redis.hsetnx(keys.layout, "partitions", partitions)
    except Exception as exc:
        if not faults.is_transient(exc):
            raise
    raw = await redis.hget(keys.layout, "partitions")
    recorded = int(raw) if raw is not None else partitions
    if recorded != partitions:
        raise ConfigError(
            f"namespace {keys.namespace!r} has {recorded} stream partition(s) in Redis ({keys.layout}), "
            f"this process is set to {partitions}: set partitions = {recorded} (TOKIWA_PARTITIONS), "
            "or change the namespace's partitions as docs/scaling.md describes")
    return recorded


async def recorded_partitions(redis: Any, keys: Keys) -> int:
    """The namespace's number of partitions as recorded in Redis (1 when nothing is)."""
    raw = await redis.hget(keys.layout, "partitions")
    try:
        return max(1, int(raw)) if raw is not None else 1
    except ValueError:
        return 1
