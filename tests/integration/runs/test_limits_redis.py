"""Flow-control limits on a real redis-server: exact across clients, and a killed holder's
concurrency place comes back when its lease ends."""

from __future__ import annotations

import asyncio
import time

from orchestrator import Event
from orchestrator.broker.connection import create_redis
from orchestrator.keys import Keys
from orchestrator.runs.limits import Gate, Limits


def event(i: int, tenant: str = "t1") -> Event:
    e = Event("job", {"i": i, "tenant": tenant})
    e.stream_id, e.group = f"{i}-0", "workers:wf:x"
    return e


async def test_a_killed_holders_place_comes_back_by_lease_expiry(redis_url, namespace):
    keys = Keys(namespace)
    first, second = create_redis(redis_url), create_redis(redis_url)
    limits = Limits(concurrency=1, concurrency_key="tenant")
    holder = Gate(first, keys, "wf:x", limits, lease_ms=600)
    waiter = Gate(second, keys, "wf:x", limits, lease_ms=600)
    try:
        assert await holder.enter(event(1)) == 0
        await holder.close()  # the holder dies: no renewal, no leave
        assert 0 < await waiter.enter(event(2)) <= 600
        assert await waiter.enter(event(3, tenant="t2")) == 0, "another key has its own place"
        t0 = time.monotonic()
        while await waiter.enter(event(2)):
            await asyncio.sleep(0.02)
        came_back = time.monotonic() - t0
        assert came_back < 3.0, came_back  # the 600 ms lease, plus a loaded box
        await waiter.leave(event(2))
    finally:
        await waiter.close()
        await first.aclose()
        await second.aclose()


async def test_a_held_place_is_renewed_while_its_run_lasts(redis_url, namespace):
    keys = Keys(namespace)
    client = create_redis(redis_url)
    gate = Gate(client, keys, "wf:y", Limits(concurrency=1), lease_ms=300)
    try:
        assert await gate.enter(event(1)) == 0
        await asyncio.sleep(0.8)  # past two leases: renewed meanwhile
        assert await gate.enter(event(2)) > 0, "the renewed place was taken by another"
        await gate.leave(event(1))
        assert await gate.enter(event(2)) == 0
    finally:
        await gate.close()
        await client.aclose()


async def test_the_rate_limit_is_exact_for_every_window_across_clients(redis_url, namespace, aredis):
    keys = Keys(namespace)
    clients = [create_redis(redis_url) for _ in range(3)]
    gates = [Gate(c, keys, "wf:z", Limits(rate=(20, 500)), lease_ms=1000) for c in clients]
    taken: list[float] = []

    async def hammer(gate: Gate, base: int) -> None:
        for n in range(40):
            while await gate.enter(event(base + n)):
                await asyncio.sleep(0.005)
            taken.append(time.monotonic())

    try:
        await asyncio.gather(*(hammer(g, k * 100) for k, g in enumerate(gates)))
    finally:
        for c in clients:
            await c.aclose()
    taken.sort()
    busiest = max(sum(1 for t in taken if s <= t < s + 0.45) for s in taken)
    assert len(taken) == 120 and busiest <= 20, busiest
    assert taken[-1] - taken[0] >= (120 - 20) / 40 - 0.2, "faster than 20 per 500 ms"


async def test_a_failure_that_is_not_a_redis_fault_is_logged_not_swallowed(redis_url, namespace, caplog):
    client = create_redis(redis_url)
    gate = Gate(client, Keys(namespace), "wf:w", Limits(concurrency=1), lease_ms=1000)
    try:
        assert await gate.enter(event(1)) == 0

        async def broken(*args):
            raise RuntimeError("a bug in the release")

        gate.redis = type("Broken", (), {"zrem": staticmethod(broken)})()
        await gate.leave(event(1))
    finally:
        await gate.close()
        await client.aclose()
    assert any("releasing a place failed" in r.getMessage() and r.exc_info for r in caplog.records)
