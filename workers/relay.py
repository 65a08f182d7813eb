"""The Miclow relay: child processes exchanging ``topic:message`` lines over Redis pub/sub.

Each relay runs the ``[[tasks]]`` of one config file as child processes. A line a child
writes (see :mod:`workers.relay_protocol`) becomes a message on a topic; the message is
delivered at once to every *local* task subscribed to that exact topic (the publisher too,
as upstream Miclow does) and published on ``{ns}:topic:{topic}``, where every other relay
on every host delivers it to its own subscribers. ``system.*`` lines are commands, handled
by :mod:`workers.relay_commands`.

Usage (the Orchestrator does this for ``tokiwa-worker run --relay relay.toml``)::

    relay = Relay(load_relay_config("relay.toml"), redis_url=url, namespace="tokiwa",
                  on_task_exit=..., on_topic_event=...)
    await relay.start()
    await relay.publish_topic("orders", "A-001")
    relay.snapshot()
    await relay.stop()

A child that exits is logged with its code, reported through ``on_task_exit`` (a
:class:`TaskExit`) and, when it failed, announced on the ``system.error`` topic; its
subscriptions are removed, and its ``restart`` policy may start it again after a backoff.
Exits caused by :meth:`Relay.stop` are only logged.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import socket
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from redis.exceptions import RedisError

from orchestrator.errors import BrokerError, InvalidArgumentError, RelayError, StateError
from orchestrator.keys import Keys

from .relay_child import ChildProcess, TaskExit
from .relay_commands import SystemCommands
from .relay_config import RelayConfig, TaskConfig
from .relay_protocol import ERROR_TOPIC, Output
from .relay_topics import TopicTable
from .relay_transport import RelayTransport

log = logging.getLogger("tokiwa.relay")

#: a child that ran at least this long before exiting resets its restart backoff.
STABLE_AFTER_S = 10.0
#: topic messages waiting for ``on_topic_event``; beyond it they are counted as dropped.
EVENT_QUEUE_MAX = 10_000
#: how long stop() lets the publisher flush messages already queued for Redis.
FLUSH_ON_STOP_S = 0.5


TaskExitHandler = Callable[[TaskExit], "Awaitable[None] | None"]
TopicEventHandler = Callable[[str, str], "Awaitable[None] | None"]


class _Slot:
    """One configured ``[[tasks]]`` entry and its current process."""

    __slots__ = ("spec", "child", "state", "restarts", "failures")

    def __init__(self, spec: TaskConfig) -> None:
        self.spec = spec
        self.child: ChildProcess | None = None
        self.state = "pending"  # pending | running | backoff | exited | failed | stopped
        self.restarts = 0
        self.failures = 0


def _print_console(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def check_topic(topic: object) -> str:
    """``topic`` if it is a usable topic name, else :class:`InvalidArgumentError`."""
    if not isinstance(topic, str) or not topic or any(c.isspace() for c in topic):
        raise InvalidArgumentError(f"a topic must be a non-empty string without whitespace, got {topic!r}")
    return topic


class Relay:
    """Runs the child processes of one relay config and routes their topic messages."""

    def __init__(
        self,
        config: RelayConfig,
        *,
        redis_url: str,
        namespace: str = "tokiwa",
        on_task_exit: TaskExitHandler | None = None,
        on_topic_event: TopicEventHandler | None = None,
        host: str | None = None,
        console: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.keys = Keys(namespace)
        self.relay_id = uuid.uuid4().hex[:12]
        self.host = host or socket.gethostname()
        self.on_task_exit = on_task_exit
        self.on_topic_event = on_topic_event
        self.counters = {"malformed": 0, "unknown_commands": 0, "events": 0, "events_dropped": 0,
                         "overflow_exited": 0, "undelivered_at_exit": 0}
        self._console = console or _print_console
        self._clock = clock
        self._transport = RelayTransport(redis_url, self.keys, self.relay_id, self.host, self._on_remote)
        self._slots = {spec.task_name: _Slot(spec) for spec in config.tasks}
        self._functions: dict[ChildProcess, ChildProcess | None] = {}  # instance -> caller
        self.topics = TopicTable()
        self._event_re = config.publish_events_regex()
        self._events: asyncio.Queue[tuple[str, str]] = asyncio.Queue(EVENT_QUEUE_MAX)
        self._commands = SystemCommands(self)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._supervisors: set[asyncio.Task[Any]] = set()  # subset of _tasks: one per [[tasks]] entry
        self._peers: list[dict[str, Any]] = []
        self._state = "new"  # new | running | stopping | stopped

    # -- lifecycle -----------------------------------------------------------------------
    async def start(self) -> None:
        """Connect to Redis, subscribe, and start every task. When it returns, every task
        that could start is running with its initial subscriptions in place."""
        if self._state != "new":
            raise StateError(f"relay already {self._state}; create a new Relay to start again")
        self._state = "running"
        try:
            await self._transport.start()
        except BaseException:
            self._state = "stopped"
            raise
        if self._event_re is not None:
            self._spawn(self._event_loop())
        for slot in self._slots.values():
            child, error = await self._launch(slot)
            self._supervisors.add(self._spawn(self._supervise(slot, child, error)))
        self._spawn(self._heartbeat_loop())
        log.info("relay %s started %d task(s) on %s", self.relay_id, len(self._slots), self.host)

    async def stop(self) -> None:
        """SIGTERM every child's process group, wait the grace period (``shutdown_grace_s``),
        SIGKILL what is left, then close the Redis side. Idempotent."""
        if self._state in ("stopping", "stopped", "new"):
            self._state = "stopped" if self._state == "new" else self._state
            return
        self._state = "stopping"
        children = [s.child for s in self._slots.values() if s.child is not None] + list(self._functions)
        await asyncio.gather(*(c.terminate(self.config.shutdown_grace_s) for c in children))
        supervisors = [t for t in self._supervisors if not t.done()]
        if supervisors:  # they see their child's exit and return at once
            await asyncio.wait(supervisors, timeout=1.0)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        late = [c for c in self._children()]  # started while we were stopping (a restart in flight)
        await asyncio.gather(*(c.terminate(0) for c in late))
        await self._transport.flush(FLUSH_ON_STOP_S)
        await self._transport.stop()
        self._state = "stopped"
        log.info("relay %s stopped", self.relay_id)

    @property
    def running(self) -> bool:
        return self._state == "running"

    def _spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- children ------------------------------------------------------------------------
    def _start_child(self, spec: TaskConfig, **kwargs: Any) -> ChildProcess:
        return ChildProcess(spec, self._on_output, **kwargs)

    async def _launch(self, slot: _Slot) -> tuple[ChildProcess | None, RelayError | None]:
        child = self._start_child(slot.spec)
        try:
            await child.start()
        except RelayError as exc:
            log.error("relay: %s", exc)
            return None, exc
        slot.child, slot.state = child, "running"
        for topic in slot.spec.subscribe_topics:
            self.topics.subscribe(child, topic)
        return child, None

    def _backoff(self, slot: _Slot, failed: bool) -> float | None:
        """Seconds until the next start, or None when the policy says no restart."""
        policy = slot.spec.restart
        if self._state != "running" or policy == "never" or (policy == "on-failure" and not failed):
            return None
        return min(slot.spec.restart_backoff_max_s, slot.spec.restart_backoff_s * 2 ** max(0, slot.failures - 1))

    async def _supervise(self, slot: _Slot, child: ChildProcess | None, error: RelayError | None) -> None:
        """Wait for the slot's process to end, report it, restart it per policy; repeat."""
        while True:
            started = self._clock()
            code = await child.wait() if child is not None else None
            if child is not None:
                self._retire(child)
            failed = code != 0
            slot.failures = 0 if self._clock() - started >= STABLE_AFTER_S else slot.failures + 1
            delay = self._backoff(slot, failed)
            slot.state = "backoff" if delay is not None else ("failed" if failed else "exited")
            if self._state != "running":
                slot.state = "stopped"
            await self._report_exit(slot.spec, child, code, error, delay, slot.restarts)
            if delay is None:
                return
            await asyncio.sleep(delay)
            if self._state != "running":
                slot.state = "stopped"
                return
            slot.restarts += 1
            child, error = await self._launch(slot)

    async def _report_exit(
        self, spec: TaskConfig, child: ChildProcess | None, code: int | None, error: Exception | None,
        delay: float | None, restarts: int, caller: str | None = None,
    ) -> None:
        info = TaskExit(
            task=spec.task_name, task_id=child.task_id if child else "", pid=child.pid if child else None,
            code=code, failed=code != 0, restarting=delay is not None, restart_in_s=delay,
            restarts=restarts, host=self.host, relay_id=self.relay_id,
            error=str(error) if error else None, function_of=caller,
        )
        if self._state != "running":
            log.info("relay: %s (shutdown)", info.describe())
            return
        level = logging.WARNING if info.failed else logging.INFO
        log.log(level, "relay: %s%s", info.describe(), f"; restart in {delay:.2f}s" if delay is not None else "")
        if info.failed:
            self.route(ERROR_TOPIC, info.describe(), spec.task_name)
        await self._call_hook(self.on_task_exit, info)

    async def _call_hook(self, hook: Callable[..., Any] | None, *args: Any) -> None:
        if hook is None:
            return
        try:
            result = hook(*args)
            if inspect.isawaitable(result):
                await result
        except Exception:  # a failing hook is logged, never fatal
            log.exception("relay: callback %r failed", hook)

    async def run_function(self, spec: TaskConfig, caller: ChildProcess, data: str) -> ChildProcess:
        """Start one instance of a ``[[functions]]`` entry for ``caller``; returns once it runs."""
        child = self._start_child(spec, extra_env={"MICLOW_CALLER_TASK": caller.name}, function_of=caller.name)
        await child.start()
        self._functions[child] = caller
        for topic in spec.subscribe_topics:
            self.topics.subscribe(child, topic)
        self._spawn(self._await_function(child))
        return child

    async def _await_function(self, child: ChildProcess) -> None:
        code = await child.wait()
        self._retire(child)
        self._functions.pop(child, None)
        await self._report_exit(child.spec, child, code, None, None, 0, caller=child.function_of)

    def _retire(self, child: ChildProcess) -> None:
        """Forget an exited child: its subscriptions go (as upstream), its counters stay."""
        self.topics.remove(child)
        self.counters["overflow_exited"] += child.overflow
        self.counters["undelivered_at_exit"] += child.undelivered_at_exit

    def caller_of(self, child: ChildProcess) -> ChildProcess | None:
        """The task that started function instance ``child`` (None for ordinary tasks)."""
        return self._functions.get(child)

    # -- routing -------------------------------------------------------------------------
    def _on_output(self, child: ChildProcess, out: Output, stream: str) -> None:
        if out.problem is not None:
            child.malformed += 1
            self.counters["malformed"] += 1
            log.warning("relay: malformed %s line from task %s (%s): %.200r", stream, child.name, out.problem, out.data)
            if not out.data and out.kind == "plain":
                return
        if out.kind == "command":
            self._commands.handle(child, out.topic, out.data)
            return
        if out.kind == "plain" and (child.spec.view_stdout if stream == "stdout" else child.spec.view_stderr):
            self._console(f"[{child.name} {stream}] {out.data}")
        self.route(out.topic, out.data, child.name)

    def route(self, topic: str, message: str, task: str) -> None:
        """Deliver a message from a local task: local subscribers, Redis, publish_events."""
        self.topics.deliver(topic, message)
        self._transport.publish_nowait(topic, message, task)
        if self._event_re is not None and self._event_re.match(topic):
            try:
                self._events.put_nowait((topic, message))
            except asyncio.QueueFull:
                self.counters["events_dropped"] += 1

    def _on_remote(self, topic: str, messages: list[str], host: str, task: str) -> None:
        for message in messages:
            self.topics.deliver(topic, message)

    async def publish_topic(self, topic: str, message: str) -> None:
        """Publish ``message`` on ``topic`` from code (a workflow node): local subscribers
        get it at once, every other relay through Redis. Does not trigger ``publish_events``
        (so a workflow cannot re-trigger itself through its own topic). Raises
        :class:`BrokerError` when Redis cannot be reached (local subscribers already got it)."""
        check_topic(topic)
        if not isinstance(message, str):
            raise InvalidArgumentError(f"a topic message must be a str, got {type(message).__name__}")
        if self._state != "running":
            raise StateError("relay is not running")
        self.topics.deliver(topic, message)
        await self._transport.publish(topic, message, "")

    async def _event_loop(self) -> None:
        while True:
            topic, message = await self._events.get()
            self.counters["events"] += 1
            await self._call_hook(self.on_topic_event, topic, message)

    # -- state ---------------------------------------------------------------------------
    async def _heartbeat_loop(self) -> None:
        interval = self.config.heartbeat_interval_s
        while True:
            try:
                self._peers = await self._transport.heartbeat(self._heartbeat_record(), interval)
            except (RedisError, BrokerError, OSError) as exc:
                log.warning("relay: heartbeat failed: %s", exc)
            await asyncio.sleep(interval)

    def _heartbeat_record(self) -> dict[str, Any]:
        return {
            "host": self.host, "pid": os.getpid(),
            "tasks": [{"name": c.name, "id": c.task_id, "pid": c.pid} for c in self._children()],
            "topics": self.topics.topics(),
        }

    def _children(self) -> list[ChildProcess]:
        running = [s.child for s in self._slots.values() if s.child is not None and s.child.alive]
        return running + [c for c in self._functions if c.alive]

    def status(self) -> dict[str, Any]:
        """What ``system.status`` answers: tasks, pids, topics, hosts (this relay and the
        live peers seen in the last heartbeat)."""
        me = {"host": self.host, "relay": self.relay_id, "pid": os.getpid(), "local": True,
              "tasks": [c.name for c in self._children()]}
        peers = [{"host": p.get("host"), "relay": p.get("relay_id"), "pid": p.get("pid"), "local": False,
                  "tasks": [t.get("name") for t in p.get("tasks", [])]} for p in self._peers]
        return {
            "relay": self.relay_id,
            "tasks": [self._task_status(s) for s in self._slots.values()]
            + [dict(c.snapshot(), state="running", topics=self.topics.topics_of(c)) for c in self._functions],
            "topics": self.topics.counts(),
            "hosts": [me, *peers],
        }

    def _task_status(self, slot: _Slot) -> dict[str, Any]:
        base: dict[str, Any] = slot.child.snapshot() if slot.child else {"name": slot.spec.task_name, "pid": None}
        topics = self.topics.topics_of(slot.child) if slot.child else []
        return dict(base, state=slot.state, restarts=slot.restarts, topics=topics)

    def snapshot(self) -> dict[str, Any]:
        """Status plus counters, for ``Orchestrator.snapshot()`` and ``/metrics``."""
        t = self._transport
        counters = dict(self.counters, published=t.published, received=t.received,
                        publish_errors=t.publish_errors, publish_dropped=t.publish_dropped,
                        overflow=self.counters["overflow_exited"] + sum(c.overflow for c in self._live_or_last()))
        return dict(self.status(), host=self.host, state=self._state, counters=counters)

    def _live_or_last(self) -> list[ChildProcess]:
        """Children whose overflow is not yet in ``overflow_exited`` (still running)."""
        return [c for c in self._children() if c.returncode is None]
