"""The workflow model: :class:`Node`, :class:`Workflow` and their deterministic ids.

A workflow is a DAG of nodes; a node runs when every node it depends on succeeded (see
:mod:`orchestrator.workflow.runner`). Ids are derived from names with uuid5, so every process on
every host computes the same ids without coordination:

* ``workflow_id_for(name)``            = uuid5(TOKIWA_NAMESPACE, "workflow:" + name)
* ``node_id_for(workflow, node)``      = uuid5(TOKIWA_NAMESPACE, "node:" + workflow + "/" + node)
* a node not yet in a workflow has the *detached* id uuid5(TOKIWA_NAMESPACE, "node:" + name).

``Node.id`` is the detached id until the node is added to a workflow, then the workflow's
id for it. ``depends_on`` entries may be a node name, a detached id or an attached id, so
``Node("charge", depends_on=[validate.id])`` keeps working after both nodes were added.
"""

from __future__ import annotations

import heapq
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

from orchestrator.callbacks import is_async_callable
from orchestrator.errors import ConflictError, CyclicDependencyError, DependencyError, InvalidArgumentError
from orchestrator.workflow.retry import RetryPolicy

# A fixed namespace for tokiwa's uuid5 ids. Never change it: ids are compared across hosts.
TOKIWA_NAMESPACE = uuid.UUID("6f1c0b8e-5d3a-5e2b-9a77-70b1c0e1d5a1")
WORKFLOW_TYPES = ("workflow", "chatflow")
#: how many nodes of a run run at once when neither the run nor the workflow says (tokiwa's defaults)
DEFAULT_CONCURRENCY = {"workflow": 4, "chatflow": 1}

Handler = Callable[[Any], Any]


def workflow_id_for(name: str) -> str:
    """The id every host gives the workflow called ``name``."""
    return str(uuid.uuid5(TOKIWA_NAMESPACE, f"workflow:{name}"))


def node_id_for(workflow_name: str, node_name: str) -> str:
    """The id every host gives node ``node_name`` of workflow ``workflow_name``."""
    return str(uuid.uuid5(TOKIWA_NAMESPACE, f"node:{workflow_name}/{node_name}"))


def detached_node_id(node_name: str) -> str:
    """The id of a node that belongs to no workflow yet."""
    return str(uuid.uuid5(TOKIWA_NAMESPACE, f"node:{node_name}"))


def _check_name(kind: str, name: Any) -> str:
    if not isinstance(name, str) or not name.strip():
        raise InvalidArgumentError(f"{kind} name must be a non-blank string, got {name!r}")
    return name


class Node:
    """One step of a workflow.

    ``handler(ctx)`` may be ``async def`` or a plain ``def`` (run in a thread pool); it gets
    a :class:`~orchestrator.workflow.context.NodeContext` and its return value is the node's
    output. ``timeout`` (seconds) bounds each attempt; ``retry`` says how failures are retried.
    ``inline=True`` runs a plain ``def`` handler on the event loop itself, skipping the thread
    hop (~50 µs): only for tiny functions that never block (no I/O, no sleeping); a node
    timeout cannot interrupt it.
    """

    __slots__ = ("name", "handler", "depends_on", "retry", "timeout", "description",
                 "is_async", "inline", "_workflow_name", "_id")

    def __init__(
        self,
        name: str,
        handler: Handler | None = None,
        depends_on: Iterable[str] | None = None,
        retry: RetryPolicy | None = None,
        timeout: float | None = None,
        *,
        description: str | None = None,
        inline: bool = False,
    ) -> None:
        self.name = _check_name("node", name)
        if handler is None or not callable(handler):
            raise InvalidArgumentError(f"node {name!r}: handler must be callable, got {handler!r}")
        if isinstance(depends_on, str):
            raise InvalidArgumentError(f"node {name!r}: depends_on must be a list of ids or names")
        self.depends_on: list[str] = [_check_name("dependency", d) for d in depends_on or ()]
        if retry is not None and not isinstance(retry, RetryPolicy):
            raise InvalidArgumentError(f"node {name!r}: retry must be a RetryPolicy, got {retry!r}")
        self.retry = retry
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                    or timeout <= 0):
            raise InvalidArgumentError(f"node {name!r}: timeout must be a positive number of seconds")
        self.timeout = None if timeout is None else float(timeout)
        self.handler = handler
        self.description = description
        self.is_async = is_async_callable(handler)
        self.inline = bool(inline) and not self.is_async
        self._workflow_name: str | None = None
        self._id = detached_node_id(name)

    @property
    def id(self) -> str:
        """Detached id until the node joins a workflow, then ``node_id_for(workflow, name)``."""
        return self._id

    @property
    def workflow_name(self) -> str | None:
        return self._workflow_name

    def copy(self) -> Node:
        """A detached copy (same handler, dependencies and policy), e.g. to reuse in another workflow."""
        return Node(self.name, self.handler, list(self.depends_on), self.retry, self.timeout,
                    description=self.description, inline=self.inline)

    def _attach(self, workflow_name: str) -> None:
        if self._workflow_name is not None and self._workflow_name != workflow_name:
            raise ConflictError(
                f"node {self.name!r} already belongs to workflow {self._workflow_name!r}; "
                f"add node.copy() to {workflow_name!r} instead")
        self._workflow_name = workflow_name
        self._id = node_id_for(workflow_name, self.name)

    def __repr__(self) -> str:
        return f"Node(name={self.name!r}, depends_on={self.depends_on!r})"


