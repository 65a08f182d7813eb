"""The integration surface on a ``redis+cluster://`` URL, with real worker processes: a local
cluster of 3 masters and 3 replicas (``conftest.py``), 2 ``tokiwa-worker`` and 2
``tokiwa-producer`` (cron) processes of the surface app (:mod:`tests.cluster.surface_app`),
the events split into 3 partitions whose streams sit on 3 different masters.

Publishing (every way), workers, a DAG workflow, run_workflow, cron under leader election,
chatflow order and locks, once, limits, delayed events, dead letters and requeue, cancel, the
relay across nodes, inspect and the HTTP API; then a master killed (kill -9) under publish and
consume load: its replica is promoted and tokiwa resumes; the test prints what was lost,
duplicated or stuck and how long it took to resume.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from orchestrator import Event, Orchestrator
from orchestrator.broker.connection import create_sync_redis
from orchestrator.chat.conversations import RedisConversationStore
from orchestrator.keys import Keys
from orchestrator.ops.http_api import ApiServer
from orchestrator.ops.inspector import Inspector
from tests.cluster.local import LocalCluster
from tests.cluster.surface_app import build_app
from tests.integration.procs import ROOT, stop, until, worker_env

pytestmark = pytest.mark.timeout(90)

PARTITIONS = 3
WORKERS, PRODUCERS = 2, 2
SETTINGS = {"partitions": PARTITIONS, "ack_policy": "on_success", "max_deliveries": 5,
            "redelivery_backoff_ms": 50, "redelivery_backoff_max_ms": 200, "visibility_timeout_ms": 2_000,
            "heartbeat_interval_s": 1, "cron_lease_ms": 2_000, "TEST_CHAT_SLEEP_MS": 30}


@dataclass
class Fleet:
    cluster: LocalCluster
    namespace: str
    env: dict[str, str]
    workers: list[subprocess.Popen]
    producers: list[subprocess.Popen]
    logs: Path

    @property
    def url(self) -> str:
        return self.cluster.url

    def key(self, *parts: str) -> str:
        return ":".join([self.namespace, "test", *parts])


def spread_namespace(cluster: LocalCluster) -> str:
    """A namespace whose partitions' streams sit on as many masters as there are partitions."""
    for _ in range(500):
        ns = f"c{uuid.uuid4().hex[:8]}"
        masters = {cluster.master_of(Keys(ns).partition(p).events).port for p in range(PARTITIONS)}
        if len(masters) == PARTITIONS:
            return ns
    raise AssertionError("no namespace spreads its partitions over every master")


def _start(env: dict[str, str], log: Path, module: str, app: str) -> subprocess.Popen:
    out = open(log, "ab")  # noqa: SIM115 - closed when the process is reaped at exit
    return subprocess.Popen([sys.executable, "-m", module, "run", "--app", app], cwd=ROOT, env=env,
                            stdout=out, stderr=subprocess.STDOUT)


