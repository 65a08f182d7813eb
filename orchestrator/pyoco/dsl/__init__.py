"""pyoco's DSL: ``task``, ``switch``, fragments, loop nodes, expressions and the validator."""

from __future__ import annotations

from orchestrator.pyoco.dsl.syntax import switch, task

__all__ = ["switch", "task"]
