"""The in-process workflow runner: runs one :class:`~orchestrator.workflow.model.Workflow` DAG.

Scheduling is event-driven, not level by level: a node starts as soon as every node it
depends on has *succeeded*, up to ``concurrency`` nodes at once; ties start in insertion
order. Async handlers run as tasks on the caller's loop (no thread hop); sync handlers run in
a daemon thread each (``threads.run_in_thread``), or in the ``executor`` given to :class:`Runner`.

Failure handling:

* ``fail_fast=True`` (default): the first node failure (after its retries) sets the run's
  ``signal``, cancels running async nodes at once (their awaits are interrupted), interrupts
  sync nodes (:mod:`orchestrator.workflow.threads`: the run does not wait for their threads,
  and Python code in them stops at its next bytecode), marks running nodes ``cancelled`` and
  never-started ones ``skipped``.
* ``fail_fast=False``: the dependents (transitively) of a failed node are ``skipped``;
  every other node still runs.
* ``timeout`` (whole run) aborts like fail-fast, then raises
  :class:`orchestrator.errors.TimeoutError` whose ``result`` attribute holds the partial
  result (status ``timed_out``). A node ``timeout`` bounds each attempt and fails that attempt with the same
  error type (retried if the node's policy allows).
* :meth:`Runner.cancel` aborts a run from outside; its status becomes ``cancelled``.
  Cancelling the task that awaits ``run()`` settles the run ``cancelled`` too (its hooks'
  ``on_run_complete`` sees it), then re-raises ``CancelledError``.
"""

from __future__ import annotations

import asyncio
import contextvars
import copy
import functools
import heapq
import logging
import time
import uuid
from collections import deque
from collections.abc import Mapping
from concurrent.futures import Executor
from typing import Any

from orchestrator import errors
from orchestrator.callbacks import call_and_await, resolve
from orchestrator.errors import InvalidArgumentError, RetryExhausted, WorkflowAborted, describe_error
from orchestrator.events import check_conversation_id
from orchestrator.workflow.context import AbortSignal, NodeContext, RunShared
from orchestrator.workflow.hooks import WorkflowHooks, call_hooks, collect_hooks
from orchestrator.workflow.model import DEFAULT_CONCURRENCY, Graph, Node, Workflow
from orchestrator.workflow.result import NodeResult, NodeStatus, RunStatus, RunTimeline, WorkflowRunResult
from orchestrator.workflow.retry import NO_RETRY, RetryPolicy
from orchestrator.workflow.threads import run_in_thread

__all__ = ["Runner", "WorkflowRunResult", "NodeResult", "NodeContext", "AbortSignal", "WorkflowHooks"]

