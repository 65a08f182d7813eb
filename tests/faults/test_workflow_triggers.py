"""Event-triggered workflows and remote run_workflow across real worker processes."""

from __future__ import annotations

import asyncio
import re

import pytest

from orchestrator import Node, Orchestrator, Workflow
from orchestrator.runs.registry import RunTimeoutError
from tests.integration.procs import start_worker, stop, wait_until, worker_env

APP = "tests.integration.apps.flows:app"


async def test_event_triggered_workflow_runs_in_process_with_mapped_input(redis_url, namespace):
    app = Orchestrator(redis_url, namespace=namespace)
    seen = []

    async def step(ctx):
        seen.append((ctx.input, ctx.context, ctx.event.type))
        return "ok"

    wf = app.register_workflow(Workflow(name="w", nodes=[Node(name="s", handler=step)]), trigger={
        "type": "event", "event_type": "a.b", "map_input": lambda e: e.payload["x"],
        "map_context": lambda e: {"c": 1}})
    await app.publish("a.b", {"x": 5})
    await app.publish("a.c", {"x": 6})
    await app.drain(timeout=10)
    runs = await app.run_store.list(workflow=wf.id)
    await app.close()
    assert seen == [(5, {"c": 1}, "a.b")]
    assert len(runs) == 1 and runs[0]["status"] == "succeeded"


async def test_regex_list_and_wildcard_triggers_match_as_documented(redis_url, namespace):
    app = Orchestrator(redis_url, namespace=namespace)
    hits: dict[str, list[str]] = {"regex": [], "list": [], "wild": []}

    def make(kind):
        async def h(ctx):
            hits[kind].append(ctx.event.type)
        return h

    app.register_workflow(Workflow(name="r", nodes=[Node(name="n", handler=make("regex"))]),
                          trigger={"type": "event", "event_type": re.compile(r"^inv\.")})
    app.register_workflow(Workflow(name="l", nodes=[Node(name="n", handler=make("list"))]),
                          trigger={"type": "event", "event_type": ["u.a", "u.b"]})
    app.register_workflow(Workflow(name="w", nodes=[Node(name="n", handler=make("wild"))]),
                          trigger={"type": "event", "event_type": "*", "filter": lambda e: e.payload == 1})
    for etype in ("inv.x", "u.a", "u.b", "u.c", "xinv.y"):
        await app.publish(etype, 1)
    await app.publish("inv.z", 2)
    await app.drain(timeout=10)
    await app.close()
    assert sorted(hits["regex"]) == ["inv.x", "inv.z"]
    assert sorted(hits["list"]) == ["u.a", "u.b"]
    assert sorted(hits["wild"]) == ["inv.x", "u.a", "u.b", "u.c", "xinv.y"]


async def test_failed_triggered_run_fails_the_event_and_calls_no_hook(redis_url, namespace):
    errors = []
    app = Orchestrator(redis_url, namespace=namespace, on_workflow_error=lambda e, info: errors.append(e))

    def boom(ctx):
        raise ValueError("nope")

    app.register_workflow(Workflow(name="b", nodes=[Node(name="n", handler=boom)]),
                          trigger={"type": "event", "event_type": "x"})
    await app.publish("x", None)
    await app.drain(timeout=10)
    snap = await app.snapshot()
    runs = await app.run_store.list(status="failed")
    await app.close()
    assert snap["failed"] == 1 and len(runs) == 1 and errors == []


async def test_chatflow_without_conversation_id_calls_on_workflow_error(redis_url, namespace):
    errors = []
    app = Orchestrator(redis_url, namespace=namespace, on_workflow_error=lambda e, info: errors.append(info))
    app.register_workflow(Workflow(name="chat", type="chatflow", nodes=[Node(name="n", handler=lambda c: 1)]),
                          trigger={"type": "event", "event_type": "msg"})
    await app.publish("msg", {"text": "hi"})
    await app.drain(timeout=10)
    await app.close()
    assert len(errors) == 1 and errors[0]["event"].type == "msg"


async def test_run_workflow_locally_when_not_consuming(redis_url, namespace):
    app = Orchestrator(redis_url, namespace=namespace)
    app.register_workflow(Workflow(name="add", nodes=[Node(name="sum", handler=lambda c: c.input["a"] + 1)]))
    result = await app.run_workflow("add", input={"a": 41})
    await app.close()
    assert result.status == "succeeded" and result.output_of("sum") == 42


