"""Live run records from real worker processes, read by a real ``tokiwa-producer inspect``
process: a run triggered by name shows ``running`` (its first node running) while it runs and
``succeeded`` after; a workflow timeout leaves ``timed_out``; SIGTERM of a worker with a grace
period of 0 during a run leaves ``cancelled``. Each test bounds its own time."""

from __future__ import annotations

import json
import signal
import time

import pytest

from tests.faults.test_fleet import groups_exist, live_groups
from tests.faults.test_fleet_calls import cli, record
from tests.integration.procs import start_worker, stop, wait_until, worker_env

LIVE_APP = "tests.faults.live_app:app"
pytestmark = pytest.mark.timeout(90)


def start(subprocess_env, redis_url, namespace, tmp_path, name: str, **settings):
    env = worker_env(subprocess_env, redis_url, namespace, TEST_OUT=tmp_path / "runs.txt", TEST_EXTRAS=1,
                     block_ms=100, heartbeat_interval_s=0.5, **settings)
    return start_worker(env, tmp_path / f"{name}.log", app=LIVE_APP)


def ready(sync_redis, namespace, worker) -> None:
    wait_until(lambda: groups_exist(sync_redis, namespace, "wf:fleet-slow", "wf:live-timeout")
               and bool(live_groups(sync_redis, namespace, worker.pid)), 30, message="the worker")


def inspect_runs(redis_url, namespace, *args: str) -> list[dict]:
    done = cli(redis_url, namespace, "inspect", "runs", "list", "--json", *args)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def trigger(redis_url, namespace, name: str, payload: dict) -> str:
    done = cli(redis_url, namespace, "trigger", name, "--input", json.dumps(payload))
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)["run_id"]


def test_a_triggered_run_shows_running_then_succeeded(redis_url, namespace, sync_redis, subprocess_env, tmp_path):
    worker = start(subprocess_env, redis_url, namespace, tmp_path, "w")
    try:
        ready(sync_redis, namespace, worker)
        t0 = time.monotonic()
        run_id = trigger(redis_url, namespace, "fleet-slow", {"sleep_s": 5})
        wait_until(lambda: (record(sync_redis, namespace, run_id) or {}).get("nodes", {}).get("begin", {})
                   .get("status") == "running", 10, message="the running record")
        (row,) = [r for r in inspect_runs(redis_url, namespace, "--status", "running") if r["run_id"] == run_id]
        seen_in = time.monotonic() - t0
        assert row["status"] == "running" and row["workflow"] == "fleet-slow"
        assert row["task_summary"]["begin"]["state"] == "running"
        assert row["task_summary"]["after"]["state"] == "pending"
        live = record(sync_redis, namespace, run_id)
        assert live["worker_id"] and live["updated_at"] and live["owner_token"]
        shown = cli(redis_url, namespace, "inspect", "runs", "show", run_id)
        assert shown.returncode == 0 and "status running" in shown.stdout and f"worker {live['worker_id']}" in shown.stdout
        wait_until(lambda: (record(sync_redis, namespace, run_id) or {}).get("status") == "succeeded", 20,
                   message="the run to end")
        assert [r["run_id"] for r in inspect_runs(redis_url, namespace, "--status", "succeeded")] == [run_id]
        assert inspect_runs(redis_url, namespace, "--status", "running") == []
        assert record(sync_redis, namespace, run_id)["owner_token"] == live["owner_token"]
    finally:
        assert stop(worker) == 0
    print(f"running record seen by a CLI process {seen_in:.2f}s after the trigger")


def test_a_timeout_records_timed_out_and_sigterm_records_cancelled(redis_url, namespace, sync_redis,
                                                                   subprocess_env, tmp_path):
    worker = start(subprocess_env, redis_url, namespace, tmp_path, "w", grace_period_s=0)
    try:
        ready(sync_redis, namespace, worker)
        late = trigger(redis_url, namespace, "live-timeout", {"sleep_s": 30})
        wait_until(lambda: (record(sync_redis, namespace, late) or {}).get("status") == "timed_out", 20,
                   message="the timed-out record")
        timed = record(sync_redis, namespace, late)
        assert timed["error"]["name"] == "TimeoutError" and timed["nodes"]["begin"]["status"] == "cancelled"
        assert [r["run_id"] for r in inspect_runs(redis_url, namespace, "--status", "timed_out")] == [late]
        run_id = trigger(redis_url, namespace, "fleet-slow", {"sleep_s": 30})
        wait_until(lambda: (record(sync_redis, namespace, run_id) or {}).get("nodes", {}).get("begin", {})
                   .get("status") == "running", 10, message="the running record")
        t0 = time.monotonic()
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(20) == 0
        stopped_in = time.monotonic() - t0
    finally:
        stop(worker)
    rec = record(sync_redis, namespace, run_id)
    assert rec["status"] == "cancelled", rec["status"]
    assert rec["nodes"]["begin"]["status"] == "cancelled" and rec["nodes"]["after"]["status"] == "cancelled"
    assert "run interrupted" in rec["error"]["message"]
    assert [r["run_id"] for r in inspect_runs(redis_url, namespace, "--status", "cancelled")] == [run_id]
    print(f"worker stopped {stopped_in:.2f}s after SIGTERM, its run recorded cancelled")
