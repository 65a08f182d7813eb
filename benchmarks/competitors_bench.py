"""Head-to-head: tokiwa vs Celery, Dramatiq and Huey on one embedded redis-server.

``python -m benchmarks.competitors_bench [--quick] [--n N] [--repeats R]``

Per run: start one worker (own session), send a warm-up task and wait until it is counted,
measure idle RSS, SIGSTOP the worker's process group, enqueue ``N`` tasks from one producer
process (timed there), SIGCONT, and time until the shared counter says all were processed.
Every task (tokiwa's included) does exactly one ``INCR``; that is the "done" signal for all.
Each setting runs ``repeats`` times; the medians are reported. See benchmarks/COMPETITORS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

import redis

from benchmarks.perf_proc import group_pids, stop_group
from orchestrator.broker.embedded import EmbeddedRedis
from orchestrator.errors import InvalidArgumentError, StateError

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
COUNTER = "bench:competitors:done"
QUEUE = "bench"
PY = sys.executable


@dataclass(frozen=True)
class Setting:
    framework: str
    label: str
    args: tuple[str, ...]
    env: dict = field(default_factory=dict)
    comparable: bool = False  # the like-for-like setting (~16 threads/tasks, one process)


def _worker_argv(s: Setting) -> list[str]:
    base = {
        "tokiwa": [PY, "-m", "workers.cli", "run", "--app", "benchmarks.competitor_apps.tokiwa_app:app",
                   "--log-level", "WARNING"],
        "celery": [PY, "-m", "celery", "-A", "benchmarks.competitor_apps.celery_app", "worker", "-Q", QUEUE,
                   "--without-gossip", "--without-mingle", "--without-heartbeat", "-l", "WARNING"],
        "dramatiq": [PY, "-m", "dramatiq", "benchmarks.competitor_apps.dramatiq_app"],
        "huey": [PY, "-m", "huey.bin.huey_consumer", "benchmarks.competitor_apps.huey_app.huey", "-q"],
    }[s.framework]
    return base + list(s.args)


SETTINGS = [
    Setting("tokiwa", "concurrency 16", ("--concurrency", "16"), comparable=True),
    Setting("tokiwa", "concurrency 64", ("--concurrency", "64")),
    Setting("celery", "threads 16", ("--pool", "threads", "--concurrency", "16"), comparable=True),
    Setting("celery", "prefork 2", ("--pool", "prefork", "--concurrency", "2")),
    Setting("celery", "threads 16, prefetch x64", ("--pool", "threads", "--concurrency", "16"),
            {"BENCH_CELERY_PREFETCH": "64"}),
    Setting("celery", "solo", ("--pool", "solo")),
    Setting("dramatiq", "processes 1 threads 16", ("--processes", "1", "--threads", "16"), comparable=True),
    Setting("dramatiq", "processes 1 threads 4", ("--processes", "1", "--threads", "4")),
    Setting("dramatiq", "processes 2 threads 8", ("--processes", "2", "--threads", "8")),
    Setting("huey", "thread 16", ("-k", "thread", "-w", "16"), comparable=True),
    Setting("huey", "thread 4", ("-k", "thread", "-w", "4")),
    Setting("huey", "process 2", ("-k", "process", "-w", "2")),
]


def _env(url: str, extra: dict | None = None) -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT), BENCH_REDIS_URL=url, BENCH_COUNTER=COUNTER,
                BENCH_QUEUE=QUEUE, TOKIWA_REDIS_URL=url, TOKIWA_NAMESPACE="benchcomp",
                TOKIWA_LOG_LEVEL="WARNING", **(extra or {}))


def _rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _produce(url: str, framework: str, n: int, batch: bool = False, timeout: float = 180) -> dict:
    argv = [PY, "-m", "benchmarks.competitor_apps.produce", framework, str(n)] + (["--batch"] if batch else [])
    done = subprocess.run(argv, cwd=ROOT, env=_env(url), capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise StateError(f"{framework} producer failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _wait_count(client: redis.Redis, target: int, timeout: float, proc: subprocess.Popen) -> bool:
    """True once the counter reaches ``target``; False at the deadline; StateError if the worker died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if int(client.get(COUNTER) or 0) >= target:
            return True
        if proc.poll() is not None:
            raise StateError(f"worker exited with code {proc.returncode} (log above)")
        time.sleep(0.005)
    return False


