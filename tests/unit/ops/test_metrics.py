"""Metrics: counters and histograms move with events and runs; gauges read Redis; multiprocess scrape."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import fakeredis
import msgpack
import pytest
from prometheus_client.parser import text_string_to_metric_families

from orchestrator.config import Settings
from orchestrator.errors import InvalidArgumentError
from orchestrator.keys import Keys
from orchestrator.ops import metrics
from orchestrator.workflow.model import Node, Workflow
from orchestrator.workflow.retry import RetryPolicy
from orchestrator.workflow.runner import Runner

ROOT = Path(__file__).resolve().parents[3]


def value(name: str, text: bytes | None = None, **labels: str) -> float:
    """A sample's value in a scrape (this process's registry by default); 0 when absent."""
    body = (text if text is not None else metrics.scrape()[0]).decode()
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


# -- events ---------------------------------------------------------------------------------------
def test_observe_event_counts_by_type_and_outcome():
    kind = unique("order")
    metrics.observe_event(kind, "ok")
    metrics.observe_event(kind, "ok")
    metrics.observe_event(kind, "dead")
    assert value("tokiwa_events_total", type=kind, outcome="ok") == 2
    assert value("tokiwa_events_total", type=kind, outcome="dead") == 1
    assert value("tokiwa_events_total", type=kind, outcome="failed") == 0


@pytest.mark.parametrize(("kind", "outcome"), [("x", "fine"), ("", "ok"), (None, "ok")])
def test_observe_event_refuses_an_unknown_outcome_or_a_blank_type(kind, outcome):
    with pytest.raises(InvalidArgumentError):
        metrics.observe_event(kind, outcome)


def test_event_types_beyond_the_cap_are_counted_as_other(monkeypatch):
    monkeypatch.setattr(metrics, "MAX_EVENT_TYPES", len(metrics._seen_types))
    before = value("tokiwa_events_total", type=metrics.OTHER_TYPE, outcome="ok")
    kind = unique("flood")
    metrics.observe_event(kind, "ok")
    assert value("tokiwa_events_total", type=metrics.OTHER_TYPE, outcome="ok") == before + 1
    assert value("tokiwa_events_total", type=kind, outcome="ok") == 0


def test_observe_dead_and_relay_overflow_count_up():
    dead, overflow = value("tokiwa_dead_letters_total"), value("tokiwa_relay_overflow_total")
    metrics.observe_dead()
    metrics.observe_dead(2)
    metrics.observe_relay_overflow()
    assert value("tokiwa_dead_letters_total") == dead + 3
    assert value("tokiwa_relay_overflow_total") == overflow + 1


def test_set_leader_shows_one_while_leading_and_zero_after():
    role = unique("cron")
    metrics.set_leader(role, True)
    assert value("tokiwa_leader", role=role) == 1
    metrics.set_leader(role, False)
    assert value("tokiwa_leader", role=role) == 0


# -- runs -----------------------------------------------------------------------------------------
async def test_metrics_hooks_count_runs_by_status_and_time_runs_and_nodes():
    ok_name, bad_name = unique("ok"), unique("bad")
    runner = Runner(hooks=metrics.MetricsHooks())

    def boom(ctx):
        raise ValueError("no")

    await runner.run(Workflow(ok_name, [Node("a", lambda ctx: 1), Node("b", lambda ctx: 2, ["a"])]))
    await runner.run(Workflow(bad_name, [Node("a", boom)]))
    assert value("tokiwa_runs_total", workflow=ok_name, status="succeeded") == 1
    assert value("tokiwa_runs_total", workflow=bad_name, status="failed") == 1
    assert value("tokiwa_run_duration_seconds_count", workflow=ok_name) == 1
    assert value("tokiwa_node_duration_seconds_count", workflow=ok_name, node="b") == 1
    assert value("tokiwa_node_duration_seconds_count", workflow=bad_name, node="a") == 1


async def test_runs_in_progress_goes_up_while_a_run_executes_and_back_down_after():
    name = unique("slow")
    seen: list[float] = []

    async def look(ctx):
        seen.append(value("tokiwa_runs_in_progress", workflow=name))

    await Runner(hooks=metrics.MetricsHooks()).run(Workflow(name, [Node("look", look)]))
    assert seen == [1]
    assert value("tokiwa_runs_in_progress", workflow=name) == 0


async def test_a_retried_node_is_timed_once_including_its_retries():
    name = unique("retry")
    calls = []

    async def flaky(ctx):
        calls.append(1)
        if len(calls) < 3:
            raise ValueError("again")
        return "ok"

    async def no_sleep(seconds):
        return None

    class Services:
        sleep = staticmethod(no_sleep)

    node = Node("flaky", flaky, retry=RetryPolicy(max_attempts=3, initial_delay_s=0.01))
    await Runner(hooks=metrics.MetricsHooks(), services=Services()).run(Workflow(name, [node]))
    assert len(calls) == 3
    assert value("tokiwa_node_duration_seconds_count", workflow=name, node="flaky") == 1


# -- gauges from Redis ------------------------------------------------------------------------------
class FakeBroker:
    def __init__(self, redis, namespace: str) -> None:
        self.redis, self.keys, self.group = redis, Keys(namespace), "workers"
        self.settings = Settings(namespace=namespace)


async def test_refresh_gauges_reads_stream_length_lag_and_pending():
    redis = fakeredis.FakeAsyncRedis()
    broker = FakeBroker(redis, unique("ns"))
    await redis.xgroup_create(broker.keys.events, "workers", id="0", mkstream=True)
    for n in range(4):
        await redis.xadd(broker.keys.events, {"n": n})
    await redis.xreadgroup("workers", "c1", {broker.keys.events: ">"}, count=1)
    await redis.xadd(broker.keys.dead, {"reason": "x"})
    await redis.zadd(broker.keys.delayed, {"e1": 1, "e2": 2})
    fresh = {"id": "w1", "last_seen": time.time(), "groups": ["workers"]}
    stale = {"id": "w2", "last_seen": time.time() - 3600, "groups": ["workers"]}
    await redis.hset(broker.keys.workers, mapping={"w1": msgpack.packb(fresh), "w2": msgpack.packb(stale)})
    found = await metrics.refresh_gauges(broker)
    assert found["events"] == 4 and found["dead"] == 1 and found["pending:workers"] == 1 and found["delayed"] == 2
    assert value("tokiwa_group_live_workers", group="workers") == 1  # the stale heartbeat does not count
    assert value("tokiwa_delayed_events", namespace=broker.keys.namespace) == 2
    assert value("tokiwa_stream_length", stream="events") == 4
    assert value("tokiwa_stream_length", stream="dead") == 1
    assert value("tokiwa_pending_entries", group="workers") == 1
    assert value("tokiwa_group_lag", group="workers") == found["lag:workers"]
    await redis.aclose()


async def test_refresh_gauges_without_a_stream_reports_zero():
    redis = fakeredis.FakeAsyncRedis()
    found = await metrics.refresh_gauges(FakeBroker(redis, unique("empty")))
    assert found == {"events": 0, "dead": 0, "delayed": 0}
    await redis.aclose()


def test_every_registered_family_is_listed_in_metric_names():
    names = metrics.metric_names()
    for expected in ("tokiwa_runs_total", "tokiwa_runs_in_progress", "tokiwa_node_duration_seconds_bucket",
                     "tokiwa_run_duration_seconds_sum", "tokiwa_events_total", "tokiwa_dead_letters_total",
                     "tokiwa_stream_length", "tokiwa_group_lag", "tokiwa_pending_entries", "tokiwa_leader",
                     "tokiwa_relay_overflow_total"):
        assert expected in names


# -- multiprocess ---------------------------------------------------------------------------------
CHILD = """
import sys
from orchestrator.ops import metrics
metrics.observe_event("mp.event", "ok")
metrics.RUNS_IN_PROGRESS.labels(workflow="mp").inc()
metrics.set_leader("mp-role", sys.argv[1] == "lead")
print("done", flush=True)
"""


def run_child(directory: Path, role: str) -> int:
    env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=str(directory),
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-c", CHILD, role], env=env, stdout=subprocess.PIPE, text=True)
    try:
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0 and "done" in out
    return proc.pid


def test_one_scrape_shows_every_process_of_a_multiprocess_dir(tmp_path):
    folder = metrics.prepare_multiprocess_dir(tmp_path / "prom")
    pid_a = run_child(folder, "lead")
    pid_b = run_child(folder, "follow")
    text, _ = metrics.scrape(folder)
    assert value("tokiwa_events_total", text, type="mp.event", outcome="ok") == 2
    assert value("tokiwa_leader", text, role="mp-role") == 1
    assert value("tokiwa_runs_in_progress", text, workflow="mp") == 2
    metrics.mark_process_dead(pid_a, folder)
    text, _ = metrics.scrape(folder)
    assert value("tokiwa_runs_in_progress", text, workflow="mp") == 1, "a dead process's live gauge is dropped"
    assert value("tokiwa_leader", text, role="mp-role") == 0
    assert value("tokiwa_events_total", text, type="mp.event", outcome="ok") == 2, "counters survive it"
    assert pid_b


def test_scrape_uses_the_multiprocess_dir_from_the_environment(tmp_path, monkeypatch):
    folder = metrics.prepare_multiprocess_dir(tmp_path / "prom")
    run_child(folder, "follow")
    monkeypatch.setenv(metrics.MULTIPROC_ENV, str(folder))
    assert value("tokiwa_events_total", metrics.scrape()[0], type="mp.event", outcome="ok") == 1


def test_prepare_multiprocess_dir_removes_files_of_a_previous_run(tmp_path):
    folder = tmp_path / "prom"
    folder.mkdir()
    (folder / "counter_123.db").write_bytes(b"old")
    (folder / "keep.txt").write_text("mine")
    metrics.prepare_multiprocess_dir(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["keep.txt"]


def test_a_scrape_is_prometheus_text_with_its_content_type():
    body, content_type = metrics.scrape()
    assert content_type.startswith("text/plain; version=")
    assert b"# TYPE tokiwa_runs_total counter" in body


def test_a_scrape_also_shows_process_metrics_and_the_apps_own_default_registry():
    from prometheus_client import Counter

    name = f"app_{uuid.uuid4().hex[:8]}"
    Counter(name, "an app's own metric").inc()
    body = metrics.scrape()[0].decode()
    assert "python_info" in body and f"{name}_total 1.0" in body
    assert f"{name}_total" not in metrics.scrape(include_default=False)[0].decode()


async def test_a_multiprocess_scrape_shows_the_redis_gauges_of_the_serving_process_once(tmp_path):
    redis = fakeredis.FakeAsyncRedis()
    broker = FakeBroker(redis, unique("mp"))
    for n in range(3):
        await redis.xadd(broker.keys.events, {"n": n})
    await metrics.refresh_gauges(broker)
    await redis.aclose()
    folder = metrics.prepare_multiprocess_dir(tmp_path / "prom")
    run_child(folder, "follow")
    text = metrics.scrape(folder)[0]
    assert value("tokiwa_stream_length", text, stream="events") == 3
    assert text.decode().count("# TYPE tokiwa_stream_length gauge") == 1
    assert value("tokiwa_events_total", text, type="mp.event", outcome="ok") == 1
