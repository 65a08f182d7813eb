"""tokiwa: a distributed, Redis-backed orchestrator for events, cron jobs and DAG workflows.

The public API is what ``__all__`` lists; everything else is private. Names are imported on
first use (PEP 562), so a worker process only loads what its app uses: an event-only worker
never pays for Jinja2, YAML or the declarative machinery.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_LAZY = {
    "Orchestrator": "app",
    "FileArtifactStore": "artifacts",
    "InMemoryArtifactStore": "artifacts",
    "Settings": "config",
    "load_settings": "config",
    "ConversationStore": "conversations",
    "DeltaConversationStore": "conversations",
    "InMemoryConversationStore": "conversations",
    "RedisConversationStore": "conversations",
    "Cron": "cron",
    "load_workflow_file": "declarative",
    "run_workflow_file": "declarative",
    "DispatchResult": "dispatcher",
    "EventDispatcher": "dispatcher",
    "BrokerError": "errors",
    "ConfigError": "errors",
    "ConflictError": "errors",
    "CronError": "errors",
    "CyclicDependencyError": "errors",
    "DependencyError": "errors",
    "EventDecodeError": "errors",
    "FencingError": "errors",
    "InvalidArgumentError": "errors",
    "LeadershipError": "errors",
    "LockError": "errors",
    "NotFoundError": "errors",
    "RelayError": "errors",
    "RetryExhausted": "errors",
    "StateError": "errors",
    "StepExecutionError": "errors",
    "TemplateError": "errors",
    "TimeoutError": "errors",
    "TokiwaError": "errors",
    "WorkflowError": "errors",
    "Event": "events",
    "exec_command": "execs",
    "exec_shell": "execs",
    "Engine": "flow",
    "Flow": "flow",
    "task": "flow",
    "WorkflowHooks": "hooks",
    "LeaderElector": "leader",
    "RetryPolicy": "retry",
    "NodeResult": "run_result",
    "WorkflowRunResult": "run_result",
    "Runner": "runner",
    "LeaderScheduler": "scheduler",
    "Scheduler": "scheduler",
    "register_step_type": "steps",
    "FileRunStore": "stores",
    "InMemoryRunStore": "stores",
    "RedisRunStore": "stores",
    "RunStore": "stores",
    "Trigger": "triggers",
    "Node": "workflow",
    "Workflow": "workflow",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'orchestrator' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


if TYPE_CHECKING:  # type checkers and IDEs see the eager imports
    from .app import Orchestrator
    from .artifacts import FileArtifactStore, InMemoryArtifactStore
    from .config import Settings, load_settings
    from .conversations import (
        ConversationStore,
        DeltaConversationStore,
        InMemoryConversationStore,
        RedisConversationStore,
    )
    from .cron import Cron
    from .declarative import load_workflow_file, run_workflow_file
    from .dispatcher import DispatchResult, EventDispatcher
    from .errors import (
        BrokerError,
        ConfigError,
        ConflictError,
        CronError,
        CyclicDependencyError,
        DependencyError,
        EventDecodeError,
        FencingError,
        InvalidArgumentError,
        LeadershipError,
        LockError,
        NotFoundError,
        RelayError,
        RetryExhausted,
        StateError,
        StepExecutionError,
        TemplateError,
        TimeoutError,
        TokiwaError,
        WorkflowError,
    )
    from .events import Event
    from .execs import exec_command, exec_shell
    from .flow import Engine, Flow, task
    from .hooks import WorkflowHooks
    from .leader import LeaderElector
    from .retry import RetryPolicy
    from .run_result import NodeResult, WorkflowRunResult
    from .runner import Runner
    from .scheduler import LeaderScheduler, Scheduler
    from .steps import register_step_type
    from .stores import FileRunStore, InMemoryRunStore, RedisRunStore, RunStore
    from .triggers import Trigger
    from .workflow import Node, Workflow

__all__ = [
    # the app
    "Orchestrator", "Settings", "load_settings",
    # events
    "Event", "EventDispatcher", "DispatchResult",
    # workflows
    "Workflow", "Node", "RetryPolicy", "Runner", "WorkflowRunResult", "NodeResult", "WorkflowHooks",
    "Trigger", "task", "Flow", "Engine", "load_workflow_file", "run_workflow_file", "register_step_type",
    "exec_command", "exec_shell",
    # stores
    "RunStore", "InMemoryRunStore", "FileRunStore", "RedisRunStore", "FileArtifactStore",
    "InMemoryArtifactStore", "ConversationStore", "InMemoryConversationStore", "DeltaConversationStore",
    "RedisConversationStore",
    # cron and leadership
    "Cron", "Scheduler", "LeaderScheduler", "LeaderElector",
    # errors
    "TokiwaError", "ConfigError", "InvalidArgumentError", "NotFoundError", "ConflictError",
    "StateError", "EventDecodeError", "BrokerError", "LockError", "FencingError",
    "LeadershipError", "WorkflowError", "DependencyError", "CyclicDependencyError",
    "StepExecutionError", "TemplateError", "TimeoutError", "RetryExhausted", "CronError",
    "RelayError",
]
