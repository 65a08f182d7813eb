"""How a pyoco flow runs on tokiwa's :class:`~orchestrator.workflow.runner.Runner`.

Each task becomes a :class:`~orchestrator.workflow.model.Node` named after it; a
:class:`RunBridge` (the run's hooks) keeps pyoco's Context, task states, records and trace
calls in step with what the Runner does. pyoco's semantics on top of the Runner's:

* the run is not fail-fast for the Runner; a ``stop`` task that failed for good cancels the
  rest of the run (running tasks are interrupted, pending ones cancelled) and ``Engine.run``
  raises that task's own exception; an ``isolate`` task fails alone: its dependents are
  FAILED without running, every other task goes on, the run COMPLETES;
* ``retries`` are tokiwa retries with pyoco's fixed 0.1 s pause; ``timeout_sec`` bounds each
  attempt and a timed-out attempt is not retried; the error is the builtin ``TimeoutError``
  ("Task '<name>' exceeded timeout of <s>s");
* an OR-join (``trigger_policy="ANY"``) node has no Runner edges: it waits (without a thread)
  until one of its dependencies succeeded, and fails silently when all of them failed;
* a task's stdout / stderr is captured into ``run_context.logs`` (and still printed).
"""

from __future__ import annotations

import asyncio
import inspect
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TextIO

from orchestrator import errors
from orchestrator.pyoco.core.context import Context
from orchestrator.pyoco.core.models import FAIL_POLICIES, TRIGGER_POLICIES, RunContext, Task, TaskState
from orchestrator.workflow.hooks import WorkflowHooks
from orchestrator.workflow.model import Node
from orchestrator.workflow.retry import RetryPolicy
from orchestrator.workflow.threads import run_in_thread

RETRY_DELAY_S = 0.1  # pyoco's fixed pause between attempts
OUTPUT_ROOTS = ("scratch", "results", "params")


class PyocoRetry(RetryPolicy):
    """pyoco's retries: every error but a timeout is retried."""

    __slots__ = ()

    def is_retryable(self, error: BaseException) -> bool:
        return not isinstance(error, errors.TimeoutError) and RetryPolicy.is_retryable(self, error)


class ParentsFailed(errors.DependencyError):
    """Raised for an OR-join task whose dependencies all failed (it is FAILED, not traced)."""


# --- what a task is called with, and where its result goes ------------------------------------
def bind_arguments(task: Task, ctx: Context, signature: inspect.Signature | None = None) -> dict[str, Any]:
    """pyoco's wiring: resolved ``inputs``, then ``ctx``, then a run parameter or a task result
    of the parameter's name."""
    kwargs = {key: ctx.resolve(value) for key, value in task.inputs.items()}
    params = (signature or inspect.signature(task.func)).parameters
    if "ctx" in params:
        kwargs["ctx"] = ctx
    for name, param in params.items():
        if name in kwargs or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        if name in ctx.params:
            kwargs[name] = ctx.params[name]
        elif name in ctx.results:
            kwargs[name] = ctx.results[name]
    return kwargs


def store_outputs(task: Task, ctx: Context, result: Any) -> None:
    """Each ``outputs`` path (``scratch.a.b``, ``results.x``, ``params.y``) also gets the result."""
    for target in task.outputs:
        root, *path = target.split(".")
        if root not in OUTPUT_ROOTS or not path:
            continue
        current = getattr(ctx, root)
        for part in path[:-1]:
            current = current.setdefault(part, {})
            if not isinstance(current, dict):
                break
        else:
            current[path[-1]] = result


def check_task(task: Task) -> None:
    """A clear error for a task attribute pyoco would have misread."""
    where = f"task {task.name!r}"
    if not isinstance(task.name, str) or not task.name.strip():
        raise errors.InvalidArgumentError(f"task name must be a non-blank string, got {task.name!r}")
    if not callable(task.func):
        raise errors.InvalidArgumentError(f"{where}: func {task.func!r} is not callable")
    if task.fail_policy not in FAIL_POLICIES:
        raise errors.InvalidArgumentError(f"{where}: fail_policy must be one of {FAIL_POLICIES}, got {task.fail_policy!r}")
    if task.trigger_policy not in TRIGGER_POLICIES:
        raise errors.InvalidArgumentError(
            f"{where}: trigger_policy must be one of {TRIGGER_POLICIES}, got {task.trigger_policy!r}")
    if isinstance(task.retries, bool) or not isinstance(task.retries, int) or task.retries < 0:
        raise errors.InvalidArgumentError(f"{where}: retries must be an integer >= 0, got {task.retries!r}")
    timeout = task.timeout_sec
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0):
        raise errors.InvalidArgumentError(f"{where}: timeout_sec must be a positive number, got {timeout!r}")


# --- stdout / stderr of a task's thread ----------------------------------------------------------
class _Tee:
    """Stands in for sys.stdout / sys.stderr during runs: writes go to the original stream
    and, from a task's thread, into that task's buffer too."""

    def __init__(self, target: TextIO, which: str, local: threading.local) -> None:
        self._target, self._which, self._local = target, which, local

    def write(self, text: str) -> int:
        buffers = getattr(self._local, "buffers", None)
        if buffers is not None:
            buffers[self._which].append(text)
        return self._target.write(text)

    def flush(self) -> None:
        self._target.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._target, name)


