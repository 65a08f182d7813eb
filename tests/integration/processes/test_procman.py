"""Detached worker instances (procman), the ``start / ps / stop / logs`` commands and the
Supervisor behind ``run --processes``, with real processes.

Only pids these tests start are ever signalled; every fixture kills what it started.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import msgpack
import pytest
from click.testing import CliRunner

from orchestrator.errors import ConflictError, InvalidArgumentError, NotFoundError, StateError
from orchestrator.keys import Keys
from workers.processes.manage_cli import (
    cluster_workers,
    format_duration,
    logs_command,
    ps_command,
    start_command,
    stop_command,
)
from workers.processes.procman import ProcessManager, folder_name, instance_hash
from workers.processes.proctools import pid_alive
from workers.processes.supervisor import EXIT_OK, Supervisor, child_run_argv

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[3]
SLEEPER = [sys.executable, "-u", "-c", "import sys, time\nprint('ready')\nprint('oops', file=sys.stderr)\ntime.sleep(60)"]
# ignores SIGTERM, so only SIGKILL ends it
STUBBORN = [sys.executable, "-u", "-c",
            "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint('ready')\ntime.sleep(60)"]
# starts a grandchild in its own process group and prints its pid
PARENT_OF_ONE = [sys.executable, "-u", "-c",
                 "import subprocess, time\np = subprocess.Popen(['sleep', '60'])\nprint(p.pid)\ntime.sleep(60)"]


def wait_until(predicate, timeout_s: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.02)


def _kill_group(pid: int) -> None:
    for target in (lambda: os.killpg(pid, signal.SIGKILL), lambda: os.kill(pid, signal.SIGKILL)):
        try:
            target()
        except (ProcessLookupError, PermissionError):
            pass


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def manager(state_dir: Path):
    """A ProcessManager over a private state dir; SIGKILLs every instance it started."""
    pm = ProcessManager(state_dir, poll_interval_s=0.02)
    started: list[int] = []
    real_start = pm.start

    def start(*args, **kwargs):
        inst = real_start(*args, **kwargs)
        started.append(inst.pid)
        return inst

    pm.start = start  # type: ignore[method-assign]
    try:
        yield pm
    finally:
        for pid in started:
            if pid_alive(pid):
                _kill_group(pid)


def test_an_instance_folder_is_named_slug_dash_12_base36_chars_of_sha256():
    assert instance_hash("w1") == instance_hash("w1")
    assert len(instance_hash("w1")) == 12 and instance_hash("w1").isalnum()
    assert instance_hash("w1") != instance_hash("W1")
    assert folder_name("My_Worker") == f"my-worker-{instance_hash('My_Worker')}"
    # pinned: the name -> folder mapping must never change between releases
    assert instance_hash("worker") == "3dyf90yyddyh"


@pytest.mark.parametrize("bad", ["", "-w", "a b", "a/b", "x" * 65, "..", "ü"])
def test_a_bad_instance_name_is_refused_with_a_clear_error(manager, bad):
    with pytest.raises(InvalidArgumentError, match="invalid worker name"):
        manager.start(bad, SLEEPER)


def test_start_writes_pid_without_newline_logs_and_cmd_json(manager, state_dir):
    inst = manager.start("w1", SLEEPER)
    folder = state_dir / "workers" / folder_name("w1")
    assert inst.folder == folder and inst.alive
    assert (folder / "pid").read_text() == str(inst.pid)
    meta = json.loads((folder / "cmd.json").read_text())
    assert meta["name"] == "w1" and meta["argv"] == SLEEPER and meta["pid"] == inst.pid
    assert abs(meta["started_at"] - time.time()) < 10
    wait_until(lambda: manager.tail("w1", 1) == ["ready"], what="stdout in out.log")
    wait_until(lambda: manager.tail("w1", 1, err=True) == ["oops"], what="stderr in err.log")


def test_a_started_instance_is_detached_in_its_own_session(manager):
    inst = manager.start("w1", SLEEPER)
    assert os.getsid(inst.pid) == inst.pid
    assert os.getpgid(inst.pid) == inst.pid != os.getpgrp()


def test_start_refuses_a_name_whose_instance_is_alive(manager):
    first = manager.start("w1", SLEEPER)
    with pytest.raises(ConflictError, match=f"already running \\(pid {first.pid}\\)"):
        manager.start("w1", SLEEPER)


def test_a_stale_pid_file_does_not_block_start(manager):
    dead = manager.start("w1", [sys.executable, "-c", "pass"])
    wait_until(lambda: not manager.get("w1").alive, what="the first instance to exit")
    again = manager.start("w1", SLEEPER)
    assert again.alive and again.pid != dead.pid


def test_a_command_that_cannot_run_raises_and_leaves_no_folder(manager, state_dir):
    with pytest.raises(StateError, match="No such file"):
        manager.start("w1", ["/nonexistent/tokiwa-nothing"])
    assert manager.instances() == []
    with pytest.raises(InvalidArgumentError):
        manager.start("w1", [])


def test_instances_lists_alive_and_dead_ones_with_uptime(manager):
    manager.start("alive", SLEEPER)
    manager.start("dead", [sys.executable, "-c", "pass"])
    wait_until(lambda: not manager.get("dead").alive, what="'dead' to exit")
    listed = {i.name: i for i in manager.instances()}
    assert set(listed) == {"alive", "dead"}
    now = time.time()
    assert listed["alive"].alive and listed["alive"].uptime_s(now) >= 0
    assert not listed["dead"].alive and listed["dead"].uptime_s(now) is None


def test_stop_sends_sigterm_to_the_whole_group_and_removes_the_folder(manager):
    inst = manager.start("w1", PARENT_OF_ONE)
    wait_until(lambda: manager.tail("w1", 1) != [], what="the grandchild's pid")
    grandchild = int(manager.tail("w1", 1)[0])
    result = manager.stop("w1", grace_s=5)
    assert result.outcome == "terminated" and result.pid == inst.pid
    assert not pid_alive(inst.pid) and not pid_alive(grandchild)
    assert not inst.folder.exists()


def test_stop_escalates_to_sigkill_after_the_grace_period(manager):
    inst = manager.start("w1", STUBBORN)
    wait_until(lambda: manager.tail("w1", 1) == ["ready"], what="the SIGTERM handler")
    began = time.monotonic()
    result = manager.stop("w1", grace_s=0.3)
    assert result.outcome == "killed"
    assert 0.3 <= time.monotonic() - began < 5
    assert not pid_alive(inst.pid)


def test_stop_of_a_worker_that_died_cleans_its_stale_pid_file(manager):
    inst = manager.start("w1", SLEEPER)
    os.kill(inst.pid, signal.SIGKILL)
    wait_until(lambda: not manager.get("w1").alive, what="the kill")
    assert manager.stop("w1").outcome == "stale"
    assert not inst.folder.exists()


def test_a_recycled_pid_is_never_signalled(manager, state_dir):
    """The pid file names a live process (this test) that started at another time."""
    folder = state_dir / "workers" / folder_name("w1")
    folder.mkdir(parents=True)
    (folder / "pid").write_text(str(os.getpid()))
    (folder / "cmd.json").write_text(json.dumps({"name": "w1", "pid": os.getpid(), "proc_start": 1}))
    assert not manager.get("w1").alive
    assert manager.stop("w1", grace_s=0).outcome == "stale"  # and we are still here


def test_stop_of_an_unreadable_pid_file_cleans_without_signalling(manager, state_dir):
    folder = state_dir / "workers" / folder_name("w1")
    folder.mkdir(parents=True)
    (folder / "pid").write_text("not-a-pid")
    assert manager.get("w1").pid is None
    assert manager.stop("w1").outcome == "invalid_pid"
    assert not folder.exists()


def test_stop_of_an_unknown_name_raises_not_found(manager):
    with pytest.raises(NotFoundError, match="no local worker named 'ghost'"):
        manager.stop("ghost")


def test_stop_all_stops_every_instance_within_one_grace_period(manager):
    pids = [manager.start(f"w{i}", STUBBORN).pid for i in range(3)]
    wait_until(lambda: all(manager.tail(f"w{i}", 1) == ["ready"] for i in range(3)), what="handlers")
    began = time.monotonic()
    results = manager.stop_all(grace_s=0.3)
    assert sorted(r.pid for r in results) == sorted(pids)
    assert {r.outcome for r in results} == {"killed"}
    assert time.monotonic() - began < 3  # shared grace, not 3 x 0.3 s sequentially plus waits
    assert manager.instances() == [] and not any(pid_alive(p) for p in pids)


def test_logs_tail_returns_the_last_n_lines(manager):
    script = "for i in range(500): print(f'line {i}')"
    manager.start("w1", [sys.executable, "-u", "-c", script])
    wait_until(lambda: manager.tail("w1", 1) == ["line 499"], what="all lines")
    assert manager.tail("w1", 3) == ["line 497", "line 498", "line 499"]
    assert manager.tail("w1", 0) == []
    assert len(manager.tail("w1", 10_000)) == 500
    with pytest.raises(InvalidArgumentError):
        manager.tail("w1", -1)


def test_follow_yields_new_lines_until_the_worker_exits(manager):
    script = "import time\nfor i in range(5):\n    print(f'tick {i}')\n    time.sleep(0.1)"
    manager.start("w1", [sys.executable, "-u", "-c", script])
    assert list(manager.follow("w1", lines=0))[-1] == "tick 4"


def test_logs_of_an_instance_without_its_log_file_raise_not_found(manager):
    inst = manager.start("w1", SLEEPER)
    inst.err_log.unlink()
    with pytest.raises(NotFoundError, match="has no err.log"):
        manager.tail("w1", 5, err=True)


# -- the CLI commands (in-process, CliRunner) ---------------------------------------------------


@pytest.mark.parametrize(("seconds", "text"), [(None, "-"), (0.4, "0s"), (75, "1m15s"), (7300, "2h01m"),
                                               (90000, "1d01h")])
def test_durations_are_shown_compactly(seconds, text):
    assert format_duration(seconds) == text



def test_ps_shows_local_instances_as_a_table_and_as_json(manager, state_dir):
    inst = manager.start("w1", SLEEPER)
    runner = CliRunner()
    table = runner.invoke(ps_command, ["--state-dir", str(state_dir)])
    assert table.exit_code == 0, table.output
    assert table.output.splitlines()[0].split() == ["NAME", "PID", "STATUS", "UPTIME", "FOLDER"]
    assert f"w1    {inst.pid}  alive" in table.output
    as_json = runner.invoke(ps_command, ["--state-dir", str(state_dir), "--json"])
    [record] = json.loads(as_json.output)
    assert record["name"] == "w1" and record["status"] == "alive" and record["pid"] == inst.pid


def test_start_without_a_redis_url_says_which_embedded_redis_the_worker_shares(state_dir, monkeypatch):
    monkeypatch.delenv("TOKIWA_REDIS_URL", raising=False)
    monkeypatch.delenv("TOKIWA_CONFIG", raising=False)
    args = ["--name", "w1", "--state-dir", str(state_dir), "--check-s", "0", "--app", "no_such_module:app"]
    try:
        result = CliRunner().invoke(start_command, args)
        assert "note: no --redis-url or TOKIWA_REDIS_URL" in result.output and str(state_dir) in result.output
    finally:
        ProcessManager(state_dir).stop_all(grace_s=1)


def test_stop_command_needs_a_name_or_all(state_dir):
    result = CliRunner().invoke(stop_command, ["--state-dir", str(state_dir)])
    assert result.exit_code == 2 and "give either NAME or --all" in result.output


def test_stop_command_reports_stale_and_unknown_instances(manager, state_dir):
    inst = manager.start("w1", [sys.executable, "-c", "pass"])
    wait_until(lambda: not pid_alive(inst.pid), what="exit")
    runner = CliRunner()
    stale = runner.invoke(stop_command, ["w1", "--state-dir", str(state_dir)])
    assert stale.exit_code == 0 and "stale pid file" in stale.output
    missing = runner.invoke(stop_command, ["w1", "--state-dir", str(state_dir)])
    assert missing.exit_code == 1 and "no local worker named 'w1'" in missing.output


def test_logs_command_prints_err_log_with_err(manager, state_dir):
    manager.start("w1", SLEEPER)
    wait_until(lambda: manager.tail("w1", 1, err=True) == ["oops"], what="stderr")
    result = CliRunner().invoke(logs_command, ["w1", "--err", "-n", "5", "--state-dir", str(state_dir)])
    assert result.exit_code == 0 and result.output == "oops\n"


def test_logs_follow_prints_new_lines_and_returns_when_the_worker_exits(manager, state_dir):
    script = "import time\nfor i in range(3):\n    time.sleep(0.1)\n    print(f'tick {i}')"
    manager.start("w1", [sys.executable, "-u", "-c", script])
    result = CliRunner().invoke(logs_command, ["w1", "-f", "--state-dir", str(state_dir)])
    assert result.exit_code == 0 and result.output.splitlines()[-1] == "tick 2"


def test_ps_cluster_lists_heartbeats_from_redis_with_live_and_stale_status(redis_url, namespace, sync_redis):
    now = time.time()
    beat = {"host": "h1", "pid": 11, "started": now - 60, "in_flight": 2, "processed": 7, "last_seen": now}
    old = dict(beat, host="h2", pid=12, last_seen=now - 3600)
    sync_redis.hset(Keys(namespace).workers, mapping={
        "w-live": msgpack.packb(beat), "w-old": msgpack.packb(old), "w-bad": b"\xc1"})
    args = ["--cluster", "--redis-url", redis_url, "--namespace", namespace]
    result = CliRunner().invoke(ps_command, [*args, "--json"])
    assert result.exit_code == 0, result.output
    status = {r["id"]: r["status"] for r in json.loads(result.output)}
    assert status == {"w-live": "live", "w-old": "stale", "w-bad": "undecodable"}
    table = CliRunner().invoke(ps_command, args)
    assert "w-live  h1" in table.output and "1m00s" in table.output


def test_ps_cluster_without_a_redis_url_is_a_usage_error(monkeypatch):
    monkeypatch.delenv("TOKIWA_REDIS_URL", raising=False)
    monkeypatch.delenv("TOKIWA_CONFIG", raising=False)
    result = CliRunner().invoke(ps_command, ["--cluster"])
    assert result.exit_code == 2 and "needs a shared Redis" in result.output


def test_cluster_workers_sorts_by_host_then_id():
    beat = {"last_seen": 100.0}
    records = cluster_workers({b"b": msgpack.packb(dict(beat, host="x")), "a": msgpack.packb(dict(beat, host="x")),
                               b"c": msgpack.packb(dict(beat, host="a"))}, now=100.0, stale_after_s=1)
    assert [r["id"] for r in records] == ["c", "a", "b"]


# -- the real CLI as processes ------------------------------------------------------------------


def _cli(args: list[str], env: dict[str, str], cwd: Path, timeout_s: float = 30) -> subprocess.CompletedProcess:
    # short XREADGROUP blocks: a worker notices SIGTERM within 0.2 s instead of 2 s
    env = dict(env, TOKIWA_BLOCK_MS="200")
    return subprocess.run([sys.executable, "-m", "workers.cli", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout_s, check=False)


def test_start_of_a_worker_whose_app_cannot_load_fails_and_shows_its_stderr(subprocess_env, tmp_path):
    started = _cli(["start", "--name", "broken", "--check-s", "10", "--app", "no_such_module:app"],
                   subprocess_env, tmp_path)
    try:
        assert started.returncode == 1
        assert "exited at once" in started.stderr and "no_such_module" in started.stderr
    finally:
        _cli(["stop", "--all", "--grace-s", "1"], subprocess_env, tmp_path)


# -- the Supervisor (run --processes P) ---------------------------------------------------------

SUPERVISED = """
import sys
from workers.processes.supervisor import Supervisor
child = [sys.executable, "-c", "import time; time.sleep(60)"]
sys.exit(Supervisor(lambda slot: child, processes=2, restart_backoff_s=0.1,
                    grace_period_s=float(sys.argv[1])).run_sync())
