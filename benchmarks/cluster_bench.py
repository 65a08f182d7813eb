"""Redis Cluster benchmarks: a local cluster of 3 masters and 3 replicas against one Redis.

For one Redis and for the cluster, with 1, 3 and 6 event partitions (``Settings.partitions``):

The cluster cases use a namespace whose partitions spread evenly over the masters (P=3: one
per master, P=6: two each).

* ``events/s``: E no-op events (``benchmarks.apps:noop``, ~200-byte entries) published with
  ``publish_many`` (500 per call) before any worker runs, then ``W`` worker processes
  (``tokiwa-worker run --concurrency 64``) are started and timed from their first read until
  every group of every partition has nothing pending or undelivered (workers are not frozen
  with SIGSTOP as in the broker suite: on a cluster, the timeouts a frozen client meets when it
  thaws make redis-py reload the slot map and drop its connections, which is measured by the
  failover test, not here);
* ``commands per master``: the ``INFO commandstats`` calls each master served from the start
  of the workers until drained, per event, with the commands that make most of them;
* ``Redis CPU per master``: ``used_cpu_sys + used_cpu_user`` (``INFO cpu``) of each master over
  the consume phase, as a share of one core and in µs per event; the workers' own CPU
  (``/proc/<pid>/stat``) beside it, in µs per event;
* ``memory per queued event``: ``used_memory`` summed over the masters after the E events were
  published (workers frozen) minus before, per event; and, key by key, ``MEMORY USAGE`` of the
  partition streams per event and of one publish-once marker (held ``publish_dedup_ms``);

and, once per target, ``memory per conversation``: C conversations of two chatflow turns each
(in-process app), then ``MEMORY USAGE`` of every key of a sample of them (memory snapshot,
deltas, applied ids, lock epoch), per conversation.

On the project's 2-core box every Redis process and every worker share the same two cores, so
absolute rates are the workers' (CPU-bound) rates; the per-master Redis CPU is what shows the
headroom (docs/scaling.md builds its model from it).

``python -m benchmarks.cluster_bench [--events N] [--workers W]`` writes
``benchmarks/results/cluster-<utc time>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis

from orchestrator import Event, Node, Orchestrator, Workflow
from orchestrator.broker.connection import create_sync_redis
from orchestrator.broker.embedded import EmbeddedRedis
from orchestrator.keys import Keys
from tests.cluster.local import LocalCluster

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
PAYLOAD = {"data": "x" * 120}  # ~200-byte encoded entries, as in the broker suite
PARTITIONS = (1, 3, 6)
CONCURRENCY = 64
CONVERSATIONS = 500
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
#: the benchmark's own reads (drain polling, memory, stats, replication chatter), not counted
OWN_COMMANDS = {"xinfo|groups", "xinfo|stream", "memory|usage", "info", "replconf", "ping", "cluster|nodes"}


# -- what each master says --------------------------------------------------------------------
def _masters(target: Any) -> list[tuple[str, int]]:
    if isinstance(target, LocalCluster):
        return [("127.0.0.1", m.port) for m in target.masters()]
    return [("127.0.0.1", target.port)]


def _info(host: str, port: int, section: str) -> dict[str, Any]:
    client = redis.Redis(host=host, port=port)
    try:
        return client.info(section)
    finally:
        client.close()


def snapshot(masters: list[tuple[str, int]]) -> dict[str, dict[str, Any]]:
    """Per master: commandstats calls by command, CPU seconds, used memory bytes."""
    out = {}
    for host, port in masters:
        stats = _info(host, port, "commandstats")
        cpu = _info(host, port, "cpu")
        memory = _info(host, port, "memory")
        out[f"{host}:{port}"] = {
            "calls": {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()},
            "cpu_s": float(cpu["used_cpu_sys"]) + float(cpu["used_cpu_user"]),
            "used_memory": int(memory["used_memory"]),
        }
    return out


def per_master(before: dict[str, Any], after: dict[str, Any], events: int, seconds: float) -> dict[str, Any]:
    rows = {}
    for name, end in after.items():
        start = before[name]
        calls = {c: n - start["calls"].get(c, 0) for c, n in end["calls"].items()}
        calls = {c: n for c, n in calls.items() if n > 0 and c not in OWN_COMMANDS}
        total = sum(calls.values())
        cpu = end["cpu_s"] - start["cpu_s"]
        rows[name] = {
            "commands": total, "commands_per_event": round(total / events, 3),
            "top_commands": dict(sorted(calls.items(), key=lambda kv: -kv[1])[:6]),
            "cpu_s": round(cpu, 3), "cpu_share_of_core": round(cpu / seconds, 3),
            "cpu_us_per_event": round(cpu / events * 1e6, 2),
        }
    return rows


def proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime


def queued_key_bytes(client: Any, keys: Keys, partitions: int, events: list[Event]) -> dict[str, float]:
    """``MEMORY USAGE`` of the partition streams (every entry counted) and of a sample of the
    publish-once markers (one per event while ``publish_dedup_ms`` lasts)."""
    stream = sum(client.memory_usage(keys.partition(p).events, samples=0) or 0 for p in range(partitions))
    markers = []
    for event in events[:: max(1, len(events) // 50)]:
        for p in range(partitions):
            size = client.memory_usage(keys.published(event.id, p))
            if size:
                markers.append(size)
                break
    return {"stream": float(stream), "marker": sum(markers) / len(markers) if markers else 0.0}


# -- one throughput case ----------------------------------------------------------------------
def start_worker(url: str, namespace: str, partitions: int) -> subprocess.Popen:
    env = dict(os.environ, TOKIWA_REDIS_URL=url, TOKIWA_NAMESPACE=namespace, TOKIWA_PARTITIONS=str(partitions),
               PYTHONPATH=str(ROOT), TOKIWA_LOG_LEVEL="WARNING", TOKIWA_STATE_DIR=tempfile.mkdtemp())
    return subprocess.Popen([sys.executable, "-m", "workers.cli", "run", "--app", "benchmarks.apps:noop",
                             "--concurrency", str(CONCURRENCY), "--log-level", "WARNING"], cwd=ROOT, env=env)


def drained(client: Any, keys: Keys, partitions: int) -> bool:
    for p in range(partitions):
        for group in client.xinfo_groups(keys.partition(p).events):
            if int(group["pending"]) or int(group.get("lag") or 0):
                return False
    return True


def wait_for(check: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.005)
    raise RuntimeError(f"timed out after {timeout_s}s waiting for {what}")


def balanced_namespace(target: Any, partitions: int) -> str:
    """A fresh namespace whose partitions spread evenly over the cluster's masters (a
    partition's slot, and so its master, follows from its hash tag ``{ns:p}``)."""
    while True:
        namespace = f"cb{uuid.uuid4().hex[:8]}"
        if not isinstance(target, LocalCluster):
            return namespace
        masters = target.masters()
        count = {m.port: 0 for m in masters}
        for p in range(partitions):
            count[target.master_of(Keys(namespace).partition(p).events).port] += 1
        if max(count.values()) - min(count.values()) <= (1 if partitions >= len(masters) else len(masters)):
            if partitions < len(masters) or min(count.values()) > 0:
                return namespace


