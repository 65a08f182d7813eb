"""The cost of node checkpoints (durable runs): µs per node with and without them.

* ``chain_100``: a 100-node no-op chain (``async def`` nodes), one run at a time, in process on
  a real redis-server: the worker-side path of a run taken from the stream
  (``WorkflowRegistry.execute``: the record's claim and the checkpoint read, the run, the final
  record), median of the runs, per node. Beside it the plain Runner (no Redis, no records).
* ``three_node_c64`` / ``three_node_c1``: event-triggered three-node no-op workflows through
  Redis with one worker process (``benchmarks/checkpoint_apps.py``) at concurrency 64 and 1: the
  stream is filled while the worker is frozen (SIGSTOP), then timed from SIGCONT until its group
  has nothing pending or undelivered; µs per node = elapsed / (workflows x 3); best of 2 rounds.

A checkpointed node costs two awaited round trips (its attempt's start, its success) and the
run one claim and one read; ``python -m benchmarks.checkpoint_bench`` runs it alone on a
redis-server it starts, prints a table and writes ``results/checkpoint-<UTC time>.json``.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import redis

from orchestrator import Node, Orchestrator, Runner, Workflow
from orchestrator.broker.embedded import EmbeddedRedis
from orchestrator.events import Event, encode_fields
from orchestrator.keys import Keys

ROOT = Path(__file__).resolve().parents[1]


async def _noop(ctx: Any) -> dict[str, bool]:
    return {"ok": True}


def chain(name: str, n: int, checkpoint: bool) -> Workflow:
    nodes = [Node("n0", _noop)] + [Node(f"n{i}", _noop, [f"n{i - 1}"]) for i in range(1, n)]
    return Workflow(name, nodes, checkpoint=checkpoint)


def _delivered(i: int) -> Event:
    """An event as a worker's consumer hands it over (a stream entry, first delivery)."""
    event = Event("bench.chain", {"i": i})
    event.stream_id, event.group, event.deliveries = f"{1700000000000 + i}-0", "bench", 1
    return event


async def chain_per_node_us(url: str, n: int = 100, runs: int = 40) -> dict[str, float]:
    """Runs of the two variants alternate, so that load from elsewhere on the box hits both."""
    app = Orchestrator(url, namespace=f"ckbench{uuid.uuid4().hex[:6]}")
    await app.connect()
    samples: dict[str, list[float]] = {"without": [], "with": []}
    try:
        regs = {label: app.workflows.get(app.register_workflow(chain(f"chain-{label}", n, label == "with")).name)
                for label in samples}
        for i in range(runs + 5):
            for label, reg in regs.items():
                t0 = time.perf_counter()
                result = await app.workflows.execute(reg, event=_delivered(i), run_id=f"{label}-{i}", input=None,
                                                     context=None, conversation_id=None)
                if i >= 5:  # warm up
                    samples[label].append((time.perf_counter() - t0) / n * 1e6)
                if result.status != "succeeded":
                    raise RuntimeError(f"chain run {i} {result.status}")
        found = {label: round(statistics.median(values), 1) for label, values in samples.items()}
        writes = app.workflows._checkpoints.writes
        if writes != 2 * n * (runs + 5):
            raise RuntimeError(f"expected {2 * n * (runs + 5)} checkpoint writes, saw {writes}")
    finally:
        await app.close()
    runner, plain = Runner(), chain("chain-runner", n, False)
    samples = []
    for i in range(runs + 5):
        t0 = time.perf_counter()
        await runner.run(plain)
        if i >= 5:
            samples.append((time.perf_counter() - t0) / n * 1e6)
    found["runner_only"] = round(statistics.median(samples), 1)
    return found


def _start_worker(url: str, namespace: str, concurrency: int) -> subprocess.Popen:
    env = dict(os.environ, TOKIWA_REDIS_URL=url, TOKIWA_NAMESPACE=namespace, PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-m", "workers.cli", "run", "--app", "benchmarks.checkpoint_apps:app",
                             "--concurrency", str(concurrency), "--log-level", "WARNING"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL)  # no trace line per run


