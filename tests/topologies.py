"""Real Redis topologies for tests: a Sentinel-managed master with replicas and sentinels,
each a ``redis-server`` process of the test with its own folder and config file.

Only processes started here are ever signalled, by their pid.

>>> with SentinelTopology(tmp_path) as topo:        # doctest: +SKIP
...     url = topo.url                # redis+sentinel://127.0.0.1:p1,...,127.0.0.1:p3/tokiwa
...     topo.failover()               # SENTINEL FAILOVER; or topo.kill_master()
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

from orchestrator.broker.embedded import find_redis_server, free_port

SERVICE = "tokiwa"
HOST = "127.0.0.1"


@dataclass
class Instance:
    """One redis-server (a data node or a sentinel) with its folder and config file."""

    name: str
    port: int
    dir: Path
    lines: list[str]
    sentinel: bool = False
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def conf(self) -> Path:
        return self.dir / ("sentinel.conf" if self.sentinel else "redis.conf")

    def start(self, timeout_s: float = 10.0, extra: list[str] | None = None) -> None:
        """Write the config (unless it exists: sentinels and CONFIG REWRITE keep theirs) and start."""
        self.dir.mkdir(parents=True, exist_ok=True)
        if not self.conf.exists():
            self.conf.write_text("\n".join(self.lines) + "\n")
        argv = [find_redis_server(), str(self.conf), *(["--sentinel"] if self.sentinel else []), *(extra or [])]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited at start; see {self.dir}")
            with contextlib.suppress(redis.RedisError), self.client(0.5) as client:
                if client.ping():
                    return
            time.sleep(0.02)
        raise RuntimeError(f"{self.name} did not answer on port {self.port} within {timeout_s}s")

    def client(self, timeout_s: float = 2.0) -> redis.Redis:
        return redis.Redis(host=HOST, port=self.port, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal this process (ours) and wait for it."""
        if self.alive:
            assert self.proc is not None
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def stop(self) -> None:
        self.kill(signal.SIGTERM)


def _data_lines(port: int, folder: Path) -> list[str]:
    return [f"port {port}", f"bind {HOST}", f"dir {folder}", "daemonize no", "protected-mode no",
            'save ""', "appendonly no", f"logfile {folder / 'redis.log'}",
            "repl-diskless-sync yes", "repl-diskless-sync-delay 0", "repl-ping-replica-period 1"]


