"""Inspect (library and CLI) on a real Redis with pending and dead entries, leases, workers, runs."""

from __future__ import annotations

import asyncio
import json
import time

import msgpack
import pytest
from click.testing import CliRunner

from orchestrator.app import Orchestrator
from orchestrator.cli.inspect import inspect_group
from orchestrator.cli.runtime import Heartbeat
from orchestrator.errors import InvalidArgumentError, NotFoundError
from orchestrator.events import decode_fields
from orchestrator.keys import Keys
from orchestrator.ops.inspector import Inspector
from orchestrator.workflow.model import Node, Workflow
from tests.groups import ensure_group


@pytest.fixture
async def app(redis_url, namespace):
    """A worker-mode app whose failures go straight to the dead-letter stream."""
    application = Orchestrator(redis_url, namespace=namespace, mode="all", max_deliveries=1,
                               ack_policy="on_success", block_ms=50)
    await application.connect()
    yield application
    await application.close()


PROBE = "workers:sub:probe"  # a route's group that no worker reads here


def deliver_without_ack(sync_redis, namespace: str, consumer: str, count: int) -> None:
    keys = Keys(namespace)
    ensure_group(sync_redis, namespace, PROBE)
    sync_redis.xreadgroup(PROBE, consumer, {keys.events: ">"}, count=count)


class Flaky:
    """A subscriber that fails until fixed."""

    def __init__(self) -> None:
        self.broken = True
        self.seen: list[dict] = []

    def __call__(self, event) -> None:
        if self.broken:
            raise ValueError(f"cannot handle {event.payload}")
        self.seen.append(event.payload)


async def dead_letters(app, count: int) -> Flaky:
    handler = Flaky()
    app.dispatcher.subscribe("order.created", handler)
    for n in range(count):
        await app.publish("order.created", {"n": n})
    await app.drain(timeout=10)
    return handler


# -- streams and pending ----------------------------------------------------------------------
async def test_streams_show_length_group_lag_pending_and_consumers(app, sync_redis, namespace):
    for n in range(3):
        await app.publish("order.created", {"n": n})
    deliver_without_ack(sync_redis, namespace, "c1", 2)
    events, dead = await Inspector.from_app(app).streams()
    assert (events["stream"], events["length"], dead["length"]) == (app.keys.events, 3, 0)
    (group,) = events["groups"]
    assert (group["name"], group["pending"], group["lag"]) == (PROBE, 2, 1)
    assert [(c["name"], c["pending"]) for c in group["consumers"]] == [("c1", 2)]
    assert dead["exists"] is False


async def test_pending_lists_entries_per_consumer_with_idle_time_and_deliveries(app, sync_redis, namespace):
    for n in range(3):
        await app.publish("order.created", {"n": n})
    deliver_without_ack(sync_redis, namespace, "c1", 2)
    deliver_without_ack(sync_redis, namespace, "c2", 1)
    data = await Inspector.from_app(app).pending()
    assert data["count"] == 3 and data["consumers"] == {"c1": 2, "c2": 1} and data["groups"] == {PROBE: 3}
    assert [e["consumer"] for e in data["entries"]] == ["c1", "c1", "c2"]
    assert all(e["deliveries"] == 1 and e["idle_ms"] >= 0 and e["type"] == "order.created"
               for e in data["entries"])
    only_c2 = await Inspector.from_app(app).pending(consumer="c2")
    assert [e["consumer"] for e in only_c2["entries"]] == ["c2"]


async def test_pending_of_a_namespace_without_a_stream_is_empty(redis_url, namespace):
    import redis.asyncio as aioredis
    client = aioredis.Redis.from_url(redis_url)
    try:
        data = await Inspector(client, Keys(namespace)).pending()
    finally:
        await client.aclose()
    assert data == {"count": 0, "groups": {}, "consumers": {}, "entries": []}


# -- dead letters -----------------------------------------------------------------------------
async def test_dead_list_shows_reason_error_and_type_newest_first(app):
    await dead_letters(app, 2)
    rows = await Inspector.from_app(app).dead_list()
    assert len(rows) == 2
    assert rows[0]["dead_id"] > rows[1]["dead_id"]
    assert all(r["reason"] == "max_deliveries" and r["type"] == "order.created" and r["deliveries"] == 1
               for r in rows)
    assert "cannot handle" in rows[0]["error"]


async def test_dead_show_decodes_the_original_event(app):
    await dead_letters(app, 1)
    inspector = Inspector.from_app(app)
    (row,) = await inspector.dead_list()
    shown = await inspector.dead_show(row["dead_id"])
    assert shown["event"]["payload"] == {"n": 0}
    assert shown["event"]["id"] == row["event_id"]


