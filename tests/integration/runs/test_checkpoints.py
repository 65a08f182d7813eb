"""Node checkpoints on a real Redis: a run delivered again goes on after its completed nodes
with their outputs and attempt counts, and its record and ``inspect runs show`` say so; a
checkpoint write by an execution whose run another worker took over is refused and stops it;
checkpoints expire and are pruned with the record; opting out writes none."""

from __future__ import annotations

import asyncio
import time

import msgpack
import pytest
from click.testing import CliRunner

from orchestrator.app import Orchestrator
from orchestrator.cli.inspect import inspect_group
from orchestrator.errors import InvalidArgumentError
from orchestrator.events import Event
from orchestrator.workflow.model import Node, Workflow
from orchestrator.workflow.runner import Runner

pytestmark = pytest.mark.timeout(60)


class Order:
    """``charge -> ship -> mail``; each call is counted here; ``mail``'s first attempt waits
    until ``release`` is set (or for ever)."""

    def __init__(self, name: str = "order", **options) -> None:
        self.calls: dict[str, int] = {"charge": 0, "ship": 0, "mail": 0}
        self.in_mail = asyncio.Event()
        self.in_ship = asyncio.Event()
        self.release_ship = asyncio.Event()
        self.release_ship.set()
        self.release = asyncio.Event()

        async def charge(ctx):
            self.calls["charge"] += 1
            return {"charged": ctx.input["amount"]}

        async def ship(ctx):
            self.calls["ship"] += 1
            self.in_ship.set()
            await self.release_ship.wait()
            return {"parcel": f"P-{ctx.get_result('charge')['charged']}"}

        async def mail(ctx):
            self.calls["mail"] += 1
            self.in_mail.set()
            if ctx.attempt == 1:
                await self.release.wait()
            return {"mailed": ctx.get_result("ship")["parcel"], "attempt": ctx.attempt}

        self.workflow = Workflow(name, [Node("charge", charge), Node("ship", ship, ["charge"]),
                                        Node("mail", mail, ["ship"])], **options)


@pytest.fixture
async def app(redis_url, namespace):
    application = Orchestrator(redis_url, namespace=namespace, runner=Runner(cancel_grace_s=0.3), block_ms=50,
                               visibility_timeout_ms=60_000)
    await application.connect()
    yield application
    await application.close()


def delivered(payload: dict, deliveries: int = 1) -> Event:
    """An event as a worker's consumer hands it over (a stream entry of group ``g``)."""
    event = Event("order.created", payload)
    event.stream_id, event.group, event.deliveries = "1700000000000-0", "g", deliveries
    return event


async def execute(app, name: str, event: Event, run_id: str):
    reg = app.workflows.get(name)
    return await app.workflows.execute(reg, event=event, run_id=run_id, input=event.payload, context=None,
                                       conversation_id=None)


