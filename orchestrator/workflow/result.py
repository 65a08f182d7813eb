"""The outcome of one workflow run: :class:`WorkflowRunResult` and :class:`NodeResult`.

``to_record()`` turns a result into plain data (JSON- and msgpack-safe) for run stores and
remote callers; ``from_record()`` reads it back. Outputs that are not JSON-safe are kept in
the record as their ``repr`` string: a record never carries live objects (and never pickle).
"""

from __future__ import annotations

import time
import traceback as tb
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, TypeVar

from orchestrator.errors import describe_error


class RunStatus(StrEnum):
    """A run's status. Members are strings: records, Redis and the HTTP API carry the values."""

    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    #: the workflow-level timeout (``run(timeout=...)``, ``register_workflow(..., timeout=...)``)
    #: ended it; a failure too (see :data:`FAILURE_STATUSES`)
    TIMED_OUT = "timed_out"
    CANCELLED = "cancelled"


#: statuses of a run that ended (a record with one of them is final)
FINISHED_STATUSES: frozenset[RunStatus] = frozenset(
    {RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.TIMED_OUT, RunStatus.CANCELLED})
#: statuses that mean the run failed: code that asks "did it fail?" tests membership here
#: rather than ``== "failed"``, so a timed-out run counts
FAILURE_STATUSES: frozenset[RunStatus] = frozenset({RunStatus.FAILED, RunStatus.TIMED_OUT})

#: a node's recorded traceback keeps at most this many characters (its head and its tail)
MAX_TRACEBACK_CHARS = 8000
_TRACEBACK_HEAD = 1500


