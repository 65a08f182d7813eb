"""ChatflowExecutor on a real redis-server: conversation id, memory, fencing, order, locks."""

from __future__ import annotations

import asyncio
import time

import pytest

from orchestrator.chatflow import ChatflowExecutor
from orchestrator.conversations import RedisConversationStore
from orchestrator.errors import InvalidArgumentError, LockError
from orchestrator.events import Event
from orchestrator.locks import conversation_lock
from orchestrator.runner import Runner
from orchestrator.workflow import Node, Workflow


@pytest.fixture
def store(aredis, keys):
    return RedisConversationStore(aredis, keys, compact_after=5)


def executor(aredis, keys, store, **options):
    options.setdefault("lock_ttl_ms", 2_000)
    options.setdefault("lock_wait_timeout_s", 10.0)
    return ChatflowExecutor(aredis, keys, store, Runner(), **options)


def counting_flow(name="count", on_run=None):
    async def count(ctx):
        if on_run is not None:
            await on_run(ctx)
        seen = list(ctx.memory.get("seen", []))
        ctx.update_memory({"count": ctx.memory.get("count", 0) + 1,
                           "seen": seen + [getattr(ctx.event, "payload", None)]})
        return ctx.memory["count"]

    return Workflow(name, nodes=[Node("count", count)], type="chatflow")


def event(payload=None, stream_id=None):
    ev = Event("chat.message", payload)
    ev.stream_id = stream_id
    return ev


@pytest.mark.parametrize("cid", [None, "", "   "])
async def test_a_chatflow_without_a_conversation_id_is_refused(aredis, keys, store, cid):
    with pytest.raises(InvalidArgumentError, match="conversation id"):
        await executor(aredis, keys, store).run(counting_flow(), conversation_id=cid)


async def test_memory_is_loaded_updated_and_saved_across_runs(aredis, keys, store):
    ex = executor(aredis, keys, store)
    flow = counting_flow()
    first = await ex.run(flow, conversation_id="c1", event=event("hi"))
    second = await ex.run(flow, conversation_id="c1", event=event("again"))
    assert first.status == second.status == "succeeded"
    assert second.memory == {"count": 2, "seen": ["hi", "again"]}
    assert await store.get("c1") == {"count": 2, "seen": ["hi", "again"]}


async def test_the_memory_option_is_merged_over_the_stored_memory(aredis, keys, store):
    await store.set("c1", {"count": 5, "lang": "en"})
    result = await executor(aredis, keys, store).run(counting_flow(), conversation_id="c1",
                                                     memory={"lang": "ja"})
    assert result.memory["lang"] == "ja" and result.memory["count"] == 6
    assert (await store.get("c1"))["lang"] == "ja"


async def test_memory_is_saved_even_when_the_run_failed(aredis, keys, store):
    def remember_then_fail(ctx):
        ctx.update_memory({"note": "kept"})
        raise ValueError("node broke")

    flow = Workflow("fails", nodes=[Node("boom", remember_then_fail)], type="chatflow")
    result = await executor(aredis, keys, store).run(flow, conversation_id="c1")
    assert result.status == "failed"
    assert await store.get("c1") == {"note": "kept"}


async def test_a_redelivered_event_applies_its_memory_delta_once(aredis, keys, store):
    ex = executor(aredis, keys, store)
    ev = event("once")
    await ex.run(counting_flow(), conversation_id="c1", event=ev)
    again = await ex.run(counting_flow(), conversation_id="c1", event=ev)
    assert await store.get("c1") == {"count": 1, "seen": ["once"]}
    assert again.memory == {"count": 1, "seen": ["once"]}


async def test_a_stale_holder_is_refused_when_it_writes_memory(aredis, keys, store):
    """The run's lease expires while it is frozen; another holder takes the lock and writes.
    The first run's write is then refused by fencing and the run is reported failed."""
    ex = executor(aredis, keys, store, lock_ttl_ms=150, lock_renew_ms=50)

    async def freeze_then_lose(ctx):
        time.sleep(0.3)  # the whole loop freezes: no renewal, the lease runs out
        newer = conversation_lock(aredis, keys, "c1", ttl_ms=5_000)
        token = await newer.acquire(timeout_s=2)
        await store.set("c1", {"owner": "newer"}, fencing_token=token)
        await newer.release()
        ctx.update_memory({"owner": "stale"})

    flow = Workflow("stale", nodes=[Node("n", freeze_then_lose)], type="chatflow")
    result = await ex.run(flow, conversation_id="c1", event=event())
    assert result.status == "failed"
    assert result.error["name"] == "FencingError"
    assert await store.get("c1") == {"owner": "newer"}


