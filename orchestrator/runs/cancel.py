"""Cancelling a run by id from any host.

A cancel request is a Redis string ``{ns}:cancel:{run_id}`` holding msgpack ``{by, at,
reason}`` (``at`` in epoch seconds) that lives a day, plus the run id in the zset
``{ns}:cancels`` (score ``at``), pruned of requests older than a day by whoever writes one.
Three things read it:

* :func:`cancel_run` (``Orchestrator.cancel_run``, ``POST /runs/{id}/cancel``,
  ``tokiwa-producer cancel``) writes it, and cancels the run at once if it runs in the
  calling process;
* a worker about to start a run asks :func:`cancel_request` and, if there is one, records
  :func:`cancelled_result` instead of running it;
* :class:`CancelWatcher`, in every worker, reads the requests of the runs running there
  (one MGET per tick, none while nothing runs) and cancels those runs through the runner:
  the run's signal is set, its node tasks are cancelled, and it ends ``cancelled`` with
  ``cancelled_by`` / ``cancelled_at`` in its record.

Writing a request is idempotent (SET and ZADD), so a resend by redis-py after a timeout
does no harm. The request stays after the run ended, so an event redelivered with the same
deterministic run id is recorded ``cancelled`` again rather than run.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import msgpack

from orchestrator import faults
from orchestrator.errors import InvalidArgumentError, WorkflowAborted, describe_error
from orchestrator.faults import RestartBudget
from orchestrator.keys import Keys
from orchestrator.locks import cancel_and_wait
from orchestrator.runs.stores import RunStore, check_run_id
from orchestrator.workflow.model import Workflow
from orchestrator.workflow.result import (
    FINISHED_STATUSES,
    NodeResult,
    NodeStatus,
    RunStatus,
    WorkflowRunResult,
)

if TYPE_CHECKING:
    from orchestrator.workflow.runner import Runner

__all__ = ["CANCEL_TTL_S", "CancelHost", "CancelWatcher", "WatchHost", "cancel_reason", "cancel_request",
           "cancel_run", "cancelled_result", "decode_request", "write_request"]

log = logging.getLogger("tokiwa.cancel")

CANCEL_TTL_S = 86400  # a cancel request (and its zset entry) lives a day
DEFAULT_INTERVAL_S = 0.2  # how often the watcher looks for requests while runs are running
RECONNECT_BASE_S, RECONNECT_CAP_S = 0.1, 5.0
FINISHED = FINISHED_STATUSES
UNKNOWN_BY = "unknown"


class CancelHost(Protocol):
    """What :func:`cancel_run` uses of the app: Redis and its key names, the run store (is the
    run finished?) and the runner of this process (None in a process that runs nothing, such
    as the producer CLI)."""

    @property
    def redis(self) -> Any: ...  # the async Redis client
    @property
    def keys(self) -> Keys: ...
    @property
    def run_store(self) -> RunStore: ...
    @property
    def runner(self) -> Runner | None: ...


class WatchHost(Protocol):
    """What :class:`CancelWatcher` reads of the app, at each tick: Redis (None until the app
    connects), key names, and the runner whose runs it watches."""

    @property
    def redis(self) -> Any: ...
    @property
    def keys(self) -> Keys: ...
    @property
    def runner(self) -> Runner: ...


# -- the request ------------------------------------------------------------------------------
def decode_request(raw: bytes) -> dict[str, Any]:
    """A stored request as ``{by, at, reason}``. A value that is not a msgpack map still means
    that someone asked for the cancel: it reads as a request by ``unknown``."""
    try:
        value = msgpack.unpackb(raw, raw=False)
    except Exception:  # msgpack raises several unrelated types on garbage
        value = None
    if not isinstance(value, dict):
        return {"by": UNKNOWN_BY, "at": None, "reason": "undecodable cancel request"}
    at, reason = value.get("at"), value.get("reason")
    return {"by": str(value.get("by") or UNKNOWN_BY),
            "at": float(at) if isinstance(at, (int, float)) and not isinstance(at, bool) else None,
            "reason": reason if isinstance(reason, str) and reason else None}


def cancel_reason(request: dict[str, Any]) -> str:
    """``cancelled by X`` or ``cancelled by X: reason`` (the run's error message carries it)."""
    by = request.get("by") or UNKNOWN_BY
    reason = request.get("reason")
    return f"cancelled by {by}: {reason}" if reason else f"cancelled by {by}"


async def write_request(redis: Any, keys: Keys, run_id: str, *, by: str, at: float, reason: str | None) -> None:
    """Store the request for ``run_id`` and index it; prune the index of requests older than
    their lifetime. One round trip; every command is idempotent."""
    blob = msgpack.packb({"by": by, "at": at, "reason": reason}, use_bin_type=True)
    async with redis.pipeline(transaction=True) as pipe:
        pipe.set(keys.cancel(run_id), blob, ex=CANCEL_TTL_S)
        pipe.zadd(keys.cancels, {run_id: at})
        pipe.zremrangebyscore(keys.cancels, "-inf", f"({at - CANCEL_TTL_S}")
        await pipe.execute()


async def cancel_request(redis: Any, keys: Keys, run_id: str) -> dict[str, Any] | None:
    """The cancel request of ``run_id`` (``{by, at, reason}``), or None when there is none."""
    raw = await redis.get(keys.cancel(run_id))
    return None if raw is None else decode_request(raw)


async def cancel_run(host: CancelHost, run_id: str, *, by: str, reason: str | None = None) -> dict[str, Any]:
    """Ask for ``run_id`` to be cancelled, wherever it runs or will run.

    A run whose record says it finished is left alone: ``{run_id, status, cancelled: False,
    reason: "already finished"}``. Otherwise the request is written, the run is cancelled at
    once if it runs in this process, and the answer is ``{run_id, cancelled: True, status,
    by, at}`` where ``status`` is ``cancelling`` (it runs here, or its record says running),
    ``queued`` (it has a record that is neither running nor finished) or ``unknown`` (no
    record yet: it may be queued, running on a worker that records at the end, or not exist;
    a worker that starts it later records it ``cancelled``)."""
    check_run_id(run_id)
    if not isinstance(by, str) or not by.strip():
        raise InvalidArgumentError(f"by must name who cancels the run, got {by!r}")
    if reason is not None and not isinstance(reason, str):
        raise InvalidArgumentError(f"reason must be a string or None, got {type(reason).__name__}")
    record = await host.run_store.get(run_id)
    status = None if record is None else record.get("status")
    if status in FINISHED:
        return {"run_id": run_id, "status": str(status), "cancelled": False, "reason": "already finished"}
    at = time.time()
    await write_request(host.redis, host.keys, run_id, by=by, at=at, reason=reason or None)
    runner = host.runner
    request = {"by": by, "at": at, "reason": reason or None}
    here = runner is not None and runner.cancel(run_id, cancel_reason(request), by=by, at=at)
    if here or status == RunStatus.RUNNING:
        state = "cancelling"
    elif record is not None:
        state = "queued"
    else:
        state = "unknown"
    log.info("cancel of run %s requested by %s (%s)", run_id, by, "here" if here else state)
    return {"run_id": run_id, "cancelled": True, "status": state, "by": by, "at": at}


def cancelled_result(workflow: Any, run_id: str, request: dict[str, Any], *,
                     conversation_id: str | None = None) -> WorkflowRunResult:
    """The result of a run cancelled before it started: status ``cancelled``, every node
    ``cancelled`` without an attempt, ``error`` saying who cancelled it before it started,
    ``cancelled_by`` / ``cancelled_at`` from ``request``, started and finished now.
    ``workflow`` is a :class:`Workflow` or a pyoco ``Flow``."""
    wf = workflow if isinstance(workflow, Workflow) else getattr(workflow, "to_workflow", lambda: None)()
    if not isinstance(wf, Workflow):
        raise InvalidArgumentError(f"cancelled_result expects a Workflow, got {type(workflow).__name__}")
    graph = wf.validate()
    by = str(request.get("by") or UNKNOWN_BY)
    why = request.get("reason")
    aborted = WorkflowAborted(f"workflow {wf.name!r}: cancelled by {by} before it started"
                              + (f": {why}" if why else ""))
    error = describe_error(aborted)
    now = time.time()
    result = WorkflowRunResult(
        run_id=run_id, workflow_id=wf.id, workflow_name=wf.name, workflow_type=wf.type,
        status=RunStatus.CANCELLED, started_at=now, finished_at=now, duration_ms=0.0,
        conversation_id=conversation_id, error=error, cancelled_by=by, cancelled_at=request.get("at"),
        exception=aborted)
    result.nodes = {n.name: NodeResult(node_id=n.id, name=n.name, status=NodeStatus.CANCELLED, error=dict(error),
                                       finished_at=now, exception=aborted) for n in graph.nodes}
    result.timeline = [{"type": "run_start", "timestamp": now},
                       {"type": "run_complete", "timestamp": now, "status": RunStatus.CANCELLED,
                        "duration_ms": 0.0}]
    return result


# -- the watcher ------------------------------------------------------------------------------
class CancelWatcher:
    """Cancels the runs of this process that someone asked to cancel.

    A lifecycle component (``await start()``, ``await stop()``, both idempotent). While the
    runner has runs, every ``interval_s`` it reads their requests in one MGET and cancels each
    run that has one; while nothing runs it makes no Redis call.

    Faults follow :mod:`orchestrator.faults`: a transient one (Redis unreachable, full,
    failing over) is reported once per episode and waited out with backoff; anything else is
    logged with its traceback and the loop restarts, and after more than :data:`~orchestrator.faults.MAX_RESTARTS`
    such failures within a minute (or at once on a fatal Redis reply: ACL,
    wrong type) the watcher stops with the error in :attr:`failed` and calls ``on_failure``.

    Counters: :attr:`cancelled` (runs cancelled), :attr:`restarts`, :attr:`reads` (MGETs)."""

    #: the backoff after a failure: min(cap, base * 2**n) seconds with full jitter
    backoff_base_s, backoff_cap_s = RECONNECT_BASE_S, RECONNECT_CAP_S

    def __init__(self, host: WatchHost, *, interval_s: float = DEFAULT_INTERVAL_S,
                 on_failure: Callable[[BaseException], Any] | None = None) -> None:
        if isinstance(interval_s, bool) or not isinstance(interval_s, (int, float)) or interval_s <= 0:
            raise InvalidArgumentError(f"interval_s must be a positive number of seconds, got {interval_s!r}")
        self.host = host
        self.interval_s = float(interval_s)
        self.on_failure = on_failure
        self.failed: BaseException | None = None
        self.cancelled = 0
        self.restarts = 0
        self.reads = 0
        self._done: set[str] = set()  # runs already cancelled (not read again while they unwind)
        self._budget = RestartBudget("cancel watcher")
        self._task: asyncio.Task[None] | None = None

    @classmethod
    def for_app(cls, app: WatchHost, **options: Any) -> CancelWatcher:
        """A watcher of ``app``'s runner (an :class:`~orchestrator.Orchestrator`), reading its
        Redis client and key names at each tick (so it may be built before ``connect()``)."""
        return cls(app, **options)

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def start(self) -> None:
        if self.running:
            return
        self.failed = None
        self._budget.reset()
        self._task = asyncio.create_task(self._supervised(), name="tokiwa-cancel-watcher")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            await cancel_and_wait(task)

    async def wait(self) -> None:
        """Until the watcher ends (it ends by itself only when it has failed)."""
        if self._task is not None:
            await asyncio.wait({self._task})

    async def check(self) -> int:
        """One tick: cancel the running runs that have a request; returns how many."""
        runner = self.host.runner
        ids = runner.active_runs
        self._done.intersection_update(ids)
        ids = [run_id for run_id in ids if run_id not in self._done]
        redis = self.host.redis
        if not ids or redis is None:
            return 0
        keys = self.host.keys
        self.reads += 1
        raws = await redis.mget([keys.cancel(run_id) for run_id in ids])
        count = 0
        for run_id, raw in zip(ids, raws, strict=True):
            if raw is None:
                continue
            request = decode_request(raw)
            if runner.cancel(run_id, cancel_reason(request), by=request["by"], at=request["at"]):
                self._done.add(run_id)
                self.cancelled += 1
                count += 1
                log.info("run %s: %s", run_id, cancel_reason(request))
        return count

    async def _supervised(self) -> None:
        backoff = faults.Backoff(self.backoff_base_s, self.backoff_cap_s)
        while True:
            try:
                await self._loop(backoff)
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not self._fail(exc):
                    return
                await backoff.sleep()

    async def _loop(self, backoff: faults.Backoff) -> None:
        met: set[faults.Fault] = set()
        while True:
            try:
                await self.check()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                fault = faults.classify(exc)
                if fault not in faults.TRANSIENT:
                    raise
                faults.report(exc)
                met.add(fault)
                await backoff.sleep()
                continue
            if met:
                faults.recovered(*met)
                met.clear()
                backoff.reset()
            await asyncio.sleep(self.interval_s)

    def _fail(self, exc: BaseException) -> bool:
        """A non-transient failure: log it; False (and ``failed`` set) when the watcher must
        stop."""
        if not self._budget.spend(exc):
            self.failed = exc
            if self.on_failure is not None:
                try:
                    self.on_failure(exc)
                except Exception:
                    log.exception("the cancel watcher's on_failure callback failed")
            return False
        self.restarts += 1
        return True
