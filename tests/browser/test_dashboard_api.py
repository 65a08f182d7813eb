"""The dashboard's JSON without a browser: the DAG layout (edges from the record, the
workflow, or the timeline when neither has them), the token rules on the HTTP API's mount,
the static files it serves, and the standalone server's read-only mode."""

from __future__ import annotations

import aiohttp
import pytest

from orchestrator.app import Orchestrator
from orchestrator.cli.dashboard import standalone_app
from orchestrator.ops.dashboard import Dashboard, DashboardData, run_graph
from orchestrator.ops.http_api import ApiServer
from orchestrator.ops.inspector import Inspector
from orchestrator.workflow.model import Node, Workflow


def node(name: str, status: str, t0: float | None, t1: float | None, **extra) -> dict:
    return {"node_id": f"id-{name}", "name": name, "status": status, "attempts": 1 if t0 else 0,
            "duration_ms": None if t0 is None or t1 is None else (t1 - t0) * 1000, "started_at": t0,
            "finished_at": t1, "error": None, **extra}


DIAMOND = {"run_id": "r1", "workflow_id": "wf", "workflow_name": "diamond", "status": "succeeded", "nodes": {
    "a": node("a", "succeeded", 1.0, 1.1), "b": node("b", "succeeded", 1.1, 1.2),
    "c": node("c", "succeeded", 1.1, 1.5), "d": node("d", "succeeded", 1.5, 1.6)}}


def by_name(graph: dict) -> dict:
    return {n["name"]: n for n in graph["nodes"]}


def test_without_edges_the_columns_follow_the_timeline():
    graph = run_graph(DIAMOND)
    assert graph["edges_from"] == "timeline"
    nodes = by_name(graph)
    assert [nodes[n]["depth"] for n in "abcd"] == [0, 1, 1, 2]
    assert {nodes["b"]["row"], nodes["c"]["row"]} == {0, 1}
    assert all(n["depends_on"] == [] for n in graph["nodes"])
    assert (graph["columns"], graph["rows"]) == (3, 2)


def test_a_node_that_never_started_goes_in_the_last_column():
    record = {**DIAMOND, "nodes": {**DIAMOND["nodes"], "d": node("d", "skipped", None, 1.6)}}
    assert by_name(run_graph(record))["d"]["depth"] == 2


def test_edges_come_from_the_record_when_it_has_depends_on():
    nodes = {name: {**n, "depends_on": deps} for (name, n), deps in
             zip(DIAMOND["nodes"].items(), [[], ["id-a"], ["a"], ["b", "c"]], strict=True)}
    graph = run_graph({**DIAMOND, "nodes": nodes})
    assert graph["edges_from"] == "record"
    assert by_name(graph)["b"]["depends_on"] == ["a"]  # ids are shown as names
    assert by_name(graph)["d"]["depends_on"] == ["b", "c"] and by_name(graph)["d"]["depth"] == 2


def test_edges_come_from_the_apps_workflow():
    app = Orchestrator(mode="producer")
    a = Node(name="a", handler=lambda ctx: 1)
    b = Node(name="b", handler=lambda ctx: 1, depends_on=[a.id])
    c = Node(name="c", handler=lambda ctx: 1, depends_on=[a.id])
    d = Node(name="d", handler=lambda ctx: 1, depends_on=[b.id, c.id])
    app.register_workflow(Workflow(name="diamond", nodes=[a, b, c, d]))
    # the timeline alone would put c (which started late) after b
    late = {**DIAMOND, "nodes": {**DIAMOND["nodes"], "c": node("c", "succeeded", 1.25, 1.5)}}
    graph = run_graph(late, app)
    assert graph["edges_from"] == "workflow"
    assert [by_name(graph)[n]["depth"] for n in "abcd"] == [0, 1, 1, 2]
    assert by_name(graph)["d"]["depends_on"] == ["b", "c"]
    assert by_name(run_graph(late))["c"]["depth"] == 2  # without the app: by timing