def started_reading(client: Any, keys: Keys, partitions: int) -> bool:
    for p in range(partitions):
        for group in client.xinfo_groups(keys.partition(p).events):
            if int(group.get("entries-read") or 0) or int(group["pending"]):
                return True
    return False


async def throughput(target: Any, url: str, partitions: int, events: int, workers: int) -> dict[str, Any]:
    """Fill the partitions with no worker running, then start the workers and time them from
    their first read until every group is drained."""
    namespace = balanced_namespace(target, partitions)
    keys = Keys(namespace)
    client = create_sync_redis(url)
    producer = Orchestrator(url, namespace=namespace, mode="producer", partitions=partitions)
    await producer.connect()
    masters = _masters(target)
    procs: list[subprocess.Popen] = []
    try:
        batch = [Event("bench.noop", PAYLOAD) for _ in range(events)]
        empty = snapshot(masters)
        p0 = time.perf_counter()
        for start in range(0, events, 500):
            await producer.publish_many(batch[start:start + 500])
        publish_s = time.perf_counter() - p0
        time.sleep(0.5)  # replication buffers drain before memory is read
        held = queued_key_bytes(client, keys, partitions, batch)
        full = snapshot(masters)
        procs = [start_worker(url, namespace, partitions) for _ in range(workers)]
        wait_for(lambda: started_reading(client, keys, partitions), 60, "the workers' first read")
        t0 = time.perf_counter()
        cpu0 = sum(proc_cpu_s(p.pid) for p in procs)
        wait_for(lambda: drained(client, keys, partitions), 300, "the workers to drain")
        seconds = time.perf_counter() - t0
        worker_cpu = sum(proc_cpu_s(p.pid) for p in procs) - cpu0
        done = snapshot(masters)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(30)
        await producer.close()
        client.close()
    queued = sum(full[m]["used_memory"] - empty[m]["used_memory"] for m in full)
    masters_rows = per_master(full, done, events, seconds)
    publish_rows = per_master(empty, full, events, publish_s)
    return {
        "partitions": partitions, "events": events, "workers": workers,
        "publish_per_s": round(events / publish_s), "events_per_s": round(events / seconds),
        "consume_s": round(seconds, 3),
        "memory_per_queued_event_bytes": round(queued / events, 1),
        "stream_bytes_per_event": round(held["stream"] / events, 1),
        "marker_bytes_per_event": round(held["marker"], 1),
        "redis_cpu_us_per_event": round(sum(r["cpu_us_per_event"] for r in masters_rows.values()), 2),
        "redis_publish_cpu_us_per_event": round(sum(r["cpu_us_per_event"] for r in publish_rows.values()), 2),
        "redis_commands_per_event": round(sum(r["commands_per_event"] for r in masters_rows.values()), 3),
        "worker_cpu_us_per_event": round(worker_cpu / events * 1e6, 2),
        "worker_cpu_share_of_core": round(worker_cpu / seconds, 3),
        "masters": masters_rows,
        "publish_masters": publish_rows,
    }


