"""Delayed (scheduled) events: an event published with a due time waits in Redis and is
added to the events stream when it is due, by whichever worker's :class:`DelayMover` gets
there first.

Keys (see :mod:`orchestrator.keys`):

* ``{ns}:delayed`` (zset): event id -> due time, epoch ms;
* ``{ns}:delayed:events`` (hash): event id -> msgpack ``{fields, order}``: the event's stream
  fields (as :func:`orchestrator.broker.streams.checked_fields` makes them, flattened to
  name/value pairs) and the conversation order lists to RPUSH its stream id to when it moves.

:meth:`DelayedEvents.schedule` writes both in one script, once per event id. Moving is one
script too (:data:`MOVE_DUE`): it takes the due members, XADDs each to ``{ns}:events``, sets
its publish-once marker ``{ns}:published:{event_id}`` and appends its stream id to its order
lists, then removes it from the zset and the hash, atomically. So an event is moved once,
whatever the number of workers running movers: it reaches the stream at least once (a
resend of the move after a timeout finds the member gone) and never twice (a move that finds
the event's publish-once marker, because the same event id was published meanwhile, drops the
delayed copy and adds nothing, as :data:`orchestrator.broker.scripts.PUBLISH_ONCE` does).

Clock: due times are compared with Redis's own clock (``TIME`` inside the script), so the
workers' clocks do not matter. ``due_ms`` itself is computed by the publisher, from its own
clock (``at=`` is a wall-clock time; ``delay_s`` is added to the publisher's ``time.time()``):
a publishing host whose clock is off by N ms fires its events N ms off.

Precision: a mover whose zset head is due within ``max_sleep_ms`` looks again every
``poll_ms`` (default 20 ms) and sleeps exactly until the head when it is nearer; a schedule
made in the mover's own process wakes it at once. So at low load an event fires within about
``poll_ms`` plus one round trip of its due time (``benchmarks/delay_bench.py`` measures it). An
event scheduled by another process while every mover sleeps ``max_sleep_ms`` (nothing due
within that time) may fire up to ``max_sleep_ms`` (default 1 s) minus its delay late.

Redis restarts: with persistence (AOF, or an RDB snapshot taken after the schedule) delayed
events survive a restart and fire once after it; without persistence they are lost, like the
stream itself. A full Redis (maxmemory, ``noeviction``) refuses the move's XADD, so nothing
moves and nothing is lost; the mover backs off and moves everything once memory is freed.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, cast

import msgpack
import redis.asyncio as aioredis

from orchestrator import faults
from orchestrator.broker.scripts import ORDER_LIST_TTL_S
from orchestrator.broker.streams import wire_fields
from orchestrator.config import Settings
from orchestrator.errors import InvalidArgumentError
from orchestrator.events import Event
from orchestrator.faults import TRANSIENT, Backoff, Fault, RestartBudget, classify
from orchestrator.keys import Keys, PartitionKeys
from orchestrator.locks import cancel_and_wait

log = logging.getLogger("tokiwa.delayed")

# The hash value is msgpack with raw strings (``use_bin_type=False``): Redis's Lua cmsgpack
# does not read msgpack's bin type.
_pack = msgpack.Packer(use_bin_type=False).pack

# KEYS[1] = delayed zset, KEYS[2] = delayed events hash
# ARGV[1] = event id, ARGV[2] = due time (epoch ms), ARGV[3] = msgpack {fields, order}
# Stores the event unless its id is already there. Returns 1 when stored, 0 when the id was
# scheduled already (nothing changes). HSETNX is the first write, so a full Redis refuses all.
SCHEDULE = """
if redis.call('HSETNX', KEYS[2], ARGV[1], ARGV[3]) == 0 then return 0 end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
return 1
"""

# KEYS[1] = delayed zset, KEYS[2] = delayed events hash
# ARGV[1] = event id
# Removes the event from both; returns 1 if it was scheduled, else 0.
CANCEL = """
local z = redis.call('ZREM', KEYS[1], ARGV[1])
local h = redis.call('HDEL', KEYS[2], ARGV[1])
if z + h > 0 then return 1 end
return 0
"""

# KEYS[1] = events stream, KEYS[2] = delayed zset, KEYS[3] = delayed events hash,
# KEYS[4] = dead-letter stream
# ARGV[1] = most events to move, ARGV[2] = publish-once marker lifetime in ms (0 = no marker),
# ARGV[3] = the marker key's prefix (``keys.published("")``; the marker of an event is the
# prefix followed by its id), ARGV[4] = dead-letter stream maxlen (approximate)
# The marker and the conversation order lists are the exception to "every key in KEYS": they
# depend on the events moved, which only the script knows. The order lists are read from the
# event's hash value, where schedule() stored them (checked to lie in the namespace).
# With now = Redis's TIME in ms, takes up to ARGV[1] members with score <= now, in due order,
# and for each, atomically with its removal from the zset and the hash:
#   * when its marker exists (the event id was published within the marker's lifetime): adds
#     nothing (status "known", stream id = the marker's);
#   * else XADDs its fields to KEYS[1], sets its marker to the new id (PX ARGV[2]) and RPUSHes
#     the id to each of its order lists (status "moved");
#   * a member without a hash value is removed (status "missing");
#   * a hash value that is not msgpack of {fields, order} goes to KEYS[4] (fields reason =
#     "undecodable", error, failed_at, id, due_ms, original_bytes, raw = its first KiB;
#     status "dead"), so one bad value cannot stop the movers.
# The XADD is an event's first write and the order lists' types are checked before it, so an
# error (a full Redis, a key of the wrong type) leaves that event scheduled and unchanged.
# Returns {{event_id, stream_id or false, due_ms, status}, ..., next due ms or false, now ms}:
# the moved list, then the due time of the new head, then the time the script read.
MOVE_DUE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = ARGV[2]
local due = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'WITHSCORES', 'LIMIT', 0, tonumber(ARGV[1]))
local out = {}
for i = 1, #due, 2 do
  local eid, score = due[i], due[i + 1]
  local raw = redis.call('HGET', KEYS[3], eid)
  local sid, status = false, 'missing'
  if raw then
    local ok, entry = pcall(cmsgpack.unpack, raw)
    if not ok or type(entry) ~= 'table' or type(entry['fields']) ~= 'table' or #entry['fields'] < 2
        or (entry['order'] ~= nil and type(entry['order']) ~= 'table') then
      sid = redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[4], '*',
        'reason', 'undecodable', 'error', 'delayed event is not msgpack of {fields, order}',
        'failed_at', string.format('%.3f', now / 1000), 'id', eid, 'due_ms', score,
        'original_bytes', tostring(#raw), 'raw', string.sub(raw, 1, 1024))
      status = 'dead'
    else
      local known = false
      if ttl ~= '0' then known = redis.call('GET', ARGV[3] .. eid) end
      if known then
        sid, status = known, 'known'
      else
        local order = entry['order'] or {}
        for _, key in ipairs(order) do
          local kt = redis.call('TYPE', key)
          if type(kt) == 'table' then kt = kt['ok'] end
          if kt ~= 'list' and kt ~= 'none' then
            return redis.error_reply('WRONGTYPE order list ' .. key .. ' of delayed event ' .. eid ..
              ' is a ' .. kt .. ', not a list')
          end
        end
        sid = redis.call('XADD', KEYS[1], '*', unpack(entry['fields']))
        if ttl ~= '0' then redis.call('SET', ARGV[3] .. eid, sid, 'PX', ttl) end
        for _, key in ipairs(order) do
          redis.call('RPUSH', key, sid)
          redis.call('EXPIRE', key, __ORDER_TTL_S__)
        end
        status = 'moved'
      end
    end
  end
  redis.call('ZREM', KEYS[2], eid)
  redis.call('HDEL', KEYS[3], eid)
  out[#out + 1] = {eid, sid, score, status}
end
local head = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
local nxt = false
if head[2] then nxt = head[2] end
return {out, nxt, now}
""".replace("__ORDER_TTL_S__", str(ORDER_LIST_TTL_S))


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _ms(value: bytes | str | float | int) -> int:
    """A score or a number as integer ms (Redis replies scores as text)."""
    return int(float(_s(value))) if isinstance(value, (bytes, str)) else int(value)


