"""A local Redis Cluster for tests and benchmarks: 3 masters and 3 replicas on loopback.

Six ``redis-server`` processes (``cluster-enabled yes``), each with its own directory and
config file, on free loopback ports (client port and cluster-bus port both picked free, so
neither has to be ``port + 10000``), joined by ``redis-cli --cluster create ...
--cluster-replicas 1 --cluster-yes``. :meth:`LocalCluster.start` returns once every node
reports ``cluster_state:ok``, knows all six nodes, and every replica's link to its master is
up (so a master killed right after has a replica with its data).

    with LocalCluster(tmp_dir) as cluster:
        url = cluster.url                      # redis+cluster://127.0.0.1:p1,127.0.0.1:p2,...
        victim = cluster.master_of(b"{ns:0}:events")
        promoted = cluster.kill_and_wait_promotion(victim)

Processes are only ever signalled by the pid this helper started. ``node_timeout_ms`` (the
cluster's ``cluster-node-timeout``) sets how fast a dead master is noticed: the default,
1 s, promotes a replica within about 2-3 s.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import redis
from redis.crc import key_slot

from orchestrator.broker.embedded import find_redis_server

MASTERS = 3
REPLICAS_PER_MASTER = 1


def _free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports on 127.0.0.1 that were free a moment ago (all bound at
    once, so none is handed out twice)."""
    socks = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            socks.append(sock)
        return [s.getsockname()[1] for s in socks]
    finally:
        for sock in socks:
            sock.close()


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _cli_binary(server: str) -> str:
    """The redis-cli next to ``server``, else the one on PATH."""
    beside = Path(server).with_name("redis-cli")
    return str(beside) if beside.exists() else "redis-cli"


@dataclass
class ClusterNode:
    """One redis-server process of the cluster."""

    port: int
    bus_port: int
    directory: Path
    process: subprocess.Popen[bytes] | None = None
    node_id: str = ""

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def client(self, timeout_s: float = 1.0) -> redis.Redis:
        """A plain (non-cluster) client of this node alone; the caller closes it."""
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=timeout_s,
                           socket_connect_timeout=timeout_s)

    def info(self, section: str) -> dict[str, object]:
        client = self.client()
        try:
            return client.info(section)
        finally:
            client.close()

    def cluster_info(self) -> dict[str, str]:
        client = self.client()
        try:
            raw = client.execute_command("CLUSTER INFO")  # redis-py parses it into a dict
        finally:
            client.close()
        if isinstance(raw, dict):
            return {_text(k): _text(v) for k, v in raw.items()}
        return dict(line.split(":", 1) for line in _text(raw).split() if ":" in line)


