"""What a handler sees through its NodeContext, and the run record it leaves behind."""

from __future__ import annotations

import asyncio
import json
import logging
import threading

import msgpack
import pytest

from orchestrator import errors
from orchestrator.workflow.artifacts import InMemoryArtifactStore
from orchestrator.workflow.context import MAX_LOG_LINES, AbortSignal
from orchestrator.workflow.model import Node, Workflow
from orchestrator.workflow.runner import Runner, WorkflowRunResult


class Services:
    def __init__(self, **attrs) -> None:
        self.__dict__.update(attrs)


async def run_one(handler, **kwargs):
    return await Runner().run(Workflow("ctx", [Node("only", handler)]), **kwargs)


async def test_context_carries_the_run_identity_input_context_and_event():
    seen = {}

    async def handler(ctx):
        seen.update(input=ctx.input, context=ctx.context, event=ctx.event, run_id=ctx.run_id,
                    workflow_id=ctx.workflow_id, node_id=ctx.node_id, node_name=ctx.node_name,
                    attempt=ctx.attempt, conversation_id=ctx.conversation_id)

    result = await run_one(handler, input={"a": 1}, context={"tenant": "t"}, event="evt", run_id="r-1")
    node = result.nodes["only"]
    assert seen == {"input": {"a": 1}, "context": {"tenant": "t"}, "event": "evt", "run_id": "r-1",
                    "workflow_id": result.workflow_id, "node_id": node.node_id, "node_name": "only",
                    "attempt": 1, "conversation_id": None}


async def test_get_result_accepts_a_node_id_or_name_and_rejects_unknown_nodes():
    a = Node("a", lambda ctx: {"v": 1})

    def b(ctx):
        assert ctx.get_result(a.id) == ctx.get_result("a") == {"v": 1}
        assert ctx.has_result("a") and not ctx.has_result("ghost")
        with pytest.raises(errors.NotFoundError, match="ghost"):
            ctx.get_result("ghost")
        return ctx.results[a.id]["v"] + 1

    result = await Runner().run(Workflow("r", [a, Node("b", b, ["a"])]))
    assert result.output_of("b") == 2


async def test_memory_is_merged_and_replaced_and_the_callers_dict_is_left_alone():
    initial = {"count": 1, "nested": {"x": 1}}

    def first(ctx):
        ctx.memory["nested"]["x"] = 99
        ctx.update_memory({"count": ctx.memory["count"] + 1, "first": True})

    def second(ctx):
        assert ctx.memory == {"count": 2, "nested": {"x": 99}, "first": True}
        ctx.set_memory({"only": "this"})

    result = await Runner().run(Workflow("m", [Node("first", first), Node("second", second, ["first"])]),
                                memory=initial)
    assert result.memory == {"only": "this"}
    assert initial == {"count": 1, "nested": {"x": 1}}


async def test_update_memory_rejects_non_dicts():
    def handler(ctx):
        with pytest.raises(errors.InvalidArgumentError, match="dict"):
            ctx.update_memory(["x"])
        with pytest.raises(errors.InvalidArgumentError, match="dict"):
            ctx.set_memory("x")

    assert (await run_one(handler)).status == "succeeded"


async def test_chatflow_context_has_the_conversation_id():
    flow = Workflow("chat", [Node("a", lambda ctx: ctx.conversation_id)], type="chatflow")
    result = await Runner().run(flow, conversation_id="conv-9")
    assert result.output_of("a") == "conv-9" and result.conversation_id == "conv-9"


async def test_artifacts_default_to_an_in_memory_store_and_are_listed_in_the_result():
    def producer(ctx):
        ctx.artifacts.store("report.txt", b"hello")

    def consumer(ctx):
        assert ctx.artifacts.list() == ["report.txt"]
        return ctx.artifacts.load("report.txt").decode()

    result = await Runner().run(Workflow("a", [Node("p", producer), Node("c", consumer, ["p"])]))
    assert result.output_of("c") == "hello"
    assert result.artifacts == [{"name": "report.txt", "node": "p", "size": 5, "location": "memory://report.txt"}]


async def test_services_artifacts_replace_the_default_store():
    store = InMemoryArtifactStore()
    runner = Runner(services=Services(artifacts=store))
    await runner.run(Workflow("a", [Node("p", lambda ctx: ctx.artifacts.store("x.bin", b"\x00"))]))
    assert store.load("x.bin") == b"\x00"


