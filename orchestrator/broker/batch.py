"""Several Lua script calls and plain commands sent together, on one Redis and on a cluster.

    batch = Batch(redis)                                   # SyncBatch for a synchronous client
    batch.script(publish_once, keys=[stream, marker], args=[ttl, *fields])
    batch.command("xadd", stream, fields)
    batch.command("zrange", key, 0, 9, withscores=True)    # any redis-py command method
    stream_id, other_id, head = await batch.execute()

On one Redis (a plain client or a Sentinel-managed master) a batch is one round trip: a
non-transaction pipeline that starts with a ``SCRIPT LOAD`` of each script it calls (the server
only hashes the text when it knows it already) followed by the calls, every script call an
``EVALSHA``. So no call meets ``NOSCRIPT`` (not on first use, nor on a server that restarted or
took over in a failover), none has to be resent out of order, and no ``SCRIPT EXISTS`` round
trip is needed.

On a Redis Cluster, redis-py refuses scripts in its cluster pipelines. A batch groups the calls
by the master that serves each call's first key (all keys of one call share a slot) and sends
each group to its master as a plain pipeline, ``SCRIPT LOAD`` first as above: one round trip per
master, the masters' in parallel (asyncio) or in turn (synchronous). A call that the master
answers with a redirection or a failover error (``MOVED``, ``ASK``, ``TRYAGAIN``,
``CLUSTERDOWN``, ``READONLY``, ``NOSCRIPT``), and every call of a group whose connection
failed, is sent again through the cluster client itself, which follows the redirection,
reloads the slot map and retries as for any command (``max_in_flight`` at once). Resending
after a failed connection is what redis-py's own pipelines do; the callers' scripts are
idempotent (the publish script's marker, a run record's replace).

Order: calls with the same first key (a script's ``KEYS[1]``, a command's first argument) run
in the order they were added, on either topology, so the publishes of one stream land in that
order; only calls resent after a resharding or a failover of their slot may come after calls
of the same key that were not. A batch is not a transaction: each script is atomic by itself,
the batch as a whole is not. Replies come back in the order of the calls; with
``raise_on_error`` (the default) the first error reply is raised after every call has run,
otherwise error replies are returned in place. A connection error or timeout that the client's
own retries do not overcome is raised.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio.cluster import PipelineCommand
from redis.commands.core import CoreCommands
from redis.exceptions import (
    AskError,
    ClusterDownError,
    NoScriptError,
    ReadOnlyError,
    RedisClusterException,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from orchestrator.broker.connection import is_cluster
from orchestrator.errors import InvalidArgumentError

#: most calls resent at once through a cluster client (each on its own pooled connection)
MAX_IN_FLIGHT = 32
#: replies of a master that send the call again through the cluster client (MovedError is an AskError)
_RESEND = (AskError, TryAgainError, ClusterDownError, ReadOnlyError, NoScriptError,
           RedisConnectionError, RedisTimeoutError, ConnectionError, TimeoutError, OSError)


class _Arguments(CoreCommands):
    """Builds a command's arguments and reply options as redis-py's method of that name does."""

    _event_dispatcher: Any = None  # an attribute redis-py's command mixins declare; unused here

    def execute_command(self, *args: Any, **options: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return args, options


_ARGUMENTS = _Arguments()


@dataclass(frozen=True, slots=True)
class _Call:
    """One queued call: a script (``script`` set, ``args`` = keys + argv) or a command method."""

    name: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)
    script: Any = None
    numkeys: int = 0

    @property
    def chain(self) -> Any:
        """What orders this call: its first key (None: it orders with nothing)."""
        if self.script is not None:
            return self.args[0] if self.numkeys else None
        return self.args[0] if self.args else None

    def queue(self, pipe: Any) -> None:
        """Add the call to a (non-cluster) pipeline."""
        if self.script is not None:
            pipe.evalsha(self.script.sha, self.numkeys, *self.args)
        else:
            getattr(pipe, self.name)(*self.args, **self.kwargs)

    def wire(self, position: int) -> PipelineCommand:
        """The call as a command of a cluster node's pipeline."""
        if self.script is not None:
            return PipelineCommand(position, "EVALSHA", self.script.sha, self.numkeys, *self.args)
        args, options = getattr(_ARGUMENTS, self.name)(*self.args, **self.kwargs)
        return PipelineCommand(position, *args, **options)

    def on(self, client: Any) -> Any:
        """Send the call through ``client`` alone (a script reloads itself on NOSCRIPT)."""
        if self.script is not None:
            keys, argv = self.args[:self.numkeys], self.args[self.numkeys:]
            return self.script(keys=keys, args=argv, client=client)
        return getattr(client, self.name)(*self.args, **self.kwargs)


