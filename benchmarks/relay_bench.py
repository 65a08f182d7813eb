"""Relay latency, throughput, bursts and fairness between two relay processes, line to line.

Two ``python -m workers.relay.cli`` processes share one Redis. Relay A runs the writing
child(ren), relay B a subscriber child (all of them are this file, ``--role ...``). A message
is a stdout line ``<topic>:<monotonic ns> <seq>``; the subscriber records ``now - ns``
(CLOCK_MONOTONIC is shared by the processes of one host). So one sample covers: child write
-> relay A read, parse, PUBLISH (or XADD) -> Redis -> relay B read, route -> child stdin ->
child readline.

* latency: ``--messages`` messages paced ``--interval-ms`` apart -> p50 / p99 / max in ms;
* throughput: ``--burst`` messages written as fast as the publisher can -> messages/s
  (received count / time from the first write to the last read) and the loss count; the
  queues are made large (``queue_max``, ``outbox_max = 1000000``) so only speed is measured;
* burst: ``--burst-lines`` (100,000) lines written in one go by one child, with the default
  queue sizes, to a subscriber under the other relay: delivered / lost / duplicated /
  out of order and the time until the last one arrived, once over pub/sub (at most once) and
  once with the topic in ``lossless_topics`` (a Redis stream, backpressure);
* fairness: under relay A a chatty child writes as fast as it can for ``--fair-s`` seconds
  while a second child writes a ping every 10 ms; relay B's child subscribes to the pings:
  pings delivered / lost and their latency, plus the chatty child's drops.

    python benchmarks/relay_bench.py [--redis-url URL] [--only latency,burst,fair]
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

END = "end"  # ``<topic>:end <mode>`` closes a round on the message topic itself (same order)
END_REPEATS = 3  # pub/sub may drop one end marker; the subscriber reports on the first


# -- the children -----------------------------------------------------------------------------
def _out(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _go_records():
    """``(mode, count, interval_ms)`` of every ``bench.go`` line on stdin."""
    for line in sys.stdin:
        topic, _, arg = line.rstrip("\n").partition(":")
        if topic == "bench.go":
            mode, count, interval_ms = arg.split()
            yield mode, int(count), float(interval_ms)


def _end(topic: str, mode: str) -> None:
    for _ in range(END_REPEATS):
        time.sleep(0.3)
        _out(f"{topic}:{END} {mode}")


def role_pub() -> None:
    """On ``bench.go:<mode> <count> <interval_ms>`` write the messages on ``bench.msg``."""
    _out("bench.ready:pub")
    clock, write, flush = time.monotonic_ns, sys.stdout.write, sys.stdout.flush
    for mode, count, interval_ms in _go_records():
        interval = interval_ms / 1000.0
        if mode == "burst":  # as fast as a child can: buffered, flushed every 256 lines
            for seq in range(count):
                write(f"bench.msg:{clock()} {seq}\n")
                if seq % 256 == 255:
                    flush()
            flush()
        else:
            for seq in range(count):
                write(f"bench.msg:{clock()} {seq}\n")
                flush()
                if interval:
                    time.sleep(interval)  # sleeping, not spinning: 2 relays + Redis share the cores
        _end("bench.msg", mode)


def role_chatty() -> None:
    """On ``bench.go:fair <seconds> 0`` write noise lines as fast as possible for that long."""
    _out("bench.ready:chatty")
    line = "bench.noise:" + "x" * 100 + "\n"
    for mode, seconds, _ in _go_records():
        if mode != "fair":
            continue
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            sys.stdout.write(line * 64)
            sys.stdout.flush()


def role_pinger() -> None:
    """On ``bench.go:fair <seconds> <interval_ms>`` write one ping per interval for that long."""
    _out("bench.ready:pinger")
    for mode, seconds, interval_ms in _go_records():
        if mode != "fair":
            continue
        deadline, seq = time.monotonic() + seconds, 0
        while time.monotonic() < deadline:
            _out(f"bench.ping:{time.monotonic_ns()} {seq}")
            seq += 1
            time.sleep(interval_ms / 1000.0)
        _end("bench.ping", mode)


def _summary(mode: str, lat: list[int], seqs: list[int], first_sent: int, last_recv: int) -> dict[str, Any]:
    lat.sort()
    unique = len(set(seqs))
    disorder = sum(1 for a, b in zip(seqs, seqs[1:], strict=False) if b <= a)

    def pct(q: float) -> float | None:
        return round(lat[min(len(lat) - 1, int(q * len(lat)))] / 1e6, 3) if lat else None

    return {"mode": mode, "received": len(seqs), "unique": unique, "duplicates": len(seqs) - unique,
            "out_of_order": disorder, "max_seq": max(seqs) if seqs else -1,
            "elapsed_s": (last_recv - first_sent) / 1e9 if seqs else 0.0,
            "p50_ms": pct(0.50), "p90_ms": pct(0.90), "p99_ms": pct(0.99), "max_ms": pct(1.0),
            "mean_ms": round(statistics.fmean(lat) / 1e6, 3) if lat else None}


def role_sub() -> None:
    """Record every ``bench.msg`` / ``bench.ping`` until its end marker, then publish
    ``bench.result:{json}`` (once per round)."""
    _out("bench.ready:sub")
    lat: list[int] = []
    seqs: list[int] = []
    first_sent = last_recv = 0
    ended: set[str] = set()
    clock = time.monotonic_ns
    for line in sys.stdin:
        now = clock()
        topic, _, arg = line.rstrip("\n").partition(":")
        if topic not in ("bench.msg", "bench.ping"):
            continue
        head, _, rest = arg.partition(" ")
        if head == END:
            if rest not in ended and seqs:
                ended.add(rest)
                _out("bench.result:" + json.dumps(_summary(rest, lat, seqs, first_sent, last_recv)))
                lat, seqs, first_sent, last_recv = [], [], 0, 0
            continue
        sent = int(head)
        if not seqs:
            first_sent = sent
        lat.append(now - sent)
        seqs.append(int(rest or 0))
        last_recv = now


# -- the harness ------------------------------------------------------------------------------
def _task(name: str, role: str, topics: list[str], extra: str = "") -> str:
    return (f'[[tasks]]\ntask_name = "{name}"\ncommand = "{sys.executable}"\n'
            f'args = ["{Path(__file__).resolve()}", "--role", "{role}"]\n'
            f"subscribe_topics = {json.dumps(topics)}\n{extra}")


class _Bench:
    """Relay A (``a_tasks``) and relay B (``b_tasks``) on a namespace of their own."""

    def __init__(self, redis_url: str, workdir: Path, a_tasks: str, b_tasks: str, top: str = "") -> None:
        import redis

        from orchestrator.keys import Keys
        from workers.relay.transport import decode_frame

        self.keys = Keys(f"bench{uuid.uuid4().hex[:8]}")
        self.decode = decode_frame
        self.redis = redis.Redis.from_url(redis_url)
        self.pubsub = self.redis.pubsub()
        self.pubsub.psubscribe(self.keys.topic("bench.ready"), self.keys.topic("bench.result"))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
        self.procs = []
        self.workdir = workdir
        for name, tasks in (("a", a_tasks), ("b", b_tasks)):
            config = workdir / f"{self.keys.namespace}-{name}.toml"
            config.write_text(top + tasks)
            self.procs.append(subprocess.Popen(
                [sys.executable, "-m", "workers.relay.cli", str(config), "--redis-url", redis_url,
                 "--namespace", self.keys.namespace, "--log-level", "WARNING"],
                env=env, stdout=subprocess.DEVNULL, stderr=open(config.with_suffix(".log"), "wb"),  # noqa: SIM115
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

    def round(self, mode: str, count: int, interval_ms: float, timeout_s: float | None = None) -> dict[str, Any]:
        self.redis.publish(self.keys.topic("bench.go"), f"{mode} {count} {interval_ms}")
        timeout = timeout_s or 30 + count * (interval_ms / 1000.0) * 3
        return json.loads(self.wait("bench.result", 1, timeout)[0])

    def counters(self) -> dict[str, dict[str, Any]]:
        """Each relay's counters from its heartbeat in ``{ns}:relays`` (host order: A, B)."""
        import msgpack

        pids = {proc.pid: name for name, proc in zip("ab", self.procs, strict=True)}
        out = {}
        for raw in self.redis.hgetall(self.keys.relays).values():
            beat = msgpack.unpackb(raw, raw=False)
            out[pids.get(beat.get("pid"), "?")] = beat.get("counters", {})
        return out

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