class _Capture:
    """Installs the tees while any run is running (reference counted)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users = 0
        self._local = threading.local()

    @contextmanager
    def installed(self) -> Iterator[None]:
        with self._lock:
            self._users += 1
            if self._users == 1:
                sys.stdout = _Tee(sys.stdout, "stdout", self._local)
                sys.stderr = _Tee(sys.stderr, "stderr", self._local)
        try:
            yield
        finally:
            with self._lock:
                self._users -= 1
                if self._users == 0:
                    for name in ("stdout", "stderr"):
                        stream = getattr(sys, name)
                        if isinstance(stream, _Tee):
                            setattr(sys, name, stream._target)

    @contextmanager
    def task(self, run: RunContext, name: str) -> Iterator[None]:
        buffers: dict[str, list[str]] = {"stdout": [], "stderr": []}
        self._local.buffers = buffers
        try:
            yield
        finally:
            self._local.buffers = None
            for which, parts in buffers.items():
                run.append_log(name, which, "".join(parts))


CAPTURE = _Capture()


# --- the bridge -------------------------------------------------------------------------------
class RunBridge(WorkflowHooks):
    """One pyoco run on the Runner: builds the nodes and, as the run's hooks, keeps the
    Context, states, records and trace in step."""

    def __init__(self, *, trace: Any, runner: Any, ctx: Context, run: RunContext, sequential: bool) -> None:
        self.trace, self.runner, self.ctx, self.run = trace, runner, ctx, run
        self.sequential = sequential
        self.tasks: dict[str, Task] = {}
        self.children: dict[str, list[str]] = {}      # ALL edges: task -> dependents
        self.any_parents: dict[str, list[str]] = {}   # OR-join task -> its dependencies
        self.any_children: dict[str, list[str]] = {}
        self.outcome: dict[str, bool] = {}
        self.gates: dict[str, asyncio.Event] = {}
        self.started: dict[str, float] = {}
        self.stop_error: BaseException | None = None
        self.last_error: BaseException | None = None
        self.result: Any = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._signatures: dict[str, tuple[Any, inspect.Signature]] = {}

    # -- building
    def nodes(self, tasks: list[Task]) -> list[Node]:
        self.tasks.update((task.name, task) for task in tasks)
        order = {name: i for i, name in enumerate(self.tasks)}
        built = []
        for task in tasks:
            deps = sorted({d.name for d in task.dependencies}, key=order.__getitem__)
            if task.trigger_policy == "ANY" and deps:
                self.any_parents[task.name] = deps
                for dep in deps:
                    self.any_children.setdefault(dep, []).append(task.name)
                built.append(self.node(task, []))
            else:
                for dep in deps:
                    self.children.setdefault(dep, []).append(task.name)
                built.append(self.node(task, deps))
        return built

    def node(self, task: Task, depends_on: list[str]) -> Node:
        check_task(task)
        self.tasks.setdefault(task.name, task)
        retry = None
        if task.retries:
            retry = PyocoRetry(max_attempts=task.retries + 1, backoff="fixed", initial_delay_s=RETRY_DELAY_S)
        gated = task.name in self.any_parents
        return Node(task.name, self._handler(task, gated), depends_on, retry=retry,
                    timeout=None if gated else task.timeout_sec)

    def _handler(self, task: Task, gated: bool) -> Callable[[Any], Any]:
        is_async = inspect.iscoroutinefunction(task.func)
        if not gated and not is_async:
            def handler(_node_ctx: Any) -> Any:
                return self.call(task)
            return handler

        async def async_handler(_node_ctx: Any) -> Any:
            if gated:
                await self._gate(task.name)
                self.begin(task.name)
            call = self.call_async(task) if is_async else run_in_thread(self.call, task)
            if gated and task.timeout_sec:
                deadline = asyncio.timeout(task.timeout_sec)
                try:
                    async with deadline:
                        return await call
                except TimeoutError:
                    if not deadline.expired():
                        raise
                    raise errors.TimeoutError(f"node {task.name!r} exceeded its timeout of {task.timeout_sec:g}s",
                                              node=task.name, timeout_s=task.timeout_sec) from None
            return await call
        return async_handler

    # -- calling a task
    def call(self, task: Task) -> Any:
        """One attempt, in the node's thread."""
        kwargs = self._arguments(task)
        with CAPTURE.task(self.run, task.name):
            result = task.func(**kwargs)
        return self._store(task, result)

    async def call_async(self, task: Task) -> Any:
        kwargs = self._arguments(task)
        return self._store(task, await task.func(**kwargs))

    def _arguments(self, task: Task) -> dict[str, Any]:
        known = self._signatures.get(task.name)
        if known is None or known[0] is not task.func:  # read once per run (and if func changed)
            known = self._signatures[task.name] = (task.func, inspect.signature(task.func))
        kwargs = bind_arguments(task, self.ctx, known[1])
        self.run.ensure_task_record(task.name).inputs = {k: v for k, v in kwargs.items() if k != "ctx"}
        return kwargs

    def _store(self, task: Task, result: Any) -> Any:
        self.ctx.set_result(task.name, result)
        store_outputs(task, self.ctx, result)
        return result

    async def _gate(self, name: str) -> None:
        parents = self.any_parents[name]
        event = self.gates.setdefault(name, asyncio.Event())
        while True:
            if any(self.outcome.get(p) is True for p in parents):
                return
            if all(self.outcome.get(p) is False for p in parents):
                raise ParentsFailed(f"task {name!r}: every task it waits for ({', '.join(parents)}) failed",
                                    nodes=[name, *parents])
            event.clear()
            await event.wait()

    # -- hooks
    def on_run_start(self, workflow: Any, run_id: str) -> None:
        self.loop = asyncio.get_running_loop()

    def on_node_start(self, node: Any, ctx: Any) -> None:
        if node.name not in self.any_parents:
            self.begin(node.name)

    def begin(self, name: str) -> None:
        if name in self.started:
            return
        self.started[name] = time.perf_counter()
        record = self.run.ensure_task_record(name)
        record.state, record.started_at, record.error, record.traceback = TaskState.RUNNING, time.time(), None, None
        self.run.tasks[name] = TaskState.RUNNING
        self.trace.on_node_start(name)

    def on_node_complete(self, node: Any, ctx: Any, output: Any) -> None:
        duration_ms = (time.perf_counter() - self.started.pop(node.name, time.perf_counter())) * 1000.0
        self.trace.on_node_end(node.name, duration_ms)
        record = self._ended(node.name, TaskState.SUCCEEDED)
        record.output = output
        self._settle(node.name, True)

    def on_node_error(self, node: Any, ctx: Any, error: BaseException) -> None:
        name = node.name
        self.started.pop(name, None)
        err = self.pyoco_error(name, error)
        record = self._ended(name, TaskState.FAILED)
        record.error, record.traceback = str(err), "".join(traceback.format_exception(err))
        self.last_error = err
        if isinstance(err, ParentsFailed):
            self._fail_dependents(name)
            return
        self.trace.on_node_error(name, err)
        if self.sequential:
            return
        if self.tasks[name].fail_policy == "isolate":
            self._fail_dependents(name)
        elif self.stop_error is None:
            self.stop_error = err
            # after this hook returns: cancelling now would also cancel the hook's own node task
            asyncio.get_running_loop().call_soon(self.runner.cancel, self.run.run_id, f"task {name!r} failed")

    def on_run_complete(self, result: Any) -> None:
        self.result = result

    def _ended(self, name: str, state: TaskState) -> Any:
        record = self.run.ensure_task_record(name)
        record.state, record.ended_at = state, time.time()
        if record.started_at is not None:
            record.duration_ms = (record.ended_at - record.started_at) * 1000.0
        self.run.tasks[name] = state
        return record

    def _settle(self, name: str, ok: bool) -> None:
        self.outcome[name] = ok
        for child in self.any_children.get(name, ()):
            gate = self.gates.get(child)
            if gate is not None:
                gate.set()

    def _fail_dependents(self, name: str) -> None:
        """pyoco marks the dependents of a failed task FAILED without running them."""
        self._settle(name, False)
        stack = list(self.children.get(name, ()))
        while stack:
            child = stack.pop()
            if self.run.tasks.get(child) == TaskState.PENDING:
                self._ended(child, TaskState.FAILED)
                self._settle(child, False)
                stack.extend(self.children.get(child, ()))

    def pyoco_error(self, name: str, error: BaseException) -> BaseException:
        """The error pyoco would raise: the task's own (not tokiwa's RetryExhausted), and the
        builtin TimeoutError for a timeout."""
        if isinstance(error, errors.RetryExhausted) and error.__cause__ is not None:
            error = error.__cause__
        if isinstance(error, errors.TimeoutError) and error.node == name:
            timeout = self.tasks[name].timeout_sec
            builtin = TimeoutError(f"Task '{name}' exceeded timeout of {timeout}s")
            builtin.__cause__ = error
            return builtin
        return error

    # -- after the run
    def settle_states(self, result: Any) -> None:
        """Tasks the hooks did not settle take the Runner's verdict (cancelled / skipped)."""
        for name, node in result.nodes.items():
            if self.run.tasks.get(name) in (TaskState.PENDING, TaskState.RUNNING):
                status = str(node.status)
                if status == "cancelled":
                    self._ended(name, TaskState.CANCELLED)
                elif status in ("skipped", "failed"):
                    self._ended(name, TaskState.FAILED)

    def cancel_pending(self) -> None:
        for name, state in list(self.run.tasks.items()):
            if state in (TaskState.PENDING, TaskState.RUNNING):
                self._ended(name, TaskState.CANCELLED)

    def request_cancel(self) -> None:
        """From any thread: cancel what the Runner runs now (Engine.cancel)."""
        loop = self.loop
        if loop is not None:
            try:
                loop.call_soon_threadsafe(self.runner.cancel, self.run.run_id, "run cancelled")
            except RuntimeError:
                pass  # the loop has closed: the run is over