class _Calls:
    """The queue shared by :class:`Batch` and :class:`SyncBatch`."""

    def __init__(self, client: Any, max_in_flight: int = MAX_IN_FLIGHT) -> None:
        if max_in_flight < 1:
            raise InvalidArgumentError(f"max_in_flight must be >= 1, got {max_in_flight}")
        self.client = client
        self.cluster = is_cluster(client)
        self.max_in_flight = max_in_flight
        self._calls: list[_Call] = []

    def script(self, script: Any, keys: Sequence[Any] = (), args: Iterable[Any] = ()) -> _Calls:
        """Queue a call of ``script`` (a ``register_script`` object of this batch's client or
        of any client: only its text and sha are used)."""
        keys = tuple(keys)
        self._calls.append(_Call("evalsha", keys + tuple(args), script=script, numkeys=len(keys)))
        return self

    def command(self, name: str, *args: Any, **kwargs: Any) -> _Calls:
        """Queue a call of the client's command method ``name`` (``"xadd"``, ``"zcard"`` ...)."""
        if name.startswith("_") or not callable(getattr(self.client, name, None)) \
                or not callable(getattr(_ARGUMENTS, name, None)):
            raise InvalidArgumentError(f"{name!r} is not a command method of {type(self.client).__name__}")
        self._calls.append(_Call(name, args, kwargs))
        return self

    def __len__(self) -> int:
        return len(self._calls)

    def _take(self) -> list[_Call]:
        calls, self._calls = self._calls, []
        return calls

    @staticmethod
    def _queue(pipe: Any, calls: Sequence[_Call]) -> int:
        """Queue a SCRIPT LOAD of each distinct script, then the calls; returns how many loads."""
        scripts = {call.script.sha: call.script for call in calls if call.script is not None}
        for script in scripts.values():
            pipe.script_load(script.script)
        for call in calls:
            call.queue(pipe)
        return len(scripts)

    @staticmethod
    def _replies(replies: list[Any], loads: int) -> list[Any]:
        """The calls' replies of a pipeline queued by :meth:`_queue` (a failed load is raised:
        the calls of its script could not run)."""
        for reply in replies[:loads]:
            if isinstance(reply, BaseException):
                raise reply
        return replies[loads:]

    def _by_node(self, calls: Sequence[_Call]) -> tuple[dict[str, tuple[Any, list[int]]], list[int]]:
        """The calls' indices by the master of their first key; and those with no key or whose
        slot the client knows no master for (sent through the cluster client)."""
        groups: dict[str, tuple[Any, list[int]]] = {}
        loose: list[int] = []
        for i, call in enumerate(calls):
            try:
                node = None if call.chain is None else self.client.get_node_from_key(call.chain)
            except RedisClusterException:  # the slot has no known master (a failover)
                node = None
            if node is None:
                loose.append(i)
            else:
                groups.setdefault(node.name, (node, []))[1].append(i)
        return groups, loose

    @staticmethod
    def _chains(calls: Sequence[_Call], indices: Iterable[int]) -> list[list[int]]:
        """``indices``, one list per first key of their calls (in call order)."""
        chains: dict[Any, list[int]] = {}
        for i in sorted(indices):
            key = calls[i].chain
            chains.setdefault(("call", i) if key is None else ("key", key), []).append(i)
        return list(chains.values())

    @staticmethod
    def _finish(replies: list[Any], raise_on_error: bool) -> list[Any]:
        if raise_on_error:
            for reply in replies:
                if isinstance(reply, ResponseError):
                    raise reply
        return replies