def _speed(redis_url: str, tmp: Path, messages: int, interval_ms: float, burst: int) -> dict[str, Any]:
    big = "queue_max = 1000000\noutbox_max = 1000000\n"  # speed only: no queue may drop
    bench = _Bench(redis_url, tmp, _task("pub", "pub", ["bench.go"], big), _task("sub", "sub", ["bench.msg"], big))
    try:
        bench.wait("bench.ready", 2, 30)
        bench.round("warmup", 200, 0.2)
        paced = bench.round("latency", messages, interval_ms)
        before = bench.cpu_s()
        blast = bench.round("throughput", burst, 0)
        cpu = [after - b for after, b in zip(bench.cpu_s(), before, strict=True)]
    finally:
        bench.close()
    return {
        "relay_latency_p50_ms": paced["p50_ms"], "relay_latency_p99_ms": paced["p99_ms"],
        "relay_latency_max_ms": paced["max_ms"], "relay_latency_mean_ms": paced["mean_ms"],
        "relay_latency_messages": messages, "relay_latency_received": paced["unique"],
        "relay_throughput_msgs_per_s": round(blast["unique"] / blast["elapsed_s"]) if blast["elapsed_s"] else None,
        "relay_throughput_messages": burst, "relay_throughput_received": blast["unique"],
        "relay_throughput_p50_ms": blast["p50_ms"],
        # CPU per message, robust to a busy machine: publishing relay (A) and delivering relay (B)
        "relay_cpu_us_per_msg_publisher_side": round(cpu[0] / burst * 1e6, 1),
        "relay_cpu_us_per_msg_subscriber_side": round(cpu[1] / burst * 1e6, 1),
    }