async def test_dead_show_of_an_unknown_id_is_not_found_and_a_malformed_id_is_refused(app):
    inspector = Inspector.from_app(app)
    with pytest.raises(NotFoundError):
        await inspector.dead_show("1-0")
    with pytest.raises(InvalidArgumentError):
        await inspector.dead_show("not-an-id")


async def test_requeue_brings_a_dead_event_back_and_a_fixed_handler_processes_it(app):
    handler = await dead_letters(app, 2)
    inspector = Inspector.from_app(app)
    chosen, other = await inspector.dead_list()
    payload = (await inspector.dead_show(chosen["dead_id"]))["event"]["payload"]
    handler.broken = False
    new_id = await inspector.requeue_one(chosen["dead_id"])
    assert [e[0].decode() for e in await app.redis.xrange(app.keys.events, new_id, new_id)] == [new_id]
    await app.drain(timeout=10)
    assert handler.seen == [payload]
    assert [r["dead_id"] for r in await inspector.dead_list()] == [other["dead_id"]]


async def test_requeue_all_empties_the_dead_stream_in_original_order(app):
    handler = await dead_letters(app, 3)
    handler.broken = False
    inspector = Inspector.from_app(app)
    oldest_first = [(await inspector.dead_show(r["dead_id"]))["event"]["payload"]
                    for r in reversed(await inspector.dead_list())]
    results = await inspector.requeue_all()
    new_ids = [r["stream_id"] for r in results]
    requeued = await app.redis.xrange(app.keys.events, new_ids[0], new_ids[-1])
    assert [e[0].decode() for e in requeued] == new_ids
    assert [decode_fields(fields).payload for _, fields in requeued] == oldest_first
    assert await inspector.dead_list() == []
    await app.drain(timeout=10)
    assert sorted(p["n"] for p in handler.seen) == [0, 1, 2]  # processed concurrently: any order
    assert await app.broker.dead_count() == 0


async def test_requeueing_the_same_dead_letter_twice_adds_it_once(app):
    await dead_letters(app, 1)
    inspector = Inspector.from_app(app)
    (row,) = await inspector.dead_list()
    first, second = await inspector.requeue([row["dead_id"], row["dead_id"]])
    assert first["stream_id"] is not None and second["stream_id"] is None
    with pytest.raises(NotFoundError):
        await inspector.requeue_one(row["dead_id"])


async def test_purge_deletes_every_dead_letter_and_says_how_many(app):
    await dead_letters(app, 2)
    inspector = Inspector.from_app(app)
    assert await inspector.purge() == 2
    assert await inspector.dead_list() == []


# -- leases, workers, runs --------------------------------------------------------------------
async def test_leaders_show_holder_ttl_and_epoch_and_a_role_nobody_holds(app, sync_redis):
    keys = app.keys
    sync_redis.set(keys.leader("cron"), "host-a:42:x1", px=10_000)
    sync_redis.set(keys.leader_epoch("cron"), 3)
    sync_redis.set(keys.leader_epoch("old"), 7)
    rows = {r["role"]: r for r in await Inspector.from_app(app).leaders()}
    assert rows["cron"]["holder"] == "host-a:42:x1" and rows["cron"]["epoch"] == 3
    assert 0 < rows["cron"]["ttl_ms"] <= 10_000
    assert rows["old"] == {"role": "old", "key": keys.leader("old"), "holder": None, "ttl_ms": None, "epoch": 7}


async def test_locks_show_conversation_locks(app, sync_redis):
    keys = app.keys
    sync_redis.set(keys.conversation_lock("conv-1"), "token-1", px=5_000)
    sync_redis.set(keys.conversation_lock_epoch("conv-1"), 2)
    (row,) = await Inspector.from_app(app).locks()
    assert (row["conversation_id"], row["holder"], row["epoch"]) == ("conv-1", "token-1", 2)


async def test_workers_show_heartbeats_and_flag_stale_ones(app, sync_redis):
    await Heartbeat(app).beat()
    old = {"id": "gone", "host": "h", "pid": 1, "last_seen": time.time() - 3600}
    sync_redis.hset(app.keys.workers, "gone", msgpack.packb(old))
    rows = {r["id"]: r for r in await Inspector.from_app(app).workers()}
    assert rows[app.worker_id]["stale"] is False and rows[app.worker_id]["age_s"] < 60
    assert rows["gone"]["stale"] is True


