"""The stream broker against a real redis-server: round trips, dead letters, trimming."""

from __future__ import annotations

import asyncio

import msgpack
import pytest

from orchestrator import Event, Orchestrator
from orchestrator.broker.connection import create_redis
from orchestrator.broker.consumer import Consumer, Outcome
from orchestrator.broker.streams import StreamBroker
from orchestrator.config import load_settings
from tests.groups import pending_total


def make_app(redis_url: str, namespace: str, **kw) -> Orchestrator:
    return Orchestrator(redis_url, namespace=namespace, **kw)


async def test_published_event_reaches_subscriber_with_every_envelope_field(redis_url, namespace):
    app = make_app(redis_url, namespace)
    seen: list[Event] = []

    async def handler(event: Event) -> None:
        seen.append(event)

    app.dispatcher.subscribe("order.created", handler)
    meta = {"correlation_id": "c-1", "causation_id": "k-9", "source": "shop", "tags": ["a", "b"], "extra": 1}
    sent = await app.publish("order.created", {"order_ref": "A-001", "n": [1, 2.5, None]}, meta)
    await app.drain(timeout=10)
    await app.close()
    assert len(seen) == 1
    got = seen[0]
    assert got.to_dict() == sent.to_dict()
    assert (got.correlation_id, got.causation_id, got.source, got.tags) == ("c-1", "k-9", "shop", ["a", "b"])
    assert got.metadata["extra"] == 1
    assert got.stream_id == sent.stream_id and got.deliveries == 1


async def test_entry_is_acked_after_processing(redis_url, namespace, sync_redis):
    app = make_app(redis_url, namespace)
    app.dispatcher.subscribe("x", lambda e: None)
    await app.publish("x", 1)
    await app.drain(timeout=10)
    await app.close()
    assert pending_total(sync_redis, namespace) == 0


async def test_batch_publish_keeps_order_and_every_event(redis_url, namespace):
    app = make_app(redis_url, namespace, max_concurrent_events=1)
    seen: list[int] = []

    async def handler(event: Event) -> None:
        seen.append(event.payload)

    app.dispatcher.subscribe("n", handler)
    ids = await app.publish_many([Event("n", i) for i in range(500)])
    await app.drain(timeout=20)
    await app.close()
    assert len(set(ids)) == 500
    assert seen == list(range(500))


async def test_events_published_before_any_worker_are_processed(redis_url, namespace):
    producer = make_app(redis_url, namespace, mode="producer")
    await producer.publish("early", "first")
    await producer.close()
    worker = make_app(redis_url, namespace, mode="worker")
    seen = []
    worker.dispatcher.subscribe("early", lambda e: seen.append(e.payload))
    await worker.drain(timeout=10)
    await worker.close()
    assert seen == ["first"]


async def test_drain_in_producer_mode_is_a_clear_error(redis_url, namespace):
    from orchestrator import StateError

    app = make_app(redis_url, namespace, mode="producer")
    with pytest.raises(StateError, match="producer mode"):
        await app.drain()


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"id": "x", "type": "t", "body": b"\xc1\xc1 not msgpack"}, "undecodable"),
        ({"hello": "world"}, "wrong_fields"),
        ({"id": "x", "type": "t", "body": msgpack.packb([1, 2])}, "invalid_envelope"),
        ({"id": "x", "type": "other", "body": msgpack.packb(
            {"id": "x", "type": "t", "payload": 1, "metadata": {}, "published_at": 1.0})}, "wrong_fields"),
        ({"id": "x", "type": "t", "body": b"\x00" * 3000}, "oversized"),
    ],
)
async def test_bad_entries_go_to_dead_letters_with_a_reason(redis_url, namespace, sync_redis, fields, reason):
    app = make_app(redis_url, namespace, max_event_bytes=2048)
    good = []
    app.dispatcher.subscribe("*", lambda e: good.append(e.payload))
    await app.connect()
    sync_redis.xadd(f"{{{namespace}:0}}:events", fields)
    await app.publish("t", "still-fine")
    await app.drain(timeout=10)
    await app.close()
    dead = sync_redis.xrange(f"{{{namespace}:0}}:dead")
    assert len(dead) == 1
    entry = dead[0][1]
    assert entry[b"reason"].decode() == reason
    assert entry[b"deliveries"] == b"1"
    assert float(entry[b"failed_at"]) > 0
    for name, value in fields.items():  # the original entry is kept
        assert entry[name.encode()] == (value if isinstance(value, bytes) else value.encode())
    assert good == ["still-fine"]
    assert pending_total(sync_redis, namespace) == 0


async def test_oversized_event_is_refused_by_the_producer(redis_url, namespace):
    from orchestrator import InvalidArgumentError

    app = make_app(redis_url, namespace, max_event_bytes=1024)
    with pytest.raises(InvalidArgumentError, match="max_event_bytes"):
        await app.publish("big", "x" * 5000)
    await app.close()