@dataclass(frozen=True, slots=True)
class Graph:
    """A validated workflow graph in index form, as the runner uses it.

    ``deps[i]`` / ``dependents[i]`` are indices into ``nodes`` (insertion order).
    """

    nodes: tuple[Node, ...]
    deps: tuple[tuple[int, ...], ...]
    dependents: tuple[tuple[int, ...], ...]
    index: dict[str, int]  # name, attached id and detached id -> node index


class ExecutionPlan(list[list[Node]]):
    """A workflow's level-by-level plan, as the workflow port plan's executor runs it.

    The plan is the list of levels (level *k* holds the nodes whose longest chain of
    dependencies has length *k*), with ``max_parallel`` (nodes started together at most) and
    ``timeout_s`` (the whole run's bound, None = none). :attr:`batches` cuts each level into
    batches of at most ``max_parallel`` nodes: a level-by-level executor starts a batch, waits
    for it, then starts the next.
    """

    def __init__(self, levels: Iterable[list[Node]], *, max_parallel: int, timeout_s: float | None) -> None:
        super().__init__(levels)
        self.max_parallel = max_parallel
        self.timeout_s = timeout_s

    @property
    def levels(self) -> list[list[Node]]:
        return [list(level) for level in self]

    @property
    def batches(self) -> list[list[Node]]:
        """Every level cut, in order, into runs of at most ``max_parallel`` nodes."""
        step = self.max_parallel
        return [level[i:i + step] for level in self for i in range(0, len(level), step)]

    def to_dict(self) -> dict[str, Any]:
        """Plain data with node names: ``{max_parallel, timeout_s, levels, batches}``."""
        return {"max_parallel": self.max_parallel, "timeout_s": self.timeout_s,
                "levels": [[n.name for n in level] for level in self],
                "batches": [[n.name for n in batch] for batch in self.batches]}

    def __repr__(self) -> str:
        return (f"ExecutionPlan(levels={[[n.name for n in level] for level in self]!r}, "
                f"max_parallel={self.max_parallel}, timeout_s={self.timeout_s!r})")


def _check_max_parallel(workflow: str, value: Any) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise InvalidArgumentError(f"workflow {workflow!r}: max_parallel must be an integer >= 1, got {value!r}")
    return value


