"""tokiwa: a distributed, Redis-backed orchestrator for events, cron jobs and DAG workflows.

The public API is what ``__all__`` lists; everything else is private.
"""

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
