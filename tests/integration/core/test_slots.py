"""Every Lua script call and every MULTI/EXEC touches keys of one Redis Cluster hash slot, on
the default single-Redis layout too, so the layout stays cluster-ready.

The surface app (:mod:`tests.cluster.surface_app`) runs in-process on a redis-server of this
module while a MONITOR connection records what Redis executes (:mod:`tests.cluster.slots`):
publishing (single, batched, synchronous, delayed, with conversation order lists), a worker
consuming with ack, renew, reclaim, redelivery, dead letters and trim, a chatflow turn with its
memory and lock, cron fired under leader election, a once subscriber, run records and logs,
run_workflow results, cancel, inspect (requeue, purge, leases, delayed), limits and the
conversation store. Keys a script computes from its ARGV are read from the commands it ran,
so they count too. A cross-slot unit fails the test with its script, call site and keys.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import pytest
import redis

from orchestrator import Event
from orchestrator.broker.embedded import EmbeddedRedis
from orchestrator.broker.streams import StreamBroker
from orchestrator.chat.conversations import RedisConversationStore
from orchestrator.ops.inspector import Inspector
from orchestrator.runs.limits import Gate, Limits
from orchestrator.runs.stores import RedisRunStore
from tests.cluster.slots import (
    CallSites,
    KeyReader,
    MonitorRecorder,
    atomic_units,
    cross_slot,
    describe,
    lua_constants,
    unit_inventory,
)
from tests.cluster.surface_app import build_app, tkey
from tests.integration.procs import until

pytestmark = pytest.mark.timeout(120)

#: what the drive must have run at least once (script constants and transactions)
EXPECTED_SCRIPTS = {
    "PUBLISH_ONCE", "ACK_OWNED", "RENEW_OWNED", "RECLAIM", "DEAD_LETTER", "TRIM_SAFE", "DELETE_IDLE_CONSUMERS",
    "SCHEDULE", "MOVE_DUE", "CANCEL", "APPLY_DELTA", "ACQUIRE", "RENEW", "RELEASE", "FIRE", "CLAIM",
    "SAVE_RUN", "SAVE_LIVE", "TRIM_RUNS", "CHECKPOINT", "RATE_TAKE", "CONCURRENCY_TAKE", "CONCURRENCY_RENEW",
    "PURGE_EVENTS", "PURGE_ORDER", "REQUEUE",
}


@pytest.fixture(scope="module")
def slot_redis(tmp_path_factory: pytest.TempPathFactory):
    """A redis-server of this module alone, so MONITOR sees only this drive."""
    server = EmbeddedRedis(tmp_path_factory.mktemp("slots"))
    server.start()
    yield server
    server.stop()


async def _ghost_takes_a_job(app, partitions: int) -> None:
    """A consumer of the record route reads pending entries and dies: the worker reclaims them."""
    group = next(g for g in app.route_groups() if "surface.record" in g)
    for p in range(partitions):
        await StreamBroker(app.redis, app.settings, "ghost", group=group, partition=p).read(10, None)


async def _publish_everything(app) -> None:
    await app.publish("job", {"i": 0})
    await _ghost_takes_a_job(app, app.settings.partitions)
    await app.start()
    for i in range(1, 6):
        await app.publish("job", {"i": i})
    await app.publish_many([Event("job", {"i": i}) for i in range(6, 16)])
    app.publish_sync("job", {"i": 16})
    app.publish_many_sync([Event("job", {"i": i}) for i in (17, 18)])
    await app.publish("job", {"i": 19}, delay_s=0.3)
    for seq in range(3):
        await app.publish("chat.turn", {"conversation": "c1", "seq": seq})
    await app.publish_many([Event("chat.turn", {"conversation": "c2", "seq": 0}),
                            Event("chat.turn", {"conversation": "c2", "seq": 1})])
    await app.publish("chat.turn", {"conversation": "c1", "seq": 3}, delay_s=0.4)
    await app.publish("once.evt", {})
    await app.publish("once.evt", {})
    await app.publish("poison", {})
    await app.redis.xadd(app.keys.partition(0).events, {"id": "garbage", "type": "bad", "body": b"\xc1\xff"})
    for i in range(6):
        await app.publish("limited", {"i": i, "tenant": f"t{i % 2}"})
    await app.publish("order.created", {"x": 2})


async def _runs_and_cancel(app) -> str:
    result = await app.run_workflow("dag", input={"x": 3}, timeout=20)
    assert result.status == "succeeded" and result.results, result
    run_id = await app.run_workflow("slow", wait=False)
    await until(lambda: _has(app, tkey(app, "slow"), run_id), "the slow run to start")
    await app.cancel_run(run_id, reason="slot test")
    await app.cancel_run(str(uuid.uuid4()), reason="an unknown run")
    return str(run_id)


async def _has(app, key: str, member: str) -> bool:
    return member.encode() in await app.redis.lrange(key, 0, -1)


async def _everything_processed(app) -> bool:
    r = app.redis
    seen = await r.hgetall(tkey(app, "seen"))
    chat1 = await r.llen(tkey(app, "chat", "c1"))
    chat2 = await r.llen(tkey(app, "chat", "c2"))
    inspector = Inspector.from_app(app)
    dead = len(await inspector.dead_list(limit=10))
    return (len(seen) == 20 and chat1 == 4 and chat2 == 2 and await r.llen(tkey(app, "once")) == 1
            and await r.llen(tkey(app, "dag")) == 2 and await r.llen(tkey(app, "limited")) == 6
            and dead >= 2 and await r.llen(tkey(app, "ticks")) >= 1)


async def _inspect_and_repair(app, run_id: str) -> None:
    inspector = Inspector.from_app(app)
    await inspector.streams()
    await inspector.pending()
    dead = await inspector.dead_list(limit=10)
    await inspector.dead_show(dead[0]["dead_id"])
    await inspector.requeue([dead[0]["dead_id"]])
    await inspector.requeue_all()
    await inspector.leaders()
    await inspector.locks()
    await inspector.groups()
    await inspector.workers()
    await inspector.runs()
    await inspector.run(run_id, tail=5)
    far = Event("job", {"i": 99})
    await app.schedule(far, int(time.time() * 1000) + 3_600_000)
    await inspector.delayed()
    assert await inspector.cancel_delayed(far.id)
    for p in range(app.settings.partitions):
        broker = StreamBroker(app.redis, app.settings, "slots", partition=p)
        await broker.trim()
        await broker.delete_idle_consumers(1_000)
    await _stores_and_limits(app)
    store = RedisConversationStore(app.redis, app.keys, compact_after=2)
    for n in range(4):
        await store.apply_delta("c9", {"set": {"n": n}}, event_id=f"e{n}")
    await store.get("c9")
    await store.set("c9", {"n": 0})
    await store.delete("c9")
    await app.run_store.prune(keep=1)
    await inspector.purge()
    await inspector.remove_group(next(g for g in app.route_groups() if "surface.limited" in g), force=True)


async def _stores_and_limits(app) -> None:
    """A run store that trims its index, and a concurrency place held past its lease."""
    runs = RedisRunStore(app.redis, app.keys, max_records=1)
    now = time.time()
    records = [{"run_id": str(uuid.uuid4()), "workflow_id": "wf", "workflow_name": "w", "status": "succeeded",
                "started_at": now - n, "finished_at": now, "duration_ms": 1.0} for n in range(4)]
    await runs.save(records[0])
    await runs.save_many(records[1:])
    gate = Gate(app.redis, app.keys, "sub:slots", Limits(concurrency=1), lease_ms=300)
    held = Event("job", {"i": 1})
    held.stream_id, held.group = "1-0", "workers:sub:slots"
    try:
        assert await gate.enter(held) == 0
        await asyncio.sleep(0.5)  # renewed meanwhile
        await gate.leave(held)
    finally:
        await gate.close()


async def _purge_with_order_lists(app) -> None:
    """With no worker consuming: chat turns wait with their order lists, then everything goes."""
    await app.publish("chat.turn", {"conversation": "c7", "seq": 0})
    await app.publish("chat.turn", {"conversation": "c7", "seq": 1})
    await Inspector.from_app(app).purge_events()


async def drive(url: str, namespace: str, partitions: int) -> None:
    app = build_app("all", redis_url=url, namespace=namespace, partitions=partitions, ack_policy="on_success",
                    max_deliveries=2, redelivery_backoff_ms=50, redelivery_backoff_max_ms=100,
                    visibility_timeout_ms=1_000, renew_interval_ms=200, reclaim_interval_ms=100,
                    stream_maxlen=5, heartbeat_interval_s=0.5, cron_lease_ms=2_000)
    try:
        await app.connect()
        await app.declare_routes()
        await _publish_everything(app)
        run_id = await _runs_and_cancel(app)
        await until(lambda: _everything_processed(app), "every event to be processed", timeout_s=30)
        await _inspect_and_repair(app, run_id)
        await app.stop()
        await _purge_with_order_lists(app)
    finally:
        await app.stop()
        await app.close()


@pytest.mark.parametrize("partitions", [1, 3])
def test_every_script_and_transaction_touches_one_hash_slot(slot_redis, monkeypatch, partitions, tmp_path: Path):
    monkeypatch.setenv("TOKIWA_STATE_DIR", str(tmp_path / "state"))
    namespace = f"s{uuid.uuid4().hex[:8]}"
    sites = CallSites().install(monkeypatch)
    recorder = MonitorRecorder("127.0.0.1", slot_redis.port).start()
    try:
        asyncio.run(drive(slot_redis.url, namespace, partitions))
    finally:
        executed = recorder.stop()
    units = atomic_units(executed)
    client = redis.Redis(host="127.0.0.1", port=slot_redis.port)
    try:
        KeyReader(client).fill(units)
    finally:
        client.close()
    scripts = lua_constants(sites.registered)
    ran = unit_inventory([u for u in units if u.kind != "command"], scripts)
    missing = EXPECTED_SCRIPTS - set(ran)
    assert not missing, f"the drive ran no {sorted(missing)}; it ran {ran}"
    print(f"partitions={partitions}: atomic units run:", dict(sorted(ran.items())))
    bad = cross_slot(units, namespace)
    report = sorted({describe(u, scripts, sites) for u in bad})
    assert not report, "cross-slot operations:\n" + "\n".join(report)


def test_the_check_catches_cross_slot_scripts_transactions_and_commands(slot_redis):
    """The analysis itself: a script writing a key it computed from ARGV in another slot, a
    keyless script that touches a key, a MULTI over two slots and a two-stream XREAD are found;
    same-slot ones and other namespaces' keys are not."""
    ns = f"c{uuid.uuid4().hex[:8]}"
    a, b = f"{{{ns}:a}}:x", f"{{{ns}:b}}:y"
    recorder = MonitorRecorder("127.0.0.1", slot_redis.port).start()
    client = redis.Redis(host="127.0.0.1", port=slot_redis.port)
    try:
        client.eval("redis.call('SET', KEYS[1], 1) redis.call('SET', ARGV[1], 1)", 1, a, b)
        client.eval("redis.call('SET', KEYS[1], 1) redis.call('SET', KEYS[1] .. ':more', 1)", 1, a)
        client.eval("redis.call('SET', ARGV[1], 1)", 0, a)
        client.eval("redis.call('SET', KEYS[1], 1) redis.call('SET', ARGV[1], 1)", 1, "other:x", "other:y")
        pipe = client.pipeline(transaction=True)
        pipe.set(a, 1).set(b, 1).execute()
        pipe = client.pipeline(transaction=True)
        pipe.set(a, 1).incr(a + ":n").execute()
        client.xadd(a + ":s", {"f": 1})
        client.xadd(b + ":s", {"f": 1})
        client.xread({a + ":s": 0, b + ":s": 0})
        client.delete(a, b)  # split per slot by redis-py's cluster client: not an error
    finally:
        executed = recorder.stop()
    units = atomic_units(executed)
    KeyReader(client).fill(units)
    client.close()
    bad = cross_slot(units, ns)
    found = sorted((u.kind, len(u.slots)) for u in bad)
    assert found == [("command", 2), ("script", 1), ("script", 2), ("transaction", 2)], found
