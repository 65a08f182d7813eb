"""Saving run records: live records while a run runs, and the final record, a group commit
that checks, first, that the run's event is still ours.

A worker frozen past its lease loses its stream entry to another worker, which runs the event
again; the late run of the first worker must not be recorded over the new one. So before a
run record is saved, the recorder asks whether this worker still holds the run's event (the
consumer's ownership rule, given as ``owned``), for every record that queued up meanwhile at
once, and saves the owned ones in one ``save_many``.

While a run runs, :class:`LiveRuns` keeps its record current: a ``running`` record when it
starts, then the nodes' statuses and attempts as they change. Node hooks only mark the run
dirty; one background writer per process writes what is due, all runs in one
``RunStore.save_live`` round trip, at most once per :data:`INTERVAL_S` per run (plus a
keepalive every :data:`KEEPALIVE_S` while nothing changes, so ``updated_at`` tells a live run
from one whose worker died). A run never waits for these writes. Each execution of a run
writes under its own ``owner_token``: once another execution has claimed the record (the
event was reclaimed elsewhere), this one's progress writes are refused and it stops writing
(after asking the ownership rule whether the entry is still ours, in which case it claims the
record again). A Redis fault in the writer is logged once per episode
(:mod:`orchestrator.faults`) and never fails a run.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from orchestrator import faults
from orchestrator.broker.groups import entry_of
from orchestrator.callbacks import call_and_await
from orchestrator.events import Event
from orchestrator.workflow.hooks import WorkflowHooks
from orchestrator.workflow.result import RunStatus, WorkflowRunResult

if TYPE_CHECKING:
    from orchestrator.config import Settings
    from orchestrator.runs.stores import RunStore

log = logging.getLogger("tokiwa.workflows")

#: ``fn(exc, info)``; may return an awaitable
ErrorHook = Callable[[Exception, dict[str, Any]], Any]
#: the (group, stream id) pairs of the given events whose entries this worker still holds
OwnedFn = Callable[[Sequence[Event]], Awaitable[set[tuple[str | None, int, str]]]]
#: the live result of a run running here (``Runner.result_of``), None if it is not running
ResultOf = Callable[[str], "WorkflowRunResult | None"]

INTERVAL_S = 0.25  # a run's record is rewritten at most this often while it runs
KEEPALIVE_S = 30.0  # ... and at least this often (``updated_at`` of a live run stays fresh)
CLOSE_WAIT_S = 2.0  # a run that ends waits this long at most for its progress write in flight


class RunHooks(Protocol):
    """The app's hooks that the runs part calls (``orchestrator.app.AppHooks`` has them)."""

    #: ``fn(exc, {"workflow_id", "event", "trigger"})``: a triggered workflow could not run
    on_workflow_error: ErrorHook | None
    #: ``fn(exc, record)``: the run store could not save ``record`` (the event is acked anyway)
    on_run_store_error: ErrorHook | None


class RecorderHost(Protocol):
    """What the recorder reads of the app, at each use: ``configure()`` replaces the
    settings and ``connect()`` the default run store."""

    @property
    def settings(self) -> Settings: ...
    @property
    def run_store(self) -> RunStore: ...
    @property
    def hooks(self) -> RunHooks: ...


async def call_hook(hook: ErrorHook, name: str, exc: Exception, info: dict[str, Any]) -> None:
    """Call a user hook (sync or async); a failing hook is logged, never raised."""
    try:
        await call_and_await(hook, exc, info)
    except Exception:
        log.exception("%s hook failed", name)


class LiveRun(WorkflowHooks):
    """The live record of one execution of a run: per-run Runner hooks that mark the run for
    a write (they do no I/O). ``final`` is the settled result the runner reported (also for
    a run whose caller was cancelled)."""

    def __init__(self, runs: LiveRuns, run_id: str, event: Event | None) -> None:
        self.runs, self.run_id, self.event = runs, run_id, event
        self.owner_token = uuid.uuid4().hex
        self.result: WorkflowRunResult | None = None
        self.final: WorkflowRunResult | None = None
        self.claimed = False  # a write of ours landed: the next one is a progress write
        self.due: float | None = None  # monotonic time of the next write, None = none planned
        self.last = -math.inf  # monotonic time of the last write
        self.stopped = False
        self.writes = 0

    def fields(self) -> dict[str, Any]:
        """What every record of this execution carries besides the result's own fields."""
        return {"worker_id": self.runs.worker_id(), "owner_token": self.owner_token, "updated_at": time.time()}

    def on_run_start(self, workflow: Any, run_id: str) -> None:
        self.result = self.runs.result_of(run_id)
        self.runs.schedule(self, at_once=True)

    def on_node_start(self, node: Any, ctx: Any) -> None:
        self.runs.schedule(self)

    def on_node_complete(self, node: Any, ctx: Any, output: Any) -> None:
        self.runs.schedule(self)

    def on_node_error(self, node: Any, ctx: Any, error: BaseException) -> None:
        self.runs.node_errors += 1
        self.runs.schedule(self)

    def on_node_retry(self, node: Any, ctx: Any, error: BaseException, attempt: int, delay_s: float) -> None:
        self.runs.schedule(self)

    def on_run_complete(self, result: Any) -> None:
        self.final = result
        self.runs.drop(self)


