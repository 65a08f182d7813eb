"""Metrics and the HTTP API switched on from the worker CLI, scraped over HTTP."""

from __future__ import annotations

import json
import re
import urllib.request

import pytest

from orchestrator.broker.embedded import free_port
from tests.integration.procs import start_worker, stop, wait_until, worker_env

from .test_worker_processes import publish, seen


def _get(url: str, token: str | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _events_total(text: str, event_type: str = "job") -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith("tokiwa_events_total{") and f'type="{event_type}"' in line and 'outcome="ok"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def _up(url: str) -> bool:
    try:
        return _get(url)[0] in (200, 401)
    except OSError:
        return False


def test_worker_serves_metrics_and_api_that_move_with_events(redis_url, namespace, sync_redis,
                                                             subprocess_env, tmp_path):
    metrics_port, api_port = free_port(), free_port()
    env = worker_env(subprocess_env, redis_url, namespace)
    worker = start_worker(env, tmp_path / "w.log", "--metrics-port", str(metrics_port), "--api-port",
                          str(api_port), "--api-token", "s3cret")
    try:
        wait_until(lambda: _up(f"http://127.0.0.1:{metrics_port}/healthz"), 30, message="metrics server")
        status, before = _get(f"http://127.0.0.1:{metrics_port}/metrics", "s3cret")
        assert status == 200 and _events_total(before) == 0
        publish(sync_redis, namespace, 50)
        wait_until(lambda: len(seen(sync_redis, namespace)) == 50, 30, message="50 processed")
        wait_until(lambda: _events_total(_get(f"http://127.0.0.1:{metrics_port}/metrics", "s3cret")[1]) == 50,
                   10, message="events counted")
        assert _get(f"http://127.0.0.1:{api_port}/workers")[0] == 401  # the token is required
        status, body = _get(f"http://127.0.0.1:{api_port}/workers", "s3cret")
        assert status == 200 and len(json.loads(body)) == 1
        assert _get(f"http://127.0.0.1:{api_port}/readyz", "s3cret")[0] == 200
    finally:
        code = stop(worker)
    assert code == 0


@pytest.mark.slow
def test_processes_share_one_metrics_scrape(redis_url, namespace, sync_redis, subprocess_env, tmp_path):
    port = free_port()
    env = worker_env(subprocess_env, redis_url, namespace, concurrency=4, TEST_SLEEP_MS=5)
    env["TOKIWA_STATE_DIR"] = str(tmp_path / "state")
    supervisor = start_worker(env, tmp_path / "sup.log", "--processes", "2", "--metrics-port", str(port))
    try:
        wait_until(lambda: sync_redis.hlen(f"{namespace}:workers") == 2, 30, message="two workers")
        wait_until(lambda: _up(f"http://127.0.0.1:{port}/healthz"), 30, message="host metrics server")
        publish(sync_redis, namespace, 200)
        wait_until(lambda: len(seen(sync_redis, namespace)) == 200, 30, message="200 processed")
        by_pid = sync_redis.hgetall(f"{namespace}:test:by_pid")
        assert len(by_pid) == 2, "both processes worked"
        wait_until(lambda: _events_total(_get(f"http://127.0.0.1:{port}/metrics")[1]) == 200, 10,
                   message="one scrape counts both processes' events")
        text = _get(f"http://127.0.0.1:{port}/metrics")[1]
        assert re.search(r"^tokiwa_runs_in_progress|^# TYPE tokiwa_events_total counter", text, re.M)
    finally:
        code = stop(supervisor)
    assert code == 0
