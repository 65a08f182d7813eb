"""Callers without the workers' code, on real worker processes: call by name, idempotent
publishes, a child workflow on a one-slot worker, cancelling runs, delayed events across
restarts of Redis and of every worker. Each test counts what ran and bounds its own time."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import msgpack
import pytest
import redis

from orchestrator import Orchestrator
from orchestrator.errors import NotFoundError
from orchestrator.keys import Keys
from orchestrator.runs.registry import RunTimeoutError
from tests.faults.test_fleet import groups_exist, live_groups, runs, start
from tests.integration.procs import ROOT, stop, wait_until


def cli(redis_url: str, namespace: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``tokiwa-producer ARGS`` as a real process, without --app and without TOKIWA_* settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKIWA_")}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args, "--redis-url", redis_url,
                           "--namespace", namespace], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def bare_producer(redis_url: str, namespace: str, body: str) -> subprocess.CompletedProcess[str]:
    """Run ``body`` (awaits allowed, ``app`` = a bare producer ``Orchestrator``) in a Python
    process that imports nothing of the workers' app and has no TOKIWA_* settings."""
    lines = "\n".join("    " + line for line in body.splitlines())
    code = ("import asyncio\nfrom orchestrator import Orchestrator\n\nasync def main():\n"
            f"    app = Orchestrator({redis_url!r}, namespace={namespace!r}, mode='producer')\n"
            f"    try:\n{textwrap.indent(lines, '    ')}\n    finally:\n        await app.close()\n\n"
            "asyncio.run(main())\n")
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={"PYTHONPATH": str(ROOT), "PATH": os.environ["PATH"]})


def record(client: redis.Redis, namespace: str, run_id: str) -> dict | None:
    """A run record as the Redis run store keeps it (its ``record`` field: msgpack)."""
    raw = client.hget(Keys(namespace).run(run_id), "record")
    return None if raw is None else msgpack.unpackb(raw, raw=False)


def lines(out: Path, name: str) -> list[list[str]]:
    return [line.split() for line in out.read_text().splitlines() if line.startswith(name + " ")] if out.exists() else []


@pytest.fixture
def extras_worker(redis_url, namespace, sync_redis, subprocess_env, tmp_path):
    """One worker with the manual workflows of the fleet app, one slot per route."""
    out = tmp_path / "runs.txt"
    worker = start(subprocess_env, redis_url, namespace, out, tmp_path / "w.log", "fleet-x", "--concurrency", "1",
                   TEST_EXTRAS=1)
    wait_until(lambda: groups_exist(sync_redis, namespace, "wf:fleet-add", "wf:fleet-slow")
               and bool(live_groups(sync_redis, namespace, worker.pid)), 30, message="the worker")
    yield worker, out
    assert stop(worker) == 0


def test_call_by_name_from_processes_that_import_nothing_of_the_app(redis_url, namespace, extras_worker):
    worker, out = extras_worker
    done = cli(redis_url, namespace, "trigger", "fleet-add", "--input", '{"a": 2, "b": 3}', "--wait", "--timeout", "20")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["status"] == "succeeded" and result["nodes"]["sum"]["output"] == 5
    # the same from plain Python: a bare producer, no import of the app
    py = bare_producer(redis_url, namespace, "r = await app.run_workflow('fleet-add', input={'a': 40, 'b': 2}, "
                                            "timeout=20)\nprint(r.status, r.nodes['sum'].output)")
    assert py.returncode == 0, py.stderr
    assert py.stdout.split() == ["succeeded", "42"]
    unknown = cli(redis_url, namespace, "trigger", "fleet-nope", "--wait", "--timeout", "5")
    assert unknown.returncode == 2
    assert "no worker offers a workflow 'fleet-nope'" in unknown.stderr and "fleet-add" in unknown.stderr


