"""Saving run records: a group commit that checks, first, that the run's event is still ours.

A worker frozen past its lease loses its stream entry to another worker, which runs the event
again; the late run of the first worker must not be recorded over the new one. So before a
run record is saved, the recorder asks whether this worker still holds the run's event (the
consumer's ownership rule, given as ``owned``), for every record that queued up meanwhile at
once, and saves the owned ones in one ``save_many``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from orchestrator import faults
from orchestrator.callbacks import call_and_await
from orchestrator.events import Event
from orchestrator.workflow.result import WorkflowRunResult, format_log

if TYPE_CHECKING:
    from orchestrator.config import Settings
    from orchestrator.runs.stores import RunStore

log = logging.getLogger("tokiwa.workflows")

#: ``fn(exc, info)``; may return an awaitable
ErrorHook = Callable[[Exception, dict[str, Any]], Any]
#: the (group, stream id) pairs of the given events whose entries this worker still holds
OwnedFn = Callable[[Sequence[Event]], Awaitable[set[tuple[str | None, str]]]]


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


class RunRecorder:
    """Group commit of run records: callers wait for their record to be saved (so an event is
    acked only after its run is on record), while one flusher saves everything that queued up
    meanwhile in one ownership check and one ``save_many``."""

    def __init__(self, host: RecorderHost, owned: OwnedFn) -> None:
        self.host = host
        self.owned = owned
        self._queue: list[tuple[WorkflowRunResult, Event | None, asyncio.Future[None]]] = []
        self._flusher: asyncio.Task[None] | None = None

    async def record(self, result: WorkflowRunResult, event: Event | None) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append((result, event, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())
        await future

    @property
    def _patience_s(self) -> float:
        return self.host.settings.visibility_timeout_s

    async def _owned(self, batch: list[tuple[WorkflowRunResult, Event | None, asyncio.Future[None]]]
                     ) -> set[tuple[str | None, str]]:
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
                    if event is not None and event.stream_id and (event.group, event.stream_id) not in owned:
                        log.warning("run %s finished after its event was reclaimed elsewhere; not recording it",
                                    result.run_id)
                        future.set_result(None)
                    else:
                        keep.append((result, future))
                await self._save(keep)
            except Exception as exc:  # ownership query failed (Redis down): fail the callers
                for _, _, future in batch:
                    if not future.done():
                        future.set_exception(exc)

    async def _save(self, items: list[tuple[WorkflowRunResult, asyncio.Future[None]]]) -> None:
        store = self.host.run_store
        records = [result.to_record() for result, _ in items]
        try:
            await faults.retry_transient(lambda: store.save_many(records), deadline_s=self._patience_s)
            for result, _ in items:
                if getattr(result, "logs", None):
                    await store.append_logs(result.run_id, [format_log(x) for x in result.logs])
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