logger = logging.getLogger("tokiwa.runner")
# How long an aborted run waits for cancelled nodes to unwind before it abandons them.
DEFAULT_CANCEL_GRACE_S = 1.0
class Runner:
    """Runs workflows in this process. One Runner may run many workflows concurrently.

    ``services`` (optional, overridable per run) is any object with some of: ``artifacts``
    (a store with store/load/list), ``publish_topic(topic, message)``, ``clock()`` (epoch
    seconds for timestamps), ``sleep(seconds)`` (async, used between retries), ``rng``
    (``random.Random`` for jitter). ``hooks`` are called for every run.
    """

    def __init__(self, *, services: Any = None, hooks: Any = None, executor: Executor | None = None,
                 cancel_grace_s: float = DEFAULT_CANCEL_GRACE_S) -> None:
        self.services = services
        self.hooks = hooks
        self.executor = executor
        self.cancel_grace_s = cancel_grace_s
        self._runs: dict[str, _Run] = {}
        self._abandoned: set[asyncio.Task[Any]] = set()

    @property
    def active_runs(self) -> list[str]:
        return list(self._runs)

    def result_of(self, run_id: str) -> WorkflowRunResult | None:
        """The live result of a run running here (updated in place as it runs), else None."""
        run = self._runs.get(run_id)
        return None if run is None else run.result

    async def run(self, workflow: Workflow, input: Any = None, context: Any = None,  # noqa: A002
                  concurrency: int | None = None, fail_fast: bool | None = None, timeout: float | None = None,
                  event: Any = None, conversation_id: str | None = None, memory: dict[str, Any] | None = None,
                  run_id: str | None = None, hooks: Any = None, services: Any = None,
                  resume: Mapping[str, NodeResult] | None = None) -> WorkflowRunResult:
        """Run ``workflow`` once and return its result (a failed node does not raise).

        ``concurrency``, ``fail_fast`` and ``timeout`` default to the workflow's
        ``max_parallel``, ``fail_fast`` and ``timeout_s``. ``resume`` (node name -> NodeResult,
        what an earlier execution of this run left) continues that execution: a node given as
        ``succeeded`` is not run again (it keeps that output, marked ``checkpointed``), and
        another node's ``attempts`` are the attempts already made (its next one is the one after).
        A pyoco :class:`~orchestrator.workflow.flow.Flow` (anything with ``to_workflow()``) is accepted too."""
        if not isinstance(workflow, Workflow) and callable(getattr(workflow, "to_workflow", None)):
            workflow = workflow.to_workflow()
        if not isinstance(workflow, Workflow):
            raise InvalidArgumentError(f"Runner.run expects a Workflow, got {workflow!r}")
        graph = workflow.validate()
        if workflow.type == "chatflow":
            check_conversation_id(conversation_id, chatflow=workflow.name)
        if concurrency is None:
            concurrency = workflow.max_parallel or DEFAULT_CONCURRENCY[workflow.type]
        timeout = workflow.timeout_s if timeout is None else timeout
        fail_fast = workflow.fail_fast if fail_fast is None else fail_fast
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
            raise InvalidArgumentError(f"concurrency must be an integer >= 1, got {concurrency!r}")
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                    or timeout <= 0):
            raise InvalidArgumentError(f"timeout must be a positive number of seconds, got {timeout!r}")
        if memory is not None and not isinstance(memory, dict):
            raise InvalidArgumentError(f"memory must be a dict, got {type(memory).__name__}")
        run_id = run_id or str(uuid.uuid4())
        if run_id in self._runs:
            raise errors.ConflictError(f"run {run_id!r} is already running in this runner")
        run = _Run(self, workflow, graph, run_id=run_id, input=input, context=context, event=event,
                   conversation_id=conversation_id, memory=copy.deepcopy(memory) if memory else {},
                   concurrency=concurrency, fail_fast=bool(fail_fast),
                   hooks=collect_hooks(self.hooks, hooks), services=services or self.services, resume=resume)
        self._runs[run_id] = run
        try:
            return await run.execute(timeout)
        finally:
            self._runs.pop(run_id, None)

    def cancel(self, run_id: str, reason: str = "run cancelled", *, by: str | None = None,
               at: float | None = None) -> bool:
        """Abort a running run (its status becomes ``cancelled``); False if it is not running here.

        ``by`` (who asked) and ``at`` (when, epoch seconds; default now) go into the result's
        ``cancelled_by`` / ``cancelled_at`` when this cancellation is what ends the run."""
        run = self._runs.get(run_id)
        if run is None:
            return False
        run.request_cancel(reason, by=by, at=at)
        return True

    def _adopt_abandoned(self, task: asyncio.Task[Any]) -> None:
        self._abandoned.add(task)
        task.add_done_callback(self._abandoned.discard)


