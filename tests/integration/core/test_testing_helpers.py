"""orchestrator.testing and the pytest plugin: TokiwaTestApp on the session's redis-server, on
a redis-server of its own and on fakeredis; the example suite (examples/testing) and a suite
in pytest-asyncio's strict mode run in subprocesses, as a user runs them."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator import Node, Orchestrator, Workflow
from orchestrator.errors import NotFoundError, StateError
from orchestrator.testing import TEST_SETTINGS, TokiwaTestApp

ROOT = Path(__file__).resolve().parents[3]


def build_app() -> tuple[Orchestrator, list[str]]:
    """An app whose subscriber chains events across routes and whose workflow may fail."""
    app = Orchestrator(source="helpers")
    seen: list[str] = []

    async def first(event):
        seen.append(f"first:{event.payload['n']}")
        await app.publish("step.two", {"n": event.payload["n"]})

    async def second(event):
        seen.append(f"second:{event.payload['n']}")

    async def later(event):
        seen.append(f"later:{event.payload['n']}")

    app.dispatcher.subscribe("step.one", first, name="first")
    app.dispatcher.subscribe("step.two", second, name="second")
    app.dispatcher.subscribe("later", later, name="later")

    async def double(ctx):
        if ctx.input.get("fail"):
            raise RuntimeError("asked to fail")
        return ctx.input["n"] * 2

    app.register_workflow(Workflow(name="double", nodes=[Node(name="double", handler=double)]),
                          trigger={"type": "event", "event_type": "step.one"})
    return app, seen


@pytest.fixture(params=["redis", "fakeredis"])
async def helper(request, redis_url):
    app, seen = build_app()
    url = redis_url if request.param == "redis" else None
    async with TokiwaTestApp(app, backend=request.param, redis_url=url) as t:
        yield t, app, seen


async def test_drain_runs_what_processing_publishes_on_other_routes(helper):
    t, app, seen = helper
    for n in range(3):
        await app.publish("step.one", {"n": n})
    await t.drain()

    assert sorted(seen) == ["first:0", "first:1", "first:2", "second:0", "second:1", "second:2"]
    assert t.published_types()[:3] == ["step.one"] * 3
    assert sorted(t.published_types()[3:]) == ["step.two"] * 3
    assert [e.stream_id for e in t.published] == sorted(e.stream_id for e in t.published)
    assert sorted(r.output_of("double") for r in t.runs_of("double")) == [0, 2, 4]  # run at once
    assert t.dead == []


async def test_run_workflow_goes_through_the_stream_and_returns_the_result(helper):
    t, app, _ = helper
    ok = await t.run_workflow("double", input={"n": 21})
    failed = await t.run_workflow("double", input={"n": 1, "fail": True})

    assert ok.succeeded and ok.output_of("double") == 42
    assert failed.status == "failed" and "asked to fail" in failed.error["message"]
    assert [r.run_id for r in t.runs] == [ok.run_id, failed.run_id]
    assert t.published == []  # run requests are the app's own events
    with pytest.raises(NotFoundError):
        await t.run_workflow("no-such-workflow")


async def test_dead_letters_come_with_their_event(redis_url):
    app, _ = build_app()

    async def broken(event):
        raise ValueError("always")

    app.dispatcher.subscribe("step.one", broken, name="broken")
    async with TokiwaTestApp(app, redis_url=redis_url,
                             settings={"ack_policy": "on_success", "max_deliveries": 2}) as t:
        await app.publish("step.one", {"n": 7})
        await t.drain(timeout=20)

    [dead] = t.dead
    assert dead["group"].endswith("sub:broken") and dead["reason"] == "max_deliveries"
    assert dead["event"]["payload"] == {"n": 7}


async def test_delayed_events_run_when_due_or_all_at_once(redis_url):
    app, seen = build_app()
    async with TokiwaTestApp(app, redis_url=redis_url) as t:
        await app.publish("later", {"n": 1}, delay_s=0)
        await app.publish("later", {"n": 3}, delay_s=7200)
        await app.publish("later", {"n": 2}, delay_s=3600)
        await t.drain()
        assert seen == ["later:1"]
        assert await app.delayed().count() == 2

        await t.drain(delayed="all")
        assert seen == ["later:1", "later:2", "later:3"]  # in due order
        assert t.published_types() == ["later"] * 3


async def test_on_fakeredis_a_due_delayed_event_says_it_needs_the_real_server():
    app, seen = build_app()
    async with TokiwaTestApp(app, backend="fakeredis") as t:
        await app.publish("later", {"n": 1}, delay_s=3600)
        await t.drain()  # not due: nothing to move
        with pytest.raises(StateError, match="real redis-server"):
            await t.drain(delayed="all")
    assert seen == []


async def test_a_test_app_of_its_own_starts_and_stops_its_redis_server():
    app, seen = build_app()
    t = TokiwaTestApp(app)
    async with t:
        assert t.redis_url is not None
        await app.publish("step.one", {"n": 1})
        await t.drain()
        server, folder = t._server, t._dir
        assert server is not None and server.process is not None and folder is not None
    assert server.process.poll() is not None
    assert not folder.exists()
    assert seen == ["first:1", "second:1"]


async def test_one_app_serves_test_after_test(redis_url):
    """stop() gives the app back as it was; the next test app starts clean."""
    app, seen = build_app()
    own_settings, own_store = app.settings, app.run_store
    async with TokiwaTestApp(app, redis_url=redis_url) as first:
        assert app.settings.stream_maxlen == TEST_SETTINGS["stream_maxlen"]
        await app.publish("step.one", {"n": 1})
        await first.drain()
    assert app.settings is own_settings and app.run_store is own_store and app.redis is None
    assert await asyncio.to_thread(_namespace_keys, redis_url, first.namespace) == []

    async with TokiwaTestApp(app, backend="fakeredis") as second:
        await app.publish("step.one", {"n": 2})
        await second.drain()
        assert second.namespace != first.namespace
        assert [r.output_of("double") for r in second.runs] == [4]
        assert second.published_types() == ["step.one", "step.two"]
    assert seen == ["first:1", "second:1", "first:2", "second:2"]


def _namespace_keys(url: str, namespace: str) -> list[bytes]:
    import redis

    client = redis.Redis.from_url(url)
    try:
        return list(client.scan_iter(match=f"{namespace}:*"))
    finally:
        client.close()


async def test_a_connected_app_is_refused(redis_url):
    app = Orchestrator(redis_url=redis_url, namespace="t-connected")
    await app.connect()
    try:
        with pytest.raises(StateError, match="connected already"):
            await TokiwaTestApp(app, redis_url=redis_url).start()
    finally:
        await app.close()


def run_pytest(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKIWA_")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=180)


def test_the_example_suite_passes():
    result = run_pytest(["examples/testing"], ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "6 passed" in result.stdout


STRICT_SUITE = '''
import pytest
from orchestrator import Orchestrator

app = Orchestrator()
seen = []
app.dispatcher.subscribe("ping", lambda event: seen.append(event.payload), name="ping")


@pytest.fixture
def tokiwa_app():
    return app


@pytest.mark.asyncio
@pytest.mark.parametrize("tokiwa_backend", ["redis", "fakeredis"])
async def test_ping(tokiwa):
    await app.publish("ping", {"n": 1})
    await tokiwa.drain()
    assert tokiwa.published_types() == ["ping"] and seen[-1] == {"n": 1}
'''

MISSING_APP = '''
import pytest


@pytest.mark.asyncio
async def test_needs_an_app(tokiwa):
    pass
'''


def test_the_plugin_works_in_strict_mode_and_says_when_the_app_fixture_is_missing(tmp_path):
    (tmp_path / "test_strict.py").write_text(STRICT_SUITE)
    (tmp_path / "test_missing.py").write_text(MISSING_APP)
    result = run_pytest(["-W", "error", "-o", "asyncio_mode=strict", "-o", "asyncio_default_fixture_loop_scope=function"], tmp_path)
    out = result.stdout + result.stderr
    assert "2 passed" in out and "1 error" in out, out
    assert "define a fixture named tokiwa_app" in out


async def test_published_and_dead_cover_every_partition(redis_url):
    app, seen = build_app()

    async def broken(event):
        raise ValueError("always")

    app.dispatcher.subscribe("later", broken, name="broken")
    async with TokiwaTestApp(app, redis_url=redis_url,
                             settings={"partitions": 3, "ack_policy": "on_success", "max_deliveries": 1}) as t:
        for n in range(12):
            await app.publish("later", {"n": n})
        await t.drain(timeout=20)
        await t.refresh()
        partitions = {e.partition for e in t.published}
    assert [e.payload["n"] for e in t.published] == list(range(12)), "in publish order, every partition"
    assert len(partitions) > 1, "the events spread over the partitions"
    assert sorted(int(d["event"]["payload"]["n"]) for d in t.dead) == list(range(12))
    assert any("/" in d["dead_id"] for d in t.dead), "dead letters of partitions > 0 are named p/<id>"
    assert sorted(seen) == sorted(f"later:{n}" for n in range(12))
