"""The level-by-level execution plan (the workflow port plan's executor) and the run defaults a
workflow carries: max_parallel, timeout_s, fail_fast."""

from __future__ import annotations

import asyncio

import pytest

from orchestrator import Node, Runner, Workflow
from orchestrator.errors import InvalidArgumentError
from orchestrator.errors import TimeoutError as TokiwaTimeout
from orchestrator.workflow.model import DEFAULT_CONCURRENCY, ExecutionPlan


async def noop(ctx):
    return None


def diamond(**options) -> Workflow:
    """a -> (b, c, d) -> e, plus f on its own."""
    return Workflow("diamond", [
        Node("a", noop), Node("b", noop, depends_on=["a"]), Node("c", noop, depends_on=["a"]),
        Node("d", noop, depends_on=["a"]), Node("e", noop, depends_on=["b", "c", "d"]), Node("f", noop),
    ], **options)


def names(rows) -> list[list[str]]:
    return [[n.name for n in row] for row in rows]


def test_the_plan_is_the_levels_with_the_workflow_max_parallel_and_timeout():
    plan = diamond(max_parallel=2, timeout_s=30).get_execution_plan()
    assert isinstance(plan, ExecutionPlan)
    assert names(plan) == [["a", "f"], ["b", "c", "d"], ["e"]]
    assert plan.max_parallel == 2 and plan.timeout_s == 30.0


def test_batches_cut_each_level_into_runs_of_at_most_max_parallel_nodes():
    plan = diamond(max_parallel=2).get_execution_plan()
    assert names(plan.batches) == [["a", "f"], ["b", "c"], ["d"], ["e"]]
    assert names(diamond().get_execution_plan(max_parallel=1).batches) == [["a"], ["f"], ["b"], ["c"], ["d"], ["e"]]


def test_without_max_parallel_the_plan_uses_the_type_default():
    assert diamond().get_execution_plan().max_parallel == DEFAULT_CONCURRENCY["workflow"] == 4
    chat = Workflow("chat", [Node("only", noop)], type="chatflow")
    assert chat.get_execution_plan().max_parallel == 1
    assert diamond().get_execution_plan().timeout_s is None


def test_the_plan_as_plain_data_names_the_nodes():
    assert diamond(max_parallel=3, timeout_s=5).get_execution_plan().to_dict() == {
        "max_parallel": 3, "timeout_s": 5.0,
        "levels": [["a", "f"], ["b", "c", "d"], ["e"]],
        "batches": [["a", "f"], ["b", "c", "d"], ["e"]]}


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_max_parallel_must_be_a_positive_integer(bad):
    with pytest.raises(InvalidArgumentError, match="max_parallel must be an integer >= 1"):
        Workflow("w", [Node("a", noop)], max_parallel=bad)
    with pytest.raises(InvalidArgumentError, match="max_parallel must be an integer >= 1"):
        Workflow("w", [Node("a", noop)]).get_execution_plan(max_parallel=bad)


@pytest.mark.parametrize("bad", [0, -2, True, "1"])
def test_timeout_s_must_be_a_positive_number(bad):
    with pytest.raises(InvalidArgumentError, match="timeout_s must be a positive number of seconds"):
        Workflow("w", [Node("a", noop)], timeout_s=bad)


def test_fail_fast_and_checkpoint_must_be_booleans():
    with pytest.raises(InvalidArgumentError, match="fail_fast must be True or False"):
        Workflow("w", fail_fast="no")
    with pytest.raises(InvalidArgumentError, match="checkpoint must be True or False"):
        Workflow("w", checkpoint=0)


async def test_the_runner_starts_at_most_the_workflow_max_parallel_nodes_at_once():
    running, peak = 0, 0

    async def tracked(ctx):
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.02)
        running -= 1

    wide = Workflow("wide", [Node(f"n{i}", tracked) for i in range(6)], max_parallel=2)
    result = await Runner().run(wide)
    assert result.status == "succeeded" and peak == 2
    peak = 0
    await Runner().run(wide, concurrency=3)  # the run's own setting wins
    assert peak == 3


async def test_the_runner_applies_the_workflow_timeout_s():
    async def slow(ctx):
        await asyncio.sleep(5)

    with pytest.raises(TokiwaTimeout) as info:
        await Runner().run(Workflow("slow", [Node("s", slow)], timeout_s=0.1))
    assert info.value.result.status == "timed_out"


async def test_the_runner_applies_the_workflow_fail_fast():
    async def boom(ctx):
        raise ValueError("no")

    async def later(ctx):
        await asyncio.sleep(0.05)
        return "ran"

    flow = Workflow("ff", [Node("boom", boom), Node("later", later)], fail_fast=False)
    result = await Runner().run(flow)
    assert result.nodes["later"].output == "ran"
    result = await Runner().run(flow, fail_fast=True)
    assert result.nodes["later"].status == "cancelled"
