"""Real worker processes against a real redis-server: sharing, kill -9, SIGTERM, SIGSTOP,
Redis restarts. Each test counts what was processed, lost and duplicated."""

from __future__ import annotations

import os
import signal
import time

import pytest
import redis

from tests.faults.common import COUNTING_GROUP, publish_jobs
from tests.groups import consumer_pending, group, groups, pending_total
from tests.integration.procs import start_worker, stop, wait_until, worker_env

pytestmark = pytest.mark.slow


def publish(client: redis.Redis, namespace: str, count: int, start: int = 0) -> None:
    publish_jobs(client, namespace, count, start, route_group=COUNTING_GROUP)  # the counting app's route


def seen(client: redis.Redis, namespace: str) -> dict[int, int]:
    return {int(k): int(v) for k, v in client.hgetall(f"{namespace}:test:seen").items()}


def test_two_worker_processes_share_5000_events_each_processed_once(redis_url, namespace, sync_redis,
                                                                    subprocess_env, tmp_path):
    env = worker_env(subprocess_env, redis_url, namespace, concurrency=32)
    publish(sync_redis, namespace, 5000)
    workers = [start_worker(env, tmp_path / f"w{i}.log") for i in range(2)]
    try:
        wait_until(lambda: len(seen(sync_redis, namespace)) == 5000, 90, message="5000 events processed")
        wait_until(lambda: pending_total(sync_redis, namespace) == 0, 10)
    finally:
        codes = [stop(w) for w in workers]
    counts = seen(sync_redis, namespace)
    by_pid = sync_redis.hgetall(f"{namespace}:test:by_pid")
    assert sorted(counts) == list(range(5000))
    assert set(counts.values()) == {1}, "an event was processed twice"
    assert len(by_pid) == 2, "both workers took a share"
    assert codes == [0, 0]


def test_kill_9_one_of_two_workers_loses_nothing(redis_url, namespace, sync_redis, subprocess_env, tmp_path):
    env = worker_env(subprocess_env, redis_url, namespace, concurrency=16,
                     visibility_timeout_ms=1000, TEST_SLEEP_MS=2)
    publish(sync_redis, namespace, 5000)
    victim = start_worker(env, tmp_path / "victim.log")
    survivor = start_worker(env, tmp_path / "survivor.log")
    try:
        wait_until(lambda: len(seen(sync_redis, namespace)) >= 1500, 60, message="a third processed")
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait(10)
        in_flight_at_death = consumer_pending(sync_redis, namespace, victim.pid)
        wait_until(lambda: len(seen(sync_redis, namespace)) == 5000, 90, message="all 5000 processed")
        wait_until(lambda: pending_total(sync_redis, namespace) == 0, 20)
    finally:
        stop(victim)
        code = stop(survivor)
    counts = seen(sync_redis, namespace)
    lost = 5000 - len(counts)
    duplicated = sum(counts.values()) - len(counts)
    print(f"kill -9: lost={lost} duplicated={duplicated} victim_in_flight={in_flight_at_death}")
    assert lost == 0
    assert duplicated <= in_flight_at_death
    assert code == 0


def test_handler_slower_than_visibility_timeout_is_not_stolen(redis_url, namespace, sync_redis,
                                                              subprocess_env, tmp_path):
    env = worker_env(subprocess_env, redis_url, namespace, concurrency=4,
                     visibility_timeout_ms=400, TEST_SLEEP_MS=1500)
    publish(sync_redis, namespace, 4)
    workers = [start_worker(env, tmp_path / f"w{i}.log") for i in range(2)]
    try:
        wait_until(lambda: len(seen(sync_redis, namespace)) == 4, 30, message="4 slow events")
        time.sleep(0.5)
    finally:
        for w in workers:
            stop(w)
    started = sync_redis.lrange(f"{namespace}:test:started", 0, -1)
    assert len(started) == 4, f"an event was started twice: {started}"
    assert set(seen(sync_redis, namespace).values()) == {1}


