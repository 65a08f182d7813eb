"""Live run records on a real Redis: a run is recorded ``running`` when it starts and its
nodes' states as they change (coalesced, never blocking the run), the final record replaces
it; a timeout records ``timed_out`` and a cancelled caller ``cancelled``; a failed node's
traceback reaches the record, ``inspect runs show`` and the HTTP API; a record claimed by
another execution stops the progress writes; a failing store never fails a run."""

from __future__ import annotations

import asyncio
import logging
import time

import aiohttp
import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from orchestrator import errors, faults
from orchestrator.app import Orchestrator
from orchestrator.cli.inspect import _render_run, _render_runs
from orchestrator.events import Event
from orchestrator.ops.http_api import ApiServer
from orchestrator.ops.inspector import Inspector
from orchestrator.ops.snapshot import RUN_COUNTER_KEYS
from orchestrator.runs.recorder import LiveRuns
from orchestrator.workflow.model import Node, Workflow
from orchestrator.workflow.result import WorkflowRunResult
from orchestrator.workflow.runner import Runner

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def app(redis_url, namespace):
    application = Orchestrator(redis_url, namespace=namespace, runner=Runner(cancel_grace_s=0.3))
    await application.connect()
    yield application
    await application.close()


class Gate:
    """A workflow ``first -> wait (until opened) -> last``."""

    def __init__(self, name: str = "gated") -> None:
        self.open = asyncio.Event()
        self.waiting = asyncio.Event()

        async def wait(ctx):
            self.waiting.set()
            await self.open.wait()
            return "opened"

        self.workflow = Workflow(name, [Node("first", lambda ctx: 1, inline=True), Node("wait", wait, ["first"]),
                                        Node("last", lambda ctx: 2, ["wait"], inline=True)])


def count_live_writes(app) -> list[int]:
    """Wrap the store's save_live: returns a list that grows by one per record written."""
    store, writes = app.run_store, []
    original = store.save_live

    async def save_live(items):
        written = await original(items)
        writes.extend(1 for ok in written if ok)
        return written

    store.save_live = save_live
    return writes