def measure(url: str, setting: Setting, n: int, timeout: float = 120) -> dict:
    """One run of one setting; the Redis database is flushed first."""
    client = redis.Redis.from_url(url)
    client.flushall()
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(_worker_argv(setting), cwd=ROOT, env=_env(url, setting.env),
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _produce(url, setting.framework, 1)  # warm-up: 2 tasks (1 untimed + 1 timed)
        if not _wait_count(client, 2, 60, proc):
            raise StateError(f"{setting.framework} worker never processed the warm-up (log above)")
        time.sleep(0.5)
        pids = group_pids(proc.pid)
        rss = {pid: _rss_mb(pid) for pid in pids}
        os.killpg(proc.pid, signal.SIGSTOP)
        sent = _produce(url, setting.framework, n)
        t0 = time.perf_counter()
        os.killpg(proc.pid, signal.SIGCONT)
        finished = _wait_count(client, 2 + sent["sent"], timeout, proc)
        elapsed = time.perf_counter() - t0
        count = int(client.get(COUNTER) or 0) - 2
        return {
            "enqueue_per_s": n / sent["seconds"],
            "process_per_s": n / elapsed if finished else None,
            "processed": count,
            "expected": sent["sent"],
            "timed_out": not finished,
            "idle_rss_mb": max(rss.values(), default=0.0),  # the largest process (the worker)
            "idle_rss_total_mb": sum(rss.values()),
            "processes": len(pids),
        }
    except Exception:
        log.seek(0)
        sys.stderr.write(log.read()[-3000:].decode(errors="replace"))
        raise
    finally:
        stop_group(proc)
        log.close()


def _median(runs: list[dict], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


def _summary(setting: Setting, runs: list[dict]) -> dict:
    return {
        "framework": setting.framework, "setting": setting.label, "comparable": setting.comparable,
        "worker_argv": _worker_argv(setting)[1:], "env": setting.env,
        "enqueue_per_s": _median(runs, "enqueue_per_s"), "process_per_s": _median(runs, "process_per_s"),
        "idle_rss_mb": _median(runs, "idle_rss_mb"), "idle_rss_total_mb": _median(runs, "idle_rss_total_mb"),
        "processes": runs[0]["processes"] if runs else None, "runs": runs,
    }


def _versions() -> dict:
    out = {"python": platform.python_version(), "redis_server": None}
    for dist in ("celery", "kombu", "dramatiq", "huey", "redis", "hiredis"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def run(redis_url: str, n: int = 20_000, repeats: int = 3, alt_repeats: int = 1,
        settings: list[Setting] | None = None) -> dict:
    """Every setting ``repeats`` (comparable) or ``alt_repeats`` (others) times; medians per setting."""
    if n < 1 or repeats < 1 or alt_repeats < 1:
        raise InvalidArgumentError(f"n, repeats and alt_repeats must be >= 1, got {n}, {repeats}, {alt_repeats}")
    results = []
    for setting in settings or SETTINGS:
        runs = []
        for _ in range(repeats if setting.comparable else alt_repeats):
            try:
                runs.append(measure(redis_url, setting, n))
            except Exception as exc:  # noqa: BLE001 - one failing framework must not lose the rest
                runs.append({"error": repr(exc)})
            print(f"  {setting.framework:8} {setting.label:28} {runs[-1]}", file=sys.stderr, flush=True)
        results.append(_summary(setting, [r for r in runs if "error" not in r]) | {
            "errors": [r["error"] for r in runs if "error" in r]})
    batch = [n / _produce(redis_url, "tokiwa", n, batch=True)["seconds"] for _ in range(repeats)]
    redis.Redis.from_url(redis_url).flushall()
    versions = _versions()
    versions["redis_server"] = redis.Redis.from_url(redis_url).info("server")["redis_version"]
    return {"n": n, "repeats": repeats, "alt_repeats": alt_repeats, "versions": versions,
            "cpus": os.cpu_count(), "results": results, "tokiwa_publish_many_per_s": statistics.median(batch),
            "best": _best(results)}


def _best(results: list[dict]) -> dict:
    best: dict = {}
    for r in results:
        cur = best.get(r["framework"])
        if r["process_per_s"] and (cur is None or r["process_per_s"] > cur["process_per_s"]):
            best[r["framework"]] = {"setting": r["setting"], "process_per_s": r["process_per_s"]}
    return best


def _fmt(v: float | None, digits: int = 0) -> str:
    return "-" if v is None else f"{v:,.{digits}f}"


def table(report: dict) -> str:
    lines = [f"N={report['n']}  repeats={report['repeats']} (comparable), {report['alt_repeats']} (others)",
             f"{'framework':9} {'setting':30} {'enqueue/s':>10} {'process/s':>10} {'RSS MB':>7} {'all MB':>7}"]
    for r in report["results"]:
        mark = "*" if r["comparable"] else " "
        lines.append(f"{r['framework']:9} {mark}{r['setting']:29} {_fmt(r['enqueue_per_s']):>10} "
                     f"{_fmt(r['process_per_s']):>10} {_fmt(r['idle_rss_mb'], 1):>7} "
                     f"{_fmt(r['idle_rss_total_mb'], 1):>7}" + ("  ERRORS" if r["errors"] else ""))
    lines.append(f"tokiwa publish_many (500/call) enqueue/s: {_fmt(report['tokiwa_publish_many_per_s'])}")
    lines.append("* = like-for-like setting; best per framework: "
                 + ", ".join(f"{k}: {v['setting']} {_fmt(v['process_per_s'])}/s" for k, v in report["best"].items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="tokiwa vs Celery, Dramatiq, Huey")
    parser.add_argument("--quick", action="store_true", help="N=5000, 2 repeats")
    parser.add_argument("--n", type=int)
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--only", help="comma-separated frameworks")
    args = parser.parse_args(argv)
    n = args.n if args.n is not None else (5_000 if args.quick else 20_000)
    repeats = args.repeats if args.repeats is not None else (2 if args.quick else 3)
    if n < 1 or repeats < 1:
        parser.error("--n and --repeats must be >= 1")
    settings = SETTINGS
    if args.only:
        wanted = set(args.only.split(","))
        unknown = wanted - {s.framework for s in SETTINGS}
        if unknown:
            parser.error(f"unknown framework(s) {sorted(unknown)}; choose from tokiwa, celery, dramatiq, huey")
        settings = [s for s in SETTINGS if s.framework in wanted]
    with tempfile.TemporaryDirectory() as state, EmbeddedRedis(state) as server:
        report = run(server.url, n=n, repeats=repeats, settings=settings)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    report["utc"] = stamp
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"competitors-{stamp}.json"
    path.write_text(json.dumps(report, indent=2))
    print(table(report))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
