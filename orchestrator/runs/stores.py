"""Run stores: where finished (and running) workflow runs are recorded, with their logs.

A run record is the plain dict of ``WorkflowRunResult.to_record()``: it has at least
``run_id`` and ``started_at`` (epoch seconds), and usually ``workflow_id``,
``workflow_name``, ``status``, ``finished_at``, ``duration_ms``, ``error``, node records...
Stores treat it as opaque data apart from those fields. Records never contain secrets:
the producer of a record redacts them (see :func:`orchestrator.declarative.templates.redact`).

Three implementations share one contract (and one test suite):

* :class:`InMemoryRunStore` - a dict; for tests and single-process runs.
* :class:`FileRunStore` - ``<dir>/<run_id>.json`` (2-space indent, trailing newline, the
  tokiwa format) and ``<dir>/<run_id>.logs.jsonl``.
* :class:`RedisRunStore` - hash ``{ns}:run:{run_id}`` + zset ``{ns}:runs``, with retention.

Live records: a worker records a run when it starts (status ``running``) and rewrites that
record as the run goes (see :class:`orchestrator.runs.recorder.LiveRuns`), through
:meth:`RunStore.save_live`: a conditional write that only the run's current writer wins.
Such records carry ``worker_id`` (the worker running it, the id of its heartbeat in
``{ns}:workers``), ``owner_token`` (one per execution of the run) and ``updated_at`` (epoch s of
the last write); :func:`is_stale` tells a ``running`` record left by a dead worker.

Time: ``started_at`` is wall-clock epoch seconds (it is shown to users and compared across
hosts), so pruning by age uses an injectable wall clock (``clock=time.time``).
"""

from __future__ import annotations

import asyncio
import builtins
import copy
import json
import logging
import os
import re
import time
from collections import deque
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, cast

import msgpack

from orchestrator.broker.batch import Batch
from orchestrator.errors import InvalidArgumentError
from orchestrator.faults import describe
from orchestrator.keys import Keys

log = logging.getLogger(__name__)

DEFAULT_MAX_LOG_LINES = 1000
DEFAULT_RETENTION_S = 7 * 86400
# runs the Redis index keeps (Settings.run_records_max); 0 or None = no count bound
DEFAULT_MAX_RECORDS = 100_000
# run ids removed per TRIM_RUNS call (3 keys each)
_TRIM_BATCH = 100
# run ids become file names and key parts: letters, digits, ``-``, ``_``, ``.`` (not leading).
_RUN_ID = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,199}$")


def check_run_id(run_id: Any) -> str:
    """Return ``run_id`` if it is a safe id, else raise InvalidArgumentError."""
    if not isinstance(run_id, str) or not _RUN_ID.match(run_id):
        raise InvalidArgumentError(
            f"invalid run_id {run_id!r}: use 1-200 letters, digits, '-', '_' or '.' (not leading '.')"
        )
    return run_id


def check_record(record: Any) -> dict[str, Any]:
    """Validate the fields every store relies on: ``run_id`` and numeric ``started_at``."""
    if not isinstance(record, dict):
        raise InvalidArgumentError(f"a run record must be a dict, got {type(record).__name__}")
    check_run_id(record.get("run_id"))
    started = record.get("started_at")
    if isinstance(started, bool) or not isinstance(started, (int, float)):
        raise InvalidArgumentError(
            f"run {record['run_id']}: started_at must be epoch seconds (a number), got {started!r}"
        )
    return record


