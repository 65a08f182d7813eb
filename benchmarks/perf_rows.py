"""The perf suite's measurements (``benchmarks.perf_bench`` runs them as rows): the raw
redis-py loop, a worker draining a queued stream, the reference handler run bare, latency at
low load, and two workers on chatflow or plain events. Each returns a dict of numbers."""

from __future__ import annotations

import asyncio
import contextlib
import random
import statistics
import time
from typing import Any

import redis
import redis.asyncio as aioredis

from orchestrator import Event, Orchestrator
from orchestrator.events import encode_fields
from orchestrator.keys import Keys

from . import perf_apps
from .perf_proc import Worker, wait_count, wait_drained, wait_workers

PAYLOAD = {"data": "x" * 120}  # ~200-byte encoded entries, as in the broker suite
CONCURRENCY = 64
_seq = 0


def _namespace(tag: str) -> str:
    global _seq
    _seq += 1
    return f"perf{tag}{int(time.time())}{_seq}"


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def _median_row(rounds: list[dict[str, float]]) -> dict[str, Any]:
    out: dict[str, Any] = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    out["rounds"] = rounds
    return out


def _commandstats(client: redis.Redis) -> dict[str, int]:
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in client.info("commandstats").items()}


def _calls_per_event(before: dict[str, int], after: dict[str, int], events: int) -> dict[str, float]:
    """Redis commands per event during a round, by command (the bench's own polling left out)."""
    out = {}
    for name, calls in after.items():
        n = calls - before.get(name, 0)
        if n and not name.startswith(("xinfo", "info", "get", "hlen", "llen", "xadd", "evalsha|publish")):
            out[name] = round(n / events, 4)
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


# -- the raw baseline -------------------------------------------------------------------------
async def raw_loop(url: str, n: int, rounds: int) -> dict[str, Any]:
    """XREADGROUP COUNT 500 + one XACK per batch over ``n`` entries, no processing at all."""
    client = aioredis.Redis.from_url(url)
    stream = f"{_namespace('raw')}:events"
    fields = encode_fields(Event(perf_apps.EVENT_TYPE, PAYLOAD))
    out = []
    try:
        for _ in range(rounds):
            await client.delete(stream)
            await client.xgroup_create(stream, "g", id="0", mkstream=True)
            for start in range(0, n, 500):
                pipe = client.pipeline(transaction=False)
                for _ in range(min(500, n - start)):
                    pipe.xadd(stream, fields)  # type: ignore[arg-type]
                await pipe.execute()
            done, t0, c0 = 0, time.perf_counter(), time.process_time()
            while done < n:
                reply = await client.xreadgroup("g", "c", {stream: ">"}, count=500)
                ids = [entry_id for entry_id, _ in reply[0][1]]
                await client.xack(stream, "g", *ids)
                done += len(ids)
            elapsed = time.perf_counter() - t0
            out.append({"per_s": n / elapsed, "cpu_us_per_event": (time.process_time() - c0) / n * 1e6})
        await client.delete(stream)
    finally:
        await client.aclose()
    return _median_row(out)


# -- a worker draining a queued stream -------------------------------------------------------
async def _publish(producer: Orchestrator, events: list[Event]) -> None:
    for start in range(0, len(events), 500):
        await producer.publish_many(events[start:start + 500])


async def worker_rounds(url: str, app: str, n: int, rounds: int, *, loop: str = "asyncio",
                        env: dict[str, str] | None = None, profile: Any = None,
                        profile_events: int | None = None) -> dict[str, Any]:
    """One worker of ``app``: idle RSS, then per round ``n`` events queued while it is stopped
    and timed until drained; ``profile(pid)`` (a context manager) wraps one extra round."""
    namespace = _namespace("w")
    sync = redis.Redis.from_url(url)
    producer = Orchestrator(url, namespace=namespace, mode="producer")
    await producer.connect()
    worker = Worker(url, namespace, app, concurrency=CONCURRENCY, loop=loop, env=env)
    out = []
    try:
        wait_workers(sync, namespace, [worker])
        await asyncio.sleep(1.0)
        idle_rss = worker.rss_mb()
        stream = Keys(namespace).events
        for i in range(rounds + (1 if profile else 0)):
            worker.stop()
            count = (profile_events or n) if i == rounds else n
            await _publish(producer, [Event(perf_apps.EVENT_TYPE, PAYLOAD) for _ in range(count)])
            c0, t0 = worker.cpu_s(), time.perf_counter()
            if i == rounds:  # the extra, profiled round
                worker.resume()
                with profile(worker.pid):
                    wait_drained(sync, stream)
                break
            before = _commandstats(sync)
            worker.resume()
            pending = wait_drained(sync, stream)
            elapsed, cpu = time.perf_counter() - t0, worker.cpu_s() - c0
            calls = _calls_per_event(before, _commandstats(sync), n)
            out.append({"per_s": n / elapsed, "cpu_us_per_event": cpu / n * 1e6,
                        "mean_pending": statistics.mean(pending) if pending else 0.0})
    finally:
        worker.close()
        await producer.close()
        sync.close()
    row = _median_row(out)
    row["idle_rss_mb"] = idle_rss
    row["redis_calls_per_event"] = calls  # of the last measured round
    return row


