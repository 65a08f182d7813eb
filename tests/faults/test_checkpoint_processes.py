"""Node checkpoints across real worker processes on a real redis-server: a worker killed with
kill -9 while its runs are in their third node, and a worker frozen (SIGSTOP) past its lease.
Node executions are counted outside the workers (``tests/faults/checkpoint_app.py``)."""

from __future__ import annotations

import os
import signal
import time

import msgpack
import pytest
import redis

from orchestrator.events import Event, encode_fields
from orchestrator.keys import Keys
from orchestrator.runs.registry import run_id_for
from orchestrator.workflow.model import Workflow
from tests.groups import ensure_group, group, pending_total
from tests.integration.procs import start_worker, stop, wait_until, worker_env

APP = "tests.faults.checkpoint_app:app"
WORKFLOW = Workflow("order3")  # the app's workflow id comes from its name
NODES = ("charge", "ship", "mail")
pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


def publish(client: redis.Redis, namespace: str, count: int) -> dict[int, str]:
    """XADD ``order.created`` events 0..count-1 (the route's group first); i -> run id."""
    ensure_group(client, namespace, group("wf:order3"))
    pipe = client.pipeline(transaction=False)
    run_ids = {}
    for i in range(count):
        event = Event("order.created", {"i": i})
        run_ids[i] = run_id_for(event, WORKFLOW)
        pipe.xadd(Keys(namespace).events, encode_fields(event))
    pipe.execute()
    return run_ids


def execs(client: redis.Redis, namespace: str) -> dict[tuple[int, str], int]:
    raw = client.hgetall(f"{namespace}:test:execs")
    return {(int(k.split(b":")[0]), k.split(b":")[1].decode()): int(v) for k, v in raw.items()}


def records(client: redis.Redis, namespace: str, run_ids: dict[int, str]) -> dict[int, dict]:
    keys = Keys(namespace)
    pipe = client.pipeline(transaction=False)
    for run_id in run_ids.values():
        pipe.hget(keys.run(run_id), "record")
    raws = pipe.execute()
    return {i: msgpack.unpackb(raw, raw=False) if raw else {} for i, raw in zip(run_ids, raws, strict=True)}


def members(client: redis.Redis, key: str) -> set[int]:
    return {int(x) for x in client.smembers(key)}


def test_kill_9_during_node_3_resumes_every_run_after_its_completed_nodes(redis_url, namespace, sync_redis,
                                                                         subprocess_env, tmp_path):
    env = worker_env(subprocess_env, redis_url, namespace, concurrency=4, visibility_timeout_ms=1000,
                     reclaim_interval_ms=200, block_ms=100, TEST_SLEEP_MS=10)
    run_ids = publish(sync_redis, namespace, 500)
    victim = start_worker({**env, "TEST_ROLE": "victim"}, tmp_path / "victim.log", app=APP)
    survivor = start_worker(env, tmp_path / "survivor.log", app=APP)
    done, hung = f"{namespace}:test:done", f"{namespace}:test:hung"
    try:
        wait_until(lambda: sync_redis.scard(done) >= 100, 60, message="100 runs done")
        sync_redis.set(f"{namespace}:test:hang", 1)  # from now on the victim's runs hang in node 3
        wait_until(lambda: sync_redis.scard(hung) == 4, 30, message="the victim's 4 slots in node 3")
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait(10)
        t0 = time.monotonic()
        wait_until(lambda: sync_redis.scard(done) == 500, 60, message="every run done")
        wait_until(lambda: pending_total(sync_redis, namespace) == 0, 20, message="every entry acked")
        recovered_in = time.monotonic() - t0
    finally:
        stop(victim)
        code = stop(survivor)
    assert code == 0
    counts, found, resumed = execs(sync_redis, namespace), records(sync_redis, namespace, run_ids), members(
        sync_redis, hung)
    assert len(resumed) == 4
    for i in range(500):
        assert counts[(i, "charge")] == 1 and counts[(i, "ship")] == 1, f"run {i}: {counts.get((i, 'ship'))}"
        assert counts[(i, "mail")] >= 1
        record = found[i]
        assert record.get("status") == "succeeded", (i, record.get("status"))
        assert record["nodes"]["mail"]["output"] == {"mailed": (i * 2 + 1) * 10,
                                                     "attempt": 2 if i in resumed else 1}
        if i in resumed:  # the record shows the resume
            assert record["resumed_from"]["nodes"] == ["charge", "ship"]
            assert record["resumed_from"]["attempts"] == {"mail": 1}
            assert f"-{victim.pid}-" in record["resumed_from"]["workers"][0]
            assert [record["nodes"][n]["checkpointed"] for n in NODES] == [True, True, False]
            assert record["nodes"]["mail"]["attempts"] == 2 and counts[(i, "mail")] == 2
            assert f"-{survivor.pid}-" in record["worker_id"]
        else:
            assert record["resumed_from"] is None
    print(f"kill -9 during node 3 of 4 runs: all 500 succeeded, charge and ship ran once each; "
          f"the 4 resumed {recovered_in:.2f}s after the kill")


