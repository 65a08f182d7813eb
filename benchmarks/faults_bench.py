"""Fault-model benchmarks, on real worker processes:

* redelivery: 100,000 events, a handler that fails 10 % of first deliveries (and 1 % of
  second ones, 0.1 % always), ``ack_policy=on_success``, ``max_deliveries=3``, three workers:
  the first pass, the total until every event is processed or dead-lettered, and the rate of
  completed events. The total should be the first pass + the redelivery backoff + a little.
* resume after an empty restart: a worker runs, its redis-server is restarted with no data, and
  new events are added by raw XADD (no group): seconds until all of them are processed and acked.

``python -m benchmarks.faults_bench`` runs it alone; ``make bench`` runs it with the others.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import redis

from orchestrator.broker.embedded import EmbeddedRedis, free_port
from orchestrator.events import Event, encode_fields

ROOT = Path(__file__).resolve().parent.parent
APP = "tests.faults.apps:app"


def _start(url: str, namespace: str, out: Path, **settings: object) -> subprocess.Popen:
    env = dict(os.environ, TOKIWA_REDIS_URL=url, TOKIWA_NAMESPACE=namespace, PYTHONPATH=str(ROOT),
               TOKIWA_LOG_LEVEL="WARNING", TEST_OUT=str(out))
    for name, value in settings.items():
        env[name if name.startswith("TEST_") else f"TOKIWA_{name.upper()}"] = str(value)
    return subprocess.Popen([sys.executable, "-m", "workers.cli", "run", "--app", APP], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def _publish(client: redis.Redis, namespace: str, count: int, start: int = 0, group: bool = True) -> None:
    stream = f"{{{namespace}:0}}:events"
    if group:
        try:
            client.xgroup_create(stream, "workers", id="0", mkstream=True)
        except redis.ResponseError:
            pass
    for base in range(start, start + count, 2000):
        pipe = client.pipeline(transaction=False)
        for i in range(base, min(base + 2000, start + count)):
            pipe.xadd(stream, encode_fields(Event("job", {"i": i})))
        pipe.execute()


def _lines(path: Path) -> list[list[str]]:
    return [line.split() for line in path.read_text().splitlines()] if path.exists() else []


def _pending(client: redis.Redis, namespace: str) -> int:
    try:
        return int(client.xpending(f"{{{namespace}:0}}:events", "workers")["pending"])
    except redis.ResponseError:
        return 0


def _wait(predicate, timeout: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if predicate():
            return time.monotonic() - started
        time.sleep(0.05)
    raise RuntimeError(f"benchmark condition not reached within {timeout}s")


def redelivery(url: str, total: int = 100_000, workers: int = 3) -> dict:
    namespace = f"bench{uuid.uuid4().hex[:8]}"
    client = redis.Redis.from_url(url)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "calls.txt"
        _publish(client, namespace, total)
        backoff_ms = 1000
        started = time.monotonic()
        procs = [_start(url, namespace, out, concurrency=64, ack_policy="on_success", max_deliveries=3,
                        redelivery_backoff_ms=backoff_ms, TEST_FAIL_EVERY=10) for _ in range(workers)]
        try:
            first_pass = _wait(lambda: len(_lines(out)) >= total, 300)
            dead_expected = len(range(0, total, 1000))
            done = _wait(lambda: sum(1 for r in _lines(out) if r[3] == "ok") >= total - dead_expected
                         and client.xlen(f"{{{namespace}:0}}:dead") >= dead_expected
                         and _pending(client, namespace) == 0, 300)
            elapsed = time.monotonic() - started
        finally:
            _stop(procs)
        ok = {int(r[0]) for r in _lines(out) if r[3] == "ok"}
        calls = len(_lines(out))
    dead = client.xlen(f"{{{namespace}:0}}:dead")
    client.delete(f"{{{namespace}:0}}:events", f"{{{namespace}:0}}:dead", f"{namespace}:workers")
    return {
        "events": total, "workers": workers, "redelivery_backoff_ms": backoff_ms,
        "first_pass_s": round(first_pass, 2), "until_all_settled_s": round(elapsed, 2),
        "after_first_pass_s": round(done, 2),
        "completed_per_s": round((len(ok) + dead) / elapsed, 1),
        "processed": len(ok), "dead": dead, "handler_calls": calls,
        "lost": total - len(ok) - dead,
    }


def resume_after_empty_restart(tmp: Path, n: int = 2000) -> dict:
    namespace = f"bench{uuid.uuid4().hex[:8]}"
    server = EmbeddedRedis(tmp / "restart-redis", port=free_port())
    server.start()
    out = tmp / "restart-calls.txt"
    worker = _start(server.url, namespace, out, concurrency=32)
    try:
        client = redis.Redis.from_url(server.url)
        _publish(client, namespace, n)
        _wait(lambda: len(_lines(out)) >= n and _pending(client, namespace) == 0, 60)
        server.stop()
        server.start()
        client = redis.Redis.from_url(server.url)
        _publish(client, namespace, n, start=n, group=False)
        took = _wait(lambda: len(_lines(out)) >= 2 * n and _pending(client, namespace) == 0
                     and client.xlen(f"{{{namespace}:0}}:events") <= 200, 60)
        processed_twice = len(_lines(out)) - 2 * n
    finally:
        _stop([worker])
        server.stop()
    return {"events_after_restart": n, "resume_after_empty_restart_s": round(took, 3),
            "processed_twice": processed_twice}


def run(url: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        restart = resume_after_empty_restart(Path(tmp))
    return {"redelivery": redelivery(url), **restart}


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp, EmbeddedRedis(Path(tmp) / "redis") as server:
        print(json.dumps(run(server.url), indent=2))
