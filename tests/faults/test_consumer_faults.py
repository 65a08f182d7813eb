"""Fault tests of the consumer on real redis-server and real worker processes: poison entries,
a full Redis, a Redis that comes back empty, a refused permission, mass redelivery and
shutdown under load. Each counts processed, lost, duplicated and stuck events, and bounds
its own time."""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

import msgpack
import pytest
import redis

from orchestrator.broker.embedded import EmbeddedRedis, free_port
from orchestrator.broker.groups import group_names
from tests.integration.procs import stop

from .apps import read_calls, successes
from .common import FAULT_GROUP, dead_entries, pending, publish_jobs, start_fault_worker, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


def poison_entries(rng: random.Random) -> list[dict[bytes, bytes]]:
    """Entries of many shapes and sizes that are not valid tokiwa events."""
    garbage = lambda n: bytes(rng.getrandbits(8) for _ in range(n))  # noqa: E731
    wrong_types = [
        [1, 2, 3], 42, "text", {"no": "fields"},
        {"id": 7, "type": "job", "payload": {}, "metadata": {}, "published_at": 1.0},
        {"id": "a", "type": ["job"], "payload": {}, "metadata": {}, "published_at": 1.0},
        {"id": "a", "type": "job", "payload": {}, "metadata": 5, "published_at": 1.0},
        {"id": "a", "type": "job", "payload": {}, "metadata": {"tags": "x"}, "published_at": "now"},
    ]
    entries: list[dict[bytes, bytes]] = [
        {f"f{i}".encode(): f"v{i}".encode() for i in range(4000)},  # overflowed Lua's unpack
        {f"f{i}".encode(): b"v" for i in range(9000)},
        {b"id": b"x", b"type": b"job", b"body": b"\x00" * 3_000_000},  # over max_event_bytes
        {b"id": b"x", b"type": b"job", b"body": garbage(500)},
        {b"id": b"x", b"type": b"job"},  # no body
        {b"reason": b"forged", b"error": b"forged", b"type": b"job", b"body": b"\xc1"},
        {garbage(40): garbage(40)},
    ]
    entries += [{b"id": b"x", b"type": b"job", b"body": msgpack.packb(w)} for w in wrong_types]
    for _ in range(25):  # random field counts, sizes and bytes
        n = rng.choice([1, 2, 3, 50, 500, 5000])
        entries.append({garbage(rng.randint(1, 12)) + str(k).encode(): garbage(rng.choice([0, 1, 30, 2000]))
                        for k in range(n)})
    return entries


def test_poison_entries_of_any_shape_end_in_dead_letters_while_the_worker_keeps_running(
        redis_url, namespace, sync_redis, subprocess_env, tmp_path):
    rng = random.Random(1234)
    poison = poison_entries(rng)
    stream = f"{{{namespace}:0}}:events"
    publish_jobs(sync_redis, namespace, 100)
    poison_ids = {sync_redis.xadd(stream, fields).decode() for fields in poison}
    publish_jobs(sync_redis, namespace, 100, start=100)
    out = tmp_path / "calls.txt"
    worker = start_fault_worker(subprocess_env, redis_url, namespace, tmp_path / "w.log", out, concurrency=8)
    try:
        took = wait_for(lambda: sync_redis.xlen(f"{{{namespace}:0}}:dead") >= len(poison_ids)
                        and len(successes(out)) >= 200 and pending(sync_redis, namespace) == 0,
                        60, "poison dead-lettered and jobs processed")
        assert worker.poll() is None, "the worker died on a poison entry"
    finally:
        code = stop(worker)
    dead = dead_entries(sync_redis, namespace)
    dead_ids = [d[b"stream_id"].decode() for d in dead]
    counts = successes(out)
    print(f"poison={len(poison_ids)} dead={len(dead)} processed={len(counts)} took={took:.1f}s")
    assert sorted(dead_ids) == sorted(poison_ids), "every poison entry dead-lettered exactly once"
    assert all(d[b"reason"] in (b"wrong_fields", b"oversized", b"undecodable", b"invalid_envelope")
               for d in dead)
    assert sorted(counts) == list(range(200)) and set(counts.values()) == {1}, "valid jobs ran once each"
    huge = next(d for d in dead if d.get(b"original_fields") == b"9000")
    assert huge[b"truncated"] == b"1" and len(huge) < 100  # a bounded sample of the original
    assert code == 0


def _info_used(client: redis.Redis) -> int:
    return int(client.info("memory")["used_memory"])


