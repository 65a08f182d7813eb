"""The relay under faults: ACL refusals, Redis outages and freezes, a full Redis, a chatty
child, bursts on lossless topics, background tasks that die.

Every test runs real redis-server processes (its own where it breaks them) and real child
processes; the multi-relay tests run real relay processes. Each counts what was delivered,
lost and duplicated, and bounds its own time. Only pids these tests started are signalled.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

import msgpack
import pytest
import redis.asyncio as aioredis

from orchestrator.broker.embedded import EmbeddedRedis
from orchestrator.cli.exitcodes import FAILURE
from tests.integration.procs import start_worker, stop, worker_env
from tests.integration.relay_helpers import (
    PUPPET,
    RelayProcess,
    Tap,
    children_of,
    make_relay,
    proc_state,
    puppet,
    wait_gone,
)
from workers.relay.transport import decode_frame

pytestmark = pytest.mark.timeout(60)


# -- helpers ------------------------------------------------------------------------------------
@pytest.fixture
async def relays():
    started = []
    yield started
    for relay in started:
        await asyncio.wait_for(relay.stop(), 15)


def acl_redis(tmp_path: Path, *rules: str) -> EmbeddedRedis:
    """A redis-server of this test with ACL user ``u`` (password ``pw``) holding ``rules``."""
    return EmbeddedRedis(tmp_path / "acl-redis", extra_args=["--user", "u", "on", ">pw", *rules, "+@all"]).start()


def user_url(server: EmbeddedRedis) -> str:
    return f"redis://u:pw@127.0.0.1:{server.port}/0"


def _toml(value: object) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {json.dumps(v)}" for k, v in value.items()) + " }"
    return json.dumps(value)  # strings, numbers, lists of strings: JSON and TOML agree


def toml_task(name: str, script: Path, topics: list[str], **fields: object) -> str:
    extra = "".join(f"{k} = {_toml(v)}\n" for k, v in fields.items())
    return (f'[[tasks]]\ntask_name = "{name}"\ncommand = "{sys.executable}"\nargs = ["{script}"]\n'
            f"subscribe_topics = {json.dumps(topics)}\n{extra}")


def relay_file(tmp_path: Path, name: str, tasks: str, top: str = "") -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(f"shutdown_grace_s = 1.0\nheartbeat_interval_s = 0.5\n{top}{tasks}")
    return path


def script(tmp_path: Path, name: str, code: str) -> Path:
    path = tmp_path / f"{name}.py"
    path.write_text(code)
    return path


def puppet_toml(tmp_path: Path, name: str, topics: list[str]) -> str:
    return toml_task(name, Path(PUPPET), topics, environment_vars={"PYTHONUNBUFFERED": "1"})


def wait_exit(process: RelayProcess, timeout: float) -> int:
    return process.proc.wait(timeout)


def error_lines(log: Path, needle: str) -> list[str]:
    return [line for line in log.read_text().splitlines() if needle in line]


async def until(predicate, timeout: float, what: str, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await predicate():
            return
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def count_log(caplog, needle: str) -> int:
    return sum(1 for r in caplog.records if r.name == "tokiwa.relay" and needle in r.getMessage())


# A child that reads stdin and records every ``orders.bulk`` line it gets: how many, whether
# they came in order, duplicates; it writes the tally to RESULT when ``end`` arrives.
COUNTER = """\
import json, os, sys
print("ready:" + os.environ["NAME"], flush=True)
seen, dups, disorder, last = 0, 0, 0, -1
for line in sys.stdin:
    topic, _, msg = line.rstrip("\\n").partition(":")
    if topic != "orders.bulk":
        continue
    if msg == "end":
        with open(os.environ["RESULT"], "w") as fh:
            json.dump({"received": seen, "duplicates": dups, "out_of_order": disorder, "last": last}, fh)
        print("done:" + str(seen), flush=True)
        continue
    n = int(msg)
    seen += 1
    if n == last:
        dups += 1
    elif n < last:
        disorder += 1
    last = max(last, n)
