"""pyoco's API on tokiwa's engine: ``@task``, ``Flow``, ``>>`` chains and a local ``Engine``.

::

    @task
    def load(ctx):
        return {"n": 2}

    @task(retries=2, timeout_sec=3)
    def add(x, y):
        return x + y

    flow = Flow(name="main")
    flow >> load >> add(x="$node.load.output.n", y=40)
    result = Engine().run(flow)            # no Redis; result.output_of("add") == 42

``flow >> a >> [b, c] >> d`` fans out to b and c (each depends on a) and back in (d
depends on both); ``a & b`` is the same parallel group as ``[a, b]``. A flow becomes an
ordinary :class:`~orchestrator.workflow.model.Workflow` with :meth:`Flow.to_workflow`, so the
Orchestrator and the Runner run it like any other.

Calling a task wrapper with keyword arguments returns a *configured copy* (same name, those
inputs added); the decorated wrapper itself is never changed, so ``add(x=1)`` in one flow does
not leak into another. ``wrapper.task.inputs = {...}`` (pyoco's form) changes the task itself.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable, Iterable
from typing import Any, Literal

from orchestrator.errors import DependencyError, InvalidArgumentError, StateError
from orchestrator.workflow.interrupt import RunCapture, RunInterrupted, loop_running, say_interrupted
from orchestrator.workflow.model import Node, Workflow
from orchestrator.workflow.result import RunStatus, WorkflowRunResult
from orchestrator.workflow.retry import RetryPolicy
from orchestrator.workflow.runner import Runner
from orchestrator.workflow.task_binding import build_handler
from orchestrator.workflow.trace import Tracer

PYOCO_RETRY_DELAY_S = 0.1  # pyoco pauses a fixed 0.1 s between attempts


class Task:
    """A function plus how to call it in a flow (``inputs``) and how to retry it."""

    __slots__ = ("name", "func", "inputs", "retries", "timeout_sec", "retry_delay_s", "signature")

    def __init__(self, name: str, func: Callable[..., Any], inputs: dict[str, Any] | None = None, retries: int = 0,
                 timeout_sec: float | None = None, retry_delay_s: float = PYOCO_RETRY_DELAY_S) -> None:
        if not isinstance(name, str) or not name.strip():
            raise InvalidArgumentError(f"task name must be a non-blank string, got {name!r}")
        if not callable(func):
            raise InvalidArgumentError(f"task {name!r}: {func!r} is not callable")
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise InvalidArgumentError(f"task {name!r}: retries must be an integer >= 0, got {retries!r}")
        if timeout_sec is not None and (isinstance(timeout_sec, bool) or not isinstance(timeout_sec, (int, float))
                                        or timeout_sec <= 0):
            raise InvalidArgumentError(f"task {name!r}: timeout_sec must be a positive number, got {timeout_sec!r}")
        self.name, self.func, self.retries, self.timeout_sec = name, func, retries, timeout_sec
        self.retry_delay_s = retry_delay_s
        self.signature = inspect.signature(func)
        for param in self.signature.parameters.values():
            if param.kind is inspect.Parameter.POSITIONAL_ONLY:
                raise InvalidArgumentError(
                    f"task {name!r}: parameter {param.name!r} is positional-only; tasks are called with keywords")
        self.inputs: dict[str, Any] = {}
        self.set_inputs(inputs or {})

    def set_inputs(self, inputs: dict[str, Any]) -> None:
        """Add inputs (parameter -> literal or ``$`` reference); unknown parameters are an error."""
        params = self.signature.parameters
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        for key in inputs:
            if key not in params and not takes_any:
                raise InvalidArgumentError(
                    f"task {self.name!r} has no parameter {key!r} (parameters: {', '.join(params) or 'none'})")
        self.inputs.update(inputs)

    def copy(self, **changes: Any) -> Task:
        fields: dict[str, Any] = {"name": self.name, "func": self.func, "inputs": dict(self.inputs), "retries": self.retries,
                  "timeout_sec": self.timeout_sec, "retry_delay_s": self.retry_delay_s}
        fields.update({k: v for k, v in changes.items() if v is not None})
        return Task(**fields)

    def same_as(self, other: Task) -> bool:
        return self is other or (self.func is other.func and self.inputs == other.inputs
                                 and self.retries == other.retries and self.timeout_sec == other.timeout_sec)

    def to_node(self, depends_on: Iterable[str]) -> Node:
        retry = None
        if self.retries:
            retry = RetryPolicy(max_attempts=self.retries + 1, backoff="fixed", initial_delay_s=self.retry_delay_s)
        return Node(self.name, build_handler(self), list(depends_on), retry=retry, timeout=self.timeout_sec)

    def __repr__(self) -> str:
        return f"Task(name={self.name!r}, inputs={self.inputs!r})"


class TaskWrapper:
    """What ``@task`` returns: ``.task`` is the Task; calling it with keywords configures a copy."""

    def __init__(self, task_: Task) -> None:
        self.task = task_
        self.__name__ = task_.name
        self.__doc__ = getattr(task_.func, "__doc__", None)
        self.__wrapped__ = task_.func

    @property
    def name(self) -> str:
        return self.task.name

    @property
    def func(self) -> Callable[..., Any]:
        return self.task.func

    def __call__(self, *args: Any, **inputs: Any) -> TaskWrapper:
        if args:
            raise InvalidArgumentError(
                f"task {self.name!r}: pass inputs as keywords, e.g. {self.name}(x='$node.load.output'); "
                f"to call the function itself use {self.name}.func(...)")
        return TaskWrapper(self.task.copy(inputs={**self.task.inputs, **inputs}))

    def configure(self, *, name: str | None = None, inputs: dict[str, Any] | None = None, retries: int | None = None,
                  timeout_sec: float | None = None, retry_delay_s: float | None = None) -> TaskWrapper:
        """A copy with other settings, e.g. ``add.configure(name="add_again")`` to use a function twice."""
        merged = None if inputs is None else {**self.task.inputs, **inputs}
        return TaskWrapper(self.task.copy(name=name, inputs=merged, retries=retries, timeout_sec=timeout_sec,
                                          retry_delay_s=retry_delay_s))

    def __rshift__(self, other: Any) -> Chain:
        chain: Chain = Chain.of(self) >> other
        return chain

    def __rrshift__(self, other: Any) -> Chain:
        return Chain.of(other) >> self

    def __and__(self, other: Any) -> Chain:
        return Chain.of([self, other])

    def __repr__(self) -> str:
        return f"<task {self.name}>"


def task(func: Callable[..., Any] | None = None, *, name: str | None = None, retries: int = 0,
         timeout_sec: float | None = None, retry_delay_s: float = PYOCO_RETRY_DELAY_S,
         inputs: dict[str, Any] | None = None) -> Any:
    """Decorator: ``@task`` or ``@task(name=..., retries=2, timeout_sec=3, inputs={...})``."""
    def wrap(fn: Callable[..., Any]) -> TaskWrapper:
        return TaskWrapper(Task(name or fn.__name__, fn, inputs, retries, timeout_sec, retry_delay_s))
    if func is None:
        return wrap
    if not callable(func):
        raise InvalidArgumentError(f"@task decorates a function, got {func!r}; use @task(name=...) for options")
    return wrap(func)


class Chain:
    """A graph fragment: tasks, their dependencies, and the heads / tails to link it by."""

    __slots__ = ("tasks", "deps", "heads", "tails")

    def __init__(self) -> None:
        self.tasks: dict[str, Task] = {}
        self.deps: dict[str, list[str]] = {}
        self.heads: list[str] = []
        self.tails: list[str] = []

    @classmethod
    def of(cls, item: Any) -> Chain:
        if isinstance(item, Chain):
            return item
        chain = cls()
        if isinstance(item, (TaskWrapper, Task)):
            chain._merge(item.task if isinstance(item, TaskWrapper) else item)
            chain.heads = chain.tails = [item.name]
            return chain
        if isinstance(item, (list, tuple)) and item:
            for part in map(cls.of, item):
                chain._absorb(part)
                chain.heads = _unique(chain.heads + part.heads)
                chain.tails = _unique(chain.tails + part.tails)
            return chain
        raise InvalidArgumentError(f"cannot chain {item!r}: use @task functions, lists of them, or chains")

    def _merge(self, task_: Task) -> None:
        known = self.tasks.get(task_.name)
        if known is not None and not known.same_as(task_):
            raise DependencyError(
                f"two different tasks are named {task_.name!r}; rename one with .configure(name=...)",
                nodes=[task_.name])
        if known is None:
            self.tasks[task_.name] = task_
            self.deps[task_.name] = []

    def _absorb(self, other: Chain) -> None:
        for name, task_ in other.tasks.items():
            self._merge(task_)
            self.deps[name] = _unique(self.deps[name] + other.deps[name])

    def link(self, other: Any) -> Chain:
        """A new chain: this one, then ``other`` whose heads depend on this one's tails."""
        nxt = Chain.of(other)
        merged = Chain()
        merged._absorb(self)
        merged._absorb(nxt)
        for head in nxt.heads:
            merged.deps[head] = _unique(merged.deps[head] + self.tails)
        merged.heads = list(self.heads) or list(nxt.heads)
        merged.tails = list(nxt.tails)
        return merged

    def __rshift__(self, other: Any) -> Chain:
        return self.link(other)

    def __rrshift__(self, other: Any) -> Chain:
        return Chain.of(other).link(self)

    def __and__(self, other: Any) -> Chain:
        return Chain.of([self, other])


