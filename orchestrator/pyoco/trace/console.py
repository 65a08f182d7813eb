"""``ConsoleTraceBackend``: pyoco's trace lines (``print``-ed), cute or plain.

The lines are tokiwa's (:mod:`orchestrator.workflow.trace`) with ``pyoco`` as the label:
``🐇 pyoco > start flow=<flow> run_id=<id>`` / ``INFO pyoco start flow=<flow> run_id=<id>``
and so on. ``style`` is ``"cute"`` or ``"plain"``; without one, ``PYOCO_CUTE`` (then
``TOKIWA_CUTE``) set to 0 / false / no / off, any case, selects plain.
"""

from __future__ import annotations

import os

from orchestrator.errors import InvalidArgumentError
from orchestrator.pyoco.trace.backend import TraceBackend
from orchestrator.workflow.trace import PYOCO_CUTE_ENV, Tracer, trace_line

STYLES = ("cute", "plain")
_OFF = frozenset({"0", "false", "no", "off"})


def default_style() -> str:
    """``PYOCO_CUTE`` first (pyoco's variable), else tokiwa's choice (``--plain``, ``TOKIWA_CUTE``)."""
    value = os.environ.get(PYOCO_CUTE_ENV)
    if value is not None:
        return "plain" if value.strip().lower() in _OFF else "cute"
    return "cute" if Tracer.resolve_cute() else "plain"


class ConsoleTraceBackend(TraceBackend):
    def __init__(self, style: str | None = None) -> None:
        style = default_style() if style is None else style
        if style not in STYLES:
            raise InvalidArgumentError(f"trace style must be 'cute' or 'plain', got {style!r}")
        self.style = style

    def _print(self, event: str, **fields: object) -> None:
        text = trace_line(event, cute=self.style == "cute", label="pyoco", **fields)
        if text is not None:
            print(text)

    def on_flow_start(self, flow_name: str, run_id: str | None = None) -> None:
        self._print("flow_start", flow=flow_name, run_id=run_id)

    def on_flow_end(self, flow_name: str) -> None:
        self._print("flow_end", flow=flow_name)

    def on_node_start(self, node_name: str) -> None:
        self._print("node_start", node=node_name)

    def on_node_end(self, node_name: str, duration_ms: float) -> None:
        self._print("node_end", node=node_name, ms=duration_ms)

    def on_node_error(self, node_name: str, error: BaseException) -> None:
        self._print("node_error", node=node_name, error=error)

    def on_node_transition(self, source: str, target: str) -> None:
        self._print("node_transition", source=source, target=target)


class SilentTraceBackend(TraceBackend):
    """Prints nothing (``orchestrator.pyoco.run(flow, trace=False)``)."""

    def on_flow_start(self, flow_name: str, run_id: str | None = None) -> None:
        pass

    def on_flow_end(self, flow_name: str) -> None:
        pass

    def on_node_start(self, node_name: str) -> None:
        pass

    def on_node_end(self, node_name: str, duration_ms: float) -> None:
        pass

    def on_node_error(self, node_name: str, error: BaseException) -> None:
        pass
