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
    "FileArtifactStore": "workflow.artifacts",
    "InMemoryArtifactStore": "workflow.artifacts",
    "Settings": "config",
    "load_settings": "config",
    "ConversationStore": "chat.conversations",
    "DeltaConversationStore": "chat.conversations",
    "InMemoryConversationStore": "chat.conversations",
    "RedisConversationStore": "chat.conversations",
    "Cron": "cron.expr",
    "load_workflow_file": "declarative.files",
    "run_workflow_file": "declarative.files",
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
    "Queue": "queue",
    "measure_performance": "perf",
    "run_performance": "perf",
    "exec_command": "workflow.execs",
    "exec_shell": "workflow.execs",
    "Engine": "workflow.flow",
    "Flow": "workflow.flow",
    "task": "workflow.flow",
    "WorkflowHooks": "workflow.hooks",
    "LeaderElector": "leader",
    "RetryPolicy": "workflow.retry",
    "NodeResult": "workflow.result",
    "WorkflowRunResult": "workflow.result",
    "Runner": "workflow.runner",
    "LeaderScheduler": "cron.scheduler",
    "Scheduler": "cron.scheduler",
    "register_step_type": "declarative.steps",
    "FileRunStore": "runs.stores",
    "InMemoryRunStore": "runs.stores",
    "RedisRunStore": "runs.stores",
    "RunStore": "runs.stores",
    "Trigger": "runs.triggers",
    "Node": "workflow.model",
    "Workflow": "workflow.model",
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
    from orchestrator.app import Orchestrator
    from orchestrator.chat.conversations import (
        ConversationStore,
        DeltaConversationStore,
        InMemoryConversationStore,
        RedisConversationStore,
    )
    from orchestrator.config import Settings, load_settings
    from orchestrator.cron.expr import Cron
    from orchestrator.cron.scheduler import LeaderScheduler, Scheduler
    from orchestrator.declarative.files import load_workflow_file, run_workflow_file
    from orchestrator.declarative.steps import register_step_type
    from orchestrator.dispatcher import DispatchResult, EventDispatcher
    from orchestrator.errors import (
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
    from orchestrator.events import Event
    from orchestrator.leader import LeaderElector
    from orchestrator.perf import measure_performance, run_performance
    from orchestrator.queue import Queue
    from orchestrator.runs.stores import FileRunStore, InMemoryRunStore, RedisRunStore, RunStore
    from orchestrator.runs.triggers import Trigger
    from orchestrator.workflow.artifacts import FileArtifactStore, InMemoryArtifactStore
    from orchestrator.workflow.execs import exec_command, exec_shell
    from orchestrator.workflow.flow import Engine, Flow, task
    from orchestrator.workflow.hooks import WorkflowHooks
    from orchestrator.workflow.model import Node, Workflow
    from orchestrator.workflow.result import NodeResult, WorkflowRunResult
    from orchestrator.workflow.retry import RetryPolicy
    from orchestrator.workflow.runner import Runner

__all__ = [
    # the app
    "Orchestrator", "Settings", "load_settings",
    # events
    "Event", "EventDispatcher", "DispatchResult", "Queue",
    # workflows
    "Workflow", "Node", "RetryPolicy", "Runner", "WorkflowRunResult", "NodeResult", "WorkflowHooks",
    "Trigger", "task", "Flow", "Engine", "load_workflow_file", "run_workflow_file", "register_step_type",
    "exec_command", "exec_shell", "run_performance", "measure_performance",
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
