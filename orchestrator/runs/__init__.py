"""Runs of registered workflows: triggers (which event starts what), the routes (one consumer
group per registration), the workflow registry that executes triggered runs and remote
``run_workflow`` requests, the typed result of processing an event (outcome), the recorder
that saves run records, the run stores, and cancel requests.
"""

from __future__ import annotations

from orchestrator._lazy import lazy_exports

_EXPORTS = {
    "CancelWatcher": "cancel",
    "cancel_request": "cancel",
    "cancel_run": "cancel",
    "cancelled_result": "cancel",
    "ProcessResult": "outcome",
    "Verdict": "outcome",
    "RecorderHost": "recorder",
    "RunHooks": "recorder",
    "RunRecorder": "recorder",
    "Registration": "registry",
    "RemoteRunError": "registry",
    "RunServices": "registry",
    "RunTarget": "registry",
    "RunTimeoutError": "registry",
    "current_run_id": "registry",
    "RunsHost": "registry",
    "WorkflowRegistry": "registry",
    "run_id_for": "registry",
    "Route": "routes",
    "RouteBook": "routes",
    "placement": "routes",
    "conversations": "routes",
    "FileRunStore": "stores",
    "InMemoryRunStore": "stores",
    "RedisRunStore": "stores",
    "RunStore": "stores",
    "check_record": "stores",
    "check_run_id": "stores",
    "matches": "stores",
    "newest_first": "stores",
    "select_pruned": "stores",
    "Trigger": "triggers",
    "mapped": "triggers",
    "parse_trigger": "triggers",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports('orchestrator.runs', _EXPORTS)
