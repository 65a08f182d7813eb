"""The Redis-streams broker: publish, consume through a consumer group, ack, renew, reclaim,
dead-letter and trim. One stream (``{ns}:events``), one group (``workers`` by default).

Every "check ownership, then act" is one Lua script (see :mod:`orchestrator.broker.scripts`), so a
worker that lost an entry while frozen cannot ack, renew or dead-letter it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import redis.asyncio as aioredis
from redis.exceptions import ResponseError
from redis.typing import EncodableT, FieldT

from orchestrator.broker import durable, scripts, signing
from orchestrator.broker.batch import Batch
from orchestrator.broker.connection import is_cluster
from orchestrator.config import Settings
from orchestrator.errors import BrokerError, InvalidArgumentError
from orchestrator.events import Event, encode_fields
from orchestrator.faults import Fault, classify, is_group_exists, is_missing_key
from orchestrator.keys import Keys, PartitionKeys

log = logging.getLogger("tokiwa.broker")

# most entries one TRIM_SAFE call may drop (bounds the script's run time)
TRIM_MAX_DROP = 50_000


@dataclass(slots=True)
class Delivery:
    """One stream entry handed to this consumer."""

    stream_id: str
    fields: dict[bytes, bytes]
    deliveries: int = 1
    claimed_at: float = field(default_factory=time.monotonic)


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _id_key(stream_id: str) -> tuple[int, int]:
    ms, _, seq = stream_id.partition("-")
    return int(ms), int(seq or 0)


def id_bounds(stream_ids: Sequence[str]) -> tuple[str, str]:
    """Smallest and largest of some stream ids (numeric order, not string order), so that
    XPENDING walks only the part of this consumer's PEL that the batch spans."""
    keyed = sorted(map(_id_key, stream_ids))
    lo, hi = keyed[0], keyed[-1]
    return f"{lo[0]}-{lo[1]}", f"{hi[0]}-{hi[1]}"


def wire_fields(event: Event, settings: Settings) -> dict[str, bytes | str]:
    """The stream fields a producer writes for ``event``: size-checked, and signed when
    signing keys are set (:mod:`orchestrator.broker.signing`)."""
    return signing.sign(checked_fields(event, settings.max_event_bytes), settings)


def checked_fields(event: Event, max_bytes: int) -> dict[str, bytes | str]:
    """The stream fields of ``event``; InvalidArgumentError if its body exceeds ``max_bytes``."""
    fields = encode_fields(event)
    if len(fields["body"]) > max_bytes:
        raise InvalidArgumentError(
            f"event {event.type!r} is {len(fields['body'])} bytes encoded, over max_event_bytes={max_bytes}"
        )
    return fields


def publish_once_call(part: PartitionKeys, event_id: str, fields: Mapping[str, bytes | str], order_lists: Sequence[str],
                      dedup_ms: int) -> tuple[list[str], list[int | bytes | str]] | None:
    """KEYS and ARGV of :data:`scripts.PUBLISH_ONCE` for one entry, or None when a plain XADD
    does the same (``dedup_ms`` 0 and no conversation order lists)."""
    if not dedup_ms and not order_lists:
        return None
    script_keys = [part.events, part.published(event_id), *order_lists]
    return script_keys, [dedup_ms, *(x for kv in fields.items() for x in kv)]


# ids per ACK_OWNED / RENEW_OWNED call (bounds Lua's unpack and the script's run time)
OWNED_BATCH = 1000
# a dead entry keeps at most this many of the original fields, each value cut to the byte
# bound below; Lua's unpack (used to XADD them) overflows near 8,000 arguments
DEAD_MAX_FIELDS = 64
DEAD_SAMPLE_BYTES = 1024


def entry_summary(fields: Mapping[bytes, bytes]) -> dict[bytes, str]:
    """How many fields an entry has and how many bytes they hold (for dead letters)."""
    size = sum(len(k) + len(v) for k, v in fields.items())
    return {b"original_fields": str(len(fields)), b"original_bytes": str(size)}


