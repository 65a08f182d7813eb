"""The Orchestrator's workflow side: registration, event triggers, triggered runs, run
records, and ``run_workflow`` requests that travel through the stream to a worker.

A remote run request is an event of the reserved type ``tokiwa.workflow.run``; the worker
that takes it runs the workflow and answers under ``{ns}:result:{run_id}`` (msgpack record,
expiring) and pushes to ``{ns}:result:{run_id}:notify``, which the caller BLPOPs.
Event types starting with ``tokiwa.`` are reserved and not passed to subscribers.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgpack

from orchestrator import faults
from orchestrator.errors import (
    ConflictError,
    InvalidArgumentError,
    LockError,
    NotFoundError,
    TokiwaError,
    describe_error,
)
from orchestrator.events import Event
from orchestrator.runs.triggers import Trigger, mapped, parse_trigger
from orchestrator.workflow.model import Workflow, workflow_id_for
from orchestrator.workflow.result import WorkflowRunResult, format_log

if TYPE_CHECKING:
    from orchestrator.app import Orchestrator

log = logging.getLogger("tokiwa.workflows")

RUN_REQUEST = "tokiwa.workflow.run"
_NO_ERRORS: list[str] = []  # shared, never mutated by callers (they concatenate)
RESULT_TTL_S = 3600  # a run_workflow answer waits this long for its caller
WAIT_SLICE_S = 1.0  # a waiting run_workflow BLPOPs in slices this long (below the socket timeout)
_RUN_OPTIONS = {"input", "context", "conversation_id", "concurrency", "fail_fast", "timeout", "memory"}


class RemoteRunError(TokiwaError):
    """Raised by ``run_workflow`` when the worker could not run the workflow at all (unknown
    workflow, chatflow without a conversation id ...); ``error`` is the worker's description."""

    def __init__(self, message: str, error: dict | None = None) -> None:
        super().__init__(message)
        self.error = error or {}


@dataclass(slots=True)
class Registration:
    workflow: Workflow
    trigger: Trigger
    options: dict[str, Any] = field(default_factory=dict)


def _as_workflow(obj: Any) -> Workflow:
    if isinstance(obj, Workflow):
        return obj
    to_workflow = getattr(obj, "to_workflow", None)  # a pyoco-style Flow
    if callable(to_workflow):
        return to_workflow()
    raise InvalidArgumentError(f"register_workflow expects a Workflow or Flow, got {type(obj).__name__}")


