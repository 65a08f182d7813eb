"""``FlowValidator``: warnings and errors about a flow's control flow, without running it.

Warnings: an until loop without ``max_iter`` (it stops after 1000 iterations), a switch
without a ``"*"`` default. Errors: two cases of one switch with the same value, more than one
default, an unhashable case value, an unknown step type.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from orchestrator.pyoco.dsl.nodes import (
    DEFAULT_CASE_VALUE,
    ForEachNode,
    RepeatNode,
    SubFlowNode,
    SwitchNode,
    TaskNode,
    UntilNode,
)


@dataclass
class ValidationReport:
    warnings: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def status(self) -> str:
        """``error``, ``warning`` or ``ok``."""
        return "error" if self.errors else "warning" if self.warnings else "ok"

    def to_dict(self) -> dict[str, Any]:
        return {"status": self.status, "warnings": list(self.warnings), "errors": list(self.errors)}


class FlowValidator:
    """``FlowValidator(flow).validate()`` -> :class:`ValidationReport`; each message starts
    with the step's path, e.g. ``flow.step[1].case[2]``."""

    def __init__(self, flow: Any) -> None:
        self.flow = flow
        self.report = ValidationReport()

    def validate(self) -> ValidationReport:
        self._visit_steps(self.flow.build_program(), "flow")
        return self.report

    def _visit_steps(self, subflow: SubFlowNode, path: str) -> None:
        for index, node in enumerate(subflow.steps):
            self._visit(node, f"{path}.step[{index}]")

    def _visit(self, node: Any, path: str) -> None:
        if isinstance(node, TaskNode):
            return
        if isinstance(node, RepeatNode):
            self._visit_steps(node.body, f"{path}.repeat")
        elif isinstance(node, ForEachNode):
            self._visit_steps(node.body, f"{path}.foreach")
        elif isinstance(node, UntilNode):
            if node.max_iter is None:
                self.report.warnings.append(f"{path}: Until loop missing max_iter (defaults to 1000).")
            self._visit_steps(node.body, f"{path}.until")
        elif isinstance(node, SwitchNode):
            self._check_switch(node, path)
        elif isinstance(node, SubFlowNode):
            self._visit_steps(node, path)
        else:
            self.report.errors.append(f"{path}: Unknown node type {type(node).__name__}")

    def _check_switch(self, node: SwitchNode, path: str) -> None:
        seen: set[Any] = set()
        defaults = 0
        for index, case in enumerate(node.cases):
            case_path = f"{path}.case[{index}]"
            if case.value == DEFAULT_CASE_VALUE:
                defaults += 1
                if defaults > 1:
                    self.report.errors.append(f"{case_path}: Multiple default (*) cases are not allowed.")
            else:
                try:
                    duplicate = case.value in seen
                    seen.add(case.value)
                except TypeError:
                    self.report.errors.append(f"{case_path}: Unhashable switch value {case.value!r}.")
                else:
                    if duplicate:
                        self.report.errors.append(f"{case_path}: Duplicate switch value '{case.value}'.")
            self._visit_steps(case.target, f"{case_path}.target")
        if defaults == 0:
            self.report.warnings.append(f"{path}: Switch has no default (*) case.")
