"""The HTTP API on a real Redis: runs and filters, logs tail, workers, health, readiness, token,
and metrics that move after runs (scraped over HTTP)."""

from __future__ import annotations

import json
import time
import uuid

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from orchestrator.app import Orchestrator
from orchestrator.cli.runtime import Heartbeat
from orchestrator.errors import InvalidArgumentError
from orchestrator.ops.http_api import ApiServer, MetricsServer
from orchestrator.ops.metrics import MetricsHooks
from orchestrator.workflow.model import Node, Workflow
from orchestrator.workflow.runner import Runner


def record(run_id: str, workflow: str, status: str, started_at: float) -> dict:
    return {"run_id": run_id, "workflow_id": f"id-{workflow}", "workflow_name": workflow, "status": status,
            "started_at": started_at, "finished_at": started_at + 1, "duration_ms": 1000.0,
            "nodes": {"a": {"node_id": "n-a", "name": "a", "status": status, "attempts": 1,
                            "duration_ms": 5.0, "finished_at": started_at + 1}},
            "error": None if status == "succeeded" else {"name": "ValueError", "message": "no"}}


@pytest.fixture
async def app(redis_url, namespace):
    application = Orchestrator(redis_url, namespace=namespace, block_ms=50,
                               runner=Runner(hooks=[MetricsHooks()]))
    application.dispatcher.subscribe("probe", lambda e: None, name="ops.probe")  # one route, one group
    await application.connect()
    yield application
    await application.close()


@pytest.fixture
async def http():
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        yield session


class Served:
    """An ApiServer on a free port, stopped on exit."""

    def __init__(self, server: ApiServer) -> None:
        self.server = server

    async def __aenter__(self) -> ApiServer:
        await self.server.start()
        return self.server

    async def __aexit__(self, *exc) -> None:
        await self.server.stop()


def serve(app, **kw) -> Served:
    return Served(ApiServer(app, port=0, **kw))


async def get(http, server: ApiServer, path: str, token: str | None = None):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with http.get(server.url + path, headers=headers) as response:
        body = await response.text()
        return response.status, body, response.headers


