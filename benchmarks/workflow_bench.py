"""Issue 3 benchmarks: in-process DAG overhead per node, and event-triggered workflows/s
through Redis with one worker process."""

from __future__ import annotations

import asyncio
import statistics
import time

import redis

from orchestrator import Event, Node, Orchestrator, Runner, Workflow

from .broker_bench import start_worker, wait_ready


async def _noop(ctx):
    return None


def chain(n: int) -> Workflow:
    nodes = [Node(name="n0", handler=_noop)]
    for i in range(1, n):
        nodes.append(Node(name=f"n{i}", handler=_noop, depends_on=[f"n{i - 1}"]))
    return Workflow(name=f"chain-{n}", nodes=nodes)


def wide(n: int) -> Workflow:
    root = Node(name="root", handler=_noop)
    leaves = [Node(name=f"leaf{i}", handler=_noop, depends_on=["root"]) for i in range(n - 2)]
    sink = Node(name="sink", handler=_noop, depends_on=[leaf.name for leaf in leaves])
    return Workflow(name=f"wide-{n}", nodes=[root, *leaves, sink])


async def per_node_us(workflow: Workflow, concurrency: int, rounds: int = 100) -> float:
    runner = Runner()
    n = len(workflow.nodes)
    for _ in range(5):  # warm up
        await runner.run(workflow, concurrency=concurrency)
    samples = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        result = await runner.run(workflow, concurrency=concurrency)
        samples.append((time.perf_counter() - t0) / n * 1e6)
        assert result.status == "succeeded"
    return statistics.median(samples)


async def through_redis(url: str, n: int) -> dict:
    namespace = f"wfbench{int(time.time() * 1000)}"
    sync = redis.Redis.from_url(url)
    producer = Orchestrator(url, namespace=namespace, mode="producer")
    await producer.connect()
    worker = start_worker(url, namespace, 64, app="benchmarks.apps:flows")
    try:
        wait_ready(sync, namespace)
        import os
        import signal

        os.kill(worker.pid, signal.SIGSTOP)  # fill the stream first, then time the worker alone
        events = [Event("bench.flow", {"i": i}) for i in range(n)]
        for start in range(0, n, 500):
            await producer.publish_many(events[start:start + 500])
        t0 = time.perf_counter()
        os.kill(worker.pid, signal.SIGCONT)
        while True:
            info = next(g for g in sync.xinfo_groups(f"{{{namespace}:0}}:events") if g["name"] == b"workers")
            if info["pending"] == 0 and (info.get("lag") or 0) == 0:
                break
            await asyncio.sleep(0.005)
        elapsed = time.perf_counter() - t0
        runs = sync.zcard(f"{{{namespace}:runs}}")
    finally:
        worker.terminate()
        worker.wait(30)
        await producer.close()
    return {"workflows": n, "workflows_per_s": n / elapsed, "runs_recorded": runs}


async def run(url: str) -> dict:
    return {
        "in_process_us_per_node": {
            "chain_100": await per_node_us(chain(100), concurrency=4),
            "wide_100_c4": await per_node_us(wide(100), concurrency=4),
            "wide_100_c100": await per_node_us(wide(100), concurrency=100),
        },
        "redis_three_node": await through_redis(url, 2000),
    }
