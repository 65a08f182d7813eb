"""The public API is pinned: ``orchestrator.__all__`` is exactly the list below, every name in
it imports, and type checkers see each one (the ``TYPE_CHECKING`` imports of the package).

Adding, renaming or removing a public name is a deliberate change: update this list with it."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import orchestrator

PUBLIC_API = [
    "BrokerError",
    "ConfigError",
    "ConflictError",
    "ConversationStore",
    "Cron",
    "CronError",
    "CyclicDependencyError",
    "DeltaConversationStore",
    "DependencyError",
    "DispatchResult",
    "Engine",
    "Event",
    "EventDecodeError",
    "EventDispatcher",
    "FencingError",
    "FileArtifactStore",
    "FileRunStore",
    "Flow",
    "InMemoryArtifactStore",
    "InMemoryConversationStore",
    "InMemoryRunStore",
    "InvalidArgumentError",
    "LeaderElector",
    "LeaderScheduler",
    "LeadershipError",
    "LockError",
    "Node",
    "NodeResult",
    "NotFoundError",
    "Orchestrator",
    "Queue",
    "RedisConversationStore",
    "RedisRunStore",
    "RelayError",
    "RetryExhausted",
    "RetryPolicy",
    "RunStore",
    "Runner",
    "Scheduler",
    "Settings",
    "StateError",
    "StepExecutionError",
    "TemplateError",
    "TimeoutError",
    "TokiwaError",
    "Trigger",
    "Workflow",
    "WorkflowError",
    "WorkflowHooks",
    "WorkflowRunResult",
    "exec_command",
    "exec_shell",
    "load_settings",
    "load_workflow_file",
    "measure_performance",
    "register_step_type",
    "run_performance",
    "run_workflow_file",
    "task",
]


def test_the_pinned_list_is_sorted_and_unique():
    assert PUBLIC_API == sorted(set(PUBLIC_API))


def test_all_is_the_pinned_list():
    assert len(orchestrator.__all__) == len(set(orchestrator.__all__)), "a name is listed twice in __all__"
    assert sorted(orchestrator.__all__) == PUBLIC_API


def test_every_public_name_is_lazily_mapped_and_imports():
    assert sorted(orchestrator._LAZY) == PUBLIC_API
    for name in PUBLIC_API:
        value = getattr(orchestrator, name)
        module = importlib.import_module(f"orchestrator.{orchestrator._LAZY[name]}")
        assert getattr(module, name) is value, name
    namespace: dict[str, object] = {}
    exec(f"from orchestrator import {', '.join(PUBLIC_API)}", namespace)  # the way users import them
    assert all(name in namespace for name in PUBLIC_API)


def test_type_checkers_see_every_public_name():
    """The ``if TYPE_CHECKING:`` block imports exactly the public names, each from the module
    that ``_LAZY`` loads it from at run time."""
    tree = ast.parse(Path(orchestrator.__file__).read_text(encoding="utf-8"))
    seen: dict[str, str] = {}
    for node in tree.body:
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            for stmt in node.body:
                assert isinstance(stmt, ast.ImportFrom) and stmt.module, ast.dump(stmt)
                for alias in stmt.names:
                    seen[alias.asname or alias.name] = stmt.module.removeprefix("orchestrator.")
    assert sorted(seen) == PUBLIC_API
    assert seen == {name: orchestrator._LAZY[name] for name in PUBLIC_API}
