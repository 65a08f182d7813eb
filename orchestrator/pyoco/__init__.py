"""A pyoco-compatible surface (pyoco 0.5.1's module paths) on tokiwa's workflow engine.

Code written for pyoco imports the same names from ``orchestrator.pyoco``::

    from orchestrator.pyoco import task
    from orchestrator.pyoco.core.models import Flow
    from orchestrator.pyoco.core.engine import Engine

or keeps ``import pyoco`` unchanged after one line, run before it (see :mod:`.alias`)::

    import orchestrator.pyoco.alias  # noqa: F401  - `import pyoco` now means orchestrator.pyoco

Modules, as pyoco's: ``core.models`` (Task, Flow, TaskState, RunStatus, RunContext),
``core.context`` (Context, LoopFrame), ``core.engine`` (Engine), ``core.exceptions``,
``core.base_task``, ``dsl.syntax`` (task, switch, fragments), ``dsl.nodes``,
``dsl.expressions``, ``dsl.validator`` (FlowValidator), ``trace.backend`` / ``trace.console``,
``discovery.plugins`` / ``discovery.loader`` (entry-point plug-ins), ``schemas.config``.
Tasks run on :class:`~orchestrator.workflow.runner.Runner`; see docs/pyoco.md.
"""

from __future__ import annotations

from typing import Any

from orchestrator.pyoco._alias import install_alias, remove_alias
from orchestrator.pyoco.core.context import Context
from orchestrator.pyoco.core.engine import Engine
from orchestrator.pyoco.core.models import Flow, RunStatus, Task, TaskState
from orchestrator.pyoco.dsl.syntax import switch, task
from orchestrator.pyoco.trace.console import ConsoleTraceBackend, SilentTraceBackend


def run(flow: Flow, params: dict[str, Any] | None = None, trace: bool = True, cute: bool = True) -> Context:
    """``Engine(...).run(flow, params)`` with console trace lines (cute or plain); ``trace=False``
    prints none (pyoco 0.5.1 ignored it)."""
    backend = ConsoleTraceBackend(style="cute" if cute else "plain") if trace else SilentTraceBackend()
    return Engine(trace_backend=backend).run(flow, params)


__all__ = ["task", "Flow", "run", "Task", "Engine", "Context", "TaskState", "RunStatus", "switch",
           "ConsoleTraceBackend", "install_alias", "remove_alias"]
