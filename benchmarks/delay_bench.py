"""Delayed-event benchmarks: how late an event reaches the stream after its due time.

Lateness is the stream entry's time (the ms part of its id, from Redis's clock) minus its due
time (computed from Redis's clock too), in ms.

* ``movers_1`` / ``movers_3``: N events (default 500) due at even intervals over 5 s, all
  scheduled up front, moved by one mover or by three (each with its own client).
* ``idle_remote``: a mover with nothing to do sleeps ``max_sleep_ms`` (1 s); events are
  scheduled one at a time by a client the mover does not share (as another process would),
  each due 50-500 ms later: the lateness a sleeping mover adds when nothing wakes it (with
  ``max_sleep_ms`` 1000, the default, and 100), and what an idle mover costs (round trips/s).

``python -m benchmarks.delay_bench`` runs it alone on a redis-server it starts;
``make bench`` runs it with the others.
"""

from __future__ import annotations

import asyncio
import json
import random
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from orchestrator.broker.connection import create_redis
from orchestrator.broker.delayed import DelayedEvents, DelayMover
from orchestrator.broker.embedded import EmbeddedRedis
from orchestrator.config import load_settings
from orchestrator.events import Event
from orchestrator.keys import Keys


def _delayed(client: Any, namespace: str) -> DelayedEvents:
    return DelayedEvents(client, Keys(namespace), load_settings({"namespace": namespace}))


async def _now_ms(client: Any) -> int:
    secs, micros = await client.time()
    return int(secs) * 1000 + int(micros) // 1000


def _stats(late: list[int]) -> dict[str, Any]:
    late = sorted(late)
    n = len(late)
    return {"events": n, "p50_ms": late[n // 2], "p99_ms": late[min(n - 1, int(n * 0.99))],
            "max_ms": late[-1], "min_ms": late[0]}


async def _lateness(client: Any, keys: Keys, due: dict[str, int]) -> list[int]:
    late = []
    for sid, fields in await client.xrange(keys.events):
        late.append(int(sid.decode().split("-")[0]) - due[fields[b"id"].decode()])
    return late


async def _wait_len(client: Any, keys: Keys, n: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while await client.xlen(keys.events) < n:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {await client.xlen(keys.events)} of {n} events moved within {timeout_s}s")
        await asyncio.sleep(0.05)


async def spread(url: str, movers: int, n: int = 500, over_s: float = 5.0) -> dict[str, Any]:
    namespace = f"bench{uuid.uuid4().hex[:8]}"
    keys = Keys(namespace)
    producer = create_redis(url)
    clients = [create_redis(url) for _ in range(movers)]
    running = [DelayMover(_delayed(c, namespace)) for c in clients]
    try:
        # scheduled before the movers start, so that they find the head due soon and poll:
        # what a busy system sees (idle_remote measures a mover asleep when an event comes)
        delayed = _delayed(producer, namespace)
        start = await _now_ms(producer) + 1000
        due: dict[str, int] = {}
        for i in range(n):
            event = Event("bench.delay", {"i": i})
            due[event.id] = start + int(i * over_s * 1000 / n)
            await delayed.schedule(event, due[event.id])
        for mover in running:
            await mover.start()
        await _wait_len(producer, keys, n, over_s + 30)
        late = await _lateness(producer, keys, due)
        moves = [m.moved for m in running]
    finally:
        for mover in running:
            await mover.stop()
        await producer.delete(keys.events, keys.delayed, keys.delayed_events)
        for c in (producer, *clients):
            await c.aclose()
    if len(late) != n or sum(moves) != n:
        raise RuntimeError(f"expected {n} events moved once, got {len(late)} entries and {sum(moves)} moves")
    return {**_stats(late), "movers": movers, "moves_per_mover": moves}


async def idle_remote(url: str, n: int = 20, max_sleep_ms: int = 1000) -> dict[str, Any]:
    namespace = f"bench{uuid.uuid4().hex[:8]}"
    keys = Keys(namespace)
    producer, mover_client = create_redis(url), create_redis(url)
    mover = DelayMover(_delayed(mover_client, namespace), max_sleep_ms=max_sleep_ms)
    remote = _delayed(producer, namespace)  # not the mover's: nothing wakes it
    rng = random.Random(7)
    try:
        await mover.start()
        due: dict[str, int] = {}
        for i in range(n):
            await asyncio.sleep(rng.uniform(0.0, 0.5))
            event = Event("bench.delay", {"i": i})
            due[event.id] = await _now_ms(producer) + rng.randint(50, 500)
            await remote.schedule(event, due[event.id])
            await _wait_len(producer, keys, i + 1, 10)
        late = await _lateness(producer, keys, due)
    finally:
        await mover.stop()
        await producer.delete(keys.events, keys.delayed, keys.delayed_events)
        for c in (producer, mover_client):
            await c.aclose()
    return {**_stats(late), "max_sleep_ms": mover.max_sleep_ms}


async def idle_calls(url: str, max_sleep_ms: int, seconds: float = 2.0) -> float:
    """Moves (round trips) per second of a mover with nothing scheduled."""
    client = create_redis(url)
    delayed = _delayed(client, f"bench{uuid.uuid4().hex[:8]}")
    real, calls = delayed.move_batch, [0]

    async def counted(limit: int = 100) -> Any:
        calls[0] += 1
        return await real(limit)

    delayed.move_batch = counted  # type: ignore[method-assign]
    mover = DelayMover(delayed, max_sleep_ms=max_sleep_ms)
    await mover.start()
    await asyncio.sleep(seconds)
    await mover.stop()
    await client.aclose()
    return round(calls[0] / seconds, 1)


async def run(url: str) -> dict[str, Any]:
    """Lateness with 1 and 3 movers; events scheduled by another process while the mover idles,
    at the workers' idle look interval (``DELAY_IDLE_POLL_MS``) and at 1 s; idle round trips."""
    from orchestrator.broker.delayed import IDLE_POLL_MS as DELAY_IDLE_POLL_MS

    return {"movers_1": await spread(url, 1), "movers_3": await spread(url, 3),
            f"idle_remote_{DELAY_IDLE_POLL_MS}ms": await idle_remote(url, max_sleep_ms=DELAY_IDLE_POLL_MS),
            "idle_remote_1000ms": await idle_remote(url),
            "idle_mover_moves_per_s": {f"max_sleep_{DELAY_IDLE_POLL_MS}ms": await idle_calls(url, DELAY_IDLE_POLL_MS),
                                       "max_sleep_1000ms": await idle_calls(url, 1000)}}


if __name__ == "__main__":
    from datetime import UTC, datetime

    with tempfile.TemporaryDirectory() as tmp, EmbeddedRedis(Path(tmp) / "redis") as server:
        found = asyncio.run(run(server.url))
    print(json.dumps(found, indent=2))
    results = Path(__file__).resolve().parent / "results"
    results.mkdir(exist_ok=True)
    path = results / f"delay-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}.json"
    path.write_text(json.dumps(found, indent=2) + "\n")
    print(f"written to {path}")
