"""Dramatiq (2 processes x 8 threads) and Huey (1 thread) with the reference handler, on the
perf suite's redis-server (``pip install -e '.[bench]'``).

Per peer: start its worker (own session), send one warm-up task and wait for it, SIGSTOP the
worker's process group, enqueue ``n`` tasks from a producer process, SIGCONT, and time until
the handler's own INCR counter says all ran; CPU is summed over the group's processes.

``python -m benchmarks.perf_peers produce FRAMEWORK N`` is the producer process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from typing import Any

import redis

from .perf_proc import ROOT, cpu_s, group_pids, rss_mb, stop_group, wait_count

PEERS = {
    "dramatiq": [sys.executable, "-m", "dramatiq", "benchmarks.perf_peer_dramatiq", "--processes", "2",
                 "--threads", "8"],
    "huey": [sys.executable, "-m", "huey.bin.huey_consumer", "benchmarks.perf_peer_huey.huey", "-k", "thread",
             "-w", "1", "-q"],
}
SETTING = {"dramatiq": "2 processes x 8 threads", "huey": "1 thread"}


def _env(url: str, namespace: str) -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT), BENCH_REDIS_URL=url, BENCH_NAMESPACE=namespace)


def _produce(url: str, namespace: str, framework: str, n: int) -> float:
    done = subprocess.run([sys.executable, "-m", "benchmarks.perf_peers", "produce", framework, str(n)],
                          cwd=ROOT, env=_env(url, namespace), capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"{framework} producer failed: {done.stderr[-2000:]}")
    seconds: float = json.loads(done.stdout.strip().splitlines()[-1])["seconds"]
    return seconds


def _group_cpu(pgid: int) -> float:
    total = 0.0
    for pid in group_pids(pgid):
        try:
            total += cpu_s(pid)
        except OSError:
            pass
    return total


def measure(url: str, framework: str, n: int) -> dict[str, Any]:
    """One peer: its rate and CPU per task with the reference handler."""
    namespace = f"perfpeer{uuid.uuid4().hex[:8]}"
    sync = redis.Redis.from_url(url)
    counter = f"{namespace}:ref:count"
    log = open(os.devnull, "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(PEERS[framework], cwd=ROOT, env=_env(url, namespace), stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _produce(url, namespace, framework, 0)  # one warm-up task
        wait_count(sync, counter, 1, 60, procs=[proc])  # type: ignore[list-item]
        time.sleep(0.5)
        rss = max((rss_mb(pid) for pid in group_pids(proc.pid)), default=0.0)
        os.killpg(proc.pid, signal.SIGSTOP)
        enqueue_s = _produce(url, namespace, framework, n)
        c0, t0 = _group_cpu(proc.pid), time.perf_counter()
        os.killpg(proc.pid, signal.SIGCONT)
        wait_count(sync, counter, n + 1, 300, procs=[proc])  # type: ignore[list-item]
        elapsed, cpu = time.perf_counter() - t0, _group_cpu(proc.pid) - c0
    finally:
        stop_group(proc)
        log.close()
        sync.delete(counter, f"{namespace}:ref:a", f"{namespace}:ref:b")
        sync.close()
    return {"setting": SETTING[framework], "per_s": n / elapsed, "cpu_us_per_event": cpu / n * 1e6,
            "enqueue_per_s": n / enqueue_s if enqueue_s else None, "idle_rss_mb": rss}


def run(url: str, n: int) -> dict[str, Any]:
    from importlib.util import find_spec

    out: dict[str, Any] = {}
    for framework in PEERS:
        if find_spec(framework) is None:
            out[framework] = {"error": f"{framework} is not installed: pip install -e '.[bench]'"}
            continue
        try:
            out[framework] = measure(url, framework, n)
        except Exception as exc:  # a missing or failing peer must not lose the other rows
            out[framework] = {"error": f"{type(exc).__name__}: {exc}"}
    return out


def _produce_main(framework: str, n: int) -> None:
    """Enqueue one untimed task (0) or ``n`` timed ones; print ``{"seconds": ...}``."""
    import importlib

    enqueue = importlib.import_module(f"benchmarks.perf_peer_{framework}").enqueue
    if n == 0:
        enqueue("warm")
        print(json.dumps({"seconds": 0.0}))
        return
    t0 = time.perf_counter()
    for i in range(n):
        enqueue(str(i))
    print(json.dumps({"seconds": time.perf_counter() - t0}))


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] != "produce" or sys.argv[2] not in PEERS:
        sys.exit(f"usage: python -m benchmarks.perf_peers produce {{{','.join(PEERS)}}} N")
    _produce_main(sys.argv[2], int(sys.argv[3]))
