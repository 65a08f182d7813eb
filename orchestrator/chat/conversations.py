"""Conversation memory stores: in memory, a directory of deltas, and Redis.

Memory is a dict with string keys (a JSON object). Every store has the same contract:

- ``await get(cid) -> dict``: the current memory, ``{}`` for an unknown conversation;
- ``await set(cid, memory, *, fencing_token=None, event_id=None) -> bool``: store ``memory``
  as a shallow, top-level delta against the current one (keys set, keys removed). Returns
  False when ``event_id`` was already applied: a redelivered event never applies its delta
  twice. With a ``fencing_token`` (the conversation lock's epoch), a token older than the
  newest one seen is refused with :class:`~orchestrator.errors.FencingError`;
- ``await delete(cid) -> bool``.

Values are compared by equality (tokiwa compares by identity, so its nested objects always
count as changed; equality gives the same memory with smaller deltas). ``set`` computes its
delta from the current memory, so writers of one conversation must be serialized: chatflow
runs hold the conversation lock while they write.

Bounds: the Redis store's keys of a conversation expire after it was idle (no write) for
``ttl_s``; the applied ids are capped to the newest ``dedupe_keep``; the deltas are folded into
the snapshot every ``compact_after``. The memory and file stores keep what they are given.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any
from urllib.parse import quote

import msgpack

from orchestrator.errors import FencingError, InvalidArgumentError, StateError
from orchestrator.events import check_conversation_id
from orchestrator.keys import Keys

Patch = dict[str, Any]  # {"set": {key: value}, "remove": [key, ...]}
# event ids remembered per conversation for deduplication; a redelivery comes within
# minutes, long before this many later events of the same conversation.
DEFAULT_DEDUPE_KEEP = 10_000
# a Redis conversation's keys expire this long after its last write (Settings.conversation_ttl_s)
DEFAULT_TTL_S = 30 * 86_400.0


def check_cid(conversation_id: Any) -> str:
    return check_conversation_id(conversation_id)


def check_memory(memory: Any) -> dict[str, Any]:
    if not isinstance(memory, dict):
        raise InvalidArgumentError(f"conversation memory must be a dict, got {type(memory).__name__}")
    bad = [k for k in memory if not isinstance(k, str)]
    if bad:
        raise InvalidArgumentError(f"conversation memory keys must be strings, got {bad[:3]!r}")
    return memory


def check_compact_after(compact_after: Any) -> int:
    if isinstance(compact_after, bool) or not isinstance(compact_after, int) or compact_after < 1:
        raise InvalidArgumentError(f"compact_after must be an integer >= 1, got {compact_after!r}")
    return compact_after


def shallow_diff(old: dict[str, Any], new: dict[str, Any]) -> Patch:
    """The top-level patch that turns ``old`` into ``new``."""
    return {"set": {k: v for k, v in new.items() if k not in old or old[k] != v},
            "remove": [k for k in old if k not in new]}


def apply_patch(memory: dict[str, Any], patch: Patch) -> dict[str, Any]:
    memory.update(patch.get("set") or {})
    for key in patch.get("remove") or ():
        memory.pop(key, None)
    return memory


def is_empty(patch: Patch) -> bool:
    return not patch.get("set") and not patch.get("remove")


def check_token(fencing_token: int | None, newest: int, cid: str) -> None:
    if fencing_token is not None and fencing_token < newest:
        raise FencingError(
            f"conversation {cid!r}: fencing token {fencing_token} is stale (newest is {newest}); "
            "the lock expired and another holder took it", name=cid)


class ConversationStore:
    """Base class; see the module docstring for the contract."""

    async def get(self, conversation_id: str) -> dict[str, Any]:
        raise NotImplementedError

    async def set(self, conversation_id: str, memory: dict[str, Any], *, fencing_token: int | None = None,
                  event_id: str | None = None) -> bool:
        raise NotImplementedError

    async def delete(self, conversation_id: str) -> bool:
        raise NotImplementedError


class _Dedupe:
    """Event ids applied to one conversation (newest ``keep``) and the newest fencing token."""

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self.ids: OrderedDict[str, None] = OrderedDict()
        self.token = 0

    def seen(self, event_id: str | None) -> bool:
        return event_id is not None and event_id in self.ids

    def record(self, event_id: str | None, fencing_token: int | None) -> None:
        if event_id is not None:
            self.ids[event_id] = None
            while len(self.ids) > self.keep:
                self.ids.popitem(last=False)
        if fencing_token is not None:
            self.token = max(self.token, fencing_token)


class InMemoryConversationStore(ConversationStore):
    """Process-local store of deep copies (tests, single-process apps)."""

    def __init__(self, *, dedupe_keep: int = DEFAULT_DEDUPE_KEEP) -> None:
        self._data: dict[str, dict[str, Any]] = {}
        self._meta: dict[str, _Dedupe] = {}
        self._keep = dedupe_keep

    async def get(self, conversation_id: str) -> dict[str, Any]:
        return copy.deepcopy(self._data.get(check_cid(conversation_id), {}))

    async def set(self, conversation_id: str, memory: dict[str, Any], *, fencing_token: int | None = None,
                  event_id: str | None = None) -> bool:
        cid, memory = check_cid(conversation_id), check_memory(memory)
        meta = self._meta.setdefault(cid, _Dedupe(self._keep))
        check_token(fencing_token, meta.token, cid)
        if meta.seen(event_id):
            return False
        self._data[cid] = copy.deepcopy(memory)
        meta.record(event_id, fencing_token)
        return True

    async def delete(self, conversation_id: str) -> bool:
        cid = check_cid(conversation_id)
        self._meta.pop(cid, None)
        return self._data.pop(cid, None) is not None


class DeltaConversationStore(ConversationStore):
    """tokiwa's file store: ``<dir>/<id>/base.json`` + ``deltas.jsonl``.

    The first ``set`` writes the base; later ones append one line
    ``{"timestamp": ISO, "diff": {"set": {...}, "remove": [...]}}`` (nothing for an empty diff);
    when the deltas reach ``compact_after`` (on ``set``, or on ``get`` if already there) the
    merged memory becomes the new base and the deltas are emptied. ``meta.json`` keeps the
    applied event ids and the newest fencing token. File writes run in a thread; the base
    is replaced atomically (write + rename).
    """

    def __init__(self, directory: str | os.PathLike[str] = "conversations", *, compact_after: int = 50,
                 dedupe_keep: int = DEFAULT_DEDUPE_KEEP) -> None:
        self.directory = Path(directory)
        self.compact_after = check_compact_after(compact_after)
        self._keep = dedupe_keep
        self._lock = threading.Lock()

    def folder(self, conversation_id: str) -> Path:
        name = quote(check_cid(conversation_id), safe="-_.@")
        if name in (".", ".."):
            raise InvalidArgumentError(f"conversation id {conversation_id!r} cannot name a folder")
        return self.directory / name

    async def get(self, conversation_id: str) -> dict[str, Any]:
        folder = self.folder(conversation_id)
        return await asyncio.to_thread(self._locked, self._get, folder)

    async def set(self, conversation_id: str, memory: dict[str, Any], *, fencing_token: int | None = None,
                  event_id: str | None = None) -> bool:
        folder, memory = self.folder(conversation_id), check_memory(memory)
        json.dumps(memory)  # refuse what JSON cannot hold before touching the files
        return await asyncio.to_thread(self._locked, self._set, folder, memory, fencing_token, event_id)

    async def delete(self, conversation_id: str) -> bool:
        folder = self.folder(conversation_id)
        return await asyncio.to_thread(self._locked, self._delete, folder)

    def _locked(self, fn: Any, *args: Any) -> Any:
        with self._lock:
            return fn(*args)

    def _read(self, folder: Path) -> tuple[dict[str, Any], int]:
        base, deltas = folder / "base.json", folder / "deltas.jsonl"
        lines = deltas.read_text(encoding="utf-8").splitlines() if deltas.exists() else []
        lines = [line for line in lines if line.strip()]
        if not base.exists():
            if lines:
                raise StateError(f"conversation folder {folder} has deltas but no base.json")
            return {}, 0
        memory = json.loads(base.read_text(encoding="utf-8"))
        for line in lines:
            apply_patch(memory, json.loads(line)["diff"])
        return memory, len(lines)

    def _get(self, folder: Path) -> dict[str, Any]:
        memory, count = self._read(folder)
        if count >= self.compact_after:
            self._write_base(folder, memory)
        return memory

    def _write_base(self, folder: Path, memory: dict[str, Any]) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        _write_json(folder / "base.json", memory)
        (folder / "deltas.jsonl").write_text("", encoding="utf-8")

    def _set(self, folder: Path, memory: dict[str, Any], token: int | None, event_id: str | None) -> bool:
        meta = self._load_meta(folder)
        check_token(token, meta.token, folder.name)
        if meta.seen(event_id):
            return False
        current, count = self._read(folder)
        if not (folder / "base.json").exists():
            self._write_base(folder, memory)
        else:
            diff = shallow_diff(current, memory)
            if not is_empty(diff):
                line = json.dumps({"timestamp": _iso_now(), "diff": diff}, ensure_ascii=False)
                with open(folder / "deltas.jsonl", "a", encoding="utf-8") as fh:
                    fh.write(line + "\n")
                count += 1
            if count >= self.compact_after:
                self._write_base(folder, memory)
        if event_id is not None or token is not None:
            meta.record(event_id, token)
            _write_json(folder / "meta.json", {"fencing_token": meta.token, "applied": list(meta.ids)})
        return True

    def _load_meta(self, folder: Path) -> _Dedupe:
        meta = _Dedupe(self._keep)
        path = folder / "meta.json"
        if path.exists():
            data = json.loads(path.read_text(encoding="utf-8"))
            meta.token = int(data.get("fencing_token") or 0)
            meta.ids = OrderedDict.fromkeys(data.get("applied") or [])
        return meta

    def _delete(self, folder: Path) -> bool:
        if not folder.exists():
            return False
        for name in ("base.json", "deltas.jsonl", "meta.json", "base.json.tmp", "meta.json.tmp"):
            (folder / name).unlink(missing_ok=True)
        try:
            folder.rmdir()
        except OSError:
            pass  # something else lives there: leave it
        return True


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _iso_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# KEYS[1] = snapshot hash (keys.conversation), KEYS[2] = delta list (keys.conversation_deltas),
# KEYS[3] = lock epoch (keys.conversation_lock_epoch), KEYS[4] = applied ids zset
#           (keys.conversation_applied)
# ARGV[1] = fencing token ('' = none), ARGV[2] = event id ('' = none), ARGV[3] = compact after N,
# ARGV[4] = applied ids to keep, ARGV[5] = delta (msgpack [{key: msgpack value}, [removed keys]],
#           '' = empty delta), ARGV[6] = idle TTL ms of the four keys ('0' = none)
# Snapshot fields: 'm:<key>' = msgpack value, '__epoch' = newest writer's token, '__seq' = count
# of applied event ids. A write (re)sets the idle TTL of all four keys (PEXPIRE of a missing
# key does nothing). Returns {1, n deltas} applied, {0, 0} duplicate event id,
# {-1, newest epoch} stale fencing token.
APPLY_DELTA = """
local function touch(result)
  local ttl = tonumber(ARGV[6])
  if ttl > 0 then
    for i = 1, 4 do redis.call('PEXPIRE', KEYS[i], ttl) end
  end
  return result
