"""Run statuses beyond success and failure: a workflow timeout ends ``timed_out`` (a failure),
a run whose caller is cancelled settles ``cancelled`` for its hooks; failed nodes keep a
bounded traceback and log their errors; the worker's run lines; webhook events of the new
statuses; the live-write rule of run stores and the staleness rule."""

from __future__ import annotations

import asyncio
import io
import time

import pytest

from orchestrator import errors
from orchestrator.ops.runlines import RunLines, install, run_line
from orchestrator.ops.webhooks import WebhookNotifier, WebhookSettings, build_body
from orchestrator.runs.stores import InMemoryRunStore, is_stale, live_write_allowed
from orchestrator.workflow.model import Node, Workflow
from orchestrator.workflow.result import (
    FAILURE_STATUSES,
    FINISHED_STATUSES,
    MAX_TRACEBACK_CHARS,
    RunStatus,
    WorkflowRunResult,
    format_traceback,
)
from orchestrator.workflow.retry import RetryPolicy
from orchestrator.workflow.runner import Runner


class Seen:
    def __init__(self) -> None:
        self.completed: list[WorkflowRunResult] = []

    def on_run_complete(self, result):
        self.completed.append(result)


def test_timed_out_is_a_finished_failure():
    assert RunStatus.TIMED_OUT == "timed_out"
    assert RunStatus.TIMED_OUT in FAILURE_STATUSES and RunStatus.FAILED in FAILURE_STATUSES
    assert FINISHED_STATUSES == {"succeeded", "failed", "timed_out", "cancelled"}
    assert WorkflowRunResult("r", "w", "n", status=RunStatus.TIMED_OUT).failed
    assert not WorkflowRunResult("r", "w", "n", status=RunStatus.CANCELLED).failed


async def test_a_workflow_timeout_settles_timed_out_and_tells_the_hooks():
    async def slow(ctx):
        await asyncio.sleep(10)

    seen = Seen()
    with pytest.raises(errors.TimeoutError) as err:
        await Runner(hooks=seen).run(Workflow("t", [Node("slow", slow)]), timeout=0.05)
    assert err.value.result.status == "timed_out"
    assert [r.status for r in seen.completed] == ["timed_out"]
    assert WorkflowRunResult.from_record(err.value.result.to_record()).status is RunStatus.TIMED_OUT


async def test_a_cancelled_caller_settles_the_run_cancelled_for_its_hooks():
    started = asyncio.Event()

    async def slow(ctx):
        started.set()
        await asyncio.sleep(10)

    seen = Seen()
    runner = Runner(hooks=seen, cancel_grace_s=0.2)
    task = asyncio.ensure_future(runner.run(Workflow("c", [Node("slow", slow), Node("next", slow, ["slow"])]),
                                            run_id="run-c"))
    await started.wait()
    assert runner.result_of("run-c") is not None and runner.result_of("run-c").nodes["slow"].status == "running"
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    (result,) = seen.completed
    assert result.status == "cancelled" and "run interrupted" in result.error["message"]
    assert {n: r.status for n, r in result.nodes.items()} == {"slow": "cancelled", "next": "cancelled"}
    assert runner.result_of("run-c") is None


def boom(ctx):
    raise ValueError("card declined")


async def test_a_failed_node_keeps_its_traceback_and_logs_its_errors():
    flow = Workflow("f", [Node("charge", boom, retry=RetryPolicy(max_attempts=2, initial_delay_s=0.0))])
    result = await Runner().run(flow)
    node = result.nodes["charge"]
    assert result.status == "failed" and node.traceback is not None
    assert "ValueError: card declined" in node.traceback and "in boom" in node.traceback
    assert "RetryExhausted" in node.traceback  # the final error, with the last attempt's as its cause
    assert result.to_record()["nodes"]["charge"]["traceback"] == node.traceback
    assert result.progress_record()["nodes"]["charge"]["traceback"] == node.traceback
    levels = [(x["level"], x["node"]) for x in result.logs]
    assert levels == [("WARNING", "charge"), ("ERROR", "charge")]
    assert "attempt 1 failed: ValueError: card declined" in result.logs[0]["message"]
    assert "failed after 2 attempt(s)" in result.logs[1]["message"]


def test_tracebacks_are_bounded_and_keep_their_end():
    try:
        raise RuntimeError("the bottom " + "x" * (2 * MAX_TRACEBACK_CHARS))
    except RuntimeError as exc:
        text = format_traceback(exc)
        short = format_traceback(exc, limit=300)
    assert len(text) <= MAX_TRACEBACK_CHARS and len(short) <= 300
    for t in (text, short):
        assert t.startswith("Traceback") and t.endswith("x" * 50) and "characters cut ...]" in t


