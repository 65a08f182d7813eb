"""``tokiwa-worker run --loop``: the handlers run on the loop asked for, and a loop that
cannot be had is one error line and exit 2 (real worker processes)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from orchestrator.cli.loops import uvloop_installed
from tests.integration.procs import ROOT, start_worker, stop, wait_until, worker_env

pytestmark = pytest.mark.timeout(60)


def _loop_module(subprocess_env, redis_url, namespace, sync_redis, tmp_path, *args: str) -> str:
    env = worker_env(subprocess_env, redis_url, namespace)
    proc = start_worker(env, tmp_path / f"worker{len(args)}.log", *args, app="tests.integration.apps.loops:app")
    key = f"{namespace}:test:loop"
    try:
        wait_until(lambda: sync_redis.hlen(f"{namespace}:workers") > 0, 30, message="the worker's heartbeat")
        subprocess.run([sys.executable, "-m", "orchestrator.cli.producer", "publish", "loop.which",
                        "--redis-url", redis_url, "--namespace", namespace], cwd=ROOT, env=env, check=True,
                       capture_output=True, timeout=30)
        wait_until(lambda: sync_redis.exists(key), 30, message="the handler's record")
        return sync_redis.get(key).decode()
    finally:
        assert stop(proc) == 0
        sync_redis.delete(key)


def test_loop_asyncio_runs_the_handlers_on_asyncio(subprocess_env, redis_url, namespace, sync_redis, tmp_path):
    assert _loop_module(subprocess_env, redis_url, namespace, sync_redis, tmp_path, "--loop", "asyncio") \
        == "asyncio.unix_events"


def test_the_default_loop_is_uvloop_exactly_when_it_is_installed(subprocess_env, redis_url, namespace,
                                                                  sync_redis, tmp_path):
    module = _loop_module(subprocess_env, redis_url, namespace, sync_redis, tmp_path)
    assert module.startswith("uvloop") == uvloop_installed()


def test_an_unknown_loop_in_the_environment_is_a_usage_error(subprocess_env, redis_url, namespace):
    env = dict(worker_env(subprocess_env, redis_url, namespace), TOKIWA_LOOP="trio")
    done = subprocess.run([sys.executable, "-m", "workers.cli", "run", "--app", "tests.integration.apps.loops:app"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert "trio" in done.stderr and "auto" in done.stderr