"""

# A child that, on ``go:<count> <chunk> <pause_ms>``, writes ``orders.bulk:<i>`` lines in
# chunks, then ``orders.bulk:end``.
WRITER = """\
import os, sys, time
print("ready:" + os.environ["NAME"], flush=True)
for line in sys.stdin:
    topic, _, arg = line.rstrip("\\n").partition(":")
    if topic != "go":
        continue
    count, chunk, pause_ms = (int(x) for x in arg.split())
    for start in range(0, count, chunk):
        sys.stdout.write("".join(f"orders.bulk:{i}\\n" for i in range(start, min(count, start + chunk))))
        sys.stdout.flush()
        if pause_ms:
            time.sleep(pause_ms / 1000)
    print("orders.bulk:end", flush=True)
"""


async def _bulk_relays(tmp_path: Path, url: str, namespace: str, env: dict[str, str], processes: list,
                       top: str) -> Path:
    """Relay B (a counting subscriber), then relay A (a writer) on ``url``; returns the
    path where the subscriber writes its tally."""
    result = tmp_path / "tally.json"
    counter = script(tmp_path, "counter", COUNTER)
    writer = script(tmp_path, "writer", WRITER)
    b = relay_file(tmp_path, "b", toml_task("counter", counter, ["orders.bulk"],
                                            environment_vars={"NAME": "b", "RESULT": str(result)}), top)
    a = relay_file(tmp_path, "a", toml_task("writer", writer, ["go"], environment_vars={"NAME": "a"}), top)
    async with Tap(url, namespace) as tap:
        processes.append(RelayProcess(b, url, namespace, env))
        await tap.expect(lambda s: s == ("ready", "b", "counter"), timeout=20)
        processes.append(RelayProcess(a, url, namespace, env))
        await tap.expect(lambda s: s == ("ready", "a", "writer"), timeout=20)
    return result


async def _tally(path: Path, timeout: float) -> dict[str, int]:
    async def ready() -> bool:
        return path.exists() and path.stat().st_size > 0

    await until(ready, timeout, f"the subscriber's tally in {path.name}")
    return json.loads(path.read_text())


# -- ACL ------------------------------------------------------------------------------------------
async def test_an_acl_that_forbids_the_pattern_stops_the_relay_with_one_line_naming_the_rule(
    tmp_path, namespace, subprocess_env, processes
) -> None:
    server = acl_redis(tmp_path, f"~{namespace}:*", f"~{{{namespace}:*", f"&{namespace}:x")
    try:
        config = relay_file(tmp_path, "r", puppet_toml(tmp_path, "p", ["ping"]))
        relay = RelayProcess(config, user_url(server), namespace, subprocess_env)
        processes.append(relay)
        assert wait_exit(relay, 20) == FAILURE
        lines = error_lines(relay.log, "may not subscribe to")
        assert len(lines) == 1, lines
        assert lines[0].startswith(f"error: ACL user 'u' may not subscribe to '{namespace}:topic:*': add "
                                   f"'&{namespace}:topic:*' to its channel rules (Redis: ")
        assert "System running" not in relay.log.read_text()
    finally:
        server.stop()


async def test_a_wrong_password_stops_the_relay_with_one_line_saying_so(tmp_path, namespace, subprocess_env,
                                                                        processes) -> None:
    server = acl_redis(tmp_path, f"~{namespace}:*", f"~{{{namespace}:*", f"&{namespace}:topic:*")
    try:
        config = relay_file(tmp_path, "r", puppet_toml(tmp_path, "p", ["ping"]))
        relay = RelayProcess(config, f"redis://u:wrong@127.0.0.1:{server.port}/0", namespace, subprocess_env)
        processes.append(relay)
        assert wait_exit(relay, 20) == FAILURE  # not 69: waiting would not help
        lines = error_lines(relay.log, "error: ")
        assert len(lines) == 1 and "Redis refused the relay's login as user 'u'" in lines[0], lines
    finally:
        server.stop()


async def test_an_acl_revoked_while_running_takes_the_relay_and_its_children_down(
    tmp_path, namespace, subprocess_env, processes
) -> None:
    server = acl_redis(tmp_path, f"~{namespace}:*", f"~{{{namespace}:*", f"&{namespace}:topic:*")
    try:
        config = relay_file(tmp_path, "r", puppet_toml(tmp_path, "p", ["ping"]))
        relay = RelayProcess(config, user_url(server), namespace, subprocess_env)
        processes.append(relay)
        async with Tap(server.url, namespace) as tap:
            await tap.echo("ready|", timeout=20)
            children = relay.remember_children()
            for i in range(10):
                await tap.publish_raw("ping", str(i))
            await tap.expect(lambda s: s[1] == "ping|9", timeout=10)
            delivered = [m for m in tap.echoes() if m.startswith("ping|")]
            assert delivered == [f"ping|{i}" for i in range(10)]  # none lost, none twice
            admin = aioredis.from_url(server.url)
            await admin.execute_command("ACL", "SETUSER", "u", "resetchannels", f"&{namespace}:x")
            await admin.aclose()
        assert wait_exit(relay, 20) == FAILURE
        errors = [line for line in relay.log.read_text().splitlines() if " ERROR " in line]
        assert len(errors) == 1, errors
        assert f"ACL user 'u' may not subscribe to '{namespace}:topic:*': add '&{namespace}:topic:*'" in errors[0]
        assert wait_gone(children) == []
    finally:
        server.stop()


async def test_a_worker_whose_relay_loses_its_acl_exits_non_zero(tmp_path, namespace, subprocess_env) -> None:
    server = acl_redis(tmp_path, f"~{namespace}:*", f"~{{{namespace}:*", f"&{namespace}:topic:*")
    worker = None
    try:
        config = relay_file(tmp_path, "r", puppet_toml(tmp_path, "p", ["ping"]))
        env = worker_env(subprocess_env, user_url(server), namespace)
        log = tmp_path / "worker.log"
        async with Tap(server.url, namespace) as tap:
            worker = start_worker(env, log, "--relay", str(config))
            await tap.echo("ready|", timeout=30)
            children = children_of(worker.pid)
            await tap.publish_raw("ping", "before")
            assert await tap.echo("ping|") == "ping|before"
            admin = aioredis.from_url(server.url)
            await admin.execute_command("ACL", "SETUSER", "u", "resetchannels", f"&{namespace}:x")
            await admin.aclose()
        code = await asyncio.get_running_loop().run_in_executor(None, worker.wait, 30)
        assert code == FAILURE
        text = log.read_text()
        assert len([line for line in text.splitlines() if "may not subscribe to" in line]) == 1
        assert f"add '&{namespace}:topic:*' to its channel rules" in text
        assert wait_gone(children) == []
    finally:
        if worker is not None:
            stop(worker)
        server.stop()


# -- Redis outages --------------------------------------------------------------------------------
async def test_each_redis_outage_costs_one_warning_and_routing_resumes(own_redis, relays, namespace,
                                                                       caplog) -> None:
    caplog.set_level(logging.INFO, logger="tokiwa.relay")
    relay = make_relay(own_redis.url, namespace, [puppet("p", topics=["ping"])], heartbeat_interval_s=0.2)
    relays.append(relay)
    await relay.start()
    for outage in range(2):
        own_redis.kill()
        await asyncio.sleep(1.5)  # listener, publisher and heartbeat all meet the outage
        with pytest.raises(Exception):  # noqa: B017 - a BrokerError from the pub/sub publish
            await relay.publish_topic("nobody", "lost while Redis is down")
        own_redis.start()
        async with Tap(own_redis.url, namespace) as tap:
            async def back() -> bool:
                return await tap.publish_raw("nothing", "probe") >= 2  # the relay and this tap  # noqa: B023
            await until(back, 15, "the relay's subscription after the restart")
            for i in range(20):
                await tap.publish_raw("ping", f"{outage}-{i}")
            await tap.expect(lambda s, o=outage: s[1] == f"ping|{o}-19", timeout=10)
            delivered = [m for m in tap.echoes() if m.startswith("ping|")]
            assert delivered == [f"ping|{outage}-{i}" for i in range(20)]  # none lost, none twice
        assert count_log(caplog, "Redis unreachable (") == outage + 1
        assert count_log(caplog, "Redis unreachable: recovered after") == outage + 1
    assert relay.running and relay.failure is None


async def test_a_frozen_redis_is_detected_within_seconds_and_the_relay_resubscribes(own_redis, relays, namespace,
                                                                                    caplog) -> None:
    caplog.set_level(logging.INFO, logger="tokiwa.relay")
    relay = make_relay(own_redis.url, namespace, [puppet("p", topics=["ping"])], heartbeat_interval_s=0.5)
    relays.append(relay)
    await relay.start()
    pid = own_redis.process.pid  # started by this test's fixture
    os.kill(pid, signal.SIGSTOP)
    try:
        async def noticed() -> bool:
            return count_log(caplog, "Redis unreachable (") == 1

        await until(noticed, 8, "the relay to notice the frozen Redis (a dead link is found within seconds)")
    finally:
        os.kill(pid, signal.SIGCONT)
    async with Tap(own_redis.url, namespace) as tap:
        async def recovered() -> bool:
            return count_log(caplog, "recovered after") == 1 and await tap.publish_raw("x", "probe") >= 2

        await until(recovered, 20, "the relay's recovery")
        for i in range(10):
            await tap.publish_raw("ping", str(i))
        await tap.expect(lambda s: s[1] == "ping|9", timeout=10)
        assert [m for m in tap.echoes() if m.startswith("ping|")] == [f"ping|{i}" for i in range(10)]
    assert count_log(caplog, "Redis unreachable (") == 1 and relay.failure is None


async def test_a_full_redis_holds_lossless_writers_back_with_one_error_line_then_delivers_all(
    own_redis, relays, namespace, caplog
) -> None:
    caplog.set_level(logging.INFO, logger="tokiwa.relay")
    writer = ("import sys, time\nsys.stdin.readline()\nfor c in range(50):\n"
              "    sys.stdout.write(''.join(f'audit:{i}\\n' for i in range(c * 100, c * 100 + 100)))\n"
              "    sys.stdout.flush()\n    time.sleep(0.002)\n")
    relay = make_relay(own_redis.url, namespace, [
        {"task_name": "w", "command": sys.executable, "args": ["-c", writer], "subscribe_topics": ["go"],
         "outbox_max": 50},
        puppet("p", topics=["audit"]),
    ], lossless_topics=["audit"])
    relays.append(relay)
    await relay.start()
    admin = aioredis.from_url(own_redis.url)
    try:
        async with Tap(own_redis.url, namespace) as tap:
            await tap.echo("ready|")
            await admin.config_set("maxmemory", "1")
            await relay.publish_topic("go", "now")

            async def refused() -> bool:
                return count_log(caplog, "Redis is full, writes refused (") == 1

            await until(refused, 10, "the full-Redis error line")
            await asyncio.sleep(1.0)
            counters = relay.snapshot()["counters"]
            assert counters["publish_dropped"] == 0 and counters["stream_published"] == 0  # held, not dropped
            assert counters["backpressure_waits"] > 0  # the writer was made to wait
            assert not [m for m in tap.echoes() if m.startswith("audit|")]
            await admin.config_set("maxmemory", "0")
            await tap.expect(lambda s: s == ("echo", "audit|4999", "p"), timeout=20)
            got = [m for m in tap.echoes() if m.startswith("audit|")]
            assert got == [f"audit|{i}" for i in range(5000)]  # all, in order, once
        assert count_log(caplog, "Redis is full, writes refused (") == 1
        assert count_log(caplog, "Redis is full, writes refused: recovered after") == 1
        counters = relay.snapshot()["counters"]
        assert counters["stream_lost"] == 0 and counters["stream_published"] == 5000
    finally:
        await admin.config_set("maxmemory", "0")
        await admin.aclose()


# -- fairness and lossless bursts across relay processes --------------------------------------------
CHATTY = """\
import sys
sys.stdin.readline()
line = "noise:" + "x" * 100 + "\\n"
while True:
    sys.stdout.write(line * 64)
    sys.stdout.flush()