@pytest.fixture
async def app(redis_url, namespace):
    application = Orchestrator(redis_url, namespace=namespace)
    application.dispatcher.subscribe("probe", lambda e: None, name="dash.probe")
    await application.connect()
    yield application
    await application.close()


@pytest.fixture
async def http():
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        yield session


async def call(http, url: str, method: str = "GET", token: str | None = None, json=None):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with http.request(method, url, headers=headers, json=json, allow_redirects=False) as response:
        ctype = response.headers.get("Content-Type", "")
        body = await (response.json() if "json" in ctype else response.text())
        return response.status, body, response.headers


async def test_on_the_http_api_reads_are_open_and_requeue_and_purge_need_the_token(app, http, aredis, keys):
    await aredis.xadd(keys.dead, {"id": "e1", "type": "t", "body": b"x", "reason": "max_deliveries",
                                  "group": "workers:sub:dash.probe"})
    server = ApiServer(app, port=0, token="s3cret")
    await server.start()
    try:
        base = server.url + "/dashboard"
        status, _, headers = await call(http, base)
        assert status == 302 and headers["Location"] == "/dashboard/"
        status, page, _ = await call(http, base + "/")
        assert status == 200 and "static/app.js" in page and "http" not in page.replace("http-equiv", "")
        for asset in ("app.js", "style.css"):
            assert (await call(http, f"{base}/static/{asset}"))[0] == 200
        for path in ("session", "summary", "runs", "workers", "streams", "dead", "cron", "locks", "relays",
                     "delayed"):
            assert (await call(http, f"{base}/api/{path}"))[0] == 200, path
        assert (await call(http, base + "/api/session"))[1] == {"read_only": False, "authorized": False}
        assert (await call(http, base + "/api/session", token="s3cret"))[1]["authorized"] is True
        assert (await call(http, server.url + "/runs"))[0] == 401  # the API itself still needs it
        assert (await call(http, base + "/api/runs?status=exploded"))[0] == 400
        assert (await call(http, base + "/api/runs/nope!"))[0] == 400
        assert (await call(http, base + "/api/runs/unknown-run"))[0] == 404
        for token in (None, "wrong"):
            assert (await call(http, base + "/api/dead/purge", "POST", token))[0] == 401
            assert (await call(http, base + "/api/dead/requeue", "POST", token, {"all": True}))[0] == 401
        assert await aredis.xlen(keys.dead) == 1
        assert (await call(http, base + "/api/dead/requeue", "POST", "s3cret", {"ids": "x"}))[0] == 400
        status, body, _ = await call(http, base + "/api/dead/requeue", "POST", "s3cret", {"all": True})
        assert status == 200 and body["count"] == 1
        assert await aredis.xlen(keys.dead) == 0 and await aredis.xlen(keys.events) == 1
        await aredis.xadd(keys.dead, {"id": "e2", "type": "t", "body": b"x"})
        status, body, _ = await call(http, base + "/api/dead/purge", "POST", "s3cret")
        assert (status, body) == (200, {"purged": 1})
    finally:
        await server.stop()


async def test_the_standalone_dashboard_without_a_token_is_read_only(aredis, keys, http):
    from aiohttp.test_utils import TestServer

    inspector = Inspector(aredis, keys)
    await aredis.xadd(keys.dead, {"id": "e1", "type": "t", "body": b"x"})
    server = TestServer(standalone_app(Dashboard(DashboardData(lambda: inspector))))
    await server.start_server()
    try:
        base = str(server.make_url("/"))
        assert (await call(http, base))[2]["Location"] == "/dashboard/"
        assert (await call(http, base + "healthz"))[0] == 200
        assert (await call(http, base + "dashboard/api/session"))[1] == {"read_only": True, "authorized": False}
        status, body, _ = await call(http, base + "dashboard/api/dead/purge", "POST", "anything")
        assert status == 403 and "read-only" in body["error"]
        assert await aredis.xlen(keys.dead) == 1
        status, body, _ = await call(http, base + "dashboard/api/cron")
        assert status == 200 and body["jobs"] == [] and body["app"] is False
    finally:
        await server.close()
