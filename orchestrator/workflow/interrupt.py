"""Ctrl+C on a run that a synchronous call runs: the run ends ``cancelled``, one line says so,
and the program exits with status 130 (no traceback).

``asyncio.run`` in the main thread turns the first SIGINT into a cancellation of the task it
runs; the Runner then settles the run ``cancelled`` (its hooks see it, sync nodes are
interrupted: :mod:`orchestrator.workflow.threads`) and ``asyncio.run`` raises
``KeyboardInterrupt``. :class:`RunCapture`, a hooks object, keeps the settled result so that
the caller can name the run in its one line. A second Ctrl+C while the run settles raises
``KeyboardInterrupt`` at once, as Python does.

``Engine.run`` (tokiwa's and the pyoco-compatible one) raises :class:`RunInterrupted` after the
line; ``tokiwa-producer run-file`` returns :data:`INTERRUPTED_EXIT` (see :func:`interrupted_exit`).
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from typing import Any, TextIO

from orchestrator.workflow.hooks import WorkflowHooks
from orchestrator.workflow.trace import Tracer

INTERRUPTED_EXIT = 130  # 128 + SIGINT, what a shell reports for a program stopped by Ctrl+C


class RunInterrupted(SystemExit):
    """Raised by ``Engine.run`` when Ctrl+C cancelled the run it was running.

    It is a ``SystemExit`` with code 130: uncaught, the program ends with that status and no
    traceback, after the one ``cancelled`` line. ``result`` is the cancelled run (a
    ``WorkflowRunResult``; the pyoco Context for ``orchestrator.pyoco``). Catch it (or
    ``SystemExit``) to go on after a Ctrl+C."""

    def __init__(self, result: Any, message: str) -> None:
        super().__init__(INTERRUPTED_EXIT)
        self.result = result
        self.message = message

    def __str__(self) -> str:
        return self.message


class RunCapture(WorkflowHooks):
    """Hooks that keep the last settled result (``on_run_complete`` runs for cancelled runs too)."""

    def __init__(self) -> None:
        self.result: Any = None

    def on_run_complete(self, result: Any) -> None:
        self.result = result


def interrupted_line(flow: str, run_id: str, *, cute: bool | None = None, label: str = "tokiwa") -> str:
    """``🛑 cancelled flow=<flow> run_id=<id> (Ctrl+C)`` (or the plain form)."""
    text = Tracer(cute, label=label).line("flow_interrupted", flow=flow, run_id=run_id)
    return text or f"cancelled flow={flow} run_id={run_id} (Ctrl+C)"


def say_interrupted(flow: str, run_id: str, *, cute: bool | None = None, label: str = "tokiwa",
                    stream: TextIO | None = None) -> str:
    """Write :func:`interrupted_line` on ``stream`` (default stderr) and return it."""
    line = interrupted_line(flow, run_id, cute=cute, label=label)
    out = stream or sys.stderr
    out.write(line + "\n")
    out.flush()
    return line


def interrupted_exit(call: Callable[[], int], capture: RunCapture, *, cute: bool | None = None,
                     stream: TextIO | None = None) -> int:
    """``call()``'s exit code; on Ctrl+C, the ``cancelled`` line and :data:`INTERRUPTED_EXIT`
    (a command line's way: ``sys.exit(interrupted_exit(lambda: run_async(go()), capture))``)."""
    try:
        return call()
    except KeyboardInterrupt:
        result = capture.result
        out = stream or sys.stderr
        if result is None:  # stopped before a run settled (while loading, or a second Ctrl+C)
            out.write("interrupted (Ctrl+C) before the run ended\n")
        elif str(result.status) != "cancelled":  # Ctrl+C after the run had ended on its own
            out.write(f"interrupted (Ctrl+C) after run {result.run_id} ended {result.status}\n")
        else:
            say_interrupted(result.workflow_name, result.run_id, cute=cute, stream=out)
        out.flush()
        return INTERRUPTED_EXIT


def loop_running() -> bool:
    """Whether the calling code runs inside an event loop (so a blocking run would deadlock)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True
