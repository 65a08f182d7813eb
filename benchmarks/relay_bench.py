"""Relay latency and throughput between two relay processes, line to line.

Two ``python -m workers.relay_cli`` processes share one Redis. Relay A runs a publisher
child, relay B a subscriber child (both are this file, ``--role pub|sub``). A message is a
stdout line ``bench.msg:<monotonic ns>`` of the publisher; the subscriber reads
``bench.msg:<ns>`` on its stdin and records ``now - ns`` (CLOCK_MONOTONIC is shared by the
processes of one host). So one sample covers: child write -> relay A read, parse, PUBLISH ->
Redis -> relay B pub/sub read, route -> child stdin -> child readline.

* latency: ``--messages`` messages paced ``--interval-ms`` apart -> p50 / p99 / max in ms;
* throughput: ``--burst`` messages written as fast as the publisher can -> messages/s
  (received count / time from the first write to the last read) and the loss count.

    python benchmarks/relay_bench.py [--redis-url URL]      # prints a table and JSON
    from benchmarks.relay_bench import run; run(redis_url)  # -> dict (the make bench harness)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


# -- the two children -------------------------------------------------------------------------
def _out(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def role_pub() -> None:
    """Wait for ``bench.go:<mode> <count> <interval_ms>``, then write the messages."""
    _out("bench.ready:pub")
    for line in sys.stdin:
        topic, _, arg = line.rstrip("\n").partition(":")
        if topic != "bench.go":
            continue
        mode, count, interval_ms = arg.split()
        interval = float(interval_ms) / 1000.0
        clock, write, flush = time.monotonic_ns, sys.stdout.write, sys.stdout.flush
        for _ in range(int(count)):
            write(f"bench.msg:{clock()}\n")
            flush()
            if interval:
                time.sleep(interval)  # sleeping, not spinning: 2 relays + Redis share the cores
        _out(f"bench.end:{mode}")


def role_sub() -> None:
    """Record latencies until ``bench.end``, then publish ``bench.result:{json}``."""
    _out("bench.ready:sub")
    lat: list[int] = []
    first_sent = last_recv = 0
    clock = time.monotonic_ns
    for line in sys.stdin:
        now = clock()
        topic, _, arg = line.rstrip("\n").partition(":")
        if topic == "bench.msg":
            sent = int(arg)
            if not lat:
                first_sent = sent
            lat.append(now - sent)
            last_recv = now
        elif topic == "bench.end":
            result = {"mode": arg, "received": len(lat), "elapsed_s": (last_recv - first_sent) / 1e9,
                      "lat_ns": sorted(lat)}
            _out("bench.result:" + json.dumps(result))
            lat, first_sent, last_recv = [], 0, 0


# -- the harness ------------------------------------------------------------------------------
def _task(name: str, role: str, topics: list[str]) -> str:
    return (f'[[tasks]]\ntask_name = "{name}"\ncommand = "{sys.executable}"\n'
            f'args = ["{Path(__file__).resolve()}", "--role", "{role}"]\n'
            f"subscribe_topics = {json.dumps(topics)}\nqueue_max = 1000000\n")


def _percentile(sorted_ns: list[int], q: float) -> float:
    if not sorted_ns:
        return float("nan")
    return sorted_ns[min(len(sorted_ns) - 1, int(q * len(sorted_ns)))] / 1e6


class _Bench:
    def __init__(self, redis_url: str, workdir: Path) -> None:
        import redis

        from orchestrator.keys import Keys
        from workers.relay_transport import decode_frame

        self.keys = Keys(f"bench{uuid.uuid4().hex[:8]}")
        self.decode = decode_frame
        self.redis = redis.Redis.from_url(redis_url)
        self.pubsub = self.redis.pubsub()
        self.pubsub.psubscribe(self.keys.topic("bench.ready"), self.keys.topic("bench.result"))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
        self.procs = []
        for name, role, topics in (("pub", "pub", ["bench.go"]), ("sub", "sub", ["bench.msg", "bench.end"])):
            config = workdir / f"{name}.toml"
            config.write_text(_task(name, role, topics))
            self.procs.append(subprocess.Popen(
                [sys.executable, "-m", "workers.relay_cli", str(config), "--redis-url", redis_url,
                 "--namespace", self.keys.namespace, "--log-level", "WARNING"],
                env=env, stdout=subprocess.DEVNULL, stderr=open(workdir / f"{name}.log", "wb"),
                stdin=subprocess.DEVNULL))

    def wait(self, topic: str, count: int, timeout_s: float) -> list[str]:
        got, deadline = [], time.monotonic() + timeout_s
        while len(got) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"relay bench: no {topic} within {timeout_s}s")
            msg = self.pubsub.get_message(timeout=0.5)
            if msg and msg["type"] == "pmessage" and msg["channel"].decode() == self.keys.topic(topic):
                got.extend(self.decode(msg["data"])[3])
        return got

    def round(self, mode: str, count: int, interval_ms: float) -> dict[str, Any]:
        self.redis.publish(self.keys.topic("bench.go"), f"{mode} {count} {interval_ms}")
        timeout = 30 + count * (interval_ms / 1000.0) * 3
        return json.loads(self.wait("bench.result", 1, timeout)[0])

    def cpu_s(self) -> list[float]:
        """CPU seconds (user + system) used so far by each relay process (Linux /proc)."""
        ticks = os.sysconf("SC_CLK_TCK")
        out = []
        for proc in self.procs:
            with open(f"/proc/{proc.pid}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            out.append((int(fields[11]) + int(fields[12])) / ticks)
        return out

    def close(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        self.pubsub.close()
        self.redis.close()


def run(redis_url: str, *, messages: int = 2000, interval_ms: float = 1.0, burst: int = 20000) -> dict[str, Any]:
    """Measure relay latency (paced) and throughput (burst) between two relay processes."""
    with tempfile.TemporaryDirectory(prefix="tokiwa-relay-bench-") as tmp:
        bench = _Bench(redis_url, Path(tmp))
        try:
            bench.wait("bench.ready", 2, 30)
            bench.round("warmup", 200, 0.2)
            paced = bench.round("latency", messages, interval_ms)
            before = bench.cpu_s()
            blast = bench.round("throughput", burst, 0)
            cpu = [after - b for after, b in zip(bench.cpu_s(), before, strict=True)]
        finally:
            bench.close()
    lat = paced["lat_ns"]
    return {
        "relay_latency_p50_ms": round(_percentile(lat, 0.50), 3),
        "relay_latency_p99_ms": round(_percentile(lat, 0.99), 3),
        "relay_latency_max_ms": round(lat[-1] / 1e6, 3) if lat else None,
        "relay_latency_mean_ms": round(statistics.fmean(lat) / 1e6, 3) if lat else None,
        "relay_latency_messages": messages, "relay_latency_received": paced["received"],
        "relay_throughput_msgs_per_s": round(blast["received"] / blast["elapsed_s"]) if blast["elapsed_s"] else None,
        "relay_throughput_messages": burst, "relay_throughput_received": blast["received"],
        "relay_throughput_p50_ms": round(_percentile(blast["lat_ns"], 0.50), 3),
        # CPU per message, robust to a busy machine: publishing relay (A) and delivering relay (B)
        "relay_cpu_us_per_msg_publisher_side": round(cpu[0] / burst * 1e6, 1),
        "relay_cpu_us_per_msg_subscriber_side": round(cpu[1] / burst * 1e6, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--role", choices=["pub", "sub"], help=argparse.SUPPRESS)
    parser.add_argument("--redis-url", default=os.environ.get("TOKIWA_REDIS_URL"))
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--interval-ms", type=float, default=1.0)
    parser.add_argument("--burst", type=int, default=20000)
    args = parser.parse_args()
    if args.role:
        role_pub() if args.role == "pub" else role_sub()
        return
    server = None
    url = args.redis_url
    if not url:
        from orchestrator.embedded import EmbeddedRedis

        server = EmbeddedRedis(Path(tempfile.mkdtemp(prefix="tokiwa-bench-redis-"))).start()
        url = server.url
    try:
        result = run(url, messages=args.messages, interval_ms=args.interval_ms, burst=args.burst)
    finally:
        if server is not None:
            server.stop()
    print(f"relay latency  p50 {result['relay_latency_p50_ms']:.3f} ms  p99 {result['relay_latency_p99_ms']:.3f} ms"
          f"  ({result['relay_latency_received']}/{args.messages} messages)")
    print(f"relay throughput {result['relay_throughput_msgs_per_s']} msgs/s"
          f"  ({result['relay_throughput_received']}/{args.burst} messages)")
    print(f"relay CPU per message: {result['relay_cpu_us_per_msg_publisher_side']} us publishing side, "
          f"{result['relay_cpu_us_per_msg_subscriber_side']} us delivering side")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