async def test_runs_of_one_conversation_never_overlap(aredis, keys, store):
    intervals: list[tuple[float, float]] = []

    async def slow(ctx):
        start = time.monotonic()
        await asyncio.sleep(0.02)
        intervals.append((start, time.monotonic()))

    ex = executor(aredis, keys, store)
    await asyncio.gather(*(ex.run(counting_flow(on_run=slow), conversation_id="c1") for _ in range(8)))
    intervals.sort()
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(intervals, intervals[1:], strict=False))
    assert (await store.get("c1"))["count"] == 8


async def test_different_conversations_run_concurrently(aredis, keys, store):
    running, peak = 0, 0

    async def track(ctx):
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.05)
        running -= 1

    ex = executor(aredis, keys, store)
    await asyncio.gather(*(ex.run(counting_flow(on_run=track), conversation_id=f"c{i}") for i in range(4)))
    assert peak == 4


async def test_events_in_the_order_list_run_in_that_order(aredis, keys, store):
    ids = [f"{i}-0" for i in range(1, 6)]
    await aredis.rpush(keys.conversation_order("c1"), *ids)
    ex = executor(aredis, keys, store)
    flow = counting_flow()
    runs = [asyncio.create_task(ex.run(flow, conversation_id="c1", event=event(sid, sid)))
            for sid in reversed(ids)]
    await asyncio.wait_for(asyncio.gather(*runs), 10)
    assert (await store.get("c1"))["seen"] == ids
    assert await aredis.llen(keys.conversation_order("c1")) == 0


async def test_an_event_missing_from_the_order_list_does_not_wait(aredis, keys, store):
    await aredis.rpush(keys.conversation_order("c1"), "1-0")  # an earlier event, never processed
    ex = executor(aredis, keys, store, order_wait_timeout_s=30)
    result = await asyncio.wait_for(ex.run(counting_flow(), conversation_id="c1", stream_id="9-0"), 5)
    assert result.status == "succeeded"


async def test_an_order_wait_gives_up_after_its_timeout(aredis, keys, store):
    await aredis.rpush(keys.conversation_order("c1"), "1-0", "2-0")
    ex = executor(aredis, keys, store, order_wait_timeout_s=0.1)
    result = await asyncio.wait_for(ex.run(counting_flow(), conversation_id="c1", stream_id="2-0"), 5)
    assert result.status == "succeeded"
    assert await aredis.lrange(keys.conversation_order("c1"), 0, -1) == [b"1-0"]


async def test_abandon_hands_the_turn_to_the_next_event(aredis, keys, store):
    await aredis.rpush(keys.conversation_order("c1"), "1-0", "2-0")
    ex = executor(aredis, keys, store)
    waiting = asyncio.create_task(ex.run(counting_flow(), conversation_id="c1", stream_id="2-0"))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    await ex.abandon("c1", "1-0")
    assert (await asyncio.wait_for(waiting, 5)).status == "succeeded"


async def test_a_cancelled_run_releases_the_lock_and_keeps_its_turn(aredis, keys, store):
    started = asyncio.Event()

    async def hang(ctx):
        started.set()
        await asyncio.sleep(60)

    await aredis.rpush(keys.conversation_order("c1"), "1-0")
    ex = executor(aredis, keys, store)
    task = asyncio.create_task(ex.run(counting_flow(on_run=hang), conversation_id="c1", stream_id="1-0"))
    await asyncio.wait_for(started.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await aredis.exists(keys.conversation_lock("c1")) == 0
    assert await aredis.lrange(keys.conversation_order("c1"), 0, -1) == [b"1-0"]


async def test_a_held_lock_makes_the_run_wait_then_fail_after_the_lock_timeout(aredis, keys, store):
    other = conversation_lock(aredis, keys, "c1", ttl_ms=5_000)
    await other.acquire()
    try:
        ex = executor(aredis, keys, store, lock_wait_timeout_s=0.2)
        with pytest.raises(LockError):
            await ex.run(counting_flow(), conversation_id="c1")
    finally:
        await other.release()


async def test_waiting_for_a_lock_does_not_block_other_work(aredis, keys, store):
    other = conversation_lock(aredis, keys, "c1", ttl_ms=5_000)
    await other.acquire()
    ex = executor(aredis, keys, store)
    waiting = asyncio.create_task(ex.run(counting_flow(), conversation_id="c1"))
    ticks = 0
    for _ in range(10):
        await asyncio.sleep(0.01)
        ticks += 1
    assert ticks == 10 and not waiting.done()
    await other.release()
    assert (await asyncio.wait_for(waiting, 5)).status == "succeeded"


def test_bad_lock_settings_fail_when_the_executor_is_built(aredis, keys, store):
    with pytest.raises(InvalidArgumentError):
        ChatflowExecutor(aredis, keys, store, Runner(), lock_ttl_ms=1_000, lock_renew_ms=5_000)

