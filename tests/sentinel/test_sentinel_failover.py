"""Redis Sentinel: the URLs, the durable publish, and failovers under publish and consume load.

The load tests run a real ``tokiwa-worker`` (the fault app: each handler call is a line in a
local file, so consuming is seen without Redis) and two publisher loops on the Sentinel URL,
one plain and one durable (``publish_wait_replicas=1``), while the master is failed over by
``SENTINEL FAILOVER`` or killed with SIGKILL. An acknowledged publish is lost when the worker
never ran its event, and gone from the stream when the new master does not have it (the
worker keeps acked entries: ``stream_maxlen``). Measured numbers are printed (``pytest -s``)."""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from redis.exceptions import RedisError

from orchestrator.broker.streams import StreamBroker
from orchestrator.broker.sync_publish import SyncPublisher
from orchestrator.cli import exitcodes
from orchestrator.config import build_settings
from orchestrator.errors import ConfigError, InvalidArgumentError, ReplicationError, TokiwaError
from orchestrator.events import Event
from orchestrator.faults import Fault, classify
from orchestrator.keys import Keys
from orchestrator.urls import Topology, parse_redis_url, redact
from tests.faults.apps import read_calls
from tests.faults.common import start_fault_worker, wait_for
from tests.groups import lag_total, pending_total
from tests.integration.procs import ROOT, stop
from tests.topologies import SentinelTopology

#: what a failover may take before publishing and consuming resume (measured: see the prints)
RESUME_CAP_S = 5.0
#: durable publishing with one replica after SENTINEL FAILOVER waits for the old master to
#: rejoin as a replica, which Sentinel does ~10 s after the promotion
REJOIN_CAP_S = 20.0
WINDOW_MAX_S = 30.0


# -- URLs -------------------------------------------------------------------------------------
def test_a_sentinel_url_names_its_sentinels_service_db_login_and_tls():
    url = parse_redis_url("rediss+sentinel://app:p%40ss@10.0.0.1:26379,sent-b,[::1]:26380/orders/2"
                          "?ssl_cert_reqs=none&sentinel_password=s3")
    assert url.topology is Topology.SENTINEL and url.tls
    assert url.nodes == (("10.0.0.1", 26379), ("sent-b", 26379), ("::1", 26380))
    assert (url.service, url.db, url.username, url.password) == ("orders", 2, "app", "p@ss")
    assert url.node_options == {"ssl_cert_reqs": "none"}
    assert url.sentinel_auth == {"password": "s3"}


def test_a_cluster_url_names_its_seed_nodes_and_has_only_db_0():
    url = parse_redis_url("redis+cluster://:pw@h1:7000,h2:7001/0?socket_timeout=2.5")
    assert url.topology is Topology.CLUSTER and not url.tls
    assert url.nodes == (("h1", 7000), ("h2", 7001)) and url.password == "pw"
    assert url.options == {"socket_timeout": 2.5}


@pytest.mark.parametrize(("url", "part"), [
    ("redis+sentinel://h1:26379", "the service name is missing"),
    ("redis+sentinel://h1:26379/", "the service name is missing"),
    ("redis+sentinel:///orders", "the host list is empty"),
    ("redis+sentinel://h1,,h2/orders", "host 2 of the host list is empty"),
    ("redis+sentinel://h1:port/orders", "host 1 ('h1:port') has port 'port'"),
    ("redis+sentinel://h1:0/orders", "host 1 ('h1:0') has port '0'"),
    ("redis+sentinel://h1/orders/one", "the db 'one' is not a number"),
    ("redis+sentinel://h1/orders/1/2", "has more than service_name/db"),
    ("redis+sentinel://h1/orders?db=3", "query option 'db'"),
    ("redis+sentinel://a:b:c/orders", "more than one ':'"),
    ("redis+cluster://h1:7000/3", "a Redis Cluster has only db 0"),
    ("redis+cluster://h1:99999", "has port '99999'"),
    ("redis+cluster://[::1/", "unclosed or empty [IPv6]"),
    ("redis+cluster://h1?tls=yes", "the query option 'tls' is not one tokiwa passes on"),
    ("redis+cluster://h1?socket_timeout=soon", "the query option 'socket_timeout' has an invalid value"),
    ("redis+cluster://h1?retry_on_timeout=true", "the query option 'retry_on_timeout'"),
    ("sentinel://h1/orders", "scheme 'sentinel://' is not one tokiwa knows"),
])
def test_a_bad_url_is_refused_naming_the_part_that_is_wrong(url, part):
    with pytest.raises(InvalidArgumentError) as caught:
        parse_redis_url(url)
    assert part in str(caught.value)


