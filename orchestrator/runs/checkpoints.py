"""Node checkpoints: durable runs of registered workflows, one node at a time.

A run that a worker took from the stream (a triggered run, or a run request) can be delivered
again: its worker died, or froze past its lease, and another worker reclaimed the entry. The
run id stays the same (see :func:`orchestrator.runs.registry.run_id_for`), so the new
execution finds what the earlier one left and goes on from there instead of starting over:

1. Before its first node, the execution claims the run's record under its own
   ``owner_token`` (the rule of live records, :func:`orchestrator.runs.stores.live_write_allowed`)
   and reads the run's checkpoints, ``{run hash}:nodes`` (:meth:`orchestrator.keys.Keys.run_nodes`).
2. The runner gets them as ``resume``: a node that succeeded is not run again (its output
   feeds its dependents; its record says ``checkpointed``), a node that had started goes on
   with its attempt count (``ctx.attempt`` continues). The record's ``resumed_from`` says so.
3. Before each attempt of a node and after its success, the :data:`CHECKPOINT` script writes
   the node's checkpoint, only while the run hash names this execution as its owner and says
   ``running``. The node's dependents start after its checkpoint landed.

A worker frozen past its lease, whose run another worker took over, can write no checkpoint:
its first refused write stops its execution (and its result is not recorded either: the run
recorder checks that the event is still ours). A refused write whose event is still ours (the
record was pruned, or Redis restarted empty) claims the record again and writes once more.

Not checkpointed: chatflows (their conversation memory is committed once, when the run ends,
so restoring node outputs without the memory changes they made would be wrong), runs not taken
from the stream (``run_workflow`` run here), runs recorded in a store other than the Redis one,
and workflows that opt out (``checkpoint=False``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import msgpack

from orchestrator import faults
from orchestrator.broker.groups import entry_of
from orchestrator.events import Event
from orchestrator.runs.recorder import LiveRun, OwnedFn
from orchestrator.runs.stores import RedisRunStore, RunStore
from orchestrator.workflow.model import Workflow
from orchestrator.workflow.result import NodeResult, NodeStatus, WorkflowRunResult, json_safe

if TYPE_CHECKING:
    from orchestrator.config import Settings
    from orchestrator.workflow.runner import Runner

log = logging.getLogger("tokiwa.workflows")
T = TypeVar("T")

# KEYS[1] = run hash, KEYS[2] = the run's node checkpoints hash
# ARGV[1] = the writer's owner token, ARGV[2] = node id, ARGV[3] = msgpack checkpoint
# The rule of a live record's progress write (SAVE_LIVE, live_write_allowed): only the execution
# whose owner_token the run hash holds, while it says running, may write. The checkpoints take
# the run hash's TTL, so they expire with the record. Returns 1 if written, 0 if refused.
CHECKPOINT = """
local got = redis.call('HMGET', KEYS[1], 'owner_token', 'status')
if got[1] ~= ARGV[1] or got[2] ~= 'running' then return 0 end
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
local ttl = redis.call('PTTL', KEYS[1])
if ttl > 0 then redis.call('PEXPIRE', KEYS[2], ttl) end
return 1
"""

#: a node's checkpoint while it runs, and once it succeeded
RUNNING, SUCCEEDED = "running", "succeeded"


class CheckpointHost(Protocol):
    """What checkpoints use of the app: its settings (how long a Redis outage is waited out),
    its run store (the Redis one holds the records the checkpoints are fenced by) and its
    runner (a fenced-out execution is cancelled there)."""

    @property
    def settings(self) -> Settings: ...
    @property
    def run_store(self) -> RunStore: ...
    @property
    def runner(self) -> Runner: ...


def decode(raw: Mapping[bytes, bytes], workflow: Workflow) -> dict[str, NodeResult]:
    """The checkpoints of ``HGETALL {run}:nodes`` as the runner's ``resume``: node name ->
    NodeResult (``succeeded`` with its output, or ``pending`` with the attempts made), in the
    workflow's node order. Fields of nodes the workflow no longer has are left out."""
    graph = workflow.validate()
    found: dict[int, dict[str, Any]] = {}
    for field, packed in raw.items():
        index = graph.index.get(field.decode() if isinstance(field, bytes) else str(field))
        if index is not None:
            found[index] = msgpack.unpackb(packed, raw=False)
    out: dict[str, NodeResult] = {}
    for index, data in sorted(found.items()):
        node = graph.nodes[index]
        done = data.get("status") == SUCCEEDED
        out[node.name] = NodeResult(
            node_id=node.id, name=node.name, status=NodeStatus.SUCCEEDED if done else NodeStatus.PENDING,
            output=data.get("output"), attempts=int(data.get("attempts") or 0),
            started_at=data.get("started_at"), finished_at=data.get("finished_at"),
            duration_ms=data.get("duration_ms"), checkpointed=done)
    return out