def test_sigterm_while_busy_finishes_in_flight_work_and_exits_0(redis_url, namespace, sync_redis,
                                                               subprocess_env, tmp_path):
    env = worker_env(subprocess_env, redis_url, namespace, concurrency=4, TEST_SLEEP_MS=1000)
    publish(sync_redis, namespace, 4)
    worker = start_worker(env, tmp_path / "w.log")
    try:
        wait_until(lambda: sync_redis.llen(f"{namespace}:test:started") == 4, 20, message="4 started")
        worker.send_signal(signal.SIGTERM)
        code = worker.wait(20)
    finally:
        stop(worker)
    assert code == 0
    assert len(seen(sync_redis, namespace)) == 4
    assert pending_total(sync_redis, namespace) == 0
    assert sync_redis.hlen(f"{namespace}:workers") == 0  # heartbeat removed on clean exit


def test_second_signal_exits_at_once_and_work_comes_back(redis_url, namespace, sync_redis,
                                                         subprocess_env, tmp_path):
    env = worker_env(subprocess_env, redis_url, namespace, concurrency=2, TEST_SLEEP_MS=30000,
                     visibility_timeout_ms=1000)
    publish(sync_redis, namespace, 2)
    worker = start_worker(env, tmp_path / "w.log")
    try:
        wait_until(lambda: sync_redis.llen(f"{namespace}:test:started") == 2, 20, message="2 started")
        worker.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        worker.send_signal(signal.SIGTERM)
        code = worker.wait(10)
    finally:
        stop(worker)
    assert code == 130
    assert pending_total(sync_redis, namespace) == 2  # not acked, not lost


def test_worker_reconnects_after_redis_restart_and_finishes_backlog(own_redis, namespace, subprocess_env, tmp_path):
    client = redis.Redis.from_url(own_redis.url)
    # the handler itself writes to Redis, so it fails during the outage: on_success makes
    # those events come back instead of being acked as failures
    env = worker_env(subprocess_env, own_redis.url, namespace, concurrency=8, TEST_SLEEP_MS=1,
                     block_ms=500, ack_policy="on_success", visibility_timeout_ms=1000)
    publish(client, namespace, 2000)
    worker = start_worker(env, tmp_path / "w.log")
    try:
        wait_until(lambda: len(seen(client, namespace)) >= 300, 60, message="some processed")
        own_redis.stop()  # down for 3 s: longer than redis-py's own command retries
        time.sleep(3)
        own_redis.start()  # appendonly: the stream and group survive
        client = redis.Redis.from_url(own_redis.url)
        publish(client, namespace, 500, start=2000)  # published after the restart
        wait_until(lambda: len(seen(client, namespace)) == 2500, 90, message="backlog + new events")
        assert worker.poll() is None, "the worker died instead of reconnecting"
    finally:
        code = stop(worker)
    log = (tmp_path / "w.log").read_text()
    # the outage was seen once (not once per failed call), and its end
    assert log.count("redis unreachable (") == 1, log
    assert "redis unreachable: recovered after" in log
    assert code == 0
    counts = seen(client, namespace)
    assert sorted(counts) == list(range(2500))


def test_frozen_worker_does_not_ack_an_entry_another_worker_finished(redis_url, namespace, sync_redis,
                                                                    subprocess_env, tmp_path):
    env = worker_env(subprocess_env, redis_url, namespace, concurrency=1,
                     visibility_timeout_ms=500, TEST_SLEEP_MS=1500)
    publish(sync_redis, namespace, 1)
    frozen = start_worker(env, tmp_path / "frozen.log")
    rescuer = None
    try:
        wait_until(lambda: sync_redis.llen(f"{namespace}:test:started") == 1, 20, message="started")
        os.kill(frozen.pid, signal.SIGSTOP)
        rescuer = start_worker(env, tmp_path / "rescuer.log")
        wait_until(lambda: seen(sync_redis, namespace).get(0) == 1, 30, message="rescuer finished it")
        os.kill(frozen.pid, signal.SIGCONT)
        # the resumed worker learns it lost the entry one of three ways: its lease renewal
        # (handler cancelled), its handler's ownership check, or its owned-ack refusing
        wait_until(lambda: sync_redis.llen(f"{namespace}:test:stale") == 1
                   or any(m in (tmp_path / "frozen.log").read_text()
                          for m in ("lost entry", "not acking", "no longer ours")), 20,
                   message="stale worker gave up")
        time.sleep(0.5)
    finally:
        stop(frozen)
        if rescuer:
            stop(rescuer)
    assert seen(sync_redis, namespace) == {0: 1}, "the effect happened twice"
    assert sync_redis.llen(f"{namespace}:test:started") == 2  # both really ran it
    assert pending_total(sync_redis, namespace) == 0
    assert sync_redis.xlen(f"{{{namespace}:0}}:dead") == 0


