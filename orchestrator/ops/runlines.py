"""One line per finished run, for a worker's output: cute (default) or plain, chosen as the
trace lines of ``tokiwa-producer run-file`` are (:class:`~orchestrator.workflow.trace.Tracer`:
``--plain`` / ``Tracer.set_plain()``, ``TOKIWA_CUTE=0``).

============ ===================================================== ====================================================
status       cute                                                  plain
============ ===================================================== ====================================================
succeeded    ``🥕 done flow=<f> run_id=<id> (<ms> ms) nodes=<n>``   ``INFO tokiwa run flow=<f> run_id=<id> status=succeeded dur_ms=<ms> nodes=<n>``
failed       ``💥 failed flow=<f> run_id=<id> (<ms> ms) node=<node> <error>`` ``ERROR tokiwa run flow=<f> run_id=<id> status=failed dur_ms=<ms> node=<node> <error>``
timed_out    ``⏰ timed out flow=<f> run_id=<id> (<ms> ms) <error>`` ``ERROR tokiwa run flow=<f> run_id=<id> status=timed_out dur_ms=<ms> <error>``
cancelled    ``🛑 cancelled flow=<f> run_id=<id> (<ms> ms) <error>`` ``WARNING tokiwa run flow=<f> run_id=<id> status=cancelled dur_ms=<ms> <error>``
============ ===================================================== ====================================================

``nodes`` is ``succeeded/total``; ``node`` names the first node that failed; ``<error>`` is
the run's error message on one line, at most 200 characters. A worker prints them with
``install(app.runner)`` (a :class:`RunLines` added to the runner's hooks).
"""

from __future__ import annotations

import sys
from typing import Any, TextIO

from orchestrator.workflow.hooks import WorkflowHooks
from orchestrator.workflow.trace import Tracer

MAX_ERROR_CHARS = 200

_CUTE = {"succeeded": "🥕 done", "failed": "💥 failed", "timed_out": "⏰ timed out", "cancelled": "🛑 cancelled"}
_LEVEL = {"succeeded": "INFO", "failed": "ERROR", "timed_out": "ERROR", "cancelled": "WARNING"}


def _one_line(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 1] + "…"


def run_line(result: Any, *, cute: bool) -> str:
    """The line of one settled run (a :class:`~orchestrator.workflow.result.WorkflowRunResult`)."""
    status = str(result.status)
    nodes = list(result.nodes.values())
    ms = f"{result.duration_ms or 0.0:.2f}"
    head = (f"{_CUTE.get(status, status)} flow={result.workflow_name} run_id={result.run_id} ({ms} ms)" if cute
            else f"{_LEVEL.get(status, 'INFO')} tokiwa run flow={result.workflow_name} run_id={result.run_id} "
                 f"status={status} dur_ms={ms}")
    if status == "succeeded":
        done = sum(1 for n in nodes if str(n.status) == "succeeded")
        return f"{head} nodes={done}/{len(nodes)}"
    parts = [head]
    if status == "failed":
        failed = next((n for n in nodes if str(n.status) == "failed"), None)
        if failed is not None:
            parts.append(f"node={failed.name}")
    error = result.error or {}
    message = error.get("message") if isinstance(error, dict) else str(error)
    if message:
        parts.append(_one_line(str(message)))
    return " ".join(parts)


class RunLines(WorkflowHooks):
    """Runner hooks that print :func:`run_line` when a run settles. ``cute`` None = the
    tracers' choice (``--plain``, ``TOKIWA_CUTE``), read once, when it is built."""

    def __init__(self, cute: bool | None = None, stream: TextIO | None = None) -> None:
        self.cute = Tracer.resolve_cute(cute)
        self._stream = stream

    def on_run_complete(self, result: Any) -> None:
        stream = self._stream or sys.stdout
        stream.write(run_line(result, cute=self.cute) + "\n")
        stream.flush()


def install(runner: Any, cute: bool | None = None, stream: TextIO | None = None) -> RunLines:
    """Add a :class:`RunLines` to ``runner``'s hooks (every run it runs prints its line)."""
    lines = RunLines(cute, stream)
    hooks = runner.hooks
    if hooks is None:
        runner.hooks = [lines]
    elif isinstance(hooks, (list, tuple)):
        runner.hooks = [*hooks, lines]
    else:
        runner.hooks = [hooks, lines]
    return lines