def pack_entry(fields: dict[str, bytes | str], order_lists: Sequence[str]) -> bytes:
    """The hash value of a delayed event: msgpack ``{fields: [name, value, ...], order: [...]}``."""
    flat: list[bytes | str] = [x for kv in fields.items() for x in kv]
    packed: bytes = _pack({"fields": flat, "order": list(order_lists)})
    return packed


def unpack_entry(raw: bytes) -> tuple[dict[bytes, bytes], list[str]]:
    """The stream fields (bytes names and values, as a stream read gives them) and the order
    lists of a hash value made by :func:`pack_entry`."""
    data = msgpack.unpackb(raw, raw=True)
    flat = data[b"fields"]
    fields = {bytes(flat[i]): bytes(flat[i + 1]) for i in range(0, len(flat) - 1, 2)}
    return fields, [_s(k) for k in data.get(b"order") or ()]


#: ms a worker's delay mover sleeps at most when nothing is due soon: an event scheduled by
#: another process with a shorter delay than this may fire up to this late
IDLE_POLL_MS = 250


def due_ms(*, delay_s: float | None = None, at: datetime | None = None) -> int:
    """The due time (epoch ms, this host's clock) of ``delay_s`` from now or ``at`` (an aware
    datetime, or a naive one in local time)."""
    if (delay_s is None) == (at is None):
        raise InvalidArgumentError("give one of delay_s and at")
    if at is not None:
        if not isinstance(at, datetime):
            raise InvalidArgumentError(f"at must be a datetime, got {type(at).__name__}")
        return int(at.timestamp() * 1000)
    if isinstance(delay_s, bool) or not isinstance(delay_s, (int, float)) or not delay_s >= 0:
        raise InvalidArgumentError(f"delay_s must be a number >= 0, got {delay_s!r}")
    return int((time.time() + delay_s) * 1000)