@dataclass
class LocalCluster:
    """A 3-master, 3-replica Redis Cluster under ``root`` (see the module doc)."""

    root: Path
    node_timeout_ms: int = 1000
    #: Redis's default (``yes``): while a master is down and not yet replaced, the whole
    #: cluster answers CLUSTERDOWN, the strictest case for clients
    require_full_coverage: bool = True
    nodes: list[ClusterNode] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        self.server = find_redis_server()
        self.cli = _cli_binary(self.server)

    # -- lifecycle --------------------------------------------------------------------------
    def start(self, timeout_s: float = 30.0) -> LocalCluster:
        """Start the six servers, create the cluster and wait until it is ready."""
        count = MASTERS * (1 + REPLICAS_PER_MASTER)
        ports = _free_ports(2 * count)
        self.nodes = [ClusterNode(ports[2 * i], ports[2 * i + 1], self.root / f"node-{i}") for i in range(count)]
        deadline = time.monotonic() + timeout_s
        try:
            for node in self.nodes:
                self._launch(node)
            for node in self.nodes:
                self._wait_ping(node, deadline)
            self._create(deadline)
            self.wait_ready(max(1.0, deadline - time.monotonic()))
        except BaseException:
            self.stop()
            raise
        return self

    def _write_conf(self, node: ClusterNode) -> Path:
        node.directory.mkdir(parents=True, exist_ok=True)
        conf = node.directory / "redis.conf"
        conf.write_text("\n".join([
            f"port {node.port}",
            f"cluster-port {node.bus_port}",
            "bind 127.0.0.1",
            "protected-mode no",
            "daemonize no",
            f"dir {node.directory}",
            f"logfile {node.directory / 'redis.log'}",
            "cluster-enabled yes",
            "cluster-config-file nodes.conf",
            f"cluster-node-timeout {self.node_timeout_ms}",
            # any replica may take over, however long its link was down (tests kill masters)
            "cluster-replica-validity-factor 0",
            f"cluster-require-full-coverage {'yes' if self.require_full_coverage else 'no'}",
            # a replica's first full sync starts at once (Redis waits 5 s for more replicas)
            "repl-diskless-sync-delay 0",
            'save ""',
            "appendonly no",
            "",
        ]))
        return conf

    def _launch(self, node: ClusterNode) -> None:
        conf = self._write_conf(node)
        node.process = subprocess.Popen([self.server, str(conf)], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE, start_new_session=True)

    def _wait_ping(self, node: ClusterNode, deadline: float) -> None:
        while time.monotonic() < deadline:
            if node.process is not None and node.process.poll() is not None:
                err = node.process.stderr.read().decode(errors="replace") if node.process.stderr else ""
                raise RuntimeError(f"redis-server {node.address} exited at start: {err.strip()}")
            client = node.client(0.2)
            try:
                if client.ping():
                    return
            except redis.RedisError:
                pass
            finally:
                client.close()
            time.sleep(0.02)
        raise TimeoutError(f"redis-server {node.address} did not answer in time")

    def _create(self, deadline: float) -> None:
        argv = [self.cli, "--cluster", "create", *(n.address for n in self.nodes),
                "--cluster-replicas", str(REPLICAS_PER_MASTER), "--cluster-yes"]
        done = subprocess.run(argv, capture_output=True, text=True,
                              timeout=max(1.0, deadline - time.monotonic()), check=False)
        if done.returncode != 0 or "[OK] All 16384 slots covered" not in done.stdout:
            raise RuntimeError(f"redis-cli --cluster create failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")

    def wait_ready(self, timeout_s: float = 30.0) -> float:
        """Wait until every live node says ``cluster_state:ok``, sees the others, and every
        live replica's link to its master is up; returns the seconds it took."""
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            if self._ready():
                self._read_ids()
                return time.monotonic() - started
            time.sleep(0.05)
        states = {n.address: self._state(n) for n in self.nodes if n.alive}
        raise TimeoutError(f"cluster not ready within {timeout_s}s: {states}")

    def _state(self, node: ClusterNode) -> str:
        try:
            return node.cluster_info().get("cluster_state", "?")
        except redis.RedisError as exc:
            return f"error: {exc}"

    def _ready(self) -> bool:
        live = [n for n in self.nodes if n.alive]
        try:
            for node in live:
                info = node.cluster_info()
                if info.get("cluster_state") != "ok" or int(info.get("cluster_known_nodes", 0)) < len(self.nodes):
                    return False
                replication = node.info("replication")
                if replication.get("role") == "slave" and replication.get("master_link_status") != "up":
                    return False
        except redis.RedisError:
            return False
        return True

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop every node this helper started (SIGTERM, then SIGKILL). Idempotent."""
        for node in self.nodes:
            if node.alive:
                node.process.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        for node in self.nodes:
            proc = node.process
            if proc is None:
                continue
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout_s)
            if proc.stderr is not None:
                proc.stderr.close()

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- topology ---------------------------------------------------------------------------
    @property
    def url(self) -> str:
        """``redis+cluster://`` URL listing every node as a seed."""
        return "redis+cluster://" + ",".join(n.address for n in self.nodes)

    def _seed(self) -> ClusterNode:
        return next(n for n in self.nodes if n.alive)

    def _cluster_nodes(self) -> list[dict[str, object]]:
        """``CLUSTER NODES`` of a live node (as redis-py parses it), one dict per node: id,
        port, flags, master id, slot ranges ``[(lo, hi), ...]``."""
        client = self._seed().client()
        try:
            parsed = client.execute_command("CLUSTER NODES")
        finally:
            client.close()
        rows = []
        for address, row in parsed.items():
            rows.append({"id": row["node_id"], "port": int(_text(address).rsplit(":", 1)[1]),
                         "flags": set(row["flags"].split(",")), "master": row["master_id"],
                         "slots": [(int(r[0]), int(r[-1])) for r in row["slots"]]})
        return rows

    def _read_ids(self) -> None:
        by_port = {row["port"]: row for row in self._cluster_nodes()}
        for node in self.nodes:
            row = by_port.get(node.port)
            if row is not None:
                node.node_id = str(row["id"])

    def node(self, port: int) -> ClusterNode:
        return next(n for n in self.nodes if n.port == port)

    def masters(self) -> list[ClusterNode]:
        """The live nodes that serve slots, by the cluster's current view."""
        rows = self._cluster_nodes()
        ports = {r["port"] for r in rows if "master" in r["flags"] and "fail" not in r["flags"] and r["slots"]}
        return [n for n in self.nodes if n.port in ports and n.alive]

    def replicas_of(self, master: ClusterNode) -> list[ClusterNode]:
        rows = self._cluster_nodes()
        ports = {r["port"] for r in rows if r["master"] == master.node_id}
        return [n for n in self.nodes if n.port in ports]

    def master_of(self, key: bytes | str) -> ClusterNode:
        """The master serving ``key``'s hash slot."""
        slot = key_slot(key.encode() if isinstance(key, str) else key)
        for row in self._cluster_nodes():
            if "master" not in row["flags"] or "fail" in row["flags"]:
                continue
            if any(lo <= slot <= hi for lo, hi in row["slots"]):  # type: ignore[attr-defined]
                return self.node(int(row["port"]))  # type: ignore[call-overload]
        raise LookupError(f"no master serves slot {slot}")

    # -- faults -----------------------------------------------------------------------------
    def kill(self, node: ClusterNode) -> None:
        """SIGKILL one node (by the pid this helper started) and reap it."""
        if node.alive:
            os.kill(node.process.pid, signal.SIGKILL)  # type: ignore[union-attr]
            node.process.wait(5)  # type: ignore[union-attr]

    def kill_and_wait_promotion(self, master: ClusterNode, timeout_s: float = 20.0) -> tuple[ClusterNode, float]:
        """kill -9 ``master``, wait until one of its replicas is a master and every live node
        says ``cluster_state:ok``; returns that replica and the seconds from the kill."""
        replicas = self.replicas_of(master)
        if not replicas:
            raise LookupError(f"{master.address} has no replica to promote")
        killed = time.monotonic()
        self.kill(master)
        while time.monotonic() - killed < timeout_s:
            for replica in replicas:
                try:
                    promoted = replica.info("replication").get("role") == "master"
                except redis.RedisError:
                    promoted = False
                if promoted and self._states_ok():
                    return replica, time.monotonic() - killed
            time.sleep(0.05)
        raise TimeoutError(f"no replica of {master.address} was promoted within {timeout_s}s")

    def _states_ok(self) -> bool:
        try:
            return all(n.cluster_info().get("cluster_state") == "ok" for n in self.nodes if n.alive)
        except redis.RedisError:
            return False

    def restart(self, node: ClusterNode, timeout_s: float = 20.0) -> None:
        """Start a killed node again with its config (it rejoins, as a replica of the master
        that replaced it) and wait until the cluster is ready."""
        if node.alive:
            return
        started = time.monotonic()
        self._launch(node)
        self._wait_ping(node, started + timeout_s)
        while time.monotonic() - started < timeout_s:
            try:
                replication = node.info("replication")
            except redis.RedisError:
                replication = {}
            if replication.get("role") == "slave" and replication.get("master_link_status") == "up":
                break
            time.sleep(0.05)
        self.wait_ready(max(1.0, timeout_s - (time.monotonic() - started)))

    # -- measures ---------------------------------------------------------------------------
    def per_master(self, section: str) -> dict[str, dict[str, object]]:
        """``INFO <section>`` of each current master, by address."""
        return {m.address: m.info(section) for m in self.masters()}


def slots_of(keys: Iterable[bytes | str]) -> set[int]:
    """The hash slots of ``keys``."""
    return {key_slot(k.encode() if isinstance(k, str) else k) for k in keys}
