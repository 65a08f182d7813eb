"""Workflow run hooks: an extension point for tracing, metrics and webhooks.

A hooks object may be any object with some of the methods of :class:`WorkflowHooks`
(sync or async); subclassing it just documents intent. A run may get several hooks objects
(``Runner(hooks=...)`` for every run plus ``run(hooks=...)`` for one); they are called in
that order. A hook that raises is logged and never fails the node or the run: observers
must not change outcomes.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from orchestrator.callbacks import call_and_await

logger = logging.getLogger("tokiwa.runner")

HOOK_NAMES = ("on_run_start", "on_node_start", "on_node_complete", "on_node_error",
              "on_node_retry", "on_run_complete")


class WorkflowHooks:
    """No-op defaults for every hook; override the ones you need (sync or ``async def``)."""

    def on_run_start(self, workflow: Any, run_id: str) -> None:
        """Before the first node starts."""

    def on_node_start(self, node: Any, ctx: Any) -> None:
        """Before each attempt of a node (``ctx.attempt`` is 1-based)."""

    def on_node_complete(self, node: Any, ctx: Any, output: Any) -> None:
        """After a node succeeded."""

    def on_node_error(self, node: Any, ctx: Any, error: BaseException) -> None:
        """After a node failed for good (``RetryExhausted`` when its retries ran out)."""

    def on_node_retry(self, node: Any, ctx: Any, error: BaseException, attempt: int, delay_s: float) -> None:
        """After failed attempt ``attempt``, before the pause of ``delay_s`` seconds."""

    def on_run_complete(self, result: Any) -> None:
        """After the run settled: ``succeeded``, ``failed``, ``timed_out`` (before ``run()``
        raises the timeout) or ``cancelled`` (also when the task awaiting ``run()`` was
        cancelled, before the ``CancelledError`` goes on)."""


def collect_hooks(*sources: Any) -> dict[str, tuple[Any, ...]]:
    """Hook callables by name from hook objects (or lists of them); absent methods are skipped,
    and so are :class:`WorkflowHooks`' no-op defaults (they cost nothing per node)."""
    found: dict[str, list[Any]] = {name: [] for name in HOOK_NAMES}
    for source in sources:
        for hooks in source if isinstance(source, (list, tuple)) else (source,):
            if hooks is None:
                continue
            for name in HOOK_NAMES:
                fn = getattr(hooks, name, None)
                if fn is not None and getattr(fn, "__func__", None) is not getattr(WorkflowHooks, name):
                    found[name].append(fn)
    return {name: tuple(fns) for name, fns in found.items()}


async def call_hooks(name: str, fns: tuple[Any, ...], *args: Any) -> None:
    """Call each hook in order; a failing hook is logged, never fatal."""
    for fn in fns:
        try:
            await call_and_await(fn, *args)
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.warning("workflow hook %s (%r) failed", name, fn, exc_info=True)
