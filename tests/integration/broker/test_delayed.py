"""Delayed events against a real redis-server: schedule, move when due (once, whatever the
number of movers), cancel, list, precision, a restart with persistence, a full Redis, and a
mover that keeps failing."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable

import msgpack
import pytest

from orchestrator import faults
from orchestrator.broker.connection import create_redis
from orchestrator.broker.delayed import DelayedEvents, DelayMover
from orchestrator.broker.streams import StreamBroker
from orchestrator.config import load_settings
from orchestrator.events import Event, decode_fields
from orchestrator.faults import MAX_RESTARTS
from orchestrator.keys import Keys


def _delayed(client, namespace: str, **settings) -> DelayedEvents:
    cfg = load_settings({"namespace": namespace, **settings})
    return DelayedEvents(client, Keys(namespace), cfg)


async def _now_ms(client) -> int:
    secs, micros = await client.time()
    return int(secs) * 1000 + int(micros) // 1000


async def _until(predicate: Callable[[], Awaitable[bool]], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await predicate():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"not reached within {timeout_s}s: {what}")


async def _stream(client, keys: Keys) -> list[tuple[str, Event]]:
    return [(sid.decode(), decode_fields(fields, entry_id=sid.decode()))
            for sid, fields in await client.xrange(keys.events)]


def _ms_part(stream_id: str) -> int:
    return int(stream_id.split("-")[0])


async def test_an_event_moves_only_when_due_and_arrives_whole_with_its_order_lists(aredis, namespace, keys):
    delayed = _delayed(aredis, namespace)
    event = Event("order.remind", {"order": "A-1", "n": [1, 2.5, None]}, {"correlation_id": "c-1", "tags": ["x"]})
    order = [keys.conversation_order("conv-1"), keys.conversation_order("conv-2")]
    due = await _now_ms(aredis) + 400
    assert await delayed.schedule(event, due, order) is True
    assert await delayed.count() == 1 and await delayed.next_due_ms() == due

    assert await delayed.move_due() == []
    assert await aredis.exists(keys.events) == 0

    await asyncio.sleep(max(0.0, (due - await _now_ms(aredis)) / 1000.0) + 0.01)
    moved = await delayed.move_due()
    assert len(moved) == 1
    row = moved[0]
    assert row["event_id"] == event.id and row["due_ms"] == due and row["status"] == "moved"
    assert row["moved_ms"] >= due
    entries = await _stream(aredis, keys)
    assert len(entries) == 1
    sid, got = entries[0]
    assert sid == row["stream_id"] and _ms_part(sid) >= due
    assert got.to_dict() == event.to_dict()
    for key in order:
        assert [x.decode() for x in await aredis.lrange(key, 0, -1)] == [sid]
    # the publish-once marker holds the stream id, so a publish of the same id adds nothing
    assert (await aredis.get(keys.published(event.id))).decode() == sid
    assert 0 < await aredis.pttl(keys.published(event.id)) <= 20_000
    assert await delayed.count() == 0 and await aredis.hlen(keys.delayed_events) == 0
    assert await delayed.next_due_ms() is None
    assert await delayed.move_due() == []


async def test_scheduling_an_event_id_twice_changes_nothing(aredis, namespace, keys):
    delayed = _delayed(aredis, namespace)
    event = Event("x", 1)
    due = await _now_ms(aredis) + 60_000
    assert await delayed.schedule(event, due) is True
    stored = await aredis.hget(keys.delayed_events, event.id)
    again = Event("y", 2, id=event.id)
    assert await delayed.schedule(again, due + 5000, [keys.conversation_order("c")]) is False
    assert await delayed.count() == 1 and await delayed.next_due_ms() == due
    assert await aredis.hget(keys.delayed_events, event.id) == stored


async def test_a_cancelled_event_never_moves(aredis, namespace, keys):
    delayed = _delayed(aredis, namespace)
    kept, dropped = Event("keep"), Event("drop")
    due = await _now_ms(aredis) + 200
    await delayed.schedule(kept, due)
    await delayed.schedule(dropped, due)
    assert await delayed.cancel(dropped.id) is True
    assert await delayed.cancel(dropped.id) is False
    assert await delayed.cancel("no-such-id") is False
    mover = DelayMover(delayed)
    await mover.start()
    try:
        await _until(lambda: delayed_count_is(delayed, 0), 5, "the kept event moved")
        await asyncio.sleep(0.2)
    finally:
        await mover.stop()
    assert [e.id for _, e in await _stream(aredis, keys)] == [kept.id]
    assert mover.moved == 1 and mover.failed is None


async def delayed_count_is(delayed: DelayedEvents, n: int) -> bool:
    return await delayed.count() == n


async def test_list_shows_events_in_due_order(aredis, namespace):
    delayed = _delayed(aredis, namespace)
    now = await _now_ms(aredis)
    events = [(Event("third"), now + 30_000), (Event("first"), now + 10_000), (Event("second"), now + 20_000)]
    for event, due in events:
        await delayed.schedule(event, due)
    listed = await delayed.list()
    assert [row["type"] for row in listed] == ["first", "second", "third"]
    assert [row["due_ms"] for row in listed] == [now + 10_000, now + 20_000, now + 30_000]
    assert [row["event_id"] for row in listed] == [events[1][0].id, events[2][0].id, events[0][0].id]
    assert 5 < listed[0]["due_in_s"] <= 10 and 25 < listed[2]["due_in_s"] <= 30
    assert [row["type"] for row in await delayed.list(limit=2)] == ["first", "second"]
    assert await delayed.list(limit=0) == []


async def test_an_event_published_meanwhile_is_not_added_again(aredis, namespace, keys):
    cfg = load_settings({"namespace": namespace})
    delayed = DelayedEvents(aredis, keys, cfg)
    event = Event("x", 1)
    await delayed.schedule(event, await _now_ms(aredis) - 1)
    published = await StreamBroker(aredis, cfg).publish(event)
    moved = await delayed.move_due()
    assert [(r["status"], r["stream_id"]) for r in moved] == [("known", published)]
    assert len(await _stream(aredis, keys)) == 1 and await delayed.count() == 0


async def test_an_unreadable_delayed_value_is_dead_lettered_and_the_rest_move(aredis, namespace, keys):
    delayed = _delayed(aredis, namespace)
    now = await _now_ms(aredis)
    await aredis.zadd(keys.delayed, {"bad": now - 2})
    await aredis.hset(keys.delayed_events, "bad", b"\xc1 not msgpack")
    await aredis.zadd(keys.delayed, {"orphan": now - 1})  # no hash value at all
    good = Event("good")
    await delayed.schedule(good, now)
    await asyncio.sleep(0.01)
    moved = {r["event_id"]: r["status"] for r in await delayed.move_due()}
    assert moved == {"bad": "dead", "orphan": "missing", good.id: "moved"}
    dead = await aredis.xrange(keys.dead)
    assert len(dead) == 1 and dead[0][1][b"reason"] == b"undecodable" and dead[0][1][b"id"] == b"bad"
    assert [e.id for _, e in await _stream(aredis, keys)] == [good.id]
    assert await delayed.count() == 0 and await aredis.hlen(keys.delayed_events) == 0
    assert [r["type"] for r in await delayed.list()] == []


async def test_three_movers_move_each_of_300_events_exactly_once(redis_url, aredis, namespace, keys):
    clients = [create_redis(redis_url) for _ in range(3)]
    movers = [DelayMover(_delayed(c, namespace), poll_ms=5, max_sleep_ms=200, batch=7) for c in clients]
    producer = _delayed(aredis, namespace)
    try:
        for mover in movers:
            await mover.start()
        now = await _now_ms(aredis)
        events = [Event("race", {"i": i}) for i in range(300)]
        order = keys.conversation_order("race")
        for i, event in enumerate(events):
            await producer.schedule(event, now + 100 + (i * 1000) // 300, [order])
        await _until(lambda: stream_len_at_least(aredis, keys, 300), 15, "300 entries in the stream")
        await asyncio.sleep(0.3)  # a second move of anything would land by now
    finally:
        for mover in movers:
            await mover.stop()
        for c in clients:
            await c.aclose()
    counts = Counter(e.id for _, e in await _stream(aredis, keys))
    assert set(counts) == {e.id for e in events}
    assert set(counts.values()) == {1}
    assert await aredis.zcard(keys.delayed) == 0 and await aredis.hlen(keys.delayed_events) == 0
    assert await aredis.llen(keys.conversation_order("race")) == 300
    assert sum(m.moved for m in movers) == 300 and all(m.failed is None for m in movers)
    print("moves per mover:", [m.moved for m in movers])


async def stream_len_at_least(client, keys: Keys, n: int) -> bool:
    return int(await client.xlen(keys.events)) >= n


async def test_at_low_load_events_fire_after_their_due_time_and_soon_after(aredis, namespace, keys):
    delayed = _delayed(aredis, namespace)
    mover = DelayMover(delayed)
    await mover.start()
    try:
        now = await _now_ms(aredis)
        due = {}
        for i in range(50):
            event = Event("tick", {"i": i})
            due[event.id] = now + 200 + i * 40  # staggered over 2 s
            await delayed.schedule(event, due[event.id])
        await _until(lambda: stream_len_at_least(aredis, keys, 50), 10, "50 entries in the stream")
    finally:
        await mover.stop()
    late = sorted(_ms_part(sid) - due[e.id] for sid, e in await _stream(aredis, keys))
    assert len(late) == 50 and late[0] >= 0, late
    p50, p99 = late[len(late) // 2], late[min(len(late) - 1, int(len(late) * 0.99))]
    print(f"fired late by p50={p50} ms p99={p99} ms max={late[-1]} ms")
    assert late[-1] < 1000, late  # a sanity bound; benchmarks/delay_bench.py measures precision


async def test_a_schedule_in_the_movers_process_wakes_a_sleeping_mover(aredis, namespace, keys):
    delayed = _delayed(aredis, namespace)
    mover = DelayMover(delayed, max_sleep_ms=5000)
    await mover.start()
    try:
        await asyncio.sleep(0.2)  # nothing scheduled: the mover sleeps its 5 s
        event = Event("soon")
        due = await _now_ms(aredis) + 50
        await delayed.schedule(event, due)
        await _until(lambda: stream_len_at_least(aredis, keys, 1), 10, "the event moved")
    finally:
        await mover.stop()
    (sid, _), = await _stream(aredis, keys)
    assert 0 <= _ms_part(sid) - due < 2000  # well before the 5 s sleep would have ended


async def test_delayed_events_survive_a_kill_of_a_persistent_redis_and_fire_once(own_redis, namespace, caplog):
    caplog.set_level(logging.WARNING, "tokiwa.faults")
    faults.reset_conditions()
    keys = Keys(namespace)
    client = create_redis(own_redis.url)
    delayed = _delayed(client, namespace)
    mover = DelayMover(delayed, max_sleep_ms=200)
    try:
        now = await _now_ms(client)
        events = [Event("persist", {"i": i}) for i in range(20)]
        for i, event in enumerate(events):
            # half due before the kill, half after the restart
            await delayed.schedule(event, now + (300 if i % 2 else 1500), [keys.conversation_order("p")])
        await mover.start()
        await _until(lambda: stream_len_at_least(client, keys, 10), 10, "the first half moved")
        own_redis.kill()  # appendonly yes, appendfsync always: every write is on disk
        await asyncio.sleep(0.5)
        own_redis.start()
        await _until(lambda: stream_len_at_least(client, keys, 20), 20, "the second half moved after the restart")
        await asyncio.sleep(0.3)
        counts = Counter(e.id for _, e in await _stream(client, keys))
        assert counts == Counter({e.id: 1 for e in events})
        assert await client.zcard(keys.delayed) == 0 and await client.hlen(keys.delayed_events) == 0
        assert await client.llen(keys.conversation_order("p")) == 20
        assert mover.failed is None and mover.moved == 20
    finally:
        await mover.stop()
        await client.aclose()
    assert "redis unreachable" in caplog.text


async def test_a_full_redis_moves_nothing_loses_nothing_and_everything_fires_once_freed(own_redis, namespace, caplog):
    caplog.set_level(logging.WARNING, "tokiwa.faults")
    faults.reset_conditions()
    keys = Keys(namespace)
    client = create_redis(own_redis.url)
    delayed = _delayed(client, namespace)
    mover = DelayMover(delayed, max_sleep_ms=200)
    try:
        now = await _now_ms(client)
        events = [Event("full", {"i": i}) for i in range(20)]
        for event in events:
            await delayed.schedule(event, now + 100)
        # 8 MB in small writes (a big one leaves a big query buffer that is freed soon after,
        # which would end the episode by itself)
        filler = [f"filler:{i}" for i in range(40)]
        for name in filler:
            await client.set(name, b"x" * 200_000)
        await asyncio.sleep(0.2)
        used = int((await client.info("memory"))["used_memory"])
        await client.config_set("maxmemory-policy", "noeviction")
        await client.config_set("maxmemory", str(used - 2_000_000))
        with pytest.raises(Exception) as refused:
            await delayed.schedule(Event("refused"), now)
        assert faults.classify(refused.value) is faults.Fault.OOM
        await mover.start()
        await asyncio.sleep(1.5)
        assert faults.condition(faults.Fault.OOM).hits > 0
        assert mover.moved == 0 and mover.failed is None
        assert await client.xlen(keys.events) == 0
        assert await client.zcard(keys.delayed) == 20 and await client.hlen(keys.delayed_events) == 20
        await client.delete(*filler)  # frees ~8 MB: below maxmemory again
        await _until(lambda: stream_len_at_least(client, keys, 20), 15, "every event moved once memory was freed")
        await asyncio.sleep(0.3)
        counts = Counter(e.id for _, e in await _stream(client, keys))
        assert counts == Counter({e.id: 1 for e in events})
        assert await client.zcard(keys.delayed) == 0
    finally:
        await mover.stop()
        await client.config_set("maxmemory", "0")
        await client.aclose()
    assert "redis is full" in caplog.text and "recovered after" in caplog.text


async def test_a_mover_that_keeps_failing_sets_failed_and_stops(aredis, namespace, caplog):
    delayed = _delayed(aredis, namespace)
    calls = []

    async def broken(limit: int = 100):
        calls.append(limit)
        raise RuntimeError("mover bug")

    delayed.move_batch = broken  # type: ignore[method-assign]
    seen: list[BaseException] = []
    mover = DelayMover(delayed, on_failed=seen.append)
    caplog.set_level(logging.ERROR, "tokiwa.delayed")
    await mover.start()
    try:
        await _until(lambda: asyncio.sleep(0, not mover.running), 15, "the mover stopped")
    finally:
        await mover.stop()
    assert isinstance(mover.failed, RuntimeError) and seen == [mover.failed]
    assert len(calls) == MAX_RESTARTS + 1 and mover.restarts == MAX_RESTARTS
    assert "delay mover failed; restarting it" in caplog.text
    assert "delay mover failed (fatal: mover bug); stopping it" in caplog.text


async def test_a_fatal_redis_reply_stops_the_mover_at_once_and_the_event_stays(aredis, namespace, keys):
    delayed = _delayed(aredis, namespace)
    order = keys.conversation_order("broken")
    await aredis.set(order, "not a list")
    event = Event("x")
    await delayed.schedule(event, await _now_ms(aredis) - 1, [order])
    mover = DelayMover(delayed)
    await mover.start()
    try:
        await _until(lambda: asyncio.sleep(0, not mover.running), 10, "the mover stopped")
    finally:
        await mover.stop()
    assert mover.failed is not None and faults.classify(mover.failed) is faults.Fault.FATAL
    assert "WRONGTYPE" in str(mover.failed) and mover.restarts == 0
    assert await aredis.exists(keys.events) == 0 and await delayed.count() == 1
    assert await aredis.hexists(keys.delayed_events, event.id)


async def test_the_stored_value_is_msgpack_of_fields_and_order_lists(aredis, namespace, keys):
    delayed = _delayed(aredis, namespace)
    event = Event("shape", {"a": 1})
    await delayed.schedule(event, 1, [keys.conversation_order("c")])
    data = msgpack.unpackb(await aredis.hget(keys.delayed_events, event.id), raw=True)
    flat = data[b"fields"]
    assert dict(zip(flat[::2], flat[1::2], strict=True)).keys() == {b"id", b"type", b"body"}
    assert data[b"order"] == [keys.conversation_order("c").encode()]


async def test_stop_is_prompt_and_a_task_cancelled_from_outside_counts_as_failed(aredis, namespace):
    delayed = _delayed(aredis, namespace)
    mover = DelayMover(delayed, max_sleep_ms=5000)
    await mover.start()
    await asyncio.sleep(0.1)
    started = time.monotonic()
    await mover.stop()
    assert time.monotonic() - started < 1 and not mover.running and mover.failed is None
    await mover.stop()  # idempotent

    seen: list[BaseException] = []
    other = DelayMover(delayed, on_failed=seen.append)
    await other.start()
    await asyncio.sleep(0.05)
    other._task.cancel()  # not through stop(): must not go unnoticed
    await asyncio.sleep(0.05)
    assert not other.running and isinstance(other.failed, asyncio.CancelledError) and seen == [other.failed]
    await other.stop()