class Batch(_Calls):
    """Script calls and commands of an asyncio client, sent together (see the module doc)."""

    async def execute(self, raise_on_error: bool = True) -> list[Any]:
        """Send the queued calls and return their replies in order; the batch is empty
        afterwards, ready for reuse."""
        calls = self._take()
        if not calls:
            return []
        replies = await (self._per_node(calls) if self.cluster else self._pipelined(calls))
        return self._finish(replies, raise_on_error)

    async def _pipelined(self, calls: list[_Call]) -> list[Any]:
        pipe = self.client.pipeline(transaction=False)
        loads = self._queue(pipe, calls)
        replies: list[Any] = await pipe.execute(raise_on_error=False)
        return self._replies(replies, loads)

    async def _per_node(self, calls: list[_Call]) -> list[Any]:
        await self.client.initialize()  # the slot map (a no-op once it is loaded)
        replies: list[Any] = [None] * len(calls)
        groups, loose = self._by_node(calls)
        await asyncio.gather(*(self._node_pipeline(node, calls, indices, replies)
                               for node, indices in groups.values()))
        resend = set(loose) | {i for i, reply in enumerate(replies) if isinstance(reply, _RESEND)}
        if resend:
            await self._one_by_one(calls, resend, replies)
        return replies

    @staticmethod
    async def _node_pipeline(node: Any, calls: list[_Call], indices: list[int], replies: list[Any]) -> None:
        """One plain pipeline to one master: SCRIPT LOAD of its scripts, then its calls."""
        scripts = {calls[i].script.sha: calls[i].script for i in indices if calls[i].script is not None}
        commands = [PipelineCommand(n, "SCRIPT", "LOAD", s.script) for n, s in enumerate(scripts.values())]
        commands += [calls[i].wire(len(scripts) + n) for n, i in enumerate(indices)]
        try:
            await node.execute_pipeline(commands)
        except Exception as exc:  # the link failed (or the node was being replaced): all go again
            for i in indices:
                replies[i] = exc
            return
        for command, i in zip(commands[len(scripts):], indices, strict=True):
            replies[i] = command.result

    async def _one_by_one(self, calls: list[_Call], indices: set[int], replies: list[Any]) -> None:
        gate = asyncio.Semaphore(self.max_in_flight)

        async def run(chain: list[int]) -> None:
            for i in chain:
                async with gate:
                    try:
                        replies[i] = await calls[i].on(self.client)
                    except ResponseError as exc:
                        replies[i] = exc

        outcomes = await asyncio.gather(*(run(c) for c in self._chains(calls, indices)), return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome


class SyncBatch(_Calls):
    """:class:`Batch` for redis-py's synchronous clients (on a cluster, the masters' pipelines
    go one after another)."""

    def execute(self, raise_on_error: bool = True) -> list[Any]:
        calls = self._take()
        if not calls:
            return []
        replies = self._per_node(calls) if self.cluster else self._pipelined(calls)
        return self._finish(replies, raise_on_error)

    def _pipelined(self, calls: list[_Call]) -> list[Any]:
        pipe = self.client.pipeline(transaction=False)
        loads = self._queue(pipe, calls)
        return self._replies(pipe.execute(raise_on_error=False), loads)

    def _per_node(self, calls: list[_Call]) -> list[Any]:
        replies: list[Any] = [None] * len(calls)
        groups, loose = self._by_node(calls)
        for node, indices in groups.values():
            pipe = self.client.get_redis_connection(node).pipeline(transaction=False)
            loads = self._queue(pipe, [calls[i] for i in indices])
            try:
                got = pipe.execute(raise_on_error=False)[loads:]
            except _RESEND as exc:
                got = [exc] * len(indices)
            for i, reply in zip(indices, got, strict=True):
                replies[i] = reply
        resend = set(loose) | {i for i, reply in enumerate(replies) if isinstance(reply, _RESEND)}
        for chain in self._chains(calls, resend):
            for i in chain:
                try:
                    replies[i] = calls[i].on(self.client)
                except ResponseError as exc:
                    replies[i] = exc
        return replies