# -- the reference handler run bare ------------------------------------------------------------
async def _bare(url: str, n: int, tasks: int, autopipe: bool) -> dict[str, float]:
    from orchestrator.broker.autopipe import AutoPipeline

    client = aioredis.Redis.from_url(url)
    target: Any = AutoPipeline(client) if autopipe else client
    keys = perf_apps.ref_keys(_namespace("bare"))
    left = n

    async def run() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await perf_apps.reference_call(target, keys, str(left))

    await asyncio.gather(*(perf_apps.reference_call(target, keys, "warm") for _ in range(tasks)))
    t0, c0 = time.perf_counter(), time.process_time()
    await asyncio.gather(*(run() for _ in range(tasks)))
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    if autopipe:
        await target.aclose()
    await client.delete(*keys)
    await client.aclose()
    return {"per_s": n / elapsed, "cpu_us_per_event": cpu / n * 1e6}


def bare_reference(url: str, n: int, rounds: int, *, loop: str = "asyncio", autopipe: bool = False) -> dict[str, Any]:
    """The reference handler called ``n`` times from 64 asyncio tasks, without tokiwa."""
    runner: Any = asyncio.run
    if loop == "uvloop":
        import uvloop

        runner = uvloop.run
    return _median_row([runner(_bare(url, n, CONCURRENCY, autopipe)) for _ in range(rounds)])


# -- latency at low load ---------------------------------------------------------------------
async def latency(url: str, count: int = 500, *, loop: str = "asyncio") -> dict[str, Any]:
    """``count`` events published one at a time, 1-5 ms apart (uniform), to an idle worker."""
    namespace = _namespace("lat")
    sync = redis.Redis.from_url(url)
    producer = Orchestrator(url, namespace=namespace, mode="producer")
    await producer.connect()
    worker = Worker(url, namespace, "benchmarks.perf_apps:latency", concurrency=CONCURRENCY, loop=loop)
    key = f"{namespace}:perf:latency"
    rng = random.Random(16)
    try:
        wait_workers(sync, namespace, [worker])
        await asyncio.sleep(0.5)
        for _ in range(20):  # warm: connections, scripts
            await producer.publish(perf_apps.EVENT_TYPE, None)
            await asyncio.sleep(0.003)
        wait_count_list(sync, key, 20)
        sync.delete(key)
        for _ in range(count):
            await producer.publish(perf_apps.EVENT_TYPE, None)
            await asyncio.sleep(rng.uniform(0.001, 0.005))
        wait_count_list(sync, key, count)
        samples = [float(x) * 1000 for x in sync.lrange(key, 0, -1)]
    finally:
        worker.close()
        await producer.close()
        sync.close()
    return {"p50_ms": _pct(samples, 0.5), "p99_ms": _pct(samples, 0.99), "max_ms": max(samples),
            "mean_ms": statistics.mean(samples), "events": count}


def wait_count_list(client: redis.Redis, key: str, target: int, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while client.llen(key) < target:
        if time.monotonic() > deadline:
            raise TimeoutError(f"perf bench: {key} has {client.llen(key)} of {target} samples")
        time.sleep(0.01)


# -- chatflows against plain events ------------------------------------------------------------
async def two_workers(url: str, app: str, conversations: int, per_conversation: int,
                      profile: Any = None) -> dict[str, Any]:
    """Two workers of ``app`` (``chat`` or ``plain``); events over ``conversations``
    conversations queued while they are stopped; timed until the done counter says all ran."""
    namespace = _namespace("chat")
    sync = redis.Redis.from_url(url)
    # the chat producer records each conversation's order as it publishes (as a real one does)
    producer = (perf_apps.chat("producer", redis_url=url, namespace=namespace) if app == "chat"
                else Orchestrator(url, namespace=namespace, mode="producer"))
    await producer.connect()
    workers = [Worker(url, namespace, f"benchmarks.perf_apps:{app}", concurrency=CONCURRENCY) for _ in range(2)]
    total = conversations * per_conversation
    try:
        wait_workers(sync, namespace, workers)
        for w in workers:
            w.stop()
        events = [Event(perf_apps.CHAT_TYPE, {"conversation": f"c{c}", "seq": s})
                  for s in range(per_conversation) for c in range(conversations)]
        await _publish(producer, events)
        c0, t0 = sum(w.cpu_s() for w in workers), time.perf_counter()
        before = _commandstats(sync)
        for w in workers:
            w.resume()
        with profile(workers[0].pid) if profile is not None else contextlib.nullcontext():
            wait_count(sync, perf_apps.done_key(namespace), total, procs=[w.proc for w in workers])
        elapsed, cpu = time.perf_counter() - t0, sum(w.cpu_s() for w in workers) - c0
        calls = _calls_per_event(before, _commandstats(sync), total)
    finally:
        for w in workers:
            w.close()
        await producer.close()
        sync.close()
    return {"per_s": total / elapsed, "cpu_us_per_event": cpu / total * 1e6, "events": total,
            "conversations": conversations, "workers": 2, "concurrency": CONCURRENCY,
            "redis_calls_per_event": calls}