async def test_runs_list_and_show_read_the_run_store(app):
    wf = Workflow("inspect-flow", [Node("a", lambda ctx: 1), Node("b", lambda ctx: 2, depends_on=["a"])])
    app.register_workflow(wf, trigger={"type": "event", "event_type": "go"})
    await app.publish("go", {})
    await app.drain(timeout=10)
    inspector = Inspector.from_app(app)
    (summary,) = await inspector.runs(workflow="inspect-flow")
    assert summary["status"] == "succeeded"
    assert {n: s["state"] for n, s in summary["task_summary"].items()} == {"a": "succeeded", "b": "succeeded"}
    shown = await inspector.run(summary["run_id"])
    assert shown["workflow_name"] == "inspect-flow" and isinstance(shown["logs"], list)
    assert await inspector.runs(status="failed", workflow="inspect-flow") == []
    with pytest.raises(InvalidArgumentError):
        await inspector.runs(status="exploded")
    with pytest.raises(NotFoundError):
        await inspector.run("no-such-run")


# -- CLI (sync tests: the CLI runs its own event loop) ----------------------------------------
def invoke(redis_url: str, namespace: str, *args: str, input: str | None = None):  # noqa: A002
    return CliRunner().invoke(inspect_group, [*args, "--redis-url", redis_url, "--namespace", namespace],
                              input=input, catch_exceptions=False)


def prepare(redis_url: str, namespace: str, *, dead: int = 0, pending_for: str | None = None) -> None:
    """Make ``dead`` dead letters, and one entry pending for consumer ``pending_for``."""
    async def go() -> None:
        application = Orchestrator(redis_url, namespace=namespace, max_deliveries=1,
                                   ack_policy="on_success", block_ms=50)
        try:
            await application.connect()
            if dead:
                await dead_letters(application, dead)
            if pending_for:
                await application.redis.xgroup_create(application.keys.events, PROBE, id="$", mkstream=True)
                await application.publish("order.other", {})
                await application.redis.xreadgroup(PROBE, pending_for, {application.keys.events: ">"}, count=1)
        finally:
            await application.close()
    asyncio.run(go())


def test_every_inspect_command_prints_json_that_parses(redis_url, namespace):
    prepare(redis_url, namespace, dead=1, pending_for="c9")
    commands = [["streams"], ["pending"], ["dead", "list"], ["leaders"], ["locks"], ["workers"],
                ["runs", "list"]]
    for command in commands:
        result = invoke(redis_url, namespace, *command, "--json")
        assert result.exit_code == 0, (command, result.output)
        json.loads(result.output)
    dead_id = json.loads(invoke(redis_url, namespace, "dead", "list", "--json").output)[0]["dead_id"]
    shown = json.loads(invoke(redis_url, namespace, "dead", "show", dead_id, "--json").output)
    assert shown["type"] == "order.created"


def test_inspect_commands_print_readable_tables_by_default(redis_url, namespace):
    prepare(redis_url, namespace, dead=1, pending_for="c9")
    listing = invoke(redis_url, namespace, "dead", "list").output
    assert "REASON" in listing and "max_deliveries" in listing
    assert invoke(redis_url, namespace, "streams").output.startswith("STREAM")
    out = invoke(redis_url, namespace, "pending").output
    assert f"1 pending ({PROBE}: 1" in out and "c9" in out and "order.other" in out


def test_dead_requeue_all_and_purge_from_the_cli(redis_url, namespace):
    prepare(redis_url, namespace, dead=2)
    result = invoke(redis_url, namespace, "dead", "requeue", "--all", "--json")
    assert result.exit_code == 0 and len(json.loads(result.output)) == 2
    prepare(redis_url, namespace, dead=1)  # its drain dead-letters the 2 requeued ones again
    refused = invoke(redis_url, namespace, "dead", "purge", input="n\n")
    assert refused.exit_code == 1
    assert len(json.loads(invoke(redis_url, namespace, "dead", "list", "--json").output)) == 3
    purged = invoke(redis_url, namespace, "dead", "purge", "--yes", "--json")
    assert json.loads(purged.output) == {"purged": 3}


def test_cli_refuses_bad_input_with_a_usage_exit_code(redis_url, namespace):
    assert invoke(redis_url, namespace, "dead", "requeue").exit_code == 2
    result = invoke(redis_url, namespace, "dead", "show", "bogus")
    assert result.exit_code == 2 and "not a stream id" in result.output
    missing = invoke(redis_url, namespace, "runs", "show", "nope")
    assert missing.exit_code == 1 and "no run" in missing.output


def test_inspecting_an_unused_namespace_writes_nothing(redis_url, namespace, sync_redis):
    for command in (["streams"], ["pending"], ["dead", "list"], ["leaders"], ["workers"], ["runs", "list"]):
        assert invoke(redis_url, namespace, *command, "--json").exit_code == 0, command
    assert list(sync_redis.scan_iter(match=f"{namespace}:*")) == []


def test_an_unreachable_redis_exits_with_unavailable(namespace):
    result = invoke("redis://127.0.0.1:1/0", namespace, "streams")
    assert result.exit_code == 69 and "cannot reach Redis at redis://127.0.0.1:1/0 (connection refused)" in result.output