end
local token = tonumber(ARGV[1])
if token then
  local newest = tonumber(redis.call('GET', KEYS[3]) or '0')
  local written = tonumber(redis.call('HGET', KEYS[1], '__epoch') or '0')
  if written > newest then newest = written end
  if token < newest then return {-1, newest} end
end
if ARGV[2] ~= '' then
  if redis.call('ZSCORE', KEYS[4], ARGV[2]) then return {0, 0} end
  local seq = redis.call('HINCRBY', KEYS[1], '__seq', 1)
  redis.call('ZADD', KEYS[4], seq, ARGV[2])
  redis.call('ZREMRANGEBYRANK', KEYS[4], 0, -(tonumber(ARGV[4]) + 1))
end
if token then redis.call('HSET', KEYS[1], '__epoch', token) end
if ARGV[5] == '' then return touch({1, redis.call('LLEN', KEYS[2])}) end
local n = redis.call('RPUSH', KEYS[2], ARGV[5])
if n < tonumber(ARGV[3]) then return touch({1, n}) end
for _, raw in ipairs(redis.call('LRANGE', KEYS[2], 0, -1)) do
  local delta = cmsgpack.unpack(raw)
  for k, v in pairs(delta[1]) do redis.call('HSET', KEYS[1], 'm:' .. k, v) end
  for _, k in ipairs(delta[2]) do redis.call('HDEL', KEYS[1], 'm:' .. k) end