def _burst(redis_url: str, tmp: Path, lines: int, lossless: bool) -> dict[str, Any]:
    """``lines`` lines from one child in one go, default queue sizes, to a remote subscriber."""
    top = 'lossless_topics = ["bench.msg"]\n' if lossless else ""
    bench = _Bench(redis_url, tmp, _task("pub", "pub", ["bench.go"]), _task("sub", "sub", ["bench.msg"]), top)
    try:
        bench.wait("bench.ready", 2, 30)
        bench.round("warmup", 200, 0.2)
        started = time.monotonic()
        got = bench.round("burst", lines, 0, timeout_s=120 + lines / 1000)
        took = time.monotonic() - started - 0.3  # the first end marker follows the burst by 0.3 s
        time.sleep(2.5)  # one more heartbeat carries the final counters
        counters = bench.counters()
    finally:
        bench.close()
    return {"lines": lines, "delivered": got["unique"], "lost": lines - got["unique"],
            "duplicates": got["duplicates"], "out_of_order": got["out_of_order"],
            "elapsed_s": round(got["elapsed_s"], 3), "round_s": round(took, 3),
            "p50_ms": got["p50_ms"], "p99_ms": got["p99_ms"],
            "publisher_dropped": counters.get("a", {}).get("publish_dropped"),
            "subscriber_overflow": counters.get("b", {}).get("overflow"),
            "counters": counters}


def _fair(redis_url: str, tmp: Path, seconds: float) -> dict[str, Any]:
    """A chatty child and a 10 ms pinger under relay A; the pings' fate under relay B."""
    a = _task("chatty", "chatty", ["bench.go"]) + _task("pinger", "pinger", ["bench.go"])
    bench = _Bench(redis_url, tmp, a, _task("sub", "sub", ["bench.ping"]))
    try:
        bench.wait("bench.ready", 3, 30)
        got = bench.round("fair", int(seconds), 10, timeout_s=60 + seconds * 3)
        time.sleep(2.5)
        counters = bench.counters()
    finally:
        bench.close()
    sent = got["max_seq"] + 1  # the pinger numbers its pings from 0; the last is rarely lost
    return {"seconds": seconds, "pings_sent_at_least": sent, "pings_delivered": got["unique"],
            "pings_lost": sent - got["unique"], "ping_p50_ms": got["p50_ms"], "ping_p99_ms": got["p99_ms"],
            "ping_max_ms": got["max_ms"], "counters": counters}


