"""tokiwa: a distributed, Redis-backed orchestrator for events, cron jobs and DAG workflows.

The public API is what ``__all__`` lists; everything else is private.
"""

from .app import Orchestrator
from .config import Settings, load_settings
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

__all__ = [
    # the app
    "Orchestrator", "Settings", "load_settings",
    # events
    "Event", "EventDispatcher", "DispatchResult",
    # errors
    "TokiwaError", "ConfigError", "InvalidArgumentError", "NotFoundError", "ConflictError",
    "StateError", "EventDecodeError", "BrokerError", "LockError", "FencingError",
    "LeadershipError", "WorkflowError", "DependencyError", "CyclicDependencyError",
    "StepExecutionError", "TemplateError", "TimeoutError", "RetryExhausted", "CronError",
    "RelayError",
]