def test_full_redis_worker_starts_keeps_acking_dead_letters_and_memory_comes_back(
        namespace, subprocess_env, tmp_path):
    server = EmbeddedRedis(tmp_path / "redis", extra_args=["--maxmemory-policy", "noeviction"])
    server.start()
    client = redis.Redis.from_url(server.url)
    out = tmp_path / "calls.txt"
    worker = None
    try:
        stream = f"{{{namespace}:0}}:events"
        publish_jobs(client, namespace, 10)
        poison_ids = {client.xadd(stream, {b"id": b"x", b"type": b"job", b"body": b"\xc1" * 100}).decode()
                      for _ in range(5)}
        publish_jobs(client, namespace, 3000, start=10, pad=1000)
        full = _info_used(client)
        # the limit is below what is used: every write that grows memory is refused now
        client.config_set("maxmemory", str(full - 1_000_000))
        with pytest.raises(redis.exceptions.OutOfMemoryError):
            client.set(f"{namespace}:probe", "x")
        worker = start_fault_worker(subprocess_env, server.url, namespace, tmp_path / "w.log", out,
                                    concurrency=16)
        took = wait_for(lambda: len(successes(out)) >= 3010 and client.xlen(f"{{{namespace}:0}}:dead") >= 5
                        and pending(client, namespace) == 0, 60, "backlog processed on a full redis")
        assert worker.poll() is None, "the worker died on a full Redis"
        # trimming gave the memory back: the stream holds (about) nothing once all is acked
        wait_for(lambda: client.xlen(stream) <= 100, 10, "the drained stream trimmed")
        drained = _info_used(client)
        dead = dead_entries(client, namespace)
        client.set(f"{namespace}:probe", "x")  # writes are accepted again
    finally:
        code = stop(worker) if worker else None
        server.stop()
    log = (tmp_path / "w.log").read_text()
    counts = successes(out)
    print(f"full={full} drained={drained} processed={len(counts)} took={took:.1f}s")
    assert sorted(counts) == list(range(3010)) and set(counts.values()) == {1}
    assert {d[b"stream_id"].decode() for d in dead} == poison_ids
    assert drained < full - 2_000_000, f"memory came back: {full} -> {drained}"
    assert log.count("redis is full") <= 4, "one line per condition, not one per event"
    assert "Traceback" not in log
    assert code == 0


def test_producer_and_worker_start_on_a_full_redis_when_the_group_exists(namespace, tmp_path):
    import asyncio

    from orchestrator import Orchestrator

    server = EmbeddedRedis(tmp_path / "redis", extra_args=["--maxmemory-policy", "noeviction"])
    server.start()
    try:
        client = redis.Redis.from_url(server.url)
        publish_jobs(client, namespace, 2000, pad=500)
        client.config_set("maxmemory", str(_info_used(client) - 500_000))

        async def connect(mode: str) -> bool:
            app = Orchestrator(server.url, mode=mode, namespace=namespace)
            app.dispatcher.subscribe("job", lambda e: None, name="tests.faults.apps.record")  # FAULT_GROUP's route
            try:
                await app.connect()  # the group exists: nothing to write (the route advert is best effort)
                return app.route_groups() == [FAULT_GROUP] and FAULT_GROUP in await group_names(app.redis, app.keys.events)
            finally:
                await app.close()

        assert asyncio.run(connect("producer")) and asyncio.run(connect("worker"))
    finally:
        server.stop()


def test_redis_restarted_empty_group_recreated_and_acking_resumes(namespace, subprocess_env, tmp_path):
    port = free_port()
    server = EmbeddedRedis(tmp_path / "redis", port=port)  # no persistence: restarts empty
    server.start()
    client = redis.Redis.from_url(server.url)
    out = tmp_path / "calls.txt"
    worker = start_fault_worker(subprocess_env, server.url, namespace, tmp_path / "w.log", out,
                                concurrency=8, TEST_SLEEP_MS=1)
    try:
        publish_jobs(client, namespace, 500)
        wait_for(lambda: len(successes(out)) >= 500 and pending(client, namespace) == 0, 30, "first batch")
        server.stop()
        server.start()  # same port, no data: the stream and the group are gone
        client = redis.Redis.from_url(server.url)
        restarted = time.monotonic()
        publish_jobs(client, namespace, 500, start=1000, group=False)  # a raw XADD, no group
        wait_for(lambda: len(successes(out)) >= 1000, 30, "events published after the restart")
        resumed = wait_for(lambda: pending(client, namespace) == 0, 30, "acks after the restart")
        recovery = time.monotonic() - restarted
        time.sleep(1.5)  # a worker that stopped acking would now see its entries come back
        assert worker.poll() is None
    finally:
        code = stop(worker)
        server.stop()
    log = (tmp_path / "w.log").read_text()
    counts = successes(out)
    after = {i: n for i, n in counts.items() if i >= 1000}
    print(f"recovery={recovery:.2f}s resumed_after_processing={resumed:.2f}s")
    assert sorted(after) == list(range(1000, 1500)), "nothing published after the restart was lost"
    assert set(after.values()) == {1}, "acking resumed: nothing ran twice"
    assert "recreated consumer group" in log
    assert code == 0


