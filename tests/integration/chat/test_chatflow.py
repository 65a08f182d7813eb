"""ChatflowExecutor on a real redis-server: conversation id, memory, fencing, order, locks."""

from __future__ import annotations

import asyncio
import time

import pytest

from orchestrator.chat.chatflow import ChatflowExecutor, will_be_redone
from orchestrator.chat.conversations import RedisConversationStore
from orchestrator.errors import InvalidArgumentError, LockError
from orchestrator.events import Event
from orchestrator.locks import conversation_lock
from orchestrator.workflow.model import Node, Workflow
from orchestrator.workflow.runner import Runner


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


class TakenOverOnWrite(RedisConversationStore):
    """The Redis store, where a newer holder takes the conversation lock (after the key
    vanished: an expiry this process did not see yet) and writes, just before our write."""

    def __init__(self, aredis, keys, **options):
        super().__init__(aredis, keys, **options)
        self.aredis, self.keys = aredis, keys

    async def apply_delta(self, conversation_id, patch, **options):
        await self.aredis.delete(self.keys.conversation_lock(conversation_id))
        newer = conversation_lock(self.aredis, self.keys, conversation_id, ttl_ms=5_000)
        token = await newer.acquire(timeout_s=2)
        await super().apply_delta(conversation_id, {"set": {"owner": "newer"}}, fencing_token=token)
        await newer.release()
        return await super().apply_delta(conversation_id, patch, **options)


async def test_a_stale_holder_is_refused_when_it_writes_memory(aredis, keys):
    """Another holder took the lock and wrote before this run's write, and this process had
    not noticed yet: the write is refused by fencing and the run is reported failed, to be
    redone (it keeps its turn)."""
    store = TakenOverOnWrite(aredis, keys)
    await aredis.rpush(keys.conversation_order("c1"), "1-0")
    result = await executor(aredis, keys, store).run(
        Workflow("stale", nodes=[Node("n", lambda ctx: ctx.update_memory({"owner": "stale"}))], type="chatflow"),
        conversation_id="c1", event=event(stream_id="1-0"))
    assert result.status == "failed"
    assert result.error["name"] == "FencingError"
    assert will_be_redone(result)
    assert await store.get("c1") == {"owner": "newer"}
    assert await aredis.lrange(keys.conversation_order("c1"), 0, -1) == [b"1-0"]


def stepping_flow(steps: list[str], *, first_sleep_s: float = 0.05, second_sleep_s: float = 0.0):
    """A two-node chatflow that records each step it takes into ``steps``."""

    async def first(ctx):
        steps.append("first:start")
        await asyncio.sleep(first_sleep_s)
        steps.append("first:end")  # a run cancelled while it sleeps never gets here
        ctx.update_memory({"first": True})

    async def second(ctx):
        steps.append("second:start")
        await asyncio.sleep(second_sleep_s)
        ctx.update_memory({"second": True})

    return Workflow("steps", nodes=[Node("first", first), Node("second", second, depends_on=["first"])],
                    type="chatflow")


async def test_a_run_frozen_past_its_lease_is_cancelled_before_its_node_takes_another_step(aredis, keys, store):
    """The whole loop freezes (as under SIGSTOP) for twice the lease while the node sleeps; the
    node's sleep ended during the freeze, yet on resume the lock's watchdog cancels the run
    before the node takes its next step. Nothing is saved, the turn is kept for the redo."""
    steps: list[str] = []
    ex = executor(aredis, keys, store, lock_ttl_ms=150, lock_renew_ms=50)
    await aredis.rpush(keys.conversation_order("c1"), "1-0")
    await store.set("c1", {"before": 1})
    loop = asyncio.get_running_loop()
    loop.call_later(0.01, time.sleep, 0.3)  # the freeze, 10 ms into the node's 50 ms sleep
    result = await asyncio.wait_for(ex.run(stepping_flow(steps), conversation_id="c1",
                                           event=event(stream_id="1-0")), 5)
    assert steps == ["first:start"], "the frozen run took a step after it resumed"
    assert result.status == "cancelled"
    assert result.error["name"] == "FencingError" and "lost" in result.error["message"]
    assert will_be_redone(result)
    assert result.memory == {"before": 1}
    assert await store.get("c1") == {"before": 1}
    assert await aredis.exists(keys.conversation_lock("c1")) == 0
    assert await aredis.lrange(keys.conversation_order("c1"), 0, -1) == [b"1-0"]


