"""AutoPipeline without a server: batching per loop tick, routing of replies and errors,
cancellation, refused commands, closing. fakeredis stands in for Redis."""

from __future__ import annotations

import asyncio

import fakeredis
import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from orchestrator.broker.autopipe import AutoPipeline, shared_pipeline
from orchestrator.errors import InvalidArgumentError, StateError

pytestmark = pytest.mark.timeout(20)


@pytest.fixture
async def pipe():
    client = fakeredis.FakeAsyncRedis()
    ap = AutoPipeline(client)
    yield ap
    await ap.aclose()
    await client.aclose()


async def test_commands_issued_in_one_tick_go_out_as_one_batch(pipe):
    replies = await asyncio.gather(*(pipe.incr("n") for _ in range(50)))
    assert sorted(replies) == list(range(1, 51))
    assert pipe.stats == {"batches": 1, "commands": 50}


async def test_each_caller_gets_its_own_reply_with_redis_py_parsing(pipe):
    await pipe.client.set("s", "v")
    got, missing, added, score = await asyncio.gather(
        pipe.get("s"), pipe.get("nothing"), pipe.zadd("z", {"a": 1.5}), pipe.zscore("z", "a"))
    assert (got, missing, added) == (b"v", None, 1)
    assert score == 1.5  # ZSCORE's reply parsed to a float, as on the client


async def test_a_refused_command_fails_only_its_own_caller(pipe):
    await pipe.client.set("text", "abc")
    results = await asyncio.gather(pipe.incr("text"), pipe.incr("n"), pipe.get("text"), return_exceptions=True)
    assert isinstance(results[0], ResponseError)
    assert results[1:] == [1, b"abc"]
    assert pipe.stats["batches"] == 1


async def test_commands_queued_while_a_batch_is_in_flight_form_the_next_batch(pipe):
    first = asyncio.gather(*(pipe.incr("n") for _ in range(10)))
    await asyncio.sleep(0)  # the first batch is on its way
    second = asyncio.gather(*(pipe.incr("n") for _ in range(5)))
    assert sorted(await first + await second) == list(range(1, 16))
    assert pipe.stats["batches"] == 2


async def test_a_group_is_answered_in_order_and_may_be_reused(pipe):
    group = pipe.pipeline()
    group.set("a", "1").incr("a").get("a")
    assert len(group) == 3
    assert await group.execute() == [True, 2, b"2"]
    assert len(group) == 0
    group.incr("a")
    assert await group.execute() == [3]
    assert await pipe.pipeline().execute() == []


async def test_a_group_raises_its_first_error_or_returns_it_in_place(pipe):
    await pipe.client.set("text", "abc")
    group = pipe.pipeline()
    group.incr("text").incr("n")
    with pytest.raises(ResponseError):
        await group.execute()
    group.incr("text").incr("n")
    errors_in_place = await group.execute(raise_on_error=False)
    assert isinstance(errors_in_place[0], ResponseError)
    assert errors_in_place[1] == 2  # the first group's INCR n ran too: a group is not a transaction


async def test_a_group_cannot_be_a_transaction(pipe):
    with pytest.raises(InvalidArgumentError, match="not a transaction"):
        pipe.pipeline(transaction=True)


@pytest.mark.parametrize("call", [
    lambda p: p.blpop(["q"], timeout=1),
    lambda p: p.xread({"s": "$"}, block=100),
    lambda p: p.xreadgroup("g", "c", {"s": ">"}, block=100),
    lambda p: p.execute_command("WATCH", "k"),
    lambda p: p.execute_command("MULTI"),
    lambda p: p.execute_command("SUBSCRIBE", "ch"),
    lambda p: p.execute_command("CLIENT", "REPLY", "OFF"),
])
async def test_blocking_and_connection_state_commands_are_refused(pipe, call):
    with pytest.raises(InvalidArgumentError, match="cannot be auto-pipelined"):
        call(pipe)
    assert pipe.queued == 0


async def test_a_read_without_block_is_accepted(pipe):
    await pipe.client.xadd("s", {"f": "v"})
    reply = await pipe.xread({"s": "0"}, count=1)
    assert reply[0][1][0][1] == {b"f": b"v"}