async def test_failing_handler_with_on_success_is_dead_after_max_deliveries(redis_url, namespace, sync_redis):
    app = make_app(redis_url, namespace, ack_policy="on_success", max_deliveries=3,
                   visibility_timeout_ms=200, renew_interval_ms=50)
    calls = []

    def boom(event: Event) -> None:
        calls.append(event.deliveries)
        raise RuntimeError("payment service down")

    app.dispatcher.subscribe("pay", boom)
    await app.publish("pay", {"amount": 3})
    await app.drain(timeout=20)
    await app.close()
    assert calls == [1, 2, 3]
    dead = sync_redis.xrange(f"{{{namespace}:0}}:dead")
    assert len(dead) == 1
    assert dead[0][1][b"reason"] == b"max_deliveries"
    assert b"payment service down" in dead[0][1][b"error"]
    assert dead[0][1][b"deliveries"] == b"3"


async def test_failing_handler_with_always_policy_is_acked_once(redis_url, namespace, sync_redis):
    app = make_app(redis_url, namespace, ack_policy="always")
    calls = []
    app.dispatcher.subscribe("pay", lambda e: calls.append(1) or 1 / 0)
    await app.publish("pay", None)
    await app.drain(timeout=10)
    snap = await app.snapshot()
    await app.close()
    assert calls == [1]
    assert snap["failed"] == 1 and snap["pending"] == 0 and snap["dead"] == 0


async def test_trimming_never_removes_pending_or_undelivered_entries(redis_url, namespace):
    settings = load_settings({"redis_url": redis_url, "namespace": namespace, "stream_maxlen": 100})
    redis = create_redis(redis_url)
    producer = StreamBroker(redis, settings)
    await producer.ensure_group()
    consumer = StreamBroker(redis, settings, "c1")
    await producer.publish_many([Event("e", i) for i in range(1000)])
    first = await consumer.read(50, None)          # 50 pending, never acked
    await consumer.ack([d.stream_id for d in first[10:]])  # keep the first 10 pending
    read_more = await consumer.read(300, None)
    await consumer.ack([d.stream_id for d in read_more])   # 350 delivered, 10 still pending
    for _ in range(3):
        await producer.trim()
    remaining = await redis.xrange(f"{{{settings.namespace}:0}}:events")
    remaining_ids = {r[0].decode() for r in remaining}
    assert {d.stream_id for d in first[:10]} <= remaining_ids  # pending ones survive
    undelivered = await consumer.read(1000, None)
    assert len(undelivered) == 650                              # nothing undelivered was lost
    await consumer.ack([d.stream_id for d in first[:10]] + [d.stream_id for d in undelivered])
    for _ in range(3):
        await producer.trim()
    assert await redis.xlen(f"{{{settings.namespace}:0}}:events") < 300  # trimmed once work is done
    await redis.aclose()


async def test_trimming_under_load_loses_nothing(redis_url, namespace):
    app = make_app(redis_url, namespace, stream_maxlen=100, max_concurrent_events=4)
    seen: set[int] = set()

    async def handler(event: Event) -> None:
        await asyncio.sleep(0.001)
        seen.add(event.payload)

    app.dispatcher.subscribe("e", handler)
    await app.start()
    for start in range(0, 3000, 300):
        await app.publish_many([Event("e", i) for i in range(start, start + 300)])
        await asyncio.sleep(0.05)
    await app.drain(timeout=60)
    trimmed = app.consumer.stats.trimmed
    await app.stop()
    await app.close()
    assert seen == set(range(3000))
    assert trimmed > 0


async def test_owned_ack_refuses_an_entry_reclaimed_by_another_consumer(redis_url, namespace):
    settings = load_settings({"redis_url": redis_url, "namespace": namespace, "visibility_timeout_ms": 200})
    redis = create_redis(redis_url)
    a = StreamBroker(redis, settings, "a")
    b = StreamBroker(redis, settings, "b")
    await a.ensure_group()
    await a.publish(Event("e", 1))
    [delivery] = await a.read(1, None)
    await asyncio.sleep(0.3)
    claimed, _ = await b.reclaim(10)
    assert [d.stream_id for d in claimed] == [delivery.stream_id] and claimed[0].deliveries == 2
    assert await a.renew([delivery.stream_id]) == [delivery.stream_id]   # a learns it lost it
    assert await a.ack([delivery.stream_id]) == [delivery.stream_id]     # and cannot ack it
    assert await a.dead_letter(delivery, reason="x") is None             # nor dead-letter it
    assert await b.ack([delivery.stream_id]) == []
    await redis.aclose()


async def test_consumer_fetches_no_more_than_its_free_slots(redis_url, namespace, sync_redis):
    app = make_app(redis_url, namespace, max_concurrent_events=3)
    gate = asyncio.Event()
    running = []

    async def slow(event: Event) -> None:
        running.append(event.payload)
        await gate.wait()

    app.dispatcher.subscribe("s", slow)
    await app.publish_many([Event("s", i) for i in range(20)])
    await app.start()
    for _ in range(100):
        if len(running) == 3:
            break
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.1)
    pending = pending_total(sync_redis, namespace)
    gate.set()
    await app.drain(timeout=10)
    await app.stop()
    await app.close()
    assert pending == 3 and len(running) == 20