@pytest.mark.parametrize("how", ["taken", "deleted"])
async def test_a_run_whose_lock_is_taken_or_gone_is_cancelled_at_the_next_renewal(aredis, keys, store, how):
    steps: list[str] = []
    ex = executor(aredis, keys, store, lock_ttl_ms=2_000, lock_renew_ms=50)
    run = asyncio.create_task(ex.run(stepping_flow(steps, first_sleep_s=30), conversation_id="c1",
                                     event=event()))
    for _ in range(500):
        if steps:
            break
        await asyncio.sleep(0.01)
    lock_key = keys.conversation_lock("c1")
    if how == "taken":
        await aredis.set(lock_key, "another-holder", px=5_000)
    else:
        await aredis.delete(lock_key)
    changed = time.monotonic()
    result = await asyncio.wait_for(run, 10)
    cancelled_after = time.monotonic() - changed
    assert steps == ["first:start"]
    assert result.status == "cancelled" and will_be_redone(result)
    reason = "another holder" if how == "taken" else "expired or was deleted"
    assert reason in result.error["message"]
    assert await store.get("c1") == {}
    if how == "taken":
        assert await aredis.get(lock_key) == b"another-holder", "release left the other holder's lock alone"
    print(f"lock {how}: run cancelled {cancelled_after * 1000:.0f} ms later (renewal every 50 ms)")


class FreezingLoad(RedisConversationStore):
    """A memory load during which the whole loop freezes past the lock's lease."""

    freeze_s = 0.0

    async def get(self, conversation_id):
        memory = await super().get(conversation_id)
        time.sleep(self.freeze_s)
        return memory

    def memory_from(self, replies):  # the load that comes with the lock's acquisition
        memory = super().memory_from(replies)
        time.sleep(self.freeze_s)
        return memory


async def test_a_lock_lost_while_the_memory_loads_never_starts_the_run(aredis, keys):
    store = FreezingLoad(aredis, keys)
    store.freeze_s = 0.3
    steps: list[str] = []
    result = await executor(aredis, keys, store, lock_ttl_ms=150, lock_renew_ms=50).run(
        stepping_flow(steps), conversation_id="c1", event=event())
    assert steps == []
    assert result.status == "cancelled" and will_be_redone(result)
    assert result.memory == {}


async def test_a_cancellation_lost_while_waiting_for_the_turn_still_stops_the_run(aredis, keys, store):
    """Python 3.11's wait_for (inside redis-py's send) can drop a cancellation that lands as a
    command completes. A run cancelled meanwhile (its entry was taken by another worker) must
    not go on to take the lock and run once its turn opens."""
    steps: list[str] = []
    ex = executor(aredis, keys, store)
    waiting = asyncio.Event()

    async def wait_turn_dropping_the_cancel(cid, stream_id, group=None, partition=0):
        waiting.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            pass  # what wait_for does when the awaited send had finished: the turn poll goes on
        return True

    ex.wait_turn = wait_turn_dropping_the_cancel
    run = asyncio.create_task(ex.run(stepping_flow(steps), conversation_id="c1", event=event(stream_id="1-0")))
    await asyncio.wait_for(waiting.wait(), 5)
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(run, 5)
    assert steps == []
    assert await aredis.exists(keys.conversation_lock_epoch("c1")) == 0, "the lock was taken"


def test_a_runner_that_cannot_cancel_is_refused(aredis, keys, store):
    class RunOnly:
        async def run(self, workflow, **options):
            raise AssertionError("never called")

    with pytest.raises(InvalidArgumentError, match="cancel"):
        ChatflowExecutor(aredis, keys, store, RunOnly())


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



async def test_the_last_write_releases_the_lock_in_the_same_step_and_only_its_own(aredis, keys, store,
                                                                                  monkeypatch):
    from orchestrator.locks import RedisLock

    held_at_release: list[bool] = []
    plain_release = RedisLock.release

    async def release(self):  # what the executor's own release finds: already handed over?
        held_at_release.append(self.fencing_token is not None)
        return await plain_release(self)

    monkeypatch.setattr(RedisLock, "release", release)
    steps: list[str] = []
    result = await executor(aredis, keys, store).run(stepping_flow(steps), conversation_id="c9", event=event())
    assert result.status == "succeeded" and steps
    assert await aredis.exists(keys.conversation_lock("c9")) == 0, "released"
    assert held_at_release == [False], "the write released the lock: no separate release was sent"
    # a write whose holder token is not the lock's leaves the lock alone
    await aredis.set(keys.conversation_lock("c9"), "someone-else", px=5_000)
    token = int(await aredis.get(keys.conversation_lock_epoch("c9")))
    await store.apply_delta("c9", {"set": {"x": 1}}, event_id="e-x", fencing_token=token + 1,
                            release=(keys.conversation_lock("c9"), "not-the-holder"))
    assert await aredis.get(keys.conversation_lock("c9")) == b"someone-else"
    assert (await store.get("c9"))["x"] == 1