def test_settings_refuse_a_bad_url_naming_the_setting_and_never_the_password():
    with pytest.raises(ConfigError) as caught:
        build_settings({"redis_url": "redis+sentinel://app:hunter2@h1:26379"})
    assert caught.value.field == "redis_url"
    assert "service name is missing" in str(caught.value) and "hunter2" not in str(caught.value)


def test_every_scheme_is_accepted_by_the_settings():
    for url in ("redis://h:1/0", "rediss://h", "unix:///tmp/r.sock", "redis+sentinel://h/s", "rediss+sentinel://h/s/1",
                "redis+cluster://h:7000", "rediss+cluster://h1,h2"):
        assert build_settings({"redis_url": url}).redis_url == url


def test_passwords_are_hidden_in_every_url_shape():
    assert redact("redis+sentinel://app:hunter2@h1,h2:26380/orders?sentinel_password=s3&x=1") == \
        "redis+sentinel://app:***@h1,h2:26380/orders?sentinel_password=***&x=1"
    assert redact("redis://:hunter2@h:6379/0") == "redis://:***@h:6379/0"
    assert redact("rediss+cluster://h1:7000") == "rediss+cluster://h1:7000"


# -- the fault classes of a failover ------------------------------------------------------------
def _raised_from(inner: BaseException, outer: BaseException) -> BaseException:
    try:
        try:
            raise inner
        except BaseException:
            raise outer  # noqa: B904 - redis-py raises it the same way (context, no cause)
    except BaseException as caught:
        return caught


def test_the_errors_of_a_failover_or_a_resharding_are_retried_not_fatal():
    from redis import exceptions as rx
    from redis.asyncio.sentinel import MasterNotFoundError as AsyncMasterNotFound
    from redis.sentinel import MasterNotFoundError

    demoted = _raised_from(rx.ReadOnlyError("You can't write against a read only replica."),
                           rx.ConnectionError("The previous master is now a slave"))
    assert classify(demoted) is Fault.FAILOVER
    assert classify(MasterNotFoundError("No master found for 'tokiwa'")) is Fault.FAILOVER
    assert classify(AsyncMasterNotFound("No master found for 'tokiwa'")) is Fault.FAILOVER
    unblocked = rx.ResponseError("UNBLOCKED force unblock from blocking operation, instance state changed")
    assert classify(unblocked) is Fault.FAILOVER
    for error in (rx.MovedError("3999 127.0.0.1:6381"), rx.AskError("3999 127.0.0.1:6381"),
                  rx.TryAgainError("TRYAGAIN"), rx.ClusterDownError("CLUSTERDOWN The cluster is down"),
                  rx.ClusterError("TTL exhausted."), rx.SlotNotCoveredError('Slot "42" is not covered'),
                  rx.ResponseError("NOREPLICAS Not enough good replicas to write.")):
        assert classify(error) is Fault.FAILOVER


# -- the durable publish ------------------------------------------------------------------------
def _settings(url: str, namespace: str, **values: object):
    return build_settings({"redis_url": url, "namespace": namespace, "redis_timeout_ms": 1000, **values})