def format_traceback(error: BaseException, limit: int = MAX_TRACEBACK_CHARS) -> str:
    """``error``'s traceback as text, causes included (the last attempt's error under a
    ``RetryExhausted``), bounded to ``limit`` characters: longer ones keep their start and
    their end (the innermost frames and the error line) around a ``[... N characters cut ...]``
    line."""
    text = "".join(tb.format_exception(error)).rstrip("\n")
    if len(text) <= limit:
        return text
    head = min(_TRACEBACK_HEAD, limit // 4)
    cut = f"\n[... {len(text) - limit} characters cut ...]\n"
    tail = max(0, limit - head - len(cut))
    return text[:head] + cut + text[len(text) - tail:]


class NodeStatus(StrEnum):
    """A node's status within its run (recorded as the value, like :class:`RunStatus`)."""

    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    SKIPPED = "skipped"
    CANCELLED = "cancelled"


NODE_STATUSES: tuple[NodeStatus, ...] = tuple(NodeStatus)
RUN_STATUSES: tuple[RunStatus, ...] = tuple(RunStatus)

_Status = TypeVar("_Status", RunStatus, NodeStatus)


def _status(kind: type[_Status], value: Any) -> _Status | Any:
    """``value`` read from a record as a member of ``kind``; a value that this version does not
    know (a record written by a newer one) stays as it was."""
    try:
        return kind(value)
    except ValueError:
        return value


def _plain(status: Any) -> Any:
    """A status as a record carries it: the plain string."""
    return status.value if isinstance(status, StrEnum) else status


def json_safe(value: Any, _depth: int = 0) -> Any:
    """``value`` if JSON can carry it, else a copy whose non-JSON leaves are ``repr`` strings."""
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        return value if value == value and value not in (float("inf"), float("-inf")) else repr(value)
    if _depth > 50:
        return repr(value)
    if isinstance(value, dict):
        return {k if isinstance(k, str) else str(k): json_safe(v, _depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v, _depth + 1) for v in value]
    return repr(value)


@dataclass(slots=True)
class NodeResult:
    """One node's outcome. ``error`` is :func:`~orchestrator.errors.describe_error` of the
    failure and ``traceback`` its formatted traceback (bounded, see :func:`format_traceback`;
    failed nodes only); ``exception`` holds the live exception in-process (not recorded).
    ``checkpointed`` is True for a node this execution did not run: an earlier execution of
    the run completed it and its checkpoint gave the output (see ``resumed_from``)."""

    node_id: str
    name: str
    status: NodeStatus = NodeStatus.PENDING
    output: Any = None
    error: dict[str, Any] | None = None
    attempts: int = 0
    duration_ms: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    traceback: str | None = None
    checkpointed: bool = False
    exception: BaseException | None = field(default=None, repr=False, compare=False)

    def to_record(self, *, output: bool = True) -> dict[str, Any]:
        """Plain data; ``output=False`` leaves the output out (None), as progress records do."""
        return {"node_id": self.node_id, "name": self.name, "status": _plain(self.status),
                "output": json_safe(self.output) if output else None, "error": self.error,
                "attempts": self.attempts, "duration_ms": self.duration_ms, "started_at": self.started_at,
                "finished_at": self.finished_at, "traceback": self.traceback, "checkpointed": self.checkpointed}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> NodeResult:
        fields = ("node_id", "name", "status", "output", "error", "attempts", "duration_ms",
                  "started_at", "finished_at", "traceback", "checkpointed")
        node = cls(**{k: record[k] for k in fields if k in record})
        node.status = _status(NodeStatus, node.status)
        return node


@dataclass(slots=True)
class WorkflowRunResult:
    """What ``Runner.run`` returns.

    ``nodes`` is keyed by node **name**; ``results``, ``errors`` and ``attempts`` by node
    **id** (as in tokiwa). ``timeline`` lists state transitions in the order they happened,
    each a small dict with ``type`` and ``timestamp`` (epoch seconds) and, for node entries,
    ``node_id``, ``node`` (name) and ``attempt``. ``error`` describes why the run as a whole
    failed (the first node failure, a timeout or a cancellation), None if it succeeded, and
    ``exception``, in this process only (never recorded), the exception itself when the code
    that ended the run kept it (a chatflow fenced out keeps its ``FencingError``).
    ``cancelled_by`` and ``cancelled_at`` (epoch seconds of the request) say who cancelled a
    run that ended ``cancelled`` on request (``Orchestrator.cancel_run``), None otherwise.
    ``resumed_from`` says what an earlier execution of this run left (its event was
    redelivered after a crash): ``{"nodes": [names restored from checkpoints], "attempts":
    {name: attempts already made, for nodes that had started}, "workers": [who ran them],
    "deliveries": n}``; None for a run that started from scratch.
    ``redact`` (from the workflow, not recorded) hides secrets in the records: node outputs,
    errors, tracebacks, memory, artifacts and log lines as :meth:`to_record`,
    :meth:`progress_record` and :meth:`log_lines` give them; the result's own values (what
    the nodes passed each other) stay as they are.
    """

    run_id: str
    workflow_id: str
    workflow_name: str
    status: RunStatus = RunStatus.RUNNING
    started_at: float = 0.0
    finished_at: float | None = None
    duration_ms: float | None = None
    nodes: dict[str, NodeResult] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)
    errors: dict[str, dict[str, Any]] = field(default_factory=dict)
    attempts: dict[str, int] = field(default_factory=dict)
    timeline: list[dict[str, Any]] = field(default_factory=list)
    conversation_id: str | None = None
    memory: dict[str, Any] | None = None
    artifacts: list[dict[str, Any]] = field(default_factory=list)
    logs: list[dict[str, Any]] = field(default_factory=list)
    error: dict[str, Any] | None = None
    workflow_type: str = "workflow"
    cancelled_by: str | None = None
    cancelled_at: float | None = None
    #: the run whose node requested this one (``run_workflow`` called inside a node), if any
    parent_run_id: str | None = None
    resumed_from: dict[str, Any] | None = None
    exception: BaseException | None = field(default=None, repr=False, compare=False)
    redact: Callable[[Any], Any] | None = field(default=None, repr=False, compare=False)

    @property
    def succeeded(self) -> bool:
        return self.status == RunStatus.SUCCEEDED

    @property
    def failed(self) -> bool:
        """Whether the run failed: status ``failed`` or ``timed_out``."""
        return self.status in FAILURE_STATUSES

    def output_of(self, name: str) -> Any:
        """The output of the node called ``name`` (None if it produced none)."""
        node = self.nodes.get(name)
        return None if node is None else node.output

    def to_record(self) -> dict[str, Any]:
        """Plain JSON/msgpack-safe data (logs excluded: stores keep them separately), as
        people see it (see ``redact``)."""
        return self._shown({
            "run_id": self.run_id, "workflow_id": self.workflow_id, "workflow_name": self.workflow_name,
            "workflow_type": self.workflow_type, "status": _plain(self.status), "started_at": self.started_at,
            "finished_at": self.finished_at, "duration_ms": self.duration_ms,
            "nodes": {name: n.to_record() for name, n in self.nodes.items()},
            "results": json_safe(self.results), "errors": json_safe(self.errors),
            "attempts": dict(self.attempts), "timeline": json_safe(self.timeline),
            "conversation_id": self.conversation_id, "memory": json_safe(self.memory),
            "artifacts": json_safe(self.artifacts), "error": json_safe(self.error),
            "cancelled_by": self.cancelled_by, "cancelled_at": self.cancelled_at,
            "parent_run_id": self.parent_run_id, "resumed_from": json_safe(self.resumed_from),
        })

    def progress_record(self) -> dict[str, Any]:
        """The record of a run still running, cheap to build: as :meth:`to_record` without the
        outputs, ``results`` and ``memory`` (the final record has them)."""
        return self._shown({
            "run_id": self.run_id, "workflow_id": self.workflow_id, "workflow_name": self.workflow_name,
            "workflow_type": self.workflow_type, "status": _plain(self.status), "started_at": self.started_at,
            "finished_at": self.finished_at, "duration_ms": self.duration_ms,
            "nodes": {name: n.to_record(output=False) for name, n in self.nodes.items()},
            "results": {}, "errors": json_safe(self.errors), "attempts": dict(self.attempts),
            "timeline": json_safe(self.timeline), "conversation_id": self.conversation_id, "memory": None,
            "artifacts": json_safe(self.artifacts), "error": json_safe(self.error),
            "cancelled_by": self.cancelled_by, "cancelled_at": self.cancelled_at,
            "parent_run_id": self.parent_run_id, "resumed_from": json_safe(self.resumed_from),
        })

    def log_lines(self) -> list[str]:
        """The run's log entries as text lines (:func:`format_log`), as people see them."""
        lines = [format_log(entry) for entry in self.logs]
        return lines if self.redact is None else [self.redact(line) for line in lines]

    def _shown(self, record: dict[str, Any]) -> dict[str, Any]:
        """``record`` with ``redact`` applied to what it shows of the run's data (outputs,
        errors, memory, artifacts); ids, names, statuses and times stay as they are."""
        hide = self.redact
        if hide is None:
            return record
        for node in record["nodes"].values():
            node["output"], node["traceback"] = hide(node["output"]), hide(node["traceback"])
            node["error"] = _values(hide, node["error"])
        record["results"] = {k: hide(v) for k, v in record["results"].items()}
        record["errors"] = {k: _values(hide, v) for k, v in record["errors"].items()}
        record["timeline"] = [{k: _values(hide, v) if k == "error" else v for k, v in entry.items()}
                              for entry in record["timeline"]]
        record["memory"], record["error"] = hide(record["memory"]), _values(hide, record["error"])
        record["artifacts"] = [{k: hide(v) if k in ("name", "location") else v for k, v in a.items()}
                               if isinstance(a, dict) else a for a in record["artifacts"]]
        return record

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> WorkflowRunResult:
        """Rebuild a result from ``to_record()`` data (outputs stay as recorded)."""
        result = cls(run_id=record["run_id"], workflow_id=record.get("workflow_id", ""),
                     workflow_name=record.get("workflow_name", ""))
        for key in ("status", "started_at", "finished_at", "duration_ms", "conversation_id",
                    "memory", "error", "workflow_type", "cancelled_by", "cancelled_at",
                    "parent_run_id", "resumed_from"):
            if key in record:
                setattr(result, key, record[key])
        result.status = _status(RunStatus, result.status)
        result.nodes = {name: NodeResult.from_record(n) for name, n in (record.get("nodes") or {}).items()}
        result.results = dict(record.get("results") or {})
        result.errors = dict(record.get("errors") or {})
        result.attempts = dict(record.get("attempts") or {})
        result.timeline = list(record.get("timeline") or [])
        result.artifacts = list(record.get("artifacts") or [])
        result.logs = list(record.get("logs") or [])
        return result