def sample(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample in Prometheus text, None if absent."""
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return None


# -- runs ---------------------------------------------------------------------------------------
@pytest.fixture
async def three_runs(app):
    now = time.time()
    for rec in (record("r1", "alpha", "succeeded", now - 30), record("r2", "alpha", "failed", now - 20),
                record("r3", "beta", "succeeded", now - 10)):
        await app.run_store.save(rec)


async def test_runs_lists_summaries_newest_first_with_a_task_summary(app, http, three_runs):

    async with serve(app) as server:
        status, body, _ = await get(http, server, "/runs")
    runs = json.loads(body)
    assert status == 200
    assert [r["run_id"] for r in runs] == ["r3", "r2", "r1"]
    assert runs[0]["task_summary"] == {"a": {"state": "succeeded", "duration_ms": 5.0,
                                             "ended_at": runs[0]["finished_at"], "attempts": 1}}


@pytest.mark.parametrize(("query", "expected"), [
    ("?status=failed", ["r2"]),
    ("?workflow=alpha", ["r2", "r1"]),
    ("?workflow=id-beta", ["r3"]),
    ("?status=succeeded&workflow=alpha", ["r1"]),
    ("?limit=2", ["r3", "r2"]),
])
async def test_runs_filters_by_status_workflow_and_limit(app, http, three_runs, query, expected):

    async with serve(app) as server:
        status, body, _ = await get(http, server, "/runs" + query)
    assert status == 200
    assert [r["run_id"] for r in json.loads(body)] == expected


@pytest.mark.parametrize("query", ["/runs?limit=0", "/runs?limit=201", "/runs?limit=x", "/runs?status=exploded",
                                   "/runs/r1/logs?tail=-1", "/runs/.hidden"])
async def test_bad_query_values_are_a_400_with_a_message(app, http, three_runs, query):

    async with serve(app) as server:
        status, body, _ = await get(http, server, query)
    assert status == 400
    assert json.loads(body)["error"]


async def test_one_run_is_its_whole_record_and_an_unknown_one_is_404(app, http, three_runs):

    async with serve(app) as server:
        status, body, _ = await get(http, server, "/runs/r2")
        missing, _, _ = await get(http, server, "/runs/nope")
    run = json.loads(body)
    assert status == 200 and run["status"] == "failed" and run["error"]["name"] == "ValueError"
    assert run["task_summary"]["a"]["state"] == "failed"
    assert missing == 404


async def test_logs_tail_returns_the_last_n_lines(app, http, three_runs):

    await app.run_store.append_logs("r1", [f"line {n}" for n in range(5)])
    async with serve(app) as server:
        _, tail, _ = await get(http, server, "/runs/r1/logs?tail=2")
        _, whole, _ = await get(http, server, "/runs/r1/logs")
        missing, _, _ = await get(http, server, "/runs/nope/logs?tail=2")
    assert json.loads(tail) == {"run_id": "r1", "run_status": "succeeded", "logs": ["line 3", "line 4"]}
    assert len(json.loads(whole)["logs"]) == 5
    assert missing == 404


async def test_workers_lists_heartbeats(app, http):

    await Heartbeat(app).beat()
    async with serve(app) as server:
        status, body, _ = await get(http, server, "/workers")
    (worker,) = json.loads(body)
    assert status == 200 and worker["id"] == app.worker_id and worker["stale"] is False


# -- health and readiness -------------------------------------------------------------------------
async def test_healthz_and_readyz_are_ok_when_redis_and_the_group_exist(app, http):
    async with serve(app) as server:
        assert (await get(http, server, "/healthz"))[0] == 200
        status, body, _ = await get(http, server, "/readyz")
    assert status == 200 and '"ready"' in body


async def test_readyz_is_503_when_the_group_is_missing(app, http, sync_redis):
    sync_redis.delete(app.keys.events)
    async with serve(app) as server:
        status, body, _ = await get(http, server, "/readyz")
    assert status == 503 and "does not exist" in body


async def test_readyz_is_503_when_redis_is_down_while_healthz_stays_200(own_redis, namespace, http):
    application = Orchestrator(own_redis.url, namespace=namespace)
    await application.connect()
    try:
        async with serve(application, ready_timeout_s=1.0) as server:
            assert (await get(http, server, "/readyz"))[0] == 200
            own_redis.stop()
            t0 = time.monotonic()
            status, body, _ = await get(http, server, "/readyz")
            assert status == 503 and "not ready" in body
            assert time.monotonic() - t0 < 5
            assert (await get(http, server, "/healthz"))[0] == 200
            assert (await get(http, server, "/runs"))[0] == 503
    finally:
        await application.close()


# -- token ----------------------------------------------------------------------------------------
async def test_a_token_is_required_on_every_route_but_the_probes(app, http):
    async with serve(app, token="s3cret") as server:
        for path in ("/runs", "/workers", "/metrics", "/runs/x/logs"):
            status, _, headers = await get(http, server, path)
            assert status == 401, path
            assert headers["WWW-Authenticate"].startswith("Bearer")
        assert (await get(http, server, "/runs", token="wrong"))[0] == 401
        assert (await get(http, server, "/runs", token="s3cret"))[0] == 200
        assert (await get(http, server, "/healthz"))[0] == 200
        assert (await get(http, server, "/readyz"))[0] == 200  # a kubelet probes it without a token


def test_bad_server_arguments_are_refused(app):
    with pytest.raises(InvalidArgumentError):
        ApiServer(app, port=70000)
    with pytest.raises(InvalidArgumentError):
        ApiServer(app, token="  ")


async def test_the_server_binds_loopback_by_default_and_stops_idempotently(app):
    server = ApiServer(app, port=0)
    assert server.host == "127.0.0.1"
    await server.start()
    await server.stop()
    await server.stop()


# -- metrics --------------------------------------------------------------------------------------
async def test_metrics_appear_and_move_after_publishes_and_runs(app, http):
    name = f"metrics-{uuid.uuid4().hex[:8]}"
    app.register_workflow(Workflow(name, [Node("step", lambda ctx: 1)]),
                          trigger={"type": "event", "event_type": name})
    await app.declare_routes()
    async with serve(app) as server:
        _, before, _ = await get(http, server, "/metrics")
        assert sample(before, "tokiwa_runs_total", workflow=name, status="succeeded") is None
        for _ in range(2):
            await app.publish(name, {})
        _, published, _ = await get(http, server, "/metrics")
        await app.drain(timeout=10)
        _, after, headers = await get(http, server, "/metrics")
    assert headers["Content-Type"].startswith("text/plain")
    assert sample(published, "tokiwa_stream_length", stream="events") == 2
    group = f"workers:wf:{name}"
    assert sample(published, "tokiwa_group_lag", group=group) == 2
    assert sample(after, "tokiwa_group_lag", group=group) == 0
    assert sample(after, "tokiwa_pending_entries", group=group) == 0
    assert sample(after, "tokiwa_runs_total", workflow=name, status="succeeded") == 2
    assert sample(after, "tokiwa_run_duration_seconds_count", workflow=name) == 2
    assert sample(after, "tokiwa_node_duration_seconds_count", workflow=name, node="step") == 2
    assert sample(after, "tokiwa_runs_in_progress", workflow=name) == 0


async def test_a_metrics_server_serves_only_metrics_and_healthz(app, http):
    server = MetricsServer(app, port=0)
    async with Served(server):
        assert (await get(http, server, "/metrics"))[0] == 200
        assert (await get(http, server, "/healthz"))[0] == 200
        assert (await get(http, server, "/runs"))[0] == 404


async def test_a_metrics_server_shows_every_process_of_a_multiprocess_dir(http, tmp_path, monkeypatch):
    import os
    import subprocess
    import sys
    from pathlib import Path

    from orchestrator.ops import metrics

    folder = metrics.prepare_multiprocess_dir(tmp_path / "prom")
    root = Path(__file__).resolve().parents[3]
    env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=str(folder),
               PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    code = "from orchestrator.ops import metrics; metrics.observe_event('mp.http', 'ok')"
    for _ in range(2):
        subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=60)
    monkeypatch.setenv(metrics.MULTIPROC_ENV, str(folder))
    server = MetricsServer(None, port=0)
    async with Served(server):
        _, text, _ = await get(http, server, "/metrics")
    assert sample(text, "tokiwa_events_total", type="mp.http", outcome="ok") == 2


async def test_data_routes_are_503_before_the_app_connects(redis_url, namespace, http):
    application = Orchestrator(redis_url, namespace=namespace)
    async with serve(application) as server:
        status, body, _ = await get(http, server, "/runs")
        ready, _, _ = await get(http, server, "/readyz")
    assert status == 503 and "not connected" in body
    assert ready == 503