def test_progress_records_leave_outputs_out():
    result = WorkflowRunResult("r", "w", "n", results={"id": [1] * 1000}, memory={"a": 1})
    record = result.progress_record()
    assert record["results"] == {} and record["memory"] is None and record["status"] == "running"
    assert set(record) == set(result.to_record())


async def test_run_lines_cute_and_plain():
    flow = Workflow("lines", [Node("a", lambda ctx: 1), Node("b", boom, ["a"])])
    out = io.StringIO()
    runner = Runner()
    install(runner, cute=True, stream=out)
    install(runner, cute=False, stream=out)
    result = await runner.run(flow, run_id="r1")
    cute, plain = out.getvalue().splitlines()
    assert cute.startswith("💥 failed flow=lines run_id=r1 (") and cute.endswith("node=b card declined")
    assert plain.startswith("ERROR tokiwa run flow=lines run_id=r1 status=failed dur_ms=")
    result.status = RunStatus.SUCCEEDED
    assert run_line(result, cute=True).endswith("nodes=1/2")
    result.status, result.error = RunStatus.TIMED_OUT, {"message": "workflow 'lines' exceeded\nits timeout"}
    assert run_line(result, cute=False).endswith(
        f"status=timed_out dur_ms={result.duration_ms:.2f} workflow 'lines' exceeded its timeout")
    assert run_line(result, cute=True).startswith("⏰ timed out flow=lines")


def test_run_lines_follow_the_tracers_choice(monkeypatch):
    monkeypatch.setenv("TOKIWA_CUTE", "off")
    assert RunLines().cute is False
    monkeypatch.setenv("TOKIWA_CUTE", "1")
    assert RunLines().cute is True


async def test_webhooks_for_timed_out_and_cancelled_runs():
    timed = WorkflowRunResult("r", "w", "n", status=RunStatus.TIMED_OUT)
    assert build_body(timed)["event"] == "run.timed_out"
    assert build_body(WorkflowRunResult("r", "w", "n", status=RunStatus.CANCELLED))["event"] == "run.cancelled"
    assert build_body(WorkflowRunResult("r", "w", "n", status=RunStatus.RUNNING)) is None
    sent: list[dict] = []
    for events, expected in [("run.failed", ["run.timed_out"]), ("run.timed_out", ["run.timed_out"]),
                             ("run.completed", [])]:
        sent.clear()
        notifier = WebhookNotifier(WebhookSettings(url="http://127.0.0.1:9/x", events=events))
        notifier.submit = sent.append  # type: ignore[method-assign]
        notifier.on_run_complete(timed)
        assert [b["event"] for b in sent] == expected


def test_the_live_write_rule():
    mine = {"run_id": "r", "owner_token": "a", "status": "running"}
    theirs = {"run_id": "r", "owner_token": "b", "status": "running"}
    done = {"run_id": "r", "owner_token": "a", "status": "succeeded"}
    assert live_write_allowed(None, mine, claim=True) and live_write_allowed(theirs, mine, claim=True)
    assert live_write_allowed({**done, "owner_token": "b"}, mine, claim=True)  # a redelivery reruns it
    assert not live_write_allowed(done, mine, claim=True)  # our own final record is in
    assert live_write_allowed(mine, mine, claim=False)
    assert not live_write_allowed(theirs, mine, claim=False) and not live_write_allowed(None, mine, claim=False)
    assert not live_write_allowed(done, mine, claim=False)


async def test_memory_store_live_writes():
    store = InMemoryRunStore()
    rec = {"run_id": "r", "started_at": 1.0, "owner_token": "a", "status": "running"}
    assert await store.save_live([(rec, True), ({**rec, "owner_token": "b"}, False)]) == [True, False]
    assert (await store.list(status="running"))[0]["owner_token"] == "a"


def test_stale_running_records():
    now = time.time()
    rec = {"status": "running", "updated_at": now - 200, "worker_id": "w1", "started_at": now - 300}
    assert is_stale(rec, now) and is_stale(rec, now, live_workers=["w2"])
    assert not is_stale(rec, now, live_workers=["w1"])
    assert not is_stale({**rec, "updated_at": now - 5}, now)
    assert not is_stale({**rec, "status": "succeeded"}, now)
    assert is_stale({"status": "running", "started_at": now - 200}, now)  # an older record: no updated_at