class LiveRuns:
    """The live records of the runs of one process, and their one background writer.

    Bounded: per run one claim write at its start, then at most one write per
    ``interval_s`` while its nodes change state, and one per ``keepalive_s`` while they do
    not; the final record is the :class:`RunRecorder`'s. Counters: ``writes`` (landed),
    ``refused`` (another execution owns the record), ``failures`` (the store failed),
    ``node_errors`` (node failures seen, after their retries)."""

    def __init__(self, host: RecorderHost, owned: OwnedFn, result_of: ResultOf, *,
                 interval_s: float = INTERVAL_S, keepalive_s: float = KEEPALIVE_S) -> None:
        self.host, self.owned, self.result_of = host, owned, result_of
        self.interval_s, self.keepalive_s = interval_s, keepalive_s
        self._runs: dict[str, LiveRun] = {}  # run id -> its live run, while a write is planned
        self._task: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._next = math.inf  # when the writer wakes up by itself
        self._inflight: tuple[frozenset[str], asyncio.Future[None]] | None = None
        self._backoff = faults.Backoff(base_s=interval_s, cap_s=5.0, floor_s=interval_s)
        self._met: set[faults.Fault] = set()
        self._broken = faults.Condition(log, "run progress writes failing")
        self.writes = self.refused = self.failures = self.node_errors = 0

    def worker_id(self) -> str | None:
        wid = getattr(self.host, "worker_id", None)
        return wid if isinstance(wid, str) else None

    def begin(self, run_id: str, event: Event | None) -> LiveRun:
        """The hooks of one execution of ``run_id`` (give them to ``Runner.run(hooks=...)``)."""
        return LiveRun(self, run_id, event)

    @property
    def live(self) -> int:
        """Runs whose record this writer keeps current."""
        return len(self._runs)

    # -- called from the run's hooks: no I/O ------------------------------------------------
    def schedule(self, run: LiveRun, *, at_once: bool = False) -> None:
        if run.stopped or run.result is None:
            return
        now = time.monotonic()
        target = now if at_once else max(now, run.last + self.interval_s)
        if run.due is not None and run.due <= target:
            return
        run.due = target
        self._runs[run.run_id] = run
        if self._task is None:
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._writer(), name="tokiwa-live-runs")
        elif target < self._next and self._wake is not None:
            self._wake.set()

    def drop(self, run: LiveRun) -> None:
        """No more writes for ``run`` (its final record follows)."""
        run.stopped = True
        run.due = None
        if self._runs.get(run.run_id) is run:
            del self._runs[run.run_id]

    async def close(self, run: LiveRun) -> None:
        """Stop ``run``'s writes and wait (at most :data:`CLOSE_WAIT_S`) for one in flight, so
        that no progress write can land after the final record."""
        self.drop(run)
        inflight = self._inflight
        if inflight is not None and run.run_id in inflight[0] and not inflight[1].done():
            await asyncio.wait({inflight[1]}, timeout=CLOSE_WAIT_S)

    # -- the writer -------------------------------------------------------------------------
    async def _writer(self) -> None:
        wake = self._wake
        assert wake is not None
        while True:
            if not self._runs:
                self._task, self._wake, self._next = None, None, math.inf
                return
            now = time.monotonic()
            soonest = min((r.due for r in self._runs.values() if r.due is not None), default=None)
            if soonest is None:  # nothing planned (cannot happen: a planned run has a due time)
                self._runs.clear()
                continue
            if soonest > now:
                self._next = soonest
                wake.clear()
                try:
                    await asyncio.wait_for(wake.wait(), soonest - now)
                except TimeoutError:
                    pass
                continue
            self._next = math.inf
            await self._write([r for r in self._runs.values() if r.due is not None and r.due <= now], now)

    async def _write(self, batch: list[LiveRun], now: float) -> None:
        items, runs = [], []
        for run in batch:
            run.due = None
            if run.result is None or run.result.status != RunStatus.RUNNING:
                continue  # settled: its final record follows
            run.last = now
            items.append(({**run.result.progress_record(), **run.fields()}, not run.claimed))
            runs.append(run)
        if not items:
            self._forget_idle(batch)
            return
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._inflight = (frozenset(r.run_id for r in runs), done)
        try:
            written = await self.host.run_store.save_live(items)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._failed(exc)
            delay = self._backoff.next_delay()
            for run in runs:
                if not run.stopped:
                    run.due = now + delay
            return
        finally:
            done.set_result(None)
            self._inflight = None
        self._ok()
        for run, ok in zip(runs, written, strict=True):
            if ok:
                run.claimed = True
                run.writes += 1
                self.writes += 1
            else:
                await self._refused(run)
            if not run.stopped and run.due is None:
                run.due = now + self.keepalive_s
        self._forget_idle(batch)

    def _forget_idle(self, batch: list[LiveRun]) -> None:
        for run in batch:
            if run.due is None and self._runs.get(run.run_id) is run:
                del self._runs[run.run_id]

    async def _refused(self, run: LiveRun) -> None:
        """Another execution owns the record (or ours ended, or it expired): claim it again if
        the run's entry is still ours, else stop writing it."""
        self.refused += 1
        if run.stopped:
            return
        if run.claimed:  # a progress write was refused: is the entry still ours?
            mine = True
            if run.event is not None and run.event.stream_id:
                try:
                    mine = entry_of(run.event) in await self.owned([run.event])
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    self._failed(exc)
                    mine = False
            if mine:
                run.claimed = False
                run.due = time.monotonic()
                return
        log.warning("run %s: its record belongs to another execution now; no more progress writes from here",
                    run.run_id)
        self.drop(run)

    def _failed(self, exc: Exception) -> None:
        self.failures += 1
        fault = faults.classify(exc)
        if fault in faults.TRANSIENT:
            faults.report(exc)
            self._met.add(fault)
        else:
            self._broken.hit(exc)

    def _ok(self) -> None:
        if self._met:
            faults.recovered(*self._met)
            self._met.clear()
        if self._broken.active:
            self._broken.clear()
        self._backoff.reset()


