"""Partitioned event streams on real worker processes: every partition is consumed, at least
once and reclaim hold per partition (kill -9 of a worker loses nothing), conversation order and
memory hold per partition, and a process set to another number of partitions refuses to start."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import redis

from orchestrator import Event, Orchestrator
from orchestrator.broker.partitions import partition_of
from orchestrator.config import load_settings
from orchestrator.keys import Keys
from tests.faults.apps import whole_lines
from tests.faults.common import FAULT_APP
from tests.faults.test_chatflow_processes import APP as CHAT_APP
from tests.faults.test_chatflow_processes import all_done, delta, memory_of, overlaps, runs_of, stop_all
from tests.groups import consumer_pending, pending_total
from tests.integration.apps.chat import build_app
from tests.integration.procs import ROOT, start_worker, wait_until, worker_env

pytestmark = pytest.mark.slow
PARTITIONS = 4


def _settings(redis_url: str, namespace: str, partitions: int = PARTITIONS):
    return load_settings({"redis_url": redis_url, "namespace": namespace, "partitions": partitions})


def publish_jobs(redis_url: str, namespace: str, count: int) -> None:
    """``count`` jobs through a producer app (each to the partition of its event id)."""

    async def go() -> None:
        producer = Orchestrator(mode="producer", settings=_settings(redis_url, namespace))
        try:
            for base in range(0, count, 500):
                events = [Event("job", {"i": i}) for i in range(base, min(base + 500, count))]
                await producer.publish_many(events)
        finally:
            await producer.close()

    asyncio.run(go())


def seen(path: Path) -> Counter[int]:
    """Handler calls of the fault app per job (its ``TEST_OUT`` file: ``i deliveries pid ok``)."""
    if not path.exists():
        return Counter()
    return Counter(int(line.split()[0]) for line in whole_lines(path) if line.endswith(" ok"))


@pytest.mark.timeout(120)
def test_kill_9_of_one_of_two_workers_loses_nothing_in_any_partition(redis_url, namespace, sync_redis,
                                                                      subprocess_env, tmp_path):
    total, out = 4000, tmp_path / "calls.txt"
    env = worker_env(subprocess_env, redis_url, namespace, partitions=PARTITIONS, concurrency=16,
                     visibility_timeout_ms=1000, TEST_OUT=out, TEST_SLEEP_MS=2)
    victim = start_worker(env, tmp_path / "victim.log", app=FAULT_APP)
    survivor = start_worker(env, tmp_path / "survivor.log", app=FAULT_APP)
    try:
        wait_until(lambda: sync_redis.hlen(f"{namespace}:workers") == 2, 20, message="2 workers up")
        publish_jobs(redis_url, namespace, total)
        lengths = [sync_redis.xlen(p.events) for p in Keys(namespace).partitions(PARTITIONS)]
        wait_until(lambda: len(seen(out)) >= total // 3, 60, message="a third processed")
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait(10)
        killed_at = time.monotonic()
        in_flight_at_death = consumer_pending(sync_redis, namespace, victim.pid)
        wait_until(lambda: len(seen(out)) == total, 60, message=f"all {total} processed")
        recovered_s = time.monotonic() - killed_at
        wait_until(lambda: pending_total(sync_redis, namespace) == 0, 20, message="nothing pending")
    finally:
        codes = stop_all([victim, survivor])
    counts = seen(out)
    lost = total - len(counts)
    duplicated = sum(counts.values()) - len(counts)
    print(f"{PARTITIONS} partitions, kill -9: entries per partition {lengths}, lost={lost} "
          f"duplicated={duplicated} (victim held {in_flight_at_death}), all done {recovered_s:.2f} s after the kill")
    assert all(n > total // PARTITIONS // 2 for n in lengths), f"events did not spread over the partitions: {lengths}"
    assert lost == 0
    assert duplicated <= in_flight_at_death
    assert codes[1] == 0


@pytest.mark.timeout(120)
def test_conversations_over_partitions_run_in_order_once_each_across_three_workers(
        redis_url, namespace, sync_redis, subprocess_env, tmp_path):
    conversations = [f"conv-{i}" for i in range(12)]
    per = 30
    env = worker_env(subprocess_env, redis_url, namespace, grace_period_s=2, partitions=PARTITIONS, concurrency=16)
    workers = [start_worker(env, tmp_path / f"w{i}.log", app=CHAT_APP) for i in range(3)]

    async def publish() -> None:
        producer = build_app("producer", settings=_settings(redis_url, namespace))
        try:
            for seq in range(per):
                for cid in conversations:
                    await producer.publish("chat.turn", {"conversation": cid, "seq": seq, "n": delta(cid, seq)})
        finally:
            await producer.close()

    try:
        wait_until(lambda: sync_redis.hlen(f"{namespace}:workers") == 3, 20, message="3 workers up")
        asyncio.run(publish())
        wait_until(lambda: all_done(sync_redis, namespace, conversations, per), 60, interval=0.1,
                   message=f"{len(conversations) * per} chatflow runs")
    finally:
        codes = stop_all(workers)
    used = {partition_of(cid, PARTITIONS) for cid in conversations}
    assert len(used) > 1, "the conversations all hashed to one partition: pick other ids"
    for cid in conversations:
        runs = runs_of(sync_redis, namespace, cid)
        assert [r["seq"] for r in runs] == list(range(per)), f"{cid}: not once each in publish order"
        assert overlaps(runs) == [], f"{cid}: runs overlapped"
        memory = memory_of(redis_url, namespace, cid, builder=lambda *a, **k: build_app(
            "producer", settings=_settings(redis_url, namespace)))
        assert memory["sum"] == sum(delta(cid, s) for s in range(per))
    added = {p.index: int(sync_redis.xinfo_stream(p.events)["entries-added"]) if sync_redis.exists(p.events) else 0
             for p in Keys(namespace).partitions(PARTITIONS)}
    expected = Counter(partition_of(cid, PARTITIONS) for cid in conversations)
    assert added == {p: expected[p] * per for p in range(PARTITIONS)}, "each turn went to its conversation's partition"
    assert codes == [0, 0, 0]


def test_a_worker_set_to_other_partitions_than_the_namespace_recorded_refuses_to_start(
        redis_url, namespace, sync_redis, subprocess_env, tmp_path):
    sync_redis.hset(Keys(namespace).layout, "partitions", 3)
    env = worker_env(subprocess_env, redis_url, namespace, partitions=2)
    proc = subprocess.run([sys.executable, "-m", "workers.cli", "run", "--app", FAULT_APP], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "has 3 stream partition(s)" in proc.stderr and "set to 2" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_the_partition_key_is_the_explicit_key_else_the_conversation_else_the_id(redis_url, namespace):
    client = redis.Redis.from_url(redis_url)

    async def go() -> list[tuple[str, int]]:
        app = build_app("producer", settings=_settings(redis_url, namespace))
        try:
            keyed = await app.publish("chat.turn", {"conversation": "c-a", "seq": 0, "n": 1}, key="tenant-7")
            conv = await app.publish("chat.turn", {"conversation": "c-b", "seq": 0, "n": 1})
            plain = await app.publish("other.thing", {"x": 1})
            return [("tenant-7", keyed.stream_id), ("c-b", conv.stream_id), (plain.id, plain.stream_id)]
        finally:
            await app.close()

    for key, stream_id in asyncio.run(go()):
        part = Keys(namespace).partition(partition_of(key, PARTITIONS))
        assert client.xrange(part.events, stream_id, stream_id), f"{key} is not in {part.events}"
    order = Keys(namespace).partition(partition_of("c-b", PARTITIONS)).conversation_order("c-b", "workers:wf:chat-turns")
    assert client.llen(order) == 1, "the conversation order list lives in the conversation's partition"