end
redis.call('DEL', KEYS[2])
return touch({1, 0})
"""

# APPLY_DELTA, then the conversation lock's release, in one step: a chatflow's last write.
# KEYS[1..4] and ARGV[1..6] as APPLY_DELTA; KEYS[5] = the lock key, ARGV[7] = the holder token.
# Deletes the lock while it holds ARGV[7] (whatever the write answered). Returns APPLY_DELTA's
# reply with a third element: 1 released, 0 the lock was not ours any more.
APPLY_AND_RELEASE = "local function apply()\n" + APPLY_DELTA + """
end
local r = apply()
r[3] = 0
if redis.call('GET', KEYS[5]) == ARGV[7] then
  redis.call('DEL', KEYS[5])
  r[3] = 1
end
return r
"""

_packb = msgpack.Packer(use_bin_type=True).pack
# the outer delta is read by Lua's cmsgpack, which knows no bin type: there, values travel as
# msgpack "raw" strings holding each value's own (bin-capable) msgpack encoding.
_pack_outer = msgpack.Packer(use_bin_type=False).pack


def _unpackb(raw: bytes) -> Any:
    return msgpack.unpackb(raw, raw=False, strict_map_key=False)


class RedisConversationStore(ConversationStore):
    """Snapshot hash ``keys.conversation(cid)`` + delta list ``keys.conversation_deltas(cid)``.

    Each write is one Lua script (:data:`APPLY_DELTA`) that checks the fencing token against
    the conversation lock's epoch, drops an already-applied event id, appends the delta and,
    every ``compact_after`` deltas, folds them into the snapshot, all atomically. A read is
    one MULTI (snapshot + deltas). In ``redis-cli``: ``HGETALL {tokiwa:conv:<id>}`` shows one
    ``m:<key>`` field per top-level memory key (msgpack values).

    Idle expiry: every write sets the TTL of the conversation's keys (snapshot, deltas,
    applied ids, lock epoch) to ``ttl_s`` (``Settings.conversation_ttl_s``, 30 days by default;
    0 = never), so a conversation nobody wrote to for that long is gone, memory included, and
    starts again from ``{}``. A read also sets the lock epoch's TTL, so the epoch of a run that
    took the lock and then wrote nothing (it lost the lock) expires too. Fencing stays safe
    when the epoch expires: the lock's acquire script seeds a new epoch from Redis's clock in
    ms (:data:`orchestrator.locks.ACQUIRE`), which is larger than any token handed out before
    (the old epoch started at the clock too, and would need more acquisitions than ms passed
    since, the idle TTL included, to catch up), so a holder whose lock expired long ago is
    still refused once someone else took the lock.
    """

    def __init__(self, redis: Any, keys: Keys, *, compact_after: int = 50,
                 dedupe_keep: int = DEFAULT_DEDUPE_KEEP, ttl_s: float = DEFAULT_TTL_S) -> None:
        if isinstance(ttl_s, bool) or not isinstance(ttl_s, (int, float)) or ttl_s < 0:
            raise InvalidArgumentError(f"ttl_s must be a number of seconds >= 0 (0 = never expire), got {ttl_s!r}")
        self.redis, self.keys = redis, keys
        self.compact_after = check_compact_after(compact_after)
        self.dedupe_keep = dedupe_keep
        self.ttl_s = ttl_s
        self._ttl_ms = max(1, int(ttl_s * 1000)) if ttl_s else 0
        self._apply = redis.register_script(APPLY_DELTA)
        self._apply_release = redis.register_script(APPLY_AND_RELEASE)

    #: ``apply_delta(..., release=(lock key, token))`` releases the conversation lock with the write
    releases_lock = True

    def _keys(self, cid: str) -> list[str]:
        k = self.keys
        return [k.conversation(cid), k.conversation_deltas(cid), k.conversation_lock_epoch(cid),
                k.conversation_applied(cid)]

    async def get(self, conversation_id: str) -> dict[str, Any]:
        cid = check_cid(conversation_id)
        async with self.redis.pipeline(transaction=True) as pipe:
            self.queue_get(pipe, cid)
            return self.memory_from(await pipe.execute())

    def queue_get(self, pipe: Any, conversation_id: str) -> None:
        """Queue the reads of :meth:`get` on ``pipe`` (a chatflow sends them with the lock's
        acquisition: one round trip); :meth:`memory_from` reads their replies."""
        cid = check_cid(conversation_id)
        pipe.hgetall(self.keys.conversation(cid))
        pipe.lrange(self.keys.conversation_deltas(cid), 0, -1)
        if self._ttl_ms:  # a chatflow reads right after taking the lock (see the class docstring)
            pipe.pexpire(self.keys.conversation_lock_epoch(cid), self._ttl_ms)

    @staticmethod
    def memory_from(replies: list[Any]) -> dict[str, Any]:
        """The memory from the replies of :meth:`queue_get`'s reads."""
        snapshot, deltas = replies[0], replies[1]
        memory: dict[str, Any] = {}
        for field, raw in snapshot.items():
            name = field.decode() if isinstance(field, bytes) else field
            if name.startswith("m:"):
                memory[name[2:]] = _unpackb(raw)
        for raw in deltas:
            sets, removes = msgpack.unpackb(raw, raw=True)
            apply_patch(memory, {"set": {k.decode(): _unpackb(v) for k, v in sets.items()},
                                 "remove": [k.decode() for k in removes]})
        return memory

    async def apply_delta(self, conversation_id: str, patch: Patch, *, event_id: str | None = None,
                          fencing_token: int | None = None, release: tuple[str, str] | None = None) -> bool:
        """Apply ``{"set": {...}, "remove": [...]}`` atomically; False for a duplicate event id,
        FencingError for a stale token. ``release`` = (lock key, holder token): release the
        conversation lock in the same step (a chatflow's last write: one round trip)."""
        cid = check_cid(conversation_id)
        sets = check_memory(dict(patch.get("set") or {}))
        removes = [str(k) for k in patch.get("remove") or ()]
        blob = b"" if not sets and not removes else _pack_outer(
            [{k: _packb(v) for k, v in sets.items()}, removes])
        args = ["" if fencing_token is None else int(fencing_token), event_id or "", self.compact_after,
                self.dedupe_keep, blob, self._ttl_ms]
        if release is None:
            status, value = await self._apply(keys=self._keys(cid), args=args)
        else:
            status, value, _ = await self._apply_release(keys=[*self._keys(cid), release[0]], args=[*args, release[1]])
        if int(status) == -1:
            check_token(fencing_token, int(value), cid)
        return int(status) == 1

    async def set(self, conversation_id: str, memory: dict[str, Any], *, fencing_token: int | None = None,
                  event_id: str | None = None) -> bool:
        memory = check_memory(memory)
        current = await self.get(conversation_id)
        return await self.apply_delta(conversation_id, shallow_diff(current, memory), event_id=event_id,
                                      fencing_token=fencing_token)

    async def delete(self, conversation_id: str) -> bool:
        cid = check_cid(conversation_id)
        k = self.keys
        return bool(await self.redis.delete(k.conversation(cid), k.conversation_deltas(cid),
                                            k.conversation_applied(cid)))