async def interrupted_during_mail(app, order: Order, event: Event, run_id: str) -> None:
    """Run until ``mail`` runs, then cancel it there (as a worker that stops mid-run)."""
    task = asyncio.create_task(execute(app, order.workflow.name, event, run_id))
    await asyncio.wait_for(order.in_mail.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def checkpoints(app, run_id: str) -> dict[str, dict]:
    raw = await app.redis.hgetall(app.keys.run_nodes(run_id))
    return {(v := msgpack.unpackb(data, raw=False))["name"]: v for data in raw.values()}


async def test_a_redelivered_run_goes_on_after_its_completed_nodes_with_their_outputs(app):
    order = Order()
    app.register_workflow(order.workflow, trigger={"type": "event", "event_type": "order.created"})
    event = delivered({"amount": 12})
    await interrupted_during_mail(app, order, event, "run-1")
    left = await checkpoints(app, "run-1")
    assert {n: (c["status"], c["attempts"]) for n, c in left.items()} == {
        "charge": ("succeeded", 1), "ship": ("succeeded", 1), "mail": ("running", 1)}
    assert left["ship"]["output"] == {"parcel": "P-12"} and left["charge"]["worker_id"] == app.worker_id

    result = await execute(app, "order", delivered({"amount": 12}, deliveries=2), "run-1")
    assert order.calls == {"charge": 1, "ship": 1, "mail": 2}
    assert result.status == "succeeded"
    assert result.output_of("mail") == {"mailed": "P-12", "attempt": 2}
    record = await app.run_store.get("run-1")
    assert record["status"] == "succeeded"
    assert record["resumed_from"] == {"nodes": ["charge", "ship"], "attempts": {"mail": 1},
                                      "workers": [app.worker_id], "deliveries": 2}
    assert [record["nodes"][n]["checkpointed"] for n in ("charge", "ship", "mail")] == [True, True, False]
    assert record["nodes"]["mail"]["attempts"] == 2
    assert (await checkpoints(app, "run-1"))["mail"]["status"] == "succeeded"


async def test_inspect_runs_show_says_what_a_resumed_run_took_from_checkpoints(app, redis_url, namespace):
    order = Order()
    app.register_workflow(order.workflow, trigger={"type": "event", "event_type": "order.created"})
    await interrupted_during_mail(app, order, delivered({"amount": 3}), "run-2")
    await execute(app, "order", delivered({"amount": 3}, deliveries=2), "run-2")
    shown = await asyncio.to_thread(CliRunner().invoke, inspect_group,
                                    ["runs", "show", "run-2", "--redis-url", redis_url, "--namespace", namespace],
                                    catch_exceptions=False)
    assert shown.exit_code == 0, shown.output
    assert f"resumed: charge, ship from checkpoints of {app.worker_id} (delivery 2)" in shown.output
    assert "status succeeded" in shown.output


async def test_a_run_that_finished_and_is_delivered_again_runs_no_node_again(app):
    order = Order()
    order.release.set()
    app.register_workflow(order.workflow, trigger={"type": "event", "event_type": "order.created"})
    first = await execute(app, "order", delivered({"amount": 5}), "run-3")
    again = await execute(app, "order", delivered({"amount": 5}, deliveries=2), "run-3")
    assert first.status == again.status == "succeeded"
    assert order.calls == {"charge": 1, "ship": 1, "mail": 1}
    assert again.output_of("mail") == first.output_of("mail") == {"mailed": "P-5", "attempt": 1}


async def test_a_checkpoint_write_after_another_worker_took_the_run_over_is_refused_and_stops_it(app):
    order = Order()
    order.release.set()
    order.release_ship.clear()
    app.register_workflow(order.workflow, trigger={"type": "event", "event_type": "order.created"})
    await app.start()
    try:
        await app.publish("order.created", {"amount": 9})
        await asyncio.wait_for(order.in_ship.wait(), 10)
        run_id = app.runner.active_runs[0]
        event = app.runner._runs[run_id].shared.event
        # another worker reclaims the entry and claims the run's record, as after a freeze
        await app.redis.xclaim(app.keys.events, event.group, "thief", 0, [event.stream_id])
        theirs = {**(await app.run_store.get(run_id)), "owner_token": "the-other-execution",
                  "worker_id": "thief", "status": "running"}
        assert await app.run_store.save_live([(theirs, True)]) == [True]
        before = await checkpoints(app, run_id)
        order.release_ship.set()
        deadline = time.monotonic() + 10
        while app.runner.active_runs and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert not app.runner.active_runs, "the fenced-out run did not stop"
    finally:
        await app.stop()
    assert order.calls == {"charge": 1, "ship": 1, "mail": 0}  # stopped before its next node
    assert await checkpoints(app, run_id) == before  # ship's success was not written
    assert before["ship"]["status"] == "running"
    record = await app.run_store.get(run_id)
    assert record["owner_token"] == "the-other-execution" and record["worker_id"] == "thief"
    assert app.workflows._checkpoints.refused == 1


async def test_checkpoints_expire_with_the_record_and_are_pruned_with_it(app):
    order = Order()
    order.release.set()
    app.register_workflow(order.workflow, trigger={"type": "event", "event_type": "order.created"})
    await execute(app, "order", delivered({"amount": 1}), "run-4")
    record_ttl = await app.redis.ttl(app.keys.run("run-4"))
    nodes_ttl = await app.redis.ttl(app.keys.run_nodes("run-4"))
    assert 0 < nodes_ttl <= record_ttl
    assert await app.run_store.prune(keep=0) == 1
    assert await app.redis.exists(app.keys.run_nodes("run-4")) == 0


@pytest.mark.parametrize(("workflow_option", "registration_option", "written"), [
    (True, None, True), (False, None, False), (True, False, False), (False, True, True)])
async def test_checkpointing_follows_the_workflow_unless_the_registration_says(app, workflow_option,
                                                                               registration_option, written):
    order = Order(checkpoint=workflow_option)
    order.release.set()
    options = {} if registration_option is None else {"checkpoint": registration_option}
    app.register_workflow(order.workflow, trigger={"type": "event", "event_type": "order.created"}, **options)
    result = await execute(app, "order", delivered({"amount": 1}), "run-5")
    assert result.status == "succeeded"
    assert bool(await app.redis.exists(app.keys.run_nodes("run-5"))) is written


async def test_a_run_not_taken_from_the_stream_writes_no_checkpoint(app):
    order = Order()
    order.release.set()
    app.register_workflow(order.workflow)
    result = await app.run_workflow("order", input={"amount": 2})
    assert result.status == "succeeded" and result.resumed_from is None
    assert await app.redis.exists(app.keys.run_nodes(result.run_id)) == 0


def test_the_checkpoint_option_must_be_a_boolean():
    app = Orchestrator("redis://localhost:1/0")
    with pytest.raises(InvalidArgumentError, match="checkpoint must be True or False"):
        app.register_workflow(Order().workflow, checkpoint="yes")
