"""The fleet app (``TEST_EXTRAS=1`` gives ``fleet-slow``) plus ``live-timeout``: the slow node
under a workflow timeout of 1 s, for the live run record tests."""

from __future__ import annotations

from orchestrator import Node, Workflow
from tests.faults.fleet_app import app, slow

app.register_workflow(Workflow(name="live-timeout", nodes=[Node(name="begin", handler=slow)]), timeout=1.0)

__all__ = ["app"]