class DelayedEvents:
    """The delayed events of one namespace: schedule, move when due, list, cancel."""

    def __init__(self, redis: aioredis.Redis, keys: Keys, settings: Settings) -> None:
        self.redis = redis
        self.keys = keys
        self.settings = settings
        self._schedule = redis.register_script(SCHEDULE)
        self._cancel = redis.register_script(CANCEL)
        self._move = redis.register_script(MOVE_DUE)
        # movers of this process: a schedule due before a mover's wake-up wakes it
        self._movers: set[DelayMover] = set()

    def _parts(self) -> list[PartitionKeys]:
        return self.keys.partitions(self.settings.partitions)

    async def schedule(self, event: Event, due_ms: int, order_lists: Sequence[str] = (), *,
                       partition: int = 0) -> bool:
        """Store ``event`` to be added to the stream of ``partition`` at ``due_ms`` (epoch ms,
        by the caller's clock), with the stream id to be RPUSHed to each of ``order_lists``
        (keys of that partition) when it moves. Returns False, changing nothing, when an event
        of this id is scheduled already in that partition. InvalidArgumentError for an event
        over ``max_event_bytes``."""
        if isinstance(due_ms, bool) or not isinstance(due_ms, int) or due_ms < 0:
            raise InvalidArgumentError(f"due_ms must be a non-negative integer (epoch ms), got {due_ms!r}")
        part = self.keys.partition(partition)
        prefix = f"{part.tag}:"
        for key in order_lists:
            if not isinstance(key, str) or not key.startswith(prefix):
                raise InvalidArgumentError(f"order list {key!r} is not a key of namespace {self.keys.namespace!r} "
                                           f"partition {partition}")
        fields = wire_fields(event, self.settings)
        stored = bool(await self._schedule(keys=[part.delayed, part.delayed_events],
                                           args=[event.id, due_ms, pack_entry(fields, order_lists)]))
        if stored:
            for mover in list(self._movers):
                mover.wake_if_before(due_ms)
        return stored

    async def move_due(self, limit: int = 100) -> list[dict[str, Any]]:
        """Move up to ``limit`` due events to the stream (see :data:`MOVE_DUE`); returns
        ``[{event_id, stream_id, due_ms, moved_ms, status}]``, ``status`` being ``moved``,
        ``known`` (its publish-once marker existed: nothing added), ``missing`` or ``dead``."""
        moved, _, _ = await self.move_batch(limit)
        return moved

    async def move_batch(self, limit: int = 100) -> tuple[list[dict[str, Any]], int | None, int]:
        """:meth:`move_due`, plus the due time of the new head (None when nothing is left) and
        Redis's time when it moved, both epoch ms: what a mover needs to plan its sleep."""
        if limit < 1:
            raise InvalidArgumentError(f"limit must be at least 1, got {limit}")
        moved: list[dict[str, Any]] = []
        heads: list[int] = []
        now_ms = 0
        for part in self._parts():  # one script per partition: each is one hash slot
            rows, head, now = await self._move(
                keys=[part.events, part.delayed, part.delayed_events, part.dead],
                args=[limit, self.settings.publish_dedup_ms, part.published(""), self.settings.dead_maxlen],
            )
            now_ms = max(now_ms, int(now))
            moved += [{"event_id": _s(eid), "stream_id": _s(sid) if sid else None, "due_ms": _ms(score),
                       "moved_ms": int(now), "status": _s(status), "partition": part.index}
                      for eid, sid, score, status in rows]
            if len(rows) >= limit:
                heads.append(int(now))  # a full batch: more may be due at once
            elif head:
                heads.append(_ms(head))
        return moved, (min(heads) if heads else None), now_ms

    async def next_due_ms(self) -> int | None:
        """The earliest due time (epoch ms), or None when nothing is scheduled."""
        heads = []
        for part in self._parts():
            head = await self.redis.zrange(part.delayed, 0, 0, withscores=True)
            if head:
                heads.append(_ms(head[0][1]))
        return min(heads) if heads else None

    async def count(self) -> int:
        return sum([int(await self.redis.zcard(part.delayed)) for part in self._parts()])

    async def list(self, limit: int = 100) -> list[dict[str, Any]]:
        """The first ``limit`` delayed events in due order: ``[{event_id, type, due_ms,
        due_in_s}]`` (``due_in_s`` by Redis's clock, negative when overdue; ``type`` None when
        the stored value cannot be read)."""
        if limit < 1:
            return []
        secs, micros = await self.redis.time()
        now_ms = secs * 1000 + micros // 1000
        out: list[dict[str, Any]] = []
        for part in self._parts():
            members = cast("list[tuple[bytes, float]]",
                           await self.redis.zrange(part.delayed, 0, limit - 1, withscores=True))
            if not members:
                continue
            raws = await self.redis.hmget(part.delayed_events, [m for m, _ in members])
            for (member, score), raw in zip(members, raws, strict=True):
                due = _ms(score)
                out.append({"event_id": _s(member), "type": _event_type(raw), "due_ms": due,
                            "due_in_s": round((due - now_ms) / 1000.0, 3), "partition": part.index})
        out.sort(key=lambda row: row["due_ms"])
        return out[:limit]

    async def cancel(self, event_id: str) -> bool:
        """Remove a delayed event before it moves; True if it was scheduled (in any partition)."""
        found = False
        for part in self._parts():
            found = bool(await self._cancel(keys=[part.delayed, part.delayed_events], args=[event_id])) or found
        return found


