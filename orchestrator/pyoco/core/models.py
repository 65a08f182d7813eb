"""pyoco's data model: :class:`Task` (with its dependency edges), :class:`Flow` (a set of
tasks built with ``>>``), the state enums and the run's :class:`RunContext`.

As in pyoco, a task is identified by its name (two tasks with one name are equal), its
``dependencies`` / ``dependents`` are sets of tasks kept on the task objects themselves, and
``flow.tasks`` is a set. ``flow >> a >> b`` adds the tasks and makes each depend on the tail
before it; ``flow >> (a & b)`` adds both after the tail; a control-flow fragment (a loop or a
``switch``) makes the whole flow run its steps in order. :class:`Flow` also remembers the
order tasks were added in, so runs are reproducible (pyoco's order is the set's).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from orchestrator.pyoco.dsl.nodes import SubFlowNode

FAIL_POLICIES = ("stop", "isolate", "retry")  # "retry" behaves as "stop", as in pyoco
TRIGGER_POLICIES = ("ALL", "ANY")


@dataclass(eq=False)
class Task:
    """A function, how to call it (``inputs``), where to store its result (``outputs``) and
    how its failures count (``fail_policy``, ``retries``, ``timeout_sec``)."""

    func: Callable[..., Any]
    name: str
    dependencies: set[Task] = field(default_factory=set)
    dependents: set[Task] = field(default_factory=set)
    inputs: dict[str, Any] = field(default_factory=dict)
    outputs: list[str] = field(default_factory=list)
    parallel_group: str | None = None
    fail_policy: str = "stop"
    retries: int = 0
    timeout_sec: float | None = None
    trigger_policy: str = "ALL"

    def __hash__(self) -> int:
        return hash(self.name)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Task) and self.name == other.name

    def __repr__(self) -> str:
        return f"<Task {self.name}>"


class TaskState(Enum):
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"


class RunStatus(Enum):
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLING = "CANCELLING"
    CANCELLED = "CANCELLED"


@dataclass
class TaskRecord:
    """What one task did in a run (its last attempt)."""

    state: TaskState = TaskState.PENDING
    started_at: float | None = None
    ended_at: float | None = None
    duration_ms: float | None = None
    error: str | None = None
    traceback: str | None = None
    inputs: dict[str, Any] = field(default_factory=dict)
    output: Any = None
    artifacts: dict[str, Any] = field(default_factory=dict)


def _json_or_repr(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)
    return value


@dataclass
class RunContext:
    """The state of one run: status, task states and records, captured output lines."""

    run_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    flow_name: str = "main"
    params: dict[str, Any] = field(default_factory=dict)
    status: RunStatus = RunStatus.RUNNING
    tasks: dict[str, TaskState] = field(default_factory=dict)
    task_records: dict[str, TaskRecord] = field(default_factory=dict)
    start_time: float = field(default_factory=time.time)
    end_time: float | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    logs: list[dict[str, Any]] = field(default_factory=list)
    _pending_logs: list[dict[str, Any]] = field(default_factory=list, repr=False)
    _log_seq: int = field(default=0, repr=False)
    log_bytes: dict[str, int] = field(default_factory=dict)

    def ensure_task_record(self, task_name: str) -> TaskRecord:
        return self.task_records.setdefault(task_name, TaskRecord())

    def append_log(self, task_name: str, stream: str, payload: str) -> None:
        """Keep ``payload`` (a task's stdout or stderr text) as one numbered log entry."""
        if not payload:
            return
        entry = {"seq": self._log_seq, "task": task_name, "stream": stream, "text": payload,
                 "timestamp": time.time()}
        self._log_seq += 1
        self.log_bytes[task_name] = self.log_bytes.get(task_name, 0) + len(payload.encode())
        self.logs.append(entry)
        self._pending_logs.append(entry)

    def drain_logs(self) -> list[dict[str, Any]]:
        """The entries added since the last call."""
        drained, self._pending_logs = self._pending_logs, []
        return drained

    def serialize_task_records(self) -> dict[str, Any]:
        """The records as JSON-safe data (values JSON cannot hold become their repr)."""
        return {
            name: {
                "state": record.state.value if isinstance(record.state, Enum) else record.state,
                "started_at": record.started_at, "ended_at": record.ended_at, "duration_ms": record.duration_ms,
                "error": record.error, "traceback": record.traceback,
                "inputs": {k: _json_or_repr(v) for k, v in record.inputs.items()},
                "output": _json_or_repr(record.output), "artifacts": record.artifacts,
            }
            for name, record in self.task_records.items()
        }


@dataclass
class Flow:
    """A named set of tasks; ``flow >> x`` adds ``x`` after the current tail (see the module doc)."""

    name: str = "main"
    tasks: set[Task] = field(default_factory=set)
    _tail: set[Task] = field(default_factory=set)
    _definition: list[Any] = field(default_factory=list, repr=False)
    _has_control_flow: bool = False
    _order: dict[str, int] = field(default_factory=dict, repr=False)

    def __rshift__(self, other: Any) -> Flow:
        from orchestrator.pyoco.dsl.syntax import FlowFragment, TaskWrapper, ensure_fragment

        if isinstance(other, TaskWrapper):
            self._record_fragment(other)
            self._append_task(other.task)
            return self
        if hasattr(other, "to_subflow"):
            fragment = other if isinstance(other, FlowFragment) else ensure_fragment(other)
            self._record_fragment(fragment)
            if self._has_control_flow or fragment.has_control_flow():
                self._has_control_flow = True
            else:
                for step in fragment.to_subflow().steps:
                    if hasattr(step, "task"):
                        self._append_task(step.task)
            return self
        new_tasks = _tasks_of(other)
        for task in new_tasks:
            self.add_task(task)
            for tail in self._tail:
                _link(tail, task)
        if new_tasks:
            self._tail = set(new_tasks)
        return self

    def add_task(self, task: Task) -> None:
        self.tasks.add(task)
        self._order.setdefault(task.name, len(self._order))

    def ordered_tasks(self) -> list[Task]:
        """The tasks in the order they were added (tasks put into ``tasks`` directly last, by name)."""
        return sorted(self.tasks, key=lambda t: (self._order.get(t.name, len(self._order)), t.name))

    def has_control_flow(self) -> bool:
        return self._has_control_flow

    def build_program(self) -> SubFlowNode:
        """The flow's steps as a DSL tree (what a control-flow flow runs, in order)."""
        from orchestrator.pyoco.dsl.nodes import SubFlowNode

        return SubFlowNode(list(self._definition))

    def _record_fragment(self, fragment: Any) -> None:
        from orchestrator.pyoco.dsl.nodes import TaskNode

        steps = fragment.to_subflow().steps
        self._definition.extend(steps)
        for task in fragment.task_nodes():
            self.add_task(task)
        if any(not isinstance(step, TaskNode) for step in steps):
            self._has_control_flow = True

    def _append_task(self, task: Task) -> None:
        self.add_task(task)
        if not self._has_control_flow:
            for tail in self._tail:
                _link(tail, task)
        self._tail = {task}


def _link(before: Task, after: Task) -> None:
    before.dependents.add(after)
    after.dependencies.add(before)


def _tasks_of(item: Any) -> list[Task]:
    """The tasks ``flow >> item`` adds: a task, a task wrapper, or a list / ``a & b`` / ``a | b`` of them."""
    if isinstance(item, Task):
        return [item]
    if hasattr(item, "task") and isinstance(item.task, Task):
        return [item.task]
    if isinstance(item, (list, tuple)):
        found: list[Task] = []
        for part in item:
            found.extend(_tasks_of(part))
        return found
    from orchestrator.errors import InvalidArgumentError

    raise InvalidArgumentError(f"flow >> {item!r}: expected a task, a @task function, a list of them or a fragment")
