"""The steps of a control-flow program: what the DSL operators build and the engine walks."""

from __future__ import annotations

from dataclasses import dataclass, field

from orchestrator.pyoco.core.models import Task
from orchestrator.pyoco.dsl.expressions import Expression

#: the value of the ``"*"`` case of a ``switch``
DEFAULT_CASE_VALUE = "__default__"


class DSLNode:
    """Base of every step."""


@dataclass
class TaskNode(DSLNode):
    """Run one task."""

    task: Task


@dataclass
class SubFlowNode(DSLNode):
    """Steps run one after the other."""

    steps: list[DSLNode] = field(default_factory=list)


@dataclass
class RepeatNode(DSLNode):
    """``fragment[n]``: the body ``count`` times (an int or an expression giving one)."""

    body: SubFlowNode
    count: int | Expression


@dataclass
class ForEachNode(DSLNode):
    """``fragment["$ctx.items as item"]``: the body once per item of a list or tuple."""

    body: SubFlowNode
    source: Expression
    alias: str | None = None


@dataclass
class UntilNode(DSLNode):
    """``fragment % "expr"`` / ``% ("expr", max_iter)``: the body until the expression is true."""

    body: SubFlowNode
    condition: Expression
    max_iter: int | None = None


@dataclass
class CaseNode(DSLNode):
    """``"value" >> fragment``: one case of a ``switch``."""

    value: str | int | float | bool
    target: SubFlowNode


@dataclass
class SwitchNode(DSLNode):
    """``switch("expr")[cases]``: the first case equal to the value, else the ``"*"`` one."""

    expression: Expression
    cases: list[CaseNode] = field(default_factory=list)