def wait_sync(check: Callable[[], bool], what: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


@pytest.fixture(scope="module")
def fleet(cluster: LocalCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """The module's workers and cron producers on the cluster URL, in one namespace."""
    logs = tmp_path_factory.mktemp("fleet")
    namespace = spread_namespace(cluster)
    base = dict(os.environ)
    base["PYTHONPATH"] = os.pathsep.join([str(ROOT), base.get("PYTHONPATH", "")])
    base["PYTHONUNBUFFERED"] = "1"
    base["TOKIWA_STATE_DIR"] = str(logs / "state")
    env = worker_env(base, cluster.url, namespace, **SETTINGS)
    workers = [_start(env, logs / f"worker{i}.log", "workers.cli", "tests.cluster.surface_app:app")
               for i in range(WORKERS)]
    producers = [_start(env, logs / f"producer{i}.log", "orchestrator.cli.producer",
                        "tests.cluster.surface_app:producer_app") for i in range(PRODUCERS)]
    client = create_sync_redis(cluster.url)
    started = Fleet(cluster, namespace, env, workers, producers, logs)
    try:
        wait_sync(lambda: client.hlen(Keys(namespace).workers) >= WORKERS, "the workers' heartbeats", 30)
        yield started
    finally:
        client.close()
        for proc in workers + producers:
            stop(proc, timeout=15)


@asynccontextmanager
async def producer(fleet: Fleet) -> AsyncIterator[Orchestrator]:
    """A producer-mode surface app of the test process (publishes, asks, inspects; no cron)."""
    app = build_app("producer", redis_url=fleet.url, namespace=fleet.namespace, partitions=PARTITIONS)
    await app.connect()
    try:
        yield app
    finally:
        await app.close()


def assert_alive(fleet: Fleet) -> None:
    dead = [p.pid for p in fleet.workers + fleet.producers if p.poll() is not None]
    assert not dead, f"processes {dead} exited; logs in {fleet.logs}"


# -- the surface --------------------------------------------------------------------------
async def test_events_published_every_way_are_processed_once_on_every_partition(fleet):
    async with producer(fleet) as app:
        for i in range(10):
            await app.publish("job", {"i": i})
        await app.publish_many([Event("job", {"i": i}) for i in range(10, 40)])
        app.publish_sync("job", {"i": 40})
        app.publish_many_sync([Event("job", {"i": i}) for i in range(41, 46)])
        await app.publish("job", {"i": 46}, delay_s=0.3)
        await app.publish("job", {"i": 47}, key="k-47", delay_s=0.2)
        seen_key = fleet.key("seen")

        async def all_seen() -> bool:
            return await app.redis.hlen(seen_key) >= 48

        await until(all_seen, "48 jobs processed")
        await asyncio.sleep(0.3)
        seen = {int(k): int(v) for k, v in (await app.redis.hgetall(seen_key)).items()}
        assert seen == {i: 1 for i in range(48)}
        added = [(await app.redis.xinfo_stream(app.keys.partition(p).events))["entries-added"]
                 for p in range(PARTITIONS)]  # processed entries are trimmed: count what was added
        assert all(added), f"every partition got events: {added}"
    assert_alive(fleet)


async def test_a_dag_runs_by_event_and_by_run_workflow(fleet):
    async with producer(fleet) as app:
        await app.publish("order.created", {"x": 2})
        result = await app.run_workflow("dag", input={"x": 5}, timeout=20)
        assert result.status == "succeeded", result
        assert result.nodes["d"].output == 25

        async def both() -> bool:
            return sorted(await app.redis.lrange(fleet.key("dag"), 0, -1)) == [b"10", b"25"]

        await until(both, "both dag runs")


async def test_cron_fires_each_second_once_under_leader_election(fleet):
    client = create_sync_redis(fleet.url)
    try:
        wait_sync(lambda: client.llen(fleet.key("ticks")) >= 3, "three cron fires", 15)
        ticks = [t.decode().split("|") for t in client.lrange(fleet.key("ticks"), 0, -1)]
        slots = [slot for slot, _ in ticks]
        assert len(slots) == len(set(slots)), f"a slot fired twice: {slots}"
        assert {int(pid) for _, pid in ticks} <= {p.pid for p in fleet.producers}
        assert client.get(Keys(fleet.namespace).leader("cron")) is not None
    finally:
        client.close()


async def test_chatflow_turns_run_in_order_one_at_a_time_per_conversation(fleet):
    conversations = [f"conv-{n}" for n in range(3)]
    async with producer(fleet) as app:
        for seq in range(5):
            if seq % 2:
                await app.publish_many([Event("chat.turn", {"conversation": c, "seq": seq}) for c in conversations])
            else:
                for c in conversations:
                    await app.publish("chat.turn", {"conversation": c, "seq": seq})

        async def done() -> bool:
            return all([await app.redis.llen(fleet.key("chat", c)) >= 5 for c in conversations])

        await until(done, "5 turns of every conversation", 30)
        store = RedisConversationStore(app.redis, app.keys)
        for c in conversations:
            turns = [line.decode().split("|") for line in await app.redis.lrange(fleet.key("chat", c), 0, -1)]
            assert [int(t[0]) for t in turns] == list(range(5)), (c, turns)
            for before, after in zip(turns, turns[1:], strict=False):
                assert float(after[2]) >= float(before[3]), f"turns of {c} overlapped: {before} {after}"
            assert (await store.get(c))["seq"] == list(range(5))


async def test_a_once_subscriber_runs_once_across_workers(fleet):
    async with producer(fleet) as app:
        for _ in range(3):
            await app.publish("once.evt", {})

        async def ran() -> bool:
            return await app.redis.llen(fleet.key("once")) >= 1

        await until(ran, "the once subscriber")
        await asyncio.sleep(0.5)
        assert await app.redis.llen(fleet.key("once")) == 1


async def test_limited_events_all_run(fleet):
    async with producer(fleet) as app:
        await app.publish_many([Event("limited", {"i": i, "tenant": f"t{i % 2}"}) for i in range(8)])

        async def all_ran() -> bool:
            return await app.redis.llen(fleet.key("limited")) >= 8

        await until(all_ran, "8 limited events")


async def test_dead_letters_are_listed_requeued_and_purged(fleet):
    async with producer(fleet) as app:
        inspector = Inspector.from_app(app)
        poison = await app.publish("poison", {})

        async def dead_count() -> int:
            return len([d for d in await inspector.dead_list(limit=100) if d["event_id"] == poison.id])

        async def dead_once() -> bool:
            return await dead_count() >= 1

        await until(dead_once, "the poison event's dead letter")
        first = next(d for d in await inspector.dead_list(limit=100) if d["event_id"] == poison.id)
        assert first["reason"] == "max_deliveries" and first["type"] == "poison"
        [requeued] = await inspector.requeue([first["dead_id"]])
        assert requeued["stream_id"]

        async def dead_again() -> bool:
            return await dead_count() >= 1 and requeued["stream_id"] in {
                d["stream_id"] for d in await inspector.dead_list(limit=100)}

        await until(dead_again, "the requeued event to fail again into the dead letters")
        assert await inspector.purge() >= 1
        assert await dead_count() == 0


async def test_a_running_workflow_is_cancelled_from_another_process(fleet):
    async with producer(fleet) as app:
        run_id = await app.run_workflow("slow", wait=False)

        async def running() -> bool:
            return run_id.encode() in await app.redis.lrange(fleet.key("slow"), 0, -1)

        await until(running, "the slow run to start")
        answer = await app.cancel_run(run_id, reason="cluster test")
        assert answer["cancelled"], answer

        async def cancelled() -> bool:
            record = await app.run_store.get(run_id)
            return record is not None and record["status"] == "cancelled"

        await until(cancelled, "the run's record to say cancelled")


async def test_relay_messages_cross_cluster_nodes(fleet):
    from workers.relay.transport import RelayTransport

    nodes = [n.address for n in fleet.cluster.nodes]
    heard: list[tuple[str, list[str]]] = []
    got = asyncio.Event()

    def on_remote(topic: str, messages: list[str], host: str, task: str) -> None:
        heard.append((topic, messages))
        got.set()

    keys = Keys(fleet.namespace)
    # each relay's pub/sub connection goes to the first node of its URL: two different nodes
    sender = RelayTransport("redis+cluster://" + ",".join(nodes), keys, "relay-a", "host-a", lambda *a: None)
    listener = RelayTransport("redis+cluster://" + ",".join(reversed(nodes)), keys, "relay-b", "host-b", on_remote)
    await listener.start()
    await sender.start()
    try:
        await asyncio.sleep(0.3)  # the listener's pattern subscription is in place
        for _ in range(50):
            await sender.publish("greetings", "hello across nodes", "task-a")
            try:
                await asyncio.wait_for(got.wait(), 0.2)
                break
            except TimeoutError:
                continue
        assert ("greetings", ["hello across nodes"]) in heard
    finally:
        await sender.stop()
        await listener.stop()


async def test_inspect_and_the_http_api_read_the_cluster(fleet):
    async with producer(fleet) as app:
        result = await app.run_workflow("dag", input={"x": 1}, timeout=20)
        inspector = Inspector.from_app(app)
        events = [s for s in await inspector.streams() if s["stream"].endswith(":events")]
        assert [s["stream"] for s in events] == [app.keys.partition(p).events for p in range(PARTITIONS)]
        assert all(s["exists"] and s["groups"] for s in events), events
        workers = [w for w in await inspector.workers() if not w["stale"]]
        assert len(workers) >= WORKERS
        assert "cron" in {row["role"] for row in await inspector.leaders()}
        assert await inspector.groups()
        run = await inspector.run(result.run_id, tail=5)
        assert run["status"] == "succeeded" and any("a starts with" in line for line in run["logs"]), run
        api = ApiServer(app, port=0)
        await api.start()
        try:
            async with aiohttp.ClientSession() as http:
                async with http.get(f"{api.url}/runs?limit=5") as resp:
                    assert resp.status == 200
                    assert result.run_id in json.dumps(await resp.json())
                async with http.get(f"{api.url}/runs/{result.run_id}/logs?tail=5") as resp:
                    assert resp.status == 200 and (await resp.json())["run_status"] == "succeeded"
                async with http.get(f"{api.url}/workers") as resp:
                    assert resp.status == 200 and len(await resp.json()) >= WORKERS
                async with http.get(f"{api.url}/metrics") as resp:
                    assert resp.status == 200
        finally:
            await api.stop()
    assert_alive(fleet)


# -- a master killed under load (last: it changes the cluster) -------------------------------
@dataclass
class Load:
    """What the publisher of the failover test saw: i -> (partition, wall time of its ack)."""

    acked: dict[int, tuple[int, float]]
    failures: int = 0
    next_i: int = 1_000_000


async def _publish_load(app: Orchestrator, load: Load, stop_at: asyncio.Event) -> None:
    from orchestrator.broker.partitions import partition_key, partition_of

    while not stop_at.is_set():
        event = Event("job", {"i": load.next_i})
        load.next_i += 1
        try:
            await asyncio.wait_for(app.enqueue(event), 5)
        except Exception:  # CLUSTERDOWN, a connection reset, a timeout: not acknowledged
            load.failures += 1
            await asyncio.sleep(0.05)
            continue
        load.acked[event.payload["i"]] = (partition_of(partition_key(event), PARTITIONS), time.time())
        await asyncio.sleep(0.004)


async def _stuck(app: Orchestrator) -> int:
    total = 0
    for p in range(PARTITIONS):
        for group in await app.redis.xinfo_groups(app.keys.partition(p).events):
            total += int(group["pending"]) + int(group.get("lag") or 0)
    return total


async def test_a_killed_master_is_replaced_and_tokiwa_resumes(fleet):
    cluster = fleet.cluster
    async with producer(fleet) as app:
        victim = cluster.master_of(app.keys.partition(0).events)
        load, stop_at = Load({}), asyncio.Event()
        publisher = asyncio.create_task(_publish_load(app, load, stop_at))
        try:
            await asyncio.sleep(1.5)
            promoted, promotion_s = await asyncio.to_thread(cluster.kill_and_wait_promotion, victim)
            killed_at = time.time() - promotion_s
            await asyncio.sleep(2.0)
        finally:
            stop_at.set()
            await publisher
        seen_key, at_key = fleet.key("seen"), fleet.key("at")

        async def settled() -> bool:
            seen = await app.redis.hgetall(seen_key)
            return all(str(i).encode() in seen for i in load.acked) and await _stuck(app) == 0

        try:
            await until(settled, "every acknowledged event processed and nothing pending", 30)
        except AssertionError:
            pass  # counted below
        seen = {int(k): int(v) for k, v in (await app.redis.hgetall(seen_key)).items() if int(k) >= 1_000_000}
        at = {int(k): float(v) for k, v in (await app.redis.hgetall(at_key)).items() if int(k) >= 1_000_000}
        stuck = await _stuck(app)
    lost = sorted(i for i in load.acked if i not in seen)
    duplicated = sorted(i for i, n in seen.items() if n > 1)
    after = [i for i, (p, t) in load.acked.items() if p == 0 and t > killed_at]
    publish_resume_s = min(load.acked[i][1] for i in after) - killed_at if after else float("nan")
    consume_resume_s = min(at[i] for i in after if i in at) - killed_at if after else float("nan")
    print(f"\ncluster failover: master {victim.address} killed -9 under load, replica {promoted.address} promoted "
          f"after {promotion_s:.2f}s; acknowledged publishes {len(load.acked)} (failed {load.failures}), "
          f"lost {len(lost)}, duplicated {len(duplicated)}, stuck {stuck}; its partition resumed publishing after "
          f"{publish_resume_s:.2f}s and consuming after {consume_resume_s:.2f}s")
    try:
        assert_alive(fleet)
        assert after, "nothing was published to the failed master's partition after the failover"
        assert stuck == 0, f"{stuck} entries still pending or undelivered"
        assert consume_resume_s < 15, consume_resume_s
        assert len(lost) <= max(5, len(load.acked) // 50), f"lost {len(lost)} acknowledged publishes: {lost[:10]}"
    finally:
        await asyncio.to_thread(cluster.restart, victim)