def _event_type(raw: bytes | str | None) -> str | None:
    if raw is None:
        return None
    try:
        fields, _ = unpack_entry(raw.encode() if isinstance(raw, str) else raw)
        return fields[b"type"].decode("utf-8", "replace")
    except Exception:  # a value not written by schedule(): shown without its type
        return None


RECONNECT_BASE_S, RECONNECT_CAP_S = 0.1, 5.0
# how long stop() lets a move in flight finish before cancelling it
STOP_GRACE_S = 5.0


class DelayMover:
    """The background task that moves due events to the stream (any number may run, in any
    number of processes: each event moves once).

    Loop: move a batch; a full batch is followed by another at once; otherwise sleep until
    the next due time, at most ``poll_ms`` when it is within ``max_sleep_ms`` and at most
    ``max_sleep_ms`` otherwise. Transient Redis faults (:data:`orchestrator.faults.TRANSIENT`)
    are reported once per episode and waited out with backoff. Anything else is logged with its
    traceback and the loop restarts; a fatal Redis reply (ACL, wrong type), or
    :data:`orchestrator.faults.MAX_RESTARTS` restarts within a minute (:class:`~orchestrator.faults.RestartBudget`), stops it: :attr:`failed`
    holds the error and ``on_failed`` (if given) is called with it."""

    def __init__(self, delayed: DelayedEvents, *, poll_ms: int = 20, max_sleep_ms: int = 1000,
                 batch: int = 100, on_failed: Callable[[BaseException], object] | None = None) -> None:
        if poll_ms < 1 or max_sleep_ms < poll_ms or batch < 1:
            raise InvalidArgumentError(f"need 1 <= poll_ms <= max_sleep_ms and batch >= 1, got poll_ms={poll_ms}, "
                                       f"max_sleep_ms={max_sleep_ms}, batch={batch}")
        self.delayed = delayed
        self.poll_ms, self.max_sleep_ms, self.batch = poll_ms, max_sleep_ms, batch
        self.on_failed = on_failed
        #: events added to the stream / delayed entries removed without adding one (their
        #: publish-once marker existed, their value was missing or undecodable)
        self.moved = 0
        self.dropped = 0
        #: restarts after a non-transient failure
        self.restarts = 0
        self._failed: BaseException | None = None
        self._budget = RestartBudget("delay mover")
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        # epoch ms (local clock) the sleeping loop wakes at (None while it is not sleeping),
        # and the soonest due time scheduled in this process since its last move began
        self._wake_at_ms: float | None = None
        self._soonest_ms = math.inf

    @property
    def failed(self) -> BaseException | None:
        """The error that stopped the mover, or None."""
        return self._failed

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def start(self) -> None:
        """Start the loop (once; a started mover is left as it is)."""
        if self.running:
            return
        self._stop.clear()
        self._failed = None
        self._loop = asyncio.get_running_loop()
        self.delayed._movers.add(self)
        self._task = asyncio.create_task(self._run(), name="tokiwa-delay-mover")
        self._task.add_done_callback(self._task_done)

    async def stop(self) -> None:
        """Stop the loop: a move in flight finishes (up to :data:`STOP_GRACE_S`), then the
        task ends. Idempotent."""
        self._stop.set()
        self._wake.set()
        self.delayed._movers.discard(self)
        task, self._task = self._task, None
        if task is None:
            return
        if not task.done():
            await asyncio.wait({task}, timeout=STOP_GRACE_S)
        if not task.done():
            await cancel_and_wait(task)

    def wake_if_before(self, due_ms: int) -> None:
        """Tell the loop that an event due at ``due_ms`` was scheduled (safe from any thread):
        a sleeping loop that would wake later wakes now, and a loop that is moving sleeps no
        later than that due time afterwards."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            same = asyncio.get_running_loop() is loop
        except RuntimeError:
            same = False
        if same:
            self._notify(due_ms)
        else:
            loop.call_soon_threadsafe(self._notify, due_ms)

    def _notify(self, due_ms: int) -> None:
        self._soonest_ms = min(self._soonest_ms, float(due_ms))
        if self._wake_at_ms is not None and due_ms < self._wake_at_ms:
            self._wake.set()

    def sleep_ms(self, next_due_ms: int | None, now_ms: int) -> float:
        """How long to sleep after a batch that was not full, given the head's due time and
        Redis's time then."""
        if next_due_ms is None:
            return float(self.max_sleep_ms)
        gap = next_due_ms - now_ms
        if gap > self.max_sleep_ms:
            return float(self.max_sleep_ms)
        # +1: Redis's TIME is truncated to the ms, so waking at the gap could be just early
        return float(max(0, min(self.poll_ms, gap + 1)))

    # -- the loop -----------------------------------------------------------------------------
    async def _run(self) -> None:
        backoff = Backoff(RECONNECT_BASE_S, RECONNECT_CAP_S)
        met: set[Fault] = set()
        while not self._stop.is_set():
            self._soonest_ms = math.inf
            try:
                moved, head, now_ms = await self.delayed.move_batch(self.batch)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not self._on_error(exc, met):
                    return
                await self._pause(backoff.next_delay())
                continue
            if met:
                faults.recovered(*met)
                met.clear()
            backoff.reset()
            for row in moved:
                if row["status"] == "moved":
                    self.moved += 1
                else:
                    self.dropped += 1
                    if row["status"] == "dead":
                        log.error("delayed event %s could not be read; dead-lettered as %s",
                                  row["event_id"], row["stream_id"])
            if len(moved) >= self.batch:
                continue
            await self._sleep(self.sleep_ms(head, now_ms))

    def _on_error(self, exc: Exception, met: set[Fault]) -> bool:
        """Apply the fault model to ``exc``; False when the mover must stop (it has failed)."""
        fault = classify(exc)
        if fault in TRANSIENT:
            faults.report(exc)
            met.add(fault)
            return True
        if not self._budget.spend(exc):
            self._fail(exc)
            return False
        self.restarts += 1
        return True

    def _fail(self, exc: BaseException) -> None:
        if self._failed is not None:
            return
        self._failed = exc
        if self.on_failed is not None:
            try:
                self.on_failed(exc)
            except Exception:
                log.exception("the delay mover's on_failed callback failed")

    async def _sleep(self, ms: float) -> None:
        """Sleep ``ms``, or less when stopped, or when this process scheduled an event due
        sooner (during the last move, or while sleeping)."""
        if self._stop.is_set():
            return
        now = time.time() * 1000.0
        if self._soonest_ms < now + ms:
            ms = max(0.0, self._soonest_ms - now + 1)
        if ms <= 0:
            return
        self._wake.clear()
        self._wake_at_ms = now + ms
        try:
            await asyncio.wait_for(self._wake.wait(), ms / 1000.0)
        except TimeoutError:
            pass
        finally:
            self._wake_at_ms = None

    async def _pause(self, seconds: float) -> None:
        """Back off ``seconds`` (cut short only by stop())."""
        try:
            await asyncio.wait_for(self._stop.wait(), seconds)
        except TimeoutError:
            pass

    def _task_done(self, task: asyncio.Task[None]) -> None:
        """A loop that ends other than by stop() (a BaseException escaped it) is a failure."""
        if task.cancelled():
            if not self._stop.is_set():
                self._fail(asyncio.CancelledError("the delay mover's task was cancelled"))
                log.error("the delay mover's task was cancelled without stop(); it has stopped")
            return
        exc = task.exception()
        if exc is not None:
            log.error("the delay mover's task died (%r)", exc, exc_info=exc)
            self._fail(exc)
