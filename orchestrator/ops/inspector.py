"""Look into a running cluster through Redis: streams, pending entries, dead letters, leaders,
locks, workers and runs. Every method returns plain dicts and lists (JSON-ready), so the
``inspect`` CLI, the HTTP API and scripts all show the same data.

Dead letters can be requeued: :meth:`Inspector.requeue` moves a dead entry's original fields
(``id``, ``type``, ``body``) back to the events stream as a new entry and deletes it from the
dead stream, in one Lua script, so two operators requeueing at once never duplicate it. The
event keeps its event id; it gets a new stream id and a fresh delivery count.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from redis.exceptions import ResponseError

from orchestrator.broker.partitions import recorded_partitions
from orchestrator.errors import EventDecodeError, InvalidArgumentError, NotFoundError
from orchestrator.events import decode_fields
from orchestrator.faults import Fault, classify, is_missing_key
from orchestrator.keys import Keys, PartitionKeys
from orchestrator.ops.heartbeats import STALE_HEARTBEATS, worker_beats
from orchestrator.runs.stores import RedisRunStore, RunStore, is_stale
from orchestrator.workflow.result import RUN_STATUSES

# Fields the broker adds to a dead entry (see StreamBroker.dead_letter); all others are the
# original entry's and go back to the events stream on requeue.
DEAD_EXTRAS = ("reason", "error", "deliveries", "failed_at", "stream_id", "consumer", "group")
REQUEUE_BATCH = 100

# KEYS[1] = dead stream, KEYS[2] = events stream
# ARGV[1..n] = dead entry ids
# For each id still in the dead stream: XADD its original fields (every field but the
# dead-letter extras) to the events stream, then XDEL it from the dead stream. Returns one
# reply per id: the new events stream id, or nil when the id is not (or no longer) there or
# has no original field to requeue.
REQUEUE = """
local extras = {}
for _, name in ipairs({__EXTRAS__}) do extras[name] = true end
local out = {}
for i, id in ipairs(ARGV) do
  local found = redis.call('XRANGE', KEYS[1], id, id)
  local new = false
  if found[1] then
    local f, fields = found[1][2], {}
    for j = 1, #f, 2 do
      if not extras[f[j]] then
        fields[#fields + 1] = f[j]
        fields[#fields + 1] = f[j + 1]
      end
    end
    if #fields > 0 then
      new = redis.call('XADD', KEYS[2], '*', unpack(fields))
      redis.call('XDEL', KEYS[1], id)
    end
  end
  out[i] = new
end
return out
""".replace("__EXTRAS__", ", ".join(f"'{name}'" for name in DEAD_EXTRAS))


# KEYS[1] = events stream; ARGV[1] = the last entry id to purge
# Deletes every entry <= ARGV[1] (XTRIM MINID to the next id) and, per consumer group, acks
# its pending entries <= ARGV[1] and moves its last-delivered id up to ARGV[1] (with the
# entries-read count that keeps its lag exact). Returns {deleted, group1, acked1, group2, ...}.
PURGE_EVENTS = """
local bound = ARGV[1]
local ms, seq = string.match(bound, '^(%d+)-(%d+)$')
local deleted = redis.call('XTRIM', KEYS[1], 'MINID', ms .. '-' .. (tonumber(seq) + 1))
local out = {deleted}
local function le(a, b)
  local am, as = string.match(a, '^(%d+)-(%d+)$')
  local bm, bs = string.match(b, '^(%d+)-(%d+)$')
  if #am ~= #bm then return #am < #bm end
  if am ~= bm then return am < bm end
  return tonumber(as) <= tonumber(bs)
end
local info = redis.call('XINFO', 'STREAM', KEYS[1])
local added, length = 0, 0
for i = 1, #info, 2 do
  if info[i] == 'entries-added' then added = info[i + 1] end
  if info[i] == 'length' then length = info[i + 1] end
end
for _, g in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  local name, last = nil, '0-0'
  for i = 1, #g, 2 do
    if g[i] == 'name' then name = g[i + 1] end
    if g[i] == 'last-delivered-id' then last = g[i + 1] end
  end
  local acked = 0
  while true do
    local rows = redis.call('XPENDING', KEYS[1], name, '-', bound, 1000)
    if #rows == 0 then break end
    local ids = {}
    for i, row in ipairs(rows) do ids[i] = row[1] end
    acked = acked + redis.call('XACK', KEYS[1], name, unpack(ids))
  end
  if le(last, bound) then
    -- every entry left is newer than the bound: the group has read all the others
    redis.call('XGROUP', 'SETID', KEYS[1], name, bound, 'ENTRIESREAD', added - length)
  end
  out[#out + 1] = name
  out[#out + 1] = acked
end
return out
"""

# KEYS = conversation order lists; ARGV[1] = the last purged stream id
# Removes every id <= ARGV[1] from each list (they name purged entries); returns how many.
PURGE_ORDER = """
local bm, bs = string.match(ARGV[1], '^(%d+)-(%d+)$')
local removed = 0
for _, key in ipairs(KEYS) do
  if redis.call('TYPE', key)['ok'] == 'list' then
    for _, id in ipairs(redis.call('LRANGE', key, 0, -1)) do
      local am, as = string.match(id, '^(%d+)-(%d+)$')
      if am and (#am < #bm or (#am == #bm and (am < bm or (am == bm and tonumber(as) <= tonumber(bs))))) then
        removed = removed + redis.call('LREM', key, 1, id)
      end
    end
  end
end
return removed
"""


def _s(value: Any) -> Any:
    return value.decode("utf-8", "replace") if isinstance(value, (bytes, bytearray)) else value


#: a consumer without a heartbeat (an app consuming in-process, or a worker whose stale
#: heartbeat was pruned) counts as live if it read this recently (a live one reads every
#: ``block_ms``, 2 s by default, and reclaims every 0.5 s even with its slots full)
LIVE_CONSUMER_IDLE_MS = 5_000


def _id_key(stream_id: str) -> tuple[int, int]:
    ms, _, seq = stream_id.partition("-")
    return int(ms or 0), int(seq or 0)


def _check_limit(name: str, value: Any, maximum: int = 10_000) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= maximum:
        raise InvalidArgumentError(f"{name} must be an integer from 1 to {maximum}, got {value!r}")
    return value


def _check_stream_id(stream_id: Any) -> str:
    ms, dash, seq = str(stream_id).partition("-")
    if not (ms.isdigit() and (not dash or seq.isdigit())):
        raise InvalidArgumentError(f"not a stream id (like 1700000000000-0): {stream_id!r}")
    return f"{ms}-{seq or 0}"


def run_summary(record: dict[str, Any]) -> dict[str, Any]:
    """A run record reduced to what a list shows, with pyoco's ``task_summary`` (node name →
    state, duration_ms, ended_at, attempts)."""
    nodes = record.get("nodes") or {}
    return {
        "run_id": record.get("run_id"), "workflow": record.get("workflow_name"),
        "workflow_id": record.get("workflow_id"), "workflow_type": record.get("workflow_type"),
        "status": record.get("status"), "started_at": record.get("started_at"),
        "finished_at": record.get("finished_at"), "duration_ms": record.get("duration_ms"),
        "conversation_id": record.get("conversation_id"), "error": record.get("error"),
        "worker_id": record.get("worker_id"), "updated_at": record.get("updated_at"),
        "task_summary": {
            name: {"state": n.get("status"), "duration_ms": n.get("duration_ms"),
                   "ended_at": n.get("finished_at"), "attempts": n.get("attempts")}
            for name, n in nodes.items() if isinstance(n, dict)
        },
    }


def _dead_name(part: PartitionKeys, dead_id: str) -> str:
    """How a dead letter is named to people: its id, prefixed ``p/`` in a partition p > 0."""
    return dead_id if part.index == 0 else f"{part.index}/{dead_id}"


def dead_entry(dead_id: str, fields: dict[bytes, bytes], *, with_body: bool = False) -> dict[str, Any]:
    """One dead letter as a dict; ``with_body`` decodes the original envelope (payload ...)."""
    f = {_s(k): v for k, v in fields.items()}
    deliveries = _s(f.get("deliveries"))
    failed_at = _s(f.get("failed_at"))
    out: dict[str, Any] = {
        "dead_id": dead_id, "stream_id": _s(f.get("stream_id")), "event_id": _s(f.get("id")),
        "type": _s(f.get("type")), "reason": _s(f.get("reason")), "error": _s(f.get("error")),
        "deliveries": int(deliveries) if deliveries and str(deliveries).isdigit() else deliveries,
        "failed_at": float(failed_at) if failed_at else None, "consumer": _s(f.get("consumer")),
        "group": _s(f.get("group")),
    }
    if with_body:
        original = {k.encode(): v for k, v in f.items() if k not in DEAD_EXTRAS}
        try:
            out["event"] = decode_fields(original).to_dict()
        except EventDecodeError as exc:
            out["event"] = None
            out["undecodable"] = f"{exc.reason}: {exc}"
            out["raw_fields"] = {k.decode(): _s(v) if len(v) < 2000 else f"<{len(v)} bytes>"
                                 for k, v in original.items()}
    return out


class Inspector:
    """Read (and for dead letters, repair) one namespace's state in Redis.

    ``redis`` is an asyncio client with bytes responses (``orchestrator.broker.connection.create_redis``).
    ``run_store`` defaults to a :class:`~orchestrator.runs.stores.RedisRunStore` on the same client.
    ``clock`` (epoch seconds) is injectable for heartbeat ages."""

    def __init__(self, redis: Any, keys: Keys | None = None, group: str = "workers", *,
                 run_store: RunStore | None = None, heartbeat_interval_s: float = 5.0,
                 clock: Callable[[], float] = time.time) -> None:
        self.redis = redis
        self.keys = keys or Keys()
        self.group = group
        self.run_store = run_store or RedisRunStore(redis, self.keys)
        self.heartbeat_interval_s = heartbeat_interval_s
        self._clock = clock
        self._requeue = redis.register_script(REQUEUE)
        self._purge_events = redis.register_script(PURGE_EVENTS)
        self._purge_order = redis.register_script(PURGE_ORDER)
        self._partitions: list[PartitionKeys] | None = None

    async def partitions(self) -> list[PartitionKeys]:
        """The namespace's stream partitions, as recorded in Redis (``{ns}:layout``)."""
        if self._partitions is None:
            self._partitions = self.keys.partitions(await recorded_partitions(self.redis, self.keys))
        return self._partitions

    async def _dead_place(self, dead_id: str) -> tuple[PartitionKeys, str]:
        """The partition and id of a dead letter named ``<id>`` (looked up in every partition)
        or ``<partition>/<id>``."""
        parts = await self.partitions()
        head, slash, rest = str(dead_id).partition("/")
        if slash:
            if not head.isdigit() or int(head) >= len(parts):
                raise InvalidArgumentError(f"no partition {head!r} (the namespace has {len(parts)})")
            return parts[int(head)], _check_stream_id(rest)
        sid = _check_stream_id(dead_id)
        for part in parts:
            if len(parts) == 1 or await self.redis.xrange(part.dead, sid, sid):
                return part, sid
        return parts[0], sid

    @classmethod
    def from_app(cls, app: Any) -> Inspector:
        """An inspector on a connected :class:`~orchestrator.Orchestrator`'s Redis and settings."""
        if app.redis is None:
            raise InvalidArgumentError("the app is not connected (await app.connect() first)")
        store = getattr(app, "run_store", None)
        return cls(app.redis, app.keys, app.settings.group, run_store=store,
                   heartbeat_interval_s=app.settings.heartbeat_interval_s)

    # -- streams ----------------------------------------------------------------------------
    async def streams(self) -> list[dict[str, Any]]:
        """The events and dead streams: length, first/last id, groups with consumers, lag, pending."""
        beats = {w["id"]: not w["stale"] for w in await self.workers()}
        out = []
        for part in await self.partitions():
            out += [await self._stream(part.events, beats), await self._stream(part.dead, beats)]
        return out

    async def _stream(self, key: str, beats: dict[str, bool]) -> dict[str, Any]:
        """``beats``: worker id -> whether its heartbeat is fresh (a consumer is named after its
        worker)."""
        try:
            info = await self.redis.xinfo_stream(key)
        except ResponseError:  # no such key
            return {"stream": key, "exists": False, "length": 0, "first_id": None, "last_id": None, "groups": []}
        first, last = info.get("first-entry"), info.get("last-entry")
        groups = []
        for g in await self.redis.xinfo_groups(key):
            name = _s(g["name"])
            consumers = await self.redis.xinfo_consumers(key, name)
            lag = g.get("lag")
            groups.append({
                "name": name, "pending": int(g["pending"]), "lag": None if lag is None else int(lag),
                "last_delivered": _s(g["last-delivered-id"]), "consumers": [
                    {"name": _s(c["name"]), "pending": int(c["pending"]), "idle_ms": int(c["idle"]),
                     "inactive_ms": int(c["inactive"]) if c.get("inactive") is not None else None,
                     # its worker's heartbeat says; without one, a recent read
                     "live": beats.get(_s(c["name"]), int(c["idle"]) < LIVE_CONSUMER_IDLE_MS)}
                    for c in consumers],
            })
        return {"stream": key, "exists": True, "length": int(info["length"]),
                "first_id": _s(first[0]) if first else None, "last_id": _s(last[0]) if last else None,
                "groups": groups}

    # -- pending ----------------------------------------------------------------------------
    async def pending(self, *, limit: int = 100, consumer: str | None = None,
                      group: str | None = None) -> dict[str, Any]:
        """Entries delivered but not acked, over every group of the events stream (each route
        has its own) or only ``group``: the count, the count per group and per consumer, and
        the oldest ``limit`` entries with their group, consumer, idle time (ms), delivery count
        and event type."""
        _check_limit("limit", limit)
        total = 0
        per_group: dict[str, int] = {}
        consumers: dict[str, int] = {}
        entries: list[tuple[str, PartitionKeys, Any]] = []
        for part in await self.partitions():
            try:
                names = [group] if group else [_s(g["name"]) for g in await self.redis.xinfo_groups(part.events)]
            except ResponseError as exc:
                if not is_missing_key(exc):
                    raise
                names = []
            for name in names:
                try:
                    summary = await self.redis.xpending(part.events, name)
                except ResponseError as exc:
                    if classify(exc) is Fault.NOGROUP or is_missing_key(exc):
                        continue
                    raise
                count = int(summary["pending"])
                total += count
                per_group[name] = per_group.get(name, 0) + count
                for c in summary.get("consumers") or []:
                    consumers[_s(c["name"])] = consumers.get(_s(c["name"]), 0) + int(c["pending"])
                if count:
                    rows = await self.redis.xpending_range(part.events, name, "-", "+", limit, consumername=consumer)
                    entries += [(name, part, r) for r in rows]
        entries.sort(key=lambda e: _id_key(_s(e[2]["message_id"])))
        entries = entries[:limit]
        types = await self._types([(part, _s(r["message_id"])) for _, part, r in entries])
        rows_out = [{"stream_id": _s(r["message_id"]), "group": name, "consumer": _s(r["consumer"]),
                     "idle_ms": int(r["time_since_delivered"]), "deliveries": int(r["times_delivered"]),
                     "type": types[n], "partition": part.index} for n, (name, part, r) in enumerate(entries)]
        return {"count": total, "groups": per_group, "consumers": consumers, "entries": rows_out}

    async def _types(self, ids: Sequence[tuple[PartitionKeys, str]]) -> list[str | None]:
        if not ids:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for part, sid in ids:
                pipe.xrange(part.events, sid, sid)
            found = await pipe.execute()
        # None: trimmed or deleted
        return [_s(entries[0][1].get(b"type")) if entries else None for entries in found]

    # -- dead letters -----------------------------------------------------------------------
    async def dead_list(self, *, limit: int = 50) -> list[dict[str, Any]]:
        """The newest ``limit`` dead letters, newest first (over every partition; an entry of
        partition p > 0 has the id ``p/<id>``)."""
        _check_limit("limit", limit)
        rows = []
        for part in await self.partitions():
            for eid, fields in await self.redis.xrevrange(part.dead, "+", "-", count=limit):
                rows.append((_id_key(_s(eid)), part, _s(eid), fields))
        rows.sort(key=lambda r: r[0], reverse=True)
        return [dead_entry(_dead_name(part, eid), fields) for _, part, eid, fields in rows[:limit]]

    async def dead_show(self, dead_id: str) -> dict[str, Any]:
        """One dead letter with its decoded event (payload, metadata); NotFoundError if absent."""
        part, sid = await self._dead_place(dead_id)
        entries = await self.redis.xrange(part.dead, sid, sid)
        if not entries:
            raise NotFoundError(f"no dead letter {dead_id} in {part.dead}")
        return dead_entry(_dead_name(part, sid), entries[0][1], with_body=True)

    async def requeue(self, dead_ids: Sequence[str]) -> list[dict[str, Any]]:
        """Move dead letters back to their partition's events stream; returns ``{dead_id,
        stream_id}`` per id (``stream_id`` None when the id was not in the dead stream)."""
        places = [(d, *await self._dead_place(d)) for d in dead_ids]
        out: list[dict[str, Any]] = []
        for part in await self.partitions():
            mine = [(d, sid) for d, p, sid in places if p.index == part.index]
            for i in range(0, len(mine), REQUEUE_BATCH):
                batch = mine[i:i + REQUEUE_BATCH]
                reply = await self._requeue(keys=[part.dead, part.events], args=[sid for _, sid in batch])
                out += [{"dead_id": d, "stream_id": _s(n) if n else None}
                        for (d, _), n in zip(batch, reply, strict=True)]
        order = {d: n for n, d in enumerate(dead_ids)}
        return sorted(out, key=lambda row: order[row["dead_id"]])

    async def requeue_one(self, dead_id: str) -> str:
        """Requeue one dead letter; returns its new stream id. NotFoundError if absent."""
        new_id: str | None = (await self.requeue([dead_id]))[0]["stream_id"]
        if new_id is None:
            raise NotFoundError(f"no requeueable dead letter {dead_id}")
        return new_id

    async def requeue_all(self) -> list[dict[str, Any]]:
        """Requeue every dead letter there is when it starts, oldest first (so their order is
        kept). Bounded by each dead stream's last id at the start: a requeued event that fails
        again and comes back as a new dead letter meanwhile is not requeued a second time."""
        out: list[dict[str, Any]] = []
        for part in await self.partitions():
            newest = await self.redis.xrevrange(part.dead, "+", "-", count=1)
            if not newest:
                continue
            last = _s(newest[0][0])
            start = "-"
            while True:
                entries = await self.redis.xrange(part.dead, start, last, count=REQUEUE_BATCH)
                if not entries:
                    break
                batch = [_s(eid) for eid, _ in entries]
                out += await self.requeue([_dead_name(part, sid) for sid in batch])
                start = "(" + batch[-1]
        return out

    async def purge(self) -> int:
        """Delete every dead letter; returns how many there were."""
        count = 0
        for part in await self.partitions():
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.xlen(part.dead)
                pipe.delete(part.dead)
                n, _ = await pipe.execute()
            count += int(n)
        return count

    async def purge_events(self) -> dict[str, Any]:
        """Delete every entry of the events stream up to its last id now, and leave each
        consumer group consistent (see the module docstring). Returns ``{stream, purged,
        up_to, groups: {group: pending entries dropped}, order_ids_removed, delayed_kept}``.

        What it does not touch: delayed events (``{ns}:delayed``: they are published when due;
        ``delayed cancel`` drops one), dead letters, publish markers (an event id or
        idempotency key published again within its window still adds nothing), run records.
        A worker holding a purged entry loses it at its next lease renewal and cancels its
        handler; an ack that comes first finds nothing to ack. Neither is an error."""
        parts = await self.partitions()
        rows = [await self._purge_partition(part) for part in parts]
        if len(rows) == 1:
            return rows[0]
        groups: dict[str, int] = {}
        for row in rows:
            for name, n in row["groups"].items():
                groups[name] = groups.get(name, 0) + n
        return {"stream": f"{{{self.keys.namespace}:*}}:events", "purged": sum(r["purged"] for r in rows),
                "up_to": None, "groups": groups, "order_ids_removed": sum(r["order_ids_removed"] for r in rows),
                "delayed_kept": sum(r["delayed_kept"] for r in rows), "partitions": rows}

    async def _purge_partition(self, part: PartitionKeys) -> dict[str, Any]:
        key = part.events
        newest = await self.redis.xrevrange(key, "+", "-", count=1)
        delayed = int(await self.redis.zcard(part.delayed))
        if not newest:
            return {"stream": key, "purged": 0, "up_to": None, "groups": {}, "order_ids_removed": 0,
                    "delayed_kept": delayed}
        bound = _s(newest[0][0])
        reply = await self._purge_events(keys=[key], args=[bound])
        groups = {_s(reply[i]): int(reply[i + 1]) for i in range(1, len(reply), 2)}
        removed = 0
        batch: list[str] = []
        async for raw in self.redis.scan_iter(match=part.conversation_order("*") + "*", count=500):
            batch.append(_s(raw))
            if len(batch) >= REQUEUE_BATCH:
                removed += int(await self._purge_order(keys=batch, args=[bound]))
                batch = []
        if batch:
            removed += int(await self._purge_order(keys=batch, args=[bound]))
        return {"stream": key, "purged": int(reply[0]), "up_to": bound, "groups": groups,
                "order_ids_removed": removed, "delayed_kept": delayed}

    # -- leases -----------------------------------------------------------------------------
    async def _leases(self, lease_key: Callable[[str], str], epoch_key: Callable[[str], str],
                      name_field: str) -> list[dict[str, Any]]:
        """Leases whose key is ``lease_key(name)`` and their ``epoch_key(name)`` counters (an
        epoch without a lease = nobody holds it now)."""
        names: set[str] = set()
        for key_of in (lease_key, epoch_key):
            prefix, _, suffix = key_of("\0").partition("\0")  # the name sits between the two
            async for raw in self.redis.scan_iter(match=key_of("*"), count=500):
                key = _s(raw)
                if key.startswith(prefix) and key.endswith(suffix) and len(key) > len(prefix) + len(suffix):
                    names.add(key[len(prefix): len(key) - len(suffix)])
        rows = []
        for name in sorted(names):
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.get(lease_key(name))
                pipe.pttl(lease_key(name))
                pipe.get(epoch_key(name))
                holder, ttl, epoch = await pipe.execute()
            rows.append({name_field: name, "key": lease_key(name), "holder": _s(holder),
                         "ttl_ms": int(ttl) if ttl is not None and ttl >= 0 else None,
                         "epoch": int(epoch) if epoch is not None else None})
        return rows

    async def leaders(self) -> list[dict[str, Any]]:
        """Leader leases per role: holder id, remaining ttl (ms), fencing epoch."""
        return await self._leases(self.keys.leader, self.keys.leader_epoch, "role")

    async def locks(self) -> list[dict[str, Any]]:
        """Conversation locks: holder token, remaining ttl (ms), fencing epoch."""
        return await self._leases(self.keys.conversation_lock, self.keys.conversation_lock_epoch,
                                  "conversation_id")

    # -- workers and runs -------------------------------------------------------------------
    async def groups(self) -> list[dict[str, Any]]:
        """Every consumer group of the events stream with the route behind it (from
        ``{ns}:routes``), its lag and pending counts, and how many live workers read it.
        ``waiting`` is True when it has work and no live worker reads it: its route's events
        wait for a worker that has the registration (they are not lost)."""
        from orchestrator.ops.metrics import live_group_readers
        from orchestrator.runs.routes import decode_advert

        merged: dict[str, dict[str, int]] = {}
        for part in await self.partitions():
            try:
                rows = await self.redis.xinfo_groups(part.events)
                length = int(await self.redis.xlen(part.events))
            except ResponseError as exc:
                if not is_missing_key(exc):
                    raise
                rows, length = [], 0
            for g in rows:
                lag = g.get("lag")
                row = merged.setdefault(_s(g["name"]), {"lag": 0, "pending": 0})
                row["lag"] += int(lag) if lag is not None else length
                row["pending"] += int(g["pending"])
        adverts = {_s(g): decode_advert(b) or {} for g, b in (await self.redis.hgetall(self.keys.routes)).items()}
        live = live_group_readers(await self.redis.hgetall(self.keys.workers),
                                  heartbeat_interval_s=self.heartbeat_interval_s, now=self._clock())
        out = []
        for name, counts in merged.items():
            lag_n, pending = counts["lag"], counts["pending"]
            advert = adverts.get(name, {})
            out.append({"group": name, "kind": advert.get("kind"), "name": advert.get("name"),
                        "lag": lag_n, "pending": pending, "live_workers": live.get(name, 0),
                        "waiting": (lag_n + pending) > 0 and not live.get(name)})
        return out

    async def remove_group(self, group: str, *, force: bool = False) -> dict[str, Any]:
        """Remove a retired registration's consumer group (XGROUP DESTROY) and its advert, so the
        stream is no longer kept for it. Refused (InvalidArgumentError) while a live worker reads
        it, unless ``force``: that worker would recreate it. Returns what it held."""
        rows = {g["group"]: g for g in await self.groups()}
        row = rows.get(group)
        if row is None:
            raise NotFoundError(f"no consumer group {group!r} on the events stream (see inspect groups)")
        if row["live_workers"] and not force:
            raise InvalidArgumentError(f"{row['live_workers']} live worker(s) read {group!r}; stop them first "
                                       "(or --force: a worker that has the registration creates it again)")
        for part in await self.partitions():
            try:
                await self.redis.xgroup_destroy(part.events, group)
            except ResponseError as exc:
                if not is_missing_key(exc):
                    raise
        await self.redis.hdel(self.keys.routes, group)
        return {"group": group, "removed": True, "lag": row["lag"], "pending": row["pending"]}

    async def delayed(self, *, limit: int = 100) -> list[dict[str, Any]]:
        """Delayed events in due order: event id, type, due time (epoch ms), seconds left."""
        from orchestrator.broker.delayed import DelayedEvents

        _check_limit("limit", limit)
        return await DelayedEvents(self.redis, self.keys, await self._settings()).list(limit)

    async def cancel_delayed(self, event_id: str) -> bool:
        """Cancel a delayed event before it is due; False when it is not waiting (any more)."""
        from orchestrator.broker.delayed import DelayedEvents

        return await DelayedEvents(self.redis, self.keys, await self._settings()).cancel(event_id)

    async def _settings(self) -> Any:
        from orchestrator.config import Settings

        return Settings(namespace=self.keys.namespace, partitions=len(await self.partitions()))

    async def workers(self) -> list[dict[str, Any]]:
        """Worker heartbeats from ``{ns}:workers`` with their age and a ``stale`` flag."""
        beats = worker_beats(await self.redis.hgetall(self.keys.workers), now=self._clock(),
                             stale_after_s=STALE_HEARTBEATS * self.heartbeat_interval_s)
        return [{**w.fields(), "id": w.id, "age_s": w.age_s, "stale": w.stale} for w in beats]

    async def runs(self, *, status: str | None = None, workflow: str | None = None,
                   limit: int = 50) -> list[dict[str, Any]]:
        """Run summaries, newest first, filtered by status and workflow (name or id)."""
        _check_limit("limit", limit)
        if status is not None and status not in RUN_STATUSES:
            raise InvalidArgumentError(f"unknown run status {status!r}; use one of {', '.join(RUN_STATUSES)}")
        rows = [run_summary(r) for r in await self.run_store.list(status=status, workflow=workflow, limit=limit)]
        if any(r["status"] == "running" for r in rows):  # a running record whose worker is gone is stale
            live = [w["id"] for w in await self.workers() if not w["stale"]]
            now = self._clock()
            for r in rows:
                r["stale"] = is_stale(r, now, live)
        return rows

    async def run(self, run_id: str, *, tail: int | None = None) -> dict[str, Any]:
        """A whole run record with its task summary and log lines (``tail`` = last N);
        NotFoundError if unknown."""
        record = await self.run_store.get(run_id)
        if record is None:
            raise NotFoundError(f"no run {run_id!r} (unknown, or expired from the run store)")
        logs = await self.run_store.get_logs(run_id, tail)
        return {**record, "task_summary": run_summary(record)["task_summary"], "logs": logs}