# -- conversations ----------------------------------------------------------------------------
async def conversation_memory(url: str, conversations: int) -> dict[str, Any]:
    """Bytes per conversation after two chatflow turns each (its memory keys only)."""
    namespace = f"cv{uuid.uuid4().hex[:8]}"
    app = Orchestrator(url, namespace=namespace, mode="all", max_concurrent_events=64)

    async def turn(ctx: Any) -> None:
        ctx.update_memory({"turns": ctx.memory.get("turns", 0) + 1, "last": ctx.event.payload["text"]})

    app.register_workflow(Workflow("bench-chat", type="chatflow", nodes=[Node("turn", turn)]),
                          trigger={"type": "event", "event_type": "bench.chat", "conversation_key": "cid"})
    async with app:
        for seq in range(2):
            await app.publish_many([Event("bench.chat", {"cid": f"c{n}", "text": f"message {seq} of c{n}"})
                                    for n in range(conversations)])
        await app.drain(timeout=300)
        sample = [f"c{n}" for n in range(0, conversations, max(1, conversations // 50))]
        keys = app.keys
        total, families = 0, {}
        for cid in sample:
            for name, key in (("memory", keys.conversation(cid)), ("deltas", keys.conversation_deltas(cid)),
                              ("applied", keys.conversation_applied(cid)), ("lock", keys.conversation_lock(cid)),
                              ("lock_epoch", keys.conversation_lock_epoch(cid))):
                size = await app.redis.memory_usage(key) or 0
                families[name] = families.get(name, 0) + size
                total += size
    return {"conversations": conversations, "turns_each": 2, "sampled": len(sample),
            "bytes_per_conversation": round(total / len(sample), 1),
            "by_key": {k: round(v / len(sample), 1) for k, v in families.items()}}


# -- the whole run ----------------------------------------------------------------------------
async def run_target(name: str, target: Any, url: str, events: int, workers: int) -> dict[str, Any]:
    cases = []
    for partitions in PARTITIONS:
        case = await throughput(target, url, partitions, events, workers)
        print(f"  {name:7} P={partitions}: {case['events_per_s']:>6} ev/s, publish {case['publish_per_s']:>6}/s, "
              f"Redis {case['redis_cpu_us_per_event']} µs/ev ({case['redis_commands_per_event']} cmds/ev; publishing "
              f"{case['redis_publish_cpu_us_per_event']} µs/ev), "
              f"workers {case['worker_cpu_us_per_event']} µs/ev, {case['memory_per_queued_event_bytes']} B/queued "
              f"(stream {case['stream_bytes_per_event']} + marker {case['marker_bytes_per_event']})",
              flush=True)
        cases.append(case)
    conv = await conversation_memory(url, CONVERSATIONS)
    print(f"  {name:7} conversation memory: {conv['bytes_per_conversation']} B each", flush=True)
    return {"cases": cases, "conversation_memory": conv}


def table(report: dict[str, Any]) -> str:
    lines = ["target   P  events/s  publish/s  Redis µs/ev (consume+publish)  cmds/ev  worker µs/ev  B/queued ev"
             "  busiest master CPU"]
    for name in ("single", "cluster"):
        for case in report[name]["cases"]:
            busiest = max(r["cpu_share_of_core"] for r in case["masters"].values())
            redis_us = f"{case['redis_cpu_us_per_event']} + {case['redis_publish_cpu_us_per_event']}"
            lines.append(f"{name:8} {case['partitions']:<2} {case['events_per_s']:>8} {case['publish_per_s']:>10} "
                         f"{redis_us:>30} {case['redis_commands_per_event']:>8} "
                         f"{case['worker_cpu_us_per_event']:>13} {case['memory_per_queued_event_bytes']:>12} "
                         f"{busiest:>10.2f} core")
        conv = report[name]["conversation_memory"]
        lines.append(f"{name:8} memory per conversation (2 turns): {conv['bytes_per_conversation']} B {conv['by_key']}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20_000, help="events per case (default 20000)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    args = parser.parse_args()
    report: dict[str, Any] = {"machine": {"python": platform.python_version(), "cpu_count": os.cpu_count(),
                                          "platform": platform.platform()}, "started": time.time(),
                              "concurrency": CONCURRENCY}
    with tempfile.TemporaryDirectory() as tmp:
        with EmbeddedRedis(Path(tmp) / "single") as server:
            print("one Redis", flush=True)
            report["single"] = asyncio.run(run_target("single", server, server.url, args.events, args.workers))
        with LocalCluster(Path(tmp) / "cluster") as cluster:
            print(f"cluster of {len(cluster.masters())} masters (+ replicas)", flush=True)
            report["cluster"] = asyncio.run(run_target("cluster", cluster, cluster.url, args.events, args.workers))
    print(table(report))
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"cluster-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written to {path}")


if __name__ == "__main__":
    main()