def dead_fields(fields: Mapping[bytes, bytes], extra: Mapping[bytes, str], max_bytes: int) -> list[bytes | str]:
    """The flat field/value list of a dead entry: the original fields when there are at most
    :data:`DEAD_MAX_FIELDS` of them and they fit ``max_bytes`` (a little over the envelope
    bound), else the first ones, each cut to :data:`DEAD_SAMPLE_BYTES`, and a summary. Then the
    dead-letter fields in ``extra``, which win over originals of the same name."""
    size = sum(len(k) + len(v) for k, v in fields.items())
    whole = len(fields) <= DEAD_MAX_FIELDS and size <= max_bytes + 4096
    out: list[bytes | str] = []
    for n, (name, value) in enumerate(fields.items()):
        if n >= DEAD_MAX_FIELDS:
            break
        if name in extra:
            continue
        if not whole:
            name, value = name[:DEAD_SAMPLE_BYTES], value[:DEAD_SAMPLE_BYTES]
        out += [name, value]
    if not whole:
        extra = {**extra, **entry_summary(fields), b"truncated": "1"}
    for key, text in extra.items():
        out += [key, text]
    return out


class StreamBroker:
    """Stream operations for one namespace, group, consumer name and partition (publishing
    goes to any partition: the caller's placement says which)."""

    def __init__(self, redis: aioredis.Redis, settings: Settings, consumer: str | None = None, *,
                 group: str | None = None, partition: int = 0) -> None:
        self.redis = redis
        self.settings = settings
        self.keys = Keys(settings.namespace)
        self.partition = partition
        self.part = self.keys.partition(partition)
        self.stream = self.part.events
        self.group = group or settings.group
        self.consumer = consumer or "producer"
        self._ack = redis.register_script(scripts.ACK_OWNED)
        self._renew = redis.register_script(scripts.RENEW_OWNED)
        self._reclaim = redis.register_script(scripts.RECLAIM)
        self._dead = redis.register_script(scripts.DEAD_LETTER)
        self._trim = redis.register_script(scripts.TRIM_SAFE)
        self._publish_once = redis.register_script(scripts.PUBLISH_ONCE)
        self._delete_idle = redis.register_script(scripts.DELETE_IDLE_CONSUMERS)
        self._reclaim_cursor = "0-0"
        self._cluster = is_cluster(redis)

    # -- group ----------------------------------------------------------------------------
    async def group_exists(self) -> bool:
        """Whether our group exists on the stream (a read: works on a full Redis)."""
        try:
            groups = await self.redis.xinfo_groups(self.stream)
        except ResponseError as exc:
            if is_missing_key(exc):
                return False
            raise
        return any(_s(g["name"]) == self.group for g in groups)

    async def ensure_group(self) -> bool:
        """Create the consumer group from the stream's start (id 0, MKSTREAM), so events
        published before any worker started are processed. Returns True if it was created.

        It looks first and writes only when the group is missing: XGROUP CREATE is refused by
        a full Redis (maxmemory, noeviction) even when the group exists, and a worker must
        start then. Only BUSYGROUP (created meanwhile) is benign; any other error is raised."""
        if await self.group_exists():
            return False
        try:
            await self.redis.xgroup_create(self.stream, self.group, id="0", mkstream=True)
            return True
        except ResponseError as exc:
            if is_group_exists(exc):
                return False
            if classify(exc) is not Fault.FATAL:
                raise  # OOM, READONLY ...: the caller's fault policy waits and retries
            raise BrokerError(f"cannot create group {self.group!r} on {self.stream}: {exc}") from exc

    # -- publish --------------------------------------------------------------------------
    async def publish(self, event: Event, *, order_lists: Sequence[str] = (), dedup_ms: int | None = None,
                      partition: int | None = None) -> str:
        """Add one event to the stream of ``partition`` (default: this broker's) once; returns
        its stream id. The id is also appended to each of the conversation ``order_lists``
        (keys in that partition) in the same atomic step.

        Publishing lands once per event id within ``publish_dedup_ms``: a publish that redis-py
        resends after a timeout (the first may have landed), or the same Event published again,
        returns the first stream id and adds nothing (:data:`scripts.PUBLISH_ONCE`)."""
        fields = wire_fields(event, self.settings)
        window = self.settings.publish_dedup_ms if dedup_ms is None else dedup_ms
        part = self.part if partition is None else self.keys.partition(partition)
        call = publish_once_call(part, event.id, fields, order_lists, window)
        if self.settings.publish_wait_replicas:  # durable: WAIT for replicas on the same connection
            stream_id = await durable.publish_and_wait(self.redis, self._publish_once, part.events, fields, call,
                                                       self.settings)
        elif call is None:
            stream_id = _s(await self.redis.xadd(part.events, cast("dict[FieldT, EncodableT]", fields)))
        else:
            stream_id = _s(await self._publish_once(keys=call[0], args=call[1]))
        event.stream_id = stream_id
        return stream_id

    async def publish_many(
        self, events: Iterable[Event], *, order_lists: Sequence[Sequence[str]] | None = None,
        partitions: Sequence[int] | None = None,
    ) -> list[str]:
        """Publish many events together (one pipelined round trip on one Redis, one per
        master on a cluster: :class:`~orchestrator.broker.batch.Batch`; no transaction), each
        once as in :meth:`publish` (a resent batch adds nothing twice), event ``i`` to
        ``partitions[i]`` (default: this broker's), in order per partition; returns their
        stream ids."""
        events = list(events)
        if not events:
            return []
        if self.settings.publish_wait_replicas:  # durable: each publish with its own WAIT
            return [await self.publish(event, order_lists=order_lists[i] if order_lists else (),
                                       partition=partitions[i] if partitions else None)
                    for i, event in enumerate(events)]
        dedup_ms = self.settings.publish_dedup_ms
        batch = Batch(self.redis)
        for i, event in enumerate(events):
            fields = wire_fields(event, self.settings)
            convs = order_lists[i] if order_lists else ()
            part = self.keys.partition(partitions[i]) if partitions else self.part
            call = publish_once_call(part, event.id, fields, convs, dedup_ms)
            if call is None:
                batch.command("xadd", part.events, cast("dict[FieldT, EncodableT]", fields))
            else:
                batch.script(self._publish_once, keys=call[0], args=call[1])
        ids = [_s(x) for x in await batch.execute()]
        for event, stream_id in zip(events, ids, strict=True):
            event.stream_id = stream_id
        return ids

    # -- consume --------------------------------------------------------------------------
    async def read(self, count: int, block_ms: int | None) -> list[Delivery]:
        """XREADGROUP up to ``count`` new entries (``>``), blocking up to ``block_ms``."""
        if count <= 0:
            return []
        reply: Any
        if self._cluster:
            # sent straight to the stream's master: redis-py's cluster client would otherwise
            # ask a node for the keys of every XREADGROUP (COMMAND GETKEYS, two round trips)
            args: list[Any] = ["XREADGROUP", "GROUP", self.group, self.consumer, "COUNT", count]
            if block_ms is not None:
                args += ["BLOCK", block_ms]
            cluster: Any = self.redis
            reply = await cluster.execute_command(*args, "STREAMS", self.stream, ">",
                                                  target_nodes=cluster.get_node_from_key(self.stream))
        else:
            reply = await self.redis.xreadgroup(
                self.group, self.consumer, {self.stream: ">"}, count=count, block=block_ms
            )
        if not reply:
            return []
        out = []
        for entry_id, fields in reply[0][1]:
            out.append(Delivery(_s(entry_id), fields or {}, 1))
        return out

    async def reclaim(self, count: int) -> tuple[list[Delivery], int]:
        """XAUTOCLAIM up to ``count`` entries idle past the visibility timeout. Returns the
        claimed deliveries (with their delivery counts) and how many pending ids pointed at
        entries that no longer exist (removed from the PEL by Redis)."""
        if count <= 0:
            return [], 0
        cursor, entries, counts, deleted = await self._reclaim(
            keys=[self.stream],
            args=[self.group, self.consumer, self.settings.visibility_timeout_ms, count, self._reclaim_cursor],
        )
        self._reclaim_cursor = _s(cursor)
        out = []
        for entry, n in zip(entries, counts, strict=True):
            if not entry:
                continue
            entry_id, flat = entry[0], entry[1] or []
            fields = {flat[i]: flat[i + 1] for i in range(0, len(flat), 2)}
            out.append(Delivery(_s(entry_id), fields, int(n)))
        return out, len(deleted or [])

    @property
    def reclaim_cursor(self) -> str:
        """Where the next XAUTOCLAIM scan starts (``0-0``: the last scan reached the end)."""
        return self._reclaim_cursor

    def reset_reclaim_cursor(self) -> None:
        self._reclaim_cursor = "0-0"

    async def ack(self, stream_ids: Sequence[str]) -> list[str]:
        """Ack the ids this consumer still owns; returns the ids it had lost (not acked)."""
        lost: list[str] = []
        for i in range(0, len(stream_ids), OWNED_BATCH):
            batch = stream_ids[i:i + OWNED_BATCH]
            lo, hi = id_bounds(batch)
            reply = await self._ack(keys=[self.stream], args=[self.group, self.consumer, lo, hi, *batch])
            lost += [_s(x) for x in reply]
        return lost

    async def renew(self, stream_ids: Sequence[str], *, idle_ms: int = 0) -> list[str]:
        """Reset the idle time of owned in-flight ids (a lease renewal). With ``idle_ms`` equal to
        the visibility timeout, hands the entries back: any worker may reclaim them at once.
        Returns the ids no longer owned."""
        lost: list[str] = []
        for i in range(0, len(stream_ids), OWNED_BATCH):
            batch = stream_ids[i:i + OWNED_BATCH]
            lo, hi = id_bounds(batch)
            reply = await self._renew(keys=[self.stream],
                                      args=[self.group, self.consumer, idle_ms, lo, hi, *batch])
            lost += [_s(x) for x in reply]
        return lost

    async def hand_back(self, stream_ids: Sequence[str]) -> list[str]:
        """Make owned entries reclaimable right away (used on shutdown)."""
        return await self.renew(stream_ids, idle_ms=self.settings.visibility_timeout_ms + 1)

    async def redeliver_after(self, stream_ids: Sequence[str], delay_ms: int) -> list[str]:
        """Hand owned entries back so that any worker reclaims them after ``delay_ms`` (their
        idle time is set to visibility timeout - delay). Returns the ids no longer ours."""
        idle = max(0, self.settings.visibility_timeout_ms - int(delay_ms))
        return await self.renew(stream_ids, idle_ms=idle)

    async def dead_letter(
        self, delivery: Delivery, *, reason: str, error: str = "", deliveries: int | None = None
    ) -> str | None:
        """Move an owned entry to the dead-letter stream with its reason and ack it, atomically.
        Returns the dead entry id, or None if this consumer no longer owns the entry.

        The dead entry keeps the original fields when they are few and small enough to pass
        through a script (see :func:`dead_fields`); otherwise their first ones, their count
        and size. If the script still fails on the entry's data, a second call with no data of
        the entry at all records it, so dead-lettering cannot fail on what the entry holds."""
        extra = {
            b"reason": reason,
            b"error": error[:4000],
            b"deliveries": str(deliveries if deliveries is not None else delivery.deliveries),
            b"failed_at": f"{time.time():.6f}",
            b"stream_id": delivery.stream_id,
            b"consumer": self.consumer,
            b"group": self.group,
        }
        head: list[Any] = [self.group, self.consumer, delivery.stream_id, self.settings.dead_maxlen]
        try:
            result = await self._dead(keys=[self.stream, self.part.dead],
                                      args=head + dead_fields(delivery.fields, extra, self.settings.max_event_bytes))
        except ResponseError as exc:
            if classify(exc) not in (Fault.SCRIPT, Fault.FATAL):
                raise  # OOM, NOGROUP, failover: the caller waits and tries again
            log.error("dead-lettering %s with its data failed (%s); recording it without the data",
                      delivery.stream_id, exc)
            extra[b"error"] = f"{error[:2000]} (entry data not kept: {str(exc)[:300]})"
            extra.update(entry_summary(delivery.fields))
            result = await self._dead(keys=[self.stream, self.part.dead],
                                      args=head + [x for kv in extra.items() for x in kv])
        return _s(result) if result else None

    async def owns(self, stream_id: str) -> bool:
        """Whether this consumer still holds ``stream_id`` (it is pending for us)."""
        reply: list[dict[str, Any]] = await self.redis.xpending_range(self.stream, self.group, stream_id, stream_id, 1)
        return bool(reply) and _s(reply[0]["consumer"]) == self.consumer

    async def pending_ids(self, limit: int = 100_000) -> set[str]:
        """Every entry id pending for this consumer."""
        reply: list[dict[str, Any]] = await self.redis.xpending_range(self.stream, self.group, "-", "+", limit, self.consumer)
        return {_s(r["message_id"]) for r in reply}

    async def owned(self, stream_ids: Sequence[str]) -> set[str]:
        """The subset of ``stream_ids`` this consumer still holds (one XPENDING range call)."""
        if not stream_ids:
            return set()
        lo, hi = id_bounds(stream_ids)
        reply: list[dict[str, Any]] = await self.redis.xpending_range(self.stream, self.group, lo, hi, 1_000_000, self.consumer)
        wanted = set(stream_ids)
        return {sid for sid in (_s(r["message_id"]) for r in reply) if sid in wanted}

    async def trim(self) -> int:
        """Trim every entry that all groups have acked (keeping ~``stream_maxlen`` of them),
        never an entry some group still needs. Works on a full Redis (frees memory there)."""
        return int(await self._trim(keys=[self.stream], args=[self.settings.stream_maxlen, TRIM_MAX_DROP]))

    async def delete_idle_consumers(self, idle_ms: int) -> int:
        """Remove the consumers of the fleet's route groups that hold nothing and have not read
        for ``idle_ms`` (workers that exited); returns how many."""
        return int(await self._delete_idle(keys=[self.stream], args=[f"{self.settings.group}:", idle_ms]))

    # -- inspection ----------------------------------------------------------------------
    async def group_state(self) -> dict[str, Any]:
        """``{"length", "pending", "lag", "consumers", "last_delivered"}`` for our group
        (zeros if the stream or group does not exist yet)."""
        try:
            length = await self.redis.xlen(self.stream)
            groups = await self.redis.xinfo_groups(self.stream)
        except ResponseError:
            return {"length": 0, "pending": 0, "lag": 0, "consumers": 0, "last_delivered": None}
        for g in groups:
            if _s(g["name"]) == self.group:
                lag = g.get("lag")
                return {
                    "length": length,
                    "pending": int(g["pending"]),
                    "lag": int(lag) if lag is not None else length,
                    "consumers": int(g["consumers"]),
                    "last_delivered": _s(g["last-delivered-id"]),
                }
        return {"length": length, "pending": 0, "lag": length, "consumers": 0, "last_delivered": None}

    async def groups_state(self, names: Sequence[str], stream: str | None = None) -> dict[str, dict[str, Any]]:
        """:meth:`group_state` of each group in ``names`` in one XINFO GROUPS of ``stream``
        (default: this broker's) (a missing group reports everything as lag: its route's
        events wait for it)."""
        stream = stream or self.stream
        try:
            length = await self.redis.xlen(stream)
            groups = {_s(g["name"]): g for g in await self.redis.xinfo_groups(stream)}
        except ResponseError:
            length, groups = 0, {}
        out: dict[str, dict[str, Any]] = {}
        for name in names:
            g = groups.get(name)
            if g is None:
                out[name] = {"length": length, "pending": 0, "lag": length, "consumers": 0, "last_delivered": None}
                continue
            lag = g.get("lag")
            out[name] = {"length": length, "pending": int(g["pending"]),
                         "lag": int(lag) if lag is not None else length, "consumers": int(g["consumers"]),
                         "last_delivered": _s(g["last-delivered-id"])}
        return out

    async def groups_state_all(self, names: Sequence[str]) -> dict[str, dict[str, Any]]:
        """:meth:`groups_state` summed over every partition (``last_delivered`` is partition
        0's when there is one partition, else None)."""
        parts = self.settings.partitions
        if parts == 1:
            return await self.groups_state(names)
        total: dict[str, dict[str, Any]] = {}
        for part in self.keys.partitions(parts):
            for name, state in (await self.groups_state(names, part.events)).items():
                row = total.setdefault(name, {"length": 0, "pending": 0, "lag": 0, "consumers": 0,
                                              "last_delivered": None})
                for k in ("length", "pending", "lag"):
                    row[k] += state[k]
                row["consumers"] = max(row["consumers"], state["consumers"])
        return total

    async def stream_length_all(self) -> int:
        """Entries in the streams of every partition."""
        return sum([int(await self.redis.xlen(p.events)) for p in self.keys.partitions(self.settings.partitions)])

    async def dead_count_all(self) -> int:
        """Dead letters of every partition."""
        return sum([int(await self.redis.xlen(p.dead)) for p in self.keys.partitions(self.settings.partitions)])

    async def dead_count(self) -> int:
        return int(await self.redis.xlen(self.part.dead))
