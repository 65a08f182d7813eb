"""The relay's Redis side: topic messages over pub/sub, and relay heartbeats.

Wire form of one relayed message: ``PUBLISH {ns}:topic:{topic} <frame>`` where ``frame`` is
msgpack of ``[1, relay_id, host, task, message]`` (format version, the origin relay, its
host, the publishing task, the message text). Under load, consecutive messages of one task
on one topic share a frame: ``message`` is then the list of their texts, in order (up to
``FRAME_MAX_CHARS``), so a burst costs one PUBLISH per run. A payload that is not a frame (for
example ``redis-cli PUBLISH tokiwa:topic:orders hello``) is delivered as the message text
itself, from origin ``redis``.

Every relay holds **one** pattern subscription (``{ns}:topic:*``) and routes what it
receives to its local subscribers; it skips frames it published itself, because it already
delivered those locally. Outgoing messages go through one queue and one publisher task that
pipelines whatever has piled up, so a burst costs one round trip, not one per line.

Heartbeats: ``HSET {ns}:relays {relay_id} <msgpack {host, pid, tasks, topics, at}>`` every
``heartbeat_interval_s``; entries older than 3 intervals are pruned by whoever sees them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import msgpack
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from orchestrator.errors import BrokerError, InvalidArgumentError
from orchestrator.keys import Keys
from orchestrator.topics import FRAME_VERSION, encode_topic_frame  # one wire format for app and relay

log = logging.getLogger("tokiwa.relay")

#: most messages sent in one pipeline by the publisher task.
PUBLISH_BATCH = 512
#: a frame that carries several messages stops growing past this many characters.
FRAME_MAX_CHARS = 64 * 1024
#: most messages waiting to be published; beyond it they are counted as ``publish_dropped``.
OUTBOX_MAX = 100_000
#: pause after a Redis connection error before the listener / publisher try again.
RETRY_DELAY_S = 0.5
#: a heartbeat older than this many intervals belongs to a dead relay.
STALE_INTERVALS = 3
#: socket timeout of ordinary commands (PUBLISH, HSET ...): a frozen Redis is an error, not a hang.
#: The pub/sub connection has none: it waits for messages for as long as it takes.
COMMAND_TIMEOUT_S = 5.0
#: longest wait for each Redis step of stop() (remove heartbeat, close connections).
STOP_STEP_TIMEOUT_S = 2.0

_packb = msgpack.Packer(use_bin_type=True).pack

RemoteHandler = Callable[[str, list[str], str, str], None]  # (topic, messages, host, task)


encode_frame = encode_topic_frame  # the app and the relay write one wire format


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
    runs: list[tuple[str, str, list[str]]] = []
    size = 0
    for topic, message, task in batch:
        if runs and runs[-1][0] == topic and runs[-1][1] == task and size + len(message) <= FRAME_MAX_CHARS:
            runs[-1][2].append(message)
            size += len(message)
        else:
            runs.append((topic, task, [message]))
            size = len(message)
    return runs


async def publish_topic_message(
    client: aioredis.Redis, keys: Keys, topic: str, message: str, *, host: str = "", task: str = ""
) -> int:
    """Publish one topic message without a running relay (a producer, or a node on a worker
    started without ``--relay``): every relay of the namespace delivers it to its subscribers.
    Returns how many pub/sub subscriptions (relays) Redis reached."""
    if not isinstance(topic, str) or not topic or any(c.isspace() for c in topic):
        raise InvalidArgumentError(f"a topic must be a non-empty string without whitespace, got {topic!r}")
    if not isinstance(message, str):
        raise InvalidArgumentError(f"a topic message must be a str, got {type(message).__name__}")
    return int(await client.publish(keys.topic(topic), encode_frame("", host, task, message)))


class RelayTransport:
    """Pub/sub publisher and listener plus heartbeat writer for one relay."""

    def __init__(self, redis_url: str, keys: Keys, relay_id: str, host: str, on_remote: RemoteHandler) -> None:
        self.keys = keys
        self.relay_id = relay_id
        self.host = host
        self.published = 0
        self.received = 0
        self.publish_errors = 0
        self.publish_dropped = 0
        self._url = redis_url
        self._on_remote = on_remote
        self._prefix = keys.topic("")
        self._outbox: asyncio.Queue[tuple[str, str, str]] = asyncio.Queue(OUTBOX_MAX)
        self._redis: aioredis.Redis | None = None
        self._sub_client: aioredis.Redis | None = None
        self._pubsub: Any = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def redis(self) -> aioredis.Redis:
        if self._redis is None:
            raise BrokerError("relay transport is not started")
        return self._redis

    async def start(self) -> None:
        """Connect, subscribe to every topic of the namespace, start listener and publisher."""
        self._redis = aioredis.from_url(
            self._url, socket_timeout=COMMAND_TIMEOUT_S, socket_connect_timeout=COMMAND_TIMEOUT_S,
            socket_keepalive=True,
        )
        self._sub_client = aioredis.from_url(self._url, socket_connect_timeout=COMMAND_TIMEOUT_S, socket_keepalive=True)
        try:
            self._pubsub = self._sub_client.pubsub()
            await self._pubsub.psubscribe(self.keys.topic_pattern)
        except RedisError as exc:
            await self._close()
            raise BrokerError(f"relay cannot subscribe on {self._url}: {exc}") from exc
        for coro in (self._listen(), self._publish_loop()):
            task = asyncio.create_task(coro)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    # -- outgoing ------------------------------------------------------------------------
    def publish_nowait(self, topic: str, message: str, task: str) -> None:
        """Queue one message for the publisher task (never blocks the caller)."""
        try:
            self._outbox.put_nowait((topic, message, task))
        except asyncio.QueueFull:
            self.publish_dropped += 1
            if self.publish_dropped == 1 or self.publish_dropped % 1000 == 0:
                log.warning("relay: Redis publishing is behind; %d message(s) dropped", self.publish_dropped)

    async def publish(self, topic: str, message: str, task: str) -> int:
        """Publish one message now; returns how many relays (subscribers) Redis reached."""
        try:
            count = await self.redis.publish(self.keys.topic(topic), encode_frame(self.relay_id, self.host, task, message))
        except RedisError as exc:
            self.publish_errors += 1
            raise BrokerError(f"relay cannot publish on topic {topic!r}: {exc}") from exc
        self.published += 1
        return int(count)

    async def _publish_loop(self) -> None:
        queue = self._outbox
        while True:
            batch = [await queue.get()]
            while len(batch) < PUBLISH_BATCH and not queue.empty():
                batch.append(queue.get_nowait())
            for attempt in (1, 2):  # a pooled connection may be stale after a Redis restart: retry once
                try:
                    await self._send(batch)
                    self.published += len(batch)
                    break
                except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                    if attempt == 2:
                        self.publish_errors += len(batch)
                        log.warning("relay: %d message(s) not published, Redis unavailable: %s", len(batch), exc)
                        await asyncio.sleep(RETRY_DELAY_S)

    async def _send(self, batch: list[tuple[str, str, str]]) -> None:
        relay_id, host, prefix = self.relay_id, self.host, self._prefix
        runs = frames_of(batch)
        if len(runs) == 1:
            topic, task, messages = runs[0]
            payload = messages[0] if len(messages) == 1 else messages
            await self.redis.publish(prefix + topic, encode_frame(relay_id, host, task, payload))
            return
        pipe = self.redis.pipeline(transaction=False)
        for topic, task, messages in runs:
            pipe.publish(prefix + topic, encode_frame(relay_id, host, task, messages[0] if len(messages) == 1 else messages))
        await pipe.execute()

    # -- incoming ------------------------------------------------------------------------
    async def _listen(self) -> None:
        prefix_len, own, handle = len(self._prefix), self.relay_id, self._on_remote
        while True:
            try:
                response = await self._pubsub.parse_response(block=True)
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                log.warning("relay: pub/sub connection lost (%s); reconnecting", exc)
                await asyncio.sleep(RETRY_DELAY_S)
                continue
            if not response or response[0] != b"pmessage":
                continue
            relay_id, host, task, messages = decode_frame(response[3])
            if relay_id == own:
                continue
            self.received += len(messages)
            try:
                handle(response[2][prefix_len:].decode("utf-8", errors="replace"), messages, host, task)
            except Exception:  # a routing bug must not kill the listener
                log.exception("relay: failed to route a message from %s", host)

    # -- heartbeats ----------------------------------------------------------------------
    async def heartbeat(self, record: dict[str, Any], interval_s: float) -> list[dict[str, Any]]:
        """Write this relay's heartbeat and return the live peers' records (stale ones pruned)."""
        now = time.time()
        entry = dict(record, at=now, relay_id=self.relay_id)
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
        return peers

    # -- stop ----------------------------------------------------------------------------
    async def flush(self, timeout_s: float) -> None:
        """Wait (at most ``timeout_s``) until the outbox is empty."""
        deadline = time.monotonic() + timeout_s
        while not self._outbox.empty() and time.monotonic() < deadline:
            await asyncio.sleep(0.005)

    async def stop(self) -> None:
        """Stop the tasks, remove the heartbeat, close connections. Idempotent; each Redis
        step is bounded by ``STOP_STEP_TIMEOUT_S`` so a stuck Redis cannot hang shutdown."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if self._redis is not None:
            try:
                await asyncio.wait_for(self._redis.hdel(self.keys.relays, self.relay_id), STOP_STEP_TIMEOUT_S)
            except (RedisError, OSError, TimeoutError) as exc:
                log.debug("relay: heartbeat not removed: %r", exc)
        await self._close()

    async def _close(self) -> None:
        pubsub, clients = self._pubsub, [c for c in (self._sub_client, self._redis) if c is not None]
        self._pubsub, self._sub_client, self._redis = None, None, None
        closers = ([pubsub.aclose()] if pubsub is not None else []) + [c.aclose() for c in clients]
        for closer in closers:
            try:
                await asyncio.wait_for(closer, STOP_STEP_TIMEOUT_S)
            except (RedisError, OSError, TimeoutError) as exc:
                log.debug("relay: closing a Redis connection failed: %r", exc)
