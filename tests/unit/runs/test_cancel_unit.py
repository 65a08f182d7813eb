"""Cancel requests without Redis: decoding, the reason text, the record of a run cancelled
before it started, the runner carrying who cancelled, and the watcher's fault policy on a
client that fails (no Redis call while nothing runs, transient faults waited out,
non-transient ones restarting it until it gives up)."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import msgpack
import pytest
from redis import exceptions as rx

from orchestrator.faults import MAX_RESTARTS
from orchestrator.keys import Keys
from orchestrator.runs.cancel import (
    CancelWatcher,
    cancel_reason,
    cancelled_result,
    decode_request,
)
from orchestrator.workflow.model import Node, Workflow
from orchestrator.workflow.result import NodeStatus, RunStatus, WorkflowRunResult
from orchestrator.workflow.runner import Runner


def slow_workflow(ran: list[str]) -> Workflow:
    async def first(ctx):
        ran.append("first")
        await asyncio.sleep(30)

    async def second(ctx):
        ran.append("second")

    return Workflow("slow", [Node("first", first), Node("second", second, ["first"])])


async def wait_for(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


def test_a_request_decodes_and_garbage_still_means_cancel():
    raw = msgpack.packb({"by": "ops", "at": 12.5, "reason": "wrong input"})
    assert decode_request(raw) == {"by": "ops", "at": 12.5, "reason": "wrong input"}
    assert decode_request(msgpack.packb({"by": "", "at": "soon"})) == {"by": "unknown", "at": None, "reason": None}
    assert decode_request(b"\xc1not msgpack")["by"] == "unknown"
    assert decode_request(msgpack.packb([1, 2]))["by"] == "unknown"


def test_the_reason_text_names_who_and_why():
    assert cancel_reason({"by": "ops", "reason": "wrong input"}) == "cancelled by ops: wrong input"
    assert cancel_reason({"by": "ops", "reason": None}) == "cancelled by ops"


def test_a_run_cancelled_before_it_started_is_recorded_with_who_and_when():
    wf = slow_workflow([])
    result = cancelled_result(wf, "run-1", {"by": "ops", "at": 100.0, "reason": "not needed"},
                              conversation_id="c-1")
    assert result.status == RunStatus.CANCELLED
    assert (result.cancelled_by, result.cancelled_at) == ("ops", 100.0)
    assert result.error["name"] == "WorkflowAborted"
    assert result.error["message"] == "workflow 'slow': cancelled by ops before it started: not needed"
    assert result.started_at == result.finished_at and result.started_at > 0
    assert {n.status for n in result.nodes.values()} == {NodeStatus.CANCELLED}
    assert all(n.attempts == 0 for n in result.nodes.values())
    assert result.results == {} and result.conversation_id == "c-1"

    back = WorkflowRunResult.from_record(result.to_record())
    assert back.to_record() == result.to_record()
    assert (back.status, back.cancelled_by, back.cancelled_at) == (RunStatus.CANCELLED, "ops", 100.0)
    assert back.nodes["second"].status == NodeStatus.CANCELLED


def test_records_of_older_versions_read_without_the_cancel_fields():
    record = cancelled_result(slow_workflow([]), "run-2", {"by": "ops", "at": 1.0}).to_record()
    del record["cancelled_by"], record["cancelled_at"]
    back = WorkflowRunResult.from_record(record)
    assert back.cancelled_by is None and back.cancelled_at is None


async def test_runner_cancel_carries_who_cancelled():
    ran: list[str] = []
    runner = Runner(cancel_grace_s=0.5)
    task = asyncio.create_task(runner.run(slow_workflow(ran), run_id="r1"))
    await wait_for(lambda: ran == ["first"])
    assert runner.cancel("r1", "cancelled by ops: test", by="ops", at=42.0)
    result = await asyncio.wait_for(task, 5)
    assert result.status == RunStatus.CANCELLED
    assert (result.cancelled_by, result.cancelled_at) == ("ops", 42.0)
    assert "cancelled by ops: test" in result.error["message"]
    assert ran == ["first"]
    assert not runner.cancel("r1", "again")


async def test_runner_cancel_without_by_leaves_the_fields_empty():
    runner = Runner(cancel_grace_s=0.5)
    task = asyncio.create_task(runner.run(slow_workflow([]), run_id="r2"))
    await wait_for(lambda: "r2" in runner.active_runs)
    await asyncio.sleep(0.01)
    runner.cancel("r2")
    result = await asyncio.wait_for(task, 5)
    assert result.status == RunStatus.CANCELLED and result.cancelled_by is None


# -- the watcher on a scripted client ------------------------------------------------------------
class ScriptedRedis:
    """``mget`` answers from ``values`` or raises the next error of ``errors``."""

    def __init__(self, errors: list[BaseException] | None = None, values: dict[str, bytes] | None = None):
        self.errors = list(errors or [])
        self.values = dict(values or {})
        self.calls = 0

    async def mget(self, keys: list[str]) -> list[bytes | None]:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return [self.values.get(k) for k in keys]


def host(redis, runner) -> SimpleNamespace:
    return SimpleNamespace(redis=redis, keys=Keys("unit"), runner=runner)


def fast(watcher: CancelWatcher) -> CancelWatcher:
    watcher.backoff_base_s = watcher.backoff_cap_s = 0.001
    return watcher


async def test_the_watcher_makes_no_call_while_nothing_runs():
    redis = ScriptedRedis()
    watcher = CancelWatcher(host(redis, Runner()), interval_s=0.01)
    await watcher.start()
    await asyncio.sleep(0.1)
    await watcher.stop()
    assert redis.calls == 0 and watcher.reads == 0 and watcher.failed is None


async def test_the_watcher_waits_out_transient_faults_and_cancels_after_them():
    keys = Keys("unit")
    errors = [rx.ConnectionError("refused"), rx.TimeoutError("timed out"),
              rx.ResponseError("OOM command not allowed when used memory > 'maxmemory'")]
    blob = msgpack.packb({"by": "ops", "at": 7.0, "reason": None})
    redis = ScriptedRedis(errors, {keys.cancel("r3"): blob})
    runner, ran = Runner(cancel_grace_s=0.5), []
    watcher = fast(CancelWatcher(host(redis, runner), interval_s=0.01))
    await watcher.start()
    try:
        result = await asyncio.wait_for(runner.run(slow_workflow(ran), run_id="r3"), 5)
    finally:
        await watcher.stop()
    assert result.status == RunStatus.CANCELLED and result.cancelled_by == "ops"
    assert watcher.failed is None and watcher.restarts == 0 and watcher.cancelled == 1
    assert redis.calls >= 4


async def test_the_watcher_restarts_on_bugs_and_gives_up_after_too_many():
    failures: list[BaseException] = []
    redis = ScriptedRedis([RuntimeError(f"bug {n}") for n in range(MAX_RESTARTS + 1)])
    runner = Runner(cancel_grace_s=0.5)
    watcher = fast(CancelWatcher(host(redis, runner), interval_s=0.01, on_failure=failures.append))
    run = asyncio.create_task(runner.run(slow_workflow([]), run_id="r4"))
    await watcher.start()
    try:
        await asyncio.wait_for(watcher.wait(), 10)
    finally:
        runner.cancel("r4")
        await run
    assert isinstance(watcher.failed, RuntimeError) and str(watcher.failed) == f"bug {MAX_RESTARTS}"
    assert watcher.restarts == MAX_RESTARTS and redis.calls == MAX_RESTARTS + 1
    assert failures == [watcher.failed] and not watcher.running


async def test_a_fatal_redis_reply_stops_the_watcher_at_once():
    redis = ScriptedRedis([rx.NoPermissionError("NOPERM this user has no permissions to run the 'mget' command")])
    runner = Runner(cancel_grace_s=0.5)
    watcher = fast(CancelWatcher(host(redis, runner), interval_s=0.01))
    run = asyncio.create_task(runner.run(slow_workflow([]), run_id="r5"))
    await watcher.start()
    try:
        await asyncio.wait_for(watcher.wait(), 5)
    finally:
        runner.cancel("r5")
        await run
    assert isinstance(watcher.failed, rx.NoPermissionError) and watcher.restarts == 0


def test_the_interval_must_be_positive():
    from orchestrator.errors import InvalidArgumentError

    with pytest.raises(InvalidArgumentError):
        CancelWatcher(host(ScriptedRedis(), Runner()), interval_s=0)