def resumed_from(restored: Mapping[str, NodeResult], raw: Mapping[bytes, bytes],
                 event: Event | None) -> dict[str, Any] | None:
    """The ``resumed_from`` of a run that found checkpoints (None when it found none)."""
    if not restored:
        return None
    workers = sorted({w for w in (msgpack.unpackb(v, raw=False).get("worker_id") for v in raw.values()) if w})
    return {"nodes": [n for n, r in restored.items() if r.status == NodeStatus.SUCCEEDED],
            "attempts": {n: r.attempts for n, r in restored.items() if r.status != NodeStatus.SUCCEEDED},
            "workers": workers, "deliveries": event.deliveries if event is not None else None}


class Checkpoints:
    """The checkpoints of the runs of one app: which runs have them, and opening one."""

    def __init__(self, host: CheckpointHost, owned: OwnedFn) -> None:
        self.host, self.owned = host, owned
        self._scripts: dict[int, Any] = {}  # id(redis client) -> its registered CHECKPOINT script
        self.writes = self.refused = self.failures = 0

    def store_for(self, workflow: Workflow, event: Event | None, option: bool | None) -> RedisRunStore | None:
        """The Redis run store that fences this run's checkpoints, or None when the run has none
        (``option`` is the registration's ``checkpoint``, None = the workflow's)."""
        enabled = workflow.checkpoint if option is None else option
        if not enabled or workflow.type == "chatflow" or event is None or not event.stream_id:
            return None
        store = self.host.run_store
        return store if isinstance(store, RedisRunStore) else None

    def script(self, store: RedisRunStore) -> Any:
        found = self._scripts.get(id(store.redis))
        if found is None:
            found = self._scripts[id(store.redis)] = store.redis.register_script(CHECKPOINT)
        return found

    async def begin(self, workflow: Workflow, run_id: str, event: Event | None, live: LiveRun,
                    option: bool | None) -> tuple[list[Any], dict[str, NodeResult] | None]:
        """The Runner's ``hooks`` and ``resume`` for one execution of a run: claim its record,
        read its checkpoints (two round trips), and the journal that writes new ones."""
        store = self.store_for(workflow, event, option)
        if store is None:
            return [live], None
        journal = RunJournal(self, store, workflow, run_id, event, live)
        await journal.claim(_first_record(workflow, run_id))
        raw = await journal._call(lambda: store.redis.hgetall(store.keys.run_nodes(run_id)))
        restored = decode(raw, workflow)
        journal.resumed_from = resumed_from(restored, raw, event)
        if journal.resumed_from is not None:
            log.info("run %s of %s resumes after %s (delivery %s)", run_id, workflow.name,
                     ", ".join(journal.resumed_from["nodes"]) or "no completed node", event.deliveries if event else "-")
        return [live, journal], restored


def _first_record(workflow: Workflow, run_id: str) -> WorkflowRunResult:
    """The run as it is before its first node: what the claim writes."""
    graph = workflow.validate()
    return WorkflowRunResult(
        run_id=run_id, workflow_id=workflow.id, workflow_name=workflow.name, workflow_type=workflow.type,
        started_at=time.time(), nodes={n.name: NodeResult(node_id=n.id, name=n.name) for n in graph.nodes})