class RunRecorder:
    """Group commit of run records: callers wait for their record to be saved (so an event is
    acked only after its run is on record), while one flusher saves everything that queued up
    meanwhile in one ownership check and one ``save_many``."""

    def __init__(self, host: RecorderHost, owned: OwnedFn) -> None:
        self.host = host
        self.owned = owned
        self._queue: list[tuple[WorkflowRunResult, Event | None, asyncio.Future[None]]] = []
        self._extra: dict[int, dict[str, Any]] = {}  # id(result) -> the record's live fields
        self._flusher: asyncio.Task[None] | None = None

    async def record(self, result: WorkflowRunResult, event: Event | None,
                     extra: dict[str, Any] | None = None) -> None:
        """Save ``result``'s record (with ``extra`` fields: ``worker_id``, ``owner_token``,
        ``updated_at``) once the ownership check passed; returns when it is saved (or not
        recorded: the event was reclaimed elsewhere)."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if extra:
            self._extra[id(result)] = extra
        self._queue.append((result, event, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())
        await future

    @property
    def _patience_s(self) -> float:
        return self.host.settings.visibility_timeout_s

    async def _owned(self, batch: list[tuple[WorkflowRunResult, Event | None, asyncio.Future[None]]]
                     ) -> set[tuple[str | None, int, str]]:
        events = [e for _, e, _ in batch if e is not None and e.stream_id]
        return await self.owned(events) if events else set()

    async def _flush(self) -> None:
        while self._queue:
            batch, self._queue = self._queue, []
            try:
                # a Redis that is unreachable, full or failing over is waited out (one log line
                # per episode) for up to the visibility timeout: after that the event may have
                # been reclaimed elsewhere, and the ownership check decides
                owned = await faults.retry_transient(functools.partial(self._owned, batch), deadline_s=self._patience_s)
                keep = []
                for result, event, future in batch:
                    if event is not None and event.stream_id and entry_of(event) not in owned:
                        log.warning("run %s finished after its event was reclaimed elsewhere; not recording it",
                                    result.run_id)
                        self._extra.pop(id(result), None)
                        future.set_result(None)
                    else:
                        keep.append((result, future))
                await self._save(keep)
            except Exception as exc:  # ownership query failed (Redis down): fail the callers
                for result, _, future in batch:
                    self._extra.pop(id(result), None)
                    if not future.done():
                        future.set_exception(exc)

    async def _save(self, items: list[tuple[WorkflowRunResult, asyncio.Future[None]]]) -> None:
        store = self.host.run_store
        records = [{**result.to_record(), **self._extra.pop(id(result), {})} for result, _ in items]
        for record in records:
            if "updated_at" in record:
                record["updated_at"] = time.time()
        try:
            await faults.retry_transient(lambda: store.save_many(records), deadline_s=self._patience_s)
            for result, _ in items:
                if getattr(result, "logs", None):
                    await store.append_logs(result.run_id, result.log_lines())
        except Exception as exc:
            for (result, future), record in zip(items, records, strict=True):
                await self._store_failed(exc, result, record, future)
            return
        for _, future in items:
            future.set_result(None)

    async def _store_failed(self, exc: Exception, result: WorkflowRunResult, record: dict[str, Any],
                            future: asyncio.Future[None]) -> None:
        hook = self.host.hooks.on_run_store_error
        if hook is None:
            log.error("run store failed to save run %s (%s, status %s): %r", result.run_id,
                      result.workflow_name, result.status, exc)
            future.set_exception(exc)
            return
        await call_hook(hook, "on_run_store_error", exc, record)
        future.set_result(None)