def _check_timeout(workflow: str, value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise InvalidArgumentError(f"workflow {workflow!r}: timeout_s must be a positive number of seconds, "
                                   f"got {value!r}")
    return float(value)


def _check_flag(workflow: str, name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise InvalidArgumentError(f"workflow {workflow!r}: {name} must be True or False, got {value!r}")
    return value


class Workflow:
    """A named DAG of nodes; ``type`` is ``"workflow"`` or ``"chatflow"`` (one conversation
    at a time, default concurrency 1, needs a conversation id to run).

    Run defaults, used by every run that does not set its own: ``max_parallel`` (nodes at
    once; None = 4, 1 for a chatflow), ``timeout_s`` (the whole run), ``fail_fast``.
    ``checkpoint`` (default True): a run that a worker took from the stream checkpoints each
    node's result in Redis, and a redelivered run goes on after its completed nodes (see
    docs/workflows.md, "Durable runs"); False for cheap flows that may simply run again.
    ``redact`` (None by default) hides secrets in what the run's records show people: a
    function from a value to the value shown; the nodes' outputs themselves stay as they are.

    Constructing with ``nodes`` validates the whole graph at once; ``add_node`` and
    ``connect`` validate lazily (``validate()``, ``get_execution_plan()`` or a run).
    """

    #: how records of this workflow's runs hide secrets (value -> value shown); None = as they are
    redact: Callable[[Any], Any] | None = None

    def __init__(
        self,
        name: str,
        nodes: Iterable[Node] | None = None,
        type: Literal["workflow", "chatflow"] = "workflow",  # noqa: A002 - public name
        *,
        description: str | None = None,
        max_parallel: int | None = None,
        timeout_s: float | None = None,
        fail_fast: bool = True,
        checkpoint: bool = True,
    ) -> None:
        self.name = _check_name("workflow", name)
        if type not in WORKFLOW_TYPES:
            raise InvalidArgumentError(f"workflow {name!r}: type must be 'workflow' or 'chatflow', got {type!r}")
        self.type = type
        self.description = description
        self.max_parallel = _check_max_parallel(name, max_parallel)
        self.timeout_s = _check_timeout(name, timeout_s)
        self.fail_fast = _check_flag(name, "fail_fast", fail_fast)
        self.checkpoint = _check_flag(name, "checkpoint", checkpoint)
        self.id = workflow_id_for(name)
        self._nodes: dict[str, Node] = {}
        self._graph: Graph | None = None
        self._graph_key: tuple[Any, ...] | None = None
        for node in nodes or ():
            self.add_node(node)
        if nodes:
            self.validate()

    @property
    def nodes(self) -> list[Node]:
        """The nodes in insertion order."""
        return list(self._nodes.values())

    def add_node(self, node: Node) -> Node:
        """Add ``node`` (it takes this workflow's id for it); a duplicate name is a DependencyError."""
        if not isinstance(node, Node):
            raise InvalidArgumentError(f"workflow {self.name!r}: add_node expects a Node, got {node!r}")
        if node.name in self._nodes:
            raise DependencyError(
                f"workflow {self.name!r} has two nodes named {node.name!r}; node names must be unique",
                nodes=[node.name])
        node._attach(self.name)
        self._nodes[node.name] = node
        self._graph = None
        return node

    def get_node(self, ref: str) -> Node:
        """The node whose name, id or detached id is ``ref``; unknown → DependencyError."""
        node = self._lookup().get(ref)
        if node is None:
            raise DependencyError(f"workflow {self.name!r} has no node {ref!r}", nodes=[ref])
        return node

    def connect(self, from_ref: str, to_ref: str) -> None:
        """Make ``to`` depend on ``from`` (each given by id or name; both must exist)."""
        source, target = self.get_node(from_ref), self.get_node(to_ref)
        if source is target:
            raise CyclicDependencyError(f"workflow {self.name!r}: node {source.name!r} cannot depend on itself",
                                        nodes=[source.name])
        if source.name not in self._resolve_names(target):
            target.depends_on.append(source.id)
            self._graph = None

    def validate(self) -> Graph:
        """Check the graph (unknown dependencies, cycles) and return its index form."""
        key = tuple((id(n), tuple(n.depends_on)) for n in self._nodes.values())
        if self._graph is not None and key == self._graph_key:
            return self._graph
        nodes = tuple(self._nodes.values())
        index = {n.name: i for i, n in enumerate(nodes)}
        lookup = self._lookup()
        for i, n in enumerate(nodes):
            index[n.id] = i
            index[detached_node_id(n.name)] = i
        deps = tuple(self._dep_indices(n, lookup, index) for n in nodes)
        dependents: list[list[int]] = [[] for _ in nodes]
        for i, ds in enumerate(deps):
            for d in ds:
                dependents[d].append(i)
        _check_acyclic(self.name, nodes, deps)
        self._graph = Graph(nodes, deps, tuple(tuple(x) for x in dependents), index)
        self._graph_key = key
        return self._graph

    def get_execution_plan(self, max_parallel: int | None = None) -> ExecutionPlan:
        """The level-by-level plan (an :class:`ExecutionPlan`, a list of levels): level k holds
        the nodes whose longest chain of dependencies has length k (ties in insertion order),
        with ``max_parallel`` (given, else the workflow's, else its type's default) and the
        workflow's ``timeout_s``. The runner does not wait for whole levels (a node starts as
        soon as its own dependencies succeeded); this plan is for display and for
        level-by-level executors."""
        limit = _check_max_parallel(self.name, max_parallel) or self.max_parallel or DEFAULT_CONCURRENCY[self.type]
        graph = self.validate()
        depth = [0] * len(graph.nodes)
        for i in _topological_order(graph.deps):
            depth[i] = max((depth[d] + 1 for d in graph.deps[i]), default=0)
        levels: list[list[Node]] = [[] for _ in range(max(depth, default=-1) + 1)]
        for i, node in enumerate(graph.nodes):
            levels[depth[i]].append(node)
        return ExecutionPlan(levels, max_parallel=limit, timeout_s=self.timeout_s)

    def _lookup(self) -> dict[str, Node]:
        lookup: dict[str, Node] = {}
        for n in self._nodes.values():
            lookup[detached_node_id(n.name)] = n
            lookup[n.id] = n
        lookup.update(self._nodes)
        return lookup

    def _resolve_names(self, node: Node) -> set[str]:
        lookup = self._lookup()
        return {lookup[d].name for d in node.depends_on if d in lookup}

    def _dep_indices(self, node: Node, lookup: dict[str, Node], index: dict[str, int]) -> tuple[int, ...]:
        unknown = [d for d in node.depends_on if d not in lookup]
        if unknown:
            raise DependencyError(
                f"workflow {self.name!r}: node {node.name!r} depends on unknown node(s) "
                f"{', '.join(map(repr, unknown))}", nodes=[node.name, *unknown])
        resolved = sorted({index[lookup[d].name] for d in node.depends_on})
        if index[node.name] in resolved:
            raise CyclicDependencyError(
                f"workflow {self.name!r}: node {node.name!r} depends on itself", nodes=[node.name])
        return tuple(resolved)

    def __repr__(self) -> str:
        return f"Workflow(name={self.name!r}, type={self.type!r}, nodes={[n.name for n in self._nodes.values()]!r})"


def _topological_order(deps: tuple[tuple[int, ...], ...]) -> list[int]:
    """Kahn's algorithm, ties in insertion order; returns the nodes it could order."""
    remaining = [len(d) for d in deps]
    dependents: list[list[int]] = [[] for _ in deps]
    for i, ds in enumerate(deps):
        for d in ds:
            dependents[d].append(i)
    ready = [i for i, c in enumerate(remaining) if c == 0]
    order: list[int] = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for j in dependents[i]:
            remaining[j] -= 1
            if remaining[j] == 0:
                heapq.heappush(ready, j)
    return order


def _check_acyclic(workflow: str, nodes: tuple[Node, ...], deps: tuple[tuple[int, ...], ...]) -> None:
    ordered = set(_topological_order(deps))
    if len(ordered) == len(nodes):
        return
    cycle = _find_cycle([i for i in range(len(nodes)) if i not in ordered], deps)
    names = [nodes[i].name for i in cycle]
    raise CyclicDependencyError(
        f"workflow {workflow!r} has a dependency cycle: {' -> '.join(names + names[:1])}", nodes=names)


def _find_cycle(candidates: list[int], deps: tuple[tuple[int, ...], ...]) -> list[int]:
    """One cycle among the nodes Kahn's algorithm could not order (each has an unordered dep)."""
    left = set(candidates)
    path: list[int] = []
    seen: dict[int, int] = {}
    node = candidates[0]
    while node not in seen:
        seen[node] = len(path)
        path.append(node)
        node = next(d for d in deps[node] if d in left)
    cycle = path[seen[node]:]
    cycle.reverse()  # dependency order: a -> b means b depends on a
    start = cycle.index(min(cycle))  # begin at the earliest-added node, for a stable message
    return cycle[start:] + cycle[:start]