"""

PINGER = """\
import json, sys, time
sys.stdin.readline()
for i in range(200):
    print(f"ping:{i}", flush=True)
    time.sleep(0.01)
print("system.status", flush=True)
for line in sys.stdin:
    if line.startswith("system.status:"):
        print("status:" + line[len("system.status:"):], end="", flush=True)
        break
"""


async def test_a_chatty_child_does_not_cost_another_child_its_remote_messages(
    tmp_path, redis_url, namespace, subprocess_env, processes
) -> None:
    a = relay_file(tmp_path, "a", toml_task("chatty", script(tmp_path, "chatty", CHATTY), ["go"], outbox_max=1000)
                   + toml_task("pinger", script(tmp_path, "pinger", PINGER), ["go"]))
    b = relay_file(tmp_path, "b", puppet_toml(tmp_path, "echoer", ["ping"]))
    client = aioredis.from_url(redis_url)
    pubsub = client.pubsub()
    await pubsub.subscribe(f"{namespace}:topic:echo", f"{namespace}:topic:status")  # not the noise
    echoes: list[str] = []
    status: dict = {}
    try:
        processes.append(RelayProcess(b, redis_url, namespace, subprocess_env))
        deadline = time.monotonic() + 20
        while not echoes and time.monotonic() < deadline:  # the echoer's ready line
            msg = await pubsub.get_message(timeout=0.5)
            if msg and msg["type"] == "message":
                echoes.extend(decode_frame(msg["data"])[3])
        processes.append(RelayProcess(a, redis_url, namespace, subprocess_env))
        await until(lambda: _receivers(client, f"{namespace}:topic:probe", 2), 20, "relay A's subscription")
        await asyncio.sleep(0.5)
        await client.publish(f"{namespace}:topic:go", "now")
        deadline = time.monotonic() + 30
        while not status and time.monotonic() < deadline:
            msg = await pubsub.get_message(timeout=0.5)
            if msg and msg["type"] == "message":
                channel = msg["channel"].decode()
                for text in decode_frame(msg["data"])[3]:
                    if channel.endswith(":status"):
                        status = json.loads(text)
                    else:
                        echoes.append(text)
        await asyncio.sleep(0.3)  # the last echoes
        while msg := await pubsub.get_message(timeout=0.1):
            if msg["type"] == "message" and msg["channel"].decode().endswith(":echo"):
                echoes.extend(decode_frame(msg["data"])[3])
    finally:
        await pubsub.aclose()
        await client.aclose()
    pings = [e for e in echoes if e.startswith("ping|")]
    assert status, "relay A answered system.status"
    assert len(pings) == 200 and len(set(pings)) == 200  # none lost, none twice
    assert pings == [f"ping|{i}" for i in range(200)]
    tasks = {t["name"]: t for t in status["tasks"]}
    assert tasks["chatty"]["publish_dropped"] > 0  # the chatty child did overflow its own outbox ...
    assert tasks["pinger"]["publish_dropped"] == 0  # ... and nobody else's


async def _receivers(client: aioredis.Redis, channel: str, at_least: int) -> bool:
    """Whether a PUBLISH on ``channel`` reaches ``at_least`` subscribers (relays)."""
    return int(await client.publish(channel, "probe")) >= at_least


async def test_a_lossless_burst_of_100000_lines_arrives_whole_and_in_order_across_relay_processes(
    tmp_path, redis_url, namespace, subprocess_env, processes
) -> None:
    result = await _bulk_relays(tmp_path, redis_url, namespace, subprocess_env, processes,
                                'lossless_topics = ["orders.*"]\n')
    client = aioredis.from_url(redis_url)
    started = time.monotonic()
    await client.publish(f"{namespace}:topic:go", "100000 5000 0")
    tally = await _tally(result, 30)
    took = time.monotonic() - started
    await asyncio.sleep(0.6)  # one more heartbeat (0.5 s) carries the final counters
    beats = [msgpack.unpackb(raw, raw=False) for raw in (await client.hgetall(f"{namespace}:relays")).values()]
    await client.aclose()
    assert tally == {"received": 100_000, "duplicates": 0, "out_of_order": 0, "last": 99_999}, tally
    by_pid = {beat["pid"]: beat["counters"] for beat in beats}
    writer_side, reader_side = by_pid[processes[1].proc.pid], by_pid[processes[0].proc.pid]
    assert writer_side["publish_dropped"] == 0 and writer_side["stream_published"] == 100_001  # with "end"
    assert reader_side["overflow"] == 0 and reader_side["stream_lost"] == 0
    logging.getLogger(__name__).info("100000 lossless lines in %.2fs", took)


async def test_lossless_lines_survive_a_redis_kill_and_restart(tmp_path, own_redis, namespace, subprocess_env,
                                                              processes) -> None:
    result = await _bulk_relays(tmp_path, own_redis.url, namespace, subprocess_env, processes,
                                'lossless_topics = ["orders.*"]\n')
    client = aioredis.from_url(own_redis.url)
    await client.publish(f"{namespace}:topic:go", "20000 200 10")  # about 1 s of writing
    await client.aclose()
    await asyncio.sleep(0.4)
    own_redis.kill()  # SIGKILL mid-stream; the AOF (fsync always) keeps what Redis acknowledged
    await asyncio.sleep(1.0)
    own_redis.start()
    tally = await _tally(result, 40)
    assert tally == {"received": 20_000, "duplicates": 0, "out_of_order": 0, "last": 19_999}, tally
    for process in processes:
        warnings = error_lines(process.log, "Redis unreachable (")
        assert len(warnings) == 1, warnings  # one line per outage, per relay


# -- background tasks --------------------------------------------------------------------------------
async def test_a_background_task_that_dies_is_logged_and_restarted(relays, redis_url, namespace, caplog) -> None:
    caplog.set_level(logging.INFO, logger="tokiwa.relay")
    relay = make_relay(redis_url, namespace, [puppet("p", topics=["ping"])], heartbeat_interval_s=0.1)
    transport = relay._transport  # noqa: SLF001 - the fault is injected into the heartbeat
    real, calls = transport.heartbeat, {"n": 0}

    async def flaky(record, interval):
        calls["n"] += 1
        if calls["n"] in (2, 3):  # the first beat is at start; then the loop's beats fail twice
            raise RuntimeError("heartbeat bug")
        return await real(record, interval)

    transport.heartbeat = flaky
    relays.append(relay)
    await relay.start()
    async with Tap(redis_url, namespace) as tap:
        await tap.echo("ready|")

        async def beating() -> bool:
            return calls["n"] >= 5

        await until(beating, 10, "the heartbeat to beat again")
        for i in range(10):
            await tap.publish_raw("ping", str(i))
        await tap.expect(lambda s: s[1] == "ping|9")
        assert [m for m in tap.echoes() if m.startswith("ping|")] == [f"ping|{i}" for i in range(10)]
    deaths = [r for r in caplog.records if "background task heartbeat died; restarting it" in r.getMessage()]
    assert len(deaths) == 2 and all(r.exc_info for r in deaths)
    assert relay.running and relay.failure is None and relay.snapshot()["counters"]["task_deaths"] == 2


async def test_a_supervisor_that_dies_takes_the_relay_down_loudly(relays, redis_url, namespace, caplog) -> None:
    relay = make_relay(redis_url, namespace, [puppet("crasher", topics=["say"]), puppet("bystander")],
                       shutdown_grace_s=1.0)
    relays.append(relay)

    async def broken_report(*args, **kwargs):
        raise RuntimeError("report bug")

    relay._report_exit = broken_report  # noqa: SLF001 - the fault is injected into a supervisor
    await relay.start()
    pids = [t["pid"] for t in relay.snapshot()["tasks"]]
    await relay.publish_topic("say", "!exit 3")
    failure = await asyncio.wait_for(relay.wait_failed(), 10)
    assert "supervisor of crasher" in str(failure) and "report bug" in str(failure)
    await asyncio.wait_for(relay.stop(), 10)
    assert relay.snapshot()["state"] == "stopped" and not relay.running
    assert all(proc_state(pid) in (None, "Z") for pid in pids)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR and "stopping the relay" in r.getMessage()]
    assert len(errors) == 1


async def test_a_task_that_keeps_dying_takes_the_relay_down(relays, redis_url, namespace) -> None:
    relay = make_relay(redis_url, namespace, [puppet("p")], heartbeat_interval_s=0.05)
    transport = relay._transport  # noqa: SLF001
    real = transport.heartbeat
    calls = {"n": 0}

    async def always_broken(record, interval):
        calls["n"] += 1
        if calls["n"] == 1:
            return await real(record, interval)
        raise RuntimeError("heartbeat bug")

    transport.heartbeat = always_broken
    relays.append(relay)
    await relay.start()
    failure = await asyncio.wait_for(relay.wait_failed(), 20)
    assert "background task heartbeat died 5 times" in str(failure)
