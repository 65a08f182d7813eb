"""Issue 4 benchmarks: chatflow throughput over many conversations with real worker processes,
and the conversation lock's acquire/release round trip.

- ``chatflow``: 100 conversations x ``per_conversation`` events, published (interleaved) by a
  producer-mode app while 2 worker processes are frozen (SIGSTOP), then timed from SIGCONT
  until every run finished. Each run waits for its conversation's turn, takes the conversation
  lock, loads memory, runs one node, saves the memory delta (fenced), records the run and
  releases. (Chatflow runs take no ``workflow_concurrency`` permit: the worker's
  ``concurrency`` bounds them.)
- ``one_conversation``: the same for a single conversation (strictly serial runs): the cost
  of one turn hand-over, in ms.
- ``lock``: ``RedisLock`` acquire + release (2 Lua scripts, plus starting and stopping the
  renewal task) in µs, next to a bare ``SET NX PX`` + ``DEL`` baseline.

Workers load ``benchmarks.chatflow_bench:bench_app`` (an app factory).
"""

from __future__ import annotations

import asyncio
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import redis
import redis.asyncio as aioredis

from orchestrator import Node, Orchestrator, Workflow
from orchestrator.events import Event
from orchestrator.keys import Keys
from orchestrator.locks import conversation_lock

ROOT = Path(__file__).resolve().parents[1]
EVENT_TYPE = "bench.chat"
WORKERS = 2
CONCURRENCY = 32


def bench_app(mode: str = "worker", **options: Any) -> Orchestrator:
    """The benchmark chatflow app: each run counts its turn in memory and INCRs a done counter."""
    app = Orchestrator(mode=mode, **options)

    async def turn(ctx) -> int:
        ctx.update_memory({"turns": ctx.memory.get("turns", 0) + 1, "last": ctx.input["seq"]})
        await app.redis.incr(f"{app.settings.namespace}:bench:done")
        return ctx.input["seq"]

    app.register_workflow(Workflow(name="bench-chat", type="chatflow", nodes=[Node(name="turn", handler=turn)]),
                          trigger={"type": "event", "event_type": EVENT_TYPE,
                                   "map_conversation_id": lambda e: e.payload["conversation"]})
    return app


def _start_worker(url: str, namespace: str) -> subprocess.Popen:
    env = dict(os.environ, TOKIWA_REDIS_URL=url, TOKIWA_NAMESPACE=namespace, PYTHONPATH=str(ROOT))
    return subprocess.Popen(
        [sys.executable, "-m", "workers.cli", "run", "--app", "benchmarks.chatflow_bench:bench_app",
         "--concurrency", str(CONCURRENCY), "--log-level", "WARNING"], cwd=ROOT, env=env)


def _wait(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.005)
    raise TimeoutError(f"chatflow benchmark: {what} within {timeout_s} s")


async def _publish(url: str, namespace: str, conversations: int, per_conversation: int) -> None:
    producer = bench_app("producer", redis_url=url, namespace=namespace)
    try:
        events = [Event(EVENT_TYPE, {"conversation": f"c{c}", "seq": s})
                  for s in range(per_conversation) for c in range(conversations)]
        for start in range(0, len(events), 500):
            await producer.publish_many(events[start:start + 500])
    finally:
        await producer.close()


def chatflow_throughput(url: str, conversations: int, per_conversation: int) -> dict:
    """Events/s of ``WORKERS`` worker processes over ``conversations`` interleaved conversations."""
    namespace = f"chatbench{int(time.time() * 1000)}"
    total = conversations * per_conversation
    sync = redis.Redis.from_url(url)
    workers = [_start_worker(url, namespace) for _ in range(WORKERS)]
    try:
        _wait(lambda: sync.hlen(f"{namespace}:workers") == WORKERS, 30, "workers did not start")
        for w in workers:
            os.kill(w.pid, signal.SIGSTOP)
        asyncio.run(_publish(url, namespace, conversations, per_conversation))
        started = time.perf_counter()
        for w in workers:
            os.kill(w.pid, signal.SIGCONT)
        _wait(lambda: int(sync.get(f"{namespace}:bench:done") or 0) >= total, 300, f"{total} runs not done")
        elapsed = time.perf_counter() - started
        turns = [int(v) for v in sync.mget([f"{namespace}:bench:done"])]
    finally:
        for w in workers:
            os.kill(w.pid, signal.SIGCONT)
            w.terminate()
        for w in workers:
            w.wait(60)
        sync.close()
    return {"events": total, "conversations": conversations, "seconds": elapsed, "events_per_s": total / elapsed,
            "ms_per_turn_per_conversation": elapsed / per_conversation * 1000, "runs_counted": turns[0],
            "workers": WORKERS, "concurrency": CONCURRENCY}


async def lock_round_trip(url: str, n: int = 2000) -> dict:
    """µs per conversation-lock acquire + release, and a bare SET NX PX + DEL baseline."""
    client = aioredis.Redis.from_url(url)
    keys = Keys(f"lockbench{int(time.time() * 1000)}")
    try:
        for _ in range(50):  # load the scripts, warm the connection
            lock = conversation_lock(client, keys, "warm")
            await lock.acquire()
            await lock.release()
        samples = []
        for i in range(n):
            lock = conversation_lock(client, keys, f"c{i % 100}")
            t0 = time.perf_counter()
            await lock.acquire()
            await lock.release()
            samples.append(time.perf_counter() - t0)
        raw = []
        for i in range(n):
            t0 = time.perf_counter()
            await client.set(f"{keys.namespace}:raw:{i % 100}", "x", nx=True, px=30_000)
            await client.delete(f"{keys.namespace}:raw:{i % 100}")
            raw.append(time.perf_counter() - t0)
    finally:
        await client.aclose()
    samples.sort()
    raw.sort()
    return {"acquire_release_mean_us": statistics.mean(samples) * 1e6,
            "acquire_release_p50_us": samples[len(samples) // 2] * 1e6,
            "acquire_release_p99_us": samples[int(len(samples) * 0.99)] * 1e6,
            "raw_set_nx_del_mean_us": statistics.mean(raw) * 1e6}


def run(url: str, per_conversation: int = 30) -> dict:
    """The suite ``benchmarks/run.py`` calls (``make bench``)."""
    return {
        "chatflow": chatflow_throughput(url, 100, per_conversation),
        "one_conversation": chatflow_throughput(url, 1, 200),
        "lock": asyncio.run(lock_round_trip(url)),
    }


if __name__ == "__main__":
    import json

    from orchestrator.broker.embedded import EmbeddedRedis

    with EmbeddedRedis(Path(os.environ.get("TMPDIR", "/tmp")) / "chatbench-redis") as server:
        print(json.dumps(run(server.url), indent=2))
