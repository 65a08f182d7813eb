"""The Miclow relay against a real redis-server and real child processes.

In-process tests run a :class:`Relay` in the test's event loop and watch Redis through a
:class:`Tap`; the process tests run ``python -m workers.relay.cli`` as separate processes.
Children are examples/relay/puppet.py: a message on its control topic (``say``) is printed
verbatim, so the test decides what the child writes; everything else it receives is
echoed as ``echo:{topic}|{message}``.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import pytest
import redis.asyncio as aioredis

from orchestrator.errors import InvalidArgumentError, StateError
from orchestrator.keys import Keys
from tests.integration.relay_helpers import Tap, inline, make_relay, proc_state, puppet
from workers.relay.transport import publish_topic_message

pytestmark = pytest.mark.timeout(30)


async def start(relays: list, relay) -> object:
    relays.append(relay)
    await relay.start()
    return relay


async def one_puppet(relays, tap, redis_url, namespace, *, topics=("ping", "say"), **relay_kwargs):
    relay = make_relay(redis_url, namespace, [puppet("p", topics=list(topics))], **relay_kwargs)
    await start(relays, relay)
    await tap.echo("ready|")
    return relay


# -- routing ----------------------------------------------------------------------------------
async def test_a_child_line_reaches_a_subscriber_of_another_relay(relays, tap, redis_url, namespace) -> None:
    await start(relays, make_relay(redis_url, namespace, [puppet("sender", topics=["say"])]))
    await start(relays, make_relay(redis_url, namespace, [puppet("receiver", topics=["orders"])]))
    assert len(await asyncio.wait_for(_readies(tap, 2), 10)) == 2
    await relays[1].publish_topic("say", "orders: A-001")
    assert await tap.echo("orders|") == "orders|A-001"
    assert tap.find(lambda s: s == ("orders", "A-001", "sender"))


async def _readies(tap: Tap, count: int) -> list[str]:
    while len(ready := [m for m in tap.echoes() if m.startswith("ready|")]) < count:
        await tap.expect(lambda s, n=len(tap.items): len(tap.items) > n)
    return ready


async def test_the_publisher_receives_its_own_message(relays, tap, redis_url, namespace) -> None:
    relay = await one_puppet(relays, tap, redis_url, namespace, topics=("say", "loop"))
    await relay.publish_topic("say", "loop:self")
    assert await tap.echo("loop|") == "loop|self"


async def test_topics_are_case_sensitive(relays, tap, redis_url, namespace) -> None:
    relay = await one_puppet(relays, tap, redis_url, namespace, topics=("Orders", "ping"))
    await relay.publish_topic("orders", "lower")
    await relay.publish_topic("Orders", "upper")
    await relay.publish_topic("ping", "marker")
    await tap.echo("ping|marker")
    assert tap.echoes() == [tap.echoes()[0], "Orders|upper", "ping|marker"]


async def test_plain_lines_go_to_the_task_stdout_and_stderr_topics(relays, tap, redis_url, namespace) -> None:
    relay = await one_puppet(relays, tap, redis_url, namespace)
    await relay.publish_topic("say", "just some text")
    await relay.publish_topic("say", "!stderr something odd")
    assert await tap.expect(lambda s: s[0] == "p.stdout") == ("p.stdout", "just some text", "p")
    assert await tap.expect(lambda s: s[0] == "p.stderr") == ("p.stderr", "something odd", "p")


async def test_a_block_reaches_a_counted_framing_child_as_one_message(relays, tap, redis_url, namespace) -> None:
    relay = make_relay(redis_url, namespace, [
        puppet("writer", topics=["say"]),
        puppet("reader", topics=["doc"], stdin_framing="counted", env={"PUPPET_FRAMING": "counted"}),
    ])
    await start(relays, relay)
    await asyncio.wait_for(_readies(tap, 2), 10)
    await relay.publish_topic("say", '"doc"::\\nline one\\nline two\\n::"doc"')
    assert await tap.echo("doc|") == 'doc|["line one", "line two"]'


async def test_a_message_published_from_code_reaches_children(relays, tap, redis_url, namespace) -> None:
    relay = await one_puppet(relays, tap, redis_url, namespace)
    await relay.publish_topic("ping", "from a node")
    assert await tap.echo("ping|") == "ping|from a node"


async def test_publish_topic_refuses_a_bad_topic_or_a_stopped_relay(relays, tap, redis_url, namespace) -> None:
    relay = await one_puppet(relays, tap, redis_url, namespace)
    with pytest.raises(InvalidArgumentError):
        await relay.publish_topic("two words", "x")
    await relay.stop()
    with pytest.raises(StateError):
        await relay.publish_topic("ping", "x")


async def test_routing_resumes_after_redis_restarts(relays, own_redis, namespace) -> None:
    relay = make_relay(own_redis.url, namespace, [puppet("p", topics=["ping"])])
    await start(relays, relay)
    own_redis.restart()
    async with Tap(own_redis.url, namespace) as tap:
        for _ in range(500):  # until the relay's pattern subscription is back (2 = relay + tap)
            if await tap.publish_raw("nothing", "probe") == 2:
                break
            await asyncio.sleep(0.02)
        await tap.publish_raw("ping", "after restart")
        assert await tap.echo("ping|") == "ping|after restart"


# -- system commands --------------------------------------------------------------------------
async def test_runtime_subscribe_and_unsubscribe(relays, tap, redis_url, namespace) -> None:
    relay = await one_puppet(relays, tap, redis_url, namespace)
    await relay.publish_topic("say", "System.Subscribe-Topic:news")
    assert await tap.echo("system.subscribe-topic|") == "system.subscribe-topic|news"
    await relay.publish_topic("news", "n1")
    assert await tap.echo("news|") == "news|n1"
    await relay.publish_topic("say", "system.unsubscribe-topic:news")
    await tap.echo("system.unsubscribe-topic|")
    await relay.publish_topic("news", "n2")
    await relay.publish_topic("ping", "marker")
    await tap.echo("ping|marker")
    assert "news|n2" not in tap.echoes()


async def test_unsubscribing_a_topic_not_subscribed_is_an_error_reply(relays, tap, redis_url, namespace) -> None:
    relay = await one_puppet(relays, tap, redis_url, namespace)
    await relay.publish_topic("say", "system.unsubscribe-topic:never")
    assert await tap.echo("system.error|") == "system.error|system.unsubscribe-topic: not subscribed to never"


async def test_status_reply_lists_tasks_pids_topics_and_hosts(relays, tap, redis_url, namespace) -> None:
    relay = await one_puppet(relays, tap, redis_url, namespace)
    await relay.publish_topic("say", "system.status")
    status = json.loads((await tap.echo("system.status|")).split("|", 1)[1])
    (task,) = status["tasks"]
    assert task["name"] == "p" and task["pid"] == relay.snapshot()["tasks"][0]["pid"] and task["state"] == "running"
    assert {"name": "ping", "subscribers": 1} in status["topics"]
    assert status["hosts"][0]["local"] is True and status["hosts"][0]["tasks"] == ["p"]


async def test_status_lists_peer_relays_from_their_heartbeats(relays, tap, redis_url, namespace) -> None:
    first = await one_puppet(relays, tap, redis_url, namespace, heartbeat_interval_s=0.05)
    await start(relays, make_relay(redis_url, namespace, [puppet("q", topics=["x"])], heartbeat_interval_s=0.05,
                                   host="other-host"))
    for _ in range(200):
        if [h["tasks"] for h in first.status()["hosts"]] == [["p"], ["q"]]:
            break
        await asyncio.sleep(0.02)
    await first.publish_topic("say", "system.status")
    status = json.loads((await tap.echo("system.status|")).split("|", 1)[1])
    peer = status["hosts"][1]
    assert peer["host"] == "other-host" and peer["tasks"] == ["q"] and peer["local"] is False


async def test_malformed_lines_and_unknown_commands_are_reported_and_harmless(relays, tap, redis_url, namespace) -> None:
    relay = await one_puppet(relays, tap, redis_url, namespace)
    for line in (": no topic", '"unterminated: x', "system.frobnicate:now"):
        await relay.publish_topic("say", line)
    assert await tap.echo("system.error|") == "system.error|system.frobnicate: unknown system command system.frobnicate"
    await relay.publish_topic("ping", "still alive")
    await tap.echo("ping|still alive")
    counters = relay.snapshot()["counters"]
    assert counters["malformed"] == 2 and counters["unknown_commands"] == 1
    assert tap.find(lambda s: s == ("p.stdout", ": no topic", "p"))


async def test_a_function_runs_on_demand_and_returns_to_its_caller(relays, tap, redis_url, namespace) -> None:
    upper = inline("Upper", "import sys\nline = sys.stdin.readline()\nprint('system.return:' + line.split(':', 1)[1].upper())")
    relay = make_relay(redis_url, namespace, [puppet("p", topics=["say"])], functions=[upper])
    await start(relays, relay)
    await tap.echo("ready|")
    await relay.publish_topic("say", "system.function.upper:hello")
    assert await tap.echo("system.function.upper|") == "system.function.upper|Upper"
    assert await tap.echo("system.return|") == "system.return|HELLO"


async def test_calling_an_unknown_function_is_an_error_reply(relays, tap, redis_url, namespace) -> None:
    relay = await one_puppet(relays, tap, redis_url, namespace)
    await relay.publish_topic("say", "system.function.nope:x")
    assert await tap.echo("system.error|") == "system.error|system.function.nope: unknown function nope"


# -- slow children, exits, restarts -------------------------------------------------------------
async def test_a_slow_child_overflows_its_queue_while_others_keep_receiving(relays, tap, redis_url, namespace) -> None:
    relay = make_relay(redis_url, namespace, [
        puppet("stall", topics=["flood"], env={"PUPPET_STALL": "1"}, queue_max=10),
        puppet("fast", topics=["flood"]),
    ])
    await start(relays, relay)
    await asyncio.wait_for(_readies(tap, 2), 10)
    body = "x" * 200
    for i in range(2000):
        await relay.publish_topic("flood", f"{i}:{body}")
    await tap.echo("flood|1999:", timeout=20)
    assert len([m for m in tap.echoes() if m.startswith("flood|")]) == 2000
    stall = next(t for t in relay.snapshot()["tasks"] if t["name"] == "stall")
    assert stall["overflow"] > 1000 and stall["queue"] == 10
    assert relay.snapshot()["counters"]["overflow"] == stall["overflow"]


async def test_a_crashed_child_is_reported_announced_and_restarted(relays, tap, redis_url, namespace) -> None:
    exits: asyncio.Queue = asyncio.Queue()
    relay = make_relay(redis_url, namespace, [
        puppet("crasher", topics=["say.c"], env={"PUPPET_CONTROL": "say.c", "PUPPET_REPLY": "c"},
               restart="on-failure", restart_backoff_s=0.5),
        puppet("watcher", topics=["system.error"]),
    ], on_task_exit=exits.put)
    await start(relays, relay)
    first_ready = await tap.echo("ready|", topic="c")
    await tap.echo("ready|")
    await relay.publish_topic("say.c", "!exit 3")
    info = await asyncio.wait_for(exits.get(), 10)
    assert (info.task, info.code, info.failed, info.restarting, info.restart_in_s) == ("crasher", 3, True, True, 0.5)
    assert await tap.echo("system.error|") == f"system.error|task crasher (pid {info.pid}) exited with code 3"
    await tap.expect(lambda s: s[0] == "c" and s[1].startswith("ready|") and s[1] != first_ready)
    crasher = next(t for t in relay.snapshot()["tasks"] if t["name"] == "crasher")
    assert crasher["restarts"] == 1 and crasher["state"] == "running" and crasher["pid"] != info.pid
    assert crasher["topics"] == ["say.c"]


async def test_a_child_with_restart_never_stays_down(relays, tap, redis_url, namespace) -> None:
    exits: asyncio.Queue = asyncio.Queue()
    relay = make_relay(redis_url, namespace, [inline("once", "import sys; sys.exit(0)")], on_task_exit=exits.put)
    await start(relays, relay)
    info = await asyncio.wait_for(exits.get(), 10)
    assert (info.code, info.failed, info.restarting) == (0, False, False)
    assert relay.snapshot()["tasks"][0]["state"] == "exited"


async def test_restart_always_restarts_a_clean_exit_with_growing_backoff(relays, tap, redis_url, namespace) -> None:
    # restart_backoff_s = 0 is raised to the 0.5 s minimum, then doubles per quick exit
    exits: asyncio.Queue = asyncio.Queue()
    relay = make_relay(redis_url, namespace, [inline("loop", "pass", restart="always", restart_backoff_s=0)],
                       on_task_exit=lambda info: exits.put_nowait((time.monotonic(), info)))
    await start(relays, relay)
    seen = [await asyncio.wait_for(exits.get(), 10) for _ in range(3)]
    assert [info.restart_in_s for _, info in seen] == [0.5, 1.0, 2.0]
    gaps = [b - a for (a, _), (b, _) in zip(seen, seen[1:], strict=False)]
    assert gaps[0] >= 0.5 and gaps[1] >= 1.0  # a start never comes sooner than its delay


async def test_a_missing_command_is_reported_and_other_tasks_still_start(relays, tap, redis_url, namespace) -> None:
    exits: asyncio.Queue = asyncio.Queue()
    relay = make_relay(redis_url, namespace, [
        {"task_name": "ghost", "command": "no-such-command-tokiwa"}, puppet("p", topics=["ping"]),
    ], on_task_exit=exits.put)
    await start(relays, relay)
    info = await asyncio.wait_for(exits.get(), 10)
    assert info.task == "ghost" and info.code is None and "not found" in info.error
    await tap.echo("ready|")


async def test_a_failing_exit_callback_is_logged_not_fatal(relays, tap, redis_url, namespace) -> None:
    def boom(info):
        raise ValueError("hook bug")

    relay = make_relay(redis_url, namespace, [inline("bad", "import sys; sys.exit(2)", restart="on-failure",
                                                     restart_backoff_s=0.5)], on_task_exit=boom)
    await start(relays, relay)
    for _ in range(500):
        if relay.snapshot()["tasks"][0]["restarts"] >= 2:
            break
        await asyncio.sleep(0.01)
    assert relay.snapshot()["tasks"][0]["restarts"] >= 2


# -- bridge to events -------------------------------------------------------------------------
async def test_publish_events_turns_matching_child_topics_into_events(relays, tap, redis_url, namespace) -> None:
    events: asyncio.Queue = asyncio.Queue()

    async def on_topic_event(topic: str, message: str) -> None:
        await events.put((topic, message))

    relay = make_relay(redis_url, namespace, [puppet("p", topics=["say"])], publish_events=["orders.*"],
                       on_topic_event=on_topic_event)
    await start(relays, relay)
    await tap.echo("ready|")
    await relay.publish_topic("orders.created", "from code")  # not turned into an event
    await relay.publish_topic("say", "audit.log:nope")
    await relay.publish_topic("say", "orders.created:A-001")
    assert await asyncio.wait_for(events.get(), 10) == ("orders.created", "A-001")
    assert events.empty() and relay.snapshot()["counters"]["events"] == 1


# -- shutdown -----------------------------------------------------------------------------------
async def test_stop_kills_a_child_that_ignores_sigterm_after_the_grace_period(relays, tap, redis_url, namespace) -> None:
    code = ("import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
            "print('echo:ready|stubborn', flush=True)\ntime.sleep(60)")
    relay = make_relay(redis_url, namespace, [inline("stubborn", code)], shutdown_grace_s=0.2)
    await start(relays, relay)
    await tap.echo("ready|")
    pid = relay.snapshot()["tasks"][0]["pid"]
    await relay.stop()
    assert proc_state(pid) in (None, "Z")
    assert relay.snapshot()["tasks"][0]["exit_code"] == -signal.SIGKILL


async def test_stop_is_idempotent_and_reports_no_exit(relays, tap, redis_url, namespace) -> None:
    exits: list = []
    relay = await one_puppet(relays, tap, redis_url, namespace, on_task_exit=exits.append)
    await relay.stop()
    await relay.stop()
    assert exits == [] and relay.snapshot()["state"] == "stopped"
    assert os.getpid() not in [t["pid"] for t in relay.snapshot()["tasks"]]


async def test_stop_during_a_restart_loop_leaves_no_child_running(relays, tap, redis_url, namespace) -> None:
    pids: list[int] = []
    relay = make_relay(redis_url, namespace, [inline("flap", "pass", restart="always", restart_backoff_s=0)],
                       on_task_exit=lambda info: pids.append(info.pid))
    await start(relays, relay)
    while len(pids) < 2:
        await asyncio.sleep(0.01)
    await relay.stop()
    last = relay.snapshot()["tasks"][0]["pid"]
    assert all(proc_state(pid) in (None, "Z") for pid in [*pids, last])


async def test_an_over_long_line_is_dropped_whole_and_reported(relays, tap, redis_url, namespace) -> None:
    code = "import sys\nsys.stdout.write('x' * (3 << 20) + '\\n')\nprint('echo:after', flush=True)\nimport time; time.sleep(30)"
    relay = make_relay(redis_url, namespace, [inline("long", code)])
    await start(relays, relay)
    assert await tap.echo("after") == "after"
    assert relay.snapshot()["counters"]["malformed"] == 1
    assert tap.find(lambda s: s[0] == "long.stdout") is None


async def test_a_message_published_without_a_relay_reaches_every_relay(relays, tap, redis_url, namespace) -> None:
    await one_puppet(relays, tap, redis_url, namespace)
    client = aioredis.from_url(redis_url)
    try:
        assert await publish_topic_message(client, Keys(namespace), "ping", "from a producer") == 2  # relay + tap
        with pytest.raises(InvalidArgumentError):
            await publish_topic_message(client, Keys(namespace), "", "x")
    finally:
        await client.aclose()
    assert await tap.echo("ping|") == "ping|from a producer"


async def test_an_exited_childs_subscriptions_are_removed(relays, tap, redis_url, namespace) -> None:
    exits: asyncio.Queue = asyncio.Queue()
    relay = await one_puppet(relays, tap, redis_url, namespace, on_task_exit=exits.put)
    await relay.publish_topic("say", "system.subscribe-topic:extra")
    await tap.echo("system.subscribe-topic|extra")
    assert {t["name"] for t in relay.status()["topics"]} == {"ping", "say", "extra"}
    await relay.publish_topic("say", "!exit 0")
    await asyncio.wait_for(exits.get(), 10)
    assert relay.status()["topics"] == [] and relay.status()["tasks"][0]["topics"] == []


async def test_view_stdout_prints_plain_lines_with_the_task_name(relays, tap, redis_url, namespace) -> None:
    shown: list[str] = []
    relay = make_relay(redis_url, namespace, [puppet("p", topics=["say"], view_stdout=True)], console=shown.append)
    await start(relays, relay)
    ready = await tap.echo("ready|")
    assert shown == [f"[p stdout] echo:{ready}"]  # no task subscribes to echo: shown as output too
    shown.clear()
    await relay.publish_topic("say", "hello there")
    await tap.expect(lambda s: s[0] == "p.stdout")
    assert shown == ["[p stdout] hello there"]


# -- per-task outboxes and lossless topics ------------------------------------------------------
CHATTY = ("import sys\nsys.stdin.readline()\nline = 'noise:' + 'x' * 100 + '\\n'\n"
          "for _ in range(400):\n    sys.stdout.write(line * 64)\n    sys.stdout.flush()\n")
PINGER = ("import sys, time\nsys.stdin.readline()\n"
          "for i in range(100):\n    print(f'ping:{i}', flush=True)\n    time.sleep(0.003)\n")


async def test_a_chatty_task_fills_only_its_own_outbox(relays, tap, redis_url, namespace) -> None:
    relay = make_relay(redis_url, namespace, [
        inline("chatty", CHATTY, subscribe_topics=["go"], outbox_max=100),
        inline("pinger", PINGER, subscribe_topics=["go"]),
    ])
    await start(relays, relay)
    await relay.publish_topic("go", "now")
    await tap.expect(lambda s: s == ("ping", "99", "pinger"), timeout=20)
    pings = [m for t, m, _ in tap.items if t == "ping"]
    assert pings == [str(i) for i in range(100)]  # none lost, none twice, in order
    tasks = {t["name"]: t for t in relay.snapshot()["tasks"]}
    assert tasks["chatty"]["publish_dropped"] > 0 and tasks["chatty"]["outbox_max"] == 100
    assert tasks["pinger"]["publish_dropped"] == 0
    assert relay.snapshot()["counters"]["publish_dropped"] == tasks["chatty"]["publish_dropped"]


async def test_a_lossless_topic_reaches_local_and_remote_subscribers_in_order(relays, tap, redis_url,
                                                                           namespace) -> None:
    writer = "import sys\nsys.stdin.readline()\nsys.stdout.write(''.join(f'orders.x:{i}\\n' for i in range(3000)))\n"
    a = make_relay(redis_url, namespace, [inline("w", writer, subscribe_topics=["go"]),
                                          puppet("local", topics=["orders.x"], queue_max=5)],
                   lossless_topics=["orders.*"])
    b = make_relay(redis_url, namespace, [puppet("remote", topics=["orders.x"], queue_max=5,
                                                 env={"PUPPET_REPLY": "echo.b"})],
                   lossless_topics=["orders.*"])
    await start(relays, a)
    await start(relays, b)
    await tap.echo("ready|")
    await tap.echo("ready|", topic="echo.b")
    await a.publish_topic("go", "now")
    await tap.expect(lambda s: s == ("echo", "orders.x|2999", "local"), timeout=20)
    await tap.expect(lambda s: s == ("echo.b", "orders.x|2999", "remote"), timeout=20)
    expected = [f"orders.x|{i}" for i in range(3000)]
    assert [m for m in tap.echoes() if m.startswith("orders.x|")] == expected  # queue_max 5: none dropped
    assert [m for m in tap.echoes("echo.b") if m.startswith("orders.x|")] == expected
    for relay in (a, b):
        counters = relay.snapshot()["counters"]
        assert counters["overflow"] == 0 and counters["stream_lost"] == 0 and counters["stream_duplicates"] == 0
    assert a.snapshot()["counters"]["stream_published"] == 3000
    assert await tap._client.xlen(f"{namespace}:topicstream:orders.x") > 0  # noqa: SLF001


async def test_publish_topic_on_a_lossless_topic_returns_once_stored(relays, tap, redis_url, namespace) -> None:
    relay = make_relay(redis_url, namespace, [puppet("p", topics=["audit"])], lossless_topics=["audit"])
    await start(relays, relay)
    await tap.echo("ready|")
    for i in range(20):
        await relay.publish_topic("audit", f"n{i}")
    entries = await tap._client.xrange(f"{namespace}:topicstream:audit")  # noqa: SLF001
    assert len(entries) == 20
    await tap.expect(lambda s: s == ("echo", "audit|n19", "p"))
    assert [m for m in tap.echoes() if m.startswith("audit|")] == [f"audit|n{i}" for i in range(20)]