def test_once_subscriber_fires_once_across_two_worker_processes(redis_url, namespace, sync_redis,
                                                               subprocess_env, tmp_path):
    env = worker_env(subprocess_env, redis_url, namespace, concurrency=8, TEST_ONCE=1)
    workers = [start_worker(env, tmp_path / f"w{i}.log") for i in range(2)]
    try:  # the once handler is a route of its own: its group must exist before the events come
        wait_until(lambda: {COUNTING_GROUP, group("sub:tests.once-handler")} <= set(groups(sync_redis, namespace)),
                   30, message="both routes' groups")
        publish(sync_redis, namespace, 200)
        wait_until(lambda: len(seen(sync_redis, namespace)) == 200, 30, message="200 processed")
    finally:
        for w in workers:
            stop(w)
    assert sync_redis.llen(f"{namespace}:test:once") == 1


def test_the_consumer_of_a_killed_worker_is_removed_once_its_entries_are_reclaimed(
        redis_url, namespace, sync_redis, subprocess_env, tmp_path):
    """kill -9 of one of two workers: the survivor reclaims its entries, and then removes its
    consumer from the group (nothing pending, idle past dead_consumer_idle_ms); none lost."""
    env = worker_env(subprocess_env, redis_url, namespace, concurrency=4, visibility_timeout_ms=1000,
                     dead_consumer_idle_ms=12000, heartbeat_interval_s=0.5, TEST_SLEEP_MS=20)
    workers = [start_worker(env, tmp_path / f"w{i}.log") for i in range(2)]
    victim, survivor = workers
    try:
        wait_until(lambda: COUNTING_GROUP in groups(sync_redis, namespace), 20, message="the group")
        publish(sync_redis, namespace, 300)
        wait_until(lambda: consumer_pending(sync_redis, namespace, victim.pid) > 0, 20, message="victim busy")
        victim.kill()
        victim.wait(5)
        killed_at = time.monotonic()
        # an operator sees which consumers are live (the victim's heartbeat goes stale in 3 beats)
        env_no_url = {k: v for k, v in env.items()}

        def live_flags() -> dict[str, bool]:
            import json as _json
            import subprocess as _sp
            import sys as _sys
            done = _sp.run([_sys.executable, "-m", "orchestrator.cli", "inspect", "streams", "--json"], env=env_no_url,
                           capture_output=True, text=True, timeout=30)
            rows = _json.loads(done.stdout)[0]["groups"]
            return {c["name"]: c["live"] for g in rows for c in g["consumers"]}

        wait_until(lambda: any(f"-{victim.pid}-" in n and not live for n, live in live_flags().items()), 20,
                   interval=0.5, message="the victim shown not live")
        assert any(f"-{survivor.pid}-" in n and live for n, live in live_flags().items())

        def consumers() -> list[str]:
            return [c["name"].decode() for c in sync_redis.xinfo_consumers(f"{{{namespace}:0}}:events", COUNTING_GROUP)]

        wait_until(lambda: len(seen(sync_redis, namespace)) == 300, 30, message="every event processed")
        took = wait_until(lambda: not any(f"-{victim.pid}-" in c for c in consumers()), 30,
                          message="the dead consumer removed")
        left = consumers()
    finally:
        code = stop(survivor)
    print(f"dead consumer removed {time.monotonic() - killed_at:.1f}s after kill -9 (waited {took:.1f}s)")
    assert len(left) == 1 and f"-{survivor.pid}-" in left[0]
    assert sorted(seen(sync_redis, namespace)) == list(range(300))
    assert pending_total(sync_redis, namespace) == 0 and code == 0