def _unique(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))


class Flow:
    """A named set of tasks and dependencies; ``flow >> x`` appends ``x`` after the current tail."""

    def __init__(self, name: str = "main", *, type: Literal["workflow", "chatflow"] = "workflow") -> None:  # noqa: A002
        if not isinstance(name, str) or not name.strip():
            raise InvalidArgumentError(f"flow name must be a non-blank string, got {name!r}")
        self.name, self.type = name, type
        self._chain = Chain()

    @property
    def tasks(self) -> dict[str, Task]:
        return dict(self._chain.tasks)

    @property
    def dependencies(self) -> dict[str, list[str]]:
        """Task name -> names of the tasks it depends on."""
        return {k: list(v) for k, v in self._chain.deps.items()}

    def __rshift__(self, other: Any) -> Flow:
        self._chain = self._chain.link(other)
        return self

    def add(self, item: Any, depends_on: Iterable[Any] = ()) -> Flow:
        """Add tasks without linking them to the tail (optionally after ``depends_on``)."""
        part = Chain.of(item)
        chain = self._chain
        chain._absorb(part)
        for head in part.heads:
            chain.deps[head] = _unique(chain.deps[head] + [getattr(d, "name", d) for d in depends_on])
        return self

    def to_workflow(self) -> Workflow:
        """The flow as a validated Workflow (cycles and unknown tasks are errors here)."""
        chain = self._chain
        nodes = [task_.to_node(chain.deps[name]) for name, task_ in chain.tasks.items()]
        return Workflow(self.name, nodes, type=self.type)

    def __repr__(self) -> str:
        return f"Flow(name={self.name!r}, tasks={list(self._chain.tasks)!r})"