def test_a_frozen_worker_resumed_after_another_finished_its_run_writes_no_checkpoint_and_no_result(
        redis_url, namespace, sync_redis, subprocess_env, tmp_path):
    env = worker_env(subprocess_env, redis_url, namespace, concurrency=1, visibility_timeout_ms=1000,
                     reclaim_interval_ms=200, block_ms=100)
    [run_id] = publish(sync_redis, namespace, 1).values()
    keys = Keys(namespace)
    frozen = start_worker({**env, "TEST_SHIP_BLOCK_MS": "800"}, tmp_path / "frozen.log", app=APP)
    other = None
    try:
        wait_until(lambda: execs(sync_redis, namespace).get((0, "ship")) == 1, 30, message="ship started")
        os.kill(frozen.pid, signal.SIGSTOP)
        other = start_worker(env, tmp_path / "other.log", app=APP)
        wait_until(lambda: (records(sync_redis, namespace, {0: run_id})[0].get("status") == "succeeded"
                            and pending_total(sync_redis, namespace) == 0), 30, message="the other worker's run")
        nodes_before = sync_redis.hgetall(keys.run_nodes(run_id))
        record_before = sync_redis.hgetall(keys.run(run_id))
        os.kill(frozen.pid, signal.SIGCONT)
        # ship's blocking sleep is long over: it returns at once and its checkpoint write is
        # refused (the fence), unless the worker's lease renewer finds the entry lost first and
        # cancels the run (a Redis call of the write may wait for its connection's health check)
        log = tmp_path / "frozen.log"
        wait_until(lambda: b"writes no checkpoint" in log.read_bytes() or b"lost entry" in log.read_bytes(), 20,
                   message="the frozen worker to go on")
        time.sleep(1.0)  # room for any late write
        fenced = b"writes no checkpoint" in log.read_bytes()
        nodes_after = sync_redis.hgetall(keys.run_nodes(run_id))
        record_after = sync_redis.hgetall(keys.run(run_id))
        assert frozen.poll() is None, "the frozen worker died"
    finally:
        stop(frozen)
        if other is not None:
            stop(other)
    assert nodes_after == nodes_before
    assert record_after == record_before
    record = msgpack.unpackb(record_after[b"record"], raw=False)
    assert record["status"] == "succeeded" and f"-{other.pid}-" in record["worker_id"]
    assert record["resumed_from"]["nodes"] == ["charge"]
    counts = execs(sync_redis, namespace)
    assert counts[(0, "charge")] == 1 and counts[(0, "ship")] == 2 and counts[(0, "mail")] == 1
    print("the thawed worker stopped at " + ("its refused checkpoint write" if fenced else "its lost lease"))