async def test_idempotent_publishes_run_handlers_and_workflows_once(redis_url, namespace, extras_worker):
    worker, out = extras_worker
    app = Orchestrator(redis_url, namespace=namespace, mode="producer")
    try:
        first = await app.publish("job", {"i": 1}, idempotency_key="order-1")
        again = await app.publish("job", {"i": 1}, idempotency_key="order-1")
        other = await app.publish("job", {"i": 2}, idempotency_key="order-2")
        event = await app.publish("job", {"i": 3})
        assert await app.enqueue(event) == event.stream_id  # the same event id again: nothing added
    finally:
        await app.close()
    assert first.id == again.id and first.stream_id == again.stream_id and other.id != first.id
    done = cli(redis_url, namespace, "publish", "job", "--payload", '{"i": 1}', "--idempotency-key", "order-1")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["stream_id"] == first.stream_id
    await asyncio.to_thread(wait_until, lambda: set(runs(out).get("fleet-x", ())) == {1, 2, 3}, 20,
                            message="the three events")
    await asyncio.sleep(0.5)  # a second run would have come by now
    assert dict(runs(out)["fleet-x"]) == {1: 1, 2: 1, 3: 1}


async def test_a_child_workflow_on_a_one_slot_worker_does_not_deadlock(redis_url, namespace, sync_redis,
                                                                       extras_worker):
    worker, out = extras_worker
    app = Orchestrator(redis_url, namespace=namespace, mode="producer")
    try:
        t0 = time.monotonic()
        parent = await app.run_workflow("fleet-parent", input={"n": 21}, timeout=30)
        took = time.monotonic() - t0
    finally:
        await app.close()
    assert parent.status == "succeeded" and parent.nodes["call"].output == 42
    (row,) = lines(out, "fleet-parent")
    child = record(sync_redis, namespace, row[3])
    assert child is not None and child["workflow_name"] == "fleet-child"
    assert child["parent_run_id"] == parent.run_id
    print(f"parent and child on --concurrency 1 in {took:.2f}s")


async def test_cancel_a_running_a_queued_and_a_timed_out_run(redis_url, namespace, sync_redis, extras_worker):
    worker, out = extras_worker
    app = Orchestrator(redis_url, namespace=namespace, mode="producer")
    try:
        running = await app.run_workflow("fleet-slow", input={"sleep_s": 30}, wait=False)
        await asyncio.to_thread(wait_until, lambda: any(r[1] == running for r in lines(out, "fleet-slow-start")), 20,
                                message="the slow run to start")
        queued = await app.run_workflow("fleet-slow", input={"sleep_s": 30}, wait=False)  # waits for the one slot
        await asyncio.sleep(0.3)
        assert not any(r[1] == queued for r in lines(out, "fleet-slow-start"))
        done = cli(redis_url, namespace, "cancel", queued, "--by", "ops-alice", "--reason", "not needed")
        assert done.returncode == 0, done.stdout + done.stderr
        t0 = time.monotonic()
        done = cli(redis_url, namespace, "cancel", running, "--by", "ops-bob")
        assert done.returncode == 0, done.stdout + done.stderr
        await asyncio.to_thread(wait_until, lambda: (record(sync_redis, namespace, running) or {}).get("status")
                                == "cancelled", 20, message="the running run cancelled")
        stopped_in = time.monotonic() - t0
        await asyncio.to_thread(wait_until, lambda: (record(sync_redis, namespace, queued) or {}).get("status")
                                == "cancelled", 20, message="the queued run recorded cancelled")
        with pytest.raises(RunTimeoutError) as timed_out:
            await app.run_workflow("fleet-slow", input={"sleep_s": 30}, timeout=0.5)
        late = timed_out.value.run_id
        await asyncio.to_thread(wait_until, lambda: any(r[1] == late for r in lines(out, "fleet-slow-start")), 20,
                                message="the timed-out run to start")
        answer = await app.cancel_run(late, by="caller")
        assert answer["cancelled"] is True
        await asyncio.to_thread(wait_until, lambda: (record(sync_redis, namespace, late) or {}).get("status")
                                == "cancelled", 20, message="the timed-out run cancelled")
        again = await app.cancel_run(running, by="ops-bob")
        with pytest.raises(NotFoundError):
            await app.run_workflow("fleet-nope", wait=False)
    finally:
        await app.close()
    r_running, r_queued, r_late = (record(sync_redis, namespace, x) for x in (running, queued, late))
    assert r_running["cancelled_by"] == "ops-bob" and r_running["cancelled_at"]
    assert r_queued["cancelled_by"] == "ops-alice" and "before it started" in json.dumps(r_queued["error"])
    assert r_late["cancelled_by"] == "caller"
    assert not any(r[1] == queued for r in lines(out, "fleet-slow-start")), "the queued run started"
    assert lines(out, "fleet-slow-after") == [], "a node after the cancelled one ran"
    assert again["cancelled"] is False and again["status"] == "cancelled"
    print(f"a running run stopped {stopped_in:.2f}s after its cancel was requested (CLI process included)")


