"""pyoco's ``Engine`` on tokiwa's Runner: ``Engine().run(flow, params)`` returns the run's
:class:`~orchestrator.pyoco.core.context.Context` (``ctx.results`` keyed by task name).

* A plain DAG runs on :class:`~orchestrator.workflow.runner.Runner` (up to 8 tasks at once,
  each sync task in its own interruptible thread), with pyoco's failure rules
  (:mod:`orchestrator.pyoco.runtime`): a failed ``stop`` task makes ``run`` raise that task's
  exception, ``isolate`` fails the task and its dependents only, a timeout raises the builtin
  ``TimeoutError``.
* A flow with a loop or a ``switch`` runs its steps one at a time, in order; each task step
  is one Runner run (same retries, timeouts and trace).
* ``Engine.cancel(run_id)`` (from any thread) makes ``ctx.is_cancelled`` true at once,
  cancels pending tasks and interrupts running ones; the run ends CANCELLED and ``run``
  returns the Context.
* Ctrl+C ends the run CANCELLED, prints one ``cancelled`` line on stderr and raises
  :class:`~orchestrator.workflow.interrupt.RunInterrupted` (exit status 130; ``result`` is the
  Context).
* A cycle, or a dependency on a task that is not in the flow, is a
  :class:`~orchestrator.pyoco.core.exceptions.FlowGraphError` (a RuntimeError) before
  anything runs.

``run`` may be called from inside a running event loop (it then runs in a helper thread and
blocks, as pyoco's does); from async code prefer ``await engine.run_async(...)``.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any

from orchestrator.errors import InvalidArgumentError, WorkflowError
from orchestrator.pyoco.core.context import Context, LoopFrame
from orchestrator.pyoco.core.exceptions import FlowGraphError, FlowValueTypeError, UntilMaxIterationsExceeded
from orchestrator.pyoco.core.models import Flow, RunContext, RunStatus, Task, TaskState
from orchestrator.pyoco.dsl.expressions import Expression
from orchestrator.pyoco.dsl.nodes import (
    DEFAULT_CASE_VALUE,
    ForEachNode,
    RepeatNode,
    SubFlowNode,
    SwitchNode,
    TaskNode,
    UntilNode,
)
from orchestrator.pyoco.runtime import CAPTURE, RunBridge
from orchestrator.pyoco.trace.backend import TraceBackend
from orchestrator.pyoco.trace.console import ConsoleTraceBackend
from orchestrator.workflow.interrupt import RunInterrupted, loop_running, say_interrupted
from orchestrator.workflow.model import Workflow
from orchestrator.workflow.runner import Runner

DEFAULT_CONCURRENCY = 8  # pyoco's thread pool size
DEFAULT_MAX_ITER = 1000


class _Cancelled(Exception):
    """The run was cancelled between or during control-flow steps."""


class Engine:
    """Runs pyoco flows in this process (see the module doc)."""

    def __init__(self, trace_backend: TraceBackend | None = None, *, runner: Runner | None = None,
                 concurrency: int = DEFAULT_CONCURRENCY) -> None:
        self.trace = trace_backend or ConsoleTraceBackend()
        self.runner = runner or Runner()
        self.concurrency = concurrency
        self.active_runs: dict[str, RunContext] = {}
        self._bridges: dict[str, RunBridge] = {}

    def get_run(self, run_id: str) -> RunContext | None:
        return self.active_runs.get(run_id)

    def cancel(self, run_id: str) -> None:
        """Cancel a running run (from any thread): CANCELLING now, CANCELLED when it stops."""
        run = self.active_runs.get(run_id)
        if run is None or run.status != RunStatus.RUNNING:
            return
        run.status = RunStatus.CANCELLING
        bridge = self._bridges.get(run_id)
        if bridge is not None:
            bridge.request_cancel()

    # -- running
    def run(self, flow: Flow, params: dict[str, Any] | None = None, run_context: RunContext | None = None) -> Context:
        """Run ``flow`` and return its Context; a failed ``stop`` task's exception is raised."""
        run, ctx, bridge, plan = self._prepare(flow, params, run_context)
        self._register(flow, run, bridge)
        try:
            with CAPTURE.installed():
                self._drive(lambda: self._execute(flow, bridge, plan), bridge)
        except KeyboardInterrupt:
            if bridge.result is None:
                raise
            self._finish(bridge, RunStatus.CANCELLED)
            bridge.cancel_pending()
            line = say_interrupted(flow.name, run.run_id, cute=self._cute(), label="pyoco")
        except BaseException:
            self._finish(bridge, RunStatus.FAILED)
            raise
        else:
            return ctx
        finally:
            self._forget(run)
        raise RunInterrupted(ctx, line)

    async def run_async(self, flow: Flow, params: dict[str, Any] | None = None,
                        run_context: RunContext | None = None) -> Context:
        """:meth:`run` for async code: on the caller's loop (Ctrl+C is the caller's business)."""
        run, ctx, bridge, plan = self._prepare(flow, params, run_context)
        self._register(flow, run, bridge)
        try:
            with CAPTURE.installed():
                await self._execute(flow, bridge, plan)
        except BaseException:
            self._finish(bridge, RunStatus.CANCELLED if run.status == RunStatus.CANCELLING else RunStatus.FAILED)
            raise
        finally:
            self._forget(run)
        return ctx

    def _register(self, flow: Flow, run: RunContext, bridge: RunBridge) -> None:
        """The run starts: traced, and known to :meth:`get_run` / :meth:`cancel`."""
        self.trace.on_flow_start(flow.name, run_id=run.run_id)
        self.active_runs[run.run_id] = run
        self._bridges[run.run_id] = bridge

    def _forget(self, run: RunContext) -> None:
        self.active_runs.pop(run.run_id, None)
        self._bridges.pop(run.run_id, None)

    def _prepare(self, flow: Flow, params: dict[str, Any] | None,
                 run_context: RunContext | None) -> tuple[RunContext, Context, RunBridge, Any]:
        if not isinstance(flow, Flow):
            raise InvalidArgumentError(f"Engine.run expects a Flow, got {flow!r}")
        if params is not None and not isinstance(params, dict):
            raise InvalidArgumentError(f"params must be a dict, got {type(params).__name__}")
        run = run_context or RunContext()
        run.flow_name, run.params, run.status = flow.name, params or {}, RunStatus.RUNNING
        tasks = flow.ordered_tasks()
        for task in tasks:
            run.tasks[task.name] = TaskState.PENDING
            run.ensure_task_record(task.name)
        ctx = Context(params=params or {}, run_context=run)
        bridge = RunBridge(trace=self.trace, runner=self.runner, ctx=ctx, run=run, sequential=flow.has_control_flow())
        if bridge.sequential:
            return run, ctx, bridge, flow.build_program()
        check_graph(flow.name, tasks)
        return run, ctx, bridge, bridge.nodes(tasks)

    def _drive(self, make: Callable[[], Coroutine[Any, Any, None]], bridge: RunBridge) -> None:
        if not loop_running():
            asyncio.run(make())
            return
        box: dict[str, BaseException] = {}

        def target() -> None:
            try:
                asyncio.run(make())
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
                box["error"] = exc

        thread = threading.Thread(target=target, name="pyoco-engine", daemon=True)
        thread.start()
        try:
            thread.join()
        except KeyboardInterrupt:
            bridge.request_cancel()
            thread.join()
            raise
        if "error" in box:
            raise box["error"]

    async def _execute(self, flow: Flow, bridge: RunBridge, plan: Any) -> None:
        run = bridge.run
        try:
            if isinstance(plan, SubFlowNode):
                await self._steps(bridge, plan)
            else:
                result = await self.runner.run(
                    Workflow(flow.name, plan), input=dict(run.params), run_id=run.run_id, fail_fast=False,
                    concurrency=self.concurrency + len(bridge.any_parents), hooks=[bridge])
                bridge.settle_states(result)
                if bridge.stop_error is not None:
                    raise bridge.stop_error
                if str(result.status) == "cancelled":
                    raise _Cancelled
        except _Cancelled:
            bridge.cancel_pending()
            self.trace.on_flow_end(flow.name)
            self._finish(bridge, RunStatus.CANCELLED)
            return
        self.trace.on_flow_end(flow.name)
        self._finish(bridge, RunStatus.COMPLETED)

    def _finish(self, bridge: RunBridge, status: RunStatus) -> None:
        run = bridge.run
        if run.end_time is None or run.status in (RunStatus.RUNNING, RunStatus.CANCELLING):
            run.status, run.end_time = status, time.time()

    def _cute(self) -> bool | None:
        style = getattr(self.trace, "style", None)
        return None if style is None else style == "cute"

    # -- control flow: steps one at a time
    async def _steps(self, bridge: RunBridge, subflow: SubFlowNode) -> None:
        for node in subflow.steps:
            await self._step(bridge, node)

    async def _step(self, bridge: RunBridge, node: Any) -> None:
        ctx = bridge.ctx
        if isinstance(node, TaskNode):
            await self._task(bridge, node.task)
        elif isinstance(node, RepeatNode):
            count = _repeat_count(node.count, ctx)
            for index in range(count):
                await self._looped(bridge, node.body, LoopFrame("repeat", "repeat", index, index + 1, count))
        elif isinstance(node, ForEachNode):
            await self._foreach(bridge, node)
        elif isinstance(node, UntilNode):
            await self._until(bridge, node)
        elif isinstance(node, SwitchNode):
            await self._switch(bridge, node)
        elif isinstance(node, SubFlowNode):
            await self._steps(bridge, node)
        else:
            raise InvalidArgumentError(f"unknown flow step {node!r}")

    async def _looped(self, bridge: RunBridge, body: SubFlowNode, frame: LoopFrame, alias: str | None = None) -> None:
        ctx = bridge.ctx
        ctx.push_loop(frame)
        if alias:
            ctx.set_var(alias, frame.item)
        try:
            await self._steps(bridge, body)
        finally:
            if alias:
                ctx.clear_var(alias)
            ctx.pop_loop()

    async def _foreach(self, bridge: RunBridge, node: ForEachNode) -> None:
        items = _evaluate(node.source, bridge.ctx)
        if not isinstance(items, (list, tuple)):
            raise FlowValueTypeError(f"for-each source {node.source.source!r} gave {type(items).__name__}, "
                                       "not a list or tuple")
        label = node.alias or node.source.source
        for index, item in enumerate(items):
            frame = LoopFrame(f"foreach:{label}", "foreach", index, index + 1, len(items), item)
            await self._looped(bridge, node.body, frame, node.alias)

    async def _until(self, bridge: RunBridge, node: UntilNode) -> None:
        max_iter = node.max_iter or DEFAULT_MAX_ITER
        last: bool | None = None
        for iteration in range(1, max_iter + 1):
            frame = LoopFrame("until", "until", iteration - 1, iteration, max_iter, condition=last)
            bridge.ctx.push_loop(frame)
            try:
                await self._steps(bridge, node.body)
                last = bool(_evaluate(node.condition, bridge.ctx))
            finally:
                bridge.ctx.pop_loop()
            if last:
                return
        raise UntilMaxIterationsExceeded(node.condition.source, max_iter)

    async def _switch(self, bridge: RunBridge, node: SwitchNode) -> None:
        value = _evaluate(node.expression, bridge.ctx)
        default = next((case for case in node.cases if case.value == DEFAULT_CASE_VALUE), None)
        chosen = next((case for case in node.cases if case.value != DEFAULT_CASE_VALUE and case.value == value),
                      default)
        if chosen is not None:
            await self._steps(bridge, chosen.target)

    async def _task(self, bridge: RunBridge, task: Task) -> None:
        run = bridge.run
        if run.status != RunStatus.RUNNING:
            raise _Cancelled
        bridge.started.pop(task.name, None)
        bridge.last_error = None
        result = await self.runner.run(Workflow(run.flow_name, [bridge.node(task, [])]), input=dict(run.params),
                                       run_id=run.run_id, hooks=[bridge])
        status = str(result.status)
        if status == "cancelled":
            raise _Cancelled
        if status != "succeeded":
            raise bridge.last_error or WorkflowError(f"task {task.name!r} ended {status}")


