"""Faults of the shared embedded redis-server, with real processes: a server killed with
SIGKILL (its state file is stale), a file naming some other server, a frozen server, processes
that start at the same moment, and a worker whose server is stopped and started again.

Every test stops the servers it caused and fails if one is left.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from orchestrator.broker.embedded import LOG_FILE, STATE_FILE, ServerRecord, SharedEmbeddedRedis, pid_alive
from orchestrator.errors import BrokerError
from tests.integration.broker.test_shared_embedded import APP, producer, seen, servers_in, stop_all
from tests.integration.procs import ROOT, start_worker, stop, wait_until

pytestmark = pytest.mark.slow


@pytest.fixture
def state(subprocess_env: dict[str, str]) -> Path:
    return Path(subprocess_env["TOKIWA_STATE_DIR"])


@pytest.fixture
def shared(state: Path, tmp_path: Path):
    server = SharedEmbeddedRedis(state)
    yield server
    assert stop_all(server, tmp_path) == [], "a redis-server was left running"


def _wait_dead(pid: int, timeout: float = 10) -> None:
    wait_until(lambda: not pid_alive(pid), timeout, message=f"pid {pid} to exit")


def test_a_state_file_left_by_a_killed_server_is_replaced_and_its_data_kept(subprocess_env, shared, state):
    first = producer(subprocess_env, "publish", "job", "--payload", '{"i": 1}')
    assert first.returncode == 0, first.stderr
    killed = shared.find()
    assert killed is not None
    time.sleep(1.1)  # appendfsync everysec: the AOF is on disk
    os.kill(killed.pid, signal.SIGKILL)
    _wait_dead(killed.pid)
    assert shared.find() is None and (state / "redis" / STATE_FILE).exists()
    status = producer(subprocess_env, "redis", "status", "--json")
    assert json.loads(status.stdout)["stale"] is True

    second = producer(subprocess_env, "publish", "job", "--payload", '{"i": 2}')
    assert second.returncode == 0, second.stderr
    assert "is gone; starting a new one" in second.stderr
    record = shared.find()
    assert record is not None and record.pid != killed.pid
    assert record.port == killed.port  # clients of the killed server find the new one
    client = redis.Redis.from_url(record.url)
    try:
        assert client.xlen("{tokiwa:0}:events") == 2
    finally:
        client.close()


def test_a_file_naming_another_server_is_not_trusted(shared, state, redis_server, redis_url):
    other = redis.Redis.from_url(redis_url)
    real_pid = int(other.info("server")["process_id"])
    (state / "redis").mkdir(parents=True)
    ServerRecord(host="127.0.0.1", port=redis_server.port, pid=real_pid, run_id="0" * 40, dir=str(state / "redis"),
                 binary="redis-server", version="", started_at=0.0).write(state / "redis" / STATE_FILE)
    url = shared.ensure()
    assert shared.started and url != redis_url
    assert other.ping() is True  # the other server is left alone
    other.close()


def test_a_frozen_server_is_not_doubled(shared, tmp_path):
    shared.ensure()
    record = shared.record
    assert record is not None
    os.kill(record.pid, signal.SIGSTOP)
    try:
        with pytest.raises(BrokerError, match="runs but does not answer"):
            SharedEmbeddedRedis(shared.state_dir, answer_timeout_s=0.5).ensure()
        assert servers_in(tmp_path) == [record.pid]
    finally:
        os.kill(record.pid, signal.SIGCONT)
    assert shared.find() == record


STARTER = """
import json, sys, time
from orchestrator.broker.embedded import SharedEmbeddedRedis
start_at = float(sys.argv[2])
time.sleep(max(0.0, start_at - time.time()))
server = SharedEmbeddedRedis(sys.argv[1])
print(json.dumps({"url": server.ensure(), "started": server.started}))
"""


def test_processes_starting_at_the_same_moment_start_exactly_one_server(subprocess_env, shared, state, tmp_path):
    start_at = time.time() + 2.0  # after every interpreter has started
    procs = [subprocess.Popen([sys.executable, "-c", STARTER, str(state), str(start_at)], cwd=ROOT,
                              env=subprocess_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(6)]
    outs = []
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        outs.append(json.loads(out))
    assert len({o["url"] for o in outs}) == 1
    assert sum(o["started"] for o in outs) == 1
    record = shared.find()
    assert record is not None and servers_in(tmp_path) == [record.pid]
    assert (state / "redis" / LOG_FILE).read_text().count("Ready to accept connections") == 1


def test_cli_processes_starting_at_once_share_one_server(subprocess_env, shared, state, tmp_path):
    procs = [subprocess.Popen([sys.executable, "-m", "orchestrator.cli.producer", "publish", "job", "--payload",
                               json.dumps({"i": i})], cwd=ROOT, env=subprocess_env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(4)]
    for proc in procs:
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
    record = shared.find()
    assert record is not None and servers_in(tmp_path) == [record.pid]
    stopped = producer(subprocess_env, "redis", "stop")
    assert stopped.returncode == 0 and "still queued: 4" in stopped.stdout


def test_a_running_worker_reconnects_when_the_server_is_stopped_and_started_again(subprocess_env, shared,
                                                                                  tmp_path):
    worker = start_worker(subprocess_env, tmp_path / "worker.log", app=APP)
    try:
        wait_until(lambda: shared.find() is not None, 30, message="the worker to start the server")
        before = shared.find()
        assert before is not None
        stopped = producer(subprocess_env, "redis", "stop")
        assert stopped.returncode == 0 and "client connection(s) were open" in stopped.stderr
        _wait_dead(before.pid)
        # the next process starts it again on the same port, where the worker finds it
        published = producer(subprocess_env, "publish", "job", "--payload", '{"i": 7}')
        assert published.returncode == 0, published.stderr
        after = shared.find()
        assert after is not None and after.pid != before.pid and after.url == before.url
        wait_until(lambda: seen(after.url) == {"7": 1}, 40, message="the worker to reconnect and process it")
        assert worker.poll() is None
    finally:
        assert stop(worker) == 0


def test_a_server_whose_state_file_was_removed_is_found_not_doubled(shared, state, tmp_path):
    shared.ensure()
    record = shared.record
    assert record is not None
    (state / "redis" / STATE_FILE).unlink()
    again = SharedEmbeddedRedis(state)
    assert again.ensure() == record.url and again.started is False
    assert servers_in(tmp_path) == [record.pid]
    (state / "redis" / STATE_FILE).unlink()
    summary = SharedEmbeddedRedis(state).stop()
    assert summary is not None and summary["pid"] == record.pid
    _wait_dead(record.pid)