def run_id_for(event: Event, workflow: Workflow) -> str:
    """Deterministic run id of a triggered run, so a redelivered event rewrites its run record
    instead of adding a second one."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"tokiwa:{event.id}:{workflow.id}"))


class RunRecorder:
    """Group commit of run records: callers wait for their record to be saved (so an event is
    acked only after its run is on record), while one flusher saves everything that queued up
    meanwhile in one ownership check and one ``save_many``."""

    def __init__(self, app: Orchestrator) -> None:
        self.app = app
        self._queue: list[tuple[WorkflowRunResult, Event | None, asyncio.Future]] = []
        self._flusher: asyncio.Task | None = None

    async def record(self, result: WorkflowRunResult, event: Event | None) -> None:
        future = asyncio.get_running_loop().create_future()
        self._queue.append((result, event, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())
        await future

    @property
    def _patience_s(self) -> float:
        return self.app.settings.visibility_timeout_s

    async def _owned(self, batch: list) -> set[str]:
        app = self.app
        ids = [e.stream_id for _, e, _ in batch if e is not None and e.stream_id]
        if not ids or app.consumer is None:
            return set(ids)
        in_flight = app.consumer.in_flight
        return await app.broker.owned([i for i in ids if not getattr(in_flight.get(i), "lost", False)])

    async def _flush(self) -> None:
        while self._queue:
            batch, self._queue = self._queue, []
            try:
                # a Redis that is unreachable, full or failing over is waited out (one log line
                # per episode) for up to the visibility timeout: after that the event may have
                # been reclaimed elsewhere, and the ownership check decides
                owned = await faults.retry_transient(lambda b=batch: self._owned(b), deadline_s=self._patience_s)
                keep = []
                for result, event, future in batch:
                    if event is not None and event.stream_id and event.stream_id not in owned:
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

    async def _save(self, items: list[tuple[WorkflowRunResult, asyncio.Future]]) -> None:
        store = self.app.run_store
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

    async def _store_failed(self, exc: Exception, result: WorkflowRunResult, record: dict,
                            future: asyncio.Future) -> None:
        hook = self.app.on_run_store_error
        if hook is None:
            log.error("run store failed to save run %s (%s, status %s): %r", result.run_id,
                      result.workflow_name, result.status, exc)
            future.set_exception(exc)
            return
        try:
            value = hook(exc, record)
            if asyncio.iscoroutine(value):
                await value
        except Exception:
            log.exception("on_run_store_error hook failed")
        future.set_result(None)


RETRY_MARK = "retry:"  # an error string starting with this asks the consumer to redeliver


def _fenced(result: WorkflowRunResult) -> bool:
    error = getattr(result, "error", None)
    return isinstance(error, dict) and error.get("name") == "FencingError"


class WorkflowRegistry:
    """Registered workflows of one Orchestrator and everything that runs them."""

    def __init__(self, app: Orchestrator, *, workflow_concurrency: int | None = None) -> None:
        if workflow_concurrency is not None and workflow_concurrency < 1:
            raise InvalidArgumentError(f"workflow_concurrency must be >= 1, got {workflow_concurrency}")
        self.app = app
        self.workflow_concurrency = workflow_concurrency
        self._by_id: dict[str, Registration] = {}
        self._semaphore: asyncio.Semaphore | None = None
        self._recorder = RunRecorder(app)

    # -- registration -----------------------------------------------------------------------
    def register(self, workflow: Any, trigger: Any = None, **options: Any) -> Workflow:
        wf = _as_workflow(workflow)
        wf.validate()
        unknown = set(options) - _RUN_OPTIONS
        if unknown:
            raise InvalidArgumentError(f"unknown register_workflow options {sorted(unknown)}")
        if wf.id in self._by_id:
            raise ConflictError(f"workflow {wf.name!r} ({wf.id}) is already registered")
        self._by_id[wf.id] = Registration(wf, parse_trigger(trigger), options)
        return wf

    def unregister(self, ref: str) -> bool:
        reg = self._find(ref)
        return reg is not None and self._by_id.pop(reg.workflow.id, None) is not None

    def _find(self, ref: str) -> Registration | None:
        return self._by_id.get(ref) or self._by_id.get(workflow_id_for(ref)) if isinstance(ref, str) else None

    def get(self, ref: str) -> Registration:
        reg = self._find(ref)
        if reg is None:
            raise NotFoundError(f"no workflow {ref!r} is registered (known: "
                                f"{sorted(r.workflow.name for r in self._by_id.values())})")
        return reg

    @property
    def registrations(self) -> list[Registration]:
        return list(self._by_id.values())

    def matching(self, event: Event) -> list[Registration]:
        """Exact-type registrations, then wildcard, then regex; filtered (tokiwa's order)."""
        order = {"exact": 0, "wildcard": 1, "regex": 2}
        regs = [r for r in self._by_id.values() if r.trigger.matches(event.type)]
        regs.sort(key=lambda r: order.get(r.trigger.kind, 3))
        out = []
        for reg in regs:
            flt = reg.trigger.filter
            if flt is None or flt(event):
                out.append(reg)
        return out

    def conversations_of(self, event: Event) -> list[str]:
        """Conversation ids of chatflows this event triggers (computed by the producer so its
        publish records the stream order of each conversation)."""
        out = []
        for reg in self.matching(event):
            if reg.workflow.type == "chatflow":
                cid = mapped(reg.trigger.map_conversation_id, event, reg.options.get("conversation_id"))
                if isinstance(cid, str) and cid.strip() and cid not in out:
                    out.append(cid)
        return out

    # -- running -----------------------------------------------------------------------------
    async def process(self, event: Event) -> list[str]:
        """The Orchestrator's processor: serve run requests, run triggered workflows."""
        if event.type == RUN_REQUEST:  # answered even by a worker that knows no workflows
            return await self._serve_request(event)
        if not self._by_id:
            return _NO_ERRORS
        regs = self.matching(event)
        if not regs:
            return []
        if self._semaphore is None:  # default: as many triggered runs as the worker has slots
            self._semaphore = asyncio.Semaphore(self.workflow_concurrency or self.app.settings.concurrency)
        results = await asyncio.gather(*(self._triggered(reg, event) for reg in regs))
        return [err for errs in results for err in errs]

    async def _triggered(self, reg: Registration, event: Event) -> list[str]:
        opts = reg.options
        trig = reg.trigger
        run = self.execute(
            reg, event=event, run_id=run_id_for(event, reg.workflow),
            input=mapped(trig.map_input, event, opts.get("input", event.payload)),
            context=mapped(trig.map_context, event, opts.get("context")),
            conversation_id=mapped(trig.map_conversation_id, event, opts.get("conversation_id")),
        )
        try:
            if reg.workflow.type == "chatflow":
                # no permit: a chatflow may wait for its conversation's turn, and a permit held
                # while waiting could starve the very event whose turn it is
                result = await run
            else:
                async with self._semaphore:  # type: ignore[union-attr]
                    result = await run
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await self._workflow_error(exc, reg, event)
            if isinstance(exc, LockError) or faults.is_transient(exc):
                # the conversation's lock was not had in time, or Redis failed under the run:
                # the event itself did not fail, so it is redone, whatever ack_policy says
                return [f"{RETRY_MARK}workflow {reg.workflow.name}: {type(exc).__name__}: {exc}"]
            return [f"workflow {reg.workflow.name}: {type(exc).__name__}: {exc}"]
        if result.status != "succeeded":
            if _fenced(result):  # a newer lock holder exists: redo this event, do not ack it
                return [f"{RETRY_MARK}workflow {reg.workflow.name}: memory write fenced out"]
            return [f"workflow {reg.workflow.name} {result.status}"]
        return []

    async def execute(self, reg: Registration, *, event: Event | None, run_id: str, input: Any,  # noqa: A002
                      context: Any, conversation_id: str | None) -> WorkflowRunResult:
        """Run one registered workflow here (chatflows through the conversation executor) and
        record it in the run store."""
        wf, opts = reg.workflow, reg.options
        kwargs = {k: opts[k] for k in ("concurrency", "fail_fast", "timeout") if k in opts}
        if wf.type == "chatflow":
            executor = self.app.chatflows()
            result = await executor.run(wf, conversation_id=conversation_id, event=event, input=input,
                                        context=context, memory=opts.get("memory"), run_id=run_id,
                                        services=self.app.services_for(run_id), **kwargs)
        else:
            result = await self.app.runner.run(wf, input=input, context=context, event=event, run_id=run_id,
                                               memory=opts.get("memory"), services=self.app.services_for(run_id),
                                               **kwargs)
        await self._record(result, event)
        return result

    async def _record(self, result: WorkflowRunResult, event: Event | None) -> None:
        """Save the run record, unless its event was reclaimed by another worker meanwhile.
        Concurrent runs are group-committed: one ownership query and one pipelined save."""
        await self._recorder.record(result, event)

    async def _workflow_error(self, exc: Exception, reg: Registration, event: Event) -> None:
        log.warning("workflow %s failed to run for %s: %r", reg.workflow.name, event.type, exc)
        hook = self.app.on_workflow_error
        if hook is None:
            return
        try:
            value = hook(exc, {"workflow_id": reg.workflow.id, "event": event, "trigger": reg.trigger})
            if asyncio.iscoroutine(value):
                await value
        except Exception:
            log.exception("on_workflow_error hook failed")

    # -- remote runs ---------------------------------------------------------------------------
    async def request(self, ref: str, *, input: Any, context: Any, conversation_id: str | None,  # noqa: A002
                      wait: bool, timeout: float | None) -> WorkflowRunResult | str:
        reg = self.get(ref)
        if reg.workflow.type == "chatflow" and not (isinstance(conversation_id, str) and conversation_id.strip()):
            raise InvalidArgumentError(f"chatflow {reg.workflow.name!r} needs a conversation_id")
        run_id = str(uuid.uuid4())
        payload = {"workflow_id": reg.workflow.id, "run_id": run_id, "input": input, "context": context,
                   "conversation_id": conversation_id, "reply": wait}
        await self.app.publish(RUN_REQUEST, payload)
        if not wait:
            return run_id
        keys = self.app.keys
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:  # short BLPOPs: one long block would outlast the connection's socket timeout
            left = WAIT_SLICE_S if deadline is None else min(WAIT_SLICE_S, deadline - time.monotonic())
            if left <= 0:
                raise TimeoutError(f"workflow {reg.workflow.name!r} run {run_id} did not finish within {timeout}s")
            reply = await self.app.redis.blpop([keys.run_result_notify(run_id)], timeout=max(left, 0.01))
            if reply is not None:
                break
        answer = msgpack.unpackb(await self.app.redis.get(keys.run_result(run_id)), raw=False)
        if "error" in answer:
            err = answer["error"]
            raise RemoteRunError(f"worker could not run {reg.workflow.name!r}: {err.get('name')}: "
                                 f"{err.get('message')}", err)
        return WorkflowRunResult.from_record(answer["record"])

    async def _serve_request(self, event: Event) -> list[str]:
        p = event.payload if isinstance(event.payload, dict) else {}
        run_id = str(p.get("run_id") or uuid.uuid4())
        try:
            reg = self.get(str(p.get("workflow_id")))
            result = await self.execute(reg, event=event, run_id=run_id, input=p.get("input"),
                                        context=p.get("context"), conversation_id=p.get("conversation_id"))
            answer: dict[str, Any] = {"record": result.to_record()}
            errors = [] if result.status == "succeeded" else [f"run {run_id} {result.status}"]
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            answer, errors = {"error": describe_error(exc)}, []  # answered: retrying cannot help
        if p.get("reply"):
            keys = self.app.keys
            pipe = self.app.redis.pipeline(transaction=True)
            pipe.set(keys.run_result(run_id), msgpack.packb(answer, default=repr), ex=RESULT_TTL_S)
            pipe.rpush(keys.run_result_notify(run_id), b"1")
            pipe.expire(keys.run_result_notify(run_id), RESULT_TTL_S)
            await pipe.execute()
        return errors
