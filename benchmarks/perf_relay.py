"""Relay row of the perf suite: remote topic messages at a steady 10,000 msgs/s from four
children under relay A to one subscriber child under relay B (two relay processes, one
Redis). Each child writes ``bench.msg:<monotonic ns> <child>:<seq>`` lines on a schedule
(2,500 per second each); the subscriber records ``now - ns`` per line, so a sample covers
child write -> relay A -> Redis pub/sub -> relay B -> child stdin. The process harness is
``benchmarks.relay_bench._Bench``; the children are this file (``--role``).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CHILDREN = 4
END_REPEATS = 3


def _out(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def role_writer(child: str) -> None:
    """On ``bench.go:<mode> <per_child> <interval_ms>`` write that many lines, one due every
    ``interval_ms`` (the due ones at once, then sleep until the next is due)."""
    _out(f"bench.ready:{child}")
    clock = time.monotonic_ns
    for line in sys.stdin:
        topic, _, arg = line.rstrip("\n").partition(":")
        if topic != "bench.go":
            continue
        mode, count, interval_ms = arg.split()
        step_ns = int(float(interval_ms) * 1e6)
        start, seq, total = clock(), 0, int(count)
        while seq < total:
            now = clock()
            due = min(total, (now - start) // step_ns + 1)
            while seq < due:
                sys.stdout.write(f"bench.msg:{clock()} {child}:{seq}\n")
                seq += 1
            sys.stdout.flush()
            time.sleep(max(0.0, (start + seq * step_ns - clock()) / 1e9))
        for _ in range(END_REPEATS):
            time.sleep(0.3)
            _out(f"bench.msg:end {mode} {child}")


def role_sub(children: int) -> None:
    """Record every ``bench.msg`` line; when each child's end marker arrived, publish
    ``bench.result:{json}`` for the round."""
    _out("bench.ready:sub")
    lat: list[int] = []
    seen: set[str] = set()
    ends: dict[str, set[str]] = {}
    reported: set[str] = set()
    clock = time.monotonic_ns
    for line in sys.stdin:
        now = clock()
        topic, _, arg = line.rstrip("\n").partition(":")
        if topic != "bench.msg":
            continue
        head, _, rest = arg.partition(" ")
        if head == "end":
            mode, _, child = rest.partition(" ")
            done = ends.setdefault(mode, set())
            done.add(child)
            if len(done) == children and lat and mode not in reported:
                reported.add(mode)
                lat.sort()

                def pct(q: float, lat: list[int] = lat) -> float:
                    return round(lat[min(len(lat) - 1, int(q * len(lat)))] / 1e6, 3)

                _out("bench.result:" + json.dumps({"mode": mode, "received": len(lat), "unique": len(seen),
                                                   "p50_ms": pct(0.5), "p99_ms": pct(0.99), "max_ms": pct(1.0)}))
                lat, seen = [], set()
            continue
        lat.append(now - int(head))
        seen.add(rest)


def _task(name: str, role: str, topics: list[str]) -> str:
    return (f'[[tasks]]\ntask_name = "{name}"\ncommand = "{sys.executable}"\n'
            f'args = ["{Path(__file__).resolve()}", "--role", "{role}"]\n'
            f"subscribe_topics = {json.dumps(topics)}\n")


def run(redis_url: str, *, rate: int = 10_000, seconds: float = 3.0) -> dict[str, Any]:
    """p50 / p99 / max ms of ``rate`` msgs/s for ``seconds`` from :data:`CHILDREN` children."""
    from benchmarks.relay_bench import _Bench

    per_child = int(rate * seconds / CHILDREN)
    interval_ms = 1000 * CHILDREN / rate
    writers = "".join(_task(f"w{i}", f"writer:w{i}", ["bench.go"]) for i in range(CHILDREN))
    with tempfile.TemporaryDirectory(prefix="tokiwa-perf-relay-") as tmp:
        bench = _Bench(redis_url, Path(tmp), writers, _task("sub", f"sub:{CHILDREN}", ["bench.msg"]))
        try:
            bench.wait("bench.ready", CHILDREN + 1, 30)
            bench.round("warmup", 250, interval_ms)
            time.sleep(1.0)  # the warm-up's repeated end markers pass
            got = bench.round("steady", per_child, interval_ms, timeout_s=60 + seconds * 3)
        finally:
            bench.close()
    return {"rate_msgs_per_s": rate, "children": CHILDREN, "messages": per_child * CHILDREN,
            "received": got["unique"], "p50_ms": got["p50_ms"], "p99_ms": got["p99_ms"], "max_ms": got["max_ms"]}


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--role":
        role, _, arg = sys.argv[2].partition(":")
        role_writer(arg) if role == "writer" else role_sub(int(arg))
    else:
        sys.exit("perf_relay children are started by benchmarks.perf_bench (python -m benchmarks.perf_bench)")