def check_graph(flow_name: str, tasks: list[Task]) -> None:
    """A FlowGraphError for a dependency outside the flow or a cycle (OR-join edges included)."""
    deps = {task.name: sorted(d.name for d in task.dependencies) for task in tasks}
    for name, needed in deps.items():
        missing = [d for d in needed if d not in deps]
        if missing:
            raise FlowGraphError(f"Deadlock or cycle detected in workflow {flow_name!r}: task {name!r} "
                                 f"depends on {', '.join(map(repr, missing))}, which is not in the flow")
    cycle = _find_cycle(deps)
    if cycle:
        raise FlowGraphError(f"Deadlock or cycle detected in workflow {flow_name!r}: "
                             f"{' -> '.join(cycle)} (each waits for the next)")


def _find_cycle(deps: dict[str, list[str]]) -> list[str] | None:
    """One dependency cycle (first task repeated at the end), or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    for root in deps:
        if state.get(root):
            continue
        path, stack = [root], [iter(deps[root])]
        state[root] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(deps[nxt]))
    return None


def _evaluate(expression: Any, ctx: Context) -> Any:
    if isinstance(expression, Expression):
        return expression.evaluate(ctx=ctx.expression_data(), env=ctx.env_data())
    return expression


def _repeat_count(count: Any, ctx: Context) -> int:
    value = _evaluate(count, ctx)
    if isinstance(value, bool) or not isinstance(value, int):
        raise FlowValueTypeError(f"repeat count must be an integer, got {value!r}")
    if value < 0:
        raise InvalidArgumentError(f"repeat count must be >= 0, got {value}")
    return value

