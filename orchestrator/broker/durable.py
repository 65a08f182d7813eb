"""Durable publishing: a publish that returns only once ``publish_wait_replicas`` replicas
hold the entry (Redis ``WAIT``), so that an acknowledged publish survives a failover.

Replication is asynchronous: a master acknowledges a write before any replica has it, and a
failover in between loses it (docs/scaling.md, "Sentinel"). ``WAIT numreplicas timeout``
blocks until that many replicas confirmed every write the *same connection* made, so the
publish and its WAIT go out together on one connection, in one round trip:

* one Redis or a Sentinel-managed master: a pipeline (no transaction) of the publish script
  (or plain XADD) and WAIT;
* a cluster: the same two commands on one connection of the node that owns the stream key's
  slot; a MOVED / ASK / connection error reloads the slot map and tries the new owner (the
  publish script is idempotent: a resend finds its marker and adds nothing).

Fewer replicas than asked within ``publish_wait_timeout_ms`` raise
:class:`~orchestrator.errors.ReplicationError` (CLI exit 75): the entry is on the master and
may well be delivered, but a failover now could lose it; publishing the same event again
within ``publish_dedup_ms`` adds nothing twice.

``Callable`` script objects are redis-py's ``Script`` (``register_script``); ``call`` is the
script's (KEYS, ARGV) from :func:`orchestrator.broker.streams.publish_once_call`, or None for
a plain XADD of ``fields``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import redis.asyncio as aioredis
from redis import exceptions as rx
from redis.asyncio.cluster import PipelineCommand

from orchestrator.broker import scripts
from orchestrator.broker.connection import is_cluster
from orchestrator.config import Settings
from orchestrator.errors import ReplicationError

#: tries of a durable publish on a cluster whose slot moved or whose node went away
CLUSTER_TRIES = 3

Call = tuple[list[str], list[Any]] | None
#: a cluster publish that met these goes to the slot's owner after the slot map is reloaded
_MOVED_OR_GONE = (rx.MovedError, rx.AskError, rx.TryAgainError, rx.ClusterDownError, rx.ConnectionError,
                  rx.TimeoutError)


def wait_block_ms(settings: Settings) -> int:
    """How long a durable publish's WAIT may block (0 without the option): the client's socket
    timeout must leave room for it, as for a blocking read (``create_redis(block_ms=...)``)."""
    return settings.publish_wait_timeout_ms if settings.publish_wait_replicas else 0


def _flat(fields: Mapping[str, bytes | str]) -> list[bytes | str]:
    return [x for kv in fields.items() for x in kv]


def _commands(stream: str, fields: Mapping[str, bytes | str], call: Call) -> tuple[Any, ...]:
    """The raw publish command: EVAL of the publish script, or XADD."""
    if call is None:
        return ("XADD", stream, "*", *_flat(fields))
    keys, args = call
    return ("EVAL", scripts.PUBLISH_ONCE, len(keys), *keys, *args)


def check_acked(acked: Any, stream_id: str, settings: Settings) -> str:
    """``stream_id`` when WAIT's reply ``acked`` reaches ``publish_wait_replicas``; else
    :class:`ReplicationError`."""
    wanted, count = settings.publish_wait_replicas, int(acked)
    if count < wanted:
        raise ReplicationError(
            f"published event stored as {stream_id} on the master, but only {count} of {wanted} replica(s) "
            f"confirmed it within publish_wait_timeout_ms={settings.publish_wait_timeout_ms}: a failover now "
            "could lose it", acked=count, wanted=wanted, stream_id=stream_id)
    return stream_id


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def publish_and_wait(redis: aioredis.Redis, script: Any, stream: str, fields: Mapping[str, bytes | str],
                           call: Call, settings: Settings) -> str:
    """Publish one entry and WAIT for the replicas on the same connection; its stream id."""
    wait = ("WAIT", settings.publish_wait_replicas, settings.publish_wait_timeout_ms)
    if is_cluster(redis):
        stream_id, acked = await _cluster_publish(redis, stream, _commands(stream, fields, call), wait)
    else:
        pipe = redis.pipeline(transaction=False)
        if call is None:
            pipe.xadd(stream, dict(fields))  # type: ignore[arg-type]
        else:
            await script(keys=call[0], args=call[1], client=pipe)
        pipe.execute_command(*wait)
        reply, acked = await pipe.execute()
        stream_id = _text(reply)
    return check_acked(acked, stream_id, settings)


async def _cluster_publish(cluster: Any, stream: str, command: tuple[Any, ...],
                           wait: tuple[Any, ...]) -> tuple[str, Any]:
    """``command`` then WAIT on one connection of the node owning ``stream``'s slot."""
    error: BaseException | None = None
    for _ in range(CLUSTER_TRIES):
        await cluster.initialize()
        node = cluster.get_node_from_key(stream)
        commands = [PipelineCommand(0, *command), PipelineCommand(1, *wait)]
        try:
            await node.execute_pipeline(commands)
        except (rx.ConnectionError, rx.TimeoutError) as exc:
            error = exc
            await cluster.nodes_manager.initialize()
            continue
        first, second = commands[0].result, commands[1].result
        if isinstance(first, _MOVED_OR_GONE):  # read errors land in the results, not raised
            error = first
            await cluster.nodes_manager.initialize()
            continue
        for result in (first, second):
            if isinstance(result, BaseException):
                raise result
        return _text(first), second
    raise error if error is not None else rx.ClusterError("durable publish: no node took it")


def publish_and_wait_sync(redis: Any, script: Any, stream: str, fields: Mapping[str, bytes | str],
                          call: Call, settings: Settings) -> str:
    """:func:`publish_and_wait` for redis-py's synchronous client (one Redis, Sentinel, or a
    cluster: there, on a pipeline of the owning node's own client)."""
    wait = ("WAIT", settings.publish_wait_replicas, settings.publish_wait_timeout_ms)
    error: BaseException | None = None
    for _ in range(CLUSTER_TRIES if is_cluster(redis) else 1):
        client = redis.get_redis_connection(redis.get_node_from_key(stream)) if is_cluster(redis) else redis
        pipe = client.pipeline(transaction=False)
        if call is None:
            pipe.xadd(stream, dict(fields))
        else:
            script(keys=call[0], args=call[1], client=pipe)
        pipe.execute_command(*wait)
        try:
            reply, acked = pipe.execute()
        except _MOVED_OR_GONE as exc:
            if not is_cluster(redis):
                raise
            error = exc
            redis.nodes_manager.initialize()
            continue
        return check_acked(acked, _text(reply), settings)
    raise error if error is not None else rx.ClusterError("durable publish: no node took it")