"""


def _children_of(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


@pytest.mark.parametrize("spelling", [["--processes", "4"], ["--processes=4"], ["-p", "4"], ["-p4"]])
def test_a_supervised_child_runs_the_same_command_without_processes(spelling):
    run_args = ["--app", "x:app", *spelling, "--concurrency", "8"]
    assert child_run_argv(run_args, python="py") == ["py", "-m", "workers.cli", "run", "--app", "x:app",
                                                     "--concurrency", "8"]


def test_supervisor_arguments_are_checked():
    with pytest.raises(InvalidArgumentError, match="processes"):
        Supervisor(lambda slot: ["true"], processes=0)
    with pytest.raises(InvalidArgumentError, match="restart_backoff_s"):
        Supervisor(lambda slot: ["true"], restart_backoff_s=5, max_backoff_s=1)


def test_supervisor_backoff_doubles_for_each_quick_exit_and_is_capped():
    sup = Supervisor(lambda slot: ["true"], restart_backoff_s=0.5, max_backoff_s=3)
    assert [sup.backoff_s(n) for n in (1, 2, 3, 4, 5)] == [0.5, 1.0, 2.0, 3, 3]


async def test_supervisor_restarts_a_killed_child_within_the_backoff():
    sup = Supervisor(lambda slot: [sys.executable, "-c", "import time; time.sleep(60)"],
                     processes=2, restart_backoff_s=0.2, grace_period_s=5)
    serving = asyncio.create_task(sup.serve())
    try:
        while len(sup.pids) < 2:
            await asyncio.sleep(0.02)
        victim, other = sup.pids[0], sup.pids[1]
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        while sup.pids.get(0) in (None, victim):
            await asyncio.sleep(0.02)
            assert time.monotonic() - killed_at < 5, "no restart"
        assert time.monotonic() - killed_at >= 0.2  # waited the backoff
        assert sup.pids[1] == other and sup.restarts == {0: 1, 1: 0}
        assert sup.exit_codes[0] == [-signal.SIGKILL]
    finally:
        sup.request_stop()
        await asyncio.wait_for(serving, 10)
    assert sup.pids == {} and not pid_alive(victim) and not pid_alive(other)


async def test_a_child_that_keeps_crashing_is_restarted_with_growing_delays():
    sup = Supervisor(lambda slot: [sys.executable, "-c", "raise SystemExit(3)"],
                     processes=1, restart_backoff_s=0.05, max_backoff_s=0.4, grace_period_s=1)
    serving = asyncio.create_task(sup.serve())
    try:
        while len(sup.exit_codes[0]) < 4:
            await asyncio.sleep(0.02)
    finally:
        sup.request_stop()
        await asyncio.wait_for(serving, 10)
    assert set(sup.exit_codes[0]) == {3}


async def test_supervisor_kills_children_that_ignore_sigterm_after_the_grace_period(tmp_path):
    script = ("import pathlib, signal, sys, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
              "pathlib.Path(sys.argv[1]).touch()\ntime.sleep(60)")
    sup = Supervisor(lambda slot: [sys.executable, "-c", script, str(tmp_path / f"ready{slot}")],
                     processes=2, grace_period_s=0.3)
    serving = asyncio.create_task(sup.serve())
    try:
        while not ((tmp_path / "ready0").exists() and (tmp_path / "ready1").exists()):
            await asyncio.sleep(0.02)
        pids = list(sup.pids.values())
    finally:
        sup.request_stop()
        began = time.monotonic()
        await asyncio.wait_for(serving, 10)
    assert 0.3 <= time.monotonic() - began < 5
    assert not any(pid_alive(p) for p in pids)


async def test_a_failing_argv_factory_stops_the_supervisor_with_a_clear_error():
    def argv_factory(slot: int) -> list[str]:
        if slot == 1:
            raise ValueError("no command for slot 1")
        return [sys.executable, "-c", "import time; time.sleep(60)"]

    sup = Supervisor(argv_factory, processes=2, grace_period_s=5)
    with pytest.raises(StateError, match="no command for slot 1"):
        await asyncio.wait_for(sup.serve(), 10)
    assert sup.pids == {}


def _start_supervisor(env: dict[str, str], grace_s: float) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", SUPERVISED, str(grace_s)], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_until(lambda: len(_children_of(proc.pid)) == 2, what="two children")
    return proc


def test_sigterm_to_the_supervisor_stops_every_child_and_exits_0(subprocess_env):
    proc = _start_supervisor(subprocess_env, grace_s=5)
    children = _children_of(proc.pid)
    try:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == EXIT_OK
        assert not any(pid_alive(c) for c in children)
    finally:
        proc.kill()
        proc.wait(5)
        for child in children:
            _kill_group(child)


def test_kill_9_of_the_supervisor_leaves_no_orphan(subprocess_env):
    proc = _start_supervisor(subprocess_env, grace_s=5)
    children = _children_of(proc.pid)
    try:
        proc.kill()
        proc.wait(5)
        wait_until(lambda: not any(pid_alive(c) for c in children), timeout_s=5, what="orphans to die")
    finally:
        for child in children:
            _kill_group(child)


def test_a_real_worker_starts_detached_shows_in_ps_and_ps_cluster_and_stops_gracefully(
        subprocess_env, tmp_path, redis_url, namespace):
    (tmp_path / "lifecycle_app.py").write_text("from orchestrator import Orchestrator\napp = Orchestrator()\n")
    redis_args = ["--redis-url", redis_url, "--namespace", namespace]
    try:
        started = _cli(["start", "--name", "w1", "--app", "lifecycle_app:app", *redis_args], subprocess_env, tmp_path)
        assert started.returncode == 0, started.stderr
        assert started.stdout.startswith("started w1 (pid ")
        local = json.loads(_cli(["ps", "--json"], subprocess_env, tmp_path).stdout)
        assert [(r["name"], r["status"]) for r in local] == [("w1", "alive")]
        pid = local[0]["pid"]

        def cluster() -> list[dict]:
            return json.loads(_cli(["ps", "--cluster", "--json", *redis_args], subprocess_env, tmp_path).stdout)

        wait_until(lambda: [r["pid"] for r in cluster()] == [pid], timeout_s=20, what="the heartbeat")
        wait_until(lambda: "running" in _cli(["logs", "w1", "--err"], subprocess_env, tmp_path).stdout,
                   timeout_s=20, what="the worker's start line")
        stopped = _cli(["stop", "w1", "--grace-s", "20"], subprocess_env, tmp_path)
        assert stopped.returncode == 0 and f"w1 (pid {pid}): stopped" in stopped.stdout
        assert not pid_alive(pid)
        assert cluster() == []  # a clean exit removes its heartbeat
    finally:
        _cli(["stop", "--all", "--grace-s", "1"], subprocess_env, tmp_path)


# -- the Procfile under honcho ------------------------------------------------------------------


def test_honcho_start_runs_the_procfile_and_stops_both_processes_with_exit_0(subprocess_env, redis_url,
                                                                          namespace, sync_redis):
    assert (ROOT / "examples" / "shop.py").is_file(), "the Procfile's app examples/shop.py is missing"
    env = dict(subprocess_env, TOKIWA_REDIS_URL=redis_url, TOKIWA_NAMESPACE=namespace)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    honcho = subprocess.Popen([sys.executable, "-m", "honcho", "start", "--no-colour"], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(honcho.stdout), daemon=True)
    reader.start()

    def running(role: str) -> bool:
        return any(f" {role}.1 " in line and " running " in line for line in list(lines))

    try:
        wait_until(lambda: running("producer") and running("worker"), timeout_s=30, what="both to run")
        # the worker's heartbeat (written by a task started just before the "running" line)
        wait_until(lambda: sync_redis.hlen(Keys(namespace).workers) >= 1, timeout_s=10, what="a heartbeat")
        honcho.send_signal(signal.SIGTERM)
        honcho.wait(45)
        reader.join(5)
    finally:
        if honcho.poll() is None:
            _kill_group(honcho.pid)
            honcho.wait(5)
    output = "".join(lines)
    assert "producer.1 stopped (rc=0)" in output and "worker.1 stopped (rc=0)" in output, output
    assert sync_redis.hlen(Keys(namespace).workers) == 0  # clean exits removed their heartbeats


def test_a_detached_run_with_processes_restarts_a_killed_worker_and_stops_them_all(
        subprocess_env, tmp_path, redis_url, namespace):
    (tmp_path / "pool_app.py").write_text("from orchestrator import Orchestrator\napp = Orchestrator()\n")
    redis_args = ["--redis-url", redis_url, "--namespace", namespace]

    def heartbeat_pids() -> set[int]:
        out = _cli(["ps", "--cluster", "--json", *redis_args], subprocess_env, tmp_path).stdout
        return {r["pid"] for r in json.loads(out) if r["status"] == "live"}

    try:
        started = _cli(["start", "--name", "pool", "--app", "pool_app:app", "--processes", "2", *redis_args],
                       subprocess_env, tmp_path)
        assert started.returncode == 0, started.stderr
        supervisor = json.loads(_cli(["ps", "--json"], subprocess_env, tmp_path).stdout)[0]["pid"]
        wait_until(lambda: len(_children_of(supervisor)) == 2, timeout_s=20, what="two worker processes")
        first = set(_children_of(supervisor))
        wait_until(lambda: heartbeat_pids() == first, timeout_s=20, what="both heartbeats")
        victim = sorted(first)[0]
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: len(set(_children_of(supervisor)) - first) == 1, timeout_s=20, what="a restart")
        children = set(_children_of(supervisor))
        assert victim not in children and len(children) == 2
        stopped = _cli(["stop", "pool", "--grace-s", "30"], subprocess_env, tmp_path)
        assert stopped.returncode == 0 and "pool" in stopped.stdout and ": stopped" in stopped.stdout
        assert not any(pid_alive(p) for p in children | {supervisor})
    finally:
        _cli(["stop", "--all", "--grace-s", "1"], subprocess_env, tmp_path)