async def test_a_text_artifact_is_stored_as_utf8_and_listed_with_its_byte_size():
    result = await Runner().run(Workflow("a", [Node("p", lambda ctx: ctx.artifacts.store("note.txt", "héllo"))]))
    assert result.artifacts == [{"name": "note.txt", "node": "p", "size": 6, "location": "memory://note.txt"}]


async def test_logger_lines_are_kept_in_the_result_and_capped(caplog):
    def chatty(ctx):
        ctx.logger.info("processing %s", "order-1")
        ctx.logger.debug("debug lines are kept only when the logger is enabled for them")
        for i in range(MAX_LOG_LINES + 10):
            ctx.logger.warning("line %d", i)

    with caplog.at_level(logging.INFO, logger="tokiwa.workflow"):
        result = await run_one(chatty)
    assert len(result.logs) == MAX_LOG_LINES
    first = result.logs[0]
    assert first["node"] == "only" and first["level"] == "INFO" and first["message"] == "processing order-1"
    assert result.logs[1]["message"] == "line 0"  # the DEBUG line was below the logger's level
    assert "[only] processing order-1" in caplog.text


async def test_publish_topic_without_a_relay_is_a_state_error():
    def handler(ctx):
        with pytest.raises(errors.StateError, match="relay/Redis connection"):
            ctx.publish_topic("t", "m")

    assert (await run_one(handler)).status == "succeeded"


async def test_publish_topic_goes_through_services_from_async_and_sync_handlers():
    published = []

    async def publish(topic, message):
        published.append((topic, message))
        return len(published)

    async def from_async(ctx):
        return await ctx.publish_topic("async", "a")

    def from_sync(ctx):
        return ctx.publish_topic("sync", "s")

    runner = Runner(services=Services(publish_topic=publish))
    result = await runner.run(Workflow("p", [Node("a", from_async), Node("s", from_sync, ["a"])]))
    assert published == [("async", "a"), ("sync", "s")]
    assert result.output_of("s") == 2


async def test_services_clock_stamps_the_timeline():
    ticks = iter(range(100, 200))
    result = await run_one(lambda ctx: 1, services=Services(clock=lambda: float(next(ticks))))
    assert result.started_at == 100.0
    assert [e["timestamp"] for e in result.timeline] == sorted(e["timestamp"] for e in result.timeline)
    assert result.finished_at == result.timeline[-1]["timestamp"]


async def test_abort_signal_wakes_async_waiters_and_sync_waiters():
    signal = AbortSignal()
    waiter = asyncio.create_task(signal.wait_async())
    thread_saw = threading.Event()
    thread = threading.Thread(target=lambda: signal.wait(5) and thread_saw.set())
    thread.start()
    await asyncio.sleep(0)
    signal.set(errors.WorkflowAborted("stop"))
    signal.set(errors.WorkflowAborted("second reason is ignored"))
    await asyncio.wait_for(waiter, 1)
    await asyncio.to_thread(thread.join, 5)
    assert thread_saw.is_set() and str(signal.reason) == "stop"
    with pytest.raises(errors.WorkflowAborted, match="stop"):
        signal.raise_if_aborted()
    await asyncio.wait_for(signal, 1)  # already set: returns at once


async def test_the_record_is_json_and_msgpack_safe_and_round_trips():
    class Opaque:
        def __repr__(self) -> str:
            return "<Opaque>"

    flow = Workflow("rec", [Node("obj", lambda ctx: {"value": Opaque(), "n": float("nan")}),
                            Node("bad", lambda ctx: 1 / 0, ["obj"])])
    result = await Runner().run(flow, input={"k": 1}, fail_fast=False)
    record = result.to_record()
    assert json.loads(json.dumps(record)) == record
    assert msgpack.unpackb(msgpack.packb(record)) == record
    assert record["nodes"]["obj"]["output"] == {"value": "<Opaque>", "n": "nan"}
    assert record["nodes"]["bad"]["error"]["name"] == "ZeroDivisionError"
    again = WorkflowRunResult.from_record(record)
    assert again.to_record() == record
    assert again.nodes["bad"].status == "failed" and again.status == "failed"
