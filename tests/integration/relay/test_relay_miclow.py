"""Miclow mode and the plain-output rules, against a real redis-server and real children.

Children are tests/integration/relay/miclow_child.py, which reads and writes the way Miclow's
Python client does (counted stdin records, quoted blocks on stdout): what the relay sends it
on ``say`` it prints verbatim, everything else it receives it reports as JSON on ``echo``.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.integration.relay_helpers import Tap, make_relay

pytestmark = pytest.mark.timeout(30)

CHILD = str(Path(__file__).with_name("miclow_child.py"))


def child(name: str, topics: list[str] | None = None, **fields: Any) -> dict[str, Any]:
    """A ``[[tasks]]`` entry running miclow_child.py, controlled on ``say.<name>``."""
    env = {"PYTHONUNBUFFERED": "1", "CHILD_CONTROL": f"say.{name}", "CHILD_REPLY": f"echo.{name}"}
    return {"task_name": name, "command": sys.executable, "args": [CHILD],
            "subscribe_topics": [f"say.{name}", *(topics or [])], "environment_vars": env, **fields}


async def start(relays: list[Any], tap: Tap, *args: Any, names: tuple[str, ...] = ("m",), **kwargs: Any) -> Any:
    relay = make_relay(*args, **kwargs)
    relays.append(relay)
    await relay.start()
    for name in names:
        await report(tap, name, lambda r: "ready" in r)
    return relay


def reports(tap: Tap, name: str) -> list[dict[str, Any]]:
    return [json.loads(m) for t, m, _ in tap.items if t == f"echo.{name}"]


async def report(tap: Tap, name: str, pred: Any, timeout: float = 10.0) -> dict[str, Any]:
    """The first report of child ``name`` that satisfies ``pred``."""
    _, message, _ = await tap.expect(lambda s: s[0] == f"echo.{name}" and pred(json.loads(s[1])), timeout)
    return dict(json.loads(message))


async def say(relay: Any, name: str, *lines: str) -> None:
    """Make child ``name`` print ``lines`` on its stdout."""
    await relay.publish_topic(f"say.{name}", "\n".join(lines))


def block(topic: str, *lines: str) -> list[str]:
    return [f'"{topic}"::', *lines, f'::"{topic}"']


async def status_after(relay: Any, tap: Tap, name: str = "m") -> list[dict[str, Any]]:
    """Ask for the status (a command that always answers) and return the reports up to its
    answer: every reply to the commands before it has arrived by then."""
    await say(relay, name, *block("system.status", ""))
    await report(tap, name, lambda r: r.get("topic") == "system.status")
    return reports(tap, name)


# -- Miclow mode: framing and replies ----------------------------------------------------------
async def test_a_miclow_mode_child_subscribes_with_a_block_and_reads_counted_records(
    relays, tap, redis_url, namespace
) -> None:
    relay = await start(relays, tap, redis_url, namespace, [child("m")], protocol="miclow")
    await say(relay, "m", *block("system.subscribe-topic", "news"))
    reply = await report(tap, "m", lambda r: r.get("topic") == "system.subscribe-topic")
    assert reply["lines"] == ["success", "news"]
    await relay.publish_topic("news", "line 1\nline 2\n")
    assert (await report(tap, "m", lambda r: r.get("topic") == "news"))["lines"] == ["line 1", "line 2"]


async def test_miclow_mode_answers_no_unknown_command(relays, tap, redis_url, namespace) -> None:
    relay = await start(relays, tap, redis_url, namespace, [child("m")], protocol="miclow")
    await say(relay, "m", '"system.frobnicate": now')
    seen = await status_after(relay, tap)
    assert [r.get("topic") for r in seen if "topic" in r] == ["system.status"]
    assert relay.snapshot()["counters"]["unknown_commands"] == 1


async def test_miclow_mode_publishes_a_command_with_an_empty_argument_as_a_message(
    relays, tap, redis_url, namespace
) -> None:
    relay = await start(relays, tap, redis_url, namespace, [child("m")], protocol="MiclowStdIO")
    await say(relay, "m", '"system.subscribe-topic":   ')
    assert await tap.expect(lambda s: s[0] == "system.subscribe-topic") == ("system.subscribe-topic", "", "m")
    assert [r.get("topic") for r in await status_after(relay, tap) if "topic" in r] == ["system.status"]


async def test_miclow_mode_unsubscribe_without_a_subscription_answers_error_with_the_topic(
    relays, tap, redis_url, namespace
) -> None:
    relay = await start(relays, tap, redis_url, namespace, [child("m")], protocol="miclow")
    await say(relay, "m", '"system.unsubscribe-topic": never')
    reply = await report(tap, "m", lambda r: r.get("topic") == "system.unsubscribe-topic")
    assert reply["lines"] == ["error", "never"]


async def test_miclow_mode_status_is_pretty_json_of_the_running_tasks(relays, tap, redis_url, namespace) -> None:
    relay = await start(relays, tap, redis_url, namespace, [child("m", ["orders"])], protocol="miclow")
    await say(relay, "m", *block("system.status", ""))
    status, *data = (await report(tap, "m", lambda r: r.get("topic") == "system.status"))["lines"]
    state = json.loads("\n".join(data))
    assert status == "success" and len(data) > 1
    assert [t["name"] for t in state["tasks"]] == ["m"]
    assert {"name": "orders", "subscribers": 1} in state["topics"]


async def test_miclow_mode_unknown_function_answers_error_then_a_system_error_record(
    relays, tap, redis_url, namespace
) -> None:
    relay = await start(relays, tap, redis_url, namespace, [child("m")], protocol="miclow")
    await say(relay, "m", *block("system.function.nope", "x"))
    failed = await report(tap, "m", lambda r: r.get("topic") == "system.function.nope")
    error = await report(tap, "m", lambda r: r.get("topic") == "system.error")
    assert failed["lines"] == ["error", "Task 'nope' not found in configuration"]
    assert error["lines"][0] == "error"


async def test_a_miclow_mode_function_gets_its_callers_name_and_returns_to_it(
    relays, tap, redis_url, namespace
) -> None:
    function = dict(child("double"), subscribe_topics=[])
    relay = await start(relays, tap, redis_url, namespace, [child("m")], protocol="miclow", functions=[function])
    await say(relay, "m", *block("system.function.double", "21"))
    started = await report(tap, "m", lambda r: r.get("topic") == "system.function.double")
    returned = await report(tap, "m", lambda r: r.get("topic") == "system.return")
    assert started["lines"] == ["success", "double"]
    assert returned["lines"] == ["m|21"]


async def test_a_miclow_mode_child_reads_no_reply_it_could_not_parse(relays, tap, redis_url, namespace) -> None:
    # Miclow's old scripts crash on an error record they do not expect; in Miclow mode none comes
    relay = await start(relays, tap, redis_url, namespace, [child("m")], protocol="miclow")
    await say(relay, "m", '"system.start-task": json-generator', '"system.stdout": x')
    await status_after(relay, tap)
    assert relay.status()["tasks"][0]["alive"] is True


# -- plain output, in both modes ---------------------------------------------------------------
PROSE = [
    '{"name": "Alice", "age": 30, "city": "Tokyo"}',
    "ValueError: boom",
    "json.decoder.JSONDecodeError: Expecting value: line 1 column 1 (char 0)",
    "WARNING:root:disk almost full",
    "Result: ok",
    "http://example.com/a:b",
    "Traceback (most recent call last):",
    "12:30:05 started",
]


@pytest.mark.parametrize("protocol", ["tokiwa", "miclow"])
async def test_prose_log_and_exception_lines_stay_plain_output(
    relays, tap, redis_url, namespace, protocol
) -> None:
    console: list[str] = []
    relay = await start(relays, tap, redis_url, namespace, [child("m", view_stdout=True, stdin_framing="counted")],
                        protocol=protocol, console=console.append)
    console.clear()  # the ready report: a message no task subscribes to
    await say(relay, "m", *PROSE, "the end")
    await tap.expect(lambda s: s == ("m.stdout", "the end", "m"))
    assert [m for t, m, _ in tap.items if t == "m.stdout"] == [*PROSE, "the end"]
    assert console == [f"[m stdout] {line}" for line in [*PROSE, "the end"]]


async def test_the_readme_form_is_a_message_by_default_and_plain_in_miclow_mode(
    relays, tap, redis_url, namespace
) -> None:
    await start(relays, tap, redis_url, namespace, [child("d", stdin_framing="counted")], names=("d",))
    miclow = await start(relays, tap, redis_url, namespace, [child("c", protocol="miclow")], names=("c",))
    await relays[0].publish_topic("say.d", "results: completed")
    await miclow.publish_topic("say.c", "results: completed")
    assert await tap.expect(lambda s: s[0] == "results") == ("results", "completed", "d")
    assert await tap.expect(lambda s: s[0] == "c.stdout") == ("c.stdout", "results: completed", "c")


async def test_a_message_no_task_subscribes_to_is_also_shown_as_output(relays, tap, redis_url, namespace) -> None:
    console: list[str] = []
    tasks = [child("m", view_stdout=True, stdin_framing="counted"), child("o", ["orders"], stdin_framing="counted")]
    relay = await start(relays, tap, redis_url, namespace, tasks, console=console.append, names=("m", "o"))
    console.clear()  # the ready report: a message no task subscribes to
    await say(relay, "m", "orders: A-1", "nobody: hi", *block("nobody.doc", "a", "b"), "done")
    await tap.expect(lambda s: s[0] == "m.stdout" and s[1] == "done")
    assert tap.find(lambda s: s == ("nobody", "hi", "m"))  # still published
    assert console == ["[m stdout] nobody: hi", '[m stdout] "nobody.doc"::', "[m stdout] a", "[m stdout] b",
                       '[m stdout] ::"nobody.doc"', "[m stdout] done"]


async def test_a_topic_subscribed_on_a_peer_relay_is_not_shown_as_output(relays, tap, redis_url, namespace) -> None:
    console: list[str] = []
    await start(relays, tap, redis_url, namespace, [child("peer", ["orders"], stdin_framing="counted")], names=("peer",),
                heartbeat_interval_s=0.2)
    relay = await start(relays, tap, redis_url, namespace, [child("m", view_stdout=True, stdin_framing="counted")],
                        console=console.append, heartbeat_interval_s=0.2)
    await asyncio.sleep(0.5)  # a heartbeat of each relay has been seen by the other
    console.clear()  # the ready report: a message no task subscribes to
    await say(relay, "m", "orders: A-1", "done")
    await report(tap, "peer", lambda r: r.get("topic") == "orders")
    await tap.expect(lambda s: s[0] == "m.stdout" and s[1] == "done")
    assert console == ["[m stdout] done"]


async def test_without_view_stdout_nothing_is_shown(relays, tap, redis_url, namespace) -> None:
    console: list[str] = []
    relay = await start(relays, tap, redis_url, namespace, [child("m", stdin_framing="counted")],
                        console=console.append)
    await say(relay, "m", "nobody: hi", "done")
    await tap.expect(lambda s: s[0] == "m.stdout" and s[1] == "done")
    assert console == []


# -- a Miclow file under the relay command -----------------------------------------------------
LATER_FORMAT = """
shutdown_grace_s = 1.0

