"""``Runner.run(resume=...)``: going on with what an earlier execution of the run left
(completed nodes with their outputs, attempt counts of started ones)."""

from __future__ import annotations

import pytest

from orchestrator import Node, Runner, Workflow
from orchestrator.workflow.result import NodeResult, NodeStatus
from orchestrator.workflow.retry import RetryPolicy


def chain(calls: list[str], *, fail_first_attempts: int = 0) -> Workflow:
    async def charge(ctx):
        calls.append("charge")
        return {"charged": ctx.input["amount"]}

    async def ship(ctx):
        calls.append("ship")
        return {"shipped": ctx.get_result("charge")["charged"]}

    async def mail(ctx):
        calls.append(f"mail@{ctx.attempt}")
        if ctx.attempt <= fail_first_attempts:
            raise ValueError(f"attempt {ctx.attempt} fails")
        return {"mailed": ctx.get_result("ship")["shipped"], "attempt": ctx.attempt}

    return Workflow("order", [
        Node("charge", charge), Node("ship", ship, depends_on=["charge"]),
        Node("mail", mail, depends_on=["ship"], retry=RetryPolicy(max_attempts=3, initial_delay_s=0)),
    ])


def done(flow: Workflow, name: str, output, attempts: int = 1) -> NodeResult:
    node = flow.get_node(name)
    return NodeResult(node_id=node.id, name=name, status=NodeStatus.SUCCEEDED, output=output, attempts=attempts,
                      started_at=1.0, finished_at=2.0, duration_ms=1000.0)


async def test_completed_nodes_are_not_run_again_and_their_outputs_feed_their_dependents():
    calls: list[str] = []
    flow = chain(calls)
    resume = {"charge": done(flow, "charge", {"charged": 7}), "ship": done(flow, "ship", {"shipped": 7})}
    result = await Runner().run(flow, input={"amount": 99}, resume=resume)
    assert calls == ["mail@1"]
    assert result.status == "succeeded"
    assert result.output_of("mail") == {"mailed": 7, "attempt": 1}
    assert [result.nodes[n].checkpointed for n in ("charge", "ship", "mail")] == [True, True, False]
    assert result.nodes["charge"].attempts == 1 and result.nodes["charge"].duration_ms == 1000.0
    record = result.to_record()
    assert record["nodes"]["ship"]["checkpointed"] is True and record["results"][flow.get_node("ship").id] == {
        "shipped": 7}


async def test_a_restored_node_appears_in_the_timeline_before_the_nodes_that_run():
    calls: list[str] = []
    flow = chain(calls)
    result = await Runner().run(flow, input={"amount": 1}, resume={"charge": done(flow, "charge", {"charged": 1})})
    kinds = [(e["type"], e.get("node")) for e in result.timeline]
    assert kinds[:2] == [("run_start", None), ("node_restored", "charge")]
    assert ("node_start", "ship") in kinds and ("node_start", "charge") not in kinds


async def test_a_started_node_goes_on_with_its_attempt_count():
    calls: list[str] = []
    flow = chain(calls, fail_first_attempts=2)
    started = NodeResult(node_id=flow.get_node("mail").id, name="mail", status=NodeStatus.PENDING, attempts=1)
    resume = {"charge": done(flow, "charge", {"charged": 3}), "ship": done(flow, "ship", {"shipped": 3}),
              "mail": started}
    result = await Runner().run(flow, input={"amount": 3}, resume=resume)
    assert calls == ["mail@2", "mail@3"]  # attempt 1 was made by the earlier execution
    assert result.status == "succeeded" and result.nodes["mail"].attempts == 3
    assert result.attempts[flow.get_node("mail").id] == 3


async def test_a_node_whose_attempts_ran_out_in_an_earlier_execution_gets_one_more_and_no_retry():
    calls: list[str] = []
    flow = chain(calls, fail_first_attempts=9)
    resume = {"charge": done(flow, "charge", {"charged": 3}), "ship": done(flow, "ship", {"shipped": 3}),
              "mail": NodeResult(node_id=flow.get_node("mail").id, name="mail", attempts=3)}
    result = await Runner().run(flow, input={"amount": 3}, resume=resume)
    assert calls == ["mail@4"]
    assert result.status == "failed" and result.nodes["mail"].attempts == 4


async def test_resume_entries_for_nodes_the_workflow_lacks_are_ignored():
    calls: list[str] = []
    flow = chain(calls)
    stray = NodeResult(node_id="x", name="gone", status=NodeStatus.SUCCEEDED, output=1)
    result = await Runner().run(flow, input={"amount": 2}, resume={"gone": stray})
    assert calls == ["charge", "ship", "mail@1"] and "gone" not in result.nodes


async def test_every_node_restored_means_a_succeeded_run_that_runs_nothing():
    calls: list[str] = []
    flow = chain(calls)
    resume = {n: done(flow, n, {"v": n}) for n in ("charge", "ship", "mail")}
    result = await Runner().run(flow, input={"amount": 2}, resume=resume)
    assert calls == [] and result.status == "succeeded"
    assert all(node.checkpointed for node in result.nodes.values())


@pytest.mark.parametrize("status", [NodeStatus.FAILED, NodeStatus.CANCELLED, NodeStatus.RUNNING])
async def test_only_succeeded_nodes_are_restored(status):
    calls: list[str] = []
    flow = chain(calls)
    earlier = NodeResult(node_id=flow.get_node("charge").id, name="charge", status=status, attempts=1)
    result = await Runner().run(flow, input={"amount": 5}, resume={"charge": earlier})
    assert calls == ["charge", "ship", "mail@1"]
    assert result.nodes["charge"].attempts == 2 and not result.nodes["charge"].checkpointed
