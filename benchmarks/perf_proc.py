"""Processes for the perf suite: tokiwa workers, their CPU and RSS from /proc, and py-spy.

CPU is user + system time from ``/proc/<pid>/stat`` (all threads of the process), read
while the worker is stopped (SIGSTOP) and again when it has drained the stream, so a row's
µs per event is the worker's own cost, without the producer's or Redis's.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import redis

from orchestrator.keys import Keys

ROOT = Path(__file__).resolve().parents[1]
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def group_pids(pgid: int) -> list[int]:
    """Every live process of a process group (a peer's worker and its children)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:
            out.append(int(entry.name))
    return out


class Worker:
    """One ``tokiwa-worker run`` process (its own session, so that a signal reaches only it)."""

    def __init__(self, url: str, namespace: str, app: str, *, concurrency: int = 64, loop: str = "asyncio",
                 env: dict[str, str] | None = None) -> None:
        self.namespace = namespace
        full_env = dict(os.environ, TOKIWA_REDIS_URL=url, TOKIWA_NAMESPACE=namespace, PYTHONPATH=str(ROOT),
                        TOKIWA_LOOP=loop, TOKIWA_LOG_LEVEL="WARNING")
        full_env.update(env or {})
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "workers.cli", "run", "--app", app, "--concurrency", str(concurrency),
             "--log-level", "WARNING", "--no-run-lines"],
            cwd=ROOT, env=full_env, start_new_session=True)
        self.pid = self.proc.pid

    def stop(self) -> None:
        os.kill(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.pid, signal.SIGCONT)

    def cpu_s(self) -> float:
        return cpu_s(self.pid)

    def rss_mb(self) -> float:
        return rss_mb(self.pid)

    def close(self) -> None:
        if self.proc.poll() is not None:
            return
        self.resume()
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


def wait_workers(client: redis.Redis, namespace: str, workers: list[Worker], timeout_s: float = 30) -> None:
    """Until every one of ``workers`` registered its heartbeat (they are consuming)."""
    deadline = time.monotonic() + timeout_s
    count = len(workers)
    while time.monotonic() < deadline:
        if client.hlen(Keys(namespace).workers) >= count:
            return
        for w in workers:
            if w.proc.poll() is not None:
                raise RuntimeError(f"perf bench: a worker of {namespace} exited with code {w.proc.returncode}")
        time.sleep(0.02)
    raise TimeoutError(f"perf bench: {count} worker(s) of {namespace} did not start within {timeout_s} s")


def wait_drained(client: redis.Redis, stream: str, expected_groups: int = 1, timeout_s: float = 120,
                 poll_s: float = 0.002) -> list[int]:
    """Until every group of ``stream`` has nothing pending and nothing undelivered; returns
    the pending counts seen on the way (entries read and not yet acked: the worker's real
    concurrency, plus its unsent acks)."""
    deadline = time.monotonic() + timeout_s
    pending = []
    while time.monotonic() < deadline:
        groups = client.xinfo_groups(stream)
        if len(groups) >= expected_groups and all(
                g["pending"] == 0 and (g.get("lag") or 0) == 0 for g in groups):
            return pending
        pending.append(sum(int(g["pending"]) for g in groups))
        time.sleep(poll_s)
    raise TimeoutError(f"perf bench: {stream} not drained within {timeout_s} s")


def wait_count(client: redis.Redis, key: str, target: int, timeout_s: float = 180,
               procs: list[subprocess.Popen[bytes]] | None = None) -> None:
    """Until the integer at ``key`` reaches ``target`` (a peer's or a chatflow's done counter)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if int(client.get(key) or 0) >= target:
            return
        for proc in procs or ():
            if proc.poll() is not None:
                raise RuntimeError(f"perf bench: a worker exited with code {proc.returncode}")
        time.sleep(0.002)
    raise TimeoutError(f"perf bench: {key} did not reach {target} within {timeout_s} s")


class Profiler:
    """``py-spy record --format raw`` on one pid while a block runs (``with Profiler(...)``);
    the collapsed stacks go to ``path``. A missing py-spy raises at start. py-spy pauses the
    process for each sample (its default: whole stacks, never torn ones), so a profiled round
    is slower than a measured one; only its proportions are read. It cannot attach to a
    stopped process: enter it after SIGCONT, on a round long enough that its start-up (a
    fraction of a second) does not matter."""

    def __init__(self, pid: int, path: Path, rate: int = 500) -> None:
        self.pid, self.path, self.rate = pid, path, rate
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Profiler:
        spy = Path(sys.executable).with_name("py-spy")
        if not spy.exists():
            raise RuntimeError("py-spy is not installed in this venv: pip install py-spy")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [str(spy), "record", "--pid", str(self.pid), "--rate", str(self.rate), "--format", "raw",
             "--output", str(self.path)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGINT)
        try:
            _, err = self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        if not self.path.exists():
            raise RuntimeError(f"py-spy wrote no profile: {err.decode(errors='replace')[-500:]}")


def stop_group(proc: subprocess.Popen, wait_s: float = 10) -> None:
    """SIGCONT + SIGTERM a worker's whole process group (it was started in its own session),
    SIGKILL after ``wait_s``."""
    for sig in (signal.SIGCONT, signal.SIGTERM):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
    try:
        proc.wait(wait_s)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        proc.wait(10)
