"""A publish lands once: the PUBLISH_ONCE marker against a real redis-server, then replies
delayed past the socket timeout (the proxy) so that redis-py resends publishes that landed.

The resends are real: with the marker off (``publish_dedup_ms=0``) the same scenario adds an
event twice, so the tests with it on can fail."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import redis

from orchestrator import Event, Orchestrator
from orchestrator.broker.connection import create_redis
from orchestrator.broker.streams import StreamBroker
from orchestrator.broker.sync_publish import SyncPublisher
from orchestrator.config import Settings
from orchestrator.events import decode_fields
from orchestrator.faults import Fault, condition, reset_conditions
from tests.faults.common import COUNTING_GROUP, ensure_group
from tests.groups import pending_total
from tests.integration.procs import start_worker, stop, wait_until, worker_env

from .proxy import FaultProxy

TIMEOUT_MS = 300  # socket timeout of the clients behind the proxy
DELAY_MS = 500  # reply delay: past the timeout


def event_ids(client: redis.Redis, namespace: str) -> list[str]:
    return [decode_fields(f, entry_id=i.decode()).id for i, f in client.xrange(f"{{{namespace}:0}}:events")]


# -- the marker ------------------------------------------------------------------------------
async def test_the_same_event_published_twice_is_one_entry_with_one_stream_id(redis_url, namespace, sync_redis):
    app = Orchestrator(redis_url, namespace=namespace, mode="producer")
    event = Event("job", {"i": 1})
    try:
        first = await app.enqueue(event)
        again = await app.enqueue(event)
        batch = await app.publish_many([event, Event("job", {"i": 2}), event])
    finally:
        await app.close()
    assert again == first and batch[0] == first and batch[2] == first and batch[1] != first
    ids = event_ids(sync_redis, namespace)
    assert len(ids) == 2 and ids[0] == event.id and ids[1] != event.id
    marker = f"{{{namespace}:0}}:published:{event.id}"
    assert sync_redis.get(marker) == first.encode()
    assert 0 < sync_redis.pttl(marker) <= 60_000


async def test_marker_off_adds_every_publish(redis_url, namespace, sync_redis):
    app = Orchestrator(redis_url, namespace=namespace, mode="producer", publish_dedup_ms=0)
    event = Event("job", {"i": 1})
    try:
        first = await app.enqueue(event)
        again = await app.enqueue(event)
    finally:
        await app.close()
    assert first != again
    assert event_ids(sync_redis, namespace) == [event.id, event.id]
    assert sync_redis.exists(f"{{{namespace}:0}}:published:{event.id}") == 0


async def test_marker_expires_after_publish_dedup_ms(redis_url, namespace, sync_redis):
    app = Orchestrator(redis_url, namespace=namespace, mode="producer", publish_dedup_ms=150)
    event = Event("job", {"i": 1})
    try:
        first = await app.enqueue(event)
        assert await app.enqueue(event) == first
        await asyncio.sleep(0.3)
        later = await app.enqueue(event)
    finally:
        await app.close()
    assert later != first
    assert sync_redis.xlen(f"{{{namespace}:0}}:events") == 2


@pytest.mark.parametrize("dedup_ms", [60_000, 0])
async def test_conversation_order_lists_get_the_id_once(redis_url, namespace, sync_redis, dedup_ms):
    settings = Settings(redis_url=redis_url, namespace=namespace, publish_dedup_ms=dedup_ms)
    client = create_redis(redis_url)
    broker = StreamBroker(client, settings)
    event = Event("chat", {"i": 1})
    try:
        lists = [broker.keys.conversation_order(c) for c in ("c1", "c2")]
        first = await broker.publish(event, order_lists=lists)
        again = await broker.publish(event, order_lists=lists)
        [batched] = await broker.publish_many([event], order_lists=[lists])
    finally:
        await client.aclose()
    for conv in ("c1", "c2"):
        order = [x.decode() for x in sync_redis.lrange(f"{{{namespace}:0}}:order:{conv}", 0, -1)]
        if dedup_ms:
            assert order == [first] and again == first and batched == first
        else:
            assert order == [first, again, batched]  # the ordered script still runs, unmarked


def test_sync_publisher_marks_too(redis_url, namespace, sync_redis):
    publisher = SyncPublisher(Settings(redis_url=redis_url, namespace=namespace))
    event = Event("job", {"i": 1})
    try:
        first = publisher.publish(event)
        assert publisher.publish(event) == first
        assert publisher.publish_many([event, event], [(), ("c1",)]) == [first, first]
    finally:
        publisher.close()
    assert event_ids(sync_redis, namespace) == [event.id]
    assert sync_redis.llen(f"{{{namespace}:0}}:order:c1") == 0


# -- resends after a timeout -----------------------------------------------------------------
@pytest.fixture
def proxy(redis_url):
    with FaultProxy.for_url(redis_url) as p:
        yield p


@pytest.fixture(autouse=True)
def _fresh_conditions():
    reset_conditions()
    yield
    reset_conditions()


def heal_after(proxy: FaultProxy, seconds: float) -> threading.Timer:
    timer = threading.Timer(seconds, proxy.heal)
    timer.start()
    return timer


@pytest.mark.parametrize("dedup_ms", [60_000, 0])
async def test_publish_resent_after_a_timeout_lands_once(proxy, namespace, sync_redis, dedup_ms):
    settings = Settings(redis_url=proxy.url, namespace=namespace, publish_dedup_ms=dedup_ms)
    client = create_redis(proxy.url, timeout_ms=TIMEOUT_MS)
    broker = StreamBroker(client, settings)
    event = Event("job", {"i": 1})
    try:
        await broker.ensure_group()
        await broker.publish(Event("job", {"i": 0}))  # the script is loaded, the connection up
        proxy.delay_replies(DELAY_MS)  # the publish runs, its reply comes after the timeout
        heal_after(proxy, 0.45)  # ... and the retry's reconnect passes
        stream_id = await broker.publish(event)
    finally:
        await client.aclose()
    ids = event_ids(sync_redis, namespace)
    assert condition(Fault.CONNECTION).hits >= 1, "redis-py met no timeout: nothing was resent"
    if dedup_ms:
        assert ids.count(event.id) == 1
        assert stream_id == sync_redis.xrange(f"{{{namespace}:0}}:events")[-1][0].decode()
    else:
        assert ids.count(event.id) == 2, "the resend of a plain XADD adds the event twice"


def test_sync_publish_resent_after_a_timeout_lands_once(proxy, namespace, sync_redis):
    publisher = SyncPublisher(Settings(redis_url=proxy.url, namespace=namespace, redis_timeout_ms=TIMEOUT_MS))
    event = Event("job", {"i": 1})
    try:
        publisher.publish(Event("job", {"i": 0}))  # the group exists, the connection is up
        proxy.delay_replies(DELAY_MS)
        heal_after(proxy, 0.45)
        publisher.publish(event)
    finally:
        publisher.close()
    assert condition(Fault.CONNECTION).hits >= 1
    assert event_ids(sync_redis, namespace).count(event.id) == 1


@pytest.mark.slow
async def test_flapping_replies_every_event_once_in_the_stream_and_run_once(
        proxy, redis_url, namespace, sync_redis, subprocess_env, tmp_path):
    """Replies delayed past the timeout for 0.35 s of every second while 300 events are
    published, one by one and in pipelines of 20; then a real worker runs them."""
    total = 300
    settings = Settings(redis_url=proxy.url, namespace=namespace)
    client = create_redis(proxy.url, timeout_ms=TIMEOUT_MS)
    broker = StreamBroker(client, settings)
    done = threading.Event()

    def flap() -> None:
        while not done.is_set():
            proxy.delay_replies(DELAY_MS)
            done.wait(0.35)
            proxy.heal()
            done.wait(0.65)

    ensure_group(sync_redis, namespace, COUNTING_GROUP)  # the worker's route, before publishing
    flapper = threading.Thread(target=flap, daemon=True)
    flapper.start()
    sent: dict[str, str] = {}
    started = time.monotonic()
    try:
        i = 0
        while i < total:
            if i % 40 < 20:
                event = Event("job", {"i": i})
                sent[event.id] = await broker.publish(event)
                i += 1
            else:
                batch = [Event("job", {"i": i + k}) for k in range(20)]
                for event, sid in zip(batch, await broker.publish_many(batch), strict=True):
                    sent[event.id] = sid
                i += 20
            await asyncio.sleep(0.015)
    finally:
        done.set()
        flapper.join(5)
        proxy.heal()
        await client.aclose()
    resent = condition(Fault.CONNECTION).hits
    print(f"\n{total} events published in {time.monotonic() - started:.1f}s through flapping replies; "
          f"{resent} timeouts met")
    assert resent >= 3, "the flapping produced too few timeouts to test anything"
    entries = {decode_fields(f, entry_id=i.decode()).id: i.decode()
               for i, f in sync_redis.xrange(f"{{{namespace}:0}}:events")}
    assert sync_redis.xlen(f"{{{namespace}:0}}:events") == total == len(entries), "an event id is in the stream twice"
    assert entries == sent, "publish returned another stream id than the one in the stream"

    worker = start_worker(worker_env(subprocess_env, redis_url, namespace, concurrency=16), tmp_path / "w.log")
    try:
        wait_until(lambda: sync_redis.hlen(f"{namespace}:test:seen") == total, 20, message="every event run")
        wait_until(lambda: pending_total(sync_redis, namespace) == 0, 10)
    finally:
        code = stop(worker)
    counts = {int(k): int(v) for k, v in sync_redis.hgetall(f"{namespace}:test:seen").items()}
    assert sorted(counts) == list(range(total))
    assert set(counts.values()) == {1}, "an event ran twice"
    assert code == 0