async def test_a_command_whose_caller_was_cancelled_before_the_batch_is_never_sent(pipe):
    async def caller(key: str) -> int:
        return await pipe.incr(key)

    doomed = asyncio.create_task(caller("cancelled"))
    kept = asyncio.create_task(caller("kept"))
    await asyncio.sleep(0)  # both callers queued their command; the sender runs next
    doomed.cancel()
    assert await kept == 1
    with pytest.raises(asyncio.CancelledError):
        await doomed
    assert await pipe.client.get("cancelled") is None
    assert pipe.stats["commands"] == 1


class _FailingPipeline:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def pipeline_execute_command(self, *args, **options):
        return self

    async def execute(self, raise_on_error: bool = True):
        raise self.exc


class _FailingClient:
    """A client whose round trips all fail (a lost connection)."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def pipeline(self, transaction: bool = True):
        return _FailingPipeline(self.exc)


async def test_a_failed_round_trip_fails_every_caller_of_the_batch():
    ap = AutoPipeline(_FailingClient(RedisConnectionError("link lost")))  # type: ignore[arg-type]
    results = await asyncio.gather(ap.incr("a"), ap.get("b"), return_exceptions=True)
    assert [type(r) for r in results] == [RedisConnectionError, RedisConnectionError]
    assert ap.stats["batches"] == 0
    # the pipeline stays usable: the next commands make a new batch
    with pytest.raises(RedisConnectionError):
        await ap.incr("a")


async def test_max_in_flight_overlaps_batches():
    client = fakeredis.FakeAsyncRedis()
    ap = AutoPipeline(client, max_batch=10, max_in_flight=3)
    replies = await asyncio.gather(*(ap.incr("n") for _ in range(95)))
    assert sorted(replies) == list(range(1, 96))
    assert ap.stats["batches"] == 10  # at most 10 commands each
    await ap.aclose()
    await client.aclose()


async def test_bad_limits_are_refused():
    with pytest.raises(InvalidArgumentError):
        AutoPipeline(fakeredis.FakeAsyncRedis(), max_batch=0)
    with pytest.raises(InvalidArgumentError):
        AutoPipeline(fakeredis.FakeAsyncRedis(), max_in_flight=0)


async def test_close_sends_what_is_queued_then_refuses_new_commands(pipe):
    pending = asyncio.ensure_future(pipe.incr("n"))
    await asyncio.sleep(0)
    await pipe.aclose()
    assert await pending == 1
    with pytest.raises(StateError, match="closed"):
        pipe.incr("n")
    await pipe.aclose()  # idempotent


async def test_one_shared_pipeline_per_client_and_a_fresh_one_after_close():
    client = fakeredis.FakeAsyncRedis()
    first = shared_pipeline(client)
    assert shared_pipeline(client) is first
    assert shared_pipeline(fakeredis.FakeAsyncRedis()) is not first
    await first.aclose()
    assert shared_pipeline(client) is not first
    await shared_pipeline(client).aclose()
    await client.aclose()


def test_a_pipeline_serves_only_the_loop_it_was_first_used_on():
    ap = AutoPipeline(fakeredis.FakeAsyncRedis())

    async def set_then_get(first: bool):
        return await (ap.set("k", "v") if first else ap.get("k"))

    assert asyncio.run(set_then_get(True)) is True
    with pytest.raises(StateError, match="event loop"):
        asyncio.run(set_then_get(False))


class _ShortPipeline(_FailingPipeline):
    async def execute(self, raise_on_error: bool = True):
        return [1]  # one reply for two commands


class _ShortClient(_FailingClient):
    def pipeline(self, transaction: bool = True):
        return _ShortPipeline(self.exc)


async def test_a_reply_count_that_does_not_match_fails_the_batch_instead_of_hanging():
    ap = AutoPipeline(_ShortClient(RuntimeError("unused")))  # type: ignore[arg-type]
    results = await asyncio.wait_for(asyncio.gather(ap.incr("a"), ap.incr("b"), return_exceptions=True), 5)
    assert all(isinstance(r, StateError) and "1 replies for 2 commands" in str(r) for r in results)
