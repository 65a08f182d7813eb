"""The consumer's background tasks under failures that are not Redis faults (a bug, say):
each is logged and restarted, and too many within a minute stop the consumer with
ConsumerFailed instead of leaving a worker that looks healthy and is not."""

from __future__ import annotations

import asyncio
import logging

import pytest

from orchestrator.broker.consumer import Consumer, ConsumerFailed, Outcome, redelivery_delay_ms
from orchestrator.broker.streams import StreamBroker
from orchestrator.config import load_settings
from orchestrator.events import Event
from orchestrator.faults import MAX_RESTARTS


async def _consumer(aredis, namespace: str, **settings) -> tuple[Consumer, StreamBroker, list[str]]:
    cfg = load_settings({"namespace": namespace, "renew_interval_ms": 50, "block_ms": 50, **settings})
    broker = StreamBroker(aredis, cfg, "c1")
    await broker.ensure_group()
    seen: list[str] = []

    async def process(event: Event) -> Outcome:
        seen.append(event.payload["n"])
        await asyncio.sleep(0.3)  # in flight long enough to be renewed
        return Outcome(True)

    return Consumer(broker, cfg, process), broker, seen


async def test_a_renewer_that_raises_is_logged_restarted_and_the_work_still_acked(aredis, namespace, caplog):
    consumer, broker, seen = await _consumer(aredis, namespace)
    real_renew, calls = broker.renew, []

    async def flaky_renew(ids, **kw):
        calls.append(len(ids))
        if len(calls) == 1:
            raise RuntimeError("renewer bug")
        return await real_renew(ids, **kw)

    broker.renew = flaky_renew
    for n in range(3):
        await broker.publish(Event("job", {"n": n}))
    caplog.set_level(logging.ERROR, "tokiwa.consumer")
    task = asyncio.create_task(consumer.run())
    for _ in range(100):
        if consumer.stats.acked == 3:
            break
        await asyncio.sleep(0.05)
    consumer.request_stop()
    await task
    assert sorted(seen) == [0, 1, 2] and consumer.stats.acked == 3
    assert consumer.stats.task_restarts == 1
    assert "consumer task renewer failed; restarting it" in caplog.text


async def test_a_task_failing_again_and_again_stops_the_consumer_with_consumer_failed(aredis, namespace):
    consumer, broker, _ = await _consumer(aredis, namespace)

    async def broken_trim():
        raise RuntimeError("trim bug")

    broker.trim = broken_trim
    with pytest.raises(ConsumerFailed, match="trim bug"):
        await asyncio.wait_for(consumer.run(), 30)
    assert consumer.stats.task_restarts == MAX_RESTARTS


def test_redelivery_delay_doubles_per_delivery_with_jitter_and_caps():
    cfg = load_settings({"redelivery_backoff_ms": 400, "redelivery_backoff_max_ms": 2000,
                         "visibility_timeout_ms": 10_000})
    for deliveries, base in ((1, 400), (2, 800), (3, 1600), (4, 2000), (9, 2000)):
        delays = [redelivery_delay_ms(cfg, deliveries) for _ in range(200)]
        assert all(base / 2 <= d <= base for d in delays), (deliveries, min(delays), max(delays))
        assert len(set(delays)) > 10  # jittered, not one fixed value
    capped = load_settings({"redelivery_backoff_ms": 50_000, "redelivery_backoff_max_ms": 60_000,
                            "visibility_timeout_ms": 3_000})
    assert redelivery_delay_ms(capped, 1) <= 3_000  # never longer than the visibility timeout


async def test_a_subscriber_that_meets_a_redis_outage_is_redelivered_even_under_ack_policy_always(redis_url, namespace):
    from redis.exceptions import ConnectionError as RedisConnectionError

    from orchestrator import Orchestrator

    app = Orchestrator(redis_url, namespace=namespace, ack_policy="always")

    def cut_off(event):
        raise RedisConnectionError("Connection closed by server.")

    def plain_bug(event):
        raise ValueError("a bug")

    app.dispatcher.subscribe("outage", cut_off)
    app.dispatcher.subscribe("bug", plain_bug)
    try:
        outage = await app.process_event(Event("outage", {}))
        bug = await app.process_event(Event("bug", {}))
    finally:
        await app.close()
    assert not outage.ok and outage.retry  # infrastructure, not the event: try it again
    assert not bug.ok and not bug.retry  # the event's own failure: acked as failed (always)
