"""pyoco-style trace lines for workflow runs, cute (default) or plain.

=============== ================================================= =================================================
event           cute                                              plain
=============== ================================================= =================================================
flow start      ``🐇 tokiwa > start flow=<flow> run_id=<id>``     ``INFO tokiwa start flow=<flow> run_id=<id>``
node start      ``🏃 start node=<node>``                           ``INFO tokiwa start node=<node>``
node end        ``✅ done node=<node> (<ms> ms)``                  ``INFO tokiwa end node=<node> dur_ms=<ms>``
node error      ``💥 error node=<node> <error>``                   ``ERROR tokiwa error node=<node> <error>``
flow end        ``🥕 done flow=<flow>``                            ``INFO tokiwa end flow=<flow>``
Ctrl+C          ``🛑 cancelled flow=<flow> run_id=<id> (Ctrl+C)``  ``WARNING tokiwa cancelled flow=<flow> run_id=<id> (Ctrl+C)``
=============== ================================================= =================================================

Milliseconds have two decimals and include retries; node start is printed once per node.
The flow-end line is not printed when a fail-fast run failed (as pyoco, whose run raises).
``label`` replaces ``tokiwa`` in the lines (the pyoco-compatible surface prints ``pyoco``).

Plain mode: ``Tracer(cute=False)``, or ``Tracer.set_plain()`` (what ``--plain`` does) for
every tracer built afterwards, or ``TOKIWA_CUTE`` set to 0 / false / no / off (any case);
without ``TOKIWA_CUTE``, pyoco's ``PYOCO_CUTE`` is read the same way.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, ClassVar, TextIO

from orchestrator.workflow.hooks import WorkflowHooks
from orchestrator.workflow.result import FAILURE_STATUSES, RunStatus

CUTE_ENV = "TOKIWA_CUTE"
PYOCO_CUTE_ENV = "PYOCO_CUTE"
_OFF = frozenset({"0", "false", "no", "off"})

#: event -> (cute, plain) line templates; fields: label, flow, run (" run_id=<id>" or ""),
#: run_id, node, ms, error, source, target. A None template prints nothing.
LINES: dict[str, tuple[str, str | None]] = {
    "flow_start": ("🐇 {label} > start flow={flow}{run}", "INFO {label} start flow={flow}{run}"),
    "node_start": ("🏃 start node={node}", "INFO {label} start node={node}"),
    "node_end": ("✅ done node={node} ({ms:.2f} ms)", "INFO {label} end node={node} dur_ms={ms:.2f}"),
    "node_error": ("💥 error node={node} {error}", "ERROR {label} error node={node} {error}"),
    "flow_end": ("🥕 done flow={flow}", "INFO {label} end flow={flow}"),
    "flow_interrupted": ("🛑 cancelled flow={flow} run_id={run_id} (Ctrl+C)",
                         "WARNING {label} cancelled flow={flow} run_id={run_id} (Ctrl+C)"),
    "node_transition": ("🐇 {source} -> {target}", None),
}


def trace_line(event: str, *, cute: bool, label: str = "tokiwa", **fields: Any) -> str | None:
    """The text of one trace line (None when the style prints nothing for ``event``)."""
    template = LINES[event][0 if cute else 1]
    if template is None:
        return None
    run_id = fields.get("run_id")
    return template.format(label=label, run=f" run_id={run_id}" if run_id else "", **fields)


def _error_text(error: BaseException) -> str:
    return str(error) or type(error).__name__


class Tracer:
    """Writes trace lines to ``stream`` (default: the current ``sys.stdout``)."""

    #: process-wide choice made by a CLI flag; None = decide from the environment
    default_cute: ClassVar[bool | None] = None

    def __init__(self, cute: bool | None = None, stream: TextIO | None = None, *, label: str = "tokiwa") -> None:
        self.cute = self.resolve_cute(cute)
        self._stream = stream
        self.label = label

    @classmethod
    def set_plain(cls, plain: bool = True) -> None:
        """Make tracers built without an explicit ``cute`` plain (``--plain``) or cute again."""
        cls.default_cute = not plain

    @classmethod
    def resolve_cute(cls, cute: bool | None = None) -> bool:
        """Explicit argument, else the CLI's choice, else ``TOKIWA_CUTE``, else ``PYOCO_CUTE``
        (default cute)."""
        if cute is not None:
            return bool(cute)
        if cls.default_cute is not None:
            return cls.default_cute
        value = os.environ.get(CUTE_ENV)
        if value is None:
            value = os.environ.get(PYOCO_CUTE_ENV, "1")
        return value.strip().lower() not in _OFF

    def emit(self, line: str) -> None:
        stream = self._stream or sys.stdout
        stream.write(line + "\n")
        stream.flush()

    def line(self, event: str, **fields: Any) -> str | None:
        """This tracer's text for ``event`` (see :data:`LINES`)."""
        return trace_line(event, cute=self.cute, label=self.label, **fields)

    def _write(self, event: str, **fields: Any) -> None:
        text = self.line(event, **fields)
        if text is not None:
            self.emit(text)

    def flow_start(self, flow: str, run_id: str) -> None:
        self._write("flow_start", flow=flow, run_id=run_id)

    def node_start(self, node: str) -> None:
        self._write("node_start", node=node)

    def node_done(self, node: str, duration_ms: float) -> None:
        self._write("node_end", node=node, ms=duration_ms)

    def node_error(self, node: str, error: BaseException) -> None:
        self._write("node_error", node=node, error=_error_text(error))

    def flow_end(self, flow: str) -> None:
        self._write("flow_end", flow=flow)

    def flow_interrupted(self, flow: str, run_id: str) -> None:
        """The one line of a run that Ctrl+C cancelled."""
        self._write("flow_interrupted", flow=flow, run_id=run_id)

    def hooks(self, *, end_on_failure: bool = False) -> TraceHooks:
        """Runner hooks that print this tracer's lines for a run."""
        return TraceHooks(self, end_on_failure=end_on_failure)


class TraceHooks(WorkflowHooks):
    """Runner hooks (see :mod:`orchestrator.workflow.runner`) that trace one or more runs."""

    def __init__(self, tracer: Tracer, *, end_on_failure: bool = False) -> None:
        self.tracer = tracer
        self.end_on_failure = end_on_failure
        self._started: dict[tuple[str, str], float] = {}

    def on_run_start(self, workflow: Any, run_id: str) -> None:
        self.tracer.flow_start(workflow.name, run_id)

    def on_node_start(self, node: Any, ctx: Any) -> None:
        key = (ctx.run_id, node.name)
        if key not in self._started:  # once per node, not per attempt
            self._started[key] = time.perf_counter()
            self.tracer.node_start(node.name)

    def on_node_complete(self, node: Any, ctx: Any, output: Any) -> None:
        started = self._started.pop((ctx.run_id, node.name), time.perf_counter())
        self.tracer.node_done(node.name, (time.perf_counter() - started) * 1000.0)

    def on_node_error(self, node: Any, ctx: Any, error: BaseException) -> None:
        self._started.pop((ctx.run_id, node.name), None)
        self.tracer.node_error(node.name, error)

    def on_run_complete(self, result: Any) -> None:
        for key in [k for k in self._started if k[0] == result.run_id]:
            del self._started[key]
        if result.status == RunStatus.SUCCEEDED or (self.end_on_failure and result.status in FAILURE_STATUSES):
            self.tracer.flow_end(result.workflow_name)
