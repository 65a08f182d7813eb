"""Half-open links. First the connection layer in-process (one outage line for every client of
the process, none for a reset that redis-py mends at once, unix sockets, the read cap), then a
real worker whose TCP path to Redis blackholes (no FIN, no RST) for 20 s while a second worker,
connected directly, goes on.

Counted there: time to detect (the cut-off worker's first outage line), outage lines (exactly
one, plus one recovery), lost events (0), duplicated runs (at most what the cut-off worker held
at the cut: another worker reclaims those; the cut-off one must not ack or record them), and
the time until the cut-off worker consumes again after the heal.
"""

from __future__ import annotations

import asyncio
import logging
import re
import shutil
import tempfile
import time
from datetime import datetime
from pathlib import Path

import pytest
import redis

from orchestrator.broker.connection import REDIS_TIMEOUT_MS, create_redis, create_sync_redis, read_block_ms
from orchestrator.broker.embedded import EmbeddedRedis
from orchestrator.events import Event, encode_fields
from orchestrator.faults import reset_conditions
from tests.groups import consumer_pending, group, pending_total
from tests.groups import ensure_group as create_group
from tests.integration.procs import start_worker, stop, wait_until, worker_env

from .proxy import FaultProxy

BLACKHOLE_S = 20.0
VISIBILITY_MS = 10_000
# lines about single events (a handler whose own Redis call timed out, an entry lost to the
# other worker and not acked) are consequences of the outage, not lines about it
PER_ENTRY = re.compile(r"no longer ours|not acking|lost entry|reclaimed by another worker|"
                       r"subscriber \S+ failed on ")
OUTAGE = "redis unreachable ("
RECOVERED = "redis unreachable: recovered after"
STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) (WARNING|ERROR|CRITICAL) ")


def publish(client: redis.Redis, namespace: str, start: int, count: int) -> None:
    stream = f"{{{namespace}:0}}:events"
    create_group(client, namespace, group("sub:tests.integration.apps.counting.record"))  # the counting app's route
    pipe = client.pipeline(transaction=False)
    for i in range(start, start + count):
        pipe.xadd(stream, encode_fields(Event("job", {"i": i})))
    pipe.execute()


def seen(client: redis.Redis, namespace: str) -> dict[int, int]:
    return {int(k): int(v) for k, v in client.hgetall(f"{namespace}:test:seen").items()}


def processed_by(client: redis.Redis, namespace: str, pid: int) -> int:
    return int(client.hget(f"{namespace}:test:by_pid", str(pid)) or 0)


def problems(log: Path) -> list[tuple[float, str]]:
    """(epoch time, line) of every WARNING / ERROR line that is not about a single entry."""
    out = []
    for line in log.read_text(errors="replace").splitlines():
        m = STAMP.match(line)
        if m and not PER_ENTRY.search(line):
            out.append((datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp(), line))
    return out


# -- the connection layer, in-process ---------------------------------------------------------
@pytest.fixture
def faults_log(caplog):
    reset_conditions()
    caplog.set_level(logging.INFO, logger="tokiwa.faults")
    yield lambda: [r.getMessage() for r in caplog.records if r.name == "tokiwa.faults"]
    reset_conditions()


async def test_blackhole_is_one_outage_line_for_every_client_of_the_process(redis_url, faults_log):
    timeout_ms = 500
    with FaultProxy.for_url(redis_url) as proxy:
        aclient = create_redis(proxy.url, timeout_ms=timeout_ms)
        sclient = create_sync_redis(proxy.url, timeout_ms=timeout_ms)
        await aclient.ping()
        sclient.ping()
        stop_at = time.monotonic() + 3.0
        failures = []

        async def busy(call) -> None:
            while time.monotonic() < stop_at:
                try:
                    await call()
                except redis.RedisError as exc:
                    failures.append(exc)
                await asyncio.sleep(0.02)

        cut = time.monotonic()
        proxy.blackhole()
        tasks = [asyncio.create_task(busy(aclient.ping)),
                 asyncio.create_task(busy(lambda: aclient.xread({"nowhere": "$"}, block=read_block_ms(2000, timeout_ms)))),
                 asyncio.create_task(busy(lambda: asyncio.to_thread(sclient.ping)))]
        while not faults_log() and time.monotonic() - cut < 5:
            await asyncio.sleep(0.01)
        detected = time.monotonic() - cut
        await asyncio.sleep(max(0.0, stop_at - time.monotonic()))
        proxy.heal()
        await asyncio.gather(*tasks)
        assert await aclient.ping() and sclient.ping()
        await aclient.aclose()
        sclient.close()
    lines = faults_log()
    print(f"\ndetected after {detected:.2f}s; {len(failures)} failures reached callers; lines: {lines}")
    assert len(lines) == 2, lines
    assert lines[0].startswith("redis unreachable (") and "recovered after" in lines[1]
    assert detected < timeout_ms / 1000 + 0.5


async def test_a_reset_that_redis_py_mends_at_once_logs_nothing(redis_url, faults_log):
    with FaultProxy.for_url(redis_url) as proxy:
        client = create_redis(proxy.url, timeout_ms=500)
        await client.ping()
        assert proxy.cut(reset=True) == 1
        assert await client.ping()  # redis-py reconnects and resends; no caller sees it
        assert proxy.stats.accepted == 2
        await client.aclose()
    assert faults_log() == []


