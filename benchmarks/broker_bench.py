"""Issue 2 benchmarks: broker throughput vs a raw redis-py baseline, latency, idle RSS."""

from __future__ import annotations

import asyncio
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import redis
import redis.asyncio as aioredis

from orchestrator import Event, Orchestrator
from orchestrator.events import encode_fields

ROOT = Path(__file__).resolve().parents[1]
PAYLOAD = {"data": "x" * 120}  # ~200-byte encoded entries


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


async def raw_baseline(url: str, n: int) -> dict:
    """XADD pipelined, then XREADGROUP + XACK of the same entries in batches of 100."""
    client = aioredis.Redis.from_url(url)
    stream = "rawbench:events"
    await client.delete(stream)
    await client.xgroup_create(stream, "g", id="0", mkstream=True)
    fields = encode_fields(Event("bench.noop", PAYLOAD))
    t0 = time.perf_counter()
    for start in range(0, n, 500):
        pipe = client.pipeline(transaction=False)
        for _ in range(min(500, n - start)):
            pipe.xadd(stream, fields)
        await pipe.execute()
    t1 = time.perf_counter()
    done = 0
    while done < n:
        reply = await client.xreadgroup("g", "c", {stream: ">"}, count=100)
        ids = [entry_id for entry_id, _ in reply[0][1]]
        await client.xack(stream, "g", *ids)
        done += len(ids)
    t2 = time.perf_counter()
    await client.delete(stream)
    await client.aclose()
    return {"publish_per_s": n / (t1 - t0), "process_per_s": n / (t2 - t1), "entry_bytes": len(fields["body"])}


def start_worker(url: str, namespace: str, concurrency: int, app: str = "benchmarks.apps:noop") -> subprocess.Popen:
    env = dict(os.environ, TOKIWA_REDIS_URL=url, TOKIWA_NAMESPACE=namespace, PYTHONPATH=str(ROOT),
               TOKIWA_LOG_LEVEL="WARNING")
    return subprocess.Popen(
        [sys.executable, "-m", "workers.cli", "run", "--app", app,
         "--concurrency", str(concurrency), "--log-level", "WARNING"],
        cwd=ROOT, env=env,
    )


def wait_ready(client: redis.Redis, namespace: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if client.hlen(f"{namespace}:workers"):
            return
        time.sleep(0.02)
    raise RuntimeError("benchmark worker did not start")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def tokiwa_throughput(url: str, n: int, concurrency: int) -> dict:
    namespace = f"bench{int(time.time() * 1000)}"
    sync = redis.Redis.from_url(url)
    producer = Orchestrator(url, namespace=namespace, mode="producer")
    await producer.connect()
    worker = start_worker(url, namespace, concurrency)
    try:
        wait_ready(sync, namespace)
        await asyncio.sleep(0.5)
        idle_rss = rss_mb(worker.pid)
        events = [Event("bench.noop", PAYLOAD) for _ in range(n)]
        # the worker is frozen while the stream fills, so consumption is timed on its own
        os.kill(worker.pid, signal.SIGSTOP)
        p0 = time.perf_counter()
        for start in range(0, n, 500):
            await producer.publish_many(events[start:start + 500])
        p1 = time.perf_counter()
        stream = f"{{{namespace}:0}}:events"
        t0 = time.perf_counter()
        os.kill(worker.pid, signal.SIGCONT)
        while True:
            info = next(g for g in sync.xinfo_groups(stream) if g["name"] == b"workers")
            if info["pending"] == 0 and (info.get("lag") or 0) == 0:
                break
            await asyncio.sleep(0.005)
        t2 = time.perf_counter()
        latencies = await _latency(producer, sync, namespace)
    finally:
        worker.terminate()
        worker.wait(30)
        await producer.close()
    return {
        "publish_per_s": n / (p1 - p0),
        "process_per_s": n / (t2 - t0),
        "latency_p50_ms": _pct(latencies, 0.5) * 1000,
        "latency_p99_ms": _pct(latencies, 0.99) * 1000,
        "latency_mean_ms": statistics.mean(latencies) * 1000,
        "idle_rss_mb": idle_rss,
        "concurrency": concurrency,
    }


async def _latency(producer: Orchestrator, sync: redis.Redis, namespace: str, count: int = 500) -> list[float]:
    key = f"{namespace}:bench:latency"
    for _ in range(count):
        await producer.publish("bench.latency", None)
        await asyncio.sleep(0.002)
    deadline = time.monotonic() + 30
    while sync.llen(key) < count and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    return [float(x) for x in sync.lrange(key, 0, -1)]


async def run(url: str, n: int = 20_000, concurrency: int = 64) -> dict:
    raw = await raw_baseline(url, n)
    ours = await tokiwa_throughput(url, n, concurrency)
    return {
        "events": n,
        "raw": raw,
        "tokiwa": ours,
        "ratio_process_vs_raw": ours["process_per_s"] / raw["process_per_s"],
        "ratio_publish_vs_raw": ours["publish_per_s"] / raw["publish_per_s"],
    }