async def wait_for(predicate, timeout: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = await predicate()
        if value:
            return value
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


async def test_a_run_is_recorded_running_while_it_runs(app):
    gate = Gate()
    app.register_workflow(gate.workflow)
    t0 = time.monotonic()
    task = asyncio.ensure_future(app.run_workflow("gated"))
    await gate.waiting.wait()

    async def running():
        rows = await app.run_store.list(status="running")
        return rows if rows and rows[0]["nodes"]["wait"]["status"] == "running" else None

    (live,) = await wait_for(running, what="the running record")
    seen_after = time.monotonic() - t0
    assert live["nodes"]["first"]["status"] == "succeeded" and live["nodes"]["first"]["attempts"] == 1
    assert live["nodes"]["last"]["status"] == "pending"
    assert live["worker_id"] == app.worker_id and live["owner_token"] and live["updated_at"] > 0
    assert live["results"] == {} and live["nodes"]["first"]["output"] is None  # progress records are light
    # what the inspect CLI and the HTTP API show while it runs
    rows = await Inspector.from_app(app).runs(status="running")
    assert [r["run_id"] for r in rows] == [live["run_id"]] and rows[0]["task_summary"]["wait"]["state"] == "running"
    assert "running" in _render_runs(rows) and "wait=running" in _render_runs(rows)
    server = ApiServer(app, port=0)
    await server.start()
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
            async with http.get(f"{server.url}/runs?status=running") as response:
                assert response.status == 200
                assert [r["run_id"] for r in await response.json()] == [live["run_id"]]
    finally:
        await server.stop()
    assert app.workflows.run_counters()["running"] == 1
    gate.open.set()
    result = await task
    final = await app.run_store.get(result.run_id)
    assert final["status"] == "succeeded" and final["owner_token"] == live["owner_token"]
    assert final["results"] and final["worker_id"] == app.worker_id and final["updated_at"] >= live["updated_at"]
    assert await app.run_store.list(status="running") == []
    counters = app.workflows.run_counters()
    assert set(RUN_COUNTER_KEYS) <= set(counters)
    assert counters["started"] == 1 and counters["succeeded"] == 1 and counters["running"] == 0
    print(f"running record visible {seen_after * 1000:.0f} ms after the call")


async def test_progress_writes_are_coalesced_for_a_ten_node_workflow(app):
    async def step(ctx):
        await asyncio.sleep(0.05)

    nodes = [Node("n0", step)]
    for i in range(1, 10):
        nodes.append(Node(f"n{i}", step, [f"n{i - 1}"]))
    app.register_workflow(Workflow("ten", nodes))
    writes = count_live_writes(app)
    t0 = time.monotonic()
    result = await app.run_workflow("ten")
    took = time.monotonic() - t0
    assert result.status == "succeeded"
    # the claim at the start, then at most one write per 0.25 s (a 0.5 s run: at most 3 more)
    bound = 1 + int(took / 0.25) + 1
    assert 1 <= len(writes) <= bound, (len(writes), took)
    fast = count_live_writes(app)
    app.register_workflow(Workflow("ten-fast", [Node(f"f{i}", lambda ctx, i=i: i, inline=True) for i in range(10)]))
    assert (await app.run_workflow("ten-fast")).status == "succeeded"
    assert len(fast) <= 1  # a run faster than a write: at most its claim, then the final record
    print(f"10-node chain of {took:.2f}s: {len(writes)} live writes + 1 final; 10 instant nodes: {len(fast)} + 1")


async def test_a_timeout_records_timed_out_and_a_cancelled_caller_cancelled(app):
    async def slow(ctx):
        await asyncio.sleep(30)

    app.register_workflow(Workflow("too-slow", [Node("slow", slow)]), timeout=0.3)
    with pytest.raises(errors.TimeoutError):
        await app.run_workflow("too-slow")
    (timed,) = await app.run_store.list(workflow="too-slow")
    assert timed["status"] == "timed_out" and timed["error"]["name"] == "TimeoutError"
    assert timed["nodes"]["slow"]["status"] == "cancelled"
    gate = Gate("stopped")
    app.register_workflow(gate.workflow)
    task = asyncio.ensure_future(app.run_workflow("stopped"))
    await gate.waiting.wait()
    task.cancel()  # what a worker shutting down does to its runs
    with pytest.raises(asyncio.CancelledError):
        await task

    async def cancelled():
        rows = await app.run_store.list(workflow="stopped")
        return rows if rows and rows[0]["status"] == "cancelled" else None

    (rec,) = await wait_for(cancelled, what="the cancelled record")
    assert rec["nodes"]["wait"]["status"] == "cancelled" and "run interrupted" in rec["error"]["message"]
    counters = app.workflows.run_counters()
    assert counters["timed_out"] == 1 and counters["cancelled"] == 1 and counters["running"] == 0


async def test_a_failed_node_traceback_reaches_the_record_the_cli_and_the_logs(app):
    def charge(ctx):
        raise ValueError("card declined")

    app.register_workflow(Workflow("pay", [Node("charge", charge)]))
    result = await app.run_workflow("pay")
    assert result.status == "failed"
    shown = await Inspector.from_app(app).run(result.run_id)
    tb = shown["nodes"]["charge"]["traceback"]
    assert "ValueError: card declined" in tb and "in charge" in tb
    text = _render_run(shown)
    assert "traceback of node charge:" in text and "  ValueError: card declined" in text
    assert any("ERROR [charge] node failed after 1 attempt(s): ValueError: card declined" in line
               for line in shown["logs"])
    assert app.workflows.run_counters()["node_errors"] == 1


async def test_progress_writes_stop_when_another_execution_owns_the_record(app):
    result = WorkflowRunResult("r-claimed", "w", "claimed", started_at=time.time())
    event = Event("job", {})
    event.stream_id = "1-0"
    owned_calls = []

    async def owned(events):
        owned_calls.append(events)
        return set()  # the entry is not ours any more

    live_runs = LiveRuns(app, owned, lambda run_id: result, interval_s=0.01)
    run = live_runs.begin("r-claimed", event)
    run.on_run_start(None, "r-claimed")
    await wait_for(lambda: _true(run.claimed), what="the claim")
    theirs = {**(await app.run_store.get("r-claimed")), "owner_token": "another-worker"}
    await app.run_store.save(theirs)
    run.on_node_start(None, None)
    await wait_for(lambda: _true(run.stopped), what="the writes to stop")
    assert live_runs.refused == 1 and len(owned_calls) == 1
    assert (await app.run_store.get("r-claimed"))["owner_token"] == "another-worker"
    run.on_node_complete(None, None, None)  # no more writes
    await asyncio.sleep(0.05)
    assert live_runs.writes == 1 and live_runs.live == 0


async def test_a_failing_store_never_fails_the_run_and_is_logged_once(app, caplog):
    faults.reset_conditions()
    calls = []

    async def broken(items):
        calls.append(len(items))
        raise RedisConnectionError("connection refused")

    app.run_store.save_live = broken
    gate = Gate("unlucky")
    app.register_workflow(gate.workflow)
    with caplog.at_level(logging.WARNING, logger="tokiwa.faults"):
        task = asyncio.ensure_future(app.run_workflow("unlucky"))
        await gate.waiting.wait()
        await asyncio.sleep(0.8)  # several failed writes, backed off
        gate.open.set()
        result = await task
    assert result.status == "succeeded" and (await app.run_store.get(result.run_id))["status"] == "succeeded"
    assert len(calls) >= 2
    assert len([r for r in caplog.records if "redis unreachable (connection" in r.getMessage()]) == 1
    assert app.workflows.run_counters()["record_write_errors"] == len(calls)
    faults.reset_conditions()


async def _true(value: bool) -> bool:
    return value