async def test_a_refused_reconnect_is_an_outage(faults_log, tmp_path):
    server = EmbeddedRedis(tmp_path / "r").start()
    client = create_redis(server.url, timeout_ms=500)
    await client.ping()
    server.stop()
    with pytest.raises(redis.ConnectionError):
        await client.ping()
    await client.aclose()
    assert len(faults_log()) == 1 and faults_log()[0].startswith("redis unreachable (")


async def test_unix_socket_urls_build_clients():
    folder = Path(tempfile.mkdtemp(prefix="tk", dir="/tmp"))  # unix socket paths are short
    try:
        sock = folder / "r.sock"
        with EmbeddedRedis(folder, extra_args=["--unixsocket", str(sock), "--unixsocketperm", "700"]):
            aclient = create_redis(f"unix://{sock}")
            sclient = create_sync_redis(f"unix://{sock}")
            assert await aclient.ping() and sclient.ping()
            await aclient.aclose()
            sclient.close()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_blocking_reads_leave_room_for_the_reply():
    assert read_block_ms(2_000, 3_000) == 2_000
    assert read_block_ms(10_000, 3_000) == 2_000
    assert read_block_ms(2_000, 600) == 350
    client = create_redis("redis://127.0.0.1:1/0", timeout_ms=3_000, block_ms=10_000)
    assert client.connection_pool.connection_kwargs["socket_timeout"] == 11.0  # never fails a block
    assert create_redis("redis://127.0.0.1:1/0").connection_pool.connection_kwargs["socket_timeout"] == 3.0


# -- a real worker cut off ------------------------------------------------------------------
@pytest.mark.slow
def test_blackholed_worker_detects_in_seconds_logs_once_and_loses_nothing(
        redis_url, namespace, sync_redis, subprocess_env, tmp_path):
    total_before, total_after = 3000, 400
    publish(sync_redis, namespace, 0, total_before)
    with FaultProxy.for_url(redis_url) as proxy:
        settings = {"concurrency": 4, "visibility_timeout_ms": VISIBILITY_MS, "TEST_SLEEP_MS": 40}
        victim_log, survivor_log = tmp_path / "victim.log", tmp_path / "survivor.log"
        victim = start_worker(worker_env(subprocess_env, proxy.url, namespace, **settings), victim_log)
        survivor = start_worker(worker_env(subprocess_env, redis_url, namespace, **settings), survivor_log)
        try:
            wait_until(lambda: processed_by(sync_redis, namespace, victim.pid) >= 40
                       and processed_by(sync_redis, namespace, survivor.pid) >= 40, 20,
                       message="both workers processing")
            assert not problems(victim_log), victim_log.read_text()
            cut_at = proxy.blackhole()
            held_at_cut = consumer_pending(sync_redis, namespace, victim.pid)
            wait_until(lambda: any(OUTAGE in line for _, line in problems(victim_log)), BLACKHOLE_S,
                       message="the cut-off worker to notice")
            time.sleep(max(0.0, cut_at + BLACKHOLE_S - time.time()))
            assert victim.poll() is None, "the cut-off worker exited"
            before_heal = processed_by(sync_redis, namespace, victim.pid)
            healed_at = proxy.heal()
            publish(sync_redis, namespace, total_before, total_after)
            wait_until(lambda: processed_by(sync_redis, namespace, victim.pid) > before_heal, 10,
                       message="the cut-off worker to consume again")
            resumed_s = time.time() - healed_at
            total = total_before + total_after
            wait_until(lambda: len(seen(sync_redis, namespace)) == total, 15, message="every event processed")
            wait_until(lambda: pending_total(sync_redis, namespace) == 0, 10,
                       message="nothing pending")
        finally:
            codes = [stop(victim), stop(survivor)]
    counts = seen(sync_redis, namespace)
    lost = total - len(counts)
    duplicated = sum(counts.values()) - len(counts)
    stale = sync_redis.llen(f"{namespace}:test:stale")
    lines = problems(victim_log)
    outages = [(t, line) for t, line in lines if OUTAGE in line]
    recoveries = [line for _, line in lines if RECOVERED in line]
    detect_s = outages[0][0] - cut_at if outages else float("nan")
    print(f"\nblackhole {BLACKHOLE_S:.0f}s: detect={detect_s:.2f}s resumed={resumed_s:.2f}s after heal "
          f"lost={lost} duplicated={duplicated} held_at_cut={held_at_cut} stale_skipped={stale} "
          f"victim_processed={processed_by(sync_redis, namespace, victim.pid)}")
    for _, line in lines:
        print("  victim:", line)
    assert lost == 0
    assert duplicated <= held_at_cut, "the cut-off worker recorded entries another worker took over"
    assert len(outages) == 1 and len(recoveries) == 1 and len(lines) == 2, \
        f"want one outage line and one recovery line, got: {[line for _, line in lines]}"
    # seen before the other worker could reclaim (the lease): one socket timeout and the gap
    # between two commands of a busy worker
    assert detect_s < REDIS_TIMEOUT_MS / 1000 + 2.0 < VISIBILITY_MS / 1000
    assert resumed_s < 10
    assert not [line for _, line in problems(survivor_log)], survivor_log.read_text()[-2000:]
    assert codes == [0, 0]