def _group_done(client: redis.Redis, keys: Keys, group: str) -> bool:
    for g in client.xinfo_groups(keys.events):
        if g["name"].decode() == group:
            return int(g["pending"]) == 0 and int(g.get("lag") or 0) == 0
    return False


def three_node_through_redis(url: str, event_type: str, workflow: str, n: int, concurrency: int) -> dict[str, Any]:
    namespace = f"ckbench{uuid.uuid4().hex[:6]}"
    keys, client = Keys(namespace), redis.Redis.from_url(url)
    worker = _start_worker(url, namespace, concurrency)
    try:
        deadline = time.monotonic() + 30
        while not client.hlen(keys.workers):
            if time.monotonic() > deadline:
                raise RuntimeError("benchmark worker did not start")
            time.sleep(0.02)
        os.kill(worker.pid, signal.SIGSTOP)  # fill the stream first, then time the worker alone
        pipe = client.pipeline(transaction=False)
        for i in range(n):
            pipe.xadd(keys.events, encode_fields(Event(event_type, {"i": i})))
        pipe.execute()
        t0 = time.perf_counter()
        os.kill(worker.pid, signal.SIGCONT)
        while not _group_done(client, keys, f"workers:wf:{workflow}"):
            time.sleep(0.005)
        elapsed = time.perf_counter() - t0
        runs = client.zcard(keys.runs)
    finally:
        os.kill(worker.pid, signal.SIGCONT)
        worker.terminate()
        worker.wait(30)
        client.close()
    return {"workflows": n, "workflows_per_s": round(n / elapsed), "us_per_node": round(elapsed / (n * 3) * 1e6, 1),
            "runs_recorded": runs}


def run(url: str, rounds: int = 2) -> dict[str, Any]:
    """Each through-Redis variant runs ``rounds`` times, alternating; the best round counts
    (the box is shared: the slower rounds measure the neighbours)."""
    found: dict[str, Any] = {"chain_100": asyncio.run(chain_per_node_us(url))}
    for label, concurrency, n in (("three_node_c64", 64, 2000), ("three_node_c1", 1, 500)):
        tries: dict[str, list[dict[str, Any]]] = {"without": [], "with": []}
        for _ in range(rounds):
            tries["without"].append(three_node_through_redis(url, "bench.plain", "bench-plain3", n, concurrency))
            tries["with"].append(three_node_through_redis(url, "bench.ck", "bench-ck3", n, concurrency))
        found[label] = {variant: min(rows, key=lambda r: r["us_per_node"]) for variant, rows in tries.items()}
    return found


def table(found: dict[str, Any]) -> str:
    chain_100 = found["chain_100"]
    rows = [("100-node chain, in process, one run at a time", chain_100["without"], chain_100["with"],
             f"Runner alone {chain_100['runner_only']}")]
    for label, what in (("three_node_c64", "3-node event-triggered, 1 worker, concurrency 64"),
                        ("three_node_c1", "3-node event-triggered, 1 worker, concurrency 1")):
        off, on = found[label]["without"], found[label]["with"]
        rows.append((what, off["us_per_node"], on["us_per_node"],
                     f"{off['workflows_per_s']} -> {on['workflows_per_s']} wf/s"))
    lines = [f"{'measure':<52} {'µs/node without':>16} {'with':>8} {'extra':>8}  note"]
    for what, off, on, note in rows:
        lines.append(f"{what:<52} {off:>16} {on:>8} {on - off:>8.1f}  {note}")
    return "\n".join(lines)


if __name__ == "__main__":
    from datetime import UTC, datetime

    with tempfile.TemporaryDirectory() as tmp, EmbeddedRedis(Path(tmp) / "redis") as server:
        results = run(server.url)
    print(table(results))
    folder = Path(__file__).resolve().parent / "results"
    folder.mkdir(exist_ok=True)
    path = folder / f"checkpoint-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"written to {path}")
