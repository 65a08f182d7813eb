"""Errors of pyoco's control flow, in tokiwa's error family (``WorkflowError``)."""

from __future__ import annotations

from orchestrator.errors import InvalidArgumentError, WorkflowError


class ControlFlowError(WorkflowError):
    """Base of the errors a loop or a ``switch`` raises while a flow runs."""


class UntilMaxIterationsExceeded(ControlFlowError):
    """Raised when an until loop (``fragment % ("expr", max_iter)``) ran ``max_iter`` times
    and its condition never became true."""

    def __init__(self, expression: str, max_iter: int) -> None:
        super().__init__(f"Until condition '{expression}' exceeded max_iter={max_iter}")
        self.expression = expression
        self.max_iter = max_iter


class SwitchNoMatch(ControlFlowError):
    """Raised when a ``switch`` value matches no case (kept for pyoco code that catches it:
    the engine runs nothing in that case, as pyoco's does)."""

    def __init__(self, expression: str) -> None:
        super().__init__(f"Switch expression '{expression}' did not match any case.")
        self.expression = expression


class FlowGraphError(WorkflowError, RuntimeError):
    """Raised by ``Engine.run`` before anything runs when the flow's dependencies have a cycle
    or name a task that is not in the flow (pyoco: "Deadlock or cycle detected in workflow");
    ``__cause__`` is tokiwa's ``DependencyError`` naming the tasks."""


class FlowValueTypeError(InvalidArgumentError, TypeError):
    """Raised when a repeat count is not an integer or a for-each source not a list or tuple
    (a TypeError, as in pyoco, and tokiwa's InvalidArgumentError)."""