def run(redis_url: str, *, messages: int = 2000, interval_ms: float = 1.0, burst: int = 20000,
        burst_lines: int = 100_000, fair_s: float = 5.0, only: tuple[str, ...] = ()) -> dict[str, Any]:
    """Measure latency (paced), throughput, a 100,000-line burst (pub/sub and lossless) and
    fairness between two relay processes."""
    result: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="tokiwa-relay-bench-") as tmp:
        if not only or "latency" in only:
            result.update(_speed(redis_url, Path(tmp), messages, interval_ms, burst))
        if not only or "burst" in only:
            result["relay_burst_pubsub"] = _burst(redis_url, Path(tmp), burst_lines, lossless=False)
            result["relay_burst_lossless"] = _burst(redis_url, Path(tmp), burst_lines, lossless=True)
        if not only or "fair" in only:
            result["relay_fairness"] = _fair(redis_url, Path(tmp), fair_s)
    return result


def _print(result: dict[str, Any], args: argparse.Namespace) -> None:
    if "relay_latency_p50_ms" in result:
        print(f"relay latency  p50 {result['relay_latency_p50_ms']:.3f} ms  p99 {result['relay_latency_p99_ms']:.3f} ms"
              f"  ({result['relay_latency_received']}/{args.messages} messages)")
        print(f"relay throughput {result['relay_throughput_msgs_per_s']} msgs/s"
              f"  ({result['relay_throughput_received']}/{args.burst} messages)")
        print(f"relay CPU per message: {result['relay_cpu_us_per_msg_publisher_side']} us publishing side, "
              f"{result['relay_cpu_us_per_msg_subscriber_side']} us delivering side")
    for name in ("relay_burst_pubsub", "relay_burst_lossless"):
        if name in result:
            b = result[name]
            print(f"{name}: {b['delivered']}/{b['lines']} delivered, {b['lost']} lost, {b['duplicates']} duplicated, "
                  f"{b['out_of_order']} out of order, last after {b['elapsed_s']} s "
                  f"(publisher dropped {b['publisher_dropped']}, subscriber overflow {b['subscriber_overflow']})")
    if "relay_fairness" in result:
        f = result["relay_fairness"]
        print(f"relay fairness: {f['pings_delivered']}/{f['pings_sent_at_least']} pings delivered next to a chatty "
              f"child, p50 {f['ping_p50_ms']} ms, p99 {f['ping_p99_ms']} ms, max {f['ping_max_ms']} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--role", choices=["pub", "sub", "chatty", "pinger"], help=argparse.SUPPRESS)
    parser.add_argument("--redis-url", default=os.environ.get("TOKIWA_REDIS_URL"))
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--interval-ms", type=float, default=1.0)
    parser.add_argument("--burst", type=int, default=20000)
    parser.add_argument("--burst-lines", type=int, default=100_000)
    parser.add_argument("--fair-s", type=float, default=5.0)
    parser.add_argument("--only", default="", help="comma-separated: latency, burst, fair (default: all)")
    args = parser.parse_args()
    if args.role:
        {"pub": role_pub, "sub": role_sub, "chatty": role_chatty, "pinger": role_pinger}[args.role]()
        return
    server = None
    url = args.redis_url
    if not url:
        from orchestrator.broker.embedded import EmbeddedRedis

        server = EmbeddedRedis(Path(tempfile.mkdtemp(prefix="tokiwa-bench-redis-"))).start()
        url = server.url
    try:
        result = run(url, messages=args.messages, interval_ms=args.interval_ms, burst=args.burst,
                     burst_lines=args.burst_lines, fair_s=args.fair_s,
                     only=tuple(x for x in args.only.split(",") if x))
    finally:
        if server is not None:
            server.stop()
    _print(result, args)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
