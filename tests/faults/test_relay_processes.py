"""The relay as separate processes (``python -m workers.relay.cli``): cross-process routing,
graceful SIGTERM, and no orphan after ``kill -9``. Only pids these tests started are signalled."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from orchestrator.cli.exitcodes import USAGE
from tests.integration.relay_helpers import PUPPET, RelayProcess, Tap, alive, wait_gone
from workers.relay.cli import relay_command

pytestmark = pytest.mark.timeout(60)


def relay_toml(tmp_path: Path, name: str, tasks: str) -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(f"shutdown_grace_s = 1.0\n{tasks}")
    return path


def puppet_task(name: str, topics: list[str], reply: str, control: str = "say", extra_env: str = "") -> str:
    return (f'[[tasks]]\ntask_name = "{name}"\ncommand = "{sys.executable}"\nargs = ["{PUPPET}"]\n'
            f"subscribe_topics = {topics!r}\n".replace("'", '"')
            + f'environment_vars = {{ PUPPET_REPLY = "{reply}", PUPPET_CONTROL = "{control}"{extra_env} }}\n')


async def ready(tap: Tap, topic: str) -> str:
    return await tap.echo("ready|", topic=topic, timeout=20)


async def test_a_task_under_one_relay_process_reaches_a_task_under_another(
    tmp_path, redis_url, namespace, subprocess_env, processes
) -> None:
    a = relay_toml(tmp_path, "a", puppet_task("sender", ["say.a"], "echo.a", control="say.a"))
    b = relay_toml(tmp_path, "b", puppet_task("receiver", ["orders"], "echo.b"))
    async with Tap(redis_url, namespace) as tap:
        processes.append(RelayProcess(a, redis_url, namespace, subprocess_env))
        processes.append(RelayProcess(b, redis_url, namespace, subprocess_env, flag=True))
        await ready(tap, "echo.a")
        await ready(tap, "echo.b")
        await tap.publish_raw("say.a", "orders: A-001")
        assert await tap.echo("orders|", topic="echo.b") == "orders|A-001"
        assert tap.find(lambda s: s == ("orders", "A-001", "sender"))


async def test_sigterm_stops_the_relay_and_its_children_and_grandchildren(
    tmp_path, redis_url, namespace, subprocess_env, processes
) -> None:
    script = tmp_path / "spawner.py"
    script.write_text("import subprocess, time\n"
                      "g = subprocess.Popen(['sleep', '60'])\n"
                      "print(f'g:ready|{g.pid}', flush=True)\ntime.sleep(60)\n")
    tasks = puppet_task("p", ["say"], "echo") + (
        f'[[tasks]]\ntask_name = "spawner"\ncommand = "{sys.executable}"\nargs = ["{script}"]\n')
    config = relay_toml(tmp_path, "r", tasks)
    async with Tap(redis_url, namespace) as tap:
        relay = RelayProcess(config, redis_url, namespace, subprocess_env)
        processes.append(relay)
        await ready(tap, "echo")
        grandchild = int((await ready(tap, "g")).split("|")[1])
    children = relay.remember_children()
    assert len(children) == 2 and alive(grandchild)
    relay.children.append(grandchild)
    relay.proc.send_signal(signal.SIGTERM)
    assert relay.proc.wait(10) == 0
    assert wait_gone(children + [grandchild]) == []
    assert "Graceful shutdown completed" in relay.log.read_text()


async def test_kill_9_of_the_relay_leaves_no_orphan_child(
    tmp_path, redis_url, namespace, subprocess_env, processes
) -> None:
    # stalled puppets never read stdin, so only the parent-death signal can end them
    stall = ', PUPPET_STALL = "1"'
    config = relay_toml(tmp_path, "r", puppet_task("p1", ["say"], "e1", extra_env=stall)
                        + puppet_task("p2", ["say"], "e2", extra_env=stall))
    async with Tap(redis_url, namespace) as tap:
        relay = RelayProcess(config, redis_url, namespace, subprocess_env)
        processes.append(relay)
        await ready(tap, "e1")
        await ready(tap, "e2")
    children = relay.remember_children()
    assert len(children) == 2 and all(alive(p) for p in children)
    relay.proc.kill()
    relay.proc.wait(10)
    assert wait_gone(children) == []


def test_cli_reports_a_bad_config_naming_the_task_and_exits_with_usage(tmp_path) -> None:
    config = relay_toml(tmp_path, "bad", '[[tasks]]\ntask_name = "w"\ncommand = "x"\nqueue_max = -1\n')
    result = CliRunner().invoke(relay_command, [str(config), "--redis-url", "redis://127.0.0.1:1/0"])
    assert result.exit_code == USAGE
    assert "task 'w'" in result.output and "queue_max" in result.output


def test_cli_refuses_two_different_config_files(tmp_path) -> None:
    result = CliRunner().invoke(relay_command, ["a.toml", "--config", "b.toml"])
    assert result.exit_code == USAGE and "once" in result.output


def test_cli_needs_a_config_file() -> None:
    result = CliRunner().invoke(relay_command, [])
    assert result.exit_code == USAGE and "missing relay config" in result.output


def test_cli_exits_unavailable_when_redis_is_unreachable(tmp_path) -> None:
    config = relay_toml(tmp_path, "ok", puppet_task("p", ["say"], "echo"))
    result = CliRunner().invoke(relay_command, [str(config), "--redis-url", "redis://127.0.0.1:1/0"])
    assert result.exit_code == 69 and "cannot subscribe" in result.output


async def test_console_lines_are_published_on_the_system_topic(
    tmp_path, redis_url, namespace, subprocess_env, processes
) -> None:
    config = relay_toml(tmp_path, "c", puppet_task("p", ["system"], "echo"))
    async with Tap(redis_url, namespace) as tap:
        relay = RelayProcess(config, redis_url, namespace, subprocess_env, console=True)
        processes.append(relay)
        await ready(tap, "echo")
        relay.proc.stdin.write(b"  hello relay  \n\n")
        relay.proc.stdin.flush()
        assert await tap.echo("system|") == "system|hello relay"
        assert tap.find(lambda s: s == ("system", "hello relay", "console"))


def test_cli_rejects_a_namespace_with_whitespace(tmp_path) -> None:
    config = relay_toml(tmp_path, "ok", puppet_task("p", ["say"], "echo"))
    result = CliRunner().invoke(relay_command, [str(config), "--namespace", "two words"])
    assert result.exit_code == USAGE and "namespace" in result.output