class RunJournal:
    """The checkpoint writer of one execution of a run: Runner hooks (see
    :class:`~orchestrator.workflow.hooks.WorkflowHooks`), awaited by the node they are about:
    its attempt waits for the start checkpoint, its dependents for the success one."""

    def __init__(self, checkpoints: Checkpoints, store: RedisRunStore, workflow: Workflow, run_id: str,
                 event: Event | None, live: LiveRun) -> None:
        self.checkpoints, self.store, self.workflow, self.run_id = checkpoints, store, workflow, run_id
        self.event, self.live = event, live
        self.keys = [store.keys.run(run_id), store.keys.run_nodes(run_id)]
        self.resumed_from: dict[str, Any] | None = None
        self.stopped = False  # fenced out: no more writes, the run is being cancelled
        self._warned = False

    async def _call(self, op: Callable[[], Awaitable[T]]) -> T:
        """``op()``; a Redis that is unreachable, full or failing over is waited out (one log
        line per episode) for up to the visibility timeout, after which the entry may belong to
        another worker anyway. The first try goes straight to Redis (no retry machinery)."""
        try:
            return await op()
        except Exception as exc:
            if not faults.is_transient(exc):
                raise
        return await faults.retry_transient(op, deadline_s=self.checkpoints.host.settings.visibility_timeout_s)

    async def claim(self, result: WorkflowRunResult) -> bool:
        """Write ``result``'s record as a claim under this execution's owner token."""
        record = {**result.progress_record(), **self.live.fields()}
        [ok] = await self._call(lambda: self.store.save_live([(record, True)]))
        self.live.claimed = self.live.claimed or ok
        return ok

    # -- the runner's hooks ---------------------------------------------------------------
    def on_run_start(self, workflow: Any, run_id: str) -> None:
        result = self._result()
        if result is not None and self.resumed_from is not None:
            result.resumed_from = self.resumed_from

    async def on_node_start(self, node: Any, ctx: Any) -> None:
        nr = self._node(node)
        await self._write(node, {"status": RUNNING, "attempts": ctx.attempt,
                                 "started_at": nr.started_at if nr is not None else None})

    async def on_node_complete(self, node: Any, ctx: Any, output: Any) -> None:
        nr = self._node(node)
        await self._write(node, {"status": SUCCEEDED, "attempts": ctx.attempt, "output": json_safe(output),
                                 "started_at": nr.started_at if nr else None,
                                 "finished_at": nr.finished_at if nr else None,
                                 "duration_ms": nr.duration_ms if nr else None})

    # -- writing ---------------------------------------------------------------------------
    def _result(self) -> WorkflowRunResult | None:
        return self.checkpoints.host.runner.result_of(self.run_id)

    def _node(self, node: Any) -> NodeResult | None:
        result = self._result()
        return None if result is None else result.nodes.get(node.name)

    async def _write(self, node: Any, checkpoint: dict[str, Any]) -> None:
        if self.stopped:
            return
        packed = msgpack.packb({**checkpoint, "name": node.name, "worker_id": self.live.fields()["worker_id"]},
                               default=repr, use_bin_type=True)
        script = self.checkpoints.script(self.store)

        def write() -> Awaitable[Any]:
            return script(keys=self.keys, args=[self.live.owner_token, node.id, packed])  # type: ignore[no-any-return]

        try:
            ok = await self._call(write)
            if not ok:
                ok = await self._refused(node, write)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.checkpoints.failures += 1
            if not self._warned:
                self._warned = True
                log.warning("run %s: checkpoint of node %s not written (%r); were this worker to die now, "
                            "the node would run again", self.run_id, node.name, exc)
            return
        if ok:
            self.checkpoints.writes += 1

    async def _refused(self, node: Any, write: Any) -> bool:
        """A write was refused: another execution owns the record, or the record is gone. If
        the run's event is still ours, claim the record again and write once more; else stop
        this execution (its result would not be recorded either)."""
        self.checkpoints.refused += 1
        if await self._still_ours():
            result = self._result()
            if result is not None and await self.claim(result) and await write():
                return True
        self.stopped = True
        log.warning("run %s: another worker owns it now; this execution stops at node %s and writes no "
                    "checkpoint", self.run_id, node.name)
        self.checkpoints.host.runner.cancel(self.run_id, "its event was taken over by another worker")
        await asyncio.sleep(0)  # the cancellation reaches this node's task here: its handler never starts
        return False

    async def _still_ours(self) -> bool:
        event = self.event
        if event is None or not event.stream_id:
            return True
        try:
            return entry_of(event) in await self.checkpoints.owned([event])
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("run %s: cannot tell whether its event is still ours (%r); stopping it", self.run_id, exc)
            return False
