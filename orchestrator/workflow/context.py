"""What a node handler sees: :class:`NodeContext` and the run's :class:`AbortSignal`. A run
stores artifacts in ``services.artifacts`` (any object with ``store(name, data)``,
``load(name)`` and ``list()``), else in an :class:`~orchestrator.workflow.artifacts.InMemoryArtifactStore`.

One ``NodeContext`` is built per attempt; it is cheap (a few slots) because everything the
nodes of one run share lives once in the run (``RunShared``).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Generator
from typing import TYPE_CHECKING, Any

from orchestrator.callbacks import call_and_await
from orchestrator.errors import InvalidArgumentError, NotFoundError, StateError, WorkflowAborted
from orchestrator.workflow.artifacts import InMemoryArtifactStore

if TYPE_CHECKING:
    from orchestrator.workflow.model import Graph, Node, Workflow
    from orchestrator.workflow.result import WorkflowRunResult

MAX_LOG_LINES = 1000
logger = logging.getLogger("tokiwa.workflow")


class AbortSignal:
    """Set once when the run is aborted (fail-fast, cancel, workflow timeout).

    Usable from sync handlers (``is_set()``, ``wait(timeout)``, like ``threading.Event``) and
    from async ones (``await signal.wait_async()`` or ``await signal``). ``reason`` is the
    :class:`~orchestrator.errors.WorkflowAborted` error, its cause the failure that aborted.
    """

    __slots__ = ("_event", "_waiters", "_lock", "reason")

    def __init__(self) -> None:
        self._event = threading.Event()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[Any]]] = []
        self._lock = threading.Lock()
        self.reason: WorkflowAborted | None = None

    @property
    def aborted(self) -> bool:
        return self._event.is_set()

    def is_set(self) -> bool:
        return self._event.is_set()

    def set(self, reason: WorkflowAborted | None = None) -> None:
        """Abort (idempotent: the first reason wins); safe from any thread."""
        with self._lock:
            if self._event.is_set():
                return
            self.reason = reason or WorkflowAborted("workflow aborted")
            self._event.set()
            waiters, self._waiters = self._waiters, []
        for loop, fut in waiters:
            loop.call_soon_threadsafe(_resolve, fut)

    def wait(self, timeout: float | None = None) -> bool:
        """Block (a sync handler's thread) until aborted or ``timeout``; True if aborted."""
        return self._event.wait(timeout)

    async def wait_async(self) -> None:
        """Return once the run is aborted."""
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._event.is_set():
                return
            fut = loop.create_future()
            self._waiters.append((loop, fut))
        try:
            await fut
        finally:
            with self._lock:
                if (loop, fut) in self._waiters:
                    self._waiters.remove((loop, fut))

    def __await__(self) -> Generator[Any, None, None]:
        return self.wait_async().__await__()

    def raise_if_aborted(self) -> None:
        """Raise the abort reason if the run was aborted (a handler's cooperative check)."""
        if self._event.is_set():
            raise self.reason or WorkflowAborted("workflow aborted")


def _resolve(fut: asyncio.Future[Any]) -> None:
    if not fut.done():
        fut.set_result(None)


class _RecordingArtifacts:
    """Wraps the run's store so that every stored artifact is listed in the run result."""

    __slots__ = ("_store", "_shared", "_node")

    def __init__(self, store: Any, shared: RunShared, node: str) -> None:
        self._store, self._shared, self._node = store, shared, node

    def store(self, name: str, data: bytes | str) -> Any:
        location = self._store.store(name, data)
        size = len(data.encode() if isinstance(data, str) else data)
        entry = {"name": name, "node": self._node, "size": size}
        if isinstance(location, (str, int, float)):
            entry["location"] = location
        self._shared.result.artifacts.append(entry)
        return location

    def load(self, name: str) -> bytes:
        data: bytes = self._store.load(name)
        return data

    def list(self) -> list[str]:
        names: list[str] = self._store.list()
        return names


class _NodeLogger(logging.LoggerAdapter[logging.Logger]):
    """Logs through ``tokiwa.workflow`` and keeps the line in ``result.logs`` (capped at
    ``MAX_LOG_LINES``; each entry is ``{timestamp, node, level, message}``)."""

    extra: dict[str, Any]

    def __init__(self, shared: RunShared, node: Node, attempt: int) -> None:
        super().__init__(logger, {"run_id": shared.result.run_id, "node": node.name, "attempt": attempt})
        self._shared = shared

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        return f"[{self.extra['node']}] {msg}", {**kwargs, "extra": {**self.extra, **kwargs.get("extra", {})}}

    def log(self, level: int, msg: Any, *args: Any, **kwargs: Any) -> None:
        logs = self._shared.result.logs
        # INFO and above are always kept in the run's logs; DEBUG only when the logger is enabled for it
        if len(logs) < MAX_LOG_LINES and (level >= logging.INFO or self.isEnabledFor(level)):
            text = str(msg) % args if args else str(msg)
            logs.append({"timestamp": self._shared.clock(), "node": self.extra["node"],
                         "level": logging.getLevelName(level), "message": text})
        super().log(level, msg, *args, **kwargs)


class RunShared:
    """Everything the nodes of one run share (one object per run, not per node)."""

    __slots__ = ("workflow", "graph", "input", "context", "event", "conversation_id",
                 "results", "memory", "signal", "_artifacts", "services", "clock", "result", "loop")

    def __init__(self, *, workflow: Workflow, graph: Graph, input: Any, context: Any,
                 event: Any, conversation_id: str | None, memory: dict[str, Any], signal: AbortSignal,
                 artifacts: Any, services: Any, clock: Callable[[], float], result: WorkflowRunResult,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.workflow, self.graph = workflow, graph
        self.input, self.context, self.event = input, context, event
        self.conversation_id, self.memory, self.signal = conversation_id, memory, signal
        self._artifacts, self.services, self.clock, self.result = artifacts, services, clock, result
        self.loop = loop
        self.results: dict[str, Any] = result.results

    @property
    def artifacts(self) -> Any:
        """The run's artifact store: ``services.artifacts`` or an in-memory one, made on first
        use (most runs never store an artifact)."""
        if self._artifacts is None:
            self._artifacts = getattr(self.services, "artifacts", None) or InMemoryArtifactStore()
        return self._artifacts


class NodeContext:
    """The one object a handler receives.

    Run-wide: ``input``, ``context``, ``event``, ``run_id``, ``workflow_id``,
    ``conversation_id``, ``results`` (node id -> output, shared), ``memory``, ``signal``,
    ``artifacts``. Per node: ``node_id``, ``node_name``, ``attempt`` (1-based), ``logger``.
    ``input`` and ``context`` are shared, not copied: treat them as read-only.
    """

    __slots__ = ("_shared", "node", "attempt", "_logger")

    def __init__(self, shared: RunShared, node: Node, attempt: int) -> None:
        self._shared, self.node, self.attempt = shared, node, attempt
        self._logger: logging.LoggerAdapter[logging.Logger] | None = None

    input = property(lambda self: self._shared.input)
    context = property(lambda self: self._shared.context)
    event = property(lambda self: self._shared.event)
    conversation_id = property(lambda self: self._shared.conversation_id)
    results = property(lambda self: self._shared.results)
    signal = property(lambda self: self._shared.signal)
    run_id = property(lambda self: self._shared.result.run_id)
    workflow_id = property(lambda self: self._shared.workflow.id)
    node_id = property(lambda self: self.node.id)
    node_name = property(lambda self: self.node.name)
    #: pyoco's name for ``signal.is_set()``: the run is being aborted or cancelled, stop early
    is_cancelled = property(lambda self: self._shared.signal.is_set())

    @property
    def params(self) -> dict[str, Any]:
        """pyoco's name for the run parameters: ``input`` when it is a dict, else ``{}``."""
        value = self._shared.input
        return value if isinstance(value, dict) else {}

    @property
    def memory(self) -> dict[str, Any]:
        """The run's memory (conversation memory for chatflows); mutate via update/set_memory."""
        return self._shared.memory

    def get_memory(self) -> dict[str, Any]:
        return self._shared.memory

    def update_memory(self, patch: dict[str, Any]) -> dict[str, Any]:
        """Shallow-merge ``patch`` into the memory and return it."""
        if not isinstance(patch, dict):
            raise InvalidArgumentError(f"update_memory expects a dict, got {type(patch).__name__}")
        self._shared.memory.update(patch)
        return self._shared.memory

    def set_memory(self, memory: dict[str, Any]) -> dict[str, Any]:
        """Replace the memory with (a shallow copy of) ``memory``."""
        if not isinstance(memory, dict):
            raise InvalidArgumentError(f"set_memory expects a dict, got {type(memory).__name__}")
        self._shared.memory.clear()
        self._shared.memory.update(memory)
        return self._shared.memory

    def _node_id(self, ref: str) -> str:
        graph = self._shared.graph
        index = graph.index.get(ref)
        if index is None:
            raise NotFoundError(f"workflow {self._shared.workflow.name!r} has no node {ref!r}")
        return graph.nodes[index].id

    def get_result(self, ref: str, default: Any = None) -> Any:
        """Output of the node with this id or name (``default`` if it has not produced one);
        an unknown node is a NotFoundError."""
        return self._shared.results.get(self._node_id(ref), default)

    def has_result(self, ref: str) -> bool:
        """Whether the node with this id or name has produced an output (False if unknown)."""
        index = self._shared.graph.index.get(ref)
        return index is not None and self._shared.graph.nodes[index].id in self._shared.results

    @property
    def artifacts(self) -> _RecordingArtifacts:
        return _RecordingArtifacts(self._shared.artifacts, self._shared, self.node.name)

    @property
    def logger(self) -> logging.LoggerAdapter[logging.Logger]:
        if self._logger is None:
            self._logger = _NodeLogger(self._shared, self.node, self.attempt)
        return self._logger

    def publish_topic(self, topic: str, message: Any) -> Any:
        """Publish a Miclow-style topic message through the relay.

        From an async handler: ``await ctx.publish_topic(t, m)``. From a sync handler (a
        worker thread) it blocks until published and returns the result.
        """
        publish = getattr(self._shared.services, "publish_topic", None)
        if publish is None:
            raise StateError("publish_topic needs a relay/Redis connection; this run has none "
                             "(run it through an Orchestrator or pass services.publish_topic)")
        loop = self._shared.loop
        if _in_loop(loop):
            return _as_awaitable(publish(topic, message))
        return asyncio.run_coroutine_threadsafe(call_and_await(publish, topic, message), loop).result()


def _in_loop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


def _as_awaitable(value: Any) -> Any:
    if asyncio.iscoroutine(value) or isinstance(value, asyncio.Future):
        return value
    fut = asyncio.get_running_loop().create_future()
    fut.set_result(value)
    return fut
