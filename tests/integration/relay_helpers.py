"""Helpers for the relay integration tests: a pub/sub tap, relay builders, the process table."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from orchestrator.keys import Keys
from workers.relay.config import parse_relay_config
from workers.relay.core import Relay
from workers.relay.transport import decode_frame

ROOT = Path(__file__).resolve().parents[2]
PUPPET = str(ROOT / "examples" / "relay" / "puppet.py")

Seen = tuple[str, str, str]  # (topic, message, task)


class Tap:
    """Listens to every relayed topic of a namespace through Redis, as a remote peer would."""

    def __init__(self, redis_url: str, namespace: str) -> None:
        self.keys = Keys(namespace)
        self.items: list[Seen] = []
        self._url = redis_url
        self._cond = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Tap:
        self._client = aioredis.from_url(self._url)
        self._pubsub = self._client.pubsub()
        await self._pubsub.psubscribe(self.keys.topic_pattern)
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self._pubsub.aclose()
        await self._client.aclose()

    async def _run(self) -> None:
        prefix = len(self.keys.topic(""))
        async for msg in self._pubsub.listen():
            if msg["type"] != "pmessage":
                continue
            _, _, task, messages = decode_frame(msg["data"])
            async with self._cond:
                self.items.extend((msg["channel"][prefix:].decode(), message, task) for message in messages)
                self._cond.notify_all()

    async def publish_raw(self, topic: str, message: str) -> int:
        """PUBLISH a bare message as ``redis-cli`` would (relays deliver it as the message);
        returns how many subscriptions (relays and taps) Redis reached."""
        return await self._client.publish(self.keys.topic(topic), message)

    def find(self, pred: Callable[[Seen], bool]) -> Seen | None:
        return next((item for item in self.items if pred(item)), None)

    async def expect(self, pred: Callable[[Seen], bool], timeout: float = 10.0) -> Seen:
        async with self._cond:
            await asyncio.wait_for(self._cond.wait_for(lambda: self.find(pred) is not None), timeout)
        found = self.find(pred)
        assert found is not None
        return found

    async def echo(self, prefix: str, topic: str = "echo", timeout: float = 10.0) -> str:
        """The first message on ``topic`` starting with ``prefix`` (what a puppet echoed)."""
        _, message, _ = await self.expect(lambda s: s[0] == topic and s[1].startswith(prefix), timeout)
        return message

    def echoes(self, topic: str = "echo") -> list[str]:
        return [m for t, m, _ in self.items if t == topic]


def puppet(name: str, *, topics: list[str] | None = None, env: dict[str, str] | None = None,
           **fields: Any) -> dict[str, Any]:
    """A ``[[tasks]]`` entry running examples/relay/puppet.py."""
    return {"task_name": name, "command": sys.executable, "args": [PUPPET], "subscribe_topics": topics or [],
            "environment_vars": {"PYTHONUNBUFFERED": "1", **(env or {})}, **fields}


def inline(name: str, code: str, **fields: Any) -> dict[str, Any]:
    """A ``[[tasks]]`` entry running a snippet of Python."""
    return {"task_name": name, "command": sys.executable, "args": ["-c", code],
            "environment_vars": {"PYTHONUNBUFFERED": "1"}, **fields}


def make_relay(redis_url: str, namespace: str, tasks: list[dict[str, Any]], **kwargs: Any) -> Relay:
    options = {k: kwargs.pop(k) for k in ("publish_events", "functions", "shutdown_grace_s", "heartbeat_interval_s",
                                          "lossless_topics", "lossless_maxlen", "protocol") if k in kwargs}
    config = parse_relay_config({"tasks": tasks, **options})
    kwargs.setdefault("console", lambda line: None)
    return Relay(config, redis_url=redis_url, namespace=namespace, **kwargs)


# -- relay processes --------------------------------------------------------------------------
class RelayProcess:
    """One ``python -m workers.relay.cli`` process, killed (and its children) at the end."""

    def __init__(self, config: Path, redis_url: str, namespace: str, env: dict[str, str], *, flag: bool = False,
                 console: bool = False, log_level: str | None = None):
        args = (["--config", str(config)] if flag else [str(config)]) + (["--console"] if console else [])
        args += ["--log-level", log_level] if log_level else []
        self.log = config.with_suffix(".log")
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "workers.relay.cli", *args, "--redis-url", redis_url, "--namespace", namespace],
                env=env, stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.PIPE if console else subprocess.DEVNULL,
            )
        self.children: list[int] = []

    def remember_children(self) -> list[int]:
        self.children = children_of(self.proc.pid)
        return self.children

    def cleanup(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        for pid in self.children:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


# -- process table (only pids our tests started are ever signalled) ---------------------------
def proc_state(pid: int) -> str | None:
    """The /proc state letter of ``pid`` (None when it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None


def alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    return proc_state(pid) not in (None, "Z", "X")


def children_of(pid: int) -> list[int]:
    """Pids whose parent is ``pid``, from /proc."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
            continue
        if ppid == pid:
            found.append(int(entry))
    return found


def wait_gone(pids: list[int], timeout: float = 5.0) -> list[int]:
    """Poll the process table until every pid is gone; returns those still alive."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = [p for p in pids if alive(p)]
        if not left:
            return []
        time.sleep(0.02)
    return [p for p in pids if alive(p)]