[[tasks]]
protocol = "MiclowStdIO"
task_name = "m"
auto_start = true
initial_topics = ["old"]
subscribe_topics = ["say.m"]

[tasks.command]
command = "{python}"
args = ["${{MICLOW_CONFIG_DIR}}/miclow_child.py", "${{GREETING:-hello}}"]
environment = {{ PYTHONUNBUFFERED = "1", CHILD_CONTROL = "say.m", CHILD_REPLY = "echo.m" }}

[[tasks.lifecycle]]
desired_instances = 2
"""


async def test_a_miclow_file_runs_under_the_relay_command_and_outlives_the_end_of_its_stdin(
    tmp_path, redis_url, namespace, subprocess_env
) -> None:
    from tests.integration.relay_helpers import RelayProcess

    (tmp_path / "miclow_child.py").write_text(Path(CHILD).read_text())
    config = tmp_path / "miclow.toml"
    config.write_text(LATER_FORMAT.format(python=sys.executable))
    subprocess_env.pop("GREETING", None)
    async with Tap(redis_url, namespace) as tap:
        relay = RelayProcess(config, redis_url, namespace, subprocess_env, console=True)
        try:
            ready = await report(tap, "m", lambda r: "ready" in r, timeout=20)
            assert ready["argv"] == ["hello"]
            relay.proc.stdin.close()  # end of file on the relay's stdin: Miclow stops, a relay runs on
            await asyncio.sleep(0.5)
            assert relay.proc.poll() is None
            await tap.publish_raw("say.m", '"system.status"::\n\n::"system.status"')
            await report(tap, "m", lambda r: r.get("topic") == "system.status", timeout=10)
        finally:
            relay.proc.terminate()
            code = relay.proc.wait(10)
            relay.cleanup()
    log = relay.log.read_text()
    assert code == 0 and "Graceful shutdown completed" in log
    for key in ("tasks.auto_start", "tasks.initial_topics", "tasks.lifecycle"):
        assert log.count(f"unknown key '{key}'") == 1, log