def test_event_triggered_workflow_across_two_worker_processes_and_remote_run(
        redis_url, namespace, sync_redis, subprocess_env, tmp_path):
    env = worker_env(subprocess_env, redis_url, namespace, concurrency=8)
    workers = [start_worker(env, tmp_path / f"w{i}.log", app=APP) for i in range(2)]

    async def produce() -> tuple:
        from tests.integration.apps import flows

        producer = flows.app
        producer.mode = "producer"
        producer.configure(redis_url=redis_url, namespace=namespace)
        for i in range(40):
            await producer.publish("order.created", {"order": {"ref": f"A-{i}", "qty": i + 1}})
        for etype in ("inventory.low", "user.joined", "user.left", "user.renamed"):
            await producer.publish(etype, {})
        result = await producer.run_workflow("add", input={"a": 2, "b": 3}, timeout=30)
        queued = await producer.run_workflow("add", input={"a": 1, "b": 1}, wait=False)
        failed = await producer.run_workflow("add", input={"a": "x", "b": 1}, timeout=30)
        await producer.close()
        return result, queued, failed

    try:
        wait_until(lambda: sync_redis.hlen(f"{namespace}:workers") == 2, 30, message="both workers up")
        result, queued, failed = asyncio.run(produce())
        wait_until(lambda: sync_redis.hlen(f"{namespace}:test:orders") == 40, 30, message="40 orders")
        wait_until(lambda: sync_redis.llen(f"{namespace}:test:audit") == 3, 10, message="3 audits")
    finally:
        for w in workers:
            stop(w)
    orders = {k.decode(): v.decode() for k, v in sync_redis.hgetall(f"{namespace}:test:orders").items()}
    assert orders["A-3"].startswith("40:")  # qty 4 * 10
    assert len({v.split(":")[1] for v in orders.values()}) == 2  # both workers ran some
    assert sorted(x.decode() for x in sync_redis.lrange(f"{namespace}:test:audit", 0, -1)) == [
        "inventory.low", "user.joined", "user.left"]
    assert result.status == "succeeded" and result.output_of("sum") == 5
    assert isinstance(queued, str)
    assert failed.status == "failed" and "TypeError" in str(failed.nodes["sum"].error)


async def test_remote_run_of_a_chatflow_without_conversation_is_refused_before_sending(redis_url, namespace):
    from orchestrator import InvalidArgumentError

    app = Orchestrator(redis_url, namespace=namespace, mode="producer")
    app.register_workflow(Workflow(name="chat", type="chatflow", nodes=[Node(name="n", handler=lambda c: 1)]))
    with pytest.raises(InvalidArgumentError, match="conversation"):
        await app.run_workflow("chat", input={})
    await app.close()


async def test_a_request_no_live_worker_can_run_waits_for_one_instead_of_being_swallowed(redis_url, namespace,
                                                                                       sync_redis):
    producer = Orchestrator(redis_url, namespace=namespace, mode="producer")
    producer.register_workflow(Workflow(name="only-here", nodes=[Node(name="n", handler=lambda c: 1)]))
    worker = Orchestrator(redis_url, namespace=namespace, mode="worker")  # does not know the workflow
    await worker.start()
    with pytest.raises(RunTimeoutError) as waited:
        await producer.run_workflow("only-here", timeout=1)
    await worker.stop()
    await worker.close()
    group = sync_redis.xinfo_groups(f"{{{namespace}:0}}:events")[0]
    assert (group["name"], group["lag"], group["pending"]) == (b"workers:wf:only-here", 1, 0)  # it waits
    able = Orchestrator(redis_url, namespace=namespace, mode="worker")
    able.register_workflow(Workflow(name="only-here", nodes=[Node(name="n", handler=lambda c: 1)]))
    await able.drain(timeout=10)
    record = await able.run_store.get(waited.value.run_id)
    await able.close()
    await producer.close()
    assert record is not None and record["status"] == "succeeded"


async def test_a_chatflow_fenced_out_is_redelivered_even_with_ack_policy_always(redis_url, namespace):
    from orchestrator.keys import Keys

    app = Orchestrator(redis_url, namespace=namespace, ack_policy="always", visibility_timeout_ms=300,
                       renew_interval_ms=100)
    runs = []

    async def turn(ctx):
        runs.append(ctx.event.deliveries)
        if ctx.event.deliveries == 1:  # another holder took the lock meanwhile (epoch moved on)
            await app.redis.incr(Keys(namespace).conversation_lock_epoch("c1"))
        ctx.update_memory({"count": ctx.memory.get("count", 0) + 1})

    app.register_workflow(Workflow(name="chat", type="chatflow", nodes=[Node(name="t", handler=turn)]),
                          trigger={"type": "event", "event_type": "msg",
                                   "map_conversation_id": lambda e: e.payload["c"]})
    await app.publish("msg", {"c": "c1"})
    await app.drain(timeout=20)
    memory = await app.conversation_store.get("c1")
    snap = await app.snapshot()
    await app.close()
    assert runs == [1, 2]                      # fenced out once, then redone
    assert memory == {"count": 1}              # the delta applied exactly once
    assert snap["dead"] == 0 and snap["pending"] == 0


async def test_run_workflow_waits_longer_than_the_socket_timeout(redis_url, namespace):
    # block_ms=10 makes the connection's socket timeout ~5 s; the run takes 6 s
    app = Orchestrator(redis_url, namespace=namespace, block_ms=10)

    async def slow(ctx):
        await asyncio.sleep(6)
        return "done"

    app.register_workflow(Workflow(name="slow", nodes=[Node(name="s", handler=slow)]))
    await app.start()
    try:
        result = await app.run_workflow("slow", timeout=30)
    finally:
        await app.stop()
        await app.close()
    assert result.status == "succeeded" and result.output_of("s") == "done"