class RunTimeline:
    """Writes node outcomes and timeline entries into a :class:`WorkflowRunResult`.

    ``t0`` arguments are ``time.perf_counter()`` values of the node's first attempt; the
    node's ``duration_ms`` therefore includes its retries.
    """

    __slots__ = ("result", "clock", "first_error")

    #: node errors and retries also go to the run's logs, up to the logs' cap
    MAX_LOGS = 1000

    def __init__(self, result: WorkflowRunResult, clock: Callable[[], float]) -> None:
        self.result, self.clock = result, clock
        self.first_error: BaseException | None = None

    def event(self, kind: str, nr: NodeResult, attempt: int) -> dict[str, Any]:
        entry = {"type": kind, "timestamp": self.clock(), "node_id": nr.node_id, "node": nr.name,
                 "attempt": attempt}
        self.result.timeline.append(entry)
        return entry

    def _finish(self, nr: NodeResult, status: NodeStatus, t0: float | None) -> None:
        nr.status, nr.finished_at = status, self.clock()
        if t0 is not None:
            nr.duration_ms = (time.perf_counter() - t0) * 1000.0
        if nr.attempts:
            self.result.attempts[nr.node_id] = nr.attempts

    def succeeded(self, nr: NodeResult, output: Any, t0: float) -> None:
        if nr.status != NodeStatus.RUNNING:
            return  # an abandoned node finishing after its run was settled
        self._finish(nr, NodeStatus.SUCCEEDED, t0)
        nr.output = output
        self.result.results[nr.node_id] = output
        self.event("node_complete", nr, nr.attempts)["duration_ms"] = nr.duration_ms

    def failed(self, nr: NodeResult, error: BaseException, t0: float) -> None:
        if nr.status != NodeStatus.RUNNING:
            return
        self._finish(nr, NodeStatus.FAILED, t0)
        nr.exception, nr.error = error, describe_error(error)
        nr.traceback = format_traceback(error)
        self.result.errors[nr.node_id] = nr.error
        if self.first_error is None:
            self.first_error = error
        self.event("node_error", nr, nr.attempts)["error"] = nr.error
        self.log(nr, "ERROR", f"node failed after {nr.attempts} attempt(s): {_error_line(error)}")

    def retrying(self, nr: NodeResult, error: BaseException, attempt: int, delay_s: float) -> None:
        """Attempt ``attempt`` failed and the node is retried after ``delay_s`` seconds."""
        entry = self.event("node_retry", nr, attempt)
        entry["next_delay_s"], entry["error"] = delay_s, describe_error(error)
        self.log(nr, "WARNING", f"attempt {attempt} failed: {_error_line(error)}; retrying in {delay_s:g}s")

    def log(self, nr: NodeResult, level: str, message: str) -> None:
        logs = self.result.logs
        if len(logs) < self.MAX_LOGS:
            logs.append({"timestamp": self.clock(), "node": nr.name, "level": level, "message": message})

    def cancelled(self, nr: NodeResult, reason: BaseException, t0: float | None = None) -> None:
        if nr.status not in (NodeStatus.PENDING, NodeStatus.RUNNING):
            return
        self._finish(nr, NodeStatus.CANCELLED, t0)
        nr.exception, nr.error = reason, describe_error(reason)
        self.event("node_cancelled", nr, nr.attempts)["error"] = nr.error

    def skipped(self, nr: NodeResult, reason: str) -> None:
        self._finish(nr, NodeStatus.SKIPPED, None)
        self.event("node_skipped", nr, 0)["reason"] = reason

    def restored(self, nr: NodeResult, done: NodeResult) -> None:
        """``nr`` succeeded in an earlier execution of the run (``done``, from its checkpoint):
        it takes that outcome, marked ``checkpointed``, and is not run again."""
        nr.status, nr.output, nr.attempts, nr.checkpointed = NodeStatus.SUCCEEDED, done.output, done.attempts, True
        nr.started_at, nr.finished_at, nr.duration_ms = done.started_at, done.finished_at, done.duration_ms
        self.result.results[nr.node_id] = done.output
        if nr.attempts:
            self.result.attempts[nr.node_id] = nr.attempts
        self.event("node_restored", nr, nr.attempts)


def _values(hide: Callable[[Any], Any], value: Any) -> Any:
    """A dict (an error's description) with ``hide`` applied to its values, not its keys."""
    return {k: hide(v) for k, v in value.items()} if isinstance(value, dict) else hide(value)


def _error_line(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
    return text if len(text) <= 500 else text[:499] + "…"


def format_log(entry: dict[str, Any]) -> str:
    """One run log entry as a text line: ``2026-01-02T03:04:05.678Z INFO [node] message``."""
    stamp = datetime.fromtimestamp(entry.get("timestamp", 0), tz=UTC).isoformat(timespec="milliseconds")
    return f"{stamp.replace('+00:00', 'Z')} {entry.get('level', 'INFO')} [{entry.get('node', '-')}] {entry.get('message', '')}"