async def test_a_durable_publish_returns_once_the_replica_has_it_and_raises_when_too_few_do(
        sentinel_topology: SentinelTopology, namespace: str):
    from orchestrator.broker.connection import create_redis

    url = sentinel_topology.url
    replica = next(n for n in sentinel_topology.data if n.port != sentinel_topology.master_port())
    client = create_redis(url, timeout_ms=1000)
    try:
        broker = StreamBroker(client, _settings(url, namespace, publish_wait_replicas=1))
        event = Event("job", {"i": 1})
        stream_id = await broker.publish(event)
        with replica.client() as on_replica:  # WAIT returned: the replica has the entry already
            assert [i.decode() for i, _ in on_replica.xrange(broker.stream)] == [stream_id]

        greedy = StreamBroker(client, _settings(url, namespace, publish_wait_replicas=2, publish_wait_timeout_ms=200))
        with pytest.raises(ReplicationError) as caught:
            await greedy.publish(Event("job", {"i": 2}))
        assert (caught.value.acked, caught.value.wanted) == (1, 2) and caught.value.stream_id
        assert "only 1 of 2 replica(s)" in str(caught.value)
    finally:
        await client.aclose()

    sync = SyncPublisher(_settings(url, namespace, publish_wait_replicas=2, publish_wait_timeout_ms=200))
    try:
        with pytest.raises(ReplicationError):
            sync.publish(Event("job", {"i": 3}))
        durable_many = SyncPublisher(_settings(url, namespace, publish_wait_replicas=1))
        ids = durable_many.publish_many([Event("job", {"i": 4}), Event("job", {"i": 5})], [(), ()])
        durable_many.close()
        assert len(ids) == 2
    finally:
        sync.close()


