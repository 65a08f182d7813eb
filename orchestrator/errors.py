"""One error family for tokiwa.

Every error a user can see derives from :class:`TokiwaError`, with one subclass per area.
Each says in its docstring when it is raised, and carries the context a user needs to act
(the payload, the lock name, the node ...) as attributes, not only in the message.
"""

from __future__ import annotations

from typing import Any


class TokiwaError(Exception):
    """Base of every error tokiwa raises on purpose."""


class ConfigError(TokiwaError):
    """Raised when settings, a TOML file, an app path or a relay file is invalid.

    ``field`` names the offending setting when one is known.
    """

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class InvalidArgumentError(TokiwaError, ValueError):
    """Raised when a caller passes a value that can never be valid (blank event type, ...)."""


class NotFoundError(TokiwaError, LookupError):
    """Raised when a named thing (workflow, subscriber, job, run) does not exist."""


class ConflictError(TokiwaError):
    """Raised when registering something whose id is already taken."""


class StateError(TokiwaError):
    """Raised when an operation is not allowed in the current mode or state
    (for example ``drain()`` on a producer)."""


class EventDecodeError(TokiwaError):
    """Raised when a stream entry cannot be turned into an :class:`~orchestrator.Event`.

    ``reason`` is a short machine-readable word (``undecodable``, ``wrong_fields``,
    ``oversized``, ``invalid_envelope``) that is also written to the dead-letter stream.
    """

    def __init__(self, reason: str, message: str, *, entry_id: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.entry_id = entry_id


class BrokerError(TokiwaError):
    """Raised when the Redis broker cannot do what was asked (after its own retries)."""


class ReplicationError(BrokerError):
    """Raised when a durable publish (``publish_wait_replicas`` > 0) was stored on the master
    but fewer replicas than asked confirmed it within ``publish_wait_timeout_ms``: a failover
    now could lose it. The event may still be delivered; publishing it again (same event id,
    within ``publish_dedup_ms``) adds nothing twice. ``stream_id`` is where it landed."""

    def __init__(self, message: str, *, acked: int, wanted: int, stream_id: str | None = None) -> None:
        super().__init__(message)
        self.acked, self.wanted, self.stream_id = acked, wanted, stream_id


class LockError(TokiwaError):
    """Raised when a lock cannot be acquired, renewed or released as required.

    ``name`` is the Redis key of the lock.
    """

    def __init__(self, message: str, *, name: str | None = None) -> None:
        super().__init__(message)
        self.name = name


class FencingError(LockError):
    """Raised when a write is refused because the writer's fencing token is stale:
    its lock expired and another holder has taken it since."""


class LeadershipError(TokiwaError):
    """Raised when an action needs leadership that this process does not hold."""


class WorkflowError(TokiwaError):
    """Base of the workflow engine's errors."""


class DependencyError(WorkflowError):
    """Raised when a workflow's graph is invalid: an unknown dependency or a duplicate node.

    ``nodes`` lists the node names involved.
    """

    def __init__(self, message: str, *, nodes: list[str] | None = None) -> None:
        super().__init__(message)
        self.nodes = list(nodes or [])


class CyclicDependencyError(DependencyError):
    """Raised when a workflow's nodes depend on each other in a cycle; ``nodes`` is the cycle."""


class StepExecutionError(WorkflowError):
    """Raised when a node (step) fails; ``node`` is its name and ``__cause__`` the original error."""

    def __init__(self, message: str, *, node: str | None = None) -> None:
        super().__init__(message)
        self.node = node


class TemplateError(WorkflowError):
    """Raised when a template parameter cannot be rendered; ``name`` is the missing variable."""

    def __init__(self, message: str, *, name: str | None = None) -> None:
        super().__init__(message)
        self.name = name


class TimeoutError(WorkflowError):  # noqa: A001 - deliberately shadows the builtin inside tokiwa
    """Raised when a node or a whole workflow exceeds its timeout; ``node`` is None for the run."""

    def __init__(self, message: str, *, node: str | None = None, timeout_s: float | None = None) -> None:
        super().__init__(message)
        self.node = node
        self.timeout_s = timeout_s


class RetryExhausted(WorkflowError):
    """Raised when a node failed on every allowed attempt; ``__cause__`` is the last error."""

    def __init__(self, message: str, *, node: str | None = None, attempts: int = 0) -> None:
        super().__init__(message)
        self.node = node
        self.attempts = attempts


class WorkflowAborted(WorkflowError):
    """Raised inside running nodes when fail-fast cancels the run (never retried)."""


class CronError(TokiwaError, ValueError):
    """Raised when a cron expression is invalid; ``field`` names the bad field."""

    def __init__(self, message: str, *, expr: str | None = None, field: str | None = None) -> None:
        super().__init__(message)
        self.expr = expr
        self.field = field


class RelayError(TokiwaError):
    """Raised when the Miclow relay's config or a child's output cannot be handled."""


def describe_error(exc: BaseException) -> dict[str, Any]:
    """Return a JSON/msgpack-friendly record of an exception: name, message, cause."""
    record: dict[str, Any] = {"name": type(exc).__name__, "message": str(exc)}
    cause = exc.__cause__
    if cause is not None and cause is not exc:
        record["cause"] = describe_error(cause)
    return record


class CommandError(StepExecutionError):
    """Raised when a command run by ``exec_command`` / ``exec_shell`` (or a shell step) fails:
    it could not start, exited with a code not in ``ok_codes``, or ran past its timeout.

    ``argv``, ``exit_code`` (None if it never ran or was killed on timeout), ``stdout``,
    ``stderr`` and ``timed_out`` say what happened.
    """

    def __init__(
        self,
        message: str,
        *,
        argv: list[str],
        exit_code: int | None = None,
        stdout: str = "",
        stderr: str = "",
        timed_out: bool = False,
        node: str | None = None,
    ) -> None:
        super().__init__(message, node=node)
        self.argv = list(argv)
        self.exit_code = exit_code
        self.stdout = stdout
        self.stderr = stderr
        self.timed_out = timed_out


class ShellNotAllowedError(InvalidArgumentError):
    """Raised when shell syntax is requested without opting in (``allow_shell=True`` for
    ``exec_shell``, ``shell: true`` for a declarative shell step)."""


class WorkflowFileError(ConfigError):
    """Raised when a declarative workflow file (YAML / TOML / JSON) is invalid.

    ``path`` is the file, ``field`` the dotted path of the first bad field (``steps[1].type``),
    ``line`` its 1-based line when known (YAML and JSON), and ``problems`` every
    ``(field, line, message)`` found.
    """

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        field: str | None = None,
        line: int | None = None,
        problems: list[tuple[str, int | None, str]] | None = None,
    ) -> None:
        super().__init__(message, field=field)
        self.path = path
        self.line = line
        self.problems = list(problems or [])


class CheckFailedError(StepExecutionError):
    """Raised when a declarative ``test`` step's expression does not hold; ``expression`` is
    the expression and ``value`` what it evaluated to."""

    def __init__(self, message: str, *, expression: str, value: Any = None, node: str | None = None) -> None:
        super().__init__(message, node=node)
        self.expression = expression
        self.value = value


class UnsafePathError(StepExecutionError, InvalidArgumentError):
    """Raised when a declarative step's path (a file step's path, a shell ``cwd``, a docker
    volume's host path, a python step's ``.py`` file) leads outside the workflow's folder once
    ``~``, ``..`` and symlinks are resolved, or cannot be used as a path at all (a NUL byte, a
    symlink loop), and the step has not opted out with ``allow_outside: true``.

    ``path`` is the path as the step gave it, ``resolved`` where it leads (None when it cannot
    be resolved) and ``base_dir`` the folder it must stay in.
    """

    def __init__(self, message: str, *, path: str, base_dir: str, resolved: str | None = None,
                 node: str | None = None) -> None:
        super().__init__(message, node=node)
        self.path = path
        self.base_dir = base_dir
        self.resolved = resolved