def _check_count(name: str, value: Any, minimum: int) -> None:
    """``value`` must be None or an integer >= ``minimum`` (limit >= 1, tail and keep >= 0)."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < minimum):
        raise InvalidArgumentError(f"{name} must be an integer >= {minimum} or None, got {value!r}")


def _check_max_lines(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidArgumentError(f"max_log_lines must be an integer >= 1, got {value!r}")
    return value


def _check_prune(older_than_s: float | None, keep: int | None) -> None:
    if older_than_s is None and keep is None:
        raise InvalidArgumentError("prune needs older_than_s, keep, or both")
    if older_than_s is not None and (not isinstance(older_than_s, (int, float)) or older_than_s < 0):
        raise InvalidArgumentError(f"older_than_s must be >= 0, got {older_than_s!r}")
    _check_count("keep", keep, 0)


def matches(record: dict[str, Any], status: str | None, workflow: str | None) -> bool:
    """True if ``record`` has ``status`` and its workflow name or id equals ``workflow``."""
    if status is not None and record.get("status") != status:
        return False
    if workflow is not None and workflow not in (record.get("workflow_name"), record.get("workflow_id")):
        return False
    return True


#: a running record not rewritten for this long (a live run is rewritten at least every
#: :data:`orchestrator.runs.recorder.KEEPALIVE_S`) whose worker has no live heartbeat is stale
STALE_AFTER_S = 90.0


def is_stale(record: dict[str, Any], now: float, live_workers: Iterable[str] | None = None,
             after_s: float = STALE_AFTER_S) -> bool:
    """Whether ``record`` says ``running`` but nobody runs it any more: it was not rewritten
    for ``after_s`` seconds and (when ``live_workers``, the ids of the live heartbeats of
    ``{ns}:workers``, is given) its ``worker_id`` is not among them. A record without
    ``updated_at`` (written by a version without live records) counts from ``started_at``."""
    if record.get("status") != "running":
        return False
    seen = record.get("updated_at", record.get("started_at"))
    if isinstance(seen, (int, float)) and not isinstance(seen, bool) and now - seen <= after_s:
        return False
    return live_workers is None or record.get("worker_id") not in set(live_workers)


def live_write_allowed(stored: dict[str, Any] | None, record: dict[str, Any], claim: bool) -> bool:
    """The rule of :meth:`RunStore.save_live`: a claim (the run's first write on a worker) is
    refused only when the stored record is this execution's own final record; a progress write
    only lands on this execution's own ``running`` record."""
    mine = stored is not None and stored.get("owner_token") == record.get("owner_token")
    if claim:
        return not (mine and stored is not None and stored.get("status") != "running")
    return mine and stored is not None and stored.get("status") == "running"


def newest_first(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Sort by ``started_at`` descending; ties by run id so the order is stable."""
    return sorted(records, key=lambda r: (r["started_at"], r["run_id"]), reverse=True)


def select_pruned(
    index: list[tuple[str, float]], older_than_s: float | None, keep: int | None, now: float
) -> set[str]:
    """Run ids to prune from ``index`` = [(run_id, started_at)]: older than the cutoff, or
    beyond the ``keep`` newest."""
    doomed: set[str] = set()
    if older_than_s is not None:
        cutoff = now - older_than_s
        doomed.update(run_id for run_id, started in index if started < cutoff)
    if keep is not None:
        ordered = sorted(index, key=lambda item: (item[1], item[0]), reverse=True)
        doomed.update(run_id for run_id, _ in ordered[keep:])
    return doomed


def _json_default(value: Any) -> Any:
    """Non-JSON values (sets, bytes, dates, objects) are stored as their repr, like pyoco."""
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    return repr(value)


class RunStore:
    """Base class of run stores. Every method is a coroutine; subclasses implement all."""

    async def save(self, record: dict[str, Any]) -> None:
        """Insert or replace the record of ``record["run_id"]``."""
        raise NotImplementedError

    async def save_many(self, records: list[dict[str, Any]]) -> None:
        """Save several records; stores that can batch (Redis) override this."""
        for record in records:
            await self.save(record)

    async def get(self, run_id: str) -> dict[str, Any] | None:
        """The record of ``run_id``, or None when unknown (or expired)."""
        raise NotImplementedError

    async def save_live(self, items: builtins.list[tuple[dict[str, Any], bool]]) -> builtins.list[bool]:
        """Write records of running runs, each ``(record, claim)``, under the rule of
        :func:`live_write_allowed` (the record's ``owner_token`` against the stored one);
        returns, per item, whether it was written. Stores that can do it atomically (Redis)
        override this; the default reads, then saves (one process owns a memory or file store)."""
        written = []
        for record, claim in items:
            check_record(record)
            ok = live_write_allowed(await self.get(record["run_id"]), record, claim)
            if ok:
                await self.save(record)
            written.append(ok)
        return written

    async def list(
        self, *, status: str | None = None, workflow: str | None = None, limit: int | None = 50
    ) -> list[dict[str, Any]]:
        """Records newest start first, filtered by status and workflow (name or id)."""
        raise NotImplementedError

    async def prune(self, *, older_than_s: float | None = None, keep: int | None = None) -> int:
        """Delete runs started more than ``older_than_s`` ago and/or all but the ``keep``
        newest, with their logs. Returns how many runs were deleted."""
        raise NotImplementedError

    async def append_logs(self, run_id: str, lines: builtins.list[str]) -> None:
        """Append log lines to a run; only the newest ``max_log_lines`` are kept."""
        raise NotImplementedError

    async def get_logs(self, run_id: str, tail: int | None = None) -> builtins.list[str]:
        """A run's log lines, oldest first; ``tail`` = only the last N."""
        raise NotImplementedError

    async def close(self) -> None:
        """Release resources (no-op by default)."""


def _check_lines(lines: Any) -> list[str]:
    if isinstance(lines, str) or not isinstance(lines, (list, tuple)):
        raise InvalidArgumentError("log lines must be a list of strings")
    return [line if isinstance(line, str) else str(line) for line in lines]


def _tail(lines: list[str], tail: int | None) -> list[str]:
    if tail is None:
        return list(lines)
    return list(lines[-tail:]) if tail else []


class InMemoryRunStore(RunStore):
    """Records in a dict (deep copies in and out, so callers cannot change stored runs)."""

    def __init__(self, *, max_log_lines: int = DEFAULT_MAX_LOG_LINES, clock: Callable[[], float] = time.time):
        self.max_log_lines = _check_max_lines(max_log_lines)
        self._clock = clock
        self._records: dict[str, dict[str, Any]] = {}
        self._logs: dict[str, deque[str]] = {}

    async def save(self, record: dict[str, Any]) -> None:
        check_record(record)
        self._records[record["run_id"]] = copy.deepcopy(record)

    async def get(self, run_id: str) -> dict[str, Any] | None:
        found = self._records.get(check_run_id(run_id))
        return copy.deepcopy(found) if found is not None else None

    async def list(
        self, *, status: str | None = None, workflow: str | None = None, limit: int | None = 50
    ) -> builtins.list[dict[str, Any]]:
        _check_count("limit", limit, 1)
        chosen = [r for r in self._records.values() if matches(r, status, workflow)]
        return [copy.deepcopy(r) for r in newest_first(chosen)[:limit]]

    async def prune(self, *, older_than_s: float | None = None, keep: int | None = None) -> int:
        _check_prune(older_than_s, keep)
        index = [(rid, r["started_at"]) for rid, r in self._records.items()]
        doomed = select_pruned(index, older_than_s, keep, self._clock())
        for run_id in doomed:
            self._records.pop(run_id, None)
            self._logs.pop(run_id, None)
        return len(doomed)

    async def append_logs(self, run_id: str, lines: builtins.list[str]) -> None:
        check_run_id(run_id)
        buffer = self._logs.setdefault(run_id, deque(maxlen=self.max_log_lines))
        buffer.extend(_check_lines(lines))

    async def get_logs(self, run_id: str, tail: int | None = None) -> builtins.list[str]:
        _check_count("tail", tail, 0)
        return _tail(list(self._logs.get(check_run_id(run_id), ())), tail)


class FileRunStore(RunStore):
    """One pretty-printed JSON file per run, ``<dir>/<run_id>.json``, as tokiwa writes them.

    Logs go to ``<dir>/<run_id>.logs.jsonl`` (one JSON string per line, so a log line may
    itself contain newlines). Writes are atomic (temp file + rename); file I/O runs in a
    thread so the event loop never blocks on a slow disk.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str] = "runs",
        *,
        max_log_lines: int = DEFAULT_MAX_LOG_LINES,
        clock: Callable[[], float] = time.time,
    ):
        self.directory = Path(directory)
        self.max_log_lines = _check_max_lines(max_log_lines)
        self._clock = clock

    def _path(self, run_id: str) -> Path:
        return self.directory / f"{check_run_id(run_id)}.json"

    def _logs_path(self, run_id: str) -> Path:
        return self.directory / f"{check_run_id(run_id)}.logs.jsonl"

    def _write(self, path: Path, text: str) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)

    def _read(self, path: Path) -> dict[str, Any] | None:
        try:
            return cast("dict[str, Any] | None", json.loads(path.read_text(encoding="utf-8")))
        except FileNotFoundError:
            return None

    def _all(self) -> list[dict[str, Any]]:
        if not self.directory.is_dir():
            return []
        records = []
        for path in self.directory.glob("*.json"):
            try:
                record = check_record(self._read(path))
            except (InvalidArgumentError, ValueError):  # a foreign or corrupt file: not a run
                continue
            records.append(record)
        return records

    async def save(self, record: dict[str, Any]) -> None:
        check_record(record)
        text = json.dumps(record, indent=2, ensure_ascii=False, default=_json_default) + "\n"
        await asyncio.to_thread(self._write, self._path(record["run_id"]), text)

    async def get(self, run_id: str) -> dict[str, Any] | None:
        return await asyncio.to_thread(self._read, self._path(run_id))

    async def list(
        self, *, status: str | None = None, workflow: str | None = None, limit: int | None = 50
    ) -> builtins.list[dict[str, Any]]:
        _check_count("limit", limit, 1)
        records = await asyncio.to_thread(self._all)
        return newest_first(r for r in records if matches(r, status, workflow))[:limit]

    def _prune_sync(self, older_than_s: float | None, keep: int | None) -> int:
        index = [(r["run_id"], r["started_at"]) for r in self._all()]
        doomed = select_pruned(index, older_than_s, keep, self._clock())
        for run_id in doomed:
            self._path(run_id).unlink(missing_ok=True)
            self._logs_path(run_id).unlink(missing_ok=True)
        return len(doomed)

    async def prune(self, *, older_than_s: float | None = None, keep: int | None = None) -> int:
        _check_prune(older_than_s, keep)
        return await asyncio.to_thread(self._prune_sync, older_than_s, keep)

    def _read_logs(self, run_id: str) -> builtins.list[str]:
        try:
            text = self._logs_path(run_id).read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in text.splitlines() if line]

    def _append_sync(self, run_id: str, lines: builtins.list[str]) -> None:
        path = self._logs_path(run_id)
        self.directory.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as handle:
            handle.writelines(json.dumps(line, ensure_ascii=False) + "\n" for line in lines)
        # Trim lazily: rewrite only when the file holds twice the cap, so appends stay O(1)
        # amortised while readers still see at most ``max_log_lines`` (see get_logs).
        kept = self._read_logs(run_id)
        if len(kept) > 2 * self.max_log_lines:
            body = "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in kept[-self.max_log_lines :])
            self._write(path, body)

    async def append_logs(self, run_id: str, lines: builtins.list[str]) -> None:
        checked = _check_lines(lines)
        check_run_id(run_id)
        if checked:
            await asyncio.to_thread(self._append_sync, run_id, checked)

    async def get_logs(self, run_id: str, tail: int | None = None) -> builtins.list[str]:
        _check_count("tail", tail, 0)
        lines = await asyncio.to_thread(self._read_logs, check_run_id(run_id))
        return _tail(lines[-self.max_log_lines :], tail)


# Top-level record fields copied into their own hash field so that `redis-cli HGETALL`
# shows them; ``workflow_name`` is exposed as ``workflow``.
_SCALARS = (str, int, float, bool)


def _hash_fields(record: dict[str, Any]) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for name, value in record.items():
        if isinstance(value, bool):
            fields[name] = "true" if value else "false"
        elif isinstance(value, _SCALARS):
            fields[name] = value
    if "workflow_name" in record and record["workflow_name"] is not None:
        fields["workflow"] = str(record["workflow_name"])
    if record.get("error") is not None and not isinstance(record["error"], _SCALARS):
        fields["error"] = json.dumps(record["error"], ensure_ascii=False, default=_json_default)
    fields["record"] = msgpack.packb(record, default=_json_default, use_bin_type=True)
    return fields


# KEYS[1] = run hash, KEYS[2] = runs index zset, KEYS[3] = run logs list, KEYS[4] = run node
# checkpoints hash
# ARGV[1] = ttl s, ARGV[2] = started_at, ARGV[3] = run id, ARGV[4..] = hash field/value pairs
# Replaces the run hash (a re-save drops fields the new record lacks), indexes it, and sets
# the retention on the hash, its logs and its checkpoints. Returns 1.
SAVE_RUN = """
redis.call('DEL', KEYS[1])
local fields = {}
for i = 4, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', KEYS[1], unpack(fields))
redis.call('EXPIRE', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[3])
redis.call('EXPIRE', KEYS[3], ARGV[1])
redis.call('EXPIRE', KEYS[4], ARGV[1])
return 1
"""


# KEYS[1] = run hash, KEYS[2] = runs index zset, KEYS[3] = run logs list, KEYS[4] = run node
# checkpoints hash
# ARGV[1] = ttl s, ARGV[2] = started_at, ARGV[3] = run id, ARGV[4] = "1" for a claim, else
# "0", ARGV[5] = the writer's owner token, ARGV[6..] = hash field/value pairs
# SAVE_RUN under the rule of live_write_allowed (the hash's owner_token and status fields).
# Returns 1 if written, 0 if refused.
SAVE_LIVE = """
local got = redis.call('HMGET', KEYS[1], 'owner_token', 'status')
local mine = got[1] == ARGV[5]
if ARGV[4] == '1' then
  if mine and got[2] ~= 'running' then return 0 end
elseif not (mine and got[2] == 'running') then
  return 0
end
redis.call('DEL', KEYS[1])
local fields = {}
for i = 6, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', KEYS[1], unpack(fields))
redis.call('EXPIRE', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[3])
redis.call('EXPIRE', KEYS[3], ARGV[1])
redis.call('EXPIRE', KEYS[4], ARGV[1])
return 1
"""


# KEYS[1] = runs index zset, then three keys per run id i = 1..n: KEYS[3i-1] = run hash,
# KEYS[3i] = run logs list, KEYS[3i+1] = run node checkpoints hash
# ARGV[1..n] = the run ids (the oldest of the index)
# Deletes every one of those runs that is not running (its hash's status field), with its logs
# and checkpoints, and removes it from the index; a run whose hash already expired only leaves
# the index. A running run is left alone. Returns how many runs were removed.
TRIM_RUNS = """
local removed = 0
for i = 1, #ARGV do
  local hash = KEYS[3 * i - 1]
  if redis.call('HGET', hash, 'status') ~= 'running' then
    redis.call('DEL', hash, KEYS[3 * i], KEYS[3 * i + 1])
    redis.call('ZREM', KEYS[1], ARGV[i])
    removed = removed + 1
  end
end
return removed
"""


class RedisRunStore(RunStore):
    """Runs in Redis, readable with ``redis-cli``:

    * ``HGETALL {ns}:run:{run_id}`` - status, workflow, workflow_id, started_at, finished_at,
      duration_ms, error (JSON text) ... plus ``record``, the msgpack of the whole record;
    * ``ZREVRANGE {ns}:runs 0 9 WITHSCORES`` - the ten newest run ids by start time;
    * ``LRANGE {ns}:run:{run_id}:logs -20 -1`` - the last 20 log lines.

    Bounded by age and by count. Each run, its logs and its node checkpoints expire
    ``retention_s`` after their last write (``Settings.run_retention_s``, 7 days), and every
    save drops index entries older than that. The index keeps at most ``max_records`` runs
    (``Settings.run_records_max``, 100 000; 0 or None = no count bound): every save also reads
    the index's size (ZCARD, in the same round trip), and a save that finds it more than 1%
    past the cap removes the oldest starts down to the cap, hash, logs and checkpoints with
    them (:data:`TRIM_RUNS`, 100 runs per call), so the cost is amortized: about one batch per
    1% of the cap saved, never a scan of the index. A ``running`` run is never removed by
    count (a live record must stay its writer's); it still expires by age. One ``save`` is
    one round trip (a MULTI/EXEC pipeline), plus the trim when one is due.
    """

    _PAGE = 200

    def __init__(
        self,
        redis_client: Any,
        keys: Keys | None = None,
        *,
        retention_s: float = DEFAULT_RETENTION_S,
        max_log_lines: int = DEFAULT_MAX_LOG_LINES,
        max_records: int | None = DEFAULT_MAX_RECORDS,
        clock: Callable[[], float] = time.time,
    ):
        if retention_s <= 0:
            raise InvalidArgumentError(f"retention_s must be > 0, got {retention_s!r}")
        _check_count("max_records", max_records, 0)
        pool = getattr(redis_client, "connection_pool", None)
        if getattr(pool, "connection_kwargs", {}).get("decode_responses"):
            raise InvalidArgumentError("RedisRunStore needs a client with decode_responses=False "
                                       "(records are msgpack bytes)")
        self.redis = redis_client
        self.keys = keys or Keys()
        self._save_script: Any = None
        self._live_script: Any = None
        self.retention_s = retention_s
        self.max_log_lines = _check_max_lines(max_log_lines)
        self.max_records = max_records or None
        #: how far past ``max_records`` the index may grow before a save trims it (1%)
        self.trim_slack = max(1, (max_records or 0) // 100)
        self._trim_script: Any = None
        self._trimming = False
        self._saves = 0
        self._next_trim_at = 0  # after a trim that had to skip running runs: wait a slack of saves
        self._clock = clock

    @property
    def _ttl_s(self) -> int:
        return max(1, int(self.retention_s))

    async def save(self, record: dict[str, Any]) -> None:
        check_record(record)
        run_id = record["run_id"]
        key = self.keys.run(run_id)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(key)  # a re-save must not keep fields the new record dropped
            pipe.hset(key, mapping=_hash_fields(record))
            pipe.expire(key, self._ttl_s)
            # trim first, then add: a run saved now stays listed even if it started long ago
            pipe.zremrangebyscore(self.keys.runs, "-inf", f"({self._clock() - self.retention_s}")
            pipe.zadd(self.keys.runs, {run_id: float(record["started_at"])})
            pipe.expire(self.keys.run_logs(run_id), self._ttl_s)
            pipe.expire(self.keys.run_nodes(run_id), self._ttl_s)
            pipe.zcard(self.keys.runs)
            replies = await pipe.execute()
        await self._bound(replies[-1], 1)

    async def save_many(self, records: list[dict[str, Any]]) -> None:
        """Save several records in one round trip (the worker group-commits concurrent runs):
        one SAVE_RUN script call per record, so the client packs one command, not five."""
        if not records:
            return
        for record in records:
            check_record(record)
        if self._save_script is None:
            self._save_script = self.redis.register_script(SAVE_RUN)
        batch = Batch(self.redis)  # one pipeline on one Redis, one per master on a cluster
        batch.command("zremrangebyscore", self.keys.runs, "-inf", f"({self._clock() - self.retention_s}")
        for record in records:
            run_id = record["run_id"]
            args: list[Any] = [self._ttl_s, float(record["started_at"]), run_id]
            for name, value in _hash_fields(record).items():
                args += [name, value]
            batch.script(self._save_script, keys=[self.keys.run(run_id), self.keys.runs, self.keys.run_logs(run_id),
                                                  self.keys.run_nodes(run_id)], args=args)
        batch.command("zcard", self.keys.runs)
        replies = await batch.execute()
        await self._bound(replies[-1], len(records))

    async def save_live(self, items: builtins.list[tuple[dict[str, Any], bool]]) -> builtins.list[bool]:
        """Conditional writes of running records (see :meth:`RunStore.save_live`), atomic per
        record (the SAVE_LIVE script), all in one round trip."""
        if not items:
            return []
        for record, _ in items:
            check_record(record)
        if self._live_script is None:
            self._live_script = self.redis.register_script(SAVE_LIVE)
        batch = Batch(self.redis)
        for record, claim in items:
            run_id = record["run_id"]
            args: list[Any] = [self._ttl_s, float(record["started_at"]), run_id, "1" if claim else "0",
                               str(record.get("owner_token") or "")]
            for name, value in _hash_fields(record).items():
                args += [name, value]
            batch.script(self._live_script, keys=[self.keys.run(run_id), self.keys.runs, self.keys.run_logs(run_id),
                                                  self.keys.run_nodes(run_id)], args=args)
        batch.command("zcard", self.keys.runs)
        *replies, size = await batch.execute()
        await self._bound(size, len(items))
        return [bool(int(r)) for r in replies]

    async def _bound(self, size: Any, saved: int) -> None:
        """After ``saved`` saves that found ``size`` runs in the index: trim it to
        ``max_records`` when it is more than ``trim_slack`` past (see the class docstring).
        A failed trim is logged and tried again by a later save; the saves stand."""
        self._saves += saved
        if (self.max_records is None or int(size) <= self.max_records + self.trim_slack
                or self._trimming or self._saves < self._next_trim_at):
            return
        self._trimming = True
        try:
            excess = int(size) - self.max_records
            removed = await self._trim(excess)
            # the oldest were running: look again only after another slack of saves
            self._next_trim_at = self._saves + self.trim_slack if removed < excess else 0
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("trimming the run index %s to %d runs failed (a later save tries again): %s",
                        self.keys.runs, self.max_records, describe(exc))
        finally:
            self._trimming = False

    async def _trim(self, count: int) -> int:
        """Remove the ``count`` oldest runs of the index (but running ones); returns how many went."""
        if self._trim_script is None:
            self._trim_script = self.redis.register_script(TRIM_RUNS)
        ids = [_text(x) for x in await self.redis.zrange(self.keys.runs, 0, count - 1)]
        removed = 0
        for start in range(0, len(ids), _TRIM_BATCH):
            batch = ids[start:start + _TRIM_BATCH]
            keys = [self.keys.runs]
            for run_id in batch:
                keys += [self.keys.run(run_id), self.keys.run_logs(run_id), self.keys.run_nodes(run_id)]
            removed += int(await self._trim_script(keys=keys, args=batch))
        return removed

    async def get(self, run_id: str) -> dict[str, Any] | None:
        raw = await self.redis.hget(self.keys.run(check_run_id(run_id)), "record")
        return None if raw is None else msgpack.unpackb(raw, raw=False)

    async def _fetch(self, run_ids: list[str]) -> list[tuple[str, dict[str, Any] | None]]:
        async with self.redis.pipeline(transaction=False) as pipe:
            for run_id in run_ids:
                pipe.hget(self.keys.run(run_id), "record")
            raws = await pipe.execute()
        return [(rid, None if raw is None else msgpack.unpackb(raw, raw=False)) for rid, raw in zip(run_ids, raws, strict=True)]

    async def list(
        self, *, status: str | None = None, workflow: str | None = None, limit: int | None = 50
    ) -> builtins.list[dict[str, Any]]:
        _check_count("limit", limit, 1)
        found: list[dict[str, Any]] = []
        dangling: list[str] = []
        start = 0
        while limit is None or len(found) < limit:
            ids = [_text(x) for x in await self.redis.zrevrange(self.keys.runs, start, start + self._PAGE - 1)]
            if not ids:
                break
            for run_id, record in await self._fetch(ids):
                if record is None:
                    dangling.append(run_id)
                elif matches(record, status, workflow):
                    found.append(record)
            start += self._PAGE
        if dangling:  # runs whose hash expired: drop them from the index
            await self.redis.zrem(self.keys.runs, *dangling)
        return found[:limit]

    async def prune(self, *, older_than_s: float | None = None, keep: int | None = None) -> int:
        _check_prune(older_than_s, keep)
        entries = await self.redis.zrange(self.keys.runs, 0, -1, withscores=True)
        index = [(_text(member), float(score)) for member, score in entries]
        doomed = sorted(select_pruned(index, older_than_s, keep, self._clock()))
        if not doomed:
            return 0
        async with self.redis.pipeline(transaction=True) as pipe:
            for run_id in doomed:
                pipe.delete(self.keys.run(run_id), self.keys.run_logs(run_id), self.keys.run_nodes(run_id))
            pipe.zrem(self.keys.runs, *doomed)
            await pipe.execute()
        return len(doomed)

    async def append_logs(self, run_id: str, lines: builtins.list[str]) -> None:
        checked = _check_lines(lines)
        key = self.keys.run_logs(check_run_id(run_id))
        if not checked:
            return
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.rpush(key, *checked)
            pipe.ltrim(key, -self.max_log_lines, -1)
            pipe.expire(key, self._ttl_s)
            await pipe.execute()

    async def get_logs(self, run_id: str, tail: int | None = None) -> builtins.list[str]:
        _check_count("tail", tail, 0)
        if tail == 0:
            return []
        start = 0 if tail is None else -tail
        raw = await self.redis.lrange(self.keys.run_logs(check_run_id(run_id)), start, -1)
        return [_text(x) for x in raw]


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, (bytes, bytearray)) else str(value)