def test_the_cli_exits_75_when_too_few_replicas_confirm_a_publish(sentinel_topology: SentinelTopology, namespace,
                                                                  subprocess_env):
    env = {**subprocess_env, "TOKIWA_REDIS_URL": sentinel_topology.url, "TOKIWA_NAMESPACE": namespace,
           "TOKIWA_PUBLISH_WAIT_REPLICAS": "2", "TOKIWA_PUBLISH_WAIT_TIMEOUT_MS": "200"}
    done = subprocess.run([sys.executable, "-m", "orchestrator.cli.producer", "publish", "job", "--payload", "{}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == exitcodes.TEMPFAIL, done.stderr
    assert "only 1 of 2 replica(s)" in done.stderr and "publish_wait_replicas" in done.stderr


# -- failovers under load ------------------------------------------------------------------------
class PublishLoop(threading.Thread):
    """Publishes ``job`` events numbered start, start + step, ... until stopped; records when
    each acknowledged publish returned, and the fault class of each failure."""

    def __init__(self, url: str, namespace: str, start: int, step: int, **settings: object) -> None:
        super().__init__(daemon=True)
        self.publisher = SyncPublisher(_settings(url, namespace, **settings))
        self.start_i, self.step = start, step
        self.acked: list[tuple[int, float]] = []
        self.ids: set[str] = set()  # event ids of the acknowledged publishes
        self.failures: collections.Counter[str] = collections.Counter()
        self.halt = threading.Event()

    def run(self) -> None:
        i = self.start_i
        while not self.halt.is_set():
            try:
                event = Event("job", {"i": i})
                self.publisher.publish(event)
                self.acked.append((i, time.monotonic()))
                self.ids.add(event.id)
            except (RedisError, TokiwaError) as exc:
                kind = "replication" if isinstance(exc, ReplicationError) else classify(exc).value
                self.failures[kind] += 1
                time.sleep(0.02)
            i += self.step
            time.sleep(0.004)
        self.publisher.close()


class Progress(threading.Thread):
    """Watches the worker's output file and records when it grew (a handler call finished)."""

    def __init__(self, path: Path) -> None:
        super().__init__(daemon=True)
        self.path, self.times, self.halt = path, [], threading.Event()

    def run(self) -> None:
        size = 0
        while not self.halt.is_set():
            now = os.path.getsize(self.path) if self.path.exists() else 0
            if now > size:
                size = now
                self.times.append(time.monotonic())
            time.sleep(0.01)


def longest_gap(times: list[float], since: float, until: float) -> float:
    """The longest stretch within [since, until] without one of ``times``."""
    inside = [since, *(t for t in sorted(times) if since < t < until), until]
    return max(b - a for a, b in zip(inside, inside[1:], strict=False))


def cli_publish(env: dict[str, str], i: int) -> int:
    done = subprocess.run([sys.executable, "-m", "orchestrator.cli.producer", "publish", "job",
                           "--payload", json.dumps({"i": i})], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=30)
    if done.returncode not in (0, exitcodes.UNAVAILABLE, exitcodes.TEMPFAIL):
        print(f"cli publish {i} exited {done.returncode}: {done.stderr}")
    return done.returncode


def run_failover_under_load(topo: SentinelTopology, trigger, tmp_path: Path, env: dict[str, str],
                            namespace: str, what: str, wait_replicas: int = 1) -> dict[str, object]:
    """Start a worker and both publisher loops, call ``trigger()`` under load, and measure."""
    out, url = tmp_path / "calls.txt", topo.url
    # stream_maxlen: acked entries stay in the stream, so the test sees which ones survived
    worker = start_fault_worker(env, url, namespace, tmp_path / "worker.log", out, redis_timeout_ms=1000,
                                stream_maxlen=1_000_000)
    loops = [PublishLoop(url, namespace, 0, 2), PublishLoop(url, namespace, 1, 2, publish_wait_replicas=wait_replicas)]
    progress = Progress(out)
    cli_env = {**env, "TOKIWA_REDIS_URL": url, "TOKIWA_NAMESPACE": namespace}
    cli_codes: list[int] = []
    try:
        for loop in (*loops, progress):
            loop.start()
        wait_for(lambda: len(read_calls(out)) >= 50, 30, "the worker to consume")
        time.sleep(0.5)
        def publish_during() -> None:
            time.sleep(0.3)  # the CLI's start-up takes ~1 s more: it meets the failover midway
            cli_codes.append(cli_publish(cli_env, 10_000_001))

        during = threading.Thread(target=publish_during, daemon=True)
        during.start()
        triggered = time.monotonic()
        trigger()
        # until both loops publish again (a durable one needs a replica of the new master), at
        # least 5 s and at most WINDOW_MAX_S after the trigger
        wait_for(lambda: time.monotonic() - triggered >= 5.0 and
                 all(loop.acked and loop.acked[-1][1] > time.monotonic() - 0.5 for loop in loops),
                 WINDOW_MAX_S, "both publisher loops to publish again")
        ended = time.monotonic()
        for loop in loops:
            loop.halt.set()
        for loop in loops:
            loop.join(10)
        during.join(30)
        cli_codes.append(cli_publish(cli_env, 10_000_002))  # after the failover: must succeed
        acked = {i for loop in loops for i, _ in loop.acked} | {10_000_001, 10_000_002}
        with topo.master().client() as master:
            wait_for(lambda: acked <= {c[0] for c in read_calls(out)} or
                     (pending_total(master, namespace) == 0 and lag_total(master, namespace) == 0), 20,
                     "the worker to drain")
        progress.halt.set()
        consumed = {c[0] for c in read_calls(out)}
        with topo.master().client() as master:
            stored = {fields[b"id"].decode() for _, fields in master.xrange(Keys(namespace).partition(0).events)}
        alive = worker.poll() is None
    finally:
        for loop in (*loops, progress):
            loop.halt.set()
        code = stop(worker)
    result = {
        "what": what,
        "lost_plain": len({i for i, _ in loops[0].acked} - consumed),
        "lost_durable": len({i for i, _ in loops[1].acked} - consumed),
        "gone_from_stream_plain": len(loops[0].ids - stored),
        "gone_from_stream_durable": len(loops[1].ids - stored),
        "acked_plain": len(loops[0].acked), "acked_durable": len(loops[1].acked),
        "publish_gap_plain_s": round(longest_gap([t for _, t in loops[0].acked], triggered, ended), 2),
        "publish_gap_durable_s": round(longest_gap([t for _, t in loops[1].acked], triggered, ended), 2),
        "consume_gap_s": round(longest_gap(progress.times, triggered, ended), 2),
        "failures_plain": dict(loops[0].failures), "failures_durable": dict(loops[1].failures),
        "cli_codes": cli_codes, "worker_alive": alive, "worker_exit": code,
        "consumed_cli": {10_000_001, 10_000_002} & consumed,
    }
    print(f"\n{what}: {json.dumps(result, default=sorted)}")
    return result


def check(result: dict[str, object], log: Path, durable_cap_s: float = RESUME_CAP_S, durable_safe: bool = True) -> None:
    assert result["worker_alive"], log.read_text()[-3000:]
    assert result["worker_exit"] == 0, log.read_text()[-3000:]
    if durable_safe:
        assert result["lost_durable"] == 0 and result["gone_from_stream_durable"] == 0
    assert result["acked_plain"] and result["acked_durable"]
    assert exitcodes.FAILURE not in result["cli_codes"], result["cli_codes"]
    assert result["cli_codes"][-1] == exitcodes.OK
    assert 10_000_002 in result["consumed_cli"]  # type: ignore[operator]
    for gap in ("publish_gap_plain_s", "consume_gap_s"):
        assert result[gap] < RESUME_CAP_S, (gap, result)
    assert result["publish_gap_durable_s"] < durable_cap_s, result  # type: ignore[operator]
    assert "fatal" not in result["failures_plain"] and "fatal" not in result["failures_durable"]  # type: ignore[operator]


@pytest.mark.parametrize(("replicas", "wait_replicas"), [(1, 1), (2, 1)])
def test_a_forced_failover_under_load_and_the_durable_publish(replicas: int, wait_replicas: int, tmp_path: Path,
                                                              subprocess_env, namespace):
    """Waiting for every replica (1 of 1) loses no acknowledged publish, and durable publishing
    waits until the old master rejoins as a replica (Sentinel converts it ~10 s after the
    promotion). Waiting for fewer (1 of 2) goes on within seconds, but the old master, still a
    master until then, has its writes confirmed by the replica not promoted, and those vanish
    when that replica resyncs: measured, not zero (docs/scaling.md, "Sentinel")."""
    with SentinelTopology(tmp_path / "sentinel", replicas=replicas) as topo:
        def trigger() -> None:
            old = topo.failover()
            topo.wait_new_master(old, 15)

        result = run_failover_under_load(topo, trigger, tmp_path, subprocess_env, namespace,
                                         f"SENTINEL FAILOVER, WAIT {wait_replicas} of {replicas} replica(s)",
                                         wait_replicas)
    every = wait_replicas == replicas
    check(result, tmp_path / "worker.log", durable_cap_s=REJOIN_CAP_S if every else RESUME_CAP_S, durable_safe=every)


def test_a_crashed_master_loses_no_acknowledged_durable_publish_and_workers_resume(
        sentinel_topology: SentinelTopology, tmp_path: Path, subprocess_env, namespace):
    topo = sentinel_topology

    def trigger() -> None:
        killed = topo.kill_master()
        topo.wait_new_master(killed.port, 15)
        topo.restart_as_replica(killed)  # an operator's restart: it comes back empty and resyncs

    result = run_failover_under_load(topo, trigger, tmp_path, subprocess_env, namespace, "kill -9 of the master")
    # durable publishes need a replica again: the restarted node serves as one at once or once
    # Sentinel converts it (~10 s); plain publishing and consuming are held to RESUME_CAP_S
    check(result, tmp_path / "worker.log", durable_cap_s=REJOIN_CAP_S)