def test_a_refused_permission_stops_the_worker_loudly_with_a_non_zero_exit(namespace, subprocess_env, tmp_path):
    server = EmbeddedRedis(tmp_path / "redis")
    server.start()
    admin = redis.Redis.from_url(server.url)
    admin.acl_setuser("w", enabled=True, passwords=["+pw"], keys=["*"], channels=["*"], commands=["+@all"])
    url = f"redis://w:pw@127.0.0.1:{server.port}/0"
    out = tmp_path / "calls.txt"
    worker = start_fault_worker(subprocess_env, url, namespace, tmp_path / "w.log", out, concurrency=4)
    try:
        publish_jobs(admin, namespace, 50)
        wait_for(lambda: len(successes(out)) >= 50, 30, "processing before the ACL change")
        admin.acl_setuser("w", commands=["-evalsha", "-eval"])  # the ack script is refused now
        publish_jobs(admin, namespace, 20, start=50)
        worker.wait(30)
    finally:
        code = stop(worker)
        server.stop()
    log = (tmp_path / "w.log").read_text()
    assert code == 1, log[-2000:]
    assert "stopping the worker" in log and "NOPERM" in log.upper()


def test_mass_redelivery_ends_processed_or_dead_within_first_pass_plus_backoff(
        redis_url, namespace, sync_redis, subprocess_env, tmp_path):
    total, fail_every = 20_000, 10  # 10% fail once, 1% twice, 0.1% always (dead after 3)
    out = tmp_path / "calls.txt"
    publish_jobs(sync_redis, namespace, total)
    settings = dict(concurrency=64, ack_policy="on_success", max_deliveries=3,
                    redelivery_backoff_ms=500, TEST_FAIL_EVERY=fail_every)
    started = time.monotonic()
    workers = [start_fault_worker(subprocess_env, redis_url, namespace, tmp_path / f"w{n}.log", out, **settings)
               for n in range(3)]
    try:
        first_pass = wait_for(lambda: len(read_calls(out)) >= total, 90, "first pass")
        always_failing = {i for i in range(total) if i % (100 * fail_every) == 0}
        wait_for(lambda: len(successes(out)) >= total - len(always_failing)
                 and sync_redis.xlen(f"{{{namespace}:0}}:dead") >= len(always_failing)
                 and pending(sync_redis, namespace) == 0, 60, "every event processed or dead")
        elapsed = time.monotonic() - started
    finally:
        codes = [stop(w) for w in workers]
    counts = successes(out)
    dead = {int(msgpack.unpackb(d[b"body"])["payload"]["i"]) for d in dead_entries(sync_redis, namespace)}
    lost = set(range(total)) - set(counts) - dead
    duplicated = sum(n - 1 for n in counts.values())
    # backoff: 0.5 s then 1 s (each with up to half of it as jitter) before deliveries 2 and 3
    budget = first_pass + 0.5 + 1.0 + 5.0
    print(f"first_pass={first_pass:.1f}s total={elapsed:.1f}s budget={budget:.1f}s dup={duplicated}")
    assert not lost and dead == always_failing
    assert duplicated == 0
    assert elapsed <= budget, (elapsed, budget)
    assert codes == [0, 0, 0]


