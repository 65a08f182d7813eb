"""pyoco's DSL: ``@task``, ``>>`` sequences, ``&`` / ``|`` branches, loops and ``switch``.

* ``@task`` wraps a function into a :class:`TaskWrapper` (``.task`` is the Task, named after
  the function). ``@task(name=, inputs=, outputs=, retries=, timeout_sec=, fail_policy=,
  trigger_policy=)`` sets the task's attributes too (pyoco 0.5.1 accepted only the bare form).
  Calling the wrapper returns the wrapper itself, as in pyoco.
* ``a >> b`` is a :class:`FlowFragment` (a sequence) and makes b depend on a, on the task
  objects themselves.
* ``a & b`` is a :class:`Parallel` group, ``a | b`` a :class:`Branch`; ``(a | b) >> c``
  makes c an OR-join (``trigger_policy = "ANY"``: c runs once any of a, b succeeded).
* ``fragment[3]`` repeats, ``fragment["$ctx.params.items as item"]`` iterates (the alias is
  visible to expressions and ``ctx.get_var``), ``fragment % "expr"`` or
  ``% ("expr", max_iter)`` repeats until the expression is true (default max 1000).
* ``switch("$ctx.params.mode")["a" >> A, "*" >> B]`` runs the first case equal to the value,
  else the ``"*"`` default, else nothing.

A flow with a loop or a switch runs its steps one at a time, in order (as pyoco does).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from orchestrator.errors import InvalidArgumentError
from orchestrator.pyoco.core.models import FAIL_POLICIES, TRIGGER_POLICIES, Task
from orchestrator.pyoco.dsl.expressions import Expression, ensure_expression
from orchestrator.pyoco.dsl.nodes import (
    DEFAULT_CASE_VALUE,
    CaseNode,
    DSLNode,
    ForEachNode,
    RepeatNode,
    SubFlowNode,
    SwitchNode,
    TaskNode,
    UntilNode,
)

RESERVED_CTX_KEYS = frozenset({"params", "results", "scratch", "loop", "loops", "env", "artifacts"})
_CASE_VALUES = (str, int, float, bool)


class FlowFragment:
    """A sequence of steps; every DSL operator returns one, so fragments compose before they
    are added to a Flow."""

    __slots__ = ("_nodes",)

    def __init__(self, nodes: Sequence[DSLNode]) -> None:
        if not isinstance(nodes, (list, tuple)):
            raise InvalidArgumentError(f"FlowFragment expects a list of steps, got {nodes!r}")
        self._nodes: tuple[DSLNode, ...] = tuple(nodes)

    def __rshift__(self, other: Any) -> FlowFragment:
        right = ensure_fragment(other)
        before, after = self._last_task(), right._first_task()
        if before is not None and after is not None and before is not after:
            after.dependencies.add(before)
            before.dependents.add(after)
        return FlowFragment(self._nodes + right._nodes)

    def __rrshift__(self, other: Any) -> Any:
        """``"value" >> fragment`` is a switch case; ``[a, b] >> fragment`` joins a and b."""
        if isinstance(other, _CASE_VALUES):
            return CaseNode(value=DEFAULT_CASE_VALUE if other == "*" else other, target=self.to_subflow())
        if isinstance(other, (list, tuple)):
            return Parallel(other) >> self
        return NotImplemented

    def __getitem__(self, selector: int | str | Expression) -> FlowFragment:
        body = self.to_subflow()
        if isinstance(selector, bool):
            raise InvalidArgumentError(f"loop selector must be a count or an expression, got {selector!r}")
        if isinstance(selector, int):
            if selector < 0:
                raise InvalidArgumentError(f"repeat count must be >= 0, got {selector}")
            return FlowFragment([RepeatNode(body=body, count=selector)])
        if isinstance(selector, Expression):
            return FlowFragment([RepeatNode(body=body, count=selector)])
        if isinstance(selector, str):
            source, alias = parse_foreach_selector(selector)
            return FlowFragment([ForEachNode(body=body, source=ensure_expression(source), alias=alias)])
        raise InvalidArgumentError(f"unsupported loop selector {selector!r}: use fragment[3] or "
                                   "fragment['$ctx.params.items as item']")

    def __mod__(self, value: str | Expression | tuple[str | Expression, int]) -> FlowFragment:
        max_iter = None
        if isinstance(value, tuple):
            if len(value) != 2:
                raise InvalidArgumentError(f"until selector must be (expression, max_iter), got {value!r}")
            value, max_iter = value
            if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
                raise InvalidArgumentError(f"until max_iter must be an integer >= 1, got {max_iter!r}")
        return FlowFragment([UntilNode(body=self.to_subflow(), condition=ensure_expression(value), max_iter=max_iter)])

    def to_subflow(self) -> SubFlowNode:
        return SubFlowNode(list(self._nodes))

    def task_nodes(self) -> list[Task]:
        return [task for node in self._nodes for task in collect_tasks(node)]

    def has_control_flow(self) -> bool:
        return any(not isinstance(node, TaskNode) for node in self._nodes)

    def _first_task(self) -> Task | None:
        tasks = self.task_nodes()
        return tasks[0] if tasks else None

    def _last_task(self) -> Task | None:
        tasks = self.task_nodes()
        return tasks[-1] if tasks else None


class TaskWrapper(FlowFragment):
    """What ``@task`` returns: a one-step fragment; ``.task`` is the Task (pyoco's form
    ``wrapper.task.inputs = {...}`` configures it)."""

    __slots__ = ("task",)

    def __init__(self, task: Task) -> None:
        if not isinstance(task, Task):
            raise InvalidArgumentError(f"TaskWrapper wraps a Task, got {task!r}")
        self.task = task
        super().__init__([TaskNode(task)])

    def __call__(self, *args: Any, **kwargs: Any) -> TaskWrapper:
        return self

    def __and__(self, other: Any) -> Parallel:
        return Parallel([self, other])

    def __or__(self, other: Any) -> Branch:
        return Branch([self, other])

    def __repr__(self) -> str:
        return f"<task {self.task.name}>"


class _Group(list):  # type: ignore[type-arg]
    """``a & b`` / ``a | b``: ``group >> target`` makes the target depend on every member."""

    any_of = False

    def __rshift__(self, other: Any) -> Any:
        for target in _target_tasks(other):
            if self.any_of:
                target.trigger_policy = "ANY"
            for source in _target_tasks(list(self)):
                target.dependencies.add(source)
                source.dependents.add(target)
        return other

    def __and__(self, other: Any) -> Parallel:
        return Parallel([*self, other])

    def __or__(self, other: Any) -> Branch:
        return Branch([*self, other])


class Parallel(_Group):
    """``a & b``: parallel branches (``>>`` after it is an AND-join)."""


class Branch(_Group):
    """``a | b``: alternatives (``>>`` after it is an OR-join)."""

    any_of = True


@dataclass
class SwitchBuilder:
    expression: Expression

    def __getitem__(self, cases: CaseNode | Sequence[CaseNode]) -> FlowFragment:
        case_list = [cases] if isinstance(cases, CaseNode) else list(cases)
        if not case_list:
            raise InvalidArgumentError("switch() needs at least one case, e.g. switch(expr)['x' >> a, '*' >> b]")
        for case in case_list:
            if not isinstance(case, CaseNode):
                raise InvalidArgumentError(f"switch() case {case!r} is not a case: write 'value' >> task")
        return FlowFragment([SwitchNode(expression=self.expression, cases=case_list)])


def switch(expression: str | Expression) -> SwitchBuilder:
    """``switch("$ctx.params.mode")["a" >> A, "*" >> B]``."""
    return SwitchBuilder(expression=ensure_expression(expression))


def ensure_fragment(value: Any) -> FlowFragment:
    if isinstance(value, FlowFragment):
        return value
    if isinstance(value, Task):
        return TaskWrapper(value)
    if isinstance(getattr(value, "task", None), Task):
        return FlowFragment([TaskNode(value.task)])
    raise InvalidArgumentError(f"cannot use {value!r} in a flow: expected a @task function, a Task or a fragment")


def parse_foreach_selector(selector: str) -> tuple[str, str | None]:
    """``"$ctx.items as item"`` -> ``("$ctx.items", "item")``."""
    token, alias = selector.strip(), None
    if " as " in token:
        token, alias = (part.strip() for part in token.split(" as ", 1))
        if not alias or not alias.isidentifier() or alias in RESERVED_CTX_KEYS:
            raise InvalidArgumentError(f"invalid for-each alias {alias!r}: use an identifier other than "
                                       f"{', '.join(sorted(RESERVED_CTX_KEYS))}")
    return token, alias


def collect_tasks(node: Any) -> list[Task]:
    """Every task a step holds, in order."""
    if isinstance(node, TaskNode):
        return [node.task]
    if isinstance(node, SubFlowNode):
        return [task for step in node.steps for task in collect_tasks(step)]
    if isinstance(node, (RepeatNode, ForEachNode, UntilNode)):
        return collect_tasks(node.body)
    if isinstance(node, SwitchNode):
        return [task for case in node.cases for task in collect_tasks(case.target)]
    return []


def _target_tasks(other: Any) -> list[Task]:
    if isinstance(other, Task):
        return [other]
    if isinstance(getattr(other, "task", None), Task):
        return [other.task]
    if isinstance(other, (list, tuple)):
        return [task for item in other for task in _target_tasks(item)]
    return []


def task(func: Callable[..., Any] | None = None, *, name: str | None = None, inputs: dict[str, Any] | None = None,
         outputs: list[str] | None = None, retries: int = 0, timeout_sec: float | None = None,
         fail_policy: str = "stop", trigger_policy: str = "ALL") -> Any:
    """``@task`` or ``@task(name=..., retries=2, ...)``: a :class:`TaskWrapper`."""
    if fail_policy not in FAIL_POLICIES:
        raise InvalidArgumentError(f"fail_policy must be one of {FAIL_POLICIES}, got {fail_policy!r}")
    if trigger_policy not in TRIGGER_POLICIES:
        raise InvalidArgumentError(f"trigger_policy must be one of {TRIGGER_POLICIES}, got {trigger_policy!r}")

    def wrap(fn: Callable[..., Any]) -> TaskWrapper:
        if not callable(fn):
            raise InvalidArgumentError(f"@task decorates a function, got {fn!r}")
        return TaskWrapper(Task(func=fn, name=name or fn.__name__, inputs=dict(inputs or {}),
                                outputs=list(outputs or []), retries=retries, timeout_sec=timeout_sec,
                                fail_policy=fail_policy, trigger_policy=trigger_policy))

    return wrap if func is None else wrap(func)


__all__ = ["Branch", "FlowFragment", "Parallel", "SwitchBuilder", "TaskWrapper", "switch", "task"]
