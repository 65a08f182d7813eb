"""Registered workflows: registration, event triggers, triggered runs, and ``run_workflow``
requests that travel through the stream to a worker.

A remote run request is an event of the reserved type ``tokiwa.workflow.run``; the worker
that takes it runs the workflow and answers under ``{ns}:result:{run_id}`` (msgpack record,
expiring) and pushes to ``{ns}:result:{run_id}:notify``, which the caller BLPOPs.
Event types starting with ``tokiwa.`` are reserved and not passed to subscribers.

The registry does not know the app: it uses the few things :class:`RunsHost` lists.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import msgpack

from orchestrator import errors, faults
from orchestrator.chat.chatflow import ChatflowExecutor, will_be_redone
from orchestrator.errors import (
    ConflictError,
    InvalidArgumentError,
    LockError,
    NotFoundError,
    TokiwaError,
    describe_error,
)
from orchestrator.events import Event, check_conversation_id
from orchestrator.keys import Keys
from orchestrator.runs.checkpoints import Checkpoints
from orchestrator.runs.limits import Limits
from orchestrator.runs.outcome import OK, ProcessResult, Verdict
from orchestrator.runs.recorder import LiveRun, LiveRuns, OwnedFn, RecorderHost, RunRecorder, call_hook
from orchestrator.runs.routes import CHATFLOW, WORKFLOW, Route, group_name, types_advert, value_at
from orchestrator.runs.triggers import Trigger, mapped, parse_trigger
from orchestrator.workflow.model import Workflow, workflow_id_for
from orchestrator.workflow.result import WorkflowRunResult

if TYPE_CHECKING:
    from orchestrator.workflow.runner import Runner

log = logging.getLogger("tokiwa.workflows")

RUN_REQUEST = "tokiwa.workflow.run"
RESULT_TTL_S = 3600  # a run_workflow answer waits this long for its caller
WAIT_SLICE_S = 1.0  # a waiting run_workflow BLPOPs in slices this long (below the socket timeout)
_RUN_OPTIONS = {"input", "context", "conversation_id", "concurrency", "fail_fast", "timeout", "memory",
                "rate_limit", "rate_key", "concurrency_limit", "concurrency_key", "checkpoint"}
INTERRUPTED_RECORD_S = 2.0  # a run whose caller is cancelled waits this long at most for its record


class RemoteRunError(TokiwaError):
    """Raised by ``run_workflow`` when the worker could not run the workflow at all (unknown
    workflow, chatflow without a conversation id ...); ``error`` is the worker's description."""

    def __init__(self, message: str, error: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.error = error or {}


class RunTimeoutError(TimeoutError):
    """``run_workflow(..., timeout=...)`` gave up waiting; ``run_id`` names the run, which may
    still be queued or running (``Orchestrator.cancel_run(run_id)`` stops it)."""

    def __init__(self, message: str, run_id: str) -> None:
        super().__init__(message)
        self.run_id = run_id


#: the run whose node is executing, in this task (a run request made there names it as parent)
current_run_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("tokiwa_run_id", default=None)


@dataclass(slots=True)
class Registration:
    workflow: Workflow
    trigger: Trigger
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class RunTarget:
    """The workflow a run request names: id, name, type (``workflow`` or ``chatflow``)."""

    workflow_id: str
    name: str
    type: str  # noqa: A003

    @classmethod
    def of(cls, reg: Registration) -> RunTarget:
        return cls(reg.workflow.id, reg.workflow.name, reg.workflow.type)


class RunsHost(RecorderHost, Protocol):
    """What the workflow registry uses of the app that holds it (besides what the recorder
    reads): Redis and its key names (run requests and their answers), the runner (plain
    workflows), the conversation executor (chatflows), each run's services, and publishing
    (a run request is an event)."""

    @property
    def keys(self) -> Keys: ...
    @property
    def redis(self) -> Any: ...  # the async Redis client, None until connect()
    @property
    def runner(self) -> Runner: ...
    async def connect(self) -> None: ...
    def chatflows(self) -> ChatflowExecutor: ...
    def services_for(self, run_id: str) -> Any: ...
    async def publish(self, type: str, payload: Any = None,  # noqa: A002
                      metadata: Mapping[str, Any] | None = None) -> Event: ...
    async def remote_workflow(self, ref: str) -> RunTarget:
        """The workflow ``ref`` (name or id) that some worker declared; NotFoundError naming
        what live workers offer when none did."""
        ...


def _as_workflow(obj: Any) -> Workflow:
    if isinstance(obj, Workflow):
        return obj
    to_workflow = getattr(obj, "to_workflow", None)  # a pyoco-style Flow
    if callable(to_workflow):
        workflow: Workflow = to_workflow()
        return workflow
    raise InvalidArgumentError(f"register_workflow expects a Workflow or Flow, got {type(obj).__name__}")


def conversation_of(reg: Registration, event: Event) -> str | None:
    """A chatflow's conversation id for ``event``: its ``map_conversation_id`` (code), else the
    trigger's ``conversation_key`` payload path (data), else the event's explicit ``key``, else
    the registration's fixed ``conversation_id`` option. Producers without the code compute the
    same from the route's advert (:func:`orchestrator.runs.routes.advert_conversation`)."""
    trig = reg.trigger
    cid: Any = None
    if trig.map_conversation_id is not None:
        cid = trig.map_conversation_id(event)
    elif trig.conversation_key:
        cid = value_at(event.payload, trig.conversation_key)
    if not cid:
        cid = event.key or reg.options.get("conversation_id")
    return cid if isinstance(cid, str) and cid.strip() else None


def run_id_for(event: Event, workflow: Workflow) -> str:
    """Deterministic run id of a triggered run, so a redelivered event rewrites its run record
    instead of adding a second one."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"tokiwa:{event.id}:{workflow.id}"))


class RunServices:
    """``services`` of one run: ``publish_topic``, and ``artifacts`` (the run's folder in the
    app's artifact store), built only if a node touches it."""

    __slots__ = ("_store", "_run_id", "_artifacts", "publish_topic")

    def __init__(self, artifact_store: Callable[[], Any], publish_topic: Callable[[str, Any], Awaitable[int]],
                 run_id: str) -> None:
        self._store, self._run_id, self._artifacts = artifact_store, run_id, None
        self.publish_topic = publish_topic

    @property
    def artifacts(self) -> Any:
        if self._artifacts is None:
            self._artifacts = self._store().scoped(self._run_id)
        return self._artifacts


def _run_result(name: str, result: WorkflowRunResult) -> ProcessResult:
    """What a triggered run that ended (did not raise) means for its event."""
    if result.succeeded or result.cancelled_by is not None:  # cancelled on request: settled
        return OK
    if will_be_redone(result):  # a newer lock holder exists: redo this event, do not ack it
        return ProcessResult(Verdict.FENCED_OUT, f"workflow {name}: memory write fenced out")
    return ProcessResult(Verdict.FAILED, f"workflow {name} {result.status}")


class WorkflowRegistry:
    """Registered workflows of one Orchestrator and everything that runs them.

    ``owned`` is the consumer's ownership rule (which of these stream entries does this worker
    still hold): a run is recorded only if its event is still ours."""

    def __init__(self, host: RunsHost, owned: OwnedFn, *, workflow_concurrency: int | None = None) -> None:
        if workflow_concurrency is not None and workflow_concurrency < 1:
            raise InvalidArgumentError(f"workflow_concurrency must be >= 1, got {workflow_concurrency}")
        self.host = host
        self.workflow_concurrency = workflow_concurrency
        self._by_id: dict[str, Registration] = {}
        self._semaphores: dict[str, asyncio.Semaphore] = {}  # workflow id -> its triggered runs' permits
        self._recorder = RunRecorder(host, owned)
        self._checkpoints = Checkpoints(host, owned)
        self._live = LiveRuns(host, owned, self._live_result)
        self._counts = dict.fromkeys(("started", "succeeded", "failed", "timed_out", "cancelled"), 0)
        self._running = 0

    def run_counters(self) -> dict[str, int]:
        """Runs of registered workflows in this process (``Orchestrator.snapshot()["runs"]``):
        ``started`` (cancelled-before-start ones included), ``running`` now, how they ended
        (``succeeded``, ``failed``, ``timed_out``, ``cancelled``: every settled run counts once),
        and ``node_errors`` (nodes that failed for good, after their retries), plus the live
        record writer's ``record_writes``, ``record_writes_refused`` and ``record_write_errors``."""
        live = self._live
        return {**self._counts, "running": self._running, "node_errors": live.node_errors,
                "record_writes": live.writes, "record_writes_refused": live.refused,
                "record_write_errors": live.failures}

    def _live_result(self, run_id: str) -> WorkflowRunResult | None:
        result_of = getattr(self.host.runner, "result_of", None)  # a stand-in runner may lack it
        return result_of(run_id) if callable(result_of) else None

    def _count(self, result: WorkflowRunResult) -> None:
        status = str(result.status)
        if status in self._counts and status != "started":
            self._counts[status] += 1

    # -- registration -----------------------------------------------------------------------
    def register(self, workflow: Any, trigger: Any = None, **options: Any) -> Workflow:
        wf = _as_workflow(workflow)
        wf.validate()
        unknown = set(options) - _RUN_OPTIONS
        if unknown:
            raise InvalidArgumentError(f"unknown register_workflow options {sorted(unknown)}")
        if not isinstance(options.get("checkpoint", False), bool):
            raise InvalidArgumentError(f"checkpoint must be True or False, got {options['checkpoint']!r}")
        if wf.id in self._by_id:
            raise ConflictError(f"workflow {wf.name!r} ({wf.id}) is already registered")
        Limits.from_options(options)  # a bad limit fails here, not on the first event
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
        """Exact-type registrations, then glob, then wildcard, then regex; filtered (tokiwa's
        order, with globs between exact types and the wildcard)."""
        order = {"exact": 0, "glob": 1, "wildcard": 2, "regex": 3}
        regs = [r for r in self._by_id.values() if r.trigger.matches(event.type)]
        regs.sort(key=lambda r: order.get(r.trigger.kind, 3))
        out = []
        for reg in regs:
            flt = reg.trigger.filter
            if flt is None or flt(event):
                out.append(reg)
        return out

    def conversations_of(self, event: Event, *, group: str | None = None) -> list[str]:
        """Conversation ids of the chatflows this event triggers here (only the one whose route
        group is ``group``, when given)."""
        out = []
        for reg in self.matching(event):
            if group is not None and group_name(self.host.settings.group, self.route_name(reg)) != group:
                continue
            if reg.workflow.type == "chatflow":
                cid = conversation_of(reg, event)
                if cid and cid not in out:
                    out.append(cid)
        return out

    # -- routes --------------------------------------------------------------------------------
    def route_name(self, reg: Registration) -> str:
        return f"wf:{reg.workflow.name}"

    def routes(self) -> list[Route]:
        """One route (consumer group) per registration: its triggered runs and the run requests
        that name it."""
        return [Route(self.route_name(reg), reg.workflow.type if reg.workflow.type == CHATFLOW else WORKFLOW,
                      self._route_step(reg), self._advert(reg), Limits.from_options(reg.options))
                for reg in self._by_id.values()]

    def _route_step(self, reg: Registration) -> Any:
        async def step(event: Event) -> ProcessResult:
            return await self.process_one(reg, event)
        return step

    def _advert(self, reg: Registration) -> dict[str, Any]:
        trig, wf = reg.trigger, reg.workflow
        fixed = reg.options.get("conversation_id")
        return {"kind": CHATFLOW if wf.type == CHATFLOW else WORKFLOW, "name": wf.name, "workflow_id": wf.id,
                **types_advert(trig.event_type, trig.kind), "has_filter": trig.filter is not None,
                "conversation_key": trig.conversation_key,
                "conversation_key_code": trig.map_conversation_id is not None,
                "conversation_id": fixed if isinstance(fixed, str) else None}

    def order_fns(self) -> dict[str, Any]:
        """group -> fn(event) giving the conversation id of each chatflow registered here, for
        the events it listens to (so a publish records the conversation's order)."""
        prefix = self.host.settings.group
        out = {}
        for reg in self._by_id.values():
            if reg.workflow.type == CHATFLOW:
                def fn(event: Event, reg: Registration = reg) -> str | None:
                    if not reg.trigger.matches(event.type):
                        return None
                    return conversation_of(reg, event)
                out[group_name(prefix, self.route_name(reg))] = fn
        return out

    # -- running -----------------------------------------------------------------------------
    async def process(self, event: Event) -> ProcessResult:
        """Every registration's work on one event, here (``Orchestrator.process_event``): serve
        a run request, run the triggered workflows. Consumers run :meth:`process_one` per route."""
        if event.type == RUN_REQUEST:
            return await self._serve_request(event)
        if not self._by_id:
            return OK
        regs = self.matching(event)
        if not regs:
            return OK
        return ProcessResult.combine(await asyncio.gather(*(self._triggered(reg, event) for reg in regs)))

    async def process_one(self, reg: Registration, event: Event) -> ProcessResult:
        """One registration's route: the run requests that name it, the events that trigger it.
        An event it does not take is acked for this route at once (a chatflow gives up the
        event's turn in its conversation's order list, which the publisher may have recorded
        without knowing the trigger's filter)."""
        if event.type == RUN_REQUEST:
            p = event.payload if isinstance(event.payload, dict) else {}
            return await self._serve_request(event) if p.get("workflow_id") == reg.workflow.id else OK
        if not reg.trigger.matches(event.type):
            return OK
        flt = reg.trigger.filter
        if flt is not None and not flt(event):
            if reg.workflow.type == CHATFLOW and event.stream_id:
                cid = conversation_of(reg, event)
                if cid:
                    await self.host.chatflows().abandon(cid, event.stream_id, event.group, event.partition)
            return OK
        return await self._triggered(reg, event)

    def _permits(self, reg: Registration) -> asyncio.Semaphore:
        """A registration's permits for concurrent triggered runs on this worker (default: as
        many as the worker has slots). Per registration: a parent waiting for a child workflow
        never holds the permit the child needs."""
        sem = self._semaphores.get(reg.workflow.id)
        if sem is None:
            sem = self._semaphores[reg.workflow.id] = asyncio.Semaphore(
                self.workflow_concurrency or self.host.settings.concurrency)
        return sem

    async def _triggered(self, reg: Registration, event: Event) -> ProcessResult:
        opts = reg.options
        trig = reg.trigger
        run = self.execute(
            reg, event=event, run_id=run_id_for(event, reg.workflow),
            input=mapped(trig.map_input, event, opts.get("input", event.payload)),
            context=mapped(trig.map_context, event, opts.get("context")),
            conversation_id=conversation_of(reg, event),
        )
        try:
            if reg.workflow.type == "chatflow":
                # no permit: a chatflow may wait for its conversation's turn, and a permit held
                # while waiting could starve the very event whose turn it is
                result = await run
            else:
                async with self._permits(reg):
                    result = await run
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await self._workflow_error(exc, reg, event)
            # the conversation's lock was not had in time, or Redis failed under the run: the
            # event itself did not fail, so it is redone, whatever ack_policy says
            redo = isinstance(exc, LockError) or faults.is_transient(exc)
            return ProcessResult.of_exception(Verdict.RETRY_LATER if redo else Verdict.FAILED,
                                              f"workflow {reg.workflow.name}", exc)
        return _run_result(reg.workflow.name, result)

    async def run(self, ref: str, *, input: Any, context: Any, conversation_id: str | None,  # noqa: A002
                  wait: bool, timeout: float | None, local: bool) -> WorkflowRunResult | str:
        """``Orchestrator.run_workflow``: run here (``local``), or send a run request that a
        worker answers. ``wait=False`` returns the run id of a remote run. A workflow this app
        does not register is called by name (or id) when a worker declared it (see
        :meth:`RunsHost.remote_workflow`)."""
        found = self._find(ref)
        if found is None and local:
            reg = self.get(ref)  # raises NotFoundError naming what is registered
        await self.host.connect()
        if not local:
            target = RunTarget.of(found) if found is not None else await self.host.remote_workflow(ref)
            return await self.request(target, input=input, context=context, conversation_id=conversation_id,
                                      wait=wait, timeout=timeout)
        reg = self.get(ref)
        coro = self.execute(reg, event=None, run_id=str(uuid.uuid4()), input=input, context=context,
                            conversation_id=conversation_id)
        return await asyncio.wait_for(coro, timeout)

    async def execute(self, reg: Registration, *, event: Event | None, run_id: str, input: Any,  # noqa: A002
                      context: Any, conversation_id: str | None, parent_run_id: str | None = None
                      ) -> WorkflowRunResult:
        """Run one registered workflow here (chatflows through the conversation executor) and
        record it in the run store (unless its event was reclaimed by another worker meanwhile).
        A run someone cancelled before it started is recorded ``cancelled`` and not run."""
        from orchestrator.runs.cancel import cancel_request, cancelled_result

        wf, opts = reg.workflow, reg.options
        kwargs = {k: opts[k] for k in ("concurrency", "fail_fast", "timeout") if k in opts}
        services = self.host.services_for(run_id)
        result: WorkflowRunResult
        request = await cancel_request(self.host.redis, self.host.keys, run_id) if self.host.redis is not None else None
        live = self._live.begin(run_id, event)  # the live record, written as the run goes
        timed_out: errors.TimeoutError | None = None
        self._counts["started"] += 1
        self._running += 1
        token = current_run_id.set(run_id)  # this task's context: the nodes' tasks copy it
        try:
            if request is not None:
                log.info("run %s of %s was cancelled by %s before it started", run_id, wf.name, request.get("by"))
                result = cancelled_result(wf, run_id, request, conversation_id=conversation_id)
                if wf.type == CHATFLOW and conversation_id and event is not None and event.stream_id:
                    await self.host.chatflows().abandon(conversation_id, event.stream_id, event.group,
                                                        event.partition)
            elif wf.type == "chatflow":
                result = await self.host.chatflows().run(
                    wf, conversation_id=conversation_id, event=event, input=input, context=context,
                    memory=opts.get("memory"), run_id=run_id, services=services, hooks=live, **kwargs)
            else:  # checkpointed (see orchestrator.runs.checkpoints) unless it opted out
                hooks, resume = await self._checkpoints.begin(wf, run_id, event, live, opts.get("checkpoint"))
                result = await self.host.runner.run(wf, input=input, context=context, event=event, run_id=run_id,
                                                    memory=opts.get("memory"), services=services, hooks=hooks,
                                                    resume=resume, **kwargs)
        except errors.TimeoutError as exc:  # the workflow's timeout: record its partial result, then raise
            partial = getattr(exc, "result", None)
            if not isinstance(partial, WorkflowRunResult):
                self._running -= 1
                await self._live.close(live)
                raise
            result, timed_out = partial, exc
        except asyncio.CancelledError:  # the worker stops, or the entry was lost: record what the run did
            self._running -= 1
            await self._interrupted(live, event, parent_run_id)
            raise
        except BaseException:
            self._running -= 1
            await self._live.close(live)
            raise
        finally:
            current_run_id.reset(token)
        self._running -= 1
        await self._finish(result, event, live, parent_run_id)
        if timed_out is not None:
            raise timed_out
        return result

    async def _finish(self, result: WorkflowRunResult, event: Event | None, live: LiveRun,
                      parent_run_id: str | None) -> None:
        """Stop the run's live writes, then save its final record (after the ownership check)."""
        await self._live.close(live)
        if parent_run_id:
            result.parent_run_id = parent_run_id
        self._count(result)
        await self._recorder.record(result, event, live.fields())

    async def _interrupted(self, live: LiveRun, event: Event | None, parent_run_id: str | None) -> None:
        """The task running the run was cancelled. The runner settled the run ``cancelled``
        (``live.final``) if it had started; save that record, shielded from a second
        cancellation and waiting at most :data:`INTERRUPTED_RECORD_S` (then it goes on in the
        background)."""
        final = live.final
        if final is None:  # never started (waiting for its turn or lock): nothing to record
            await asyncio.shield(self._live.close(live))
            return
        saving = asyncio.ensure_future(self._finish(final, event, live, parent_run_id))
        saving.add_done_callback(lambda t: t.cancelled() or t.exception())  # retrieved, logged below
        try:
            await asyncio.wait_for(asyncio.shield(saving), INTERRUPTED_RECORD_S)
        except (TimeoutError, asyncio.CancelledError):
            log.warning("run %s was interrupted; its cancelled record is still being saved", final.run_id)
        except Exception as exc:
            log.warning("run %s was interrupted and its record could not be saved: %r", final.run_id, exc)

    async def _workflow_error(self, exc: Exception, reg: Registration, event: Event) -> None:
        log.warning("workflow %s failed to run for %s: %r", reg.workflow.name, event.type, exc)
        hook = self.host.hooks.on_workflow_error
        if hook is not None:
            await call_hook(hook, "on_workflow_error", exc,
                            {"workflow_id": reg.workflow.id, "event": event, "trigger": reg.trigger})

    # -- remote runs ---------------------------------------------------------------------------
    async def request(self, target: RunTarget, *, input: Any, context: Any,  # noqa: A002
                      conversation_id: str | None, wait: bool, timeout: float | None) -> WorkflowRunResult | str:
        """Send a run request for ``target`` through the stream (its route's group takes it);
        with ``wait``, wait for the answer. A request made inside a run names that run as the
        child's parent."""
        if target.type == CHATFLOW:
            check_conversation_id(conversation_id, chatflow=target.name)
        run_id = str(uuid.uuid4())
        payload = {"workflow_id": target.workflow_id, "run_id": run_id, "input": input, "context": context,
                   "conversation_id": conversation_id, "reply": wait, "parent_run_id": current_run_id.get()}
        await self.host.publish(RUN_REQUEST, payload)
        if not wait:
            return run_id
        redis, keys = self.host.redis, self.host.keys
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:  # short BLPOPs: one long block would outlast the connection's socket timeout
            left = WAIT_SLICE_S if deadline is None else min(WAIT_SLICE_S, deadline - time.monotonic())
            if left <= 0:
                raise RunTimeoutError(f"workflow {target.name!r} run {run_id} did not finish within {timeout}s "
                                      f"(it may still run: cancel it with cancel_run({run_id!r}))", run_id)
            reply = await redis.blpop([keys.run_result_notify(run_id)], timeout=max(left, 0.01))
            if reply is not None:
                break
        answer = msgpack.unpackb(await redis.get(keys.run_result(run_id)), raw=False)
        if "error" in answer:
            err = answer["error"]
            raise RemoteRunError(f"worker could not run {target.name!r}: {err.get('name')}: "
                                 f"{err.get('message')}", err)
        return WorkflowRunResult.from_record(answer["record"])

    async def _serve_request(self, event: Event) -> ProcessResult:
        p = event.payload if isinstance(event.payload, dict) else {}
        run_id = str(p.get("run_id") or uuid.uuid4())
        outcome = OK
        try:
            reg = self.get(str(p.get("workflow_id")))
            parent = p.get("parent_run_id")
            result = await self.execute(reg, event=event, run_id=run_id, input=p.get("input"),
                                        context=p.get("context"), conversation_id=p.get("conversation_id"),
                                        parent_run_id=parent if isinstance(parent, str) else None)
            answer: dict[str, Any] = {"record": result.to_record()}
            if not result.succeeded:
                outcome = ProcessResult(Verdict.FAILED, f"run {run_id} {result.status}")
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            answer = {"error": describe_error(exc)}  # answered: retrying cannot help
        if p.get("reply"):
            keys = self.host.keys
            pipe = self.host.redis.pipeline(transaction=True)
            pipe.set(keys.run_result(run_id), msgpack.packb(answer, default=repr), ex=RESULT_TTL_S)
            pipe.rpush(keys.run_result_notify(run_id), b"1")
            pipe.expire(keys.run_result_notify(run_id), RESULT_TTL_S)
            await pipe.execute()
        return outcome