class SentinelTopology:
    """A master, ``replicas`` replicas and ``sentinels`` sentinels (quorum: a majority) on
    free loopback ports, monitoring the service :data:`SERVICE`."""

    def __init__(self, base: Path, *, replicas: int = 1, sentinels: int = 3, down_after_ms: int = 1000,
                 failover_timeout_ms: int = 2000) -> None:
        self.base = base
        self.down_after_ms, self.failover_timeout_ms = down_after_ms, failover_timeout_ms
        self.data: list[Instance] = []
        for n in range(1 + replicas):
            port = free_port()
            lines = _data_lines(port, base / f"redis-{n}")
            if n:
                lines.append(f"replicaof {HOST} {self.data[0].port}")
            self.data.append(Instance(f"redis-{n}", port, base / f"redis-{n}", lines))
        master = self.data[0].port
        self.sentinels = [
            Instance(f"sentinel-{n}", port, base / f"sentinel-{n}", [
                f"port {port}", f"bind {HOST}", f"dir {base / f'sentinel-{n}'}", "daemonize no",
                "protected-mode no", f"logfile {base / f'sentinel-{n}' / 'sentinel.log'}",
                f"sentinel monitor {SERVICE} {HOST} {master} {sentinels // 2 + 1}",
                f"sentinel down-after-milliseconds {SERVICE} {down_after_ms}",
                f"sentinel failover-timeout {SERVICE} {failover_timeout_ms}",
                f"sentinel parallel-syncs {SERVICE} 1",
            ], sentinel=True)
            for n, port in ((n, free_port()) for n in range(sentinels))
        ]

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self, timeout_s: float = 30.0) -> SentinelTopology:
        """Start every process; return once the replicas are in sync and every sentinel knows
        the master, its replicas and the other sentinels (so a failover can be agreed on)."""
        try:
            for node in self.data:
                node.start()
            self.wait_replicas(len(self.data) - 1, timeout_s)
            for sentinel in self.sentinels:
                sentinel.start()
            self.wait_sentinels_ready(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for instance in [*self.sentinels, *self.data]:
            instance.stop()

    def __enter__(self) -> SentinelTopology:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- what clients use -------------------------------------------------------------------
    def url_for(self, scheme: str = "redis+sentinel", db: int = 0, query: str = "") -> str:
        hosts = ",".join(f"{HOST}:{s.port}" for s in self.sentinels)
        return f"{scheme}://{hosts}/{SERVICE}/{db}" + (f"?{query}" if query else "")

    @property
    def url(self) -> str:
        return self.url_for()

    def _sentinel_call(self, *command: str) -> object:
        error: Exception | None = None
        for sentinel in self.sentinels:
            if not sentinel.alive:
                continue
            try:
                with sentinel.client() as client:
                    return client.execute_command(*command)
            except redis.RedisError as exc:
                error = exc
        raise RuntimeError(f"no sentinel answered {command}: {error!r}")

    def master_port(self) -> int:
        """The master's port as the sentinels report it."""
        reply = self._sentinel_call("SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE)
        return int(reply[1])  # type: ignore[index]

    def instance(self, port: int) -> Instance:
        return next(node for node in self.data if node.port == port)

    def master(self) -> Instance:
        return self.instance(self.master_port())

    # -- waiting ----------------------------------------------------------------------------
    def wait_replicas(self, count: int, timeout_s: float = 20.0, master: Instance | None = None) -> float:
        """Wait until ``count`` replicas are online at the master; returns the seconds waited."""
        node = master or self.data[0]
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            with contextlib.suppress(redis.RedisError), node.client() as client:
                info = client.info("replication")
                online = [v for k, v in info.items() if k.startswith("slave") and isinstance(v, dict)
                          and v.get("state") == "online"]
                if info.get("role") == "master" and len(online) >= count:
                    return time.monotonic() - started
            time.sleep(0.05)
        raise AssertionError(f"{count} replica(s) not online at {node.name} within {timeout_s}s")

    def wait_sentinels_ready(self, timeout_s: float = 20.0) -> float:
        """Wait until every sentinel sees the replicas and the other sentinels."""
        replicas, others = len(self.data) - 1, len(self.sentinels) - 1
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            ready = 0
            for sentinel in self.sentinels:
                with contextlib.suppress(redis.RedisError), sentinel.client() as client:
                    state = client.sentinel_master(SERVICE)
                    ready += int(state["num-slaves"] >= replicas and state["num-other-sentinels"] >= others)
            if ready == len(self.sentinels):
                return time.monotonic() - started
            time.sleep(0.1)
        raise AssertionError(f"sentinels did not all see {replicas} replica(s) and {others} peers in {timeout_s}s")

    def wait_new_master(self, old_port: int, timeout_s: float = 20.0) -> int:
        """Wait until the sentinels name a master other than ``old_port`` and it answers as a
        master; returns its port."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with contextlib.suppress(RuntimeError, redis.RedisError):
                port = self.master_port()
                if port != old_port:
                    with self.instance(port).client() as client:
                        if client.info("replication").get("role") == "master":
                            return port
            time.sleep(0.05)
        raise AssertionError(f"no new master within {timeout_s}s (old {old_port})")

    # -- faults -------------------------------------------------------------------------------
    def failover(self) -> int:
        """SENTINEL FAILOVER (a forced failover, the old master stays up and becomes a
        replica); returns the old master's port."""
        old = self.master_port()
        self._sentinel_call("SENTINEL", "FAILOVER", SERVICE)
        return old

    def kill_master(self) -> Instance:
        """kill -9 of the master; returns its instance (``restart_as_replica`` brings it back)."""
        node = self.master()
        node.kill(signal.SIGKILL)
        return node

    def restart_as_replica(self, node: Instance) -> None:
        """Start a killed data node again, as a replica of the current master (what an
        operator's restart does: it comes back empty, without persistence, and resyncs)."""
        node.start(extra=["--replicaof", HOST, str(self.master_port())])