class Engine:
    """Runs a flow (or workflow) in this process, without Redis, printing trace lines."""

    def __init__(self, trace: bool = True, cute: bool | None = None, *, concurrency: int = 8,
                 fail_fast: bool = True, stream: Any = None, runner: Runner | None = None) -> None:
        self.trace, self.cute, self.stream = trace, cute, stream
        self.concurrency, self.fail_fast = concurrency, fail_fast
        self.runner = runner or Runner()
        self._loops: set[asyncio.AbstractEventLoop] = set()

    def run(self, flow: Flow | Workflow, params: dict[str, Any] | None = None, **options: Any) -> WorkflowRunResult:
        """Run synchronously (``asyncio.run`` inside); ``params`` become the run's input.

        Ctrl+C cancels the run (its sync nodes are interrupted), writes one ``cancelled`` line
        on stderr and raises :class:`~orchestrator.workflow.interrupt.RunInterrupted`, a
        ``SystemExit`` with code 130 whose ``result`` is the cancelled run."""
        if loop_running():
            raise StateError("Engine.run cannot be called inside a running event loop; "
                             "use `await engine.run_async(flow)` there")
        capture = RunCapture()
        extra = options.pop("hooks", None)
        hooks = [*(extra if isinstance(extra, (list, tuple)) else [] if extra is None else [extra]), capture]
        try:
            return asyncio.run(self.run_async(flow, params, hooks=hooks, **options))
        except KeyboardInterrupt:
            result = capture.result
            if result is None or result.status != RunStatus.CANCELLED:
                raise
            line = say_interrupted(result.workflow_name, result.run_id, cute=self.cute)
        raise RunInterrupted(result, line)

    def cancel(self, run_id: str) -> bool:
        """Cancel a run this engine is running (from any thread); False if it is not running."""
        if run_id not in self.runner.active_runs:
            return False
        for loop in list(self._loops):
            try:
                loop.call_soon_threadsafe(self.runner.cancel, run_id)
            except RuntimeError:
                pass  # that loop has closed: its run is over
        return True

    async def run_async(self, flow: Flow | Workflow, params: dict[str, Any] | None = None, **options: Any) -> WorkflowRunResult:
        loop = asyncio.get_running_loop()
        self._loops.add(loop)
        try:
            return await self._run_async(flow, params, **options)
        finally:
            self._loops.discard(loop)

    async def _run_async(self, flow: Flow | Workflow, params: dict[str, Any] | None, **options: Any) -> WorkflowRunResult:
        workflow = flow.to_workflow() if isinstance(flow, Flow) else flow
        if not isinstance(workflow, Workflow):
            raise InvalidArgumentError(f"Engine.run expects a Flow or Workflow, got {flow!r}")
        if params is not None and not isinstance(params, dict):
            raise InvalidArgumentError(f"params must be a dict, got {type(params).__name__}")
        extra = options.pop("hooks", None)
        hooks = list(extra) if isinstance(extra, (list, tuple)) else [] if extra is None else [extra]
        if self.trace:
            fail_fast = options.get("fail_fast", self.fail_fast)
            hooks.append(Tracer(self.cute, self.stream).hooks(end_on_failure=not fail_fast))
        options.setdefault("concurrency", self.concurrency)
        options.setdefault("fail_fast", self.fail_fast)
        return await self.runner.run(workflow, input=dict(params or {}), hooks=hooks, **options)