class _Run:
    """The state of one run; scheduling and node execution."""

    def __init__(self, runner: Runner, workflow: Workflow, graph: Graph, *, run_id: str, input: Any,  # noqa: A002
                 context: Any, event: Any, conversation_id: str | None, memory: dict[str, Any], concurrency: int,
                 fail_fast: bool, hooks: dict[str, tuple[Any, ...]], services: Any,
                 resume: Mapping[str, NodeResult] | None = None) -> None:
        self.runner, self.workflow, self.graph = runner, workflow, graph
        self.concurrency, self.fail_fast, self.hooks = concurrency, fail_fast, hooks
        self.clock = getattr(services, "clock", None) or time.time
        self.sleep = getattr(services, "sleep", None) or asyncio.sleep
        self.rng = getattr(services, "rng", None)
        self.loop = asyncio.get_running_loop()
        self.result = WorkflowRunResult(
            run_id=run_id, workflow_id=workflow.id, workflow_name=workflow.name, workflow_type=workflow.type,
            conversation_id=conversation_id, memory=memory, redact=workflow.redact)
        self.node_results = [NodeResult(node_id=n.id, name=n.name) for n in graph.nodes]
        self.resume = resume or {}
        self.restored: set[int] = set()  # nodes an earlier execution completed: never launched
        self.result.nodes = {nr.name: nr for nr in self.node_results}
        self.signal = AbortSignal()
        artifacts = None  # RunShared builds it on first use
        self.shared = RunShared(workflow=workflow, graph=graph, input=input, context=context, event=event,
                                conversation_id=conversation_id, memory=memory, signal=self.signal,
                                artifacts=artifacts, services=services, clock=self.clock,
                                result=self.result, loop=self.loop)
        self.running: dict[int, asyncio.Task[Any]] = {}
        self.done: deque[int] = deque()
        self.wake = asyncio.Event()
        self.stopping = False
        self.cancelled = False
        self.timed_out: errors.TimeoutError | None = None
        self.rec = RunTimeline(self.result, self.clock)

    # ----------------------------------------------------------------- run level
    async def execute(self, timeout: float | None) -> WorkflowRunResult:
        result = self.result
        result.started_at = self.clock()
        t0 = time.perf_counter()
        result.timeline.append({"type": "run_start", "timestamp": result.started_at})
        if self.resume:
            self._restore()
        if self.hooks["on_run_start"]:
            await call_hooks("on_run_start", self.hooks["on_run_start"], self.workflow, result.run_id)
        timer = None if timeout is None else self.loop.call_later(timeout, self._on_timeout, timeout)
        try:
            await self._schedule()
        except BaseException:  # the caller was cancelled (or a bug): stop every node we started
            self._abort(WorkflowAborted(f"workflow {self.workflow.name!r}: run interrupted (its caller was "
                                        "cancelled: the worker stopped, or the caller stopped waiting)"))
            await asyncio.shield(self._drain())
            await self._interrupted(t0)
            raise
        finally:
            if timer is not None:
                timer.cancel()
        self._settle_leftovers()
        self._complete(t0)
        if self.hooks["on_run_complete"]:
            await call_hooks("on_run_complete", self.hooks["on_run_complete"], result)
        if self.timed_out is not None:
            self.timed_out.result = result  # type: ignore[attr-defined]
            raise self.timed_out
        return result

    async def _interrupted(self, t0: float) -> None:
        """The caller was cancelled (a worker shutting down, a lost stream entry): settle the
        run as ``cancelled`` and tell the hooks, so that it leaves a record and a webhook. The
        hooks run shielded: a second cancellation does not cut them off halfway."""
        self.cancelled = True
        self._settle_leftovers()
        self._complete(t0)
        if self.hooks["on_run_complete"]:
            try:
                await asyncio.shield(call_hooks("on_run_complete", self.hooks["on_run_complete"], self.result))
            except asyncio.CancelledError:
                pass  # the caller is cancelled anyway; the hooks go on in the background

    def _restore(self) -> None:
        """Apply ``resume``: completed nodes take their outcome, the others their attempt count."""
        for i, nr in enumerate(self.node_results):
            done = self.resume.get(nr.name)
            if done is None:
                continue
            if done.status == NodeStatus.SUCCEEDED:
                self.rec.restored(nr, done)
                self.restored.add(i)
            else:
                nr.attempts = max(0, int(done.attempts))

    def _complete(self, t0: float) -> None:
        result = self.result
        if self.cancelled:
            result.status = RunStatus.CANCELLED
            result.error = describe_error(self.signal.reason) if self.signal.reason else None
        elif self.timed_out is not None:
            result.status, result.error = RunStatus.TIMED_OUT, describe_error(self.timed_out)
        elif self.rec.first_error is not None or any(nr.status != NodeStatus.SUCCEEDED for nr in self.node_results):
            result.status = RunStatus.FAILED
            result.error = describe_error(self.rec.first_error) if self.rec.first_error else None
        else:
            result.status = RunStatus.SUCCEEDED
        result.finished_at = self.clock()
        result.duration_ms = (time.perf_counter() - t0) * 1000.0
        result.timeline.append({"type": "run_complete", "timestamp": result.finished_at,
                                "status": result.status, "duration_ms": result.duration_ms})

    def _on_timeout(self, timeout: float) -> None:
        if self.stopping:
            return
        self.timed_out = errors.TimeoutError(
            f"workflow {self.workflow.name!r} exceeded its timeout of {timeout:g}s", timeout_s=float(timeout))
        aborted = WorkflowAborted(f"workflow {self.workflow.name!r} timed out after {timeout:g}s")
        aborted.__cause__ = self.timed_out
        self._abort(aborted)

    def request_cancel(self, reason: str, *, by: str | None = None, at: float | None = None) -> None:
        if not self.stopping:
            self.cancelled = True
            if by is not None:
                self.result.cancelled_by = by
                self.result.cancelled_at = self.clock() if at is None else at
            self._abort(WorkflowAborted(f"workflow {self.workflow.name!r}: {reason}"))

    def _abort_reason(self) -> WorkflowAborted:
        return self.signal.reason or WorkflowAborted("workflow aborted")

    def _abort(self, reason: WorkflowAborted) -> None:
        """Stop starting nodes, set the signal, cancel running nodes (idempotent)."""
        if self.stopping:
            return
        self.stopping = True
        self.signal.set(reason)
        for task in self.running.values():
            task.cancel()
        self.wake.set()

    # ----------------------------------------------------------------- scheduling
    async def _schedule(self) -> None:
        graph, running, done, wake = self.graph, self.running, self.done, self.wake
        restored = self.restored
        remaining = [sum(d not in restored for d in ds) if restored else len(ds) for ds in graph.deps]
        ready = [i for i, n in enumerate(remaining) if n == 0 and i not in restored]  # sorted: a heap
        while True:
            while ready and len(running) < self.concurrency and not self.stopping:
                self._launch(heapq.heappop(ready))
            if not running:
                return
            if not done:
                wake.clear()
                if self.stopping:
                    await self._drain()
                    return
                await wake.wait()
            while done:
                i = done.popleft()
                task = running.pop(i)
                if not task.cancelled() and task.result():
                    for j in graph.dependents[i]:
                        remaining[j] -= 1
                        if remaining[j] == 0:
                            heapq.heappush(ready, j)
                else:
                    self._after_failure(i)

    def _launch(self, i: int) -> None:
        task = self.loop.create_task(self._run_node(i))
        self.running[i] = task
        task.add_done_callback(functools.partial(self._task_done, i))

    def _task_done(self, i: int, _task: asyncio.Task[Any]) -> None:
        self.done.append(i)
        self.wake.set()

    async def _drain(self) -> None:
        """After an abort: wait (bounded) for cancelled nodes to unwind, then abandon the rest."""
        tasks = [t for t in self.running.values() if not t.done()]
        if tasks:
            await asyncio.wait(tasks, timeout=self.runner.cancel_grace_s)
        for i, task in list(self.running.items()):
            if not task.done():
                logger.warning("node %r of run %s ignored cancellation; abandoning it",
                               self.graph.nodes[i].name, self.result.run_id)
                self.runner._adopt_abandoned(task)
                self.rec.cancelled(self.node_results[i], self._abort_reason())
        self.running.clear()
        self.done.clear()

    def _after_failure(self, i: int) -> None:
        if self.stopping:
            return
        if self.fail_fast:
            name = self.graph.nodes[i].name
            reason = WorkflowAborted(f"workflow {self.workflow.name!r} aborted: node {name!r} failed")
            reason.__cause__ = self.node_results[i].exception
            self._abort(reason)
            return
        stack = list(self.graph.dependents[i])
        while stack:
            j = stack.pop()
            if self.node_results[j].status == NodeStatus.PENDING:
                self.rec.skipped(self.node_results[j], f"dependency {self.graph.nodes[i].name!r} failed")
                stack.extend(self.graph.dependents[j])

    def _settle_leftovers(self) -> None:
        for nr in self.node_results:
            if nr.status == NodeStatus.PENDING:
                if self.cancelled:
                    self.rec.cancelled(nr, self._abort_reason())
                else:
                    self.rec.skipped(nr, "run aborted" if self.stopping else "dependency did not succeed")
            elif nr.status == NodeStatus.RUNNING:
                self.rec.cancelled(nr, self._abort_reason())

    # ----------------------------------------------------------------- one node
    async def _run_node(self, i: int) -> bool:
        """Run node ``i`` with its retries; record the outcome; True if it succeeded."""
        node, nr, hooks = self.graph.nodes[i], self.node_results[i], self.hooks
        policy = node.retry or NO_RETRY
        nr.status, nr.started_at = NodeStatus.RUNNING, self.clock()
        t0 = time.perf_counter()
        attempt = nr.attempts  # attempts an earlier execution of the run made (0 for a fresh run)
        try:
            while True:
                attempt += 1
                nr.attempts = attempt
                ctx = NodeContext(self.shared, node, attempt)
                self.rec.event("node_start", nr, attempt)
                if hooks["on_node_start"]:
                    await call_hooks("on_node_start", hooks["on_node_start"], node, ctx)
                try:
                    output = await self._call(node, ctx)
                except Exception as exc:  # noqa: BLE001 - every handler error is the node's outcome
                    error: Exception = exc
                else:
                    self.rec.succeeded(nr, output, t0)
                    if hooks["on_node_complete"]:
                        await call_hooks("on_node_complete", hooks["on_node_complete"], node, ctx, output)
                    return True
                if self.signal.is_set():
                    self.rec.cancelled(nr, self._abort_reason(), t0)
                    return False
                if not policy.should_retry(error, attempt):
                    return await self._fail(nr, ctx, policy, error, t0)
                await self._retry_pause(nr, ctx, policy, error)
                if self.signal.is_set():
                    self.rec.cancelled(nr, self._abort_reason(), t0)
                    return False
        except asyncio.CancelledError:
            self.rec.cancelled(nr, self._abort_reason(), t0)
            raise
        except Exception as exc:  # a bug in a hook adapter or recording: fail the node, not the run loop
            logger.exception("internal error while running node %r", node.name)
            self.rec.failed(nr, exc, t0)
            return False

    async def _call(self, node: Node, ctx: NodeContext) -> Any:
        if node.timeout is None:
            return await self._invoke(node, ctx)
        deadline = asyncio.timeout(node.timeout)
        try:
            async with deadline:
                return await self._invoke(node, ctx)
        except TimeoutError:
            if not deadline.expired():
                raise
            raise errors.TimeoutError(f"node {node.name!r} exceeded its timeout of {node.timeout:g}s",
                                      node=node.name, timeout_s=node.timeout) from None

    async def _invoke(self, node: Node, ctx: NodeContext) -> Any:
        if node.is_async:
            return await node.handler(ctx)
        if node.inline:
            return await call_and_await(node.handler, ctx)
        executor = self.runner.executor
        if executor is None:
            return await run_in_thread(node.handler, ctx)  # interrupted when the node is cancelled
        call = functools.partial(contextvars.copy_context().run, node.handler, ctx)
        return await resolve(await self.loop.run_in_executor(executor, call))

    async def _retry_pause(self, nr: NodeResult, ctx: NodeContext, policy: RetryPolicy, error: Exception) -> None:
        attempt = ctx.attempt
        delay = policy.delay_for(attempt, self.rng)
        self.rec.retrying(nr, error, attempt, delay)
        if self.hooks["on_node_retry"]:
            await call_hooks("on_node_retry", self.hooks["on_node_retry"], ctx.node, ctx, error, attempt, delay)
        if delay > 0:
            await self.sleep(delay)  # an abort cancels this task, cutting the pause short

    async def _fail(self, nr: NodeResult, ctx: NodeContext, policy: RetryPolicy, error: Exception,
                    t0: float) -> bool:
        node = ctx.node
        final: Exception = error
        if policy.max_attempts > 1 and ctx.attempt >= policy.max_attempts and policy.is_retryable(error):
            final = RetryExhausted(f"node {node.name!r} failed after {ctx.attempt} attempts: "
                                   f"{type(error).__name__}: {error}", node=node.name, attempts=ctx.attempt)
            final.__cause__ = error
        self.rec.failed(nr, final, t0)
        if self.hooks["on_node_error"]:
            await call_hooks("on_node_error", self.hooks["on_node_error"], node, ctx, final)
        return False
