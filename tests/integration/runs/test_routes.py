"""Routes against a real redis-server: groups per registration, adverts in Redis, what a
producer without the app records, and a turn that arrives without its order."""

from __future__ import annotations

import logging

from orchestrator import Event, Node, Orchestrator, Workflow
from orchestrator.events import encode_fields
from orchestrator.runs.routes import decode_advert
from tests.groups import groups


def chat_app(redis_url: str, namespace: str, seen: list) -> Orchestrator:
    app = Orchestrator(redis_url, namespace=namespace, block_ms=50)

    async def turn(ctx) -> None:
        seen.append((ctx.conversation_id, ctx.input["seq"]))

    app.register_workflow(Workflow(name="chat", type="chatflow", nodes=[Node(name="turn", handler=turn)]),
                          trigger={"event_type": "chat.msg", "conversation_key": "user.id"})
    return app


async def test_adverts_let_a_producer_without_the_app_record_the_conversation_order(redis_url, namespace, sync_redis):
    seen: list = []
    worker = chat_app(redis_url, namespace, seen)
    await worker.connect()  # declares the route: its group and its advert
    advert = decode_advert(sync_redis.hget(f"{namespace}:routes", "workers:wf:chat"))
    assert advert["kind"] == "chatflow" and advert["types"] == ["chat.msg"] and advert["conversation_key"] == "user.id"
    producer = Orchestrator(redis_url, namespace=namespace, mode="producer")  # knows no workflow
    first = await producer.publish("chat.msg", {"user": {"id": "u1"}, "seq": 0})
    second = await producer.publish("chat.msg", {"seq": 1}, key="u1")  # the explicit key, same conversation
    order = sync_redis.lrange(worker.keys.conversation_order("u1", "workers:wf:chat"), 0, -1)
    assert order == [first.stream_id.encode(), second.stream_id.encode()]
    await worker.drain(timeout=10)
    await producer.close()
    await worker.close()
    assert seen == [("u1", 0), ("u1", 1)]
    assert worker.chatflows().unordered == 0
    assert sync_redis.llen(worker.keys.conversation_order("u1", "workers:wf:chat")) == 0


async def test_a_turn_published_without_its_order_runs_and_is_counted_and_logged(redis_url, namespace, sync_redis,
                                                                                caplog):
    seen: list = []
    app = chat_app(redis_url, namespace, seen)
    await app.connect()
    sync_redis.xadd(f"{{{namespace}:0}}:events", encode_fields(Event("chat.msg", {"user": {"id": "u2"}, "seq": 7})))
    with caplog.at_level(logging.WARNING):
        await app.drain(timeout=10)
    await app.close()
    assert seen == [("u2", 7)]
    assert app.chatflows().unordered == 1
    assert any("published without its conversation order" in r.getMessage() for r in caplog.records)


async def test_each_registration_reads_through_its_own_group(redis_url, namespace, sync_redis):
    app = Orchestrator(redis_url, namespace=namespace, block_ms=50)
    calls: list = []
    app.dispatcher.subscribe("job", lambda e: calls.append("sub"), name="t.sub")
    app.register_workflow(Workflow(name="wf", nodes=[Node(name="n", handler=lambda ctx: calls.append("wf"))]),
                          trigger={"event_type": "job"})
    await app.publish("job", {})
    await app.publish("other", {})  # no route takes it: each group acks it at once
    await app.drain(timeout=10)
    snap = await app.snapshot()
    await app.close()
    assert sorted(calls) == ["sub", "wf"]
    found = groups(sync_redis, namespace)
    assert set(found) == {"workers:sub:t.sub", "workers:wf:wf"}
    assert all(int(g["pending"]) == 0 and int(g["lag"]) == 0 for g in found.values())
    assert set(snap["groups"]) == set(found) and snap["pending"] == 0 and snap["lag"] == 0


def test_remove_group_retires_a_registration_and_refuses_while_a_live_worker_reads_it(redis_url, namespace,
                                                                                     sync_redis):
    import json
    import subprocess
    import sys
    import time

    import msgpack

    from tests.integration.procs import ROOT

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "orchestrator.cli", "inspect", *args, "--redis-url", redis_url,
                               "--namespace", namespace], cwd=ROOT, capture_output=True, text=True, timeout=60)

    import asyncio

    async def declare() -> None:
        app = Orchestrator(redis_url, namespace=namespace, mode="producer")
        app.register_workflow(Workflow(name="old", nodes=[Node(name="n", handler=lambda ctx: None)]),
                              trigger={"event_type": "job"})
        await app.connect()
        for i in range(3):
            await app.publish("job", {"i": i})
        await app.close()

    asyncio.run(declare())
    group = "workers:wf:old"
    beat = {"id": "w1", "last_seen": time.time(), "groups": [group]}
    sync_redis.hset(f"{namespace}:workers", "w1", msgpack.packb(beat))
    refused = cli("remove-group", group, "--yes")
    assert refused.returncode == 2 and "1 live worker(s) read 'workers:wf:old'" in refused.stderr
    sync_redis.hdel(f"{namespace}:workers", "w1")
    done = cli("remove-group", group, "--yes", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"group": group, "removed": True, "lag": 3, "pending": 0}
    assert group not in groups(sync_redis, namespace) and not sync_redis.hexists(f"{namespace}:routes", group)
    missing = cli("remove-group", "workers:wf:nope", "--yes")
    assert missing.returncode != 0 and "no consumer group 'workers:wf:nope'" in missing.stderr