def test_sigterm_under_load_hands_back_only_unfinished_work(redis_url, namespace, sync_redis,
                                                           subprocess_env, tmp_path):
    out = tmp_path / "calls.txt"
    rounds, per_round = 3, 3000
    slow = {"concurrency": 16, "TEST_SLEEP_MS": 5}  # ~3,000 events/s: SIGTERM lands mid-run
    for start in range(0, rounds * per_round, per_round):
        r = start // per_round
        publish_jobs(sync_redis, namespace, per_round, start=start)
        first = start_fault_worker(subprocess_env, redis_url, namespace, tmp_path / f"a{r}.log", out, **slow)
        wait_for(lambda s=start: len(successes(out)) >= s + per_round // 4, 30, "a quarter processed")
        os.kill(first.pid, signal.SIGTERM)
        assert first.wait(30) == 0
        second = start_fault_worker(subprocess_env, redis_url, namespace, tmp_path / f"b{r}.log", out, **slow)
        try:
            wait_for(lambda: sync_redis.hlen(f"{namespace}:workers") >= 1, 30, "the second worker up")
            wait_for(lambda s=start: pending(sync_redis, namespace) == 0
                     and len(successes(out)) >= s + per_round, 30, "the rest by the second worker")
        finally:
            assert stop(second) == 0
    counts = successes(out)
    duplicated = {i: n for i, n in counts.items() if n > 1}
    print(f"processed={len(counts)} duplicated={len(duplicated)}")
    assert sorted(counts) == list(range(rounds * per_round))
    assert not duplicated, f"finished work ran again after SIGTERM: {list(duplicated)[:10]}"


def test_the_fault_apps_call_log_reads_back_as_written(tmp_path: Path):
    """The fault app's call log is parsed as written (a guard for the helpers above)."""
    path = tmp_path / "calls.txt"
    path.write_text("3 1 10 ok\n3 2 10 fail\n4 1 11 ok\n")
    assert read_calls(path) == [(3, 1, 10, True), (3, 2, 10, False), (4, 1, 11, True)]
    assert successes(path) == {3: 1, 4: 1}


@pytest.mark.parametrize(("fault", "code", "text"), [
    ("unreachable", 69, "cannot reach Redis at redis://127.0.0.1:"),
    ("password", 77, "refused the password or user"),
    ("full", 75, "is full (maxmemory with noeviction)"),
])
def test_the_producer_cli_names_a_redis_fault_in_one_line_with_its_exit_code(fault, code, text, namespace,
                                                                            subprocess_env, tmp_path):
    import subprocess
    import sys

    server = EmbeddedRedis(tmp_path / "redis", password="pw", extra_args=["--maxmemory-policy", "noeviction"])
    server.start()
    try:
        url = {"unreachable": f"redis://127.0.0.1:{free_port()}/0",
               "password": f"redis://:wrong@127.0.0.1:{server.port}/0"}.get(fault, server.url)
        if fault == "full":
            admin = redis.Redis.from_url(server.url)
            publish_jobs(admin, namespace, 1)  # the group exists
            for n in range(200):  # small writes: a big one leaves a query buffer Redis frees later
                admin.set(f"{namespace}:filler:{n}", "x" * 10_000)
            admin.config_set("maxmemory", str(_info_used(admin) - 1_000_000))
            with pytest.raises(redis.exceptions.OutOfMemoryError):
                admin.set(f"{namespace}:probe", "x")
        result = subprocess.run([sys.executable, "-m", "orchestrator.cli.producer", "publish", "job", "--payload", "{}",
                                 "--redis-url", url, "--namespace", namespace],
                                env=subprocess_env, capture_output=True, text=True, timeout=60)
    finally:
        server.stop()
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == code, result.stderr
    assert len(errors) == 1 and text in errors[0], result.stderr
    assert "Traceback" not in result.stderr


def test_a_worker_runs_under_the_documented_acl(namespace, subprocess_env, tmp_path):
    """The ACL of docs/faults.md is enough for a worker: it reads, acks, renews, reclaims,
    trims, dead-letters and writes its heartbeat (a missing permission would stop it, exit 1)."""
    import re

    doc = (Path(__file__).resolve().parents[2] / "docs" / "faults.md").read_text()
    rule = re.search(r"^ACL SETUSER tokiwa (.+)$", doc, re.M).group(1)
    server = EmbeddedRedis(tmp_path / "redis")
    server.start()
    admin = redis.Redis.from_url(server.url)
    admin.execute_command("ACL", "SETUSER", "tokiwa", *rule.replace("tokiwa:", f"{namespace}:").split())
    url = f"redis://tokiwa:secret@127.0.0.1:{server.port}/0"
    out = tmp_path / "calls.txt"
    publish_jobs(admin, namespace, 200)
    admin.xadd(f"{{{namespace}:0}}:events", {b"junk": b"x"})
    worker = start_fault_worker(subprocess_env, url, namespace, tmp_path / "w.log", out, concurrency=8,
                                visibility_timeout_ms=1000)
    try:
        wait_for(lambda: len(successes(out)) >= 200 and admin.xlen(f"{{{namespace}:0}}:dead") == 1
                 and pending(admin, namespace) == 0 and admin.hlen(f"{namespace}:workers") == 1,
                 30, "work done under the ACL")
        time.sleep(1.5)  # renewals, reclaim scans and trims ran meanwhile
        assert worker.poll() is None
    finally:
        code = stop(worker)
        server.stop()
    log = (tmp_path / "w.log").read_text()
    assert code == 0 and "NOPERM" not in log.upper(), log[-2000:]
