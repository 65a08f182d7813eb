"""Cancelling a run by id on a real Redis: the request's keys, finished and unknown runs, a run
stopped by the watcher of the process running it when another host asks, a record of a run
cancelled before it started, the HTTP route, the CLI command as a subprocess, and a watcher
whose Redis goes away and comes back."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import msgpack
import pytest

from orchestrator.app import Orchestrator
from orchestrator.keys import Keys
from orchestrator.ops.http_api import ApiServer
from orchestrator.runs.cancel import (
    CANCEL_TTL_S,
    CancelWatcher,
    cancel_request,
    cancel_run,
    cancelled_result,
)
from orchestrator.runs.stores import RedisRunStore
from orchestrator.workflow.model import Node, Workflow
from orchestrator.workflow.result import NodeStatus, RunStatus, WorkflowRunResult
from orchestrator.workflow.runner import Runner

ROOT = Path(__file__).resolve().parents[3]


class Slow:
    """A workflow ``start -> wait (asyncio.sleep 30) -> after``; records which nodes ran."""

    def __init__(self) -> None:
        self.ran: list[str] = []
        self.waiting = asyncio.Event()

        async def start(ctx):
            self.ran.append("start")

        async def wait(ctx):
            self.ran.append("wait")
            self.waiting.set()
            await asyncio.sleep(30)

        async def after(ctx):
            self.ran.append("after")

        self.workflow = Workflow("slow", [Node("start", start), Node("wait", wait, ["start"]),
                                          Node("after", after, ["wait"])])


def finished_record(run_id: str, status: str) -> dict:
    now = time.time()
    return {"run_id": run_id, "workflow_id": "wf", "workflow_name": "slow", "status": status,
            "started_at": now - 2, "finished_at": now - 1, "duration_ms": 1000.0}


@pytest.fixture
async def app(redis_url, namespace):
    application = Orchestrator(redis_url, namespace=namespace, runner=Runner(cancel_grace_s=0.5))
    await application.connect()
    yield application
    await application.close()


@pytest.fixture
async def other_host(redis_url, namespace):
    """A second Orchestrator with its own Redis client: another host, as far as the run knows."""
    application = Orchestrator(redis_url, namespace=namespace, source="ops-host")
    await application.connect()
    yield application
    await application.close()


# -- cancel_run -------------------------------------------------------------------------------
@pytest.mark.timeout(20)
@pytest.mark.parametrize("status", ["succeeded", "failed", "cancelled"])
async def test_a_finished_run_is_not_cancelled(app, aredis, status):
    await app.run_store.save(finished_record("done-1", status))
    answer = await app.cancel_run("done-1", by="ops", reason="late")
    assert answer == {"run_id": "done-1", "status": status, "cancelled": False, "reason": "already finished"}
    assert await aredis.exists(app.keys.cancel("done-1")) == 0
    assert await aredis.zscore(app.keys.cancels, "done-1") is None


@pytest.mark.timeout(20)
async def test_an_unknown_run_gets_a_request_that_lives_a_day(app, aredis):
    keys = app.keys
    stale = time.time() - CANCEL_TTL_S - 60
    await aredis.zadd(keys.cancels, {"stale-run": stale})
    answer = await app.cancel_run("never-seen", by="ops", reason="wrong input")
    assert answer["cancelled"] is True and answer["status"] == "unknown"
    assert answer["by"] == "ops" and abs(answer["at"] - time.time()) < 5
    raw = await aredis.get(keys.cancel("never-seen"))
    assert msgpack.unpackb(raw) == {"by": "ops", "at": answer["at"], "reason": "wrong input"}
    assert CANCEL_TTL_S - 10 < await aredis.ttl(keys.cancel("never-seen")) <= CANCEL_TTL_S
    assert await aredis.zscore(keys.cancels, "never-seen") == pytest.approx(answer["at"])
    assert await aredis.zscore(keys.cancels, "stale-run") is None  # pruned by the write
    assert await cancel_request(aredis, keys, "never-seen") == {"by": "ops", "at": answer["at"],
                                                                "reason": "wrong input"}
    assert await cancel_request(aredis, keys, "other") is None
    again = await app.cancel_run("never-seen", by="ops")  # asking twice is harmless
    assert again["cancelled"] is True and await aredis.zcard(keys.cancels) == 1


@pytest.mark.timeout(20)
async def test_cancel_run_defaults_by_to_the_app_source(other_host):
    answer = await other_host.cancel_run("x-1")
    assert answer["by"] == "ops-host"


@pytest.mark.timeout(20)
async def test_a_run_record_that_says_running_answers_cancelling(app):
    await app.run_store.save({**finished_record("live-1", "running"), "finished_at": None})
    assert (await app.cancel_run("live-1", by="ops"))["status"] == "cancelling"


@pytest.mark.timeout(20)
async def test_a_run_of_this_process_is_cancelled_at_once(app):
    slow = Slow()
    task = asyncio.create_task(app.runner.run(slow.workflow, run_id="here-1"))
    await asyncio.wait_for(slow.waiting.wait(), 5)
    t0 = time.perf_counter()
    answer = await app.cancel_run("here-1", by="ops", reason="stop")
    result = await asyncio.wait_for(task, 5)
    took = time.perf_counter() - t0
    print(f"local cancel: run ended {took * 1000:.1f} ms after cancel_run was called")
    assert answer["status"] == "cancelling"
    assert result.status == RunStatus.CANCELLED and result.cancelled_by == "ops"
    assert result.cancelled_at == answer["at"] and slow.ran == ["start", "wait"]
    assert took < 2


# -- the watcher ------------------------------------------------------------------------------
@pytest.mark.timeout(30)
async def test_a_cancel_from_another_host_stops_the_run_within_a_second(app, other_host, aredis):
    watcher = CancelWatcher.for_app(app)
    await watcher.start()
    slow = Slow()
    try:
        task = asyncio.create_task(app.runner.run(slow.workflow, run_id="remote-1"))
        await asyncio.wait_for(slow.waiting.wait(), 5)
        reads_before = watcher.reads
        t0 = time.perf_counter()
        answer = await other_host.cancel_run("remote-1", by="ops-bob", reason="wrong input")
        result = await asyncio.wait_for(task, 10)
        took = time.perf_counter() - t0
    finally:
        await watcher.stop()
    print(f"remote cancel: run ended {took:.3f} s after the request (watcher interval "
          f"{watcher.interval_s} s, {watcher.reads - reads_before} MGETs meanwhile)")
    assert answer["cancelled"] is True and answer["status"] == "unknown"  # not running over there
    assert result.status == RunStatus.CANCELLED
    assert result.cancelled_by == "ops-bob" and result.cancelled_at == answer["at"]
    assert "cancelled by ops-bob: wrong input" in result.error["message"]
    assert slow.ran == ["start", "wait"]
    assert result.nodes["wait"].status == NodeStatus.CANCELLED
    assert result.nodes["after"].status == NodeStatus.CANCELLED and result.nodes["after"].attempts == 0
    assert watcher.cancelled == 1 and watcher.failed is None
    assert took < 5
    record = WorkflowRunResult.from_record(result.to_record())
    assert (record.cancelled_by, record.cancelled_at) == ("ops-bob", answer["at"])


@pytest.mark.timeout(20)
async def test_the_watcher_reads_nothing_while_nothing_runs(app, redis_url):
    watcher = CancelWatcher.for_app(app, interval_s=0.02)
    await watcher.start()
    await asyncio.sleep(0.3)
    await watcher.stop()
    assert watcher.reads == 0


# -- the record of a run cancelled before it started --------------------------------------------
@pytest.mark.timeout(20)
async def test_a_run_cancelled_before_it_started_round_trips_through_the_redis_store(aredis, keys):
    store = RedisRunStore(aredis, keys)
    request = {"by": "ops", "at": time.time(), "reason": "not needed"}
    result = cancelled_result(Slow().workflow, "early-1", request)
    await store.save(result.to_record())
    record = await store.get("early-1")
    assert record == result.to_record()
    back = WorkflowRunResult.from_record(record)
    assert back.status == RunStatus.CANCELLED and back.cancelled_by == "ops"
    assert back.cancelled_at == request["at"]
    assert (await store.list(status="cancelled"))[0]["run_id"] == "early-1"
    host = type("Host", (), {"redis": aredis, "keys": keys, "run_store": store, "runner": None})()
    assert (await cancel_run(host, "early-1", by="ops"))["cancelled"] is False


# -- the HTTP route ---------------------------------------------------------------------------
@pytest.mark.timeout(30)
async def test_post_cancel_returns_what_cancel_run_did(app):
    server = ApiServer(app, port=0, token="tok")
    await server.start()
    auth = {"Authorization": "Bearer tok"}
    await app.run_store.save(finished_record("done-2", "succeeded"))
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
            async with http.post(f"{server.url}/runs/r-http/cancel", headers=auth,
                                 json={"by": "ops-ann", "reason": "oops"}) as response:
                assert response.status == 200
                body = await response.json()
            assert body["run_id"] == "r-http" and body["cancelled"] is True
            assert body["by"] == "ops-ann" and body["status"] == "unknown"
            assert (await cancel_request(app.redis, app.keys, "r-http"))["reason"] == "oops"

            async with http.post(f"{server.url}/runs/r-nobody/cancel", headers=auth) as response:
                assert response.status == 200
                assert (await response.json())["by"] == app.worker_id  # no body: the app's default

            async with http.post(f"{server.url}/runs/done-2/cancel", headers=auth) as response:
                assert response.status == 200
                assert await response.json() == {"run_id": "done-2", "status": "succeeded", "cancelled": False,
                                                 "reason": "already finished"}

            for body_text in ("[1]", "{not json", '{"by": 3}'):
                async with http.post(f"{server.url}/runs/r-bad/cancel", headers=auth, data=body_text) as response:
                    assert response.status == 400, body_text
            async with http.post(f"{server.url}/runs/.bad/cancel", headers=auth) as response:
                assert response.status == 400
            async with http.post(f"{server.url}/runs/r-http/cancel") as response:
                assert response.status == 401
            async with http.get(f"{server.url}/runs/r-http/cancel", headers=auth) as response:
                assert response.status == 405
    finally:
        await server.stop()
    assert await app.redis.exists(app.keys.cancel("r-bad")) == 0


# -- the CLI ----------------------------------------------------------------------------------
def cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", "cancel", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.timeout(120)
async def test_the_cli_writes_the_request_and_says_so(redis_url, namespace, subprocess_env, aredis):
    keys = Keys(namespace)
    common = ["--redis-url", redis_url, "--namespace", namespace]
    t0 = time.perf_counter()
    done = await asyncio.to_thread(cli, "cli-1", "--by", "ops-cli", "--reason", "wrong input", *common,
                                   env=subprocess_env)
    print(f"tokiwa-producer cancel took {time.perf_counter() - t0:.2f} s")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ("run cli-1: cancel requested by ops-cli (no record of it yet: the worker "
                                   "that runs or starts it cancels it)")
    assert await cancel_request(aredis, keys, "cli-1") == {"by": "ops-cli", "at": pytest.approx(time.time(), abs=60),
                                                            "reason": "wrong input"}
    assert await aredis.exists(keys.events) == 0  # it wrote the request and nothing else

    done = await asyncio.to_thread(cli, "cli-2", "--json", *common, env=subprocess_env)
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer["cancelled"] is True and answer["status"] == "unknown" and "@" in answer["by"]

    await RedisRunStore(aredis, keys).save(finished_record("cli-3", "failed"))
    done = await asyncio.to_thread(cli, "cli-3", *common, env=subprocess_env)
    assert done.returncode == 1
    assert done.stdout.strip() == "run cli-3 already finished (failed): nothing to cancel"
    done = await asyncio.to_thread(cli, "cli-3", "--json", *common, env=subprocess_env)
    assert done.returncode == 1 and json.loads(done.stdout)["cancelled"] is False

    done = await asyncio.to_thread(cli, "../etc", *common, env=subprocess_env)
    assert done.returncode == 2 and "invalid run_id" in done.stderr

    done = await asyncio.to_thread(cli, "cli-4", "--redis-url", "redis://127.0.0.1:1/0", "--namespace", namespace,
                                   env=subprocess_env)
    assert done.returncode == 69, done.stderr
    assert "cannot reach Redis at redis://127.0.0.1:1/0" in done.stderr

    done = await asyncio.to_thread(cli, "cli-5", "--namespace", namespace, env=subprocess_env)
    assert done.returncode == 2 and "--redis-url" in done.stderr


# -- a watcher whose Redis goes away ------------------------------------------------------------
@pytest.mark.timeout(60)
async def test_the_watcher_rides_out_a_redis_restart(own_redis, namespace, caplog):
    app = Orchestrator(own_redis.url, namespace=namespace, runner=Runner(cancel_grace_s=0.5), redis_timeout_ms=1000)
    await app.connect()
    watcher = CancelWatcher.for_app(app, interval_s=0.05)
    watcher.backoff_cap_s = 0.5
    slow = Slow()
    try:
        await watcher.start()
        task = asyncio.create_task(app.runner.run(slow.workflow, run_id="restart-1"))
        await asyncio.wait_for(slow.waiting.wait(), 5)
        await asyncio.to_thread(own_redis.stop)
        await asyncio.sleep(1.0)  # the watcher meets the outage
        assert watcher.running and watcher.failed is None
        await asyncio.to_thread(own_redis.start)
        t0 = time.perf_counter()
        other = Orchestrator(own_redis.url, namespace=namespace)
        try:
            await other.connect()
            await other.cancel_run("restart-1", by="ops")
        finally:
            await other.close()
        result = await asyncio.wait_for(task, 15)
        took = time.perf_counter() - t0
    finally:
        await watcher.stop()
        await app.close()
    print(f"after the restart: run cancelled {took:.2f} s after Redis came back")
    assert result.status == RunStatus.CANCELLED and result.cancelled_by == "ops"
    assert watcher.failed is None and watcher.restarts == 0
    assert any("redis unreachable" in r.getMessage() for r in caplog.records)
