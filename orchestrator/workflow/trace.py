"""pyoco-style trace lines for workflow runs, cute (default) or plain.

=========== ============================================== ==============================================
event       cute                                           plain
=========== ============================================== ==============================================
flow start  ``🐇 tokiwa > start flow=<flow> run_id=<id>``  ``INFO tokiwa start flow=<flow> run_id=<id>``
node start  ``🏃 start node=<node>``                        ``INFO tokiwa start node=<node>``
node end    ``✅ done node=<node> (<ms> ms)``               ``INFO tokiwa end node=<node> dur_ms=<ms>``
node error  ``💥 error node=<node> <error>``                ``ERROR tokiwa error node=<node> <error>``
flow end    ``🥕 done flow=<flow>``                         ``INFO tokiwa end flow=<flow>``
=========== ============================================== ==============================================

Milliseconds have two decimals and include retries; node start is printed once per node.
The flow-end line is not printed when a fail-fast run failed (as pyoco, whose run raises).

Plain mode: ``Tracer(cute=False)``, or ``Tracer.set_plain()`` (what ``--plain`` does) for
every tracer built afterwards, or ``TOKIWA_CUTE`` set to 0 / false / no / off (any case).
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, ClassVar, TextIO

from orchestrator.workflow.hooks import WorkflowHooks
from orchestrator.workflow.result import FAILURE_STATUSES, RunStatus

CUTE_ENV = "TOKIWA_CUTE"
_OFF = frozenset({"0", "false", "no", "off"})


def _error_text(error: BaseException) -> str:
    return str(error) or type(error).__name__


class Tracer:
    """Writes trace lines to ``stream`` (default: the current ``sys.stdout``)."""

    #: process-wide choice made by a CLI flag; None = decide from the environment
    default_cute: ClassVar[bool | None] = None

    def __init__(self, cute: bool | None = None, stream: TextIO | None = None) -> None:
        self.cute = self.resolve_cute(cute)
        self._stream = stream

    @classmethod
    def set_plain(cls, plain: bool = True) -> None:
        """Make tracers built without an explicit ``cute`` plain (``--plain``) or cute again."""
        cls.default_cute = not plain

    @classmethod
    def resolve_cute(cls, cute: bool | None = None) -> bool:
        """Explicit argument, else the CLI's choice, else ``TOKIWA_CUTE`` (default cute)."""
        if cute is not None:
            return bool(cute)
        if cls.default_cute is not None:
            return cls.default_cute
        return os.environ.get(CUTE_ENV, "1").strip().lower() not in _OFF

    def emit(self, line: str) -> None:
        stream = self._stream or sys.stdout
        stream.write(line + "\n")
        stream.flush()

    def flow_start(self, flow: str, run_id: str) -> None:
        self.emit(f"🐇 tokiwa > start flow={flow} run_id={run_id}" if self.cute
                  else f"INFO tokiwa start flow={flow} run_id={run_id}")

    def node_start(self, node: str) -> None:
        self.emit(f"🏃 start node={node}" if self.cute else f"INFO tokiwa start node={node}")

    def node_done(self, node: str, duration_ms: float) -> None:
        self.emit(f"✅ done node={node} ({duration_ms:.2f} ms)" if self.cute
                  else f"INFO tokiwa end node={node} dur_ms={duration_ms:.2f}")

    def node_error(self, node: str, error: BaseException) -> None:
        text = _error_text(error)
        self.emit(f"💥 error node={node} {text}" if self.cute else f"ERROR tokiwa error node={node} {text}")

    def flow_end(self, flow: str) -> None:
        self.emit(f"🥕 done flow={flow}" if self.cute else f"INFO tokiwa end flow={flow}")

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
        if ctx.attempt == 1:
            self._started[(ctx.run_id, node.name)] = time.perf_counter()
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