async def test_once_subscriber_runs_once_across_two_apps(redis_url, namespace):
    calls = []
    apps = [make_app(redis_url, namespace, max_concurrent_events=2) for _ in range(2)]

    async def welcome(event: Event) -> None:
        calls.append(event.payload)

    for app in apps:
        app.dispatcher.subscribe("user.joined", welcome, once=True)
        await app.start()
    await apps[0].publish_many([Event("user.joined", i) for i in range(20)])
    for app in apps:
        await app.drain(timeout=10)
    for app in apps:
        await app.stop()
        await app.close()
    assert len(calls) == 1


async def test_auth_with_password_in_the_url(tmp_path):
    from orchestrator.broker.embedded import EmbeddedRedis

    with EmbeddedRedis(tmp_path / "auth", password="s3cret-pw") as server:
        bad = Orchestrator(server.url.replace("s3cret-pw", "wrong"), namespace="auth")
        with pytest.raises(Exception, match="(?i)invalid|WRONGPASS|auth"):
            await bad.publish("x", 1)
        await bad.close()
        app = Orchestrator(server.url, namespace="auth")
        seen = []
        app.dispatcher.subscribe("x", lambda e: seen.append(e.payload))
        await app.publish("x", 42)
        await app.drain(timeout=10)
        await app.close()
        assert seen == [42]


async def test_consumer_survives_a_processor_that_raises(redis_url, namespace):
    settings = load_settings({"redis_url": redis_url, "namespace": namespace})
    redis = create_redis(redis_url)
    broker = StreamBroker(redis, settings, "c")
    await broker.ensure_group()
    await broker.publish_many([Event("e", i) for i in range(3)])
    seen = []

    async def process(event: Event) -> Outcome:
        seen.append(event.payload)
        if event.payload == 1:
            raise KeyError("bug in processor")
        return Outcome(True)

    consumer = Consumer(broker, settings, process)
    await asyncio.wait_for(consumer.run(until_drained=True), 10)
    await redis.aclose()
    assert sorted(seen) == [0, 1, 2] and consumer.stats.failed == 1 and consumer.stats.processed == 2


async def test_acl_user_in_the_url(tmp_path):
    from orchestrator.broker.embedded import EmbeddedRedis

    acl = ["--user", "default", "off", "--user", "alice", "on", ">alice-pw", "~*", "&*", "+@all"]
    with EmbeddedRedis(tmp_path / "acl", extra_args=acl) as server:
        url = server.url.replace("redis://", "redis://alice:alice-pw@")
        app = Orchestrator(url, namespace="acl")
        seen = []
        app.dispatcher.subscribe("x", lambda e: seen.append(e.payload))
        await app.publish("x", "as alice")
        await app.drain(timeout=10)
        await app.close()
        anonymous = Orchestrator(server.url, namespace="acl")
        with pytest.raises(Exception, match="(?i)auth|NOAUTH|permission"):
            await anonymous.publish("x", 1)
        await anonymous.close()
        assert seen == ["as alice"]


async def test_publish_sync_from_plain_code_is_consumed_like_publish(redis_url, namespace, sync_redis):
    from orchestrator import Node, Workflow

    app = Orchestrator(redis_url, namespace=namespace)
    seen = []
    app.dispatcher.subscribe("sync.event", lambda e: seen.append((e.payload, e.tags)))
    chat = Workflow(name="chat", type="chatflow", nodes=[Node(name="n", handler=lambda c: None)])
    app.register_workflow(chat, trigger={"type": "event", "event_type": "chat.msg",
                                         "map_conversation_id": lambda e: e.payload["c"]})
    event = app.publish_sync("sync.event", {"n": 1}, {"tags": ["sync"]})
    ids = app.publish_many_sync([Event("sync.event", {"n": i}) for i in range(2, 5)])
    chat_event = app.publish_sync("chat.msg", {"c": "conv-1"})
    # the chatflow's conversation order list got the id atomically with the XADD
    assert sync_redis.lrange(f"{{{namespace}:0}}:order:conv-1:workers:wf:chat", 0, -1) == [chat_event.stream_id.encode()]
    assert event.stream_id and len(ids) == 3
    await app.drain(timeout=10)
    await app.close()
    assert sorted(p["n"] for p, _ in seen) == [1, 2, 3, 4] and seen[0][1] == ["sync"]
    assert sync_redis.llen(f"{{{namespace}:0}}:order:conv-1") == 0  # its turn was taken and released


def test_publish_sync_needs_a_redis_url(namespace):
    from orchestrator import StateError

    app = Orchestrator(namespace=namespace)
    with pytest.raises(StateError, match="redis_url"):
        app.publish_sync("x", 1)
