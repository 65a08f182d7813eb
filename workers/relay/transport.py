"""The relay's Redis side: topic messages over pub/sub or lossless streams, and heartbeats.

Wire form of one relayed message: ``PUBLISH {ns}:topic:{topic} <frame>`` where ``frame`` is
msgpack of ``[1, relay_id, host, task, message]`` (format version, the origin relay, its
host, the publishing task, the message text). Under load, consecutive messages of one task
on one topic share a frame: ``message`` is then the list of their texts, in order (up to
``FRAME_MAX_CHARS``), so a burst costs one PUBLISH per run. A payload that is not a frame (for
example ``redis-cli PUBLISH tokiwa:topic:orders hello``) is delivered as the message text
itself, from origin ``redis``.

Every relay holds **one** pattern subscription (``{ns}:topic:*``) and routes what it
receives to its local subscribers; it skips frames it published itself, because it already
delivered those locally.

Outgoing messages wait in one bounded :class:`Outbox` per source (a task name); one
publisher task takes from the outboxes in turn (round robin), so a chatty task cannot delay
or crowd out the others, and pipelines what it took, so a burst costs one round trip, not one
per line. A full outbox drops the message and counts it on its source; for a lossless topic it
takes the message anyway and makes the source's reader wait (:meth:`RelayTransport.room`).

Lossless topics (``lossless_topics`` in the relay file): each frame is also added to the
stream :func:`topic_stream_key` (``{ns}:topicstream:{topic}``, ``XADD MAXLEN ~``) with a
sequence number per origin task; every relay with a local subscriber reads the stream from the
position it had when the subscription began (``XREAD BLOCK``) and delivers in order, skipping
what it has seen (a resent frame) and counting what was trimmed before it could read it. A
frame that could not be stored is sent again until Redis takes it. The PUBLISH copy still
goes out, for ``redis-cli PSUBSCRIBE`` and for relays that do not treat the topic as lossless.

Faults (classified by :mod:`orchestrator.faults`): transient ones (connection loss, timeouts,
a frozen server, OOM, failover) are waited out with jittered backoff and one log line per
outage (:class:`~orchestrator.faults.Condition`), then the listener subscribes again; fatal
ones (an ACL that forbids the pattern, a wrong password) raise :class:`RelayFatalError`, whose
message names what to change, and take the relay down. Background tasks run under a
:class:`TaskGuard`: one that dies is logged and restarted, or ends the relay; never silently.

Heartbeats: ``HSET {ns}:relays {relay_id} <msgpack {host, pid, tasks, topics, counters,
lossless, at}>`` every ``heartbeat_interval_s``; entries older than 3 intervals are pruned by
whoever sees them.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgpack
import redis.asyncio as aioredis
from redis.connection import parse_url
from redis.exceptions import RedisError

from orchestrator.broker.connection import create_pubsub_redis, create_redis
from orchestrator.errors import BrokerError, InvalidArgumentError, RelayError
from orchestrator.faults import TRANSIENT, Backoff, Condition, Fault, classify, describe, refused_access
from orchestrator.keys import Keys
from orchestrator.topics import FRAME_VERSION, encode_topic_frame  # one wire format for app and relay
from orchestrator.urls import Topology, parse_redis_url
from workers.relay.config import OUTBOX_MAX_DEFAULT

log = logging.getLogger("tokiwa.relay")

#: most messages sent in one pipeline by the publisher task.
PUBLISH_BATCH = 2048
#: a frame that carries several messages stops growing past this many characters.
FRAME_MAX_CHARS = 64 * 1024
#: messages a source may have waiting for Redis when its task sets no ``outbox_max``.
OUTBOX_DEFAULT = OUTBOX_MAX_DEFAULT
#: a heartbeat older than this many intervals belongs to a dead relay.
STALE_INTERVALS = 3
#: socket timeout of ordinary commands (PUBLISH, XADD, HSET ...): a frozen Redis is an error,
#: not a hang. The pub/sub connection is watched by PING instead (see LISTEN_IDLE_S).
COMMAND_TIMEOUT_S = 5.0
#: longest wait for each Redis step of stop() (remove heartbeat, close connections).
STOP_STEP_TIMEOUT_S = 2.0
#: the listener PINGs after this long without traffic, and declares the link dead (and
#: reconnects) when the answer has not come this long after the PING.
LISTEN_IDLE_S = 2.0
#: longest pause between two reconnection attempts of the listener and the stream readers
#: (jittered exponential backoff below it): pub/sub messages are lost while unsubscribed.
RECONNECT_CAP_S = 2.0
#: longest wait for Redis to confirm the pattern subscription.
SUBSCRIBE_TIMEOUT_S = 5.0
#: before the first send after this much idleness the publisher PINGs (a pooled connection
#: may be stale after a Redis restart), so a message is never sent twice to find out.
PREFLIGHT_IDLE_S = 1.0
#: stream reads: entries per XREAD and how long one XREAD blocks (below COMMAND_TIMEOUT_S).
STREAM_READ_COUNT = 100
STREAM_BLOCK_MS = 2_000
#: a lossless topic's stream expires after this long without a write (its TTL is refreshed
#: at most once a minute per topic), so streams of topics no longer used go away.
STREAM_TTL_S = 24 * 3600
STREAM_TTL_REFRESH_S = 60.0
#: origins (relay, task) whose sequence a stream reader remembers, per topic.
STREAM_ORIGINS_MAX = 4096
#: a background task that dies this many times within RESTART_WINDOW_S ends the relay.
RESTART_LIMIT = 5
RESTART_WINDOW_S = 60.0

_packb = msgpack.Packer(use_bin_type=True).pack

RemoteHandler = Callable[[str, list[str], str, str], None]  # (topic, messages, host, task)
StreamHandler = Callable[[str, list[str], str, str], Awaitable[None]]  # same, awaited (backpressure)
FatalHandler = Callable[[str], None]


encode_frame = encode_topic_frame  # the app and the relay write one wire format


def topic_stream_key(keys: Keys, topic: str) -> str:
    """Stream of a lossless topic: ``{ns}:topicstream:{topic}`` (XADD MAXLEN ~ per relay
    ``lossless_maxlen``, fields ``frame`` (as on pub/sub) and ``seq``; expires after a day
    without writes)."""
    return keys.topic_stream(topic)


class RelayFatalError(RelayError):
    """Raised (and reported by :meth:`workers.relay.core.Relay.wait_failed`) when the relay cannot
    go on: Redis refused it for good (an ACL rule, a password, a wrong key type) or a
    background task kept dying. The message says what to change."""


def decode_frame(payload: bytes) -> tuple[str, str, str, list[str]]:
    """``(relay_id, host, task, messages)`` of a payload; a foreign payload becomes one
    message from relay ``""``, host ``redis``, task ``""``."""
    try:
        frame = msgpack.unpackb(payload, raw=False)
        if isinstance(frame, list) and len(frame) == 5 and frame[0] == FRAME_VERSION:
            _, relay_id, host, task, message = frame
            if isinstance(message, str):
                return str(relay_id), str(host), str(task), [message]
            if isinstance(message, list) and all(isinstance(m, str) for m in message):
                return str(relay_id), str(host), str(task), message
    except (ValueError, msgpack.UnpackException):
        pass
    return "", "redis", "", [payload.decode("utf-8", errors="replace")]


def frames_of(batch: list[tuple[str, str, str]]) -> list[tuple[str, str, list[str]]]:
    """Group consecutive ``(topic, message, task)`` items of one task and topic into runs
    ``(topic, task, messages)``, keeping the order, each run below ``FRAME_MAX_CHARS``."""
    return [(f.topic, f.task, f.messages) for f in _frames((t, m, task, None) for t, m, task in batch)]


async def publish_topic_message(
    client: aioredis.Redis, keys: Keys, topic: str, message: str, *, host: str = "", task: str = ""
) -> int:
    """Publish one topic message without a running relay (a producer, or a node on a worker
    started without ``--relay``): every relay of the namespace delivers it to its subscribers
    (over pub/sub, at most once, also for a topic the relays treat as lossless).
    Returns how many pub/sub subscriptions (relays) Redis reached."""
    if not isinstance(topic, str) or not topic or any(c.isspace() for c in topic):
        raise InvalidArgumentError(f"a topic must be a non-empty string without whitespace, got {topic!r}")
    if not isinstance(message, str):
        raise InvalidArgumentError(f"a topic message must be a str, got {type(message).__name__}")
    return int(await client.publish(keys.topic(topic), encode_frame("", host, task, message)))


# -- background tasks ---------------------------------------------------------------------------
class TaskGuard:
    """Runs background tasks so that none dies silently.

    ``restart=True``: a task that raises (or returns) is logged and started again after a
    backoff; ``restart=False``: a task that raises ends the relay (a normal return is fine).
    Either way a :class:`RelayFatalError` or a fatal Redis error ends the relay at once, and
    so does a task that died ``RESTART_LIMIT`` times within ``RESTART_WINDOW_S``."""

    def __init__(self, on_fatal: FatalHandler) -> None:
        self.on_fatal = on_fatal
        self.deaths = 0
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, name: str, factory: Callable[[], Awaitable[Any]], *, restart: bool) -> asyncio.Task[Any]:
        task = asyncio.create_task(self._run(name, factory, restart), name=f"relay {name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _run(self, name: str, factory: Callable[[], Awaitable[Any]], restart: bool) -> None:
        backoff = Backoff(base_s=0.1, cap_s=5.0, floor_s=0.1)
        deaths: collections.deque[float] = collections.deque()
        while True:
            try:
                await factory()
                if not restart:
                    return
                log.error("relay: background task %s ended unexpectedly; restarting it", name)
            except asyncio.CancelledError:
                raise
            except RelayFatalError as exc:
                self.on_fatal(str(exc))
                return
            except Exception as exc:
                self.deaths += 1
                if isinstance(exc, RedisError) and classify(exc) is Fault.FATAL:
                    self.on_fatal(f"{name}: Redis refused the relay: {describe(exc)}")
                    return
                if not restart:
                    log.exception("relay: background task %s failed", name)
                    self.on_fatal(f"background task {name} failed: {exc!r}")
                    return
                log.exception("relay: background task %s died; restarting it", name)
            now = time.monotonic()
            deaths.append(now)
            while deaths and now - deaths[0] > RESTART_WINDOW_S:
                deaths.popleft()
            if len(deaths) >= RESTART_LIMIT:
                self.on_fatal(f"background task {name} died {len(deaths)} times within {RESTART_WINDOW_S:.0f}s")
                return
            await backoff.sleep()

    async def cancel_all(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


# -- outgoing queues ----------------------------------------------------------------------------
class Outbox:
    """Messages of one source (a task name) waiting for Redis, in order, bounded by ``limit``."""

    __slots__ = ("name", "limit", "items", "dropped", "lossless", "queued", "room")

    def __init__(self, name: str, limit: int) -> None:
        self.name = name
        self.limit = limit
        #: ``(topic, message, lossless, future)``; ``future`` is set for :meth:`RelayTransport.publish`
        self.items: collections.deque[tuple[str, str, bool, asyncio.Future[int] | None]] = collections.deque()
        self.dropped = 0
        self.lossless = 0  # lossless messages among ``items``: their writer waits instead of dropping
        self.queued = False  # in the publisher's round-robin ring
        self.room = asyncio.Event()
        self.room.set()


class _Frame:
    """One run of messages of one task on one topic, as it is sent (and resent)."""

    __slots__ = ("topic", "task", "messages", "futures", "lossless", "seq", "payload", "publish", "store")

    def __init__(self, topic: str, task: str, message: str, future: asyncio.Future[int] | None) -> None:
        self.topic, self.task, self.messages = topic, task, [message]
        self.futures = [future] if future is not None else []
        self.lossless = False
        self.seq = 0
        self.payload = b""
        self.publish = True  # the PUBLISH is still to be sent
        self.store = False  # the XADD is still to be sent (lossless topics)


def _frames(items: Any) -> list[_Frame]:
    frames: list[_Frame] = []
    size = 0
    for topic, message, task, future in items:
        last = frames[-1] if frames else None
        if last is not None and last.topic == topic and last.task == task and size + len(message) <= FRAME_MAX_CHARS:
            last.messages.append(message)
            if future is not None:
                last.futures.append(future)
            size += len(message)
        else:
            frames.append(_Frame(topic, task, message, future))
            size = len(message)
    return frames


class _StreamState:
    """One lossless topic read by this relay: the last entry read, the last sequence number
    seen per origin (relay, task), and its reader task."""

    __slots__ = ("cursor", "seen", "task")

    def __init__(self, cursor: str | None) -> None:
        self.cursor = cursor
        self.seen: dict[tuple[str, str], int] = {}
        self.task: asyncio.Task[Any] | None = None


def _resolve(futures: list[asyncio.Future[int]], exc: BaseException | None = None) -> None:
    for fut in futures:
        if not fut.done():
            if exc is None:
                fut.set_result(1)
            else:
                fut.set_exception(exc)


class RelayTransport:
    """Pub/sub publisher and listener, lossless streams, and heartbeat writer for one relay."""

    def __init__(
        self, redis_url: str, keys: Keys, relay_id: str, host: str, on_remote: RemoteHandler, *,
        on_fatal: FatalHandler | None = None, on_stream: StreamHandler | None = None,
        lossless: re.Pattern[str] | None = None, lossless_maxlen: int = 10_000,
        wanted: Callable[[str], bool] | None = None,
    ) -> None:
        self.keys = keys
        self.relay_id = relay_id
        self.host = host
        self.published = 0
        self.received = 0
        self.publish_errors = 0
        self.publish_dropped = 0
        self.stream_published = 0
        self.stream_received = 0
        self.stream_duplicates = 0
        self.stream_lost = 0
        self.backpressure_waits = 0
        self.unsent_at_stop = 0
        self.lossless_maxlen = lossless_maxlen
        self.outage = Condition(log, "relay: Redis unreachable")
        self.full = Condition(log, "relay: Redis is full, writes refused", logging.ERROR)
        self.guard = TaskGuard(on_fatal or self._no_fatal_handler)
        self._url = redis_url
        self._on_remote = on_remote
        self._on_stream = on_stream
        self._wanted = wanted  # topic -> has local subscribers (None: deliver everything)
        self._lossless = lossless
        self._prefix = keys.topic("")
        self._outboxes: dict[str, Outbox] = {}
        self._ring: collections.deque[Outbox] = collections.deque()
        self._wake = asyncio.Event()
        self._unsent: list[_Frame] = []
        self._busy = False
        self._last_ok = 0.0
        self._seq: dict[tuple[str, str], int] = {}
        self._ttl_at: dict[str, float] = {}
        self._streams: dict[str, _StreamState] = {}
        self._redis: aioredis.Redis | None = None
        self._sub_client: aioredis.Redis | None = None
        self._pubsub: Any = None
        self._subscribed = False
        self._publisher: asyncio.Task[Any] | None = None

    @staticmethod
    def _no_fatal_handler(message: str) -> None:
        log.error("relay: %s", message)

    @property
    def redis(self) -> aioredis.Redis:
        if self._redis is None:
            raise BrokerError("relay transport is not started")
        return self._redis

    @property
    def user(self) -> str:
        """The ACL user the relay logs in as (``default`` when the URL names none)."""
        try:
            checked = parse_redis_url(self._url)
            if checked.topology is not Topology.SINGLE:
                return checked.username or "default"
            return str(parse_url(self._url).get("username") or "default")
        except ValueError:
            return "default"

    def is_lossless(self, topic: str) -> bool:
        return self._lossless is not None and self._lossless.match(topic) is not None

    def stream_key(self, topic: str) -> str:
        return topic_stream_key(self.keys, topic)

    def fatal(self, exc: BaseException, doing: str, target: str, rule: str, kind: str) -> RelayFatalError:
        """The error that ends the relay when Redis refuses ``doing`` on ``target`` for good;
        for an ACL refusal it names the rule to add."""
        said = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        refused = refused_access(exc)
        if refused == "acl":
            return RelayFatalError(f"ACL user {self.user!r} may not {doing} {target!r}: add {rule!r} to its "
                                   f"{kind} rules (Redis: {said})")
        if refused == "password":
            return RelayFatalError(f"Redis refused the relay's login as user {self.user!r}: check the user and "
                                   f"password in the Redis URL (Redis: {said})")
        return RelayFatalError(f"Redis refused to let the relay {doing} {target!r}: {describe(exc)}")

    async def start(self) -> None:
        """Connect, subscribe to every topic of the namespace (confirmed by Redis), start the
        listener and the publisher. Raises :class:`BrokerError` when Redis cannot be reached
        and :class:`RelayFatalError` when it refuses the subscription."""
        # no redis-py retries: a send is never repeated blindly (see _publish_loop). Reads on
        # the pub/sub connection pass their own timeout; socket_timeout bounds its handshake.
        # its own conditions log its outages (counted=False: not the process-wide ones too)
        timeout_ms = int(COMMAND_TIMEOUT_S * 1000)
        self._redis = create_redis(self._url, timeout_ms=timeout_ms, retries=0, counted=False)
        self._sub_client = create_pubsub_redis(self._url, timeout_ms=timeout_ms, counted=False)
        try:
            await self._subscribe()
        except RelayFatalError:
            await self._close()
            raise
        except (RedisError, OSError, TimeoutError) as exc:
            await self._close()
            raise BrokerError(f"relay cannot subscribe on {self._url}: {describe(exc)}") from exc
        self.guard.spawn("pub/sub listener", self._listen, restart=True)
        self._publisher = self.guard.spawn("publisher", self._publish_loop, restart=True)

    # -- outgoing ------------------------------------------------------------------------
    def outbox(self, source: str, limit: int | None = None) -> Outbox:
        """The outbox of ``source`` (created on first use; ``limit`` sets its bound)."""
        box = self._outboxes.get(source)
        if box is None:
            box = self._outboxes[source] = Outbox(source, limit or OUTBOX_DEFAULT)
        elif limit is not None:
            box.limit = limit
        return box

    def publish_nowait(self, topic: str, message: str, task: str) -> bool:
        """Queue one message of ``task`` for the publisher (never blocks the caller). False
        (counted on the task) when its outbox is full and the topic is not lossless."""
        box = self._outboxes.get(task) or self.outbox(task)
        lossless = self.is_lossless(topic)
        if len(box.items) >= box.limit and not lossless:
            box.dropped += 1
            self.publish_dropped += 1
            if box.dropped == 1 or box.dropped % 1000 == 0:
                log.warning("relay: task %s writes faster than Redis takes it; %d of its message(s) dropped "
                            "(outbox_max %d)", task or "(code)", box.dropped, box.limit)
            return False
        self._push(box, topic, message, lossless, None)
        return True

    def _push(self, box: Outbox, topic: str, message: str, lossless: bool, future: asyncio.Future[int] | None) -> None:
        box.items.append((topic, message, lossless, future))
        if lossless:
            box.lossless += 1
        if len(box.items) >= box.limit:
            box.room.clear()
        if not box.queued:
            box.queued = True
            self._ring.append(box)
            self._wake.set()

    def room(self, source: str) -> Awaitable[Any] | None:
        """None when ``source`` may go on writing; else an awaitable that ends once its outbox
        has room again (only while it holds lossless messages: others are dropped instead)."""
        box = self._outboxes.get(source)
        if box is None or box.lossless == 0 or box.room.is_set():
            return None
        self.backpressure_waits += 1
        return box.room.wait()

    async def publish(self, topic: str, message: str, task: str) -> int:
        """Publish one message now; returns how many relays (subscribers) Redis reached. On a
        lossless topic it returns once Redis has stored it (waiting out an outage)."""
        if self.is_lossless(topic):
            future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
            self._push(self.outbox(task), topic, message, True, future)
            return await future
        try:
            count = await self.redis.publish(self.keys.topic(topic), encode_frame(self.relay_id, self.host, task, message))
        except RedisError as exc:
            self.publish_errors += 1
            if classify(exc) is Fault.FATAL:
                raise BrokerError(str(self._channel_fatal(exc, topic))) from exc
            raise BrokerError(f"relay cannot publish on topic {topic!r}: {describe(exc)}") from exc
        self.published += 1
        return int(count)

    def _channel_fatal(self, exc: BaseException, topic: str) -> RelayFatalError:
        return self.fatal(exc, "publish to", self.keys.topic(topic), f"&{self.keys.topic_pattern}", "channel")

    def _take(self) -> list[tuple[str, str, str, asyncio.Future[int] | None]]:
        """Up to PUBLISH_BATCH queued messages, taking from each source in turn."""
        batch: list[tuple[str, str, str, asyncio.Future[int] | None]] = []
        ring = self._ring
        quantum = max(16, PUBLISH_BATCH // max(1, len(ring)))
        while ring and len(batch) < PUBLISH_BATCH:
            box = ring.popleft()
            items, name = box.items, box.name
            for _ in range(min(quantum, PUBLISH_BATCH - len(batch), len(items))):
                topic, message, lossless, future = items.popleft()
                batch.append((topic, message, name, future))
                if lossless:
                    box.lossless -= 1
            if len(items) < box.limit:
                box.room.set()
            if items:
                ring.append(box)
            else:
                box.queued = False
        return batch

    def _plan(self, batch: list[tuple[str, str, str, asyncio.Future[int] | None]]) -> list[_Frame]:
        frames = _frames(batch)
        relay_id, host = self.relay_id, self.host
        for frame in frames:
            payload = frame.messages[0] if len(frame.messages) == 1 else frame.messages
            frame.payload = encode_frame(relay_id, host, frame.task, payload)
            if self.is_lossless(frame.topic):
                frame.lossless = frame.store = True
                key = (frame.task, frame.topic)
                frame.seq = self._seq.get(key, 0)
                self._seq[key] = frame.seq + len(frame.messages)
        return frames

    async def _publish_loop(self) -> None:
        backoff = Backoff(base_s=0.05, cap_s=2.0)
        while True:
            if not self._unsent:
                batch = self._take()
                if not batch:
                    self._busy = False
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                self._unsent = self._plan(batch)
            self._busy = True
            try:
                await self._send(self._unsent)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if classify(exc) not in TRANSIENT:
                    error = exc if isinstance(exc, RelayFatalError) else RelayFatalError(
                        f"Redis refused the relay's writes: {describe(exc)}")
                    for f in self._unsent:
                        _resolve(f.futures, BrokerError(str(error)))
                    raise error from exc
                self._failed_send(exc)
                await backoff.sleep()
                continue
            backoff.reset()
            self._unsent = []

    def _failed_send(self, exc: BaseException) -> None:
        """A send failed with a transient fault: what went over pub/sub is lost (at most once,
        never resent), what goes to a stream stays for the next attempt."""
        lost = sum(len(f.messages) for f in self._unsent if f.publish and not f.lossless)
        self.publish_errors += lost
        for f in self._unsent:
            f.publish = False
        if not any(f.store for f in self._unsent):
            self._unsent = []
        self.note_fault(exc)
        if lost:
            log.debug("relay: %d message(s) not published: %s", lost, describe(exc))

    async def _preflight(self) -> None:
        """PING before sending on connections idle since PREFLIGHT_IDLE_S: a stale one (Redis
        restarted) fails here and is replaced, instead of failing a send that may have gone out."""
        for attempt in (1, 2, 3):
            try:
                await self.redis.ping()
                return
            except RedisError as exc:
                if attempt == 3 or classify(exc) is not Fault.CONNECTION:
                    raise

    async def _send(self, frames: list[_Frame]) -> None:
        """One pipeline with what ``frames`` still need; raises the first transient fault if a
        lossless frame is still not stored (``_unsent`` then holds what is left)."""
        if time.monotonic() - self._last_ok > PREFLIGHT_IDLE_S:
            await self._preflight()
        pipe = self.redis.pipeline(transaction=False)
        commands = self._commands(pipe, frames)
        results = await pipe.execute(raise_on_error=False)
        self._last_ok = time.monotonic()
        retry: BaseException | None = None
        for (f, what), result in zip(commands, results, strict=True):
            if isinstance(result, Exception):
                retry = self._command_failed(f, what, result)
            else:
                self._command_done(f, what)
        if retry is not None:
            self._unsent = [f for f in frames if f.store]
            if self._unsent:
                raise retry
            self.note_fault(retry)
            return
        self._recovered(wrote=True)

    def _commands(self, pipe: Any, frames: list[_Frame]) -> list[tuple[_Frame, str]]:
        prefix, now = self._prefix, time.monotonic()
        commands: list[tuple[_Frame, str]] = []
        for f in frames:
            if f.store:
                key = self.stream_key(f.topic)
                pipe.xadd(key, {"frame": f.payload, "seq": f.seq}, maxlen=self.lossless_maxlen, approximate=True)
                commands.append((f, "store"))
                if now - self._ttl_at.get(f.topic, -STREAM_TTL_REFRESH_S) >= STREAM_TTL_REFRESH_S:
                    self._ttl_at[f.topic] = now
                    pipe.expire(key, STREAM_TTL_S)
                    commands.append((f, "ttl"))
            if f.publish:
                pipe.publish(prefix + f.topic, f.payload)
                commands.append((f, "publish"))
        return commands

    def _command_failed(self, f: _Frame, what: str, error: Exception) -> Exception:
        """Account for one failed command of a pipeline; raises when the fault is fatal."""
        if classify(error) not in TRANSIENT:
            if what == "publish":
                raise self._channel_fatal(error, f.topic) from error
            key = self.stream_key(f.topic)
            raise self.fatal(error, "write the stream", key, f"~{self.stream_key('*')}", "key") from error
        if what == "publish":
            f.publish = False  # pub/sub is at most once: never sent twice
            if not f.lossless:
                self.publish_errors += len(f.messages)
        elif what == "ttl":
            self._ttl_at.pop(f.topic, None)
        return error

    def _command_done(self, f: _Frame, what: str) -> None:
        if what == "store":
            f.store = False
            self.stream_published += len(f.messages)
            self.published += len(f.messages)
            _resolve(f.futures)
        elif what == "publish":
            f.publish = False
            if not f.lossless:
                self.published += len(f.messages)
                _resolve(f.futures)

    def note_fault(self, exc: BaseException) -> None:
        """Count a transient fault against its condition (one log line per episode): Redis
        full (OOM) or Redis unreachable (everything else)."""
        (self.full if classify(exc) is Fault.OOM else self.outage).hit(exc)

    def _recovered(self, wrote: bool = False) -> None:
        """An operation succeeded: the outage is over if the listener is subscribed again;
        a write that succeeded ends a full-Redis condition."""
        if self._subscribed:
            self.outage.clear()
        if wrote:
            self.full.clear()

    # -- incoming: pub/sub ---------------------------------------------------------------
    async def _subscribe(self) -> None:
        """A fresh pub/sub connection with the pattern subscription, confirmed by Redis."""
        await self._drop_pubsub()
        assert self._sub_client is not None  # noqa: S101 - set by start()
        pubsub = self._pubsub = self._sub_client.pubsub()
        pattern = self.keys.topic_pattern
        try:
            await pubsub.psubscribe(pattern)
            deadline = time.monotonic() + SUBSCRIBE_TIMEOUT_S
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no confirmation of PSUBSCRIBE {pattern} within {SUBSCRIBE_TIMEOUT_S}s")
                response = await pubsub.parse_response(block=False, timeout=left)
                if response and response[0] == b"psubscribe":
                    break
        except RedisError as exc:
            if classify(exc) is Fault.FATAL:
                raise self.fatal(exc, "subscribe to", pattern, f"&{pattern}", "channel") from exc
            raise
        if self.outage.active and self._redis is not None:
            # idle pooled connections may predate the outage (a restarted Redis): drop them,
            # so the next command connects afresh instead of failing once more
            try:
                pool = getattr(self._redis, "connection_pool", None)  # a cluster client has one per node
                if pool is not None:
                    await pool.disconnect(inuse_connections=False)
            except (RedisError, OSError) as exc:
                log.debug("relay: dropping idle connections failed: %r", exc)
        self._subscribed = True
        self.outage.clear()

    async def _drop_pubsub(self) -> None:
        self._subscribed = False
        pubsub, self._pubsub = self._pubsub, None
        if pubsub is not None:
            try:
                await asyncio.wait_for(pubsub.aclose(), STOP_STEP_TIMEOUT_S)
            except (RedisError, OSError, TimeoutError) as exc:
                log.debug("relay: closing the pub/sub connection failed: %r", exc)

    async def _listen(self) -> None:
        backoff = Backoff(base_s=0.1, cap_s=RECONNECT_CAP_S, floor_s=0.05)
        while True:
            try:
                if not self._subscribed:
                    await self._subscribe()
                    backoff.reset()
                await self._pump()
            except asyncio.CancelledError:
                raise
            except RelayFatalError:
                raise
            except Exception as exc:
                if classify(exc) not in TRANSIENT:
                    await self._drop_pubsub()  # a restarted listener subscribes afresh
                    raise
                self.note_fault(exc)
                await self._drop_pubsub()
                await backoff.sleep()

    async def _pump(self) -> None:
        """Read pub/sub messages until the connection fails; a link silent for LISTEN_IDLE_S
        is PINGed, and one that does not answer within LISTEN_IDLE_S more is dead."""
        pubsub = self._pubsub
        prefix_len, own, handle, wanted = len(self._prefix), self.relay_id, self._on_remote, self._wanted
        pinged = 0.0
        while True:
            response = await pubsub.parse_response(block=False, timeout=LISTEN_IDLE_S)
            if response is None:
                if pinged and time.monotonic() - pinged >= LISTEN_IDLE_S:
                    raise TimeoutError(f"pub/sub link silent: no answer to PING within {LISTEN_IDLE_S}s")
                if not pinged:
                    pinged = time.monotonic()
                    await pubsub.ping()
                continue
            pinged = 0.0
            if not isinstance(response, list) or response[0] != b"pmessage":
                continue
            topic = response[2][prefix_len:].decode("utf-8", errors="replace")
            if wanted is not None and not wanted(topic):
                continue  # no local subscriber: not even decoded
            relay_id, host, task, messages = decode_frame(response[3])
            if relay_id == own:
                continue
            if relay_id and self._lossless is not None and self.is_lossless(topic):
                continue  # a relay's frame of a lossless topic: it arrives through the stream
            self.received += len(messages)
            try:
                handle(topic, messages, host, task)
            except Exception:  # a routing bug must not kill the listener
                log.exception("relay: failed to route a message from %s", host)

    # -- incoming: lossless streams --------------------------------------------------------
    async def _stream_end(self, key: str) -> str:
        """The id of the newest entry of ``key`` ("0-0" when it has none): reading after it
        gets what was added since."""
        try:
            last: Any = await self.redis.xrevrange(key, count=1)  # bytes replies: no decode_responses
        except RedisError as exc:
            if classify(exc) is Fault.FATAL:
                raise self.fatal(exc, "read the stream", key, f"~{self.stream_key('*')}", "key") from exc
            raise
        return last[0][0].decode() if last else "0-0"

    async def prime_stream(self, topic: str) -> None:
        """Fix where the reading of a lossless topic starts (now), before anything is
        published on it; :meth:`open_stream` then reads from there."""
        state = self._streams.get(topic)
        if state is None:
            state = self._streams[topic] = _StreamState(None)
        if state.cursor is None:
            state.cursor = await self._stream_end(self.stream_key(topic))

    def open_stream(self, topic: str) -> None:
        """Start delivering a lossless topic to this relay's subscribers (idempotent)."""
        state = self._streams.get(topic)
        if state is None:
            state = self._streams[topic] = _StreamState(None)
        if state.task is None or state.task.done():
            state.task = self.guard.spawn(f"stream reader {topic}", lambda: self._read_stream(topic, state),
                                          restart=True)

    def close_stream(self, topic: str) -> None:
        """Stop reading a lossless topic (its last local subscriber is gone)."""
        state = self._streams.pop(topic, None)
        if state is not None and state.task is not None:
            state.task.cancel()

    async def _read_stream(self, topic: str, state: _StreamState) -> None:
        key, backoff = self.stream_key(topic), Backoff(base_s=0.1, cap_s=RECONNECT_CAP_S, floor_s=0.05)
        while True:
            try:
                if state.cursor is None:
                    state.cursor = await self._stream_end(key)
                response: Any = await self.redis.xread({key: state.cursor}, count=STREAM_READ_COUNT, block=STREAM_BLOCK_MS)
            except asyncio.CancelledError:
                raise
            except RelayFatalError:
                raise
            except Exception as exc:
                if classify(exc) not in TRANSIENT:
                    raise self.fatal(exc, "read the stream", key, f"~{self.stream_key('*')}", "key") from exc
                self.note_fault(exc)
                await backoff.sleep()
                continue
            backoff.reset()
            self._recovered()
            for _, entries in response or ():
                for entry_id, fields in entries:
                    await self._stream_entry(topic, state, fields)
                    state.cursor = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)

    async def _stream_entry(self, topic: str, state: _StreamState, fields: dict[bytes, bytes]) -> None:
        relay_id, host, task, messages = decode_frame(fields.get(b"frame", b""))
        try:
            seq = int(fields.get(b"seq", b"-1"))
        except ValueError:
            seq = -1
        origin = (relay_id, task)
        last = state.seen.get(origin)
        if seq >= 0 and last is not None:
            if seq <= last:  # sent again after a failed attempt that had reached Redis
                skip = min(len(messages), last - seq + 1)
                self.stream_duplicates += skip
                messages, seq = messages[skip:], seq + skip
                if not messages:
                    return
            elif seq > last + 1:
                gap = seq - last - 1
                self.stream_lost += gap
                log.warning("relay: %d message(s) of task %s on lossless topic %s were trimmed from %s before "
                            "this relay read them (raise lossless_maxlen, or speed up the subscriber)",
                            gap, task or "?", topic, self.stream_key(topic))
        if seq >= 0:
            if origin not in state.seen and len(state.seen) >= STREAM_ORIGINS_MAX:
                del state.seen[next(iter(state.seen))]
            state.seen[origin] = seq + len(messages) - 1
        self.stream_received += len(messages)
        if self._on_stream is not None:
            await self._on_stream(topic, messages, host, task)

    # -- heartbeats ----------------------------------------------------------------------
    async def heartbeat(self, record: dict[str, Any], interval_s: float) -> list[dict[str, Any]]:
        """Write this relay's heartbeat and return the live peers' records (stale ones pruned).
        Raises :class:`RelayFatalError` when Redis refuses the key for good."""
        now = time.time()
        entry = dict(record, at=now, relay_id=self.relay_id)
        try:
            pipe = self.redis.pipeline(transaction=False)
            pipe.hset(self.keys.relays, self.relay_id, _packb(entry))
            pipe.hgetall(self.keys.relays)
            _, raw = await pipe.execute()
            peers, stale = [], []
            for key, value in raw.items():
                try:
                    peer = msgpack.unpackb(value, raw=False)
                    at = float(peer.get("at", 0))
                except (ValueError, TypeError, AttributeError, msgpack.UnpackException):
                    stale.append(key)
                    continue
                if now - at > STALE_INTERVALS * interval_s:
                    stale.append(key)
                elif key.decode() != self.relay_id:
                    peers.append(peer)
            if stale:
                await self.redis.hdel(self.keys.relays, *stale)
        except RedisError as exc:
            if classify(exc) is Fault.FATAL:
                raise self.fatal(exc, "write", self.keys.relays, f"~{self.keys.relays}", "key") from exc
            raise
        self._recovered(wrote=True)
        return peers

    # -- state and stop ------------------------------------------------------------------
    def outbox_stats(self, source: str) -> dict[str, int]:
        box = self._outboxes.get(source)
        if box is None:
            return {"outbox": 0, "outbox_max": OUTBOX_DEFAULT, "publish_dropped": 0}
        return {"outbox": len(box.items), "outbox_max": box.limit, "publish_dropped": box.dropped}

    def pending(self) -> int:
        """Messages not yet handed to Redis (queued, or being sent)."""
        return sum(len(b.items) for b in self._ring) + sum(len(f.messages) for f in self._unsent)

    def pending_lossless(self) -> bool:
        return bool(any(f.store for f in self._unsent) or any(b.lossless for b in self._ring))

    async def flush(self, timeout_s: float) -> None:
        """Wait (at most ``timeout_s``) until everything queued has been handed to Redis."""
        deadline = time.monotonic() + timeout_s
        while (self.pending() or self._busy) and time.monotonic() < deadline:
            if self._publisher is None or self._publisher.done():
                break
            await asyncio.sleep(0.005)

    async def stop(self) -> None:
        """Stop the tasks, remove the heartbeat, close connections. Idempotent; each Redis
        step is bounded by ``STOP_STEP_TIMEOUT_S`` so a stuck Redis cannot hang shutdown."""
        self.unsent_at_stop += self.pending()
        if self.unsent_at_stop:
            log.warning("relay: %d message(s) not sent to Redis before the relay stopped", self.unsent_at_stop)
        await self.guard.cancel_all()
        for box in self._outboxes.values():
            for _, _, _, future in box.items:
                if future is not None and not future.done():
                    future.set_exception(BrokerError("the relay stopped before the message was sent"))
            box.items.clear()
        self._ring.clear()
        for f in self._unsent:
            _resolve(f.futures, BrokerError("the relay stopped before the message was sent"))
        self._unsent = []
        self._streams.clear()
        if self._redis is not None:
            try:
                await asyncio.wait_for(self._redis.hdel(self.keys.relays, self.relay_id), STOP_STEP_TIMEOUT_S)
            except (RedisError, OSError, TimeoutError) as exc:
                log.debug("relay: heartbeat not removed: %r", exc)
        await self._close()

    async def _close(self) -> None:
        await self._drop_pubsub()
        clients = [c for c in (self._sub_client, self._redis) if c is not None]
        self._sub_client, self._redis = None, None
        for client in clients:
            try:
                await asyncio.wait_for(client.aclose(), STOP_STEP_TIMEOUT_S)
            except (RedisError, OSError, TimeoutError) as exc:
                log.debug("relay: closing a Redis connection failed: %r", exc)
