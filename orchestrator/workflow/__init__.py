"""The DAG engine: workflow and node models, the runner, the node context, run results,
retry policies, hooks, traces, artifacts, command execution and the pyoco-style API
(``@task``, ``Flow``, ``Engine``). No Redis and no events here.
"""

from __future__ import annotations

from orchestrator._lazy import lazy_exports

_EXPORTS = {
    "ArtifactStore": "artifacts",
    "FileArtifactStore": "artifacts",
    "InMemoryArtifactStore": "artifacts",
    "check_name": "artifacts",
    "AbortSignal": "context",
    "NodeContext": "context",
    "RunShared": "context",
    "ExecResult": "execs",
    "check_argv": "execs",
    "exec_command": "execs",
    "exec_command_async": "execs",
    "exec_shell": "execs",
    "exec_shell_async": "execs",
    "Chain": "flow",
    "Engine": "flow",
    "Flow": "flow",
    "Task": "flow",
    "TaskWrapper": "flow",
    "task": "flow",
    "WorkflowHooks": "hooks",
    "call_hooks": "hooks",
    "collect_hooks": "hooks",
    "Graph": "model",
    "Node": "model",
    "Workflow": "model",
    "detached_node_id": "model",
    "node_id_for": "model",
    "workflow_id_for": "model",
    "NodeResult": "result",
    "NodeStatus": "result",
    "RunStatus": "result",
    "RunTimeline": "result",
    "WorkflowRunResult": "result",
    "format_log": "result",
    "json_safe": "result",
    "RetryPolicy": "retry",
    "Runner": "runner",
    "bind_arguments": "task_binding",
    "build_handler": "task_binding",
    "resolve_reference": "task_binding",
    "TraceHooks": "trace",
    "Tracer": "trace",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports('orchestrator.workflow', _EXPORTS)