def test_delayed_events_survive_restarts_of_redis_and_of_every_worker(own_redis, namespace, subprocess_env, tmp_path):
    """Delayed events published by a producer without the app wait in Redis; every worker is
    killed (-9) and Redis restarted (AOF) before they are due; each fires once, not early."""
    url = own_redis.url
    out = tmp_path / "runs.txt"
    client = redis.Redis.from_url(url)
    workers = [start(subprocess_env, url, namespace, out, tmp_path / f"a{n}.log", "fleet-x") for n in range(2)]
    try:
        wait_until(lambda: groups_exist(client, namespace, "wf:fleet-x"), 30, message="the group")
        published = time.time()
        py = bare_producer(url, namespace, "for i in range(20):\n"
                                           "    await app.publish('job', {'i': i}, delay_s=3.0 + i * 0.05)")
        assert py.returncode == 0, py.stderr
        extra = cli(url, namespace, "publish", "job", "--payload", '{"i": 99}', "--delay", "3")
        assert extra.returncode == 0 and json.loads(extra.stdout)["delayed"] is True, extra.stderr
        cancelled = cli(url, namespace, "inspect", "delayed", "cancel", json.loads(extra.stdout)["id"])
        assert cancelled.returncode == 0 and "cancelled delayed event" in cancelled.stdout, cancelled.stderr
        assert client.zcard(Keys(namespace).delayed) == 20
        listed = cli(url, namespace, "inspect", "delayed", "list", "--json")
        rows = json.loads(listed.stdout)
        assert listed.returncode == 0 and len(rows) == 20 and all(r["type"] == "job" for r in rows)
        assert [r["due_ms"] for r in rows] == sorted(r["due_ms"] for r in rows)
        for w in workers:
            w.send_signal(signal.SIGKILL)
            w.wait(10)
        client.close()
        own_redis.restart()
        client = redis.Redis.from_url(url)
        assert client.zcard(Keys(namespace).delayed) == 20, "delayed events lost in the Redis restart"
        assert runs(out) == {}, "fired early"
        workers = [start(subprocess_env, url, namespace, out, tmp_path / f"b{n}.log", "fleet-x") for n in range(2)]
        wait_until(lambda: len(runs(out).get("fleet-x", ())) == 20, 30, message="every delayed event")
        fired = time.time()
        time.sleep(0.5)
    finally:
        codes = [stop(w) for w in workers]
    counted = runs(out)["fleet-x"]
    # each move left the event's publish-once marker holding its stream id (the stream itself is trimmed)
    markers = [client.get(k) for k in client.scan_iter(f"{{{namespace}:0}}:published:*")]
    assert len(markers) == 20
    first_entry_ms = min(int(sid.split(b"-")[0]) for sid in markers)
    assert first_entry_ms >= int((published + 3.0) * 1000) - 50, "an event reached the stream before it was due"
    assert dict(counted) == {i: 1 for i in range(20)}
    assert client.zcard(Keys(namespace).delayed) == 0
    client.close()
    print(f"20 delayed events fired once each {fired - published:.2f}s after publishing, across the restarts")
    assert codes == [0, 0]


def test_a_worker_prints_one_plain_line_per_finished_run(redis_url, namespace, sync_redis, subprocess_env, tmp_path):
    out, log = tmp_path / "runs.txt", tmp_path / "w.log"
    worker = start(subprocess_env, redis_url, namespace, out, log, "", "--plain", TEST_EXTRAS=1)
    try:
        wait_until(lambda: groups_exist(sync_redis, namespace, "wf:fleet-add"), 30, message="the worker")
        done = cli(redis_url, namespace, "trigger", "fleet-add", "--input", '{"a": 1, "b": 2}', "--wait",
                   "--timeout", "20")
        assert done.returncode == 0, done.stderr
        run_id = json.loads(done.stdout)["run_id"]
        wait_until(lambda: run_id in log.read_text(), 10, message="the run line")
    finally:
        assert stop(worker) == 0
    (line,) = [x for x in log.read_text().splitlines() if run_id in x]
    assert "flow=fleet-add" in line and "status=succeeded" in line and "🥕" not in line, line
