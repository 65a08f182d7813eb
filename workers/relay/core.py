"""The Miclow relay: child processes exchanging ``topic:message`` lines over Redis.

Each relay runs the ``[[tasks]]`` of one config file as child processes. A line a child
writes (see :mod:`workers.relay.protocol`) becomes a message on a topic; the message is
delivered at once to every *local* task subscribed to that exact topic (the publisher too,
as upstream Miclow does) and published on ``{ns}:topic:{topic}``, where every other relay
on every host delivers it to its own subscribers. A topic listed in ``lossless_topics`` goes
through a Redis stream instead, for local and remote subscribers alike, so that nothing is
dropped (see :mod:`workers.relay.transport`). ``system.*`` lines are commands, handled by
:mod:`workers.relay.commands`.

Usage (the Orchestrator does this for ``tokiwa-worker run --relay relay.toml``)::

    relay = Relay(load_relay_config("relay.toml"), redis_url=url, namespace="tokiwa",
                  on_task_exit=..., on_topic_event=...)
    await relay.start()
    await relay.publish_topic("orders", "A-001")
    relay.snapshot()
    await relay.wait_failed()     # returns the RelayFatalError if the relay cannot go on
    await relay.stop()

A child that exits is logged with its code, reported through ``on_task_exit`` (a
:class:`TaskExit`) and, when it failed, announced on the ``system.error`` topic; its
subscriptions are removed, and its ``restart`` policy may start it again after a backoff
(never sooner than ``RESTART_MIN_DELAY_S``). Exits caused by :meth:`Relay.stop` are only
logged.

Every background task (pub/sub listener, publisher, stream readers, heartbeat, event
bridge, one supervisor per task) runs under a :class:`~workers.relay.transport.TaskGuard`:
one that dies is logged and restarted, or the relay fails: it logs one error line, stops
itself, and :meth:`Relay.wait_failed` returns the error, so the process around it can exit
non-zero. A relay that says it runs, runs.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import socket
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from redis.exceptions import RedisError

from orchestrator.callbacks import call_and_await
from orchestrator.errors import BrokerError, InvalidArgumentError, RelayError, StateError
from orchestrator.faults import TRANSIENT, classify
from orchestrator.keys import Keys
from workers.relay.child import ChildProcess, TaskExit
from workers.relay.commands import SystemCommands
from workers.relay.config import STABLE_AFTER_S, RelayConfig, TaskConfig
from workers.relay.protocol import ERROR_TOPIC, Output, written_lines
from workers.relay.topics import TopicTable
from workers.relay.transport import RelayFatalError, RelayTransport, TaskGuard

log = logging.getLogger("tokiwa.relay")

__all__ = ["STABLE_AFTER_S", "Relay", "RelayFatalError", "TaskExit", "check_topic"]

#: topic messages waiting for ``on_topic_event``; beyond it they are counted as dropped.
EVENT_QUEUE_MAX = 10_000
#: how long stop() lets the publisher flush messages already queued for Redis ...
FLUSH_ON_STOP_S = 0.5
#: ... and how long when some of them are on lossless topics.
LOSSLESS_FLUSH_ON_STOP_S = 5.0


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
        self.failures = 0  # consecutive exits within STABLE_AFTER_S of starting


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
        #: the error that ended the relay (None while it can go on)
        self.failure: RelayFatalError | None = None
        self._failed = asyncio.Event()
        self._console = console or _print_console
        self._clock = clock
        self._lossless = config.lossless_regex()
        self._transport = RelayTransport(
            redis_url, self.keys, self.relay_id, self.host, self._on_remote, on_fatal=self._fail,
            on_stream=self._on_stream, lossless=self._lossless, lossless_maxlen=config.lossless_maxlen,
            wanted=self._wanted,
        )
        for spec in [*config.tasks, *config.functions]:
            self._transport.outbox(spec.task_name, spec.outbox_max)
        self._guard = TaskGuard(self._fail)
        self._slots = {spec.task_name: _Slot(spec) for spec in config.tasks}
        self._functions: dict[ChildProcess, ChildProcess | None] = {}  # instance -> caller
        self.topics = TopicTable(self._topic_changed)
        self._event_re = config.publish_events_regex()
        self._events: asyncio.Queue[tuple[str, str]] = asyncio.Queue(EVENT_QUEUE_MAX)
        self._commands = SystemCommands(self)
        self._supervisors: set[asyncio.Task[Any]] = set()  # one per [[tasks]] entry
        self._peers: list[dict[str, Any]] = []
        self._peer_mismatch: set[str] = set()
        self._state = "new"  # new | running | stopping | stopped
        self._started = False
        self._stop_task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()  # wakes supervisors waiting out a restart delay

    # -- lifecycle -----------------------------------------------------------------------
    async def start(self) -> None:
        """Connect to Redis, subscribe, and start every task. When it returns, every task
        that could start is running with its initial subscriptions in place. Raises
        :class:`BrokerError` when Redis cannot be reached and :class:`RelayFatalError` when
        it refuses the relay (an ACL rule; the message names the rule to add)."""
        if self._state != "new":
            raise StateError(f"relay already {self._state}; create a new Relay to start again")
        self._state = "running"
        try:
            await self._transport.start()
        except BaseException:
            self._state = "stopped"
            raise
        try:
            await self._first_heartbeat()
            for topic in self._initial_lossless_topics():
                await self._transport.prime_stream(topic)
        except BaseException as exc:
            self._state = "stopping"
            await self._transport.stop()
            self._state = "stopped"
            if isinstance(exc, RedisError):
                raise BrokerError(f"relay cannot start on Redis: {exc}") from exc
            raise
        if self._event_re is not None:
            self._guard.spawn("event bridge", self._event_loop, restart=True)
        for slot in self._slots.values():
            child, error = await self._launch(slot)
            self._supervisors.add(self._guard.spawn(
                f"supervisor of {slot.spec.task_name}", functools.partial(self._supervise, slot, child, error),
                restart=False))
        self._guard.spawn("heartbeat", self._heartbeat_loop, restart=True)
        self._started = True
        log.info("relay %s started %d task(s) on %s", self.relay_id, len(self._slots), self.host)
        if self.failure is not None:  # a background task failed while the tasks were starting
            await self.stop()
            raise self.failure

    def _initial_lossless_topics(self) -> list[str]:
        if self._lossless is None:
            return []
        topics = {t for spec in self.config.tasks for t in spec.subscribe_topics}
        return sorted(t for t in topics if self._lossless.match(t))

    async def _first_heartbeat(self) -> None:
        """Write the first heartbeat now: a key the ACL forbids fails the start, loudly."""
        try:
            self._peers = await self._transport.heartbeat(self._heartbeat_record(), self.config.heartbeat_interval_s)
        except RedisError as exc:
            if classify(exc) not in TRANSIENT:
                raise
            self._transport.note_fault(exc)

    async def stop(self) -> None:
        """SIGTERM every child's process group, wait the grace period (``shutdown_grace_s``),
        SIGKILL what is left, then close the Redis side. Idempotent; a second caller waits
        for the first one's stop to finish."""
        if self._stop_task is None and self._state in ("new", "stopped"):
            self._state = "stopped"
            return
        if self._stop_task is None:
            self._stop_task = asyncio.ensure_future(self._stop())
        await asyncio.shield(self._stop_task)

    async def _stop(self) -> None:
        self._state = "stopping"
        self._stopping.set()
        children = [s.child for s in self._slots.values() if s.child is not None] + list(self._functions)
        await asyncio.gather(*(c.terminate(self.config.shutdown_grace_s) for c in children))
        supervisors = [t for t in self._supervisors if not t.done()]
        if supervisors:  # they see their child's exit and return at once
            await asyncio.wait(supervisors, timeout=1.0)
        await self._guard.cancel_all()
        late = [c for c in self._children()]  # started while we were stopping (a restart in flight)
        await asyncio.gather(*(c.terminate(0) for c in late))
        lossless = self._transport.pending_lossless()
        await self._transport.flush(LOSSLESS_FLUSH_ON_STOP_S if lossless else FLUSH_ON_STOP_S)
        await self._transport.stop()
        self._state = "stopped"
        log.info("relay %s stopped", self.relay_id)

    @property
    def running(self) -> bool:
        return self._state == "running"

    async def wait_failed(self) -> RelayFatalError:
        """Wait until the relay cannot go on (it has then stopped or is stopping itself) and
        return why. Never returns for a relay that keeps running."""
        await self._failed.wait()
        assert self.failure is not None  # noqa: S101 - set together with the event
        return self.failure

    def _fail(self, message: str) -> None:
        """A background task cannot go on: log one error line and take the relay down."""
        if self.failure is not None or self._state not in ("running",):
            log.debug("relay: after the relay failed or while it stops: %s", message)
            return
        self.failure = RelayFatalError(message)
        log.error("relay: %s; stopping the relay", message)
        self._failed.set()
        if self._started and self._stop_task is None:
            self._stop_task = asyncio.ensure_future(self._stop())

    def _spawn(self, coro: Awaitable[Any], name: str = "task") -> asyncio.Task[Any]:
        """Run a one-shot coroutine under the relay's guard (its failure ends the relay)."""
        return self._guard.spawn(name, lambda: coro, restart=False)

    # -- children ------------------------------------------------------------------------
    def _start_child(self, spec: TaskConfig, **kwargs: Any) -> ChildProcess:
        return ChildProcess(spec, self._on_output, pace=self._pace, **kwargs)

    def _pace(self, child: ChildProcess) -> Awaitable[Any] | None:
        return self._transport.room(child.name)

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
        return slot.spec.restart_delay(slot.failures)

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
            try:  # the restart delay, cut short by stop()
                await asyncio.wait_for(self._stopping.wait(), delay)
            except TimeoutError:
                pass
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
            await call_and_await(hook, *args)
        except Exception:  # a failing hook is logged, never fatal
            log.exception("relay: callback %r failed", hook)

    async def run_function(self, spec: TaskConfig, caller: ChildProcess, data: str) -> ChildProcess:
        """Start one instance of a ``[[functions]]`` entry for ``caller``; returns once it runs."""
        child = self._start_child(spec, extra_env={"MICLOW_CALLER_TASK": caller.name}, function_of=caller.name)
        await child.start()
        self._functions[child] = caller
        for topic in spec.subscribe_topics:
            self.topics.subscribe(child, topic)
        self._spawn(self._await_function(child), f"function {spec.task_name}")
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
        if child.spec.view_stdout if stream == "stdout" else child.spec.view_stderr:
            # plain lines, and messages that no task anywhere would see, are the task's output
            if out.kind == "plain" or not self.subscribed_anywhere(out.topic):
                for line in written_lines(out):
                    self._console(f"[{child.name} {stream}] {line}")
        self.route(out.topic, out.data, child.name)

    def subscribed_anywhere(self, topic: str) -> bool:
        """Whether a task of this relay, or of a peer relay as of its last heartbeat, subscribes
        to ``topic``."""
        return self.topics.has(topic) or any(topic in peer.get("topics", ()) for peer in self._peers)

    def is_lossless(self, topic: str) -> bool:
        """Whether ``topic`` goes through its Redis stream (``lossless_topics``)."""
        return self._lossless is not None and self._lossless.match(topic) is not None

    def route(self, topic: str, message: str, task: str) -> None:
        """Deliver a message from a local task: local subscribers, Redis, publish_events.
        A lossless topic reaches local subscribers through its stream, like remote ones."""
        if self._lossless is None or not self._lossless.match(topic):
            self.topics.deliver(topic, message)
        self._transport.publish_nowait(topic, message, task)
        if self._event_re is not None and self._event_re.match(topic):
            try:
                self._events.put_nowait((topic, message))
            except asyncio.QueueFull:
                self.counters["events_dropped"] += 1

    def pace(self, source: str) -> Awaitable[Any] | None:
        """What a writer of ``source`` (a task name, ``console``) should await before it
        routes more: None, or an awaitable while its lossless messages wait for Redis."""
        return self._transport.room(source)

    def _wanted(self, topic: str) -> bool:
        return self.topics.has(topic)

    def _on_remote(self, topic: str, messages: list[str], host: str, task: str) -> None:
        for message in messages:
            self.topics.deliver(topic, message)

    async def _on_stream(self, topic: str, messages: list[str], host: str, task: str) -> None:
        await self.topics.deliver_wait(topic, messages)

    def _topic_changed(self, topic: str, subscribed: bool) -> None:
        if not self.is_lossless(topic):
            return
        if subscribed:
            self._transport.open_stream(topic)
        else:
            self._transport.close_stream(topic)

    async def publish_topic(self, topic: str, message: str) -> None:
        """Publish ``message`` on ``topic`` from code (a workflow node): local subscribers
        get it at once, every other relay through Redis. Does not trigger ``publish_events``
        (so a workflow cannot re-trigger itself through its own topic). Raises
        :class:`BrokerError` when Redis cannot be reached (local subscribers already got it).
        On a lossless topic it returns once Redis has stored the message (waiting out an
        outage) and every subscriber, local ones included, gets it from the stream."""
        check_topic(topic)
        if not isinstance(message, str):
            raise InvalidArgumentError(f"a topic message must be a str, got {type(message).__name__}")
        if self._state != "running":
            raise StateError("relay is not running")
        if not self.is_lossless(topic):
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
            await asyncio.sleep(interval)
            try:
                self._peers = await self._transport.heartbeat(self._heartbeat_record(), interval)
            except RedisError as exc:
                if classify(exc) not in TRANSIENT:
                    raise
                self._transport.note_fault(exc)
                continue
            self._check_peers()

    def _check_peers(self) -> None:
        """Warn once per peer relay whose ``lossless_topics`` differ from ours: messages of
        the topics only one of us lists reach the other at most once."""
        mine = sorted(self.config.lossless_topics)
        for peer in self._peers:
            theirs = peer.get("lossless")
            rid = str(peer.get("relay_id"))
            if theirs is not None and sorted(theirs) != mine and rid not in self._peer_mismatch:
                self._peer_mismatch.add(rid)
                log.warning("relay: peer relay %s on %s has lossless_topics %s, this relay %s; every relay of the "
                            "namespace should list the same", rid, peer.get("host"), theirs, mine)

    def _heartbeat_record(self) -> dict[str, Any]:
        return {
            "host": self.host, "pid": os.getpid(),
            "tasks": [{"name": c.name, "id": c.task_id, "pid": c.pid} for c in self._children()],
            "topics": self.topics.topics(),
            "lossless": list(self.config.lossless_topics),
            "counters": self._counters(),
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
            + [dict(c.snapshot(), state="running", topics=self.topics.topics_of(c),
                    **self._transport.outbox_stats(c.name)) for c in self._functions],
            "topics": self.topics.counts(),
            "hosts": [me, *peers],
        }

    def _task_status(self, slot: _Slot) -> dict[str, Any]:
        base: dict[str, Any] = slot.child.snapshot() if slot.child else {"name": slot.spec.task_name, "pid": None}
        topics = self.topics.topics_of(slot.child) if slot.child else []
        return dict(base, state=slot.state, restarts=slot.restarts, topics=topics,
                    **self._transport.outbox_stats(slot.spec.task_name))

    def _counters(self) -> dict[str, int]:
        t = self._transport
        return dict(self.counters, published=t.published, received=t.received,
                    publish_errors=t.publish_errors, publish_dropped=t.publish_dropped,
                    stream_published=t.stream_published, stream_received=t.stream_received,
                    stream_duplicates=t.stream_duplicates, stream_lost=t.stream_lost,
                    backpressure_waits=t.backpressure_waits, unsent_at_stop=t.unsent_at_stop,
                    task_deaths=self._guard.deaths + t.guard.deaths,
                    overflow=self.counters["overflow_exited"] + sum(c.overflow for c in self._live_or_last()))

    def snapshot(self) -> dict[str, Any]:
        """Status plus counters, for ``Orchestrator.snapshot()`` and ``/metrics``."""
        return dict(self.status(), host=self.host, state=self._state, counters=self._counters(),
                    failure=str(self.failure) if self.failure else None)

    def _live_or_last(self) -> list[ChildProcess]:
        """Children whose overflow is not yet in ``overflow_exited`` (still running)."""
        return [c for c in self._children() if c.returncode is None]
